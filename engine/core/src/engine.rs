//! The core: one frame (or socket event, or tick) in, frames and socket operations out.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;

use rand::rngs::SmallRng;
use rand::SeedableRng;
use smoltcp::wire::{
    EthernetFrame, EthernetProtocol, IpProtocol, Ipv4Packet, UdpPacket, DHCP_SERVER_PORT,
};

use crate::config::{Config, Mac};
use crate::event::{Event, Events};
use crate::nat::{InboundRefused, InboundTarget, Nat, Proto, SessionInfo};
use crate::output::FrameBatch;
use crate::sockio::{SockEvent, SockId, SockIo};
use crate::stats::{DropReason, Stats};
use crate::time::{earliest, Instant};
use crate::vhost::arp::{self, ArpCache, ArpIdentity};
use crate::vhost::bindings::{Bindings, BoundBy, ClaimRefused, Sources};
use crate::vhost::dhcp::DhcpServer;
use crate::vhost::dhcp6;
use crate::vhost::dhcp6::DhcpServer6;
use crate::vhost::dns::{DnsRelay, TcpDnsRoute};
use crate::vhost::icmp;
use crate::vhost::ndp::{self, Ndp};
use crate::wire::{Ipv6View, IPV4_HEADER_LEN};

/// What every part of the core shares: the configuration, the virtual host's identity, the
/// neighbour table, counters, and the injected randomness.
pub struct Ctx {
    /// The configuration in force.
    pub cfg: Config,
    /// The virtual host's MAC (chosen by the caller when the configuration leaves it to chance).
    pub mac: Mac,
    pub(crate) arp: ArpCache,
    /// IPv6 neighbours and the router advertisements' schedule (`vhost::ndp`).
    pub(crate) ndp: Ndp,
    /// What this engine counted: frames, bytes, drops.
    pub stats: Stats,
    /// The one source of randomness of the core, seeded by the caller.
    pub rng: SmallRng,
    ip_ident: u16,
    /// The last NAT session id drawn by a lone engine (one that shares no `SharedSessions`).
    session_id: u32,
    /// The ids and limits shared with the other engines of a multi-worker runtime.
    shared: Option<Arc<dyn SharedSessions>>,
    /// Which MAC may send from which address (`vhost::bindings`).
    pub(crate) sources: Sources,
    /// Each guest's rate of new sessions (`nat.new_sessions_per_second`).
    new_sessions: crate::nat::rate::NewSessions,
    /// The lease table's generation the source bindings were last brought in line with.
    leases_bound: u64,
    /// The DHCPv6 lease table's binding generation they were last brought in line with.
    leases6_bound: u64,
    /// What happened, waiting for `Engine::poll_event`.
    pub(crate) events: Events,
    /// Where a guest's DNS over TCP to the virtual host is carried: the runtime's listener
    /// that answers local names and passes the rest on (see `Engine::route_tcp_dns`), or,
    /// without one, straight to the first upstream resolver.
    pub dns_over_tcp: Option<std::net::SocketAddr>,
    /// The port takes TCP super-frames toward the guest (a TAP whose frames carry virtio-net
    /// headers): a connection sends up to 64 KiB a frame, which the guest's side of the port
    /// cuts into segments of the connection's MSS (`FrameBatch::iter_gso`).
    pub tcp_gso: bool,
    /// The port takes UDP super-frames toward the guest too (a TAP that accepted USO): runs
    /// of datagrams of one size that a session's socket had waiting reach the guest in one
    /// frame, which its side of the port cuts back into the datagrams (`FrameBatch::iter_gso`).
    pub udp_gso: bool,
    /// The frame being handled came with its TCP or UDP checksum left to the port (a TAP with
    /// offloads, `Engine::handle_frame_checksum_left`): not verified.
    pub(crate) l4_checksum_left: bool,
}

/// The session accounting the engines of a multi-worker runtime share: one sequence of session
/// ids and the session limits counted across them. The core only asks; the runtime implements it
/// (with whatever synchronisation it needs), so the core itself stays free of locks and atomics.
///
/// Counts are taken when a session is created or ends, never per frame.
pub trait SharedSessions: Send + Sync {
    /// The id of the next NAT session, never 0, unique across the engines sharing this.
    fn next_session_id(&self) -> u32;
    /// Counts a new session of `proto` for `guest`, unless `total` sessions of `proto` or
    /// `per_guest` of them for `guest` are already counted; false then.
    fn admit(&self, proto: Proto, guest: IpAddr, total: usize, per_guest: usize) -> bool;
    /// Ends what `admit` counted.
    fn release(&self, proto: Proto, guest: IpAddr);
    /// Takes a half-open (connecting) TCP slot for `guest` unless `max` are taken, or
    /// `per_guest` of them by `guest`.
    fn admit_half_open(&self, guest: IpAddr, max: usize, per_guest: usize) -> bool;
    /// Gives back what `admit_half_open` took.
    fn release_half_open(&self, guest: IpAddr);
    /// TCP connections connecting to their destination, across the engines.
    fn half_open(&self) -> usize;
    /// Sessions of `proto` counted for `guest`.
    fn count(&self, proto: Proto, guest: IpAddr) -> usize;
    /// Changes whenever the source bindings change (engines copy them again then).
    fn bindings_generation(&self) -> u64;
    /// A copy of the source bindings.
    fn bindings(&self) -> Bindings;
    /// Binds `ip` to `mac` by first use if it is free (`Bindings::claim`); true when bound.
    fn claim_binding(&self, now: Instant, mac: Mac, ip: Ipv4Addr) -> bool;
    /// Binds `ip` to `mac` for a lease or the configuration.
    fn bind(&self, now: Instant, ip: Ipv4Addr, mac: Mac, by: BoundBy);
    /// Ends a binding of kind `by`.
    fn unbind(&self, ip: Ipv4Addr, by: BoundBy);
    /// Records that a bound address is still in use.
    fn touch_binding(&self, now: Instant, ip: Ipv4Addr);

