//! The driver's own scripts: crafted frames in, the host side's reactions and frames out.

use std::net::SocketAddrV4;

use super::craft::{self, GuestConn, Session, ACK, FIN, PSH};
use super::*;

fn srv(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(craft::SERVER_IP, port)
}

fn guest(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(craft::GUEST_IP, port)
}

#[test]
fn echo_reply_and_non_requests() {
    let req = craft::icmp_echo(1, 2, b"abc");
    let rep = echo_reply(&req).unwrap();
    assert_eq!(rep[0], 0);
    assert_eq!(checksum(&rep), 0);
    assert_eq!(&rep[4..], &req[4..]);
    assert!(echo_reply(&rep).is_none());
    assert!(echo_reply(&req[..7]).is_none());
}

#[test]
fn dns_answers_from_the_table() {
    let s = Script::parse("[host]\ndns = { \"a.test\" = \"10.0.0.1\" }\n").unwrap();
    let a = dns_answer(&s, &craft::dns_query(7, "A.Test", 1)).unwrap();
    assert_eq!(&a[0..2], &7u16.to_be_bytes());
    assert_eq!(a[3] & 0x0f, 0);
    assert_eq!(a[7], 1);
    assert_eq!(&a[a.len() - 4..], &[10, 0, 0, 1]);
    let aaaa = dns_answer(&s, &craft::dns_query(8, "a.test", 28)).unwrap();
    assert_eq!((aaaa[3] & 0x0f, aaaa[7]), (0, 0));
    let nx = dns_answer(&s, &craft::dns_query(9, "b.test", 1)).unwrap();
    assert_eq!(nx[3] & 0x0f, 3);
    let mut resp = craft::dns_query(10, "a.test", 1);
    resp[2] |= 0x80;
    assert!(dns_answer(&s, &resp).is_none());
    assert!(dns_answer(&s, &[0; 11]).is_none());
    let q = craft::dns_query(11, "a.test", 1);
    assert!(dns_answer(&s, &q[..q.len() - 2]).is_none());
}

#[test]
fn dns_answers_aaaa_from_the_ipv6_addresses() {
    let s =
        Script::parse("[host]\ndns = { \"a.test\" = [\"10.0.0.1\", \"2001:db8::1\"] }\n").unwrap();
    let aaaa = dns_answer(&s, &craft::dns_query(8, "a.test", 28)).unwrap();
    assert_eq!((aaaa[3] & 0x0f, aaaa[7]), (0, 1));
    let rr = &aaaa[aaaa.len() - 28..];
    assert_eq!(&rr[..4], &[0xc0, 0x0c, 0, 28]);
    assert_eq!(&rr[10..12], &[0, 16]);
    assert_eq!(
        &rr[12..],
        &"2001:db8::1"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets()
    );
    let a = dns_answer(&s, &craft::dns_query(9, "a.test", 1)).unwrap();
    assert_eq!((a[7], &a[a.len() - 4..]), (1, &[10, 0, 0, 1][..]));
}

#[test]
fn an_ipv6_connection_is_crafted_and_answered() {
    let mut s = Session::new(&Script::default());
    let g = craft::Guest6::new(craft::guest_mac(1));
    g.join(&mut s);
    let dst = std::net::SocketAddrV6::new(craft::SERVER_IP6, 7, 0, 0);
    let mut c = GuestConn::new(g.mac, g.at(1000), dst, 100);
    let out = c.connect(&mut s);
    let synack = out
        .iter()
        .filter_map(|f| craft::parse_tcp(&f.data))
        .find(|t| t.flags & craft::SYN != 0)
        .expect("a SYN-ACK over IPv6");
    assert_eq!((synack.src, synack.dst), (c.dst, c.src));
    let out = c.send(&mut s, ACK | PSH, b"hello");
    assert!(out
        .iter()
        .filter_map(|f| craft::parse_tcp(&f.data))
        .any(|t| t.len == 5));
    c.send(&mut s, FIN | ACK, &[]);
    assert!(c.peer_fin);
}

