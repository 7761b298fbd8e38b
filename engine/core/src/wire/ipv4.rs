//! IPv4: the header the core writes, and the builders that lay out Ethernet + IPv4 + payload
//! (in one frame, or cut into fragments).

use std::net::Ipv4Addr;

use smoltcp::wire::{IpProtocol, Ipv4Packet, ETHERNET_HEADER_LEN};

use super::ethernet::emit_ethernet;
use crate::config::Mac;
use crate::output::FrameBatch;

pub(crate) const IPV4_HEADER_LEN: usize = 20;
pub(crate) const DEFAULT_TTL: u8 = 64;

/// The IPv4 header fields a builder chooses.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ipv4Header {
    pub(crate) src: Ipv4Addr,
    pub(crate) dst: Ipv4Addr,
    pub(crate) protocol: IpProtocol,
    pub(crate) ident: u16,
    pub(crate) ttl: u8,
    pub(crate) dont_frag: bool,
}

impl Ipv4Header {
    pub(crate) fn new(
        src: Ipv4Addr,
        dst: Ipv4Addr,
        protocol: IpProtocol,
        ident: u16,
    ) -> Ipv4Header {
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

/// Writes the IPv4 header (with checksum) of a packet whose payload is `payload_len` bytes,
/// at offset `frag_offset` (bytes, a multiple of 8) of its datagram.
pub(crate) fn emit_ipv4_header(
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
pub(crate) fn push_ipv4<R>(
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
pub(crate) fn push_ipv4_fragments(
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

#[cfg(test)]
mod tests {
    use super::*;

    const A: Mac = Mac([0, 0xac, 1, 2, 3, 4]);
    const B: Mac = Mac([2, 0, 0, 0, 0, 1]);

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
