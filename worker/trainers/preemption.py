"""Preemption notices: finish the step, checkpoint, stop as `Preempted`.

Two notices reach a training loop. SIGTERM: spot reclaims, Kubernetes evictions and Ray node
shutdowns send it some seconds (GCP 30 s, AWS 2 min, Kubernetes' grace period) before they kill.
A stop request: the platform asks the attempt to go now, e.g. because its Ray node is draining
for a spot reclaim (the controller sees the drain and its deadline long before any SIGTERM, whose
grace before SIGKILL under Ray may not cover a checkpoint). Either way the loop checks after each
optimizer step, writes a checkpoint and raises `Preempted`, so the attempt ends as an infra
failure and the retry resumes from that step instead of from the last periodic checkpoint.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any

log = logging.getLogger(__name__)

#: Returns why the platform wants the attempt to stop now, or None; polled after every step,
#: so it must be cheap (read a value another thread set).
StopRequest = Callable[[], str | None]


class PreemptionNotice:
    """A context manager that turns SIGTERM into a flag, then restores the previous handler;
    `reason()` also reports a stop request (`requested`), if one was given.

    Python runs signal handlers in the main thread only, and `signal.signal` refuses to be
    called from any other: a loop entered in another thread trains without the SIGTERM notice
    (SIGTERM keeps its previous meaning there; stop requests still work). Ray runs a task in its
    worker's main thread, and `lorajobs run` trains in its own. A second SIGTERM gets the
    previous handler's behaviour (the default: the process ends), so an impatient sender can
    still stop the process at once.
    """

    def __init__(self, requested: StopRequest | None = None) -> None:
        self.received = False
        self._requested = requested
        self._previous: Any = None
        self._installed = False

    def reason(self) -> str | None:
        """Why the loop should stop after this step ("SIGTERM", a stop request's reason), or
        None to go on."""
        if self.received:
            return "SIGTERM"
        return self._requested() if self._requested is not None else None

    def __enter__(self) -> PreemptionNotice:
        if threading.current_thread() is not threading.main_thread():
            log.info("training outside the main thread: SIGTERM will not checkpoint")
            return self
        self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        self._installed = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._installed:
            self._restore()
            self._installed = False

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self.received = True
        self._restore()  # the next SIGTERM is handled as it was before the loop

    def _restore(self) -> None:
        # None: the previous handler was not set from Python; the default is the closest thing.
        previous = self._previous if self._previous is not None else signal.SIG_DFL
        signal.signal(signal.SIGTERM, previous)
