"""Liveness, readiness and what this service runs: /healthz, /readyz, /v1/info."""

from __future__ import annotations

import platform

import onnx
from anyio import to_thread
from fastapi import APIRouter
from fastapi.responses import JSONResponse

import onnxzip
from onnxzip.load import MAX_OPSET, MIN_OPSET

from ..deps import ArtifactsDep, PoolDep, SettingsDep, StoreDep
from ..schemas import Health, Info, Ready

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="Liveness (never needs a token)")
def healthz() -> Health:
    return Health()


@router.get("/readyz", response_model=Ready, responses={503: {"model": Ready}},
            summary="Readiness: store writable (SQLite or Redis), artifact store answering (disk or S3), "
                    "workers alive, onnxruntime providers")
async def readyz(store: StoreDep, artifacts: ArtifactsDep, pool: PoolDep, settings: SettingsDep):
    checks, ready = {}, True
    kind = store.describe()["kind"]
    try:
        await to_thread.run_sync(store.check_writable)
        checks["store"] = "ok" if kind == "sqlite" else f"ok ({kind})"
    except Exception as err:
        checks["store"], ready = f"{kind} not writable: {_one_line(err)}", False
    if getattr(store, "dispatcher", None) is not None and checks["store"].startswith("ok"):
        try:
            count = await to_thread.run_sync(store.dispatcher.workers)
            checks["queue"] = f"rq queue '{settings.queue_name}': {count} worker(s) registered"
        except Exception as err:
            checks["queue"], ready = f"rq does not answer: {_one_line(err)}", False
    try:
        checks["artifacts"] = await to_thread.run_sync(artifacts.check)
    except Exception as err:
        checks["artifacts"], ready = f"{artifacts.describe()['kind']} does not answer: {_one_line(err)}", False
    alive = pool.alive()
    checks["workers"] = (f"{alive} of {pool.count} alive" if pool.count
                         else "none in this process (ONNXZIP_WORKERS=0): jobs wait for `onnxzip worker`")
    ready = ready and alive == pool.count
    try:
        runtime = await to_thread.run_sync(_runtime)
        checks["providers"] = ", ".join(runtime["providers"])
    except Exception as err:
        checks["providers"], ready = f"onnxruntime does not load: {err}", False
    body = Ready(ready=ready, checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get("/v1/info", response_model=Info,
            summary="Versions, execution providers, opsets, limits, the job store, queue and artifact store")
async def info(settings: SettingsDep, pool: PoolDep, store: StoreDep, artifacts: ArtifactsDep) -> Info:
    runtime = await to_thread.run_sync(_runtime)
    backend = {"store": store.describe(), "artifacts": artifacts.describe()}
    for name, probe in (("store", store.check_writable), ("artifacts", artifacts.check)):
        try:
            await to_thread.run_sync(probe)
            backend[name]["answers"] = True
        except Exception as err:
            backend[name]["answers"], backend[name]["error"] = False, _one_line(err)
    return Info(
        versions={"onnxzip": onnxzip.__version__, "onnx": onnx.__version__, "onnxruntime": runtime["onnxruntime"],
                  "python": platform.python_version()},
        providers=runtime["providers"], available_providers=runtime["available_providers"],
        cuda_usable=runtime["cuda_usable"],
        opsets={"emitted": "the inputs' opset, kept", "accepted": [MIN_OPSET, MAX_OPSET],
                "on_request": "options.target_opset converts the merged model (checked to compute the same outputs)"},
        limits={"max_upload_bytes": settings.max_upload_bytes, "max_model_bytes": settings.max_model_bytes,
                "max_calibration_bytes": settings.max_calibration_bytes, "job_timeout_s": settings.job_timeout_s},
        workers=pool.count, worker_threads=pool.thread_settings(), backend=backend)


def _one_line(err: Exception) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())[:300]


def _runtime() -> dict:
    """onnxruntime as the workers see it (imported here once, in a thread: it takes a moment)."""
    from onnxzip.runtime import default_providers, runtime_info

    return {**runtime_info(), "providers": default_providers()}
