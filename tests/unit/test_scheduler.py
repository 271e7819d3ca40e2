"""The scheduling policy, on plain data: order, aging, owner limits, fit per node and GPU type,
fractional packing, cheapest type first, and the free-capacity view built from Ray + the DB."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from lorajobs.orchestrator.scheduler import (
    Candidate,
    Hold,
    Node,
    OwnerLimits,
    Policy,
    Shape,
    effective_priority,
    node_views,
    ordered,
    plan,
)

T0 = datetime(2030, 1, 1, tzinfo=timezone.utc)
NOAGING = Policy(aging_s=0)


def job(
    jid: str,
    *,
    prio: int = 0,
    age_s: float = 0.0,
    owner: str = "o",
    gpus: float = 1,
    gpu_type: str | None = None,
    cpus: int = 1,
    memory_gb: float | None = None,
    now: datetime = T0,
) -> Candidate:
    return Candidate(
        jid, owner, prio, now - timedelta(seconds=age_s), gpus, gpu_type, cpus, memory_gb
    )


def gpu_node(
    nid: str, gpus: float = 1, cpus: float = 8, accel: str | None = "A100", memory_gb: float = 64
) -> Node:
    total = {"CPU": cpus, "GPU": gpus, "memory": memory_gb * 1024**3}
    if accel:
        total[f"accelerator_type:{accel}"] = 1.0
    return Node(nid, dict(total), dict(total))


def cpu_node(nid: str, cpus: float = 8) -> Node:
    total = {"CPU": cpus, "memory": 64 * 1024**3}
    return Node(nid, dict(total), dict(total))


def placed(p) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {x.job_id: x.node_id for x in p.placements}


# ---- order ----------------------------------------------------------------------------------


def test_priority_first_then_fifo_then_id() -> None:
    jobs = [job("b", age_s=10), job("a", age_s=10), job("hi", prio=5), job("old", age_s=99)]
    assert [j.id for j in ordered(jobs, T0, 0)] == ["hi", "old", "a", "b"]


def test_aging_lifts_a_waiting_low_priority_job_over_newer_high_ones() -> None:
    starving = job("low", prio=0, age_s=3 * 600 + 1)
    fresh = [job(f"hi{i}", prio=3) for i in range(3)]
    assert effective_priority(starving, T0, 600) > 3
    assert ordered([*fresh, starving], T0, 600)[0].id == "low"
    # Without aging it would wait behind every higher job, forever if they keep coming.
    assert ordered([*fresh, starving], T0, 0)[-1].id == "low"
    # Within one priority aging keeps FIFO.
    a, b = job("a", age_s=50), job("b", age_s=40)
    assert [j.id for j in ordered([b, a], T0, 600)] == ["a", "b"]


def test_only_what_fits_runs_two_one_gpu_nodes_six_jobs() -> None:
    nodes = [gpu_node("n1"), gpu_node("n2")]
    jobs = [job(f"j{i}", age_s=10 - i) for i in range(6)]
    p = plan(jobs, nodes, [], NOAGING, T0)
    assert placed(p) == {"j0": "n1", "j1": "n2"}
    assert all("free up" in p.waiting[f"j{i}"] for i in range(2, 6))
    # What active jobs hold is not free: nothing more fits.
    holds = [Hold("j0", "o", "n1", 1, 1), Hold("j1", "o", "n2", 1, 1)]
    again = plan(jobs[2:], node_views({n.id: n.total for n in nodes}, holds), holds, NOAGING, T0)
    assert again.placements == []


# ---- owner limits ---------------------------------------------------------------------------


def test_owner_job_limit_counts_active_jobs_and_this_round() -> None:
    nodes = [gpu_node("n", gpus=8)]
    limits = Policy(aging_s=0, limits=OwnerLimits(max_jobs=2, per_owner_jobs={"vip": 3}))
    jobs = [job(f"a{i}", owner="acme", age_s=100 - i) for i in range(4)]
    jobs += [job(f"v{i}", owner="vip", age_s=50 - i) for i in range(4)]
    holds = [Hold("x", "acme", "n", 1, 1)]  # acme already runs one
    p = plan(jobs, node_views({"n": nodes[0].total}, holds), holds, limits, T0)
    assert sorted(placed(p)) == ["a0", "v0", "v1", "v2"]
    assert p.waiting["a1"] == "owner acme is at its limit of 2 jobs"


def test_owner_gpu_limit_lets_small_jobs_through() -> None:
    nodes = [gpu_node("n", gpus=8)]
    policy = Policy(aging_s=0, limits=OwnerLimits(max_gpus=1.5))
    jobs = [
        job("big", gpus=1, age_s=3),
        job("big2", gpus=1, age_s=2),
        job("small", gpus=0.5, age_s=1),
    ]
    p = plan(jobs, nodes, [], policy, T0)
    assert sorted(placed(p)) == ["big", "small"]
    assert "limit of 1.5 GPUs" in p.waiting["big2"]


# ---- fit ------------------------------------------------------------------------------------


def test_a_typed_job_waits_for_its_gpu_type_and_does_not_block_others() -> None:
    nodes = [gpu_node("a100", accel="A100"), gpu_node("l4", accel="L4")]
    jobs = [job("h100", gpu_type="H100", prio=9), job("any", age_s=5), job("l4job", gpu_type="L4")]
    p = plan(jobs, nodes, [], NOAGING, T0)
    assert placed(p) == {"any": "a100", "l4job": "l4"}
    assert "h100" in p.never_fits and "H100" in p.waiting["h100"]
    assert {x.job_id: x.accelerator for x in p.placements} == {"any": "A100", "l4job": "L4"}


def test_fractional_jobs_pack_on_one_gpu_before_spreading() -> None:
    nodes = [gpu_node("n1"), gpu_node("n2")]
    jobs = [job(f"q{i}", gpus=0.25, age_s=10 - i) for i in range(5)] + [job("whole", gpus=1)]
    p = plan(jobs, nodes, [], NOAGING, T0)
    where = placed(p)
    # Best fit: four quarters fill one GPU, the fifth opens the other, the whole job waits.
    assert [where[f"q{i}"] for i in range(4)].count(where["q0"]) == 4
    assert where["q4"] != where["q0"] and "whole" not in where


def test_fit_is_per_node_not_cluster_wide() -> None:
    # Half a GPU free on each of two nodes is one GPU cluster-wide, but no node fits a whole one.
    holds = [Hold("h1", "o", "n1", 0.5, 1), Hold("h2", "o", "n2", 0.5, 1)]
    nodes = node_views({"n1": gpu_node("n1").total, "n2": gpu_node("n2").total}, holds)
    p = plan([job("whole")], nodes, holds, NOAGING, T0)
    assert p.placements == [] and "free up" in p.waiting["whole"]


def test_cpu_jobs_keep_off_gpu_nodes_and_memory_counts() -> None:
    nodes = [gpu_node("g", cpus=8), cpu_node("c", cpus=2)]
    p = plan(
        [job("cpu1", gpus=0, age_s=3), job("cpu2", gpus=0, age_s=2), job("cpu3", gpus=0, age_s=1)],
        nodes,
        [],
        NOAGING,
        T0,
    )
    assert placed(p) == {"cpu1": "c", "cpu2": "c", "cpu3": "g"}
    big = plan([job("mem", gpus=0, memory_gb=100)], [cpu_node("c")], [], NOAGING, T0)
    assert big.never_fits == {"mem"}


def test_untyped_jobs_take_the_cheapest_gpu_type() -> None:
    nodes = [gpu_node("h", accel="H100"), gpu_node("l", accel="L4"), gpu_node("a", accel="A100")]
    policy = Policy(aging_s=0, prices={"H100": 2.49, "A100": 1.29, "L4": 0.7})
    p = plan([job("x", age_s=2), job("y", age_s=1)], nodes, [], policy, T0)
    assert placed(p) == {"x": "l", "y": "a"}


def test_round_cap() -> None:
    p = plan(
        [job(f"j{i}", gpus=0) for i in range(10)],
        [cpu_node("c", cpus=100)],
        [],
        Policy(aging_s=0, max_per_round=3),
        T0,
    )
    assert len(p.placements) == 3 and list(p.waiting.values()).count("round full") == 7


# ---- the free-capacity view -----------------------------------------------------------------


def test_node_views_subtract_holds_cap_by_ray_and_skip_excluded_nodes() -> None:
    totals = {"n1": {"CPU": 4.0, "GPU": 1.0}, "n2": {"CPU": 4.0, "GPU": 1.0}, "gone": {"GPU": 1.0}}
    holds = [Hold("a", "o", "n1", 0.25, 1), Hold("b", "o", None, 1, 1)]
    # Ray has not yet seen the launch on n1, but shows n2 busy with something else.
    available = {"n1": {"CPU": 4.0, "GPU": 1.0}, "n2": {"CPU": 4.0}}
    nodes = {n.id: n for n in node_views(totals, holds, available, exclude={"gone"})}
    assert set(nodes) == {"n1", "n2"}
    assert nodes["n1"].free == {"CPU": 3.0, "GPU": 0.75}
    assert nodes["n2"].free == {"CPU": 4.0, "GPU": 0.0}


def test_shape_resources() -> None:
    s = Shape(0.5, "A100-80G", 2, 1.5)
    assert s.ray_resources() == {
        "CPU": 2.0,
        "GPU": 0.5,
        "accelerator_type:A100-80G": 0.001,
        "memory": float(1.5 * 1024**3),
    }
    assert Shape(0, None, 1).ray_resources() == {"CPU": 1.0}


def test_the_fit_index_picks_what_a_full_scan_of_the_nodes_picks() -> None:
    """`fitindex.FitIndex` (a heap per shape, refreshed as nodes change) against the plain scan
    it replaced, over random nodes, shapes, placements and refusals (reservations)."""
    import random

    from lorajobs.orchestrator.fitindex import FitIndex
    from lorajobs.orchestrator.scheduler import Node, Shape, _preference

    rng = random.Random(7)
    for _ in range(20):
        nodes = []
        for i in range(rng.randint(1, 30)):
            gpus = float(rng.choice([0, 1, 2, 4, 8]))
            total = {"CPU": float(rng.choice([4, 16, 64])), "GPU": gpus}
            if gpus:
                total[f"accelerator_type:{rng.choice(['A100', 'H100'])}"] = 1.0
            free = {k: (v if k.startswith("acc") else rng.uniform(0, v)) for k, v in total.items()}
            nodes.append(Node(f"n{i:02d}", total, free))
        price = {n.id: rng.choice([1.0, 2.0, float("inf")]) for n in nodes}

        def key(n: Node, s: Shape, price: dict[str, float] = price) -> tuple[float, float, float]:
            return _preference(n, s, price[n.id])

        index = FitIndex(nodes, key)
        shapes = [Shape(g, t, c) for g, t, c in
                  [(1, None, 1), (1, "A100", 2), (0.25, None, 1), (0, None, 2), (2, "H100", 4)]]  # fmt: skip
        for _ in range(60):
            shape = rng.choice(shapes)
            banned = {n.id for n in nodes if rng.random() < 0.1}
            fit = [n for n in nodes if n.fits(shape)]
            ok = [n for n in fit if n.id not in banned]
            want = min(ok, key=lambda n: key(n, shape)) if ok else None  # first of equal keys
            got, refused = index.best(shape, lambda n, banned=banned: n.id not in banned)
            assert got is want
            if got is None:  # then: whether a node that fits was refused (a reservation)
                assert refused == any(n.id in banned for n in fit)
            if got is not None:
                got.take(shape)
                index.changed(got)
