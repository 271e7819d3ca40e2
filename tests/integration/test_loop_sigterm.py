"""`TrainLoop` under SIGTERM (a preemption notice): it finishes the optimizer step it is in,
checkpoints that step and raises `Preempted`; the next attempt resumes there, bit for bit.

A small linear model keeps this fast; the whole path (`lorajobs run` killed with SIGTERM, then
resumed) is tests/e2e/test_sigterm.py.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from lorajobs.jobspecs.failures import Preempted
from lorajobs.jobspecs.models import TextJobSpec
from lorajobs.storage.checkpoints import CheckpointStore
from lorajobs.worker.context import WorkerContext
from lorajobs.worker.trainers.loop import (
    LoopResult,
    TrainLoop,
    build_optimizer,
    resolve_precision,
)

# 8 optimizer steps of 2 micro-batches, a warmup + cosine schedule: the resume must carry the
# LR position and AdamW's moments, and a notice in a step's first micro-batch must still
# finish that step's second.
CFG = TextJobSpec.model_validate(
    {
        "kind": "text",
        "name": "n",
        "base_model": "m",
        "dataset": "d",
        "training": {
            "steps": 8,
            "gradient_accumulation_steps": 2,
            "learning_rate": 0.05,
            "lr_scheduler": "cosine",
            "warmup_steps": 2,
            "checkpoint_every": 0,
        },
    }
).training
X = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
Y = X @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])


def _train(
    bucket: Path | None, sigterm_at: int | None = None, ask_stop_at: int | None = None
) -> tuple[LoopResult, torch.Tensor]:
    """A fresh model and optimizer, trained by a loop; SIGTERM to this process in micro-batch
    `sigterm_at` (0-based, global), or the platform's stop request from micro-batch
    `ask_stop_at` on."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    device = torch.device("cpu")
    store = CheckpointStore.for_job(bucket.as_uri(), "j") if bucket is not None else None
    asked: list[str] = []
    ctx = WorkerContext(
        job_id="j",
        output_uri="file:///unused",
        cache_dir=Path("/unused"),
        checkpoints=store,
        stop_requested=lambda: asked[0] if asked else None,
    )
    loop = TrainLoop(
        CFG,
        model=model,
        optimizer=build_optimizer(list(model.parameters()), CFG, device),
        precision=resolve_precision("no", device),
        device=device,
        ctx=ctx,
        total=8,
        generators={},
        fingerprint="f",
    )

    def micro_loss(k: int) -> tuple[torch.Tensor, dict[str, int]]:
        if k == sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        if k == ask_stop_at:
            asked.append("preempted: node n1 draining (spot reclaim), deadline T")
        x, y = X[2 * (k % 8) : 2 * (k % 8) + 2], Y[2 * (k % 8) : 2 * (k % 8) + 2]
        return torch.nn.functional.mse_loss(model(x), y), {"rows": 2}

    result = loop.run(micro_loss)
    return result, torch.cat([p.detach().flatten() for p in model.parameters()])


def test_sigterm_checkpoints_the_step_it_finishes_and_the_resume_is_exact(tmp_path: Path) -> None:
    handler = signal.getsignal(signal.SIGTERM)
    straight, weights = _train(None)

    with pytest.raises(Preempted, match=r"after step 4: SIGTERM \(checkpointed\)"):
        _train(tmp_path, sigterm_at=6)  # step 4's first micro-batch (steps count from 1)
    assert signal.getsignal(signal.SIGTERM) is handler  # restored on the way out
    store = CheckpointStore.for_job(tmp_path.as_uri(), "j")
    assert store.steps() == [4]  # no periodic checkpoints: this one is the notice's
    ckpt = store.load(4)
    assert ckpt.state["counters"] == {"rows": 16}  # both micro-batches of step 4 ran

    resumed, resumed_weights = _train(tmp_path)
    assert resumed.resumed_from_step == 4
    assert torch.equal(resumed_weights, weights)
    assert resumed.losses == straight.losses and resumed.counters == straight.counters


def test_sigterm_without_a_checkpoint_store_still_ends_the_attempt() -> None:
    with pytest.raises(Preempted, match=r"after step 2: SIGTERM \(no checkpoint store\)"):
        _train(None, sigterm_at=3)


def test_a_stop_request_checkpoints_like_sigterm_and_the_resume_is_exact(tmp_path: Path) -> None:
    straight, weights = _train(None)
    why = r"after step 3: preempted: node n1 draining \(spot reclaim\), deadline T \(checkpointed\)"
    with pytest.raises(Preempted, match=why):
        _train(tmp_path, ask_stop_at=5)  # step 3's second micro-batch: step 3 ends, then stop
    store = CheckpointStore.for_job(tmp_path.as_uri(), "j")
    assert store.steps() == [3]  # the request's checkpoint, no periodic ones

    resumed, resumed_weights = _train(tmp_path)
    assert resumed.resumed_from_step == 3
    assert torch.equal(resumed_weights, weights)
    assert resumed.losses == straight.losses
