"""The training loop of a pack: several jobs, one forward pass per round, each job its own.

Each member keeps a `TrainLoop` of its own (optimizer, LR schedule, step, loss history,
checkpoints, NaN check), built over only its LoRA weights; this module drives the members
together instead of calling `TrainLoop.run`. A round takes the next micro-batch of every
running member, runs them through the shared base in one forward pass (the kind's
`PackForward`), and backpropagates the sum of the members' losses, each scaled by its own
gradient accumulation: the members' weights are disjoint, so each gets exactly the gradient
of its own loss. A member whose micro-batches complete an accumulation takes its optimizer
step. A member leaves the pack when it has done its steps (its adapter is exported at once),
is cancelled, or fails (bad numbers, a NaN loss): the others go on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lorajobs.jobspecs.failures import LoraJobsError, Preempted
from lorajobs.worker.trainers.loop import (
    LoopResult,
    TrainLoop,
    lr_factor,
    pick_device,
    resolve_precision,
)
from lorajobs.worker.trainers.pack_lora import PackSlices
from lorajobs.worker.trainers.preemption import PreemptionNotice

log = logging.getLogger(__name__)
REPORT_EVERY_S = 0.5


@dataclass
class Member:
    """One job of a pack: its adapter name, loop state and what it is doing."""

    name: str  # the PEFT adapter name (from the job id)
    job_id: str
    loop: TrainLoop
    batch: Callable[[int], Any]  # global micro-batch k -> the kind's batch
    cancelled: Callable[[], bool] = lambda: False
    micro: int = 0  # micro-batches done within the current optimizer step
    parts: list[torch.Tensor] = field(default_factory=list)
    state: str = "running"  # running | done | failed | cancelled
    error: BaseException | None = None
    resumed_from: int = 0
    started: float = 0.0
    last_report: tuple[float, int] = (0.0, 0)


# forward(list of (member, batch)) -> one (loss, counters) per member, in order
PackForward = Callable[[list[tuple[Member, Any]]], list[tuple[torch.Tensor, dict[str, int]]]]


class PackLoop:
    """Drives the members of a pack round by round until each has left it."""

    def __init__(
        self,
        members: list[Member],
        pack: PackSlices,
        forward: PackForward,
        on_done: Callable[[Member], None],
    ) -> None:
        self.members, self.pack, self.forward, self.on_done = members, pack, forward, on_done
        self.rounds = 0

    def running(self) -> list[Member]:
        return [m for m in self.members if m.state == "running"]

    def run(self) -> None:
        """Resume each member from its own checkpoint, then train them all to the end.

        A preemption notice, SIGTERM or a stop request for any member (`ctx.stop_requested`:
        its node drains), stops the pack as a whole: every running member is checkpointed
        after the current round and `Preempted` is raised; each resumes from its own
        checkpoint in the next attempt.
        """
        with PreemptionNotice(self._stop_requested) as notice:
            for m in self.members:
                self._resume(m)
            why: str | None = None
            while self.running():
                # After a notice only the members inside an accumulation go on, to the end of
                # their step: then every member has a whole step to checkpoint.
                why = why or notice.reason()
                self._round(only_mid_step=why is not None)
                if why is not None and not any(m.micro for m in self.running()):
                    for m in self.running():
                        self._checkpoint(m, force=True)
                    raise Preempted(f"pack stopped after round {self.rounds}: {why}")

    def _stop_requested(self) -> str | None:
        """Why the platform wants the pack stopped (the members share a node: a drain asks
        each of them), or None."""
        for m in self.running():
            asked = m.loop.ctx.stop_requested
            why = asked() if asked is not None else None
            if why is not None:
                return why
        return None

    # -- one round ----------------------------------------------------------------------------

    def _round(self, only_mid_step: bool = False) -> None:
        for m in self.running():
            if m.cancelled():
                m.state = "cancelled"
                log.info("job %s left the pack: cancelled", m.job_id)
        batch_members = [m for m in self.running() if m.micro or not only_mid_step]
        if not batch_members:
            return
        for m in batch_members:
            if m.micro == 0:
                self._set_lr(m)
        batches = [(m, m.batch(m.loop.step * m.loop.accum + m.micro)) for m in batch_members]
        precision, device = batch_members[0].loop.precision, batch_members[0].loop.device
        self.pack.set_rows([(m.name, *_rows(b)) for m, b in batches], _dense(batches))
        with precision.context(device):
            results = self.forward(batches)
        total: torch.Tensor | None = None
        for (m, _), (loss, counts) in zip(batches, results):
            scaled = loss / m.loop.accum if m.loop.accum > 1 else loss
            total = scaled if total is None else total + scaled
            m.parts.append(loss.detach())
            for k, v in counts.items():
                m.loop.counters[k] = m.loop.counters.get(k, 0) + int(v)
        assert total is not None
        scaler = batch_members[0].loop.scaler
        (scaler.scale(total) if scaler is not None else total).backward()
        self.rounds += 1
        for m in batch_members:
            m.micro += 1
            if m.micro == m.loop.accum:
                self._optimizer_step(m)

    def _set_lr(self, m: Member) -> None:
        cfg, loop = m.loop.cfg, m.loop
        factor = lr_factor(cfg.lr_scheduler, loop.step, loop.total, cfg.warmup_steps)
        for group in loop.optimizer.param_groups:
            group["lr"] = group.get("peak_lr", cfg.learning_rate) * factor

    def _optimizer_step(self, m: Member) -> None:
        """`TrainLoop._one_step`'s tail for one member, then its report / checkpoint / exit."""
        loop = m.loop
        if loop.scaler is not None:
            loop.scaler.unscale_(loop.optimizer)
        if loop.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(loop.params, loop.cfg.max_grad_norm)
        if loop.scaler is not None:
            loop.scaler.step(loop.optimizer)
            loop.scaler.update()
        else:
            loop.optimizer.step()
        loop.optimizer.zero_grad(set_to_none=True)
        loop._unread.append(m.parts)
        m.parts, m.micro = [], 0
        loop.step += 1
        try:
            # Read at once (the solo loop reads at reports): a NaN fails this member only.
            loop._read_losses()
        except LoraJobsError as err:
            self._fail(m, err)
            return
        self._report(m)
        self._checkpoint(m)
        if loop.step >= loop.total:
            m.state = "done"
            self.on_done(m)

    def _fail(self, m: Member, err: BaseException) -> None:
        m.state, m.error = "failed", err
        with torch.no_grad():  # its weights are no one's now: keep NaNs out of later rounds
            for p in m.loop.params:
                p.zero_()
                p.grad = None
        log.warning("job %s left the pack: %s", m.job_id, err)

    # -- progress and checkpoints -------------------------------------------------------------

    def _report(self, m: Member) -> None:
        loop, now = m.loop, time.monotonic()
        t0, s0 = m.last_report
        if now - t0 < REPORT_EVERY_S and loop.step != loop.total:
            return
        loop.ctx.report(
            {
                "step": loop.step,
                "total_steps": loop.total,
                "loss": loop.losses[-1],
                "it_per_s": (loop.step - s0) / max(now - t0, 1e-9),
            }
        )
        m.last_report = (now, loop.step)

    def _checkpoint(self, m: Member, force: bool = False) -> None:
        loop = m.loop
        store, every = loop.ctx.checkpoints, loop.cfg.checkpoint_every
        if store is None or not (force or (every and loop.step % every == 0)):
            return
        if m.micro:  # mid-accumulation: the last whole step is already stored (or none is)
            return
        saved = torch.get_rng_state()
        torch.set_rng_state(self.pack.rng[m.name])  # the member's generator, as solo has it
        try:
            store.save(loop._capture(), keep=loop.cfg.keep_checkpoints)
        finally:
            torch.set_rng_state(saved)

    def _resume(self, m: Member) -> None:
        saved = torch.get_rng_state()
        torch.set_rng_state(self.pack.rng[m.name])
        try:
            m.resumed_from = m.loop._resume()
            self.pack.rng[m.name] = torch.get_rng_state()
        except LoraJobsError as err:
            self._fail(m, err)
        finally:
            torch.set_rng_state(saved)
        m.started = time.monotonic()
        m.last_report = (m.started, m.loop.step)
        if m.state == "running" and m.loop.step >= m.loop.total:
            m.state = "done"
            self.on_done(m)


