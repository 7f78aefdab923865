"""What the routers share: the multipart check and the OpenAPI description of error answers."""

from __future__ import annotations

from fastapi import Request

from ..errors import ApiError
from ..schemas import ErrorBody

_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before trying again.", "schema": {"type": "integer"}}}
_ERROR_MEANINGS = {
    401: ("No bearer token, or not this service's (only when ONNXZIP_API_TOKEN is set).", None),
    404: ("No such job (or artifact): never created, deleted, or expired.", None),
    409: ("The job is in the wrong state for this (e.g. finished, or not finished yet).", None),
    413: ("The request or one of its files is larger than the service's limits.", None),
    415: ("The body is not multipart/form-data.", None),
    422: ("A field is missing or invalid, or a model or calibration file fails the engine's checks; the "
          "message names it.", None),
    503: ("The job store or artifact store does not answer, or cannot be written: retry after Retry-After.",
          _RETRY_AFTER),
    507: ("The service's storage is full: retry after Retry-After.", _RETRY_AFTER),
}


def error_responses(*codes: int) -> dict:
    """OpenAPI responses for the error codes an operation can answer; 401 and 503 apply to every one."""
    out = {}
    for code in sorted({401, 503, *codes}):
        description, headers = _ERROR_MEANINGS[code]
        out[code] = {"model": ErrorBody, "description": description, **({"headers": headers} if headers else {})}
    return out


def require_multipart(request: Request) -> None:
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise ApiError(415, "unsupported_media_type",
                       f"send multipart/form-data (got '{content_type or 'no content type'}'), as curl -F does: "
                       "for a merge the fields models (two or more .onnx files), calibration (one .npz) and "
                       "options (optional JSON), e.g. -F models=@a.onnx -F models=@b.onnx -F calibration=@calib.npz")
