"""Service commands: `server` (the HTTP API and dashboard), `admin token create|list|revoke`,
`login` and `logout`."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import typer

from lorajobs.jobspecs.failures import InvalidInput
from lorajobs.orchestrator.cli import context as ctx


def register(app: typer.Typer) -> None:
    """Add the service commands to `app`."""
    app.command()(server)
    app.command()(login)
    app.command()(logout)
    admin = typer.Typer(help="Administer a shared deployment.", no_args_is_help=True)
    tokens = typer.Typer(help="API tokens: who may use the server.", no_args_is_help=True)
    app.add_typer(admin, name="admin")
    admin.add_typer(tokens, name="token")
    tokens.command("create")(token_create)
    tokens.command("list")(token_list)
    tokens.command("revoke")(token_revoke)


def server(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="Port to listen on."),
    ssl_certfile: str | None = typer.Option(None, "--ssl-certfile", help="TLS certificate."),
    ssl_keyfile: str | None = typer.Option(None, "--ssl-keyfile", help="TLS private key."),
    workers: int = typer.Option(1, "--workers", min=1, max=64, help="Server processes."),
) -> None:
    """Serve the HTTP API (/v1) and the dashboard over this deployment's queue and bucket."""
    import uvicorn

    from lorajobs.orchestrator.service.app import create_app
    from lorajobs.orchestrator.service.core import ServiceConfig

    ctx.log_to_stderr()
    settings = ctx.settings()
    try:
        config = ServiceConfig.from_env(settings)
    except ValueError as err:
        raise InvalidInput(str(err)) from None
    queue = ctx.open_queue(settings)  # creates or checks the schema once, before any worker
    # Several processes: each builds its own app (uvicorn imports the factory in each).
    app: Any = "lorajobs.orchestrator.service.app:from_env" if workers > 1 else None
    app = app or create_app(settings, config, queue)
    ctx.err.print(
        f"lorajobs server on http{'s' if ssl_certfile else ''}://{host}:{port} "
        f"(database {settings.redacted_database_url()}, bucket {settings.bucket})",
        markup=False,
        highlight=False,
    )
    uvicorn.run(
        app,
        host=host,
        port=port,
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
        log_level="warning",
        server_header=False,
        proxy_headers=True,
        workers=workers if workers > 1 else None,
        factory=workers > 1,
    )


def _tokens():  # type: ignore[no-untyped-def]
    from lorajobs.orchestrator.tokens import Tokens

    queue = ctx.open_queue(ctx.settings())
    return Tokens(queue.engine, queue.clock)


def token_create(
    owner: str = typer.Option(..., "--owner", help="Whose jobs and data the token acts on."),
    role: str = typer.Option("member", "--role", help="member, viewer or admin."),
    label: str | None = typer.Option(None, "--label", help="A note: who or what it is for."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Make an API token; it is printed once and stored only as a hash."""
    token, info = _tokens().create(owner, role, label=label, by=os.environ.get("USER"))
    if as_json:
        print(json.dumps({"token": token, "id": info.id, "owner": info.owner, "role": info.role}))
        return
    ctx.err.print(
        f"token {info.id} for {info.owner} ({info.role}); shown once, keep it safe:", markup=False
    )
    print(token)


def token_list(
    owner: str | None = typer.Option(None, "--owner", help="Only this owner's tokens."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List tokens (never their secrets)."""
    import dataclasses

    from lorajobs.orchestrator import views

    infos = _tokens().list(owner=owner)
    if as_json:
        print(views.dumps([dataclasses.asdict(i) for i in infos]))
        return
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for col in ("ID", "OWNER", "ROLE", "LABEL", "CREATED", "REVOKED"):
        table.add_column(col, no_wrap=True)
    for i in infos:
        revoked = i.revoked_at.isoformat(timespec="seconds") if i.revoked_at else "-"
        created = i.created_at.isoformat(timespec="seconds")
        table.add_row(i.id, i.owner, i.role, i.label or "-", created, revoked)
    ctx.out.print(table)


def token_revoke(
    token_id: str = typer.Argument(..., help="The token's id (or the token)."),
) -> None:
    """Revoke a token: it stops working at once."""
    info = _tokens().revoke(token_id)
    ctx.err.print(f"token {info.id} ({info.owner}, {info.role}) revoked", markup=False)


def login(
    url: str = typer.Argument(..., help="The server, e.g. https://lorajobs.example.com"),
    token: str | None = typer.Option(
        None, "--token", help="The API token (default: read from stdin or asked for)."
    ),
) -> None:
    """Use a lorajobs server from now on: check the token, keep it for later commands."""
    from lorajobs.orchestrator.cli.remote import ApiClient, save_login

    if token is None:
        token = (
            sys.stdin.readline().strip()
            if not sys.stdin.isatty()
            else typer.prompt("API token", hide_input=True)
        )
    if not url.startswith(("http://", "https://")):
        raise InvalidInput(f"URL: {url!r} must start with http:// or https://")
    who = ApiClient(url, token).get("/v1/whoami")
    path = save_login(url, token)
    ctx.err.print(
        f"logged in to {url} as {who['owner']} ({who['role']}); token kept in {path}",
        markup=False,
        highlight=False,
    )


def logout() -> None:
    """Forget the server and token `login` kept: back to the embedded single-user mode."""
    from lorajobs.orchestrator.cli.remote import credentials_path

    path = credentials_path()
    path.unlink(missing_ok=True)
    ctx.err.print(f"logged out ({path} removed)", markup=False, highlight=False)
