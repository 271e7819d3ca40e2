"""Adapters in the bucket: upload (marker last), verified and resumable fetch, list, delete.

An adapter lives at `<bucket>/adapters/<name>/<job_id>/`. Its marker (the `lorajobs.json`
sidecar) is written last and lists every other file with its sha256 and size, so an adapter is
complete iff its marker exists, and a fetch can check each byte it brings back.
"""

from __future__ import annotations

import json
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from lorajobs.jobspecs.failures import IntegrityError, InvalidInput, ObjectNotFound
from lorajobs.storage.backends import open_storage
from lorajobs.storage.base import BytesCallback, Storage
from lorajobs.storage.transfer import (
    DEFAULT_CHUNK,
    DEFAULT_CONCURRENCY,
    Wanted,
    download_files,
    run_parallel,
    sha256_file,
)

MARKER = "lorajobs.json"
_SHA256 = frozenset("0123456789abcdef")


def upload_adapter(
    local_dir: Path,
    dest_uri: str,
    *,
    marker: str = MARKER,
    concurrency: int = DEFAULT_CONCURRENCY,
    storage: Storage | None = None,
) -> None:
    """Upload every file under `local_dir` to `dest_uri`, the marker last.

    A marker already at `dest_uri` (a previous upload) is removed first, so a broken re-upload
    never looks complete; objects there that this upload does not contain are removed too, and
    so are multipart uploads a broken attempt left behind. `storage` (rooted at `dest_uri`)
    overrides the one `open_storage` would make, e.g. to tune multipart sizes.
    """
    root = local_dir.resolve()
    files = _local_files(root)
    if marker not in files:
        raise InvalidInput(
            f"{local_dir}: no {marker} to upload: the adapter could never be complete"
        )
    # A marker that lists files we do not have would make a complete-looking, unfetchable adapter.
    listed = _read_manifest((root / marker).read_bytes(), str(root / marker))
    for rel, want in listed.items():
        path = _inside(root, rel, str(local_dir), marker)
        if not path.is_file() or path.stat().st_size != want["size"]:
            raise IntegrityError(f"{path}: listed in {marker} but missing or of another size")
    storage = storage or open_storage(dest_uri)
    if storage.exists(marker):
        storage.delete_prefix(marker)
    abort = getattr(storage, "abort_incomplete_uploads", None)
    if abort is not None:  # S3: parts of a broken attempt are invisible but cost storage
        abort("")
    others = [rel for rel in files if rel != marker]
    run_parallel(lambda rel: storage.put_file(root / rel, rel), others, concurrency)
    wanted = set(files)
    for obj in storage.list(""):
        if obj.key not in wanted:  # leftovers of an earlier, different attempt
            storage.delete_prefix(obj.key)
    storage.put_file(root / marker, marker)


