"""The S3 server goes away in the middle of a transfer (real SeaweedFS, stopped by PID):
nothing half-done looks finished, and running the same operation again after a restart
completes it and verifies every byte. Permanent errors fail at once, in one line."""

from __future__ import annotations

import hashlib
import os
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import pytest

from lorajobs.jobspecs.failures import ObjectNotFound, StorageAuthError, StorageError
from lorajobs.storage.adapters import fetch_adapter, list_adapters, upload_adapter
from lorajobs.storage.base import BytesCallback
from lorajobs.storage.pull import pull_dataset
from lorajobs.storage.s3 import S3Storage
from lorajobs.storage.staging import local_manifest, stage_path
from lorajobs.storage.transfer import sha256_file
from tests.integration.test_transfer import make_adapter

pytestmark = pytest.mark.slow
MIB = 1024 * 1024


class _StopServer:
    """Stops the server from a helper thread once `trip()` is called; the caller then waits
    until it is really down, so what it does next meets a stopped server."""

    def __init__(self, server: Any):
        self.server = server
        self.tripped = threading.Event()
        self.down = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        if self.tripped.wait(120):
            # SIGTERM; a server that waits on a request we hold up gets SIGKILL after 5 s.
            self.server.stop(timeout=5)
        self.down.set()

    def trip(self) -> None:
        if not self.tripped.is_set():
            self.tripped.set()
            assert self.down.wait(60), "the server did not stop"

    def join(self) -> None:
        self.tripped.set()  # unblock the helper if nothing tripped it
        self.thread.join(60)


@pytest.fixture
def fast_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    # botocore retries a refused connection with backoff; two tries keep the test short.
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")


def _big_adapter(tmp_path: Path) -> tuple[Path, bytes]:
    big = os.urandom(30 * MIB)
    return make_adapter(
        tmp_path / "src", {"adapter_model.safetensors": big, "adapter_config.json": b'{"r": 4}'}
    ), big


def test_server_stopped_mid_upload_leaves_no_adapter_and_a_retry_completes(
    s3_env: Any, tmp_path: Path, fast_fail: None
) -> None:
    src, big = _big_adapter(tmp_path)
    dest = f"{s3_env.uri}/adapters/faulty/job-1"
    stopper = _StopServer(s3_env.server)

    class StopsMidUpload(S3Storage):
        def put_file(self, local: Path, key: str, *, callback: BytesCallback = None) -> None:
            sent = [0]

            def watch(n: int) -> None:
                sent[0] += n
                if sent[0] >= 10 * MIB:  # two 5 MiB parts are on their way
                    stopper.trip()

            super().put_file(local, key, callback=watch)

    storage = StopsMidUpload(
        s3_env.bucket,
        "adapters/faulty/job-1",
        multipart_threshold=5 * MIB,
        multipart_chunksize=5 * MIB,
        max_concurrency=2,
    )
    try:
        with pytest.raises(StorageError) as info:
            upload_adapter(src, dest, storage=storage, concurrency=1)
        assert "\n" not in str(info.value)
    finally:
        stopper.join()
        s3_env.server.start()
    assert stopper.tripped.is_set() and stopper.down.is_set()

    # Nothing looks finished: no marker, no listing, fetch refuses.
    fresh = S3Storage(s3_env.bucket, "adapters/faulty/job-1")
    assert not fresh.exists("lorajobs.json")
    assert not fresh.exists("adapter_model.safetensors")  # its multipart never completed
    assert list_adapters(s3_env.uri) == []
    with pytest.raises(ObjectNotFound, match="no complete adapter here"):
        fetch_adapter(dest, tmp_path / "early")

    # The retry (what the job's next attempt does) completes and verifies.
    upload_adapter(src, dest)
    (found,) = list_adapters(s3_env.uri)
    assert found["uri"] == dest
    fetch_adapter(dest, tmp_path / "out")
    assert (
        sha256_file(tmp_path / "out" / "adapter_model.safetensors")
        == hashlib.sha256(big).hexdigest()
    )
    # The broken attempt's parts were aborted, not left to cost storage.
    uploads = s3_env.server.client().list_multipart_uploads(Bucket=s3_env.bucket)
    assert not uploads.get("Uploads")


