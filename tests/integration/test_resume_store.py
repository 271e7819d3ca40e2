"""The checkpoint store and the pure parts of the loop (fast: no model)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lorajobs.jobspecs.failures import SpecError
from lorajobs.jobspecs.loader import load_spec_text
from lorajobs.storage.checkpoints import Checkpoint, CheckpointStore
from lorajobs.worker.safetensors_io import canonical_bytes, load_bytes
from lorajobs.worker.trainers.loop import lr_factor, total_steps, window_means


def _store(tmp_path: Path) -> CheckpointStore:
    return CheckpointStore.for_job(tmp_path.as_uri(), "job1")


def test_save_load_round_trip_keeps_the_last_k(tmp_path: Path) -> None:
    store = _store(tmp_path)
    rng = torch.get_rng_state()
    for step in (2, 4, 6):
        store.save(
            Checkpoint(
                step,
                canonical_bytes({"w": torch.full((2, 3), float(step)), "rng": rng}),
                {"step": step, "losses": [0.1, math.pi]},
            ),
            keep=2,
        )
    assert store.steps() == [4, 6] and store.latest() == 6
    ck = store.load(6)
    tensors = load_bytes(ck.tensors)
    assert torch.equal(tensors["w"], torch.full((2, 3), 6.0))
    assert torch.equal(tensors["rng"], rng) and tensors["rng"].dtype == torch.uint8
    assert ck.state["losses"] == [0.1, math.pi]  # floats survive JSON exactly
    files = sorted(p.name for p in (tmp_path / "jobs/job1/checkpoints/step-6").iterdir())
    assert files == ["COMPLETE", "state.json", "tensors.safetensors"]  # no pickle anywhere


def test_incomplete_checkpoints_are_invisible(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.save(Checkpoint(3, canonical_bytes({"w": torch.zeros(1)}), {"step": 3}), keep=3)
    half = tmp_path / "jobs/job1/checkpoints/step-9"
    half.mkdir(parents=True)
    (half / "tensors.safetensors").write_bytes(b"partial")
    assert store.latest() == 3
    assert _store(tmp_path / "nothing-here").latest() is None


def test_lr_schedules_match_transformers() -> None:
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    total, warmup = 20, 4
    for kind, make in (
        ("constant", lambda o: get_constant_schedule_with_warmup(o, warmup)),
        ("linear", lambda o: get_linear_schedule_with_warmup(o, warmup, total)),
        ("cosine", lambda o: get_cosine_schedule_with_warmup(o, warmup, total)),
    ):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = make(opt)
        for step in range(total):
            assert lr_factor(kind, step, total, warmup) == pytest.approx(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()


def test_epochs_or_steps() -> None:
    base = "kind: text\nname: a\nbase_model: /m\ndataset: /d\n"
    spec = load_spec_text(
        base + "training: {epochs: 3, batch_size: 4, gradient_accumulation_steps: 2}\n"
    )
    assert total_steps(spec.training, 17) == 3 * 3  # ceil(17 / 8) steps per epoch
    with pytest.raises(SpecError, match="exactly one of steps or epochs"):
        load_spec_text(base + "training: {steps: 3, epochs: 2}\n")
    with pytest.raises(SpecError, match="exactly one of steps or epochs"):
        load_spec_text(base + "training: {batch_size: 2}\n")


def test_window_means() -> None:
    assert window_means([1.0, 3.0, 5.0, 7.0, 9.0], 2) == [2.0, 6.0, 9.0]


def test_accumulated_micro_batches_step_like_one_big_batch(tmp_path: Path) -> None:
    """2 micro-batches of 2 rows == 1 batch of 4 rows (equal-size mean losses)."""
    from types import SimpleNamespace

    from lorajobs.worker.context import WorkerContext
    from lorajobs.worker.trainers.loop import TrainLoop, resolve_precision

    x = torch.randn(24, 3, generator=torch.Generator().manual_seed(0))
    y = x.sum(dim=1, keepdim=True)

    def run(batch: int, accum: int) -> torch.Tensor:
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        cfg = SimpleNamespace(
            gradient_accumulation_steps=accum,
            learning_rate=0.1,
            lr_scheduler="linear",
            warmup_steps=1,
            max_grad_norm=0.5,
            checkpoint_every=0,
            keep_checkpoints=1,
        )
        loop = TrainLoop(
            cfg,
            model=model,
            optimizer=torch.optim.AdamW(model.parameters()),
            precision=resolve_precision("no", torch.device("cpu")),
            device=torch.device("cpu"),
            ctx=WorkerContext(job_id="j", output_uri="", cache_dir=tmp_path),
            total=5,
            generators={},
            fingerprint="",
        )

        def micro_loss(k: int) -> tuple[torch.Tensor, dict[str, int]]:
            rows = slice(k * batch, (k + 1) * batch)
            return torch.nn.functional.mse_loss(model(x[rows]), y[rows]), {"rows": batch}

        result = loop.run(micro_loss)
        assert result.counters == {"rows": 20} and len(result.losses) == 5
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    torch.testing.assert_close(run(2, 2), run(4, 1), rtol=0, atol=1e-6)
