#!/usr/bin/env bash
# tools/compare.sh: hubnat against its peers and the kernel's own routing, on one machine in one run.
#
# Topology, built anew for every system (and every MTU) and torn down after it:
#
#   guest ns ──(the system under test)── NAT ns ──veth── server ns (iperf3, hubnat-load serve)
#
# The NAT namespace's only routes lead to the server namespace (its link, and a default route via
# the server, which forwards nothing): no system's traffic can leave the machine. Systems:
#   hubnat       TAP in the guest ns, hubnat in the NAT ns
#   slirp4netns  `slirp4netns --configure --mtu=M --disable-host-loopback PID tap0` in the NAT ns
#   pasta        as user nobody in the NAT ns (/dev/net/tun opened to it for the run); pasta makes
#                the guest namespace itself
#   softether    vpnserver (private copies of its state dirs) in the NAT ns, SecureNAT (user mode)
#                on hub DEFAULT, local bridge to a veth whose peer is the guest's; guest via dhclient
#   kernel       veth + ip_forward in the NAT ns, no NAT at all: the limit
# Each system at the first MTU: iperf3 both ways (4 TCP streams), the UDP packet rate both ways
# (one stream of 64-byte datagrams as fast as iperf3 sends them: pps_up/pps_down, thousands of
# datagrams received a second), request/response latency and connection rate (hubnat-load).
# Forwarded ports (instance kind `fwd`): iperf3's server in the guest, its client in the NAT ns
# connecting to 127.0.0.1:15201 and to the NAT ns's own address, each system forwarding 15201 to
# the guest's 5201 (hubnat: `hubnat forward add` on its control socket; slirp4netns: add_hostfwd
# on its API socket; pasta: `-t 15201:5201`). The kernel forwards no port: its rows are the NAT
# ns's client connecting to the guest's address, routed. SecureNAT has no port forwarding.
# IPv6 (instance kind `v6`, --with-ipv6): the NAT and server namespaces also get 2001:db8:77::1 and
# ::2; the guest takes its address as the system gives it (SLAAC from hubnat's or slirp4netns's
# router advertisement, pasta's copy of the NAT ns's, a static one for the kernel's routing) and
# iperf3 -6 runs both ways. SecureNAT has no IPv6.
# Every namespace, interface, process and file the script makes is removed on exit, also on failure
# or Ctrl-C. Run as root. `tools/compare.sh --help` lists the options.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=tools/scripts/procs.sh
. "$ROOT/tools/scripts/procs.sh"
# shellcheck source=tools/scripts/softether.sh
. "$ROOT/tools/scripts/softether.sh"
SYSTEMS=hubnat,slirp4netns,pasta,softether,kernel
MTUS=1500,65520
DURATION=10
ROUNDS=1
MEM=1000,10000
OUT="$ROOT/PERF-compare.md"
PERF=""
PERF_SET=0
PROFILE=release
BUILD=1
KEEP=0
QUICK=0
FWD=1
WITH_OFL=0
OFFLOADS=off
WITH_V6=0

usage() {
  cat <<'EOF'
Usage: sudo tools/compare.sh [options]

  --systems LIST   comma-separated, any of hubnat,slirp4netns,pasta,softether,kernel (default: all),
                   and hubnat's other ports: hubnat-stream, hubnat-dgram (QEMU's socket framings,
                   relayed from the guest's TAP by hubnat-testsrv socket-guest), hubnat-packet
                   (a veth joined by --attach)
  --mtu LIST       MTUs for the iperf3 runs (default 1500,65520); the first also carries the
                   latency, connection-rate, forwarded-port and memory runs
  --duration S     seconds per iperf3 direction and per latency / connection-rate run (default 10)
  --rounds N       repeat everything N times, systems interleaved round by round; medians reported
  --mem LIST       idle-connection counts for the memory runs (default 1000,10000; "" for none)
  --no-fwd         no forwarded-port runs. Otherwise each system gets a fresh instance at the first
                   MTU for them: iperf3's server in the guest on port 5201, its client in the NAT
                   namespace connecting to a forward of port 15201 on 127.0.0.1 (fwd_in_M: client
                   → guest; fwd_out_M: guest → client, -R) and on the NAT namespace's own address
                   (fwd_in_addr_M, fwd_out_addr_M). hubnat: `hubnat forward add` on its control
                   socket; slirp4netns: add_hostfwd on its API socket (needs python3 or socat);
                   pasta: -t 15201:5201; kernel: no forward, the client connects to the guest's
                   address through the kernel's routing; softether: none (SecureNAT has no port
                   forwarding)
  --with-offloads  also measure throughput at the first MTU with the guest's offloads on
                   (tput_up_ofl_M, tput_down_ofl_M): checksum offload, TSO, GSO and GRO asked
                   for on the guest's interface and on the NAT side's veth end with ethtool.
                   A TAP takes them only where the program behind it offers them; each figure's
                   note says whether the guest's TSO was on. The kernel's row is then its
                   routing with offloads on, the reference for a NAT that offers them
  --with-ipv6      also measure throughput over IPv6 at the first MTU (tput_up6_M, tput_down6_M):
                   a fresh instance whose NAT and server namespaces also have 2001:db8:77::1 and
                   ::2 (the NAT's IPv6 traffic leaves from ::1), iperf3 -6 to 2001:db8:77::2.
                   hubnat (every port) and slirp4netns (--enable-ipv6): the guest's address by
                   SLAAC from their router advertisements; pasta: its copy of the NAT namespace's;
                   kernel: fd68:7562:6e61:1e::50/64, routed (the server routes the prefix back);
                   softether: none (SecureNAT has no IPv6)
  --quick          smoke run: --duration 2 --mem 100,1000 --rounds 1, PERF.md left alone
  --out FILE       Markdown report (default PERF-compare.md at the top of the repository); FILE.svg (chart) and FILE.jsonl
                   (raw results, one line per figure) are written beside it
  --perf FILE      replace the block between <!-- compare:begin --> and <!-- compare:end --> in
                   FILE with the table (default: PERF.md, except with --quick; "none" for none)
  --profile P      cargo profile of the binaries (default release)
  --no-build       use target/PROFILE/ as it is
  --keep           keep the work directory (logs of every process) under /tmp

Environment: HUBNAT_RUN_ARGS, extra arguments for `hubnat run` (e.g. "--workers 1"); HUBNAT_BIN,
another hubnat binary than the build's (an A/B of two builds).
EOF
}

while [ $# -gt 0 ]; do
  case "$1" in
    --systems) SYSTEMS=$2; shift 2 ;;
    --mtu) MTUS=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --mem) MEM=$2; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --out) OUT=$2; shift 2 ;;
    --perf) PERF=$2; PERF_SET=1; shift 2 ;;
    --profile) PROFILE=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --keep) KEEP=1; shift ;;
    --no-fwd) FWD=0; shift ;;
    --with-offloads) WITH_OFL=1; shift ;;
    --with-ipv6) WITH_V6=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "compare.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
