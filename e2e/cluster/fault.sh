#!/usr/bin/env bash
# Fault controls for tests and demos of the local cluster. e2e/src/faults.rs does the same from Rust tests.
#
#   fault.sh fail-node NODE             kwok stops simulating NODE: its Lease in kube-node-lease goes stale and
#                                       node-lifecycle-controller marks it Ready=Unknown ~10 s later; its pods
#                                       are left as they are (deleting them hangs until forced), like a dead node
#   fault.sh gpu-unhealthy NODE         taints NODE nvidia.com/gpu.health=unhealthy:NoSchedule
#   fault.sh set-gpus NODE COUNT        sets NODE's allocatable nvidia.com/gpu (a device plugin reporting
#                                       fewer healthy GPUs); capacity stays
#   fault.sh restore-node NODE          undoes all three: kwok manages NODE again (Ready within seconds), the
#                                       health taint goes, allocatable GPUs equal capacity again
#   fault.sh exit-pod [NS/]POD CODE [MESSAGE]
#                                       POD's containers exit with CODE and termination MESSAGE (see
#                                       kwok/pod-stages.yaml, stage anneal-pod-exit)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

GPU_HEALTH_TAINT_KEY="nvidia.com/gpu.health"
EXIT_CODE_ANNOTATION="anneal.dev/kwok-exit-code"
EXIT_MESSAGE_ANNOTATION="anneal.dev/kwok-exit-message"

usage() { sed -n '2,16s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2; exit 2; }

fail_node() { kubectl_ label node "$1" "$KWOK_MANAGED_LABEL_KEY-"; }

gpu_unhealthy() { kubectl_ taint node "$1" "$GPU_HEALTH_TAINT_KEY=unhealthy:NoSchedule" --overwrite; }

set_gpus() {
  kubectl_ patch node "$1" --subresource status --type merge \
    --patch "{\"status\":{\"allocatable\":{\"nvidia.com/gpu\":\"$2\"}}}"
}

restore_node() {
  local capacity
  kubectl_ label node "$1" "$KWOK_MANAGED_LABEL_KEY=$KWOK_MANAGED_LABEL_VALUE" --overwrite
  if kubectl_ get node "$1" -o jsonpath='{.spec.taints[*].key}' | grep -qw "$GPU_HEALTH_TAINT_KEY"; then
    kubectl_ taint node "$1" "$GPU_HEALTH_TAINT_KEY-"
  fi
  capacity="$(kubectl_ get node "$1" -o jsonpath='{.status.capacity.nvidia\.com/gpu}')"
  [[ -z "$capacity" ]] || set_gpus "$1" "$capacity"
}

exit_pod() {
  local namespace=default pod="$1"
  if [[ "$pod" == */* ]]; then namespace="${pod%%/*}" pod="${pod#*/}"; fi
  kubectl_ annotate pod "$pod" --namespace "$namespace" --overwrite \
    "$EXIT_CODE_ANNOTATION=$2" "$EXIT_MESSAGE_ANNOTATION=${3:-}"
}

case "${1:-}" in
  fail-node) [[ $# -eq 2 ]] || usage; fail_node "$2" ;;
  gpu-unhealthy) [[ $# -eq 2 ]] || usage; gpu_unhealthy "$2" ;;
  set-gpus) [[ $# -eq 3 ]] || usage; set_gpus "$2" "$3" ;;
  restore-node) [[ $# -eq 2 ]] || usage; restore_node "$2" ;;
  exit-pod) [[ $# -eq 3 || $# -eq 4 ]] || usage; exit_pod "$2" "$3" "${4:-}" ;;
  *) usage ;;
esac
