"""The best-fit node for a shape, found in O(log n) per placement instead of a scan of every
node per job. Pure; used by `scheduler.Round`.

A round places thousands of jobs on hundreds of nodes, and most of its jobs share a handful of
shapes. Per shape the index keeps a heap of (preference key, node) over the nodes that fit it;
only nodes whose free resources changed since the heap was last read (a placement, resources
set aside for a preempting job: `changed`) are pushed again with their new key. Within a round
free resources only shrink, so a node that no longer fits a shape is dropped from its heap for
good, and an entry whose key is no longer the node's current one is stale and skipped. The
result is the node a full scan would pick: the smallest key, ties to the node listed first.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from typing import Any

from lorajobs.orchestrator.resources import _EPS, Node, Shape, _label, _need_items

Key = Callable[[Node, Shape], Any]


class FitIndex:
    """Per shape, the nodes that fit it now, best first (`key`: smaller is better)."""

    def __init__(self, nodes: Sequence[Node], key: Key) -> None:
        self._nodes = list(nodes)
        self._at = {n.id: i for i, n in enumerate(self._nodes)}
        self._key = key
        #: Shape -> (heap of (key, node index), how much of the change log it has seen).
        self._heaps: dict[Shape, tuple[list[tuple[Any, int]], int]] = {}
        self._log: list[int] = []

    def changed(self, node: Node) -> None:
        """`node`'s free resources changed (they only shrink within a round)."""
        i = self._at.get(node.id)
        if i is not None:
            self._log.append(i)

    def best(self, shape: Shape, allowed: Callable[[Node], bool]) -> tuple[Node | None, bool]:
        """The best node that fits `shape` now and that `allowed` lets it use; when there is
        none, also whether a node that fits was refused by `allowed` (a reservation)."""
        need, label = _need_items(shape), _label(shape)

        def fits(n: Node) -> bool:
            if label is not None and label not in n.total:
                return False
            free = n.free
            return all(free.get(k, 0.0) + _EPS >= v for k, v in need)

        entry = self._heaps.get(shape)
        if entry is None:
            heap = [(self._key(n, shape), i) for i, n in enumerate(self._nodes) if fits(n)]
            heapq.heapify(heap)
        else:
            heap, seen = entry
            for i in set(self._log[seen:]):
                n = self._nodes[i]
                if fits(n):
                    heapq.heappush(heap, (self._key(n, shape), i))
        self._heaps[shape] = (heap, len(self._log))
        refused: list[tuple[Any, int]] = []
        found = None
        while heap:
            key, i = heap[0]
            n = self._nodes[i]
            if not fits(n) or self._key(n, shape) != key:
                heapq.heappop(heap)  # gone for good, or stale (its new key was pushed)
            elif not allowed(n):
                refused.append(heapq.heappop(heap))
            else:
                found = n
                break
        for e in refused:
            heapq.heappush(heap, e)
        return found, bool(refused)
