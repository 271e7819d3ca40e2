"""Retry policy: a pure function from a failed attempt to a decision.

Each failure kind has its own budget, counted separately on the job (`infra_retries`,
`user_retries`, `internal_retries`): lost nodes are routine on spot capacity, bad inputs never fix
themselves, so a job that lost two nodes still gets its infra retries after a user error is
fixed and retried by hand (`lorajobs retry`, which starts fresh budgets).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """Budgets per failure kind, and the backoff between tries."""

    infra_retries: int = 3
    user_retries: int = 0
    internal_retries: int = 0
    backoff_s: float = 2.0
    backoff_max_s: float = 60.0

    def budget(self, kind: str) -> int:
        return {
            "infra": self.infra_retries,
            "user": self.user_retries,
            "internal": self.internal_retries,
        }.get(kind, 0)


@dataclass(frozen=True)
class Decision:
    retry: bool
    delay_s: float = 0.0


def decide(policy: RetryPolicy, kind: str, retries_so_far: int) -> Decision:
    """Retry if this kind of failure still has budget (`retries_so_far` counts earlier retries
    of the same kind only); back off exponentially: backoff_s x 2^n, capped."""
    if retries_so_far >= policy.budget(kind):
        return Decision(retry=False)
    delay = min(policy.backoff_max_s, policy.backoff_s * (2**retries_so_far))
    return Decision(retry=True, delay_s=delay)
