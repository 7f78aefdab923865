"""Dependencies as annotated aliases: what the app holds, handed to the routers."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from .artifacts import ArtifactStore
from .files import FileStore
from .settings import Settings
from .store import JobStore
from .workers import WorkerPool


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> JobStore:
    return request.app.state.store


def get_artifacts(request: Request) -> ArtifactStore:
    return request.app.state.artifacts


def get_files(request: Request) -> FileStore:
    return request.app.state.files


def get_pool(request: Request) -> WorkerPool:
    return request.app.state.pool


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[JobStore, Depends(get_store)]
ArtifactsDep = Annotated[ArtifactStore, Depends(get_artifacts)]
FilesDep = Annotated[FileStore, Depends(get_files)]
PoolDep = Annotated[WorkerPool, Depends(get_pool)]
