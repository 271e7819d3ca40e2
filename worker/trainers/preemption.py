"""SIGTERM as a preemption notice: finish the step, checkpoint, stop as `Preempted`.

Spot reclaims, Kubernetes evictions and Ray node drains send SIGTERM some seconds (GCP 30 s,
AWS 2 min, Kubernetes' grace period) before they kill. While a `PreemptionNotice` is entered,
the first SIGTERM only sets `received`; the training loop checks it after each optimizer step,
writes a checkpoint and raises `Preempted`, so the attempt ends as an infra failure and the
retry resumes from that step instead of from the last periodic checkpoint.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType, TracebackType
from typing import Any

log = logging.getLogger(__name__)


class PreemptionNotice:
    """A context manager that turns SIGTERM into a flag, then restores the previous handler.

    Python runs signal handlers in the main thread only, and `signal.signal` refuses to be
    called from any other: a loop entered in another thread trains without the notice (SIGTERM
    keeps its previous meaning there). Ray runs a task in its worker's main thread, and
    `lorajobs run` trains in its own. A second SIGTERM gets the previous handler's behaviour
    (the default: the process ends), so an impatient sender can still stop the process at once.
    """

    def __init__(self) -> None:
        self.received = False
        self._previous: Any = None
        self._installed = False

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
