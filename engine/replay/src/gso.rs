//! Super-frames toward the guest (`Ctx::tcp_gso`, `Ctx::udp_gso`, script fields `tcp_gso` and
//! `udp_gso`): the marks the
//! core puts on them, kept beside a golden capture, and the cutting a virtio-net device does
//! before the guest sees them.
//!
//! A classic pcap has no field for a frame's segment size, so a golden output keeps the core's
//! frames byte for byte (a super-frame whole, its TCP checksum field holding only the
//! pseudo-header's sum) and its marks in a text file beside it, `NAME.out.gso`: one line per
//! marked frame, its number as `hubnat-pcap show` counts it (from 1) and its segment size. No
//! file means no frame was marked.

use std::fmt::Write as _;

/// A frame the core marked: its index among the frames out (from 0) and its segment size.
pub type Mark = (usize, u16);

/// The text of a `NAME.out.gso` file for `marks` (empty when there are none).
pub fn marks_to_text(marks: &[Mark]) -> String {
    if marks.is_empty() {
        return String::new();
    }
    let mut t = String::from(
        "# super-frames (TCP or UDP) of the golden output: frame number (from 1), segment size\n",
    );
    for (i, mss) in marks {
        let _ = writeln!(t, "{} {mss}", i + 1);
    }
    t
}

/// The marks a `NAME.out.gso` file lists (lines `FRAME MSS`, `#` comments, blank lines).
pub fn parse_marks(text: &str) -> Result<Vec<Mark>, String> {
    let mut marks = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let bad = || format!("line {}: `{line}` is not FRAME MSS", n + 1);
        let mut w = line.split_whitespace();
        let (Some(f), Some(m), None) = (w.next(), w.next(), w.next()) else {
            return Err(bad());
        };
        let f: usize = f.parse().map_err(|_| bad())?;
        let m: u16 = m.parse().map_err(|_| bad())?;
        if f == 0 || m == 0 || marks.last().is_some_and(|&(p, _)| p >= f - 1) {
            return Err(format!(
                "line {}: frame numbers start at 1 and rise, sizes are not 0",
                n + 1
            ));
        }
        marks.push((f - 1, m));
    }
    Ok(marks)
}

/// The first difference between the marks of a golden output and a replay's, described.
pub fn compare_marks(expected: &[Mark], got: &[Mark]) -> Option<String> {
    let show =
        |m: Option<&Mark>| m.map_or("none".to_owned(), |(i, s)| format!("frame {} {s}", i + 1));
    let n = expected.len().max(got.len());
    (0..n).find(|&k| expected.get(k) != got.get(k)).map(|k| {
        format!(
            "super-frame marks differ at mark {} (expected {} marks, got {}): expected {}, got {}",
            k + 1,
            expected.len(),
            got.len(),
            show(expected.get(k)),
            show(got.get(k))
        )
    })
}

pub use hubnat_core::wire::gso::partial_checksum_holds;

