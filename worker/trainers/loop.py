"""What the image and text trainers share: device and precision, step count, optimizer, LR
schedule, and the training loop itself (accumulation, clipping, progress, checkpoints, resume,
a checkpoint on SIGTERM).

A trainer supplies one function, `micro_loss(k)` — the loss of global micro-batch `k` — and
`TrainLoop.run` does the rest. Every random number the loop can consume is captured in a
checkpoint (python, numpy, torch, CUDA and the trainer's own generators), and the data position
is the step number, so a resumed run is bitwise the run that was interrupted (on CPU).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lorajobs.jobspecs.failures import InvalidInput, Preempted
from lorajobs.storage.checkpoints import Checkpoint
from lorajobs.worker.context import WorkerContext
from lorajobs.worker.trainers import loop_state
from lorajobs.worker.trainers.preemption import PreemptionNotice

REPORT_EVERY_S = 0.5
log = logging.getLogger(__name__)

# micro_loss(k) -> (loss of micro-batch k, counters to add up, e.g. {"tokens": 123})
MicroLoss = Callable[[int], tuple[torch.Tensor, dict[str, int]]]


# -- device, precision, steps ----------------------------------------------------------------


def pick_device() -> torch.device:
    """This process's current GPU if the node has one (the first, unless a gang's launcher set
    the local rank's: Ray Train does), else the CPU. Always with its index: DDP and FSDP place
    by it, and a bare "cuda" would put every worker of a node on GPU 0."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def to_device(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch's host tensors on `device`, without making the host wait for the device.

    A copy from pageable memory waits for every kernel already queued (it would undo what
    `TrainLoop` gains by reading losses late); from pinned memory with `non_blocking` it is
    queued like a kernel, and the caching host allocator keeps the source until it is done.
    """
    if device.type != "cuda":
        return tensors
    return {
        k: t.pin_memory().to(device, non_blocking=True) if t.device.type == "cpu" else t
        for k, t in tensors.items()
    }


@dataclass(frozen=True)
class Precision:
    """How the forward pass runs. LoRA weights and optimizer state are fp32 in every mode."""

    requested: str  # the spec's mixed_precision
    used: str  # what actually ran: "no" on the CPU whatever was asked
    base_dtype: torch.dtype  # the frozen base model's weights
    autocast: torch.dtype | None  # autocast dtype of the forward pass, None for fp32
    scale_loss: bool  # fp16 needs loss scaling

    def context(self, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast)


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """Mixed precision is a GPU feature: on the CPU a job runs fp32 (and records so), which keeps
    one spec runnable on a laptop (`lorajobs run`) and on a GPU node alike."""
    if device.type != "cuda" or requested == "no":
        return Precision(requested, "no", torch.float32, None, False)
    if requested == "bf16" and not torch.cuda.is_bf16_supported():
        requested_used = "fp16"  # pre-Ampere GPUs: the nearest thing that is fast there
    else:
        requested_used = requested
    if requested_used == "bf16":
        return Precision(requested, "bf16", torch.bfloat16, torch.bfloat16, False)
    return Precision(requested, "fp16", torch.float16, torch.float16, True)


def total_steps(cfg: Any, examples: int, batches_per_epoch: int | None = None) -> int:
    """Optimizer steps of the job: `steps`, or `epochs` full passes over `examples` (or over
    `batches_per_epoch` micro-batches, where the dataset plans its own batches, e.g. buckets)."""
    if cfg.steps is not None:
        return int(cfg.steps)
    batches = batches_per_epoch or max(1, math.ceil(examples / cfg.batch_size))
    return int(cfg.epochs) * max(1, math.ceil(batches / cfg.gradient_accumulation_steps))


def lr_factor(schedule: str, step: int, total: int, warmup: int) -> float:
    """LR multiplier for 0-based optimizer step `step`, as transformers' schedules define it
    (`get_{constant,linear,cosine}_schedule_with_warmup`): linear warmup from 0, then the shape."""
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"unknown lr_scheduler {schedule!r}")


def build_optimizer(
    params: list[torch.nn.Parameter] | list[dict[str, Any]], cfg: Any, device: torch.device
) -> torch.optim.Optimizer:
    """AdamW from torch, or bitsandbytes' 8-bit AdamW where it can run (its kernels need CUDA).

    `params` is a list of parameters, or of param groups; a group may carry its own peak
    learning rate as `"peak_lr"` (the text-encoder LoRA's), which the schedule then scales.
    """
    if cfg.optimizer == "adamw8bit":
        from lorajobs.worker.trainers.quantize import refuse_here

        refuse_here(cfg, device)  # NeedsCuda: no GPU here, or no bitsandbytes (names the extra)
        import bitsandbytes as bnb

        opt: torch.optim.Optimizer = bnb.optim.AdamW8bit(
            params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay
        )
        return opt
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def seed_everything(seed: int) -> None:
    """Seed every global generator a trainer or a library may draw from."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def spec_fingerprint(spec: Any, threads: int) -> str:
    """A digest of everything in the spec that changes the numbers: a checkpoint is only
    resumed by the spec (and thread count) that wrote it."""
    # Samples only render the weights (tests/integration/test_samples.py shows the adapter is
    # the same with and without them), so a changed sample prompt may still resume.
    ignored = {"name", "owner", "priority", "output", "samples", "max_runtime"}
    data = spec.model_dump(mode="json", exclude=ignored)
    data["resources"] = {"cpus": threads}
    for key in ("checkpoint_every", "keep_checkpoints"):
        data["training"].pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


# -- loss curves ----------------------------------------------------------------------------


def window_means(losses: list[float], every: int) -> list[float]:
    """Mean of each run of `every` steps (the last one may be shorter), summed in step order."""
    out = []
    for a in range(0, len(losses), every):
        window = 0.0
        for v in losses[a : a + every]:
            window += v
        out.append(window / len(losses[a : a + every]))
    return out


def loss_curve(losses: list[float], points: int) -> list[float]:
    """Mean loss over up to `points` equal windows of steps: short, and less noisy than samples."""
    n = len(losses)
    k = min(points, n)
    bounds = [round(i * n / k) for i in range(k + 1)]
    return [round(sum(losses[a:b]) / (b - a), 6) for a, b in zip(bounds, bounds[1:]) if b > a]


# -- the loop -------------------------------------------------------------------------------


@dataclass
class LoopResult:
    """What a finished loop hands back to its trainer."""

    losses: list[float]  # one per optimizer step, from step 1 (resumed steps included)
    counters: dict[str, int]
    resumed_from_step: int
    train_seconds: float  # this attempt's training time
    lr_last: float = 0.0


class TrainLoop:
    """Optimizer steps over micro-batches, with everything that makes them resumable.

    `model`'s trainable parameters are the LoRA weights: they, the optimizer state, the
    schedule position, every RNG and the loss history go into each checkpoint.
    """

    def __init__(
        self,
        cfg: Any,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        precision: Precision,
        device: torch.device,
        ctx: WorkerContext,
        total: int,
        generators: dict[str, torch.Generator],
        fingerprint: str,
    ) -> None:
        self.cfg = cfg
        self.model = model
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named]
        self.optimizer = optimizer
        self.precision = precision
        self.device = device
        self.ctx = ctx
        self.total = total
        self.accum = cfg.gradient_accumulation_steps
        self.generators = generators
        self.fingerprint = fingerprint
        self.scaler = torch.amp.GradScaler(device.type) if precision.scale_loss else None
        self.losses: list[float] = []
        self._unread: list[list[torch.Tensor]] = []  # losses of steps not yet in `losses`
        self.counters: dict[str, int] = {}
        self.step = 0

    def run(
        self, micro_loss: MicroLoss, on_step: Callable[[int], None] | None = None
    ) -> LoopResult:
        """Resume if the job has a checkpoint, then train up to `total` steps.

        `on_step(step)` runs after each optimizer step (step counts from 1), before that step's
        checkpoint: the image trainer renders validation samples from it. It must not draw from
        the global RNGs (it would change the training that follows).

        A SIGTERM or a stop request (`ctx.stop_requested`: a preemption notice) ends the loop
        after the current step: it checkpoints that step and raises `Preempted`.
        """
        with PreemptionNotice(self.ctx.stop_requested) as notice:
            resumed = self._resume()
            started = time.monotonic()
            lr = self._train(micro_loss, on_step, notice)
        return LoopResult(
            losses=self.losses,
            counters=self.counters,
            resumed_from_step=resumed,
            train_seconds=time.monotonic() - started,
            lr_last=lr,
        )

    def _train(
        self,
        micro_loss: MicroLoss,
        on_step: Callable[[int], None] | None,
        notice: PreemptionNotice,
    ) -> float:
        last_report = time.monotonic()
        last_step = self.step
        lr = 0.0
        while self.step < self.total:
            factor = lr_factor(self.cfg.lr_scheduler, self.step, self.total, self.cfg.warmup_steps)
            lr = self.cfg.learning_rate * factor
            for group in self.optimizer.param_groups:
                group["lr"] = group.get("peak_lr", self.cfg.learning_rate) * factor
            self._unread.append(self._one_step(micro_loss))
            self.step += 1
            if on_step is not None:
                on_step(self.step)

            now = time.monotonic()
            report = now - last_report >= REPORT_EVERY_S or self.step == self.total
            every, store = self.cfg.checkpoint_every, self.ctx.checkpoints
            stop = self.ctx.stop_after_step == self.step and self.step < self.total
            why = self._stop_reason(notice)
            save = store is not None and bool(stop or why or (every and self.step % every == 0))
            if report or save or stop or why:
                self._read_losses()
            if report:
                rate = (self.step - last_step) / max(now - last_report, 1e-9)
                self.ctx.report(
                    {
                        "step": self.step,
                        "total_steps": self.total,
                        "loss": self.losses[-1],
                        "it_per_s": rate,
                    }
                )
                last_report, last_step = now, self.step
            if save and store is not None:
                store.save(self._capture(), keep=self.cfg.keep_checkpoints)
                if self.ctx.board is not None:
                    self.ctx.board.upload()  # the events go up with each checkpoint
            if stop:
                raise Preempted(f"stopped after step {self.step} (LORAJOBS_STOP_AFTER_STEP)")
            if why:
                where = "checkpointed" if save else "no checkpoint store"
                log.warning("%s: stopped after step %d (%s)", why, self.step, where)
                raise Preempted(f"stopped after step {self.step}: {why} ({where})")
        self._read_losses()
        return lr

    def _one_step(self, micro_loss: MicroLoss) -> list[torch.Tensor]:
        """One optimizer step; its micro-batches' losses, detached and not yet read."""
        losses = []
        for i in range(self.accum):
            with self._micro_batch(last=i == self.accum - 1):
                with self.precision.context(self.device):
                    loss, counts = micro_loss(self.step * self.accum + i)
                scaled = loss / self.accum if self.accum > 1 else loss
                if self.scaler is not None:
                    self.scaler.scale(scaled).backward()
                else:
                    scaled.backward()
            losses.append(loss.detach())
            for k, v in counts.items():
                self.counters[k] = self.counters.get(k, 0) + int(v)
        self._sync_grads()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return losses

    def _read_losses(self) -> None:
        """Move the steps' losses to the host, into `losses`; raise on the first non-finite one.

        Reading a loss waits for the device to finish the step. Done every step, that wait
        leaves a GPU idle while the host prepares the next batch; done at reports and
        checkpoints only, the host runs ahead. The sum is the same float64 sum, in the same
        order, as reading each loss at once: the values are identical.
        """
        first = len(self.losses) + 1
        for n, parts in enumerate(self._unread, start=first):
            total = 0.0
            for part in parts:
                total += float(part)
            loss = total / self.accum
            if not math.isfinite(loss):
                self._unread.clear()
                raise InvalidInput(
                    f"training.learning_rate {self.cfg.learning_rate}: loss became {loss} "
                    f"at step {n}"
                )
            self.losses.append(loss)
            self._board_step(n, loss)
        self._unread.clear()

    def _board_step(self, step: int, loss: float) -> None:
        """TensorBoard scalars of optimizer step `step` (from 1): its loss and learning rate."""
        board = self.ctx.board
        if board is None:
            return
        cfg = self.cfg
        factor = lr_factor(cfg.lr_scheduler, step - 1, self.total, cfg.warmup_steps)
        board.scalar("train/loss", loss, step)
        board.scalar("train/learning_rate", cfg.learning_rate * factor, step)

    # -- checkpoints --------------------------------------------------------------------------

    def _capture(self) -> Checkpoint:
        """Everything a resumed run needs, as of the current step (`loop_state.capture`)."""
        return loop_state.capture(self)

    def _resume(self) -> int:
        """Restore the latest checkpoint, if any; the step it was taken at (else 0)."""
        return loop_state.resume(self)

    def _stop_reason(self, notice: PreemptionNotice) -> str | None:
        """Why to checkpoint and stop after this step (None: go on); a gang's ranks agree."""
        return notice.reason()

    def _micro_batch(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        """Around one micro-batch's forward and backward (`last`: the step's last): a DDP gang
        skips the gradient all-reduce until the last one."""
        return contextlib.nullcontext()

    def _sync_grads(self) -> None:
        """Make the accumulated gradients the step's: nothing for one worker (a gang that
        averages them itself does it here, once per optimizer step)."""

    def _host(self, t: torch.Tensor) -> torch.Tensor:
        """`t` (a parameter or optimizer state) as a whole tensor on the host, for a checkpoint.
        A sharded gang (`distributed.GangTrainLoop`) gathers its shards here."""
        return t.detach().cpu().clone()

    def _place(self, value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A checkpoint's whole tensor as `like` holds it (on its device; a sharded gang's
        part of it)."""
        return value.to(like.device)


def resolved_settings(
    spec: Any, precision: Precision, total: int, device: torch.device, threads: int
) -> dict[str, Any]:
    """The settings every trainer resolves the same way (LoRA, optimisation, precision,
    device); each recipe adds its own to these for the sidecar's `resolved`."""
    cfg, lora = spec.training, spec.lora
    return {
        "rank": lora.rank,
        "alpha": lora.alpha,
        "dropout": lora.dropout,
        "use_dora": lora.use_dora,
        "use_rslora": lora.use_rslora,
        "target_modules": spec.target_modules(),
        "steps": total,
        "batch_size": cfg.batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "learning_rate": cfg.learning_rate,
        "lr_scheduler": cfg.lr_scheduler,
        "warmup_steps": cfg.warmup_steps,
        "weight_decay": cfg.weight_decay,
        "max_grad_norm": cfg.max_grad_norm,
        "optimizer": cfg.optimizer,
        "mixed_precision": precision.used,
        "mixed_precision_requested": precision.requested,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "quantize_base": cfg.quantize_base,
        "seed": cfg.seed,
        "device": device.type,
        "threads": threads,
    }
