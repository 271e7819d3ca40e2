"""The one small interface every bucket backend implements (fsspec-like), and safe keys.

Keys are always relative, '/'-separated paths under the storage's root URI. Backends live in
their own modules (`files`, `s3`); `backends.open_storage` picks one by URL scheme.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol

from lorajobs.jobspecs.failures import InvalidInput


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # relative to the storage root ("" when the root itself is one object)
    size: int
    # Changes whenever the content may have: the S3 ETag, or mtime+size for a folder.
    etag: str = ""
    # Last modified, seconds since the epoch (0.0 when unknown).
    modified: float = 0.0


# Called with a number of bytes just moved (progress bars); may be called from any thread.
BytesCallback = Callable[[int], None] | None


class Storage(Protocol):
    """What the worker and the CLI need from a bucket."""

    uri: str

    def put_file(self, local: Path, key: str, *, callback: BytesCallback = None) -> None: ...
    def get_file(self, key: str, local: Path, *, callback: BytesCallback = None) -> None: ...
    def put_bytes(self, data: bytes, key: str) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def get_range(self, key: str, start: int, length: int) -> bytes: ...
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
