"""`lorajobs merge`: one adapter equal to the weighted stack of several, for both kinds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorajobs.jobspecs.models import ImageJobSpec, TextJobSpec
from lorajobs.worker.context import WorkerContext
from lorajobs.worker.merge import merge_adapters
from lorajobs.worker.trainers import get_trainer
from tests.plugins.lora_outputs import text_encoder_output, text_logits, unet_output

pytestmark = pytest.mark.slow

WEIGHTS = [0.7, 0.5]


def _ctx(tmp: Path) -> WorkerContext:
    return WorkerContext(job_id="j", output_uri=tmp.as_uri(), cache_dir=tmp, threads=1)


@pytest.fixture(scope="module")
def text_adapters(
    tiny_text_model: Path, tiny_text_dataset: Path, tmp_path_factory: pytest.TempPathFactory
) -> list[Path]:
    """Two different text adapters: rank 4 / alpha 8, and rank 2 / rsLoRA on fewer modules."""
    root = tmp_path_factory.mktemp("text-adapters")
    specs = [
        {"lora": {"rank": 4, "alpha": 8}, "training": {"seed": 1}},
        {
            "lora": {
                "rank": 2,
                "alpha": 4,
                "use_rslora": True,
                "target_modules": ["q_proj", "v_proj", "gate_proj"],
            },
            "training": {"seed": 2},
        },
    ]
    out = []
    for i, s in enumerate(specs):
        spec = TextJobSpec.model_validate(
            {
                "kind": "text",
                "name": f"t{i}",
                "base_model": "m",
                "dataset": "d",
                "lora": s["lora"],
                "training": {
                    "steps": 6,
                    "batch_size": 4,
                    "learning_rate": 1e-2,
                    "max_seq_length": 64,
                    **s["training"],
                },
            }
        )
        get_trainer("text")(spec, tiny_text_model, tiny_text_dataset, root / f"a{i}", _ctx(root))
        out.append(root / f"a{i}")
    return out


def test_text_merge_equals_the_weighted_stack(
    text_adapters: list[Path], tiny_text_model: Path, tmp_path: Path
) -> None:
    summary = merge_adapters(text_adapters, WEIGHTS, tmp_path / "merged")
    assert summary["kind"] == "text" and summary["rank"] == 6  # 4 + 2, concatenated

    # Reference: both adapters active at once in PEFT, each up-matrix scaled by its weight.
    want = text_logits(tiny_text_model, text_adapters, WEIGHTS)
    got = text_logits(tiny_text_model, [tmp_path / "merged"])
    assert (want - text_logits(tiny_text_model)).abs().max().item() > 1e-3  # it does something
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def image_adapters(
    tiny_image_model: Path, tiny_image_dataset: Path, tmp_path_factory: pytest.TempPathFactory
) -> list[Path]:
    root = tmp_path_factory.mktemp("image-adapters")
    out = []
    for i, lora in enumerate(
        [{"rank": 4, "alpha": 8.0}, {"rank": 2, "alpha": 1.0, "target_modules": ["to_q", "to_k"]}]
    ):
        spec = ImageJobSpec(
            kind="image",
            name=f"i{i}",
            base_model="m",
            dataset="d",
            lora=lora,
            training={
                "steps": 3,
                "batch_size": 2,
                "resolution": 64,
                "learning_rate": 2e-2,
                "seed": i,
            },
        )
        get_trainer("image")(spec, tiny_image_model, tiny_image_dataset, root / f"a{i}", _ctx(root))
        out.append(root / f"a{i}")
    return out


def test_image_merge_equals_the_weighted_stack(
    image_adapters: list[Path], tiny_image_model: Path, tmp_path: Path
) -> None:
    summary = merge_adapters(image_adapters, WEIGHTS, tmp_path / "merged")
    assert summary["kind"] == "image" and summary["rank"] == 6

    want = unet_output(tiny_image_model, image_adapters, WEIGHTS)
    got = unet_output(tiny_image_model, [tmp_path / "merged"])
    assert (want - unet_output(tiny_image_model)).abs().max().item() > 1e-4
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_image_merge_with_text_encoder_lora_equals_the_weighted_stack(
    tiny_image_model: Path, tiny_image_dataset: Path, tmp_path: Path
) -> None:
    """Adapters that also train the text encoder: each component merges on its own config."""
    folders = []
    for i, lora in enumerate(
        [{"rank": 4, "alpha": 8.0}, {"rank": 2, "alpha": 1.0, "use_rslora": True}]
    ):
        spec = ImageJobSpec(
            kind="image",
            name=f"te{i}",
            base_model="m",
            dataset="d",
            lora=lora,
            training={
                "steps": 3,
                "batch_size": 2,
                "resolution": 64,
                "learning_rate": 2e-2,
                "seed": i,
                "train_text_encoder": True,
            },
        )
        get_trainer("image")(
            spec, tiny_image_model, tiny_image_dataset, tmp_path / f"a{i}", _ctx(tmp_path)
        )
        folders.append(tmp_path / f"a{i}")
    summary = merge_adapters(folders, WEIGHTS, tmp_path / "merged")
    assert summary["components"] == ["text_encoder", "unet"] and summary["rank"] == 6

    for output in (unet_output, text_encoder_output):
        want = output(tiny_image_model, folders, WEIGHTS)
        got = output(tiny_image_model, [tmp_path / "merged"])
        assert (want - output(tiny_image_model)).abs().max().item() > 1e-4
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_merge_refuses_mixed_kinds_and_bad_weights(
    text_adapters: list[Path], image_adapters: list[Path], tmp_path: Path
) -> None:
    from lorajobs.jobspecs.failures import InvalidInput

    with pytest.raises(InvalidInput, match="different kinds"):
        merge_adapters([text_adapters[0], image_adapters[0]], WEIGHTS, tmp_path / "x")
    with pytest.raises(InvalidInput, match="2 adapters"):
        merge_adapters(text_adapters, [1.0], tmp_path / "y")


def test_merge_command_writes_the_merged_folder(text_adapters: list[Path], tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from lorajobs.orchestrator.cli import app

    out = tmp_path / "cli-merged"
    r = CliRunner().invoke(
        app,
        [
            "merge",
            str(text_adapters[0]),
            str(text_adapters[1]),
            "--weights",
            "0.7,0.5",
            "-o",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    assert out.resolve().as_posix() in r.stdout
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 6
    record = json.loads((out / "lorajobs-merge.json").read_text())
    assert [s["weight"] for s in record["sources"]] == WEIGHTS
    bad = CliRunner().invoke(
        app,
        [
            "merge",
            str(text_adapters[0]),
            str(text_adapters[1]),
            "--weights",
            "a,b",
            "-o",
            str(tmp_path / "x"),
        ],
    )
    assert bad.exit_code != 0
