//! The IP TTL and the ICMP errors guests get about what the NAT carries.
//!
//! hubnat is the guests' router, so it behaves as one toward their TTL (RFC 1812 5.3.1):
//! - A packet it would route onward (to the sock side) that arrives with TTL 1 or 0 is not
//!   carried: the guest gets time exceeded from the virtual host (`time_exceeded`). Packets for
//!   the virtual host itself are delivered whatever their TTL, and frames other guests switch
//!   among themselves never come here.
//! - UDP datagrams and echo requests leave the host with the guest's TTL less one, so that the
//!   routers beyond count down the same path (`SockTtl`). A normal TTL (`NORMAL_TTL` or more)
//!   leaves the socket at the host's default: the common case costs a compare.
//! - The ICMP errors the host's stack receives about a session's datagrams (`IP_RECVERR`: time
//!   exceeded from a router, destination unreachable with its code, ...) are relayed to the
//!   guest from their sender (`relay`), quoting the guest's datagram as the guest sent it: each
//!   UDP and ICMP session keeps a `Quote` of its guest's last datagram, a TCP connection one of
//!   its SYN.
//! - A destination the host's own routing cannot reach (a send or connect failing with "no
//!   route") is reported as destination unreachable from the virtual host (`unreachable`).

use std::io;
use std::net::Ipv4Addr;

use smoltcp::wire::{Icmpv4Packet, IpProtocol, Ipv4Packet};

use crate::config::Mac;
use crate::output::FrameBatch;
use crate::sockio::{IcmpError, SockId, SockIo, Unreachable};
use crate::stats::DropReason;
use crate::wire::{push_ipv4, Ipv4Header, IPV4_HEADER_LEN};
use crate::Ctx;

/// A guest TTL at least this large is a sender's initial one (64 on Linux, 128 on Windows, 255
/// on some): the host's default TTL is as good, and the socket is not touched.
pub(crate) const NORMAL_TTL: u8 = 64;

/// RFC 792: an error quotes the offending IP header and the first 64 bits of its payload.
const QUOTED_PAYLOAD: usize = 8;
const QUOTE_LEN: usize = IPV4_HEADER_LEN + QUOTED_PAYLOAD;
const ICMP_HEADER_LEN: usize = 8;

const DST_UNREACHABLE: u8 = 3;
const TIME_EXCEEDED: u8 = 11;
const PARAMETER_PROBLEM: u8 = 12;
/// Destination unreachable's "fragmentation needed and DF set".
const FRAG_NEEDED: u8 = 4;
const ECHO_REQUEST: u8 = 8;

/// What an ICMP error about a guest's datagram quotes: its IP header (options left out) and
/// the first 8 bytes of its payload, as the guest sent them.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Quote {
    bytes: [u8; QUOTE_LEN],
    len: u8,
}

