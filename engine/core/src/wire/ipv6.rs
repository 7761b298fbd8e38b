//! IPv6: the header the core writes, the walk over a guest packet's extension headers, and
//! the addresses IPv6 derives from a MAC (link-local, multicast Ethernet, solicited-node).

// Parts of this are used only by the IPv6 virtual host and NAT that are being built on it.
#![allow(dead_code)]

use std::net::Ipv6Addr;

use smoltcp::wire::{EthernetProtocol, IpProtocol, Ipv6Packet, ETHERNET_HEADER_LEN};

use super::ethernet::emit_ethernet_type;

use super::ipv4::ones_sum;
use crate::config::Mac;
use crate::output::FrameBatch;
use crate::stats::DropReason;

pub(crate) const IPV6_HEADER_LEN: usize = 40;
/// Hop limit of what the virtual host originates (as IPv4's TTL).
pub(crate) const DEFAULT_HOP_LIMIT: u8 = 64;
/// Extension headers walked before a packet is refused as malformed: real stacks send one or
/// two; a long chain is an attack on whoever walks it.
const MAX_EXTENSION_HEADERS: usize = 8;

/// The IPv6 header fields a builder chooses.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ipv6Header {
    pub(crate) src: Ipv6Addr,
    pub(crate) dst: Ipv6Addr,
    pub(crate) next_header: IpProtocol,
    pub(crate) hop_limit: u8,
}

impl Ipv6Header {
    pub(crate) fn new(src: Ipv6Addr, dst: Ipv6Addr, next_header: IpProtocol) -> Ipv6Header {
        Ipv6Header {
            src,
            dst,
            next_header,
            hop_limit: DEFAULT_HOP_LIMIT,
        }
    }
}

/// Writes the fixed IPv6 header of a packet whose payload is `payload_len` bytes.
pub(crate) fn emit_ipv6_header(packet: &mut [u8], h: &Ipv6Header, payload_len: usize) {
    let mut ip = Ipv6Packet::new_unchecked(packet);
    ip.set_version(6);
    ip.set_traffic_class(0);
    ip.set_flow_label(0);
    ip.set_payload_len(payload_len as u16);
    ip.set_next_header(h.next_header);
    ip.set_hop_limit(h.hop_limit);
    ip.set_src_addr(h.src);
    ip.set_dst_addr(h.dst);
}

/// Appends one Ethernet + IPv6 frame whose upper-layer payload (`payload_len` bytes) `fill`
/// writes.
pub(crate) fn push_ipv6<R>(
    out: &mut FrameBatch,
    src: Mac,
    dst: Mac,
    h: &Ipv6Header,
    payload_len: usize,
    fill: impl FnOnce(&mut [u8]) -> R,
) -> R {
    let size = ETHERNET_HEADER_LEN + IPV6_HEADER_LEN + payload_len;
    out.push_with(size, |frame| {
        emit_ethernet_type(frame, src, dst, EthernetProtocol::Ipv6);
        emit_ipv6_header(&mut frame[ETHERNET_HEADER_LEN..], h, payload_len);
        fill(&mut frame[ETHERNET_HEADER_LEN + IPV6_HEADER_LEN..])
    })
}

/// The ones' complement sum (folded, not complemented) of the IPv6 pseudo-header (RFC 8200
/// 8.1) of an upper-layer packet of `len` bytes.
pub(crate) fn pseudo_header_sum6(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, len: usize) -> u16 {
    let mut p = [0u8; 40];
    p[..16].copy_from_slice(&src.octets());
    p[16..32].copy_from_slice(&dst.octets());
    p[32..36].copy_from_slice(&(len as u32).to_be_bytes());
    p[39] = proto;
    ones_sum(&p)
}

