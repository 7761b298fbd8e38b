//! A simulated sock side: in-memory sockets behind `SockIo`, for the core's tests and the
//! deterministic replay. Nothing here touches the OS; every outcome is scripted by the caller.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};

use crate::sockio::{Datagram, IcmpError, SockEvent, SockId, SockIo, Unreachable};

/// How a simulated TCP connect ends.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ConnectOutcome {
    /// Connects.
    Accept,
    /// Is refused (connection refused).
    Refuse,
    /// Never answers (the core's connect timeout decides).
    Silent,
    /// The network says the destination cannot be reached.
    Unreachable(Unreachable),
}

/// A simulated UDP socket.
#[derive(Debug)]
pub struct SimUdp {
    /// The destination it is connected to.
    pub dst: SocketAddr,
    /// Datagrams the core sent, in order.
    pub sent: Vec<Vec<u8>>,
    /// Receives hand over runs of datagrams of one size at once, as a host with UDP_GRO does
    /// (for a socket from `udp_open_runs`).
    pub gro: bool,
    /// The sends that carried them: datagrams per call (more than one: `udp_send_segments`).
    pub sends: Vec<usize>,
    /// Datagrams (or an ICMP error's socket error, as `Err`) waiting to be received by the core.
    pub(crate) inbox: VecDeque<Result<Vec<u8>, io::ErrorKind>>,
    /// The socket's error queue.
    pub(crate) errors: VecDeque<IcmpError>,
    /// The TTL set with `set_ttl` (`None`: the default).
    pub ttl: Option<u8>,
    /// How many times `set_ttl` was called.
    pub ttl_sets: usize,
}

impl SimUdp {
    fn new(dst: SocketAddr) -> SimUdp {
        SimUdp {
            dst,
            sent: Vec::new(),
            gro: false,
            sends: Vec::new(),
            inbox: VecDeque::new(),
            errors: VecDeque::new(),
            ttl: None,
            ttl_sets: 0,
        }
    }
}

/// A simulated TCP socket.
#[derive(Debug)]
pub struct SimTcp {
    /// The destination it connects to.
    pub dst: SocketAddr,
    /// The connect succeeded.
    pub connected: bool,
    /// Everything the core wrote to the destination.
    pub written: Vec<u8>,
    /// How many `tcp_send` calls wrote something.
    pub(crate) writes: usize,
    /// How many more bytes the socket's send buffer takes before it reports full.
    pub(crate) send_space: usize,
    /// Bytes from the destination not yet consumed by the core (peek reads from here).
    pub recv: VecDeque<u8>,
    /// The destination has sent FIN.
    pub(crate) peer_fin: bool,
    /// The core sent FIN toward the destination.
    pub shut_write: bool,
    /// The core reset the connection.
    pub aborted: bool,
}

/// A simulated ICMP echo socket.
#[derive(Debug, Default)]
pub struct SimIcmp {
    /// Messages the core sent, with their destination, in order.
    pub sent: Vec<(IpAddr, Vec<u8>)>,
    /// Messages (or an ICMP error's socket error, as `Err`) waiting to be received by the core.
    pub(crate) inbox: VecDeque<Result<(IpAddr, Vec<u8>), io::ErrorKind>>,
    /// The socket's error queue.
    pub(crate) errors: VecDeque<IcmpError>,
    /// The TTL set with `set_ttl` (`None`: the default).
    pub ttl: Option<u8>,
    /// The TTL each message in `sent` left with.
    pub sent_ttls: Vec<Option<u8>>,
}

/// A simulated socket of any kind.
#[derive(Debug)]
pub enum SimSocket {
    /// A UDP socket.
    Udp(SimUdp),
    /// A TCP socket.
    Tcp(SimTcp),
    /// An ICMP echo socket.
    Icmp(SimIcmp),
}

/// The simulated sock side. Scripts decide how connects end and how much a socket takes; events the
/// real driver would raise are queued in `events` for the test (or replay) to feed to the core.
#[derive(Debug)]
pub struct SimSockets {
    /// The open sockets, by id.
    pub sockets: HashMap<SockId, SimSocket>,
    next_id: SockId,
    /// Per destination; destinations not listed get `default_connect`.
    pub connect_script: HashMap<SocketAddr, ConnectOutcome>,
    /// How connects to destinations not in `connect_script` end.
    pub default_connect: ConnectOutcome,
    /// Send-buffer size of each new TCP socket.
    pub tcp_send_buffer: usize,
    /// Whether ICMP sockets can be opened (the "real" ICMP mode).
    pub icmp_allowed: bool,
    /// Destinations the host has no route to: sends and connects to them fail at once.
    pub no_route: Vec<IpAddr>,
    /// Events a real driver would report; `drain_events` hands them over.
    pub events: VecDeque<SockEvent>,
    /// Ids that were closed, in order.
    pub closed: Vec<SockId>,
    /// TCP ids that were reset (`tcp_abort`), in order: the client of a forward sees a reset.
    pub aborted: Vec<SockId>,
    /// TCP peeks asked for, and how many found nothing (each a wasted syscall on a real host).
    pub(crate) peeks: u64,
    pub(crate) empty_peeks: u64,
}

