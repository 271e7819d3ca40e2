"""Fair share: each owner's GPU-hours, decayed with a half-life and divided by the owner's share.

Within one priority level the scheduler runs the jobs of the owner with the lowest factor first
(`scheduler.rank_key`), so owners that are all backlogged get GPU-hours in the ratio of their
shares over time, and an owner that used little lately goes first. A factor is

    (decayed GPU-hours of ended attempts + running attempts' GPU-hours so far
     + what they will still run) / share

where what a running attempt will still run is its GPUs x its time left by its progress (an
hour, `AHEAD_S`, while it reports none). Counting it at once is what keeps an owner that just
got the free GPUs from looking under-served, and getting the next ones too, for the whole
time its usage takes to catch up with what it holds.

with `LORAJOBS_FAIRSHARE_HALFLIFE` (default 7 days) and shares from `LORAJOBS_FAIRSHARE_SHARES`
(`acme=3,beta=1`; a bare number is everyone else's share, default 1).

The ledger is one `scheduler_state` row (`usage`): per owner, GPU-hours decayed to a time, and
per job shape the measured seconds per step (what reservations estimate run times from). It is
written when an attempt ends (`account`), read once per scheduling round (`load`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from lorajobs.orchestrator.resources import Hold
from lorajobs.orchestrator.shares import Shares

if TYPE_CHECKING:
    from sqlalchemy import Connection, Engine

    from lorajobs.orchestrator.records import JobRecord

log = logging.getLogger("lorajobs.controller")

ROW = "usage"
#: Seconds a running attempt that reports no progress yet is expected still to run.
AHEAD_S = 3600.0
#: Weight of the newest measurement in a shape's seconds per step.
SPEED_WEIGHT = 0.3


def decayed(value: float, since: datetime, now: datetime, halflife_s: float) -> float:
    """`value` as of `since`, decayed to `now` (halved every `halflife_s`)."""
    dt = max(0.0, (now - since).total_seconds())
    return value * 0.5 ** (dt / halflife_s) if halflife_s > 0 else value


@dataclass
class Ledger:
    """Decayed GPU-hours per owner (value, as of) and seconds per step per shape key."""

    usage: dict[str, tuple[float, datetime]] = field(default_factory=dict)
    speeds: dict[str, float] = field(default_factory=dict)

    def gpu_hours(self, owner: str, now: datetime, halflife_s: float) -> float:
        value, at = self.usage.get(owner, (0.0, now))
        return decayed(value, at, now, halflife_s)

    def charge(self, owner: str, gpu_hours: float, now: datetime, halflife_s: float) -> None:
        self.usage[owner] = (self.gpu_hours(owner, now, halflife_s) + gpu_hours, now)

    def measure(self, key: str, seconds_per_step: float) -> None:
        old = self.speeds.get(key)
        new = seconds_per_step if old is None else old + SPEED_WEIGHT * (seconds_per_step - old)
        self.speeds[key] = new

    def to_json(self) -> str:
        usage = {
            o: [v, at.astimezone(timezone.utc).isoformat()] for o, (v, at) in self.usage.items()
        }
        return json.dumps({"usage": usage, "speeds": self.speeds}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> Ledger:
        data: dict[str, Any] = json.loads(text) if text else {}
        usage = {
            o: (float(v), datetime.fromisoformat(at))
            for o, (v, at) in data.get("usage", {}).items()
        }
        return cls(usage, {k: float(v) for k, v in data.get("speeds", {}).items()})


@dataclass(frozen=True)
class OwnerUsage:
    """One row of `lorajobs usage`."""

    owner: str
    gpu_hours: float
    share: float
    factor: float


def usage(
    ledger: Ledger, running: Iterable[Hold], shares: Shares, now: datetime, halflife_s: float
) -> list[OwnerUsage]:
    """Every owner's decayed GPU-hours (running attempts' so far included), share and factor
    (which also counts what running attempts will still run)."""
    hours = {o: ledger.gpu_hours(o, now, halflife_s) for o in ledger.usage}
    ahead: dict[str, float] = {}
    for h in running:
        if h.started_at is not None:
            ran = max(0.0, (now - h.started_at).total_seconds())
            hours[h.owner] = hours.get(h.owner, 0.0) + h.gpus * ran / 3600.0
        left = AHEAD_S if h.ends_at is None else max(0.0, (h.ends_at - now).total_seconds())
        ahead[h.owner] = ahead.get(h.owner, 0.0) + h.gpus * left / 3600.0
    rows = []
    for owner, value in sorted(hours.items()):
        share = shares.of(owner)
        factor = (value + ahead.get(owner, 0.0)) / share if share > 0 else float("inf")
        rows.append(OwnerUsage(owner, value, share, factor))
    return rows


def factors(
    ledger: Ledger, running: Iterable[Hold], shares: Shares, now: datetime, halflife_s: float
) -> dict[str, float]:
    """Owner -> factor (owners with no usage are absent: factor 0)."""
    return {u.owner: u.factor for u in usage(ledger, running, shares, now, halflife_s)}


def shape_key(spec: Mapping[str, Any], gpus: float, gpu_type: str | None) -> str:
    """What seconds per step are measured for: the trainer kind, base model and resources."""
    return f"{spec.get('kind')}|{spec.get('base_model')}|{gpus:g}|{gpu_type or ''}"


def estimate_s(
    ledger: Ledger, spec: Mapping[str, Any], gpus: float, gpu_type: str | None
) -> float | None:
    """Seconds a job is expected to run: its steps x the measured seconds per step of its
    shape (None: no steps in the spec, or the shape never ran)."""
    steps = (spec.get("training") or {}).get("steps")
    speed = ledger.speeds.get(shape_key(spec, gpus, gpu_type))
    return None if not steps or speed is None else float(steps) * speed


# -- the stored ledger ------------------------------------------------------------------------


def load(conn: Connection) -> Ledger:
    """The ledger as stored (empty when nothing was accounted yet)."""
    from sqlalchemy import select

    from lorajobs.orchestrator.db import SCHEDULER_STATE

    row = conn.execute(select(SCHEDULER_STATE.c.data).where(SCHEDULER_STATE.c.name == ROW)).first()
    return Ledger.from_json(row.data if row is not None else None)


def account(
    writer: Engine,
    *,
    owner: str,
    gpus: float,
    seconds: float,
    now: datetime,
    halflife_s: float,
    speed: tuple[str, float] | None = None,
) -> None:
    """Add an ended attempt to the ledger: `gpus` x `seconds` to its owner, and its measured
    seconds per step (`(shape key, seconds per step)`) to its shape. One read-modify-write,
    the row locked on PostgreSQL so that two controllers never lose each other's charge."""
    from sqlalchemy import select

    from lorajobs.orchestrator.db import SCHEDULER_STATE

    postgres = writer.dialect.name == "postgresql"
    if postgres:
        from sqlalchemy.dialects.postgresql import insert as upsert
    else:
        from sqlalchemy.dialects.sqlite import insert as upsert
    with writer.begin() as conn:
        seed = upsert(SCHEDULER_STATE).values(name=ROW, updated_at=now, data="{}")
        conn.execute(seed.on_conflict_do_nothing(index_elements=[SCHEDULER_STATE.c.name]))
        query = select(SCHEDULER_STATE.c.data).where(SCHEDULER_STATE.c.name == ROW)
        ledger = Ledger.from_json(
            conn.execute(query.with_for_update() if postgres else query).scalar_one()
        )
        ledger.charge(owner, gpus * max(0.0, seconds) / 3600.0, now, halflife_s)
        if speed is not None and speed[1] > 0:
            ledger.measure(*speed)
        conn.execute(
            SCHEDULER_STATE.update()
            .where(SCHEDULER_STATE.c.name == ROW)
            .values(updated_at=now, data=ledger.to_json())
        )


