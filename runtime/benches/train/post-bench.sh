#!/usr/bin/env bash
# Post-training a pretrained model (issue 18), anneal side by side with PyTorch in the same run.
#
#   runtime/benches/train/post-bench.sh            # both parts
#   PARTS=check runtime/benches/train/post-bench.sh   # DPO correctness only (exit 1 on a mismatch)
#   PARTS=speed runtime/benches/train/post-bench.sh   # fine-tuning speed only
#
# check: DPO's loss, rewards and gradient norm of one batch, computed by anneal (the fused CPU
#   step, candle's autograd, and Trainer::train_step) and by PyTorch (transformers'
#   LlamaForCausalLM with the same weights, TRL's sigmoid loss: dpo_reference.py), after one
#   optimizer step has moved the policy away from the reference; and the step-0 loss, ln 2.
#   On a tiny model trained here from scratch (byte tokenizer) and on SmolLM2-135M-Instruct
#   (Q4_1 GGUF dequantized to f32; SMOLLM2=0 skips it).
# speed: steps of SmolLM2-135M-Instruct on builtin:instruct (sft: full fine-tune, 80% of the
#   blocks frozen, LoRA r=16) and builtin:preferences (dpo, BATCH/2 pairs = BATCH sequences),
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
bench=$(build cargo bench -q -p anneal-runtime --bench train-post --no-run 2>&1 |
    sed -n 's/.*Executable .*(\(.*train_post-[0-9a-f]*\)).*/\1/p' | tail -n1)
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
    lora=$(grep -c -i lora "$root/runtime/src/train/config.rs" || true)
    rows=(
        "sft-full sft 0 full instruct"
        "sft-frozen-0.8 sft 0.8 frozen instruct"
        "sft-lora-r16 lora 0 lora instruct"
        "dpo dpo 0 dpo preferences?ops=+"
    )
    results=()
    for r in "${rows[@]}"; do
        read -r name stage freeze mode data <<<"$r"
        before=$(load)
        if [[ $stage == lora ]]; then
            a='{"tokens_per_sec": null, "peak_rss_mib": null, "step_secs": [null]}'
            # The adapter's batches: those of the full fine-tune (same data and seed).
            batches="$work/sft-full/batches.json"
            [[ $lora -gt 0 ]] && echo "note: runtime/src/train/config.rs mentions LoRA now; this script does not drive it yet" >&2
        else
            a=$("$bench" speed --model "$smollm2" --out "$work/$name" --stage "$stage" --freeze "$freeze" \
                --batch "$batch" --steps "$steps" --data "builtin:$data" --threads "$threads")
            batches="$work/$name/batches.json"
        fi
        p=$("$py" "$here/finetune_reference.py" --model "$work/hf" --batches "$batches" --mode "$mode" \
            --freeze "$freeze" --threads "$threads")
        results+=("$name|$before $(load)|$a|$p")
    done
    printf '%s\n' "${results[@]}" | python3 -c '
import json, sys
print(f"\nSmolLM2-135M-Instruct fine-tuning, {sys.argv[1]} sequences per step, {sys.argv[2]} steps (tokens/s over steps 2..)")
print(f"{\"row\":<16} {\"anneal tok/s\":>12} {\"PyTorch tok/s\":>13} {\"ratio\":>6} {\"anneal s/step\":>13} {\"PyTorch s/step\":>14} "
      f"{\"anneal peak RSS\":>15} {\"PyTorch peak RSS\":>16} {\"trainable\":>10} {\"load before/after\":>26}")
for line in sys.stdin:
    name, loads, a, p = line.rstrip("\n").split("|")
    a, p = json.loads(a), json.loads(p)
    med = lambda s: sorted(s[1:])[len(s[1:]) // 2] if len(s) > 1 and s[1] is not None else None
    fmt = lambda v, f: "not yet" if v is None else format(v, f)
    ratio = a["tokens_per_sec"] / p["tokens_per_sec"] if a["tokens_per_sec"] else None
    print(f"{name:<16} {fmt(a[\"tokens_per_sec\"], \".0f\"):>12} {p[\"tokens_per_sec\"]:>13.0f} {fmt(ratio, \".2f\"):>6} "
          f"{fmt(med(a[\"step_secs\"]), \".3f\"):>13} {med(p[\"step_secs\"]):>14.3f} "
          f"{fmt(a[\"peak_rss_mib\"], \".0f\") + \" MiB\":>15} {p[\"peak_rss_mib\"]:>12.0f} MiB {p[\"trainable\"] / 1e6:>9.2f}M {loads:>26}")
    print(f"    losses anneal {a.get(\"losses\")}  PyTorch {p[\"losses\"]}  (PyTorch RSS after loading {p[\"rss_after_load_mib\"]:.0f} MiB)", file=sys.stderr)
' "$batch" "$steps"
fi
exit $status
