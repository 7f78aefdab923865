"""Completion webhooks: when a job that named a `webhook_url` finishes, the API process POSTs it the job.

Delivery never runs in a merge worker: a thread of the API process (`WebhookSender`) looks for
finished jobs whose webhook is due, claims each by a compare-and-set on its webhook state (so several
API replicas deliver each once), and POSTs. A 2xx ends it `delivered`; anything else is retried with
exponential backoff (ONNXZIP_WEBHOOK_BACKOFF_S, doubling, at most 5 minutes apart) until
ONNXZIP_WEBHOOK_ATTEMPTS tries, then it is `failed`. The job shows the state (`webhook`).

Signed as Standard Webhooks do: headers `webhook-id` (the job id: the same on every retry, for
deduplication), `webhook-timestamp` (Unix seconds) and `webhook-signature` = `v1,` + base64 of
HMAC-SHA256 over `{id}.{timestamp}.{body}` keyed with the UTF-8 bytes of ONNXZIP_WEBHOOK_SECRET.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional
from urllib.parse import urlsplit

import httpx

from .errors import ApiError
from .store import Job

log = logging.getLogger("onnxzip.service")

MAX_DELAY_S = 300.0
CLAIM_S = 60.0  # a claimed delivery another replica may retake after this (a replica that died mid-send)
TIMEOUT_S = 10.0
TICK_S = 0.5


def new_state(url: Optional[str]) -> dict:
    """A job's webhook state at submit time: pending until the job finishes, then due at once."""
    return {"url": url, "state": "pending", "attempts": 0, "next_at": 0.0, "last_error": None,
            "delivered_at": None} if url else {}


def check_url(url: Optional[str], secret_set: bool) -> Optional[str]:
    """The `webhook_url` field: an absolute http(s) URL, and only on a service that can sign."""
    if url is None or not url.strip():
        return None
    url = url.strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or len(url) > 2000:
        raise ApiError(422, "invalid_request", f"webhook_url '{url[:80]}' is not an absolute http(s) URL of at "
                                               "most 2000 characters")
    if not secret_set:
        raise ApiError(422, "webhooks_disabled", "this service signs no webhooks: its operator must set "
                                                 "ONNXZIP_WEBHOOK_SECRET (then receivers can verify them); poll "
                                                 "GET /v1/merges/{id} or follow its events meanwhile")
    return url


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def backoff(attempts: int, base_s: float) -> float:
    return min(MAX_DELAY_S, base_s * 2 ** max(0, attempts - 1))


class WebhookSender:
    """The API process's delivery thread (started and stopped with the app)."""

    def __init__(self, store, secret: str, max_attempts: int, backoff_s: float, body_of):
        self.store, self.secret = store, secret
        self.max_attempts, self.backoff_s = max_attempts, backoff_s
        self.body_of = body_of  # Job -> the JSON the receiver gets
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._pool = ThreadPoolExecutor(4, thread_name_prefix="webhook")  # a slow receiver delays no other
        self._client = httpx.Client(timeout=TIMEOUT_S, follow_redirects=False)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="webhooks", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._client.close()

    def _run(self) -> None:
        failing_since = None
        while not self._stop.is_set():
            try:
                self.tick()
                failing_since = None
            except Exception as err:  # the store is out of reach: try again, say so once a minute
                if failing_since is None or time.monotonic() - failing_since > 60:
                    log.warning("webhook delivery paused: %s: %s", type(err).__name__, err)
                    failing_since = time.monotonic()
            self._stop.wait(TICK_S)

    def tick(self) -> None:
        now = self.store.now()
        for job in self.store.webhooks_due(now, 20):
            claimed = {**job.webhook, "next_at": now + CLAIM_S}
            if self.store.update_webhook(job.id, job.webhook, claimed):
                self._pool.submit(self._deliver, job, claimed)

    def _deliver(self, job: Job, claimed: dict) -> None:
        body = json.dumps(self.body_of(job), separators=(",", ":")).encode()
        timestamp = int(time.time())
        headers = {"content-type": "application/json", "user-agent": "onnxzip-webhooks",
                   "webhook-id": job.id, "webhook-timestamp": str(timestamp),
                   "webhook-signature": sign(self.secret, job.id, timestamp, body)}
        attempts = claimed["attempts"] + 1
        try:
            response = self._client.post(claimed["url"], content=body, headers=headers)
            error = None if 200 <= response.status_code < 300 else f"HTTP {response.status_code}"
        except httpx.HTTPError as err:
            error = f"{type(err).__name__}: {err}"[:300]
        now = self.store.now()
        if error is None:
            state = {**claimed, "state": "delivered", "attempts": attempts, "delivered_at": now, "last_error": None}
        elif attempts >= self.max_attempts:
            state = {**claimed, "state": "failed", "attempts": attempts, "last_error": error}
            log.warning("webhook for job %s failed after %d attempts: %s", job.id, attempts, error)
        else:
            state = {**claimed, "attempts": attempts, "last_error": error,
                     "next_at": now + backoff(attempts, self.backoff_s)}
        try:
            self.store.update_webhook(job.id, claimed, state)
        except Exception as err:  # the claim runs out and the delivery is retried: at least once, not lost
            log.warning("webhook state of job %s not saved: %s", job.id, err)
