#!/usr/bin/env bash
# Brings the local test cluster up (or checks that it is up): etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler and kwok on loopback, with the simulated GPU and CPU nodes of kwok/nodes.yaml.
# Idempotent. Waits for /readyz and for every node to be Ready; prints the kubeconfig path on stdout.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# The pid of each component this up.sh starts. Each is a child of this shell, so whether it still runs is known
# for certain (an unreaped child's pid cannot be recycled), and `wait` gives the exit status of one that stopped.
declare -A STARTED=()

# start NAME ARGS...: runs tools/bin/NAME detached (own session, so a Ctrl-C of the caller does not reach it),
# logging to logs/NAME.log and recording its pid for down.sh. Refuses when something already listens on the
# component's port (the tool would fail to bind); returns once the process runs the tool.
start() {
  local name="$1" holders pid
  shift
  # shellcheck disable=SC2046 # one argument per port
  holders="$(port_holders $(component_ports "$name"))"
  [[ -z "$holders" ]] || die "cannot start $name: $holders"
  log "starting $name (log: $LOG_DIR/$name.log)"
  # fd 9 is the cluster lock: components must not keep it open after up.sh exits.
  setsid "$TOOLS_BIN/$name" "$@" >"$LOG_DIR/$name.log" 2>&1 </dev/null 9>&- &
  pid=$!
  STARTED[$name]=$pid
  echo "$pid" >"$PID_DIR/$name.pid"
  # The pid runs the forked shell, then setsid, then the tool. Right after the exec /proc/PID/exe already names
  # the tool while /proc/PID/cmdline is still empty (the kernel switches the executable before it lays out the
  # new argv; up to 19 ms for kube-apiserver read back from disk, README.md), so waiting for the executable
  # alone is not enough: wait until the process is recognisably ours, as down.sh will recognise it.
  wait_until "$name to exec" 30 execed "$name" ||
    die "$name (pid $pid) has not exec'ed $TOOLS_BIN/$name after 30s; it runs $(readlink "/proc/$pid/exe" || true)"
}

# execed NAME: the component's process runs its tool with its command line in place, or has exited already.
execed() { is_cluster_process "${STARTED[$1]}" || exited "${STARTED[$1]}"; }

# alive NAME: the component is running. If it is not, says why: for one this up.sh started, its exit status (or
# the signal that ended it), whether something else holds its port, and the end of its log (or that it is empty).
alive() {
  local name="$1" pid="${STARTED[$1]:-}" status=0 why
  if [[ -z "$pid" ]]; then
    # Started by an earlier up.sh: only its pid file and /proc tell.
    [[ -n "$(component_pid "$name")" ]] && return 0
    why="not running (pid file $PID_DIR/$name.pid)"
  else
    exited "$pid" || return 0
    wait "$pid" || status=$?
    why="exited with status $status"
    ((status <= 128)) || why+=" (killed by SIG$(kill -l "$status" 2>/dev/null || echo '?'))"
  fi
  log "$name $why"
  # shellcheck disable=SC2046 # one argument per port
  port_holders $(component_ports "$name") | while read -r line; do log "$line"; done
  if [[ -s "$LOG_DIR/$name.log" ]]; then
    log "last lines of $LOG_DIR/$name.log:"
    tail -n 20 "$LOG_DIR/$name.log" >&2 || true
  else
    log "$LOG_DIR/$name.log is empty: it stopped before writing anything"
  fi
  return 1
}

etcd_healthy() { curl -fsS "http://127.0.0.1:$ETCD_PORT/health" | grep -q '"health":"true"'; }

apiserver_ready() {
  curl -fsS --cacert "$PKI_DIR/ca.crt" --cert "$PKI_DIR/admin.crt" --key "$PKI_DIR/admin.key" \
    "$APISERVER_URL/readyz" | grep -qx ok
}

kwok_healthy() { curl -fsS "http://127.0.0.1:$KWOK_PORT/healthz" >/dev/null; }

