//! ICMP echo toward other hosts (seed 3.7.4, "Handling ICMP Packets").
//!
//! `cfg.nat.icmp` chooses what an echo request for another host gets:
//! - `Dummy`: the virtual host answers at once, as if from the destination (SecureNAT's way).
//! - `Real`: one ICMP echo socket per (guest, guest's ident, destination) session carries the
//!   requests; replies on that socket whose sequence number was sent recently (datagram ICMP
//!   sockets rewrite the ident, so the socket and the sequence number are what identify a reply)
//!   go back to the guest with the guest's ident. No reply, no answer: the guest sees a timeout.
//!   Sessions end `IDLE_TIMEOUT` after their last request or reply; at most `MAX_SESSIONS`.
//! - `Auto`: on first use, `Real` if an ICMP socket can be opened, else `Dummy`; decided once and
//!   logged.
//!
//! Destinations that `sock_destination` refuses (the virtual network itself) are dropped as
//! loops, in either mode; the host-loopback alias is pinged as 127.0.0.1 (or answered in dummy
//! mode) and answers come from the alias. Echo requests to the virtual host's own address that
//! arrive fragmented come here after reassembly and are answered from the virtual host. Replies
//! larger than the MTU leave in fragments. Other ICMP messages from guests are not relayed. In
//! real mode requests leave with the guest's TTL less one, and the ICMP errors the host receives
//! about them (time exceeded from a router, destination unreachable) come back to the guest from
//! their sender (`nat::icmp_error`): what traceroute's ICMP mode needs.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use smoltcp::wire::{Icmpv4Packet, IpProtocol};

use crate::config::{Config, IcmpMode};
use crate::event::Event;
use crate::nat::icmp_error::{self, Destination, Quote, SockTtl};
use crate::nat::session::{self, SessionTable};
use crate::nat::SessionInfo;
use crate::nat::{is_guest_address, is_host_ip, sock_destination, Direction, GuestIp, Proto};
use crate::output::FrameBatch;
use crate::sockio::{SockEvent, SockId, SockIo, READ_BUDGET};
use crate::stats::DropReason;
use crate::time::{earliest, Instant};
use crate::wire::{push_ip_fragments, upper_checksum6, verify_upper6, IpHeader, IPV4_HEADER_LEN};
use crate::Ctx;

/// A real-mode session ends this long after its last request or reply.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Real-mode sessions at once.
pub(crate) const MAX_SESSIONS: usize = 1024;
/// Real-ICMP sessions one guest may hold (a quarter of the table).
pub(crate) const MAX_SESSIONS_PER_GUEST: usize = MAX_SESSIONS / 4;
/// Sequence numbers remembered per session to recognise replies.
const RECENT: usize = 16;
const MAX_MESSAGE: usize = 65535 - IPV4_HEADER_LEN;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct Key {
    guest: IpAddr,
    ident: u16,
    dst: IpAddr,
}

/// What an echo session keeps beyond the table's common part.
struct Echo {
    /// The destination as pinged on the sock side.
    host_dst: IpAddr,
    /// The last `RECENT` sequence numbers sent, to recognise replies by.
    recent: [Option<u16>; RECENT],
    /// Where in `recent` the next one goes.
    next: usize,
    /// The guest's last request, as ICMP errors about it quote it.
    quote: Quote,
    /// The TTL the socket sends with.
    ttl: SockTtl,
}

type Session = session::Session<Key, Echo>;

pub(crate) struct IcmpNat {
    /// `Some(true)` once real mode is in use, `Some(false)` for dummy.
    real: Option<bool>,
    /// The socket `Auto` opened to probe, kept for the first session.
    probe: Option<SockId>,
    table: SessionTable<Key, Echo>,
    /// Idle expiry is run by `expire_idle` on the caller's schedule, not by `handle_timeout`.
    pub(crate) external_idle: bool,
    rearm: Vec<SockId>,
    rearm_scratch: Vec<SockId>,
    buf: Box<[u8]>,
}

