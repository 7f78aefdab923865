"""What a submission must pass before it becomes a job: size limits, then the engine's own checks.

Sizes are enforced three times: the request's Content-Length and its streamed bytes (`BodyLimit`,
before anything is parsed), then each file as it is copied into the job's folder. Models are parsed
and checked (external data refused), and the calibration is read as the engine reads it (headers
first: no pickles, declared sizes against zip bombs; then names, shapes, dtypes, NaNs), so a bad job
is refused at submit time with the engine's message, not accepted and failed later.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from onnxzip.errors import InvalidOptionsError, OnnxZipError
from onnxzip.load import input_specs, load_calibration, load_model
from onnxzip.options import MergeOptions, parse_options

from .artifacts import copy_hashed
from .errors import ApiError, error_response
from .settings import Settings

# Submit-time checks hold a model and the calibration in memory: at most this many at once.
VALIDATING = threading.BoundedSemaphore(2)


class UploadTooLarge(HTTPException):
    """Raised from `receive` once the body passes the limit; FastAPI passes HTTPExceptions through."""

    def __init__(self, limit: int):
        super().__init__(413, _too_large_message(limit))


def _too_large_message(limit: int) -> str:
    return (f"the request is larger than this service's limit of {limit} bytes (ONNXZIP_MAX_UPLOAD_BYTES): "
            "send fewer calibration samples or smaller models")


class BodyLimit:
    """ASGI wrapper: refuse a declared Content-Length over the limit at once, and count the bytes
    of every body as they stream in, answering 413 as soon as the count passes the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = error_response(413, "too_large", _too_large_message(self.max_bytes),
                                      headers={"Connection": "close"})
            return await response(scope, receive, send)
        seen, started = 0, False

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise UploadTooLarge(self.max_bytes)
            return message

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except UploadTooLarge as exc:  # raised where no handler turned it into a response
            if started:
                raise
            await error_response(413, "too_large", exc.detail)(scope, receive, send)


@dataclass
class StoredInput:
    role: str  # model | calibration
    name: str  # the client's file name, metadata only
    stored: str  # the server-chosen file name in inputs/
    size: int
    sha256: str

    def public(self) -> dict:
        return {"role": self.role, "name": self.name, "stored": self.stored, "size": self.size,
                "sha256": self.sha256}


def parse_options_field(text: Optional[str]) -> MergeOptions:
    """The `options` form field: a JSON object validated by MergeOptions (InvalidOptionsError if not)."""
    if text is None or not text.strip():
        return MergeOptions()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise InvalidOptionsError(
            f"options is not valid JSON ({err.msg} at line {err.lineno} column {err.colno}): send a JSON "
            'object such as {"share": 1.0, "tasks": ["a", "b"]}') from err
    except RecursionError as err:  # json's parser recurses once per nesting level
        raise InvalidOptionsError(
            'options nest too deeply to be merge options: send a flat JSON object such as {"share": 1.0}') from err
    if not isinstance(data, dict):
        raise InvalidOptionsError(
            f'options must be a JSON object such as {{"share": 1.0}}, not {type(data).__name__}')
    return parse_options(data)


def client_name(filename: Optional[str], default: str) -> str:
    """The client's file name for messages and metadata: printable, at most 200 characters."""
    name = re.sub(r"[\x00-\x1f\x7f]", "", filename or "").strip()
    return name[:200] or default


def gather_inputs(models: Optional[list], model_ids: Optional[list[str]], calibration, calibration_id: Optional[str],
                  staging: Path, settings: Settings, files) -> list[StoredInput]:
    """A job's inputs in `staging` under server-chosen names (model-0.onnx, ..., calibration.npz): each
    uploaded file copied there (hashed, size-checked), each file named by id linked there from `files`."""
    inputs = [_stage_file(files, "model", f"model-{i}.onnx", file_id, f"model_ids[{i}]", staging)
              for i, file_id in enumerate(model_ids)] if model_ids else [
        _save_upload(upload, "model", f"model-{i}.onnx", staging, settings.max_model_bytes, "ONNXZIP_MAX_MODEL_BYTES")
        for i, upload in enumerate(models)]
    inputs.append(_stage_file(files, "calibration", "calibration.npz", calibration_id, "calibration_id", staging)
                  if calibration_id else
                  _save_upload(calibration, "calibration", "calibration.npz", staging, settings.max_calibration_bytes,
                               "ONNXZIP_MAX_CALIBRATION_BYTES"))
    return inputs


