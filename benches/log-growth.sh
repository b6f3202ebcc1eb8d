#!/usr/bin/env bash
# Cost as the log grows: mixed writes and balance reads on a fresh database,
# then the same after `wallet seed` has appended EVENTS more events (other
# wallets), same number of load wallets. Target: within 10% of each other.
#
# usage: benches/log-growth.sh
# env:   WALLET (binary, default target/release/wallet), PGURL (server, default
#        postgres://postgres@127.0.0.1:5432), PORT (3100), SECONDS_RUN (10),
#        EVENTS (10000000), WALLETS (load wallets, 100)
set -euo pipefail
cd "$(dirname "$0")/.."
WALLET=${WALLET:-target/release/wallet}
PGURL=${PGURL:-postgres://postgres@127.0.0.1:5432}
PORT=${PORT:-3100}
RUN=${SECONDS_RUN:-10}
EVENTS=${EVENTS:-10000000}
WALLETS=${WALLETS:-100}
DB=wallet_growth_$$_$RANDOM
SERVER=
cleanup() {
    [ -n "$SERVER" ] && { kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; }
    psql -q "$PGURL/postgres" -c "DROP DATABASE IF EXISTS $DB" >/dev/null 2>&1 || true
}
trap cleanup EXIT
measure() {
    local label=$1 out
    DATABASE_URL=$PGURL/$DB RUST_LOG=warn "$WALLET" serve --bind 127.0.0.1:$PORT >/dev/null 2>&1 &
    SERVER=$!
    for _ in $(seq 100); do curl -sf -o /dev/null http://127.0.0.1:$PORT/health && break; sleep 0.2; done
    for mode in writes reads; do
        out=$(mktemp)
        args=(); [ "$mode" = reads ] && args=(--reads)
        "$WALLET" load --url http://127.0.0.1:$PORT --seconds "$RUN" --wallets "$WALLETS" "${args[@]}" >"$out" 2>&1 || true
        echo "$label $mode: $(grep -oE '[0-9.]+ requests/s' "$out" | head -1), p99 $(awk '$1 ~ /^(deposit|withdraw|transfer|read)$/ && $5 > m {m = $5} END {print m}' "$out") ms; $(grep -E '^statuses' "$out")"
        rm -f "$out"
    done
    kill "$SERVER"; wait "$SERVER" 2>/dev/null || true; SERVER=
}
psql -q "$PGURL/postgres" -c "CREATE DATABASE $DB"
DATABASE_URL=$PGURL/$DB "$WALLET" migrate >/dev/null
measure "log $(psql -At "$PGURL/$DB" -c 'SELECT count(*) FROM events') events:"
DATABASE_URL=$PGURL/$DB RUST_LOG=warn "$WALLET" seed --events "$EVENTS" --wallets 10000 2>&1 | tail -1
# The seed appends past the read models: build them now, or `serve`'s
# in-process runner would spend the measurement catching up millions of
# events. Then let the dirty pages reach disk: a checkpoint running during
# the measurement would charge the seed's writes to it.
DATABASE_URL=$PGURL/$DB RUST_LOG=warn "$WALLET" projections rebuild 2>&1 | tail -1
psql -q "$PGURL/$DB" -c "VACUUM ANALYZE" -c "CHECKPOINT" >/dev/null
measure "log $(psql -At "$PGURL/$DB" -c 'SELECT count(*) FROM events') events:"
