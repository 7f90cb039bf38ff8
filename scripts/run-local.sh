#!/usr/bin/env bash
# Runs Mizzen locally on a real Kubernetes control plane on loopback.
#
#   scripts/run-local.sh up     install (cached) and start the control plane,
#                               install Mizzen's manifests, print how to use it
#   scripts/run-local.sh down   stop everything
#
# State lives in $MIZZEN_LOCAL_DIR (default ~/.cache/mizzen/local).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${MIZZEN_LOCAL_DIR:-$HOME/.cache/mizzen/local}"

log() { printf '[run-local] %s\n' "$*" >&2; }

case "${1:-up}" in
  up)
    scripts/deps.sh
    scripts/kube.sh install
    scripts/kube.sh start "$DIR"
    KUBECTL="$(scripts/kube.sh bin)/kubectl --kubeconfig $DIR/kubeconfig"
    $KUBECTL apply -f manifests/crds.yaml
    $KUBECTL wait --for=condition=Established --timeout=30s \
      crd/authorizationpolicies.security.mizzen.dev crd/peerauthentications.security.mizzen.dev
    log "Mizzen's CRDs are installed. Components so far: see README.md (Status)."
    log "Use it with:"
    log "  export KUBECONFIG=$DIR/kubeconfig PATH=$(scripts/kube.sh bin):\$PATH"
    log "  kubectl get authorizationpolicies -A"
    log "Stop it with: scripts/run-local.sh down"
    ;;
  down)
    scripts/kube.sh stop "$DIR"
    ;;
  *)
    echo "usage: $0 up|down" >&2
    exit 2
    ;;
esac
