"""Text jobs trained as a pack: each adapter is byte for byte its solo run (CPU), and each job
stays a job (cancel, bad data, NaN loss and preemption touch that job alone)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from lorajobs.jobspecs.failures import InvalidInput, Preempted, UserDataError
from lorajobs.jobspecs.models import TextJobSpec
from lorajobs.storage.checkpoints import CheckpointStore
from lorajobs.worker.context import WorkerContext
from lorajobs.worker.trainers import get_trainer
from lorajobs.worker.trainers.pack import PackJob
from lorajobs.worker.trainers.text.pack import train_pack

pytestmark = pytest.mark.slow

FILES = ["adapter_config.json", "adapter_model.safetensors"]

# Four jobs that share nothing but the base: rank, alpha, dropout, targets, batch size,
# accumulation, steps, seed and schedule all differ (so do their batches' lengths).
SHAPES: list[dict[str, Any]] = [
    {"lora": {"rank": 4, "alpha": 8}, "training": {"steps": 6, "batch_size": 4, "seed": 3}},
    {
        "lora": {"rank": 8, "alpha": 16, "dropout": 0.1},
        "training": {"steps": 9, "batch_size": 2, "gradient_accumulation_steps": 2, "seed": 4},
    },
    {
        "lora": {"rank": 2, "alpha": 2, "target_modules": ["q_proj", "v_proj", "o_proj"]},
        "training": {"steps": 4, "batch_size": 3, "seed": 5, "lr_scheduler": "constant"},
    },
    {
        "lora": {"rank": 8, "alpha": 4, "dropout": 0.05},
        "training": {"steps": 7, "batch_size": 4, "gradient_accumulation_steps": 3, "seed": 6},
    },
]


def _spec(i: int, **training: Any) -> TextJobSpec:
    shape = SHAPES[i]
    return TextJobSpec.model_validate(
        {
            "kind": "text",
            "name": f"packed-{i}",
            "base_model": "s3://models/tiny-llama",
            "dataset": "s3://datasets/grammar.jsonl",
            "lora": shape["lora"],
            "training": {
                "learning_rate": 5e-3,
                "max_seq_length": 64,
                "lr_scheduler": "cosine",
                "warmup_steps": 1,
                **shape["training"],
                **training,
            },
        }
    )


def _ctx(root: Path, i: int, checkpoints: bool = False) -> WorkerContext:
    ctx = WorkerContext(
        job_id=f"job{i}", output_uri=root.as_uri(), cache_dir=root / "cache", threads=2
    )
    if checkpoints:
        ctx.checkpoints = CheckpointStore.for_job(ctx.output_uri, ctx.job_id)
    return ctx


def _solo(i: int, model: Path, data: Path, root: Path, **training: Any) -> Path:
    out = root / f"solo-{i}"
    get_trainer("text")(_spec(i, **training), model, data, out, _ctx(root, i))
    return out


def _same_bytes(a: Path, b: Path) -> bool:
    return all((a / f).read_bytes() == (b / f).read_bytes() for f in FILES)


def test_pack_of_four_equals_each_solo_run_byte_for_byte(
    tiny_text_model: Path, tiny_text_dataset: Path, tmp_path: Path
) -> None:
    jobs = [
        PackJob(_spec(i), tiny_text_dataset, tmp_path / f"pack-{i}", _ctx(tmp_path, i))
        for i in range(4)
    ]
    ended: list[str] = []
    outcomes = train_pack(jobs, tiny_text_model, on_outcome=lambda j, o: ended.append(o.job_id))
    # Jobs with fewer rounds leave first; every job ends exactly once.
    assert ended == ["job2", "job0", "job1", "job3"]  # rounds: 4, 6, 9x2, 7x3
    for i, out in enumerate(outcomes):
        assert out.error is None and out.output is not None
        assert out.packed_with == [f"job{k}" for k in range(4) if k != i]
        assert out.output.metrics["steps"] == SHAPES[i]["training"]["steps"]
        assert out.steps_done == SHAPES[i]["training"]["steps"]
        solo = _solo(i, tiny_text_model, tiny_text_dataset, tmp_path)
        assert _same_bytes(solo, tmp_path / f"pack-{i}"), f"job{i} differs from its solo run"
    _loads_in_peft(tiny_text_model, tmp_path / "pack-1")


def _loads_in_peft(model_dir: Path, adapter: Path) -> None:
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    peft = PeftModel.from_pretrained(base, adapter)
    saved = load_file(adapter / "adapter_model.safetensors")
    loaded = {k: v for k, v in peft.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(saved)
    for k, v in saved.items():
        assert torch.equal(loaded[k.replace(".weight", ".default.weight")], v)
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 8


def test_cancelling_one_member_leaves_the_others_unchanged(
    tiny_text_model: Path, tiny_text_dataset: Path, tmp_path: Path
) -> None:
    seen: list[int] = []

    def cancel_job1() -> bool:
        seen.append(1)
        return len(seen) > 3  # after three rounds

    jobs = [
        PackJob(_spec(i), tiny_text_dataset, tmp_path / f"pack-{i}", _ctx(tmp_path, i))
        for i in (0, 1, 3)
    ]
    jobs[1].cancelled = cancel_job1
    outcomes = train_pack(jobs, tiny_text_model)
    assert outcomes[1].cancelled and outcomes[1].output is None
    assert 0 < outcomes[1].steps_done < 9
    assert not (tmp_path / "pack-1").exists()
    for i, out in zip((0, 3), (outcomes[0], outcomes[2])):
        assert out.error is None and not out.cancelled
        solo = _solo(i, tiny_text_model, tiny_text_dataset, tmp_path)
        assert _same_bytes(solo, tmp_path / f"pack-{i}")


def test_bad_data_and_a_nan_loss_fail_their_job_alone(
    tiny_text_model: Path, tiny_text_dataset: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": \n', encoding="utf-8")
    jobs = [
        PackJob(_spec(0), tiny_text_dataset, tmp_path / "pack-0", _ctx(tmp_path, 0)),
        PackJob(_spec(1), broken, tmp_path / "pack-1", _ctx(tmp_path, 1)),
        PackJob(
            _diverging(_spec(2, steps=20)),
            tiny_text_dataset,
            tmp_path / "pack-2",
            _ctx(tmp_path, 2),
        ),
        PackJob(_spec(3), tiny_text_dataset, tmp_path / "pack-3", _ctx(tmp_path, 3)),
    ]
    outcomes = train_pack(jobs, tiny_text_model)
    assert isinstance(outcomes[1].error, UserDataError)
    assert "broken.jsonl" in str(outcomes[1].error)
    assert isinstance(outcomes[2].error, InvalidInput)
    assert "loss became" in str(outcomes[2].error)
    for i in (0, 3):
        assert outcomes[i].error is None
        solo = _solo(i, tiny_text_model, tiny_text_dataset, tmp_path)
        assert _same_bytes(solo, tmp_path / f"pack-{i}")


def _diverging(spec: TextJobSpec) -> TextJobSpec:
    """`spec` with a learning rate no spec may ask for (validation caps it at 1): its loss
    turns inf/NaN within a few steps, as a diverging run's does."""
    training = spec.training.model_copy(update={"learning_rate": 1e30, "max_grad_norm": 0.0})
    return spec.model_copy(update={"training": training})