done
if [ "$QUICK" = 1 ]; then
  DURATION=2; ROUNDS=1; MEM=100,1000
fi
if [ "$PERF_SET" = 0 ]; then
  if [ "$QUICK" = 1 ]; then PERF=none; else PERF="$ROOT/PERF.md"; fi
fi
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac
SVG="${OUT%.md}.svg"
JSONL="${OUT%.md}.jsonl"

log() { printf '[compare %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (network namespaces)"
for c in ip jq timeout nsenter; do
  command -v "$c" >/dev/null || die "needs $c"
done
# shellcheck disable=SC2015
[[ "$DURATION" =~ ^[0-9]+$ ]] && [ "$DURATION" -ge 1 ] || die "--duration takes whole seconds"
# shellcheck disable=SC2015
[[ "$ROUNDS" =~ ^[0-9]+$ ]] && [ "$ROUNDS" -ge 1 ] || die "--rounds takes a count"

# ---------------------------------------------------------------------------------------------
# Everything made is recorded here, and cleanup() removes it.

WORK=$(mktemp -d /tmp/hubnat-compare.XXXXXX)
chmod 755 "$WORK"   # pasta, as user nobody, writes its PID file below it
TAG="hc$(( $$ % 10000 ))"   # namespace and interface prefix (interface names: 15 bytes at most)
SEQ=0
NETNS=()                    # namespaces made (ip netns add)
PIDS=()                     # processes started (plus everything found in our namespaces)
KILL9=()                    # processes that ignore SIGTERM (init of a PID namespace)
TUN_MODE=""                 # /dev/net/tun's mode before pasta's run, to restore

# Every process whose command line names a path in our (unique) work directory.
own_pids() {
  local d
  for d in /proc/[0-9]*; do
    [ "${d#/proc/}" = "$$" ] && continue
    { tr '\0' ' ' < "$d/cmdline"; } 2>/dev/null | grep -qF "$WORK/" && echo "${d#/proc/}"
  done
  return 0
}

# Tears down the current instance: its processes (those started and any left in its
# namespaces), its namespaces (with their interfaces) and their /etc/netns files.
teardown() {
  local ns p all=()
  set +e
  for p in "${KILL9[@]}"; do kill -KILL "$p" 2>/dev/null; done
  all=("${PIDS[@]}")
  for ns in "${NETNS[@]}"; do
    for p in $(ip netns pids "$ns" 2>/dev/null); do all+=("$p"); done
  done
  # Processes that left our namespaces (pasta's guest side, a daemon's orphaned child) still
  # name a file of our work directory on their command line.
  for p in $(own_pids); do all+=("$p"); done
  end_pids "${all[@]}"
  for ns in "${NETNS[@]}"; do
    ip netns del "$ns" 2>/dev/null
    rm -rf "/etc/netns/$ns"
  done
  if [ -n "$TUN_MODE" ]; then
    chmod "$TUN_MODE" /dev/net/tun
    TUN_MODE=""
  fi
  NETNS=(); PIDS=(); KILL9=()
  set -e
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  teardown
  if [ "$KEEP" = 1 ]; then
    log "work directory kept: $WORK"
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Makes namespace TAG+KIND+SEQ and leaves its name in $MKNS.
mkns() {
  local ns="${TAG}$1$SEQ"
  ip netns add "$ns"
  NETNS+=("$ns")
  # A resolver file of its own: nothing run inside reads or writes the machine's.
  mkdir -p "/etc/netns/$ns"
  : > "/etc/netns/$ns/resolv.conf"
  ip -n "$ns" link set lo up
  MKNS=$ns
}

# ---------------------------------------------------------------------------------------------
# Binaries

BIN="$ROOT/target/$PROFILE"
[ "$PROFILE" = dev ] && BIN="$ROOT/target/debug"
if [ "$BUILD" = 1 ]; then
  log "building hubnat, hubnat-load, hubnat-chart, hubnat-testsrv (profile $PROFILE)"
  (cd "$ROOT" && cargo build -q --profile "$PROFILE" -p hubnat-tools \
    --bin hubnat --bin hubnat-load --bin hubnat-chart --bin hubnat-testsrv) || die "build failed"
fi
HUBNAT="${HUBNAT_BIN:-$BIN/hubnat}"
LOAD="$BIN/hubnat-load"
CHART="$BIN/hubnat-chart"
TESTSRV="$BIN/hubnat-testsrv"
for b in "$LOAD" "$CHART"; do [ -x "$b" ] || die "missing $b (build it, or drop --no-build)"; done

# ---------------------------------------------------------------------------------------------
# Which systems can run here, and why not

declare -A SKIP=()
has() { command -v "$1" >/dev/null 2>&1; }
check_system() {
  case "$1" in
    hubnat) [ -x "$HUBNAT" ] || echo "no $HUBNAT" ;;
    hubnat-stream|hubnat-dgram|hubnat-packet)
      if [ ! -x "$HUBNAT" ]; then echo "no $HUBNAT"
      elif [ ! -x "$TESTSRV" ]; then echo "no $TESTSRV"
      fi ;;
    slirp4netns) has slirp4netns || echo "slirp4netns is not installed (apt-get install slirp4netns)" ;;
    pasta)
      if ! has pasta; then echo "pasta is not installed (apt-get install passt)"
      elif ! has setpriv; then echo "setpriv is missing (util-linux)"
      elif ! id nobody >/dev/null 2>&1; then echo "no user nobody"
      elif [ ! -c /dev/net/tun ]; then echo "no /dev/net/tun"
      fi ;;
    softether)
      if [ ! -x /usr/libexec/softether/vpnserver/vpnserver ]; then
        echo "softether-vpnserver is not installed (apt-get install softether-vpnserver)"
      elif ! has vpncmd; then echo "vpncmd is not installed (apt-get install softether-vpncmd)"
      elif ! has dhclient; then echo "dhclient is not installed (apt-get install isc-dhcp-client)"
      elif ! has ethtool; then echo "ethtool is not installed"
      elif ! has unshare; then echo "unshare is missing (util-linux)"
      fi ;;
    kernel) has ethtool || echo "ethtool is not installed" ;;
    *) echo "unknown system" ;;
  esac
}
IFS=, read -r -a SYS_LIST <<< "$SYSTEMS"
IFS=, read -r -a MTU_LIST <<< "$MTUS"
IFS=, read -r -a MEM_LIST <<< "$MEM"
for s in "${SYS_LIST[@]}"; do
  why=$(check_system "$s")
  if [ -n "$why" ]; then
    SKIP[$s]=$why
    log "skipping $s: $why"
  fi
done
HAVE_IPERF=1
has iperf3 || { HAVE_IPERF=0; log "iperf3 is not installed: no throughput runs"; }

