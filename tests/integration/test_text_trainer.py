"""The text trainer on a tiny Llama: deterministic bytes, a falling loss, a loadable adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lorajobs.jobspecs.failures import UserDataError
from lorajobs.jobspecs.models import TextJobSpec
from lorajobs.storage.transfer import sha256_file
from lorajobs.worker.context import WorkerContext
from lorajobs.worker.trainers import get_trainer

pytestmark = pytest.mark.slow

FILES = ["adapter_config.json", "adapter_model.safetensors"]


def _spec(steps: int, **lora: Any) -> TextJobSpec:
    return TextJobSpec.model_validate(
        {
            "kind": "text",
            "name": "tiny-text",
            "base_model": "s3://models/tiny-llama",
            "dataset": "s3://datasets/grammar.jsonl",
            "lora": {"rank": 8, "alpha": 16, **lora},
            "training": {
                "steps": steps,
                "batch_size": 4,
                "learning_rate": 5e-3,
                "max_seq_length": 64,
                "seed": 3,
            },
        }
    )


def _ctx(tmp_path: Path, reports: list[dict[str, Any]] | None = None) -> WorkerContext:
    sink = reports.append if reports is not None else (lambda _: None)
    return WorkerContext(
        job_id="j1",
        output_uri=tmp_path.as_uri(),
        cache_dir=tmp_path / "cache",
        threads=2,
        report=sink,
    )


def test_two_runs_give_identical_adapter_bytes(
    tiny_text_model: Path, tiny_text_dataset: Path, tmp_path: Path
) -> None:
    train = get_trainer("text")
    digests = []
    for run in ("a", "b"):
        out = train(_spec(25), tiny_text_model, tiny_text_dataset, tmp_path / run, _ctx(tmp_path))
        assert sorted(out.files) == [*FILES, "loss.png"]
        assert sorted(out.deterministic) == FILES
        # No PEFT README (the worker writes its own), and the loss curve.
        assert sorted(p.name for p in (tmp_path / run).iterdir()) == [*FILES, "loss.png"]
        digests.append({f: sha256_file(tmp_path / run / f) for f in [*FILES, "loss.png"]})
    assert digests[0] == digests[1]


def test_loss_falls_and_the_adapter_loads_and_changes_logits(
    tiny_text_model: Path, tiny_text_dataset: Path, tmp_path: Path
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reports: list[dict[str, Any]] = []
    out_dir = tmp_path / "adapter"
    spec = _spec(120)
    train = get_trainer("text")
    out = train(spec, tiny_text_model, tiny_text_dataset, out_dir, _ctx(tmp_path, reports))

    m = out.metrics
    assert m["steps"] == 120 and m["examples"] == 64 and m["tokens"] > 0
    curve = m["loss_curve"]
    assert 2 <= len(curve) <= 20
    # Robust: compare window means, not single noisy steps. Measured ~6.2 -> ~3.3.
    assert curve[-1] < 0.8 * curve[0], curve
    assert min(curve[-3:]) < m["first_loss"] - 1.0
    assert out.resolved["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert out.resolved["threads"] == 2

    # Progress: throttled, and always the last step.
    assert reports[-1]["step"] == 120 and reports[-1]["total_steps"] == 120
    assert set(reports[-1]) == {"step", "total_steps", "loss", "it_per_s"}

    # The config is canonical and names the spec's base model, not a temp path.
    text = (out_dir / "adapter_config.json").read_text()
    config = json.loads(text)
    assert text == json.dumps(config, indent=2, sort_keys=True) + "\n"
    assert config["base_model_name_or_path"] == "s3://models/tiny-llama"
    assert config["target_modules"] == sorted(config["target_modules"])
    assert (config["r"], config["lora_alpha"]) == (8, 16)

    tok = AutoTokenizer.from_pretrained(tiny_text_model, local_files_only=True)
    batch = tok(["the cat likes red apples.", "a dog sees"], return_tensors="pt", padding=True)
    base = AutoModelForCausalLM.from_pretrained(tiny_text_model, local_files_only=True)
    base.eval()
    with torch.no_grad():
        before = base(**batch).logits
        tuned = PeftModel.from_pretrained(base, out_dir)
        tuned.eval()
        after = tuned(**batch).logits
    assert (after - before).abs().max().item() > 1e-2


def test_unknown_target_module_is_a_user_error(
    tiny_text_model: Path, tiny_text_dataset: Path, tmp_path: Path
) -> None:
    spec = _spec(1, target_modules=["no_such_proj"])
    train = get_trainer("text")
    with pytest.raises(UserDataError, match="s3://models/tiny-llama: .*no_such_proj"):
        train(spec, tiny_text_model, tiny_text_dataset, tmp_path / "o", _ctx(tmp_path))


def test_a_folder_that_is_no_model_is_a_user_error(tiny_text_dataset: Path, tmp_path: Path) -> None:
    (tmp_path / "empty-model").mkdir()
    with pytest.raises(UserDataError, match="s3://models/tiny-llama: no config.json"):
        get_trainer("text")(
            _spec(1), tmp_path / "empty-model", tiny_text_dataset, tmp_path / "o", _ctx(tmp_path)
        )
