#!/usr/bin/env bash
# Runs every test of anneal on a fresh machine: format and lint checks, the unit and integration
# tests of every crate, then the cluster tier against a real local control plane (built from the
# pinned upstream sources on first use, cached in ~/.cache/anneal), which is always taken down.
#
#   e2e/test-all.sh              everything
#   ANNEAL_SKIP_CLUSTER=1 ...    only what needs no cluster
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

step "local cluster up"
trap 'step "local cluster down"; e2e/cluster/down.sh' EXIT
e2e/cluster/up.sh

step "cluster tier tests (real API server, real operator binary; nodes simulated by kwok)"
cargo build -p anneal-operator
cargo test -p anneal-e2e -- --include-ignored --test-threads=2