def _dense(batches: list[tuple[Member, Any]]) -> list[bool] | None:
    """Per member, whether its text batch has no padding; None unless every batch has a
    2-D attention mask (packed text rows and image batches do not split attention)."""
    masks = [getattr(b, "attention_mask", None) for _, b in batches]
    if any(m is None for m in masks):
        return None
    return [bool(m.all()) for m in masks]


def _rows(batch: Any) -> tuple[int, int | None]:
    """(rows, own width) a kind's batch puts into the forward pass: a text batch's sequence
    length (the pack pads to the longest), None for batches that are never padded."""
    rows = getattr(batch, "rows", None)
    if rows is not None:
        return int(rows), None
    return int(batch.input_ids.shape[0]), int(batch.input_ids.shape[1])


@dataclass
class PackJob:
    """One job handed to a pack trainer: what `train` gets for a solo job, plus a cancel flag."""

    spec: Any
    data_path: Any  # Path: the pulled dataset
    out_dir: Any  # Path: where this job's adapter files go
    ctx: Any  # WorkerContext
    cancelled: Callable[[], bool] = lambda: False


@dataclass
class PackOutcome:
    """How one job of a pack ended: an output, an error, or cancelled."""

    job_id: str
    output: Any = None  # TrainOutput when it succeeded
    error: BaseException | None = None
    cancelled: bool = False
    packed_with: list[str] = field(default_factory=list)  # the other jobs of the pack
    steps_done: int = 0  # optimizer steps this attempt ran: the share of the attempt's cost


