"""Service benchmarks: what the REST service adds on top of the engine. Prints markdown tables.

    python tests/benchmarks/bench_service.py [--repeats 5] [--jobs 50] [--workers 2] [--json OUT.json]

It starts a real `onnxzip serve` (uvicorn, embedded SQLite store, spawned workers) on 127.0.0.1 with a
fresh data dir, and uses the committed mlp_legacy pair (two 64-300-100 MLPs, 512 calibration samples).

1. Overhead: submit-to-done time of one small merge (POST with the uploads, checks, queue, merge, writing
   merged.onnx + report.json + report.html, seen by a client polling every 20 ms), divided by the engine's
   own time for the same merge (`onnxzip.merge` in this process, warm, same BLAS threads as a worker).
   Medians of --repeats jobs run one at a time; the events give where the extra time goes.
2. Throughput: --jobs small merges submitted at once; jobs per minute from the first submit to the last
   job done, against two bounds: every worker busy back to back for the time a job really spends in it
   (merge + writing artifacts and reports), and for the engine's time alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def _threads(workers: int) -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return str(max(1, cores // max(1, workers)))


def engine_seconds(repeats: int) -> float:
    """Median wall time of onnxzip.merge on mlp_legacy, after one warm-up run."""
    import onnxzip

    case = ROOT / "tests" / "fixtures" / "cases" / "mlp_legacy"
    args = ([str(case / "a.onnx"), str(case / "b.onnx")], str(case / "calib.npz"), {})
    onnxzip.merge(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        onnxzip.merge(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _phases(client, job_id: str) -> dict:
    events = client.get(f"/v1/merges/{job_id}/events").json()
    at = {}
    for e in events:
        key = e["stage"] if e["type"] == "progress" else e["status"]
        at.setdefault(key, datetime.fromisoformat(e["at"]))
    seconds = lambda a, b: (at[b] - at[a]).total_seconds()  # noqa: E731
    return {"queue_s": seconds("queued", "running"), "merge_s": seconds("running", "artifacts"),
            "artifacts_s": seconds("artifacts", "succeeded")}


def submit_to_done(server, repeats: int) -> tuple[float, dict]:
    from test_service_server import submit

    totals, phases = [], []
    with server.client() as client:
        client.get("/v1/merges")  # connection warm
        for _ in range(repeats + 1):
            start = time.perf_counter()
            job_id = submit(client).json()["id"]
            while (job := client.get(f"/v1/merges/{job_id}").json())["status"] not in ("succeeded", "failed"):
                time.sleep(0.02)
            assert job["status"] == "succeeded", job
            totals.append(time.perf_counter() - start)
            phases.append(_phases(client, job_id))
    totals, phases = totals[1:], phases[1:]  # the first job pays for the workers' warm caches
    return statistics.median(totals), {k: statistics.median(p[k] for p in phases) for k in phases[0]}


def throughput(server, jobs: int) -> tuple[float, float]:
    """Jobs per minute, and the median time one job spends in its worker."""
    from test_service_server import submit

    with server.client(limits=__import__("httpx").Limits(max_connections=jobs)) as client:
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            ids = list(pool.map(lambda i: submit(client).json()["id"], range(jobs)))
        pending = set(ids)
        while pending:  # one list request every 0.2 s, as a patient client would poll
            page = client.get("/v1/merges", params={"limit": 100}).json()["items"]
            assert not [j for j in page if j["id"] in pending and j["status"] in ("failed", "cancelled")], page
            pending -= {j["id"] for j in page if j["status"] == "succeeded"}
            time.sleep(0.2)
        elapsed = time.perf_counter() - start
        in_worker = statistics.median(sum(_phases(client, i)[k] for k in ("merge_s", "artifacts_s")) for i in ids)
    assert len(set(ids)) == jobs
    return jobs / elapsed * 60.0, in_worker


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", metavar="OUT.json")
    args = parser.parse_args(argv)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # as the workers run
        os.environ.setdefault(name, _threads(args.workers))
    engine = engine_seconds(args.repeats)

    from test_service_server import Server

    server = Server(Path(tempfile.mkdtemp(prefix="bench-service-")) / "data", workers=args.workers).start()
    try:
        service, phases = submit_to_done(server, args.repeats)
        jobs_per_min, in_worker = throughput(server, args.jobs)
    finally:
        server.stop()
    ideal = args.workers * 60.0 / engine
    worker_bound = args.workers * 60.0 / in_worker
    results = {"engine_s": engine, "service_s": service, "overhead_ratio": service / engine, **phases,
               "jobs": args.jobs, "workers": args.workers, "jobs_per_min": jobs_per_min, "in_worker_s": in_worker,
               "worker_bound_jobs_per_min": worker_bound, "engine_bound_jobs_per_min": ideal}

    print(f"\n### Service overhead, one small merge (mlp_legacy, 512 samples; median of {args.repeats})\n")
    print("| engine merge (s) | service submit-to-done (s) | overhead ratio | queue wait (s) | in worker: merge (s) "
          "| in worker: artifacts + reports (s) |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(f"| {engine:.3f} | {service:.3f} | **{service / engine:.2f}x** | {phases['queue_s']:.3f} | "
          f"{phases['merge_s']:.3f} | {phases['artifacts_s']:.3f} |")
    print(f"\n### Throughput, {args.jobs} small merges submitted at once ({args.workers} workers, "
          f"{os.cpu_count()} CPU cores)\n")
    print("| jobs | jobs per minute | time in a worker per job (s) | worker-bound: workers x 60 / that "
          "| engine-bound: workers x 60 / engine time |")
    print("|---:|---:|---:|---:|---:|")
    print(f"| {args.jobs} | **{jobs_per_min:.0f}** | {in_worker:.3f} | {worker_bound:.0f} | {ideal:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
