#!/usr/bin/env bash
# Builds the small QEMU guest the end-to-end tests boot (tests/e2e_qemu.rs): Debian's kernel and
# a busybox initramfs whose /init follows instructions on the kernel command line and reports each
# step on the serial console.
#
# Usage: tools/qemu-guest.sh [CACHE_DIR]    (default: target/qemu-guest/ of the repository)
#
# Everything comes from Debian packages through apt (`apt-get download`, unpacked with `dpkg-deb
# -x`; nothing is installed on the host but missing build tools). A second run reuses the
# packages and the built guest and takes well under a second. The last two lines of the output
# are the paths, `kernel=PATH` and `initrd=PATH`, for scripts and tests to read.
#
# The guest's kernel command line (`hn.*` words, read by /init from /proc/cmdline):
#   hn.lookup=NAME[,NAME]   resolve each name through the nameserver DHCP gave
#   hn.fetch=URL            fetch URL with busybox wget (which resolves a name in it itself)
#   hn.ping=IP[,IP]         ping each address (the guest's own one is skipped), retrying
#                           for up to hn.pingtime seconds (default 30) while a peer boots
#   hn.wait=SECONDS         stay up that long before powering off (for a peer to ping)
#   hn.probe=1              power off right after HN-BOOT (tells whether an accelerator works)
# Console markers, one line each: HN-BOOT, HN-MODULES, HN-LINK, HN-LEASE <ip> ..., HN-LOOKUP <name>
# -> <addr>, HN-FETCH ok <bytes> <first line>, HN-PING <ip> ok, HN-WAIT, HN-DONE; a step that
# fails says `failed` in place of its result.
set -euo pipefail

die() {
  echo "qemu-guest.sh: $*" >&2
  exit 1
}

repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${1:-$repo/target/qemu-guest}
mkdir -p "$cache"
cache=$(cd "$cache" && pwd)
# Test binaries may run this side by side: one builds, the others then find it cached.
exec 9>"$cache/.lock"
flock 9

[ "$(dpkg --print-architecture 2>/dev/null)" = amd64 ] ||
  die "this builds an x86-64 guest from the host's apt sources; the host must be Debian amd64"

# Build tools: dpkg-deb and apt come with Debian; cpio usually does not.
for tool in cpio gzip; do
  if ! command -v "$tool" >/dev/null; then
    [ "$(id -u)" = 0 ] || die "$tool is missing; install it (apt-get install $tool) or run as root"
    echo "installing $tool" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$tool" >&2 ||
      die "cannot install $tool"
  fi
done
command -v qemu-system-x86_64 >/dev/null ||
  echo "note: qemu-system-x86_64 is not installed (apt-get install qemu-system-x86); the guest is built anyway" >&2

# linux-image-amd64 is a metapackage; the kernel itself is the versioned package it depends on.
kernel_pkg() {
  apt-cache depends linux-image-amd64 2>/dev/null |
    awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }'
}

kpkg=$(kernel_pkg)
if [ -z "$kpkg" ]; then
  # A fresh machine may have no package lists yet.
  [ "$(id -u)" = 0 ] || die "apt does not know linux-image-amd64; run apt-get update as root"
  echo "apt knows no kernel package yet: apt-get update" >&2
  apt-get update -q >&2 || die "apt-get update failed"
  kpkg=$(kernel_pkg)
fi
[ -n "$kpkg" ] || die "cannot resolve linux-image-amd64 to a kernel package (apt-cache depends linux-image-amd64)"
# Both candidate versions from one apt-cache run (each run reads the whole cache).
versions=$(apt-cache policy "$kpkg" busybox-static 2>/dev/null |
  awk '/^[^ ]/ { pkg = $1; sub(/:$/, "", pkg) } /Candidate:/ && $2 != "(none)" { print pkg, $2 }')
kver=$(awk -v p="$kpkg" '$1 == p { print $2 }' <<<"$versions")
bver=$(awk '$1 == "busybox-static" { print $2 }' <<<"$versions")
[ -n "$kver" ] || die "apt has no candidate for $kpkg"
[ -n "$bver" ] || die "apt has no candidate for busybox-static"

