"""What jobs ask for and nodes have: shapes, queued candidates, what active jobs hold, nodes
with their free resources. Pure data for the scheduling policy (`lorajobs.orchestrator.scheduler`,
which re-exports these names)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache

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
    #: Seconds it is expected to run (steps x measured seconds per step of its shape); None:
    #: unknown (then the round's `estimate` is asked; unknown jobs never backfill a reservation).
    est_s: float | None = None
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
    priority: int = 0
    #: When the attempt was dispatched (how long it has run: the preemption window).
    started_at: datetime | None = None
    #: When it is expected to end (None: unknown); reservations are computed from it.
    ends_at: datetime | None = None
    #: When it was last asked to stop for a higher priority job (None: never).
    preempt_at: datetime | None = None
    #: It has been asked to stop and is checkpointing: its resources are on their way back.
    preempting: bool = False
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
