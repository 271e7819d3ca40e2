"""Spot reclaims with notice: attempts on a draining Ray node checkpoint and go, uncharged.

When a node will go, Ray is told first: its autoscaler drains a reclaimed spot node (the GCS
`DrainNode` RPC with reason `DRAIN_NODE_REASON_PREEMPTION` and a deadline), and so does
`ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION --deadline-remaining-seconds N` by hand.
Ray keeps running the node's tasks until it is killed at the deadline (or shuts it down itself
once it is idle), refuses new ones (a hard node affinity to it fails at once), and accepts an
idle-termination drain only for an idle node: a draining node under one of our attempts is
going away.

Each pass the controller reads the draining nodes once (`DrainWatch.current`: `read_drains`,
from the GCS; the scheduler's round skips them too), and `DrainWatch` asks every attempt it runs on one of them to checkpoint after its current step and
stop (through the progress board, which the worker polls: `StopPoll`). The attempt
ends `Preempted`; the controller requeues the job without charging its infra retries and the
scheduler keeps it (and everything else) off draining nodes, so it resumes on another node from
that checkpoint, well before the deadline. Nothing here waits for SIGTERM, whose grace before
SIGKILL under Ray may be too short for a checkpoint.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lorajobs.orchestrator.ray_backend import Attempt, RayBackend

log = logging.getLogger("lorajobs.controller")
#: How often a running attempt asks the board whether it must checkpoint and stop.
STOP_POLL_S = 1.0


@dataclass(frozen=True)
class Drain:
    """One node Ray is draining. Ray accepts a drain of a busy node only for preemption (an
    idle-termination drain of a node running tasks is refused), so a drain under one of our
    attempts is a reclaim. (Ray records the drain's reason in the node's `death_info` only
    seconds later, often once the node is idle: too late to say why here.)"""

    node_id: str
    #: When the node will be killed, Unix milliseconds (the drainer's clock); 0: not said.
    deadline_ms: int

    @property
    def deadline(self) -> datetime | None:
        if self.deadline_ms <= 0:
            return None
        return datetime.fromtimestamp(self.deadline_ms / 1000, tz=timezone.utc)

    def describe(self) -> str:
        """What an attempt stopped for it is told, and what `show` says:
        `preempted: node <id> draining (spot reclaim), deadline <UTC time>`."""
        at = self.deadline
        when = f"deadline {at:%Y-%m-%d %H:%M:%S} UTC" if at else "no deadline given"
        return f"preempted: node {self.node_id[:12]} draining (spot reclaim), {when}"


def read_drains() -> dict[str, Drain]:
    """The nodes Ray is draining now, by node id, with their deadlines (the GCS's list of
    draining nodes). Runs where the GCS can be reached: a driver, or a task."""
    import ray._private.state as state

    return {n: Drain(n, int(ms)) for n, ms in state.state.get_draining_nodes().items()}


class DrainWatch:
    """A controller's attempts on draining nodes: each is asked to checkpoint and stop (again
    every pass, in case a request was lost), and the notice is kept until its attempt ends."""

    def __init__(self, backend: RayBackend) -> None:
        self.backend = backend
        self._notices: dict[str, str] = {}  # job id -> what its attempt was told
        self._read: dict[str, Drain] | None = None  # this pass's reading; None: not read yet

    def new_pass(self) -> None:
        """Forget the last pass's reading: the next `current()` asks Ray again."""
        self._read = None

    def current(self) -> dict[str, Drain]:
        """The draining nodes, read from Ray at most once per pass (`new_pass`), and only
        when asked: a pass with nothing in flight and nothing to place reads nothing."""
        if self._read is None:
            self._read = self.backend.draining()
        return self._read

    def sweep(self, inflight: Mapping[str, Attempt]) -> None:
        """Ask the attempts in `inflight` whose node is draining to checkpoint and stop now."""
        for gone in set(self._notices) - set(inflight):  # ended another way (cancel, takeover)
            del self._notices[gone]
        if not inflight:
            return
        drains = self.current()
        for job_id, attempt in inflight.items():
            drain = _first(drains, attempt.on())  # a gang stops when any of its nodes drains
            if drain is None:
                continue
            if job_id not in self._notices:
                self._notices[job_id] = drain.describe()
                log.warning(
                    "job %s: %s; asking attempt %d to checkpoint and stop",
                    job_id,
                    self._notices[job_id],
                    attempt.attempt,
                )
            self.backend.request_stop(attempt, self._notices[job_id])

    def settle(self, attempt: Attempt) -> str | None:
        """The notice for `attempt`, which ended with an infra failure: the one it was given,
        else its node's drain if that node drains now (the attempt was placed just before the
        drain, and Ray refused it or it failed before it could be told); None: no drain."""
        notice = self._notices.pop(attempt.job_id, None)
        if notice is None and attempt.on():
            drain = _first(self.current(), attempt.on())
            notice = drain.describe() if drain is not None else None
        return notice


def _first(drains: Mapping[str, Drain], nodes: tuple[str, ...]) -> Drain | None:
    """The drain of the first of `nodes` that is draining, if any."""
    return next((drains[n] for n in nodes if n in drains), None)


class StopPoll:
    """In an attempt's process: a daemon thread asks the board every `STOP_POLL_S` whether the
    controller wants this attempt to checkpoint and stop (its node is draining). Calling it
    returns why, or None: the training loop calls it after every step, so it only reads."""

    def __init__(self, board: Any, job_id: str, attempt: int, every_s: float = STOP_POLL_S):
        self.why: str | None = None
        self._done = threading.Event()
        threading.Thread(
            target=self._poll,
            args=(board, job_id, attempt, every_s),
            name=f"lorajobs-stop-poll-{job_id}",
            daemon=True,
        ).start()

    def __call__(self) -> str | None:
        return self.why

    def close(self) -> None:
        self._done.set()

    def _poll(self, board: Any, job_id: str, attempt: int, every_s: float) -> None:
        import ray
        from ray.exceptions import GetTimeoutError, RayError

        while self.why is None and not self._done.wait(every_s):
            try:
                self.why = ray.get(board.stop_requested.remote(job_id, attempt), timeout=30)
            except (RayError, GetTimeoutError):
                continue  # the board is restarting: ask again
