"""Checkpoints are deleted once a job's adapter is complete, and kept when an attempt fails;
on the folder bucket and on a real S3 server (SeaweedFS). Real training (the tiny Llama)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lorajobs.jobspecs import parse_spec
from lorajobs.jobspecs.failures import Preempted
from lorajobs.storage.adapters import MARKER
from lorajobs.storage.backends import open_storage
from lorajobs.storage.checkpoints import KEEP_ENV, CheckpointStore, discard_after_success
from lorajobs.worker.context import WorkerContext
from lorajobs.worker.entrypoint import adapter_uri, run_job
from lorajobs.worker.safetensors_io import canonical_bytes
from tests.plugins.specs import spec_dict

pytestmark = pytest.mark.slow


@pytest.fixture(params=["file", "s3"])
def bucket(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "file":
        return (tmp_path / "bucket").as_uri()
    s3: Any = request.getfixturevalue("s3_env")
    return f"{s3.uri.rstrip('/')}/lj"


def _keys(bucket: str, job_id: str) -> list[str]:
    return [o.key for o in open_storage(bucket).list(f"jobs/{job_id}/checkpoints/")]


def _attempt(
    bucket: str, job_id: str, model: Path, data: Path, cache: Path, stop: int | None = None
) -> dict[str, Any]:
    spec = parse_spec(
        spec_dict(
            "text", "ckpt", str(model), str(data), training={"steps": 6, "checkpoint_every": 2}
        )
    )
    ctx = WorkerContext(
        job_id=job_id, output_uri=bucket, cache_dir=cache, threads=1, stop_after_step=stop
    )
    return run_job(spec, ctx)


def test_a_failed_attempt_keeps_checkpoints_a_successful_one_removes_them(
    bucket: str,
    tiny_text_model: Path,
    tiny_text_dataset: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(KEEP_ENV, raising=False)
    with pytest.raises(Preempted):
        _attempt(bucket, "job1", tiny_text_model, tiny_text_dataset, tmp_path / "c", stop=4)
    kept = _keys(bucket, "job1")
    assert {k.split("/")[3] for k in kept} == {"step-2", "step-4"}
    assert "jobs/job1/checkpoints/step-4/COMPLETE" in kept

    result = _attempt(bucket, "job1", tiny_text_model, tiny_text_dataset, tmp_path / "c")
    assert result["metrics"]["resumed_from_step"] == 4  # the retry did use them
    assert open_storage(result["adapter_uri"]).exists(MARKER)
    assert result["checkpoints_removed"] >= 6  # step-4 and step-6: 3 objects each
    assert _keys(bucket, "job1") == []
    assert not [o for o in open_storage(bucket).list("jobs/job1/") if "checkpoints" in o.key]

    # LORAJOBS_KEEP_CHECKPOINTS=1 keeps them after success too.
    monkeypatch.setenv(KEEP_ENV, "1")
    kept_result = _attempt(bucket, "job2", tiny_text_model, tiny_text_dataset, tmp_path / "c")
    assert kept_result["checkpoints_removed"] == 0
    assert "jobs/job2/checkpoints/step-6/COMPLETE" in _keys(bucket, "job2")


def test_checkpoints_go_only_with_this_jobs_complete_adapter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guard alone, on files: no marker, or another job's marker, keeps the checkpoints."""
    import torch

    from lorajobs.storage.checkpoints import Checkpoint

    monkeypatch.delenv(KEEP_ENV, raising=False)
    bucket = (tmp_path / "b").as_uri()
    store = CheckpointStore.for_job(bucket, "j1")
    store.save(Checkpoint(3, canonical_bytes({"w": torch.zeros(2)}), {"step": 3}), keep=2)
    spec = parse_spec(spec_dict("text", "n", "m", "d"))
    dest = adapter_uri(spec, WorkerContext(job_id="j1", output_uri=bucket, cache_dir=tmp_path))
    adapter = open_storage(dest)

    adapter.put_bytes(b"weights", "adapter_model.safetensors")  # an upload cut short
    assert discard_after_success(bucket, "j1", dest, adapter_marker=MARKER) == 0
    adapter.put_bytes(json.dumps({"job_id": "someone-else"}).encode(), MARKER)
    assert discard_after_success(bucket, "j1", dest, adapter_marker=MARKER) == 0
    assert store.steps() == [3]

    adapter.put_bytes(json.dumps({"job_id": "j1"}).encode(), MARKER)
    assert discard_after_success(bucket, "j1", dest, adapter_marker=MARKER) == 3
    assert store.steps() == [] and not (tmp_path / "b" / "jobs" / "j1").exists()
