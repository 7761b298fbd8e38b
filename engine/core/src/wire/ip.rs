//! Either IP family: what the NAT needs to build a packet toward a guest without caring which
//! family its flow is (the header, the pseudo-header sum, fragments when it does not fit).

use std::net::{IpAddr, Ipv6Addr};

use smoltcp::wire::IpProtocol;

use super::ipv4::{push_ipv4, push_ipv4_fragments, Ipv4Header, IPV4_HEADER_LEN};
use super::ipv6::{pseudo_header_sum6, push_ipv6, Ipv6Header, IPV6_HEADER_LEN};
use crate::config::Mac;
use crate::output::FrameBatch;

/// The two addresses of a packet, of one family. A flow's ends always are (they come from one
/// packet's header); should a caller ever pair families, the IPv4 one is written in its
/// IPv4-mapped IPv6 form rather than panic.
fn v6_pair(src: IpAddr, dst: IpAddr) -> Option<(Ipv6Addr, Ipv6Addr)> {
    let six = |a: IpAddr| match a {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    };
    match (src, dst) {
        (IpAddr::V4(_), IpAddr::V4(_)) => None,
        _ => Some((six(src), six(dst))),
    }
}

/// The header of a packet the NAT builds toward a guest, of either family.
#[derive(Clone, Copy, Debug)]
pub(crate) struct IpHeader {
    pub(crate) src: IpAddr,
    pub(crate) dst: IpAddr,
    pub(crate) proto: IpProtocol,
    /// IPv4's identification (unused for IPv6).
    pub(crate) ident: u16,
    /// TTL or hop limit.
    pub(crate) ttl: u8,
}

impl IpHeader {
    pub(crate) fn new(src: IpAddr, dst: IpAddr, proto: IpProtocol, ident: u16) -> IpHeader {
        IpHeader {
            src,
            dst,
            proto,
            ident,
            ttl: super::ipv6::DEFAULT_HOP_LIMIT,
        }
    }

    /// Bytes of the IP header in front of the payload.
    pub(crate) fn len(&self) -> usize {
        ip_header_len(self.src)
    }

    fn v4(&self) -> Option<Ipv4Header> {
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let mut h = Ipv4Header::new(s, d, self.proto, self.ident);
                h.ttl = self.ttl;
                Some(h)
            }
            _ => None,
        }
    }

    fn v6(&self) -> Ipv6Header {
        let unspecified = (Ipv6Addr::UNSPECIFIED, Ipv6Addr::UNSPECIFIED);
        let (s, d) = v6_pair(self.src, self.dst).unwrap_or(unspecified);
        let mut h = Ipv6Header::new(s, d, self.proto);
        h.hop_limit = self.ttl;
        h
    }

    /// The ones' complement sum of the pseudo-header of an upper-layer packet of `len` bytes.
    pub(crate) fn pseudo_sum(&self, len: usize) -> u16 {
        match self.v4() {
            Some(h) => super::ipv4::pseudo_header_sum(h.src, h.dst, self.proto.into(), len),
            None => {
                let h = self.v6();
                pseudo_header_sum6(h.src, h.dst, self.proto.into(), len)
            }
        }
    }
}

/// Bytes of the IP header the NAT writes for a packet from `src` (no options, no extension
/// headers).
pub(crate) fn ip_header_len(src: IpAddr) -> usize {
    match src {
        IpAddr::V4(_) => IPV4_HEADER_LEN,
        IpAddr::V6(_) => IPV6_HEADER_LEN,
    }
}

/// Appends one Ethernet + IP frame whose upper-layer payload (`payload_len` bytes) `fill`
/// writes.
pub(crate) fn push_ip<R>(
    out: &mut FrameBatch,
    src: Mac,
    dst: Mac,
    h: &IpHeader,
    payload_len: usize,
    fill: impl FnOnce(&mut [u8]) -> R,
) -> R {
    match h.v4() {
        Some(h4) => push_ipv4(out, src, dst, &h4, payload_len, fill),
        None => push_ipv6(out, src, dst, &h.v6(), payload_len, fill),
    }
}

/// Writes the Ethernet and IP headers at the start of `frame` for an upper-layer payload of
/// `payload_len` bytes (for a builder that learns the payload's length only as it fills it).
pub(crate) fn emit_ip_headers(
    frame: &mut [u8],
    src: Mac,
    dst: Mac,
    h: &IpHeader,
    payload_len: usize,
) {
    use smoltcp::wire::{EthernetProtocol, ETHERNET_HEADER_LEN};
    match h.v4() {
        Some(h4) => {
            super::ethernet::emit_ethernet(frame, src, dst);
            super::ipv4::emit_ipv4_header(
                &mut frame[ETHERNET_HEADER_LEN..],
                &h4,
                payload_len,
                0,
                false,
            );
        }
        None => {
            super::ethernet::emit_ethernet_type(frame, src, dst, EthernetProtocol::Ipv6);
            super::ipv6::emit_ipv6_header(&mut frame[ETHERNET_HEADER_LEN..], &h.v6(), payload_len);
        }
    }
}

