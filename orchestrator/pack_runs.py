"""The controller's side of packs: launch one Ray task for a pack, and stop one job of it.

Kept out of `controller.py` (which calls these two functions): a pack is launched as one task
on its first job's node and shape, each member tracked as an `Attempt` of its own that shares
the task's ref (`ctl` is the `Controller`; typed loosely, as it imports this module);
cancelling a member asks the task to drop it (the others train on), and only
the pack's last live member stops the task itself.
"""

from __future__ import annotations

import logging
from typing import Any

from lorajobs.jobspecs.failures import FailureKind
from lorajobs.orchestrator.packing import Pack
from lorajobs.orchestrator.scheduler import Shape

log = logging.getLogger("lorajobs.controller")


def launch(ctl: Any, pack: Pack) -> None:
    """Launch `pack` as one attempt; each job's extra (placement, cost) is its own."""
    lead = pack.leader
    ids = [j.id for j in pack.jobs]
    members: list[dict[str, Any]] = []
    for job in pack.jobs:
        rate = ctl._rate(job)
        extra: dict[str, Any] = {
            "placement": {"accelerator": lead.accelerator or "cpu", "attempt": job.attempt},
            "pack": {"jobs": ids, "attempt_of": lead.id},
        }
        if rate is not None:
            extra["cost"] = {
                "usd_per_hour": rate,
                "accelerator": lead.accelerator or "cpu",
                "earlier_attempts_usd": job.cost_usd or 0.0,
            }
        members.append({"spec": job.spec, "job_id": job.id, "attempt": job.attempt, "extra": extra})
    shape = Shape(lead.gpus, lead.gpu_type, lead.cpus, lead.memory_gb)
    try:
        attempts = ctl.backend.launch_pack(
            members, lead.output_uri, shape=shape, node_id=lead.node_id
        )
    except Exception as err:  # noqa: BLE001 - Ray refused the task: every job tries again
        log.warning("pack %s: launch failed: %s", ",".join(ids), err)
        for job in pack.jobs:
            ctl._lost(job, FailureKind.infra, f"launch failed: {type(err).__name__}: {err}")
        return
    for a in attempts:
        ctl.inflight[a.job_id] = a
    log.info("jobs %s share one attempt on node %s", ", ".join(ids), lead.node_id)


def stop(ctl: Any, job_id: str) -> None:
    """Stop `job_id`'s attempt: its own task, or only its place in a pack others still use."""
    attempt = ctl._forget(job_id)
    others = [j for j in attempt.pack if j != job_id and j in ctl.inflight]
    if others and ctl.inflight[others[0]].ref is attempt.ref:
        ctl.backend.cancel_member(attempt)
        return
    ctl.backend.cancel(attempt)
