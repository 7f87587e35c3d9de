#!/usr/bin/env bash
# A 3-node RabbitMQ cluster on this machine, for the cluster tests.
#
#   rabbitmq-cluster.sh start    start the three nodes (if needed), cluster them, print the URIs
#   rabbitmq-cluster.sh stop     stop the three nodes and delete their folders
#   rabbitmq-cluster.sh status   print the cluster status (exit 1 if the cluster is not formed)
#   rabbitmq-cluster.sh uris     print the comma-separated AMQP URIs of the three nodes
#   rabbitmq-cluster.sh nodes    print the three node names, one a line
#   rabbitmq-cluster.sh ctl N ARGS...      rabbitmqctl against node N (1, 2 or 3)
#   rabbitmq-cluster.sh queues N ARGS...   rabbitmq-queues against node N
#
# The nodes run beside a main RabbitMQ node (rabbit@<host>, port 5672) and never touch it:
# node names mfc1@localhost .. mfc3@localhost, AMQP ports 5681..5683, distribution ports
# 25681..25683, their own Erlang cookie, config, plugins (none) and data folders under
# ${MF_CLUSTER_DIR:-/tmp/mf-cluster}. Run as root (or as a user who may write that folder).
# `start` and `stop` are idempotent. A second cluster beside the first needs its own
# MF_CLUSTER_DIR, MF_CLUSTER_NAME (node names NAME1@localhost..) and MF_CLUSTER_PORT_BASE (AMQP
# ports BASE+1..BASE+3, distribution ports 20000 more).
set -euo pipefail

BASE="${MF_CLUSTER_DIR:-/tmp/mf-cluster}"
NAME="${MF_CLUSTER_NAME:-mfc}"
PORT_BASE="${MF_CLUSTER_PORT_BASE:-5680}"
RABBITMQ_BIN="${RABBITMQ_BIN:-/usr/lib/rabbitmq/bin}"
NODES=(1 2 3)
START_TIMEOUT=120

node_name() { echo "$NAME$1@localhost"; }
amqp_port() { echo $((PORT_BASE + $1)); }
dist_port() { echo $((20000 + PORT_BASE + $1)); }
node_dir() { echo "$BASE/$NAME$1"; }

# The cookie lives in $BASE, which is HOME for the nodes and for the CLI tools run here, so
# both find it in the standard place and the main node's cookie is never used.
ensure_cookie() {
  mkdir -p "$BASE"
  if [ ! -s "$BASE/.erlang.cookie" ]; then
    (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' | tr 'a-f' 'A-F' \
      >"$BASE/.erlang.cookie")
    chmod 400 "$BASE/.erlang.cookie"
  fi
}

# The environment of node N for the server and the CLI tools. RABBITMQ_CONF_ENV_FILE points
# at the node's own file so /etc/rabbitmq/rabbitmq-env.conf (the main node's name) is not read.
node_env() {
  local n="$1" dir
  dir="$(node_dir "$n")"
  echo HOME="$BASE" \
    RABBITMQ_CONF_ENV_FILE="$dir/rabbitmq-env.conf" \
    RABBITMQ_NODENAME="$(node_name "$n")" \
    RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
    RABBITMQ_NODE_PORT="$(amqp_port "$n")" \
    RABBITMQ_DIST_PORT="$(dist_port "$n")" \
    RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf" \
    RABBITMQ_ADVANCED_CONFIG_FILE="$dir/advanced.config" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" \
    RABBITMQ_MNESIA_BASE="$dir/mnesia" \
    RABBITMQ_LOG_BASE="$dir/log" \
    RABBITMQ_PID_FILE="$dir/rabbitmq.pid" \
    ERL_EPMD_ADDRESS=127.0.0.1
}

# Exits with status 2 unless $1 is a node number of the cluster.
check_node() {
  case "${1:-}" in
    1 | 2 | 3) ;;
    *)
      echo "no node '${1:-}': the nodes are 1, 2 and 3" >&2
      exit 2
      ;;
  esac
}

ctl() {
  local n="$1"
  shift
  # shellcheck disable=SC2046
  env $(node_env "$n") "$RABBITMQ_BIN/rabbitmqctl" -n "$(node_name "$n")" "$@"
}

queues() {
  local n="$1"
  shift
  # shellcheck disable=SC2046
  env $(node_env "$n") "$RABBITMQ_BIN/rabbitmq-queues" -n "$(node_name "$n")" "$@"
}

