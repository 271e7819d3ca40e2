"""The `file://` backend: a bucket that is a local folder. Writes are atomic (temp + rename),
so a reader never sees half a file."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from lorajobs.jobspecs.failures import InvalidInput, ObjectNotFound
from lorajobs.storage.base import BytesCallback, ObjectInfo, safe_key


class FileStorage:
    """A bucket that is a local folder (`file:///abs/path` or a plain path)."""

    def __init__(self, root: Path):
        self.root = root.resolve()
        self.uri = self.root.as_uri()

    def _path(self, key: str) -> Path:
        """Where `key` lives; refuses a key that a symlink would lead out of the bucket (a
        `file://` bucket never follows one out of itself)."""
        path = self.root / safe_key(key) if key else self.root
        if not self._inside(path):
            raise InvalidInput(f"{self._where(key)}: a symlink leads outside the bucket")
        return path

    def _inside(self, path: Path) -> bool:
        real = os.path.realpath(path)
        return real == str(self.root) or real.startswith(str(self.root).rstrip("/") + "/")

    def _where(self, key: str) -> str:
        return f"{self.uri}/{key}" if key else self.uri

    def put_file(self, local: Path, key: str, *, callback: BytesCallback = None) -> None:
        dest = self._path(key)
        _write_atomically(dest, lambda tmp: shutil.copyfile(local, tmp))
        if callback is not None:
            callback(dest.stat().st_size)

    def put_bytes(self, data: bytes, key: str) -> None:
        _write_atomically(self._path(key), lambda tmp: tmp.write_bytes(data))

    def get_file(self, key: str, local: Path, *, callback: BytesCallback = None) -> None:
        src = self._path(key)
        if not src.is_file():
            raise ObjectNotFound(f"{self._where(key)}: no such object")
        _write_atomically(local, lambda tmp: shutil.copyfile(src, tmp))
        if callback is not None:
            callback(local.stat().st_size)

    def get_bytes(self, key: str) -> bytes:
        src = self._path(key)
        if not src.is_file():
            raise ObjectNotFound(f"{self._where(key)}: no such object")
        return src.read_bytes()

    def get_range(self, key: str, start: int, length: int) -> bytes:
        """`length` bytes from offset `start` (fewer only at the end of the object)."""
        src = self._path(key)
        if not src.is_file():
            raise ObjectNotFound(f"{self._where(key)}: no such object")
        with open(src, "rb") as f:
            f.seek(start)
            return f.read(length)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        base = self._path(prefix.rstrip("/")) if prefix else self.root
        if base.is_file():
            return [_info(safe_key(prefix) if prefix else "", base)]
        if not base.is_dir():
            return []
        out = []
        # Dot-files are skipped: they are this class's own in-flight temp files.
        for p in sorted(base.rglob("*")):
            if p.is_file() and not p.name.startswith(".") and self._inside(p):
                out.append(_info(p.relative_to(self.root).as_posix(), p))
        return out

    def delete_prefix(self, prefix: str) -> int:
        objs = self.list(prefix)
        for o in objs:
            path = self._path(o.key)
            path.unlink(missing_ok=True)
            # Drop folders left empty, as an S3 prefix vanishes with its last object.
            parent = path.parent
            while parent != self.root and self.root in parent.parents:
                try:
                    parent.rmdir()
                except OSError:
                    break
                parent = parent.parent
        return len(objs)


def _info(key: str, path: Path) -> ObjectInfo:
    st = path.stat()
    return ObjectInfo(
        key, st.st_size, etag=f"{st.st_mtime_ns:x}-{st.st_size:x}", modified=st.st_mtime
    )


def _write_atomically(dest: Path, write: Callable[[Path], object]) -> None:
    """Write through a temp name then rename: a reader never sees a half-written file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(dest)
    try:
        write(tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _temp_name(dest: Path) -> Path:
    # Unique per call: two threads or processes writing one key must not share a temp file.
    return dest.with_name(f".{dest.name}.part-{os.getpid()}-{uuid.uuid4().hex[:8]}")
