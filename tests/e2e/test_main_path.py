"""The path every user walks, through the CLI as a subprocess, on real parts:
submit -> SQL queue -> controller -> Ray task -> worker trains + uploads -> status -> fetch.

Once on the embedded defaults (SQLite, local Ray, folder bucket) and once on real services
(PostgreSQL, a SeaweedFS S3 server with access keys enforced)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.e2e.cli import CLI, write_spec

pytestmark = pytest.mark.slow


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _image_output(model_dir: Path, lora_dir: Path | None) -> Any:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    if lora_dir is not None:
        pipe.load_lora_weights(lora_dir)
    g = torch.Generator().manual_seed(0)
    return pipe(
        "a red circle", num_inference_steps=2, height=64, width=64, generator=g, output_type="np"
    ).images


def _text_logits(model_dir: Path, adapter_dir: Path | None) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    ids = tok("the cat sat on the mat", return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


def _walk_main_path(
    cli: CLI, tmp: Path, models: dict[str, str], data: dict[str, str], local_models: dict[str, Path]
) -> None:
    img = write_spec(
        tmp / "image.yaml",
        "image",
        "e2e-image",
        models["image"],
        data["image"],
        training={"steps": 15, "learning_rate": 1e-2},
    )
    txt = write_spec(
        tmp / "text.yaml",
        "text",
        "e2e-text",
        models["text"],
        data["text"],
        training={"steps": 15, "learning_rate": 1e-2},
    )

    r = cli("submit", str(img), str(txt), "--wait", "--json")
    assert r.code == 0, r.err[-3000:]
    jobs = r.json()
    assert [j["state"] for j in jobs] == ["succeeded", "succeeded"], r.err[-3000:]

    listed = cli("status", "--json").json()
    assert {j["id"] for j in listed} == {j["id"] for j in jobs}
    assert all(j["state"] == "succeeded" and j["kind"] in ("image", "text") for j in listed)

    shown = cli("show", jobs[0]["id"], "--json").json()
    assert [e["to_status"] for e in shown["events"]] == [
        "queued",
        "dispatched",
        "running",
        "succeeded",
    ]
    assert cli("show", jobs[0]["id"]).code == 0
    for j in jobs:  # the worker's log: ours, not botocore's chatter about credentials
        log = cli("logs", j["id"])
        assert log.code == 0 and "adapter uploaded to" in log.out, log.err
        assert "Found credentials" not in log.out

    fetched = {}
    for j in jobs:
        r = cli("fetch", j["id"], "-o", str(tmp / "fetched" / j["kind"]))
        assert r.code == 0, r.err
        dest = tmp / "fetched" / j["kind"] / f"{j['name']}-{j['id']}"
        assert Path(r.out.strip()) == dest.resolve()
        sidecar = json.loads((dest / "lorajobs.json").read_text())
        for rel, meta in sidecar["files"].items():
            assert _sha(dest / rel) == meta["sha256"]
        fetched[j["kind"]] = dest

    # Both into one -o folder: each in its own subfolder, every file of both kept byte for byte
    # (both adapters have a lorajobs.json, a README.md and a loss.png).
    for j in jobs:
        assert cli("fetch", j["id"], "-o", str(tmp / "together")).code == 0
    for kind, dest in fetched.items():
        mine = tmp / "together" / dest.name
        names = sorted(p.name for p in dest.iterdir())
        assert sorted(p.name for p in mine.iterdir()) == names
        assert all((mine / n).read_bytes() == (dest / n).read_bytes() for n in names), kind

    assert (fetched["image"] / "pytorch_lora_weights.safetensors").is_file()
    before = _image_output(local_models["image"], None)
    after = _image_output(local_models["image"], fetched["image"])
    assert abs(after - before).max() > 1e-3, "the image LoRA should change the pipeline's output"

    assert (fetched["text"] / "adapter_config.json").is_file()
    base = _text_logits(local_models["text"], None)
    tuned = _text_logits(local_models["text"], fetched["text"])
    assert (tuned - base).abs().max() > 1e-3, "the text LoRA should change the logits"


def test_main_path_on_embedded_defaults(
    tmp_path: Path,
    tiny_image_model: Path,
    tiny_text_model: Path,
    tiny_image_dataset: Path,
    tiny_text_dataset: Path,
) -> None:
    cli = CLI(home=tmp_path / "home")
    models = {"image": str(tiny_image_model), "text": str(tiny_text_model)}
    data = {"image": str(tiny_image_dataset), "text": str(tiny_text_dataset)}
    _walk_main_path(
        cli, tmp_path, models, data, {"image": tiny_image_model, "text": tiny_text_model}
    )
    assert (tmp_path / "home" / "lorajobs.db").is_file()
    assert list((tmp_path / "home" / "bucket" / "adapters").iterdir())


def _stage(s3: Any, local: Path, key_prefix: str) -> str:
    """Upload a local file or folder to the test bucket; return its s3:// URI."""
    from lorajobs.storage.backends import open_storage

    storage = open_storage(s3.uri)
    files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
    for f in files:
        rel = f.name if local.is_file() else f.relative_to(local).as_posix()
        storage.put_file(f, f"{key_prefix}/{rel}")
    return f"{s3.uri.rstrip('/')}/{key_prefix}" + (f"/{local.name}" if local.is_file() else "")