    // IPv6 source bindings (`Sources::check6`). The defaults share none: each engine then keeps
    // its own, which is enough while every IPv6 frame goes to one engine.

    /// Changes whenever the IPv6 source bindings change; `None` when they are not shared.
    fn bindings6_generation(&self) -> Option<u64> {
        None
    }
    /// A copy of the IPv6 source bindings.
    fn bindings6(&self) -> Bindings<Ipv6Addr> {
        Bindings::default()
    }
    /// Binds `ip` to `mac` by first use if it is free (`Bindings::try_claim`).
    fn claim_binding6(&self, _now: Instant, _mac: Mac, _ip: Ipv6Addr) -> Result<(), ClaimRefused> {
        Ok(())
    }
    /// Binds the IPv6 address `ip` to `mac` for a lease or the configuration.
    fn bind6(&self, _now: Instant, _ip: Ipv6Addr, _mac: Mac, _by: BoundBy) {}
    /// Ends an IPv6 binding of kind `by`.
    fn unbind6(&self, _ip: Ipv6Addr, _by: BoundBy) {}
    /// Records that a bound IPv6 address is still in use.
    fn touch_binding6(&self, _now: Instant, _ip: Ipv6Addr) {}
}

impl Ctx {
    /// The IPv4 identification for the next packet the virtual host originates.
    pub(crate) fn next_ident(&mut self) -> u16 {
        self.ip_ident = self.ip_ident.wrapping_add(1);
        self.ip_ident
    }

    /// The id of the next NAT session (one sequence for every protocol, as the seed's log shows).
    pub(crate) fn next_session_id(&mut self) -> u32 {
        if let Some(s) = &self.shared {
            return s.next_session_id();
        }
        self.session_id = self.session_id.wrapping_add(1);
        if self.session_id == 0 {
            self.session_id = 1;
        }
        self.session_id
    }

    /// Makes this context draw session ids from `shared` and count its sessions there, with the
    /// other engines of a runtime (its workers), so that ids stay unique and the session limits
    /// hold across them.
    pub fn share_sessions(&mut self, shared: Arc<dyn SharedSessions>) {
        self.sources.share(Arc::clone(&shared));
        self.shared = Some(shared);
    }

    /// Whether `mac` may send from `ip` (`nat.source_check`); a refusal is counted as spoofed.
    pub(crate) fn source_ok(&mut self, now: Instant, mac: Mac, ip: Ipv4Addr) -> bool {
        let mode = self.cfg.nat.source_check;
        self.sources.check(mode, now, mac, ip)
    }

    pub(crate) fn host_ip(&self) -> Ipv4Addr {
        self.cfg.host.ip
    }

    /// Counts a new NAT session of `proto` for `guest`: false when the guest opens sessions
    /// faster than `nat.new_sessions_per_second`, or, across the engines of a multi-worker
    /// runtime (`share_sessions`), when `nat.max_sessions` or `nat.max_sessions_per_guest` is
    /// reached (a lone engine's protocols check their own tables for those).
    pub(crate) fn admit_session(&mut self, now: Instant, proto: Proto, guest: IpAddr) -> bool {
        let rate = self.cfg.nat.new_sessions_per_second;
        if !self.new_sessions.admit(now, guest, rate) {
            return false;
        }
        match &self.shared {
            Some(l) => l.admit(
                proto,
                guest,
                self.cfg.nat.max_sessions,
                self.cfg.nat.max_sessions_per_guest,
            ),
            None => true,
        }
    }

    /// Ends what `admit_session` counted.
    pub(crate) fn release_session(&self, proto: Proto, guest: IpAddr) {
        if let Some(l) = &self.shared {
            l.release(proto, guest);
        }
    }

    /// Takes a slot of `nat.max_half_open` shared by the engines of a multi-worker runtime (a
    /// TCP connection whose sock-side connect is in progress); false when they are all taken. Always
    /// true for a lone engine (TCP counts its own).
    pub(crate) fn admit_half_open(&self, guest: IpAddr) -> bool {
        let nat = &self.cfg.nat;
        match &self.shared {
            Some(l) => l.admit_half_open(guest, nat.max_half_open, nat.max_half_open_per_guest),
            None => true,
        }
    }

    /// Gives back what `admit_half_open` took.
    pub(crate) fn release_half_open(&self, guest: IpAddr) {
        if let Some(l) = &self.shared {
            l.release_half_open(guest);
        }
    }

    /// Whether `ip` is one of the addresses the virtual host itself answers for (its own and
    /// the DNS address).
    pub(crate) fn is_host_address(&self, ip: Ipv4Addr) -> bool {
        self.cfg.is_host_address(ip)
    }

    /// The MAC of the guest at `ip`, as the neighbour tables know it (ARP for IPv4, neighbour
    /// discovery for IPv6).
    pub(crate) fn neighbour(&self, ip: IpAddr) -> Option<Mac> {
        match ip {
            IpAddr::V4(ip) => self.arp.lookup(ip),
            IpAddr::V6(ip) => self.ndp_lookup(ip),
        }
    }
}

/// Whether `frame` is an Ethernet frame of IPv6 (what the counters by family count).
fn is_ipv6_frame(frame: &[u8]) -> bool {
    frame.get(12..14) == Some(&[0x86, 0xdd][..])
}