# Pods can be created in a namespace only once its default ServiceAccount exists.
default_service_account() { kubectl_ get serviceaccount default --namespace default; }

all_running() {
  local c
  for c in "${COMPONENTS[@]}"; do [[ -n "$(component_pid "$c")" ]] || return 1; done
}

# wait_for NAME TIMEOUT CHECK: like wait_until, but fails fast with the log when the component dies.
wait_for() {
  local name="$1" timeout="$2" check="$3" deadline=$((SECONDS + $2))
  until "$check" >/dev/null 2>&1; do
    alive "$name" || die "$name exited during start-up"
    ((SECONDS < deadline)) || die "timed out after ${timeout}s waiting for $name ($check); see $LOG_DIR/$name.log"
    sleep 0.2
  done
}

start_etcd() {
  rm -rf "$CLUSTER_STATE/etcd"
  # A throw-away single-member etcd: no fsync (the data dies with the cluster), plain HTTP on loopback only.
  start etcd --name anneal --data-dir "$CLUSTER_STATE/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "anneal=http://127.0.0.1:$ETCD_PEER_PORT" \
    --unsafe-no-fsync --log-level warn
  wait_for etcd 30 etcd_healthy
}

start_apiserver() {
  local bind=127.0.0.1 authorization=(--authorization-mode RBAC)
  if ((REAL_NODES)); then
    # Pods reach it through the `kubernetes` Service at the advertised address; it reaches kubelets (logs, exec,
    # port-forward) at their InternalIP (their names resolve nowhere) as a client they authorize.
    bind=0.0.0.0
    # shellcheck disable=SC2054 # Node,RBAC is one argument
    authorization=(--authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction
      --kubelet-client-certificate "$PKI_DIR/kube-apiserver-kubelet-client.crt"
      --kubelet-client-key "$PKI_DIR/kube-apiserver-kubelet-client.key"
      --kubelet-preferred-address-types InternalIP)
  fi
  start kube-apiserver --bind-address "$bind" --advertise-address "$APISERVER_ADVERTISE_ADDRESS" \
    --secure-port "$APISERVER_PORT" \
    --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --tls-cert-file "$PKI_DIR/kube-apiserver.crt" --tls-private-key-file "$PKI_DIR/kube-apiserver.key" \
    --client-ca-file "$PKI_DIR/ca.crt" \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$PKI_DIR/sa.pub" --service-account-signing-key-file "$PKI_DIR/sa.key" \
    --service-cluster-ip-range 10.96.0.0/16 \
    "${authorization[@]}" --allow-privileged=true --profiling=false
  wait_for kube-apiserver 60 apiserver_ready
}

