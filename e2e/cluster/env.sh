# Source it (bash): `source e2e/cluster/env.sh`. Points kubectl, helm and the e2e tests at the local cluster:
# exports KUBECONFIG, ANNEAL_KUBECONFIG, ANNEAL_TOOLS_BIN and ANNEAL_CLUSTER_LOGS, and puts the pinned tools first
# on PATH. Values already set in ANNEAL_* are kept.
# shellcheck shell=bash
while IFS='=' read -r _anneal_key _anneal_value; do
  export "$_anneal_key=$_anneal_value"
done < <(bash "$(dirname "${BASH_SOURCE[0]}")/paths.sh")
unset _anneal_key _anneal_value
export KUBECONFIG="$ANNEAL_KUBECONFIG"
case ":$PATH:" in
  *":$ANNEAL_TOOLS_BIN:"*) ;;
  *) export PATH="$ANNEAL_TOOLS_BIN:$PATH" ;;
esac
