//! The flow router: which thread owns a frame.
//!
//! Every frame from the port goes to one owner: a worker, chosen by a symmetric hash of its
//! flow's 5-tuple (both directions of a flow hash alike, so a flow's frames and its host
//! socket's answers meet on one worker; a TCP flow goes where `placement` put it, if it did),
//! or the control thread for everything that is not a NAT flow (ARP, DHCP, broadcasts,
//! anything addressed to the virtual host itself such as ping, at its own address or its DNS
//! address, IP fragments, other protocols). A DNS query to the virtual
//! host is a flow too, relayed by its worker, unless its name may be a guest's
//! (`hubnat_core::needs_lease_table`): only the control thread's engine has the lease table. The
//! seeds are random per process (a guest cannot aim its flows at one worker); the benchmarks
//! shard captures with this same hash, seeds fixed.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use smoltcp::wire::{EthernetFrame, EthernetProtocol, IpProtocol, Ipv4Packet, Ipv6Packet};

use hubnat_core::config::Mac;
use hubnat_core::Config;

use crate::placement::Placement;

/// Sends a flow's frames to its worker, everything else to the control thread.
#[derive(Clone)]
pub struct Router {
    /// The flow hash's keys (`tuple_hash`).
    seeds: [u64; 2],
    workers: usize,
    /// Where new TCP flows go (`placement`); None: every flow follows its hash.
    placement: Option<Arc<Placement>>,
}

/// What the router reads of a NAT flow's frame.
struct Flow {
    hash: u32,
    /// A TCP segment's flags (None for other protocols, or a header too short to hold them).
    tcp_flags: Option<u8>,
}

/// The multiplier of `mix`: odd, its bits well spread (2^64 divided by the golden ratio).
pub(crate) const MIX: u64 = 0x9e37_79b9_7f4a_7c15;

/// One round of the flow hash: the high half folded into the low, then a multiplication that
/// spreads every bit upward. Simple enough for the TAP's steering program to compute the same
/// (`port::steer`); keyed by the router's secret seeds, a guest cannot tell where its flows go.
pub(crate) fn mix(x: u64) -> u64 {
    (x ^ (x >> 32)).wrapping_mul(MIX)
}

impl Router {
    /// A router for `workers` workers with seeds of its own: the flow → worker map differs from
    /// process to process, so a guest cannot choose flows that all land on one worker.
    pub fn new(workers: usize) -> Router {
        Router::with_seeds(workers, Router::random_seeds())
    }

    /// Seeds for `with_seeds`, from the system's randomness.
    pub fn random_seeds() -> [u64; 4] {
        use rand::{Rng, SeedableRng};
        rand::rngs::StdRng::from_os_rng().random()
    }

    /// A router with fixed seeds (the same map on every run: the benchmarks).
    pub fn with_seeds(workers: usize, seeds: [u64; 4]) -> Router {
        Router {
            seeds: [
                seeds[0] ^ seeds[2].rotate_left(32),
                seeds[1] ^ seeds[3].rotate_left(32),
            ],
            workers: workers.max(1),
            placement: None,
        }
    }

    /// This router with new TCP flows placed by `placement` (shared by its clones).
    pub fn with_placement(mut self, placement: Arc<Placement>) -> Router {
        self.placement = Some(placement);
        self
    }

    /// The table placing new TCP flows, if there is one.
    pub fn placement(&self) -> Option<&Arc<Placement>> {
        self.placement.as_ref()
    }

    /// The keys of the flow hash, for the TAP's steering program (`port::steer::attach`).
    pub fn steering_seeds(&self) -> [u64; 2] {
        self.seeds
    }

    /// The control thread's index (the workers are 0..workers).
    pub fn control(&self) -> usize {
        self.workers
    }

    /// The owner of `frame`: a worker index, or `control()`. `cfg` says the virtual host's
    /// addresses (its own and its DNS address) and which DNS queries need the lease table.
    pub fn route(&self, frame: &[u8], cfg: &Config, host_mac: Mac) -> usize {
        let Some(flow) = self.flow(frame, cfg, host_mac) else {
            return self.control();
        };
        if let (Some(p), Some(flags)) = (&self.placement, flow.tcp_flags) {
            if let Some(w) = p.owner(flow.hash, flags) {
                return w;
            }
        }
        flow.hash as usize % self.workers
    }

