"""Validation sample grids of image jobs: files, grid geometry, determinism, and proof that
rendering mid-run leaves the trained adapter bit for bit what it is without samples."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from lorajobs.jobspecs.failures import Preempted, UserDataError
from lorajobs.jobspecs.models import ImageJobSpec, Samples
from lorajobs.storage.adapters import fetch_adapter
from lorajobs.storage.checkpoints import CheckpointStore
from lorajobs.worker.context import TrainOutput, WorkerContext
from lorajobs.worker.entrypoint import run_job
from lorajobs.worker.plots import GridLayout, draw_image_grid
from lorajobs.worker.trainers.image.recipe import WEIGHTS_NAME, train
from lorajobs.worker.trainers.image.samples import FINAL_NAME, SampleRenderer
from lorajobs.worker.trainers.loop import resolve_precision

THREADS = 1  # pinned: the UNet's numbers depend on the thread count
PROMPTS = ["a photo of a red circle", "a photo of a blue square on a grey background"]
STEP_FILES = ["samples/step-000002.png", "samples/step-000004.png"]


def _spec(samples: dict[str, Any] | None) -> ImageJobSpec:
    # LoRA dropout > 0: training then draws from the global torch RNG and depends on train mode,
    # so a render that drew from it or left the UNet in eval mode would change the adapter.
    # lr 1e-2: four steps move the LoRA far enough to change the rendered pixels.
    return ImageJobSpec(
        kind="image",
        name="tiny",
        base_model="tiny-sd",
        dataset="shapes",
        lora={"rank": 4, "alpha": 8.0, "dropout": 0.1},
        training={"steps": 4, "batch_size": 2, "resolution": 64, "learning_rate": 1e-2},
        samples=samples,
    )


def _train(
    spec: ImageJobSpec, model: Path, data: Path, root: Path, **ctx: Any
) -> tuple[Path, TrainOutput]:
    out, cache = root / "adapter", root / "cache"
    out.mkdir(parents=True)
    context = WorkerContext(
        job_id="job", output_uri="file:///unused", cache_dir=cache, threads=THREADS, **ctx
    )
    return out, train(spec, model, data, out, context)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cell(path: Path, layout: GridLayout, i: int) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB").crop(layout.cell_box(i)), dtype=np.int16)


SAMPLES = {"prompts": PROMPTS, "every": 2, "num_inference_steps": 4, "seed": 3}


@pytest.fixture(scope="module")
def runs(
    tiny_image_model: Path, tiny_image_dataset: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, TrainOutput]]:
    """The same 4-step job twice with samples every 2 steps, and once without samples."""
    return {
        name: _train(
            _spec(samples),
            tiny_image_model,
            tiny_image_dataset,
            tmp_path_factory.mktemp(f"samples-{name}"),
        )
        for name, samples in (("a", SAMPLES), ("b", SAMPLES), ("off", None))
    }


@pytest.mark.slow
def test_writes_a_grid_every_n_steps_and_at_the_end(
    runs: dict[str, tuple[Path, TrainOutput]],
) -> None:
    out, result = runs["a"]
    assert result.files[-3:] == [*STEP_FILES, FINAL_NAME]
    assert result.metrics["samples_rendered"] == 2  # steps 2 and 4; the end reuses step 4's
    layout = GridLayout.for_cells(len(PROMPTS), 64)
    assert (layout.cols, layout.rows) == (2, 1)
    for rel in [*STEP_FILES, FINAL_NAME]:
        with Image.open(out / rel) as img:
            assert img.format == "PNG" and img.size == layout.size
            img.verify()
    assert sorted(p.relative_to(out).as_posix() for p in (out / "samples").iterdir()) == STEP_FILES
    assert (out / FINAL_NAME).read_bytes() == (out / STEP_FILES[1]).read_bytes()


@pytest.mark.slow
def test_rendering_does_not_change_training(runs: dict[str, tuple[Path, TrainOutput]]) -> None:
    (out_on, on), (out_off, off) = runs["a"], runs["off"]
    assert _sha256(out_on / WEIGHTS_NAME) == _sha256(out_off / WEIGHTS_NAME)
    assert on.metrics["final_loss"] == off.metrics["final_loss"]
    assert "samples_rendered" not in off.metrics
    assert not any("samples" in f for f in off.files)
    assert not (out_off / "samples").exists() and not (out_off / FINAL_NAME).exists()


@pytest.mark.slow
def test_grids_show_the_lora_learning_and_repeat_byte_for_byte(
    runs: dict[str, tuple[Path, TrainOutput]],
) -> None:
    (out_a, _), (out_b, _) = runs["a"], runs["b"]
    layout = GridLayout.for_cells(len(PROMPTS), 64)
    for i in range(len(PROMPTS)):
        # Same seed, same base, only the LoRA moved between steps 2 and 4: the pixels did too.
        diff = np.abs(
            _cell(out_a / STEP_FILES[0], layout, i) - _cell(out_a / FINAL_NAME, layout, i)
        )
        assert diff.max() > 2, f"cell {i} did not change between step 2 and step 4"
    for rel in [*STEP_FILES, FINAL_NAME]:
        assert (out_a / rel).read_bytes() == (out_b / rel).read_bytes(), rel


@pytest.mark.slow
def test_a_resumed_attempt_renders_the_steps_after_its_checkpoint(
    runs: dict[str, tuple[Path, TrainOutput]],
    tiny_image_model: Path,
    tiny_image_dataset: Path,
    tmp_path: Path,
) -> None:
    """Preempted after step 2, resumed: steps 3-4 and the end render as in one straight run."""
    spec = _spec(SAMPLES)
    store = CheckpointStore.for_job((tmp_path / "bucket").as_uri(), "job")
    with pytest.raises(Preempted):
        _train(
            spec,
            tiny_image_model,
            tiny_image_dataset,
            tmp_path / "first",
            checkpoints=store,
            stop_after_step=2,
        )
    out, result = _train(
        spec, tiny_image_model, tiny_image_dataset, tmp_path / "second", checkpoints=store
    )
    assert result.metrics["resumed_from_step"] == 2
    assert result.files[-2:] == [STEP_FILES[1], FINAL_NAME]  # step 2 is not rendered again
    assert result.metrics["samples_rendered"] == 1
    straight = runs["a"][0]
    for rel in (WEIGHTS_NAME, STEP_FILES[1], FINAL_NAME):
        assert (out / rel).read_bytes() == (straight / rel).read_bytes(), rel


@pytest.mark.slow
def test_final_only_with_own_resolution(
    tiny_image_model: Path, tiny_image_dataset: Path, tmp_path: Path
) -> None:
    """every: 0 renders once, at the end; resolution, negative prompt and CFG come through."""
    samples = {
        "prompts": ["red", "green", "blue"],
        "resolution": 32,
        "negative_prompt": "blurry",
        "guidance_scale": 3.0,
        "num_inference_steps": 2,
    }
    out, result = _train(_spec(samples), tiny_image_model, tiny_image_dataset, tmp_path)
    assert result.files[-1] == FINAL_NAME and not any(
        f.startswith("samples/") for f in result.files
    )
    assert result.metrics["samples_rendered"] == 1
    layout = GridLayout.for_cells(3, 32)
    assert (layout.cols, layout.rows) == (2, 2)
    with Image.open(out / FINAL_NAME) as img:
        assert img.size == layout.size
    # Three distinct prompts, one starting noise: the cells differ by prompt alone.
    cells = [_cell(out / FINAL_NAME, layout, i) for i in range(3)]
    assert not np.array_equal(cells[0], cells[1]) and not np.array_equal(cells[1], cells[2])


@pytest.mark.slow
def test_grids_are_uploaded_with_the_adapter_and_fetched(
    runs: dict[str, tuple[Path, TrainOutput]],
    tiny_image_model: Path,
    tiny_image_dataset: Path,
    tmp_path: Path,
) -> None:
    """`run_job` on a file:// bucket: the grids are in the sidecar's manifest, uploaded, and
    `fetch_adapter` brings them back sha256-verified, the same bytes as a direct run."""
    spec = _spec(SAMPLES).model_copy(
        update={"base_model": str(tiny_image_model), "dataset": str(tiny_image_dataset)}
    )
    ctx = WorkerContext(
        job_id="job-s",
        output_uri=(tmp_path / "bucket").as_uri(),
        cache_dir=tmp_path / "cache",
        threads=THREADS,
        cpu_fallback=True,  # the spec asks for the default 1 GPU; this machine has none
    )
    result = run_job(spec, ctx)
    assert {*STEP_FILES, FINAL_NAME} <= set(result["files"])
    fetch_adapter(result["adapter_uri"], tmp_path / "fetched")
    direct = runs["a"][0]
    for rel in [*STEP_FILES, FINAL_NAME]:
        assert (tmp_path / "fetched" / rel).read_bytes() == (direct / rel).read_bytes(), rel
    # Each rendered grid is also an image in the attempt's TensorBoard events.
    from lorajobs.worker.board import read_events

    tb = tmp_path / "bucket" / "jobs" / "job-s" / "tensorboard" / "attempt-1"
    [events_file] = tb.glob("events.out.tfevents.*")
    events = read_events(events_file.read_bytes())
    images = [(e.step, v.image) for e in events for v in e.summary.value if v.tag == "samples"]
    assert [step for step, _ in images] == [2, 4]
    grid = Image.open(io.BytesIO(images[-1][1].encoded_image_string))
    assert grid.size == Image.open(direct / FINAL_NAME).size
    # ... and a PNG in the bucket the moment it is rendered, for the dashboard.
    live = tmp_path / "bucket" / "jobs" / "job-s" / "samples"
    assert sorted(p.name for p in live.iterdir()) == ["step-000002.png", "step-000004.png"]
    assert Image.open(live / "step-000004.png").size == grid.size


def test_a_folder_without_model_index_fails_before_training(tmp_path: Path) -> None:
    (tmp_path / "unet").mkdir()  # only components: trainable, but no pipeline to sample from
    cpu = torch.device("cpu")
    with pytest.raises(UserDataError, match=r"samples: .*model_index\.json"):
        SampleRenderer(
            Samples(prompts=["x"]),
            model_dir=tmp_path,
            out_dir=tmp_path / "out",
            unet=torch.nn.Linear(1, 1),
            precision=resolve_precision("no", cpu),
            device=cpu,
            resolution=64,
            title="t",
        )


@pytest.mark.parametrize(
    ("n", "cols", "rows"), [(1, 1, 1), (2, 2, 1), (3, 2, 2), (5, 3, 2), (10, 4, 3), (16, 4, 4)]
)
def test_grid_is_near_square_and_cells_do_not_overlap(n: int, cols: int, rows: int) -> None:
    layout = GridLayout.for_cells(n, 48)
    assert (layout.cols, layout.rows) == (cols, rows)
    width, height = layout.size
    boxes = [layout.cell_box(i) for i in range(n)]
    for i, (left, top, right, bottom) in enumerate(boxes):
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        assert right - left == bottom - top == 48
        for other in boxes[i + 1 :]:  # label strips below cells keep rows apart
            assert right <= other[0] or other[2] <= left or bottom <= other[1] or other[3] <= top
    colours = [(40 * i % 256, 90, 200) for i in range(n)]
    images = [Image.new("RGB", (48, 48), c) for c in colours]
    long_label = "a very long prompt that cannot fit under one small cell of a grid at all"
    grid = draw_image_grid(images, [long_label] * n, title="t")
    assert grid.size == layout.size
    for box, colour in zip(boxes, colours):  # labels and title never paint over an image
        assert set(grid.crop(box).getdata()) == {colour}
