"""Scale-out as it is deployed: a real redis-server, an API that merges nothing (`onnxzip serve`,
ONNXZIP_WORKERS=0), and `onnxzip worker` processes taking jobs through RQ, all on 127.0.0.1; artifacts on a
shared data dir, or on a real S3-compatible server (moto in server mode, a subprocess).

What is checked: 20 jobs through two workers all complete with artifacts that run; a worker killed with
SIGKILL (with its job's process) mid-merge leaves its job to the other worker (attempt 2); an API killed
and restarted mid-run loses nothing; an orderly worker stop hands its job back without spending an
attempt; with S3, the API streams back exactly the object the worker uploaded; /readyz and /v1/info name
the backends and say whether they answer.
"""

from __future__ import annotations

import hashlib
import time
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional

import httpx
import numpy as np
import pytest
import redis

from conftest import ROOT, run
from test_scaleout_store import redis_server  # noqa: F401 (the module's Redis, a fixture)
from test_service_server import (LONG_OPTIONS, MLP, Server, children, free_port, long_calibration, pid_alive, submit,
                                 wait_job, wait_until)

# Short leases so a silent worker is noticed in seconds; one BLAS thread per worker on 2 cores.
FAST = {"lease_s": 3, "heartbeat_s": 0.5, "cancel_grace_s": 2, "worker_threads": 1}
S3_ENV = {"AWS_ACCESS_KEY_ID": "onnxzip-test", "AWS_SECRET_ACCESS_KEY": "onnxzip-test-secret",
          "AWS_DEFAULT_REGION": "us-east-1"}


class QueueWorker:
    """`python -m onnxzip.cli worker` (one RQ worker) in a subprocess, ONNXZIP_* settings from keywords."""

    def __init__(self, log_dir: Path, name: str, **settings):
        self.log_path = Path(log_dir) / f"worker-{name}.log"
        self.settings = {"workers": 1, **settings}
        self.proc: Optional[subprocess.Popen] = None

    def start(self, redis_url: str, timeout: float = 60.0) -> "QueueWorker":
        env = {**os.environ, **S3_ENV, "PYTHONPATH": str(ROOT)}
        env.update({f"ONNXZIP_{k.upper()}": str(v) for k, v in self.settings.items()})
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "onnxzip.cli", "worker"], stdout=self.log,
                                     stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        client = redis.Redis.from_url(redis_url)

        def registered():
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            return any(client.exists(f"rq:worker:{os.uname().nodename}.{pid}") for pid in children(self.proc.pid))

        wait_until(registered, timeout, 0.1, "the RQ worker to register")
        return self

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def owns(self, pid: int) -> bool:
        """Is `pid` (a job's process) a descendant of this worker?"""
        return self.proc.pid in ancestors(pid)

    def kill_with(self, horse: int) -> list[int]:
        """SIGKILL this worker, its RQ worker process and the job process `horse`: a machine's sudden death."""
        victims = [self.proc.pid, *children(self.proc.pid), horse]
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        self.log.close()
        return victims

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        family = children(self.proc.pid)
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"worker did not stop within {timeout} s of SIGTERM:\n{self.log_text()[-3000:]}")
        wait_until(lambda: not any(pid_alive(p) for p in family), 10, what="the worker's processes to exit")
        self.log.close()
        return code


def ancestors(pid: int) -> list[int]:
    found = []
    while pid > 1:
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError):
            break
        found.append(pid)
    return found


def assert_runs(client: httpx.Client, job: dict) -> None:
    """The job's merged.onnx downloads whole (sha256 = its ETag) and runs in onnxruntime, both tasks."""
    response = client.get(f"/v1/merges/{job['id']}/artifacts/merged.onnx")
    assert response.status_code == 200, response.text
    meta = {a["name"]: a for a in job["artifacts"]}["merged.onnx"]
    assert hashlib.sha256(response.content).hexdigest() == meta["sha256"]
    assert response.headers["etag"] == f'"{meta["sha256"]}"'
    with np.load(MLP / "test.npz") as f:
        feeds = {"input": f["input"][:16]}
    outputs = run(_model(response.content), feeds)
    assert {name.split("/")[0] for name in outputs} == {"a", "b"}
    assert all(v.shape[0] == 16 and np.isfinite(v).all() for v in outputs.values())


def _model(data: bytes):
    import onnx

    return onnx.load_from_string(data)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, redis_server):  # noqa: F811
    """Redis, an API without workers and two queue workers sharing one data dir (the compose setup)."""
    root = tmp_path_factory.mktemp("cluster")
    settings = {"queue_url": redis_server.url, **FAST}
    api = Server(root / "data", **settings, workers=0).start()
    workers = [QueueWorker(root, name, data_dir=root / "data", **settings) for name in ("one", "two")]
    for worker in workers:
        worker.start(redis_server.url)
    yield api, workers
    for worker in workers:
        worker.stop()
    api.stop()


