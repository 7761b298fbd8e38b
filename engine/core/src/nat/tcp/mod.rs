//! The user-mode TCP endpoint: every guest connection is terminated here and carried through a
//! sock-side socket (ARCHITECTURE.md, "The core is sans-IO").
//!
//! `TcpNat` is the connection table and the dispatcher: it parses and checks each guest segment,
//! opens connections on SYN (a sock-side connect first, the SYN-ACK only once it succeeds), enforces
//! the session limits, answers segments of unknown connections with RST, routes sock-side socket
//! events, and runs the timers. One connection's state machine is `conn::TcpConn`.
//!
//! Inbound connections (`nat::inbound`: a port forward's client) are the same connections opened
//! the other way: the client's socket is connected already, our SYN goes to the guest from the
//! client's address (`conn::State::SynSent`), and once the guest's SYN-ACK is in, nothing tells
//! them from the guest's own. They share the table, keyed (guest, client as shown), and count as
//! the guest's half-open connections until the guest answers.
//!
//! Timers: each connection has one deadline (the earliest of its connect, retransmission,
//! persist, ACK-flush, idle and TIME-WAIT deadlines). The heap holds `(deadline, key)` entries,
//! pushed only when a connection's deadline moves earlier than the entry it already has; an
//! entry that comes due for a connection whose deadline moved later is re-pushed then. So
//! `poll_timeout` is a heap peek, and the data path rarely touches the heap.

mod conn;
mod reassembly;
mod segment;
mod seq;
#[cfg(test)]
mod tests;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::{IpAddr, SocketAddr};

use rand::Rng;

use self::conn::{Handling, Next, Params, State, TcpConn};
use self::reassembly::RingBudget;
use self::segment::Seg;
use self::seq::Seq;
use crate::config::Config;
use crate::event::Event;
use crate::nat::icmp_error::{self, Quote};
use crate::nat::{sock_destination, GuestIp, InboundRefused, InboundTarget, Proto, SessionInfo};
use crate::output::FrameBatch;
use crate::sockio::{SockEvent, SockId, SockIo};
use crate::stats::DropReason;
use crate::time::Instant;
use crate::Ctx;
use crate::FastHashMap;

/// The receive window (and reassembly bound) of each connection, guest → sock side.
pub(crate) const DEFAULT_RCV_BUF: usize = 256 * 1024;

/// Takes one from `guest`'s count, forgetting guests at zero.
fn dec(counts: &mut FastHashMap<IpAddr, usize>, guest: IpAddr) {
    if let Some(n) = counts.get_mut(&guest) {
        *n -= 1;
        if *n == 0 {
            counts.remove(&guest);
        }
    }
}

/// (guest, destination as the guest addressed it)
type Key = (SocketAddr, SocketAddr);

/// The TCP side of the NAT: the guests' connections, each relayed to a sock-side connection.
pub struct TcpNat {
    /// Boxed: a connection is some 600 bytes, and a table of them inline would hold as many
    /// again in empty buckets after it doubles; boxed, an empty bucket costs a key and a
    /// pointer (10,000 idle connections: 25.6 MiB in all, against 32.9 inline).
    conns: FastHashMap<Key, Box<TcpConn>>,
    by_sock: FastHashMap<SockId, Key>,
    per_guest: FastHashMap<IpAddr, usize>,
    /// Connections (tombstones included) of IPv6 guests.
    v6: usize,
    half_open: usize,
    /// Connecting connections per guest (its share of `half_open`).
    half_open_of: FastHashMap<IpAddr, usize>,
    tombstones: usize,
    timers: BinaryHeap<Reverse<(Instant, Key)>>,
    /// With `external_idle`: `(deadline, key, session id)`, one entry per connection, for
    /// `expire_idle`; the idle deadline is then left out of the connections' timers.
    idle_timers: BinaryHeap<Reverse<(Instant, Key, u32)>>,
    external_idle: bool,
    due: Vec<Key>,
    rcv_buf: usize,
    /// Whether guests' payload is written to sock-side sockets once per batch (`flush`).
    batching: bool,
    /// Connections with payload waiting for `flush`.
    dirty: Vec<Key>,
    /// One buffer for every connection's batched peeks (see `conn::PeekCache`).
    peek: conn::PeekCache,
    /// When the runtime places flows on its workers: the connections entered in the table and
    /// those removed from it since it last looked (`Engine::drain_tcp_flow_changes`).
    changes: Option<FlowChanges>,
}