    /// The symmetric hash of a NAT flow's 5-tuple (and a TCP segment's flags), or None for the
    /// control plane.
    fn flow(&self, frame: &[u8], cfg: &Config, host_mac: Mac) -> Option<Flow> {
        let eth = EthernetFrame::new_checked(frame).ok()?;
        if hubnat_core::wire::mac(eth.dst_addr()) != host_mac {
            return None;
        }
        match eth.ethertype() {
            EthernetProtocol::Ipv4 => {}
            EthernetProtocol::Ipv6 => return self.flow6(eth.payload(), cfg),
            _ => return None,
        }
        let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
        if ip.more_frags() || ip.frag_offset() != 0 {
            return None;
        }
        let hl = usize::from(ip.header_len());
        let l4 = eth.payload().get(hl..)?;
        let host_ips: [Ipv4Addr; 2] = cfg.host_addresses();
        if host_ips.contains(&ip.dst_addr()) && !relayed_dns(&ip, l4, cfg) {
            return None;
        }
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
        let src = SocketAddr::new(ip.src_addr().into(), sp);
        let dst = SocketAddr::new(ip.dst_addr().into(), dp);
        Some(self.flow_of(ip.next_header(), src, dst, l4))
    }

    fn flow_of(&self, proto: IpProtocol, src: SocketAddr, dst: SocketAddr, l4: &[u8]) -> Flow {
        Flow {
            hash: self.tuple_hash(proto, src, dst),
            tcp_flags: l4.get(13).copied().filter(|_| proto == IpProtocol::Tcp),
        }
    }

    /// `flow` of an IPv6 packet: a guest's TCP, UDP or echo request to an address off the
    /// segment (or a DNS query any engine relays). Extension headers, multicast, neighbour
    /// discovery and whatever is for the virtual host itself go to the control thread.
    fn flow6(&self, packet: &[u8], cfg: &Config) -> Option<Flow> {
        let ip = Ipv6Packet::new_checked(packet).ok()?;
        let dst = ip.dst_addr();
        if dst.is_multicast() {
            return None;
        }
        let l4 = ip.payload();
        let host = dst == cfg.ipv6.ip || hubnat_core::wire::is_link_local6(dst);
        let (sp, dp) = match ip.next_header() {
            IpProtocol::Tcp | IpProtocol::Udp => {
                if host && !relayed_dns6(ip.next_header(), l4, cfg) {
                    return None;
                }
                let p = l4.get(..4)?;
                (
                    u16::from_be_bytes([p[0], p[1]]),
                    u16::from_be_bytes([p[2], p[3]]),
                )
            }
            // Echo requests only: the rest of ICMPv6 is neighbour discovery and errors.
            IpProtocol::Icmpv6 if !host && l4.first() == Some(&128) => (0, 0),
            _ => return None,
        };
        let src = SocketAddr::new(ip.src_addr().into(), sp);
        let dst = SocketAddr::new(dst.into(), dp);
        Some(self.flow_of(ip.next_header(), src, dst, l4))
    }

    /// The owner of the flow between `a` and `b` (either way round): the worker its frames
    /// will be routed to (a forward's accepted connection is handed to it).
    pub fn route_flow(&self, proto: IpProtocol, a: SocketAddr, b: SocketAddr) -> usize {
        let h = self.tuple_hash(proto, a, b);
        match &self.placement {
            Some(p) if proto == IpProtocol::Tcp => p.claim(h, p.choose()),
            _ => h as usize % self.workers,
        }
    }

    /// A TCP connection between `a` and `b` entered (`opened`) or left the table of worker
    /// `worker`: its bucket's count in the placement table.
    pub fn tcp_flow_changed(&self, worker: usize, a: SocketAddr, b: SocketAddr, opened: bool) {
        if let Some(p) = &self.placement {
            let h = self.tuple_hash(IpProtocol::Tcp, a, b);
            if opened {
                p.opened(h, worker);
            } else {
                p.closed(h, worker);
            }
        }
    }

    /// The flow hash of the flow between `a` and `b` (either way round).
    #[cfg(test)]
    pub(crate) fn flow_hash_of(&self, proto: IpProtocol, a: SocketAddr, b: SocketAddr) -> u32 {
        self.tuple_hash(proto, a, b)
    }

    /// The flow hash: each end's key (its address, an IPv6 one folded to 64 bits, shifted
    /// over its port), the smaller first, then the protocol, each folded in by `mix` under the
    /// seeds. `port::steer` computes the same in the kernel: change both together.
    fn tuple_hash(&self, proto: IpProtocol, a: SocketAddr, b: SocketAddr) -> u32 {
        let key = |s: SocketAddr| {
            let ip = match s.ip() {
                IpAddr::V4(ip) => u64::from(u32::from(ip)),
                IpAddr::V6(ip) => {
                    let v = u128::from(ip);
                    ((v >> 64) as u64) ^ (v as u64)
                }
            };
            (ip << 16) ^ u64::from(s.port())
        };
        let (a, b) = (key(a), key(b));
        let h = mix(self.seeds[0] ^ a.min(b));
        let h = mix(h ^ a.max(b));
        let h = mix(h ^ u64::from(u8::from(proto)) ^ self.seeds[1]);
        (h >> 32) as u32
    }
}