# The client of a unix stream socket at hand (slirp4netns's API socket): python3 or socat
# (busybox's nc has no unix mode).
unix_client() {
  if has python3 && python3 -c 'import socket; socket.AF_UNIX' >/dev/null 2>&1; then echo python3
  elif has socat; then echo socat
  fi
}
# Why a system has no forwarded-port rows here (nothing: it has them).
check_fwd() {
  if [ "$FWD" = 0 ]; then echo "not asked (--no-fwd)"; return; fi
  if [ "$HAVE_IPERF" = 0 ]; then echo "iperf3 is not installed"; return; fi
  case "$1" in
    slirp4netns)
      [ -n "$(unix_client)" ] ||
        echo "no client for slirp4netns's API socket (add_hostfwd): install python3 or socat" ;;
    softether) echo "SecureNAT has no port forwarding" ;;
  esac
}
declare -A FWD_SKIP=()
for s in "${SYS_LIST[@]}"; do
  [ -n "${SKIP[$s]:-}" ] && continue
  why=$(check_fwd "$s")
  if [ -n "$why" ]; then
    FWD_SKIP[$s]=$why
    [ "$FWD" = 1 ] && log "no forwarded-port rows for $s: $why"
  fi
done

# ---------------------------------------------------------------------------------------------
# Results: one JSON line per figure (or failure)

: > "$JSONL"
ROUND=0
record() { # system metric value unit [note]
  jq -nc --arg s "$1" --arg m "$2" --arg v "$3" --arg u "$4" --arg n "${5:-}" --argjson r "$ROUND" \
    '{round:$r, system:$s, metric:$m, value:($v|tonumber), unit:$u, ok:true, note:$n}' >> "$JSONL"
}
record_fail() { # system metric note
  jq -nc --arg s "$1" --arg m "$2" --arg n "$3" --argjson r "$ROUND" \
    '{round:$r, system:$s, metric:$m, value:null, unit:"", ok:false, note:$n}' >> "$JSONL"
  log "  $1 $2: FAILED: $3"
}
# The first line of a file, cut short, for a note.
first_line() { grep -m1 -v '^\s*$' "$1" 2>/dev/null | cut -c1-160 || true; }

# ---------------------------------------------------------------------------------------------
# The topology

SERVER_IP=10.77.0.2
NAT_IP=10.77.0.1
# IPv6 of the v6 instances: a documentation prefix on the NAT-server link (routed nowhere else).
SERVER6=2001:db8:77::2
NAT6=2001:db8:77::1
GUEST6_KERNEL=fd68:7562:6e61:1e::50   # the kernel's guest, in hubnat's default prefix
GUEST=()        # command prefix that runs a command in the guest namespace
NAT_NS="" SRV_NS="" GUEST_NS=""
KIND=""         # the instance's kind (main, tput, ofl, v6, fwd, mem)
FWD_SEEN="$WORK/fwd-seen.tsv"   # system, via (lo|addr), client address the guest saw
FWD_PORT=15201  # the forwarded port, in the NAT namespace
GUEST_PORT=5201 # where it leads in the guest (iperf3's server)

# NAT and server namespaces, their link, and the load server.
make_base() {
  mkns n; NAT_NS=$MKNS
  mkns s; SRV_NS=$MKNS
  local a="${TAG}a$SEQ"
  ip link add "$a" netns "$NAT_NS" mtu 65520 type veth peer name eth0 netns "$SRV_NS" mtu 65520 || return 1
  ip -n "$NAT_NS" addr add "$NAT_IP/24" dev "$a"
  ip -n "$NAT_NS" link set "$a" up
  ip -n "$SRV_NS" addr add "$SERVER_IP/24" dev eth0
  ip -n "$SRV_NS" link set eth0 up
  ip -n "$NAT_NS" route add default via "$SERVER_IP"
  # IPv6 only where it is measured: the other instances stay as they were (IPv4 alone). nodad:
  # usable at once (pasta copies the NAT ns's address as it finds it at start).
  if [ "$KIND" = v6 ]; then
    ip -n "$NAT_NS" addr add "$NAT6/64" dev "$a" nodad
    ip -n "$SRV_NS" addr add "$SERVER6/64" dev eth0 nodad
    ip -n "$NAT_NS" -6 route add default via "$SERVER6"
  fi
  # Many short connections from one address: reuse TIME_WAIT ports, use the whole port range.
  for ns in "$NAT_NS" "$SRV_NS"; do
    ip netns exec "$ns" sysctl -qw net.ipv4.tcp_tw_reuse=1 net.ipv4.ip_local_port_range="1024 65000"
  done
  ip netns exec "$SRV_NS" "$LOAD" serve --listen "0.0.0.0:7000" > "$IDIR/load-server.log" 2>&1 &
  PIDS+=($!)
  wait_for 5 grep -q listening "$IDIR/load-server.log" || { echo "load server did not start"; return 1; }
}

wait_for() { # seconds command...
  local t=$1 i; shift
  for i in $(seq $((t * 10))); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  return 1
}

guest_has_addr() { "${GUEST[@]}" ip -4 -o addr show dev "$1" | grep -q inet; }

guest_sysctls() {
  "${GUEST[@]}" sysctl -qw net.ipv4.tcp_tw_reuse=1 net.ipv4.ip_local_port_range="1024 65000"
}

# Offloads of a veth end (or of a guest's interface): off for the plain runs, on (as far as the
# device offers them) for the runs of instance kind ofl (OFFLOADS=on).
offloads_off() { # ns dev
  if [ "$OFFLOADS" = on ]; then
    ip netns exec "$1" ethtool -K "$2" tx on tso on gso on gro on >/dev/null 2>&1 || true
    return 0
  fi
  ip netns exec "$1" ethtool -K "$2" tso off gso off gro off >/dev/null 2>&1 ||
    ip netns exec "$1" ethtool -K "$2" gso off gro off >/dev/null
}

# The guest's interface (the first that is not loopback).
guest_dev() {
  "${GUEST[@]}" ip -o link show | awk -F': ' '$2 != "lo" {sub(/@.*/, "", $2); print $2; exit}'
}

# Whether the guest's interface does TSO now ("on"/"off"; "on [fixed]" counts as on).
guest_tso() {
  local dev; dev=$(guest_dev)
  "${GUEST[@]}" ethtool -k "$dev" 2>/dev/null |
    awk '/^tcp-segmentation-offload:/ {print $2; found=1} END {if (!found) print "unknown"}'
}

