#!/usr/bin/env bash
# Clustering quality through the real API: a fresh database and a fresh
# release daemon (config/default.toml: the local model, Redis when the stack
# runs it), then `clusterd-eval api` sends DATA into a fresh creator per
# order and scores the clusters and memberships it reads back. See
# BENCHMARKS.md ("Precision first").
#
#   cargo build --release -p clusterd -p loadtest
#   loadtest/eval.sh loadtest/data/clinc150/test.jsonl [--seeds 5] [--seed N] [--file-order]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[[ $# -ge 1 ]] || { echo "usage: loadtest/eval.sh DATA.jsonl [clusterd-eval api options]" >&2; exit 2; }
data=$1
shift
BIN=${BIN:-target/release}
PORT=${PORT:-18091}
LOG_DIR=${LOG_DIR:-target/loadtest}
DB="clusterd_eval_$$"
[[ -x "$BIN/clusterd-eval" ]] || { echo "eval: $BIN/clusterd-eval missing; run cargo build --release -p loadtest" >&2; exit 1; }
# shellcheck source=loadtest/daemon.sh
source loadtest/daemon.sh
"$BIN/clusterd-eval" api "$data" --url "http://127.0.0.1:$PORT" "$@"
