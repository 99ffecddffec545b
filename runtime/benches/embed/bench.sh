#!/usr/bin/env bash
# Embedding benchmark: anneal-runtime serve (/v1/embeddings over HTTP, one client) against
# sentence-transformers (PyTorch, in-process: SentenceTransformer.encode) on all-MiniLM-L6-v2, the
# same sentences and threads. Prints a markdown table: sentences/s at batch 1 and 32, p50 latency of
# one sentence. anneal is built with -C target-cpu=native into its own target directory; PyTorch
# (with sentence-transformers) is installed from PyPI into $HOME/.cache/anneal/torch-venv on first
# use, as ../train/bench.sh does.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
threads="${THREADS:-2}"
seconds="${SECONDS_PER_RUN:-10}"
torch_version="${TORCH_VERSION:-2.15.0}"
model="$("$repo/runtime/scripts/fetch-minilm.sh")"
# The fixture's sentences, less the long one (the test's truncation case): 4 to 30 tokens each.
sentences="$(mktemp)"
grep -v "checkpoint\. The operator" "$repo/runtime/tests/fixtures/embedding-sentences.txt" > "$sentences"

venv="$HOME/.cache/anneal/torch-venv"
if ! "$venv/bin/python" -c "import torch, sentence_transformers" 2>/dev/null; then
    echo "installing torch==$torch_version and sentence-transformers into $venv..." >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q "torch==$torch_version" numpy sentence-transformers
fi

export CARGO_TARGET_DIR="${ANNEAL_NATIVE_TARGET:-$HOME/.cache/anneal/target-native}"
(cd "$repo" && RUSTFLAGS="-C target-cpu=native" cargo build --release -q -p anneal-runtime)
anneal="$CARGO_TARGET_DIR/release/anneal-runtime"

port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
"$anneal" serve --model "$model" --listen "127.0.0.1:$port" --threads "$threads" \
    >/tmp/anneal-embed-bench.log 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -f "$sentences"' EXIT
for _ in $(seq 300); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.2; done
a="$(python3 "$here/embedgen.py" --port "$port" --sentences "$sentences" --seconds "$seconds")"
kill "$pid"; wait "$pid" 2>/dev/null || true
r="$(OMP_NUM_THREADS="$threads" "$venv/bin/python" "$here/reference.py" --model "$model" \
    --threads "$threads" bench --sentences "$sentences" --seconds "$seconds" 2>/dev/null)"

python3 - "$a" "$r" "$threads" <<'PY'
import json, subprocess, sys
a, r, threads = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
print(f"CPU: {cpu}; {threads} threads; sentence-transformers {r['sentence_transformers']}, torch {r['torch']} (MKL, oneDNN)")
print()
print("| all-MiniLM-L6-v2 | anneal (HTTP) | sentence-transformers (in-process) | anneal / ST |")
print("| --- | ---: | ---: | ---: |")
for key, name, fmt in (("batch1_sentences_per_s", "sentences/s, batch 1", "{:.1f}"),
                       ("batch32_sentences_per_s", "sentences/s, batch 32", "{:.1f}")):
    print(f"| {name} | {fmt.format(a[key])} | {fmt.format(r[key])} | {a[key] / r[key]:.2f}x |")
print(f"| p50 latency, 1 sentence (ms) | {a['p50_ms']:.2f} | {r['p50_ms']:.2f} | {r['p50_ms'] / a['p50_ms']:.2f}x faster |")
PY
