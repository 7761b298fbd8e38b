//! Frame crafting and parsing for tests of the core and of the crates above it (the feature
//! `testing`): a ready engine on a simulated sock side, and the frames a guest would send.
#![allow(missing_docs)]

use std::net::{Ipv4Addr, SocketAddrV4};

use smoltcp::wire::{EthernetFrame, IpProtocol, Ipv4Packet, UdpPacket, ETHERNET_HEADER_LEN};

use crate::config::{Config, Mac};
use crate::output::FrameBatch;
use crate::sim::SimSockets;
use crate::sockio::SockEvent;
use crate::time::Instant;
use crate::wire::{Ipv4Header, IPV4_HEADER_LEN};
use crate::Engine;

pub const HOST_MAC: Mac = Mac([0, 0xac, 1, 2, 3, 4]);
pub const GUEST_MAC: Mac = Mac([2, 0, 0, 0, 0, 7]);
pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 30, 1);
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 30, 10);
pub const GUEST2_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 30, 11);
/// A documentation address (TEST-NET-3): only ever reached through the simulated sock side.
pub const REMOTE_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 5);
pub const T0: Instant = Instant::from_secs(1);

pub fn setup_with(f: impl FnOnce(&mut Config)) -> (Engine, SimSockets, FrameBatch) {
    let mut cfg = Config::defaults();
    f(&mut cfg);
    (
        Engine::new(cfg, HOST_MAC, 7),
        SimSockets::default(),
        FrameBatch::new(),
    )
}

pub fn setup() -> (Engine, SimSockets, FrameBatch) {
    setup_with(|_| {})
}

/// An Ethernet frame from the guest's MAC to the virtual host carrying one IPv4 packet.
pub fn ipv4_frame(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: IpProtocol,
    ident: u16,
    offset: usize,
    more: bool,
    payload: &[u8],
) -> Vec<u8> {
    let mut out = FrameBatch::new();
    let mut h = Ipv4Header::new(src, dst, proto, ident);
    h.dont_frag = false;
    crate::wire::push_ipv4(&mut out, GUEST_MAC, HOST_MAC, &h, payload.len(), |p| {
        p.copy_from_slice(payload)
    });
    let mut f = out.get(0).unwrap().to_vec();
    let mut ip = Ipv4Packet::new_unchecked(&mut f[ETHERNET_HEADER_LEN..]);
    ip.set_frag_offset(offset as u16);
    ip.set_more_frags(more);
    ip.fill_checksum();
    f
}

pub fn udp_frame(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let mut udp = vec![0u8; 8 + payload.len()];
    crate::wire::emit_udp(
        &mut udp,
        *src.ip(),
        src.port(),
        *dst.ip(),
        dst.port(),
        payload,
    );
    ipv4_frame(*src.ip(), *dst.ip(), IpProtocol::Udp, 1, 0, false, &udp)
}

/// `frame` (an Ethernet frame of one IPv4 packet) with the IP TTL `ttl`.
pub fn with_ttl(mut frame: Vec<u8>, ttl: u8) -> Vec<u8> {
    let mut ip = Ipv4Packet::new_unchecked(&mut frame[ETHERNET_HEADER_LEN..]);
    ip.set_hop_limit(ttl);
    ip.fill_checksum();
    frame
}

/// A TCP SYN header (no options) from `src` to `dst` with sequence number `seq`, its checksum
/// filled in for either family.
fn syn_segment(src: std::net::SocketAddr, dst: std::net::SocketAddr, seq: u32) -> [u8; 20] {
    let mut tcp = [0u8; 20];
    let mut t = smoltcp::wire::TcpPacket::new_unchecked(&mut tcp[..]);
    t.set_src_port(src.port());
    t.set_dst_port(dst.port());
    t.set_seq_number(smoltcp::wire::TcpSeqNumber(seq as i32));
    t.set_header_len(20);
    t.set_syn(true);
    t.set_window_len(64240);
    t.fill_checksum(&src.ip().into(), &dst.ip().into());
    tcp
}