write_node_files() {
  local n="$1" dir
  dir="$(node_dir "$n")"
  mkdir -p "$dir/mnesia" "$dir/log"
  # distribution (clustering and CLI) on the loopback interface only, like the AMQP listener
  echo 'SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"' \
    >"$dir/rabbitmq-env.conf"
  echo '[].' >"$dir/enabled_plugins"
  # pause_minority: a node cut off from the other two pauses itself instead of carrying on as
  # a second cluster, the recommended setting for three nodes.
  cat >"$dir/rabbitmq.conf" <<EOF
listeners.tcp.local = 127.0.0.1:$(amqp_port "$n")
cluster_partition_handling = pause_minority
disk_free_limit.absolute = 50MB
log.file.level = info
log.console = false
EOF
}

node_running() { ctl "$1" status >/dev/null 2>&1; }

start_node() {
  local n="$1"
  if node_running "$n"; then
    return
  fi
  write_node_files "$n"
  # shellcheck disable=SC2046
  env $(node_env "$n") "$RABBITMQ_BIN/rabbitmq-server" -detached \
    >>"$(node_dir "$n")/log/startup.log" 2>&1
}

# `await_startup` fails at once while the node's VM has not yet registered with epmd, which
# takes a few seconds (longer when three nodes boot together on a busy machine), so it is
# retried until the deadline rather than trusted on the first try.
await_node() {
  local n="$1" deadline=$((SECONDS + START_TIMEOUT))
  until ctl "$n" await_startup --timeout 10 >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "node $(node_name "$n") did not start in ${START_TIMEOUT}s; its logs are in $(node_dir "$n")/log" >&2
      tail -n 40 "$(node_dir "$n")"/log/*.log >&2 2>/dev/null || true
      exit 1
    fi
    sleep 1
  done
}

# The running nodes node N sees, one per line.
running_nodes() {
  ctl "$1" eval 'lists:foreach(fun(N) -> io:format("~s~n", [N]) end, rabbit_nodes:all_running()).' \
    2>/dev/null | grep '@' || true
}

cluster_formed() {
  local n
  for n in "${NODES[@]}"; do
    [ "$(running_nodes "$n" | sort -u | wc -l)" -eq "${#NODES[@]}" ] || return 1
  done
}

join_node() {
  local n="$1" first
  first="$(node_name "${NODES[0]}")"
  if running_nodes "$n" | grep -qx "$first"; then
    return
  fi
  local log
  log="$(node_dir "$n")/log/join.log"
  ctl "$n" stop_app >>"$log" 2>&1
  ctl "$n" reset >>"$log" 2>&1
  ctl "$n" join_cluster "$first" >>"$log" 2>&1
  ctl "$n" start_app >>"$log" 2>&1
}

uris() {
  local n out=""
  for n in "${NODES[@]}"; do
    out="${out:+$out,}amqp://guest:guest@127.0.0.1:$(amqp_port "$n")/"
  done
  echo "$out"
}

cmd_start() {
  local n
  ensure_cookie
  for n in "${NODES[@]}"; do
    start_node "$n"
  done
  for n in "${NODES[@]}"; do
    await_node "$n"
  done
  for n in "${NODES[@]:1}"; do
    join_node "$n"
  done
  local deadline=$((SECONDS + START_TIMEOUT))
  until cluster_formed; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "the cluster did not form within ${START_TIMEOUT}s" >&2
      cmd_status >&2 || true
      exit 1
    fi
    sleep 1
  done
  uris
}

cmd_stop() {
  local n pid
  for n in "${NODES[@]}"; do
    if [ -d "$(node_dir "$n")" ] && node_running "$n"; then
      ctl "$n" stop >/dev/null 2>&1 || true
    fi
    # A node that no longer answers the CLI (paused, half started) is ended by its own pid.
    pid="$(cat "$(node_dir "$n")/rabbitmq.pid" 2>/dev/null || true)"
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      sleep 2
      kill -9 "$pid" 2>/dev/null || true
    fi
  done
  rm -rf "$BASE"
  echo "cluster stopped"
}

cmd_status() {
  if [ ! -s "$BASE/.erlang.cookie" ]; then
    echo "no cluster in $BASE" >&2
    return 1
  fi
  ctl "${NODES[0]}" cluster_status
  cluster_formed
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  uris) uris ;;
  nodes)
    for n in "${NODES[@]}"; do
      node_name "$n"
    done
    ;;
  ctl)
    shift
    check_node "${1:-}"
    ctl "$@"
    ;;
  queues)
    shift
    check_node "${1:-}"
    queues "$@"
    ;;
  *)
    echo "usage: $0 start|stop|status|uris|nodes|ctl N ARGS...|queues N ARGS..." >&2
    exit 2
    ;;
esac
