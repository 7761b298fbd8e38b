//! UDP NAT sessions (and the door to the DNS relay).
//!
//! A datagram from a guest opens a session keyed by (guest address, guest port, destination
//! address, destination port); each session owns one sock-side UDP socket *connected* to the real
//! destination (`sock_destination`: the host-loopback alias becomes 127.0.0.1, the virtual
//! network itself is refused). Answers go back to the guest from the address and port it wrote
//! to, the alias included. The ICMP errors the host receives about a session's datagrams (port
//! unreachable from the destination, time exceeded from a router, ...) come back to the guest
//! from their sender, and datagrams leave with the guest's TTL less one (`nat::icmp_error`). A
//! session lives `cfg.nat.udp_timeout` past its last datagram in either direction.
//!
//! Bounds: `cfg.nat.max_sessions` sessions in all and `cfg.nat.max_sessions_per_guest` per guest
//! address; past them a new flow is refused (`DropReason::Limit`) while the others go on. The
//! sessions, their limits and their idle expiry are a `session::SessionTable`, as ICMP's are.
//!
//! Reading: the driver's readiness is taken as edge-triggered. On `Readable` a socket is read
//! until it would block, but at most `READ_BUDGET` datagrams at a time so that one busy flow
//! cannot starve the rest; a socket left with data is queued and `poll_timeout` then reports
//! "due now", so `handle_timeout` reads it again. Datagrams are received into one 64 KiB buffer
//! owned here, behind room for the UDP header, and emitted from there (cut into IPv4 fragments
//! when larger than the MTU): nothing is allocated per datagram.
//!
//! UDP to the virtual host itself: port 53 is handed back to the engine for the virtual host's
//! DNS relay (`DnsQuery`), any other port gets ICMP port unreachable from the virtual host
//! (unless an inbound session is keyed to it).
//!
//! Inbound sessions (`nat::inbound`: a port forward's client) live in the same table, keyed
//! (guest, client as shown), their socket the one the runtime connected to the client. The
//! guest's datagrams to the client meet them as any session's answers do (no egress policy: the
//! operator opened the forward), and datagrams to the guest go to the MAC the forward resolved.

use std::io;
use std::net::{SocketAddr, SocketAddrV4};

use smoltcp::wire::{IpProtocol, UdpPacket, ETHERNET_HEADER_LEN, UDP_HEADER_LEN};

use crate::config::{Config, Mac};
use crate::event::Event;
use crate::nat::icmp_error::{self, Destination, Quote, SockTtl};
use crate::nat::session::{self, SessionTable};
use crate::nat::{
    is_guest_address, is_host_ip, sock_destination, Direction, DnsQuery, GuestIp, InboundRefused,
    InboundTarget, Proto, SessionInfo,
};
use crate::output::FrameBatch;
use crate::sockio::{SockEvent, SockId, SockIo, READ_BUDGET};
use crate::stats::DropReason;
use crate::time::{earliest, Instant};
use crate::vhost::icmp::{push_unreachable, Unreach};
use crate::wire::{
    emit_ip_headers, ip_header_len, push_ip_fragments, IpHeader, DNS_PORT, IPV4_HEADER_LEN,
};
use crate::Ctx;

/// Tells the guest that sent `ip` that the egress policy refuses its destination: ICMP
/// destination unreachable, administratively prohibited, from the virtual host (its router).
pub(crate) fn refuse(ctx: &mut Ctx, ip: &GuestIp, out: &mut FrameBatch) {
    let from = crate::nat::host_ip_for(ctx, ip.src);
    // Without the guest's MAC there is no one to tell; the drop is counted either way.
    let _ = push_unreachable(ctx, from, Unreach::Prohibited, ip, out);
}

/// The largest UDP payload an IPv4 datagram can carry.
pub(crate) const MAX_UDP_PAYLOAD: usize = 65535 - IPV4_HEADER_LEN - UDP_HEADER_LEN;

/// A UDP session's identity: the guest's end and the destination as the guest addressed it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub(crate) struct UdpKey {
    pub(crate) guest: SocketAddr,
    pub(crate) dst: SocketAddr,
}

/// What a UDP session keeps beyond the table's common part.
struct Datagrams {
    /// The guest's last datagram, as ICMP errors about it quote it.
    quote: Quote,
    /// The TTL the socket sends with.
    ttl: SockTtl,
    /// Where the socket sends, and the destination as the guest addressed it.
    dst: Destination,
    /// For an inbound session, the guest's MAC as the forward resolved it (datagrams to the
    /// guest go there, not to whatever the neighbour table has); `None`: the neighbour table.
    guest_mac: Option<Mac>,
    /// The forward an inbound session came through.
    forward: Option<u32>,
}

type Session = session::Session<UdpKey, Datagrams>;

/// A new session of `key` on `sock`, its datagrams sent to `dst`: nothing quoted yet, the host's
/// TTL; an inbound one (`inbound`: what its forward resolved) keeps its guest's MAC and forward.
fn new_session(
    now: Instant,
    (key, sock): (UdpKey, SockId),
    id: u32,
    direction: Direction,
    dst: Destination,
    inbound: Option<&InboundTarget>,
) -> Session {
    Session {
        key,
        sock,
        info: SessionInfo::opened(
            id,
            Proto::Udp,
            (key.guest, key.dst),
            direction,
            now,
            "Established",
        ),
        state: Datagrams {
            quote: Quote::default(),
            ttl: SockTtl::default(),
            dst,
            guest_mac: inbound.map(|t| t.guest_mac),
            forward: inbound.map(|t| t.forward),
        },
    }
}

/// The UDP side of the NAT: one session, and one connected socket, per guest flow.
pub struct UdpNat {
    table: SessionTable<UdpKey, Datagrams>,
    /// Idle expiry is run by `expire_idle` on the caller's schedule, not by `handle_timeout`.
    pub(crate) external_idle: bool,
    /// Sockets that still had data when their read budget ran out.
    rearm: Vec<SockId>,
    rearm_scratch: Vec<SockId>,
    /// Receive buffer: UDP header room, then the payload, or the payloads of a run of
    /// datagrams for one super-frame (`Run`); twice the largest, so that a datagram read behind
    /// a run always fits whole.
    buf: Box<[u8]>,
    /// See `Engine::set_batching`: guests' datagrams wait for `flush` in `pending`.
    batching: bool,
    /// Guests' datagrams held until the batch's end, at most `MAX_PENDING` sessions' runs.
    pending: Vec<Pending>,
    /// Buffers of runs sent, kept for the next ones.
    spare: Vec<Vec<u8>>,
}

/// The most datagrams one UDP_SEGMENT send carries (Linux's UDP_MAX_SEGMENTS was 64 before
/// 6.9), and one super-frame toward a guest.
const MAX_SEGMENTS: usize = 64;

/// How many sessions' runs may wait for the batch's end at once; one more sends the oldest.
const MAX_PENDING: usize = 8;

/// A session's guest datagrams held until the batch's end (`UdpNat::flush`), to leave in one
/// UDP_SEGMENT send that the host's stack cuts: what a send per datagram costs (the system
/// call, the stack's route and socket work) is paid once per run.
struct Pending {
    sock: SockId,
    held: HeldRun,
}

/// Datagrams held to leave in one UDP_SEGMENT send: a `Run` (one size, the last datagram
/// possibly shorter and then ending it), its payloads one behind the other in `payload`.
pub(crate) struct HeldRun {
    pub(crate) run: Run,
    pub(crate) payload: Vec<u8>,
}

impl HeldRun {
    /// A run of `datagram` alone, held in `buf` (a spare buffer; what it held is dropped).
    pub(crate) fn new(mut buf: Vec<u8>, datagram: &[u8]) -> HeldRun {
        buf.clear();
        buf.extend_from_slice(datagram);
        let mut run = Run::default();
        run.add(Received::of((datagram.len(), 0)));
        HeldRun { run, payload: buf }
    }

    /// Adds `datagram` to the run if it can follow the others in one send; whether it did.
    pub(crate) fn join(&mut self, datagram: &[u8]) -> bool {
        let r = Received::of((datagram.len(), 0));
        if !self.run.takes(r) {
            return false;
        }
        self.payload.extend_from_slice(datagram);
        self.run.add(r);
        true
    }
}

