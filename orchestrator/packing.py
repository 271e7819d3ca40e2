"""Packs: queued jobs that can share one attempt, and when sharing it is worth it (pure policy,
plus the one transaction that claims a pack's members).

Jobs may share an attempt (one worker loads the base once and trains every job's own LoRA on
it, `lorajobs.worker.trainers.pack`) when they have the same `pack_key`: the same kind, the same
base model by content digest (`storage.identity`), the same sequence length (text) or
resolution (image), precision, node shape and thread count; and neither asks for
`resources.pack: never`, DoRA or gradient checkpointing (not trained in packs). An image job
packs only on an SD / SDXL UNet base and without bucketing, text-encoder training, samples or
a quantized base (what `worker.trainers.image.pack` takes).

After the scheduler's round has placed jobs, each placed job may take queued jobs of its key
that the round left waiting into its attempt (`fill`): they start now instead of after a slot
frees. `worth_packing` admits a member only while it brings the completion of the jobs
involved forward (a member slows every round a little, `ROUND_COST`), and `limit` caps a pack
by `resources.pack` and a memory estimate. Members hold no resources of their own (their
`pack_id` names the job whose attempt they share; `scheduling._holds` skips them).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from lorajobs.orchestrator.records import JobRecord

#: Kinds with a pack trainer (`lorajobs.worker.pack_entry.PACK_TRAINERS`).
PACKABLE_KINDS = ("text", "image")
#: A pack's most members when neither the spec nor a memory figure says fewer.
DEFAULT_MAX = 8
#: The time of a round of a pack of N, in solo steps: 1 + ROUND_COST * (N - 1). Measured by
#: `bench/packing.py` on 2 busy CPU cores with the tiny Llama (8 jobs): ~0.5 in one process
#: with 2 threads, ~0.9 inside a 1-CPU Ray task, Python's per-op work dominating; a GPU with a
#: large base should share more (one wide matmul per layer) — not measured here.
ROUND_COST = float(os.environ.get("LORAJOBS_PACK_ROUND_COST", "0.5"))
#: Memory a pack may use when the job names none (GiB), for the estimate in `limit`.
DEFAULT_BUDGET_GB = float(os.environ.get("LORAJOBS_PACK_MEMORY_GB", "16"))


def pack_key(
    spec: dict[str, Any], base_digest: str, unet_base: bool = True
) -> tuple[Any, ...] | None:
    """What must be equal for two jobs to share an attempt; None: this job trains alone.
    `unet_base`: an image job's base is an SD / SDXL UNet pipeline (a Flux base trains alone)."""
    res, tr, lora = spec.get("resources", {}), spec.get("training", {}), spec.get("lora", {})
    kind = spec.get("kind")
    if res.get("pack", "auto") == "never" or kind not in PACKABLE_KINDS:
        return None
    if float(res.get("gpus") or 0) > 1:  # a gang runs on Ray Train, one job per gang
        return None
    if lora.get("use_dora") or tr.get("gradient_checkpointing"):
        return None
    if kind == "image" and not _image_packable(spec, unet_base):
        return None
    shape = (res.get("gpus"), res.get("gpu_type"), res.get("cpus"), res.get("memory_gb"))
    common = (kind, base_digest, tr.get("mixed_precision", "no"), shape)
    if kind == "text":
        return (*common, tr.get("max_seq_length"), spec.get("data", {}).get("packing", False))
    return (*common, tr.get("resolution"))


def _image_packable(spec: dict[str, Any], unet_base: bool) -> bool:
    """What the image pack trainer takes (`worker.trainers.image.pack.packable`): a UNet base,
    one square resolution (no bucketing), no text-encoder training, samples or quantizing."""
    tr, data = spec.get("training", {}), spec.get("data") or {}
    return unet_base and not (
        tr.get("train_text_encoder")
        or tr.get("quantize_base")
        or data.get("bucketing")
        or spec.get("samples")
    )


def rounds(spec: dict[str, Any]) -> int:
    """Forward passes the job needs (steps x accumulation); epochs count as 1000 steps."""
    tr = spec.get("training", {})
    steps = tr.get("steps") or 1000
    return int(steps) * int(tr.get("gradient_accumulation_steps") or 1)


