"""Job spec parsing: defaults, every error at once with its path, schema export, examples."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorajobs.jobspecs import (
    ImageJobSpec,
    SpecError,
    TextJobSpec,
    json_schema,
    load_spec,
    load_spec_text,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "jobspecs" / "examples"

MINIMAL_TEXT = """
kind: text
name: t1
base_model: /models/m
dataset: /data/d.jsonl
training: {steps: 5}
"""


def test_minimal_text_spec_gets_defaults() -> None:
    spec = load_spec_text(MINIMAL_TEXT)
    assert isinstance(spec, TextJobSpec)
    assert spec.training.max_seq_length == 512
    assert spec.lora.rank == 8 and spec.resources.cpus == 1
    assert spec.target_modules() == ["k_proj", "o_proj", "q_proj", "v_proj"]


def test_image_spec_default_targets_and_sorted_custom_targets() -> None:
    spec = load_spec_text(
        "kind: image\nname: i\nbase_model: b\ndataset: d\ntraining: {steps: 1}\n"
        "lora: {target_modules: [to_v, to_q, to_v]}\n"
    )
    assert isinstance(spec, ImageJobSpec)
    assert spec.target_modules() == ["to_q", "to_v"]


def test_three_errors_reported_at_once_with_paths_and_values() -> None:
    text = MINIMAL_TEXT.replace("steps: 5", "steps: -3, bogus: 1") + "lora: {rank: 0}\n"
    with pytest.raises(SpecError) as info:
        load_spec_text(text, "bad.yaml")
    err = info.value
    assert err.exit_code == 2
    assert len(err.problems) == 3
    joined = "\n".join(err.problems)
    assert "training.steps" in joined and "-3" in joined
    assert "training.bogus" in joined
    assert "lora.rank" in joined and "(got 0)" in joined


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("a: [1,\n", "not valid YAML at line"),
        ("- 1\n- 2\n", "got list"),
        ("", "got empty"),
        ("kind: video\n", "kind: must be 'image' or 'text'"),
        ("name: x\n", "kind: field required"),
    ],
)
def test_malformed_inputs_give_one_clear_line(text: str, needle: str) -> None:
    with pytest.raises(SpecError) as info:
        load_spec_text(text, "x.yaml")
    msg = str(info.value)
    assert needle in msg and msg.startswith("x.yaml: ") and "\n" not in msg


@pytest.mark.parametrize("name", ["../../x", "a/b", ".hidden", "", "x" * 65])
def test_names_that_could_escape_a_prefix_are_refused(name: str) -> None:
    with pytest.raises(SpecError, match="name"):
        load_spec_text(MINIMAL_TEXT.replace("name: t1", f"name: {name!r}"))


def test_fractional_gpus_only_below_one() -> None:
    load_spec_text(MINIMAL_TEXT + "resources: {gpus: 0.25}\n")
    with pytest.raises(SpecError, match="resources.gpus"):
        load_spec_text(MINIMAL_TEXT + "resources: {gpus: 1.5}\n")


def test_missing_file_and_directory_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="file not found"):
        load_spec(tmp_path / "nope.yaml")
    with pytest.raises(SpecError, match="is a directory"):
        load_spec(tmp_path)


def test_yaml_tags_cannot_construct_objects() -> None:
    with pytest.raises(SpecError):
        load_spec_text("!!python/object/apply:os.system ['true']\n")


def test_schema_is_json_schema_with_descriptions() -> None:
    schema = json_schema()
    assert schema["title"] == "lorajobs job spec"
    image = schema["$defs"]["ImageJobSpec"]
    assert image["additionalProperties"] is False
    assert all("description" in p for p in image["properties"].values())


def test_every_example_spec_validates() -> None:
    files = sorted(EXAMPLES.rglob("*.yaml"))
    assert len(files) >= 3
    for f in files:
        load_spec(f)
