"""Scheduling on a simulated multi-node Ray cluster: two 1-GPU nodes and six jobs of three
owners — at most two run at once, priorities and per-owner limits hold, a job asking for a GPU
type waits until a node of that type joins, and the autoscaler is told the demand throughout;
fractional jobs share a GPU; `status` / `show` say why each queued job waits."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from lorajobs.orchestrator.queue import JobRecord, Queue
from lorajobs.orchestrator.scheduler import OwnerLimits, Policy
from lorajobs.orchestrator.settings import ControllerConfig
from lorajobs.orchestrator.states import JobStatus
from tests.plugins.cluster import SimCluster, drive, start_controller, text_job

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

ACTIVE = ("dispatched", "running")


def autoscaler_request() -> list[dict[str, float]] | None:
    """What the cluster's autoscaler was last asked for (v1 key; this cluster runs none)."""
    from ray._private.ray_constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)
    return None if raw is None else json.loads(raw)


def intervals(queue: Queue, jobs: list[JobRecord]) -> list[tuple[str, datetime, datetime]]:
    """(job id, dispatched, ended) for every attempt, from the events."""
    out = []
    for j in jobs:
        start = None
        for e in queue.events(j.id):
            if e.to_status is JobStatus.dispatched:
                start = e.at
            elif start is not None and e.to_status not in (JobStatus.running,):
                out.append((j.id, start, e.at))
                start = None
    return out


def test_two_gpus_six_jobs_priorities_owner_limits_and_gpu_types(
    sim_cluster: SimCluster, tmp_path: Path, tiny_text_model: Path, tiny_text_dataset: Path
) -> None:
    a, b = sim_cluster.add_gpu_node("A100"), sim_cluster.add_gpu_node("A100")
    config = ControllerConfig(
        poll_s=0.2,
        lease_s=10,
        policy=Policy(aging_s=0, limits=OwnerLimits(per_owner_jobs={"acme": 1})),
    )
    queue, ctl = start_controller(sim_cluster, tmp_path / "home", config)
    # Submitted lowest priority first, so FIFO alone would get the order wrong.
    plan = [
        ("carol-1", "carol", 0),
        ("carol-2", "carol", 0),
        ("bob-1", "bob", 5),
        ("bob-2", "bob", 5),
        ("acme-1", "acme", 10),
        ("acme-2", "acme", 10),
    ]
    jobs = [
        queue.submit(
            text_job(n, tiny_text_model, tiny_text_dataset, owner=o, priority=p),
            output_uri=f"file://{tmp_path / 'bucket'}",
        )[0]
        for n, o, p in plan
    ]
    typed = queue.submit(
        text_job(
            "h100-job",
            tiny_text_model,
            tiny_text_dataset,
            gpu_type="H100",
            owner="carol",
            priority=50,
        ),
        output_uri=f"file://{tmp_path / 'bucket'}",
    )[0]
    requests: list[Any] = []

    def observe() -> None:
        active = queue.list(statuses=[JobStatus.dispatched, JobStatus.running])
        assert len(active) <= 2, [j.name for j in active]
        assert sum(j.owner == "acme" for j in active) <= 1
        assert queue.get(typed.id).status is JobStatus.queued
        requests.append(autoscaler_request())

    ids = [j.id for j in jobs]
    drive(
        ctl, lambda: all(queue.get(i).status.is_terminal() for i in ids), timeout=240, each=observe
    )
    done = [queue.get(i) for i in ids]
    assert [j.status for j in done] == [JobStatus.succeeded] * 6
    assert {j.node_id for j in done} == {a.node_id, b.node_id}

    # At most two at once, acme never twice, over the whole run (not only when sampled).
    spans = intervals(queue, done)
    for _, t, _ in spans:
        running = [s for s in spans if s[1] <= t < s[2]]
        assert len(running) <= 2
        assert sum(queue.get(s[0]).owner == "acme" for s in running) <= 1

    # Priority: whenever a job was dispatched, every higher-priority job still waiting was
    # held back by its owner's limit (acme, with one job running).
    start = {s[0]: s[1] for s in spans}
    owner_of = {j.id: j.owner for j in done}
    prio_of = {j.id: j.priority for j in done}
    for jid, t in start.items():
        for other, t_other in start.items():
            if prio_of[other] > prio_of[jid] and t_other > t:
                assert owner_of[other] == "acme", (queue.get(jid).name, queue.get(other).name)
                assert any(owner_of[s[0]] == "acme" and s[1] <= t < s[2] for s in spans)
    first = min(start.values())
    assert {queue.get(i).name for i, t in start.items() if t == first} == {"acme-1", "bob-1"}

    # The autoscaler heard of the waiting H100 job (and the others while they were queued).
    assert any(
        r and {"CPU": 1.0, "GPU": 1.0, "accelerator_type:H100": 0.001} in r for r in requests
    )

    # The typed job waited for its GPU type; a node of that type joins and it runs there.
    assert queue.get(typed.id).status is JobStatus.queued
    h100 = sim_cluster.add_gpu_node("H100")
    drive(ctl, lambda: queue.get(typed.id).status.is_terminal(), timeout=120)
    got = queue.get(typed.id)
    assert got.status is JobStatus.succeeded and got.node_id == h100.node_id
    assert got.accelerator == "H100"
    # Nothing queued any more: the request is cleared so idle nodes can go.
    ctl.autoscaler._last_check = -1e18
    ctl.step()
    assert autoscaler_request() == []


