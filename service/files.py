"""Inputs uploaded once and named by id in many jobs (`/v1/files`): content-addressed, deduplicated.

    DATA_DIR/files/<sha256>        the bytes (immutable)
    DATA_DIR/files/<sha256>.json   {id, purpose, name, size, sha256, created_at}

A file's id is the sha256 of its bytes, so a client can compute it before uploading and ask whether the
service already holds it. Uploads pass the same limits and the same checks as a job's own uploads
(a model parses and holds no external data; a calibration archive is safe and finite); the check
against the models' input names happens when a job names the file. A job takes its own copy (a hard
link where it can), so deleting a file never touches a job that used it.

With several API replicas, DATA_DIR/files must be one shared volume (like DATA_DIR with SQLite).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

from onnxzip.load import check_npz, load_model

from .artifacts import copy_hashed, fsync_dir, write_atomic
from .errors import ApiError
from .uploads import VALIDATING, client_name, too_large

Purpose = Literal["model", "calibration"]
_FILE_ID = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class StoredFile:
    id: str
    purpose: str
    name: str
    size: int
    sha256: str
    created_at: float


class FileStore:
    def __init__(self, data_dir: Path):
        self.root = Path(data_dir) / "files"
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, file_id: str) -> Path:
        if not _FILE_ID.match(file_id):  # ids are sha256 hex; anything else never touches the disk
            raise ValueError(f"not a file id: {file_id[:80]!r}")
        return self.root / file_id

    def add(self, upload, purpose: Purpose, limit: int, limit_env: str) -> tuple[StoredFile, bool]:
        """Store an upload (checked) unless the same bytes are here; returns the file and whether it is new."""
        name = client_name(upload.filename, f"upload.{'onnx' if purpose == 'model' else 'npz'}")
        fd, temp = tempfile.mkstemp(prefix=".upload-", dir=self.root)
        os.close(fd)
        try:
            upload.file.seek(0)
            try:
                size, sha256 = copy_hashed(upload.file, Path(temp), limit)
            except OverflowError as err:
                raise too_large(purpose, name, limit, limit_env) from err
            existing = self.get(sha256)
            if existing is not None:
                if existing.purpose != purpose:
                    raise ApiError(409, "file_exists", f"'{name}' is already stored as a {existing.purpose} "
                                                       f"(file {sha256}); it cannot also be a {purpose}")
                return existing, False
            _check(Path(temp), purpose, name, limit)
            stored = StoredFile(id=sha256, purpose=purpose, name=name, size=size, sha256=sha256,
                                created_at=time.time())
            os.replace(temp, self.root / sha256)
            write_atomic(self.root, f"{sha256}.json", json.dumps(asdict(stored)).encode())
            fsync_dir(self.root)
            return stored, True
        finally:
            Path(temp).unlink(missing_ok=True)

    def get(self, file_id: str) -> Optional[StoredFile]:
        if not _FILE_ID.match(file_id):
            return None
        try:
            meta = json.loads((self._path(file_id).with_suffix(".json")).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return StoredFile(**meta)

    def require(self, file_id: str, purpose: Purpose, field: str) -> StoredFile:
        """The file a job names, which must exist and be of the purpose the field takes."""
        stored = self.get(file_id)
        if stored is None:
            raise ApiError(422, "file_not_found", f"{field}: no file '{file_id[:80]}' here; upload it with "
                                                  "POST /v1/files first (its id is the sha256 that answers)")
        if stored.purpose != purpose:
            raise ApiError(422, "invalid_request", f"{field}: file {file_id} is a {stored.purpose}, not a "
                                                   f"{purpose}")
        return stored

    def list(self, purpose: Optional[str] = None) -> list[StoredFile]:
        files = []
        for meta in self.root.glob("*.json"):
            stored = self.get(meta.stem)
            if stored is not None and (purpose is None or stored.purpose == purpose):
                files.append(stored)
        return sorted(files, key=lambda f: f.created_at, reverse=True)

    def delete(self, file_id: str) -> bool:
        if not _FILE_ID.match(file_id):
            return False
        path = self._path(file_id)
        found = path.with_suffix(".json").exists()
        path.with_suffix(".json").unlink(missing_ok=True)  # first: a file without its record is not listed
        path.unlink(missing_ok=True)
        return found

    def copy_to(self, file_id: str, target: Path) -> None:
        """A job's own copy: a hard link (same volume, no bytes copied), else a copy."""
        source = self._path(file_id)
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)


def _check(path: Path, purpose: str, name: str, limit: int) -> None:
    with VALIDATING:
        if purpose == "model":
            load_model(str(path), allow_external_data=False, label=name)
        else:
            check_npz(str(path), max_bytes=limit, label=name)
