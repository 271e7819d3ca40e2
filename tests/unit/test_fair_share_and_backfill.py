"""Fair share, reservations with backfill and the preemption choice, driven through the real
scheduling round (`scheduler.Round`) with simulated time (`tests.plugins.simsched`)."""

from __future__ import annotations

from datetime import timedelta

from lorajobs.orchestrator.fairshare import Ledger, Shares, decayed, factors, usage
from lorajobs.orchestrator.scheduler import Candidate, Hold, Policy, Round, node_views
from tests.plugins.simsched import T0, Sim, SimJob

NOPREEMPT = Policy(aging_s=0, preempt_margin=None)


def test_two_backlogged_owners_with_shares_1_to_3_get_gpu_hours_approaching_1_to_3() -> None:
    # Both owners submit the same backlog at once: 400 one-hour 1-GPU jobs each on 8 GPUs.
    jobs = [
        SimJob(f"{o}{i}", o, 0, 1, arrival_s=0.0, work_s=3600.0)
        for i in range(400)
        for o in ("a", "b")
    ]
    shares = Shares(per_owner={"a": 1, "b": 3})
    sim = Sim(jobs, NOPREEMPT, nodes=1, gpus_per_node=8, shares=shares, tick_s=600.0)
    ratios = []
    for hours in (6, 12, 24, 48):
        sim.run(until_s=hours * 3600.0)
        used = sim.gpu_seconds(0.0, sim.now_s)
        ratios.append(used["b"] / used["a"])
    assert sim.queued  # still backlogged (both owners) at the last look
    assert {j.owner for j in sim.queued.values()} == {"a", "b"}
    # 1:3 from the first round on (the owners take turns by share within it), then within 5%.
    assert all(abs(r - 3.0) / 3.0 < 0.05 for r in ratios), ratios


def test_one_round_on_a_fresh_cluster_splits_the_gpus_by_share_not_by_who_came_first() -> None:
    # Every owner at 0: a factor fixed at the round's start would give all 16 GPUs to o1, whose
    # jobs are oldest. Each placement counts in its owner's factor for the rest of the round.
    shares = Shares(per_owner={"o1": 1, "o2": 1, "o3": 2, "o4": 4})
    jobs = [
        Candidate(f"{o}-{i}", o, 0, T0 + timedelta(seconds=k * 100 + i), 1, None, 1)
        for k, o in enumerate(("o1", "o2", "o3", "o4"))
        for i in range(16)
    ]
    nodes = node_views({"n": {"CPU": 64.0, "GPU": 16.0}}, [])
    rnd = Round(nodes, [], NOPREEMPT, T0, fair={}, shares=shares)
    rnd.offer(jobs)
    got: dict[str, int] = {}
    for p in rnd.plan.placements:
        got[p.job_id.split("-")[0]] = got.get(p.job_id.split("-")[0], 0) + 1
    assert got == {"o1": 2, "o2": 2, "o3": 4, "o4": 8}
    # Within one owner, still oldest first; a higher priority level still goes before all.
    assert [p.job_id for p in rnd.plan.placements if p.job_id.startswith("o4")] == [
        f"o4-{i}" for i in range(8)
    ]
    urgent = Candidate("o4-urgent", "o4", 1, T0 + timedelta(hours=1), 1, None, 1)
    rnd = Round(node_views({"n": {"CPU": 64.0, "GPU": 2.0}}, []), [], NOPREEMPT, T0,
                fair={}, shares=shares)  # fmt: skip
    rnd.offer([*jobs, urgent])
    assert [p.job_id for p in rnd.plan.placements] == ["o4-urgent", "o1-0"]


def test_without_shares_the_less_served_owner_goes_first_within_a_priority() -> None:
    ledger = Ledger()
    ledger.charge("heavy", 10.0, T0, 3600.0)
    fair = factors(ledger, [], Shares(), T0, 3600.0)
    nodes = node_views({"n": {"CPU": 8.0, "GPU": 1.0}}, [])
    old_heavy = Candidate("h", "heavy", 0, T0 - timedelta(hours=1), 1, None, 1)
    new_light = Candidate("l", "light", 0, T0, 1, None, 1)
    top = Candidate("t", "heavy", 1, T0, 1, None, 1)
    rnd = Round(nodes, [], NOPREEMPT, T0, fair=fair)
    rnd.offer([old_heavy, new_light, top])
    # Priority first, then fair share before FIFO.
    assert [p.job_id for p in rnd.plan.placements] == ["t"]
    rnd = Round(node_views({"n": {"CPU": 8.0, "GPU": 1.0}}, []), [], NOPREEMPT, T0, fair=fair)
    rnd.offer([old_heavy, new_light])
    assert [p.job_id for p in rnd.plan.placements] == ["l"]


def test_usage_decays_with_the_half_life_and_counts_running_jobs() -> None:
    ledger = Ledger()
    ledger.charge("a", 8.0, T0, 3600.0)
    later = T0 + timedelta(hours=2)
    assert abs(decayed(8.0, T0, later, 3600.0) - 2.0) < 1e-9
    # A running attempt counts what it ran (2 GPUs x 1 h) and, in the factor, what it will
    # still run: by its progress (30 min left), or an hour while it reports none.
    ran = later - timedelta(hours=1)
    running = [Hold("r", "a", "n", 2, 1, started_at=ran, ends_at=later + timedelta(minutes=30))]
    (row,) = usage(ledger, running, Shares(per_owner={"a": 4}), later, 3600.0)
    assert (round(row.gpu_hours, 6), row.share, round(row.factor, 6)) == (4.0, 4.0, 1.25)
    (row,) = usage(ledger, [Hold("r", "a", "n", 2, 1, started_at=ran)], Shares(), later, 3600.0)
    assert (round(row.gpu_hours, 6), round(row.factor, 6)) == (4.0, 6.0)


