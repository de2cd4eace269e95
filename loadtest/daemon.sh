# Sourced by the bench scripts: a fresh database and a fresh release daemon
# on it, both gone when the script exits.
#
# Needs BIN (release binaries), PORT (0: any free one), LOG_DIR and DB set by
# the caller; sets DB_URL and, once started, `daemon` (its pid) and PORT. With LT_DEFER_DAEMON=1 only
# the (empty) database is created: the caller loads it, then calls
# start_daemon. With LT_KEEP_DB=1 the database is kept (for a look with
# psql; drop it yourself).

for exe in clusterd loadtest; do
    [[ -x "$BIN/$exe" ]] || { echo "bench: $BIN/$exe missing; run cargo build --release -p clusterd -p loadtest" >&2; exit 1; }
done
mkdir -p "$LOG_DIR"
eval "$(scripts/stack.sh env)"
DB_URL="${CLUSTERD__DATABASE__URL%/*}/$DB"

daemon=""
cleanup() {
    if [[ -n "$daemon" ]]; then
        kill -TERM "$daemon" 2>/dev/null || true
        wait "$daemon" 2>/dev/null || true
    fi
    if [[ "${LT_KEEP_DB:-0}" == 1 ]]; then
        echo "bench: database $DB kept (LT_KEEP_DB=1)" >&2
    else
        scripts/stack.sh psql -q -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null || true
    fi
}
trap cleanup EXIT

# Starts the daemon on the database and waits (up to 20 s) until it is ready;
# exports CLUSTERD_TOKEN, an admin token for the load tools. Benchmarks
# measure capacity: the per-token rate limit is off unless the caller sets
# CLUSTERD__AUTH__RATE_PER_SEC.
start_daemon() {
    export CLUSTERD__AUTH__RATE_PER_SEC="${CLUSTERD__AUTH__RATE_PER_SEC:-0}"
    if [[ -z "${token_made:-}" ]]; then # once per database, not per restart
        CLUSTERD_TOKEN=$(CLUSTERD__DATABASE__URL="$DB_URL" "$BIN/clusterd" token create --scope admin --name loadtest 2>>"$LOG_DIR/$DB.log")
        export CLUSTERD_TOKEN
        token_made=1
    fi
    # PORT=0: the system picks a port, which the daemon writes to its port
    # file; PORT keeps it, so that a restart binds the same one again.
    local port_file="$LOG_DIR/$DB.port"
    rm -f "$port_file"
    CLUSTERD__DATABASE__URL="$DB_URL" CLUSTERD__SERVER__BIND="127.0.0.1:$PORT" \
        CLUSTERD__SERVER__PORT_FILE="$port_file" "$BIN/clusterd" serve >>"$LOG_DIR/$DB.log" 2>&1 &
    daemon=$!
    for _ in $(seq 1 100); do
        if [[ -s "$port_file" ]]; then
            PORT="$(<"$port_file")"
            curl -fs "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break
        fi
        kill -0 "$daemon" 2>/dev/null || { tail -n 20 "$LOG_DIR/$DB.log" >&2; exit 1; }
        sleep 0.2
    done
}

scripts/stack.sh psql -q -c "CREATE DATABASE $DB" >/dev/null
[[ "${LT_DEFER_DAEMON:-0}" == 1 ]] || start_daemon