/// A run of datagrams of `segment` bytes but the last, which may be shorter (and then ends
/// it), at most `MAX_SEGMENTS` and `MAX_UDP_PAYLOAD` bytes: what one UDP_SEGMENT send carries
/// (`Pending`), and what one super-frame toward the guest carries (`Ctx::udp_gso`: datagrams
/// read from one session's socket into `UdpNat::buf`, one after another).
#[derive(Default)]
pub(crate) struct Run {
    pub(crate) bytes: usize,
    pub(crate) segment: usize,
    pub(crate) datagrams: usize,
}

/// What one receive gave: `len` bytes of `count` datagrams of `segment` bytes (the last may be
/// shorter; one datagram is its own segment).
#[derive(Clone, Copy)]
pub(crate) struct Received {
    len: usize,
    segment: usize,
    count: usize,
}

impl Received {
    pub(crate) fn of((len, segment): (usize, usize)) -> Received {
        if segment == 0 || segment >= len {
            return Received {
                len,
                segment: len,
                count: 1,
            };
        }
        Received {
            len,
            segment,
            count: len.div_ceil(segment),
        }
    }
}

impl Run {
    pub(crate) fn add(&mut self, r: Received) {
        if self.datagrams == 0 {
            self.segment = r.segment;
        }
        self.bytes += r.len;
        self.datagrams += r.count;
    }

    /// Whether `r` can follow the run's datagrams in one super-frame: one datagram no larger
    /// than theirs, or a run of theirs; the run not ended by a shorter one, and within bounds.
    pub(crate) fn takes(&self, r: Received) -> bool {
        let fits = if r.count == 1 {
            r.len <= self.segment
        } else {
            r.segment == self.segment
        };
        self.datagrams > 0
            && fits
            && r.len > 0
            && self.bytes.is_multiple_of(self.segment.max(1))
            && self.datagrams + r.count <= MAX_SEGMENTS
            && self.bytes + r.len <= MAX_UDP_PAYLOAD
    }
}

impl UdpNat {
    pub(crate) fn new(_cfg: &Config) -> UdpNat {
        UdpNat {
            table: SessionTable::new(),
            external_idle: false,
            rearm: Vec::new(),
            rearm_scratch: Vec::new(),
            buf: vec![0u8; UDP_HEADER_LEN + 2 * MAX_UDP_PAYLOAD].into_boxed_slice(),
            batching: false,
            pending: Vec::new(),
            spare: Vec::new(),
        }
    }

    /// See `Engine::set_batching`.
    pub(crate) fn set_batching(&mut self, on: bool) {
        self.batching = on;
    }

    /// Ends a batch: sends every run of guest datagrams still waiting.
    pub(crate) fn flush(&mut self, ctx: &mut Ctx, io: &mut impl SockIo, out: &mut FrameBatch) {
        while !self.pending.is_empty() {
            self.send_pending(0, ctx, io, out);
        }
    }

    /// Sends run `i` of `pending` and keeps its buffer.
    fn send_pending(
        &mut self,
        i: usize,
        ctx: &mut Ctx,
        io: &mut impl SockIo,
        out: &mut FrameBatch,
    ) {
        let p = self.pending.swap_remove(i);
        if let Some(s) = self
            .table
            .slot_of_sock(p.sock)
            .and_then(|slot| self.table.get_mut(slot))
        {
            let h = &p.held;
            if let Err(why) = send_datagrams(ctx, out, s, io, &h.payload, h.run.segment) {
                for _ in 0..h.run.datagrams {
                    ctx.stats.drop(why);
                }
            }
        }
        self.spare.push(p.held.payload);
    }

    /// Sends the run of `sock` waiting in `pending`, if there is one.
    fn send_pending_of(
        &mut self,
        sock: SockId,
        ctx: &mut Ctx,
        io: &mut impl SockIo,
        out: &mut FrameBatch,
    ) {
        if let Some(i) = self.pending.iter().position(|p| p.sock == sock) {
            self.send_pending(i, ctx, io, out);
        }
    }

    /// Holds `payload` (a datagram for `sock`) for the batch's end: it joins the run waiting
    /// for the socket where it can, else that run leaves now and a new one starts.
    fn defer(
        &mut self,
        sock: SockId,
        payload: &[u8],
        ctx: &mut Ctx,
        io: &mut impl SockIo,
        out: &mut FrameBatch,
    ) {
        match self.pending.iter().position(|p| p.sock == sock) {
            Some(i) if self.pending[i].held.join(payload) => return,
            Some(i) => self.send_pending(i, ctx, io, out),
            None if self.pending.len() >= MAX_PENDING => self.send_pending(0, ctx, io, out),
            None => {}
        }
        let buf = self.spare.pop().unwrap_or_default();
        self.pending.push(Pending {
            sock,
            held: HeldRun::new(buf, payload),
        });
    }