setup_kernel() { # mtu
  mkns g; GUEST_NS=$MKNS
  GUEST=(ip netns exec "$GUEST_NS")
  local v="${TAG}k$SEQ"
  ip link add "$v" netns "$NAT_NS" mtu "$1" type veth peer name eth0 netns "$GUEST_NS" mtu "$1" || return 1
  offloads_off "$NAT_NS" "$v"
  offloads_off "$GUEST_NS" eth0
  ip -n "$NAT_NS" addr add 192.168.30.1/24 dev "$v"
  ip -n "$NAT_NS" link set "$v" up
  ip netns exec "$NAT_NS" sysctl -qw net.ipv4.ip_forward=1
  ip -n "$GUEST_NS" addr add 192.168.30.50/24 dev eth0
  ip -n "$GUEST_NS" link set eth0 up
  ip -n "$GUEST_NS" route add default via 192.168.30.1
  # Routing, no NAT: the server knows the way back.
  ip -n "$SRV_NS" route add 192.168.30.0/24 via "$NAT_IP"
  if [ "$KIND" = v6 ]; then
    ip -n "$NAT_NS" addr add fd68:7562:6e61:1e::1/64 dev "$v" nodad
    ip netns exec "$NAT_NS" sysctl -qw net.ipv6.conf.all.forwarding=1
    ip -n "$GUEST_NS" addr add "$GUEST6_KERNEL/64" dev eth0 nodad
    ip -n "$GUEST_NS" -6 route add default via fd68:7562:6e61:1e::1
    ip -n "$SRV_NS" -6 route add fd68:7562:6e61:1e::/64 via "$NAT6"
  fi
}

# hubnat: its configuration, started in the NAT namespace with the given ports.
hubnat_config() { # mtu
  cat > "$IDIR/hubnat.toml" <<EOF
[nat]
mtu = $1
max_sessions = 65536
max_sessions_per_guest = 20000
[dns]
upstream = ["$SERVER_IP"]
EOF
}

start_hubnat_ports() { # port arguments...
  # A control socket of its own (not the machine's default one), for `hubnat forward add`.
  # shellcheck disable=SC2086 # HUBNAT_RUN_ARGS: words on purpose
  ip netns exec "$NAT_NS" "$HUBNAT" --control "$IDIR/hubnat.ctl" run "$@" \
    --config "$IDIR/hubnat.toml" --state-dir "$IDIR/hubnat-state" --log warn \
    ${HUBNAT_RUN_ARGS:-} > "$IDIR/hubnat.log" 2>&1 &
  PIDS+=($!)
}

guest_static() { # dev
  ip -n "$GUEST_NS" addr add 192.168.30.50/24 dev "$1"
  ip -n "$GUEST_NS" link set "$1" up
  ip -n "$GUEST_NS" route add default via 192.168.30.1
  wait_for 5 "${GUEST[@]}" ping -c1 -W1 192.168.30.1 || { echo "hubnat does not answer ping"; return 1; }
}

setup_hubnat() { # mtu
  mkns g; GUEST_NS=$MKNS
  GUEST=(ip netns exec "$GUEST_NS")
  hubnat_config "$1"
  start_hubnat_ports --tap tap0 --netns "/run/netns/$GUEST_NS"
  if ! wait_for 10 ip -n "$GUEST_NS" link show tap0; then
    echo "hubnat did not make tap0: $(first_line "$IDIR/hubnat.log")"; return 1
  fi
  guest_static tap0
}

# hubnat's other kinds of port, each with the guest's kernel stack behind it: a QEMU stream or
# datagram socket (the guest's TAP relayed in QEMU's framing by hubnat-testsrv socket-guest, as
# QEMU would), or a veth joined by AF_PACKET (--attach). Compared with `hubnat` (the TAP).
setup_socket_port() { # mtu kind(stream|dgram)
  mkns g; GUEST_NS=$MKNS
  GUEST=(ip netns exec "$GUEST_NS")
  hubnat_config "$1"
  local sock="$IDIR/hubnat.sock" how
  start_hubnat_ports --port "$2:$sock"
  wait_for 10 test -S "$sock" || { echo "hubnat did not make $sock: $(first_line "$IDIR/hubnat.log")"; return 1; }
  if [ "$2" = stream ]; then how=(--stream "$sock"); else how=(--dgram "$sock" --local "$IDIR/guest.sock"); fi
  "$TESTSRV" socket-guest --netns "/run/netns/$GUEST_NS" --tap eth0 --mtu "$1" "${how[@]}" \
    > "$IDIR/socket-guest.log" 2>&1 &
  PIDS+=($!)
  wait_for 10 ip -n "$GUEST_NS" link show eth0 || { echo "no guest TAP: $(first_line "$IDIR/socket-guest.log")"; return 1; }
  guest_static eth0
}
setup_hubnat-stream() { setup_socket_port "$1" stream; }
setup_hubnat-dgram() { setup_socket_port "$1" dgram; }

setup_hubnat-packet() { # mtu
  mkns g; GUEST_NS=$MKNS
  GUEST=(ip netns exec "$GUEST_NS")
  hubnat_config "$1"
  local v="${TAG}p$SEQ"
  ip link add "$v" netns "$NAT_NS" mtu "$1" type veth peer name eth0 netns "$GUEST_NS" mtu "$1" || return 1
  offloads_off "$NAT_NS" "$v"
  offloads_off "$GUEST_NS" eth0
  ip -n "$NAT_NS" link set "$v" up
  start_hubnat_ports --attach "$v"
  guest_static eth0
}

setup_slirp4netns() { # mtu
  mkns g; GUEST_NS=$MKNS
  GUEST=(ip netns exec "$GUEST_NS")
  ip netns exec "$GUEST_NS" sleep infinity &
  local holder=$!
  PIDS+=("$holder")
  local v6=()
  [ "$KIND" = v6 ] && v6=(--enable-ipv6)
  ip netns exec "$NAT_NS" slirp4netns --configure --mtu="$1" --disable-host-loopback "${v6[@]}" \
    --api-socket "$IDIR/slirp4netns.api" "$holder" tap0 > "$IDIR/slirp4netns.log" 2>&1 &
  PIDS+=($!)
  wait_for 20 guest_has_addr tap0 ||
    { echo "slirp4netns did not configure tap0 in 20 s: $(tail -n 1 "$IDIR/slirp4netns.log")"; return 1; }
}

setup_pasta() { # mtu
  TUN_MODE=$(stat -c %a /dev/net/tun)
  chmod 666 /dev/net/tun
  chmod 777 "$IDIR"
  # The forwarded-port instance has pasta forward the NAT namespace's port 15201 to the guest's
  # 5201 (bound at start, on every address; connections from 127.0.0.1 are spliced from socket
  # to socket in the guest's namespace, the others go through the tap).
  local tcp=none
  [ "$KIND" = fwd ] && tcp="$FWD_PORT:$GUEST_PORT"
  ip netns exec "$NAT_NS" setpriv --reuid=nobody --regid=nogroup --clear-groups -- \
    pasta -f --config-net -m "$1" -t "$tcp" -u none -T none -U none --no-map-gw \
    --pid "$IDIR/pasta.pid" -- sleep infinity > "$IDIR/pasta.log" 2>&1 &
  PIDS+=($!)
  wait_for 10 test -s "$IDIR/pasta.pid" || { echo "pasta did not start: $(first_line "$IDIR/pasta.log")"; return 1; }
  local pp gp=""
  pp=$(cat "$IDIR/pasta.pid")
  PIDS+=("$pp")
  wait_for 5 pgrep_child "$pp" || { echo "pasta started no guest command"; return 1; }
  gp=$(pgrep_child "$pp")
  # The guest command is the init of pasta's PID namespace: only SIGKILL ends it.
  KILL9+=("$gp")
  GUEST=(nsenter -t "$gp" -n)
  local dev
  wait_for 10 guest_route_dev || { echo "pasta did not configure the guest"; return 1; }
  dev=$(guest_route_dev)
  wait_for 5 guest_has_addr "$dev" || { echo "pasta gave the guest no address"; return 1; }
}
pgrep_child() { local c; c=$(ps -o pid= --ppid "$1" | head -1 | tr -d ' '); [ -n "$c" ] && echo "$c"; }
guest_route_dev() {
  local d; d=$("${GUEST[@]}" ip -4 route show default | awk '{for(i=1;i<NF;i++) if($i=="dev") print $(i+1)}' | head -1)
  [ -n "$d" ] && echo "$d"
}

