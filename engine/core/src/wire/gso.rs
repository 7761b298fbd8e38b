//! Cutting a super-frame into the frames it stands for, as the guest's side of a TAP with
//! offloads (a virtio-net device) does. The core emits super-frames only toward a port that
//! cuts them itself (`Ctx::tcp_gso`, `Ctx::udp_gso`); this is for whatever else meets one: a
//! port of the segment that takes no super-frames, and the tests and replay that check them.
//!
//! A super-frame is an Ethernet frame (no VLAN tag) carrying IPv4 (options allowed) or IPv6 (no
//! extension headers), then TCP or UDP, its transport checksum field holding only the
//! pseudo-header's sum over the whole packet (`FrameBatch::set_gso_last`). Each frame cut from
//! it has the same headers with its own IP length and identification (counting up from the
//! super-frame's) and its own complete transport checksum; a TCP segment its own sequence
//! number, FIN and PSH on the last only and CWR on the first only; a UDP datagram its own length.

use super::ones_sum;

const ETH: usize = 14;

/// Why a frame could not be cut.
#[derive(Debug, PartialEq, Eq)]
pub enum CutError {
    /// Not Ethernet with IPv4 or IPv6 (no extension headers) and TCP or UDP, or headers that
    /// do not fit the frame.
    Layout,
    /// A segment size of 0.
    ZeroSize,
}

impl std::fmt::Display for CutError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CutError::Layout => "not a whole TCP or UDP packet over IPv4 or IPv6 in Ethernet",
            CutError::ZeroSize => "segment size 0",
        })
    }
}

impl std::error::Error for CutError {}

/// Where a super-frame's parts lie.
struct Layout {
    v6: bool,
    /// Start of the transport header.
    l4: usize,
    /// End of the transport header (the payload starts there).
    headers: usize,
    /// End of the IP packet.
    end: usize,
    tcp: bool,
}

fn layout(frame: &[u8]) -> Result<Layout, CutError> {
    let bad = CutError::Layout;
    let (v6, l4, end, proto) = match frame.get(12..14) {
        Some([0x08, 0x00]) => {
            let &vihl = frame.get(ETH).ok_or(CutError::Layout)?;
            let ihl = usize::from(vihl & 0x0f) * 4;
            if vihl >> 4 != 4 || ihl < 20 || frame.len() < ETH + ihl {
                return Err(bad);
            }
            let total = usize::from(u16::from_be_bytes([frame[ETH + 2], frame[ETH + 3]]));
            (false, ETH + ihl, ETH + total, frame[ETH + 9])
        }
        Some([0x86, 0xdd]) if frame.len() >= ETH + 40 => {
            let payload = usize::from(u16::from_be_bytes([frame[ETH + 4], frame[ETH + 5]]));
            (true, ETH + 40, ETH + 40 + payload, frame[ETH + 6])
        }
        _ => return Err(bad),
    };
    let (tcp, min) = match proto {
        6 => (true, 20),
        17 => (false, 8),
        _ => return Err(bad),
    };
    if end > frame.len() || l4 + min > end {
        return Err(bad);
    }
    let hl = if tcp {
        usize::from(frame[l4 + 12] >> 4) * 4
    } else {
        8
    };
    if hl < min || l4 + hl > end {
        return Err(bad);
    }
    Ok(Layout {
        v6,
        l4,
        headers: l4 + hl,
        end,
        tcp,
    })
}

/// The ones' complement sum of the pseudo-header of `frame`'s transport part of `len` bytes.
fn pseudo_sum(frame: &[u8], at: &Layout, len: usize) -> u16 {
    let proto = if at.tcp { 6u8 } else { 17 };
    let mut p = [0u8; 40];
    let n = if at.v6 {
        p[..32].copy_from_slice(&frame[ETH + 8..ETH + 40]);
        p[32..36].copy_from_slice(&(len as u32).to_be_bytes());
        p[39] = proto;
        40
    } else {
        p[..8].copy_from_slice(&frame[ETH + 12..ETH + 20]);
        p[9] = proto;
        p[10..12].copy_from_slice(&(len as u16).to_be_bytes());
        12
    };
    ones_sum(&p[..n])
}

/// Whether a super-frame's transport checksum field holds what a device completes: the
/// pseudo-header's sum (not complemented), the rest of the packet to be added.
pub fn partial_checksum_holds(frame: &[u8]) -> bool {
    let Ok(at) = layout(frame) else {
        return false;
    };
    let field = if at.tcp { at.l4 + 16 } else { at.l4 + 6 };
    u16::from_be_bytes([frame[field], frame[field + 1]]) == pseudo_sum(frame, &at, at.end - at.l4)
}

