"""A `TrainLoop`'s checkpoint: what it captures and how it restores it.

One checkpoint is the LoRA weights, the optimizer state, the schedule position, every RNG (python,
numpy, torch, CUDA and the trainer's own generators) and the loss history, so a resumed run is
bitwise the run that was interrupted (on the CPU). Tensors go through the loop's `_host` (to a
whole host tensor) and `_place` (back where the loop holds it): a sharded gang gathers and
re-shards there, and everything else here is the same for every trainer.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from lorajobs.jobspecs.failures import InvalidInput
from lorajobs.storage.checkpoints import Checkpoint
from lorajobs.worker.safetensors_io import canonical_bytes, load_bytes

FORMAT = "lorajobs.checkpoint/v1"


def capture(loop: Any) -> Checkpoint:
    """`loop`'s state as of its current step."""
    tensors: dict[str, torch.Tensor] = {f"param/{n}": loop._host(p) for n, p in loop.named}
    opt = loop.optimizer.state_dict()
    opt_json: dict[str, dict[str, Any]] = {}
    for pid, st in opt["state"].items():
        opt_json[str(pid)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim/{pid}/{k}"] = loop._host(v)
            else:
                opt_json[str(pid)][k] = v
    tensors.update(_rng_tensors(loop.generators))
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    cfg = loop.cfg
    state = {
        "format": FORMAT,
        "step": loop.step,
        "total_steps": loop.total,
        "fingerprint": loop.fingerprint,
        "losses": loop.losses,
        "counters": loop.counters,
        "optimizer": {"state": opt_json, "param_groups": opt["param_groups"]},
        "scheduler": {
            "kind": cfg.lr_scheduler,
            "warmup_steps": cfg.warmup_steps,
            "base_lr": cfg.learning_rate,
            "step": loop.step,
        },
        "grad_scaler": loop.scaler.state_dict() if loop.scaler is not None else None,
        "rng": {
            "python": [py_version, list(py_internal), py_gauss],
            "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
        },
    }
    return Checkpoint(loop.step, canonical_bytes(tensors), state)


def resume(loop: Any) -> int:
    """Restore `loop` from its job's latest checkpoint; the step it resumes at (0: none)."""
    store = loop.ctx.checkpoints
    step = store.latest() if store is not None else None
    if store is None or step is None:
        return 0
    ckpt = store.load(step)
    st, t = ckpt.state, load_bytes(ckpt.tensors)
    if st.get("fingerprint") != loop.fingerprint:
        raise InvalidInput(
            f"job {loop.ctx.job_id}: the checkpoints under {store.uri} were written by a "
            "different spec, thread count or number of GPUs; use another job id, or delete them"
        )
    with torch.no_grad():
        for n, p in loop.named:
            p.copy_(loop._place(t[f"param/{n}"].to(dtype=p.dtype), p))
    _restore_optimizer(loop, st["optimizer"], t)
    if loop.scaler is not None and st.get("grad_scaler"):
        loop.scaler.load_state_dict(st["grad_scaler"])
    _restore_rngs(loop.generators, st["rng"], t)
    loop.step = int(st["step"])
    loop.losses = [float(v) for v in st["losses"]]
    loop.counters = {k: int(v) for k, v in st["counters"].items()}
    return int(loop.step)


def _restore_optimizer(loop: Any, saved: dict[str, Any], t: dict[str, torch.Tensor]) -> None:
    """The optimizer's state, each per-parameter tensor placed like its parameter."""
    params = [p for group in loop.optimizer.param_groups for p in group["params"]]
    opt_state: dict[int, dict[str, Any]] = {}
    for pid, rest in saved["state"].items():
        opt_state[int(pid)] = dict(rest)
    # Sorted: a loaded file's dict order differs between processes, and a sharded gang's
    # ranks must place (a collective) the same tensor at the same time.
    for key in sorted(t):
        if key.startswith("optim/"):
            v = t[key]
            _, pid, name = key.split("/", 2)
            like = params[int(pid)]
            # Moments have the parameter's shape (and, sharded, its placement); `step` does not.
            placed = loop._place(v, like) if v.shape == like.shape else v
            opt_state.setdefault(int(pid), {})[name] = placed
    groups = [
        {k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in saved["param_groups"]
    ]
    loop.optimizer.load_state_dict({"state": opt_state, "param_groups": groups})


def _rng_tensors(generators: dict[str, torch.Generator]) -> dict[str, torch.Tensor]:
    tensors = {"rng/torch": torch.get_rng_state()}
    for name, gen in generators.items():
        tensors[f"rng/gen/{name}"] = gen.get_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    np_state = np.random.get_state()
    tensors["rng/numpy"] = torch.from_numpy(np.asarray(np_state[1]).astype(np.int64))
    return tensors


def _restore_rngs(
    generators: dict[str, torch.Generator], saved: dict[str, Any], t: dict[str, torch.Tensor]
) -> None:
    torch.set_rng_state(t["rng/torch"])
    for name, gen in generators.items():
        gen.set_state(t[f"rng/gen/{name}"])
    cuda_states = [t[k] for k in sorted(t) if k.startswith("rng/cuda/")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    name, pos, has_gauss, cached = saved["numpy"]
    np.random.set_state((name, t["rng/numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = saved["python"]
    random.setstate((version, tuple(internal), gauss))
