#!/usr/bin/env bash
# Builds the pinned upstream tools (versions.env, tools/*/go.mod) into ~/.cache/anneal/tools/<key>/bin,
# one at a time, and does nothing when they are all there already. Prints the bin directory on stdout.
#
#   e2e/cluster/build-tools.sh         the control plane, kubectl, etcd, kwok, helm
#   e2e/cluster/build-tools.sh node    kubelet and kube-proxy for real nodes (tools/node, own directory)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

check_pins() {
  local group version
  for group in "$@"; do
    case "$group" in
      kubernetes) version="k8s.io/kubernetes $KUBERNETES_VERSION" ;;
      node) version="k8s.io/kubernetes $KUBELET_VERSION" ;;
      etcd) version="go.etcd.io/etcd/server/v3 $ETCD_VERSION" ;;
      kwok) version="sigs.k8s.io/kwok $KWOK_VERSION" ;;
      helm) version="helm.sh/helm/v3 $HELM_VERSION" ;;
    esac
    grep -qF "$version" "$CLUSTER_DIR/tools/$group/go.mod" ||
      die "tools/$group/go.mod does not pin $version from versions.env; run e2e/cluster/pin-tools.sh"
  done
}

missing_tools() {
  local entry group name pkg
  for entry in "${PACKAGES[@]}"; do
    read -r group name pkg <<<"$entry"
    [[ -x "$TOOLS_BIN/$name" ]] || echo "$entry"
  done
}

main() {
  if [[ "${1:-}" == node ]]; then
    PACKAGES=("${NODE_TOOL_PACKAGES[@]}")
    TOOLS_DIR="$NODE_TOOLS_DIR" TOOLS_BIN="$NODE_TOOLS_BIN"
    check_pins node
  else
    PACKAGES=("${TOOL_PACKAGES[@]}")
    check_pins kubernetes etcd kwok helm
  fi
  local todo entry group name pkg i=0 n start
  todo="$(missing_tools)"
  if [[ -z "$todo" ]]; then
    log "tools up to date in $TOOLS_BIN"
    echo "$TOOLS_BIN"
    return
  fi
  lock "$TOOLS_DIR.lock"
  todo="$(missing_tools)" # again: whoever held the lock may have built them
  if [[ -z "$todo" ]]; then
    echo "$TOOLS_BIN"
    return
  fi
  n="$(wc -l <<<"$todo")"
  mkdir -p "$TOOLS_BIN"
  start=$SECONDS
  while read -r group name pkg; do
    i=$((i + 1))
    log "[$i/$n] building $name ($pkg, $(( SECONDS - start ))s so far)"
    # Build to a temporary name and rename, so an interrupted build never leaves a half-written tool behind.
    (cd "$CLUSTER_DIR/tools/$group" &&
      go build "${GO_BUILD_FLAGS[@]}" -ldflags="$(ldflags "$group")" -o "$TOOLS_BIN/.$name.partial" "$pkg")
    mv "$TOOLS_BIN/.$name.partial" "$TOOLS_BIN/$name"
  done <<<"$todo"
  cp "$CLUSTER_DIR/versions.env" "$TOOLS_DIR/versions.env"
  log "built $n tools in $(( SECONDS - start ))s into $TOOLS_BIN"
  echo "$TOOLS_BIN"
}

main "$@"
