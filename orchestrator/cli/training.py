"""Training commands: `run` (one job here, in-process), `merge` (compose adapters),
`export --merge` (a text adapter folded into a full model) and `reproduce` (re-run a finished
job from its sidecar and compare hashes). Each takes adapters as a folder, a `file://` /
`s3://` URI, a job id (or unique prefix) of a succeeded job, or an adapter name, found as
`lorajobs fetch` finds them.
"""

from __future__ import annotations

import json
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import typer

from lorajobs.jobspecs.failures import InvalidInput
from lorajobs.orchestrator.cli import context as ctx


def run(
    spec_file: Path = typer.Argument(..., help="Spec file."),
    output: str | None = typer.Option(
        None, "-o", "--output", help="Bucket URI or folder for the adapter (default: the bucket)."
    ),
    job_id: str | None = typer.Option(None, "--job-id", help="Id used in the output path."),
) -> None:
    """Train one job here, in this process: no database, no Ray. Prints the adapter's URI."""
    import secrets

    from lorajobs.worker.context import WorkerContext
    from lorajobs.worker.entrypoint import run_job

    settings = ctx.settings()
    (spec,) = ctx.load_specs([spec_file])
    bucket = output or spec.output or settings.bucket
    if "://" not in bucket:
        bucket = Path(bucket).resolve().as_uri()
    last = [0.0]

    def report(p: dict[str, Any]) -> None:
        if time.monotonic() - last[0] > 1.0 or p.get("step") == p.get("total_steps"):
            last[0] = time.monotonic()
            ctx.err.print(
                f"step {p.get('step')}/{p.get('total_steps')}  loss {p.get('loss', 0):.4f}"
                f"  {p.get('it_per_s', 0):.1f} it/s"
            )

    worker_ctx = WorkerContext(
        job_id=job_id or f"run-{secrets.token_hex(6)}",
        output_uri=bucket,
        cache_dir=settings.cache_dir,
        report=report,
        threads=spec.resources.cpus,
        node="local",
        cpu_fallback=True,  # this machine, the user's own choice: warn, do not fail
    )
    result = run_job(spec, worker_ctx)
    ctx.err.print(f"adapter written to {result['adapter_uri']}")
    print(result["adapter_uri"])


def _adapter_dir(ref: str, scratch: Path) -> Path:
    """A local folder holding the adapter `ref` names: a folder, or a `file://` adapter, as it
    is; a job id (or unique prefix) or an adapter name resolved as `lorajobs fetch` does (the
    job's row names its adapter); anything remote downloaded into `scratch`, sha256-verified."""
    from urllib.parse import unquote, urlparse

    from lorajobs.orchestrator.cli.data import resolve_adapter
    from lorajobs.storage.adapters import fetch_adapter

    if Path(ref).is_dir():
        return Path(ref)
    if "://" in ref:
        uri = ref
    elif "/" in ref or ref.startswith("."):
        raise InvalidInput(f"{ref}: no such adapter folder")
    elif (api := ctx.api()) is not None:  # through the server: its presigned URLs
        from lorajobs.orchestrator.cli import client

        return client.fetch(api, ref, False, scratch)
    else:
        uri, _ = resolve_adapter(ctx.settings(), ref, latest=False)
    if uri.startswith("file://"):
        path = Path(unquote(urlparse(uri).path))
        if path.is_dir():
            return path
        raise InvalidInput(f"{uri}: no such adapter folder")
    dest = scratch / secrets.token_hex(4)
    fetch_adapter(uri, dest)
    return dest


def _say(msg: str) -> None:
    print(msg, file=sys.stderr)


