"""Scheduling policy: which queued jobs run now, and on which node. Pure: no database, no Ray.

One round (`plan`) takes the queued candidates, the nodes with what is free on each, and what
active jobs hold, and returns placements:

- Order: aged level first (the job's priority plus one per whole `aging_s` seconds it has
  waited, so a low priority job overtakes newer higher ones eventually and nothing starves).
- Per-owner limits on concurrent jobs and on GPUs (active jobs plus this round's placements).
- Fit per node, not per cluster: a job needs one node with its CPUs, GPUs (fractions pack on one
  GPU), memory and, if it names one, its GPU type (Ray's `accelerator_type:<TYPE>` resource).
  Cluster-wide sums would place a 1-GPU job on "0.5 + 0.5 free" spread over two nodes.
- Among the nodes that fit, best fit: the least GPU (then CPU) left over, so fractional jobs
  pack instead of fragmenting every GPU; a job without a GPU type takes the cheapest type that
  fits when prices are known; CPU-only jobs keep off GPU nodes when they can.
- Order within a level: the owner's fair-share factor (`lorajobs.orchestrator.fairshare`), then
  FIFO. Aging counts in whole levels, so jobs of one priority that waited about as long tie.
  Each placement raises its owner's factor for the rest of the round (`shares.in_turn`), so
  owners take turns by share even when all start the round equal.
- A job that does not fit may preempt running jobs of lower priority
  (`lorajobs.orchestrator.preemption`); else the first such job of each shape gets a
  reservation: the node it will fit on first, when running jobs end
  (`lorajobs.orchestrator.backfill`). Others start on that node only if they end before then
  (backfill); elsewhere they start as they fit.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from lorajobs.orchestrator import backfill, gangs, preemption
from lorajobs.orchestrator.fitindex import FitIndex
from lorajobs.orchestrator.resources import (
    _EPS,
    ACCELERATOR_PREFIX,
    ACCELERATOR_SLIVER,
    CLASS_FIELDS,
    GIB,
    Candidate,
    ClassKey,
    Hold,
    Node,
    Shape,
    _label,
    class_key,
    node_shape,
    node_views,
)
from lorajobs.orchestrator.shares import Shares, in_turn

__all__ = [
    "ACCELERATOR_PREFIX",
    "ACCELERATOR_SLIVER",
    "CLASS_FIELDS",
    "GIB",
    "Candidate",
    "ClassKey",
    "Hold",
    "Node",
    "OwnerLimits",
    "Placement",
    "Plan",
    "Policy",
    "Round",
    "Shape",
    "class_key",
    "node_shape",
    "node_views",
    "ordered",
    "plan",
]


@dataclass(frozen=True)
class OwnerLimits:
    """Caps per owner on concurrent (dispatched + running) jobs and on the GPUs they hold.
    None: no cap. `per_owner_*` override the defaults for named owners."""

    max_jobs: int | None = None
    max_gpus: float | None = None
    per_owner_jobs: Mapping[str, int] = field(default_factory=dict)
    per_owner_gpus: Mapping[str, float] = field(default_factory=dict)

    def jobs(self, owner: str) -> int | None:
        return self.per_owner_jobs.get(owner, self.max_jobs)

    def gpus(self, owner: str) -> float | None:
        return self.per_owner_gpus.get(owner, self.max_gpus)


#: A job placed in a round counts in its owner's factor, for the rest of the round, as this many
#: hours of its GPUs: the order of one run. Then the next round sees it by what it has run.
PLACED_GPU_HOURS = 1.0


@dataclass(frozen=True)
class Policy:
    """Knobs of the scheduling policy."""

    #: Seconds of waiting worth one priority level (0 turns aging off).
    aging_s: float = 600.0
    limits: OwnerLimits = field(default_factory=OwnerLimits)
    #: At most this many placements per round.
    max_per_round: int = 256
    #: $/GPU-hour by GPU type: a job without a type prefers the cheapest one that fits.
    prices: Mapping[str, float] = field(default_factory=dict)
    #: A queued job may preempt running jobs at least this many priority levels below its own
    #: (None: no preemption).
    preempt_margin: int | None = 1
    #: ... that have run at least this long, and were not asked to stop within this long.
    min_runtime_s: float = 600.0
    #: Seconds a preempted job is given to checkpoint and go (the reservation's grace).
    checkpoint_s: float = 60.0
    #: Reserve nodes for the first job that does not fit; others start there only if they end
    #: before it is due (their estimate times `backfill_safety`).
    reserve: bool = True
    backfill_safety: float = 1.5
    #: At most this many reservations a round, one per shape (the best ranked job of each shape
    #: that does not fit), each on its own node: a 1-GPU job ranked above it never takes an 8-GPU
    #: job's reservation away, so big jobs are not starved by a stream of small ones.
    max_reservations: int = 4


@dataclass(frozen=True)
class Placement:
    """Run job `job_id` on node `node_id` (whose GPU type it gets is `accelerator`)."""

    job_id: str
    node_id: str
    accelerator: str | None
    reason: str | None = None
    data: dict | None = None  # type: ignore[type-arg]


@dataclass
class Plan:
    placements: list[Placement] = field(default_factory=list)
    #: Job id -> why it was not placed this round.
    waiting: dict[str, str] = field(default_factory=dict)
    #: Job class -> why its first job offered and not placed waits (the rest of the class,
    #: offered or not, waits for the same reason).
    waiting_classes: dict[ClassKey, str] = field(default_factory=dict)
    #: Jobs no current node could run even if it were empty.
    never_fits: set[str] = field(default_factory=set)


def aged_priority(priority: Any, waited_s: Any, aging_s: float) -> Any:
    """Priority plus one level per `aging_s` seconds waited (none when `aging_s` <= 0)."""
    return priority + waited_s / aging_s if aging_s > 0 else priority


#: Added to the seconds waited before they are cut to whole levels, so that SQL's float time
#: arithmetic (exact to ~50 us) and Python's agree on which level a job is at.
_LEVEL_SLACK_S = 0.001


def aged_level(priority: Any, waited_s: Any, aging_s: float, floor: Any = math.floor) -> Any:
    """The level a job competes at: its priority plus one per whole `aging_s` seconds waited.

    Whole levels, so that jobs of one priority that waited about as long tie and fair share
    orders them (`ordered`). Written once for numbers and SQL expressions alike (`floor`: the
    dialect's), so the database reads candidates in exactly the order the policy ranks them."""
    if aging_s <= 0:
        return priority
    return priority + floor((waited_s + _LEVEL_SLACK_S) / aging_s)


def effective_priority(job: Candidate, now: datetime, aging_s: float) -> float:
    """A candidate's priority with aging, as of `now`."""
    waited = max(0.0, (now - job.created_at).total_seconds())
    return float(aged_priority(job.priority, waited, aging_s))


def rank_key(
    job: Candidate, now: datetime, aging_s: float, fair: Mapping[str, float] | None = None
) -> tuple[float, float, datetime, str]:
    """Sort key, best first: aged level, then the owner's fair-share factor (decayed GPU-hours
    over share: the least served owner first), then oldest, then id."""
    waited = max(0.0, (now - job.created_at).total_seconds())
    share = fair.get(job.owner, 0.0) if fair else 0.0
    return (-aged_level(job.priority, waited, aging_s), share, job.created_at, job.id)


def ordered(
    candidates: Iterable[Candidate],
    now: datetime,
    aging_s: float,
    fair: Mapping[str, float] | None = None,
) -> list[Candidate]:
    """Candidates best first (`rank_key`)."""
    return sorted(candidates, key=lambda c: rank_key(c, now, aging_s, fair))


class Round:
    """One scheduling round, fed candidates best first, possibly in several pages (`offer`).
    Holds the round's state: free capacity per node, per-owner usage, shapes found no room,
    the jobs chosen to be preempted and the reservations.

    `fair`: owner -> fair-share factor (lower runs first within a level), raised during the
    round by each placement (`PLACED_GPU_HOURS` per GPU over the owner's share in `shares`);
    `estimate`: seconds a candidate is expected to run when it does not say
    (`Candidate.est_s`), None if unknown."""

    def __init__(
        self,
        nodes: Sequence[Node],
        holds: Sequence[Hold],
        policy: Policy,
        now: datetime,
        *,
        fair: Mapping[str, float] | None = None,
        shares: Shares | None = None,
        estimate: Callable[[Candidate], float | None] | None = None,
    ) -> None:
        self.nodes, self.policy, self.now = list(nodes), policy, now
        self.fair, self._estimate = fair or {}, estimate
        self._shares = shares or Shares()
        self._placed_hours: dict[str, float] = defaultdict(float)  # per owner, this round
        self.plan = Plan()
        self._seen: set[str] = set()
        self._offered = False
        # Capacity only shrinks during a round: a shape that found no node will find none later.
        self._no_room: dict[Shape, str] = {}
        prices = policy.prices
        self._price = {
            n.id: min((prices.get(t, math.inf) for t in n.accelerators), default=math.inf)
            for n in self.nodes
        }
        self._by_label: dict[str, list[Node]] = defaultdict(list)
        for n in self.nodes:
            for t in n.accelerators:
                self._by_label[ACCELERATOR_PREFIX + t].append(n)
        self._jobs_of: dict[str, int] = defaultdict(int)
        self._gpus_of: dict[str, float] = defaultdict(float)
        for h in holds:
            self._jobs_of[h.owner] += 1
            self._gpus_of[h.owner] += h.gpus
        #: Running jobs that may be preempted, and what preempted ones will give back.
        self.preempt = preemption.Preempting(self.nodes, holds, policy, now)
        self._fit = FitIndex(self.nodes, lambda n, s: _preference(n, s, self._price[n.id]))
        self.preempt.on_take = self._fit.changed  # what it sets aside is not free any more
        #: What runs and when it ends (reservations are computed from it).
        self._ending = list(holds)
        self.reservations: dict[str, backfill.Reservation] = {}  # node id -> reservation
        self._reserved_shapes: set[tuple[Shape, int]] = set()  # (shape, nodes)
        self._est_cache: dict[str, float | None] = {}

    @property
    def done(self) -> bool:
        """Nothing more can be placed (the round is full, or no node has a CPU free: every job
        needs one) and, once a page was read, nothing can be preempted either."""
        if self.stop_reason is None:
            return False
        full = len(self.plan.placements) >= self.policy.max_per_round
        return full or self._offered or not self.preempt.possible

    @property
    def stop_reason(self) -> str | None:
        """Why no further candidate can be placed this round (None: some still could)."""
        if len(self.plan.placements) >= self.policy.max_per_round:
            return f"the scheduler dispatches at most {self.policy.max_per_round} jobs a round"
        if not self.nodes:
            return "no node is up (or every node is draining)"
        if not any(n.free.get("CPU", 0.0) >= 1 - _EPS for n in self.nodes):
            return "every node is busy (no CPU free)"
        return None

    def estimate(self, job: Candidate) -> float | None:
        """Seconds `job` is expected to run (None: unknown)."""
        if job.est_s is not None:
            return job.est_s
        if job.id not in self._est_cache:
            self._est_cache[job.id] = self._estimate(job) if self._estimate else None
        return self._est_cache[job.id]

    def offer(self, candidates: Iterable[Candidate]) -> list[Placement]:
        """Consider `candidates` (best first after earlier offers); return the new placements."""
        out = self.plan
        first = len(out.placements)
        self._offered = True
        limits, aging_s = self.policy.limits, self.policy.aging_s
        keyed = sorted(
            ((rank_key(c, self.now, aging_s, self.fair), c)
             for c in candidates if c.id not in self._seen),
            key=lambda kc: kc[0],
        )  # fmt: skip
        batch = [c for _, c in keyed]
        for job in in_turn([(k[0], c) for k, c in keyed], self.factor):
            self._seen.add(job.id)
            if len(out.placements) >= self.policy.max_per_round:
                out.waiting[job.id] = "round full"
                continue
            cap_jobs, cap_gpus = limits.jobs(job.owner), limits.gpus(job.owner)
            if cap_jobs is not None and self._jobs_of[job.owner] + 1 > cap_jobs:
                out.waiting[job.id] = f"owner {job.owner} is at its limit of {cap_jobs} jobs"
                continue
            if cap_gpus is not None and self._gpus_of[job.owner] + job.gpus > cap_gpus + _EPS:
                out.waiting[job.id] = f"owner {job.owner} is at its limit of {cap_gpus:g} GPUs"
                continue
            if job.nodes > 1:  # a gang: all of its nodes in this round, or none
                gang = self._gang_nodes(job)
                if gang is not None:
                    self._place(job, gang[0], gang)
                elif job.id not in out.never_fits:
                    self._blocked(job)
                continue
            node = self._best_node(job)
            if node is None:
                if job.id not in out.never_fits:
                    self._blocked(job)
                continue
            self._place(job, node)
        for job in batch:
            if job.id in out.waiting:
                out.waiting_classes.setdefault(job.class_key, out.waiting[job.id])
        return out.placements[first:]

    def factor(self, owner: str) -> float:
        """`owner`'s fair-share factor now: as the round began, plus what it placed since."""
        return self.fair.get(owner, 0.0) + self._placed_hours[owner]

    def _place(self, job: Candidate, node: Node, gang: list[Node] | None = None) -> None:
        shape = job.shape
        for n in gang or [node]:
            n.take(shape)
            self._fit.changed(n)
        self._jobs_of[job.owner] += 1
        self._gpus_of[job.owner] += job.gpus
        accelerator = node.accelerator_for(shape)
        eff = round(effective_priority(job, self.now, self.policy.aging_s), 3)
        est = self.estimate(job) if self.reservations else job.est_s
        ends = None if est is None else self.now + timedelta(seconds=est)
        self._ending.append(
            Hold(
                job.id,
                job.owner,
                node.id,
                job.gpus,
                job.cpus,
                job.memory_gb,
                job.priority,
                self.now,
                ends,
                nodes=job.nodes,
                gang_nodes=tuple(n.id for n in gang or ()),
            )  # fmt: skip
        )
        data: dict[str, Any] = {
            "node_id": node.id,
            "accelerator": accelerator,
            "effective_priority": eff,
            **({"gang_nodes": [n.id for n in gang]} if gang else {}),
        }
        if job.owner in self.fair or self._placed_hours[job.owner]:
            data["fair_share_factor"] = round(self.factor(job.owner), 6)
        share = self._shares.of(job.owner)
        self._placed_hours[job.owner] += (
            job.gpus * PLACED_GPU_HOURS / share if share > 0 else math.inf
        )
        res = self.reservations.get(node.id)
        if res is not None and res.job_id != job.id:
            data["backfill"] = f"ends before job {res.job_id}'s reservation"
        self.plan.placements.append(Placement(job.id, node.id, accelerator, data=data))

    def _blocked(self, job: Candidate) -> None:
        """`job` fits no node now (a gang: not `job.nodes` at once): preempt lower priority
        jobs for it, or reserve its node(s). Never on nodes reserved for jobs ranked before."""

        def usable(n: Node) -> bool:
            res = self.reservations.get(n.id)
            return res is None or res.job_id == job.id

        gang = job.nodes > 1
        why = self.preempt.claim_gang(job, usable) if gang else self.preempt.claim(job, usable)
        if why is not None:
            self.plan.waiting[job.id] = why
            return
        shape = job.shape
        if (
            not self.policy.reserve
            or (shape, job.nodes) in self._reserved_shapes
            or len({r.job_id for r in self.reservations.values()}) >= self.policy.max_reservations
        ):
            return
        self._reserved_shapes.add((shape, job.nodes))
        free_nodes = [n for n in self.nodes if n.id not in self.reservations]
        args = (job, free_nodes, self._ending, self.now, self.policy.checkpoint_s)
        if gang:
            found = backfill.earliest_gang(*args)
        else:
            found = [r] if (r := backfill.earliest(*args)) is not None else []
        for res in found:
            self.reservations[res.node_id] = res
        if found:
            self.plan.waiting[job.id] = found[0].describe(shape)

    @property
    def reservation(self) -> backfill.Reservation | None:
        """The first reservation made this round (None: none)."""
        return next(iter(self.reservations.values()), None)

    def _backfills(self, job: Candidate, node: Node) -> bool:
        """Whether `job` may start on `node` now: not the reserved node, or it is the reserved
        job, or it will end (its estimate times the safety factor) before the reservation."""
        res = self.reservations.get(node.id)
        if res is None or res.job_id == job.id:
            return True
        est = self.estimate(job)
        if est is None:
            return False
        return self.now + timedelta(seconds=est * self.policy.backfill_safety) <= res.at

    def _excluded_by(self, job: Candidate, shape: Shape) -> str:
        """Why `job` was kept off the reserved node(s) it fits on."""
        for node_id, res in self.reservations.items():
            node = next(n for n in self.nodes if n.id == node_id)
            if node.fits(shape) and not self._backfills(job, node):
                return res.excludes(shape)
        return f"waiting for {shape.describe()} to free up"

    def _gang_nodes(self, job: Candidate) -> list[Node] | None:
        """`job.nodes` distinct nodes with the gang's share free on each, or None (and why)."""
        shape, out = job.shape, self.plan
        pool = self._by_label.get(_label(shape) or "", []) if shape.gpu_type else self.nodes
        # Nodes reserved for another job take the gang only if it ends before they are due.
        chosen, why, never = gangs.pick_gang(
            pool,
            shape,
            job.nodes,
            lambda n, s: n.fits(s) and self._backfills(job, n),
            Node.could_fit,
            shape.describe(),
        )
        if chosen is None:
            out.waiting[job.id] = why or "waiting"
            if never:
                out.never_fits.add(job.id)
        return chosen

    def _best_node(self, job: Candidate) -> Node | None:
        shape, out = job.shape, self.plan
        if shape in self._no_room:
            out.waiting[job.id] = self._no_room[shape]
            if self._no_room[shape].startswith("no node"):
                out.never_fits.add(job.id)
            return None
        # The best fit by `_preference` among nodes it may use (`fitindex`: not a full scan).
        best, reserved = self._fit.best(shape, lambda n: self._backfills(job, n))
        if best is not None:
            return best
        if reserved:  # not cached: a shorter job of this shape may still backfill
            out.waiting[job.id] = self._excluded_by(job, shape)
            return None
        if not any(n.could_fit(shape) for n in self.nodes):
            out.never_fits.add(job.id)
            self._no_room[shape] = f"no node has {shape.describe()}"
        else:
            self._no_room[shape] = f"waiting for {shape.describe()} to free up"
        out.waiting[job.id] = self._no_room[shape]
        return None


def plan(
    candidates: Sequence[Candidate],
    nodes: Sequence[Node],
    holds: Sequence[Hold],
    policy: Policy,
    now: datetime,
) -> Plan:
    """Place what fits now, best job first. `nodes` are updated as jobs are placed on them."""
    r = Round(nodes, holds, policy, now)
    r.offer(candidates)
    return r.plan


def _preference(node: Node, shape: Shape, price: float) -> tuple[float, float, float]:
    """Sort key among nodes that fit (smaller is better; ties go to the first node by id).
    `price`: $/GPU-hour of the node's cheapest type, for jobs without a GPU type."""
    free = node.free
    left_gpu = free.get("GPU", 0.0) - shape.gpus
    left_cpu = free.get("CPU", 0.0) - shape.cpus
    if shape.gpus <= 0:
        # CPU jobs: nodes without GPUs first, so GPU nodes keep their CPUs for GPU jobs.
        return (1.0 if node.total.get("GPU", 0.0) > 0 else 0.0, left_gpu, left_cpu)
    return (math.inf if shape.gpu_type else price, left_gpu, left_cpu)