impl IcmpNat {
    pub(crate) fn new(cfg: &Config) -> IcmpNat {
        IcmpNat {
            real: match cfg.nat.icmp {
                IcmpMode::Dummy => Some(false),
                IcmpMode::Real => Some(true),
                IcmpMode::Auto => None,
            },
            probe: None,
            table: SessionTable::new(),
            external_idle: false,
            rearm: Vec::new(),
            rearm_scratch: Vec::new(),
            buf: vec![0u8; MAX_MESSAGE].into_boxed_slice(),
        }
    }

    /// The mode in use: `Some(true)` real, `Some(false)` dummy, `None` not decided yet.
    #[cfg(test)]
    pub(crate) fn real_mode(&self) -> Option<bool> {
        self.real
    }

    /// Real-mode sessions open.
    pub(crate) fn len(&self) -> usize {
        self.table.len()
    }

    /// Real-mode sessions of IPv6 guests.
    pub(crate) fn ipv6_len(&self) -> usize {
        self.table.ipv6_len()
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// The echo socket of the session of `guest`'s `ident` toward `dst`.
    #[cfg(test)]
    pub(crate) fn socket_of(&self, guest: IpAddr, ident: u16, dst: IpAddr) -> Option<SockId> {
        self.table.socket_of(&Key { guest, ident, dst })
    }

    pub(crate) fn handle(
        &mut self,
        now: Instant,
        ctx: &mut Ctx,
        ip: &GuestIp,
        io: &mut impl SockIo,
        out: &mut FrameBatch,
    ) -> Result<(), DropReason> {
        let (ident, seq_no, data) = parse_echo_request(ip)?;
        let (src, dst) = (ip.src, ip.dst);
        if is_host_ip(ctx, dst) {
            // A (reassembled) echo request for the virtual host itself.
            return emit_to_guest(ctx, out, &mut self.buf, (dst, src), (ident, seq_no, data));
        }
        if !is_guest_address(ctx, src) {
            return Err(DropReason::Foreign);
        }
        let from = SocketAddr::new(src, ident);
        let host_dst = match sock_destination(ctx, Proto::Icmp, from, SocketAddr::new(dst, 0)) {
            Ok(d) => d.ip(),
            Err(DropReason::Policy) => {
                crate::nat::udp::refuse(ctx, ip, out);
                return Err(DropReason::Policy);
            }
            Err(e) => return Err(e),
        };
        if !self.decide(io) {
            return emit_to_guest(ctx, out, &mut self.buf, (dst, src), (ident, seq_no, data));
        }
        let key = Key {
            guest: src,
            ident,
            dst,
        };
        let slot = match self.table.slot(&key) {
            Some(slot) => slot,
            None => self.open(now, ctx, key, host_dst, io)?,
        };
        let Some(s) = self.table.get_mut(slot) else {
            return Err(DropReason::Malformed);
        };
        // The host's stack fills an ICMPv6 socket's checksum itself (it needs the source
        // address it picks); an ICMPv4 message carries its own.
        let len = build_echo(&mut self.buf, None, ip.is_v6(), true, (ident, seq_no, data))?;
        s.info.last_used = now;
        s.state.quote = Quote::of(ip);
        s.state.ttl.follow(ip.ttl, s.sock, io);
        let mut sent = io.icmp_send(s.sock, s.state.host_dst, &self.buf[..len]);
        if let Err(e) = &sent {
            // An error about an earlier request surfaces on this send, which sent nothing.
            if e.kind() != std::io::ErrorKind::WouldBlock && relay_errors(ctx, out, s, io) > 0 {
                sent = io.icmp_send(s.sock, s.state.host_dst, &self.buf[..len]);
            }
        }
        match sent {
            Ok(()) => {
                s.state.recent[s.state.next] = Some(seq_no);
                s.state.next = (s.state.next + 1) % RECENT;
                s.info.packets_to_host += 1;
                s.info.bytes_to_host += data.len() as u64;
                Ok(())
            }
            Err(e) => {
                if icmp_error::report_send_error(ctx, out, &e, s.state.quote.bytes(), None) {
                    return Err(DropReason::NoRoute);
                }
                tracing::debug!("ICMP session {}: send failed: {e}", s.info.id);
                Err(DropReason::QueueFull)
            }
        }
    }

    /// Whether echo requests go out for real (deciding `Auto` on first use).
    fn decide(&mut self, io: &mut impl SockIo) -> bool {
        if let Some(real) = self.real {
            return real;
        }
        let real = match io.icmp_open(false) {
            Ok(sock) => {
                self.probe = Some(sock);
                true
            }
            Err(e) => {
                tracing::info!("ICMP sockets unavailable ({e}): echo requests get dummy replies");
                false
            }
        };
        if real {
            tracing::info!("ICMP sockets available: echo requests are sent for real");
        }
        self.real = Some(real);
        real
    }

    fn open(
        &mut self,
        now: Instant,
        ctx: &mut Ctx,
        key: Key,
        host_dst: IpAddr,
        io: &mut impl SockIo,
    ) -> Result<usize, DropReason> {
        if self.table.len() >= MAX_SESSIONS {
            if let Some(slot) = self.table.idlest(now, IDLE_TIMEOUT, session::EVICT_IDLE) {
                self.close(ctx, slot, io);
                ctx.stats.evicted += 1;
            }
        }
        let per_guest = ctx
            .cfg
            .nat
            .max_sessions_per_guest
            .min(MAX_SESSIONS_PER_GUEST);
        if self.table.full(key.guest, MAX_SESSIONS, per_guest) {
            return Err(DropReason::Limit);
        }
        // Counted with the other protocols' sessions, across the workers, and in the guest's
        // rate of new sessions.
        if !ctx.admit_session(now, Proto::Icmp, key.guest) {
            return Err(DropReason::Limit);
        }
        let probe = if key.guest.is_ipv6() {
            None
        } else {
            self.probe.take()
        };
        let sock = match probe {
            Some(s) => s,
            None => io.icmp_open(key.guest.is_ipv6()).map_err(|e| {
                tracing::warn!("ICMP socket could not be opened: {e}");
                ctx.release_session(Proto::Icmp, key.guest);
                DropReason::Unsupported
            })?,
        };
        let id = ctx.next_session_id();
        let guest = SocketAddr::new(key.guest, key.ident);
        let dst = SocketAddr::new(key.dst, 0);
        ctx.events.push(Event::SessionCreated {
            proto: Proto::Icmp,
            id,
            src: guest,
            dst,
        });
        let session = Session {
            key,
            sock,
            state: Echo {
                host_dst,
                recent: [None; RECENT],
                next: 0,
                quote: Quote::default(),
                ttl: SockTtl::default(),
            },
            info: SessionInfo::opened(id, Proto::Icmp, (guest, dst), Direction::Out, now, "Echo"),
        };
        Ok(self.table.insert(session, now + IDLE_TIMEOUT))
    }

    fn close(&mut self, ctx: &mut Ctx, slot: usize, io: &mut impl SockIo) {
        let Some(s) = self.table.remove(slot) else {
            return;
        };
        ctx.release_session(Proto::Icmp, s.key.guest);
        io.close(s.sock);
        ctx.events.push(Event::SessionDeleted {
            proto: Proto::Icmp,
            id: s.info.id,
        });
    }

    /// Shutdown: closes every session's socket (and the probe's).
    pub(crate) fn close_all(&mut self, ctx: &mut Ctx, io: &mut impl SockIo) {
        for slot in 0..self.table.slot_count() {
            self.close(ctx, slot, io);
        }
        if let Some(s) = self.probe.take() {
            io.close(s);
        }
        self.rearm.clear();
    }

    /// Reads replies on `sock` up to the budget: `None` if no session owns it, else whether
    /// data may remain.
    fn read_socket(
        &mut self,
        now: Instant,
        ctx: &mut Ctx,
        sock: SockId,
        io: &mut impl SockIo,
        out: &mut FrameBatch,
    ) -> Option<bool> {
        let slot = self.table.slot_of_sock(sock)?;
        let s = self.table.get_mut(slot)?;
        // A socket error with nothing behind it, twice in a row: give up on this round.
        let mut stalled = false;
        for _ in 0..READ_BUDGET {
            let dgram = match io.icmp_recv(sock, &mut self.buf) {
                Ok(d) => d,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Some(false),
                // The socket's pending error: the ICMP errors behind it wait in its error queue.
                Err(e) => {
                    if relay_errors(ctx, out, s, io) > 0 {
                        stalled = false;
                    } else if std::mem::replace(&mut stalled, true) {
                        tracing::debug!("ICMP session {}: receive failed: {e}", s.info.id);
                        return Some(false);
                    }
                    continue;
                }
            };
            stalled = false;
            let msg = &mut self.buf[..dgram.len];
            if msg.len() < 8 {
                ctx.stats.drop(DropReason::Malformed);
                continue;
            }
            let v6 = s.key.guest.is_ipv6();
            // The host's stack checked an ICMPv6 reply's checksum (it covers the addresses).
            let is_reply = if v6 {
                msg[0] == ECHO_REPLY_V6 && msg[1] == 0
            } else {
                let packet = Icmpv4Packet::new_unchecked(&msg[..]);
                packet.verify_checksum()
                    && packet.msg_type() == smoltcp::wire::Icmpv4Message::EchoReply
                    && packet.msg_code() == 0
            };
            let seq = u16::from_be_bytes([msg[6], msg[7]]);
            if !is_reply
                || dgram.from.ip() != s.state.host_dst
                || !s.state.recent.contains(&Some(seq))
            {
                ctx.stats.drop(DropReason::Foreign);
                continue;
            }
            // Back to the guest under its own ident, in place.
            msg[4..6].copy_from_slice(&s.key.ident.to_be_bytes());
            fill_checksum(msg, v6.then_some((s.key.dst, s.key.guest)));
            s.info.last_used = now;
            s.info.packets_to_guest += 1;
            s.info.bytes_to_guest += dgram.len.saturating_sub(8) as u64;
            if let Err(why) = push_message(ctx, out, s.key.dst, s.key.guest, msg) {
                ctx.stats.drop(why);
            }
        }
        Some(true)
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
            SockEvent::Readable(sock) => match self.read_socket(now, ctx, sock, io, out) {
                Some(more) => {
                    if more && !self.rearm.contains(&sock) {
                        self.rearm.push(sock);
                    }
                    None
                }
                None if self.probe == Some(sock) => None,
                None => Some(ev),
            },
            SockEvent::Writable(sock) | SockEvent::Failed(sock, _)
                if self.table.owns(sock) || self.probe == Some(sock) =>
            {
                None
            }
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
            if self.read_socket(now, ctx, sock, io, out) == Some(true)
                && !self.rearm.contains(&sock)
            {
                self.rearm.push(sock);
            }
        }
        self.rearm_scratch = list;

        if !self.external_idle {
            self.expire_idle(now, ctx, io);
        }
    }

