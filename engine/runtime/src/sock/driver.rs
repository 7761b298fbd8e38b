//! The host-socket driver: real, non-blocking OS sockets behind `SockIo`.
//!
//! Readiness comes from epoll (mio) or from io_uring (`sock::uring`, one ring per worker).
//! With epoll, sockets are registered edge-triggered with the runtime's `mio::Poll`, the token
//! being the `SockId`, and `events()` turns mio's readiness into the core's `SockEvent`s. With
//! io_uring, UDP datagrams arrive through a multishot receive into provided buffers
//! (`udp_recv` hands them out), other sockets have a multishot poll, and `ring_events()` turns
//! the completions into `SockEvent`s.
//!
//! A TCP connect is a plain non-blocking `connect` on either: where the destination is near
//! (another namespace, this host), the kernel has done the whole handshake before the call
//! returns, and the driver says so at once (`immediate_events`), so that the runtime gives the
//! guest its SYN-ACK in the batch that read the SYN instead of a wait later. Otherwise the
//! socket's first writable readiness finishes the connect.

use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr};

use super::addr::{family, RawAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use mio::net::{TcpStream, UdpSocket};
use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};

use crate::sock::uring::{Completion, FrameBufs, Ready, Ring};
use hubnat_core::sockio::{Datagram, IcmpError, SockEvent, SockId, SockIo, Unreachable};
use hubnat_core::FastHashMap;

/// Tokens at or above this are the runtime's own (the port, signals), never sockets.
pub use crate::tokens::FIRST_RESERVED_TOKEN;

enum Icmp {
    /// SOCK_DGRAM/IPPROTO_ICMP(V6) ("ping socket"): the kernel chooses the ident, filters
    /// replies.
    Datagram { fd: OwnedFd, v6: bool },
    /// SOCK_RAW: sees every echo reply (ICMPv4 with its IP header, ICMPv6 without).
    Raw { fd: OwnedFd, ident: u16, v6: bool },
}

impl Icmp {
    fn fd(&self) -> RawFd {
        match self {
            Icmp::Datagram { fd, .. } | Icmp::Raw { fd, .. } => fd.as_raw_fd(),
        }
    }

    fn v6(&self) -> bool {
        match self {
            Icmp::Datagram { v6, .. } | Icmp::Raw { v6, .. } => *v6,
        }
    }
}

struct Tcp {
    stream: TcpStream,
    connecting: bool,
    /// The kernel's SO_PEEK_OFF for this socket, or None where the kernel lacks it.
    peek_off: Option<usize>,
    eof: bool,
    /// Bytes the guest has acknowledged that are still in the socket: discarded in one call per
    /// batch (`flush_consumes`), not one per ACK. Peek offsets skip them meanwhile.
    unconsumed: usize,
}

impl Tcp {
    fn discard_unconsumed(&mut self) -> io::Result<()> {
        let fd = self.stream.as_raw_fd();
        while self.unconsumed > 0 {
            // MSG_TRUNC on a TCP socket discards the bytes without copying them anywhere.
            // SAFETY: a NULL buffer is allowed with MSG_TRUNC on TCP; nothing is written.
            let r = unsafe {
                libc::recv(
                    fd,
                    std::ptr::null_mut(),
                    self.unconsumed,
                    libc::MSG_TRUNC | libc::MSG_DONTWAIT,
                )
            };
            if r <= 0 {
                return Err(if r == 0 {
                    io::Error::new(io::ErrorKind::UnexpectedEof, "consume past EOF")
                } else {
                    io::Error::last_os_error()
                });
            }
            self.unconsumed -= r as usize;
            if let Some(cur) = self.peek_off.as_mut() {
                // The kernel moves the peek offset back by what was consumed.
                *cur = cur.saturating_sub(r as usize);
            }
        }
        Ok(())
    }
}

enum Sock {
    Udp(UdpSocket),
    Tcp(Tcp),
    Icmp(Icmp),
}

/// Where socket readiness comes from.
enum Readiness {
    Epoll(Registry),
    Uring(Box<Ring>),
}

pub struct SockDriver {
    readiness: Readiness,
    completions: Vec<Completion>,
    socks: FastHashMap<SockId, Sock>,
    next_id: SockId,
    /// Where SO_PEEK_OFF is missing, peeking at an offset copies the whole prefix here.
    scratch: Vec<u8>,
    /// TCP sockets with acknowledged bytes still to discard.
    to_consume: Vec<SockId>,
    /// Whether the host's UDP sockets take UDP_SEGMENT sends (off for good once the host
    /// said it cannot do them).
    udp_gso: bool,
    /// Events known when the call that caused them returned (`immediate_events`).
    immediate: Vec<SockEvent>,
    /// TCP sockets made (options set, not yet connected) after a batch, so that a guest's SYN
    /// costs the host one `connect` on the connection's first step rather than a `socket` and
    /// its `setsockopt`s as well. Per family (IPv4, IPv6), kept only for a family a guest has
    /// connected to.
    spare_tcp: [Spares; 2],
}

/// Spare TCP sockets of one family.
#[derive(Default)]
struct Spares {
    wanted: bool,
    ready: Vec<(TcpStream, Option<usize>)>,
}

/// Spare TCP sockets kept per family: one per connection a burst of SYNs in one batch would
/// open is more than a spare is worth; two cover a client that connects in a loop. A driver
/// holds at most twice this many descriptors besides its sessions' (the daemon reserves them).
pub const SPARE_TCP: usize = 2;

fn not_found() -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, "no such host socket")
}

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

pub(crate) fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `value` is a live c_int and its size is passed; the kernel only reads it.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// What the guest is told of an errno by which the network refused a send or a connect.
fn unreachable_of(errno: Option<i32>) -> Option<Unreachable> {
    match errno? {
        libc::ENETUNREACH => Some(Unreachable::Net),
        libc::EHOSTUNREACH => Some(Unreachable::Host),
        // What a firewall of the host's own (netfilter) answers.
        libc::EPERM => Some(Unreachable::Prohibited),
        _ => None,
    }
}

/// `e` with its `Unreachable` attached, where it has one, for the core to tell the guest.
fn classify(e: io::Error) -> io::Error {
    match unreachable_of(e.raw_os_error()) {
        Some(why) => io::Error::new(e.kind(), why),
        None => e,
    }
}

/// The core's event for a connect that failed with `e`.
fn connect_failed(id: SockId, e: &io::Error) -> SockEvent {
    match unreachable_of(e.raw_os_error()) {
        Some(why) => SockEvent::ConnectUnreachable(id, why),
        None => SockEvent::ConnectFailed(id, e.kind()),
    }
}

/// Has the ICMP errors about what `fd` sends queued for `recv_error` (and its pending error
/// set) instead of only the hard ones surfacing as a pending error.
fn recv_errors(fd: RawFd, v6: bool) -> io::Result<()> {
    if v6 {
        setsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVERR, 1)
    } else {
        setsockopt_int(fd, libc::IPPROTO_IP, libc::IP_RECVERR, 1)
    }
}