/// The checksum field's value for an upper-layer packet `data` (its checksum field zero)
/// between `src` and `dst`: TCP, UDP and ICMPv6 all use it.
pub(crate) fn upper_checksum6(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, data: &[u8]) -> u16 {
    let a = u32::from(pseudo_header_sum6(src, dst, proto, data.len()));
    let mut s = a + u32::from(ones_sum(data));
    while s > 0xffff {
        s = (s >> 16) + (s & 0xffff);
    }
    !(s as u16)
}

/// Whether `data` (checksum field included) sums to the right value.
pub(crate) fn verify_upper6(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, data: &[u8]) -> bool {
    let a = u32::from(pseudo_header_sum6(src, dst, proto, data.len()));
    let mut s = a + u32::from(ones_sum(data));
    while s > 0xffff {
        s = (s >> 16) + (s & 0xffff);
    }
    s == 0xffff
}

/// The fragment header of a packet (RFC 8200 4.5).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct FragmentHeader {
    /// Offset of this fragment's data in the datagram, in bytes.
    pub(crate) offset: usize,
    /// More fragments follow.
    pub(crate) more: bool,
    /// The datagram's identification.
    pub(crate) ident: u32,
    /// The next header it names: the first header of the fragmentable part.
    pub(crate) next: u8,
    /// Where in the packet this fragment's part of the datagram begins (past the fragment
    /// header).
    pub(crate) data_at: usize,
}

/// A guest's IPv6 packet, checked: its fixed header's fields, where its upper-layer data
/// begins after the extension headers, and its fragment header if any.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ipv6View<'a> {
    pub(crate) src: Ipv6Addr,
    pub(crate) dst: Ipv6Addr,
    pub(crate) hop_limit: u8,
    /// The upper-layer protocol (after every extension header).
    pub(crate) proto: IpProtocol,
    /// The whole packet, trimmed to its payload length (Ethernet padding removed).
    pub(crate) packet: &'a [u8],
    /// Offset in `packet` of the upper-layer data.
    pub(crate) upper_offset: usize,
    pub(crate) fragment: Option<FragmentHeader>,
}

impl<'a> Ipv6View<'a> {
    /// The upper-layer bytes (for a fragment, this fragment's part of them).
    pub(crate) fn upper(&self) -> &'a [u8] {
        &self.packet[self.upper_offset..]
    }

    /// Checks `bytes` (an Ethernet payload) as an IPv6 packet and walks its extension headers:
    /// a short packet, a payload length past the frame, a jumbogram, an extension header that
    /// overruns the packet, a chain longer than `MAX_EXTENSION_HEADERS`, a hop-by-hop header
    /// anywhere but first, or two fragment headers is `Malformed`.
    pub(crate) fn parse(bytes: &'a [u8]) -> Result<Ipv6View<'a>, DropReason> {
        let ip = Ipv6Packet::new_checked(bytes).map_err(|_| DropReason::Malformed)?;
        if ip.version() != 6 {
            return Err(DropReason::Malformed);
        }
        let total = IPV6_HEADER_LEN + ip.payload_len() as usize;
        if ip.payload_len() == 0 && ip.next_header() == IpProtocol::HopByHop {
            // A jumbogram (RFC 2675) has no place on an Ethernet segment.
            return Err(DropReason::Malformed);
        }
        let packet = bytes.get(..total).ok_or(DropReason::Malformed)?;
        let mut next = ip.next_header();
        let mut at = IPV6_HEADER_LEN;
        let mut fragment = None;
        let view = |proto, upper_offset, fragment| Ipv6View {
            src: ip.src_addr(),
            dst: ip.dst_addr(),
            hop_limit: ip.hop_limit(),
            proto,
            packet,
            upper_offset,
            fragment,
        };
        for i in 0..=MAX_EXTENSION_HEADERS {
            match next {
                IpProtocol::HopByHop | IpProtocol::Ipv6Route | IpProtocol::Ipv6Opts => {
                    if next == IpProtocol::HopByHop && i != 0 {
                        return Err(DropReason::Malformed);
                    }
                    let h = packet.get(at..at + 2).ok_or(DropReason::Malformed)?;
                    let len = 8 + 8 * usize::from(h[1]);
                    if at + len > packet.len() {
                        return Err(DropReason::Malformed);
                    }
                    next = IpProtocol::from(h[0]);
                    at += len;
                }
                IpProtocol::Ipv6Frag => {
                    let h = packet.get(at..at + 8).ok_or(DropReason::Malformed)?;
                    if fragment.is_some() {
                        return Err(DropReason::Malformed);
                    }
                    let off_flags = u16::from_be_bytes([h[2], h[3]]);
                    fragment = Some(FragmentHeader {
                        offset: usize::from(off_flags & !7),
                        more: off_flags & 1 != 0,
                        ident: u32::from_be_bytes([h[4], h[5], h[6], h[7]]),
                        next: h[0],
                        data_at: at + 8,
                    });
                    next = IpProtocol::from(h[0]);
                    at += 8;
                    if fragment.is_some_and(|f| f.offset != 0) {
                        // The headers after the first fragment's are in the first fragment.
                        break;
                    }
                }
                _ => return Ok(view(next, at, fragment)),
            }
        }
        if let Some(f) = fragment.filter(|f| f.offset != 0) {
            return Ok(view(next, at, Some(f)));
        }
        Err(DropReason::Malformed)
    }

    /// Whether this is a whole datagram (no fragment header, or an atomic one: offset 0 and no
    /// more fragments).
    pub(crate) fn is_whole(&self) -> bool {
        self.fragment.is_none_or(|f| f.offset == 0 && !f.more)
    }
}

