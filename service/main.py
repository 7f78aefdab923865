"""The app: `create_app()` wires settings, store, artifacts, worker pool and routers; `serve()` runs it."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Optional

import uvicorn
from anyio import to_thread
from fastapi import FastAPI

import onnxzip

from . import errors
from .artifacts import open_artifacts
from .auth import BearerAuth
from .routers import health, merges
from .settings import Settings, load_settings
from .store import open_store
from .uploads import BodyLimit
from .workers import WorkerPool

DESCRIPTION = ("Merge two trained ONNX models into one multi-output model, as asynchronous jobs: submit, poll "
               "(or follow the events), download `merged.onnx` and the reports. Errors are always "
               '`{"error": {"code", "message"}}`.')


def create_app(settings: Optional[Settings] = None) -> FastAPI:
    settings = settings or Settings()
    store = open_store(settings)
    artifacts = open_artifacts(settings)
    pool = WorkerPool(settings, store, artifacts)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await to_thread.run_sync(pool.start)
        yield
        await to_thread.run_sync(pool.stop)

    app = FastAPI(title="onnxzip", version=onnxzip.__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.settings, app.state.store, app.state.artifacts, app.state.pool = settings, store, artifacts, pool
    errors.install(app)
    app.include_router(health.router)
    app.include_router(merges.router)
    app.add_middleware(BodyLimit, max_bytes=settings.max_upload_bytes)
    if settings.api_token is not None:
        app.add_middleware(BearerAuth, token=settings.api_token.get_secret_value())  # outermost: before the body
    return app


def serve(host: Optional[str] = None, port: Optional[int] = None, data_dir: Optional[str] = None) -> None:
    """`onnxzip serve`: flags override ONNXZIP_* environment variables, which override the defaults."""
    overrides = {k: v for k, v in {"host": host, "port": port, "data_dir": data_dir}.items() if v is not None}
    settings = load_settings(**overrides)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info",
                timeout_graceful_shutdown=10)
