"""Where a job may read and write, in a shared deployment: one rule for the server and the worker.

Each owner's data, staging, logs and adapters live under the owner's own prefix,
`<bucket>/owners/<owner>/`, so a bucket policy can fence a tenant and deleting that prefix
removes all of a tenant's bytes. A job's `dataset`, `base_model`, `data.validation` and
`output` must lie under that prefix or under one of the deployment's allowed prefixes (shared
base models, say); `file://` and absolute paths outside the bucket only when the deployment is
local-only (one machine); hub ids only when the deployment allows the hub, and then pinned to a
commit. The server checks a spec at submit and the worker again before it reads or writes, so a
row changed behind the server's back still cannot reach another tenant's bytes.

Pure and light (no I/O but `os.path.realpath` for `file://`): the server, the controller and
the worker all import it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from lorajobs.storage.base import join_uri

#: The folder of the bucket that holds one prefix per owner.
OWNERS = "owners"

#: `org/name` or `org/name@revision`, as the Hugging Face hub names repositories.
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[\w./-]+)?$")
#: A revision pinned to one commit: 40 hex digits.
PINNED = re.compile(r"@[0-9a-f]{40}$")
#: Owners become a path segment: the same safe alphabet as adapter names.
OWNER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

#: The spec fields that name a place, as `dotted.path` -> where it is read from the spec dict.
LOCATION_FIELDS = ("base_model", "dataset", "data.validation", "output")


def owner_root(bucket: str, owner: str) -> str:
    """`<bucket>/owners/<owner>`: every byte of one owner's jobs and data lives under it."""
    if not OWNER_RE.match(owner):
        raise ValueError(f"owner {owner!r}: use letters, digits, '.', '_' or '-'")
    return join_uri(bucket, OWNERS, owner)


def spec_locations(spec: Mapping[str, object]) -> dict[str, str]:
    """The places a spec (its canonical dict) names: `{field: value}` for those that are set."""
    out: dict[str, str] = {}
    for name in LOCATION_FIELDS:
        value: object = spec
        for part in name.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        if isinstance(value, str) and value:
            out[name] = value
    return out


def is_hub_id(value: str) -> bool:
    return (
        "://" not in value and not value.startswith((".", "/", "~")) and bool(HUB_ID.match(value))
    )


@dataclass(frozen=True)
class Boundary:
    """A deployment's rule for where jobs may reach."""

    bucket: str
    #: Further prefixes every owner's jobs may read (and write, for `output`): shared models.
    allowed: tuple[str, ...] = field(default=())
    #: One machine: `file://` URIs and absolute paths outside the bucket are acceptable.
    local_only: bool = False
    #: Hub ids (`org/name@<commit>`) are acceptable for `base_model`.
    hub: bool = False

    def problems(self, owner: str, spec: Mapping[str, object], output_uri: str) -> list[str]:
        """One line per location of `spec` (and the job's `output_uri`) that lies outside
        `owner`'s reach; empty when the job may run."""
        home = owner_root(self.bucket, owner)
        found = []
        places = spec_locations(spec)
        if places.get("output") != output_uri:  # the job's output, when the spec names none
            places["output_uri"] = output_uri
        for name, value in places.items():
            why = self._why_not(name, value, home)
            if why:
                found.append(f"{'output' if name == 'output_uri' else name}: {why}")
        return found

    def _why_not(self, name: str, value: str, home: str) -> str | None:
        if name == "base_model" and is_hub_id(value):
            if not self.hub:
                return f"{value!r} is a hub id, and this deployment does not download from the hub"
            if not PINNED.search(value):
                return f"{value!r} is not pinned to a commit (org/name@<40-hex revision>)"
            return None
        uri = as_uri(value)
        if uri is None:
            return f"{value!r} is a relative path: give a bucket URI (lorajobs data push)"
        if ".." in uri.split("://", 1)[1].split("/"):
            return f"{value!r} climbs out of its folder ('..')"
        if _under(uri, home):
            return None
        writes = name in ("output", "output_uri")
        for prefix in () if writes else self.allowed:
            if _under(uri, prefix) and (self.local_only or not prefix.startswith("file://")):
                return None
        if uri.startswith("file://") and not self.local_only and not _under(uri, self.bucket):
            return f"{value!r} is a local path, and this deployment is not local-only"
        return f"{value!r} lies outside your prefix {home}/" + (
            "" if writes or not self.allowed else " and the allowed prefixes"
        )


def as_uri(value: str) -> str | None:
    """`value` as a URI: absolute paths become `file://` URIs; None for a relative path."""
    if "://" in value:
        return value
    if value.startswith("/"):
        return "file://" + value
    return None


def _under(uri: str, prefix: str) -> bool:
    """Whether `uri` is `prefix` or lies below it, segment by segment (`s3://b/ab` is not under
    `s3://b/a`); `file://` paths compare after resolving symlinks."""
    if uri.startswith("file://") and prefix.startswith("file://"):
        path = os.path.realpath(uri[len("file://") :])
        root = os.path.realpath(prefix[len("file://") :])
        return path == root or path.startswith(root.rstrip("/") + "/")
    scheme, _, rest = uri.partition("://")
    p_scheme, _, p_rest = prefix.partition("://")
    if scheme != p_scheme:
        return False
    segs = [s for s in rest.split("/") if s]
    p_segs = [s for s in p_rest.split("/") if s]
    return segs[: len(p_segs)] == p_segs


#: The deployment settings a boundary is read from; the controller forwards them to workers.
ENV_KEYS = (
    "LORAJOBS_TENANCY",
    "LORAJOBS_BUCKET",
    "LORAJOBS_ALLOWED_PREFIXES",
    "LORAJOBS_LOCAL_ONLY",
    "LORAJOBS_HUB",
)


def boundary_from_env(
    env: Mapping[str, str], *, bucket: str | None = None, force: bool = False
) -> Boundary | None:
    """The deployment's boundary from its settings: `LORAJOBS_TENANCY=shared` (the server
    always is), `LORAJOBS_ALLOWED_PREFIXES` (comma-separated URIs), `LORAJOBS_LOCAL_ONLY=1`,
    `LORAJOBS_HUB=on`. None for the embedded single-user default, where a spec may name any
    local path, `file://` or `s3://` URI and hub id, as on one's own machine."""
    shared = env.get("LORAJOBS_TENANCY", "").strip().lower() == "shared"
    if not (shared or force):
        return None
    bucket = bucket or env.get("LORAJOBS_BUCKET", "").strip()
    if not bucket:
        raise ValueError("LORAJOBS_TENANCY=shared needs LORAJOBS_BUCKET")
    allowed = tuple(
        p.strip() for p in env.get("LORAJOBS_ALLOWED_PREFIXES", "").split(",") if p.strip()
    )
    return Boundary(
        bucket=bucket,
        allowed=allowed,
        local_only=env.get("LORAJOBS_LOCAL_ONLY", "").strip() == "1",
        hub=env.get("LORAJOBS_HUB", "").strip().lower() in ("1", "on", "true"),
    )