    /// Closes the sessions idle for `IDLE_TIMEOUT` at `now`.
    pub(crate) fn expire_idle(&mut self, now: Instant, ctx: &mut Ctx, io: &mut impl SockIo) {
        while let Some(slot) = self.table.next_expired(now, IDLE_TIMEOUT) {
            self.close(ctx, slot, io);
        }
    }
}

/// Relays the ICMP errors queued on session `s`'s socket to its guest; how many there were.
fn relay_errors(ctx: &mut Ctx, out: &mut FrameBatch, s: &Session, io: &mut impl SockIo) -> usize {
    let dst = Destination {
        host: s.state.host_dst,
        shown: s.key.dst,
    };
    let mut n = 0;
    // Bounded: the queue is the socket's, and its receive buffer bounds it.
    while n < READ_BUDGET {
        let Ok(err) = io.recv_error(s.sock) else {
            break;
        };
        n += 1;
        if let Err(why) = icmp_error::relay(ctx, out, &err, &s.state.quote, dst, None) {
            ctx.stats.drop(why);
        }
    }
    n
}

const ECHO_REQUEST_V4: u8 = 8;
const ECHO_REPLY_V4: u8 = 0;
const ECHO_REQUEST_V6: u8 = 128;
const ECHO_REPLY_V6: u8 = 129;