/// A guest's TCP SYN (no options) from `src` to `dst` with sequence number `seq`.
pub fn syn_frame(src: SocketAddrV4, dst: SocketAddrV4, seq: u32) -> Vec<u8> {
    let tcp = syn_segment(src.into(), dst.into(), seq);
    ipv4_frame(*src.ip(), *dst.ip(), IpProtocol::Tcp, 3, 0, false, &tcp)
}

/// The IPv4 packets of the frames in `out` (checked, checksums verified).
pub fn packets(out: &FrameBatch) -> Vec<Vec<u8>> {
    out.iter()
        .map(|f| {
            let eth = EthernetFrame::new_checked(f).unwrap();
            assert_eq!(crate::wire::mac(eth.src_addr()), HOST_MAC);
            let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
            assert!(ip.verify_checksum());
            assert!(ip.total_len() as usize <= 1500);
            eth.payload()[..ip.total_len() as usize].to_vec()
        })
        .collect()
}

/// A whole (unfragmented) UDP datagram to the guest: (from, to, payload).
pub fn parse_udp(packet: &[u8]) -> (SocketAddrV4, SocketAddrV4, Vec<u8>) {
    let ip = Ipv4Packet::new_checked(packet).unwrap();
    assert_eq!(ip.next_header(), IpProtocol::Udp);
    let udp = UdpPacket::new_checked(ip.payload()).unwrap();
    assert!(udp.verify_checksum(&ip.src_addr().into(), &ip.dst_addr().into()));
    (
        SocketAddrV4::new(ip.src_addr(), udp.src_port()),
        SocketAddrV4::new(ip.dst_addr(), udp.dst_port()),
        udp.payload().to_vec(),
    )
}

/// Joins IPv4 fragments (in order) back into the datagram's payload.
pub fn join_fragments(packets: &[Vec<u8>]) -> Vec<u8> {
    let mut joined = Vec::new();
    for p in packets {
        let ip = Ipv4Packet::new_checked(&p[..]).unwrap();
        assert_eq!(ip.frag_offset() as usize, joined.len());
        joined.extend_from_slice(&p[IPV4_HEADER_LEN..]);
    }
    joined
}

/// Feeds every event the simulated sock side raised back into the engine.
pub fn pump(e: &mut Engine, h: &mut SimSockets, out: &mut FrameBatch, now: Instant) {
    for ev in h.drain_events() {
        e.handle_host_event(now, ev, h, out);
    }
}

pub fn readable(id: u32) -> SockEvent {
    SockEvent::Readable(id)
}

/// A DHCPv6 Solicit with Rapid Commit from `mac` (its link-local address, to ff02::1:2),
/// client DUID `duid`, one IA_NA `iaid`: a lease in one exchange with a stateful server.
pub fn dhcpv6_rapid_solicit(mac: Mac, duid: &[u8], iaid: u32) -> Vec<u8> {
    use crate::vhost::dhcp6::{ALL_DHCP_AGENTS, CLIENT_PORT, SERVER_PORT};
    let opt = |code: u16, data: &[u8]| {
        let mut v = code.to_be_bytes().to_vec();
        v.extend_from_slice(&(data.len() as u16).to_be_bytes());
        v.extend_from_slice(data);
        v
    };
    let mut ia = iaid.to_be_bytes().to_vec();
    ia.extend_from_slice(&[0; 8]);
    let mut body = vec![1, 0, 0, 1];
    body.extend(opt(1, duid));
    body.extend(opt(3, &ia));
    body.extend(opt(14, &[]));
    let (src, dst) = (crate::wire::link_local(mac), ALL_DHCP_AGENTS);
    let mut udp = vec![0u8; 8 + body.len()];
    udp[0..2].copy_from_slice(&CLIENT_PORT.to_be_bytes());
    udp[2..4].copy_from_slice(&SERVER_PORT.to_be_bytes());
    let len = udp.len() as u16;
    udp[4..6].copy_from_slice(&len.to_be_bytes());
    udp[8..].copy_from_slice(&body);
    let c = crate::wire::upper_checksum6(src, dst, 17, &udp);
    udp[6..8].copy_from_slice(&c.to_be_bytes());
    let mut f = Vec::new();
    f.extend_from_slice(&crate::wire::multicast_mac(dst).0);
    f.extend_from_slice(&mac.0);
    f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
    f.extend_from_slice(&(udp.len() as u16).to_be_bytes());
    f.extend_from_slice(&[17, 1]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&udp);
    f
}

