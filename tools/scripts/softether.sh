# shellcheck shell=bash
# SoftEther VPN Server with SecureNAT for the benchmark scripts (compare.sh, bench-dhcp.sh):
# sourced, not run.
#
# softether_start NS IFACE DIR MTU [VPNCMD...]
#   Starts the Debian build's vpnserver in network namespace NS, in a mount namespace of its own
#   whose /var/lib, /var/log and /run are private directories under DIR (its state stays out of
#   the machine's), bridges its hub DEFAULT to IFACE and enables SecureNAT in user mode at MTU.
#   Each further argument is one more vpncmd command, run before SecureNAT is enabled. The
#   server's PID is appended to the caller's PIDS array, its logs go to DIR. On failure it
#   returns non-zero after a line on stdout that says why.
softether_start() {
  local ns=$1 iface=$2 se=$3 mtu=$4 c i
  shift 4
  mkdir -p "$se"/{lib,log,run,exe}
  cp -L /usr/libexec/softether/vpnserver/* "$se/exe/"
  cat > "$se/private.sh" <<EOF
#!/bin/sh
set -e
mount --make-rprivate /
mount --bind "$se/lib" /var/lib
mount --bind "$se/log" /var/log
mount --bind "$se/run" /run
mkdir -p /var/lib/softether /var/log/softether /run/softether
exec "\$@"
EOF
  chmod 755 "$se/private.sh"
  ip netns exec "$ns" unshare -m "$se/private.sh" "$se/exe/vpnserver" execsvc \
    > "$se/vpnserver.log" 2>&1 &
  PIDS+=($!)
  for i in $(seq 100); do
    ip netns exec "$ns" sh -c 'ss -ltn | grep -q ":5555 "' && break
    [ "$i" = 100 ] && { echo "vpnserver did not listen: $(head -n 1 "$se/vpnserver.log")"; return 1; }
    sleep 0.2
  done
  for c in "/SERVER /CMD KeepDisable" \
           "/SERVER /CMD BridgeCreate DEFAULT /DEVICE:$iface /TAP:no" \
           "/SERVER /ADMINHUB:DEFAULT /CMD ExtOptionSet DisableKernelModeSecureNAT /VALUE:1" \
           "/SERVER /ADMINHUB:DEFAULT /CMD ExtOptionSet DisableIpRawModeSecureNAT /VALUE:1" \
           "$@" \
           "/SERVER /ADMINHUB:DEFAULT /CMD NatSet /MTU:$mtu /TCPTIMEOUT:7200 /UDPTIMEOUT:60 /LOG:no" \
           "/SERVER /ADMINHUB:DEFAULT /CMD SecureNatEnable"; do
    # shellcheck disable=SC2086
    if ! ip netns exec "$ns" unshare -m "$se/private.sh" timeout 20 \
         vpncmd localhost:5555 /PASSWORD: $c < /dev/null >> "$se/vpncmd.log" 2>&1; then
      echo "vpncmd $c failed: $(tail -n 3 "$se/vpncmd.log" | tr '\n' ' ')"; return 1
    fi
  done
}
