#!/usr/bin/env bash
# Takes the real nodes of nodes-up.sh down and leaves nothing of them on the machine: no process (kubelets,
# containerd, their shims, the pods' containers, kube-proxy), no mount (the pods' volumes, root filesystems and
# network namespaces), no network device (the bridges; the pods' veths go with their namespaces), no iptables rule
# of kube-proxy's, no cgroup. The nodes' directories go too (containerd's images are imported again by the next
# nodes-up.sh); logs stay in the cluster's logs directory, the volumes' data in <state dir>/volumes.
# Safe to call at any time: with nothing up, after a half-finished nodes-up.sh, on a "partitioned" node whose
# containerd was stopped while its containers kept running, and from down.sh. Leaves the control plane running.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=nodes-lib.sh
source "$CLUSTER_DIR/nodes-lib.sh"

# stop PID NAME: SIGTERM, then SIGKILL if it has not exited within 10 s.
stop() {
  local pid="$1" name="$2"
  kill -TERM "$pid" 2>/dev/null || return 0
  if ! wait_until "$name (pid $pid) to exit" 10 exited "$pid"; then
    log "killing $name (pid $pid)"
    kill -KILL "$pid" 2>/dev/null || true
  fi
}

# kill_pods NODE: SIGKILL to every process in the node's cgroups until none is left (a dying container may have
# forked), then the cgroups themselves.
kill_pods() {
  local node="$1" pids h
  for _ in $(seq 50); do
    pids="$(cgroup_pids "$node")"
    [[ -n "$pids" ]] || break
    # shellcheck disable=SC2086 # one argument per pid
    kill -KILL $pids 2>/dev/null || true
    sleep 0.1
  done
  [[ -z "$(cgroup_pids "$node")" ]] || die "processes of $node's pods survive SIGKILL: $(cgroup_pids "$node" | tr '\n' ' ')"
  for h in $(cgroup_hierarchies); do
    [[ -d "$h/$CGROUP_PARENT/$node" ]] || continue
    find "$h/$CGROUP_PARENT/$node" -depth -type d -exec rmdir {} + 2>/dev/null || true
    [[ ! -d "$h/$CGROUP_PARENT/$node" ]] || die "cannot remove cgroup $h/$CGROUP_PARENT/$node"
  done
}

# unmount_all DIR: every mount at or below DIR, deepest first; lazily if it is busy.
unmount_all() {
  local mount
  for mount in $(mounts_under "$1"); do
    umount "$mount" 2>/dev/null || umount -l "$mount" ||
      die "cannot unmount $mount"
  done
  [[ -z "$(mounts_under "$1")" ]] || die "still mounted under $1: $(mounts_under "$1" | tr '\n' ' ')"
}

node_down() {
  local node="$1" dir pid bridge
  dir="$(node_dir "$node")"
  pid="$(node_component_pid kubelet "$dir" "$dir/kubelet.pid")"
  # The kubelet first, so that it does not start again what goes next.
  [[ -z "$pid" ]] || stop "$pid" "kubelet of $node"
  kill_pods "$node"
  # containerd and the shims of its (now dead) containers.
  for pid in $(node_pids "$dir"); do stop "$pid" "$(basename "$(readlink "/proc/$pid/exe" 2>/dev/null || echo process)") of $node"; done
  wait_until "the processes of $node to exit" 10 test -z "$(node_pids "$dir")" ||
    die "processes of $node still running: $(node_pids "$dir" | tr '\n' ' ')"
  unmount_all "$dir"
  bridge="$(node_bridge "$node")"
  if ip link show "$bridge" >/dev/null 2>&1; then ip link delete "$bridge"; fi
  # Nothing is mounted below it any more, so this deletes only the node's own files.
  rm -rf --one-file-system "$dir"
}

# The chains every kubelet makes (its canary, the iptables-mode hint, the "block incoming localnet
# connections" firewall) in both address families; kube-proxy --cleanup leaves them.
kubelet_chains() {
  local tool table chain rule
  for tool in iptables ip6tables; do
    command -v "$tool" >/dev/null || continue
    for table in filter nat mangle; do
      for chain in KUBE-FIREWALL KUBE-KUBELET-CANARY KUBE-IPTABLES-HINT; do
        "$tool" -t "$table" -S "$chain" >/dev/null 2>&1 || continue
        # The rules jumping to it first, then the chain.
        { "$tool" -t "$table" -S 2>/dev/null | grep -E "^-A [A-Z-]+ .*-j $chain( |\$)" || true; } |
          while read -r rule; do
            # shellcheck disable=SC2086 # the rule's own words
            "$tool" -t "$table" ${rule/-A/-D} || true
          done
        if ! { "$tool" -t "$table" -F "$chain" && "$tool" -t "$table" -X "$chain"; }; then
          log "warning: cannot delete $tool chain $table/$chain"
        fi
      done
    done
  done
}

main() {
  local node stopped=0 pid h
  lock "$CLUSTER_STATE/.lock"
  [[ -d "$NODES_DIR" ]] || return 0
  for node in $(node_names); do
    [[ -d "$(node_dir "$node")" ]] || [[ -n "$(cgroup_pids "$node")" ]] || continue
    node_down "$node"
    stopped=$((stopped + 1))
  done
  pid="$(node_component_pid kube-proxy "$NODES_DIR" "$NODES_DIR/kube-proxy.pid")"
  [[ -z "$pid" ]] || stop "$pid" kube-proxy
  pid="$(node_component_pid cluster-dns "$NODES_DIR" "$NODES_DIR/cluster-dns.pid")"
  [[ -z "$pid" ]] || stop "$pid" anneal-cluster-dns
  # kube-proxy's chains and rules (it removes its own, of every mode).
  if [[ -f "$NODES_DIR/kube-proxy.yaml" && -x "$NODE_TOOLS_BIN/kube-proxy" ]]; then
    "$NODE_TOOLS_BIN/kube-proxy" --cleanup --config "$NODES_DIR/kube-proxy.yaml" >>"$LOG_DIR/kube-proxy.log" 2>&1 ||
      log "warning: kube-proxy --cleanup failed; see $LOG_DIR/kube-proxy.log"
  fi
  kubelet_chains
  for h in $(cgroup_hierarchies); do
    [[ ! -d "$h/$CGROUP_PARENT" ]] || rmdir "$h/$CGROUP_PARENT" 2>/dev/null || true
  done
  rm -rf --one-file-system "$NODES_DIR"
  [[ "$(cat "$NODES_CLAIM" 2>/dev/null)" != "$CLUSTER_STATE" ]] || rm -f "$NODES_CLAIM"
  ((stopped == 0)) || log "real nodes down ($stopped nodes; logs kept in $LOG_DIR)"
}

main "$@"
