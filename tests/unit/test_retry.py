from orchestrator.retry import RetryPolicy, decide


def test_infra_failures_retry_with_exponential_backoff_until_budget() -> None:
    p = RetryPolicy(infra_retries=3, backoff_s=2.0, backoff_max_s=5.0)
    assert [decide(p, "infra", n).delay_s for n in range(3)] == [2.0, 4.0, 5.0]
    assert decide(p, "infra", 3).retry is False


def test_user_and_internal_failures_are_not_retried_by_default() -> None:
    p = RetryPolicy()
    assert decide(p, "user", 0).retry is False
    assert decide(p, "internal", 0).retry is False
    assert decide(RetryPolicy(user_retries=1), "user", 0).retry is True
