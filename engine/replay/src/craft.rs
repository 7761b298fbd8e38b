//! Crafted scenarios: guest frames built here, each played against the replay driver as it is
//! built, so a crafted guest acknowledges what the replayed core really sent (its ISN, its
//! DHCP offer). `hubnat-pcap craft` writes them to `pcaps/NAME.in.pcap` with their script.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::time::Duration;

use smoltcp::wire::{
    EthernetFrame, EthernetProtocol, IpAddress, IpProtocol, Ipv4Packet, Ipv6Packet, TcpPacket,
    UdpPacket,
};

use super::pcap::Frame;
use super::script::{Script, REPLAY_MAC};
use super::Driver;
use hubnat_core::config::Mac;

/// The time of every crafted capture's first frame (2023-11-14 22:13:20 UTC).
pub const EPOCH: Duration = Duration::from_secs(1_700_000_000);
pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 30, 1);
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 30, 50);
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);

pub fn guest_mac(n: u8) -> Mac {
    Mac([0x02, 0, 0, 0, 0, n])
}

// ---- frame builders -------------------------------------------------------------------------

pub fn ethernet(dst: Mac, src: Mac, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst.0);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An IPv4 packet (header with checksum); `frag` is (offset in 8-byte units, more fragments).
pub fn ipv4(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: IpProtocol,
    ident: u16,
    frag: (u16, bool),
    payload: &[u8],
) -> Vec<u8> {
    let mut b = vec![0u8; 20 + payload.len()];
    let mut p = Ipv4Packet::new_unchecked(&mut b[..]);
    p.set_version(4);
    p.set_header_len(20);
    p.set_total_len((20 + payload.len()) as u16);
    p.set_ident(ident);
    p.clear_flags();
    p.set_more_frags(frag.1);
    p.set_frag_offset(frag.0 * 8);
    p.set_hop_limit(64);
    p.set_next_header(proto);
    p.set_src_addr(src);
    p.set_dst_addr(dst);
    p.fill_checksum();
    b[20..].copy_from_slice(payload);
    b
}

/// A UDP datagram (header, checksum, payload) from `src` to `dst`, of either family.
pub fn udp(src: impl Into<SocketAddr>, dst: impl Into<SocketAddr>, payload: &[u8]) -> Vec<u8> {
    let (src, dst) = (src.into(), dst.into());
    let mut b = vec![0u8; 8 + payload.len()];
    let mut u = UdpPacket::new_unchecked(&mut b[..]);
    u.set_src_port(src.port());
    u.set_dst_port(dst.port());
    u.set_len((8 + payload.len()) as u16);
    u.payload_mut().copy_from_slice(payload);
    u.fill_checksum(&IpAddress::from(src.ip()), &IpAddress::from(dst.ip()));
    b
}

pub fn udp_frame(
    mac: Mac,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    ident: u16,
    payload: &[u8],
) -> Vec<u8> {
    let ip = ipv4(
        *src.ip(),
        *dst.ip(),
        IpProtocol::Udp,
        ident,
        (0, false),
        &udp(src, dst, payload),
    );
    ethernet(REPLAY_MAC, mac, 0x0800, &ip)
}

pub const SYN: u8 = 0x02;
pub const FIN: u8 = 0x01;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

/// A TCP segment (header with `opts` padded to 4 bytes, checksum, payload), of either family.
#[allow(clippy::too_many_arguments)]
pub fn tcp(
    src: impl Into<SocketAddr>,
    dst: impl Into<SocketAddr>,
    flags: u8,
    seq: u32,
    ack: u32,
    win: u16,
    opts: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let (src, dst) = (src.into(), dst.into());
    let ol = opts.len().div_ceil(4) * 4;
    let hl = 20 + ol;
    let mut b = vec![0u8; hl + payload.len()];
    b[0..2].copy_from_slice(&src.port().to_be_bytes());
    b[2..4].copy_from_slice(&dst.port().to_be_bytes());
    b[4..8].copy_from_slice(&seq.to_be_bytes());
    b[8..12].copy_from_slice(&ack.to_be_bytes());
    b[12] = ((hl / 4) as u8) << 4;
    b[13] = flags;
    b[14..16].copy_from_slice(&win.to_be_bytes());
    b[20..20 + opts.len()].copy_from_slice(opts);
    for x in &mut b[20 + opts.len()..hl] {
        *x = 1; // NOP padding
    }
    b[hl..].copy_from_slice(payload);
    TcpPacket::new_unchecked(&mut b[..])
        .fill_checksum(&IpAddress::from(src.ip()), &IpAddress::from(dst.ip()));
    b
}

pub fn arp(
    mac: Mac,
    op: u16,
    sha: Mac,
    spa: Ipv4Addr,
    tha: Mac,
    tpa: Ipv4Addr,
    dst: Mac,
) -> Vec<u8> {
    let mut p = vec![0, 1, 8, 0, 6, 4];
    p.extend_from_slice(&op.to_be_bytes());
    p.extend_from_slice(&sha.0);
    p.extend_from_slice(&spa.octets());
    p.extend_from_slice(&tha.0);
    p.extend_from_slice(&tpa.octets());
    ethernet(dst, mac, 0x0806, &p)
}

/// A DHCP client message; `opts` are (code, value) after the message type.
pub fn dhcp(mac: Mac, xid: u32, ciaddr: Ipv4Addr, msg_type: u8, opts: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let mut m = vec![0u8; 240];
    m[0] = 1;
    m[1] = 1;
    m[2] = 6;
    m[4..8].copy_from_slice(&xid.to_be_bytes());
    if ciaddr.is_unspecified() {
        m[10] = 0x80; // broadcast flag
    }
    m[12..16].copy_from_slice(&ciaddr.octets());
    m[28..34].copy_from_slice(&mac.0);
    m[236..240].copy_from_slice(&[99, 130, 83, 99]);
    m.extend_from_slice(&[53, 1, msg_type]);
    for (c, v) in opts {
        m.push(*c);
        m.push(v.len() as u8);
        m.extend_from_slice(v);
    }
    m.push(255);
    m
}

/// The frame carrying a DHCP message: broadcast when `ciaddr` is 0, else unicast to the host.
pub fn dhcp_frame(mac: Mac, ciaddr: Ipv4Addr, unicast: bool, msg: &[u8], ident: u16) -> Vec<u8> {
    let (dst_ip, dst_mac) = if unicast {
        (HOST_IP, REPLAY_MAC)
    } else {
        (Ipv4Addr::BROADCAST, Mac::BROADCAST)
    };
    let d = udp(
        SocketAddrV4::new(ciaddr, 68),
        SocketAddrV4::new(dst_ip, 67),
        msg,
    );
    let ip = ipv4(ciaddr, dst_ip, IpProtocol::Udp, ident, (0, false), &d);
    ethernet(dst_mac, mac, 0x0800, &ip)
}

/// An Ethernet frame of one IPv6 packet carrying the ICMPv6 message `msg` (from its type
/// byte; its checksum is filled in here).
pub fn icmpv6_frame(
    dst_mac: Mac,
    src_mac: Mac,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    hop_limit: u8,
    msg: &[u8],
) -> Vec<u8> {
    let mut m = msg.to_vec();
    m[2..4].fill(0);
    let mut sum = Vec::with_capacity(40 + m.len());
    sum.extend_from_slice(&src.octets());
    sum.extend_from_slice(&dst.octets());
    sum.extend_from_slice(&(m.len() as u32).to_be_bytes());
    sum.extend_from_slice(&[0, 0, 0, 58]);
    sum.extend_from_slice(&m);
    let c = !hubnat_core::wire::ones_sum(&sum);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    let mut ip = vec![0u8; 40];
    ip[0] = 0x60;
    ip[4..6].copy_from_slice(&(m.len() as u16).to_be_bytes());
    ip[6] = 58;
    ip[7] = hop_limit;
    ip[8..24].copy_from_slice(&src.octets());
    ip[24..40].copy_from_slice(&dst.octets());
    ip.extend_from_slice(&m);
    ethernet(dst_mac, src_mac, 0x86dd, &ip)
}

/// The checksum of an upper-layer message over IPv6 (RFC 8200 8.1: its pseudo-header
/// included); `data` has its checksum field zeroed.
pub fn checksum6(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, data: &[u8]) -> u16 {
    let mut sum = Vec::with_capacity(40 + data.len());
    sum.extend_from_slice(&src.octets());
    sum.extend_from_slice(&dst.octets());
    sum.extend_from_slice(&(data.len() as u32).to_be_bytes());
    sum.extend_from_slice(&[0, 0, 0, proto]);
    sum.extend_from_slice(data);
    !hubnat_core::wire::ones_sum(&sum)
}

