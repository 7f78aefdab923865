"""The scale-out job store: job records, events, leases and idempotency keys in Redis, shared by every API
instance and every worker machine.

Every state change is one Lua script (redis_scripts.py: atomic on the server, timestamps from the server's clock, so leases
mean the same on every machine), and every worker write matches the lease token, exactly as the SQLite
store does. A change that puts a job in the queue (create, requeue, release) runs in one MULTI/EXEC with
the RQ enqueue of that job's *dispatch* (see `Dispatcher`), under WATCH of the keys it decided on: the
record and its queue entry are written together or not at all, and a stale decision is retried.

Keys (NS = settings.queue_name, "onnxzip" by default):

    NS:job:<id>          hash: the Job's fields (options/inputs/artifacts as JSON), plus `dispatch`,
                         the id of the queue entry allowed to claim it, and `dispatched_at`
    NS:jobs              sorted set: id by seq (the list, newest first)
    NS:status:<status>   sorted set: id by seq, one per status (filtered lists, the oldest queued job,
                         the running jobs the supervisors watch)
    NS:finished          sorted set: id by finished_at (retention)
    NS:webhooks          sorted set: id by when its pending webhook is due (finished jobs that named one)
    NS:events:<id>       sorted set: event JSON by event id (1, 2, ... within the job)
    NS:key:<key>         string: the job id an Idempotency-Key belongs to
    NS:seq               counter
"""

from __future__ import annotations

import json
import secrets
from dataclasses import fields
from typing import Callable, Optional, Protocol

import redis

from .redis_scripts import SCRIPTS
from .store import (CANCEL, CANCELLED, CANCELLED_ERROR, FAILED, HELD, LOST, QUEUED, RUNNING, Event, Job,
                    worker_lost_message)

_JOB_FIELDS = {f.name for f in fields(Job)}
_INTS = {"seq", "attempts", "max_attempts", "worker_pid"}
_FLOATS = {"progress", "created_at", "started_at", "finished_at", "lease_expires", "cancel_requested_at"}
_JSON = {"options", "inputs", "artifacts", "result", "metadata", "webhook"}
METADATA_SCAN = 10_000  # jobs read for one page of a metadata-filtered list (Redis keeps no index on it)


class Dispatcher(Protocol):
    """Puts a job's dispatch on the queue inside the caller's MULTI; says whether a dispatch is still there."""

    def enqueue(self, pipe: redis.client.Pipeline, job_id: str, dispatch: str) -> None: ...
    def pending(self, job_id: str, dispatch: str) -> bool: ...
    def discard(self, job_id: str, dispatch: str) -> None: ...
    def describe(self) -> dict: ...


def new_dispatch() -> str:
    return secrets.token_hex(8)


