#!/usr/bin/env bash
# What the serving benchmarks print beside llama.cpp's figures: the CPU model, llama.cpp's build flags (as
# build-llama-cpp.sh recorded them) and ggml's system_info line (the SIMD the build uses), which llama-server
# prints at verbosity 4 only: from a short run of its own, so that measured servers keep their default logging.
#   llama-info.sh LLAMA_BIN_DIR MODEL THREADS
set -euo pipefail
bin="$1" model="$2" threads="$3"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//') ($(nproc) cores); $threads threads"
echo "llama.cpp: $(cat "$bin/../anneal-build-flags.txt" 2>/dev/null || echo 'build flags unknown')"
echo "llama.cpp $( (timeout 30 "$bin/llama-server" -m "$model" -t "$threads" -lv 4 --no-webui --port "$port" 2>&1 || true) \
    | grep -m1 -o 'system_info:.*' || echo 'system_info: not printed')"
