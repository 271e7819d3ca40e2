#!/usr/bin/env bash
# Make sure the PostgreSQL server binaries (initdb, pg_ctl, postgres) are on this machine, for
# the integration tests, which start their own throw-away server. Fast and silent when they are
# there; otherwise installs Debian's `postgresql` package. Idempotent.
set -euo pipefail

have_initdb() {
    compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null && return 0
    [ -n "${LORAJOBS_PG_BIN:-}" ] && [ -x "$LORAJOBS_PG_BIN/initdb" ] && return 0
    command -v initdb >/dev/null 2>&1
}

if have_initdb; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-postgres: no initdb found and no apt-get to install it;" \
         "install the PostgreSQL server (>= 13) or set LORAJOBS_PG_BIN" >&2
    exit 1
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    SUDO=(sudo)
fi
echo "ensure-postgres: installing the PostgreSQL server binaries (apt-get install postgresql)" >&2
"${SUDO[@]}" apt-get update -q
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql

if ! have_initdb; then
    echo "ensure-postgres: postgresql installed but initdb is still missing" >&2
    exit 1
fi
