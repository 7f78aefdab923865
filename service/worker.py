"""One merge worker: a long-lived process that claims a job, runs onnxzip.merge, writes the artifacts
and marks the job done, over and over. `run_worker()` is `onnxzip worker`: a pool without the API (of
these processes on the SQLite store, of RQ workers with ONNXZIP_QUEUE_URL; see scaleout.py).

A worker exits by itself when its parent dies (so a killed server leaves no orphans computing), when
its lease is lost and the merge does not stop within the grace period, and after a cancelled or
crashed job (the pool starts a fresh process: nothing of that merge lingers in memory).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import threading
import time
import traceback

from onnxzip.errors import CancelledError, FidelityNotMetError, OnnxZipError

from .artifacts import open_artifacts
from .schemas import MergeResult
from .settings import Settings, load_settings
from .store import CANCEL, CANCELLED, FAILED, HELD, HOST, LOST, SUCCEEDED, TRANSIENT, Job, JobStore, open_store
from .uploads import rename

log = logging.getLogger("onnxzip.worker")

IDLE_POLL_S = 0.05  # how soon an idle worker sees a new job (one indexed read per poll)
PARENT_CHECK_S = 0.5  # how soon a worker notices its parent died
EXIT_ORPHANED, EXIT_STUCK = 3, 4

# The engine's stages and the share of the whole job each takes (for one overall progress fraction).
# A stage the table does not know keeps the fraction where it was; the fraction never goes back.
STAGES = {"starting": (0.0, 0.0), "load": (0.0, 0.05), "canonicalize": (0.05, 0.15), "merge": (0.15, 0.85),
          "plan": (0.15, 0.85), "distill": (0.85, 0.9),
          "emit": (0.85, 0.9), "report": (0.9, 0.95), "curve": (0.9, 0.95), "artifacts": (0.95, 1.0)}


def worker_main(settings: Settings, parent_pid: int) -> None:
    """Entry point of a spawned worker process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent decides
    _exit_with_parent(parent_pid)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    store, artifacts = open_store(settings), open_artifacts(settings)
    _warm_up()
    while True:
        try:
            job = store.claim(os.getpid(), HOST, settings.lease_s)
        except TRANSIENT as err:  # the store is busy or briefly unavailable: try again
            log.warning("claim failed: %s", err)
            job = None
        if job is None:
            time.sleep(IDLE_POLL_S)
            continue
        if not run_job(job, store, artifacts, settings):
            return  # recycle: the pool starts a fresh process


def _exit_with_parent(parent_pid: int) -> None:
    def watch() -> None:
        while True:
            time.sleep(PARENT_CHECK_S)
            if os.getppid() != parent_pid:
                os._exit(EXIT_ORPHANED)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _warm_up() -> None:
    """Import what a merge needs before the first job, so the first job is not the slow one."""
    import onnxzip.html_report  # noqa: F401
    import onnxzip.zipper  # noqa: F401
    from onnxzip.runtime import default_providers

    default_providers()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401


class Lease(threading.Thread):
    """Renews the job's lease every heartbeat_s; notices cancel requests and lost leases, and ends the
    process if the merge has not stopped `cancel_grace_s` after it was told to."""

    def __init__(self, store: JobStore, job: Job, settings: Settings):
        super().__init__(name=f"lease-{job.id[:8]}", daemon=True)
        self.store, self.job_id, self.token, self.settings = store, job.id, job.lease_token, settings
        self.done = threading.Event()
        self.stop_since = None

    def run(self) -> None:
        while not self.done.wait(self.settings.heartbeat_s):
            try:
                state = self.store.renew(self.job_id, self.token, self.settings.lease_s)
            except TRANSIENT as err:
                log.warning("lease renewal failed: %s", err)
                continue
            if state != HELD:
                self.stopping()
            if self.stop_since is not None and time.monotonic() - self.stop_since > self.settings.cancel_grace_s:
                log.warning("job %s did not stop within %.1fs of losing its lease; exiting", self.job_id,
                            self.settings.cancel_grace_s)
                os._exit(EXIT_STUCK)

    def stopping(self) -> None:
        if self.stop_since is None:
            self.stop_since = time.monotonic()

    def should_cancel(self) -> bool:
        try:
            if self.stop_since is None and self.store.lease_state(self.job_id, self.token) in (CANCEL, LOST):
                self.stopping()
        except TRANSIENT as err:  # go on; the lease thread decides once the store answers again
            log.warning("lease check failed: %s", err)
        return self.stop_since is not None


def _until_written(write, what: str):
    """A job's final state, written however long the store refuses (a full disk, a restarting Redis): the
    process stays alive and holds the job meanwhile, so no job is left `running` without a worker."""
    delay, last_report = 0.5, 0.0
    while True:
        try:
            return write()
        except TRANSIENT as err:
            now = time.monotonic()
            if now - last_report > 60.0:
                log.warning("cannot record %s yet (%s: %s); retrying", what, type(err).__name__, err)
                last_report = now
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def _storage_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)


