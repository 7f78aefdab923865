"""Fault storm: many concurrent jobs while the server and its workers are killed (-9) again and again.

    python tests/benchmarks/bench_faults.py [--jobs 200] [--server-kills 8] [--worker-kills 8] [--workers 2]

A real `onnxzip serve` (SQLite store, spawned workers) on 127.0.0.1 with a fresh data dir takes --jobs
small merges (the committed mlp_legacy pair), submitted at once from 16 client threads, each with its
own Idempotency-Key; a client that loses its connection or gets a 503 retries with the same key, as a
pipeline would. Meanwhile the server is killed with SIGKILL --server-kills times (restarted on the same
data dir each time) and a worker process --worker-kills times. At the end every key must name exactly
one job, every job must have succeeded, and a kill of the server must have cost no job an attempt.
Prints a markdown table; exit status 1 if any job was lost, duplicated or failed.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from test_service_server import TERMINAL, Server, fixture_files, wait_until, worker_pids  # noqa: E402


def submit_until_accepted(url: str, key: str, files: dict, stop_at: float) -> str:
    """POST with the key until the service answers 202 (a dead server or a 503 is retried)."""
    parts = [("models", ("a.onnx", files["a.onnx"])), ("models", ("b.onnx", files["b.onnx"])),
             ("calibration", ("calib.npz", files["calib.npz"]))]
    while time.monotonic() < stop_at:
        try:
            response = httpx.post(url + "/v1/merges", files=parts, headers={"Idempotency-Key": key}, timeout=30)
            if response.status_code == 202:
                return response.json()["id"]
            if response.status_code not in (502, 503, 504):
                raise RuntimeError(f"{key}: {response.status_code} {response.text[:300]}")
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{key}: not accepted before the deadline")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--server-kills", type=int, default=8)
    parser.add_argument("--worker-kills", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    files = fixture_files()
    data = Path(tempfile.mkdtemp(prefix="onnxzip-storm-")) / "data"
    server = Server(data, workers=args.workers).start()
    started = time.monotonic()
    deadline = started + 3600
    keys = [f"storm-{i}" for i in range(args.jobs)]
    accepted: dict[str, str] = {}
    lock = threading.Lock()

    def client(key: str) -> None:
        job_id = submit_until_accepted(server.url, key, files, deadline)
        with lock:
            accepted[key] = job_id

    server_kills = worker_kills = 0
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(client, key) for key in keys]
        # the storm: alternate server and worker kills at random moments while jobs are in flight
        plan = ["server"] * args.server_kills + ["worker"] * args.worker_kills
        rng.shuffle(plan)
        for what in plan:
            time.sleep(rng.uniform(2.0, 6.0))
            if what == "server":
                server.proc.send_signal(signal.SIGKILL)
                server.proc.wait()
                server.log.close()
                time.sleep(rng.uniform(0.0, 1.0))
                server.start(ready=False)
                server_kills += 1
            else:
                pids = worker_pids(server.proc.pid)
                if pids:
                    os.kill(rng.choice(pids), signal.SIGKILL)
                    worker_kills += 1
        for future in futures:
            future.result()

    with server.client() as c:
        def all_done():
            jobs = [c.get(f"/v1/merges/{job_id}").json() for job_id in accepted.values()]
            return jobs if all(j["status"] in TERMINAL for j in jobs) else None

        jobs = wait_until(all_done, 1800, 2.0, "every job to finish")
        listed, cursor = [], None
        while True:
            page = c.get("/v1/merges", params={"limit": 100, **({"cursor": cursor} if cursor else {})}).json()
            listed += page["items"]
            cursor = page["next_cursor"]
            if not cursor:
                break
    took = time.monotonic() - started
    server.stop()

    statuses = Counter(j["status"] for j in jobs)
    errors = Counter(j["error"]["code"] for j in jobs if j["error"])
    attempts = Counter(j["attempts"] for j in jobs)
    duplicated = len(listed) - len(set(accepted.values()))
    lost = len(keys) - len(accepted)
    print(f"| jobs | server kills (-9) | worker kills (-9) | succeeded | failed | lost | duplicated | "
          f"jobs on attempt 1 / 2 / 3 | wall |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    print(f"| {len(keys)} | {server_kills} | {worker_kills} | {statuses.get('succeeded', 0)} | "
          f"{statuses.get('failed', 0)} {dict(errors) or ''} | {lost} | {duplicated} | "
          f"{attempts.get(1, 0)} / {attempts.get(2, 0)} / {attempts.get(3, 0)} | {took:.0f} s |")
    return 0 if statuses.get("succeeded", 0) == len(keys) and duplicated == 0 and lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
