"""Gang jobs without a cluster: the spec's multi-GPU shapes, the scheduler's all-or-nothing fit
(pure policy), the placement strategy, and how a failed Ray Train run is classified."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest

from lorajobs.jobspecs import parse_spec
from lorajobs.jobspecs.failures import GangLost, SpecError, UserDataError
from lorajobs.orchestrator import gangs
from lorajobs.orchestrator.scheduler import Candidate, Hold, Node, Policy, node_views, plan

T0 = datetime(2030, 1, 1, tzinfo=timezone.utc)
NOAGING = Policy(aging_s=0)


def text(resources: dict[str, Any], batch_size: int = 4, kind: str = "text") -> Any:
    raw: dict[str, Any] = {
        "kind": kind,
        "name": "g",
        "base_model": "/m",
        "dataset": "/d",
        "training": {"steps": 2, "batch_size": batch_size},
        "resources": resources,
    }
    return parse_spec(raw)


def gang(jid: str, gpus: float, nodes: int = 1, cpus: int = 1) -> Candidate:
    return Candidate(jid, "o", 0, T0, gpus, "A100", cpus, None, nodes=nodes)


def node(nid: str, gpus: float = 1, cpus: float = 1) -> Node:
    total = {"CPU": cpus, "GPU": gpus, "accelerator_type:A100": 1.0}
    return Node(nid, dict(total), dict(total))


# ---- the spec ---------------------------------------------------------------------------------


def test_spec_shapes_of_a_gang() -> None:
    one = text({"gpus": 8}, batch_size=8).resources
    assert (one.gpus, one.nodes, one.workers, one.gang) == (8, 1, 8, True)
    multi = text({"nodes": 2, "gpus_per_node": 4}, batch_size=8).resources
    assert (multi.gpus, multi.nodes, multi.workers) == (8, 2, 8)
    assert not text({"gpus": 1}).resources.gang
    assert not text({"gpus": 0.5}).resources.gang
    # The stored (canonical) spec parses again to the same shape.
    again = text(multi.model_dump(), batch_size=8).resources
    assert again == multi


@pytest.mark.parametrize(
    ("resources", "batch_size", "kind", "needle"),
    [
        ({"nodes": 2}, 4, "text", "resources: nodes > 1 needs gpus_per_node"),
        ({"nodes": 2, "gpus_per_node": 1, "gpus": 4}, 4, "text", "not nodes x gpus_per_node"),
        ({"gpus": 4}, 6, "text", "training.batch_size 6 must be a multiple of the job's 4"),
        ({"nodes": 0, "gpus_per_node": 1}, 4, "text", "resources.nodes"),
        ({"gpus": 4}, 6, "image", "training.batch_size 6 must be a multiple of the job's 4"),
    ],
)
def test_bad_gang_specs_name_the_field(
    resources: dict[str, Any], batch_size: int, kind: str, needle: str
) -> None:
    with pytest.raises(SpecError) as err:
        text(resources, batch_size, kind)
    assert needle in str(err.value)


# ---- the scheduler ----------------------------------------------------------------------------


def test_a_two_node_gang_takes_its_share_of_two_nodes_in_one_round() -> None:
    nodes = [node("a"), node("b"), node("c", gpus=0)]
    p = plan([gang("g", 2, nodes=2)], nodes, [], NOAGING, T0)
    assert [(x.job_id, x.node_id) for x in p.placements] == [("g", "a")]
    assert p.placements[0].data["gang_nodes"] == ["a", "b"]
    assert nodes[0].free["GPU"] == 0 and nodes[1].free["GPU"] == 0


def test_a_gang_waits_for_all_its_nodes_and_says_how_many_are_free() -> None:
    nodes = [node("a"), node("b")]
    holds = [Hold("busy", "x", "b", 1, 1)]
    views = node_views({n.id: n.total for n in nodes}, holds)
    # A one-GPU job behind it still runs on the free node (the gang takes none of it).
    p = plan([gang("g", 2, nodes=2), gang("small", 1)], views, holds, NOAGING, T0)
    assert [x.job_id for x in p.placements] == ["small"]
    assert p.waiting["g"] == (
        "waiting for 2 nodes with 1 GPU A100, 1 CPU free at once (a gang; 1 free now)"
    )
    assert "g" not in p.never_fits


def test_a_gang_no_cluster_can_hold_never_fits() -> None:
    p = plan([gang("g", 3, nodes=3)], [node("a"), node("b")], [], NOAGING, T0)
    assert p.waiting["g"] == "no 3 nodes have 1 GPU A100, 1 CPU each (a gang; 2 could ever)"
    assert p.never_fits == {"g"}


def test_a_one_node_gang_needs_its_cpus_per_worker_on_that_node() -> None:
    # Two workers of 2 CPUs each: 4 CPUs on the node, not 2.
    nodes = [node("small", gpus=2, cpus=2), node("big", gpus=2, cpus=4)]
    p = plan([gang("g", 2, cpus=2)], nodes, [], NOAGING, T0)
    assert [(x.job_id, x.node_id) for x in p.placements] == [("g", "big")]
    assert "gang_nodes" not in p.placements[0].data


def test_an_active_gang_holds_its_per_node_share() -> None:
    views = node_views({"a": node("a", gpus=2, cpus=4).total}, [Hold("g", "o", "a", 2, 2)])
    assert views[0].free["GPU"] == 0 and views[0].free["CPU"] == 0
    # A 2-node gang holds its share on each node the scheduler chose, from its dispatch on.
    totals = {n: node(n).total for n in "abc"}
    views = node_views(totals, [Hold("g", "o", "a", 2, 1, None, nodes=2, gang_nodes=("a", "b"))])
    assert [v.free["GPU"] for v in views] == [0, 0, 1]


def test_placement_strategies() -> None:
    assert gangs.placement_strategy(1, 8) == "STRICT_PACK"
    assert gangs.placement_strategy(2, 2) == "STRICT_SPREAD"
    assert gangs.placement_strategy(2, 16) == "PACK"
    assert gangs.is_gang({"resources": {"gpus": 2}})
    assert not gangs.is_gang({"resources": {"gpus": 1}})


# ---- a failed fit -----------------------------------------------------------------------------


def test_a_failed_gang_is_our_workers_error_or_a_lost_member() -> None:
    from ray.train import WorkerGroupError

    from lorajobs.orchestrator.gang import _cause

    data = UserDataError("dataset /d: no rows")
    ours = WorkerGroupError("rank 1 failed", {1: RuntimeError("peer closed"), 0: data})
    assert _cause(ours) is data
    lost = _cause(WorkerGroupError("actor died", {1: RuntimeError("ActorDiedError: gone")}))
    assert isinstance(lost, GangLost)
    assert str(lost).startswith("the gang lost a member (rank 1): Training failed")


def test_each_gang_worker_is_held_to_the_node_its_round_chose() -> None:
    from lorajobs.orchestrator.gang import NODE_ID_LABEL, worker_nodes

    assert worker_nodes(["a", "b"], 4) == [
        {NODE_ID_LABEL: "a"},
        {NODE_ID_LABEL: "a"},
        {NODE_ID_LABEL: "b"},
        {NODE_ID_LABEL: "b"},
    ]
    assert worker_nodes(["a"], 2) == [{NODE_ID_LABEL: "a"}] * 2
    assert worker_nodes([], 2) is None  # no choice recorded: Ray chooses
