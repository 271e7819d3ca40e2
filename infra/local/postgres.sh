#!/usr/bin/env bash
# A local PostgreSQL for trying lorajobs at scale on one machine (127.0.0.1 only).
#
#   infra/local/postgres.sh start [DIR] [PORT]   initdb (once) + start; prints the database URL
#   infra/local/postgres.sh stop  [DIR]          fast shutdown of that server (by its data dir)
#
# DIR defaults to $LORAJOBS_HOME/postgres (~/.lorajobs/postgres). Use the printed URL as
# LORAJOBS_DATABASE_URL (then `lorajobs db upgrade`), or as LORAJOBS_TEST_PG_URL for the tests.
# Under root the server runs as the `postgres` user (PostgreSQL refuses root).
set -euo pipefail

cmd=${1:-}
dir=${2:-${LORAJOBS_HOME:-$HOME/.lorajobs}/postgres}
port=${3:-54329}

bin=${LORAJOBS_PG_BIN:-}
if [ -z "$bin" ]; then
    newest=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)
    if [ -n "$newest" ]; then
        bin=$newest
    elif command -v initdb >/dev/null 2>&1; then
        bin=$(dirname "$(readlink -f "$(command -v initdb)")")
    else
        echo "no PostgreSQL server binaries: run infra/local/ensure-postgres.sh" >&2
        exit 1
    fi
fi

as_pg=()
if [ "$(id -u)" -eq 0 ]; then
    as_pg=(runuser -u postgres --)
fi

case "$cmd" in
start)
    mkdir -p "$dir"
    if [ ! -f "$dir/data/PG_VERSION" ]; then
        password=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
        printf '%s\n' "$password" >"$dir/password"
        chmod 600 "$dir/password"
        [ "$(id -u)" -eq 0 ] && chown -R postgres: "$dir"
        "${as_pg[@]}" "$bin/initdb" -D "$dir/data" -U postgres --auth-local=trust \
            --auth-host=scram-sha-256 --pwfile="$dir/password" --encoding=UTF8 --locale=C >/dev/null
    fi
    if ! "${as_pg[@]}" "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
        "${as_pg[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 -o \
            "-c listen_addresses=127.0.0.1 -p $port -c unix_socket_directories=$dir" start >/dev/null
    fi
    # Over the Unix socket in DIR (trusted locally), so no password is needed here.
    if ! "${as_pg[@]}" "$bin/psql" -h "$dir" -p "$port" -U postgres -d postgres -tAc \
        "SELECT 1 FROM pg_database WHERE datname='lorajobs'" </dev/null | grep -q 1; then
        "${as_pg[@]}" "$bin/createdb" -h "$dir" -p "$port" -U postgres lorajobs
    fi
    echo "postgresql://postgres:$(cat "$dir/password")@127.0.0.1:$port/lorajobs"
    ;;
stop)
    "${as_pg[@]}" "$bin/pg_ctl" -D "$dir/data" -m fast -w stop
    ;;
*)
    echo "usage: $0 start|stop [DIR] [PORT]" >&2
    exit 2
    ;;
esac
