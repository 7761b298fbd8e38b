#!/usr/bin/env bash
# DHCP lease rate and latency: hubnat (with its lease files on this machine's disk) against
# SoftEther's SecureNAT (which keeps no lease file), in one run.
#
# Each system gets a namespace of its own for the server and one for the clients:
#   hubnat     `hubnat run --tap tap0 --netns GUEST` in the server's namespace; the clients on
#              tap0 in the guest's namespace; its state directory (leases.json,
#              leases.journal) in this run's work directory
#   hubnat-base  the same with another hubnat binary (--base-bin: e.g. a build of an older
#              commit, for an A/B in one run)
#   softether  vpnserver in the server's namespace (private copies of its state directories),
#              bridged to a veth whose peer is the clients' eth0; SecureNAT in user mode
# The clients are `hubnat-load dhcp` on a raw socket: a serial phase (one DISCOVER→OFFER,
# REQUEST→ACK exchange after another, each timed) and a concurrent one (N exchanges
# outstanding); every client releases its lease after the ACK, so each exchange is a new
# binding. Nothing leaves the namespaces this script makes; they and every process it started
# are removed at exit, also on failure or interruption.
#
# Usage: sudo tools/bench-dhcp.sh [options]   (run from the repository)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=tools/scripts/procs.sh
. "$ROOT/tools/scripts/procs.sh"
# shellcheck source=tools/scripts/softether.sh
. "$ROOT/tools/scripts/softether.sh"
SYSTEMS=hubnat,softether
ROUNDS=3
CLIENTS=150
OUTSTANDING=32
SERIAL=1000
EXCHANGES=3000
PROFILE=release
BUILD=1
KEEP=0
JSON_OUT=""
BASE_HUBNAT=""

usage() {
  cat <<EOF
Usage: sudo tools/bench-dhcp.sh [options]
  --systems LIST     comma-separated, any of hubnat,hubnat-base,softether (default: $SYSTEMS)
  --base-bin PATH    the hubnat binary of hubnat-base
  --rounds N         rounds, systems alternated in each (default: $ROUNDS)
  --clients N        DHCP clients, one MAC each (default: $CLIENTS)
  --outstanding N    exchanges outstanding in the concurrent phase (default: $OUTSTANDING)
  --serial N         timed serial exchanges (default: $SERIAL)
  --exchanges N      exchanges in the concurrent phase (default: $EXCHANGES)
  --profile P        cargo profile of the binaries (default: $PROFILE)
  --no-build         use the binaries already built
  --json FILE        also write every round's results, one JSON object a line
  --keep             keep the work directory (logs, lease files)
EOF
}

while [ $# -gt 0 ]; do
  case "$1" in
    --systems) SYSTEMS=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --clients) CLIENTS=$2; shift 2 ;;
    --outstanding) OUTSTANDING=$2; shift 2 ;;
    --serial) SERIAL=$2; shift 2 ;;
    --exchanges) EXCHANGES=$2; shift 2 ;;
    --profile) PROFILE=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --json) JSON_OUT=$2; shift 2 ;;
    --base-bin) BASE_HUBNAT=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done