impl Default for SimSockets {
    fn default() -> SimSockets {
        SimSockets {
            sockets: HashMap::new(),
            next_id: 1,
            connect_script: HashMap::new(),
            default_connect: ConnectOutcome::Accept,
            tcp_send_buffer: 1 << 20,
            icmp_allowed: true,
            no_route: Vec::new(),
            events: VecDeque::new(),
            peeks: 0,
            empty_peeks: 0,
            closed: Vec::new(),
            aborted: Vec::new(),
        }
    }
}

fn would_block() -> io::Error {
    io::Error::from(io::ErrorKind::WouldBlock)
}

fn no_route() -> io::Error {
    io::Error::other(Unreachable::Net)
}

/// The socket error an ICMP error leaves pending (what the core reads before the queue).
fn socket_error(err: &IcmpError) -> io::ErrorKind {
    if (err.icmp_type, err.code) == (3, 3) {
        io::ErrorKind::ConnectionRefused
    } else {
        io::ErrorKind::Other
    }
}

fn bad_id() -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, "no such simulated socket")
}

impl SimSockets {
    fn alloc(&mut self, s: SimSocket) -> SockId {
        let id = self.next_id;
        self.next_id += 1;
        self.sockets.insert(id, s);
        id
    }

    /// Takes the queued events, oldest first.
    pub fn drain_events(&mut self) -> Vec<SockEvent> {
        self.events.drain(..).collect()
    }

    /// The UDP socket `id`, if it is one.
    pub fn udp(&mut self, id: SockId) -> Option<&mut SimUdp> {
        match self.sockets.get_mut(&id) {
            Some(SimSocket::Udp(u)) => Some(u),
            _ => None,
        }
    }

    /// The TCP socket `id`, if it is one.
    pub fn tcp(&mut self, id: SockId) -> Option<&mut SimTcp> {
        match self.sockets.get_mut(&id) {
            Some(SimSocket::Tcp(t)) => Some(t),
            _ => None,
        }
    }

    pub(crate) fn icmp(&mut self, id: SockId) -> Option<&mut SimIcmp> {
        match self.sockets.get_mut(&id) {
            Some(SimSocket::Icmp(i)) => Some(i),
            _ => None,
        }
    }

    /// The ids of the open sockets of one kind, lowest first.
    pub fn ids(&self, kind: fn(&SimSocket) -> bool) -> Vec<SockId> {
        let mut v: Vec<SockId> = self
            .sockets
            .iter()
            .filter(|(_, s)| kind(s))
            .map(|(id, _)| *id)
            .collect();
        v.sort_unstable();
        v
    }

    /// A TCP connection accepted from `peer` (a forward's client), as the runtime adopts it
    /// into its socket driver before handing it to the core: connected, nothing received yet.
    /// It takes the next id, as `tcp_connect` would.
    pub fn adopt_tcp(&mut self, peer: SocketAddr) -> SockId {
        let send_space = self.tcp_send_buffer;
        self.alloc(SimSocket::Tcp(SimTcp {
            dst: peer,
            connected: true,
            written: Vec::new(),
            writes: 0,
            send_space,
            recv: VecDeque::new(),
            peer_fin: false,
            shut_write: false,
            aborted: false,
        }))
    }

    /// A UDP socket connected to `peer` (a forward's client), as the runtime makes one for a
    /// client's first datagram before handing it to the core.
    pub fn adopt_udp(&mut self, peer: SocketAddr) -> SockId {
        self.alloc(SimSocket::Udp(SimUdp::new(peer)))
    }

    /// A datagram arrives from the destination of UDP socket `id`.
    pub fn deliver_udp(&mut self, id: SockId, data: &[u8]) {
        if let Some(u) = self.udp(id) {
            u.inbox.push_back(Ok(data.to_vec()));
            self.events.push_back(SockEvent::Readable(id));
        }
    }

