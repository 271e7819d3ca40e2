"""Content-addressed staging and manifest-driven pulls against a real SeaweedFS S3 server
(access keys enforced)."""

from __future__ import annotations

import os
import threading
import traceback
from pathlib import Path
from typing import Any

import pytest

from lorajobs.jobspecs import parse_spec
from lorajobs.jobspecs.failures import ObjectNotFound, StorageAuthError
from lorajobs.storage.backends import open_storage
from lorajobs.storage.pull import pull_dataset, pull_model
from lorajobs.storage.s3 import S3Storage
from lorajobs.storage.staging import MANIFEST_SUFFIX, local_manifest, stage_local_inputs, stage_path

pytestmark = pytest.mark.slow
MIB = 1024 * 1024


def _dataset(d: Path, n: int = 30) -> Path:
    d.mkdir(parents=True)
    for i in range(n):
        (d / f"img-{i:03d}.png").write_bytes(os.urandom(2000 + i))
        (d / f"img-{i:03d}.txt").write_text(f"caption {i}")
    (d / "big.bin").write_bytes(os.urandom(20 * MIB))  # above the multipart threshold
    return d


def _count(monkeypatch: pytest.MonkeyPatch, names: tuple[str, ...]) -> list[tuple[str, int]]:
    """Record (key, bytes) of each request through these S3Storage methods; they still run."""
    seen: list[tuple[str, int]] = []
    lock = threading.Lock()
    for name in names:
        real = getattr(S3Storage, name)

        def counting(
            self: S3Storage, *args: Any, _real: Any = real, _name: str = name, **kwargs: Any
        ) -> Any:
            out = _real(self, *args, **kwargs)
            if _name == "put_file":
                key, size = args[1], args[0].stat().st_size
            elif _name == "put_bytes":
                key, size = args[1], len(args[0])
            else:
                key, size = args[0], len(out) if isinstance(out, bytes) else 0
            with lock:
                seen.append((key, size))
            return out

        monkeypatch.setattr(S3Storage, name, counting)
    return seen


def test_staging_twice_uploads_once_and_a_second_pull_moves_zero_bytes(
    s3_env: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _dataset(tmp_path / "data")
    bucket = f"{s3_env.uri}/lj"
    puts = _count(monkeypatch, ("put_file", "put_bytes"))
    first = stage_path(data, bucket, "dataset")
    assert first.uri == f"{bucket}/datasets/{first.digest}" and first.uploaded_files == 61
    assert len(puts) == 62 and puts[-1][0] == f"datasets/{first.digest}{MANIFEST_SUFFIX}"
    assert sum(n for k, n in puts if not k.endswith(MANIFEST_SUFFIX)) == first.size
    (info,) = open_storage(first.uri).list("big.bin")
    assert info.etag.endswith("-3")  # 20 MiB went up in 8 MiB parts

    again = stage_path(data, bucket, "dataset")
    assert again.uri == first.uri and again.already and again.uploaded_bytes == 0
    assert len(puts) == 62  # staged once

    gets = _count(monkeypatch, ("get_file", "get_bytes", "get_range"))
    cache = tmp_path / "node-cache"
    entry = pull_dataset(first.uri, cache)
    assert entry.name == f"sha256-{first.digest}"
    assert local_manifest(entry) == local_manifest(data)
    assert sum(n for _, n in gets) >= first.size
    gets.clear()
    assert pull_dataset(first.uri, cache) == entry  # a second job on the same node ...
    assert gets == []  # ... transfers zero bytes (not even the manifest)


def test_concurrent_pulls_of_staged_data_download_once(
    s3_env: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "model"
    data.mkdir()
    for i in range(20):
        (data / f"shard-{i}.safetensors").write_bytes(os.urandom(50_000))
    staged = stage_path(data, s3_env.uri, "model")
    gets = _count(monkeypatch, ("get_bytes", "get_range"))
    out: list[Path] = []
    threads = [
        threading.Thread(target=lambda: out.append(pull_model(staged.uri, tmp_path / "c")))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 3 and len(set(out)) == 1
    assert len(gets) == 21  # the manifest and each shard, once


def test_submit_staging_rewrites_local_paths_to_bucket_uris(s3_env: Any, tmp_path: Path) -> None:
    data, model = _dataset(tmp_path / "data", n=2), tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "a"}\n')
    specs = [
        parse_spec(
            {
                "kind": "image",
                "name": "a",
                "base_model": str(model),
                "dataset": str(data),
                "training": {"steps": 1},
            }
        ),
        parse_spec(
            {
                "kind": "text",
                "name": "b",
                "base_model": str(model),
                "dataset": str(rows),
                "training": {"steps": 1},
            }
        ),
        parse_spec(
            {
                "kind": "text",
                "name": "c",
                "base_model": "org/hub-id",
                "dataset": f"{s3_env.uri}/datasets/elsewhere",
                "training": {"steps": 1},
            }
        ),
    ]
    a, b, c = stage_local_inputs(specs, s3_env.uri)
    assert a.dataset.startswith(f"{s3_env.uri}/datasets/") and "/models/" in a.base_model
    assert b.base_model == a.base_model  # the same folder is staged once, named once
    assert b.dataset.startswith(f"{s3_env.uri}/datasets/") and b.dataset.endswith("/rows.jsonl")
    assert (c.base_model, c.dataset) == ("org/hub-id", f"{s3_env.uri}/datasets/elsewhere")
    assert pull_dataset(b.dataset, tmp_path / "cache").read_text() == '{"text": "a"}\n'


def test_staging_with_wrong_credentials_or_no_bucket_is_one_line(
    s3_env: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "d"
    data.mkdir()
    (data / "x.txt").write_text("x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "definitely-not-the-secret")
    with pytest.raises(StorageAuthError) as info:
        stage_path(data, s3_env.uri, "dataset")
    msg = str(info.value)
    assert "access denied" in msg and "\n" not in msg and "definitely-not" not in msg
    assert s3_env.server.secret_key not in "".join(traceback.format_exception(info.value))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_env.server.secret_key)
    with pytest.raises(ObjectNotFound, match=r"^s3://no-such-bucket-zz: no such bucket$"):
        stage_path(data, "s3://no-such-bucket-zz", "dataset")