    /// NAT sessions open.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// NAT sessions of IPv6 guests.
    pub fn ipv6_len(&self) -> usize {
        self.table.ipv6_len()
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// The sock-side socket of the session `key`, if there is one.
    #[cfg(test)]
    pub(crate) fn socket_of(&self, key: &UdpKey) -> Option<SockId> {
        self.table.socket_of(key)
    }

    /// Handles a whole (reassembled) UDP datagram from a guest; a query to the virtual host's
    /// DNS port is not the NAT's to carry and comes back as a `DnsQuery`.
    pub(crate) fn handle<'a>(
        &mut self,
        now: Instant,
        ctx: &mut Ctx,
        ip: &GuestIp<'a>,
        io: &mut impl SockIo,
        out: &mut FrameBatch,
    ) -> Result<Option<DnsQuery<'a>>, DropReason> {
        let udp = UdpPacket::new_checked(ip.upper).map_err(|_| DropReason::Malformed)?;
        let (src, dst) = (ip.src, ip.dst);
        // IPv6 makes the checksum mandatory (RFC 8200 8.1): a zero one is refused with the
        // rest that do not verify; one the guest left to the port is not looked at.
        let verified = ctx.l4_checksum_left
            || (!(ip.is_v6() && udp.checksum() == 0)
                && udp.verify_checksum(&src.into(), &dst.into()));
        if !verified {
            return Err(DropReason::BadChecksum);
        }
        if udp.src_port() == 0 || udp.dst_port() == 0 {
            return Err(DropReason::Malformed);
        }
        // Only guests of the virtual network can be answered (their MACs are learned there).
        if !is_guest_address(ctx, src) {
            return Err(DropReason::Foreign);
        }
        let guest = SocketAddr::new(src, udp.src_port());
        let to = SocketAddr::new(dst, udp.dst_port());
        let key = UdpKey { guest, dst: to };
        // An inbound session may be keyed to the virtual host's own address (a client on the
        // host's loopback is shown as it): its flow goes first.
        let existing = self.table.slot(&key);
        if existing.is_none() && is_host_ip(ctx, dst) {
            if to.port() == DNS_PORT {
                return Ok(Some(DnsQuery {
                    guest,
                    server: to,
                    query: udp.payload(),
                }));
            }
            return push_unreachable(ctx, dst, Unreach::Port, ip, out).map(|()| None);
        }
        let slot = match existing {
            Some(slot) => slot,
            None => match self.open(now, ctx, key, io, (ip, out)) {
                Ok(slot) => slot,
                Err(DropReason::Policy) => {
                    refuse(ctx, ip, out);
                    return Err(DropReason::Policy);
                }
                Err(e) => return Err(e),
            },
        };
        let Some(s) = self.table.get_mut(slot) else {
            return Err(DropReason::Malformed);
        };
        s.info.last_used = now;
        s.state.quote = Quote::of(ip);
        let (sock, payload) = (s.sock, udp.payload());
        let ttl_changes = s.state.ttl.changes(ip.ttl);
        // Datagrams that fit the guest's MTU whole may wait for the batch's end; what waits
        // for this session leaves first when this one cannot join it (order within a flow is
        // kept) or when the TTL changes under it.
        let deferrable = self.batching
            && !payload.is_empty()
            && payload.len() + UDP_HEADER_LEN + ip_header_len(src) <= ctx.cfg.nat.mtu as usize;
        if !self.pending.is_empty() && (ttl_changes || !deferrable) {
            self.send_pending_of(sock, ctx, io, out);
        }
        let Some(s) = self.table.get_mut(slot) else {
            return Err(DropReason::Malformed);
        };
        s.state.ttl.follow(ip.ttl, sock, io);
        if deferrable {
            self.defer(sock, payload, ctx, io, out);
            return Ok(None);
        }
        send_datagrams(ctx, out, s, io, payload, payload.len().max(1)).map(|()| None)
    }

    /// Opens the session of `key` for the guest's datagram `ip` (told on `out` when its
    /// destination has no route).
    fn open(
        &mut self,
        now: Instant,
        ctx: &mut Ctx,
        key: UdpKey,
        io: &mut impl SockIo,
        (ip, out): (&GuestIp, &mut FrameBatch),
    ) -> Result<usize, DropReason> {
        let host_dst = sock_destination(ctx, Proto::Udp, key.guest, key.dst)?;
        let (total, per_guest) = (ctx.cfg.nat.max_sessions, ctx.cfg.nat.max_sessions_per_guest);
        if self.table.len() >= total {
            // Full: the longest idle session makes room, if it has been idle long enough.
            let timeout = ctx.cfg.nat.udp_timeout;
            if let Some(slot) = self.table.idlest(now, timeout, session::EVICT_IDLE) {
                self.close(ctx, slot, io);
                ctx.stats.evicted += 1;
            }
        }
        if self.table.full(key.guest.ip(), total, per_guest) {
            return Err(DropReason::Limit);
        }
        // The same limits counted across every worker of the runtime (a no-op with one engine),
        // and the guest's rate of new sessions.
        if !ctx.admit_session(now, Proto::Udp, key.guest.ip()) {
            return Err(DropReason::Limit);
        }
        let sock = io.udp_open_runs(host_dst).map_err(|e| {
            ctx.release_session(Proto::Udp, key.guest.ip());
            // Connecting the socket looks the route up: a guest's destination may have none.
            let quote = Quote::of(ip);
            if icmp_error::report_send_error(ctx, out, &e, quote.bytes(), None) {
                return DropReason::NoRoute;
            }
            tracing::warn!("UDP socket to {host_dst} could not be opened: {e}");
            DropReason::Limit
        })?;
        let id = ctx.next_session_id();
        ctx.events.push(Event::SessionCreated {
            proto: Proto::Udp,
            id,
            src: key.guest,
            dst: key.dst,
        });
        let dst = Destination {
            host: host_dst.ip(),
            shown: key.dst.ip(),
        };
        let session = new_session(now, (key, sock), id, Direction::Out, dst, None);
        Ok(self.table.insert(session, now + ctx.cfg.nat.udp_timeout))
    }

    /// A datagram a forward took from `client` (as the guest is shown it) for `target`, on
    /// `sock`, connected to the client: a new inbound session with `sock` as its socket, the
    /// payload sent to the guest at once. A session of the same pair already there (the
    /// datagram raced the connected socket's creation) carries the payload instead, and `sock`
    /// is closed. On `Err` the caller closes `sock`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn inbound(
        &mut self,
        now: Instant,
        ctx: &mut Ctx,
        sock: SockId,
        (client, shown): (SocketAddrV4, SocketAddrV4),
        target: InboundTarget,
        payload: &[u8],
        io: &mut impl SockIo,
        out: &mut FrameBatch,
    ) -> Result<(), InboundRefused> {
        let key = UdpKey {
            guest: target.guest.into(),
            dst: shown.into(),
        };
        let slot = match self.table.slot(&key) {
            Some(slot) => {
                if self.table.get(slot).is_some_and(|s| s.sock != sock) {
                    io.close(sock);
                }
                slot
            }
            None => self.open_inbound(now, ctx, key, (sock, client), target, io)?,
        };
        let Some(s) = self.table.get_mut(slot) else {
            return Ok(());
        };
        let len = payload.len().min(MAX_UDP_PAYLOAD);
        self.buf[UDP_HEADER_LEN..][..len].copy_from_slice(&payload[..len]);
        s.info.last_used = now;
        s.info.packets_to_guest += 1;
        s.info.bytes_to_guest += len as u64;
        let (from, to, mac) = (s.key.dst, s.key.guest, s.state.guest_mac);
        if let Err(why) = send_to_guest_via(ctx, out, &mut self.buf, len, from, to, mac) {
            ctx.stats.drop(why);
        }
        Ok(())
    }

    fn open_inbound(
        &mut self,
        now: Instant,
        ctx: &mut Ctx,
        key: UdpKey,
        (sock, client): (SockId, SocketAddrV4),
        target: InboundTarget,
        io: &mut impl SockIo,
    ) -> Result<usize, InboundRefused> {
        let (total, per_guest) = (ctx.cfg.nat.max_sessions, ctx.cfg.nat.max_sessions_per_guest);
        let guest = key.guest.ip();
        if self.table.len() >= total {
            let timeout = ctx.cfg.nat.udp_timeout;
            if let Some(slot) = self.table.idlest(now, timeout, session::EVICT_IDLE) {
                self.close(ctx, slot, io);
                ctx.stats.evicted += 1;
            }
        }
        if self.table.full(guest, total, per_guest) || !ctx.admit_session(now, Proto::Udp, guest) {
            return Err(InboundRefused::Limit);
        }
        let id = ctx.next_session_id();
        ctx.events.push(Event::InboundSessionCreated {
            proto: Proto::Udp,
            id,
            src: key.dst,
            dst: key.guest,
        });
        let dst = Destination {
            host: (*client.ip()).into(),
            shown: key.dst.ip(),
        };
        let session = new_session(now, (key, sock), id, Direction::In, dst, Some(&target));
        Ok(self.table.insert(session, now + ctx.cfg.nat.udp_timeout))
    }

    fn close(&mut self, ctx: &mut Ctx, slot: usize, io: &mut impl SockIo) {
        let Some(s) = self.table.remove(slot) else {
            return;
        };
        // A session with datagrams waiting is not idle: only a shutdown or a forward's end
        // closes one, and its datagrams go with it.
        if let Some(i) = self.pending.iter().position(|p| p.sock == s.sock) {
            let p = self.pending.swap_remove(i);
            self.spare.push(p.held.payload);
        }
        ctx.release_session(Proto::Udp, s.key.guest.ip());
        io.close(s.sock);
        ctx.events.push(Event::SessionDeleted {
            proto: Proto::Udp,
            id: s.info.id,
        });
    }

    /// The forward `forward` is gone: its sessions end with their sockets.
    pub(crate) fn close_forward(
        &mut self,
        ctx: &mut Ctx,
        forward: u32,
        io: &mut impl SockIo,
    ) -> usize {
        let mut n = 0;
        for slot in 0..self.table.slot_count() {
            if self
                .table
                .get_mut(slot)
                .is_some_and(|s| s.state.forward == Some(forward))
            {
                self.close(ctx, slot, io);
                n += 1;
            }
        }
        n
    }

    /// Shutdown: closes every session's socket and the DNS relay's upstream sockets.
    pub(crate) fn close_all(&mut self, ctx: &mut Ctx, io: &mut impl SockIo) {
        for slot in 0..self.table.slot_count() {
            self.close(ctx, slot, io);
        }
        self.rearm.clear();
    }

    /// Reads session `slot`'s socket up to the budget; true when data may remain. Where the
    /// port takes UDP super-frames, datagrams of one size that fit the guest's MTU whole are
    /// read one behind the other (`Run`) and leave as one frame.
    fn read_session(
        &mut self,
        now: Instant,
        ctx: &mut Ctx,
        slot: usize,
        io: &mut impl SockIo,
        out: &mut FrameBatch,
    ) -> bool {
        let Some(s) = self.table.get_mut(slot) else {
            return false;
        };
        let (from, to, mac) = (s.key.dst, s.key.guest, s.state.guest_mac);
        let whole = (ctx.cfg.nat.mtu as usize)
            .saturating_sub(UDP_HEADER_LEN + ip_header_len(from.ip()))
            .min(usize::from(u16::MAX));
        let gso = ctx.udp_gso;
        let mut run = Run::default();
        // A socket error with nothing behind it, twice in a row: give up on this round rather
        // than spin on it.
        let mut stalled = false;
        let mut more = true;
        for _ in 0..READ_BUDGET {
            let at = UDP_HEADER_LEN + run.bytes;
            match io.udp_recv_segments(s.sock, &mut self.buf[at..at + MAX_UDP_PAYLOAD]) {
                Ok(got) => {
                    stalled = false;
                    let r = Received::of(got);
                    s.info.last_used = now;
                    s.info.packets_to_guest += r.count as u64;
                    s.info.bytes_to_guest += r.len as u64;
                    let joins = gso && r.len > 0 && r.segment <= whole;
                    if joins && (run.datagrams == 0 || run.takes(r)) {
                        run.add(r);
                        continue;
                    }
                    // It cannot join the run: the run leaves first, and it takes its place.
                    if run.datagrams > 0 {
                        send_run(ctx, out, &mut self.buf, &run, (from, to, mac));
                        self.buf.copy_within(at..at + r.len, UDP_HEADER_LEN);
                        run = Run::default();
                    }
                    if joins {
                        run.add(r);
                        continue;
                    }
                    // Datagram by datagram, each header written over the tail of the one
                    // before it, which has left.
                    for k in 0..r.count {
                        let off = k * r.segment;
                        let n = r.segment.min(r.len - off);
                        let buf = &mut self.buf[off..];
                        if let Err(why) = send_to_guest_via(ctx, out, buf, n, from, to, mac) {
                            ctx.stats.drop(why);
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    more = false;
                    break;
                }
                // The socket's pending error: the ICMP errors behind it wait in its error queue.
                Err(e) => {
                    if run.datagrams > 0 {
                        send_run(ctx, out, &mut self.buf, &run, (from, to, mac));
                        run = Run::default();
                    }
                    if relay_errors(ctx, out, s, io) > 0 {
                        stalled = false;
                    } else if e.kind() == io::ErrorKind::ConnectionRefused {
                        reflect_refused(ctx, out, s);
                    } else if std::mem::replace(&mut stalled, true) {
                        tracing::debug!("UDP session {}: receive failed: {e}", s.info.id);
                        more = false;
                        break;
                    }
                }
            }
        }
        if run.datagrams > 0 {
            send_run(ctx, out, &mut self.buf, &run, (from, to, mac));
        }
        more
    }

    fn read_socket(
        &mut self,
        now: Instant,
        ctx: &mut Ctx,
        sock: SockId,
        io: &mut impl SockIo,
        out: &mut FrameBatch,
    ) -> bool {
        let more = if let Some(slot) = self.table.slot_of_sock(sock) {
            self.read_session(now, ctx, slot, io, out)
        } else {
            return false;
        };
        if more && !self.rearm.contains(&sock) {
            self.rearm.push(sock);
        }
        true
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
        match ev {
            SockEvent::Readable(sock) => {
                if self.read_socket(now, ctx, sock, io, out) {
                    None
                } else {
                    Some(ev)
                }
            }
            SockEvent::Failed(sock, kind) => {
                if let Some(slot) = self.table.slot_of_sock(sock) {
                    if let Some(s) = self.table.get(slot) {
                        if relay_errors(ctx, out, s, io) == 0
                            && kind == io::ErrorKind::ConnectionRefused
                        {
                            reflect_refused(ctx, out, s);
                        }
                    }
                    None
                } else {
                    Some(ev)
                }
            }
            // Datagrams are sent at once or dropped: writability is of no interest.
            SockEvent::Writable(sock) if self.table.owns(sock) => None,
            _ => Some(ev),
        }
    }

    pub(crate) fn sessions(&self, into: &mut Vec<SessionInfo>) {
        self.table.sessions(into);
    }

    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        let due_now = (!self.rearm.is_empty()).then_some(Instant::ZERO);
        let idle = self.table.next_deadline();
        earliest(due_now, idle.filter(|_| !self.external_idle))
    }

    pub(crate) fn handle_timeout(
        &mut self,
        now: Instant,
        ctx: &mut Ctx,
        io: &mut impl SockIo,
        out: &mut FrameBatch,
    ) {
        std::mem::swap(&mut self.rearm, &mut self.rearm_scratch);
        let mut list = std::mem::take(&mut self.rearm_scratch);
        for sock in list.drain(..) {
            self.read_socket(now, ctx, sock, io, out);
        }
        self.rearm_scratch = list;

        if !self.external_idle {
            self.expire_idle(now, ctx, io);
        }
    }

    /// Every session's idle deadline again from `ctx`'s `nat.udp_timeout` (a reload that
    /// shortened it must not wait for the deadlines the longer one set).
    pub(crate) fn reschedule_all(&mut self, ctx: &Ctx) {
        self.table.reschedule(ctx.cfg.nat.udp_timeout);
    }

    /// Closes the sessions idle for `nat.udp_timeout` at `now`.
    pub(crate) fn expire_idle(&mut self, now: Instant, ctx: &mut Ctx, io: &mut impl SockIo) {
        let timeout = ctx.cfg.nat.udp_timeout;
        while let Some(slot) = self.table.next_expired(now, timeout) {
            self.close(ctx, slot, io);
        }
    }
}

