"""The embedded job store: one SQLite file in WAL mode, shared by the API and its worker processes.

Every read-modify-write runs in `BEGIN IMMEDIATE` (one writer at a time, readers never blocked), and
every worker write matches the lease token as well as the job id.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

from .store import (CANCEL, CANCELLED, CANCELLED_ERROR, FAILED, HELD, LOST, QUEUED, RUNNING, SUCCEEDED, TERMINAL,
                    Event, Job, worker_lost_message)

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    stage TEXT,
    progress REAL NOT NULL DEFAULT 0,
    message TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    options TEXT NOT NULL,
    inputs TEXT NOT NULL,
    artifacts TEXT NOT NULL DEFAULT '[]',
    result TEXT NOT NULL DEFAULT '{}',
    metadata TEXT NOT NULL DEFAULT '{}',
    webhook TEXT NOT NULL DEFAULT '{}',
    error_code TEXT,
    error_message TEXT,
    worker_pid INTEGER,
    worker_host TEXT,
    lease_token TEXT,
    lease_expires REAL,
    cancel_requested_at REAL,
    idempotency_key TEXT UNIQUE,
    payload_hash TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs(status, seq);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    at REAL NOT NULL,
    type TEXT NOT NULL,
    status TEXT NOT NULL,
    stage TEXT,
    progress REAL NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_job ON events(job_id, id);
-- (events.n, the event's number within its job, is added below: data dirs from before it get it too)
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

_JSON = ("options", "inputs", "artifacts", "result", "metadata", "webhook")
_CANCELLED_ERROR = CANCELLED_ERROR


READY_WAIT_S = 2.0  # how long a readiness probe waits for SQLite's write lock

class SqliteJobStore:
    """`JobStore` on SQLite; safe to share between threads and processes (one connection each)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        conn = self._conn()
        conn.execute("PRAGMA journal_mode=WAL")  # persistent: readers never wait for the writer
        conn.executescript(SCHEMA)
        columns = {row["name"] for row in conn.execute("PRAGMA table_info(jobs)")}
        if "result" not in columns:  # a data dir from before job results: add the column, keep the jobs
            self._add_column(conn, "ALTER TABLE jobs ADD COLUMN result TEXT NOT NULL DEFAULT '{}'")
        for name in ("metadata", "webhook"):  # ... and from before job metadata and webhooks
            if name not in columns:
                self._add_column(conn, f"ALTER TABLE jobs ADD COLUMN {name} TEXT NOT NULL DEFAULT '{{}}'")
        if "n" not in {row["name"] for row in conn.execute("PRAGMA table_info(events)")}:
            # event ids count within their job (1, 2, ...), as a client resuming a stream expects
            self._add_column(conn, "ALTER TABLE events ADD COLUMN n INTEGER")
            conn.execute("UPDATE events SET n = (SELECT COUNT(*) FROM events AS e WHERE e.job_id = events.job_id "
                         "AND e.id <= events.id) WHERE n IS NULL")
        conn.execute("CREATE INDEX IF NOT EXISTS events_by_job_n ON events(job_id, n)")

    @staticmethod
    def _add_column(conn: sqlite3.Connection, statement: str) -> None:
        try:
            conn.execute(statement)
        except sqlite3.OperationalError as err:  # another process of the service added it first
            if "duplicate column" not in str(err):
                raise

    # --- plumbing -----------------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA busy_timeout=30000")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a crash loses nothing committed
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _event(self, c: sqlite3.Connection, job_id: str, type_: str, status: str, stage: Optional[str],
               progress: float, message: str) -> None:
        c.execute("INSERT INTO events (job_id, n, at, type, status, stage, progress, message) VALUES "
                  "(?, (SELECT COALESCE(MAX(n), 0) + 1 FROM events WHERE job_id=?), ?,?,?,?,?,?)",
                  (job_id, job_id, time.time(), type_, status, stage, progress, message))

    @staticmethod
    def _job(row: sqlite3.Row) -> Job:
        data = dict(row)
        for key in _JSON:
            data[key] = json.loads(data[key])
        return Job(**data)

    def _row(self, c: sqlite3.Connection, job_id: str, token: Optional[str] = None) -> Optional[sqlite3.Row]:
        if token is None:
            return c.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return c.execute("SELECT * FROM jobs WHERE id=? AND lease_token=? AND status=?",
                         (job_id, token, RUNNING)).fetchone()

    def _end(self, c: sqlite3.Connection, row: sqlite3.Row, status: str, error: Optional[tuple[str, str]],
             artifacts: Optional[list[dict]] = None, message: str = "", result: Optional[dict] = None) -> None:
        code, text = error or (None, None)
        stage = "done" if status == SUCCEEDED else row["stage"]
        progress = 1.0 if status == SUCCEEDED else row["progress"]
        message = message or (text if error else "merged")
        c.execute("UPDATE jobs SET status=?, stage=?, progress=?, message=?, finished_at=?, error_code=?, "
                  "error_message=?, artifacts=?, result=?, lease_token=NULL, lease_expires=NULL WHERE id=?",
                  (status, stage, progress, message, time.time(), code, text, json.dumps(artifacts or []),
                   json.dumps(result or {}), row["id"]))
        self._event(c, row["id"], "status", status, stage, progress, message)

    # --- the API ------------------------------------------------------------------------------------

    def create(self, job: Job) -> tuple[Job, bool]:
        # created_at is taken under the write lock, so it orders jobs as seq (and the list) does
        with self._write() as c:
            if job.idempotency_key is not None:
                row = c.execute("SELECT * FROM jobs WHERE idempotency_key=?", (job.idempotency_key,)).fetchone()
                if row is not None:
                    return self._job(row), False
            c.execute(
                "INSERT INTO jobs (id, status, stage, message, created_at, max_attempts, options, inputs, "
                "idempotency_key, payload_hash, metadata, webhook) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (job.id, QUEUED, "queued", "waiting for a worker", time.time(), job.max_attempts,
                 json.dumps(job.options), json.dumps(job.inputs), job.idempotency_key, job.payload_hash,
                 json.dumps(job.metadata), json.dumps(job.webhook)))
            self._event(c, job.id, "status", QUEUED, "queued", 0.0, "waiting for a worker")
        return self.get(job.id), True

    def get(self, job_id: str) -> Optional[Job]:
        row = self._row(self._conn(), job_id)
        return self._job(row) if row is not None else None

    def find_by_key(self, key: str) -> Optional[Job]:
        row = self._conn().execute("SELECT * FROM jobs WHERE idempotency_key=?", (key,)).fetchone()
        return self._job(row) if row is not None else None

    def page(self, limit: int, before_seq: Optional[int], status: Optional[str],
             metadata: Optional[dict[str, str]] = None) -> list[Job]:
        sql, args = "SELECT * FROM jobs WHERE seq < ?", [before_seq if before_seq is not None else 2**62]
        if status is not None:
            sql += " AND status = ?"
            args.append(status)
        for key, value in (metadata or {}).items():  # keys are [A-Za-z0-9_.-] (uploads.METADATA_KEY)
            sql += " AND json_extract(metadata, ?) = ?"
            args += [f'$."{key}"', value]
        rows = self._conn().execute(sql + " ORDER BY seq DESC LIMIT ?", (*args, limit)).fetchall()
        return [self._job(r) for r in rows]

    def request_cancel(self, job_id: str) -> Optional[Job]:
        with self._write() as c:
            row = self._row(c, job_id)
            if row is None:
                return None
            if row["status"] == QUEUED:
                self._end(c, row, CANCELLED, _CANCELLED_ERROR)
            elif row["status"] == RUNNING and row["cancel_requested_at"] is None:
                c.execute("UPDATE jobs SET cancel_requested_at=?, message=? WHERE id=?",
                          (time.time(), "cancel requested", job_id))
                self._event(c, job_id, "cancel_requested", RUNNING, row["stage"], row["progress"],
                            "cancel requested; the worker stops at the next stage boundary")
        return self.get(job_id)

    def delete(self, job_id: str) -> Optional[Job]:
        with self._write() as c:
            row = self._row(c, job_id)
            if row is None:
                return None
            c.execute("DELETE FROM jobs WHERE id=?", (job_id,))  # events go with it (ON DELETE CASCADE)
        return self._job(row)

    def events(self, job_id: str, after: int, limit: int) -> list[Event]:
        rows = self._conn().execute(
            "SELECT n AS id, job_id, at, type, status, stage, progress, message FROM events WHERE job_id=? AND n>? "
            "ORDER BY n LIMIT ?", (job_id, after, limit)).fetchall()
        return [Event(**dict(r)) for r in rows]

    def check_writable(self) -> None:
        """Readiness: a write within READY_WAIT_S. A probe must answer quickly, not wait out the 30 s a
        job write may wait for a lock (a locked file is reported as not ready)."""
        conn = sqlite3.connect(self.path, timeout=READY_WAIT_S, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout={int(READY_WAIT_S * 1000)}")
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('ready_probe', ?)", (str(time.time()),))
            conn.execute("COMMIT")
        finally:
            conn.close()

    # --- workers ------------------------------------------------------------------------------------

    def claim(self, pid: int, host: str, lease_s: float) -> Optional[Job]:
        conn = self._conn()
        if conn.execute("SELECT 1 FROM jobs WHERE status=? LIMIT 1", (QUEUED,)).fetchone() is None:
            return None  # the common idle case, without taking the write lock
        token = secrets.token_hex(16)
        with self._write() as c:
            row = c.execute("SELECT id, attempts, max_attempts FROM jobs WHERE status=? ORDER BY seq LIMIT 1",
                            (QUEUED,)).fetchone()
            if row is None:
                return None
            now = time.time()
            attempt = row["attempts"] + 1
            message = f"attempt {attempt} of {row['max_attempts']} started by worker pid {pid}"
            c.execute("UPDATE jobs SET status=?, stage='starting', progress=0, message=?, attempts=?, started_at=?, "
                      "lease_token=?, lease_expires=?, worker_pid=?, worker_host=? WHERE id=?",
                      (RUNNING, message, attempt, now, token, now + lease_s, pid, host, row["id"]))
            self._event(c, row["id"], "status", RUNNING, "starting", 0.0, message)
        return self.get(row["id"])

    def renew(self, job_id: str, token: str, lease_s: float) -> str:
        with self._write() as c:
            updated = c.execute("UPDATE jobs SET lease_expires=? WHERE id=? AND lease_token=? AND status=?",
                                (time.time() + lease_s, job_id, token, RUNNING)).rowcount
            if not updated:
                return LOST
            row = c.execute("SELECT cancel_requested_at FROM jobs WHERE id=?", (job_id,)).fetchone()
        return CANCEL if row["cancel_requested_at"] is not None else HELD

    def lease_state(self, job_id: str, token: str) -> str:
        row = self._row(self._conn(), job_id, token)
        if row is None:
            return LOST
        return CANCEL if row["cancel_requested_at"] is not None else HELD

    def progress(self, job_id: str, token: str, stage: str, progress: float, message: str) -> bool:
        with self._write() as c:
            updated = c.execute("UPDATE jobs SET stage=?, progress=?, message=? WHERE id=? AND lease_token=? "
                                "AND status=?", (stage, progress, message, job_id, token, RUNNING)).rowcount
            if updated:
                self._event(c, job_id, "progress", RUNNING, stage, progress, message)
        return bool(updated)

    def finish(self, job_id: str, token: str, status: str, *, error: Optional[tuple[str, str]] = None,
               artifacts: Optional[list[dict]] = None, publish: Optional[Callable[[], None]] = None,
               result: Optional[dict] = None) -> bool:
        with self._write() as c:
            row = self._row(c, job_id, token)
            if row is None:
                return False
            if status == CANCELLED and error is None:
                error = _CANCELLED_ERROR
            if publish is not None:
                publish()  # under the write lock: nobody can re-claim the job while files move in place
            self._end(c, row, status, error, artifacts, result=result)
        return True

    # --- the supervisor -----------------------------------------------------------------------------

    def running(self) -> list[Job]:
        rows = self._conn().execute("SELECT * FROM jobs WHERE status=? ORDER BY seq", (RUNNING,)).fetchall()
        return [self._job(r) for r in rows]

    def requeue_lost(self, job_id: str, token: str, reason: str) -> Optional[str]:
        with self._write() as c:
            row = self._row(c, job_id, token)
            if row is None:
                return None
            if row["cancel_requested_at"] is not None:
                self._end(c, row, CANCELLED, _CANCELLED_ERROR)
                return CANCELLED
            if row["attempts"] >= row["max_attempts"]:
                self._end(c, row, FAILED, ("worker_lost", worker_lost_message(row["attempts"], reason)))
                return FAILED
            message = f"requeued: {reason} (attempt {row['attempts']} of {row['max_attempts']} used)"
            c.execute("UPDATE jobs SET status=?, stage='queued', message=?, lease_token=NULL, lease_expires=NULL "
                      "WHERE id=?", (QUEUED, message, job_id))
            self._event(c, job_id, "requeued", QUEUED, "queued", row["progress"], message)
        return QUEUED

    def release(self, job_id: str, token: str, reason: str) -> bool:
        with self._write() as c:
            row = self._row(c, job_id, token)
            if row is None:
                return False
            message = f"requeued: {reason}"
            c.execute("UPDATE jobs SET status=?, stage='queued', message=?, attempts=MAX(attempts-1, 0), "
                      "lease_token=NULL, lease_expires=NULL WHERE id=?", (QUEUED, message, job_id))
            self._event(c, job_id, "requeued", QUEUED, "queued", row["progress"], message)
        return True

    def finished_before(self, cutoff: float) -> list[str]:
        rows = self._conn().execute("SELECT id FROM jobs WHERE finished_at IS NOT NULL AND finished_at < ?",
                                    (cutoff,)).fetchall()
        return [r["id"] for r in rows]

    # --- the webhook sender ---------------------------------------------------------------------------

    def webhooks_due(self, now: float, limit: int) -> list[Job]:
        rows = self._conn().execute(
            "SELECT * FROM jobs WHERE webhook != '{}' AND status IN (?,?,?) AND json_extract(webhook, '$.state') = "
            "'pending' AND json_extract(webhook, '$.next_at') <= ? ORDER BY finished_at LIMIT ?",
            (*sorted(TERMINAL), now, limit)).fetchall()
        return [self._job(r) for r in rows]

    def update_webhook(self, job_id: str, expected: dict, new: dict) -> bool:
        with self._write() as c:
            row = c.execute("SELECT webhook FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None or json.loads(row["webhook"]) != expected:
                return False
            c.execute("UPDATE jobs SET webhook=? WHERE id=?", (json.dumps(new), job_id))
        return True

    def now(self) -> float:
        return time.time()

    def maintain(self) -> None:
        """Nothing to do: SQLite has no queue of its own to keep in step."""

    def describe(self) -> dict:
        return {"kind": "sqlite", "path": str(self.path), "queue": "embedded (workers poll the store)"}
