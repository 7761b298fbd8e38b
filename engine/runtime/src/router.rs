//! The flow router: which thread owns a frame.
//!
//! Every frame from the port goes to one owner: a worker, chosen by a symmetric hash of its
//! flow's 5-tuple (both directions of a flow hash alike, so a flow's frames and its host
//! socket's answers meet on one worker), or the control thread for everything that is not a NAT
//! flow (ARP, DHCP, broadcasts, anything addressed to the virtual host itself such as DNS and
//! ping, at its own address or its DNS address, IP fragments, other protocols). The seeds are random per process (a guest cannot aim
//! its flows at one worker); the benchmarks shard captures with this same hash, seeds fixed.

use std::hash::{BuildHasher, Hasher};
use std::net::{Ipv4Addr, SocketAddrV4};

use smoltcp::wire::{EthernetFrame, EthernetProtocol, IpProtocol, Ipv4Packet};

use hubnat_core::config::Mac;

/// Sends a flow's frames to its worker, everything else to the control thread.
#[derive(Clone)]
pub struct Router {
    hasher: ahash::RandomState,
    workers: usize,
}

impl Router {
    /// A router for `workers` workers with seeds of its own: the flow → worker map differs from
    /// process to process, so a guest cannot choose flows that all land on one worker.
    pub fn new(workers: usize) -> Router {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::from_os_rng();
        Router::with_seeds(workers, rng.random())
    }

    /// A router with fixed seeds (the same map on every run: the benchmarks).
    pub fn with_seeds(workers: usize, seeds: [u64; 4]) -> Router {
        Router {
            hasher: ahash::RandomState::with_seeds(seeds[0], seeds[1], seeds[2], seeds[3]),
            workers: workers.max(1),
        }
    }

    /// The control thread's index (the workers are 0..workers).
    pub fn control(&self) -> usize {
        self.workers
    }

    /// The owner of `frame`: a worker index, or `control()`. `host_ips` are the virtual host's
    /// addresses as `Config::host_addresses` gives them (its own, then its DNS address or its
    /// own again).
    pub fn route(&self, frame: &[u8], host_ips: [Ipv4Addr; 2], host_mac: Mac) -> usize {
        match self.flow_hash(frame, host_ips, host_mac) {
            Some(h) => (h % self.workers as u64) as usize,
            None => self.control(),
        }
    }

    /// The symmetric hash of a NAT flow's 5-tuple, or None for the control plane.
    fn flow_hash(&self, frame: &[u8], host_ips: [Ipv4Addr; 2], host_mac: Mac) -> Option<u64> {
        let eth = EthernetFrame::new_checked(frame).ok()?;
        if eth.ethertype() != EthernetProtocol::Ipv4
            || hubnat_core::wire::mac(eth.dst_addr()) != host_mac
        {
            return None;
        }
        let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
        let dst = ip.dst_addr();
        if ip.more_frags() || ip.frag_offset() != 0 || dst == host_ips[0] || dst == host_ips[1] {
            return None;
        }
        let hl = usize::from(ip.header_len());
        let l4 = eth.payload().get(hl..)?;
        let (sp, dp) = match ip.next_header() {
            IpProtocol::Tcp | IpProtocol::Udp => {
                let p = l4.get(..4)?;
                (
                    u16::from_be_bytes([p[0], p[1]]),
                    u16::from_be_bytes([p[2], p[3]]),
                )
            }
            IpProtocol::Icmp => (0, 0),
            _ => return None,
        };
        let src = SocketAddrV4::new(ip.src_addr(), sp);
        let dst = SocketAddrV4::new(ip.dst_addr(), dp);
        Some(self.tuple_hash(ip.next_header(), src, dst))
    }

    /// The owner of the flow between `a` and `b` (either way round): the worker its frames
    /// will be routed to (a forward's accepted connection is handed to it).
    pub fn route_flow(&self, proto: IpProtocol, a: SocketAddrV4, b: SocketAddrV4) -> usize {
        (self.tuple_hash(proto, a, b) % self.workers as u64) as usize
    }

