"""`lorajobs demo` (the whole product on the embedded defaults, with tiny offline models),
`lorajobs db upgrade` and `lorajobs dev tiny-models`.

Stages a tiny Stable-Diffusion-style pipeline, a tiny causal LM and two synthetic datasets into
the bucket, queues one image and one text job, runs them on a local Ray, fetches both adapters
and says how to load them.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import typer
from rich.console import Console

from lorajobs.orchestrator.cli import context as ctx
from lorajobs.orchestrator.settings import Settings

IMAGE_SPEC = """\
# Written by `lorajobs demo`: an image LoRA on the tiny Stable-Diffusion-style model.
kind: image
name: demo-shapes
owner: demo
base_model: {bucket}/models/tiny-sd
dataset: {bucket}/datasets/demo-shapes
lora: {{rank: 4, alpha: 8}}
training: {{steps: 60, batch_size: 2, learning_rate: 1.0e-3, seed: 0, resolution: 64}}
resources: {{gpus: 0, cpus: 1}}
"""

TEXT_SPEC = """\
# Written by `lorajobs demo`: a text LoRA on the tiny Llama-architecture model.
kind: text
name: demo-patterns
owner: demo
base_model: {bucket}/models/tiny-llama
dataset: {bucket}/datasets/demo-patterns/train.jsonl
lora: {{rank: 8, alpha: 16}}
training: {{steps: 80, batch_size: 8, learning_rate: 3.0e-3, seed: 0, max_seq_length: 64}}
resources: {{gpus: 0, cpus: 1}}
"""

HOW_TO_LOAD = """\
Load them:
  # image (diffusers)
  pipe = StableDiffusionPipeline.from_pretrained("{model_sd}")
  pipe.load_lora_weights("{image_dir}")
  # text (PEFT)
  base = AutoModelForCausalLM.from_pretrained("{model_lm}")
  model = PeftModel.from_pretrained(base, "{text_dir}")
