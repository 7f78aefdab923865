"""What the API sends back (one schema per direction); requests are multipart forms, see routers/merges.py."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from onnxzip.options import MergeOptions

from .artifacts import MEDIA_TYPES
from .store import Event, Job

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]

_JOB_EXAMPLE = {
    "id": "3f2c0d7e9b1a4c5d8e6f7a8b9c0d1e2f",
    "status": "succeeded",
    "stage": "done",
    "progress": 1.0,
    "message": "merged",
    "created_at": "2026-01-05T10:00:00Z",
    "started_at": "2026-01-05T10:00:00.2Z",
    "finished_at": "2026-01-05T10:00:01.4Z",
    "attempts": 1,
    "max_attempts": 3,
    "worker_pid": 4242,
    "cancel_requested": False,
    "inputs": [
        {"role": "model", "name": "a.onnx", "size": 203139, "sha256": "9d4e...c1"},
        {"role": "model", "name": "b.onnx", "size": 200715, "sha256": "0b7a...52"},
        {"role": "calibration", "name": "calib.npz", "size": 19692, "sha256": "77f0...3e"},
    ],
    "options": {"share": 1.0, "tasks": ["digit", "mod4"]},
    "error": None,
    "artifacts": [
        {"name": "merged.onnx", "size": 103021, "sha256": "5be1...aa",
         "url": "/v1/merges/3f2c0d7e9b1a4c5d8e6f7a8b9c0d1e2f/artifacts/merged.onnx"},
    ],
}


def _time(t: Optional[float]) -> Optional[datetime]:
    return datetime.fromtimestamp(t, tz=timezone.utc) if t is not None else None


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable, for machines: invalid_model, invalid_calibration, invalid_options, "
                                  "cannot_align, too_large, not_found, timeout, cancelled, ...")
    message: str = Field(description="For people: what is wrong and what to do about it.")


class ErrorBody(BaseModel):
    """The body of every 4xx/5xx answer."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"error": {
        "code": "invalid_calibration",
        "message": "'calib.npz' has no array for model input(s) 'input'; it holds 'x'. Save one array per "
                   "input, keyed by input name: np.savez(path, **{'input': ...})"}}]})

    error: ErrorDetail


class InputPublic(BaseModel):
    role: Literal["model", "calibration"]
    name: str = Field(description="The file name the client sent (metadata only; stored under a server name).")
    size: int
    sha256: str


class ArtifactPublic(BaseModel):
    name: str = Field(description="merged.onnx, report.json or report.html")
    size: int
    sha256: str = Field(description="Also the artifact's ETag.")
    media_type: str
    url: str


class TaskFidelity(BaseModel):
    """One task's fidelity on the held-out calibration samples, with one-sided bounds at `confidence`."""

    samples: int
    measured: bool = Field(description="False below the minimum sample count: the figures are then null.")
    confidence: float
    top1_agreement: Optional[float] = None
    top1_agreement_lower: Optional[float] = None
    rel_err: Optional[float] = None
    rel_err_upper: Optional[float] = None


class MergeResult(BaseModel):
    """What a finished merge reported (report.json holds the rest): present on a succeeded job and on one that
    failed its fidelity gate (fidelity_not_met)."""

    warnings: list[str] = Field(description="One line each: too little calibration data, a merge that shares "
                                            "much less than asked, graph parts not read, ...")
    fidelity: dict[str, TaskFidelity] = Field(description="Per task.")
    shared_neurons: int
    param_ratio: Optional[float] = None
    macs_ratio: Optional[float] = None
    size_ratio: Optional[float] = None
    shared_macs_fraction: float = Field(description="Fraction of the originals' multiply-adds computed once.")
    plan: Optional[str] = Field(None, description="The plan a budget (max_drop, max_rel_err) chose, e.g. 'k=3'.")
    distilled: Optional[str] = Field(None, description="With distill: which weights were kept, 'distilled' or "
                                                       "'closed-form' (distillation did not improve the held-out fidelity).")

    @classmethod
    def of_report(cls, report: dict) -> "MergeResult":
        totals = report["totals"]
        keys = TaskFidelity.model_fields
        return cls(warnings=report.get("warnings", []),
                   fidelity={t: {k: v for k, v in f.items() if k in keys} for t, f in (report.get("fidelity") or {}).items()},
                   shared_neurons=totals["shared_neurons"], param_ratio=totals["param_ratio"],
                   macs_ratio=totals["macs_ratio"], size_ratio=totals["size_ratio"],
                   shared_macs_fraction=totals["shared_macs_fraction"],
                   plan=(report.get("plan") or {}).get("chosen"),
                   distilled=(report.get("distill") or {}).get("kept"))


class WebhookPublic(BaseModel):
    """Delivery of a job's completion webhook."""

    url: str
    state: Literal["pending", "delivered", "failed"] = Field(description="pending until delivered (a 2xx) or "
                                                                         "failed after the last retry.")
    attempts: int
    last_error: Optional[str] = None
    delivered_at: Optional[datetime] = None


