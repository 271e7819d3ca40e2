"""Scheduling policy: which queued jobs run now, and on which node. Pure: no database, no Ray.

One round (`plan`) takes the queued candidates, the nodes with what is free on each, and what
active jobs hold, and returns placements:

- Order: effective priority first, then FIFO (`created_at`, then id). The effective priority is
  the job's priority plus one level per `aging_s` seconds it has waited, so a low priority job
  overtakes newer higher ones eventually and nothing starves.
- Per-owner limits on concurrent jobs and on GPUs (active jobs plus this round's placements).
- Fit per node, not per cluster: a job needs one node with its CPUs, GPUs (fractions pack on one
  GPU), memory and, if it names one, its GPU type (Ray's `accelerator_type:<TYPE>` resource).
  Cluster-wide sums would place a 1-GPU job on "0.5 + 0.5 free" spread over two nodes.
- Among the nodes that fit, best fit: the least GPU (then CPU) left over, so fractional jobs
  pack instead of fragmenting every GPU; a job without a GPU type takes the cheapest type that
  fits when prices are known; CPU-only jobs keep off GPU nodes when they can.
- A job that does not fit does not block smaller ones behind it (backfill). There is no
  reservation: a large job waiting behind a stream of small ones is helped by aging only.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any

from lorajobs.orchestrator import gangs

ACCELERATOR_PREFIX = "accelerator_type:"
# Asking for a sliver of `accelerator_type:<T>` pins a task to such a node without limiting
# how many share it (what Ray itself does for `accelerator_type=`).
ACCELERATOR_SLIVER = 0.001
_EPS = 1e-9
GIB = 1024**3


@dataclass(frozen=True)
class Shape:
    """What one attempt of a job takes from one node."""

    gpus: float
    gpu_type: str | None
    cpus: int
    memory_gb: float | None = None

    def ray_resources(self) -> dict[str, float]:
        """The Ray resource request (task options and autoscaler bundles)."""
        need = {"CPU": float(self.cpus), "GPU": float(self.gpus)}
        if self.gpu_type:
            need[ACCELERATOR_PREFIX + self.gpu_type] = ACCELERATOR_SLIVER
        if self.memory_gb:
            need["memory"] = float(math.ceil(self.memory_gb * GIB))
        return {k: v for k, v in need.items() if v > 0}

    def describe(self) -> str:
        gpu = f"{self.gpus:g} GPU" + (f" {self.gpu_type}" if self.gpu_type else "")
        parts = [gpu] if self.gpus else ["no GPU"]
        parts.append(f"{self.cpus} CPU")
        if self.memory_gb:
            parts.append(f"{self.memory_gb:g} GiB")
        return ", ".join(parts)


def node_shape(
    gpus: float, gpu_type: str | None, cpus: int, memory_gb: float | None, nodes: int = 1
) -> Shape:
    """What a job takes from one node: the whole job, or a gang's share on each of its nodes."""
    g, c, m = gangs.per_node(gpus, cpus, memory_gb, nodes)
    return Shape(g, gpu_type, c, m)


@dataclass(frozen=True, slots=True)
class Candidate:
    """A queued job as the scheduler sees it."""

    id: str
    owner: str
    priority: int
    created_at: datetime
    gpus: float
    gpu_type: str | None
    cpus: int
    memory_gb: float | None = None
    #: Nodes a gang spans (its GPUs split evenly over them): `orchestrator/gangs.py`.
    nodes: int = 1

    @property
    def shape(self) -> Shape:
        """What the job takes from each node it runs on (a gang: from each of `nodes`)."""
        return node_shape(self.gpus, self.gpu_type, self.cpus, self.memory_gb, self.nodes)

    @property
    def class_key(self) -> ClassKey:
        return class_key(
            self.priority,
            self.owner,
            self.gpus,
            self.gpu_type,
            self.cpus,
            self.memory_gb,
            self.nodes,
        )