log() { printf '[bench-dhcp %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (network namespaces)"
for c in ip jq timeout awk; do command -v "$c" >/dev/null || die "needs $c"; done
for n in "$ROUNDS" "$CLIENTS" "$OUTSTANDING" "$SERIAL" "$EXCHANGES"; do
  if ! [[ "$n" =~ ^[0-9]+$ ]] || [ "$n" -lt 1 ]; then die "counts are whole numbers, 1 or more"; fi
done

# ---------------------------------------------------------------------------------------------
# Everything made is recorded here, and cleanup() removes it.

WORK=$(mktemp -d /tmp/hubnat-bench-dhcp.XXXXXX)
chmod 755 "$WORK"
TAG="bd$(( $$ % 10000 ))"
SEQ=0
NETNS=()
PIDS=()

# The processes started, and whatever still runs in the namespaces made (vpnserver forks).
teardown() {
  local ns p all=()
  set +e
  all=("${PIDS[@]}")
  for ns in "${NETNS[@]}"; do
    for p in $(ip netns pids "$ns" 2>/dev/null); do all+=("$p"); done
  done
  end_pids "${all[@]}"
  for ns in "${NETNS[@]}"; do
    ip netns del "$ns" 2>/dev/null
    rm -rf "/etc/netns/$ns"
  done
  NETNS=(); PIDS=()
  set -e
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  teardown
  if [ "$KEEP" = 1 ]; then log "work directory kept: $WORK"; else rm -rf "$WORK"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mkns() {
  local ns="${TAG}$1$SEQ"
  ip netns add "$ns"
  NETNS+=("$ns")
  mkdir -p "/etc/netns/$ns"
  : > "/etc/netns/$ns/resolv.conf"
  ip -n "$ns" link set lo up
  MKNS=$ns
}

wait_for() { # seconds command...
  local t=$1 _i; shift
  for _i in $(seq $((t * 10))); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  return 1
}

first_line() { head -n 1 "$1" 2>/dev/null | cut -c1-200; }

# ---------------------------------------------------------------------------------------------
# Binaries

BIN="$ROOT/target/$PROFILE"
[ "$PROFILE" = dev ] && BIN="$ROOT/target/debug"
if [ "$BUILD" = 1 ]; then
  log "building hubnat and hubnat-load (profile $PROFILE)"
  (cd "$ROOT" && cargo build -q --profile "$PROFILE" -p hubnat-tools --bin hubnat --bin hubnat-load) ||
    die "build failed"
fi
HUBNAT="$BIN/hubnat"
LOAD="$BIN/hubnat-load"
for b in "$HUBNAT" "$LOAD"; do [ -x "$b" ] || die "missing $b (build it, or drop --no-build)"; done

# ---------------------------------------------------------------------------------------------
# Systems: each leaves the clients' interface in $IFACE and the guest's namespace in $GUEST_NS.

setup_hubnat() { start_hubnat "$HUBNAT"; }
setup_hubnat-base() { start_hubnat "$BASE_HUBNAT"; }

start_hubnat() { # binary
  mkns n; NAT_NS=$MKNS
  mkns g; GUEST_NS=$MKNS
  cat > "$IDIR/hubnat.toml" <<EOF
[dhcp]
lease = 7200
EOF
  # shellcheck disable=SC2086 # HUBNAT_RUN_ARGS: words on purpose
  ip netns exec "$NAT_NS" "$1" --control "$IDIR/hubnat.ctl" run --tap tap0 \
    --netns "/run/netns/$GUEST_NS" --config "$IDIR/hubnat.toml" \
    --state-dir "$IDIR/hubnat-state" --log warn ${HUBNAT_RUN_ARGS:-} > "$IDIR/hubnat.log" 2>&1 &
  PIDS+=($!)
  wait_for 10 ip -n "$GUEST_NS" link show tap0 ||
    { echo "hubnat did not make tap0: $(first_line "$IDIR/hubnat.log")"; return 1; }
  ip -n "$GUEST_NS" link set tap0 up
  IFACE=tap0
}

setup_softether() {
  if ! command -v vpncmd >/dev/null || [ ! -x /usr/libexec/softether/vpnserver/vpnserver ]; then
    echo "SoftEther's vpnserver and vpncmd are not installed"; return 1
  fi
  mkns n; NAT_NS=$MKNS
  mkns g; GUEST_NS=$MKNS
  local v="${TAG}v$SEQ"
  ip link add "$v" netns "$NAT_NS" type veth peer name eth0 netns "$GUEST_NS" || return 1
  ip -n "$NAT_NS" link set "$v" up
  ip -n "$GUEST_NS" link set eth0 up
  softether_start "$NAT_NS" "$v" "$IDIR/softether" 1500 || return 1
  IFACE=eth0
}

# ---------------------------------------------------------------------------------------------
# Runs

RESULTS="$WORK/results.jsonl"
: > "$RESULTS"

run_one() { # system round
  local s=$1 r=$2 out
  SEQ=$((SEQ + 1))
  IDIR="$WORK/$s-$r"
  mkdir -p "$IDIR"
  # Not in a subshell: the namespaces and processes it makes are recorded for the teardown.
  if ! "setup_$s" > "$IDIR/setup.log" 2>&1; then
    log "$s round $r: setup failed: $(tail -n 3 "$IDIR/setup.log" | tr '\n' ' ')"
    teardown
    return 1
  fi
  # The first exchanges also wait for the server to come up (SecureNAT's DHCP starts a moment
  # after SecureNatEnable): the untimed warm-up of hubnat-load absorbs it.
  if out=$(timeout 300 ip netns exec "$GUEST_NS" "$LOAD" dhcp --iface "$IFACE" \
      --clients "$CLIENTS" --outstanding "$OUTSTANDING" --serial "$SERIAL" \
      --exchanges "$EXCHANGES" --json 2> "$IDIR/load.err"); then
    jq -c --arg s "$s" --argjson r "$r" '. + {system: $s, round: $r}' <<< "$out" >> "$RESULTS"
    log "$s round $r: $(jq -r '"serial p50 \(.serial.p50_us) µs p99 \(.serial.p99_us) µs; concurrent \(.concurrent.leases_per_sec | floor) leases/s"' <<< "$out")"
  else
    log "$s round $r: hubnat-load failed: $(tail -n 1 "$IDIR/load.err")"
  fi
  if [ "$s" != softether ]; then
    grep -E "ERROR|lease" "$IDIR/hubnat.log" | head -n 3 >&2 || true
    ls -l "$IDIR/hubnat-state" >> "$IDIR/state.txt" 2>&1 || true
  fi
  teardown
}

IFS=, read -r -a SYS <<< "$SYSTEMS"
for s in "${SYS[@]}"; do
  case "$s" in
    hubnat|softether) ;;
    hubnat-base) [ -x "$BASE_HUBNAT" ] || die "hubnat-base needs --base-bin PATH" ;;
    *) die "unknown system $s" ;;
  esac
