"""Scale-out on RQ: jobs carried by a Redis queue to workers on any number of machines.

Who decides what:
- The job record (redis_store.py) is the truth: status, lease, attempts. RQ only carries *dispatches*:
  RQ job `<id>-<dispatch>` runs `run_dispatched(id, dispatch)`, which claims the job only while that
  dispatch is the record's current one. A stale or duplicate queue entry claims nothing, so a job runs
  once at a time whatever RQ does; lease tokens fence off a worker that lost its claim.
- Each pool process is an RQ worker; it runs every job in a work horse of its own, spawned (safe once
  CUDA is in use) or forked, as `settings.job_start` says. The horse holds the lease while it merges and
  exits when its RQ worker dies, so a dead worker never leaves a merge running unwatched.
- A worker that dies mid-job: every supervisor (the API's and each `onnxzip worker`'s) sweeps leases
  and requeues the job with a fresh dispatch, at once when the horse's pid is gone on its own host,
  else when the lease expires. That is the only requeue path: RQ jobs carry no Retry, so RQ's own
  abandoned-job handling merely files the dead dispatch as failed. One requeue wins (the record
  changes under WATCH and the lease token), and the attempt is counted.
- An orderly stop (SIGTERM) ends the horse at once and hands its job back without spending an attempt.
- A dispatch that vanished (RQ fails an entry stuck between dequeue and start; a worker can die in that
  gap) is replaced by `RedisJobStore.maintain()`, so a queued job never waits for nothing.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from urllib.parse import urlsplit, urlunsplit

import redis
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job as RQJob
from rq.job import JobStatus
from rq.worker import SpawnWorker, Worker

from .artifacts import open_artifacts
from .redis_store import RedisJobStore
from .settings import Settings, load_settings
from .store import HOST, RUNNING

log = logging.getLogger("onnxzip.scaleout")

JOB_FUNCTION = "service.scaleout.run_dispatched"
FAILED_TTL_S = 7 * 24 * 3600  # RQ keeps failed dispatches this long, for `rq info` and the logs
REDIS_RETRY_S = 2.0
MAINTENANCE_S = 60  # RQ's registry cleaning, which files dispatches of dead workers as failed
_PENDING = {JobStatus.QUEUED, JobStatus.STARTED, JobStatus.DEFERRED, JobStatus.SCHEDULED, JobStatus.CREATED}


def open_redis_store(settings: Settings) -> RedisJobStore:
    client = redis.Redis.from_url(settings.queue_url, socket_connect_timeout=5, socket_timeout=30,
                                  health_check_interval=30)
    return RedisJobStore(client, settings.queue_name, RQDispatcher(client, settings))


def redacted(url: str) -> str:
    """The URL without its password, for /v1/info and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + host))


class RQDispatcher:
    """Enqueues dispatches on the RQ queue (inside the store's MULTI) and tells whether one is pending."""

    def __init__(self, client: redis.Redis, settings: Settings):
        self.queue = Queue(settings.queue_name, connection=client)
        self.url = redacted(settings.queue_url)
        # RQ's own limit only backs ours up (the supervisors end a job at job_timeout_s): past it, RQ
        # kills a horse that stopped listening to its lease.
        self.timeout = int(settings.job_timeout_s + settings.lease_s + settings.cancel_grace_s + 60)

    def enqueue(self, pipe: redis.client.Pipeline, job_id: str, dispatch: str) -> None:
        self.queue.enqueue_call(JOB_FUNCTION, args=(job_id, dispatch), job_id=f"{job_id}-{dispatch}",
                                timeout=self.timeout, result_ttl=0, failure_ttl=FAILED_TTL_S,
                                description=f"onnxzip merge {job_id}", pipeline=pipe)

    def pending(self, job_id: str, dispatch: str) -> bool:
        try:
            entry = RQJob.fetch(f"{job_id}-{dispatch}", connection=self.queue.connection)
        except NoSuchJobError:
            return False
        return entry.get_status(refresh=False) in _PENDING

    def discard(self, job_id: str, dispatch: str) -> None:
        """Take a dispatch off the queue (a worker that popped it already finds the job moved on)."""
        try:
            RQJob.fetch(f"{job_id}-{dispatch}", connection=self.queue.connection).delete(remove_from_queue=True)
        except NoSuchJobError:
            pass

    def describe(self) -> dict:
        return {"queue": "rq", "queue_name": self.queue.name, "redis": self.url}

    def workers(self) -> int:
        """RQ workers registered on the queue (a killed one counts until its registration expires)."""
        return Worker.count(queue=self.queue)


