#!/usr/bin/env bash
# Local three-node RabbitMQ cluster on one machine, for HA tests and demos.
#
#   rabbit-cluster.sh start   [--dir DIR] [--port BASE] [--name PREFIX]
#   rabbit-cluster.sh stop    [--dir DIR] [--port BASE]
#   rabbit-cluster.sh status  [--dir DIR] [--port BASE]
#   rabbit-cluster.sh urls    [--dir DIR] [--port BASE]
#   rabbit-cluster.sh pid N   [--dir DIR] [--port BASE]      # OS pid of beam.smp of node N
#   rabbit-cluster.sh kill N [SIGNAL] [--dir ...]            # default SIGKILL; STOP/CONT work too
#   rabbit-cluster.sh restart N [--dir ...]                  # (re)start node N, it rejoins the cluster
#   rabbit-cluster.sh ctl [--dir ...] N ARGS...              # rabbitmqctl -n <node N> ARGS...
#   rabbit-cluster.sh queues [--dir ...] N ARGS...           # rabbitmq-queues -n <node N> ARGS...
#
# Nodes PREFIX-1@localhost .. PREFIX-3@localhost (PREFIX default wallet-ha), AMQP on
# 127.0.0.1:BASE..BASE+2 (BASE default 5681), Erlang distribution on BASE+20000..+2.
# All state lives in DIR (default /tmp/wallet-ha-rabbit-BASE); `stop` removes it.
# guest/guest works from loopback (RabbitMQ default).
#
# Environment: RABBIT_HA_DIR, RABBIT_HA_PORT, RABBIT_HA_NAME (defaults for the options),
# RABBIT_HA_TIMEOUT (seconds per bounded wait, default 90),
# RABBIT_HA_PARTITION_HANDLING (default autoheal), RABBIT_HA_NET_TICKTIME (seconds, default 60
# like RabbitMQ: a SIGSTOPped node is declared down after 0.75..1.25 x this),
# RABBITMQ_BIN_DIR (where the real rabbitmq-server/rabbitmqctl scripts are).
#
# Isolation from a RabbitMQ node already running on the machine: the cluster has its own
# Erlang cookie (in DIR/home, used as HOME by nodes and CLI), its own rabbitmq-env.conf,
# config, enabled_plugins file and data dirs. Because the cookie differs, nothing this
# script runs can even connect to another node, and signals only go to beam processes
# whose command line carries this cluster's DIR.
set -euo pipefail

readonly NODES=(1 2 3)
CMD=""
ARGS=()
DIR="${RABBIT_HA_DIR:-}"
BASE="${RABBIT_HA_PORT:-5681}"
PREFIX="${RABBIT_HA_NAME:-wallet-ha}"
TIMEOUT="${RABBIT_HA_TIMEOUT:-90}"
PARTITION_HANDLING="${RABBIT_HA_PARTITION_HANDLING:-autoheal}"
TICKTIME="${RABBIT_HA_NET_TICKTIME:-60}"
PORT_GIVEN=0
NAME_GIVEN=0

die() { echo "rabbit-cluster: error: $*" >&2; exit 1; }
log() { echo "rabbit-cluster: $*" >&2; }

