#!/usr/bin/env bash
# Runs Mizzen locally on a real Kubernetes control plane on loopback.
#
#   scripts/run-local.sh up     install (cached) and start the control plane,
#                               install Mizzen's manifests, start the built
#                               components as local processes, and a test
#                               node that runs pods as processes in network
#                               namespaces (the tests' kubelet stand-in)
#   scripts/run-local.sh up --real-node
#                               the mesh as users install it: a real node
#                               (kubelet, containerd, kube-proxy, CoreDNS;
#                               scripts/node.sh) running the images of
#                               scripts/images.sh, manifests/install.yaml
#                               applied unchanged, and the sample app of
#                               manifests/examples/demo.yaml (needs root)
#   scripts/run-local.sh down   stop everything (either mode), and put the
#                               host's iptables and sysctls back
#
# State lives in $MIZZEN_LOCAL_DIR (default ~/.cache/mizzen/local); component
# logs in its logs/ folder. Ports: CA gRPC $MIZZEN_CA_PORT (15012), CA admin
# $MIZZEN_CA_ADMIN_PORT (15014), agent admin $MIZZEN_AGENT_ADMIN_PORT (15030),
# injector webhook $MIZZEN_INJECTOR_PORT (15017) and admin (15018).
# The agent serves SDS on $DIR/run/agent.sock for node "local-node"; pods the
# scheduler binds there run under $DIR/pods/<namespace>_<pod>/ (logs too).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${MIZZEN_LOCAL_DIR:-$HOME/.cache/mizzen/local}"
CA_PORT="${MIZZEN_CA_PORT:-15012}"
CA_ADMIN_PORT="${MIZZEN_CA_ADMIN_PORT:-15014}"
AGENT_ADMIN_PORT="${MIZZEN_AGENT_ADMIN_PORT:-15030}"
INJECTOR_PORT="${MIZZEN_INJECTOR_PORT:-15017}"
INJECTOR_ADMIN_PORT="${MIZZEN_INJECTOR_ADMIN_PORT:-15018}"
NODE=local-node

log() { printf '[run-local] %s\n' "$*" >&2; }
die() { printf '[run-local] error: %s\n' "$*" >&2; exit 1; }

stop_components() {
  local pid c
  for c in mizzen-test-node mizzen-injector mizzen-agent mizzen-ca; do
    pid=$(cat "$DIR/pids/$c" 2>/dev/null) || continue
    if [[ $(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null) == *"$c"* ]]; then
      kill -TERM "$pid" 2>/dev/null || true
      # The test node removes its pods' namespaces before it exits.
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$DIR/pids/$c"
  done
}

