#!/usr/bin/env bash
# pg-cluster.sh: a local PostgreSQL 15 high-availability cluster under
# pg_auto_failover 2.0 on one machine, for tests and for trying failover by hand.
#
#   start   [--dir DIR] [--port BASE]   monitor on 127.0.0.1:BASE (default 6500),
#           data nodes node1..node3 on BASE+1..BASE+3, database "wallet", trust
#           auth, no SSL, formation "default" with number_sync_standbys = 1, so the
#           primary runs synchronous_standby_names = 'ANY 1 (pgautofailover_standby_N, ...)'.
#           DIR (default /tmp/wallet-ha-BASE) holds all data, pg_autoctl config and
#           state, and the keeper logs DIR/{monitor,node1,node2,node3}.log.
#           Exits 0 when the cluster is already running; wipes a stale or crashed DIR.
#   stop    SIGCONT, pg_autoctl stop, SIGKILL what is left, remove DIR. Safe with
#           frozen or killed nodes; only ever touches processes whose cwd is in DIR.
#   status  `pg_autoctl show state` plus the primary's port.
#   url     postgres://postgres@127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3/wallet
#           (libpq clients: add ?target_session_attrs=read-write).
#   primary port(s) answering pg_is_in_recovery() = false; exit 1 if none, 3 if several.
#   pids N  "POSTMASTER KEEPER [KEEPER_CHILD...]" of node N (1..3): every pg_autoctl
#           process is listed because killing only the supervisor leaves its postgres
#           child running. `kill -KILL $(pg-cluster.sh pids 1)` is a machine loss.
#   procs N / postmaster N / walsenders N / restart N / healthy: see usage().
# Run as root (pg_autoctl then runs as postgres via runuser) or as postgres.
#
# Measured on a busy 2-core VM, with the tuning below (n = runs):
#   start to primary + 2 healthy sync secondaries: 6-13 s, typically 8 s (n=20).
#   SIGKILL the primary's postmaster, keeper alive: no quiet local restart. The keeper
#     reports "Postgres not running", the monitor starts an election at once, the keeper
#     restarts Postgres in ~1 s, and the old primary usually wins again (highest LSN):
#     it is promoted onto a new timeline and the standbys restart. Writes are back
#     after 3.6-4.5 s (n=4). Once, with slower tuning, node2 won instead (5.2 s).
#   SIGKILL the postmaster and all keeper processes (machine loss): another node is
#     primary and takes writes after 10.4-11.1 s (n=3). The dead node stays down: `restart N`.
#   SIGSTOP the postmaster and keeper for 25 s: new primary after 11.1-11.7 s (n=2).
#     After SIGCONT the old keeper demotes its Postgres within ~0.2 s (pg_ctl stop
#     --mode fast), pg_rewinds, is read-only by +1.6-2.7 s and secondary by ~+4 s. It never
#     answered pg_is_in_recovery() = false and never acknowledged a write.
#   Both standbys frozen (all their processes): every commit on the primary waits for
#     synchronous replication until one comes back. synchronous_standby_names stays
#     'ANY 1 (...)' the whole time (pg_auto_failover only sets '' when
#     number_sync_standbys = 0). The standbys are marked unhealthy and given goal
#     catchingup; the primary stays primary.
# Things to know:
#   - A write in flight at a failure can commit locally and still fail at the client
#     with "canceling the wait for synchronous replication ... The transaction has
#     already committed locally". Later it is either kept (same node re-elected) or
#     rewound (another node promoted). Treat it as an unknown outcome and retry with
#     the same request id.
#   - SIGSTOP of a postmaster does not stop its backends, WAL receiver or WAL senders:
#     a standby frozen this way keeps acknowledging sync replication. `procs N` lists
#     every process of a node, for a full freeze.
#   - If a primary's postmaster is resumed while its keeper stays frozen, it still says
#     pg_is_in_recovery() = false next to the new primary (`primary` exits 3). Its
#     commits hang on sync replication, so none is acknowledged, until the keeper
#     resumes and demotes it.
#   - pg_rewind copies the new primary's log/ over the old one's, so a failed
#     primary's server log is lost; DIR/nodeN.log (pg_autoctl) survives.
set -euo pipefail

