"""One small interface over object storage: `file://` folders and `s3://` buckets.

Keys are always relative, '/'-separated paths under the storage's root URI. Torch-free, so the
control plane (fetch, staging) can use it too.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol
from urllib.parse import urlparse

from jobspecs.errors import InvalidInput, ObjectNotFound


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # relative to the storage root
    size: int


class Storage(Protocol):
    """What the worker and the CLI need from a bucket."""

    uri: str

    def put_file(self, local: Path, key: str) -> None: ...
    def get_file(self, key: str, local: Path) -> None: ...
    def put_bytes(self, data: bytes, key: str) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str = "") -> list[ObjectInfo]: ...
    def delete_prefix(self, prefix: str) -> int: ...


def safe_key(key: str) -> str:
    """Normalise a key and refuse one that climbs out of its root (`..`, absolute paths)."""
    parts = PurePosixPath(key.replace("\\", "/")).parts
    if key.startswith("/") or any(p in ("..", "") for p in parts):
        raise InvalidInput(f"unsafe object key {key!r}")
    return "/".join(p for p in parts if p != ".")


def join_uri(base: str, *parts: str) -> str:
    """`join_uri("s3://b/x", "adapters", "n")` -> `s3://b/x/adapters/n`."""
    out = base.rstrip("/")
    for p in parts:
        out += "/" + safe_key(p.strip("/"))
    return out


class FileStorage:
    """A bucket that is a local folder (`file:///abs/path` or a plain path)."""

    def __init__(self, root: Path):
        self.root = root.resolve()
        self.uri = self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root / safe_key(key) if key else self.root

    def put_file(self, local: Path, key: str) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        # Copy to a temp name then rename: a reader never sees a half-written object.
        tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}")
        shutil.copyfile(local, tmp)
        os.replace(tmp, dest)

    def put_bytes(self, data: bytes, key: str) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, dest)

    def get_file(self, key: str, local: Path) -> None:
        src = self._path(key)
        if not src.is_file():
            raise ObjectNotFound(f"{self.uri}/{key}: no such object")
        local.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, local)

    def get_bytes(self, key: str) -> bytes:
        src = self._path(key)
        if not src.is_file():
            raise ObjectNotFound(f"{self.uri}/{key}: no such object")
        return src.read_bytes()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        base = self._path(prefix.rstrip("/")) if prefix else self.root
        if base.is_file():
            return [ObjectInfo(safe_key(prefix), base.stat().st_size)]
        if not base.is_dir():
            return []
        out = []
        for p in sorted(base.rglob("*")):
            if p.is_file() and not p.name.startswith("."):
                out.append(ObjectInfo(p.relative_to(self.root).as_posix(), p.stat().st_size))
        return out

    def delete_prefix(self, prefix: str) -> int:
        objs = self.list(prefix)
        for o in objs:
            self._path(o.key).unlink(missing_ok=True)
        return len(objs)


def open_storage(uri: str) -> Storage:
    """Storage rooted at `uri`: `file:///path`, a plain local path, or `s3://bucket/prefix`."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        from worker.s3 import S3Storage  # boto3 only when needed

        return S3Storage(parsed.netloc, parsed.path.lstrip("/"))
    if parsed.scheme == "file":
        return FileStorage(Path(parsed.path))
    if parsed.scheme == "":
        return FileStorage(Path(uri))
    raise InvalidInput(f"{uri}: unsupported storage scheme {parsed.scheme!r} (use s3:// or file://)")
