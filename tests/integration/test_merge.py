"""`lorajobs merge`: one adapter equal to the weighted stack of several, for both kinds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from jobspecs.models import ImageJobSpec, TextJobSpec
from worker.context import WorkerContext
from worker.merge import merge_adapters
from worker.trainers import get_trainer

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
        {"lora": {"rank": 2, "alpha": 4, "use_rslora": True,
                  "target_modules": ["q_proj", "v_proj", "gate_proj"]},
         "training": {"seed": 2}},
    ]
    out = []
    for i, s in enumerate(specs):
        spec = TextJobSpec.model_validate({
            "kind": "text", "name": f"t{i}", "base_model": "m", "dataset": "d", "lora": s["lora"],
            "training": {"steps": 6, "batch_size": 4, "learning_rate": 1e-2,
                         "max_seq_length": 64, **s["training"]},
        })
        get_trainer("text")(spec, tiny_text_model, tiny_text_dataset, root / f"a{i}", _ctx(root))
        out.append(root / f"a{i}")
    return out


def test_text_merge_equals_the_weighted_stack(
    text_adapters: list[Path], tiny_text_model: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    summary = merge_adapters(text_adapters, WEIGHTS, tmp_path / "merged")
    assert summary["kind"] == "text" and summary["rank"] == 6  # 4 + 2, concatenated

    ids = torch.tensor([[1, 5, 9, 17, 33, 2, 8, 40, 3]])

    def fresh() -> Any:
        return AutoModelForCausalLM.from_pretrained(tiny_text_model, local_files_only=True).eval()

    # Reference: both adapters active at once in PEFT, each up-matrix scaled by its weight.
    stacked = PeftModel.from_pretrained(fresh(), text_adapters[0], adapter_name="a")
    stacked.load_adapter(text_adapters[1], adapter_name="b")
    with torch.no_grad():
        for name, module in stacked.named_modules():
            for adapter, w in zip(("a", "b"), WEIGHTS):
                if hasattr(module, "lora_B") and adapter in module.lora_B:
                    module.lora_B[adapter].weight.mul_(w)
    stacked.base_model.set_adapter(["a", "b"])
    merged = PeftModel.from_pretrained(fresh(), tmp_path / "merged").eval()
    with torch.no_grad():
        plain = fresh()(ids).logits
        want = stacked.eval()(ids).logits
        got = merged(ids).logits
    assert (want - plain).abs().max().item() > 1e-3  # the stack does something
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def image_adapters(
    tiny_image_model: Path, tiny_image_dataset: Path, tmp_path_factory: pytest.TempPathFactory
) -> list[Path]:
    root = tmp_path_factory.mktemp("image-adapters")
    out = []
    for i, lora in enumerate([{"rank": 4, "alpha": 8.0},
                              {"rank": 2, "alpha": 1.0, "target_modules": ["to_q", "to_k"]}]):
        spec = ImageJobSpec(
            kind="image", name=f"i{i}", base_model="m", dataset="d", lora=lora,
            training={"steps": 3, "batch_size": 2, "resolution": 64, "learning_rate": 2e-2,
                      "seed": i},
        )
        get_trainer("image")(spec, tiny_image_model, tiny_image_dataset, root / f"a{i}",
                             _ctx(root))
        out.append(root / f"a{i}")
    return out


def test_image_merge_equals_the_weighted_stack(
    image_adapters: list[Path], tiny_image_model: Path, tmp_path: Path
) -> None:
    from diffusers import StableDiffusionPipeline

    summary = merge_adapters(image_adapters, WEIGHTS, tmp_path / "merged")
    assert summary["kind"] == "image" and summary["rank"] == 6

    gen = torch.Generator().manual_seed(0)
    sample, context = torch.randn((1, 4, 32, 32), generator=gen), torch.randn((1, 77, 32), generator=gen)

    def unet_out(pipe: Any) -> torch.Tensor:
        with torch.no_grad():
            return pipe.unet(sample, torch.tensor([400]), encoder_hidden_states=context).sample

    def pipe() -> Any:
        return StableDiffusionPipeline.from_pretrained(tiny_image_model, local_files_only=True)

    stacked = pipe()
    stacked.load_lora_weights(image_adapters[0], adapter_name="a")
    stacked.load_lora_weights(image_adapters[1], adapter_name="b")
    stacked.set_adapters(["a", "b"], adapter_weights=WEIGHTS)
    merged = pipe()
    merged.load_lora_weights(tmp_path / "merged")
    plain, want, got = unet_out(pipe()), unet_out(stacked), unet_out(merged)
    assert (want - plain).abs().max().item() > 1e-4
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_merge_refuses_mixed_kinds_and_bad_weights(
    text_adapters: list[Path], image_adapters: list[Path], tmp_path: Path
) -> None:
    from jobspecs.errors import InvalidInput

    with pytest.raises(InvalidInput, match="different kinds"):
        merge_adapters([text_adapters[0], image_adapters[0]], WEIGHTS, tmp_path / "x")
    with pytest.raises(InvalidInput, match="2 adapters"):
        merge_adapters(text_adapters, [1.0], tmp_path / "y")


def test_merge_command_writes_the_merged_folder(
    text_adapters: list[Path], tmp_path: Path
) -> None:
    import json

    from typer.testing import CliRunner

    from orchestrator.cli import app

    out = tmp_path / "cli-merged"
    r = CliRunner().invoke(app, ["merge", str(text_adapters[0]), str(text_adapters[1]),
                                 "--weights", "0.7,0.5", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert out.resolve().as_posix() in r.stdout
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 6
    record = json.loads((out / "lorajobs-merge.json").read_text())
    assert [s["weight"] for s in record["sources"]] == WEIGHTS
    bad = CliRunner().invoke(app, ["merge", str(text_adapters[0]), str(text_adapters[1]),
                                   "--weights", "a,b", "-o", str(tmp_path / "x")])
    assert bad.exit_code != 0
