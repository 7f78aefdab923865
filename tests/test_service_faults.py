"""Storage faults under a real server (issue 16): the data dir full or read-only at submit answers
507 / 503 with Retry-After and the field-free error shape, never a 500, and the service recovers by
itself once the operator has fixed the disk. The data dir is a small tmpfs mounted for the test (root
only: skipped where mounting is not allowed)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from test_service_server import assert_error, long_calibration, start_server, submit, wait_job, wait_until


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def _disk(tmp_path, size: str):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, size):
        pytest.skip("mounting a tmpfs needs root (the fault tests run on CI's root VM)")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    yield from _disk(tmp_path, "8m")


@pytest.fixture
def medium_disk(tmp_path):
    yield from _disk(tmp_path, "64m")


def test_full_and_read_only_data_dir_answer_507_and_503_then_recover(small_disk, tmp_path_factory):
    server = start_server(tmp_path_factory, "faults", workers=1)
    server.stop()
    server.data_dir = small_disk / "data"  # the same settings, on the small disk
    server.start()
    try:
        with server.client() as c:
            filler = small_disk / "filler"
            free = subprocess.run(["df", "-B1", "--output=avail", str(small_disk)], capture_output=True,
                                  text=True).stdout.split()[-1]
            filler.write_bytes(b"\0" * max(0, int(free) - 64 * 1024))
            response = submit(c, calibration=long_calibration(repeat=4))  # 0.5 MB: more than is left
            assert_error(response, 507, "insufficient_storage", "full", "retry")
            assert response.headers["retry-after"]
            filler.unlink()
            wait_until(lambda: c.get("/readyz").status_code == 200, 60, what="readiness with space back")
            # where uploads are staged turns read-only (a read-only tmpfs mounted over it)
            uploads = server.data_dir / "uploads"
            uploads.mkdir(exist_ok=True)
            subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(uploads)], check=True)
            try:
                response = submit(c)
                assert_error(response, 503, "storage_unavailable", "read-only", "retry")
                assert response.headers["retry-after"]
            finally:
                subprocess.run(["umount", "-l", str(uploads)], check=True)
            done = wait_job(c, submit(c).json()["id"])
            assert done["status"] == "succeeded", done
        assert "Traceback" not in server.log_text()
    finally:
        server.stop()


def test_disk_full_during_a_merge_fails_that_job_and_the_pool_recovers(medium_disk, tmp_path_factory):
    """The disk fills while a merge runs: that job ends (failed, with a reason, or retried), no job stays
    `running` without a live worker, and once space is back the pool takes the next job by itself."""
    from test_service_server import LONG_OPTIONS

    server = start_server(tmp_path_factory, "faults-run", workers=1)
    server.stop()
    server.data_dir = medium_disk / "data"
    server.start()
    try:
        with server.client() as c:
            job = submit(c, calibration=long_calibration(), options=LONG_OPTIONS).json()
            wait_until(lambda: c.get(f"/v1/merges/{job['id']}").json()["status"] == "running", 60, 0.05,
                       "the job to start")
            filler = medium_disk / "filler"
            free = subprocess.run(["df", "-B1", "--output=avail", str(medium_disk)], capture_output=True,
                                  text=True).stdout.split()[-1]
            with open(filler, "wb") as f:  # fill to the last byte
                try:
                    f.write(b"\0" * int(free))
                except OSError:
                    pass
            try:  # the merge runs on into the full disk: its writes fail; nothing may die for good
                time.sleep(15)
                assert server.proc.poll() is None
                # the pool stays whole while the disk is full: its worker is alive, holding the job
                assert c.get("/readyz").json()["checks"]["workers"] == "1 of 1 alive"
            finally:
                filler.unlink()
            ended = wait_job(c, job["id"], timeout=120)  # space is back: the job ends by itself
            assert ended["status"] in ("failed", "succeeded"), ended
            if ended["status"] == "failed":
                assert ended["error"]["code"] in ("storage_full", "worker_lost"), ended
            wait_until(lambda: c.get("/readyz").status_code == 200, 90, what="the pool to recover")
            done = wait_job(c, submit(c).json()["id"])
            assert done["status"] == "succeeded", done
        assert server.log_text().count("supervisor tick failed") <= 1  # no traceback per tick
    finally:
        server.stop()


def test_readiness_answers_503_at_once_while_the_job_store_is_locked(tmp_path_factory):
    """Another process holds SQLite's write lock: /readyz says not ready within its probe's own wait (it
    waited out the 30 s a job write may wait before), and ready again once the lock is released."""
    import sqlite3

    server = start_server(tmp_path_factory, "locked", workers=1)
    try:
        with server.client() as c:
            holder = sqlite3.connect(server.data_dir / "onnxzip.db", isolation_level=None)
            holder.execute("BEGIN EXCLUSIVE")
            try:
                response = c.get("/readyz", timeout=10)  # raises if it hangs for the old 30 s
                assert response.status_code == 503 and "not writable" in response.json()["checks"]["store"]
            finally:
                holder.execute("ROLLBACK")
                holder.close()
            assert c.get("/readyz").status_code == 200
    finally:
        server.stop()
