#!/usr/bin/env bash
# Brings up real nodes for the local cluster: per node a containerd (Debian) and a kubelet (built from the pinned
# Kubernetes module: build-tools.sh node) with their own directories, sockets and ports, pods on a CNI bridge of
# their own (Debian's containernetworking-plugins), cgroupfs; one kube-proxy (iptables) for Services and one
# cluster DNS (anneal-cluster-dns: Service and gang host names under cluster.local). The nodes
# advertise nvidia.com/gpu and carry the GPU product labels; their pods run on this machine's CPU. The images of
# images/build.sh (pause, operator, runtime) are imported into each node's containerd: no registry is needed.
#
#   e2e/cluster/nodes-up.sh      (idempotent) the control plane with ANNEAL_REAL_NODES=1 (up.sh), then the nodes
#   e2e/cluster/nodes-down.sh    the nodes only; e2e/cluster/down.sh takes them down with the control plane
#
# Needs root (containerd, cgroups, bridges, iptables) and, on a fresh machine, apt (containerd, runc,
# containernetworking-plugins, iptables, podman are installed when missing). One cluster per machine may have
# real nodes (they share iptables and the bridges' addresses); another's are refused, naming it.
# ANNEAL_SKIP_IMAGE_BUILD=1 imports the archives already in ~/.cache/anneal/images instead of building them.
set -euo pipefail
export ANNEAL_REAL_NODES=1
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=nodes-lib.sh
source "$CLUSTER_DIR/nodes-lib.sh"
REPO="$(cd "$CLUSTER_DIR/../.." && pwd)"
IMAGES_DIR="${ANNEAL_IMAGES_DIR:-$ANNEAL_CACHE/images}"
# anneal-runtime-gpufault: a test image (its "GPU" fails on demand) for the node tier's device-fault test.
IMAGES=(pause anneal-operator anneal-runtime anneal-runtime-gpufault)

