#!/usr/bin/env bash
# The DNS relay's rate against its upstream's own, measured in one run: dnsperf asks dnsmasq
# directly (on the NAT namespace's loopback), then from a guest through hubnat's relay, in
# alternating rounds; medians and their ratio reported.
#
#   guest ns (tap0, 192.168.30.50) ── hubnat ── NAT ns: dnsmasq on 127.0.0.1:53
#
# Usage: sudo tools/bench-dns.sh [--rounds N] [--passes P] [--outstanding Q] [--no-build]
#                                [--variants "default|--workers 1 --socket-backend mio"]
#                                [--upstream dnsmasq|testsrv] [--names numbered|mixed]
# Each measurement is dnsperf running P times through a file of 20,000 names with Q queries
# outstanding (dnsperf -n P -q Q: it waits for every answer, so "lost" is real loss; -b 4096:
# its socket holds the answers to 1,000 queries at once). "dropped by hubnat" names the reasons
# hubnat counted (none of them for "foreign" answers, late ones it no longer waits for). Variants
# are hubnat's run options, separated by `|` (`default`: none); a variant that starts with
# `bin=PATH` runs the hubnat binary at PATH (an A/B of two builds). `--upstream testsrv` answers with
# hubnat-testsrv dns-answer (a 4 MiB receive buffer: it loses nothing in a burst) instead.
# `--names numbered` (the default) asks h1.bench.test to h20000.bench.test: most queries that
# follow each other have one size, as a resolver's burst for one kind of name does, and hubnat
# relays such runs in one send each way; `--names mixed` pads each name to a random length of
# 1 to 16 more bytes, so that neighbours rarely have one size (the relay query by query).
# Every namespace and process it makes is removed when it ends, also on failure or Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

ROUNDS=3 PASSES=10 Q=100 BUILD=1 VARIANTS="default" UPSTREAM=dnsmasq NAMES=numbered
while [ $# -gt 0 ]; do
  case $1 in
    --rounds) ROUNDS=$2; shift 2 ;;
    --passes) PASSES=$2; shift 2 ;;
    --outstanding) Q=$2; shift 2 ;;
    --variants) VARIANTS=$2; shift 2 ;;
    --upstream) UPSTREAM=$2; shift 2 ;;
    --names) NAMES=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "needs root (network namespaces)" >&2; exit 1; }
for t in ip dnsperf; do command -v $t >/dev/null || { echo "needs $t (apt-get install dnsperf)" >&2; exit 1; }; done
[ "$UPSTREAM" = testsrv ] || command -v dnsmasq >/dev/null || { echo "needs dnsmasq (apt-get install dnsmasq-base)" >&2; exit 1; }

if [ "$BUILD" = 1 ]; then cargo build --release -q -p hubnat-tools --bin hubnat --bin hubnat-testsrv; fi
HUBNAT=$ROOT/target/release/hubnat

TAG=hbd$$
NAT=${TAG}n GUEST=${TAG}g
WORK=$(mktemp -d /tmp/hubnat-bench-dns.XXXXXX)
PIDS=()

cleanup() {
  set +e
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null; done
  for ns in $GUEST $NAT; do
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$p" 2>/dev/null; done
    ip netns del "$ns" 2>/dev/null
    rm -rf "/etc/netns/$ns"
  done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

for ns in $NAT $GUEST; do
  ip netns add "$ns"
  mkdir -p "/etc/netns/$ns"; : > "/etc/netns/$ns/resolv.conf"
  ip -n "$ns" link set lo up
done
case $NAMES in
  numbered) for i in $(seq 1 20000); do echo "h$i.bench.test A"; done > "$WORK/queries" ;;
  mixed) awk 'BEGIN { srand(7); for (i = 1; i <= 20000; i++) {
           pad = ""; for (k = int(rand() * 16); k >= 0; k--) pad = pad "x"
           printf "h%d%s.bench.test A\n", i, pad } }' > "$WORK/queries" ;;
  *) echo "--names: numbered or mixed" >&2; exit 2 ;;
esac
if [ "$UPSTREAM" = testsrv ]; then
  ip netns exec $NAT "$ROOT/target/release/hubnat-testsrv" dns-answer --listen 127.0.0.1:53 \
    2> "$WORK/upstream.log" &
else
  ip netns exec $NAT dnsmasq -k --no-resolv --no-hosts --listen-address=127.0.0.1 --bind-interfaces \
    --address=/bench.test/10.9.9.9 --log-facility=- --pid-file="$WORK/dnsmasq.pid" \
    2> "$WORK/upstream.log" &
