#!/usr/bin/env bash
# Builds llama-bench and llama-server from the llama.cpp sources vendored in PyPI's llama-cpp-python
# source package, into ~/.cache/anneal/llama.cpp (outside the clone). Reuses a finished build.
# Long on 2 cores (tens of minutes); JOBS=1 keeps a machine usable meanwhile.
set -euo pipefail

root="${ANNEAL_LLAMA_CPP_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/anneal/llama.cpp}"
version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
src="$root/llama_cpp_python-$version/vendor/llama.cpp"
build="$root/build-$version"

if [[ -x "$build/bin/llama-bench" && -x "$build/bin/llama-server" ]]; then
    echo "$build/bin"
    exit 0
fi
mkdir -p "$root"
if [[ ! -d "$src" ]]; then
    pip3 download --quiet --no-deps --no-binary=:all: --dest "$root" "llama-cpp-python==$version" >&2
    tar -xzf "$root/llama_cpp_python-$version.tar.gz" -C "$root"
fi
# GGML_NATIVE: the same "all features of this CPU" footing as our target-cpu=native bench build.
cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON >&2
cmake --build "$build" --target llama-bench llama-server -j "${JOBS:-2}" >&2
echo "$build/bin"
