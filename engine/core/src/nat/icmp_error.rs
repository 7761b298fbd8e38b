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
use std::net::IpAddr;

use smoltcp::wire::{Icmpv4Packet, IpProtocol, Ipv4Packet};

use crate::config::Mac;
use crate::nat::{host_ip_for, is_guest_address, is_host_ip, is_routable, GuestIp};
use crate::output::FrameBatch;
use crate::sockio::{IcmpError, SockId, SockIo, Unreachable};
use crate::stats::DropReason;
use crate::wire::{push_ip, upper_checksum6, IpHeader, IPV4_HEADER_LEN, IPV6_HEADER_LEN};
use crate::Ctx;

/// A guest TTL at least this large is a sender's initial one (64 on Linux, 128 on Windows, 255
/// on some): the host's default TTL is as good, and the socket is not touched.
pub(crate) const NORMAL_TTL: u8 = 64;

/// RFC 792: an error quotes the offending IP header and the first 64 bits of its payload.
/// ICMPv6 (RFC 4443) would quote as much as fits in 1280 bytes; the fixed header, the
/// extension headers and 8 bytes after them are what a receiver matches its socket by.
const QUOTED_PAYLOAD: usize = 8;
/// Room for an IPv6 quote with a few extension headers; an IPv4 quote takes 28 bytes of it.
const QUOTE_MAX: usize = 128;
const ICMP_HEADER_LEN: usize = 8;

const DST_UNREACHABLE: u8 = 3;
const TIME_EXCEEDED: u8 = 11;
const PARAMETER_PROBLEM: u8 = 12;
/// The code of destination unreachable that says "fragmentation needed" (its MTU in the
/// second half of the header's last word).
const FRAG_NEEDED: u8 = 4;
const ECHO_REQUEST: u8 = 8;

/// ICMPv6's types (RFC 4443).
pub(crate) const V6_DST_UNREACHABLE: u8 = 1;
pub(crate) const V6_PACKET_TOO_BIG: u8 = 2;
pub(crate) const V6_TIME_EXCEEDED: u8 = 3;
pub(crate) const V6_PARAMETER_PROBLEM: u8 = 4;
pub(crate) const V6_ECHO_REQUEST: u8 = 128;

/// The start of a guest's datagram as an ICMP error about it quotes it: its IP header (IPv4
/// options left out, IPv6 extension headers kept) and the first 8 bytes of its payload (for
/// IPv6, up to `QUOTE_MAX` bytes of the packet).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Quote {
    bytes: [u8; QUOTE_MAX],
    len: u8,
    /// Where the quoted upper-layer bytes begin.
    upper_at: u8,
}

impl Default for Quote {
    fn default() -> Quote {
        Quote {
            bytes: [0; QUOTE_MAX],
            len: 0,
            upper_at: 0,
        }
    }
}

