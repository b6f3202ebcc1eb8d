#!/usr/bin/env bash
# The log for consumers: catch-up speed of one SSE subscriber from position 0
# of a seeded log, then the mixed write load with and without 100 live
# subscribers (their 201 -> event latency, and what they cost the writes).
#
# usage: benches/feed.sh
# env:   WALLET (binary, default target/release/wallet), PGURL (server, default
#        postgres://postgres@127.0.0.1:5432), PORT (3100), SECONDS_RUN (10),
#        EVENTS (log to catch up on, 1000000), SUBSCRIBERS (100)
set -euo pipefail
cd "$(dirname "$0")/.."
WALLET=${WALLET:-target/release/wallet}
PGURL=${PGURL:-postgres://postgres@127.0.0.1:5432}
PORT=${PORT:-3100}
RUN=${SECONDS_RUN:-10}
EVENTS=${EVENTS:-1000000}
SUBSCRIBERS=${SUBSCRIBERS:-100}
DB=wallet_feed_$$_$RANDOM
URL=http://127.0.0.1:$PORT
SERVER=
cleanup() {
    [ -n "$SERVER" ] && { kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; }
    psql -q "$PGURL/postgres" -c "DROP DATABASE IF EXISTS $DB" >/dev/null 2>&1 || true
}
trap cleanup EXIT
psql -q "$PGURL/postgres" -c "CREATE DATABASE $DB"
DATABASE_URL=$PGURL/$DB RUST_LOG=warn "$WALLET" migrate >/dev/null 2>&1
DATABASE_URL=$PGURL/$DB RUST_LOG=warn "$WALLET" seed --events "$EVENTS" --wallets 10000 2>&1 | tail -1
psql -q "$PGURL/$DB" -c "VACUUM ANALYZE" -c "CHECKPOINT" >/dev/null
DATABASE_URL=$PGURL/$DB RUST_LOG=warn "$WALLET" serve --bind 127.0.0.1:$PORT >/dev/null 2>&1 &
SERVER=$!
for _ in $(seq 100); do curl -sf -o /dev/null $URL/health && break; sleep 0.2; done

head=$(curl -sI "$URL/events?limit=1" | tr -d '\r' | awk -F': ' 'tolower($1) == "x-log-head" {print $2}')
mark=$(mktemp)
start=$(date +%s.%N)
# awk notes the time of the head's arrival (curl then waits for the next
# heartbeat to notice the closed pipe, which must not count).
curl -sN "$URL/events/stream?after=0" \
    | awk -v head="$head" -v mark="$mark" '/^id: / {if ($2 == head) {system("date +%s.%N > " mark); exit}}' || true
end=$(cat "$mark")
rm -f "$mark"
awk -v s="$start" -v e="$end" -v n="$head" 'BEGIN {printf "catch-up over SSE: %d events in %.2f s: %.0f events/s\n", n, e - s, n / (e - s)}'

for subscribers in 0 "$SUBSCRIBERS" 0 "$SUBSCRIBERS"; do
    out=$("$WALLET" load --url "$URL" --seconds "$RUN" --subscribers "$subscribers" 2>&1 || true)
    echo "subscribers=$subscribers $(echo "$out" | grep -oE '[0-9]+ requests/s' | head -1); $(echo "$out" | grep -E '^live:' || echo 'live: -')"
done
