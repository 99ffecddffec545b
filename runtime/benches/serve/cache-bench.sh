#!/usr/bin/env bash
# Response-cache benchmark: the same Zipf-distributed mix of deterministic chat requests (SmolLM2-135M-
# Instruct Q4_1, 2 threads, 4 clients, 32 tokens each; about 40% of the requests repeat an earlier one)
# against anneal-runtime serve with the response cache on (TTL 300 s) and off, side by side: the hit rate
# and request latency p50/p99. Prints a markdown table.
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
wait_up() { for _ in $(seq 600); do curl -sf "http://127.0.0.1:$1/readyz" >/dev/null && return 0; sleep 0.2; done; return 1; }
pid=""
trap '[[ -n "$pid" ]] && kill "$pid" 2>/dev/null || true' EXIT

run() { # $1 = TTL seconds (0: cache off)
  local p; p="$(port)"
  "$anneal" serve --model "$model" --listen "127.0.0.1:$p" --threads "$threads" --max-batch 16 \
      --max-seq-len 512 --response-cache-ttl-secs "$1" >/tmp/anneal-cache-bench.log 2>&1 &
  pid=$!
  wait_up "$p"
  python3 "$here/cachegen.py" --port "$p" --requests "$requests"
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
}
on="$(run 300)"
off="$(run 0)"
python3 - "$on" "$off" "$(lscpu | sed -n 's/^Model name: *//p')" <<'PY'
import json, sys
on, off, cpu = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
print(f"CPU: {cpu}; {on['requests']} requests, {on['repeat_share']:.0%} repeat an earlier one (Zipf 0.9 over 1000 prompts)\n")
print("| | cache on (TTL 300 s) | cache off |")
print("| --- | --- | --- |")
print(f"| hit rate | {on['hit_rate']:.1%} | {off['hit_rate']:.1%} |")
print(f"| latency p50 | {on['p50_s']*1000:.0f} ms | {off['p50_s']*1000:.0f} ms |")
print(f"| latency p99 | {on['p99_s']*1000:.0f} ms | {off['p99_s']*1000:.0f} ms |")
print(f"| requests/s | {on['req_per_s']:.2f} | {off['req_per_s']:.2f} |")
print(f"| errors | {len(on['errors'])} | {len(off['errors'])} |")
PY
