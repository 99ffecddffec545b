#!/usr/bin/env bash
# Prints where the cluster's tools and kubeconfig are, as KEY=VALUE lines, for env.sh and the e2e crate.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
echo "ANNEAL_TOOLS_BIN=$TOOLS_BIN"
echo "ANNEAL_KUBECONFIG=$KUBECONFIG_PATH"
echo "ANNEAL_CLUSTER_LOGS=$LOG_DIR"
