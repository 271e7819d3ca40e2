#!/usr/bin/env bash
# `make test`: make sure the PostgreSQL server binaries and Chromium exist (installing them from
# Debian's packages if missing), then run the whole suite. The tests themselves start PostgreSQL,
# a SeaweedFS S3 server and lorajobs servers on 127.0.0.1 and stop them by PID.
set -euo pipefail
BIN=${1:?usage: run-tests.sh VENV_BIN [pytest args]}
shift
here=$(cd "$(dirname "$0")" && pwd)
bash "$here/ensure-postgres.sh"
bash "$here/ensure-chromium.sh"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled
# Every test gets its own LORAJOBS_HOME; this keeps anything that slips through out of ~.
export LORAJOBS_HOME=${LORAJOBS_HOME:-$(mktemp -d /tmp/lorajobs-test-home.XXXXXX)}
set +e
# --durations: the slowest tests, printed where a suite that grows shows where.
"$BIN/python" -m pytest -p no:cacheprovider --durations=15 "$@"
rc=$?
set -e
# pytest's 5 means "no tests ran": that is a failure for CI, not a pass.
exit $rc
