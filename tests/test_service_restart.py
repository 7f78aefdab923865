"""Restarts lose nothing: a server killed with SIGKILL in the middle of a merge leaves no worker behind,
and the next server on the same data dir runs the job again to success without counting the attempt
(the crash was not the job's); a job whose own worker keeps dying fails with a reason once its
attempts are used up."""

from __future__ import annotations

import hashlib
import sqlite3

from test_service_server import (LONG_OPTIONS, Server, long_calibration, pid_alive, submit, wait_job, wait_until,
                                 worker_pids)


def test_job_survives_a_killed_server_and_no_orphan_keeps_running(tmp_path):
    """kill -9 mid-merge: every worker of the dead server exits on its own within seconds; the job is
    requeued at the next start without spending an attempt (issue 16), completes, and its artifacts are
    whole."""
    data = tmp_path / "data"
    first = Server(data, workers=2).start()
    with first.client() as c:
        job = submit(c, calibration=long_calibration(), options=LONG_OPTIONS).json()
        running = wait_until(lambda: (j := c.get(f"/v1/merges/{job['id']}").json())["stage"] == "merge" and j,
                             60, what="the merge stage")
    workers = worker_pids(first.proc.pid)
    assert running["worker_pid"] in workers and len(workers) == 2
    first.kill()
    wait_until(lambda: not any(pid_alive(p) for p in workers), 10, what="the orphaned workers to exit")

    second = Server(data, workers=2).start()
    try:
        with second.client() as c:
            done = wait_job(c, job["id"], timeout=120)
            assert done["status"] == "succeeded", done
            assert done["attempts"] == 1  # the server's crash is not the job's failure
            assert done["worker_pid"] not in workers
            events = c.get(f"/v1/merges/{job['id']}/events").json()
            requeued = [e for e in events if e["type"] == "requeued"]
            assert len(requeued) == 1 and "restarted" in requeued[0]["message"], requeued
            model = c.get(f"/v1/merges/{job['id']}/artifacts/merged.onnx")
            meta = {a["name"]: a for a in done["artifacts"]}["merged.onnx"]
            assert hashlib.sha256(model.content).hexdigest() == meta["sha256"]
            folder = data / "jobs" / job["id"]
            assert sorted(p.name for p in folder.iterdir()) == ["artifacts", "inputs"], "no attempt's leftovers"
    finally:
        second.stop()
    assert not any(pid_alive(p) for p in workers)


def test_a_job_whose_workers_keep_dying_fails_with_a_reason(tmp_path):
    """The job's own worker process is killed (an OOM kill, a crash in native code) while the server
    stays up: each loss spends an attempt; after max_attempts the job fails with `worker_lost`, saying
    how many attempts it had and what to do, instead of looping forever."""
    import os
    import signal

    data = tmp_path / "data"
    server = Server(data, workers=1, max_attempts=2).start()
    try:
        with server.client() as c:
            job = submit(c, calibration=long_calibration(), options=LONG_OPTIONS).json()
            for attempt in (1, 2):
                running = wait_until(lambda: (j := c.get(f"/v1/merges/{job['id']}").json())["stage"] == "merge"
                                     and j["attempts"] == attempt and j, 60, what=f"attempt {attempt} to merge")
                os.kill(running["worker_pid"], signal.SIGKILL)
            done = wait_job(c, job["id"], timeout=60)
            assert done["status"] == "failed", done
            assert done["error"]["code"] == "worker_lost"
            assert "2 attempts" in done["error"]["message"] and "resubmit" in done["error"]["message"]
            assert done["attempts"] == 2
            assert server.proc.poll() is None  # the server itself never went down
    finally:
        server.stop()
    with sqlite3.connect(data / "onnxzip.db") as db:  # the store stays consistent: no lease left behind
        assert db.execute("SELECT lease_token FROM jobs WHERE id=?", (job["id"],)).fetchone() == (None,)


def test_repeated_server_crashes_spend_no_attempt_of_a_healthy_job(tmp_path):
    """Issue 16: the server killed 3 times with a job merging each time, max_attempts 2: the job still
    succeeds, on its first attempt."""
    data = tmp_path / "data"
    server = Server(data, workers=1, max_attempts=2).start()
    with server.client() as c:
        job = submit(c, calibration=long_calibration(), options=LONG_OPTIONS).json()
    for _ in range(3):
        with server.client() as c:
            wait_until(lambda: (j := c.get(f"/v1/merges/{job['id']}").json())["stage"] == "merge"
                       and j["progress"] > 0.2, 60, what="the merge to make progress")
        workers = worker_pids(server.proc.pid)
        server.kill()
        wait_until(lambda: not any(pid_alive(p) for p in workers), 10, what="the orphaned workers to exit")
        server = Server(data, workers=1, max_attempts=2).start()
    try:
        with server.client() as c:
            done = wait_job(c, job["id"], timeout=120)
            assert done["status"] == "succeeded", done
            assert done["attempts"] == 1
    finally:
        server.stop()
