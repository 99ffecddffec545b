#!/usr/bin/env bash
# The main job, on a fresh machine: bring up the local cluster (built from pinned upstream sources
# on first use), install anneal with Helm, run the operator, apply the pipeline example and follow
# it through the three controllers: the TrainingJob's worker lands on an H100 node, the EvalGate
# evaluates what it produced and promotes it, and the ModelServer rolls it out by digest. kwok
# simulates the GPU nodes, so the pods' work is done here, on this CPU, by the real runtime with
# the arguments the pods carry, and its results reach the operator as the pods' termination
# messages (as a kubelet reports them). Then the promoted model answers over the OpenAI API.
#
#   e2e/demo.sh             run it; the cluster stays up afterwards (e2e/cluster/down.sh stops it)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/anneal/target}"
work="${ANNEAL_DEMO_DIR:-$HOME/.cache/anneal/demo}"
mkdir -p "$work"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

# Cargo's dev profile, as e2e/test-all.sh builds: it optimises the runtime and every dependency
# (Cargo.toml), so the runtime trains as fast as the runtime's own tests do, and the test command
# after the demo reuses this build instead of compiling the whole tree a second time for release.
say "building anneal (dev profile, runtime and dependencies optimised)"
cargo build -q -p anneal-operator -p anneal-runtime
bin="$CARGO_TARGET_DIR/debug"

say "local cluster: pinned tools (built once) and up"
e2e/cluster/build-tools.sh >/dev/null
e2e/cluster/up.sh >/dev/null
# shellcheck source=e2e/cluster/env.sh
source e2e/cluster/env.sh
kubectl get nodes -L nvidia.com/gpu.product

say "helm install anneal (CRDs and user roles)"
helm upgrade --install anneal charts/anneal -n anneal-system --create-namespace --wait >/dev/null
helm list -n anneal-system

say "operator (local process, logs in $work/operator.log)"
"$bin/anneal-operator" run --runtime-image registry.invalid/anneal/runtime:demo >"$work/operator.log" 2>&1 &
operator=$!
trap 'kill $operator 2>/dev/null || true; [[ -n "${server:-}" ]] && kill "$server" 2>/dev/null || true' EXIT

say "kubectl apply -f manifests/examples/pipeline.yaml"
kubectl create namespace anneal-demo --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl label namespace anneal-demo pod-security.kubernetes.io/enforce=restricted --overwrite >/dev/null
# The local cluster has no storage provisioner: a volume made for the models claim (kwok never
# mounts it; a real cluster provisions one from its default StorageClass).
kubectl apply -f - >/dev/null <<YAML
apiVersion: v1
kind: PersistentVolume
metadata: {name: anneal-demo-models}
spec:
  capacity: {storage: 20Gi}
  accessModes: [ReadWriteMany]
  persistentVolumeReclaimPolicy: Retain
  hostPath: {path: /tmp/anneal-demo-models}
  claimRef: {namespace: anneal-demo, name: anneal-models}
YAML
kubectl apply -n anneal-demo -f manifests/examples/models-pvc.yaml
kubectl wait -n anneal-demo pvc/anneal-models --for=jsonpath='{.status.phase}'=Bound --timeout=60s >/dev/null
# A run before this one left its pipeline behind: start from a fresh one.
kubectl delete -n anneal-demo -f manifests/examples/pipeline.yaml --ignore-not-found --wait=true >/dev/null
kubectl wait -n anneal-demo pods -l app.kubernetes.io/managed-by=anneal-operator --for=delete --timeout=60s >/dev/null 2>&1 || true
kubectl apply -n anneal-demo -f manifests/examples/pipeline.yaml
kubectl wait -n anneal-demo trainingjob/arith --for=jsonpath='{.status.phase}'=Running --timeout=120s >/dev/null
kubectl get anneal -n anneal-demo
kubectl get pods -n anneal-demo -o wide