/// An IPv6 packet: the fixed header (hop limit `hop`), then `payload`, whose first header is
/// `next` (an extension header's or the upper layer's number).
pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, hop: u8, payload: &[u8]) -> Vec<u8> {
    let mut ip = vec![0u8; 40];
    ip[0] = 0x60;
    ip[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
    ip[6] = next;
    ip[7] = hop;
    ip[8..24].copy_from_slice(&src.octets());
    ip[24..40].copy_from_slice(&dst.octets());
    ip.extend_from_slice(payload);
    ip
}

/// One fragment of an IPv6 datagram whose fragmentable part starts with header `next`:
/// `part` of it at byte `offset` (a multiple of 8), behind a fragment header.
pub fn ipv6_fragment(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    next: u8,
    ident: u32,
    offset: usize,
    more: bool,
    part: &[u8],
) -> Vec<u8> {
    let mut h = vec![next, 0];
    h.extend_from_slice(&((offset as u16 & !7) | u16::from(more)).to_be_bytes());
    h.extend_from_slice(&ident.to_be_bytes());
    h.extend_from_slice(part);
    ipv6(src, dst, 44, 64, &h)
}

/// A guest's UDP datagram over IPv6, in a frame to the virtual host's MAC.
pub fn udp6_frame(mac: Mac, src: SocketAddrV6, dst: SocketAddrV6, payload: &[u8]) -> Vec<u8> {
    let d = udp(src, dst, payload);
    ethernet(
        REPLAY_MAC,
        mac,
        0x86dd,
        &ipv6(*src.ip(), *dst.ip(), 17, 64, &d),
    )
}

/// The Ethernet address of the IPv6 multicast group `ip`.
fn mcast_mac(ip: Ipv6Addr) -> Mac {
    let o = ip.octets();
    Mac([0x33, 0x33, o[12], o[13], o[14], o[15]])
}

/// The solicited-node group of `ip`.
fn solicited(ip: Ipv6Addr) -> Ipv6Addr {
    let o = ip.octets();
    Ipv6Addr::from([
        0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, o[13], o[14], o[15],
    ])
}

/// A neighbour solicitation or advertisement (type `ty`, `flags` in its first reserved byte)
/// for `target`, with a link-layer option (`opt`: 1 source, 2 target) when given.
fn nd(ty: u8, flags: u8, target: Ipv6Addr, opt: Option<(u8, Mac)>) -> Vec<u8> {
    let mut m = vec![ty, 0, 0, 0, flags, 0, 0, 0];
    m.extend_from_slice(&target.octets());
    if let Some((t, mac)) = opt {
        m.extend_from_slice(&[t, 1]);
        m.extend_from_slice(&mac.0);
    }
    m
}

/// An ICMP echo request (header and data, with checksum).
pub fn icmp_echo(id: u16, seq: u16, data: &[u8]) -> Vec<u8> {
    let mut m = vec![8, 0, 0, 0];
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(data);
    let c = super::checksum(&m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// A DNS query for `name` of type `qtype`.
pub fn dns_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    for l in name.split('.') {
        q.push(l.len() as u8);
        q.extend_from_slice(l.as_bytes());
    }
    q.extend_from_slice(&[0]);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&[0, 1]);
    q
}

// ---- an interactive session -----------------------------------------------------------------

/// A crafted capture being made: every frame sent is played at once, so the next can answer.
pub struct Session {
    pub driver: Driver,
    pub input: Vec<Frame>,
    pub output: Vec<Frame>,
    /// Time since the capture's start.
    pub t: Duration,
    ident: u16,
}

impl Session {
    pub fn new(script: &Script) -> Session {
        Session {
            driver: Driver::new(script.clone()),
            input: Vec::new(),
            output: Vec::new(),
            t: Duration::ZERO,
            ident: 0,
        }
    }

    pub fn ident(&mut self) -> u16 {
        self.ident = self.ident.wrapping_add(1);
        self.ident
    }

    pub fn wait_ms(&mut self, ms: u64) {
        self.t += Duration::from_millis(ms);
    }

    /// Sends a frame now and returns what the core sent in answer (timers before it included),
    /// as the guest gets it: a TCP super-frame cut into its segments, as the virtio-net device
    /// of a TAP with offloads would (`gso::cut`).
    pub fn send(&mut self, frame: Vec<u8>) -> Vec<Frame> {
        let ts = EPOCH + self.t;
        let before = self.output.len();
        let out = &mut self.output;
        self.driver.frame(ts, &frame, &mut |ts, f| {
            out.push(Frame {
                ts,
                data: f.to_vec(),
            })
        });
        self.input.push(Frame { ts, data: frame });
        let marks = self.driver.gso_marks();
        let first = marks.partition_point(|&(i, _)| i < before);
        let mut marks = marks[first..].iter().peekable();
        let mut got = Vec::new();
        for (i, f) in self.output.iter().enumerate().skip(before) {
            match marks.next_if(|&&(m, _)| m == i) {
                Some(&(_, mss)) => {
                    let segs = super::gso::cut(&f.data, mss)
                        .unwrap_or_else(|e| panic!("the core's super-frame {}: {e}", i + 1));
                    got.extend(segs.into_iter().map(|data| Frame { ts: f.ts, data }));
                }
                None => got.push(f.clone()),
            }
        }
        got
    }

    pub fn finish(mut self) -> (Vec<Frame>, Vec<Frame>) {
        let out = &mut self.output;
        self.driver.finish(&mut |ts, f| {
            out.push(Frame {
                ts,
                data: f.to_vec(),
            })
        });
        (self.input, self.output)
    }
}

/// The parts of a TCP segment the core sent that a crafted guest needs.
#[derive(Clone, Copy, Debug)]
pub struct Seg {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub flags: u8,
    pub seq: u32,
    pub ack: u32,
    pub len: u32,
    pub tsval: Option<u32>,
}

/// A TCP segment the core sent, over IPv4 or IPv6 (the core puts no extension headers before
/// TCP).
pub fn parse_tcp(frame: &[u8]) -> Option<Seg> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    let (src, dst, raw): (IpAddr, IpAddr, &[u8]) = match eth.ethertype() {
        EthernetProtocol::Ipv4 => {
            let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
            if ip.next_header() != IpProtocol::Tcp {
                return None;
            }
            let end = usize::from(ip.total_len()).min(eth.payload().len());
            let raw = eth.payload().get(usize::from(ip.header_len())..end)?;
            (ip.src_addr().into(), ip.dst_addr().into(), raw)
        }
        EthernetProtocol::Ipv6 => {
            let ip = Ipv6Packet::new_checked(eth.payload()).ok()?;
            if ip.next_header() != IpProtocol::Tcp {
                return None;
            }
            let end = (40 + usize::from(ip.payload_len())).min(eth.payload().len());
            let raw = eth.payload().get(40..end)?;
            (ip.src_addr().into(), ip.dst_addr().into(), raw)
        }
        _ => return None,
    };
    let t = TcpPacket::new_checked(raw).ok()?;
    let mut tsval = None;
    let hl = t.header_len() as usize;
    let mut i = 20;
    while i < hl {
        match raw[i] {
            0 => break,
            1 => i += 1,
            k => {
                let l = raw[i + 1] as usize;
                if l < 2 {
                    break;
                }
                if k == 8 && l == 10 {
                    tsval = Some(u32::from_be_bytes([
                        raw[i + 2],
                        raw[i + 3],
                        raw[i + 4],
                        raw[i + 5],
                    ]));
                }
                i += l;
            }
        }
    }
    Some(Seg {
        src: SocketAddr::new(src, t.src_port()),
        dst: SocketAddr::new(dst, t.dst_port()),
        flags: raw[13],
        seq: t.seq_number().0 as u32,
        ack: t.ack_number().0 as u32,
        len: t.payload().len() as u32,
        tsval,
    })
}

/// A crafted guest's TCP connection.
pub struct GuestConn {
    pub mac: Mac,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// The guest's next sequence number.
    pub seq: u32,
    /// What the guest acknowledges (the core's next sequence number).
    pub ack: u32,
    pub win: u16,
    /// The core's latest TSval (echoed), when timestamps are on.
    pub ts_recent: u32,
    pub peer_fin: bool,
    /// The MSS the guest's SYN offers (None: a 1500-byte link's).
    pub mss: Option<u16>,
    /// A segment of the core's (by its sequence number) the guest loses once, never seeing it.
    pub lose: Option<u32>,
    /// Data the guest holds beyond a hole (start, end), in order; acknowledged with SACK.
    pub ooo: Vec<(u32, u32)>,
}

