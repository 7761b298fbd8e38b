//! DNS over TCP to the virtual host, with the local names answered.
//!
//! A guest's TCP connection to the virtual host's port 53 is carried by the NAT like any other,
//! to a listener of the control thread on the host's loopback (`Engine::ctx.dns_over_tcp`) rather
//! than to the resolver itself. The listener reads the guest's queries (each a message behind
//! a two-byte length, RFC 1035 4.2.2), answers those the virtual host answers over UDP (leases,
//! reservations, `[dns] hosts`: `Engine::route_tcp_dns`) and passes the others, unchanged, to
//! the first usable upstream resolver over a TCP connection of the guest connection's own,
//! opened at the first such query. Answers go back whole, in the order they are ready; a DNS
//! client over TCP matches them by ID (RFC 7766 6.2.1.1), so a local answer may overtake a
//! relayed one.
//!
//! Bounds: `MAX_CONNS` connections at once (more are closed at accept); each direction holds
//! at most `MAX_BUFFERED` bytes before reading from its source stops until it drains; a
//! connection quiet for `IDLE` is closed, as a resolver would close it.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry, Token};

use hubnat_core::{Engine, Instant as CoreInstant, TcpDnsRoute};

/// Connections carried at once: the guests' resolvers open one at a time and rarely many.
pub(crate) const MAX_CONNS: usize = 64;
/// Bytes held for one direction of one connection: two of the largest messages.
const MAX_BUFFERED: usize = 2 * (2 + u16::MAX as usize);
/// A connection with nothing to do for this long is closed.
pub(crate) const IDLE: Duration = Duration::from_secs(30);
const READ_CHUNK: usize = 16 * 1024;

/// The listener and the connections it accepted; tokens from `first_token` up (the listener,
/// then each slot's guest side and upstream side).
pub(crate) struct DnsTcp {
    listener: TcpListener,
    addr: SocketAddrV4,
    first_token: usize,
    conns: Vec<Option<Conn>>,
    scratch: Box<[u8]>,
}

struct Conn {
    guest: TcpStream,
    upstream: Option<TcpStream>,
    /// Bytes from the guest not yet split into messages.
    from_guest: Vec<u8>,
    /// Bytes waiting to be written to the guest (whole messages, with their lengths).
    to_guest: Vec<u8>,
    from_upstream: Vec<u8>,
    to_upstream: Vec<u8>,
    /// The guest has closed its side: end once everything owed to it is written.
    guest_done: bool,
    last_active: Instant,
}

/// What one turn of a connection's pump left it as.
#[derive(PartialEq, Eq)]
enum State {
    Open,
    Closed,
}

