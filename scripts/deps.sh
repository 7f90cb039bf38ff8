#!/usr/bin/env bash
# Installs the system tools Mizzen's tests and local runs need, when missing.
# Idempotent: does nothing when everything is present.
set -euo pipefail

log() { printf '[deps.sh] %s\n' "$*" >&2; }
die() { printf '[deps.sh] error: %s\n' "$*" >&2; exit 1; }

# command -> Debian package
declare -A PKG=(
  [ip]=iproute2 [ss]=iproute2
  [iptables]=iptables [iptables-restore]=iptables [ip6tables]=iptables
  [setpriv]=util-linux [setsid]=util-linux [nsenter]=util-linux [flock]=util-linux
  [openssl]=openssl [curl]=curl [tac]=coreutils [base64]=coreutils
  [protoc]=protobuf-compiler
  [tcpdump]=tcpdump [tshark]=tshark [unshare]=util-linux [mount]=mount
  # Images (scripts/images.sh) and the real node (scripts/node.sh).
  [umoci]=umoci [skopeo]=skopeo [containerd]=containerd [ctr]=containerd [runc]=runc [nft]=nftables
)

missing=()
for cmd in "${!PKG[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${PKG[$cmd]}")
done
# protoc's well-known types (google/protobuf/struct.proto)
[ -f /usr/include/google/protobuf/struct.proto ] || missing+=(libprotobuf-dev)
# The real node's pod network (CNI bridge, host-local, portmap).
[ -x /usr/lib/cni/bridge ] || missing+=(containernetworking-plugins)
if [ ${#missing[@]} -gt 0 ]; then
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  log "installing ${missing[*]}"
  if [ "$(id -u)" != 0 ]; then
    die "missing ${missing[*]}; install them as root: apt-get update && apt-get install -y ${missing[*]}"
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Independent clients and servers for the tests: grpcio with Envoy's published
# protos (SDS, discovery, gRPC through the mesh) and websockets (upgrades).
PY_DIR="${MIZZEN_CACHE:-$HOME/.cache/mizzen}/py"
PY_PKGS="grpcio==1.85.1 xds-protos==1.85.0 websockets==15.0.1"
if [ ! -f "$PY_DIR/.installed" ] || [ "$(cat "$PY_DIR/.installed")" != "$PY_PKGS" ]; then
  command -v python3 >/dev/null 2>&1 || die "python3 is needed for the SDS client tests: apt-get install python3 python3-venv"
  log "installing $PY_PKGS into $PY_DIR"
  rm -rf "$PY_DIR"
  python3 -m venv "$PY_DIR" || die "python3 -m venv failed: apt-get install python3-venv"
  # shellcheck disable=SC2086
  "$PY_DIR/bin/pip" install -q $PY_PKGS
  echo "$PY_PKGS" > "$PY_DIR/.installed"
fi

command -v go >/dev/null 2>&1 || die "Go >= 1.24 is needed to build the test control plane (https://go.dev/doc/install)"
command -v cargo >/dev/null 2>&1 || die "Rust (cargo) is needed: https://rustup.rs"
[ "$(id -u)" = 0 ] || log "warning: not root; network-namespace tests will fail (they need CAP_NET_ADMIN)"
log "system dependencies present"
