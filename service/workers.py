"""The worker pool: N long-lived processes (spawned, never forked) and their supervisor.

On the SQLite store each process is a merge worker polling the store (worker.py); with ONNXZIP_QUEUE_URL
each is an RQ worker that runs every job in a process of its own (scaleout.py). The supervisor is a
thread in the API process (and in `onnxzip worker`). Every tick it replaces dead workers (requeueing what
they held), ends jobs whose cancel grace or time limit ran out (terminating, then killing, the worker
when it is ours), requeues jobs whose worker vanished (an expired lease, or a dead process on this
host: what a killed server or worker leaves behind), lets the store keep its queue in step, and deletes
jobs past their retention. Every supervisor of a deployment does this; the store makes sure that one
of them wins each change. Time is the store's clock, one for all machines.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from typing import Optional

from .settings import Settings
from .store import CANCELLED, FAILED, HOST, TRANSIENT, Job, JobStore, pid_alive
from .worker import worker_main

log = logging.getLogger("onnxzip.workers")

# Read by numpy's BLAS and OpenMP when a worker imports them; workers inherit them from this process.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

TICK_S = 0.25
MAINTAIN_S = 10.0  # how often the store's own housekeeping runs (re-dispatching lost queue entries)
TERMINATE_WAIT_S = 2.0  # after SIGTERM, before SIGKILL
REPORT_EVERY_S = 60.0  # a supervisor that keeps failing says so this often
ORPHAN_AGE_S = 3600.0  # folders without a record older than this are leftovers of a crash


class WorkerPool:
    """Starts, watches and stops `count` worker processes; also the store's janitor."""

    def __init__(self, settings: Settings, store: JobStore, artifacts, count: Optional[int] = None):
        self.settings, self.store, self.artifacts = settings, store, artifacts
        self.count = settings.workers if count is None else count
        self.threads = settings.worker_threads or max(1, _cores() // max(1, self.count))
        self.context = multiprocessing.get_context("spawn")  # CUDA does not survive fork
        self.processes: list = []
        self.cancel_seen: dict[str, float] = {}
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="worker-supervisor", daemon=True)
        self.last_sweep = self.last_maintain = 0.0
        self.target = worker_main
        if settings.queue_url:
            from .scaleout import rq_worker_main

            self.target = rq_worker_main

    # --- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        for name in THREAD_VARIABLES:  # a value the operator set in the environment wins
            os.environ.setdefault(name, str(self.threads))
        try:
            self._reap_lost(self.store.now(), at_start=True)  # jobs running when a previous server died
        except TRANSIENT as err:  # the store is out of reach: the supervisor's ticks try again
            log.warning("the job store does not answer yet: %s", err)
        self.processes = [self._spawn() for _ in range(self.count)]
        self.thread.start()

    def stop(self) -> None:
        """Stop the supervisor and the workers; their running jobs go back to the queue, uncounted."""
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join()
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            _reap(process)
        pids = {p.pid for p in self.processes}
        for job in self.store.running():
            if job.worker_host == HOST and job.worker_pid in pids:
                self.store.release(job.id, job.lease_token, "the service shut down while the job ran")
                self.artifacts.discard_work(job.id, job.lease_token)

    def thread_settings(self) -> dict[str, str]:
        """The thread variables worker processes run with."""
        return {name: os.environ.get(name, str(self.threads)) for name in THREAD_VARIABLES}

    def alive(self) -> int:
        return sum(p.is_alive() for p in self.processes)

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def _spawn(self):
        process = self.context.Process(target=self.target, args=(self.settings, os.getpid()),
                                       name="onnxzip-worker", daemon=False)
        process.start()
        return process

    # --- supervision ----------------------------------------------------------------------------------

    def _loop(self) -> None:
        last_report, failing = 0.0, False
        while not self.stopped.wait(TICK_S):
            try:
                self.tick()
                if failing:
                    log.info("supervisor ticks succeed again")
                failing = False
            except Exception as err:  # a store that cannot be written (disk full) must not end supervision
                now = time.monotonic()
                if not failing:
                    log.exception("supervisor tick failed; retrying every %g s", TICK_S)
                elif now - last_report > REPORT_EVERY_S:  # one line a minute, not a traceback per tick
                    log.warning("supervisor ticks still fail: %s: %s", type(err).__name__, err)
                else:
                    continue
                failing, last_report = True, now

    def tick(self) -> None:
        now = self.store.now()
        running = self.store.running()
        by_pid = {j.worker_pid: j for j in running if j.worker_host == HOST}
        for i, process in enumerate(self.processes):
            if self.stopped.is_set() or process.is_alive():
                continue
            job = by_pid.get(process.pid)
            process.join()
            self.processes[i] = self._spawn()  # first: the pool stays whole even while the store fails
            if job is not None:  # if this cannot be written now, _reap_lost retries it every tick
                self.store.requeue_lost(job.id, job.lease_token,
                                        f"worker process {process.pid} exited with code {process.exitcode}")
                self.artifacts.discard_work(job.id, job.lease_token)
        for job in running:
            self._enforce_limits(job, now)
        self._reap_lost(now)
        if now - self.last_maintain > MAINTAIN_S:
            self.last_maintain = now
            self.store.maintain()
        if now - self.last_sweep > min(60.0, self.settings.retention_s / 4):
            self.last_sweep = now
            self._sweep(now)

    def _enforce_limits(self, job: Job, now: float) -> None:
        if job.cancel_requested_at is not None:
            seen = self.cancel_seen.setdefault(job.id, now)
            if now - max(seen, job.cancel_requested_at) > self.settings.cancel_grace_s:
                self._stop_job(job, CANCELLED, None,
                               f"the worker did not stop within {self.settings.cancel_grace_s:g} s of the cancel")
        elif job.started_at is not None and now - job.started_at > self.settings.job_timeout_s:
            self._stop_job(job, FAILED, ("timeout", (
                f"the merge ran longer than this service's limit of {self.settings.job_timeout_s:g} s "
                "(ONNXZIP_JOB_TIMEOUT_S); send fewer calibration samples or ask for a longer limit")),
                "time limit reached")

    def _stop_job(self, job: Job, status: str, error: Optional[tuple[str, str]], why: str) -> None:
        """End the job's worker process (when it is one of ours), then the job; a worker elsewhere
        loses its lease and stops itself."""
        process = next((p for p in self.processes if p.pid == job.worker_pid), None)
        if process is not None and job.worker_host == HOST:
            log.warning("job %s: %s; terminating worker %s", job.id, why, process.pid)
            process.terminate()
            _reap(process)
            self.processes[self.processes.index(process)] = self._spawn()
        self.store.finish(job.id, job.lease_token, status, error=error)
        self.artifacts.discard_work(job.id, job.lease_token)
        self.cancel_seen.pop(job.id, None)

    def _reap_lost(self, now: float, at_start: bool = False) -> None:
        """Requeue running jobs nobody works on: lease expired, or the worker process on this host is gone.
        At start, a job this host was running when the previous server died (killed, crashed, restarted)
        lost its worker through no fault of its own: if it was making progress, the attempt is given back
        (it runs again as the same attempt), so restarts never use up a healthy job's attempts."""
        ours = set(self.pids())
        for job in self.store.running():
            if job.worker_pid in ours and job.worker_host == HOST:
                continue  # our own workers are watched directly
            dead = job.worker_host == HOST and not pid_alive(job.worker_pid)
            expired = job.lease_expires is not None and job.lease_expires < now
            if at_start and dead and job.progress > 0:
                if self.store.release(job.id, job.lease_token, "the service restarted under it (attempt not counted)"):
                    log.warning("job %s: the service restarted under it; requeued, attempt not counted", job.id)
                    self.artifacts.discard_work(job.id, job.lease_token)
                continue
            if dead or expired:
                reason = (f"its worker process {job.worker_pid} is gone" if dead
                          else f"its worker stopped renewing the lease for {self.settings.lease_s:g} s")
                status = self.store.requeue_lost(job.id, job.lease_token, reason)
                if status is not None:
                    log.warning("job %s: %s; now %s", job.id, reason, status)
                    self.artifacts.discard_work(job.id, job.lease_token)

    def _sweep(self, now: float) -> None:
        for job_id in self.store.finished_before(now - self.settings.retention_s):
            self.artifacts.remove(job_id)  # files first: once the record is gone, so is all it named
            if self.store.delete(job_id) is not None:
                log.info("job %s expired (retention %g h) and was deleted", job_id, self.settings.retention_hours)
        self.artifacts.sweep_orphans(lambda name: self.store.get(name) is not None, ORPHAN_AGE_S)


def _cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _reap(process) -> None:
    process.join(TERMINATE_WAIT_S)
    if process.is_alive():
        process.kill()
        process.join()
