"""Optional bearer token: when settings.api_token is set, every path but /healthz needs it."""

from __future__ import annotations

import secrets

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import error_response

OPEN_PATHS = frozenset({"/healthz"})


class BearerAuth:
    """ASGI wrapper that answers 401 before the request body is read (no upload for strangers)."""

    def __init__(self, app: ASGIApp, token: str):
        self.app, self.expected = app, token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = given.strip().partition(b" ")
        # RFC 7235: the scheme is case-insensitive ("bearer", "Bearer", "BEARER")
        if scheme.lower() == b"bearer" and secrets.compare_digest(token.strip(), self.expected):
            return await self.app(scope, receive, send)
        message = ("this service needs a token: send 'Authorization: Bearer <token>' with the value of its "
                   "ONNXZIP_API_TOKEN" if not given else "the bearer token is not this service's ONNXZIP_API_TOKEN")
        response = error_response(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


class HostAndOrigin:
    """ASGI wrapper, before the body is read: a Host outside `allowed_hosts` is refused (400: DNS
    rebinding), and so is a request a browser sends from another origin unless `cors_origins` lists it
    (403; allowed origins get CORS headers from Starlette's CORSMiddleware inside this one)."""

    def __init__(self, app: ASGIApp, allowed_hosts: list[str], cors_origins: list[str]):
        self.app = app
        self.any_host = "*" in allowed_hosts
        self.hosts = {h.lower() for h in allowed_hosts}
        self.origins = set(cors_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1").lower()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if not self.any_host and name not in self.hosts and scope["path"] != "/healthz":
            response = error_response(400, "invalid_host", f"Host '{host}' is not one this service answers to: "
                                      "list it in ONNXZIP_ALLOWED_HOSTS")
            return await response(scope, receive, send)
        origin = headers.get(b"origin")
        if origin is not None and origin.decode("latin-1") not in self.origins and "*" not in self.origins:
            response = error_response(403, "cross_origin_refused",
                                      f"requests from the web origin '{origin.decode('latin-1')}' are refused: "
                                      "list it in ONNXZIP_CORS_ORIGINS to allow a browser app")
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)