impl DnsTcp {
    /// A listener on the host's loopback, on a port the kernel picks, registered with
    /// `registry` under `first_token`.
    pub(crate) fn open(registry: &Registry, first_token: usize) -> io::Result<DnsTcp> {
        let mut listener =
            TcpListener::bind(SocketAddr::from(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)))?;
        let addr = match listener.local_addr()? {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(_) => return Err(io::Error::other("an IPv6 loopback address")),
        };
        // A namespace whose loopback is down still binds 127.0.0.1 but connects nowhere:
        // check that the NAT's connections can reach the listener at all.
        std::net::TcpStream::connect_timeout(&SocketAddr::V4(addr), Duration::from_secs(1))?;
        let _ = listener.accept();
        registry.register(&mut listener, Token(first_token), Interest::READABLE)?;
        Ok(DnsTcp {
            listener,
            addr,
            first_token,
            conns: (0..MAX_CONNS).map(|_| None).collect(),
            scratch: vec![0u8; READ_CHUNK].into_boxed_slice(),
        })
    }

    /// Where the NAT carries the guests' DNS over TCP.
    pub(crate) fn addr(&self) -> SocketAddrV4 {
        self.addr
    }

    /// Whether token `t` is the listener's or one of its connections'.
    pub(crate) fn owns(&self, t: usize) -> bool {
        t >= self.first_token && t <= self.first_token + 2 * MAX_CONNS
    }

    /// Token `t` is ready: accept, or move what can be moved on its connection.
    pub(crate) fn ready(
        &mut self,
        registry: &Registry,
        (engine, now): (&mut Engine, CoreInstant),
        t: usize,
    ) {
        if t == self.first_token {
            self.accept(registry);
            return;
        }
        let slot = (t - self.first_token - 1) / 2;
        self.pump_slot(registry, (engine, now), slot);
    }

    /// Closes the connections quiet for `IDLE` or longer.
    pub(crate) fn sweep(&mut self, registry: &Registry) {
        let now = Instant::now();
        for slot in 0..self.conns.len() {
            if self.conns[slot]
                .as_ref()
                .is_some_and(|c| now.duration_since(c.last_active) >= IDLE)
            {
                self.close(registry, slot);
            }
        }
    }

    fn accept(&mut self, registry: &Registry) {
        loop {
            let (mut guest, _) = match self.listener.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!("DNS over TCP: accept: {e}");
                    return;
                }
            };
            let Some(slot) = self.conns.iter().position(Option::is_none) else {
                // Dropped: the guest sees its connection reset and its resolver retries.
                tracing::debug!("DNS over TCP: {MAX_CONNS} connections open, one refused");
                continue;
            };
            let token = Token(self.first_token + 1 + 2 * slot);
            if let Err(e) =
                registry.register(&mut guest, token, Interest::READABLE | Interest::WRITABLE)
            {
                tracing::debug!("DNS over TCP: register: {e}");
                continue;
            }
            self.conns[slot] = Some(Conn {
                guest,
                upstream: None,
                from_guest: Vec::new(),
                to_guest: Vec::new(),
                from_upstream: Vec::new(),
                to_upstream: Vec::new(),
                guest_done: false,
                last_active: Instant::now(),
            });
        }
    }

    fn pump_slot(
        &mut self,
        registry: &Registry,
        (engine, now): (&mut Engine, CoreInstant),
        slot: usize,
    ) {
        let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let token = Token(self.first_token + 2 + 2 * slot);
        if c.pump(registry, (engine, now), token, &mut self.scratch) == State::Closed {
            self.close(registry, slot);
        }
    }

    fn close(&mut self, registry: &Registry, slot: usize) {
        if let Some(mut c) = self.conns[slot].take() {
            let _ = registry.deregister(&mut c.guest);
            if let Some(u) = &mut c.upstream {
                let _ = registry.deregister(u);
            }
        }
    }

    /// Closes every connection (the runtime is stopping).
    pub(crate) fn close_all(&mut self, registry: &Registry) {
        for slot in 0..self.conns.len() {
            self.close(registry, slot);
        }
    }
}

impl Conn {
    /// Moves everything that can move now, until nothing does (the sockets are edge-triggered:
    /// a side left readable would not be reported again).
    fn pump(
        &mut self,
        registry: &Registry,
        (engine, now): (&mut Engine, CoreInstant),
        upstream_token: Token,
        scratch: &mut [u8],
    ) -> State {
        self.last_active = Instant::now();
        loop {
            let mut moved = false;
            if !self.guest_done && self.from_guest.len() < MAX_BUFFERED {
                match read_some(&mut self.guest, &mut self.from_guest, scratch) {
                    Ok(Some(0)) => self.guest_done = true,
                    Ok(Some(_)) => moved = true,
                    Ok(None) => {}
                    Err(_) => return State::Closed,
                }
            }
            match self.route_queries(registry, (&mut *engine, now), upstream_token) {
                Ok(m) => moved |= m,
                Err(()) => return State::Closed,
            }
            if let Some(up) = &mut self.upstream {
                match write_some(up, &mut self.to_upstream) {
                    Ok(m) => moved |= m,
                    // Not connected yet: its writable event comes when it is.
                    Err(e) if e.kind() == ErrorKind::NotConnected => {}
                    Err(_) => self.upstream_lost(registry),
                }
            }
            if let Some(up) = &mut self.upstream {
                if self.from_upstream.len() < MAX_BUFFERED {
                    match read_some(up, &mut self.from_upstream, scratch) {
                        Ok(Some(0)) => self.upstream_lost(registry),
                        Ok(Some(_)) => moved = true,
                        Ok(None) => {}
                        Err(e) if e.kind() == ErrorKind::NotConnected => {}
                        Err(_) => self.upstream_lost(registry),
                    }
                }
            }
            // Whole answers only: a local answer must never land inside a relayed one.
            while self.to_guest.len() < MAX_BUFFERED {
                let Some(n) = whole_message(&self.from_upstream) else {
                    break;
                };
                self.to_guest.extend(self.from_upstream.drain(..n));
                moved = true;
            }
            match write_some(&mut self.guest, &mut self.to_guest) {
                Ok(m) => moved |= m,
                Err(_) => return State::Closed,
            }
            if self.guest_done && self.to_guest.is_empty() && self.in_flight() == 0 {
                return State::Closed;
            }
            if !moved {
                return State::Open;
            }
        }
    }

