"""Everything lorajobs reads from the environment, read once and passed around.

`Settings` says where state lives (home, database, Ray, bucket); `ControllerConfig` holds the
controller's knobs. There is no module-level settings object: callers build one with
`Settings.from_env()` / `ControllerConfig.from_env()` and pass it (or what they need from it)
on, so tests construct their own without monkeypatching.

The controller's knobs:

| variable | default | meaning |
|---|---|---|
| `LORAJOBS_POLL_S` | 0.5 | seconds between controller passes |
| `LORAJOBS_LEASE_S` | 30 | a controller's lease on its jobs; renewed every third of it |
| `LORAJOBS_AGING_S` | 600 | seconds of waiting worth one priority level (0: no aging) |
| `LORAJOBS_OWNER_MAX_JOBS` | unlimited | e.g. `4,acme=10`: 4 concurrent jobs per owner, acme 10 |
| `LORAJOBS_OWNER_MAX_GPUS` | unlimited | e.g. `2,acme=8`, GPUs held at once per owner |
| `LORAJOBS_INFRA_RETRIES` | 3 | retries after lost nodes / preemption / crashed workers |
| `LORAJOBS_USER_RETRIES` | 0 | retries after user errors (bad data, bad spec) |
| `LORAJOBS_RETRY_BACKOFF_S` | 2 | first backoff; doubles per retry of that kind |
| `LORAJOBS_RETRY_BACKOFF_MAX_S` | 60 | backoff cap |
| `LORAJOBS_PRICES` | none | `A100=1.29,H100=2.49,cpu=0.05`: $/GPU-hour by type, $/core-hour |
| `LORAJOBS_NODE_FAULT_S` | 300 | how long a node that failed an attempt itself (no usable GPU, no bucket credentials) gets no jobs |
| `LORAJOBS_AUTOSCALE` | auto | `auto`: tell Ray's autoscaler the demand when on a cluster; `off` |
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

from lorajobs.jobspecs.failures import InvalidInput
from lorajobs.orchestrator.cost import parse_prices
from lorajobs.orchestrator.recovery import RetryPolicy
from lorajobs.orchestrator.scheduler import OwnerLimits, Policy

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


def _float(env: Mapping[str, str], key: str, default: float, *, minimum: float = 0.0) -> float:
    raw = env.get(key, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise InvalidInput(f"{key}={raw!r} is not a number") from None
    if value < minimum:
        raise InvalidInput(f"{key}={raw!r} must be at least {minimum:g}")
    return value


def parse_limits(key: str, text: str | None) -> tuple[float | None, dict[str, float]]:
    """`"4,acme=10"` -> (4, {"acme": 10}): a bare number for everyone, `owner=N` overrides."""
    default: float | None = None
    per_owner: dict[str, float] = {}
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, value = item.rpartition("=") if "=" in item else ("", "", item)
        try:
            number = float(value)
        except ValueError:
            number = -1.0
        if number < 0 or (sep and not name.strip()):
            raise InvalidInput(f"{key}: {item!r} is not N or OWNER=N (e.g. 4,acme=10)")
        if sep:
            per_owner[name.strip()] = number
        else:
            default = number
    return default, per_owner


@dataclass(frozen=True)
class ControllerConfig:
    poll_s: float = 0.5
    lease_s: float = 30.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    policy: Policy = field(default_factory=Policy)
    prices: Mapping[str, float] = field(default_factory=dict)
    #: Oldest queued jobs read per (priority, owner, shape) class each round.
    per_class: int = 64
    #: "auto" (on when connected to a cluster) or "off".
    autoscale: str = "auto"
    #: An expired lease whose controller is still connected to Ray (stuck, or cut off from the
    #: database) is taken over only after this much longer; a dead one's at once.
    takeover_grace_s: float = 300.0
    #: A node whose own environment failed an attempt (no usable GPU, no bucket credentials)
    #: gets no jobs for this long.
    node_fault_s: float = 300.0
    #: "auto": queued jobs may share an attempt (orchestrator/packing.py); "off": never.
    packing: str = "off"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ControllerConfig:
        env = os.environ if env is None else env
        max_jobs, jobs_per_owner = parse_limits(
            "LORAJOBS_OWNER_MAX_JOBS", env.get("LORAJOBS_OWNER_MAX_JOBS")
        )
        max_gpus, gpus_per_owner = parse_limits(
            "LORAJOBS_OWNER_MAX_GPUS", env.get("LORAJOBS_OWNER_MAX_GPUS")
        )
        prices = parse_prices(env.get("LORAJOBS_PRICES"))
        lease_s = _float(env, "LORAJOBS_LEASE_S", 30.0, minimum=1.0)
        autoscale = env.get("LORAJOBS_AUTOSCALE", "auto").strip().lower() or "auto"
        if autoscale not in ("auto", "off"):
            raise InvalidInput(f"LORAJOBS_AUTOSCALE={autoscale!r}: use auto or off")
        packing = env.get("LORAJOBS_PACKING", "off").strip().lower() or "off"
        if packing not in ("auto", "off"):
            raise InvalidInput(f"LORAJOBS_PACKING={packing!r}: use auto or off")
        return cls(
            packing=packing,
            poll_s=_float(env, "LORAJOBS_POLL_S", 0.5, minimum=0.01),
            lease_s=lease_s,
            retry=RetryPolicy(
                infra_retries=int(_float(env, "LORAJOBS_INFRA_RETRIES", 3)),
                user_retries=int(_float(env, "LORAJOBS_USER_RETRIES", 0)),
                backoff_s=_float(env, "LORAJOBS_RETRY_BACKOFF_S", 2.0),
                backoff_max_s=_float(env, "LORAJOBS_RETRY_BACKOFF_MAX_S", 60.0),
            ),
            policy=Policy(
                aging_s=_float(env, "LORAJOBS_AGING_S", 600.0),
                limits=OwnerLimits(
                    max_jobs=None if max_jobs is None else int(max_jobs),
                    max_gpus=max_gpus,
                    per_owner_jobs={k: int(v) for k, v in jobs_per_owner.items()},
                    per_owner_gpus=gpus_per_owner,
                ),
                prices=prices,
            ),
            prices=prices,
            autoscale=autoscale,
            takeover_grace_s=10 * lease_s,
            node_fault_s=_float(env, "LORAJOBS_NODE_FAULT_S", 300.0),
        )
