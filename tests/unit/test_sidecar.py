"""The `lorajobs.json` sidecar and the model card: required facts, true hashes, no secrets."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from lorajobs.jobspecs.models import TextJobSpec
from lorajobs.storage.transfer import sha256_file
from lorajobs.worker.context import TrainOutput, WorkerContext
from lorajobs.worker.sidecar import (
    FORMAT,
    SIDECAR,
    build_sidecar,
    redact_uri,
    tree_digest,
    write_metadata,
)

REQUIRED = set(
    "format job_id name kind attempt spec seed base_model base_model_sha256 dataset dataset_sha256"
    " resolved versions hardware node metrics timings created_at files extra".split()
)


@pytest.fixture()
def job(tmp_path: Path) -> dict[str, Any]:
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text('{"a": 1}')
    (model / "sub" / "weights.bin").write_bytes(b"\x00" * 100)
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "hello"}\n')
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}\n")
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    spec = TextJobSpec.model_validate(
        {
            "kind": "text",
            "name": "demo",
            # Credentials in a URI must not travel into the bucket's metadata.
            "base_model": "s3://AKIAFAKEUSER:pw-in-uri-123@models/tiny?X-Amz-Signature=sig999",
            "dataset": "file:///data/train.jsonl",
            "training": {"steps": 3, "seed": 7},
        }
    )
    ctx = WorkerContext(
        job_id="job-1",
        output_uri="file:///bucket",
        cache_dir=tmp_path / "cache",
        attempt=2,
        threads=2,
        node="node-a",
        extra={"submitted_at": "2025-01-01T00:00:00+00:00"},
    )
    output = TrainOutput(
        files=["adapter_config.json", "adapter_model.safetensors"],
        metrics={"final_loss": 1.5, "first_loss": 3.0, "steps": 3},
        resolved={"rank": 8, "device": "cpu"},
    )
    return {
        "spec": spec,
        "ctx": ctx,
        "output": output,
        "model": model,
        "data": data,
        "adapter": adapter,
    }


def _write(job: dict[str, Any]) -> dict[str, Any]:
    return write_metadata(
        job["spec"],
        job["ctx"],
        adapter_dir=job["adapter"],
        model_dir=job["model"],
        data_path=job["data"],
        output=job["output"],
        timings={"pull": 0.1, "train": 1.0, "export": None, "upload": None},
    )


def test_sidecar_has_required_keys_and_true_hashes(job: dict[str, Any]) -> None:
    sidecar = _write(job)
    assert REQUIRED <= set(sidecar)
    assert sidecar["format"] == FORMAT
    assert (sidecar["job_id"], sidecar["name"], sidecar["kind"]) == ("job-1", "demo", "text")
    assert (sidecar["attempt"], sidecar["seed"], sidecar["node"]) == (2, 7, "node-a")
    assert sidecar["spec"]["training"]["steps"] == 3
    assert sidecar["base_model_sha256"] == tree_digest(job["model"])
    assert re.fullmatch(r"[0-9a-f]{64}", sidecar["dataset_sha256"])
    assert sidecar["versions"]["torch"] and sidecar["versions"]["python"]
    assert sidecar["hardware"]["device"] == "cpu" and sidecar["hardware"]["threads"] == 2
    assert sidecar["extra"] == {"submitted_at": "2025-01-01T00:00:00+00:00"}
    assert sidecar["created_at"].endswith("+00:00")

    # Every adapter file and the model card, never the sidecar itself; digests are the bytes'.
    adapter = job["adapter"]
    expected = {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    assert set(sidecar["files"]) == expected
    for rel, info in sidecar["files"].items():
        path = adapter / rel
        assert info == {"sha256": sha256_file(path), "size": path.stat().st_size}

    # On disk: canonical JSON equal to the returned dict.
    text = (adapter / SIDECAR).read_text()
    assert json.loads(text) == sidecar
    assert text == json.dumps(sidecar, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def test_model_card_says_how_to_load(job: dict[str, Any]) -> None:
    _write(job)
    card = (job["adapter"] / "README.md").read_text()
    assert "# demo" in card
    assert "PeftModel.from_pretrained" in card
    assert "s3://models/tiny" in card


def test_digest_changes_with_content_and_names(job: dict[str, Any]) -> None:
    before = tree_digest(job["model"])
    (job["model"] / "config.json").write_text('{"a": 2}')
    changed = tree_digest(job["model"])
    (job["model"] / "config.json").rename(job["model"] / "config2.json")
    assert len({before, changed, tree_digest(job["model"])}) == 3


def test_sidecar_never_contains_credentials(
    job: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake-aws-secret-value-0001")
    monkeypatch.setenv("LORAJOBS_DB_PASSWORD", "fake-db-password-0002")
    monkeypatch.setenv("MY_API_KEY", "fake-api-key-0003")
    sidecar = _write(job)
    text = (job["adapter"] / SIDECAR).read_text() + (job["adapter"] / "README.md").read_text()
    assert json.loads((job["adapter"] / SIDECAR).read_text()) == sidecar
    secret_like = re.compile(r"SECRET|KEY|PASSWORD|TOKEN", re.IGNORECASE)
    values = [v for k, v in os.environ.items() if secret_like.search(k) and len(v) >= 8]
    assert "fake-aws-secret-value-0001" in values
    for value in values:
        assert value not in text
    # The URI's own user:password and presigned query are gone too.
    for leaked in ("AKIAFAKEUSER", "pw-in-uri-123", "sig999"):
        assert leaked not in text


@pytest.mark.parametrize(
    ("uri", "clean"),
    [
        ("s3://u:p@bucket/a/b?sig=1", "s3://bucket/a/b"),
        ("file:///data/x.jsonl", "file:///data/x.jsonl"),
        ("org/model", "org/model"),
        ("/abs/path", "/abs/path"),
    ],
)
def test_redact_uri(uri: str, clean: str) -> None:
    assert redact_uri(uri) == clean


def test_build_sidecar_excludes_an_existing_sidecar(job: dict[str, Any]) -> None:
    (job["adapter"] / SIDECAR).write_text("{}")
    sidecar = build_sidecar(
        job["spec"],
        job["ctx"],
        adapter_dir=job["adapter"],
        model_dir=job["model"],
        data_path=job["data"],
        output=job["output"],
        timings={},
    )
    assert SIDECAR not in sidecar["files"]


def test_digest_is_the_staged_digest_and_reuses_known_hashes(
    job: dict[str, Any], tmp_path: Path
) -> None:
    from lorajobs.storage.staging import local_manifest, manifest_digest

    model = job["model"]
    assert tree_digest(model) == manifest_digest(local_manifest(model))  # = models/<digest>/

    # With a hash cache, a file whose size, mtime and inode are unchanged is not read again:
    # same-size new bytes with the old mtime put back are (knowingly) not noticed ...
    cache = tmp_path / "hashes.json"
    first = tree_digest(model, hash_cache=cache)
    target = model / "config.json"
    st = target.stat()
    target.write_bytes(b"x" * st.st_size)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert tree_digest(model, hash_cache=cache) == first
    # ... while without the cache, or once the mtime moves, the new bytes count.
    assert tree_digest(model) != first
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert tree_digest(model, hash_cache=cache) != first


def test_a_pulled_staged_entry_is_known_by_its_name(tmp_path: Path) -> None:
    digest = "ab" * 32
    entry = tmp_path / f"sha256-{digest}"
    entry.mkdir()
    (entry / "weights.bin").write_bytes(b"verified against the manifest on the way in")
    assert tree_digest(entry) == digest


def test_a_quantized_base_is_recorded_in_the_sidecar_and_the_card(job: dict[str, Any]) -> None:
    assert _write(job)["base_quantization"] is None  # an unquantized base says so
    spec = job["spec"].model_copy(
        update={"training": job["spec"].training.model_copy(update={"quantize_base": "nf4"})}
    )
    job["spec"] = spec
    job["output"].resolved["quantize_base"] = "nf4"
    sidecar = _write(job)
    assert sidecar["base_quantization"] == {
        "mode": "nf4",
        "library": "bitsandbytes",
        "adapter_dtype": "float32",
        "quant_type": "nf4",
        "double_quant": True,
        "compute_dtype": "bfloat16",
    }
    card = (job["adapter"] / "README.md").read_text()
    assert "| quantize_base | nf4 |" in card
    assert "Trained on a base quantized to nf4 (QLoRA); the adapter itself is unquantized" in card
