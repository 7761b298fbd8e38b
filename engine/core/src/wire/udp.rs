//! UDP: a datagram's header, payload and checksum, and one-frame UDP emission.

use std::net::Ipv4Addr;

use smoltcp::wire::{IpProtocol, UdpPacket, UDP_HEADER_LEN};

use super::ipv4::{push_ipv4, Ipv4Header};
use crate::config::Mac;
use crate::output::FrameBatch;

/// Writes a UDP header, payload and checksum into `buf` (exactly `UDP_HEADER_LEN + payload.len()`).
pub fn emit_udp(
    buf: &mut [u8],
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
    payload: &[u8],
) {
    let mut udp = UdpPacket::new_unchecked(buf);
    udp.set_src_port(sport);
    udp.set_dst_port(dport);
    udp.set_len((UDP_HEADER_LEN + payload.len()) as u16);
    udp.payload_mut()[..payload.len()].copy_from_slice(payload);
    udp.fill_checksum(&src.into(), &dst.into());
}

/// Appends a UDP datagram in one frame (the caller has checked it fits the MTU).
#[allow(clippy::too_many_arguments)]
pub(crate) fn push_udp(
    out: &mut FrameBatch,
    src_mac: Mac,
    dst_mac: Mac,
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
    ident: u16,
    payload: &[u8],
) {
    let h = Ipv4Header::new(src, dst, IpProtocol::Udp, ident);
    push_ipv4(
        out,
        src_mac,
        dst_mac,
        &h,
        UDP_HEADER_LEN + payload.len(),
        |p| emit_udp(p, src, sport, dst, dport, payload),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{EthernetFrame, Ipv4Packet, Ipv4Repr, UdpRepr};

    use crate::wire::eth;

    const A: Mac = Mac([0, 0xac, 1, 2, 3, 4]);
    const B: Mac = Mac([2, 0, 0, 0, 0, 1]);

    #[test]
    fn udp_frame_parses_back() {
        let mut out = FrameBatch::new();
        let (s, d) = (
            Ipv4Addr::new(192, 168, 30, 1),
            Ipv4Addr::new(192, 168, 30, 10),
        );
        push_udp(&mut out, A, B, s, 53, d, 4000, 7, b"hello");
        let f = EthernetFrame::new_checked(out.get(0).unwrap()).unwrap();
        assert_eq!(f.dst_addr(), eth(B));
        let ip = Ipv4Packet::new_checked(f.payload()).unwrap();
        let ipr = Ipv4Repr::parse(&ip, &ChecksumCapabilities::default()).unwrap();
        assert_eq!((ipr.src_addr, ipr.dst_addr), (s, d));
        let udp = UdpPacket::new_checked(ip.payload()).unwrap();
        let r =
            UdpRepr::parse(&udp, &s.into(), &d.into(), &ChecksumCapabilities::default()).unwrap();
        assert_eq!((r.src_port, r.dst_port), (53, 4000));
        assert_eq!(udp.payload(), b"hello");
    }
}
