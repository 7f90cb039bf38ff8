# Daemons of scripts/kube.sh and scripts/node.sh (sourced by both): each runs
# in its own session, its pid in DIR/pids/NAME and its output in
# DIR/logs/NAME.log. The sourcing script defines die().

# spawn DIR NAME BINARY ARGS...: start a daemon in its own session, logging to DIR/logs/NAME.log.
spawn() {
  local dir=$1 name=$2; shift 2
  setsid "$@" > "$dir/logs/$name.log" 2>&1 < /dev/null &
  echo $! > "$dir/pids/$name"
}

alive() { local pid; pid=$(cat "$1/pids/$2" 2>/dev/null) && kill -0 "$pid" 2>/dev/null; }

# wait_until DIR WHAT SECONDS CMD...: poll CMD, failing early (with its log)
# if a daemon of DIR died.
wait_until() {
  local dir=$1 what=$2 secs=$3 n; shift 3
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    for n in "$dir"/pids/*; do
      alive "$dir" "$(basename "$n")" || {
        tail -n 30 "$dir/logs/$(basename "$n").log" >&2 || true
        die "$(basename "$n") exited while waiting for $what (log: $dir/logs/$(basename "$n").log)"
      }
    done
    [ $SECONDS -lt $deadline ] || die "timed out after ${secs}s waiting for $what (logs in $dir/logs)"
    sleep 0.3
  done
}

# stop_group DIR NAME...: SIGTERM these daemons together, wait, then SIGKILL stragglers.
stop_group() {
  local dir=$1 n pid i cmdline; shift
  local pids=()
  for n in "$@"; do
    pid=$(cat "$dir/pids/$n" 2>/dev/null) || continue
    rm -f "$dir/pids/$n"
    # Only signal the process we started: its command line names DIR.
    cmdline=$(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null) || continue
    if [[ $cmdline == *"$dir"* ]]; then
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid")
    fi
  done
  for pid in "${pids[@]}"; do
    for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
}