/// One entry of `fd`'s error queue that came from ICMP: the error, its sender and the first
/// bytes of the datagram it quoted past the headers the socket's protocol owns (copied into
/// `quoted`, their count returned). `Ok(None)`: an entry of another origin, now gone.
fn read_error_queue(
    fd: RawFd,
    quoted: &mut [u8; 8],
) -> io::Result<Option<(libc::sock_extended_err, IpAddr, usize)>> {
    let mut iov = libc::iovec {
        iov_base: quoted.as_mut_ptr().cast(),
        iov_len: quoted.len(),
    };
    // u64s: the control buffer must be aligned for cmsghdr. Room for the IP_RECVERR message
    // (header, sock_extended_err, the offender's sockaddr_in) several times over.
    let mut control = [0u64; 16];
    // SAFETY: msghdr is plain data, for which all zeroes is a valid (empty) value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: `msg` points at `iov` (into `quoted`) and `control`, live and writable for the
    // lengths it gives, during the call.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let len = (n as usize).min(quoted.len());
    // SAFETY: `msg` is the header recvmsg filled in; its control messages lie in `control`.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: a non-null pointer from CMSG_FIRSTHDR/NXTHDR is a header within `control`.
        let (level, kind) = unsafe { ((*cmsg).cmsg_level, (*cmsg).cmsg_type) };
        if level == libc::SOL_IP && kind == libc::IP_RECVERR {
            // SAFETY: an IP_RECVERR message holds a sock_extended_err followed by the
            // offender's address (SO_EE_OFFENDER), within `control`; read unaligned.
            let (ee, offender) = unsafe {
                let ee = libc::CMSG_DATA(cmsg) as *const libc::sock_extended_err;
                let off = libc::SO_EE_OFFENDER(ee) as *const libc::sockaddr_in;
                (ee.read_unaligned(), off.read_unaligned())
            };
            if ee.ee_origin != libc::SO_EE_ORIGIN_ICMP {
                return Ok(None);
            }
            let from = Ipv4Addr::from(u32::from_be(offender.sin_addr.s_addr));
            return Ok(Some((ee, from.into(), len)));
        }
        if level == libc::SOL_IPV6 && kind == libc::IPV6_RECVERR {
            // SAFETY: as above, the offender being a sockaddr_in6 (control has room for it).
            let (ee, offender) = unsafe {
                let ee = libc::CMSG_DATA(cmsg) as *const libc::sock_extended_err;
                let off = libc::SO_EE_OFFENDER(ee) as *const libc::sockaddr_in6;
                (ee.read_unaligned(), off.read_unaligned())
            };
            if ee.ee_origin != libc::SO_EE_ORIGIN_ICMP6 {
                return Ok(None);
            }
            let from = std::net::Ipv6Addr::from(offender.sin6_addr.s6_addr);
            return Ok(Some((ee, from.into(), len)));
        }
        // SAFETY: as for CMSG_FIRSTHDR.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    Ok(None)
}

/// Receives on UDP socket `fd` into `buf`: one datagram, or a run of datagrams the host's stack
/// handed over as one (UDP_GRO), with the size of each (0: one datagram).
pub(crate) fn recv_segments(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, usize)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // u64s: the control buffer must be aligned for cmsghdr; room for the UDP_GRO message.
    let mut control = [0u64; 8];
    // SAFETY: msghdr is plain data, for which all zeroes is a valid (empty) value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: `msg` points at `iov` (into `buf`) and `control`, live and writable for the
    // lengths it gives, during the call.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let len = (msg.msg_controllen as usize).min(std::mem::size_of_val(&control));
    // SAFETY: `control` is initialised plain data; viewing its first `len` bytes as bytes.
    let bytes = unsafe { std::slice::from_raw_parts(control.as_ptr().cast::<u8>(), len) };
    Ok((
        n as usize,
        usize::from(crate::sock::uring::gro_segment(bytes)),
    ))
}

/// Sends `payload` on the connected UDP socket `fd` as datagrams of `segment` bytes, in one
/// call: the host's stack cuts it (UDP_SEGMENT, Linux 4.18), as late as its devices allow.
fn send_segmented(fd: RawFd, payload: &[u8], segment: u16) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr().cast_mut().cast(),
        iov_len: payload.len(),
    };
    // u64s: the control buffer must be aligned for cmsghdr; one u16 message fits in 4.
    let mut control = [0u64; 4];
    // SAFETY: msghdr is plain data, for which all zeroes is a valid (empty) value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(2) } as _;
    // SAFETY: `control` has room for one message of CMSG_SPACE(2) bytes, which `msg` points
    // at, so CMSG_FIRSTHDR is non-null and its data lies within `control`.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_UDP;
        (*cmsg).cmsg_type = libc::UDP_SEGMENT;
        (*cmsg).cmsg_len = libc::CMSG_LEN(2) as _;
        libc::CMSG_DATA(cmsg).cast::<u16>().write_unaligned(segment);
    }
    // SAFETY: `msg` points at `iov` (into `payload`) and `control`, live during the call; the
    // kernel only reads them.
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

impl SockDriver {
    pub fn new(registry: Registry) -> SockDriver {
        SockDriver::with_readiness(Readiness::Epoll(registry))
    }

    /// A driver whose readiness comes from `ring` (see `sock::uring`).
    pub fn with_uring(ring: Ring) -> SockDriver {
        SockDriver::with_readiness(Readiness::Uring(Box::new(ring)))
    }

    fn with_readiness(readiness: Readiness) -> SockDriver {
        SockDriver {
            readiness,
            completions: Vec::new(),
            immediate: Vec::new(),
            socks: FastHashMap::default(),
            next_id: 0,
            scratch: Vec::new(),
            to_consume: Vec::new(),
            udp_gso: true,
            spare_tcp: Default::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.socks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.socks.is_empty()
    }

    fn alloc_id(&mut self) -> SockId {
        loop {
            self.next_id = self.next_id.wrapping_add(1);
            if self.next_id as usize >= FIRST_RESERVED_TOKEN {
                self.next_id = 1;
            }
            if !self.socks.contains_key(&self.next_id) {
                return self.next_id;
            }
        }
    }

    /// The io_uring's fd when readiness comes from one (the runtime waits on it).
    pub fn ring_fd(&self) -> Option<RawFd> {
        match &self.readiness {
            Readiness::Uring(r) => Some(r.fd()),
            Readiness::Epoll(_) => None,
        }
    }

    pub fn backend_name(&self) -> &'static str {
        match &self.readiness {
            Readiness::Uring(_) => "io_uring",
            Readiness::Epoll(_) => "mio",
        }
    }

    /// Submits what the batch queued (io_uring) and makes the spare sockets the batch took;
    /// call before waiting.
    pub fn submit(&mut self) {
        self.flush_consumes();
        if let Readiness::Uring(r) = &mut self.readiness {
            if let Err(e) = r.submit() {
                tracing::warn!("io_uring submit failed: {e}");
            }
        }
        self.refill_spares();
    }

