#!/usr/bin/env bash
# Mixed writes on one PostgreSQL server against the same on a three-node
# pg_auto_failover cluster (deploy/ha/pg-cluster.sh: a commit waits for ANY 1
# of two standbys; the service runs with REQUIRE_SYNC_STANDBYS=1) and on the
# cluster with one standby killed (primary + one synchronous standby), each with
# pgbench's one-INSERT rate on the same primary right after, alternating
# single/cluster ROUNDS times. Everything shares this machine's cores: the
# cluster's three data nodes and its monitor run beside the service and the
# load generator, so the ratio is a floor, not what three machines give.
#
# usage: benches/ha.sh            env: ROUNDS (2), SECONDS_RUN (10), WALLETS (100),
#                                 HA_PORT (monitor port of the cluster, 6600)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-2}
WALLETS=${WALLETS:-100}
HA_PORT=${HA_PORT:-6600}
export SECONDS_RUN=${SECONDS_RUN:-10}
cluster=deploy/ha/pg-cluster.sh
trap 'bash $cluster stop --port $HA_PORT >/dev/null 2>&1 || true' EXIT
bash $cluster start --port "$HA_PORT" >/dev/null
hosts="127.0.0.1:$((HA_PORT + 1)),127.0.0.1:$((HA_PORT + 2)),127.0.0.1:$((HA_PORT + 3))"
for round in $(seq "$ROUNDS"); do
    echo "# round $round: single server (127.0.0.1:5432)"
    benches/write-path.sh "$WALLETS"
    primary=$(bash $cluster primary --port "$HA_PORT" | awk '{print $1}')
    echo "# round $round: cluster, primary 127.0.0.1:$primary, ANY 1 of 2 standbys"
    # psql (libpq) takes the host list as is and reaches the first host that answers: the primary
    # at start (node 1); pgbench is pointed at the primary's port.
    PGURL="postgres://postgres@$hosts" PGBENCH_PORT=$primary REQUIRE_SYNC_STANDBYS=1 \
        benches/write-path.sh "$WALLETS"
    # The highest-numbered standby goes away: its machine is lost.
    gone=$(for n in 3 2 1; do [ $((HA_PORT + n)) != "$primary" ] && { echo $n; break; }; done)
    echo "# round $round: primary 127.0.0.1:$primary and one synchronous standby (node $gone killed)"
    kill -KILL $(bash $cluster pids "$gone" --port "$HA_PORT")
    PGURL="postgres://postgres@$hosts" PGBENCH_PORT=$primary REQUIRE_SYNC_STANDBYS=1 \
        benches/write-path.sh "$WALLETS"
    bash $cluster restart "$gone" --port "$HA_PORT" >/dev/null
    for _ in $(seq 60); do bash $cluster healthy --port "$HA_PORT" >/dev/null 2>&1 && break; sleep 1; done
done
