"""Prices and cost: an estimate at submit, the actual figure per attempt. Pure.

Prices are dollars per GPU-hour by GPU type (Ray's accelerator type), plus `cpu` in dollars per
core-hour for CPU-only jobs: `LORAJOBS_PRICES="A100=1.29,H100=2.49,cpu=0.05"`. A fractional GPU
job pays its fraction. A `gpu` entry, if given, prices GPU types not listed.

What the figures are, honestly: the actual cost of an attempt is its wall time on the node (from
dispatch to its end, pulls and upload included) times the hourly rate of what it held; it ignores
idle node time, storage and egress. The estimate at submit knows no throughput: it is the hourly
rate, and with `max_runtime` set the most one attempt can cost.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lorajobs.jobspecs.failures import InvalidInput


def parse_prices(text: str | None) -> dict[str, float]:
    """`"A100=1.29,H100=2.49,cpu=0.05"` -> {"A100": 1.29, "H100": 2.49, "cpu": 0.05}."""
    prices: dict[str, float] = {}
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, value = item.partition("=")
        try:
            price = float(value)
        except ValueError:
            price = -1.0
        if not sep or not name.strip() or price < 0:
            raise InvalidInput(
                f"LORAJOBS_PRICES: {item!r} is not TYPE=DOLLARS_PER_HOUR (e.g. A100=1.29,cpu=0.05)"
            )
        prices[name.strip()] = price
    return prices


def hourly_rate(
    prices: Mapping[str, float], *, gpus: float, cpus: int, accelerator: str | None
) -> float | None:
    """Dollars per hour for what one attempt holds; None when no price applies."""
    if gpus > 0:
        per_gpu = prices.get(accelerator or "", prices.get("gpu"))
        return None if per_gpu is None else gpus * per_gpu
    per_cpu = prices.get("cpu")
    return None if per_cpu is None else cpus * per_cpu


def attempt_cost(rate: float | None, seconds: float) -> float | None:
    return None if rate is None else round(rate * max(0.0, seconds) / 3600.0, 6)


@dataclass(frozen=True)
class Estimate:
    """What a job will cost, as far as can be known before it runs."""

    low_per_hour: float | None  # cheapest GPU type it may land on
    high_per_hour: float | None  # dearest
    max_per_attempt: float | None  # high_per_hour x max_runtime, when max_runtime is set

    def text(self) -> str:
        if self.low_per_hour is None or self.high_per_hour is None:
            return "no price configured for this job's resources (LORAJOBS_PRICES)"
        rate = (
            f"${self.low_per_hour:.2f}/h"
            if abs(self.low_per_hour - self.high_per_hour) < 1e-9
            else f"${self.low_per_hour:.2f}-{self.high_per_hour:.2f}/h depending on the GPU type"
        )
        if self.max_per_attempt is None:
            return f"{rate} while it runs (set max_runtime to bound it)"
        return f"{rate}; at most ${self.max_per_attempt:.2f} per attempt (max_runtime)"

    def as_dict(self) -> dict[str, float | None]:
        return {
            "low_per_hour": self.low_per_hour,
            "high_per_hour": self.high_per_hour,
            "max_per_attempt": self.max_per_attempt,
        }


def record_so_far(cost: Any, seconds: float) -> None:
    """Write into an attempt's cost facts (`extra["cost"]`, which the sidecar records) what it
    has cost after `seconds`, and all attempts together; nothing without a price."""
    if isinstance(cost, dict) and cost.get("usd_per_hour") is not None:
        this = cost["usd_per_hour"] * seconds / 3600.0
        cost["this_attempt_usd"] = round(this, 6)
        cost["total_usd"] = round(this + (cost.get("earlier_attempts_usd") or 0.0), 6)


def estimate(
    prices: Mapping[str, float],
    *,
    gpus: float,
    gpu_type: str | None,
    cpus: int,
    max_runtime_s: float | None,
) -> Estimate:
    """The estimate shown at submit and in `show`."""
    if gpus > 0 and not gpu_type:
        types = [t for t in prices if t != "cpu"]
        rates = [
            r
            for t in types
            if (r := hourly_rate(prices, gpus=gpus, cpus=cpus, accelerator=t)) is not None
        ]
    else:
        rate = hourly_rate(prices, gpus=gpus, cpus=cpus, accelerator=gpu_type)
        rates = [rate] if rate is not None else []
    if not rates:
        return Estimate(None, None, None)
    low, high = min(rates), max(rates)
    worst = round(high * max_runtime_s / 3600.0, 4) if max_runtime_s else None
    return Estimate(low, high, worst)


def estimate_for(job: Any, prices: dict[str, float] | None = None) -> Estimate:
    """The cost estimate of a job record, under `prices` (default: `LORAJOBS_PRICES`)."""
    if prices is None:
        prices = parse_prices(os.environ.get("LORAJOBS_PRICES"))
    return estimate(
        prices, gpus=job.gpus, gpu_type=job.gpu_type, cpus=job.cpus, max_runtime_s=job.max_runtime_s
    )