def run_dispatched(job_id: str, dispatch: str) -> str:
    """The RQ job: runs in the work horse, claims the job for this dispatch and merges it."""
    from .worker import _exit_with_parent, run_job

    settings = load_settings()  # the worker's settings, passed down through the environment
    store, artifacts = open_redis_store(settings), open_artifacts(settings)
    _exit_with_parent(os.getppid())
    job = store.claim_job(job_id, dispatch, os.getpid(), HOST, settings.lease_s)
    if job is None:
        log.info("dispatch %s of job %s is stale (the job moved on): nothing to do", dispatch, job_id)
        return "stale"
    run_job(job, store, artifacts, settings)
    return "ran"


class _OrderlyStop:
    """RQ worker behaviour for merges: SIGTERM ends the running horse at once and gives its job back to
    the queue without spending an attempt (RQ's warm shutdown would wait out a merge of many minutes);
    SIGINT belongs to the pool that started this process."""

    merge_store = None
    merge_artifacts = None
    _merge_job = None

    def _install_signal_handlers(self):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, self._stop_now)

    def execute_job(self, job, queue):
        self._merge_job = job.args[0] if job.func_name == JOB_FUNCTION and job.args else None
        try:
            return super().execute_job(job, queue)
        finally:
            self._merge_job = None

    def maintain_heartbeats(self, job, execution):
        """RQ's heartbeats while a horse merges. A Redis restart must not end the merge: RQ would raise
        ConnectionError out of its monitoring loop, ending this worker and so the horse with it. The
        merge goes on (its own progress and lease writes wait out the outage too); the heartbeats resume
        once Redis answers again."""
        try:
            return super().maintain_heartbeats(job, execution)
        except (redis.ConnectionError, redis.TimeoutError) as err:
            log.warning("Redis does not answer while a merge runs (%s); the merge goes on", err)

    def _stop_now(self, signum, frame):
        horse = self.horse_pid
        if horse:
            try:
                if self._merge_job is not None:
                    # Freeze the horse, hand the job back, then end it. Frozen, it can write nothing
                    # but is still alive, so no lease sweep (the API's, another pool's) sees a dead
                    # worker in between and requeues the job as lost, which would spend an attempt.
                    _signal(horse, signal.SIGSTOP)
                    _hand_back(self.merge_store, self.merge_artifacts, self._merge_job, horse)
            finally:  # Redis unreachable: the lease sweep requeues the job later; the horse still ends
                self.kill_horse()
                self.wait_for_horse()
        raise SystemExit(0)


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass  # already gone


class MergeSpawnWorker(_OrderlyStop, SpawnWorker):
    """A job per spawned process (posix_spawn): nothing of CUDA or of the last job is inherited."""


class MergeForkWorker(_OrderlyStop, Worker):
    """A job per forked process: no import cost per job; for workers that never touch CUDA here."""


def _hand_back(store: RedisJobStore, artifacts, job_id: str, horse: int) -> None:
    job = store.get(job_id)
    if job is not None and job.status == RUNNING and job.worker_host == HOST and job.worker_pid == horse:
        if store.release(job.id, job.lease_token, "the worker shut down while the job ran"):
            artifacts.discard_work(job.id, job.lease_token)
            log.info("job %s handed back to the queue", job.id)


def _wait_for(connection: redis.Redis, url: str) -> None:
    """Block until Redis answers (a worker may start before it, or outlive a restart of it)."""
    while True:
        try:
            connection.ping()
            return
        except (redis.ConnectionError, redis.TimeoutError) as err:
            log.warning("waiting for Redis at %s: %s", url, err)
            time.sleep(REDIS_RETRY_S)


def rq_worker_main(settings: Settings, parent_pid: int) -> None:
    """Entry point of a pool process in scale-out mode: one RQ worker on the queue."""
    from .worker import _exit_with_parent

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent(parent_pid)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    os.environ.update(settings.environment())  # what each horse reads back with load_settings()
    connection = redis.Redis.from_url(settings.queue_url, socket_connect_timeout=5, health_check_interval=30)
    _wait_for(connection, redacted(settings.queue_url))
    worker_class = MergeSpawnWorker if settings.job_start == "spawn" else MergeForkWorker
    worker = worker_class([Queue(settings.queue_name, connection=connection)], connection=connection,
                          name=f"{HOST}.{os.getpid()}", maintenance_interval=MAINTENANCE_S, default_result_ttl=0,
                          # RQ watches its horse and beats its heart this often (whole seconds: an alarm)
                          job_monitoring_interval=max(1, round(settings.heartbeat_s)))
    # its own connections: the SIGTERM handler must not wait on a pool the interrupted code holds
    worker.merge_store, worker.merge_artifacts = open_redis_store(settings), open_artifacts(settings)
    try:
        worker.work(logging_level="INFO")
    except (redis.ConnectionError, redis.TimeoutError) as err:
        # between jobs (RQ's own bookkeeping) a Redis outage ends the loop: the pool starts a fresh
        # worker, which waits for Redis before it asks for work
        log.warning("Redis went away between jobs (%s); this worker restarts", err)
        raise SystemExit(75)
