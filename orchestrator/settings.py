"""Where lorajobs keeps its state, read once from the environment and passed around.

There is no module-level settings object: callers build one with `Settings.from_env()` and pass
it (or what they need from it) on, so tests construct their own without monkeypatching.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

# Query parameters that carry secrets in libpq / SQLAlchemy URLs (`?password=...`).
_SECRET_QUERY_KEYS = frozenset({"password", "sslpassword", "passfile"})


def redact_url(url: str) -> str:
    """`url` with any password (in the user-info part or the query) replaced by `***`.

    Used for everything that may end up in logs, events or error messages: credentials in a
    database URL must never be printed. Errs on the side of hiding too much: a password with an
    unescaped '/' or '@' is still hidden.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    at = rest.rfind("@")
    if at >= 0:
        user, colon, _password = rest[:at].partition(":")
        if colon:
            rest = f"{user}:***{rest[at:]}"
    rest, qsep, query = rest.partition("?")
    if qsep:
        query, hsep, fragment = query.partition("#")
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k.lower() in _SECRET_QUERY_KEYS for k, _ in pairs):
            query = urlencode(
                [(k, "***" if k.lower() in _SECRET_QUERY_KEYS else v) for k, v in pairs],
                safe="*",
            )
        query = query + hsep + fragment
    return f"{scheme}://{rest}{qsep}{query}"


def _get(env: Mapping[str, str], key: str) -> str | None:
    # An exported-but-empty variable (`LORAJOBS_BUCKET=`) means "use the default", as in most CLIs.
    value = env.get(key, "").strip()
    return value or None


@dataclass(frozen=True)
class Settings:
    """Resolved configuration of one lorajobs process."""

    home: Path
    database_url: str
    ray_address: str | None
    bucket: str
    cache_dir: Path

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read `LORAJOBS_*` variables from `env` (default: `os.environ`), filling defaults.

        Defaults are the embedded setup: everything under `LORAJOBS_HOME` (`~/.lorajobs`).
        """
        env = os.environ if env is None else env
        home_raw = _get(env, "LORAJOBS_HOME")
        home = Path(home_raw).expanduser() if home_raw else Path("~/.lorajobs").expanduser()
        home = home.absolute()
        cache_raw = _get(env, "LORAJOBS_CACHE_DIR")
        return cls(
            home=home,
            database_url=_get(env, "LORAJOBS_DATABASE_URL") or f"sqlite:///{home / 'lorajobs.db'}",
            ray_address=_get(env, "LORAJOBS_RAY_ADDRESS"),
            # Not Path.as_uri(): storage reads file:// paths verbatim, without percent-decoding.
            bucket=_get(env, "LORAJOBS_BUCKET") or f"file://{(home / 'bucket').as_posix()}",
            cache_dir=Path(cache_raw).expanduser().absolute() if cache_raw else home / "cache",
        )

    def redacted_database_url(self) -> str:
        """The database URL with its password hidden: the only form fit for logs and events."""
        return redact_url(self.database_url)

    def __repr__(self) -> str:
        # The generated repr would print the database password; settings do get logged.
        return (
            f"Settings(home={str(self.home)!r}, database_url={self.redacted_database_url()!r}, "
            f"ray_address={self.ray_address!r}, bucket={self.bucket!r}, "
            f"cache_dir={str(self.cache_dir)!r})"
        )
