# The entrypoint of the test image anneal-runtime-gpufault (see its Containerfile); run by busybox sh.
# Arguments: those of anneal-runtime (the operator's `train --job-spec ... --device auto`).
runtime=/usr/local/bin/anneal-runtime
trigger="${ANNEAL_CHECKPOINT_DIR:-/nonexistent}/.gpu-fault"
if [ "${ANNEAL_ATTEMPT:-1}" != 1 ]; then
  exec "$runtime" "$@"
fi
"$runtime" "$@" &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null' TERM
while kill -0 "$pid" 2>/dev/null; do
  if [ -e "$trigger" ]; then
    kill -KILL "$pid"
    wait "$pid" 2>/dev/null
    echo "anneal-runtime: error: device fault: CUDA_ERROR_ECC_UNCORRECTABLE (injected by the test image anneal-runtime-gpufault)" >&2
    exit 75
  fi
  sleep 0.1
done
wait "$pid"
