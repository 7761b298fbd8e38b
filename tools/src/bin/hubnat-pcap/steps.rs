//! Where a connect-exchange-close cycle's time goes: from a capture on the client's side of a
//! NAT (the guest's TAP) and one on the server's (its link), both with the kernel's time stamps
//! of one clock, each cycle is cut into the steps between the packets both sides saw. Steps
//! that start on one side and end on the other are the NAT's; the others are the client's and
//! the server's own (its kernel and its program).
//!
//! A cycle is what `hubnat-load crr` does: connect, a request, the answer, close, one
//! connection at a time. The NAT changes the client's port, so a client connection is paired
//! with the first server connection whose SYN follows its own and precedes the next one's.

use std::fmt::Write as _;
use std::time::Duration;

use hubnat_replay::pcap::Frame;
use smoltcp::wire::{
    EthernetFrame, EthernetProtocol, IpProtocol, Ipv4Packet, Ipv6Packet, TcpPacket,
};

/// The packets of one connection a capture saw (first of each kind).
#[derive(Default, Clone, Debug)]
struct Conn {
    syn: Option<Duration>,
    syn_ack: Option<Duration>,
    request: Option<Duration>,
    answer: Option<Duration>,
    client_fin: Option<Duration>,
}

/// A TCP segment's fields the steps need.
struct Seg {
    ts: Duration,
    src_port: u16,
    dst_port: u16,
    syn: bool,
    ack: bool,
    fin: bool,
    payload: usize,
}

fn segment(f: &Frame) -> Option<Seg> {
    let eth = EthernetFrame::new_checked(&f.data[..]).ok()?;
    let (proto, l4) = match eth.ethertype() {
        EthernetProtocol::Ipv4 => {
            let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
            let hl = usize::from(ip.header_len());
            let end = usize::from(ip.total_len()).min(eth.payload().len());
            (ip.next_header(), eth.payload().get(hl..end)?)
        }
        EthernetProtocol::Ipv6 => {
            let ip = Ipv6Packet::new_checked(eth.payload()).ok()?;
            (ip.next_header(), ip.payload())
        }
        _ => return None,
    };
    if proto != IpProtocol::Tcp {
        return None;
    }
    let tcp = TcpPacket::new_checked(l4).ok()?;
    Some(Seg {
        ts: f.ts,
        src_port: tcp.src_port(),
        dst_port: tcp.dst_port(),
        syn: tcp.syn(),
        ack: tcp.ack(),
        fin: tcp.fin(),
        payload: l4.len().saturating_sub(usize::from(tcp.header_len())),
    })
}

/// The connections to `port` in one capture, in the order of their SYNs.
fn connections(frames: &[Frame], port: u16) -> Vec<Conn> {
    let mut by_client: std::collections::HashMap<u16, usize> = Default::default();
    let mut conns: Vec<Conn> = Vec::new();
    for s in frames.iter().filter_map(segment) {
        let to_server = s.dst_port == port;
        if !to_server && s.src_port != port {
            continue;
        }
        let client = if to_server { s.src_port } else { s.dst_port };
        if to_server && s.syn && !s.ack {
            // A port used again starts a new connection.
            by_client.insert(client, conns.len());
            conns.push(Conn {
                syn: Some(s.ts),
                ..Conn::default()
            });
            continue;
        }
        let Some(c) = by_client.get(&client).map(|&i| &mut conns[i]) else {
            continue;
        };
        let slot = match (to_server, s.syn, s.fin, s.payload > 0) {
            (false, true, _, _) => &mut c.syn_ack,
            (true, false, _, true) => &mut c.request,
            (false, false, _, true) => &mut c.answer,
            (true, false, true, false) => &mut c.client_fin,
            _ => continue,
        };
        slot.get_or_insert(s.ts);
    }
    conns
}

/// Each client connection with the server connection the NAT made for it, and the client's
/// next connection.
fn pair<'a>(client: &'a [Conn], server: &'a [Conn]) -> Vec<(&'a Conn, &'a Conn, Option<&'a Conn>)> {
    let mut out = Vec::new();
    let mut j = 0;
    for (i, c) in client.iter().enumerate() {
        let (Some(start), next) = (c.syn, client.get(i + 1)) else {
            continue;
        };
        let end = next.and_then(|n| n.syn);
        while j < server.len() && server[j].syn.is_some_and(|t| t < start) {
            j += 1;
        }
        if let Some(s) = server.get(j) {
            if s.syn.is_some_and(|t| end.is_none_or(|e| t < e)) {
                out.push((c, s, next));
                j += 1;
            }
        }
    }
    out
}

/// One step: its name, whose time it is, and the time from the first packet to the second.
type Step = (
    &'static str,
    &'static str,
    fn(&Conn, &Conn, Option<&Conn>) -> Option<(Duration, Duration)>,
);

const STEPS: [Step; 11] = [
    ("client SYN → server SYN", "NAT", |c, s, _| {
        Some((c.syn?, s.syn?))
    }),
    (
        "server SYN → its SYN-ACK",
        "server's kernel",
        |_, s, _| Some((s.syn?, s.syn_ack?)),
    ),
    ("server SYN-ACK → client SYN-ACK", "NAT", |c, s, _| {
        Some((s.syn_ack?, c.syn_ack?))
    }),
    ("client SYN-ACK → its request", "client", |c, _, _| {
        Some((c.syn_ack?, c.request?))
    }),
    ("client request → server request", "NAT", |c, s, _| {
        Some((c.request?, s.request?))
    }),
    ("server request → its answer", "server", |_, s, _| {
        Some((s.request?, s.answer?))
    }),
    ("server answer → client answer", "NAT", |c, s, _| {
        Some((s.answer?, c.answer?))
    }),
    ("client answer → its FIN", "client", |c, _, _| {
        Some((c.answer?, c.client_fin?))
    }),
    ("client FIN → server FIN", "NAT", |c, s, _| {
        Some((c.client_fin?, s.client_fin?))
    }),
    ("client FIN → its next SYN", "client", |c, _, n| {
        Some((c.client_fin?, n?.syn?))
    }),
    ("cycle (SYN → next SYN)", "all", |c, _, n| {
        Some((c.syn?, n?.syn?))
    }),
];

