"""Service settings: one pydantic-settings class, read from ONNXZIP_* environment variables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from onnxzip.errors import OnnxZipError

MiB = 1 << 20
GiB = 1 << 30


class Settings(BaseSettings):
    """Every knob of `onnxzip serve` / `onnxzip worker`, each with a safe default and its reason."""

    model_config = SettingsConfigDict(env_prefix="ONNXZIP_", extra="ignore")

    data_dir: Path = Field(
        Path("onnxzip-data"),
        description="Job store (SQLite) and artifacts live here; put it on a persistent volume.")
    host: str = Field("127.0.0.1", description="Address to listen on (0.0.0.0 inside a container).")
    allowed_hosts: list[str] = Field(
        ["127.0.0.1", "localhost", "::1", "[::1]"],
        description="Host header values the API answers (a DNS-rebinding guard): add the names clients "
        "use (JSON list, e.g. '[\"onnxzip.internal\", \"localhost\"]'); '*' accepts any.")
    cors_origins: list[str] = Field(
        [], description="Web origins a browser app may call the API from (JSON list); none by default: a "
        "request carrying any other Origin header is refused with 403.")
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
    read_timeout_s: float = Field(
        60.0, gt=0, le=3600, description="A client that sends nothing for this long in the middle of a request "
        "(its headers or its body) is disconnected: a slow-loris guard.")
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
    webhook_secret: Optional[SecretStr] = Field(
        None, description="Signs completion webhooks (HMAC-SHA256, Standard Webhooks headers); jobs may name a "
        "webhook_url only when it is set.")
    webhook_attempts: int = Field(8, ge=1, le=50, description="Tries per webhook before it is marked failed.")
    webhook_backoff_s: float = Field(
        2.0, gt=0, le=300, description="Wait before the first retry of a webhook; doubles each try, at most 5 minutes.")
    queue_url: Optional[str] = Field(
        None,
        description="Scale-out: the Redis that holds the job store and the RQ queue (redis://host:6379/0, "
        "rediss:// for TLS). Unset: the embedded SQLite store in data_dir.")
    queue_name: str = Field(
        "onnxzip", pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="RQ queue name and prefix of onnxzip's Redis keys: deployments sharing one Redis need "
        "different names.")
    job_start: Literal["spawn", "fork"] = Field(
        "spawn",
        description="How a queue worker starts the process of each job: spawn (safe once CUDA is in use; about "
        "2 s of imports per job) or fork (faster, for CPU-only workers).")
    s3_bucket: Optional[str] = Field(
        None, description="Artifacts and uploaded inputs in this S3 bucket instead of data_dir (needs "
        "ONNXZIP_QUEUE_URL workers to reach it too). Credentials: the usual AWS_* variables.")
    s3_endpoint_url: Optional[str] = Field(
        None, description="S3-compatible endpoint (MinIO, Ceph, R2...); unset for AWS itself.")
    s3_prefix: str = Field("", description="Key prefix inside the bucket, e.g. 'onnxzip/'.")
    s3_region: Optional[str] = Field(None, description="Bucket region; default: the AWS_* configuration's.")

    @model_validator(mode="after")
    def _heartbeat_within_lease(self):
        if self.heartbeat_s >= self.lease_s:
            raise ValueError(f"heartbeat_s ({self.heartbeat_s}) must be shorter than lease_s ({self.lease_s}), "
                             "or leases expire between heartbeats")
        return self

    @field_validator("api_token", "webhook_secret", mode="before")
    @classmethod
    def _empty_token_is_none(cls, value):
        """ONNXZIP_API_TOKEN='' (compose passing an unset variable through) means no token, never an
        empty one that any 'Bearer ' would match."""
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        return value

    @field_validator("queue_url")
    @classmethod
    def _queue_is_redis(cls, url: Optional[str]) -> Optional[str]:
        if url and not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"{url!r} is not a Redis URL: use redis://host:6379/0 (rediss:// for TLS)")
        return url or None

    @property
    def retention_s(self) -> float:
        return self.retention_hours * 3600.0

    @property
    def db_path(self) -> Path:
        return self.data_dir / "onnxzip.db"

    def environment(self) -> dict[str, str]:
        """These settings as ONNXZIP_* variables, for processes that read them again (RQ's job processes)."""
        env = {}
        for name, value in self.model_dump(exclude={"api_token"}).items():
            if isinstance(value, Path):
                value = value.resolve()  # a job process may start elsewhere
            if isinstance(value, (list, dict)):
                value = json.dumps(value)  # pydantic-settings reads complex values as JSON
            if value is not None:
                env[f"ONNXZIP_{name.upper()}"] = str(value)
        return env


def load_settings(**overrides) -> Settings:
    """Settings from the environment, with a one-line error naming the variable when one is wrong."""
    try:
        return Settings(**overrides)
    except ValidationError as err:
        first = err.errors()[0]
        name = "ONNXZIP_" + "_".join(str(p) for p in first["loc"]).upper() if first["loc"] else "ONNXZIP_* settings"
        message = first["msg"].removeprefix("Value error, ")
        raise OnnxZipError(f"{name}: {message} (see the settings table in the README)") from err
