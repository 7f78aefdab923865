"""Optional bearer token: when settings.api_token is set, every path but /healthz needs it."""

from __future__ import annotations

import secrets

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import error_response

OPEN_PATHS = frozenset({"/healthz"})


class BearerAuth:
    """ASGI wrapper that answers 401 before the request body is read (no upload for strangers)."""

    def __init__(self, app: ASGIApp, token: str):
        self.app, self.expected = app, f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if secrets.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        message = ("this service needs a token: send 'Authorization: Bearer <token>' with the value of its "
                   "ONNXZIP_API_TOKEN" if not given else "the bearer token is not this service's ONNXZIP_API_TOKEN")
        response = error_response(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)
