"""The JSON shapes of jobs and events, shared by `--json` output and the HTTP API. No torch,
no Ray, no Rich."""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timezone
from typing import Any

from lorajobs.orchestrator.records import EventRecord, JobRecord


def _aware(t: datetime | None) -> datetime | None:
    return t.replace(tzinfo=timezone.utc) if t is not None and t.tzinfo is None else t


def elapsed_s(job: JobRecord, now: datetime | None = None) -> float | None:
    """Seconds since the attempt was dispatched (pulling and loading count: the node is held),
    up to the end if it ended."""
    start = _aware(job.dispatched_at or job.started_at)
    if start is None:
        return None
    end = _aware(job.finished_at) or now or datetime.now(timezone.utc)
    return max(0.0, (end - start).total_seconds())


def eta_s(job: JobRecord) -> float | None:
    """Seconds left at the current speed, for an active job that reports progress."""
    if job.status.is_terminal() or not job.total_steps or not job.it_per_s:
        return None
    return max(0.0, (job.total_steps - (job.step or 0)) / job.it_per_s)


def adapter_uri(job: JobRecord) -> str | None:
    return (job.result or {}).get("adapter_uri")


def attempts(events: list[EventRecord]) -> list[dict[str, Any]]:
    """Every attempt of a job, rebuilt from its events: when and where it ran, how it ended,
    what it cost."""
    out: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    for e in events:
        data = e.data or {}
        if e.from_status is e.to_status:
            continue  # a note on the way (priority changed, cancel requested): no new phase
        if e.to_status.value == "dispatched":
            current = {
                "attempt": len(out) + 1,
                "dispatched_at": _aware(e.at).isoformat(),  # type: ignore[union-attr]
                "node_id": data.get("node_id"),
                "accelerator": data.get("accelerator"),
                "started_at": None,
                "ended_at": None,
                "outcome": None,
                "reason": None,
                "node": None,
                "cost_usd": None,
            }
            out.append(current)
        elif current is not None and e.to_status.value == "running":
            current["started_at"] = _aware(e.at).isoformat()  # type: ignore[union-attr]
        elif current is not None:
            current.update(
                ended_at=_aware(e.at).isoformat(),  # type: ignore[union-attr]
                outcome=_outcome(e.to_status.value, data),
                reason=e.reason,
                cost_usd=data.get("cost_usd"),
            )
            current["attempt"] = data.get("attempt", current["attempt"])
            current["node"] = data.get("node") or current["node"]
            current = None
    return out


def _outcome(to: str, data: dict[str, Any]) -> str:
    """How an attempt ended: its job's new state, or `requeued` / `preempted` (its node was
    reclaimed with notice: requeued with no retry charged)."""
    if to != "queued":
        return to
    return "preempted" if data.get("preempted") else "requeued"


def job_json(job: JobRecord, wait_reason: str | None = None) -> dict[str, Any]:
    """The stable JSON shape of a job for `--json` (adds `state`, the user-facing name, and
    for a queued job `wait_reason`, why it is not running yet)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(job):
        v = getattr(job, f.name)
        if isinstance(v, datetime):
            v = _aware(v).isoformat()  # type: ignore[union-attr]
        elif hasattr(v, "value"):
            v = v.value
        out[f.name] = v
    out["state"] = out["status"]
    out["adapter_uri"] = adapter_uri(job)
    out["elapsed_s"] = elapsed_s(job)
    out["eta_s"] = eta_s(job)
    out["wait_reason"] = wait_reason
    return out


def pack_text(job: JobRecord) -> str | None:
    """Which jobs share (or shared) `job`'s attempt, for `show`; None when it trained alone."""
    others = (job.result or {}).get("packed_with")
    if others:
        return "trained in one attempt with " + ", ".join(others)
    if job.pack_id and job.pack_id != job.id:
        return f"shares the attempt of job {job.pack_id}"
    return None


def event_json(ev: EventRecord) -> dict[str, Any]:
    out = dataclasses.asdict(ev)
    for k, v in out.items():
        if isinstance(v, datetime):
            out[k] = _aware(v).isoformat()  # type: ignore[union-attr]
        elif hasattr(v, "value"):
            out[k] = v.value
    return out


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)


def _when(v: Any) -> datetime | None:
    return datetime.fromisoformat(v) if isinstance(v, str) else None


def job_from_json(data: dict[str, Any]) -> JobRecord:
    """A JobRecord again from `job_json`'s shape (what the API sends the CLI)."""
    from lorajobs.jobspecs.failures import FailureKind
    from lorajobs.orchestrator.states import JobStatus

    values: dict[str, Any] = {}
    for f in dataclasses.fields(JobRecord):
        v = data.get(f.name)
        if f.name == "status":
            v = JobStatus(v)
        elif f.name == "failure_kind":
            v = FailureKind(v) if v else None
        elif f.name.endswith("_at") or f.name == "not_before":
            v = _when(v)
        elif f.name == "cancel_requested":
            v = bool(v)
        values[f.name] = v
    values["infra_retries"] = values["infra_retries"] or 0
    values["user_retries"] = values["user_retries"] or 0
    values["internal_retries"] = values["internal_retries"] or 0
    return JobRecord(**values)


def event_from_json(data: dict[str, Any]) -> EventRecord:
    from lorajobs.orchestrator.states import JobStatus

    return EventRecord(
        id=data["id"],
        job_id=data["job_id"],
        at=_when(data["at"]),  # type: ignore[arg-type]
        from_status=JobStatus(data["from_status"]) if data.get("from_status") else None,
        to_status=JobStatus(data["to_status"]),
        reason=data["reason"],
        data=data.get("data"),
    )
