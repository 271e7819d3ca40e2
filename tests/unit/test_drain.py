"""Drains, without Ray: what an attempt on a draining node is told, and whom the controller asks
to checkpoint and stop (the Ray side is tests/integration/test_cluster_drain.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lorajobs.orchestrator.drain import Drain, DrainWatch

NODE_A, NODE_B = "a" * 56, "b" * 56
# 2026-12-04 17:30:12 UTC
DEADLINE_MS = 1796405412000


def test_a_drain_names_the_node_and_the_deadline() -> None:
    assert Drain(NODE_A, DEADLINE_MS).describe() == (
        "preempted: node aaaaaaaaaaaa draining (spot reclaim), deadline 2026-12-04 17:30:12 UTC"
    )
    assert Drain(NODE_A, 0).describe() == (
        "preempted: node aaaaaaaaaaaa draining (spot reclaim), no deadline given"
    )


@dataclass
class _Attempt:
    job_id: str
    attempt: int
    node_id: str | None


@dataclass
class _Backend:
    drains: dict[str, Drain] = field(default_factory=dict)
    asked: list[tuple[str, int, str]] = field(default_factory=list)
    reads: int = 0

    def draining(self) -> dict[str, Drain]:
        self.reads += 1
        return self.drains

    def request_stop(self, attempt: _Attempt, why: str) -> None:
        self.asked.append((attempt.job_id, attempt.attempt, why))


def test_only_attempts_on_draining_nodes_are_asked_and_again_each_pass() -> None:
    backend = _Backend()
    watch = DrainWatch(backend)  # type: ignore[arg-type]
    inflight = {"j1": _Attempt("j1", 1, NODE_A), "j2": _Attempt("j2", 3, NODE_B)}
    watch.sweep(inflight)  # type: ignore[arg-type]
    assert backend.asked == []

    backend.drains = {NODE_A: Drain(NODE_A, DEADLINE_MS + 1000)}  # drained again, later
    watch.sweep(inflight)  # type: ignore[arg-type]
    watch.sweep(inflight)  # type: ignore[arg-type]
    why = backend.drains[NODE_A].describe()
    assert backend.asked == [("j1", 1, why), ("j1", 1, why)]  # a lost request is sent again
    assert watch.settle("j2") is None
    assert watch.settle("j1") == why and watch.settle("j1") is None


def test_a_notice_outlives_the_drain_but_not_its_attempt() -> None:
    backend = _Backend({NODE_A: Drain(NODE_A, DEADLINE_MS)})
    watch = DrainWatch(backend)  # type: ignore[arg-type]
    watch.sweep({"j1": _Attempt("j1", 1, NODE_A)})  # type: ignore[arg-type]
    backend.drains = {}  # the node is gone: the attempt's loss is still the drain's
    watch.sweep({"j1": _Attempt("j1", 1, NODE_A)})  # type: ignore[arg-type]
    assert watch.settle("j1") is not None

    watch.sweep({"j1": _Attempt("j1", 1, NODE_A)})  # type: ignore[arg-type]
    backend.drains = {NODE_A: Drain(NODE_A, DEADLINE_MS + 1000)}  # drained again, later
    watch.sweep({"j1": _Attempt("j1", 1, NODE_A)})  # type: ignore[arg-type]
    watch.sweep({})  # cancelled meanwhile: forgotten, and no GCS read with nothing in flight
    assert watch.settle("j1") is None and backend.reads == 4
