"""Telling Ray's autoscaler what the queue needs, so a cluster scales from zero and back.

The request (`ray.autoscaler.sdk.request_resources`) is a set of bundles the cluster should be
able to hold at once; Ray compares it with the nodes' total capacity, not with what is free. So
it carries one bundle per job shape instance of every active job (they keep their nodes) and of
every queued job (they need nodes), and is cleared (an empty request) when nothing is queued:
running jobs keep their nodes busy anyway, and idle nodes then go away after the autoscaler's
idle timeout. Sent only when it changes; every controller computes the same request from the
database, so several controllers do not fight.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from lorajobs.orchestrator.scheduler import Shape

log = logging.getLogger("lorajobs.autoscale")

#: Bundles in one request at most; the queue beyond it is asked for as jobs finish.
MAX_BUNDLES = 2000


class _Backend(Protocol):
    def request_resources(self, bundles: list[dict[str, float]]) -> None: ...


def bundles(
    demand: Sequence[tuple[Shape, bool, int]], limit: int = MAX_BUNDLES
) -> list[dict[str, float]]:
    """One bundle per active and queued job, active first; [] when nothing is queued."""
    if not any(queued and count > 0 for _, queued, count in demand):
        return []
    out: list[dict[str, float]] = []
    ordered = sorted(demand, key=lambda d: (d[1], -d[0].gpus, d[0].gpu_type or "", d[0].cpus))
    for shape, _queued, count in ordered:
        out.extend(shape.ray_resources() for _ in range(count))
        if len(out) >= limit:
            return out[:limit]
    return out


class Autoscaler:
    """Sends the demand to Ray when it changed, at most every `every_s` seconds."""

    def __init__(
        self,
        backend: _Backend,
        *,
        every_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = backend
        self.every_s = every_s
        self._clock = clock
        self._last_sent: list[dict[str, float]] | None = None
        self._last_check = -1e18

    def due(self) -> bool:
        return self._clock() - self._last_check >= self.every_s

    def update(self, demand: Sequence[tuple[Shape, bool, int]]) -> bool:
        """Send the request for `demand` if it differs from the last one sent."""
        self._last_check = self._clock()
        request = bundles(demand)
        if request == self._last_sent:
            return False
        try:
            self.backend.request_resources(request)
        except Exception as err:  # noqa: BLE001 - scaling is advice; scheduling goes on
            log.warning("could not send the autoscaler request: %s", err)
            return False
        log.info("autoscaler request: %d bundles", len(request))
        self._last_sent = request
        return True