setup_softether() { # mtu
  [ "$1" -le 1500 ] || { echo "SKIP: SecureNAT's MTU is at most 1500"; return 1; }
  mkns g; GUEST_NS=$MKNS
  GUEST=(ip netns exec "$GUEST_NS")
  local v="${TAG}v$SEQ"
  ip link add "$v" netns "$NAT_NS" mtu "$1" type veth peer name eth0 netns "$GUEST_NS" mtu "$1" || return 1
  offloads_off "$NAT_NS" "$v"
  offloads_off "$GUEST_NS" eth0
  ip -n "$NAT_NS" link set "$v" up
  ip -n "$GUEST_NS" link set eth0 up
  softether_start "$NAT_NS" "$v" "$IDIR/softether" "$1" \
    "/SERVER /ADMINHUB:DEFAULT /CMD ExtOptionSet SecureNAT_MaxTcpSessionsPerIp /VALUE:20000" \
    "/SERVER /ADMINHUB:DEFAULT /CMD ExtOptionSet SecureNAT_MaxTcpSynSentPerIp /VALUE:20000" ||
    return 1
  cat > "$IDIR/dhclient-script" <<'EOF'
#!/bin/sh
# Configures the interface only: never the machine's resolver.
case "$reason" in
BOUND|RENEW|REBIND|REBOOT)
  ip addr flush dev "$interface"
  ip addr add "$new_ip_address/$new_subnet_mask" dev "$interface"
  for r in $new_routers; do ip route replace default via "$r" dev "$interface"; break; done
  ;;
esac
exit 0
EOF
  chmod 755 "$IDIR/dhclient-script"
  # SecureNAT's DHCP server comes up a moment after SecureNatEnable: retry.
  local ok=0 i
  for i in 1 2 3; do
    if timeout 30 ip netns exec "$GUEST_NS" dhclient -1 -sf "$IDIR/dhclient-script" \
        -pf "$IDIR/dhclient.pid" -lf "$IDIR/dhclient.leases" eth0 >> "$IDIR/dhclient.log" 2>&1; then
      ok=1; break
    fi
  done
  [ -s "$IDIR/dhclient.pid" ] && PIDS+=("$(cat "$IDIR/dhclient.pid")")
  # shellcheck disable=SC2015
  [ "$ok" = 1 ] && guest_has_addr eth0 || { echo "the guest got no DHCP lease from SecureNAT"; return 1; }
}

# The v6 instance, once the system serves the guest: the guest's IPv6 address and default route
# as the system gives them. Prints why not on failure.
guest_prefix6() { # system: the start of the guest's global address
  case "$1" in
    hubnat*|kernel) echo "fd68:7562:6e61:1e:" ;;  # hubnat's default prefix (the kernel's: static)
    slirp4netns) echo "fd00::" ;;                  # libslirp's prefix, fd00::/64
    pasta) echo "${NAT6%::*}:" ;;                  # the NAT ns's own address, copied
  esac
}
# A global address with the prefix that is past DAD (not tentative), and a default route.
guest_has_addr6() { # prefix
  "${GUEST[@]}" ip -6 -o addr show scope global | grep -v tentative | awk '{print $4}' |
    grep -q "^$1" &&
    [ -n "$("${GUEST[@]}" ip -6 route show default)" ]
}
setup_v6() { # system
  local dev prefix
  dev=$(guest_dev)
  prefix=$(guest_prefix6 "$1")
  [ -n "$prefix" ] || { echo "SKIP: no IPv6"; return 1; }
  # SLAAC needs the guest's interface to take router advertisements: a fresh namespace's default
  # (accept_ra 1, forwarding off) does; say so if something changed it.
  local ra
  ra=$("${GUEST[@]}" sysctl -n "net.ipv6.conf.$dev.accept_ra" 2>/dev/null || echo "?")
  [ "$ra" != 0 ] || { echo "the guest's $dev does not accept router advertisements (accept_ra 0)"; return 1; }
  if ! wait_for 20 guest_has_addr6 "$prefix"; then
    echo "no IPv6 address in $prefix/64 and default route on the guest in 20 s:" \
      "$("${GUEST[@]}" ip -6 -o addr show scope global | awk '{print $4, $NF}' | tr '\n' ' ')"
    return 1
  fi
}

# ---------------------------------------------------------------------------------------------
# Workloads

# Sums a /proc/PID/status field (kB) over every process in the NAT namespace; prints MiB.
nat_mem() { # field
  local p sum=0 v
  for p in $(ip netns pids "$NAT_NS"); do
    v=$(awk -v f="$1:" '$1==f {print $2}' "/proc/$p/status" 2>/dev/null || true)
    sum=$((sum + ${v:-0}))
  done
  awk -v k="$sum" 'BEGIN { printf "%.2f", k / 1024 }'
}

# iperf3 from the guest to the server namespace. tput: 4 TCP streams, Gbit/s received
# (tput_DIR_MTU). pps: the packet rate, one UDP stream of 64-byte datagrams sent as fast as
# iperf3 can (-u -b 0), thousands of datagrams a second received (pps_DIR).
run_iperf() { # system mtu direction(up|down) [tput|pps]
  local s=$1 m=$2 d=$3 kind=${4:-tput} srv rev=() load metric value to=$SERVER_IP fam=()
  local out="$IDIR/iperf-$kind-$d.json" err="$IDIR/iperf-$kind-$d.err"
  [ "$d" = down ] && rev=(-R)
  if [ "$kind" = pps ]; then
    load=(-u -b 0 -l 64) metric="pps_$d"
    value='(.end.sum_received.packets - .end.sum_received.lost_packets) / .end.sum_received.seconds / 1000'
  else
    load=(-Z -P4 -l1M) metric="tput_${d}_$m" value='.end.sum_received.bits_per_second / 1e9'
    [ "$OFFLOADS" = on ] && metric="tput_${d}_ofl_$m"
    if [ "$KIND" = v6 ]; then metric="tput_${d}6_$m" to=$SERVER6 fam=(-6); fi
  fi
  ip netns exec "$SRV_NS" iperf3 -s -1 -p 5201 > "$IDIR/iperf-server-$kind-$d.log" 2>&1 &
  srv=$!
  PIDS+=("$srv")
  wait_for 5 ip netns exec "$SRV_NS" sh -c 'ss -ltn | grep -q ":5201 "' || true
  # iperf3 -s listens on :: (both families) by default.
  if timeout -k 5 $((DURATION + 30)) "${GUEST[@]}" iperf3 "${fam[@]}" -c "$to" -p 5201 -t "$DURATION" \
       "${load[@]}" --connect-timeout 5000 "${rev[@]}" -J > "$out" 2>"$err" &&
     jq -e '.end.sum_received.bytes > 0' "$out" >/dev/null 2>&1; then
    if [ "$kind" = pps ]; then
      record "$s" "$metric" "$(jq "$value" "$out")" kpps
    elif [ "$OFFLOADS" = on ]; then
      record "$s" "$metric" "$(jq "$value" "$out")" Gbit/s "guest TSO $(guest_tso)"
    else
      record "$s" "$metric" "$(jq "$value" "$out")" Gbit/s
    fi
  else
    local why
    why=$(jq -r '.error // empty' "$out" 2>/dev/null || true)
    [ -n "$why" ] || why=$(first_line "$err")
    record_fail "$s" "$metric" "iperf3: ${why:-no result}"
  fi
  end_pids "$srv"
}

