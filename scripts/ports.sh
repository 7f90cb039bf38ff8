#!/usr/bin/env bash
# Hands out TCP ports for the servers that tests and the local mesh start on
# this machine (control plane, Mizzen's daemons), so that none of them can
# lose its port between "it was free" and "it bound it".
#
#   scripts/ports.sh [N]    print N ports (default 1), one per line
#
# Why not "bind port 0 and let go": the kernel draws every outgoing
# connection's source port from its ephemeral range
# (net.ipv4.ip_local_port_range, 32768-60999 by default), so a port found
# free there can be taken a moment later by any connect() on the machine.
# These ports come from below that range (20000 up to 29999 or the range's
# start), where the kernel never picks a port by itself and Kubernetes'
# NodePort range (30000-32767) does not reach. Callers share one cursor
# (a file under $TMPDIR, locked with flock), so a port is handed out again
# only after the whole range has gone round, never twice to concurrent
# tests, and not to the next test binary while the previous one's servers
# are still stopping. A port some socket on the machine already uses is
# skipped.
set -euo pipefail

die() { printf '[ports.sh] error: %s\n' "$*" >&2; exit 1; }

count=${1:-1}
[[ "$count" =~ ^[1-9][0-9]{0,3}$ ]] || die "usage: $0 [N] (N from 1 to 9999, got '$count')"

read -r ephemeral_low _ < /proc/sys/net/ipv4/ip_local_port_range
low=20000
high=29999
(( ephemeral_low - 1 < high )) && high=$(( ephemeral_low - 1 ))
(( high - low >= 1000 )) || die "the kernel's ephemeral port range starts at $ephemeral_low \
(net.ipv4.ip_local_port_range); test ports need 20000-21000 outside it: raise its start to 32768"

state="${TMPDIR:-/tmp}/mizzen-ports"
exec 9>>"$state.lock"
flock -w 30 9 || die "timed out waiting for the lock $state.lock"

next=$(cat "$state" 2>/dev/null || true)
[[ "$next" =~ ^[0-9]+$ ]] && (( next >= low && next <= high )) || next=$low

# Every local port some TCP socket holds now, in any state.
declare -A taken=()
while read -r port; do taken[$port]=1; done < <(ss -Htan | awk '{ n = split($4, a, ":"); print a[n] }')

given=0
for (( tried = 0; tried <= high - low && given < count; tried++ )); do
  p=$next
  next=$(( next >= high ? low : next + 1 ))
  [ -n "${taken[$p]:-}" ] && continue
  echo "$p"
  given=$(( given + 1 ))
done
echo "$next" > "$state"
(( given == count )) || die "only $given of $count ports in $low-$high are free"
