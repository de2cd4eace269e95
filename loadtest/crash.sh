#!/usr/bin/env bash
# Crash safety with real processes: a steady stream of messages through
# `loadtest` while the daemon is killed with SIGKILL several times and
# restarted; then proves with SQL that nothing acknowledged was lost or
# doubled and that the event log is whole.
#
#   loadtest/crash.sh [--duration S] [--kills K] [--rate R] [--transport ws|http]
#                     (defaults: 15 s, 2 kills, 300 msg/s, ws)
#   loadtest/crash.sh --check DB ACKED_FILE
#                     only the checks, on a database kept with LT_KEEP_DB=1
#
# A fresh database crash_<time>_<pid> on the local stack (scripts/stack.sh
# up) and a fresh daemon on it (loadtest/daemon.sh); both are gone at the
# end (LT_KEEP_DB=1 keeps the database). `loadtest --keep-going` sends for
# S seconds over 4 connections and writes every acknowledged message to a
# file; the daemon is SIGKILLed K times at even intervals and restarted at
# once. Once nothing is `pending` or `embedded` any more (or after
# CRASH_SETTLE_SECS, default 60), the checks run; each violation is
# printed, and the exit status is non-zero if there is any:
#   - every acknowledged message is stored once, as acknowledged (id,
#     creator, external id), and ends `clustered`;
#   - every stored message (acknowledged or not: a kill can fall between
#     the commit and the ack) ends `clustered`, none twice per external id;
#   - per creator, event ids are 1..n without gaps and the counter is n;
#   - exactly one clustering event (cluster.created / cluster.updated) per
#     clustered message, naming the message's cluster; each cluster's first
#     event creates it, and each event shows the cluster's size as the
#     count of its clustering events so far (the log replays in order).
#
# Environment: LT_BIN (binaries; default $CARGO_TARGET_DIR/debug or
# target/debug), LT_PORT (default 0: the daemon binds a free one, reports it
# through server.port_file, and its restarts bind it again), LT_LOG_DIR
# (default target/loadtest; the daemon's log over all its lives is kept there),
# CRASH_PROVIDER (embedder.provider, default `hash`: the model is not what
# is tested here), LT_KEEP_DB.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

duration=15 kills=2 rate=300 transport=ws check_db="" check_acked=""
while (($#)); do
    case "$1" in
        --check) check_db="$2"; check_acked="$3"; shift 3 ;;
        --duration) duration="$2"; shift 2 ;;
        --kills) kills="$2"; shift 2 ;;
        --rate) rate="$2"; shift 2 ;;
        --transport) transport="$2"; shift 2 ;;
        -h | --help) sed -n '2,33p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "crash: unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
done
[[ "$duration" =~ ^[0-9]+$ && "$kills" =~ ^[0-9]+$ && "$duration" -gt 0 ]] \
    || { echo "crash: --duration and --kills must be whole numbers (duration > 0)" >&2; exit 2; }

BIN="${LT_BIN:-${CARGO_TARGET_DIR:-target}/debug}"
PORT="${LT_PORT:-0}"
LOG_DIR="${LT_LOG_DIR:-target/loadtest}"
DB="crash_$(date +%s)_$$"
ACKED="$LOG_DIR/$DB.acked.csv"
REPORT="$LOG_DIR/$DB.loadtest.txt"

export CLUSTERD__EMBEDDER__PROVIDER="${CRASH_PROVIDER:-hash}"
# The last life ends with SIGTERM (daemon.sh's cleanup): nothing to drain.
export CLUSTERD__SERVER__SHUTDOWN_TIMEOUT_SECS=1
# Auth stays on: daemon.sh makes an admin token (CLUSTERD_TOKEN) that
# loadtest sends.

# psql on the run's database (the stack's psql, connected to the server).
sql() { { printf '\\connect %s\n' "$DB"; cat; } | scripts/stack.sh psql -X -q -t -A -v ON_ERROR_STOP=1; }

