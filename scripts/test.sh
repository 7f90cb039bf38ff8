#!/usr/bin/env bash
# Runs all of Mizzen's tests against real parts: installs the system tools
# and the pinned Kubernetes control plane they need, then `cargo test` for
# the whole workspace. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh
scripts/kube.sh install

# Control planes of earlier runs whose processes are gone leave only logs.
for d in "${TMPDIR:-/tmp}"/mizzen-cluster-*; do
  if [ -d "$d" ] && ! ls "$d/pids/"* >/dev/null 2>&1; then rm -rf "$d"; fi
done

# End-to-end tests run the components' real binaries; the proxy benchmark
# measures the release build of the proxy.
cargo build --workspace --bins --locked
cargo build --release --locked -p mizzen-proxy

rc=0
cargo test --workspace --locked "$@" || rc=$?

# Each test binary's fixtures are torn down by a helper after it exits; wait
# for them so that nothing is left running when this script returns.
for _ in $(seq 1 120); do
  pgrep -f mizzen-reaper >/dev/null || break
  sleep 0.5
done
exit $rc
