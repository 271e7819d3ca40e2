"""Data-parallel training across a gang of workers: one process per GPU, started by Ray Train
(which also sets up `torch.distributed`: gloo on the CPU, NCCL on GPUs), trained with DDP.

What a gang changes, and nothing else (a one-worker job runs exactly as before):

- **The batch.** `training.batch_size` is the global batch. Micro-batch `k` is the same rows
  as in a one-worker run (`TextTrainSet.indices(k)`, a pure function of seed and step); rank
  `r` of `N` takes every N-th of them (`rows[r::N]`, as `DistributedSampler` strides).
- **The loss.** Each rank's loss is its label tokens' summed loss divided by (the global
  batch's label tokens / N), so DDP's gradient average is exactly the gradient of the global
  batch's mean token loss, as one worker computes it, whatever the ranks' token counts. The
  loss the loop records is the global one (an all-reduce of the ranks' values).
- **Randomness.** Every rank seeds the same model (DDP also broadcasts rank 0's weights), then
  draws dropout from its own stream; each rank's torch (and CUDA) generator state goes into the
  checkpoint, so a resumed gang of the same size continues every stream where it stopped.
- **Writes.** Rank 0 alone writes checkpoints (the others wait at a barrier until it is
  complete), the adapter, the sidecar and the events; the checkpoint step to resume from is
  rank 0's reading of the bucket, broadcast to all.

Equal to one worker up to float reduction order: the per-rank sums, the gradient all-reduce
and padding each sub-batch to its own longest row change the last bits, not the math
(docs/architecture.md states the tolerance the tests hold it to).
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from lorajobs.jobspecs.failures import InvalidInput
from lorajobs.storage.checkpoints import Checkpoint, CheckpointStore
from lorajobs.worker.context import WorkerContext
from lorajobs.worker.trainers.loop import TrainLoop
from lorajobs.worker.trainers.preemption import PreemptionNotice

# Mixed into a rank's dropout seed: ranks draw independent masks, reproducibly.
_RANK_STREAM = 1_000_003


@dataclass(frozen=True)
class Gang:
    """This process's place in the job's gang (rank 0 of 1 for a one-worker job)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def of(cls, ctx: WorkerContext) -> Gang:
        return cls(ctx.rank, ctx.world_size)

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def writer(self) -> bool:
        """Whether this rank writes what the job leaves behind (rank 0)."""
        return self.rank == 0

    def wrap(
        self, model: torch.nn.Module, device: torch.device, seed: int, *, fsdp: bool = False
    ) -> torch.nn.Module:
        """The model as this rank trains it: DDP (gradients averaged over the gang), FSDP
        (`fsdp`: sharded over it, in place) or itself. Call after the LoRA is on, before the
        optimizer is built (FSDP replaces the parameters with their shards); DDP wants the
        model on `device`, FSDP moves each shard there itself."""
        if not self.active:
            return model
        if fsdp:
            shard_model(model, device)
            net = model
        else:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            net = DistributedDataParallel(model, device_ids=ids)
        self.reseed(seed)
        return net

    def reseed(self, seed: int) -> None:
        """Give this rank its own dropout stream: call after the (shared) initialisation."""
        if self.active:
            torch.manual_seed(seed * _RANK_STREAM + self.rank)

    def rows(self, batch: dict[str, Any]) -> dict[str, Any]:
        """This rank's rows of a global micro-batch whose tensors are all batch-first (dicts
        inside are split alike): every `world`-th row, from `rank`."""
        if not self.active:
            return batch
        return {
            k: self.rows(v) if isinstance(v, dict) else v[self.rank :: self.world]
            for k, v in batch.items()
        }

    @contextmanager
    def rank_zero_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (filling a shared cache), then the others (reading
        it): two ranks never write the same cache entries at once."""
        if not self.active:
            yield
            return
        import torch.distributed as dist

        if not self.writer:
            dist.barrier()
        yield
        if self.writer:
            dist.barrier()

    def full_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """The trainable (LoRA) tensors of a sharded model, whole, on the host of every rank
        (a collective: every rank calls it); None for a model that is not sharded."""
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not any(_sharded(p) for _, p in named):
            return None
        return {n: _whole(p) for n, p in named}

    def fingerprint(self, base: str) -> str:
        """A checkpoint fingerprint that also names the world size (resume at the same one)."""
        if not self.active:
            return base
        import hashlib

        return hashlib.sha256(f"{base}:workers={self.world}".encode()).hexdigest()

    def global_loss(
        self, local: torch.Tensor, counters: dict[str, int]
    ) -> tuple[torch.Tensor, dict[str, int]]:
        """(a loss whose value is the gang's mean and whose gradient is this rank's part, the
        counters summed over the gang). `local` is weighted so that DDP's average is exact."""
        if not self.active:
            return local, counters
        import torch.distributed as dist

        keys = sorted(counters)
        # float64 on the CPU: exact for counts, and the sum order is fixed (rank order).
        vec = torch.tensor([float(local.detach())] + [float(counters[k]) for k in keys])
        vec = vec.to(local.device, torch.float64)
        dist.all_reduce(vec)
        vec = vec.cpu()
        mean = (vec[0] / self.world).to(local.dtype).to(local.device)
        summed = {k: int(round(float(v))) for k, v in zip(keys, vec[1:])}
        return local + (mean - local.detach()), summed

    def loop(
        self,
        cfg: Any,
        ctx: WorkerContext,
        *,
        average_grads: bool = False,
        wrapped: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> TrainLoop:
        """The training loop: `TrainLoop`, or for a gang one that checkpoints from rank 0 (and,
        `average_grads`, averages the gradients over the gang itself once per optimizer step:
        for models trained without a DDP wrapper; `wrapped`: the model `wrap` gave)."""
        if not self.active:
            return TrainLoop(cfg, ctx=ctx, **kwargs)
        if ctx.checkpoints is not None and not isinstance(ctx.checkpoints, RankZeroStore):
            ctx.checkpoints = RankZeroStore(ctx.checkpoints, self)  # type: ignore[assignment]
        if not self.writer:
            ctx.board = None
        return GangTrainLoop(
            cfg, ctx=ctx, gang=self, average_grads=average_grads, wrapped=wrapped, **kwargs
        )


class RankZeroStore:
    """A job's checkpoint store as a gang sees it: rank 0 writes, every rank waits until the
    checkpoint is complete (a barrier), and the step to resume from is rank 0's reading."""

    def __init__(self, inner: CheckpointStore, gang: Gang) -> None:
        self.inner, self.gang = inner, gang
        self.last_state: dict[str, Any] | None = None

    @property
    def uri(self) -> str:
        return self.inner.uri

    def steps(self) -> list[int]:
        return self.inner.steps()

    def latest(self) -> int | None:
        import torch.distributed as dist

        box = [self.inner.latest() if self.gang.writer else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def load(self, step: int) -> Checkpoint:
        ckpt = self.inner.load(step)
        self.last_state = ckpt.state
        return ckpt

    def save(self, ckpt: Checkpoint, keep: int) -> None:
        import torch.distributed as dist

        if self.gang.writer:
            self.inner.save(ckpt, keep=keep)
        dist.barrier()


class GangTrainLoop(TrainLoop):
    """`TrainLoop` for one rank of a gang: every rank's generator states in the checkpoint."""

    def __init__(
        self,
        cfg: Any,
        *,
        gang: Gang,
        average_grads: bool = False,
        wrapped: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(cfg, **kwargs)
        self.gang, self.average_grads, self.wrapped = gang, average_grads, wrapped

    def _stop_reason(self, notice: PreemptionNotice) -> str | None:
        # Every rank must stop at the same step (the checkpoint is a collective): any rank's
        # notice — rank 0's stop request, or a SIGTERM to any of them — stops them all. One
        # tiny all-reduce per step, read on the host.
        import torch.distributed as dist

        mine = notice.reason()
        flag = torch.tensor([1.0 if mine else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if float(flag.item()) == 0.0:
            return None
        return mine or "another worker of the gang was told to stop"

    def _micro_batch(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        # DDP all-reduces once per optimizer step: the earlier micro-batches' gradients add up
        # locally first (the same sum, in another order). FSDP keeps reducing every micro-batch:
        # skipping it would hold whole, unsharded gradients, which FSDP is there to avoid.
        from torch.nn.parallel import DistributedDataParallel

        if last or not isinstance(self.wrapped, DistributedDataParallel):
            return contextlib.nullcontext()
        return self.wrapped.no_sync()

    def _sync_grads(self) -> None:
        """The gang's mean of the accumulated gradients, in one all-reduce of one flat buffer
        (LoRA gradients are small); the parameters' fixed order makes it the same every run."""
        if not self.average_grads:
            return
        import torch.distributed as dist

        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.gang.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def _capture(self) -> Checkpoint:
        import torch.distributed as dist

        ckpt = super()._capture()  # every rank builds it (LoRA-sized); rank 0's is written
        states: list[Any] = [None] * self.gang.world
        dist.all_gather_object(states, _rng_state())
        ckpt.state["workers"] = self.gang.world
        ckpt.state["rank_rng"] = states
        return ckpt

    def _host(self, t: torch.Tensor) -> torch.Tensor:
        return _whole(t) if _sharded(t) else super()._host(t)

    def _place(self, value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if not _sharded(like):
            return super()._place(value, like)
        from torch.distributed.tensor import distribute_tensor

        # Every rank read the same checkpoint: each keeps its own shard of the whole tensor.
        return distribute_tensor(value.to(like.device), like.device_mesh, like.placements)

    def _resume(self) -> int:
        step = super()._resume()
        store = self.ctx.checkpoints
        if step == 0 or not isinstance(store, RankZeroStore):
            return step
        states = (store.last_state or {}).get("rank_rng") or []
        if len(states) != self.gang.world:
            raise InvalidInput(
                f"job {self.ctx.job_id}: checkpoint step {step} was written by a gang of "
                f"{len(states) or 1} workers, this attempt has {self.gang.world}; resume at "
                "the same world size"
            )
        _set_rng_state(states[self.gang.rank])
        return step


def shard_model(model: torch.nn.Module, device: torch.device) -> None:
    """Shard `model` over the gang with FSDP2 (`fully_shard`), in place: each transformer
    block (the classes transformers names in `_no_split_modules`) is one unit, gathered for its
    forward and backward only, then the root (embeddings, head, what is left). Parameters are
    sharded on their first dimension; frozen base weights and LoRA weights alike, so a rank
    holds 1/N of the base, of the LoRA and of the optimizer state. Gradients are
    reduce-scattered as averages, which is what DDP computes: the loss weighting is the same."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    blocks = set(getattr(base, "_no_split_modules", None) or [])
    units = [m for m in model.modules() if type(m).__name__ in blocks]
    if not units:
        raise InvalidInput(
            f"training.distributed fsdp: {type(base).__name__} names no transformer block "
            "class (_no_split_modules) to shard by; use ddp"
        )
    # Rank 0 alone read the weights; the other ranks' models are empty (meta).
    rank0 = torch.distributed.get_rank() == 0
    full = model.state_dict() if rank0 else {}
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    _fill_from_rank0(model, full, device)


def _fill_from_rank0(
    model: torch.nn.Module, full: dict[str, torch.Tensor], device: torch.device
) -> None:
    """Give every rank its shards of rank 0's weights (`full`: rank 0's whole state dict, {}
    elsewhere), one tensor at a time, and rank 0's buffers (rotary tables and the like, which
    no state dict carries). A collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        model.to_empty(device=device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full, options=options)
    for buf in model.buffers():
        torch.distributed.broadcast(buf, src=0)


def _sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A sharded tensor gathered whole, on the host (a collective)."""
    return t.detach().full_tensor().cpu().clone()  # type: ignore[attr-defined]


def _rng_state() -> dict[str, Any]:
    def enc(t: torch.Tensor) -> str:
        return base64.b64encode(t.numpy().tobytes()).decode("ascii")

    cuda = [enc(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
    return {"torch": enc(torch.get_rng_state()), "cuda": cuda}


def _set_rng_state(state: dict[str, Any]) -> None:
    def dec(s: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)

    torch.set_rng_state(dec(state["torch"]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([dec(s) for s in state["cuda"]][: torch.cuda.device_count()])
