"""Gangs in the queue, on SQLite and PostgreSQL: the `nodes` column (migration 0005g) reaches
the scheduling round's candidates and the class key, and the autoscaler is asked for a gang's
per-node share once per node."""

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
