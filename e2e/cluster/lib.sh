# Shared helpers for the e2e/cluster scripts. Source it; it defines functions and variables only.
# shellcheck shell=bash
# shellcheck disable=SC2034 # the variables are for the scripts that source this file

CLUSTER_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$CLUSTER_DIR/versions.env"

export PATH="/usr/local/go/bin:$PATH"
# Never fetch another Go toolchain: the machine's Go builds every tool.
export GOTOOLCHAIN=local GOFLAGS="${GOFLAGS:--buildvcs=false}"
ANNEAL_CACHE="${ANNEAL_CACHE:-$HOME/.cache/anneal}"

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# The binaries that build-tools.sh produces, and the Go package each comes from.
TOOL_PACKAGES=(
  "kubernetes kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver"
  "kubernetes kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager"
  "kubernetes kube-scheduler k8s.io/kubernetes/cmd/kube-scheduler"
  "kubernetes kubectl k8s.io/kubernetes/cmd/kubectl"
  "etcd etcd go.etcd.io/etcd/server/v3"
  "kwok kwok sigs.k8s.io/kwok/cmd/kwok"
  "kwok kwokctl sigs.k8s.io/kwok/cmd/kwokctl"
  "helm helm helm.sh/helm/v3/cmd/helm"
)

# The node tier's binaries (real nodes: nodes-up.sh), built only when asked (`build-tools.sh node`), from a
# module of their own (tools/node): the kubelet's packages need go.sum entries the control plane's do not, and
# the control-plane tools must not be rebuilt because of them.
NODE_TOOL_PACKAGES=(
  "node kubelet k8s.io/kubernetes/cmd/kubelet"
  "node kube-proxy k8s.io/kubernetes/cmd/kube-proxy"
)

GO_BUILD_FLAGS=(-mod=readonly -trimpath)

# ldflags GROUP: strip symbols, and stamp the version the upstream release builds stamp. Without it the API
# server reports v0.0.0-master, which breaks version checks (helm's kubeVersion constraints, kubectl skew).
ldflags() {
  local flags="-s -w" minor pkg
  case "$1" in
    kubernetes | node)
      local version="$KUBERNETES_VERSION"
      [[ "$1" == kubernetes ]] || version="$KUBELET_VERSION"
      minor="${version#v1.}"
      minor="${minor%%.*}"
      for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        flags+=" -X $pkg.gitVersion=$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
        flags+=" -X $pkg.gitTreeState=clean"
      done
      ;;
    kwok)
      flags+=" -X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION"
      flags+=" -X sigs.k8s.io/kwok/pkg/consts.KubeVersion=$KUBERNETES_VERSION"
      ;;
    helm)
      minor="${KUBERNETES_STAGING_VERSION#v0.}"
      minor="${minor%%.*}"
      flags+=" -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
      flags+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
      for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
        flags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$minor"
      done
      ;;
    etcd) ;; # etcd's version is a constant in its source.
  esac
  echo "$flags"
}