/// Cuts a super-frame into the frames of `mss` bytes of payload a virtio-net device hands the
/// guest (`hubnat_core::wire::gso::cut`).
pub fn cut(frame: &[u8], mss: u16) -> Result<Vec<Vec<u8>>, String> {
    let mut segs = Vec::new();
    hubnat_core::wire::gso::cut(frame, mss, |s| segs.push(s.to_vec()))
        .map_err(|e| e.to_string())?;
    Ok(segs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::craft::{ethernet, ipv4, tcp, ACK, FIN, PSH};
    use smoltcp::wire::{IpProtocol, Ipv4Packet, TcpPacket};
    use std::net::{Ipv4Addr, SocketAddrV4};

    /// A super-frame as the core makes one: `payload` behind one header with timestamps, its
    /// checksum field holding the pseudo-header's sum.
    fn super_frame(payload: &[u8], flags: u8) -> Vec<u8> {
        let src = SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 2), 80);
        let dst = SocketAddrV4::new(Ipv4Addr::new(192, 168, 30, 50), 41000);
        let opts = [1, 1, 8, 10, 0, 0, 0, 7, 0, 0, 0, 9];
        let seg = tcp(src, dst, flags, 0xffff_f000, 5, 500, &opts, payload);
        let ip = ipv4(
            *src.ip(),
            *dst.ip(),
            IpProtocol::Tcp,
            0xfffe,
            (0, false),
            &seg,
        );
        let mut f = ethernet(
            crate::script::REPLAY_MAC,
            crate::craft::guest_mac(1),
            0x0800,
            &ip,
        );
        let mut pseudo = [0u8; 12];
        pseudo[..8].copy_from_slice(&f[14 + 12..14 + 20]);
        pseudo[9] = 6;
        pseudo[10..12].copy_from_slice(&(seg.len() as u16).to_be_bytes());
        let p = hubnat_core::wire::ones_sum(&pseudo);
        f[14 + 20 + 16..14 + 20 + 18].copy_from_slice(&p.to_be_bytes());
        f
    }

    #[test]
    fn a_super_frame_is_cut_into_valid_segments() {
        let data: Vec<u8> = (0..3500u32).map(|i| (i * 7) as u8).collect();
        let f = super_frame(&data, ACK | PSH | FIN);
        assert!(partial_checksum_holds(&f));
        let segs = cut(&f, 1448).unwrap();
        assert_eq!(segs.len(), 3);
        let mut got = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            let ip = Ipv4Packet::new_checked(&s[14..]).unwrap();
            assert!(ip.verify_checksum());
            assert_eq!(usize::from(ip.total_len()), s.len() - 14);
            // the id counts up from the super-frame's, wrapping
            assert_eq!(ip.ident(), 0xfffeu16.wrapping_add(i as u16));
            let t = TcpPacket::new_checked(ip.payload()).unwrap();
            assert!(t.verify_checksum(&ip.src_addr().into(), &ip.dst_addr().into()));
            // sequence numbers wrap too
            assert_eq!(
                t.seq_number().0 as u32,
                0xffff_f000u32.wrapping_add(i as u32 * 1448)
            );
            assert_eq!(t.ack_number().0, 5);
            let last = i == 2;
            assert_eq!((t.fin(), t.psh()), (last, last));
            assert_eq!(t.options().len(), 12, "every segment keeps the options");
            got.extend_from_slice(t.payload());
        }
        assert_eq!(got, data);
        assert_eq!(segs[2].len(), 14 + 20 + 32 + 3500 - 2 * 1448);
    }

    #[test]
    fn a_frame_of_one_segment_comes_back_completed() {
        let f = super_frame(b"short", ACK);
        let segs = cut(&f, 1448).unwrap();
        assert_eq!(segs.len(), 1);
        let ip = Ipv4Packet::new_checked(&segs[0][14..]).unwrap();
        let t = TcpPacket::new_checked(ip.payload()).unwrap();
        assert!(t.verify_checksum(&ip.src_addr().into(), &ip.dst_addr().into()));
        assert_eq!(&segs[0][..14 + 20 + 16], &f[..14 + 20 + 16]);
    }

    #[test]
    fn a_completed_checksum_is_not_a_partial_one_and_bad_frames_are_refused() {
        let src = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 1);
        let dst = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 2);
        let seg = tcp(src, dst, ACK, 1, 1, 100, &[], &[9; 3000]);
        let ip = ipv4(*src.ip(), *dst.ip(), IpProtocol::Tcp, 1, (0, false), &seg);
        let whole = ethernet(
            crate::script::REPLAY_MAC,
            crate::craft::guest_mac(1),
            0x0800,
            &ip,
        );
        assert!(!partial_checksum_holds(&whole));
        assert!(cut(&whole, 0).is_err());
        assert!(cut(&whole[..40], 1000).is_err());
        let mut v6 = whole.clone();
        v6[12..14].copy_from_slice(&[0x86, 0xdd]);
        assert!(cut(&v6, 1000).is_err());
        let mut icmp = whole.clone();
        icmp[14 + 9] = 1;
        assert!(cut(&icmp, 1000).is_err());
        let mut long = whole;
        long[16..18].copy_from_slice(&60000u16.to_be_bytes());
        assert!(cut(&long, 1000).is_err());
    }

    #[test]
    fn a_marked_frame_is_described_with_its_cut() {
        let f = super_frame(&[7; 3000], ACK);
        let d = crate::decode::describe_marked(&f, 1000);
        assert!(
            d.ends_with(" len 3000 <ts 7 ecr 9> GSO 1000 x3 csum partial"),
            "{d}"
        );
        assert_eq!(
            crate::decode::describe_marked(&f, 0),
            crate::decode::describe(&f)
        );
        let mut bad = f.clone();
        bad[14 + 20 + 17] ^= 1;
        assert!(crate::decode::describe_marked(&bad, 1000).ends_with("BAD-PARTIAL-CSUM"));
        assert!(crate::decode::describe_marked(&f[..30], 1000).contains("cannot be cut"));
    }

    #[test]
    fn marks_are_compared_mark_by_mark() {
        let a = vec![(2, 1448), (9, 1448)];
        assert_eq!(compare_marks(&a, &a), None);
        let m = compare_marks(&a, &[(2, 1448), (10, 1448)]).unwrap();
        assert!(
            m.contains("mark 2") && m.contains("expected frame 10 1448, got frame 11 1448"),
            "{m}"
        );
        let m = compare_marks(&a, &a[..1]).unwrap();
        assert!(m.contains("got none"), "{m}");
    }

    #[test]
    fn marks_round_trip_through_their_text() {
        assert_eq!(marks_to_text(&[]), "");
        let marks = vec![(0, 1448), (6, 1448), (41, 524)];
        let t = marks_to_text(&marks);
        assert!(t.contains("\n1 1448\n7 1448\n42 524\n"), "{t}");
        assert_eq!(parse_marks(&t).unwrap(), marks);
        assert_eq!(parse_marks("").unwrap(), vec![]);
        assert_eq!(
            parse_marks("3 100 # a comment\n\n").unwrap(),
            vec![(2, 100)]
        );
        for bad in [
            "0 100",
            "1 0",
            "2 100\n1 100",
            "2 100\n2 100",
            "x 1",
            "1",
            "1 2 3",
        ] {
            assert!(parse_marks(bad).is_err(), "{bad}");
        }
    }
}