def test_twenty_jobs_a_killed_worker_and_a_restarted_api_lose_nothing(cluster, redis_server):  # noqa: F811
    """A long job is running when its worker and the job's process are SIGKILLed: the other worker runs
    it to success as attempt 2. Twenty small jobs go in around an API kill -9 and restart: every one
    succeeds once (one attempt), with artifacts that run."""
    api, workers = cluster
    with api.client() as c:
        long_job = submit(c, calibration=long_calibration(), options=LONG_OPTIONS).json()
        running = wait_until(lambda: (j := c.get(f"/v1/merges/{long_job['id']}").json())["stage"] == "merge" and j,
                             90, 0.05, "the long job to merge")
        horse = running["worker_pid"]
        victim = next(w for w in workers if w.owns(horse))
        survivor = next(w for w in workers if w is not victim)
        killed = victim.kill_with(horse)
        wait_until(lambda: not any(pid_alive(p) for p in killed), 10, what="the killed processes to be gone")

        def second_attempt():
            job = c.get(f"/v1/merges/{long_job['id']}").json()
            return job if job["attempts"] == 2 and job["status"] in ("running", "succeeded") else None

        again = wait_until(second_attempt, 30, 0.05, "the job to be requeued and taken again")
        assert again["worker_pid"] != horse
        if pid_alive(again["worker_pid"]):
            assert survivor.owns(again["worker_pid"]), "attempt 2 must run on the surviving worker"
        victim.start(redis_server.url)  # the machine comes back: it joins the queue again

        small = [submit(c).json()["id"] for _ in range(10)]
    api.kill()  # mid-run: jobs queued and running, none through this API any more
    api.start()
    with api.client() as c:
        small += [submit(c).json()["id"] for _ in range(10)]
        assert len(set(small)) == 20
        done = {job_id: wait_job(c, job_id, timeout=150) for job_id in [long_job["id"], *small]}
        failed = {k: v for k, v in done.items() if v["status"] != "succeeded"}
        assert not failed, failed
        assert all(v["result"]["fidelity"]["a"]["measured"] for v in done.values()), "the Redis store keeps results"
        assert done[long_job["id"]]["attempts"] == 2
        assert all(done[job_id]["attempts"] == 1 for job_id in small), "no small job may run twice"
        events = c.get(f"/v1/merges/{long_job['id']}/events").json()
        requeued = [e for e in events if e["type"] == "requeued"]
        assert len(requeued) == 1 and "gone" in requeued[0]["message"], requeued
        starts = [e for e in events if e["type"] == "status" and e["status"] == "running"]
        assert len(starts) == 2, "exactly two attempts started"
        for job_id in [long_job["id"], *small]:
            assert_runs(c, done[job_id])
        listed = c.get("/v1/merges", params={"status": "succeeded", "limit": 100}).json()["items"]
        assert {j["id"] for j in listed} >= set(small) | {long_job["id"]}
        assert c.get("/v1/merges", params={"status": "running"}).json()["items"] == []
        assert c.get("/v1/merges", params={"status": "queued"}).json()["items"] == []
    folder = api.data_dir / "jobs" / long_job["id"]
    kept = sorted(p.name for p in folder.iterdir())
    assert len(kept) == 2 and kept[0].startswith("attempt-") and kept[1] == "inputs", \
        f"only the winning attempt's artifacts stay: {kept}"
    merged = (folder / kept[0] / "merged.onnx").read_bytes()
    meta = {a["name"]: a for a in done[long_job["id"]]["artifacts"]}["merged.onnx"]
    assert hashlib.sha256(merged).hexdigest() == meta["sha256"]


def test_ready_and_info_name_redis_rq_and_the_shared_volume(cluster):
    """/readyz and /v1/info say which store, queue and artifact store this API uses, and that they answer."""
    api, workers = cluster
    with api.client() as c:
        ready = c.get("/readyz")
        assert ready.status_code == 200, ready.text
        checks = ready.json()["checks"]
        assert checks["store"] == "ok (redis)"
        assert checks["queue"].startswith("rq queue 'onnxzip':") and "registered" in checks["queue"]
        assert checks["artifacts"] == f"ok ({api.data_dir.resolve()})"
        assert "ONNXZIP_WORKERS=0" in checks["workers"]
        backend = c.get("/v1/info").json()["backend"]
        assert backend["store"] == {"kind": "redis", "namespace": "onnxzip", "queue": "rq", "queue_name": "onnxzip",
                                    "redis": api.settings["queue_url"], "answers": True}
        assert backend["artifacts"]["kind"] == "local" and backend["artifacts"]["answers"] is True
        assert backend["artifacts"]["layout"] == "attempt-addressed"


