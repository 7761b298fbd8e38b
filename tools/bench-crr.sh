#!/usr/bin/env bash
# Connection rate through hubnat, sustained: hubnat-load crr (connect, 1-byte echo, close, repeat)
# from a guest namespace to a server namespace, for longer than the comparison's runs, with and
# without TIME_WAIT reuse in the namespace hubnat's host sockets live in, runs alternated.
#
#   guest ns (tap0, 192.168.30.50) ── hubnat ── NAT ns ──veth── server ns (hubnat-load serve)
#
# The guest namespace reuses TIME_WAIT ports and has the wide port range, as in tools/compare.sh;
# `reuse` runs set net.ipv4.tcp_tw_reuse=1 in the NAT namespace too (only there: the machine's
# own namespaces are not touched).
#
# Usage: sudo tools/bench-crr.sh [--runs N] [--duration S] [--no-build] [--perf FILE] [--steps]
#                                [--kernel] [--sched]
#   --perf FILE: `perf record -g` of hubnat for 4 s of the first run without reuse.
#   --steps: tcpdump on the guest's TAP and on the server's link during the first run with
#     reuse, then `hubnat-pcap steps`: where a cycle's time goes, step by step (the NAT's,
#     the client's, the server's). The captures cost the run some of its rate.
#   --kernel: a third run in each round, the same namespaces routed by the kernel (a veth for
#     the TAP, forwarding on in the NAT namespace, no hubnat), and the ratio of hubnat's run
#     with reuse to it: the reference for the rate, measured beside it.
#   --sched: the scheduler's events (`perf sched record`) for 1 s in the middle of each run with
#     reuse and each kernel run: per thread (the guest's client, the server, hubnat), the CPU
#     time it ran, how often it was switched in per cycle and how long after its wake-up.
# Before the runs it prints what waking a thread costs on this machine (`hubnat-load wake`) and,
# on a KVM guest, how long an idle CPU polls before it halts (guest_halt_poll_ns).
# Environment: HUBNAT_RUN_ARGS, extra arguments for `hubnat run` (e.g. "--workers 1");
# HUBNAT_BIN, another hubnat binary than the build's (an A/B of two builds).
# Every namespace and process it makes is removed when it ends, also on failure or Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

RUNS=2 DURATION=15 BUILD=1 PERF_OUT="" STEPS=0 KERNEL=0 SCHED=0
while [ $# -gt 0 ]; do
  case $1 in
    --runs) RUNS=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --perf) PERF_OUT=$2; shift 2 ;;
    --steps) STEPS=1; shift ;;
    --kernel) KERNEL=1; shift ;;
    --sched) SCHED=1; shift ;;
    --no-build) BUILD=0; shift ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "needs root (network namespaces)" >&2; exit 1; }
for t in ip jq; do command -v $t >/dev/null || { echo "needs $t" >&2; exit 1; }; done
[ "$STEPS" = 0 ] || command -v tcpdump >/dev/null || { echo "--steps needs tcpdump" >&2; exit 1; }
[ "$SCHED" = 0 ] || command -v perf >/dev/null || { echo "--sched needs perf" >&2; exit 1; }
[ "$SCHED" = 0 ] || [ "$DURATION" -ge 4 ] || { echo "--sched needs --duration 4 or more" >&2; exit 1; }
if [ "$BUILD" = 1 ]; then cargo build --release -q -p hubnat-tools --bin hubnat --bin hubnat-load --bin hubnat-pcap; fi
BIN=$ROOT/target/release
HUBNAT="${HUBNAT_BIN:-$BIN/hubnat}"

TAG=hbc$$
WORK=$(mktemp -d /tmp/hubnat-bench-crr.XXXXXX)
PIDS=()
cleanup() {
  set +e
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null; done
  for ns in ${TAG}g ${TAG}n ${TAG}s; do
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$p" 2>/dev/null; done
    ip netns del "$ns" 2>/dev/null
  done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The scheduler's events of one run ($1, perf sched's data) summed per thread: a Markdown table.
