"""Job states and the transitions allowed between them. Pure: no database. (Failure kinds are
the failure vocabulary's: `lorajobs.jobspecs.failures.FailureKind`.)

```
queued     → dispatched | cancelled | failed
dispatched → running | succeeded | failed | cancelled | queued (Ray refused or lost the task)
running    → succeeded | failed | cancelled | queued (retry after infra failure / preemption)
failed     → queued (manual retry)
cancelled  → queued (manual retry)
succeeded: final
```
`lorajobs.orchestrator.queue.Queue.apply` is the only code that changes a job's status, and it
refuses anything not in `ALLOWED`.
"""

from __future__ import annotations

from enum import Enum


class JobStatus(str, Enum):
    """Where a job is in its life. Stored by value in `jobs.status`."""

    #: Waiting in the queue for the scheduler to find it capacity.
    queued = "queued"
    #: Claimed by a controller and handed to Ray; no worker has reported in yet.
    dispatched = "dispatched"
    #: A worker has started the attempt and reports progress.
    running = "running"
    #: Finished: the adapter and its metadata are in the bucket.
    succeeded = "succeeded"
    #: Gave up: `failure_kind` and `failure_reason` say why. May be re-queued by hand.
    failed = "failed"
    #: Stopped at the user's request before it finished.
    cancelled = "cancelled"

    def __str__(self) -> str:
        # Render as the bare value in messages and f-strings on every Python version.
        return self.value

    def is_terminal(self) -> bool:
        """True if the job will not change again on its own (only a manual retry moves it)."""
        return self in TERMINAL


TERMINAL: frozenset[JobStatus] = frozenset(
    {JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled}
)

#: Every status change lorajobs may make; anything else is a bug or a lost race.
ALLOWED: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.queued: frozenset({JobStatus.dispatched, JobStatus.cancelled, JobStatus.failed}),
    JobStatus.dispatched: frozenset(
        {
            JobStatus.running,
            # Ray refused the task or the controller lost it before it started: try again.
            JobStatus.queued,
            JobStatus.failed,
            JobStatus.cancelled,
            # A task so short it finished before its "running" report was processed.
            JobStatus.succeeded,
        }
    ),
    JobStatus.running: frozenset(
        {
            JobStatus.succeeded,
            JobStatus.failed,
            JobStatus.cancelled,
            # Retry after an infra failure or preemption; resumes from the last checkpoint.
            JobStatus.queued,
        }
    ),
    # A manual retry (`lorajobs retry`) of a failed or cancelled job starts a new attempt; it
    # resumes from the checkpoints the stopped attempt kept.
    JobStatus.failed: frozenset({JobStatus.queued}),
    JobStatus.succeeded: frozenset(),
    JobStatus.cancelled: frozenset({JobStatus.queued}),
}


def can_transition(current: JobStatus, to: JobStatus) -> bool:
    """Whether `current → to` is an allowed status change."""
    return to in ALLOWED[current]
