"""The verified, resumable, parallel download engine that fetches and pulls share, and the
thread-pool helper uploads use: small files whole, large ones in ranged chunks that survive a
broken-off download.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorajobs.jobspecs.failures import IntegrityError, InvalidInput, StorageError
from lorajobs.storage.base import BytesCallback, Storage

DEFAULT_CONCURRENCY = 16
# Files above this size are fetched in ranged chunks of this size: in parallel, and resumable.
DEFAULT_CHUNK = 8 * 1024 * 1024


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (adapters and models can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Wanted:
    """One object to download: from `key` in a storage to `rel` under a destination folder."""

    key: str
    rel: str  # '/'-separated, already checked to stay inside the destination
    size: int
    sha256: str | None = None  # verified when known (manifests, markers)
    etag: str = ""  # ties a resumable partial download to one version of the object


def download_files(
    storage: Storage,
    wanted: list[Wanted],
    dest: Path,
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
    chunk_size: int = DEFAULT_CHUNK,
    on_bytes: BytesCallback = None,
    where: str = "",
    private: bool = False,
) -> int:
    """Download `wanted` into `dest`, in parallel; returns the bytes transferred.

    Each file appears under its own name only once complete and verified (size, and sha256 when
    known). Small files take one GET each; a file above `chunk_size` is fetched in ranged chunks
    (in parallel with everything else) into `.<name>.partial`, with the chunks done recorded in
    `.<name>.partial.json`: a download that broke off resumes from there. The first failure
    stops the rest and is raised. `private`: nobody reads `dest` until it is renamed into place
    as a whole, so small files skip the temp-name-and-rename (a write cut short leaves a file of
    the wrong size, which a resume does not trust).
    """
    if chunk_size < 1:
        raise InvalidInput(f"chunk size must be positive (got {chunk_size})")
    for parent in sorted({os.path.dirname(w.rel) for w in wanted}):
        os.makedirs(dest / parent, exist_ok=True)
    run = _Download(storage, dest, chunk_size, on_bytes, where, private)
    big = [_Chunked(w, dest, chunk_size, where) for w in wanted if w.size > chunk_size]
    small = [w for w in wanted if w.size <= chunk_size]
    pool = ThreadPoolExecutor(max_workers=max(1, concurrency))
    try:
        # Chunks of big files first: they then overlap with the long tail of small files.
        futures = [pool.submit(run.chunk, f, i) for f in big for i in f.todo]
        futures += [pool.submit(run.small, w) for w in small]
        for fut in as_completed(futures):
            fut.result()
        # Verify the big files (in parallel: hashlib releases the GIL) and rename them.
        for fut in as_completed([pool.submit(f.finish) for f in big]):
            fut.result()
    finally:
        # On failure queued work is dropped; chunks already written stay for a resume.
        pool.shutdown(wait=True, cancel_futures=True)
        for f in big:
            f.close()
    return run.moved


class _Download:
    """One `download_files` call: fetch a small file whole or one chunk of a big one, and
    count the bytes moved (from any thread)."""

    def __init__(
        self,
        storage: Storage,
        dest: Path,
        chunk_size: int,
        on_bytes: BytesCallback,
        where: str,
        private: bool,
    ) -> None:
        self.storage, self.root, self.chunk_size = storage, str(dest), chunk_size
        self.on_bytes, self.where, self.private = on_bytes, where, private
        self.moved = 0
        self._lock = threading.Lock()

    def count(self, n: int) -> None:
        with self._lock:
            self.moved += n
        if self.on_bytes is not None:
            self.on_bytes(n)

    def small(self, w: Wanted) -> None:
        data = self.storage.get_bytes(w.key)
        self.count(len(data))
        if w.sha256 is not None:
            got = hashlib.sha256(data).hexdigest()
            if got != w.sha256:
                raise _mismatch(self.where, w.rel, w.sha256, got)
        elif len(data) != w.size:
            raise _changed(self.where, w.rel, w.size, len(data))
        path = os.path.join(self.root, w.rel)
        if self.private:
            with open(path, "wb") as f:
                f.write(data)
            return
        head, name = os.path.split(path)
        tmp = os.path.join(head, f".{name}.part-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)

    def chunk(self, f: _Chunked, i: int) -> None:
        start = i * self.chunk_size
        length = min(self.chunk_size, f.w.size - start)
        data = self.storage.get_range(f.w.key, start, length)
        self.count(len(data))
        if len(data) != length:
            f.discard()
            if f.w.sha256 is not None:
                raise IntegrityError(
                    f"{self.where}/{f.w.rel}: sha256 mismatch (the object is shorter "
                    f"than the {f.w.size} bytes recorded)"
                )
            raise _changed(self.where, f.w.rel, f.w.size, start + len(data))
        f.write(i, data)


class _Chunked:
    """A big file being downloaded in chunks, resumable through its `.partial.json` record."""

    def __init__(self, w: Wanted, dest: Path, chunk: int, where: str):
        self.w, self.where = w, where
        self.path = dest / w.rel
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.partial = self.path.with_name(f".{self.path.name}.partial")
        self.record = self.path.with_name(f".{self.path.name}.partial.json")
        self.ident = {
            "key": w.key,
            "size": w.size,
            "sha256": w.sha256,
            "etag": w.etag,
            "chunk": chunk,
        }
        self.lock = threading.Lock()
        self.done: set[int] = set()
        try:
            rec = json.loads(self.record.read_text())
            if rec.get("id") == self.ident and self.partial.stat().st_size == w.size:
                self.done = {i for i in rec.get("done", []) if isinstance(i, int)}
        except (OSError, ValueError, AttributeError):
            pass
        if not self.done:
            self.partial.unlink(missing_ok=True)
            self.record.unlink(missing_ok=True)
        self.todo = [i for i in range(math.ceil(w.size / chunk)) if i not in self.done]
        self.fd: int | None = os.open(self.partial, os.O_RDWR | os.O_CREAT, 0o644)
        os.ftruncate(self.fd, w.size)
        self.offset_of = lambda i: i * chunk

    def write(self, i: int, data: bytes) -> None:
        assert self.fd is not None
        view, offset = memoryview(data), self.offset_of(i)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n
        with self.lock:  # record a chunk only once its bytes are written
            self.done.add(i)
            tmp = self.record.with_name(self.record.name + f".{uuid.uuid4().hex[:8]}")
            tmp.write_text(json.dumps({"id": self.ident, "done": sorted(self.done)}))
            os.replace(tmp, self.record)

    def finish(self) -> None:
        self.close()
        if self.w.sha256 is not None:
            got = sha256_file(self.partial)
            if got != self.w.sha256:
                # Start over next time: these bytes are not the object the manifest names.
                self.discard()
                raise _mismatch(self.where, self.w.rel, self.w.sha256, got)
        os.replace(self.partial, self.path)
        self.record.unlink(missing_ok=True)

    def discard(self) -> None:
        with self.lock:
            self.done = set()
            self.partial.unlink(missing_ok=True)
            self.record.unlink(missing_ok=True)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _changed(where: str, rel: str, want: int, got: int) -> StorageError:
    return StorageError(
        f"{where}/{rel}: changed while it was downloaded (expected {want} bytes, got {got}); "
        "pull again"
    )


def _mismatch(where: str, rel: str, want: str, got: str) -> IntegrityError:
    return IntegrityError(
        f"{where}/{rel}: sha256 mismatch (expected {want[:12]}…, got {got[:12]}…)"
    )


def run_parallel(fn: Callable[[Any], None], items: Sequence[Any], concurrency: int) -> None:
    """Run `fn` over `items` on a thread pool; the first error stops the rest and is raised."""
    pool = ThreadPoolExecutor(max_workers=max(1, concurrency))
    try:
        for fut in as_completed([pool.submit(fn, it) for it in items]):
            fut.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