# Sends one request to a unix stream socket and prints the answer (slirp4netns's API socket).
unix_request() { # socket request
  case "$(unix_client)" in
    python3)
      timeout 15 python3 - "$1" "$2" <<'EOF'
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(sys.argv[1])
s.sendall(sys.argv[2].encode())
s.shutdown(socket.SHUT_WR)
out = b""
while True:
    b = s.recv(4096)
    if not b:
        break
    out += b
print(out.decode(errors="replace"))
EOF
      ;;
    socat) printf '%s' "$2" | timeout 15 socat -t 10 - "UNIX-CONNECT:$1"; echo ;;
    *) echo "no unix-socket client"; return 1 ;;
  esac
}

# Forwards the NAT namespace's port 15201 to the guest's 5201, as the system does it; prints
# why not on failure.
setup_forward() { # system
  case "$1" in
    hubnat*)
      # Every hubnat port gives the guest 192.168.30.50 (guest_static).
      if ! timeout 15 "$HUBNAT" --control "$IDIR/hubnat.ctl" forward add tcp "0.0.0.0:$FWD_PORT" \
           "192.168.30.50:$GUEST_PORT" > "$IDIR/forward.log" 2>&1; then
        echo "hubnat forward add: $(tail -n 1 "$IDIR/forward.log")"; return 1
      fi ;;
    slirp4netns)
      local req ans
      req=$(jq -nc --argjson p "$FWD_PORT" --argjson g "$GUEST_PORT" \
        '{execute:"add_hostfwd", arguments:{proto:"tcp", host_addr:"0.0.0.0", host_port:$p, guest_port:$g}}')
      ans=$(unix_request "$IDIR/slirp4netns.api" "$req" 2>&1) || true
      echo "$ans" > "$IDIR/forward.log"
      echo "$ans" | jq -e '.return.id' >/dev/null 2>&1 ||
        { echo "slirp4netns add_hostfwd: $(echo "$ans" | head -n 1 | cut -c1-160)"; return 1; } ;;
    pasta) ;;    # -t at start
    kernel) return 0 ;;  # no forward: routed to the guest's address
    *) echo "no port forwarding"; return 1 ;;
  esac
  wait_for 10 ip netns exec "$NAT_NS" sh -c "ss -ltn | grep -q ':$FWD_PORT '" ||
    { echo "nothing listens on port $FWD_PORT in the NAT namespace"; return 1; }
}

# iperf3 through the forward: the server in the guest, the client in the NAT namespace on
# 127.0.0.1 (via lo) or on the NAT namespace's own address (via addr). The kernel: the client
# connects to the guest's address itself, from the same local address.
run_fwd() { # system mtu via(lo|addr) direction(in|out)
  local s=$1 m=$2 via=$3 d=$4 tag="$3-$4" srv rev=() to port=$FWD_PORT bind=() note="" metric
  metric="fwd_${d}_$m"
  [ "$via" = addr ] && metric="fwd_${d}_addr_$m"
  [ "$d" = out ] && rev=(-R)
  if [ "$via" = lo ]; then to=127.0.0.1; else to=$NAT_IP; fi
  if [ "$s" = kernel ]; then
    [ "$via" = addr ] && bind=(-B "$NAT_IP")
    to=192.168.30.50; port=$GUEST_PORT
    note="no forward: the NAT namespace's client connects to the guest's address, routed by the kernel (from 192.168.30.1 in the 127.0.0.1 rows, bound to $NAT_IP in the others)"
  fi
  "${GUEST[@]}" iperf3 -s -1 -p "$GUEST_PORT" -J > "$IDIR/fwd-server-$tag.json" 2>"$IDIR/fwd-server-$tag.err" &
  srv=$!
  PIDS+=("$srv")
  wait_for 5 "${GUEST[@]}" sh -c "ss -ltn | grep -q ':$GUEST_PORT '" || true
  local out="$IDIR/fwd-$tag.json"
  if timeout -k 5 $((DURATION + 30)) ip netns exec "$NAT_NS" iperf3 -c "$to" -p "$port" "${bind[@]}" \
       -t "$DURATION" -Z -P4 -l1M --connect-timeout 5000 "${rev[@]}" -J > "$out" 2>"$IDIR/fwd-$tag.err" &&
     jq -e '.end.sum_received.bits_per_second > 0' "$out" >/dev/null 2>&1; then
    record "$s" "$metric" "$(jq '.end.sum_received.bits_per_second / 1e9' "$out")" Gbit/s "$note"
  else
    local why
    why=$(jq -r '.error // empty' "$out" 2>/dev/null || true)
    [ -n "$why" ] || why=$(first_line "$IDIR/fwd-$tag.err")
    record_fail "$s" "$metric" "iperf3: ${why:-no result}"
  fi
  end_pids "$srv"
  # Whom the guest saw (the client's own address, or the system's stand-in for it), for the report.
  local seen
  seen=$(jq -r '.start.accepted_connection.host // empty' "$IDIR/fwd-server-$tag.json" 2>/dev/null || true)
  log "  $s $metric: the guest saw the client as ${seen:-?}"
  [ -n "$seen" ] && printf '%s\t%s\t%s\n' "$s" "$via" "$seen" >> "$FWD_SEEN"
  return 0
}

