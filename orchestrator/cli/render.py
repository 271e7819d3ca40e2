"""Turning job records into tables and JSON for the CLI. No torch, no Ray."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from rich.table import Table

from lorajobs.orchestrator import waiting
from lorajobs.orchestrator.queue import EventRecord, JobRecord


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


def eta_s(job: JobRecord) -> float | None:
    """Seconds left at the current speed, for an active job that reports progress."""
    if job.status.is_terminal() or not job.total_steps or not job.it_per_s:
        return None
    return max(0.0, (job.total_steps - (job.step or 0)) / job.it_per_s)


def gpu_text(job: JobRecord) -> str:
    """The GPU type the job got (or asked for), 'cpu' for CPU jobs."""
    if not job.gpus:
        return "cpu"
    kind = job.accelerator or job.gpu_type or "any"
    return kind if job.gpus == 1 else f"{job.gpus:g}x {kind}"


def attempts(events: list[EventRecord]) -> list[dict[str, Any]]:
    """Every attempt of a job, rebuilt from its events: when and where it ran, how it ended,
    what it cost."""
    out: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    for e in events:
        data = e.data or {}
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
                outcome="requeued" if e.to_status.value == "queued" else e.to_status.value,
                reason=e.reason,
                cost_usd=data.get("cost_usd"),
            )
            current["attempt"] = data.get("attempt", current["attempt"])
            current["node"] = data.get("node") or current["node"]
            current = None
    return out


def attempts_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("ATTEMPT", "DISPATCHED", "NODE", "GPU", "OUTCOME", "COST", "REASON"):
        table.add_column(col)
    for a in rows:
        table.add_row(
            str(a["attempt"]),
            a["dispatched_at"][:19].replace("T", " "),
            a["node"] or (a["node_id"] or "-")[:12],
            a["accelerator"] or "-",
            a["outcome"] or "running",
            f"${a['cost_usd']:.4f}" if a["cost_usd"] is not None else "-",
            a["reason"] or "",
        )
    return table


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


STATUS_COLUMNS = (
    "ID", "NAME", "KIND", "STATE", "PROGRESS", "LOSS", "IT/S", "ETA", "ELAPSED", "NODE", "GPU",
    "ATTEMPT", "OWNER", "WAITING",
)  # fmt: skip


def status_rows(
    jobs: list[JobRecord], reasons: Mapping[str, str | None] | None = None
) -> list[tuple[str, ...]]:
    """The cells of the `status` table, one tuple of strings per job (`STATUS_COLUMNS`);
    `reasons`: why each queued job waits (a short form is shown)."""
    reasons = reasons or {}
    return [
        (
            j.id,
            j.name,
            j.kind,
            j.status.value,
            progress_text(j),
            f"{j.loss:.4f}" if j.loss is not None else "-",
            f"{j.it_per_s:.1f}" if j.it_per_s else "-",
            fmt_duration(eta_s(j)),
            fmt_duration(elapsed_s(j)),
            j.node or "-",
            gpu_text(j),
            str(j.attempt),
            j.owner,
            waiting.short(reasons.get(j.id)),
        )
        for j in jobs
    ]


def status_table(jobs: list[JobRecord], reasons: Mapping[str, str | None] | None = None) -> Table:
    """The `status` table for a terminal (Rich: states in colour)."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in STATUS_COLUMNS:
        table.add_column(col, no_wrap=True)
    for row in status_rows(jobs, reasons):
        state = row[3]
        table.add_row(*row[:3], f"[{STATE_STYLE.get(state, '')}]{state}[/]", *row[4:])
    return table


def status_text(jobs: list[JobRecord], reasons: Mapping[str, str | None] | None = None) -> str:
    """The `status` table as plain aligned text, for pipes and files: nothing cut, nothing
    coloured, and none of Rich's layout work (half of `status`'s time on a long queue)."""
    rows = [STATUS_COLUMNS, *status_rows(jobs, reasons)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(STATUS_COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


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
