//! Shared pieces of the benchmarks: the runtime's own flow router, set up as a two-worker
//! runtime on the replay's virtual host would have it (so a capture is sharded exactly as
//! hubnat shards it), and a header parse that stands for "read the pcap and look at each
//! frame".

use smoltcp::wire::{
    EthernetFrame, EthernetProtocol, IpProtocol, Ipv4Packet, TcpPacket, UdpPacket,
};

use hubnat_replay::craft::HOST_IP;
use hubnat_replay::script::REPLAY_MAC;
use hubnat_runtime::router::Router;

/// The threads a capture is sharded over: `workers` workers, and the control thread for the
/// frames that are not a NAT flow.
pub struct Shards {
    router: Router,
    /// The replays' configuration: the defaults (the virtual host at `HOST_IP`).
    cfg: hubnat_core::Config,
}

impl Shards {
    /// The router of a runtime with `workers` workers.
    pub fn new(workers: usize) -> Shards {
        let cfg = hubnat_core::Config::defaults();
        debug_assert_eq!(cfg.host.ip, HOST_IP);
        Shards {
            router: Router::with_seeds(workers, [1, 2, 3, 4]),
            cfg,
        }
    }

    /// The thread that owns `frame`: a worker index, or `workers` for the control thread.
    pub fn owner(&self, frame: &[u8]) -> usize {
        self.router.route(frame, &self.cfg, REPLAY_MAC)
    }
}

/// The baseline's per-frame work: parse Ethernet, IPv4 and TCP/UDP headers, return a checksum
/// of what was read so the work cannot be optimised away.
pub fn parse_only(frame: &[u8]) -> u64 {
    let key = || -> Option<u64> {
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
        let a = (u64::from(u32::from(ip.src_addr())) << 16) | u64::from(sp);
        let b = (u64::from(u32::from(ip.dst_addr())) << 16) | u64::from(dp);
        Some(a ^ b.rotate_left(7) ^ u64::from(u8::from(ip.next_header())))
    };
    key().unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hubnat_replay::craft;
    use std::net::SocketAddrV4;

    #[test]
    fn both_directions_of_a_flow_have_one_owner_and_other_frames_go_to_control() {
        let shards = Shards::new(2);
        let a = SocketAddrV4::new(craft::GUEST_IP, 1000);
        let b = SocketAddrV4::new(craft::SERVER_IP, 80);
        let m = craft::guest_mac(1);
        let f1 = craft::udp_frame(m, a, b, 1, b"x");
        let f2 = craft::udp_frame(m, b, a, 2, b"yy");
        assert!(shards.owner(&f1) < 2);
        assert_eq!(shards.owner(&f1), shards.owner(&f2));
        assert_eq!(
            shards.owner(&[0u8; 10]),
            2,
            "not a flow: the control thread's"
        );
    }
}
