"""The job store's promises, checked on a real SQLite file: leases fence stale workers out, attempts are
counted and capped, event ids only grow, idempotency keys are unique, pages never repeat a job."""

from __future__ import annotations

import time
import uuid

import pytest

from service.sqlite_store import SqliteJobStore
from service.store import CANCEL, CANCELLED, FAILED, HELD, LOST, QUEUED, RUNNING, SUCCEEDED, Job


@pytest.fixture
def store(tmp_path) -> SqliteJobStore:
    return SqliteJobStore(tmp_path / "jobs.db")


def new_job(store, key=None, digest="h", max_attempts=3) -> Job:
    job = Job(id=uuid.uuid4().hex, status=QUEUED, created_at=time.time(), options={}, inputs=[],
              max_attempts=max_attempts, idempotency_key=key, payload_hash=digest)
    return store.create(job)[0]


def test_a_stale_lease_can_write_nothing_after_the_job_is_claimed_again(store):
    """Worker 1's attempt is declared lost and the job re-claimed by worker 2: every write with worker 1's
    token (progress, renew, finish, publish) is refused and changes nothing."""
    job = new_job(store)
    first = store.claim(pid=101, host="h", lease_s=60)
    assert first.id == job.id and first.status == RUNNING and first.attempts == 1
    assert store.requeue_lost(job.id, first.lease_token, "worker 101 is gone") == QUEUED
    second = store.claim(pid=102, host="h", lease_s=60)
    assert second.attempts == 2 and second.lease_token != first.lease_token
    published = []
    assert store.progress(job.id, first.lease_token, "merge", 0.5, "stale") is False
    assert store.renew(job.id, first.lease_token, 60) == LOST
    assert store.lease_state(job.id, first.lease_token) == LOST
    assert store.finish(job.id, first.lease_token, SUCCEEDED, artifacts=[{"name": "merged.onnx"}],
                        publish=lambda: published.append(1)) is False
    assert published == []
    assert store.get(job.id).status == RUNNING and store.get(job.id).worker_pid == 102
    assert store.progress(job.id, second.lease_token, "merge", 0.5, "fresh") is True
    assert store.finish(job.id, second.lease_token, SUCCEEDED, artifacts=[],
                        publish=lambda: published.append(2)) is True
    assert published == [2]
    done = store.get(job.id)
    assert done.status == SUCCEEDED and done.lease_token is None and done.progress == 1.0


def test_attempts_are_capped_by_max_attempts(store):
    """A job whose worker is lost on every attempt fails with `worker_lost` after max_attempts."""
    job = new_job(store, max_attempts=2)
    for attempt in (1, 2):
        claimed = store.claim(pid=100 + attempt, host="h", lease_s=60)
        assert claimed.attempts == attempt
        status = store.requeue_lost(job.id, claimed.lease_token, "killed")
    assert status == FAILED
    failed = store.get(job.id)
    assert failed.error_code == "worker_lost" and "2 attempts" in failed.error_message
    assert store.claim(pid=200, host="h", lease_s=60) is None


def test_release_on_shutdown_does_not_spend_an_attempt(store):
    job = new_job(store)
    claimed = store.claim(pid=1, host="h", lease_s=60)
    assert store.release(job.id, claimed.lease_token, "shutdown") is True
    assert store.get(job.id).attempts == 0 and store.get(job.id).status == QUEUED


def test_cancel_is_immediate_when_queued_and_a_flag_when_running(store):
    queued, running = new_job(store), new_job(store)
    claimed = store.claim(pid=1, host="h", lease_s=60)
    assert claimed.id == queued.id  # first in, first out
    claimed_running = store.claim(pid=2, host="h", lease_s=60)
    assert claimed_running.id == running.id
    store.request_cancel(queued.id)
    assert store.renew(queued.id, claimed.lease_token, 60) == CANCEL
    assert store.get(queued.id).status == RUNNING  # the worker ends it
    assert store.finish(queued.id, claimed.lease_token, CANCELLED) is True
    assert store.get(queued.id).error_code == "cancelled"
    waiting = new_job(store)
    assert store.request_cancel(waiting.id).status == CANCELLED
    assert store.renew(running.id, claimed_running.lease_token, 60) == HELD


def test_event_ids_grow_and_resume_after_any_id(store):
    job = new_job(store)
    claimed = store.claim(pid=1, host="h", lease_s=60)
    for i in range(5):
        store.progress(job.id, claimed.lease_token, "merge", i / 5, f"step {i}")
    events = store.events(job.id, 0, 100)
    ids = [e.id for e in events]
    assert ids == sorted(set(ids)) and len(ids) == 7  # queued, running, 5 progress
    assert [e.id for e in store.events(job.id, ids[3], 100)] == ids[4:]
    store.delete(job.id)
    assert store.events(job.id, 0, 100) == []