PG_BIN=/usr/lib/postgresql/15/bin
MARKER=.wallet-ha-cluster      # only a DIR holding this file is ever removed
DATA_NODES=(node1 node2 node3)

# --- Failover tuning (monitor GUCs, pg_auto_failover 2.0; defaults in brackets) ---
# health_check_period: how often the monitor's background worker probes each
#   node with a libpq connection (pg_isready style) [5000 ms].
MON_HEALTH_CHECK_PERIOD=1000
# health_check_timeout: connect timeout of one probe; a frozen (SIGSTOPped)
#   postmaster accepts the TCP connection but never answers, so this is what
#   detects it [5000 ms].
MON_HEALTH_CHECK_TIMEOUT=1000
# health_check_max_retries / health_check_retry_delay: failed probes are retried
#   this many times, this far apart, before the node's health becomes bad
#   [2 / 2000 ms].
MON_HEALTH_CHECK_MAX_RETRIES=1
MON_HEALTH_CHECK_RETRY_DELAY=1000
# node_considered_unhealthy_timeout: a node is declared unhealthy only when its
#   health is bad AND its keeper has not called node_active for this long
#   (keepers report every ~1 s, seen up to ~3 s late on a busy 2-core box);
#   this is the main failover delay [20000 ms]. Needing both a silent keeper
#   and failed probes keeps a slow but live node from being failed over.
MON_UNHEALTHY_TIMEOUT=4000
# primary_demote_timeout: once a standby is ready to be promoted the monitor
#   waits this long for the old primary to confirm it has demoted itself; a
#   dead or frozen primary never confirms, so every real failover pays it
#   [30000 ms]. Keep it above the keepers' network_partition_timeout (below).
MON_PRIMARY_DEMOTE_TIMEOUT=4000
# startup_grace_period: no failover in the first N ms after the monitor starts
#   [10000 ms]; left at its default.

# --- Keeper tuning (pg_autoctl.cfg [timeout] of each data node) ---
# network_partition_timeout: a primary that can reach neither the monitor nor
#   any standby for this long demotes itself (split-brain guard) [20 s]. It
#   must be shorter than primary_demote_timeout so that the old primary has
#   stopped before the monitor promotes another node.
KEEPER_NETWORK_PARTITION_TIMEOUT=3
# prepare_promotion_walreceiver: how long a promotion candidate waits for its
#   WAL receiver to stop before promoting [5 s].
KEEPER_PREPARE_PROMOTION_WALRECEIVER=2

START_TIMEOUT=180   # seconds for the whole `start`
STOP_TIMEOUT=20     # seconds for keepers to stop before SIGKILL

die() { echo "pg-cluster: error: $*" >&2; exit 1; }
say() { echo "pg-cluster: $*" >&2; }

usage() {
  cat >&2 <<EOF
usage: $0 start   [--dir DIR] [--port BASE]
       $0 stop    [--dir DIR] [--port BASE]
       $0 status  [--dir DIR] [--port BASE]
       $0 url     [--dir DIR] [--port BASE]
       $0 primary [--dir DIR] [--port BASE]
       $0 pids NODE [--dir DIR] [--port BASE]     (NODE: 1, 2 or 3)
       $0 procs NODE | postmaster NODE | walsenders NODE | restart NODE  [--dir DIR] [--port BASE]
       $0 healthy [--dir DIR] [--port BASE]       (exit 0: a primary, 2 healthy secondaries, sync on)
EOF
  exit 2
}

# ---------- arguments ----------

parse_args() {
  CMD=${1:-}; [ -n "$CMD" ] || usage; shift
  BASE=6500; DIR=""; NODE=""
  while [ $# -gt 0 ]; do
    case $1 in
      --dir)  [ $# -ge 2 ] || usage; DIR=$2; shift 2 ;;
      --port) [ $# -ge 2 ] || usage; BASE=$2; shift 2 ;;
      [1-3])  NODE=$1; shift ;;
      *)      usage ;;
    esac
  done
  [[ $BASE =~ ^[0-9]+$ ]] && [ "$BASE" -ge 1024 ] && [ "$BASE" -le 65532 ] \
    || die "--port must be a number in 1024..65532"
  DIR=${DIR:-/tmp/wallet-ha-$BASE}
  DIR=$(realpath -m -- "$DIR")
  [ "$DIR" != / ] || die "refusing --dir /"
}