impl GuestConn {
    /// A connection from `src` to `dst`, both of one family.
    pub fn new(
        mac: Mac,
        src: impl Into<SocketAddr>,
        dst: impl Into<SocketAddr>,
        isn: u32,
    ) -> GuestConn {
        GuestConn {
            mac,
            src: src.into(),
            dst: dst.into(),
            seq: isn,
            ack: 0,
            win: 502,
            ts_recent: 0,
            peer_fin: false,
            mss: None,
            lose: None,
            ooo: Vec::new(),
        }
    }

    fn frame(&self, s: &Session, flags: u8, seq: u32, payload: &[u8], syn_opts: bool) -> Vec<u8> {
        let tsval = (s.t.as_millis() as u32).wrapping_add(1000).to_be_bytes();
        let tse = self.ts_recent.to_be_bytes();
        let opts: Vec<u8> = if syn_opts {
            // The MSS of a 1500-byte link: 1460 over IPv4, 1440 over IPv6.
            let mss: u16 = self
                .mss
                .unwrap_or(if self.src.is_ipv4() { 1460 } else { 1440 });
            let mut o = vec![2, 4];
            o.extend_from_slice(&mss.to_be_bytes());
            o.extend_from_slice(&[4, 2, 8, 10]);
            o.extend_from_slice(&tsval);
            o.extend_from_slice(&tse);
            o.extend_from_slice(&[1, 3, 3, 7]);
            o
        } else {
            let mut o = vec![1, 1, 8, 10];
            o.extend_from_slice(&tsval);
            o.extend_from_slice(&tse);
            // SACK blocks for what the guest holds beyond a hole (RFC 2018), at most three
            // beside the timestamps.
            if !self.ooo.is_empty() && flags & ACK != 0 {
                let blocks = &self.ooo[..self.ooo.len().min(3)];
                o.extend_from_slice(&[1, 1, 5, 2 + 8 * blocks.len() as u8]);
                for (a, b) in blocks {
                    o.extend_from_slice(&a.to_be_bytes());
                    o.extend_from_slice(&b.to_be_bytes());
                }
            }
            o
        };
        let ack = if flags & ACK != 0 { self.ack } else { 0 };
        let win = if syn_opts { 64240 } else { self.win };
        let seg = tcp(self.src, self.dst, flags, seq, ack, win, &opts, payload);
        match (self.src.ip(), self.dst.ip()) {
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                ethernet(REPLAY_MAC, self.mac, 0x86dd, &ipv6(src, dst, 6, 64, &seg))
            }
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                let ip = ipv4(src, dst, IpProtocol::Tcp, 0, (0, false), &seg);
                ethernet(REPLAY_MAC, self.mac, 0x0800, &ip)
            }
            _ => panic!("a crafted connection of mixed families"),
        }
    }

    /// Takes in what the core sent on this connection (in-order data and FIN advance `ack`).
    pub fn absorb(&mut self, out: &[Frame]) {
        for f in out {
            let Some(s) = parse_tcp(&f.data) else {
                continue;
            };
            if s.dst != self.src || s.src != self.dst {
                continue;
            }
            if let Some(ts) = s.tsval {
                self.ts_recent = ts;
            }
            if s.len > 0 && self.lose == Some(s.seq) {
                self.lose = None;
                continue;
            }
            if s.flags & SYN != 0 {
                self.ack = s.seq.wrapping_add(1);
            } else if s.seq == self.ack {
                self.ack = self.ack.wrapping_add(s.len);
                if s.flags & FIN != 0 {
                    self.ack = self.ack.wrapping_add(1);
                    self.peer_fin = true;
                }
                self.fill_from_ooo();
            } else if s.len > 0 && (s.seq.wrapping_sub(self.ack) as i32) > 0 {
                self.hold(s.seq, s.seq.wrapping_add(s.len));
            }
        }
    }

    /// Keeps data that arrived beyond a hole (merged with what is held already).
    fn hold(&mut self, a: u32, b: u32) {
        let after = |x: u32, y: u32| (x.wrapping_sub(y) as i32) > 0;
        let mut r = (a, b);
        self.ooo.retain(|&(x, y)| {
            let apart = after(x, r.1) || after(r.0, y);
            if !apart {
                r = (
                    if after(x, r.0) { r.0 } else { x },
                    if after(y, r.1) { y } else { r.1 },
                );
            }
            apart
        });
        let at = self.ooo.partition_point(|&(x, _)| after(r.0, x));
        self.ooo.insert(at, r);
    }

    /// Once a hole is filled, takes what was held beyond it.
    fn fill_from_ooo(&mut self) {
        while let Some(&(a, b)) = self.ooo.first() {
            if (a.wrapping_sub(self.ack) as i32) > 0 {
                break;
            }
            if (b.wrapping_sub(self.ack) as i32) > 0 {
                self.ack = b;
            }
            self.ooo.remove(0);
        }
    }

    /// Sends SYN, then the handshake's ACK when the core answered with SYN-ACK.
    pub fn connect(&mut self, s: &mut Session) -> Vec<Frame> {
        let f = self.frame(s, SYN, self.seq, &[], true);
        self.seq = self.seq.wrapping_add(1);
        let out = s.send(f);
        self.absorb(&out);
        let established = out
            .iter()
            .filter_map(|f| parse_tcp(&f.data))
            .any(|g| g.dst == self.src && g.flags & (SYN | ACK) == SYN | ACK);
        if established {
            s.wait_ms(1);
            let out2 = self.send(s, ACK, &[]);
            return [out, out2].concat();
        }
        out
    }

    /// Sends a segment at the current sequence number and advances it.
    pub fn send(&mut self, s: &mut Session, flags: u8, payload: &[u8]) -> Vec<Frame> {
        let f = self.frame(s, flags, self.seq, payload, false);
        self.seq = self
            .seq
            .wrapping_add(payload.len() as u32 + u32::from(flags & FIN != 0));
        let out = s.send(f);
        self.absorb(&out);
        out
    }

    /// Sends a segment at an explicit sequence number (reordering, retransmission), no advance.
    pub fn send_at(&mut self, s: &mut Session, seq: u32, flags: u8, payload: &[u8]) -> Vec<Frame> {
        let f = self.frame(s, flags, seq, payload, false);
        let out = s.send(f);
        self.absorb(&out);
        out
    }

    /// The frame of a segment, not sent (for corrupting it first).
    pub fn build(&self, s: &Session, flags: u8, payload: &[u8]) -> Vec<u8> {
        self.frame(s, flags, self.seq, payload, false)
    }
}

/// The names of the crafted scenarios, in `pcaps/` order.
pub const NAMES: &[&str] = &[
    "arp",
    "dhcp_exchange_renewal",
    "dns",
    "udp",
    "icmp",
    "tcp_upload_loss_reorder",
    "tcp_download",
    "tcp_refused_and_silent",
    "many_flows",
    "ip_fragments",
    "malformed",
    "ndp",
    "dhcpv6",
    "tcp6",
    "udp6",
    "tso",
    "uso",
];

