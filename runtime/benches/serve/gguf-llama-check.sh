#!/usr/bin/env bash
# Does a GGUF that anneal exports load in llama.cpp and answer as anneal does? Trains a small
# byte-tokenizer model on builtin:arith (1-digit sums, a few seconds), lets `train` export it Q8_0,
# serves the file with llama-server (llama.cpp from llama-cpp-python's sources, ../serve/build-llama-cpp.sh)
# and with anneal-runtime serve, and compares the greedy completions of a few prompts. Prints a markdown
# table; exits 1 when llama.cpp refuses the file or any answer differs.
# Uses the tests' build (cargo's dev profile optimises the runtime) unless ANNEAL_RUNTIME is set.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
llama_bin="$("$here/build-llama-cpp.sh")"
anneal="${ANNEAL_RUNTIME:-}"
if [[ -z "$anneal" ]]; then
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/anneal/target}"
    (cd "$repo" && cargo build -q -p anneal-runtime)
    anneal="$CARGO_TARGET_DIR/debug/anneal-runtime"
fi
work="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_up() { for _ in $(seq 600); do curl -sf "http://127.0.0.1:$1/$2" >/dev/null && return 0; sleep 0.2; done; return 1; }

cat > "$work/config.yaml" <<YAML
model:
  architecture: {hiddenSize: 32, nLayers: 2, nHeads: 4, nKvHeads: 2, intermediateSize: 64, maxSeqLen: 16}
dataset: {uri: "builtin:arith?digits=1"}
stage: sft
hyperparameters: {steps: 300, batchSize: 32, learningRate: 0.01, warmupSteps: 20, weightDecay: 0.0, threads: 2, logEvery: 100}
output: {path: $work/model, gguf: Q8_0}
YAML
"$anneal" train --config "$work/config.yaml" >"$work/train.log" 2>&1
gguf="$work/model/model-q8_0.gguf"

a_port="$(port)"; l_port="$(port)"
"$anneal" serve --model "$gguf" --listen "127.0.0.1:$a_port" --threads 2 --max-seq-len 16 \
    --response-cache-ttl-secs 0 >"$work/anneal.log" 2>&1 &
pids+=($!)
"$llama_bin/llama-server" -m "$gguf" --port "$l_port" -t 2 -c 16 -np 1 --no-webui >"$work/llama.log" 2>&1 &
pids+=($!)
if ! wait_up "$l_port" health; then
    echo "llama-server did not load $gguf:" >&2
    grep -iE "error|failed" "$work/llama.log" >&2 || tail -20 "$work/llama.log" >&2
    exit 1
fi
wait_up "$a_port" readyz
python3 - "$a_port" "$l_port" "$("$llama_bin/llama-server" --version 2>&1 | head -n 1)" <<'PY'
import http.client, json, sys
a_port, l_port, llama_version = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
prompts = ["1+2=", "3+4=", "9+9=", "0+7=", "5+8=", "6+0=", "2+2=", "8+1="]
def complete(port, prompt):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    c.request("POST", "/v1/completions", json.dumps({"prompt": prompt, "temperature": 0, "max_tokens": 3}),
              {"Content-Type": "application/json"})
    r = c.getresponse(); body = json.loads(r.read())
    assert r.status == 200, body
    return body["choices"][0]["text"]
print(f"llama-server {llama_version.strip()} (llama-cpp-python 0.3.36 sources), model exported Q8_0 by anneal train\n")
print("| prompt | anneal-runtime serve | llama-server | same |")
print("| --- | --- | --- | --- |")
same = 0
for p in prompts:
    a, l = complete(a_port, p), complete(l_port, p)
    same += a == l
    print(f"| `{p}` | `{a!r}` | `{l!r}` | {'yes' if a == l else 'NO'} |")
print(f"\n{same} of {len(prompts)} greedy completions equal")
sys.exit(0 if same == len(prompts) else 1)
PY
