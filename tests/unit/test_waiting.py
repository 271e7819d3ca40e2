"""Why a queued job waits: a round's reasons per job class, the round's stop reason, backoff,
and a stale or missing summary — on plain data (the policy's Round on made-up nodes)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from lorajobs.orchestrator import waiting
from lorajobs.orchestrator.records import JobRecord
from lorajobs.orchestrator.scheduler import Candidate, Node, OwnerLimits, Policy, Round
from lorajobs.orchestrator.states import JobStatus

T0 = datetime(2030, 1, 1, 12, 0, 0, tzinfo=timezone.utc)


def cand(
    jid: str,
    *,
    owner: str = "o",
    gpus: float = 1,
    gpu_type: str | None = None,
    prio: int = 0,
    age_s: float = 0,
) -> Candidate:
    return Candidate(jid, owner, prio, T0 - timedelta(seconds=age_s), gpus, gpu_type, 1)


def record(c: Candidate, **over: Any) -> JobRecord:
    """The queue row of candidate `c`."""
    fields: dict[str, Any] = dict(
        id=c.id,
        name=c.id,
        kind="text",
        owner=c.owner,
        priority=c.priority,
        status=JobStatus.queued,
        spec={},
        output_uri="file:///b",
        idempotency_key=None,
        attempt=1,
        gpus=c.gpus,
        gpu_type=c.gpu_type,
        cpus=c.cpus,
        created_at=c.created_at,
        updated_at=c.created_at,
        dispatched_at=None,
        started_at=None,
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
        lease_owner=None,
        lease_expires_at=None,
        memory_gb=c.memory_gb,
    )
    fields.update(over)
    return JobRecord(**fields)


def a100(nid: str = "n1", gpus: float = 1, cpus: float = 4) -> Node:
    total = {"CPU": cpus, "GPU": gpus, "accelerator_type:A100": 1.0}
    return Node(nid, dict(total), dict(total))


def run_round(
    cands: list[Candidate],
    nodes: list[Node],
    policy: Policy = Policy(aging_s=0),
    per_class: int | None = None,
) -> waiting.WaitSummary:
    """One round offered at most `per_class` candidates of each class (as the queue does)."""
    rnd = Round(nodes, [], policy, T0)
    seen: dict[Any, int] = {}
    offered = []
    for c in cands:
        seen[c.class_key] = seen.get(c.class_key, 0) + 1
        if per_class is None or seen[c.class_key] <= per_class:
            offered.append(c)
    if not rnd.done:
        rnd.offer(offered)
    return waiting.summarize(rnd, T0)


def test_each_class_gets_its_reason_even_jobs_the_round_never_read() -> None:
    jobs = [
        cand("run", owner="acme"),
        cand("capped1", owner="acme", age_s=-1),
        cand("capped2", owner="acme", age_s=-2),
        cand("h100", gpu_type="H100"),
        cand("busy", owner="bob", age_s=-3),
    ]
    policy = Policy(aging_s=0, limits=OwnerLimits(per_owner_jobs={"acme": 1}))
    summary = run_round(jobs, [a100()], policy, per_class=2)
    why = {c.id: waiting.reason(record(c), summary, T0) for c in jobs[1:]}
    assert why == {
        "capped1": "owner acme is at its limit of 1 jobs",
        "capped2": "owner acme is at its limit of 1 jobs",  # not offered (per_class=2)
        "h100": "no node has 1 GPU H100, 1 CPU",
        "busy": "waiting for 1 GPU, 1 CPU to free up",
    }
    assert summary.stop is None  # CPUs are left: the round saw every candidate


def test_a_full_cluster_gives_its_reason_to_jobs_not_offered() -> None:
    node = a100(cpus=1)
    node.free["CPU"] = 0.0  # something else holds its only CPU
    summary = run_round([cand("x")], [node])
    assert summary.classes == {}
    assert waiting.reason(record(cand("x")), summary, T0) == "every node is busy (no CPU free)"
    assert run_round([cand("x")], []).stop == "no node is up (or every node is draining)"


def test_backoff_missing_and_stale_summaries() -> None:
    job = cand("j", age_s=5)
    later = T0 + timedelta(seconds=30)
    backoff = record(job, not_before=later, failure_reason="node lost")
    assert waiting.reason(backoff, None, T0) == (
        "retry backoff until 12:00:30 UTC (last attempt: node lost)"
    )
    assert waiting.reason(record(job), None, T0) == waiting.NEXT_ROUND
    assert "is a controller running (lorajobs controller)?" in str(
        waiting.reason(record(job), None, T0 + timedelta(minutes=5))
    )

    summary = run_round([job], [])
    assert waiting.reason(record(job), summary, T0) == summary.stop
    stale = waiting.reason(record(job), summary, T0 + timedelta(minutes=5))
    assert stale == f"{summary.stop} (as of 12:00:00 UTC: is a controller running?)"
    assert waiting.reason(record(job, status=JobStatus.running), summary, T0) is None


def test_summary_round_trips_through_json_and_short_form() -> None:
    policy = Policy(aging_s=0, limits=OwnerLimits(max_gpus=0.5))
    summary = run_round([cand("a", gpu_type="H100"), cand("b", owner="z")], [a100()], policy)
    back = waiting.WaitSummary.from_json(summary.to_json(), at=T0)
    assert back == summary and back.same_as(summary)
    assert len(back.classes) == 2
    assert waiting.short("retry backoff until 12:00:30 UTC (last attempt: x)") == (
        "retry backoff until 12:00:30 UTC"
    )
    assert waiting.short("x" * 60, width=10) == "x" * 9 + "…"
    assert waiting.short(None) == "-"
