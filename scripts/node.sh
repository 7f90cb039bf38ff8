#!/usr/bin/env bash
# A real Kubernetes node for a control plane of scripts/kube.sh: containerd
# and runc (Debian's), the CNI bridge plugin, kubelet and kube-proxy built
# from the same pinned Kubernetes release, and CoreDNS. What users deploy
# runs here as it does on any cluster.
#
#   scripts/node.sh up CPDIR      start the node for the control plane in CPDIR
#                                 (started with MIZZEN_API_ADVERTISE=<host IP>),
#                                 import the images of $MIZZEN_IMAGES (default
#                                 <cargo target dir>/images, scripts/images.sh
#                                 --node), deploy CoreDNS, wait until Ready
#   scripts/node.sh import [DIR]  import the images again (after scripts/images.sh)
#   scripts/node.sh down CPDIR    stop it, remove its pods, and put back the
#                                 host's sysctls and iptables as they were
#   scripts/node.sh ip            print the host address to advertise
#
# One node per host (its kubelet ports are fixed). State and logs live in
# CPDIR/node/; containerd's socket is /run/mizzen-node/containerd.sock, so
# `ctr -a /run/mizzen-node/containerd.sock -n k8s.io containers ls` shows
# the node's containers. Needs root.
#
# Two settings are essential on VMs whose root lacks CAP_SYS_RESOURCE:
# containerd's `restrict_oom_score_adj` (else runc cannot start any
# sandbox), and an API server advertising a non-loopback address (else the
# `kubernetes` Service has no endpoints and no pod reaches the API).
set -euo pipefail
cd "$(dirname "$0")/.."
SCRIPTS=$PWD/scripts

NODE_NAME="${MIZZEN_NODE_NAME:-mizzen-node}"
POD_CIDR=10.244.77.0/24
DNS_IP=10.0.0.10
RUN=/run/mizzen-node
SOCK=$RUN/containerd.sock
BRIDGE=mizzen0
TARGET="${CARGO_TARGET_DIR:-$PWD/target}"
IMAGES="${MIZZEN_IMAGES:-$TARGET/images}"
# What the kubelet and the CNI plugins change on the host, put back by `down`.
SYSCTLS=(vm.overcommit_memory kernel.panic kernel.panic_on_oops net.ipv4.ip_forward)
TABLES=(filter nat mangle raw)
HOST_DIRS=(/var/run/mizzen /var/lib/cni /var/lib/kubelet /var/log/containers)

log() { printf '[node.sh] %s\n' "$*" >&2; }
die() { printf '[node.sh] error: %s\n' "$*" >&2; exit 1; }
# shellcheck source=scripts/daemons.sh
. "$SCRIPTS/daemons.sh"

host_ip() {
  ip -4 route get 1.1.1.1 2>/dev/null | sed -n 's/.* src \([0-9.]*\).*/\1/p'
}

kubectl_() { "$KUBE_BIN/kubectl" --kubeconfig "$CP/kubeconfig" "$@"; }

write_configs() {
  local n=$1 ip=$2
  mkdir -p "$n/cni/net.d" "$n/containerd" "$RUN"
  cat > "$n/containerd/config.toml" <<TOML
version = 2
root = "$n/containerd/root"
state = "$RUN/state"
[grpc]
  address = "$SOCK"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/mizzen-node/pause:1"
  # Root here may lack CAP_SYS_RESOURCE: without this runc cannot give the
  # sandbox its oom_score_adj and every pod fails to start.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$n/cni/net.d"
TOML
  cat > "$n/cni/net.d/10-mizzen-node.conflist" <<JSON
{"cniVersion": "1.0.0", "name": "mizzen-node", "plugins": [
  {"type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "ipMasq": true, "hairpinMode": true,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "$POD_CIDR"}]],
            "routes": [{"dst": "0.0.0.0/0"}], "dataDir": "$n/cni/ipam"}},
  {"type": "portmap", "capabilities": {"portMappings": true}}]}
JSON
  cat > "$n/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix://$SOCK
failSwapOn: false
readOnlyPort: 0
tlsCertFile: $CP/pki/kubelet-serving.crt
tlsPrivateKeyFile: $CP/pki/kubelet-serving.key
# The test API server has no kubelet client certificate: logs and exec reach
# the kubelet anonymously (a test node; never do this on a real cluster).
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization: {mode: AlwaysAllow}
clusterDomain: cluster.local
clusterDNS: [$DNS_IP]
podLogsDir: $n/pod-logs
# Imported images cannot be pulled again: never collect them.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
YAML
  cat > "$n/kube-proxy.yaml" <<YAML
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
hostnameOverride: $NODE_NAME
clusterCIDR: $POD_CIDR
clientConnection: {kubeconfig: $CP/kube-proxy.kubeconfig}
nodePortAddresses: [primary]
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
YAML
  : "$ip"
}

