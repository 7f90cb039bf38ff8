#!/usr/bin/env bash
# A real Kubernetes control plane on loopback, for Mizzen's tests and local demo.
#
#   scripts/kube.sh install      build pinned kube-apiserver, kube-controller-manager,
#                                kube-scheduler, kubectl and etcd from published Go modules
#                                (cached in $MIZZEN_CACHE, a no-op when present)
#   scripts/kube.sh start DIR    start etcd + the control plane, write DIR/kubeconfig
#                                (MIZZEN_API_ADVERTISE=IP: listen on every address
#                                and advertise IP, for a real node)
#   scripts/kube.sh client DIR NAME SUBJECT
#                                a client certificate from DIR's cluster CA and
#                                DIR/NAME.kubeconfig using it
#   scripts/kube.sh cert DIR NAME SUBJECT EXT
#                                a certificate from DIR's cluster CA, with EXT
#   scripts/kube.sh stop DIR     stop everything started in DIR
#   scripts/kube.sh bin          print the directory holding the binaries
#   scripts/kube.sh install-node build kubelet and kube-proxy (same version) and
#                                CoreDNS, for a real node (scripts/node.sh)
#   scripts/kube.sh node-bin     print the directory holding those
#   scripts/kube.sh gateway-api  print the path of the Gateway API's standard
#                                channel CRDs (the release's files, from the
#                                sigs.k8s.io/gateway-api module), fetching them once
#
# Nothing is downloaded but Go modules through the Go module proxy.
set -euo pipefail

K8S_VERSION="${MIZZEN_K8S_VERSION:-v1.33.13}"
ETCD_VERSION="${MIZZEN_ETCD_VERSION:-v3.5.21}"
CACHE="${MIZZEN_CACHE:-$HOME/.cache/mizzen}"
K8S_DIR="$CACHE/k8s/$K8S_VERSION"
ETCD_DIR="$CACHE/etcd/$ETCD_VERSION"
BIN_DIR="$CACHE/bin/k8s-$K8S_VERSION-etcd-$ETCD_VERSION"
# A non-loopback address for the API server to advertise (and listen on),
# for a control plane with a real node (scripts/node.sh); empty: loopback only.
ADVERTISE="${MIZZEN_API_ADVERTISE:-}"
K8S_CMDS=(kube-apiserver kube-controller-manager kube-scheduler kubectl)
# A real node (scripts/node.sh): kubelet and kube-proxy of the same version, and CoreDNS.
NODE_CMDS=(kubelet kube-proxy)
COREDNS_VERSION="${MIZZEN_COREDNS_VERSION:-v1.12.1}"
COREDNS_DIR="$CACHE/coredns/$COREDNS_VERSION"
NODE_BIN_DIR="$CACHE/bin/node-k8s-$K8S_VERSION-coredns-$COREDNS_VERSION"
# Gateway API (HTTPRoute for meshes): the standard channel CRDs of a release.
GATEWAY_API_VERSION="${MIZZEN_GATEWAY_API_VERSION:-v1.6.3}"
GATEWAY_API_CRDS="$CACHE/gateway-api/$GATEWAY_API_VERSION/standard-install.yaml"

log() { printf '[kube.sh] %s\n' "$*" >&2; }
# shellcheck source=scripts/daemons.sh
. "$(dirname "$0")/daemons.sh"
die() { printf '[kube.sh] error: %s\n' "$*" >&2; exit 1; }

need() {
  command -v "$1" >/dev/null 2>&1 || die "$1 is required: $2"
}

installed() {
  for b in "${K8S_CMDS[@]}" etcd; do
    [ -x "$BIN_DIR/$b" ] || return 1
  done
}

# Go module proxy versions: k8s.io/kubernetes v1.X.Y publishes staging modules as v0.X.Y.
staging_version() { echo "v0.${K8S_VERSION#v1.}"; }