/// Connections that entered and left the table (their keys: the guest's end, the destination).
#[derive(Default)]
pub(crate) struct FlowChanges {
    pub(crate) opened: Vec<Key>,
    pub(crate) closed: Vec<Key>,
}

impl TcpNat {
    pub(crate) fn new(_cfg: &Config) -> TcpNat {
        TcpNat {
            conns: FastHashMap::default(),
            by_sock: FastHashMap::default(),
            per_guest: FastHashMap::default(),
            v6: 0,
            half_open: 0,
            half_open_of: FastHashMap::default(),
            tombstones: 0,
            timers: BinaryHeap::new(),
            idle_timers: BinaryHeap::new(),
            external_idle: false,
            due: Vec::new(),
            rcv_buf: DEFAULT_RCV_BUF,
            batching: false,
            dirty: Vec::new(),
            peek: conn::PeekCache::default(),
            changes: None,
        }
    }

    /// Whether entries and removals are kept (`changes_mut`).
    pub(crate) fn track_changes(&mut self, on: bool) {
        self.changes = on.then(FlowChanges::default);
    }

    /// The entries and removals kept since the caller last emptied the lists.
    pub(crate) fn changes_mut(&mut self) -> Option<&mut FlowChanges> {
        self.changes.as_mut()
    }

    /// Connections in the table, TIME-WAIT tombstones included (the rows of `sessions`).
    pub(crate) fn len(&self) -> usize {
        self.conns.len()
    }

    /// The connections of `len` whose guest is IPv6.
    pub(crate) fn ipv6_len(&self) -> usize {
        self.v6
    }

    /// Connections in the table that are not TIME-WAIT tombstones.
    pub(crate) fn live(&self) -> usize {
        self.conns.len() - self.tombstones
    }

    /// Heap bytes held by the connections' reassembly rings, and guest bytes queued in them.
    #[cfg(test)]
    pub(crate) fn buffer_usage(&self) -> (usize, usize) {
        self.conns
            .values()
            .fold((0, 0), |(h, q), c| (h + c.heap_bytes(), q + c.queued()))
    }

    /// Connections whose sock-side connect is still in progress.
    pub fn half_open(&self) -> usize {
        self.half_open
    }

    pub(crate) fn handle(
        &mut self,
        now: Instant,
        ctx: &mut Ctx,
        ip: &GuestIp,
        io: &mut impl SockIo,
        out: &mut FrameBatch,
    ) -> Result<(), DropReason> {
        // Only guests of the virtual network can be answered (as UDP and ICMP hold too): an
        // off-subnet source would make a connection, and a neighbour entry, for no guest.
        if !crate::nat::is_guest_address(ctx, ip.src) {
            return Err(DropReason::Foreign);
        }
        let seg = segment::parse(ip, ctx.l4_checksum_left)?;
        let key = segment::endpoints(ip, &seg);
        if let Some(c) = self.conns.get_mut(&key) {
            let was = c.state;
            let mut cx = Handling::new(now, ctx, io, out, &mut self.peek);
            match c.on_segment(&mut cx, &seg) {
                Next::Reopen => self.remove(key, ctx, io),
                next => {
                    let answered = was == State::SynSent && c.state != State::SynSent;
                    if next == Next::Keep && c.flush_pending && !c.in_dirty {
                        c.in_dirty = true;
                        self.dirty.push(key);
                    }
                    if answered {
                        self.end_half_open(ctx, key.0.ip());
                    }
                    self.after(key, next, ctx, io);
                    return Ok(());
                }
            }
        }
        if seg.syn && seg.ack.is_none() {
            return self.open(now, ctx, (&seg, Quote::of(ip)), key, io, out);
        }
        if !seg.rst {
            reset(ctx, &seg, key, out)?;
        }
        Ok(())
    }

