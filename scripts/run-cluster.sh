#!/usr/bin/env bash
# scripts/run-cluster.sh — N clusterd instances behind nginx, on loopback
# (what `make run-cluster [N=3]` runs, once the stack is up and the release
# binary built).
#
#   scripts/run-cluster.sh [N]     N instances (default 3), in the foreground;
#                                  Ctrl-C (or SIGTERM) stops all of them
#
# - instance i (1..N) serves on 127.0.0.1:$((PORT + i)); its name, for the
#   claims on unfinished work, is "<host> 127.0.0.1:<its port>"; its log is
#   .stack/cluster/clusterd-<i>.log;
# - every instance shares the stack's PostgreSQL, Redis (fan-out, caches,
#   rate limits) and, when CLUSTERD_REPLICA_URL is set (scripts/stack.sh env
#   exports it once the stack runs a replica), that replica
#   (CLUSTERD__DATABASE__REPLICA_URLS);
# - nginx (scripts/stack.sh nginx run) listens on 127.0.0.1:$PORT, the
#   port `make run` serves on, config and logs in .stack/nginx/;
# - a development admin token, as `make run` makes it, in .stack/dev-token.
#
# Environment: CLUSTERD_CLUSTER_PORT (default 8080), CLUSTERD_BIN (default
# target/release/clusterd), and any CLUSTERD__* setting, passed to every
# instance (the bind address excepted; the stack's URLs where unset).

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
readonly ROOT
readonly N="${1:-3}"
readonly PORT="${CLUSTERD_CLUSTER_PORT:-8080}"
readonly BIN="${CLUSTERD_BIN:-$ROOT/${CARGO_TARGET_DIR:-target}/release/clusterd}"
readonly LOG_DIR="$ROOT/.stack/cluster"
readonly HOST="127.0.0.1"

say() { printf 'cluster: %s\n' "$*" >&2; }
die() { printf 'cluster: ERROR: %s\n' "$*" >&2; exit 1; }
# wait_answer URL PID TRIES WHAT: poll URL every 0.1 s until it answers;
# dies if PID exits first or after TRIES polls.
wait_answer() {
    local url="$1" pid="$2" tries="$3" what="$4" t
    for ((t = 0; ; t++)); do
        curl -fsS -o /dev/null "$url" 2>/dev/null && return 0
        kill -0 "$pid" 2>/dev/null || die "$what exited at its start"
        ((t < tries)) || die "$what does not answer after $((tries / 10)) s"
        sleep 0.1
    done
}

[[ "$N" =~ ^[1-9][0-9]?$ ]] || die "N must be 1..99, got '$N'"
[[ "$PORT" =~ ^[0-9]+$ ]] && ((PORT >= 1024 && PORT + N <= 65535)) || die "CLUSTERD_CLUSTER_PORT: bad port '$PORT'"
[[ -x "$BIN" ]] || die "no clusterd binary at $BIN (make run-cluster builds it)"
# The stack's URLs, unless the caller set its own.
saved="$(export -p | grep '^declare -x CLUSTERD__' || true)"
eval "$("$ROOT/scripts/stack.sh" env)"
eval "$saved"
if [[ -n "${CLUSTERD_REPLICA_URL:-}" ]]; then
    export CLUSTERD__DATABASE__REPLICA_URLS="$CLUSTERD_REPLICA_URL"
fi
for ((i = 0; i <= N; i++)); do
    if timeout 2 bash -c ": </dev/tcp/$HOST/$((PORT + i))" 2>/dev/null; then
        die "$HOST:$((PORT + i)) is already in use (make run? another run-cluster?)"
    fi
done
mkdir -p "$LOG_DIR"

"$BIN" token create --scope admin --name "make run (development)" --replace >"$ROOT/.stack/dev-token"

declare -A NAME_OF=()   # pid -> what it is
PIDS=()
stop_all() {
    trap - INT TERM EXIT
    say "stopping ${#PIDS[@]} process(es)"
    local pid
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait "${PIDS[@]}" 2>/dev/null || true
    say "stopped"
}
trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM
trap stop_all EXIT

upstreams=()
for ((i = 1; i <= N; i++)); do
    port=$((PORT + i))
    CLUSTERD__SERVER__BIND="$HOST:$port" "$BIN" serve >"$LOG_DIR/clusterd-$i.log" 2>&1 &
    PIDS+=("$!")
    NAME_OF[$!]="instance $i ($HOST:$port)"
    upstreams+=("$HOST:$port")
done

for ((i = 1; i <= N; i++)); do
    port=$((PORT + i))
    wait_answer "http://$HOST:$port/readyz" "${PIDS[i - 1]}" 600 "instance $i (log: $LOG_DIR/clusterd-$i.log)"
    say "instance $i ready: $(hostname) $HOST:$port (log .stack/cluster/clusterd-$i.log)"
done

"$ROOT/scripts/stack.sh" nginx run "$ROOT/.stack/nginx" "$PORT" "${upstreams[@]}" &
PIDS+=("$!")
NAME_OF[$!]="nginx"
wait_answer "http://$HOST:$PORT/healthz" "${PIDS[N]}" 100 "nginx on $HOST:$PORT (log: .stack/nginx/error.log)"

TOKEN="$(cat "$ROOT/.stack/dev-token")"
say "$N instance(s) behind nginx on http://$HOST:$PORT (Ctrl-C stops all)"
say "development admin token (also in .stack/dev-token): $TOKEN"
say "  e.g. curl -H \"Authorization: Bearer $TOKEN\" http://$HOST:$PORT/v1/creators/demo/clusters"

# An instance that stops is reported; nginx passes its requests to the
# others. nginx stopping ends the run.
live=("${PIDS[@]}")
while ((${#live[@]} > 0)); do
    exited=""
    wait -n -p exited "${live[@]}" || true
    [[ -n "$exited" ]] || break
    say "${NAME_OF[$exited]} exited"
    [[ "${NAME_OF[$exited]}" != nginx ]] || break
    rest=()
    for pid in "${live[@]}"; do [[ "$pid" == "$exited" ]] || rest+=("$pid"); done
    live=("${rest[@]}")
done
