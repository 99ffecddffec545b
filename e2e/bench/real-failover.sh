#!/usr/bin/env bash
# Fail-over between real nodes (the node tier): TRIALS trials of each fault, a partitioned node (its kubelet
# and containerd SIGKILLed, its container running on) and a device fault (the container ends with exit 75),
# each timed from the fault to the replacement worker created, Running, resumed from the last checkpoint and at
# its first step (e2e/bench/real_failover_trials.rs). Prints the trials, then a Markdown table (p50, max).
#
#   e2e/bench/real-failover.sh                 # TRIALS=5 FAULTS="partition device"
# Runs on the node tier's cluster (e2e/cluster/node-tier-env.sh), started clean and taken down at the end; needs
# root, like e2e/test-nodes.sh. The operator is the chart's, in-cluster, from the images built of this tree.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
source e2e/bench/lib.sh
source e2e/cluster/node-tier-env.sh
TRIALS="${TRIALS:-5}"
FAULTS="${FAULTS:-partition device}"
trap 'e2e/cluster/down.sh' EXIT

cargo build -q -p anneal-operator -p anneal-runtime
cargo build -q -p anneal-e2e --example real-failover-trials
e2e/cluster/down.sh
say "the node tier's cluster with real nodes"
e2e/cluster/nodes-up.sh >/dev/null
machine
# shellcheck disable=SC2086 # one argument per fault
"$CARGO_TARGET_DIR/debug/examples/real-failover-trials" "$TRIALS" $FAULTS
machine | tail -n 1
