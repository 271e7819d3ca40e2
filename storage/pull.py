"""Turn a spec's dataset / base-model reference into a local path, through a node-local cache.

Entries live under `<cache_dir>/datasets/` and `<cache_dir>/models/`, of two sorts:
- a staged entry (`<bucket>/datasets/<digest>` with its manifest, see `lorajobs.storage.staging`) lands
  in `sha256-<digest>/`: keyed by content, so the same data in any bucket is one entry, found
  without a single request once there; every file is checked against the manifest's sha256;
- any other prefix lands in `<name>-<listing digest>/`, the digest covering keys, sizes, ETags.

An entry is built in `.tmp/<entry>/` and renamed into place, so an entry that exists is
complete. Two `flock`s per entry: `.build`, exclusive while it is built (two jobs pulling the same
data on one node download it once), and `.lock`, shared while a job uses it (the path a pull
returns holds it until it is garbage-collected), so eviction never removes data a job reads. A pull
that broke off leaves its temp folder, and the next pull of that entry keeps what it finished
(whole files, and the chunks of big ones).

`LORAJOBS_CACHE_MAX_GB` caps the cache (datasets + models; unset: no cap): entries not in use
are evicted, least recently used first. `LORAJOBS_PULL_CONCURRENCY` sets parallel downloads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from lorajobs.jobspecs.failures import InvalidInput, UserDataError
from lorajobs.storage.backends import open_storage
from lorajobs.storage.base import ObjectInfo, Storage, safe_key
from lorajobs.storage.cache import Lease, cache_limit_from_env, evict, leased, locked
from lorajobs.storage.staging import read_manifest, staged_parts
from lorajobs.storage.transfer import DEFAULT_CHUNK, Wanted, download_files

log = logging.getLogger(__name__)

DEFAULT_CONCURRENCY = 16
# `org/name` or `org/name@revision`, as the Hugging Face hub names repositories.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[\w./-]+)?$")
_KINDS = ("datasets", "models")


def pull_dataset(
    uri: str, cache_dir: Path, *, concurrency: int | None = None, max_bytes: int | None = None
) -> Path:
    """Local path of a dataset: a local folder/file (as is) or an `s3://` prefix/object (cached)."""
    local = _local_path(uri)
    if local is not None:
        if not local.exists():
            raise UserDataError(f"dataset {uri}: not found")
        return local
    bucket, key = _split_remote(uri)
    return pull_to_cache(
        open_storage(bucket),
        key,
        cache_dir / "datasets",
        uri=uri,
        missing=f"dataset {uri}: not found (no objects under this prefix)",
        concurrency=concurrency,
        max_bytes=max_bytes,
        scope=[cache_dir / k for k in _KINDS],
    )


def pull_model(
    ref: str, cache_dir: Path, *, concurrency: int | None = None, max_bytes: int | None = None
) -> Path:
    """Local folder of a base model: a local folder, an `s3://` / `file://` URI, or a hub id."""
    missing = f"base model {ref}: not found"
    local = _local_path(ref)
    if local is not None:
        if local.exists():
            return local
        # A plain `org/name` that is no local path: a hub id (a file:// URI never is one).
        if "://" not in ref and _HUB_ID.match(ref):
            return _hub_snapshot(ref, cache_dir)
        raise UserDataError(missing)
    bucket, key = _split_remote(ref)
    return pull_to_cache(
        open_storage(bucket),
        key,
        cache_dir / "models",
        uri=ref,
        missing=missing,
        concurrency=concurrency,
        max_bytes=max_bytes,
        scope=[cache_dir / k for k in _KINDS],
    )


def pull_to_cache(
    storage: Storage,
    key: str,
    cache_root: Path,
    *,
    uri: str,
    missing: str,
    concurrency: int | None = None,
    max_bytes: int | None = None,
    scope: Sequence[Path] | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> Path:
    """Mirror `key` (one object, or every object below a prefix) of `storage` into the cache.

    Returns the entry folder, or the file inside it when `key` names one file. Raises
    `UserDataError(missing)` when nothing is there; storage errors (auth included) propagate.
    `max_bytes` (default: `LORAJOBS_CACHE_MAX_GB`) caps the entries under `scope` (default:
    `cache_root`); `concurrency` (default: `LORAJOBS_PULL_CONCURRENCY`) the parallel downloads;
    files above `chunk_size` are fetched in ranged chunks.
    """
    concurrency = concurrency or pull_concurrency_from_env()
    max_bytes = cache_limit_from_env() if max_bytes is None else max_bytes
    roots = list(scope or [cache_root])
    cache_root.mkdir(parents=True, exist_ok=True)

    how = dict(
        uri=uri,
        missing=missing,
        concurrency=concurrency,
        max_bytes=max_bytes,
        chunk_size=chunk_size,
    )
    staged = staged_parts(key)
    if staged is not None:
        # Named by content: the cache is checked (and locked) before any request, and the
        # manifest is read only by the one pull that builds the entry.
        plan = _Plan(f"sha256-{staged[1]}", staged[2], None)
        found = _pull(storage, key, cache_root, plan, roots, **how)
        if found is not None:
            return found
        # No manifest there: a prefix that only looks staged. Pull it by its listing.
    plan = _listing_plan(storage, key, uri, missing)
    found = _pull(storage, key, cache_root, plan, roots, **how)
    assert found is not None  # a listing plan always knows its files
    return found


def _pull(
    storage: Storage,
    key: str,
    cache_root: Path,
    plan: _Plan,
    roots: list[Path],
    *,
    uri: str,
    missing: str,
    concurrency: int,
    max_bytes: int | None,
    chunk_size: int,
) -> Path | None:
    """The entry of `plan`, built if need be; None if its manifest turned out to be missing."""
    entry = cache_root / plan.name
    result = entry / plan.sub if plan.sub else entry
    # Held from here on: eviction skips this entry while we build it and while the job uses it.
    lease = Lease(cache_root / ".locks" / f"{plan.name}.lock")
    try:
        built = False
        if not entry.is_dir():
            with locked(cache_root / ".locks" / f"{plan.name}.build"):
                if not entry.is_dir():  # nobody finished it while we waited
                    wanted = plan.wanted
                    if wanted is None:
                        wanted = _manifest_wanted(storage, key, uri, missing)
                        if wanted is None:
                            lease.close()
                            return None
                    if max_bytes:  # make room first: the disk may be tight
                        evict(roots, max_bytes, incoming=sum(w.size for w in wanted))
                    _build(storage, wanted, cache_root, entry, uri, concurrency, chunk_size)
                    built = True
        try:
            os.utime(entry)  # last use, for LRU eviction
        except OSError:
            pass
        if not result.exists():
            raise UserDataError(missing)
        if built and max_bytes:  # only a build grows the cache; our entry is safe (leased)
            evict(roots, max_bytes)
    except BaseException:
        lease.close()
        raise
    return leased(result, lease)


def pull_concurrency_from_env() -> int:
    raw = os.environ.get("LORAJOBS_PULL_CONCURRENCY", "").strip()
    if not raw:
        return DEFAULT_CONCURRENCY
    if not raw.isdigit() or int(raw) < 1:
        raise InvalidInput(f"LORAJOBS_PULL_CONCURRENCY={raw!r}: expected a whole number >= 1")
    return int(raw)


# -- building an entry -----------------------------------------------------------------------


@dataclass
class _Plan:
    name: str  # the entry folder's name
    sub: str  # the file inside the entry that the reference names ("" for the folder)
    wanted: list[Wanted] | None  # None: known to be in the cache, not read yet


def _manifest_wanted(storage: Storage, key: str, uri: str, missing: str) -> list[Wanted] | None:
    """What to download for a staged entry, from its manifest; None when it has none."""
    staged = staged_parts(key)
    assert staged is not None
    entry_key, digest, sub = staged
    files = read_manifest(storage, entry_key, digest)
    if files is None:
        return None
    if sub and sub not in files and not any(r.startswith(sub + "/") for r in files):
        raise UserDataError(missing)
    return [
        Wanted(
            key=f"{entry_key}/{rel}", rel=_safe_rel(rel, uri), size=f["size"], sha256=f["sha256"]
        )
        for rel, f in sorted(files.items())
    ]


def _listing_plan(storage: Storage, key: str, uri: str, missing: str) -> _Plan:
    """What to download for any other prefix (or object): what a listing shows."""
    objs = storage.list(key)
    if not objs:
        raise UserDataError(missing)
    files = _relative_paths(objs, key, uri)
    single = len(objs) == 1 and objs[0].key == key and key != ""
    wanted = [Wanted(key=o.key, rel=rel, size=o.size, etag=o.etag) for o, rel in files]
    return _Plan(_entry_name(uri, key, objs), files[0][1] if single else "", wanted)


def _build(
    storage: Storage,
    wanted: list[Wanted],
    cache_root: Path,
    entry: Path,
    uri: str,
    concurrency: int,
    chunk_size: int,
) -> None:
    """Download into `.tmp/<entry>` (resuming what a broken-off pull left) and rename it in."""
    t0 = time.monotonic()
    tmp = cache_root / ".tmp" / entry.name  # we hold the entry's lock: nobody else is here
    resuming = tmp.is_dir()
    tmp.mkdir(parents=True, exist_ok=True)
    todo = wanted
    if resuming:  # what a broken-off pull finished has the right size (big files: verified)
        todo = [w for w in wanted if not _finished(tmp / w.rel, w.size)]
    moved = download_files(
        storage,
        todo,
        tmp,
        concurrency=concurrency,
        chunk_size=chunk_size,
        where=uri.rstrip("/"),
        private=True,
    )
    if resuming:  # its leftovers: partial files and records, objects since deleted
        keep = {w.rel for w in wanted}
        for dirpath, _dirs, names in os.walk(tmp):
            for name in names:
                path = os.path.join(dirpath, name)
                if os.path.relpath(path, tmp).replace(os.sep, "/") not in keep:
                    os.unlink(path)
    os.rename(tmp, entry)
    log.info(
        "pulled %s: %d files (%d resumed), %d bytes in %.1f s",
        uri,
        len(wanted),
        len(wanted) - len(todo),
        moved,
        time.monotonic() - t0,
    )


def _finished(path: Path, size: int) -> bool:
    try:
        return path.is_file() and path.stat().st_size == size
    except OSError:
        return False


# -- names and paths -------------------------------------------------------------------------


def _relative_paths(objs: list[ObjectInfo], key: str, uri: str) -> list[tuple[ObjectInfo, str]]:
    """Where each object goes inside the entry; refuses keys that would climb out of it."""
    out = []
    for o in objs:
        if o.key == key and key:
            rel = key.rsplit("/", 1)[-1]
        elif key:
            rel = o.key[len(key.rstrip("/")) + 1 :]
        else:
            rel = o.key
        out.append((o, _safe_rel(rel, uri)))
    return out


def _safe_rel(rel: str, uri: str) -> str:
    try:
        return safe_key(rel)
    except InvalidInput:
        raise UserDataError(f"{uri}: refusing unsafe object key {rel!r}") from None


def _entry_name(uri: str, key: str, objs: list[ObjectInfo]) -> str:
    listing = [[o.key, o.size, o.etag] for o in sorted(objs, key=lambda o: o.key)]
    digest = hashlib.sha256(json.dumps([uri.rstrip("/"), listing]).encode()).hexdigest()[:24]
    # A readable stem makes `ls` of the cache useful; the digest makes it unique.
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", key.rstrip("/").rsplit("/", 1)[-1] or "root")[:48]
    return f"{stem}-{digest}"


def _local_path(ref: str) -> Path | None:
    """The local path a reference names, or None when it is a remote URI."""
    parsed = urlparse(ref)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "":
        return Path(ref).expanduser()
    if parsed.scheme == "s3":
        return None
    raise InvalidInput(f"{ref}: unsupported URI scheme {parsed.scheme!r} (use s3:// or file://)")


def _split_remote(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b/` -> (`s3://bucket`, `a/b`)."""
    parsed = urlparse(uri)
    if not parsed.netloc:
        raise InvalidInput(f"{uri}: no bucket name")
    key = parsed.path.strip("/")
    try:
        key = safe_key(key) if key else ""
    except InvalidInput:
        raise InvalidInput(f"{uri}: unsafe path") from None
    return f"{parsed.scheme}://{parsed.netloc}", key


def _hub_snapshot(ref: str, cache_dir: Path) -> Path:
    """Download a hub repository (lazily imported; never reached in tests, which run offline)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:
        raise UserDataError(
            f"base model {ref}: not a local path, and huggingface_hub is not installed"
        ) from None
    repo, _, revision = ref.partition("@")
    try:
        return Path(snapshot_download(repo, revision=revision or None, cache_dir=cache_dir / "hub"))
    except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as e:
        raise UserDataError(
            f"base model {ref}: not found on the hub ({type(e).__name__})"
        ) from None
    except LocalEntryNotFoundError:
        raise UserDataError(
            f"base model {ref}: not found (not a local path; the hub is offline or unreachable)"
        ) from None
