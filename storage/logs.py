"""The worker's log of one attempt, streamed to the bucket so `lorajobs logs` reads it anywhere.

Inside the Ray task, `AttemptLog` captures Python logging (INFO and up), stdout/stderr and the
progress lines in memory (a killed worker leaves no temp files behind). Every few seconds, and
once more at the end, it uploads only the bytes written since the last upload, as the next part:

    <bucket>/jobs/<job_id>/logs/attempt-<N>/part-000001.log, part-000002.log, ...

so a 20-hour job uploads its log once, not once per tick, and the uploaded text leaves memory.
The log is the parts' concatenation in part-number order (`read_log`); a follower asks only for
the bytes after what it has already printed (`read_log_from`). Logs written by older versions,
one whole file `attempt-<N>.log`, are still read. Light: no torch, no Ray, no database. Nothing
here logs environment variables, and the bucket URI it is given carries no credentials (those
stay in the node's environment).
"""

from __future__ import annotations

import io
import logging
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any, TextIO

from lorajobs.jobspecs.failures import ObjectNotFound
from lorajobs.storage.backends import open_storage
from lorajobs.storage.base import ObjectInfo, Storage, join_uri

UPLOAD_EVERY_S = 3.0
#: Bytes kept for a retry while uploads fail; beyond this the unsent text is dropped (and the
#: log says so) rather than let a bucket outage grow the worker's memory without bound.
MAX_PENDING_BYTES = 8 * 1024 * 1024
#: Parallel GETs when a reader fetches many parts.
FETCH_THREADS = 8

_PART = re.compile(r"^part-(\d+)\.log$")


def logs_uri(output_uri: str, job_id: str) -> str:
    return join_uri(output_uri, "jobs", job_id, "logs")


def log_name(attempt: int) -> str:
    """The single-file log of older versions (read, never written)."""
    return f"attempt-{attempt}.log"


def parts_dir(attempt: int) -> str:
    """The folder of an attempt's parts, relative to `logs_uri`."""
    return f"attempt-{attempt}"


def part_name(attempt: int, number: int) -> str:
    """Part `number` (from 1) of an attempt's log, relative to `logs_uri`."""
    return f"{parts_dir(attempt)}/part-{number:06d}.log"


def list_parts(storage: Storage, attempt: int) -> list[tuple[int, ObjectInfo]]:
    """(number, object) of the attempt's parts, in number order (not name order: the numbers
    outgrow their zero padding after a million parts)."""
    folder = parts_dir(attempt)
    out = []
    for obj in storage.list(folder + "/"):
        m = _PART.match(obj.key[len(folder) + 1 :]) if obj.key.startswith(folder + "/") else None
        if m is not None:
            out.append((int(m.group(1)), obj))
    return sorted(out, key=lambda p: p[0])


def _pieces(storage: Storage, attempt: int) -> list[ObjectInfo]:
    """The objects whose concatenation is the log: its parts, else an older version's single
    file, else none."""
    parts = list_parts(storage, attempt)
    if parts:
        return [obj for _, obj in parts]
    return [o for o in storage.list(log_name(attempt)) if o.key == log_name(attempt)]


def read_log(output_uri: str, job_id: str, attempt: int) -> bytes | None:
    """The log of one attempt as uploaded so far; None if there is none (yet)."""
    storage = open_storage(logs_uri(output_uri, job_id))
    pieces = _pieces(storage, attempt)
    if not pieces:
        return None
    return _fetch(storage, pieces, 0)


def read_log_from(output_uri: str, job_id: str, attempt: int, offset: int) -> bytes:
    """The bytes of one attempt's log after its first `offset` (b"" when there are none yet).

    One listing, then GETs of only the parts that hold bytes past `offset` (a range GET for
    the part that `offset` falls in): a follower that keeps `offset += len(result)` never
    fetches a byte twice. Parts only ever grow by appending, so the offsets stay valid.
    """
    storage = open_storage(logs_uri(output_uri, job_id))
    return _fetch(storage, _pieces(storage, attempt), offset)


def _fetch(storage: Storage, pieces: list[ObjectInfo], offset: int) -> bytes:
    """The concatenation of `pieces` (sizes as listed) from byte `offset` on."""
    wanted: list[tuple[ObjectInfo, int]] = []  # (object, bytes of it to skip)
    start = 0
    for obj in pieces:
        if start + obj.size > offset:
            wanted.append((obj, max(0, offset - start)))
        start += obj.size

    def get(item: tuple[ObjectInfo, int]) -> bytes:
        obj, skip = item
        try:
            if skip:
                return storage.get_range(obj.key, skip, obj.size - skip)
            return storage.get_bytes(obj.key)[: obj.size]
        except ObjectNotFound:  # the job's logs were deleted while we read them
            return b""

    if len(wanted) <= 1:
        return b"".join(get(w) for w in wanted)
    with ThreadPoolExecutor(min(FETCH_THREADS, len(wanted))) as pool:
        return b"".join(pool.map(get, wanted))


