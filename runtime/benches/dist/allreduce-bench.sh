#!/usr/bin/env bash
# The CPU ring all-reduce between two local processes against a plain TCP copy on loopback, and
# the time it adds to a training step at 1M and 10M parameters (runtime/benches/dist/main.rs).
# Release build (cargo bench); ITERS=N timed runs per figure (median; default 10).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/anneal/target}"
echo "CPU: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; load average: $(cut -d' ' -f1-3 /proc/loadavg)"
cargo bench -q -p anneal-runtime --bench dist-allreduce
