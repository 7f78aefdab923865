"""The app: `create_app()` wires settings, store, artifacts, worker pool and routers; `serve()` runs it."""

from __future__ import annotations

import logging
import tempfile
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Optional

import uvicorn
from anyio import to_thread
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

import onnxzip

from . import errors, openapi
from .artifacts import open_artifacts
from .auth import LOOPBACK_HOSTS, BearerAuth, HostAndOrigin
from .files import FileStore
from .routers import files, health, merges
from .schemas import JobPublic
from .settings import Settings, load_settings
from .store import open_store
from .slowclients import protocol_with_read_timeout
from .uploads import BodyLimit
from .webhooks import WebhookSender
from .workers import WorkerPool

DESCRIPTION = ("Merge two trained ONNX models into one multi-output model, as asynchronous jobs: submit, poll "
               "(or follow the events), download `merged.onnx` and the reports. Errors are always "
               '`{"error": {"code", "message"}}`.')


def create_app(settings: Optional[Settings] = None) -> FastAPI:
    settings = settings or Settings()
    store = open_store(settings)
    artifacts = open_artifacts(settings)
    pool = WorkerPool(settings, store, artifacts)
    sender = (WebhookSender(store, settings.webhook_secret.get_secret_value(), settings.webhook_attempts,
                            settings.webhook_backoff_s, _webhook_body) if settings.webhook_secret else None)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await to_thread.run_sync(pool.start)
        if sender is not None:
            sender.start()
        yield
        if sender is not None:
            await to_thread.run_sync(sender.stop)
        await to_thread.run_sync(pool.stop)

    # operationIds are the handlers' names (create_merge, get_artifact, ...): what generated clients call
    app = FastAPI(title="onnxzip", version=onnxzip.__version__, description=DESCRIPTION, lifespan=lifespan,
                  generate_unique_id_function=lambda route: route.name)
    app.state.settings, app.state.store, app.state.artifacts, app.state.pool = settings, store, artifacts, pool
    app.state.files = FileStore(settings.data_dir)
    errors.install(app)
    app.include_router(health.router)
    app.include_router(files.router)
    app.include_router(merges.router)
    openapi.install(app, token_required=settings.api_token is not None)
    app.add_middleware(BodyLimit, max_bytes=settings.max_upload_bytes)
    if settings.api_token is not None:
        app.add_middleware(BearerAuth, token=settings.api_token.get_secret_value())  # before the body
    if settings.cors_origins:  # outside the token check: a browser's preflight carries no token
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["Location", "ETag", "Retry-After"])
    app.add_middleware(HostAndOrigin, allowed_hosts=settings.allowed_hosts, cors_origins=settings.cors_origins)
    return app


def _webhook_body(job) -> dict:
    return {"type": "merge.finished", "job": JobPublic.of(job).model_dump(mode="json")}


def _spool_uploads_in(data_dir: Path) -> None:
    """Multipart uploads spool to tempfile's directory: the data dir's own, not the system /tmp (one
    volume to size, and an upload never needs twice its size across two disks)."""
    spool = data_dir / "tmp"
    spool.mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(spool)


def _warn_if_exposed(settings: Settings) -> None:
    if settings.api_token is None and settings.host not in LOOPBACK_HOSTS:
        logging.getLogger("onnxzip.service").warning(
            "listening on %s without ONNXZIP_API_TOKEN: anyone who reaches this address can run merges and "
            "read their results; set a token or listen on 127.0.0.1", settings.host)


def serve(host: Optional[str] = None, port: Optional[int] = None, **store) -> None:
    """`onnxzip serve`: flags override ONNXZIP_* environment variables, which override the defaults.
    `store`: data_dir, workers, queue_url (the flags `onnxzip worker` takes too)."""
    overrides = {k: v for k, v in {"host": host, "port": port, **store}.items() if v is not None}
    settings = load_settings(**overrides)
    _spool_uploads_in(Path(settings.data_dir))
    _warn_if_exposed(settings)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info",
                timeout_graceful_shutdown=10, http=protocol_with_read_timeout(settings.read_timeout_s))
