"""API tokens: who a request is, and what it may do.

A token is `lj_<id>_<secret>`: the id names it in listings and events, the secret makes it
unguessable (256 random bits). Only the sha256 of the whole token is stored, so the database
holds nothing that opens the API; a token is printed once, when it is made. Revoking sets
`revoked_at`, and every request looks its token up again, so a revoked token stops at once.

Roles: a `member` acts on its own owner's jobs, adapters and data; a `viewer` only reads its
owner's; an `admin` sees and changes everything and makes tokens.
"""

from __future__ import annotations

import enum
import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, insert, select, update

from lorajobs.jobspecs.failures import InvalidInput
from lorajobs.orchestrator.db import TOKENS, write_engine
from lorajobs.storage.boundaries import OWNER_RE

PREFIX = "lj_"


class Role(str, enum.Enum):
    admin = "admin"
    member = "member"
    viewer = "viewer"


@dataclass(frozen=True)
class Principal:
    """Who made a request: the token's id, owner and role."""

    token_id: str
    owner: str
    role: Role

    @property
    def is_admin(self) -> bool:
        return self.role is Role.admin

    @property
    def can_write(self) -> bool:
        return self.role is not Role.viewer

    def sees(self, owner: str) -> bool:
        """Whether this principal may see `owner`'s jobs and data."""
        return self.is_admin or owner == self.owner

    @property
    def actor(self) -> str:
        """How events name who made a change: `token <id> (<owner>, <role>)`."""
        return f"token {self.token_id} ({self.owner}, {self.role.value})"


@dataclass(frozen=True)
class TokenInfo:
    """A token as listed: never its secret."""

    id: str
    owner: str
    role: str
    label: str | None
    created_at: datetime
    created_by: str | None
    revoked_at: datetime | None
    last_used_at: datetime | None


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class Tokens:
    """Create, list, revoke and check API tokens in the queue's database."""

    def __init__(self, engine: Engine, clock: Callable[[], datetime]) -> None:
        self.engine = engine
        self._writer = write_engine(engine)
        self._clock = clock

    def create(
        self, owner: str, role: Role | str, *, label: str | None = None, by: str | None = None
    ) -> tuple[str, TokenInfo]:
        """A new token: (the token, shown this once; its listing)."""
        if not OWNER_RE.match(owner):
            raise InvalidInput(
                f"--owner {owner!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a "
                "letter or digit"
            )
        try:
            role = Role(role)
        except ValueError:
            raise InvalidInput(
                f"--role must be one of: {', '.join(r.value for r in Role)} (got {role!r})"
            ) from None
        token_id = secrets.token_hex(6)
        token = f"{PREFIX}{token_id}_{secrets.token_urlsafe(32)}"
        row = dict(
            id=token_id,
            owner=owner,
            role=role.value,
            label=label,
            secret_hash=digest(token),
            created_at=self._clock(),
            created_by=by,
        )
        with self._writer.begin() as conn:
            conn.execute(insert(TOKENS).values(**row))
        return token, self.get(token_id)

    def get(self, token_id: str) -> TokenInfo:
        with self.engine.connect() as conn:
            row = conn.execute(select(TOKENS).where(TOKENS.c.id == token_id)).first()
        if row is None:
            raise InvalidInput(f"no token {token_id!r}")
        return _info(row)

    def list(self, *, owner: str | None = None) -> list[TokenInfo]:
        query = select(TOKENS).order_by(TOKENS.c.created_at, TOKENS.c.id)
        if owner is not None:
            query = query.where(TOKENS.c.owner == owner)
        with self.engine.connect() as conn:
            return [_info(r) for r in conn.execute(query)]

    def revoke(self, token_id: str) -> TokenInfo:
        """Revoke a token (its id, or the token itself); at once and for good."""
        if token_id.startswith(PREFIX):
            token_id = token_id[len(PREFIX) :].split("_", 1)[0]
        with self._writer.begin() as conn:
            conn.execute(
                update(TOKENS)
                .where(TOKENS.c.id == token_id, TOKENS.c.revoked_at.is_(None))
                .values(revoked_at=self._clock())
            )
        return self.get(token_id)

    def verify(self, token: str) -> Principal | None:
        """The principal of a valid, unrevoked token; None otherwise."""
        if not token.startswith(PREFIX) or len(token) > 200:
            return None
        with self.engine.connect() as conn:
            row = conn.execute(
                select(TOKENS.c.id, TOKENS.c.owner, TOKENS.c.role).where(
                    TOKENS.c.secret_hash == digest(token), TOKENS.c.revoked_at.is_(None)
                )
            ).first()
        if row is None:
            return None
        return Principal(token_id=row.id, owner=row.owner, role=Role(row.role))


def _info(row: object) -> TokenInfo:
    m = row._mapping  # type: ignore[attr-defined]
    return TokenInfo(**{k: m[k] for k in TokenInfo.__dataclass_fields__})
