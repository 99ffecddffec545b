#!/usr/bin/env bash
# The main job, on a fresh machine: bring up the local cluster (built from pinned upstream sources
# on first use), install anneal with Helm, run the operator, apply the pipeline example and watch
# the TrainingJob's worker land on an H100 node (kwok simulates the GPU nodes); then run the real
# runtime on this CPU: train a tiny model on builtin:arith, evaluate it like an EvalGate would, and
# serve it over the OpenAI-compatible API. What is not built yet is said as such.
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
kubectl apply -n anneal-demo -f manifests/examples/pipeline.yaml
kubectl wait -n anneal-demo trainingjob/arith --for=jsonpath='{.status.phase}'=Running --timeout=120s
kubectl get anneal -n anneal-demo
kubectl get pods -n anneal-demo -o wide
echo "(the worker pod runs on a kwok-simulated H100 node; the EvalGate and ModelServer controllers are not built yet)"

say "the runtime, for real on this CPU: the TrainingJob's own spec, as the worker pod reads it"
# What the operator mounted into the worker (ConfigMap arith-config, /etc/anneal/trainingjob.json),
# trained here on the CPU: pvc://anneal-models/... is read under ANNEAL_PVC_ROOT as in the pod.
kubectl get configmap arith-config -n anneal-demo -o jsonpath='{.data.trainingjob\.json}' >"$work/trainingjob.json"
rm -rf "$work/pvc" "$work/checkpoints"
mkdir -p "$work/pvc/anneal-models" "$work/checkpoints"
ANNEAL_PVC_ROOT="$work/pvc" ANNEAL_CHECKPOINT_DIR="$work/checkpoints" \
  "$bin/anneal-runtime" train --job-spec "$work/trainingjob.json" --device auto
model="$work/pvc/anneal-models/arith"

say "evaluate it on the held-out test split (what an EvalGate reads)"
"$bin/anneal-runtime" eval --model "$model" --data builtin:arith | tee "$work/eval.json"

say "serve it and ask over the OpenAI-compatible API"
"$bin/anneal-runtime" serve --model "$model" --listen 127.0.0.1:18080 --max-seq-len 64 >"$work/serve.log" 2>&1 &
server=$!
for _ in $(seq 1 120); do
  curl -sf localhost:18080/readyz >/dev/null && break
  kill -0 "$server" 2>/dev/null || { cat "$work/serve.log"; exit 1; }
  sleep 0.5
done
curl -s localhost:18080/v1/completions -H 'content-type: application/json' \
  -d '{"model": "model", "prompt": "12+35=", "max_tokens": 4, "temperature": 0, "stop": ["\n"]}'
echo
say "done: the cluster is still up (source e2e/cluster/env.sh; e2e/cluster/down.sh stops it)"