/// A crafted scenario: its script (TOML text) and its input frames.
pub fn build(name: &str) -> Option<(String, Vec<Frame>)> {
    let text = match name {
        "tcp_download" => "[host]\ntcp = \"fixed:60000\"\n",
        "tcp_upload_loss_reorder" => "[host]\ntcp = \"sink\"\n",
        "tcp_refused_and_silent" => {
            "[host]\nconnects = { \"10.77.0.2:81\" = \"refuse\", \"10.77.0.2:82\" = \"silent\" }\n\
             [engine]\nnat = { tcp_connect_timeout = 2 }\n"
        }
        "dns" => "[host]\ndns = { \"www.example.test\" = \"10.77.0.80\" }\n",
        "udp" => "[host]\nudp_ports = { \"9\" = \"refuse\", \"19\" = \"silent\" }\n",
        "icmp" => "[engine]\nnat = { icmp = \"real\" }\n",
        "ip_fragments" => "tail_ms = 35000\n",
        "dhcpv6" => "[engine]\nipv6 = { dhcpv6 = \"stateful\" }\n",
        "tcp6" => {
            "[host]\ntcp_ports = { \"80\" = \"fixed:5000\" }\n\
             connects = { \"[2001:db8::5]:81\" = \"refuse\" }\n"
        }
        "tso" => {
            "tcp_gso = true\n\
             [host]\ntcp = \"sink\"\ntcp_ports = { \"80\" = \"fixed:200000\", \"81\" = \"fixed:20000\" }\n"
        }
        "uso" => "udp_gso = true\n[host]\nudp = \"burst:5\"\n",
        "udp6" => {
            "[host]\nudp_ports = { \"9\" = \"refuse\" }\n\
             dns = { \"www.example.test\" = [\"10.77.0.80\", \"2001:db8::80\"] }\n"
        }
        _ => "",
    };
    let script = Script::parse(text).expect("crafted scripts are valid");
    let mut s = Session::new(&script);
    match name {
        "arp" => arp_scenario(&mut s),
        "dhcp_exchange_renewal" => dhcp_scenario(&mut s),
        "dns" => dns_scenario(&mut s),
        "udp" => udp_scenario(&mut s),
        "icmp" => icmp_scenario(&mut s),
        "tcp_upload_loss_reorder" => upload_scenario(&mut s),
        "tcp_download" => download_scenario(&mut s),
        "tcp_refused_and_silent" => refused_scenario(&mut s),
        "many_flows" => many_flows_scenario(&mut s),
        "ip_fragments" => fragments_scenario(&mut s),
        "malformed" => malformed_scenario(&mut s),
        "ndp" => ndp_scenario(&mut s),
        "dhcpv6" => dhcpv6_scenario(&mut s),
        "tcp6" => tcp6_scenario(&mut s),
        "udp6" => udp6_scenario(&mut s),
        "tso" => tso_scenario(&mut s),
        "uso" => uso_scenario(&mut s),
        _ => return None,
    }
    let (input, _) = s.finish();
    Some((text.to_owned(), input))
}

fn g(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(GUEST_IP, port)
}

fn srv(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(SERVER_IP, port)
}

fn arp_scenario(s: &mut Session) {
    let m = guest_mac(1);
    let z = Mac([0; 6]);
    // who-has the virtual host, twice (answered both times)
    s.send(arp(m, 1, m, GUEST_IP, z, HOST_IP, Mac::BROADCAST));
    s.wait_ms(500);
    s.send(arp(m, 1, m, GUEST_IP, z, HOST_IP, Mac::BROADCAST));
    // gratuitous ARP of another guest; who-has another guest (not ours to answer)
    s.wait_ms(100);
    let m2 = guest_mac(2);
    let ip2 = Ipv4Addr::new(192, 168, 30, 51);
    s.send(arp(m2, 1, m2, ip2, z, ip2, Mac::BROADCAST));
    s.send(arp(m, 1, m, GUEST_IP, z, ip2, Mac::BROADCAST));
    // a reply addressed to the host, a probe (sender 0.0.0.0), an address outside the subnet
    s.send(arp(m, 2, m, GUEST_IP, REPLAY_MAC, HOST_IP, REPLAY_MAC));
    s.send(arp(
        m,
        1,
        m,
        Ipv4Addr::UNSPECIFIED,
        z,
        HOST_IP,
        Mac::BROADCAST,
    ));
    s.send(arp(
        m,
        1,
        m,
        Ipv4Addr::new(10, 9, 9, 9),
        z,
        HOST_IP,
        Mac::BROADCAST,
    ));
    // truncated ARP, ARP for IPv6-sized addresses
    let mut short = arp(m, 1, m, GUEST_IP, z, HOST_IP, Mac::BROADCAST);
    short.truncate(30);
    s.send(short);
    let mut odd = arp(m, 1, m, GUEST_IP, z, HOST_IP, Mac::BROADCAST);
    odd[14 + 5] = 16;
    s.send(odd);
}

/// The DHCP server's answer in `out`: (message type, yiaddr).
fn dhcp_answer(out: &[Frame]) -> Option<(u8, Ipv4Addr)> {
    out.iter().find_map(|f| {
        let eth = EthernetFrame::new_checked(&f.data[..]).ok()?;
        let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
        let u = UdpPacket::new_checked(ip.payload()).ok()?;
        if u.src_port() != 67 {
            return None;
        }
        let p = u.payload();
        let yi = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
        let mut i = 240;
        while i + 2 < p.len() {
            if p[i] == 53 {
                return Some((p[i + 2], yi));
            }
            if p[i] == 0 {
                i += 1;
                continue;
            }
            i += 2 + p[i + 1] as usize;
        }
        None
    })
}

fn dhcp_scenario(s: &mut Session) {
    let m = guest_mac(3);
    let host = HOST_IP.octets().to_vec();
    let prl = (55u8, vec![1, 3, 6, 15, 51, 54]);
    let name = (12u8, b"crafted".to_vec());
    let id = s.ident();
    let out = s.send(dhcp_frame(
        m,
        Ipv4Addr::UNSPECIFIED,
        false,
        &dhcp(
            m,
            0x1111_0001,
            Ipv4Addr::UNSPECIFIED,
            1,
            &[name.clone(), prl.clone()],
        ),
        id,
    ));
    let offered = dhcp_answer(&out).map_or(Ipv4Addr::new(192, 168, 30, 10), |a| a.1);
    s.wait_ms(20);
    let req = dhcp(
        m,
        0x1111_0001,
        Ipv4Addr::UNSPECIFIED,
        3,
        &[
            (50, offered.octets().to_vec()),
            (54, host.clone()),
            name.clone(),
            prl.clone(),
        ],
    );
    let id = s.ident();
    s.send(dhcp_frame(m, Ipv4Addr::UNSPECIFIED, false, &req, id));
    // renewal at T1 (unicast, ciaddr set), rebinding (broadcast), a request for a wrong
    // address (NAK), an INFORM, and the release
    s.wait_ms(3_600_000);
    let id = s.ident();
    s.send(dhcp_frame(
        m,
        offered,
        true,
        &dhcp(m, 0x1111_0002, offered, 3, &[name.clone(), prl.clone()]),
        id,
    ));
    s.wait_ms(2_700_000);
    let id = s.ident();
    s.send(dhcp_frame(
        m,
        offered,
        false,
        &dhcp(m, 0x1111_0003, offered, 3, std::slice::from_ref(&name)),
        id,
    ));
    s.wait_ms(1000);
    let id = s.ident();
    let wrong = dhcp(
        m,
        0x1111_0004,
        Ipv4Addr::UNSPECIFIED,
        3,
        &[(50, vec![192, 168, 30, 250]), name.clone()],
    );
    s.send(dhcp_frame(m, Ipv4Addr::UNSPECIFIED, false, &wrong, id));
    s.wait_ms(1000);
    let id = s.ident();
    s.send(dhcp_frame(
        m,
        offered,
        true,
        &dhcp(m, 0x1111_0005, offered, 8, &[prl]),
        id,
    ));
    s.wait_ms(1000);
    let id = s.ident();
    s.send(dhcp_frame(
        m,
        offered,
        true,
        &dhcp(m, 0x1111_0006, offered, 7, &[(54, host)]),
        id,
    ));
    // a second client that only discovers (its offer is held, then lapses)
    let m2 = guest_mac(4);
    let id = s.ident();
    s.send(dhcp_frame(
        m2,
        Ipv4Addr::UNSPECIFIED,
        false,
        &dhcp(m2, 0x2222_0001, Ipv4Addr::UNSPECIFIED, 1, &[]),
        id,
    ));
    // a BOOTP message that is too short
    let mut short = dhcp(m2, 0x2222_0002, Ipv4Addr::UNSPECIFIED, 1, &[]);
    short.truncate(100);
    let id = s.ident();
    s.send(dhcp_frame(m2, Ipv4Addr::UNSPECIFIED, false, &short, id));
}

fn dns_scenario(s: &mut Session) {
    let m = guest_mac(5);
    let dns = SocketAddrV4::new(HOST_IP, 53);
    let t = |s: &mut Session, port: u16, q: Vec<u8>| {
        let id = s.ident();
        s.send(udp_frame(m, g(port), dns, id, &q));
        s.wait_ms(5);
    };
    t(s, 40001, dns_query(0x0101, "www.example.test", 1));
    t(s, 40001, dns_query(0x0102, "www.example.test", 28));
    t(s, 40002, dns_query(0x0103, "nowhere.example.test", 1));
    t(s, 40003, dns_query(0x0104, "WWW.Example.Test", 1));
    // a query with the response bit set, a truncated header, a truncated question
    let mut resp = dns_query(0x0105, "www.example.test", 1);
    resp[2] |= 0x80;
    t(s, 40004, resp);
    t(s, 40004, vec![0x01, 0x06, 0x01]);
    let mut cut = dns_query(0x0107, "www.example.test", 1);
    cut.truncate(20);
    t(s, 40004, cut);
    // the same query ID from two guests' ports at once
    t(s, 40005, dns_query(0x0200, "www.example.test", 1));
    t(s, 40006, dns_query(0x0200, "www.example.test", 1));
}

