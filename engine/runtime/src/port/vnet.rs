//! The virtio-net header a TAP opened with `IFF_VNET_HDR` puts before every frame (and wants
//! before every frame written to it), and what hubnat does with it.
//!
//! With offloads on (`TUNSETOFFLOAD`: checksum, TCP segmentation over IPv4 and IPv6, and UDP
//! segmentation where the kernel has it), the guest's kernel leaves work to its "device", which
//! is hubnat: a TCP or UDP frame may come with its checksum only started (`NEEDS_CSUM`: the
//! field holds the pseudo-header's sum, the rest is to be added from `csum_start` on), a TCP
//! frame may be a super-segment of up to 64 KiB that a real device would cut into segments of
//! `gso_size`, and a UDP frame a run of datagrams of `gso_size` bytes sent as one (USO). hubnat
//! need not cut a TCP super-segment: its payload goes to its host socket in one write, as the
//! guest meant. A UDP one it cuts into its datagrams (`hubnat_core::wire::gso::cut`), whose
//! boundaries the destination must see; the NAT sends them on in one UDP_SEGMENT send again.
//! Frames written to the guest carry an empty header (nothing left to do), or the header of a
//! super-frame the guest's side is to cut (`gso_header`).

/// The largest frame a TAP gives: a TCP super-segment (64 KiB of IPv4 packet, or an IPv6 header
/// and 64 KiB of payload) or a datagram at the largest MTU, behind an Ethernet header with a
/// VLAN tag.
pub const MAX_FRAME: usize = 40 + 65535 + 18;

/// The legacy header's size (`struct virtio_net_hdr`), the TAP's default.
pub const HDR_LEN: usize = 10;

/// `flags`: the checksum from `csum_start` on is left to the device.
const F_NEEDS_CSUM: u8 = 1;

/// `gso_type` values.
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_UDP_L4: u8 = 5;
/// Set with a TCP type when the segments carry ECN's CWR.
const GSO_ECN: u8 = 0x80;

/// The header of a frame that needs nothing done (every frame hubnat writes). A static: writes
/// point the kernel at it.
pub static EMPTY: [u8; HDR_LEN] = [0; HDR_LEN];

/// The header of a marked frame hubnat writes (`FrameBatch::iter_gso`): the guest's side cuts
/// it into segments (TCP) or datagrams (UDP) of `mss` payload bytes and completes each one's
/// checksum, whose field holds the pseudo-header's sum; a frame with no more payload than
/// `mss` is only summed (no segmentation asked). `frame` is an Ethernet frame carrying IPv4 or
/// IPv6 (no extension headers: hubnat writes none) and TCP or UDP.
pub fn gso_header(frame: &[u8], mss: u16) -> [u8; HDR_LEN] {
    let v6 = frame.get(12..14) == Some(&[0x86, 0xdd][..]);
    let (ip_hl, proto) = if v6 {
        (40, frame.get(ETH_LEN + 6))
    } else {
        let ihl = usize::from(frame.get(ETH_LEN).copied().unwrap_or(0x45) & 0x0f) * 4;
        (ihl, frame.get(ETH_LEN + 9))
    };
    let csum_start = ETH_LEN + ip_hl;
    let (gso, l4_hl, csum_offset) = if proto == Some(&17) {
        (GSO_UDP_L4, 8, UDP_CSUM_OFFSET)
    } else {
        let tcp_hl = usize::from(frame.get(csum_start + 12).copied().unwrap_or(0x50) >> 4) * 4;
        (
            if v6 { GSO_TCPV6 } else { GSO_TCPV4 },
            tcp_hl,
            TCP_CSUM_OFFSET,
        )
    };
    let payload = frame.len().saturating_sub(csum_start + l4_hl);
    let gso = if payload > usize::from(mss) {
        gso
    } else {
        GSO_NONE
    };
    let mut h = [0u8; HDR_LEN];
    h[0] = F_NEEDS_CSUM;
    h[1] = gso;
    h[2..4].copy_from_slice(&((csum_start + l4_hl) as u16).to_ne_bytes());
    h[4..6].copy_from_slice(&mss.to_ne_bytes());
    h[6..8].copy_from_slice(&(csum_start as u16).to_ne_bytes());
    h[8..10].copy_from_slice(&csum_offset.to_ne_bytes());
    h
}

