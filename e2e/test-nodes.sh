#!/usr/bin/env bash
# The node tier: a cluster of its own with two real nodes (containerd + kubelet on this machine, pods in real
# containers; e2e/cluster/nodes-up.sh), started clean and always taken down, the images built from this tree
# (images/build.sh) and imported, and the tests of e2e/tests/cluster_node_*.rs: the operator installed by Helm
# runs in-cluster, the pipeline example trains, gates and serves for real. e2e/test-all.sh runs it last; it runs
# on its own too. Needs root (containerd, cgroups, bridges, iptables). Only one cluster per machine may have real
# nodes (kube-proxy's iptables rules, the bridges, the pod subnets and cgroups are the machine's): another
# cluster's (the demo's, a developer's nodes-up.sh) are taken down first, their control plane, volumes and
# objects left as they are, and brought back up when the tier ends (their pods start again there).
#
#   e2e/test-nodes.sh                                  every node-tier test
#   e2e/test-nodes.sh FILTER                           only the tests whose name contains FILTER
#   ANNEAL_NODE_TESTS=cluster_node_failover e2e/test-nodes.sh    only those test binaries (a cargo --test glob)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
step() { printf '\n== %s (%s)\n' "$1" "$(date +%T)"; }
begin=$SECONDS

# Its own state directory and ports, every variable the cluster scripts and the e2e crate read.
source e2e/cluster/node-tier-env.sh

# Another cluster's real nodes give way (one cluster per machine has them), and come back when the tier ends.
other="$(cat /run/anneal-real-nodes 2>/dev/null || true)"
other_env="$other/real-nodes.env"
if [[ -n "$other" && "$other" != "$ANNEAL_CLUSTER_DIR" && -d "$other/nodes" && -f "$other_env" ]]; then
  step "the real nodes of $other give way (brought back when the node tier ends)"
  # shellcheck source=/dev/null # written by nodes-up.sh
  (source "$other_env" && e2e/cluster/nodes-down.sh)
else
  other=""
fi
bring_back() {
  [[ -n "$other" ]] || return 0
  step "the real nodes of $other back up"
  # shellcheck source=/dev/null # written by nodes-up.sh
  (source "$other_env" && ANNEAL_SKIP_IMAGE_BUILD=1 e2e/cluster/nodes-up.sh >/dev/null)
}

step "the node tier's own cluster with real nodes, started clean ($ANNEAL_CLUSTER_DIR, API server on :$ANNEAL_APISERVER_PORT)"
on_exit() {
  local rc=$?
  step "node-tier cluster down"
  e2e/cluster/down.sh || rc=1
  bring_back || rc=1
  exit "$rc"
}
trap on_exit EXIT
e2e/cluster/down.sh
# The binaries the images carry, built as the demo and the tests build them (dev profile).
cargo build -q -p anneal-operator -p anneal-runtime
up=$SECONDS
e2e/cluster/nodes-up.sh >/dev/null
echo "cluster, images and real nodes up in $((SECONDS - up)) s"

step "node tier tests (operator in-cluster from the chart, pods in real containers on real nodes)"
tests=$SECONDS
cargo test -p anneal-e2e --test "${ANNEAL_NODE_TESTS:-cluster_node_*}" -- --include-ignored --test-threads=2 "$@"
echo "node tier tests passed in $((SECONDS - tests)) s; node tier $((SECONDS - begin)) s in all"