# Packages from Debian, installed once.
packages() {
  local missing=() pair
  for pair in containerd:containerd runc:runc iptables:iptables conntrack:conntrack podman:podman \
    /usr/lib/cni/bridge:containernetworking-plugins; do
    command -v "${pair%%:*}" >/dev/null || [[ -x "${pair%%:*}" ]] || missing+=("${pair#*:}")
  done
  ((${#missing[@]})) || return 0
  [[ $EUID -eq 0 ]] || die "missing ${missing[*]} (Debian packages); install them as root"
  log "installing ${missing[*]} (apt)"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

claim_machine() {
  local other
  other="$(cat "$NODES_CLAIM" 2>/dev/null || true)"
  if [[ -n "$other" && "$other" != "$CLUSTER_STATE" && -n "$(node_pids "$other/nodes")" ]]; then
    die "the real nodes of $other are up (one cluster per machine has real nodes: they share iptables, bridges and cgroups); take them down with ANNEAL_CLUSTER_DIR=$other e2e/cluster/nodes-down.sh"
  fi
  echo "$CLUSTER_STATE" >"$NODES_CLAIM"
  # What another cluster's scripts need to take these nodes down and bring them back (e2e/test-nodes.sh makes
  # the demo's nodes give way to its own, and brings them back after): this cluster's directory and ports.
  {
    echo "# The settings real nodes of $CLUSTER_STATE came up with (written by nodes-up.sh)."
    local pair var
    for pair in ANNEAL_CLUSTER_DIR=CLUSTER_STATE ANNEAL_KUBECONFIG=KUBECONFIG_PATH ANNEAL_CLUSTER_LOGS=LOG_DIR \
      ANNEAL_ETCD_PORT=ETCD_PORT ANNEAL_ETCD_PEER_PORT=ETCD_PEER_PORT ANNEAL_APISERVER_PORT=APISERVER_PORT \
      ANNEAL_CONTROLLER_MANAGER_PORT=CONTROLLER_MANAGER_PORT ANNEAL_SCHEDULER_PORT=SCHEDULER_PORT \
      ANNEAL_KWOK_PORT=KWOK_PORT ANNEAL_NODE_PORT_BASE=NODE_PORT_BASE ANNEAL_REAL_NODE_GPUS=REAL_NODE_GPUS \
      ANNEAL_CLUSTER_PROFILE=CLUSTER_PROFILE ANNEAL_IMAGES_DIR=IMAGES_DIR; do
      var="${pair#*=}"
      printf 'export %s=%q\n' "${pair%%=*}" "${!var}"
    done
  } >"$CLUSTER_STATE/real-nodes.env"
}

host_setup() {
  # Pods of one node reach pods of the other across the two bridges, through this machine.
  sysctl -qw net.ipv4.ip_forward=1
  # Service traffic between pods of one bridge must pass iptables (kube-proxy's DNAT).
  [[ -e /proc/sys/net/bridge/bridge-nf-call-iptables ]] || modprobe br_netfilter ||
    die "no br_netfilter: pods cannot reach Services on their own bridge"
  sysctl -qw net.bridge.bridge-nf-call-iptables=1
  local node h
  for node in $(node_names); do
    for h in $(cgroup_hierarchies); do
      mkdir -p "$h/$CGROUP_PARENT/$node"
      # A new cpuset is empty until told which CPUs and memory nodes it may use.
      if [[ -f "$h/cpuset.cpus" ]]; then
        cat "$h/cpuset.cpus" >"$h/$CGROUP_PARENT/cpuset.cpus"
        cat "$h/cpuset.mems" >"$h/$CGROUP_PARENT/cpuset.mems"
        cat "$h/cpuset.cpus" >"$h/$CGROUP_PARENT/$node/cpuset.cpus"
        cat "$h/cpuset.mems" >"$h/$CGROUP_PARENT/$node/cpuset.mems"
      fi
    done
  done
}

# start_component COMPONENT DIR LOG ARGS...: as up.sh's start, for a node's containerd, kubelet or kube-proxy.
start_component() {
  local component="$1" dir="$2" logfile="$3" pid
  shift 3
  log "starting $component for $(basename "$dir") (log: $logfile)"
  # fd 9 is the cluster lock: components must not keep it open after this script exits.
  setsid "$(node_process_exe "$component")" "$@" >"$logfile" 2>&1 </dev/null 9>&- &
  pid=$!
  echo "$pid" >"$dir/$component.pid"
  wait_until "$component to exec" 30 is_or_exited "$pid" "$component" "$dir" ||
    die "$component (pid $pid) has not exec'ed after 30s"
  exited "$pid" && { tail -n 20 "$logfile" >&2; die "$component exited during start-up; see $logfile"; }
  return 0
}
is_or_exited() { is_node_process "$1" "$2" "$3" || exited "$1"; }

write_containerd_config() {
  local node="$1" dir
  dir="$(node_dir "$node")"
  mkdir -p "$dir/containerd" "$dir/cni/net.d" "$dir/pod-logs" "$dir/kubelet"
  cat >"$dir/containerd.toml" <<TOML
# containerd of real node $node (written by nodes-up.sh). Everything it keeps is under $dir.
version = 2
root = "$dir/containerd/root"
state = "$dir/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]

[grpc]
  address = "$dir/containerd.sock"

[ttrpc]
  address = "$dir/containerd.sock.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "$dir/containerd/opt"

[plugins."io.containerd.grpc.v1.cri"]
  # Built here (images/build.sh) and imported: no registry is reachable.
  sandbox_image = "$(cat "$IMAGES_DIR/pause.ref")"
  # Pod network namespaces under the state directory, so nodes-down.sh finds every mount of the node there.
  netns_mounts_under_state_dir = true
  # This machine gives root no CAP_SYS_RESOURCE: a negative oom_score_adj (the kubelet asks -998 for sandboxes)
  # fails in runc ("can't get final child's PID from pipe"). Clamp to containerd's own score instead.
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$dir/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$dir/cni/net.d"
    max_conf_num = 1
TOML
  local i
  i="$(node_index "$node")"
  cat >"$dir/cni/net.d/10-anneal.conflist" <<JSON
{
  "cniVersion": "1.0.0",
  "name": "anneal-$node",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "anneal$i",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "10.244.$i.0/24"}]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": "$dir/cni/ipam"
      }
    }
  ]
}
JSON
}