# save_host N: what `down` puts back, recorded before the first start.
save_host() {
  local n=$1 s t
  [ -f "$n/host/saved" ] && return 0
  mkdir -p "$n/host"
  for s in "${SYSCTLS[@]}"; do echo "$s=$(sysctl -n "$s")"; done > "$n/host/sysctls"
  for t in iptables ip6tables; do "$t-save" > "$n/host/$t" 2>/dev/null || true; done
  # Directories the node creates outside its own (the agent's hostPath
  # socket, CNI's cache, the kubelet's device-plugins and log links).
  for d in "${HOST_DIRS[@]}"; do
    [ -e "$d" ] && touch "$n/host/had${d//\//-}"
  done
  touch "$n/host/saved"
}

restore_host() {
  local n=$1 t table line
  [ -f "$n/host/saved" ] || return 0
  while IFS= read -r line; do sysctl -qw "$line" || true; done < "$n/host/sysctls"
  for t in iptables ip6tables; do
    [ -f "$n/host/$t" ] || continue
    "$t-restore" < "$n/host/$t" || log "warning: could not restore $t rules (saved in $n/host/$t)"
    # Tables the host did not have (made by kube-proxy, the kubelet or the
    # CNI plugins) are removed, not only emptied.
    local family=ip
    [ "$t" = ip6tables ] && family=ip6
    for table in "${TABLES[@]}"; do
      grep -q "^\*$table$" "$n/host/$t" && continue
      "$t" -t "$table" -F 2>/dev/null || true
      "$t" -t "$table" -X 2>/dev/null || true
      nft delete table "$family" "$table" 2>/dev/null || true
    done
  done
  for d in "${HOST_DIRS[@]}"; do
    [ -e "$n/host/had${d//\//-}" ] || rm -rf "$d"
  done
  # Links the kubelet made to the node's pod logs, in a directory the host had.
  find /var/log/containers -maxdepth 1 -type l -lname "$n/*" -delete 2>/dev/null || true
  rm -rf "$n/host"
}

# cmd_import DIR: every image scripts/images.sh listed in DIR/images.txt.
cmd_import() {
  local dir=$1 archive ref digest listed
  [ -f "$dir/images.txt" ] || die "no images in $dir: run scripts/images.sh --node first"
  while read -r archive ref digest; do
    # The archive's index names the tag; the repository comes from the list.
    ctr -a "$SOCK" -n k8s.io images import --base-name "${ref%:*}" "$dir/$archive" >/dev/null ||
      die "ctr could not import $dir/$archive"
    # Listed first, then searched: `grep -q` in a pipe may end it early, and
    # under pipefail ctr's SIGPIPE would read as a failure.
    listed=$(ctr -a "$SOCK" -n k8s.io images ls -q)
    grep -qxF "$ref" <<< "$listed" || die "$dir/$archive did not import as $ref"
    : "$digest"
  done < "$dir/images.txt"
}