/// Gives a guest's DNS query the NAT handed back (`query`, if any) to the virtual host's relay.
#[allow(clippy::too_many_arguments)]
fn relay_query(
    dns: &mut DnsRelay,
    ctx: &mut Ctx,
    dhcp: &DhcpServer,
    now: Instant,
    query: Option<crate::nat::DnsQuery>,
    io: &mut impl SockIo,
    out: &mut FrameBatch,
) -> Result<(), DropReason> {
    match query {
        Some(q) => dns.handle_query(now, ctx, dhcp, q.guest, q.server, q.query, io, out),
        None => Ok(()),
    }
}

/// What `Engine::reassemble` did with a frame.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Reassembly {
    /// Not an IPv4 fragment for the NAT: untouched and not counted; `handle_frame` it.
    NotFragment,
    /// A fragment, counted and kept (or dropped and counted as such); nothing more to do.
    Taken,
    /// The fragment completed its datagram, now in the caller's buffer as an Ethernet frame:
    /// give it to `handle_reassembled` of the engine that owns its flow.
    Whole,
}

/// The whole core of one segment: the virtual host and the NAT, driven by frames, socket
/// events and time (see the crate's documentation).
pub struct Engine {
    /// What every part shares: configuration, MAC, counters, randomness.
    pub ctx: Ctx,
    /// The virtual DHCP server and its lease table.
    pub dhcp: DhcpServer,
    /// The virtual DHCPv6 server and its IA_NA lease table.
    pub dhcp6: DhcpServer6,
    /// The virtual host's DNS relay: a control-plane job, fed the queries the NAT hands back.
    pub(crate) dns: DnsRelay,
    /// The user-mode NAT: fragment reassembly, UDP and TCP sessions.
    pub nat: Nat,
}

impl Engine {
    /// `mac` is the virtual host's MAC; `seed` seeds every random choice the core makes.
    pub fn new(cfg: Config, mac: Mac, seed: u64) -> Engine {
        let dhcp = DhcpServer::new(&cfg.dhcp);
        let dhcp6 = DhcpServer6::new(&cfg.ipv6);
        let nat = Nat::new(&cfg);
        let dns = DnsRelay::new(&cfg);
        let mut e = Engine {
            ctx: Ctx {
                cfg,
                mac,
                arp: ArpCache::default(),
                ndp: Ndp::new(seed),
                stats: Stats::default(),
                rng: SmallRng::seed_from_u64(seed),
                ip_ident: 0,
                session_id: 0,
                shared: None,
                sources: Sources::default(),
                new_sessions: Default::default(),
                leases_bound: 0,
                leases6_bound: 0,
                events: Events::default(),
                dns_over_tcp: None,
                tcp_gso: false,
                udp_gso: false,
                l4_checksum_left: false,
            },
            dhcp,
            dhcp6,
            dns,
            nat,
        };
        e.bind_static(Instant::ZERO, &[]);
        e
    }

    /// Binds the configuration's static bindings, ending those of `old` that it no longer has.
    fn bind_static(&mut self, now: Instant, old: &[(Mac, Ipv4Addr)]) {
        for (_, ip) in old {
            self.ctx.sources.unbind(*ip, BoundBy::Static);
        }
        for (mac, ip) in self.ctx.cfg.nat.bindings.clone() {
            self.ctx.sources.bind(now, ip, mac, BoundBy::Static);
        }
    }

    /// Brings the source bindings in line with the lease table when it changed (a cheap
    /// comparison otherwise). Only the engine that runs DHCP has leases to bind.
    fn bind_leases(&mut self, now: Instant) {
        let generation6 = self.dhcp6.binding_generation();
        if generation6 != self.ctx.leases6_bound {
            self.ctx.leases6_bound = generation6;
            let leases: Vec<(Ipv6Addr, Mac)> = self.dhcp6.leases().map(|l| (l.ip, l.mac)).collect();
            self.ctx.sources.sync_leases6(now, &leases);
        }
        let generation = self.dhcp.generation();
        if generation == self.ctx.leases_bound {
            return;
        }
        self.ctx.leases_bound = generation;
        let leases: Vec<(Ipv4Addr, Mac)> = self.dhcp.leases().map(|l| (l.ip, l.mac)).collect();
        self.ctx.sources.sync_leases(now, &leases);
    }

    /// What to do with one DNS query a guest sent over TCP to the virtual host (the message
    /// without its length prefix): answered here (a local name; SERVFAIL with no usable
    /// upstream) or passed to an upstream. `None`: not a query; the connection should end.
    pub fn route_tcp_dns(&mut self, now: Instant, query: &[u8]) -> Option<TcpDnsRoute> {
        self.dns
            .route_tcp_query(now, &mut self.ctx, &self.dhcp, query)
    }

    /// The seed's NAT table: every session of every protocol, the DNS relay's queries in flight
    /// among them (`Proto::Dns`), by id.
    pub fn sessions(&self) -> Vec<SessionInfo> {
        let mut v = Vec::new();
        self.nat.sessions(&mut v);
        self.dns.sessions(&mut v);
        v.sort_by_key(|s| s.id);
        v
    }

    /// How many sessions `sessions()` would list, per protocol (indexed by `Proto::index`),
    /// without building the list.
    pub fn session_counts(&self) -> [usize; 4] {
        let mut n = self.nat.session_counts();
        n[Proto::Dns.index()] = self.dns.pending();
        n
    }

    /// How many of the NAT's sessions (TCP, UDP, ICMP; not the DNS relay's queries) are of
    /// IPv6 guests: the operator's count by family.
    pub fn ipv6_sessions(&self) -> usize {
        self.nat.ipv6_sessions()
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.ctx.cfg
    }

    /// The counters of this engine.
    pub fn stats(&self) -> &Stats {
        &self.ctx.stats
    }

