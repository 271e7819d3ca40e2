"""The recovery decision, row by row: every combination that leads somewhere different."""

from __future__ import annotations

import pytest

from lorajobs.jobspecs.failures import FailureKind
from lorajobs.orchestrator.recovery import Action, Loss, RetryPolicy, Verdict, decide

INFRA, USER, INTERNAL = FailureKind.infra, FailureKind.user, FailureKind.internal
POLICY = RetryPolicy(
    infra_retries=3, user_retries=1, internal_retries=0, backoff_s=2.0, backoff_max_s=5.0
)
SUCCEED, FAIL = Verdict(Action.succeed), Verdict(Action.fail)


@pytest.mark.parametrize(
    ("loss", "verdict"),
    [
        # A worker lost after its upload: its adapter is recorded, never trained again.
        (Loss(INFRA, 0, adapter_complete=True), SUCCEED),
        (Loss(INFRA, 3, adapter_complete=True), SUCCEED),
        (Loss(INFRA, 3, charged=False, adapter_complete=True), SUCCEED),
        # Infra losses retry with exponential backoff, capped, until the budget is spent.
        (Loss(INFRA, 0), Verdict(Action.requeue, 2.0, 1)),
        (Loss(INFRA, 1), Verdict(Action.requeue, 4.0, 2)),
        (Loss(INFRA, 2), Verdict(Action.requeue, 5.0, 3)),
        (Loss(INFRA, 3), FAIL),
        # A lost controller costs no budget and no wait, even with the budget spent.
        (Loss(INFRA, 3, charged=False), Verdict(Action.requeue)),
        # A preempted attempt (priority, or a drain: a spot reclaim with notice): requeued at once, no budget, even when spent;
        # a complete adapter still wins.
        (Loss(INFRA, 0, preempted=True), Verdict(Action.requeue)),
        (Loss(INFRA, 3, preempted=True), Verdict(Action.requeue)),
        (Loss(INFRA, 3, preempted=True, adapter_complete=True), SUCCEED),
        # ... but a user error in an attempt on a draining node is still the user's.
        (Loss(USER, 1, preempted=True), FAIL),
        # Only infra losses look for a complete adapter: a user error's upload never finished.
        (Loss(USER, 0, adapter_complete=True), Verdict(Action.requeue, 2.0, 1)),
        # User errors: their own budget (here 1), separate from infra's.
        (Loss(USER, 0), Verdict(Action.requeue, 2.0, 1)),
        (Loss(USER, 1), FAIL),
        # Internal errors (our bugs) are not retried by default.
        (Loss(INTERNAL, 0), FAIL),
    ],
    ids=lambda v: repr(v) if isinstance(v, Loss) else "",
)
def test_decide(loss: Loss, verdict: Verdict) -> None:
    assert decide(POLICY, loss) == verdict


def test_the_defaults_retry_only_infra_losses() -> None:
    p = RetryPolicy()
    assert decide(p, Loss(INFRA, 0)).action is Action.requeue
    assert decide(p, Loss(USER, 0)) == FAIL
    assert decide(p, Loss(INTERNAL, 0)) == FAIL
