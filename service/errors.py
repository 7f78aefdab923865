"""Every refusal is `{"error": {"code", "message"}}` with a 4xx status and a message that says what to fix.

onnxzip's own errors keep their codes (`invalid_model`, `invalid_calibration`, ...); FastAPI's
validation errors and Starlette's HTTP errors are mapped to the same shape.
"""

from __future__ import annotations

import errno
import logging
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from onnxzip.errors import OnnxZipError

log = logging.getLogger("onnxzip.service")

_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
               409: "conflict", 413: "too_large", 415: "unsupported_media_type", 422: "invalid_request"}

# What each multipart field must hold, for messages about missing or malformed fields.
FIELD_HELP = {
    "models": "two or more .onnx files, in task order (repeat the field: -F models=@a.onnx -F models=@b.onnx)",
    "calibration": "one .npz with an array per model input, keyed by input name (-F calibration=@calib.npz)",
    "options": 'an optional JSON object with the CLI\'s settings, e.g. -F \'options={"share": 1.0}\'',
}


class ApiError(Exception):
    """A refusal with an HTTP status, a stable code and a message that says what to do."""

    def __init__(self, status: int, code: str, message: str, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def error_response(status: int, code: str, message: str, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def not_found(job_id: str) -> ApiError:
    return ApiError(404, "not_found", f"no merge job '{job_id}': it never existed, was deleted, or expired; "
                                      "list jobs with GET /v1/merges")


def _validation_message(exc: RequestValidationError) -> str:
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
    name = loc[0] if loc else "request"
    where = ".".join(loc) or "request"
    if first.get("type") == "missing":
        help_text = FIELD_HELP.get(name)
        return (f"field '{name}' is missing: send {help_text}" if help_text
                else f"'{where}' is missing")
    if "UploadFile" in str(first.get("msg", "")):
        return f"field '{name}' must be a file upload, not text: send {FIELD_HELP.get(name, 'a file')}"
    text = f"'{where}': {first.get('msg', 'is invalid')}"
    if name in FIELD_HELP:
        text += f"; send {FIELD_HELP[name]}"
    return text


def _unavailable_errors() -> tuple[type[Exception], ...]:
    """Errors that mean a backend is out of reach, not a bug: Redis/SQLite (TRANSIENT) and S3 connections."""
    from .store import TRANSIENT

    kinds = list(TRANSIENT)
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError

        kinds.append(BotoConnectionError)
    except ImportError:
        pass
    return tuple(kinds)


def _storage_full(exc: Exception) -> JSONResponse:
    return error_response(507, "insufficient_storage",
                          f"the service's storage is full ({' '.join(str(exc).split())[:120]}): retry once space is "
                          "freed (submit with an Idempotency-Key to make retries safe)", headers={"Retry-After": "60"})


def install(app: FastAPI) -> None:
    """Register the handlers that give every error the one JSON shape."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(OnnxZipError)
    async def _engine_error(request: Request, exc: OnnxZipError):
        return error_response(422, exc.code, " ".join(str(exc).split()))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return error_response(422, "invalid_request", _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no endpoint at {request.method} {request.url.path}: see /docs for the API"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}: see /docs for the API"
        elif exc.status_code == 400 and "parsing the body" in message:
            message = ("the request body could not be read as multipart/form-data; send the fields "
                       "models, calibration and options as curl -F does")
        return error_response(exc.status_code, code, message, getattr(exc, "headers", None))

    async def _unavailable(request: Request, exc: Exception):  # the store or the bucket does not answer
        log.warning("%s %s: backend unavailable: %s", request.method, request.url.path, exc)
        if "full" in str(exc).lower():  # SQLite: "database or disk is full"
            return _storage_full(exc)
        return error_response(503, "unavailable", f"the service's job store or artifact store does not answer "
                                                  f"({type(exc).__name__}): retry in a moment (submit with an "
                                                  "Idempotency-Key to make retries safe)",
                              headers={"Retry-After": "5"})

    for kind in _unavailable_errors():
        app.add_exception_handler(kind, _unavailable)

    @app.exception_handler(OSError)
    async def _storage(request: Request, exc: OSError):
        """The data dir full (507) or not writable (503), both worth retrying once an operator acts;
        any other OSError is a bug like any other exception."""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            log.warning("%s %s: storage full: %s", request.method, request.url.path, exc)
            return _storage_full(exc)
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            log.warning("%s %s: storage not writable: %s", request.method, request.url.path, exc)
            return error_response(503, "storage_unavailable",
                                  "the service cannot write its data dir (read-only or no permission): retry "
                                  "once the operator has fixed it (submit with an Idempotency-Key)",
                                  headers={"Retry-After": "30"})
        return await _unexpected(request, exc)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):  # a bug: answer plainly, stay up
        # one line here; the traceback is logged once, by the server (Starlette re-raises it after this answer)
        log.error("unhandled error on %s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        return error_response(500, "internal_error", f"the service failed unexpectedly ({type(exc).__name__}); "
                                                     "this is a bug: please report it with the service log")
