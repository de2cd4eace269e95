#!/usr/bin/env bash
# Runs one load-test scenario against a fresh daemon on a fresh database,
# then prints the daemon's pipeline metrics and where the CPU went.
#
#   loadtest/bench.sh [loadtest args...]      e.g. loadtest/bench.sh --duration 20
#
# Needs the local stack (scripts/stack.sh up) and release builds of both
# binaries (cargo build --release -p clusterd -p loadtest). The daemon listens
# on 127.0.0.1:$LT_PORT (default 18080, so a `make run` daemon on 8080 is left
# alone); its database lt_<time>_<pid> is dropped afterwards, and its log is
# kept in $LT_LOG_DIR (default target/loadtest).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
BIN="${LT_BIN:-target/release}"
PORT="${LT_PORT:-18080}"
LOG_DIR="${LT_LOG_DIR:-target/loadtest}"
DB="lt_$(date +%s)_$$"

# shellcheck source=loadtest/daemon.sh
source loadtest/daemon.sh

# Busy and total jiffies of the whole machine, and CPU seconds of one process.
machine_cpu() { awk '/^cpu /{ print $2+$3+$4+$7+$8, $2+$3+$4+$5+$6+$7+$8 }' /proc/stat; }
process_cpu() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.2f", ($14+$15)/hz }' "/proc/$1/stat"; }

# The numbers mean little if something else (a build...) shares the cores.
read -r busy0 total0 < <(machine_cpu)
sleep 2
read -r busy1 total1 < <(machine_cpu)
idle=$(( 100 - 100 * (busy1 - busy0) / (total1 - total0 > 0 ? total1 - total0 : 1) ))
echo "bench: machine ${idle}% idle before the run" >&2
((idle >= 90)) || echo "bench: WARNING: the machine is busy; figures will be low" >&2

read -r busy0 total0 < <(machine_cpu)
daemon0="$(process_cpu "$daemon")"
/usr/bin/time -f "loadtest-cpu %U %S %e" -o "$LOG_DIR/$DB.time" \
    "$BIN/loadtest" --url "http://127.0.0.1:$PORT" "$@"
read -r busy1 total1 < <(machine_cpu)
daemon1="$(process_cpu "$daemon")"

metrics="$(curl -fs -H "Authorization: Bearer $CLUSTERD_TOKEN" "http://127.0.0.1:$PORT/metrics")"
metric() { awk -v m="clusterd_$1" '$1 == m { print $2 }' <<<"$metrics"; }
ratio() { awk -v a="$1" -v b="$2" -v k="${3:-1}" 'BEGIN { if (b > 0) printf "%.1f", k * a / b; else print "-" }'; }

read -r _ lt_user lt_sys lt_wall <"$LOG_DIR/$DB.time"
echo "--- daemon metrics (database $DB)"
echo "ingest group commits    $(metric ingest_group_size_count), avg $(ratio "$(metric ingest_group_size_sum)" "$(metric ingest_group_size_count)") messages, avg $(ratio "$(metric ingest_commit_seconds_sum)" "$(metric ingest_commit_seconds_count)" 1000) ms"
echo "embedding batches       $(metric embed_batch_size_count), avg $(ratio "$(metric embed_batch_size_sum)" "$(metric embed_batch_size_count)") texts, avg $(ratio "$(metric embed_seconds_sum)" "$(metric embed_seconds_count)" 1000) ms"
echo "embedding provider      $(metric embed_provider_calls_total{provider=\"local\"})$(metric embed_provider_calls_total{provider=\"hash\"})$(metric embed_provider_calls_total{provider=\"openai\"}) calls, $(metric embed_provider_texts_total) texts, $(metric embed_provider_tokens_total) tokens, cost \$$(metric embed_cost_usd_total)"
hits_memory="$(metric 'embed_cache_hits_total{tier="memory"}')"; hits_redis="$(metric 'embed_cache_hits_total{tier="redis"}')"
dedup="$(metric embed_deduplicated_total)"; embedded="$(metric messages_embedded_total)"
echo "embedding cache         memory hits ${hits_memory:-0}, redis hits ${hits_redis:-0}, in-batch duplicates ${dedup:-0}, misses $(metric embed_cache_misses_total), errors $(metric embed_cache_errors_total); hit rate $(ratio "$(( ${hits_memory:-0} + ${hits_redis:-0} + ${dedup:-0} ))" "${embedded:-0}" 100)% of $embedded embedded"
echo "clustering commits      $(metric cluster_commit_seconds_count), avg $(ratio "$(metric messages_clustered_total)" "$(metric cluster_commit_seconds_count)") messages, avg $(ratio "$(metric cluster_commit_seconds_sum)" "$(metric cluster_commit_seconds_count)" 1000) ms"
echo "messages                ingested $(metric messages_ingested_total), clustered $(metric messages_clustered_total), cluster queue $(metric cluster_queue), deferred to the sweep $(deferred="$(metric 'pipeline_deferred_total{stage="cluster"}')"; echo "${deferred:-0}"), recovered $(metric messages_recovered_total)"
echo "--- CPU over the run ($lt_wall s wall, 2 cores = $(ratio "$lt_wall" 1 "$(nproc)") core-s)"
hz="$(getconf CLK_TCK)"
awk -v busy="$((busy1 - busy0))" -v total="$((total1 - total0))" -v hz="$hz" \
    -v d0="$daemon0" -v d1="$daemon1" -v lu="$lt_user" -v ls="$lt_sys" 'BEGIN {
    machine = busy / hz; daemon = d1 - d0; load = lu + ls
    printf "machine busy            %.1f core-s (%.0f %%)\n", machine, 100 * busy / total
    printf "clusterd                %.1f core-s\n", daemon
    printf "loadtest                %.1f core-s\n", load
    printf "postgres and the rest   %.1f core-s\n", machine - daemon - load
}'
