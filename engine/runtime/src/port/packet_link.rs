//! `PacketPort`: hubnat's port on an interface that already exists (`--attach IFACE`), joined
//! by an AF_PACKET socket. The interface's far side is the guests' segment (a veth whose peer is
//! in a container, a bridge's port, a NIC): frames arriving on it are the guests', frames hubnat
//! sends leave by it.
//!
//! Reads go through a TPACKET_V2 ring: the kernel copies each frame into a slot of a mapping
//! shared with hubnat and makes the socket readable at once, so a lone frame (a DNS query, a
//! SYN) is read as soon as it arrives, and a burst is read slot after slot without a system
//! call per frame. (TPACKET_V3 packs frames tighter but hands them over a block at a time, so
//! a frame arriving alone waited for the block's retire timer: about a millisecond.) Where the
//! ring cannot be had (an inherited socket, a kernel that refuses it) frames are read one
//! recvmsg(2) each.
//!
//! A guest behind a veth or a bridge sends with its offloads on: TCP and UDP checksums left for
//! the "hardware" to fill in, TSO/GSO super-frames of up to 64 KiB. The socket asks for a
//! virtio_net_hdr before each frame (PACKET_VNET_HDR), which says what a frame left undone; the
//! port does it (completes the checksum, cuts the super-frame into MTU-sized segments) before
//! handing the frame out, as the NIC would have on the wire.

use std::ffi::CString;
use std::io;
use std::mem::{offset_of, size_of};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};

use crate::port::af_packet::{check, ETH_P_ALL_BE};
use crate::port::link::{Link, LinkStatus};
use crate::sock::driver::setsockopt_int;

/// `struct virtio_net_hdr` (without `num_buffers`), as PACKET_VNET_HDR puts it before a frame.
const VNET_HDR_LEN: usize = 10;
const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
const VIRTIO_NET_HDR_GSO_TCPV6: u8 = 4;
const VIRTIO_NET_HDR_GSO_UDP_L4: u8 = 5;
const VIRTIO_NET_HDR_GSO_ECN: u8 = 0x80;

const ETH_HLEN: usize = 14;
const VLAN_HLEN: usize = 4;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_SCTP: u8 = 132;

/// The most payload one super-frame may carry: the kernel's GSO limit without BIG TCP. A
/// super-frame is cut lazily, one segment per `recv`, so this bounds work, not memory.
const MAX_GSO_PAYLOAD: usize = 1 << 16;

/// The buffer of plain reads: the header and a whole super-frame.
const PLAIN_BUF_LEN: usize = VNET_HDR_LEN + MAX_GSO_PAYLOAD + 512;

/// The longest frame a ring slot must hold whole: what a plain read takes.
const MAX_SUPER_FRAME: usize = PLAIN_BUF_LEN - VNET_HDR_LEN;
/// The most the kernel puts before a frame in its slot: the tpacket2_hdr and sockaddr_ll, at
/// least 16 bytes for the link header plus up to 15 that align the network header, and the
/// virtio_net_hdr right before the frame.
const SLOT_HEADROOM: usize = libc::TPACKET2_HDRLEN + 2 * libc::TPACKET_ALIGNMENT + VNET_HDR_LEN;

// The ring's shape. The kernel cuts a frame that does not fit its slot, and a cut frame is
// lost, so every slot holds a whole super-frame: each costs ~68 KiB whatever it carries, and
// the ring is counted in frames, not bytes. The kernel allocates a block as a power-of-two run
// of pages, so a block is a power of two cut into as many slots as fit: 1 MiB holds 15, with
// 3.7 KiB of slack each (a 16th would not fit). Four blocks, 4 MiB per port: 60 frames may
// wait for the control thread. A socket's default receive buffer (212992 bytes) holds more
// small frames (256 of 100 bytes, 93 of 1000) but only three super-frames, and a TSO sender
// sends little else; past 60, the kernel drops and counts what comes.
const RING_BLOCK_SIZE: usize = 1 << 20;
const RING_SLOT_SIZE: usize = (RING_BLOCK_SIZE / 15) & !(libc::TPACKET_ALIGNMENT - 1);
const RING_BLOCKS: usize = 4;
const _: () = assert!(RING_SLOT_SIZE >= SLOT_HEADROOM + MAX_SUPER_FRAME);
const RING_GEOMETRY: Geometry = Geometry {
    block: RING_BLOCK_SIZE,
    slot: RING_SLOT_SIZE,
    blocks: RING_BLOCKS,
};

// Where things are in a TPACKET_V2 slot (linux/if_packet.h).
const TP2_STATUS: usize = offset_of!(libc::tpacket2_hdr, tp_status);
const TP2_LEN: usize = offset_of!(libc::tpacket2_hdr, tp_len);
const TP2_SNAPLEN: usize = offset_of!(libc::tpacket2_hdr, tp_snaplen);
const TP2_MAC: usize = offset_of!(libc::tpacket2_hdr, tp_mac);
const TP2_VLAN_TCI: usize = offset_of!(libc::tpacket2_hdr, tp_vlan_tci);
const TP2_VLAN_TPID: usize = offset_of!(libc::tpacket2_hdr, tp_vlan_tpid);
/// The frame's `sockaddr_ll` follows its header, aligned.
const TP2_PKTTYPE: usize = libc::TPACKET2_HDRLEN - size_of::<libc::sockaddr_ll>()
    + offset_of!(libc::sockaddr_ll, sll_pkttype);

/// What the port did with offloaded frames, beside `LinkStatus`'s counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PacketStats {
    /// Whether reads use the TPACKET_V2 ring (else one recvmsg(2) per frame).
    pub ring: bool,
    /// Whether frames carry a virtio_net_hdr (else offloaded frames cannot be told apart).
    pub vnet_hdr: bool,
    /// TSO/GSO super-frames received.
    pub gso_frames: u64,
    /// The segments they were cut into.
    pub segments: u64,
    /// Frames whose checksum the guest left to the hardware and the port completed.
    pub checksums: u64,
    /// Frames the kernel dropped for want of room in the ring (or the socket's buffer).
    pub kernel_drops: u64,
}

#[derive(Default)]
struct Counters {
    malformed: AtomicU64,
    send_failed: AtomicU64,
    gso_frames: AtomicU64,
    segments: AtomicU64,
    checksums: AtomicU64,
    kernel_drops: AtomicU64,
}

impl Counters {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// How a port is set up: what `attach` always does, and what tests turn off to reach the
/// fallbacks.
#[derive(Clone, Copy, Debug)]
struct Setup {
    /// None: plain reads.
    ring: Option<Geometry>,
    ignore_outgoing: bool,
}

/// A port on an existing interface (see the module comment).
pub struct PacketPort {
    fd: OwnedFd,
    ifindex: i32,
    /// The interface's name when the port was made (for logs; it may be renamed since).
    name: String,
    kind: &'static str,
    max_frame: usize,
    vnet: bool,
    ring: bool,
    /// Only `recv` (the control thread) takes it; `send` goes straight to the socket.
    rx: Mutex<Rx>,
    counters: Counters,
}

impl PacketPort {
    /// Joins interface `iface` of the calling thread's network namespace: every frame that
    /// arrives on it (promiscuously) is handed out by `recv`, at most `max_frame` bytes long;
    /// `send` puts frames on it. Frames sent on the interface (by hubnat or the host) are not
    /// read back. Fails, naming the interface, when it is missing or down.
    pub fn attach(iface: &str, max_frame: usize) -> io::Result<PacketPort> {
        PacketPort::attach_with(
            iface,
            max_frame,
            Setup {
                ring: Some(RING_GEOMETRY),
                ignore_outgoing: true,
            },
        )
    }

