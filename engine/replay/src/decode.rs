//! One-line descriptions of frames and the frame-by-frame comparison of two captures, for the
//! regression tests and `hubnat-pcap diff`: a difference is shown decoded, not as "mismatch".

use std::fmt::{self, Write as _};

use smoltcp::wire::{
    ArpOperation, ArpPacket, EthernetFrame, EthernetProtocol, Icmpv4Packet, IpProtocol, Ipv4Packet,
    TcpOption, TcpPacket, UdpPacket,
};

use super::pcap::Frame;

/// A one-line, tcpdump-like description of an Ethernet frame; never panics on bad input.
pub fn describe(frame: &[u8]) -> String {
    let mut s = String::new();
    let Ok(eth) = EthernetFrame::new_checked(frame) else {
        return format!("truncated Ethernet frame ({} bytes)", frame.len());
    };
    let _ = write!(s, "{} > {} ", eth.src_addr(), eth.dst_addr());
    match eth.ethertype() {
        EthernetProtocol::Arp => match ArpPacket::new_checked(eth.payload()) {
            Ok(a) if a.hardware_len() == 6 && a.protocol_len() == 4 => {
                let spa = ipv4(a.source_protocol_addr());
                let tpa = ipv4(a.target_protocol_addr());
                match a.operation() {
                    ArpOperation::Request => {
                        let _ = write!(s, "ARP who-has {tpa} tell {spa}");
                    }
                    ArpOperation::Reply => {
                        let _ = write!(s, "ARP {spa} is-at {}", hex(a.source_hardware_addr()));
                    }
                    op => {
                        let _ = write!(s, "ARP op {op:?}");
                    }
                }
            }
            _ => s.push_str("ARP (malformed)"),
        },
        EthernetProtocol::Ipv4 => describe_ipv4(&mut s, eth.payload()),
        t => {
            let _ = write!(s, "ethertype {t}, {} bytes", eth.payload().len());
        }
    }
    s
}

