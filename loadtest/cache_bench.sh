#!/usr/bin/env bash
# The query cache's benchmark (BENCHMARKS.md, "Query cache (issue 13)"): a
# fresh database seeded with 600 messages of three creators, then, for each
# of ROUNDS rounds, a daemon with the cache off and one with it on (Redis
# and the in-process LRU), each timing 3,000 sequential lists and then the
# seed's mix (8 ingests : 2 lists, 150 times). Needs the stack
# (`eval "$(scripts/stack.sh env)"`) and a built target/debug/clusterd;
# drops its database at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
admin=${CLUSTERD_TEST_DATABASE_URL:?run eval "\$(scripts/stack.sh env)" first}
redis=${CLUSTERD_TEST_REDIS_URL:?run eval "\$(scripts/stack.sh env)" first}
db=clusterd_bench_cache_$(date +%s)
work=$(mktemp -d)
psql "$admin" -qc "CREATE DATABASE $db"
trap 'psql "$admin" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)"; rm -rf "$work"' EXIT
start() {
  rm -f "$work/port"
  env -i PATH="$PATH" HOME="$HOME" CLUSTERD_CONFIG_DIR=config CLUSTERD__DATABASE__URL="${admin%/*}/$db" \
    CLUSTERD__SERVER__BIND=127.0.0.1:0 CLUSTERD__SERVER__PORT_FILE="$work/port" CLUSTERD__EMBEDDER__PROVIDER=hash \
    CLUSTERD__AUTH__ENABLED=false CLUSTERD__LOG__FILTER=error "$@" target/debug/clusterd serve 2>>"$work/log" &
  pid=$!
  for _ in $(seq 200); do [ -s "$work/port" ] && break; sleep 0.1; done
  port=$(cat "$work/port")
}
stop() { kill "$pid"; wait "$pid" || true; }
start; python3 loadtest/cache_bench.py "$port" seed 0; sleep 2; stop
for round in $(seq "$ROUNDS"); do
  for mode in off on; do
    # Redis in both, so that only the query cache differs (the embedder uses Redis too).
    if [ "$mode" = off ]; then start CLUSTERD__CACHE__ENABLED=false CLUSTERD__REDIS__URL="$redis"; else start CLUSTERD__REDIS__URL="$redis"; fi
    echo "== round $round, cache $mode"
    python3 loadtest/cache_bench.py "$port" list 3000
    python3 loadtest/cache_bench.py "$port" mix 150
    stop
  done
done
