//! The NAT over IPv6: the same sessions, limits and policy as IPv4, through the simulated
//! sock side. (Neighbour discovery and the virtual host's own IPv6 services are tested in
//! `vhost::ndp` and `vhost::dhcp6`.)

use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};

use smoltcp::wire::{IpProtocol, TcpOption, TcpPacket};

use crate::config::IcmpMode;
use crate::nat::Proto;
use crate::sim::{SimSocket, SimSockets};
use crate::stats::DropReason;
use crate::testing::*;
use crate::wire::{verify_upper6, Ipv6View};

fn sa6(ip: Ipv6Addr, port: u16) -> SocketAddrV6 {
    SocketAddrV6::new(ip, port, 0, 0)
}

fn ids(h: &SimSockets, kind: fn(&SimSocket) -> bool) -> Vec<u32> {
    h.ids(kind)
}

/// The one IPv6 packet of `out`, checked: (source, destination, next header, upper bytes).
fn only6(out: &crate::FrameBatch) -> (Ipv6Addr, Ipv6Addr, IpProtocol, Vec<u8>) {
    let p = packets6(out);
    assert_eq!(p.len(), 1, "one frame out");
    let v = Ipv6View::parse(&p[0]).unwrap();
    assert!(
        verify_upper6(v.src, v.dst, v.proto.into(), v.upper()),
        "checksum"
    );
    (v.src, v.dst, v.proto, v.upper().to_vec())
}

#[test]
fn udp_is_carried_both_ways_over_ipv6() {
    let (mut e, mut h, mut out) = setup();
    let (g, d) = (sa6(guest_ip6(), 5000), sa6(remote_ip6(), 7000));
    e.handle_frame(T0, &udp6_frame(g, d, b"ping"), &mut h, &mut out);
    assert!(out.is_empty(), "nothing back yet");
    let socks = ids(&h, |s| matches!(s, SimSocket::Udp(_)));
    assert_eq!(socks.len(), 1);
    let sock = socks[0];
    assert_eq!(h.udp(sock).unwrap().dst, SocketAddr::V6(d));
    assert_eq!(h.udp(sock).unwrap().sent, vec![b"ping".to_vec()]);

    h.deliver_udp(sock, b"pong");
    pump(&mut e, &mut h, &mut out, T0);
    let (src, dst, proto, udp) = only6(&out);
    assert_eq!(
        (src, dst, proto),
        (remote_ip6(), guest_ip6(), IpProtocol::Udp)
    );
    assert_eq!(&udp[0..4], &[0x1b, 0x58, 0x13, 0x88]);
    assert_eq!(&udp[8..], b"pong");
    let row = &e.sessions()[0];
    assert_eq!(row.proto, Proto::Udp);
    assert_eq!((row.guest, row.dst), (SocketAddr::V6(g), SocketAddr::V6(d)));
}

#[test]
fn an_answer_larger_than_the_mtu_reaches_the_guest_in_ipv6_fragments() {
    let (mut e, mut h, mut out) = setup();
    let (g, d) = (sa6(guest_ip6(), 5000), sa6(remote_ip6(), 7000));
    e.handle_frame(T0, &udp6_frame(g, d, b"ask"), &mut h, &mut out);
    let sock = ids(&h, |s| matches!(s, SimSocket::Udp(_)))[0];
    let big: Vec<u8> = (0..4000u32).map(|i| i as u8).collect();
    h.deliver_udp(sock, &big);
    pump(&mut e, &mut h, &mut out, T0);
    let frames = packets6(&out);
    assert_eq!(frames.len(), 3);
    let mut joined = Vec::new();
    for (i, p) in frames.iter().enumerate() {
        assert!(p.len() <= 1500);
        let v = Ipv6View::parse(p).unwrap();
        let f = v.fragment.expect("a fragment");
        assert_eq!((f.offset, f.more), (joined.len(), i < 2));
        joined.extend_from_slice(&p[f.data_at..]);
    }
    assert!(verify_upper6(remote_ip6(), guest_ip6(), 17, &joined));
    assert_eq!(&joined[8..], &big[..]);
}

