"""Plain snapshots of queue rows, detached from any database session."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from lorajobs.jobspecs.failures import FailureKind
from lorajobs.orchestrator.states import JobStatus

if TYPE_CHECKING:  # the spec models load pydantic: only where a spec is parsed
    from lorajobs.jobspecs import AnyJobSpec


def aware(t: datetime | None) -> datetime | None:
    """`t` in UTC with its zone (SQLite hands back naive datetimes, which are UTC)."""
    return t.replace(tzinfo=timezone.utc) if t is not None and t.tzinfo is None else t


@dataclass(frozen=True)
class JobRecord:
    """A snapshot of one `jobs` row."""

    id: str
    name: str
    kind: str
    owner: str
    priority: int
    status: JobStatus
    spec: dict[str, Any]
    output_uri: str
    idempotency_key: str | None
    attempt: int
    gpus: float
    gpu_type: str | None
    cpus: int
    created_at: datetime
    updated_at: datetime
    dispatched_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    failure_kind: FailureKind | None
    failure_reason: str | None
    cancel_requested: bool
    step: int | None
    total_steps: int | None
    loss: float | None
    it_per_s: float | None
    node: str | None
    result: dict[str, Any] | None
    lease_owner: str | None
    lease_expires_at: datetime | None
    memory_gb: float | None = None
    max_runtime_s: float | None = None
    not_before: datetime | None = None
    infra_retries: int = 0
    user_retries: int = 0
    internal_retries: int = 0
    node_id: str | None = None
    accelerator: str | None = None
    cost_usd: float | None = None
    preempt_at: datetime | None = None
    preempted_by: str | None = None
    nodes: int = 1
    gang_nodes: str | None = None
    pack_id: str | None = None

    def parsed_spec(self) -> AnyJobSpec:
        """The stored spec as a validated model again (what the worker is given)."""
        from lorajobs.jobspecs import parse_spec

        return parse_spec(self.spec, source=f"job {self.id}")


@dataclass(frozen=True)
class EventRecord:
    """A snapshot of one `job_events` row: one status change."""

    id: int
    job_id: str
    at: datetime
    from_status: JobStatus | None
    to_status: JobStatus
    reason: str
    data: dict[str, Any] | None


def dump_json(value: Any) -> str:
    """JSON text as stored in the database."""
    # Canonical (sorted, compact) so that equal specs are equal strings.
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def job_record(row: Any) -> JobRecord:
    """A JobRecord from a `jobs` row (JSON columns parsed, enums restored)."""
    m = row._mapping
    return JobRecord(
        **{
            **{k: m[k] for k in m.keys()},
            "status": JobStatus(m["status"]),
            "spec": json.loads(m["spec"]),
            "failure_kind": FailureKind(m["failure_kind"]) if m["failure_kind"] else None,
            "cancel_requested": bool(m["cancel_requested"]),
            "result": json.loads(m["result"]) if m["result"] is not None else None,
        }
    )


def event_record(row: Any) -> EventRecord:
    """An EventRecord from a `job_events` row."""
    m = row._mapping
    return EventRecord(
        id=m["id"],
        job_id=m["job_id"],
        at=m["at"],
        from_status=JobStatus(m["from_status"]) if m["from_status"] else None,
        to_status=JobStatus(m["to_status"]),
        reason=m["reason"],
        data=json.loads(m["data"]) if m["data"] is not None else None,
    )


@dataclass(frozen=True)
class Change:
    """One status change to make: which job, why, and the columns to set along with it."""

    job_id: str
    reason: str
    fields: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] | None = None


def launch_extra(job: JobRecord, rate: float | None) -> dict[str, Any]:
    """What an attempt of `job` is told beside its spec: where it was placed (the accelerator,
    the attempt, a multi-node gang's nodes, which Ray Train keeps to) and, with prices set,
    what it costs (for the sidecar)."""
    placement: dict[str, Any] = {"accelerator": job.accelerator or "cpu", "attempt": job.attempt}
    if job.gang_nodes:
        placement["gang_nodes"] = job.gang_nodes.split(",")
    extra: dict[str, Any] = {"placement": placement}
    if rate is not None:
        extra["cost"] = {
            "usd_per_hour": rate,
            "accelerator": job.accelerator or "cpu",
            "earlier_attempts_usd": job.cost_usd or 0.0,
        }
    return extra
