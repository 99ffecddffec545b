#!/usr/bin/env bash
# Builds llama-bench and llama-server from the llama.cpp sources vendored in PyPI's llama-cpp-python
# source package, into ~/.cache/anneal/llama.cpp (outside the clone). Reuses a finished build.
# Long on 2 cores (tens of minutes); JOBS=1 keeps a machine usable meanwhile.
set -euo pipefail

root="${ANNEAL_LLAMA_CPP_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/anneal/llama.cpp}"
version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
src="$root/llama_cpp_python-$version/vendor/llama.cpp"
# "-native": the build before GGML_NATIVE=ON (build-$version, AVX-512 flags listed by hand) stays.
build="$root/build-$version-native"

if [[ -x "$build/bin/llama-bench" && -x "$build/bin/llama-server" ]]; then
    echo "$build/bin"
    exit 0
fi
mkdir -p "$root"
if [[ ! -d "$src" ]]; then
    pip3 download --quiet --no-deps --no-binary=:all: --dest "$root" "llama-cpp-python==$version" >&2
    tar -xzf "$root/llama_cpp_python-$version.tar.gz" -C "$root"
fi
# The flags llama.cpp's docs recommend for a CPU build: GGML_NATIVE=ON (-march=native, every SIMD
# extension this CPU has: AVX-512 with VNNI and BF16 here), with only AMX turned off. With
# GGML_NATIVE=ON ggml ignores its GGML_AMX_* options (they apply to GGML_NATIVE=OFF builds), and
# -march=native on a CPU with AMX (this VM lists amx_tile/int8/bf16) defines __AMX_INT8__, which
# compiles ggml's AMX tile kernels in; those fault (SIGILL) on VMs that do not grant the process
# AMX state, as on this project's machines. So -mno-amx-* go in the C/C++ flags (GCC lets an
# explicit -mno-X win over what -march=native implies, whatever the order).
# ANNEAL_LLAMA_CPP_AMX=1 keeps AMX on.
amx_off="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
[[ "${ANNEAL_LLAMA_CPP_AMX:-0}" == 1 ]] && amx_off=""
cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
    -DCMAKE_C_FLAGS="$amx_off" -DCMAKE_CXX_FLAGS="$amx_off" -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON >&2
cmake --build "$build" --target llama-bench llama-server -j "${JOBS:-2}" >&2
# What the benchmark tables print beside llama.cpp's figures.
echo "llama-cpp-python $version sources, Release, GGML_NATIVE=ON, C/C++ flags '${amx_off:-none}'" \
    > "$build/anneal-build-flags.txt"
echo "$build/bin"
