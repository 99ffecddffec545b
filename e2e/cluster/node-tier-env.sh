# The node tier's cluster: its own state directory and ports (the kwok tier's cluster uses 2xxxx, the default
# one 1xxxx), every variable the cluster scripts and the e2e crate read, so nothing points at another cluster.
# Sourced by e2e/test-nodes.sh and e2e/bench/real-failover.sh (from the repository root); only one cluster per
# machine may have real nodes, so both use this one.
# shellcheck shell=bash
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/anneal/target}"
node_tier_cache="${ANNEAL_CACHE:-$HOME/.cache/anneal}"
export ANNEAL_CLUSTER_DIR="$node_tier_cache/node-test-cluster"
export ANNEAL_KUBECONFIG="$ANNEAL_CLUSTER_DIR/kubeconfig" ANNEAL_CLUSTER_LOGS="$ANNEAL_CLUSTER_DIR/logs"
export KUBECONFIG="$ANNEAL_KUBECONFIG"
export ANNEAL_ETCD_PORT=27379 ANNEAL_ETCD_PEER_PORT=27380 ANNEAL_APISERVER_PORT=27443
export ANNEAL_CONTROLLER_MANAGER_PORT=27257 ANNEAL_SCHEDULER_PORT=27259 ANNEAL_KWOK_PORT=27247
export ANNEAL_NODE_PORT_BASE=27250 ANNEAL_REAL_NODES=1
unset node_tier_cache