    /// The destination of UDP socket `id` answers with ICMP port unreachable.
    pub fn refuse_udp(&mut self, id: SockId) {
        if let Some(u) = self.udp(id) {
            let err = crate::nat::icmp_error::port_unreachable(u.dst.ip());
            self.icmp_error_udp(id, err);
        }
    }

    /// The host receives the ICMP error `err` about what UDP socket `id` sent.
    pub fn icmp_error_udp(&mut self, id: SockId, err: IcmpError) {
        if let Some(u) = self.udp(id) {
            u.inbox.push_back(Err(socket_error(&err)));
            u.errors.push_back(err);
            self.events.push_back(SockEvent::Readable(id));
        }
    }

    /// The host receives the ICMP error `err` about what ICMP socket `id` sent.
    pub fn icmp_error_icmp(&mut self, id: SockId, err: IcmpError) {
        if let Some(i) = self.icmp(id) {
            i.inbox.push_back(Err(socket_error(&err)));
            i.errors.push_back(err);
            self.events.push_back(SockEvent::Readable(id));
        }
    }

    /// The destination of TCP socket `id` sends `data`.
    pub fn deliver_tcp(&mut self, id: SockId, data: &[u8]) {
        if let Some(t) = self.tcp(id) {
            t.recv.extend(data);
            self.events.push_back(SockEvent::Readable(id));
        }
    }

    /// The destination of TCP socket `id` closes its side.
    pub fn tcp_fin(&mut self, id: SockId) {
        if let Some(t) = self.tcp(id) {
            t.peer_fin = true;
            self.events.push_back(SockEvent::Readable(id));
        }
    }

    /// Gives TCP socket `id` `n` more bytes of send space (the destination read them).
    pub fn tcp_drain(&mut self, id: SockId, n: usize) {
        if let Some(t) = self.tcp(id) {
            t.send_space += n;
            self.events.push_back(SockEvent::Writable(id));
        }
    }

    /// Queues an ICMP message from `from` for the ICMP socket `id` (and raises `Readable`).
    pub fn deliver_icmp(&mut self, id: SockId, from: IpAddr, message: &[u8]) {
        if let Some(i) = self.icmp(id) {
            i.inbox.push_back(Ok((from, message.to_vec())));
            self.events.push_back(SockEvent::Readable(id));
        }
    }
}

impl SockIo for SimSockets {
    fn udp_open(&mut self, dst: SocketAddr) -> io::Result<SockId> {
        // Connecting a UDP socket looks its route up.
        if self.no_route.contains(&dst.ip()) {
            return Err(no_route());
        }
        Ok(self.alloc(SimSocket::Udp(SimUdp::new(dst))))
    }

    fn udp_send(&mut self, id: SockId, payload: &[u8]) -> io::Result<usize> {
        self.udp_send_segments(id, payload, payload.len())
    }

    fn udp_send_segments(
        &mut self,
        id: SockId,
        payload: &[u8],
        segment: usize,
    ) -> io::Result<usize> {
        let unroutable = self.no_route.clone();
        let u = self.udp(id).ok_or_else(bad_id)?;
        if unroutable.contains(&u.dst.ip()) {
            return Err(no_route());
        }
        // A pending socket error fails the send (which sends nothing), as the kernel's does.
        if let Some(Err(kind)) = u.inbox.front() {
            let kind = *kind;
            u.inbox.pop_front();
            return Err(kind.into());
        }
        if payload.is_empty() {
            u.sent.push(Vec::new());
        } else {
            u.sent
                .extend(payload.chunks(segment.max(1)).map(<[u8]>::to_vec));
        }
        u.sends.push(payload.len().div_ceil(segment.max(1)).max(1));
        Ok(payload.len())
    }

    fn udp_recv_segments(&mut self, id: SockId, buf: &mut [u8]) -> io::Result<(usize, usize)> {
        let u = self.udp(id).ok_or_else(bad_id)?;
        if !u.gro {
            return self.udp_recv(id, buf).map(|n| (n, 0));
        }
        // As the host's GRO does: datagrams of one size that follow each other, the last
        // possibly shorter, at most 64 and as many as fit `buf`.
        let mut len = 0;
        let mut segment = 0;
        let mut count = 0;
        while let Some(Ok(d)) = u.inbox.front() {
            let fits = count == 0 || (d.len() <= segment && len % segment == 0);
            if !fits || count == 64 || len + d.len() > buf.len() || d.is_empty() {
                break;
            }
            if count == 0 {
                segment = d.len();
            }
            buf[len..len + d.len()].copy_from_slice(d);
            len += d.len();
            count += 1;
            u.inbox.pop_front();
        }
        match count {
            0 => self.udp_recv(id, buf).map(|n| (n, 0)),
            1 => Ok((len, 0)),
            _ => Ok((len, segment)),
        }
    }

