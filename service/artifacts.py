"""Files on local disk, one folder per job: inputs/, artifacts/, and a work folder per attempt.

    DATA_DIR/uploads/<tmp>/          an upload being received (moved to jobs/<id>/inputs when accepted)
    DATA_DIR/jobs/<id>/inputs/       model-0.onnx, model-1.onnx, calibration.npz (server-chosen names)
    DATA_DIR/jobs/<id>/work-<lease>/ what one attempt writes; moved to artifacts/ by the lease holder
    DATA_DIR/jobs/<id>/artifacts/    merged.onnx, report.json, report.html

Each file is written to a temp name, fsynced and renamed, and the finished work folder is renamed to
artifacts/ only while the store confirms the lease: a half-written file is never served.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

# The artifacts a finished job has, and how they are served.
MEDIA_TYPES = {
    "merged.onnx": "application/octet-stream",
    "report.json": "application/json",
    "report.html": "text/html; charset=utf-8",
}

_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
_CHUNK = 1 << 20


class ArtifactStore:
    """Local-disk artifacts under `root` (an S3-compatible store would offer the same methods)."""

    def __init__(self, root: Path):
        self.root = Path(root)
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
        _fsync_dir(folder)
        return target

    def input_path(self, job_id: str, stored_name: str) -> Path:
        return self.job_dir(job_id) / "inputs" / stored_name

    def work_dir(self, job_id: str, token: str) -> Path:
        folder = self.job_dir(job_id) / f"work-{token}"
        folder.mkdir(exist_ok=True)  # no parents: a deleted job's folder is not brought back
        return folder

    def write(self, folder: Path, name: str, data: bytes) -> dict:
        """Write `data` as folder/name atomically; returns {name, size, sha256}."""
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
        return {"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    def publish(self, job_id: str, token: str) -> None:
        """Move the attempt's work folder in place as artifacts/ (call only while holding the lease)."""
        folder = self.job_dir(job_id)
        final = folder / "artifacts"
        if final.exists():  # left by an attempt that died between this rename and its commit
            shutil.rmtree(final)
        os.replace(folder / f"work-{token}", final)
        _fsync_dir(folder)

    def path(self, job_id: str, name: str) -> Path:
        return self.job_dir(job_id) / "artifacts" / name

    def discard_work(self, job_id: str, token: str) -> None:
        shutil.rmtree(self.job_dir(job_id) / f"work-{token}", ignore_errors=True)

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


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