done
log "work directory $WORK; $ROUNDS round(s) of ${SYS[*]}"
for r in $(seq "$ROUNDS"); do
  for s in "${SYS[@]}"; do run_one "$s" "$r" || true; done
done
[ -n "$JSON_OUT" ] && cp "$RESULTS" "$JSON_OUT"

# ---------------------------------------------------------------------------------------------
# Report: medians over the rounds, and each figure's ratio to SecureNAT's.

median() { # system jq-path
  jq -s --arg s "$1" "[.[] | select(.system == \$s) | $2] | sort |
    if length == 0 then null else .[(length - 1) / 2 | floor] end" "$RESULTS"
}

echo "# $(nproc) cores, $(uname -r), $(date -u +%Y-%m-%dT%H:%M:%SZ); hubnat $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?') (working tree), SoftEther $(dpkg-query -W -f '${Version}' softether-vpnserver 2>/dev/null || echo '?')"
echo "# $CLIENTS clients, serial $SERIAL exchanges, concurrent $EXCHANGES exchanges with $OUTSTANDING outstanding; medians of $ROUNDS round(s)"
header="| figure |"
for s in "${SYS[@]}"; do header+=" $s |"; done
echo "$header"
printf '|---%s|\n' "$(for _ in "${SYS[@]}"; do printf '|---:'; done)"
for f in "serial exchange p50 (µs)|.serial.p50_us" "serial exchange p99 (µs)|.serial.p99_us" \
         "concurrent exchange p50 (µs)|.concurrent.p50_us" "leases/s, $OUTSTANDING outstanding|.concurrent.leases_per_sec"; do
  name=${f%%|*}; path=${f#*|}
  base=$(median softether "$path")
  row="| $name |"
  for s in "${SYS[@]}"; do
    v=$(median "$s" "$path")
    if [ "$v" = null ]; then row+=" — |"; continue; fi
    cell=$(awk -v v="$v" 'BEGIN { printf (v >= 100 ? "%.0f" : "%.3g"), v }')
    if [ "$s" != softether ] && [ "$base" != null ]; then
      cell+=$(awk -v v="$v" -v b="$base" 'BEGIN { printf " (%.2f×)", v / b }')
    fi
    row+=" $cell |"
  done
  echo "$row"
done
echo
echo "Every round:"
jq -r '"\(.system) round \(.round): serial p50 \(.serial.p50_us) p99 \(.serial.p99_us) µs (\(.serial.retries) retries); concurrent \(.concurrent.leases_per_sec | floor) leases/s, p50 \(.concurrent.p50_us) p99 \(.concurrent.p99_us) µs (\(.concurrent.retries) retries, \(.naks) NAKs)"' "$RESULTS"