kernel=$cache/vmlinuz
initrd=$cache/initrd.gz
stamp=$cache/guest.stamp
# The guest is rebuilt when a package or this script (which holds /init) changes.
want="$kpkg=$kver busybox-static=$bver script=$(sha256sum "$0" | cut -c1-16)"
if [ -f "$kernel" ] && [ -f "$initrd" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  echo "cached: $want" >&2
  echo "kernel=$kernel"
  echo "initrd=$initrd"
  exit 0
fi

# apt-get download writes into the current directory, under apt's own file name (the epoch's
# colon as %3a); a package is downloaded once and kept.
debs=$cache/debs
mkdir -p "$debs"
fetch_deb() {
  local pkg=$1 ver=$2 file
  file=$debs/${pkg}_${ver//:/%3a}_amd64.deb
  if [ ! -s "$file" ]; then
    echo "downloading $pkg $ver" >&2
    # As root apt warns that its _apt user cannot write here; the download works regardless.
    (cd "$debs" && apt-get download -q "$pkg=$ver" 2>&1 | grep -v "unsandboxed as root" >&2) || true
    [ -s "$file" ] || die "apt-get download $pkg=$ver did not produce $file"
  fi
  echo "$file"
}
kdeb=$(fetch_deb "$kpkg" "$kver")
bdeb=$(fetch_deb busybox-static "$bver")

work=$(mktemp -d "$cache/work.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "unpacking $kpkg" >&2
dpkg-deb -x "$kdeb" "$work/kernel"
dpkg-deb -x "$bdeb" "$work/busybox"

kv=${kpkg#linux-image-}
config=$work/kernel/boot/config-$kv
moddir=$work/kernel/lib/modules/$kv
[ -f "$work/kernel/boot/vmlinuz-$kv" ] || die "$kpkg has no /boot/vmlinuz-$kv"
[ -f "$config" ] || die "$kpkg has no /boot/config-$kv to tell built-in drivers from modules"
[ -x "$work/busybox/bin/busybox" ] || die "busybox-static has no /bin/busybox"

root=$work/root
mkdir -p "$root"/{bin,dev,proc,sys,tmp,etc,lib/modules}
cp "$work/busybox/bin/busybox" "$root/bin/busybox"
ln -s busybox "$root/bin/sh"

# A module's file (by name, `-` and `_` alike), uncompressed into the initramfs (busybox insmod
# takes plain .ko files).
declare -A loaded=()
order=()
module_file() {
  find "$moddir/kernel" -name "$1.ko" -o -name "$1.ko.xz" -o -name "$1.ko.zst" -o -name "$1.ko.gz" |
    head -n1
}
add_module() {
  local name=${1//-/_} file dep plain
  [ -n "${loaded[$name]:-}" ] && return 0
  loaded[$name]=1
  file=$(module_file "$name")
  [ -z "$file" ] && file=$(module_file "${name//_/-}")
  [ -n "$file" ] || die "module $name is neither built into $kpkg nor shipped in it"
  plain=$root/lib/modules/$name.ko
  case $file in
    *.xz) xz -dc "$file" >"$plain" ;;
    *.zst) command -v zstd >/dev/null || die "$file needs zstd to unpack"; zstd -qdc "$file" >"$plain" ;;
    *.gz) gzip -dc "$file" >"$plain" ;;
    *) cp "$file" "$plain" ;;
  esac
  # Dependencies first: the module's own .modinfo names them.
  for dep in $(tr '\0' '\n' <"$plain" | sed -n 's/^depends=//p' | tr ',' ' '); do
    add_module "$dep"
  done
  order+=("$name")
}
# The drivers of QEMU's virtio-net-pci: taken as modules where the kernel has them as modules.
for pair in VIRTIO_PCI:virtio_pci VIRTIO_NET:virtio_net; do
  sym=CONFIG_${pair%%:*}
  mod=${pair#*:}
  case $(sed -n "s/^$sym=//p" "$config") in
    y) echo "$sym is built in" >&2 ;;
    m) add_module "$mod" ;;
    *) die "$kpkg has no $sym: it cannot drive virtio-net-pci" ;;
  esac
done
printf '%s\n' "${order[@]}" >"$root/lib/modules/load-order"
echo "modules: ${order[*]:-(none, all built in)}" >&2

