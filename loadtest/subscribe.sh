#!/usr/bin/env bash
# Live delivery under load: subscribers on one daemon, the ingest stream on
# the same or another one, on a fresh database.
#
#   loadtest/subscribe.sh [loadtest args...]
#   e.g. loadtest/subscribe.sh --subscribers 10000 --creators 1000 --hot-dashboards 2000 \
#            --rate 500 --duration 30 --events false
#
# SUB_INSTANCES=2 starts a second daemon on the same database and Redis:
# the subscribers connect to the first, the ingest goes to the second, so
# every event crosses instances (Redis pub/sub, or the log poll while Redis
# is away). SUB_REDIS_URL overrides the stack's Redis; SUB_STOP_REDIS_PID
# is a redis-server of the caller's own (never the shared one) that is
# stopped once the daemons are up, to measure the log fallback.
#
# The daemons run with the hash embedder (the model is not what is
# measured here) and the open-files limit raised to its hard limit (each
# subscriber is a socket of the daemon's). Needs the local stack and
# release builds (cargo build --release -p clusterd -p loadtest).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
BIN="${LT_BIN:-target/release}"
PORT="${LT_PORT:-0}"
LOG_DIR="${LT_LOG_DIR:-target/loadtest}"
DB="lt_sub_$(date +%s)_$$"

ulimit -n "$(ulimit -Hn)"
export CLUSTERD__EMBEDDER__PROVIDER="${CLUSTERD__EMBEDDER__PROVIDER:-hash}"
# shellcheck source=loadtest/daemon.sh
LT_DEFER_DAEMON=1 source loadtest/daemon.sh # the database only; the daemon below
if [[ -n "${SUB_REDIS_URL:-}" ]]; then export CLUSTERD__REDIS__URL="$SUB_REDIS_URL"; fi
start_daemon
first_pid="$daemon" first_port="$PORT"

ingest_url="http://127.0.0.1:$first_port"
if [[ "${SUB_INSTANCES:-1}" == 2 ]]; then
    port_file="$LOG_DIR/$DB.port2"
    CLUSTERD__DATABASE__URL="$DB_URL" CLUSTERD__SERVER__BIND="127.0.0.1:0" \
        CLUSTERD__SERVER__PORT_FILE="$port_file" "$BIN/clusterd" serve >>"$LOG_DIR/$DB.2.log" 2>&1 &
    second=$!
    trap 'kill -TERM "$second" 2>/dev/null || true; wait "$second" 2>/dev/null || true; cleanup' EXIT
    for _ in $(seq 1 100); do
        [[ -s "$port_file" ]] && curl -fs "http://127.0.0.1:$(<"$port_file")/readyz" >/dev/null 2>&1 && break
        sleep 0.2
    done
    ingest_url="http://127.0.0.1:$(<"$port_file")"
fi
if [[ -n "${SUB_STOP_REDIS_PID:-}" ]]; then
    kill -TERM "$SUB_STOP_REDIS_PID"
    echo "subscribe: stopped redis-server $SUB_STOP_REDIS_PID; events go through the log" >&2
fi

echo "subscribe: database $DB; subscribers on $first_port (pid $first_pid), ingest to $ingest_url" >&2
/usr/bin/time -f "loadtest-cpu %U %S %e" -o "$LOG_DIR/$DB.time" \
    "$BIN/loadtest" --url "$ingest_url" --subscribe-url "http://127.0.0.1:$first_port" \
    --daemon-pid "$first_pid" "$@"
metrics="$(curl -fs -H "Authorization: Bearer $CLUSTERD_TOKEN" "http://127.0.0.1:$first_port/metrics")"
echo "--- subscribers' daemon: delivery histogram (commit to hand-over to the sessions), by path"
grep -E '^clusterd_event_delivery_seconds_(count|sum)|^clusterd_ws_(slow_closed|stalled)_total|^clusterd_fanout_(received|polls)_total' <<<"$metrics" || true
read -r _ lt_user lt_sys lt_wall <"$LOG_DIR/$DB.time"
echo "loadtest CPU             ${lt_user} s user + ${lt_sys} s system over ${lt_wall} s"
