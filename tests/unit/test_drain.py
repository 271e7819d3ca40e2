"""Drains, without Ray: what an attempt on a draining node is told, and whom the controller asks
to checkpoint and stop (the Ray side is tests/integration/test_cluster_drain.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lorajobs.orchestrator.drain import Drain, DrainWatch
from lorajobs.orchestrator.ray_backend import Attempt

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


def _Attempt(job_id: str, attempt: int, node_id: str | None, *gang: str) -> Attempt:  # noqa: N802
    return Attempt(job_id, attempt, ref=None, started=0.0, node_id=node_id, nodes=gang)


@dataclass
class _Backend:
    drains: dict[str, Drain] = field(default_factory=dict)
    asked: list[tuple[str, int, str]] = field(default_factory=list)
    reads: int = 0

    def draining(self) -> dict[str, Drain]:
        self.reads += 1
        return self.drains

    def request_stop(self, attempt: Attempt, why: str) -> None:
        self.asked.append((attempt.job_id, attempt.attempt, why))


def test_only_attempts_on_draining_nodes_are_asked_and_again_each_pass() -> None:
    backend = _Backend()
    watch = DrainWatch(backend)  # type: ignore[arg-type]
    inflight = {"j1": _Attempt("j1", 1, NODE_A), "j2": _Attempt("j2", 3, NODE_B)}
    watch.sweep(inflight)  # type: ignore[arg-type]
    assert backend.asked == []

    backend.drains = {NODE_A: Drain(NODE_A, DEADLINE_MS + 1000)}  # drained again, later
    watch.new_pass()
    watch.sweep(inflight)  # type: ignore[arg-type]
    watch.new_pass()
    watch.sweep(inflight)  # type: ignore[arg-type]
    why = backend.drains[NODE_A].describe()
    assert backend.asked == [("j1", 1, why), ("j1", 1, why)]  # a lost request is sent again
    assert watch.settle(inflight["j2"]) is None  # type: ignore[arg-type]
    assert watch.settle(inflight["j1"]) == why  # type: ignore[arg-type]


def test_a_notice_outlives_the_drain_but_not_its_attempt() -> None:
    backend = _Backend({NODE_A: Drain(NODE_A, DEADLINE_MS)})
    watch = DrainWatch(backend)  # type: ignore[arg-type]
    a1 = _Attempt("j1", 1, NODE_A)
    watch.sweep({"j1": a1})  # type: ignore[dict-item]
    backend.drains = {}  # the node is gone: the attempt's loss is still the drain's
    watch.new_pass()
    assert watch.settle(a1) == Drain(NODE_A, DEADLINE_MS).describe()  # type: ignore[arg-type]

    backend.drains = {NODE_A: Drain(NODE_A, DEADLINE_MS)}
    watch.new_pass()
    watch.sweep({"j1": a1})  # type: ignore[dict-item]
    watch.new_pass()
    watch.sweep({})  # cancelled meanwhile: forgotten, and no GCS read with nothing in flight
    assert backend.reads == 2
    backend.drains = {}
    assert watch.settle(a1) is None  # type: ignore[arg-type]


def test_a_pass_reads_the_drains_once_however_often_they_are_needed() -> None:
    backend = _Backend({NODE_A: Drain(NODE_A, DEADLINE_MS)})
    watch = DrainWatch(backend)  # type: ignore[arg-type]
    a1, a2 = _Attempt("j1", 1, NODE_A), _Attempt("j2", 1, NODE_B)
    watch.new_pass()
    assert watch.settle(a2) is None  # type: ignore[arg-type]
    watch.sweep({"j1": a1})  # type: ignore[dict-item]
    assert set(watch.current()) == {NODE_A}
    assert backend.reads == 1
    backend.drains = {}
    watch.new_pass()  # the next pass reads afresh
    assert watch.current() == {} and backend.reads == 2


def test_an_attempt_that_ended_before_it_was_told_is_still_the_drain_s() -> None:
    # Placed on node-a just before the drain: Ray refused it before any sweep saw it.
    backend = _Backend({NODE_A: Drain(NODE_A, DEADLINE_MS)})
    watch = DrainWatch(backend)  # type: ignore[arg-type]
    notice = Drain(NODE_A, DEADLINE_MS).describe()
    assert watch.settle(_Attempt("j1", 1, NODE_A)) == notice  # type: ignore[arg-type]
    assert watch.settle(_Attempt("j2", 1, NODE_B)) is None  # type: ignore[arg-type]
    assert watch.settle(_Attempt("j3", 1, None)) is None  # type: ignore[arg-type]


def test_a_gang_is_asked_when_any_of_its_nodes_drains() -> None:
    backend = _Backend(drains={NODE_B: Drain(NODE_B, DEADLINE_MS)})
    watch = DrainWatch(backend)  # type: ignore[arg-type]
    gang = _Attempt("g", 2, NODE_A, NODE_A, NODE_B)  # its task on A, workers on A and B
    watch.sweep({"g": gang})
    assert [(j, a) for j, a, _ in backend.asked] == [("g", 2)]
    assert watch.settle(gang) == Drain(NODE_B, DEADLINE_MS).describe()
