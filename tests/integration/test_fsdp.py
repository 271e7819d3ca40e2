"""FSDP gangs without Ray (`tests/plugins/ranks.py`: two processes joined by gloo run the
worker as ranks 0 and 1) with `training.distributed: fsdp`. Rank 0 alone reads the base, the
other rank receives its shards; each rank holds half of the model;
the adapter matches a 1-worker run of the same global batch within the gang tolerance; a run
stopped after a checkpoint and resumed at the same size ends with the uninterrupted run's bytes
(so two FSDP runs give the same bytes); and the saved adapter is whole and loads into PEFT on
the unsharded base. With gradient accumulation: a DDP gang all-reduces once per optimizer step
(`no_sync` on the earlier micro-batches), FSDP on every micro-batch; both match one worker."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.plugins.ranks import run_ranks

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

STEPS, STOP = 12, 6
WEIGHTS = "adapter_model.safetensors"
ATOL = 1e-5  # the gang tolerance (docs/architecture.md, "Gangs")


def _spec(model: Path, data: Path, workers: int, distributed: str) -> dict[str, Any]:
    return {
        "kind": "text",
        "name": "sharded",
        "base_model": str(model),
        "dataset": str(data),
        "lora": {"rank": 4, "alpha": 8},
        "training": {
            "steps": STEPS,
            "batch_size": 4,
            "gradient_accumulation_steps": 2,
            "learning_rate": 1e-3,
            "seed": 0,
            "max_seq_length": 64,
            "checkpoint_every": 3,
            "distributed": distributed,
        },
        "resources": {"gpus": workers, "cpus": 1},
    }


def test_fsdp_and_ddp_gangs_match_one_worker_and_fsdp_resumes_to_the_same_bytes(
    tmp_path: Path, tiny_text_model: Path, tiny_text_dataset: Path
) -> None:
    from safetensors.torch import load_file

    bucket = tmp_path / "bucket"
    fsdp = _spec(tiny_text_model, tiny_text_dataset, 2, "fsdp")
    one = run_ranks(
        tmp_path,
        "one",
        1,
        _spec(tiny_text_model, tiny_text_dataset, 1, "ddp"),
        bucket=bucket,
        job_id="one",
    )
    calm = run_ranks(tmp_path, "calm", 2, fsdp, bucket=bucket, job_id="calm")
    assert [o["ok"] for o in calm] == [True, True], calm

    # Each rank held half of the model (to the shards' padding), and said how it trained.
    resolved = json.loads((bucket / "adapters/sharded/calm/lorajobs.json").read_text())["resolved"]
    assert resolved["workers"] == 2 and resolved["distributed"] == "fsdp"
    assert resolved["params_per_worker"] <= 0.55 * resolved["params_total"], resolved
    # Rank 0 alone read the base into host memory; rank 1 got its shards from rank 0.
    loaded = [o["metrics"]["model_bytes_loaded"] for o in calm]
    assert loaded[0] > 0 and loaded[1] == 0, loaded

    # The whole adapter (not a shard), within the gang tolerance of one worker's.
    a = load_file(str(bucket / "adapters/sharded/calm" / WEIGHTS))
    ref = load_file(str(bucket / "adapters/sharded/one" / WEIGHTS))
    assert sorted(a) == sorted(ref) and all(a[k].shape == ref[k].shape for k in a)
    worst = max(float((a[k] - ref[k]).abs().max()) for k in a)
    assert worst <= ATOL, worst
    loss, ref_loss = calm[0]["metrics"]["final_loss"], one[0]["metrics"]["final_loss"]
    assert loss == pytest.approx(ref_loss, rel=1e-5)

    # DDP, accumulating locally between all-reduces: the same adapter within the tolerance.
    ddp_spec = _spec(tiny_text_model, tiny_text_dataset, 2, "ddp")
    ddp = run_ranks(tmp_path, "ddp", 2, ddp_spec, bucket=bucket, job_id="ddp")
    assert [o["ok"] for o in ddp] == [True, True], ddp
    assert [o["metrics"]["model_bytes_loaded"] for o in ddp] == [loaded[0]] * 2  # whole models
    d = load_file(str(bucket / "adapters/sharded/ddp" / WEIGHTS))
    assert max(float((d[k] - ref[k]).abs().max()) for k in ref) <= ATOL

    # Stopped after a checkpoint, resumed by a new attempt of the same size: the same bytes.
    first = run_ranks(tmp_path, "first", 2, fsdp, bucket=bucket, job_id="cut", stop=STOP)
    assert all("Preempted" in o["error"] for o in first), first
    again = run_ranks(tmp_path, "again", 2, fsdp, bucket=bucket, job_id="cut", attempt=2)
    assert [o["ok"] for o in again] == [True, True], again
    assert again[0]["metrics"]["resumed_from_step"] == STOP
    cut = (bucket / "adapters/sharded/cut" / WEIGHTS).read_bytes()
    assert cut == (bucket / "adapters/sharded/calm" / WEIGHTS).read_bytes()

    # The file loads into PEFT on the whole base.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_text_model)
    PeftModel.from_pretrained(model, bucket / "adapters/sharded/calm")


def test_fsdp_needs_a_gang_and_an_unquantized_base() -> None:
    from lorajobs.jobspecs import parse_spec
    from lorajobs.jobspecs.failures import InvalidInput

    def spec(resources: dict[str, Any], **training: Any) -> Any:
        return parse_spec(
            {
                "kind": "text",
                "name": "x",
                "base_model": "/m",
                "dataset": "/d.jsonl",
                "training": {"steps": 1, "batch_size": 2, "distributed": "fsdp", **training},
                "resources": resources,
            }
        )

    with pytest.raises(InvalidInput, match="training.distributed fsdp .* needs resources.gpus > 1"):
        spec({"gpus": 1})
    with pytest.raises(InvalidInput, match="cannot shard a quantized base"):
        spec({"gpus": 2}, quantize_base="nf4")
    assert spec({"gpus": 2}).training.distributed == "fsdp"
