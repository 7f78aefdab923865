"""The Redis job store keeps the SQLite store's promises, on a real redis-server: the same contract tests
run again here, plus what only scale-out has: each queued job has exactly one live queue entry (RQ
dispatch), a stale entry claims nothing, racing supervisors requeue a lost job once, and a vanished
entry is replaced.

This module also holds the `RedisServer` helper the other test_scaleout_* modules use.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis

from service.scaleout import open_redis_store
from service.settings import Settings
from service.store import CANCEL, FAILED, HELD, LOST, QUEUED, RUNNING, SUCCEEDED, Job
from test_service_server import free_port, wait_until
from test_service_store import (test_an_idempotency_key_belongs_to_one_job,  # noqa: F401 (run again here)
                                test_event_ids_count_within_each_job,
                                test_attempts_are_capped_by_max_attempts,
                                test_cancel_is_immediate_when_queued_and_a_flag_when_running,
                                test_event_ids_grow_and_resume_after_any_id,
                                test_pages_are_newest_first_and_never_repeat,
                                test_pages_filtered_by_metadata_hold_only_matching_jobs_and_page_on,
                                test_a_webhook_is_due_once_its_job_finishes_and_one_claim_wins,
                                test_release_on_shutdown_does_not_spend_an_attempt)

INSTALL_HINT = ("redis-server is not installed: the scale-out tests need a real one. Run .ci/run (CI installs it "
                "with apt-get), or: apt-get update && apt-get install -y redis-server")


class RedisServer:
    """A throwaway redis-server on 127.0.0.1: its own folder, a free port; no persistence, or with
    `persistent` the append-only file of the compose setup (data survives a restart on the same port)."""

    def __init__(self, folder: Path, persistent: bool = False):
        self.folder, self.port, self.persistent = Path(folder), free_port(), persistent
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = None

    def start(self) -> "RedisServer":
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail(INSTALL_HINT, pytrace=False)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.log = open(self.folder / "redis.log", "ab")
        durability = ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else ["--appendonly", "no"]
        self.proc = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      *durability, "--dir", str(self.folder)],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        client = self.client()

        def answers():
            if self.proc.poll() is not None:
                raise AssertionError(f"redis-server exited with {self.proc.returncode}: "
                                     f"{(self.folder / 'redis.log').read_text()[-2000:]}")
            try:
                return client.ping()
            except redis.ConnectionError:
                return False

        wait_until(answers, 20, 0.05, "redis-server to answer")
        return self

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def store(redis_server):
    """A Redis store with the RQ dispatcher, on an emptied database (the contract tests' `store`)."""
    redis_server.client().flushdb()
    return open_redis_store(Settings(queue_url=redis_server.url))


def new_job(store, max_attempts=3) -> Job:
    return store.create(Job(id=uuid.uuid4().hex, status=QUEUED, created_at=time.time(), options={}, inputs=[],
                            max_attempts=max_attempts))[0]


def queue_entries(store) -> list[str]:
    """The RQ queue, as RQ job ids (<job id>-<dispatch>)."""
    return [e.decode() for e in store.redis.lrange(f"rq:queue:{store.dispatcher.queue.name}", 0, -1)]


def dispatch_of(store, job_id: str) -> str:
    return store.redis.hget(f"{store.ns}:job:{job_id}", "dispatch").decode()


def test_a_stale_lease_can_write_nothing_after_the_job_is_claimed_again(store):
    """As on SQLite, except that Redis takes no `publish` step (it cannot hold a lock around files): worker
    1's token can neither write progress, renew, finish nor point the record at its artifacts."""
    job = new_job(store)
    first = store.claim(pid=101, host="h", lease_s=60)
    assert store.requeue_lost(job.id, first.lease_token, "worker 101 is gone") == QUEUED
    second = store.claim(pid=102, host="h", lease_s=60)
    assert second.attempts == 2 and second.lease_token != first.lease_token
    assert store.progress(job.id, first.lease_token, "merge", 0.5, "stale") is False
    assert store.renew(job.id, first.lease_token, 60) == LOST
    assert store.lease_state(job.id, first.lease_token) == LOST
    assert store.finish(job.id, first.lease_token, SUCCEEDED, artifacts=[{"name": "merged.onnx", "key": "a"}]) is False
    assert store.get(job.id).status == RUNNING and store.get(job.id).worker_pid == 102
    assert store.renew(job.id, second.lease_token, 60) == HELD
    store.request_cancel(job.id)
    assert store.lease_state(job.id, second.lease_token) == CANCEL
    assert store.finish(job.id, second.lease_token, SUCCEEDED, artifacts=[{"name": "merged.onnx", "key": "b"}])
    done = store.get(job.id)
    assert done.status == SUCCEEDED and done.lease_token is None and done.progress == 1.0
    assert done.artifacts == [{"name": "merged.onnx", "key": "b"}]
    with pytest.raises(ValueError, match="attempt-addressed"):
        store.finish(job.id, second.lease_token, SUCCEEDED, publish=lambda: None)


def test_every_queued_job_has_exactly_one_queue_entry_with_its_current_dispatch(store):
    """create and requeue each put one RQ job on the queue, named for the record's current dispatch; an
    attempt that ends (out of attempts) enqueues nothing."""
    job = new_job(store, max_attempts=2)
    assert queue_entries(store) == [f"{job.id}-{dispatch_of(store, job.id)}"]
    first = store.claim(pid=1, host="h", lease_s=60)
    assert store.requeue_lost(job.id, first.lease_token, "worker 1 is gone") == QUEUED
    current = f"{job.id}-{dispatch_of(store, job.id)}"
    assert len(queue_entries(store)) == 2 and queue_entries(store)[-1] == current
    second = store.claim(pid=2, host="h", lease_s=60)
    assert store.requeue_lost(job.id, second.lease_token, "worker 2 is gone") == FAILED
    assert len(queue_entries(store)) == 2, "a job that ended must not be queued again"


def test_a_stale_dispatch_claims_nothing(store):
    """Only the record's current dispatch can claim the job: an older queue entry (left by a requeue)
    finds nothing to do, so a job never runs twice however often it sits in the queue."""
    job = new_job(store)
    old = dispatch_of(store, job.id)
    claimed = store.claim_job(job.id, old, pid=1, host="h", lease_s=60)
    assert claimed.status == RUNNING
    store.requeue_lost(job.id, claimed.lease_token, "gone")
    assert store.claim_job(job.id, old, pid=2, host="h", lease_s=60) is None
    fresh = store.claim_job(job.id, dispatch_of(store, job.id), pid=3, host="h", lease_s=60)
    assert fresh is not None and fresh.attempts == 2 and fresh.worker_pid == 3
    assert store.claim_job(job.id, dispatch_of(store, job.id), pid=4, host="h", lease_s=60) is None


def test_racing_supervisors_requeue_a_lost_job_once(store):
    """Eight supervisors find the same dead worker at the same moment: one requeue wins, one attempt is
    spent, one new queue entry is made."""
    job = new_job(store)
    claimed = store.claim(pid=1, host="h", lease_s=60)
    results, start = [], threading.Barrier(8)

    def sweep():
        start.wait()
        results.append(store.requeue_lost(job.id, claimed.lease_token, "its worker is gone"))

    threads = [threading.Thread(target=sweep) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results, key=str) == [None] * 7 + [QUEUED]
    assert len(queue_entries(store)) == 2  # the first dispatch (consumed by the claim above) and one more
    assert [e.type for e in store.events(job.id, 0, 100)].count("requeued") == 1
    assert store.get(job.id).attempts == 1


def test_a_vanished_queue_entry_is_replaced_and_the_job_still_runs_once(store):
    """RQ can lose an entry (it fails one stuck between dequeue and start): maintain() dispatches the
    still-queued job again, once, and the lost dispatch can no longer claim it."""
    store.REDISPATCH_AFTER_S = 0.0
    job = new_job(store)
    lost = dispatch_of(store, job.id)
    store.dispatcher.discard(job.id, lost)  # what a lost entry looks like: gone from the queue
    assert queue_entries(store) == []
    store.maintain()
    store.maintain()  # a second supervisor right after: the new entry is pending, nothing more happens
    fresh = dispatch_of(store, job.id)
    assert fresh != lost and queue_entries(store) == [f"{job.id}-{fresh}"]
    assert [e.message for e in store.events(job.id, 0, 10)][-1] == "queued again: the queue had lost its entry"
    assert store.claim_job(job.id, lost, pid=1, host="h", lease_s=60) is None
    assert store.claim_job(job.id, fresh, pid=2, host="h", lease_s=60).attempts == 1


def test_deleting_or_cancelling_a_queued_job_takes_its_entry_off_the_queue(store):
    kept, cancelled, deleted = new_job(store), new_job(store), new_job(store)
    store.request_cancel(cancelled.id)
    store.delete(deleted.id)
    assert queue_entries(store) == [f"{kept.id}-{dispatch_of(store, kept.id)}"]
    assert store.redis.keys(f"{store.ns}:job:{deleted.id}") == [] and store.events(deleted.id, 0, 10) == []


def test_leases_and_timestamps_use_the_servers_clock(store):
    """Every machine judges leases by one clock: Redis TIME."""
    job = new_job(store)
    before = store.now()
    claimed = store.claim(pid=1, host="h", lease_s=30)
    assert before <= claimed.started_at <= store.now()
    assert abs(claimed.lease_expires - claimed.started_at - 30) < 1e-3
    assert job.created_at <= claimed.started_at


def test_a_supervisor_anywhere_requeues_a_job_whose_lease_expired(store, tmp_path):
    """A worker on another machine stops renewing (its pid cannot be checked from here): once the lease
    expires, any supervisor requeues the job with a fresh queue entry, and spends the attempt."""
    from service.artifacts import ArtifactStore
    from service.workers import WorkerPool

    settings = Settings(queue_url="redis://unused:6379/0", data_dir=tmp_path, lease_s=0.3, heartbeat_s=0.1)
    pool = WorkerPool(settings, store, ArtifactStore(tmp_path, addressed=True), count=0)
    job = new_job(store)
    claimed = store.claim(pid=4242, host="another-machine", lease_s=settings.lease_s)
    pool.tick()
    assert store.get(job.id).status == RUNNING, "a live lease is left alone"
    time.sleep(0.4)
    pool.tick()
    requeued = store.get(job.id)
    assert requeued.status == QUEUED and requeued.attempts == 1 and "renewing the lease" in requeued.message
    assert queue_entries(store)[-1] == f"{job.id}-{dispatch_of(store, job.id)}"
    assert store.finish(job.id, claimed.lease_token, SUCCEEDED, artifacts=[]) is False
