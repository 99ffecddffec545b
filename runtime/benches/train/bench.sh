#!/usr/bin/env bash
# Training throughput on CPU, anneal (candle) side by side with PyTorch: the same architecture,
# batch, context (256), byte tokenizer, data and thread count, in the same run. Prints a table
# of tokens/s (all steps after the first) and the loss after the same number of steps.
#
#   runtime/benches/train/bench.sh            # THREADS=2 STEPS_SMALL=30 STEPS_LARGE=10 BATCH=8
#
# anneal is built with RUSTFLAGS="-C target-cpu=native" into its own target directory
# ($HOME/.cache/anneal/target-native) so the shared one is not invalidated. PyTorch is
# installed from PyPI into $HOME/.cache/anneal/torch-venv on first use (the Linux wheel pulls
# the CUDA libraries, several GB, which its import needs even on CPU).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
cache=${ANNEAL_CACHE:-$HOME/.cache/anneal}
threads=${THREADS:-2}
batch=${BATCH:-8}
torch_version=${TORCH_VERSION:-2.15.0}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "building anneal-runtime (release, target-cpu=native)..." >&2
(cd "$root" && RUSTFLAGS="-C target-cpu=native" CARGO_TARGET_DIR="$cache/target-native" \
    cargo build --release -q -p anneal-runtime)
bin="$cache/target-native/release/anneal-runtime"

venv="$cache/torch-venv"
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    echo "installing torch==$torch_version into $venv..." >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q "torch==$torch_version" numpy
fi

# Deterministic text: paragraphs of arithmetic facts (~1.5 MB).
python3 "$here/corpus.py" "$work/corpus.txt"

# name hidden layers heads kv_heads intermediate steps
sizes=(
    "1M 128 5 4 4 352 ${STEPS_SMALL:-30}"
    "10M 384 6 6 6 1024 ${STEPS_LARGE:-10}"
)

run_anneal() { # hidden layers heads kv inter steps
    cat > "$work/train.yaml" <<YAML
model:
  architecture: {hiddenSize: $1, nLayers: $2, nHeads: $3, nKvHeads: $4, intermediateSize: $5, maxSeqLen: 256}
dataset: {uri: "file://$work/corpus.txt"}
stage: pretrain
hyperparameters: {steps: $6, batchSize: $batch, seqLen: 256, learningRate: 0.001, warmupSteps: 2,
                  threads: $threads, logEvery: 1, seed: 0}
output: {path: "$work/model"}
YAML
    "$bin" train --config "$work/train.yaml" | python3 -c '
import json, sys
steps = [json.loads(l) for l in sys.stdin if "\"event\":\"step\"" in l]
# Harmonic mean: every step processes the same number of tokens.
t = sum(1 / s["tokens_per_sec"] for s in steps[1:])
print(json.dumps({"tokens_per_sec": (len(steps) - 1) / t, "losses": [round(s["loss"], 4) for s in steps]}))
'
}

printf '\n%-5s %-8s %-6s %-16s %-16s %-9s %-12s %-12s\n' size params steps "anneal tok/s" "pytorch tok/s" ratio "anneal loss" "pytorch loss"
for s in "${sizes[@]}"; do
    read -r name h l nh kv inter steps <<<"$s"
    a=$(run_anneal "$h" "$l" "$nh" "$kv" "$inter" "$steps")
    p=$("$venv/bin/python" "$here/reference.py" --data "$work/corpus.txt" --hidden "$h" --layers "$l" \
        --heads "$nh" --kv-heads "$kv" --inter "$inter" --ctx 256 --batch "$batch" --steps "$steps" \
        --threads "$threads" --warmup 2)
    python3 - "$name" "$steps" "$a" "$p" <<'PY'
import json, sys
name, steps, a, p = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
print(f"{name:<5} {p['params']/1e6:<8.2f} {steps:<6} {a['tokens_per_sec']:<16.0f} {p['tokens_per_sec']:<16.0f} "
      f"{a['tokens_per_sec']/p['tokens_per_sec']:<9.2f} {a['losses'][-1]:<12.4f} {p['losses'][-1]:<12.4f}")
print(f"      loss curve anneal : {a['losses']}", file=sys.stderr)
print(f"      loss curve pytorch: {p['losses']}", file=sys.stderr)
PY
done
echo "threads=$threads batch=$batch context=256 torch=$("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