/// An echo request: (ident, sequence number, data).
pub(crate) type EchoMsg<'a> = (u16, u16, &'a [u8]);

/// Checks an ICMP (ICMPv6) message from a guest and returns it if it is an echo request;
/// anything else is a drop with its reason.
pub(crate) fn parse_echo_request<'a>(ip: &GuestIp<'a>) -> Result<EchoMsg<'a>, DropReason> {
    let m = ip.upper;
    if m.len() < 8 {
        return Err(DropReason::Malformed);
    }
    let (request, sum_ok) = match (ip.src, ip.dst) {
        (IpAddr::V6(s), IpAddr::V6(d)) => (
            ECHO_REQUEST_V6,
            verify_upper6(s, d, IpProtocol::Icmpv6.into(), m),
        ),
        _ => (ECHO_REQUEST_V4, crate::wire::ones_sum(m) == 0xffff),
    };
    if !sum_ok {
        return Err(DropReason::BadChecksum);
    }
    if m[0] != request || m[1] != 0 {
        return Err(DropReason::Unsupported);
    }
    let ident = u16::from_be_bytes([m[4], m[5]]);
    let seq = u16::from_be_bytes([m[6], m[7]]);
    Ok((ident, seq, &m[8..]))
}

/// Writes the checksum of ICMP message `msg` (ICMPv6 with `v6` = its source and destination).
fn fill_checksum(msg: &mut [u8], v6: Option<(IpAddr, IpAddr)>) {
    msg[2..4].fill(0);
    let sum = match v6 {
        Some((IpAddr::V6(s), IpAddr::V6(d))) => {
            upper_checksum6(s, d, IpProtocol::Icmpv6.into(), msg)
        }
        _ => !crate::wire::ones_sum(msg),
    };
    msg[2..4].copy_from_slice(&sum.to_be_bytes());
}