/// Whether the datagram in `ip` (transport header and payload `l4`) is a DNS query to the
/// virtual host that any engine relays or answers alike.
fn relayed_dns(ip: &Ipv4Packet<&[u8]>, l4: &[u8], cfg: &Config) -> bool {
    relayed_dns6(ip.next_header(), l4, cfg)
}

/// `relayed_dns` of a datagram of protocol `proto` (either family).
fn relayed_dns6(proto: IpProtocol, l4: &[u8], cfg: &Config) -> bool {
    if proto != IpProtocol::Udp || l4.len() < 8 || l4[2..4] != 53u16.to_be_bytes() {
        return false;
    }
    let len = usize::from(u16::from_be_bytes([l4[4], l4[5]]));
    let Some(payload) = l4.get(8..len.max(8)) else {
        return false;
    };
    !hubnat_core::needs_lease_table(cfg, payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hubnat_core::testing::*;
    use std::net::SocketAddrV4;

    fn config(toml: &str) -> Config {
        Config::from_raw(&hubnat_core::config::RawConfig::from_toml(toml).unwrap()).unwrap()
    }

    fn plain() -> Config {
        config("")
    }

    /// A standard query for `name`, type A.
    fn query(name: &str) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.') {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        q
    }

    /// A forward's connection is handed to the worker its frames will be routed to, whichever
    /// way round the tuple is given.
    #[test]
    fn route_flow_agrees_with_route() {
        let r = Router::new(3);
        for port in 0..200u16 {
            let guest = SocketAddrV4::new(GUEST_IP, 80);
            let client = SocketAddrV4::new(REMOTE_IP, 30000 + port);
            let f = udp_frame(guest, client, b"x");
            let owner = r.route(&f, &plain(), HOST_MAC);
            assert_eq!(
                r.route_flow(IpProtocol::Udp, client.into(), guest.into()),
                owner
            );
            assert_eq!(
                r.route_flow(IpProtocol::Udp, guest.into(), client.into()),
                owner
            );
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
            seen[r.route(&f, &plain(), m)] += 1;
        }
        assert_eq!(seen[2], 0, "no flow goes to control");
        assert!(seen[0] > 10 && seen[1] > 10, "flows spread: {seen:?}");
        // Anything else to the virtual host, broadcasts, junk: control.
        let ping = udp_frame(
            SocketAddrV4::new(GUEST_IP, 4000),
            SocketAddrV4::new(HOST_IP, 7),
            b"q",
        );
        assert_eq!(r.route(&ping, &plain(), m), 2);
        let mut bcast = udp_frame(
            SocketAddrV4::new(GUEST_IP, 68),
            SocketAddrV4::new(Ipv4Addr::BROADCAST, 67),
            b"d",
        );
        bcast[..6].copy_from_slice(&[0xff; 6]);
        assert_eq!(r.route(&bcast, &plain(), m), 2);
        assert_eq!(r.route(b"short", &plain(), m), 2);
        assert_eq!(r.route(&[], &plain(), m), 2);
        // Truncated L4 header: control (which counts it as malformed).
        let f = udp_frame(
            SocketAddrV4::new(GUEST_IP, 4000),
            SocketAddrV4::new(REMOTE_IP, 9),
            b"x",
        );
        assert_eq!(r.route(&f[..14 + 20 + 2], &plain(), m), 2);
    }

    /// DNS queries to the virtual host, at either of its addresses, are relayed by the worker
    /// of their flow, unless the name may be a guest's (one label, the DHCP domain, a reverse
    /// name): those need the lease table, the control thread's. Anything else to the DNS
    /// address is the virtual host's too; without one, that address is a flow like any other.
    #[test]
    fn dns_queries_go_to_workers_unless_a_guests_name_may_answer() {
        let r = Router::new(2);
        let dns = Ipv4Addr::new(192, 168, 30, 3);
        let cfg = config("[dns]\naddress = \"192.168.30.3\"\n[dhcp]\ndomain = \"Lan.\"");
        assert_eq!(cfg.host_addresses(), [HOST_IP, dns]);
        let ask = |to: Ipv4Addr, port: u16, name: &str| {
            let f = udp_frame(
                SocketAddrV4::new(GUEST_IP, 4000 + port),
                SocketAddrV4::new(to, 53),
                &query(name),
            );
            r.route(&f, &cfg, HOST_MAC)
        };
        for to in [HOST_IP, dns] {
            let spread: Vec<usize> = (0..64).map(|p| ask(to, p, "www.example.org")).collect();
            assert!(spread.iter().all(|&w| w < 2), "{spread:?}");
            assert!(spread.contains(&0) && spread.contains(&1), "{spread:?}");
            for local in [
                "vm1",
                "vm1.lan",
                "VM1.LAN",
                "lan",
                "4.30.168.192.in-addr.arpa",
                "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.e.1.0.0.1.6.e.6.2.6.5.7.8.6.d.f.ip6.arpa",
            ] {
                assert_eq!(ask(to, 1, local), 2, "{local}");
            }
            // Not the domain, only a name ending like it; nor a reverse zone.
            assert!(ask(to, 1, "vm1.island") < 2);
            assert!(ask(to, 1, "myip6.arpa") < 2);
        }
        // Not a DNS query at all, or to another port: control.
        let odd = udp_frame(
            SocketAddrV4::new(GUEST_IP, 4000),
            SocketAddrV4::new(HOST_IP, 53),
            b"q",
        );
        assert!(
            r.route(&odd, &cfg, HOST_MAC) < 2,
            "relayed: the relay refuses it"
        );
        let f = udp_frame(
            SocketAddrV4::new(GUEST_IP, 4000),
            SocketAddrV4::new(dns, 80),
            b"q",
        );
        assert_eq!(r.route(&f, &cfg, HOST_MAC), 2);
        let to_dns = (0..64u16).map(|p| {
            let f = udp_frame(
                SocketAddrV4::new(GUEST_IP, 4000 + p),
                SocketAddrV4::new(dns, 80),
                b"q",
            );
            r.route(&f, &plain(), HOST_MAC)
        });
        assert!(
            to_dns.into_iter().all(|w| w < 2),
            "no DNS address, no exception"
        );
    }

    #[test]
    fn ipv6_flows_hash_alike_and_the_control_plane_stays_on_control() {
        use std::net::SocketAddrV6;
        let r = Router::new(4);
        let m = HOST_MAC;
        let a = SocketAddrV6::new(guest_ip6(), 4000, 0, 0);
        let b = SocketAddrV6::new(remote_ip6(), 80, 0, 0);
        let h1 = r.flow(&udp6_frame(a, b, b"x"), &plain(), m).map(|f| f.hash);
        let h2 = r.flow(&udp6_frame(b, a, b"x"), &plain(), m).map(|f| f.hash);
        assert!(h1.is_some());
        assert_eq!(h1, h2);
        // The hash is of the 5-tuple: another port is (almost surely) another flow.
        let c = SocketAddrV6::new(remote_ip6(), 81, 0, 0);
        assert_ne!(
            h1,
            r.flow(&udp6_frame(a, c, b"x"), &plain(), m).map(|f| f.hash)
        );
        // To the virtual host (not DNS), multicast, fragments, neighbour discovery: control.
        let host = SocketAddrV6::new(plain().ipv6.ip, 7, 0, 0);
        let all_nodes = SocketAddrV6::new("ff02::1".parse().unwrap(), 7, 0, 0);
        let frag = ipv6_frame(
            guest_ip6(),
            remote_ip6(),
            44,
            64,
            &[17, 0, 0, 1, 0, 0, 0, 9],
        );
        let ns = ipv6_frame(guest_ip6(), plain().ipv6.ip, 58, 255, &[135, 0, 0, 0]);
        for f in [
            udp6_frame(a, host, b"x"),
            udp6_frame(a, all_nodes, b"x"),
            frag,
            ns,
        ] {
            assert_eq!(r.route(&f, &plain(), m), 4);
        }
        // A DNS query to the virtual host's IPv6 address is a flow, as over IPv4.
        let dns = SocketAddrV6::new(plain().ipv6.ip, 53, 0, 0);
        assert!(r.route(&udp6_frame(a, dns, &query("www.example.org")), &plain(), m) < 4);
    }

    #[test]
    fn both_directions_hash_alike_and_fragments_go_to_control() {
        let r = Router::new(4);
        let m = HOST_MAC;
        let a = SocketAddrV4::new(GUEST_IP, 4000);
        let b = SocketAddrV4::new(REMOTE_IP, 80);
        let h1 = r.flow(&udp_frame(a, b, b"x"), &plain(), m).map(|f| f.hash);
        let h2 = r.flow(&udp_frame(b, a, b"x"), &plain(), m).map(|f| f.hash);
        assert!(h1.is_some());
        assert_eq!(h1, h2);
        let mut frag = udp_frame(a, b, b"x");
        frag[14 + 6] |= 0x20; // more fragments
        assert_eq!(r.route(&frag, &plain(), m), 4);
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
                    let w = router.route(out, &plain(), HOST_MAC);
                    let mut back = back.clone();
                    // The answer's frame as the router sees it: to the virtual host's MAC.
                    back[..6].copy_from_slice(&HOST_MAC.0);
                    assert_eq!(router.route(&back, &plain(), HOST_MAC), w, "a flow split");
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
