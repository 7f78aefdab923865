"""Inputs and artifacts on S3-compatible storage (AWS S3, MinIO, Ceph, R2...), through boto3.

    PREFIX jobs/<id>/inputs/<stored name>            what the API accepted (uploaded before the job exists)
    PREFIX jobs/<id>/attempts/<lease>/<artifact>     what one attempt wrote

Objects are never renamed or overwritten: an attempt uploads every artifact under its own lease token,
then the lease holder's record names that attempt (see artifacts.py). Each object carries its sha256 in
its metadata. Uploads and downloads stream in parts (boto3's managed transfers), so neither the API nor
a worker holds a whole model in memory to move it. Uploads are staged on local disk first (data_dir).
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError

from .artifacts import _JOB_ID, MEDIA_TYPES, ArtifactStore, digest
from .settings import Settings

_CHUNK = 1 << 20
_TRANSFER = TransferConfig(multipart_threshold=16 << 20, multipart_chunksize=16 << 20, max_concurrency=4)


class S3Artifacts:
    """The artifact store's methods over one bucket and prefix."""

    def __init__(self, settings: Settings):
        self.bucket, self.prefix = settings.s3_bucket, settings.s3_prefix
        self.endpoint, self.region = settings.s3_endpoint_url, settings.s3_region
        self.local = ArtifactStore(settings.data_dir)  # staging of uploads, scratch for workers
        self.scratch = self.local.root / "scratch"
        self.scratch.mkdir(parents=True, exist_ok=True)
        self._clients: dict[int, object] = {}
        self._lock = threading.Lock()

    @property
    def s3(self):
        """One client per process (boto3 clients are thread-safe, not fork-safe)."""
        pid = os.getpid()
        with self._lock:
            if pid not in self._clients:
                config = Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=5, read_timeout=60,
                                s3={"addressing_style": "path"} if self.endpoint else {})
                self._clients[pid] = boto3.session.Session().client(
                    "s3", endpoint_url=self.endpoint, region_name=self.region, config=config)
            return self._clients[pid]

    def _job_prefix(self, job_id: str) -> str:
        if not _JOB_ID.match(job_id):  # ids are ours (uuid4 hex); anything else never becomes a key
            raise ValueError(f"not a job id: {job_id!r}")
        return f"{self.prefix}jobs/{job_id}/"

    # --- the API: uploads in, artifacts out -----------------------------------------------------------

    def new_staging(self) -> Path:
        return self.local.new_staging()

    def adopt_inputs(self, staging: Path, job_id: str) -> None:
        """Upload an accepted submission's files (before the job exists, so a worker always finds them)."""
        prefix = self._job_prefix(job_id) + "inputs/"
        for path in sorted(staging.iterdir()):
            self.s3.upload_file(str(path), self.bucket, prefix + path.name, Config=_TRANSFER)

    def local_path(self, job_id: str, meta: dict) -> Optional[Path]:
        return None  # served by streaming from the bucket

    def open(self, job_id: str, meta: dict) -> Iterator[bytes]:
        """The artifact's bytes in 1 MiB chunks, as the bucket sends them."""
        key = self._job_prefix(job_id) + meta["key"]
        try:
            body = self.s3.get_object(Bucket=self.bucket, Key=key)["Body"]
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise FileNotFoundError(f"s3://{self.bucket}/{key}") from err
            raise

        def chunks() -> Iterator[bytes]:
            try:
                yield from body.iter_chunks(_CHUNK)
            finally:
                body.close()

        return chunks()

    # --- workers ------------------------------------------------------------------------------------

    @contextmanager
    def inputs(self, job_id: str, stored_names: list[str]) -> Iterator[dict[str, Path]]:
        """Download a job's inputs to a scratch folder for the merge; removed afterwards."""
        folder = Path(tempfile.mkdtemp(prefix=f"{job_id}-", dir=self.scratch))
        try:
            prefix = self._job_prefix(job_id) + "inputs/"
            paths = {}
            for name in stored_names:
                paths[name] = folder / name
                self.s3.download_file(self.bucket, prefix + name, str(paths[name]), Config=_TRANSFER)
            yield paths
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def save(self, job_id: str, token: str, files: dict[str, bytes]) -> tuple[list[dict], Optional[Callable]]:
        """Upload one attempt's artifacts under its lease token; the record naming them is the publish step."""
        prefix = self._job_prefix(job_id) + f"attempts/{token}/"
        metas = []
        for name, data in files.items():
            meta = digest(name, data)
            self.s3.upload_fileobj(io.BytesIO(data), self.bucket, prefix + name, Config=_TRANSFER, ExtraArgs={
                "ContentType": MEDIA_TYPES.get(name, "application/octet-stream"),
                "Metadata": {"sha256": meta["sha256"]}})
            metas.append({**meta, "key": f"attempts/{token}/{name}"})
        return metas, None

    def prune(self, job_id: str, token: str) -> None:
        """After attempt `token` became the job's: delete what other attempts uploaded."""
        keep = self._job_prefix(job_id) + f"attempts/{token}/"
        self._delete(self._job_prefix(job_id) + "attempts/", lambda key: not key.startswith(keep))

    def discard_work(self, job_id: str, token: str) -> None:
        self._delete(self._job_prefix(job_id) + f"attempts/{token}/")

    # --- supervisors ----------------------------------------------------------------------------------

    def remove(self, job_id: str) -> None:
        self._delete(self._job_prefix(job_id))

    def sweep_orphans(self, is_known: Callable[[str], bool], older_than_s: float) -> list[str]:
        """Delete job prefixes without a record whose newest object is older than `older_than_s`, and
        abandoned local uploads."""
        removed = self.local.sweep_orphans(lambda name: True, older_than_s)  # local: uploads/ only
        cutoff = time.time() - older_than_s
        pages = self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=f"{self.prefix}jobs/", Delimiter="/")
        for page in pages:
            for common in page.get("CommonPrefixes", []):
                job_id = common["Prefix"].rstrip("/").rsplit("/", 1)[-1]
                if not _JOB_ID.match(job_id) or is_known(job_id):
                    continue
                newest = max((o["LastModified"].timestamp() for o in self._objects(common["Prefix"])), default=0)
                if newest < cutoff:
                    self._delete(common["Prefix"])
                    removed.append(job_id)
        return removed

    def check(self) -> str:
        self.s3.head_bucket(Bucket=self.bucket)
        return f"ok (s3://{self.bucket}/{self.prefix})"

    def describe(self) -> dict:
        return {"kind": "s3", "bucket": self.bucket, "prefix": self.prefix,
                "endpoint": self.endpoint or "AWS", "region": self.region or "from the AWS configuration"}

    # --- plumbing -------------------------------------------------------------------------------------

    def _objects(self, prefix: str) -> Iterator[dict]:
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            yield from page.get("Contents", [])

    def _delete(self, prefix: str, where: Callable[[str], bool] = lambda key: True) -> None:
        keys = [o["Key"] for o in self._objects(prefix) if where(o["Key"])]
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            self.s3.delete_objects(Bucket=self.bucket, Delete={
                "Objects": [{"Key": k} for k in keys[start:start + 1000]], "Quiet": True})