def pack_length(rounds_: list[int], cost: float | None = None) -> float:
    """How long a pack of jobs of `rounds_` rounds runs, in solo rounds: a round of n jobs
    costs 1 + cost * (n - 1), and a job leaves the pack when its rounds are done."""
    cost = ROUND_COST if cost is None else cost
    left, t, done = sorted(rounds_), 0.0, 0
    for i, r in enumerate(left):
        t += (r - done) * (1 + cost * (len(left) - i - 1))
        done = r
    return t


def worth_packing(leader: int, members: list[int], candidate: int) -> bool:
    """Whether `candidate` (rounds) joining the pack shortens the expected completion of the
    jobs involved (the time until the last of them is done): packed together, against the
    pack as it is and the candidate on the same slot after it. That holds while a round of
    the pack costs less than a solo step per member (`ROUND_COST` < 1), before counting what a
    separate attempt costs besides (start, model load, upload), which packing saves too."""
    now = [leader, *members]
    return pack_length([*now, candidate]) < pack_length(now) + candidate


def estimate_gb(spec: dict[str, Any], base_gb: float, config: dict[str, Any] | None) -> float:
    """Memory one more job adds to a pack (GiB): its LoRA with AdamW state and its activations
    (from the base's config.json when known; else a tenth of the base per job)."""
    if not config:
        return max(base_gb / 10, 0.01)
    tr, lora = spec.get("training", {}), spec.get("lora", {})
    hidden = int(config.get("hidden_size", 1024))
    layers = int(config.get("num_hidden_layers", 24))
    inter = int(config.get("intermediate_size", 4 * hidden))
    vocab = int(config.get("vocab_size", 32000))
    tokens = int(tr.get("batch_size", 1)) * int(tr.get("max_seq_length", 512))
    width = 2 if tr.get("mixed_precision", "no") != "no" else 4
    acts = tokens * (layers * (10 * hidden + 3 * inter) + 2 * vocab) * width
    targets = len(lora.get("target_modules") or ["q", "v"])
    lora_params = layers * targets * 2 * hidden * int(lora.get("rank", 8))
    return (acts + lora_params * 16) / 2**30


def limit(spec: dict[str, Any], base_gb: float, config: dict[str, Any] | None) -> int:
    """The most jobs a pack led by `spec` may hold: `resources.pack` when a number, and what
    fits in `resources.memory_gb` (or `LORAJOBS_PACK_MEMORY_GB`) beside one copy of the base."""
    res = spec.get("resources", {})
    asked = res.get("pack", "auto")
    cap = asked if isinstance(asked, int) else DEFAULT_MAX
    budget = float(res.get("memory_gb") or DEFAULT_BUDGET_GB)
    per_job = estimate_gb(spec, base_gb, config)
    fits = math.floor((budget - base_gb) / per_job) if per_job > 0 else cap
    return max(1, min(cap, fits))


@dataclass
class Pack:
    """A placed job and the queued jobs that will share its attempt."""

    leader: JobRecord
    members: list[JobRecord]

    @property
    def jobs(self) -> list[JobRecord]:
        return [self.leader, *self.members]


def choose_members(
    leader: JobRecord,
    queued: list[JobRecord],
    key_of: Callable[[JobRecord], tuple[Any, ...] | None],
    size: int,
    now: datetime,
) -> list[JobRecord]:
    """Queued jobs (best first) to pack with `leader`: same key, not in backoff, while each
    shortens the expected completion, up to `size` jobs in all."""
    key = key_of(leader)
    if key is None or size < 2:
        return []
    cap = min(size, _asked(leader) or size)
    chosen: list[JobRecord] = []
    for job in queued:
        if len(chosen) + 1 >= cap:
            break
        if job.id == leader.id or (job.not_before is not None and job.not_before > now):
            continue
        if key_of(job) != key or (_asked(job) and len(chosen) + 2 > _asked(job)):
            continue
        if worth_packing(rounds(leader.spec), [rounds(j.spec) for j in chosen], rounds(job.spec)):
            chosen.append(job)
    return chosen