const ETH_LEN: usize = 14;
/// Where a TCP header's checksum lies, and a UDP header's.
const TCP_CSUM_OFFSET: u16 = 16;
const UDP_CSUM_OFFSET: u16 = 6;

/// Why a frame's header was refused (the frame is dropped, counted as malformed).
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// Shorter than a header.
    Short,
    /// A segmentation hubnat did not offer (UFO, tunnels).
    Gso(u8),
    /// The checksum to complete lies outside the frame.
    Csum { start: usize, offset: usize },
}

/// A frame as taken from behind its header: what the header leaves to hubnat.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Left {
    /// A checksum to complete.
    pub checksum: Option<LeftChecksum>,
    /// For a UDP super-frame (USO): the size of its datagrams, into which it is to be cut
    /// (`cut_udp`); its checksum then needs no completing, the cut makes each datagram's.
    pub udp_segment: Option<u16>,
}

/// Takes the header off `buf` and returns the frame with what it leaves to hubnat, not yet
/// done: a frame handled where it was read needs no checksum completed when the checksum is its
/// transport header's (`LeftChecksum::is_transport`), since the guest's kernel wrote it from
/// memory and no wire could have changed it; a frame that goes elsewhere is completed first.
pub fn take_leaving(buf: &mut [u8]) -> Result<(&mut [u8], Left), Refused> {
    if buf.len() < HDR_LEN {
        return Err(Refused::Short);
    }
    let (hdr, frame) = buf.split_at_mut(HDR_LEN);
    let left = left(&(*hdr).try_into().expect("HDR_LEN bytes"), frame.len())?;
    Ok((frame, left))
}

/// Does what header `hdr` leaves to the device for `frame` (the frame it came before), but for
/// cutting a UDP super-frame: its datagrams' size is returned, for `cut_udp`.
pub fn complete(hdr: &[u8; HDR_LEN], frame: &mut [u8]) -> Result<Option<u16>, Refused> {
    let left = left(hdr, frame.len())?;
    if left.udp_segment.is_none() {
        if let Some(l) = left.checksum {
            l.complete(frame);
        }
    }
    Ok(left.udp_segment)
}

/// Cuts a UDP super-frame from the guest into its datagrams of `size` bytes, each given to
/// `emit` with its checksum complete; false (nothing emitted) when it is not one.
pub fn cut_udp(frame: &[u8], size: u16, emit: impl FnMut(&[u8])) -> bool {
    let proto = match frame.get(12..14) {
        Some([0x08, 0x00]) => frame.get(ETH_LEN + 9),
        Some([0x86, 0xdd]) => frame.get(ETH_LEN + 6),
        _ => None,
    };
    proto == Some(&17) && hubnat_core::wire::gso::cut(frame, size, emit).is_ok()
}

/// A checksum a guest left to hubnat: it covers the frame from `start` on, and its field lies
/// at `start + offset`, holding the pseudo-header's sum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeftChecksum {
    start: usize,
    offset: usize,
}

impl LeftChecksum {
    /// Adds the bytes from `start` to the end of `frame` to the partial sum in the field, and
    /// stores the result there.
    pub fn complete(self, frame: &mut [u8]) {
        let field = self.start + self.offset;
        let sum = hubnat_core::wire::ones_sum(&frame[self.start..]);
        frame[field..field + 2].copy_from_slice(&(!sum).to_be_bytes());
    }

