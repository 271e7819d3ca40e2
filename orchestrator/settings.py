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
| `LORAJOBS_INFRA_RETRIES` | 3 | retries after lost nodes / preemption / crashed workers (a drained node's attempts cost none) |
| `LORAJOBS_USER_RETRIES` | 0 | retries after user errors (bad data, bad spec) |
| `LORAJOBS_RETRY_BACKOFF_S` | 2 | first backoff; doubles per retry of that kind |
| `LORAJOBS_RETRY_BACKOFF_MAX_S` | 60 | backoff cap |
| `LORAJOBS_PRICES` | none | `A100=1.29,H100=2.49,cpu=0.05`: $/GPU-hour by type, $/core-hour |
| `LORAJOBS_NODE_FAULT_S` | 300 | how long a node that failed an attempt itself (no usable GPU, no bucket credentials) gets no jobs |
| `LORAJOBS_PREEMPT_MARGIN` | 1 | a queued job may preempt running jobs this many priority levels below it (`off`: never) |
| `LORAJOBS_MIN_RUNTIME_BEFORE_PREEMPT_S` | 600 | a job is preempted only after running this long, and never twice within it |
| `LORAJOBS_CHECKPOINT_GRACE_S` | 60 | seconds a preempted job is expected to take to checkpoint and stop |
| `LORAJOBS_FAIRSHARE_HALFLIFE` | 7d | half-life of the GPU-hours fair share counts (`7d`, `12h`, or seconds) |
| `LORAJOBS_FAIRSHARE_SHARES` | 1 each | e.g. `acme=3,beta=1`: owners' shares (a bare number: everyone else's) |
| `LORAJOBS_RESERVE` | on | `off`: no reservation for the job at the head (big jobs then rely on aging) |
| `LORAJOBS_BACKFILL_SAFETY` | 1.5 | a job starts on a reserved node only if its estimate times this ends before the reservation |
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
from lorajobs.orchestrator.shares import DEFAULT_HALFLIFE_S, Shares

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
    #: Fair share: the owners' shares and the half-life of the GPU-hours counted.
    shares: Shares = field(default_factory=Shares)
    halflife_s: float = DEFAULT_HALFLIFE_S
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
                **_preemption(env),
            ),
            prices=prices,
            autoscale=autoscale,
            takeover_grace_s=10 * lease_s,
            node_fault_s=_float(env, "LORAJOBS_NODE_FAULT_S", 300.0),
            shares=parse_shares(env.get("LORAJOBS_FAIRSHARE_SHARES")),
            halflife_s=parse_duration(
                "LORAJOBS_FAIRSHARE_HALFLIFE",
                env.get("LORAJOBS_FAIRSHARE_HALFLIFE"),
                DEFAULT_HALFLIFE_S,
            ),
        )


def _preemption(env: Mapping[str, str]) -> dict[str, object]:
    """The policy's preemption and reservation knobs from the environment."""
    margin_text = env.get("LORAJOBS_PREEMPT_MARGIN", "").strip().lower()
    margin: int | None = 1
    if margin_text in ("off", "none", "no"):
        margin = None
    elif margin_text:
        margin = int(_float(env, "LORAJOBS_PREEMPT_MARGIN", 1.0, minimum=1.0))
    reserve = env.get("LORAJOBS_RESERVE", "on").strip().lower() or "on"
    if reserve not in ("on", "off"):
        raise InvalidInput(f"LORAJOBS_RESERVE={reserve!r}: use on or off")
    return {
        "preempt_margin": margin,
        "min_runtime_s": _float(env, "LORAJOBS_MIN_RUNTIME_BEFORE_PREEMPT_S", 600.0),
        "checkpoint_s": _float(env, "LORAJOBS_CHECKPOINT_GRACE_S", 60.0),
        "reserve": reserve == "on",
        "backfill_safety": _float(env, "LORAJOBS_BACKFILL_SAFETY", 1.5, minimum=1.0),
    }


def parse_shares(text: str | None) -> Shares:
    """`"acme=3,beta=1"` -> Shares; a bare number is every other owner's share (default 1)."""
    default, per_owner = parse_limits("LORAJOBS_FAIRSHARE_SHARES", text)
    for owner, share in {"": default or 1.0, **per_owner}.items():
        if share <= 0:
            raise InvalidInput(
                f"LORAJOBS_FAIRSHARE_SHARES: {owner or 'the default'} share must be > 0"
            )
    return Shares(1.0 if default is None else default, per_owner)


def parse_duration(key: str, text: str | None, default: float) -> float:
    """`7d`, `12h`, `30m` or seconds -> seconds (> 0)."""
    raw = (text or "").strip().lower()
    if not raw:
        return default
    unit = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}.get(raw[-1])
    try:
        value = float(raw[:-1]) * unit if unit else float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise InvalidInput(f"{key}={text!r} is not a duration (e.g. 7d, 12h, 3600)")
    return value
