"""Training settings on the tiny Llama: epochs, accumulation, schedules, clipping, gradient
checkpointing, DoRA, rsLoRA, and the precision/optimizer choices a CPU node cannot honour."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from lorajobs.jobspecs.failures import UserDataError
from lorajobs.jobspecs.models import TextJobSpec
from lorajobs.worker.context import TrainOutput, WorkerContext
from lorajobs.worker.trainers import get_trainer

pytestmark = pytest.mark.slow


def _spec(lora: dict[str, Any] | None = None, **training: Any) -> TextJobSpec:
    tr = {"steps": 4, "batch_size": 4, "learning_rate": 5e-3, "max_seq_length": 64, "seed": 3}
    if "epochs" in training:
        tr.pop("steps")
    return TextJobSpec.model_validate(
        {
            "kind": "text",
            "name": "settings",
            "base_model": "m",
            "dataset": "d",
            "lora": {"rank": 4, "alpha": 8, **(lora or {})},
            "training": {**tr, **training},
        }
    )


def _train(spec: TextJobSpec, model: Path, data: Path, out: Path) -> TrainOutput:
    ctx = WorkerContext(job_id="j", output_uri=out.as_uri(), cache_dir=out, threads=1)
    return get_trainer("text")(spec, model, data, out, ctx)


def test_epochs_set_the_step_count(
    tiny_text_model: Path, tiny_text_dataset: Path, tmp_path: Path
) -> None:
    out = _train(
        _spec(epochs=2, batch_size=8, gradient_accumulation_steps=2),
        tiny_text_model,
        tiny_text_dataset,
        tmp_path,
    )
    assert out.metrics["steps"] == 2 * 4  # 64 rows / (8 x 2) = 4 steps per epoch
    assert out.resolved["epochs"] == 2.0
    assert out.metrics["examples_seen"] == 8 * 8 * 2


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedules_are_applied_and_warmup_starts_at_zero(
    schedule: str, tiny_text_model: Path, tiny_text_dataset: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    out = _train(
        _spec(lr_scheduler=schedule, warmup_steps=2), tiny_text_model, tiny_text_dataset, tmp_path
    )
    assert out.resolved["lr_scheduler"] == schedule and out.resolved["warmup_steps"] == 2
    frozen = _train(
        _spec(lr_scheduler=schedule, warmup_steps=10, steps=1),
        tiny_text_model,
        tiny_text_dataset,
        tmp_path / "warm",
    )
    tensors = load_file(str(tmp_path / "warm" / "adapter_model.safetensors"))
    # Step 1 of a warmup runs at LR 0 (transformers' definition): LoRA B is still all zeros.
    assert all(t.abs().max().item() == 0 for k, t in tensors.items() if "lora_B" in k)
    assert frozen.metrics["steps"] == 1


def test_gradient_checkpointing_gives_the_same_training(
    tiny_text_model: Path, tiny_text_dataset: Path, tmp_path: Path
) -> None:
    plain = _train(_spec(), tiny_text_model, tiny_text_dataset, tmp_path / "a")
    ckpt = _train(
        _spec(gradient_checkpointing=True), tiny_text_model, tiny_text_dataset, tmp_path / "b"
    )
    assert ckpt.resolved["gradient_checkpointing"] is True
    assert ckpt.metrics["final_loss"] == pytest.approx(plain.metrics["final_loss"], abs=1e-5)


@pytest.mark.parametrize("switch", ["use_dora", "use_rslora"])
def test_dora_and_rslora_train_and_load(
    switch: str, tiny_text_model: Path, tiny_text_dataset: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = _train(_spec(lora={switch: True}), tiny_text_model, tiny_text_dataset, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config[switch] is True and out.resolved[switch] is True
    base = AutoModelForCausalLM.from_pretrained(tiny_text_model, local_files_only=True).eval()
    ids = torch.tensor([[1, 5, 9, 17]])
    with torch.no_grad():
        before = base(ids).logits
        after = PeftModel.from_pretrained(base, tmp_path).eval()(ids).logits
    assert (after - before).abs().max().item() > 1e-4


def test_cpu_runs_fp32_whatever_precision_was_asked(
    tiny_text_model: Path, tiny_text_dataset: Path, tmp_path: Path
) -> None:
    out = _train(
        _spec(steps=1, mixed_precision="fp16"), tiny_text_model, tiny_text_dataset, tmp_path
    )
    assert out.resolved["mixed_precision"] == "no"
    assert out.resolved["mixed_precision_requested"] == "fp16"
    assert out.resolved["dtype"] == "float32"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_8bit_adamw_without_a_gpu_is_a_user_error(
    tiny_text_model: Path, tiny_text_dataset: Path, tmp_path: Path
) -> None:
    with pytest.raises(UserDataError, match="adamw8bit needs a CUDA GPU and this machine has none"):
        _train(_spec(optimizer="adamw8bit"), tiny_text_model, tiny_text_dataset, tmp_path)


def test_packing_and_a_validation_split(
    tiny_text_model: Path, tiny_text_dataset: Path, tmp_path: Path
) -> None:
    """The data engineer's packed batches and eval split, driven by the trainer."""

    def run(packing: bool, out: Path) -> TrainOutput:
        spec = TextJobSpec.model_validate(
            {
                **_spec(steps=4, max_seq_length=128).model_dump(mode="json"),
                "data": {"packing": packing, "validation_split": 0.25},
            }
        )
        return _train(spec, tiny_text_model, tiny_text_dataset, out)

    padded, packed = run(False, tmp_path / "a"), run(True, tmp_path / "b")
    for out in (padded, packed):
        assert out.metrics["validation_examples"] == 16 and out.metrics["examples"] == 48
        assert 0 < out.metrics["eval_loss"] < 20
    assert packed.resolved["packing"] is True
    assert packed.metrics["useful_fraction"] > padded.metrics["useful_fraction"]
    assert packed.metrics["useful_fraction"] > 0.9