# Prints one line per violated property of database $DB, given the
# acknowledged messages in $ACKED.
violations() {
    sql <<SQL
CREATE TEMP TABLE acked (message_id uuid, external_id text, creator_id text);
\\copy acked FROM '$(realpath "$ACKED")' WITH (FORMAT csv)
-- Acknowledged: stored once, as acknowledged, and clustered.
SELECT format('acked message %s (%s, %s) is not stored', a.message_id, a.creator_id, a.external_id)
FROM acked a LEFT JOIN messages m ON m.id = a.message_id WHERE m.id IS NULL;
SELECT format('acked message %s was stored as (%s, %s), acked as (%s, %s)', a.message_id, m.creator_id,
              m.external_id, a.creator_id, a.external_id)
FROM acked a JOIN messages m ON m.id = a.message_id
WHERE (m.creator_id, m.external_id) IS DISTINCT FROM (a.creator_id, a.external_id);
SELECT format('message %s acknowledged %s times', message_id, count(*)) FROM acked GROUP BY message_id HAVING count(*) > 1;
-- Everything stored: clustered, once per external id.
SELECT format('message %s (%s) is %s%s', id, creator_id, status, coalesce(': ' || error, ''))
FROM messages WHERE status <> 'clustered' OR cluster_id IS NULL;
SELECT format('external id %s of %s stored %s times', external_id, creator_id, count(*))
FROM messages GROUP BY creator_id, external_id HAVING count(*) > 1;
-- The event log: gap-free per creator, one clustering event per message.
SELECT format('%s: %s events with ids %s..%s (%s distinct), counter %s', e.creator_id, count(*), min(e.event_id),
              max(e.event_id), count(DISTINCT e.event_id), max(c.last_event_id))
FROM events e LEFT JOIN creators c USING (creator_id) GROUP BY e.creator_id
HAVING min(e.event_id) <> 1 OR max(e.event_id) <> count(*) OR count(DISTINCT e.event_id) <> count(*)
    OR max(c.last_event_id) IS DISTINCT FROM max(e.event_id);
SELECT format('%s: counter %s but no events', creator_id, last_event_id) FROM creators
WHERE last_event_id <> 0 AND NOT EXISTS (SELECT 1 FROM events e WHERE e.creator_id = creators.creator_id);
CREATE TEMP VIEW decisions AS
    SELECT creator_id, event_id, kind, (payload->'message'->>'id')::uuid AS message_id,
           (payload->'cluster'->>'id')::uuid AS cluster_id, (payload->'cluster'->>'size')::int AS size
    FROM events WHERE kind IN ('cluster.created', 'cluster.updated');
SELECT format('event %s of %s is a %s, not a clustering decision', event_id, creator_id, kind)
FROM events WHERE kind NOT IN ('cluster.created', 'cluster.updated');
SELECT format('message %s has %s clustering events', m.id, count(d.event_id))
FROM messages m LEFT JOIN decisions d ON d.message_id = m.id GROUP BY m.id HAVING count(d.event_id) <> 1;
SELECT format('event %s of %s places message %s in cluster %s, but it is in %s', d.event_id, d.creator_id,
              d.message_id, d.cluster_id, m.cluster_id)
FROM decisions d LEFT JOIN messages m ON m.id = d.message_id
WHERE m.cluster_id IS DISTINCT FROM d.cluster_id OR m.creator_id IS DISTINCT FROM d.creator_id;
SELECT format('event %s of %s: %s of cluster %s of size %s; expected %s of size %s', event_id, creator_id, kind,
              cluster_id, size, CASE WHEN nth = 1 THEN 'cluster.created' ELSE 'cluster.updated' END, nth)
FROM (SELECT *, row_number() OVER (PARTITION BY cluster_id ORDER BY event_id) AS nth FROM decisions) AS d
WHERE kind <> CASE WHEN nth = 1 THEN 'cluster.created' ELSE 'cluster.updated' END OR size <> nth;
SELECT format('cluster %s has size %s and %s members', c.id, c.size, count(m.id))
FROM clusters c LEFT JOIN messages m ON m.cluster_id = c.id GROUP BY c.id HAVING c.size <> count(m.id);
SQL
}

