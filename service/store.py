"""The job store and queue: records, the interface every backend implements, and the factory.

The embedded default is SQLite (`sqlite_store.py`); with ONNXZIP_QUEUE_URL the store lives in Redis and jobs
are dispatched through RQ (`redis_store.py`, `scaleout.py`). The API, the worker pool and the worker only
ever talk to this interface.

Leases: a worker claims a queued job and receives a random lease token. Every later write for that
attempt (progress, heartbeat, finish, publishing artifacts) is conditional on the token, so a stale
worker, say an orphan of a killed server, can never overwrite a job that was requeued and claimed again.
"""

from __future__ import annotations

import os
import socket
import sqlite3
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

from onnxzip.errors import OnnxZipError

from .settings import Settings

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})

# Lease states a worker sees when it renews or asks whether to stop.
HELD, CANCEL, LOST = "held", "cancel", "lost"

HOST = socket.gethostname()


def _transient_errors() -> tuple[type[Exception], ...]:
    """Store errors worth waiting out (a busy SQLite file, a Redis that is restarting or out of reach)."""
    errors: list[type[Exception]] = [sqlite3.OperationalError]
    try:
        import redis

        errors += [redis.ConnectionError, redis.TimeoutError]
    except ImportError:  # no scale-out extra: SQLite only
        pass
    return tuple(errors)


TRANSIENT = _transient_errors()


@dataclass
class Job:
    """One merge job as stored; `inputs` and `artifacts` are lists of {name, sha256, size, ...}."""

    id: str
    status: str
    created_at: float
    options: dict
    inputs: list[dict]
    max_attempts: int
    seq: int = 0
    stage: Optional[str] = None
    progress: float = 0.0
    message: str = ""
    started_at: Optional[float] = None
    finished_at: Optional[float] = None
    attempts: int = 0
    artifacts: list[dict] = field(default_factory=list)
    result: dict = field(default_factory=dict)  # what the merge reported (warnings, fidelity, savings): schemas.MergeResult
    error_code: Optional[str] = None
    error_message: Optional[str] = None
    worker_pid: Optional[int] = None
    worker_host: Optional[str] = None
    lease_token: Optional[str] = None
    lease_expires: Optional[float] = None
    cancel_requested_at: Optional[float] = None
    idempotency_key: Optional[str] = None
    payload_hash: Optional[str] = None
    metadata: dict = field(default_factory=dict)  # the client's tags {str: str}, filterable in the list
    webhook: dict = field(default_factory=dict)  # {url, state, attempts, next_at, ...}: webhooks.py

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL


@dataclass
class Event:
    """One entry of a job's history; ids increase across the whole store."""

    id: int
    job_id: str
    at: float
    type: str  # status | progress | cancel_requested | requeued
    status: str
    stage: Optional[str]
    progress: float
    message: str


class JobStore(Protocol):
    """What the API, the pool supervisor and the workers need from a job store + queue."""

    # --- the API
    def create(self, job: Job) -> tuple[Job, bool]:
        """Insert a queued job; with an idempotency key already used, return (that job, False)."""
    def get(self, job_id: str) -> Optional[Job]: ...
    def find_by_key(self, key: str) -> Optional[Job]: ...
    def page(self, limit: int, before_seq: Optional[int], status: Optional[str],
             metadata: Optional[dict[str, str]] = None) -> list[Job]:
        """Newest first, `limit` jobs with seq < before_seq (and the status and every metadata tag given)."""
    def request_cancel(self, job_id: str) -> Optional[Job]:
        """A queued job is cancelled at once; a running one gets its cancel flag set."""
    def delete(self, job_id: str) -> Optional[Job]:
        """Remove the record and its events (a running job's lease dies with it)."""
    def events(self, job_id: str, after: int, limit: int) -> list[Event]: ...
    def check_writable(self) -> None: ...

    # --- workers (all conditional on the lease token)
    def claim(self, pid: int, host: str, lease_s: float) -> Optional[Job]: ...
    def renew(self, job_id: str, token: str, lease_s: float) -> str:
        """Extend the lease; HELD, CANCEL (cancel requested) or LOST (someone else owns the job now)."""
    def lease_state(self, job_id: str, token: str) -> str: ...
    def progress(self, job_id: str, token: str, stage: str, progress: float, message: str) -> bool: ...
    def finish(self, job_id: str, token: str, status: str, *, error: Optional[tuple[str, str]] = None,
               artifacts: Optional[list[dict]] = None, publish: Optional[Callable[[], None]] = None,
               result: Optional[dict] = None) -> bool:
        """End the attempt; `publish` (moving artifacts in place) runs only while the lease is held."""

    # --- the supervisor
    def running(self) -> list[Job]: ...
    def requeue_lost(self, job_id: str, token: str, reason: str) -> Optional[str]:
        """The attempt's worker is gone: requeue, or fail once max_attempts is used up."""
    def release(self, job_id: str, token: str, reason: str) -> bool:
        """Give a job back to the queue without counting the attempt (orderly shutdown)."""
    def finished_before(self, cutoff: float) -> list[str]: ...

    # --- the webhook sender (in the API process)
    def webhooks_due(self, now: float, limit: int) -> list[Job]:
        """Finished jobs whose webhook is pending and due (next_at <= now)."""
    def update_webhook(self, job_id: str, expected: dict, new: dict) -> bool:
        """Compare-and-set of a job's webhook state: False when it is no longer `expected` (another replica
        claimed it, or the job is gone)."""
    def now(self) -> float:
        """The store's clock: leases and time limits are judged by it (one clock for all machines)."""
    def maintain(self) -> None:
        """Periodic backend housekeeping, called by every supervisor (idempotent)."""
    def describe(self) -> dict:
        """What this store is, for /v1/info and /readyz (no secrets)."""


def open_store(settings: Settings) -> JobStore:
    """The store the settings choose: Redis + RQ with ONNXZIP_QUEUE_URL, else SQLite in data_dir."""
    if settings.queue_url:
        try:
            from .scaleout import open_redis_store
        except ImportError as err:
            raise OnnxZipError(f"ONNXZIP_QUEUE_URL is set but the queue client is missing ({err}): "
                               'pip install "onnxzip[scale]"') from err
        return open_redis_store(settings)
    from .sqlite_store import SqliteJobStore

    return SqliteJobStore(settings.db_path)


def worker_lost_message(attempts: int, reason: str) -> str:
    """Why a job failed after its workers kept dying (both stores say it the same way)."""
    return (f"the job's worker stopped before finishing in all {attempts} attempts (last: {reason}); see the "
            "service log (a crash or an out-of-memory kill), then resubmit, perhaps with fewer calibration "
            "samples or a smaller batch_size")


CANCELLED_ERROR = ("cancelled", "the job was cancelled on request")


def pid_alive(pid: Optional[int]) -> bool:
    """Is process `pid` on this host running? A zombie (exited, not yet reaped) counts as dead."""
    if not pid:
        return False
    if os.path.isdir("/proc/self"):
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return False
        return state not in ("Z", "X")
    try:  # no /proc (macOS): ask the kernel
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