/// Cuts `frame` into frames of `size` payload bytes (the last one what is left) and gives each
/// to `emit`, in order; returns how many. A frame with no more payload than `size` comes out
/// as one frame, its checksum completed.
pub fn cut(frame: &[u8], size: u16, mut emit: impl FnMut(&[u8])) -> Result<usize, CutError> {
    let at = layout(frame)?;
    if size == 0 {
        return Err(CutError::ZeroSize);
    }
    let size = usize::from(size);
    let payload = at.end - at.headers;
    let count = payload.div_ceil(size).max(1);
    let l4 = at.l4;
    let seq = u32::from_be_bytes([frame[l4 + 4], frame[l4 + 5], frame[l4 + 6], frame[l4 + 7]]);
    let id = u16::from_be_bytes([frame[ETH + 4], frame[ETH + 5]]);
    let mut s = Vec::with_capacity(at.headers + size.min(payload));
    for i in 0..count {
        let off = i * size;
        let chunk = size.min(payload - off);
        s.clear();
        s.extend_from_slice(&frame[..at.headers]);
        s.extend_from_slice(&frame[at.headers + off..at.headers + off + chunk]);
        let n = s.len();
        if at.v6 {
            s[ETH + 4..ETH + 6].copy_from_slice(&((n - l4) as u16).to_be_bytes());
        } else {
            s[ETH + 2..ETH + 4].copy_from_slice(&((n - ETH) as u16).to_be_bytes());
            s[ETH + 4..ETH + 6].copy_from_slice(&id.wrapping_add(i as u16).to_be_bytes());
            s[ETH + 10..ETH + 12].fill(0);
            let c = !ones_sum(&s[ETH..l4]);
            s[ETH + 10..ETH + 12].copy_from_slice(&c.to_be_bytes());
        }
        let field = if at.tcp {
            const FIN: u8 = 0x01;
            const PSH: u8 = 0x08;
            const CWR: u8 = 0x80;
            s[l4 + 4..l4 + 8].copy_from_slice(&seq.wrapping_add(off as u32).to_be_bytes());
            if i + 1 != count {
                s[l4 + 13] &= !(FIN | PSH);
            }
            if i != 0 {
                s[l4 + 13] &= !CWR;
            }
            l4 + 16
        } else {
            s[l4 + 4..l4 + 6].copy_from_slice(&((n - l4) as u16).to_be_bytes());
            l4 + 6
        };
        // Completing, as the device does: the packet's sum over the pseudo-header's.
        let p = pseudo_sum(&s, &at, n - l4);
        s[field..field + 2].copy_from_slice(&p.to_be_bytes());
        let mut c = !ones_sum(&s[l4..n]);
        if !at.tcp && c == 0 {
            // UDP's "no checksum"; its ones' complement twin says the same sum.
            c = 0xffff;
        }
        s[field..field + 2].copy_from_slice(&c.to_be_bytes());
        emit(&s);
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::wire::{EthernetFrame, IpAddress, Ipv4Packet, Ipv6Packet, TcpPacket, UdpPacket};

    /// An Ethernet frame of `l4` (TCP or UDP, `proto`) over IPv4 or IPv6, its transport checksum
    /// field set to the pseudo-header's sum, as the core writes a super-frame.
    fn super_frame(v6: bool, proto: u8, l4: &[u8]) -> Vec<u8> {
        let ip_len = if v6 { 40 } else { 20 };
        let mut f = vec![0u8; ETH + ip_len + l4.len()];
        f[12..14].copy_from_slice(if v6 { &[0x86, 0xdd] } else { &[0x08, 0x00] });
        if v6 {
            f[ETH] = 0x60;
            f[ETH + 4..ETH + 6].copy_from_slice(&(l4.len() as u16).to_be_bytes());
            f[ETH + 6] = proto;
            f[ETH + 7] = 64;
            f[ETH + 8] = 0xfd;
            f[ETH + 23] = 1;
            f[ETH + 24] = 0xfd;
            f[ETH + 39] = 2;
        } else {
            f[ETH] = 0x45;
            f[ETH + 2..ETH + 4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
            f[ETH + 4..ETH + 6].copy_from_slice(&0xfffeu16.to_be_bytes());
            f[ETH + 8] = 64;
            f[ETH + 9] = proto;
            f[ETH + 12..ETH + 16].copy_from_slice(&[10, 77, 0, 2]);
            f[ETH + 16..ETH + 20].copy_from_slice(&[192, 168, 30, 50]);
        }
        f[ETH + ip_len..].copy_from_slice(l4);
        let at = layout(&f).unwrap();
        let field = if at.tcp { at.l4 + 16 } else { at.l4 + 6 };
        let p = pseudo_sum(&f, &at, l4.len());
        f[field..field + 2].copy_from_slice(&p.to_be_bytes());
        f
    }

    fn udp(payload: &[u8]) -> Vec<u8> {
        let mut d = vec![0u8; 8];
        d[0..2].copy_from_slice(&53u16.to_be_bytes());
        d[2..4].copy_from_slice(&40000u16.to_be_bytes());
        d[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        d.extend_from_slice(payload);
        d
    }

    fn addrs(frame: &[u8]) -> (IpAddress, IpAddress) {
        if frame[12..14] == [0x86, 0xdd] {
            let ip = Ipv6Packet::new_checked(&frame[ETH..]).unwrap();
            (
                IpAddress::Ipv6(ip.src_addr()),
                IpAddress::Ipv6(ip.dst_addr()),
            )
        } else {
            let ip = Ipv4Packet::new_checked(&frame[ETH..]).unwrap();
            assert!(ip.verify_checksum());
            (
                IpAddress::Ipv4(ip.src_addr()),
                IpAddress::Ipv4(ip.dst_addr()),
            )
        }
    }

    #[test]
    fn a_udp_super_frame_is_cut_into_its_datagrams_over_both_families() {
        for v6 in [false, true] {
            let data: Vec<u8> = (0..250u32).map(|i| (i * 13) as u8).collect();
            let f = super_frame(v6, 17, &udp(&data));
            assert!(partial_checksum_holds(&f));
            let mut got = Vec::new();
            assert_eq!(cut(&f, 100, |d| got.push(d.to_vec())), Ok(3));
            let mut joined = Vec::new();
            for (i, d) in got.iter().enumerate() {
                let (src, dst) = addrs(d);
                let l4 = if v6 { ETH + 40 } else { ETH + 20 };
                let u = UdpPacket::new_checked(&d[l4..]).unwrap();
                assert!(u.verify_checksum(&src, &dst), "datagram {i} (v6 {v6})");
                assert_eq!(u.len() as usize, 8 + if i < 2 { 100 } else { 50 });
                assert_eq!((u.src_port(), u.dst_port()), (53, 40000));
                joined.extend_from_slice(u.payload());
                if !v6 {
                    let ip = Ipv4Packet::new_checked(&d[ETH..]).unwrap();
                    assert_eq!(ip.ident(), 0xfffeu16.wrapping_add(i as u16));
                }
            }
            assert_eq!(joined, data);
            let eth = EthernetFrame::new_checked(&got[0][..]).unwrap();
            assert_eq!(
                eth.ethertype(),
                EthernetFrame::new_checked(&f[..]).unwrap().ethertype()
            );
        }
    }

    #[test]
    fn a_tcp_super_frame_over_ipv6_is_cut_into_segments() {
        let data: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        let mut seg = vec![0u8; 20];
        seg[4..8].copy_from_slice(&0xffff_ff00u32.to_be_bytes());
        seg[12] = 5 << 4;
        seg[13] = 0x10 | 0x08 | 0x01 | 0x80; // ACK PSH FIN CWR
        seg.extend_from_slice(&data);
        let f = super_frame(true, 6, &seg);
        let mut got = Vec::new();
        assert_eq!(cut(&f, 1428, |s| got.push(s.to_vec())), Ok(3));
        let mut joined = Vec::new();
        for (i, s) in got.iter().enumerate() {
            let (src, dst) = addrs(s);
            let t = TcpPacket::new_checked(&s[ETH + 40..]).unwrap();
            assert!(t.verify_checksum(&src, &dst));
            assert_eq!(
                t.seq_number().0 as u32,
                0xffff_ff00u32.wrapping_add(i as u32 * 1428)
            );
            assert_eq!(t.fin(), i == 2);
            assert_eq!(t.psh(), i == 2);
            assert_eq!(
                s[ETH + 40 + 13] & 0x80 != 0,
                i == 0,
                "CWR on the first only"
            );
            joined.extend_from_slice(t.payload());
        }
        assert_eq!(joined, data);
    }

    #[test]
    fn what_is_not_a_super_frame_is_refused() {
        assert_eq!(cut(&[0u8; 20], 100, |_| ()), Err(CutError::Layout));
        let mut f = super_frame(false, 17, &udp(b"abc"));
        assert_eq!(cut(&f, 0, |_| ()), Err(CutError::ZeroSize));
        f[ETH + 9] = 1; // ICMP
        assert_eq!(cut(&f, 100, |_| ()), Err(CutError::Layout));
        let mut g = super_frame(false, 17, &udp(b"abc"));
        g.truncate(g.len() - 1);
        assert_eq!(cut(&g, 100, |_| ()), Err(CutError::Layout));
    }
}