class RedisJobStore:
    """`JobStore` in Redis; safe to share between threads, processes and machines."""

    REDISPATCH_AFTER_S = 30.0  # a queued job whose queue entry has vanished this long is dispatched again

    def __init__(self, client: redis.Redis, namespace: str, dispatcher: Optional[Dispatcher] = None):
        self.redis, self.ns, self.dispatcher = client, namespace, dispatcher
        self._scripts = {name: client.register_script(body) for name, body in SCRIPTS.items()}

    # --- plumbing -----------------------------------------------------------------------------------

    def _key(self, *parts: str) -> str:
        return ":".join((self.ns, *parts))

    def _run(self, name: str, *args, client=None):
        return self._scripts[name](args=[self.ns, *map(str, args)], client=client or self.redis)

    @staticmethod
    def _job(flat: dict) -> Optional[Job]:
        if not flat:
            return None
        data = {}
        for raw_key, raw in flat.items():
            key, value = _text(raw_key), _text(raw)
            if key not in _JOB_FIELDS:
                continue
            if key in _INTS:
                value = int(value)
            elif key in _FLOATS:
                value = float(value)
            elif key in _JSON:
                value = json.loads(value)
            data[key] = value
        return Job(**data)

    def _jobs(self, ids: list) -> list[Job]:
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hgetall(self._key("job", _text(job_id)))
            rows = pipe.execute()
        return [job for job in map(self._job, rows) if job is not None]  # deleted meanwhile: skipped

    def _dispatching(self, job_id: str, watch: list[str], decide: Callable[[redis.client.Pipeline], Optional[str]],
                     write: Callable[[redis.client.Pipeline, str], None]):
        """Run `write` and the enqueue of a fresh dispatch of `job_id` in one MULTI, under WATCH of `watch`.

        `decide` reads (under WATCH) and returns None to go on, or a value to return without writing."""
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    if watch:
                        pipe.watch(*watch)
                    early = decide(pipe)
                    if early is not None:
                        pipe.unwatch()
                        return early, None
                    dispatch = new_dispatch()
                    pipe.multi()
                    write(pipe, dispatch)
                    if self.dispatcher is not None:
                        self.dispatcher.enqueue(pipe, job_id, dispatch)
                    return None, pipe.execute()[0]
                except redis.WatchError:
                    continue  # someone changed what we decided on: decide again

    # --- the API ------------------------------------------------------------------------------------

    def create(self, job: Job) -> tuple[Job, bool]:
        key = job.idempotency_key
        watch = [self._key("key", key)] if key is not None else []

        def decide(pipe):  # a key already used: that job, nothing written
            return _text(pipe.get(watch[0])) if watch else None

        def write(pipe, dispatch):
            self._run("create", job.id, key or "", job.payload_hash or "", job.max_attempts,
                      json.dumps(job.options), json.dumps(job.inputs), dispatch, json.dumps(job.metadata),
                      json.dumps(job.webhook), client=pipe)

        existing, result = self._dispatching(job.id, watch, decide, write)
        if existing is not None:
            return self.get(existing), False
        created, job_id = result
        return self.get(_text(job_id)), bool(created)

    def get(self, job_id: str) -> Optional[Job]:
        return self._job(self.redis.hgetall(self._key("job", job_id)))

    def find_by_key(self, key: str) -> Optional[Job]:
        job_id = self.redis.get(self._key("key", key))
        return self.get(_text(job_id)) if job_id is not None else None

    def page(self, limit: int, before_seq: Optional[int], status: Optional[str],
             metadata: Optional[dict[str, str]] = None) -> list[Job]:
        index = self._key("status", status) if status is not None else self._key("jobs")
        top = f"({before_seq}" if before_seq is not None else "+inf"
        if not metadata:
            return self._jobs(self.redis.zrevrangebyscore(index, top, "-inf", start=0, num=limit))
        # Redis has no index on metadata: read the index newest first in chunks, keeping the jobs that match,
        # up to METADATA_SCAN jobs a page (the next page goes on from the last job returned)
        found, scanned = [], 0
        while len(found) < limit and scanned < METADATA_SCAN:
            chunk = self.redis.zrevrangebyscore(index, top, "-inf", start=0, num=200, withscores=True)
            if not chunk:
                break
            scanned += len(chunk)
            found += [j for j in self._jobs([job_id for job_id, _ in chunk])
                      if all(j.metadata.get(k) == v for k, v in metadata.items())]
            top = f"({int(chunk[-1][1])}"
        return found[:limit]

    def request_cancel(self, job_id: str) -> Optional[Job]:
        result = self._run("cancel", job_id, *CANCELLED_ERROR)
        if not result:
            return None
        self._discard(job_id, _text(result[1]))  # a cancelled queued job: its queue entry has nothing to do
        return self.get(job_id)

    def delete(self, job_id: str) -> Optional[Job]:
        flat = self._run("delete", job_id)
        if not flat:
            return None
        data = {_text(k): v for k, v in zip(flat[::2], flat[1::2])}
        job = self._job(data)
        if job.status == QUEUED:
            self._discard(job_id, _text(data.get("dispatch")))
        return job

    def _discard(self, job_id: str, dispatch: Optional[str]) -> None:
        if dispatch and self.dispatcher is not None:
            self.dispatcher.discard(job_id, dispatch)

    def events(self, job_id: str, after: int, limit: int) -> list[Event]:
        rows = self.redis.zrangebyscore(self._key("events", job_id), f"({after}", "+inf", start=0, num=limit)
        events = []
        for row in rows:
            data = json.loads(row)
            data.setdefault("stage", None)
            events.append(Event(**{k: data[k] for k in ("id", "job_id", "at", "type", "status", "stage",
                                                        "progress", "message")}))
        return events

    def check_writable(self) -> None:
        self.redis.set(self._key("ready_probe"), repr(self.now()))

    # --- workers ------------------------------------------------------------------------------------

    def claim(self, pid: int, host: str, lease_s: float) -> Optional[Job]:
        """The oldest queued job, whatever its dispatch (the embedded pool's way; RQ workers use claim_job)."""
        return self.claim_job("", "", pid, host, lease_s)

    def claim_job(self, job_id: str, dispatch: str, pid: int, host: str, lease_s: float) -> Optional[Job]:
        """Claim this job for this dispatch: None when it is no longer queued under that dispatch
        (cancelled, deleted, claimed already, or queued again under a newer one)."""
        token = secrets.token_hex(16)
        claimed = self._run("claim", job_id, dispatch, token, pid, host, lease_s)
        return self.get(_text(claimed)) if claimed else None

    def renew(self, job_id: str, token: str, lease_s: float) -> str:
        return {"held": HELD, "cancel": CANCEL}.get(_text(self._run("renew", job_id, token, lease_s)), LOST)

    def lease_state(self, job_id: str, token: str) -> str:
        status, held, cancel = self.redis.hmget(self._key("job", job_id), "status", "lease_token",
                                                "cancel_requested_at")
        if _text(status) != RUNNING or _text(held) != token:
            return LOST
        return CANCEL if cancel is not None else HELD

    def progress(self, job_id: str, token: str, stage: str, progress: float, message: str) -> bool:
        return bool(self._run("progress", job_id, token, stage, repr(float(progress)), message))

    def finish(self, job_id: str, token: str, status: str, *, error: Optional[tuple[str, str]] = None,
               artifacts: Optional[list[dict]] = None, publish: Optional[Callable[[], None]] = None,
               result: Optional[dict] = None) -> bool:
        """End the attempt. Redis cannot hold a lock around files, so `publish` must be None: artifacts
        here are written under the attempt's own names before the record points at them."""
        if publish is not None:
            raise ValueError("the Redis store cannot fence a publish step: use attempt-addressed artifacts")
        if status == CANCELLED and error is None:
            error = CANCELLED_ERROR
        code, text = error or ("", "")
        return bool(self._run("finish", job_id, token, status, code, text, json.dumps(artifacts or []),
                              json.dumps(result or {})))

    # --- the supervisors ----------------------------------------------------------------------------

    def running(self) -> list[Job]:
        return self._jobs(self.redis.zrange(self._key("status", RUNNING), 0, -1))

    def requeue_lost(self, job_id: str, token: str, reason: str) -> Optional[str]:
        return self._requeue(job_id, token, "lost", reason)

    def release(self, job_id: str, token: str, reason: str) -> bool:
        return self._requeue(job_id, token, "release", reason) is not None

    def _requeue(self, job_id: str, token: str, mode: str, reason: str) -> Optional[str]:
        key = self._key("job", job_id)
        facts = {}

        def decide(pipe):
            status, held, cancel, attempts, max_attempts = (_text(v) for v in pipe.hmget(
                key, "status", "lease_token", "cancel_requested_at", "attempts", "max_attempts"))
            if status != RUNNING or held != token:
                return "not_held"
            facts["lost"] = worker_lost_message(int(attempts), reason)
            facts["queued"] = (f"requeued: {reason} (attempt {attempts} of {max_attempts} used)" if mode == "lost"
                               else f"requeued: {reason}")
            ends = mode == "lost" and (cancel is not None or int(attempts) >= int(max_attempts))
            return "ends" if ends else None

        def write(pipe, dispatch):
            self._run("requeue", job_id, token, mode, dispatch, facts["queued"], facts["lost"], *CANCELLED_ERROR,
                      client=pipe)

        early, result = self._dispatching(job_id, [key], decide, write)
        if early == "not_held":
            return None
        if early == "ends":  # cancelled, or out of attempts: the job ends, nothing to enqueue
            result = self._run("requeue", job_id, token, mode, "", facts["queued"], facts["lost"],
                               *CANCELLED_ERROR)
        return {QUEUED: QUEUED, CANCELLED: CANCELLED, FAILED: FAILED}.get(_text(result))

    def finished_before(self, cutoff: float) -> list[str]:
        return [_text(i) for i in self.redis.zrangebyscore(self._key("finished"), "-inf", f"({cutoff}")]

    # --- the webhook sender ---------------------------------------------------------------------------

    def webhooks_due(self, now: float, limit: int) -> list[Job]:
        index = self._key("webhooks")
        ids = [_text(i) for i in self.redis.zrangebyscore(index, "-inf", now, start=0, num=4 * limit)]
        jobs = {job.id: job for job in self._jobs(ids)}  # one round trip; deleted jobs are missing
        due = []
        for job_id in ids:
            job = jobs.get(job_id)
            if job is None or job.webhook.get("state") != "pending":
                self.redis.zrem(index, job_id)  # deleted, delivered or given up: nothing more to send
            elif job.webhook.get("next_at", 0.0) <= now and len(due) < limit:
                due.append(job)
            else:
                self.redis.zadd(index, {job_id: job.webhook.get("next_at", now)}, xx=True)
        return due

    def update_webhook(self, job_id: str, expected: dict, new: dict) -> bool:
        key = self._key("job", job_id)
        with self.redis.pipeline() as pipe:
            try:
                pipe.watch(key)
                current = pipe.hget(key, "webhook")
                if current is None or json.loads(current) != expected:
                    pipe.unwatch()
                    return False
                pipe.multi()
                pipe.hset(key, "webhook", json.dumps(new))
                if new.get("state") == "pending":
                    pipe.zadd(self._key("webhooks"), {job_id: new["next_at"]})
                else:
                    pipe.zrem(self._key("webhooks"), job_id)
                pipe.execute()
                return True
            except redis.WatchError:
                return False

    def now(self) -> float:
        seconds, micros = self.redis.time()
        return seconds + micros / 1e6

    def maintain(self) -> None:
        """Dispatch again the queued jobs whose queue entry vanished (RQ fails an entry stuck between its
        queue and its registry, a worker can die between dequeue and claim, a Redis restart can lose the
        tail of its log): the record is the truth, so such a job waits for nobody."""
        if self.dispatcher is None:
            return
        horizon = self.now() - self.REDISPATCH_AFTER_S
        for job_id, dispatch, at in self._queued_dispatches():
            if at > horizon or self.dispatcher.pending(job_id, dispatch):
                continue
            key = self._key("job", job_id)

            def decide(pipe, dispatch=dispatch, key=key):
                status, current = (_text(v) for v in pipe.hmget(key, "status", "dispatch"))
                return "changed" if status != QUEUED or current != dispatch else None

            def write(pipe, fresh, job_id=job_id, dispatch=dispatch):
                self._run("redispatch", job_id, dispatch, fresh, client=pipe)

            self._dispatching(job_id, [key], decide, write)

    def _queued_dispatches(self) -> list[tuple[str, str, float]]:
        ids = [_text(i) for i in self.redis.zrange(self._key("status", QUEUED), 0, -1)]
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hmget(self._key("job", job_id), "dispatch", "dispatched_at")
            rows = pipe.execute()
        return [(job_id, _text(d), float(at)) for job_id, (d, at) in zip(ids, rows) if d is not None and at]

    def describe(self) -> dict:
        return {"kind": "redis", "namespace": self.ns,
                **(self.dispatcher.describe() if self.dispatcher is not None else {"queue": "none"})}


def _text(value) -> Optional[str]:
    return value.decode() if isinstance(value, bytes) else value
