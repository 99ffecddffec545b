#!/usr/bin/env bash
# The main job, on a fresh machine: build anneal and its images, bring up the local cluster with two real
# nodes (containerd + runc + kubelet on this machine, e2e/cluster/nodes-up.sh), install the operator with Helm
# (it runs in-cluster, from the image built here), apply the pipeline example and follow it: the TrainingJob
# trains in a real container on the H100-labelled node, the EvalGate evaluates what it produced and promotes
# it, the ModelServer serves it by digest on the A100-labelled node, and the model answers through its
# Service. The pods run on this machine's CPU (the nodes advertise GPUs they do not have).
#
#   e2e/demo.sh    run it (as root: containerd, cgroups, bridges, iptables); idempotent, a rerun starts the
#                  pipeline afresh. The cluster stays up afterwards (e2e/cluster/down.sh stops it).
#
# Output: one section per stage, the training's progress (a bar on a terminal, JSON lines otherwise), and at the
# end the resources, the gate's metrics, the model's answers and the time each stage took. The tools' own
# output goes to ~/.cache/anneal/demo/*.log, shown when a step fails.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/anneal/target}"
work="${ANNEAL_DEMO_DIR:-$HOME/.cache/anneal/demo}"
mkdir -p "$work"
ns=anneal-demo
# Always the default cluster (~/.cache/anneal/cluster, API server on 16443), whatever a shell exported for another.
unset ANNEAL_CLUSTER_DIR ANNEAL_KUBECONFIG ANNEAL_CLUSTER_LOGS KUBECONFIG ANNEAL_ETCD_PORT ANNEAL_ETCD_PEER_PORT \
  ANNEAL_APISERVER_PORT ANNEAL_CONTROLLER_MANAGER_PORT ANNEAL_SCHEDULER_PORT ANNEAL_KWOK_PORT ANNEAL_NODE_PORT_BASE
if [[ $EUID -ne 0 ]]; then
  echo "e2e/demo.sh runs real nodes (containerd, kubelet, cgroups, bridges, iptables): run it as root" >&2
  exit 1
fi