class JobPublic(BaseModel):
    """A merge job as clients see it."""

    model_config = ConfigDict(json_schema_extra={"examples": [_JOB_EXAMPLE]})

    id: str
    status: JobStatus
    stage: Optional[str] = Field(description="queued, starting, load, canonicalize, merge, emit, report, "
                                             "artifacts, done (a failed job keeps the stage it failed in)")
    progress: float = Field(ge=0.0, le=1.0, description="Fraction of the whole job done.")
    message: str
    created_at: datetime
    started_at: Optional[datetime] = Field(description="Start of the latest attempt.")
    finished_at: Optional[datetime]
    attempts: int = Field(description="Attempts started; a worker that dies under a job costs one.")
    max_attempts: int
    worker_pid: Optional[int] = Field(description="Process id of the worker that runs (or ran) the latest attempt.")
    cancel_requested: bool
    inputs: list[InputPublic]
    options: MergeOptions
    error: Optional[ErrorDetail] = None
    result: Optional[MergeResult] = Field(None, description="The merge's warnings, fidelity with bounds and savings, "
                                                            "once it has finished (also when its gate failed).")
    artifacts: list[ArtifactPublic] = Field(description="merged.onnx, report.json and report.html once the job has "
                                                        "succeeded; only the reports when its fidelity gate failed.")
    metadata: dict[str, str] = Field(default_factory=dict, description="The tags the job was submitted with.")
    webhook: Optional[WebhookPublic] = Field(None, description="Only when the job named a webhook_url.")
    eta_s: Optional[float] = Field(None, description="Seconds until a running job finishes, estimated from the "
                                                     "rate of its progress so far; null while queued, in the first "
                                                     "seconds of a run, and once finished.")

    @classmethod
    def of(cls, job: Job) -> "JobPublic":
        return cls(
            id=job.id, status=job.status, stage=job.stage, progress=round(job.progress, 4), message=job.message,
            created_at=_time(job.created_at), started_at=_time(job.started_at), finished_at=_time(job.finished_at),
            attempts=job.attempts, max_attempts=job.max_attempts, worker_pid=job.worker_pid,
            cancel_requested=job.cancel_requested_at is not None,
            inputs=[InputPublic(**{k: i[k] for k in ("role", "name", "size", "sha256")}) for i in job.inputs],
            options=MergeOptions.model_construct(**job.options),  # as stored, even if the schema moved on
            error=ErrorDetail(code=job.error_code, message=job.error_message or "") if job.error_code else None,
            result=MergeResult(**job.result) if job.result else None,
            artifacts=[ArtifactPublic(**a, media_type=MEDIA_TYPES[a["name"]],
                                      url=f"/v1/merges/{job.id}/artifacts/{a['name']}") for a in job.artifacts],
            metadata=job.metadata, eta_s=eta_seconds(job),
            webhook=WebhookPublic(url=job.webhook["url"], state=job.webhook["state"], attempts=job.webhook["attempts"],
                                  last_error=job.webhook.get("last_error"),
                                  delivered_at=_time(job.webhook.get("delivered_at"))) if job.webhook else None)


ETA_MIN_PROGRESS, ETA_MIN_ELAPSED_S = 0.05, 2.0


def eta_seconds(job: Job, now: Optional[float] = None) -> Optional[float]:
    """Time left at the rate the job has progressed since its attempt started; None until the rate says
    something (a twentieth done and two seconds run)."""
    if job.status != "running" or job.started_at is None:
        return None
    elapsed = (now or time.time()) - job.started_at
    if job.progress < ETA_MIN_PROGRESS or elapsed < ETA_MIN_ELAPSED_S:
        return None
    return round(elapsed * (1.0 - job.progress) / job.progress, 1)


class JobList(BaseModel):
    """One page of jobs, newest first."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"items": [_JOB_EXAMPLE], "next_cursor": "NDI"}]})

    items: list[JobPublic]
    next_cursor: Optional[str] = Field(description="Pass as ?cursor= for the next page; null on the last page.")


class EventPublic(BaseModel):
    """One step of a job's history. `id` increases; resume with ?after=ID or Last-Event-ID."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": 17, "at": "2026-01-05T10:00:00.9Z", "type": "progress", "status": "running", "stage": "merge",
        "progress": 0.62, "message": "layer 2/3: pairing and merging"}]})

    id: int
    at: datetime
    type: Literal["status", "progress", "cancel_requested", "requeued"]
    status: JobStatus
    stage: Optional[str]
    progress: float
    message: str

    @classmethod
    def of(cls, event: Event) -> "EventPublic":
        return cls(id=event.id, at=_time(event.at), type=event.type, status=event.status, stage=event.stage,
                   progress=round(event.progress, 4), message=event.message)


