"""Preemption by priority: which running jobs a queued job that does not fit may stop. Pure.

A queued job that fits no node now may preempt running jobs whose priority is at least
`Policy.preempt_margin` levels below its own, on one node where what is free plus what they hold
fits it. Only jobs that have run at least `Policy.min_runtime_s` in their current attempt and
were not asked to stop within that window are eligible, so no job is preempted twice within it
and every attempt makes progress. Among the nodes where it works, the fewest and cheapest
victims: lowest priority first, then fewest GPUs, then the shortest run so far.

A gang (`orchestrator/gangs.py`) that fits nowhere now may preempt on `nodes` distinct nodes
at once: all or none. Each node's cheapest victims are chosen as above, the nodes needing the
fewest and cheapest victims win (nodes where it fits already, counting what is on its way back,
first), and victims are stopped only when `nodes` such nodes exist. A running gang may be a
victim like any job: SIGTERM to its coordinating task reaches every rank (`orchestrator/gang.py`,
`GangTrainLoop`), which checkpoint together and stop. It is a candidate on each of its nodes
(stopping it makes room on any of them), and once chosen on one, what it gives back on all of
them is on its way back (`pending`) for the rest of the round.

Jobs asked to stop keep their resources until they have checkpointed and ended; the round counts
those resources as on their way back (`pending`), so the job they were stopped for (or another
one that fits in them) waits for them instead of stopping more jobs. The controller applies the
decisions (`lorajobs.orchestrator.preempting`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from lorajobs.orchestrator.resources import (
    _EPS,
    ACCELERATOR_PREFIX,
    Candidate,
    Hold,
    Node,
    Shape,
    _need_items,
    node_shape,
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
    """What `h` holds on each of its nodes (a gang: its per-node share)."""
    return _need_items(node_shape(h.gpus, None, h.cpus, h.memory_gb, h.nodes))


def _fits(free: dict[str, float], need: tuple[tuple[str, float], ...]) -> bool:
    return all(free.get(k, 0.0) + _EPS >= v for k, v in need)


#: How a node that needs no victim scores (before any that needs one).
_NO_VICTIM = (0, -(2**31), 0.0)


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
        self._stopped: set[str] = set()
        for h in holds:
            on_nodes = [n for n in h.gang_nodes or (h.node_id,) if n in self.nodes]
            if h.preempting:
                for node_id in on_nodes:
                    for k, v in _hold_res(h):
                        self.pending[node_id][k] += v
            elif on and on_nodes and eligible(h, now, policy):
                for node_id in on_nodes:
                    self.victims[node_id].append(h)
        for hs in self.victims.values():
            hs.sort(key=lambda h: _cost(h, now))
        #: Told of every node whose free resources `_take` reduces (the round's `FitIndex`).
        self.on_take: Callable[[Node], None] | None = None
        #: Whether anything could be preempted or is being: else a full round stops early.
        self.possible = bool(self.victims) or bool(self.pending)

    def _could(self, node: Node, shape: Shape) -> bool:
        if shape.gpu_type and ACCELERATOR_PREFIX + shape.gpu_type not in node.total:
            return False
        return node.could_fit(shape)

    def claim(self, job: Candidate, usable: Callable[[Node], bool] = lambda n: True) -> str | None:
        """Find room for `job` in resources being given back, or preempt for it; returns its
        wait reason, or None when neither is possible. Only on nodes `usable` allows (not
        one reserved for a job ranked before it)."""
        if self.policy.preempt_margin is None:
            return None
        shape, need = job.shape, _res(job.shape)
        for node in self.nodes.values():
            pend = self.pending.get(node.id)
            if not pend or not self._could(node, shape) or not usable(node):
                continue
            if all(node.free.get(k, 0.0) + pend.get(k, 0.0) + _EPS >= v for k, v in need):
                self._take(node.id, need)
                return f"waiting for preempted jobs on node {node.id[:12]} to checkpoint and stop"
        key = (shape, job.priority)
        if key in self._none_for:
            return None
        best: tuple[tuple[int, int, float], str, list[Hold]] | None = None
        for node in self.nodes.values():
            found = self._victims_on(node, job, usable, need_some=True)
            if found is not None and (best is None or (found[0], node.id) < best[:2]):
                best = (found[0], node.id, found[1])
        if best is None:
            self._none_for.add(key)
            return None
        _, node_id, chosen = best
        self._stop(job, node_id, chosen, need)
        names = ", ".join(f"{h.id} (priority {h.priority})" for h in chosen)
        return f"preempting {names} on node {node_id[:12]}"

    def claim_gang(self, job: Candidate, usable: Callable[[Node], bool]) -> str | None:
        """`claim` for a gang: room on `job.nodes` distinct nodes at once, from what is free,
        what is on its way back and lower priority jobs stopped for it; all or none."""
        if self.policy.preempt_margin is None:
            return None
        shape, need, count = job.shape, _res(job.shape), job.nodes
        key = (shape, job.priority, count)
        if key in self._none_for:
            return None
        options = []
        for node in self.nodes.values():
            found = self._victims_on(node, job, usable, need_some=False)
            if found is not None:
                options.append((found[0], node.id, found[1]))
        options.sort(key=lambda o: (o[0], o[1]))
        picked = options[:count]
        waits = any(
            victims or not _fits(self.nodes[node_id].free, need) for _, node_id, victims in picked
        )
        if len(picked) < count or not waits:
            self._none_for.add(key)
            return None
        names: dict[str, None] = {}  # a gang victim on two of the picked nodes is named once
        for _, node_id, victims in picked:
            self._stop(job, node_id, victims, need)
            names.update((f"{h.id} (priority {h.priority})", None) for h in victims)
        where = ", ".join(node_id[:12] for _, node_id, _ in picked)
        if not names:
            return f"waiting for preempted jobs on nodes {where} to checkpoint and stop (a gang)"
        return f"preempting {', '.join(names)} for a gang on nodes {where}"

    def _victims_on(
        self, node: Node, job: Candidate, usable: Callable[[Node], bool], *, need_some: bool
    ) -> tuple[tuple[int, int, float], list[Hold]] | None:
        """The cheapest eligible jobs on `node` whose stopping makes room for `job` there (with
        what is free and on its way back), and their score; None: none do. `need_some`: a node
        where it fits without victims does not count (the caller handled those)."""
        shape, need = job.shape, _res(job.shape)
        if not self._could(node, shape) or not usable(node):
            return None
        pend = self.pending.get(node.id, {})
        free = {k: node.free.get(k, 0.0) + pend.get(k, 0.0) for k, _ in need}
        if _fits(free, need):
            return None if need_some else (_NO_VICTIM, [])
        chosen: list[Hold] = []
        for h in self.victims.get(node.id, ()):
            if h.priority > job.priority - (self.policy.preempt_margin or 0):
                continue
            chosen.append(h)
            for k, v in _hold_res(h):
                free[k] = free.get(k, 0.0) + v
            if _fits(free, need):
                score = (len(chosen), max(c.priority for c in chosen),
                         sum(c.gpus for c in chosen))  # fmt: skip
                return score, chosen
        return None

    def _stop(self, job: Candidate, node_id: str, victims: list[Hold], need: Any) -> None:
        """Ask `victims` on `node_id` to stop for `job`, and set their resources aside for it
        (a gang's on each of its nodes; one already asked on another node is not asked again)."""
        asked = [h for h in victims if h.id not in self._stopped]
        for h in asked:
            self._stopped.add(h.id)
            for n in h.gang_nodes or (h.node_id,):
                if h in self.victims.get(n, ()):
                    self.victims[n].remove(h)
                if n in self.nodes:
                    for k, v in _hold_res(h):
                        self.pending[n][k] += v
        self._take(node_id, need)
        if asked:
            self.decisions.append(
                Decision(job.id, job.priority, node_id, tuple(h.id for h in asked))
            )

    def _take(self, node_id: str, need: tuple[tuple[str, float], ...]) -> None:
        node, pend = self.nodes[node_id], self.pending[node_id]
        for k, v in need:
            # What is free now is used first; the rest comes from what is on its way back.
            from_free = min(v, max(0.0, node.free.get(k, 0.0)))
            node.free[k] = node.free.get(k, 0.0) - from_free
            pend[k] -= v - from_free
        if self.on_take is not None:
            self.on_take(node)
