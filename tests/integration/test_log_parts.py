"""The attempt log as appended parts (folder bucket and a real S3 server): each upload sends only
the bytes written since the previous one, the parts concatenate to the whole log, a follower
reading from an offset gets exactly the tail, and logs of older versions (one whole file) are
still read."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from lorajobs.storage.backends import open_storage
from lorajobs.storage.logs import (
    AttemptLog,
    list_parts,
    log_name,
    logs_uri,
    part_name,
    read_log,
    read_log_from,
)


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.slow)])
def bucket(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "file":
        return f"file://{tmp_path / 'bucket'}"
    return str(request.getfixturevalue("s3_env").uri) + "/lorajobs"


def _parts(bucket: str, job: str, attempt: int) -> list[tuple[int, int]]:
    """(number, size) of each part in the bucket."""
    storage = open_storage(logs_uri(bucket, job))
    return [(n, obj.size) for n, obj in list_parts(storage, attempt)]


def _wait_for_parts(bucket: str, count: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while len(_parts(bucket, "job1", 1)) < count:
        assert time.monotonic() < deadline, "timed out waiting for a part"
        time.sleep(0.02)


def test_each_upload_is_a_new_part_of_only_the_new_bytes(bucket: str) -> None:
    written = []
    with AttemptLog(bucket, "job1", 1, every_s=0.1) as log:
        for tick in range(4):
            text = "".join(f"tick {tick} line {i} ünïcode\n" for i in range(3))
            log.write(text)  # one write: one tick uploads it whole
            written.append(text)
            _wait_for_parts(bucket, tick + 1)  # this tick's bytes are up before the next
        log.write("the last words\n")  # no tick: the final part at exit sends them
        written.append("the last words\n")
    everything = "".join(written).encode()

    parts = _parts(bucket, "job1", 1)
    assert len(parts) == 5, parts
    assert [n for n, _ in parts] == list(range(1, len(parts) + 1))
    assert all(size > 0 for _, size in parts)
    # Nothing was uploaded twice: the parts add up to exactly what was written.
    assert sum(size for _, size in parts) == len(everything)
    assert read_log(bucket, "job1", 1) == everything
    assert open_storage(logs_uri(bucket, "job1")).get_bytes(part_name(1, 2)) == written[1].encode()

    # A follower: from any offset, exactly the tail; from the end, nothing.
    for offset in (0, 1, parts[0][1], parts[0][1] + 5, len(everything) - 1, len(everything)):
        assert read_log_from(bucket, "job1", 1, offset) == everything[offset:], offset
    assert read_log_from(bucket, "job1", 1, len(everything) + 10) == b""
    followed, offset = b"", 0
    for _ in range(3):
        chunk = read_log_from(bucket, "job1", 1, offset)
        followed, offset = followed + chunk, offset + len(chunk)
    assert followed == everything


def test_the_buffer_is_emptied_by_each_upload(bucket: str) -> None:
    with AttemptLog(bucket, "job1", 1, every_s=3600) as log:
        log.write("a" * 1000)
        log.upload()
        assert log._buffer.getvalue() == "" and log._pending == b""
        log.upload()  # nothing new: no empty part
        log.write("b" * 10)
    assert _parts(bucket, "job1", 1) == [(1, 1000), (2, 10)]


def test_a_rerun_attempt_continues_after_its_parts(bucket: str) -> None:
    with AttemptLog(bucket, "job1", 1, every_s=3600) as log:
        log.write("first run\n")
    with AttemptLog(bucket, "job1", 1, every_s=3600) as log:
        log.write("second run\n")
    assert [n for n, _ in _parts(bucket, "job1", 1)] == [1, 2]
    assert read_log(bucket, "job1", 1) == b"first run\nsecond run\n"


def test_nothing_yet_and_the_single_file_of_older_versions(bucket: str) -> None:
    assert read_log(bucket, "job1", 1) is None
    assert read_log_from(bucket, "job1", 1, 0) == b""
    open_storage(logs_uri(bucket, "job1")).put_bytes(b"old line 1\nold line 2\n", log_name(1))
    assert read_log(bucket, "job1", 1) == b"old line 1\nold line 2\n"
    assert read_log_from(bucket, "job1", 1, 11) == b"old line 2\n"
    # attempt-1.log is not attempt-10's, nor attempt-1/ attempt-10/'s.
    assert read_log(bucket, "job1", 10) is None
    with AttemptLog(bucket, "job1", 10, every_s=3600) as log:
        log.write("tenth\n")
    assert read_log(bucket, "job1", 1) == b"old line 1\nold line 2\n"
    assert read_log(bucket, "job1", 10) == b"tenth\n"
