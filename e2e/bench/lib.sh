# Shared by the e2e/bench scripts that need a cluster of their own. Source it from the repository root.
# shellcheck shell=bash
#
# Like e2e/test-all.sh's: its own state directory and ports, so the demo's cluster, the tests' cluster and a
# developer's are neither reused nor touched; every variable the cluster scripts and the e2e crate read is
# set. The scripts take it down when they end.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/anneal/target}"
bench_cache="${ANNEAL_CACHE:-$HOME/.cache/anneal}"
export ANNEAL_CLUSTER_DIR="$bench_cache/bench-cluster"
export ANNEAL_KUBECONFIG="$ANNEAL_CLUSTER_DIR/kubeconfig" ANNEAL_CLUSTER_LOGS="$ANNEAL_CLUSTER_DIR/logs"
export KUBECONFIG="$ANNEAL_KUBECONFIG"
export ANNEAL_ETCD_PORT=42379 ANNEAL_ETCD_PEER_PORT=42380 ANNEAL_APISERVER_PORT=46443
export ANNEAL_CONTROLLER_MANAGER_PORT=46257 ANNEAL_SCHEDULER_PORT=46259 ANNEAL_KWOK_PORT=46247
unset bench_cache

say() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }

# bench_cluster PROFILE: a fresh cluster (empty etcd) of that profile (e2e/cluster/README.md, "Profiles").
bench_cluster() {
  e2e/cluster/down.sh
  ANNEAL_CLUSTER_PROFILE="$1" e2e/cluster/up.sh >/dev/null
}

# The machine the figures come from, for the record.
machine() {
  echo "date: $(date -u +'%Y-%m-%d %H:%M UTC'); commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- e2e operator crds || echo ' (+ uncommitted changes)')"
  echo "cpu: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; load average $(cut -d' ' -f1-3 /proc/loadavg)"
}
