"""Staging, manifest-driven pulls, resumable downloads and cache eviction, over folder buckets:
no server, no network. (The same behaviour against a real S3 server is in tests/integration.)"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import re
import threading
from pathlib import Path

import pytest

from lorajobs.jobspecs import parse_spec
from lorajobs.jobspecs.failures import IntegrityError, InvalidInput, SpecError, StorageError
from lorajobs.storage.adapters import fetch_adapter, upload_adapter
from lorajobs.storage.base import join_uri
from lorajobs.storage.cache import cache_limit_from_env, evict, release
from lorajobs.storage.files import FileStorage
from lorajobs.storage.pull import pull_dataset, pull_to_cache
from lorajobs.storage.staging import (
    MANIFEST_SUFFIX,
    local_manifest,
    manifest_digest,
    stage_local_inputs,
    stage_path,
    staged_parts,
)
from tests.unit.test_storage import CountingStorage, make_adapter

KIB = 1024


def make_dataset(d: Path, n: int = 6, big: int = 0) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (d / f"img-{i}.png").write_bytes(os.urandom(300 + i))
        (d / f"img-{i}.txt").write_text(f"caption {i}")
    (d / "sub").mkdir(exist_ok=True)
    (d / "sub" / "meta.json").write_text("{}")
    if big:
        (d / "big.bin").write_bytes(os.urandom(big))
    return d


class PutCounter(FileStorage):
    """A folder bucket that counts the objects written to it."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.puts: list[str] = []

    def put_file(self, local: Path, key: str, *, callback=None) -> None:  # type: ignore[no-untyped-def]
        self.puts.append(key)
        super().put_file(local, key, callback=callback)

    def put_bytes(self, data: bytes, key: str) -> None:
        self.puts.append(key)
        super().put_bytes(data, key)


# -- staging ---------------------------------------------------------------------------------


