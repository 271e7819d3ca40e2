"""The recovery decision: what becomes of an attempt that ended without recording an adapter.

One pure function (`decide`) from the facts the controller gathered (`Loss`) to a `Verdict`:
succeed from the bucket (the attempt finished uploading before it was lost), requeue with
backoff and resume from the last checkpoint, or fail. The controller only gathers the facts
(including the one bucket look-up) and applies the verdict.

Each failure kind has its own budget, counted separately on the job (`infra_retries`,
`user_retries`, `internal_retries`): lost nodes are routine on spot capacity, bad inputs never
fix themselves, so a job that lost two nodes still gets its infra retries after a user error is
fixed and retried by hand (`lorajobs retry`, which starts fresh budgets).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from lorajobs.jobspecs.failures import FailureKind

#: The job column that counts the retries of each kind.
RETRY_COLUMN: dict[FailureKind, str] = {
    FailureKind.infra: "infra_retries",
    FailureKind.user: "user_retries",
    FailureKind.internal: "internal_retries",
}


@dataclass(frozen=True)
class RetryPolicy:
    """Budgets per failure kind, and the backoff between tries."""

    infra_retries: int = 3
    user_retries: int = 0
    internal_retries: int = 0
    backoff_s: float = 2.0
    backoff_max_s: float = 60.0

    def budget(self, kind: FailureKind) -> int:
        """How many retries a failure of `kind` gets."""
        return int(getattr(self, RETRY_COLUMN[kind]))

    def backoff(self, retries_so_far: int) -> float:
        """Seconds before retry number `retries_so_far + 1`: backoff_s x 2^n, capped."""
        return min(self.backoff_max_s, self.backoff_s * (2**retries_so_far))


@dataclass(frozen=True)
class Loss:
    """What the controller knows about an attempt that ended without recording an adapter."""

    kind: FailureKind
    #: Retries of this kind the job has used so far.
    retries_used: int
    #: False when the attempt was lost through no fault of its own (its controller died): it
    #: is retried at once and costs no budget.
    charged: bool = True
    #: The attempt's adapter is complete in the bucket (looked up for infra losses only: a
    #: worker lost after its upload).
    adapter_complete: bool = False
    #: The attempt was preempted (a higher priority job, or a drain: a spot reclaim with notice)
    #: and checkpointed, or its node went first: requeued at once, resumed from its checkpoint,
    #: no retry budget charged. Only for infra losses: a user error stays the user's.
    preempted: bool = False


class Action(str, Enum):
    succeed = "succeed"
    requeue = "requeue"
    fail = "fail"


@dataclass(frozen=True)
class Verdict:
    action: Action
    #: requeue: seconds to wait before the next attempt.
    delay_s: float = 0.0
    #: requeue: the new count of retries of the loss's kind (None: unchanged).
    retries_used: int | None = None


def decide(policy: RetryPolicy, loss: Loss) -> Verdict:
    """The verdict on `loss` under `policy`."""
    if loss.kind is FailureKind.infra and loss.adapter_complete:
        return Verdict(Action.succeed)
    if not loss.charged or (loss.preempted and loss.kind is FailureKind.infra):
        # The one rule for preemption, whoever preempted: nothing the job did, so no charge.
        return Verdict(Action.requeue)
    if loss.retries_used >= policy.budget(loss.kind):
        return Verdict(Action.fail)
    return Verdict(Action.requeue, policy.backoff(loss.retries_used), loss.retries_used + 1)