def test_sigterm_on_a_busy_worker_hands_its_job_back_uncounted(cluster, redis_server):  # noqa: F811
    """An orderly stop of a worker mid-merge (docker stop, systemd) ends the job's process at once and
    queues the job again without spending an attempt; the other worker finishes it."""
    api, workers = cluster
    with api.client() as c:
        job = submit(c, calibration=long_calibration(), options=LONG_OPTIONS).json()
        running = wait_until(lambda: (j := c.get(f"/v1/merges/{job['id']}").json())["stage"] == "merge" and j,
                             90, 0.05, "the job to merge")
        stopping = next(w for w in workers if w.owns(running["worker_pid"]))
        assert stopping.stop() == 0
        assert not pid_alive(running["worker_pid"])
        done = wait_job(c, job["id"], timeout=90)
        assert done["status"] == "succeeded", done
        assert done["attempts"] == 1, "an orderly stop must not cost the job an attempt"
        requeued = [e for e in c.get(f"/v1/merges/{job['id']}/events").json() if e["type"] == "requeued"]
        assert len(requeued) == 1 and "shut down" in requeued[0]["message"], requeued
        assert_runs(c, done)
    stopping.start(redis_server.url)


def test_cancel_reaches_a_job_running_on_a_queue_worker(cluster):
    """POST /cancel on the API sets a flag in Redis; the worker's job process sees it at its next heartbeat
    and stops between stages: `cancelled` within seconds, and the job's process is gone."""
    api, workers = cluster
    with api.client() as c:
        job = submit(c, calibration=long_calibration(), options=LONG_OPTIONS).json()
        running = wait_until(lambda: (j := c.get(f"/v1/merges/{job['id']}").json())["stage"] == "merge" and j,
                             90, 0.05, "the job to merge")
        assert c.post(f"/v1/merges/{job['id']}/cancel").status_code == 202
        done = wait_job(c, job["id"], timeout=15)
        assert done["status"] == "cancelled" and done["error"]["code"] == "cancelled", done
        wait_until(lambda: not pid_alive(running["worker_pid"]), 10, what="the job's process to exit")
        assert done["attempts"] == 1 and done["artifacts"] == []


def test_an_unreachable_redis_makes_the_api_unready_not_broken(tmp_path):
    """With Redis down the API still starts and answers: /healthz 200, /readyz 503 naming the store,
    /v1/info says it does not answer, a submission gets 503 `unavailable` (retry later), not a 500."""
    dead = f"redis://127.0.0.1:{free_port()}/0"
    api = Server(tmp_path / "data", queue_url=dead, workers=0).start(ready=False)
    try:
        with api.client() as c:
            assert c.get("/healthz").status_code == 200
            ready = c.get("/readyz")
            assert ready.status_code == 503 and ready.json()["ready"] is False
            assert ready.json()["checks"]["store"].startswith("redis not writable: ConnectionError")
            assert ready.json()["checks"]["artifacts"].startswith("ok")
            store = c.get("/v1/info").json()["backend"]["store"]
            assert store["answers"] is False and store["redis"] == dead
            refused = submit(c)
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "unavailable" and refused.headers["retry-after"] == "5"
            assert c.get("/v1/merges").status_code == 503
        assert api.proc.poll() is None
    finally:
        api.stop()