#[test]
fn echo_destination_returns_the_bytes_and_closes_after_the_guest() {
    let mut s = Session::new(&Script::default());
    let mut c = GuestConn::new(craft::guest_mac(1), guest(1000), srv(7), 100);
    c.connect(&mut s);
    let out = c.send(&mut s, ACK | PSH, b"hello");
    let data: Vec<_> = out
        .iter()
        .filter_map(|f| craft::parse_tcp(&f.data))
        .filter(|g| g.len == 5)
        .collect();
    assert_eq!(data.len(), 1, "the echo comes back in one segment");
    assert_eq!(c.ack, data[0].seq.wrapping_add(5));
    let out = c.send(&mut s, FIN | ACK, &[]);
    assert!(
        c.peer_fin,
        "the echo destination closes after the guest: {out:?}"
    );
}

#[test]
fn fixed_destination_sends_its_bytes_then_fin_once_taken() {
    let script = Script::parse("[host]\ntcp = \"fixed:3000\"\n").unwrap();
    let mut s = Session::new(&script);
    let mut c = GuestConn::new(craft::guest_mac(1), guest(1001), srv(80), 100);
    let out = c.connect(&mut s);
    let mut data: u32 = out
        .iter()
        .filter_map(|f| craft::parse_tcp(&f.data))
        .map(|g| g.len)
        .sum();
    for _ in 0..10 {
        if c.peer_fin {
            break;
        }
        s.wait_ms(1);
        let out = c.send(&mut s, ACK, &[]);
        data += out
            .iter()
            .filter_map(|f| craft::parse_tcp(&f.data))
            .map(|g| g.len)
            .sum::<u32>();
    }
    assert!(c.peer_fin);
    assert_eq!(data, 3000);
}

#[test]
fn refused_connect_gives_rst_and_replay_is_repeatable() {
    let script = Script::parse("[host]\ndefault_connect = \"refuse\"\n").unwrap();
    let mut s = Session::new(&script);
    let mut c = GuestConn::new(craft::guest_mac(1), guest(1002), srv(81), 100);
    let out = c.connect(&mut s);
    assert!(out
        .iter()
        .filter_map(|f| craft::parse_tcp(&f.data))
        .any(|g| g.flags & craft::RST != 0));
    let (input, output) = s.finish();
    assert_eq!(replay(&script, &input), output);
}

#[test]
fn rebasing_translates_a_foreign_isn() {
    // A guest that acknowledges ISN 5000 (another hubnat's): the driver moves its ACKs onto the
    // replayed core's ISN, so the core takes its data.
    let script = Script::parse("[host]\ntcp = \"sink\"\n").unwrap();
    let mut s = Session::new(&script);
    let mut c = GuestConn::new(craft::guest_mac(1), guest(1003), srv(5001), 100);
    let syn = craft::tcp(
        guest(1003),
        srv(5001),
        craft::SYN,
        100,
        0,
        64240,
        &[2, 4, 5, 0xb4],
        &[],
    );
    let ip = craft::ipv4(
        craft::GUEST_IP,
        craft::SERVER_IP,
        smoltcp::wire::IpProtocol::Tcp,
        1,
        (0, false),
        &syn,
    );
    let out = s.send(craft::ethernet(script::REPLAY_MAC, c.mac, 0x0800, &ip));
    assert!(out
        .iter()
        .filter_map(|f| craft::parse_tcp(&f.data))
        .any(|g| g.flags & craft::SYN != 0));
    c.seq = 101;
    c.ack = 5001;
    s.wait_ms(1);
    c.send(&mut s, ACK, &[]);
    let mut out = c.send(&mut s, ACK, &[7; 1000]);
    out.extend(c.send(&mut s, ACK | PSH, &[7; 1000]));
    let acked = out
        .iter()
        .filter_map(|f| craft::parse_tcp(&f.data))
        .any(|g| g.ack == 100 + 1 + 1000 || g.ack == 100 + 1 + 2000);
    let descr: Vec<String> = out.iter().map(|f| decode::describe(&f.data)).collect();
    assert!(
        acked,
        "the core acknowledged the rebased segment: {descr:#?}"
    );
    let sock = *s.driver.host.sockets.keys().max().unwrap();
    assert!(s.driver.host.tcp(sock).is_some());

    let mut r = rebase::Rebaser::default();
    let mut scratch = Vec::new();
    assert!(!r.on_input(&[0u8; 20], &mut scratch));
}

