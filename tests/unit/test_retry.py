from lorajobs.orchestrator.retry import RetryPolicy, decide


def test_infra_failures_retry_with_exponential_backoff_until_budget() -> None:
    p = RetryPolicy(infra_retries=3, backoff_s=2.0, backoff_max_s=5.0)
    assert [decide(p, "infra", n).delay_s for n in range(3)] == [2.0, 4.0, 5.0]
    assert decide(p, "infra", 3).retry is False


def test_user_and_internal_failures_are_not_retried_by_default() -> None:
    p = RetryPolicy()
    assert decide(p, "user", 0).retry is False
    assert decide(p, "internal", 0).retry is False
    assert decide(RetryPolicy(user_retries=1), "user", 0).retry is True


def test_budgets_are_separate_per_kind() -> None:
    p = RetryPolicy(infra_retries=2, user_retries=1, backoff_s=1.0)
    # Counts are per kind: two infra retries spent leave the user budget whole, and vice versa.
    assert decide(p, "infra", 2).retry is False
    assert decide(p, "user", 0) .retry is True
    assert decide(p, "user", 1).retry is False
    assert decide(p, "infra", 1).delay_s == 2.0
    assert decide(p, "unknown-kind", 0).retry is False
