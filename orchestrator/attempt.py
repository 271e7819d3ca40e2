"""One attempt of one job, as it runs on a worker node: train, report, log, and say how it ended.

Called inside the Ray task (`ray_backend.run_attempt`) but free of Ray itself: progress leaves
through `send`, the log streams to `<bucket>/jobs/<id>/logs/attempt-<N>/` (appended parts), and
the outcome is a plain dict (`ok`, and for a failure its `kind` from the failure vocabulary and a
one-line `error`), so the controller needs no exception pickling to classify it.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from lorajobs.jobspecs.failures import (
    FailureKind,
    LoraJobsError,
    MissingCredentials,
    NodeUnfit,
    Preempted,
    classify,
)
from lorajobs.orchestrator.cost import record_so_far
from lorajobs.orchestrator.settings import Settings

PROGRESS_LOG_EVERY_S = 2.0


def run(
    spec: dict[str, Any],
    job_id: str,
    attempt: int,
    output_uri: str,
    *,
    send: Callable[[dict[str, Any]], None],
    ray_node_id: str,
    extra: dict[str, Any] | None = None,
    stop_requested: Callable[[], str | None] | None = None,
) -> dict[str, Any]:
    """Run attempt `attempt` of `job_id`; never raises for errors the worker understands.
    `stop_requested` is the controller's "checkpoint and stop now" (see `WorkerContext`)."""
    from lorajobs.jobspecs import parse_spec
    from lorajobs.storage.logs import AttemptLog
    from lorajobs.worker.context import WorkerContext
    from lorajobs.worker.entrypoint import run_job

    started = time.monotonic()
    node = socket.gethostname()
    refused = _outside_boundary(spec, output_uri)
    if refused:  # before a single byte is read or written, the log included
        return {
            "ok": False,
            "kind": FailureKind.user,
            "error": f"job {job_id} reaches outside its owner's prefix: {refused}",
            "node": node,
            "ray_node_id": ray_node_id,
            "attempt_seconds": 0.0,
        }
    cache = Settings.from_env().cache_dir  # this node's: LORAJOBS_CACHE_DIR or its home's
    parsed = parse_spec(spec, f"job {job_id}")
    extra = dict(extra or {})
    with AttemptLog(output_uri, job_id, attempt) as log:
        log.line(
            f"job {job_id} attempt {attempt}: {parsed.kind} '{parsed.name}' on {node} "
            f"(Ray node {ray_node_id[:12]}), {parsed.resources.cpus} threads"
        )
        ctx = WorkerContext(
            job_id=job_id,
            output_uri=output_uri,
            cache_dir=cache,
            attempt=attempt,
            report=_reporter(send, log, node, started, extra.get("cost")),
            threads=parsed.resources.cpus,
            node=node,
            extra=extra,
            stop_requested=stop_requested,
        )

        def train() -> dict[str, Any]:
            if parsed.resources.gang:  # several GPUs: Ray Train workers; this task coordinates
                from lorajobs.orchestrator.gang import run_gang

                return run_gang(
                    parsed, spec, job_id, attempt, output_uri,
                    report=ctx.report, extra=extra, log=log.line, stop_requested=stop_requested,
                )  # fmt: skip
            return run_job(parsed, ctx)  # run_job logs the upload

        out = guarded(train, node, ray_node_id)
        out["attempt_seconds"] = round(time.monotonic() - started, 3)
        if not out["ok"]:
            log.line(f"attempt {attempt} failed ({out['kind']}): {out['error']}")
    return out


def guarded(train: Callable[[], dict[str, Any]], node: str, ray_node_id: str) -> dict[str, Any]:
    """`train()`'s result as an outcome; never raises: a failure becomes its classified
    outcome (and GPU memory is released either way). A solo attempt and a pack (whose
    failure as a whole is every member's) both end through here."""
    base = {"node": node, "ray_node_id": ray_node_id}
    try:
        return {"ok": True, **base, **train()}
    except LoraJobsError as err:
        return failure(err, node, ray_node_id)
    except Exception as err:  # noqa: BLE001 - report, don't crash the task: we classify here
        traceback.print_exc()
        return {
            "ok": False,
            "kind": FailureKind.internal,
            "error": f"{type(err).__name__}: {err}",
            **base,
        }
    finally:
        _release_gpu_memory()


def failure(err: LoraJobsError, node: str, ray_node_id: str) -> dict[str, Any]:
    """The outcome of an attempt (or of one member of a pack) that ended with `err`."""
    err = _on_this_node(err, node)
    # The hostname alone may not tell nodes apart (containers, a simulated cluster).
    error = f"{err} [Ray node {ray_node_id[:12]}]" if err.node_fault else str(err)
    return {
        "ok": False,
        "kind": classify(err),
        "error": error,
        "node_fault": err.node_fault,
        # Stopped by a notice (SIGTERM, a drain), checkpointed: requeued without retry charge.
        "preempted": isinstance(err, Preempted),
        "node": node,
        "ray_node_id": ray_node_id,
    }


def _outside_boundary(spec: dict[str, Any], output_uri: str) -> str | None:
    """In a shared deployment (`LORAJOBS_TENANCY=shared`, forwarded by the controller), the
    worker checks again what the server checked at submit: every place the job reads or
    writes lies under its owner's prefix or the allowed ones. None when it may run."""
    from lorajobs.storage.boundaries import boundary_from_env

    boundary = boundary_from_env(os.environ)
    if boundary is None:
        return None
    try:
        problems = boundary.problems(str(spec.get("owner") or ""), spec, output_uri)
    except ValueError as err:  # an owner name that cannot be a prefix
        problems = [str(err)]
    return "; ".join(problems) or None


def _on_this_node(err: LoraJobsError, node: str) -> LoraJobsError:
    """Missing bucket credentials on a worker node are the node's environment, not the job's
    spec: an infra failure that names the node, retried elsewhere."""
    if isinstance(err, MissingCredentials):
        return NodeUnfit(
            f"node {node} has no credentials for the bucket ({err}); give every worker node "
            "the bucket's credentials (environment or instance role)"
        )
    return err


def _reporter(
    send: Callable[[dict[str, Any]], None], log: Any, node: str, started: float, cost: Any
) -> Callable[[dict[str, Any]], None]:
    """The trainer's progress callback: to the controller (at most 5/s), and to the log."""
    last_sent, last_logged = [0.0], [0.0]

    def report(p: dict[str, Any]) -> None:
        now = time.monotonic()
        final = p.get("step") == p.get("total_steps")
        if final:
            # The sidecar is written right after the last step: record what this attempt
            # cost up to here (the database keeps the final figure, upload included).
            record_so_far(cost, now - started)
        # Fire and forget; the trainer already rate-limits, this guards against chatty ones.
        if now - last_sent[0] >= 0.2 or final:
            last_sent[0] = now
            send({**p, "node": node})
        if now - last_logged[0] >= PROGRESS_LOG_EVERY_S or final:
            last_logged[0] = now
            loss, speed = p.get("loss"), p.get("it_per_s")
            log.line(
                f"step {p.get('step')}/{p.get('total_steps')}"
                + (f"  loss {loss:.4f}" if isinstance(loss, (int, float)) else "")
                + (f"  {speed:.2f} it/s" if isinstance(speed, (int, float)) else "")
            )

    return report


def _release_gpu_memory() -> None:
    # Task workers are reused between jobs: give cached CUDA blocks back so that jobs packed on
    # the same GPU from other processes can have them.
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