#[test]
fn a_guests_fragmented_datagram_is_reassembled() {
    let (mut e, mut h, mut out) = setup();
    let (g, d) = (sa6(guest_ip6(), 5000), sa6(remote_ip6(), 7000));
    let data: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
    let udp = udp6(g, d, &data);
    let per = 1232;
    let pieces: Vec<&[u8]> = udp.chunks(per).collect();
    // Last first: reassembly does not depend on the order.
    for (i, chunk) in pieces.iter().enumerate().rev() {
        let more = u16::from(i + 1 < pieces.len());
        let mut frag = vec![17, 0];
        frag.extend_from_slice(&(((i * per) as u16) | more).to_be_bytes());
        frag.extend_from_slice(&0x5eed_u32.to_be_bytes());
        frag.extend_from_slice(chunk);
        let f = ipv6_frame(guest_ip6(), remote_ip6(), 44, 64, &frag);
        e.handle_frame(T0, &f, &mut h, &mut out);
    }
    let sock = ids(&h, |s| matches!(s, SimSocket::Udp(_)))[0];
    assert_eq!(h.udp(sock).unwrap().sent, vec![data]);
    assert_eq!(e.nat.frag.len(), 0);
}

#[test]
fn tcp_over_ipv6_connects_first_then_answers_with_the_ipv6_mss() {
    let (mut e, mut h, mut out) = setup();
    let (g, d) = (sa6(guest_ip6(), 40000), sa6(remote_ip6(), 80));
    e.handle_frame(T0, &syn6_frame(g, d, 1000), &mut h, &mut out);
    assert!(
        out.is_empty(),
        "no SYN-ACK before the host connect succeeds"
    );
    let sock = ids(&h, |s| matches!(s, SimSocket::Tcp(_)))[0];
    assert_eq!(h.tcp(sock).unwrap().dst, SocketAddr::V6(d));
    pump(&mut e, &mut h, &mut out, T0);
    let (src, dst, proto, seg) = only6(&out);
    assert_eq!(
        (src, dst, proto),
        (remote_ip6(), guest_ip6(), IpProtocol::Tcp)
    );
    let tcp = TcpPacket::new_checked(&seg[..]).unwrap();
    assert!(tcp.syn() && tcp.ack());
    assert_eq!(tcp.ack_number().0, 1001);
    let mut options = tcp.options();
    let mut mss = None;
    while !options.is_empty() {
        let (rest, o) = TcpOption::parse(options).unwrap();
        if let TcpOption::MaxSegmentSize(m) = o {
            mss = Some(m);
        }
        options = rest;
    }
    // 1500 less the IPv6 and TCP headers.
    assert_eq!(mss, Some(1440));
}

#[test]
fn echo_requests_are_carried_and_answered_under_the_guests_ident() {
    let (mut e, mut h, mut out) = setup_with(|c| c.nat.icmp = IcmpMode::Real);
    let mut echo = vec![128, 0, 0, 0, 0x42, 0x42, 0, 1, b'x'];
    let c = crate::wire::upper_checksum6(guest_ip6(), remote_ip6(), 58, &echo);
    echo[2..4].copy_from_slice(&c.to_be_bytes());
    e.handle_frame(
        T0,
        &ipv6_frame(guest_ip6(), remote_ip6(), 58, 64, &echo),
        &mut h,
        &mut out,
    );
    let sock = ids(&h, |s| matches!(s, SimSocket::Icmp(_)))[0];
    // The host's socket chose ident 999; the reply comes back to the guest's 0x4242.
    let reply = [129, 0, 0, 0, 0x03, 0xe7, 0, 1, b'x'];
    h.deliver_icmp(sock, IpAddr::V6(remote_ip6()), &reply);
    pump(&mut e, &mut h, &mut out, T0);
    let (src, dst, proto, msg) = only6(&out);
    assert_eq!(
        (src, dst, proto),
        (remote_ip6(), guest_ip6(), IpProtocol::Icmpv6)
    );
    assert_eq!(&msg[..2], &[129, 0]);
    assert_eq!(&msg[4..], &[0x42, 0x42, 0, 1, b'x']);
}

#[test]
fn hop_limit_one_gets_time_exceeded_from_the_virtual_host() {
    let (mut e, mut h, mut out) = setup();
    let (g, d) = (sa6(guest_ip6(), 33434), sa6(remote_ip6(), 33434));
    let f = ipv6_frame(guest_ip6(), remote_ip6(), 17, 1, &udp6(g, d, b"probe"));
    e.handle_frame(T0, &f, &mut h, &mut out);
    let (src, dst, proto, msg) = only6(&out);
    assert_eq!(src, e.config().ipv6.ip);
    assert_eq!((dst, proto), (guest_ip6(), IpProtocol::Icmpv6));
    assert_eq!(&msg[..2], &[3, 0]);
    // The guest's datagram is quoted from its IPv6 header on: its ports say which probe.
    assert_eq!(&msg[8 + 8..8 + 24], &guest_ip6().octets());
    assert_eq!(&msg[8 + 40..8 + 44], &[0x82, 0x9a, 0x82, 0x9a]);
    assert_eq!(e.stats().drops_of(DropReason::TtlExceeded), 1);
    assert!(ids(&h, |s| matches!(s, SimSocket::Udp(_))).is_empty());
}