    /// Whether it is the checksum of `frame`'s TCP or UDP header (IPv4, or IPv6 without
    /// extension headers, in Ethernet): the one the engine would verify.
    pub fn is_transport(self, frame: &[u8]) -> bool {
        let (header, proto) = match frame.get(12..14) {
            Some([0x08, 0x00]) => {
                let Some(&vihl) = frame.get(ETH_LEN) else {
                    return false;
                };
                (usize::from(vihl & 0x0f) * 4, frame.get(ETH_LEN + 9))
            }
            Some([0x86, 0xdd]) => (40, frame.get(ETH_LEN + 6)),
            _ => return false,
        };
        let at = match proto {
            Some(6) => TCP_CSUM_OFFSET,
            Some(17) => UDP_CSUM_OFFSET,
            _ => return false,
        };
        self.start == ETH_LEN + header && self.offset == usize::from(at)
    }
}

/// What `hdr` leaves to hubnat for a frame of `len` bytes (None: nothing). Refused: a
/// segmentation hubnat did not offer, or a checksum field outside the frame.
fn left(hdr: &[u8; HDR_LEN], len: usize) -> Result<Left, Refused> {
    let flags = hdr[0];
    let gso = hdr[1];
    let udp_segment = match gso & !GSO_ECN {
        GSO_NONE | GSO_TCPV4 | GSO_TCPV6 => None,
        GSO_UDP_L4 => match u16::from_ne_bytes([hdr[4], hdr[5]]) {
            0 => return Err(Refused::Gso(gso)),
            size => Some(size),
        },
        _ => return Err(Refused::Gso(gso)),
    };
    if flags & F_NEEDS_CSUM == 0 {
        return Ok(Left {
            checksum: None,
            udp_segment,
        });
    }
    // Native byte order: the TAP was not told otherwise (TUNSETVNETLE/BE).
    let start = usize::from(u16::from_ne_bytes([hdr[6], hdr[7]]));
    let offset = usize::from(u16::from_ne_bytes([hdr[8], hdr[9]]));
    if start >= len || start + offset + 2 > len {
        return Err(Refused::Csum { start, offset });
    }
    Ok(Left {
        checksum: Some(LeftChecksum { start, offset }),
        udp_segment,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::wire::{
        EthernetFrame, EthernetProtocol, IpProtocol, Ipv4Address, Ipv4Packet, TcpPacket, UdpPacket,
    };

    const ETH: usize = 14;

    /// The frame behind the header, its left checksum completed (as `complete` does).
    fn take(buf: &mut [u8]) -> Result<&mut [u8], Refused> {
        let (frame, left) = take_leaving(buf)?;
        if let Some(l) = left.checksum {
            l.complete(frame);
        }
        Ok(frame)
    }

    /// A header, then an Ethernet frame carrying an IPv4 packet of protocol `proto` whose
    /// transport part is `l4` (its checksum field left as given).
    fn frame(proto: IpProtocol, l4: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; HDR_LEN + ETH + 20 + l4.len()];
        let f = &mut buf[HDR_LEN..];
        let mut eth = EthernetFrame::new_unchecked(&mut f[..]);
        eth.set_ethertype(EthernetProtocol::Ipv4);
        let mut ip = Ipv4Packet::new_unchecked(&mut f[ETH..]);
        ip.set_version(4);
        ip.set_header_len(20);
        ip.set_total_len((20 + l4.len()) as u16);
        ip.set_hop_limit(64);
        ip.set_next_header(proto);
        ip.set_src_addr(Ipv4Address::new(192, 168, 30, 50));
        ip.set_dst_addr(Ipv4Address::new(10, 0, 0, 1));
        ip.fill_checksum();
        f[ETH + 20..].copy_from_slice(l4);
        buf
    }

    fn ips() -> (Ipv4Address, Ipv4Address) {
        (
            Ipv4Address::new(192, 168, 30, 50),
            Ipv4Address::new(10, 0, 0, 1),
        )
    }

    /// What a guest kernel with checksum offload writes: the pseudo-header's sum (not
    /// complemented) in the field, the header saying where the rest starts.
    fn started(buf: &mut [u8], csum_offset: u16) {
        let (src, dst) = ips();
        let l4_len = buf.len() - HDR_LEN - ETH - 20;
        let proto = buf[HDR_LEN + ETH + 9];
        let mut ph = Vec::new();
        ph.extend_from_slice(&src.octets());
        ph.extend_from_slice(&dst.octets());
        ph.extend_from_slice(&[0, proto]);
        ph.extend_from_slice(&(l4_len as u16).to_be_bytes());
        let pseudo = hubnat_core::wire::ones_sum(&ph);
        let field = HDR_LEN + ETH + 20 + usize::from(csum_offset);
        buf[field..field + 2].copy_from_slice(&pseudo.to_be_bytes());
        buf[0] = F_NEEDS_CSUM;
        buf[6..8].copy_from_slice(&((ETH + 20) as u16).to_ne_bytes());
        buf[8..10].copy_from_slice(&csum_offset.to_ne_bytes());
    }

    fn tcp_segment(payload: usize) -> Vec<u8> {
        let mut l4 = vec![0u8; 20 + payload];
        let mut tcp = TcpPacket::new_unchecked(&mut l4[..]);
        tcp.set_src_port(40000);
        tcp.set_dst_port(5201);
        tcp.set_seq_number(smoltcp::wire::TcpSeqNumber(7));
        tcp.set_header_len(20);
        tcp.set_ack(true);
        tcp.set_window_len(512);
        for (i, b) in l4[20..].iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        frame(IpProtocol::Tcp, &l4)
    }

    #[test]
    fn a_started_tcp_checksum_is_completed() {
        let mut buf = tcp_segment(1000);
        started(&mut buf, 16);
        let f = take(&mut buf).unwrap();
        let ip = Ipv4Packet::new_checked(&f[ETH..]).unwrap();
        let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
        let (src, dst) = ips();
        assert!(tcp.verify_checksum(&src.into(), &dst.into()));
    }

    #[test]
    fn a_tcp_super_segment_arrives_whole_with_its_checksum() {
        // 64 KiB less the headers: what TSO hands over in one piece.
        let mut buf = tcp_segment(65535 - 40);
        started(&mut buf, 16);
        buf[1] = GSO_TCPV4;
        buf[4..6].copy_from_slice(&1448u16.to_ne_bytes());
        let f = take(&mut buf).unwrap();
        assert_eq!(f.len(), ETH + 65535);
        let ip = Ipv4Packet::new_checked(&f[ETH..]).unwrap();
        let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
        let (src, dst) = ips();
        assert!(tcp.verify_checksum(&src.into(), &dst.into()));
        assert_eq!(tcp.payload().len(), 65535 - 40);
    }

    #[test]
    fn a_started_udp_checksum_is_completed() {
        let mut l4 = vec![0u8; 8 + 33];
        let mut udp = UdpPacket::new_unchecked(&mut l4[..]);
        udp.set_src_port(5353);
        udp.set_dst_port(53);
        udp.set_len(41);
        l4[8..].fill(0xab);
        let mut buf = frame(IpProtocol::Udp, &l4);
        started(&mut buf, 6);
        let f = take(&mut buf).unwrap();
        let ip = Ipv4Packet::new_checked(&f[ETH..]).unwrap();
        let udp = UdpPacket::new_checked(ip.payload()).unwrap();
        let (src, dst) = ips();
        assert!(udp.verify_checksum(&src.into(), &dst.into()));
    }

    #[test]
    fn a_checksum_left_is_said_to_be_the_transport_ones_only_where_it_is() {
        let mut buf = tcp_segment(100);
        started(&mut buf, 16);
        let (f, left) = take_leaving(&mut buf).unwrap();
        let left = left.checksum.expect("a checksum left");
        assert!(left.is_transport(f));
        // Pointing elsewhere (into the IP header): completed like any, never skipped.
        let mut buf = tcp_segment(100);
        started(&mut buf, 16);
        buf[6..8].copy_from_slice(&(ETH as u16).to_ne_bytes());
        buf[8..10].copy_from_slice(&10u16.to_ne_bytes());
        let (f, left) = take_leaving(&mut buf).unwrap();
        assert!(!left.checksum.unwrap().is_transport(f));
        // Nothing left: nothing said.
        let mut buf = tcp_segment(100);
        assert_eq!(take_leaving(&mut buf).unwrap().1, Left::default());
        // IPv6: the transport header right after the fixed one.
        let mut frame = vec![0u8; ETH + 40 + 20];
        frame[12..14].copy_from_slice(&[0x86, 0xdd]);
        frame[ETH + 6] = 6;
        let l = LeftChecksum {
            start: ETH + 40,
            offset: 16,
        };
        assert!(l.is_transport(&frame));
        frame[ETH + 6] = 60; // an extension header first: not the engine's to skip
        assert!(!l.is_transport(&frame));
    }

    #[test]
    fn a_frame_with_nothing_to_do_is_left_as_it_is() {
        let mut buf = tcp_segment(10);
        let want = buf[HDR_LEN..].to_vec();
        assert_eq!(take(&mut buf).unwrap(), &want[..]);
    }

    #[test]
    fn a_super_frames_header_says_where_its_headers_end_and_how_to_cut_it() {
        // 20-byte IPv4 header, a TCP header with 12 bytes of options (timestamps).
        let mut l4 = vec![0u8; 32 + 20_000];
        l4[12] = 8 << 4;
        let buf = frame(IpProtocol::Tcp, &l4);
        let h = gso_header(&buf[HDR_LEN..], 1448);
        assert_eq!(h[0], F_NEEDS_CSUM);
        assert_eq!(h[1], GSO_TCPV4);
        let word = |i: usize| u16::from_ne_bytes([h[i], h[i + 1]]);
        assert_eq!(word(2), 14 + 20 + 32, "hdr_len");
        assert_eq!(word(4), 1448, "gso_size");
        assert_eq!(word(6), 14 + 20, "csum_start");
        assert_eq!(word(8), 16, "csum_offset");
        // What a reader of such a header does with the frame completes its checksum.
        let mut with = h.to_vec();
        with.extend_from_slice(&buf[HDR_LEN..]);
        assert!(take(&mut with).is_ok());
    }

    #[test]
    fn the_gso_header_of_an_ipv6_super_frame_says_tcpv6_and_where_tcp_starts() {
        let mut frame = vec![0u8; 14 + 40 + 32 + 3000];
        frame[12..14].copy_from_slice(&[0x86, 0xdd]);
        frame[14] = 0x60;
        frame[14 + 40 + 12] = 8 << 4; // a 32-byte TCP header
        let h = gso_header(&frame, 1428);
        assert_eq!((h[0], h[1]), (F_NEEDS_CSUM, GSO_TCPV6));
        assert_eq!(
            u16::from_ne_bytes([h[2], h[3]]),
            14 + 40 + 32,
            "headers' length"
        );
        assert_eq!(u16::from_ne_bytes([h[4], h[5]]), 1428);
        assert_eq!(u16::from_ne_bytes([h[6], h[7]]), 14 + 40, "csum_start");
        assert_eq!(u16::from_ne_bytes([h[8], h[9]]), TCP_CSUM_OFFSET);
    }

    #[test]
    fn a_marked_frame_of_one_segment_asks_only_for_its_checksum() {
        let mut buf = tcp_segment(1000);
        let h = gso_header(&buf[HDR_LEN..], 1448);
        assert_eq!((h[0], h[1]), (F_NEEDS_CSUM, GSO_NONE));
        assert_eq!(u16::from_ne_bytes([h[6], h[7]]), 14 + 20, "csum_start");
        assert_eq!(u16::from_ne_bytes([h[8], h[9]]), TCP_CSUM_OFFSET);
        // One byte more than a segment: cut.
        buf = tcp_segment(1449);
        assert_eq!(gso_header(&buf[HDR_LEN..], 1448)[1], GSO_TCPV4);
    }

    #[test]
    fn a_udp_super_frame_says_udp_l4_and_where_its_datagrams_start() {
        let mut l4 = vec![0u8; 8 + 300];
        l4[4..6].copy_from_slice(&308u16.to_be_bytes());
        let buf = frame(IpProtocol::Udp, &l4);
        let h = gso_header(&buf[HDR_LEN..], 100);
        assert_eq!((h[0], h[1]), (F_NEEDS_CSUM, GSO_UDP_L4));
        assert_eq!(
            u16::from_ne_bytes([h[2], h[3]]),
            14 + 20 + 8,
            "headers' length"
        );
        assert_eq!(u16::from_ne_bytes([h[4], h[5]]), 100);
        assert_eq!(u16::from_ne_bytes([h[6], h[7]]), 14 + 20, "csum_start");
        assert_eq!(u16::from_ne_bytes([h[8], h[9]]), UDP_CSUM_OFFSET);
    }

    #[test]
    fn a_udp_super_frame_from_the_guest_is_cut_into_its_datagrams() {
        // As the guest's kernel writes one: UDP length the whole, checksum only started.
        let data: Vec<u8> = (0..2500u32).map(|i| (i * 3) as u8).collect();
        let mut l4 = vec![0u8; 8];
        l4[0..2].copy_from_slice(&40000u16.to_be_bytes());
        l4[2..4].copy_from_slice(&5201u16.to_be_bytes());
        l4[4..6].copy_from_slice(&((8 + data.len()) as u16).to_be_bytes());
        l4.extend_from_slice(&data);
        let mut buf = frame(IpProtocol::Udp, &l4);
        started(&mut buf, UDP_CSUM_OFFSET);
        buf[1] = GSO_UDP_L4;
        buf[4..6].copy_from_slice(&1000u16.to_ne_bytes());
        let (f, left) = take_leaving(&mut buf).unwrap();
        assert_eq!(left.udp_segment, Some(1000));
        let mut got = Vec::new();
        assert!(cut_udp(f, 1000, |d| got.push(d.to_vec())));
        assert_eq!(got.len(), 3);
        let (src, dst) = ips();
        let mut joined = Vec::new();
        for d in &got {
            let ip = Ipv4Packet::new_checked(&d[ETH..]).unwrap();
            assert!(ip.verify_checksum());
            let udp = UdpPacket::new_checked(ip.payload()).unwrap();
            assert!(udp.verify_checksum(&src.into(), &dst.into()));
            joined.extend_from_slice(udp.payload());
        }
        assert_eq!(joined, data);
        // A header saying USO before a TCP segment is not cut as UDP.
        let mut buf = tcp_segment(100);
        buf[1] = GSO_UDP_L4;
        buf[4..6].copy_from_slice(&10u16.to_ne_bytes());
        let (f, left) = take_leaving(&mut buf).unwrap();
        assert!(!cut_udp(f, left.udp_segment.unwrap(), |_| ()));
        // USO of datagrams of no size is refused.
        let mut buf = tcp_segment(10);
        buf[1] = GSO_UDP_L4;
        assert_eq!(
            take_leaving(&mut buf).map(|_| ()),
            Err(Refused::Gso(GSO_UDP_L4))
        );
    }

    #[test]
    fn headers_hubnat_did_not_offer_or_that_point_outside_are_refused() {
        assert_eq!(take(&mut [0u8; 9]), Err(Refused::Short));
        let mut buf = tcp_segment(10);
        buf[1] = 3; // UDP fragmentation offload
        assert_eq!(take(&mut buf), Err(Refused::Gso(3)));
        let mut buf = tcp_segment(10);
        buf[1] = GSO_TCPV4 | GSO_ECN;
        assert!(take(&mut buf).is_ok());
        let mut buf = tcp_segment(10);
        buf[1] = GSO_TCPV6;
        assert!(take(&mut buf).is_ok(), "TCP over IPv6 is offered too");
        let mut buf = tcp_segment(10);
        started(&mut buf, 16);
        let len = (buf.len() - HDR_LEN) as u16;
        buf[6..8].copy_from_slice(&(len - 1).to_ne_bytes());
        assert!(matches!(take(&mut buf), Err(Refused::Csum { .. })));
    }
}