#[test]
fn timers_run_in_the_tail_and_not_past_it() {
    // An incomplete fragment expires at 30 s: a 1 s tail does not reach it, 35 s does.
    let m = craft::guest_mac(1);
    let d = craft::udp(guest(1), srv(7), &[0; 2000]);
    let ip = craft::ipv4(
        craft::GUEST_IP,
        craft::SERVER_IP,
        smoltcp::wire::IpProtocol::Udp,
        9,
        (0, true),
        &d[..1480],
    );
    let input = vec![Frame {
        ts: craft::EPOCH,
        data: craft::ethernet(script::REPLAY_MAC, m, 0x0800, &ip),
    }];
    for (tail, pending) in [(1000, 1), (35_000, 0)] {
        let script = Script::parse(&format!("tail_ms = {tail}\n")).unwrap();
        let mut drv = Driver::new(script);
        for f in &input {
            drv.frame(f.ts, &f.data, &mut |_, _| {});
        }
        drv.finish(&mut |_, _| {});
        assert_eq!(drv.engine.nat.frag.len(), pending, "tail {tail}");
    }
}

#[test]
fn advance_runs_timers_and_act_reaches_the_core() {
    // A connect that never answers: the guest is reset at the 2 s connect timeout when time moves
    // on without a frame; a failure handed to the core through `act` resets another at once.
    let script = Script::parse(
        "[host]\ndefault_connect = \"silent\"\n[engine]\nnat = { tcp_connect_timeout = 2 }\n",
    )
    .unwrap();
    let syn = |port: u16| {
        let t = craft::tcp(guest(port), srv(80), craft::SYN, 100, 0, 64240, &[], &[]);
        let ip = craft::ipv4(
            craft::GUEST_IP,
            craft::SERVER_IP,
            smoltcp::wire::IpProtocol::Tcp,
            1,
            (0, false),
            &t,
        );
        craft::ethernet(script::REPLAY_MAC, craft::guest_mac(1), 0x0800, &ip)
    };
    let mut drv = Driver::new(script);
    let out: std::cell::RefCell<Vec<(Duration, u16)>> = Default::default();
    let mut emit = |ts: Duration, f: &[u8]| {
        if let Some(s) = craft::parse_tcp(f).filter(|s| s.flags & craft::RST != 0) {
            out.borrow_mut().push((ts - craft::EPOCH, s.dst.port()));
        }
    };
    let s = Duration::from_secs;
    drv.advance(craft::EPOCH + s(5), &mut emit);
    assert_eq!(drv.now(), Instant::ZERO, "no time before the first frame");
    drv.frame(craft::EPOCH, &syn(1000), &mut emit);
    drv.advance(craft::EPOCH + s(1), &mut emit);
    assert!(out.borrow().is_empty());
    drv.advance(craft::EPOCH + s(3), &mut emit);
    assert_eq!(*out.borrow(), vec![(s(2), 1000)], "reset at its deadline");
    assert_eq!(drv.now(), Instant::from_secs(3));
    drv.frame(craft::EPOCH + s(3), &syn(1001), &mut emit);
    let id = *drv
        .host
        .ids(|s| matches!(s, SimSocket::Tcp(_)))
        .last()
        .unwrap();
    let failed = hubnat_core::SockEvent::ConnectFailed(id, std::io::ErrorKind::ConnectionRefused);
    drv.act(
        |e, now, io, out| e.handle_host_event(now, failed, io, out),
        &mut emit,
    );
    assert_eq!(*out.borrow(), vec![(s(2), 1000), (s(3), 1001)]);
}

