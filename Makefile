# Developer and CI entry points for clusterd.
#
#   make run         start the local stack (PostgreSQL + Redis) and the daemon
#                    (clusterd serve, on 127.0.0.1:8080 by default)
#   make run-cluster N instances (N=3 by default) behind nginx on 127.0.0.1:8080,
#                    sharing the stack's PostgreSQL and Redis; Ctrl-C stops all
#                    (scripts/run-cluster.sh)
#   make test        start the stack, then fmt check, clippy and tests (one
#                    build), and a short crash test (15 s, 2 SIGKILLs; what
#                    CI runs)
#   make test-faults the long crash test: 60 s of load, 5 SIGKILLs and restarts
#                    of the daemon, then SQL checks (loadtest/crash.sh)
#   make bench       criterion benchmark of the local embedding model
#   make loadtest    load test against a fresh daemon (LOADTEST_ARGS=...)
#   make eval        clustering quality on the labelled sets (EVAL_DATA=...)
#   make stack-up    start / verify the local stack only (scripts/stack.sh up)
#   make stack-down  stop it (data kept in .stack/pgdata)
#   make stack-status
#   make fmt         format the code
#   make clippy      lint, warnings are errors
#
# The stack's connection settings come from `scripts/stack.sh env`; load
# them into your own shell with:  eval "$(scripts/stack.sh env)"

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

STACK := scripts/stack.sh
# Prefix for recipe lines that need the stack's URLs in their environment.
WITH_STACK_ENV = eval "$$($(STACK) env)" &&
# Prefix for cargo commands whose build lints like `cargo clippy -- -D
# warnings` (clippy-driver compiles the workspace's crates; dependencies are
# compiled as usual and keep their artifacts).
WITH_CLIPPY = export RUSTC_WORKSPACE_WRAPPER="$$(command -v clippy-driver)" \
	CLIPPY_ARGS="-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__" && test -x "$$RUSTC_WORKSPACE_WRAPPER" &&

.DEFAULT_GOAL := help
.PHONY: help run test fmt clippy bench stack-up stack-down stack-status

help:
	@sed -n '3,20s/^# \{0,1\}//p' $(firstword $(MAKEFILE_LIST))

# A development admin token is (re)made at each start, replacing the one
# before, printed, and kept in .stack/dev-token (git-ignored).
run: stack-up
	cargo build --release --bin clusterd
	$(WITH_STACK_ENV) $${CARGO_TARGET_DIR:-target}/release/clusterd token create --scope admin --name "make run (development)" --replace >.stack/dev-token
	@echo "Development admin token (also in .stack/dev-token): $$(cat .stack/dev-token)"
	@echo "  e.g. curl -H \"Authorization: Bearer $$(cat .stack/dev-token)\" http://127.0.0.1:8080/v1/creators/demo/clusters"
	$(WITH_STACK_ENV) exec $${CARGO_TARGET_DIR:-target}/release/clusterd serve

# N instances on 127.0.0.1:8081.. behind Debian's nginx on 127.0.0.1:8080,
# a development admin token in .stack/dev-token (scripts/run-cluster.sh).
N ?= 3
.PHONY: run-cluster
run-cluster: stack-up
	cargo build --release --bin clusterd
	scripts/run-cluster.sh $(N)

test: stack-up
	@# Databases left by earlier test runs (each test makes its own).
	$(STACK) psql -qtAc "SELECT 'DROP DATABASE ' || quote_ident(datname) || ' WITH (FORCE);' FROM pg_database WHERE datname LIKE 'clusterd_test_%'" | $(STACK) psql -q >/dev/null
	cargo fmt --all -- --check
	@# Clippy lints while the tests build: one build, not a check build of
	@# every dependency for clippy and then the test build. It is what
	@# `cargo clippy --workspace --all-targets -- -D warnings` runs (the
	@# workspace's crates compiled by clippy-driver, its arguments in
	@# CLIPPY_ARGS), with code generation kept, so the tests reuse it.
	$(WITH_CLIPPY) cargo test --workspace --all-targets --no-run
	$(WITH_STACK_ENV) $(WITH_CLIPPY) if cargo nextest --version >/dev/null 2>&1; then \
		cargo nextest run --workspace --no-fail-fast; \
	else \
		cargo test --workspace; \
	fi
	@# Crash safety with the real binaries: target/debug/clusterd and
	@# loadtest, which the test run built (with the test build's features;
	@# a plain `cargo build` would rebuild half the tree with other ones).
	loadtest/crash.sh --duration 15 --kills 2

# The long crash test: a steady stream for 60 s while the daemon is killed
# with SIGKILL 5 times and restarted; then every acknowledged message must
# be stored once and clustered, and the event log whole (loadtest/crash.sh).
.PHONY: test-faults
test-faults: stack-up
	cargo build -p clusterd -p loadtest --bin clusterd --bin loadtest
	loadtest/crash.sh --duration 60 --kills 5

fmt:
	cargo fmt --all

clippy:
	cargo clippy --workspace --all-targets -- -D warnings

# Criterion benchmark of the local model's raw forward throughput (texts/s at
# batch 1, 8, 32, 64); BENCH_ARGS go to criterion, e.g. BENCH_ARGS="--quick".
BENCH_ARGS ?=
bench: stack-up
	$(WITH_STACK_ENV) cargo bench --bench embed -- $(BENCH_ARGS)

stack-up:
	$(STACK) up

stack-down:
	$(STACK) down

stack-status:
	$(STACK) status

# Load test against a fresh daemon and database (loadtest/bench.sh; see
# BENCHMARKS.md), e.g. make loadtest LOADTEST_ARGS="--rate 500 --duration 20"
LOADTEST_ARGS ?= --duration 20
.PHONY: loadtest
loadtest: stack-up
	cargo build --release -p clusterd -p loadtest
	loadtest/bench.sh $(LOADTEST_ARGS)

# Clustering quality through the real API (loadtest/eval.sh; see
# BENCHMARKS.md, "Precision first"): for each labelled set, a fresh daemon
# and database, the set sent into one creator in 5 shuffled orders (a new
# creator each), the clusters and memberships scored against the labels;
# then the rule against the offline references and other rules at matched
# V (clusterd-eval compare). One set: make eval EVAL_DATA=loadtest/data/hwu64/test.jsonl
EVAL_DATA ?= loadtest/data/clinc150/test.jsonl loadtest/data/hwu64/test.jsonl \
	loadtest/data/insurance_dstc11/test.jsonl loadtest/data/customer_support_bitext/test.jsonl
.PHONY: eval
eval: stack-up
	cargo build --release -p clusterd -p loadtest
	for data in $(EVAL_DATA); do loadtest/eval.sh $$data --seeds 5; done
	$(WITH_STACK_ENV) target/release/clusterd-eval compare $(EVAL_DATA)
