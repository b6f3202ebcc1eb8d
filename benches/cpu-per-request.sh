#!/usr/bin/env bash
# Runs `wallet load` against a fresh PostgreSQL database and prints, besides the
# load report, the CPU each request cost the server, PostgreSQL (all its
# processes) and the load generator, and the WAL it wrote. CPU per request is
# steadier than requests/s on a shared machine, and dividing the server's and
# PostgreSQL's figures by the load generator's (which does the same work in
# every run) cancels most of the machine's own speed changes.
#
# usage: benches/cpu-per-request.sh [wallet load options, e.g. --reads]
# env:   WALLET (binary, default target/release/wallet), PGURL (server, default
#        postgres://postgres@127.0.0.1:5432), PORT (default 3100), SECONDS_RUN (10)
set -euo pipefail
cd "$(dirname "$0")/.."
WALLET=${WALLET:-target/release/wallet}
PGURL=${PGURL:-postgres://postgres@127.0.0.1:5432}
PORT=${PORT:-3100}
RUN=${SECONDS_RUN:-10}
DB=wallet_cpu_$$_$RANDOM
psql -q "$PGURL/postgres" -c "CREATE DATABASE $DB"
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null; psql -q "$PGURL/postgres" -c "DROP DATABASE IF EXISTS $DB"' EXIT
DATABASE_URL=$PGURL/$DB RUST_LOG=warn "$WALLET" serve --bind 127.0.0.1:$PORT >/dev/null 2>&1 &
SERVER=$!
for _ in $(seq 100); do curl -sf -o /dev/null http://127.0.0.1:$PORT/health && break; sleep 0.2; done

# utime + stime of processes, in clock ticks
ticks() { for p in "$@"; do cat /proc/$p/stat 2>/dev/null || true; done | awk '{s += $14 + $15} END {print s + 0}'; }
HZ=$(getconf CLK_TCK)
pg0=$(ticks $(pgrep postgres)); s0=$(ticks $SERVER)
lsn0=$(psql -At "$PGURL/postgres" -c "select pg_current_wal_lsn()")
out=$(mktemp)
"$WALLET" load --url http://127.0.0.1:$PORT --seconds "$RUN" "$@" >"$out" 2>&1 &
LOAD=$!
# The load generator's CPU just before it exits (after it, /proc has no record).
sleep "$((RUN - 1)).9"; l1=$(ticks $LOAD)
wait $LOAD || true
pg1=$(ticks $(pgrep postgres)); s1=$(ticks $SERVER)
lsn1=$(psql -At "$PGURL/postgres" -c "select pg_current_wal_lsn()")
grep -vE '^\s*$' "$out"
n=$(grep -oE '^[0-9]+ requests' "$out" | cut -d' ' -f1)
wal=$(psql -At "$PGURL/postgres" -c "select pg_wal_lsn_diff('$lsn1', '$lsn0')::bigint")
awk -v s=$((s1 - s0)) -v p=$((pg1 - pg0)) -v l=$l1 -v n="$n" -v hz="$HZ" -v wal="$wal" 'BEGIN {
  us = 1e6 / hz / n
  printf "cpu per request: server %.0f us, postgres %.0f us, load generator %.0f us; wal %.0f B\n", s*us, p*us, l*us, wal/n
  if (l > 0) printf "relative to the load generator: server %.2f, postgres %.2f\n", s/l, p/l
}'
rm -f "$out"