def attempt_ended(
    writer: Engine,
    job: JobRecord,
    succeeded: bool,
    *,
    now: datetime,
    halflife_s: float,
    part: float = 1.0,
) -> None:
    """Charge an ended attempt's GPU-hours to its owner; a success also measures its shape's
    seconds per step (from its last reported speed). Never raises: bookkeeping only.

    `part`: the job's part of a pack's attempt (its cost share). While a pack runs, its GPUs
    count once, as its first job's hold; as each member ends it is charged its part, so the
    pack's GPU-hours are charged once in all (not once per member)."""
    started = job.dispatched_at
    if started is not None and started.tzinfo is None:
        started = started.replace(tzinfo=timezone.utc)
    seconds = (now - started).total_seconds() * part if started else 0.0
    speed = None
    if succeeded and job.it_per_s:
        speed = (shape_key(job.spec, job.gpus, job.gpu_type), 1.0 / job.it_per_s)
    try:
        account(
            writer, owner=job.owner, gpus=job.gpus, seconds=seconds, now=now,
            halflife_s=halflife_s, speed=speed,
        )  # fmt: skip
    except Exception as err:  # noqa: BLE001 - the attempt is recorded already
        log.warning("job %s: could not account its GPU-hours: %s", job.id, err)


def report(
    engine: Engine, shares: Shares, halflife_s: float, now: datetime, owner: str | None = None
) -> list[OwnerUsage]:
    """What `lorajobs usage` and `GET /v1/usage` show: every owner's (or one's) decayed
    GPU-hours, running attempts included, share and factor, as the scheduler ranks them now."""
    from lorajobs.orchestrator.scheduling import active_holds

    with engine.connect() as conn:
        ledger = load(conn)
        running = active_holds(conn, now)
    rows_out = usage(ledger, running, shares, now, halflife_s)
    return [u for u in rows_out if owner is None or u.owner == owner]


def halflife_text(seconds: float) -> str:
    """`7d`, `12h`: how `lorajobs usage` names the half-life."""
    td = timedelta(seconds=seconds)
    return f"{td.days}d" if td.days and not td.seconds else f"{seconds / 3600:g}h"
