#!/usr/bin/env bash
# Records the real-client scenarios of pcaps/ (dhclient, udhcpc, ping, dig, curl): a namespace lab
# like the end-to-end tests' (guest ns with hubnat's TAP, hubnat's ns, a server ns behind it),
# hubnat running with the replay's MAC, and `hubnat-pcap record --guest-only` on tap0.
# Only the guest's frames are kept: they are the scenario input; the golden output is made by
# the replay (HUBNAT_BLESS=1 cargo test --test replay). Needs root. Traffic stays in the lab.
#
#   cargo build -p hubnat-tools && sudo tools/scripts/capture-real.sh [OUTDIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-pcaps}
BIN=target/debug
TAG=cap$$
G=${TAG}g N=${TAG}n S=${TAG}s
WORK=$(mktemp -d)
PIDS=()

cleanup() {
    for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
    sleep 0.3
    for ns in $G $N $S; do ip netns del "$ns" 2>/dev/null || true; rm -rf "/etc/netns/$ns"; done
    rm -rf "$WORK"
}
trap cleanup EXIT

for ns in $G $N $S; do
    ip netns add "$ns"
    mkdir -p "/etc/netns/$ns" && : > "/etc/netns/$ns/resolv.conf"
    ip -n "$ns" link set lo up
done
# No IPv6 chatter (router solicitations, MLD) in the captures.
ip netns exec $G sysctl -qw net.ipv6.conf.default.disable_ipv6=1 net.ipv6.conf.all.disable_ipv6=1
ip link add ${TAG}a netns $N type veth peer name ${TAG}b netns $S
ip -n $N addr add 10.77.0.1/24 dev ${TAG}a && ip -n $N link set ${TAG}a up
ip -n $S addr add 10.77.0.2/24 dev ${TAG}b && ip -n $S link set ${TAG}b up

# Servers: a tiny DNS responder (www.example.test A 10.77.0.80) and an HTTP server.
cat > "$WORK/dns.py" <<'PY'
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("10.77.0.2", 53))
while True:
    q, a = s.recvfrom(4096)
    if len(q) < 12: continue
    i = 12
    while i < len(q) and q[i]: i += q[i] + 1
    end = i + 5
    r = q[:2] + b"\x81\x80" + q[4:6] + b"\x00\x01\x00\x00\x00\x00" + q[12:end]
    r += b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x01\x2c\x00\x04" + bytes([10, 77, 0, 80])
    s.sendto(r, a)
PY
mkdir -p "$WORK/www" && head -c 20000 /dev/zero | tr '\0' 'x' > "$WORK/www/file"
ip netns exec $S python3 "$WORK/dns.py" & PIDS+=($!)
(cd "$WORK/www" && exec ip netns exec $S python3 -m http.server 8080 --bind 10.77.0.2) >/dev/null 2>&1 & PIDS+=($!)

cat > "$WORK/hubnat.toml" <<'TOML'
[host]
mac = "00:ac:00:00:00:01"
[dhcp]
domain = "replay.test"
[dns]
upstream = ["10.77.0.2"]
TOML
ip netns exec $N "$BIN/hubnat" run --tap tap0 --netns $G --config "$WORK/hubnat.toml" \
    --state-dir "$WORK/state" --log warn & PIDS+=($!)
for _ in $(seq 100); do ip -n $G link show tap0 >/dev/null 2>&1 && break; sleep 0.05; done
sleep 0.5

# record NAME CMD...: capture the guest's frames while CMD runs in the guest namespace.
record() {
    local name=$1; shift
    "$BIN/hubnat-pcap" record --netns $G --iface tap0 --guest-only --out "$OUT/$name.in.pcap" &
    local rec=$!
    sleep 0.3
    ip netns exec $G "$@" || echo "($name: client exited with $?)"
    sleep 0.5
    kill -INT $rec; wait $rec || true
}

record real_dhclient sh -c "dhclient -1 -v -sf /bin/true -lf $WORK/dh.leases -pf $WORK/dh.pid tap0 && dhclient -r -sf /bin/true -lf $WORK/dh.leases -pf $WORK/dh.pid tap0"
record real_udhcpc busybox udhcpc -i tap0 -n -q -f -s /bin/true -t 3 -T 1
ip -n $G addr add 192.168.30.50/24 dev tap0
ip -n $G route add default via 192.168.30.1
record real_ping sh -c "ping -c 3 -i 0.2 192.168.30.1 && ping -c 3 -i 0.2 10.77.0.2"
record real_dig dig @192.168.30.1 www.example.test A +tries=1 +time=2
record real_curl curl -sS -o /dev/null --max-time 5 http://10.77.0.2:8080/file
ls -l "$OUT"/real_*.in.pcap