# $2, $3: the client's and the server's PIDs; $4: hubnat's (empty: none); $5: connections/s.
sched_table() {
  echo "| thread | ran (ms of the second) | switched in | per cycle | mean delay from wake-up to run (µs) |"
  echo "| --- | ---: | ---: | ---: | ---: |"
  # timehist: time [cpu] comm[tid] or comm[tid/pid], wait, delay, run time (ms).
  perf sched timehist -i "$1" 2> /dev/null | awk -v c="$2" -v s="$3" -v h="${4:-none}" -v rate="$5" '
    $1 ~ /^[0-9]+\.[0-9]+$/ && NF >= 6 {
      id = $3; sub(/^.*\[/, "", id); sub(/\]$/, "", id)
      n = split(id, ids, "/"); pid = n > 1 ? ids[2] : ids[1]
      who = ids[1] == c ? "client" : ids[1] == s ? "server" : pid == h ? "hubnat (all threads)" : ""
      if (who == "") next
      runs[who]++; ran[who] += $6; delay[who] += $5
    }
    END {
      split("client|server|hubnat (all threads)", order, "|")
      for (i = 1; i <= 3; i++) {
        w = order[i]
        if (!(w in runs)) continue
        printf "| %s | %.0f | %d | %.1f | %.1f |\n", w, ran[w], runs[w], runs[w] / rate, delay[w] / runs[w] * 1000
      }
    }'
}