cat >"$root/etc/udhcpc.script" <<'EOF'
#!/bin/sh
# busybox udhcpc's hook: applies the lease and records it for /init. The resolv.conf written
# here is the guest's own (inside its initramfs).
case "$1" in
  deconfig)
    ip link set "$interface" up
    ip -4 addr flush dev "$interface" ;;
  bound|renew)
    ip -4 addr flush dev "$interface"
    ip addr add "$ip/$mask" dev "$interface"
    [ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
    : >/etc/resolv.conf
    [ -n "$domain" ] && echo "search $domain" >>/etc/resolv.conf
    for d in $dns; do echo "nameserver $d" >>/etc/resolv.conf; done
    echo "$ip mask=$mask router=${router%% *} dns=$(echo "$dns" | tr -s ' ' ',') domain=$domain" >/tmp/lease ;;
esac
exit 0
EOF

cat >"$root/init" <<'EOF'
#!/bin/busybox sh
# The guest's whole life: bring the NIC up, take a DHCP lease, do what the kernel command line
# asks, report each step as an HN-* line on the console, power off.
/bin/busybox mkdir -p /proc /sys /dev /tmp
/bin/busybox mount -t devtmpfs devtmpfs /dev
# The initramfs has no /dev/console node of its own, so until here nothing could be printed.
exec </dev/console >/dev/console 2>&1
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
# Keep kernel messages from splitting the marker lines.
echo 1 >/proc/sys/kernel/printk

say() { echo "HN-$*"; }
finish() {
  say DONE
  sync
  poweroff -f
}

lookup='' fetch='' ping='' wait=0 pingtime=30 probe=''
for w in $(cat /proc/cmdline); do
  case $w in
    hn.lookup=*) lookup=${w#hn.lookup=} ;;
    hn.fetch=*) fetch=${w#hn.fetch=} ;;
    hn.ping=*) ping=${w#hn.ping=} ;;
    hn.pingtime=*) pingtime=${w#hn.pingtime=} ;;
    hn.wait=*) wait=${w#hn.wait=} ;;
    hn.probe=*) probe=1 ;;
  esac
done
say BOOT "$(uname -r)"
[ -n "$probe" ] && finish

for m in $(cat /lib/modules/load-order); do
  insmod "/lib/modules/$m.ko" || say MODULES failed "$m"
done
say MODULES "$(tr '\n' ' ' </lib/modules/load-order)"

i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do
  sleep 0.1
  i=$((i + 1))
done
if [ ! -e /sys/class/net/eth0 ]; then
  say LINK failed no eth0
  finish
fi
ip link set lo up
ip link set eth0 up
say LINK eth0 "$(cat /sys/class/net/eth0/address)"

if ! udhcpc -i eth0 -f -q -n -t 10 -T 2 -x hostname:hn-guest -s /etc/udhcpc.script >/tmp/udhcpc.log 2>&1 ||
  [ ! -s /tmp/lease ]; then
  say LEASE failed "$(tail -n 2 /tmp/udhcpc.log | tr '\n' ' ')"
  finish
fi
say LEASE "$(cat /tmp/lease)"
me=$(cut -d' ' -f1 /tmp/lease)

# The addresses busybox nslookup gives for a name (through the nameserver DHCP gave), one line:
# it prints the server first, then `Name:` and the answers' `Address:` lines.
resolve() {
  nslookup "$1" 2>/dev/null |
    awk '/^Name:/ { ans = 1 } ans && /^Address/ { sub(/^Address( [0-9]+)?:[ \t]*/, ""); printf "%s%s", sep, $0; sep = " " }'
}

for name in $(echo "$lookup" | tr ',' ' '); do
  addrs=$(resolve "$name")
  if [ -n "$addrs" ]; then
    say LOOKUP "$name -> $addrs"
  else
    say LOOKUP "$name failed"
  fi
done

if [ -n "$fetch" ]; then
  # Bounded by `timeout`: this busybox's own wget -T crashes (static build).
  if timeout 30 wget -q -O /tmp/fetched "$fetch" 2>/tmp/wget.log; then
    say FETCH ok "$(wc -c </tmp/fetched) $(head -n 1 /tmp/fetched)"
  else
    say FETCH failed "$(tr '\n' ' ' </tmp/wget.log)"
  fi
fi

for peer in $(echo "$ping" | tr ',' ' '); do
  [ "$peer" = "$me" ] && continue
  # The peer may still be booting: keep trying until it answers or time runs out.
  end=$(($(date +%s) + pingtime)) ok=
  while [ "$(date +%s)" -lt $end ]; do
    if ping -c 1 -W 1 "$peer" >/dev/null 2>&1; then
      ok=1
      break
    fi
    sleep 0.5
  done
  if [ -n "$ok" ]; then say PING "$peer ok"; else say PING "$peer failed"; fi
done

if [ "$wait" -gt 0 ]; then
  say WAIT "$wait"
  sleep "$wait"
fi
finish
EOF
chmod 755 "$root/init" "$root/etc/udhcpc.script"

cp "$work/kernel/boot/vmlinuz-$kv" "$kernel.tmp"
# The archive lists every file as root's, whoever builds it.
(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) | gzip -9n >"$initrd.tmp"
mv "$kernel.tmp" "$kernel"
mv "$initrd.tmp" "$initrd"
echo "$want" >"$stamp"
echo "built: $want" >&2
echo "kernel=$kernel"
echo "initrd=$initrd"
