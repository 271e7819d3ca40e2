"""Preemption by priority: which running jobs a queued job that does not fit may stop. Pure.

A queued job that fits no node now may preempt running jobs whose priority is at least
`Policy.preempt_margin` levels below its own, on one node where what is free plus what they hold
fits it. Only jobs that have run at least `Policy.min_runtime_s` in their current attempt and
were not asked to stop within that window are eligible, so no job is preempted twice within it
and every attempt makes progress. Among the nodes where it works, the fewest and cheapest
victims: lowest priority first, then fewest GPUs, then the shortest run so far.

Jobs asked to stop keep their resources until they have checkpointed and ended; the round counts
those resources as on their way back (`pending`), so the job they were stopped for (or another
one that fits in them) waits for them instead of stopping more jobs. The controller applies the
decisions (`lorajobs.orchestrator.preempting`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from lorajobs.orchestrator.resources import (
    _EPS,
    ACCELERATOR_PREFIX,
    Candidate,
    Hold,
    Node,
    Shape,
    _need_items,
)

if TYPE_CHECKING:
    from lorajobs.orchestrator.scheduler import Policy


@dataclass(frozen=True)
class Decision:
    """Stop `victims` (job ids) on node `node_id` so that job `job_id` can run there."""

    job_id: str
    priority: int
    node_id: str
    victims: tuple[str, ...]


def eligible(hold: Hold, now: datetime, policy: Policy) -> bool:
    """Whether a running job may be preempted now (priority aside)."""
    window = policy.min_runtime_s
    if hold.preempting or hold.started_at is None or hold.node_id is None:
        return False
    if (now - hold.started_at).total_seconds() < window:
        return False
    return hold.preempt_at is None or (now - hold.preempt_at).total_seconds() >= window


def _cost(hold: Hold, now: datetime) -> tuple[int, float, float]:
    ran = (now - hold.started_at).total_seconds() if hold.started_at else 0.0
    return (hold.priority, hold.gpus, ran)


def _res(shape: Shape) -> tuple[tuple[str, float], ...]:
    return _need_items(shape)


def _hold_res(h: Hold) -> tuple[tuple[str, float], ...]:
    return _need_items(Shape(h.gpus, None, h.cpus, h.memory_gb))


class Preempting:
    """A round's preemption state: the eligible running jobs per node and what jobs already
    asked to stop will give back."""

    def __init__(
        self, nodes: Sequence[Node], holds: Sequence[Hold], policy: Policy, now: datetime
    ) -> None:
        self.policy, self.now = policy, now
        self.nodes = {n.id: n for n in nodes}
        self.pending: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.victims: dict[str, list[Hold]] = defaultdict(list)
        self.decisions: list[Decision] = []
        self._none_for: set[tuple[Shape, int]] = set()
        on = policy.preempt_margin is not None
        for h in holds:
            if h.node_id not in self.nodes:
                continue
            if h.preempting:
                for k, v in _hold_res(h):
                    self.pending[h.node_id][k] += v
            elif on and eligible(h, now, policy):
                self.victims[h.node_id].append(h)
        for hs in self.victims.values():
            hs.sort(key=lambda h: _cost(h, now))
        #: Whether anything could be preempted or is being: else a full round stops early.
        self.possible = bool(self.victims) or bool(self.pending)

    def _could(self, node: Node, shape: Shape) -> bool:
        if shape.gpu_type and ACCELERATOR_PREFIX + shape.gpu_type not in node.total:
            return False
        return node.could_fit(shape)

    def claim(self, job: Candidate) -> str | None:
        """Find room for `job` in resources being given back, or preempt for it; returns its
        wait reason, or None when neither is possible."""
        if self.policy.preempt_margin is None:
            return None
        shape, need = job.shape, _res(job.shape)
        for node in self.nodes.values():
            pend = self.pending.get(node.id)
            if not pend or not self._could(node, shape):
                continue
            if all(node.free.get(k, 0.0) + pend.get(k, 0.0) + _EPS >= v for k, v in need):
                self._take(node.id, need)
                return f"waiting for preempted jobs on node {node.id[:12]} to checkpoint and stop"
        key = (shape, job.priority)
        if key in self._none_for:
            return None
        best: tuple[tuple[int, int, float], str, list[Hold]] | None = None
        for node in self.nodes.values():
            if not self._could(node, shape):
                continue
            free = {k: node.free.get(k, 0.0) + self.pending.get(node.id, {}).get(k, 0.0)
                    for k, _ in need}  # fmt: skip
            chosen: list[Hold] = []
            for h in self.victims.get(node.id, ()):
                if h.priority > job.priority - (self.policy.preempt_margin or 0):
                    continue
                chosen.append(h)
                for k, v in _hold_res(h):
                    free[k] = free.get(k, 0.0) + v
                if all(free.get(k, 0.0) + _EPS >= v for k, v in need):
                    score = (len(chosen), max(c.priority for c in chosen),
                             sum(c.gpus for c in chosen))  # fmt: skip
                    if best is None or (score, node.id) < (best[0], best[1]):
                        best = (score, node.id, list(chosen))
                    break
        if best is None:
            self._none_for.add(key)
            return None
        _, node_id, chosen = best
        for h in chosen:
            self.victims[node_id].remove(h)
            for k, v in _hold_res(h):
                self.pending[node_id][k] += v
        self._take(node_id, need)
        self.decisions.append(Decision(job.id, job.priority, node_id, tuple(h.id for h in chosen)))
        names = ", ".join(f"{h.id} (priority {h.priority})" for h in chosen)
        return f"preempting {names} on node {node_id[:12]}"

    def _take(self, node_id: str, need: tuple[tuple[str, float], ...]) -> None:
        node, pend = self.nodes[node_id], self.pending[node_id]
        for k, v in need:
            # What is free now is used first; the rest comes from what is on its way back.
            from_free = min(v, max(0.0, node.free.get(k, 0.0)))
            node.free[k] = node.free.get(k, 0.0) - from_free
            pend[k] -= v - from_free