# The tools directory is keyed by everything that goes into the binaries: the pinned versions, the go.sum files,
# the build flags and the Go version. A change of any of them builds into a fresh directory; an unchanged pin
# reuses the old one. `tools_key GROUP...` hashes those groups' go.sum files (the default: the control plane's).
tools_key() {
  local go_version group groups=("$@") flag_groups=("$@") prefix="k8s"
  # go.sum files in the order of the glob this once was; ldflags in the order of TOOL_PACKAGES (same key).
  ((${#groups[@]})) || { groups=(etcd helm kubernetes kwok); flag_groups=(kubernetes etcd kwok helm); }
  [[ "${groups[*]}" != node ]] || prefix="node"
  go_version="$(go env GOVERSION)"
  {
    grep -E '^[A-Z_]+=' "$CLUSTER_DIR/versions.env"
    for group in "${groups[@]}"; do cat "$CLUSTER_DIR/tools/$group/go.sum"; done
    echo "${GO_BUILD_FLAGS[*]}"
    for group in "${flag_groups[@]}"; do ldflags "$group"; done
    echo "$go_version"
  } | sha256sum | cut -c1-12 | sed "s/^/$prefix-${KUBERNETES_VERSION}-/"
}

TOOLS_DIR="${ANNEAL_TOOLS_DIR:-$ANNEAL_CACHE/tools/$(tools_key)}"
TOOLS_BIN="${ANNEAL_TOOLS_BIN:-$TOOLS_DIR/bin}"
# kubelet and kube-proxy (the node tier), in a directory keyed by their own module.
NODE_TOOLS_DIR="${ANNEAL_NODE_TOOLS_DIR:-$ANNEAL_CACHE/tools/$( [[ -f "$CLUSTER_DIR/tools/node/go.sum" ]] && tools_key node || echo node-unpinned)}"
NODE_TOOLS_BIN="$NODE_TOOLS_DIR/bin"

# Where a running cluster keeps its state. Everything a component reads or writes is under CLUSTER_STATE,
# so `pgrep -f "$CLUSTER_STATE/"` finds exactly this cluster's processes.
CLUSTER_STATE="${ANNEAL_CLUSTER_DIR:-$ANNEAL_CACHE/cluster}"
KUBECONFIG_PATH="${ANNEAL_KUBECONFIG:-$CLUSTER_STATE/kubeconfig}"
PKI_DIR="$CLUSTER_STATE/pki"
LOG_DIR="$CLUSTER_STATE/logs"
PID_DIR="$CLUSTER_STATE/pids"

# Loopback ports, overridable so two clusters can run side by side. The defaults stay clear of the
# well-known Kubernetes ports in case something else on the machine uses them.
ETCD_PORT="${ANNEAL_ETCD_PORT:-12379}"
ETCD_PEER_PORT="${ANNEAL_ETCD_PEER_PORT:-12380}"
APISERVER_PORT="${ANNEAL_APISERVER_PORT:-16443}"
CONTROLLER_MANAGER_PORT="${ANNEAL_CONTROLLER_MANAGER_PORT:-16257}"
SCHEDULER_PORT="${ANNEAL_SCHEDULER_PORT:-16259}"
KWOK_PORT="${ANNEAL_KWOK_PORT:-16247}"
APISERVER_URL="https://127.0.0.1:$APISERVER_PORT"

# How the control plane judges node liveness (README.md, "Profiles"): `test` (the default) marks a node whose
# Lease stops NotReady after 10 s and has kwok renew Leases every 2.5 s; `stock` keeps kube-controller-manager's
# defaults (grace period 50 s) and renews every 10 s with a 40 s Lease, as a stock kubelet does.
CLUSTER_PROFILE="${ANNEAL_CLUSTER_PROFILE:-test}"
case "$CLUSTER_PROFILE" in
  test | stock) ;;
  *) die "ANNEAL_CLUSTER_PROFILE=$CLUSTER_PROFILE: expected test or stock" ;;
esac
# The profile the running cluster was started with (written by up.sh; a cluster started before profiles
# existed ran the test profile).
running_profile() { cat "$CLUSTER_STATE/profile" 2>/dev/null || echo test; }

# Real nodes (nodes-up.sh exports ANNEAL_REAL_NODES=1): the API server must be reachable from pods, so it
# listens on every address and advertises this machine's primary IPv4 address (the `kubernetes` Service's
# endpoint, which kube-proxy sends pods to), authorizes kubelets with the Node authorizer, and the simulated
# nodes of kwok/nodes.yaml are left out (a GPU pod must not land on a kwok node). The default stays loopback.
REAL_NODES="${ANNEAL_REAL_NODES:-0}"
case "$REAL_NODES" in
  0 | 1) ;;
  *) die "ANNEAL_REAL_NODES=$REAL_NODES: expected 0 or 1" ;;
esac
# host_address: the source address of this machine's default route (else its first global IPv4 address).
host_address() {
  local address
  address="$(ip -4 route get 1.1.1.1 2>/dev/null | sed -n 's/.* src \([0-9.]*\).*/\1/p')"
  [[ -n "$address" ]] || address="$(ip -4 -o addr show scope global 2>/dev/null | awk '{sub("/.*", "", $4); print $4; exit}')"
  [[ -n "$address" ]] || die "no IPv4 address on this machine for pods to reach the API server at"
  echo "$address"
}
APISERVER_ADVERTISE_ADDRESS=127.0.0.1
if ((REAL_NODES)); then APISERVER_ADVERTISE_ADDRESS="$(host_address)"; fi
# The address the running cluster's API server advertises (written by up.sh; 127.0.0.1 before real nodes).
running_advertise_address() { cat "$CLUSTER_STATE/apiserver-address" 2>/dev/null || echo 127.0.0.1; }

# Components in start order; down.sh stops them in reverse.
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok)