fi
PIDS+=($!)
sleep 0.5
printf '[dns]\nupstream = ["127.0.0.1:53"]\n' > "$WORK/hubnat.toml"

# dnsperf in namespace $1 against $2: prints "rate lost".
perf_run() {
  ip netns exec "$1" dnsperf -s "$2" -d "$WORK/queries" -n "$PASSES" -q "$Q" -b 4096 > "$WORK/dnsperf.out" 2>&1
  awk '/Queries per second/ {r=$4} /Queries lost/ {l=$3} END {printf "%.0f %d\n", r, l}' "$WORK/dnsperf.out"
}

# Starts hubnat with options $1, measures through it; prints "rate lost relay-drops
# cpu-us-per-query".
through() {
  local opts=() pid bin=$HUBNAT
  [ "$1" = default ] || read -r -a opts <<< "$1"
  if [[ "${opts[0]:-}" == bin=* ]]; then bin=${opts[0]#bin=}; opts=("${opts[@]:1}"); fi
  ip netns exec $NAT "$bin" run --tap tap0 --netns /run/netns/$GUEST --config "$WORK/hubnat.toml" \
    --state-dir "$WORK/state" --control "$WORK/ctl.sock" --log warn "${opts[@]}" \
    > "$WORK/hubnat.log" 2>&1 &
  pid=$!; PIDS+=("$pid")
  for _ in $(seq 50); do ip -n $GUEST link show tap0 >/dev/null 2>&1 && break; sleep 0.1; done
  ip -n $GUEST addr add 192.168.30.50/24 dev tap0
  ip -n $GUEST link set tap0 up
  for _ in $(seq 50); do ip netns exec $GUEST ping -c1 -W1 192.168.30.1 >/dev/null 2>&1 && break; done
  local t0 t1; t0=$(cpu_ticks "$pid")
  local r; r=$(perf_run $GUEST 192.168.30.1)
  t1=$(cpu_ticks "$pid")
  local drops
  drops=$(ip netns exec $NAT "$HUBNAT" --control "$WORK/ctl.sock" status --json |
    python3 -c 'import json,sys; d=json.load(sys.stdin)["drops"]; print(",".join(f"{k}={v}" for k,v in sorted(d.items()) if v and k!="foreign") or 0)')
  kill "$pid"; wait "$pid" 2>/dev/null || true
  rm -rf "$WORK/state"
  # hubnat's CPU time (user and system, all threads) per query relayed, in microseconds.
  echo "$r $drops $(awk -v t="$((t1 - t0))" -v hz="$(getconf CLK_TCK)" -v n="$((20000 * PASSES))" \
    'BEGIN {printf "%.2f", t * 1e6 / hz / n}')"
}

# User and system clock ticks process $1 used so far.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

IFS='|' read -r -a VARS <<< "$VARIANTS"
echo "# $(nproc) cores, $(uname -r), dnsperf -n $PASSES -q $Q, upstream $UPSTREAM, names $NAMES, $ROUNDS rounds"
declare -A RATE LOST DROPS CPU
for round in $(seq "$ROUNDS"); do
  read -r rate lost < <(perf_run $NAT 127.0.0.1)
  RATE[direct]+="$rate "; LOST[direct]+="$lost "
  echo "round $round: direct $rate/s, $lost lost"
  for v in "${VARS[@]}"; do
    read -r rate lost drops cpu < <(through "$v")
    RATE[$v]+="$rate "; LOST[$v]+="$lost "; DROPS[$v]+="$drops "; CPU[$v]+="$cpu "
    echo "round $round: [$v] $rate/s, $lost lost, $drops dropped by hubnat, $cpu µs CPU per query"
  done
done
direct=$(tr ' ' '\n' <<< "${RATE[direct]}" | grep . | median)
echo
echo "| path | queries/s (median) | of direct | hubnat µs CPU per query (median) | lost per run | dropped by hubnat |"
echo "| --- | --- | --- | --- | --- | --- |"
echo "| direct to the upstream | $direct | 100% | | ${LOST[direct]% } | |"
for v in "${VARS[@]}"; do
  m=$(tr ' ' '\n' <<< "${RATE[$v]}" | grep . | median)
  c=$(tr ' ' '\n' <<< "${CPU[$v]}" | grep . | median)
  echo "| through hubnat [$v] | $m | $(( 100 * m / direct ))% | $c | ${LOST[$v]% } | ${DROPS[$v]% } |"
done
