#!/usr/bin/env bash
# Post-training a pretrained model (issue 18), anneal side by side with PyTorch in the same run.
#
#   runtime/benches/train/post-bench.sh            # both parts
#   PARTS=check runtime/benches/train/post-bench.sh   # DPO correctness only (exit 1 on a mismatch)
#   PARTS=speed runtime/benches/train/post-bench.sh   # fine-tuning speed only
#   PARTS=phases runtime/benches/train/post-bench.sh  # where anneal's sft step of SmolLM2 spends its time
#
# check: DPO's loss, rewards and gradient norm of one batch, computed by anneal (the fused CPU
#   step, candle's autograd, and Trainer::train_step) and by PyTorch (transformers'
#   LlamaForCausalLM with the same weights, TRL's sigmoid loss: dpo_reference.py), after one
#   optimizer step has moved the policy away from the reference; and the step-0 loss, ln 2.
#   On a tiny model trained here from scratch (byte tokenizer) and on SmolLM2-135M-Instruct
#   (Q4_1 GGUF dequantized to f32; SMOLLM2=0 skips it).
# speed: steps of SmolLM2-135M-Instruct on builtin:instruct (sft: full fine-tune, 80% of the
#   blocks frozen, LoRA r=16 alpha 32 on q and v: "not yet" where the runtime refuses `lora:`)
#   and builtin:preferences (dpo, BATCH/2 pairs = BATCH sequences),
#   anneal's Trainer::train_step vs PyTorch eager (finetune_reference.py) on the same batches,
#   weights and thread count: tokens/s over the steps after the first, and peak RSS.
#
# Settings: THREADS=2 BATCH=8 STEPS=5. anneal is built with -C target-cpu=native into
# $HOME/.cache/anneal/target-native (as bench.sh); PyTorch comes from $HOME/.cache/anneal/torch-venv
# (torch and transformers; bench.sh installs torch there).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
cache=${ANNEAL_CACHE:-$HOME/.cache/anneal}
threads=${THREADS:-2}
batch=${BATCH:-8}
steps=${STEPS:-5}
parts=${PARTS:-check speed}
py="$cache/torch-venv/bin/python"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "building (release, target-cpu=native)..." >&2
build() {
    (cd "$root" && RUSTFLAGS="-C target-cpu=native" CARGO_TARGET_DIR="$cache/target-native" "$@")
}
bench=$(build cargo bench -q -p anneal-runtime --bench train-post --no-run --message-format=json |
    python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("target", {}).get("name") == "train-post" and m.get("executable"):
        print(m["executable"])')
build cargo build -q --release -p anneal-runtime
bin="$cache/target-native/release/anneal-runtime"
[[ -x "$bench" ]] || { echo "train-post bench binary not found" >&2; exit 1; }
smollm2=$(bash "$root/runtime/scripts/fetch-smollm2.sh")

load() { cut -d' ' -f1-3 /proc/loadavg; }
echo "cpu: $(lscpu | sed -n 's/^Model name: *//p'), threads=$threads, torch $("$py" -c 'import torch; print(torch.__version__)')"

status=0
if [[ " $parts " == *" check "* ]]; then
    # A tiny model of anneal's own, trained from scratch on the instructions (byte tokenizer).
    cat > "$work/tiny.yaml" <<YAML
model:
  architecture: {hiddenSize: 64, nLayers: 2, nHeads: 4, nKvHeads: 2, intermediateSize: 176, maxSeqLen: 128}
dataset: {uri: "builtin:instruct"}
stage: sft
hyperparameters: {steps: 30, batchSize: 16, learningRate: 0.003, warmupSteps: 3, threads: $threads, logEvery: 30, seed: 0}
output: {path: "$work/tiny"}
YAML
    "$bin" train --config "$work/tiny.yaml" > "$work/tiny.log"
    models=("tiny $work/tiny 1e-3")
    [[ ${SMOLLM2:-1} == 1 ]] && models+=("smollm2 $smollm2 1e-5")
    for m in "${models[@]}"; do
        read -r name path lr <<<"$m"
        echo "== DPO check: $name (load $(load))"
        "$bench" dpo-check --model "$path" --out "$work/dpo-$name" --pairs 4 --lr "$lr" \
            --data "builtin:preferences?ops=+" --threads "$threads" >&2
        "$py" "$here/dpo_reference.py" "$work/dpo-$name" --threads "$threads" || status=1
        rm -rf "$work/dpo-$name"
    done
fi

if [[ " $parts " == *" speed "* ]]; then
    "$bench" export --model "$smollm2" --out "$work/hf" --threads "$threads" >/dev/null
    # name, anneal options, PyTorch options, data
    rows=(
        "sft-full|--stage sft|--mode full|instruct"
        "sft-frozen-0.8|--stage sft --freeze 0.8|--mode frozen --freeze 0.8|instruct"
        "sft-lora-r16|--stage sft --lora-rank 16 --lora-alpha 32 --lora-targets q,v|--mode lora --rank 16 --alpha 32 --targets q_proj,v_proj|instruct"
        "dpo|--stage dpo|--mode dpo|preferences?ops=+"
    )
    results=()
    for r in "${rows[@]}"; do
        IFS='|' read -r name aopts popts data <<<"$r"
        before=$(load)
        # shellcheck disable=SC2086
        if a=$("$bench" speed --model "$smollm2" --out "$work/$name" $aopts --batch "$batch" \
            --steps "$steps" --data "builtin:$data" --threads "$threads" 2>"$work/$name.err"); then
            batches="$work/$name/batches.json"
        else
            # A runtime without LoRA refuses `lora:` in the config: the PyTorch row alone, on
            # the full fine-tune's batches (same data and seed).
            echo "$name: anneal: $(tail -n1 "$work/$name.err")" >&2
            a='{"tokens_per_sec": null}'
            batches="$work/sft-full/batches.json"
        fi
        # shellcheck disable=SC2086
        p=$("$py" "$here/finetune_reference.py" --model "$work/hf" --batches "$batches" $popts --threads "$threads")
        results+=("$name|$before -> $(load)|$a|$p")
    done
    printf '%s\n' "${results[@]}" | python3 "$here/post_table.py" "$batch" "$steps"
fi
if [[ " $parts " == *" phases "* ]]; then
    for freeze in 0 0.8; do
        echo "== phases of an sft step, freezeFraction $freeze (load $(load))"
        "$bench" phases --model "$smollm2" --batch "$batch" --steps "$steps" --freeze "$freeze" \
            --threads "$threads" 2>/dev/null
    done
fi
exit $status
