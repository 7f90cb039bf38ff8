#!/usr/bin/env bash
# Builds Mizzen's container images as OCI image archives, without a
# container engine or a registry, from the release binaries.
#
#   scripts/images.sh [--node] [--prebuilt] [OUT]
#                             build (cargo, release) and package every image
#                             into OUT (default: $MIZZEN_IMAGES, else
#                             <cargo target dir>/images); --node adds the real
#                             test node's pause and CoreDNS images;
#                             --prebuilt packages the release binaries as
#                             they are, without running cargo
#
# For each image OUT holds <name>.tar (an OCI image layout in a tar archive,
# which `ctr images import`, `skopeo copy oci-archive:...` and `podman load`
# read) and <name>.digest (its manifest digest); OUT/images.txt lists
# "<archive> <reference> <digest>" for all of them. An archive's index names
# its tag only: give the repository when importing or copying, e.g.
#   ctr -n k8s.io images import --base-name ghcr.io/mizzen-mesh/mizzen-ca mizzen-ca.tar
#   skopeo copy oci-archive:mizzen-ca.tar docker://REGISTRY/mizzen-ca:0.1.0
#
# Images: mizzen-proxy (also the injected init container: iptables with both
# the nft and legacy backends, and iproute2's `ip`), mizzen-ca,
# mizzen-agent, mizzen-injector, and mizzen-testapp (the sample app of
# manifests/examples). Each is one layer: the binary, the shared libraries
# `ldd` names for it, /etc/passwd and /etc/group. References are
# $MIZZEN_IMAGE_REPO/<name>:<version> (default ghcr.io/mizzen-mesh, the
# version of Cargo.toml), as manifests/ name them.
#
# Reproducible: every file's time is $SOURCE_DATE_EPOCH (default 0) and
# the image's creation time too, so the same binaries give the same digests;
# and the binaries are built with their paths remapped, so the same commit
# gives the same binaries wherever it is checked out (with the same Rust
# toolchain and Cargo.lock).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[images.sh] %s\n' "$*" >&2; }
die() { printf '[images.sh] error: %s\n' "$*" >&2; exit 1; }

for t in umoci ldd tar; do
  command -v "$t" >/dev/null 2>&1 || die "$t is needed: run scripts/deps.sh (apt-get install umoci)"
done

node=0 build=1
while [ $# -gt 0 ]; do
  case $1 in
    --node) node=1; shift ;;
    --prebuilt) build=0; shift ;;
    -*) die "unknown option $1 (usage: scripts/images.sh [--node] [--prebuilt] [OUT])" ;;
    *) break ;;
  esac
done
TARGET="${CARGO_TARGET_DIR:-$PWD/target}"
OUT="${1:-${MIZZEN_IMAGES:-$TARGET/images}}"
REPO="${MIZZEN_IMAGE_REPO:-ghcr.io/mizzen-mesh}"
VERSION=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)
[ -n "$VERSION" ] || die "no version in Cargo.toml's [workspace.package]"
EPOCH="${SOURCE_DATE_EPOCH:-0}"
CREATED=$(date -u -d "@$EPOCH" +%Y-%m-%dT%H:%M:%SZ)
BIN=/usr/local/bin

COMPONENTS=(mizzen-proxy mizzen-agent mizzen-ca mizzen-injector mizzen-testapp)
if [ "$build" = 1 ]; then
  log "building the release binaries"
  # Binaries name their source files (panic locations, generated code in
  # the target directory); written relative to fixed prefixes, the same
  # commit gives the same binaries in any checkout and target directory.
  RUSTFLAGS="${RUSTFLAGS:-} --remap-path-prefix=$PWD=/mizzen --remap-path-prefix=$TARGET=/target"
  RUSTFLAGS+=" --remap-path-prefix=${CARGO_HOME:-$HOME/.cargo}=/cargo"
  export RUSTFLAGS
  cargo build --release --locked -p mizzen-proxy -p mizzen-agent -p mizzen-ca -p mizzen-injector -p mizzen-tests \
    "${COMPONENTS[@]/#/--bin=}"
fi
for c in "${COMPONENTS[@]}"; do
  [ -x "$TARGET/release/$c" ] || die "$TARGET/release/$c is missing: run scripts/images.sh without --prebuilt"
done