def merge(
    adapters: list[str] = typer.Argument(..., help="Two or more adapters: folders, URIs or jobs."),
    weights: str | None = typer.Option(
        None, "--weights", "-w", help="Comma-separated weights, one per adapter (default: all 1)."
    ),
    output: Path = typer.Option(..., "-o", "--output", help="Folder to write the merged adapter."),
) -> None:
    """Compose adapters into one: exactly their weighted sum, by concatenating ranks."""
    from lorajobs.worker.merge import merge_adapters

    try:
        ws = [float(w) for w in weights.split(",")] if weights else [1.0] * len(adapters)
    except ValueError:
        raise InvalidInput(f"--weights {weights!r}: expected numbers like 0.7,0.5") from None
    with tempfile.TemporaryDirectory(prefix="lorajobs-merge-") as tmp:
        dirs = [_adapter_dir(a, Path(tmp)) for a in adapters]
        summary = merge_adapters(dirs, ws, output)
    record = {
        "format": "lorajobs.merged/v1",
        "sources": [{"adapter": a, "weight": w} for a, w in zip(adapters, ws)],
        **summary,
    }
    (output / "lorajobs-merge.json").write_text(
        json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    _say(
        f"merged {len(adapters)} {summary['kind']} adapters into rank {summary['rank']} "
        f"({summary['modules']} modules)"
    )
    print(output.resolve())


def export(
    adapter: str = typer.Argument(..., help="A text adapter: folder, URI or job id."),
    merge_base: bool = typer.Option(
        False, "--merge", help="Fold the adapter into its base model: a plain transformers folder."
    ),
    output: Path = typer.Option(..., "-o", "--output", help="Folder to write into."),
    base_model: str | None = typer.Option(
        None, "--base-model", help="Base model folder/URI (default: the one the sidecar names)."
    ),
) -> None:
    """Export an adapter; `--merge` writes a full merged model (text adapters)."""
    if not merge_base:
        raise InvalidInput("export: nothing to do (only --merge is supported)")
    from lorajobs.storage.pull import pull_model
    from lorajobs.worker.merge import adapter_kind, merge_into_base

    with tempfile.TemporaryDirectory(prefix="lorajobs-export-") as tmp:
        folder = _adapter_dir(adapter, Path(tmp))
        if adapter_kind(folder) != "text":  # before pulling a base model for nothing
            raise InvalidInput(
                f"{adapter}: an image adapter: export --merge builds full "
                "models from text adapters only"
            )
        if base_model is None:
            sidecar = folder / "lorajobs.json"
            if sidecar.is_file():
                base_model = json.loads(sidecar.read_text(encoding="utf-8")).get("base_model")
            else:
                config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
                base_model = config.get("base_model_name_or_path")
        if not base_model:
            raise InvalidInput(f"{adapter}: base model unknown; pass --base-model")
        base_dir = pull_model(base_model, ctx.settings().cache_dir)
        merge_into_base(folder, base_dir, output)
    _say(f"merged model written to {output}")
    print(output.resolve())


def reproduce(
    job: str = typer.Argument(..., help="A finished job: job id, adapter folder or URI."),
    output: str | None = typer.Option(
        None, "-o", "--output", help="Bucket/folder for the re-run (default: a temp folder)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the comparison as JSON."),
) -> None:
    """Re-run a finished job from its sidecar here, in-process; exit 0 if the adapter's sha256
    matches the recorded one, 1 if not."""
    with tempfile.TemporaryDirectory(prefix="lorajobs-repro-") as tmp:
        folder = _adapter_dir(job, Path(tmp))
        sidecar_path = folder / "lorajobs.json"
        if not sidecar_path.is_file():
            raise InvalidInput(f"{job}: no lorajobs.json: not a lorajobs adapter")
        sidecar: dict[str, Any] = json.loads(sidecar_path.read_text(encoding="utf-8"))
        bucket = output or Path(tmp, "bucket").as_uri()
        threads, result = _rerun(job, sidecar, bucket)
    recorded = {f: info["sha256"] for f, info in sidecar["files"].items()}
    compare = sidecar.get("deterministic_files") or [
        f
        for f in (
            "adapter_config.json",
            "adapter_model.safetensors",
            "pytorch_lora_weights.safetensors",
        )
        if f in recorded
    ]
    rows = {
        f: {
            "recorded": recorded.get(f),
            "reproduced": result["files"].get(f),
            "match": recorded.get(f) is not None and recorded.get(f) == result["files"].get(f),
        }
        for f in compare
    }
    ok = bool(rows) and all(r["match"] for r in rows.values())
    device, here = sidecar.get("hardware", {}).get("device"), "cuda" if _has_cuda() else "cpu"
    report = {
        "job_id": sidecar.get("job_id"),
        "match": ok,
        "files": rows,
        "recorded_device": device,
        "device": here,
        "threads": threads,
    }
    if as_json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        for f, r in rows.items():
            print(f"{'match   ' if r['match'] else 'MISMATCH'}  {f}  {r['reproduced']}")
    if not ok:
        if device and device != here:
            _say(f"recorded on {device}, re-run on {here}: bitwise equality is not expected")
        _say("reproduce: sha256 MISMATCH")
        raise typer.Exit(1)
    _say("reproduce: sha256 match")


def _rerun(job: str, sidecar: dict[str, Any], bucket: str) -> tuple[int, dict[str, Any]]:
    """Train the sidecar's spec again here, with its thread count: (threads, run_job's result)."""
    from lorajobs.jobspecs.loader import parse_spec
    from lorajobs.worker.context import WorkerContext
    from lorajobs.worker.entrypoint import run_job

    spec = parse_spec(sidecar["spec"], f"{job} lorajobs.json")
    threads = int(
        sidecar.get("resolved", {}).get("threads")
        or sidecar.get("hardware", {}).get("threads")
        or spec.resources.cpus
    )
    if "://" not in bucket:
        bucket = Path(bucket).resolve().as_uri()
    worker_ctx = WorkerContext(
        # A fresh id: never resume from the original job's checkpoints.
        job_id=f"repro-{secrets.token_hex(6)}",
        output_uri=bucket,
        cache_dir=ctx.settings().cache_dir,
        threads=threads,
        node="local",
        cpu_fallback=True,  # this machine, the user's own choice: warn, do not fail
    )
    _say(f"re-running {sidecar.get('name')} (job {sidecar.get('job_id')}) with {threads} thread(s)")
    return threads, run_job(spec, worker_ctx)


def _has_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def register(app: typer.Typer) -> None:
    """Add the training commands to `app`."""
    app.command()(run)
    app.command()(merge)
    app.command()(export)
    app.command()(reproduce)
