//! Frame building on top of `smoltcp::wire`: one place that lays out Ethernet + IPv4 + payload,
//! so every protocol of the virtual host and the NAT emits frames the same way.

pub mod dhcp_options;

use std::net::Ipv4Addr;

use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, IpProtocol, Ipv4Packet, UdpPacket,
    ETHERNET_HEADER_LEN, UDP_HEADER_LEN,
};

use crate::config::Mac;
use crate::output::FrameBatch;

pub const IPV4_HEADER_LEN: usize = 20;
pub const DEFAULT_TTL: u8 = 64;
/// The DNS server port (UDP and TCP).
pub const DNS_PORT: u16 = 53;

pub fn eth(mac: Mac) -> EthernetAddress {
    EthernetAddress(mac.0)
}

pub fn mac(addr: EthernetAddress) -> Mac {
    Mac(addr.0)
}

/// The IPv4 header fields a builder chooses.
#[derive(Clone, Copy, Debug)]
pub struct Ipv4Header {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub protocol: IpProtocol,
    pub ident: u16,
    pub ttl: u8,
    pub dont_frag: bool,
}

impl Ipv4Header {
    pub fn new(src: Ipv4Addr, dst: Ipv4Addr, protocol: IpProtocol, ident: u16) -> Ipv4Header {
        Ipv4Header {
            src,
            dst,
            protocol,
            ident,
            ttl: DEFAULT_TTL,
            dont_frag: true,
        }
    }
}

/// Writes the Ethernet header of an IPv4 frame.
pub fn emit_ethernet(frame: &mut [u8], src: Mac, dst: Mac) {
    let mut eth_frame = EthernetFrame::new_unchecked(frame);
    eth_frame.set_src_addr(eth(src));
    eth_frame.set_dst_addr(eth(dst));
    eth_frame.set_ethertype(EthernetProtocol::Ipv4);
}

/// Writes the IPv4 header (with checksum) of a packet whose payload is `payload_len` bytes,
/// at offset `frag_offset` (bytes, a multiple of 8) of its datagram.
pub fn emit_ipv4_header(
    packet: &mut [u8],
    h: &Ipv4Header,
    payload_len: usize,
    frag_offset: usize,
    more_frags: bool,
) {
    let mut ip = Ipv4Packet::new_unchecked(packet);
    ip.set_version(4);
    ip.set_header_len(IPV4_HEADER_LEN as u8);
    ip.set_dscp(0);
    ip.set_ecn(0);
    ip.set_total_len((IPV4_HEADER_LEN + payload_len) as u16);
    ip.set_ident(h.ident);
    ip.clear_flags();
    ip.set_dont_frag(h.dont_frag);
    ip.set_more_frags(more_frags);
    ip.set_frag_offset(frag_offset as u16);
    ip.set_hop_limit(h.ttl);
    ip.set_next_header(h.protocol);
    ip.set_src_addr(h.src);
    ip.set_dst_addr(h.dst);
    ip.fill_checksum();
}

/// Appends one Ethernet + IPv4 frame whose L4 payload (`payload_len` bytes) `fill` writes. The
/// payload must fit in one packet; see `push_ipv4_fragments` for datagrams that do not.
pub fn push_ipv4<R>(
    out: &mut FrameBatch,
    src: Mac,
    dst: Mac,
    h: &Ipv4Header,
    payload_len: usize,
    fill: impl FnOnce(&mut [u8]) -> R,
) -> R {
    let size = ETHERNET_HEADER_LEN + IPV4_HEADER_LEN + payload_len;
    out.push_with(size, |frame| {
        emit_ethernet(frame, src, dst);
        emit_ipv4_header(&mut frame[ETHERNET_HEADER_LEN..], h, payload_len, 0, false);
        fill(&mut frame[ETHERNET_HEADER_LEN + IPV4_HEADER_LEN..])
    })
}

/// Appends a whole IPv4 datagram (its L4 bytes already built in `datagram`), cut into fragments
/// no larger than `mtu` when it does not fit in one packet. Returns the number of frames.
pub fn push_ipv4_fragments(
    out: &mut FrameBatch,
    src: Mac,
    dst: Mac,
    h: &Ipv4Header,
    datagram: &[u8],
    mtu: usize,
) -> usize {
    if IPV4_HEADER_LEN + datagram.len() <= mtu {
        push_ipv4(out, src, dst, h, datagram.len(), |p| {
            p.copy_from_slice(datagram)
        });
        return 1;
    }
    // Every fragment but the last carries a multiple of 8 bytes.
    let per = ((mtu - IPV4_HEADER_LEN) / 8) * 8;
    let mut h = *h;
    h.dont_frag = false;
    let mut n = 0;
    for (i, chunk) in datagram.chunks(per).enumerate() {
        let offset = i * per;
        let more = offset + chunk.len() < datagram.len();
        let size = ETHERNET_HEADER_LEN + IPV4_HEADER_LEN + chunk.len();
        out.push_with(size, |frame| {
            emit_ethernet(frame, src, dst);
            emit_ipv4_header(
                &mut frame[ETHERNET_HEADER_LEN..],
                &h,
                chunk.len(),
                offset,
                more,
            );
            frame[ETHERNET_HEADER_LEN + IPV4_HEADER_LEN..].copy_from_slice(chunk);
        });
        n += 1;
    }
    n
}

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
pub fn push_udp(
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
    use smoltcp::wire::{Ipv4Repr, UdpRepr};

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

    #[test]
    fn fragments_cover_the_datagram() {
        let mut out = FrameBatch::new();
        let data: Vec<u8> = (0..4000u32).map(|i| i as u8).collect();
        let h = Ipv4Header::new(
            Ipv4Addr::new(1, 1, 1, 1),
            Ipv4Addr::new(2, 2, 2, 2),
            IpProtocol::Udp,
            9,
        );
        let n = push_ipv4_fragments(&mut out, A, B, &h, &data, 1500);
        assert_eq!(n, 3);
        let mut joined = Vec::new();
        for (i, f) in out.iter().enumerate() {
            let ip = Ipv4Packet::new_checked(&f[ETHERNET_HEADER_LEN..]).unwrap();
            assert!(ip.verify_checksum());
            assert!(ip.total_len() as usize <= 1500);
            assert_eq!(ip.frag_offset() as usize, joined.len());
            assert_eq!(ip.more_frags(), i < 2);
            joined.extend_from_slice(ip.payload());
        }
        assert_eq!(joined, data);
    }
}