    /// The next event the core has to report, oldest first; `None` when there is none. The
    /// caller drains them after each batch: the queue holds `event::QUEUE` at most, and drops
    /// (and counts) what comes past that.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.ctx.events.pop()
    }

    /// Events dropped because the caller did not drain them in time.
    #[cfg(test)]
    pub(crate) fn events_lost(&self) -> u64 {
        self.ctx.events.lost()
    }

    /// The virtual host comes up: announce it with a gratuitous ARP (for its DNS address
    /// too); its IPv6 router advertisements begin (the first comes a few seconds later, on
    /// `handle_timeout`). Only the engine that is started advertises: a runtime starts its
    /// control thread's.
    pub fn start(&mut self, now: Instant, out: &mut FrameBatch) {
        ndp::start(now, &mut self.ctx);
        if self.ctx.cfg.enabled {
            arp::push_gratuitous(out, self.ctx.mac, self.ctx.cfg.host.ip);
            if let Some(dns) = self.ctx.cfg.dns.address {
                arp::push_gratuitous(out, self.ctx.mac, dns);
            }
        }
    }

    /// Applies a new, validated configuration at once, keeping everything it does not concern:
    /// NAT sessions stay open (NAT off stops new ones and stops carrying guests' packets, as the
    /// NAT does whenever it is off); DHCP leases stay unless the new range excludes them; the
    /// virtual host announces itself again when its address, its MAC or SecureNAT as a whole
    /// changed. Settings fixed at start (the MTU of the port, the ICMP mode, the state directory,
    /// the control settings) keep their running values; their names are returned, to be applied
    /// by a restart.
    pub fn reconfigure(
        &mut self,
        now: Instant,
        mut new: Config,
        _io: &mut impl SockIo,
        out: &mut FrameBatch,
    ) -> Vec<&'static str> {
        let old = &self.ctx.cfg;
        let mut restart = Vec::new();
        if new.nat.mtu != old.nat.mtu {
            restart.push("nat.mtu");
            new.nat.mtu = old.nat.mtu;
        }
        if new.nat.icmp != old.nat.icmp {
            restart.push("nat.icmp");
            new.nat.icmp = old.nat.icmp;
        }
        if new.state_dir != old.state_dir {
            restart.push("state_dir");
            new.state_dir = old.state_dir.clone();
        }
        if new.control != old.control {
            restart.push("control");
            new.control = old.control.clone();
        }
        let mac = new.host.mac.unwrap_or(self.ctx.mac);
        new.host.mac = Some(mac);
        let announce =
            new.enabled && (!old.enabled || new.host.ip != old.host.ip || mac != self.ctx.mac);
        // A guest may still have the DNS address at another MAC (a host that had it before).
        let announce_dns = new
            .dns
            .address
            .filter(|_| new.enabled && (announce || new.dns.address != old.dns.address));
        if new.dhcp != old.dhcp {
            self.dhcp.reconfigure(&new.dhcp, &mut self.ctx.events);
        }
        if new.ipv6 != old.ipv6 {
            self.dhcp6.reconfigure(&new.ipv6, &mut self.ctx.events);
        }
        self.dns.reconfigured();
        let timeouts = (new.nat.udp_timeout, new.nat.tcp_timeout)
            != (old.nat.udp_timeout, old.nat.tcp_timeout);
        let old_mac = std::mem::replace(&mut self.ctx.mac, mac);
        let old_cfg = std::mem::replace(&mut self.ctx.cfg, new);
        if old_cfg.nat.bindings != self.ctx.cfg.nat.bindings {
            self.bind_static(now, &old_cfg.nat.bindings);
        }
        self.bind_leases(now);
        if timeouts {
            self.nat.timeouts_changed(&self.ctx);
        }
        let before = out.len();
        if announce {
            arp::push_gratuitous(out, self.ctx.mac, self.ctx.cfg.host.ip);
        }
        if let Some(dns) = announce_dns {
            arp::push_gratuitous(out, self.ctx.mac, dns);
        }
        ndp::reconfigured(now, &mut self.ctx, &old_cfg, old_mac, out);
        self.count_out(out, before);
        restart
    }

    /// Handles one frame from the segment.
    pub fn handle_frame(
        &mut self,
        now: Instant,
        frame: &[u8],
        io: &mut impl SockIo,
        out: &mut FrameBatch,
    ) {
        self.ctx.stats.frames_in += 1;
        self.ctx.stats.bytes_in += frame.len() as u64;
        self.ctx.stats.frames_in_ipv6 += u64::from(is_ipv6_frame(frame));
        let before = out.len();
        if let Err(why) = self.dispatch_frame(now, frame, io, out) {
            self.ctx.stats.drop(why);
        }
        self.bind_leases(now);
        self.count_out(out, before);
    }

    /// `handle_frame` for a frame whose TCP or UDP checksum the guest left to the port, whose
    /// field holds only the pseudo-header's sum: the guest's kernel wrote the frame from memory
    /// and handed it over without a wire, so there is nothing for the checksum to catch, and
    /// it is not verified (completing it would cost a pass over the payload, 64 KiB for a TCP
    /// super-segment). Any other checksum of the frame (IPv4's, ICMP's) is.
    pub fn handle_frame_checksum_left(
        &mut self,
        now: Instant,
        frame: &[u8],
        io: &mut impl SockIo,
        out: &mut FrameBatch,
    ) {
        self.ctx.l4_checksum_left = true;
        self.handle_frame(now, frame, io, out);
        self.ctx.l4_checksum_left = false;
    }

    /// Reassembly for a runtime whose NAT flows live on several engines: when `frame` is an
    /// IP fragment (IPv4, or IPv6 with a fragment header) addressed to the virtual host's MAC,
    /// it is checked and added to this engine's reassembly (and counted as a frame in); when
    /// it completes its datagram, `whole`
    /// receives the datagram as one Ethernet frame (the fragment's Ethernet header, the
    /// reassembled packet: up to 65535 + 14 bytes, 40 more for IPv6), to be handled with
    /// `handle_reassembled` by whichever engine owns the datagram's flow. Any other frame is
    /// left for `handle_frame`.
    pub fn reassemble(&mut self, now: Instant, frame: &[u8], whole: &mut Vec<u8>) -> Reassembly {
        if !self.is_nat_fragment(frame) {
            return Reassembly::NotFragment;
        }
        self.ctx.stats.frames_in += 1;
        self.ctx.stats.bytes_in += frame.len() as u64;
        self.ctx.stats.frames_in_ipv6 += u64::from(is_ipv6_frame(frame));
        match self.reassemble_fragment(now, frame, whole) {
            Ok(true) => Reassembly::Whole,
            Ok(false) => Reassembly::Taken,
            Err(why) => {
                self.ctx.stats.drop(why);
                Reassembly::Taken
            }
        }
    }

    fn is_nat_fragment(&self, frame: &[u8]) -> bool {
        let Ok(eth) = EthernetFrame::new_checked(frame) else {
            return false;
        };
        if !self.ctx.cfg.enabled || crate::wire::mac(eth.dst_addr()) != self.ctx.mac {
            return false;
        }
        match eth.ethertype() {
            EthernetProtocol::Ipv4 => Ipv4Packet::new_checked(eth.payload())
                .is_ok_and(|ip| ip.more_frags() || ip.frag_offset() != 0),
            EthernetProtocol::Ipv6 if self.ctx.cfg.ipv6.enabled => {
                Ipv6View::parse(eth.payload()).is_ok_and(|ip| !ip.is_whole())
            }
            _ => false,
        }
    }

    fn reassemble_fragment(
        &mut self,
        now: Instant,
        frame: &[u8],
        whole: &mut Vec<u8>,
    ) -> Result<bool, DropReason> {
        let eth = EthernetFrame::new_checked(frame).map_err(|_| DropReason::Malformed)?;
        let src_mac = crate::wire::mac(eth.src_addr());
        if src_mac == self.ctx.mac || src_mac.0[0] & 1 != 0 {
            return Err(DropReason::Foreign);
        }
        let bytes = eth.payload();
        if eth.ethertype() == EthernetProtocol::Ipv6 {
            let ip = Ipv6View::parse(bytes)?;
            crate::vhost::ndp::admit_source(now, &mut self.ctx, src_mac, &ip)?;
            let Some(datagram) = self.nat.frag.add6(now, &ip)? else {
                return Ok(false);
            };
            whole.clear();
            whole.extend_from_slice(&frame[..smoltcp::wire::ETHERNET_HEADER_LEN]);
            whole.extend_from_slice(datagram);
            return Ok(true);
        }
        let ip = Ipv4Packet::new_checked(bytes).map_err(|_| DropReason::Malformed)?;
        if ip.version() != 4 || (ip.header_len() as usize) < IPV4_HEADER_LEN {
            return Err(DropReason::Malformed);
        }
        if !ip.verify_checksum() {
            return Err(DropReason::BadChecksum);
        }
        let ip = Ipv4Packet::new_unchecked(&bytes[..ip.total_len() as usize]);
        let src = ip.src_addr();
        if self.ctx.cfg.in_subnet(src) && !self.ctx.is_host_address(src) {
            if !self.ctx.source_ok(now, src_mac, src) {
                return Err(DropReason::Spoofed);
            }
            self.ctx.arp.learn(now, src, src_mac);
        }
        let Some(datagram) = self.nat.frag.add(now, &ip)? else {
            return Ok(false);
        };
        whole.clear();
        whole.extend_from_slice(&frame[..smoltcp::wire::ETHERNET_HEADER_LEN]);
        whole.extend_from_slice(datagram);
        Ok(true)
    }

    /// Handles a datagram `reassemble` completed (on this engine or another's): `frame` is
    /// the Ethernet frame it wrote. Its fragments were counted as frames in where they arrived.
    pub fn handle_reassembled(
        &mut self,
        now: Instant,
        frame: &[u8],
        io: &mut impl SockIo,
        out: &mut FrameBatch,
    ) {
        let before = out.len();
        if let Err(why) = self.dispatch_reassembled(now, frame, io, out) {
            self.ctx.stats.drop(why);
        }
        self.count_out(out, before);
    }

    fn dispatch_reassembled(
        &mut self,
        now: Instant,
        frame: &[u8],
        io: &mut impl SockIo,
        out: &mut FrameBatch,
    ) -> Result<(), DropReason> {
        if !self.ctx.cfg.enabled {
            return Err(DropReason::Disabled);
        }
        let eth = EthernetFrame::new_checked(frame).map_err(|_| DropReason::Malformed)?;
        if eth.ethertype() == EthernetProtocol::Ipv6 {
            let ip = Ipv6View::parse(eth.payload())?;
            if !ip.is_whole() {
                return Err(DropReason::Malformed);
            }
            // The engine that owns the flow needs the guest's MAC to answer it.
            let src_mac = crate::wire::mac(eth.src_addr());
            crate::vhost::ndp::admit_source(now, &mut self.ctx, src_mac, &ip)?;
            let query = self.nat.handle_ipv6(now, &mut self.ctx, &ip, io, out)?;
            return relay_query(
                &mut self.dns,
                &mut self.ctx,
                &self.dhcp,
                now,
                query,
                io,
                out,
            );
        }
        if eth.ethertype() != EthernetProtocol::Ipv4 {
            return Err(DropReason::Malformed);
        }
        let ip = Ipv4Packet::new_checked(eth.payload()).map_err(|_| DropReason::Malformed)?;
        if ip.more_frags() || ip.frag_offset() != 0 || !ip.verify_checksum() {
            return Err(DropReason::Malformed);
        }
        let ip = Ipv4Packet::new_unchecked(&eth.payload()[..ip.total_len() as usize]);
        // The engine that owns the flow needs the guest's MAC to answer it.
        let (src, src_mac) = (ip.src_addr(), crate::wire::mac(eth.src_addr()));
        if self.ctx.cfg.in_subnet(src) && !self.ctx.is_host_address(src) {
            self.ctx.arp.learn(now, src, src_mac);
        }
        let query = self
            .nat
            .handle_reassembled(now, &mut self.ctx, &ip, io, out)?;
        relay_query(
            &mut self.dns,
            &mut self.ctx,
            &self.dhcp,
            now,
            query,
            io,
            out,
        )
    }

    fn count_out(&mut self, out: &FrameBatch, before: usize) {
        for f in out.iter().skip(before) {
            self.ctx.stats.frames_out += 1;
            self.ctx.stats.bytes_out += f.len() as u64;
            self.ctx.stats.frames_out_ipv6 += u64::from(is_ipv6_frame(f));
        }
    }

    fn dispatch_frame(
        &mut self,
        now: Instant,
        frame: &[u8],
        io: &mut impl SockIo,
        out: &mut FrameBatch,
    ) -> Result<(), DropReason> {
        if !self.ctx.cfg.enabled {
            return Err(DropReason::Disabled);
        }
        let eth = EthernetFrame::new_checked(frame).map_err(|_| DropReason::Malformed)?;
        let dst = crate::wire::mac(eth.dst_addr());
        let src = crate::wire::mac(eth.src_addr());
        if src == self.ctx.mac || src.0[0] & 1 != 0 {
            return Err(DropReason::Foreign);
        }
        if dst != self.ctx.mac && dst.0[0] & 1 == 0 {
            return Err(DropReason::Foreign);
        }
        match eth.ethertype() {
            EthernetProtocol::Arp => {
                let me = ArpIdentity {
                    mac: self.ctx.mac,
                    ip: self.ctx.cfg.host.ip,
                    aliases: [self.ctx.cfg.nat.host_loopback, self.ctx.cfg.dns.address],
                };
                let cfg = &self.ctx.cfg;
                let sources = &mut self.ctx.sources;
                let mode = cfg.nat.source_check;
                // A neighbour entry only for a guest's address, from the MAC that holds it.
                let may_learn = |ip, mac| {
                    (cfg.in_subnet(ip) && !cfg.is_host_address(ip))
                        .then(|| sources.check(mode, now, mac, ip))
                };
                arp::handle(now, &me, may_learn, &mut self.ctx.arp, eth.payload(), out)
            }
            EthernetProtocol::Ipv4 => self.handle_ipv4(now, src, dst, eth.payload(), io, out),
            EthernetProtocol::Ipv6 if self.ctx.cfg.ipv6.enabled => {
                self.handle_ipv6(now, src, dst, eth.payload(), io, out)
            }
            _ => Err(DropReason::Foreign),
        }
    }

    fn handle_ipv4(
        &mut self,
        now: Instant,
        src_mac: Mac,
        dst_mac: Mac,
        bytes: &[u8],
        io: &mut impl SockIo,
        out: &mut FrameBatch,
    ) -> Result<(), DropReason> {
        let ip = Ipv4Packet::new_checked(bytes).map_err(|_| DropReason::Malformed)?;
        if ip.version() != 4 || (ip.header_len() as usize) < IPV4_HEADER_LEN {
            return Err(DropReason::Malformed);
        }
        if !ip.verify_checksum() {
            return Err(DropReason::BadChecksum);
        }
        // Ethernet may pad short frames: everything past the IP total length is padding.
        let ip = Ipv4Packet::new_unchecked(&bytes[..ip.total_len() as usize]);
        let (src, dst) = (ip.src_addr(), ip.dst_addr());
        if self.ctx.cfg.in_subnet(src) && !self.ctx.is_host_address(src) {
            // A source another guest holds is not carried, nor does it move the neighbour
            // entry (the victim's answers would go to the sender).
            if !self.ctx.source_ok(now, src_mac, src) {
                return Err(DropReason::Spoofed);
            }
            self.ctx.arp.learn(now, src, src_mac);
        }

        // DHCP is broadcast before the guest has an address: handle it before the address checks.
        if ip.next_header() == IpProtocol::Udp && !ip.more_frags() && ip.frag_offset() == 0 {
            if let Ok(udp) = UdpPacket::new_checked(ip.payload()) {
                if udp.dst_port() == DHCP_SERVER_PORT
                    && (dst.is_broadcast() || dst == self.ctx.cfg.host.ip)
                {
                    if !self.ctx.cfg.dhcp.enabled {
                        return Err(DropReason::Disabled);
                    }
                    return self.dhcp.handle(now, &mut self.ctx, src_mac, &ip, out);
                }
            }
        }
        if dst_mac != self.ctx.mac {
            // Broadcast or multicast IP that is not DHCP: nothing for the virtual host.
            return Err(DropReason::Foreign);
        }
        // Fragmented ICMP for the virtual host is answered by the NAT after reassembly.
        let whole = !ip.more_frags() && ip.frag_offset() == 0;
        if self.ctx.is_host_address(dst) && ip.next_header() == IpProtocol::Icmp && whole {
            return icmp::handle_to_host(&mut self.ctx, &ip, out);
        }
        let query = self.nat.handle_ipv4(now, &mut self.ctx, &ip, io, out)?;
        relay_query(
            &mut self.dns,
            &mut self.ctx,
            &self.dhcp,
            now,
            query,
            io,
            out,
        )
    }

    /// One IPv6 packet from a guest: neighbour discovery, router solicitations, DHCPv6 and echo
    /// for the virtual host are answered here; the rest is the NAT's.
    fn handle_ipv6(
        &mut self,
        now: Instant,
        src_mac: Mac,
        dst_mac: Mac,
        bytes: &[u8],
        io: &mut impl SockIo,
        out: &mut FrameBatch,
    ) -> Result<(), DropReason> {
        // IPv6 multicast goes to 33:33:*; a broadcast or another group's frame is not IPv6's.
        let multicast = dst_mac != self.ctx.mac;
        if multicast && dst_mac.0[..2] != [0x33, 0x33] {
            return Err(DropReason::Foreign);
        }
        let ip = Ipv6View::parse(bytes)?;
        if ip.src.is_multicast() {
            return Err(DropReason::Malformed);
        }
        if multicast && !ip.dst.is_multicast() {
            // A unicast packet in a multicast frame: every node got it; none should answer.
            return Err(DropReason::Foreign);
        }
        // Checked before anything is learned from it: an ICMPv6 message that fails teaches
        // nothing. A fragment's checksum covers the datagram; reassembly is the NAT's.
        let icmp = match ip.proto {
            IpProtocol::Icmpv6 if ip.fragment.is_none() => Some(ndp::check(&ip)?),
            _ => None,
        };
        ndp::admit_source(now, &mut self.ctx, src_mac, &ip)?;
        let to_host = self.ctx.is_host_address6(ip.dst);
        if let Some(m) = icmp.filter(|m| m.is_ndp() || to_host || ip.dst.is_multicast()) {
            return ndp::handle(now, &mut self.ctx, src_mac, &ip, &m, out);
        }
        if ip.is_whole()
            && dhcp6::is_to_server_port(&ip)
            && (to_host || ip.dst == dhcp6::ALL_DHCP_AGENTS)
        {
            return self.handle_dhcpv6(now, src_mac, &ip, out);
        }
        if ip.dst.is_multicast() {
            // MLD reports and other groups' traffic: nothing the virtual host takes part in.
            return Err(DropReason::Unsupported);
        }
        let query = self.nat.handle_ipv6(now, &mut self.ctx, &ip, io, out)?;
        relay_query(
            &mut self.dns,
            &mut self.ctx,
            &self.dhcp,
            now,
            query,
            io,
            out,
        )
    }

    /// A datagram to the DHCPv6 server's port, for the virtual host's DHCPv6 server when
    /// `ipv6.dhcpv6` is on.
    fn handle_dhcpv6(
        &mut self,
        now: Instant,
        src_mac: Mac,
        ip: &Ipv6View,
        out: &mut FrameBatch,
    ) -> Result<(), DropReason> {
        let v6 = &self.ctx.cfg.ipv6;
        if !v6.enabled || v6.dhcpv6 == crate::config::Dhcpv6Mode::Off {
            return Err(DropReason::Disabled);
        }
        self.dhcp6.handle(now, &mut self.ctx, src_mac, ip, out)
    }

    /// Handles an event from a sock-side socket.
    pub fn handle_host_event(
        &mut self,
        now: Instant,
        ev: SockEvent,
        io: &mut impl SockIo,
        out: &mut FrameBatch,
    ) {
        let before = out.len();
        if let Some(ev) = self.dns.handle_sock_event(now, &mut self.ctx, ev, io, out) {
            self.nat.handle_host_event(now, &mut self.ctx, ev, io, out);
        }
        self.count_out(out, before);
    }

    /// A TCP connection accepted by a forward: `sock` is the accepted host socket (already in
    /// `io`), `client` its peer. Opens the guest side: a SYN from the client (as
    /// `inbound_source` shows it) to `target.guest`, sent again 1 s and 3 s later and given up
    /// at 7 s (the host socket is then aborted, so the client sees a reset; so it is when the
    /// guest answers with RST). Data the client sends before the guest answers waits in `sock`.
    /// Once the guest answered, it is a connection like a guest's own (`Engine::sessions` shows
    /// it with `Direction::In`).
    ///
    /// The connection belongs to the engine whose flow it is: a guest's segments to
    /// `inbound_source(client)` reach it (a multi-worker runtime routes them by their flow
    /// hash, or to the control thread for the virtual host's own address). On `Err`, `sock` has
    /// been aborted and closed and the drop counted.
    #[allow(clippy::too_many_arguments)]
    pub fn tcp_inbound(
        &mut self,
        now: Instant,
        sock: SockId,
        client: SocketAddrV4,
        target: InboundTarget,
        io: &mut impl SockIo,
        out: &mut FrameBatch,
    ) -> Result<(), InboundRefused> {
        let before = out.len();
        let r = self
            .nat
            .tcp_inbound(now, &mut self.ctx, sock, client, target, io, out);
        if let Err(why) = r {
            io.tcp_abort(sock);
            io.close(sock);
            self.ctx.stats.drop(why.drop_reason());
        }
        self.count_out(out, before);
        r
    }

    /// A datagram from `client` for a UDP forward. `sock` is a UDP socket connected to `client`
    /// (already in `io`; later datagrams arrive as `SockEvent::Readable(sock)` and are read with
    /// `udp_recv` like an outbound session's). The payload goes to the guest at once, from the
    /// client (as `inbound_source` shows it); the guest's datagrams back to it leave through
    /// `sock`. If a session for (`target.guest`, client) exists already (a datagram that raced
    /// the connected socket's creation), the payload just goes to the guest through it and
    /// `sock` is closed. On `Err`, `sock` has been closed and the drop counted.
    #[allow(clippy::too_many_arguments)]
    pub fn udp_inbound(
        &mut self,
        now: Instant,
        sock: SockId,
        client: SocketAddrV4,
        target: InboundTarget,
        payload: &[u8],
        io: &mut impl SockIo,
        out: &mut FrameBatch,
    ) -> Result<(), InboundRefused> {
        let before = out.len();
        let r = self
            .nat
            .udp_inbound(now, &mut self.ctx, sock, client, target, payload, io, out);
        if let Err(why) = r {
            io.close(sock);
            self.ctx.stats.drop(why.drop_reason());
        }
        self.count_out(out, before);
        r
    }

    /// Forward `forward` was removed: its TCP connections are reset both ways and its UDP
    /// sessions end. Returns how many flows ended.
    pub fn close_forward(
        &mut self,
        now: Instant,
        forward: u32,
        io: &mut impl SockIo,
        out: &mut FrameBatch,
    ) -> usize {
        let before = out.len();
        let n = self.nat.close_forward(now, &mut self.ctx, forward, io, out);
        self.count_out(out, before);
        n
    }

    /// The address and port a guest is shown for an inbound flow's `client`: the client's
    /// own, but a client on the host's loopback is shown as `nat.host_loopback` (or, without
    /// it, the virtual host's address), which the guest can answer. A runtime routes the flow
    /// to the engine that owns the guest's packets to it. `Err` when no guest could answer
    /// the client (`InboundRefused::BadClient`).
    pub fn inbound_source(&self, client: SocketAddrV4) -> Result<SocketAddrV4, InboundRefused> {
        crate::nat::inbound::inbound_source(&self.ctx.cfg, client)
    }

    /// Lets the caller batch: with batching on, work that gains from being done once per batch
    /// (writes of guests' TCP payload to sock-side sockets, and the ACKs for it; guests' UDP
    /// datagrams, sent in runs) waits for `flush`.
    /// Off by default, so that each `handle_frame` is complete on its own (tests, replay).
    pub fn set_batching(&mut self, on: bool) {
        self.nat.tcp.set_batching(on);
        self.nat.udp.set_batching(on);
        self.dns.set_batching(on);
    }

    /// Whether TCP connections entering and leaving this engine's table are kept for
    /// `drain_tcp_flow_changes` (a runtime that places flows on its workers counts them).
    pub fn track_tcp_flows(&mut self, on: bool) {
        self.nat.tcp.track_changes(on);
    }

    /// Hands `f` each TCP connection that entered the table since the last call (`true`), then
    /// each that left it (`false`), by its guest's end and its destination; with
    /// `track_tcp_flows` off, none. Entries come first: a connection that replaced another of
    /// its bucket within the batch never leaves the bucket's count at zero.
    pub fn drain_tcp_flow_changes(&mut self, mut f: impl FnMut(SocketAddr, SocketAddr, bool)) {
        if let Some(ch) = self.nat.tcp.changes_mut() {
            for (a, b) in ch.opened.drain(..) {
                f(a, b, true);
            }
            for (a, b) in ch.closed.drain(..) {
                f(a, b, false);
            }
        }
    }

    /// TCP connections in the table that are not TIME-WAIT tombstones.
    pub fn live_tcp_connections(&self) -> usize {
        self.nat.tcp.live()
    }

    /// Ends a batch: does the work `set_batching(true)` deferred. The runtime calls it before
    /// writing out the batch's frames.
    pub fn flush(&mut self, now: Instant, io: &mut impl SockIo, out: &mut FrameBatch) {
        let before = out.len();
        self.nat.tcp.flush(now, &mut self.ctx, io, out);
        self.nat.udp.flush(&mut self.ctx, io, out);
        self.dns.flush(&mut self.ctx, io);
        self.count_out(out, before);
    }

    /// Shutdown: every guest TCP session is reset (RST to the guest), every sock-side socket closed.
    pub fn shutdown(&mut self, now: Instant, io: &mut impl SockIo, out: &mut FrameBatch) {
        let before = out.len();
        self.nat.close_all(now, &mut self.ctx, io, out);
        self.dns.close_all(io);
        self.count_out(out, before);
    }

    /// With `on`, this engine no longer expires idle NAT sessions by itself (`poll_timeout`
    /// does not wake for them): the caller runs `expire_sessions` on its own schedule. A worker
    /// of a multi-worker runtime runs so, on the control thread's tick.
    pub fn set_external_expiry(&mut self, on: bool) {
        self.nat.set_external_expiry(on, &self.ctx);
    }

    /// Ends the NAT sessions (TCP, UDP, ICMP) idle past their timeouts at `now`, and forgets
    /// stale neighbours.
    pub fn expire_sessions(&mut self, now: Instant, io: &mut impl SockIo, out: &mut FrameBatch) {
        let before = out.len();
        self.nat.expire_sessions(now, &mut self.ctx, io, out);
        self.ctx.arp.expire(now);
        self.ctx.ndp.expire(now);
        self.count_out(out, before);
    }

    /// When `handle_timeout` next has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let vhost = earliest(self.dhcp.poll_timeout(), self.dns.poll_timeout());
        let vhost = earliest(vhost, self.dhcp6.poll_timeout());
        let vhost = earliest(vhost, self.ctx.ndp.poll_timeout());
        earliest(vhost, self.nat.poll_timeout())
    }

    /// Expires leases and sessions, retransmits, and runs every other timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant, io: &mut impl SockIo, out: &mut FrameBatch) {
        let before = out.len();
        self.dhcp.handle_timeout(now, &mut self.ctx);
        self.dhcp6.handle_timeout(now, &mut self.ctx);
        self.bind_leases(now);
        self.dns.handle_timeout(now, &mut self.ctx, io, out);
        self.nat.handle_timeout(now, &mut self.ctx, io, out);
        ndp::handle_timeout(now, &mut self.ctx, out);
        self.ctx.arp.expire(now);
        self.ctx.ndp.expire(now);
        self.count_out(out, before);
    }
}
