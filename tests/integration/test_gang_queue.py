"""Gangs in the queue, on SQLite and PostgreSQL: the `nodes` column (migration 0006) reaches
the scheduling round's candidates and the class key, the autoscaler is asked for a gang's
per-node share once per node, and a dispatched gang holds its share on each of its nodes."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Engine

from lorajobs.jobspecs import parse_spec
from lorajobs.orchestrator.queue import Queue
from lorajobs.orchestrator.scheduler import Candidate, Shape

OUT = "file:///srv/bucket"


def spec(name: str, resources: dict[str, Any]) -> Any:
    return parse_spec(
        {
            "kind": "text",
            "name": name,
            "base_model": "m",
            "dataset": "d",
            "training": {"steps": 5, "batch_size": 16},
            "resources": resources,
        }
    )


def test_a_gang_reaches_the_round_and_the_autoscaler_per_node(any_db_engine: Engine) -> None:
    q = Queue(any_db_engine)
    gang, _ = q.submit(spec("g", {"nodes": 2, "gpus_per_node": 8, "cpus": 4}), output_uri=OUT)
    one, _ = q.submit(spec("o", {"gpus": 8, "cpus": 4}), output_uri=OUT)
    assert (q.get(gang.id).nodes, q.get(gang.id).gpus) == (2, 16.0)
    assert q.get(one.id).nodes == 1
    seen: list[Candidate] = []

    class Planner:
        done = False

        def offer(self, candidates: list[Candidate]) -> list[Any]:
            seen.extend(candidates)
            return []

    q.scheduling.schedule(
        lambda holds: Planner(),
        per_class=5,
        aging_s=0,
        lease_owner="c",
        lease_expires_at=datetime(2030, 1, 1, tzinfo=timezone.utc),
    )
    by_id = {c.id: c for c in seen}
    assert by_id[gang.id].nodes == 2 and by_id[one.id].nodes == 1
    assert by_id[gang.id].class_key != by_id[one.id].class_key
    assert by_id[gang.id].shape == Shape(8.0, None, 32, None)  # 8 workers of 4 CPUs a node
    assert sorted(q.scheduling.demand(), key=lambda d: d[2]) == [
        (Shape(8.0, None, 32, None), True, 1),
        (Shape(8.0, None, 32, None), True, 2),
    ]


def test_a_dispatched_gang_holds_each_of_its_nodes(any_db_engine: Engine) -> None:
    from lorajobs.orchestrator.scheduler import Policy, Round, node_views

    now = datetime(2030, 1, 1, tzinfo=timezone.utc)
    q = Queue(any_db_engine, clock=lambda: now)
    gang, _ = q.submit(spec("g", {"nodes": 2, "gpus_per_node": 8, "cpus": 4}), output_uri=OUT)
    total = {"CPU": 64.0, "GPU": 8.0}
    seen: list[Any] = []

    def start(holds: list[Any]) -> Round:
        seen.append(holds)
        # What the controller does: the nodes' totals less what active jobs hold there.
        nodes = node_views({n: total for n in ("a", "b", "c")}, holds)
        return Round(nodes, holds, Policy(aging_s=0), now)

    kw: dict[str, Any] = {"per_class": 5, "aging_s": 0, "lease_owner": "c"}
    (dispatched,) = q.scheduling.schedule(start, lease_expires_at=now, **kw)
    assert dispatched.id == gang.id and dispatched.gang_nodes == "a,b"
    q.submit(spec("o", {"gpus": 8, "cpus": 4}), output_uri=OUT)
    (other,) = q.scheduling.schedule(start, lease_expires_at=now, **kw)
    assert [(h.id, h.gang_nodes) for h in seen[1]] == [(gang.id, ("a", "b"))]
    assert other.node_id == "c"  # not a or b, which the gang holds
