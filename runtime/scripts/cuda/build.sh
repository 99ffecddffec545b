#!/usr/bin/env bash
# Compiles anneal-runtime with the `cuda` feature on a machine without a GPU (CI does, so the GPU
# path cannot rot unseen) and prints the binary's path. Build dir: ~/.cache/anneal/target-cuda
# (override: ANNEAL_CUDA_TARGET_DIR; CARGO_TARGET_DIR is ignored, since callers such as
# e2e/test-all.sh export it for the CPU build), apart from the CPU build so neither invalidates
# the other.
# Kernels are compiled for CUDA_COMPUTE_CAP (default 90: H100/H200).
#
#   runtime/scripts/cuda/build.sh                     # release binary
#   runtime/scripts/cuda/build.sh clippy              # clippy -D warnings over all targets, cuda on
#                                                     # (release profile: reuses the compiled kernels)
#
# Two steps, so that a brand-new machine needs no failed first attempt: (1) build the runtime's
# library, which compiles cudarc and candle but links nothing; (2) generate the link stubs from the
# undefined symbols of the rlibs built in (1) (toolkit.sh; a no-op when unchanged); (3) build the
# binary, linking against the stubs. The binary records only the libraries' SONAMEs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../.."

# shellcheck source=toolkit.sh
source runtime/scripts/cuda/toolkit.sh
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CARGO_TARGET_DIR="${ANNEAL_CUDA_TARGET_DIR:-$HOME/.cache/anneal/target-cuda}"
# LIBRARY_PATH (read by the C compiler driver that links) rather than RUSTFLAGS: RUSTFLAGS would
# replace the target-cpu flags of .cargo/config.toml and its changes rebuild everything.
export LIBRARY_PATH="$ANNEAL_CUDA_STUBS${LIBRARY_PATH:+:$LIBRARY_PATH}"

cargo_args=(-p anneal-runtime --features cuda)

if [[ "${1:-}" == clippy ]]; then
    shift
    # Check builds link nothing: no stubs needed. --release: build scripts run per profile, and
    # candle-kernels' (nvcc over every kernel) has already run for the release build.
    exec cargo clippy --release "${cargo_args[@]}" --all-targets "$@" -- -D warnings
fi

# (1) Library only, with the paths of every rlib it consists of.
rlibs="$(cargo build --release "${cargo_args[@]}" --lib --message-format=json-render-diagnostics \
    | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    if msg.get("reason") == "compiler-artifact":
        for f in msg.get("filenames", []):
            if f.endswith(".rlib"):
                print(f)
')"
# (2) Stubs from those rlibs.
# shellcheck disable=SC2086
_anneal_cuda_stubs $rlibs
# (3) The binary.
cargo build --release "${cargo_args[@]}" --bin anneal-runtime "$@" >&2
echo "$CARGO_TARGET_DIR/release/anneal-runtime"