port_of() { echo $((BASE + $1)); }             # node N listens on BASE+N
pgdata_of() { echo "$DIR/$1"; }                # $1: monitor|node1|node2|node3

# ---------- running things as postgres ----------

# pg_autoctl refuses root; a clean environment with XDG dirs inside DIR keeps
# its config, state and pid files in DIR, so removing DIR forgets everything.
as_pg() {
  local envv=(env -i PATH="$PG_BIN:/usr/bin:/bin" HOME="$DIR" LANG=C.UTF-8
              XDG_CONFIG_HOME="$DIR/xdg/config" XDG_DATA_HOME="$DIR/xdg/data"
              XDG_RUNTIME_DIR="$DIR/xdg/run")
  if [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- "${envv[@]}" "$@"
  elif [ "$(id -un)" = postgres ]; then
    "${envv[@]}" "$@"
  else
    die "run as root or as postgres"
  fi
}

autoctl() { as_pg pg_autoctl "$@"; }

# Run in the foreground as postgres, output appended to DIR/NAME.log (a log
# created by root would not be writable by the keeper later).
as_pg_logged() {
  local name=$1; shift
  as_pg sh -c 'log=$1 && shift && exec "$@" >>"$log" 2>&1 </dev/null' sh "$DIR/$name.log" "$@"
}

log_tail() { echo; tail -n 8 "$DIR/$1.log" 2>/dev/null | sed 's/^/    /'; }

# Start a long-running pg_autoctl in its own session, detached from our
# stdio (so callers capturing our output are not held open), cwd DIR (which
# is how stop finds every process of this cluster), log in DIR/NAME.log.
launch() {
  local name=$1; shift
  as_pg setsid -f sh -c 'cd "$1" && log=$2 && shift 2 && exec "$@" >>"$log" 2>&1 </dev/null' \
    sh "$DIR" "$DIR/$name.log" "$@"
}

# psql with bounded connect time: a SIGSTOPped postmaster accepts TCP but
# never answers, so both libpq's timeout and an outer timeout are needed.
sql() {
  local port=$1 db=$2 query=$3
  PGCONNECT_TIMEOUT=2 timeout 10 psql -X -q -At -h 127.0.0.1 -p "$port" \
    -U postgres -d "$db" -c "$query" 2>/dev/null
}
mon_sql() { sql "$BASE" pg_auto_failover "$1"; }

# Statements from stdin, each in its own transaction (ALTER SYSTEM needs it).
sql_script() {
  PGCONNECT_TIMEOUT=2 timeout 10 psql -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 \
    -p "$1" -U postgres -d "$2" -f - >/dev/null
}

# ---------- waiting ----------

# wait_for SECONDS WHAT CMD...: poll CMD every 0.5 s until it succeeds.
# With WAIT_GUARD=NAME set, give up early when that node's keeper has died.
wait_for() {
  local secs=$1 what=$2; shift 2
  local t0=$SECONDS guard=${WAIT_GUARD:-}
  until "$@" >/dev/null; do
    [ $((SECONDS - t0)) -lt "$secs" ] || die "timed out after ${secs}s waiting for $what (logs: $DIR/*.log)"
    if [ -n "$guard" ] && [ $((SECONDS - t0)) -ge 3 ] && ! supervisor_alive "$guard"; then
      die "keeper of $guard exited while waiting for $what:$(log_tail "$guard")"
    fi
    sleep 0.5
  done
}

remaining() { echo $((START_DEADLINE - SECONDS > 5 ? START_DEADLINE - SECONDS : 5)); }

# ---------- processes ----------

# PID $1 is a live (not zombie: PID 1 may reap late) process named $2.
alive_as() {
  local c st
  read -r c 2>/dev/null <"/proc/$1/comm" && [ "$c" = "$2" ] || return 1
  read -r st 2>/dev/null <"/proc/$1/stat" || return 1
  st=${st##*) }
  [ "${st%% *}" != Z ]
}

# Every pg_autoctl/postgres process whose cwd is DIR or below: keepers are
# launched in DIR, postmasters and their backends chdir into their PGDATA.
cluster_procs() {
  local p cwd comm
  for p in /proc/[0-9]*; do
    read -r comm 2>/dev/null <"$p/comm" || continue
    case $comm in pg_autoctl|postgres|pg_ctl|pg_basebackup|pg_rewind|initdb) ;; *) continue ;; esac
    cwd=$(readlink "$p/cwd" 2>/dev/null) || continue
    [[ $cwd == "$DIR" || $cwd == "$DIR/"* || $cwd == "$DIR (deleted)" ]] && echo "${p#/proc/}"
  done
  return 0
}