"""


def _stage_folder(local: Path, bucket_uri: str, prefix: str) -> None:
    from lorajobs.storage.backends import open_storage

    storage = open_storage(bucket_uri)
    for f in sorted(local.rglob("*")):
        if f.is_file():
            storage.put_file(f, f"{prefix}/{f.relative_to(local).as_posix()}")


def stage_demo_inputs(bucket: str, err: Console) -> None:
    """Build the tiny models and data offline and put them in the bucket (once)."""
    from lorajobs.storage.backends import open_storage
    from lorajobs.worker.trainers.image.tiny import build_tiny_image_model, make_image_dataset
    from lorajobs.worker.trainers.text.tiny import build_tiny_text_model, make_text_dataset

    quiet_ml_libraries()
    storage = open_storage(bucket)
    if storage.exists("models/tiny-llama/config.json") and storage.exists(
        "datasets/demo-patterns/train.jsonl"
    ):
        err.print("tiny models and data already in the bucket")
        return
    with tempfile.TemporaryDirectory(prefix="lorajobs-demo-") as tmp:
        t = Path(tmp)
        err.print("building a tiny Stable-Diffusion-style pipeline and a tiny causal LM (offline)")
        _stage_folder(build_tiny_image_model(t / "tiny-sd"), bucket, "models/tiny-sd")
        _stage_folder(make_image_dataset(t / "shapes"), bucket, "datasets/demo-shapes")
        text_file = make_text_dataset(t / "patterns" / "train.jsonl")
        _stage_folder(build_tiny_text_model(t / "tiny-llama"), bucket, "models/tiny-llama")
        _stage_folder(text_file.parent, bucket, "datasets/demo-patterns")


def run_demo(settings: Settings, out: Console, err: Console) -> None:
    from lorajobs.jobspecs import load_spec
    from lorajobs.orchestrator.cli.render import status_table
    from lorajobs.storage.adapters import fetch_adapter

    t0 = time.monotonic()
    bucket = settings.bucket.rstrip("/")
    err.print(
        f"home: {settings.home}\nbucket: {bucket}\ndatabase: {settings.redacted_database_url()}"
    )
    stage_demo_inputs(bucket, err)

    spec_dir = settings.home / "demo"
    spec_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for fname, template in (("image.yaml", IMAGE_SPEC), ("text.yaml", TEXT_SPEC)):
        p = spec_dir / fname
        p.write_text(template.format(bucket=bucket))
        paths.append(p)

    queue = ctx.open_queue(settings)
    ids = []
    for p in paths:
        spec = load_spec(p)
        job, _ = queue.submit(spec, output_uri=bucket)
        err.print(f"submitted {job.kind} job {job.id} ('{job.name}') from {p}")
        ids.append(job.id)

    jobs = ctx.run_controller_until_done(settings, queue, ids)
    out.print(status_table(jobs))
    failed = [j for j in jobs if j.status.value != "succeeded"]
    if failed:
        for j in failed:
            err.print(f"job {j.id} {j.status.value}: {j.failure_reason}")
        raise SystemExit(1)

    dirs = {}
    for j in jobs:
        dest = spec_dir / "adapters" / j.name
        fetch_adapter(j.result["adapter_uri"], dest)
        dirs[j.kind] = dest
        out.print(f"{j.kind} adapter: {dest}  (from {j.result['adapter_uri']}, sha256 verified)")
    # from_pretrained wants a folder: for a file:// bucket that is the path; for s3:// the
    # user pulls it first (the worker's cache holds a copy).
    models = bucket.removeprefix("file://")
    out.print(
        HOW_TO_LOAD.format(
            model_sd=f"{models}/models/tiny-sd",
            model_lm=f"{models}/models/tiny-llama",
            image_dir=dirs["image"],
            text_dir=dirs["text"],
        )
    )
    out.print(
        f"demo finished in {time.monotonic() - t0:.0f} s. Try: lorajobs status, "
        f"lorajobs show {ids[0]}"
    )


def register(app: typer.Typer) -> None:
    """Add `demo`, `db upgrade` and `dev tiny-models` to `app`."""
    db_app = typer.Typer(help="Database schema commands.", no_args_is_help=True)
    dev_app = typer.Typer(help="Developer tools (tiny offline models).", no_args_is_help=True)
    app.add_typer(db_app, name="db")
    app.add_typer(dev_app, name="dev")
    app.command()(demo)
    db_app.command("upgrade")(db_upgrade)
    dev_app.command("tiny-models")(tiny_models)


def demo() -> None:
    """Build tiny models and data, train one image and one text LoRA, fetch both.

    Everything it makes stays in LORAJOBS_HOME (the jobs, the bucket, `demo/`), to look at
    with `status`, `show` and `logs`; a throwaway LORAJOBS_HOME keeps it apart."""
    run_demo(ctx.settings(), ctx.out, ctx.err)


def db_upgrade() -> None:
    """Create or migrate the database schema to the latest version."""
    from lorajobs.orchestrator.db import make_engine, upgrade

    settings = ctx.settings()
    before, after = upgrade(make_engine(settings))
    where = settings.redacted_database_url()
    if before is None:
        said = f"created the schema at revision {after}"
    elif before != after:
        said = f"upgraded the schema from revision {before} to {after}"
    else:
        said = f"the schema is already at revision {after}"
    ctx.err.print(f"database at {where}: {said}", markup=False, highlight=False)


def tiny_models(
    out_dir: Path = typer.Option(
        ...,
        "--out",
        help="Folder to write tiny-sd/, tiny-sdxl/, tiny-flux/, tiny-llama/ and data/ into.",
    ),
    seed: int = typer.Option(0, help="Seed for the random weights."),
) -> None:
    """Build tiny SD-1.x, SDXL and Flux.1 pipelines, a tiny causal LM and two sample data sets
    (data/shapes/: images with captions; data/patterns/train.jsonl: text), offline: enough
    to try a cluster end to end in minutes, even on CPU-only nodes."""
    from lorajobs.worker.trainers.image.flux_tiny import build_tiny_flux_model
    from lorajobs.worker.trainers.image.tiny import (
        build_tiny_image_model,
        build_tiny_sdxl_model,
        make_image_dataset,
    )
    from lorajobs.worker.trainers.text.tiny import build_tiny_text_model, make_text_dataset

    quiet_ml_libraries()
    print(build_tiny_image_model(out_dir / "tiny-sd", seed=seed))
    print(build_tiny_sdxl_model(out_dir / "tiny-sdxl", seed=seed))
    print(build_tiny_flux_model(out_dir / "tiny-flux", seed=seed))
    print(build_tiny_text_model(out_dir / "tiny-llama", seed=seed))
    print(make_image_dataset(out_dir / "data" / "shapes"))
    print(make_text_dataset(out_dir / "data" / "patterns" / "train.jsonl"))


def quiet_ml_libraries() -> None:
    """Building tiny models makes transformers and diffusers warn about things that do not
    matter here (a torchvision-less image processor) and draw progress bars: keep stderr for
    what the user needs."""
    import diffusers
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
