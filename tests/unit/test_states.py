"""The job state machine: exactly the documented transitions, nothing else."""

from __future__ import annotations

import itertools

import pytest

from lorajobs.jobspecs.failures import FailureKind
from lorajobs.orchestrator.states import ALLOWED, TERMINAL, JobStatus, can_transition

Q, D, R = JobStatus.queued, JobStatus.dispatched, JobStatus.running
S, F, C = JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled

EXPECTED = {
    (Q, D),
    (Q, C),
    (Q, F),
    (D, R),
    (D, Q),
    (D, F),
    (D, C),
    (D, S),
    (R, S),
    (R, F),
    (R, C),
    (R, Q),
    (F, Q),
    (C, Q),
}


def test_values_are_the_stored_strings() -> None:
    assert [s.value for s in JobStatus] == [
        "queued",
        "dispatched",
        "running",
        "succeeded",
        "failed",
        "cancelled",
    ]
    assert JobStatus("running") is R
    assert f"{R}" == "running" and str(F) == "failed"
    assert [k.value for k in FailureKind] == ["user", "infra", "internal"]
    assert str(FailureKind.infra) == "infra"


def test_every_status_has_an_entry() -> None:
    assert set(ALLOWED) == set(JobStatus)
    assert all(isinstance(v, frozenset) for v in ALLOWED.values())


@pytest.mark.parametrize("src,dst", list(itertools.product(JobStatus, JobStatus)))
def test_allowed_map_is_exactly_the_documented_one(src: JobStatus, dst: JobStatus) -> None:
    assert can_transition(src, dst) == ((src, dst) in EXPECTED)
    assert (dst in ALLOWED[src]) == ((src, dst) in EXPECTED)


def test_terminal_states() -> None:
    assert TERMINAL == {S, F, C}
    assert [s for s in JobStatus if s.is_terminal()] == [S, F, C]
    # Only a manual retry leaves a terminal state, and only from failed or cancelled.
    assert ALLOWED[S] == frozenset()
    assert ALLOWED[F] == ALLOWED[C] == {Q}


def test_no_status_moves_to_itself() -> None:
    assert all(s not in ALLOWED[s] for s in JobStatus)


def test_every_status_is_reachable_from_queued() -> None:
    seen, todo = {Q}, [Q]
    while todo:
        for nxt in ALLOWED[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    assert seen == set(JobStatus)


def test_the_readme_state_diagram_shows_exactly_the_allowed_transitions() -> None:
    """The README's Mermaid diagram is parsed, so it cannot drift from `ALLOWED`."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("```mermaid", 1)[1].split("```", 1)[0]
    drawn = {
        (JobStatus(a), JobStatus(b))
        for a, b in re.findall(r"^\s*(\w+) --> (\w+)", block, re.M)
        if a != "[*]"
    }
    allowed = {(a, b) for a, tos in ALLOWED.items() for b in tos}
    assert drawn == allowed, f"missing: {allowed - drawn}; not allowed: {drawn - allowed}"