tty=0
[[ -t 1 ]] && tty=1
now() { echo "${EPOCHREALTIME/,/.}"; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
demo_begin="$(now)"
stages=()
stage_name="" stage_begin=""
end_stage() {
  [[ -n "$stage_name" ]] || return 0
  stages+=("$stage_name|$(since "$stage_begin")")
  stage_name=""
}
stage() {
  end_stage
  stage_name="$1" stage_begin="$(now)"
  if ((tty)); then printf '\n\033[1m== %s\033[0m\n' "$1"; else printf '\n== %s (%s)\n' "$1" "$(date +%T)"; fi
}
# step LOG DESCRIPTION COMMAND...: runs COMMAND with its output in $work/LOG.log, on one line with its time; on
# failure, the end of that log.
step() {
  local log="$work/$1.log" what="$2" begin
  shift 2
  begin="$(now)"
  printf '  %-58s' "$what"
  if ! "$@" >"$log" 2>&1; then
    printf 'failed\n'
    echo "-- the end of $log:" >&2
    tail -n 25 "$log" >&2
    exit 1
  fi
  printf '%6s s\n' "$(since "$begin")"
}
# What a person needs when the pipeline gets stuck: its pods, the latest events, the operator's log.
diagnose() {
  echo "-- pods, events and the operator's log:" >&2
  kubectl get pods -n "$ns" -o wide >&2 || true
  kubectl get events -n "$ns" --sort-by=.lastTimestamp 2>/dev/null | tail -n 15 >&2 || true
  kubectl logs -n anneal-system deployment/anneal-operator --tail 20 >&2 || true
}
trap 'rc=$?; if ((rc)); then echo "e2e/demo.sh failed (stage: ${stage_name:-?}); logs in $work" >&2; fi' EXIT
# Prints PATH of OBJECT now and again at each change of the object (kubectl get --watch), for up to
# TIMEOUT seconds; a watch the API server closes (it ends watches after a while) is opened again.
watch_jsonpath() {
  local deadline=$((SECONDS + $1)) object="$2" path="$3"
  while ((SECONDS < deadline)); do
    timeout "$((deadline - SECONDS))" kubectl get -n "$ns" "$object" --watch -o jsonpath="$path{\"\\n\"}" \
      2>/dev/null && continue
    # kubectl fails at once on an object not there yet: wait for it to be created, then watch it. If
    # even that fails (the API server is gone), the wait ends and its caller says what it saw last.
    ((SECONDS < deadline)) || break
    kubectl wait -n "$ns" "$object" --for=create --timeout="$((deadline - SECONDS))s" >/dev/null 2>&1 || break
  done
}

# Opens watch_jsonpath on file descriptor $watch_fd (its process: $watch_pid); close_watch stops it.
open_watch() {
  exec {watch_fd}< <(watch_jsonpath "$@")
  watch_pid=$!
}
close_watch() {
  pkill -TERM -P "$watch_pid" 2>/dev/null || true
  kill "$watch_pid" 2>/dev/null || true
  exec {watch_fd}<&-
}

# wait_jsonpath WHAT TIMEOUT OBJECT PATH VALUE...: waits until PATH of OBJECT is VALUE (the last argument; the values before it end the wait as a
# failure), or TIMEOUT seconds pass; it follows the object with a watch, so it sees each change at once.
wait_jsonpath() {
  local what="$1" timeout="$2" object="$3" path="$4" value="" seen=""
  shift 4
  local want="${*: -1}"
  open_watch "$timeout" "$object" "$path"
  while IFS= read -r -u "$watch_fd" value; do
    seen="$value"
    if [[ "$value" == "$want" ]]; then
      close_watch
      return 0
    fi
    if [[ -n "$value" ]] && printf '%s\n' "${@:1:$#-1}" | grep -qxF -- "$value"; then
      close_watch
      echo "$what: $object is $value" >&2
      diagnose
      exit 1
    fi
  done
  close_watch
  echo "$what: $object not $want after ${timeout}s (${seen:-nothing yet})" >&2
  diagnose
  exit 1
}

stage "build: anneal, the pinned cluster tools, the images"
# Cargo's dev profile, as e2e/test-all.sh builds: it optimises the runtime and every dependency (Cargo.toml), and
# the test command after the demo reuses this build.
step cargo "cargo build (anneal-operator, anneal-runtime)" cargo build -p anneal-operator -p anneal-runtime
step tools "Kubernetes tools (built once from Go modules, ~20 min)" e2e/cluster/build-tools.sh
step node-tools "kubelet, kube-proxy (built once, ~2 min)" e2e/cluster/build-tools.sh node
step images "images (images/build.sh; unchanged ones are kept)" \
  images/build.sh pause anneal-operator anneal-runtime anneal-runtime-gpufault

stage "cluster: control plane and two real nodes (containerd + kubelet)"
step nodes "e2e/cluster/nodes-up.sh" env ANNEAL_SKIP_IMAGE_BUILD=1 e2e/cluster/nodes-up.sh
# shellcheck source=e2e/cluster/env.sh
source e2e/cluster/env.sh
kubectl get nodes -L nvidia.com/gpu.product -L nvidia.com/gpu.count

stage "operator: helm upgrade --install anneal charts/anneal (in-cluster)"
kubectl create namespace anneal-system --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl label namespace anneal-system pod-security.kubernetes.io/enforce=restricted --overwrite >/dev/null
# --take-ownership: a cluster where an operator of an older chart ran has the leader Lease that operator made;
# the chart owns it now.
step helm "helm upgrade --install --wait" helm upgrade --install anneal charts/anneal -n anneal-system \
  --take-ownership --wait --timeout 240s
kubectl get pods -n anneal-system -o wide

stage "pipeline: kubectl apply -f manifests/examples/pipeline.yaml"
kubectl create namespace "$ns" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl label namespace "$ns" pod-security.kubernetes.io/enforce=restricted --overwrite >/dev/null
# A run before this one left its pipeline behind: start from a fresh one, on an empty volume.
kubectl delete -n "$ns" -f manifests/examples/pipeline.yaml --ignore-not-found --wait=true >/dev/null
kubectl wait -n "$ns" pods --all --for=delete --timeout=120s >/dev/null
# The local cluster has no storage provisioner: a hostPath volume every real node mounts, bound to the claim
# (a real cluster provisions one from its default StorageClass).
volume="$(e2e/cluster/volume.sh "$ns" anneal-models 2>"$work/volume.log")"
find "$volume" -mindepth 1 -delete
kubectl apply -n "$ns" -f manifests/examples/models-pvc.yaml >/dev/null
kubectl wait -n "$ns" pvc/anneal-models --for=jsonpath='{.status.phase}'=Bound --timeout=60s >/dev/null
kubectl apply -n "$ns" -f manifests/examples/pipeline.yaml

stage "train: TrainingJob arith"
wait_jsonpath "training" 180 trainingjob/arith '{.status.phase}' Failed Running
kubectl wait -n "$ns" pods -l anneal.dev/trainingjob=arith --for=jsonpath='{.status.phase}'=Running --timeout=120s \
  >/dev/null 2>&1 || true
kubectl get pods -n "$ns" -l anneal.dev/trainingjob=arith -o wide
# Progress, from status.progress (the worker reports it): a bar on a terminal, a JSON line per tenth otherwise.
train_begin=$SECONDS
printed=-1
last_line=$SECONDS
# Each status write (the worker's progress reports) comes through the watch as a line.
open_watch 1800 trainingjob/arith \
  '{.status.phase}|{.status.progress.step}|{.status.progress.totalSteps}|{.status.progress.loss}|{.status.progress.tokensPerSecond}'
phase=""
while IFS='|' read -r -u "$watch_fd" phase step total loss tps; do
  step="${step:-0}" total="${total:-0}" loss="${loss:-}" tps="${tps:-}"
  [[ "$step" =~ ^[0-9]+$ ]] || step=0
  [[ "$total" =~ ^[0-9]+$ ]] || total=0
  elapsed=$((SECONDS - train_begin))
  if ((tty)); then
    width=30 filled=0
    ((total == 0)) || filled=$((step * width / total))
    printf '\r  [%-*s] %5s/%-5s loss %-8s %8s tok/s %4ss ' "$width" "$(printf '%*s' "$filled" '' | tr ' ' '#')" \
      "$step" "$total" "$(printf '%.4f' "${loss:-0}")" "$(printf '%.0f' "${tps:-0}")" "$elapsed"
  else
    tenth=-1
    ((total == 0)) || tenth=$((step * 10 / total))
    if ((tenth > printed || SECONDS - last_line >= 60)) || [[ "$phase" != Running ]]; then
      printf '{"stage":"train","phase":"%s","step":%s,"totalSteps":%s,"loss":%s,"tokensPerSecond":%s,"seconds":%s}\n' \
        "${phase:-?}" "$step" "$total" "$(if [[ -n "$loss" ]]; then printf '%.4f' "$loss"; else echo null; fi)" \
        "$(printf '%.0f' "${tps:-0}")" "$elapsed"
      ((tenth <= printed)) || printed=$tenth
      last_line=$SECONDS
    fi
  fi
  case "$phase" in
    Succeeded) break ;;
    Failed)
      close_watch
      ((tty)) && echo
      echo "the TrainingJob failed" >&2
      diagnose
      exit 1
      ;;
  esac
