#!/usr/bin/env bash
# Embedding throughput through the whole daemon: sends COUNT messages with
# unique texts (no cache can help) as fast as ingest takes them, then watches
# clusterd_messages_embedded_total and reports the embedded messages per
# second between 10% and 90% of the total (the steady part).
#
#   loadtest/embed_bench.sh [COUNT]            default 6000
#
# Environment: the daemon's settings as usual (CLUSTERD__EMBEDDER__...), e.g.
#   CLUSTERD__EMBEDDER__LOCAL__THREADS=2 loadtest/embed_bench.sh
# Needs the stack (scripts/stack.sh up) and release builds of clusterd and
# loadtest; the daemon listens on 127.0.0.1:$LT_PORT (default 18081).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
COUNT="${1:-6000}"
BIN="${LT_BIN:-target/release}"
PORT="${LT_PORT:-18081}"
LOG_DIR="${LT_LOG_DIR:-target/loadtest}"
DB="lt_embed_$(date +%s)_$$"
# shellcheck source=loadtest/daemon.sh
source loadtest/daemon.sh

embedded() { curl -fs -H "Authorization: Bearer $CLUSTERD_TOKEN" "http://127.0.0.1:$PORT/metrics" | awk '$1 == "clusterd_messages_embedded_total" { print $2 }'; }

"$BIN/loadtest" --url "http://127.0.0.1:$PORT" --count "$COUNT" --texts unique --events false --drain 0 \
    >"$LOG_DIR/$DB.loadtest" 2>&1 &
sender=$!
lo=$((COUNT / 10)) hi=$((COUNT * 9 / 10))
t_lo="" t_hi="" n_lo=0 n_hi=0
while :; do
    n="$(embedded)"; n="${n:-0}"; t="$(date +%s.%N)"
    if [[ -z "$t_lo" ]] && ((n >= lo)); then t_lo=$t n_lo=$n; fi
    if ((n >= hi)); then t_hi=$t n_hi=$n; break; fi
    kill -0 "$daemon" 2>/dev/null || { echo "embed_bench: the daemon died" >&2; exit 1; }
    sleep 0.25
done
wait "$sender" || true
metrics="$(curl -fs -H "Authorization: Bearer $CLUSTERD_TOKEN" "http://127.0.0.1:$PORT/metrics")"
metric() { awk -v m="clusterd_$1" '$1 == m { print $2 }' <<<"$metrics"; }
awk -v a="$n_lo" -v b="$n_hi" -v ta="$t_lo" -v tb="$t_hi" -v calls="$(metric embed_batch_size_count)" \
    -v texts="$(metric embed_batch_size_sum)" -v tokens="$(metric embed_provider_tokens_total)" \
    -v sent="$(metric embed_provider_texts_total)" 'BEGIN {
    rate = (b - a) / (tb - ta); per_text = tokens / sent
    printf "embedded %d messages in %.2f s: %.0f messages/s (steady 10%%-90%% window), %.1f tokens per text = %.0f tokens/s; avg batch %.1f texts\n",
        b - a, tb - ta, rate, per_text, rate * per_text, texts / calls
}'