/// A segment of the core's toward `c` (from its destination), as a frame.
fn toward(c: &GuestConn, seq: u32, len: usize) -> Frame {
    let seg = craft::tcp(c.dst, c.src, ACK, seq, 1, 100, &[], &vec![0; len]);
    let (std::net::IpAddr::V4(src), std::net::IpAddr::V4(dst)) = (c.dst.ip(), c.src.ip()) else {
        unreachable!()
    };
    let ip = craft::ipv4(
        src,
        dst,
        smoltcp::wire::IpProtocol::Tcp,
        0,
        (0, false),
        &seg,
    );
    Frame {
        ts: Duration::ZERO,
        data: craft::ethernet(c.mac, script::REPLAY_MAC, 0x0800, &ip),
    }
}

#[test]
fn a_guest_holds_data_beyond_a_hole_and_takes_it_once_the_hole_fills() {
    let mut c = GuestConn::new(craft::guest_mac(1), guest(1003), srv(80), 100);
    c.ack = 1000;
    c.lose = Some(1000);
    // the first segment is lost; the rest arrive out of order, two of them adjacent
    c.absorb(&[
        toward(&c, 1000, 500),
        toward(&c, 2000, 500),
        toward(&c, 1500, 500),
        toward(&c, 3000, 100),
    ]);
    assert_eq!((c.ack, c.lose), (1000, None));
    assert_eq!(c.ooo, vec![(1500, 2500), (3000, 3100)]);
    // its ACK carries them as SACK blocks
    let s = Session::new(&Script::default());
    let ack = decode::describe(&c.build(&s, ACK, &[]));
    assert!(
        ack.contains("ack 1000") && ack.contains("sack 1500-2500,sack 3000-3100"),
        "{ack}"
    );
    // the retransmission fills the hole: what was held is taken, up to the next hole
    c.absorb(&[toward(&c, 1000, 500)]);
    assert_eq!((c.ack, c.ooo.clone()), (2500, vec![(3000, 3100)]));
    c.absorb(&[toward(&c, 2500, 600)]);
    assert_eq!((c.ack, c.ooo.len()), (3100, 0));
    assert!(!decode::describe(&c.build(&s, ACK, &[])).contains("sack"));
}

#[test]
fn with_tcp_gso_the_guest_gets_cut_segments_and_the_marks_are_kept() {
    let script = Script::parse("tcp_gso = true\n[host]\ntcp = \"fixed:30000\"\n").unwrap();
    let mut s = Session::new(&script);
    let mut c = GuestConn::new(craft::guest_mac(1), guest(1004), srv(80), 100);
    c.win = 2048;
    let mut seen = c.connect(&mut s);
    while !c.peer_fin && s.t < Duration::from_millis(50) {
        s.wait_ms(1);
        seen.extend(c.send(&mut s, ACK, &[]));
    }
    assert!(c.peer_fin);
    // the core's frames: super-frames, marked with the MSS and cut for the guest
    let marks = s.driver.gso_marks().to_vec();
    assert!(!marks.is_empty());
    for &(i, mss) in &marks {
        assert_eq!(mss, 1448);
        assert!(craft::parse_tcp(&s.output[i].data).unwrap().len > 1448);
    }
    let segs: Vec<_> = seen
        .iter()
        .filter_map(|f| craft::parse_tcp(&f.data))
        .collect();
    assert!(segs.iter().all(|g| g.len <= 1448));
    assert_eq!(segs.iter().map(|g| g.len).sum::<u32>(), 30_000);
    assert!(seen.len() > s.output.len());
    // a replay of what was crafted marks the same frames
    let (input, output) = s.finish();
    let (again, again_marks) = replay_marked(&script, &input);
    assert_eq!(again, output);
    assert_eq!(again_marks, marks);
    // without the setting, no frame is marked
    assert!(replay_marked(
        &Script::parse("[host]\ntcp = \"fixed:30000\"\n").unwrap(),
        &input
    )
    .1
    .is_empty());
}
