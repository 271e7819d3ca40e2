"""Why a queued job waits, as `status` and `show` say it: what the last scheduling round found.

A round (`lorajobs.orchestrator.scheduler.Round`) knows why each candidate it was offered stayed queued
(no node has its GPU type, its owner is at a cap, the GPUs it needs are busy) and, when it
stopped before it had seen every candidate, why (every node busy). The controller publishes that
as one small summary (`Queue.record_waiting`, one row) keyed by job class — priority, owner and
shape: jobs of one class wait for one reason, so the summary stays small however long the queue
is, and a job the round never read (past the first few of its class) still gets its class's
reason. It is rewritten only when it changes, and every `REFRESH_S` otherwise, so its age tells
whether a controller is still scheduling. `reason` turns it into a line for one job; a job in
retry backoff is told from its own row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone

from lorajobs.orchestrator.records import JobRecord
from lorajobs.orchestrator.scheduler import ClassKey, Node, Round, class_key, node_shape
from lorajobs.orchestrator.states import JobStatus

#: The controller rewrites an unchanged summary this often (seconds)...
REFRESH_S = 15.0
#: ... so one older than this means no controller has scheduled for a while.
STALE_S = 60.0
#: At most this many classes are kept; jobs of others get the round's general reason.
MAX_CLASSES = 2000
#: ... and at most this many nodes.
MAX_NODES = 500
NEXT_ROUND = "waiting for the next scheduling round"


@dataclass(frozen=True)
class WaitSummary:
    """What one scheduling round found: why each class waits, and why it stopped early."""

    at: datetime
    #: Why the round could place nothing more (None: it saw every candidate).
    stop: str | None = None
    classes: dict[ClassKey, str] = field(default_factory=dict)
    #: The nodes the round saw: id, accelerators, GPUs and CPUs in all and free (the
    #: dashboard's cluster view). Not part of `same_as`: free capacity changes all the time.
    nodes: list[dict[str, object]] = field(default_factory=list)

    def same_as(self, other: WaitSummary) -> bool:
        """The same reasons (whenever each was found)."""
        return self.stop == other.stop and self.classes == other.classes

    def to_json(self) -> str:
        rows = sorted(([list(k), v] for k, v in self.classes.items()), key=json.dumps)
        return json.dumps({"stop": self.stop, "classes": rows, "nodes": self.nodes}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, at: datetime) -> WaitSummary:
        data = json.loads(text)
        classes = {class_key(*key): reason for key, reason in data.get("classes", [])}
        return cls(at=at, stop=data.get("stop"), classes=classes, nodes=data.get("nodes", []))


def summarize(rnd: Round, at: datetime) -> WaitSummary:
    """The summary of a finished round."""
    classes = dict(list(rnd.plan.waiting_classes.items())[:MAX_CLASSES])
    nodes: list[dict[str, object]] = [
        {
            "id": n.id,
            "accelerators": n.accelerators,
            "gpus": n.total.get("GPU", 0.0),
            "gpus_free": n.free.get("GPU", 0.0),
            "cpus": n.total.get("CPU", 0.0),
            "cpus_free": n.free.get("CPU", 0.0),
        }
        for n in rnd.nodes[:MAX_NODES]
    ]
    return WaitSummary(at=at, stop=rnd.stop_reason, classes=classes, nodes=nodes)


def _aware(t: datetime | None) -> datetime | None:
    return t.replace(tzinfo=timezone.utc) if t is not None and t.tzinfo is None else t


def _clock(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%H:%M:%S UTC")


def reason(job: JobRecord, summary: WaitSummary | None, now: datetime) -> str | None:
    """Why `job` is still queued (None when it is not queued)."""
    if job.status is not JobStatus.queued:
        return None
    not_before = _aware(job.not_before)
    if not_before is not None and not_before > now:
        why = f"retry backoff until {_clock(not_before)}"
        return why + (f" (last attempt: {job.failure_reason})" if job.failure_reason else "")
    if summary is None:
        created = _aware(job.created_at)
        if created is not None and (now - created).total_seconds() > STALE_S:
            return "no scheduling round has run yet: is a controller running (lorajobs controller)?"
        return NEXT_ROUND
    key = class_key(
        job.priority, job.owner, job.gpus, job.gpu_type, job.cpus, job.memory_gb, job.nodes
    )
    why = summary.classes.get(key) or summary.stop or NEXT_ROUND
    if job.preempted_by and (job.failure_reason or "").startswith("preempted by"):
        # Requeued by a preemption: say by whom first (`status` shows the head of the line).
        why = f"{job.failure_reason}; {why}"
    if (now - summary.at).total_seconds() > STALE_S:
        why += f" (as of {_clock(summary.at)}: is a controller running?)"
    return why


def short(text: str | None, width: int = 44) -> str:
    """A reason cut to fit a table column: the part before any parenthesis, at most `width`."""
    if not text:
        return "-"
    head = text.split(" (", 1)[0]
    return head if len(head) <= width else head[: width - 1] + "…"


def unschedulable(job: JobRecord, nodes: list[Node]) -> str:
    shape = node_shape(job.gpus, job.gpu_type, job.cpus, job.memory_gb, job.nodes)
    need = shape.ray_resources()
    most = {k: max((n.total.get(k, 0.0) for n in nodes), default=0.0) for k in need}
    missing = ", ".join(
        f"{k}={v:g} (largest node has {most[k]:g})" for k, v in need.items() if most[k] + 1e-9 < v
    )
    hint = " — set resources.gpus: 0 to train on the CPU" if "GPU" in missing else ""
    return f"no node can ever run this job: needs {missing or shape.describe()}{hint}"
