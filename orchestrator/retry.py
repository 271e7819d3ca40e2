"""Retry policy: a pure function from a failed attempt to a decision."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """Separate budgets: lost nodes are routine on spot capacity, bad inputs never fix themselves."""

    infra_retries: int = 3
    user_retries: int = 0
    internal_retries: int = 0
    backoff_s: float = 2.0
    backoff_max_s: float = 60.0


@dataclass(frozen=True)
class Decision:
    retry: bool
    delay_s: float = 0.0


def decide(policy: RetryPolicy, kind: str, retries_so_far: int) -> Decision:
    """Retry if this kind of failure still has budget; back off exponentially."""
    budget = {
        "infra": policy.infra_retries,
        "user": policy.user_retries,
        "internal": policy.internal_retries,
    }.get(kind, 0)
    if retries_so_far >= budget:
        return Decision(retry=False)
    delay = min(policy.backoff_max_s, policy.backoff_s * (2**retries_so_far))
    return Decision(retry=True, delay_s=delay)
