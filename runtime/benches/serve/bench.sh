#!/usr/bin/env bash
# Serving benchmark: anneal-runtime serve vs llama.cpp on SmolLM2-135M-Instruct Q4_1, 2 threads.
#   1. single stream: prefill (512-token prompt) and decode (128 tokens) tokens/s;
#      llama.cpp via llama-bench (pp512 / tg128), anneal via its HTTP API (TTFT of a 512-token
#      prompt with max_tokens=1; decode rate of a 128-token generation after its first token);
#   2. aggregate decode tokens/s, p50/p99 latency and TTFT at 1, 4 and 16 concurrent streams
#      through each server's OpenAI API (llama-server with 16 slots).
# Prints a markdown table. Needs: python3, cmake, a C++ compiler (llama.cpp is built on first use).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
threads="${THREADS:-2}"
tokens="${TOKENS:-64}"
per_client="${REQUESTS_PER_CLIENT:-2}"

model="$("$repo/runtime/scripts/fetch-smollm2.sh")"
llama_bin="$("$here/build-llama-cpp.sh")"
export CARGO_TARGET_DIR="${ANNEAL_NATIVE_TARGET:-$HOME/.cache/anneal/target-native}"
(cd "$repo" && RUSTFLAGS="-C target-cpu=native" cargo build --release -q -p anneal-runtime)
anneal="$CARGO_TARGET_DIR/release/anneal-runtime"
# The machine's read bandwidth on as many threads, measured in this run (benches/serve/membw.rs).
membw="$(cd "$repo" && THREADS="$threads" RUSTFLAGS="-C target-cpu=native" cargo bench -q -p anneal-runtime --bench membw)"
read_gb_s="$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["read_gb_s"])' "$membw")"

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_up() { for _ in $(seq 600); do curl -sf "http://127.0.0.1:$1/$2" >/dev/null && return 0; sleep 0.2; done; return 1; }
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

# A prompt of about 512 tokens for prefill.
long_prompt="$(python3 -c 'print(" ".join(["The quick brown fox jumps over the lazy dog."] * 51))')"

echo "## llama-bench (pp512 / tg128, $threads threads)" >&2
"$llama_bin/llama-bench" -m "$model" -t "$threads" -p 512 -n 128 -r 3 -o json > /tmp/anneal-llama-bench.json
read -r l_pp l_tg < <(python3 -c '
import json; r = json.load(open("/tmp/anneal-llama-bench.json"))
pp = [x["avg_ts"] for x in r if x["n_prompt"] > 0][0]; tg = [x["avg_ts"] for x in r if x["n_gen"] > 0][0]
print(f"{pp:.1f} {tg:.1f}")')

a_port="$(port)"
# Caches off: the runs repeat their requests, and a cached answer is not a measurement.
"$anneal" serve --model "$model" --listen "127.0.0.1:$a_port" --threads "$threads" --max-batch 16 \
    --max-queue 256 --max-seq-len 1024 --response-cache-ttl-secs 0 --prefix-cache false >/tmp/anneal-serve-bench.log 2>&1 &
pids+=($!)
wait_up "$a_port" readyz
# Warm-up (first-use repacking and allocation), then measure.
python3 "$here/loadgen.py" --port "$a_port" --concurrency 1 --requests-per-client 1 --max-tokens 8 >/dev/null
a_pp="$(python3 - "$a_port" "$long_prompt" <<'PY'
import http.client, json, sys, time
port, prompt = int(sys.argv[1]), sys.argv[2]
best = 0
for _ in range(3):
    c = http.client.HTTPConnection("127.0.0.1", port)
    t = time.perf_counter()
    c.request("POST", "/v1/completions", json.dumps({"prompt": prompt, "max_tokens": 1, "temperature": 0}),
              {"Content-Type": "application/json"})
    r = json.loads(c.getresponse().read())
    dt = time.perf_counter() - t
    best = max(best, r["usage"]["prompt_tokens"] / dt)
print(f"{best:.1f}")
PY
)"
a_tg="$(python3 "$here/loadgen.py" --port "$a_port" --concurrency 1 --requests-per-client 3 --max-tokens 128 \
    | python3 -c 'import json,sys; print("%.1f" % json.load(sys.stdin)["decode_tok_s_per_stream"])')"
# Bytes of weights one decode step reads, as the engine counts them (codes, scales, norms).
step_bytes="$(curl -sf "http://127.0.0.1:$a_port/metrics" | awk '/^anneal_serve_weight_bytes_per_step /{print $2}')"

l_port="$(port)"
"$llama_bin/llama-server" -m "$model" --port "$l_port" -t "$threads" -np 16 -c 16384 --no-webui \
    >/tmp/anneal-llama-server.log 2>&1 &
pids+=($!)
wait_up "$l_port" health

echo
"$here/llama-info.sh" "$llama_bin" "$model" "$threads"
echo "load average before the runs: $(cut -d' ' -f1-3 /proc/loadavg) (other processes on the machine skew every figure)"
echo
echo "| single stream, $threads threads | prefill tok/s (512) | decode tok/s (128) |"
echo "| --- | --- | --- |"
echo "| llama.cpp (llama-bench) | $l_pp | $l_tg |"
echo "| anneal-runtime serve | $a_pp | $a_tg |"
echo
python3 - "$step_bytes" "$a_tg" "$read_gb_s" "$threads" <<'PY'
import sys
step, tg, read, threads = float(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
achieved = step * tg / 1e9
print(f"| decode, 1 stream | weights read per token | achieved GB/s | read GB/s, {threads} threads (membw, this run) | share |")
print("| --- | --- | --- | --- | --- |")
print(f"| anneal | {step / 1e6:.1f} MB | {achieved:.2f} | {read:.2f} | {100 * achieved / read:.0f} % |")
PY
echo
echo "| streams | server | aggregate tok/s | latency p50 / p99 s | TTFT p50 / p99 s |"
echo "| --- | --- | --- | --- | --- |"
declare -A agg
for c in 1 4 16; do
    for s in anneal:$a_port llama-server:$l_port; do
        r="$(python3 "$here/loadgen.py" --port "${s#*:}" --concurrency "$c" --requests-per-client "$per_client" \
            --max-tokens "$tokens")"
        agg[${s%%:*}-$c]="$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["tok_s"])' "$r")"
        python3 -c "
import json, sys; r = json.loads(sys.argv[1])
print(f'| $c | ${s%%:*} | {r[\"tok_s\"]:.1f} | {r[\"lat_p50\"]:.2f} / {r[\"lat_p99\"]:.2f} | {r[\"ttft_p50\"]:.3f} / {r[\"ttft_p99\"]:.3f} |')" "$r"
    done
done
echo
python3 -c '
import sys
a1, a16, l16 = map(float, sys.argv[1:])
print(f"16 streams: {a16 / a1:.2f}x anneal single stream, {a16 / l16:.2f}x llama-server at 16 streams")
' "${agg[anneal-1]}" "${agg[anneal-16]}" "${agg[llama-server-16]}"
