"""What a model folder is, by content: a digest that two copies of it share at any URI.

The scheduler packs jobs on "the same base model" by this digest, not by the URI that names
it. A local (or `file://`) folder is hashed file by file (sha256 of each file, cached by path,
size and mtime, so a folder is read once per change). An `s3://` prefix is summarised from its
listing: relative key, size and ETag (S3's ETag is the MD5 of the bytes for an ordinary upload,
so copies agree; objects uploaded in parts with different part sizes would not). A hub id is
its own identity.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from lorajobs.storage.backends import open_storage

_FILE_SHA: dict[tuple[str, int, int], str] = {}


def content_digest(uri: str) -> str:
    """A digest of the model folder `uri` names, the same for the same bytes anywhere."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        path = Path(unquote(parsed.path) if parsed.scheme else uri).expanduser()
        if path.exists():
            return "files:" + _folder_digest(path)
        return "hub:" + uri  # not a path here: a hub id (the worker resolves it)
    if parsed.scheme == "s3":
        key = parsed.path.strip("/")
        storage = open_storage(f"s3://{parsed.netloc}")
        objs = storage.list(key + "/" if key else "")
        listing = sorted([o.key[len(key) :].lstrip("/"), o.size, o.etag] for o in objs)
        return "s3:" + hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    return "uri:" + uri


def _folder_digest(root: Path) -> str:
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    h = hashlib.sha256()
    for p in files:
        rel = p.relative_to(root).as_posix() if root.is_dir() else p.name
        h.update(f"{rel}\0{_file_sha(p)}\n".encode())
    return h.hexdigest()


def _file_sha(p: Path) -> str:
    st = os.stat(p)
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _FILE_SHA:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _FILE_SHA[key] = h.hexdigest()
    return _FILE_SHA[key]


def model_facts(uri: str) -> tuple[float, dict[str, Any] | None]:
    """(size in GiB, parsed config.json or None) of the model folder `uri` names."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        path = Path(unquote(parsed.path) if parsed.scheme else uri).expanduser()
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        cfg = path / "config.json"
        config = json.loads(cfg.read_text(encoding="utf-8")) if cfg.is_file() else None
        return size / 2**30, config
    key = parsed.path.strip("/")
    storage = open_storage(f"{parsed.scheme}://{parsed.netloc}")
    objs = storage.list(key + "/" if key else "")
    size = sum(o.size for o in objs)
    names = {o.key[len(key) :].lstrip("/"): o.key for o in objs}
    config = None
    if "config.json" in names:
        config = json.loads(storage.get_bytes(names["config.json"]))
    return size / 2**30, config


def has_file(uri: str, rel: str) -> bool:
    """Whether the model folder `uri` holds the file `rel` (e.g. "unet/config.json")."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        path = Path(unquote(parsed.path) if parsed.scheme else uri).expanduser()
        return (path / rel).is_file()
    key = parsed.path.strip("/")
    storage = open_storage(f"{parsed.scheme}://{parsed.netloc}")
    want = f"{key}/{rel}" if key else rel
    return any(o.key == want for o in storage.list(want))