    fn attach_with(iface: &str, max_frame: usize, setup: Setup) -> io::Result<PacketPort> {
        if iface.is_empty() || iface.len() >= libc::IFNAMSIZ || iface.contains(['/', '\0']) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("`{iface}` is not an interface name"),
            ));
        }
        check_max_frame(max_frame)?;
        let name = CString::new(iface).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no interface `{iface}` in this network namespace"),
            ));
        }
        let context = |what: &str, e: io::Error| {
            io::Error::new(e.kind(), format!("interface `{iface}`: {what}: {e}"))
        };
        // Protocol 0: nothing is queued until `bind` names the interface, so frames of other
        // interfaces never reach the ring.
        // SAFETY: plain socket(2) call; the result is checked before use.
        let raw = check(unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        })
        .map_err(|e| context("cannot open an AF_PACKET socket (needs CAP_NET_RAW)", e))?;
        // SAFETY: `raw` is a socket we just opened and own from here on.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let flags = if_flags(fd.as_raw_fd(), iface).map_err(|e| context("flags", e))?;
        if flags & libc::IFF_UP == 0 {
            return Err(io::Error::other(format!("interface `{iface}` is down")));
        }
        let raw = fd.as_raw_fd();
        // Before the ring: the kernel refuses to change it once a ring is set up.
        let vnet = match setsockopt_int(raw, libc::SOL_PACKET, libc::PACKET_VNET_HDR, 1) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(
                    "interface `{iface}`: no virtio_net_hdr ({e}): frames a guest left to its \
                     offloads are dropped as malformed"
                );
                false
            }
        };
        if setup.ignore_outgoing {
            if let Err(e) = setsockopt_int(raw, libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, 1) {
                // Outgoing frames are still dropped by their packet type, after the copy.
                tracing::debug!("interface `{iface}`: PACKET_IGNORE_OUTGOING refused: {e}");
            }
        }
        let source = match setup.ring {
            Some(geometry) => match Ring::new(raw, geometry) {
                Ok(ring) => Source::Ring(ring),
                Err(NoRing::Refused(e)) => {
                    tracing::info!(
                        "interface `{iface}`: no TPACKET_V2 ring ({e}); one recvmsg per frame"
                    );
                    Source::Plain(Plain::new(raw)?)
                }
                Err(NoRing::Stuck(e)) => return Err(context("receive ring", e)),
            },
            None => Source::Plain(Plain::new(raw)?),
        };
        add_promisc(raw, ifindex as i32).map_err(|e| context("promiscuous mode", e))?;
        // SAFETY: an all-zero sockaddr_ll is a valid value of this plain C struct.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ETH_P_ALL_BE;
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: `sll` is an initialised sockaddr_ll and the length passed is its size.
        check(unsafe {
            libc::bind(
                raw,
                (&sll as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        })
        .map_err(|e| context("bind", e))?;
        Ok(PacketPort {
            fd,
            ifindex: ifindex as i32,
            name: iface.to_owned(),
            kind: "packet",
            max_frame,
            vnet,
            ring: matches!(source, Source::Ring(_)),
            rx: Mutex::new(Rx {
                source,
                cutting: None,
            }),
            counters: Counters::default(),
        })
    }

    /// Takes over an inherited AF_PACKET raw socket, already bound to its interface. It is read
    /// one recvmsg(2) per frame (the ring would need a socket set up from scratch), and asked
    /// for virtio_net_hdrs where it still can be.
    pub fn from_fd(fd: OwnedFd, max_frame: usize) -> io::Result<PacketPort> {
        check_max_frame(max_frame)?;
        let raw = fd.as_raw_fd();
        let bad = |why: &str| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("descriptor {raw} {why}"),
            )
        };
        if getsockopt_int(raw, libc::SOL_SOCKET, libc::SO_DOMAIN)? != libc::AF_PACKET {
            return Err(bad("is not an AF_PACKET socket"));
        }
        if getsockopt_int(raw, libc::SOL_SOCKET, libc::SO_TYPE)? != libc::SOCK_RAW {
            return Err(bad(
                "is not a raw packet socket (frames would lack their Ethernet header)",
            ));
        }
        // SAFETY: an all-zero sockaddr_ll is a valid value of this plain C struct.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: `sll`/`len` describe a writable sockaddr_ll of the size given.
        check(unsafe {
            libc::getsockname(raw, (&mut sll as *mut libc::sockaddr_ll).cast(), &mut len)
        })?;
        if sll.sll_ifindex <= 0 {
            return Err(bad("is not bound to an interface"));
        }
        // SAFETY: fcntl on a descriptor we own; only its status flags change.
        let fl = check(unsafe { libc::fcntl(raw, libc::F_GETFL) })?;
        // SAFETY: as above.
        check(unsafe { libc::fcntl(raw, libc::F_SETFL, fl | libc::O_NONBLOCK) })?;
        let vnet = match setsockopt_int(raw, libc::SOL_PACKET, libc::PACKET_VNET_HDR, 1) {
            Ok(()) => true,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                return Err(bad(
                    "has a PACKET_MMAP ring: its frames would never reach recvmsg",
                ));
            }
            Err(_) => getsockopt_int(raw, libc::SOL_PACKET, libc::PACKET_VNET_HDR)? != 0,
        };
        // Refused or not, outgoing frames are dropped by their packet type.
        let _ = setsockopt_int(raw, libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, 1);
        let name = if_name(raw, sll.sll_ifindex)
            .unwrap_or_else(|_| format!("ifindex {}", sll.sll_ifindex));
        if let Err(e) = add_promisc(raw, sll.sll_ifindex) {
            tracing::warn!("descriptor {raw} on `{name}`: no promiscuous mode: {e}");
        }
        Ok(PacketPort {
            ifindex: sll.sll_ifindex,
            name,
            kind: "fd",
            max_frame,
            vnet,
            ring: false,
            rx: Mutex::new(Rx {
                source: Source::Plain(Plain::new(raw)?),
                cutting: None,
            }),
            counters: Counters::default(),
            fd,
        })
    }

    /// What the port did with offloaded frames, and what the kernel dropped.
    pub fn stats(&self) -> PacketStats {
        // SAFETY: an all-zero tpacket_stats_v3 is a valid value of this plain C struct.
        let mut st: libc::tpacket_stats_v3 = unsafe { std::mem::zeroed() };
        let mut len = size_of::<libc::tpacket_stats_v3>() as libc::socklen_t;
        // SAFETY: `st`/`len` describe a writable buffer of the size given; the kernel writes at
        // most `len` bytes (and resets its counters, which is why they are added up here).
        let got = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_STATISTICS,
                (&mut st as *mut libc::tpacket_stats_v3).cast(),
                &mut len,
            )
        };
        if got == 0 {
            self.counters
                .kernel_drops
                .fetch_add(u64::from(st.tp_drops), Ordering::Relaxed);
        }
        let c = &self.counters;
        PacketStats {
            ring: self.ring,
            vnet_hdr: self.vnet,
            gso_frames: c.gso_frames.load(Ordering::Relaxed),
            segments: c.segments.load(Ordering::Relaxed),
            checksums: c.checksums.load(Ordering::Relaxed),
            kernel_drops: c.kernel_drops.load(Ordering::Relaxed),
        }
    }

    /// Whether the interface the socket is bound to still exists (by index: a new interface of
    /// the same name is not this one).
    fn interface_exists(&self) -> bool {
        if_name(self.fd.as_raw_fd(), self.ifindex).is_ok()
    }

    fn interface_up(&self) -> bool {
        if_name(self.fd.as_raw_fd(), self.ifindex)
            .and_then(|name| if_flags(self.fd.as_raw_fd(), &name))
            .is_ok_and(|flags| flags & libc::IFF_UP != 0)
    }

    /// What a socket error means for `recv`: a read that would block is the end of the batch;
    /// the interface going down is too (the socket resumes when it comes back up), unless it
    /// is gone for good.
    fn read_error(&self, e: io::Error) -> io::Result<Option<usize>> {
        match e.raw_os_error() {
            Some(libc::EAGAIN | libc::EINTR) => Ok(None),
            Some(libc::ENETDOWN) if self.interface_exists() => Ok(None),
            Some(libc::ENETDOWN | libc::ENODEV | libc::ENXIO) => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("interface `{}` is gone", self.name),
            )),
            _ => Err(e),
        }
    }

    /// A ring's reader never calls recv(2), which is where an error the kernel left on the
    /// socket (the interface went down or away) would surface: look for one when the ring is
    /// empty.
    fn pending_error(&self) -> io::Result<Option<usize>> {
        match getsockopt_int(self.fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_ERROR) {
            Ok(0) => Ok(None),
            Ok(errno) => self.read_error(io::Error::from_raw_os_error(errno)),
            Err(e) => Err(e),
        }
    }

    /// Hands out `frame` (in `bytes`) into `buf`, or the cutting of it when it is a
    /// super-frame; drops it (counted malformed) when it cannot be made whole within the
    /// port's largest frame.
    fn take(&self, bytes: &[u8], frame: &FrameDesc, buf: &mut [u8]) -> Taken {
        let malformed = || {
            Counters::bump(&self.counters.malformed);
            Taken::Dropped
        };
        if frame.truncated {
            return malformed();
        }
        let Some(data) = bytes.get(frame.start..frame.start + frame.len) else {
            return malformed();
        };
        let tag_len = if frame.vlan.is_some() { VLAN_HLEN } else { 0 };
        let limit = self.max_frame.min(buf.len()).saturating_sub(tag_len);
        if frame.hdr.gso_type != VIRTIO_NET_HDR_GSO_NONE {
            return match Segmenter::new(data, &frame.hdr, limit) {
                Ok(seg) => {
                    Counters::bump(&self.counters.gso_frames);
                    Taken::Cut(Cutting {
                        seg,
                        start: frame.start,
                        len: frame.len,
                        vlan: frame.vlan,
                    })
                }
                Err(Malformed) => malformed(),
            };
        }
        if data.len() < ETH_HLEN || data.len() > limit {
            return malformed();
        }
        buf[..data.len()].copy_from_slice(data);
        if frame.hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
            if complete_checksum(&mut buf[..data.len()], &frame.hdr).is_err() {
                return malformed();
            }
            Counters::bump(&self.counters.checksums);
        }
        match insert_tag(buf, data.len(), frame.vlan) {
            Some(n) => Taken::Frame(n),
            None => malformed(),
        }
    }
}

fn check_max_frame(max_frame: usize) -> io::Result<()> {
    if max_frame < ETH_HLEN + 46 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a largest frame of {max_frame} bytes is shorter than Ethernet's shortest"),
        ));
    }
    Ok(())
}

enum Taken {
    Frame(usize),
    Cut(Cutting),
    Dropped,
}

impl Link for PacketPort {
    fn kind(&self) -> &'static str {
        self.kind
    }

    fn address(&self) -> String {
        self.name.clone()
    }

    fn register(&self, registry: &Registry, token: Token) -> io::Result<()> {
        registry.register(
            &mut SourceFd(&self.fd.as_raw_fd()),
            token,
            Interest::READABLE,
        )
    }

    fn deregister(&self, registry: &Registry) -> io::Result<()> {
        registry.deregister(&mut SourceFd(&self.fd.as_raw_fd()))
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let mut rx = self.rx.lock().unwrap_or_else(PoisonError::into_inner);
        let Rx { source, cutting } = &mut *rx;
        loop {
            if let Some(cut) = cutting {
                let frame = source
                    .bytes()
                    .get(cut.start..cut.start + cut.len)
                    .unwrap_or_default();
                let tag_len = if cut.vlan.is_some() { VLAN_HLEN } else { 0 };
                let room = buf.len().saturating_sub(tag_len);
                match cut.seg.next(frame, &mut buf[..room]) {
                    Ok(Some(n)) => {
                        Counters::bump(&self.counters.segments);
                        if let Some(n) = insert_tag(buf, n, cut.vlan) {
                            return Ok(Some(n));
                        }
                        Counters::bump(&self.counters.malformed);
                        *cutting = None;
                    }
                    Ok(None) => *cutting = None,
                    Err(Malformed) => {
                        Counters::bump(&self.counters.malformed);
                        *cutting = None;
                    }
                }
                continue;
            }
            let frame = match source.next(self.fd.as_raw_fd(), self.vnet) {
                Ok(Next::Frame(f)) => f,
                Ok(Next::Damaged) => {
                    Counters::bump(&self.counters.malformed);
                    continue;
                }
                Ok(Next::Empty) if matches!(source, Source::Ring(_)) => {
                    return self.pending_error()
                }
                Ok(Next::Empty) => return Ok(None),
                Err(e) => return self.read_error(e),
            };
            if frame.outgoing {
                continue;
            }
            match self.take(source.bytes(), &frame, buf) {
                Taken::Frame(n) => return Ok(Some(n)),
                Taken::Cut(c) => *cutting = Some(c),
                Taken::Dropped => {}
            }
        }
    }

    fn send(&self, frame: &[u8]) -> bool {
        // No offload asked for: the frame goes out as it is.
        let hdr = [0u8; VNET_HDR_LEN];
        let mut iov = [
            libc::iovec {
                iov_base: hdr.as_ptr() as *mut libc::c_void,
                iov_len: hdr.len(),
            },
            libc::iovec {
                iov_base: frame.as_ptr() as *mut libc::c_void,
                iov_len: frame.len(),
            },
        ];
        let iov = if self.vnet {
            &mut iov[..]
        } else {
            &mut iov[1..]
        };
        // SAFETY: an all-zero msghdr is a valid value of this plain C struct.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = iov.len();
        // One sendmsg is one datagram, whole or not at all, so threads need no lock between
        // them.
        // SAFETY: `msg` points at `iov`, whose entries point at `hdr` and `frame`, all valid
        // for reads for the duration of the call; the kernel does not write to them.
        let n = unsafe {
            libc::sendmsg(
                self.fd.as_raw_fd(),
                &msg,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            Counters::bump(&self.counters.send_failed);
            return false;
        }
        true
    }

    fn status(&self) -> LinkStatus {
        LinkStatus {
            connected: self.interface_up(),
            peer: None,
            malformed: self.counters.malformed.load(Ordering::Relaxed),
            send_failed: self.counters.send_failed.load(Ordering::Relaxed),
            ..LinkStatus::default()
        }
    }
}

