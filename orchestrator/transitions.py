"""What one status change checks and writes: the columns a caller may set, the timestamps a
state sets, the compare-and-set UPDATE. `Queue.apply` is the only caller, and so the one writer
of `jobs.status`."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, update

from lorajobs.jobspecs.failures import FailureKind, InvalidTransition, JobNotFound
from lorajobs.orchestrator.db import JOBS
from lorajobs.orchestrator.records import Change, dump_json
from lorajobs.orchestrator.states import ALLOWED, JobStatus

# Columns a caller may set along with a status change; timestamps and status are ours.
SETTABLE = frozenset(
    {"failure_kind", "failure_reason", "attempt", "result", "node", "cancel_requested"}
    | {"lease_owner", "lease_expires_at", "step", "total_steps", "loss", "it_per_s"}
    | {"not_before", "infra_retries", "user_retries", "internal_retries", "node_id"}
    | {"accelerator", "cost_usd", "preempt_at", "preempted_by", "gang_nodes", "pack_id"}
)
#: "Do not check the lease" (None is a lease owner value).
UNSET: Any = object()


def status_set(value: JobStatus | str | Iterable[JobStatus | str]) -> frozenset[JobStatus]:
    if isinstance(value, (JobStatus, str)):
        return frozenset({JobStatus(value)})
    return frozenset(JobStatus(v) for v in value)


def column_values(fields: dict[str, Any]) -> dict[str, Any]:
    """Validate caller-supplied columns and convert them to what is stored."""
    if "status" in fields:
        raise TypeError("status is set by `to=`, not as a field")
    unknown = set(fields) - SETTABLE
    if unknown:
        raise TypeError(f"cannot set {', '.join(sorted(unknown))} with a transition")
    out = dict(fields)
    if out.get("failure_kind") is not None:
        out["failure_kind"] = FailureKind(out["failure_kind"]).value
    if "result" in out and out["result"] is not None:
        out["result"] = dump_json(out["result"])
    return out


def stamped(values: dict[str, Any], to: JobStatus, now: datetime) -> dict[str, Any]:
    """`values` plus what entering `to` always sets: status, timestamps, cleared columns."""
    values = {**values, "status": to.value, "updated_at": now}
    if to is JobStatus.dispatched:
        values["dispatched_at"] = now
    elif to is JobStatus.running:
        values["started_at"] = now
    elif to is JobStatus.queued:
        # A new attempt starts clean; the events keep the history of the old one.
        values.update(dispatched_at=None, started_at=None, finished_at=None)
        for column in ("failure_kind", "failure_reason", "lease_owner", "lease_expires_at"):
            values.setdefault(column, None)
        for column in ("node_id", "accelerator"):
            values.setdefault(column, None)
    if to.is_terminal():
        values["finished_at"] = now
        values.setdefault("lease_owner", None)
        values.setdefault("lease_expires_at", None)
    return values


def checked(
    change: Change,
    current_of: dict[str, tuple[JobStatus, str | None]],
    wanted: frozenset[JobStatus],
    to: JobStatus,
    lease_owner_was: Any,
    now: datetime,
) -> tuple[JobStatus, dict[str, Any]]:
    """(the job's status now, the columns to set) for one change, or why it is refused."""
    if not change.reason:
        raise ValueError("a status change needs a reason")
    values = column_values(change.fields)
    if change.job_id not in current_of:
        raise JobNotFound(f"no job {change.job_id!r}")
    current, lease_owner = current_of[change.job_id]
    if current not in wanted:
        names = "/".join(sorted(s.value for s in wanted))
        raise InvalidTransition(
            f"job {change.job_id} is {current}, not {names}: cannot move it to {to}"
        )
    if to not in ALLOWED[current]:
        raise InvalidTransition(f"job {change.job_id}: {current} -> {to} is not an allowed change")
    if lease_owner_was is not UNSET and lease_owner != lease_owner_was:
        raise InvalidTransition(
            f"job {change.job_id}: its lease is held by {lease_owner}, not "
            f"{lease_owner_was}: not moved to {to}"
        )
    return current, stamped(values, to, now)


def compare_and_set(
    conn: Connection, rows: list[tuple[str, JobStatus, dict[str, Any]]], to: JobStatus
) -> None:
    """UPDATE each job only if its status is still the one just read; raise if one moved.
    One executemany per (status read, columns set): usually one for the whole batch."""
    groups: dict[tuple[str, tuple[str, ...]], list[dict[str, Any]]] = {}
    for job_id, current, values in rows:
        key = (current.value, tuple(sorted(values)))
        groups.setdefault(key, []).append(
            {"b_id": job_id, **{f"v_{k}": v for k, v in values.items()}}
        )
    for (status, columns), params in groups.items():
        stmt = (
            update(JOBS)
            .where(JOBS.c.id == bindparam("b_id", type_=JOBS.c.id.type), JOBS.c.status == status)
            .values({c: bindparam(f"v_{c}", type_=JOBS.c[c].type) for c in columns})
        )
        result = conn.execute(stmt, params)
        if result.rowcount != len(params):
            raise InvalidTransition(
                f"job {params[0]['b_id']} changed status concurrently: not moved to {to}"
            )