# component_ports NAME: the loopback ports the component listens on.
component_ports() {
  case "$1" in
    etcd) echo "$ETCD_PORT $ETCD_PEER_PORT" ;;
    kube-apiserver) echo "$APISERVER_PORT" ;;
    kube-controller-manager) echo "$CONTROLLER_MANAGER_PORT" ;;
    kube-scheduler) echo "$SCHEDULER_PORT" ;;
    kwok) echo "$KWOK_PORT" ;;
  esac
}

# port_holders PORT...: a line for each port someone listens on (naming the process when `ss` can); nothing
# when all are free.
port_holders() {
  local port
  for port in "$@"; do
    # /proc/net/tcp{,6}: local_address is ADDR:PORT in hex, state (st) 0A is LISTEN.
    awk -v port="$(printf ':%04X' "$port")" 'FNR > 1 && $4 == "0A" && substr($2, length($2) - 4) == port {
      found = 1 } END { exit !found }' /proc/net/tcp /proc/net/tcp6 2>/dev/null || continue
    if command -v ss >/dev/null; then
      ss -Htlnp "sport = :$port" | sed "s/^/port $port in use: /"
    else
      echo "port $port in use (by a process that only \`ss -tlnp\` would name)"
    fi
  done
}

# The label kwok selects the nodes it simulates by. Removing it is how fault.sh kills a node.
KWOK_MANAGED_LABEL_KEY="kwok.x-k8s.io/node"
KWOK_MANAGED_LABEL_VALUE="fake"

# /proc/PID/exe names the binary with symlinks resolved: the tools directories as it would name them.
TOOLS_PREFIXES=("$ANNEAL_CACHE/tools/" "$TOOLS_DIR/" "$(realpath -m "$ANNEAL_CACHE/tools")/" "$(realpath -m "$TOOLS_DIR")/")

# is_cluster_process PID: PID runs one of our built tools with this cluster's state dir on its command line
# (a recycled pid, a zombie or someone's `tail -f` of a log do not count). Right after an exec the binary is
# already the tool's while the command line is still empty (see `start` in up.sh): that does not count either.
is_cluster_process() {
  local exe cmdline prefix
  exe="$(readlink "/proc/$1/exe" 2>/dev/null)" || return 1
  for prefix in "${TOOLS_PREFIXES[@]}"; do
    [[ "$exe" == "$prefix"* ]] || continue
    cmdline="$(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null)" || return 1
    [[ "$cmdline" == *"$CLUSTER_STATE/"* ]]
    return
  done
  return 1
}

# exited PID: gone, or a zombie waiting for its parent.
exited() { ! kill -0 "$1" 2>/dev/null || grep -q ') Z ' "/proc/$1/stat" 2>/dev/null; }

# cluster_pids: every running process of this cluster, whether or not its pid file survived.
cluster_pids() {
  local pid
  for pid in $(pgrep -f -- "$CLUSTER_STATE/" || true); do
    if is_cluster_process "$pid"; then echo "$pid"; fi
  done
}

# component_pid NAME: the pid of a running component of this cluster, or nothing.
component_pid() {
  local pid_file="$PID_DIR/$1.pid" pid
  [[ -f "$pid_file" ]] || return 0
  pid="$(<"$pid_file")"
  if is_cluster_process "$pid"; then echo "$pid"; fi
}

# wait_until DESCRIPTION TIMEOUT_S COMMAND...: polls COMMAND every 0.2 s until it succeeds or time is up.
wait_until() {
  local what="$1" timeout="$2" deadline
  shift 2
  deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || { log "timed out after ${timeout}s waiting for $what"; return 1; }
    sleep 0.2
  done
}

kubectl_() { "$TOOLS_BIN/kubectl" --kubeconfig "$KUBECONFIG_PATH" "$@"; }

# lock FILE: holds an exclusive lock on FILE (fd 9) until the calling script exits, so two engineers (or two test
# runs) starting, stopping or building at once take turns. Scripts run by a lock holder inherit the lock.
lock() {
  [[ "${ANNEAL_LOCK_HELD:-}" == "$1" ]] && return 0
  mkdir -p "$(dirname "$1")"
  exec 9>"$1"
  if ! flock -n 9; then
    log "waiting for $1 (another up/down/build is running)"
    flock -w 1800 9 || die "gave up waiting for $1"
  fi
  export ANNEAL_LOCK_HELD="$1"
}
