"""Liveness, readiness and what this service runs: /healthz, /readyz, /v1/info."""

from __future__ import annotations

import platform

import onnx
from anyio import to_thread
from fastapi import APIRouter
from fastapi.responses import JSONResponse

import onnxzip
from onnxzip.load import MAX_OPSET, MIN_OPSET

from ..deps import PoolDep, SettingsDep, StoreDep
from ..schemas import Health, Info, Ready

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="Liveness (never needs a token)")
def healthz() -> Health:
    return Health()


@router.get("/readyz", response_model=Ready, responses={503: {"model": Ready}},
            summary="Readiness: store writable, workers alive, onnxruntime providers")
async def readyz(store: StoreDep, pool: PoolDep, settings: SettingsDep):
    checks, ready = {}, True
    try:
        await to_thread.run_sync(store.check_writable)
        checks["store"] = "ok"
    except Exception as err:
        checks["store"], ready = f"not writable: {err}", False
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


@router.get("/v1/info", response_model=Info, summary="Versions, execution providers, opsets, limits")
async def info(settings: SettingsDep, pool: PoolDep) -> Info:
    runtime = await to_thread.run_sync(_runtime)
    return Info(
        versions={"onnxzip": onnxzip.__version__, "onnx": onnx.__version__, "onnxruntime": runtime["onnxruntime"],
                  "python": platform.python_version()},
        providers=runtime["providers"], available_providers=runtime["available_providers"],
        cuda_usable=runtime["cuda_usable"],
        opsets={"emitted": "the inputs' opset, kept", "accepted": [MIN_OPSET, MAX_OPSET],
                "on_request": "options.target_opset converts the merged model (checked to compute the same outputs)"},
        limits={"max_upload_bytes": settings.max_upload_bytes, "max_model_bytes": settings.max_model_bytes,
                "max_calibration_bytes": settings.max_calibration_bytes, "job_timeout_s": settings.job_timeout_s},
        workers=pool.count, worker_threads=pool.thread_settings())


def _runtime() -> dict:
    """onnxruntime as the workers see it (imported here once, in a thread: it takes a moment)."""
    from onnxzip.runtime import default_providers, runtime_info

    return {**runtime_info(), "providers": default_providers()}