def test_main_path_on_postgres_and_s3(
    tmp_path: Path,
    pg_database: str,
    s3_env: Any,
    tiny_image_model: Path,
    tiny_text_model: Path,
    tiny_image_dataset: Path,
    tiny_text_dataset: Path,
) -> None:
    models = {
        "image": _stage(s3_env, tiny_image_model, "models/tiny-sd"),
        "text": _stage(s3_env, tiny_text_model, "models/tiny-llama"),
    }
    data = {
        "image": _stage(s3_env, tiny_image_dataset, "datasets/shapes"),
        "text": _stage(s3_env, tiny_text_dataset, "datasets/patterns"),
    }
    cli = CLI(
        home=tmp_path / "home",
        env={
            **s3_env.server.env(),
            "LORAJOBS_DATABASE_URL": pg_database,
            "LORAJOBS_BUCKET": f"{s3_env.uri.rstrip('/')}/lj",
        },
    )
    assert cli("db", "upgrade").code == 0
    _walk_main_path(
        cli, tmp_path, models, data, {"image": tiny_image_model, "text": tiny_text_model}
    )
    # Nothing of the embedded defaults was used.
    assert not (tmp_path / "home" / "lorajobs.db").exists()
    assert not (tmp_path / "home" / "bucket").exists()


def test_wrong_s3_credentials_give_a_clear_line(
    tmp_path: Path, s3_env: Any, tiny_text_model: Path, tiny_text_dataset: Path
) -> None:
    data = _stage(s3_env, tiny_text_dataset, "datasets/patterns")
    # Remote inputs only: `submit` would stage a local path first, and stop there (exit 2).
    model = _stage(s3_env, tiny_text_model, "models/tiny-llama")
    spec = write_spec(tmp_path / "s.yaml", "text", "badcreds", model, data)
    env = {**s3_env.server.env(), "AWS_SECRET_ACCESS_KEY": "not-the-secret-0123456789"}
    cli = CLI(home=tmp_path / "home", env={**env, "LORAJOBS_BUCKET": s3_env.uri})

    r = cli("run", str(spec))
    assert r.code == 2, r.err[-2000:]
    lines = r.err.strip().splitlines()
    assert "Traceback" not in r.err and "access denied" in lines[-1].lower()
    assert "not-the-secret" not in r.err

    r = cli("submit", str(spec), "--wait", "--json")
    (job,) = r.json()
    assert r.code == 1 and job["failure_kind"] == "user"
    assert "access denied" in job["failure_reason"].lower()
    assert "not-the-secret" not in json.dumps(job)
    assert b"not-the-secret" not in (tmp_path / "home" / "lorajobs.db").read_bytes()