/// The guest's address in the default IPv6 prefix (SLAAC-like, from `GUEST_MAC`).
pub fn guest_ip6() -> std::net::Ipv6Addr {
    "fd68:7562:6e61:1e::a".parse().unwrap()
}

/// A remote IPv6 host (documentation prefix): only ever reached through the simulated sock side.
pub fn remote_ip6() -> std::net::Ipv6Addr {
    "2001:db8::5".parse().unwrap()
}

/// An Ethernet frame from the guest's MAC to the virtual host carrying one IPv6 packet with
/// `next` as its next header (no extension headers unless `payload` starts with them).
pub fn ipv6_frame(
    src: std::net::Ipv6Addr,
    dst: std::net::Ipv6Addr,
    next: u8,
    hop_limit: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&HOST_MAC.0);
    f.extend_from_slice(&GUEST_MAC.0);
    f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
    f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    f.extend_from_slice(&[next, hop_limit]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(payload);
    f
}

/// A guest's UDP datagram over IPv6 (checksum filled in).
pub fn udp6_frame(
    src: std::net::SocketAddrV6,
    dst: std::net::SocketAddrV6,
    payload: &[u8],
) -> Vec<u8> {
    ipv6_frame(*src.ip(), *dst.ip(), 17, 64, &udp6(src, dst, payload))
}

/// The UDP header and payload of a datagram between `src` and `dst`, checksum filled in.
pub fn udp6(src: std::net::SocketAddrV6, dst: std::net::SocketAddrV6, payload: &[u8]) -> Vec<u8> {
    let mut udp = vec![0u8; 8 + payload.len()];
    udp[0..2].copy_from_slice(&src.port().to_be_bytes());
    udp[2..4].copy_from_slice(&dst.port().to_be_bytes());
    let len = udp.len() as u16;
    udp[4..6].copy_from_slice(&len.to_be_bytes());
    udp[8..].copy_from_slice(payload);
    let c = crate::wire::upper_checksum6(*src.ip(), *dst.ip(), 17, &udp);
    udp[6..8].copy_from_slice(&c.to_be_bytes());
    udp
}

/// A guest's TCP SYN over IPv6 (no options) with sequence number `seq`.
pub fn syn6_frame(src: std::net::SocketAddrV6, dst: std::net::SocketAddrV6, seq: u32) -> Vec<u8> {
    let tcp = syn_segment(src.into(), dst.into(), seq);
    ipv6_frame(*src.ip(), *dst.ip(), 6, 64, &tcp)
}

/// The IPv6 packets of the frames in `out`, each checked: from the virtual host's MAC, an
/// IPv6 packet whose length is the frame's.
pub fn packets6(out: &FrameBatch) -> Vec<Vec<u8>> {
    out.iter()
        .map(|f| {
            let eth = EthernetFrame::new_checked(f).unwrap();
            assert_eq!(crate::wire::mac(eth.src_addr()), HOST_MAC);
            assert_eq!(eth.ethertype(), smoltcp::wire::EthernetProtocol::Ipv6);
            let ip = smoltcp::wire::Ipv6Packet::new_checked(eth.payload()).unwrap();
            assert_eq!(40 + ip.payload_len() as usize, eth.payload().len());
            eth.payload().to_vec()
        })
        .collect()
}