fn ipv4(b: &[u8]) -> String {
    match <[u8; 4]>::try_from(b) {
        Ok(a) => std::net::Ipv4Addr::from(a).to_string(),
        Err(_) => hex(b),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn describe_ipv4(s: &mut String, bytes: &[u8]) {
    let Ok(ip) = Ipv4Packet::new_checked(bytes) else {
        let _ = write!(s, "IPv4 (malformed, {} bytes)", bytes.len());
        return;
    };
    let _ = write!(
        s,
        "IPv4 {} > {} id {} ttl {} len {}{}",
        ip.src_addr(),
        ip.dst_addr(),
        ip.ident(),
        ip.hop_limit(),
        ip.total_len(),
        if ip.verify_checksum() {
            ""
        } else {
            " BAD-CSUM"
        }
    );
    if ip.more_frags() || ip.frag_offset() != 0 {
        let _ = write!(
            s,
            " frag off {}{} proto {}",
            ip.frag_offset(),
            if ip.more_frags() { " MF" } else { "" },
            ip.next_header()
        );
        return;
    }
    let end = (ip.total_len() as usize).min(bytes.len());
    let payload = bytes.get(ip.header_len() as usize..end).unwrap_or_default();
    match ip.next_header() {
        IpProtocol::Tcp => match TcpPacket::new_checked(payload) {
            Ok(t) => {
                let mut flags = String::new();
                for (on, c) in [
                    (t.syn(), 'S'),
                    (t.fin(), 'F'),
                    (t.rst(), 'R'),
                    (t.psh(), 'P'),
                    (t.ack(), '.'),
                ] {
                    if on {
                        flags.push(c);
                    }
                }
                let _ = write!(
                    s,
                    " TCP {} > {} [{flags}] seq {} ack {} win {} len {}",
                    t.src_port(),
                    t.dst_port(),
                    t.seq_number().0 as u32,
                    t.ack_number().0 as u32,
                    t.window_len(),
                    t.payload().len()
                );
                let mut opts = t.options();
                let mut list = Vec::new();
                while !opts.is_empty() {
                    match TcpOption::parse(opts) {
                        Ok((rest, o)) => {
                            match o {
                                TcpOption::MaxSegmentSize(m) => list.push(format!("mss {m}")),
                                TcpOption::WindowScale(w) => list.push(format!("wscale {w}")),
                                TcpOption::SackPermitted => list.push("sackOK".into()),
                                TcpOption::SackRange(r) => {
                                    for (a, b) in r.iter().flatten() {
                                        list.push(format!("sack {a}-{b}"));
                                    }
                                }
                                TcpOption::TimeStamp { tsval, tsecr } => {
                                    list.push(format!("ts {tsval} ecr {tsecr}"))
                                }
                                _ => {}
                            }
                            opts = rest;
                        }
                        Err(_) => {
                            list.push("bad options".into());
                            break;
                        }
                    }
                }
                if !list.is_empty() {
                    let _ = write!(s, " <{}>", list.join(","));
                }
            }
            Err(_) => s.push_str(" TCP (malformed)"),
        },
        IpProtocol::Udp => match UdpPacket::new_checked(payload) {
            Ok(u) => {
                let _ = write!(
                    s,
                    " UDP {} > {} len {}",
                    u.src_port(),
                    u.dst_port(),
                    u.payload().len()
                );
                let p = u.payload();
                if (u.src_port() == 67 || u.dst_port() == 67) && p.len() > 240 {
                    let _ = write!(
                        s,
                        " DHCP xid {:08x} yiaddr {}",
                        be32(&p[4..8]),
                        ipv4(&p[16..20])
                    );
                    if let Some(t) = dhcp_type(&p[240..]) {
                        let _ = write!(s, " type {t}");
                    }
                } else if (u.src_port() == 53 || u.dst_port() == 53) && p.len() >= 12 {
                    let _ = write!(
                        s,
                        " DNS id {} flags {:04x} qd {} an {}",
                        be16(&p[0..2]),
                        be16(&p[2..4]),
                        be16(&p[4..6]),
                        be16(&p[6..8])
                    );
                }
            }
            Err(_) => s.push_str(" UDP (malformed)"),
        },
        IpProtocol::Icmp => match Icmpv4Packet::new_checked(payload) {
            Ok(i) => {
                let _ = write!(
                    s,
                    " ICMP type {} code {}",
                    u8::from(i.msg_type()),
                    i.msg_code()
                );
                if payload.len() >= 8 {
                    let _ = write!(
                        s,
                        " id {} seq {}",
                        be16(&payload[4..6]),
                        be16(&payload[6..8])
                    );
                }
            }
            Err(_) => s.push_str(" ICMP (malformed)"),
        },
        p => {
            let _ = write!(s, " proto {p}");
        }
    }
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// The DHCP message type (option 53) of the options after the magic cookie.
fn dhcp_type(opts: &[u8]) -> Option<u8> {
    let mut i = 0;
    while i < opts.len() {
        match opts[i] {
            0 => i += 1,
            255 => return None,
            code => {
                let len = *opts.get(i + 1)? as usize;
                if code == 53 && len == 1 {
                    return opts.get(i + 2).copied();
                }
                i += 2 + len;
            }
        }
    }
    None
}

/// The first difference between two captures.
#[derive(Debug)]
pub struct Mismatch {
    /// Index of the first differing frame (0-based).
    pub index: usize,
    pub expected: Option<Frame>,
    pub got: Option<Frame>,
    pub expected_len: usize,
    pub got_len: usize,
}

/// Compares two captures frame by frame (time stamps and bytes).
pub fn compare(expected: &[Frame], got: &[Frame]) -> Option<Mismatch> {
    let n = expected.len().max(got.len());
    (0..n)
        .find(|&i| expected.get(i) != got.get(i))
        .map(|index| Mismatch {
            index,
            expected: expected.get(index).cloned(),
            got: got.get(index).cloned(),
            expected_len: expected.len(),
            got_len: got.len(),
        })
}

fn side(f: &mut fmt::Formatter<'_>, name: &str, frame: &Option<Frame>) -> fmt::Result {
    match frame {
        None => writeln!(f, "  {name}: (no frame)"),
        Some(fr) => writeln!(
            f,
            "  {name}: t={}.{:06} {} bytes: {}",
            fr.ts.as_secs(),
            fr.ts.subsec_micros(),
            fr.data.len(),
            describe(&fr.data)
        ),
    }
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "first difference at frame {} (expected {} frames, got {})",
            self.index + 1,
            self.expected_len,
            self.got_len
        )?;
        side(f, "expected", &self.expected)?;
        side(f, "got     ", &self.got)?;
        if let (Some(a), Some(b)) = (&self.expected, &self.got) {
            if a.ts != b.ts {
                writeln!(f, "  time stamps differ")?;
            }
            let at = a.data.iter().zip(&b.data).position(|(x, y)| x != y);
            let at = at.unwrap_or(a.data.len().min(b.data.len()));
            if a.data != b.data {
                let lo = at.saturating_sub(8);
                writeln!(f, "  bytes differ from offset {at}:")?;
                writeln!(
                    f,
                    "    expected {}",
                    hex(a
                        .data
                        .get(lo..(lo + 24).min(a.data.len()))
                        .unwrap_or_default())
                )?;
                writeln!(
                    f,
                    "    got      {}",
                    hex(b
                        .data
                        .get(lo..(lo + 24).min(b.data.len()))
                        .unwrap_or_default())
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bad_frames_are_described_not_panicked_on() {
        assert!(describe(&[1, 2, 3]).contains("truncated"));
        let mut f = vec![0xff; 12];
        f.extend_from_slice(&[0x08, 0x00, 0x45]);
        assert!(describe(&f).contains("IPv4 (malformed"));
        f.truncate(12);
        f.extend_from_slice(&[0x08, 0x06, 0, 1]);
        assert!(describe(&f).contains("ARP (malformed)"));
        f.truncate(12);
        f.extend_from_slice(&[0x86, 0xdd, 0, 0]);
        assert!(describe(&f).contains("ethertype"));
    }

    #[test]
    fn compare_names_the_first_differing_frame() {
        let fr = |t: u64, d: &[u8]| Frame {
            ts: Duration::from_micros(t),
            data: d.to_vec(),
        };
        let a = vec![fr(1, &[1; 20]), fr(2, &[2; 20])];
        assert!(compare(&a, &a).is_none());
        let mut b = a.clone();
        b[1].data[15] = 9;
        let m = compare(&a, &b).unwrap();
        assert_eq!(m.index, 1);
        let text = m.to_string();
        assert!(
            text.contains("frame 2") && text.contains("offset 15"),
            "{text}"
        );
        let m = compare(&a, &a[..1]).unwrap();
        assert!(m.to_string().contains("(no frame)"));
    }
}
