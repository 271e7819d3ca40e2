"""What to do with an active job whose controller is gone: the restart/takeover rules. Pure
decisions plus one bucket read; the controller applies them through `Queue.transition`.

A controller leases every job it dispatched (`lease_owner`, `lease_expires_at`) and renews the
leases every third of `lease_s`. The lease owner names the controller and its Ray driver
(`<controller> <ray session>/<ray job>`). For a job it does not hold, a controller decides:

- lease held and not expired, or its owner's Ray driver still connected → leave it (`live`);
- the owner's Ray driver is dead → take it over now: Ray killed the driver's tasks with it, so
  no attempt is left running (`take`);
- lease expired and the driver's state unknown (another, now gone, local Ray) → `take`;
- lease expired but the driver still connected (a controller stuck, or cut off from the
  database) → `wait`, up to `grace_s` past expiry, then `take`; when that controller recovers, its
  heartbeat sees the job is no longer its own and cancels its task.

Taking over: a cancel request is honoured (cancelled); an adapter already complete in the bucket
(its marker, the sidecar, is there) means the attempt finished and only its record was lost, so
the job succeeds from the sidecar without running again; otherwise the job is requeued with
attempt + 1 (failure kind infra, not charged to the job's retry budget: losing the controller
is not the job's fault), and resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from lorajobs.orchestrator.records import JobRecord, aware

log = logging.getLogger("lorajobs.controller")
LIVE, WAIT, TAKE = "live", "wait", "take"


def lease_owner(controller: str, driver: str | None) -> str:
    return f"{controller} {driver}" if driver else controller


def lease_driver(owner: str | None) -> str | None:
    """The Ray driver recorded in a lease owner, if any."""
    if not owner or " " not in owner:
        return None
    return owner.split(" ", 1)[1]


def verdict(
    job: JobRecord,
    *,
    now: datetime,
    grace_s: float,
    driver_alive: Callable[[str], bool | None],
) -> str:
    """LIVE, WAIT or TAKE for an active job this controller does not run."""
    driver = lease_driver(job.lease_owner)
    alive = driver_alive(driver) if driver else None
    if alive is False:
        return TAKE
    expires = aware(job.lease_expires_at)
    if expires is not None and expires >= now:
        return LIVE
    if alive is True:
        late = expires is not None and now - expires > timedelta(seconds=grace_s)
        return TAKE if late else WAIT
    return TAKE


def adapter_uri(job: JobRecord) -> str:
    from lorajobs.storage.base import join_uri

    return join_uri(job.output_uri, "adapters", job.name, job.id)


def completed_result(job: JobRecord) -> dict[str, Any] | None:
    """The result of an attempt that finished uploading the adapter, read back from its
    sidecar; None if the adapter is not complete (no marker, or the marker is another job's)."""
    from lorajobs.jobspecs.failures import ObjectNotFound
    from lorajobs.storage.adapters import MARKER
    from lorajobs.storage.backends import open_storage

    uri = adapter_uri(job)
    try:
        meta = json.loads(open_storage(uri).get_bytes(MARKER))
    except (ObjectNotFound, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("job_id") != job.id:
        return None
    files = meta.get("files") or {}
    return {
        "ok": True,
        "adapter_uri": uri,
        "files": {rel: info.get("sha256") for rel, info in files.items() if isinstance(info, dict)},
        "metrics": meta.get("metrics") or {},
        "timings": meta.get("timings") or {},
        "node": meta.get("node"),
        "recovered_from_sidecar": True,
        "sidecar_attempt": meta.get("attempt"),
    }


def discard_checkpoints(job: JobRecord) -> None:
    """After a success: the job's checkpoints are no longer needed (housekeeping; logged)."""
    from lorajobs.storage.adapters import MARKER
    from lorajobs.storage.checkpoints import discard_after_success

    try:
        discard_after_success(job.output_uri, job.id, adapter_uri(job), adapter_marker=MARKER)
    except Exception as err:  # noqa: BLE001 - the job succeeded; this is housekeeping
        log.warning("job %s: could not remove its checkpoints: %s", job.id, err)


def delete_partial_adapter(job: JobRecord) -> None:
    """After a cancel: whatever part of the adapter was uploaded goes (logged if it cannot)."""
    from lorajobs.storage.adapters import delete_adapter

    try:
        delete_adapter(adapter_uri(job))
    except Exception as err:  # noqa: BLE001 - cancel must still complete
        log.warning("job %s: could not remove a partial adapter: %s", job.id, err)
