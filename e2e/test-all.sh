#!/usr/bin/env bash
# Runs every test of anneal on a fresh machine: format and lint checks, the unit and integration
# tests of every crate, then the cluster tier against a real local control plane (built from the
# pinned upstream sources on first use, cached in ~/.cache/anneal), then the node tier (real nodes:
# containerd + kubelet, the images built here, the operator installed by Helm; e2e/test-nodes.sh).
# Each tier has a cluster of its own, started clean and always taken down; the demo's cluster
# (e2e/demo.sh) is left as it is (the node tier takes its real nodes down while it runs, since one cluster
# per machine may have them, and brings them back after).
#
#   e2e/test-all.sh              everything
#   ANNEAL_SKIP_CLUSTER=1 ...    only what needs no cluster
#   ANNEAL_SKIP_NODES=1 ...      everything but the node tier (which needs root)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Builds live outside the clone so that a fresh clone (CI) reuses them.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/anneal/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

step() { printf '\n== %s (%s)\n' "$1" "$(date +%T)"; }

# The cache outlives clones: every change of the workspace leaves its test executables (~450 MB
# each, ~20 of them) behind, and the disk filled up on 29 Nov. Executables not touched for a day
# are stale (cargo relinks one if it is still wanted); dependencies are kept.
find "$CARGO_TARGET_DIR/debug/deps" -maxdepth 1 -type f -executable ! -name '*.so' -mmin +1440 \
  -delete 2>/dev/null || true

step "cargo fmt --check"
cargo fmt --all -- --check

step "generated CRD YAML is current"
cargo run -q -p anneal-crds --bin crdgen -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "unit and integration tests"
cargo test --workspace

# No GPU here, but the GPU path must keep compiling: build the runtime's `cuda` feature with nvcc
# from PyPI and link stubs (runtime/scripts/cuda/; toolkit and build cached outside the clone in
# ~/.cache/anneal/cuda and ~/.cache/anneal/target-cuda). On 2 cores: ~14 min cold (nvcc over
# candle's kernels), ~1 min after a runtime change, 1 s when nothing changed.
step "the runtime's cuda feature compiles"
runtime/scripts/cuda/build.sh

if [[ "${ANNEAL_SKIP_CLUSTER:-0}" == 1 ]]; then
  echo "ANNEAL_SKIP_CLUSTER=1: cluster tier skipped"
  exit 0
fi

step "pinned cluster tools (built once, then cached)"
e2e/cluster/build-tools.sh

# A cluster of its own: its own state directory and ports, so that whatever runs on the default cluster
# (the demo leaves it up with the Helm release `anneal` installed; a developer's up.sh) is neither
# reused nor touched; and taken down before it is brought up, so that what a killed earlier run left
# in it (namespaces, Helm releases, cluster-scoped objects) is gone with its etcd. Every variable the
# cluster scripts and the e2e crate read is set, so a shell that sourced env.sh for the default
# cluster cannot point the tests at it.
cache="${ANNEAL_CACHE:-$HOME/.cache/anneal}"
export ANNEAL_CLUSTER_DIR="$cache/test-cluster"
export ANNEAL_KUBECONFIG="$ANNEAL_CLUSTER_DIR/kubeconfig" ANNEAL_CLUSTER_LOGS="$ANNEAL_CLUSTER_DIR/logs"
export KUBECONFIG="$ANNEAL_KUBECONFIG"
export ANNEAL_ETCD_PORT=22379 ANNEAL_ETCD_PEER_PORT=22380 ANNEAL_APISERVER_PORT=26443
export ANNEAL_CONTROLLER_MANAGER_PORT=26257 ANNEAL_SCHEDULER_PORT=26259 ANNEAL_KWOK_PORT=26247

step "the tests' own local cluster, started clean ($ANNEAL_CLUSTER_DIR, API server on :$ANNEAL_APISERVER_PORT)"
trap 'step "local cluster down"; e2e/cluster/down.sh' EXIT
e2e/cluster/down.sh
e2e/cluster/up.sh

step "cluster tier tests (real API server, real operator binary; nodes simulated by kwok)"
cargo build -p anneal-operator
# The node tier's tests (real_node_*) need real nodes: they run below, on a cluster of their own.
cargo test -p anneal-e2e -- --include-ignored --test-threads=2 --skip real_node_

if [[ "${ANNEAL_SKIP_NODES:-0}" == 1 ]]; then
  echo "ANNEAL_SKIP_NODES=1: node tier skipped"
  exit 0
fi
# The kwok cluster's CPU and memory go to the node tier.
step "local cluster down"
e2e/cluster/down.sh
# ~4.5 min with warm caches (cluster, images and nodes up in ~30 s; tests ~230 s); the first run on a
# machine also builds kubelet and kube-proxy (~2 min with a warm Go cache) and installs the Debian packages.
e2e/test-nodes.sh
