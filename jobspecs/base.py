"""What every part of a job spec shares: strict models (unknown keys are errors) and the check
on bucket locations."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


#: The URI schemes a job may read from or write to; anything else ("ftp://", "http://") is
#: refused at validation, in every mode, so no spec queues a job bound to fail or to reach a
#: store nobody configured.
SCHEMES = ("file", "s3")
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


def check_location(value: str | None) -> str | None:
    """A data / model / output location: a local path, a hub id, or a `file://` / `s3://`
    URI. Raises ValueError for another scheme or a URI without a path."""
    if value is None:
        return None
    m = _SCHEME_RE.match(value)
    if m is None or len(m.group(1)) == 1:  # no scheme (a Windows drive letter is a path)
        return value
    scheme = m.group(1).lower()
    if scheme not in SCHEMES or not value[m.end() :].startswith("//"):
        raise ValueError(f"unsupported scheme '{scheme}://': use a local path, file:// or s3://")
    if not value[m.end() + 2 :].strip("/"):
        raise ValueError(f"{value!r} names no bucket or folder")
    return value