def fetch_adapter(
    adapter_uri: str,
    out_dir: Path,
    *,
    marker: str = MARKER,
    concurrency: int = DEFAULT_CONCURRENCY,
    storage: Storage | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    on_bytes: BytesCallback = None,
) -> list[Path]:
    """Download a complete adapter into `out_dir`, verifying every file's sha256.

    Every path the marker lists is checked to land inside `out_dir` before a byte is written.
    Files already there with the right digest are kept, and a large file whose download broke
    off resumes from the chunks it has, so running a failed fetch again finishes it. The marker
    is written last: a folder with it is complete. Returns the paths, the marker last.
    """
    storage = storage or open_storage(adapter_uri)
    raw, files = adapter_manifest(adapter_uri, marker=marker, storage=storage)
    root = out_dir.resolve()
    # Every path is checked before a single byte (or folder) is written.
    targets = {rel: _inside(root, rel, adapter_uri, marker) for rel in files}
    out_dir.mkdir(parents=True, exist_ok=True)
    # A marker from an earlier fetch must not vouch for files this one may not finish.
    (root / marker).unlink(missing_ok=True)

    def have(rel: str) -> bool:
        dest, want = targets[rel], files[rel]
        return (
            dest.is_file()
            and not dest.is_symlink()
            and dest.stat().st_size == want["size"]
            and sha256_file(dest) == want["sha256"]
        )

    kept: dict[str, bool] = {}
    run_parallel(lambda rel: kept.__setitem__(rel, have(rel)), sorted(files), concurrency)
    wanted = [
        Wanted(key=rel, rel=rel, size=files[rel]["size"], sha256=files[rel]["sha256"])
        for rel in sorted(files)
        if not kept[rel]
    ]
    download_files(
        storage,
        wanted,
        root,
        concurrency=concurrency,
        chunk_size=chunk_size,
        on_bytes=on_bytes,
        where=adapter_uri.rstrip("/"),
    )
    marker_path = root / marker
    tmp = marker_path.with_name(f".{marker}.part-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.write_bytes(raw)
    os.replace(tmp, marker_path)
    return [targets[rel] for rel in sorted(files)] + [marker_path]


def adapter_manifest(
    adapter_uri: str, *, marker: str = MARKER, storage: Storage | None = None
) -> tuple[bytes, dict[str, dict[str, Any]]]:
    """(the marker's bytes, its `files` table) of a complete adapter; ObjectNotFound if the
    adapter is missing or unfinished."""
    storage = storage or open_storage(adapter_uri)
    try:
        raw = storage.get_bytes(marker)
    except ObjectNotFound:
        raise ObjectNotFound(f"{adapter_uri}: no complete adapter here") from None
    return raw, _read_manifest(raw, f"{adapter_uri.rstrip('/')}/{marker}")


def delete_adapter(adapter_uri: str, *, marker: str = MARKER) -> int:
    """Remove an adapter, complete or partial; the marker goes first. Returns objects removed."""
    storage = open_storage(adapter_uri)
    n = 0
    if storage.exists(marker):
        n += storage.delete_prefix(marker)  # from here on it no longer looks complete
    return n + storage.delete_prefix("")


def list_adapters(bucket_uri: str, *, marker: str = MARKER) -> list[dict[str, Any]]:
    """Complete adapters under `<bucket>/adapters/<name>/<job_id>/`, newest first.

    Each: name, job_id, uri, size (bytes, all files), files, created (ISO 8601), base_model.
    """
    storage = open_storage(bucket_uri)
    objs = storage.list("adapters")
    sizes: dict[tuple[str, str], int] = {}
    counts: dict[tuple[str, str], int] = {}
    markers: dict[tuple[str, str], float] = {}
    for o in objs:
        parts = PurePosixPath(o.key).parts  # adapters/<name>/<job_id>/...
        if len(parts) < 4:
            continue
        k = (parts[1], parts[2])
        sizes[k] = sizes.get(k, 0) + o.size
        counts[k] = counts.get(k, 0) + 1
        if len(parts) == 4 and parts[3] == marker:
            markers[k] = o.modified

    def describe(k: tuple[str, str]) -> dict[str, Any]:
        name, job_id = k
        info: dict[str, Any] = {
            "name": name,
            "job_id": job_id,
            "uri": f"{storage.uri.rstrip('/')}/adapters/{name}/{job_id}",
            "size": sizes[k],
            "files": counts[k] - 1,
            "created": _iso(markers[k]),
            "base_model": None,
        }
        try:
            meta = json.loads(storage.get_bytes(f"adapters/{name}/{job_id}/{marker}"))
        except (ObjectNotFound, ValueError):
            info["error"] = "unreadable marker"
            return info
        if isinstance(meta, dict):
            info["base_model"] = _base_model(meta)
            created = meta.get("created_at") or meta.get("finished_at")
            if isinstance(created, str):
                info["created"] = created
        return info

    with ThreadPoolExecutor(max_workers=DEFAULT_CONCURRENCY) as pool:
        out = list(pool.map(describe, sorted(markers)))
    out.sort(key=lambda a: (a["created"] or "", a["name"], a["job_id"]), reverse=True)
    return out


# -- helpers ---------------------------------------------------------------------------------


def _local_files(root: Path) -> list[str]:
    """Relative paths of the files under `root`; refuses symlinks and anything escaping it."""
    if not root.is_dir():
        raise InvalidInput(f"{root}: not a folder")
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink():
                raise InvalidInput(f"{p}: refusing to upload a symlink")
        for name in filenames:
            p = Path(dirpath) / name
            if root not in p.resolve().parents:
                raise InvalidInput(f"{p}: outside {root}")
            if not p.is_file():
                raise InvalidInput(f"{p}: not a regular file")
            out.append(p.relative_to(root).as_posix())
    return sorted(out)


def _read_manifest(raw: bytes, where: str) -> dict[str, dict[str, Any]]:
    """`files` of a marker, checked for shape: {relpath: {"sha256": hex, "size": int}}."""
    try:
        meta = json.loads(raw)
    except ValueError:
        raise IntegrityError(f"{where}: not valid JSON") from None
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, dict):
        raise IntegrityError(f"{where}: no 'files' table")
    for rel, want in files.items():
        ok = (
            isinstance(want, dict)
            and isinstance(want.get("sha256"), str)
            and len(want["sha256"]) == 64
            and set(want["sha256"]) <= _SHA256
            and isinstance(want.get("size"), int)
            and want["size"] >= 0
        )
        if not ok:
            raise IntegrityError(f"{where}: entry {rel!r} needs a sha256 (hex) and a size")
    return files


def _inside(root: Path, rel: str, uri: str, marker: str) -> Path:
    """`root/rel`, refusing a path that is absolute, climbs with `..`, or lands outside root."""
    pure = PurePosixPath(rel)
    bad = (
        not rel
        or "\\" in rel
        or "\x00" in rel
        or pure.is_absolute()
        or any(part in ("..", "") for part in rel.split("/"))
        or rel == marker
    )
    target = root.joinpath(*pure.parts) if not bad else root
    # resolve() follows symlinks already in out_dir, so one pointing elsewhere is caught too.
    if bad or root not in target.resolve().parents:
        raise IntegrityError(f"{uri}: marker lists an unsafe file path {rel!r}; refusing to fetch")
    return target


def _iso(ts: float) -> str | None:
    if not ts:
        return None
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="seconds")


def _base_model(meta: dict[str, Any]) -> str | None:
    """The base model id from a marker, tolerating the shapes it has had (str or {id: ...})."""
    spec = meta.get("spec")
    for value in (
        meta.get("base_model"),
        spec.get("base_model") if isinstance(spec, dict) else None,
    ):
        if isinstance(value, str):
            return value
        if isinstance(value, dict):
            for key in ("id", "ref", "name", "uri"):
                if isinstance(value.get(key), str):
                    return str(value[key])
    return None
