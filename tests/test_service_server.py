"""The merge service as its operators meet it: a real `onnxzip serve` on 127.0.0.1, spoken to over HTTP.

This module holds the `Server` helper the other test_service_* modules use, and the checks about the
process itself: health and info, bearer-token auth, upload limits, retention, clean shutdown.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import httpx
import numpy as np
import pytest

from conftest import ROOT, case

MLP = case("mlp_legacy")
TERMINAL = {"succeeded", "failed", "cancelled"}


# --- the helper -------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pid_alive(pid: int) -> bool:
    """Running and not a zombie (an exited orphan may wait a while to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return False


def children(pid: int) -> list[int]:
    """Live child processes of `pid`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
                found.append(int(entry))
    return found


def worker_pids(pid: int) -> list[int]:
    """The merge worker processes among `pid`'s children (multiprocessing's resource tracker is not one)."""
    pids = []
    for child in children(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if b"spawn_main" in cmdline:
            pids.append(child)
    return pids


def wait_until(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


class Server:
    """`python -m onnxzip.cli serve` in a subprocess, with ONNXZIP_* settings from keyword arguments."""

    def __init__(self, data_dir: Path, **settings):
        self.data_dir = Path(data_dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.settings = {"workers": 2, **settings}
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = self.data_dir.parent / f"server-{self.port}.log"

    def start(self, timeout: float = 90.0, ready: bool = True) -> "Server":
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.update({f"ONNXZIP_{k.upper()}": str(v) for k, v in self.settings.items()})
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "onnxzip.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
             "--data-dir", str(self.data_dir)], stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        headers = self.auth_headers()

        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                path = "/readyz" if ready else "/healthz"
                return httpx.get(self.url + path, headers=headers, timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(up, timeout, 0.2, "the server to answer")
        return self

    def auth_headers(self) -> dict:
        token = self.settings.get("api_token")
        return {"Authorization": f"Bearer {token}"} if token else {}

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60.0, headers=self.auth_headers(), **kwargs)

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, as an orchestrator stops it; returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        workers = worker_pids(self.proc.pid)
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"server did not stop within {timeout} s of SIGTERM:\n{self.log_text()[-3000:]}")
        wait_until(lambda: not any(pid_alive(p) for p in workers), 10, what="workers to exit with the server")
        self.log.close()
        return code

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.log.close()


def start_server(tmp_path_factory, name: str, **settings) -> Server:
    return Server(tmp_path_factory.mktemp(name) / "data", **settings).start()


# --- shared helpers for submitting jobs -----------------------------------------------------------------

def fixture_files(folder: Path = MLP) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in ("a.onnx", "b.onnx", "calib.npz")}


def submit(client: httpx.Client, *, models=None, calibration=None, options=None, key=None, folder=MLP,
           names=("a.onnx", "b.onnx", "calib.npz")) -> httpx.Response:
    files = fixture_files(folder)
    models = models if models is not None else [files["a.onnx"], files["b.onnx"]]
    calibration = calibration if calibration is not None else files["calib.npz"]
    parts = [("models", (names[i], data, "application/octet-stream")) for i, data in enumerate(models)]
    parts.append(("calibration", (names[-1], calibration, "application/octet-stream")))
    data = {"options": options} if options is not None else {}
    headers = {"Idempotency-Key": key} if key else {}
    return client.post("/v1/merges", files=parts, data=data, headers=headers)


def wait_job(client: httpx.Client, job_id: str, statuses=TERMINAL, timeout: float = 120.0) -> dict:
    def poll():
        job = client.get(f"/v1/merges/{job_id}").json()
        return job if job["status"] in statuses else None

    return wait_until(poll, timeout, 0.1, f"job {job_id} to reach {sorted(statuses)}")


def npz_bytes(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def long_calibration(folder: Path = MLP, repeat: int = 40) -> bytes:
    """The case's calibration repeated (mlp_legacy x 40: 20480 samples, 5 MB): with a small batch_size
    (LONG_OPTIONS) the merge takes seconds, with several stage boundaries on the way."""
    with np.load(folder / "calib.npz") as f:
        return npz_bytes(**{k: np.concatenate([v] * repeat) for k, v in f.items()})


LONG_OPTIONS = '{"batch_size": 4}'


def assert_error(response: httpx.Response, status: int, code: str, *needles: str) -> dict:
    """A refusal: the status, the JSON error shape, the code, and a message naming what to fix."""
    assert response.status_code == status, f"{response.status_code} {response.text}"
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body
    for needle in needles:
        assert needle.lower() in body["error"]["message"].lower(), f"{needle!r} not in {body['error']['message']!r}"
    return body["error"]


# --- the process ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    server = start_server(tmp_path_factory, "plain", workers=1)
    yield server
    server.stop()


def test_health_ready_and_info_describe_the_running_service(plain):
    """/healthz is alive, /readyz checks store, workers and providers, /v1/info names versions and opsets."""
    with plain.client() as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        ready = c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["ready"] is True
        assert ready.json()["checks"]["store"] == "ok"
        assert ready.json()["checks"]["workers"] == "1 of 1 alive"
        assert "CPUExecutionProvider" in ready.json()["checks"]["providers"]
        info = c.get("/v1/info").json()
        import onnx
        import onnxruntime

        assert info["versions"]["onnx"] == onnx.__version__
        assert info["versions"]["onnxruntime"] == onnxruntime.__version__
        assert info["opsets"]["emitted"] == "the inputs' opset, kept"
        assert "CPUExecutionProvider" in info["providers"]
        assert info["workers"] == 1
        docs = c.get("/openapi.json").json()
        assert {"/v1/merges", "/v1/merges/{job_id}", "/v1/merges/{job_id}/events",
                "/v1/merges/{job_id}/artifacts/{name}", "/healthz", "/readyz", "/v1/info"} <= set(docs["paths"])
        assert docs["components"]["schemas"]["JobPublic"].get("examples")
        assert c.get("/docs").status_code == 200


def test_sigterm_stops_the_workers_and_requeues_nothing_lost(tmp_path_factory):
    """An orderly stop ends every worker process with the server; a job it was running is queued again
    without spending an attempt, and the next start finishes it."""
    server = start_server(tmp_path_factory, "sigterm", workers=1)
    with server.client() as c:
        job = submit(c, calibration=long_calibration(), options=LONG_OPTIONS).json()
        wait_until(lambda: c.get(f"/v1/merges/{job['id']}").json()["stage"] == "merge", 60, what="merge stage")
        workers = worker_pids(server.proc.pid)
        assert len(workers) == 1
    assert server.stop() in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after its orderly shutdown
    assert "Application shutdown complete" in server.log_path.read_text()
    assert not any(pid_alive(p) for p in workers)
    server.start()
    try:
        with server.client() as c:
            done = wait_job(c, job["id"], timeout=120)
            assert done["status"] == "succeeded", done
            assert done["attempts"] == 1, "an orderly shutdown must not cost the job an attempt"
            messages = [e["message"] for e in c.get(f"/v1/merges/{job['id']}/events").json()]
            assert any("shut down" in m for m in messages), messages
    finally:
        server.stop()


def test_bearer_token_guards_everything_but_healthz(tmp_path_factory):
    """With ONNXZIP_API_TOKEN set: no token or a wrong one -> 401 with the error shape; the token -> 2xx."""
    server = start_server(tmp_path_factory, "auth", workers=1, api_token="s3cret-token")
    try:
        bare = httpx.Client(base_url=server.url, timeout=30)
        assert bare.get("/healthz").status_code == 200
        for method, path in [("GET", "/v1/merges"), ("GET", "/v1/info"), ("GET", "/readyz"), ("GET", "/docs"),
                             ("GET", "/openapi.json"), ("GET", "/v1/merges/0123"), ("POST", "/v1/merges")]:
            response = bare.request(method, path)
            assert_error(response, 401, "unauthorized", "Authorization: Bearer")
            assert response.headers["www-authenticate"] == "Bearer"
        wrong = bare.get("/v1/merges", headers={"Authorization": "Bearer nope"})
        assert_error(wrong, 401, "unauthorized", "not this service's")
        for scheme in ("bearer", "BEARER"):  # RFC 7235: the scheme is case-insensitive
            assert bare.get("/v1/merges", headers={"Authorization": f"{scheme} s3cret-token"}).status_code == 200
        assert_error(bare.get("/v1/merges", headers={"Authorization": "Basic s3cret-token"}), 401, "unauthorized")
        assert_error(submit(bare), 401, "unauthorized")
        with server.client() as c:
            assert c.get("/v1/merges").status_code == 200
            job = submit(c)
            assert job.status_code == 202, job.text
            done = wait_job(c, job.json()["id"])
            assert done["status"] == "succeeded", done
            assert c.get(done["artifacts"][0]["url"]).status_code == 200
        bare.close()
    finally:
        server.stop()


def test_unknown_hosts_and_other_web_origins_are_refused_before_the_body(tmp_path_factory):
    """Hardening by default (issue 16): a Host header outside ONNXZIP_ALLOWED_HOSTS is a 400 (DNS
    rebinding), a request a browser sends from another origin a 403 (no job made); listed origins get
    CORS headers, preflight included; uploads spool inside the data dir."""
    server = start_server(tmp_path_factory, "hosts", workers=0)
    try:
        with server.client() as c:
            assert_error(c.get("/v1/merges", headers={"Host": "evil.example"}), 400, "invalid_host",
                         "evil.example", "ONNXZIP_ALLOWED_HOSTS")
            assert c.get("/v1/merges", headers={"Host": f"localhost:{server.port}"}).status_code == 200
            assert c.get("/healthz", headers={"Host": "evil.example"}).status_code == 200  # probes by any name
            before = c.get("/v1/merges").json()["items"]
            refused = submit(httpx.Client(base_url=server.url, timeout=30, headers={"Origin": "https://evil.example"}))
            assert_error(refused, 403, "cross_origin_refused", "https://evil.example", "ONNXZIP_CORS_ORIGINS")
            assert c.get("/v1/merges").json()["items"] == before
        assert (server.data_dir / "tmp").is_dir()
    finally:
        server.stop()
    app = "https://app.example"
    server = start_server(tmp_path_factory, "cors", workers=0, cors_origins=json.dumps([app]),
                          allowed_hosts=json.dumps(["127.0.0.1", "onnxzip.internal"]), api_token="tok")
    try:
        with server.client() as c:
            ok = c.get("/v1/merges", headers={"Origin": app})
            assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == app
            preflight = httpx.options(server.url + "/v1/merges", headers={
                "Origin": app, "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization"})
            assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == app
            assert c.get("/v1/merges", headers={"Host": "onnxzip.internal"}).status_code == 200
            assert_error(c.get("/v1/merges", headers={"Host": "localhost"}), 400, "invalid_host")
    finally:
        server.stop()


def test_listening_beyond_loopback_without_a_token_warns_at_start(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "onnxzip.cli", "serve", "--host", "0.0.0.0", "--port", str(port),
                             "--data-dir", str(tmp_path / "data")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "ONNXZIP_WORKERS": "0"}, cwd=ROOT, text=True)
    def answered():
        if proc.poll() is not None:
            return True
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(answered, 60, 0.2, "the server to answer")
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=30)[0]
    assert "without ONNXZIP_API_TOKEN" in output and "0.0.0.0" in output, output[-2000:]


def test_upload_limits_answer_413_and_the_service_stays_up(tmp_path_factory):
    """Total body (declared, or streamed without Content-Length), one model, the calibration's file and its
    declared uncompressed size: each over its limit is refused with a message naming the setting."""
    files = fixture_files()
    total = sum(len(v) for v in files.values())
    server = start_server(tmp_path_factory, "limits", workers=1, max_upload_bytes=total + 200_000,
                          max_model_bytes=len(files["a.onnx"]) + 1000, max_calibration_bytes=200_000)
    try:
        with server.client() as c:
            big = long_calibration(MLP, 4)  # 524 kB: the whole body is over the total limit
            assert_error(submit(c, calibration=big), 413, "too_large", "ONNXZIP_MAX_UPLOAD_BYTES")
            # the same body streamed in chunks, without Content-Length: counted as it arrives
            request = c.build_request("POST", "/v1/merges", files=[
                ("models", ("a.onnx", files["a.onnx"])), ("models", ("b.onnx", files["b.onnx"])),
                ("calibration", ("calib.npz", big))])
            body = request.read()
            headers = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}
            streamed = c.post("/v1/merges", content=(body[i:i + 16384] for i in range(0, len(body), 16384)),
                              headers=headers)
            assert "content-length" not in {k.lower() for k in streamed.request.headers}
            assert_error(streamed, 413, "too_large", "ONNXZIP_MAX_UPLOAD_BYTES")
            padded = files["a.onnx"] + b"\0" * 2000  # one model over its limit, the body under the total
            assert_error(submit(c, models=[padded, files["b.onnx"]]), 413, "too_large", "a.onnx",
                         "ONNXZIP_MAX_MODEL_BYTES")
            with np.load(MLP / "calib.npz") as f:
                x = f["input"]
            stored = npz_bytes(input=np.concatenate([x[:400]] * 2))  # 205 kB file: over 200 kB as sent
            assert_error(submit(c, calibration=stored), 413, "too_large", "calib.npz",
                         "ONNXZIP_MAX_CALIBRATION_BYTES")
            buffer = io.BytesIO()
            np.savez_compressed(buffer, input=np.zeros((1000, 64), np.float32))  # declares 256 kB, sends 1 kB
            assert len(buffer.getvalue()) < 20_000
            assert_error(submit(c, calibration=buffer.getvalue()), 422, "invalid_calibration", "calib.npz",
                         "more than 200000 bytes")
            assert c.get("/healthz").status_code == 200
            done = wait_job(c, submit(c).json()["id"])
            assert done["status"] == "succeeded", done
        assert server.proc.poll() is None
    finally:
        server.stop()


def test_finished_jobs_expire_after_the_retention_time(tmp_path_factory):
    """A finished job's record, inputs and artifacts are deleted once retention_hours have passed."""
    server = start_server(tmp_path_factory, "retention", workers=1, retention_hours=2 / 3600)  # 2 s
    try:
        with server.client() as c:
            job = submit(c).json()
            done = wait_job(c, job["id"])
            assert done["status"] == "succeeded"
            folder = server.data_dir / "jobs" / job["id"]
            assert (folder / "artifacts" / "merged.onnx").is_file()
            wait_until(lambda: c.get(f"/v1/merges/{job['id']}").status_code == 404, 20, what="the job to expire")
            assert not folder.exists()
            assert_error(c.get(done["artifacts"][0]["url"]), 404, "not_found")
    finally:
        server.stop()


