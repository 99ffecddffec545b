#!/usr/bin/env bash
# What overlapping the gang's all-reduce with the backward pass buys: a 2-rank gang on loopback
# (two processes, one thread each) trains a ~14M-parameter model 12 steps with the overlap on and
# off (ANNEAL_OVERLAP_ALLREDUCE), alternating, and prints rank 0's median tokens/s of steps 3-12.
# BIN: the anneal-runtime to run (default: the release build, built here).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/anneal/target}"
if [[ -z "${BIN:-}" ]]; then
  cargo build -q --release -p anneal-runtime
  BIN="$CARGO_TARGET_DIR/release/anneal-runtime"
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cat >"$work/big.yaml" <<Y
model:
  architecture: {hiddenSize: 384, nLayers: 6, nHeads: 6, nKvHeads: 6, intermediateSize: 1536, maxSeqLen: 128}
dataset: {uri: "builtin:arith"}
stage: sft
hyperparameters: {steps: 12, batchSize: 8, learningRate: 0.001, warmupSteps: 1, threads: 1, logEvery: 1, seed: 3}
output: {path: $work/model}
Y
echo "CPU: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; load average: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "| round | overlap | rank 0 median tokens/s |"
echo "| --- | --- | --- |"
for round in 1 2; do
  for overlap in 1 0; do
    port=$((33000 + RANDOM % 1000))
    for rank in 0 1; do
      ANNEAL_OVERLAP_ALLREDUCE=$overlap ANNEAL_RANK=$rank ANNEAL_WORLD_SIZE=2 \
        ANNEAL_RENDEZVOUS="127.0.0.1:$port" KUBECONFIG=/nonexistent \
        "$BIN" train --config "$work/big.yaml" >"$work/out$rank.txt" 2>/dev/null &
    done
    wait
    python3 - "$round" "$overlap" "$work/out0.txt" <<'P'
import json, statistics, sys
steps = [json.loads(l) for l in open(sys.argv[3]) if '"event":"step"' in l]
print(f"| {sys.argv[1]} | {'on' if sys.argv[2] == '1' else 'off'} | {statistics.median(s['tokens_per_sec'] for s in steps[2:]):.0f} |")
P
  done
done