# Tuned for a test cluster (see README.md): a node whose lease stops being renewed is marked Unknown after
# 10 s instead of 50 s, so failover tests see a dead node the way production does, only sooner. The stock
# profile leaves kube-controller-manager's node monitoring and API rate limits at their defaults.
start_controllers() {
  local tuning=(--node-monitor-period 1s --node-monitor-grace-period 10s --kube-api-qps 100 --kube-api-burst 200)
  local lease_seconds=10
  if [[ "$CLUSTER_PROFILE" == stock ]]; then
    tuning=()
    lease_seconds=40
  fi
  start kube-controller-manager --kubeconfig "$PKI_DIR/kube-controller-manager.kubeconfig" \
    --authentication-kubeconfig "$PKI_DIR/kube-controller-manager.kubeconfig" \
    --authorization-kubeconfig "$PKI_DIR/kube-controller-manager.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$CONTROLLER_MANAGER_PORT" --leader-elect=false \
    --cluster-signing-cert-file "$PKI_DIR/ca.crt" --cluster-signing-key-file "$PKI_DIR/ca.key" \
    --root-ca-file "$PKI_DIR/ca.crt" --service-account-private-key-file "$PKI_DIR/sa.key" \
    --use-service-account-credentials=true --service-cluster-ip-range 10.96.0.0/16 \
    "${tuning[@]}" --profiling=false
  start kube-scheduler --kubeconfig "$PKI_DIR/kube-scheduler.kubeconfig" \
    --authentication-kubeconfig "$PKI_DIR/kube-scheduler.kubeconfig" \
    --authorization-kubeconfig "$PKI_DIR/kube-scheduler.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$SCHEDULER_PORT" --leader-elect=false --profiling=false
  # Leases last 10 s and are renewed every 2.5 s (kwok renews at a quarter of the duration, like a kubelet);
  # stock: 40 s, renewed every 10 s.
  start kwok --kubeconfig "$PKI_DIR/kwok.kubeconfig" \
    --manage-all-nodes=false \
    --manage-nodes-with-label-selector "$KWOK_MANAGED_LABEL_KEY=$KWOK_MANAGED_LABEL_VALUE" \
    --node-lease-duration-seconds "$lease_seconds" --server-address "127.0.0.1:$KWOK_PORT" --v WARN \
    --config "$CLUSTER_DIR/kwok/node-stages.yaml" --config "$CLUSTER_DIR/kwok/pod-stages.yaml"
  wait_for kwok 30 kwok_healthy
}

nodes_ready() {
  kubectl_ wait node --all --for condition=Ready --timeout 60s >&2 && return 0
  grep '"level":"ERROR"' "$LOG_DIR/kwok.log" | tail -n 3 >&2 || true
  die "nodes not Ready; see $LOG_DIR/kwok.log and $LOG_DIR/kube-controller-manager.log"
}

main() {
  local begin=$SECONDS
  [[ -x "$TOOLS_BIN/kube-apiserver" ]] || "$CLUSTER_DIR/build-tools.sh" >/dev/null
  [[ -x "$TOOLS_BIN/kube-apiserver" ]] || die "tools missing in $TOOLS_BIN after build-tools.sh"
  lock "$CLUSTER_STATE/.lock"

  if all_running && apiserver_ready && [[ "$(running_profile)" == "$CLUSTER_PROFILE" ]] &&
    [[ "$(running_advertise_address)" == "$APISERVER_ADVERTISE_ADDRESS" ]]; then
    log "cluster already running ($APISERVER_URL, profile $CLUSTER_PROFILE)"
  else
    [[ "$(running_profile)" == "$CLUSTER_PROFILE" ]] || ! all_running ||
      log "the running cluster has profile $(running_profile); starting it again with $CLUSTER_PROFILE"
    [[ "$(running_advertise_address)" == "$APISERVER_ADVERTISE_ADDRESS" ]] || ! all_running ||
      log "the running API server advertises $(running_advertise_address); starting it again for $APISERVER_ADVERTISE_ADDRESS"
    # Whatever is left of an earlier cluster (a crash, a half-finished up) goes first.
    "$CLUSTER_DIR/down.sh"
    mkdir -p "$LOG_DIR" "$PID_DIR"
    echo "$CLUSTER_PROFILE" >"$CLUSTER_STATE/profile"
    echo "$APISERVER_ADVERTISE_ADDRESS" >"$CLUSTER_STATE/apiserver-address"
    "$CLUSTER_DIR/pki.sh"
    start_etcd
    start_apiserver
    start_controllers
  fi
  # With real nodes (nodes-up.sh) the simulated ones stay out: a GPU pod must run where it runs for real.
  if ((!REAL_NODES)); then
    kubectl_ apply -f "$CLUSTER_DIR/kwok/nodes.yaml" >&2
    nodes_ready
  fi
  wait_for kube-controller-manager 30 default_service_account
  log "cluster up in $((SECONDS - begin))s; kubeconfig: $KUBECONFIG_PATH"
  log "use it with: source $CLUSTER_DIR/env.sh"
  echo "$KUBECONFIG_PATH"
}

main "$@"