fn udp_scenario(s: &mut Session) {
    let m = guest_mac(6);
    for i in 0..5u16 {
        let id = s.ident();
        s.send(udp_frame(
            m,
            g(50000),
            srv(7),
            id,
            format!("echo datagram {i}").as_bytes(),
        ));
        s.wait_ms(10);
    }
    let id = s.ident();
    s.send(udp_frame(m, g(50001), srv(7), id, &[0u8; 1400]));
    let id = s.ident();
    s.send(udp_frame(m, g(50002), srv(9), id, b"refused"));
    s.wait_ms(10);
    let id = s.ident();
    s.send(udp_frame(m, g(50003), srv(19), id, b"into the void"));
    // an empty datagram; a datagram to the network's broadcast address (not relayed)
    let id = s.ident();
    s.send(udp_frame(m, g(50004), srv(7), id, b""));
    let id = s.ident();
    s.send(udp_frame(
        m,
        g(50005),
        SocketAddrV4::new(Ipv4Addr::new(192, 168, 30, 255), 7),
        id,
        b"bcast",
    ));
}

fn icmp_scenario(s: &mut Session) {
    let m = guest_mac(7);
    for (i, dst) in [HOST_IP, SERVER_IP, HOST_IP, SERVER_IP]
        .into_iter()
        .enumerate()
    {
        let id = s.ident();
        let msg = icmp_echo(0x4242, i as u16 + 1, &[0xab; 56]);
        let ip = ipv4(GUEST_IP, dst, IpProtocol::Icmp, id, (0, false), &msg);
        s.send(ethernet(REPLAY_MAC, m, 0x0800, &ip));
        s.wait_ms(1000);
    }
    // a bad ICMP checksum, an echo reply (not answered), a ping to an address in the network
    let mut bad = icmp_echo(0x4242, 9, &[1; 8]);
    bad[2] ^= 0xff;
    let id = s.ident();
    s.send(ethernet(
        REPLAY_MAC,
        m,
        0x0800,
        &ipv4(GUEST_IP, HOST_IP, IpProtocol::Icmp, id, (0, false), &bad),
    ));
    let mut reply = icmp_echo(0x4242, 10, &[1; 8]);
    reply[0] = 0;
    reply[2..4].fill(0);
    let c = super::checksum(&reply);
    reply[2..4].copy_from_slice(&c.to_be_bytes());
    let id = s.ident();
    s.send(ethernet(
        REPLAY_MAC,
        m,
        0x0800,
        &ipv4(
            GUEST_IP,
            SERVER_IP,
            IpProtocol::Icmp,
            id,
            (0, false),
            &reply,
        ),
    ));
    let id = s.ident();
    let msg = icmp_echo(0x4242, 11, &[2; 8]);
    s.send(ethernet(
        REPLAY_MAC,
        m,
        0x0800,
        &ipv4(
            GUEST_IP,
            Ipv4Addr::new(192, 168, 30, 77),
            IpProtocol::Icmp,
            id,
            (0, false),
            &msg,
        ),
    ));
}

fn chunk(i: usize, n: usize) -> Vec<u8> {
    (0..n).map(|k| ((i * 7 + k) % 256) as u8).collect()
}

fn upload_scenario(s: &mut Session) {
    let mut c = GuestConn::new(guest_mac(8), g(41000), srv(5001), 1_000_000);
    c.connect(s);
    let base = c.seq;
    let mss = 1448usize;
    let seg = |i: usize| base.wrapping_add((i * mss) as u32);
    let data: Vec<Vec<u8>> = (0..10).map(|i| chunk(i, mss)).collect();
    // 0, 1 in order; 3 before 2 (reordered); 4 lost; 5, 6, 7 (dup ACKs); 4 retransmitted;
    // 8 twice (duplicate); 9 with PSH; FIN
    for i in [0, 1, 3, 2, 5, 6, 7] {
        s.wait_ms(1);
        c.send_at(s, seg(i), ACK, &data[i]);
    }
    s.wait_ms(30);
    c.send_at(s, seg(4), ACK, &data[4]);
    s.wait_ms(1);
    c.send_at(s, seg(8), ACK, &data[8]);
    c.send_at(s, seg(8), ACK, &data[8]);
    s.wait_ms(1);
    c.send_at(s, seg(9), ACK | PSH, &data[9]);
    c.seq = seg(10);
    // a segment partly overlapping what was received, then one far outside the window
    c.send_at(
        s,
        seg(9).wrapping_add(1000),
        ACK,
        &chunk(9, 448 + 100)[..548],
    );
    c.seq = seg(10).wrapping_add(100);
    c.send_at(s, seg(10).wrapping_add(5_000_000), ACK, b"far away");
    s.wait_ms(5);
    c.send(s, FIN | ACK, &[]);
    s.wait_ms(5);
    c.send(s, ACK, &[]);
}

fn download_scenario(s: &mut Session) {
    let mut c = GuestConn::new(guest_mac(9), g(41001), srv(80), 2_000_000);
    c.win = 256; // ×128 = 32 KiB: the core must respect it
    c.connect(s);
    s.wait_ms(1);
    c.send(s, ACK | PSH, b"GET / HTTP/1.1\r\nHost: server\r\n\r\n");
    // acknowledge in steps as data arrives, with one duplicate ACK, until the core's FIN
    for _ in 0..200 {
        if c.peer_fin {
            break;
        }
        s.wait_ms(2);
        c.send(s, ACK, &[]);
    }
    s.wait_ms(1);
    c.send(s, FIN | ACK, &[]);
}

fn refused_scenario(s: &mut Session) {
    let mut a = GuestConn::new(guest_mac(10), g(42000), srv(81), 3_000_000);
    a.connect(s);
    s.wait_ms(10);
    let mut b = GuestConn::new(guest_mac(10), g(42001), srv(82), 4_000_000);
    b.connect(s);
    // the guest retransmits its SYN while the connect hangs; the core's timeout ends it
    s.wait_ms(1000);
    b.seq = b.seq.wrapping_sub(1);
    b.connect(s);
    s.wait_ms(3000);
    // an ACK for no connection, a RST for no connection
    let mut stray = GuestConn::new(guest_mac(10), g(42002), srv(83), 5_000_000);
    stray.ack = 77;
    stray.send(s, ACK, &[]);
    stray.send(s, RST, &[]);
}

fn many_flows_scenario(s: &mut Session) {
    let m = guest_mac(11);
    let mut conns: Vec<GuestConn> = (0..24)
        .map(|i| {
            GuestConn::new(
                m,
                g(43000 + i),
                srv(7000 + i % 4),
                10_000_000 * (i as u32 + 1),
            )
        })
        .collect();
    for c in conns.iter_mut() {
        c.connect(s);
        s.wait_ms(1);
    }
    for round in 0..4 {
        for (i, c) in conns.iter_mut().enumerate() {
            let data = chunk(i + round, 100 + 37 * i);
            c.send(s, ACK | PSH, &data);
            let id = s.ident();
            s.send(udp_frame(m, g(44000 + i as u16), srv(7), id, &data[..20]));
            s.wait_ms(1);
        }
        // the guest acknowledges the echoes
        for c in conns.iter_mut() {
            c.send(s, ACK, &[]);
        }
    }
    for c in conns.iter_mut() {
        c.send(s, FIN | ACK, &[]);
        s.wait_ms(1);
        c.send(s, ACK, &[]);
    }
}

