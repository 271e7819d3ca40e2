"""Content-addressed staging of local datasets and base models into a bucket.

A folder (or a single file) is named by the digest of its manifest — the relative path, size and
sha256 of every file — and lands at `<bucket>/datasets/<digest>/` (or `models/<digest>/`). The
manifest itself is written last, next to it, at `<bucket>/datasets/<digest>.manifest.json`: it
existing means the staged copy is complete. So staging the same data again uploads nothing, an
interrupted staging resumes with the files it lacks, and worker pulls are driven by the
manifest (sizes and sha256 known up front; the node cache keyed by the digest).

Hidden files and folders (names starting with '.') are not staged; symlinked files are followed
(a Hugging Face snapshot is made of them), symlinked folders are refused. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lorajobs.jobspecs.failures import IntegrityError, InvalidInput, ObjectNotFound
from lorajobs.jobspecs.models import AnyJobSpec
from lorajobs.storage.backends import open_storage
from lorajobs.storage.base import BytesCallback, Storage, join_uri
from lorajobs.storage.transfer import run_parallel, sha256_file

FORMAT = "lorajobs.manifest/v1"
MANIFEST_SUFFIX = ".manifest.json"
KINDS = {"dataset": "datasets", "model": "models"}
DEFAULT_CONCURRENCY = 16
# `<anything>/datasets/<digest>[/<file inside>]`: a staged entry (or a file in one).
_STAGED = re.compile(
    r"^(?P<entry>(?:.+/)?(?:datasets|models)/(?P<digest>[0-9a-f]{64}))(?:/(?P<sub>.+))?$"
)

# (size, mtime_ns, inode) -> sha256, per absolute path: restaging unchanged files hashes nothing.
_HashCache = dict[str, list[Any]]


@dataclass(frozen=True)
class Staged:
    """What one staging did."""

    uri: str  # what a spec names: the staged folder, or the file in it for a one-file input
    digest: str
    files: int
    size: int
    uploaded_files: int
    uploaded_bytes: int
    already: bool  # the manifest was there and every object too: nothing was uploaded


# -- manifests -------------------------------------------------------------------------------


def manifest_digest(files: dict[str, dict[str, Any]]) -> str:
    """sha256 over every file's relative path, size and sha256, sorted by path."""
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(f"{rel}\0{files[rel]['size']}\0{files[rel]['sha256']}\n".encode())
    return h.hexdigest()


def write_manifest(storage: Storage, entry: str, kind: str, files: dict[str, Any]) -> str:
    """Write the manifest of a staged entry (`datasets/<digest>`) whose files are all in place:
    from then on the entry is complete. Returns the digest."""
    digest = manifest_digest(files)
    manifest = {
        "format": FORMAT,
        "kind": kind,
        "digest": digest,
        "count": len(files),
        "size": sum(f["size"] for f in files.values()),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": files,
    }
    body = json.dumps(manifest, indent=1, sort_keys=True).encode()
    storage.put_bytes(body, entry + MANIFEST_SUFFIX)
    return digest


def staged_parts(key: str) -> tuple[str, str, str] | None:
    """`a/datasets/<digest>/x.jsonl` -> (`a/datasets/<digest>`, digest, `x.jsonl`); None when
    the key names no staged entry."""
    m = _STAGED.match(key.strip("/"))
    if m is None:
        return None
    return m.group("entry"), m.group("digest"), m.group("sub") or ""


def read_manifest(
    storage: Storage, entry_key: str, digest: str
) -> dict[str, dict[str, Any]] | None:
    """The `files` table of the manifest of a staged entry, checked against its digest; None
    when there is no manifest (not staged by lorajobs, or staging never finished)."""
    where = f"{storage.uri.rstrip('/')}/{entry_key}{MANIFEST_SUFFIX}"
    try:
        raw = storage.get_bytes(entry_key + MANIFEST_SUFFIX)
    except ObjectNotFound:
        return None
    try:
        meta = json.loads(raw)
    except ValueError:
        raise IntegrityError(f"{where}: not valid JSON") from None
    files = meta.get("files") if isinstance(meta, dict) else None
    ok = isinstance(files, dict) and all(
        isinstance(v, dict)
        and isinstance(v.get("size"), int)
        and v["size"] >= 0
        and isinstance(v.get("sha256"), str)
        and re.fullmatch(r"[0-9a-f]{64}", v["sha256"])
        for v in files.values()
    )
    if not ok or not files:
        raise IntegrityError(f"{where}: no valid 'files' table")
    if manifest_digest(files) != digest:
        raise IntegrityError(f"{where}: the manifest does not hash to the digest in its name")
    return files


