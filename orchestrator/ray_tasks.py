"""The Ray tasks that run on worker nodes: one attempt (`run_attempt`), a pack's attempt
(`run_pack_attempt`), and the preemption notice to a running attempt (`signal_attempt`).

Their bodies import `lorajobs.orchestrator.attempt` / `attempt_pack` (and so the worker) only
inside the task, so the controller and the CLI that import this module never load torch.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayError

from lorajobs.orchestrator.drain import StopPoll


@ray.remote(max_retries=0)
def run_attempt(
    spec: dict[str, Any],
    job_id: str,
    attempt: int,
    output_uri: str,
    board: Any,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The Ray task of one attempt: `lorajobs.orchestrator.attempt.run` on the node Ray placed
    it on, its progress reports sent to the controller's board (fire and forget)."""
    from lorajobs.orchestrator.attempt import run

    def send(progress: dict[str, Any]) -> None:
        board.report.remote(job_id, attempt, progress)

    node_id = ray.get_runtime_context().get_node_id()
    with _running_here([(job_id, attempt)], board) as stops:
        return run(
            spec,
            job_id,
            attempt,
            output_uri,
            send=send,
            ray_node_id=node_id,
            extra=extra,
            stop_requested=stops[job_id],
        )


@contextlib.contextmanager
def _running_here(attempts: list[tuple[str, int]], board: Any) -> Iterator[dict[str, StopPoll]]:
    """While the attempts (job id, attempt) run in this process: a pid file for each, which
    `signal_attempt` reads (task workers are reused: the file says which process runs this
    attempt right now, so a preemption signals it and never the next job the same worker picks
    up), and a `StopPoll` for each, by job id (the board's "checkpoint and stop now")."""
    markers = [_pid_file(job_id, attempt) for job_id, attempt in attempts]
    for marker in markers:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(os.getpid()))
    stops = {job_id: StopPoll(board, job_id, attempt) for job_id, attempt in attempts}
    try:
        yield stops
    finally:
        for stop in stops.values():
            stop.close()
        for marker in markers:
            marker.unlink(missing_ok=True)


@ray.remote(num_cpus=0, max_retries=0)
def signal_attempt(job_id: str, attempt: int) -> bool:
    """SIGTERM the worker process running attempt `attempt` of `job_id` on this node (the
    preemption notice: it finishes its step, checkpoints and ends as preempted). False when
    that attempt is not running here any more."""
    import signal

    try:
        pid = int(_pid_file(job_id, attempt).read_text())
        os.kill(pid, signal.SIGTERM)
    except (OSError, ValueError):
        return False
    return True


def _pid_file(job_id: str, attempt: int) -> Path:
    return Path(tempfile.gettempdir()) / "lorajobs-attempts" / f"{job_id}-{attempt}.pid"


@ray.remote(max_retries=0)
def run_pack_attempt(members: list[dict[str, Any]], output_uri: str, board: Any) -> dict[str, Any]:
    """The Ray task of a pack: `lorajobs.orchestrator.attempt_pack.run_pack` on its node; each
    job's progress goes to the board under its own id, and the board says which to drop."""
    from lorajobs.orchestrator.attempt_pack import run_pack

    def send(job_id: str, attempt: int, progress: dict[str, Any]) -> None:
        board.report.remote(job_id, attempt, progress)

    asked: dict[str, Any] = {"at": 0.0, "ids": set()}

    def cancelled(job_id: str) -> bool:
        # Asked once a second at most: a round of a tiny pack takes milliseconds.
        if time.monotonic() - asked["at"] >= 1.0:
            ids = [m["job_id"] for m in members]
            try:
                asked["ids"] = set(ray.get(board.cancelled.remote(ids), timeout=10))
            except (RayError, GetTimeoutError):
                pass  # the board is restarting: ask again next time
            asked["at"] = time.monotonic()
        return job_id in asked["ids"]

    node_id = ray.get_runtime_context().get_node_id()
    # A preemption notice (SIGTERM) or a stop request (a drain) for any member stops the pack.
    with _running_here([(m["job_id"], m["attempt"]) for m in members], board) as stops:
        return run_pack(
            members,
            output_uri,
            send=send,
            cancelled=cancelled,
            ray_node_id=node_id,
            stop_requested=lambda job_id: stops[job_id](),
        )