    /// Splits the guest's bytes into queries and sends each where it goes. `Err`: the guest
    /// sent something that is not a query.
    fn route_queries(
        &mut self,
        registry: &Registry,
        (engine, now): (&mut Engine, CoreInstant),
        upstream_token: Token,
    ) -> Result<bool, ()> {
        let mut moved = false;
        while let Some(n) = whole_message(&self.from_guest) {
            let query = &self.from_guest[2..n];
            match engine.route_tcp_dns(now, query) {
                None => return Err(()),
                Some(TcpDnsRoute::Answer(a)) => {
                    if self.to_guest.len() >= MAX_BUFFERED {
                        break;
                    }
                    push_message(&mut self.to_guest, &a);
                }
                Some(TcpDnsRoute::Relay(to)) => {
                    if self.to_upstream.len() >= MAX_BUFFERED {
                        break;
                    }
                    if self.upstream.is_none() {
                        self.connect(registry, to, upstream_token)?;
                    }
                    self.to_upstream.extend_from_slice(&self.from_guest[..n]);
                }
            }
            self.from_guest.drain(..n);
            moved = true;
        }
        Ok(moved)
    }

    fn connect(&mut self, registry: &Registry, to: SocketAddr, token: Token) -> Result<(), ()> {
        let mut s = TcpStream::connect(to).map_err(|e| {
            tracing::debug!("DNS over TCP: connect to {to}: {e}");
        })?;
        registry
            .register(&mut s, token, Interest::READABLE | Interest::WRITABLE)
            .map_err(|_| ())?;
        self.upstream = Some(s);
        Ok(())
    }

    /// The upstream connection ended or failed: queries in flight on it are lost (the guest's
    /// resolver asks again); the next relayed query opens a new one.
    fn upstream_lost(&mut self, registry: &Registry) {
        if let Some(mut u) = self.upstream.take() {
            let _ = registry.deregister(&mut u);
        }
        self.to_upstream.clear();
        self.from_upstream.clear();
    }

    /// Bytes still owed in either direction through the upstream.
    fn in_flight(&self) -> usize {
        self.to_upstream.len() + self.from_upstream.len()
    }
}

/// The length of the first whole length-prefixed message in `buf` (prefix included).
fn whole_message(buf: &[u8]) -> Option<usize> {
    let len = usize::from(u16::from_be_bytes([*buf.first()?, *buf.get(1)?]));
    (buf.len() >= 2 + len).then_some(2 + len)
}

fn push_message(out: &mut Vec<u8>, msg: &[u8]) {
    // Answers here are built from a query that fitted its own prefix: never longer.
    let len = u16::try_from(msg.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&msg[..usize::from(len)]);
}

/// One read into `into`: `Some(0)` at end of stream, `None` when nothing is there now.
fn read_some(
    s: &mut TcpStream,
    into: &mut Vec<u8>,
    scratch: &mut [u8],
) -> io::Result<Option<usize>> {
    let room = MAX_BUFFERED.saturating_sub(into.len()).min(scratch.len());
    loop {
        match s.read(&mut scratch[..room]) {
            Ok(n) => {
                into.extend_from_slice(&scratch[..n]);
                return Ok(Some(n));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Writes what it can of `buf`, removing what was written; whether anything was.
fn write_some(s: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<bool> {
    let mut wrote = false;
    while !buf.is_empty() {
        match s.write(buf) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => {
                buf.drain(..n);
                wrote = true;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(wrote)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_cut_at_their_length_prefix() {
        assert_eq!(whole_message(&[]), None);
        assert_eq!(whole_message(&[0]), None);
        assert_eq!(whole_message(&[0, 3, 1, 2]), None);
        assert_eq!(whole_message(&[0, 3, 1, 2, 3, 9]), Some(5));
        assert_eq!(whole_message(&[0, 0]), Some(2));
        let mut out = Vec::new();
        push_message(&mut out, &[7, 8]);
        assert_eq!(out, [0, 2, 7, 8]);
    }
}
