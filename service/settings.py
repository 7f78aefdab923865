"""Service settings: one pydantic-settings class, read from ONNXZIP_* environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1 << 20
GiB = 1 << 30


class Settings(BaseSettings):
    """Every knob of `onnxzip serve` / `onnxzip worker`, each with a safe default and its reason."""

    model_config = SettingsConfigDict(env_prefix="ONNXZIP_", extra="ignore")

    data_dir: Path = Field(
        Path("onnxzip-data"),
        description="Job store (SQLite) and artifacts live here; put it on a persistent volume.")
    host: str = Field("127.0.0.1", description="Address to listen on (0.0.0.0 inside a container).")
    port: int = Field(8000, ge=0, le=65535, description="TCP port of the API.")
    workers: int = Field(
        2, ge=0, le=64,
        description="Merge worker processes this service starts; 0 runs the API only, and jobs wait "
        "for `onnxzip worker`. One merge keeps about one CPU core (or the GPU) busy.")
    worker_threads: Optional[int] = Field(
        None, ge=1,
        description="BLAS/OpenMP threads per worker process; default: CPU cores / workers, because "
        "oversubscribed OpenBLAS threads spin and slow every merge several-fold.")
    max_upload_bytes: int = Field(
        2 * GiB, ge=1, description="Largest request body, counted while it streams in.")
    max_model_bytes: int = Field(
        GiB, ge=1, description="Largest single .onnx upload (protobuf caps a model file at 2 GiB anyway).")
    max_calibration_bytes: int = Field(
        GiB, ge=1,
        description="Largest calibration .npz, as declared uncompressed by its members (a zip-bomb "
        "guard); a few hundred samples need far less.")
    job_timeout_s: float = Field(
        3600.0, gt=0, description="A job running longer than this is stopped and fails with `timeout`.")
    max_attempts: int = Field(
        3, ge=1, description="Tries per job when workers die under it (restart, crash, OOM kill).")
    lease_s: float = Field(
        60.0, gt=0,
        description="A worker's claim on a job expires this long after its last heartbeat; the job is "
        "then requeued.")
    heartbeat_s: float = Field(5.0, gt=0, description="How often a busy worker renews its lease.")
    cancel_grace_s: float = Field(
        5.0, ge=0,
        description="After a cancel, the worker has this long to stop between stages before its "
        "process is terminated.")
    retention_hours: float = Field(
        168.0, gt=0, description="Finished jobs (records, inputs and artifacts) are deleted after this.")
    api_token: Optional[SecretStr] = Field(
        None, description="When set, every endpoint but /healthz needs `Authorization: Bearer <token>`.")
    queue_url: Optional[str] = Field(
        None,
        description="Scale-out queue (e.g. redis://host:6379/0). Not available yet: leave unset for "
        "the embedded SQLite store.")

    @model_validator(mode="after")
    def _heartbeat_within_lease(self):
        if self.heartbeat_s >= self.lease_s:
            raise ValueError(f"heartbeat_s ({self.heartbeat_s}) must be shorter than lease_s ({self.lease_s}), "
                             "or leases expire between heartbeats")
        return self

    @property
    def retention_s(self) -> float:
        return self.retention_hours * 3600.0

    @property
    def db_path(self) -> Path:
        return self.data_dir / "onnxzip.db"