if [[ -n "$check_db" ]]; then
    # Only the checks, on a kept database (LT_KEEP_DB=1) and its acked file.
    DB="$check_db" ACKED="$check_acked"
    found="$(violations)"
    [[ -z "$found" ]] && { echo "crash: $DB: no violation"; exit 0; }
    sed 's/^/  /' <<<"$found"
    echo "crash: $DB: $(wc -l <<<"$found") violations"
    exit 1
fi

# shellcheck source=loadtest/daemon.sh
source loadtest/daemon.sh
: >"$ACKED"

# psql on the run's database (the stack's psql, connected to the server).

now() { date +%s.%N; }
t0=$SECONDS
echo "crash: database $DB, daemon on 127.0.0.1:$PORT ($BIN/clusterd, provider $CLUSTERD__EMBEDDER__PROVIDER); $duration s at $rate msg/s over $transport, $kills kills" >&2
"$BIN/loadtest" --url "http://127.0.0.1:$PORT" --transport "$transport" --connections 4 --rate "$rate" \
    --duration "$duration" --events false --keep-going --acked-file "$ACKED" >"$REPORT" 2>"$LOG_DIR/$DB.loadtest.log" &
loadtest=$!

restarts=()
for ((k = 1; k <= kills; k++)); do
    sleep "$(awk -v d="$duration" -v k="$((kills + 1))" 'BEGIN { printf "%.2f", d / k }')"
    kill -0 "$loadtest" 2>/dev/null || break
    kill -KILL "$daemon"
    wait "$daemon" 2>/dev/null || true
    before="$(now)"
    start_daemon
    restarts+=("$(awk -v a="$before" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')")
    echo "crash: kill $k of $kills at $((SECONDS - t0)) s: SIGKILL, restarted and ready in ${restarts[-1]} s" >&2
done
loadtest_status=0
wait "$loadtest" || loadtest_status=$?
cat "$REPORT"
((loadtest_status == 0)) || { tail -n 20 "$LOG_DIR/$DB.loadtest.log" >&2; echo "crash: loadtest failed ($loadtest_status)" >&2; exit 1; }

# Wait until the pipeline has finished everything that was stored.
settle_start=$SECONDS
while :; do
    unfinished="$(sql <<<"SELECT count(*) FROM messages WHERE status IN ('pending', 'embedded')")"
    ((unfinished == 0)) && break
    if ((SECONDS - settle_start >= ${CRASH_SETTLE_SECS:-60})); then
        echo "crash: $unfinished messages still unfinished after ${CRASH_SETTLE_SECS:-60} s" >&2
        break
    fi
    sleep 0.5
done
settled_in=$((SECONDS - settle_start))

violations="$(violations)"

read -r stored clustered creators events clusters < <(sql <<<"SELECT (SELECT count(*) FROM messages),
    (SELECT count(*) FROM messages WHERE status = 'clustered'), (SELECT count(*) FROM creators),
    (SELECT count(*) FROM events), (SELECT count(*) FROM clusters)" | tr '|' ' ')
acked="$(wc -l <"$ACKED")"
errors="$(sed -n 's/^errors *//p' "$REPORT")"
n_violations=0
[[ -n "$violations" ]] && n_violations="$(wc -l <<<"$violations")"

echo "--- crash test: $duration s at $rate msg/s ($transport), $kills SIGKILLs, restarts ready in ${restarts[*]:-none} s"
echo "acknowledged            $acked (loadtest errors: ${errors:-?})"
echo "stored                  $stored ($((stored - acked)) committed but not acknowledged: killed before the ack)"
echo "clustered               $clustered of $stored, settled $settled_in s after the stream ended"
echo "event log               $events events for $creators creators, $clusters clusters"
if ((n_violations > 0)); then
    echo "violations              $n_violations:"
    head -n 50 <<<"$violations" | sed 's/^/  /'
    echo "crash: FAILED (daemon log: $LOG_DIR/$DB.log; acked: $ACKED)"
    exit 1
fi
echo "crash: OK - every acknowledged message stored once and clustered, event log whole ($((SECONDS - t0)) s)"