def _save_upload(upload, role: str, server_name: str, staging: Path, limit: int, env: str) -> StoredInput:
    name = client_name(upload.filename, server_name)
    upload.file.seek(0)
    try:
        size, digest = copy_hashed(upload.file, staging / server_name, limit)
    except OverflowError as err:
        raise too_large(role, name, limit, env) from err
    return StoredInput(role, name, server_name, size, digest)


def _stage_file(files, role: str, server_name: str, file_id: str, field: str, staging: Path) -> StoredInput:
    found = files.require(file_id, role, field)
    files.copy_to(file_id, staging / server_name)
    return StoredInput(role, found.name, server_name, found.size, found.sha256)


def too_large(role: str, name: str, limit: int, env: str) -> ApiError:
    return ApiError(413, "too_large", f"{role} '{name}' is larger than this service's limit of {limit} bytes "
                                      f"({env}); " + ("send a smaller model" if role == "model" else
                                                      "send fewer samples"))


MAX_METADATA_KEYS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512
METADATA_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,%d}$" % MAX_METADATA_KEY)  # also safe inside a SQLite JSON path


def parse_metadata_field(text: Optional[str]) -> dict[str, str]:
    """The `metadata` form field: a flat JSON object of short strings, to tag and filter jobs."""
    if text is None or not text.strip():
        return {}
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        raise InvalidOptionsError('metadata is not a flat JSON object: send e.g. {"experiment": "sweep-3"}') from err
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise InvalidOptionsError('metadata must be a JSON object of strings, e.g. {"experiment": "sweep-3", '
                                  '"share": "0.5"}')
    if len(data) > MAX_METADATA_KEYS:
        raise InvalidOptionsError(f"metadata has {len(data)} keys; at most {MAX_METADATA_KEYS}")
    for key, value in data.items():
        if not METADATA_KEY.match(key):
            raise InvalidOptionsError(f"metadata key '{key[:80]}': 1 to {MAX_METADATA_KEY} letters, digits, "
                                      "'_', '.' or '-'")
        if len(value) > MAX_METADATA_VALUE:
            raise InvalidOptionsError(f"metadata '{key}': values are at most {MAX_METADATA_VALUE} characters")
    return data


def payload_hash(inputs: list[StoredInput], options: MergeOptions, metadata: dict[str, str]) -> str:
    """Identity of a submission for Idempotency-Key: every file's bytes, in order, the options and metadata
    (a file sent by id and the same file uploaded are the same submission)."""
    digest = hashlib.sha256()
    for item in inputs:
        digest.update(f"{item.role}:{item.sha256}\n".encode())
    digest.update(json.dumps(options.model_dump(mode="json"), sort_keys=True).encode())
    if metadata:  # absent from the hash when empty: keys issued before metadata existed still match
        digest.update(json.dumps(metadata, sort_keys=True).encode())
    return digest.hexdigest()


def check_inputs(inputs: list[StoredInput], staging: Path, settings: Settings) -> None:
    """The engine's checks on the stored files; raises OnnxZipError naming the client's file."""
    models = [i for i in inputs if i.role == "model"]
    calibration = next(i for i in inputs if i.role == "calibration")
    with VALIDATING:
        specs = {}
        for item in models:
            with _named(item):
                model = load_model(str(staging / item.stored), allow_external_data=False)
            for spec in input_specs(model):
                specs.setdefault(spec.name, spec)  # conflicting inputs are the engine's to report
            del model
        with _named(calibration):
            load_calibration(str(staging / calibration.stored), list(specs.values()),
                             max_bytes=settings.max_calibration_bytes)


class _named:
    """Re-raise the engine's errors with the client's file name in place of the server-chosen one."""

    def __init__(self, item: StoredInput):
        self.item = item

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if isinstance(err, OnnxZipError):
            message = rename(str(err), {self.item.stored: self.item.name})
            raise type(err)(message) from err
        return False


def rename(message: str, names: dict[str, str]) -> str:
    """Replace server-chosen file names ('model-0.onnx') in an engine message by the client's."""
    for stored, name in names.items():
        message = message.replace(f"'{stored}'", f"'{name}'")
    return " ".join(message.split())