/// Appends a whole datagram (its upper-layer bytes built in `datagram`), cut into fragments no
/// larger than `mtu` when it does not fit in one packet (IPv6: with a fragment header, as its
/// source may). Returns the number of frames.
pub(crate) fn push_ip_fragments(
    out: &mut FrameBatch,
    src: Mac,
    dst: Mac,
    h: &IpHeader,
    datagram: &[u8],
    mtu: usize,
) -> usize {
    if let Some(h4) = h.v4() {
        return push_ipv4_fragments(out, src, dst, &h4, datagram, mtu);
    }
    let h6 = h.v6();
    if IPV6_HEADER_LEN + datagram.len() <= mtu {
        push_ipv6(out, src, dst, &h6, datagram.len(), |p| {
            p.copy_from_slice(datagram)
        });
        return 1;
    }
    const FRAG_HEADER_LEN: usize = 8;
    let per = ((mtu - IPV6_HEADER_LEN - FRAG_HEADER_LEN) / 8) * 8;
    let mut frag = h6;
    frag.next_header = IpProtocol::Ipv6Frag;
    // The identification only has to be unique among this source's datagrams in flight to
    // this destination; the IPv4 ident sequence serves.
    let ident = u32::from(h.ident) | 0x8000_0000;
    let mut n = 0;
    for (i, chunk) in datagram.chunks(per).enumerate() {
        let offset = i * per;
        let more = offset + chunk.len() < datagram.len();
        push_ipv6(out, src, dst, &frag, FRAG_HEADER_LEN + chunk.len(), |p| {
            p[0] = h.proto.into();
            p[1] = 0;
            p[2..4].copy_from_slice(&((offset as u16) | u16::from(more)).to_be_bytes());
            p[4..8].copy_from_slice(&ident.to_be_bytes());
            p[FRAG_HEADER_LEN..].copy_from_slice(chunk);
        });
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Ipv6View;
    use smoltcp::wire::ETHERNET_HEADER_LEN;

    const A: Mac = Mac([0, 0xac, 1, 2, 3, 4]);
    const B: Mac = Mac([2, 0, 0, 0, 0, 1]);

    #[test]
    fn ipv6_fragments_cover_the_datagram() {
        let mut out = FrameBatch::new();
        let data: Vec<u8> = (0..4000u32).map(|i| i as u8).collect();
        let h = IpHeader::new(
            "fd00::1".parse().unwrap(),
            "fd00::2".parse().unwrap(),
            IpProtocol::Udp,
            9,
        );
        assert_eq!(push_ip_fragments(&mut out, A, B, &h, &data, 1500), 3);
        let mut joined = Vec::new();
        for (i, f) in out.iter().enumerate() {
            assert!(f.len() - ETHERNET_HEADER_LEN <= 1500);
            let v = Ipv6View::parse(&f[ETHERNET_HEADER_LEN..]).unwrap();
            let frag = v.fragment.unwrap();
            assert_eq!(frag.offset, joined.len());
            assert_eq!(frag.more, i < 2);
            assert_eq!(v.proto, IpProtocol::Udp);
            joined.extend_from_slice(v.upper());
        }
        assert_eq!(joined, data);
    }

    #[test]
    fn a_datagram_that_fits_is_one_packet_of_its_family() {
        let mut out = FrameBatch::new();
        let h = IpHeader::new(
            "192.0.2.1".parse().unwrap(),
            "192.168.30.10".parse().unwrap(),
            IpProtocol::Udp,
            9,
        );
        assert_eq!(push_ip_fragments(&mut out, A, B, &h, &[0; 100], 1500), 1);
        assert_eq!(out.get(0).unwrap().len(), ETHERNET_HEADER_LEN + 20 + 100);
        let h = IpHeader::new(
            "2001:db8::1".parse().unwrap(),
            "fd00::2".parse().unwrap(),
            IpProtocol::Udp,
            9,
        );
        assert_eq!(push_ip_fragments(&mut out, A, B, &h, &[0; 100], 1500), 1);
        assert_eq!(out.get(1).unwrap().len(), ETHERNET_HEADER_LEN + 40 + 100);
    }
}
