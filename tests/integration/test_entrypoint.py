"""`run_job` end to end on a `file://` bucket: pull -> train -> metadata -> upload."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from lorajobs.jobspecs.failures import Preempted, UserDataError
from lorajobs.jobspecs.models import ImageJobSpec, TextJobSpec
from lorajobs.storage.adapters import fetch_adapter
from lorajobs.storage.transfer import sha256_file
from lorajobs.worker.context import WorkerContext
from lorajobs.worker.entrypoint import run_job

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def bucket(tmp_path: Path) -> Path:
    root = tmp_path / "bucket"
    root.mkdir()
    return root


def _ctx(bucket: Path, tmp_path: Path, job_id: str, reports: list[dict[str, Any]]) -> WorkerContext:
    return WorkerContext(
        job_id=job_id,
        output_uri=bucket.as_uri(),
        cache_dir=tmp_path / "cache",
        threads=2,
        report=reports.append,
        node="test-node",
        extra={"submitted_by": "tests"},
        cpu_fallback=True,  # the specs ask for the default 1 GPU; this machine has none
    )


def _text_spec(bucket: Path, dataset: str) -> TextJobSpec:
    return TextJobSpec.model_validate(
        {
            "kind": "text",
            "name": "tiny-text",
            "base_model": (bucket / "models" / "tiny-llama").as_uri(),
            "dataset": dataset,
            "lora": {"rank": 4, "alpha": 8},
            "training": {"steps": 10, "batch_size": 4, "learning_rate": 5e-3, "max_seq_length": 64},
        }
    )


def _assert_complete_adapter(bucket: Path, result: dict[str, Any], weights: str, tmp: Path) -> None:
    adapter = Path(result["adapter_uri"].removeprefix("file://"))
    assert adapter.parent.parent == bucket / "adapters"
    on_disk = sorted(p.name for p in adapter.iterdir())
    assert on_disk == sorted([*result["files"], "lorajobs.json"])
    assert weights in result["files"] and "README.md" in result["files"]
    for rel, digest in result["files"].items():
        assert sha256_file(adapter / rel) == digest

    sidecar = json.loads((adapter / "lorajobs.json").read_text())
    assert {rel: f["sha256"] for rel, f in sidecar["files"].items()} == result["files"]
    # What the job was given, and that it asked for a GPU and trained on the CPU.
    assert sidecar["node"] == "test-node" and sidecar["extra"] == {
        "submitted_by": "tests",
        "cpu_fallback": {"gpus_requested": 1, "device": "cpu"},
    }
    assert set(result["timings"]) == {"pull", "train", "export", "upload"}
    assert set(sidecar["timings"]) == {"pull", "train", "export", "upload"}
    json.dumps(result)  # the result crosses a Ray boundary: it must be plain JSON

    # What users do: fetch it back, every byte verified against the marker.
    fetched = fetch_adapter(result["adapter_uri"], tmp / "fetched")
    assert sorted(p.name for p in fetched) == on_disk


def test_run_job_text(
    tiny_text_model: Path, tiny_text_dataset: Path, bucket: Path, tmp_path: Path
) -> None:
    shutil.copytree(tiny_text_model, bucket / "models" / "tiny-llama")
    (bucket / "datasets").mkdir()
    shutil.copy(tiny_text_dataset, bucket / "datasets" / "grammar.jsonl")
    spec = _text_spec(bucket, (bucket / "datasets" / "grammar.jsonl").as_uri())
    reports: list[dict[str, Any]] = []

    result = run_job(spec, _ctx(bucket, tmp_path, "job-text-1", reports))

    assert result["adapter_uri"] == f"{bucket.as_uri()}/adapters/tiny-text/job-text-1"
    _assert_complete_adapter(bucket, result, "adapter_model.safetensors", tmp_path)
    assert result["metrics"]["steps"] == 10 and reports[-1]["step"] == 10
    sidecar = json.loads(
        (bucket / "adapters" / "tiny-text" / "job-text-1" / "lorajobs.json").read_text()
    )
    assert sidecar["kind"] == "text" and sidecar["resolved"]["rank"] == 4
    vllm = sidecar["serving"]["vllm"]  # a plain rank-4 LoRA: vLLM serves it as it is
    assert vllm["servable"] is True and vllm["rank"] == 4 and vllm["max_lora_rank"] == 8
    card = (bucket / "adapters" / "tiny-text" / "job-text-1" / "README.md").read_text()
    assert "vllm serve <base model> --enable-lora --lora-modules tiny-text=" in card
    assert list((tmp_path / "cache" / "work").iterdir()) == []  # the temp out dir is gone

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_text_model, local_files_only=True)
    PeftModel.from_pretrained(base, tmp_path / "fetched")


def test_run_job_image(bucket: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue("tiny_image_model")
    data = request.getfixturevalue("tiny_image_dataset")
    shutil.copytree(model, bucket / "models" / "tiny-sd")
    shutil.copytree(data, bucket / "datasets" / "shapes")
    spec = ImageJobSpec.model_validate(
        {
            "kind": "image",
            "name": "tiny-image",
            "base_model": (bucket / "models" / "tiny-sd").as_uri(),
            "dataset": (bucket / "datasets" / "shapes").as_uri(),
            "lora": {"rank": 4, "alpha": 8},
            "training": {"steps": 4, "batch_size": 2, "learning_rate": 1e-3, "resolution": 64},
        }
    )
    reports: list[dict[str, Any]] = []

    result = run_job(spec, _ctx(bucket, tmp_path, "job-image-1", reports))

    _assert_complete_adapter(bucket, result, "pytorch_lora_weights.safetensors", tmp_path)
    card = (bucket / "adapters" / "tiny-image" / "job-image-1" / "README.md").read_text()
    assert "load_lora_weights" in card


def test_missing_dataset_is_a_user_error_and_uploads_nothing(
    tiny_text_model: Path, bucket: Path, tmp_path: Path
) -> None:
    shutil.copytree(tiny_text_model, bucket / "models" / "tiny-llama")
    missing = (bucket / "datasets" / "nope.jsonl").as_uri()
    with pytest.raises(UserDataError, match=missing):
        run_job(_text_spec(bucket, missing), _ctx(bucket, tmp_path, "job-2", []))
    assert not (bucket / "adapters").exists()


def test_bad_dataset_is_a_user_error_and_uploads_nothing(
    tiny_text_model: Path, bucket: Path, tmp_path: Path
) -> None:
    shutil.copytree(tiny_text_model, bucket / "models" / "tiny-llama")
    bad = bucket / "datasets" / "bad.jsonl"
    bad.parent.mkdir()
    bad.write_text('{"text": "fine"}\n{"text": "fine"}\nnot json\n')
    with pytest.raises(UserDataError, match=r"bad\.jsonl: line 3: invalid JSON"):
        run_job(_text_spec(bucket, bad.as_uri()), _ctx(bucket, tmp_path, "job-3", []))
    assert not (bucket / "adapters").exists()


def test_a_stop_request_during_the_pull_stops_before_training(
    tiny_text_model: Path, tiny_text_dataset: Path, bucket: Path, tmp_path: Path
) -> None:
    shutil.copytree(tiny_text_model, bucket / "models" / "tiny-llama")
    spec = _text_spec(bucket, tiny_text_dataset.as_uri())
    reports: list[dict[str, Any]] = []
    ctx = _ctx(bucket, tmp_path, "job-4", reports)
    ctx.stop_requested = lambda: "preempted: node n1 draining (spot reclaim), deadline T"
    with pytest.raises(Preempted, match=r"^stopped before training: preempted: node n1 draining"):
        run_job(spec, ctx)
    assert reports == [] and not (bucket / "jobs" / "job-4" / "checkpoints").exists()
    assert not (bucket / "adapters").exists()


def test_registry_is_lazy_and_knows_both_kinds() -> None:
    import subprocess
    import sys

    from lorajobs.jobspecs.failures import InvalidInput
    from lorajobs.worker.trainers import get_trainer, trainer_kinds

    assert trainer_kinds() == ["image", "text"]
    with pytest.raises(InvalidInput, match="video"):
        get_trainer("video")
    # The control plane names trainers without paying for torch.
    code = (
        "import sys, lorajobs.worker.trainers; assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def _write_bad_data(root: Path, case: str) -> Path:
    """A dataset with one thing wrong (`case`), written under `root`; returns its path."""
    from PIL import Image

    root.mkdir(parents=True)
    if case.startswith("image"):
        Image.new("RGB", (64, 64), (200, 30, 30)).save(root / "a.png")
        (root / "a.txt").write_text("a red square")
        if case == "image-undecodable":
            (root / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n but not an image")
            (root / "b.txt").write_text("broken")
        elif case == "image-caption-missing":
            Image.new("RGB", (64, 64), (30, 30, 200)).save(root / "b.png")
        elif case == "image-empty":
            for p in list(root.iterdir()):
                p.unlink()
        return root
    path = root / "train.jsonl"
    if case == "text-invalid-utf8":
        path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    elif case == "text-chat-no-assistant":
        path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    elif case == "text-empty":
        path.write_text("\n")
    return path


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("image-undecodable", r"b\.png"),
        ("image-empty", r"datasets/data: no images"),
        ("image-caption-missing", r"b\.png"),
        ("text-invalid-utf8", r"train\.jsonl: line 2"),
        ("text-chat-no-assistant", r"train\.jsonl: line 1.*no assistant turn"),
        ("text-empty", r"train\.jsonl"),
    ],
)
def test_bad_data_fails_as_a_user_error_naming_the_file_and_uploads_nothing(
    case: str, needle: str, bucket: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Each kind of bad data the issue lists: one user error naming the file (and the line for
    JSONL), classified `user` (never retried), with nothing in the bucket."""
    from lorajobs.jobspecs.failures import FailureKind, classify

    kind = case.split("-")[0]
    model = request.getfixturevalue(f"tiny_{kind}_model")
    data = _write_bad_data(bucket / "datasets" / "data", case)
    spec_dict = {
        "kind": kind,
        "name": f"bad-{case}",
        "base_model": str(model),
        "dataset": data.as_uri(),
        "lora": {"rank": 4, "alpha": 8},
        "training": {
            "steps": 4,
            "checkpoint_every": 1,
            **({"resolution": 64} if kind == "image" else {"max_seq_length": 64}),
        },
    }
    if case == "image-caption-missing":
        spec_dict["data"] = {"require_captions": True}
    if case == "text-chat-no-assistant":
        spec_dict["data"] = {"format": "chat", "chat_template": "chatml"}
    spec = (ImageJobSpec if kind == "image" else TextJobSpec).model_validate(spec_dict)

    with pytest.raises(UserDataError, match=needle) as info:
        run_job(spec, _ctx(bucket, tmp_path, f"job-{case}", []))
    assert "\n" not in str(info.value)  # one line
    assert classify(info.value) is FailureKind.user
    assert not (bucket / "adapters").exists() and not (bucket / "jobs").exists()