write_kubelet_config() {
  local node="$1" dir port lease=10
  dir="$(node_dir "$node")"
  port="$(node_kubelet_port "$node")"
  # The test profile's controller-manager declares a node dead 10 s after its last heartbeat: a 10 s Lease,
  # renewed every 2.5 s (a quarter), as kwok's. Stock: a kubelet's defaults (40 s, renewed every 10 s).
  [[ "$CLUSTER_PROFILE" == test ]] || lease=40
  cat >"$dir/kubelet.yaml" <<YAML
# kubelet of real node $node (written by nodes-up.sh)
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 0.0.0.0
port: $port
healthzBindAddress: 127.0.0.1
healthzPort: $((port + 1))
readOnlyPort: 0
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI_DIR/ca.crt}
authorization: {mode: Webhook}
tlsCertFile: $PKI_DIR/node-$node-serving.crt
tlsPrivateKeyFile: $PKI_DIR/node-$node-serving.key
rotateCertificates: false
serverTLSBootstrap: false
containerRuntimeEndpoint: unix://$dir/containerd.sock
# cgroup v1 on this machine (Kubernetes 1.34 still runs there when told to), no systemd.
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
# Two kubelets on one machine: each keeps its pods' cgroups and logs apart (a kubelet removes the log
# directories of pods it does not know).
cgroupRoot: /$CGROUP_PARENT/$node
podLogsDir: $dir/pod-logs
clusterDomain: $CLUSTER_DOMAIN
# Pods resolve Service and gang host names (<host>.<service>.<namespace>.svc) through anneal-cluster-dns.
clusterDNS: [$APISERVER_ADVERTISE_ADDRESS]
nodeLeaseDurationSeconds: $lease
# The disk of a development machine is often fuller than the defaults allow (10 % / 15 % free): evict only
# when it is really full, and never collect the images imported here (no registry to pull them back from).
evictionHard:
  memory.available: 100Mi
  nodefs.available: 1%
  imagefs.available: 1%
  nodefs.inodesFree: 1%
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
maxPods: 50
serializeImagePulls: false
YAML
}

start_containerd() {
  local node="$1" dir
  dir="$(node_dir "$node")"
  if [[ -n "$(node_component_pid containerd "$dir" "$dir/containerd.pid")" ]]; then return 0; fi
  start_component containerd "$dir" "$LOG_DIR/$node-containerd.log" --config "$dir/containerd.toml"
  wait_until "containerd of $node" 30 ctr --address "$(node_socket "$node")" version ||
    die "containerd of $node does not answer; see $LOG_DIR/$node-containerd.log"
}

# Images imported again under the same reference (a rebuild of the same tag): pods started before still run the
# old one, so the Deployments that run them are restarted once the nodes are up.
REIMPORTED=()

import_images() {
  local node="$1" dir image ref digest sock
  dir="$(node_dir "$node")"
  sock="$(node_socket "$node")"
  mkdir -p "$dir/imported"
  for image in "${IMAGES[@]}"; do
    ref="$(cat "$IMAGES_DIR/$image.ref")"
    digest="$(cat "$IMAGES_DIR/$image.digest")"
    if [[ "$(cat "$dir/imported/$image" 2>/dev/null)" == "$digest" ]] &&
      ctr --address "$sock" -n k8s.io images ls -q "name==$ref" | grep -qx "$ref"; then
      continue
    fi
    [[ ! -f "$dir/imported/$image" ]] || REIMPORTED+=("$ref")
    log "importing $ref into $node"
    ctr --address "$sock" -n k8s.io images import "$IMAGES_DIR/$image.oci.tar" >&2
    ctr --address "$sock" -n k8s.io images ls -q "name==$ref" | grep -qx "$ref" ||
      die "$ref is not in $node's containerd after importing $IMAGES_DIR/$image.oci.tar"
    echo "$digest" >"$dir/imported/$image"
  done
}

