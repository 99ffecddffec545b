#!/usr/bin/env bash
# The node tier: a cluster of its own with two real nodes (containerd + kubelet on this machine, pods in real
# containers; e2e/cluster/nodes-up.sh), started clean and always taken down, the images built from this tree
# (images/build.sh) and imported, and the tests of e2e/tests/cluster_node_*.rs: the operator installed by Helm
# runs in-cluster, the pipeline example trains, gates and serves for real. e2e/test-all.sh runs it last; it runs
# on its own too. Needs root (containerd, cgroups, bridges, iptables). Only one cluster per machine may have real
# nodes: a developer's (nodes-up.sh) must be down first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/anneal/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
step() { printf '\n== %s (%s)\n' "$1" "$(date +%T)"; }
begin=$SECONDS

# Its own state directory and ports (the kwok tier's cluster uses 2xxxx, the default one 1xxxx), every
# variable the cluster scripts and the e2e crate read, so nothing points at another cluster.
cache="${ANNEAL_CACHE:-$HOME/.cache/anneal}"
export ANNEAL_CLUSTER_DIR="$cache/node-test-cluster"
export ANNEAL_KUBECONFIG="$ANNEAL_CLUSTER_DIR/kubeconfig" ANNEAL_CLUSTER_LOGS="$ANNEAL_CLUSTER_DIR/logs"
export KUBECONFIG="$ANNEAL_KUBECONFIG"
export ANNEAL_ETCD_PORT=27379 ANNEAL_ETCD_PEER_PORT=27380 ANNEAL_APISERVER_PORT=27443
export ANNEAL_CONTROLLER_MANAGER_PORT=27257 ANNEAL_SCHEDULER_PORT=27259 ANNEAL_KWOK_PORT=27247
export ANNEAL_NODE_PORT_BASE=27250 ANNEAL_REAL_NODES=1

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
cargo test -p anneal-e2e --test 'cluster_node_*' -- --include-ignored --test-threads=2
echo "node tier tests passed in $((SECONDS - tests)) s; node tier $((SECONDS - begin)) s in all"