cmd_up() {
  CP=$(cd "${1:?usage: node.sh up CPDIR}" && pwd)
  local n=$CP/node ip t0=$SECONDS
  [ "$(id -u)" = 0 ] || die "a real node needs root"
  for t in containerd runc ctr umoci nft; do
    command -v "$t" >/dev/null || die "$t is missing: run scripts/deps.sh --node"
  done
  [ -x /usr/lib/cni/bridge ] || die "the CNI plugins are missing: run scripts/deps.sh --node"
  KUBE_BIN=$("$SCRIPTS/kube.sh" bin)
  NODE_BIN=$("$SCRIPTS/kube.sh" node-bin)
  [ -x "$NODE_BIN/kubelet" ] || die "kubelet is not built: run scripts/kube.sh install-node"
  ip=$(sed -n 's/^MIZZEN_API_ADVERTISE=//p' "$CP/env")
  [ -n "$ip" ] || die "the control plane in $CP advertises loopback: start it with MIZZEN_API_ADVERTISE=$(host_ip) scripts/kube.sh start $CP"
  [ -S "$SOCK" ] && die "a node is already running ($SOCK exists): scripts/node.sh down CPDIR first"
  mkdir -p "$n/logs" "$n/pids"
  save_host "$n"

  "$SCRIPTS/kube.sh" client "$CP" kubelet "/O=system:nodes/CN=system:node:$NODE_NAME"
  "$SCRIPTS/kube.sh" client "$CP" kube-proxy "/CN=system:kube-proxy"
  "$SCRIPTS/kube.sh" cert "$CP" kubelet-serving "/CN=system:node:$NODE_NAME" \
    "subjectAltName=IP:$ip,DNS:$NODE_NAME\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth"
  write_configs "$n" "$ip"

  log "starting containerd"
  spawn "$n" containerd containerd --config "$n/containerd/config.toml"
  wait_until "$n" containerd 30 ctr -a "$SOCK" version
  log "importing the images of $IMAGES"
  cmd_import "$IMAGES"

  log "starting the kubelet (node $NODE_NAME, $ip)"
  spawn "$n" kubelet "$NODE_BIN/kubelet" --config="$n/kubelet.yaml" --kubeconfig="$CP/kubelet.kubeconfig" \
    --root-dir="$n/kubelet" --hostname-override="$NODE_NAME" --node-ip="$ip" --v=1
  wait_until "$n" "node $NODE_NAME to be Ready" 60 \
    kubectl_ wait --for=condition=Ready "node/$NODE_NAME" --timeout=1s
  log "starting kube-proxy"
  spawn "$n" kube-proxy "$NODE_BIN/kube-proxy" --config="$n/kube-proxy.yaml" --v=1
  wait_until "$n" kube-proxy 30 curl -sf http://127.0.0.1:10256/healthz

  log "deploying CoreDNS"
  sed "s/@DNS_IP@/$DNS_IP/" "$SCRIPTS/node/coredns.yaml" | kubectl_ apply -f - >/dev/null
  wait_until "$n" CoreDNS 90 kubectl_ -n kube-system rollout status deployment/coredns --timeout=1s
  log "node $NODE_NAME Ready in $((SECONDS - t0)) s (logs in $n/logs; containerd socket $SOCK)"
}

cmd_down() {
  CP=$(cd "${1:?usage: node.sh down CPDIR}" && pwd)
  local n=$CP/node c m ns pid
  [ -d "$n" ] || { log "no node in $CP"; return 0; }
  NODE_BIN=$("$SCRIPTS/kube.sh" node-bin)
  stop_group "$n" kube-proxy
  [ -x "$NODE_BIN/kube-proxy" ] && "$NODE_BIN/kube-proxy" --cleanup >/dev/null 2>&1 || true
  stop_group "$n" kubelet
  # The kubelet leaves its containers running: stop them, then containerd.
  if [ -S "$SOCK" ]; then
    for c in $(ctr -a "$SOCK" -n k8s.io tasks ls -q 2>/dev/null); do
      ctr -a "$SOCK" -n k8s.io tasks kill -s SIGKILL "$c" >/dev/null 2>&1 || true
    done
    for c in $(ctr -a "$SOCK" -n k8s.io containers ls -q 2>/dev/null); do
      ctr -a "$SOCK" -n k8s.io tasks rm -f "$c" >/dev/null 2>&1 || true
      ctr -a "$SOCK" -n k8s.io containers rm "$c" >/dev/null 2>&1 || true
    done
  fi
  stop_group "$n" containerd
  for pid in $(pgrep -f "containerd-shim-runc-v2 .*-address $SOCK" || true); do kill -KILL "$pid" 2>/dev/null || true; done
  # Pod network namespaces (containerd bind-mounts them), then every mount
  # under the node's directories, deepest first.
  for ns in /var/run/netns/cni-*; do
    [ -e "$ns" ] || continue
    umount "$ns" 2>/dev/null || true
    rm -f "$ns"
  done
  for m in $(awk -v a="$n/" -v b="$RUN/" 'index($2, a) == 1 || index($2, b) == 1 { print $2 }' /proc/mounts | sort -r); do
    umount -l "$m" 2>/dev/null || true
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  restore_host "$n"
  rm -rf "$RUN" "$n"
  log "node $NODE_NAME stopped; the host's sysctls and iptables are as they were"
}

case "${1:-}" in
  up) shift; cmd_up "$@" ;;
  down) shift; cmd_down "$@" ;;
  import) shift; cmd_import "${1:-$IMAGES}" ;;
  ip) host_ip ;;
  *) die "usage: $0 up CPDIR | down CPDIR | import [DIR] | ip" ;;
esac
