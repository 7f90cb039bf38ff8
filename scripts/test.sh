#!/usr/bin/env bash
# Runs all of Mizzen's tests against real parts: installs the system tools
# and the pinned Kubernetes control plane they need, then `cargo test` for
# the whole workspace. Extra arguments go to `cargo test`.
#
#   scripts/test.sh [CARGO TEST ARGS...]             run the suite once
#   scripts/test.sh --repeat N [CARGO TEST ARGS...]  run it N times (to hunt
#       flakes): each run's output goes to $TMPDIR/mizzen-test-runs/run-K.log
#       and a summary names every failed test of every run
set -euo pipefail
cd "$(dirname "$0")/.."

repeat=0
if [ "${1:-}" = --repeat ]; then
  [[ "${2:-}" =~ ^[1-9][0-9]*$ ]] || { echo "usage: $0 --repeat N [cargo test args]" >&2; exit 2; }
  repeat=$2
  shift 2
fi

scripts/deps.sh
scripts/kube.sh install
scripts/kube.sh install-node

# Control planes of earlier runs whose processes are gone leave only logs.
for d in "${TMPDIR:-/tmp}"/mizzen-cluster-* "${TMPDIR:-/tmp}"/mizzen-real-node-*; do
  if [ -d "$d" ] && ! ls "$d/pids/"* >/dev/null 2>&1; then rm -rf "$d"; fi
done

# End-to-end tests run the components' real binaries; the proxy and
# discovery benchmarks measure the release builds of the proxy and agent,
# which are also what the images the real node runs (tests/tests/real_node.rs)
# are made of.
cargo build --workspace --bins --locked
export MIZZEN_IMAGES="${MIZZEN_IMAGES:-${CARGO_TARGET_DIR:-$PWD/target}/images}"
scripts/images.sh --node

# Each test binary's fixtures are torn down by a helper after it exits; wait
# for them so that nothing is left running when a run ends.
wait_for_teardown() {
  for _ in $(seq 1 120); do
    pgrep -f mizzen-reaper >/dev/null || break
    sleep 0.5
  done
}

if [ "$repeat" = 0 ]; then
  rc=0
  cargo test --workspace --locked --no-fail-fast "$@" || rc=$?
  wait_for_teardown
  exit $rc
fi

logs="${TMPDIR:-/tmp}/mizzen-test-runs"
mkdir -p "$logs"
summary=()
failed_runs=0
for k in $(seq 1 "$repeat"); do
  t0=$SECONDS rc=0
  cargo test --workspace --locked --no-fail-fast "$@" > "$logs/run-$k.log" 2>&1 || rc=$?
  wait_for_teardown
  passed=$(awk '/^test result:/ { s += $4 } END { print s + 0 }' "$logs/run-$k.log")
  line="run $k: exit $rc, $passed passed, $((SECONDS - t0)) s"
  if [ "$rc" != 0 ]; then
    failed_runs=$((failed_runs + 1))
    # `test NAME ... FAILED` lines; a binary that died without them is named by cargo's error.
    fails=$(grep -E '^test .* \.\.\. FAILED$' "$logs/run-$k.log" | sed -E 's/^test (.*) \.\.\. FAILED$/\1/' | tr '\n' ' ')
    [ -n "$fails" ] || fails=$(grep -E '^error: test failed' "$logs/run-$k.log" | tr '\n' ' ')
    line+=", failed: ${fails:-see the log} (log: $logs/run-$k.log)"
  fi
  echo "[test.sh] $line" >&2
  summary+=("$line")
done
printf '[test.sh] %s\n' "${summary[@]}" >&2
echo "[test.sh] $((repeat - failed_runs)) of $repeat runs passed" >&2
[ "$failed_runs" = 0 ]