def _asked(job: JobRecord) -> int | None:
    v = job.spec.get("resources", {}).get("pack", "auto")
    return v if isinstance(v, int) else None


def member_outcome(out: dict[str, Any], job_id: str) -> dict[str, Any]:
    """One job's outcome from its attempt's: a pack's names each job's; anything else (a
    node lost, a task killed) is every member's."""
    jobs = out.get("jobs")
    if isinstance(jobs, dict) and job_id in jobs:
        return {**jobs[job_id], "pack": out.get("pack")}
    return out


def cost_share(out: dict[str, Any], job_id: str) -> float:
    """The part of a pack attempt's cost that is `job_id`'s: the rows it put through the
    shared base over all rows the attempt ran (`work`, from the worker)."""
    jobs = out.get("jobs")
    if not isinstance(jobs, dict) or job_id not in jobs:
        return 1.0
    done = {j: max(0, int(o.get("work") or 0)) for j, o in jobs.items()}
    total = sum(done.values())
    return done[job_id] / total if total else 1.0 / len(done)


class Keys:
    """Pack keys of jobs, with each base model's digest and memory figures looked up once."""

    def __init__(self, digest: Callable[[str], str] | None = None) -> None:
        from lorajobs.storage.identity import content_digest

        self._digest = digest or content_digest
        self._digests: dict[str, str] = {}
        self._facts: dict[str, tuple[float, dict[str, Any] | None]] = {}
        self._unet: dict[str, bool] = {}

    def digest(self, uri: str) -> str:
        if uri not in self._digests:
            try:
                self._digests[uri] = self._digest(uri)
            except Exception:  # noqa: BLE001 - unreadable here: the URI alone (never shared)
                self._digests[uri] = "unreadable:" + uri
        return self._digests[uri]

    def facts(self, uri: str) -> tuple[float, dict[str, Any] | None]:
        """(the base's size in GiB, its config.json) for the memory estimate; (0, None) when
        they cannot be read here."""
        from lorajobs.storage.identity import model_facts

        if uri not in self._facts:
            try:
                self._facts[uri] = model_facts(uri)
            except Exception:  # noqa: BLE001 - no estimate: the pack is capped by count only
                self._facts[uri] = (0.0, None)
        return self._facts[uri]

    def unet(self, uri: str) -> bool:
        """Whether the base is a UNet pipeline (has unet/config.json); False when unreadable."""
        from lorajobs.storage.identity import has_file

        if uri not in self._unet:
            try:
                self._unet[uri] = has_file(uri, "unet/config.json")
            except Exception:  # noqa: BLE001 - unknown here: the job trains alone
                self._unet[uri] = False
        return self._unet[uri]

    def __call__(self, job: JobRecord) -> tuple[Any, ...] | None:
        uri = str(job.spec.get("base_model"))
        unet = self.unet(uri) if job.spec.get("kind") == "image" else True
        return pack_key(job.spec, self.digest(uri), unet_base=unet)


def fill(
    scheduling: Any,
    placed: list[JobRecord],
    keys: Keys,
    *,
    now: datetime,
    lease_owner: str,
    lease_expires_at: datetime,
    window: int = 256,
) -> list[Pack]:
    """For each job the round placed, claim the queued jobs that will share its attempt (in
    one transaction each: `Scheduling.claim`, so two controllers never take the same job).
    Returns every placed job as a pack (most of one job)."""
    packs = []
    for leader in placed:
        members: list[JobRecord] = []
        if keys(leader) is not None:
            base_gb, config = keys.facts(str(leader.spec.get("base_model")))
            size = limit(leader.spec, base_gb, config)

            def choose(
                queued: list[JobRecord], leader: JobRecord = leader, size: int = size
            ) -> list[JobRecord]:
                return choose_members(leader, queued, keys, size, now)

            members = scheduling.claim(
                window,
                choose=choose,
                reason=f"packed into the attempt of job {leader.id}",
                lease_owner=lease_owner,
                lease_expires_at=lease_expires_at,
                node_id=leader.node_id,
                accelerator=leader.accelerator,
                node=None,
                pack_id=leader.id,
            )
        packs.append(Pack(leader, members))
    return packs
