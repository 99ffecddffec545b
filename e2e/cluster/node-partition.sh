#!/usr/bin/env bash
# A partitioned real node (nodes-up.sh), for the node tier's failover tests and e2e/bench/real-failover.sh:
# SIGKILL to NODE's kubelet and containerd, nothing else. Its Lease stops being renewed and its status stops
# being reported, so the control plane (and the operator) lose it; its containers keep running, because their
# containerd shims outlive containerd, as the containers of a node cut off from the network keep running. What
# differs from a real partition: with containerd gone nobody reads the containers' stdout and stderr (the
# shims keep the FIFOs open, so a container that writes more than the FIFOs hold blocks on the write); the
# tests read those FIFOs themselves (e2e/src/nodes.rs, `Zombie`), as the node's containerd would.
#
#   e2e/cluster/node-partition.sh NODE    prints the time of the fault (seconds since the epoch, ns precision)
# nodes-up.sh (idempotent) brings the node back; its kubelet then kills the containers of pods the API server
# no longer has. nodes-down.sh takes a partitioned node down like any other.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=nodes-lib.sh
source "$CLUSTER_DIR/nodes-lib.sh"

[[ $# -eq 1 ]] || die "usage: node-partition.sh NODE"
node="$1"
node_index "$node" >/dev/null
dir="$(node_dir "$node")"
kubelet="$(node_component_pid kubelet "$dir" "$dir/kubelet.pid")"
containerd="$(node_component_pid containerd "$dir" "$dir/containerd.pid")"
[[ -n "$kubelet" && -n "$containerd" ]] || die "$node is not up (kubelet: ${kubelet:-none}, containerd: ${containerd:-none})"
date +%s.%N
kill -KILL "$kubelet" "$containerd"
both_exited() { exited "$kubelet" && exited "$containerd"; }
wait_until "the kubelet and containerd of $node to exit" 10 both_exited ||
  die "the kubelet or containerd of $node survived SIGKILL"
log "$node partitioned: kubelet ($kubelet) and containerd ($containerd) killed; its containers run on"
