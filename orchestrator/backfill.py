"""Reservations for the job at the head of the queue, so that big jobs are not starved.

When the best ranked job that does not fit now (an 8-GPU job behind a stream of 1-GPU ones)
finds no lower priority job to preempt, the round reserves for it the node it will fit on first:
the running jobs there end one by one, at the times their estimates say (steps x measured
seconds per step of their shape; a job being preempted within the checkpoint grace), and the
first moment their freed resources plus what is free now hold the job is when it is due. Other
jobs start on that node only if they end before then (their estimate times a safety factor;
an unknown estimate never backfills); on the other nodes they start as they fit. A gang over
`nodes` nodes reserves the `nodes` nodes it fits on first, all due when the last of them is
(`earliest_gang`), and a running gang gives its per-node share back on each of its nodes. Pure:
the round (`lorajobs.orchestrator.scheduler.Round`) applies it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from lorajobs.orchestrator.resources import (
    _EPS,
    Candidate,
    Hold,
    Node,
    Shape,
    _need_items,
    node_shape,
)


@dataclass(frozen=True)
class Reservation:
    """Node `node_id` is kept for job `job_id`, which is expected to fit there by `at`."""

    job_id: str
    node_id: str
    at: datetime
    #: Every node reserved for the job (a gang's `nodes`; else just `node_id`).
    gang: tuple[str, ...] = ()

    def describe(self, shape: Shape) -> str:
        """The reserved job's wait reason."""
        if len(self.gang) > 1:
            where = ", ".join(n[:12] for n in self.gang)
            return (
                f"waiting for {len(self.gang)} nodes with {shape.describe()} free at once (a "
                f"gang): nodes {where} are reserved for it, due by {_clock(self.at)}"
            )
        return (
            f"waiting for {shape.describe()} to free up: node {self.node_id[:12]} is reserved "
            f"for it, due by {_clock(self.at)}"
        )

    def excludes(self, shape: Shape) -> str:
        """The wait reason of a job kept off the reserved node."""
        return (
            f"waiting for {shape.describe()} to free up (node {self.node_id[:12]} is reserved "
            f"for job {self.job_id} from {_clock(self.at)}; only jobs that end before start there)"
        )


def _clock(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%H:%M:%S UTC")


def _fits(free: dict[str, float], shape: Shape) -> bool:
    return all(free.get(k, 0.0) + _EPS >= v for k, v in _need_items(shape))


def ends(hold: Hold, now: datetime, grace_s: float) -> datetime | None:
    """When `hold` is expected to give its resources back (None: unknown)."""
    if hold.preempting:
        stop = now + timedelta(seconds=grace_s)
        return stop if hold.ends_at is None else min(hold.ends_at, stop)
    return hold.ends_at


def due(
    job: Candidate, node: Node, running: Sequence[Hold], now: datetime, grace_s: float
) -> datetime | None:
    """When `job` will fit on `node` as its running jobs end (None: never known)."""
    shape = job.shape
    if not node.could_fit(shape):
        return None
    free = dict(node.free)
    if _fits(free, shape):
        return now
    timed = sorted(
        ((ends(h, now, grace_s), h) for h in running if node.id in (h.gang_nodes or (h.node_id,))),
        key=lambda e: (e[0] is None, e[0] or now),
    )
    for end, hold in timed:
        if end is None:
            return None  # a job of unknown length stands in the way
        # What it holds here: a gang its per-node share (on each of its nodes).
        for k, v in _need_items(node_shape(hold.gpus, None, hold.cpus, hold.memory_gb, hold.nodes)):
            free[k] = free.get(k, 0.0) + v
        if _fits(free, shape):
            return max(end, now)
    return None


def earliest(
    job: Candidate, nodes: Sequence[Node], running: Sequence[Hold], now: datetime, grace_s: float
) -> Reservation | None:
    """The reservation for `job`: the node it fits on first and when (None: none can be told,
    e.g. every node it could use runs a job of unknown length)."""
    best: Reservation | None = None
    for node in nodes:
        at = due(job, node, running, now, grace_s)
        if at is not None and (best is None or (at, node.id) < (best.at, best.node_id)):
            best = Reservation(job.id, node.id, at)
    return best


def earliest_gang(
    job: Candidate, nodes: Sequence[Node], running: Sequence[Hold], now: datetime, grace_s: float
) -> list[Reservation]:
    """The reservations for a gang over `job.nodes` nodes: the nodes its per-node share fits on
    first, all due when the last of them is ([]: fewer than `job.nodes` can be told)."""
    dues = sorted(
        (at, n.id) for n in nodes if (at := due(job, n, running, now, grace_s)) is not None
    )
    if len(dues) < job.nodes:
        return []
    picked = dues[: job.nodes]
    at, ids = picked[-1][0], tuple(node_id for _, node_id in picked)
    return [Reservation(job.id, node_id, at, ids) for node_id in ids]
