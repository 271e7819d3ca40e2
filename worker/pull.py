"""Turn a spec's dataset / base-model reference into a local path, through a node-local cache.

A remote prefix lands in `<cache_dir>/<kind>/<name>-<digest>/`, where the digest covers the
listing (keys, sizes, ETags): the same data is downloaded once per node, changed data gets a new
entry. Entries are built in a temp folder and renamed into place, so an entry that exists is
complete; a per-entry `flock` makes concurrent pulls on one node download once.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlparse

from jobspecs.errors import InvalidInput, StorageError, UserDataError
from worker.storage import ObjectInfo, Storage, open_storage, safe_key

DEFAULT_CONCURRENCY = 8
# `org/name` or `org/name@revision`, as the Hugging Face hub names repositories.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[\w./-]+)?$")


def pull_dataset(uri: str, cache_dir: Path, *, concurrency: int = DEFAULT_CONCURRENCY) -> Path:
    """Local path of a dataset: a local folder/file (as is) or an `s3://` prefix/object (cached)."""
    local = _local_path(uri)
    if local is not None:
        if not local.exists():
            raise UserDataError(f"dataset {uri}: not found")
        return local
    bucket, key = _split_remote(uri)
    return pull_to_cache(
        open_storage(bucket), key, cache_dir / "datasets", uri=uri,
        missing=f"dataset {uri}: not found (no objects under this prefix)",
        concurrency=concurrency,
    )


def pull_model(ref: str, cache_dir: Path, *, concurrency: int = DEFAULT_CONCURRENCY) -> Path:
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
        open_storage(bucket), key, cache_dir / "models", uri=ref, missing=missing,
        concurrency=concurrency,
    )


def pull_to_cache(
    storage: Storage,
    key: str,
    cache_root: Path,
    *,
    uri: str,
    missing: str,
    concurrency: int = DEFAULT_CONCURRENCY,
) -> Path:
    """Mirror `key` (one object, or every object below a prefix) of `storage` into the cache.

    Returns the entry folder, or the file inside it when `key` is a single object. Raises
    `UserDataError(missing)` when nothing is there; storage errors (auth included) propagate.
    """
    objs = storage.list(key)
    if not objs:
        raise UserDataError(missing)
    files = _relative_paths(objs, key, uri)
    single = len(objs) == 1 and objs[0].key == key and key != ""
    entry = cache_root / _entry_name(uri, key, objs)
    result = entry / files[0][1] if single else entry
    if entry.is_dir():  # renamed into place only once complete
        return result

    cache_root.mkdir(parents=True, exist_ok=True)
    with _locked(cache_root / ".locks" / f"{entry.name}.lock"):
        if entry.is_dir():  # another job on this node finished it while we waited
            return result
        tmp_root = cache_root / ".tmp"
        tmp_root.mkdir(exist_ok=True)
        # We hold the entry's lock, so any temp folder for it is a crashed pull's leftover.
        for stale in tmp_root.glob(f"{entry.name}.*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = tmp_root / f"{entry.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            _download_all(storage, files, tmp, uri, concurrency)
            os.rename(tmp, entry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return result


def _download_all(
    storage: Storage,
    files: list[tuple[ObjectInfo, str]],
    dest: Path,
    uri: str,
    concurrency: int,
) -> None:
    def one(item: tuple[ObjectInfo, str]) -> None:
        obj, rel = item
        path = dest / rel
        storage.get_file(obj.key, path)
        # The listing fixed the cache key; an object replaced since then must not hide in it.
        if path.stat().st_size != obj.size:
            raise StorageError(f"{uri}: {rel} changed while it was downloaded; pull again")

    pool = ThreadPoolExecutor(max_workers=max(1, concurrency))
    try:
        futures = [pool.submit(one, f) for f in files]
        for fut in as_completed(futures):
            fut.result()  # the first failure stops the pull
    finally:
        # On failure, queued downloads are dropped instead of run for nothing.
        pool.shutdown(wait=True, cancel_futures=True)


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
        try:
            out.append((o, safe_key(rel)))
        except InvalidInput:
            raise UserDataError(f"{uri}: refusing unsafe object key {o.key!r}") from None
    return out


def _entry_name(uri: str, key: str, objs: list[ObjectInfo]) -> str:
    listing = [[o.key, o.size, o.etag] for o in sorted(objs, key=lambda o: o.key)]
    digest = hashlib.sha256(json.dumps([uri.rstrip("/"), listing]).encode()).hexdigest()[:24]
    # A readable stem makes `ls` of the cache useful; the digest makes it unique.
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", key.rstrip("/").rsplit("/", 1)[-1] or "root")[:48]
    return f"{stem}-{digest}"


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive `flock` on `path`: excludes other processes and other threads alike
    (each `open` is its own lock owner). The kernel drops it if the holder dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


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
        return Path(
            snapshot_download(repo, revision=revision or None, cache_dir=cache_dir / "hub")
        )
    except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as e:
        raise UserDataError(f"base model {ref}: not found on the hub ({type(e).__name__})") from None
    except LocalEntryNotFoundError:
        raise UserDataError(
            f"base model {ref}: not found (not a local path; the hub is offline or unreachable)"
        ) from None