def adapter_name(index: int) -> str:
    """The PEFT adapter name of a pack's `index`-th job (a module key: no dots)."""
    return f"pack{index}"


OnOutcome = Callable[[PackJob, PackOutcome], None]


class PackRun:
    """What the kinds' `train_pack` share around the `PackLoop`: the pack's threads, device and
    precision (its first job's), one `PackOutcome` per job, and how each job's end is recorded
    and told (`on_outcome`, as it happens, while the others may still train)."""

    def __init__(self, jobs: list[PackJob], on_outcome: OnOutcome | None = None) -> None:
        first = jobs[0]
        torch.set_num_threads(first.ctx.threads)
        self.device = pick_device()
        self.precision = resolve_precision(first.spec.training.mixed_precision, self.device)
        self.ids = [j.ctx.job_id for j in jobs]
        self.outcomes = {
            i: PackOutcome(i, packed_with=[o for o in self.ids if o != i]) for i in self.ids
        }
        self.on_outcome = on_outcome

    def end(self, job: PackJob, **what: Any) -> None:
        """Record how `job` ended (`output`, `error`, `cancelled`, `steps_done`) and tell."""
        out = self.outcomes[job.ctx.job_id]
        for k, v in what.items():
            setattr(out, k, v)
        if self.on_outcome is not None:
            self.on_outcome(job, out)

    def results(self) -> list[PackOutcome]:
        """One outcome per job, in the order the jobs were given."""
        return [self.outcomes[i] for i in self.ids]

    def train(
        self,
        members: list[Member],
        pack: PackSlices,
        forward: PackForward,
        job_of: Callable[[Member], PackJob],
        finish: Callable[[Member], Any],
    ) -> list[PackOutcome]:
        """Run the members to their ends: `finish(m)` (the kind's export) as each completes;
        a failed or cancelled member's end once the loop is over. Returns `results()`."""

        def on_done(m: Member) -> None:
            try:
                output = finish(m)
            except LoraJobsError as err:
                self.end(job_of(m), error=err, steps_done=m.loop.step - m.resumed_from)
                return
            self.end(job_of(m), output=output, steps_done=m.loop.step - m.resumed_from)

        PackLoop(members, pack, forward, on_done).run()
        for m in members:
            if m.state == "failed":
                self.end(job_of(m), error=m.error, steps_done=m.loop.step - m.resumed_from)
            elif m.state == "cancelled":
                self.end(job_of(m), cancelled=True, steps_done=m.loop.step - m.resumed_from)
        return self.results()


def loop_result(m: Member) -> LoopResult:
    """A member's training as the solo loop reports it (for the kind's metrics)."""
    return LoopResult(
        losses=m.loop.losses,
        counters=m.loop.counters,
        resumed_from_step=m.resumed_from,
        train_seconds=time.monotonic() - m.started,
    )


def keep_rng(pack: PackSlices, name: str) -> None:
    """Keep the generator state now as member `name`'s (its dropout draws), as the solo loop
    has it when it starts."""
    pack.rng[name] = torch.get_rng_state()
    if torch.cuda.is_available():
        pack.cuda_rng[name] = torch.cuda.get_rng_state()