# start NAME ADMIN_PORT KUBECONFIG ARGS...: a component as a local process.
start() {
  local name=$1 port=$2 kc=$3; shift 3
  KUBECONFIG=$kc setsid "target/debug/$name" "$@" --admin-addr "127.0.0.1:$port" \
    > "$DIR/logs/$name.log" 2>&1 < /dev/null &
  echo $! > "$DIR/pids/$name"
  for _ in $(seq 1 150); do
    curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && return 0
    kill -0 "$(cat "$DIR/pids/$name")" 2>/dev/null || { tail "$DIR/logs/$name.log" >&2; die "$name exited"; }
    sleep 0.2
  done
  die "$name did not become ready (log: $DIR/logs/$name.log)"
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

# step N TOTAL NAME HINT CMD...: one step of `up --real-node`, its output in
# $DIR/logs/step-<name>.log; on failure, names the step, its log and the
# likely fix.
step() {
  local n=$1 total=$2 name=$3 hint=$4 t0=$SECONDS; shift 4
  local slog="$DIR/logs/step-${name// /-}.log"
  printf '[run-local] [%s/%s] %s ... ' "$n" "$total" "$name" >&2
  if "$@" > "$slog" 2>&1; then
    printf 'ok (%s s)\n' "$((SECONDS - t0))" >&2
  else
    printf 'FAILED\n' >&2
    tail -n 15 "$slog" | sed 's/^/    /' >&2
    die "step \"$name\" failed (log: $slog). Likely fix: $hint"
  fi
}

# apply_and_roll FILE NAMESPACE WORKLOAD...: apply FILE, wait for each
# workload to roll out.
apply_and_roll() {
  local file=$1 ns=$2 w; shift 2
  $KUBECTL apply -f "$file" || return 1
  for w in "$@"; do $KUBECTL -n "$ns" rollout status "$w" --timeout=240s || return 1; done
}

# The mesh as users install it, on a real node of this machine.
real_node_up() {
  mkdir -p "$DIR/logs"
  local ip total=10
  ip=$(scripts/node.sh ip)
  [ -n "$ip" ] || die "this machine has no IPv4 default route: a real node needs an address to advertise"
  [ "$(id -u)" = 0 ] || die "a real node needs root (kubelet, containerd, iptables)"
  KUBECTL="$(scripts/kube.sh bin)/kubectl --kubeconfig $DIR/kubeconfig"
  step 1 $total "system packages" "run scripts/deps.sh by hand and read its error (apt-get needs the package registry)" \
    scripts/deps.sh
  step 2 $total "control plane build" "needs Go >= 1.24 and the Go module proxy; see scripts/kube.sh install" \
    scripts/kube.sh install
  step 3 $total "node build" "needs Go and the Go module proxy; see scripts/kube.sh install-node" \
    scripts/kube.sh install-node
  step 4 $total "images" "a cargo build error is in the log; umoci comes from scripts/deps.sh" \
    scripts/images.sh --node
  step 5 $total "control plane" "another run may hold it: scripts/run-local.sh down" \
    env MIZZEN_API_ADVERTISE="$ip" scripts/kube.sh start "$DIR"
  step 6 $total "real node" "see $DIR/node/logs/ (kubelet.log, containerd.log); scripts/run-local.sh down cleans up" \
    scripts/node.sh up "$DIR"
  step 7 $total "Gateway API CRDs" "scripts/kube.sh gateway-api fetches them from the Go module proxy" \
    $KUBECTL apply --server-side --force-conflicts -f "$(scripts/kube.sh gateway-api)"
  step 8 $total "install.yaml" "kubectl -n mizzen-system get pods; kubectl -n mizzen-system logs <pod>" \
    apply_and_roll manifests/install.yaml mizzen-system deploy/mizzen-ca ds/mizzen-agent deploy/mizzen-injector
  step 9 $total "sample app" "kubectl -n demo get pods; kubectl -n demo describe pod <pod> (is the webhook up?)" \
    apply_and_roll manifests/examples/demo.yaml demo deploy/echo deploy/client
  step 10 $total "first request" "kubectl -n demo logs deploy/client -c mizzen-proxy" \
    $KUBECTL -n demo exec deploy/client -c app -- mizzen-testapp get echo:8080 /hello
  cat >&2 <<TRY

Mizzen runs on the real node "mizzen-node" with the sample app in namespace demo.
  export KUBECONFIG=$DIR/kubeconfig PATH=$(scripts/kube.sh bin):\$PATH

A request from the client to the echo Service, by name, over mutual TLS (the
echo server prints the x-forwarded-client-cert its proxy added):
  kubectl -n demo exec deploy/client -c app -- mizzen-testapp get echo:8080 /hello

A policy that denies /admin, then the same request is refused with 403:
  kubectl apply -f manifests/examples/deny-admin.yaml
  kubectl -n demo exec deploy/client -c app -- mizzen-testapp get echo:8080 /admin/users
  kubectl -n demo get authorizationpolicies -o wide

The metrics that show it (mizzen_requests_total by response_code, on the
echo pods' proxies):
  kubectl -n demo exec deploy/echo -c app -- mizzen-testapp get 127.0.0.1:15020 /metrics | grep mizzen_requests_total

Stop it with: scripts/run-local.sh down
TRY
}

case "${1:-up}" in
  up)
    if [ "${2:-}" = --real-node ]; then
      real_node_up
      exit 0
    fi
    scripts/deps.sh
    scripts/kube.sh install
    cargo build --workspace --bins --locked
    scripts/kube.sh start "$DIR"
    KUBECTL="$(scripts/kube.sh bin)/kubectl --kubeconfig $DIR/kubeconfig"
    $KUBECTL apply -f manifests/crds.yaml -f manifests/namespace.yaml
    $KUBECTL apply --server-side --force-conflicts -f "$(scripts/kube.sh gateway-api)"
    $KUBECTL apply -f manifests/ca.yaml -f manifests/agent.yaml
    $KUBECTL wait --for=condition=Established --timeout=30s \
      crd/authorizationpolicies.security.mizzen.dev crd/peerauthentications.security.mizzen.dev \
      crd/virtualservices.networking.mizzen.dev crd/destinationrules.networking.mizzen.dev \
      crd/httproutes.gateway.networking.k8s.io crd/grpcroutes.gateway.networking.k8s.io

    # The components, as local processes with the manifests' ServiceAccounts and RBAC.
    stop_components
    start mizzen-ca "$CA_ADMIN_PORT" "$(sa_kubeconfig mizzen-ca)" --grpc-addr "127.0.0.1:$CA_PORT"
    log "mizzen-ca is serving on 127.0.0.1:$CA_PORT (metrics: http://127.0.0.1:$CA_ADMIN_PORT/metrics)"

    # The agent stands for the kubelet-less node "local-node": its own
    # credential is a token bound to a pod placed there.
    $KUBECTL apply -f - <<NODE_AND_POD
apiVersion: v1
kind: Node
metadata: {name: $NODE, labels: {kubernetes.io/hostname: $NODE}}
---
apiVersion: v1
kind: Pod
metadata: {name: mizzen-agent-local, namespace: mizzen-system, annotations: {test.mizzen.dev/unmanaged: "true"}}
spec:
  serviceAccountName: mizzen-agent
  nodeName: $NODE
  containers: [{name: agent, image: mizzen-agent}]
NODE_AND_POD
    uid=$($KUBECTL -n mizzen-system get pod mizzen-agent-local -o jsonpath='{.metadata.uid}')
    $KUBECTL -n mizzen-system create token mizzen-agent --audience mizzen-ca --duration 24h \
      --bound-object-kind Pod --bound-object-name mizzen-agent-local --bound-object-uid "$uid" > "$DIR/agent-token"
    start mizzen-agent "$AGENT_ADMIN_PORT" "$(sa_kubeconfig mizzen-agent)" \
      --socket "$DIR/run/agent.sock" --node-name "$NODE" --namespace mizzen-system \
      --ca-addr "https://127.0.0.1:$CA_PORT" --agent-token-file "$DIR/agent-token"
    log "mizzen-agent is serving SDS on $DIR/run/agent.sock (metrics: http://127.0.0.1:$AGENT_ADMIN_PORT/metrics)"

    # The injector: every document of its manifest but the webhook
    # configurations (injection; validation of traffic rules), which point
    # at the local process instead of the Service (nothing routes Service
    # IPs here). The injector fills in their caBundle.
    awk 'BEGIN{RS="\n---\n"; ORS="\n---\n"} !/kind: (Mutating|Validating)WebhookConfiguration/' manifests/injector.yaml \
      | $KUBECTL apply -f -
    sed -e "s#service: {name: mizzen-injector, namespace: mizzen-system, path: \(/[a-z]*\), port: 443}#url: https://127.0.0.1:$INJECTOR_PORT\1#" \
      manifests/injector.yaml | awk 'BEGIN{RS="\n---\n"; ORS="\n---\n"} /kind: (Mutating|Validating)WebhookConfiguration/' | $KUBECTL apply -f -
    start mizzen-injector "$INJECTOR_ADMIN_PORT" "$(sa_kubeconfig mizzen-injector)" serve \
      --addr "127.0.0.1:$INJECTOR_PORT" --serving-ip 127.0.0.1 --config "$DIR/injector-config.yaml"
    log "mizzen-injector is serving the webhook on 127.0.0.1:$INJECTOR_PORT; label a namespace with mizzen.dev/inject=enabled"

    # The node's kubelet stand-in: runs the pods bound to local-node, with
    # the built proxy for Mizzen's image and mizzen-testapp for app images.
    KUBECONFIG=$DIR/kubeconfig setsid target/debug/mizzen-test-node --node "$NODE" --pods-dir "$DIR/pods" \
      --image "mizzen-proxy=$PWD/target/debug/mizzen-proxy" --image "mizzen-testapp=$PWD/target/debug/mizzen-testapp" \
      --host-path "/var/run/mizzen=$DIR/run" > "$DIR/logs/mizzen-test-node.log" 2>&1 < /dev/null &
    echo $! > "$DIR/pids/mizzen-test-node"
    sleep 1
    kill -0 "$(cat "$DIR/pids/mizzen-test-node")" 2>/dev/null \
      || { cat "$DIR/logs/mizzen-test-node.log" >&2; die "mizzen-test-node exited"; }
    log "pods scheduled to $NODE run as local processes (image mizzen-testapp = target/debug/mizzen-testapp); their logs: $DIR/pods/"
    log "Use the cluster with:"
    log "  export KUBECONFIG=$DIR/kubeconfig PATH=$(scripts/kube.sh bin):\$PATH"
    log "  kubectl get configmap mizzen-root-ca -n default -o jsonpath='{.data.root-cert\\.pem}'"
    log "Stop it with: scripts/run-local.sh down"
    ;;
  down)
    stop_components
    if [ -d "$DIR/node" ]; then scripts/node.sh down "$DIR"; fi
    scripts/kube.sh stop "$DIR"
    ;;
  *)
    echo "usage: $0 up [--real-node] | down" >&2
    exit 2
    ;;
esac
