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
# The same SIMD footing as our target-cpu=native build (AVX-512 with VNNI and BF16), but no AMX:
# with GGML_NATIVE=ON ggml uses AMX tiles, which fault (SIGILL) on VMs that do not grant the
# process AMX state, as on this project's machines.
cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON \
    -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON \
    -DGGML_AVX512_BF16=ON -DGGML_AVX512_VBMI=ON -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON >&2
cmake --build "$build" --target llama-bench llama-server -j "${JOBS:-2}" >&2
echo "$build/bin"