fn fragments_scenario(s: &mut Session) {
    let m = guest_mac(12);
    let payload = chunk(1, 3000);
    let d = udp(g(45000), srv(7), &payload);
    let frag = |s: &mut Session, id: u16, off: usize, len: usize, more: bool| {
        let part = &d[off..(off + len).min(d.len())];
        let ip = ipv4(
            GUEST_IP,
            SERVER_IP,
            IpProtocol::Udp,
            id,
            ((off / 8) as u16, more),
            part,
        );
        s.send(ethernet(REPLAY_MAC, m, 0x0800, &ip));
    };
    // in order
    frag(s, 100, 0, 1480, true);
    frag(s, 100, 1480, 1480, true);
    frag(s, 100, 2960, 48, false);
    s.wait_ms(10);
    // out of order
    frag(s, 101, 2960, 48, false);
    frag(s, 101, 1480, 1480, true);
    frag(s, 101, 0, 1480, true);
    s.wait_ms(10);
    // an exact duplicate (an overlap by RFC 5722's rule: the datagram is dropped)
    frag(s, 105, 0, 1480, true);
    frag(s, 105, 0, 1480, true);
    frag(s, 105, 1480, 1480, true);
    frag(s, 105, 2960, 48, false);
    s.wait_ms(10);
    // overlapping fragments
    frag(s, 102, 0, 1480, true);
    frag(s, 102, 1400, 1608, false);
    s.wait_ms(10);
    // an ICMP echo to the virtual host in two fragments
    let msg = icmp_echo(7, 1, &chunk(2, 2000));
    for (off, more) in [(0usize, true), (1480, false)] {
        let part = &msg[off..(off + 1480).min(msg.len())];
        let ip = ipv4(
            GUEST_IP,
            HOST_IP,
            IpProtocol::Icmp,
            103,
            ((off / 8) as u16, more),
            part,
        );
        s.send(ethernet(REPLAY_MAC, m, 0x0800, &ip));
    }
    // an incomplete datagram, left to time out (30 s)
    frag(s, 104, 0, 1480, true);
}

fn malformed_scenario(s: &mut Session) {
    let m = guest_mac(13);
    let good = udp_frame(m, g(46000), srv(7), 1, b"a good datagram");
    s.send(good.clone());
    let mut v = Vec::new();
    // truncated Ethernet header; truncated IPv4 header
    v.push(good[..10].to_vec());
    v.push(good[..14 + 12].to_vec());
    // IPv4 total length longer than the frame; shorter than the header
    let mut f = good.clone();
    f[16..18].copy_from_slice(&200u16.to_be_bytes());
    v.push(f);
    let mut f = good.clone();
    f[16..18].copy_from_slice(&10u16.to_be_bytes());
    v.push(f);
    // bad IPv4 checksum; header length 4 words; version 6 in an IPv4 ethertype
    let mut f = good.clone();
    f[24] ^= 0x55;
    v.push(f);
    let mut f = good.clone();
    f[14] = 0x44;
    v.push(f);
    let mut f = good.clone();
    f[14] = 0x65;
    v.push(f);
    // bad UDP checksum; UDP length past the IP payload; UDP length below 8
    let mut f = good.clone();
    f[14 + 20 + 6] ^= 0x0f;
    v.push(f);
    let mut f = good.clone();
    f[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&500u16.to_be_bytes());
    v.push(f);
    let mut f = good.clone();
    f[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&4u16.to_be_bytes());
    v.push(f);
    // TCP: bad checksum; data offset past the segment; a SYN whose MSS option runs past the header
    let c = GuestConn::new(m, g(46001), srv(80), 9);
    let mut f = c.build(s, SYN, &[]);
    let l = f.len();
    f[l - 1] ^= 1;
    v.push(f);
    let mut f = c.build(s, SYN, &[]);
    f[14 + 20 + 12] = 0xf0;
    v.push(f);
    let seg = tcp(g(46002), srv(80), SYN, 1, 0, 1000, &[2, 10, 5, 0xb4], &[]);
    let ip = ipv4(GUEST_IP, SERVER_IP, IpProtocol::Tcp, 3, (0, false), &seg);
    v.push(ethernet(REPLAY_MAC, m, 0x0800, &ip));
    // an IPv6 frame; an unknown ethertype; a frame from the host's own MAC; to another unicast MAC
    v.push(ethernet(REPLAY_MAC, m, 0x86dd, &[0x60; 40]));
    v.push(ethernet(REPLAY_MAC, m, 0x88b5, b"local experimental"));
    let mut f = good.clone();
    f[6..12].copy_from_slice(&REPLAY_MAC.0);
    v.push(f);
    let mut f = good.clone();
    f[0..6].copy_from_slice(&[0x02, 9, 9, 9, 9, 9]);
    v.push(f);
    // an unknown IP protocol; a good frame with Ethernet padding (must be answered)
    let ip = ipv4(
        GUEST_IP,
        SERVER_IP,
        IpProtocol::Unknown(253),
        4,
        (0, false),
        b"experimental",
    );
    v.push(ethernet(REPLAY_MAC, m, 0x0800, &ip));
    let mut f = udp_frame(m, g(46003), srv(7), 5, b"pad");
    f.resize(60, 0);
    v.push(f);
    for f in v {
        s.wait_ms(1);
        s.send(f);
    }
}

fn ndp_scenario(s: &mut Session) {
    use hubnat_core::wire::link_local;
    let (m, other) = (guest_mac(14), guest_mac(15));
    let ll = link_local(m);
    let prefix = u128::from(hubnat_core::config::DEFAULT_IPV6_PREFIX);
    let host_ula = Ipv6Addr::from(prefix | 1);
    // The guest's SLAAC address: the prefix and the interface id of its link-local.
    let ula = Ipv6Addr::from(prefix | (u128::from(ll) & u128::from(u64::MAX)));
    let host_ll = link_local(REPLAY_MAC);
    let any = Ipv6Addr::UNSPECIFIED;
    let all_nodes: Ipv6Addr = "ff02::1".parse().unwrap();
    let all_routers: Ipv6Addr = "ff02::2".parse().unwrap();
    let sll = Some((1, m));
    let v6 = |dst: Ipv6Addr, src: Ipv6Addr, hop: u8, msg: &[u8]| {
        let dst_mac = if dst.is_multicast() {
            mcast_mac(dst)
        } else {
            REPLAY_MAC
        };
        icmpv6_frame(dst_mac, m, src, dst, hop, msg)
    };
    let mut frames = vec![
        // duplicate address detection of the guest's link-local (no answer, nothing learned)
        v6(solicited(ll), any, 255, &nd(135, 0, ll, None)),
        // router solicitation from the link-local → advertisement to it
        v6(
            all_routers,
            ll,
            255,
            &[&[133u8, 0, 0, 0, 0, 0, 0, 0][..], &[1, 1], &m.0].concat(),
        ),
        // DAD of the SLAAC address, then a solicitation from :: → advertisement to all nodes
        v6(solicited(ula), any, 255, &nd(135, 0, ula, None)),
        v6(all_routers, any, 255, &[133, 0, 0, 0, 0, 0, 0, 0]),
        // neighbour solicitations for the host's ULA (multicast) and link-local (unicast)
        v6(solicited(host_ula), ula, 255, &nd(135, 0, host_ula, sll)),
        v6(host_ll, ll, 255, &nd(135, 0, host_ll, sll)),
        // a guest probing the host's address: defended to all nodes
        v6(solicited(host_ula), any, 255, &nd(135, 0, host_ula, None)),
        // echo to the host's ULA (answered), to all nodes (not)
        v6(
            host_ula,
            ula,
            64,
            &[128, 0, 0, 0, 0, 7, 0, 1, b'p', b'i', b'n', b'g'],
        ),
        v6(all_nodes, ll, 64, &[128, 0, 0, 0, 0, 7, 0, 2]),
        // malformed: hop limit 254; an option of length 0
        v6(solicited(host_ula), ula, 254, &nd(135, 0, host_ula, sll)),
        v6(
            solicited(host_ula),
            ula,
            255,
            &[&nd(135, 0, host_ula, None)[..], &[1, 0, 0, 0, 0, 0, 0, 0]].concat(),
        ),
        // an MLDv2 report (not the host's business)
        v6(
            "ff02::16".parse().unwrap(),
            ll,
            1,
            &[143, 0, 0, 0, 0, 0, 0, 0],
        ),
    ];
    // Another guest: an advertisement for the host's address, and the first guest's source.
    let ll2 = link_local(other);
    frames.push(icmpv6_frame(
        mcast_mac(all_nodes),
        other,
        ll2,
        all_nodes,
        255,
        &nd(136, 0x20, host_ula, Some((2, other))),
    ));
    frames.push(icmpv6_frame(
        REPLAY_MAC,
        other,
        ula,
        host_ula,
        64,
        &[128, 0, 0, 0, 0, 8, 0, 1],
    ));
    for f in frames {
        s.wait_ms(10);
        s.send(f);
    }
    // The first unsolicited advertisement comes 16 s after start.
    s.wait_ms(17_000);
    s.send(v6(host_ula, ula, 64, &[128, 0, 0, 0, 0, 7, 0, 3]));
}

// ---- IPv6 guests ----------------------------------------------------------------------------

/// The remote IPv6 host of the crafted scenarios (a documentation address, RFC 3849).
pub const SERVER_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 5);

/// The virtual host's address in the default prefix.
pub fn host_ip6() -> Ipv6Addr {
    Ipv6Addr::from(u128::from(hubnat_core::config::DEFAULT_IPV6_PREFIX) | 1)
}