    /// A SYN for no connection: check limits and destination, start the sock-side connect.
    fn open(
        &mut self,
        now: Instant,
        ctx: &mut Ctx,
        (seg, syn): (&Seg, Quote),
        key: Key,
        io: &mut impl SockIo,
        out: &mut FrameBatch,
    ) -> Result<(), DropReason> {
        let (guest, dst) = key;
        let guest_mac = ctx.neighbour(guest.ip()).ok_or(DropReason::NoArp)?;
        let target = if crate::nat::is_host_ip(ctx, dst.ip()) {
            // The virtual host's own address: only DNS over TCP, carried to the runtime's
            // listener that answers local names (or else straight to the first resolver).
            let upstream = ctx
                .dns_over_tcp
                .or_else(|| crate::vhost::dns::upstream_for_tcp(ctx));
            match upstream {
                Some(u) if dst.port() == 53 => u,
                _ => {
                    reset(ctx, seg, key, out)?;
                    return Ok(());
                }
            }
        } else {
            if !ctx.cfg.nat.enabled {
                return Err(DropReason::Disabled);
            }
            match sock_destination(ctx, Proto::Tcp, guest, dst) {
                Ok(t) => t,
                Err(why) => {
                    reset(ctx, seg, key, out)?;
                    return Err(why);
                }
            }
        };
        if !self.admit(now, ctx, guest.ip()) {
            reset(ctx, seg, key, out)?;
            return Err(DropReason::Limit);
        }
        let id = ctx.next_session_id();
        ctx.events.push(Event::SessionCreated {
            proto: Proto::Tcp,
            id,
            src: guest,
            dst,
        });
        let sock = match io.tcp_connect(target) {
            Ok(s) => s,
            Err(e) => {
                ctx.release_session(Proto::Tcp, guest.ip());
                ctx.release_half_open(guest.ip());
                ctx.events.push(Event::TcpConnectFailed {
                    id,
                    ip: target.ip(),
                    port: target.port(),
                    reason: e.to_string(),
                });
                ctx.events.push(Event::SessionDeleted {
                    proto: Proto::Tcp,
                    id,
                });
                if !icmp_error::report_send_error(ctx, out, &e, syn.bytes(), Some(guest_mac)) {
                    reset(ctx, seg, key, out)?;
                }
                return Ok(());
            }
        };
        let params = self.params(ctx);
        let mut c = TcpConn::new(id, guest, dst, guest_mac, seg, now, &params);
        c.defer_writes = self.batching;
        c.sock = Some(sock);
        c.target = target;
        c.syn = Some(Box::new(syn));
        self.insert(now, ctx, key, sock, c);
        self.schedule(key, ctx);
        Ok(())
    }

    /// A new connection's parameters, its initial sequence number and timestamp offset drawn
    /// from `ctx`'s randomness.
    fn params(&self, ctx: &mut Ctx) -> Params {
        Params {
            rcv_buf: self.rcv_buf,
            rings: RingBudget {
                total: ctx.cfg.nat.reassembly_mib << 20,
                per_guest: ctx.cfg.nat.reassembly_per_guest_mib << 20,
            },
            mtu: ctx.cfg.nat.mtu as usize,
            iss: Seq(ctx.rng.random()),
            ts_offset: ctx.rng.random(),
            connect_timeout: ctx.cfg.nat.tcp_connect_timeout,
        }
    }

    /// Whether `guest` may open one more connection that starts half-open: the session limits
    /// (here and across the runtime's engines), its rate of new sessions, and its share of the
    /// half-open slots (a SYN flood fills the flooder's share, and its neighbours still
    /// connect). On true, the shared counts are taken; `insert` takes the local ones.
    fn admit(&self, now: Instant, ctx: &mut Ctx, guest: IpAddr) -> bool {
        let nat = &ctx.cfg.nat;
        let guest_count = self.per_guest.get(&guest).copied().unwrap_or(0);
        let guest_half_open = self.half_open_of.get(&guest).copied().unwrap_or(0);
        if self.live() >= nat.max_sessions
            || guest_count >= nat.max_sessions_per_guest
            || self.half_open >= nat.max_half_open
            || guest_half_open >= nat.max_half_open_per_guest
            || !ctx.admit_session(now, Proto::Tcp, guest)
        {
            return false;
        }
        if !ctx.admit_half_open(guest) {
            ctx.release_session(Proto::Tcp, guest);
            return false;
        }
        true
    }

