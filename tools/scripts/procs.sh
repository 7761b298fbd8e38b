# shellcheck shell=bash
# Ending processes for the benchmark scripts (compare.sh, bench-dhcp.sh): sourced, not run.

pid_alive() {
  # Alive and not a zombie.
  local st
  st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}

# Ends the given PIDs: SIGTERM, then SIGKILL after 3 s; reaps our own children.
end_pids() {
  local p alive _i
  [ $# -gt 0 ] || return 0
  for p in "$@"; do kill -TERM "$p" 2>/dev/null || true; done
  for _i in $(seq 30); do
    alive=0
    for p in "$@"; do pid_alive "$p" && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  # shellcheck disable=SC2015
  for p in "$@"; do pid_alive "$p" && kill -KILL "$p" 2>/dev/null || true; done
  for _i in $(seq 20); do
    alive=0
    for p in "$@"; do pid_alive "$p" && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for p in "$@"; do wait "$p" 2>/dev/null || true; done
}