/// A crafted IPv6 guest: its MAC, its link-local address and its SLAAC address in the default
/// prefix (the interface id of its link-local).
#[derive(Clone, Copy)]
pub struct Guest6 {
    pub mac: Mac,
    pub ll: Ipv6Addr,
    pub ula: Ipv6Addr,
}

impl Guest6 {
    pub fn new(mac: Mac) -> Guest6 {
        let ll = hubnat_core::wire::link_local(mac);
        let prefix = u128::from(hubnat_core::config::DEFAULT_IPV6_PREFIX);
        let ula = Ipv6Addr::from(prefix | (u128::from(ll) & u128::from(u64::MAX)));
        Guest6 { mac, ll, ula }
    }

    /// What a guest does first on the link: a router solicitation from its link-local, then a
    /// neighbour solicitation for the virtual host's address from its SLAAC address. Both
    /// teach the virtual host's neighbour cache where the guest is.
    pub fn join(&self, s: &mut Session) {
        let all_routers: Ipv6Addr = "ff02::2".parse().unwrap();
        let rs = [&[133u8, 0, 0, 0, 0, 0, 0, 0][..], &[1, 1], &self.mac.0].concat();
        s.send(icmpv6_frame(
            mcast_mac(all_routers),
            self.mac,
            self.ll,
            all_routers,
            255,
            &rs,
        ));
        s.wait_ms(10);
        let host = host_ip6();
        s.send(icmpv6_frame(
            mcast_mac(solicited(host)),
            self.mac,
            self.ula,
            solicited(host),
            255,
            &nd(135, 0, host, Some((1, self.mac))),
        ));
        s.wait_ms(10);
    }

    pub fn at(&self, port: u16) -> SocketAddrV6 {
        SocketAddrV6::new(self.ula, port, 0, 0)
    }
}

fn srv6(port: u16) -> SocketAddrV6 {
    SocketAddrV6::new(SERVER_IP6, port, 0, 0)
}

