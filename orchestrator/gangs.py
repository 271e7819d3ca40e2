"""Gang fit: a multi-GPU job runs all of its workers at once or not at all. Pure policy.

A job with more than one GPU trains as a gang of workers, one per GPU (Ray Train, DDP): `gpus`
on one node, or `gpus` split evenly over `nodes` nodes (`resources.nodes` x
`resources.gpus_per_node`). `cpus` and `memory_gb` are per worker, so a node of the gang needs
them times the workers it hosts. The scheduler places a gang only when `nodes` distinct nodes
each have their share free now, and takes all of it in the same round; otherwise the job waits,
and the reason says how many of the nodes it needs are free. Ray then reserves the same shape as
one placement group (`orchestrator/gang.py`), which is atomic: no worker starts before all can.

Imports nothing of the scheduler (which imports this), so it works on any node-like object with
`id`, `free` and `total` dicts and a `fits(shape)` test.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


def workers(gpus: float) -> int:
    """Training processes of a job: one per GPU when it has more than one, else one."""
    return int(gpus) if gpus > 1 else 1


def is_gang(spec: dict[str, Any]) -> bool:
    """Whether a stored spec runs as a gang (more than one GPU)."""
    res = spec.get("resources") or {}
    return workers(float(res.get("gpus", 1))) > 1


def per_node(
    gpus: float, cpus: int, memory_gb: float | None, nodes: int
) -> tuple[float, int, float | None]:
    """(GPUs, CPUs, GiB) one node of the job must have: the whole job when it is not a gang."""
    w = workers(gpus)
    if w == 1:
        return gpus, cpus, memory_gb
    here = w // max(1, nodes)  # workers on each node
    return gpus / max(1, nodes), cpus * here, None if memory_gb is None else memory_gb * here


def placement_strategy(nodes: int, gpus: float) -> str:
    """Ray's placement-group strategy for the gang's one-GPU bundles: one node packs them all
    there; one GPU per node puts each on its own node; otherwise PACK fills nodes in turn (Ray
    has no "k bundles on each of n nodes"; the scheduler has checked that n nodes have room)."""
    if nodes <= 1:
        return "STRICT_PACK"
    if workers(gpus) == nodes:
        return "STRICT_SPREAD"
    return "PACK"


def pick_gang(
    nodes: Sequence[Any],
    shape: Any,
    count: int,
    fits: Callable[[Any, Any], bool],
    could_fit: Callable[[Any, Any], bool],
    describe: str,
) -> tuple[list[Any] | None, str | None, bool]:
    """`count` distinct nodes that each fit `shape` now (best fit first: least GPU, then CPU,
    left over), or why not: (chosen, None, False) / (None, reason, never_fits)."""
    free_now = [n for n in nodes if fits(n, shape)]
    if len(free_now) >= count:
        free_now.sort(
            key=lambda n: (n.free.get("GPU", 0.0) - shape.gpus, n.free.get("CPU", 0.0), n.id)
        )
        return free_now[:count], None, False
    able = sum(1 for n in nodes if could_fit(n, shape))
    if able < count:
        return (
            None,
            f"no {count} nodes have {describe} each (a gang; {able} could ever)",
            True,
        )
    return (
        None,
        f"waiting for {count} nodes with {describe} free at once (a gang; {len(free_now)} free now)",
        False,
    )