fn getsockopt_int(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value`/`len` describe a writable c_int of the size given.
    check(unsafe {
        libc::getsockopt(
            fd,
            level,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    })?;
    Ok(value)
}

/// Joins the interface's promiscuous users, so frames to guests' MACs (and hubnat's) pass a
/// NIC's filter. The kernel takes the membership back when the socket closes.
fn add_promisc(fd: RawFd, ifindex: i32) -> io::Result<()> {
    let mreq = libc::packet_mreq {
        mr_ifindex: ifindex,
        mr_type: libc::PACKET_MR_PROMISC as u16,
        mr_alen: 0,
        mr_address: [0; 8],
    };
    // SAFETY: `mreq` is an initialised packet_mreq and the length passed is its size.
    check(unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_PACKET,
            libc::PACKET_ADD_MEMBERSHIP,
            (&mreq as *const libc::packet_mreq).cast(),
            size_of::<libc::packet_mreq>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// An `ifreq` for `name` (at most IFNAMSIZ - 1 bytes, else cut).
fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: an all-zero ifreq is a valid value of this plain C struct (and union).
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name[..libc::IFNAMSIZ - 1]
        .iter_mut()
        .zip(name.bytes())
    {
        *dst = src as libc::c_char;
    }
    req
}

/// The interface's flags, asked through `fd`, so in the socket's network namespace whichever
/// one the calling thread is in.
fn if_flags(fd: RawFd, name: &str) -> io::Result<libc::c_int> {
    let mut req = ifreq(name);
    // SAFETY: SIOCGIFFLAGS reads and writes the `ifreq` passed, which outlives the call.
    check(unsafe { libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req as *mut libc::ifreq) })?;
    // SAFETY: SIOCGIFFLAGS filled the union's `ifru_flags`.
    Ok(libc::c_int::from(unsafe { req.ifr_ifru.ifru_flags }) & 0xffff)
}

/// The name of interface `ifindex` in `fd`'s namespace; ENODEV once it is gone.
fn if_name(fd: RawFd, ifindex: i32) -> io::Result<String> {
    let mut req = ifreq("");
    req.ifr_ifru.ifru_ifindex = ifindex;
    // SAFETY: SIOCGIFNAME reads the index from and writes the name into the `ifreq` passed.
    check(unsafe { libc::ioctl(fd, libc::SIOCGIFNAME, &mut req as *mut libc::ifreq) })?;
    let name: Vec<u8> = req
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    Ok(String::from_utf8_lossy(&name).into_owned())
}

// ---- Reading: the ring, or one recvmsg per frame ----

struct Rx {
    source: Source,
    /// The super-frame being cut, in `source.bytes()`.
    cutting: Option<Cutting>,
}

struct Cutting {
    seg: Segmenter,
    start: usize,
    len: usize,
    vlan: Option<[u8; 4]>,
}

/// One received frame, in its source's `bytes()`.
#[derive(Debug)]
struct FrameDesc {
    start: usize,
    len: usize,
    /// The kernel had more of it than it handed over.
    truncated: bool,
    hdr: VnetHdr,
    /// The 802.1Q tag the kernel took out of the frame into its metadata (the port puts it
    /// back, as it was on the wire).
    vlan: Option<[u8; 4]>,
    outgoing: bool,
}

enum Next {
    Frame(FrameDesc),
    /// A frame the kernel's framing does not account for (a slot whose header points outside
    /// it, a read shorter than the virtio_net_hdr); skipped.
    Damaged,
    Empty,
}

enum Source {
    Ring(Ring),
    Plain(Plain),
}

impl Source {
    fn next(&mut self, fd: RawFd, vnet: bool) -> io::Result<Next> {
        match self {
            Source::Ring(ring) => Ok(ring.next(vnet)),
            Source::Plain(plain) => plain.next(fd, vnet),
        }
    }

    /// What the last frame from `next` points into.
    fn bytes(&self) -> &[u8] {
        match self {
            Source::Ring(ring) => ring.bytes(),
            Source::Plain(plain) => &plain.buf,
        }
    }
}

fn tag(tpid: u16, tci: u16) -> [u8; 4] {
    let [a, b] = tpid.to_be_bytes();
    let [c, d] = tci.to_be_bytes();
    [a, b, c, d]
}

/// The 802.1Q tag `tag` put back into the frame of `n` bytes at the start of `buf`, after the
/// MAC addresses; the frame's new length. None when it does not fit.
fn insert_tag(buf: &mut [u8], n: usize, tag: Option<[u8; 4]>) -> Option<usize> {
    let Some(tag) = tag else {
        return Some(n);
    };
    if n < 12 || n + VLAN_HLEN > buf.len() {
        return None;
    }
    buf.copy_within(12..n, 12 + VLAN_HLEN);
    buf[12..12 + VLAN_HLEN].copy_from_slice(&tag);
    Some(n + VLAN_HLEN)
}

fn ne_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn ne_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

/// How a ring is laid out: `blocks` blocks of `block` bytes, each cut into as many slots of
/// `slot` bytes as fit.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    block: usize,
    slot: usize,
    blocks: usize,
}

impl Geometry {
    fn slots(&self) -> usize {
        self.block / self.slot * self.blocks
    }

    fn size(&self) -> usize {
        self.block * self.blocks
    }

    /// Where slot `i` starts in the mapping: slots do not straddle blocks.
    fn offset(&self, i: usize) -> usize {
        let per_block = self.block / self.slot;
        i / per_block * self.block + i % per_block * self.slot
    }
}

/// Why a socket has no ring.
enum NoRing {
    /// The kernel refused it; frames still reach recvmsg(2).
    Refused(io::Error),
    /// It was made but could neither be mapped nor taken back: frames would go where nothing
    /// reads them.
    Stuck(io::Error),
}

/// A TPACKET_V2 receive ring: slots the kernel fills in turn, one frame each, and hands to
/// hubnat by setting their status; hubnat gives each back once done with its frame.
struct Ring {
    base: NonNull<u8>,
    geometry: Geometry,
    /// The slot read next, or being read while `held`.
    slot: usize,
    /// Whether hubnat owns `slot`: its frame (or the super-frame being cut from it) stays in
    /// use until the next call of `next`.
    held: bool,
}

// SAFETY: the mapping belongs to this Ring alone and is only reached through it; the kernel's
// side of it is synchronised by the slots' status words, whichever thread reads them.
unsafe impl Send for Ring {}

fn set_rx_ring(fd: RawFd, req: &libc::tpacket_req) -> io::Result<()> {
    // SAFETY: `req` is an initialised tpacket_req and the length passed is its size.
    check(unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_PACKET,
            libc::PACKET_RX_RING,
            (req as *const libc::tpacket_req).cast(),
            size_of::<libc::tpacket_req>() as libc::socklen_t,
        )
    })
    .map(drop)
}

impl Ring {
    fn new(fd: RawFd, geometry: Geometry) -> Result<Ring, NoRing> {
        setsockopt_int(
            fd,
            libc::SOL_PACKET,
            libc::PACKET_VERSION,
            libc::tpacket_versions::TPACKET_V2 as libc::c_int,
        )
        .map_err(NoRing::Refused)?;
        let req = libc::tpacket_req {
            tp_block_size: geometry.block as u32,
            tp_block_nr: geometry.blocks as u32,
            tp_frame_size: geometry.slot as u32,
            tp_frame_nr: geometry.slots() as u32,
        };
        set_rx_ring(fd, &req).map_err(NoRing::Refused)?;
        // SAFETY: maps the ring the kernel just made for `fd`, at an address of its choosing;
        // nothing else in the process refers to the new mapping.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                geometry.size(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            let e = io::Error::last_os_error();
            // A ring of no blocks takes the unmapped one back, so frames reach recvmsg again.
            // SAFETY: an all-zero tpacket_req is a valid value of this plain C struct.
            let none: libc::tpacket_req = unsafe { std::mem::zeroed() };
            return Err(match set_rx_ring(fd, &none) {
                Ok(()) => NoRing::Refused(e),
                Err(undo) => NoRing::Stuck(io::Error::new(
                    e.kind(),
                    format!("cannot map it ({e}) nor take it back ({undo})"),
                )),
            });
        }
        // mmap without MAP_FIXED never gives null.
        let base = NonNull::new(base.cast())
            .ok_or_else(|| NoRing::Stuck(io::Error::other("mmap gave null")))?;
        Ok(Ring {
            base,
            geometry,
            slot: 0,
            held: false,
        })
    }

    /// Slot `i`'s status word, shared with the kernel.
    fn status(&self, i: usize) -> &AtomicU32 {
        // SAFETY: the word starts slot `i` (i < slots), inside the mapping, 4-byte aligned
        // (blocks are page-aligned, slots a multiple of 16 bytes), and lives as long as
        // `self`. It is accessed atomically wherever the kernel may write it; `bytes` reads it
        // plainly only while the slot is hubnat's, after the acquiring load that said so.
        unsafe {
            AtomicU32::from_ptr(
                self.base
                    .as_ptr()
                    .add(self.geometry.offset(i) + TP2_STATUS)
                    .cast(),
            )
        }
    }

    /// The slot being read; empty unless hubnat owns it.
    fn bytes(&self) -> &[u8] {
        if !self.held {
            return &[];
        }
        // SAFETY: the slot is inside the mapping, and while its status says it is hubnat's
        // (`held` is set only then, and cleared before it is given back) the kernel does not
        // write to it.
        unsafe {
            std::slice::from_raw_parts(
                self.base.as_ptr().add(self.geometry.offset(self.slot)),
                self.geometry.slot,
            )
        }
    }

    fn next(&mut self, vnet: bool) -> Next {
        if self.held {
            self.held = false;
            self.status(self.slot)
                .store(libc::TP_STATUS_KERNEL, Ordering::Release);
            self.slot = (self.slot + 1) % self.geometry.slots();
        }
        if self.status(self.slot).load(Ordering::Acquire) & libc::TP_STATUS_USER == 0 {
            return Next::Empty;
        }
        self.held = true;
        match slot_frame(self.bytes(), vnet) {
            Some(frame) => Next::Frame(frame),
            None => Next::Damaged,
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `new` made; nothing borrows it past `self`.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.geometry.size());
        }
    }
}

/// The frame in ring slot `slot`, as its header describes it; None when the header points
/// outside the slot.
fn slot_frame(slot: &[u8], vnet: bool) -> Option<FrameDesc> {
    let h = slot.get(..libc::TPACKET2_HDRLEN)?;
    let status = ne_u32(h, TP2_STATUS)?;
    let wire_len = ne_u32(h, TP2_LEN)? as usize;
    let snaplen = ne_u32(h, TP2_SNAPLEN)? as usize;
    let start = usize::from(ne_u16(h, TP2_MAC)?);
    slot.get(start..start.checked_add(snaplen)?)?;
    let hdr = if vnet {
        if start < libc::TPACKET2_HDRLEN + VNET_HDR_LEN {
            return None;
        }
        VnetHdr::parse(&slot[start - VNET_HDR_LEN..start])?
    } else {
        VnetHdr::default()
    };
    let vlan = if status & libc::TP_STATUS_VLAN_VALID != 0 {
        let tpid = if status & libc::TP_STATUS_VLAN_TPID_VALID != 0 {
            ne_u16(h, TP2_VLAN_TPID)?
        } else {
            0x8100
        };
        Some(tag(tpid, ne_u16(h, TP2_VLAN_TCI)?))
    } else {
        None
    };
    Some(FrameDesc {
        start,
        len: snaplen,
        truncated: snaplen < wire_len,
        hdr,
        vlan,
        outgoing: h[TP2_PKTTYPE] == libc::PACKET_OUTGOING,
    })
}

/// Reads of one frame each, into a buffer that holds a whole super-frame.
struct Plain {
    buf: Box<[u8]>,
}

impl Plain {
    fn new(fd: RawFd) -> io::Result<Plain> {
        // A tag the kernel took out of a frame comes back beside it in this.
        setsockopt_int(fd, libc::SOL_PACKET, libc::PACKET_AUXDATA, 1)?;
        Ok(Plain {
            buf: vec![0; PLAIN_BUF_LEN].into_boxed_slice(),
        })
    }

    fn next(&mut self, fd: RawFd, vnet: bool) -> io::Result<Next> {
        // SAFETY: an all-zero sockaddr_ll is a valid value of this plain C struct.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        // Room for one cmsg of a tpacket_auxdata, aligned as cmsghdr wants.
        let mut control = [0u64; 8];
        let mut iov = libc::iovec {
            iov_base: self.buf.as_mut_ptr().cast(),
            iov_len: self.buf.len(),
        };
        // SAFETY: an all-zero msghdr is a valid value of this plain C struct.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = (&mut sll as *mut libc::sockaddr_ll).cast();
        msg.msg_namelen = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = size_of_val(&control);
        // SAFETY: every pointer in `msg` points at a live, writable buffer of the length given
        // beside it, for the duration of the call.
        let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT | libc::MSG_TRUNC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock => Ok(Next::Empty),
                _ => Err(e),
            };
        }
        let n = n as usize;
        let got = n.min(self.buf.len());
        let start = if vnet { VNET_HDR_LEN } else { 0 };
        if got < start {
            return Ok(Next::Damaged);
        }
        let hdr = if vnet {
            match VnetHdr::parse(&self.buf[..VNET_HDR_LEN]) {
                Some(h) => h,
                None => return Ok(Next::Damaged),
            }
        } else {
            VnetHdr::default()
        };
        let mut vlan = None;
        // SAFETY: `msg` was filled by recvmsg; the CMSG macros only walk its control buffer,
        // which `control` still backs, and the data is read unaligned.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                let c = &*cmsg;
                if c.cmsg_level == libc::SOL_PACKET
                    && c.cmsg_type == libc::PACKET_AUXDATA
                    && c.cmsg_len as usize
                        >= libc::CMSG_LEN(size_of::<libc::tpacket_auxdata>() as u32) as usize
                {
                    let aux: libc::tpacket_auxdata =
                        std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                    if aux.tp_status & libc::TP_STATUS_VLAN_VALID != 0 {
                        let tpid = if aux.tp_status & libc::TP_STATUS_VLAN_TPID_VALID != 0 {
                            aux.tp_vlan_tpid
                        } else {
                            0x8100
                        };
                        vlan = Some(tag(tpid, aux.tp_vlan_tci));
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
        }
        Ok(Next::Frame(FrameDesc {
            start,
            len: got - start,
            truncated: msg.msg_flags & libc::MSG_TRUNC != 0 || n > self.buf.len(),
            hdr,
            vlan,
            outgoing: sll.sll_pkttype == libc::PACKET_OUTGOING,
        }))
    }
}

// ---- Offloads: what the guest left for the hardware to do ----

/// A frame the offload code cannot make sense of.
#[derive(Debug, PartialEq, Eq)]
struct Malformed;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct VnetHdr {
    flags: u8,
    gso_type: u8,
    gso_size: u16,
    csum_start: u16,
    csum_offset: u16,
}

impl VnetHdr {
    /// The header as the kernel writes it for a packet socket: legacy virtio, so in the
    /// host's byte order.
    fn parse(b: &[u8]) -> Option<VnetHdr> {
        Some(VnetHdr {
            flags: *b.first()?,
            gso_type: *b.get(1)?,
            gso_size: ne_u16(b, 4)?,
            csum_start: ne_u16(b, 6)?,
            csum_offset: ne_u16(b, 8)?,
        })
    }
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn put_be16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// Where a frame's IP packet and its transport header are.
#[derive(Clone, Copy, Debug)]
struct Layout {
    l3: usize,
    v6: bool,
    l4: usize,
    proto: u8,
    /// Where the IP packet ends (Ethernet padding after it is not the packet's).
    end: usize,
}

/// Parses the Ethernet and IP headers of `frame` (up to two VLAN tags in it); IPv6 hop-by-hop
/// and destination options are skipped to the transport header. None: not IP, or not whole.
fn layout(frame: &[u8]) -> Option<Layout> {
    let mut type_at = 12;
    let mut ethertype = be16(frame, type_at)?;
    for _ in 0..2 {
        if ethertype != 0x8100 && ethertype != 0x88a8 {
            break;
        }
        type_at += VLAN_HLEN;
        ethertype = be16(frame, type_at)?;
    }
    let l3 = type_at + 2;
    match ethertype {
        0x0800 => {
            let first = *frame.get(l3)?;
            let ihl = usize::from(first & 0x0f) * 4;
            if first >> 4 != 4 || ihl < 20 {
                return None;
            }
            let total = usize::from(be16(frame, l3 + 2)?);
            // Zero: a BIG TCP super-frame, longer than the field can say.
            let end = if total == 0 { frame.len() } else { l3 + total };
            if end > frame.len() || end < l3 + ihl {
                return None;
            }
            Some(Layout {
                l3,
                v6: false,
                l4: l3 + ihl,
                proto: frame[l3 + 9],
                end,
            })
        }
        0x86dd => {
            if *frame.get(l3)? >> 4 != 6 {
                return None;
            }
            let payload = usize::from(be16(frame, l3 + 4)?);
            let end = if payload == 0 {
                frame.len()
            } else {
                l3 + 40 + payload
            };
            if end > frame.len() || end < l3 + 40 {
                return None;
            }
            let mut proto = frame[l3 + 6];
            let mut l4 = l3 + 40;
            for _ in 0..4 {
                // Hop-by-hop options, destination options.
                if proto != 0 && proto != 60 {
                    break;
                }
                proto = *frame.get(l4)?;
                l4 += (usize::from(*frame.get(l4 + 1)?) + 1) * 8;
            }
            if l4 > end {
                return None;
            }
            Some(Layout {
                l3,
                v6: true,
                l4,
                proto,
                end,
            })
        }
        _ => None,
    }
}

/// Adds `data` to a ones' complement sum as 16-bit big-endian words (an odd last byte padded
/// with zero), four bytes at a time: 2^16 ≡ 1 modulo 0xffff, so 32-bit words sum the same.
fn sum(data: &[u8], mut acc: u64) -> u64 {
    let mut words = data.chunks_exact(4);
    for w in &mut words {
        acc += u64::from(u32::from_be_bytes([w[0], w[1], w[2], w[3]]));
    }
    let rest = words.remainder();
    let mut pairs = rest.chunks_exact(2);
    for p in &mut pairs {
        acc += u64::from(u16::from_be_bytes([p[0], p[1]]));
    }
    if let [last] = pairs.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The pseudo-header's part of a TCP or UDP checksum, for a transport segment of `len` bytes.
fn pseudo_sum(frame: &[u8], lay: &Layout, len: usize) -> u64 {
    let addrs = if lay.v6 {
        &frame[lay.l3 + 8..lay.l3 + 40]
    } else {
        &frame[lay.l3 + 12..lay.l3 + 20]
    };
    sum(addrs, 0) + u64::from(lay.proto) + len as u64
}

/// CRC32c (Castagnoli, reflected), SCTP's checksum, which a guest's stack also leaves to the
/// hardware behind the same flag.
fn crc32c(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut bit = 0;
            while bit < 8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82f6_3b78
                } else {
                    c >> 1
                };
                bit += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    !data.iter().fold(!0u32, |c, &b| {
        TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8)
    })
}

/// Fills in the checksum the guest left to the hardware: the ones' complement of the sum from
/// `csum_start` to the end of the packet, into `csum_start + csum_offset`, where the guest put
/// the pseudo-header's sum (SCTP: its CRC32c, over a zeroed field).
fn complete_checksum(frame: &mut [u8], hdr: &VnetHdr) -> Result<(), Malformed> {
    let start = usize::from(hdr.csum_start);
    let field = start + usize::from(hdr.csum_offset);
    let lay = layout(frame).filter(|l| l.l4 == start);
    let end = lay.map_or(frame.len(), |l| l.end);
    if field + 2 > end || start >= end {
        return Err(Malformed);
    }
    let proto = lay.map(|l| l.proto);
    if proto == Some(IPPROTO_SCTP) && hdr.csum_offset == 8 && field + 4 <= end {
        frame[field..field + 4].fill(0);
        let crc = crc32c(&frame[start..end]);
        frame[field..field + 4].copy_from_slice(&crc.to_le_bytes());
        return Ok(());
    }
    let mut check = !fold(sum(&frame[start..end], 0));
    if check == 0 && proto == Some(IPPROTO_UDP) {
        // Zero would say "no checksum"; in ones' complement 0xffff is the same number.
        check = 0xffff;
    }
    put_be16(frame, field, check);
    Ok(())
}

/// Cuts a TSO/GSO super-frame into segments, one per call of `next`, as the NIC would have:
/// each segment carries a copy of the headers and `gso_size` bytes of payload (the last one
/// what is left), with its own lengths, IPv4 id, TCP sequence number and flags, and checksums.
#[derive(Debug)]
struct Segmenter {
    lay: Layout,
    tcp: bool,
    /// Bytes of headers (up to the end of the transport header) each segment starts with.
    headers: usize,
    mss: usize,
    payload: usize,
    count: usize,
    next: usize,
    seq: u32,
    ip_id: u16,
}

impl Segmenter {
    /// For super-frame `frame` as `hdr` describes it, whose segments must each fit in `limit`
    /// bytes.
    fn new(frame: &[u8], hdr: &VnetHdr, limit: usize) -> Result<Segmenter, Malformed> {
        let lay = layout(frame).ok_or(Malformed)?;
        let (tcp, v6) = match hdr.gso_type & !VIRTIO_NET_HDR_GSO_ECN {
            VIRTIO_NET_HDR_GSO_TCPV4 => (true, Some(false)),
            VIRTIO_NET_HDR_GSO_TCPV6 => (true, Some(true)),
            VIRTIO_NET_HDR_GSO_UDP_L4 => (false, None),
            // UFO (IP fragments) and tunnels: not cut here.
            _ => return Err(Malformed),
        };
        if v6.is_some_and(|v6| v6 != lay.v6)
            || lay.proto != if tcp { IPPROTO_TCP } else { IPPROTO_UDP }
            || (hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0
                && usize::from(hdr.csum_start) != lay.l4)
        {
            return Err(Malformed);
        }
        let transport = if tcp {
            usize::from(*frame.get(lay.l4 + 12).ok_or(Malformed)? >> 4) * 4
        } else {
            8
        };
        let headers = lay.l4 + transport;
        let mss = usize::from(hdr.gso_size);
        if transport < 8 || (tcp && transport < 20) || headers > lay.end || mss == 0 {
            return Err(Malformed);
        }
        let payload = lay.end - headers;
        if payload > MAX_GSO_PAYLOAD || headers + mss.min(payload) > limit {
            return Err(Malformed);
        }
        Ok(Segmenter {
            lay,
            tcp,
            headers,
            mss,
            payload,
            count: payload.div_ceil(mss).max(1),
            next: 0,
            seq: frame
                .get(lay.l4 + 4..lay.l4 + 8)
                .map_or(0, |s| u32::from_be_bytes([s[0], s[1], s[2], s[3]])),
            ip_id: if lay.v6 {
                0
            } else {
                be16(frame, lay.l3 + 4).ok_or(Malformed)?
            },
        })
    }

    /// Writes the next segment of `frame` (the same super-frame `new` was given) into `out`;
    /// its length, or None once every segment was written.
    fn next(&mut self, frame: &[u8], out: &mut [u8]) -> Result<Option<usize>, Malformed> {
        if self.next == self.count {
            return Ok(None);
        }
        let i = self.next;
        self.next += 1;
        let offset = i * self.mss;
        let chunk = self.mss.min(self.payload - offset);
        let n = self.headers + chunk;
        let from = self.headers + offset;
        let (Some(out), Some(headers), Some(payload)) = (
            out.get_mut(..n),
            frame.get(..self.headers),
            frame.get(from..from + chunk),
        ) else {
            return Err(Malformed);
        };
        out[..self.headers].copy_from_slice(headers);
        out[self.headers..].copy_from_slice(payload);
        let Layout { l3, l4, .. } = self.lay;
        if self.lay.v6 {
            put_be16(out, l3 + 4, (n - l3 - 40) as u16);
        } else {
            put_be16(out, l3 + 2, (n - l3) as u16);
            put_be16(out, l3 + 4, self.ip_id.wrapping_add(i as u16));
            put_be16(out, l3 + 10, 0);
            let check = !fold(sum(&out[l3..l4], 0));
            put_be16(out, l3 + 10, check);
        }
        let check_at = if self.tcp {
            let seq = self.seq.wrapping_add(offset as u32);
            out[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
            const FIN: u8 = 0x01;
            const PSH: u8 = 0x08;
            const CWR: u8 = 0x80;
            if i + 1 != self.count {
                out[l4 + 13] &= !(FIN | PSH);
            }
            if i != 0 {
                out[l4 + 13] &= !CWR;
            }
            l4 + 16
        } else {
            put_be16(out, l4 + 4, (n - l4) as u16);
            l4 + 6
        };
        put_be16(out, check_at, 0);
        let mut check = !fold(sum(&out[l4..n], pseudo_sum(out, &self.lay, n - l4)));
        if check == 0 && !self.tcp {
            check = 0xffff;
        }
        put_be16(out, check_at, check);
        Ok(Some(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    /// A checksum computed the slow, obvious way, to hold the port's against: zero over data
    /// that carries a correct one.
    fn reference_checksum(data: &[u8]) -> u16 {
        let mut s: u32 = 0;
        for pair in data.chunks(2) {
            s += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
        }
        while s >> 16 != 0 {
            s = (s & 0xffff) + (s >> 16);
        }
        !(s as u16)
    }

    fn reference_pseudo(frame: &[u8], v6: bool, proto: u8, len: usize) -> Vec<u8> {
        let mut p = Vec::new();
        if v6 {
            p.extend_from_slice(&frame[22..54]);
            p.extend_from_slice(&(len as u32).to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, proto]);
        } else {
            p.extend_from_slice(&frame[26..34]);
            p.extend_from_slice(&[0, proto]);
            p.extend_from_slice(&(len as u16).to_be_bytes());
        }
        p
    }

    /// Checks an untagged IPv4 or IPv6 frame (no IPv6 extension headers) the way a receiver
    /// would: the IPv4 header checksum, the IP length against the frame's, the TCP or UDP
    /// checksum. Returns its transport protocol and segment.
    pub(super) fn checked_segment(frame: &[u8]) -> Result<(u8, &[u8]), String> {
        let (v6, proto, l4, end) = match be16(frame, 12) {
            Some(0x0800) => {
                let ihl = usize::from(frame[14] & 0x0f) * 4;
                if reference_checksum(&frame[14..14 + ihl]) != 0 {
                    return Err("bad IPv4 header checksum".into());
                }
                (
                    false,
                    frame[23],
                    14 + ihl,
                    14 + usize::from(be16(frame, 16).unwrap()),
                )
            }
            Some(0x86dd) => (
                true,
                frame[20],
                54,
                54 + usize::from(be16(frame, 18).unwrap()),
            ),
            other => return Err(format!("not IP: {other:x?}")),
        };
        if end > frame.len() || frame.len() > end.max(60) {
            return Err(format!("IP length {end} for a frame of {}", frame.len()));
        }
        let segment = &frame[l4..end];
        if proto == IPPROTO_TCP || proto == IPPROTO_UDP {
            let mut all = reference_pseudo(frame, v6, proto, segment.len());
            all.extend_from_slice(segment);
            if reference_checksum(&all) != 0 {
                return Err(format!("bad transport checksum (protocol {proto})"));
            }
        }
        Ok((proto, segment))
    }

    fn tcp_header(seq: u32, flags: u8) -> Vec<u8> {
        let mut h = vec![0x9c, 0x40, 0x13, 0x89];
        h.extend_from_slice(&seq.to_be_bytes());
        h.extend_from_slice(&77u32.to_be_bytes());
        // Twelve bytes of options (NOP, NOP, timestamps): a header of 32 bytes.
        h.extend_from_slice(&[0x80, flags, 0x01, 0xf5, 0, 0, 0, 0]);
        h.extend_from_slice(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
        h
    }

    fn udp_header() -> Vec<u8> {
        vec![0x9c, 0x40, 0x13, 0x8a, 0, 0, 0, 0]
    }

    /// A frame as a guest with checksum offload sends it: the transport checksum holds only
    /// the pseudo-header's sum. `ext`: IPv6 extension headers between the IP and transport
    /// headers (their first byte is set to `proto`). Returns it and its transport offset.
    fn offloaded(v6: bool, proto: u8, l4: &[u8], payload: &[u8], ext: &[u8]) -> (Vec<u8>, usize) {
        let mut f = vec![2, 0, 0, 0, 0, 0xa, 2, 0, 0, 0, 0, 0xb];
        let l4_len = l4.len() + payload.len();
        if v6 {
            f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
            f.extend_from_slice(&((ext.len() + l4_len) as u16).to_be_bytes());
            f.extend_from_slice(&[if ext.is_empty() { proto } else { 60 }, 64]);
            f.extend_from_slice(&[0xfd, 0x99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
            f.extend_from_slice(&[0xfd, 0x99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
            let at = f.len();
            f.extend_from_slice(ext);
            if !ext.is_empty() {
                f[at] = proto;
            }
        } else {
            f.extend_from_slice(&[0x08, 0x00, 0x45, 0]);
            f.extend_from_slice(&((20 + l4_len) as u16).to_be_bytes());
            f.extend_from_slice(&[
                0x12, 0x34, 0x40, 0, 64, proto, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
            ]);
            let check = reference_checksum(&f[14..34]);
            put_be16(&mut f, 24, check);
        }
        let at = f.len();
        f.extend_from_slice(l4);
        f.extend_from_slice(payload);
        let lay = layout(&f).expect("a frame the test built");
        assert_eq!(lay.l4, at);
        let field = at + if proto == IPPROTO_TCP { 16 } else { 6 };
        if proto == IPPROTO_UDP {
            put_be16(&mut f, at + 4, l4_len as u16);
        }
        let pseudo = fold(pseudo_sum(&f, &lay, l4_len));
        put_be16(&mut f, field, pseudo);
        (f, at)
    }

    fn needs_csum(start: usize, proto: u8) -> VnetHdr {
        VnetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            csum_start: start as u16,
            csum_offset: if proto == IPPROTO_TCP { 16 } else { 6 },
            ..VnetHdr::default()
        }
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn checksums_left_to_the_hardware_are_completed() {
        for v6 in [false, true] {
            for proto in [IPPROTO_TCP, IPPROTO_UDP] {
                for len in [0, 1, 2, 3, 17, 1000, 1401] {
                    let l4 = if proto == IPPROTO_TCP {
                        tcp_header(5, 0x18)
                    } else {
                        udp_header()
                    };
                    let (mut f, at) = offloaded(v6, proto, &l4, &pattern(len), &[]);
                    assert!(checked_segment(&f).is_err() || len == 0 && proto == IPPROTO_UDP);
                    complete_checksum(&mut f, &needs_csum(at, proto)).unwrap();
                    let (p, _) =
                        checked_segment(&f).unwrap_or_else(|e| panic!("{v6} {proto} {len}: {e}"));
                    assert_eq!(p, proto);
                }
            }
        }
    }

    #[test]
    fn a_udp_checksum_that_comes_out_zero_is_sent_as_all_ones() {
        // Two payload bytes chosen to make the sum of everything else come out even.
        let (mut f, at) = offloaded(false, IPPROTO_UDP, &udp_header(), &[0, 0, 9, 9], &[]);
        let mut probe = f.clone();
        complete_checksum(&mut probe, &needs_csum(at, IPPROTO_UDP)).unwrap();
        let c = be16(&probe, at + 6).unwrap();
        put_be16(&mut f, at + 8, c);
        complete_checksum(&mut f, &needs_csum(at, IPPROTO_UDP)).unwrap();
        assert_eq!(be16(&f, at + 6), Some(0xffff));
        checked_segment(&f).unwrap();
    }

    #[test]
    fn sctp_gets_its_crc32c() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        let mut sctp = vec![0x13, 0x88, 0x13, 0x89, 0, 0, 0, 1, 0xaa, 0xbb, 0xcc, 0xdd];
        sctp.extend_from_slice(&pattern(40));
        let (mut f, at) = offloaded(false, IPPROTO_SCTP, &[], &sctp, &[]);
        let hdr = VnetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            csum_start: at as u16,
            csum_offset: 8,
            ..VnetHdr::default()
        };
        complete_checksum(&mut f, &hdr).unwrap();
        let mut zeroed = f[at..].to_vec();
        zeroed[8..12].fill(0);
        assert_eq!(f[at + 8..at + 12], crc32c(&zeroed).to_le_bytes());
    }

    fn cut_all(frame: &[u8], hdr: &VnetHdr, limit: usize) -> Result<Vec<Vec<u8>>, Malformed> {
        let mut seg = Segmenter::new(frame, hdr, limit)?;
        let mut out = vec![0u8; limit];
        let mut segments = Vec::new();
        while let Some(n) = seg.next(frame, &mut out)? {
            segments.push(out[..n].to_vec());
        }
        Ok(segments)
    }

    fn gso(kind: u8, start: usize, proto: u8, mss: u16) -> VnetHdr {
        VnetHdr {
            gso_type: kind,
            gso_size: mss,
            ..needs_csum(start, proto)
        }
    }

    #[test]
    fn tso_super_frames_are_cut_like_a_nic_would() {
        const FIN: u8 = 0x01;
        const PSH: u8 = 0x08;
        const ACK: u8 = 0x10;
        const CWR: u8 = 0x80;
        for v6 in [false, true] {
            let payload = pattern(4000);
            let seq = u32::MAX - 1000;
            let (f, at) = offloaded(
                v6,
                IPPROTO_TCP,
                &tcp_header(seq, FIN | PSH | ACK | CWR),
                &payload,
                &[],
            );
            let kind = if v6 {
                VIRTIO_NET_HDR_GSO_TCPV6
            } else {
                VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_ECN
            };
            // The MSS that fills a 1514-byte frame.
            let mss = if v6 { 1428 } else { 1448 };
            let segments = cut_all(&f, &gso(kind, at, IPPROTO_TCP, mss), 1514).unwrap();
            assert_eq!(segments.len(), 3);
            let mut joined = Vec::new();
            for (i, s) in segments.iter().enumerate() {
                let (_, tcp) = checked_segment(s).unwrap_or_else(|e| panic!("segment {i}: {e}"));
                assert_eq!(s.len(), if i < 2 { 1514 } else { s.len() });
                let got_seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
                assert_eq!(got_seq, seq.wrapping_add(u32::from(mss) * i as u32));
                let flags = tcp[13];
                assert_eq!(flags & ACK, ACK);
                assert_eq!(flags & (FIN | PSH) != 0, i == 2, "segment {i}: {flags:#x}");
                assert_eq!(flags & CWR != 0, i == 0, "segment {i}: {flags:#x}");
                if !v6 {
                    assert_eq!(be16(s, 18), Some(0x1234 + i as u16));
                }
                joined.extend_from_slice(&tcp[32..]);
            }
            assert_eq!(joined, payload);
        }
    }

    #[test]
    fn tso_over_ipv6_options_keeps_them_in_every_segment() {
        let ext = [0, 0, 1, 4, 0, 0, 0, 0];
        let (f, at) = offloaded(
            true,
            IPPROTO_TCP,
            &tcp_header(1, 0x10),
            &pattern(3000),
            &ext,
        );
        let segments = cut_all(
            &f,
            &gso(VIRTIO_NET_HDR_GSO_TCPV6, at, IPPROTO_TCP, 1400),
            1514,
        )
        .unwrap();
        assert_eq!(segments.len(), 3);
        for s in &segments {
            let lay = layout(s).unwrap();
            assert_eq!((lay.l4, lay.proto, lay.end), (at, IPPROTO_TCP, s.len()));
            let mut all = reference_pseudo(s, true, IPPROTO_TCP, s.len() - at);
            all.extend_from_slice(&s[at..]);
            assert_eq!(reference_checksum(&all), 0);
        }
    }

    #[test]
    fn udp_gso_is_cut_into_datagrams() {
        for v6 in [false, true] {
            let payload = pattern(2500);
            let (f, at) = offloaded(v6, IPPROTO_UDP, &udp_header(), &payload, &[]);
            let segments = cut_all(
                &f,
                &gso(VIRTIO_NET_HDR_GSO_UDP_L4, at, IPPROTO_UDP, 1000),
                1514,
            )
            .unwrap();
            let lens: Vec<usize> = segments.iter().map(|s| s.len() - at - 8).collect();
            assert_eq!(lens, [1000, 1000, 500]);
            let mut joined = Vec::new();
            for s in &segments {
                let (_, udp) = checked_segment(s).unwrap();
                assert_eq!(usize::from(be16(udp, 4).unwrap()), udp.len());
                joined.extend_from_slice(&udp[8..]);
            }
            assert_eq!(joined, payload);
        }
    }

    #[test]
    fn super_frames_that_do_not_parse_are_refused() {
        let (f, at) = offloaded(
            false,
            IPPROTO_TCP,
            &tcp_header(1, 0x10),
            &pattern(3000),
            &[],
        );
        let ok = gso(VIRTIO_NET_HDR_GSO_TCPV4, at, IPPROTO_TCP, 1448);
        assert!(cut_all(&f, &ok, 1514).is_ok());
        let refused = |f: &[u8], hdr: VnetHdr, limit: usize| {
            assert_eq!(
                Segmenter::new(f, &hdr, limit).map(drop),
                Err(Malformed),
                "{hdr:?}"
            );
        };
        refused(&f, VnetHdr { gso_size: 0, ..ok }, 1514);
        refused(
            &f,
            VnetHdr {
                gso_type: VIRTIO_NET_HDR_GSO_TCPV6,
                ..ok
            },
            1514,
        );
        refused(
            &f,
            VnetHdr {
                gso_type: VIRTIO_NET_HDR_GSO_UDP_L4,
                ..ok
            },
            1514,
        );
        refused(&f, VnetHdr { gso_type: 3, ..ok }, 1514);
        refused(
            &f,
            VnetHdr {
                csum_start: ok.csum_start + 4,
                ..ok
            },
            1514,
        );
        // Segments that would not fit the port's largest frame.
        refused(&f, ok, 1400);
        refused(&f[..f.len() - 1], ok, 1514);
        let mut short_header = f.clone();
        short_header[at + 12] = 0x40;
        refused(&short_header, ok, 1514);
        let mut not_ip = f.clone();
        not_ip[12] = 0x88;
        refused(&not_ip, ok, 1514);
        // More than one super-frame's worth of payload.
        let (big, at) = offloaded(
            true,
            IPPROTO_TCP,
            &tcp_header(1, 0x10),
            &pattern(MAX_GSO_PAYLOAD + 1),
            &[],
        );
        let mut big = big;
        put_be16(&mut big, 18, 0);
        refused(
            &big,
            gso(VIRTIO_NET_HDR_GSO_TCPV6, at, IPPROTO_TCP, 1448),
            1514,
        );
    }

    #[test]
    fn random_headers_never_panic_and_stay_bounded() {
        let mut rng = SmallRng::seed_from_u64(0x6875_626e);
        let mut out = vec![0u8; 1518];
        for round in 0..20_000 {
            let v6 = rng.random::<bool>();
            let proto = if rng.random::<bool>() {
                IPPROTO_TCP
            } else {
                IPPROTO_UDP
            };
            let l4 = if proto == IPPROTO_TCP {
                tcp_header(rng.random(), rng.random())
            } else {
                udp_header()
            };
            let (mut f, at) = offloaded(v6, proto, &l4, &pattern(rng.random_range(0..5000)), &[]);
            for _ in 0..rng.random_range(0..6) {
                let i = rng.random_range(0..at + 40);
                if let Some(b) = f.get_mut(i) {
                    *b = rng.random();
                }
            }
            f.truncate(
                rng.random_range(0..f.len() + 1)
                    .max(f.len() - f.len() / (1 + round % 4)),
            );
            let hdr = VnetHdr {
                flags: rng.random_range(0..4),
                gso_type: [0, 1, 3, 4, 5, 0x81, rng.random()][rng.random_range(0..7)],
                gso_size: [0, 1, 7, 536, 1448, rng.random()][rng.random_range(0..6)],
                csum_start: if rng.random() {
                    at as u16
                } else {
                    rng.random()
                },
                csum_offset: [6, 8, 16, rng.random()][rng.random_range(0..4)],
            };
            let _ = complete_checksum(&mut f.clone(), &hdr);
            let _ = layout(&f);
            if let Ok(mut seg) = Segmenter::new(&f, &hdr, out.len()) {
                let bound = MAX_GSO_PAYLOAD / usize::from(hdr.gso_size) + 1;
                let mut count = 0;
                while let Ok(Some(n)) = seg.next(&f, &mut out) {
                    assert!(n <= out.len());
                    count += 1;
                    assert!(count <= bound, "{count} segments of {}", hdr.gso_size);
                }
            }
        }
    }

    #[test]
    fn a_tag_taken_out_by_the_kernel_is_put_back() {
        let frame: Vec<u8> = (0..64).collect();
        let mut buf = vec![0u8; 100];
        buf[..64].copy_from_slice(&frame);
        let n = insert_tag(&mut buf, 64, Some(tag(0x8100, 0x2064))).unwrap();
        assert_eq!(n, 68);
        assert_eq!(buf[..12], frame[..12]);
        assert_eq!(buf[12..16], [0x81, 0x00, 0x20, 0x64]);
        assert_eq!(buf[16..68], frame[12..]);
        assert_eq!(insert_tag(&mut buf[..66], 64, Some(tag(0x8100, 1))), None);
        assert_eq!(insert_tag(&mut buf, 64, None), Some(64));
    }

    /// A ring slot as the kernel fills it: the tpacket2_hdr, the sockaddr_ll, the
    /// virtio_net_hdr right before the frame at `mac`.
    fn slot(len: u32, snaplen: u32, mac: u16, status: u32) -> Vec<u8> {
        let mut s = vec![0u8; 256];
        s[TP2_STATUS..TP2_STATUS + 4].copy_from_slice(&status.to_ne_bytes());
        s[TP2_LEN..TP2_LEN + 4].copy_from_slice(&len.to_ne_bytes());
        s[TP2_SNAPLEN..TP2_SNAPLEN + 4].copy_from_slice(&snaplen.to_ne_bytes());
        s[TP2_MAC..TP2_MAC + 2].copy_from_slice(&mac.to_ne_bytes());
        s[TP2_VLAN_TCI..TP2_VLAN_TCI + 2].copy_from_slice(&0x2064u16.to_ne_bytes());
        s[TP2_VLAN_TPID..TP2_VLAN_TPID + 2].copy_from_slice(&0x88a8u16.to_ne_bytes());
        let v = usize::from(mac) - VNET_HDR_LEN;
        s[v] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
        s[v + 1] = VIRTIO_NET_HDR_GSO_TCPV4;
        s[v + 4..v + 6].copy_from_slice(&1448u16.to_ne_bytes());
        s[v + 6..v + 8].copy_from_slice(&34u16.to_ne_bytes());
        s[v + 8..v + 10].copy_from_slice(&16u16.to_ne_bytes());
        s
    }

    #[test]
    fn ring_slots_are_read_as_their_header_says() {
        let user = libc::TP_STATUS_USER;
        let f = slot_frame(&slot(100, 100, 76, user), true).unwrap();
        assert_eq!(
            (f.start, f.len, f.truncated, f.vlan, f.outgoing),
            (76, 100, false, None, false)
        );
        let hdr = VnetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            gso_type: VIRTIO_NET_HDR_GSO_TCPV4,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
        };
        assert_eq!(f.hdr, hdr);
        assert_eq!(
            slot_frame(&slot(100, 100, 76, user), false).unwrap().hdr,
            VnetHdr::default()
        );
        // The kernel's tag, put back as it was (its TPID only when the kernel says it has one).
        let tagged = user | libc::TP_STATUS_VLAN_VALID;
        let f = slot_frame(&slot(100, 100, 76, tagged), true).unwrap();
        assert_eq!(f.vlan, Some([0x81, 0x00, 0x20, 0x64]));
        let f = slot_frame(
            &slot(100, 100, 76, tagged | libc::TP_STATUS_VLAN_TPID_VALID),
            true,
        );
        assert_eq!(f.unwrap().vlan, Some([0x88, 0xa8, 0x20, 0x64]));
        let mut out = slot(100, 100, 76, user);
        out[TP2_PKTTYPE] = libc::PACKET_OUTGOING;
        assert!(slot_frame(&out, true).unwrap().outgoing);
        // Cut to the slot: flagged, so `take` drops it.
        assert!(
            slot_frame(&slot(1000, 180, 76, user), true)
                .unwrap()
                .truncated
        );
        // Headers that point outside the slot, or leave no room for the virtio_net_hdr.
        assert!(slot_frame(&slot(200, 181, 76, user), true).is_none());
        assert!(slot_frame(&slot(100, 100, 60, user), true).is_none());
        assert!(slot_frame(&slot(100, 100, 60, user), false).is_some());
        assert!(slot_frame(&[0u8; 40], true).is_none());
    }

    #[test]
    fn ring_slots_are_laid_out_within_their_blocks() {
        let g = RING_GEOMETRY;
        assert_eq!(g.slots(), 60);
        assert!(g.size() <= 4 << 20);
        assert_eq!(g.offset(14), 14 * RING_SLOT_SIZE);
        assert_eq!(g.offset(15), RING_BLOCK_SIZE);
        assert_eq!(
            g.offset(59) + g.slot,
            3 * RING_BLOCK_SIZE + 15 * RING_SLOT_SIZE
        );
        assert!(g.offset(59) + g.slot <= g.size());
        assert_eq!(RING_SLOT_SIZE % libc::TPACKET_ALIGNMENT, 0);
    }

    #[test]
    fn bad_names_and_sockets_are_refused() {
        for name in ["", "a/b", "bad\0name", "a-name-that-is-too-long"] {
            let e = PacketPort::attach(name, 1518).err().expect(name);
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{name}: {e}");
        }
        let e = PacketPort::attach("hnnone0", 1518)
            .err()
            .expect("no such interface");
        assert!(e.to_string().contains("`hnnone0`"), "{e}");
        assert!(PacketPort::attach("lo", 20).is_err());
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let e = PacketPort::from_fd(OwnedFd::from(udp), 1518)
            .err()
            .expect("a UDP socket");
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
    }
}

/// Tests on real interfaces: a veth pair between two throwaway network namespaces.
#[cfg(test)]
mod netns_tests {
    use super::tests::checked_segment;
    use super::*;
    use crate::port::af_packet::{Direction, PacketSocket};
    use std::fs::File;
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
    use std::os::fd::AsFd;
    use std::path::PathBuf;
    use std::process::Command;
    use std::sync::atomic::AtomicUsize;
    use std::time::{Duration, Instant};

    /// The port's largest frame at an MTU of 1500, as `port add` computes it.
    const MAX_FRAME: usize = 1518;

    const RING: Setup = Setup {
        ring: Some(RING_GEOMETRY),
        ignore_outgoing: true,
    };
    const PLAIN: Setup = Setup {
        ring: None,
        ignore_outgoing: true,
    };

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    fn ip(args: &[&str]) {
        let out = Command::new("ip").args(args).output().expect("runs ip");
        assert!(
            out.status.success(),
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn netns_path(name: &str) -> PathBuf {
        PathBuf::from(format!("/run/netns/{name}"))
    }

    /// Runs `f` on a thread of its own inside network namespace `name`; what it opens stays
    /// in that namespace.
    fn in_netns<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = netns_path(name);
        std::thread::spawn(move || {
            let ns = File::open(&path).expect("namespace file");
            // SAFETY: setns only moves this (test-owned, short-lived) thread into `ns`.
            let r = unsafe { libc::setns(ns.as_fd().as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    static NEXT: AtomicUsize = AtomicUsize::new(0);

    /// Two throwaway namespaces joined by a veth pair with its default offloads: `pA` in `a`
    /// (where the port goes; 10.99.0.2/24, fd99::2/64) and `pB` in `b` (the guests' side;
    /// 10.99.0.1/24, fd99::1/64). Both namespaces go when it drops, also when a test fails.
    struct Topology {
        a: String,
        b: String,
    }

    impl Topology {
        fn new() -> Option<Topology> {
            if !is_root() {
                eprintln!("skipped: needs root (network namespaces, AF_PACKET)");
                return None;
            }
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let pid = std::process::id();
            let t = Topology {
                a: format!("hnpkt-{pid}-{n}-a"),
                b: format!("hnpkt-{pid}-{n}-b"),
            };
            ip(&["netns", "add", &t.a]);
            ip(&["netns", "add", &t.b]);
            ip(&[
                "-n", &t.a, "link", "add", "pA", "type", "veth", "peer", "name", "pB", "netns",
                &t.b,
            ]);
            for (ns, dev, v4, v6) in [
                (&t.a, "pA", "10.99.0.2/24", "fd99::2/64"),
                (&t.b, "pB", "10.99.0.1/24", "fd99::1/64"),
            ] {
                ip(&["-n", ns, "link", "set", "lo", "up"]);
                ip(&["-n", ns, "addr", "add", v4, "dev", dev]);
                ip(&["-n", ns, "addr", "add", v6, "dev", dev, "nodad"]);
                ip(&["-n", ns, "link", "set", dev, "up"]);
            }
            Some(t)
        }

        fn in_a<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
            in_netns(&self.a, f)
        }

        fn in_b<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
            in_netns(&self.b, f)
        }

        fn port(&self, setup: Setup) -> PacketPort {
            self.in_a(move || PacketPort::attach_with("pA", MAX_FRAME, setup))
                .expect("attach to pA")
        }

        /// A raw socket on the guests' side.
        fn peer(&self) -> PacketSocket {
            PacketSocket::open_in_netns("pB", &netns_path(&self.b), Duration::from_secs(2))
                .expect("packet socket on pB")
        }
    }

    impl Drop for Topology {
        fn drop(&mut self) {
            for ns in [&self.a, &self.b] {
                let _ = Command::new("ip").args(["netns", "del", ns]).status();
            }
        }
    }

    /// Reads a port the way the switch does: on each readiness event, until `Ok(None)`.
    struct Reader {
        poll: mio::Poll,
        events: mio::Events,
        buf: Vec<u8>,
    }

    impl Reader {
        fn new(port: &PacketPort) -> Reader {
            let poll = mio::Poll::new().unwrap();
            port.register(poll.registry(), Token(7)).unwrap();
            Reader {
                poll,
                events: mio::Events::with_capacity(8),
                buf: vec![0; MAX_FRAME],
            }
        }

        /// The frames `keep` accepts, handed out until `done` says so, or nothing came for
        /// `quiet`, or 20 s passed.
        fn read(
            &mut self,
            port: &PacketPort,
            quiet: Duration,
            keep: impl Fn(&[u8]) -> bool,
            mut done: impl FnMut(&[Vec<u8>]) -> bool,
        ) -> Vec<Vec<u8>> {
            let start = Instant::now();
            let mut last = Instant::now();
            let mut frames = Vec::new();
            while !done(&frames)
                && last.elapsed() < quiet
                && start.elapsed() < Duration::from_secs(20)
            {
                match self
                    .poll
                    .poll(&mut self.events, Some(Duration::from_millis(20)))
                {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => panic!("poll: {e}"),
                }
                while let Some(n) = port.recv(&mut self.buf).expect("recv") {
                    last = Instant::now();
                    if keep(&self.buf[..n]) {
                        frames.push(self.buf[..n].to_vec());
                    }
                }
            }
            frames
        }
    }

    fn is_test_frame(f: &[u8]) -> bool {
        f[12..14] == [0x88, 0xb5] || f[12..14] == [0x81, 0x00] && f[16..18] == [0x88, 0xb5]
    }

    fn test_frame(i: u32, len: usize, dst: [u8; 6], vlan: bool) -> Vec<u8> {
        let mut f = dst.to_vec();
        f.extend_from_slice(&[2, 0, 0, 0, 0, 0xb]);
        if vlan {
            f.extend_from_slice(&[0x81, 0x00, 0x00, 0x64]);
        }
        f.extend_from_slice(&[0x88, 0xb5]);
        f.extend_from_slice(&i.to_be_bytes());
        f.resize(len, i as u8);
        f
    }

    /// Frames the guests' side puts on the wire (unicast to another MAC, broadcast, tagged)
    /// come out of the port byte for byte; a datagram the peer's kernel sends with checksum
    /// offload comes out with its checksum filled in.
    fn frames_from_the_peer_arrive_whole(t: &Topology, port: PacketPort) {
        assert!(port.status().connected);
        let mut reader = Reader::new(&port);
        let other = [2, 0, 0, 0, 0, 0x9];
        let sent: Vec<Vec<u8>> = [60, 61, 64, 100, 999, 1514]
            .into_iter()
            .enumerate()
            .map(|(i, len)| test_frame(i as u32, len, other, false))
            .chain([
                test_frame(6, 300, [0xff; 6], false),
                test_frame(7, 1000, other, true),
                test_frame(8, 1518, other, true),
            ])
            .collect();
        let peer = t.peer();
        for f in &sent {
            peer.send(f).expect("peer send");
        }
        let got = reader.read(&port, Duration::from_secs(3), is_test_frame, |f| {
            f.len() == sent.len()
        });
        assert!(
            got == sent,
            "{} frames of {}, or they differ",
            got.len(),
            sent.len()
        );

        let udp = t.in_b(|| UdpSocket::bind("10.99.0.1:0")).unwrap();
        udp.send_to(&pattern(333), "10.99.0.2:9").unwrap();
        let to_port_9 =
            |f: &[u8]| f.len() > 38 && f[12..14] == [8, 0] && f[23] == 17 && f[36..38] == [0, 9];
        let got = reader.read(&port, Duration::from_secs(3), to_port_9, |f| !f.is_empty());
        assert_eq!(got.len(), 1, "the datagram");
        let (_, seg) = checked_segment(&got[0]).unwrap();
        assert_eq!(seg[8..], pattern(333));
        assert_eq!(port.status().malformed, 0);
        eprintln!("{:?}", port.stats());
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn frames_from_the_peer_arrive_whole_through_the_ring() {
        let Some(t) = Topology::new() else { return };
        let port = t.port(RING);
        assert!(
            port.stats().ring && port.stats().vnet_hdr,
            "{:?}",
            port.stats()
        );
        frames_from_the_peer_arrive_whole(&t, port);
    }

    #[test]
    fn frames_from_the_peer_arrive_whole_through_plain_reads() {
        let Some(t) = Topology::new() else { return };
        let port = t.port(PLAIN);
        assert!(!port.stats().ring && port.stats().vnet_hdr);
        frames_from_the_peer_arrive_whole(&t, port);
    }

    #[test]
    fn an_inherited_socket_is_taken_over() {
        let Some(t) = Topology::new() else { return };
        let sock = t
            .in_a(|| PacketSocket::open("pA", Duration::from_millis(1)))
            .expect("packet socket on pA");
        let port = PacketPort::from_fd(OwnedFd::from(sock), MAX_FRAME).expect("from_fd");
        assert_eq!((port.kind(), port.address()), ("fd", "pA".to_string()));
        assert!(port.stats().vnet_hdr);
        frames_from_the_peer_arrive_whole(&t, port);
    }

    /// Frames `send` writes reach the peer whole; neither they nor frames someone else sends
    /// on the interface are read back.
    fn sent_frames_reach_the_peer_and_are_not_read_back(setup: Setup) {
        let Some(t) = Topology::new() else { return };
        let port = t.port(setup);
        let mut reader = Reader::new(&port);
        let capture = t.peer();
        let sent: Vec<Vec<u8>> = (0..50)
            .map(|i| test_frame(i, 60 + 29 * i as usize, [2, 0, 0, 0, 0, 9], false))
            .collect();
        for f in &sent {
            assert!(port.send(f));
        }
        let mut buf = vec![0u8; 2048];
        let mut seen = Vec::new();
        while seen.len() < sent.len() {
            match capture.recv(&mut buf).expect("capture") {
                Some((n, Direction::Incoming)) if is_test_frame(&buf[..n]) => {
                    seen.push(buf[..n].to_vec())
                }
                Some(_) => {}
                None => break,
            }
        }
        assert!(
            seen == sent,
            "{} of {} frames, or they differ",
            seen.len(),
            sent.len()
        );
        let other_sender = t
            .in_a(|| PacketSocket::open("pA", Duration::from_millis(100)))
            .unwrap();
        for i in 100..120 {
            other_sender
                .send(&test_frame(i, 200, [0xff; 6], false))
                .unwrap();
        }
        let back = reader.read(&port, Duration::from_millis(300), is_test_frame, |_| false);
        assert!(back.is_empty(), "{} frames read back", back.len());
        assert_eq!(port.status().send_failed, 0);
    }

    #[test]
    fn sent_frames_are_not_read_back() {
        sent_frames_reach_the_peer_and_are_not_read_back(RING);
    }

    #[test]
    fn sent_frames_are_not_read_back_without_ignore_outgoing() {
        sent_frames_reach_the_peer_and_are_not_read_back(Setup {
            ignore_outgoing: false,
            ..RING
        });
        sent_frames_reach_the_peer_and_are_not_read_back(Setup {
            ignore_outgoing: false,
            ..PLAIN
        });
    }

    /// A 64 KiB TCP stream from the guests' side, sent with the veth's checksum offload and
    /// TSO on: every frame the port hands out has valid checksums and fits the MTU, and their
    /// payloads put back together by sequence number are the bytes written.
    fn a_tcp_stream_arrives_in_valid_segments(v6: bool, setup: Setup) {
        let Some(t) = Topology::new() else { return };
        let port = t.port(setup);
        let mut reader = Reader::new(&port);
        let server: SocketAddr = if v6 {
            "[fd99::2]:5001"
        } else {
            "10.99.0.2:5001"
        }
        .parse()
        .unwrap();
        let listener = t.in_a(move || TcpListener::bind(server)).expect("listen");
        let receiver = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            got
        });
        let data = pattern(1 << 16);
        let mut client = t
            .in_b(move || TcpStream::connect_timeout(&server, Duration::from_secs(5)))
            .expect("connect");
        let to_write = data.clone();
        let writer = std::thread::spawn(move || {
            client.write_all(&to_write).unwrap();
            client.shutdown(std::net::Shutdown::Write).unwrap();
        });
        let is_ip = |f: &[u8]| f[12..14] == if v6 { [0x86, 0xdd] } else { [0x08, 0x00] };
        let frames = reader.read(
            &port,
            Duration::from_millis(300),
            |f| {
                is_ip(f)
                    && layout(f)
                        .is_some_and(|l| l.proto == IPPROTO_TCP && be16(f, l.l4 + 2) == Some(5001))
            },
            |_| receiver.is_finished(),
        );
        writer.join().unwrap();
        assert_eq!(receiver.join().unwrap(), data, "the stream itself");
        // What is still in flight (the last ACKs, FIN) after the receiver saw the end.
        let mut frames = frames;
        frames.extend(reader.read(
            &port,
            Duration::from_millis(200),
            |f| is_ip(f) && layout(f).is_some_and(|l| be16(f, l.l4 + 2) == Some(5001)),
            |_| false,
        ));
        let mut isn = None;
        let mut stream = vec![0u8; data.len()];
        let mut covered = vec![false; data.len()];
        for (i, f) in frames.iter().enumerate() {
            assert!(f.len() <= 1514, "frame {i}: {} bytes", f.len());
            let (_, tcp) = checked_segment(f).unwrap_or_else(|e| panic!("frame {i}: {e}"));
            let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
            if tcp[13] & 0x02 != 0 {
                isn = Some(seq);
            }
            let payload = &tcp[usize::from(tcp[12] >> 4) * 4..];
            if payload.is_empty() {
                continue;
            }
            let at = seq.wrapping_sub(isn.expect("the SYN first").wrapping_add(1)) as usize;
            stream[at..at + payload.len()].copy_from_slice(payload);
            covered[at..at + payload.len()].fill(true);
        }
        assert!(covered.iter().all(|&c| c), "bytes missing");
        assert!(stream == data, "the stream as the port handed it out");
        let stats = port.stats();
        eprintln!("{} frames; {stats:?}", frames.len());
        assert!(stats.gso_frames > 0, "no super-frame came: {stats:?}");
        assert!(stats.segments > stats.gso_frames, "{stats:?}");
        assert_eq!(port.status().malformed, 0);
    }

    #[test]
    fn a_tcp_stream_over_ipv4_arrives_in_valid_segments() {
        a_tcp_stream_arrives_in_valid_segments(false, RING);
    }

    #[test]
    fn a_tcp_stream_over_ipv6_arrives_in_valid_segments() {
        a_tcp_stream_arrives_in_valid_segments(true, RING);
    }

    #[test]
    fn a_tcp_stream_arrives_in_valid_segments_through_plain_reads() {
        a_tcp_stream_arrives_in_valid_segments(false, PLAIN);
    }

    /// A UDP GSO send (UDP_SEGMENT) comes out as the datagrams it stands for.
    #[test]
    fn udp_gso_arrives_as_datagrams() {
        let Some(t) = Topology::new() else { return };
        let port = t.port(RING);
        let mut reader = Reader::new(&port);
        let udp = t.in_b(|| UdpSocket::bind("10.99.0.1:0")).unwrap();
        setsockopt_int(udp.as_raw_fd(), libc::SOL_UDP, libc::UDP_SEGMENT, 1000).unwrap();
        let data = pattern(20_500);
        udp.send_to(&data, "10.99.0.2:5002").unwrap();
        let to_5002 = |f: &[u8]| {
            f.len() > 38 && f[12..14] == [8, 0] && f[23] == 17 && f[36..38] == [0x13, 0x8a]
        };
        let frames = reader.read(&port, Duration::from_secs(2), to_5002, |f| f.len() == 21);
        let mut joined = Vec::new();
        for f in &frames {
            let (_, seg) = checked_segment(f).unwrap();
            assert!(seg.len() <= 1008);
            joined.extend_from_slice(&seg[8..]);
        }
        assert!(joined == data, "{} of {} bytes", joined.len(), data.len());
        let stats = port.stats();
        assert!(stats.gso_frames > 0, "{stats:?}");
    }

    #[test]
    fn missing_or_down_interfaces_are_errors_that_name_them() {
        let Some(t) = Topology::new() else { return };
        let e = t
            .in_a(|| PacketPort::attach("pC", MAX_FRAME))
            .err()
            .unwrap();
        assert!(e.to_string().contains("`pC`"), "{e}");
        ip(&["-n", &t.a, "link", "set", "pA", "down"]);
        let e = t
            .in_a(|| PacketPort::attach("pA", MAX_FRAME))
            .err()
            .unwrap();
        assert!(e.to_string().contains("`pA` is down"), "{e}");
    }

    #[test]
    fn status_follows_the_interface_and_its_removal_breaks_the_port() {
        let Some(t) = Topology::new() else { return };
        for setup in [RING, PLAIN] {
            let port = t.port(setup);
            let mut poll = mio::Poll::new().unwrap();
            port.register(poll.registry(), Token(1)).unwrap();
            let out = Command::new("ip")
                .args(["-n", &t.a, "-d", "link", "show", "pA"])
                .output()
                .unwrap();
            assert!(String::from_utf8_lossy(&out.stdout).contains("promiscuity 1"));
            assert!(port.status().connected);
            ip(&["-n", &t.a, "link", "set", "pA", "down"]);
            assert!(!port.status().connected);
            let mut buf = vec![0u8; MAX_FRAME];
            let mut events = mio::Events::with_capacity(4);
            poll.poll(&mut events, Some(Duration::from_millis(100)))
                .unwrap();
            while port.recv(&mut buf).expect("down is not broken").is_some() {}
            ip(&["-n", &t.a, "link", "set", "pA", "up"]);
            assert!(port.status().connected);
            port.deregister(poll.registry()).unwrap();
        }
        let port = t.port(RING);
        let plain = t.port(PLAIN);
        ip(&["-n", &t.a, "link", "del", "pA"]);
        for port in [&port, &plain] {
            assert!(!port.status().connected);
            let mut buf = vec![0u8; MAX_FRAME];
            let e = loop {
                match port.recv(&mut buf) {
                    Ok(Some(_)) => {}
                    Ok(None) => panic!("the removal went unnoticed ({:?})", port.stats()),
                    Err(e) => break e,
                }
            };
            assert!(e.to_string().contains("`pA` is gone"), "{e}");
        }
    }

    /// Frames the port does not read in time are dropped by the kernel (and counted), not
    /// kept: the ring is all the memory the port's reads use.
    #[test]
    fn a_flood_is_bounded_by_the_ring() {
        let Some(t) = Topology::new() else { return };
        let port = t.port(RING);
        let mut reader = Reader::new(&port);
        let peer = t.peer();
        let sent = 6000;
        for i in 0..sent {
            peer.send(&test_frame(i, 1000, [2, 0, 0, 0, 0, 9], false))
                .unwrap();
        }
        let got = reader.read(&port, Duration::from_millis(300), is_test_frame, |_| false);
        let stats = port.stats();
        assert!(got.len() <= RING_GEOMETRY.slots(), "{} frames", got.len());
        // The count also has whatever else the peer sent meanwhile (IPv6 neighbour discovery).
        assert!(stats.kernel_drops > 0, "{stats:?}");
        // What came is in the order it was sent, none twice (the veth's backlog may drop some
        // on the way, before the ring).
        let numbers: Vec<u32> = got
            .iter()
            .map(|f| u32::from_be_bytes([f[14], f[15], f[16], f[17]]))
            .collect();
        assert!(numbers.windows(2).all(|w| w[0] < w[1]), "{numbers:?}");
    }

    /// A frame longer than its slot is cut there by the kernel: it is counted malformed,
    /// never handed out cut, and the frames around it come whole.
    #[test]
    fn a_frame_cut_by_its_slot_is_dropped_as_malformed() {
        let Some(t) = Topology::new() else { return };
        // Slots of 1 KiB hold frames up to 948 bytes after the kernel's headroom.
        let small = Geometry {
            block: 4096,
            slot: 1024,
            blocks: 2,
        };
        let port = t.port(Setup {
            ring: Some(small),
            ..RING
        });
        let mut reader = Reader::new(&port);
        let peer = t.peer();
        let dst = [2, 0, 0, 0, 0, 9];
        let sent: Vec<Vec<u8>> = [100, 1000, 940, 1514, 60]
            .into_iter()
            .enumerate()
            .map(|(i, len)| test_frame(i as u32, len, dst, false))
            .collect();
        for f in &sent {
            peer.send(f).unwrap();
        }
        let got = reader.read(&port, Duration::from_secs(3), is_test_frame, |f| {
            f.len() == 3
        });
        let whole = vec![sent[0].clone(), sent[2].clone(), sent[4].clone()];
        assert!(got == whole, "{} frames, or they differ", got.len());
        assert_eq!(port.status().malformed, 2, "{:?}", port.stats());
    }

    /// How long a frame sent alone takes from the peer's send to `recv`, through the ring and
    /// through plain reads, printed for the record (timings are not asserted: they depend on
    /// the machine and its load).
    #[test]
    fn a_lone_frame_is_read_at_once() {
        let Some(t) = Topology::new() else { return };
        for setup in [RING, PLAIN] {
            let port = t.port(setup);
            let mut reader = Reader::new(&port);
            let peer = t.peer();
            let mut worst = Duration::ZERO;
            let mut total = Duration::ZERO;
            let rounds = 200;
            for i in 0..rounds {
                let sent_at = Instant::now();
                peer.send(&test_frame(i, 100, [2, 0, 0, 0, 0, 9], false))
                    .unwrap();
                let got = reader.read(&port, Duration::from_secs(1), is_test_frame, |f| {
                    !f.is_empty()
                });
                assert_eq!(got.len(), 1);
                worst = worst.max(sent_at.elapsed());
                total += sent_at.elapsed();
            }
            eprintln!(
                "lone frame, {}: mean {:?}, worst {worst:?} over {rounds}",
                if setup.ring.is_some() {
                    "ring"
                } else {
                    "plain"
                },
                total / rounds
            );
        }
    }

    /// A burst of small frames from the peer, read as the switch reads: how many a second
    /// `recv` hands out, printed for the record with what the kernel dropped meanwhile. What
    /// came is in the order it was sent, none twice.
    #[test]
    fn a_burst_is_read_in_order() {
        let Some(t) = Topology::new() else { return };
        const BURST: u32 = 100_000;
        for setup in [RING, PLAIN] {
            let port = t.port(setup);
            let mut reader = Reader::new(&port);
            let peer = t.peer();
            let started = Instant::now();
            let mut sender = Some(std::thread::spawn(move || {
                let mut frame = test_frame(0, 100, [2, 0, 0, 0, 0, 9], false);
                for i in 0..BURST {
                    frame[14..18].copy_from_slice(&i.to_be_bytes());
                    peer.send(&frame).unwrap();
                }
                started.elapsed()
            }));
            let mut numbers = Vec::with_capacity(BURST as usize);
            // Time inside `recv` alone: what reading costs, whatever the sender's pace.
            let mut busy = Duration::ZERO;
            let mut last = Instant::now();
            let mut sent_in = None;
            while numbers.len() < BURST as usize {
                if sender.as_ref().is_some_and(|s| s.is_finished()) {
                    sent_in = sender.take().map(|s| s.join().unwrap());
                    last = Instant::now();
                }
                if sent_in.is_some() && last.elapsed() > Duration::from_millis(300) {
                    break;
                }
                reader
                    .poll
                    .poll(&mut reader.events, Some(Duration::from_millis(20)))
                    .unwrap();
                let mut t = Instant::now();
                while let Some(n) = port.recv(&mut reader.buf).expect("recv") {
                    busy += t.elapsed();
                    let f = &reader.buf[..n];
                    if is_test_frame(f) {
                        numbers.push(u32::from_be_bytes([f[14], f[15], f[16], f[17]]));
                        last = Instant::now();
                    }
                    t = Instant::now();
                }
                busy += t.elapsed();
            }
            let read_in = last - started;
            let sent_in = sent_in.or_else(|| sender.map(|s| s.join().unwrap()));
            eprintln!(
                "burst, {}: {} of {BURST} frames read in {read_in:?} ({:.0} frames/s; sent in \
                 {sent_in:?}); {busy:?} in recv ({:.0} frames/s of it); {:?}",
                if setup.ring.is_some() {
                    "ring"
                } else {
                    "plain"
                },
                numbers.len(),
                numbers.len() as f64 / read_in.as_secs_f64(),
                numbers.len() as f64 / busy.as_secs_f64(),
                port.stats()
            );
            assert!(!numbers.is_empty());
            assert!(numbers.windows(2).all(|w| w[0] < w[1]), "out of order");
            assert_eq!(port.status().malformed, 0);
        }
    }
}