    fn spares_short(&self) -> bool {
        self.spare_tcp
            .iter()
            .any(|s| s.wanted && s.ready.len() < SPARE_TCP)
    }

    /// Makes spare TCP sockets up to `SPARE_TCP` per family in use. A failure (out of file
    /// descriptors, say) leaves the spares short: a connection then makes its own socket and
    /// reports that socket's error.
    fn refill_spares(&mut self) {
        for (i, family) in [(0, libc::AF_INET), (1, libc::AF_INET6)] {
            while self.spare_tcp[i].wanted && self.spare_tcp[i].ready.len() < SPARE_TCP {
                match Self::new_tcp_socket(family) {
                    Ok(spare) => self.spare_tcp[i].ready.push(spare),
                    Err(_) => break,
                }
            }
        }
    }

    /// A TCP socket with every option a connection needs set, and its peek offset.
    fn new_tcp_socket(family: libc::c_int) -> io::Result<(TcpStream, Option<usize>)> {
        // SAFETY: plain socket creation; the result is checked.
        let fd = cvt(unsafe {
            libc::socket(
                family,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        })?;
        // SAFETY: a fresh fd owned by nobody else.
        let stream = unsafe { TcpStream::from_raw_fd(fd) };
        let peek_off = Self::tcp_options(&stream);
        Ok((stream, peek_off))
    }

    /// Discards what the guest acknowledged during the batch: one call per socket per batch
    /// instead of one per ACK (each of which could also send the server a window update). Runs
    /// before the thread waits, so nothing acknowledged stays in a socket across a sleep.
    pub fn flush_consumes(&mut self) {
        // Drained in place: the list keeps its capacity from batch to batch.
        for id in self.to_consume.drain(..) {
            if let Some(Sock::Tcp(t)) = self.socks.get_mut(&id) {
                if let Err(e) = t.discard_unconsumed() {
                    // The socket's failure reaches the core through its readiness.
                    tracing::debug!("host socket {id}: discarding acknowledged bytes: {e}");
                }
            }
        }
    }

    /// Moves the events that were known when the calls that caused them returned (a connect
    /// whose handshake was over) into `into`. The runtime takes them before it ends a batch.
    pub fn immediate_events(&mut self, into: &mut Vec<SockEvent>) {
        into.append(&mut self.immediate);
    }

    /// Reads the ring's completions (io_uring) into the core's events.
    pub fn ring_events(&mut self, into: &mut Vec<SockEvent>) {
        self.ring_events_and_tokens(into, &mut |_| {});
    }

    /// Like `ring_events`; the tokens of the thread's own descriptors (`watch_token`) that
    /// are ready go to `token`.
    pub fn ring_events_and_tokens(
        &mut self,
        into: &mut Vec<SockEvent>,
        token: &mut dyn FnMut(usize),
    ) {
        let Readiness::Uring(r) = &mut self.readiness else {
            return;
        };
        let mut got = std::mem::take(&mut self.completions);
        got.clear();
        r.drain(&mut got);
        for &c in &got {
            match c {
                Completion::Ready(id, ready) => self.ready(id, ready, into),
                Completion::Readable(id) => {
                    if self.socks.contains_key(&id) {
                        into.push(SockEvent::Readable(id));
                    }
                }
                Completion::Token(t) => token(t),
            }
        }
        self.completions = got;
    }

    /// Watches one of the thread's own descriptors in the ring (io_uring); it comes back as a
    /// token from `ring_events_and_tokens`.
    /// Reads the thread's TAP queue `fd` through the ring (see `Ring::read_frames`); None
    /// where it cannot (epoll, or no multishot read).
    pub fn read_frames(&mut self, fd: RawFd) -> io::Result<Option<FrameBufs>> {
        match &mut self.readiness {
            Readiness::Uring(r) => r.read_frames(fd),
            Readiness::Epoll(_) => Ok(None),
        }
    }

    /// The frames the ring read (see `Ring::take_frames`).
    pub fn take_frames(&mut self, into: &mut Vec<(u16, u32)>) {
        if let Readiness::Uring(r) = &mut self.readiness {
            r.take_frames(into);
        }
    }

    /// See `Ring::frames_handled`.
    pub fn frames_handled(&mut self) -> io::Result<()> {
        match &mut self.readiness {
            Readiness::Uring(r) => r.frames_handled(),
            Readiness::Epoll(_) => Ok(()),
        }
    }

    pub fn watch_token(&mut self, fd: RawFd, token: usize) -> io::Result<()> {
        match &mut self.readiness {
            Readiness::Uring(r) => r.watch_token(fd, token),
            Readiness::Epoll(_) => Err(io::ErrorKind::Unsupported.into()),
        }
    }

    /// Submits what the batch queued and waits in the ring (io_uring) for at most `timeout`,
    /// polling without sleeping until `spin_until`. True when completions are waiting.
    pub fn wait(
        &mut self,
        timeout: Option<std::time::Duration>,
        spin_until: std::time::Instant,
    ) -> io::Result<bool> {
        self.flush_consumes();
        if self.spares_short() {
            // The batch's writes go out first: the spares are made while they travel.
            if let Readiness::Uring(r) = &mut self.readiness {
                r.submit()?;
            }
            self.refill_spares();
        }
        match &mut self.readiness {
            Readiness::Uring(r) => r.wait(timeout, spin_until),
            Readiness::Epoll(_) => Err(io::ErrorKind::Unsupported.into()),
        }
    }

    /// Translates one mio event for a socket into the core's events.
    pub fn events(&mut self, event: &mio::event::Event, into: &mut Vec<SockEvent>) {
        let ready = Ready {
            readable: event.is_readable(),
            writable: event.is_writable(),
            error: event.is_error(),
            read_closed: event.is_read_closed(),
            write_closed: event.is_write_closed(),
        };
        self.ready(event.token().0 as SockId, ready, into)
    }

    fn ready(&mut self, id: SockId, event: Ready, into: &mut Vec<SockEvent>) {
        let Some(sock) = self.socks.get_mut(&id) else {
            return;
        };
        match sock {
            Sock::Tcp(t) if t.connecting => {
                if !(event.writable || event.error || event.write_closed) {
                    return;
                }
                let err = match t.stream.take_error() {
                    Ok(Some(e)) => Some(e),
                    Err(e) => Some(e),
                    Ok(None) => t.stream.peer_addr().err(),
                };
                match err {
                    Some(e) if e.kind() == io::ErrorKind::NotConnected => {}
                    Some(e) => {
                        into.push(connect_failed(id, &e));
                    }
                    None => {
                        t.connecting = false;
                        into.push(SockEvent::Connected(id));
                        if event.readable {
                            into.push(SockEvent::Readable(id));
                        }
                    }
                }
            }
            Sock::Tcp(t) => {
                if event.error {
                    if let Ok(Some(e)) | Err(e) = t.stream.take_error() {
                        into.push(SockEvent::Failed(id, e.kind()));
                        return;
                    }
                }
                if event.readable || event.read_closed {
                    into.push(SockEvent::Readable(id));
                }
                if event.writable {
                    into.push(SockEvent::Writable(id));
                }
            }
            Sock::Udp(_) | Sock::Icmp(_) => {
                if event.readable || event.error {
                    into.push(SockEvent::Readable(id));
                }
            }
        }
    }

    fn tcp(&mut self, id: SockId) -> io::Result<&mut Tcp> {
        match self.socks.get_mut(&id) {
            Some(Sock::Tcp(t)) => Ok(t),
            _ => Err(not_found()),
        }
    }

    /// What every TCP socket gets: no Nagle (the guest's own stack decides when to send) and a
    /// peek offset where the kernel has one (its value). Buffer sizes stay the kernel's:
    /// setting one would switch off its autotuning, which is what lets a fast flow's window grow.
    fn tcp_options(stream: &TcpStream) -> Option<usize> {
        let fd = stream.as_raw_fd();
        let _ = stream.set_nodelay(true);
        setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF, 0)
            .ok()
            .map(|_| 0)
    }

