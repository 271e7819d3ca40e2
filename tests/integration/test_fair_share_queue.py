"""Fair share and reservations through the real queue (SQLite and PostgreSQL): the ledger is
charged as attempts end, the database reads candidates in the fair-share order the policy ranks
them in, a less served owner's newer job runs before a heavier owner's older one, and a 4-GPU
job at the head gets a reservation (its wait reason says so) while only a 1-GPU job that ends
before it is due starts on the reserved node."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import Engine, update

from lorajobs.jobspecs import parse_spec
from lorajobs.orchestrator import fairshare, waiting
from lorajobs.orchestrator.db import JOBS
from lorajobs.orchestrator.queue import Queue
from lorajobs.orchestrator.scheduler import Candidate, Hold, Policy, Round, node_views, ordered
from lorajobs.orchestrator.states import JobStatus

OUT = "file:///srv/bucket"
T0 = datetime(2030, 1, 1, tzinfo=timezone.utc)
HOUR = 3600.0


def spec(name: str, owner: str, gpus: float = 1, steps: int = 100, priority: int = 0) -> Any:
    return parse_spec(
        {
            "kind": "text",
            "name": name,
            "owner": owner,
            "priority": priority,
            "base_model": "m",
            "dataset": "d",
            "training": {"steps": steps, "batch_size": max(1, int(gpus))},  # a gang: one row each
            "resources": {"gpus": gpus},
        }
    )


def test_the_less_served_owner_runs_first_and_the_database_reads_in_fair_share_order(
    any_db_engine: Engine,
) -> None:
    clock = [T0]
    q = Queue(any_db_engine, clock=lambda: clock[0])

    def submit(name: str, owner: str) -> Any:
        clock[0] += timedelta(seconds=1)
        return q.submit(spec(name, owner), output_uri=OUT)[0]

    heavy = [submit(f"h{i}", "heavy") for i in range(3)]
    clock[0] = T0 + timedelta(minutes=5)
    light = [submit(f"l{i}", "light") for i in range(3)]
    shares = fairshare.Shares(per_owner={"heavy": 1, "light": 3})
    # heavy ran 2 GPU-hours, light 3: per share, heavy 2.0 and light 1.0.
    writer = q.scheduling._writer
    fairshare.account(writer, owner="heavy", gpus=2, seconds=HOUR, now=T0, halflife_s=7 * 86400)
    fairshare.account(writer, owner="light", gpus=1, seconds=3 * HOUR, now=T0, halflife_s=7 * 86400)
    now = clock[0]
    with q.engine.connect() as conn:
        ledger = fairshare.load(conn)
    fair = fairshare.factors(ledger, [], shares, now, 7 * 86400)
    # (decayed over the 5 minutes since, with a 7-day half-life)
    assert abs(fair["heavy"] - 2.0) < 1e-3 and abs(fair["light"] - 1.0) < 1e-3
    offered: list[Candidate] = []
    rounds: list[Round] = []

    def start(holds: list[Hold]) -> Round:
        nodes = node_views({"n1": {"CPU": 8.0, "GPU": 2.0}}, holds)
        rounds.append(Round(nodes, holds, Policy(aging_s=600), now, fair=fair))
        real = rounds[-1].offer

        def record(cands: list[Candidate]) -> Any:
            offered.extend(cands)
            return real(cands)

        rounds[-1].offer = record  # type: ignore[method-assign]
        return rounds[-1]

    got = q.scheduling.schedule(
        start, per_class=8, aging_s=600, lease_owner="me", lease_expires_at=now, page_size=2
    )
    # Newer jobs of the less served owner first (FIFO would have taken heavy's).
    assert [j.id for j in got] == [light[0].id, light[1].id]
    assert [c.id for c in offered] == [c.id for c in ordered(offered, now, 600, fair)]
    assert [c.id for c in offered][:2] == [light[0].id, light[1].id]
    assert heavy[0].id in {c.id for c in offered}
    factor = rounds[0].plan.placements[0].data["fair_share_factor"]  # type: ignore[index]
    assert abs(factor - 1.0) < 1e-3
    # `lorajobs usage`'s rows: decayed hours, share, factor.
    rows = {u.owner: u for u in fairshare.report(q.engine, shares, 7 * 86400, now)}
    # light's two jobs now run with no progress reported: an hour ahead each, over share 3.
    assert rows["light"].share == 3.0 and abs(rows["light"].factor - (1.0 + 2 / 3)) < 1e-3


def test_a_4_gpu_job_at_the_head_is_reserved_and_only_short_jobs_backfill(
    any_db_engine: Engine,
) -> None:
    clock = [T0]
    q = Queue(any_db_engine, clock=lambda: clock[0])
    running = [q.submit(spec(f"r{i}", "o"), output_uri=OUT)[0] for i in range(4)]
    for i, job in enumerate(running):  # 4 of 8 GPUs busy; ends known from reported speed
        q.dispatch(job.id, lease_owner="me", node_id="n1")
        with q.engine.begin() as conn:
            conn.execute(
                update(JOBS)
                .where(JOBS.c.id == job.id)
                .values(step=0, total_steps=100, it_per_s=100 / (600 * (i + 1)))
            )
    other = q.submit(spec("other", "o"), output_uri=OUT)[0]
    q.dispatch(other.id, lease_owner="me", node_id="n2")  # node n2 (1 GPU) is full
    clock[0] = T0 + timedelta(seconds=1)
    big = q.submit(spec("big", "o", gpus=8), output_uri=OUT)[0]
    clock[0] = T0 + timedelta(seconds=2)
    # Their shape was measured at 1 s per step: 5000 s and 100 s (x 1.5 safety).
    long_job = q.submit(spec("long", "o", steps=5000), output_uri=OUT)[0]
    short = q.submit(spec("short", "o", steps=100), output_uri=OUT)[0]
    ledger = fairshare.Ledger(speeds={fairshare.shape_key(short.spec, 1, None): 1.0})
    now = clock[0]
    rounds: list[Round] = []

    def estimate(c: Candidate) -> float | None:
        return fairshare.estimate_s(ledger, q.get(c.id).spec, c.gpus, c.gpu_type)

    def start(holds: list[Hold]) -> Round:
        totals = {"n1": {"CPU": 16.0, "GPU": 8.0}, "n2": {"CPU": 16.0, "GPU": 1.0}}
        nodes = node_views(totals, holds)
        rounds.append(Round(nodes, holds, Policy(aging_s=0), now, estimate=estimate))
        return rounds[-1]

    got = q.scheduling.schedule(
        start, per_class=8, aging_s=0, lease_owner="me", lease_expires_at=now
    )
    rnd = rounds[0]
    (res,) = rnd.reservations.values()
    assert (res.job_id, res.node_id) == (big.id, "n1")
    # Due when the last of the four running jobs ends (2400 s), as their speed says.
    assert abs((res.at - now).total_seconds() - 2400) < 5
    # The short job (150 s) backfills; the long one (7500 s) would delay the big one: not.
    assert [j.id for j in got] == [short.id]
    summary = waiting.summarize(rnd, now)
    why_big = waiting.reason(q.get(big.id), summary, now)
    why_long = waiting.reason(q.get(long_job.id), summary, now)
    assert why_big and "node n1 is reserved for it, due by" in why_big
    assert why_long and f"reserved for job {big.id}" in why_long


def test_running_attempts_count_as_they_run_once_per_pack_and_usage_shows_what_rounds_rank_by(
    any_db_engine: Engine,
) -> None:
    """A running attempt's GPU-hours so far count in its owner's factor before it ends (Slurm
    charges running jobs as they run); a pack's GPUs count once, as its first job's; ending
    charges the ledger with what ran (a pack member its part), so nothing is counted twice; and
    `lorajobs usage` (`fairshare.report`) shows the factors the round ranks by."""
    clock = [T0]
    q = Queue(any_db_engine, clock=lambda: clock[0])
    shares = fairshare.Shares()
    busy = q.submit(spec("busy", "busy", gpus=2), output_uri=OUT)[0]
    lead = q.submit(spec("lead", "packer"), output_uri=OUT)[0]
    member = q.submit(spec("member", "packer"), output_uri=OUT)[0]
    for job in (busy, lead, member):
        q.dispatch(job.id, lease_owner="me", node_id="n1")
    with q.engine.begin() as conn:  # member shares lead's attempt (orchestrator/packing.py)
        conn.execute(
            update(JOBS).where(JOBS.c.id.in_((lead.id, member.id))).values(pack_id=lead.id)
        )
    q.submit(spec("wb", "busy"), output_uri=OUT)  # older: FIFO alone would pick it
    clock[0] = T0 + timedelta(hours=1)
    waiter_packer = q.submit(spec("wp", "packer"), output_uri=OUT)[0]
    now = clock[0]
    rounds: list[Round] = []

    def start(holds: list[Hold]) -> Round:
        fair = fairshare.factors(fairshare.Ledger(), holds, shares, now, 7 * 86400)
        nodes = node_views({"n1": {"CPU": 16.0, "GPU": 4.0}}, holds)
        rounds.append(Round(nodes, holds, Policy(aging_s=0), now, fair=fair))
        return rounds[-1]

    got = q.scheduling.schedule(start, per_class=8, aging_s=0, lease_owner="me",
                                lease_expires_at=now)  # fmt: skip
    # One GPU free: busy has run 2 GPU-hours, packer 1 (its pack once): packer's newer job wins.
    assert [j.id for j in got] == [waiter_packer.id]
    # The factors also count what the running attempts will still run: an hour ahead of each
    # GPU while they report no progress (busy 2 + 2, packer 1 + 1).
    assert rounds[0].fair == {"busy": 4.0, "packer": 2.0}
    shown = {u.owner: u.gpu_hours for u in fairshare.report(q.engine, shares, 7 * 86400, now)}
    assert shown == {"busy": 2.0, "packer": 1.0}  # the just dispatched job has run 0 s
    # The pack ends: each member charged its part (half each), busy its 2 GPU x 1 h.
    writer = q.scheduling._writer
    for job, part in ((lead, 0.5), (member, 0.5), (busy, 1.0)):
        fairshare.attempt_ended(writer, q.get(job.id), False, now=now, halflife_s=7 * 86400,
                                part=part)  # fmt: skip
        q.transition(job.id, expected=q.get(job.id).status, to=JobStatus.failed, reason="end")
    shown = {u.owner: u.gpu_hours for u in fairshare.report(q.engine, shares, 7 * 86400, now)}
    assert {o: round(h, 6) for o, h in shown.items()} == {"busy": 2.0, "packer": 1.0}
