//! The sock side of the core: the sockets through which the NAT carries guests' traffic.
//!
//! The core calls these synchronously because TCP needs their answers at once: only what a socket
//! accepted may be acknowledged to the guest, and data toward the guest is peeked from the socket
//! (the socket buffer is the retransmission buffer) and discarded only once acknowledged. The
//! runtime implements the trait with real sockets (`sock::`), tests and the replay with a
//! simulated sock side (`sim::`). Readiness comes back to the core as `SockEvent`s.

use std::io;
use std::net::SocketAddrV4;

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
    /// A `tcp_connect` failed (refused, unreachable, timed out).
    ConnectFailed(SockId, io::ErrorKind),
    /// The peer reset the connection or the socket failed.
    Failed(SockId, io::ErrorKind),
}

/// A datagram received on a UDP or ICMP socket.
#[derive(Clone, Copy, Debug)]
pub struct Datagram {
    /// Its length in bytes (as much of it as the buffer took).
    pub len: usize,
    /// Where it came from.
    pub from: SocketAddrV4,
}

/// The sock side as the core sees it: the host's sockets, opened, used and closed on its
/// behalf. The runtime implements it with real sockets, `sim::SimSockets` in memory.
pub trait SockIo {
    /// Opens a UDP socket connected to `dst` (bound to an ephemeral port) for one NAT session;
    /// being connected, it receives only `dst`'s answers and reports its ICMP errors.
    fn udp_open(&mut self, dst: SocketAddrV4) -> io::Result<SockId>;
    /// Sends one datagram on the UDP socket `id`; returns the bytes sent.
    fn udp_send(&mut self, id: SockId, payload: &[u8]) -> io::Result<usize>;
    /// One datagram, truncated to `buf`. `Err(WouldBlock)` when nothing is waiting;
    /// `Err(ConnectionRefused)` when the destination answered with ICMP port unreachable.
    fn udp_recv(&mut self, id: SockId, buf: &mut [u8]) -> io::Result<usize>;

    /// Starts a non-blocking connect; its outcome arrives as `Connected` or `ConnectFailed`.
    fn tcp_connect(&mut self, dst: SocketAddrV4) -> io::Result<SockId>;
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

    /// Opens an ICMP echo socket (datagram where unprivileged, raw when privileged);
    /// `Err(Unsupported)`-like errors make the core fall back to dummy replies.
    fn icmp_open(&mut self) -> io::Result<SockId>;
    /// Sends an ICMP echo request (header and data) to `dst`.
    fn icmp_send(&mut self, id: SockId, dst: std::net::Ipv4Addr, message: &[u8]) -> io::Result<()>;
    /// Receives an ICMP message (from its ICMP header on).
    fn icmp_recv(&mut self, id: SockId, buf: &mut [u8]) -> io::Result<Datagram>;

    /// Closes any socket and forgets its id.
    fn close(&mut self, id: SockId);
}

/// Datagrams read from one socket per readiness event (or per `handle_timeout` round), so that
/// one busy socket cannot starve the rest.
pub(crate) const READ_BUDGET: usize = 64;
