#!/usr/bin/env bash
# The GPU benchmark, run on a lent GPU machine (H200, CUDA 13.0 driver, PyTorch, no Rust, no
# network) over what prepare.sh staged here: training tokens/s and MFU against PyTorch, serving
# tokens/s at 1/16/64 streams, and correctness against the CPU (see README.md beside this).
# Under 8 minutes; prints a markdown table; results.json and logs go to $OUT (the device tool's
# output folder) or ./out.
#
#   runtime/benches/gpu/run.sh                    # on the GPU machine
#   runtime/benches/gpu/run.sh --check            # only: binary unpacks, libraries resolve, GPU seen
#   runtime/benches/gpu/run.sh --dry-run          # here, on the CPU: tiny sizes, same code path
#   runtime/benches/gpu/run.sh --write-reference  # here: recompute cpu_reference.json (CPU, f32)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
stage="$here/stage"
mode="${1:-gpu}"
out="${OUT:-$here/out}"
mkdir -p "$out"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
say() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }

# Python that has PyTorch: the GPU image's python3 does; here, the venv of ../train/bench.sh.
py=python3
torch_py=""
for p in "${ANNEAL_TORCH_PYTHON:-}" python3 "$HOME/.cache/anneal/torch-venv/bin/python"; do
    if [[ -n "$p" ]] && "$p" -c 'import torch' 2>/dev/null; then torch_py="$p"; break; fi
done

# 1. The binary: stripped and xz-compressed by prepare.sh (python's lzma: xz may be missing).
bin="${ANNEAL_BIN:-}"
if [[ -z "$bin" ]]; then
    [[ -f "$stage/anneal-runtime.xz" ]] || { echo "no $stage/anneal-runtime.xz: run prepare.sh first" >&2; exit 2; }
    bin="$tmp/anneal-runtime"
    "$py" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
        "$stage/anneal-runtime.xz" "$bin"
    chmod +x "$bin"
fi

# 2. SmolLM2: whole, or in two parts carried over two calls (stage/ then stage-b/), checked.
model=""
if [[ -f "$stage/smollm2.gguf.sha256" ]]; then
    parts=("$stage/smollm2.gguf.part-a" "$here/stage-b/smollm2.gguf.part-b")
    if [[ -f "${parts[0]}" && -f "${parts[1]}" ]]; then
        cat "${parts[@]}" >"$tmp/SmolLM2-135M-Instruct.Q4_1.gguf"
        if [[ "$(sha256sum "$tmp/SmolLM2-135M-Instruct.Q4_1.gguf" | cut -d' ' -f1)" == "$(cat "$stage/smollm2.gguf.sha256")" ]]; then
            model="$tmp/SmolLM2-135M-Instruct.Q4_1.gguf"
        else
            say "SmolLM2 parts do not match their checksum: serving falls back to the trained model"
        fi
    else
        say "SmolLM2 part(s) missing (second carry not made?): serving falls back to the trained model"
    fi
fi
model="${ANNEAL_SMOLLM2:-$model}"

# Here (dry run, reference): the link stubs stand in for the driver, whose stub libcuda answers
# "no CUDA device"; the binary runs on the CPU.
stubs="${ANNEAL_CUDA_CACHE:-$HOME/.cache/anneal/cuda}/stubs"
if [[ "$mode" != gpu && "$mode" != --check && -z "${ANNEAL_EXTRA_LIB_PATH:-}" && -d "$stubs" ]]; then
    ANNEAL_EXTRA_LIB_PATH="$stubs:$(dirname "$(readlink -f "$stubs/libcudart.so")")"
fi

# 3. The CUDA libraries the binary links: the driver's libcuda.so.1 from the system, cuBLAS,
#    cuRAND and the runtime from PyTorch's nvidia wheels (site-packages/nvidia/*/lib).
libdirs="$("$py" - <<'PY' 2>/dev/null || true
import glob, os, site, sys
roots = set(site.getsitepackages() + [site.getusersitepackages()])
for p in sys.path:
    if p.endswith("site-packages"):
        roots.add(p)
