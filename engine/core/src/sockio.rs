//! The sock side of the core: the sockets through which the NAT carries guests' traffic.
//!
//! The core calls these synchronously because TCP needs their answers at once: only what a socket
//! accepted may be acknowledged to the guest, and data toward the guest is peeked from the socket
//! (the socket buffer is the retransmission buffer) and discarded only once acknowledged. The
//! runtime implements the trait with real sockets (`sock::`), tests and the replay with a
//! simulated sock side (`sim::`). Readiness comes back to the core as `SockEvent`s.

use std::io;
use std::net::{IpAddr, SocketAddr};

/// A sock-side socket, as the driver numbers it.
pub type SockId = u32;

/// What the driver tells the core about a socket.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum SockEvent {
    /// Data (or EOF) can be read.
    Readable(SockId),
    /// The socket can take more data.
    Writable(SockId),
    /// A `tcp_connect` finished successfully.
    Connected(SockId),
    /// A `tcp_connect` failed (refused, timed out, ...).
    ConnectFailed(SockId, io::ErrorKind),
    /// A `tcp_connect` failed because the network has no way to the destination.
    ConnectUnreachable(SockId, Unreachable),
    /// The peer reset the connection or the socket failed.
    Failed(SockId, io::ErrorKind),
}

/// A datagram received on a UDP or ICMP socket.
#[derive(Clone, Copy, Debug)]
pub struct Datagram {
    /// Its length in bytes (as much of it as the buffer took).
    pub len: usize,
    /// Where it came from.
    pub from: SocketAddr,
}

/// Why the network cannot take something to its destination, in the terms of ICMP's
/// destination unreachable (what the guest is told). The driver attaches it to the `io::Error`
/// of a send or connect the host's own routing refused (`unreachable_of` finds it), or reports
/// it with `SockEvent::ConnectUnreachable`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Unreachable {
    /// No route to the destination's network.
    Net,
    /// The destination's network is there but the host does not answer.
    Host,
    /// A firewall refused it.
    Prohibited,
}

impl Unreachable {
    /// Its code in an ICMP destination unreachable (RFC 792, RFC 1812).
    pub fn icmp_code(self) -> u8 {
        match self {
            Unreachable::Net => 0,
            Unreachable::Host => 1,
            Unreachable::Prohibited => 13,
        }
    }
}

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Unreachable::Net => "network unreachable",
            Unreachable::Host => "host unreachable",
            Unreachable::Prohibited => "administratively prohibited",
        })
    }
}

impl std::error::Error for Unreachable {}

/// The `Unreachable` a driver attached to `e`, if any.
pub fn unreachable_of(e: &io::Error) -> Option<Unreachable> {
    e.get_ref()?.downcast_ref::<Unreachable>().copied()
}

/// An ICMP error the host's stack received about a datagram a UDP or ICMP socket sent
/// (`IP_RECVERR`), read from the socket's error queue.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct IcmpError {
    /// Who sent it: a router on the way, or the destination itself; unspecified (0.0.0.0)
    /// when the host's own stack did, for a next hop it could not reach. The socket's family.
    pub from: IpAddr,
    /// ICMP type (3 destination unreachable, 11 time exceeded, 12 parameter problem), or for
    /// an IPv6 socket the ICMPv6 type (1 destination unreachable, 2 packet too big, 3 time
    /// exceeded, 4 parameter problem).
    pub icmp_type: u8,
    /// ICMP code.
    pub code: u8,
    /// What the type carries besides: the next-hop MTU of "fragmentation needed", the pointer
    /// of a parameter problem.
    pub info: u32,
    /// For an ICMP socket, the start of the echo request the error quoted (type, code,
    /// checksum, ident, sequence number), as the host sent it; `quoted_len` bytes of it.
    pub quoted: [u8; 8],
    /// How many bytes of `quoted` are there (0 for UDP).
    pub quoted_len: u8,
}