# The arguments of the container of pod spec $2 (.spec, .spec.template.spec) of object $1, one per line.
container_args() {
  kubectl get -n anneal-demo "$1" -o go-template="{{range $2.containers}}{{range .args}}{{.}}{{\"\\n\"}}{{end}}{{end}}"
}
# What a container says when it ends, reported through kwok as a kubelet would.
report() { e2e/cluster/fault.sh exit-pod "anneal-demo/$1" 0 "$(cat "$2")"; }

say "training: the worker's own spec, run here on the CPU"
# What the operator mounted into the worker (ConfigMap arith-config, /etc/anneal/trainingjob.json):
# pvc://anneal-models/... is read under ANNEAL_PVC_ROOT as in the pod.
kubectl get configmap arith-config -n anneal-demo -o jsonpath='{.data.trainingjob\.json}' >"$work/trainingjob.json"
rm -rf "$work/pvc" "$work/checkpoints"
mkdir -p "$work/pvc/anneal-models" "$work/checkpoints"
export ANNEAL_PVC_ROOT="$work/pvc"
: >"$work/train.termination"
ANNEAL_CHECKPOINT_DIR="$work/checkpoints" ANNEAL_TERMINATION_LOG="$work/train.termination" \
  "$bin/anneal-runtime" train --job-spec "$work/trainingjob.json" --device auto
echo "worker arith-a1-w0 ends: $(cat "$work/train.termination")"
report arith-a1-w0 "$work/train.termination"
kubectl wait -n anneal-demo trainingjob/arith --for=jsonpath='{.status.phase}'=Succeeded --timeout=60s >/dev/null

say "evaluation: the EvalGate's pod, its arguments run here on the CPU"
kubectl wait -n anneal-demo evalgate/arith --for=jsonpath='{.status.phase}'=Evaluating --timeout=60s >/dev/null
round="$(kubectl get -n anneal-demo evalgate/arith -o jsonpath='{.status.round}')"
eval_pod="arith-eval-$round-t1"
kubectl wait -n anneal-demo "pod/$eval_pod" --for=jsonpath='{.status.phase}'=Running --timeout=60s >/dev/null
mapfile -t args < <(container_args "pod/$eval_pod" .spec)
echo "pod $eval_pod runs: anneal-runtime ${args[*]}"
: >"$work/eval.termination"
ANNEAL_TERMINATION_LOG="$work/eval.termination" "$bin/anneal-runtime" "${args[@]}" >/dev/null
report "$eval_pod" "$work/eval.termination"
kubectl wait -n anneal-demo evalgate/arith --for=condition=Evaluated --timeout=60s >/dev/null
kubectl get -n anneal-demo evalgate/arith -o jsonpath='{range .status.conditions[*]}{.type}={.status} ({.reason}): {.message}{"\n"}{end}'

say "serving: the ModelServer rolls out what the gate promoted"
kubectl wait -n anneal-demo evalgate/arith --for=condition=Promoted --timeout=60s >/dev/null
kubectl wait -n anneal-demo modelserver/arith --for=jsonpath='{.status.phase}'=Ready --timeout=120s >/dev/null
kubectl get anneal -n anneal-demo
kubectl get deployment,service -n anneal-demo -l anneal.dev/modelserver=arith

say "the promoted model answers: the Deployment's arguments, run here on the CPU"
mapfile -t args < <(container_args deployment/arith .spec.template.spec)
for i in "${!args[@]}"; do [[ "${args[$i]}" == --listen ]] && args[i+1]=127.0.0.1:18080; done
echo "deployment arith runs: anneal-runtime ${args[*]}"
"$bin/anneal-runtime" "${args[@]}" >"$work/serve.log" 2>&1 &
server=$!
for _ in $(seq 1 120); do
  curl -sf localhost:18080/readyz >/dev/null && break
  kill -0 "$server" 2>/dev/null || { cat "$work/serve.log"; exit 1; }
  sleep 0.5
done
curl -s localhost:18080/v1/completions -H 'content-type: application/json' \
  -d '{"model": "arith", "prompt": "12+35=", "max_tokens": 4, "temperature": 0, "stop": ["\n"]}'
echo
say "done: the cluster is still up (source e2e/cluster/env.sh; e2e/cluster/down.sh stops it)"
