"""/v1/merges: submit, list, read, cancel, delete merge jobs; their events and artifacts."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import shutil
import time
import uuid
from typing import Annotated, Optional

from anyio import to_thread
from fastapi import APIRouter, Depends, File, Form, Header, Query, Request, Response, UploadFile
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

from onnxzip.errors import InvalidOptionsError

from .. import webhooks
from ..artifacts import MEDIA_TYPES
from ..deps import ArtifactsDep, FilesDep, SettingsDep, StoreDep
from ..errors import FIELD_HELP, ApiError, not_found
from ..schemas import DeleteResult, EventPublic, JobList, JobPublic, JobStatus, Report
from ..store import FAILED, QUEUED, RUNNING, SUCCEEDED, Job
from ..uploads import (MAX_METADATA_KEYS, METADATA_KEY, check_inputs, gather_inputs, parse_metadata_field,
                       parse_options_field, payload_hash)
from .common import error_responses, require_multipart

router = APIRouter(prefix="/v1/merges", tags=["merges"])

SSE_FORMAT = ("Server-sent events: a `retry: 1000` line, then one block per event, `id: <event id>`, "
              "`event: <type>` and `data: <the EventPublic as JSON>`, with `: keep-alive` comments while the job is "
              "quiet; the stream ends after the event that finishes the job.")
SSE_POLL_S = 0.25
SSE_KEEPALIVE_S = 15.0


def _job_or_404(store, job_id: str) -> Job:
    job = store.get(job_id)
    if job is None:
        raise not_found(job_id)
    return job


def _accepted(response: Response, job: Job, replayed: bool = False) -> JobPublic:
    response.status_code = 202
    response.headers["Location"] = f"/v1/merges/{job.id}"
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return JobPublic.of(job)


@router.post("", status_code=202, response_model=JobPublic,
             responses={**error_responses(409, 413, 415, 422, 507), 202: {
                 "description": "Accepted: the job is queued (or, with an Idempotency-Key used before for the same "
                                "request, the job that key made).",
                 "headers": {"Location": {"description": "The job's URL.", "schema": {"type": "string"}},
                             "Idempotent-Replayed": {"description": "'true' when the job is one an earlier request "
                                                                    "with this Idempotency-Key made.",
                                                     "schema": {"type": "string"}}}}},
             dependencies=[Depends(require_multipart)], summary="Submit a merge job",
             description="Multipart fields: the models, either uploaded (`models`, two or more .onnx files, in task "
                         "order) or named by file id (`model_ids`, from POST /v1/files); the calibration, uploaded "
                         "(`calibration`, one .npz) or named (`calibration_id`); `options` (optional JSON, "
                         "MergeOptions), `metadata` (optional JSON object of strings, to tag and filter jobs) and "
                         "`webhook_url` (optional: POSTed the job, signed, once it has finished). "
                         "The inputs are checked before the job is queued; answers 202 with the job and its "
                         "Location. With an Idempotency-Key, the same key and payload return the same job.")
def create_merge(
    response: Response, store: StoreDep, settings: SettingsDep, artifacts: ArtifactsDep, files: FilesDep,
    models: Annotated[Optional[list[UploadFile]], File(description="Two or more .onnx files, in task order "
                                                                   "(or give model_ids).")] = None,
    calibration: Annotated[Optional[UploadFile], File(description="One .npz: an array per model input, samples "
                                                                  "on axis 0 (or give calibration_id).")] = None,
    model_ids: Annotated[Optional[list[str]], Form(description="Ids of models uploaded with POST /v1/files, in "
                                                               "task order (instead of models).")] = None,
    calibration_id: Annotated[Optional[str], Form(description="Id of a calibration uploaded with POST /v1/files "
                                                              "(instead of calibration).")] = None,
    options: Annotated[Optional[str], Form(description='Merge options (MergeOptions), e.g. {"share": 1.0, '
                                                       '"tasks": ["a", "b"]}')] = None,
    metadata: Annotated[Optional[str], Form(description='Tags for the job, e.g. {"experiment": "sweep-3"}: at '
                                                        'most 16 keys of letters, digits, _ . -; string values of at '
                                                        'most 512 characters. Filter the list with '
                                                        '?metadata=key:value.')] = None,
    webhook_url: Annotated[Optional[str], Form(description="Where to POST the job once it has finished (signed; "
                                                           "retried with backoff). Needs ONNXZIP_WEBHOOK_SECRET "
                                                           "on the service.")] = None,
    idempotency_key: Annotated[Optional[str], Header(alias="Idempotency-Key", max_length=200)] = None,
) -> JobPublic:
    merge_options = parse_options_field(options)
    tags = parse_metadata_field(metadata)
    webhook = webhooks.new_state(webhooks.check_url(webhook_url, settings.webhook_secret is not None))
    model_count = _check_sources(models, model_ids, calibration, calibration_id)
    merge_options.task_names(model_count)
    staging = artifacts.new_staging()
    try:
        inputs = gather_inputs(models, model_ids, calibration, calibration_id, staging, settings, files)
        identity = {**tags, **({"webhook_url": webhook["url"]} if webhook else {})}
        digest = payload_hash(inputs, merge_options, identity)
        if idempotency_key is not None and (earlier := store.find_by_key(idempotency_key)) is not None:
            return _replay(response, earlier, digest, idempotency_key)
        check_inputs(inputs, staging, settings)
        job_id = uuid.uuid4().hex
        artifacts.adopt_inputs(staging, job_id)
        job, created = store.create(Job(
            id=job_id, status=QUEUED, created_at=time.time(), options=merge_options.model_dump(mode="json"),
            inputs=[i.public() for i in inputs], max_attempts=settings.max_attempts,
            idempotency_key=idempotency_key, payload_hash=digest, metadata=tags, webhook=webhook))
        if not created:  # a concurrent request with the same key won the race
            artifacts.remove(job_id)
            return _replay(response, job, digest, idempotency_key)
        return _accepted(response, job)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_sources(models, model_ids, calibration, calibration_id) -> int:
    """Models come uploaded or by id (not both), and so does the calibration; returns the model count."""
    if models and model_ids:
        raise InvalidOptionsError("give the models either as files (models) or as file ids (model_ids), not both: "
                                  "the task order would be ambiguous")
    if not models and not model_ids:
        raise ApiError(422, "invalid_request", f"field 'models' is missing: send {FIELD_HELP['models']}, or their "
                                               "ids from POST /v1/files as -F model_ids=ID")
    count = len(models or model_ids)
    if count < 2:
        raise InvalidOptionsError(f"give at least two models to merge, got {count}: repeat the field, "
                                  "-F models=@a.onnx -F models=@b.onnx (or -F model_ids=ID twice)")
    if calibration is not None and calibration_id:
        raise InvalidOptionsError("give the calibration either as a file (calibration) or as a file id "
                                  "(calibration_id), not both")
    if calibration is None and not calibration_id:
        raise ApiError(422, "invalid_request", f"field 'calibration' is missing: send {FIELD_HELP['calibration']}, "
                                               "or its id from POST /v1/files as -F calibration_id=ID")
    return count


def _replay(response: Response, earlier: Job, digest: str, key: str) -> JobPublic:
    if earlier.payload_hash != digest:
        raise ApiError(422, "idempotency_key_reused",
                       f"Idempotency-Key '{key}' was already used for a different request (other files or "
                       f"options; job {earlier.id}): use a new key for a new job")
    return _accepted(response, earlier, replayed=True)


MAX_ID = 2**63 - 1  # ids and sequence numbers are signed 64-bit integers in SQLite and Redis


def _decode_cursor(cursor: Optional[str]) -> Optional[int]:
    if cursor is None:
        return None
    try:
        value = int(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode())
        if not 0 <= value <= MAX_ID:  # a job sequence number is a signed 64-bit SQLite/Redis integer
            raise ValueError(value)
        return value
    except (ValueError, binascii.Error, UnicodeDecodeError) as err:
        raise ApiError(422, "invalid_request", "cursor is not one this service issued: pass next_cursor from "
                                               "the previous page unchanged") from err


@router.get("", response_model=JobList, responses=error_responses(422), summary="List jobs, newest first")
def list_merges(store: StoreDep, limit: Annotated[int, Query(ge=1, le=100)] = 20,
                cursor: Optional[str] = None, status: Optional[JobStatus] = None,
                metadata: Annotated[Optional[list[str]], Query(
                    description="key:value; repeat it to require several tags (all must match).",
                    max_length=MAX_METADATA_KEYS)] = None) -> JobList:
    jobs = store.page(limit + 1, _decode_cursor(cursor), status, _metadata_filter(metadata))
    more = len(jobs) > limit
    jobs = jobs[:limit]
    next_cursor = (base64.urlsafe_b64encode(str(jobs[-1].seq).encode()).decode().rstrip("=")
                   if more else None)
    return JobList(items=[JobPublic.of(j) for j in jobs], next_cursor=next_cursor)


def _metadata_filter(pairs: Optional[list[str]]) -> Optional[dict[str, str]]:
    wanted = {}
    for pair in pairs or []:
        key, sep, value = pair.partition(":")
        if not sep or not METADATA_KEY.match(key):
            raise ApiError(422, "invalid_request", f"metadata filter '{pair[:80]}' is not key:value with a key of "
                                                   "letters, digits, _ . - (e.g. ?metadata=experiment:sweep-3)")
        wanted[key] = value
    return wanted or None


@router.get("/{job_id}", response_model=JobPublic, responses=error_responses(404), summary="A job's state")
def get_merge(job_id: str, store: StoreDep) -> JobPublic:
    return JobPublic.of(_job_or_404(store, job_id))


@router.post("/{job_id}/cancel", response_model=JobPublic, summary="Cancel a job",
             responses={**error_responses(404, 409), 202: {"model": JobPublic, "description": "The job was running: it "
                                                   "stops within the grace period; poll it."}},
             description="A queued job is cancelled at once (200). A running one stops at the next stage "
                         "boundary, or its worker is ended after the grace period (202; poll the job).")
def cancel_merge(job_id: str, store: StoreDep, response: Response) -> JobPublic:
    job = _job_or_404(store, job_id)
    if job.status in (SUCCEEDED, FAILED):
        raise ApiError(409, "job_finished", f"job {job_id} already {job.status}: nothing to cancel "
                                            "(DELETE it to remove it)")
    job = store.request_cancel(job_id) or job
    response.status_code = 202 if job.status == RUNNING else 200
    return JobPublic.of(job)


@router.delete("/{job_id}", status_code=204, summary="Delete a job and its files",
               responses={**error_responses(404), 200: {
                   "model": DeleteResult,
                   "description": "The job was running: its merge was cancelled first (the body says so), then it "
                                  "was deleted."},
                          204: {"description": "Deleted (the job was queued or finished)."}},
               description="A queued or finished job: 204. A running job is cancelled first (it loses its lease "
                           "at once; its worker stops within the grace period), then deleted: 200 with a "
                           "message saying so.")
def delete_merge(job_id: str, store: StoreDep, artifacts: ArtifactsDep, settings: SettingsDep) -> Response:
    job = store.request_cancel(job_id)
    if job is None or store.delete(job_id) is None:
        raise not_found(job_id)
    artifacts.remove(job_id)
    if job.status == RUNNING:
        return JSONResponse({"id": job_id, "deleted": True, "cancelled_run": True,
                             "message": f"the job was running: its merge was cancelled (its worker stops within "
                                        f"{settings.cancel_grace_s:g} s) and the job, its inputs and artifacts "
                                        "were deleted"})
    return Response(status_code=204)


@router.get("/{job_id}/events", response_model=list[EventPublic],
            responses={**error_responses(404, 422), 200: {
                "description": "The events after `after`, oldest first.",
                "content": {"text/event-stream": {"schema": {"type": "string", "description": SSE_FORMAT}}}}},
            summary="A job's events (JSON, or server-sent events)",
            description="JSON list of events after `after`. With `Accept: text/event-stream`, server-sent "
                        "events that resume after `Last-Event-ID` and end once the job has finished.")
async def merge_events(job_id: str, request: Request, store: StoreDep,
                       after: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
                       limit: Annotated[int, Query(ge=1, le=1000)] = 1000,
                       last_event_id: Annotated[Optional[str], Header(alias="Last-Event-ID")] = None):
    await to_thread.run_sync(_job_or_404, store, job_id)
    if "text/event-stream" not in request.headers.get("accept", ""):
        events = await to_thread.run_sync(store.events, job_id, after, limit)
        return [EventPublic.of(e) for e in events]
    if last_event_id is not None and last_event_id.strip().isdigit():
        after = min(int(last_event_id), MAX_ID)  # beyond every id: nothing newer than it, only the end
    return StreamingResponse(_event_stream(request, store, job_id, after), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _event_stream(request: Request, store, job_id: str, after: int):
    yield "retry: 1000\n\n"
    quiet_since = time.monotonic()
    while True:
        events = await to_thread.run_sync(store.events, job_id, after, 500)
        for event in events:
            data = EventPublic.of(event).model_dump(mode="json")
            yield f"id: {event.id}\nevent: {event.type}\ndata: {json.dumps(data)}\n\n"
            after = event.id
        if events:
            quiet_since = time.monotonic()
            continue
        job = await to_thread.run_sync(store.get, job_id)
        if job is None or job.finished:  # every event of a finished job has been sent above
            return
        if await request.is_disconnected():
            return
        if time.monotonic() - quiet_since > SSE_KEEPALIVE_S:
            quiet_since = time.monotonic()
            yield ": keep-alive\n\n"
        await asyncio.sleep(SSE_POLL_S)


_ARTIFACT_HEADERS = {
    "ETag": {"description": "The artifact's sha256, quoted; send it as If-None-Match to get 304.",
             "schema": {"type": "string"}},
    "Content-Length": {"schema": {"type": "integer"}},
    "Accept-Ranges": {"description": "'bytes' where the artifact is on local disk: Range requests answer 206.",
                      "schema": {"type": "string"}},
}
_ARTIFACT_RESPONSES = {
    **error_responses(404, 409),
    200: {"description": "The artifact: merged.onnx (binary), report.json (Report) or report.html.",
          "model": Report, "headers": _ARTIFACT_HEADERS,
          "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                      "text/html": {"schema": {"type": "string"}}}},
    206: {"description": "The requested byte range (local artifact store).",
          "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
    304: {"description": "Not modified: If-None-Match names the current ETag.",
          "headers": {"ETag": _ARTIFACT_HEADERS["ETag"]}},
}
_ARTIFACT_DESCRIPTION = ("ETag is the file's sha256; If-None-Match with it answers 304. The body streams from disk "
                         "(Range requests answer 206) or from the S3 bucket, never whole in memory.")


@router.get("/{job_id}/artifacts/{name}", responses=_ARTIFACT_RESPONSES, response_class=FileResponse,
            summary="Download merged.onnx, report.json or report.html", description=_ARTIFACT_DESCRIPTION)
def get_artifact(job_id: str, name: str, request: Request, store: StoreDep, artifacts: ArtifactsDep,
                 if_none_match: Annotated[Optional[str], Header(alias="If-None-Match")] = None):
    job = _job_or_404(store, job_id)
    if name not in MEDIA_TYPES:
        raise ApiError(404, "not_found", f"no artifact '{name}': a finished job has "
                                         f"{', '.join(MEDIA_TYPES)}")
    if not job.finished:
        raise ApiError(409, "job_not_finished", f"job {job_id} is {job.status}: artifacts exist once it has "
                                                f"finished; poll GET /v1/merges/{job_id}")
    meta = next((a for a in job.artifacts if a["name"] == name), None)
    if meta is None:
        have = ", ".join(a["name"] for a in job.artifacts) or "none"
        raise ApiError(409 if not job.artifacts else 404, "no_artifacts" if not job.artifacts else "not_found",
                       f"job {job_id} {job.status} without '{name}' (its artifacts: {have})"
                       + ("; a job whose fidelity gate failed keeps only its reports" if job.artifacts else ""))
    etag = f'"{meta["sha256"]}"'
    if if_none_match is not None and _etag_matches(if_none_match, meta["sha256"]):
        return Response(status_code=304, headers={"ETag": etag})
    disposition = "attachment" if name.endswith(".onnx") else "inline"
    headers = {"ETag": etag, "Cache-Control": "private, max-age=0, must-revalidate"}
    path = artifacts.local_path(job_id, meta)
    if path is not None and not path.is_file():  # expired or deleted between the record and the file
        raise not_found(job_id)
    if path is not None:
        return FileResponse(path, media_type=MEDIA_TYPES[name], filename=name, content_disposition_type=disposition,
                            headers=headers)
    headers.update({"Content-Length": str(meta["size"]), "Content-Disposition": f'{disposition}; filename="{name}"'})
    if request.method == "HEAD":
        return Response(media_type=MEDIA_TYPES[name], headers=headers)
    try:
        body = artifacts.open(job_id, meta)
    except FileNotFoundError as err:  # expired or deleted between the record and the object
        raise not_found(job_id) from err
    return StreamingResponse(body, media_type=MEDIA_TYPES[name], headers=headers)


@router.head("/{job_id}/artifacts/{name}", responses={**_ARTIFACT_RESPONSES, 200: {
    "description": "The artifact's headers (size, ETag), no body.", "headers": _ARTIFACT_HEADERS}},
              response_class=Response, summary="An artifact's headers only (size and ETag)")
def head_artifact(job_id: str, name: str, request: Request, store: StoreDep, artifacts: ArtifactsDep,
                  if_none_match: Annotated[Optional[str], Header(alias="If-None-Match")] = None):
    return get_artifact(job_id, name, request, store, artifacts, if_none_match)


def _etag_matches(header: str, sha256: str) -> bool:
    tags = [t.strip().removeprefix("W/").strip('"') for t in header.split(",")]
    return "*" in tags or sha256 in tags
