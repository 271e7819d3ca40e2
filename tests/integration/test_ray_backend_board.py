"""The Ray backend's progress board and drain reading, on a simulated cluster: the board exists
before anything that may need it runs (the cluster view, the drain list: a Ray client, which
cannot ask the GCS, reads drains through the board), the cluster view no longer reads drains
(the controller reads them once per pass), and the board's pack cancel set starts empty."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from lorajobs.orchestrator.ray_backend import RayBackend
from lorajobs.orchestrator.settings import Settings
from tests.plugins.cluster import SimCluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_the_board_exists_before_the_cluster_or_its_drains_are_read(
    sim_cluster: SimCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray._private.state as state

    node = sim_cluster.add_gpu_node("A100")
    board_there: list[tuple[str, bool]] = []
    gcs_drain_reads: list[int] = []

    def watched(name: str) -> Any:
        real = getattr(RayBackend, name)

        def call(self: RayBackend, *args: Any, **kwargs: Any) -> Any:
            board_there.append((name, hasattr(self, "board")))
            return real(self, *args, **kwargs)

        return call

    # As through a Ray client (ray://): this driver cannot ask the GCS. (Patched on the
    # driver's state object only: Ray ships the board's class by value, with its globals.)
    def no_gcs(*_: Any) -> Any:
        gcs_drain_reads.append(1)
        raise RuntimeError("GCS client not available through the Ray client")

    monkeypatch.setattr(RayBackend, "cluster", watched("cluster"))
    monkeypatch.setattr(RayBackend, "draining", watched("draining"))
    monkeypatch.setattr(state.state, "get_draining_nodes", no_gcs)
    settings = Settings.from_env(
        {"LORAJOBS_HOME": str(tmp_path / "home"), "LORAJOBS_RAY_ADDRESS": sim_cluster.address}
    )
    backend = RayBackend(settings)
    assert all(there for _, there in board_there), board_there  # nothing ran before the board

    # Ray shuts a drained idle node down at once: keep it busy, as an attempt would.
    busy = _hold.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False)
    ).remote(str(tmp_path / "started"))
    _wait_for(tmp_path / "started")
    deadline = sim_cluster.drain(node, 60)

    view = backend.cluster()
    assert any("node:__internal_head__" in r for r in view.totals.values())  # read as before
    assert gcs_drain_reads == []  # the cluster view reads no drains: the controller does
    drains = backend.draining()  # this driver cannot ask the GCS: the board does
    assert gcs_drain_reads == [1]
    assert abs(drains[node.node_id].deadline_ms / 1000 - deadline) < 0.01
    # The board sits on the head, which lives as long as the cluster.
    where = backend.board.__ray_call__.remote(lambda _: ray.get_runtime_context().get_node_id())
    head = [n for n in view.totals if "node:__internal_head__" in view.totals[n]]
    assert [ray.get(where, timeout=30)] == head
    ray.cancel(busy, force=True)


@ray.remote(num_cpus=1, max_retries=0)
def _hold(started: str) -> None:
    Path(started).touch()
    time.sleep(300)


def _wait_for(path: Path, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < end, "the task holding the node never started"
        time.sleep(0.2)


def test_a_fresh_board_drops_no_pack_member_until_asked(
    sim_cluster: SimCluster, tmp_path: Path
) -> None:
    settings = Settings.from_env(
        {"LORAJOBS_HOME": str(tmp_path / "home"), "LORAJOBS_RAY_ADDRESS": sim_cluster.address}
    )
    board = RayBackend(settings).board
    assert ray.get(board.cancelled.remote(["a", "b"]), timeout=30) == []
    ray.get(board.cancel_member.remote("b"), timeout=30)
    ray.get(board.cancel_member.remote("a"), timeout=30)
    assert ray.get(board.cancelled.remote(["a", "b", "c"]), timeout=30) == ["a", "b"]


def test_a_controller_through_the_ray_client_starts_and_reads_drains_via_its_board(
    tmp_path: Path,
) -> None:
    # What the newcomer walk (tests/e2e/test_newcomer_walk.py) does at its controller step, on
    # a cluster of its own with a client server: a ray:// driver has no GCS to ask.
    import socket

    from ray.cluster_utils import Cluster

    from lorajobs.orchestrator.drain import DrainWatch, read_drains

    if ray.is_initialized():  # an earlier test's driver
        ray.shutdown()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "num_gpus": 0,
            "include_dashboard": False,
            "object_store_memory": 80 * 1024**2,
            "ray_client_server_port": port,
        },
    )
    try:
        settings = Settings.from_env(
            {
                "LORAJOBS_HOME": str(tmp_path / "home"),
                "LORAJOBS_RAY_ADDRESS": f"ray://127.0.0.1:{port}",
            }
        )
        backend = RayBackend(settings)
        assert not backend.local and backend.cluster().totals
        with pytest.raises(Exception):  # noqa: B017 - whatever Ray raises: no GCS client here
            read_drains()
        watch = DrainWatch(backend)
        watch.new_pass()
        assert watch.current() == {}  # asked through the board, which runs in the cluster
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
