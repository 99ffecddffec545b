#!/usr/bin/env bash
# Rewrites tools/<module>/go.mod and go.sum from versions.env. Run it after changing a version, then commit.
# Needs the Go module proxy; build-tools.sh does not run it.
#
#   e2e/cluster/pin-tools.sh             every group: kubernetes etcd kwok helm node
#   e2e/cluster/pin-tools.sh node        only the named groups (node: kubelet and kube-proxy of the node tier)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# write_module DIR: a fresh go.mod for one tool group, named after the group.
write_module() {
  local dir="$CLUSTER_DIR/tools/$1"
  mkdir -p "$dir"
  rm -f "$dir/go.mod" "$dir/go.sum"
  printf 'module anneal.dev/e2e/cluster/tools/%s\n\ngo 1.24.0\n' "$1" >"$dir/go.mod"
}

# add_tools GROUP VERSION: go get -tool every package of that group at VERSION.
add_tools() {
  local group="$1" version="$2" entry g pkg
  for entry in "${TOOL_PACKAGES[@]}" "${NODE_TOOL_PACKAGES[@]}"; do
    read -r g _ pkg <<<"$entry"
    [[ "$g" == "$group" ]] || continue
    log "pin $pkg@$version"
    (cd "$CLUSTER_DIR/tools/$group" && go get -tool "$pkg@$version")
  done
}

# k8s.io/kubernetes refers to its staging modules as v0.0.0 with local replaces; point them at the
# published staging versions instead. pin_kubernetes_staging GROUP VERSION.
pin_kubernetes_staging() {
  local group="$1" version="$2" mod staging
  mod="$(go mod download -json "k8s.io/kubernetes@$version" | sed -n 's/^\s*"GoMod": "\(.*\)",$/\1/p')"
  staging="$(grep -oE '^\s*k8s\.io/[a-z0-9-]+ => \./staging/' "$mod" | awk '{print $1}')"
  [[ -n "$staging" ]] || die "no staging replaces found in $mod"
  for m in $staging; do
    (cd "$CLUSTER_DIR/tools/$group" && go mod edit -replace "$m=$m@$KUBERNETES_STAGING_VERSION")
  done
}

groups=("$@")
((${#groups[@]})) || groups=(kubernetes etcd kwok helm node)
for group in "${groups[@]}"; do
  write_module "$group"
  case "$group" in
    kubernetes) pin_kubernetes_staging kubernetes "$KUBERNETES_VERSION" && add_tools kubernetes "$KUBERNETES_VERSION" ;;
    node) pin_kubernetes_staging node "$KUBELET_VERSION" && add_tools node "$KUBELET_VERSION" ;;
    etcd) add_tools etcd "$ETCD_VERSION" ;;
    kwok) add_tools kwok "$KWOK_VERSION" ;;
    helm) add_tools helm "$HELM_VERSION" ;;
    *) die "unknown tool group $group (kubernetes, etcd, kwok, helm, node)" ;;
  esac
  (cd "$CLUSTER_DIR/tools/$group" && go mod tidy)
done
log "pinned; tools key $(tools_key), node tools key $(tools_key node)"
