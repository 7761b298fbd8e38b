//! ICMP of the virtual host itself: echo replies for its own addresses, and the error messages
//! (port unreachable, fragmentation needed) it sends to guests.

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    Icmpv4DstUnreachable, Icmpv4Packet, Icmpv4Repr, IpProtocol, Ipv4Packet, Ipv4Repr,
};

use std::net::IpAddr;

use crate::nat::GuestIp;
use crate::output::FrameBatch;
use crate::stats::DropReason;
use crate::wire::{push_ipv4, Ipv4Header};
use crate::Ctx;

/// An echo request: (ident, sequence number, data).
pub(crate) type Echo<'a> = (u16, u16, &'a [u8]);

/// Checks an ICMP message from a guest (`ip` is its IPv4 packet) and returns it if it is an echo
/// request; anything else is a drop with its reason.
pub(crate) fn parse_echo_request<'a>(ip: &Ipv4Packet<&'a [u8]>) -> Result<Echo<'a>, DropReason> {
    let packet = Icmpv4Packet::new_checked(ip.payload()).map_err(|_| DropReason::Malformed)?;
    if !packet.verify_checksum() {
        return Err(DropReason::BadChecksum);
    }
    match Icmpv4Repr::parse(&packet, &ChecksumCapabilities::default()) {
        Ok(Icmpv4Repr::EchoRequest {
            ident,
            seq_no,
            data,
        }) => Ok((ident, seq_no, data)),
        _ => Err(DropReason::Unsupported),
    }
}

/// Answers an echo request addressed to the virtual host. `ip` is the request's IPv4 packet.
pub(crate) fn handle_to_host(
    ctx: &mut Ctx,
    ip: &Ipv4Packet<&[u8]>,
    out: &mut FrameBatch,
) -> Result<(), DropReason> {
    let (ident, seq_no, data) = parse_echo_request(ip)?;
    let reply = Icmpv4Repr::EchoReply {
        ident,
        seq_no,
        data,
    };
    push_icmp(ctx, ip.dst_addr(), ip.src_addr(), &reply, out)
}

/// Sends `repr` from `src` to the guest `dst` (whose MAC must be known).
pub(crate) fn push_icmp(
    ctx: &mut Ctx,
    src: std::net::Ipv4Addr,
    dst: std::net::Ipv4Addr,
    repr: &Icmpv4Repr,
    out: &mut FrameBatch,
) -> Result<(), DropReason> {
    let dst_mac = ctx.arp.lookup(dst).ok_or(DropReason::NoArp)?;
    let h = Ipv4Header::new(src, dst, IpProtocol::Icmp, ctx.next_ident());
    push_ipv4(out, ctx.mac, dst_mac, &h, repr.buffer_len(), |p| {
        repr.emit(
            &mut Icmpv4Packet::new_unchecked(p),
            &ChecksumCapabilities::default(),
        )
    });
    Ok(())
}

/// RFC 792/1812: an error quotes the offending header and at least 8 bytes of its payload.
const QUOTED_PAYLOAD: usize = 8;

/// Why the virtual host tells a guest its packet cannot be delivered.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Unreach {
    /// Nothing listens at the port (UDP to the virtual host).
    Port,
    /// The egress policy refuses the destination.
    Prohibited,
}

/// Sends a destination-unreachable error about the guest's packet `ip` back to the guest, from
/// `src` (the virtual host, or the destination it speaks for), in ICMP of the packet's family.
pub(crate) fn push_unreachable(
    ctx: &mut Ctx,
    src: IpAddr,
    reason: Unreach,
    ip: &GuestIp,
    out: &mut FrameBatch,
) -> Result<(), DropReason> {
    let (IpAddr::V4(src4), IpAddr::V4(guest), IpAddr::V4(dst)) = (src, ip.src, ip.dst) else {
        let code = match reason {
            Unreach::Port => 4,
            Unreach::Prohibited => 1,
        };
        let quote = crate::nat::icmp_error::Quote::of(ip);
        let kind = (crate::nat::icmp_error::V6_DST_UNREACHABLE, code);
        let q = crate::nat::icmp_error::error_quote(ip, &quote);
        return crate::nat::icmp_error::push_error(ctx, out, src, ip.src, None, kind, [0; 4], q);
    };
    let header = Ipv4Repr {
        src_addr: guest,
        dst_addr: dst,
        next_header: ip.proto,
        payload_len: ip.upper.len(),
        hop_limit: ip.ttl,
    };
    let quoted = &ip.upper[..ip.upper.len().min(QUOTED_PAYLOAD)];
    let repr = Icmpv4Repr::DstUnreachable {
        reason: match reason {
            Unreach::Port => Icmpv4DstUnreachable::PortUnreachable,
            Unreach::Prohibited => Icmpv4DstUnreachable::CommProhibited,
        },
        header,
        data: quoted,
    };
    push_icmp(ctx, src4, guest, &repr, out)
}
