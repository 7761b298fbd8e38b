//! One-line descriptions of frames and the frame-by-frame comparison of two captures, for the
//! regression tests and `hubnat-pcap diff`: a difference is shown decoded, not as "mismatch".

use std::fmt::{self, Write as _};

use std::net::Ipv6Addr;

use smoltcp::wire::{
    ArpOperation, ArpPacket, EthernetFrame, EthernetProtocol, Icmpv4Packet, IpProtocol, Ipv4Packet,
    Ipv6Packet, TcpOption, TcpPacket, UdpPacket,
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
        EthernetProtocol::Ipv6 => describe_ipv6(&mut s, eth.payload()),
        t => {
            let _ = write!(s, "ethertype {t}, {} bytes", eth.payload().len());
        }
    }
    s
}

/// `describe`, and for a frame the core marked as a TCP super-frame of `mss`-byte segments
/// (`gso`), how many segments it is cut into and whether its checksum field holds the
/// pseudo-header's sum, as a device that completes it expects.
pub fn describe_marked(frame: &[u8], mss: u16) -> String {
    let mut s = describe(frame);
    if mss != 0 {
        match super::gso::cut(frame, mss) {
            Ok(segs) => {
                let _ = write!(
                    s,
                    " GSO {mss} x{}{}",
                    segs.len(),
                    if super::gso::partial_checksum_holds(frame) {
                        " csum partial"
                    } else {
                        " BAD-PARTIAL-CSUM"
                    }
                );
            }
            Err(e) => {
                let _ = write!(s, " GSO {mss} (cannot be cut: {e})");
            }
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
        IpProtocol::Tcp | IpProtocol::Udp => describe_tcp_udp(s, ip.next_header(), payload),
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

/// A TCP segment or UDP datagram (from its header on), either family.
fn describe_tcp_udp(s: &mut String, proto: IpProtocol, payload: &[u8]) {
    match proto {
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
                } else if (u.src_port() == 547 || u.dst_port() == 547) && p.len() >= 4 {
                    describe_dhcpv6(s, p);
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
        _ => {}
    }
}

/// Extension headers walked before giving up on a chain.
const MAX_EXTENSION_HEADERS: usize = 8;

fn ipv6_at(b: &[u8]) -> Ipv6Addr {
    <[u8; 16]>::try_from(b).map_or(Ipv6Addr::UNSPECIFIED, Ipv6Addr::from)
}

/// Whether an upper-layer message over IPv6 has a valid checksum (RFC 8200 8.1).
fn checksum6_ok(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, data: &[u8]) -> bool {
    let mut sum = Vec::with_capacity(40 + data.len());
    sum.extend_from_slice(&src.octets());
    sum.extend_from_slice(&dst.octets());
    sum.extend_from_slice(&(data.len() as u32).to_be_bytes());
    sum.extend_from_slice(&[0, 0, 0, proto]);
    sum.extend_from_slice(data);
    hubnat_core::wire::ones_sum(&sum) == 0xffff
}

fn describe_ipv6(s: &mut String, bytes: &[u8]) {
    let Ok(ip) = Ipv6Packet::new_checked(bytes) else {
        let _ = write!(s, "IPv6 (malformed, {} bytes)", bytes.len());
        return;
    };
    let (src, dst) = (ip.src_addr(), ip.dst_addr());
    let _ = write!(
        s,
        "IPv6 {src} > {dst} hlim {} plen {}",
        ip.hop_limit(),
        ip.payload_len()
    );
    let end = 40 + usize::from(ip.payload_len());
    if end > bytes.len() {
        s.push_str(" (payload length past the frame)");
    }
    let packet = &bytes[..end.min(bytes.len())];
    let mut next = u8::from(ip.next_header());
    let mut at = 40;
    for _ in 0..MAX_EXTENSION_HEADERS {
        match next {
            0 | 43 | 60 => {
                let Some(h) = packet.get(at..at + 2) else {
                    s.push_str(" (truncated extension header)");
                    return;
                };
                let len = 8 + 8 * usize::from(h[1]);
                let name = match next {
                    0 => "hop-by-hop",
                    43 => "routing",
                    _ => "dest-opts",
                };
                let _ = write!(s, " +{name}({len})");
                if at + len > packet.len() {
                    s.push_str(" (past the packet)");
                    return;
                }
                next = h[0];
                at += len;
            }
            44 => {
                let Some(h) = packet.get(at..at + 8) else {
                    s.push_str(" (truncated fragment header)");
                    return;
                };
                let off_flags = be16(&h[2..4]);
                let (off, more) = (usize::from(off_flags & !7), off_flags & 1 != 0);
                let _ = write!(
                    s,
                    " frag off {off}{} id {:#x}",
                    if more { " M" } else { "" },
                    be32(&h[4..8])
                );
                next = h[0];
                at += 8;
                if off != 0 || more {
                    let _ = write!(
                        s,
                        " proto {} len {}",
                        IpProtocol::from(next),
                        packet.len() - at
                    );
                    return;
                }
            }
            _ => break,
        }
    }
    let upper = &packet[at.min(packet.len())..];
    let proto = IpProtocol::from(next);
    if matches!(next, 6 | 17 | 58) && !checksum6_ok(src, dst, next, upper) {
        s.push_str(" BAD-CSUM");
    }
    match proto {
        IpProtocol::Tcp | IpProtocol::Udp => describe_tcp_udp(s, proto, upper),
        IpProtocol::Icmpv6 => describe_icmpv6(s, upper),
        p => {
            let _ = write!(s, " proto {p}");
        }
    }
}

fn describe_icmpv6(s: &mut String, m: &[u8]) {
    if m.len() < 4 {
        s.push_str(" ICMPv6 (malformed)");
        return;
    }
    let (ty, code) = (m[0], m[1]);
    let target = |m: &[u8]| m.get(8..24).map(ipv6_at);
    match ty {
        1..=4 => {
            let name =
                ["unreachable", "too-big", "time-exceeded", "param-problem"][ty as usize - 1];
            let _ = write!(s, " ICMPv6 {name} code {code}");
            if ty == 2 || ty == 4 {
                if let Some(v) = m.get(4..8) {
                    let _ = write!(s, " {} {}", if ty == 2 { "mtu" } else { "ptr" }, be32(v));
                }
            }
            // The invoking packet's header; the quote may end before its payload length says.
            if let Some(q) = m.get(8..48) {
                let _ = write!(
                    s,
                    " for {} > {} nh {}",
                    ipv6_at(&q[8..24]),
                    ipv6_at(&q[24..40]),
                    IpProtocol::from(q[6])
                );
                if let Some(p) = m.get(48..52) {
                    let _ = write!(s, " ports {} > {}", be16(&p[0..2]), be16(&p[2..4]));
                }
            }
        }
        128 | 129 => {
            let name = if ty == 128 {
                "echo request"
            } else {
                "echo reply"
            };
            let _ = write!(s, " ICMPv6 {name}");
            if m.len() >= 8 {
                let _ = write!(
                    s,
                    " id {} seq {} len {}",
                    be16(&m[4..6]),
                    be16(&m[6..8]),
                    m.len() - 8
                );
            }
        }
        133 => s.push_str(" ICMPv6 router solicit"),
        134 => {
            s.push_str(" ICMPv6 router advert");
            if m.len() >= 16 {
                let _ = write!(
                    s,
                    " hlim {} flags{}{} lifetime {}",
                    m[4],
                    if m[5] & 0x80 != 0 { " M" } else { "" },
                    if m[5] & 0x40 != 0 { " O" } else { "" },
                    be16(&m[6..8])
                );
                describe_nd_options(s, &m[16..]);
            }
        }
        135 | 136 => {
            let name = if ty == 135 {
                "neighbour solicit"
            } else {
                "neighbour advert"
            };
            let _ = write!(s, " ICMPv6 {name}");
            if let Some(t) = target(m) {
                let _ = write!(s, " target {t}");
            }
            if ty == 136 && m.len() > 4 {
                let f = m[4];
                for (bit, c) in [(0x80, " R"), (0x40, " S"), (0x20, " O")] {
                    if f & bit != 0 {
                        s.push_str(c);
                    }
                }
            }
            describe_nd_options(s, m.get(24..).unwrap_or_default());
        }
        _ => {
            let _ = write!(s, " ICMPv6 type {ty} code {code} len {}", m.len());
        }
    }
}

/// The options of a neighbour discovery message: link-layer addresses, prefixes, MTU, DNS.
fn describe_nd_options(s: &mut String, mut opts: &[u8]) {
    let mut list = Vec::new();
    while opts.len() >= 2 {
        let len = 8 * usize::from(opts[1]);
        let Some(o) = opts.get(..len).filter(|_| len > 0) else {
            list.push("bad option".to_owned());
            break;
        };
        match o[0] {
            1 | 2 if len >= 8 => list.push(format!(
                "{} {}",
                if o[0] == 1 { "sll" } else { "tll" },
                hex(&o[2..8])
            )),
            3 if len >= 32 => list.push(format!(
                "prefix {}/{} flags {:02x} valid {} pref {}",
                ipv6_at(&o[16..32]),
                o[2],
                o[3],
                be32(&o[4..8]),
                be32(&o[8..12])
            )),
            5 if len >= 8 => list.push(format!("mtu {}", be32(&o[4..8]))),
            25 if len >= 24 => {
                let servers: Vec<String> = o[8..]
                    .chunks_exact(16)
                    .map(|a| ipv6_at(a).to_string())
                    .collect();
                list.push(format!(
                    "rdnss {} life {}",
                    servers.join(" "),
                    be32(&o[4..8])
                ));
            }
            31 => list.push(format!("dnssl life {}", be32(&o[4..8]))),
            t => list.push(format!("opt {t}")),
        }
        opts = &opts[len..];
    }
    if !list.is_empty() {
        let _ = write!(s, " <{}>", list.join(","));
    }
}

/// A DHCPv6 message: its type, transaction id, and what its options say.
fn describe_dhcpv6(s: &mut String, p: &[u8]) {
    const NAMES: [&str; 14] = [
        "?",
        "solicit",
        "advertise",
        "request",
        "confirm",
        "renew",
        "rebind",
        "reply",
        "release",
        "decline",
        "reconfigure",
        "info-request",
        "relay-forw",
        "relay-repl",
    ];
    let name = NAMES.get(usize::from(p[0])).unwrap_or(&"?");
    let _ = write!(
        s,
        " DHCPv6 {name} xid {:06x}",
        u32::from_be_bytes([0, p[1], p[2], p[3]])
    );
    let mut list = Vec::new();
    dhcpv6_options(&p[4..], &mut list, 0);
    let _ = write!(s, " <{}>", list.join(","));
}

fn dhcpv6_options(mut o: &[u8], list: &mut Vec<String>, depth: u8) {
    while !o.is_empty() {
        let Some(h) = o.get(..4) else {
            list.push("truncated".into());
            return;
        };
        let (code, len) = (be16(&h[0..2]), usize::from(be16(&h[2..4])));
        let Some(body) = o.get(4..4 + len) else {
            list.push(format!("opt {code} len {len} past the end"));
            return;
        };
        match code {
            1 => list.push(format!("client {}", hex(body))),
            2 => list.push(format!("server {}", hex(body))),
            3 if len >= 12 && depth == 0 => {
                list.push(format!(
                    "ia_na {} t1 {} t2 {}",
                    be32(&body[0..4]),
                    be32(&body[4..8]),
                    be32(&body[8..12])
                ));
                dhcpv6_options(&body[12..], list, depth + 1);
            }
            5 if len >= 24 && depth <= 1 => list.push(format!(
                "addr {} pref {} valid {}",
                ipv6_at(&body[0..16]),
                be32(&body[16..20]),
                be32(&body[20..24])
            )),
            13 if len >= 2 => list.push(format!(
                "status {} {:?}",
                be16(&body[0..2]),
                String::from_utf8_lossy(&body[2..])
            )),
            23 => {
                let servers: Vec<String> = body
                    .chunks_exact(16)
                    .map(|a| ipv6_at(a).to_string())
                    .collect();
                list.push(format!("dns {}", servers.join(" ")));
            }
            7 if len == 1 => list.push(format!("preference {}", body[0])),
            14 => list.push("rapid-commit".into()),
            32 if len == 4 => list.push(format!("refresh {}", be32(body))),
            c => list.push(format!("opt {c} len {len}")),
        }
        o = &o[4 + len..];
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
        assert!(describe(&f).contains("IPv6 (malformed"));
        f.truncate(12);
        f.extend_from_slice(&[0x88, 0xb5, 0, 0]);
        assert!(describe(&f).contains("ethertype"));
    }

    /// An Ethernet frame of an IPv6 packet from 2001:db8::1 to 2001:db8::2 whose payload
    /// starts with header `next`.
    fn v6(next: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![
            0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x86, 0xdd, 0x60, 0, 0, 0,
        ];
        f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        f.extend_from_slice(&[next, 64]);
        f.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        f.extend_from_slice(&"2001:db8::2".parse::<Ipv6Addr>().unwrap().octets());
        f.extend_from_slice(payload);
        f
    }

    fn fill6(f: &mut [u8], proto: u8, csum_at: usize) {
        let (src, dst) = (ipv6_at(&f[22..38]), ipv6_at(&f[38..54]));
        let mut sum = src.octets().to_vec();
        sum.extend_from_slice(&dst.octets());
        sum.extend_from_slice(&((f.len() - 54) as u32).to_be_bytes());
        sum.extend_from_slice(&[0, 0, 0, proto]);
        sum.extend_from_slice(&f[54..]);
        let c = !hubnat_core::wire::ones_sum(&sum);
        f[54 + csum_at..54 + csum_at + 2].copy_from_slice(&c.to_be_bytes());
    }

    #[test]
    fn ipv6_is_described() {
        // TCP behind a destination-options header
        let mut tcp = vec![6, 0, 1, 4, 0, 0, 0, 0];
        tcp.extend_from_slice(&[0x9c, 0x40, 0, 80, 0, 0, 0, 7, 0, 0, 0, 9, 0x50, 0x12, 1, 0]);
        tcp.extend_from_slice(&[0, 0, 0, 0, b'h', b'i']);
        let mut f = v6(60, &tcp);
        let d = describe(&f);
        assert!(
            d.starts_with("02-00-00-00-00-01 > 02-00-00-00-00-02 IPv6 2001:db8::1 > 2001:db8::2 hlim 64 plen 30 +dest-opts(8) BAD-CSUM TCP 40000 > 80 [S.] seq 7 ack 9 win 256 len 2"),
            "{d}"
        );
        // the checksum covers the TCP segment alone (after the extension header)
        let mut sum = f[22..54].to_vec();
        sum.extend_from_slice(&22u32.to_be_bytes());
        sum.extend_from_slice(&[0, 0, 0, 6]);
        sum.extend_from_slice(&f[62..]);
        let c = !hubnat_core::wire::ones_sum(&sum);
        f[62 + 16..62 + 18].copy_from_slice(&c.to_be_bytes());
        assert!(!describe(&f).contains("BAD-CSUM"), "{}", describe(&f));
        // a fragment that is not the first
        let d = describe(&v6(44, &[17, 0, 0x05, 0xa9, 0, 0, 1, 0, 1, 2, 3, 4]));
        assert!(
            d.ends_with("frag off 1448 M id 0x100 proto UDP len 4"),
            "{d}"
        );
        // an echo request; a neighbour solicitation with its option
        let mut f = v6(58, &[128, 0, 0, 0, 0, 7, 0, 1, b'x']);
        fill6(&mut f, 58, 2);
        let d = describe(&f);
        assert!(d.ends_with("ICMPv6 echo request id 7 seq 1 len 1"), "{d}");
        let mut ns = vec![135, 0, 0, 0, 0, 0, 0, 0];
        ns.extend_from_slice(&"2001:db8::2".parse::<Ipv6Addr>().unwrap().octets());
        ns.extend_from_slice(&[1, 1, 2, 0, 0, 0, 0, 1]);
        let mut f = v6(58, &ns);
        fill6(&mut f, 58, 2);
        let d = describe(&f);
        assert!(
            d.ends_with("ICMPv6 neighbour solicit target 2001:db8::2 <sll 02:00:00:00:00:01>"),
            "{d}"
        );
        // a DHCPv6 message with an IA_NA
        let mut udp = vec![2, 0x22, 2, 0x23, 0, 0, 0, 0, 7, 0, 0, 9];
        udp.extend_from_slice(&[0, 3, 0, 12, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3]);
        let l = udp.len() as u16;
        udp[4..6].copy_from_slice(&l.to_be_bytes());
        let mut f = v6(17, &udp);
        fill6(&mut f, 17, 6);
        let d = describe(&f);
        assert!(
            d.ends_with("UDP 546 > 547 len 20 DHCPv6 reply xid 000009 <ia_na 1 t1 2 t2 3>"),
            "{d}"
        );
        // never a panic on a truncated chain or a short message
        for cut in 0..f.len() {
            let _ = describe(&f[..cut]);
        }
        for bad in [
            v6(0, &[58, 9]),
            v6(44, &[17]),
            v6(58, &[1]),
            v6(17, &[0; 8]),
        ] {
            let _ = describe(&bad);
        }
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