    fn udp_recv(&mut self, id: SockId, buf: &mut [u8]) -> io::Result<usize> {
        let u = self.udp(id).ok_or_else(bad_id)?;
        let data = u.inbox.pop_front().ok_or_else(would_block)?;
        let data = data.map_err(io::Error::from)?;
        let len = data.len().min(buf.len());
        buf[..len].copy_from_slice(&data[..len]);
        Ok(len)
    }

    fn tcp_connect(&mut self, dst: SocketAddr) -> io::Result<SockId> {
        if self.no_route.contains(&dst.ip()) {
            return Err(no_route());
        }
        let outcome = *self
            .connect_script
            .get(&dst)
            .unwrap_or(&self.default_connect);
        let id = self.alloc(SimSocket::Tcp(SimTcp {
            dst,
            connected: false,
            written: Vec::new(),
            writes: 0,
            send_space: self.tcp_send_buffer,
            recv: VecDeque::new(),
            peer_fin: false,
            shut_write: false,
            aborted: false,
        }));
        match outcome {
            ConnectOutcome::Accept => {
                if let Some(t) = self.tcp(id) {
                    t.connected = true;
                }
                self.events.push_back(SockEvent::Connected(id));
            }
            ConnectOutcome::Refuse => self.events.push_back(SockEvent::ConnectFailed(
                id,
                io::ErrorKind::ConnectionRefused,
            )),
            ConnectOutcome::Unreachable(why) => self
                .events
                .push_back(SockEvent::ConnectUnreachable(id, why)),
            ConnectOutcome::Silent => {}
        }
        Ok(id)
    }

    fn tcp_send(&mut self, id: SockId, data: &[u8]) -> io::Result<usize> {
        let t = self.tcp(id).ok_or_else(bad_id)?;
        if t.shut_write || t.aborted {
            return Err(io::Error::from(io::ErrorKind::BrokenPipe));
        }
        let n = data.len().min(t.send_space);
        t.written.extend_from_slice(&data[..n]);
        t.writes += (n > 0) as usize;
        t.send_space -= n;
        Ok(n)
    }

    fn tcp_peek(&mut self, id: SockId, offset: usize, buf: &mut [u8]) -> io::Result<usize> {
        self.peeks += 1;
        let t = self.sockets.get_mut(&id).and_then(|s| match s {
            SimSocket::Tcp(t) => Some(t),
            _ => None,
        });
        let t = t.ok_or_else(bad_id)?;
        let avail = t.recv.len().saturating_sub(offset);
        let n = avail.min(buf.len());
        if n == 0 && !buf.is_empty() {
            self.empty_peeks += 1;
        }
        // Slice copies (not a byte iterator): the replay benchmark measures the core, not this.
        let (a, b) = t.recv.as_slices();
        let from_a = a.len().saturating_sub(offset).min(n);
        if from_a > 0 {
            buf[..from_a].copy_from_slice(&a[offset..offset + from_a]);
        }
        let rest = n - from_a;
        if rest > 0 {
            let b_off = offset.saturating_sub(a.len());
            buf[from_a..n].copy_from_slice(&b[b_off..b_off + rest]);
        }
        Ok(n)
    }