impl Quote {
    /// The quote of `ip`, a whole datagram from a guest.
    pub(crate) fn of(ip: &Ipv4Packet<&[u8]>) -> Quote {
        let raw: &[u8] = ip.as_ref();
        let mut bytes = [0u8; QUOTE_LEN];
        bytes[..IPV4_HEADER_LEN].copy_from_slice(&raw[..IPV4_HEADER_LEN]);
        let payload = ip.payload();
        let n = payload.len().min(QUOTED_PAYLOAD);
        bytes[IPV4_HEADER_LEN..][..n].copy_from_slice(&payload[..n]);
        let options = usize::from(ip.header_len()).saturating_sub(IPV4_HEADER_LEN);
        if options > 0 {
            // Rare enough to be fixed up rather than kept: the header as if sent without them.
            let mut h = Ipv4Packet::new_unchecked(&mut bytes[..IPV4_HEADER_LEN]);
            h.set_header_len(IPV4_HEADER_LEN as u8);
            h.set_total_len(ip.total_len().saturating_sub(options as u16));
            h.fill_checksum();
        }
        Quote {
            bytes,
            len: (IPV4_HEADER_LEN + n) as u8,
        }
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// This quote of an echo request with the start of the echo the error quoted put in its
    /// place (the sequence number says which of the session's requests it was about), under
    /// the guest's ident: an ICMP session has several requests in flight, and the host's
    /// ping socket sends them under an ident of its own.
    fn with_echo(&self, err: &IcmpError) -> Quote {
        let mut q = *self;
        let payload = &mut q.bytes[IPV4_HEADER_LEN..];
        if err.quoted_len as usize >= QUOTED_PAYLOAD
            && err.quoted[0] == ECHO_REQUEST
            && q.len as usize == QUOTE_LEN
        {
            let guest_ident = u16::from_be_bytes([payload[4], payload[5]]);
            let host_ident = u16::from_be_bytes([err.quoted[4], err.quoted[5]]);
            let sum = u16::from_be_bytes([err.quoted[2], err.quoted[3]]);
            payload.copy_from_slice(&err.quoted);
            payload[2..4]
                .copy_from_slice(&adjust_checksum(sum, host_ident, guest_ident).to_be_bytes());
            payload[4..6].copy_from_slice(&guest_ident.to_be_bytes());
        }
        q
    }
}

/// A one's-complement checksum after one 16-bit word of what it covers changed from `old` to
/// `new` (RFC 1624).
fn adjust_checksum(sum: u16, old: u16, new: u16) -> u16 {
    let mut s = u32::from(!sum) + u32::from(!old) + u32::from(new);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

/// The TTL a session's socket sends with, as last set (0: the host's default).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct SockTtl(u8);

impl SockTtl {
    /// Makes `sock` send with `guest_ttl` less one (the hop the virtual host is), or with the
    /// host's default for a normal TTL; a socket call only when that changes.
    #[inline]
    pub(crate) fn follow(&mut self, guest_ttl: u8, sock: SockId, io: &mut impl SockIo) {
        if guest_ttl >= NORMAL_TTL && self.0 == 0 {
            return;
        }
        self.set(guest_ttl, sock, io);
    }

    #[cold]
    fn set(&mut self, guest_ttl: u8, sock: SockId, io: &mut impl SockIo) {
        // A datagram with TTL 1 or 0 only gets this far when it is for the virtual host's own
        // address (a forward's client on the host's loopback): one hop is what it may take.
        let want = if guest_ttl >= NORMAL_TTL {
            0
        } else {
            guest_ttl.saturating_sub(1).max(1)
        };
        if want == self.0 {
            return;
        }
        let ttl = (want != 0).then_some(want);
        match io.set_ttl(sock, ttl) {
            Ok(()) => self.0 = want,
            Err(e) => tracing::debug!("host socket {sock}: cannot set TTL {ttl:?}: {e}"),
        }
    }
}

/// Whether `ip`'s TTL ends at the virtual host although it is to be routed onward; if so, the
/// guest has been told (time exceeded, from the virtual host) and the packet is to be dropped.
/// Only called for a TTL of 1 or 0: the caller's one compare keeps everything else off this.
#[cold]
pub(crate) fn time_exceeded(ctx: &mut Ctx, ip: &Ipv4Packet<&[u8]>, out: &mut FrameBatch) -> bool {
    let (src, dst) = (ip.src_addr(), ip.dst_addr());
    if ctx.is_host_address(dst) {
        return false;
    }
    // What the NAT would not carry anyway (its own network, broadcast, multicast, packets of
    // no guest) is left to be dropped as such: no ICMP error answers a packet to a group, nor
    // one from an address hubnat cannot answer.
    let to_host_loopback = Some(dst) == ctx.cfg.nat.host_loopback;
    let routable = to_host_loopback
        || !(dst.is_unspecified()
            || dst.is_broadcast()
            || dst.is_multicast()
            || ctx.cfg.in_subnet(dst));
    if !routable || !ctx.cfg.in_subnet(src) || ctx.is_host_address(src) {
        return false;
    }
    // An ICMP error never answers an ICMP error (RFC 1122 3.2.2); of ICMP, the NAT only carries
    // echo requests.
    if ip.next_header() == IpProtocol::Icmp && ip.payload().first() != Some(&ECHO_REQUEST) {
        return false;
    }
    let quote_len = usize::from(ip.header_len()) + ip.payload().len().min(QUOTED_PAYLOAD);
    let raw: &[u8] = ip.as_ref();
    let from = ctx.host_ip();
    if let Err(why) = push_error(
        ctx,
        out,
        from,
        src,
        None,
        TIME_EXCEEDED,
        0,
        [0; 4],
        &raw[..quote_len],
    ) {
        ctx.stats.drop(why);
    }
    true
}

/// Tells the guest that its datagram (`quote`) could not be sent: the host's routing has no
/// way to the destination. From the virtual host, the guest's router.
pub(crate) fn unreachable(
    ctx: &mut Ctx,
    out: &mut FrameBatch,
    why: Unreachable,
    quote: &[u8],
    mac: Option<Mac>,
) -> Result<(), DropReason> {
    let Some(to) = quote_source(quote) else {
        return Err(DropReason::Malformed);
    };
    let from = ctx.host_ip();
    push_error(
        ctx,
        out,
        from,
        to,
        mac,
        DST_UNREACHABLE,
        why.icmp_code(),
        [0; 4],
        quote,
    )
}

/// `unreachable` for a failed send or connect whose error says the network refused it; false
/// (nothing sent) for any other error.
pub(crate) fn report_send_error(
    ctx: &mut Ctx,
    out: &mut FrameBatch,
    e: &io::Error,
    quote: &[u8],
    mac: Option<Mac>,
) -> bool {
    let Some(why) = crate::sockio::unreachable_of(e) else {
        return false;
    };
    if let Err(drop) = unreachable(ctx, out, why, quote, mac) {
        ctx.stats.drop(drop);
    }
    true
}

/// Where the session's socket really sends, and how the guest addressed it: an error from the
/// former is shown as from the latter (the host-loopback alias stands for 127.0.0.1).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Destination {
    pub(crate) host: Ipv4Addr,
    pub(crate) shown: Ipv4Addr,
}

/// Relays `err`, which the host's stack received about a session's datagram, to the guest that
/// sent it (`quote`, the session's quote of its last datagram): the same type and code, from the
/// router that sent it, or from the destination as the guest knows it.
pub(crate) fn relay(
    ctx: &mut Ctx,
    out: &mut FrameBatch,
    err: &IcmpError,
    quote: &Quote,
    dst: Destination,
    mac: Option<Mac>,
) -> Result<(), DropReason> {
    let rest = match (err.icmp_type, err.code) {
        (DST_UNREACHABLE, FRAG_NEEDED) => {
            let mtu = err.info.min(u32::from(u16::MAX)) as u16;
            let b = mtu.to_be_bytes();
            [0, 0, b[0], b[1]]
        }
        (DST_UNREACHABLE, 0..=15) | (TIME_EXCEEDED, 0..=1) => [0; 4],
        (PARAMETER_PROBLEM, _) => [err.info.min(255) as u8, 0, 0, 0],
        _ => return Err(DropReason::Unsupported),
    };
    let quote = if quote.bytes().get(9) == Some(&u8::from(IpProtocol::Icmp)) {
        quote.with_echo(err)
    } else {
        *quote
    };
    let Some(to) = quote_source(quote.bytes()) else {
        return Err(DropReason::Malformed);
    };
    let from = if err.from == dst.host {
        dst.shown
    } else if err.from.is_unspecified() {
        ctx.host_ip()
    } else {
        err.from
    };
    let (kind, code) = (err.icmp_type, err.code);
    push_error(ctx, out, from, to, mac, kind, code, rest, quote.bytes())
}

/// A port unreachable from `from`, as the host's stack would have queued it.
pub(crate) fn port_unreachable(from: Ipv4Addr) -> IcmpError {
    IcmpError {
        from,
        icmp_type: DST_UNREACHABLE,
        code: 3,
        info: 0,
        quoted: [0; 8],
        quoted_len: 0,
    }
}

/// The guest a quote's datagram came from.
fn quote_source(quote: &[u8]) -> Option<Ipv4Addr> {
    let src: [u8; 4] = quote.get(12..16)?.try_into().ok()?;
    Some(Ipv4Addr::from(src))
}

/// Sends an ICMP error (`kind`, `code`, the 4 bytes after the checksum `rest`, then `quote`)
/// from `from` to the guest `to`, at `mac` (`None`: where the neighbour table says).
#[allow(clippy::too_many_arguments)]
fn push_error(
    ctx: &mut Ctx,
    out: &mut FrameBatch,
    from: Ipv4Addr,
    to: Ipv4Addr,
    mac: Option<Mac>,
    kind: u8,
    code: u8,
    rest: [u8; 4],
    quote: &[u8],
) -> Result<(), DropReason> {
    let dst_mac = match mac {
        Some(m) => m,
        None => ctx.arp.lookup(to).ok_or(DropReason::NoArp)?,
    };
    let h = Ipv4Header::new(from, to, IpProtocol::Icmp, ctx.next_ident());
    let len = ICMP_HEADER_LEN + quote.len();
    push_ipv4(out, ctx.mac, dst_mac, &h, len, |p| {
        p[0] = kind;
        p[1] = code;
        p[2..4].fill(0);
        p[4..8].copy_from_slice(&rest);
        p[ICMP_HEADER_LEN..].copy_from_slice(quote);
        Icmpv4Packet::new_unchecked(p).fill_checksum();
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddrV4;

    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{Icmpv4Message, Icmpv4Repr, ETHERNET_HEADER_LEN};

    use super::*;
    use crate::config::IcmpMode;
    use crate::sim::{ConnectOutcome, SimSocket, SimSockets};
    use crate::testing::*;

    const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);

    fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(ip, port)
    }

    /// (source, type, code, the 4 bytes after the checksum, the quote) of the one ICMP packet
    /// in `out`, its checksum verified.
    fn icmp_error(out: &FrameBatch) -> (Ipv4Addr, u8, u8, [u8; 4], Vec<u8>) {
        let p = packets(out);
        assert_eq!(p.len(), 1, "one frame out");
        let ip = Ipv4Packet::new_checked(&p[0][..]).unwrap();
        assert_eq!(ip.dst_addr(), GUEST_IP);
        assert_eq!(ip.next_header(), IpProtocol::Icmp);
        let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
        assert!(icmp.verify_checksum());
        let m = ip.payload();
        (
            ip.src_addr(),
            m[0],
            m[1],
            [m[4], m[5], m[6], m[7]],
            m[ICMP_HEADER_LEN..].to_vec(),
        )
    }

    /// The IP packet of `frame` and its first 8 payload bytes: what an error about it quotes.
    fn quote_of(frame: &[u8]) -> Vec<u8> {
        frame[ETHERNET_HEADER_LEN..][..QUOTE_LEN].to_vec()
    }

    fn only(h: &SimSockets, kind: fn(&SimSocket) -> bool) -> SockId {
        let ids = h.ids(kind);
        assert_eq!(ids.len(), 1);
        ids[0]
    }

    fn echo_frame(dst: Ipv4Addr, ident: u16, seq_no: u16, ttl: u8) -> Vec<u8> {
        let repr = Icmpv4Repr::EchoRequest {
            ident,
            seq_no,
            data: b"probe",
        };
        let mut msg = vec![0u8; repr.buffer_len()];
        repr.emit(
            &mut Icmpv4Packet::new_unchecked(&mut msg[..]),
            &ChecksumCapabilities::default(),
        );
        with_ttl(
            ipv4_frame(GUEST_IP, dst, IpProtocol::Icmp, 9, 0, false, &msg),
            ttl,
        )
    }

    fn error(from: Ipv4Addr, icmp_type: u8, code: u8) -> IcmpError {
        IcmpError {
            from,
            icmp_type,
            code,
            info: 0,
            quoted: [0; 8],
            quoted_len: 0,
        }
    }

    #[test]
    fn ttl_one_onward_gets_time_exceeded_from_the_virtual_host_and_is_not_carried() {
        let (mut e, mut h, mut out) = setup();
        let udp = with_ttl(udp_frame(sa(GUEST_IP, 5000), sa(REMOTE_IP, 53), b"q"), 1);
        e.handle_frame(T0, &udp, &mut h, &mut out);
        let (from, kind, code, rest, quote) = icmp_error(&out);
        assert_eq!(
            (from, kind, code, rest),
            (HOST_IP, TIME_EXCEEDED, 0, [0; 4])
        );
        assert_eq!(quote, quote_of(&udp));
        assert!(h.sockets.is_empty());
        assert_eq!(e.stats().drops_of(DropReason::TtlExceeded), 1);

        // TCP and echo requests too, with TTL 0 as with 1.
        for frame in [
            with_ttl(syn_frame(sa(GUEST_IP, 4000), sa(REMOTE_IP, 80), 7), 0),
            echo_frame(REMOTE_IP, 1, 1, 1),
        ] {
            out.clear();
            e.handle_frame(T0, &frame, &mut h, &mut out);
            let (from, kind, _, _, quote) = icmp_error(&out);
            assert_eq!((from, kind), (HOST_IP, TIME_EXCEEDED));
            assert_eq!(quote, quote_of(&frame));
        }
        assert!(h.sockets.is_empty());
        assert!(e.sessions().is_empty());
    }

    #[test]
    fn ttl_one_for_the_virtual_host_is_delivered_and_errors_are_not_answered() {
        let (mut e, mut h, mut out) = setup();
        e.handle_frame(T0, &echo_frame(HOST_IP, 1, 1, 1), &mut h, &mut out);
        let p = packets(&out);
        assert_eq!(p.len(), 1);
        let icmp = Icmpv4Packet::new_checked(&p[0][20..]).unwrap();
        assert_eq!(icmp.msg_type(), Icmpv4Message::EchoReply);
        out.clear();
        // A TTL-1 datagram to a group, or an ICMP error on its way out: dropped, unanswered.
        let mcast = Ipv4Addr::new(239, 255, 255, 250);
        let ssdp = with_ttl(udp_frame(sa(GUEST_IP, 5000), sa(mcast, 1900), b"M"), 1);
        e.handle_frame(T0, &ssdp, &mut h, &mut out);
        let unreachable = [3, 3, 0, 0, 0, 0, 0, 0];
        let mut msg = unreachable.to_vec();
        msg.extend_from_slice(&quote_of(&ssdp));
        Icmpv4Packet::new_unchecked(&mut msg[..]).fill_checksum();
        let err = ipv4_frame(GUEST_IP, REMOTE_IP, IpProtocol::Icmp, 4, 0, false, &msg);
        e.handle_frame(T0, &with_ttl(err, 1), &mut h, &mut out);
        assert!(out.is_empty());
        assert_eq!(e.stats().drops_of(DropReason::TtlExceeded), 0);
    }

    #[test]
    fn datagrams_leave_with_the_guests_ttl_less_one_and_normal_ones_untouched() {
        let (mut e, mut h, mut out) = setup();
        let (g, d) = (sa(GUEST_IP, 5000), sa(REMOTE_IP, 33434));
        e.handle_frame(T0, &udp_frame(g, d, b"a"), &mut h, &mut out);
        let sock = only(&h, |s| matches!(s, SimSocket::Udp(_)));
        assert_eq!(
            (h.udp(sock).unwrap().ttl, h.udp(sock).unwrap().ttl_sets),
            (None, 0)
        );
        for (ttl, want, sets) in [
            (5, Some(4), 1),
            (5, Some(4), 1),
            (2, Some(1), 2),
            (64, None, 3),
        ] {
            let f = with_ttl(udp_frame(g, d, b"a"), ttl);
            e.handle_frame(T0, &f, &mut h, &mut out);
            let u = h.udp(sock).unwrap();
            assert_eq!((u.ttl, u.ttl_sets), (want, sets), "guest TTL {ttl}");
        }
        e.handle_frame(T0, &udp_frame(g, d, b"a"), &mut h, &mut out);
        assert_eq!(h.udp(sock).unwrap().ttl_sets, 3);
        assert_eq!(h.udp(sock).unwrap().sent.len(), 6);

        e.handle_frame(T0, &echo_frame(REMOTE_IP, 7, 1, 3), &mut h, &mut out);
        e.handle_frame(T0, &echo_frame(REMOTE_IP, 7, 2, 128), &mut h, &mut out);
        let icmp = only(&h, |s| matches!(s, SimSocket::Icmp(_)));
        let SimSocket::Icmp(i) = &h.sockets[&icmp] else {
            unreachable!()
        };
        assert_eq!(i.sent_ttls, [Some(2), None]);
        assert!(out.is_empty());
    }

    #[test]
    fn udp_errors_are_relayed_from_their_sender_quoting_the_datagram_as_sent() {
        let (mut e, mut h, mut out) = setup();
        let (g, d) = (sa(GUEST_IP, 5000), sa(REMOTE_IP, 33435));
        let probe = with_ttl(udp_frame(g, d, b"traceroute"), 2);
        e.handle_frame(T0, &probe, &mut h, &mut out);
        let sock = only(&h, |s| matches!(s, SimSocket::Udp(_)));
        h.icmp_error_udp(sock, error(ROUTER, TIME_EXCEEDED, 0));
        pump(&mut e, &mut h, &mut out, T0);
        let (from, kind, code, _, quote) = icmp_error(&out);
        assert_eq!((from, kind, code), (ROUTER, TIME_EXCEEDED, 0));
        assert_eq!(quote, quote_of(&probe));
        assert_eq!(quote[8], 2, "the TTL the guest sent");

        // Codes come through as received; "fragmentation needed" carries its MTU.
        for (kind, code, info, rest) in [
            (DST_UNREACHABLE, 1, 0, [0; 4]),
            (DST_UNREACHABLE, 0, 0, [0; 4]),
            (DST_UNREACHABLE, 13, 0, [0; 4]),
            (DST_UNREACHABLE, FRAG_NEEDED, 1400, [0, 0, 0x05, 0x78]),
            (PARAMETER_PROBLEM, 0, 20, [20, 0, 0, 0]),
        ] {
            out.clear();
            let mut err = error(ROUTER, kind, code);
            err.info = info;
            h.icmp_error_udp(sock, err);
            pump(&mut e, &mut h, &mut out, T0);
            assert_eq!(icmp_error(&out), (ROUTER, kind, code, rest, quote.clone()));
        }
        // Not an error type a datagram can get: not relayed.
        out.clear();
        h.icmp_error_udp(sock, error(ROUTER, 5, 0));
        pump(&mut e, &mut h, &mut out, T0);
        assert!(out.is_empty());
        assert_eq!(e.stats().drops_of(DropReason::Unsupported), 1);

        // The host's own stack speaking for a next hop: from the virtual host.
        h.icmp_error_udp(sock, error(Ipv4Addr::UNSPECIFIED, DST_UNREACHABLE, 1));
        pump(&mut e, &mut h, &mut out, T0);
        assert_eq!(icmp_error(&out).0, HOST_IP);
    }

    #[test]
    fn an_error_pending_on_the_next_send_is_relayed_and_the_datagram_still_sent() {
        let (mut e, mut h, mut out) = setup();
        let (g, d) = (sa(GUEST_IP, 5000), sa(REMOTE_IP, 9));
        e.handle_frame(T0, &udp_frame(g, d, b"one"), &mut h, &mut out);
        let sock = only(&h, |s| matches!(s, SimSocket::Udp(_)));
        // Queued, not yet read when the guest's next datagram comes.
        h.icmp_error_udp(sock, error(ROUTER, DST_UNREACHABLE, 1));
        h.drain_events();
        e.handle_frame(T0, &udp_frame(g, d, b"two"), &mut h, &mut out);
        assert_eq!(icmp_error(&out).0, ROUTER);
        assert_eq!(h.udp(sock).unwrap().sent.len(), 2);
    }

    #[test]
    fn port_unreachable_from_the_loopback_is_shown_from_the_alias() {
        let alias = Ipv4Addr::new(192, 168, 30, 2);
        let (mut e, mut h, mut out) = setup_with(|c| c.nat.host_loopback = Some(alias));
        e.handle_frame(
            T0,
            &udp_frame(sa(GUEST_IP, 5000), sa(alias, 9), b"x"),
            &mut h,
            &mut out,
        );
        let sock = only(&h, |s| matches!(s, SimSocket::Udp(_)));
        h.refuse_udp(sock);
        pump(&mut e, &mut h, &mut out, T0);
        let (from, kind, code, _, _) = icmp_error(&out);
        assert_eq!((from, kind, code), (alias, DST_UNREACHABLE, 3));
    }

    #[test]
    fn echo_errors_quote_the_guests_request_whichever_of_them_it_was() {
        let (mut e, mut h, mut out) = setup_with(|c| c.nat.icmp = IcmpMode::Real);
        let first = echo_frame(REMOTE_IP, 0x1234, 1, 1 + 1);
        let second = echo_frame(REMOTE_IP, 0x1234, 2, 3);
        e.handle_frame(T0, &first, &mut h, &mut out);
        e.handle_frame(T0, &second, &mut h, &mut out);
        let sock = only(&h, |s| matches!(s, SimSocket::Icmp(_)));
        // The host's ping socket sent the first request under its own ident.
        let SimSocket::Icmp(i) = &h.sockets[&sock] else {
            unreachable!()
        };
        let mut sent = i.sent[0].1.clone();
        sent[4..6].copy_from_slice(&0x0bcdu16.to_be_bytes());
        Icmpv4Packet::new_unchecked(&mut sent[..]).fill_checksum();
        let mut err = error(ROUTER, TIME_EXCEEDED, 0);
        err.quoted.copy_from_slice(&sent[..8]);
        err.quoted_len = 8;
        h.icmp_error_icmp(sock, err);
        pump(&mut e, &mut h, &mut out, T0);
        let (from, kind, _, _, quote) = icmp_error(&out);
        assert_eq!((from, kind), (ROUTER, TIME_EXCEEDED));
        // The guest's first request as it sent it: ident, sequence number and checksum.
        let guest_first = quote_of(&first);
        assert_eq!(quote[IPV4_HEADER_LEN..], guest_first[IPV4_HEADER_LEN..]);
        assert_eq!(quote[12..20], guest_first[12..20]);
    }

    #[test]
    fn unroutable_destinations_get_net_unreachable_from_the_virtual_host() {
        let (mut e, mut h, mut out) = setup_with(|c| c.nat.icmp = IcmpMode::Real);
        h.no_route.push(REMOTE_IP);
        let cases = [
            udp_frame(sa(GUEST_IP, 5000), sa(REMOTE_IP, 53), b"q"),
            echo_frame(REMOTE_IP, 3, 1, 64),
            syn_frame(sa(GUEST_IP, 4000), sa(REMOTE_IP, 80), 7),
        ];
        for frame in cases {
            out.clear();
            e.handle_frame(T0, &frame, &mut h, &mut out);
            let (from, kind, code, _, quote) = icmp_error(&out);
            assert_eq!((from, kind, code), (HOST_IP, DST_UNREACHABLE, 0));
            assert_eq!(quote, quote_of(&frame));
        }
        assert_eq!(e.stats().drops_of(DropReason::NoRoute), 2);
        // A route gone under an open session: its next datagram is told the same.
        h.no_route.clear();
        let (g, d) = (sa(GUEST_IP, 6000), sa(REMOTE_IP, 53));
        e.handle_frame(T0, &udp_frame(g, d, b"1"), &mut h, &mut out);
        h.no_route.push(REMOTE_IP);
        out.clear();
        let frame = udp_frame(g, d, b"2");
        e.handle_frame(T0, &frame, &mut h, &mut out);
        let (from, kind, code, _, quote) = icmp_error(&out);
        assert_eq!((from, kind, code), (HOST_IP, DST_UNREACHABLE, 0));
        assert_eq!(quote, quote_of(&frame));
        assert_eq!(e.stats().drops_of(DropReason::NoRoute), 3);
    }

    #[test]
    fn an_unreachable_connect_is_host_unreachable_and_a_refused_one_still_a_reset() {
        let (mut e, mut h, mut out) = setup();
        h.default_connect = ConnectOutcome::Unreachable(Unreachable::Host);
        let syn = syn_frame(sa(GUEST_IP, 4000), sa(REMOTE_IP, 80), 7);
        e.handle_frame(T0, &syn, &mut h, &mut out);
        pump(&mut e, &mut h, &mut out, T0);
        let (from, kind, code, _, quote) = icmp_error(&out);
        assert_eq!((from, kind, code), (HOST_IP, DST_UNREACHABLE, 1));
        assert_eq!(quote, quote_of(&syn));
        assert_eq!(e.nat.tcp.half_open(), 0);
        assert!(e.sessions().is_empty());

        out.clear();
        h.default_connect = ConnectOutcome::Refuse;
        e.handle_frame(T0, &syn, &mut h, &mut out);
        pump(&mut e, &mut h, &mut out, T0);
        let p = packets(&out);
        assert_eq!(p.len(), 1);
        assert_eq!(
            Ipv4Packet::new_checked(&p[0][..]).unwrap().next_header(),
            IpProtocol::Tcp
        );
    }

    #[test]
    fn a_checksum_follows_a_changed_word() {
        let mut msg = [8u8, 0, 0, 0, 0x12, 0x34, 0, 1, 9, 9];
        Icmpv4Packet::new_unchecked(&mut msg[..]).fill_checksum();
        let sum = u16::from_be_bytes([msg[2], msg[3]]);
        msg[4..6].copy_from_slice(&0xfedcu16.to_be_bytes());
        Icmpv4Packet::new_unchecked(&mut msg[..]).fill_checksum();
        let want = u16::from_be_bytes([msg[2], msg[3]]);
        assert_eq!(adjust_checksum(sum, 0x1234, 0xfedc), want);
    }
}