usage() {
    sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

# --- arguments ---------------------------------------------------------------

parse_args() {
    [[ $# -gt 0 ]] || usage 2
    CMD="$1"; shift
    while [[ $# -gt 0 ]]; do
        # ctl/queues: everything after N belongs to the RabbitMQ tool.
        if [[ ( $CMD == ctl || $CMD == queues ) && ${#ARGS[@]} -ge 1 ]]; then
            ARGS+=("$@"); break
        fi
        case "$1" in
            --dir)    [[ $# -ge 2 ]] || die "--dir needs a value"; DIR="$2"; shift 2 ;;
            --port)   [[ $# -ge 2 ]] || die "--port needs a value"; BASE="$2"; PORT_GIVEN=1; shift 2 ;;
            --name)   [[ $# -ge 2 ]] || die "--name needs a value"; PREFIX="$2"; NAME_GIVEN=1; shift 2 ;;
            -h|--help) usage 0 ;;
            --) shift; ARGS+=("$@"); break ;;
            *)        ARGS+=("$1"); shift ;;
        esac
    done
    if ! [[ $BASE =~ ^[0-9]+$ ]] || (( BASE < 1024 || BASE + 20002 > 65535 )); then
        die "--port must be a number in 1024..45533 (dist ports are BASE+20000..+2)"
    fi
    [[ $PREFIX =~ ^[A-Za-z0-9_-]+$ ]] || die "--name may only contain letters, digits, '-' and '_'"
    [[ $TIMEOUT =~ ^[0-9]+$ ]] || die "RABBIT_HA_TIMEOUT must be a number of seconds"
    [[ $TICKTIME =~ ^[0-9]+$ ]] || die "RABBIT_HA_NET_TICKTIME must be a number of seconds"
    DIR="${DIR:-/tmp/wallet-ha-rabbit-$BASE}"
    DIR="$(realpath -m -- "$DIR")"
    [[ $DIR != / && $DIR =~ ^/[^[:space:]]+$ ]] || die "--dir must be a path without whitespace (and not /)"
}

# A running cluster's settings win over defaults, so `stop --dir X` needs no --port.
load_saved_settings() {
    local f="$DIR/cluster.env" port name
    [[ -f $f ]] || return 0
    port="$(sed -n 's/^BASE=//p' "$f")"
    name="$(sed -n 's/^PREFIX=//p' "$f")"
    if [[ $PORT_GIVEN == 1 && $port != "$BASE" ]] || [[ $NAME_GIVEN == 1 && $name != "$PREFIX" ]]; then
        die "$DIR belongs to a cluster with --port $port --name $name"
    fi
    BASE="$port"; PREFIX="$name"
    TICKTIME="$(sed -n 's/^TICKTIME=//p' "$f")"; TICKTIME="${TICKTIME:-60}"
}

# --- naming and layout ---------------------------------------------------------

# Debian's /usr/sbin/rabbitmq* wrappers `su` to the rabbitmq user and force
# HOME=/var/lib/rabbitmq (the main node's cookie), so call the real scripts.
find_bin_dir() {
    if [[ -n ${RABBITMQ_BIN_DIR:-} ]]; then echo "$RABBITMQ_BIN_DIR"
    elif [[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]]; then echo /usr/lib/rabbitmq/bin
    else
        local s; s="$(command -v rabbitmq-server)" || die "rabbitmq-server not found (set RABBITMQ_BIN_DIR)"
        dirname "$(readlink -f "$s")"
    fi
}

node_name() { echo "$PREFIX-$1@localhost"; }
node_dir()  { echo "$DIR/node$1"; }
amqp_port() { echo $(( BASE + $1 - 1 )); }
dist_port() { echo $(( BASE + 20000 + $1 - 1 )); }

check_node_index() {
    [[ ${1:-} =~ ^[123]$ ]] || die "node index must be 1, 2 or 3 (got '${1:-}')"
}

# Environment shared by server and CLI: our cookie (HOME) and our rabbitmq-env.conf
# instead of /etc/rabbitmq/rabbitmq-env.conf (which may set NODENAME=rabbit@...).
common_env() {
    echo "HOME=$DIR/home"
    echo "RABBITMQ_CONF_ENV_FILE=$DIR/rabbitmq-env.conf"
    echo "RABBITMQ_USE_LONGNAME=false"
    echo "ERL_EPMD_ADDRESS=127.0.0.1"   # only matters if we are the ones starting epmd
    # CLI must tick like the nodes, or a node with a short ticktime drops long CLI calls.
    echo "RABBITMQ_CTL_ERL_ARGS=-kernel net_ticktime $TICKTIME"
}

server_env() {
    local n="$1" d; d="$(node_dir "$1")"
    common_env
    echo "RABBITMQ_NODENAME=$(node_name "$n")"
    echo "RABBITMQ_DIST_PORT=$(dist_port "$n")"
    echo "RABBITMQ_CONFIG_FILE=$d/rabbitmq.conf"
    echo "RABBITMQ_ADVANCED_CONFIG_FILE=$d/advanced.config"
    echo "RABBITMQ_ENABLED_PLUGINS_FILE=$DIR/enabled_plugins"
    echo "RABBITMQ_MNESIA_BASE=$d/mnesia"
    echo "RABBITMQ_LOG_BASE=$d/log"
    echo "RABBITMQ_PID_FILE=$d/pid"
    # Distribution on loopback only; -wallet_ha_dir is an inert init flag that tags the
    # beam command line so we can find (and only ever signal) our own processes.
    echo "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=-kernel inet_dist_use_interface {127,0,0,1} -kernel net_ticktime $TICKTIME -wallet_ha_dir $d"
}

# Run a RabbitMQ CLI tool against node N, bounded by TIMEOUT.
cli() {
    local tool="$1" n="$2"; shift 2
    local -a envs; mapfile -t envs < <(common_env)
    (cd "$DIR" && timeout --kill-after=5 "$((TIMEOUT + 10))" \
        env "${envs[@]}" "$BIN/$tool" -n "$(node_name "$n")" "$@")
}
ctl() { cli rabbitmqctl "$@"; }

# --- processes -----------------------------------------------------------------

# Is PID a beam of node N of this cluster? (pid files go stale after SIGKILL.)
pid_is_node() {
    local pid="$1" n="$2" cmdline
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    cmdline="$(tr "\\0" " " 2>/dev/null < "/proc/$pid/cmdline")" || return 1
    [[ "$cmdline " == *" -wallet_ha_dir $(node_dir "$n") "* ]]
}

# OS pid of node N's beam.smp, or nothing. Pid file first, /proc scan as fallback
# (the pid file is written a moment after the beam starts).
node_pid() {
    local n="$1" pid f
    f="$(node_dir "$n")/pid"
    if [[ -f $f ]]; then
        pid="$(tr -dc '0-9' < "$f")"
        if pid_is_node "$pid" "$n"; then echo "$pid"; return 0; fi
    fi
    for f in /proc/[0-9]*; do
        pid="${f#/proc/}"
        if pid_is_node "$pid" "$n"; then echo "$pid"; return 0; fi
    done
    return 0
}

proc_state() {   # R/S/T(stopped)/... from /proc/PID/stat
    sed -n 's/^[0-9]* (.*) \(.\) .*/\1/p' "/proc/$1/stat" 2>/dev/null
}

wait_pid_gone() {
    local pid="$1" secs="$2" i
    for (( i = 0; i < secs * 5; i++ )); do
        [[ -d /proc/$pid ]] || return 0
        sleep 0.2
    done
    return 1
}

# SIGCONT (a test may have SIGSTOPped it), SIGTERM (beam shuts down cleanly), then
# SIGKILL if it is still there after the bounded wait.
stop_node() {
    local n="$1" pid
    pid="$(node_pid "$n")"
    [[ -n $pid ]] || return 0
    kill -CONT "$pid" 2>/dev/null || true
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_pid_gone "$pid" 30; then
        log "node $n (pid $pid) ignored SIGTERM for 30s, sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        wait_pid_gone "$pid" 10 || die "node $n (pid $pid) survived SIGKILL"
    fi
}

launch_node() {
    local n="$1" d; d="$(node_dir "$n")"
    local -a envs; mapfile -t envs < <(server_env "$n")
    rm -f "$d/pid"
    # -detached: beam daemonizes; boot errors end up in $d/log/<node>.log.
    (cd "$DIR" && env "${envs[@]}" "$BIN/rabbitmq-server" -detached) \
        > "$d/log/launch.out" 2>&1 || die "rabbitmq-server for node $n failed: $(cat "$d/log/launch.out")"
}

# await_startup fails at once while the node is not yet registered with epmd, so first
# poll ping (bounded; gives up early once the beam is gone), then let await_startup
# wait for the rabbit app itself.
await_node() {
    local n="$1" t0=$SECONDS deadline=$(( SECONDS + TIMEOUT ))
    until node_responds "$n"; do
        (( SECONDS < deadline )) || break
        if (( SECONDS - t0 >= 3 )) && [[ -z $(node_pid "$n") ]]; then
            log "node $n: beam.smp exited during boot"; break
        fi
        sleep 0.5
    done
    if ! ctl "$n" -q await_startup --timeout "$(( deadline > SECONDS ? deadline - SECONDS : 1 ))" > /dev/null 2>&1; then
        log "node $n ($(node_name "$n")) did not boot within ${TIMEOUT}s; last log lines:"
        tail -n 20 "$(node_dir "$n")/log/$(node_name "$n").log" >&2 2>/dev/null || true
        cat "$(node_dir "$n")/log/launch.out" >&2 2>/dev/null || true
        die "node $n failed to start"
    fi
}

node_responds() { ctl "$1" -q -t 5 ping > /dev/null 2>&1; }

# --- preparation -----------------------------------------------------------------

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

check_free() {
    local n p
    for n in "${NODES[@]}"; do
        for p in "$(amqp_port "$n")" "$(dist_port "$n")"; do
            ! port_in_use "$p" || die "port $p is already in use (pick another --port)"
        done
    done
    # Node names are per host in epmd, so two clusters need different --name.
    if command -v epmd > /dev/null; then
        for n in "${NODES[@]}"; do
            ! epmd -names 2>/dev/null | grep -q "^name $PREFIX-$n at port" \
                || die "an Erlang node named $PREFIX-$n is already registered in epmd (pick another --name)"
        done
    fi
}

write_layout() {
    local n d
    mkdir -p "$DIR/home"
    : > "$DIR/.wallet-ha-rabbit"          # marker: `stop` only deletes dirs carrying it
    printf 'BASE=%s\nPREFIX=%s\nTICKTIME=%s\n' "$BASE" "$PREFIX" "$TICKTIME" > "$DIR/cluster.env"
    # One cookie shared by the three nodes and the CLI (RABBITMQ_ERLANG_COOKIE is deprecated).
    od -An -N24 -tx1 /dev/urandom | tr -d ' \n' > "$DIR/home/.erlang.cookie"
    chmod 400 "$DIR/home/.erlang.cookie"
    : > "$DIR/rabbitmq-env.conf"          # shadows /etc/rabbitmq/rabbitmq-env.conf
    echo '[].' > "$DIR/enabled_plugins"   # no management plugin, no port clashes
    for n in "${NODES[@]}"; do
        d="$(node_dir "$n")"
        mkdir -p "$d/mnesia" "$d/log"
        cat > "$d/rabbitmq.conf" <<EOF
listeners.tcp.1 = 127.0.0.1:$(amqp_port "$n")
loopback_users.guest = true
cluster_name = $PREFIX-$BASE
# autoheal, not pause_minority: after a SIGSTOP longer than the net ticktime the frozen
# node reconnects before it notices it was in a minority, and pause_minority then
# leaves the Mnesia partition in place for good; autoheal restarts the losing side.
cluster_partition_handling = $PARTITION_HANDLING
EOF
    done
}

join_to_first() {
    local n="$1" first; first="$(node_name 1)"
    ctl "$n" -q stop_app > /dev/null        || die "stop_app on node $n failed"
    ctl "$n" -q join_cluster "$first" > /dev/null || die "node $n could not join $first"
    ctl "$n" -q start_app > /dev/null       || die "start_app on node $n failed"
    await_node "$n"
}

running_count() {
    ctl 1 -q eval 'length(rabbit_mnesia:cluster_nodes(running)).' 2>/dev/null | tr -dc '0-9'
}

await_cluster() {
    local i c=""
    for (( i = 0; i < TIMEOUT * 2; i++ )); do
        c="$(running_count || true)"
        [[ $c == 3 ]] && return 0
        sleep 0.5
    done
    die "cluster did not reach 3 running nodes within ${TIMEOUT}s (running: ${c:-?})"
}

# --- commands --------------------------------------------------------------------

alive_nodes() {
    local n
    for n in "${NODES[@]}"; do [[ -z $(node_pid "$n") ]] || echo "$n"; done
}

cmd_start() {
    local alive n t0=$SECONDS
    if [[ -f $DIR/cluster.env ]]; then
        alive="$(alive_nodes | xargs)"
        if [[ $alive == "1 2 3" ]] && node_responds 1; then
            log "cluster already running in $DIR"
            cmd_urls; return 0
        fi
        [[ -z $alive ]] || die "cluster in $DIR is partially running (nodes up: $alive); use 'restart N' or 'stop'"
        log "removing stale state in $DIR"
        remove_dir
    elif [[ -e $DIR && -n $(ls -A "$DIR" 2>/dev/null) ]]; then
        die "$DIR exists and is not a cluster directory of this script"
    fi
    check_free
    write_layout
    # A half-built cluster is useless: kill it, keep DIR for its logs (next start wipes it).
    trap 'on_start_failure' EXIT
    for n in "${NODES[@]}"; do launch_node "$n"; done    # boot in parallel
    for n in "${NODES[@]}"; do await_node "$n"; done
    join_to_first 2
    join_to_first 3
    await_cluster
    trap - EXIT
    log "cluster up in $(( SECONDS - t0 ))s: $(node_name 1), $(node_name 2), $(node_name 3) (dir $DIR)"
    cmd_urls
}

on_start_failure() {
    local n
    trap - EXIT
    for n in "${NODES[@]}"; do stop_node "$n" & done
    wait
    sweep_strays
    log "start failed; nodes stopped, logs kept in $DIR/node*/log ('stop' removes them)"
}

remove_dir() {
    [[ -f $DIR/.wallet-ha-rabbit ]] || die "refusing to delete $DIR: no .wallet-ha-rabbit marker"
    rm -rf -- "$DIR"
}

# Any beam still carrying this DIR on its command line (e.g. lost pid file).
sweep_strays() {
    local f pid cmdline
    for f in /proc/[0-9]*; do
        pid="${f#/proc/}"
        cmdline="$(tr "\\0" " " 2>/dev/null < "$f/cmdline")" || continue
        if [[ "$cmdline " == *" -wallet_ha_dir $DIR/node"[123]" "* ]]; then
            log "killing stray beam $pid"
            kill -CONT "$pid" 2>/dev/null || true
            kill -KILL "$pid" 2>/dev/null || true
            wait_pid_gone "$pid" 10 || true
        fi
    done
}

cmd_stop() {
    local n
    if [[ ! -e $DIR ]]; then log "nothing in $DIR, not running"; return 0; fi
    for n in "${NODES[@]}"; do stop_node "$n" & done   # in parallel, each bounded
    wait
    sweep_strays
    remove_dir
    log "stopped, removed $DIR"
}

cmd_status() {
    local n pid state up=""
    [[ -f $DIR/cluster.env ]] || die "no cluster in $DIR"
    for n in "${NODES[@]}"; do
        pid="$(node_pid "$n")"
        if [[ -z $pid ]]; then state="down"
        elif [[ $(proc_state "$pid") == T ]]; then state="SIGSTOPped"
        elif node_responds "$n"; then state="running"; up="${up:-$n}"
        else state="not responding"
        fi
        printf '%s  amqp 127.0.0.1:%s  pid %s  %s\n' "$(node_name "$n")" "$(amqp_port "$n")" "${pid:--}" "$state"
    done
    [[ -n $up ]] || die "no node responds"
    ctl "$up" cluster_status
}

cmd_urls() {
    local n out=()
    for n in "${NODES[@]}"; do out+=("amqp://guest:guest@127.0.0.1:$(amqp_port "$n")/%2f"); done
    (IFS=,; echo "${out[*]}")
}

cmd_pid() {
    local n="${ARGS[0]:-}" pid
    check_node_index "$n"
    pid="$(node_pid "$n")"
    [[ -n $pid ]] || die "node $n is not running"
    echo "$pid"
}

cmd_kill() {
    local n="${ARGS[0]:-}" sig="${ARGS[1]:-KILL}" pid
    check_node_index "$n"
    pid="$(node_pid "$n")"
    [[ -n $pid ]] || die "node $n is not running"
    kill -s "${sig#SIG}" "$pid"
    if [[ ${sig#SIG} == KILL ]]; then wait_pid_gone "$pid" 10 || die "pid $pid still there"; fi
    log "sent SIG${sig#SIG} to node $n (pid $pid)"
}

# Node keeps its data dir, so it rejoins the cluster by itself.
cmd_restart() {
    local n="${ARGS[0]:-}" t0=$SECONDS
    check_node_index "$n"
    [[ -f $DIR/cluster.env ]] || die "no cluster in $DIR"
    stop_node "$n"
    ! port_in_use "$(amqp_port "$n")" || die "port $(amqp_port "$n") still in use"
    launch_node "$n"
    await_node "$n"
    log "node $n restarted in $(( SECONDS - t0 ))s (pid $(node_pid "$n"))"
}

cmd_tool() {
    local tool="$1" n="${ARGS[0]:-}"
    check_node_index "$n"
    [[ -f $DIR/cluster.env ]] || die "no cluster in $DIR"
    cli "$tool" "$n" "${ARGS[@]:1}"
}

main() {
    parse_args "$@"
    load_saved_settings
    BIN="$(find_bin_dir)"
    case "$CMD" in
        start)   cmd_start ;;
        stop)    cmd_stop ;;
        status)  cmd_status ;;
        urls)    cmd_urls ;;
        pid)     cmd_pid ;;
        kill)    cmd_kill ;;
        restart) cmd_restart ;;
        ctl)     cmd_tool rabbitmqctl ;;
        queues)  cmd_tool rabbitmq-queues ;;
        help|-h|--help) usage 0 ;;
        *) log "unknown command '$CMD'"; usage 2 ;;
    esac
}

main "$@"