run_load() { # system mode(rr|crr)
  local s=$1 mode=$2 out="$IDIR/load-$2.json"
  if timeout -k 5 $((DURATION + 30)) "${GUEST[@]}" "$LOAD" "$mode" --connect "$SERVER_IP:7000" \
       --duration "$DURATION" --json > "$out" 2>"$IDIR/load-$mode.err"; then
    if [ "$mode" = rr ]; then
      record "$s" rr_p50 "$(jq .p50_us "$out")" µs
      record "$s" rr_p99 "$(jq .p99_us "$out")" µs
      record "$s" rr_p999 "$(jq .p999_us "$out")" µs
    else
      record "$s" crr_rate "$(jq .per_sec "$out")" conn/s
      record "$s" crr_p50 "$(jq .p50_us "$out")" µs
    fi
  else
    local why; why=$(first_line "$IDIR/load-$mode.err")
    if [ "$mode" = rr ]; then
      for m in rr_p50 rr_p99 rr_p999; do record_fail "$s" "$m" "${why:-timed out}"; done
    else
      for m in crr_rate crr_p50; do record_fail "$s" "$m" "${why:-timed out}"; done
    fi
  fi
}

run_mem() { # system count
  local s=$1 n=$2 out="$IDIR/hold-$2.json" ready="$IDIR/hold-$2.ready" pid
  rm -f "$ready"
  "${GUEST[@]}" "$LOAD" hold --connect "$SERVER_IP:7000" --conns "$n" --duration 120 \
    --timeout 10 --hold 3 --ready-file "$ready" --json > "$out" 2>"$IDIR/hold-$n.err" &
  pid=$!
  PIDS+=("$pid")
  local i
  for i in $(seq 1300); do
    [ -s "$ready" ] && break
    pid_alive "$pid" || break
    sleep 0.1
  done
  if [ -s "$ready" ]; then
    sleep 1
    local held hwm
    held=$(tr -d '\n' < "$ready")
    hwm=$(nat_mem VmHWM)
    wait "$pid" 2>/dev/null || true
    if [ "${held:-0}" -gt 0 ]; then
      local note=""
      if [ "$held" -lt "$n" ]; then
        local err; err=$(jq -r '.first_error // empty' "$out" 2>/dev/null)
        note="held $held of $n${err:+: $err}"
      fi
      record "$s" "mem_$n" "$hwm" MiB "$note"
      record "$s" "held_$n" "$held" conns "$note"
      return
    fi
  fi
  end_pids "$pid"
  local why; why=$(first_line "$IDIR/hold-$n.err")
  record_fail "$s" "mem_$n" "${why:-no connection held}"
  record_fail "$s" "held_$n" "${why:-no connection held}"
}

# Metrics an instance would have measured (to mark them failed when it cannot start).
instance_metrics() { # kind mtu
  case "$1" in
    main) echo "tput_up_$2 tput_down_$2 pps_up pps_down rr_p50 rr_p99 rr_p999 crr_rate crr_p50" ;;
    tput) echo "tput_up_$2 tput_down_$2" ;;
    ofl) echo "tput_up_ofl_$2 tput_down_ofl_$2" ;;
    v6) echo "tput_up6_$2 tput_down6_$2" ;;
    fwd) echo "fwd_in_$2 fwd_out_$2 fwd_in_addr_$2 fwd_out_addr_$2" ;;
    mem) local n; for n in "${MEM_LIST[@]}"; do echo -n "mem_$n held_$n "; done ;;
  esac
}

# One instance: fresh namespaces, the system at MTU M, the given workloads, teardown.
instance() { # system kind(main|tput|ofl|v6|fwd|mem) mtu
  local s=$1 kind=$2 m=$3 why m2
  SEQ=$((SEQ + 1))
  KIND=$kind
  OFFLOADS=off
  [ "$kind" = ofl ] && OFFLOADS=on
  IDIR="$WORK/r$ROUND-$s-$kind-$m"
  mkdir -p "$IDIR"
  log "round $ROUND: $s ($kind, MTU $m)"
  if ! make_base > "$IDIR/setup.msg" 2>&1 || ! "setup_$s" "$m" >> "$IDIR/setup.msg" 2>&1 ||
     { [ "$kind" = fwd ] && ! setup_forward "$s" >> "$IDIR/setup.msg" 2>&1; } ||
     { [ "$kind" = v6 ] && ! setup_v6 "$s" >> "$IDIR/setup.msg" 2>&1; }; then
    why=$(grep -v '^\s*$' "$IDIR/setup.msg" | tail -n 1)
    case "$why" in
      SKIP:*) log "  $s at MTU $m: skipped (${why#SKIP: })"
              for m2 in $(instance_metrics "$kind" "$m"); do
                jq -nc --arg s "$s" --arg m "$m2" --arg n "${why#SKIP: }" --argjson r "$ROUND" \
                  '{round:$r, system:$s, metric:$m, value:null, unit:"", ok:false, skipped:true, note:$n}' >> "$JSONL"
              done ;;
      *) for m2 in $(instance_metrics "$kind" "$m"); do
           record_fail "$s" "$m2" "setup: $(echo "$why" | tail -n 1 | cut -c1-160)"
         done ;;
    esac
    teardown
    return 0
  fi
  guest_sysctls || true
  # A TAP whose program offers offloads (hubnat's) has them on from the start: the plain runs
  # take them off in the guest, as the veth ends' are (offloads_off).
  if [ "$OFFLOADS" = off ] && "${GUEST[@]}" ethtool -i "$(guest_dev)" 2>/dev/null | grep -q '^driver: tun'; then
    "${GUEST[@]}" ethtool -K "$(guest_dev)" tx off tso off >/dev/null 2>&1 || true
  fi
  case "$kind" in
    main)
      if [ "$HAVE_IPERF" = 1 ]; then
        run_iperf "$s" "$m" up
        run_iperf "$s" "$m" down
        run_iperf "$s" "$m" up pps
        run_iperf "$s" "$m" down pps
      fi
      run_load "$s" rr
      run_load "$s" crr ;;
    tput)
      run_iperf "$s" "$m" up
      run_iperf "$s" "$m" down ;;
    ofl)
      # A TAP's program decides what it offers; ask for everything, measure what was taken.
      "${GUEST[@]}" ethtool -K "$(guest_dev)" tx on tso on gso on gro on >/dev/null 2>&1 || true
      run_iperf "$s" "$m" up
      run_iperf "$s" "$m" down ;;
    v6)
      log "  guest's IPv6: $("${GUEST[@]}" ip -6 -o addr show scope global | awk '{print $4}' | tr '\n' ' ')"
      run_iperf "$s" "$m" up
      run_iperf "$s" "$m" down ;;
    fwd)
      local via d
      for via in lo addr; do
        for d in in out; do run_fwd "$s" "$m" "$via" "$d"; done
      done ;;
    mem)
      local n
      for n in "${MEM_LIST[@]}"; do run_mem "$s" "$n"; done ;;
  esac
  teardown
}

# ---------------------------------------------------------------------------------------------
# The run: every system in every round, the order rotated round by round

