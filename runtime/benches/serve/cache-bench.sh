#!/usr/bin/env bash
# Cache benchmarks, SmolLM2-135M-Instruct Q4_1, 2 threads. Prints two markdown tables:
#   1. response cache: the same Zipf-distributed mix of deterministic chat requests (4 clients, 32 tokens
#      each; about 40% repeat an earlier one) against anneal-runtime serve with the response cache on
#      (TTL 300 s) and off: hit rate, request latency p50/p99;
#   2. prefix cache: time to first token of chat requests sharing a ~500-token system prompt, cold (the
#      first) and warm (the next 8, other questions), for anneal with the prefix cache on and off and
#      llama-server with cache_prompt (built from source on first use, GGML_NATIVE=ON);
#   3. multi-turn chat: 4 conversations at once, 6 turns each, every turn resending the history
#      (chatgen.py): turns/s and generated tokens/s for anneal with the prefix cache on and off and
#      llama-server (4 slots, cache_prompt).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
threads="${THREADS:-2}"
requests="${REQUESTS:-200}"
model="$("$repo/runtime/scripts/fetch-smollm2.sh")"
export CARGO_TARGET_DIR="${ANNEAL_NATIVE_TARGET:-$HOME/.cache/anneal/target-native}"
(cd "$repo" && RUSTFLAGS="-C target-cpu=native" cargo build --release -q -p anneal-runtime)
anneal="$CARGO_TARGET_DIR/release/anneal-runtime"

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_up() { for _ in $(seq 600); do curl -sf "http://127.0.0.1:$1/${2:-readyz}" >/dev/null && return 0; sleep 0.2; done; return 1; }
pid=""
trap '[[ -n "$pid" ]] && kill "$pid" 2>/dev/null || true' EXIT

run() { # $1 = the load generator and its arguments; the rest: anneal serve's extra arguments
  local gen="$1"; shift
  local p; p="$(port)"
  "$anneal" serve --model "$model" --listen "127.0.0.1:$p" --threads "$threads" --max-batch 16 \
      --max-seq-len 1024 "$@" >/tmp/anneal-cache-bench.log 2>&1 &
  pid=$!
  wait_up "$p"
  python3 "$here/$gen" --port "$p" "${gen_args[@]}"
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
}
gen_args=(--requests "$requests")
on="$(run cachegen.py --response-cache-ttl-secs 300)"
off="$(run cachegen.py --response-cache-ttl-secs 0)"
gen_args=()
p_on="$(run prefixgen.py --prefix-cache true)"
p_off="$(run prefixgen.py --prefix-cache false)"
c_on="$(run chatgen.py --prefix-cache true)"
c_off="$(run chatgen.py --prefix-cache false)"
llama_bin="$("$here/build-llama-cpp.sh")"
llama_run() { # $1 = the load generator; the rest: llama-server's extra arguments
  local gen="$1"; shift
  local p; p="$(port)"
  "$llama_bin/llama-server" -m "$model" --port "$p" -t "$threads" --no-webui "$@" \
      >/tmp/anneal-cache-bench-llama.log 2>&1 &
  pid=$!
  wait_up "$p" health
  python3 "$here/$gen" --port "$p"
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
}
p_llama="$(llama_run prefixgen.py -np 1 -c 2048)"
c_llama="$(llama_run chatgen.py -np 4 -c 8192)"
"$here/llama-info.sh" "$llama_bin" "$model" "$threads"
echo
python3 - "$on" "$off" "$(lscpu | sed -n 's/^Model name: *//p')" "$p_on" "$p_off" "$p_llama" \
    "$c_on" "$c_off" "$c_llama" "$("$llama_bin/llama-server" --version 2>&1 | head -n 1)" <<'PY'
import json, sys
on, off, cpu = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
p_on, p_off, p_llama = (json.loads(x) for x in sys.argv[4:7])
c_on, c_off, c_llama = (json.loads(x) for x in sys.argv[7:10])
llama_version = sys.argv[10]
print(f"{on['requests']} requests, {on['repeat_share']:.0%} repeat an earlier one (Zipf 0.9 over 1000 prompts)\n")
print("| | cache on (TTL 300 s) | cache off |")
print("| --- | --- | --- |")
print(f"| hit rate | {on['hit_rate']:.1%} | {off['hit_rate']:.1%} |")
print(f"| latency p50 | {on['p50_s']*1000:.0f} ms | {off['p50_s']*1000:.0f} ms |")
print(f"| latency p99 | {on['p99_s']*1000:.0f} ms | {off['p99_s']*1000:.0f} ms |")
print(f"| requests/s | {on['req_per_s']:.2f} | {off['req_per_s']:.2f} |")
print(f"| errors | {len(on['errors'])} | {len(off['errors'])} |")
print(f"\nPrefix cache: time to first token, {p_on['prompt_tokens']}-token prompts sharing the system prompt\n")
print("| | anneal, prefix cache on | anneal, prefix cache off | llama-server, cache_prompt |")
print("| --- | --- | --- | --- |")
print(f"| cold (first request) | {p_on['cold_s']*1000:.0f} ms | {p_off['cold_s']*1000:.0f} ms | {p_llama['cold_s']*1000:.0f} ms |")
print(f"| warm (median of 8) | {p_on['warm_s']*1000:.0f} ms | {p_off['warm_s']*1000:.0f} ms | {p_llama['warm_s']*1000:.0f} ms |")
print(f"\nMulti-turn chat: {c_on['clients']} conversations at once, every turn resends the history "
      f"(mean prompt {c_on['prompt_tokens_mean']:.0f} tokens), 32 tokens per answer; llama.cpp: {llama_version}\n")
print("| | anneal, prefix cache on | anneal, prefix cache off | llama-server (4 slots), cache_prompt |")
print("| --- | --- | --- | --- |")
print(f"| turns/s | {c_on['turns_per_s']:.2f} | {c_off['turns_per_s']:.2f} | {c_llama['turns_per_s']:.2f} |")
print(f"| generated tokens/s | {c_on['generated_per_s']:.1f} | {c_off['generated_per_s']:.1f} | {c_llama['generated_per_s']:.1f} |")
print(f"| turn latency p50 | {c_on['p50_s']*1000:.0f} ms | {c_off['p50_s']*1000:.0f} ms | {c_llama['p50_s']*1000:.0f} ms |")
print(f"| turns answered / errors | {c_on['turns']} / {len(c_on['errors'])} | {c_off['turns']} / {len(c_off['errors'])} | {c_llama['turns']} / {len(c_llama['errors'])} |")
PY
