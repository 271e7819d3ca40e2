"""A job logs to a real MLflow tracking server when the deployment names one: one run per job
(a resumed attempt goes on in the same run), tagged with the job id, owner and, at the end, the
adapter's digest; its params are the spec's settings; `train/loss` for every step."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from lorajobs.jobspecs.failures import Preempted
from lorajobs.jobspecs.models import TextJobSpec
from lorajobs.storage.staging import manifest_digest
from lorajobs.worker.context import WorkerContext
from lorajobs.worker.entrypoint import run_job

pytestmark = pytest.mark.slow


def _api(url: str, path: str, body: dict) -> dict:
    r = httpx.post(f"{url}/api/2.0/mlflow{path}", json=body, timeout=30)
    r.raise_for_status()
    return r.json()


def test_a_job_logs_one_run_to_mlflow(
    mlflow_server: str,
    tiny_text_model: Path,
    tiny_text_dataset: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LORAJOBS_MLFLOW_URI", mlflow_server)
    monkeypatch.setenv("LORAJOBS_MLFLOW_EXPERIMENT", "adapters")
    bucket = tmp_path / "bucket"
    shutil.copytree(tiny_text_model, bucket / "models" / "tiny-llama")
    spec = TextJobSpec.model_validate(
        {
            "kind": "text",
            "name": "tracked",
            "owner": "acme",
            "base_model": (bucket / "models" / "tiny-llama").as_uri(),
            "dataset": tiny_text_dataset.as_uri(),
            "lora": {"rank": 4, "alpha": 8},
            "training": {
                "steps": 8,
                "batch_size": 4,
                "learning_rate": 5e-3,
                "max_seq_length": 64,
                "checkpoint_every": 4,
            },
        }
    )

    def ctx(attempt: int, stop: int | None = None) -> WorkerContext:
        return WorkerContext(
            job_id="job-mlflow",
            output_uri=bucket.as_uri(),
            cache_dir=tmp_path / "cache",
            attempt=attempt,
            threads=2,
            stop_after_step=stop,
            cpu_fallback=True,
        )

    with pytest.raises(Preempted):
        run_job(spec, ctx(1, stop=4))
    result = run_job(spec, ctx(2))

    exp = httpx.get(
        f"{mlflow_server}/api/2.0/mlflow/experiments/get-by-name",
        params={"experiment_name": "adapters"},
    ).json()["experiment"]["experiment_id"]
    runs = _api(mlflow_server, "/runs/search", {"experiment_ids": [exp]})["runs"]
    assert len(runs) == 1  # both attempts in one run
    run = runs[0]
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["lorajobs.job_id"] == "job-mlflow" and tags["lorajobs.owner"] == "acme"
    sidecar_files = {
        rel: {
            "sha256": sha,
            "size": (Path(result["adapter_uri"].removeprefix("file://")) / rel).stat().st_size,
        }
        for rel, sha in result["files"].items()
    }
    assert tags["lorajobs.adapter_digest"] == manifest_digest(sidecar_files)
    assert run["info"]["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["training.steps"] == "8" and params["lora.rank"] == "4"
    history = httpx.get(
        f"{mlflow_server}/api/2.0/mlflow/metrics/get-history",
        params={"run_id": run["info"]["run_id"], "metric_key": "train/loss"},
    ).json()
    assert sorted(m["step"] for m in history["metrics"]) == list(range(1, 9))
