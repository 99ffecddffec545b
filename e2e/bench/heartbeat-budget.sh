#!/usr/bin/env bash
# The API write budget of a worker heartbeat: LEASES Leases (one per simulated running TrainingJob) renewed
# every interval for DURATION_S seconds against the local cluster's API server (e2e/bench/heartbeat_budget.rs).
# Prints a table per interval: writes/s, client-side request latency p50/p99/max, failed requests, and the CPU
# seconds kube-apiserver and etcd consumed, next to an idle window of the same length.
#
#   e2e/bench/heartbeat-budget.sh             # LEASES=1000 DURATION_S=60 INTERVALS="2 5"
# Runs on a cluster of its own (e2e/bench/lib.sh; test profile), fresh, down at the end.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
source e2e/bench/lib.sh
LEASES="${LEASES:-1000}"
DURATION_S="${DURATION_S:-60}"
INTERVALS="${INTERVALS:-2 5}"
trap 'e2e/cluster/down.sh' EXIT

cargo build -q -p anneal-e2e --example heartbeat-budget
machine
bench_cluster test
say "$LEASES Leases; an idle window, then each of: $INTERVALS s; ${DURATION_S} s each"
# shellcheck disable=SC2086 # one argument per interval
"$CARGO_TARGET_DIR/debug/examples/heartbeat-budget" "$LEASES" "$DURATION_S" $INTERVALS
machine | tail -n 1
