#!/usr/bin/env bash
# Stages, on this machine (no GPU needed), everything run.sh needs on a lent GPU machine into the
# git-ignored folders stage/ and stage-b/ beside this script, and prints the carry plan with the
# sizes (the device tool carries at most 64 MiB per call, working tree included):
#   stage/anneal-runtime.xz        the `cuda` build (runtime/scripts/cuda/build.sh), stripped, xz
#   stage/smollm2.gguf.part-a      the first part of SmolLM2-135M-Instruct Q4_1 (98 MB in all)
#   stage/smollm2.gguf.sha256      the whole file's checksum
#   stage-b/smollm2.gguf.part-b    the rest, carried by a second call to the same warm machine
# cpu_reference.json (tracked) travels with the tree. NO_MODEL=1 stages the binary only.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
limit=$((64 * 1024 * 1024))
margin=$((2 * 1024 * 1024)) # the tree grows a little between now and the call

bin="$("$repo/runtime/scripts/cuda/build.sh")"
rm -rf "$here/stage" "$here/stage-b"
mkdir -p "$here/stage" "$here/stage-b"
# Symbols go (about half the file); CUDA kernels (PTX) stay. xz -9: the binary is carried once.
strip -o "$here/stage/anneal-runtime" "$bin"
stripped_bytes="$(stat -c %s "$here/stage/anneal-runtime")"
xz -9 -T2 -f "$here/stage/anneal-runtime"

# What travels besides: tracked files and untracked ones git does not ignore.
tree_bytes="$(cd "$repo" && { git ls-files -z; git ls-files -z --others --exclude-standard; } \
    | xargs -0 stat -c %s 2>/dev/null | awk '{ s += $1 } END { print s + 0 }')"
bin_bytes="$(stat -c %s "$here/stage/anneal-runtime.xz")"

if [[ "${NO_MODEL:-0}" != 1 ]]; then
    model="$("$repo/runtime/scripts/fetch-smollm2.sh")"
    model_bytes="$(stat -c %s "$model")"
    # Call 1 carries tree + binary + part a; call 2 carries tree + part b: equal halves leave
    # both calls the same room for the tree to grow.
    part_a=$(((model_bytes + bin_bytes) / 2 - bin_bytes))
    if ((part_a <= 0 || tree_bytes + bin_bytes + part_a > limit - margin)); then
        echo "prepare.sh: SmolLM2 ($model_bytes bytes) does not fit in two carries" >&2
        exit 1
    fi
    head -c "$part_a" "$model" >"$here/stage/smollm2.gguf.part-a"
    tail -c +"$((part_a + 1))" "$model" >"$here/stage-b/smollm2.gguf.part-b"
    sha256sum "$model" | cut -d' ' -f1 >"$here/stage/smollm2.gguf.sha256"
fi

mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
dir_bytes() { du -sb "$1" | cut -f1; }
a="$(dir_bytes "$here/stage")"
b="$(dir_bytes "$here/stage-b")"
cat <<PLAN
binary: $bin ($(mib "$(stat -c %s "$bin")"); stripped: $(mib "$stripped_bytes"); + xz: $(mib "$bin_bytes"))
working tree that travels: $(mib "$tree_bytes")
call 1: carry ["runtime/benches/gpu/stage"]   $(mib $((tree_bytes + a))) of 64 MiB
        command: runtime/benches/gpu/run.sh --check
call 2: carry ["runtime/benches/gpu/stage-b"] $(mib $((tree_bytes + b))) of 64 MiB (stage/ stays on the warm machine)
        command: runtime/benches/gpu/run.sh    (timeout_s 540)
PLAN