def test_stage_twice_uploads_once(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data")
    (data / ".DS_Store").write_bytes(b"junk")  # hidden: not staged
    bucket = PutCounter(tmp_path / "bucket")
    first = stage_path(data, bucket.uri, "dataset", storage=bucket)
    digest = manifest_digest(local_manifest(data))
    assert first.digest == digest and first.uri == f"{bucket.uri}/datasets/{digest}"
    assert first.files == 13 and first.uploaded_files == 13 and not first.already
    # The manifest is written last, next to the folder (not inside the data).
    assert bucket.puts[-1] == f"datasets/{digest}{MANIFEST_SUFFIX}"
    assert len(bucket.puts) == 14 and not any(".DS_Store" in k for k in bucket.puts)

    again = stage_path(data, bucket.uri, "dataset", storage=bucket)
    assert again.uri == first.uri and again.already and again.uploaded_bytes == 0
    assert len(bucket.puts) == 14  # nothing uploaded the second time

    # Changed data is another digest, another folder.
    (data / "img-0.txt").write_text("a new caption")
    changed = stage_path(data, bucket.uri, "dataset", storage=bucket)
    assert changed.digest != digest and changed.uploaded_files == 13


def test_interrupted_staging_resumes_with_what_is_missing(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data")
    bucket = PutCounter(tmp_path / "bucket")
    staged = stage_path(data, bucket.uri, "model", storage=bucket)
    assert staged.uri.startswith(f"{bucket.uri}/models/")
    # As if it broke off: two objects and the manifest never arrived.
    bucket.delete_prefix(f"models/{staged.digest}{MANIFEST_SUFFIX}")
    bucket.delete_prefix(f"models/{staged.digest}/img-1.png")
    bucket.delete_prefix(f"models/{staged.digest}/sub/meta.json")
    bucket.puts.clear()
    again = stage_path(data, bucket.uri, "model", storage=bucket)
    assert sorted(bucket.puts) == sorted(
        [
            f"models/{staged.digest}/img-1.png",
            f"models/{staged.digest}/sub/meta.json",
            f"models/{staged.digest}{MANIFEST_SUFFIX}",
        ]
    )
    assert again.uploaded_files == 2 and not again.already


def test_a_file_changed_while_staged_is_not_left_under_the_digest(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", n=1)

    class Meddling(FileStorage):
        def put_file(self, local: Path, key: str, *, callback=None) -> None:  # type: ignore[no-untyped-def]
            super().put_file(local, key, callback=callback)
            if local.name == "img-0.png":
                local.write_bytes(b"edited by someone else meanwhile")

    bucket = Meddling(tmp_path / "bucket")
    with pytest.raises(InvalidInput, match="img-0.png: changed while it was uploaded"):
        stage_path(data, bucket.uri, "dataset", storage=bucket, concurrency=1)
    keys = [o.key for o in bucket.list()]
    assert not any(k.endswith("img-0.png") or k.endswith(MANIFEST_SUFFIX) for k in keys)


def test_stage_single_file_names_the_file(tmp_path: Path) -> None:
    f = tmp_path / "train.jsonl"
    f.write_text('{"text": "a"}\n')
    bucket = (tmp_path / "bucket").as_uri()
    staged = stage_path(f, bucket, "dataset")
    assert staged.uri == f"{bucket}/datasets/{staged.digest}/train.jsonl"
    assert staged_parts(f"datasets/{staged.digest}/train.jsonl") == (
        f"datasets/{staged.digest}",
        staged.digest,
        "train.jsonl",
    )
    path = pull_dataset(staged.uri, tmp_path / "cache")  # a file:// dataset is read in place
    assert path.read_text() == '{"text": "a"}\n'


def test_stage_refuses_empty_folders_and_unknown_kinds(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInput, match="no files to stage"):
        stage_path(tmp_path / "empty", (tmp_path / "b").as_uri(), "dataset")
    with pytest.raises(InvalidInput, match="kind must be one of"):
        stage_path(tmp_path / "empty", (tmp_path / "b").as_uri(), "checkpoint")
    with pytest.raises(InvalidInput, match="no such file"):
        stage_path(tmp_path / "nope", (tmp_path / "b").as_uri(), "dataset")


def test_hash_cache_skips_rehashing_unchanged_files(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", n=3)
    cache = tmp_path / "hashes.json"
    hashed: list[int] = []
    first = local_manifest(data, hash_cache=cache, on_bytes=hashed.append)
    assert len(hashed) == 7
    hashed.clear()
    assert local_manifest(data, hash_cache=cache, on_bytes=hashed.append) == first
    assert hashed == []  # nothing read again
    (data / "img-0.txt").write_text("changed!")
    changed = local_manifest(data, hash_cache=cache, on_bytes=hashed.append)
    assert len(hashed) == 1 and changed["img-0.txt"]["sha256"] != first["img-0.txt"]["sha256"]


def test_stage_local_inputs_keeps_local_paths_for_folder_buckets(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data")
    spec = parse_spec(
        {
            "kind": "text",
            "name": "n",
            "base_model": "org/hub-model",
            "dataset": str(data),
            "training": {"steps": 1},
        }
    )
    (same,) = stage_local_inputs([spec], (tmp_path / "bucket").as_uri())
    assert same.dataset == str(data)  # the embedded default: read in place, nothing copied
    assert not (tmp_path / "bucket").exists()


# -- manifest-driven pulls -------------------------------------------------------------------


def test_staged_pull_is_keyed_by_content_and_verified(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", big=40 * KIB)
    bucket = FileStorage(tmp_path / "bucket")
    staged = stage_path(data, bucket.uri, "dataset", storage=bucket)
    key = f"datasets/{staged.digest}"
    st = CountingStorage(bucket)
    entry = pull_to_cache(st, key, tmp_path / "cache", uri=staged.uri, missing="gone")
    assert entry.name == f"sha256-{staged.digest}"
    assert local_manifest(entry) == local_manifest(data)  # every byte, every name
    first_gets, first_bytes = st.gets, st.bytes
    assert first_bytes >= staged.size
    # A second job on this node: not one request, not one byte.
    again = pull_to_cache(st, key, tmp_path / "cache", uri=staged.uri, missing="gone")
    assert again == entry and (st.gets, st.bytes) == (first_gets, first_bytes)


def test_staged_pull_refuses_tampered_objects_and_manifests(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data")
    bucket = FileStorage(tmp_path / "bucket")
    staged = stage_path(data, bucket.uri, "dataset", storage=bucket)
    key = f"datasets/{staged.digest}"
    bucket.put_bytes(b"evil bytes", f"{key}/img-0.txt")
    with pytest.raises(IntegrityError, match="img-0.txt: sha256 mismatch"):
        pull_to_cache(bucket, key, tmp_path / "cache", uri=staged.uri, missing="gone")
    assert not (tmp_path / "cache" / f"sha256-{staged.digest}").exists()

    manifest = json.loads(bucket.get_bytes(key + MANIFEST_SUFFIX))
    manifest["files"]["img-0.txt"] = {
        "size": 10,
        "sha256": hashlib.sha256(b"evil bytes").hexdigest(),
    }
    bucket.put_bytes(json.dumps(manifest).encode(), key + MANIFEST_SUFFIX)
    with pytest.raises(IntegrityError, match="does not hash to the digest in its name"):
        pull_to_cache(bucket, key, tmp_path / "cache2", uri=staged.uri, missing="gone")


def test_staged_manifest_with_escaping_paths_is_refused(tmp_path: Path) -> None:
    bucket = FileStorage(tmp_path / "bucket")
    files = {"../../etc/x": {"size": 3, "sha256": hashlib.sha256(b"pwn").hexdigest()}}
    digest = manifest_digest(files)
    bucket.put_bytes(json.dumps({"files": files}).encode(), f"datasets/{digest}{MANIFEST_SUFFIX}")
    with pytest.raises(Exception, match="unsafe object key"):
        pull_to_cache(bucket, f"datasets/{digest}", tmp_path / "c" / "cache", uri="x", missing="m")
    assert not (tmp_path / "c" / "etc").exists() and not (tmp_path / "etc").exists()


def test_broken_off_pull_resumes_with_what_it_finished(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", n=4, big=64 * KIB)
    bucket = FileStorage(tmp_path / "bucket")
    staged = stage_path(data, bucket.uri, "dataset", storage=bucket)
    key, cache = f"datasets/{staged.digest}", tmp_path / "cache"
    kw = dict(uri=staged.uri, missing="m", concurrency=1, chunk_size=8 * KIB)  # 8 chunks
    broken = CountingStorage(bucket, fail_after=6)  # the manifest + 5 chunks, then "down"
    with pytest.raises(StorageError, match="connection dropped"):
        pull_to_cache(broken, key, cache, **kw)
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".")] == []
    resumed = CountingStorage(bucket)
    entry = pull_to_cache(resumed, key, cache, **kw)
    assert local_manifest(entry) == local_manifest(data)
    assert resumed.bytes < staged.size - 30 * KIB  # the 5 chunks were not fetched again
    assert not [p for p in entry.rglob(".*")]  # no partial or temp files inside the entry
    assert list((cache / ".tmp").iterdir()) == []


# -- resumable fetch -------------------------------------------------------------------------


def test_fetch_resumes_a_broken_off_download(tmp_path: Path) -> None:
    big = os.urandom(100 * KIB)
    src = make_adapter(tmp_path / "src", {"adapter_model.safetensors": big, "c.json": b"{}"})
    dest = join_uri((tmp_path / "bucket").as_uri(), "adapters", "n", "j1")
    upload_adapter(src, dest)
    inner = FileStorage(tmp_path / "bucket" / "adapters" / "n" / "j1")
    out = tmp_path / "out"
    broken = CountingStorage(inner, fail_after=5)  # the marker, then 4 of 10 chunks
    with pytest.raises(StorageError):
        fetch_adapter(dest, out, storage=broken, chunk_size=10 * KIB, concurrency=1)
    assert not (out / "lorajobs.json").exists()  # not complete, and does not look it
    assert not (out / "adapter_model.safetensors").exists()
    assert (out / ".adapter_model.safetensors.partial").exists()
    again = CountingStorage(inner)
    fetch_adapter(dest, out, storage=again, chunk_size=10 * KIB, concurrency=1)
    assert (out / "adapter_model.safetensors").read_bytes() == big
    assert again.bytes <= len(big) - 40 * KIB + 100 + len((src / "lorajobs.json").read_bytes())
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_model.safetensors",
        "c.json",
        "lorajobs.json",
    ]


def test_fetch_restarts_a_partial_that_does_not_verify(tmp_path: Path) -> None:
    big = os.urandom(50 * KIB)
    src = make_adapter(tmp_path / "src", {"w.bin": big})
    dest = join_uri((tmp_path / "bucket").as_uri(), "adapters", "n", "j1")
    upload_adapter(src, dest)
    inner = FileStorage(tmp_path / "bucket" / "adapters" / "n" / "j1")
    out = tmp_path / "out"
    with pytest.raises(StorageError):
        fetch_adapter(
            dest,
            out,
            storage=CountingStorage(inner, fail_after=3),
            chunk_size=10 * KIB,
            concurrency=1,
        )
    partial = out / ".w.bin.partial"
    with open(partial, "r+b") as f:  # rot in a chunk the record says is done
        f.write(b"\x00" * 100)
    with pytest.raises(IntegrityError, match="w.bin: sha256 mismatch"):
        fetch_adapter(dest, out, storage=inner, chunk_size=10 * KIB)
    assert not partial.exists()  # thrown away: the next fetch starts that file over
    fetch_adapter(dest, out, storage=inner, chunk_size=10 * KIB)
    assert (out / "w.bin").read_bytes() == big


# -- cache size limit and LRU eviction -------------------------------------------------------


def _three_datasets(tmp_path: Path) -> tuple[FileStorage, list[str]]:
    bucket = FileStorage(tmp_path / "bucket")
    for name in ("a", "b", "c"):
        bucket.put_bytes(os.urandom(10_000), f"datasets/{name}/x.bin")
    return bucket, ["datasets/a", "datasets/b", "datasets/c"]


def _entries(cache: Path) -> list[str]:
    return sorted(p.name.split("-")[0] for p in cache.iterdir() if not p.name.startswith("."))


def test_lru_eviction_keeps_the_cache_under_its_limit(tmp_path: Path) -> None:
    bucket, keys = _three_datasets(tmp_path)
    cache = tmp_path / "cache"

    def pull(key: str, limit: int | None = 25_000) -> Path:
        p = pull_to_cache(bucket, key, cache, uri=key, missing="m", max_bytes=limit)
        release(p)
        return p

    a = pull(keys[0])
    pull(keys[1])
    os.utime(a, (1, 1))  # `a` used long ago ...
    b = cache / next(p.name for p in cache.iterdir() if p.name.startswith("b-"))
    os.utime(b, (2, 2))
    pull(keys[0], limit=None)  # ... then used again: now `b` is the least recently used
    pull(keys[2])  # 30 KB > 25 KB: one must go
    assert _entries(cache) == ["a", "c"]


def test_entries_in_use_are_never_evicted(tmp_path: Path) -> None:
    bucket, keys = _three_datasets(tmp_path)
    cache = tmp_path / "cache"
    held = pull_to_cache(bucket, keys[0], cache, uri="a", missing="m")  # a job is reading it
    os.utime(held, (1, 1))
    other = pull_to_cache(bucket, keys[1], cache, uri="b", missing="m")
    release(other)
    pull_to_cache(bucket, keys[2], cache, uri="c", missing="m", max_bytes=15_000)
    assert _entries(cache) == ["a", "c"]  # `a` is the oldest, but in use: `b` went
    assert held.is_dir()
    del held
    gc.collect()  # the job is done with it: the lease goes with the path
    pull_to_cache(bucket, keys[1], cache, uri="b", missing="m", max_bytes=15_000)
    assert "a" not in _entries(cache)


def test_eviction_waits_for_nobody_and_skips_entries_being_built(tmp_path: Path) -> None:
    bucket, keys = _three_datasets(tmp_path)
    cache = tmp_path / "cache"
    name = pull_to_cache(bucket, keys[0], cache, uri="a", missing="m").name
    (cache / ".tmp" / "half-built").mkdir(parents=True)
    (cache / ".tmp" / "half-built" / "f").write_bytes(b"x" * 5000)
    import fcntl

    with open(cache / ".locks" / "half-built.build", "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # someone is building it
        assert evict([cache], max_bytes=1) == [name]
        assert (cache / ".tmp" / "half-built").exists()
    assert evict([cache], max_bytes=1) == ["half-built"]  # a leftover once nobody builds it


def test_concurrent_pulls_with_a_limit_download_once(tmp_path: Path) -> None:
    bucket, keys = _three_datasets(tmp_path)
    st = CountingStorage(bucket)
    results: list[Path] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(
                pull_to_cache(
                    st, keys[0], tmp_path / "cache", uri="a", missing="m", max_bytes=50_000
                )
            )
        )
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and len(set(results)) == 1 and st.gets == 1


def test_cache_limit_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LORAJOBS_CACHE_MAX_GB", raising=False)
    assert cache_limit_from_env() is None
    monkeypatch.setenv("LORAJOBS_CACHE_MAX_GB", "1.5")
    assert cache_limit_from_env() == 1_500_000_000
    for bad in ("0", "-1", "lots"):
        monkeypatch.setenv("LORAJOBS_CACHE_MAX_GB", bad)
        with pytest.raises(InvalidInput, match="LORAJOBS_CACHE_MAX_GB"):
            cache_limit_from_env()


# -- hygiene ---------------------------------------------------------------------------------


def test_job_names_cannot_climb_out_of_their_prefix() -> None:
    with pytest.raises(SpecError, match="name"):
        parse_spec(
            {
                "kind": "text",
                "name": "../../x",
                "base_model": "m",
                "dataset": "d",
                "training": {"steps": 1},
            }
        )
    for evil in ("../../x", "..", "a/../../x", "..\\x"):
        with pytest.raises(InvalidInput):
            join_uri("s3://bucket/root", "adapters", evil, "job1")


def test_nothing_downloaded_is_ever_unpickled() -> None:
    """No code path may unpickle: a bucket's bytes are data, never code."""
    repo = Path(__file__).resolve().parents[2]
    banned = re.compile(
        r"pickle\.loads?\(|torch\.load\(|allow_pickle\s*=\s*True|"
        r"weights_only\s*=\s*False|joblib\.load\(|dill\.load"
    )
    hits = []
    for pkg in ("worker", "orchestrator", "jobspecs", "storage"):
        for py in (repo / pkg).rglob("*.py"):
            for n, line in enumerate(py.read_text(encoding="utf-8").splitlines(), 1):
                if banned.search(line) and not line.lstrip().startswith("#"):
                    hits.append(f"{py.relative_to(repo)}:{n}: {line.strip()}")
    assert hits == []
