#!/usr/bin/env bash
# Same-run A/B of two anneal-runtime binaries (e.g. release builds of two commits, copied aside),
# alternating, ROUNDS rounds: serving (SmolLM2 Q4_1, 2 threads, response and prefix caches off:
# prefill tok/s of a ~512-token prompt, best of 3; decode tok/s per stream of 3 x 128 tokens) and
# training (the 1M and 10M configurations of train/bench.sh, tokens/s after step 1). One line per
# run with the 1-minute load average.
#   runtime/benches/ab.sh BEFORE_BIN AFTER_BIN ROUNDS
#   AB_PARTS=serve runtime/benches/ab.sh ...   serving only (a change to the inference kernels)
set -euo pipefail
before=$1; after=$2; rounds=${3:-3}
repo="$(cd "$(dirname "$0")/../.." && pwd)"; here=$repo/runtime/benches/serve
model="$($repo/runtime/scripts/fetch-smollm2.sh)"
work=$(mktemp -d); trap 'rm -rf "$work"; kill $srv 2>/dev/null || true' EXIT
srv=
python3 "$repo/runtime/benches/train/corpus.py" "$work/corpus.txt"
long_prompt="$(python3 -c 'print(" ".join(["The quick brown fox jumps over the lazy dog."] * 51))')"
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_up() { for _ in $(seq 600); do curl -sf "http://127.0.0.1:$1/readyz" >/dev/null && return 0; sleep 0.2; done; return 1; }
serve() { # bin -> "prefill decode"
    local p; p=$(port)
    "$1" serve --model "$model" --listen "127.0.0.1:$p" --threads 2 --max-batch 16 --max-queue 256 --max-seq-len 1024 --response-cache-ttl-secs 0 --prefix-cache false >"$work/serve.log" 2>&1 &
    srv=$!
    wait_up "$p"
    python3 "$here/loadgen.py" --port "$p" --concurrency 1 --requests-per-client 1 --max-tokens 8 >/dev/null
    local pp tg
    pp=$(python3 - "$p" "$long_prompt" <<'PY'
import http.client, json, sys, time
port, prompt = int(sys.argv[1]), sys.argv[2]
best = 0
for _ in range(3):
    c = http.client.HTTPConnection("127.0.0.1", port)
    t = time.perf_counter()
    c.request("POST", "/v1/completions", json.dumps({"prompt": prompt, "max_tokens": 1, "temperature": 0}), {"Content-Type": "application/json"})
    r = json.loads(c.getresponse().read())
    best = max(best, r["usage"]["prompt_tokens"] / (time.perf_counter() - t))
print(f"{best:.1f}")
PY
)
    tg=$(python3 "$here/loadgen.py" --port "$p" --concurrency 1 --requests-per-client 3 --max-tokens 128 | python3 -c 'import json,sys; print("%.1f" % json.load(sys.stdin)["decode_tok_s_per_stream"])')
    kill $srv; wait $srv 2>/dev/null || true; srv=
    echo "$pp $tg"
}
train() { # bin hidden layers heads kv inter steps -> tok/s
    cat > "$work/train.yaml" <<YAML
model:
  architecture: {hiddenSize: $2, nLayers: $3, nHeads: $4, nKvHeads: $5, intermediateSize: $6, maxSeqLen: 256}
dataset: {uri: "file://$work/corpus.txt"}
stage: pretrain
hyperparameters: {steps: $7, batchSize: 8, seqLen: 256, learningRate: 0.001, warmupSteps: 2,
                  threads: 2, logEvery: 1, seed: 0}
output: {path: "$work/model"}
YAML
    rm -rf "$work/model"
    "$1" train --config "$work/train.yaml" | python3 -c '
import json, sys
steps = [json.loads(l) for l in sys.stdin if "\"event\":\"step\"" in l]
t = sum(1 / s["tokens_per_sec"] for s in steps[1:])
print("%.0f %.4f" % ((len(steps) - 1) / t, steps[-1]["loss"]))'
}
echo "round side load1 prefill decode train1M loss1M train10M loss10M"
for r in $(seq "$rounds"); do
    for side in before after; do
        bin=$before; [[ $side == after ]] && bin=$after
        l=$(cut -d' ' -f1 /proc/loadavg)
        s=$(serve "$bin"); t1="- -"; t10="- -"
        if [[ "${AB_PARTS:-all}" != serve ]]; then
            t1=$(train "$bin" 128 5 4 4 352 30); t10=$(train "$bin" 384 6 6 6 1024 10)
        fi
        echo "$r $side $l $s $t1 $t10"
    done
done
