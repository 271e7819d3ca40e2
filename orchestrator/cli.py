"""The `lorajobs` command line. Data goes to stdout, messages to stderr.

Exit codes: 0 ok, 1 a job or operation failed, 2 bad input (nothing was changed).
`submit`, `status`, `show`, `cancel`, `validate` and `schema` never import torch or Ray.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional

import click
import typer
from rich.console import Console

from lorajobs.jobspecs import AnyJobSpec, json_schema, load_spec, resolve_local_paths
from lorajobs.jobspecs.failures import InvalidInput, LoraJobsError
from lorajobs.orchestrator.settings import Settings

app = typer.Typer(
    name="lorajobs",
    help="Train many LoRA adapters: a queue, a scheduler on Ray, and reproducible workers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
db_app = typer.Typer(help="Database schema commands.", no_args_is_help=True)
dev_app = typer.Typer(help="Developer tools (tiny offline models).", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(dev_app, name="dev")

# stdout: data. Piped output gets a wide console so tables are not cut to 80 columns.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, soft_wrap=True)  # stderr: messages


def _settings() -> Settings:
    return Settings.from_env()


def _queue(settings: Settings):  # -> Queue (imported lazily: sqlalchemy only when needed)
    from lorajobs.orchestrator.db import ensure_schema, make_engine
    from lorajobs.orchestrator.queue import Queue

    engine = make_engine(settings)
    ensure_schema(engine, auto=settings.database_url.startswith("sqlite"))
    return Queue(engine)


def _load_specs(paths: list[Path]) -> list[AnyJobSpec]:
    """Validate every file before touching anything, so one bad file inserts nothing."""
    specs, problems = [], []
    for p in paths:
        try:
            specs.append(resolve_local_paths(load_spec(p), p.resolve().parent))
        except InvalidInput as e:
            problems.append(str(e))
    if problems:
        raise InvalidInput("\n".join(problems))
    return specs


# -- specs ------------------------------------------------------------------------------------


@app.command()
def validate(specs: list[Path] = typer.Argument(..., help="Spec files to check.")) -> None:
    """Check spec files and report every problem; changes nothing."""
    for spec, path in zip(_load_specs(specs), specs):
        err.print(f"{path}: ok ({spec.kind} job '{spec.name}')")


@app.command()
def schema() -> None:
    """Print the JSON Schema of a job spec (for YAML editors)."""
    print(json.dumps(json_schema(), indent=2))


# -- queue ------------------------------------------------------------------------------------


@app.command()
def submit(
    specs: list[Path] = typer.Argument(..., help="Spec files, one job each."),
    idempotency_key: Optional[str] = typer.Option(
        None, "--idempotency-key", help="Submitting again with the same key returns the same job."
    ),
    wait: bool = typer.Option(False, "--wait", help="Run a controller here until the jobs end."),
    as_json: bool = typer.Option(False, "--json", help="Print the jobs as JSON."),
) -> None:
    """Queue jobs; print their ids."""
    if idempotency_key and len(specs) > 1:
        raise InvalidInput("--idempotency-key takes exactly one spec file")
    settings = _settings()
    parsed = _load_specs(specs)
    # Local data bound for an object-store bucket is uploaded first (content-addressed, once).
    from lorajobs.storage.staging import stage_local_inputs

    parsed = stage_local_inputs(parsed, settings.bucket, home=settings.home, console=err)
    queue = _queue(settings)
    jobs = []
    for spec in parsed:
        job, created = queue.submit(
            spec, output_uri=spec.output or settings.bucket, idempotency_key=idempotency_key
        )
        jobs.append(job)
        verb = "submitted" if created else "already submitted (same idempotency key)"
        err.print(f"{verb}: job {job.id} ({job.kind} '{job.name}')")
        _print_estimate(job)
    if wait:
        jobs = _run_controller_until_done(settings, queue, [j.id for j in jobs])
    _print_jobs(jobs, as_json, ids_only=not wait)
    if wait and any(j.status.value != "succeeded" for j in jobs):
        raise typer.Exit(1)


def _print_estimate(job: Any) -> None:
    from lorajobs.orchestrator.cli_cluster import cost_estimate

    estimate = cost_estimate(job)
    if estimate.low_per_hour is not None:
        err.print(f"  estimated cost: {estimate.text()}", markup=False)


def _run_controller_until_done(settings: Settings, queue: Any, ids: list[str]) -> list[Any]:
    from lorajobs.orchestrator.settings import ControllerConfig
    from lorajobs.orchestrator.controller import Controller
    from lorajobs.orchestrator.dispatch import RayBackend

    _log_to_stderr()
    _sigterm_as_interrupt()
    config = ControllerConfig.from_env()
    backend = RayBackend(settings)
    try:
        controller = Controller(queue, backend, config)
        controller.run(until=lambda: all(queue.get(i).status.is_terminal() for i in ids))
    finally:
        backend.shutdown()
    return [queue.get(i) for i in ids]


def _print_jobs(jobs: list[Any], as_json: bool, ids_only: bool = False,
                reasons: dict[str, str | None] | None = None) -> None:
    from lorajobs.orchestrator import render

    reasons = reasons or {}
    if as_json:
        print(render.dumps([render.job_json(j, reasons.get(j.id)) for j in jobs]))
    elif ids_only:
        for j in jobs:
            print(j.id)
    else:
        out.print(render.status_table(jobs, reasons))


def _wait_reasons(queue: Any, jobs: list[Any]) -> dict[str, str | None]:
    """Why each queued job of `jobs` waits (from the last scheduling round's summary)."""
    from lorajobs.orchestrator import waiting
    from lorajobs.orchestrator.db import utcnow

    queued = [j for j in jobs if j.status.value == "queued"]
    if not queued:
        return {}
    summary, now = queue.waiting(), utcnow()
    return {j.id: waiting.reason(j, summary, now) for j in queued}


@app.command()
def status(
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list of jobs."),
    state: Optional[list[str]] = typer.Option(None, "--state", help="Only jobs in this state."),
    owner: Optional[str] = typer.Option(None, "--owner", help="Only this owner's jobs."),
    limit: int = typer.Option(50, "--limit", help="At most this many jobs, newest first."),
    watch: bool = typer.Option(False, "--watch", help="Refresh every 2 s until Ctrl-C."),
) -> None:
    """The queue: id, name, kind, state, progress, loss, speed, elapsed; why queued jobs wait."""
    from lorajobs.orchestrator import render
    from lorajobs.orchestrator.states import JobStatus

    try:
        statuses = [JobStatus(s) for s in state] if state else None
    except ValueError:
        raise InvalidInput(
            f"--state must be one of: {', '.join(s.value for s in JobStatus)}"
        ) from None
    queue = _queue(_settings())

    def jobs() -> list[Any]:
        return queue.list(statuses=statuses, owner=owner, limit=limit)

    def table() -> Any:
        listed = jobs()
        return render.status_table(listed, _wait_reasons(queue, listed))

    if not watch:
        listed = jobs()
        _print_jobs(listed, as_json, reasons=_wait_reasons(queue, listed))
        return
    from rich.live import Live

    with Live(table(), console=out, refresh_per_second=1) as live:
        try:
            while True:
                time.sleep(2)
                live.update(table())
        except KeyboardInterrupt:
            pass


@app.command()
def show(
    job: str = typer.Argument(..., help="Job id or a unique prefix."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """One job: spec, state, why it waits (if queued), result, and every event."""
    import yaml

    from lorajobs.orchestrator import render

    queue = _queue(_settings())
    rec = queue.get(job)
    events = queue.events(rec.id)
    from lorajobs.orchestrator.cli_cluster import cost_estimate

    attempts = render.attempts(events)
    estimate = cost_estimate(rec)
    wait_reason = _wait_reasons(queue, [rec]).get(rec.id)
    if as_json:
        print(render.dumps({**render.job_json(rec, wait_reason),
                            "events": [render.event_json(e) for e in events],
                            "attempts": attempts, "cost_estimate": estimate.as_dict()}))
        return
    out.print(f"[bold]{rec.id}[/]  {rec.kind} '{rec.name}'  owner={rec.owner}  priority={rec.priority}")
    out.print(f"state: {rec.status.value}   attempt: {rec.attempt}   progress: "
              f"{render.progress_text(rec)}   loss: {rec.loss if rec.loss is not None else '-'}")
    out.print(f"node: {rec.node or '-'}   gpu: {render.gpu_text(rec)}   eta: "
              f"{render.fmt_duration(render.eta_s(rec))}   cost: "
              + (f"${rec.cost_usd:.4f} so far" if rec.cost_usd is not None else "-")
              + f"   estimate: {estimate.text()}", markup=False)
    if wait_reason:
        out.print(f"waiting: {wait_reason}", markup=False)
    if rec.failure_reason:
        out.print(f"failure ({rec.failure_kind}): {rec.failure_reason}")
    if render.adapter_uri(rec):
        out.print(f"adapter: {render.adapter_uri(rec)}")
        metrics = (rec.result or {}).get("metrics", {})
        shown = {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}
        if shown:
            out.print("metrics: " + "  ".join(f"{k}={v}" for k, v in sorted(shown.items())))
    out.print("\n[bold]spec[/]")
    out.print(yaml.safe_dump(rec.spec, sort_keys=False).rstrip(), markup=False)
    out.print("\n[bold]attempts[/]")
    out.print(render.attempts_table(attempts))
    out.print("\n[bold]events[/]")
    out.print(render.events_table(events))


@app.command()
def cancel(job: str = typer.Argument(..., help="Job id or a unique prefix.")) -> None:
    """Cancel a job: at once if queued; a running job is stopped by its controller."""
    queue = _queue(_settings())
    rec = queue.request_cancel(job)
    if rec.status.value == "cancelled":
        err.print(f"job {rec.id} cancelled")
    else:
        err.print(f"job {rec.id}: cancel requested; the controller stops it")
    print(rec.id)


# -- running ------------------------------------------------------------------------------------


@app.command()
def controller(
    once: bool = typer.Option(False, "--once", help="One pass, then exit."),
) -> None:
    """Run the controller loop in the foreground: dispatch, track, finish, retry."""
    from lorajobs.orchestrator.settings import ControllerConfig
    from lorajobs.orchestrator.controller import Controller
    from lorajobs.orchestrator.dispatch import RayBackend

    _log_to_stderr()
    _sigterm_as_interrupt()
    settings = _settings()
    queue = _queue(settings)
    config = ControllerConfig.from_env()
    backend = RayBackend(settings)
    try:
        c = Controller(queue, backend, config)
        if once:
            c.step()
        else:
            c.run()
    except KeyboardInterrupt:
        err.print("controller stopped")
    finally:
        backend.shutdown()


@app.command()
def run(
    spec_file: Path = typer.Argument(..., help="Spec file."),
    output: Optional[str] = typer.Option(
        None, "-o", "--output", help="Bucket URI or folder for the adapter (default: the bucket)."
    ),
    job_id: Optional[str] = typer.Option(None, "--job-id", help="Id used in the output path."),
) -> None:
    """Train one job here, in this process: no database, no Ray. Prints the adapter's URI."""
    import secrets

    from lorajobs.worker.context import WorkerContext
    from lorajobs.worker.entrypoint import run_job

    settings = _settings()
    (spec,) = _load_specs([spec_file])
    bucket = output or spec.output or settings.bucket
    if "://" not in bucket:
        bucket = Path(bucket).resolve().as_uri()
    last = [0.0]

    def report(p: dict[str, Any]) -> None:
        if time.monotonic() - last[0] > 1.0 or p.get("step") == p.get("total_steps"):
            last[0] = time.monotonic()
            err.print(f"step {p.get('step')}/{p.get('total_steps')}  loss {p.get('loss', 0):.4f}"
                      f"  {p.get('it_per_s', 0):.1f} it/s")

    ctx = WorkerContext(
        job_id=job_id or f"run-{secrets.token_hex(6)}",
        output_uri=bucket,
        cache_dir=settings.cache_dir,
        report=report,
        threads=spec.resources.cpus,
        node="local",
    )
    result = run_job(spec, ctx)
    err.print(f"adapter written to {result['adapter_uri']}")
    print(result["adapter_uri"])


@app.command()
def demo(
    keep: bool = typer.Option(True, help="Keep the demo's jobs and files in LORAJOBS_HOME."),
) -> None:
    """Build tiny models and data, train one image and one text LoRA, fetch both."""
    from lorajobs.orchestrator.demo import run_demo

    run_demo(_settings(), out, err)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the database schema to the latest version."""
    from lorajobs.orchestrator.db import make_engine, upgrade

    settings = _settings()
    upgrade(make_engine(settings))
    err.print(f"database at {settings.redacted_database_url()} is up to date")


@dev_app.command("tiny-models")
def tiny_models(
    out_dir: Path = typer.Option(
        ..., "--out", help="Folder to write tiny-sd/, tiny-sdxl/ and tiny-llama/ into."
    ),
    seed: int = typer.Option(0, help="Seed for the random weights."),
) -> None:
    """Build tiny SD-1.x and SDXL pipelines and a tiny causal LM, offline."""
    from lorajobs.worker.tiny_image import build_tiny_image_model, build_tiny_sdxl_model
    from lorajobs.worker.tiny_text import build_tiny_text_model

    print(build_tiny_image_model(out_dir / "tiny-sd", seed=seed))
    print(build_tiny_sdxl_model(out_dir / "tiny-sdxl", seed=seed))
    print(build_tiny_text_model(out_dir / "tiny-llama", seed=seed))


def _sigterm_as_interrupt() -> None:
    """SIGTERM unwinds like Ctrl-C, so `finally` blocks shut the local Ray down cleanly."""
    import signal

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def _log_to_stderr() -> None:
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )


def _register_commands() -> None:
    # Each area keeps its commands in its own module (one concept per module).
    from lorajobs.orchestrator import cli_cluster, cli_data, cli_train

    for module in (cli_data, cli_cluster, cli_train):
        module.register(app)


_register_commands()


def main() -> None:
    """Console entry point: one shared handler turns errors into one line and an exit code."""
    try:
        # Without standalone mode click hands back `typer.Exit(code)` as a return value.
        rc = app(standalone_mode=False)
        sys.exit(rc if isinstance(rc, int) else 0)
    except LoraJobsError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