done
close_watch
if [[ "$phase" != Succeeded ]]; then
  ((tty)) && echo
  echo "the TrainingJob is still ${phase:-?} after 1800 s" >&2
  diagnose
  exit 1
fi
((tty)) && echo
kubectl get -n "$ns" trainingjob/arith -o jsonpath='  artifact {.status.artifact.uri} sha256:{.status.artifact.sha256}{"\n"}'

stage "gate: EvalGate arith evaluates the artifact"
wait_jsonpath "evaluation" 600 evalgate/arith '{.status.conditions[?(@.type=="Evaluated")].status}' True
kubectl get -n "$ns" pods -l anneal.dev/evalgate=arith \
  -o jsonpath='{range .items[*]}  eval pod {.metadata.name} on {.spec.nodeName}{"\n"}{end}' 2>/dev/null || true
gate_phase="$(kubectl get -n "$ns" evalgate/arith -o jsonpath='{.status.phase}')"
echo "  verdict: $gate_phase"
[[ "$gate_phase" == Passed ]] || { diagnose; exit 1; }
wait_jsonpath "promotion" 60 evalgate/arith '{.status.conditions[?(@.type=="Promoted")].status}' True

stage "serve: ModelServer arith rolls out the promoted model"
wait_jsonpath "serving" 300 modelserver/arith '{.status.phase}' Failed Ready
kubectl get pods -n "$ns" -l anneal.dev/modelserver=arith -o wide

# kube-proxy's rules send the Service's cluster IP to the server pod, from pods and from this machine alike.
stage "answer: completions through the Service"
ip="$(kubectl get -n "$ns" service/arith -o jsonpath='{.spec.clusterIP}')"
answers=()
for sum in 12+35 40+2 23+19; do
  reply="$(curl -sS --max-time 30 "http://$ip/v1/completions" -H 'content-type: application/json' \
    -d "{\"model\": \"arith\", \"prompt\": \"$sum=\", \"max_tokens\": 4, \"temperature\": 0, \"stop\": [\"\\n\"]}")" ||
    { echo "no answer from http://$ip" >&2; diagnose; exit 1; }
  text="$(python3 -c 'import json, sys; print(json.load(sys.stdin)["choices"][0]["text"].strip())' <<<"$reply" 2>/dev/null)" ||
    { echo "unexpected answer: $reply" >&2; exit 1; }
  answers+=("$sum=$text")
  echo "  POST http://$ip/v1/completions {\"prompt\": \"$sum=\"} -> \"$text\" (right: $((sum)))"
done
end_stage

printf '\n== done in %s s: the pipeline trained, gated and served in real containers on real nodes\n\n' "$(since "$demo_begin")"
kubectl get anneal -n "$ns"
echo
echo "gate metrics (EvalGate arith, round $(kubectl get -n "$ns" evalgate/arith -o jsonpath='{.status.round}')):"
kubectl get -n "$ns" evalgate/arith -o json | python3 -c '
import json, sys
rows = [("metric", "value", "min", "max", "passed")]
for r in json.load(sys.stdin)["status"].get("results", []):
    bound = lambda k: "-" if r.get(k) is None else "%g" % r[k]
    value = "-" if r.get("value") is None else "%.4f" % r["value"]
    rows.append((r["metric"], value, bound("min"), bound("max"), str(r.get("passed")).lower()))
for row in rows:
    print("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, (20, 8, 6, 6, 6))).rstrip())
'
echo
echo "answers: ${answers[*]}"
echo
echo "time per stage:"
for entry in "${stages[@]}"; do printf '  %-66s %7s s\n' "${entry%|*}" "${entry#*|}"; done
printf '  %-66s %7s s\n' "demo in all" "$(since "$demo_begin")"
echo
echo "The cluster is still up: source e2e/cluster/env.sh; kubectl get anneal -n $ns (e2e/cluster/down.sh stops it)."