# build_k8s WRAPPER CMD...: go build k8s.io/kubernetes/cmd/CMD for each CMD
# (into $K8S_DIR/bin) from a wrapper module in $K8S_DIR/WRAPPER.
build_k8s() {
  local w="$K8S_DIR/$1" sv; shift
  local cmds=("$@")
  sv=$(staging_version)
  mkdir -p "$w" "$K8S_DIR/bin"
  log "building Kubernetes $K8S_VERSION ${cmds[*]} (staging modules $sv) in $w"
  # The upstream go.mod replaces every staging module with ./staging/...; a module
  # zip has no ./staging, so replace each with its published version instead.
  local upstream
  upstream=$(cd "$w" && go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)",*/\1/p')
  [ -f "$upstream" ] || die "could not download k8s.io/kubernetes@$K8S_VERSION through the Go module proxy"
  {
    echo "module local/mizzen-k8sbin"
    echo
    grep -E '^go [0-9]' "$upstream"
    grep -E '^godebug ' "$upstream" || true
    echo
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo
    echo "replace ("
    sed -n 's#^\s*\(k8s.io/[a-z0-9-]*\) => ./staging/src/.*#\t\1 => \1 '"$sv"'#p' "$upstream"
    echo ")"
  } > "$w/go.mod"
  {
    echo "//go:build tools"
    echo
    echo "package tools"
    echo
    echo "import ("
    for c in "${cmds[@]}"; do echo "	_ \"k8s.io/kubernetes/cmd/$c\""; done
    echo ")"
  } > "$w/tools.go"
  (cd "$w" && go mod tidy)
  local minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
  local ld="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION"
  ld+=" -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
  ld+=" -X k8s.io/component-base/version.gitTreeState=clean"
  ld+=" -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION"
  ld+=" -X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=$minor"
  for c in "${cmds[@]}"; do
    if [ ! -x "$K8S_DIR/bin/$c" ]; then
      log "go build $c"
      (cd "$w" && CGO_ENABLED=0 go build -trimpath -ldflags "$ld" -o "$K8S_DIR/bin/$c.tmp" "k8s.io/kubernetes/cmd/$c")
      mv "$K8S_DIR/bin/$c.tmp" "$K8S_DIR/bin/$c"
    fi
  done
}