class DeleteResult(BaseModel):
    """The answer to deleting a running job (a finished or queued one answers 204 with no body)."""

    id: str
    deleted: bool
    cancelled_run: bool = Field(description="True: the job was running and its merge was cancelled first.")
    message: str


class FilePublic(BaseModel):
    """An input uploaded once with POST /v1/files and named by id in merges (model_ids, calibration_id)."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "9d4e1f0c" + "0" * 56, "purpose": "model", "name": "a.onnx", "size": 203139,
        "sha256": "9d4e1f0c" + "0" * 56, "created_at": "2026-01-05T10:00:00Z"}]})

    id: str = Field(description="The sha256 of the bytes: the same file uploaded twice is stored once.")
    purpose: Literal["model", "calibration"]
    name: str = Field(description="The file name of the first upload (metadata only).")
    size: int
    sha256: str
    created_at: datetime

    @classmethod
    def of(cls, stored) -> "FilePublic":
        return cls(id=stored.id, purpose=stored.purpose, name=stored.name, size=stored.size, sha256=stored.sha256,
                   created_at=_time(stored.created_at))


class FileList(BaseModel):
    items: list[FilePublic]


class LayerReport(BaseModel):
    """One aligned layer of the merge (report.json `layers`)."""

    model_config = ConfigDict(extra="allow")

    position: int
    names: dict[str, str] = Field(description="The layer's node name in each task's model.")
    kind: str
    op: str
    widths: dict[str, int]
    shared: int = Field(description="Neurons computed once for all tasks.")
    not_shared_because: Optional[str] = None


class Report(BaseModel):
    """report.json: everything a merge measured. Sections not listed here are kept as they are."""

    model_config = ConfigDict(extra="allow")

    onnxzip: str = Field(description="The version that merged.")
    tasks: list[str]
    models: dict[str, dict] = Field(description="Per task: opset, IR version, layer count, outputs.")
    options: dict = Field(description="Every merge option as used (MergeOptions, defaults filled in).")
    alignment: dict
    calibration: dict = Field(description="Fit and held-out sample counts, the widest layer's rows and unknowns.")
    layers: list[LayerReport]
    totals: dict = Field(description="Parameters, multiply-adds and bytes before and after, and their ratios.")
    fidelity: dict[str, dict] = Field(description="Per task: agreement and relative error on held-out samples, "
                                                  "with one-sided bounds.")
    evaluation: Optional[dict[str, dict]] = Field(None, description="The same on a labelled evaluation set, if given.")
    tensorrt: dict = Field(description="Whether TensorRT 8.5 / 8.6 / 10 can read the merged model.")
    warnings: list[str]
    seconds: float
    plan: Optional[dict] = Field(None, description="The plans a budget searched and the one chosen.")
    distill: Optional[dict] = Field(None, description="Distillation: steps, losses, and which weights were kept.")


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    """Readiness: the store takes writes, the artifact store answers, the workers are alive, onnxruntime loads."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "ready": True, "checks": {"store": "ok (redis)", "queue": "rq queue 'onnxzip': 3 worker(s) registered",
                                  "artifacts": "ok (s3://merges/onnxzip/)", "workers": "0 of 0 alive",
                                  "providers": "CPUExecutionProvider"}}]})

    ready: bool
    checks: dict[str, str]


class Info(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "versions": {"onnxzip": "0.1.0", "onnx": "1.21.0", "onnxruntime": "1.31.1", "python": "3.11.9"},
        "providers": ["CPUExecutionProvider"],
        "available_providers": ["CUDAExecutionProvider", "CPUExecutionProvider"], "cuda_usable": False,
        "opsets": {"emitted": "the inputs' opset, kept", "accepted": [11, 23]},
        "limits": {"max_upload_bytes": 2147483648}, "workers": 2,
        "worker_threads": {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
        "backend": {"store": {"kind": "redis", "namespace": "onnxzip", "queue": "rq", "queue_name": "onnxzip",
                              "redis": "redis://redis:6379/0", "answers": True},
                    "artifacts": {"kind": "s3", "bucket": "merges", "prefix": "onnxzip/",
                                  "endpoint": "http://minio:9000", "region": "us-east-1", "answers": True}}}]})

    versions: dict[str, str]
    providers: list[str] = Field(description="The onnxruntime execution providers merges run on.")
    available_providers: list[str] = Field(description="What this onnxruntime build offers (CUDA needs its "
                                                      "libraries and a GPU to be usable).")
    cuda_usable: bool
    opsets: dict
    limits: dict[str, Union[int, float]]
    workers: int
    worker_threads: dict[str, str] = Field(description="Thread variables the worker processes run with "
                                                      "(merged weights can differ in the last bits with them).")
    backend: dict[str, dict] = Field(description="The job store (sqlite, or redis with the rq queue) and the "
                                                 "artifact store (local disk or s3), and whether each answers now.")
