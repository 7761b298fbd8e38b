//! Shared pieces of the benchmarks: the symmetric flow hash used to shard a capture over
//! workers, and a header parse that stands for "read the pcap and look at each frame".

use std::hash::{BuildHasher, Hasher};

use smoltcp::wire::{
    EthernetFrame, EthernetProtocol, IpProtocol, Ipv4Packet, TcpPacket, UdpPacket,
};

/// The flow of a frame with both directions mapped to one key: ((low addr, port), (high addr, port), proto).
pub fn flow_key(frame: &[u8]) -> Option<(u64, u64, u8)> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return None;
    }
    let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
    let (sp, dp) = match ip.next_header() {
        IpProtocol::Tcp => {
            let t = TcpPacket::new_checked(ip.payload()).ok()?;
            (t.src_port(), t.dst_port())
        }
        IpProtocol::Udp => {
            let u = UdpPacket::new_checked(ip.payload()).ok()?;
            (u.src_port(), u.dst_port())
        }
        _ => (0, 0),
    };
    let a = (u32::from(ip.src_addr()) as u64) << 16 | sp as u64;
    let b = (u32::from(ip.dst_addr()) as u64) << 16 | dp as u64;
    Some((a.min(b), a.max(b), u8::from(ip.next_header())))
}

/// A fixed-keyed ahash state (the same shard on every run).
pub fn hasher() -> ahash::RandomState {
    ahash::RandomState::with_seeds(1, 2, 3, 4)
}

/// The symmetric flow hash: the same for both directions of a flow.
pub fn flow_hash(state: &ahash::RandomState, frame: &[u8]) -> u64 {
    match flow_key(frame) {
        Some((a, b, p)) => {
            let mut h = state.build_hasher();
            h.write_u64(a);
            h.write_u64(b);
            h.write_u8(p);
            h.finish()
        }
        None => 0,
    }
}

/// The baseline's per-frame work: parse Ethernet, IPv4 and TCP/UDP headers, return a checksum
/// of what was read so the work cannot be optimised away.
pub fn parse_only(frame: &[u8]) -> u64 {
    match flow_key(frame) {
        Some((a, b, p)) => a ^ b.rotate_left(7) ^ p as u64,
        None => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hubnat_replay::craft;
    use std::net::SocketAddrV4;

    #[test]
    fn hash_is_symmetric_and_non_ip_goes_to_zero() {
        let a = SocketAddrV4::new(craft::GUEST_IP, 1000);
        let b = SocketAddrV4::new(craft::SERVER_IP, 80);
        let m = craft::guest_mac(1);
        let f1 = craft::udp_frame(m, a, b, 1, b"x");
        let f2 = craft::udp_frame(m, b, a, 2, b"yy");
        let s = hasher();
        assert_eq!(flow_hash(&s, &f1), flow_hash(&s, &f2));
        let f3 = craft::udp_frame(m, SocketAddrV4::new(craft::GUEST_IP, 1001), b, 1, b"x");
        assert_ne!(flow_hash(&s, &f1), flow_hash(&s, &f3));
        assert_eq!(flow_hash(&s, &[0u8; 10]), 0);
    }
}
