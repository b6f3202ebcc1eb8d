#!/usr/bin/env bash
# Mixed writes on a fresh PostgreSQL database, one line per run, with
# pgbench's one-INSERT-per-transaction rate (16 clients) measured right after
# each run, so the ratio cancels the machine's drift. A fresh database per run
# also shows whether the first process on it runs slowly (plans made while
# the tables were empty).
#
# usage: benches/write-path.sh [wallets ...]      (default: 100 10000)
# env:   WALLET (server binary, default target/release/wallet), LOAD_WALLET (load
#        generator binary, default WALLET), PGURL (server, default
#        postgres://postgres@127.0.0.1:5432), PORT (3100), SECONDS_RUN (10),
#        PROCESSES (serve processes on the one database, default 1),
#        RESTART=1 (then restart the servers on the same database and run again),
#        LOAD_ARGS (more `wallet load` options, e.g. --keyed), PGBENCH_PORT (the
#        port pgbench and psql reach the primary on, default 5432)
set -euo pipefail
cd "$(dirname "$0")/.."
WALLET=${WALLET:-target/release/wallet}
LOAD_WALLET=${LOAD_WALLET:-$WALLET}
PGURL=${PGURL:-postgres://postgres@127.0.0.1:5432}
PORT=${PORT:-3100}
RUN=${SECONDS_RUN:-10}
PROCESSES=${PROCESSES:-1}
WALLETS=("${@:-100}")
[ $# -eq 0 ] && WALLETS=(100 10000)
DB=wallet_wp_$$_$RANDOM
SERVERS=()
cleanup() {
    for s in "${SERVERS[@]}"; do kill "$s" 2>/dev/null || true; wait "$s" 2>/dev/null || true; done
    psql -q "$PGURL/postgres" -c "DROP DATABASE IF EXISTS $DB" >/dev/null 2>&1 || true
}
trap cleanup EXIT
start_servers() {
    SERVERS=()
    urls=()
    for i in $(seq 0 $((PROCESSES - 1))); do
        port=$((PORT + i))
        DATABASE_URL=$PGURL/$DB RUST_LOG=warn "$WALLET" serve --bind 127.0.0.1:$port >/dev/null 2>&1 &
        SERVERS+=($!)
        for _ in $(seq 100); do curl -sf -o /dev/null http://127.0.0.1:$port/health && break; sleep 0.2; done
        urls+=("http://127.0.0.1:$port")
    done
}
stop_servers() {
    for s in "${SERVERS[@]}"; do kill "$s"; wait "$s" 2>/dev/null || true; done
    SERVERS=()
}
# One load generator spreads its connections over every process, so several
# processes write the same wallets (and the balances must still add up).
run_load() {
    local label=$1 extra=() out
    for url in "${urls[@]:1}"; do extra+=(--also-url "$url"); done
    out=$(mktemp)
    # Sequential scans of the idempotency table during the run: a plan made
    # on an empty table shows here.
    scans() { psql -At "$PGURL/$DB" -c "SELECT coalesce(sum(seq_scan), 0) FROM pg_stat_user_tables WHERE relname = 'idempotency'"; }
    local scans0; scans0=$(scans)
    # shellcheck disable=SC2086
    "$LOAD_WALLET" load --url "${urls[0]}" "${extra[@]}" --seconds "$RUN" --wallets "$wallets" ${LOAD_ARGS:-} >"$out" 2>&1 || true
    sleep 1 # statistics are reported by backends with a short delay
    local idem_scans=$(( $(scans) - scans0 ))
    rps=$(grep -oE '[0-9.]+ requests/s' "$out" | head -1 | cut -d' ' -f1)
    ops=$(grep -oE '[0-9.]+ operations/s' "$out" | head -1 | cut -d' ' -f1)
    p99=$(awk '$1 ~ /^(deposit|withdraw|transfer|hold|batch)$/ && $5 > m {m = $5} END {print m}' "$out")
    statuses=$(grep -E '^statuses' "$out" | head -1)
    conservation=$(grep -E '^conservation' "$out" | head -1 | cut -c1-16)
    echo "$label wallets=$wallets processes=$PROCESSES rps=$rps ops=$ops p99_ms=$p99 idempotency_seq_scans=$idem_scans $statuses; $conservation"
    rm -f "$out"
}
for wallets in "${WALLETS[@]}"; do
    psql -q "$PGURL/postgres" -c "DROP DATABASE IF EXISTS $DB" >/dev/null 2>&1
    psql -q "$PGURL/postgres" -c "CREATE DATABASE $DB"
    start_servers
    run_load fresh
    stop_servers
    if [ "${RESTART:-0}" = 1 ]; then
        start_servers
        run_load restarted
        stop_servers
    fi
    psql -q "$PGURL/$DB" -c "CREATE TABLE pgb_ins (id bigserial primary key, v text)"
    echo "INSERT INTO pgb_ins (v) VALUES ('x');" > /tmp/wp_ins.sql
    tps=$(pgbench -h 127.0.0.1 -p "${PGBENCH_PORT:-5432}" -U postgres -n -c 16 -j 2 -T "$RUN" -f /tmp/wp_ins.sql "$DB" 2>/dev/null | grep -oE 'tps = [0-9.]+' | cut -d' ' -f3)
    echo "pgbench tps=$tps"
done