def test_event_ids_count_within_each_job(store):
    """Issue 15: a job's events are numbered 1, 2, 3, ... whatever other jobs did meanwhile."""
    first, second = new_job(store), new_job(store)
    claimed = store.claim(pid=1, host="h", lease_s=60)
    for i in range(3):
        store.progress(claimed.id, claimed.lease_token, "merge", i / 3, f"step {i}")
    for job in (first, second):
        ids = [e.id for e in store.events(job.id, 0, 100)]
        assert ids == list(range(1, len(ids) + 1)), ids
    assert len(store.events(first.id, 0, 100)) == 5 and len(store.events(second.id, 0, 100)) == 1


def test_an_idempotency_key_belongs_to_one_job(store):
    first = new_job(store, key="k1", digest="a")
    again, created = store.create(Job(id=uuid.uuid4().hex, status=QUEUED, created_at=0, options={}, inputs=[],
                                      max_attempts=3, idempotency_key="k1", payload_hash="b"))
    assert created is False and again.id == first.id and again.payload_hash == "a"


def test_pages_are_newest_first_and_never_repeat(store):
    ids = [new_job(store).id for _ in range(11)]
    seen, before = [], None
    while True:
        page = store.page(4, before, None)
        if not page:
            break
        seen += [j.id for j in page]
        before = page[-1].seq
    assert seen == ids[::-1]


def test_pages_filtered_by_metadata_hold_only_matching_jobs_and_page_on(store):
    """Every tag asked must match; paging with the last seq goes on past jobs that do not match."""
    tagged = []
    for i in range(9):
        job = Job(id=uuid.uuid4().hex, status=QUEUED, created_at=time.time(), options={}, inputs=[], max_attempts=3,
                  metadata={"sweep": "s1" if i % 3 else "s2", "share": str(i)})
        store.create(job)
        if i % 3:
            tagged.append(job.id)
    seen, before = [], None
    while page := store.page(2, before, None, {"sweep": "s1"}):
        seen += [j.id for j in page]
        before = page[-1].seq
    assert seen == tagged[::-1]
    assert [j.metadata for j in store.page(10, None, None, {"sweep": "s1", "share": "4"})] == [{"sweep": "s1",
                                                                                                "share": "4"}]
    assert store.page(10, None, None, {"sweep": "s3"}) == []
    assert store.page(10, None, QUEUED, {"sweep": "s2"})[0].metadata["sweep"] == "s2"


def test_a_webhook_is_due_once_its_job_finishes_and_one_claim_wins(store):
    """webhooks_due: only finished jobs with a pending webhook whose time has come; update_webhook is a
    compare-and-set, so of two senders holding the same state one claims it."""
    from service.webhooks import new_state

    hooked = Job(id=uuid.uuid4().hex, status=QUEUED, created_at=time.time(), options={}, inputs=[], max_attempts=3,
                 webhook=new_state("http://127.0.0.1:9/hook"))
    store.create(hooked)
    new_job(store)  # no webhook: never due
    assert store.webhooks_due(store.now(), 10) == []  # queued: not yet
    claimed = store.claim(pid=1, host="h", lease_s=60)
    assert claimed.id == hooked.id and store.finish(hooked.id, claimed.lease_token, SUCCEEDED)
    (due,) = store.webhooks_due(store.now(), 10)
    assert due.id == hooked.id and due.webhook["state"] == "pending"
    later = {**due.webhook, "next_at": store.now() + 60}
    assert store.update_webhook(due.id, due.webhook, later) is True
    assert store.update_webhook(due.id, due.webhook, later) is False  # the state moved on: the second loses
    assert store.webhooks_due(store.now(), 10) == []  # claimed: due again only after next_at
    assert store.update_webhook(due.id, later, {**later, "state": "delivered", "next_at": 0.0}) is True
    assert store.webhooks_due(store.now(), 10) == [] and store.get(due.id).webhook["state"] == "delivered"


def test_a_data_dir_from_before_job_results_keeps_its_jobs_and_gains_results(tmp_path):
    """The jobs table of an earlier release has no `result` column: opening it adds the column (twice
    over, as the API and its workers all open the store) and its finished jobs read as before."""
    import sqlite3

    from service import sqlite_store

    old_schema = (sqlite_store.SCHEMA.replace("    result TEXT NOT NULL DEFAULT '{}',\n", "")
                  .replace("    metadata TEXT NOT NULL DEFAULT '{}',\n", ""))
    assert "result" not in old_schema and "metadata" not in old_schema
    path = tmp_path / "jobs.db"
    conn = sqlite3.connect(path)
    conn.executescript(old_schema)
    conn.execute("INSERT INTO jobs (id, status, created_at, max_attempts, options, inputs, artifacts) "
                 "VALUES ('old', 'succeeded', 1.0, 3, '{}', '[]', '[]')")
    conn.commit()
    conn.close()
    first, second = SqliteJobStore(path), SqliteJobStore(path)
    assert first.get("old").status == SUCCEEDED and first.get("old").result == {} and first.get("old").metadata == {}
    job = new_job(second)
    claimed = second.claim(pid=1, host="h", lease_s=60)
    assert second.finish(job.id, claimed.lease_token, SUCCEEDED, result={"warnings": ["w"]})
    assert first.get(job.id).result == {"warnings": ["w"]}