    /// Takes over a connection a forward accepted: from here on it is a connected socket of
    /// this driver like one it connected itself.
    pub fn adopt_tcp(&mut self, stream: std::net::TcpStream) -> io::Result<SockId> {
        stream.set_nonblocking(true)?;
        let stream = TcpStream::from_std(stream);
        let peek_off = Self::tcp_options(&stream);
        let id = self.alloc_id();
        self.register_fd(stream.as_raw_fd(), id, true)?;
        self.socks.insert(
            id,
            Sock::Tcp(Tcp {
                stream,
                connecting: false,
                peek_off,
                eof: false,
                unconsumed: 0,
            }),
        );
        Ok(id)
    }

    /// Takes over a UDP socket a forward connected to its client.
    pub fn adopt_udp(&mut self, sock: std::net::UdpSocket) -> io::Result<SockId> {
        sock.set_nonblocking(true)?;
        recv_errors(sock.as_raw_fd(), sock.local_addr()?.is_ipv6())?;
        self.add_udp(UdpSocket::from_std(sock), false)
    }

    /// Numbers and watches UDP socket `sock` (`runs`: it has UDP_GRO on).
    fn add_udp(&mut self, sock: UdpSocket, runs: bool) -> io::Result<SockId> {
        let id = self.alloc_id();
        match &mut self.readiness {
            Readiness::Uring(r) => r.udp(sock.as_raw_fd(), id, runs)?,
            Readiness::Epoll(_) => self.register_fd(sock.as_raw_fd(), id, false)?,
        }
        self.socks.insert(id, Sock::Udp(sock));
        Ok(id)
    }

    /// A UDP socket bound to an ephemeral port and connected to `dst`; with `runs`, UDP_GRO on
    /// where the host has it.
    fn open_udp(&mut self, dst: SocketAddr, runs: bool) -> io::Result<SockId> {
        let any: IpAddr = match dst {
            SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
        };
        let sock = UdpSocket::bind(SocketAddr::new(any, 0))?;
        recv_errors(sock.as_raw_fd(), dst.is_ipv6())?;
        // Without it (before Linux 5.0) datagrams come one by one, which is as correct.
        let runs =
            runs && setsockopt_int(sock.as_raw_fd(), libc::SOL_UDP, libc::UDP_GRO, 1).is_ok();
        sock.connect(dst).map_err(classify)?;
        self.add_udp(sock, runs)
    }

    fn register_fd(&mut self, fd: RawFd, id: SockId, writable: bool) -> io::Result<()> {
        match &mut self.readiness {
            Readiness::Epoll(reg) => {
                let interest = if writable {
                    Interest::READABLE | Interest::WRITABLE
                } else {
                    Interest::READABLE
                };
                reg.register(&mut SourceFd(&fd), Token(id as usize), interest)
            }
            Readiness::Uring(r) => r.watch(fd, id, writable),
        }
    }

    fn deregister_fd(&mut self, fd: RawFd, id: SockId) {
        match &mut self.readiness {
            Readiness::Epoll(reg) => {
                let _ = reg.deregister(&mut SourceFd(&fd));
            }
            Readiness::Uring(r) => r.unwatch(id),
        }
    }

    fn open_icmp(&mut self, v6: bool) -> io::Result<Icmp> {
        let (family, proto) = if v6 {
            (libc::AF_INET6, libc::IPPROTO_ICMPV6)
        } else {
            (libc::AF_INET, libc::IPPROTO_ICMP)
        };
        let flags = libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
        // SAFETY: plain socket creation; the result is checked.
        let dgram = unsafe { libc::socket(family, libc::SOCK_DGRAM | flags, proto) };
        if dgram >= 0 {
            // SAFETY: a fresh fd owned by nobody else.
            let fd = unsafe { OwnedFd::from_raw_fd(dgram) };
            recv_errors(fd.as_raw_fd(), v6)?;
            return Ok(Icmp::Datagram { fd, v6 });
        }
        // SAFETY: as above.
        let raw = cvt(unsafe { libc::socket(family, libc::SOCK_RAW | flags, proto) })?;
        // SAFETY: a fresh fd owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        recv_errors(fd.as_raw_fd(), v6)?;
        Ok(Icmp::Raw { fd, ident: 0, v6 })
    }
}

impl SockIo for SockDriver {
    fn udp_open(&mut self, dst: SocketAddr) -> io::Result<SockId> {
        self.open_udp(dst, false)
    }

    fn udp_open_runs(&mut self, dst: SocketAddr) -> io::Result<SockId> {
        self.open_udp(dst, true)
    }

    fn udp_send(&mut self, id: SockId, payload: &[u8]) -> io::Result<usize> {
        match self.socks.get(&id) {
            Some(Sock::Udp(s)) => s.send(payload).map_err(classify),
            _ => Err(not_found()),
        }
    }

