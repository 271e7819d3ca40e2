"""Resumable checkpoints in the bucket: `<bucket>/jobs/<job_id>/checkpoints/step-N/`.

A checkpoint is two data files and a marker, written in that order:

- `tensors.safetensors` — every tensor: LoRA weights, optimizer state, RNG states (a torch RNG
  state is a uint8 tensor, so it travels as one). This module moves its bytes; encoding and
  decoding tensors is the worker's (`lorajobs.worker.safetensors_io`), so storage needs no torch;
- `state.json` — everything else: step, scheduler, python/numpy RNG, loss history, counters;
- `COMPLETE` — written last. A folder without it (the node died mid-upload) is ignored.

Once the job's adapter is complete in the bucket its checkpoints are deleted
(`discard_after_success`): they only serve a retry, and they can be large. A failed, stopped or
cancelled attempt keeps them, so the next attempt resumes. `LORAJOBS_KEEP_CHECKPOINTS=1` keeps
them after success too.

Nothing is pickled and nothing is read with `torch.load`: a checkpoint comes from a bucket, and
unpickling a file from a bucket runs whatever code it holds.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

from lorajobs.jobspecs.failures import ObjectNotFound
from lorajobs.storage.backends import open_storage
from lorajobs.storage.base import Storage, join_uri

TENSORS = "tensors.safetensors"
STATE = "state.json"
MARKER = "COMPLETE"
KEEP_ENV = "LORAJOBS_KEEP_CHECKPOINTS"

_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class Checkpoint:
    """One checkpoint's content: a safetensors file's bytes and a JSON-able state."""

    step: int
    tensors: bytes
    state: dict[str, Any]


class CheckpointStore:
    """The checkpoints of one job, under `<root>/jobs/<job_id>/checkpoints/`."""

    def __init__(self, storage: Storage, prefix: str) -> None:
        self.storage = storage
        self.prefix = prefix.strip("/")

    @classmethod
    def for_job(cls, output_uri: str, job_id: str) -> CheckpointStore:
        """The store for `job_id` in the bucket `output_uri`."""
        return cls(open_storage(output_uri), f"jobs/{job_id}/checkpoints")

    @property
    def uri(self) -> str:
        return join_uri(self.storage.uri, self.prefix)

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, ascending."""
        done = []
        for obj in self.storage.list(self.prefix + "/"):
            rel = obj.key[len(self.prefix) + 1 :].split("/")
            if len(rel) == 2 and rel[1] == MARKER and (m := _STEP_DIR.match(rel[0])):
                done.append(int(m.group(1)))
        return sorted(done)

    def latest(self) -> int | None:
        """The step of the latest complete checkpoint, or None."""
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, ckpt: Checkpoint, keep: int) -> None:
        """Write `ckpt` (marker last), then drop all but the latest `keep` checkpoints."""
        key = f"{self.prefix}/step-{ckpt.step}"
        self.storage.put_bytes(ckpt.tensors, f"{key}/{TENSORS}")
        state = json.dumps(ckpt.state, sort_keys=True, allow_nan=True).encode()
        self.storage.put_bytes(state, f"{key}/{STATE}")
        self.storage.put_bytes(f"step {ckpt.step}\n".encode(), f"{key}/{MARKER}")
        self.prune(keep)

    def clear(self) -> int:
        """Delete every checkpoint of the job, markers first (a half-deleted checkpoint must
        not look complete). Returns the number of objects removed."""
        objects = self.storage.list(self.prefix + "/")
        removed = 0
        for obj in objects:
            if obj.key.rsplit("/", 1)[-1] == MARKER:
                removed += self.storage.delete_prefix(obj.key)
        return removed + self.storage.delete_prefix(self.prefix + "/")

    def load(self, step: int) -> Checkpoint:
        """Read the checkpoint of `step` (which must be complete)."""
        key = f"{self.prefix}/step-{step}"
        tensors = self.storage.get_bytes(f"{key}/{TENSORS}")
        state = json.loads(self.storage.get_bytes(f"{key}/{STATE}"))
        return Checkpoint(step, tensors, state)

    def prune(self, keep: int) -> None:
        """Delete all but the latest `keep` complete checkpoints, and any incomplete older one."""
        complete = self.steps()
        keep_steps = set(complete[-keep:]) if keep > 0 else set()
        newest = complete[-1] if complete else -1
        seen: set[int] = set()
        for obj in self.storage.list(self.prefix + "/"):
            m = _STEP_DIR.match(obj.key[len(self.prefix) + 1 :].split("/")[0])
            if m:
                seen.add(int(m.group(1)))
        for step in sorted(seen):
            # An incomplete folder newer than the newest complete one may be in flight: keep it.
            if step not in keep_steps and step < newest:
                # Marker first: a half-deleted checkpoint must not look complete.
                self.storage.delete_prefix(f"{self.prefix}/step-{step}/{MARKER}")
                self.storage.delete_prefix(f"{self.prefix}/step-{step}/")


def keep_after_success() -> bool:
    """Whether `LORAJOBS_KEEP_CHECKPOINTS` asks to keep checkpoints after a job succeeds."""
    return os.environ.get(KEEP_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def discard_after_success(
    output_uri: str, job_id: str, adapter_uri: str, *, adapter_marker: str
) -> int:
    """Delete `job_id`'s checkpoints in `output_uri`, but only once its adapter at `adapter_uri`
    is complete: its marker (the sidecar, uploaded last) is there and names this job. Anything
    less (an upload cut short, another job's adapter) keeps them, so a retry can still resume.
    Returns the number of objects removed (0 when kept, or when there were none)."""
    if keep_after_success():
        return 0
    try:
        meta = json.loads(open_storage(adapter_uri).get_bytes(adapter_marker))
    except (ObjectNotFound, ValueError):
        return 0
    if not isinstance(meta, dict) or meta.get("job_id") != job_id:
        return 0
    return CheckpointStore.for_job(output_uri, job_id).clear()