postmaster_pid() {                      # $1: pgdata name
  local f pid
  f="$(pgdata_of "$1")/postmaster.pid"
  pid=$(head -1 "$f" 2>/dev/null) || return 1
  alive_as "$pid" postgres && echo "$pid"
}

# Supervisor pid (line 1 of pg_autoctl.pid) then its service children
# (lines "PID name"); SIGKILL of the supervisor alone leaves the postgres
# service child and postgres running, so a "machine loss" must kill them all.
keeper_pids() {
  local f="$DIR/xdg/run/pg_autoctl$(pgdata_of "$1")/pg_autoctl.pid" p
  [ -r "$f" ] || return 0
  for p in $(awk 'NR == 1 || /^[0-9]+ [a-z-]+$/ { print $1 }' "$f"); do
    alive_as "$p" pg_autoctl && echo "$p"
  done
  return 0
}

supervisor_alive() {
  local f="$DIR/xdg/run/pg_autoctl$(pgdata_of "$1")/pg_autoctl.pid"
  [ -r "$f" ] && alive_as "$(head -1 "$f")" pg_autoctl
}

is_running() {
  local n
  [ -f "$DIR/$MARKER" ] || return 1
  for n in monitor "${DATA_NODES[@]}"; do supervisor_alive "$n" || return 1; done
}

# ---------- start ----------

check_ports_free() {
  local p
  for p in $(seq "$BASE" $((BASE + 3))); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      die "port $p on 127.0.0.1 is already in use (choose another --port)"
    fi
  done
}

make_dir() {
  if [ -e "$DIR" ] && [ ! -f "$DIR/$MARKER" ] && [ -n "$(ls -A "$DIR" 2>/dev/null)" ]; then
    die "$DIR exists and is not a cluster directory made by this script"
  fi
  mkdir -p "$DIR/xdg/config" "$DIR/xdg/data" "$DIR/xdg/run"
  touch "$DIR/$MARKER"
  chmod 700 "$DIR/xdg/run"
  [ "$(id -u)" != 0 ] || chown -R postgres: "$DIR"
  as_pg test -w "$DIR" || die "user postgres cannot write to $DIR"
}

create_monitor() {
  # No --listen option for monitors: create, then restrict listen_addresses.
  as_pg_logged monitor pg_autoctl create monitor --pgdata "$(pgdata_of monitor)" \
    --pgport "$BASE" --hostname 127.0.0.1 --auth trust --no-ssl --ssl-mode disable \
    || die "pg_autoctl create monitor failed: $(log_tail monitor)"
  autoctl config set --pgdata "$(pgdata_of monitor)" postgresql.listen_addresses 127.0.0.1 >/dev/null
  launch monitor pg_autoctl run --pgdata "$(pgdata_of monitor)"
  WAIT_GUARD=monitor wait_for "$(remaining)" "the monitor on port $BASE" \
    mon_sql "select 1 from pgautofailover.formation where formationid = 'default'"
}

