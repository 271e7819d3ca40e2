"""The worker's log of one attempt, streamed to the bucket so `lorajobs logs` reads it anywhere.

Inside the Ray task, `AttemptLog` captures Python logging (INFO and up), stdout/stderr and the
progress lines in memory (a killed worker leaves no temp files behind), and uploads the whole
log every few seconds and at the end to
`<bucket>/jobs/<job_id>/logs/attempt-<N>.log`. Light: no torch, no Ray, no database. Nothing
here logs environment variables, and the bucket URI it is given carries no credentials (those
stay in the node's environment).
"""

from __future__ import annotations

import io
import logging
import sys
import threading
import time
from types import TracebackType
from typing import Any, TextIO

from lorajobs.jobspecs.failures import ObjectNotFound
from lorajobs.storage.backends import open_storage
from lorajobs.storage.base import join_uri

UPLOAD_EVERY_S = 3.0


def logs_uri(output_uri: str, job_id: str) -> str:
    return join_uri(output_uri, "jobs", job_id, "logs")


def log_name(attempt: int) -> str:
    return f"attempt-{attempt}.log"


def read_log(output_uri: str, job_id: str, attempt: int) -> bytes | None:
    """The log of one attempt as uploaded so far; None if there is none (yet)."""
    try:
        return open_storage(logs_uri(output_uri, job_id)).get_bytes(log_name(attempt))
    except ObjectNotFound:
        return None


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
    """Context manager: capture this process's output for one attempt and keep uploading it."""

    def __init__(
        self, output_uri: str, job_id: str, attempt: int, *, every_s: float = UPLOAD_EVERY_S
    ) -> None:
        self.uri = logs_uri(output_uri, job_id)
        self.name = log_name(attempt)
        self.every_s = every_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._buffer = io.StringIO()
        self._uploaded = -1
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
        self.upload()

    def upload(self) -> None:
        """Send the whole file if it grew since the last upload; never raise."""
        try:
            with self._lock:
                data = self._buffer.getvalue().encode("utf-8", errors="replace")
            if len(data) == self._uploaded:
                return
            open_storage(self.uri).put_bytes(data, self.name)
            self._uploaded = len(data)
        except Exception as err:  # noqa: BLE001 - a log upload must never fail the attempt
            print(
                f"lorajobs: could not upload the attempt log: {type(err).__name__}",
                file=self._saved.get("stderr", sys.__stderr__),
            )

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.upload()
