#!/usr/bin/env bash
# Renders manifests/install.yaml from the Helm chart (namespace anneal-system, default values), for
# `kubectl apply -f manifests/install.yaml` without Helm. A cluster-tier test fails when the
# committed file differs from what this prints. Needs the pinned helm (e2e/cluster/build-tools.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
helm="${HELM:-$(bash e2e/cluster/paths.sh | sed -n 's/^ANNEAL_TOOLS_BIN=//p')/helm}"
render() {
  echo "# Generated from charts/anneal by manifests/render-install.sh. Do not edit."
  echo "apiVersion: v1"
  echo "kind: Namespace"
  echo "metadata:"
  echo "  name: anneal-system"
  "$helm" template anneal charts/anneal --namespace anneal-system --include-crds
}
if [[ "${1:-}" == "--stdout" ]]; then render; else render >manifests/install.yaml; fi
