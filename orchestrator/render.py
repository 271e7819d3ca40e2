"""Turning job records into tables and JSON for the CLI. No torch, no Ray."""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timezone
from typing import Any

from rich.table import Table

from orchestrator.queue import EventRecord, JobRecord


def _aware(t: datetime | None) -> datetime | None:
    return t.replace(tzinfo=timezone.utc) if t is not None and t.tzinfo is None else t


def elapsed_s(job: JobRecord, now: datetime | None = None) -> float | None:
    """Seconds since training started (or dispatch), up to the end if it ended."""
    start = _aware(job.started_at or job.dispatched_at)
    if start is None:
        return None
    end = _aware(job.finished_at) or now or datetime.now(timezone.utc)
    return max(0.0, (end - start).total_seconds())


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def progress_text(job: JobRecord) -> str:
    if job.total_steps:
        pct = 100.0 * (job.step or 0) / job.total_steps
        return f"{job.step or 0}/{job.total_steps} {pct:3.0f}%"
    return "-"


def adapter_uri(job: JobRecord) -> str | None:
    return (job.result or {}).get("adapter_uri")


def job_json(job: JobRecord) -> dict[str, Any]:
    """The stable JSON shape of a job for `--json` (adds `state`, the user-facing name)."""
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
    return out


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


STATE_STYLE = {
    "queued": "yellow",
    "dispatched": "cyan",
    "running": "blue",
    "succeeded": "green",
    "failed": "red",
    "cancelled": "magenta",
}


def status_table(jobs: list[JobRecord]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("ID", "NAME", "KIND", "STATE", "PROGRESS", "LOSS", "IT/S", "ELAPSED", "ATTEMPT", "OWNER"):
        table.add_column(col, no_wrap=True)
    for j in jobs:
        state = j.status.value
        table.add_row(
            j.id,
            j.name,
            j.kind,
            f"[{STATE_STYLE.get(state, '')}]{state}[/]",
            progress_text(j),
            f"{j.loss:.4f}" if j.loss is not None else "-",
            f"{j.it_per_s:.1f}" if j.it_per_s else "-",
            fmt_duration(elapsed_s(j)),
            str(j.attempt),
            j.owner,
        )
    return table


def events_table(events: list[EventRecord]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("TIME", "FROM", "TO", "REASON"):
        table.add_column(col)
    for e in events:
        table.add_row(
            _aware(e.at).strftime("%Y-%m-%d %H:%M:%S"),  # type: ignore[union-attr]
            e.from_status.value if e.from_status else "-",
            e.to_status.value,
            e.reason,
        )
    return table
