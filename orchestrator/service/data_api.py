"""`/v1` routes over the bucket: logs (followed by streaming), adapters, fetch and data push.

On an S3 bucket the server hands out presigned URLs, so adapter and dataset bytes go straight
between the client and the bucket; on a `file://` bucket it streams them itself. Either way
every byte lies under the caller's own prefix, `<bucket>/owners/<owner>/`.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, Field
from sqlalchemy import distinct, select

from lorajobs.jobspecs.failures import InvalidInput, ObjectNotFound
from lorajobs.orchestrator.db import JOBS
from lorajobs.orchestrator.service.core import Service, require_writer
from lorajobs.orchestrator.service.jobs_api import principal, service
from lorajobs.orchestrator.tokens import Principal
from lorajobs.storage import handoff
from lorajobs.storage.adapters import MARKER, adapter_manifest, list_adapters
from lorajobs.storage.backends import open_storage
from lorajobs.storage.base import join_uri, safe_key
from lorajobs.storage.logs import read_log, read_log_from
from lorajobs.storage.staging import KINDS, MANIFEST_SUFFIX, manifest_digest, write_manifest

router = APIRouter(prefix="/v1", tags=["data"])
FOLLOW_POLL_S = 1.0
CHUNK = 1 << 20


# -- logs ------------------------------------------------------------------------------------


@router.get("/jobs/{ref}/logs", summary="A job's worker log; `follow` streams it until the end")
def logs(
    ref: str,
    request: Request,
    who: Principal = Depends(principal),
    attempt: int | None = Query(None, ge=1, description="This attempt's (default: the latest)."),
    offset: int = Query(0, ge=0, description="Skip this many bytes of the log."),
    follow: bool = Query(False, description="Keep streaming, across attempts, until it ends."),
) -> StreamingResponse:
    svc = service(request)
    job = svc.job(who, ref)
    if attempt is not None and attempt > job.attempt:
        raise InvalidInput(f"job {job.id} has attempts 1-{job.attempt}, not {attempt}")

    def chunks() -> Iterator[bytes]:
        n, sent = attempt or job.attempt, offset
        while True:  # each poll fetches only the parts past what was sent
            data = read_log_from(job.output_uri, job.id, n, sent)
            if data:
                yield data
                sent += len(data)
            if not follow:
                return
            now = svc.queue.get(job.id)
            if attempt is None and now.attempt > n:
                n, sent = now.attempt, 0
                yield f"--- attempt {n} ---\n".encode()
                continue
            if now.status.is_terminal():
                tail = read_log_from(job.output_uri, job.id, n, sent)
                if tail:
                    yield tail
                return
            time.sleep(FOLLOW_POLL_S)

    return StreamingResponse(chunks(), media_type="text/plain; charset=utf-8")


_STEP = re.compile(rb"step (\d+)/\d+\s+loss ([-+0-9.eE]+|nan|inf)")


@router.get("/jobs/{ref}/metrics", summary="The loss curve so far, from the worker's log")
def metrics(
    ref: str,
    request: Request,
    who: Principal = Depends(principal),
    attempt: int | None = Query(None, ge=1),
) -> dict[str, Any]:
    svc = service(request)
    job = svc.job(who, ref)
    n = attempt or job.attempt
    points: dict[int, float] = {}
    for a in range(1, n + 1):  # a resumed attempt continues the curve of the ones before
        for step, loss in _STEP.findall(read_log(job.output_uri, job.id, a) or b""):
            points[int(step)] = float(loss)
    return {"job_id": job.id, "loss": sorted(points.items())}


_SAMPLE = re.compile(r"^step-\d{6}\.png$")


def _samples_of(job: Any) -> Any:
    """The storage of a job's live sample grids (`worker.board.samples_uri`'s folder)."""
    return open_storage(join_uri(job.output_uri, "jobs", job.id, "samples"))


@router.get("/jobs/{ref}/samples", summary="Sample grids rendered so far, newest first")
def samples(ref: str, request: Request, who: Principal = Depends(principal)) -> list[dict]:
    svc = service(request)
    job = svc.job(who, ref)
    storage = _samples_of(job)
    names = sorted((o.key for o in storage.list("") if _SAMPLE.match(o.key)), reverse=True)
    return [{"step": int(n[5:11]), "url": f"/v1/jobs/{job.id}/samples/{n}"} for n in names]


@router.get("/jobs/{ref}/samples/{name}", summary="One sample grid (PNG)")
def sample(ref: str, name: str, request: Request, who: Principal = Depends(principal)) -> Response:
    svc = service(request)
    job = svc.job(who, ref)
    if not _SAMPLE.match(name):
        raise ObjectNotFound(f"{name}: no such sample")
    storage = _samples_of(job)
    return Response(storage.get_bytes(name), media_type="image/png")


# -- adapters --------------------------------------------------------------------------------


def _owners(svc: Service) -> list[str]:
    with svc.queue.engine.connect() as conn:
        return sorted(conn.execute(select(distinct(JOBS.c.owner))).scalars())


@router.get("/adapters", summary="Complete adapters, newest first")
def adapters(
    request: Request,
    who: Principal = Depends(principal),
    name: str | None = Query(None),
    owner: str | None = Query(None, description="Admins: this owner's (default: every owner's)."),
) -> list[dict[str, Any]]:
    svc = service(request)
    owners = [who.owner] if not who.is_admin else ([owner] if owner else _owners(svc))
    found: list[dict[str, Any]] = []
    for o in owners:
        for a in list_adapters(svc.root(o)):
            if name is None or a["name"] == name:
                found.append({**a, "owner": o})
    found.sort(key=lambda a: (a["created"] or "", a["name"], a["job_id"]), reverse=True)
    return found


def _adapter_of(svc: Service, who: Principal, ref: str) -> tuple[Any, str]:
    job = svc.job(who, ref)
    uri = (job.result or {}).get("adapter_uri")
    if job.status.value != "succeeded" or not uri:
        raise InvalidInput(f"job {job.id} is {job.status.value}: only succeeded jobs have adapters")
    if not uri.startswith(job.output_uri.rstrip("/") + "/"):
        raise ObjectNotFound(f"job {job.id}: its adapter is not under its own prefix")
    return job, uri


@router.get("/jobs/{ref}/adapter", summary="An adapter's files: path, size, sha256, URL")
def adapter(ref: str, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
    svc = service(request)
    job, uri = _adapter_of(svc, who, ref)
    storage = open_storage(uri)
    raw, files = adapter_manifest(uri, storage=storage)
    base = f"/v1/jobs/{job.id}/adapter/files/"

    def url(rel: str) -> str:
        if handoff.presignable(storage):
            return handoff.download_url(storage, rel)  # type: ignore[arg-type]
        return base + rel

    return {
        "job_id": job.id,
        "name": job.name,
        "uri": uri,
        "marker": {"path": MARKER, "content": raw.decode("utf-8")},
        "files": [
            {"path": rel, "size": f["size"], "sha256": f["sha256"], "url": url(rel)}
            for rel, f in sorted(files.items())
        ],
    }


@router.get("/jobs/{ref}/adapter/files/{path:path}", summary="One file of an adapter, streamed")
def adapter_file(
    ref: str, path: str, request: Request, who: Principal = Depends(principal)
) -> StreamingResponse:
    svc = service(request)
    _job, uri = _adapter_of(svc, who, ref)
    storage = open_storage(uri)
    _raw, files = adapter_manifest(uri, storage=storage)
    if path not in files:
        raise ObjectNotFound(f"{path}: not a file of this adapter")
    size = files[path]["size"]

    def chunks() -> Iterator[bytes]:
        for start in range(0, size, CHUNK):
            yield storage.get_range(path, start, CHUNK)

    headers = {"Content-Length": str(size)}
    return StreamingResponse(chunks(), media_type="application/octet-stream", headers=headers)


# -- data push -------------------------------------------------------------------------------


class FileEntry(BaseModel):
    size: int = Field(..., ge=0)
    sha256: str = Field(..., pattern=r"^[0-9a-f]{64}$")


class StageBody(BaseModel):
    kind: str = Field("dataset", description="dataset or model.")
    files: dict[str, FileEntry] = Field(..., min_length=1, description="relpath -> size, sha256")
    one_file: bool = Field(False, description="A single file was pushed: the URI names it.")


class CommitBody(StageBody):
    uploads: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="multipart uploads: relpath -> {upload_id, etags}"
    )


def _entry(svc: Service, who: Principal, body: StageBody) -> tuple[str, str, dict[str, Any]]:
    """(the owner's bucket root, the entry key `datasets/<digest>`, the files table)."""
    require_writer(who)
    if body.kind not in KINDS:
        raise InvalidInput(f"kind: one of {', '.join(KINDS)} (got {body.kind!r})")
    files = {safe_key(rel): f.model_dump() for rel, f in body.files.items()}
    if any(PurePosixPath(rel).name.startswith(".") for rel in files):
        raise InvalidInput("files: hidden files are not staged")
    return svc.root(who.owner), f"{KINDS[body.kind]}/{manifest_digest(files)}", files


def _uri(root: str, entry: str, files: dict[str, Any], one_file: bool) -> str:
    return join_uri(root, entry, *([next(iter(files))] if one_file else []))


@router.post("/data/stage", summary="Start a data push: what to upload, and where")
def stage(body: StageBody, request: Request, who: Principal = Depends(principal)) -> dict:
    svc = service(request)
    root, entry, files = _entry(svc, who, body)
    storage = open_storage(root)
    there = {o.key: o.size for o in storage.list(entry)}
    missing = [r for r, f in sorted(files.items()) if there.get(f"{entry}/{r}") != f["size"]]
    done = storage.exists(entry + MANIFEST_SUFFIX) and not missing
    digest = entry.split("/", 1)[1]
    uploads: dict[str, Any] = {}
    for rel in missing:
        key = f"{entry}/{rel}"
        if handoff.presignable(storage):
            uploads[rel] = handoff.upload_plan(storage, key, files[rel]["size"])  # type: ignore[arg-type]
        else:
            uploads[rel] = {"method": "PUT", "url": f"/v1/data/{body.kind}/{digest}/files/{rel}"}
    return {
        "uri": _uri(root, entry, files, body.one_file),
        "digest": digest,
        "already_staged": done,
        "uploads": uploads,
    }


@router.put("/data/{kind}/{digest}/files/{path:path}", summary="Upload one file (file:// bucket)")
async def put_file(
    kind: str, digest: str, path: str, request: Request, who: Principal = Depends(principal)
) -> dict[str, Any]:
    svc = service(request)
    require_writer(who)
    if kind not in KINDS or len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
        raise InvalidInput("not a staging target this server gave out")
    want = request.headers.get("x-content-sha256", "")
    key = f"{KINDS[kind]}/{digest}/{safe_key(path)}"
    storage = open_storage(svc.root(who.owner))
    h, size, limit = hashlib.sha256(), 0, svc.config.max_upload_bytes
    with tempfile.NamedTemporaryFile(dir=svc.settings.home, prefix=".upload-") as tmp:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise InvalidInput(f"{path}: larger than this server's upload limit")
            h.update(chunk)
            tmp.write(chunk)
        tmp.flush()
        if h.hexdigest() != want:
            raise InvalidInput(f"{path}: its bytes do not hash to X-Content-SHA256")
        storage.put_file(Path(tmp.name), key)
    return {"path": path, "size": size, "sha256": want}


@router.post("/data/commit", summary="Finish a data push: check every file, write the manifest")
def commit(body: CommitBody, request: Request, who: Principal = Depends(principal)) -> dict:
    svc = service(request)
    root, entry, files = _entry(svc, who, body)
    storage = open_storage(root)
    for rel, up in body.uploads.items():
        if handoff.presignable(storage) and rel in files:
            handoff.complete_upload(storage, f"{entry}/{rel}", up["upload_id"], up["etags"])  # type: ignore[arg-type]
    there = {o.key: o.size for o in storage.list(entry)}
    short = [r for r, f in sorted(files.items()) if there.get(f"{entry}/{r}") != f["size"]]
    if short:
        raise InvalidInput(f"not uploaded (or the wrong size): {', '.join(short[:5])}")
    digest = write_manifest(storage, entry, body.kind, files)
    return {
        "uri": _uri(root, entry, files, body.one_file),
        "digest": digest,
        "files": len(files),
        "size": sum(f["size"] for f in files.values()),
    }