def local_manifest(
    path: Path,
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
    hash_cache: Path | None = None,
    on_bytes: BytesCallback = None,
) -> dict[str, dict[str, Any]]:
    """`{relpath: {"size", "sha256"}}` of a folder (or `{name: ...}` of one file)."""
    files, _stamps = _hash(_local_files(path), concurrency, hash_cache, on_bytes)
    return files


def _hash(
    files: list[tuple[str, Path]],
    concurrency: int,
    hash_cache: Path | None,
    on_bytes: BytesCallback,
) -> tuple[dict[str, dict[str, Any]], dict[str, list[int]]]:
    """The manifest of `files`, and each one's (size, mtime_ns, inode) when it was hashed."""
    cache = _load_hash_cache(hash_cache)
    out: dict[str, dict[str, Any]] = {}
    stamps: dict[str, list[int]] = {}
    lock = threading.Lock()

    def one(item: tuple[str, Path]) -> None:
        rel, p = item
        stamp = _stamp(p)
        cached = cache.get(str(p))
        if (
            isinstance(cached, list)
            and len(cached) == 4
            and cached[:3] == stamp
            and isinstance(cached[3], str)
            and len(cached[3]) == 64
        ):
            sha = cached[3]
        else:
            sha = sha256_file(p)
            if _stamp(p) != stamp:
                raise InvalidInput(f"{p}: changed while it was being hashed; stage again")
            if on_bytes is not None:
                on_bytes(stamp[0])
        with lock:
            out[rel] = {"size": stamp[0], "sha256": sha}
            stamps[rel] = stamp
            cache[str(p)] = [*stamp, sha]

    run_parallel(one, files, concurrency)
    if hash_cache is not None:
        _save_hash_cache(hash_cache, {str(p): cache[str(p)] for _, p in files})
    return {rel: out[rel] for rel in sorted(out)}, stamps


def _stamp(p: Path) -> list[int]:
    st = p.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


# -- staging ---------------------------------------------------------------------------------


def stage_path(
    path: Path,
    bucket_uri: str,
    kind: str,
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
    hash_cache: Path | None = None,
    console: Any = None,
    storage: Storage | None = None,
) -> Staged:
    """Upload a local folder or file to `<bucket>/<kind>s/<digest>/`, the manifest last.

    Skips what is already there. `console` (a rich Console) gets progress bars and a summary
    line; `storage` (rooted at the bucket) overrides the one `open_storage` would make.
    """
    if kind not in KINDS:
        raise InvalidInput(f"kind must be one of {', '.join(KINDS)} (got {kind!r})")
    path = path.expanduser().resolve()
    if not path.exists():
        raise InvalidInput(f"{path}: no such file or folder")
    storage = storage or open_storage(bucket_uri)
    sources = _local_files(path)
    total = sum(p.stat().st_size for _, p in sources)
    with _progress(console) as bar:
        task = bar(f"hashing {path.name}", total)
        files, stamps = _hash(sources, concurrency, hash_cache, task)
    digest = manifest_digest(files)
    entry = f"{KINDS[kind]}/{digest}"
    sub = next(iter(files)) if path.is_file() else ""
    uri = join_uri(bucket_uri, entry, *([sub] if sub else []))
    size = sum(f["size"] for f in files.values())

    done = storage.exists(entry + MANIFEST_SUFFIX)
    there = {o.key: o.size for o in storage.list(entry)}
    missing = [rel for rel, f in files.items() if there.get(f"{entry}/{rel}") != f["size"]]
    if done and not missing:
        _say(console, f"{kind} {path} already staged at {uri}")
        return Staged(uri, digest, len(files), size, 0, 0, already=True)

    where = dict(sources)
    todo = sum(files[rel]["size"] for rel in missing)
    with _progress(console) as bar:
        task = bar(f"uploading {path.name}", todo)

        def put(rel: str) -> None:
            # Bytes other than the hashed ones must not land under this digest for good.
            src, key = where[rel], f"{entry}/{rel}"
            if _stamp(src) != stamps[rel]:
                raise InvalidInput(f"{src}: changed since it was hashed; stage again")
            storage.put_file(src, key, callback=task)
            if _stamp(src) != stamps[rel]:
                storage.delete_prefix(key)
                raise InvalidInput(f"{src}: changed while it was uploaded; stage again")

        run_parallel(put, missing, concurrency)
    write_manifest(storage, entry, kind, files)  # last: from here on pulls trust the copy
    _say(
        console,
        f"staged {kind} {path} -> {uri} ({len(missing)} of {len(files)} files, "
        f"{_human(todo)} uploaded)",
    )
    return Staged(uri, digest, len(files), size, len(missing), todo, already=False)