/// Builds an echo request (`request`) or reply into `buf`, ICMPv6 with `v6`; its checksum
/// with `addrs` (for ICMPv6; left zero without them, for the host's stack to fill). Returns
/// its length.
fn build_echo(
    buf: &mut [u8],
    addrs: Option<(IpAddr, IpAddr)>,
    v6: bool,
    request: bool,
    (ident, seq, data): EchoMsg,
) -> Result<usize, DropReason> {
    let len = 8 + data.len();
    let msg = buf.get_mut(..len).ok_or(DropReason::Malformed)?;
    msg[0] = match (v6, request) {
        (false, true) => ECHO_REQUEST_V4,
        (false, false) => ECHO_REPLY_V4,
        (true, true) => ECHO_REQUEST_V6,
        (true, false) => ECHO_REPLY_V6,
    };
    msg[1] = 0;
    msg[4..6].copy_from_slice(&ident.to_be_bytes());
    msg[6..8].copy_from_slice(&seq.to_be_bytes());
    msg[8..].copy_from_slice(data);
    if v6 && addrs.is_none() {
        msg[2..4].fill(0);
    } else {
        fill_checksum(msg, addrs.filter(|_| v6));
    }
    Ok(len)
}

/// Builds the echo reply to `echo` in `buf` and sends it from `src` to the guest `dst`, in
/// fragments if needed.
fn emit_to_guest(
    ctx: &mut Ctx,
    out: &mut FrameBatch,
    buf: &mut [u8],
    (src, dst): (IpAddr, IpAddr),
    echo: EchoMsg,
) -> Result<(), DropReason> {
    let len = build_echo(buf, Some((src, dst)), dst.is_ipv6(), false, echo)?;
    push_message(ctx, out, src, dst, &buf[..len])
}