found = []
for r in sorted(roots):
    for d in glob.glob(os.path.join(r, "nvidia", "*", "lib")) + glob.glob(os.path.join(r, "nvidia", "*", "lib64")):
        if any(glob.glob(os.path.join(d, n)) for n in ("libcublas.so.*", "libcurand.so.*", "libcudart.so.*")):
            found.append(d)
print(":".join(found))
PY
)"
if [[ -n "$torch_py" && "$torch_py" != "$py" ]]; then
    more="$("$torch_py" -c 'import glob, os, torch; r = os.path.dirname(os.path.dirname(torch.__file__)); print(":".join(glob.glob(os.path.join(r, "nvidia", "*", "lib"))))' 2>/dev/null || true)"
    libdirs="${libdirs:+$libdirs:}$more"
fi
export LD_LIBRARY_PATH="${ANNEAL_EXTRA_LIB_PATH:+$ANNEAL_EXTRA_LIB_PATH:}${libdirs:+$libdirs:}/usr/local/cuda/lib64:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
# Last resort for a library still missing: look for it under /usr and /opt (CUDA toolkits).
for lib in $(ldd "$bin" | awk '/not found/ { print $1 }'); do
    hit="$(find /usr /opt -name "$lib" -print -quit 2>/dev/null || true)"
    [[ -n "$hit" ]] && LD_LIBRARY_PATH="$(dirname "$hit"):$LD_LIBRARY_PATH"
done
if ldd "$bin" | grep -q 'not found'; then
    echo "anneal-runtime cannot find its libraries (LD_LIBRARY_PATH=$LD_LIBRARY_PATH):" >&2
    ldd "$bin" | grep 'not found' >&2
    exit 3
fi
ldd "$bin" | grep -E 'libcuda|libcublas|libcurand|libcudart' >&2 || true

args=(--bin "$bin" --out "$out" ${model:+--model "$model"} ${torch_py:+--python-torch "$torch_py"})
case "$mode" in
    gpu)
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >&2 || true
        exec "$py" "$here/bench.py" "${args[@]}" --device cuda:0 --threads "$(nproc)"
        ;;
    --check)
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >&2 || true
        say "binary: $("$bin" --version); SmolLM2: ${model:-absent}; PyTorch: ${torch_py:-absent}"
        # A two-step run on the GPU proves the device is found and the kernels load.
        "$py" - "$bin" "$tmp" <<'PY'
import json, subprocess, sys
bin, tmp = sys.argv[1], sys.argv[2]
open(f"{tmp}/c.yaml", "w").write(f"""model:
  architecture: {{hiddenSize: 64, nLayers: 2, nHeads: 4, nKvHeads: 2, intermediateSize: 128, maxSeqLen: 32}}
dataset: {{uri: "builtin:arith"}}
stage: sft
hyperparameters: {{steps: 2, batchSize: 4, logEvery: 1, warmupSteps: 1}}
output: {{path: "{tmp}/m"}}
""")
p = subprocess.run([bin, "train", "--config", f"{tmp}/c.yaml", "--device", "cuda:0"], capture_output=True, text=True)
print(p.stdout[-2000:], p.stderr[-2000:], f"exit {p.returncode}", sep="\n")
sys.exit(p.returncode)
PY
        ;;
    --dry-run)
        # Here, without a GPU: the same steps on the CPU at tiny sizes.
        exec "$py" "$here/bench.py" "${args[@]}" --device cpu --quick --threads "${THREADS:-2}"
        ;;
    --write-reference)
        exec "$py" "$here/bench.py" "${args[@]}" --device cpu --write-reference --threads "${THREADS:-2}"
        ;;
    *)
        echo "usage: $0 [--check|--dry-run|--write-reference]" >&2
        exit 2
        ;;
esac
