#!/usr/bin/env bash
# The query cache's benchmark (BENCHMARKS.md, "Query cache"): one fresh
# database, three creators prefilled (PREFILL messages each), then ROUNDS
# rounds of three daemon variants on it, each timing
#   - sequential reads: `loadtest --mode read --connections 1` (list
#     clusters and cluster detail alternately),
#   - the seed's mix: `loadtest --mode mix --connections MIX_CONNECTIONS`
#     (8 ingests : 2 list clusters over the three creators).
# Variants: cache off; cache on with the Redis SET awaited
# (cache.write_behind = false); cache on, written behind (the default).
# Release binaries, auth on (an admin token), the `hash` embedder (the
# model's CPU would drown the reads), Redis set for every variant.
#
#   loadtest/cache_bench.sh               # ROUNDS=3 SECS=15
#
# Needs the stack and `cargo build --release -p clusterd -p loadtest`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BIN="${LT_BIN:-target/release}"
PORT="${LT_PORT:-0}"
LOG_DIR="${LT_LOG_DIR:-target/loadtest}"
DB="lt_cache_$(date +%s)_$$"
ROUNDS=${ROUNDS:-3}
SECS=${SECS:-15}
PREFILL=${PREFILL:-200}
MIX_CONNECTIONS=${MIX_CONNECTIONS:-8}
export CLUSTERD__EMBEDDER__PROVIDER=hash CLUSTERD__AUTH__ENABLED=true CLUSTERD__LOG__FILTER=warn
LT_DEFER_DAEMON=1
# shellcheck source=loadtest/daemon.sh
source loadtest/daemon.sh
export CLUSTERD__REDIS__URL="$CLUSTERD_TEST_REDIS_URL"

stop_daemon() { kill -TERM "$daemon"; wait "$daemon" || true; daemon=""; }
lt() { "$BIN/loadtest" --url "http://127.0.0.1:$PORT" --creator-prefix "cb-$DB-" --creators 3 "$@"; }

start_daemon
lt --mode read --prefill "$PREFILL" --count 1 >/dev/null
stop_daemon

for round in $(seq "$ROUNDS"); do
    for variant in off awaited behind; do
        case $variant in
            off) export CLUSTERD__CACHE__ENABLED=false CLUSTERD__CACHE__WRITE_BEHIND=true ;;
            awaited) export CLUSTERD__CACHE__ENABLED=true CLUSTERD__CACHE__WRITE_BEHIND=false ;;
            behind) export CLUSTERD__CACHE__ENABLED=true CLUSTERD__CACHE__WRITE_BEHIND=true ;;
        esac
        start_daemon
        echo "== round $round, cache $variant"
        lt --mode read --connections 1 --duration "$SECS" | grep -E "operations|list clusters|cluster detail|cache|errors"
        lt --mode mix --connections "$MIX_CONNECTIONS" --duration "$SECS" | grep -E "operations|list clusters|ingest|cache|errors"
        stop_daemon
    done
done