impl Quote {
    /// The quote of the guest's datagram `ip`.
    pub(crate) fn of(ip: &GuestIp) -> Quote {
        let mut q = Quote::default();
        let n = ip.upper.len().min(QUOTED_PAYLOAD);
        if ip.is_v6() {
            // As much as the quote holds (RFC 4443 asks for as much as fits).
            let header = ip.packet.len() - ip.upper.len();
            let len = ip.packet.len().min(QUOTE_MAX);
            q.bytes[..len].copy_from_slice(&ip.packet[..len]);
            q.len = len as u8;
            q.upper_at = header.min(QUOTE_MAX) as u8;
            return q;
        }
        let raw = ip.packet;
        q.bytes[..IPV4_HEADER_LEN].copy_from_slice(&raw[..IPV4_HEADER_LEN]);
        q.bytes[IPV4_HEADER_LEN..][..n].copy_from_slice(&ip.upper[..n]);
        let options = (raw.len() - ip.upper.len()).saturating_sub(IPV4_HEADER_LEN);
        if options > 0 {
            // The quoted header says it has no options, and its length and checksum agree.
            let total = u16::from_be_bytes([raw[2], raw[3]]);
            let mut h = Ipv4Packet::new_unchecked(&mut q.bytes[..IPV4_HEADER_LEN]);
            h.set_header_len(IPV4_HEADER_LEN as u8);
            h.set_total_len(total.saturating_sub(options as u16));
            h.fill_checksum();
        }
        q.len = (IPV4_HEADER_LEN + n) as u8;
        q.upper_at = IPV4_HEADER_LEN as u8;
        q
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    fn is_v6(&self) -> bool {
        self.len > 0 && self.bytes[0] >> 4 == 6
    }

    /// The quoted upper-layer protocol (for IPv6, the last next-header before it).
    fn proto(&self) -> Option<IpProtocol> {
        if self.is_v6() {
            let at = usize::from(self.upper_at);
            if at == IPV6_HEADER_LEN {
                return Some(IpProtocol::from(self.bytes[6]));
            }
            // The last extension header's next-header field is not tracked; only the plain
            // layout (no extension headers) is rewritten.
            return None;
        }
        self.bytes().get(9).map(|&p| IpProtocol::from(p))
    }

    /// The quote with its echo request's ident and checksum put back as the guest sent them:
    /// the host's echo socket rewrote the ident, and the error quotes the request as the host
    /// sent it. `err.quoted` is that request's start.
    fn with_echo(&self, err: &IcmpError) -> Quote {
        let mut q = *self;
        let at = usize::from(q.upper_at);
        let request = if q.is_v6() {
            V6_ECHO_REQUEST
        } else {
            ECHO_REQUEST
        };
        if err.quoted_len as usize >= QUOTED_PAYLOAD
            && err.quoted[0] == request
            && usize::from(q.len) >= at + QUOTED_PAYLOAD
        {
            let payload = &mut q.bytes[at..at + QUOTED_PAYLOAD];
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

    /// The address of the guest that sent the quoted datagram.
    fn source(&self) -> Option<IpAddr> {
        quote_source(self.bytes())
    }
}

/// What an ICMP error the virtual host makes about the guest's packet `ip` quotes: IPv4's
/// header and 8 bytes (RFC 792, `Quote`); for IPv6, as much of the packet as keeps the error
/// within the minimum MTU (RFC 4443 2.4 (c)).
pub(crate) fn error_quote<'a>(ip: &GuestIp<'a>, q: &'a Quote) -> &'a [u8] {
    if ip.is_v6() {
        const ROOM: usize = 1280 - IPV6_HEADER_LEN - ICMP_HEADER_LEN;
        &ip.packet[..ip.packet.len().min(ROOM)]
    } else {
        q.bytes()
    }
}

/// A checksum with one 16-bit word of what it covers changed from `old` to `new` (RFC 1624).
fn adjust_checksum(sum: u16, old: u16, new: u16) -> u16 {
    let mut s = u32::from(!sum) + u32::from(!old) + u32::from(new);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

/// The TTL a UDP or ICMP session's socket sends with: 0 for the host's default, else the TTL
/// it was set to.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct SockTtl(u8);

impl SockTtl {
    /// Makes `sock` send with the guest's TTL less one (`guest_ttl` is the TTL of the guest's
    /// latest packet), or with the host's default for a normal TTL; only a change costs a call.
    #[inline]
    pub(crate) fn follow(&mut self, guest_ttl: u8, sock: SockId, io: &mut impl SockIo) {
        if guest_ttl >= NORMAL_TTL && self.0 == 0 {
            return;
        }
        self.set(guest_ttl, sock, io);
    }

    /// Whether `follow` with `guest_ttl` would set another TTL on the socket.
    #[inline]
    pub(crate) fn changes(&self, guest_ttl: u8) -> bool {
        Self::want(guest_ttl) != self.0
    }

    fn want(guest_ttl: u8) -> u8 {
        if guest_ttl >= NORMAL_TTL {
            0
        } else {
            guest_ttl.saturating_sub(1).max(1)
        }
    }

    #[cold]
    fn set(&mut self, guest_ttl: u8, sock: SockId, io: &mut impl SockIo) {
        let want = Self::want(guest_ttl);
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

/// A guest's packet `ip` whose TTL (hop limit) is 1 or 0 and that the NAT would carry onward:
/// time exceeded goes back from the virtual host, and true says the packet is not carried.
/// False for what the virtual host takes itself, what is not a guest's, what could not be
/// carried anyway, and ICMP other than echo requests (no error about an error).
#[cold]
pub(crate) fn time_exceeded(ctx: &mut Ctx, ip: &GuestIp, out: &mut FrameBatch) -> bool {
    let (src, dst) = (ip.src, ip.dst);
    if is_host_ip(ctx, dst) {
        return false;
    }
    let to_host_loopback = match dst {
        IpAddr::V4(d) => Some(d) == ctx.cfg.nat.host_loopback,
        IpAddr::V6(_) => false,
    };
    let routable = to_host_loopback || is_routable(&ctx.cfg, dst);
    if !routable || !is_guest_address(ctx, src) {
        return false;
    }
    let request = if ip.is_v6() {
        V6_ECHO_REQUEST
    } else {
        ECHO_REQUEST
    };
    if ip.proto == ip.icmp_proto() && ip.upper.first() != Some(&request) {
        return false;
    }
    let quote = Quote::of(ip);
    let from = host_ip_for(ctx, src);
    let kind = if ip.is_v6() {
        V6_TIME_EXCEEDED
    } else {
        TIME_EXCEEDED
    };
    let quoted = error_quote(ip, &quote);
    if let Err(why) = push_error(ctx, out, from, src, None, (kind, 0), [0; 4], quoted) {
        ctx.stats.drop(why);
    }
    true
}

/// Tells the guest whose datagram `quote` is that its destination is unreachable for `why`,
/// from the virtual host (its router, which found no way on).
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
    let from = host_ip_for(ctx, to);
    let kind = if to.is_ipv6() {
        // RFC 4443 3.1: no route 0, administratively prohibited 1, address unreachable 3.
        let code = match why {
            Unreachable::Net => 0,
            Unreachable::Host => 3,
            Unreachable::Prohibited => 1,
        };
        (V6_DST_UNREACHABLE, code)
    } else {
        (DST_UNREACHABLE, why.icmp_code())
    };
    push_error(ctx, out, from, to, mac, kind, [0; 4], quote)
}

/// If the host refused a send or connect for want of a route (`e` carries an `Unreachable`),
/// tells the guest whose datagram `quote` is, and returns true; false for any other error.
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

/// A session's destination: where its socket sends on the sock side, and the address the
/// guest addressed (they differ for the host-loopback alias). An error from the one is shown
/// to the guest as from the other.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Destination {
    pub(crate) host: IpAddr,
    pub(crate) shown: IpAddr,
}

/// Relays `err`, an ICMP error the host received about a session's datagram, to the guest
/// whose datagram `quote` is: from the router that sent it (or from the destination as the
/// guest knows it, or from the virtual host for one of the host's own stack), with the type,
/// code and the fields that matter to the guest (the MTU of "fragmentation needed" or "packet
/// too big", a parameter problem's pointer).
pub(crate) fn relay(
    ctx: &mut Ctx,
    out: &mut FrameBatch,
    err: &IcmpError,
    quote: &Quote,
    dst: Destination,
    mac: Option<Mac>,
) -> Result<(), DropReason> {
    let rest = if quote.is_v6() {
        match (err.icmp_type, err.code) {
            (V6_DST_UNREACHABLE, 0..=6) | (V6_TIME_EXCEEDED, 0..=1) => [0; 4],
            (V6_PACKET_TOO_BIG, _) | (V6_PARAMETER_PROBLEM, _) => err.info.to_be_bytes(),
            _ => return Err(DropReason::Unsupported),
        }
    } else {
        match (err.icmp_type, err.code) {
            (DST_UNREACHABLE, FRAG_NEEDED) => {
                let mtu = err.info.min(u32::from(u16::MAX)) as u16;
                let b = mtu.to_be_bytes();
                [0, 0, b[0], b[1]]
            }
            (DST_UNREACHABLE, 0..=15) | (TIME_EXCEEDED, 0..=1) => [0; 4],
            (PARAMETER_PROBLEM, _) => [err.info.min(255) as u8, 0, 0, 0],
            _ => return Err(DropReason::Unsupported),
        }
    };
    let quote = match quote.proto() {
        Some(IpProtocol::Icmp) | Some(IpProtocol::Icmpv6) => quote.with_echo(err),
        _ => *quote,
    };
    let Some(to) = quote.source() else {
        return Err(DropReason::Malformed);
    };
    let from = if err.from == dst.host {
        dst.shown
    } else if err.from.is_unspecified() {
        host_ip_for(ctx, to)
    } else {
        err.from
    };
    if from.is_ipv6() != to.is_ipv6() {
        return Err(DropReason::Malformed);
    }
    let kind = (err.icmp_type, err.code);
    push_error(ctx, out, from, to, mac, kind, rest, quote.bytes())
}

/// The error a connected UDP socket reports as "connection refused" when its error queue is
/// empty: port unreachable from the destination `from`.
pub(crate) fn port_unreachable(from: IpAddr) -> IcmpError {
    let (icmp_type, code) = if from.is_ipv6() {
        (V6_DST_UNREACHABLE, 4)
    } else {
        (DST_UNREACHABLE, 3)
    };
    IcmpError {
        from,
        icmp_type,
        code,
        info: 0,
        quoted: [0; 8],
        quoted_len: 0,
    }
}

/// The source address of the datagram `quote` quotes.
fn quote_source(quote: &[u8]) -> Option<IpAddr> {
    match quote.first()? >> 4 {
        4 => {
            let src: [u8; 4] = quote.get(12..16)?.try_into().ok()?;
            Some(IpAddr::from(src))
        }
        6 => {
            let src: [u8; 16] = quote.get(8..24)?.try_into().ok()?;
            Some(IpAddr::from(src))
        }
        _ => None,
    }
}

/// Sends ICMP (ICMPv6 when `to` is IPv6) error `kind` (type, code) with `rest` (the
/// header's second word) and `quote` from `from` to the guest `to`, at `mac` or where its
/// neighbour entry says.
#[allow(clippy::too_many_arguments)]
pub(crate) fn push_error(
    ctx: &mut Ctx,
    out: &mut FrameBatch,
    from: IpAddr,
    to: IpAddr,
    mac: Option<Mac>,
    (kind, code): (u8, u8),
    rest: [u8; 4],
    quote: &[u8],
) -> Result<(), DropReason> {
    let dst_mac = match mac {
        Some(m) => m,
        None => ctx.neighbour(to).ok_or(DropReason::NoArp)?,
    };
    let v6 = match (from, to) {
        (IpAddr::V6(f), IpAddr::V6(t)) => Some((f, t)),
        (IpAddr::V4(_), IpAddr::V4(_)) => None,
        _ => return Err(DropReason::Malformed),
    };
    let proto = if v6.is_some() {
        IpProtocol::Icmpv6
    } else {
        IpProtocol::Icmp
    };
    let h = IpHeader::new(from, to, proto, ctx.next_ident());
    let len = ICMP_HEADER_LEN + quote.len();
    push_ip(out, ctx.mac, dst_mac, &h, len, |p| {
        p[0] = kind;
        p[1] = code;
        p[2..4].fill(0);
        p[4..8].copy_from_slice(&rest);
        p[ICMP_HEADER_LEN..].copy_from_slice(quote);
        match v6 {
            Some((f, t)) => {
                let sum = upper_checksum6(f, t, IpProtocol::Icmpv6.into(), p);
                p[2..4].copy_from_slice(&sum.to_be_bytes());
            }
            None => Icmpv4Packet::new_unchecked(p).fill_checksum(),
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
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
    const QUOTE_LEN: usize = IPV4_HEADER_LEN + QUOTED_PAYLOAD;

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
            from: std::net::IpAddr::from(from),
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
        h.no_route.push(std::net::IpAddr::from(REMOTE_IP));
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
        h.no_route.push(std::net::IpAddr::from(REMOTE_IP));
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