    fn tuple_hash(&self, proto: IpProtocol, a: SocketAddrV4, b: SocketAddrV4) -> u64 {
        let key = |s: SocketAddrV4| (u64::from(u32::from(*s.ip())) << 16) | u64::from(s.port());
        let (a, b) = (key(a), key(b));
        let mut h = self.hasher.build_hasher();
        h.write_u64(a.min(b));
        h.write_u64(a.max(b));
        h.write_u8(u8::from(proto));
        h.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hubnat_core::testing::*;

    /// A forward's connection is handed to the worker its frames will be routed to, whichever
    /// way round the tuple is given.
    #[test]
    fn route_flow_agrees_with_route() {
        let r = Router::new(3);
        for port in 0..200u16 {
            let guest = SocketAddrV4::new(GUEST_IP, 80);
            let client = SocketAddrV4::new(REMOTE_IP, 30000 + port);
            let f = udp_frame(guest, client, b"x");
            let owner = r.route(&f, [HOST_IP; 2], HOST_MAC);
            assert_eq!(r.route_flow(IpProtocol::Udp, client, guest), owner);
            assert_eq!(r.route_flow(IpProtocol::Udp, guest, client), owner);
        }
    }

    #[test]
    fn flows_go_to_workers_and_the_control_plane_to_control() {
        let r = Router::new(2);
        let m = HOST_MAC;
        let mut seen = [0usize; 3];
        for port in 0..64u16 {
            let f = udp_frame(
                SocketAddrV4::new(GUEST_IP, 4000 + port),
                SocketAddrV4::new(REMOTE_IP, 53),
                b"x",
            );
            seen[r.route(&f, [HOST_IP; 2], m)] += 1;
        }
        assert_eq!(seen[2], 0, "no flow goes to control");
        assert!(seen[0] > 10 && seen[1] > 10, "flows spread: {seen:?}");
        // DNS and anything else to the virtual host, broadcasts, junk: control.
        let dns = udp_frame(
            SocketAddrV4::new(GUEST_IP, 4000),
            SocketAddrV4::new(HOST_IP, 53),
            b"q",
        );
        assert_eq!(r.route(&dns, [HOST_IP; 2], m), 2);
        let mut bcast = udp_frame(
            SocketAddrV4::new(GUEST_IP, 68),
            SocketAddrV4::new(Ipv4Addr::BROADCAST, 67),
            b"d",
        );
        bcast[..6].copy_from_slice(&[0xff; 6]);
        assert_eq!(r.route(&bcast, [HOST_IP; 2], m), 2);
        assert_eq!(r.route(b"short", [HOST_IP; 2], m), 2);
        assert_eq!(r.route(&[], [HOST_IP; 2], m), 2);
        // Truncated L4 header: control (which counts it as malformed).
        let f = udp_frame(
            SocketAddrV4::new(GUEST_IP, 4000),
            SocketAddrV4::new(REMOTE_IP, 9),
            b"x",
        );
        assert_eq!(r.route(&f[..14 + 20 + 2], [HOST_IP; 2], m), 2);
    }

    /// Everything to the DNS address is the virtual host's, as to its own address; without
    /// one, that address is a flow like any other.
    #[test]
    fn the_dns_address_is_the_control_threads() {
        let r = Router::new(2);
        let dns = Ipv4Addr::new(192, 168, 30, 3);
        let guest = SocketAddrV4::new(GUEST_IP, 4000);
        for port in [53, 80] {
            let f = udp_frame(guest, SocketAddrV4::new(dns, port), b"q");
            assert_eq!(r.route(&f, [HOST_IP, dns], HOST_MAC), 2, "port {port}");
            assert_eq!(r.route(&f, [dns, HOST_IP], HOST_MAC), 2, "port {port}");
        }
        let f = udp_frame(guest, SocketAddrV4::new(HOST_IP, 53), b"q");
        assert_eq!(r.route(&f, [HOST_IP, dns], HOST_MAC), 2);
        let to_dns = (0..64u16).map(|p| {
            let f = udp_frame(
                SocketAddrV4::new(GUEST_IP, 4000 + p),
                SocketAddrV4::new(dns, 53),
                b"q",
            );
            r.route(&f, [HOST_IP; 2], HOST_MAC)
        });
        assert!(
            to_dns.into_iter().all(|w| w < 2),
            "no DNS address, no exception"
        );
        let config = hubnat_core::Config::from_raw(
            &hubnat_core::config::RawConfig::from_toml("[dns]\naddress = \"192.168.30.3\"")
                .unwrap(),
        )
        .unwrap();
        assert_eq!(config.host_addresses(), [HOST_IP, dns]);
    }

    #[test]
    fn both_directions_hash_alike_and_fragments_go_to_control() {
        let r = Router::new(4);
        let m = HOST_MAC;
        let a = SocketAddrV4::new(GUEST_IP, 4000);
        let b = SocketAddrV4::new(REMOTE_IP, 80);
        let h1 = r.flow_hash(&udp_frame(a, b, b"x"), [HOST_IP; 2], m);
        let h2 = r.flow_hash(&udp_frame(b, a, b"x"), [HOST_IP; 2], m);
        assert!(h1.is_some());
        assert_eq!(h1, h2);
        let mut frag = udp_frame(a, b, b"x");
        frag[14 + 6] |= 0x20; // more fragments
        assert_eq!(r.route(&frag, [HOST_IP; 2], m), 4);
    }

    #[test]
    fn each_router_has_its_own_map_and_keeps_both_directions_together() {
        let flows: Vec<(Vec<u8>, Vec<u8>)> = (0..64u16)
            .map(|i| {
                let g = SocketAddrV4::new(GUEST_IP, 30000 + i);
                let r = SocketAddrV4::new(REMOTE_IP, 80);
                (udp_frame(g, r, b"x"), udp_frame(r, g, b"y"))
            })
            .collect();
        let map = |router: &Router| -> Vec<usize> {
            flows
                .iter()
                .map(|(out, back)| {
                    let w = router.route(out, [HOST_IP; 2], HOST_MAC);
                    let mut back = back.clone();
                    // The answer's frame as the router sees it: to the virtual host's MAC.
                    back[..6].copy_from_slice(&HOST_MAC.0);
                    assert_eq!(
                        router.route(&back, [HOST_IP; 2], HOST_MAC),
                        w,
                        "a flow split"
                    );
                    w
                })
                .collect()
        };
        let (a, b) = (Router::new(4), Router::new(4));
        assert_ne!(map(&a), map(&b), "two processes would share one flow map");
        let fixed = |s| Router::with_seeds(4, [s, 2, 3, 4]);
        assert_eq!(map(&fixed(1)), map(&fixed(1)));
    }
}