def run_job(job: Job, store: JobStore, artifacts, settings: Settings) -> bool:
    """Run one claimed job to its end; returns False when this process should be replaced."""
    token = job.lease_token
    lease = Lease(store, job, settings)
    lease.start()
    names = {i["stored"]: i["name"] for i in job.inputs}
    done, committed = [0.0], False

    def progress(stage: str, fraction: float, message: str) -> None:
        low, high = STAGES.get(stage, (done[0], done[0]))
        done[0] = max(done[0], low + (high - low) * fraction)
        try:
            if not store.progress(job.id, token, stage, done[0], message):
                lease.stopping()
        except TRANSIENT as err:  # progress is news, not state: the lease thread keeps trying the store
            log.warning("progress update failed: %s", err)

    try:
        import onnxzip
        from onnxzip.html_report import render

        with artifacts.inputs(job.id, list(names)) as paths:
            models = [str(paths[i["stored"]]) for i in job.inputs if i["role"] == "model"]
            calibration = next(str(paths[i["stored"]]) for i in job.inputs if i["role"] == "calibration")
            model, report = onnxzip.merge(models, calibration, job.options, progress=progress,
                                          should_cancel=lease.should_cancel)
        if lease.should_cancel():
            raise CancelledError("the merge was cancelled")
        progress("artifacts", 0.0, "writing merged.onnx, report.json, report.html")
        files, publish = artifacts.save(job.id, token, {
            "merged.onnx": model.SerializeToString(), "report.json": json.dumps(report, indent=2).encode(),
            "report.html": render(report).encode()})
        result = MergeResult.of_report(report).model_dump(mode="json")
        # a finished merge is kept through a store outage (Redis restarting): written once it answers
        committed = _until_written(lambda: store.finish(job.id, token, SUCCEEDED, artifacts=files, publish=publish,
                                                        result=result), f"job {job.id}'s success")
        if committed:
            artifacts.prune(job.id, token)
        return True
    except CancelledError:
        _until_written(lambda: store.finish(job.id, token, CANCELLED), f"job {job.id} as cancelled")
        return False
    except FidelityNotMetError as err:  # the reports are kept so the miss can be read; no model is published
        files, publish = artifacts.save(job.id, token, {
            "report.json": json.dumps(err.report, indent=2).encode(), "report.html": render(err.report).encode()})
        result = MergeResult.of_report(err.report).model_dump(mode="json")
        error = (err.code, rename(str(err), names))
        committed = _until_written(lambda: store.finish(job.id, token, FAILED, error=error, artifacts=files,
                                                        publish=publish, result=result), f"job {job.id}'s result")
        if committed:
            artifacts.prune(job.id, token)
        return True
    except OnnxZipError as err:
        _until_written(lambda: store.finish(job.id, token, FAILED, error=(err.code, rename(str(err), names))),
                       f"job {job.id}'s failure")
        return True
    except Exception as err:  # a bug in onnxzip or here, or a full disk: fail the job, keep the service up
        if lease.should_cancel():  # the job was cancelled or deleted under us: nothing to report
            _until_written(lambda: store.finish(job.id, token, CANCELLED), f"job {job.id} as cancelled")
            return False
        if _storage_full(err) or (isinstance(err, TRANSIENT) and "full" in str(err)):
            log.warning("job %s: storage full: %s", job.id, err)
            error = ("storage_full", "the service ran out of disk space while running this merge; submit it "
                                     "again once space is freed")
        else:
            log.error("job %s failed unexpectedly:\n%s", job.id, traceback.format_exc())
            detail = " ".join(str(err).split())[:300]
            error = ("internal_error", f"onnxzip failed unexpectedly ({type(err).__name__}: {detail}); this is a "
                                       "bug: please report it with the job id and the service log")
        _until_written(lambda: store.finish(job.id, token, FAILED, error=error), f"job {job.id}'s failure")
        return False
    finally:
        lease.done.set()
        if not committed:
            artifacts.discard_work(job.id, token)


def run_worker(**overrides) -> None:
    """`onnxzip worker`: settings.workers merge processes on the configured store, without the API; with
    ONNXZIP_QUEUE_URL, RQ workers taking jobs from the queue (on any number of machines). `overrides`
    are the command's flags (--data-dir, --workers, --queue-url), over the ONNXZIP_* variables."""
    from .workers import WorkerPool

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = load_settings(**overrides)
    store = open_store(settings)
    pool = WorkerPool(settings, store, open_artifacts(settings), count=max(1, settings.workers))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    pool.start()
    where = store.describe()
    queue = (f"rq queue '{where['queue_name']}' at {where['redis']}" if where.get("queue") == "rq"
             else f"the SQLite store in {settings.data_dir}")
    log.info("%d worker(s) on %s; stop with Ctrl-C", pool.count, queue)
    stop.wait()
    pool.stop()
