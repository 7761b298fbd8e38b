#!/usr/bin/env bash
# Aggregate TCP throughput through hubnat with 1 and 2 worker threads, per socket backend,
# all measured in one run (interleaved rounds; medians reported).
#
#   guest ns (tap0, 192.168.30.50) ── hubnat ── NAT ns ──veth── server ns (iperf3 -s, 10.78.0.2)
#
# Usage: sudo tools/bench-workers.sh [--rounds N] [--duration S] [--streams P] [--no-build]
#                                    [--workers "1 2 2s"] [--backends "mio uring"] [--udp LEN]
# A worker count with an `s` (2s) reads the TAP through one queue (--tap-queues single);
# without, 2 or more workers read their own queues of a multiqueue TAP (the default).
# --udp LEN: UDP instead of TCP, datagrams of LEN bytes sent as fast as iperf3 can (-u -b 0);
# the rate reported is the one the receiver got.
# Every namespace and process it makes is removed when it ends, also on failure or Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

ROUNDS=3 DURATION=10 STREAMS=8 BUILD=1 WORKERS="1 2 2s" BACKENDS="mio uring" LOAD=(-Z -l 1M)
while [ $# -gt 0 ]; do
  case $1 in
    --rounds) ROUNDS=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --streams) STREAMS=$2; shift 2 ;;
    --workers) WORKERS=$2; shift 2 ;;
    --backends) BACKENDS=$2; shift 2 ;;
    --udp) LOAD=(-u -b 0 -l "$2"); shift 2 ;;
    --no-build) BUILD=0; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "needs root (network namespaces)" >&2; exit 1; }
for t in ip iperf3 jq; do command -v $t >/dev/null || { echo "needs $t" >&2; exit 1; }; done

if [ "$BUILD" = 1 ]; then cargo build --release -q -p hubnat-tools --bin hubnat; fi
HUBNAT=$ROOT/target/release/hubnat

TAG=hbw$$
NAT=${TAG}n SRV=${TAG}s GUEST=${TAG}g
WORK=$(mktemp -d /tmp/hubnat-bench-workers.XXXXXX)
PIDS=()

cleanup() {
  set +e
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null; done
  for ns in $GUEST $NAT $SRV; do
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$p" 2>/dev/null; done
    ip netns del "$ns" 2>/dev/null
    rm -rf "/etc/netns/$ns"
  done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

for ns in $NAT $SRV $GUEST; do
  ip netns add "$ns"
  mkdir -p "/etc/netns/$ns"; : > "/etc/netns/$ns/resolv.conf"
  ip -n "$ns" link set lo up
done
ip link add ${TAG}a netns $NAT type veth peer name eth0 netns $SRV
ip -n $NAT addr add 10.78.0.1/24 dev ${TAG}a; ip -n $NAT link set ${TAG}a up
ip -n $SRV addr add 10.78.0.2/24 dev eth0; ip -n $SRV link set eth0 up
ip netns exec $SRV iperf3 -s -D -p 5201 --logfile "$WORK/iperf-server.log"
sleep 0.5

printf '[nat]\nmax_sessions_per_guest = 20000\n[dns]\nupstream = ["10.78.0.2"]\n' > "$WORK/hubnat.toml"

# Runs iperf3 through hubnat started with $1 workers and backend $2; prints "up down" Gbit/s.
measure() {
  local w=${1%s} b=$2 pid up down queues=()
  [ "$w" != "$1" ] && queues=(--tap-queues single)
  ip netns exec $NAT "$HUBNAT" run --tap tap0 --netns /run/netns/$GUEST --config "$WORK/hubnat.toml" \
    --state-dir "$WORK/state" --control "$WORK/ctl.sock" --log warn \
    --workers "$w" "${queues[@]}" --socket-backend "$b" > "$WORK/hubnat-$1-$b.log" 2>&1 &
  pid=$!; PIDS+=("$pid")
  for _ in $(seq 50); do ip -n $GUEST link show tap0 >/dev/null 2>&1 && break; sleep 0.1; done
  ip -n $GUEST addr add 192.168.30.50/24 dev tap0
  ip -n $GUEST link set tap0 up
  ip -n $GUEST route add default via 192.168.30.1
  for _ in $(seq 50); do ip netns exec $GUEST ping -c1 -W1 192.168.30.1 >/dev/null 2>&1 && break; done
  up=$(ip netns exec $GUEST iperf3 -c 10.78.0.2 -p 5201 -t "$DURATION" -P "$STREAMS" "${LOAD[@]}" -J \
        | jq '.end.sum_received.bits_per_second / 1e9')
  down=$(ip netns exec $GUEST iperf3 -c 10.78.0.2 -p 5201 -t "$DURATION" -P "$STREAMS" "${LOAD[@]}" -R -J \
        | jq '.end.sum_received.bits_per_second / 1e9')
  # Drops by reason over both directions (queue_full: a full inter-thread queue or TAP write).
  drops=$("$HUBNAT" --control "$WORK/ctl.sock" status --json |
    jq -r '[.drops | to_entries[] | select(.value > 0) | "\(.key)=\(.value)"] | join(",")')
  kill "$pid"; wait "$pid" 2>/dev/null || true
  printf '%.2f %.2f %s\n' "$up" "$down" "${drops:-none}"
}

median() { sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else printf "%.2f\n", (a[NR/2]+a[NR/2+1])/2}'; }

echo "# $(nproc) cores, $(uname -r), iperf3 -P $STREAMS -t $DURATION ${LOAD[*]}, MTU 1500, $ROUNDS rounds" >&2
for r in $(seq "$ROUNDS"); do
  for b in $BACKENDS; do
    for w in $WORKERS; do
      read -r up down drops < <(measure "$w" "$b")
      echo "round $r backend $b workers $w: up $up down $down Gbit/s; drops: $drops" >&2
      echo "$b $w $up $down" >> "$WORK/results"
    done
  done
done

echo "| backend | workers (2s: one TAP queue) | guest→host (upload) Gbit/s | host→guest (download) Gbit/s | rounds |"
echo "| --- | --- | --- | --- | --- |"
for b in $BACKENDS; do
  for w in $WORKERS; do
    up=$(awk -v b="$b" -v w="$w" '$1==b && $2==w {print $3}' "$WORK/results" | median)
    down=$(awk -v b="$b" -v w="$w" '$1==b && $2==w {print $4}' "$WORK/results" | median)
    all=$(awk -v b="$b" -v w="$w" '$1==b && $2==w {printf "%s%s/%s", (n++ ? ", " : ""), $3, $4}' "$WORK/results")
    echo "| $b | $w | $up | $down | $all |"
  done
done
