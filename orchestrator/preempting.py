"""The controller's side of preemption: record the round's decisions, send the notices, and the
one way a preempted attempt goes back to the queue.

A scheduling round decides which running jobs to preempt (`lorajobs.orchestrator.preemption`);
the controller that ran it records each decision on the victim's row (`preempt_at`,
`preempted_by`), so that whichever controller holds the victim's lease sends its worker SIGTERM
(`RayBackend.preempt`) on its next pass. The worker finishes its step, checkpoints and ends as
`Preempted`; `requeue` puts the job back in the queue, with the reason and who preempted it, no
backoff and no retry budget charged (`recovery.decide` on a preempted `Loss`: the same rule for
a spot reclaim or a node drain), and the next attempt resumes from that checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import update

from lorajobs.jobspecs.failures import FailureKind
from lorajobs.orchestrator.db import JOBS
from lorajobs.orchestrator.preemption import Decision
from lorajobs.orchestrator.records import aware
from lorajobs.orchestrator.recovery import Action, Loss, decide
from lorajobs.orchestrator.states import JobStatus

if TYPE_CHECKING:
    from lorajobs.orchestrator.controller import Controller
    from lorajobs.orchestrator.queue import JobRecord, Queue
    from lorajobs.orchestrator.ray_backend import Attempt

log = logging.getLogger("lorajobs.controller")
_ACTIVE = (JobStatus.dispatched.value, JobStatus.running.value)


def requested(job: JobRecord) -> bool:
    """Whether the job's current attempt has been asked to stop for a higher priority job."""
    asked, started = aware(job.preempt_at), aware(job.dispatched_at)
    return asked is not None and started is not None and asked >= started


def pack_asked(member: JobRecord, leader: JobRecord) -> bool:
    """Whether a pack's member was stopped by a preemption of its pack: the victim the round
    chose is the pack's hold, its first job (`leader`), asked after this member's attempt
    began. A SIGTERM that lands before training (during the pull) ends every member with an
    infra error rather than a checkpoint; none of them is to be charged for it."""
    asked, started = aware(leader.preempt_at), aware(member.dispatched_at)
    return asked is not None and started is not None and asked >= started


def _asking(ctl: Controller, job: JobRecord) -> JobRecord | None:
    """The record that asked `job`'s attempt to stop for a priority: its own, its pack
    leader's, or None."""
    if requested(job):
        return job
    if job.pack_id is None or job.pack_id == job.id:
        return None
    leader = ctl.queue.get(job.pack_id)
    return leader if pack_asked(job, leader) else None


def record(queue: Queue, decisions: Sequence[Decision], now: datetime) -> int:
    """Mark each decision's victims (still active) as asked to stop; returns how many."""
    marked = 0
    with queue.scheduling._writer.begin() as conn:
        for d in decisions:
            if not d.victims:
                continue
            result = conn.execute(
                update(JOBS)
                .where(JOBS.c.id.in_(d.victims), JOBS.c.status.in_(_ACTIVE))
                .values(preempt_at=now, preempted_by=d.job_id)
            )
            marked += result.rowcount
            log.info(
                "preempting %s on node %s for job %s (priority %d)",
                ", ".join(d.victims),
                d.node_id[:12],
                d.job_id,
                d.priority,
            )
    return marked


def signal(ctl: Controller, active: Iterable[JobRecord]) -> None:
    """SIGTERM the attempts we run whose jobs were asked to stop (once per attempt)."""
    for job in active:
        attempt = ctl.inflight.get(job.id)
        if attempt is None or not requested(job) or (job.id, job.attempt) in ctl.signalled:
            continue
        # Not delivered (the attempt has not started its task yet, or is ending): next pass.
        if ctl.backend.preempt(attempt):
            ctl.signalled.add((job.id, job.attempt))
            log.info("job %s: preemption notice sent (for job %s)", job.id, job.preempted_by)


def actor(queue: Queue, job: JobRecord) -> str:
    """Who preempted `job`'s attempt: the higher priority job, or a notice from outside."""
    if requested(job) and job.preempted_by:
        try:
            by = queue.get(job.preempted_by)
            return f"job {by.id} (priority {by.priority})"
        except Exception:  # noqa: BLE001 - the preemptor was deleted: its id still says it
            return f"job {job.preempted_by}"
    return "a preemption notice (SIGTERM: spot reclaim or node drain)"


def settle(
    ctl: Controller, attempt: Attempt, job: JobRecord, out: dict[str, Any], kind: FailureKind
) -> bool:
    """If `attempt` (ended without an adapter) was preempted, requeue its job uncharged and
    return True: stopped on a drain's notice (or its node went first), or checkpointed on a
    priority preemption's notice (or killed after ours). False: an ordinary loss."""
    notice = ctl.drains.settle(attempt) if kind is FailureKind.infra else None
    if notice:
        ctl._lost(job, kind, notice, preempted=True)
        return True
    asking = _asking(ctl, job)
    if out.get("preempted") or (asking is not None and kind is FailureKind.infra):
        requeue(ctl, job, out.get("error", "preempted"), by=actor(ctl.queue, asking or job))
        return True
    return False


def requeue(ctl: Controller, job: JobRecord, error: str, *, by: str, **guard: object) -> bool:
    """The one way a preempted attempt ends: back to the queue at once with the reason and who
    preempted it (`by`), its retry budget untouched; the next attempt resumes from the
    checkpoint the worker wrote. For a priority preemption, a spot reclaim or a node drain."""
    from lorajobs.orchestrator import reconcile

    # Stopped after its upload (the notice came during the export): record it, never rerun.
    done = reconcile.completed_result(job)
    loss = Loss(
        FailureKind.infra,
        retries_used=job.infra_retries,
        preempted=True,
        adapter_complete=done is not None,
    )
    verdict = decide(ctl.config.retry, loss)
    if verdict.action is Action.succeed and done is not None:
        ctl._succeed(job, done, "adapter found complete in the bucket", **guard)
        return True
    assert verdict.action is Action.requeue and verdict.retries_used is None
    reason = (
        f"attempt {job.attempt} preempted by {by}: {error}; requeued, resumes from its "
        "checkpoint (no retry charged)"
    )
    info = {"kind": FailureKind.infra.value, "error": error, "preempted": True, "by": by}
    return ctl._end(
        job,
        JobStatus.queued,
        reason,
        info,
        attempt=job.attempt + 1,
        failure_kind=FailureKind.infra,
        failure_reason=f"preempted by {by}",
        **guard,
    )
