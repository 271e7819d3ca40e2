"""`/v1` routes over the queue: submit, list, show, events, cancel, retry, priority, validate,
schema. Every route takes the caller's principal; another owner's job is a 404."""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from lorajobs.jobspecs.failures import InvalidInput
from lorajobs.orchestrator import views as render
from lorajobs.orchestrator import waiting
from lorajobs.orchestrator.cost import estimate_for
from lorajobs.orchestrator.queue import JobRecord
from lorajobs.orchestrator.service.admission import admit
from lorajobs.orchestrator.service.core import Service, require_writer
from lorajobs.orchestrator.states import JobStatus
from lorajobs.orchestrator.tokens import Principal

router = APIRouter(prefix="/v1", tags=["jobs"])


def service(request: Request) -> Service:
    return request.app.state.service


def principal(request: Request) -> Principal:
    return service(request).authenticate(request)


class SpecBody(BaseModel):
    """A job spec: as a mapping (`spec`) or as YAML text (`yaml`)."""

    spec: dict[str, Any] | None = Field(None, description="The spec as a JSON object.")
    yaml: str | None = Field(None, description="The spec as YAML text.")


class PriorityBody(BaseModel):
    priority: int = Field(..., ge=-100, le=100, description="New priority; higher runs first.")


def job_out(job: JobRecord, reasons: dict[str, str | None] | None = None) -> dict:
    out = render.job_json(job, (reasons or {}).get(job.id))
    out.pop("idempotency_key", None)  # the caller's own key, scoped by owner: not for others
    out.pop("lease_owner", None)
    return out


def wait_reasons(svc: Service, jobs: list[JobRecord]) -> dict[str, str | None]:
    queued = [j for j in jobs if j.status is JobStatus.queued]
    if not queued:
        return {}
    summary, now = svc.queue.scheduling.waiting(), svc.queue.clock()
    return {j.id: waiting.reason(j, summary, now) for j in queued}


@router.get("/schema", summary="The JSON Schema of a job spec")
def schema(who: Principal = Depends(principal)) -> dict[str, Any]:
    from lorajobs.jobspecs import json_schema

    return json_schema()


@router.post("/validate", summary="Check a spec as submit would; queue nothing")
def validate(body: SpecBody, request: Request, who: Principal = Depends(principal)) -> dict:
    svc = service(request)
    spec, output_uri = admit(
        who,
        body.model_dump(exclude_none=True),
        svc.config.boundary,
        svc.settings.ray_address,
    )
    return {
        "ok": True,
        "kind": spec.kind,
        "name": spec.name,
        "owner": spec.owner,
        "output_uri": output_uri,
    }


@router.post("/jobs", status_code=201, summary="Queue a job")
def submit(
    body: SpecBody,
    request: Request,
    who: Principal = Depends(principal),
    idempotency_key: str | None = Header(None, alias="Idempotency-Key"),
) -> JSONResponse:
    svc = service(request)
    require_writer(who)
    spec, output_uri = admit(
        who,
        body.model_dump(exclude_none=True),
        svc.config.boundary,
        svc.settings.ray_address,
    )
    # Keys are the caller's own: scoped by owner so one tenant's keys never meet another's.
    key = f"{spec.owner}/{idempotency_key}" if idempotency_key else None
    job, created = svc.queue.submit(spec, output_uri=output_uri, idempotency_key=key, by=who.actor)
    estimate = estimate_for(job).as_dict()
    return JSONResponse(
        {"job": job_out(job), "created": created, "cost_estimate": estimate},
        status_code=201 if created else 200,
    )


def _cursor(job: JobRecord) -> str:
    raw = f"{job.created_at.isoformat()}|{job.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _parse_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        at, job_id = raw.split("|", 1)
        return datetime.fromisoformat(at), job_id
    except ValueError:
        raise InvalidInput("cursor: not a cursor this server gave out") from None


@router.get("/jobs", summary="List jobs, newest first, a page at a time")
def list_jobs(
    request: Request,
    who: Principal = Depends(principal),
    state: list[str] | None = Query(None, description="Only jobs in these states."),
    owner: str | None = Query(None, description="Only this owner's (admins; others: their own)."),
    name: str | None = Query(None, description="Only jobs with this adapter name."),
    limit: int = Query(50, ge=1, le=500),
    cursor: str | None = Query(None, description="`next_cursor` of the previous page."),
) -> JSONResponse:
    svc = service(request)
    try:
        statuses = [JobStatus(s) for s in state] if state else None
    except ValueError:
        raise InvalidInput(f"state: one of {', '.join(s.value for s in JobStatus)}") from None
    jobs = svc.queue.list(
        statuses=statuses,
        owner=svc.visible_owner(who, owner),
        name=name,
        limit=limit + 1,
        before=_parse_cursor(cursor) if cursor else None,
    )
    page, more = jobs[:limit], len(jobs) > limit
    reasons = wait_reasons(svc, page)
    # Already plain JSON types: a JSONResponse skips FastAPI's recursive re-encoding, which
    # costs more than the query on the queue's hottest route.
    return JSONResponse(
        {
            "jobs": [job_out(j, reasons) for j in page],
            "next_cursor": _cursor(page[-1]) if more and page else None,
        }
    )


