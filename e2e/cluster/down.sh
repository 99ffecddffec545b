#!/usr/bin/env bash
# Stops every process of the local test cluster (real nodes too: nodes-down.sh) and deletes its etcd data. Keeps the logs (for debugging) and
# the certificates (so the next up.sh is faster and kubeconfigs stay valid). Safe to call at any time: when
# nothing runs, after a half-finished up.sh, and from an EXIT trap.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

none_left() { [[ -z "$(cluster_pids)" ]]; }

# ports_free: nobody listens on the cluster's ports any more. A process is `exited` once its main thread is a
# zombie, and its other threads may hold the listening sockets a moment longer; the next up.sh must not
# meet them.
read -r -a PORTS <<<"$(for c in "${COMPONENTS[@]}"; do component_ports "$c"; done | tr '\n' ' ')"
ports_free() { [[ -z "$(port_holders "${PORTS[@]}")" ]]; }

# stop PID NAME: SIGTERM, then SIGKILL if it has not exited within 10 s.
stop() {
  local pid="$1" name="$2"
  kill -TERM "$pid" 2>/dev/null || return 0
  if ! wait_until "$name (pid $pid) to exit" 10 exited "$pid"; then
    log "killing $name (pid $pid)"
    kill -KILL "$pid" 2>/dev/null || true
  fi
}

main() {
  local i name pid stopped=0
  lock "$CLUSTER_STATE/.lock"
  # Real nodes (nodes-up.sh) go first, while the API server still answers their last requests.
  if [[ -d "$CLUSTER_STATE/nodes" ]]; then "$CLUSTER_DIR/nodes-down.sh"; fi
  for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do
    name="${COMPONENTS[i]}"
    pid="$(component_pid "$name")"
    if [[ -n "$pid" ]]; then
      stop "$pid" "$name"
      stopped=$((stopped + 1))
    fi
    rm -f "$PID_DIR/$name.pid"
  done
  # A component whose pid file was lost (an up.sh killed between start and writing it) is found by its
  # command line, which names our state dir.
  for pid in $(cluster_pids); do
    log "stopping leftover process $pid: $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)"
    stop "$pid" leftover
    stopped=$((stopped + 1))
  done
  wait_until "every process of $CLUSTER_STATE to exit" 5 none_left ||
    die "processes of $CLUSTER_STATE still running: $(cluster_pids | tr '\n' ' ')"
  if ((stopped > 0)) && ! wait_until "the cluster's ports to be free" 5 ports_free; then
    log "warning: ports of $CLUSTER_STATE still in use after down:"
    port_holders "${PORTS[@]}" >&2
  fi
  rm -rf "$CLUSTER_STATE/etcd"
  ((stopped == 0)) || log "cluster down ($stopped processes stopped; logs kept in $LOG_DIR)"
}

main "$@"
