#!/usr/bin/env bash
# A PersistentVolume for claim NAMESPACE/CLAIM on the real nodes: a directory under <state dir>/volumes that
# every node can mount (they all run on this machine), as a hostPath volume bound in advance to that claim
# (no StorageClass, no provisioner: a claim of the default class, like manifests/examples/models-pvc.yaml,
# binds to it). Pods run as the non-root user 65532 and hostPath volumes get no fsGroup, so the directory is
# writable by everyone. Idempotent; prints the directory.
#
#   e2e/cluster/volume.sh NAMESPACE CLAIM [SIZE]        (SIZE default 20Gi)
#   e2e/cluster/volume.sh --delete NAMESPACE CLAIM      the volume and its directory
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=nodes-lib.sh
source "$CLUSTER_DIR/nodes-lib.sh"

delete=0
if [[ "${1:-}" == --delete ]]; then
  delete=1
  shift
fi
[[ $# -ge 2 ]] || die "usage: volume.sh [--delete] NAMESPACE CLAIM [SIZE]"
namespace="$1" claim="$2" size="${3:-20Gi}"
name="$claim-$namespace"
dir="$VOLUMES_DIR/$namespace/$claim"

if ((delete)); then
  kubectl_ delete persistentvolume "$name" --ignore-not-found --wait=false >&2
  rm -rf --one-file-system "$dir"
  rmdir "$(dirname "$dir")" 2>/dev/null || true
  exit 0
fi

mkdir -p "$dir"
chmod 0777 "$dir"
kubectl_ apply -f - >&2 <<YAML
apiVersion: v1
kind: PersistentVolume
metadata:
  name: $name
  labels: {anneal.dev/volume: real-nodes}
spec:
  capacity: {storage: $size}
  accessModes: [ReadWriteMany, ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: ""
  hostPath: {path: $dir, type: Directory}
  claimRef: {namespace: $namespace, name: $claim}
YAML
echo "$dir"
