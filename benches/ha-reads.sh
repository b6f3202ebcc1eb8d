#!/usr/bin/env bash
# Reads on a three-node cluster: serve with and without DATABASE_READ_URL (the two
# standbys), a balance with minPosition and a history page, alternating twice; then
# deposits each followed by a read of their own write (minPosition = the write's
# position): the readAfterWrite row is what a read-your-writes client waits.
# usage: benches/ha-reads.sh   (release build; cluster on monitor port 6700, serve on 3300)
set -u
cd "$(dirname "$0")/.."
C=deploy/ha/pg-cluster.sh; B=6700
bash $C start --port $B >/dev/null 2>&1 || { echo start failed; exit 1; }
P=$(bash $C primary --port $B | awk '{print $1}')
ALL="127.0.0.1:$((B+1)),127.0.0.1:$((B+2)),127.0.0.1:$((B+3))"
STANDBYS=$(for n in 1 2 3; do p=$((B+n)); [ $p != $P ] && printf "127.0.0.1:$p,"; done | sed 's/,$//')
run() { # label readurl
  if [ -n "$2" ]; then RU="postgres://postgres@$2/wallet"; else RU=""; fi
  DATABASE_URL=postgres://postgres@$ALL/wallet DATABASE_READ_URL=$RU REQUIRE_SYNC_STANDBYS=1 RUST_LOG=warn target/release/wallet serve --bind 127.0.0.1:3300 >/tmp/rb-serve.log 2>&1 &
  S=$!
  for _ in $(seq 100); do curl -sf -o /dev/null http://127.0.0.1:3300/ready && break; sleep 0.2; done
  for suffix in '?minPosition=1' '/history?limit=10&minPosition=1'; do
    out=$(target/release/wallet load --url http://127.0.0.1:3300 --seconds 10 --reads --wallets 1000 --concurrency 32 --read-suffix "$suffix" 2>&1)
    rps=$(echo "$out" | grep -oE '[0-9.]+ requests/s' | head -1)
    lat=$(echo "$out" | awk '$1=="read"' | head -1)
    st=$(echo "$out" | grep -E '^statuses' | head -1)
    echo "$1 suffix=$suffix $rps | $lat | $st"
  done
  for suffix in '' '/history?limit=1'; do
    out=$(target/release/wallet load --url http://127.0.0.1:3300 --seconds 10 --wallets 1000 --concurrency 16 --mix 100,0,0 --read-after-write --read-suffix "$suffix" 2>&1)
    raw=$(echo "$out" | awk '$1=="readAfterWrite"' | head -1)
    dep=$(echo "$out" | awk '$1=="deposit"' | head -1)
    echo "$1 read-after-write suffix='$suffix' | $raw | $dep"
  done
  echo "$1 standby reads: $(curl -s http://127.0.0.1:3300/metrics | grep '^wallet_standby_reads_total' | tr '\n' ' ')"
  kill $S; wait $S 2>/dev/null
}
for r in 1 2; do run primary-only ""; run standbys "$STANDBYS"; done
bash $C stop --port $B >/dev/null 2>&1