#: The job fields that make a scheduling class: jobs of one class are interchangeable for the
#: policy (same order but for age, same limits, same fit), so they wait for one reason. The
#: queue partitions its candidates by these same columns.
CLASS_FIELDS = ("priority", "owner", "gpus", "gpu_type", "cpus", "memory_gb", "nodes")
ClassKey = tuple[int, str, float, str | None, int, float | None, int]


def class_key(
    priority: int,
    owner: str,
    gpus: float,
    gpu_type: str | None,
    cpus: int,
    memory_gb: float | None,
    nodes: int = 1,
) -> ClassKey:
    return (
        int(priority),
        owner,
        float(gpus),
        gpu_type,
        int(cpus),
        None if memory_gb is None else float(memory_gb),
        int(nodes),
    )


@dataclass(frozen=True)
class Hold:
    """What an active (dispatched / running) job holds: counted against its owner and node."""

    id: str
    owner: str
    node_id: str | None
    gpus: float
    cpus: int
    memory_gb: float | None = None
    #: How many nodes a gang spans, and which the scheduler chose: its share is charged to
    #: each (to `node_id` alone when they are not known).
    nodes: int = 1
    gang_nodes: tuple[str, ...] = ()


@dataclass
class Node:
    """One live node: Ray's totals and what is free on it now."""

    id: str
    total: dict[str, float]
    free: dict[str, float]
    #: GPU types the node declares, e.g. ['A100-80G'].
    accelerators: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.accelerators = sorted(
            k[len(ACCELERATOR_PREFIX) :] for k in self.total if k.startswith(ACCELERATOR_PREFIX)
        )

    def accelerator_for(self, shape: Shape) -> str | None:
        """The GPU type a job of `shape` gets here (None for a CPU-only job)."""
        if shape.gpus <= 0:
            return None
        if shape.gpu_type:
            return shape.gpu_type
        types = self.accelerators
        return types[0] if types else None

    def _has(self, shape: Shape, pool: Mapping[str, float]) -> bool:
        if shape.gpu_type and ACCELERATOR_PREFIX + shape.gpu_type not in self.total:
            return False
        return all(pool.get(key, 0.0) + _EPS >= amount for key, amount in _need(shape).items())

    def fits(self, shape: Shape) -> bool:
        """Free now."""
        return self._has(shape, self.free)

    def could_fit(self, shape: Shape) -> bool:
        """Free once the node is empty."""
        return self._has(shape, self.total)

    def take(self, shape: Shape) -> None:
        for key, amount in _need(shape).items():
            self.free[key] = self.free.get(key, 0.0) - amount


@lru_cache(maxsize=4096)
def _need_items(shape: Shape) -> tuple[tuple[str, float], ...]:
    return tuple(
        (k, v) for k, v in shape.ray_resources().items() if not k.startswith(ACCELERATOR_PREFIX)
    )


def _label(shape: Shape) -> str | None:
    return ACCELERATOR_PREFIX + shape.gpu_type if shape.gpu_type else None


def _need(shape: Shape) -> dict[str, float]:
    """What a shape takes from a node's countable resources (the GPU type is a label)."""
    return dict(_need_items(shape))


def node_views(
    totals: Mapping[str, Mapping[str, float]],
    holds: Iterable[Hold],
    available: Mapping[str, Mapping[str, float]] | None = None,
    exclude: Iterable[str] = (),
) -> list[Node]:
    """Nodes with their free resources: totals minus what active jobs hold there (known at
    once, from the database), and never more than Ray says is available (other workloads,
    other controllers' jobs not yet visible)."""
    held: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for h in holds:
        if h.node_id is None:
            continue
        share = node_shape(h.gpus, None, h.cpus, h.memory_gb, h.nodes)
        for node_id in h.gang_nodes or (h.node_id,):
            for key, amount in share.ray_resources().items():
                held[node_id][key] += amount
    skip = set(exclude)
    nodes = []
    for node_id, total in sorted(totals.items()):
        if node_id in skip:
            continue
        free = {k: v - held[node_id].get(k, 0.0) for k, v in total.items()}
        if available is not None:
            avail = available.get(node_id, {})
            free = {k: min(v, avail.get(k, 0.0)) for k, v in free.items()}
        nodes.append(Node(node_id, dict(total), free))
    return nodes


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
    """Priority plus one level per `aging_s` seconds waited (none when `aging_s` <= 0).

    Written once for numbers and SQL column expressions alike, so the database reads
    candidates in exactly the order the policy ranks them."""
    return priority + waited_s / aging_s if aging_s > 0 else priority