    fn udp_send_segments(
        &mut self,
        id: SockId,
        payload: &[u8],
        segment: usize,
    ) -> io::Result<usize> {
        let Some(Sock::Udp(s)) = self.socks.get(&id) else {
            return Err(not_found());
        };
        let segment = segment.max(1);
        if self.udp_gso && payload.len() > segment {
            let seg = u16::try_from(segment).unwrap_or(u16::MAX);
            match send_segmented(s.as_raw_fd(), payload, seg) {
                Ok(n) => return Ok(n),
                // The host's stack cannot segment (no UDP_SEGMENT, or a device on the route
                // that cannot complete checksums): for good.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ENOPROTOOPT | libc::EOPNOTSUPP | libc::EIO)
                    ) =>
                {
                    tracing::info!(
                        "the host refuses UDP segmentation offload ({e}): guests' datagrams \
                         leave one by one"
                    );
                    self.udp_gso = false;
                }
                // Segments larger than the route's MTU: these go one by one (as fragments).
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => return Err(classify(e)),
            }
        }
        hubnat_core::sockio::send_each(payload, segment, |d| s.send(d).map_err(classify))
    }

    fn udp_recv_segments(&mut self, id: SockId, buf: &mut [u8]) -> io::Result<(usize, usize)> {
        if let Readiness::Uring(r) = &mut self.readiness {
            if let Some(res) = r.udp_recv_segments(id, buf) {
                return res;
            }
        }
        match self.socks.get(&id) {
            Some(Sock::Udp(s)) => recv_segments(s.as_raw_fd(), buf),
            _ => Err(not_found()),
        }
    }

    fn udp_recv(&mut self, id: SockId, buf: &mut [u8]) -> io::Result<usize> {
        if let Readiness::Uring(r) = &mut self.readiness {
            if let Some(res) = r.udp_recv_segments(id, buf) {
                return res.map(|(n, _)| n);
            }
        }
        match self.socks.get(&id) {
            Some(Sock::Udp(s)) => s.recv(buf),
            _ => Err(not_found()),
        }
    }

    fn tcp_connect(&mut self, dst: SocketAddr) -> io::Result<SockId> {
        let spares = &mut self.spare_tcp[usize::from(dst.is_ipv6())];
        spares.wanted = true;
        let (stream, peek_off) = match spares.ready.pop() {
            Some(spare) => spare,
            None => Self::new_tcp_socket(family(&dst))?,
        };
        let fd = stream.as_raw_fd();
        let addr = RawAddr::new(dst);
        // SAFETY: `addr` holds a socket address of `addr.len()` bytes, alive for the call.
        let r = unsafe { libc::connect(fd, addr.as_ptr(), addr.len()) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINPROGRESS) {
                return Err(classify(e));
            }
        }
        let id = self.alloc_id();
        self.register_fd(fd, id, true)?;
        // A peer address means the handshake is over (a socket still connecting has none).
        let connected = stream.peer_addr().is_ok();
        if connected {
            self.immediate.push(SockEvent::Connected(id));
        }
        self.socks.insert(
            id,
            Sock::Tcp(Tcp {
                stream,
                connecting: !connected,
                peek_off,
                eof: false,
                unconsumed: 0,
            }),
        );
        Ok(id)
    }

    fn tcp_send(&mut self, id: SockId, data: &[u8]) -> io::Result<usize> {
        let t = self.tcp(id)?;
        match t.stream.write(data) {
            Ok(n) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) => Err(e),
        }
    }

    fn tcp_peek(&mut self, id: SockId, offset: usize, buf: &mut [u8]) -> io::Result<usize> {
        let scratch = &mut self.scratch;
        let t = match self.socks.get_mut(&id) {
            Some(Sock::Tcp(t)) => t,
            _ => return Err(not_found()),
        };
        let fd = t.stream.as_raw_fd();
        // The socket still holds the acknowledged bytes not yet discarded: skip them.
        let offset = offset + t.unconsumed;
        // (bytes copied into `buf`, whether the peer's FIN was reached)
        let (peeked, eof) = if let Some(cur) = t.peek_off {
            if cur != offset {
                setsockopt_int(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_PEEK_OFF,
                    offset as libc::c_int,
                )?;
                t.peek_off = Some(offset);
            }
            // SAFETY: `buf` is valid for writes of `buf.len()` bytes during the call.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_PEEK) };
            if n > 0 {
                t.peek_off = Some(offset + n as usize);
            }
            (n, n == 0)
        } else {
            // No SO_PEEK_OFF: peek the prefix too and copy out the part asked for.
            scratch.resize(offset + buf.len(), 0);
            // SAFETY: `scratch` is valid for writes of its length during the call.
            let n = unsafe {
                libc::recv(
                    fd,
                    scratch.as_mut_ptr().cast(),
                    scratch.len(),
                    libc::MSG_PEEK,
                )
            };
            if n > offset as isize {
                let got = n as usize - offset;
                buf[..got].copy_from_slice(&scratch[offset..n as usize]);
                (got as isize, false)
            } else if n >= 0 {
                (0, n == 0)
            } else {
                (n, false)
            }
        };
        if peeked < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock => Ok(0),
                _ => Err(e),
            };
        }
        if eof && !buf.is_empty() {
            t.eof = true;
        }
        Ok(peeked as usize)
    }

    fn tcp_consume(&mut self, id: SockId, n: usize) -> io::Result<()> {
        let t = self.tcp(id)?;
        let first = t.unconsumed == 0 && n > 0;
        t.unconsumed += n;
        if first {
            self.to_consume.push(id);
        }
        Ok(())
    }

    fn tcp_peer_closed(&mut self, id: SockId) -> bool {
        self.tcp(id).map(|t| t.eof).unwrap_or(true)
    }

    fn tcp_shutdown_write(&mut self, id: SockId) -> io::Result<()> {
        self.tcp(id)?.stream.shutdown(Shutdown::Write)
    }

    fn tcp_abort(&mut self, id: SockId) {
        if let Ok(t) = self.tcp(id) {
            // Linger 0: close() sends RST instead of FIN.
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            // SAFETY: `linger` is a live struct and its size is passed; the kernel only reads it.
            unsafe {
                libc::setsockopt(
                    t.stream.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&linger as *const libc::linger).cast(),
                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                );
            }
        }
    }

    fn icmp_open(&mut self, v6: bool) -> io::Result<SockId> {
        let icmp = self.open_icmp(v6)?;
        let fd = icmp.fd();
        let id = self.alloc_id();
        self.register_fd(fd, id, false)?;
        self.socks.insert(id, Sock::Icmp(icmp));
        Ok(id)
    }

    fn icmp_send(&mut self, id: SockId, dst: IpAddr, message: &[u8]) -> io::Result<()> {
        let Some(Sock::Icmp(icmp)) = self.socks.get_mut(&id) else {
            return Err(not_found());
        };
        if let Icmp::Raw { ident, .. } = icmp {
            if message.len() >= 6 {
                *ident = u16::from_be_bytes([message[4], message[5]]);
            }
        }
        let fd = icmp.fd();
        let addr = RawAddr::new(SocketAddr::new(dst, 0));
        // SAFETY: `message` and `addr` are valid for reads of the lengths passed.
        let n = unsafe {
            libc::sendto(
                fd,
                message.as_ptr().cast(),
                message.len(),
                0,
                addr.as_ptr(),
                addr.len(),
            )
        };
        if n < 0 {
            return Err(classify(io::Error::last_os_error()));
        }
        Ok(())
    }

    fn icmp_recv(&mut self, id: SockId, buf: &mut [u8]) -> io::Result<Datagram> {
        let Some(Sock::Icmp(icmp)) = self.socks.get_mut(&id) else {
            return Err(not_found());
        };
        loop {
            let (fd, v6) = (icmp.fd(), icmp.v6());
            let raw_ident = match icmp {
                Icmp::Datagram { .. } => None,
                Icmp::Raw { ident, .. } => Some(*ident),
            };
            let mut addr = RawAddr::empty();
            // SAFETY: `buf` and `addr` are valid for writes of the lengths passed.
            let n = unsafe {
                libc::recvfrom(
                    fd,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    addr.as_mut_ptr(),
                    addr.len_mut(),
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let Some(from) = addr.get() else {
                continue;
            };
            let from = SocketAddr::new(from.ip(), 0);
            let mut len = n as usize;
            if let Some(ident) = raw_ident {
                // A raw socket sees every ICMP message (ICMPv4 with its IP header): keep only
                // the echo replies to the ident this socket sent, and strip the header.
                let reply = if v6 { 129 } else { 0 };
                let ihl = if v6 {
                    0
                } else {
                    buf.first().map_or(0, |b| ((b & 0x0f) as usize) * 4)
                };
                if (!v6 && ihl < 20) || len < ihl + 8 {
                    continue;
                }
                let icmp_msg = &buf[ihl..len];
                if icmp_msg[0] != reply || u16::from_be_bytes([icmp_msg[4], icmp_msg[5]]) != ident {
                    continue;
                }
                buf.copy_within(ihl..len, 0);
                len -= ihl;
            }
            return Ok(Datagram { len, from });
        }
    }

    fn udp_rcvbuf(&mut self, id: SockId, bytes: usize) {
        let Some(Sock::Udp(s)) = self.socks.get(&id) else {
            return;
        };
        let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        // Beyond net.core.rmem_max only with CAP_NET_ADMIN (kept for the NAPI switch); else
        // the largest the host allows.
        let fd = s.as_raw_fd();
        if setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, value).is_err() {
            let _ = setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, value);
        }
    }

    fn set_ttl(&mut self, id: SockId, ttl: Option<u8>) -> io::Result<()> {
        let (fd, v6) = match self.socks.get(&id) {
            Some(Sock::Udp(s)) => (s.as_raw_fd(), s.local_addr()?.is_ipv6()),
            Some(Sock::Icmp(icmp)) => (icmp.fd(), icmp.v6()),
            _ => return Err(not_found()),
        };
        // -1: back to the host's default.
        let value = ttl.map_or(-1, libc::c_int::from);
        if v6 {
            setsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS, value)
        } else {
            setsockopt_int(fd, libc::IPPROTO_IP, libc::IP_TTL, value)
        }
    }

    fn recv_error(&mut self, id: SockId) -> io::Result<IcmpError> {
        // A raw ICMP socket is told of errors about every echo request to its destination:
        // those of its own ident are its own.
        let (fd, raw_ident) = match self.socks.get(&id) {
            Some(Sock::Udp(s)) => (s.as_raw_fd(), None),
            Some(Sock::Icmp(Icmp::Datagram { fd, .. })) => (fd.as_raw_fd(), None),
            Some(Sock::Icmp(Icmp::Raw { fd, ident, .. })) => (fd.as_raw_fd(), Some(*ident)),
            _ => return Err(not_found()),
        };
        let udp = matches!(self.socks.get(&id), Some(Sock::Udp(_)));
        loop {
            let mut quoted = [0u8; 8];
            let Some((ee, mut from, len)) = read_error_queue(fd, &mut quoted)? else {
                continue;
            };
            if let Some(ident) = raw_ident {
                if len < 6 || u16::from_be_bytes([quoted[4], quoted[5]]) != ident {
                    continue;
                }
            }
            if udp {
                // The host's own stack speaks for a next hop it could not reach: the guest
                // hears that from its own router, the virtual host, not from this machine.
                // (A destination on this machine answers from the same address: that is its own
                // answer.)
                let ends = self.socks.get(&id).and_then(|s| match s {
                    Sock::Udp(s) => Some((s.local_addr().ok()?, s.peer_addr().ok()?)),
                    _ => None,
                });
                if ends.is_some_and(|(local, peer)| local.ip() == from && peer.ip() != from) {
                    from = match from {
                        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
                        IpAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
                    };
                }
            }
            return Ok(IcmpError {
                from,
                icmp_type: ee.ee_type,
                code: ee.ee_code,
                info: ee.ee_info,
                quoted,
                quoted_len: if udp { 0 } else { len as u8 },
            });
        }
    }

    fn close(&mut self, id: SockId) {
        if let Some(Sock::Tcp(t)) = self.socks.get_mut(&id) {
            // Unread data at close would make the kernel send a reset instead of a FIN.
            if let Err(e) = t.discard_unconsumed() {
                tracing::debug!("host socket {id}: discarding acknowledged bytes: {e}");
            }
        }
        let fd = match self.socks.get(&id) {
            Some(Sock::Udp(s)) => s.as_raw_fd(),
            Some(Sock::Tcp(t)) => t.stream.as_raw_fd(),
            Some(Sock::Icmp(icmp)) => icmp.fd(),
            None => return,
        };
        self.deregister_fd(fd, id);
        // A connect reported at once but not handed out yet is no one's news now.
        self.immediate.retain(|e| *e != SockEvent::Connected(id));
        // Dropping the socket closes its fd.
        self.socks.remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::TcpListener;
    use std::time::Duration;

    /// Where a test host's readiness comes from: a mio poll, or the host's own ring.
    enum Waiter {
        Epoll(mio::Poll),
        Uring,
    }

    fn new_host(uring: bool) -> (SockDriver, Waiter) {
        if uring {
            let ring = Ring::for_waiting_thread(None).unwrap();
            (SockDriver::with_uring(ring), Waiter::Uring)
        } else {
            let poll = mio::Poll::new().unwrap();
            let host = SockDriver::new(poll.registry().try_clone().unwrap());
            (host, Waiter::Epoll(poll))
        }
    }

    /// A host with one TCP socket connected to a listener on loopback, and the accepted peer.
    fn connected(uring: bool) -> (SockDriver, Waiter, SockId, std::net::TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let SocketAddr::V4(addr) = listener.local_addr().unwrap() else {
            panic!()
        };
        let (mut host, mut poll) = new_host(uring);
        let id = host.tcp_connect(std::net::SocketAddr::from(addr)).unwrap();
        // With io_uring the connect starts when the batch is submitted.
        host.submit();
        let (peer, _) = listener.accept().unwrap();
        wait_for(&mut host, &mut poll, |e| *e == SockEvent::Connected(id));
        (host, poll, id, peer)
    }

    fn wait_for(
        host: &mut SockDriver,
        waiter: &mut Waiter,
        want: impl Fn(&SockEvent) -> bool,
    ) -> Vec<SockEvent> {
        let mut events = mio::Events::with_capacity(64);
        let mut got = Vec::new();
        host.immediate_events(&mut got);
        if got.iter().any(&want) {
            return got;
        }
        for _ in 0..100 {
            match waiter {
                Waiter::Epoll(poll) => {
                    poll.poll(&mut events, Some(Duration::from_millis(50)))
                        .unwrap();
                    for e in events.iter() {
                        host.events(e, &mut got);
                    }
                }
                Waiter::Uring => {
                    let spin = std::time::Instant::now();
                    host.wait(Some(Duration::from_millis(50)), spin).unwrap();
                    host.ring_events(&mut got);
                }
            }
            if got.iter().any(&want) {
                return got;
            }
        }
        panic!("event did not come: {got:?}");
    }

    /// Runs `test` on the epoll backend, and on io_uring where the kernel has it.
    fn on_each_backend(test: fn(bool)) {
        test(false);
        if crate::sock::uring::probe().is_ok() {
            test(true);
        }
    }

    #[test]
    fn tcp_connect_peek_consume_shutdown() {
        on_each_backend(tcp_connect_peek_consume_shutdown_with);
    }

    fn tcp_connect_peek_consume_shutdown_with(uring: bool) {
        let (mut host, mut poll, id, mut peer) = connected(uring);
        peer.write_all(b"hello world").unwrap();
        wait_for(&mut host, &mut poll, |e| *e == SockEvent::Readable(id));
        let mut buf = [0u8; 5];
        assert_eq!(host.tcp_peek(id, 6, &mut buf).unwrap(), 5);
        assert_eq!(&buf, b"world");
        assert_eq!(host.tcp_peek(id, 0, &mut buf).unwrap(), 5);
        assert_eq!(&buf, b"hello");
        host.tcp_consume(id, 6).unwrap();
        assert_eq!(host.tcp_peek(id, 0, &mut buf).unwrap(), 5);
        assert_eq!(&buf, b"world");
        assert_eq!(host.tcp_send(id, b"ping").unwrap(), 4);
        host.tcp_shutdown_write(id).unwrap();
        let mut got = Vec::new();
        peer.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"ping");
        drop(peer);
        host.tcp_consume(id, 5).unwrap();
        wait_for(&mut host, &mut poll, |e| *e == SockEvent::Readable(id));
        assert_eq!(host.tcp_peek(id, 0, &mut buf).unwrap(), 0);
        assert!(host.tcp_peer_closed(id));
        host.close(id);
        assert!(host.is_empty());
    }

    #[test]
    fn a_second_connection_takes_a_spare_socket_made_after_the_first() {
        on_each_backend(a_second_connection_takes_a_spare_with);
    }

    fn a_second_connection_takes_a_spare_with(uring: bool) {
        let (mut host, mut poll, first, _peer) = connected(uring);
        // Made after the batch of the first connect, for IPv4 only.
        assert_eq!(host.spare_tcp[0].ready.len(), SPARE_TCP);
        assert!(host.spare_tcp[1].ready.is_empty());
        let spare_fds: Vec<RawFd> = host.spare_tcp[0]
            .ready
            .iter()
            .map(|(s, _)| s.as_raw_fd())
            .collect();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let id = host.tcp_connect(listener.local_addr().unwrap()).unwrap();
        assert_ne!(id, first);
        let Some(Sock::Tcp(t)) = host.socks.get(&id) else {
            panic!("no TCP socket {id}")
        };
        assert!(spare_fds.contains(&t.stream.as_raw_fd()));
        assert_eq!(host.spare_tcp[0].ready.len(), SPARE_TCP - 1);
        host.submit();
        assert_eq!(host.spare_tcp[0].ready.len(), SPARE_TCP);
        let (mut peer, _) = listener.accept().unwrap();
        wait_for(&mut host, &mut poll, |e| *e == SockEvent::Connected(id));
        // The spare came with its options: no Nagle, and peeking at an offset.
        let Some(Sock::Tcp(t)) = host.socks.get(&id) else {
            panic!("no TCP socket {id}")
        };
        assert!(t.stream.nodelay().unwrap());
        peer.write_all(b"spare socket").unwrap();
        wait_for(&mut host, &mut poll, |e| *e == SockEvent::Readable(id));
        let mut buf = [0u8; 6];
        assert_eq!(host.tcp_peek(id, 6, &mut buf).unwrap(), 6);
        assert_eq!(&buf, b"socket");
    }

    /// Bytes waiting in the kernel socket of `id`.
    fn in_socket(host: &SockDriver, id: SockId) -> usize {
        let Some(Sock::Tcp(t)) = host.socks.get(&id) else {
            panic!("no TCP socket {id}")
        };
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one c_int, which `n` is.
        assert_eq!(
            unsafe { libc::ioctl(t.stream.as_raw_fd(), libc::FIONREAD, &mut n) },
            0
        );
        n as usize
    }

    #[test]
    fn consumes_wait_for_the_batch_end_and_peeks_skip_them() {
        let (mut host, mut poll, id, mut peer) = connected(false);
        peer.write_all(b"0123456789abcdef").unwrap();
        wait_for(&mut host, &mut poll, |e| *e == SockEvent::Readable(id));
        let mut buf = [0u8; 4];
        host.tcp_consume(id, 2).unwrap();
        host.tcp_consume(id, 4).unwrap();
        // Nothing discarded yet, but the core's view has moved on by 6.
        assert_eq!(in_socket(&host, id), 16);
        assert_eq!(host.tcp_peek(id, 0, &mut buf).unwrap(), 4);
        assert_eq!(&buf, b"6789");
        assert_eq!(host.tcp_peek(id, 6, &mut buf).unwrap(), 4);
        assert_eq!(&buf, b"cdef");
        host.submit();
        assert_eq!(in_socket(&host, id), 10);
        assert_eq!(host.tcp_peek(id, 2, &mut buf).unwrap(), 4);
        assert_eq!(&buf, b"89ab");
        host.tcp_consume(id, 10).unwrap();
        assert_eq!(host.tcp_peek(id, 0, &mut buf).unwrap(), 0);
        // Closing discards what is left first: the peer sees a FIN, not a reset.
        host.close(id);
        let mut rest = Vec::new();
        peer.read_to_end(&mut rest).expect("a FIN, not a reset");
        assert!(rest.is_empty());
    }

    #[test]
    fn close_after_consuming_everything_is_a_fin_not_a_reset() {
        let (mut host, mut poll, id, mut peer) = connected(false);
        peer.write_all(b"abc").unwrap();
        wait_for(&mut host, &mut poll, |e| *e == SockEvent::Readable(id));
        let mut buf = [0u8; 8];
        assert_eq!(host.tcp_peek(id, 0, &mut buf).unwrap(), 3);
        host.tcp_consume(id, 3).unwrap();
        assert_eq!(host.tcp_peek(id, 0, &mut buf).unwrap(), 0);
        host.close(id);
        let mut rest = Vec::new();
        peer.read_to_end(&mut rest).expect("a FIN, not a reset");
        assert!(rest.is_empty());
    }

    /// A connect to this host is over before the call returns: the driver says so at once,
    /// with nothing to wait for, and the socket is then watched like any connected one.
    #[test]
    fn a_near_connect_is_reported_when_the_call_returns() {
        for uring in [false, true] {
            if uring && crate::sock::uring::probe().is_err() {
                continue;
            }
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let (mut host, mut poll) = new_host(uring);
            let id = host.tcp_connect(listener.local_addr().unwrap()).unwrap();
            let mut now = Vec::new();
            host.immediate_events(&mut now);
            assert_eq!(now, vec![SockEvent::Connected(id)], "uring: {uring}");
            host.immediate_events(&mut now);
            assert_eq!(now.len(), 1, "handed out once");
            let (mut peer, _) = listener.accept().unwrap();
            peer.write_all(b"x").unwrap();
            let got = wait_for(&mut host, &mut poll, |e| *e == SockEvent::Readable(id));
            assert!(
                !got.contains(&SockEvent::Connected(id)),
                "connected twice: {got:?}"
            );
            // Closed before its report was handed out: the report goes with it.
            let gone = host.tcp_connect(listener.local_addr().unwrap()).unwrap();
            host.close(gone);
            host.immediate_events(&mut now);
            assert!(!now.contains(&SockEvent::Connected(gone)), "uring: {uring}");
        }
    }

    #[test]
    fn tcp_connect_refused_is_reported() {
        on_each_backend(tcp_connect_refused_is_reported_with);
    }

    fn tcp_connect_refused_is_reported_with(uring: bool) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let SocketAddr::V4(addr) = listener.local_addr().unwrap() else {
            panic!()
        };
        drop(listener);
        let (mut host, mut poll) = new_host(uring);
        let id = host.tcp_connect(std::net::SocketAddr::from(addr)).unwrap();
        let got = wait_for(&mut host, &mut poll, |e| {
            matches!(e, SockEvent::ConnectFailed(..))
        });
        assert!(got.contains(&SockEvent::ConnectFailed(
            id,
            io::ErrorKind::ConnectionRefused
        )));
    }

    #[test]
    fn echo_to_loopback_of_either_family_is_answered() {
        for (v6, dst) in [(false, "127.0.0.1"), (true, "::1")] {
            let (mut host, _poll) = new_host(false);
            let Ok(id) = host.icmp_open(v6) else {
                eprintln!("skipped: no ICMP socket of this kind here");
                continue;
            };
            let dst: IpAddr = dst.parse().unwrap();
            let request = if v6 { 128 } else { 8 };
            let mut msg = [request, 0, 0, 0, 0x12, 0x34, 0, 7, b'h', b'i'];
            if !v6 {
                let sum = !hubnat_core::wire::ones_sum(&msg);
                msg[2..4].copy_from_slice(&sum.to_be_bytes());
            }
            host.icmp_send(id, dst, &msg).unwrap();
            let mut buf = [0u8; 64];
            let mut reply = None;
            // The socket may see other ICMP (a raw ICMPv6 socket sees the request itself on
            // the loopback): read until the reply, a second at most.
            for _ in 0..100 {
                match host.icmp_recv(id, &mut buf) {
                    Ok(d) => {
                        reply = Some(d);
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            let d = reply.expect("an echo reply");
            assert_eq!(d.from.ip(), dst);
            assert_eq!(buf[0], if v6 { 129 } else { 0 }, "{:?}", &buf[..d.len]);
            assert_eq!(&buf[6..d.len], &[0, 7, b'h', b'i']);
        }
    }

    #[test]
    fn udp_roundtrip_and_port_unreachable() {
        on_each_backend(udp_roundtrip_and_port_unreachable_with);
    }

    fn udp_roundtrip_and_port_unreachable_with(uring: bool) {
        let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let SocketAddr::V4(addr) = server.local_addr().unwrap() else {
            panic!()
        };
        let (mut host, mut poll) = new_host(uring);
        let id = host.udp_open(std::net::SocketAddr::from(addr)).unwrap();
        host.udp_send(id, b"abc").unwrap();
        let mut buf = [0u8; 16];
        let (n, from) = server.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"abc");
        server.send_to(b"xyz", from).unwrap();
        wait_for(&mut host, &mut poll, |e| *e == SockEvent::Readable(id));
        assert_eq!(host.udp_recv(id, &mut buf).unwrap(), 3);
        drop(server);
        host.udp_send(id, b"again").unwrap();
        wait_for(&mut host, &mut poll, |e| *e == SockEvent::Readable(id));
        let e = host.udp_recv(id, &mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
        // The details wait in the error queue, once.
        let err = host.recv_error(id).unwrap();
        assert_eq!(
            (err.from, err.icmp_type, err.code),
            (std::net::IpAddr::V4(*addr.ip()), 3, 3)
        );
        let e = host.recv_error(id).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        // The TTL can be set and put back to the default.
        host.set_ttl(id, Some(3)).unwrap();
        host.set_ttl(id, None).unwrap();
        // A larger receive buffer: what was asked for where the process may (the kernel
        // doubles it), else at least the host's ceiling.
        let before = rcvbuf(&host, id);
        host.udp_rcvbuf(id, 4 << 20);
        let after = rcvbuf(&host, id);
        assert!(after >= before, "{before} -> {after}");
        let ceiling: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .map_or(0, |s| s.trim().parse().unwrap_or(0));
        assert!(after >= (8 << 20).min(2 * ceiling), "{after}");
    }

    /// A run of datagrams sent as one (UDP_SEGMENT) leaves as datagrams, and comes back to a
    /// socket with runs as one receive that says their size (UDP_GRO), on both backends.
    #[test]
    fn runs_of_datagrams_go_out_cut_and_come_back_whole() {
        for uring in [false, true] {
            if uring && crate::sock::uring::probe().is_err() {
                continue;
            }
            let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            server
                .set_read_timeout(Some(std::time::Duration::from_secs(2)))
                .unwrap();
            let (mut host, mut poll) = new_host(uring);
            let id = host.udp_open_runs(server.local_addr().unwrap()).unwrap();
            let run: Vec<u8> = (0..1300u32).map(|i| i as u8).collect();
            assert_eq!(host.udp_send_segments(id, &run, 500).unwrap(), 1300);
            let mut buf = [0u8; 2048];
            let mut got = Vec::new();
            let mut from = None;
            for _ in 0..3 {
                let (n, f) = server.recv_from(&mut buf).unwrap();
                got.push(buf[..n].to_vec());
                from = Some(f);
            }
            let sizes: Vec<usize> = got.iter().map(Vec::len).collect();
            assert_eq!(sizes, [500, 500, 300], "uring {uring}");
            assert_eq!(got.concat(), run);
            // The server sends a run back as one; over loopback it stays one to our socket.
            let fd = server.as_raw_fd();
            let back: Vec<u8> = (0..1000u32).map(|i| (i * 3) as u8).collect();
            setsockopt_int(fd, libc::SOL_UDP, libc::UDP_SEGMENT, 400).unwrap();
            server.send_to(&back, from.unwrap()).unwrap();
            wait_for(&mut host, &mut poll, |e| *e == SockEvent::Readable(id));
            let mut into = vec![0u8; 65536];
            let (n, segment) = host.udp_recv_segments(id, &mut into).unwrap();
            assert_eq!((n, segment), (1000, 400), "uring {uring}");
            assert_eq!(&into[..n], &back[..]);
        }
    }

    fn rcvbuf(host: &SockDriver, id: SockId) -> usize {
        let Some(Sock::Udp(s)) = host.socks.get(&id) else {
            panic!("not a UDP socket")
        };
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `v` and `len` are live and sized for an int option.
        let r = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(r, 0);
        v as usize
    }
}