# One run in fresh namespaces; $1: "reuse", "default" or "kernel". Writes "conn/s p50_us" to
# $WORK/result.
run() {
  local g=${TAG}g n=${TAG}n s=${TAG}s hp="" lp sp gif=tap0
  for ns in $g $n $s; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
  ip link add ${TAG}a netns $n type veth peer name eth0 netns $s
  ip -n $n addr add 10.79.0.1/24 dev ${TAG}a; ip -n $n link set ${TAG}a up
  ip -n $s addr add 10.79.0.2/24 dev eth0; ip -n $s link set eth0 up
  ip -n $s route add default via 10.79.0.1
  ip netns exec $s "$BIN/hubnat-load" serve --listen 0.0.0.0:7000 > /dev/null 2>&1 &
  sp=$!; PIDS+=("$sp")
  if [ "$1" = kernel ]; then
    gif=eth0
    ip link add ${TAG}g netns $n type veth peer name $gif netns $g
    ip -n $n addr add 192.168.30.1/24 dev ${TAG}g; ip -n $n link set ${TAG}g up
    ip netns exec $n sysctl -qw net.ipv4.ip_forward=1
  else
    printf '[dns]\nupstream = ["10.79.0.2"]\n' > "$WORK/hubnat.toml"
    # shellcheck disable=SC2086 # HUBNAT_RUN_ARGS: words on purpose
    ip netns exec $n "$HUBNAT" run --tap tap0 --netns /run/netns/$g --config "$WORK/hubnat.toml" \
      --state-dir "$WORK/state" --control "$WORK/ctl.sock" --log warn ${HUBNAT_RUN_ARGS:-} > "$WORK/hubnat.log" 2>&1 &
    hp=$!; PIDS+=("$hp")
    for _ in $(seq 50); do ip -n $g link show tap0 > /dev/null 2>&1 && break; sleep 0.1; done
  fi
  ip -n $g addr add 192.168.30.50/24 dev $gif; ip -n $g link set $gif up
  ip -n $g route add default via 192.168.30.1
  ip netns exec $g sysctl -qw net.ipv4.tcp_tw_reuse=1 net.ipv4.ip_local_port_range="1024 65000"
  [ "$1" = reuse ] && ip netns exec $n sysctl -qw net.ipv4.tcp_tw_reuse=1
  for _ in $(seq 50); do ip netns exec $g ping -c1 -W1 192.168.30.1 > /dev/null 2>&1 && break; done
  local dumps=()
  if [ "$STEPS" = 1 ] && [ "$1" = reuse ]; then
    ip netns exec $g tcpdump -i tap0 -n -w "$WORK/client.pcap" --time-stamp-precision=nano \
      tcp port 7000 > /dev/null 2>&1 &
    dumps+=($!); PIDS+=($!)
    ip netns exec $s tcpdump -i eth0 -n -w "$WORK/server.pcap" --time-stamp-precision=nano \
      tcp port 7000 > /dev/null 2>&1 &
    dumps+=($!); PIDS+=($!)
    sleep 1
  fi
  ip netns exec $g "$BIN/hubnat-load" crr --connect 10.79.0.2:7000 --duration "$DURATION" --json \
    > "$WORK/crr.json" 2> "$WORK/crr.err" &
  lp=$!
  if [ -n "$PERF_OUT" ] && [ "$1" = default ]; then
    sleep 2
    perf record -g -p "$hp" -o "$PERF_OUT" -- sleep 4 > /dev/null 2>&1 || true
    PERF_OUT=""
  fi
  if [ "$SCHED" = 1 ] && [ "$1" != default ]; then
    sleep $((DURATION / 2))
    perf sched record -a -o "$WORK/sched.data" -- sleep 1 > /dev/null 2>&1 || true
  fi
  wait "$lp" || { echo "crr failed: $(head -n 1 "$WORK/crr.err")" >&2; }
  if [ ${#dumps[@]} -gt 0 ]; then
    sleep 0.5
    kill -INT "${dumps[@]}" 2> /dev/null || true
    wait "${dumps[@]}" 2> /dev/null || true
    "$BIN/hubnat-pcap" steps --client "$WORK/client.pcap" --server "$WORK/server.pcap" \
      > "$WORK/steps.md" || true
    STEPS=0
  fi
  jq -r '"\(.per_sec | floor) \(.p50_us)"' "$WORK/crr.json" > "$WORK/result"
  if [ -s "$WORK/sched.data" ]; then
    sched_table "$WORK/sched.data" "$lp" "$sp" "$hp" "$(cut -d' ' -f1 "$WORK/result")" > "$WORK/sched.md"
    rm -f "$WORK/sched.data"
  fi
  kill $hp "$sp" 2> /dev/null || true
  wait $hp "$sp" 2> /dev/null || true
  for ns in $g $n $s; do
    for p in $(ip netns pids "$ns" 2> /dev/null); do kill -KILL "$p" 2> /dev/null || true; done
    ip netns del "$ns"
  done
  rm -rf "$WORK/state"
}

echo "# $(nproc) cores, $(uname -r), hubnat-load crr ${DURATION} s per run, $RUNS runs each"
# What a wake-up costs here weighs on every run below (a cycle is a chain of them): on a VM one
# across CPUs is an interrupt between virtual CPUs, and its price varies from machine to machine.
# Only a reading for the record: the runs go on without it.
"$BIN/hubnat-load" wake --count 5000 2>&1 | sed 's/^/# /' || echo "# (hubnat-load wake failed)"
# Whether an idle CPU polls for a while before it halts (the haltpoll governor of a KVM guest):
# a CPU that polls is woken without an interrupt, and both routes' rates change with it.
if [ -r /sys/module/haltpoll/parameters/guest_halt_poll_ns ]; then
  echo "# cpuidle: $(cat /sys/devices/system/cpu/cpuidle/current_governor 2> /dev/null || echo '?'), guest_halt_poll_ns $(cat /sys/module/haltpoll/parameters/guest_halt_poll_ns)"
fi
MODES="default reuse"
[ "$KERNEL" = 1 ] && MODES="$MODES kernel"
for r in $(seq "$RUNS"); do
  for mode in $MODES; do
    run $mode
    read -r rate p50 < "$WORK/result"
    if [ "$mode" = kernel ]; then
      echo "run $r, routed by the kernel: $rate connections/s, p50 $p50 µs"
      awk -v h="$reuse_rate" -v hp="$reuse_p50" -v k="$rate" -v kp="$p50" 'BEGIN {
        printf "run %d, hubnat (reuse) against the kernel: rate %.2f, median cycle %.2f (the kernel'"'"'s over hubnat'"'"'s)\n", '"$r"', h / k, kp / hp }'
    else
      echo "run $r, NAT namespace $mode: $rate connections/s, p50 $p50 µs"
    fi
    [ "$mode" = reuse ] && { reuse_rate=$rate; reuse_p50=$p50; }
    if [ -s "$WORK/steps.md" ]; then
      echo; echo "Steps of that run (captured on both sides):"; cat "$WORK/steps.md"; echo
      rm -f "$WORK/steps.md"
    fi
    if [ -s "$WORK/sched.md" ]; then
      echo; echo "Threads of that run, 1 s of the scheduler's events (perf sched):"; cat "$WORK/sched.md"; echo
      rm -f "$WORK/sched.md"
    fi
  done
done
