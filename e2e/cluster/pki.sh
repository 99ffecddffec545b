#!/usr/bin/env bash
# Writes the cluster's certificates, keys and kubeconfigs under $CLUSTER_STATE/pki and the admin kubeconfig
# at $KUBECONFIG_PATH. Existing files are kept, so the CA (and thus kubeconfigs held by tests) survive restarts.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# EC P-256 keys: quick to generate, accepted by every component (and ES256 for service-account tokens).
new_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

# issue NAME SUBJECT [SANS]: a certificate signed by the cluster CA, for a client or (with SANS) a server.
issue() {
  local name="$1" subject="$2" sans="${3:-}" ext="$PKI_DIR/$1.ext"
  [[ -f "$PKI_DIR/$name.crt" ]] && return 0
  new_key "$PKI_DIR/$name.key"
  openssl req -new -key "$PKI_DIR/$name.key" -subj "$subject" -out "$PKI_DIR/$name.csr"
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    if [[ -n "$sans" ]]; then
      echo "extendedKeyUsage=serverAuth,clientAuth"
      echo "subjectAltName=$sans"
    else
      echo "extendedKeyUsage=clientAuth"
    fi
  } >"$ext"
  openssl x509 -req -in "$PKI_DIR/$name.csr" -CA "$PKI_DIR/ca.crt" -CAkey "$PKI_DIR/ca.key" \
    -CAcreateserial -days 3650 -sha256 -extfile "$ext" -out "$PKI_DIR/$name.crt" 2>/dev/null
  rm -f "$PKI_DIR/$name.csr" "$ext"
}

# kubeconfig NAME PATH: a self-contained kubeconfig (certificates embedded) for the client cert NAME.
kubeconfig() {
  local name="$1" path="$2"
  [[ -f "$path" ]] && return 0
  mkdir -p "$(dirname "$path")"
  cat >"$path.tmp" <<YAML
apiVersion: v1
kind: Config
clusters:
- name: anneal
  cluster:
    server: $APISERVER_URL
    certificate-authority-data: $(base64 -w0 "$PKI_DIR/ca.crt")
users:
- name: $name
  user:
    client-certificate-data: $(base64 -w0 "$PKI_DIR/$name.crt")
    client-key-data: $(base64 -w0 "$PKI_DIR/$name.key")
contexts:
- name: anneal
  context:
    cluster: anneal
    user: $name
current-context: anneal
YAML
  chmod 600 "$path.tmp"
  mv "$path.tmp" "$path"
}

mkdir -p "$PKI_DIR"
if [[ ! -f "$PKI_DIR/ca.crt" ]]; then
  log "creating the cluster CA in $PKI_DIR"
  new_key "$PKI_DIR/ca.key"
  openssl req -x509 -new -key "$PKI_DIR/ca.key" -subj "/CN=anneal-test-ca" -days 3650 -sha256 \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$PKI_DIR/ca.crt"
fi
[[ -f "$PKI_DIR/sa.key" ]] || new_key "$PKI_DIR/sa.key"
[[ -f "$PKI_DIR/sa.pub" ]] || openssl pkey -in "$PKI_DIR/sa.key" -pubout -out "$PKI_DIR/sa.pub"

apiserver_sans="DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:127.0.0.1,IP:10.96.0.1"
if [[ "$APISERVER_ADVERTISE_ADDRESS" != 127.0.0.1 ]]; then
  # With real nodes, pods reach the API server at this machine's address (the `kubernetes` Service's endpoint);
  # a certificate issued before (or for another address) is issued again.
  apiserver_sans+=",IP:$APISERVER_ADVERTISE_ADDRESS"
  if [[ -f "$PKI_DIR/kube-apiserver.crt" ]] &&
    ! openssl x509 -in "$PKI_DIR/kube-apiserver.crt" -noout -ext subjectAltName |
    grep -qF "IP Address:$APISERVER_ADVERTISE_ADDRESS"; then
    log "issuing the API server's certificate again, for $APISERVER_ADVERTISE_ADDRESS"
    rm -f "$PKI_DIR/kube-apiserver.crt"
  fi
fi
issue kube-apiserver "/CN=kube-apiserver" "$apiserver_sans"
# How the API server authenticates to kubelets (logs, exec, port-forward); kubelets authorize it by this group.
issue kube-apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
# Identities the bootstrap RBAC policy already grants what each component needs.
issue admin "/O=system:masters/CN=anneal-admin"
issue kube-controller-manager "/CN=system:kube-controller-manager"
issue kube-scheduler "/CN=system:kube-scheduler"
# kwok writes node and pod status for every simulated kubelet; it acts as a cluster admin.
issue kwok "/O=system:masters/CN=kwok-controller"

kubeconfig admin "$KUBECONFIG_PATH"
for component in kube-controller-manager kube-scheduler kwok; do
  kubeconfig "$component" "$PKI_DIR/$component.kubeconfig"
done

# Real nodes (nodes-up.sh): `pki.sh node NAME ADDRESS...` gives node NAME a client certificate in the group
# system:nodes (the Node authorizer and NodeRestriction know it by that), a serving certificate for its kubelet
# and a kubeconfig; kube-proxy gets the identity the bootstrap RBAC binds to system:node-proxier.
if [[ "${1:-}" == node ]]; then
  node="$2"
  shift 2
  sans="DNS:$node"
  for address in "$@"; do sans+=",IP:$address"; done
  issue "node-$node" "/O=system:nodes/CN=system:node:$node"
  issue "node-$node-serving" "/CN=system:node:$node" "$sans"
  kubeconfig "node-$node" "$PKI_DIR/node-$node.kubeconfig"
  issue kube-proxy "/CN=system:kube-proxy"
  kubeconfig kube-proxy "$PKI_DIR/kube-proxy.kubeconfig"
fi