def effective_priority(job: Candidate, now: datetime, aging_s: float) -> float:
    """A candidate's priority with aging, as of `now`."""
    waited = max(0.0, (now - job.created_at).total_seconds())
    return float(aged_priority(job.priority, waited, aging_s))


def ordered(candidates: Iterable[Candidate], now: datetime, aging_s: float) -> list[Candidate]:
    """Candidates best first: effective priority, then oldest, then id."""
    return sorted(
        candidates,
        key=lambda c: (-effective_priority(c, now, aging_s), c.created_at, c.id),
    )


class Round:
    """One scheduling round, fed candidates best first, possibly in several pages (`offer`).
    Holds the round's state: free capacity per node, per-owner usage, shapes found no room."""

    def __init__(
        self, nodes: Sequence[Node], holds: Sequence[Hold], policy: Policy, now: datetime
    ) -> None:
        self.nodes, self.policy, self.now = list(nodes), policy, now
        self.plan = Plan()
        self._seen: set[str] = set()
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

    @property
    def done(self) -> bool:
        """Nothing more can be placed: the round is full, or no node has a CPU free (every job
        needs one)."""
        return self.stop_reason is not None

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

    def offer(self, candidates: Iterable[Candidate]) -> list[Placement]:
        """Consider `candidates` (best first after earlier offers); return the new placements."""
        out = self.plan
        first = len(out.placements)
        limits, aging_s = self.policy.limits, self.policy.aging_s
        batch = ordered((c for c in candidates if c.id not in self._seen), self.now, aging_s)
        for job in batch:
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
            gang = self._gang_nodes(job) if job.nodes > 1 else None
            node = gang[0] if gang else None if job.nodes > 1 else self._best_node(job)
            if node is None:
                continue
            shape = job.shape
            for n in gang or [node]:
                n.take(shape)
            self._jobs_of[job.owner] += 1
            self._gpus_of[job.owner] += job.gpus
            accelerator = node.accelerator_for(shape)
            eff = round(effective_priority(job, self.now, aging_s), 3)
            out.placements.append(
                Placement(
                    job.id,
                    node.id,
                    accelerator,
                    data={
                        "node_id": node.id,
                        "accelerator": accelerator,
                        "effective_priority": eff,
                        **({"gang_nodes": [n.id for n in gang]} if gang else {}),
                    },
                )
            )
        for job in batch:
            if job.id in out.waiting:
                out.waiting_classes.setdefault(job.class_key, out.waiting[job.id])
        return out.placements[first:]

    def _gang_nodes(self, job: Candidate) -> list[Node] | None:
        """`job.nodes` distinct nodes with the gang's share free on each, or None (and why)."""
        shape, out = job.shape, self.plan
        pool = self._by_label.get(_label(shape) or "", []) if shape.gpu_type else self.nodes
        chosen, why, never = gangs.pick_gang(
            pool, shape, job.nodes, Node.fits, Node.could_fit, shape.describe()
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
        need, label = _need_items(shape), _label(shape)
        best, best_key = None, None
        for n in self._by_label.get(label, ()) if label else self.nodes:
            free = n.free
            for k, v in need:
                if free.get(k, 0.0) + _EPS < v:
                    break
            else:
                key = _preference(n, shape, self._price[n.id])
                if best_key is None or key < best_key:
                    best, best_key = n, key
        if best is not None:
            return best
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