start_kubelet() {
  local node="$1" product="$2" pool="$3" dir
  dir="$(node_dir "$node")"
  if [[ -n "$(node_component_pid kubelet "$dir" "$dir/kubelet.pid")" ]]; then return 0; fi
  "$CLUSTER_DIR/pki.sh" node "$node" "$APISERVER_ADVERTISE_ADDRESS"
  start_component kubelet "$dir" "$LOG_DIR/$node-kubelet.log" \
    --config "$dir/kubelet.yaml" --kubeconfig "$PKI_DIR/node-$node.kubeconfig" \
    --root-dir "$dir/kubelet" --hostname-override "$node" --node-ip "$APISERVER_ADVERTISE_ADDRESS" \
    --node-labels "anneal.dev/node-tier=real,anneal.dev/pool=$pool,nvidia.com/gpu.product=$product" \
    --v 1
}

start_kube_proxy() {
  local first
  first="$(node_names | head -n1)"
  if [[ -n "$(node_component_pid kube-proxy "$NODES_DIR" "$NODES_DIR/kube-proxy.pid")" ]]; then return 0; fi
  cat >"$NODES_DIR/kube-proxy.yaml" <<YAML
# kube-proxy of the real nodes (written by nodes-up.sh): one for all, as they share this machine's network.
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: $PKI_DIR/kube-proxy.kubeconfig
hostnameOverride: $first
mode: iptables
clusterCIDR: $POD_CIDR
healthzBindAddress: 127.0.0.1:$KUBE_PROXY_HEALTHZ_PORT
metricsBindAddress: 127.0.0.1:$KUBE_PROXY_METRICS_PORT
# Leave the machine's conntrack table size and route_localnet alone.
conntrack:
  maxPerCore: 0
iptables:
  localhostNodePorts: false
YAML
  start_component kube-proxy "$NODES_DIR" "$LOG_DIR/kube-proxy.log" --config "$NODES_DIR/kube-proxy.yaml"
  wait_until "kube-proxy to be healthy" 60 curl -fsS "http://127.0.0.1:$KUBE_PROXY_HEALTHZ_PORT/healthz" ||
    die "kube-proxy is not healthy; see $LOG_DIR/kube-proxy.log"
}

# The cluster DNS: built from this tree (e2e crate) and copied into the nodes' directory, run with kube-proxy's
# identity (which may watch Services and EndpointSlices).
start_cluster_dns() {
  local log="$LOG_DIR/cluster-dns.log"
  if [[ -n "$(node_component_pid cluster-dns "$NODES_DIR" "$NODES_DIR/cluster-dns.pid")" ]]; then return 0; fi
  log "building anneal-cluster-dns (cargo, e2e crate)"
  (cd "$REPO" && CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ANNEAL_CACHE/target}" \
    cargo build -q -p anneal-e2e --bin anneal-cluster-dns >&2)
  install -m 0755 "${CARGO_TARGET_DIR:-$ANNEAL_CACHE/target}/debug/anneal-cluster-dns" "$NODES_DIR/anneal-cluster-dns"
  start_component cluster-dns "$NODES_DIR" "$log" --listen "$APISERVER_ADVERTISE_ADDRESS:53" \
    --kubeconfig "$PKI_DIR/kube-proxy.kubeconfig" --domain "$CLUSTER_DOMAIN" --state "$NODES_DIR/"
  wait_until "the cluster DNS to serve" 60 grep -q "serving" "$log" ||
    die "anneal-cluster-dns is not serving; see $log"
}

gpus_advertised() {
  [[ "$(kubectl_ get node "$1" -o jsonpath='{.status.allocatable.nvidia\.com/gpu}')" == "$REAL_NODE_GPUS" ]]
}

