"""Job commands: validate, schema, submit, status, show, cancel, retry, priority, logs, usage
(fair share), and the controller loop. None of them imports torch; only `controller` and `submit --wait` import Ray.

`lorajobs logs JOB [-f]` prints (and follows) the worker's log, which the worker streams to
`<bucket>/jobs/<job_id>/logs/attempt-<N>/part-*.log` (each part the bytes written since the
previous one), so it is readable from any machine that can read the bucket; following fetches
only the parts it has not printed yet.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import typer

from lorajobs.jobspecs.failures import InvalidInput
from lorajobs.orchestrator import views
from lorajobs.orchestrator.cli import client
from lorajobs.orchestrator.cli import context as ctx

FOLLOW_POLL_S = 1.0


def register(app: typer.Typer) -> None:
    """Add the job commands to `app`."""
    for command in (
        validate,
        schema,
        submit,
        status,
        show,
        cancel,
        retry,
        priority,
        logs,
        controller,
        usage,
    ):
        app.command()(command)


def validate(specs: list[Path] = typer.Argument(..., help="Spec files to check.")) -> None:
    """Check spec files and report every problem; changes nothing."""
    if (api := ctx.api()) is not None:
        client.validate(api, specs)
        return
    for spec, path in zip(ctx.load_specs(specs), specs):
        ctx.err.print(f"{path}: ok ({spec.kind} job '{spec.name}')")


def schema() -> None:
    """Print the JSON Schema of a job spec (for YAML editors)."""
    from lorajobs.jobspecs import json_schema

    print(json.dumps(json_schema(), indent=2))


def submit(
    specs: list[Path] = typer.Argument(..., help="Spec files, one job each."),
    idempotency_key: str | None = typer.Option(
        None, "--idempotency-key", help="Submitting again with the same key returns the same job."
    ),
    wait: bool = typer.Option(False, "--wait", help="Run a controller here until the jobs end."),
    as_json: bool = typer.Option(False, "--json", help="Print the jobs as JSON."),
) -> None:
    """Queue jobs; print their ids."""
    if idempotency_key and len(specs) > 1:
        raise InvalidInput("--idempotency-key takes exactly one spec file")
    if (api := ctx.api()) is not None:
        jobs = client.submit(api, specs, idempotency_key)
        if wait:
            jobs = client.wait(api, jobs)
        print_jobs(jobs, as_json, ids_only=not wait)
        if wait and any(j.status.value != "succeeded" for j in jobs):
            raise typer.Exit(1)
        return
    settings = ctx.settings()
    parsed = ctx.load_specs(specs)
    from lorajobs.orchestrator.capability import refuse_unrunnable

    refuse_unrunnable(zip(map(str, specs), parsed), settings.ray_address)  # queue none of them
    # Local data bound for an object-store bucket is uploaded first (content-addressed, once).
    from lorajobs.orchestrator.cost import estimate_for
    from lorajobs.storage.staging import stage_local_inputs

    parsed = stage_local_inputs(parsed, settings.bucket, home=settings.home, console=ctx.err)
    queue = ctx.open_queue(settings)
    jobs = []
    for spec in parsed:
        job, created = queue.submit(
            spec, output_uri=spec.output or settings.bucket, idempotency_key=idempotency_key
        )
        jobs.append(job)
        verb = "submitted" if created else "already submitted (same idempotency key)"
        ctx.err.print(f"{verb}: job {job.id} ({job.kind} '{job.name}')")
        estimate = estimate_for(job)
        if estimate.low_per_hour is not None:
            ctx.err.print(f"  estimated cost: {estimate.text()}", markup=False)
    if wait:
        jobs = ctx.run_controller_until_done(settings, queue, [j.id for j in jobs])
    print_jobs(jobs, as_json, ids_only=not wait)
    if wait and any(j.status.value != "succeeded" for j in jobs):
        raise typer.Exit(1)


def print_jobs(
    jobs: list[Any],
    as_json: bool,
    ids_only: bool = False,
    reasons: dict[str, str | None] | None = None,
) -> None:
    from lorajobs.orchestrator.cli import render

    reasons = reasons or {}
    if as_json:
        print(render.dumps([render.job_json(j, reasons.get(j.id)) for j in jobs]))
    elif ids_only:
        for j in jobs:
            print(j.id)
    elif ctx.out.is_terminal:
        ctx.out.print(render.status_table(jobs, reasons))
    else:
        print(render.status_text(jobs, reasons))


def wait_reasons(queue: Any, jobs: list[Any]) -> dict[str, str | None]:
    """Why each queued job of `jobs` waits (from the last scheduling round's summary)."""
    from lorajobs.orchestrator import waiting

    queued = [j for j in jobs if j.status.value == "queued"]
    if not queued:
        return {}
    summary, now = queue.scheduling.waiting(), queue.clock()
    return {j.id: waiting.reason(j, summary, now) for j in queued}


def status(
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list of jobs."),
    state: list[str] | None = typer.Option(None, "--state", help="Only jobs in this state."),
    owner: str | None = typer.Option(None, "--owner", help="Only this owner's jobs."),
    limit: int = typer.Option(50, "--limit", help="At most this many jobs, newest first."),
    watch: bool = typer.Option(False, "--watch", help="Refresh every 2 s until Ctrl-C."),
) -> None:
    """The queue: id, name, kind, state, progress, loss, speed, elapsed; why queued jobs wait."""
    from lorajobs.orchestrator.cli import render
    from lorajobs.orchestrator.states import JobStatus

    try:
        statuses = [JobStatus(s) for s in state] if state else None
    except ValueError:
        raise InvalidInput(
            f"--state must be one of: {', '.join(s.value for s in JobStatus)}"
        ) from None
    api = ctx.api()
    queue = ctx.open_queue(ctx.settings()) if api is None else None

    def jobs() -> tuple[list[Any], dict[str, str | None]]:
        if api is not None:
            return client.listing(api, state, owner, limit)
        listed = queue.list(statuses=statuses, owner=owner, limit=limit)  # type: ignore[union-attr]
        return listed, wait_reasons(queue, listed)

    def table() -> Any:
        return render.status_table(*jobs())

    if not watch:
        listed, reasons = jobs()
        print_jobs(listed, as_json, reasons=reasons)
        return
    try:
        if ctx.out.is_terminal:
            from rich.live import Live

            with Live(table(), console=ctx.out, refresh_per_second=1) as live:
                while True:
                    time.sleep(2)
                    live.update(table())
        # Piped (to a file, `tee`, a pager): a plain table per refresh, written at once.
        while True:
            print(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')}")
            print(render.status_text(*jobs()), flush=True)
            time.sleep(2)
    except KeyboardInterrupt:
        pass


def usage(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Fair share: each owner's GPU-hours (decayed with LORAJOBS_FAIRSHARE_HALFLIFE), share
    (LORAJOBS_FAIRSHARE_SHARES) and factor (hours / share: lower runs first within a priority)."""
    from lorajobs.orchestrator import fairshare
    from lorajobs.orchestrator.settings import ControllerConfig

    if (api := ctx.api()) is not None:
        data = api.get("/v1/usage")
    else:
        config, queue = ControllerConfig.from_env(), ctx.open_queue(ctx.settings())
        rows = fairshare.report(queue.engine, config.shares, config.halflife_s, queue.clock())
        data = {"halflife_s": config.halflife_s, "owners": [vars(u) for u in rows]}
    if as_json:
        print(json.dumps(data, indent=2, sort_keys=True))
        return
    print(f"half-life {fairshare.halflife_text(data['halflife_s'])}")
    print(f"{'OWNER':<24} {'GPU-HOURS':>10} {'SHARE':>7} {'FACTOR':>10}")
    for u in data["owners"]:
        print(f"{u['owner']:<24} {u['gpu_hours']:>10.3f} {u['share']:>7g} {u['factor']:>10.4f}")
    if not data["owners"]:
        print("(no usage yet)")


def show(
    job: str = typer.Argument(..., help="Job id or a unique prefix."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """One job: spec, state, why it waits (if queued), result, and every event."""
    import yaml

    from lorajobs.orchestrator.cli import render
    from lorajobs.orchestrator.cost import Estimate, estimate_for

    if (api := ctx.api()) is not None:
        shown = client.show(api, job)
        rec, wait_reason = views.job_from_json(shown), shown.get("wait_reason")
        events = [views.event_from_json(e) for e in shown["events"]]
        estimate = Estimate(**shown["cost_estimate"])
    else:
        queue = ctx.open_queue(ctx.settings())
        rec = queue.get(job)
        events = queue.events(rec.id)
        estimate = estimate_for(rec)
        wait_reason = wait_reasons(queue, [rec]).get(rec.id)
    attempts = render.attempts(events)
    if as_json:
        print(
            render.dumps(
                {
                    **render.job_json(rec, wait_reason),
                    "events": [render.event_json(e) for e in events],
                    "attempts": attempts,
                    "cost_estimate": estimate.as_dict(),
                }
            )
        )
        return
    ctx.out.print(
        f"[bold]{rec.id}[/]  {rec.kind} '{rec.name}'  owner={rec.owner}  priority={rec.priority}"
    )
    ctx.out.print(
        f"state: {rec.status.value}   attempt: {rec.attempt}   progress: "
        f"{render.progress_text(rec)}   loss: {rec.loss if rec.loss is not None else '-'}"
    )
    ctx.out.print(
        f"node: {rec.node or '-'}   gpu: {render.gpu_text(rec)}   eta: "
        f"{render.fmt_duration(render.eta_s(rec))}   cost: "
        + (f"${rec.cost_usd:.4f} so far" if rec.cost_usd is not None else "-")
        + f"   estimate: {estimate.text()}",
        markup=False,
    )
    if wait_reason:
        ctx.out.print(f"waiting: {wait_reason}", markup=False)
    for line in render.preemption_lines(rec, events):
        ctx.out.print(line, markup=False)
    if (pack := views.pack_text(rec)) is not None:
        ctx.out.print(f"pack: {pack}", markup=False)
    if rec.failure_reason:
        ctx.out.print(f"failure ({rec.failure_kind}): {rec.failure_reason}")
    if render.adapter_uri(rec):
        ctx.out.print(f"adapter: {render.adapter_uri(rec)}")
        metrics = (rec.result or {}).get("metrics", {})
        shown = {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}
        if shown:
            ctx.out.print("metrics: " + "  ".join(f"{k}={v}" for k, v in sorted(shown.items())))
    ctx.out.print("\n[bold]spec[/]")
    ctx.out.print(yaml.safe_dump(rec.spec, sort_keys=False).rstrip(), markup=False)
    ctx.out.print("\n[bold]attempts[/]")
    ctx.out.print(render.attempts_table(attempts))
    ctx.out.print("\n[bold]events[/]")
    ctx.out.print(render.events_table(events))


def cancel(job: str = typer.Argument(..., help="Job id or a unique prefix.")) -> None:
    """Cancel a job: at once if queued; a running job is stopped by its controller."""
    api = ctx.api()
    rec = (
        client.act(api, job, "cancel")
        if api is not None
        else ctx.open_queue(ctx.settings()).request_cancel(job)
    )
    if rec.status.value == "cancelled":
        ctx.err.print(f"job {rec.id} cancelled")
    else:
        ctx.err.print(f"job {rec.id}: cancel requested; the controller stops it")
    print(rec.id)


def controller(
    once: bool = typer.Option(False, "--once", help="One pass, then exit."),
) -> None:
    """Run the controller loop in the foreground: dispatch, track, finish, retry."""
    from lorajobs.orchestrator.controller import Controller
    from lorajobs.orchestrator.ray_backend import RayBackend
    from lorajobs.orchestrator.settings import ControllerConfig

    ctx.log_to_stderr()
    ctx.sigterm_as_interrupt()
    settings = ctx.settings()
    queue = ctx.open_queue(settings)
    config = ControllerConfig.from_env()
    backend = RayBackend(settings)
    try:
        c = Controller(queue, backend, config)
        if once:
            c.step()
        else:
            c.run()
    except KeyboardInterrupt:
        ctx.err.print("controller stopped")
    finally:
        backend.shutdown()


def retry(job: str = typer.Argument(..., help="Job id or a unique prefix.")) -> None:
    """Queue a failed job again as a new attempt; it resumes from its last checkpoint."""

    api = ctx.api()
    rec = client.act(api, job, "retry") if api else ctx.open_queue(ctx.settings()).retry(job)
    ctx.err.print(f"job {rec.id} queued again as attempt {rec.attempt}")
    print(rec.id)


def priority(
    job: str = typer.Argument(..., help="Job id or a unique prefix."),
    value: int = typer.Argument(..., help="New priority, -100..100; higher runs first."),
) -> None:
    """Change the priority of a job that is still queued."""

    if (api := ctx.api()) is not None:
        before = views.job_from_json(client.show(api, job))
        rec = client.act(api, before.id, "priority", {"priority": value})
    else:
        queue = ctx.open_queue(ctx.settings())
        before = queue.get(job)
        rec = queue.set_priority(before.id, value)
    ctx.err.print(f"job {rec.id}: priority {before.priority} -> {rec.priority}")
    print(rec.id)


def logs(
    job: str = typer.Argument(..., help="Job id or a unique prefix."),
    follow: bool = typer.Option(
        False,
        "-f",
        "--follow",
        help="Keep printing as the log grows, across attempts, until the job ends.",
    ),
    attempt: int | None = typer.Option(
        None, "--attempt", help="This attempt's log (default: the latest)."
    ),
) -> None:
    """Print the worker's log of a job (its latest attempt unless --attempt)."""
    import codecs

    from lorajobs.storage.logs import read_log_from

    if (api := ctx.api()) is not None:
        try:
            client.logs(api, job, follow, attempt)
        except KeyboardInterrupt:
            pass
        return
    queue = ctx.open_queue(ctx.settings())
    rec = queue.get(job)
    if attempt is not None and not 1 <= attempt <= rec.attempt:
        raise InvalidInput(f"job {rec.id} has attempts 1-{rec.attempt}, not {attempt}")
    n = attempt or rec.attempt
    printed = 0
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def drain() -> None:
        # Only the bytes after those printed: each poll fetches the new parts, not the log.
        nonlocal printed
        data = read_log_from(rec.output_uri, rec.id, n, printed)
        if data:
            sys.stdout.write(decoder.decode(data))
            sys.stdout.flush()
            printed += len(data)

    drain()
    if not follow:
        if printed == 0:
            ctx.err.print(f"job {rec.id}: no log for attempt {n} yet (it is {rec.status.value})")
        return
    try:
        while True:
            time.sleep(FOLLOW_POLL_S)
            now = queue.get(rec.id)
            drain()
            if attempt is None and now.attempt > n:
                n, printed = now.attempt, 0  # the old attempt's log was final before this
                decoder.reset()
                ctx.err.print(f"--- attempt {n} ---")
                continue
            if now.status.is_terminal():
                drain()  # the worker uploads its log in full before the job can end
                ctx.err.print(f"job {rec.id} {now.status.value}")
                return
    except KeyboardInterrupt:
        return
