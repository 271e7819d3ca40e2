"""The dashboard: a few server-rendered pages and one small script, served by the API server.

The pages are shells; `static/dashboard.js` fills them from the same `/v1` API the CLI uses,
sending the session cookie (HttpOnly, SameSite=Strict) and, for writes, the CSRF header. Every
value is inserted as text, never as HTML. Signing in takes an API token.
"""

from __future__ import annotations

import html
import secrets
from pathlib import Path
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from lorajobs.orchestrator.service.core import COOKIE, CSRF_COOKIE, Service

router = APIRouter(include_in_schema=False)
STATIC = Path(__file__).with_name("static")
ASSETS = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
SESSION_S = 12 * 3600


def _service(request: Request) -> Service:
    return request.app.state.service


def _page(title: str, body: str, who: str = "", page: str = "") -> HTMLResponse:
    nav = (
        f'<nav><a href="/">Queue</a> <a href="/adapters">Adapters</a>'
        f'<span class="who">{html.escape(who)}</span>'
        '<form method="post" action="/logout"><button id="logout">Sign out</button></form></nav>'
        if who
        else ""
    )
    return HTMLResponse(
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)} · lorajobs</title>"
        "<link rel='stylesheet' href='/static/dashboard.css'></head>"
        f"<body data-page='{page}'>{nav}<main>{body}</main>"
        "<script src='/static/dashboard.js'></script></body></html>"
    )


def _signed_in(request: Request) -> str | None:
    """`owner (role)` of a valid session cookie; None to sign in."""
    token = request.cookies.get(COOKIE, "")
    principal = _service(request).tokens.verify(token) if token else None
    return None if principal is None else f"{principal.owner} ({principal.role.value})"


@router.get("/static/{name}")
def static(name: str) -> Response:
    if name not in ASSETS:
        return Response(status_code=404)
    return FileResponse(STATIC / name, media_type=ASSETS[name])


@router.get("/login")
def login_form(error: str = "") -> HTMLResponse:
    note = "<p class='error'>That token was not accepted.</p>" if error else ""
    return _page(
        "Sign in",
        "<h1>lorajobs</h1>" + note + "<form method='post' action='/login' class='login'>"
        "<label>API token <input type='password' name='token' id='token' autocomplete='off' "
        "required></label> <button type='submit' id='signin'>Sign in</button></form>"
        "<p class='hint'>Ask your platform team for a token "
        "(<code>lorajobs admin token create</code>).</p>",
    )


@router.post("/login")
async def login(request: Request) -> Response:
    svc = _service(request)
    who = request.client.host if request.client else "?"
    svc.throttle.check(who)
    form = parse_qs((await request.body()).decode("utf-8", "replace"))
    token = (form.get("token") or [""])[0].strip()
    if svc.tokens.verify(token) is None:
        svc.throttle.failed(who)
        return RedirectResponse("/login?error=1", status_code=303)
    out = RedirectResponse("/", status_code=303)
    secure = svc.config.secure_cookies
    out.set_cookie(
        COOKIE, token, max_age=SESSION_S, httponly=True, samesite="strict", secure=secure
    )
    # Double-submit CSRF: the script copies this (readable) cookie into X-CSRF-Token.
    out.set_cookie(
        CSRF_COOKIE, secrets.token_urlsafe(24), max_age=SESSION_S, samesite="strict", secure=secure
    )
    return out


@router.post("/logout")
def logout() -> Response:
    out = RedirectResponse("/login", status_code=303)
    out.delete_cookie(COOKIE)
    out.delete_cookie(CSRF_COOKIE)
    return out


def _signed_in_page(request: Request, title: str, body: str, page: str) -> Response:
    """A page for a signed-in user; the sign-in form for anyone else."""
    who = _signed_in(request)
    if who is None:
        return RedirectResponse("/login", status_code=303)
    return _page(title, body, who, page)


@router.get("/")
def queue_page(request: Request) -> Response:
    return _signed_in_page(
        request,
        "Queue",
        "<h1>Queue</h1><section id='cluster' class='cluster'></section>"
        "<table id='jobs'><thead><tr><th>ID</th><th>Name</th><th>Owner</th><th>State</th>"
        "<th>Progress</th><th>Loss</th><th>ETA</th><th>Waiting</th></tr></thead>"
        "<tbody></tbody></table>",
        "queue",
    )


@router.get("/jobs/{job_id}")
def job_page(job_id: str, request: Request) -> Response:
    jid = html.escape(job_id)
    return _signed_in_page(
        request,
        f"Job {job_id}",
        f"<h1 id='title' data-job='{jid}'>Job {jid}</h1>"
        "<p id='summary'></p><p><button id='cancel'>Cancel</button> <span id='msg'></span></p>"
        "<h2>Loss</h2><canvas id='loss' width='720' height='220'></canvas>"
        "<h2>Samples</h2><div id='samples'></div>"
        "<h2>Adapter</h2><ul id='files'></ul>"
        "<h2>Log</h2><pre id='log'></pre>"
        "<h2>Attempts</h2><table id='attempts'><tbody></tbody></table>"
        "<h2>Events</h2><table id='events'><tbody></tbody></table>"
        "<h2>Spec</h2><pre id='spec'></pre>",
        "job",
    )


@router.get("/adapters")
def adapters_page(request: Request) -> Response:
    return _signed_in_page(
        request,
        "Adapters",
        "<h1>Adapters</h1><table id='adapters'><thead><tr><th>Name</th><th>Job</th>"
        "<th>Owner</th><th>Size</th><th>Base model</th><th>Created</th></tr></thead>"
        "<tbody></tbody></table>",
        "adapters",
    )
