"""Which backend serves a URI: one table from URL scheme to backend, so that adding a backend
touches this table and nothing that calls `open_storage`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from urllib.parse import ParseResult, unquote, urlparse

from lorajobs.jobspecs.failures import InvalidInput
from lorajobs.storage.base import Storage


def _file(parsed: ParseResult, uri: str) -> Storage:
    from lorajobs.storage.files import FileStorage

    return FileStorage(Path(unquote(parsed.path)) if parsed.scheme else Path(uri))


def _s3(parsed: ParseResult, uri: str) -> Storage:
    from lorajobs.storage.s3 import S3Storage  # boto3 only when needed

    return S3Storage(parsed.netloc, parsed.path.lstrip("/"))


#: URL scheme -> backend factory; "" is a plain local path.
BACKENDS: dict[str, Callable[[ParseResult, str], Storage]] = {"": _file, "file": _file, "s3": _s3}


def open_storage(uri: str) -> Storage:
    """Storage rooted at `uri`: `file:///path`, a plain local path, or `s3://bucket/prefix`."""
    parsed = urlparse(uri)
    backend = BACKENDS.get(parsed.scheme)
    if backend is None:
        raise InvalidInput(
            f"{uri}: unsupported storage scheme {parsed.scheme!r} (use s3:// or file://)"
        )
    return backend(parsed, uri)
