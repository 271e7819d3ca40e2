"""SIGTERM as a preemption notice: real signals sent to this process."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType

import pytest

from lorajobs.worker.trainers.preemption import PreemptionNotice


@pytest.fixture
def seen() -> Iterator[list[int]]:
    """A Python SIGTERM handler standing for whatever the process had (e.g. Ray's)."""
    calls: list[int] = []

    def previous(signum: int, frame: FrameType | None) -> None:
        calls.append(signum)

    old = signal.signal(signal.SIGTERM, previous)
    try:
        yield calls
    finally:
        signal.signal(signal.SIGTERM, old)


def _sigterm() -> None:
    os.kill(os.getpid(), signal.SIGTERM)  # handlers run at the next bytecode of the main thread


def test_sigterm_inside_is_a_notice_and_the_handler_is_restored(seen: list[int]) -> None:
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionNotice() as notice:
        assert not notice.received
        _sigterm()
        assert notice.received and seen == []  # noted, not passed on
    assert signal.getsignal(signal.SIGTERM) is before
    _sigterm()
    assert seen == [signal.SIGTERM]  # after the loop SIGTERM means what it meant before


def test_a_second_sigterm_gets_the_previous_behaviour(seen: list[int]) -> None:
    with PreemptionNotice() as notice:
        _sigterm()
        _sigterm()
        assert notice.received and seen == [signal.SIGTERM]


def test_outside_the_main_thread_nothing_is_installed(seen: list[int]) -> None:
    before = signal.getsignal(signal.SIGTERM)
    errors: list[BaseException] = []
    received: list[bool] = []

    def loop() -> None:
        try:
            with PreemptionNotice() as notice:
                assert signal.getsignal(signal.SIGTERM) is before
                received.append(notice.received)
        except BaseException as err:  # noqa: BLE001 - reported to the main thread below
            errors.append(err)

    t = threading.Thread(target=loop)
    t.start()
    t.join()
    assert errors == [] and received == [False]
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_stop_request_is_a_notice_with_its_reason(seen: list[int]) -> None:
    asked: list[str] = []
    with PreemptionNotice(lambda: asked[0] if asked else None) as notice:
        assert notice.reason() is None
        asked.append("preempted: node n1 draining (spot reclaim), deadline T")
        assert notice.reason() == asked[0] and not notice.received
        _sigterm()
        assert notice.reason() == "SIGTERM"  # the signal is the more urgent of the two
    assert seen == []
