#!/usr/bin/env bash
# Node-down failover of a TrainingJob on two cluster profiles, side by side (e2e/cluster/README.md, "Profiles"):
#   test   kube-controller-manager --node-monitor-grace-period 10s --node-monitor-period 1s; kwok renews the
#          node Leases every 2.5 s (10 s Leases);
#   stock  kube-controller-manager defaults (grace period 50 s, monitor period 5 s); Leases renewed every 10 s
#          (40 s Leases), as a stock kubelet renews them.
# Each trial (e2e/bench/failover_trials.rs): a fresh job (nodeLeaseTimeoutSeconds 15, the default) runs on an
# H100 node; the node dies at a random point of its Lease cycle; the time is taken from the fault to the
# replacement worker Running on another node. Prints the trials, then a table: p50, p95, max (nearest rank),
# and the failover reasons seen.
#
#   e2e/bench/failover-profiles.sh                   # TRIALS=20 PROFILES="test stock"
#   ANNEAL_OPERATOR_BIN=/path/to/anneal-operator ... # that operator binary instead of a debug build of this tree
# Runs on a cluster of its own (e2e/bench/lib.sh), fresh for each profile, down at the end.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
source e2e/bench/lib.sh
TRIALS="${TRIALS:-20}"
PROFILES="${PROFILES:-test stock}"
work="$(mktemp -d)"
trap 'e2e/cluster/down.sh; rm -rf "$work"' EXIT

cargo build -q -p anneal-e2e --example failover-trials
if [[ -z "${ANNEAL_OPERATOR_BIN:-}" ]]; then
  cargo build -q -p anneal-operator
fi
machine | tee "$work/machine"
for profile in $PROFILES; do
  say "profile $profile: $TRIALS trials"
  bench_cluster "$profile"
  "$CARGO_TARGET_DIR/debug/examples/failover-trials" "$TRIALS" | tee "$work/$profile.out"
done
machine | tail -n 1

# The summaries side by side: the titles of the first profile, then each profile's values.
echo
columns=()
header="| |" rule="| --- |"
for profile in $PROFILES; do
  grep '^= ' "$work/$profile.out" | cut -c3- | cut -f1 >"$work/titles"
  grep '^= ' "$work/$profile.out" | cut -f2 >"$work/$profile.values"
  columns+=("$work/$profile.values")
  header+=" $profile profile |" rule+=" --- |"
done
echo "$header"
echo "$rule"
paste "$work/titles" "${columns[@]}" | sed -e 's/^/| /' -e 's/\t/ | /g' -e 's/$/ |/'
