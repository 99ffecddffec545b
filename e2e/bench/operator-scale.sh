#!/usr/bin/env bash
# The operator at scale: N TrainingJobs (default 1000) in one namespace of the local cluster (kwok
# nodes: 16 H100 GPUs, so 16 workers run and the rest stay Pending, as queued jobs would). Prints
# a table: time until every job has a status, the operator's resident memory (before, peak,
# settled), the write requests it sent, and its writes and reconciles per minute once settled.
#
#   e2e/bench/operator-scale.sh            # JOBS=1000 SETTLE_S=60
# Needs the local cluster (e2e/cluster/up.sh; started here if down). Builds the operator (release).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/anneal/target}"
JOBS="${JOBS:-1000}"
SETTLE_S="${SETTLE_S:-60}"
NS="anneal-scale"
work="$(mktemp -d)"
say() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }

cargo build --release -q -p anneal-operator
bin="$CARGO_TARGET_DIR/release/anneal-operator"
e2e/cluster/up.sh >/dev/null
# shellcheck source=e2e/cluster/env.sh
source e2e/cluster/env.sh
kubectl apply --server-side --force-conflicts -f manifests/crds/ >/dev/null

kubectl delete namespace "$NS" --ignore-not-found --wait=true >/dev/null
kubectl delete pv "anneal-models-$NS" --ignore-not-found >/dev/null
kubectl create namespace "$NS" >/dev/null
kubectl label namespace "$NS" pod-security.kubernetes.io/enforce=restricted >/dev/null
kubectl apply -f - >/dev/null <<YAML
apiVersion: v1
kind: PersistentVolume
metadata: {name: anneal-models-$NS}
spec:
  capacity: {storage: 20Gi}
  accessModes: [ReadWriteMany]
  persistentVolumeReclaimPolicy: Retain
  hostPath: {path: /tmp/anneal-models-$NS}
  claimRef: {namespace: $NS, name: anneal-models}
YAML
kubectl apply -n "$NS" -f manifests/examples/models-pvc.yaml >/dev/null

port=$((20000 + RANDOM % 20000))
"$bin" run --namespace "$NS" --runtime-image registry.invalid/anneal/runtime:scale \
  --metrics-addr "127.0.0.1:$port" >"$work/operator.log" 2>&1 &
operator=$!
cleanup() {
  kill "$operator" 2>/dev/null || true
  kubectl delete namespace "$NS" --wait=false >/dev/null 2>&1 || true
  kubectl delete pv "anneal-models-$NS" --wait=false >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

metric() { # sum of a metric's samples on /metrics
  curl -sf "http://127.0.0.1:$port/metrics" | awk -v m="$1" '$1 ~ "^"m"({|$)" {s += $2} END {printf "%d", s}'
}
rss_mib() { awk '/^VmRSS/ {printf "%.1f", $2 / 1024}' "/proc/$operator/status"; }
until curl -sf "http://127.0.0.1:$port/readyz" >/dev/null; do
  kill -0 "$operator" || { cat "$work/operator.log"; exit 1; }
  sleep 0.2
done
rss_before="$(rss_mib)"

say "creating $JOBS TrainingJobs"
for i in $(seq 1 "$JOBS"); do
  sed -e "s/^  name: arith$/  name: job-$i/" manifests/examples/trainingjob.yaml
  echo "---"
done >"$work/jobs.yaml"
start=$(date +%s.%N)
kubectl create -n "$NS" -f "$work/jobs.yaml" >/dev/null
created=$(date +%s.%N)

# Peak RSS, sampled while the operator works through the jobs.
peak="$rss_before"
while :; do
  r="$(rss_mib)"
  peak="$(awk -v a="$peak" -v b="$r" 'BEGIN {print (b > a) ? b : a}')"
  with_status=$(kubectl get trainingjobs -n "$NS" -o jsonpath='{range .items[*]}{.status.phase}{"\n"}{end}' | grep -c . || true)
  [[ "$with_status" -ge "$JOBS" ]] && break
  sleep 1
done
converged=$(date +%s.%N)
pods=$(kubectl get pods -n "$NS" --no-headers | wc -l)
running=$(kubectl get pods -n "$NS" --field-selector=status.phase=Running --no-headers | wc -l)
writes_converged="$(metric anneal_operator_api_writes_total)"

say "settling for ${SETTLE_S}s"
sleep 10
w0="$(metric anneal_operator_api_writes_total)"
r0="$(metric anneal_operator_reconciles_total)"
for _ in $(seq 1 "$SETTLE_S"); do
  r="$(rss_mib)"
  peak="$(awk -v a="$peak" -v b="$r" 'BEGIN {print (b > a) ? b : a}')"
  sleep 1
done
w1="$(metric anneal_operator_api_writes_total)"
r1="$(metric anneal_operator_reconciles_total)"
rss_settled="$(rss_mib)"

awk -v jobs="$JOBS" -v pods="$pods" -v running="$running" \
  -v create_s="$(awk -v a="$start" -v b="$created" 'BEGIN {print b - a}')" \
  -v converge_s="$(awk -v a="$start" -v b="$converged" 'BEGIN {print b - a}')" \
  -v before="$rss_before" -v peak="$peak" -v settled="$rss_settled" \
  -v writes="$writes_converged" -v wpm="$(awk -v a="$w0" -v b="$w1" -v s="$SETTLE_S" 'BEGIN {print (b - a) * 60 / s}')" \
  -v rpm="$(awk -v a="$r0" -v b="$r1" -v s="$SETTLE_S" 'BEGIN {print (b - a) * 60 / s}')" 'BEGIN {
  print "| TrainingJobs | worker pods (Running) | kubectl create | all have a status | operator RSS before / peak / settled | writes until then | settled writes/min | settled reconciles/min |"
  print "| --- | --- | --- | --- | --- | --- | --- | --- |"
  printf "| %d | %d (%d) | %.1f s | %.1f s | %s / %s / %s MiB | %d | %.1f | %.1f |\n", jobs, pods, running, create_s, converge_s, before, peak, settled, writes, wpm, rpm
}'