# build_go_tool NAME DIR MODULE VERSION GO: `go build MODULE` (a main
# package) at VERSION into DIR/bin/NAME, from a wrapper module of its own in
# DIR/wrapper (go directive GO). A dependency's replace directives are
# ignored by Go, so each tool keeps its dependency versions apart (etcd's
# gRPC is not Kubernetes').
build_go_tool() {
  local name=$1 dir=$2 module=$3 version=$4 go=$5 w="$2/wrapper"
  mkdir -p "$w" "$dir/bin"
  [ -x "$dir/bin/$name" ] && return 0
  log "building $name $version in $w"
  printf 'module local/mizzen-%sbin\n\ngo %s\n\nrequire %s %s\n' "$name" "$go" "$module" "$version" > "$w/go.mod"
  printf '//go:build tools\n\npackage tools\n\nimport _ "%s"\n' "$module" > "$w/tools.go"
  (cd "$w" && go mod tidy)
  (cd "$w" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$dir/bin/$name.tmp" "$module")
  mv "$dir/bin/$name.tmp" "$dir/bin/$name"
}


node_installed() {
  for b in "${NODE_CMDS[@]}" coredns; do
    [ -x "$NODE_BIN_DIR/$b" ] || return 1
  done
}

cmd_install_node() {
  if node_installed; then
    log "kubelet, kube-proxy $K8S_VERSION and CoreDNS $COREDNS_VERSION already installed in $NODE_BIN_DIR"
    return 0
  fi
  need go "install Go >= 1.24 (https://go.dev/doc/install); the Go module proxy must be reachable"
  local t0=$SECONDS
  # A wrapper of its own, so that the control plane's module graph is not
  # touched; the Go build cache the control plane warmed is shared.
  build_k8s node-wrapper "${NODE_CMDS[@]}"
  build_go_tool coredns "$COREDNS_DIR" github.com/coredns/coredns "$COREDNS_VERSION" 1.24
  mkdir -p "$NODE_BIN_DIR"
  for c in "${NODE_CMDS[@]}"; do ln -sf "$K8S_DIR/bin/$c" "$NODE_BIN_DIR/$c"; done
  ln -sf "$COREDNS_DIR/bin/coredns" "$NODE_BIN_DIR/coredns"
  node_installed || die "install-node finished but binaries are missing from $NODE_BIN_DIR"
  log "installed the node's binaries in $NODE_BIN_DIR in $((SECONDS - t0)) s"
}

# The release's standard channel CRDs, as its standard-install.yaml
# bundles them: every file of config/crd/standard, in order.
cmd_gateway_api() {
  if [ ! -s "$GATEWAY_API_CRDS" ]; then
    need go "install Go >= 1.24; the Go module proxy must be reachable"
    local dir tmp
    dir=$(cd "$(mktemp -d)" && GOFLAGS=-mod=mod go mod download -json "sigs.k8s.io/gateway-api@$GATEWAY_API_VERSION" \
      | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
    [ -d "$dir/config/crd/standard" ] || die "no config/crd/standard in sigs.k8s.io/gateway-api@$GATEWAY_API_VERSION"
    mkdir -p "$(dirname "$GATEWAY_API_CRDS")"
    tmp="$GATEWAY_API_CRDS.tmp"
    : > "$tmp"
    for f in "$dir"/config/crd/standard/*.yaml; do
      printf -- '---\n' >> "$tmp"
      cat "$f" >> "$tmp"
    done
    mv "$tmp" "$GATEWAY_API_CRDS"
    log "Gateway API $GATEWAY_API_VERSION standard CRDs in $GATEWAY_API_CRDS"
  fi
  echo "$GATEWAY_API_CRDS"
}

cmd_install() {
  cmd_gateway_api > /dev/null
  if installed; then
    log "Kubernetes $K8S_VERSION and etcd $ETCD_VERSION already installed in $BIN_DIR"
    return 0
  fi
  need go "install Go >= 1.24 (https://go.dev/doc/install); the Go module proxy must be reachable"
  local t0=$SECONDS
  build_go_tool etcd "$ETCD_DIR" go.etcd.io/etcd/server/v3 "$ETCD_VERSION" 1.23
  build_k8s wrapper "${K8S_CMDS[@]}"
  mkdir -p "$BIN_DIR"
  for c in "${K8S_CMDS[@]}"; do ln -sf "$K8S_DIR/bin/$c" "$BIN_DIR/$c"; done
  ln -sf "$ETCD_DIR/bin/etcd" "$BIN_DIR/etcd"
  installed || die "install finished but binaries are missing from $BIN_DIR"
  log "installed in $BIN_DIR in $((SECONDS - t0)) s"
}

# ---------------------------------------------------------------- start/stop

# gen_cert NAME SUBJECT EXTENSIONS: an ECDSA P-256 key and a certificate signed by the test CA.
gen_cert() {
  local pki=$1 name=$2 subj=$3 ext=$4
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$pki/$name.key" -subj "$subj" -out "$pki/$name.csr" 2>/dev/null
  printf '%b\n' "$ext" > "$pki/$name.ext"
  openssl x509 -req -in "$pki/$name.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" \
    -CAcreateserial -days 365 -sha256 -extfile "$pki/$name.ext" -out "$pki/$name.crt" 2>/dev/null
  rm -f "$pki/$name.csr" "$pki/$name.ext"
}

gen_pki() {
  local pki=$1
  mkdir -p "$pki"
  openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$pki/ca.key" -out "$pki/ca.crt" -days 3650 -sha256 -subj "/CN=mizzen-test-cluster-ca" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  gen_cert "$pki" apiserver "/CN=kube-apiserver" \
    "subjectAltName=IP:127.0.0.1,IP:10.0.0.1,${ADVERTISE:+IP:$ADVERTISE,}DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth"
  gen_cert "$pki" admin "/O=system:masters/CN=mizzen-test-admin" \
    "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth"
  openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
  openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
  chmod 600 "$pki"/*.key
}

# write_kubeconfig DIR PORT [OUT CERT]: a kubeconfig for the client certificate
# DIR/pki/CERT.{crt,key} (default: admin, written to DIR/kubeconfig).
write_kubeconfig() {
  local dir=$1 port=$2 out=${3:-$1/kubeconfig} cert=${4:-admin} pki=$1/pki
  cat > "$out" <<KC
apiVersion: v1
kind: Config
clusters:
- name: mizzen-test
  cluster:
    server: https://127.0.0.1:$port
    certificate-authority-data: $(base64 -w0 < "$pki/ca.crt")
users:
- name: mizzen-test-admin
  user:
    client-certificate-data: $(base64 -w0 < "$pki/$cert.crt")
    client-key-data: $(base64 -w0 < "$pki/$cert.key")
contexts:
- name: mizzen-test
  context:
    cluster: mizzen-test
    user: mizzen-test-admin
current-context: mizzen-test
KC
  chmod 600 "$out"
}

# cmd_cert DIR NAME SUBJECT EXTENSIONS: DIR/pki/NAME.{crt,key}, signed by
# DIR's cluster CA (the kubelet's serving certificate).
cmd_cert() {
  local dir=${1:?usage: kube.sh cert DIR NAME SUBJECT EXT} name=${2:?} subj=${3:?} ext=${4:?}
  [ -f "$dir/pki/ca.key" ] || die "no control plane in $dir (no pki/ca.key)"
  gen_cert "$dir/pki" "$name" "$subj" "$ext"
}

# cmd_client DIR NAME SUBJECT: a client certificate signed by DIR's cluster
# CA and a kubeconfig DIR/NAME.kubeconfig using it (for the node's kubelet
# and kube-proxy).
cmd_client() {
  local dir=${1:?usage: kube.sh client DIR NAME SUBJECT} name=${2:?} subj=${3:?}
  dir=$(cd "$dir" && pwd)
  local port; port=$(sed -n 's/^MIZZEN_API_PORT=//p' "$dir/env")
  [ -n "$port" ] || die "no control plane in $dir (no MIZZEN_API_PORT in $dir/env)"
  cmd_cert "$dir" "$name" "$subj" \
    "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth"
  write_kubeconfig "$dir" "$port" "$dir/$name.kubeconfig" "$name"
}

# start_once DIR: one attempt at starting the control plane on fresh ports
# from scripts/ports.sh. `kube.sh start` runs it as its own process
# (`start-once`), so that `set -e` holds in it and `die` ends only the attempt.
start_once() {
  local dir=$1 t0=$SECONDS pki=$1/pki
  rm -rf "$dir/pids" "$dir/etcd" "$dir/pki"
  mkdir -p "$dir/logs" "$dir/pids"
  gen_pki "$pki"
  local ports etcd_port peer_port api_port kcm_port sched_port
  ports=$("$(dirname "$0")/ports.sh" 5) || die "no ports for the control plane"
  read -r etcd_port peer_port api_port kcm_port sched_port <<< "$(echo $ports)"
  spawn "$dir" etcd "$BIN_DIR/etcd" --name=mizzen-test --data-dir="$dir/etcd" \
    --listen-client-urls="http://127.0.0.1:$etcd_port" --advertise-client-urls="http://127.0.0.1:$etcd_port" \
    --listen-peer-urls="http://127.0.0.1:$peer_port" --initial-advertise-peer-urls="http://127.0.0.1:$peer_port" \
    --initial-cluster="mizzen-test=http://127.0.0.1:$peer_port" --unsafe-no-fsync --log-level=warn
  wait_until "$dir" etcd 30 curl -sf "http://127.0.0.1:$etcd_port/health"

  local issuer=https://kubernetes.default.svc.cluster.local
  # Pods reach the API server through the `kubernetes` Service, whose
  # endpoint is the advertised address: loopback is not a valid endpoint.
  local bind=127.0.0.1
  [ -z "$ADVERTISE" ] || bind=0.0.0.0
  spawn "$dir" kube-apiserver "$BIN_DIR/kube-apiserver" \
    --etcd-servers="http://127.0.0.1:$etcd_port" \
    --bind-address="$bind" --advertise-address="${ADVERTISE:-127.0.0.1}" --secure-port="$api_port" \
    --kubelet-preferred-address-types=InternalIP,Hostname \
    --cert-dir="$pki" --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
    --client-ca-file="$pki/ca.crt" \
    --service-account-issuer="$issuer" --api-audiences="$issuer" \
    --service-account-key-file="$pki/sa.pub" --service-account-signing-key-file="$pki/sa.key" \
    --service-cluster-ip-range=10.0.0.0/24 \
    --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
    --allow-privileged=true --profiling=false --v=1
  write_kubeconfig "$dir" "$api_port"
  wait_until "$dir" kube-apiserver 90 curl -sf --cacert "$pki/ca.crt" --cert "$pki/admin.crt" \
    --key "$pki/admin.key" "https://127.0.0.1:$api_port/readyz"

  spawn "$dir" kube-controller-manager "$BIN_DIR/kube-controller-manager" \
    --kubeconfig="$dir/kubeconfig" --authentication-kubeconfig="$dir/kubeconfig" \
    --authorization-kubeconfig="$dir/kubeconfig" \
    --bind-address=127.0.0.1 --secure-port="$kcm_port" --leader-elect=false \
    --root-ca-file="$pki/ca.crt" --service-account-private-key-file="$pki/sa.key" \
    --service-cluster-ip-range=10.0.0.0/24 --cluster-name=mizzen-test \
    --cluster-signing-cert-file="$pki/ca.crt" --cluster-signing-key-file="$pki/ca.key" \
    --profiling=false --v=1
  spawn "$dir" kube-scheduler "$BIN_DIR/kube-scheduler" \
    --kubeconfig="$dir/kubeconfig" --authentication-kubeconfig="$dir/kubeconfig" \
    --authorization-kubeconfig="$dir/kubeconfig" \
    --bind-address=127.0.0.1 --secure-port="$sched_port" --leader-elect=false --profiling=false --v=1

  # The controller manager is working once it has made the default ServiceAccount.
  wait_until "$dir" "the default ServiceAccount" 60 \
    "$BIN_DIR/kubectl" --kubeconfig="$dir/kubeconfig" get serviceaccount default -n default
  wait_until "$dir" kube-scheduler 30 curl -skf "https://127.0.0.1:$sched_port/healthz"

  cat > "$dir/env" <<ENV
KUBECONFIG=$dir/kubeconfig
MIZZEN_KUBE_BIN=$BIN_DIR
MIZZEN_API_PORT=$api_port
MIZZEN_ETCD_PORT=$etcd_port
MIZZEN_API_ADVERTISE=$ADVERTISE
ENV
  log "control plane $K8S_VERSION up in $((SECONDS - t0)) s: export KUBECONFIG=$dir/kubeconfig"
}

cmd_start() {
  local dir=${1:?usage: kube.sh start DIR}
  installed || die "the control plane is not installed: run scripts/kube.sh install first"
  need openssl "apt-get install openssl"
  need ss "apt-get install iproute2"
  need curl "apt-get install curl"
  need flock "apt-get install util-linux"
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  local n attempt
  for n in etcd kube-apiserver kube-controller-manager kube-scheduler; do
    alive "$dir" "$n" && die "$n is already running for $dir: run scripts/kube.sh stop $dir first"
  done
  # The ports come from outside the kernel's ephemeral range, so nothing
  # but a foreign server can hold one; if one did, try other ports.
  for attempt in 1 2 3; do
    "$0" start-once "$dir" && return 0
    cmd_stop "$dir"
    grep -qs 'address already in use' "$dir"/logs/*.log ||
      die "the control plane did not start (logs in $dir/logs)"
    log "a port was taken (address already in use): starting again on other ports (attempt $((attempt + 1)) of 3)"
    rm -f "$dir"/logs/*.log
  done
  die "the control plane did not start: its ports were taken three times (logs in $dir/logs)"
}


cmd_stop() {
  local dir=${1:?usage: kube.sh stop DIR}
  [ -d "$dir/pids" ] || { log "nothing running in $dir"; return 0; }
  dir=$(cd "$dir" && pwd)
  # Clients of the API server first, the API server, then its storage.
  stop_group "$dir" kube-scheduler kube-controller-manager
  stop_group "$dir" kube-apiserver
  stop_group "$dir" etcd
  log "stopped the control plane in $dir"
}

case "${1:-}" in
  install) cmd_install ;;
  install-node) cmd_install_node ;;
  client) shift; cmd_client "$@" ;;
  cert) shift; cmd_cert "$@" ;;
  node-bin) echo "$NODE_BIN_DIR" ;;
  gateway-api) cmd_gateway_api ;;
  start) shift; cmd_start "$@" ;;
  start-once) shift; start_once "$@" ;;
  stop) shift; cmd_stop "$@" ;;
  bin) echo "$BIN_DIR" ;;
  *) die "usage: $0 install|install-node|start DIR|stop DIR|client DIR NAME SUBJECT|cert DIR NAME SUBJECT EXT|bin|node-bin" ;;
esac
