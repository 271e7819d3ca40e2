"""Adapter upload/fetch and the node cache, over a folder bucket and a real S3 server."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from lorajobs.jobspecs.failures import (
    IntegrityError,
    ObjectNotFound,
    StorageAuthError,
    UserDataError,
)
from lorajobs.storage.adapters import delete_adapter, fetch_adapter, list_adapters, upload_adapter
from lorajobs.storage.backends import open_storage
from lorajobs.storage.pull import pull_dataset, pull_model
from lorajobs.storage.s3 import S3Storage

REPO = Path(__file__).resolve().parents[2]
FILES = {
    "adapter_model.safetensors": os.urandom(200_000),
    "adapter_config.json": b'{"r": 4}',
    "README.md": b"# my adapter",
}


def make_adapter(d: Path, files: dict[str, bytes] = FILES, base_model: str = "org/base") -> Path:
    for rel, data in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(data)
    sums = {r: {"sha256": hashlib.sha256(b).hexdigest(), "size": len(b)} for r, b in files.items()}
    (d / "lorajobs.json").write_text(json.dumps({"base_model": base_model, "files": sums}))
    return d


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.slow)])
def bucket_uri(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "file":
        yield (tmp_path / "bucket").as_uri()
    else:
        yield request.getfixturevalue("s3_env").uri


def test_upload_fetch_round_trip(bucket_uri: str, tmp_path: Path) -> None:
    dest = f"{bucket_uri}/adapters/my-lora/job-1"
    upload_adapter(make_adapter(tmp_path / "src"), dest)
    paths = fetch_adapter(dest, tmp_path / "out")
    assert [p.name for p in paths] == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "lorajobs.json",
    ]
    for rel, data in FILES.items():
        assert (tmp_path / "out" / rel).read_bytes() == data
    (found,) = list_adapters(bucket_uri)
    assert (found["name"], found["job_id"], found["base_model"]) == ("my-lora", "job-1", "org/base")
    assert found["uri"].endswith("/adapters/my-lora/job-1") and found["files"] == 3
    assert delete_adapter(dest) == 4
    assert list_adapters(bucket_uri) == []
    with pytest.raises(ObjectNotFound, match="no complete adapter here"):
        fetch_adapter(dest, tmp_path / "again")


def test_partial_upload_is_invisible(bucket_uri: str, tmp_path: Path) -> None:
    st = open_storage(f"{bucket_uri}/adapters/n/j")
    st.put_bytes(b"half", "adapter_model.safetensors")  # cancelled before the marker
    assert list_adapters(bucket_uri) == []
    with pytest.raises(ObjectNotFound, match="no complete adapter here"):
        fetch_adapter(f"{bucket_uri}/adapters/n/j", tmp_path / "out")
    assert delete_adapter(f"{bucket_uri}/adapters/n/j") == 1
    assert st.list() == []


def test_fetch_refuses_traversal(bucket_uri: str, tmp_path: Path) -> None:
    st = open_storage(f"{bucket_uri}/adapters/evil/j")
    sha = hashlib.sha256(b"pwn").hexdigest()
    st.put_bytes(b"pwn", "x")
    marker = {"files": {"../../etc/x": {"sha256": sha, "size": 3}}}
    st.put_bytes(json.dumps(marker).encode(), "lorajobs.json")
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(IntegrityError, match=r"unsafe file path '\.\./\.\./etc/x'"):
        fetch_adapter(f"{bucket_uri}/adapters/evil/j", out)
    assert not (tmp_path / "a" / "etc").exists() and not (tmp_path / "etc").exists()
    assert not out.exists()  # refused before any folder is made


def test_fetch_detects_corruption(bucket_uri: str, tmp_path: Path) -> None:
    dest = f"{bucket_uri}/adapters/n/j"
    upload_adapter(make_adapter(tmp_path / "src"), dest)
    open_storage(dest).put_bytes(b"bit rot", "adapter_model.safetensors")
    with pytest.raises(IntegrityError, match="adapter_model.safetensors: sha256 mismatch"):
        fetch_adapter(dest, tmp_path / "out")
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "out" / "lorajobs.json").exists()


# -- pull through the node cache (S3) ---------------------------------------------------------


def _put_dataset(uri: str, n: int = 12) -> None:
    st = open_storage(uri)
    for i in range(n):
        st.put_bytes(f"image {i}".encode() * 500, f"img-{i:02d}.png")
        st.put_bytes(f"caption {i}".encode(), f"img-{i:02d}.txt")


def _count_gets(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record each object GET (whole or ranged); the real one still happens."""
    seen: list[str] = []
    lock = threading.Lock()
    for name in ("get_file", "get_bytes", "get_range"):
        real = getattr(S3Storage, name)

        def counting(self: S3Storage, key: str, *args, _real=real, **kwargs):  # type: ignore[no-untyped-def]
            with lock:
                seen.append(key)
            return _real(self, key, *args, **kwargs)

        monkeypatch.setattr(S3Storage, name, counting)
    return seen


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}