    /// Enters a new, half-open connection in the table and its counts.
    fn insert(&mut self, now: Instant, ctx: &Ctx, key: Key, sock: SockId, c: TcpConn) {
        if self.external_idle {
            let idle = ctx.cfg.nat.tcp_timeout;
            self.idle_timers.push(Reverse((now + idle, key, c.id)));
        }
        if let Some(ch) = &mut self.changes {
            ch.opened.push(key);
        }
        self.conns.insert(key, Box::new(c));
        self.by_sock.insert(sock, key);
        *self.per_guest.entry(key.0.ip()).or_insert(0) += 1;
        self.v6 += usize::from(key.0.is_ipv6());
        self.half_open += 1;
        *self.half_open_of.entry(key.0.ip()).or_insert(0) += 1;
    }

    /// A connection of `guest` is half-open no more (connected, answered, or gone).
    fn end_half_open(&mut self, ctx: &Ctx, guest: IpAddr) {
        self.half_open -= 1;
        dec(&mut self.half_open_of, guest);
        ctx.release_half_open(guest);
    }

    /// A connection a forward accepted from `client` (as the guest is shown it) for
    /// `target`: our SYN goes to the guest from the client, the accepted `sock` waits for it
    /// to answer. On `Err` the caller aborts and closes `sock`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn inbound(
        &mut self,
        now: Instant,
        ctx: &mut Ctx,
        sock: SockId,
        client: SocketAddr,
        target: InboundTarget,
        io: &mut impl SockIo,
        out: &mut FrameBatch,
    ) -> Result<(), InboundRefused> {
        let key = (SocketAddr::V4(target.guest), client);
        match self.conns.get(&key).map(|c| c.state) {
            // The tombstone of an earlier connection of the same pair gives way, as it does
            // to the guest's own new SYN.
            Some(State::TimeWait) => self.remove(key, ctx, io),
            Some(_) => return Err(InboundRefused::InUse),
            None => {}
        }
        let guest = IpAddr::V4(*target.guest.ip());
        if !self.admit(now, ctx, guest) {
            return Err(InboundRefused::Limit);
        }
        let id = ctx.next_session_id();
        ctx.events.push(Event::InboundSessionCreated {
            proto: Proto::Tcp,
            id,
            src: client,
            dst: key.0,
        });
        let params = self.params(ctx);
        let mut c = TcpConn::new_active(
            id,
            key.0,
            client,
            target.guest_mac,
            target.forward,
            now,
            &params,
        );
        c.defer_writes = self.batching;
        c.sock = Some(sock);
        self.insert(now, ctx, key, sock, c);
        if let Some(c) = self.conns.get_mut(&key) {
            let mut cx = Handling::new(now, ctx, io, out, &mut self.peek);
            c.start_active(&mut cx);
        }
        self.schedule(key, ctx);
        Ok(())
    }

    /// See `Engine::set_batching`.
    pub(crate) fn set_batching(&mut self, on: bool) {
        self.batching = on;
    }

    /// Writes the guests' payload that waited for the end of the batch, and acknowledges it.
    pub(crate) fn flush(
        &mut self,
        now: Instant,
        ctx: &mut Ctx,
        io: &mut impl SockIo,
        out: &mut FrameBatch,
    ) {
        while let Some(key) = self.dirty.pop() {
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            c.in_dirty = false;
            if !c.flush_pending {
                continue;
            }
            let mut cx = Handling::new(now, ctx, io, out, &mut self.peek);
            let next = c.flush_writes(&mut cx);
            self.after(key, next, ctx, io);
        }
    }

    /// Handles `ev` if one of this protocol's sessions owns its socket; else gives it back.
    pub(crate) fn handle_host_event(
        &mut self,
        now: Instant,
        ctx: &mut Ctx,
        ev: SockEvent,
        io: &mut impl SockIo,
        out: &mut FrameBatch,
    ) -> Option<SockEvent> {
        let sock = match ev {
            SockEvent::Readable(s)
            | SockEvent::Writable(s)
            | SockEvent::Connected(s)
            | SockEvent::ConnectFailed(s, _)
            | SockEvent::ConnectUnreachable(s, _)
            | SockEvent::Failed(s, _) => s,
        };
        let Some(&key) = self.by_sock.get(&sock) else {
            return Some(ev);
        };
        let Some(c) = self.conns.get_mut(&key) else {
            self.by_sock.remove(&sock);
            return Some(ev);
        };
        let mut cx = Handling::new(now, ctx, io, out, &mut self.peek);
        let next = match ev {
            SockEvent::Connected(_) => {
                if c.state == State::Connecting {
                    self.half_open -= 1;
                    dec(&mut self.half_open_of, key.0.ip());
                    cx.ctx.release_half_open(key.0.ip());
                    let t = c.target;
                    cx.ctx.events.push(Event::TcpConnected {
                        id: c.id,
                        ip: t.ip(),
                        port: t.port(),
                    });
                }
                c.on_connected(&mut cx)
            }
            SockEvent::ConnectFailed(_, kind) => {
                connect_failed(cx.ctx, c, kind.to_string());
                c.refuse(&mut cx)
            }
            SockEvent::ConnectUnreachable(_, why) => {
                connect_failed(cx.ctx, c, why.to_string());
                c.unreachable(&mut cx, why)
            }
            SockEvent::Readable(_) => c.on_readable(&mut cx),
            SockEvent::Writable(_) => c.on_writable(&mut cx),
            SockEvent::Failed(_, _) => c.on_failed(&mut cx),
        };
        self.after(key, next, ctx, io);
        None
    }

    /// Applies what a connection's handler decided.
    fn after(&mut self, key: Key, next: Next, ctx: &mut Ctx, io: &mut impl SockIo) {
        match next {
            Next::Keep => self.schedule(key, ctx),
            Next::Delete | Next::Reopen => self.remove(key, ctx, io),
            Next::TimeWait => {
                let Some(c) = self.conns.get_mut(&key) else {
                    return;
                };
                if let Some(s) = c.sock.take() {
                    self.by_sock.remove(&s);
                    io.close(s);
                }
                self.tombstones += 1;
                self.dec_guest(ctx, key.0.ip());
                if self.tombstones > ctx.cfg.nat.max_sessions {
                    self.remove(key, ctx, io);
                } else {
                    self.schedule(key, ctx);
                }
            }
        }
    }

    /// A connection of `ip` stops counting toward the session limits (here and, with several
    /// workers, in the shared count).
    fn dec_guest(&mut self, ctx: &Ctx, ip: IpAddr) {
        ctx.release_session(Proto::Tcp, ip);
        if let Some(n) = self.per_guest.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.per_guest.remove(&ip);
            }
        }
    }

    /// Forgets a connection, closing its socket.
    fn remove(&mut self, key: Key, ctx: &mut Ctx, io: &mut impl SockIo) {
        let Some(c) = self.conns.remove(&key) else {
            return;
        };
        if let Some(ch) = &mut self.changes {
            ch.closed.push(key);
        }
        self.v6 -= usize::from(key.0.is_ipv6());
        if let Some(s) = c.sock {
            self.by_sock.remove(&s);
            io.close(s);
        }
        match c.state {
            State::TimeWait => self.tombstones -= 1,
            State::Connecting | State::SynSent => {
                self.end_half_open(ctx, key.0.ip());
                self.dec_guest(ctx, key.0.ip());
            }
            State::SynReceived | State::Open => self.dec_guest(ctx, key.0.ip()),
        }
        ctx.events.push(Event::SessionDeleted {
            proto: Proto::Tcp,
            id: c.id,
        });
    }

    fn schedule(&mut self, key: Key, ctx: &Ctx) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let Some(d) = c.deadline(Self::timer_idle(self.external_idle, ctx)) else {
            return;
        };
        let earlier = match c.scheduled {
            Some(s) => d < s,
            None => true,
        };
        if earlier {
            c.scheduled = Some(d);
            self.timers.push(Reverse((d, key)));
        }
    }

    /// The forward `forward` is gone: each of its connections is reset both ways (toward the
    /// guest, and toward the client through its aborted socket) and forgotten.
    pub(crate) fn close_forward(
        &mut self,
        now: Instant,
        ctx: &mut Ctx,
        forward: u32,
        io: &mut impl SockIo,
        out: &mut FrameBatch,
    ) -> usize {
        let keys: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| c.forward == Some(forward))
            .map(|(k, _)| *k)
            .collect();
        for key in &keys {
            if let Some(c) = self.conns.get_mut(key) {
                if c.state != State::TimeWait {
                    let mut cx = Handling::new(now, ctx, io, out, &mut self.peek);
                    let _ = c.on_failed(&mut cx);
                }
                if let Some(sock) = c.sock {
                    io.tcp_abort(sock);
                }
            }
            self.remove(*key, ctx, io);
        }
        keys.len()
    }

    /// Shutdown: every connection not in TIME-WAIT is reset toward its guest, and every
    /// connection is forgotten with its sock-side socket closed.
    pub(crate) fn close_all(
        &mut self,
        now: Instant,
        ctx: &mut Ctx,
        io: &mut impl SockIo,
        out: &mut FrameBatch,
    ) {
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for key in keys {
            if let Some(c) = self.conns.get_mut(&key) {
                if c.state != State::TimeWait {
                    let mut cx = Handling::new(now, ctx, io, out, &mut self.peek);
                    let _ = c.on_failed(&mut cx);
                }
            }
            self.remove(key, ctx, io);
        }
        self.dirty.clear();
    }

    /// The idle timeout the connections' own timers use: none (never) when idle expiry is
    /// external.
    fn timer_idle(external: bool, ctx: &Ctx) -> std::time::Duration {
        if external {
            std::time::Duration::MAX
        } else {
            ctx.cfg.nat.tcp_timeout
        }
    }

    /// With `on`, idle connections are reset only by `expire_idle` (run on the caller's
    /// schedule), and `poll_timeout` no longer wakes for idle deadlines; the protocol's own
    /// timers (connect, retransmission, persist, delayed ACK, TIME-WAIT) stay here.
    pub(crate) fn set_external_idle(&mut self, on: bool, ctx: &Ctx) {
        if self.external_idle == on {
            return;
        }
        self.external_idle = on;
        self.reschedule_all(ctx);
    }

    /// Every connection's deadlines again, from `ctx`'s configuration: after a switch of who
    /// runs idle expiry, or a reload that changed `nat.tcp_timeout` (a shorter timeout must not
    /// wait for the deadlines the longer one set).
    pub(crate) fn reschedule_all(&mut self, ctx: &Ctx) {
        self.rebuild_idle(ctx);
        self.timers.clear();
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for key in keys {
            if let Some(c) = self.conns.get_mut(&key) {
                c.scheduled = None;
            }
            self.schedule(key, ctx);
        }
    }

    fn rebuild_idle(&mut self, ctx: &Ctx) {
        self.idle_timers.clear();
        if !self.external_idle {
            return;
        }
        let idle = ctx.cfg.nat.tcp_timeout;
        for (&key, c) in &self.conns {
            if c.state != State::TimeWait {
                self.idle_timers
                    .push(Reverse((c.last_used + idle, key, c.id)));
            }
        }
    }

    /// Resets the connections idle for `nat.tcp_timeout` at `now` (toward the guest and the
    /// destination). With `set_external_idle(true)` only this ends idle connections.
    pub(crate) fn expire_idle(
        &mut self,
        now: Instant,
        ctx: &mut Ctx,
        io: &mut impl SockIo,
        out: &mut FrameBatch,
    ) {
        let idle = ctx.cfg.nat.tcp_timeout;
        while let Some(&Reverse((t, key, id))) = self.idle_timers.peek() {
            if t > now {
                break;
            }
            self.idle_timers.pop();
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            if c.id != id || c.state == State::TimeWait {
                continue;
            }
            let real = c.last_used + idle;
            if real > now {
                self.idle_timers.push(Reverse((real, key, id)));
                continue;
            }
            let mut cx = Handling::new(now, ctx, io, out, &mut self.peek);
            let next = c.on_timer(&mut cx, idle);
            self.after(key, next, ctx, io);
        }
        // Entries of connections gone since: rebuild when they dominate.
        if self.idle_timers.len() > 2 * self.conns.len() + 64 {
            self.rebuild_idle(ctx);
        }
    }

    pub(crate) fn sessions(&self, into: &mut Vec<SessionInfo>) {
        into.extend(self.conns.values().map(|c| SessionInfo {
            id: c.id,
            proto: Proto::Tcp,
            guest: c.guest,
            dst: c.dst,
            direction: c.direction,
            created: c.created,
            last_used: c.last_used,
            bytes_to_host: c.bytes_to_host,
            bytes_to_guest: c.bytes_to_guest,
            packets_to_host: c.packets_to_host,
            packets_to_guest: c.packets_to_guest,
            state: c.state_name(),
        }));
    }

    /// The earliest heap entry (possibly one that has moved later: a harmless early wake-up).
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.timers.peek().map(|r| r.0 .0)
    }

    pub(crate) fn handle_timeout(
        &mut self,
        now: Instant,
        ctx: &mut Ctx,
        io: &mut impl SockIo,
        out: &mut FrameBatch,
    ) {
        let mut due = std::mem::take(&mut self.due);
        due.clear();
        while let Some(&Reverse((t, key))) = self.timers.peek() {
            if t > now {
                break;
            }
            self.timers.pop();
            if let Some(c) = self.conns.get_mut(&key) {
                if c.scheduled == Some(t) {
                    c.scheduled = None;
                    due.push(key);
                }
            }
        }
        let idle = Self::timer_idle(self.external_idle, ctx);
        for &key in &due {
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            if c.deadline(idle).is_none_or(|d| d > now) {
                self.schedule(key, ctx);
                continue;
            }
            if c.state == State::Connecting {
                let t = c.target;
                ctx.events.push(Event::TcpConnectFailed {
                    id: c.id,
                    ip: t.ip(),
                    port: t.port(),
                    reason: "timed out".into(),
                });
            }
            let mut cx = Handling::new(now, ctx, io, out, &mut self.peek);
            let next = c.on_timer(&mut cx, idle);
            self.after(key, next, ctx, io);
        }
        self.due = due;
        // Entries of deleted connections and superseded deadlines: rebuild when they dominate.
        if self.timers.len() > 2 * self.conns.len() + 64 {
            self.timers.clear();
            let keys: Vec<Key> = self.conns.keys().copied().collect();
            for key in keys {
                if let Some(c) = self.conns.get_mut(&key) {
                    c.scheduled = None;
                }
                self.schedule(key, ctx);
            }
        }
    }
}

/// Answers a segment that no connection takes with RST (RFC 9293 3.10.7.1).
/// Logs that `c`'s connect to its destination failed, and why.
fn connect_failed(ctx: &mut Ctx, c: &TcpConn, reason: String) {
    let t = c.target;
    ctx.events.push(Event::TcpConnectFailed {
        id: c.id,
        ip: t.ip(),
        port: t.port(),
        reason,
    });
}

fn reset(ctx: &mut Ctx, seg: &Seg, key: Key, out: &mut FrameBatch) -> Result<(), DropReason> {
    let (guest, dst) = key;
    let mac = ctx.neighbour(guest.ip()).ok_or(DropReason::NoArp)?;
    let hdr = segment::reset_for(seg, guest, dst);
    let ident = ctx.next_ident();
    segment::push(out, ctx.mac, mac, ident, hdr, 0, None, |_, _| 0);
    Ok(())
}