/// The quantile `q` of sorted `v`.
fn quantile(v: &[f64], q: f64) -> f64 {
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// The steps' table (Markdown): median and 90th percentile in µs, and how many cycles had
/// both packets of the step; `None` when no connection could be paired.
pub fn table(client: &[Frame], server: &[Frame], port: u16) -> Option<String> {
    let (c, s) = (connections(client, port), connections(server, port));
    let pairs = pair(&c, &s);
    if pairs.is_empty() {
        return None;
    }
    let mut out = format!(
        "{} client connections, {} server connections, {} paired\n\n\
         | step | whose | median (µs) | p90 (µs) | cycles |\n| --- | --- | ---: | ---: | ---: |\n",
        c.len(),
        s.len(),
        pairs.len()
    );
    for (name, whose, f) in STEPS {
        let mut v: Vec<f64> = (pairs.iter())
            .filter_map(|&(c, s, n)| f(c, s, n))
            .filter(|(a, b)| b >= a)
            .map(|(a, b)| (b - a).as_secs_f64() * 1e6)
            .collect();
        if v.is_empty() {
            continue;
        }
        v.sort_by(f64::total_cmp);
        let (m, p90) = (quantile(&v, 0.5), quantile(&v, 0.9));
        let _ = writeln!(
            out,
            "| {name} | {whose} | {m:.1} | {p90:.1} | {} |",
            v.len()
        );
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PORT: u16 = 7000;

    /// A frame of one TCP segment from port `src` to port `dst` with the flags given (S, A, F)
    /// and `len` payload bytes.
    fn tcp(src: u16, dst: u16, flags: &str, len: usize) -> Vec<u8> {
        let mut seg = vec![0u8; 20 + len];
        let mut t = TcpPacket::new_unchecked(&mut seg[..]);
        t.set_src_port(src);
        t.set_dst_port(dst);
        t.set_header_len(20);
        t.set_syn(flags.contains('S'));
        t.set_ack(flags.contains('A'));
        t.set_fin(flags.contains('F'));
        // Ethernet (addresses left zero), then IPv4 without options.
        let mut f = vec![0u8; 14 + 20];
        f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        let mut ip = Ipv4Packet::new_unchecked(&mut f[14..]);
        ip.set_version(4);
        ip.set_header_len(20);
        ip.set_total_len((20 + seg.len()) as u16);
        ip.set_hop_limit(64);
        ip.set_next_header(IpProtocol::Tcp);
        f.extend_from_slice(&seg);
        f
    }

    /// One cycle from `client_port` to PORT, its packets at `t0` plus the offsets given (SYN,
    /// SYN-ACK, request, answer, client FIN), with the ACKs that carry nothing in between.
    fn cycle(client_port: u16, t0: u64, offsets: [u64; 5]) -> Vec<Frame> {
        let (c, s) = (client_port, PORT);
        let at = |o: u64, data| Frame {
            ts: Duration::from_micros(t0 + o),
            data,
        };
        vec![
            at(offsets[0], tcp(c, s, "S", 0)),
            at(offsets[1], tcp(s, c, "SA", 0)),
            at(offsets[1] + 1, tcp(c, s, "A", 0)),
            at(offsets[2], tcp(c, s, "A", 1)),
            at(offsets[3], tcp(s, c, "A", 1)),
            at(offsets[4], tcp(c, s, "FA", 0)),
        ]
    }

    #[test]
    fn cycles_are_cut_into_steps_and_paired_across_the_nat() {
        // The client's side, and the server's, where the NAT's ports differ.
        let mut client = cycle(40000, 0, [0, 60, 80, 200, 220]);
        client.extend(cycle(40001, 240, [0, 60, 80, 200, 220]));
        let mut server = cycle(50000, 0, [20, 25, 100, 130, 230]);
        server.extend(cycle(50001, 240, [20, 25, 100, 130, 230]));
        let t = table(&client, &server, PORT).unwrap();
        assert!(
            t.starts_with("2 client connections, 2 server connections, 2 paired"),
            "{t}"
        );
        let row = |name: &str| {
            t.lines()
                .find(|l| l.starts_with(&format!("| {name} |")))
                .unwrap_or_else(|| panic!("no row {name}: {t}"))
                .to_owned()
        };
        assert!(
            row("client SYN → server SYN").contains("| NAT | 20.0 |"),
            "{t}"
        );
        assert!(
            row("server SYN-ACK → client SYN-ACK").contains("| 35.0 |"),
            "{t}"
        );
        assert!(
            row("server request → its answer").contains("| 30.0 |"),
            "{t}"
        );
        assert!(
            row("server answer → client answer").contains("| 70.0 |"),
            "{t}"
        );
        assert!(row("client FIN → server FIN").contains("| 10.0 |"), "{t}");
        // The last cycle has no next one: one sample only.
        assert!(
            row("cycle (SYN → next SYN)").ends_with("| 240.0 | 240.0 | 1 |"),
            "{t}"
        );
        // Nothing to pair: no table.
        assert!(table(&client, &[], PORT).is_none());
    }
}