@pytest.mark.slow
def test_pull_dataset_twice_downloads_once(s3_env, tmp_path: Path, monkeypatch) -> None:
    uri = f"{s3_env.uri}/datasets/cats"
    _put_dataset(uri)
    gets = _count_gets(monkeypatch)
    first = pull_dataset(uri, tmp_path / "cache")
    assert len(gets) == 24 and sorted(p.name for p in first.iterdir())[:2] == [
        "img-00.png",
        "img-00.txt",
    ]
    before = _snapshot(first)
    assert pull_dataset(uri + "/", tmp_path / "cache") == first
    assert len(gets) == 24 and _snapshot(first) == before  # zero bytes the second time
    # Changed data is a new cache entry, not a stale hit.
    open_storage(uri).put_bytes(b"new row", "img-99.txt")
    second = pull_dataset(uri, tmp_path / "cache")
    assert second != first and (second / "img-99.txt").read_bytes() == b"new row"


@pytest.mark.slow
def test_pull_single_object(s3_env, tmp_path: Path) -> None:
    open_storage(s3_env.uri).put_bytes(b'{"text": "a"}\n', "datasets/rows.jsonl")
    path = pull_dataset(f"{s3_env.uri}/datasets/rows.jsonl", tmp_path / "cache")
    assert path.name == "rows.jsonl" and path.read_bytes() == b'{"text": "a"}\n'


@pytest.mark.slow
def test_concurrent_thread_pulls_download_once(s3_env, tmp_path: Path, monkeypatch) -> None:
    uri = f"{s3_env.uri}/datasets/dogs"
    _put_dataset(uri, n=10)
    gets = _count_gets(monkeypatch)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(pull_dataset(uri, tmp_path / "c")))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and len(set(results)) == 1 and len(gets) == 20
    entries = [p for p in (tmp_path / "c" / "datasets").iterdir() if not p.name.startswith(".")]
    assert entries == [results[0]] and len(list(results[0].iterdir())) == 20


_CHILD = """
import json, sys, threading
from pathlib import Path
from lorajobs.storage.s3 import S3Storage
from lorajobs.storage.pull import pull_dataset
n = 0
lock = threading.Lock()
def wrap(real):
    def counting(self, key, *args):
        global n
        with lock:
            n += 1
        return real(self, key, *args)
    return counting
for name in ("get_file", "get_bytes", "get_range"):
    setattr(S3Storage, name, wrap(getattr(S3Storage, name)))
path = pull_dataset(sys.argv[1], Path(sys.argv[2]))
print(json.dumps({"path": str(path), "gets": n}))
"""


@pytest.mark.slow
def test_concurrent_process_pulls_download_once(s3_env, tmp_path: Path) -> None:
    uri = f"{s3_env.uri}/datasets/birds"
    _put_dataset(uri, n=15)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, uri, str(tmp_path / "cache")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert len({o["path"] for o in outs}) == 1
    assert sum(o["gets"] for o in outs) == 30  # one process downloaded, the others waited
    entry = Path(outs[0]["path"])
    assert len(list(entry.iterdir())) == 30
    assert list((tmp_path / "cache" / "datasets" / ".tmp").iterdir()) == []


@pytest.mark.slow
def test_pull_missing_prefix_is_user_error(s3_env, tmp_path: Path) -> None:
    uri = f"{s3_env.uri}/datasets/nothing-here"
    with pytest.raises(UserDataError) as info:
        pull_dataset(uri, tmp_path / "cache")
    assert str(info.value) == f"dataset {uri}: not found (no objects under this prefix)"
    with pytest.raises(UserDataError, match=f"^base model {s3_env.uri}/models/none: not found$"):
        pull_model(f"{s3_env.uri}/models/none", tmp_path / "cache")


@pytest.mark.slow
def test_pull_model_from_s3_and_auth_error_propagates(s3_env, tmp_path: Path, monkeypatch) -> None:
    uri = f"{s3_env.uri}/models/tiny"
    st = open_storage(uri)
    st.put_bytes(b"{}", "unet/config.json")
    st.put_bytes(b"w" * 1000, "unet/diffusion_pytorch_model.safetensors")
    path = pull_model(uri, tmp_path / "cache")
    assert (path / "unet" / "config.json").read_bytes() == b"{}"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(StorageAuthError):
        pull_dataset(f"{s3_env.uri}/datasets/x", tmp_path / "cache")
