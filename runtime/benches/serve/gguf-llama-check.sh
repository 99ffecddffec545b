#!/usr/bin/env bash
# Does a GGUF that anneal exports load in llama.cpp and answer as anneal does? Two models:
# 1. a small byte-tokenizer model trained on builtin:arith (1-digit sums, a few seconds);
# 2. SmolLM2-135M-Instruct fine-tuned for 4 sft steps on builtin:instruct (its BPE tokenizer and chat
#    template kept), unless ANNEAL_SKIP_SMOLLM2=1.
# `train` exports each Q8_0; the file is served with llama-server (llama.cpp from llama-cpp-python's
# sources, ../serve/build-llama-cpp.sh) and with anneal-runtime serve, and the greedy completions (chat
# completions for SmolLM2, through each server's own use of the GGUF's chat template) are compared.
# Prints markdown tables; exits 1 when llama.cpp refuses a file or any answer differs.
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

llama_version="$("$llama_bin/llama-server" --version 2>&1 | head -n 1)"

# compare GGUF CONTEXT KIND TITLE: serves GGUF with both, compares greedy answers of KIND's prompts.
compare() {
    local gguf="$1" ctx="$2" kind="$3" title="$4"
    local a_port l_port
    a_port="$(port)"; l_port="$(port)"
    "$anneal" serve --model "$gguf" --listen "127.0.0.1:$a_port" --threads 2 --max-seq-len "$ctx" \
        --response-cache-ttl-secs 0 >"$work/anneal-$kind.log" 2>&1 &
    local a_pid=$!
    pids+=("$a_pid")
    "$llama_bin/llama-server" -m "$gguf" --port "$l_port" -t 2 -c "$ctx" -np 1 --no-webui >"$work/llama-$kind.log" 2>&1 &
    local l_pid=$!
    pids+=("$l_pid")
    if ! wait_up "$l_port" health; then
        echo "llama-server did not load $gguf:" >&2
        grep -iE "error|failed" "$work/llama-$kind.log" >&2 || tail -20 "$work/llama-$kind.log" >&2
        return 1
    fi
    wait_up "$a_port" readyz
    local rc=0
    python3 - "$a_port" "$l_port" "$llama_version" "$kind" "$title" <<'PY' || rc=1
import http.client, json, sys
a_port, l_port, llama_version, kind, title = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
if kind == "arith":
    prompts = ["1+2=", "3+4=", "9+9=", "0+7=", "5+8=", "6+0=", "2+2=", "8+1="]
else:
    prompts = [f"What is {a} {op} {b}? Answer with the number only." for a, op, b in
               [(3, "plus", 4), (9, "times", 7), (8, "minus", 5), (6, "plus", 9), (2, "times", 8), (7, "minus", 7)]]
def complete(port, prompt):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    if kind == "arith":
        path, body = "/v1/completions", {"prompt": prompt, "temperature": 0, "max_tokens": 3}
    else:
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": 12}
    c.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse(); out = json.loads(r.read())
    assert r.status == 200, out
    choice = out["choices"][0]
    return choice["text"] if kind == "arith" else choice["message"]["content"]
print(f"### {title}\n\nllama-server {llama_version.strip()} (llama-cpp-python 0.3.36 sources), model exported Q8_0 by anneal train\n")
print("| prompt | anneal-runtime serve | llama-server | same |")
print("| --- | --- | --- | --- |")
same = 0
for p in prompts:
    a, l = complete(a_port, p), complete(l_port, p)
    same += a == l
    print(f"| `{p}` | `{a!r}` | `{l!r}` | {'yes' if a == l else 'NO'} |")
print(f"\n{same} of {len(prompts)} greedy completions equal\n")
sys.exit(0 if same == len(prompts) else 1)
PY
    kill "$a_pid" "$l_pid" 2>/dev/null || true
    wait "$a_pid" "$l_pid" 2>/dev/null || true
    return "$rc"
}

status=0
compare "$gguf" 16 arith "byte-tokenizer model (builtin:arith)" || status=1

if [[ "${ANNEAL_SKIP_SMOLLM2:-0}" != 1 ]]; then
    base="$("$repo/runtime/scripts/fetch-smollm2.sh")"
    cat > "$work/smollm2.yaml" <<YAML
model: {base: $base}
dataset: {uri: "builtin:instruct"}
stage: sft
hyperparameters: {steps: 4, batchSize: 8, learningRate: 0.0001, warmupSteps: 1, weightDecay: 0.0, threads: 2, logEvery: 4}
output: {path: $work/smollm2, gguf: Q8_0}
YAML
    "$anneal" train --config "$work/smollm2.yaml" >"$work/train-smollm2.log" 2>&1
    compare "$work/smollm2/model-q8_0.gguf" 512 chat "SmolLM2-135M-Instruct after 4 sft steps (BPE tokenizer, chat template)" || status=1
fi
exit "$status"
