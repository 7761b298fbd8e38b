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
/// The Internet checksum's ones' complement sum of `data` (RFC 1071), folded to 16 bits, not
/// complemented. Eight bytes at a time in the machine's byte order: the sum does not depend on
/// the order the bytes of its words are taken in, as long as it is the same for all of them,
/// so only the result is put in network order. A TCP super-segment is 64 KiB: this is most
/// of what completing its checksum costs.
pub fn ones_sum(data: &[u8]) -> u16 {
    let add = |acc: u64, v: u64| {
        let (s, carry) = acc.overflowing_add(v);
        s + u64::from(carry)
    };
    let mut acc = 0u64;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        acc = add(acc, u64::from_ne_bytes(c.try_into().expect("8 bytes")));
    }
    let rest = chunks.remainder();
    let mut tail = [0u8; 8];
    tail[..rest.len()].copy_from_slice(rest);
    acc = add(acc, u64::from_ne_bytes(tail));
    let mut folded = (acc >> 32) + (acc & 0xffff_ffff);
    while folded > 0xffff {
        folded = (folded >> 16) + (folded & 0xffff);
    }
    let folded = folded as u16;
    if cfg!(target_endian = "little") {
        folded.swap_bytes()
    } else {
        folded
    }
}

/// The ones' complement sum (folded, not complemented) of the IPv4 pseudo-header of a
/// transport packet of `len` bytes: what a checksum left to the device starts from.
pub(crate) fn pseudo_header_sum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u16 {
    let mut p = [0u8; 12];
    p[..4].copy_from_slice(&src.octets());
    p[4..8].copy_from_slice(&dst.octets());
    p[9] = proto;
    p[10..].copy_from_slice(&(len as u16).to_be_bytes());
    ones_sum(&p)
}

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

    /// RFC 1071 as written: big-endian 16-bit words, an odd last byte padded.
    fn reference_sum(data: &[u8]) -> u16 {
        let mut acc: u32 = 0;
        for w in data.chunks(2) {
            acc += u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]));
        }
        while acc > 0xffff {
            acc = (acc >> 16) + (acc & 0xffff);
        }
        acc as u16
    }

    #[test]
    fn the_sum_is_rfc_1071s_at_every_length() {
        let mut x = 0x9e37_79b9u32;
        let data: Vec<u8> = (0..4099)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        for len in (0..64).chain([1499, 4096, 4099]) {
            assert_eq!(
                ones_sum(&data[..len]),
                reference_sum(&data[..len]),
                "len {len}"
            );
        }
        assert_eq!(ones_sum(&[0xff; 64]), 0xffff);
    }

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