@router.get("/jobs/{ref}", summary="One job: its state, attempts, events and cost")
def show(ref: str, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
    svc = service(request)
    job = svc.job(who, ref)
    events = svc.queue.events(job.id)
    return {
        **job_out(job, wait_reasons(svc, [job])),
        "events": [render.event_json(e) for e in events],
        "attempts": render.attempts(events),
        "cost_estimate": estimate_for(job).as_dict(),
    }


@router.get("/jobs/{ref}/events", summary="A job's events, oldest first")
def events(ref: str, request: Request, who: Principal = Depends(principal)) -> list[dict]:
    svc = service(request)
    return [render.event_json(e) for e in svc.queue.events(svc.job(who, ref).id)]


@router.post("/jobs/{ref}/cancel", summary="Cancel a job")
def cancel(ref: str, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
    svc = service(request)
    job = svc.writable_job(who, ref)
    return job_out(svc.queue.request_cancel(job.id, by=who.actor))


@router.post("/jobs/{ref}/retry", summary="Queue a failed or cancelled job again")
def retry(ref: str, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
    svc = service(request)
    job = svc.writable_job(who, ref)
    return job_out(svc.queue.retry(job.id, by=who.actor))


@router.post("/jobs/{ref}/priority", summary="Change a queued job's priority")
def priority(
    ref: str, body: PriorityBody, request: Request, who: Principal = Depends(principal)
) -> dict[str, Any]:
    svc = service(request)
    job = svc.writable_job(who, ref)
    return job_out(svc.queue.set_priority(job.id, body.priority, by=who.actor))


@router.get("/cluster", summary="Nodes and GPUs in use, and the queue's demand")
def cluster(request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
    """Totals across owners (no job of another owner is named), and the nodes the last
    scheduling round saw."""
    from sqlalchemy import func, select

    from lorajobs.orchestrator.db import JOBS

    svc = service(request)
    with svc.queue.engine.connect() as conn:
        rows = conn.execute(
            select(JOBS.c.status, func.count(), func.coalesce(func.sum(JOBS.c.gpus), 0.0))
            .where(JOBS.c.status.in_(["queued", "dispatched", "running"]))
            .group_by(JOBS.c.status)
        ).all()
    by = {status: (int(n), float(g)) for status, n, g in rows}
    active = [by.get(s, (0, 0.0)) for s in ("dispatched", "running")]
    summary = svc.queue.scheduling.waiting()
    nodes = summary.nodes if summary is not None else []
    return {
        "nodes": nodes,
        "gpus_total": sum(float(n.get("gpus") or 0) for n in nodes),  # type: ignore[arg-type]
        "gpus_in_use": sum(g for _, g in active),
        "active_jobs": sum(n for n, _ in active),
        "queued_jobs": by.get("queued", (0, 0.0))[0],
        "queued_gpus": by.get("queued", (0, 0.0))[1],
        "as_of": summary.at.isoformat() if summary is not None else None,
    }


@router.get("/usage", summary="Fair share: owners' decayed GPU-hours, shares and factors")
def usage(request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
    """Admins see every owner; others their own."""
    from lorajobs.orchestrator import fairshare
    from lorajobs.orchestrator.settings import ControllerConfig

    svc, config = service(request), ControllerConfig.from_env()
    rows = fairshare.report(
        svc.queue.engine,
        config.shares,
        config.halflife_s,
        svc.queue.clock(),
        owner=None if who.is_admin else who.owner,
    )
    return {
        "halflife_s": config.halflife_s,
        "owners": [
            {"owner": u.owner, "gpu_hours": u.gpu_hours, "share": u.share, "factor": u.factor}
            for u in rows
        ],
    }


@router.get("/whoami", summary="The caller's token: id, owner and role")
def whoami(who: Principal = Depends(principal)) -> dict[str, str]:
    return {"token_id": who.token_id, "owner": who.owner, "role": who.role.value}