def stage_local_inputs(
    specs: Sequence[AnyJobSpec],
    bucket: str,
    *,
    home: Path | None = None,
    console: Any = None,
    concurrency: int = DEFAULT_CONCURRENCY,
) -> list[AnyJobSpec]:
    """Stage the local `dataset` / `base_model` paths of specs bound for an object-store bucket
    (their `output`, else `bucket`), and return the specs naming the staged URIs instead.

    Specs bound for a `file://` bucket are returned as they are: there the worker reads local
    paths in place. Only absolute paths (as `resolve_local_paths` leaves them) that exist here
    are staged; URIs and hub ids are left alone.
    """
    done: dict[tuple[str, str, str], str] = {}
    out: list[AnyJobSpec] = []
    for spec in specs:
        target = spec.output or bucket
        if urlparse(target).scheme in ("", "file"):
            out.append(spec)
            continue
        update: dict[str, str] = {}
        for field, kind in (("dataset", "dataset"), ("base_model", "model")):
            value: str = getattr(spec, field)
            if "://" in value or not Path(value).is_absolute():
                continue
            if not Path(value).exists():
                _say(
                    console,
                    f"note: {field} {value} does not exist here; not staged "
                    "(the worker must find it at that path)",
                )
                continue
            memo = (value, target, kind)
            if memo not in done:
                hashes = None
                if home is not None:  # one small file of known hashes per staged folder
                    name = hashlib.sha256(value.encode()).hexdigest()[:32]
                    hashes = home / "stage-hashes" / f"{name}.json"
                done[memo] = stage_path(
                    Path(value),
                    target,
                    kind,
                    concurrency=concurrency,
                    hash_cache=hashes,
                    console=console,
                ).uri
            update[field] = done[memo]
        out.append(spec.model_copy(update=update) if update else spec)
    return out


# -- helpers ---------------------------------------------------------------------------------


def _local_files(path: Path) -> list[tuple[str, Path]]:
    """(relpath, path) of every file to stage, sorted; hidden names skipped."""
    if path.is_file():
        return [(path.name, path)]
    if not path.is_dir():
        raise InvalidInput(f"{path}: not a file or folder")
    out: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
        here = Path(dirpath)
        for d in list(dirnames):
            if d.startswith("."):
                dirnames.remove(d)
            elif (here / d).is_symlink():
                raise InvalidInput(f"{here / d}: a symlinked folder; copy it in to stage it")
        for name in filenames:
            p = here / name
            if name.startswith("."):
                continue
            if not p.is_file():  # a dangling link, a socket, a fifo ...
                raise InvalidInput(f"{p}: not a regular file")
            out.append((p.relative_to(path).as_posix(), p))
    if not out:
        raise InvalidInput(f"{path}: no files to stage")
    return sorted(out)


def _load_hash_cache(path: Path | None) -> _HashCache:
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_hash_cache(path: Path, data: _HashCache) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
    except OSError:
        pass  # only a speed-up


@contextmanager
def _progress(console: Any) -> Iterator[Callable[[str, int], BytesCallback]]:
    """Yields `bar(description, total_bytes) -> advance(n)`; a rich progress bar on a terminal,
    nothing otherwise (logs and pipes get the summary line instead)."""
    if console is None or not getattr(console, "is_terminal", False):
        yield lambda _desc, _total: None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as progress:
        lock = threading.Lock()

        def bar(desc: str, total: int) -> BytesCallback:
            task = progress.add_task(desc, total=total)

            def advance(n: int) -> None:
                with lock:
                    progress.update(task, advance=n)

            return advance

        yield bar


def _say(console: Any, line: str) -> None:
    if console is not None:
        console.print(line, markup=False, highlight=False)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
