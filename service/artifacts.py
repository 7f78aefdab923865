"""Where inputs and artifacts live: local disk (this module) or S3 (`s3_artifacts.py`), one place per job.

    DATA_DIR/uploads/<tmp>/             an upload being received (moved to jobs/<id>/inputs when accepted)
    DATA_DIR/jobs/<id>/inputs/          model-0.onnx, model-1.onnx, calibration.npz (server-chosen names)
    DATA_DIR/jobs/<id>/work-<lease>/    what one attempt writes
    DATA_DIR/jobs/<id>/artifacts/       merged.onnx, report.json, report.html (embedded store)
    DATA_DIR/jobs/<id>/attempt-<lease>/ the same, addressed by attempt (Redis store)

Each file is written to a temp name, fsynced and renamed. A half-written file is never served, in one of
two ways. With the SQLite store the work folder is renamed to artifacts/ while the store holds its write
lock and confirms the lease. Redis cannot hold a lock around a rename, so there each attempt's files stay
under the attempt's own name and the job record, written by the lease holder after the last file is in
place, says which attempt's files are the job's; a stale attempt's files are never pointed at.

Both stores offer the same methods: the API stages uploads and serves artifacts, workers read inputs and
save artifacts, supervisors discard what dead attempts left.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

from .settings import Settings

# The artifacts a finished job has, and how they are served.
MEDIA_TYPES = {
    "merged.onnx": "application/octet-stream",
    "report.json": "application/json",
    "report.html": "text/html; charset=utf-8",
}

_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
_CHUNK = 1 << 20


def open_artifacts(settings: Settings):
    """The artifact store the settings choose: S3 when a bucket is named, else data_dir (attempt-addressed
    when the job store is Redis)."""
    if settings.s3_bucket:
        from .s3_artifacts import S3Artifacts

        return S3Artifacts(settings)
    return ArtifactStore(settings.data_dir, addressed=bool(settings.queue_url))


class ArtifactStore:
    """Local-disk inputs and artifacts under `root` (a shared volume when workers run elsewhere)."""

    def __init__(self, root: Path, addressed: bool = False):
        self.root = Path(root)
        self.addressed = addressed
        self.jobs = self.root / "jobs"
        self.uploads = self.root / "uploads"
        self.jobs.mkdir(parents=True, exist_ok=True)
        self.uploads.mkdir(parents=True, exist_ok=True)

    def job_dir(self, job_id: str) -> Path:
        if not _JOB_ID.match(job_id):  # ids are ours (uuid4 hex); anything else never touches the disk
            raise ValueError(f"not a job id: {job_id!r}")
        return self.jobs / job_id

    def new_staging(self) -> Path:
        return Path(tempfile.mkdtemp(prefix="upload-", dir=self.uploads))

    def adopt_inputs(self, staging: Path, job_id: str) -> Path:
        """Move an accepted upload's folder to the job's inputs/."""
        folder = self.job_dir(job_id)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / "inputs"
        os.replace(staging, target)
        fsync_dir(folder)
        return target

    def input_path(self, job_id: str, stored_name: str) -> Path:
        return self.job_dir(job_id) / "inputs" / stored_name

    @contextmanager
    def inputs(self, job_id: str, stored_names: list[str]) -> Iterator[dict[str, Path]]:
        """Local paths of a job's inputs while a worker reads them (here: where they are)."""
        yield {name: self.input_path(job_id, name) for name in stored_names}

    def save(self, job_id: str, token: str, files: dict[str, bytes]) -> tuple[list[dict], Optional[Callable[[], None]]]:
        """Write one attempt's artifacts; returns their {name, size, sha256[, key]} and the step that makes
        them the job's (None when the record pointing at them is that step)."""
        work = self.work_dir(job_id, token)
        metas = [self.write(work, name, data) for name, data in files.items()]
        if not self.addressed:
            return metas, lambda: self.publish(job_id, token)
        sealed = f"attempt-{token}"
        os.replace(work, self.job_dir(job_id) / sealed)
        fsync_dir(self.job_dir(job_id))
        return [{**m, "key": f"{sealed}/{m['name']}"} for m in metas], None

    def prune(self, job_id: str, token: str) -> None:
        """After attempt `token` became the job's: drop what other attempts left."""
        if not self.addressed:
            return
        for entry in self.job_dir(job_id).glob("*-*"):
            if entry.name.startswith(("work-", "attempt-")) and not entry.name.endswith(token):
                shutil.rmtree(entry, ignore_errors=True)

    def local_path(self, job_id: str, meta: dict) -> Optional[Path]:
        """Where an artifact of a finished job is on this machine's disk (None for remote stores)."""
        return self.job_dir(job_id) / meta.get("key", f"artifacts/{meta['name']}")

    def check(self) -> str:
        """Raise when the store cannot take files; else a one-line description."""
        probe = self.root / ".ready-probe"
        probe.write_bytes(b"ok")
        probe.unlink()
        return f"ok ({self.root.resolve()})"

    def describe(self) -> dict:
        return {"kind": "local", "path": str(self.root.resolve()),
                "layout": "attempt-addressed" if self.addressed else "published under the store's lock"}

    def work_dir(self, job_id: str, token: str) -> Path:
        folder = self.job_dir(job_id) / f"work-{token}"
        folder.mkdir(exist_ok=True)  # no parents: a deleted job's folder is not brought back
        return folder

    def write(self, folder: Path, name: str, data: bytes) -> dict:
        return write_atomic(folder, name, data)

    def publish(self, job_id: str, token: str) -> None:
        """Move the attempt's work folder in place as artifacts/ (call only while holding the lease)."""
        folder = self.job_dir(job_id)
        final = folder / "artifacts"
        if final.exists():  # left by an attempt that died between this rename and its commit
            shutil.rmtree(final)
        os.replace(folder / f"work-{token}", final)
        fsync_dir(folder)

    def discard_work(self, job_id: str, token: str) -> None:
        """Remove what an attempt that did not become the job's wrote."""
        shutil.rmtree(self.job_dir(job_id) / f"work-{token}", ignore_errors=True)
        if self.addressed:
            shutil.rmtree(self.job_dir(job_id) / f"attempt-{token}", ignore_errors=True)

    def remove(self, job_id: str) -> None:
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)

    def sweep_orphans(self, is_known: Callable[[str], bool], older_than_s: float) -> list[str]:
        """Remove job folders that have no record, and abandoned uploads, older than `older_than_s`."""
        cutoff = time.time() - older_than_s
        removed = []
        for parent, check in ((self.jobs, is_known), (self.uploads, lambda name: False)):
            for entry in parent.iterdir():
                try:
                    if entry.stat().st_mtime < cutoff and not check(entry.name):
                        shutil.rmtree(entry, ignore_errors=True)
                        removed.append(entry.name)
                except FileNotFoundError:
                    pass
        return removed


def write_atomic(folder: Path, name: str, data: bytes) -> dict:
    """Write `data` as folder/name atomically (temp file, fsync, rename); returns {name, size, sha256}."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            view = memoryview(data)
            for start in range(0, len(view), _CHUNK):
                f.write(view[start:start + _CHUNK])
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, folder / name)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return digest(name, data)


def digest(name: str, data: bytes) -> dict:
    """An artifact's record: {name, size, sha256} (the sha256 is its ETag)."""
    return {"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def copy_hashed(source, target: Path, limit: int) -> tuple[int, str]:
    """Copy a binary stream to `target` with fsync, hashing it; stops with OverflowError past `limit` bytes."""
    digest, size = hashlib.sha256(), 0
    with open(target, "wb") as out:
        while chunk := source.read(_CHUNK):
            size += len(chunk)
            if size > limit:
                raise OverflowError(size)
            digest.update(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    return size, digest.hexdigest()


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