/// Sends a UDP datagram to a guest, from `from` (the address and port the guest wrote to).
/// `buf[UDP_HEADER_LEN..][..len]` holds the payload; the header is written in front of it, and a
/// datagram larger than the MTU leaves in fragments.
pub(crate) fn send_to_guest(
    ctx: &mut Ctx,
    out: &mut FrameBatch,
    buf: &mut [u8],
    len: usize,
    from: SocketAddr,
    to: SocketAddr,
) -> Result<(), DropReason> {
    send_to_guest_via(ctx, out, buf, len, from, to, None)
}

/// `send_to_guest` to the guest's MAC `mac`, or where the neighbour table says with `None`.
fn send_to_guest_via(
    ctx: &mut Ctx,
    out: &mut FrameBatch,
    buf: &mut [u8],
    len: usize,
    from: SocketAddr,
    to: SocketAddr,
    mac: Option<Mac>,
) -> Result<(), DropReason> {
    let dst_mac = match mac {
        Some(m) => m,
        None => ctx.neighbour(to.ip()).ok_or(DropReason::NoArp)?,
    };
    let len = len.min(MAX_UDP_PAYLOAD);
    let datagram = &mut buf[..UDP_HEADER_LEN + len];
    let mut udp = UdpPacket::new_unchecked(&mut datagram[..]);
    udp.set_src_port(from.port());
    udp.set_dst_port(to.port());
    udp.set_len((UDP_HEADER_LEN + len) as u16);
    udp.set_checksum(0);
    udp.fill_checksum(&from.ip().into(), &to.ip().into());
    let h = IpHeader::new(from.ip(), to.ip(), IpProtocol::Udp, ctx.next_ident());
    push_ip_fragments(
        out,
        ctx.mac,
        dst_mac,
        &h,
        datagram,
        ctx.cfg.nat.mtu as usize,
    );
    Ok(())
}

/// Sends the datagrams of `run` (their payloads one behind the other in
/// `buf[UDP_HEADER_LEN..]`) to a guest: one alone as `send_to_guest_via` does, more as one
/// super-frame marked with their size, its UDP length the whole payload's and its checksum
/// field holding only the pseudo-header's sum, as a NIC's USO takes it. The guest's side of
/// the port cuts it into the datagrams, each with its own header and checksum.
pub(crate) fn send_run(
    ctx: &mut Ctx,
    out: &mut FrameBatch,
    buf: &mut [u8],
    run: &Run,
    (from, to, mac): (SocketAddr, SocketAddr, Option<Mac>),
) {
    let sent = if run.datagrams < 2 {
        send_to_guest_via(ctx, out, buf, run.bytes, from, to, mac)
    } else {
        send_super_frame(
            ctx,
            out,
            &buf[..UDP_HEADER_LEN + run.bytes],
            run.segment,
            (from, to, mac),
        )
    };
    if let Err(why) = sent {
        for _ in 0..run.datagrams {
            ctx.stats.drop(why);
        }
    }
}

