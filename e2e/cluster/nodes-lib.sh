# Shared helpers of nodes-up.sh and nodes-down.sh (real nodes: containerd + kubelet per node, one kube-proxy,
# one cluster DNS).
# Source it after lib.sh; it defines functions and variables only.
# shellcheck shell=bash
# shellcheck disable=SC2034 # the variables are for the scripts that source this file

# The real nodes: name, nvidia.com/gpu.product (names the operator's config maps to A100 and H100), pool. Node i
# has bridge anneal<i> with pod subnet 10.244.<i>.0/24, kubelet ports NODE_PORT_BASE + 10 i (API) and + 1 (healthz).
REAL_NODE_LIST=(
  "real-a100-0 NVIDIA-A100-SXM4-80GB a100"
  "real-h100-0 NVIDIA-H100-80GB-HBM3 h100"
)
# GPUs each node advertises as the extended resource nvidia.com/gpu (its pods run on the CPU).
REAL_NODE_GPUS="${ANNEAL_REAL_NODE_GPUS:-8}"
NODE_PORT_BASE="${ANNEAL_NODE_PORT_BASE:-10250}"
KUBE_PROXY_HEALTHZ_PORT=$((NODE_PORT_BASE - 2))
KUBE_PROXY_METRICS_PORT=$((NODE_PORT_BASE - 1))
POD_CIDR=10.244.0.0/16
# The cluster DNS (anneal-cluster-dns, e2e/src/bin) listens on this machine's address (every pod reaches it, as
# it reaches the API server there), port 53; the kubelets name it in the pods' resolv.conf.
CLUSTER_DOMAIN=cluster.local
NODES_DIR="$CLUSTER_STATE/nodes"
# Volumes for PersistentVolumes of type hostPath: every node is on this machine, so each can mount each.
VOLUMES_DIR="$CLUSTER_STATE/volumes"
# The cgroup (in every hierarchy) each node's kubelet keeps its pods under, instead of the machine's root.
CGROUP_PARENT=anneal-nodes
# kube-proxy's iptables rules, the bridges and the cgroups belong to the machine, not to a cluster: one cluster
# at a time may have real nodes. This file names it.
NODES_CLAIM=/run/anneal-real-nodes

node_index() {
  local i
  for i in "${!REAL_NODE_LIST[@]}"; do
    [[ "${REAL_NODE_LIST[i]%% *}" != "$1" ]] || { echo "$i"; return; }
  done
  die "no real node $1"
}
node_names() { local entry; for entry in "${REAL_NODE_LIST[@]}"; do echo "${entry%% *}"; done; }
node_dir() { echo "$NODES_DIR/$1"; }
node_socket() { echo "$NODES_DIR/$1/containerd.sock"; }
node_bridge() { echo "anneal$(node_index "$1")"; }
node_kubelet_port() { echo $((NODE_PORT_BASE + 10 * $(node_index "$1"))); }

# The processes of a node are recognised as down.sh recognises the control plane's: by executable and by a
# command line naming the node's directory (its configuration, socket or root lives there).
node_process_exe() {
  case "$1" in
    containerd) command -v containerd ;;
    kubelet | kube-proxy) echo "$NODE_TOOLS_BIN/$1" ;;
    cluster-dns) echo "$NODES_DIR/anneal-cluster-dns" ;;
  esac
}

# is_node_process PID COMPONENT DIR
is_node_process() {
  local exe want cmdline
  exe="$(readlink "/proc/$1/exe" 2>/dev/null)" || return 1
  want="$(readlink -f "$(node_process_exe "$2")")"
  [[ "$exe" == "$want" ]] || return 1
  cmdline="$(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null)" || return 1
  [[ "$cmdline" == *"$3/"* ]]
}

# component_pid_of COMPONENT DIR PIDFILE: the pid of that running component, or nothing.
node_component_pid() {
  local pid
  [[ -f "$3" ]] || return 0
  pid="$(<"$3")"
  if is_node_process "$pid" "$1" "$2"; then echo "$pid"; fi
}

# node_pids DIR: every process whose command line names DIR and whose executable is containerd, a containerd
# shim, the kubelet, kube-proxy or the cluster DNS (a shim outlives containerd, as on a partitioned node).
node_pids() {
  local pid exe
  for pid in $(pgrep -f -- "$1/" || true); do
    exe="$(readlink "/proc/$pid/exe" 2>/dev/null)" || continue
    case "$(basename "$exe")" in
      containerd | containerd-shim-runc-v2 | kubelet | kube-proxy | anneal-cluster-dns) echo "$pid" ;;
    esac
  done
}

# cgroup_hierarchies: the mounted cgroup hierarchies (v1 controllers, the named systemd one, the unified one).
cgroup_hierarchies() {
  local dir
  for dir in /sys/fs/cgroup/*/; do
    [[ -f "$dir/cgroup.procs" ]] && echo "${dir%/}"
  done
}

# cgroup_pids NODE: the processes in the node's cgroups (its pods' containers).
cgroup_pids() {
  local h
  for h in $(cgroup_hierarchies); do
    [[ -d "$h/$CGROUP_PARENT/$1" ]] || continue
    find "$h/$CGROUP_PARENT/$1" -name cgroup.procs -exec cat {} + 2>/dev/null
  done | sort -un
}

# mounts_under DIR: the mount points at or below DIR, deepest first.
mounts_under() {
  awk -v dir="$1" '$5 == dir || index($5, dir "/") == 1 { print $5 }' /proc/self/mountinfo | sort -r
}