def test_a_preempted_pack_resumes_every_job_from_its_own_checkpoint(
    tiny_text_model: Path, tiny_text_dataset: Path, tmp_path: Path
) -> None:
    rounds: list[int] = []

    def sigterm_at_round_5() -> bool:
        rounds.append(1)
        if len(rounds) == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # as a node drain or spot reclaim sends it
        return False

    def jobs() -> list[PackJob]:
        out = []
        for i in (0, 1, 3):
            spec = _spec(i, checkpoint_every=2)
            ctx = _ctx(tmp_path, i, checkpoints=True)
            out.append(PackJob(spec, tiny_text_dataset, tmp_path / f"pack-{i}", ctx))
        return out

    first = jobs()
    first[0].cancelled = sigterm_at_round_5
    with pytest.raises(Preempted):
        train_pack(first, tiny_text_model)
    stores = [CheckpointStore.for_job(tmp_path.as_uri(), f"job{i}") for i in (0, 1, 3)]
    assert all(s.latest() for s in stores)  # each job wrote its own
    outcomes = train_pack(jobs(), tiny_text_model)
    for i, out in zip((0, 1, 3), outcomes):
        assert out.error is None
        assert out.output.metrics["resumed_from_step"] > 0
        solo = _solo(i, tiny_text_model, tiny_text_dataset, tmp_path)
        assert _same_bytes(solo, tmp_path / f"pack-{i}"), f"job{i} after resume"