def test_fractional_jobs_share_one_gpu(
    sim_cluster: SimCluster, tmp_path: Path, tiny_text_model: Path, tiny_text_dataset: Path
) -> None:
    node = sim_cluster.add_gpu_node("L4", gpus=1, cpus=2)
    queue, ctl = start_controller(
        sim_cluster, tmp_path / "home", ControllerConfig(poll_s=0.2, policy=Policy(aging_s=0))
    )
    out = f"file://{tmp_path / 'bucket'}"
    jobs = [
        queue.submit(
            text_job(f"half-{i}", tiny_text_model, tiny_text_dataset, gpus=0.5, steps=150),
            output_uri=out,
        )[0]
        for i in range(4)
    ]
    ids = [j.id for j in jobs]
    drive(ctl, lambda: all(queue.get(i).status.is_terminal() for i in ids), timeout=180)
    done = [queue.get(i) for i in ids]
    assert all(j.status is JobStatus.succeeded and j.node_id == node.node_id for j in done)
    spans = intervals(queue, done)
    overlap = max(sum(s[1] <= t < s[2] for s in spans) for _, t, _ in spans)
    assert overlap == 2, "two half-GPU jobs run together on the one GPU, never more"
    assert {j.accelerator for j in done} == {"L4"}


def test_status_and_show_say_why_jobs_wait(
    sim_cluster: SimCluster, tmp_path: Path, tiny_text_model: Path, tiny_text_dataset: Path
) -> None:
    """One A100 node: the running job's owner is capped, an H100 job has no node, a third
    owner's job waits for the busy GPU; `status` and `show` (the CLI) say so."""
    from typer.testing import CliRunner

    from lorajobs.orchestrator.cli import app

    sim_cluster.add_gpu_node("A100")
    config = ControllerConfig(
        poll_s=0.2,
        lease_s=10,
        policy=Policy(aging_s=0, limits=OwnerLimits(per_owner_jobs={"acme": 1})),
    )
    home = tmp_path / "home"
    queue, ctl = start_controller(sim_cluster, home, config)
    out = f"file://{tmp_path / 'bucket'}"

    def submit(name: str, owner: str, **kw: Any) -> JobRecord:
        spec = text_job(name, tiny_text_model, tiny_text_dataset, owner=owner, **kw)
        return queue.submit(spec, output_uri=out)[0]

    running = submit("acme-1", "acme", priority=10)
    capped = submit("acme-2", "acme", priority=10)
    typed = submit("h100-job", "carol", gpu_type="H100")
    busy = submit("bob-1", "bob")
    drive(ctl, lambda: queue.get(running.id).status.value in ACTIVE, timeout=60)
    assert [queue.get(j.id).status for j in (capped, typed, busy)] == [JobStatus.queued] * 3

    cli = CliRunner(env={"LORAJOBS_HOME": str(home)})
    shown = {j.id: cli.invoke(app, ["show", j.id[:6], "--json"]) for j in (capped, typed, busy)}
    assert all(r.exit_code == 0 for r in shown.values()), [r.output for r in shown.values()]
    why = {i: json.loads(r.stdout)["wait_reason"] for i, r in shown.items()}
    assert why[capped.id] == "owner acme is at its limit of 1 jobs"
    assert why[typed.id] == "no node has 1 GPU H100, 1 CPU"
    assert why[busy.id] == "waiting for 1 GPU, 1 CPU to free up"

    plain = cli.invoke(app, ["show", typed.id])
    assert plain.exit_code == 0 and "waiting: no node has 1 GPU H100, 1 CPU" in plain.stdout
    table = cli.invoke(app, ["status"])
    assert table.exit_code == 0 and "WAITING" in table.stdout
    rows = {line.split()[0]: line for line in table.stdout.splitlines()[1:] if line.strip()}
    assert "owner acme is at its limit of 1 jobs" in rows[capped.id]
    assert "no node has 1 GPU H100, 1 CPU" in rows[typed.id]
    listed = json.loads(cli.invoke(app, ["status", "--json"]).stdout)
    assert {j["id"]: j["wait_reason"] for j in listed} == {running.id: None, **why}

    # Once the GPU is free the capped owner's next job runs, and its reason is gone.
    drive(
        ctl,
        lambda: (
            queue.get(running.id).status.is_terminal()
            and queue.get(capped.id).status.value in ACTIVE
        ),
        timeout=120,
    )
    after = json.loads(cli.invoke(app, ["show", capped.id, "--json"]).stdout)
    assert after["wait_reason"] is None
