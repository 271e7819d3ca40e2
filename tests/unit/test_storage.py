"""Storage, pull and transfer logic on local folders only: no server, no network."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import pytest

from lorajobs.jobspecs.failures import (
    IntegrityError,
    InvalidInput,
    ObjectNotFound,
    StorageError,
    UserDataError,
)
from lorajobs.storage.adapters import delete_adapter, fetch_adapter, list_adapters, upload_adapter
from lorajobs.storage.backends import open_storage
from lorajobs.storage.base import ObjectInfo, join_uri, safe_key
from lorajobs.storage.files import FileStorage
from lorajobs.storage.pull import pull_dataset, pull_model, pull_to_cache
from lorajobs.storage.s3 import S3Storage
from lorajobs.storage.transfer import sha256_file


def make_adapter(d: Path, files: dict[str, bytes], base_model: str = "tiny/base") -> Path:
    """An adapter folder as the worker leaves it: files plus a marker listing them."""
    for rel, data in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(data)
    marker = {
        "base_model": base_model,
        "files": {
            rel: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
            for rel, data in files.items()
        },
    }
    (d / "lorajobs.json").write_text(json.dumps(marker))
    return d


ADAPTER = {
    "adapter_model.safetensors": b"\x00" * 1000 + b"w",
    "adapter_config.json": b"{}",
    "extra/README.md": b"# card",
}


class CountingStorage:
    """A real FileStorage that counts downloads (requests and bytes a pull made) and can
    break off after `fail_after` requests, as a dropped connection would."""

    def __init__(self, inner: FileStorage, fail_after: int | None = None):
        self.inner, self.uri = inner, inner.uri
        self.gets = 0
        self.bytes = 0
        self.fail_after = fail_after
        self._lock = threading.Lock()

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        return self.inner.list(prefix)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def _request(self) -> None:
        with self._lock:
            self.gets += 1
            if self.fail_after is not None and self.gets > self.fail_after:
                raise StorageError("connection dropped")

    def _got(self, data: bytes) -> bytes:
        with self._lock:
            self.bytes += len(data)
        return data

    def get_bytes(self, key: str) -> bytes:
        self._request()
        return self._got(self.inner.get_bytes(key))

    def get_range(self, key: str, start: int, length: int) -> bytes:
        self._request()
        return self._got(self.inner.get_range(key, start, length))


# -- keys and URIs ---------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/etc/passwd", "a/..", ".."])
def test_safe_key_refuses_escapes(key: str) -> None:
    with pytest.raises(InvalidInput):
        safe_key(key)


def test_safe_key_normalises() -> None:
    assert safe_key("a/./b") == "a/b"
    assert safe_key("a\\b") == "a/b"


def test_join_uri() -> None:
    assert join_uri("s3://b/x/", "adapters", "n/") == "s3://b/x/adapters/n"
    with pytest.raises(InvalidInput):
        join_uri("s3://b", "../other")


def test_open_storage_schemes(tmp_path: Path) -> None:
    assert isinstance(open_storage(str(tmp_path)), FileStorage)
    assert open_storage(tmp_path.as_uri()).uri == tmp_path.resolve().as_uri()
    s3 = open_storage("s3://bkt/some/prefix/")
    assert isinstance(s3, S3Storage) and s3.uri == "s3://bkt/some/prefix"
    with pytest.raises(InvalidInput, match="unsupported"):
        open_storage("gs://bkt")


# -- FileStorage -----------------------------------------------------------------------------


def test_file_storage_basics(tmp_path: Path) -> None:
    st = FileStorage(tmp_path / "bucket")
    st.put_bytes(b"one", "a/one.txt")
    src = tmp_path / "src.bin"
    src.write_bytes(b"two")
    st.put_file(src, "a/b/two.bin")
    st.put_bytes(b"x", "ab/other")
    assert [o.key for o in st.list("a")] == ["a/b/two.bin", "a/one.txt"]
    assert [(o.key, o.size) for o in st.list("a/one.txt")] == [("a/one.txt", 3)]
    assert st.exists("a/one.txt") and not st.exists("a/nope")
    st.get_file("a/b/two.bin", tmp_path / "out" / "two.bin")
    assert (tmp_path / "out" / "two.bin").read_bytes() == b"two"
    with pytest.raises(ObjectNotFound):
        st.get_bytes("a/nope")
    assert st.delete_prefix("a") == 2
    assert [o.key for o in st.list()] == ["ab/other"]
    assert not (tmp_path / "bucket" / "a").exists()  # empty folders go with their objects


# -- S3Storage configuration (no request is made) --------------------------------------------


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    for var in list(os.environ):
        if var.startswith("AWS_") or var == "LORAJOBS_S3_ADDRESSING":
            monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-never-printed")
    return monkeypatch


def test_s3_custom_endpoint_uses_path_style(aws_env: pytest.MonkeyPatch) -> None:
    aws_env.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    aws_env.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:8")  # the service-specific one wins
    st = S3Storage("bkt", "p")
    assert st.endpoint == "http://127.0.0.1:8"
    assert st.client.meta.config.s3["addressing_style"] == "path"
    assert st.client.meta.region_name == "us-east-1"
    assert st.client.meta.config.retries["mode"] == "standard"


def test_s3_endpoint_from_aws_config_file(aws_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "aws-config"
    config.write_text("[default]\nendpoint_url = http://127.0.0.1:7\n")
    aws_env.setenv("AWS_CONFIG_FILE", str(config))
    st = S3Storage("bkt")
    assert st.endpoint == "http://127.0.0.1:7"
    assert st.client.meta.config.s3["addressing_style"] == "path"


def test_s3_aws_defaults_to_virtual_style(aws_env: pytest.MonkeyPatch) -> None:
    aws_env.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    st = S3Storage("bkt")
    assert "amazonaws.com" in st.endpoint
    assert st.client.meta.config.s3["addressing_style"] == "virtual"
    assert st.client.meta.region_name == "eu-west-1"


def test_s3_addressing_override(aws_env: pytest.MonkeyPatch) -> None:
    aws_env.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    aws_env.setenv("LORAJOBS_S3_ADDRESSING", "virtual")
    assert S3Storage("bkt").client.meta.config.s3["addressing_style"] == "virtual"
    aws_env.setenv("LORAJOBS_S3_ADDRESSING", "sideways")
    with pytest.raises(InvalidInput, match="LORAJOBS_S3_ADDRESSING"):
        _ = S3Storage("bkt").client


def test_s3_unreachable_endpoint_is_one_line(aws_env: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    aws_env.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    aws_env.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(StorageError) as info:
        S3Storage("bkt", "data").list()
    msg = str(info.value)
    assert f"127.0.0.1:{port}" in msg and "\n" not in msg
    assert "s3cr3t" not in msg and info.value.__cause__ is None


# -- transfer over a folder bucket -----------------------------------------------------------


def test_sha256_file(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"abc" * 1_000_000)
    assert sha256_file(p, chunk=4096) == hashlib.sha256(b"abc" * 1_000_000).hexdigest()


def test_upload_fetch_round_trip_and_resume(tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "src", ADAPTER)
    dest = join_uri((tmp_path / "bucket").as_uri(), "adapters", "n", "job1")
    upload_adapter(src, dest)
    out = tmp_path / "out"
    paths = fetch_adapter(dest, out)
    assert paths[-1] == out.resolve() / "lorajobs.json"
    for rel, data in ADAPTER.items():
        assert (out / rel).read_bytes() == data
    # A second fetch keeps good files (same inode) and repairs a damaged one.
    keep = (out / "adapter_config.json").stat().st_ino
    (out / "extra/README.md").write_bytes(b"damaged")
    fetch_adapter(dest, out)
    assert (out / "adapter_config.json").stat().st_ino == keep
    assert (out / "extra/README.md").read_bytes() == ADAPTER["extra/README.md"]


def test_fetch_without_marker_is_not_found(tmp_path: Path) -> None:
    bucket = FileStorage(tmp_path / "bucket")
    bucket.put_bytes(b"w", "adapters/n/j/adapter_model.safetensors")  # a broken-off upload
    with pytest.raises(ObjectNotFound, match="no complete adapter here"):
        fetch_adapter(f"{bucket.uri}/adapters/n/j", tmp_path / "out")


@pytest.mark.parametrize("evil", ["../../etc/x", "/etc/x", "a/../../x", "..\\x"])
def test_fetch_refuses_paths_outside_out_dir(tmp_path: Path, evil: str) -> None:
    bucket = FileStorage(tmp_path / "bucket")
    sha = hashlib.sha256(b"evil").hexdigest()
    bucket.put_bytes(b"evil", "a/j/payload")
    marker = {"files": {"ok.txt": {"sha256": sha, "size": 4}, evil: {"sha256": sha, "size": 4}}}
    bucket.put_bytes(json.dumps(marker).encode(), "a/j/lorajobs.json")
    out = tmp_path / "deep" / "out"
    with pytest.raises(IntegrityError, match="unsafe file path"):
        fetch_adapter(f"{bucket.uri}/a/j", out)
    written = [p for p in tmp_path.rglob("*") if p.is_file() and "bucket" not in p.parts]
    assert written == []


def test_fetch_corrupted_object_fails_and_leaves_nothing(tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "src", ADAPTER)
    dest = f"{(tmp_path / 'bucket').as_uri()}/adapters/n/j"
    upload_adapter(src, dest)
    FileStorage(tmp_path / "bucket").put_bytes(b"tampered", "adapters/n/j/adapter_config.json")
    out = tmp_path / "out"
    with pytest.raises(IntegrityError, match="adapter_config.json: sha256 mismatch"):
        fetch_adapter(dest, out)
    assert not (out / "adapter_config.json").exists()
    assert not (out / "lorajobs.json").exists()  # never marked complete
    assert not [p for p in out.rglob(".*") if p.is_file()]  # no temp files left


def test_upload_refuses_symlinks_and_missing_marker(tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "src", ADAPTER)
    (tmp_path / "secret").write_text("x")
    (src / "link").symlink_to(tmp_path / "secret")
    with pytest.raises(InvalidInput, match="symlink"):
        upload_adapter(src, (tmp_path / "bucket").as_uri())
    (src / "link").unlink()
    (src / "lorajobs.json").unlink()
    with pytest.raises(InvalidInput, match="lorajobs.json"):
        upload_adapter(src, (tmp_path / "bucket").as_uri())


def test_reupload_replaces_leftovers(tmp_path: Path) -> None:
    dest = f"{(tmp_path / 'bucket').as_uri()}/adapters/n/j"
    upload_adapter(make_adapter(tmp_path / "a1", {"old.bin": b"old", "w.bin": b"1"}), dest)
    upload_adapter(make_adapter(tmp_path / "a2", {"w.bin": b"2"}), dest)
    assert sorted(o.key for o in open_storage(dest).list()) == ["lorajobs.json", "w.bin"]


def test_list_and_delete_adapters(tmp_path: Path) -> None:
    bucket = (tmp_path / "bucket").as_uri()
    upload_adapter(make_adapter(tmp_path / "a", ADAPTER, "org/base-a"), f"{bucket}/adapters/a/j1")
    upload_adapter(
        make_adapter(tmp_path / "b", {"w": b"w"}, "org/base-b"), f"{bucket}/adapters/b/j2"
    )
    FileStorage(tmp_path / "bucket").put_bytes(b"partial", "adapters/c/j3/w")  # no marker
    found = {a["name"]: a for a in list_adapters(bucket)}
    assert sorted(found) == ["a", "b"]
    assert found["a"]["job_id"] == "j1" and found["a"]["base_model"] == "org/base-a"
    assert found["a"]["uri"].endswith("/adapters/a/j1") and found["a"]["created"]
    assert found["b"]["size"] == 1 + (tmp_path / "b" / "lorajobs.json").stat().st_size
    assert delete_adapter(f"{bucket}/adapters/a/j1") == 4
    assert [a["name"] for a in list_adapters(bucket)] == ["b"]


# -- pull through the node cache -------------------------------------------------------------


def _dataset(tmp_path: Path, n: int = 5) -> FileStorage:
    st = FileStorage(tmp_path / "bucket")
    for i in range(n):
        st.put_bytes(f"row {i}\n".encode() * 100, f"datasets/ds/part-{i}.txt")
    return st


def test_pull_to_cache_downloads_once(tmp_path: Path) -> None:
    st = CountingStorage(_dataset(tmp_path))
    kw = dict(uri="x://ds", missing="dataset x://ds: not found")
    first = pull_to_cache(st, "datasets/ds", tmp_path / "cache", **kw)
    assert st.gets == 5 and sorted(p.name for p in first.iterdir())[0] == "part-0.txt"
    assert pull_to_cache(st, "datasets/ds", tmp_path / "cache", **kw) == first
    assert st.gets == 5  # the second pull transferred nothing


def test_pull_to_cache_concurrent_threads_download_once(tmp_path: Path) -> None:
    st = CountingStorage(_dataset(tmp_path, n=20))
    results: list[Path] = []

    def pull() -> None:
        results.append(
            pull_to_cache(
                st, "datasets/ds", tmp_path / "cache", uri="x://ds", missing="nope", concurrency=2
            )
        )

    threads = [threading.Thread(target=pull) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and st.gets == 20
    entries = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    assert entries == [results[0]] and len(list(results[0].iterdir())) == 20


def test_pull_interrupted_leaves_no_entry(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    broken = CountingStorage(_dataset(tmp_path), fail_after=2)
    with pytest.raises(StorageError):
        pull_to_cache(broken, "datasets/ds", cache, uri="x://ds", missing="nope", concurrency=1)
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".")] == []
    path = pull_to_cache(
        CountingStorage(broken.inner), "datasets/ds", cache, uri="x://ds", missing="nope"
    )
    assert len(list(path.iterdir())) == 5
    assert list((cache / ".tmp").iterdir()) == []  # the crashed attempt's temp folder is gone


def test_pull_single_object_returns_the_file(tmp_path: Path) -> None:
    st = FileStorage(tmp_path / "bucket")
    st.put_bytes(b'{"text": "hi"}\n', "datasets/rows.jsonl")
    path = pull_to_cache(st, "datasets/rows.jsonl", tmp_path / "cache", uri="x://r", missing="nope")
    assert path.name == "rows.jsonl" and path.read_bytes() == b'{"text": "hi"}\n'


def test_pull_missing_prefix_is_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserDataError, match="dataset x://gone: not found"):
        pull_to_cache(
            FileStorage(tmp_path / "b"),
            "gone",
            tmp_path / "c",
            uri="x://gone",
            missing="dataset x://gone: not found (no objects under this prefix)",
        )


def test_pull_local_paths_are_used_in_place(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    assert pull_dataset(str(tmp_path / "data"), tmp_path / "cache") == tmp_path / "data"
    assert pull_dataset((tmp_path / "data").as_uri(), tmp_path / "cache") == tmp_path / "data"
    assert pull_model(str(tmp_path / "data"), tmp_path / "cache") == tmp_path / "data"
    assert not (tmp_path / "cache").exists()
    with pytest.raises(UserDataError, match=f"dataset {tmp_path}/nope: not found"):
        pull_dataset(str(tmp_path / "nope"), tmp_path / "cache")
    with pytest.raises(UserDataError, match="base model ./no/such/model: not found"):
        pull_model("./no/such/model", tmp_path / "cache")
    with pytest.raises(UserDataError, match="base model file:///no/such: not found"):
        pull_model("file:///no/such", tmp_path / "cache")