tune_monitor() {
  sql_script "$BASE" pg_auto_failover <<EOF || die "could not tune the monitor"
alter system set pgautofailover.health_check_period = $MON_HEALTH_CHECK_PERIOD;
alter system set pgautofailover.health_check_timeout = $MON_HEALTH_CHECK_TIMEOUT;
alter system set pgautofailover.health_check_max_retries = $MON_HEALTH_CHECK_MAX_RETRIES;
alter system set pgautofailover.health_check_retry_delay = $MON_HEALTH_CHECK_RETRY_DELAY;
alter system set pgautofailover.node_considered_unhealthy_timeout = $MON_UNHEALTHY_TIMEOUT;
alter system set pgautofailover.primary_demote_timeout = $MON_PRIMARY_DEMOTE_TIMEOUT;
select pg_reload_conf();
EOF
}

monitor_uri() { echo "postgres://autoctl_node@127.0.0.1:$BASE/pg_auto_failover?sslmode=disable"; }

launch_node() {                          # $1: 1..3
  local n=node$1
  launch "$n" pg_autoctl create postgres --pgdata "$(pgdata_of "$n")" \
    --pgport "$(port_of "$1")" --pghost 127.0.0.1 --hostname 127.0.0.1 \
    --listen 127.0.0.1 --auth trust --no-ssl --ssl-mode disable \
    --dbname wallet --name "$n" --monitor "$(monitor_uri)" --run
}

node_state() {                           # "reported|goal|health" of node $1
  mon_sql "select reportedstate || '|' || goalstate || '|' || health
             from pgautofailover.node where nodename = '$1'"
}

node_is() { [ "$(node_state "$1")" = "$2|$2|1" ] || [ "$(node_state "$1")" = "$2|$2|-1" ]; }

# pg_basebackup (standby creation, and re-creation after a failover when
# pg_rewind is not possible) waits for a *spread* checkpoint, which takes
# ~0.9 * checkpoint_timeout = 4.5 min; completion target 0 makes every
# checkpoint run at full speed (the data set is tiny). Standbys inherit it
# through postgresql.auto.conf.
tune_first_node() {
  sql_script "$(port_of 1)" wallet <<EOF || die "could not tune node1"
alter system set checkpoint_completion_target = 0;
select pg_reload_conf();
EOF
}

# The keeper rewrites its pg_autoctl.cfg now and then, and a concurrent
# `config set` can then fail to parse it: retry, and check the result.
keeper_set() {                           # NODE KEY VALUE
  local i
  for i in 1 2 3 4 5 6; do
    autoctl config set --pgdata "$(pgdata_of "$1")" "$2" "$3" >/dev/null 2>&1 || true
    [ "$(autoctl config get --pgdata "$(pgdata_of "$1")" "$2" 2>/dev/null)" = "$3" ] && return 0
    sleep 0.5
  done
  die "could not set $2 = $3 on $1"
}

tune_keepers() {
  local n
  for n in "${DATA_NODES[@]}"; do
    keeper_set "$n" timeout.network_partition_timeout "$KEEPER_NETWORK_PARTITION_TIMEOUT"
    keeper_set "$n" timeout.prepare_promotion_walreceiver "$KEEPER_PREPARE_PROMOTION_WALRECEIVER"
  done
}

# 1 is already the default; set it explicitly (the monitor refuses while the
# group is in transition, hence the caller's retries).
set_sync_standbys() {
  [ "$(mon_sql "select number_sync_standbys from pgautofailover.formation
                 where formationid = 'default'")" = 1 ] && return 0
  mon_sql "select pgautofailover.set_formation_number_sync_standbys('default', 1)" >/dev/null
  return 1
}

