# Sourced by the bench scripts: a fresh database and a fresh release daemon
# on it, both gone when the script exits.
#
# Needs BIN (release binaries), PORT, LOG_DIR and DB set by the caller; sets
# `daemon` (its pid) and DB_URL.

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
    scripts/stack.sh psql -q -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null || true
}
trap cleanup EXIT

scripts/stack.sh psql -q -c "CREATE DATABASE $DB" >/dev/null
CLUSTERD__DATABASE__URL="$DB_URL" CLUSTERD__SERVER__BIND="127.0.0.1:$PORT" \
    "$BIN/clusterd" serve >"$LOG_DIR/$DB.log" 2>&1 &
daemon=$!
for _ in $(seq 1 100); do
    curl -fs "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break
    kill -0 "$daemon" 2>/dev/null || { tail -n 20 "$LOG_DIR/$DB.log" >&2; exit 1; }
    sleep 0.2
done