def test_server_stopped_mid_fetch_then_fetch_again_resumes_and_verifies(
    s3_env: Any, tmp_path: Path, fast_fail: None
) -> None:
    src, big = _big_adapter(tmp_path)
    dest = f"{s3_env.uri}/adapters/big/job-2"
    upload_adapter(src, dest)
    stopper = _StopServer(s3_env.server)
    ranges: list[int] = []

    class StopsMidDownload(S3Storage):
        def get_range(self, key: str, start: int, length: int) -> bytes:
            if len(ranges) >= 2:  # two 5 MiB chunks are in: now the server goes
                stopper.trip()
            ranges.append(length)
            return super().get_range(key, start, length)

    out = tmp_path / "out"
    broken = StopsMidDownload(s3_env.bucket, "adapters/big/job-2")
    try:
        with pytest.raises(StorageError, match="cannot reach the S3 endpoint"):
            fetch_adapter(dest, out, storage=broken, chunk_size=5 * MIB, concurrency=1)
    finally:
        stopper.join()
        s3_env.server.start()
    assert not (out / "lorajobs.json").exists()  # not complete, and does not look it
    assert not (out / "adapter_model.safetensors").exists()

    got: list[int] = []

    class Counting(S3Storage):
        def get_range(self, key: str, start: int, length: int) -> bytes:
            got.append(length)
            return super().get_range(key, start, length)

    fetch_adapter(
        dest, out, storage=Counting(s3_env.bucket, "adapters/big/job-2"), chunk_size=5 * MIB
    )
    assert sha256_file(out / "adapter_model.safetensors") == hashlib.sha256(big).hexdigest()
    assert sum(got) == len(big) - 10 * MIB  # the two chunks already there were kept
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "lorajobs.json",
    ]


def test_server_stopped_mid_pull_leaves_no_cache_entry_then_pull_completes(
    s3_env: Any, tmp_path: Path, fast_fail: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for i in range(40):
        (data / f"{i:02d}.txt").write_bytes(os.urandom(1000))
    (data / "weights.bin").write_bytes(os.urandom(24 * MIB))
    staged = stage_path(data, s3_env.uri, "dataset")
    stopper = _StopServer(s3_env.server)
    calls = [0]
    real_range = S3Storage.get_range

    def stops(self: S3Storage, key: str, start: int, length: int) -> bytes:
        calls[0] += 1
        if calls[0] == 2:  # one 8 MiB chunk is in
            stopper.trip()
        return real_range(self, key, start, length)

    monkeypatch.setattr(S3Storage, "get_range", stops)
    cache = tmp_path / "cache"
    try:
        with pytest.raises(StorageError, match="cannot reach the S3 endpoint"):
            pull_dataset(staged.uri, cache, concurrency=1)
    finally:
        stopper.join()
        s3_env.server.start()
    assert [p.name for p in (cache / "datasets").iterdir() if not p.name.startswith(".")] == []

    monkeypatch.setattr(S3Storage, "get_range", real_range)
    entry = pull_dataset(staged.uri, cache)
    assert local_manifest(entry) == local_manifest(data)  # every byte verified, every name


def test_permanent_errors_fail_at_once_in_one_line(
    s3_env: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The default retry budget (5 tries with backoff) is in force: only a permanent error is fast.
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    src = make_adapter(tmp_path / "src", {"w.bin": b"w" * 1000})
    cases = [
        (
            "AWS_SECRET_ACCESS_KEY",
            "wrong-secret-0123456789",
            s3_env.uri,
            StorageAuthError,
            "access denied",
        ),
        # (The first request is a HEAD, whose 403 carries no error code: the line says so.)
        ("AWS_ACCESS_KEY_ID", "AKIDUNKNOWN000", s3_env.uri, StorageAuthError, "access denied"),
        (
            None,
            None,
            "s3://no-such-bucket-lj",
            ObjectNotFound,
            "s3://no-such-bucket-lj: no such bucket",
        ),
    ]
    for var, value, bucket, error, needle in cases:
        with monkeypatch.context() as m:
            if var:
                m.setenv(var, value)
            t0 = time.monotonic()
            with pytest.raises(error) as info:
                upload_adapter(src, f"{bucket}/adapters/n/j")
            assert time.monotonic() - t0 < 3.0, f"{needle}: retried a permanent error"
            msg = str(info.value)
            assert needle in msg and "\n" not in msg
            rendered = "".join(traceback.format_exception(info.value))
            assert s3_env.server.secret_key not in rendered and "wrong-secret" not in rendered