def test_a_4_gpu_job_starts_within_its_reservation_while_1_gpu_jobs_backfill() -> None:
    """One 8-GPU node busy with 1-GPU jobs of staggered lengths, a 4-GPU job at the head and a
    stream of 1-GPU jobs behind it: without a reservation the 1-GPU jobs keep taking every GPU
    that frees up; with one, the 4-GPU job starts by the time it was promised, and short 1-GPU
    jobs still start on the node meanwhile (backfill)."""

    def trace() -> list[SimJob]:
        jobs = [SimJob(f"run{i}", "o", 0, 1, 0.0, 600.0 * (i + 1)) for i in range(8)]
        jobs.append(SimJob("big", "o", 0, 4, 1.0, 3600.0))
        # After it: long ones (would delay it) and short ones (end before it is due).
        jobs += [SimJob(f"long{i}", "o", 0, 1, 2.0 + i, 20000.0) for i in range(20)]
        jobs += [SimJob(f"short{i}", "o", 0, 1, 30.0 + i, 300.0) for i in range(6)]
        return jobs

    with_res = Sim(trace(), NOPREEMPT, nodes=1, gpus_per_node=8, tick_s=30.0)
    with_res.run()
    big = with_res.jobs["big"]
    assert big.reserved, "the 4-GPU job was never given a reservation"
    first_due = big.reserved[0][1]
    assert big.first_start_s is not None and big.first_start_s <= first_due + 1e-6
    # Short 1-GPU jobs backfilled: they started before the 4-GPU job, on the reserved node.
    backfilled = [j for j in with_res.jobs.values() if j.id.startswith("short")]
    assert all(
        j.first_start_s is not None and j.first_start_s < big.first_start_s for j in backfilled
    )
    # ... long ones did not jump it.
    longs = [j for j in with_res.jobs.values() if j.id.startswith("long")]
    assert all(j.first_start_s >= big.first_start_s for j in longs)  # type: ignore[operator]

    off = Sim(trace(), Policy(aging_s=0, preempt_margin=None, reserve=False), nodes=1,
              gpus_per_node=8, tick_s=30.0)  # fmt: skip
    off.run()
    assert off.jobs["big"].first_start_s > 20000.0  # type: ignore[operator]


def test_preemption_waits_for_the_window_never_twice_within_it_and_picks_the_cheapest() -> None:
    policy = Policy(aging_s=0, preempt_margin=1, min_runtime_s=600.0)
    totals = {"n1": {"CPU": 8.0, "GPU": 2.0}, "n2": {"CPU": 8.0, "GPU": 1.0}}
    started = T0 - timedelta(seconds=900)

    def hold(jid: str, node: str, prio: int, gpus: float = 1, **kw) -> Hold:  # type: ignore[no-untyped-def]
        return Hold(jid, "o", node, gpus, 1, None, prio, kw.pop("started", started), **kw)

    urgent = Candidate("u", "o", 5, T0, 1, None, 1)
    # Too young, equal priority within the margin, and asked to stop 5 min ago: none eligible.
    holds = [
        hold("young", "n2", 0, started=T0 - timedelta(seconds=300)),
        hold("peer", "n1", 5, gpus=2),
    ]
    rnd = Round(node_views(totals, holds), holds, policy, T0)
    rnd.offer([urgent])
    assert rnd.preempt.decisions == []
    assert rnd.reservation is None  # the running jobs' ends are unknown: none can be promised
    recent = [hold("again", "n2", 0, preempt_at=T0 - timedelta(seconds=300)), holds[1]]
    rnd = Round(node_views(totals, recent), recent, policy, T0)
    rnd.offer([urgent])
    assert rnd.preempt.decisions == []
    # Old enough: the cheapest (lowest priority, fewest GPUs) is stopped, only one.
    holds = [hold("mid", "n1", 3), hold("low", "n1", 1), hold("low2", "n2", 1)]
    rnd = Round(node_views(totals, holds), holds, policy, T0)
    second = Candidate("u2", "o", 5, T0 + timedelta(seconds=1), 1, None, 1)
    rnd.offer([urgent, second])
    assert [d.victims for d in rnd.preempt.decisions] == [("low",), ("low2",)]
    assert "preempting low (priority 1)" in rnd.plan.waiting["u"]
    # Next round: they are checkpointing; their GPUs are claimed, nobody else is stopped.
    holds = [hold("mid", "n1", 3), hold("low", "n1", 1, preempting=True),
             hold("low2", "n2", 1, preempting=True)]  # fmt: skip
    rnd = Round(node_views(totals, holds), holds, policy, T0)
    rnd.offer([urgent, second])
    assert rnd.preempt.decisions == []
    assert all("to checkpoint and stop" in rnd.plan.waiting[j] for j in ("u", "u2"))
