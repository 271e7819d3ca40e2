"""Turning job records into tables and JSON for the CLI. No torch, no Ray."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.table import Table

from lorajobs.orchestrator import waiting
from lorajobs.orchestrator.queue import EventRecord, JobRecord
from lorajobs.orchestrator.views import (  # noqa: F401 - `render.job_json` & co. for callers
    _aware,
    adapter_uri,
    attempts,
    dumps,
    elapsed_s,
    eta_s,
    event_json,
    job_json,
)


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


def gpu_text(job: JobRecord) -> str:
    """The GPU type the job got (or asked for), 'cpu' for CPU jobs."""
    if not job.gpus:
        return "cpu"
    kind = job.accelerator or job.gpu_type or "any"
    return kind if job.gpus == 1 else f"{job.gpus:g}x {kind}"


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


def preemption_lines(job: JobRecord, events: list[EventRecord]) -> list[str]:
    """`show`'s lines on preemption: each attempt preempted and by whom, and a stop underway."""
    from lorajobs.orchestrator.preempting import requested

    lines = [
        f"preempted: attempt {e.data.get('attempt')} by {e.data.get('by')} at "
        f"{e.at.strftime('%Y-%m-%d %H:%M:%S')}"
        for e in events
        if e.data and e.data.get("preempted")
    ]
    if job.status.value in ("dispatched", "running") and requested(job):
        lines.append(f"preempting: asked to stop for job {job.preempted_by}; checkpointing")
    return lines