fn send_super_frame(
    ctx: &mut Ctx,
    out: &mut FrameBatch,
    datagram: &[u8],
    segment: usize,
    (from, to, mac): (SocketAddr, SocketAddr, Option<Mac>),
) -> Result<(), DropReason> {
    let dst_mac = match mac {
        Some(m) => m,
        None => ctx.neighbour(to.ip()).ok_or(DropReason::NoArp)?,
    };
    let h = IpHeader::new(from.ip(), to.ip(), IpProtocol::Udp, ctx.next_ident());
    let l4 = ETHERNET_HEADER_LEN + h.len();
    let len = datagram.len();
    out.push_with(l4 + len, |frame| {
        emit_ip_headers(frame, ctx.mac, dst_mac, &h, len);
        let udp = &mut frame[l4..];
        udp[UDP_HEADER_LEN..].copy_from_slice(&datagram[UDP_HEADER_LEN..]);
        udp[0..2].copy_from_slice(&from.port().to_be_bytes());
        udp[2..4].copy_from_slice(&to.port().to_be_bytes());
        udp[4..6].copy_from_slice(&(len as u16).to_be_bytes());
        udp[6..8].copy_from_slice(&h.pseudo_sum(len).to_be_bytes());
    });
    out.set_gso_last(segment as u16);
    Ok(())
}

/// Sends a guest's datagrams on session `s`'s socket: `payload` cut into datagrams of `segment`
/// bytes (one datagram when it is no longer). The ICMP errors the socket was holding are
/// relayed to the guest; an error that stops the send says why the datagrams were dropped.
fn send_datagrams(
    ctx: &mut Ctx,
    out: &mut FrameBatch,
    s: &mut Session,
    io: &mut impl SockIo,
    payload: &[u8],
    segment: usize,
) -> Result<(), DropReason> {
    let send = |io: &mut _| {
        if payload.len() > segment {
            SockIo::udp_send_segments(io, s.sock, payload, segment)
        } else {
            SockIo::udp_send(io, s.sock, payload)
        }
    };
    let mut sent = send(io);
    if let Err(e) = &sent {
        // An ICMP error about an earlier datagram surfaces on the send that follows it (the
        // socket's pending error), which then sent nothing: relay it, and send again.
        if e.kind() != io::ErrorKind::WouldBlock && relay_errors(ctx, out, s, io) > 0 {
            sent = send(io);
        }
    }
    match sent {
        Ok(_) => {
            s.info.packets_to_host += payload.len().div_ceil(segment).max(1) as u64;
            s.info.bytes_to_host += payload.len() as u64;
            Ok(())
        }
        Err(e) => {
            let mac = s.state.guest_mac;
            if icmp_error::report_send_error(ctx, out, &e, s.state.quote.bytes(), mac) {
                return Err(DropReason::NoRoute);
            }
            if e.kind() == io::ErrorKind::ConnectionRefused {
                // A port unreachable the socket could not say more about.
                reflect_refused(ctx, out, s);
                return Ok(());
            }
            tracing::debug!("UDP session {}: send failed: {e}", s.info.id);
            Err(DropReason::QueueFull)
        }
    }
}

/// Relays the ICMP errors queued on session `s`'s socket to its guest; how many there were.
fn relay_errors(ctx: &mut Ctx, out: &mut FrameBatch, s: &Session, io: &mut impl SockIo) -> usize {
    let mut n = 0;
    // Bounded: the queue is the socket's, and its receive buffer bounds it.
    while n < READ_BUDGET {
        let Ok(err) = io.recv_error(s.sock) else {
            break;
        };
        n += 1;
        let (quote, dst, mac) = (&s.state.quote, s.state.dst, s.state.guest_mac);
        if let Err(why) = icmp_error::relay(ctx, out, &err, quote, dst, mac) {
            ctx.stats.drop(why);
        }
    }
    n
}