class _Sink(io.TextIOBase):
    """A text stream that appends to an AttemptLog (for logging.StreamHandler)."""

    def __init__(self, log: AttemptLog) -> None:
        self._log = log

    def write(self, s: str) -> int:
        self._log.write(s)
        return len(s)


class _Tee(io.TextIOBase):
    def __init__(self, first: TextIO, log: AttemptLog) -> None:
        self._first, self._log = first, log

    def write(self, s: str) -> int:
        try:
            self._first.write(s)
        except Exception:  # noqa: BLE001 - the original stream may be closed; the log goes on
            pass
        self._log.write(s)
        return len(s)

    def flush(self) -> None:
        try:
            self._first.flush()
        except Exception:  # noqa: BLE001
            pass


#: Libraries whose INFO lines are noise in a job's log ("Found credentials in environment
#: variables" on every S3 client): only their warnings and errors are kept.
QUIET = ("botocore", "boto3", "s3transfer", "urllib3", "filelock", "httpx")


def _quiet_libraries(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or record.name.split(".", 1)[0] not in QUIET


class AttemptLog:
    """Context manager: capture this process's output for one attempt and keep uploading it,
    each upload as a new part holding only the bytes written since the previous one."""

    def __init__(
        self, output_uri: str, job_id: str, attempt: int, *, every_s: float = UPLOAD_EVERY_S
    ) -> None:
        self.uri = logs_uri(output_uri, job_id)
        self.attempt = attempt
        self.every_s = every_s
        self._lock = threading.Lock()  # guards _buffer
        self._upload_lock = threading.Lock()  # one upload at a time: part numbers stay in order
        self._stop = threading.Event()
        self._buffer = io.StringIO()  # written since the last upload
        self._pending = b""  # taken from the buffer, not yet uploaded (an upload failed)
        self._next: int | None = None  # the next part's number, found on the first upload
        self._storage: Storage | None = None
        self._saved: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._loop, name="lorajobs-log-upload", daemon=True)
        self._handler = logging.StreamHandler(_Sink(self))
        self._handler.setLevel(logging.INFO)
        self._handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
        self._handler.addFilter(_quiet_libraries)

    def write(self, text: str) -> None:
        with self._lock:
            self._buffer.write(text)

    def line(self, text: str) -> None:
        """One line with a timestamp (progress, lifecycle)."""
        now = time.time()
        stamp = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
        )
        self.write(f"{stamp} {text.rstrip()}\n")

    def __enter__(self) -> AttemptLog:
        root = logging.getLogger()
        self._saved = {"stdout": sys.stdout, "stderr": sys.stderr, "level": root.level}
        root.addHandler(self._handler)
        if root.level > logging.INFO or root.level == logging.NOTSET:
            root.setLevel(logging.INFO)
        sys.stdout = _Tee(sys.stdout, self)  # type: ignore[assignment]
        sys.stderr = _Tee(sys.stderr, self)  # type: ignore[assignment]
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        root = logging.getLogger()
        sys.stdout, sys.stderr = self._saved["stdout"], self._saved["stderr"]
        root.removeHandler(self._handler)
        root.setLevel(self._saved["level"])
        self._stop.set()
        self._thread.join(timeout=30)
        self.upload()  # the final part

    def upload(self) -> None:
        """Upload what was written since the last upload as the next part; never raise.

        On failure the bytes are kept and sent with the next upload, under the same part
        number (the part then holds what it held, and more: offsets stay valid).
        """
        if not self._upload_lock.acquire(timeout=60):
            return  # an upload is stuck; the next tick (or the final one) sends these bytes
        try:
            with self._lock:
                text, self._buffer = self._buffer.getvalue(), io.StringIO()
            data = self._pending + text.encode("utf-8", errors="replace")
            if not data:
                return
            try:
                storage = self._storage or open_storage(self.uri)
                self._storage = storage
                if self._next is None:  # a re-run attempt continues after its parts
                    parts = list_parts(storage, self.attempt)
                    self._next = parts[-1][0] + 1 if parts else 1
                storage.put_bytes(data, part_name(self.attempt, self._next))
            except Exception as err:  # noqa: BLE001 - a log upload must never fail the attempt
                self._keep_for_retry(data)
                print(
                    f"lorajobs: could not upload the attempt log: {type(err).__name__}",
                    file=self._saved.get("stderr", sys.__stderr__),
                )
                return
            self._pending = b""
            self._next += 1
        finally:
            self._upload_lock.release()

    def _keep_for_retry(self, data: bytes) -> None:
        """Keep `data` for the next upload, unless that would pass `MAX_PENDING_BYTES`: then
        drop it, say so in the log, and move to a new part (the failed one may exist)."""
        if len(data) <= MAX_PENDING_BYTES:
            self._pending = data
            return
        note = f"[lorajobs: {len(data)} bytes of this log were dropped: uploads kept failing]\n"
        self._pending = note.encode()
        if self._next is not None:
            self._next += 1

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.upload()