/// The sock side as the core sees it: the host's sockets, opened, used and closed on its
/// behalf. The runtime implements it with real sockets, `sim::SimSockets` in memory.
pub trait SockIo {
    /// Opens a UDP socket connected to `dst` (bound to an ephemeral port) for one NAT session;
    /// being connected, it receives only `dst`'s answers and reports its ICMP errors.
    fn udp_open(&mut self, dst: SocketAddr) -> io::Result<SockId>;
    /// Sends one datagram on the UDP socket `id`; returns the bytes sent.
    fn udp_send(&mut self, id: SockId, payload: &[u8]) -> io::Result<usize>;
    /// Sends `payload` on the UDP socket `id` as datagrams of `segment` bytes (the last may be
    /// shorter), in one call where the host can (UDP_SEGMENT: the host's stack cuts it);
    /// returns the bytes sent. This default sends them one by one.
    fn udp_send_segments(
        &mut self,
        id: SockId,
        payload: &[u8],
        segment: usize,
    ) -> io::Result<usize> {
        send_each(payload, segment, |d| self.udp_send(id, d))
    }
    /// `udp_open` for a NAT session's socket, whose receives may hand over a run of datagrams
    /// at once (`udp_recv_segments`) where the host has UDP_GRO. This default: `udp_open`.
    fn udp_open_runs(&mut self, dst: SocketAddr) -> io::Result<SockId> {
        self.udp_open(dst)
    }
    /// `udp_recv` that may receive a run of datagrams of one size (the last may be shorter)
    /// that the host's stack handed over as one, on a socket from `udp_open_runs`: returns the
    /// bytes and the size of each datagram (0: one datagram). This default: one datagram.
    fn udp_recv_segments(&mut self, id: SockId, buf: &mut [u8]) -> io::Result<(usize, usize)> {
        self.udp_recv(id, buf).map(|n| (n, 0))
    }
    /// One datagram, truncated to `buf`. `Err(WouldBlock)` when nothing is waiting; another
    /// error (`ConnectionRefused` for a port unreachable) when the network answered with an
    /// ICMP error, whose details `recv_error` then gives.
    fn udp_recv(&mut self, id: SockId, buf: &mut [u8]) -> io::Result<usize>;

    /// Starts a non-blocking connect; its outcome arrives as `Connected` or `ConnectFailed`.
    fn tcp_connect(&mut self, dst: SocketAddr) -> io::Result<SockId>;
    /// Writes what the socket takes now; `Ok(0)` for a full socket buffer (then `Writable` later).
    fn tcp_send(&mut self, id: SockId, data: &[u8]) -> io::Result<usize>;
    /// Copies received bytes starting `offset` bytes past the front of the receive queue without
    /// removing them. `Ok(0)` with `len > 0` and no EOF means nothing more is there yet.
    fn tcp_peek(&mut self, id: SockId, offset: usize, buf: &mut [u8]) -> io::Result<usize>;
    /// Removes `n` bytes from the front of the receive queue (the guest acknowledged them).
    fn tcp_consume(&mut self, id: SockId, n: usize) -> io::Result<()>;
    /// Whether the peer has closed its sending side and everything before it has been peeked.
    fn tcp_peer_closed(&mut self, id: SockId) -> bool;
    /// Sends FIN to the destination (the guest closed its writing side).
    fn tcp_shutdown_write(&mut self, id: SockId) -> io::Result<()>;
    /// Resets the connection to the destination (the guest reset it).
    fn tcp_abort(&mut self, id: SockId);

    /// Opens an ICMP echo socket (datagram where unprivileged, raw when privileged), ICMPv6
    /// with `v6`; `Err(Unsupported)`-like errors make the core fall back to dummy replies.
    fn icmp_open(&mut self, v6: bool) -> io::Result<SockId>;
    /// Sends an ICMP echo request (header and data) to `dst`, of the socket's family.
    fn icmp_send(&mut self, id: SockId, dst: IpAddr, message: &[u8]) -> io::Result<()>;
    /// Receives an ICMP message (from its ICMP header on).
    fn icmp_recv(&mut self, id: SockId, buf: &mut [u8]) -> io::Result<Datagram>;

    /// Asks for a receive buffer of `bytes` on UDP socket `id`, as large as the host allows:
    /// a socket that many guests' answers arrive on at once (the DNS relay's) must hold a burst
    /// of them while the thread is busy elsewhere.
    fn udp_rcvbuf(&mut self, _id: SockId, _bytes: usize) {}

    /// Sets the IP TTL of what UDP or ICMP socket `id` sends from now on (`None`: the host's
    /// default).
    fn set_ttl(&mut self, id: SockId, ttl: Option<u8>) -> io::Result<()>;
    /// The next ICMP error queued on UDP or ICMP socket `id`; `Err(WouldBlock)` when there is
    /// none. A socket error `udp_recv` or `icmp_recv` returned says that some may be waiting.
    fn recv_error(&mut self, id: SockId) -> io::Result<IcmpError>;

    /// Closes any socket and forgets its id.
    fn close(&mut self, id: SockId);
}

/// Sends `payload` as datagrams of `segment` bytes (the last may be shorter), one `send`
/// each: what `SockIo::udp_send_segments` does where the host cannot cut them. The bytes sent.
pub fn send_each(
    payload: &[u8],
    segment: usize,
    mut send: impl FnMut(&[u8]) -> io::Result<usize>,
) -> io::Result<usize> {
    let mut sent = 0;
    for datagram in payload.chunks(segment.max(1)) {
        sent += send(datagram)?;
    }
    Ok(sent)
}

/// Datagrams read from one socket per readiness event (or per `handle_timeout` round), so that
/// one busy socket cannot starve the rest.
pub(crate) const READ_BUDGET: usize = 64;