#[test]
fn the_hosts_loopback_and_mapped_addresses_are_refused() {
    let (mut e, mut h, mut out) = setup();
    let g = sa6(guest_ip6(), 5000);
    for dst in ["::1", "::ffff:127.0.0.1"] {
        out.clear();
        let d = sa6(dst.parse().unwrap(), 53);
        e.handle_frame(T0, &udp6_frame(g, d, b"x"), &mut h, &mut out);
        let (src, _, proto, msg) = only6(&out);
        assert_eq!((src, proto), (e.config().ipv6.ip, IpProtocol::Icmpv6));
        // Destination unreachable, administratively prohibited.
        assert_eq!(&msg[..2], &[1, 1], "{dst}");
    }
    assert_eq!(e.stats().drops_of(DropReason::Policy), 2);
    assert!(ids(&h, |s| matches!(s, SimSocket::Udp(_))).is_empty());
    // A TCP connection there is reset, as over IPv4.
    out.clear();
    let syn = syn6_frame(g, sa6(Ipv6Addr::LOCALHOST, 22), 7);
    e.handle_frame(T0, &syn, &mut h, &mut out);
    let (_, _, proto, seg) = only6(&out);
    assert_eq!(proto, IpProtocol::Tcp);
    assert!(TcpPacket::new_checked(&seg[..]).unwrap().rst());
}

#[test]
fn a_source_outside_the_prefix_is_not_carried() {
    let (mut e, mut h, mut out) = setup();
    let spoofed = sa6("2001:db8:bad::1".parse().unwrap(), 5000);
    let d = sa6(remote_ip6(), 7000);
    e.handle_frame(T0, &udp6_frame(spoofed, d, b"x"), &mut h, &mut out);
    assert!(out.is_empty());
    assert!(ids(&h, |s| matches!(s, SimSocket::Udp(_))).is_empty());
    assert_eq!(e.stats().drops_of(DropReason::Foreign), 1);
}

#[test]
fn the_per_guest_limit_holds_over_ipv6() {
    let (mut e, mut h, mut out) = setup_with(|c| c.nat.max_sessions_per_guest = 2);
    let d = sa6(remote_ip6(), 53);
    for port in [1001, 1002, 1003] {
        let f = udp6_frame(sa6(guest_ip6(), port), d, b"x");
        e.handle_frame(T0, &f, &mut h, &mut out);
    }
    assert_eq!(e.nat.udp.len(), 2);
    assert_eq!(e.stats().drops_of(DropReason::Limit), 1);
}

#[test]
fn a_stateful_dhcpv6_lease_binds_its_address_to_its_mac() {
    use crate::config::Dhcpv6Mode;
    use crate::vhost::bindings::SourceCheck;
    let (mut e, mut h, mut out) = setup_with(|c| {
        c.ipv6.dhcpv6 = Dhcpv6Mode::Stateful;
        c.nat.source_check = SourceCheck::Lease;
    });
    e.handle_frame(
        T0,
        &dhcpv6_rapid_solicit(GUEST_MAC, &[0, 3, 0, 1, 2, 0, 0, 0, 0, 7], 1),
        &mut h,
        &mut out,
    );
    let leased = e.dhcp6.leases().next().expect("a lease").ip;
    assert_eq!(leased, e.config().ipv6.range_start);
    let d = sa6(remote_ip6(), 7000);
    let from_owner = udp6_frame(sa6(leased, 5000), d, b"x");
    e.handle_frame(T0, &from_owner, &mut h, &mut out);
    assert_eq!(e.nat.udp.len(), 1, "the lease's owner is carried");
    let mut from_other = udp6_frame(sa6(leased, 5001), d, b"x");
    from_other[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 9]);
    e.handle_frame(T0, &from_other, &mut h, &mut out);
    assert_eq!(e.nat.udp.len(), 1);
    assert_eq!(e.stats().drops_of(DropReason::Spoofed), 1);
    // In lease mode, an address no lease holds is refused too (EUI-64 ones of the MAC aside).
    let stray = udp6_frame(sa6(guest_ip6(), 5002), d, b"x");
    e.handle_frame(T0, &stray, &mut h, &mut out);
    assert_eq!(e.stats().drops_of(DropReason::Spoofed), 2);
}