# The GPUs as an extended resource on the node's status (what a device plugin would report); the kubelet keeps
# it in capacity and derives allocatable from it. Labels as NVIDIA's GPU feature discovery sets them.
advertise() {
  local node="$1" product="$2" pool="$3"
  wait_until "node $node to register" 60 kubectl_ get node "$node" ||
    die "node $node did not register; see $LOG_DIR/$node-kubelet.log"
  kubectl_ label node "$node" --overwrite anneal.dev/node-tier=real "anneal.dev/pool=$pool" \
    "nvidia.com/gpu.product=$product" nvidia.com/gpu.present=true "nvidia.com/gpu.count=$REAL_NODE_GPUS" >/dev/null
  gpus_advertised "$node" && return 0
  kubectl_ patch node "$node" --subresource status --type merge \
    -p "{\"status\":{\"capacity\":{\"nvidia.com/gpu\":\"$REAL_NODE_GPUS\"},\"allocatable\":{\"nvidia.com/gpu\":\"$REAL_NODE_GPUS\"}}}" >/dev/null
  wait_until "node $node to advertise $REAL_NODE_GPUS GPUs" 30 gpus_advertised "$node" ||
    die "node $node does not keep nvidia.com/gpu in its status"
}

# restart_reimported: `kubectl rollout restart` of every Deployment whose pods run an image imported again.
restart_reimported() {
  ((${#REIMPORTED[@]})) || return 0
  local ref line
  for ref in $(printf '%s\n' "${REIMPORTED[@]}" | sort -u); do
    kubectl_ get deployments -A -o jsonpath='{range .items[*]}{.metadata.namespace} {.metadata.name} {.spec.template.spec.containers[*].image}{"\n"}{end}' |
      while read -r line; do
        # shellcheck disable=SC2086 # namespace, name, images
        set -- $line
        [[ " ${*:3} " == *" $ref "* ]] || continue
        log "$ref changed: restarting deployment $2 in $1"
        kubectl_ rollout restart deployment "$2" -n "$1" >/dev/null
      done
  done
}

main() {
  local begin=$SECONDS entry node product pool
  [[ $EUID -eq 0 ]] || die "real nodes need root (containerd, cgroups, bridges, iptables)"
  packages
  lock "$CLUSTER_STATE/.lock"
  "$CLUSTER_DIR/up.sh" >/dev/null
  "$CLUSTER_DIR/build-tools.sh" node >/dev/null
  if [[ "${ANNEAL_SKIP_IMAGE_BUILD:-0}" != 1 ]]; then
    "$REPO/images/build.sh" "${IMAGES[@]}" >/dev/null
  fi
  for entry in "${IMAGES[@]}"; do
    [[ -f "$IMAGES_DIR/$entry.oci.tar" ]] || die "no $IMAGES_DIR/$entry.oci.tar; run images/build.sh"
  done
  claim_machine
  mkdir -p "$NODES_DIR" "$VOLUMES_DIR" "$LOG_DIR"
  host_setup
  for entry in "${REAL_NODE_LIST[@]}"; do
    read -r node product pool <<<"$entry"
    write_containerd_config "$node"
    write_kubelet_config "$node"
    start_containerd "$node"
    import_images "$node"
    start_kubelet "$node" "$product" "$pool"
  done
  # After the kubelets: it reads the API as kube-proxy does, whose kubeconfig pki.sh writes with the first
  # node's (a new machine has none before). No pod runs before the nodes are Ready, below.
  start_cluster_dns
  start_kube_proxy
  for entry in "${REAL_NODE_LIST[@]}"; do
    read -r node product pool <<<"$entry"
    advertise "$node" "$product" "$pool"
  done
  # shellcheck disable=SC2046 # one argument per node
  kubectl_ wait --for condition=Ready --timeout 120s $(node_names | sed 's|^|node/|') >&2 ||
    die "real nodes not Ready; see $LOG_DIR/*-kubelet.log"
  restart_reimported
  # The claim the examples write models to, for whoever applies them in the default namespace.
  "$CLUSTER_DIR/volume.sh" default anneal-models >/dev/null
  log "real nodes up in $((SECONDS - begin))s: $(node_names | tr '\n' ' ')"
  echo "$KUBECONFIG_PATH"
}

main "$@"