cluster_ready() {
  local counts sync primary
  counts=$(mon_sql "select count(*) filter (where reportedstate = 'primary' and goalstate = 'primary')
                      || '|' || count(*) filter (where reportedstate = 'secondary' and goalstate = 'secondary')
                      || '|' || count(*) filter (where health = 1)
                    from pgautofailover.node where formationid = 'default'") || return 1
  [ "$counts" = "1|2|3" ] || return 1
  primary=$(find_primaries) || return 1
  sync=$(sql "$primary" wallet "show synchronous_standby_names") || return 1
  [[ $sync == "ANY 1 ("* ]]
}

start_cluster() {
  local t0=$SECONDS
  START_DEADLINE=$((SECONDS + START_TIMEOUT))
  if is_running; then say "cluster already running in $DIR (monitor port $BASE)"; return 0; fi
  if [ -e "$DIR" ]; then say "cleaning up a stopped or crashed cluster in $DIR"; stop_cluster; fi
  check_ports_free
  make_dir
  # A failed start stops what it started but keeps DIR (logs) for a look;
  # the next start or stop removes it.
  trap 'stop_procs; say "start failed; logs kept in $DIR"' EXIT
  create_monitor
  tune_monitor
  launch_node 1
  WAIT_GUARD=node1 wait_for "$(remaining)" "node1 to become single" node_is node1 single
  tune_first_node
  launch_node 2
  launch_node 3
  WAIT_GUARD=node2 wait_for "$(remaining)" "node2 to become secondary" node_is node2 secondary
  WAIT_GUARD=node3 wait_for "$(remaining)" "node3 to become secondary" node_is node3 secondary
  wait_for 30 "number_sync_standbys = 1" set_sync_standbys
  tune_keepers
  wait_for "$(remaining)" "primary + 2 healthy secondaries with sync replication" cluster_ready
  trap - EXIT
  say "cluster ready in $((SECONDS - t0))s (dir $DIR, monitor port $BASE)"
  print_status
  print_url
}

# ---------- stop ----------

# Segment ids from postmaster.pid (line 7: "key shmid"); a SIGKILLed
# postmaster leaves its small SysV segment behind.
shm_ids() {
  local n
  for n in monitor "${DATA_NODES[@]}"; do
    sed -n 7p "$(pgdata_of "$n")/postmaster.pid" 2>/dev/null | awk 'NF == 2 { print $2 }'
  done
  return 0
}

remove_orphan_shm() {
  local id
  for id in "$@"; do
    if ipcs -m -i "$id" 2>/dev/null | grep -q 'nattch=0'; then ipcrm -m "$id" 2>/dev/null || true; fi
  done
}

no_cluster_procs() { [ -z "$(cluster_procs)" ]; }

# pg_autoctl stop only reaches a live supervisor; when it was killed its
# children and postgres keep running on their own: stop those directly.
stop_orphans() {
  local pm
  ! supervisor_alive "$1" || return 0
  # shellcheck disable=SC2046
  kill -TERM $(keeper_pids "$1") 2>/dev/null || true
  if pm=$(postmaster_pid "$1"); then kill -QUIT "$pm" 2>/dev/null || true; fi
}

# Stop every process of the cluster: SIGCONT (a SIGSTOPped process ignores
# SIGTERM until continued), pg_autoctl stop, then SIGKILL what is left.
stop_procs() {
  local procs n shm
  shm=$(shm_ids)
  procs=$(cluster_procs)
  if [ -z "$procs" ]; then remove_orphan_shm $shm; return 0; fi
  # shellcheck disable=SC2086
  kill -CONT $procs 2>/dev/null || true
  for n in "${DATA_NODES[@]}" monitor; do
    [ -d "$(pgdata_of "$n")" ] || continue
    as_pg timeout 10 pg_autoctl stop --pgdata "$(pgdata_of "$n")" >/dev/null 2>&1 &
  done
  wait || true
  for n in "${DATA_NODES[@]}" monitor; do stop_orphans "$n"; done
  if ! (wait_for "$STOP_TIMEOUT" "keepers to stop" no_cluster_procs) 2>/dev/null; then
    say "still running after ${STOP_TIMEOUT}s, sending SIGKILL to: $(cluster_procs | tr '\n' ' ')"
    for _ in 1 2 3; do
      procs=$(cluster_procs)
      [ -n "$procs" ] || break
      # shellcheck disable=SC2086
      kill -CONT $procs 2>/dev/null; kill -KILL $procs 2>/dev/null || true
      sleep 1
    done
    no_cluster_procs || die "could not kill: $(cluster_procs | tr '\n' ' ')"
  fi
  # shellcheck disable=SC2086
  remove_orphan_shm $shm
}

stop_cluster() {
  if [ ! -e "$DIR" ]; then say "no cluster in $DIR"; return 0; fi
  [ -f "$DIR/$MARKER" ] || die "$DIR is not a cluster directory made by this script; not touching it"
  stop_procs
  rm -rf -- "$DIR"
  say "stopped; removed $DIR"
}

# ---------- queries ----------

# Ports of the nodes that answer pg_is_in_recovery() = false.
find_primaries() {
  local n port out=""
  for n in 1 2 3; do
    port=$(port_of $n)
    [ "$(sql "$port" wallet 'select pg_is_in_recovery()')" = f ] && out="$out $port"
  done
  [ -n "$out" ] || return 1
  echo $out
}

print_primary() {
  local p
  p=$(find_primaries) || die "no node accepts writes right now"
  echo "$p"
  [ "$(wc -w <<<"$p")" = 1 ] || { say "more than one node is out of recovery: $p"; exit 3; }
}

print_status() {
  local p
  autoctl show state --pgdata "$(pgdata_of monitor)" 2>/dev/null || say "monitor not answering on port $BASE"
  if p=$(find_primaries); then echo "primary port: $p"; else echo "primary port: none"; fi
}

print_url() {
  echo "postgres://postgres@127.0.0.1:$(port_of 1),127.0.0.1:$(port_of 2),127.0.0.1:$(port_of 3)/wallet"
}

print_pids() {
  local pm keepers
  [ -n "$NODE" ] || die "pids needs a node number (1, 2 or 3)"
  pm=$(postmaster_pid "node$NODE") || die "node$NODE: postmaster not running"
  keepers=$(keeper_pids "node$NODE")
  [ -n "$keepers" ] || die "node$NODE: keeper (pg_autoctl) not running"
  echo "$pm" $keepers
}

# Every process of one data node: its keeper's and the postgres processes
# running in its PGDATA (backends and WAL senders too), so a freeze stops
# the whole "machine", not only the postmaster.
print_node_procs() {
  local p cwd comm want
  [ -n "$NODE" ] || die "procs needs a node number (1, 2 or 3)"
  want=$(pgdata_of "node$NODE")
  keeper_pids "node$NODE"
  for p in /proc/[0-9]*; do
    read -r comm 2>/dev/null <"$p/comm" || continue
    [ "$comm" = postgres ] || continue
    cwd=$(readlink "$p/cwd" 2>/dev/null) || continue
    [ "$cwd" = "$want" ] && echo "${p#/proc/}"
  done
  return 0
}

# The WAL sender processes of a node (the primary's, one per standby):
# freezing them cuts replication while every node stays healthy.
print_walsenders() {
  local p
  [ -n "$NODE" ] || die "walsenders needs a node number (1, 2 or 3)"
  for p in $(print_node_procs); do
    tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -q 'walsender' && echo "$p"
  done
  return 0
}

print_postmaster() {
  [ -n "$NODE" ] || die "postmaster needs a node number (1, 2 or 3)"
  postmaster_pid "node$NODE" || die "node$NODE: postmaster not running"
}

# Start a killed node's keeper again: it rejoins (pg_rewind or a new base
# backup as needed) as a standby of whichever node leads now.
restart_node() {
  local n=node$NODE
  [ -n "$NODE" ] || die "restart needs a node number (1, 2 or 3)"
  [ -f "$DIR/$MARKER" ] || die "no cluster in $DIR"
  if supervisor_alive "$n"; then say "$n: keeper already running"; return 0; fi
  stop_orphans "$n"
  launch "$n" pg_autoctl run --pgdata "$(pgdata_of "$n")"
  WAIT_GUARD=$n wait_for 30 "$n's keeper to start" supervisor_alive "$n"
  say "$n: keeper started"
}

main() {
  parse_args "$@"
  cd /
  case $CMD in
    start)   start_cluster ;;
    stop)    stop_cluster ;;
    status)  [ -f "$DIR/$MARKER" ] || die "no cluster in $DIR"; print_status ;;
    url)     print_url ;;
    primary) print_primary ;;
    pids)    print_pids ;;
    procs)   print_node_procs ;;
    postmaster) print_postmaster ;;
    walsenders) print_walsenders ;;
    restart) restart_node ;;
    healthy) cluster_ready ;;
    *)       usage ;;
  esac
}

main "$@"