/// The destination answered the session's last datagram with port unreachable, and the socket
/// had nothing more to say of it: tell the guest, from the destination.
fn reflect_refused(ctx: &mut Ctx, out: &mut FrameBatch, s: &Session) {
    let err = icmp_error::port_unreachable(s.state.dst.host);
    let (quote, dst, mac) = (&s.state.quote, s.state.dst, s.state.guest_mac);
    if let Err(why) = icmp_error::relay(ctx, out, &err, quote, dst, mac) {
        ctx.stats.drop(why);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{SimSocket, SimSockets};
    use crate::testing::*;
    use smoltcp::wire::Ipv4Packet;
    use smoltcp::wire::{Icmpv4Message, Icmpv4Packet};
    use std::net::Ipv4Addr;
    use std::time::Duration;

    fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(ip, port)
    }

    fn udp_ids(h: &SimSockets) -> Vec<SockId> {
        h.ids(|s| matches!(s, SimSocket::Udp(_)))
    }

    #[test]
    fn session_carries_both_ways_and_expires() {
        let (mut e, mut h, mut out) = setup();
        let (g, d) = (sa(GUEST_IP, 5000), sa(REMOTE_IP, 7000));
        e.handle_frame(T0, &udp_frame(g, d, b"ping"), &mut h, &mut out);
        assert!(out.is_empty());
        let ids = udp_ids(&h);
        assert_eq!(ids.len(), 1);
        let sock = ids[0];
        assert_eq!(h.udp(sock).unwrap().dst, std::net::SocketAddr::from(d));
        assert_eq!(h.udp(sock).unwrap().sent, vec![b"ping".to_vec()]);
        // The same flow reuses the session.
        e.handle_frame(T0, &udp_frame(g, d, b"again"), &mut h, &mut out);
        assert_eq!(udp_ids(&h).len(), 1);

        h.deliver_udp(sock, b"pong");
        pump(&mut e, &mut h, &mut out, T0);
        let p = packets(&out);
        assert_eq!(p.len(), 1);
        assert_eq!(parse_udp(&p[0]), (d, g, b"pong".to_vec()));

        let rows = e.sessions();
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!((r.proto, r.guest, r.dst), (Proto::Udp, g.into(), d.into()));
        assert_eq!((r.packets_to_host, r.bytes_to_host), (2, 9));
        assert_eq!((r.packets_to_guest, r.bytes_to_guest), (1, 4));

        // Traffic toward the guest at T0+100 s pushes expiry to T0+700 s.
        let timeout = e.config().nat.udp_timeout;
        let t1 = T0 + Duration::from_secs(100);
        h.deliver_udp(sock, b"late");
        pump(&mut e, &mut h, &mut out, t1);
        let due = e.poll_timeout().unwrap();
        assert_eq!(due, T0 + timeout);
        e.handle_timeout(due, &mut h, &mut out);
        assert_eq!(e.nat.udp.len(), 1);
        assert_eq!(e.poll_timeout(), Some(t1 + timeout));
        e.handle_timeout(t1 + timeout, &mut h, &mut out);
        assert!(e.nat.udp.is_empty());
        assert_eq!(h.closed, vec![sock]);
        assert_eq!(e.poll_timeout(), None);
        assert!(e.sessions().is_empty());
        let id = r.id;
        assert_eq!(
            std::iter::from_fn(|| e.poll_event()).collect::<Vec<_>>(),
            vec![
                Event::SessionCreated {
                    proto: Proto::Udp,
                    id,
                    src: std::net::SocketAddr::from(g),
                    dst: std::net::SocketAddr::from(d)
                },
                Event::SessionDeleted {
                    proto: Proto::Udp,
                    id
                },
            ]
        );
        assert_eq!(e.events_lost(), 0);
    }

    #[test]
    fn limits_refuse_new_sessions_only() {
        let (mut e, mut h, mut out) = setup_with(|c| {
            c.nat.max_sessions = 3;
            c.nat.max_sessions_per_guest = 2;
        });
        let d = sa(REMOTE_IP, 53);
        for port in [1001, 1002, 1003] {
            e.handle_frame(
                T0,
                &udp_frame(sa(GUEST_IP, port), d, b"x"),
                &mut h,
                &mut out,
            );
        }
        // Per guest: the third is refused.
        assert_eq!(e.nat.udp.len(), 2);
        assert_eq!(e.stats().drops_of(DropReason::Limit), 1);
        e.handle_frame(T0, &udp_frame(sa(GUEST2_IP, 1), d, b"x"), &mut h, &mut out);
        // Global: the fourth is refused even for another guest.
        e.handle_frame(T0, &udp_frame(sa(GUEST2_IP, 2), d, b"x"), &mut h, &mut out);
        assert_eq!(e.nat.udp.len(), 3);
        assert_eq!(e.stats().drops_of(DropReason::Limit), 2);
        // The earlier sessions still work both ways.
        e.handle_frame(
            T0,
            &udp_frame(sa(GUEST_IP, 1001), d, b"y"),
            &mut h,
            &mut out,
        );
        let key = UdpKey {
            guest: std::net::SocketAddr::from(sa(GUEST_IP, 1001)),
            dst: std::net::SocketAddr::from(d),
        };
        let sock = e.nat.udp.socket_of(&key).unwrap();
        assert_eq!(h.udp(sock).unwrap().sent.len(), 2);
        h.deliver_udp(sock, b"z");
        pump(&mut e, &mut h, &mut out, T0);
        assert_eq!(out.len(), 1);
        assert_eq!(e.stats().drops_of(DropReason::Limit), 2);
    }

    #[test]
    fn port_unreachable_is_reflected_from_the_destination() {
        let (mut e, mut h, mut out) = setup();
        let (g, d) = (sa(GUEST_IP, 5000), sa(REMOTE_IP, 9));
        e.handle_frame(T0, &udp_frame(g, d, b"hello"), &mut h, &mut out);
        let sock = udp_ids(&h)[0];
        h.refuse_udp(sock);
        pump(&mut e, &mut h, &mut out, T0);
        let p = packets(&out);
        assert_eq!(p.len(), 1);
        let ip = Ipv4Packet::new_checked(&p[0][..]).unwrap();
        assert_eq!((ip.src_addr(), ip.dst_addr()), (REMOTE_IP, GUEST_IP));
        let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
        assert!(icmp.verify_checksum());
        assert_eq!(icmp.msg_type(), Icmpv4Message::DstUnreachable);
        assert_eq!(icmp.msg_code(), 3);
        let quoted = Ipv4Packet::new_unchecked(icmp.data());
        assert_eq!(
            (quoted.src_addr(), quoted.dst_addr()),
            (GUEST_IP, REMOTE_IP)
        );
        assert_eq!(quoted.total_len(), 20 + 8 + 5);
        let qudp = UdpPacket::new_unchecked(&icmp.data()[20..]);
        assert_eq!((qudp.src_port(), qudp.dst_port()), (5000, 9));
    }

    #[test]
    fn host_ip_other_port_gets_port_unreachable() {
        let (mut e, mut h, mut out) = setup();
        let frame = udp_frame(sa(GUEST_IP, 5000), sa(HOST_IP, 8080), b"hi");
        e.handle_frame(T0, &frame, &mut h, &mut out);
        let p = packets(&out);
        assert_eq!(p.len(), 1);
        let ip = Ipv4Packet::new_checked(&p[0][..]).unwrap();
        assert_eq!(ip.src_addr(), HOST_IP);
        let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
        assert_eq!(icmp.msg_type(), Icmpv4Message::DstUnreachable);
        assert_eq!(icmp.msg_code(), 3);
        assert!(udp_ids(&h).is_empty());
    }

    #[test]
    fn destinations_in_the_virtual_network_are_refused() {
        let (mut e, mut h, mut out) = setup();
        for dst in [
            Ipv4Addr::new(192, 168, 30, 50),
            Ipv4Addr::new(192, 168, 30, 255),
            Ipv4Addr::new(255, 255, 255, 255),
            Ipv4Addr::new(224, 0, 0, 251),
        ] {
            e.handle_frame(
                T0,
                &udp_frame(sa(GUEST_IP, 1), sa(dst, 9), b"x"),
                &mut h,
                &mut out,
            );
        }
        assert_eq!(e.stats().drops_of(DropReason::Loop), 4);
        assert!(udp_ids(&h).is_empty());
        assert!(out.is_empty());
    }

    #[test]
    fn host_loopback_alias_maps_to_localhost_and_replies_from_the_alias() {
        let alias = Ipv4Addr::new(192, 168, 30, 2);
        let (mut e, mut h, mut out) = setup_with(|c| c.nat.host_loopback = Some(alias));
        let (g, d) = (sa(GUEST_IP, 5000), sa(alias, 8053));
        e.handle_frame(T0, &udp_frame(g, d, b"q"), &mut h, &mut out);
        let sock = udp_ids(&h)[0];
        assert_eq!(
            h.udp(sock).unwrap().dst,
            std::net::SocketAddr::from(sa(Ipv4Addr::LOCALHOST, 8053))
        );
        h.deliver_udp(sock, b"a");
        pump(&mut e, &mut h, &mut out, T0);
        assert_eq!(parse_udp(&packets(&out)[0]), (d, g, b"a".to_vec()));
    }

    #[test]
    fn large_answers_are_fragmented() {
        let (mut e, mut h, mut out) = setup();
        let (g, d) = (sa(GUEST_IP, 5000), sa(REMOTE_IP, 7000));
        e.handle_frame(T0, &udp_frame(g, d, b"get"), &mut h, &mut out);
        let sock = udp_ids(&h)[0];
        let big: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
        h.deliver_udp(sock, &big);
        pump(&mut e, &mut h, &mut out, T0);
        let p = packets(&out);
        assert_eq!(p.len(), 4);
        let joined = join_fragments(&p);
        let udp = UdpPacket::new_checked(&joined[..]).unwrap();
        assert!(udp.verify_checksum(&REMOTE_IP.into(), &GUEST_IP.into()));
        assert_eq!(udp.payload(), &big[..]);
    }

    #[test]
    fn busy_socket_is_read_in_bounded_rounds() {
        let (mut e, mut h, mut out) = setup();
        let (g, d) = (sa(GUEST_IP, 5000), sa(REMOTE_IP, 7000));
        e.handle_frame(T0, &udp_frame(g, d, b"go"), &mut h, &mut out);
        let sock = udp_ids(&h)[0];
        for i in 0..(READ_BUDGET + 10) {
            h.udp(sock).unwrap().inbox.push_back(Ok(vec![i as u8]));
        }
        // One edge for all of them.
        e.handle_host_event(T0, readable(sock), &mut h, &mut out);
        assert_eq!(out.len(), READ_BUDGET);
        assert_eq!(e.poll_timeout(), Some(Instant::ZERO));
        e.handle_timeout(T0, &mut h, &mut out);
        assert_eq!(out.len(), READ_BUDGET + 10);
        assert_ne!(e.poll_timeout(), Some(Instant::ZERO));
    }

    #[test]
    fn with_batching_a_guests_datagrams_leave_in_runs_in_order() {
        let (mut e, mut h, mut out) = setup();
        e.set_batching(true);
        let (g, d) = (sa(GUEST_IP, 5000), sa(REMOTE_IP, 7000));
        let datagram = |n: usize, fill: u8| vec![fill; n];
        let mut want = Vec::new();
        // Five of 100 bytes and a shorter one (which ends the run), then three more.
        for (i, n) in [100, 100, 100, 100, 100, 60, 100, 100, 100]
            .into_iter()
            .enumerate()
        {
            let p = datagram(n, i as u8);
            e.handle_frame(T0, &udp_frame(g, d, &p), &mut h, &mut out);
            want.push(p);
        }
        let sock = udp_ids(&h)[0];
        // The first run left when the seventh could not join it; the second waits.
        assert_eq!(h.udp(sock).unwrap().sends, vec![6]);
        e.flush(T0, &mut h, &mut out);
        assert_eq!(h.udp(sock).unwrap().sends, vec![6, 3]);
        assert_eq!(h.udp(sock).unwrap().sent, want);
        assert_eq!(e.sessions()[0].packets_to_host, 9);

        // A larger datagram ends a run (sent first), one past the MTU leaves alone, a TTL
        // change sends what was held at the old one first.
        let before = want.len();
        for p in [datagram(50, 1), datagram(80, 2), datagram(2000, 3)] {
            e.handle_frame(T0, &udp_frame(g, d, &p), &mut h, &mut out);
            want.push(p);
        }
        let p = datagram(80, 4);
        e.handle_frame(T0, &udp_frame(g, d, &p), &mut h, &mut out);
        want.push(p);
        let p = datagram(80, 5);
        e.handle_frame(T0, &with_ttl(udp_frame(g, d, &p), 5), &mut h, &mut out);
        want.push(p);
        e.flush(T0, &mut h, &mut out);
        let u = h.udp(sock).unwrap();
        assert_eq!(u.sends[2..], [1, 1, 1, 1, 1]);
        assert_eq!(u.sent[before..], want[before..]);
        assert_eq!(u.ttl, Some(4));
    }

    #[test]
    fn with_batching_sessions_interleaved_keep_their_own_runs() {
        let (mut e, mut h, mut out) = setup();
        e.set_batching(true);
        let d = sa(REMOTE_IP, 7000);
        let (g1, g2) = (sa(GUEST_IP, 5000), sa(GUEST_IP, 5001));
        for i in 0..10u8 {
            let g = if i % 2 == 0 { g1 } else { g2 };
            e.handle_frame(T0, &udp_frame(g, d, &[i; 64]), &mut h, &mut out);
        }
        e.flush(T0, &mut h, &mut out);
        for (sock, first) in udp_ids(&h).into_iter().zip([0u8, 1]) {
            let u = h.udp(sock).unwrap();
            assert_eq!(u.sends, vec![5]);
            let firsts: Vec<u8> = u.sent.iter().map(|p| p[0]).collect();
            assert_eq!(firsts, (0..5).map(|k| first + 2 * k).collect::<Vec<_>>());
        }
    }

    #[test]
    fn toward_a_port_that_cuts_datagrams_runs_leave_as_super_frames() {
        let (mut e, mut h, mut out) = setup();
        e.ctx.udp_gso = true;
        let (g, d) = (sa(GUEST_IP, 5000), sa(REMOTE_IP, 7000));
        e.handle_frame(T0, &udp_frame(g, d, b"go"), &mut h, &mut out);
        let sock = udp_ids(&h)[0];
        let mut run = Vec::new();
        for i in 0..5u8 {
            h.udp(sock).unwrap().inbox.push_back(Ok(vec![i; 200]));
            run.push(vec![i; 200]);
        }
        // A shorter one ends the run; a larger one starts another (alone: sent plain); one
        // larger than the MTU leaves in fragments.
        h.udp(sock).unwrap().inbox.push_back(Ok(vec![9; 50]));
        run.push(vec![9; 50]);
        h.deliver_udp(sock, &[8; 300]);
        let big: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        h.deliver_udp(sock, &big);
        pump(&mut e, &mut h, &mut out, T0);
        let frames: Vec<(Vec<u8>, u16)> = out.iter_gso().map(|(f, g)| (f.to_vec(), g)).collect();
        assert_eq!(frames.len(), 1 + 1 + 3);
        let (sup, size) = &frames[0];
        assert_eq!(*size, 200);
        assert!(crate::wire::gso::partial_checksum_holds(sup));
        let mut cut = Vec::new();
        crate::wire::gso::cut(sup, *size, |f| cut.push(f[ETHERNET_HEADER_LEN..].to_vec())).unwrap();
        let got: Vec<Vec<u8>> = cut.iter().map(|p| parse_udp(p).2).collect();
        assert_eq!(got, run);
        assert!(cut
            .iter()
            .all(|p| parse_udp(p).0 == d && parse_udp(p).1 == g));
        assert_eq!(frames[1].1, 0);
        assert_eq!(
            parse_udp(&frames[1].0[ETHERNET_HEADER_LEN..]).2,
            vec![8; 300]
        );
        let p = packets(&out);
        assert_eq!(join_fragments(&p[2..])[8..], big[..]);
        assert!(frames[2..].iter().all(|(_, g)| *g == 0));
        assert_eq!(e.sessions()[0].packets_to_guest, 8);
    }

    #[test]
    fn runs_the_host_hands_over_as_one_reach_the_guest_whole_or_datagram_by_datagram() {
        for gso in [true, false] {
            let (mut e, mut h, mut out) = setup();
            e.ctx.udp_gso = gso;
            let (g, d) = (sa(GUEST_IP, 5000), sa(REMOTE_IP, 7000));
            e.handle_frame(T0, &udp_frame(g, d, b"go"), &mut h, &mut out);
            let sock = udp_ids(&h)[0];
            h.udp(sock).unwrap().gro = true;
            // A run of 10 (the last shorter), then one larger datagram: two receives.
            let mut sent: Vec<Vec<u8>> = (0..9u8).map(|i| vec![i; 300]).collect();
            sent.push(vec![9; 120]);
            sent.push(vec![10; 400]);
            for p in &sent {
                h.deliver_udp(sock, p);
            }
            pump(&mut e, &mut h, &mut out, T0);
            let mut got = Vec::new();
            for (f, size) in out.iter_gso() {
                if size == 0 {
                    got.push(parse_udp(&f[ETHERNET_HEADER_LEN..]).2);
                } else {
                    crate::wire::gso::cut(f, size, |c| {
                        got.push(parse_udp(&c[ETHERNET_HEADER_LEN..]).2)
                    })
                    .unwrap();
                }
            }
            assert_eq!(got, sent, "gso {gso}");
            let frames = out.len();
            assert_eq!(frames, if gso { 2 } else { 11 }, "gso {gso}");
            assert_eq!(e.sessions()[0].packets_to_guest, 11);
        }
    }

    #[test]
    fn malformed_datagrams_are_counted() {
        let (mut e, mut h, mut out) = setup();
        let (g, d) = (sa(GUEST_IP, 5000), sa(REMOTE_IP, 7000));
        // Truncated UDP header.
        let f = ipv4_frame(
            GUEST_IP,
            REMOTE_IP,
            IpProtocol::Udp,
            1,
            0,
            false,
            &[0x13, 0x88, 0],
        );
        e.handle_frame(T0, &f, &mut h, &mut out);
        assert_eq!(e.stats().drops_of(DropReason::Malformed), 1);
        // Length field larger than the packet.
        let mut f = udp_frame(g, d, b"abcd");
        f[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&100u16.to_be_bytes());
        e.handle_frame(T0, &f, &mut h, &mut out);
        assert_eq!(e.stats().drops_of(DropReason::Malformed), 2);
        // Length field smaller than the header.
        let mut f = udp_frame(g, d, b"abcd");
        f[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&4u16.to_be_bytes());
        e.handle_frame(T0, &f, &mut h, &mut out);
        assert_eq!(e.stats().drops_of(DropReason::Malformed), 3);
        // Bad checksum.
        let mut f = udp_frame(g, d, b"abcd");
        let n = f.len();
        f[n - 1] ^= 0xff;
        e.handle_frame(T0, &f, &mut h, &mut out);
        assert_eq!(e.stats().drops_of(DropReason::BadChecksum), 1);
        // A zero checksum means "none" and is accepted.
        let mut f = udp_frame(g, d, b"abcd");
        f[14 + 20 + 6..14 + 20 + 8].copy_from_slice(&[0, 0]);
        e.handle_frame(T0, &f, &mut h, &mut out);
        // Port 0.
        e.handle_frame(T0, &udp_frame(sa(GUEST_IP, 0), d, b"x"), &mut h, &mut out);
        assert_eq!(e.stats().drops_of(DropReason::Malformed), 4);
        let ids = udp_ids(&h);
        assert_eq!(ids.len(), 1);
        assert_eq!(h.udp(ids[0]).unwrap().sent, vec![b"abcd".to_vec()]);
        assert!(out.is_empty());
    }

    // ---- inbound: a forward's client, toward a guest ------------------------------------

    const CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 7), 40000);

    fn target(port: u16) -> InboundTarget {
        InboundTarget {
            guest: sa(GUEST_IP, port),
            guest_mac: GUEST_MAC,
            forward: 1,
        }
    }

    /// The Ethernet destination of each frame in `out`.
    fn eth_dsts(out: &FrameBatch) -> Vec<Mac> {
        out.iter()
            .map(|f| {
                crate::wire::mac(
                    smoltcp::wire::EthernetFrame::new_checked(f)
                        .unwrap()
                        .dst_addr(),
                )
            })
            .collect()
    }

    #[test]
    fn inbound_session_carries_the_first_datagram_the_replies_and_more() {
        let (mut e, mut h, mut out) = setup();
        let guest = sa(GUEST_IP, 53);
        let sock = h.adopt_udp(std::net::SocketAddr::from(CLIENT));
        // Nothing is known of the guest yet but what the forward resolved.
        e.udp_inbound(T0, sock, CLIENT, target(53), b"query", &mut h, &mut out)
            .unwrap();
        let p = packets(&out);
        assert_eq!(p.len(), 1);
        assert_eq!(parse_udp(&p[0]), (CLIENT, guest, b"query".to_vec()));
        assert_eq!(eth_dsts(&out), [GUEST_MAC]);
        out.clear();

        // The guest answers the client: out through the forward's socket, no new session.
        e.handle_frame(T0, &udp_frame(guest, CLIENT, b"answer"), &mut h, &mut out);
        assert!(out.is_empty());
        assert_eq!(udp_ids(&h), [sock]);
        assert_eq!(h.udp(sock).unwrap().sent, [b"answer".to_vec()]);

        // The client's next datagrams arrive on the socket and go to the guest.
        h.deliver_udp(sock, b"again");
        pump(&mut e, &mut h, &mut out, T0);
        assert_eq!(
            parse_udp(&packets(&out)[0]),
            (CLIENT, guest, b"again".to_vec())
        );

        let rows = e.sessions();
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!(
            (r.direction, r.guest, r.dst),
            (Direction::In, guest.into(), CLIENT.into())
        );
        assert_eq!((r.packets_to_guest, r.bytes_to_guest), (2, 10));
        assert_eq!((r.packets_to_host, r.bytes_to_host), (1, 6));
        assert_eq!(
            e.poll_event(),
            Some(Event::InboundSessionCreated {
                proto: Proto::Udp,
                id: r.id,
                src: std::net::SocketAddr::from(CLIENT),
                dst: std::net::SocketAddr::from(guest),
            })
        );
    }

    #[test]
    fn inbound_datagram_that_raced_its_socket_goes_through_the_session() {
        let (mut e, mut h, mut out) = setup();
        let first = h.adopt_udp(std::net::SocketAddr::from(CLIENT));
        e.udp_inbound(T0, first, CLIENT, target(53), b"one", &mut h, &mut out)
            .unwrap();
        let second = h.adopt_udp(std::net::SocketAddr::from(CLIENT));
        e.udp_inbound(T0, second, CLIENT, target(53), b"two", &mut h, &mut out)
            .unwrap();
        assert_eq!(h.closed, [second]);
        assert_eq!(udp_ids(&h), [first]);
        let p = packets(&out);
        assert_eq!(
            parse_udp(&p[1]),
            (CLIENT, sa(GUEST_IP, 53), b"two".to_vec())
        );
        assert_eq!(e.sessions().len(), 1);
        assert_eq!(e.sessions()[0].packets_to_guest, 2);
    }

    /// A removed forward's sessions end with their sockets; another forward's stay.
    #[test]
    fn closing_a_forward_ends_its_sessions_only() {
        let (mut e, mut h, mut out) = setup();
        let sock = h.adopt_udp(std::net::SocketAddr::from(CLIENT));
        e.udp_inbound(T0, sock, CLIENT, target(53), b"q", &mut h, &mut out)
            .unwrap();
        assert_eq!(e.close_forward(T0, 7, &mut h, &mut out), 0);
        assert_eq!(e.sessions().len(), 1);
        assert_eq!(e.close_forward(T0, 1, &mut h, &mut out), 1);
        assert!(e.sessions().is_empty());
        assert!(h.closed.contains(&sock));
    }

    #[test]
    fn inbound_session_expires_when_idle() {
        let (mut e, mut h, mut out) = setup();
        let sock = h.adopt_udp(std::net::SocketAddr::from(CLIENT));
        e.udp_inbound(T0, sock, CLIENT, target(53), b"q", &mut h, &mut out)
            .unwrap();
        let timeout = e.config().nat.udp_timeout;
        assert_eq!(e.poll_timeout(), Some(T0 + timeout));
        e.handle_timeout(T0 + timeout, &mut h, &mut out);
        assert!(e.sessions().is_empty());
        assert_eq!(h.closed, [sock]);
        let events: Vec<Event> = std::iter::from_fn(|| e.poll_event()).collect();
        assert!(matches!(
            events[..],
            [
                Event::InboundSessionCreated { .. },
                Event::SessionDeleted {
                    proto: Proto::Udp,
                    ..
                }
            ]
        ));
    }

    #[test]
    fn inbound_session_counts_against_the_guest_and_is_not_the_egress_policys() {
        let (mut e, mut h, mut out) = setup_with(|c| {
            c.nat.max_sessions_per_guest = 1;
            // The operator refuses guests' flows to the client's network; the forward is
            // the operator's own door.
            c.nat.egress = vec!["deny 198.51.100.0/24".parse().unwrap()];
        });
        let sock = h.adopt_udp(std::net::SocketAddr::from(CLIENT));
        e.udp_inbound(T0, sock, CLIENT, target(53), b"q", &mut h, &mut out)
            .unwrap();
        e.handle_frame(
            T0,
            &udp_frame(sa(GUEST_IP, 53), CLIENT, b"a"),
            &mut h,
            &mut out,
        );
        assert_eq!(h.udp(sock).unwrap().sent, [b"a".to_vec()]);
        assert_eq!(e.stats().drops_of(DropReason::Policy), 0);
        // A second client: past the guest's share.
        let other = sa(Ipv4Addr::new(198, 51, 100, 8), 40000);
        let refused = h.adopt_udp(std::net::SocketAddr::from(other));
        let r = e.udp_inbound(T0, refused, other, target(53), b"q", &mut h, &mut out);
        assert_eq!(r, Err(InboundRefused::Limit));
        assert_eq!(h.closed, [refused]);
        assert_eq!(e.stats().drops_of(DropReason::Limit), 1);
        assert_eq!(e.sessions().len(), 1);
    }

    #[test]
    fn inbound_datagram_larger_than_the_mtu_is_fragmented() {
        let (mut e, mut h, mut out) = setup();
        let big: Vec<u8> = (0..3000u32).map(|i| (i * 13) as u8).collect();
        let sock = h.adopt_udp(std::net::SocketAddr::from(CLIENT));
        e.udp_inbound(T0, sock, CLIENT, target(9000), &big, &mut h, &mut out)
            .unwrap();
        let p = packets(&out);
        assert_eq!(p.len(), 3);
        let joined = join_fragments(&p);
        let udp = UdpPacket::new_checked(&joined[..]).unwrap();
        assert!(udp.verify_checksum(&(*CLIENT.ip()).into(), &GUEST_IP.into()));
        assert_eq!(udp.payload(), &big[..]);
        assert!(eth_dsts(&out).iter().all(|m| *m == GUEST_MAC));
    }

    #[test]
    fn inbound_from_the_hosts_loopback_is_shown_as_the_virtual_host() {
        let (mut e, mut h, mut out) = setup();
        let local = sa(Ipv4Addr::LOCALHOST, 5353);
        let shown = sa(HOST_IP, 5353);
        let sock = h.adopt_udp(std::net::SocketAddr::from(local));
        e.udp_inbound(T0, sock, local, target(53), b"q", &mut h, &mut out)
            .unwrap();
        assert_eq!(parse_udp(&packets(&out)[0]).0, shown);
        out.clear();
        // The guest's answer to the virtual host's address is this flow's, not the DNS relay's.
        e.handle_frame(
            T0,
            &udp_frame(sa(GUEST_IP, 53), shown, b"a"),
            &mut h,
            &mut out,
        );
        assert_eq!(h.udp(sock).unwrap().sent, [b"a".to_vec()]);
        assert!(out.is_empty());
    }

    #[test]
    fn nat_disabled_relays_nothing() {
        let (mut e, mut h, mut out) = setup_with(|c| c.nat.enabled = false);
        let frame = udp_frame(sa(GUEST_IP, 5000), sa(REMOTE_IP, 7000), b"x");
        e.handle_frame(T0, &frame, &mut h, &mut out);
        assert_eq!(e.stats().drops_of(DropReason::Disabled), 1);
        assert!(udp_ids(&h).is_empty());
    }
}