class MotoServer:
    """moto's S3-compatible HTTP server on 127.0.0.1 (`python -m moto.server`), in a subprocess."""

    def __init__(self, log_dir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_dir) / "moto.log"

    def start(self) -> "MotoServer":
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **S3_ENV})

        def answers():
            if self.proc.poll() is not None:
                raise AssertionError(f"moto exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            try:
                return httpx.get(self.url + "/", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(answers, 30, 0.1, "the S3 server to answer")
        return self

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name=S3_ENV["AWS_DEFAULT_REGION"],
                            aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def test_artifacts_on_s3_stream_back_exactly_what_the_worker_uploaded(tmp_path, redis_server):  # noqa: F811
    """API and worker share no disk, only Redis and the bucket: inputs reach the worker through S3, the
    worker (forking a process per job) uploads the artifacts under its attempt, and the API streams
    merged.onnx back byte for byte (sha256 = ETag = the object's own sha256). Deleting the job empties
    its prefix. A separate queue name keeps this deployment apart from the other one on the same Redis."""
    moto = MotoServer(tmp_path).start()
    s3 = moto.client()
    s3.create_bucket(Bucket="onnxzip-artifacts")
    settings = {"queue_url": redis_server.url, "queue_name": "s3-deploy", "s3_bucket": "onnxzip-artifacts",
                "s3_endpoint_url": moto.url, "s3_prefix": "merges/", "s3_region": "us-east-1", **FAST}
    old_env = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(S3_ENV)  # the API subprocess inherits them: credentials as AWS tools read them
    api = worker = None
    try:
        api = Server(tmp_path / "api-data", **settings, workers=0).start()
        worker = QueueWorker(tmp_path, "s3", data_dir=tmp_path / "worker-data", job_start="fork",
                             **settings).start(redis_server.url)
        with api.client() as c:
            ready = c.get("/readyz").json()
            assert ready["checks"]["artifacts"] == "ok (s3://onnxzip-artifacts/merges/)", ready
            assert ready["checks"]["queue"].startswith("rq queue 's3-deploy'")
            artifacts = c.get("/v1/info").json()["backend"]["artifacts"]
            assert artifacts == {"kind": "s3", "bucket": "onnxzip-artifacts", "prefix": "merges/",
                                 "endpoint": moto.url, "region": "us-east-1", "answers": True}
            job = submit(c).json()
            done = wait_job(c, job["id"], timeout=90)
            assert done["status"] == "succeeded", done
            assert_runs(c, done)
            meta = {a["name"]: a for a in done["artifacts"]}
            keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="onnxzip-artifacts")["Contents"])
            prefix = f"merges/jobs/{job['id']}/"
            inputs = [prefix + f"inputs/{n}" for n in ("calibration.npz", "model-0.onnx", "model-1.onnx")]
            attempt = [k for k in keys if k.startswith(prefix + "attempts/")]
            assert keys == sorted(inputs + attempt) and len(attempt) == 3, keys
            uploaded = s3.get_object(Bucket="onnxzip-artifacts", Key=next(k for k in attempt if k.endswith(".onnx")))
            body = uploaded["Body"].read()
            assert uploaded["Metadata"]["sha256"] == hashlib.sha256(body).hexdigest() == meta["merged.onnx"]["sha256"]
            assert c.get(meta["merged.onnx"]["url"]).content == body
            report = c.get(meta["report.json"]["url"])
            assert report.headers["content-type"] == "application/json" and report.json()["totals"]
            head = c.head(meta["merged.onnx"]["url"])
            assert head.status_code == 200 and head.content == b""
            assert head.headers["content-length"] == str(len(body))
            assert head.headers["etag"] == f'"{meta["merged.onnx"]["sha256"]}"'
            assert "attachment" in head.headers["content-disposition"]
            assert c.get(meta["merged.onnx"]["url"], headers={"If-None-Match": head.headers["etag"]}).status_code == 304
            for data_dir in (tmp_path / "api-data", tmp_path / "worker-data"):
                assert list((data_dir / "jobs").iterdir()) == [], "no job files on local disk with S3"
            assert c.delete(f"/v1/merges/{job['id']}").status_code == 204
            assert "Contents" not in s3.list_objects_v2(Bucket="onnxzip-artifacts", Prefix=prefix)
            # a missed gate on this deployment: the reports are uploaded and served, no model is
            gated = wait_job(c, submit(c, options='{"require_agreement": 0.999}').json()["id"], timeout=90)
            assert gated["status"] == "failed" and gated["error"]["code"] == "fidelity_not_met", gated
            assert sorted(a["name"] for a in gated["artifacts"]) == ["report.html", "report.json"]
            served = c.get(f"/v1/merges/{gated['id']}/artifacts/report.json")
            assert served.status_code == 200 and served.json()["fidelity"]["a"]["top1_agreement_lower"] < 0.999
            assert gated["result"]["fidelity"]["a"]["samples"] == 102
    finally:
        for process in (worker, api):
            if process is not None:
                process.stop()
        moto.stop()
        for key, value in old_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_a_redis_restart_mid_merge_costs_the_job_nothing(tmp_path):
    """Issue 16: Redis (with its append-only file, as in the compose setup) restarts while a merge runs on
    a queue worker: the merge goes on, its result is written once Redis is back, on attempt 1."""
    from test_scaleout_store import RedisServer

    store = RedisServer(tmp_path / "redis", persistent=True).start()
    settings = {"queue_url": store.url, **FAST, "lease_s": 30}
    api = Server(tmp_path / "data", **settings, workers=0).start()
    worker = QueueWorker(tmp_path, "one", data_dir=tmp_path / "data", **settings).start(store.url)
    try:
        with api.client() as c:
            job = submit(c, calibration=long_calibration(), options=LONG_OPTIONS).json()
            running = wait_until(lambda: (j := c.get(f"/v1/merges/{job['id']}").json())["stage"] == "merge" and j,
                                 90, 0.05, "the job to merge")
            store.stop()
            time.sleep(3)  # Redis is down: the merge runs on
            assert pid_alive(running["worker_pid"]), "the merge must survive the outage"
            store.start()
            done = wait_job(c, job["id"], timeout=120)
            assert done["status"] == "succeeded", done
            assert done["attempts"] == 1, done
            assert_runs(c, done)
    finally:
        worker.stop()
        api.stop()
        store.stop()
