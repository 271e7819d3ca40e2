"""Data commands: `data push`, `adapters`, `fetch`.

`data push` stages a local folder into the bucket, `adapters` lists the complete adapters there,
`fetch` brings one back (by job id, or by adapter name through the bucket). None imports torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from lorajobs.jobspecs.failures import InvalidInput, JobNotFound
from lorajobs.orchestrator.cli import client
from lorajobs.orchestrator.cli import context as ctx
from lorajobs.orchestrator.settings import Settings


def register(app: typer.Typer) -> None:
    """Add the data commands to `app`."""
    data_app = typer.Typer(
        help="Stage local datasets and base models into the bucket.", no_args_is_help=True
    )
    app.add_typer(data_app, name="data")
    data_app.command("push")(data_push)
    app.command("adapters")(adapters)
    app.command("fetch")(fetch)


def data_push(
    path: Path = typer.Argument(..., help="A local folder (or one file) to stage."),
    kind: str = typer.Option("dataset", "--kind", help="dataset or model: the bucket prefix."),
    bucket: str | None = typer.Option(
        None, "--bucket", help="Bucket URI (default: LORAJOBS_BUCKET)."
    ),
    concurrency: int = typer.Option(16, "--concurrency", min=1, help="Parallel uploads."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON object, not the URI."),
) -> None:
    """Stage a folder in the bucket once, content-addressed; print its URI for a spec.

    It lands at <bucket>/datasets/<digest>/ (or models/); files already there are not sent.
    """
    from lorajobs.storage.staging import KINDS, stage_path

    if kind not in KINDS:
        raise InvalidInput(f"--kind must be one of: {', '.join(KINDS)} (got {kind!r})")
    if (api := ctx.api()) is not None:
        if bucket is not None:
            raise InvalidInput("--bucket: a lorajobs server puts data under your own prefix")
        pushed = client.data_push(api, path, kind)
        print(json.dumps(pushed, indent=2) if as_json else pushed["uri"])
        return
    settings = ctx.settings()
    target = bucket or settings.bucket
    hashes = settings.home / "stage-hashes" / "push.json"
    staged = stage_path(
        path, target, kind, concurrency=concurrency, hash_cache=hashes, console=ctx.err
    )
    if as_json:
        print(
            json.dumps(
                {
                    "uri": staged.uri,
                    "digest": staged.digest,
                    "files": staged.files,
                    "size": staged.size,
                    "uploaded_files": staged.uploaded_files,
                    "uploaded_bytes": staged.uploaded_bytes,
                    "already_staged": staged.already,
                },
                indent=2,
            )
        )
    else:
        print(staged.uri)


def adapters(
    name: str | None = typer.Option(None, "--name", help="Only adapters with this name."),
    bucket: str | None = typer.Option(
        None, "--bucket", help="Bucket URI (default: LORAJOBS_BUCKET)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list."),
) -> None:
    """List the complete adapters in the bucket, newest first.

    Shows name, job, size, base model and created time; unfinished uploads are not listed.
    """
    from lorajobs.storage.adapters import list_adapters

    if (api := ctx.api()) is not None:
        found = client.adapters(api, name)
    else:
        found = list_adapters(bucket or ctx.settings().bucket)
    if name is not None:
        found = [a for a in found if a["name"] == name]
    if as_json:
        print(json.dumps(found, indent=2))
        return
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for col in ("NAME", "JOB", "SIZE", "BASE MODEL", "CREATED"):
        # Whole values on one line, however long (a base model URI is copied, not read).
        table.add_column(col, no_wrap=True, overflow="ignore")
    for a in found:
        table.add_row(
            a["name"],
            a["job_id"],
            ctx.human_size(a["size"]),
            a["base_model"] or "-",
            a["created"] or "-",
        )
    ctx.out.print(table)


def fetch(
    ref: str = typer.Argument(
        ..., metavar="JOB|NAME", help="Job id (or unique prefix) or adapter name."
    ),
    output: Path | None = typer.Option(
        None,
        "-o",
        "--output",
        help="Folder to put the adapter's own folder (<name>-<job id>/) in; default: here.",
    ),
    latest: bool = typer.Option(
        False, "--latest", help="NAME: take the newest adapter of that name."
    ),
) -> None:
    """Download an adapter, verifying every file's sha256; run again to resume.

    JOB is looked up in the queue, a NAME among the bucket's complete adapters. Each adapter
    lands in its own folder, <name>-<job id>/, so adapters fetched into one place never mix;
    its path is printed. Nothing is written outside it.
    """
    from lorajobs.storage.adapters import fetch_adapter

    if (api := ctx.api()) is not None:
        print(client.fetch(api, ref, latest, output))
        return
    settings = ctx.settings()
    uri, default_dir = resolve_adapter(settings, ref, latest)
    dest = (output or Path(".")) / default_dir
    files = fetch_adapter(uri, dest)
    ctx.err.print(
        f"fetched {len(files)} files from {uri}, sha256 verified", markup=False, highlight=False
    )
    print(dest.resolve())


def resolve_adapter(settings: Settings, ref: str, latest: bool) -> tuple[str, str]:
    """(adapter URI, default folder name) for a job id/prefix or an adapter name: the job's
    row in the queue names its adapter; a name is looked up among the bucket's complete ones."""
    job_error: InvalidInput | None = None
    if not latest:
        try:
            rec = ctx.open_queue(settings).get(ref)
        except JobNotFound:
            rec = None
        except InvalidInput as e:  # too short or ambiguous as a job id: maybe it is a name
            rec, job_error = None, e
        if rec is not None:
            uri = (rec.result or {}).get("adapter_uri")
            if rec.status.value != "succeeded" or not uri:
                raise InvalidInput(
                    f"job {rec.id} is {rec.status.value}: only succeeded jobs have adapters"
                )
            return uri, f"{rec.name}-{rec.id}"
    from lorajobs.storage.adapters import list_adapters

    named = [a for a in list_adapters(settings.bucket) if a["name"] == ref]
    if not named and job_error is not None:
        raise job_error
    if not named:
        raise InvalidInput(
            f"no job {ref!r}, and no complete adapter named {ref!r} in {settings.bucket}"
        )
    if len(named) > 1 and not latest:
        raise InvalidInput(
            f"{len(named)} adapters are named {ref!r}: pass --latest for the "
            "newest, or a job id (lorajobs adapters --name shows them)"
        )
    best: dict[str, Any] = named[0]  # newest first
    return str(best["uri"]), f"{best['name']}-{best['job_id']}"
