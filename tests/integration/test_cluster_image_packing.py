"""Image packs through the queue on a simulated cluster: three tiny SD jobs on one base,
submitted together, share one attempt on one node; each adapter loads in diffusers and matches
its solo run (within the tolerance `test_image_pack_trainer` measures); a job at another
resolution is never packed with them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from lorajobs.jobspecs import parse_spec
from lorajobs.orchestrator.states import JobStatus
from lorajobs.worker.context import WorkerContext
from lorajobs.worker.trainers import get_trainer
from lorajobs.worker.trainers.image.parts import WEIGHTS_NAME
from tests.integration.test_cluster_packing import CONFIG
from tests.integration.test_image_pack_trainer import REL_TOL
from tests.plugins.cluster import SimCluster, drive, start_controller

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

VARIANTS: list[dict[str, Any]] = [
    {"lora": {"rank": 4, "alpha": 8.0}, "training": {"steps": 3, "batch_size": 2, "seed": 1}},
    {
        "lora": {"rank": 8, "alpha": 4.0, "dropout": 0.1},
        "training": {"steps": 5, "batch_size": 1, "seed": 2},
    },
    {
        "lora": {"rank": 2, "alpha": 2.0, "target_modules": ["to_q", "to_v"]},
        "training": {"steps": 4, "batch_size": 2, "seed": 3, "gradient_accumulation_steps": 2},
    },
]


def _spec(i: int, model: Path, data: Path, resolution: int = 64) -> Any:
    v = VARIANTS[i]
    return parse_spec(
        {
            "kind": "image",
            "name": f"ipk-{i}",
            "base_model": str(model),
            "dataset": str(data),
            "lora": v["lora"],
            "training": {"resolution": resolution, "learning_rate": 1e-3, **v["training"]},
            "resources": {"gpus": 1, "cpus": 1},
        }
    )


def _adapter(job: Any) -> Path:
    return Path(job.result["adapter_uri"].removeprefix("file://"))


def _solo(spec: Any, model: Path, data: Path, tmp: Path) -> Path:
    out = tmp / f"solo-{spec.name}"
    ctx = WorkerContext(job_id="solo", output_uri=tmp.as_uri(), cache_dir=tmp / "c", threads=1)
    get_trainer("image")(spec, model, data, out, ctx)
    return out


def _worst_relative(a: Path, b: Path) -> float:
    x, y = load_file(a / WEIGHTS_NAME), load_file(b / WEIGHTS_NAME)
    assert x.keys() == y.keys()
    return max(float((x[k] - y[k]).norm() / x[k].norm()) for k in x)


def test_three_image_jobs_share_one_attempt_and_match_their_solo_runs(
    sim_cluster: SimCluster, tmp_path: Path, tiny_image_model: Path, tiny_image_dataset: Path
) -> None:
    from diffusers import StableDiffusionPipeline

    sim_cluster.add_gpu_node("A100")
    queue, ctl = start_controller(sim_cluster, tmp_path / "home", CONFIG)
    bucket = f"file://{tmp_path / 'bucket'}"
    specs = [_spec(i, tiny_image_model, tiny_image_dataset) for i in range(3)]
    # Same base and settings but another resolution: it must train alone.
    other = _spec(0, tiny_image_model, tiny_image_dataset, resolution=32)
    jobs = [queue.submit(s, output_uri=bucket)[0] for s in [*specs, other]]
    drive(ctl, until=lambda: all(queue.get(j.id).status.is_terminal() for j in jobs), timeout=400)
    done = [queue.get(j.id) for j in jobs]
    assert [j.status for j in done] == [JobStatus.succeeded] * 4, [j.failure_reason for j in done]
    lead = done[0]
    assert [j.pack_id for j in done[1:3]] == [lead.id, lead.id]
    assert done[3].pack_id is None and not done[3].result.get("packed_with")
    for j, spec in zip(done[:3], specs):
        others = sorted(k.id for k in done[:3] if k.id != j.id)
        assert sorted(j.result["packed_with"]) == others
        solo = _solo(spec, tiny_image_model, tiny_image_dataset, tmp_path)
        assert _worst_relative(solo, _adapter(j)) < REL_TOL, j.name
        assert (_adapter(j) / f"{spec.name}.safetensors").is_file()  # the kohya file
        pipe = StableDiffusionPipeline.from_pretrained(tiny_image_model, safety_checker=None)
        pipe.load_lora_weights(_adapter(j), weight_name=WEIGHTS_NAME)
        assert any("lora" in n for n, _ in pipe.unet.named_parameters())