/// Sends a built ICMP message from `src` to the guest `dst`.
fn push_message(
    ctx: &mut Ctx,
    out: &mut FrameBatch,
    src: IpAddr,
    dst: IpAddr,
    msg: &[u8],
) -> Result<(), DropReason> {
    let dst_mac = ctx.neighbour(dst).ok_or(DropReason::NoArp)?;
    let proto = if dst.is_ipv6() {
        IpProtocol::Icmpv6
    } else {
        IpProtocol::Icmp
    };
    let h = IpHeader::new(src, dst, proto, ctx.next_ident());
    push_ip_fragments(out, ctx.mac, dst_mac, &h, msg, ctx.cfg.nat.mtu as usize);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{SimSocket, SimSockets};
    use crate::testing::*;
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::Icmpv4Message;
    use smoltcp::wire::{Icmpv4Repr, Ipv4Packet};
    use std::net::Ipv4Addr;

    /// The bytes of one ICMP message (header, data, checksum).
    fn icmp_bytes(repr: &Icmpv4Repr) -> Vec<u8> {
        let mut msg = vec![0u8; repr.buffer_len()];
        repr.emit(
            &mut Icmpv4Packet::new_unchecked(&mut msg[..]),
            &ChecksumCapabilities::default(),
        );
        msg
    }

    fn echo_frame(dst: Ipv4Addr, ident: u16, seq: u16, data: &[u8]) -> Vec<u8> {
        let msg = icmp_bytes(&Icmpv4Repr::EchoRequest {
            ident,
            seq_no: seq,
            data,
        });
        ipv4_frame(GUEST_IP, dst, IpProtocol::Icmp, 1, 0, false, &msg)
    }

    /// (source, ICMP type, ident, seq, data) of an unfragmented ICMP packet to the guest.
    fn parse_echo(p: &[u8]) -> (Ipv4Addr, Icmpv4Message, u16, u16, Vec<u8>) {
        let ip = Ipv4Packet::new_checked(p).unwrap();
        assert_eq!(ip.dst_addr(), GUEST_IP);
        let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
        assert!(icmp.verify_checksum());
        (
            ip.src_addr(),
            icmp.msg_type(),
            icmp.echo_ident(),
            icmp.echo_seq_no(),
            icmp.data().to_vec(),
        )
    }

    fn reply_msg(ident: u16, seq: u16, data: &[u8]) -> Vec<u8> {
        icmp_bytes(&Icmpv4Repr::EchoReply {
            ident,
            seq_no: seq,
            data,
        })
    }

    fn icmp_ids(h: &SimSockets) -> Vec<SockId> {
        h.ids(|s| matches!(s, SimSocket::Icmp(_)))
    }

    #[test]
    fn dummy_mode_answers_as_the_destination() {
        let (mut e, mut h, mut out) = setup_with(|c| c.nat.icmp = IcmpMode::Dummy);
        e.handle_frame(T0, &echo_frame(REMOTE_IP, 77, 1, b"abc"), &mut h, &mut out);
        let p = packets(&out);
        assert_eq!(p.len(), 1);
        assert_eq!(
            parse_echo(&p[0]),
            (REMOTE_IP, Icmpv4Message::EchoReply, 77, 1, b"abc".to_vec())
        );
        assert!(h.sockets.is_empty());
        assert!(e.sessions().is_empty());
    }

    #[test]
    fn dummy_mode_answers_for_the_loopback_alias_but_not_the_network() {
        let alias = Ipv4Addr::new(192, 168, 30, 2);
        let (mut e, mut h, mut out) = setup_with(|c| {
            c.nat.icmp = IcmpMode::Dummy;
            c.nat.host_loopback = Some(alias);
        });
        e.handle_frame(T0, &echo_frame(alias, 1, 1, b"x"), &mut h, &mut out);
        assert_eq!(parse_echo(&packets(&out)[0]).0, alias);
        let other = Ipv4Addr::new(192, 168, 30, 77);
        e.handle_frame(T0, &echo_frame(other, 1, 2, b"x"), &mut h, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(e.stats().drops_of(DropReason::Loop), 1);
    }

    /// The DNS address is the virtual host's: it answers a ping itself, from that address,
    /// whatever the mode (no socket is opened for it), fragmented or not.
    #[test]
    fn the_dns_address_answers_ping_itself() {
        let dns = Ipv4Addr::new(192, 168, 30, 3);
        for icmp in [IcmpMode::Real, IcmpMode::Dummy] {
            let (mut e, mut h, mut out) = setup_with(|c| {
                c.nat.icmp = icmp;
                c.dns.address = Some(dns);
            });
            e.handle_frame(T0, &echo_frame(dns, 9, 1, b"x"), &mut h, &mut out);
            let p = packets(&out);
            assert_eq!(p.len(), 1, "{icmp:?}");
            assert_eq!(
                parse_echo(&p[0]),
                (dns, Icmpv4Message::EchoReply, 9, 1, b"x".to_vec())
            );
            // Reassembled first, then answered by the NAT's side of the same rule.
            let msg = icmp_bytes(&Icmpv4Repr::EchoRequest {
                ident: 9,
                seq_no: 2,
                data: &[7; 24],
            });
            let first = ipv4_frame(GUEST_IP, dns, IpProtocol::Icmp, 5, 0, true, &msg[..16]);
            let last = ipv4_frame(GUEST_IP, dns, IpProtocol::Icmp, 5, 16, false, &msg[16..]);
            e.handle_frame(T0, &first, &mut h, &mut out);
            e.handle_frame(T0, &last, &mut h, &mut out);
            let p = packets(&out);
            assert_eq!(p.len(), 2, "{icmp:?}");
            assert_eq!(parse_echo(&p[1]).0, dns);
            assert!(
                h.sockets.is_empty(),
                "{icmp:?}: no socket for the virtual host"
            );
            // With NAT off the virtual host still answers, at both addresses.
            e.ctx.cfg.nat.enabled = false;
            e.handle_frame(T0, &echo_frame(dns, 9, 3, b"x"), &mut h, &mut out);
            assert_eq!(packets(&out).len(), 3, "{icmp:?}");
        }
    }

    #[test]
    fn real_mode_relays_matching_replies_and_expires() {
        let (mut e, mut h, mut out) = setup_with(|c| c.nat.icmp = IcmpMode::Real);
        e.handle_frame(
            T0,
            &echo_frame(REMOTE_IP, 0x4242, 5, b"data"),
            &mut h,
            &mut out,
        );
        assert!(out.is_empty());
        let sock = icmp_ids(&h)[0];
        assert_eq!(
            e.nat
                .icmp
                .socket_of(GUEST_IP.into(), 0x4242, REMOTE_IP.into()),
            Some(sock)
        );
        let (to, msg) = h.icmp(sock).unwrap().sent[0].clone();
        assert_eq!(to, REMOTE_IP);
        let req = Icmpv4Packet::new_checked(&msg[..]).unwrap();
        assert_eq!(req.msg_type(), Icmpv4Message::EchoRequest);
        assert_eq!((req.echo_seq_no(), req.data()), (5, &b"data"[..]));
        let rows = e.sessions();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].proto, Proto::Icmp);

        // The kernel rewrote the ident: a reply with another ident but our seq is ours.
        h.deliver_icmp(
            sock,
            std::net::IpAddr::from(REMOTE_IP),
            &reply_msg(999, 5, b"data"),
        );
        // A reply with a sequence number never sent, one from elsewhere: ignored.
        h.deliver_icmp(
            sock,
            std::net::IpAddr::from(REMOTE_IP),
            &reply_msg(999, 6, b"data"),
        );
        h.deliver_icmp(
            sock,
            std::net::IpAddr::from(Ipv4Addr::new(198, 51, 100, 1)),
            &reply_msg(999, 5, b"x"),
        );
        pump(&mut e, &mut h, &mut out, T0);
        let p = packets(&out);
        assert_eq!(p.len(), 1);
        assert_eq!(
            parse_echo(&p[0]),
            (
                REMOTE_IP,
                Icmpv4Message::EchoReply,
                0x4242,
                5,
                b"data".to_vec()
            )
        );
        assert_eq!(e.stats().drops_of(DropReason::Foreign), 2);

        assert_eq!(e.poll_timeout(), Some(T0 + IDLE_TIMEOUT));
        e.handle_timeout(T0 + IDLE_TIMEOUT, &mut h, &mut out);
        assert!(e.nat.icmp.is_empty());
        assert_eq!(h.closed, vec![sock]);
    }

    #[test]
    fn auto_falls_back_to_dummy_when_sockets_are_refused() {
        let (mut e, mut h, mut out) = setup();
        h.icmp_allowed = false;
        assert_eq!(e.nat.icmp.real_mode(), None);
        e.handle_frame(T0, &echo_frame(REMOTE_IP, 3, 1, b"z"), &mut h, &mut out);
        assert_eq!(e.nat.icmp.real_mode(), Some(false));
        assert_eq!(parse_echo(&packets(&out)[0]).1, Icmpv4Message::EchoReply);
        // Decided once: sockets appearing later change nothing.
        h.icmp_allowed = true;
        e.handle_frame(T0, &echo_frame(REMOTE_IP, 3, 2, b"z"), &mut h, &mut out);
        assert_eq!(out.len(), 2);
        assert!(h.sockets.is_empty());
    }

    #[test]
    fn auto_uses_real_sockets_when_allowed() {
        let (mut e, mut h, mut out) = setup();
        e.handle_frame(T0, &echo_frame(REMOTE_IP, 3, 1, b"z"), &mut h, &mut out);
        assert_eq!(e.nat.icmp.real_mode(), Some(true));
        assert!(out.is_empty());
        let ids = icmp_ids(&h);
        assert_eq!(ids.len(), 1);
        assert_eq!(h.icmp(ids[0]).unwrap().sent.len(), 1);
    }

    #[test]
    fn large_pings_are_reassembled_and_answered_in_fragments() {
        let (mut e, mut h, mut out) = setup_with(|c| c.nat.icmp = IcmpMode::Dummy);
        let data: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        let whole = echo_frame(HOST_IP, 8, 1, &data);
        let msg = &whole[14 + 20..];
        for (i, c) in msg.chunks(1480).enumerate() {
            let more = (i + 1) * 1480 < msg.len();
            let f = ipv4_frame(GUEST_IP, HOST_IP, IpProtocol::Icmp, 44, i * 1480, more, c);
            e.handle_frame(T0, &f, &mut h, &mut out);
        }
        let p = packets(&out);
        assert_eq!(p.len(), 3);
        assert_eq!(
            Ipv4Packet::new_checked(&p[0][..]).unwrap().src_addr(),
            HOST_IP
        );
        let joined = join_fragments(&p);
        let icmp = Icmpv4Packet::new_checked(&joined[..]).unwrap();
        assert!(icmp.verify_checksum());
        assert_eq!(icmp.msg_type(), Icmpv4Message::EchoReply);
        assert_eq!(icmp.data(), &data[..]);
    }

    #[test]
    fn non_echo_and_malformed_icmp_are_dropped() {
        let (mut e, mut h, mut out) = setup_with(|c| c.nat.icmp = IcmpMode::Dummy);
        let reply = reply_msg(1, 1, b"x");
        let f = ipv4_frame(GUEST_IP, REMOTE_IP, IpProtocol::Icmp, 1, 0, false, &reply);
        e.handle_frame(T0, &f, &mut h, &mut out);
        assert_eq!(e.stats().drops_of(DropReason::Unsupported), 1);
        let f = ipv4_frame(
            GUEST_IP,
            REMOTE_IP,
            IpProtocol::Icmp,
            1,
            0,
            false,
            &[8, 0, 0],
        );
        e.handle_frame(T0, &f, &mut h, &mut out);
        assert_eq!(e.stats().drops_of(DropReason::Malformed), 1);
        let mut bad = echo_frame(REMOTE_IP, 1, 1, b"abc");
        let n = bad.len();
        bad[n - 1] ^= 1;
        e.handle_frame(T0, &bad, &mut h, &mut out);
        assert_eq!(e.stats().drops_of(DropReason::BadChecksum), 1);
        assert!(out.is_empty());
    }
}
