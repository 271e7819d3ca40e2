"""Owners' fair-share weights (`LORAJOBS_FAIRSHARE_SHARES`), the usage half-life's default, and
the order in which owners take turns within one scheduling round (`in_turn`).

Apart from `fairshare` so that `settings` can parse them without importing the ledger (which
reads the database: `db` imports `settings`).
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

#: `LORAJOBS_FAIRSHARE_HALFLIFE`'s default: usage halves every 7 days.
DEFAULT_HALFLIFE_S = 7 * 86400.0


@dataclass(frozen=True)
class Shares:
    """Owners' shares: `per_owner` overrides `default`."""

    default: float = 1.0
    per_owner: Mapping[str, float] = field(default_factory=dict)

    def of(self, owner: str) -> float:
        return self.per_owner.get(owner, self.default)


class _Queued(Protocol):
    @property
    def owner(self) -> str: ...


J = TypeVar("J", bound=_Queued)


def in_turn(ranked: Sequence[tuple[Hashable, J]], factor: Callable[[str], float]) -> Iterator[J]:
    """Jobs in turn: `ranked` is (level, job) pairs sorted best first (level, then the owners'
    factors, then FIFO). Within one level the next job is the oldest of the owner whose
    `factor(owner)` is lowest *now*: the caller raises the factor of an owner it placed a job
    for before asking for the next. So one round that places many jobs interleaves the owners
    by their shares, where a factor fixed at the round's start would hand every free GPU of a
    fresh cluster (all owners at 0) to whoever submitted first."""
    i = 0
    while i < len(ranked):
        level, end = ranked[i][0], i
        while end < len(ranked) and ranked[end][0] == level:
            end += 1
        queues: dict[str, deque[tuple[int, J]]] = {}
        for k in range(i, end):
            queues.setdefault(ranked[k][1].owner, deque()).append((k, ranked[k][1]))
        i = end
        if len(queues) == 1:
            yield from (job for _, job in next(iter(queues.values())))
            continue
        # (factor, rank of the owner's oldest job, owner): equal factors go FIFO.
        heap = [(factor(o), q[0][0], o) for o, q in queues.items()]
        heapq.heapify(heap)
        while heap:
            owner = heapq.heappop(heap)[2]
            q = queues[owner]
            yield q.popleft()[1]
            if q:
                heapq.heappush(heap, (factor(owner), q[0][0], owner))
