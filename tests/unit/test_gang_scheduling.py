"""Gangs in preemption and reservation (pure policy, `scheduler.Round`): a high priority gang
preempts lower priority jobs on `nodes` distinct nodes, all or none; a running gang may be a
victim; a gang at the head reserves its nodes so that only jobs that end before it is due start
there; and, with simulated time (`tests.plugins.simsched`), such a gang starts when promised."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from lorajobs.orchestrator import backfill
from lorajobs.orchestrator.scheduler import Candidate, Hold, Policy, Round, node_views
from tests.plugins.simsched import Sim, SimJob

T0 = datetime(2030, 1, 1, tzinfo=timezone.utc)
POLICY = Policy(aging_s=0, preempt_margin=1, min_runtime_s=600.0)
OLD = T0 - timedelta(hours=1)  # started long enough ago to be preempted
TOTALS = {n: {"CPU": 16.0, "GPU": 8.0} for n in ("a", "b", "c")}


def ones(node: str, count: int, prio: int, *, first: int = 0, **kw: object) -> list[Hold]:
    """`count` running 1-GPU jobs of priority `prio` on `node`."""
    return [
        Hold(f"{node}{first + i}", "o", node, 1, 1, None, prio, OLD, **kw)  # type: ignore[arg-type]
        for i in range(count)
    ]


def gang(jid: str = "g", prio: int = 5, nodes: int = 2, gpus: int = 8) -> Candidate:
    return Candidate(jid, "o", prio, T0, gpus, None, 1, nodes=nodes)


def run(holds: list[Hold], *cands: Candidate, policy: Policy = POLICY) -> Round:
    rnd = Round(node_views(TOTALS, holds), holds, policy, T0)
    rnd.offer(list(cands))
    return rnd


def test_a_high_priority_gang_preempts_on_enough_distinct_nodes_at_once() -> None:
    # a: full of low priority work; b: 2 GPUs free, 6 low priority; c: full of peers (priority
    # 5, within the margin). The 2 x 4-GPU gang needs 4 on a and 2 on b stopped.
    holds = ones("a", 8, 0) + ones("b", 6, 0) + ones("c", 8, 5)
    rnd = run(holds, gang())
    stopped = {d.node_id: len(d.victims) for d in rnd.preempt.decisions}
    assert stopped == {"a": 4, "b": 2}
    assert all(d.job_id == "g" for d in rnd.preempt.decisions)
    why = rnd.plan.waiting["g"]
    assert "for a gang on nodes b, a" in why and "a3 (priority 0)" in why  # fewest victims first
    assert rnd.plan.placements == []


def test_a_gang_preempts_nothing_unless_all_its_nodes_can_be_had() -> None:
    # Only a has lower priority jobs to stop: one node of two is not enough, so none is stopped.
    holds = ones("a", 8, 0) + ones("b", 8, 5) + ones("c", 8, 9)
    rnd = run(holds, gang())
    assert rnd.preempt.decisions == []
    assert "a gang" in rnd.plan.waiting["g"]


def test_the_gang_then_waits_for_its_victims_and_nothing_else_takes_their_room() -> None:
    holds = ones("a", 4, 0, preempting=True) + ones("a", 4, 0, first=4)
    holds += ones("b", 2, 0, preempting=True) + ones("b", 4, 0, first=2) + ones("c", 8, 5)
    small = Candidate("s", "o", 0, T0, 1, None, 1)  # would fit in what the victims give back
    rnd = run(holds, gang(), small)
    assert rnd.preempt.decisions == []  # no new victims: the first ones are on their way
    assert rnd.plan.waiting["g"].startswith("waiting for preempted jobs on nodes a, b")
    assert "s" not in {p.job_id for p in rnd.plan.placements}
    assert rnd.plan.placements == []
    # Once they have ended, the gang is placed on two nodes in one round.
    rnd = run(ones("a", 4, 0, first=4) + ones("b", 4, 0, first=2) + ones("c", 8, 5), gang())
    (p,) = rnd.plan.placements
    assert sorted(p.data["gang_nodes"]) == ["a", "b"]  # type: ignore[index]


def test_a_running_gang_may_be_a_victim_and_gives_back_all_its_nodes() -> None:
    # A 2 x 8-GPU gang of priority 0 holds a and b; c runs peers. A priority 5 job that fits
    # nowhere stops the gang (SIGTERM reaches all its ranks: they checkpoint together).
    holds = [Hold("low", "o", "a", 16, 1, None, 0, OLD, nodes=2, gang_nodes=("a", "b"))]
    holds += ones("c", 8, 5)
    rnd = run(holds, Candidate("u", "o", 5, T0, 1, None, 1))
    assert [(d.node_id, d.victims) for d in rnd.preempt.decisions] == [("a", ("low",))]
    # Once it is stopping, both of its nodes count as on their way back: an 8-GPU job waits
    # for b rather than stop anything else.
    stopping = [Hold("low", "o", "a", 16, 1, None, 0, OLD, nodes=2, gang_nodes=("a", "b"),
                     preempting=True)]  # fmt: skip
    rnd = run(stopping + ones("c", 8, 5), Candidate("u", "o", 5, T0, 1, None, 1), Candidate(
        "v", "o", 5, T0, 8, None, 1))  # fmt: skip
    assert rnd.preempt.decisions == []
    one_node = [Hold("low", "o", "a", 8, 1, None, 0, OLD)]  # `gpus: 8` on one node: a gang too
    rnd = run(one_node + ones("b", 8, 5) + ones("c", 8, 5), Candidate("u", "o", 5, T0, 8, None, 1))
    assert [(d.node_id, d.victims) for d in rnd.preempt.decisions] == [("a", ("low",))]


def test_a_running_gang_is_a_candidate_victim_on_each_of_its_nodes_and_stopped_once() -> None:
    low = [Hold("low", "o", "a", 16, 1, None, 0, OLD, nodes=2, gang_nodes=("a", "b"))]
    # A high priority 2-node gang: the low gang frees both a and b; it is stopped once.
    rnd = run(low + ones("c", 8, 5), gang("g", 5, nodes=2, gpus=16))
    assert [(d.node_id, d.victims) for d in rnd.preempt.decisions] == [("a", ("low",))]
    assert rnd.plan.waiting["g"].startswith("preempting low (priority 0) for a gang on nodes a, b")
    # The gang's first node is out of the round (draining): on b it is still a victim.
    holds = low + ones("c", 8, 5)
    totals = {n: TOTALS[n] for n in ("b", "c")}
    rnd = Round(node_views(totals, holds), holds, POLICY, T0)
    rnd.offer([Candidate("u", "o", 5, T0, 1, None, 1)])
    assert [(d.node_id, d.victims) for d in rnd.preempt.decisions] == [("b", ("low",))]


def test_a_gang_at_the_head_reserves_its_nodes_and_only_short_jobs_backfill_there() -> None:
    # Ends known: a's jobs end at 1..8 min, b's at 10..80 min, c's at 100..800 min. The 2 x
    # 8-GPU gang fits a and b first: both reserved, due when b empties (80 min).
    holds = []
    for node, unit in (("a", 60), ("b", 600), ("c", 6000)):
        holds += [
            Hold(f"{node}{i}", "o", node, 1, 1, None, 5, T0, T0 + timedelta(seconds=unit * (i + 1)))
            for i in range(8)
        ]
    holds = [h for h in holds if h.id not in ("a7", "b7", "c7")]  # one GPU free on each
    nopre = Policy(aging_s=0, preempt_margin=None)
    short = Candidate("short", "o", 0, T0, 1, None, 1, est_s=600.0)
    long_ = Candidate("long", "o", 0, T0, 1, None, 1, est_s=20000.0)
    rnd = Round(node_views(TOTALS, holds), holds, nopre, T0)
    rnd.offer([gang(prio=0, gpus=16), long_, short])
    assert set(rnd.reservations) == {"a", "b"}
    due = {r.at for r in rnd.reservations.values()}
    assert due == {T0 + timedelta(seconds=600 * 7)}  # b's last (7th) job ends at 70 min
    assert "nodes a, b are reserved for it" in rnd.plan.waiting["g"]
    placed = {p.job_id: p.node_id for p in rnd.plan.placements}
    # The long job keeps off the reserved nodes (c is free for it); the short one backfills.
    assert placed["long"] == "c"
    assert placed["short"] in ("a", "b")
    assert "ends before job g's reservation" in next(
        p.data["backfill"]  # type: ignore[index]
        for p in rnd.plan.placements
        if p.job_id == "short"
    )


def test_a_running_gang_gives_back_its_share_on_each_of_its_nodes() -> None:
    # A 2 x 4-GPU gang on a and b ends in 10 min; 4 GPUs of b are free. An 8-GPU one-node job is
    # due on b at that time (it was "never" before: the gang's end was only seen on a).
    ends = T0 + timedelta(minutes=10)
    running = [Hold("gang", "o", "a", 8, 1, None, 0, OLD, ends, nodes=2, gang_nodes=("a", "b"))]
    running += [Hold("x", "o", "a", 4, 1, None, 0, OLD, None)]
    nodes = node_views({"a": TOTALS["a"], "b": TOTALS["b"]}, running)
    job = Candidate("big", "o", 0, T0, 8, None, 1)
    res = backfill.earliest(job, nodes, running, T0, 60.0)
    assert res is not None and (res.node_id, res.at) == ("b", ends)


def test_a_two_node_gang_starts_when_its_reservation_says_while_short_jobs_backfill() -> None:
    """Simulated time: 2 nodes x 8 GPUs busy with 1-GPU jobs of staggered lengths, a 2 x 8-GPU
    gang at the head and a stream of 1-GPU jobs behind it. With the reservation it starts by
    the time first promised; without it (`reserve=False`) the stream keeps it out."""

    def trace() -> list[SimJob]:
        jobs = [SimJob(f"run{i}", "o", 0, 1, 0.0, 600.0 * (i % 8 + 1)) for i in range(16)]
        jobs.append(SimJob("gang", "o", 0, 16, 1.0, 3600.0, nodes=2))
        jobs += [SimJob(f"long{i}", "o", 0, 1, 2.0 + i, 20000.0) for i in range(20)]
        jobs += [SimJob(f"short{i}", "o", 0, 1, 30.0 + i, 300.0) for i in range(6)]
        return jobs

    nopre = Policy(aging_s=0, preempt_margin=None)
    sim = Sim(trace(), nopre, nodes=2, gpus_per_node=8, tick_s=30.0)
    sim.run()
    g = sim.jobs["gang"]
    assert g.reserved, "the gang was never given a reservation"
    assert g.first_start_s is not None and g.first_start_s <= g.reserved[0][1] + 1e-6
    assert all(sim.jobs[f"short{i}"].first_start_s < g.first_start_s for i in range(6))  # type: ignore[operator]
    assert all(sim.jobs[f"long{i}"].first_start_s >= g.first_start_s for i in range(20))  # type: ignore[operator]
    off = Sim(trace(), Policy(aging_s=0, preempt_margin=None, reserve=False), nodes=2,
              gpus_per_node=8, tick_s=30.0)  # fmt: skip
    off.run()
    assert off.jobs["gang"].first_start_s > 20000.0  # type: ignore[operator]


def test_an_urgent_gang_preempts_in_simulated_time_within_the_window_plus_a_checkpoint() -> None:
    # 3 nodes x 8 GPUs full of long priority 0 jobs; a priority 2 gang of 2 x 8 GPUs arrives.
    jobs = [SimJob(f"low{i}", "o", 0, 1, 0.0, 36000.0) for i in range(24)]
    jobs.append(SimJob("gang", "o", 2, 16, 900.0, 600.0, nodes=2))
    policy = Policy(aging_s=0, preempt_margin=1, min_runtime_s=600.0, checkpoint_s=60.0)
    sim = Sim(jobs, policy, nodes=3, gpus_per_node=8, tick_s=30.0)
    sim.run(until_s=3600.0)
    g = sim.jobs["gang"]
    assert g.first_start_s is not None and g.first_start_s - g.arrival_s <= 60.0 + 1e-6
    stopped = [j for j in sim.jobs.values() if j.preemptions]
    assert len(stopped) == 16  # exactly two nodes' worth, no more