work=$(mktemp -d "${TMPDIR:-/tmp}/mizzen-images.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$OUT"

# add_file ROOT PATH: copy PATH (following links) to the same path under ROOT.
add_file() {
  local root=$1 path=$2
  mkdir -p "$root$(dirname "$path")"
  cp -L "$path" "$root$path"
}

# add_libs ROOT PATH: every shared library PATH loads, at its own path.
add_libs() {
  local root=$1 path=$2 lib
  # `ldd` prints "name => /path (addr)" and "/lib64/ld-linux... (addr)".
  for lib in $(ldd "$path" 2>/dev/null | grep -oE '/[^ ]+' || true); do
    [ -e "$root$lib" ] || add_file "$root" "$lib"
  done
}

# add_with_libs ROOT PATH...: each PATH and the libraries it loads.
add_with_libs() {
  local root=$1 path; shift
  for path in "$@"; do
    add_file "$root" "$path"
    add_libs "$root" "$path"
  done
}

# base_root ROOT: the files every image has.
base_root() {
  local root=$1
  mkdir -p "$root/etc" "$root/tmp" "$root$BIN"
  chmod 1777 "$root/tmp"
  printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' \
    'mizzen-proxy:x:1337:1337:mizzen-proxy:/:/sbin/nologin' \
    'nonroot:x:65532:65532:nonroot:/:/sbin/nologin' > "$root/etc/passwd"
  printf '%s\n' 'root:x:0:' 'mizzen-proxy:x:1337:' 'nonroot:x:65532:' > "$root/etc/group"
  printf 'hosts: files dns\n' > "$root/etc/nsswitch.conf"
}

# proxy_extras ROOT: what `mizzen-proxy init` runs: iptables(-restore/-save)
# for IPv4 and IPv6 on both backends (nft is the default, as on current
# distributions; the legacy names select the other), and `ip`.
proxy_extras() {
  local root=$1 multi name ext
  add_with_libs "$root" /usr/sbin/xtables-nft-multi /usr/sbin/xtables-legacy-multi "$(readlink -f /sbin/ip)"
  mkdir -p "$root/usr/sbin"
  for name in iptables iptables-restore iptables-save ip6tables ip6tables-restore ip6tables-save; do
    ln -sf xtables-nft-multi "$root/usr/sbin/$name"
    ln -sf xtables-nft-multi "$root/usr/sbin/${name/tables/tables-nft}"
    ln -sf xtables-legacy-multi "$root/usr/sbin/${name/tables/tables-legacy}"
  done
  ln -sf "$(readlink -f /sbin/ip)" "$root/usr/sbin/ip"
  # Match and target extensions are loaded at run time.
  for ext in /usr/lib/x86_64-linux-gnu/xtables/*.so; do add_with_libs "$root" "$ext"; done
  for multi in xtables-nft-multi xtables-legacy-multi; do
    [ -x "$root/usr/sbin/$multi" ] || die "$multi missing from the proxy image: apt-get install iptables"
  done
}

# image NAME REF USER BINARY [ARG...]: an image REF (archive OUT/NAME.tar)
# whose entrypoint is BINARY (installed in $BIN) with ARGs.
image() {
  local name=$1 ref=$2 user=$3 binary=$4; shift 4
  local root="$work/$name/rootfs" layout="$work/$name/layout" tag=${ref##*:} digest arg
  local entry=(--config.entrypoint "$BIN/$(basename "$binary")")
  for arg in "$@"; do entry+=(--config.entrypoint "$arg"); done
  base_root "$root"
  cp "$binary" "$root$BIN/"
  add_libs "$root" "$binary"
  if [ "$name" = mizzen-proxy ]; then proxy_extras "$root"; fi
  find "$root" -exec touch -h -d "@$EPOCH" {} +

  umoci init --layout "$layout"
  umoci new --image "$layout:$tag"
  umoci insert --image "$layout:$tag" --history.created "$CREATED" \
    --history.created_by "scripts/images.sh" "$root" /
  umoci config --image "$layout:$tag" --no-history --created "$CREATED" \
    "${entry[@]}" --config.user "$user" \
    --config.env "PATH=$BIN:/usr/sbin:/usr/bin:/sbin:/bin" \
    --config.label "org.opencontainers.image.version=$tag" \
    --config.label "org.opencontainers.image.title=$name"
  umoci gc --layout "$layout"
  digest=$(sed -n 's/.*"digest":"\(sha256:[0-9a-f]*\)".*/\1/p' "$layout/index.json")
  [ -n "$digest" ] || die "no manifest digest in $layout/index.json"
  find "$layout" -exec touch -h -d "@$EPOCH" {} +
  tar --sort=name --mtime="@$EPOCH" --owner=0 --group=0 --numeric-owner -C "$layout" -cf "$OUT/$name.tar.tmp" .
  mv "$OUT/$name.tar.tmp" "$OUT/$name.tar"
  echo "$digest" > "$OUT/$name.digest"
  echo "$name.tar $ref $digest" >> "$work/images.txt"
  log "$ref $digest ($(du -h "$OUT/$name.tar" | cut -f1))"
}

for spec in mizzen-proxy:1337 mizzen-ca:65532 mizzen-agent:0 mizzen-injector:65532 mizzen-testapp:65532; do
  name=${spec%%:*} uid=${spec#*:}
  image "$name" "$REPO/$name:$VERSION" "$uid:$uid" "$TARGET/release/$name"
done
if [ "$node" = 1 ]; then
  # The real test node's own images (scripts/node.sh): its pod sandbox (the
  # test app doing nothing until SIGTERM) and CoreDNS.
  coredns="$(scripts/kube.sh node-bin)/coredns"
  [ -x "$coredns" ] || die "CoreDNS is not built: run scripts/kube.sh install-node"
  image node-pause localhost/mizzen-node/pause:1 65535:65535 "$TARGET/release/mizzen-testapp" idle
  image node-coredns localhost/mizzen-node/coredns:1 0:0 "$coredns"
fi
mv "$work/images.txt" "$OUT/images.txt"
log "images in $OUT (import: scripts/node.sh import, or see README \"Installing on a cluster\")"
