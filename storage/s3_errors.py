"""What boto3, botocore and s3transfer raise, sorted out: which errors are transport failures,
which break a response stream, the error under s3transfer's wrappers, and one short line of a
long message. Used by the `s3://` backend to turn every failure into one `StorageError` line."""

from __future__ import annotations

import functools


@functools.cache
def transport_errors() -> tuple[type[BaseException], ...]:
    """What boto3 / botocore / s3transfer raise, plus local I/O; programming errors pass."""
    import s3transfer.exceptions as s3t
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    return (
        BotoCoreError,
        ClientError,
        Boto3Error,
        s3t.RetriesExceededError,
        s3t.S3UploadFailedError,
        s3t.S3DownloadFailedError,
        OSError,
    )


@functools.cache
def stream_errors() -> tuple[type[BaseException], ...]:
    """What reading a response body raises when the connection breaks mid-way."""
    from botocore import exceptions as bex
    from urllib3.exceptions import HTTPError

    found = [bex.ReadTimeoutError, bex.ConnectionClosedError, bex.IncompleteReadError, HTTPError]
    streaming = getattr(bex, "ResponseStreamingError", None)  # botocore >= 1.29
    if streaming is not None:
        found.append(streaming)
    return (*found, ConnectionError)


def root_cause(e: BaseException) -> BaseException:
    """Unwrap s3transfer/boto3 wrappers (S3UploadFailedError, RetriesExceededError)."""
    from botocore.exceptions import BotoCoreError, ClientError

    seen = 0
    cur: BaseException | None = e
    while cur is not None and seen < 10:
        if isinstance(cur, (ClientError, BotoCoreError)):
            return cur
        last = getattr(cur, "last_exception", None)
        cur = last if isinstance(last, BaseException) else (cur.__cause__ or cur.__context__)
        seen += 1
    return e


def one_line(s: str) -> str:
    return " ".join(s.split())[:300]
