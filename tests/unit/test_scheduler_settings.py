"""Controller knobs from the environment, prices and cost, the autoscaler request, and the
takeover rules for jobs whose controller is gone: pure logic."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from lorajobs.jobspecs.failures import InvalidInput
from lorajobs.orchestrator.autoscale import Autoscaler, bundles
from lorajobs.orchestrator.cost import attempt_cost, estimate, hourly_rate, parse_prices
from lorajobs.orchestrator.reconcile import LIVE, TAKE, WAIT, lease_driver, lease_owner, verdict
from lorajobs.orchestrator.records import JobRecord
from lorajobs.orchestrator.scheduler import Shape
from lorajobs.orchestrator.settings import ControllerConfig, parse_limits
from lorajobs.orchestrator.states import JobStatus

T0 = datetime(2030, 1, 1, tzinfo=timezone.utc)


# ---- config ---------------------------------------------------------------------------------


def test_config_from_env() -> None:
    c = ControllerConfig.from_env(
        {
            "LORAJOBS_LEASE_S": "6",
            "LORAJOBS_AGING_S": "0",
            "LORAJOBS_OWNER_MAX_JOBS": "2,acme=5",
            "LORAJOBS_OWNER_MAX_GPUS": "acme=1.5",
            "LORAJOBS_INFRA_RETRIES": "5",
            "LORAJOBS_PRICES": "A100=1.29, cpu=0.05",
            "LORAJOBS_AUTOSCALE": "off",
        }
    )
    assert c.lease_s == 6 and c.takeover_grace_s == 60 and c.policy.aging_s == 0
    assert c.policy.limits.jobs("acme") == 5 and c.policy.limits.jobs("bob") == 2
    assert c.policy.limits.gpus("acme") == 1.5 and c.policy.limits.gpus("bob") is None
    assert c.retry.infra_retries == 5 and c.retry.user_retries == 0
    assert c.prices == {"A100": 1.29, "cpu": 0.05} and c.autoscale == "off"
    d = ControllerConfig.from_env({})
    assert d.policy.limits.jobs("x") is None and d.lease_s == 30 and d.autoscale == "auto"


@pytest.mark.parametrize(
    "env",
    [
        {"LORAJOBS_LEASE_S": "soon"},
        {"LORAJOBS_LEASE_S": "0"},
        {"LORAJOBS_OWNER_MAX_JOBS": "x=y"},
        {"LORAJOBS_OWNER_MAX_JOBS": "=3"},
        {"LORAJOBS_PRICES": "A100"},
        {"LORAJOBS_PRICES": "A=-1"},
        {"LORAJOBS_AUTOSCALE": "maybe"},
    ],
)
def test_bad_config_is_bad_input(env: dict[str, str]) -> None:
    with pytest.raises(InvalidInput):
        ControllerConfig.from_env(env)


def test_parse_limits() -> None:
    assert parse_limits("K", "4, acme=10 ,") == (4, {"acme": 10})
    assert parse_limits("K", None) == (None, {})


# ---- cost -----------------------------------------------------------------------------------


def test_rates_and_costs() -> None:
    prices = parse_prices("A100=1.29,H100=2.49,cpu=0.05")
    assert hourly_rate(prices, gpus=0.25, cpus=4, accelerator="A100") == pytest.approx(0.3225)
    assert hourly_rate(prices, gpus=0, cpus=4, accelerator=None) == pytest.approx(0.2)
    assert hourly_rate(prices, gpus=1, cpus=1, accelerator="L4") is None
    assert hourly_rate({**prices, "gpu": 1.0}, gpus=1, cpus=1, accelerator="L4") == 1.0
    assert attempt_cost(2.49, 1800) == pytest.approx(1.245)
    assert attempt_cost(None, 1800) is None


def test_estimates_say_what_they_are() -> None:
    prices = parse_prices("A100=1.29,H100=2.49,cpu=0.05")
    typed = estimate(prices, gpus=1, gpu_type="H100", cpus=4, max_runtime_s=7200)
    assert (typed.low_per_hour, typed.max_per_attempt) == (2.49, 4.98)
    assert typed.text() == "$2.49/h; at most $4.98 per attempt (max_runtime)"
    anyg = estimate(prices, gpus=1, gpu_type=None, cpus=4, max_runtime_s=None)
    assert (anyg.low_per_hour, anyg.high_per_hour) == (1.29, 2.49)
    assert "depending on the GPU type" in anyg.text() and "set max_runtime" in anyg.text()
    assert (
        estimate({}, gpus=1, gpu_type=None, cpus=1, max_runtime_s=None)
        .text()
        .startswith("no price configured")
    )


# ---- autoscaler -----------------------------------------------------------------------------


def test_one_bundle_per_job_active_first_cleared_when_nothing_is_queued() -> None:
    a100 = Shape(1, "A100", 4)
    quarter = Shape(0.25, None, 1)
    demand = [(quarter, True, 2), (a100, False, 1), (a100, True, 1)]
    got = bundles(demand)
    assert got == [
        a100.ray_resources(),
        a100.ray_resources(),
        quarter.ray_resources(),
        quarter.ray_resources(),
    ]
    assert bundles([(a100, False, 3)]) == []  # only running jobs: no request
    assert len(bundles([(quarter, True, 5000)])) == 2000


class _FakeRay:
    def __init__(self) -> None:
        self.sent: list[list[dict[str, float]]] = []

    def request_resources(self, b: list[dict[str, float]]) -> None:
        self.sent.append(b)


def test_autoscaler_sends_only_changes() -> None:
    ray, t = _FakeRay(), [0.0]
    a = Autoscaler(ray, every_s=2, clock=lambda: t[0])
    demand = [(Shape(1, None, 1), True, 2)]
    assert a.due() and a.update(demand) and not a.update(demand)
    assert not a.due()
    t[0] = 5
    assert a.due() and a.update([]) and ray.sent == [bundles(demand), []]


# ---- takeover -------------------------------------------------------------------------------


def _job(owner: str | None, expires: datetime | None) -> JobRecord:
    return JobRecord(
        id="abc123abc123",
        name="n",
        kind="text",
        owner="o",
        priority=0,
        status=JobStatus.running,
        spec={},
        output_uri="file:///b",
        idempotency_key=None,
        attempt=1,
        gpus=1,
        gpu_type=None,
        cpus=1,
        created_at=T0,
        updated_at=T0,
        dispatched_at=T0,
        started_at=T0,
        finished_at=None,
        failure_kind=None,
        failure_reason=None,
        cancel_requested=False,
        step=None,
        total_steps=None,
        loss=None,
        it_per_s=None,
        node=None,
        result=None,
        lease_owner=owner,
        lease_expires_at=expires,
    )


@pytest.mark.parametrize(
    "expired,alive,late,want",
    [
        (False, None, False, LIVE),
        (False, True, False, LIVE),
        (False, False, False, TAKE),  # its driver is dead: no need to wait for the lease
        (True, None, False, TAKE),
        (True, False, False, TAKE),
        (True, True, False, WAIT),
        (True, True, True, TAKE),
    ],
)
def test_takeover_verdicts(expired: bool, alive: bool | None, late: bool, want: str) -> None:
    owner = lease_owner("host-1-abc", "session_x/02000000")
    assert lease_driver(owner) == "session_x/02000000" and lease_driver("c1") is None
    expires = T0 - timedelta(seconds=100 if late else 1) if expired else T0 + timedelta(seconds=5)
    asked: list[str] = []

    def alive_fn(d: str) -> Any:
        asked.append(d)
        return alive

    assert verdict(_job(owner, expires), now=T0, grace_s=30, driver_alive=alive_fn) == want
    assert asked == ["session_x/02000000"]
    # A lease without a driver (older controllers, tests) goes by its expiry alone.
    assert verdict(_job("c1", expires), now=T0, grace_s=30, driver_alive=alive_fn) == (
        TAKE if expired else LIVE
    )


def test_preemption_fair_share_and_reservation_settings() -> None:
    c = ControllerConfig.from_env(
        {
            "LORAJOBS_PREEMPT_MARGIN": "2",
            "LORAJOBS_MIN_RUNTIME_BEFORE_PREEMPT_S": "30",
            "LORAJOBS_FAIRSHARE_SHARES": "2,acme=3,beta=0.5",
            "LORAJOBS_FAIRSHARE_HALFLIFE": "12h",
            "LORAJOBS_RESERVE": "off",
            "LORAJOBS_BACKFILL_SAFETY": "2",
        }
    )
    p = c.policy
    assert (p.preempt_margin, p.min_runtime_s, p.reserve, p.backfill_safety) == (2, 30, False, 2)
    assert (c.shares.of("acme"), c.shares.of("beta"), c.shares.of("zed")) == (3, 0.5, 2)
    assert c.halflife_s == 12 * 3600
    d = ControllerConfig.from_env({})
    assert (d.policy.preempt_margin, d.policy.min_runtime_s, d.halflife_s) == (1, 600, 7 * 86400)
    assert (
        ControllerConfig.from_env({"LORAJOBS_PREEMPT_MARGIN": "off"}).policy.preempt_margin is None
    )
    for key, bad in [
        ("LORAJOBS_FAIRSHARE_SHARES", "acme=0"),
        ("LORAJOBS_FAIRSHARE_SHARES", "acme=x"),
        ("LORAJOBS_FAIRSHARE_HALFLIFE", "soon"),
        ("LORAJOBS_RESERVE", "maybe"),
        ("LORAJOBS_PREEMPT_MARGIN", "0"),
    ]:
        with pytest.raises(InvalidInput, match=key):
            ControllerConfig.from_env({key: bad})