#[test]
fn icmpv6_errors_the_host_receives_reach_the_guest_from_their_sender() {
    let (mut e, mut h, mut out) = setup();
    let (g, d) = (sa6(guest_ip6(), 33434), sa6(remote_ip6(), 33434));
    let probe = ipv6_frame(guest_ip6(), remote_ip6(), 17, 2, &udp6(g, d, b"probe"));
    e.handle_frame(T0, &probe, &mut h, &mut out);
    let sock = ids(&h, |s| matches!(s, SimSocket::Udp(_)))[0];
    let router: Ipv6Addr = "2001:db8:1::1".parse().unwrap();
    for (icmp_type, code, info) in [(3u8, 0u8, 0u32), (2, 0, 1280), (1, 4, 0)] {
        out.clear();
        let err = crate::sockio::IcmpError {
            from: IpAddr::V6(if icmp_type == 1 { remote_ip6() } else { router }),
            icmp_type,
            code,
            info,
            quoted: [0; 8],
            quoted_len: 0,
        };
        h.icmp_error_udp(sock, err);
        pump(&mut e, &mut h, &mut out, T0);
        let (src, dst, proto, msg) = only6(&out);
        assert_eq!((dst, proto), (guest_ip6(), IpProtocol::Icmpv6));
        assert_eq!(src, if icmp_type == 1 { remote_ip6() } else { router });
        assert_eq!((msg[0], msg[1]), (icmp_type, code));
        assert_eq!(u32::from_be_bytes([msg[4], msg[5], msg[6], msg[7]]), info);
        // The guest's probe, quoted from its IPv6 header on, as the guest sent it.
        assert_eq!(&msg[8..8 + 48], &probe[14..14 + 48]);
    }
}

#[test]
fn toward_a_port_that_cuts_segments_ipv6_connections_send_super_frames() {
    let (mut e, mut h, mut out) = setup();
    e.ctx.tcp_gso = true;
    let (g, d) = (sa6(guest_ip6(), 40000), sa6(remote_ip6(), 80));
    e.handle_frame(T0, &syn6_frame(g, d, 1000), &mut h, &mut out);
    let sock = ids(&h, |s| matches!(s, SimSocket::Tcp(_)))[0];
    pump(&mut e, &mut h, &mut out, T0);
    let syn_ack = packets6(&out).remove(0);
    let server_isn = TcpPacket::new_checked(&syn_ack[40..]).unwrap().seq_number();
    out.clear();
    // The guest acknowledges, with a large window; the host has 20000 bytes for it.
    let mut ack = [0u8; 20];
    let mut t = TcpPacket::new_unchecked(&mut ack[..]);
    t.set_src_port(40000);
    t.set_dst_port(80);
    t.set_seq_number(smoltcp::wire::TcpSeqNumber(1001));
    t.set_ack_number(server_isn + 1);
    t.set_header_len(20);
    t.set_ack(true);
    t.set_window_len(65535);
    t.fill_checksum(&guest_ip6().into(), &remote_ip6().into());
    e.handle_frame(
        T0,
        &ipv6_frame(guest_ip6(), remote_ip6(), 6, 64, &ack),
        &mut h,
        &mut out,
    );
    h.deliver_tcp(sock, &[7u8; 20000]);
    pump(&mut e, &mut h, &mut out, T0);
    let marked: Vec<(usize, u16)> = out.iter_gso().map(|(f, mss)| (f.len(), mss)).collect();
    let (len, mss) = marked[0];
    // The guest's SYN named no MSS: segments of RFC 9293's default.
    assert_eq!(mss, 536, "a super-frame marked with the MSS: {marked:?}");
    assert!(len > 1514, "{marked:?}");
    // Its checksum field holds the pseudo-header's sum, for the guest's side to complete.
    let f = out.get(0).unwrap();
    let tcp_len = f.len() - 14 - 40;
    let sum = crate::wire::pseudo_header_sum6(remote_ip6(), guest_ip6(), 6, tcp_len);
    assert_eq!(&f[14 + 40 + 16..14 + 40 + 18], &sum.to_be_bytes());
}

#[test]
fn a_datagram_whose_checksum_was_left_to_the_port_is_carried_without_it() {
    let (mut e, mut h, mut out) = setup();
    let (g, d) = (sa6(guest_ip6(), 5000), sa6(remote_ip6(), 7000));
    let mut f = udp6_frame(g, d, b"left");
    // The field holds the pseudo-header's sum only, as a guest with checksum offload leaves it.
    f[14 + 40 + 6..14 + 40 + 8].copy_from_slice(&0x1234u16.to_be_bytes());
    e.handle_frame(T0, &f, &mut h, &mut out);
    assert_eq!(e.stats().drops_of(DropReason::BadChecksum), 1);
    e.handle_frame_checksum_left(T0, &f, &mut h, &mut out);
    let sock = ids(&h, |s| matches!(s, SimSocket::Udp(_)))[0];
    assert_eq!(h.udp(sock).unwrap().sent, vec![b"left".to_vec()]);
}
