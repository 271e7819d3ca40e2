"""What each job and data command does through a lorajobs server (`remote.ApiClient`): the
same results as the embedded mode, shaped the same for printing."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from lorajobs.jobspecs.failures import InvalidInput
from lorajobs.orchestrator import views
from lorajobs.orchestrator.cli import context as ctx
from lorajobs.orchestrator.cli.remote import ApiClient
from lorajobs.orchestrator.records import JobRecord

POLL_S = 2.0


def validate(api: ApiClient, paths: list[Path]) -> None:
    """Check specs here (syntax) and at the server (ownership, boundaries)."""
    from lorajobs.jobspecs import spec_to_dict

    for spec, path in zip(ctx.load_specs(paths), paths):
        out = api.post("/v1/validate", {"spec": _sendable(api, spec_to_dict(spec), push=False)})
        ctx.err.print(f"{path}: ok ({out['kind']} job '{out['name']}', owner {out['owner']})")


def _sendable(api: ApiClient, spec: dict[str, Any], *, push: bool) -> dict[str, Any]:
    """The spec as sent: owner left to the token; local data pushed first when `push`."""
    if spec.get("owner") == "default":
        spec = {k: v for k, v in spec.items() if k != "owner"}
    if not push:
        return spec
    for field, kind in (("dataset", "dataset"), ("base_model", "model")):
        value = spec.get(field)
        if isinstance(value, str) and value.startswith("/") and Path(value).exists():
            spec = {**spec, field: data_push(api, Path(value), kind)["uri"]}
    return spec


def submit(api: ApiClient, paths: list[Path], key: str | None) -> list[JobRecord]:
    from lorajobs.jobspecs import spec_to_dict

    jobs = []
    for spec in ctx.load_specs(paths):
        body = {"spec": _sendable(api, spec_to_dict(spec), push=True)}
        out = api.post("/v1/jobs", body, headers={"Idempotency-Key": key} if key else None)
        job = views.job_from_json(out["job"])
        verb = "submitted" if out["created"] else "already submitted (same idempotency key)"
        ctx.err.print(f"{verb}: job {job.id} ({job.kind} '{job.name}')")
        jobs.append(job)
    return jobs


def wait(api: ApiClient, jobs: list[JobRecord]) -> list[JobRecord]:
    """Poll until every job ends (the server's controller runs them)."""
    while True:
        now = [views.job_from_json(api.get(f"/v1/jobs/{j.id}")) for j in jobs]
        if all(j.status.is_terminal() for j in now):
            return now
        time.sleep(POLL_S)


def listing(
    api: ApiClient, statuses: list[str] | None, owner: str | None, limit: int
) -> tuple[list[JobRecord], dict[str, str | None]]:
    jobs: list[JobRecord] = []
    reasons: dict[str, str | None] = {}
    cursor = None
    while len(jobs) < limit:
        page = api.get(
            "/v1/jobs",
            state=statuses,
            owner=owner,
            limit=min(500, limit - len(jobs)),
            cursor=cursor,
        )
        for j in page["jobs"]:
            jobs.append(views.job_from_json(j))
            reasons[j["id"]] = j.get("wait_reason")
        cursor = page.get("next_cursor")
        if not cursor:
            break
    return jobs, reasons


def show(api: ApiClient, ref: str) -> dict[str, Any]:
    return api.get(f"/v1/jobs/{ref}")


def act(api: ApiClient, ref: str, verb: str, body: dict[str, Any] | None = None) -> JobRecord:
    return views.job_from_json(api.post(f"/v1/jobs/{ref}/{verb}", body))


def logs(api: ApiClient, ref: str, follow: bool, attempt: int | None) -> None:
    wrote = False
    for chunk in api.stream(f"/v1/jobs/{ref}/logs", follow=follow or None, attempt=attempt):
        sys.stdout.write(chunk.decode("utf-8", errors="replace"))
        sys.stdout.flush()
        wrote = True
    if not wrote and not follow:
        ctx.err.print(f"job {ref}: no log yet")


def adapters(api: ApiClient, name: str | None) -> list[dict[str, Any]]:
    return api.get("/v1/adapters", name=name)


def fetch(api: ApiClient, ref: str, latest: bool, output: Path | None) -> Path:
    """Download an adapter file by file, each checked against its sha256; the marker last."""
    job_id = ref
    if latest or not _is_job(api, ref):
        named = adapters(api, ref)
        if not named:
            raise InvalidInput(f"no job {ref!r}, and no complete adapter named {ref!r}")
        if len(named) > 1 and not latest:
            raise InvalidInput(
                f"{len(named)} adapters are named {ref!r}: pass --latest for the newest, or a "
                "job id (lorajobs adapters --name shows them)"
            )
        job_id = named[0]["job_id"]
    manifest = api.get(f"/v1/jobs/{job_id}/adapter")
    dest = (output or Path(".")) / f"{manifest['name']}-{manifest['job_id']}"
    root = dest.resolve()
    for f in manifest["files"]:  # every path is checked before a byte is written
        target = (root / f["path"]).resolve()
        if root not in target.parents:
            raise InvalidInput(f"{f['path']}: lands outside {root}")
    for f in manifest["files"]:
        api.download(f["url"], root / f["path"], f["size"], f["sha256"])
    marker = manifest["marker"]
    (root / marker["path"]).write_text(marker["content"], encoding="utf-8")
    ctx.err.print(
        f"fetched {len(manifest['files'])} files of job {manifest['job_id']}, sha256 verified",
        markup=False,
    )
    return root


def _is_job(api: ApiClient, ref: str) -> bool:
    from lorajobs.jobspecs.failures import JobNotFound

    try:
        api.get(f"/v1/jobs/{ref}")
        return True
    except (JobNotFound, InvalidInput):
        return False


def data_push(api: ApiClient, path: Path, kind: str) -> dict[str, Any]:
    """Push a local folder or file through the server: hash here, upload what the bucket
    lacks (presigned or streamed), then the server writes the manifest."""
    from lorajobs.storage.staging import local_manifest

    path = path.expanduser().resolve()
    if not path.exists():
        raise InvalidInput(f"{path}: no such file or folder")
    files = local_manifest(path)
    body = {"kind": kind, "files": files, "one_file": path.is_file()}
    plan = api.post("/v1/data/stage", body)
    uploads = {}
    for rel, how in plan["uploads"].items():
        src = path if path.is_file() else path / rel
        done = api.upload(how, src, files[rel]["sha256"])
        if done is not None:
            uploads[rel] = done
    if plan["already_staged"] and not plan["uploads"]:
        ctx.err.print(f"{kind} {path} already staged at {plan['uri']}", markup=False)
        return {**plan, "files": len(files)}
    out = api.post("/v1/data/commit", {**body, "uploads": uploads})
    ctx.err.print(
        f"pushed {kind} {path} -> {out['uri']} ({len(plan['uploads'])} of {len(files)} files sent)",
        markup=False,
        highlight=False,
    )
    return out
