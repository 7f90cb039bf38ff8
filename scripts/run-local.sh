#!/usr/bin/env bash
# Runs Mizzen locally on a real Kubernetes control plane on loopback.
#
#   scripts/run-local.sh up     install (cached) and start the control plane,
#                               install Mizzen's manifests, start the built
#                               components as local processes
#   scripts/run-local.sh down   stop everything
#
# State lives in $MIZZEN_LOCAL_DIR (default ~/.cache/mizzen/local); component
# logs in its logs/ folder. Ports: CA gRPC $MIZZEN_CA_PORT (15012), CA admin
# $MIZZEN_CA_ADMIN_PORT (15014).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${MIZZEN_LOCAL_DIR:-$HOME/.cache/mizzen/local}"
CA_PORT="${MIZZEN_CA_PORT:-15012}"
CA_ADMIN_PORT="${MIZZEN_CA_ADMIN_PORT:-15014}"

log() { printf '[run-local] %s\n' "$*" >&2; }
die() { printf '[run-local] error: %s\n' "$*" >&2; exit 1; }

stop_components() {
  local pid
  pid=$(cat "$DIR/pids/mizzen-ca" 2>/dev/null) || return 0
  if tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q mizzen-ca; then
    kill -TERM "$pid" 2>/dev/null || true
  fi
  rm -f "$DIR/pids/mizzen-ca"
}

# A kubeconfig for ServiceAccount mizzen-system/$1, so the component runs
# with exactly the RBAC its manifest grants.
sa_kubeconfig() {
  local sa=$1 out=$DIR/$1.kubeconfig token server ca
  token=$($KUBECTL -n mizzen-system create token "$sa" --duration=24h)
  server=$($KUBECTL config view --raw -o jsonpath='{.clusters[0].cluster.server}')
  ca=$($KUBECTL config view --raw -o jsonpath='{.clusters[0].cluster.certificate-authority-data}')
  cat > "$out" <<KC
apiVersion: v1
kind: Config
clusters: [{name: local, cluster: {server: "$server", certificate-authority-data: "$ca"}}]
users: [{name: $sa, user: {token: "$token"}}]
contexts: [{name: local, context: {cluster: local, user: $sa}}]
current-context: local
KC
  chmod 600 "$out"
  echo "$out"
}

case "${1:-up}" in
  up)
    scripts/deps.sh
    scripts/kube.sh install
    cargo build --workspace --bins --locked
    scripts/kube.sh start "$DIR"
    KUBECTL="$(scripts/kube.sh bin)/kubectl --kubeconfig $DIR/kubeconfig"
    $KUBECTL apply -f manifests/crds.yaml -f manifests/namespace.yaml
    $KUBECTL apply -f manifests/ca.yaml
    $KUBECTL wait --for=condition=Established --timeout=30s \
      crd/authorizationpolicies.security.mizzen.dev crd/peerauthentications.security.mizzen.dev

    # The CA, as a local process with the manifest's ServiceAccount and RBAC.
    stop_components
    KUBECONFIG=$(sa_kubeconfig mizzen-ca) setsid target/debug/mizzen-ca \
      --grpc-addr "127.0.0.1:$CA_PORT" --admin-addr "127.0.0.1:$CA_ADMIN_PORT" \
      > "$DIR/logs/mizzen-ca.log" 2>&1 < /dev/null &
    echo $! > "$DIR/pids/mizzen-ca"
    for _ in $(seq 1 100); do
      curl -sf "http://127.0.0.1:$CA_ADMIN_PORT/readyz" >/dev/null && break
      kill -0 "$(cat "$DIR/pids/mizzen-ca")" 2>/dev/null || { tail "$DIR/logs/mizzen-ca.log" >&2; die "mizzen-ca exited"; }
      sleep 0.2
    done
    curl -sf "http://127.0.0.1:$CA_ADMIN_PORT/readyz" >/dev/null || die "mizzen-ca did not become ready (log: $DIR/logs/mizzen-ca.log)"
    log "mizzen-ca is serving on 127.0.0.1:$CA_PORT (metrics: http://127.0.0.1:$CA_ADMIN_PORT/metrics)"
    log "Use the cluster with:"
    log "  export KUBECONFIG=$DIR/kubeconfig PATH=$(scripts/kube.sh bin):\$PATH"
    log "  kubectl get configmap mizzen-root-ca -n default -o jsonpath='{.data.root-cert\\.pem}'"
    log "Stop it with: scripts/run-local.sh down"
    ;;
  down)
    stop_components
    scripts/kube.sh stop "$DIR"
    ;;
  *)
    echo "usage: $0 up|down" >&2
    exit 2
    ;;
esac