    fn tcp_consume(&mut self, id: SockId, n: usize) -> io::Result<()> {
        let t = self.tcp(id).ok_or_else(bad_id)?;
        if n > t.recv.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "consume past what was received",
            ));
        }
        t.recv.drain(..n);
        Ok(())
    }

    fn tcp_peer_closed(&mut self, id: SockId) -> bool {
        self.tcp(id).is_some_and(|t| t.peer_fin)
    }

    fn tcp_shutdown_write(&mut self, id: SockId) -> io::Result<()> {
        let t = self.tcp(id).ok_or_else(bad_id)?;
        t.shut_write = true;
        Ok(())
    }

    fn tcp_abort(&mut self, id: SockId) {
        if let Some(t) = self.tcp(id) {
            t.aborted = true;
            self.aborted.push(id);
        }
    }

    fn icmp_open(&mut self, _v6: bool) -> io::Result<SockId> {
        if !self.icmp_allowed {
            return Err(io::Error::from(io::ErrorKind::PermissionDenied));
        }
        Ok(self.alloc(SimSocket::Icmp(SimIcmp::default())))
    }

    fn icmp_send(&mut self, id: SockId, dst: IpAddr, message: &[u8]) -> io::Result<()> {
        if self.no_route.contains(&dst) {
            return Err(no_route());
        }
        let i = self.icmp(id).ok_or_else(bad_id)?;
        if let Some(Err(kind)) = i.inbox.front() {
            let kind = *kind;
            i.inbox.pop_front();
            return Err(kind.into());
        }
        i.sent.push((dst, message.to_vec()));
        i.sent_ttls.push(i.ttl);
        Ok(())
    }

    fn icmp_recv(&mut self, id: SockId, buf: &mut [u8]) -> io::Result<Datagram> {
        let i = self.icmp(id).ok_or_else(bad_id)?;
        let (from, data) = i.inbox.pop_front().ok_or_else(would_block)??;
        let len = data.len().min(buf.len());
        buf[..len].copy_from_slice(&data[..len]);
        Ok(Datagram {
            len,
            from: SocketAddr::new(from, 0),
        })
    }

    fn set_ttl(&mut self, id: SockId, ttl: Option<u8>) -> io::Result<()> {
        match self.sockets.get_mut(&id) {
            Some(SimSocket::Udp(u)) => {
                u.ttl = ttl;
                u.ttl_sets += 1;
            }
            Some(SimSocket::Icmp(i)) => i.ttl = ttl,
            _ => return Err(bad_id()),
        }
        Ok(())
    }

    fn recv_error(&mut self, id: SockId) -> io::Result<IcmpError> {
        let errors = match self.sockets.get_mut(&id) {
            Some(SimSocket::Udp(u)) => &mut u.errors,
            Some(SimSocket::Icmp(i)) => &mut i.errors,
            _ => return Err(bad_id()),
        };
        errors.pop_front().ok_or_else(would_block)
    }

    fn close(&mut self, id: SockId) {
        if self.sockets.remove(&id).is_some() {
            self.closed.push(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, SocketAddrV4};

    #[test]
    fn tcp_peek_consume_and_backpressure() {
        let mut h = SimSockets {
            tcp_send_buffer: 4,
            ..SimSockets::default()
        };
        let dst = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 80);
        let id = h.tcp_connect(std::net::SocketAddr::from(dst)).unwrap();
        assert_eq!(h.drain_events(), vec![SockEvent::Connected(id)]);
        assert_eq!(h.tcp_send(id, b"abcdef").unwrap(), 4);
        assert_eq!(h.tcp_send(id, b"ef").unwrap(), 0);
        h.tcp_drain(id, 2);
        assert_eq!(h.tcp_send(id, b"ef").unwrap(), 2);
        h.deliver_tcp(id, b"hello");
        let mut buf = [0u8; 8];
        assert_eq!(h.tcp_peek(id, 2, &mut buf).unwrap(), 3);
        assert_eq!(&buf[..3], b"llo");
        h.tcp_consume(id, 2).unwrap();
        assert_eq!(h.tcp_peek(id, 0, &mut buf).unwrap(), 3);
        assert!(h.tcp_consume(id, 9).is_err());
    }

    #[test]
    fn tcp_peek_across_the_queue_wrap() {
        let mut h = SimSockets::default();
        let id = h
            .tcp_connect(std::net::SocketAddr::from(SocketAddrV4::new(
                Ipv4Addr::LOCALHOST,
                9,
            )))
            .unwrap();
        let all: Vec<u8> = (0..200u8).collect();
        h.deliver_tcp(id, &all[..100]);
        h.tcp_consume(id, 90).unwrap();
        h.deliver_tcp(id, &all[100..]);
        for off in [0, 5, 10, 50, 109] {
            let mut buf = [0u8; 64];
            let n = h.tcp_peek(id, off, &mut buf).unwrap();
            assert_eq!(&buf[..n], &all[90 + off..(90 + off + 64).min(200)]);
        }
    }

    #[test]
    fn refused_connect_is_an_event() {
        let mut h = SimSockets {
            default_connect: ConnectOutcome::Refuse,
            ..SimSockets::default()
        };
        let id = h
            .tcp_connect(std::net::SocketAddr::from(SocketAddrV4::new(
                Ipv4Addr::LOCALHOST,
                1,
            )))
            .unwrap();
        assert_eq!(
            h.drain_events(),
            vec![SockEvent::ConnectFailed(
                id,
                io::ErrorKind::ConnectionRefused
            )]
        );
    }
}