/// A DHCPv6 option.
fn opt6(code: u16, data: &[u8]) -> Vec<u8> {
    let mut v = code.to_be_bytes().to_vec();
    v.extend_from_slice(&(data.len() as u16).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// A DHCPv6 client message: type, 24-bit transaction id, options.
fn dhcp6(kind: u8, xid: u32, opts: &[Vec<u8>]) -> Vec<u8> {
    let mut m = vec![kind];
    m.extend_from_slice(&xid.to_be_bytes()[1..]);
    for o in opts {
        m.extend_from_slice(o);
    }
    m
}

/// An IA_NA option (T1 and T2 left to the server) with an IA Address option when `addr`.
fn ia_na(iaid: u32, addr: Option<Ipv6Addr>) -> Vec<u8> {
    let mut v = iaid.to_be_bytes().to_vec();
    v.extend_from_slice(&[0; 8]);
    if let Some(a) = addr {
        let mut ia = a.octets().to_vec();
        ia.extend_from_slice(&[0; 8]);
        v.extend(opt6(5, &ia));
    }
    opt6(3, &v)
}

/// The DUID-LL of `mac` (RFC 8415 11.4), the crafted clients' and the server's.
fn duid_ll(mac: Mac) -> Vec<u8> {
    [&[0u8, 3, 0, 1][..], &mac.0].concat()
}

/// A DHCPv6 message from `g`'s link-local (port 546) to `dst` port 547: to
/// All_DHCP_Relay_Agents_and_Servers in a multicast frame, or to an address of the host.
fn dhcp6_frame(g: &Guest6, dst: Ipv6Addr, msg: &[u8]) -> Vec<u8> {
    let src = SocketAddrV6::new(g.ll, 546, 0, 0);
    let d = udp(src, SocketAddrV6::new(dst, 547, 0, 0), msg);
    let dst_mac = if dst.is_multicast() {
        mcast_mac(dst)
    } else {
        REPLAY_MAC
    };
    ethernet(dst_mac, g.mac, 0x86dd, &ipv6(g.ll, dst, 17, 1, &d))
}

/// The DHCPv6 server's answer in `out`: its message type and the first address of its IAs.
fn dhcp6_answer(out: &[Frame]) -> Option<(u8, Option<Ipv6Addr>)> {
    out.iter().find_map(|f| {
        let eth = EthernetFrame::new_checked(&f.data[..]).ok()?;
        let ip = Ipv6Packet::new_checked(eth.payload()).ok()?;
        if ip.next_header() != IpProtocol::Udp {
            return None;
        }
        let u = UdpPacket::new_checked(ip.payload()).ok()?;
        if u.src_port() != 547 {
            return None;
        }
        let p = u.payload();
        let mut addr = None;
        let mut i = 4;
        while i + 4 <= p.len() {
            let code = u16::from_be_bytes([p[i], p[i + 1]]);
            let len = usize::from(u16::from_be_bytes([p[i + 2], p[i + 3]]));
            let body = p.get(i + 4..i + 4 + len)?;
            // An IA_NA's first option, when it is an IA Address.
            if code == 3 && addr.is_none() && body.len() >= 12 + 4 + 16 && body[12..14] == [0, 5] {
                addr = <[u8; 16]>::try_from(&body[16..32]).ok().map(Ipv6Addr::from);
            }
            i += 4 + len;
        }
        Some((*p.first()?, addr))
    })
}

fn dhcpv6_scenario(s: &mut Session) {
    let g = Guest6::new(guest_mac(16));
    let agents: Ipv6Addr = "ff02::1:2".parse().unwrap();
    let cid = opt6(1, &duid_ll(g.mac));
    let sid = opt6(2, &duid_ll(REPLAY_MAC));
    let oro = opt6(6, &[0, 23, 0, 24]);
    let elapsed = opt6(8, &[0, 0]);
    let send = |s: &mut Session, dst: Ipv6Addr, msg: Vec<u8>| {
        let out = s.send(dhcp6_frame(&g, dst, &msg));
        s.wait_ms(10);
        out
    };
    g.join(s);
    // stateless: Information-request → Reply (DNS servers, search list, refresh time)
    send(
        s,
        agents,
        dhcp6(11, 0x00_0001, &[cid.clone(), oro.clone(), elapsed.clone()]),
    );
    // Solicit → Advertise of an address; Request of it → Reply (the lease made)
    let out = send(
        s,
        agents,
        dhcp6(
            1,
            0x00_0002,
            &[cid.clone(), ia_na(1, None), oro.clone(), elapsed.clone()],
        ),
    );
    let offered = dhcp6_answer(&out)
        .and_then(|a| a.1)
        .unwrap_or(Ipv6Addr::from(u128::from(host_ip6()) + 0xfff));
    send(
        s,
        agents,
        dhcp6(
            3,
            0x00_0003,
            &[
                cid.clone(),
                sid.clone(),
                ia_na(1, Some(offered)),
                oro.clone(),
            ],
        ),
    );
    // Renew (to the server), Rebind (to any server), Confirm: each extends or confirms it
    s.wait_ms(20_000);
    send(
        s,
        agents,
        dhcp6(
            5,
            0x00_0004,
            &[cid.clone(), sid.clone(), ia_na(1, Some(offered))],
        ),
    );
    send(
        s,
        agents,
        dhcp6(6, 0x00_0005, &[cid.clone(), ia_na(1, Some(offered))]),
    );
    send(
        s,
        agents,
        dhcp6(4, 0x00_0006, &[cid.clone(), ia_na(1, Some(offered))]),
    );
    // Release → Reply (success); a Renew after it → NoBinding
    send(
        s,
        agents,
        dhcp6(
            8,
            0x00_0007,
            &[cid.clone(), sid.clone(), ia_na(1, Some(offered))],
        ),
    );
    send(
        s,
        agents,
        dhcp6(
            5,
            0x00_0008,
            &[cid.clone(), sid.clone(), ia_na(1, Some(offered))],
        ),
    );
    // malformed or not ours, none answered: an option whose length runs past the message; a
    // Request for another server; an Information-request carrying an IA; a Solicit without a
    // client id; a Solicit sent unicast to the host
    let mut cut = dhcp6(1, 0x00_0009, &[cid.clone(), ia_na(2, None)]);
    let at = cut.len() - 14;
    cut[at..at + 2].copy_from_slice(&200u16.to_be_bytes());
    send(s, agents, cut);
    let other = opt6(2, &duid_ll(guest_mac(99)));
    send(
        s,
        agents,
        dhcp6(3, 0x00_000a, &[cid.clone(), other, ia_na(1, None)]),
    );
    send(
        s,
        agents,
        dhcp6(11, 0x00_000b, &[cid.clone(), ia_na(1, None)]),
    );
    send(s, agents, dhcp6(1, 0x00_000c, &[ia_na(1, None)]));
    send(
        s,
        host_ip6(),
        dhcp6(1, 0x00_000d, &[cid.clone(), ia_na(1, None)]),
    );
    // a second client: Solicit with Rapid Commit → Reply at once; then it declines the address
    let g2 = Guest6::new(guest_mac(17));
    let cid2 = opt6(1, &duid_ll(g2.mac));
    let out = s.send(dhcp6_frame(
        &g2,
        agents,
        &dhcp6(
            1,
            0x00_0101,
            &[cid2.clone(), ia_na(7, None), opt6(14, &[]), elapsed],
        ),
    ));
    let leased = dhcp6_answer(&out).and_then(|a| a.1);
    s.wait_ms(10);
    s.send(dhcp6_frame(
        &g2,
        agents,
        &dhcp6(9, 0x00_0102, &[cid2, sid, ia_na(7, leased)]),
    ));
}

fn tcp6_scenario(s: &mut Session) {
    let g = Guest6::new(guest_mac(18));
    g.join(s);
    // a download: the request, the answer cut to the IPv6 MSS, FIN from the server first
    let mut c = GuestConn::new(g.mac, g.at(41000), srv6(80), 6_000_000);
    c.connect(s);
    s.wait_ms(1);
    c.send(
        s,
        ACK | PSH,
        b"GET / HTTP/1.1\r\nHost: [2001:db8::5]\r\n\r\n",
    );
    for _ in 0..50 {
        if c.peer_fin {
            break;
        }
        s.wait_ms(2);
        c.send(s, ACK, &[]);
    }
    s.wait_ms(1);
    c.send(s, FIN | ACK, &[]);
    // an echo: the guest closes first, the server after it
    let mut e = GuestConn::new(g.mac, g.at(41001), srv6(7), 7_000_000);
    e.connect(s);
    s.wait_ms(1);
    e.send(s, ACK | PSH, b"hello over IPv6");
    s.wait_ms(1);
    e.send(s, ACK, &[]);
    e.send(s, FIN | ACK, &[]);
    s.wait_ms(1);
    e.send(s, ACK, &[]);
    // a refused connect → RST
    let mut r = GuestConn::new(g.mac, g.at(41002), srv6(81), 8_000_000);
    r.connect(s);
}

fn udp6_scenario(s: &mut Session) {
    let g = Guest6::new(guest_mac(19));
    g.join(s);
    for i in 0..3u16 {
        s.send(udp6_frame(
            g.mac,
            g.at(50000),
            srv6(7),
            format!("echo datagram {i}").as_bytes(),
        ));
        s.wait_ms(10);
    }
    // the largest datagram a 1500-byte link carries whole (40 + 8 + 1452), and its echo
    s.send(udp6_frame(g.mac, g.at(50001), srv6(7), &chunk(3, 1452)));
    s.wait_ms(10);
    // a 3000-byte datagram in fragments, in order then out of order: reassembled, sent, and
    // its echo comes back in fragments
    let d = udp(g.at(50002), srv6(7), &chunk(4, 3000));
    let frag = |s: &mut Session, ident: u32, off: usize, len: usize, more: bool| {
        let part = &d[off..(off + len).min(d.len())];
        let ip = ipv6_fragment(g.ula, SERVER_IP6, 17, ident, off, more, part);
        s.send(ethernet(REPLAY_MAC, g.mac, 0x86dd, &ip));
    };
    frag(s, 0x100, 0, 1448, true);
    frag(s, 0x100, 1448, 1448, true);
    frag(s, 0x100, 2896, 112, false);
    s.wait_ms(10);
    frag(s, 0x101, 2896, 112, false);
    frag(s, 0x101, 0, 1448, true);
    frag(s, 0x101, 1448, 1448, true);
    s.wait_ms(10);
    // overlapping fragments: the datagram is dropped (RFC 5722)
    frag(s, 0x102, 0, 1448, true);
    frag(s, 0x102, 1400, 1608, false);
    s.wait_ms(10);
    // a refusing port → ICMPv6 port unreachable
    s.send(udp6_frame(g.mac, g.at(50003), srv6(9), b"refused"));
    s.wait_ms(10);
    // DNS to the virtual host's addresses, relayed to the upstream: A, AAAA, NXDOMAIN, and
    // AAAA to its link-local from the guest's
    let dns = SocketAddrV6::new(host_ip6(), 53, 0, 0);
    for (id, name, ty) in [
        (0x0601, "www.example.test", 1),
        (0x0602, "www.example.test", 28),
        (0x0603, "nowhere.example.test", 28),
    ] {
        s.send(udp6_frame(
            g.mac,
            g.at(40600),
            dns,
            &dns_query(id, name, ty),
        ));
        s.wait_ms(5);
    }
    let host_ll = hubnat_core::wire::link_local(REPLAY_MAC);
    s.send(udp6_frame(
        g.mac,
        SocketAddrV6::new(g.ll, 40601, 0, 0),
        SocketAddrV6::new(host_ll, 53, 0, 0),
        &dns_query(0x0604, "www.example.test", 28),
    ));
}

// ---- offloads -------------------------------------------------------------------------------

/// A download the guest takes in super-frames (the core's marks kept in `tso.out.gso`), cut
/// as its device would cut them (`Session::send`), acknowledging each batch with one ACK (as a
/// guest whose device coalesces does); with `lose`, one segment never reaches it.
/// `lose`: the offset in the stream of the segment the guest loses.
fn tso_download(s: &mut Session, c: &mut GuestConn, lose: Option<u32>) {
    let out = c.connect(s);
    // The stream starts after the SYN-ACK's sequence number (the first data may have come
    // with the handshake already).
    let start = out
        .iter()
        .filter_map(|f| parse_tcp(&f.data))
        .find(|g| g.flags & SYN != 0)
        .map_or(c.ack, |g| g.seq.wrapping_add(1));
    c.lose = lose.map(|k| start.wrapping_add(k));
    s.wait_ms(1);
    c.send(s, ACK | PSH, b"GET / HTTP/1.1\r\nHost: server\r\n\r\n");
    for _ in 0..200 {
        if c.peer_fin {
            break;
        }
        s.wait_ms(2);
        c.send(s, ACK, &[]);
        // A guest holding data beyond a hole acknowledges at once, once per segment it got
        // out of order (as Linux does): two more duplicate ACKs, with SACK.
        for _ in 0..2 {
            if c.ooo.is_empty() {
                break;
            }
            c.send(s, ACK, &[]);
        }
    }
    s.wait_ms(1);
    c.send(s, FIN | ACK, &[]);
}

/// Datagrams the destination answers five times at once (`burst:5`): five answers of one size
/// waiting on the socket reach the guest as one UDP super-frame of five datagrams (marked in
/// `uso.out.gso`), the largest that fits the MTU whole included.
fn uso_scenario(s: &mut Session) {
    let m = guest_mac(21);
    for (port, len) in [(42000, 100usize), (42001, 1472), (42000, 7)] {
        let id = s.ident();
        s.send(udp_frame(m, g(port), srv(7), id, &chunk(len, len)));
        s.wait_ms(5);
    }
}

fn tso_scenario(s: &mut Session) {
    let m = guest_mac(20);
    // a download of 200000 bytes in super-frames; the guest's window (×128 = 256 KiB) leaves
    // room for 64 KiB frames
    let mut c = GuestConn::new(m, g(41100), srv(80), 11_000_000);
    c.win = 2048;
    tso_download(s, &mut c, Some(15 * 1448));
    // an upload: the guest's own super-segments (32 KiB, then 5 segments and a bit in one
    // frame), their checksums valid as the runtime leaves them after completing them
    let mut u = GuestConn::new(m, g(41101), srv(5001), 12_000_000);
    u.connect(s);
    s.wait_ms(1);
    u.send(s, ACK | PSH, &chunk(20, 32 * 1024));
    s.wait_ms(1);
    u.send(s, ACK | PSH, &chunk(21, 5 * 1448 + 100));
    s.wait_ms(1);
    u.send(s, FIN | ACK, &[]);
    s.wait_ms(1);
    u.send(s, ACK, &[]);
    // a small MSS (536, 524 with timestamps): 20000 bytes in super-frames cut that small
    let mut small = GuestConn::new(m, g(41102), srv(81), 13_000_000);
    small.mss = Some(536);
    small.win = 2048;
    tso_download(s, &mut small, None);
}
