"""One attempt of a pack of jobs, as it runs on a worker node (the pack twin of `attempt.run`).

Each job keeps its own log (`<bucket>/jobs/<id>/logs/attempt-<N>/`), its own progress reports
(to the controller, under its own id and attempt number) and its own outcome: the result is
`{"pack": [ids], "jobs": {id: outcome}}`, each outcome shaped and classified as `attempt.run`'s
(by the same code: `attempt.guarded` / `attempt.failure`). A failure of the pack as a whole (the
base model will not load; a preemption notice, SIGTERM or a drain's stop request, which ends it
`preempted`) is the outcome of every job still in the pack; a job that ended before keeps its own.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable
from typing import Any

from lorajobs.jobspecs.failures import FailureKind
from lorajobs.orchestrator.attempt import _outside_boundary, _reporter, failure, guarded
from lorajobs.orchestrator.settings import Settings


def run_pack(
    members: list[dict[str, Any]],
    output_uri: str,
    *,
    send: Callable[[str, int, dict[str, Any]], None],
    cancelled: Callable[[str], bool],
    ray_node_id: str,
    stop_requested: Callable[[str], str | None] | None = None,
) -> dict[str, Any]:
    """Run one attempt of each member (`{"spec", "job_id", "attempt", "extra"}`) together.
    `stop_requested(job_id)`: the controller's "checkpoint and stop now" for that member (its
    node drains); any member's stops the whole pack, as SIGTERM does."""
    from lorajobs.worker.pack_entry import run_pack as train_pack

    started = time.monotonic()
    node = socket.gethostname()
    base = {"node": node, "ray_node_id": ray_node_id}
    ids = [m["job_id"] for m in members]
    outcomes: dict[str, dict[str, Any]] = {}
    runnable = []
    for m in members:
        refused = _outside_boundary(m["spec"], output_uri)
        if refused:
            error = f"job {m['job_id']} reaches outside its owner's prefix: {refused}"
            outcomes[m["job_id"]] = {"ok": False, "kind": FailureKind.user, "error": error, **base}
        else:
            runnable.append(m)
    logs: dict[str, Any] = {}  # job id -> its attempt's log
    with contextlib.ExitStack() as stack:

        def ended(job_id: str, res: dict[str, Any]) -> None:  # as each member leaves the pack
            outcomes[job_id] = _outcome(res, node, ray_node_id)

        def train() -> dict[str, Any]:
            opened, specs, ctxs = _open_members(
                stack, runnable, ids, output_uri, node, ray_node_id, started, send, stop_requested
            )
            logs.update(opened)
            if specs:
                train_pack(specs, ctxs, cancelled=cancelled, on_end=ended)
            return {}

        # A failure of the pack as a whole (the base will not load, a SIGTERM) is classified
        # as a solo attempt's is, and is the outcome of every member still in the pack.
        whole = guarded(train, node, ray_node_id)
        if not whole["ok"]:
            for m in runnable:
                outcomes.setdefault(m["job_id"], dict(whole))
        seconds = round(time.monotonic() - started, 3)
        for job_id, out in outcomes.items():
            out["attempt_seconds"] = seconds
            if not out["ok"] and job_id in logs:
                logs[job_id].line(f"attempt failed ({out['kind']}): {out['error']}")
    return {"pack": ids, "jobs": outcomes, **base, "attempt_seconds": seconds}


def _open_members(
    stack: contextlib.ExitStack,
    runnable: list[dict[str, Any]],
    ids: list[str],
    output_uri: str,
    node: str,
    ray_node_id: str,
    started: float,
    send: Callable[[str, int, dict[str, Any]], None],
    stop_requested: Callable[[str], str | None] | None,
) -> tuple[dict[str, Any], list[Any], list[Any]]:
    """Each runnable member's log (opened on `stack`), parsed spec and worker context."""
    from lorajobs.jobspecs import parse_spec
    from lorajobs.storage.logs import AttemptLog
    from lorajobs.worker.context import WorkerContext

    cache = Settings.from_env().cache_dir
    logs: dict[str, Any] = {}
    specs: list[Any] = []
    ctxs: list[Any] = []
    for m in runnable:
        job_id, attempt = m["job_id"], m["attempt"]
        spec = parse_spec(m["spec"], f"job {job_id}")
        log = stack.enter_context(AttemptLog(output_uri, job_id, attempt))
        others = ", ".join(i for i in ids if i != job_id)
        log.line(
            f"job {job_id} attempt {attempt}: {spec.kind} '{spec.name}' on {node} "
            f"(Ray node {ray_node_id[:12]}), packed with {others}"
        )
        logs[job_id] = log
        specs.append(spec)

        def job_send(p: dict[str, Any], j: str = job_id, a: int = attempt) -> None:
            send(j, a, p)

        def job_stop(j: str = job_id) -> str | None:
            return stop_requested(j) if stop_requested is not None else None

        extra = dict(m.get("extra") or {})
        ctxs.append(
            WorkerContext(
                job_id=job_id,
                output_uri=output_uri,
                cache_dir=cache,
                attempt=attempt,
                report=_reporter(job_send, log, node, started, extra.get("cost")),
                threads=spec.resources.cpus,
                node=node,
                extra=extra,
                stop_requested=job_stop,
            )
        )
    return logs, specs, ctxs


def _outcome(res: dict[str, Any], node: str, ray_node_id: str) -> dict[str, Any]:
    """One job's outcome from `pack_entry.run_pack`'s result, shaped as `attempt.run`'s."""
    base = {"node": node, "ray_node_id": ray_node_id}
    share = {k: res.get(k) for k in ("steps_done", "work", "packed_with") if k in res}
    if res.get("cancelled"):
        return {"ok": False, "kind": FailureKind.user, "error": "cancelled", **share, **base}
    err = res.get("error")
    if err is not None:
        return {**failure(err, node, ray_node_id), **share}
    return {"ok": True, **base, **{k: v for k, v in res.items() if k != "error"}}