record_skip() { # system metric note
  jq -nc --arg s "$1" --arg m "$2" --arg n "$3" --argjson r "$ROUND" \
    '{round:$r, system:$s, metric:$m, value:null, unit:"", ok:false, skipped:true, note:$n}' >> "$JSONL"
}

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
START=$(date -u +%Y-%m-%dT%H:%M:%SZ)
log "systems ${SYSTEMS}; MTU ${MTUS}; ${DURATION} s per run; ${ROUNDS} round(s); idle connections ${MEM:-none}"
RUNNABLE=()
for s in "${SYS_LIST[@]}"; do
  if [ -n "${SKIP[$s]:-}" ]; then
    ROUND=1
    fm=""
    [ "$FWD" = 1 ] && fm=$(instance_metrics fwd "${MTU_LIST[0]}")
    [ "$WITH_V6" = 1 ] && fm+=" $(instance_metrics v6 "${MTU_LIST[0]}")"
    for m in $(instance_metrics main "${MTU_LIST[0]}") $fm; do record_skip "$s" "$m" "${SKIP[$s]}"; done
  else
    RUNNABLE+=("$s")
  fi
done
for ROUND in $(seq "$ROUNDS"); do
  n=${#RUNNABLE[@]}
  for i in $(seq 0 $((n - 1))); do
    s=${RUNNABLE[$(( (i + ROUND - 1) % n ))]}
    instance "$s" main "${MTU_LIST[0]}"
    for m in "${MTU_LIST[@]:1}"; do instance "$s" tput "$m"; done
    if [ "$WITH_OFL" = 1 ]; then instance "$s" ofl "${MTU_LIST[0]}"; fi
    if [ "$WITH_V6" = 1 ]; then
      if [ "$s" = softether ]; then
        for m in $(instance_metrics v6 "${MTU_LIST[0]}"); do record_skip "$s" "$m" "no IPv6"; done
      else
        instance "$s" v6 "${MTU_LIST[0]}"
      fi
    fi
    if [ -z "${FWD_SKIP[$s]:-}" ]; then
      instance "$s" fwd "${MTU_LIST[0]}"
    elif [ "$FWD" = 1 ]; then
      for m in $(instance_metrics fwd "${MTU_LIST[0]}"); do record_skip "$s" "$m" "${FWD_SKIP[$s]}"; done
    fi
    if [ ${#MEM_LIST[@]} -gt 0 ]; then
      if [ "$s" = kernel ]; then
        for m in $(instance_metrics mem 0); do record_skip "$s" "$m" "no NAT process: the kernel forwards"; done
      else
        instance "$s" mem "${MTU_LIST[0]}"
      fi
    fi
  done
done

# ---------------------------------------------------------------------------------------------
# The report

MACHINE="$(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), Linux $(uname -r)"
VERSIONS="slirp4netns $(slirp4netns --version 2>/dev/null | awk 'NR==1 {print $3}'), passt $(dpkg-query -W -f '${Version}' passt 2>/dev/null || echo '?'), SoftEther $(dpkg-query -W -f '${Version}' softether-vpnserver 2>/dev/null || echo '?'), iperf3 $(iperf3 --version 2>/dev/null | awk 'NR==1 {print $2}')"
CMDLINE="tools/compare.sh --systems $SYSTEMS --mtu $MTUS --duration $DURATION --rounds $ROUNDS --mem '${MEM}'"
[ "$WITH_OFL" = 1 ] && CMDLINE+=" --with-offloads"
[ "$WITH_V6" = 1 ] && CMDLINE+=" --with-ipv6"
[ "$FWD" = 0 ] && CMDLINE+=" --no-fwd"
FWD_TEXT=""
[ "$FWD" = 1 ] && FWD_TEXT=" Forwarded port: the same iperf3 with its server in the guest (port
$GUEST_PORT) and its client in the NAT namespace, connecting to port $FWD_PORT on 127.0.0.1 or on
the NAT namespace's address $NAT_IP, which the system forwards to the guest (the kernel forwards no
port: its client connects to the guest's address)."
V6_TEXT=""
[ "$WITH_V6" = 1 ] && V6_TEXT=" IPv6: the same iperf3 to the server's $SERVER6 from
the guest's address as the system gives it (hubnat and slirp4netns: SLAAC; pasta: its copy of
the NAT namespace's $NAT6; kernel: static, routed)."
# Which client address the guests saw through the forwards (a line below the table).
fwd_seen() {
  [ -s "$FWD_SEEN" ] || return 0
  printf '\nThe client as the guest saw it (client on 127.0.0.1 / on %s): ' "$NAT_IP"
  sort -u "$FWD_SEEN" | awk -F'\t' '
    !(($1, $2) in seen) { seen[$1, $2] = $3; if (!($1 in known)) { known[$1] = 1; order[++n] = $1 }; next }
    index("," seen[$1, $2] ",", "," $3 ",") == 0 { seen[$1, $2] = seen[$1, $2] "," $3 }
    END {
      for (i = 1; i <= n; i++) {
        s = order[i]
        lo = ((s, "lo") in seen) ? seen[s, "lo"] : "?"
        ad = ((s, "addr") in seen) ? seen[s, "addr"] : "?"
        printf "%s%s %s / %s", (i > 1 ? "; " : ""), s, lo, ad
      }
      print "."
    }'
}
report() { # svg-link
  cat <<EOF
Run $START on $MACHINE; $VERSIONS; hubnat $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?') (profile $PROFILE).
Command: \`$CMDLINE\`. Medians of $ROUNDS round(s); each cell is the figure and, in brackets, its
ratio to hubnat's. iperf3 \`-Z -P4 -l1M\`, ${DURATION} s per direction; latency: 1-byte echo over one
connection; connection rate: connect, 1-byte echo, close; memory: peak RSS (VmHWM, summed over the
NAT namespace's processes) of a fresh instance holding that many idle connections.$FWD_TEXT$V6_TEXT


EOF
  "$CHART" --results "$JSONL" --markdown - --svg "$SVG"
  fwd_seen
  printf '\n![comparison chart](%s)\n' "$1"
}
report "$(basename "$SVG")" > "$OUT"
log "wrote $OUT, $SVG and $JSONL"
if [ "$PERF" != none ]; then
  rel=$(realpath --relative-to="$(dirname "$PERF")" "$SVG")
  block="$WORK/block.md"
  { echo '<!-- compare:begin -->'; report "$rel"; echo '<!-- compare:end -->'; } > "$block"
  if grep -q '<!-- compare:begin -->' "$PERF" 2>/dev/null; then
    awk -v blk="$block" '
      /<!-- compare:begin -->/ { while ((getline l < blk) > 0) print l; skip = 1; next }
      /<!-- compare:end -->/ { skip = 0; next }
      !skip { print }' "$PERF" > "$WORK/perf.new"
  else
    { cat "$PERF" 2>/dev/null || true; echo; cat "$block"; } > "$WORK/perf.new"
  fi
  cat "$WORK/perf.new" > "$PERF"
  log "replaced the compare block in $PERF"
fi
failures=$(jq -s '[.[] | select(.ok == false and (.skipped // false) == false)] | length' "$JSONL")
log "done: $(jq -s '[.[] | select(.ok)] | length' "$JSONL") figures, $failures failed"
