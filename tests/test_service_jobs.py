"""Merge jobs through the REST service, end to end: submit -> poll -> events -> download, checked against
the CLI; idempotency; cancel; listing; 50 concurrent jobs. One real server (2 workers) for the module."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import pytest

from conftest import ROOT, run
from test_service_server import (LONG_OPTIONS, MLP, assert_error, long_calibration, npz_bytes, pid_alive,
                                 start_server, submit, wait_job, wait_until, worker_pids)

OPTIONS = {"share": 1.0, "tasks": ["digit", "mod4"]}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start_server(tmp_path_factory, "jobs", workers=2, cancel_grace_s=2)
    yield server
    server.stop()
    assert "Traceback" not in server.log_path.read_text(), server.log_path.read_text()[-4000:]


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c


def sse_events(client, job_id: str, last_event_id=None) -> list[dict]:
    """Read a job's server-sent events until the server ends the stream."""
    headers = {"Accept": "text/event-stream"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    events, block = [], {}
    with client.stream("GET", f"/v1/merges/{job_id}/events", headers=headers, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line == "":
                if "data" in block:
                    data = json.loads(block["data"])
                    assert int(block["id"]) == data["id"] and block["event"] == data["type"]
                    events.append(data)
                block = {}
            elif not line.startswith(":"):
                key, _, value = line.partition(": ")
                block[key] = value
    return events


def test_submitted_merge_matches_the_cli_and_runs_in_onnxruntime(client, tmp_path):
    """submit -> 202 + Location -> poll -> events -> download merged.onnx: the same outputs as
    `onnxzip merge` with the same inputs and options, within 1e-6, and the reports are served."""
    response = submit(client, options=json.dumps(OPTIONS))
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/merges/{job['id']}"
    assert job["status"] in ("queued", "running")
    assert [(i["role"], i["name"]) for i in job["inputs"]] == [("model", "a.onnx"), ("model", "b.onnx"),
                                                               ("calibration", "calib.npz")]
    import hashlib

    assert job["inputs"][0]["sha256"] == hashlib.sha256((MLP / "a.onnx").read_bytes()).hexdigest()
    assert job["inputs"][0]["size"] == (MLP / "a.onnx").stat().st_size
    assert job["options"]["tasks"] == ["digit", "mod4"]

    live = sse_events(client, job["id"])  # follows the job until it ends
    done = wait_job(client, job["id"])
    assert done["status"] == "succeeded", done
    assert done["progress"] == 1.0 and done["stage"] == "done" and done["attempts"] == 1 and done["error"] is None
    assert done["created_at"] <= done["started_at"] <= done["finished_at"]
    assert {a["name"] for a in done["artifacts"]} == {"merged.onnx", "report.json", "report.html"}

    events = client.get(f"/v1/merges/{job['id']}/events").json()
    assert live == events, "SSE and the JSON list tell the same history"
    ids = [e["id"] for e in events]
    assert ids == sorted(set(ids))
    assert events[0]["status"] == "queued" and events[-1]["status"] == "succeeded"
    assert {"load", "canonicalize", "merge", "emit", "report"} <= {e["stage"] for e in events}
    progress = [e["progress"] for e in events]
    assert progress == sorted(progress), "progress never goes back"
    middle = ids[len(ids) // 2]
    assert [e["id"] for e in client.get(f"/v1/merges/{job['id']}/events", params={"after": middle}).json()] == \
        [i for i in ids if i > middle]
    assert [e["id"] for e in sse_events(client, job["id"], last_event_id=middle)] == [i for i in ids if i > middle]

    merged = client.get(f"/v1/merges/{job['id']}/artifacts/merged.onnx")
    assert merged.status_code == 200
    meta = {a["name"]: a for a in done["artifacts"]}
    assert merged.headers["etag"] == f'"{meta["merged.onnx"]["sha256"]}"'
    assert hashlib.sha256(merged.content).hexdigest() == meta["merged.onnx"]["sha256"]
    assert len(merged.content) == meta["merged.onnx"]["size"]
    again = client.get(f"/v1/merges/{job['id']}/artifacts/merged.onnx",
                       headers={"If-None-Match": merged.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    head = client.head(f"/v1/merges/{job['id']}/artifacts/merged.onnx")
    assert head.status_code == 200 and head.content == b"" and head.headers["etag"] == merged.headers["etag"]
    assert int(head.headers["content-length"]) == meta["merged.onnx"]["size"]
    stale = client.get(f"/v1/merges/{job['id']}/artifacts/merged.onnx", headers={"If-None-Match": '"0000"'})
    assert stale.status_code == 200

    report = client.get(f"/v1/merges/{job['id']}/artifacts/report.json")
    assert report.headers["content-type"].startswith("application/json")
    assert report.json()["tasks"] == ["digit", "mod4"]
    html = client.get(f"/v1/merges/{job['id']}/artifacts/report.html")
    assert html.headers["content-type"].startswith("text/html") and "<html" in html.text.lower()

    service_model = tmp_path / "service.onnx"
    service_model.write_bytes(merged.content)
    cli_model = tmp_path / "cli.onnx"
    # BLAS thread counts change float summation order (about 1e-5 on these logits): run the CLI with the
    # thread settings the service's workers use, so both compute the very same merge.
    threads = client.get("/v1/info").json()["worker_threads"]
    result = subprocess.run(
        [sys.executable, "-m", "onnxzip.cli", "merge", str(MLP / "a.onnx"), str(MLP / "b.onnx"), "--calibration",
         str(MLP / "calib.npz"), "--out", str(cli_model), "--share", "1.0", "--tasks", "digit,mod4", "--quiet"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **threads})
    assert result.returncode == 0, result.stderr
    with np.load(MLP / "test.npz") as f:
        feeds = {"input": f["input"]}
    got, want = run(service_model, feeds), run(cli_model, feeds)
    assert set(got) == set(want) == {"digit/logits", "mod4/logits"}
    for name in want:
        assert np.max(np.abs(got[name] - want[name])) <= 1e-6, name


def test_same_idempotency_key_and_payload_returns_the_same_job(client):
    """Replaying a submission with its Idempotency-Key returns the first job; a different payload with the
    same key is refused with 422; a new key makes a new job."""
    first = submit(client, key="pipeline-run-17", options='{"share": 0.5}')
    assert first.status_code == 202, first.text
    replay = submit(client, key="pipeline-run-17", options='{ "share" : 0.5 }')  # same options, other spelling
    assert replay.status_code == 202
    assert replay.json()["id"] == first.json()["id"]
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.headers["location"] == first.headers["location"]
    other_options = submit(client, key="pipeline-run-17", options='{"share": 0.25}')
    assert_error(other_options, 422, "idempotency_key_reused", "pipeline-run-17", "new key")
    data = (MLP / "a.onnx").read_bytes()
    other_files = submit(client, key="pipeline-run-17", options='{"share": 0.5}', models=[data, data])
    assert_error(other_files, 422, "idempotency_key_reused")
    fresh = submit(client, key="pipeline-run-18", options='{"share": 0.5}')
    assert fresh.status_code == 202 and fresh.json()["id"] != first.json()["id"]
    for job_id in (first.json()["id"], fresh.json()["id"]):
        assert wait_job(client, job_id)["status"] == "succeeded"
    listed = client.get("/v1/merges", params={"limit": 100}).json()["items"]
    assert sum(j["id"] == first.json()["id"] for j in listed) == 1


def test_cancelling_a_running_job_ends_it_and_its_worker_process(client, server):
    """POST cancel on a running merge: `cancelled` within a few seconds (cancel_grace_s = 2), the worker
    process that ran it is gone, a fresh one takes its place, and the next job succeeds."""
    job = submit(client, calibration=long_calibration(repeat=40), options='{"batch_size": 1}').json()
    running = wait_until(lambda: (j := client.get(f"/v1/merges/{job['id']}").json())["stage"] == "merge" and j,
                         60, what="the merge stage")
    pid = running["worker_pid"]
    assert pid in worker_pids(server.proc.pid)
    asked = time.monotonic()
    response = client.post(f"/v1/merges/{job['id']}/cancel")
    assert response.status_code == 202 and response.json()["cancel_requested"] is True
    done = wait_job(client, job["id"], timeout=15)
    took = time.monotonic() - asked
    assert done["status"] == "cancelled", done
    assert done["error"]["code"] == "cancelled" and done["artifacts"] == []
    assert took < 2 + 4, f"cancel took {took:.1f} s"
    wait_until(lambda: not pid_alive(pid), 5, what=f"worker {pid} to exit")
    wait_until(lambda: len(worker_pids(server.proc.pid)) == 2, 30, what="a fresh worker")
    assert client.post(f"/v1/merges/{job['id']}/cancel").status_code == 200  # cancelling again: no-op
    assert_error(client.get(f"/v1/merges/{job['id']}/artifacts/merged.onnx"), 409, "no_artifacts", "cancelled")
    assert not list((server.data_dir / "jobs" / job["id"]).glob("work-*"))
    assert wait_job(client, submit(client).json()["id"])["status"] == "succeeded"


def test_queued_job_cancels_at_once_and_delete_removes_everything(client, server):
    """With both workers busy a new job waits: cancel makes it `cancelled` at once (200). DELETE removes
    record and files (204), also of a running job, which it cancels first and says so (200), whose
    worker then stops."""
    busy = [submit(client, calibration=long_calibration(), options=LONG_OPTIONS).json() for _ in range(2)]
    waiting = submit(client).json()
    cancelled = client.post(f"/v1/merges/{waiting['id']}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled" and cancelled.json()["started_at"] is None
    running = wait_until(lambda: (j := client.get(f"/v1/merges/{busy[0]['id']}").json())["status"] == "running"
                         and j, 60, what="a running job")
    deleted = client.delete(f"/v1/merges/{busy[0]['id']}")  # running: cancelled first, and it says so
    assert deleted.status_code == 200, deleted.text
    assert deleted.json()["cancelled_run"] is True and "was running" in deleted.json()["message"]
    assert_error(client.get(f"/v1/merges/{busy[0]['id']}"), 404, "not_found")
    assert_error(client.delete(f"/v1/merges/{busy[0]['id']}"), 404, "not_found")
    wait_until(lambda: not pid_alive(running["worker_pid"]), 10, what="the deleted job's worker to stop")
    assert not (server.data_dir / "jobs" / busy[0]["id"]).exists()
    assert wait_job(client, busy[1]["id"])["status"] == "succeeded"
    assert client.delete(f"/v1/merges/{busy[1]['id']}").status_code == 204
    assert client.delete(f"/v1/merges/{waiting['id']}").status_code == 204
    wait_until(lambda: len(worker_pids(server.proc.pid)) == 2, 30, what="the pool to be full again")


def test_fifty_concurrent_submissions_all_complete_once(client):
    """50 small merges submitted at once: 50 distinct jobs, each succeeds exactly once, each artifact is
    its own job's (outputs named by that job's tasks), and the cursor pages list every one exactly once."""
    def one(i: int):
        tasks = [f"t{i}a", f"t{i}b"]
        response = submit(client, options=json.dumps({"tasks": tasks}))
        assert response.status_code == 202, response.text
        return response.json()["id"], tasks

    with ThreadPoolExecutor(max_workers=50) as pool:
        submitted = list(pool.map(one, range(50)))
    ids = [job_id for job_id, _ in submitted]
    assert len(set(ids)) == 50
    deadline = time.monotonic() + 180
    pending = set(ids)
    while pending and time.monotonic() < deadline:
        page = client.get("/v1/merges", params={"limit": 100, "status": "succeeded"}).json()["items"]
        pending -= {j["id"] for j in page}
        if pending:
            failed = [j for j in client.get("/v1/merges", params={"limit": 100}).json()["items"]
                      if j["id"] in pending and j["status"] in ("failed", "cancelled")]
            assert not failed, failed
            time.sleep(0.5)
    assert not pending, f"{len(pending)} jobs did not finish"

    for job_id, tasks in submitted:
        job = client.get(f"/v1/merges/{job_id}").json()
        assert job["status"] == "succeeded" and job["attempts"] == 1
        model = onnx.load_from_string(client.get(f"/v1/merges/{job_id}/artifacts/merged.onnx").content)
        assert sorted(o.name for o in model.graph.output) == [f"{tasks[0]}/logits", f"{tasks[1]}/logits"]
        statuses = [e["status"] for e in client.get(f"/v1/merges/{job_id}/events").json() if e["type"] == "status"]
        assert statuses == ["queued", "running", "succeeded"], statuses

    seen, cursor = [], None
    while True:
        params = {"limit": 7, "status": "succeeded", **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/merges", params=params).json()
        assert len(page["items"]) <= 7
        seen += [j["id"] for j in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)), "no job twice across pages"
    assert set(ids) <= set(seen)
    created = [client.get(f"/v1/merges/{i}").json()["created_at"] for i in seen[:10]]
    assert created == sorted(created, reverse=True), "newest first"


# --- trust: what the job says about the model it made -------------------------------------------------------

def test_a_finished_job_carries_fidelity_bounds_and_warnings(client):
    """Few calibration samples still merge, but the job says so: warnings, and fidelity 'not measured'
    with the sample count rather than a figure from a handful of samples."""
    with np.load(MLP / "calib.npz") as f:
        few = npz_bytes(**{k: v[:40] for k, v in f.items()})
    done = wait_job(client, submit(client, calibration=few).json()["id"])
    assert done["status"] == "succeeded", done
    result = done["result"]
    assert any("only 32 calibration samples fit the merge" in w for w in result["warnings"])
    assert any("fidelity not measured" in w for w in result["warnings"])
    assert result["fidelity"]["a"]["samples"] == 8 and result["fidelity"]["a"]["measured"] is False
    assert result["fidelity"]["a"]["top1_agreement"] is None
    full = wait_job(client, submit(client).json()["id"])
    fid = full["result"]["fidelity"]["b"]
    assert fid["measured"] and fid["samples"] == 102 and fid["confidence"] == 0.95
    assert fid["top1_agreement_lower"] < fid["top1_agreement"] and fid["rel_err_upper"] > fid["rel_err"]
    assert full["result"]["macs_ratio"] > 1.9 and full["result"]["shared_macs_fraction"] > 0.9


def test_a_missed_fidelity_gate_fails_the_job_and_keeps_its_reports(client):
    """require_agreement above what 102 held-out samples can show: failed, fidelity_not_met, the reports
    downloadable, no merged model published."""
    job = submit(client, options=json.dumps({"require_agreement": 0.999})).json()
    done = wait_job(client, job["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "fidelity_not_met", done
    assert "task a" in done["error"]["message"] and "lower bound" in done["error"]["message"]
    assert sorted(a["name"] for a in done["artifacts"]) == ["report.html", "report.json"]
    report = client.get(f"/v1/merges/{job['id']}/artifacts/report.json")
    assert report.status_code == 200 and report.json()["fidelity"]["a"]["samples"] == 102
    assert done["result"]["fidelity"]["a"]["top1_agreement_lower"] < 0.999
    assert_error(client.get(f"/v1/merges/{job['id']}/artifacts/merged.onnx"), 404, "not_found", "only its reports")


def test_calibration_that_overflows_fails_the_job_with_nothing_published(client):
    with np.load(MLP / "calib.npz") as f:
        huge = npz_bytes(**{k: v * 1e18 for k, v in f.items()})
    done = wait_job(client, submit(client, calibration=huge).json()["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "non_finite_result", done
    assert "overflow" in done["error"]["message"] and done["artifacts"] == []


@pytest.mark.skipif(__import__("importlib").util.find_spec("torch") is None, reason="needs the distill extra")
def test_a_job_can_distill_and_says_which_weights_it_kept(client):
    options = json.dumps({"distill": True, "distill_steps": 40})
    done = wait_job(client, submit(client, options=options).json()["id"])
    assert done["status"] == "succeeded", done
    assert done["result"]["distilled"] in ("distilled", "closed-form")
    report = client.get(f"/v1/merges/{done['id']}/artifacts/report.json").json()
    assert report["distill"]["steps"] == 40 and report["distill"]["kept"] == done["result"]["distilled"]