def test_a_job_over_the_time_limit_fails_with_timeout_and_its_worker_is_replaced(tmp_path_factory):
    """job_timeout_s = 1.5 against a merge of several seconds: `failed` with code `timeout` naming the
    setting, the worker process that ran it is gone, and a fresh one takes the next job."""
    server = start_server(tmp_path_factory, "timeout", workers=1, job_timeout_s=1.5)
    try:
        with server.client() as c:
            job = submit(c, calibration=long_calibration(), options='{"batch_size": 1}').json()
            running = wait_until(lambda: (j := c.get(f"/v1/merges/{job['id']}").json())["status"] == "running"
                                 and j, 60, what="the job to run")
            done = wait_job(c, job["id"], timeout=15)
            assert done["status"] == "failed", done
            assert done["error"]["code"] == "timeout" and "ONNXZIP_JOB_TIMEOUT_S" in done["error"]["message"]
            wait_until(lambda: not pid_alive(running["worker_pid"]), 5, what="the timed-out worker to exit")
            wait_until(lambda: len(worker_pids(server.proc.pid)) == 1, 30, what="a fresh worker")
    finally:
        server.stop()


def test_a_worker_started_with_the_servers_data_dir_flag_runs_its_jobs(tmp_path_factory):
    """Issue 15: `onnxzip serve --data-dir D` with no workers of its own and `onnxzip worker --data-dir D`
    (flags, no ONNXZIP_* variables) share the job store: the worker takes the job."""
    server = start_server(tmp_path_factory, "flags", workers=0)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONNXZIP_")}
    worker = subprocess.Popen([sys.executable, "-m", "onnxzip.cli", "worker", "--data-dir", str(server.data_dir),
                               "--workers", "1"], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        with server.client() as c:
            done = wait_job(c, submit(c).json()["id"], timeout=120)
            assert done["status"] == "succeeded", done
    finally:
        worker.send_signal(signal.SIGTERM)
        stderr = worker.communicate(timeout=30)[1]
        server.stop()
    assert str(server.data_dir) in stderr and "Traceback" not in stderr, stderr[-2000:]


def test_a_client_that_stalls_mid_request_is_disconnected_and_a_steady_one_is_not(tmp_path_factory):
    """Slow-loris: half a request line, or a body that stops coming, is closed after ONNXZIP_READ_TIMEOUT_S
    (1 s here); a client that keeps sending, however slowly, is answered."""
    server = start_server(tmp_path_factory, "slow", workers=1, read_timeout_s=1)
    try:
        def closed_after(first: bytes) -> float:
            with socket.create_connection(("127.0.0.1", server.port), timeout=15) as s:
                s.sendall(first)
                started = time.monotonic()
                try:
                    data = s.recv(65536)
                except ConnectionResetError:
                    data = b""
                assert data == b"", data[:200]  # nothing answered: just closed
                return time.monotonic() - started

        assert 0.8 < closed_after(b"GET /v1/merges HTTP/1.1\r\nHost: 127.0.0.1\r\n") < 10
        body_owed = (b"POST /v1/merges HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
                     b"boundary=x\r\nContent-Length: 100000\r\n\r\n--x\r\n")
        assert 0.8 < closed_after(body_owed) < 10
        with socket.create_connection(("127.0.0.1", server.port), timeout=15) as s:
            for piece in (b"GET /healthz HTTP/1.1\r\n", b"Host: 127.0.0.1\r\n", b"Connection: close\r\n", b"\r\n"):
                s.sendall(piece)
                time.sleep(0.6)  # 2.4 s in all, never 1 s silent
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        with server.client() as c:  # ordinary requests are untouched
            job = submit(c)
            assert job.status_code == 202 and wait_job(c, job.json()["id"])["status"] == "succeeded"
    finally:
        server.stop()
