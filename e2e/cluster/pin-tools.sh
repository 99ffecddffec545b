#!/usr/bin/env bash
# Rewrites tools/<module>/go.mod and go.sum from versions.env. Run it after changing a version, then commit.
# Needs the Go module proxy; build-tools.sh does not run it.
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
  for entry in "${TOOL_PACKAGES[@]}"; do
    read -r g _ pkg <<<"$entry"
    [[ "$g" == "$group" ]] || continue
    log "pin $pkg@$version"
    (cd "$CLUSTER_DIR/tools/$group" && go get -tool "$pkg@$version")
  done
}

# k8s.io/kubernetes refers to its staging modules as v0.0.0 with local replaces; point them at the
# published staging versions instead.
pin_kubernetes_staging() {
  local mod staging
  mod="$(go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | sed -n 's/^\s*"GoMod": "\(.*\)",$/\1/p')"
  staging="$(grep -oE '^\s*k8s\.io/[a-z0-9-]+ => \./staging/' "$mod" | awk '{print $1}')"
  [[ -n "$staging" ]] || die "no staging replaces found in $mod"
  for m in $staging; do
    (cd "$CLUSTER_DIR/tools/kubernetes" && go mod edit -replace "$m=$m@$KUBERNETES_STAGING_VERSION")
  done
}

write_module kubernetes
pin_kubernetes_staging
add_tools kubernetes "$KUBERNETES_VERSION"
write_module etcd
add_tools etcd "$ETCD_VERSION"
write_module kwok
add_tools kwok "$KWOK_VERSION"
write_module helm
add_tools helm "$HELM_VERSION"
for group in kubernetes etcd kwok helm; do
  (cd "$CLUSTER_DIR/tools/$group" && go mod tidy)
done
log "pinned; tools key $(tools_key)"
