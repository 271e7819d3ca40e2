"""Owners' fair-share weights (`LORAJOBS_FAIRSHARE_SHARES`) and the usage half-life's default.

Apart from `fairshare` so that `settings` can parse them without importing the ledger (which
reads the database: `db` imports `settings`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

#: `LORAJOBS_FAIRSHARE_HALFLIFE`'s default: usage halves every 7 days.
DEFAULT_HALFLIFE_S = 7 * 86400.0


@dataclass(frozen=True)
class Shares:
    """Owners' shares: `per_owner` overrides `default`."""

    default: float = 1.0
    per_owner: Mapping[str, float] = field(default_factory=dict)

    def of(self, owner: str) -> float:
        return self.per_owner.get(owner, self.default)