/// The link-local address of `mac` (modified EUI-64, RFC 4291 appendix A).
pub fn link_local(mac: Mac) -> Ipv6Addr {
    let m = mac.0;
    Ipv6Addr::from([
        0xfe,
        0x80,
        0,
        0,
        0,
        0,
        0,
        0,
        m[0] ^ 0x02,
        m[1],
        m[2],
        0xff,
        0xfe,
        m[3],
        m[4],
        m[5],
    ])
}

/// The Ethernet address IPv6 multicast to `ip` goes to (RFC 2464 7).
pub(crate) fn multicast_mac(ip: Ipv6Addr) -> Mac {
    let o = ip.octets();
    Mac([0x33, 0x33, o[12], o[13], o[14], o[15]])
}

/// The solicited-node multicast address of `ip` (RFC 4291 2.7.1).
pub(crate) fn solicited_node(ip: Ipv6Addr) -> Ipv6Addr {
    let o = ip.octets();
    Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(o[13]),
        u16::from_be_bytes([o[14], o[15]]),
    )
}

/// Whether `ip` is link-local unicast (fe80::/10).
pub(crate) fn is_link_local(ip: Ipv6Addr) -> bool {
    ip.segments()[0] & 0xffc0 == 0xfe80
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(next: u8, ext: &[u8], upper: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; IPV6_HEADER_LEN];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&((ext.len() + upper.len()) as u16).to_be_bytes());
        p[6] = next;
        p[7] = 64;
        p[8..24].copy_from_slice(&"fe80::1".parse::<Ipv6Addr>().unwrap().octets());
        p[24..40].copy_from_slice(&"fe80::2".parse::<Ipv6Addr>().unwrap().octets());
        p.extend_from_slice(ext);
        p.extend_from_slice(upper);
        p
    }

    #[test]
    fn extension_headers_are_walked_and_bounded() {
        // Hop-by-hop (8 bytes) then UDP.
        let hbh = [17u8, 0, 1, 4, 0, 0, 0, 0];
        let p = packet(0, &hbh, &[1, 2, 3, 4, 0, 8, 0, 0]);
        let v = Ipv6View::parse(&p).unwrap();
        assert_eq!(v.proto, IpProtocol::Udp);
        assert_eq!(v.upper().len(), 8);
        assert!(v.is_whole());
        // Padding after the payload length is not the packet's.
        let mut padded = p.clone();
        padded.extend_from_slice(&[0; 6]);
        assert_eq!(Ipv6View::parse(&padded).unwrap().packet.len(), p.len());
        // An extension header longer than the packet.
        let p = packet(60, &[17, 5, 0, 0, 0, 0, 0, 0], &[]);
        assert_eq!(Ipv6View::parse(&p).unwrap_err(), DropReason::Malformed);
        // A hop-by-hop header that is not first.
        let p = packet(60, &[0, 0, 0, 0, 0, 0, 0, 0, 17, 0, 0, 0, 0, 0, 0, 0], &[]);
        assert_eq!(Ipv6View::parse(&p).unwrap_err(), DropReason::Malformed);
        // A chain of nine destination-options headers.
        let mut ext = Vec::new();
        for i in 0..9 {
            ext.extend_from_slice(&[if i < 8 { 60 } else { 17 }, 0, 1, 4, 0, 0, 0, 0]);
        }
        let p = packet(60, &ext, &[0; 8]);
        assert_eq!(Ipv6View::parse(&p).unwrap_err(), DropReason::Malformed);
        // A payload length past the frame.
        let mut p = packet(17, &[], &[0; 8]);
        p[5] = 200;
        assert_eq!(Ipv6View::parse(&p).unwrap_err(), DropReason::Malformed);
    }

    #[test]
    fn fragments_are_seen() {
        let first = packet(44, &[17, 0, 0, 1, 0, 0, 0, 9], &[0; 16]);
        let v = Ipv6View::parse(&first).unwrap();
        let f = v.fragment.unwrap();
        assert_eq!((f.offset, f.more, f.ident), (0, true, 9));
        assert!(!v.is_whole());
        let later = packet(44, &[17, 0, 0, 16, 0, 0, 0, 9], &[0; 16]);
        let f = Ipv6View::parse(&later).unwrap().fragment.unwrap();
        assert_eq!((f.offset, f.more), (16, false));
        let twice = packet(44, &[44, 0, 0, 1, 0, 0, 0, 9, 17, 0, 0, 1, 0, 0, 0, 9], &[]);
        assert_eq!(Ipv6View::parse(&twice).unwrap_err(), DropReason::Malformed);
    }

    #[test]
    fn addresses_from_a_mac() {
        let mac = Mac([0x00, 0xac, 0x12, 0x34, 0x56, 0x78]);
        assert_eq!(
            link_local(mac),
            "fe80::2ac:12ff:fe34:5678".parse::<Ipv6Addr>().unwrap()
        );
        let ip: Ipv6Addr = "fd00::12:3456:789a".parse().unwrap();
        assert_eq!(
            solicited_node(ip),
            "ff02::1:ff56:789a".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(
            multicast_mac(solicited_node(ip)).0,
            [0x33, 0x33, 0xff, 0x56, 0x78, 0x9a]
        );
        assert!(is_link_local(link_local(mac)));
    }

    #[test]
    fn checksums_verify() {
        let (s, d): (Ipv6Addr, Ipv6Addr) = ("fd00::1".parse().unwrap(), "fd00::2".parse().unwrap());
        let mut udp = vec![0x12, 0x34, 0x00, 0x35, 0, 11, 0, 0, b'a', b'b', b'c'];
        let c = upper_checksum6(s, d, 17, &udp);
        udp[6..8].copy_from_slice(&c.to_be_bytes());
        assert!(verify_upper6(s, d, 17, &udp));
        let pkt = smoltcp::wire::UdpPacket::new_checked(&udp[..]).unwrap();
        assert!(pkt.verify_checksum(&s.into(), &d.into()));
        udp[9] ^= 1;
        assert!(!verify_upper6(s, d, 17, &udp));
    }
}
