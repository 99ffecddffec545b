#!/usr/bin/env bash
# The node tier: a cluster of its own with two real nodes (containerd + kubelet on this machine, pods in real
# containers; e2e/cluster/nodes-up.sh), started clean and always taken down, the images built from this tree
# (images/build.sh) and imported, and the tests of e2e/tests/cluster_node_*.rs: the operator installed by Helm
# runs in-cluster, the pipeline example trains, gates and serves for real. e2e/test-all.sh runs it last; it runs
# on its own too. Needs root (containerd, cgroups, bridges, iptables). Only one cluster per machine may have real
# nodes: a developer's (nodes-up.sh) must be down first.
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

step "the node tier's own cluster with real nodes, started clean ($ANNEAL_CLUSTER_DIR, API server on :$ANNEAL_APISERVER_PORT)"
trap 'step "node-tier cluster down"; e2e/cluster/down.sh' EXIT
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
