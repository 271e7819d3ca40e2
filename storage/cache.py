"""The node-local cache of pulled models and datasets: in-use leases, build locks, eviction.

Two `flock`s per entry: `.build`, exclusive while it is built (two jobs pulling the same data on
one node download it once), and `.lock`, shared while a job uses it (the path a pull returns
holds it until it is garbage-collected), so eviction never removes data a job reads.
`LORAJOBS_CACHE_MAX_GB` caps the cache (datasets + models; unset: no cap): entries not in use
are evicted, least recently used first.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import uuid
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from lorajobs.jobspecs.failures import InvalidInput

log = logging.getLogger(__name__)


def release(path: Path) -> None:
    """Drop the in-use mark a pulled path holds (it also goes when the path is collected)."""
    finalizer = getattr(path, "_lease_finalizer", None)
    if finalizer is not None:
        finalizer()


def cache_limit_from_env() -> int | None:
    """`LORAJOBS_CACHE_MAX_GB` in bytes (GB = 10^9), or None when unset."""
    raw = os.environ.get("LORAJOBS_CACHE_MAX_GB", "").strip()
    if not raw:
        return None
    try:
        gb = float(raw)
    except ValueError:
        gb = -1.0
    if not gb > 0:
        raise InvalidInput(f"LORAJOBS_CACHE_MAX_GB={raw!r}: expected a number of GB > 0")
    return int(gb * 1e9)


def evict(roots: Sequence[Path], max_bytes: int, *, incoming: int = 0) -> list[str]:
    """Remove entries (and leftover temp folders) not in use, least recently used first, until
    what stays plus `incoming` fits in `max_bytes`. Returns the names removed."""
    roots = [r for r in roots if r.is_dir()]
    if not roots:
        return []
    removed: list[str] = []
    with locked(roots[0] / ".locks" / "evict.lock"):
        for root in roots:  # what an eviction that died half-way renamed away
            if (root / ".trash").is_dir():
                for old in (root / ".trash").iterdir():
                    shutil.rmtree(old, ignore_errors=True)
        found = []  # (last use, size, path, its lock file, its root)
        for root in roots:
            for folder in (root, root / ".tmp"):
                if not folder.is_dir():
                    continue
                for p in folder.iterdir():
                    if p.is_dir() and not p.name.startswith("."):
                        found.append((p.stat().st_mtime, du(p), p, root))
        used = sum(f[1] for f in found)
        for _mtime, size, path, root in sorted(found, key=lambda f: f[0]):
            if used + incoming <= max_bytes:
                break
            trash = root / ".trash" / f"{path.name}-{uuid.uuid4().hex[:8]}"
            locks = root / ".locks"
            with (
                try_exclusive(locks / f"{path.name}.lock") as unused,
                try_exclusive(locks / f"{path.name}.build") as idle,
            ):
                if not (unused and idle) or not path.is_dir():
                    continue  # in use, or being built: never evicted
                trash.parent.mkdir(exist_ok=True)
                os.rename(path, trash)  # gone at once for every reader; deleted below
            shutil.rmtree(trash, ignore_errors=True)
            used -= size
            removed.append(path.name)
            log.info("cache: evicted %s (%d bytes)", path, size)
        if used + incoming > max_bytes:
            log.warning(
                "cache: %d bytes in use exceed LORAJOBS_CACHE_MAX_GB (%d bytes)",
                used + incoming,
                max_bytes,
            )
    return removed


def du(path: Path) -> int:
    total = 0
    for dirpath, _dirs, names in os.walk(path):
        for n in names:
            try:
                total += os.lstat(os.path.join(dirpath, n)).st_size
            except OSError:
                pass
    return total


# -- locks and leases ------------------------------------------------------------------------


class Lease:
    """A shared `flock` on an entry's `.lock` file: the entry is in use. Only eviction takes it
    exclusively (without waiting). Separate opens are separate lock owners, so this works
    between threads and processes alike; the kernel drops it if the holder dies."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_SH)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the lock
            self.fd = None


class _LeasedPath(type(Path())):  # type: ignore[misc]
    """A path into the cache that keeps its entry marked in use for as long as it lives."""


def leased(path: Path, lease: Lease) -> Path:
    out = _LeasedPath(path)
    out._lease_finalizer = weakref.finalize(out, lease.close)  # type: ignore[attr-defined]
    return out


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive `flock` on `path`, blocking."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextmanager
def try_exclusive(path: Path) -> Iterator[bool]:
    """An exclusive `flock` if nobody holds one of any kind; yields whether we got it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
