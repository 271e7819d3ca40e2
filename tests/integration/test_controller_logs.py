"""The worker's attempt log, streamed to the bucket while it runs (folder bucket and a real S3
server): logging, prints and progress lines arrive within seconds, the whole log at the end,
and credentials never appear in it."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from lorajobs.storage.logs import AttemptLog, read_log


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.slow)])
def bucket(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "file":
        return f"file://{tmp_path / 'bucket'}"
    return str(request.getfixturevalue("s3_env").uri) + "/lorajobs"


def _wait_for(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_the_log_streams_while_the_attempt_runs_and_is_whole_at_the_end(bucket: str) -> None:
    assert read_log(bucket, "job1", 1) is None
    handlers, stdout = list(logging.getLogger().handlers), sys.stdout
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
    with AttemptLog(bucket, "job1", 1, every_s=0.2) as log:
        log.line("step 1/10  loss 2.0000")
        logging.getLogger("worker.trainer").info("loading the model")
        print("a print from the trainer")
        logging.getLogger("noisy").debug("not at INFO")
        _wait_for(lambda: b"a print" in (read_log(bucket, "job1", 1) or b""))
        log.line("step 10/10  loss 1.0000")
    text = (read_log(bucket, "job1", 1) or b"").decode()
    lines = text.splitlines()
    assert lines[0].endswith("Z step 1/10  loss 2.0000")
    assert "INFO worker.trainer: loading the model" in text and "a print from the trainer" in text
    assert "not at INFO" not in text and lines[-1].endswith("step 10/10  loss 1.0000")
    if secret:
        assert secret not in text
    # Attempts keep separate logs; the process's streams are given back.
    with AttemptLog(bucket, "job1", 2, every_s=0.2) as log:
        log.line("second attempt")
    assert b"second attempt" in (read_log(bucket, "job1", 2) or b"")
    assert b"second attempt" not in (read_log(bucket, "job1", 1) or b"")
    assert logging.getLogger().handlers == handlers and sys.stdout is stdout


def test_library_chatter_stays_out_of_the_attempt_log(tmp_path: Path) -> None:
    """botocore logs "Found credentials in environment variables" at INFO for every client:
    a job's log keeps only the libraries' warnings, and everything of ours."""
    import logging

    from lorajobs.storage.logs import AttemptLog, read_log

    bucket = (tmp_path / "bucket").as_uri()
    with AttemptLog(bucket, "job1", 1, every_s=60):
        logging.getLogger("botocore.credentials").info(
            "Found credentials in environment variables."
        )
        logging.getLogger("urllib3.connectionpool").info("Starting new HTTPS connection")
        logging.getLogger("botocore.retryhandler").warning("retry needed")
        logging.getLogger("lorajobs.worker").info("pulling the model")
    text = (read_log(bucket, "job1", 1) or b"").decode()
    assert "Found credentials" not in text and "Starting new HTTPS" not in text
    assert "WARNING botocore.retryhandler: retry needed" in text
    assert "INFO lorajobs.worker: pulling the model" in text
