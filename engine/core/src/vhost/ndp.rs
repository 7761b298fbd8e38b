//! The virtual host on IPv6: neighbour discovery (RFC 4861), its router advertisements (with
//! RDNSS and DNSSL, RFC 8106) and ICMPv6 echo to its own addresses.
//!
//! The virtual host has two IPv6 addresses: the link-local derived from its MAC and
//! `ipv6.ip` in the segment's /64. It answers neighbour solicitations for them, defends them
//! against duplicate address detection, answers router solicitations and advertises itself
//! unsolicited on a timer, and learns guests' MACs into a bounded neighbour cache: from the
//! Ethernet source of every IPv6 packet a guest sends from its own address (after the source
//! binding accepted it, `Sources::check6`), and from neighbour advertisements it receives. It
//! resolves a guest it does not know with a neighbour solicitation of its own
//! (`Ctx::ndp_resolve`).
//!
//! Every message is checked as RFC 4861 7.1 says before anything is learned from it: a hop
//! limit of 255 (so it cannot come from past a router), a valid checksum, code 0, options whose
//! lengths add up, a target that is not multicast. A guest that claims one of the virtual
//! host's addresses (as a source, in a neighbour advertisement, in a router advertisement) is
//! refused as spoofed; other guests' router advertisements are ignored.

use std::collections::HashMap;
use std::net::Ipv6Addr;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use smoltcp::wire::IpProtocol;

use crate::config::{Config, Dhcpv6Mode, Mac};
use crate::output::FrameBatch;
use crate::stats::DropReason;
use crate::time::Instant;
use crate::wire::{
    link_local, multicast_mac, push_ipv6, solicited_node, upper_checksum6, verify_upper6,
    Ipv6Header, Ipv6View, DEFAULT_HOP_LIMIT,
};
use crate::Ctx;

/// Bound on the IPv6 neighbours learned: as for IPv4 (`arp::MAX_NEIGHBOURS`), a flood of
/// forged sources must not grow memory.
pub(crate) const MAX_NEIGHBOURS6: usize = 4096;
/// Addresses one MAC may have in the neighbour cache: a link-local, SLAAC and DHCPv6
/// addresses and a few temporary ones; a guest past it is flooding.
pub(crate) const MAX_NEIGHBOURS6_PER_MAC: usize = 16;
/// A neighbour not heard from for this long is forgotten.
const NEIGHBOUR_TTL: Duration = Duration::from_secs(3600);
/// Once a MAC holds its share, its idlest address gives way to a new one only after this long
/// unused (so a guest rotating temporary addresses keeps working, a flood does not).
const NEIGHBOUR_IDLE: Duration = Duration::from_secs(600);
/// Guests being resolved at once (each a solicitation sent and not yet answered).
const MAX_PENDING: usize = 256;
/// RFC 4861 10: RETRANS_TIMER, the least time between two solicitations for one address.
const RETRANS_TIMER: Duration = Duration::from_secs(1);
/// RFC 4861 10: the first few unsolicited advertisements come at most this far apart.
const MAX_INITIAL_RTR_ADVERT_INTERVAL: Duration = Duration::from_secs(16);
const MAX_INITIAL_RTR_ADVERTISEMENTS: u8 = 3;
/// RFC 4861 10: multicast advertisements (answers to solicitations from ::) at most this often.
const MIN_DELAY_BETWEEN_RAS: Duration = Duration::from_secs(3);
/// The lifetimes of the advertised prefix (RFC 4861's defaults are 30 and 7 days; a virtual
/// segment's prefix may change with its configuration, so shorter).
const PREFIX_VALID: u32 = 86_400;
const PREFIX_PREFERRED: u32 = 14_400;
/// The least valid lifetime a host lets an unauthenticated advertisement cut a prefix to
/// (RFC 4862 5.5.3 e): a withdrawn prefix is advertised with it.
const PREFIX_WITHDRAWN_VALID: u32 = 7_200;
/// How often a claim of the virtual host's own address is logged (each is counted).
const CLAIM_WARN_EVERY: Duration = Duration::from_secs(60);

/// The hop limit of every neighbour discovery message (RFC 4861 7.1.1).
const NDP_HOP_LIMIT: u8 = 255;

const ECHO_REQUEST: u8 = 128;
const ECHO_REPLY: u8 = 129;
const ROUTER_SOLICIT: u8 = 133;
const ROUTER_ADVERT: u8 = 134;
const NEIGHBOR_SOLICIT: u8 = 135;
const NEIGHBOR_ADVERT: u8 = 136;
const REDIRECT: u8 = 137;

const OPT_SOURCE_LLADDR: u8 = 1;
const OPT_TARGET_LLADDR: u8 = 2;
const OPT_PREFIX_INFO: u8 = 3;
const OPT_MTU: u8 = 5;
const OPT_RDNSS: u8 = 25;
const OPT_DNSSL: u8 = 31;

const NA_ROUTER: u8 = 0x80;
const NA_SOLICITED: u8 = 0x40;
const NA_OVERRIDE: u8 = 0x20;
const RA_MANAGED: u8 = 0x80;
const RA_OTHER: u8 = 0x40;
const PREFIX_ON_LINK: u8 = 0x80;
const PREFIX_AUTONOMOUS: u8 = 0x40;

/// ff02::1, all nodes.
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
/// ff02::2, all routers.
const ALL_ROUTERS: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Neighbour {
    mac: Mac,
    seen: Instant,
}

/// The virtual host's neighbour discovery: guests' IPv6 → MAC, the solicitations it has sent,
/// and the schedule of its router advertisements.
pub(crate) struct Ndp {
    table: HashMap<Ipv6Addr, Neighbour>,
    /// Each MAC's addresses in `table` (at most `MAX_NEIGHBOURS6_PER_MAC`).
    by_mac: HashMap<Mac, Vec<Ipv6Addr>>,
    /// Guests solicited and when (at most `MAX_PENDING`).
    pending: HashMap<Ipv6Addr, Instant>,
    /// `Engine::start` ran: this engine is the one that advertises (a worker's never is).
    started: bool,
    /// When the next unsolicited advertisement is due; `None` while not advertising.
    next_ra: Option<Instant>,
    /// Unsolicited advertisements still to send at the initial, faster pace.
    initial_left: u8,
    /// When an advertisement last went to all nodes.
    last_multicast_ra: Option<Instant>,
    /// When a claim of the virtual host's addresses was last logged.
    claim_warned: Option<Instant>,
    /// The advertisements' jitter: a randomness of its own, so that advertising leaves every
    /// other random choice of the core (and so the replays' goldens) as it was.
    rng: SmallRng,
}

impl Ndp {
    /// `seed`: the engine's.
    pub(crate) fn new(seed: u64) -> Ndp {
        Ndp {
            table: HashMap::new(),
            by_mac: HashMap::new(),
            pending: HashMap::new(),
            started: false,
            next_ra: None,
            initial_left: 0,
            last_multicast_ra: None,
            claim_warned: None,
            rng: SmallRng::seed_from_u64(seed ^ 0x6e64_7000_0000_0000),
        }
    }

    /// The MAC of the guest at `ip`, if known.
    pub(crate) fn lookup(&self, ip: Ipv6Addr) -> Option<Mac> {
        self.table.get(&ip).map(|n| n.mac)
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.table.len()
    }

    /// Records that `ip` is at `mac` (the caller checked that `mac` may send from `ip`).
    /// `Limit` when `mac` already has its share of addresses, all in use.
    pub(crate) fn learn(&mut self, now: Instant, ip: Ipv6Addr, mac: Mac) -> Result<(), DropReason> {
        if ip.is_unspecified() || ip.is_multicast() || mac.0[0] & 1 != 0 {
            return Ok(());
        }
        if let Some(n) = self.table.get_mut(&ip) {
            if n.mac == mac {
                n.seen = now;
                return Ok(());
            }
        }
        // A new address for `mac` (or one moving to it): make room within its share first.
        let held = self.by_mac.get(&mac).map_or(0, Vec::len);
        if held >= MAX_NEIGHBOURS6_PER_MAC {
            let idlest = self.by_mac.get(&mac).and_then(|v| {
                v.iter()
                    .filter_map(|a| self.table.get(a).map(|n| (*a, n.seen)))
                    .min_by_key(|(_, seen)| *seen)
            });
            match idlest {
                Some((a, seen)) if now.saturating_since(seen) >= NEIGHBOUR_IDLE => self.remove(a),
                _ => return Err(DropReason::Limit),
            }
        }
        self.remove(ip);
        if self.table.len() >= MAX_NEIGHBOURS6 {
            self.expire(now);
            if self.table.len() >= MAX_NEIGHBOURS6 {
                let oldest = self
                    .table
                    .iter()
                    .min_by_key(|(_, n)| n.seen)
                    .map(|(ip, _)| *ip);
                if let Some(old) = oldest {
                    self.remove(old);
                }
            }
        }
        self.table.insert(ip, Neighbour { mac, seen: now });
        self.by_mac.entry(mac).or_default().push(ip);
        self.pending.remove(&ip);
        Ok(())
    }

    fn remove(&mut self, ip: Ipv6Addr) {
        let Some(n) = self.table.remove(&ip) else {
            return;
        };
        if let Some(v) = self.by_mac.get_mut(&n.mac) {
            v.retain(|a| *a != ip);
            if v.is_empty() {
                self.by_mac.remove(&n.mac);
            }
        }
    }

    /// Forgets neighbours not heard from for `NEIGHBOUR_TTL`, and solicitations long
    /// unanswered.
    pub(crate) fn expire(&mut self, now: Instant) {
        let stale: Vec<Ipv6Addr> = self
            .table
            .iter()
            .filter(|(_, n)| now.saturating_since(n.seen) >= NEIGHBOUR_TTL)
            .map(|(ip, _)| *ip)
            .collect();
        for ip in stale {
            self.remove(ip);
        }
        self.pending
            .retain(|_, t| now.saturating_since(*t) < RETRANS_TIMER);
    }

    /// When an unsolicited advertisement is next due.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.next_ra
    }

    /// Whether a solicitation for `ip` may go out now (one per `RETRANS_TIMER` an address,
    /// `MAX_PENDING` addresses at once); records it if so.
    fn may_solicit(&mut self, now: Instant, ip: Ipv6Addr) -> bool {
        if let Some(t) = self.pending.get(&ip) {
            if now.saturating_since(*t) < RETRANS_TIMER {
                return false;
            }
        } else if self.pending.len() >= MAX_PENDING {
            self.pending
                .retain(|_, t| now.saturating_since(*t) < RETRANS_TIMER);
            if self.pending.len() >= MAX_PENDING {
                return false;
            }
        }
        self.pending.insert(ip, now);
        true
    }

    /// Schedules the next unsolicited advertisement (RFC 4861 6.2.4): uniformly between a
    /// third of `ipv6.ra_interval` and all of it, at most 16 s for the first three.
    fn schedule(&mut self, now: Instant, cfg: &Config) {
        let max = cfg.ipv6.ra_interval.as_micros() as u64;
        let mut d = Duration::from_micros(self.rng.random_range(max / 3..=max));
        if self.initial_left > 0 {
            self.initial_left -= 1;
            d = d.min(MAX_INITIAL_RTR_ADVERT_INTERVAL);
        }
        self.next_ra = Some(now + d);
    }
}

/// Whether `cfg` has the virtual host advertise on IPv6.
fn advertises(cfg: &Config) -> bool {
    cfg.enabled && cfg.ipv6.enabled
}

/// The virtual host comes up: its router advertisements begin, the first a few seconds on
/// (a guest that comes up asks for one at once with a solicitation).
pub(crate) fn start(now: Instant, ctx: &mut Ctx) {
    ctx.ndp.started = true;
    if advertises(&ctx.cfg) {
        ctx.ndp.initial_left = MAX_INITIAL_RTR_ADVERTISEMENTS;
        ctx.ndp.schedule(now, &ctx.cfg);
    }
}

/// Sends the unsolicited advertisement when it is due.
pub(crate) fn handle_timeout(now: Instant, ctx: &mut Ctx, out: &mut FrameBatch) {
    if ctx.ndp.next_ra.is_none_or(|t| t > now) {
        return;
    }
    if !advertises(&ctx.cfg) {
        ctx.ndp.next_ra = None;
        return;
    }
    push_ra(
        out,
        &ctx.cfg,
        ctx.mac,
        ALL_NODES,
        multicast_mac(ALL_NODES),
        false,
    );
    ctx.ndp.last_multicast_ra = Some(now);
    ctx.ndp.schedule(now, &ctx.cfg);
}

/// The configuration changed from `old` (when the virtual host's MAC was `old_mac`): guests
/// hear of it at once. A router that stops advertising, changes its link-local (its MAC) or
/// its prefix first withdraws what it advertised (RFC 4861 6.2.5: router lifetime 0; the old
/// prefix deprecated, its DNS servers' lifetimes 0), then advertises the new.
pub(crate) fn reconfigured(
    now: Instant,
    ctx: &mut Ctx,
    old: &Config,
    old_mac: Mac,
    out: &mut FrameBatch,
) {
    if !ctx.ndp.started {
        return;
    }
    let (was, is) = (advertises(old), advertises(&ctx.cfg));
    let moved = old_mac != ctx.mac || old.ipv6.prefix != ctx.cfg.ipv6.prefix;
    if was && (!is || moved) {
        push_ra(out, old, old_mac, ALL_NODES, multicast_mac(ALL_NODES), true);
    }
    if !is {
        ctx.ndp.next_ra = None;
        return;
    }
    let changed = !was
        || moved
        || old.ipv6 != ctx.cfg.ipv6
        || old.dhcp.search != ctx.cfg.dhcp.search
        || old.nat.mtu != ctx.cfg.nat.mtu;
    if changed {
        push_ra(
            out,
            &ctx.cfg,
            ctx.mac,
            ALL_NODES,
            multicast_mac(ALL_NODES),
            false,
        );
        ctx.ndp.last_multicast_ra = Some(now);
        // Changed information is spread as a new router's is (RFC 4861 6.2.4).
        ctx.ndp.initial_left = MAX_INITIAL_RTR_ADVERTISEMENTS;
        ctx.ndp.schedule(now, &ctx.cfg);
    } else if ctx.ndp.next_ra.is_none() {
        ctx.ndp.schedule(now, &ctx.cfg);
    }
}

/// A guest's ICMPv6 message, checked: its type, code and the whole message.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Icmp6<'a> {
    pub(crate) ty: u8,
    pub(crate) code: u8,
    /// The message from its type byte on.
    pub(crate) msg: &'a [u8],
}

impl Icmp6<'_> {
    /// A neighbour discovery message (router and neighbour solicitations and advertisements,
    /// redirects).
    pub(crate) fn is_ndp(&self) -> bool {
        (ROUTER_SOLICIT..=REDIRECT).contains(&self.ty)
    }
}

/// What a neighbour discovery message carries that the virtual host uses.
#[derive(Clone, Copy, Debug, Default)]
struct NdOptions {
    source_lladdr: Option<Mac>,
    target_lladdr: Option<Mac>,
}

/// Where the options of each message begin (RFC 4861 4.1 to 4.5); its least length.
fn options_offset(ty: u8) -> usize {
    match ty {
        ROUTER_SOLICIT => 8,
        ROUTER_ADVERT => 16,
        NEIGHBOR_SOLICIT | NEIGHBOR_ADVERT => 24,
        _ => 40,
    }
}

/// Walks the options of a neighbour discovery message: one of length zero or running past
/// the message is `Malformed` (RFC 4861 7.1.1); a link-layer address option that is not one
/// Ethernet address too.
fn parse_options(msg: &[u8], from: usize) -> Result<NdOptions, DropReason> {
    let mut o = NdOptions::default();
    let mut at = from;
    while at < msg.len() {
        let h = msg.get(at..at + 2).ok_or(DropReason::Malformed)?;
        let len = 8 * usize::from(h[1]);
        if len == 0 {
            return Err(DropReason::Malformed);
        }
        let opt = msg.get(at..at + len).ok_or(DropReason::Malformed)?;
        if h[0] == OPT_SOURCE_LLADDR || h[0] == OPT_TARGET_LLADDR {
            let mac: [u8; 6] = opt
                .get(2..8)
                .filter(|_| len == 8)
                .and_then(|m| m.try_into().ok())
                .ok_or(DropReason::Malformed)?;
            let slot = if h[0] == OPT_SOURCE_LLADDR {
                &mut o.source_lladdr
            } else {
                &mut o.target_lladdr
            };
            *slot = Some(Mac(mac));
        }
        at += len;
    }
    Ok(o)
}

/// The target address of a neighbour solicitation or advertisement (bytes 8..24).
fn target_of(msg: &[u8]) -> Option<Ipv6Addr> {
    let t: [u8; 16] = msg.get(8..24)?.try_into().ok()?;
    Some(Ipv6Addr::from(t))
}

/// Whether `ip` is a solicited-node multicast address (ff02::1:ffXX:XXXX).
fn is_solicited_node(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    s[..6] == [0xff02, 0, 0, 0, 0, 1] && s[6] & 0xff00 == 0xff00
}

/// Checks a guest's whole ICMPv6 message (`ip` carries it): its checksum, and for neighbour
/// discovery what RFC 4861 7.1 asks before a node may act on it. Nothing is learned from a
/// message that fails.
pub(crate) fn check<'a>(ip: &Ipv6View<'a>) -> Result<Icmp6<'a>, DropReason> {
    let msg = ip.upper();
    if msg.len() < 4 {
        return Err(DropReason::Malformed);
    }
    if !verify_upper6(ip.src, ip.dst, IpProtocol::Icmpv6.into(), msg) {
        return Err(DropReason::BadChecksum);
    }
    let m = Icmp6 {
        ty: msg[0],
        code: msg[1],
        msg,
    };
    if !m.is_ndp() {
        return Ok(m);
    }
    // A fragment header on neighbour discovery is refused (RFC 6980): its options could hide
    // in a later fragment.
    if ip.hop_limit != NDP_HOP_LIMIT || m.code != 0 || ip.fragment.is_some() {
        return Err(DropReason::Malformed);
    }
    let from = options_offset(m.ty);
    if msg.len() < from {
        return Err(DropReason::Malformed);
    }
    let opts = parse_options(msg, from)?;
    match m.ty {
        ROUTER_SOLICIT if ip.src.is_unspecified() && opts.source_lladdr.is_some() => {
            Err(DropReason::Malformed)
        }
        NEIGHBOR_SOLICIT | NEIGHBOR_ADVERT => {
            let target = target_of(msg).ok_or(DropReason::Malformed)?;
            if target.is_multicast() {
                return Err(DropReason::Malformed);
            }
            let dad = ip.src.is_unspecified();
            if m.ty == NEIGHBOR_SOLICIT
                && dad
                && (!is_solicited_node(ip.dst) || opts.source_lladdr.is_some())
            {
                return Err(DropReason::Malformed);
            }
            if m.ty == NEIGHBOR_ADVERT
                && (dad || (ip.dst.is_multicast() && msg[4] & NA_SOLICITED != 0))
            {
                return Err(DropReason::Malformed);
            }
            Ok(m)
        }
        _ => Ok(m),
    }
}

impl Ctx {
    /// The virtual host's IPv6 link-local address (the modified EUI-64 of its MAC).
    pub fn host_link_local6(&self) -> Ipv6Addr {
        link_local(self.mac)
    }

    /// Whether `ip` is one of the virtual host's own IPv6 addresses: its link-local or
    /// `ipv6.ip`.
    pub fn is_host_address6(&self, ip: Ipv6Addr) -> bool {
        ip == self.cfg.ipv6.ip || ip == self.host_link_local6()
    }

    /// Whether `ip` may be a guest's address on the segment: unicast, link-local or in
    /// `ipv6.prefix`, and not the virtual host's.
    pub fn is_guest_address6(&self, ip: Ipv6Addr) -> bool {
        !ip.is_unspecified()
            && !ip.is_multicast()
            && (crate::wire::is_link_local(ip) || self.cfg.ipv6.in_prefix(ip))
            && !self.is_host_address6(ip)
    }

    /// The virtual host's address to send to `dst` from: its link-local toward a link-local
    /// address, `ipv6.ip` toward any other.
    pub fn host_source6(&self, dst: Ipv6Addr) -> Ipv6Addr {
        if crate::wire::is_link_local(dst) {
            self.host_link_local6()
        } else {
            self.cfg.ipv6.ip
        }
    }

    /// The MAC of the guest at `ip`, if the neighbour cache knows it. The NAT's way to address
    /// a frame to a guest it answers (a guest that sends is learned before its packet reaches
    /// the NAT, so its flows always find it).
    pub fn ndp_lookup(&self, ip: Ipv6Addr) -> Option<Mac> {
        self.ndp.lookup(ip)
    }

    /// The MAC of the guest at `ip`; when unknown, a neighbour solicitation for it is sent to
    /// its solicited-node address (at most one a second for an address, `MAX_PENDING`
    /// addresses at a time, only for addresses a guest may have) and `None` is returned: drop
    /// what was to be sent as `DropReason::NoArp`, as IPv4 does; the guest's advertisement
    /// makes it known for the next time.
    pub fn ndp_resolve(&mut self, now: Instant, ip: Ipv6Addr, out: &mut FrameBatch) -> Option<Mac> {
        if let Some(mac) = self.ndp.lookup(ip) {
            return Some(mac);
        }
        if self.cfg.enabled
            && self.cfg.ipv6.enabled
            && self.is_guest_address6(ip)
            && self.ndp.may_solicit(now, ip)
        {
            push_ns(out, self.mac, self.host_source6(ip), ip);
        }
        None
    }

    /// Whether `mac` may send from the IPv6 address `ip` (`nat.source_check`, as `source_ok`
    /// for IPv4); the refusal is the reason to count: `Spoofed` or `Limit`.
    pub(crate) fn source_ok6(
        &mut self,
        now: Instant,
        mac: Mac,
        ip: Ipv6Addr,
    ) -> Result<(), DropReason> {
        let mode = self.cfg.nat.source_check;
        self.sources.check6(mode, now, mac, ip)
    }

    /// A guest claims one of the virtual host's addresses: logged once a minute at most (each
    /// is counted).
    fn warn_claim(&mut self, now: Instant, mac: Mac, ip: Ipv6Addr) {
        if self
            .ndp
            .claim_warned
            .is_none_or(|t| now.saturating_since(t) >= CLAIM_WARN_EVERY)
        {
            self.ndp.claim_warned = Some(now);
            tracing::warn!("another host ({mac}) claims the virtual host's address {ip}");
        }
    }
}

/// What every guest IPv6 packet goes through before it is handled: a guest sending from the
/// virtual host's address is refused; one sending from a guest address must hold it
/// (`Sources::check6`), and is learned as its neighbour.
pub(crate) fn admit_source(
    now: Instant,
    ctx: &mut Ctx,
    src_mac: Mac,
    ip: &Ipv6View,
) -> Result<(), DropReason> {
    if ctx.is_host_address6(ip.src) {
        ctx.warn_claim(now, src_mac, ip.src);
        return Err(DropReason::Spoofed);
    }
    if ctx.is_guest_address6(ip.src) {
        ctx.source_ok6(now, src_mac, ip.src)?;
        ctx.ndp.learn(now, ip.src, src_mac)?;
    }
    Ok(())
}

/// An ICMPv6 message (checked by `check`, its source admitted) that is the virtual host's:
/// neighbour discovery, or addressed to it or to a multicast group. `to_me`: the Ethernet
/// destination was the virtual host's MAC (not multicast).
pub(crate) fn handle(
    now: Instant,
    ctx: &mut Ctx,
    src_mac: Mac,
    ip: &Ipv6View,
    m: &Icmp6,
    out: &mut FrameBatch,
) -> Result<(), DropReason> {
    match m.ty {
        NEIGHBOR_SOLICIT => neighbour_solicitation(now, ctx, src_mac, ip, m, out),
        NEIGHBOR_ADVERT => neighbour_advertisement(now, ctx, src_mac, ip, m),
        ROUTER_SOLICIT => router_solicitation(now, ctx, src_mac, ip, m, out),
        ROUTER_ADVERT => {
            let opts = parse_options(m.msg, options_offset(m.ty))?;
            if opts.source_lladdr == Some(ctx.mac) {
                ctx.warn_claim(now, src_mac, ip.src);
                return Err(DropReason::Spoofed);
            }
            // Another router on the segment: the virtual host is the guests' router, not a host
            // that would follow one.
            Err(DropReason::Unsupported)
        }
        ECHO_REQUEST if ctx.is_host_address6(ip.dst) => echo(ctx, src_mac, ip, m, out),
        _ => Err(DropReason::Unsupported),
    }
}

/// The link-layer address option must be the frame's sender: a guest naming another MAC (the
/// virtual host's above all) would send others' traffic there.
fn check_lladdr(
    now: Instant,
    ctx: &mut Ctx,
    src_mac: Mac,
    ip: &Ipv6View,
    lladdr: Option<Mac>,
) -> Result<(), DropReason> {
    match lladdr {
        Some(m) if m == ctx.mac => {
            ctx.warn_claim(now, src_mac, ip.src);
            Err(DropReason::Spoofed)
        }
        Some(m) if m != src_mac => Err(DropReason::Spoofed),
        _ => Ok(()),
    }
}

fn neighbour_solicitation(
    now: Instant,
    ctx: &mut Ctx,
    src_mac: Mac,
    ip: &Ipv6View,
    m: &Icmp6,
    out: &mut FrameBatch,
) -> Result<(), DropReason> {
    let opts = parse_options(m.msg, options_offset(m.ty))?;
    check_lladdr(now, ctx, src_mac, ip, opts.source_lladdr)?;
    let target = target_of(m.msg).ok_or(DropReason::Malformed)?;
    if !ctx.is_host_address6(target) {
        // A guest resolving another guest (or checking its own tentative address): theirs to
        // answer. Its sender, if any, was learned.
        return Ok(());
    }
    if ip.dst != target && ip.dst != solicited_node(target) {
        return Err(DropReason::Unsupported);
    }
    if ip.src.is_unspecified() {
        // Duplicate address detection of the virtual host's address: defend it to all nodes,
        // unsolicited (RFC 4861 7.2.4), so the guest does not take it.
        push_na(
            out,
            ctx.mac,
            target,
            ALL_NODES,
            multicast_mac(ALL_NODES),
            false,
        );
        return Ok(());
    }
    let dst_mac = opts.source_lladdr.unwrap_or(src_mac);
    push_na(out, ctx.mac, target, ip.src, dst_mac, true);
    Ok(())
}

fn neighbour_advertisement(
    now: Instant,
    ctx: &mut Ctx,
    src_mac: Mac,
    ip: &Ipv6View,
    m: &Icmp6,
) -> Result<(), DropReason> {
    let opts = parse_options(m.msg, options_offset(m.ty))?;
    check_lladdr(now, ctx, src_mac, ip, opts.target_lladdr)?;
    let target = target_of(m.msg).ok_or(DropReason::Malformed)?;
    if ctx.is_host_address6(target) {
        ctx.warn_claim(now, src_mac, target);
        return Err(DropReason::Spoofed);
    }
    if !ctx.is_guest_address6(target) {
        return Err(DropReason::Unsupported);
    }
    // An advertisement claims its target as sending from it would.
    ctx.source_ok6(now, src_mac, target)?;
    ctx.ndp.learn(now, target, src_mac)
}

fn router_solicitation(
    now: Instant,
    ctx: &mut Ctx,
    src_mac: Mac,
    ip: &Ipv6View,
    m: &Icmp6,
    out: &mut FrameBatch,
) -> Result<(), DropReason> {
    let opts = parse_options(m.msg, options_offset(m.ty))?;
    check_lladdr(now, ctx, src_mac, ip, opts.source_lladdr)?;
    if ip.dst != ALL_ROUTERS && !ctx.is_host_address6(ip.dst) {
        return Err(DropReason::Unsupported);
    }
    if ip.src.is_unspecified() {
        // No address to answer at: all nodes hear the answer, so it is rate limited.
        if ctx
            .ndp
            .last_multicast_ra
            .is_some_and(|t| now.saturating_since(t) < MIN_DELAY_BETWEEN_RAS)
        {
            return Err(DropReason::Limit);
        }
        ctx.ndp.last_multicast_ra = Some(now);
        push_ra(
            out,
            &ctx.cfg,
            ctx.mac,
            ALL_NODES,
            multicast_mac(ALL_NODES),
            false,
        );
        return Ok(());
    }
    let dst_mac = opts.source_lladdr.unwrap_or(src_mac);
    push_ra(out, &ctx.cfg, ctx.mac, ip.src, dst_mac, false);
    Ok(())
}

fn echo(
    ctx: &mut Ctx,
    src_mac: Mac,
    ip: &Ipv6View,
    m: &Icmp6,
    out: &mut FrameBatch,
) -> Result<(), DropReason> {
    if m.code != 0 || m.msg.len() < 8 || ip.src.is_unspecified() || !ip.is_whole() {
        return Err(DropReason::Malformed);
    }
    // The reply is the request with its type changed: identifier, sequence and data as sent.
    let h = Ipv6Header::new(ip.dst, ip.src, IpProtocol::Icmpv6);
    push_icmp6(out, ctx.mac, src_mac, &h, m.msg.len(), |b| {
        b.copy_from_slice(m.msg);
        b[0] = ECHO_REPLY;
    });
    Ok(())
}

/// Appends one ICMPv6 message of `len` bytes, which `fill` writes (its checksum is then
/// computed over what it wrote).
fn push_icmp6(
    out: &mut FrameBatch,
    src_mac: Mac,
    dst_mac: Mac,
    h: &Ipv6Header,
    len: usize,
    fill: impl FnOnce(&mut [u8]),
) {
    push_ipv6(out, src_mac, dst_mac, h, len, |b| {
        fill(b);
        b[2..4].fill(0);
        let c = upper_checksum6(h.src, h.dst, IpProtocol::Icmpv6.into(), b);
        b[2..4].copy_from_slice(&c.to_be_bytes());
    });
}

fn ndp_header(src: Ipv6Addr, dst: Ipv6Addr) -> Ipv6Header {
    Ipv6Header {
        hop_limit: NDP_HOP_LIMIT,
        ..Ipv6Header::new(src, dst, IpProtocol::Icmpv6)
    }
}

/// A neighbour advertisement of the virtual host's `target` (router, override; solicited when
/// it answers a solicitation), with its MAC.
fn push_na(
    out: &mut FrameBatch,
    mac: Mac,
    target: Ipv6Addr,
    dst: Ipv6Addr,
    dst_mac: Mac,
    solicited: bool,
) {
    let flags = NA_ROUTER | NA_OVERRIDE | if solicited { NA_SOLICITED } else { 0 };
    push_icmp6(out, mac, dst_mac, &ndp_header(target, dst), 32, |b| {
        b.fill(0);
        b[0] = NEIGHBOR_ADVERT;
        b[4] = flags;
        b[8..24].copy_from_slice(&target.octets());
        b[24] = OPT_TARGET_LLADDR;
        b[25] = 1;
        b[26..32].copy_from_slice(&mac.0);
    });
}

/// A neighbour solicitation for the guest `target`, to its solicited-node address.
fn push_ns(out: &mut FrameBatch, mac: Mac, src: Ipv6Addr, target: Ipv6Addr) {
    let dst = solicited_node(target);
    push_icmp6(
        out,
        mac,
        multicast_mac(dst),
        &ndp_header(src, dst),
        32,
        |b| {
            b.fill(0);
            b[0] = NEIGHBOR_SOLICIT;
            b[8..24].copy_from_slice(&target.octets());
            b[24] = OPT_SOURCE_LLADDR;
            b[25] = 1;
            b[26..32].copy_from_slice(&mac.0);
        },
    );
}

/// The DNS search list of an advertisement (RFC 8106 5.2): each domain in DNS wire form, the
/// whole padded with zeros to a multiple of 8 bytes, as many domains as fit one option.
fn dnssl_names(search: &[String]) -> Vec<u8> {
    // The option's length counts 8-byte units in one byte; 8 of them are its header.
    const MAX_NAMES: usize = 255 * 8 - 8;
    let mut names = Vec::new();
    for domain in search {
        let mut wire = Vec::new();
        let labels = domain.trim_end_matches('.').split('.');
        let mut ok = true;
        for l in labels {
            if l.is_empty() || l.len() > 63 {
                ok = false;
                break;
            }
            wire.push(l.len() as u8);
            wire.extend_from_slice(l.as_bytes());
        }
        wire.push(0);
        if ok && names.len() + wire.len() <= MAX_NAMES {
            names.extend_from_slice(&wire);
        }
    }
    names.resize(names.len().div_ceil(8) * 8, 0);
    names
}

/// A router advertisement of `cfg` from the link-local of `mac`. `withdraw`: the last of a
/// router that stops (router lifetime 0, the prefix deprecated, the DNS servers and search
/// list expired).
fn push_ra(
    out: &mut FrameBatch,
    cfg: &Config,
    mac: Mac,
    dst: Ipv6Addr,
    dst_mac: Mac,
    withdraw: bool,
) {
    let v6 = &cfg.ipv6;
    // RFC 8106 5.1: at least three times the longest interval between advertisements.
    let dns_lifetime = if withdraw {
        0
    } else {
        (v6.ra_interval.as_secs() * 3).min(u64::from(u32::MAX)) as u32
    };
    let names = dnssl_names(&cfg.dhcp.search);
    let rdnss_len = if v6.dns.is_empty() {
        0
    } else {
        8 + 16 * v6.dns.len()
    };
    let dnssl_len = if names.is_empty() { 0 } else { 8 + names.len() };
    let len = 16 + 8 + 8 + 32 + rdnss_len + dnssl_len;
    let mut flags = 0;
    if v6.dhcpv6 == Dhcpv6Mode::Stateful {
        flags |= RA_MANAGED;
    }
    if v6.dhcpv6 != Dhcpv6Mode::Off {
        flags |= RA_OTHER;
    }
    let lifetime = if withdraw {
        0
    } else {
        v6.router_lifetime.as_secs().min(u64::from(u16::MAX)) as u16
    };
    let (valid, preferred) = if withdraw {
        (PREFIX_WITHDRAWN_VALID, 0)
    } else {
        (PREFIX_VALID, PREFIX_PREFERRED)
    };
    let h = ndp_header(link_local(mac), dst);
    push_icmp6(out, mac, dst_mac, &h, len, |b| {
        b.fill(0);
        b[0] = ROUTER_ADVERT;
        b[4] = DEFAULT_HOP_LIMIT;
        b[5] = flags;
        b[6..8].copy_from_slice(&lifetime.to_be_bytes());
        // Reachable time and retransmission timer 0: unspecified, the guest's own.
        let o = &mut b[16..];
        o[0] = OPT_SOURCE_LLADDR;
        o[1] = 1;
        o[2..8].copy_from_slice(&mac.0);
        let o = &mut o[8..];
        o[0] = OPT_MTU;
        o[1] = 1;
        o[4..8].copy_from_slice(&u32::from(cfg.nat.mtu).to_be_bytes());
        let o = &mut o[8..];
        o[0] = OPT_PREFIX_INFO;
        o[1] = 4;
        o[2] = 64;
        o[3] = PREFIX_ON_LINK | PREFIX_AUTONOMOUS;
        o[4..8].copy_from_slice(&valid.to_be_bytes());
        o[8..12].copy_from_slice(&preferred.to_be_bytes());
        o[16..32].copy_from_slice(&v6.prefix.octets());
        let mut o = &mut o[32..];
        if rdnss_len > 0 {
            o[0] = OPT_RDNSS;
            o[1] = (rdnss_len / 8) as u8;
            o[4..8].copy_from_slice(&dns_lifetime.to_be_bytes());
            for (i, d) in v6.dns.iter().enumerate() {
                o[8 + 16 * i..24 + 16 * i].copy_from_slice(&d.octets());
            }
            o = &mut o[rdnss_len..];
        }
        if dnssl_len > 0 {
            o[0] = OPT_DNSSL;
            o[1] = (dnssl_len / 8) as u8;
            o[4..8].copy_from_slice(&dns_lifetime.to_be_bytes());
            o[8..dnssl_len].copy_from_slice(&names);
        }
    });
}

#[cfg(test)]
mod tests {
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{
        EthernetFrame, EthernetProtocol, Icmpv6Packet, Icmpv6Repr, Ipv6Packet, NdiscNeighborFlags,
        NdiscRepr, NdiscRouterFlags, RawHardwareAddress,
    };

    use super::*;
    use crate::config::Dhcpv6Mode;
    use crate::sim::SimSockets;
    use crate::testing::{setup, setup_with, GUEST_MAC, HOST_MAC, T0};
    use crate::vhost::bindings::SourceCheck;
    use crate::Engine;

    const GUEST2_MAC: Mac = Mac([2, 0, 0, 0, 0, 8]);

    fn guest_ll() -> Ipv6Addr {
        link_local(GUEST_MAC)
    }

    fn host_ll() -> Ipv6Addr {
        link_local(HOST_MAC)
    }

    /// The default `ipv6.ip`.
    fn host_ula() -> Ipv6Addr {
        Ipv6Addr::from(u128::from(crate::config::DEFAULT_IPV6_PREFIX) | 1)
    }

    fn guest_ula(n: u16) -> Ipv6Addr {
        let p = crate::config::DEFAULT_IPV6_PREFIX.segments();
        Ipv6Addr::new(p[0], p[1], p[2], p[3], 0x1234, 0x5678, 0x9abc, n)
    }

    fn lladdr_opt(ty: u8, mac: Mac) -> Vec<u8> {
        let mut o = vec![ty, 1];
        o.extend_from_slice(&mac.0);
        o
    }

    /// An Ethernet frame of one IPv6 packet carrying `upper` (protocol `proto`).
    #[allow(clippy::too_many_arguments)]
    fn frame6(
        src_mac: Mac,
        dst_mac: Mac,
        src: Ipv6Addr,
        dst: Ipv6Addr,
        hop_limit: u8,
        proto: IpProtocol,
        upper: &[u8],
    ) -> Vec<u8> {
        let mut out = FrameBatch::new();
        let h = Ipv6Header {
            hop_limit,
            ..Ipv6Header::new(src, dst, proto)
        };
        push_ipv6(&mut out, src_mac, dst_mac, &h, upper.len(), |b| {
            b.copy_from_slice(upper)
        });
        out.get(0).unwrap().to_vec()
    }

    /// An ICMPv6 message with its checksum.
    fn icmp6(src: Ipv6Addr, dst: Ipv6Addr, ty: u8, code: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![ty, code, 0, 0];
        m.extend_from_slice(body);
        let c = upper_checksum6(src, dst, 58, &m);
        m[2..4].copy_from_slice(&c.to_be_bytes());
        m
    }

    fn ndp_frame(src_mac: Mac, dst_mac: Mac, src: Ipv6Addr, dst: Ipv6Addr, msg: &[u8]) -> Vec<u8> {
        frame6(src_mac, dst_mac, src, dst, 255, IpProtocol::Icmpv6, msg)
    }

    /// A neighbour solicitation's body (after the checksum): reserved, target, options.
    fn ns_body(target: Ipv6Addr, opts: &[u8]) -> Vec<u8> {
        let mut b = vec![0; 4];
        b.extend_from_slice(&target.octets());
        b.extend_from_slice(opts);
        b
    }

    fn na_body(flags: u8, target: Ipv6Addr, opts: &[u8]) -> Vec<u8> {
        let mut b = vec![flags, 0, 0, 0];
        b.extend_from_slice(&target.octets());
        b.extend_from_slice(opts);
        b
    }

    fn feed(e: &mut Engine, now: Instant, frame: &[u8]) -> FrameBatch {
        let mut h = SimSockets::default();
        let mut out = FrameBatch::new();
        e.handle_frame(now, frame, &mut h, &mut out);
        out
    }

    /// One frame the virtual host sent, checked: (Ethernet destination, the IPv6 packet).
    fn sent(out: &FrameBatch, i: usize) -> (Mac, Vec<u8>) {
        let eth = EthernetFrame::new_checked(out.get(i).unwrap()).unwrap();
        assert_eq!(crate::wire::mac(eth.src_addr()), HOST_MAC);
        assert_eq!(eth.ethertype(), EthernetProtocol::Ipv6);
        let ip = Ipv6Packet::new_checked(eth.payload()).unwrap();
        let icmp = Icmpv6Packet::new_checked(ip.payload()).unwrap();
        assert!(icmp.verify_checksum(&ip.src_addr(), &ip.dst_addr()));
        (crate::wire::mac(eth.dst_addr()), eth.payload().to_vec())
    }

    fn ndisc(packet: &[u8]) -> (Ipv6Addr, Ipv6Addr, u8, NdiscRepr<'_>) {
        let ip = Ipv6Packet::new_checked(packet).unwrap();
        let icmp = Icmpv6Packet::new_checked(ip.payload()).unwrap();
        let repr = Icmpv6Repr::parse(
            &ip.src_addr(),
            &ip.dst_addr(),
            &icmp,
            &ChecksumCapabilities::default(),
        )
        .unwrap();
        let Icmpv6Repr::Ndisc(n) = repr else {
            panic!("{repr:?}")
        };
        (ip.src_addr(), ip.dst_addr(), ip.hop_limit(), n)
    }

    fn raw(mac: Mac) -> RawHardwareAddress {
        RawHardwareAddress::from_bytes(&mac.0)
    }

    fn drops(e: &Engine, why: DropReason) -> u64 {
        e.stats().drops_of(why)
    }

    #[test]
    fn a_solicitation_for_each_host_address_gets_an_advertisement() {
        let (mut e, _, _) = setup();
        for (target, dst, dst_mac) in [
            (
                host_ula(),
                solicited_node(host_ula()),
                multicast_mac(solicited_node(host_ula())),
            ),
            (host_ll(), host_ll(), HOST_MAC),
        ] {
            let msg = icmp6(
                guest_ll(),
                dst,
                NEIGHBOR_SOLICIT,
                0,
                &ns_body(target, &lladdr_opt(OPT_SOURCE_LLADDR, GUEST_MAC)),
            );
            let out = feed(
                &mut e,
                T0,
                &ndp_frame(GUEST_MAC, dst_mac, guest_ll(), dst, &msg),
            );
            assert_eq!(out.len(), 1, "NS for {target}");
            let (eth_dst, p) = sent(&out, 0);
            assert_eq!(eth_dst, GUEST_MAC);
            let (src, dst, hop, n) = ndisc(&p);
            assert_eq!((src, dst, hop), (target, guest_ll(), 255));
            assert_eq!(
                n,
                NdiscRepr::NeighborAdvert {
                    flags: NdiscNeighborFlags::ROUTER
                        | NdiscNeighborFlags::SOLICITED
                        | NdiscNeighborFlags::OVERRIDE,
                    target_addr: target,
                    lladdr: Some(raw(HOST_MAC)),
                }
            );
        }
        assert_eq!(
            e.ctx.ndp_lookup(guest_ll()),
            Some(GUEST_MAC),
            "sender learned"
        );
        // For another guest's address: no answer, the sender still learned.
        let other = guest_ula(9);
        let msg = icmp6(
            guest_ll(),
            solicited_node(other),
            NEIGHBOR_SOLICIT,
            0,
            &ns_body(other, &[]),
        );
        let f = ndp_frame(
            GUEST_MAC,
            multicast_mac(solicited_node(other)),
            guest_ll(),
            solicited_node(other),
            &msg,
        );
        assert!(feed(&mut e, T0, &f).is_empty());
    }

    #[test]
    fn duplicate_address_detection_is_not_learned_and_ours_is_defended() {
        let (mut e, _, _) = setup();
        let tentative = guest_ula(1);
        let sn = solicited_node(tentative);
        let msg = icmp6(
            Ipv6Addr::UNSPECIFIED,
            sn,
            NEIGHBOR_SOLICIT,
            0,
            &ns_body(tentative, &[]),
        );
        let out = feed(
            &mut e,
            T0,
            &ndp_frame(
                GUEST_MAC,
                multicast_mac(sn),
                Ipv6Addr::UNSPECIFIED,
                sn,
                &msg,
            ),
        );
        assert!(out.is_empty());
        assert_eq!(e.ctx.ndp.len(), 0);
        assert_eq!(e.ctx.ndp_lookup(tentative), None);
        // A guest probing the virtual host's address is told it is taken, to all nodes.
        let ours = host_ula();
        let sn = solicited_node(ours);
        let msg = icmp6(
            Ipv6Addr::UNSPECIFIED,
            sn,
            NEIGHBOR_SOLICIT,
            0,
            &ns_body(ours, &[]),
        );
        let out = feed(
            &mut e,
            T0,
            &ndp_frame(
                GUEST_MAC,
                multicast_mac(sn),
                Ipv6Addr::UNSPECIFIED,
                sn,
                &msg,
            ),
        );
        assert_eq!(out.len(), 1);
        let (eth_dst, p) = sent(&out, 0);
        assert_eq!(eth_dst, Mac([0x33, 0x33, 0, 0, 0, 1]));
        let (_, dst, _, n) = ndisc(&p);
        assert_eq!(dst, ALL_NODES);
        let NdiscRepr::NeighborAdvert { flags, .. } = n else {
            panic!("{n:?}")
        };
        assert!(!flags.contains(NdiscNeighborFlags::SOLICITED));
        assert_eq!(e.ctx.ndp.len(), 0);
        // A probe with a source link-layer option is malformed (RFC 4861 7.1.1).
        let msg = icmp6(
            Ipv6Addr::UNSPECIFIED,
            sn,
            NEIGHBOR_SOLICIT,
            0,
            &ns_body(ours, &lladdr_opt(OPT_SOURCE_LLADDR, GUEST_MAC)),
        );
        let before = drops(&e, DropReason::Malformed);
        assert!(feed(
            &mut e,
            T0,
            &ndp_frame(
                GUEST_MAC,
                multicast_mac(sn),
                Ipv6Addr::UNSPECIFIED,
                sn,
                &msg
            )
        )
        .is_empty());
        assert_eq!(drops(&e, DropReason::Malformed), before + 1);
    }

    /// The options of a router advertisement smoltcp does not parse: (RDNSS, DNSSL) as
    /// (lifetime, servers) and (lifetime, wire names).
    #[allow(clippy::type_complexity)]
    fn dns_options(packet: &[u8]) -> (Option<(u32, Vec<Ipv6Addr>)>, Option<(u32, Vec<u8>)>) {
        let ip = Ipv6Packet::new_checked(packet).unwrap();
        let msg = ip.payload();
        let (mut rdnss, mut dnssl) = (None, None);
        let mut at = 16;
        while at < msg.len() {
            let (ty, len) = (msg[at], 8 * usize::from(msg[at + 1]));
            assert!(len > 0 && at + len <= msg.len());
            let o = &msg[at..at + len];
            let lifetime = u32::from_be_bytes(o[4..8].try_into().unwrap());
            match ty {
                OPT_RDNSS => {
                    let servers = o[8..]
                        .chunks(16)
                        .map(|c| Ipv6Addr::from(<[u8; 16]>::try_from(c).unwrap()))
                        .collect();
                    rdnss = Some((lifetime, servers));
                }
                OPT_DNSSL => dnssl = Some((lifetime, o[8..].to_vec())),
                _ => {}
            }
            at += len;
        }
        (rdnss, dnssl)
    }

    fn rs(src: Ipv6Addr, opts: &[u8]) -> Vec<u8> {
        let msg = icmp6(
            src,
            ALL_ROUTERS,
            ROUTER_SOLICIT,
            0,
            &[&[0u8; 4][..], opts].concat(),
        );
        ndp_frame(
            GUEST_MAC,
            multicast_mac(ALL_ROUTERS),
            src,
            ALL_ROUTERS,
            &msg,
        )
    }

    #[test]
    fn a_router_solicitation_gets_every_option() {
        let (mut e, _, _) = setup_with(|c| {
            c.dhcp.search = vec!["a.test".into(), "corp.example".into()];
            c.ipv6.dns = vec!["fd00::53".parse().unwrap(), "fd00::54".parse().unwrap()];
        });
        let out = feed(
            &mut e,
            T0,
            &rs(guest_ll(), &lladdr_opt(OPT_SOURCE_LLADDR, GUEST_MAC)),
        );
        assert_eq!(out.len(), 1);
        let (eth_dst, p) = sent(&out, 0);
        assert_eq!(eth_dst, GUEST_MAC);
        let (src, dst, hop, n) = ndisc(&p);
        assert_eq!((src, dst, hop), (host_ll(), guest_ll(), 255));
        let NdiscRepr::RouterAdvert {
            hop_limit,
            flags,
            router_lifetime,
            reachable_time,
            retrans_time,
            lladdr,
            mtu,
            prefix_info,
        } = n
        else {
            panic!("{n:?}")
        };
        assert_eq!(hop_limit, 64);
        assert_eq!(flags, NdiscRouterFlags::OTHER, "stateless by default");
        assert_eq!(router_lifetime.secs(), 1800);
        assert_eq!(
            (reachable_time.total_millis(), retrans_time.total_millis()),
            (0, 0)
        );
        assert_eq!(lladdr, Some(raw(HOST_MAC)));
        assert_eq!(mtu, Some(u32::from(e.ctx.cfg.nat.mtu)));
        let pi = prefix_info.unwrap();
        assert_eq!(pi.prefix_len, 64);
        assert_eq!(pi.prefix, e.ctx.cfg.ipv6.prefix);
        assert_eq!(
            (pi.valid_lifetime.secs(), pi.preferred_lifetime.secs()),
            (86400, 14400)
        );
        assert!(pi.flags.bits() & 0xc0 == 0xc0, "on-link and autonomous");
        let (rdnss, dnssl) = dns_options(&p);
        assert_eq!(
            rdnss.unwrap(),
            (
                600,
                vec!["fd00::53".parse().unwrap(), "fd00::54".parse().unwrap()]
            )
        );
        let (lifetime, names) = dnssl.unwrap();
        assert_eq!(lifetime, 600);
        assert_eq!(names.len() % 8, 0);
        let mut expected = b"\x01a\x04test\x00\x04corp\x07example\x00".to_vec();
        expected.resize(names.len(), 0);
        assert_eq!(names, expected);

        // Stateful: M and O; off: neither. No DNS servers, no search list: no RDNSS, no DNSSL.
        for (mode, want) in [
            (
                Dhcpv6Mode::Stateful,
                NdiscRouterFlags::MANAGED | NdiscRouterFlags::OTHER,
            ),
            (Dhcpv6Mode::Off, NdiscRouterFlags::empty()),
        ] {
            let (mut e, _, _) = setup_with(|c| {
                c.ipv6.dhcpv6 = mode;
                c.ipv6.dns.clear();
                c.dhcp.search.clear();
            });
            let out = feed(&mut e, T0, &rs(guest_ll(), &[]));
            let (_, p) = sent(&out, 0);
            let NdiscRepr::RouterAdvert { flags, .. } = ndisc(&p).3 else {
                panic!()
            };
            assert_eq!(flags, want);
            assert_eq!(dns_options(&p), (None, None));
        }
    }

    #[test]
    fn a_solicitation_from_nowhere_is_answered_to_all_nodes_at_a_limited_rate() {
        let (mut e, _, _) = setup();
        let out = feed(&mut e, T0, &rs(Ipv6Addr::UNSPECIFIED, &[]));
        let (eth_dst, p) = sent(&out, 0);
        assert_eq!(eth_dst, multicast_mac(ALL_NODES));
        assert_eq!(ndisc(&p).1, ALL_NODES);
        assert!(feed(
            &mut e,
            T0 + Duration::from_secs(1),
            &rs(Ipv6Addr::UNSPECIFIED, &[])
        )
        .is_empty());
        assert_eq!(drops(&e, DropReason::Limit), 1);
        assert_eq!(
            feed(
                &mut e,
                T0 + Duration::from_secs(4),
                &rs(Ipv6Addr::UNSPECIFIED, &[])
            )
            .len(),
            1
        );
        // With a link-layer option from ::, malformed.
        let f = rs(
            Ipv6Addr::UNSPECIFIED,
            &lladdr_opt(OPT_SOURCE_LLADDR, GUEST_MAC),
        );
        assert!(feed(&mut e, T0 + Duration::from_secs(9), &f).is_empty());
        assert_eq!(drops(&e, DropReason::Malformed), 1);
    }

    #[test]
    fn unsolicited_advertisements_keep_their_schedule() {
        let (mut e, mut h, mut out) = setup();
        let interval = e.ctx.cfg.ipv6.ra_interval;
        assert_eq!(e.poll_timeout(), None, "nothing before start");
        e.start(T0, &mut out);
        assert!(
            out.iter().all(|f| f[12..14] != [0x86, 0xdd]),
            "the first advertisement waits"
        );
        out.clear();
        let mut last = T0;
        for i in 0..30 {
            let t = e.poll_timeout().unwrap();
            let gap = t.saturating_since(last);
            if i < 3 {
                assert!(
                    gap <= MAX_INITIAL_RTR_ADVERT_INTERVAL,
                    "initial gap {gap:?}"
                );
            } else {
                assert!(gap >= interval / 3 && gap <= interval, "gap {gap:?}");
            }
            // Early, nothing.
            e.handle_timeout(t - Duration::from_millis(1), &mut h, &mut out);
            assert!(out.is_empty());
            e.handle_timeout(t, &mut h, &mut out);
            assert_eq!(out.len(), 1);
            let (eth_dst, p) = sent(&out, 0);
            assert_eq!(eth_dst, Mac([0x33, 0x33, 0, 0, 0, 1]));
            let (src, dst, _, n) = ndisc(&p);
            assert_eq!((src, dst), (host_ll(), ALL_NODES));
            assert!(matches!(n, NdiscRepr::RouterAdvert { .. }));
            out.clear();
            last = t;
        }
        // A worker's engine (never started) does not advertise.
        let (w, _, _) = setup();
        assert_eq!(w.poll_timeout(), None);
    }

    #[test]
    fn a_change_of_ipv6_is_advertised_at_once_and_stopping_withdraws() {
        let (mut e, mut h, mut out) = setup();
        e.start(T0, &mut out);
        out.clear();
        let mut cfg = e.ctx.cfg.clone();
        cfg.ipv6.dns = vec!["fd00::99".parse().unwrap()];
        e.reconfigure(T0, cfg.clone(), &mut h, &mut out);
        assert_eq!(out.len(), 1);
        let (_, p) = sent(&out, 0);
        assert_eq!(
            dns_options(&p).0.unwrap().1,
            vec!["fd00::99".parse::<Ipv6Addr>().unwrap()]
        );
        out.clear();
        // The same again: nothing to say.
        e.reconfigure(T0, cfg.clone(), &mut h, &mut out);
        assert!(out.is_empty());
        cfg.ipv6.enabled = false;
        e.reconfigure(T0, cfg, &mut h, &mut out);
        assert_eq!(out.len(), 1);
        let (_, p) = sent(&out, 0);
        let NdiscRepr::RouterAdvert {
            router_lifetime,
            prefix_info,
            ..
        } = ndisc(&p).3
        else {
            panic!()
        };
        assert_eq!(router_lifetime.secs(), 0);
        assert_eq!(prefix_info.unwrap().preferred_lifetime.secs(), 0);
        assert_eq!(e.poll_timeout(), None);
    }

    #[test]
    fn echo_to_a_host_address_is_answered() {
        let (mut e, _, _) = setup();
        for dst in [host_ula(), host_ll()] {
            let src = if dst == host_ll() {
                guest_ll()
            } else {
                guest_ula(1)
            };
            let msg = icmp6(
                src,
                dst,
                ECHO_REQUEST,
                0,
                &[0x12, 0x34, 0, 7, b'p', b'i', b'n', b'g'],
            );
            let out = feed(
                &mut e,
                T0,
                &frame6(GUEST_MAC, HOST_MAC, src, dst, 64, IpProtocol::Icmpv6, &msg),
            );
            assert_eq!(out.len(), 1);
            let (eth_dst, p) = sent(&out, 0);
            assert_eq!(eth_dst, GUEST_MAC);
            let ip = Ipv6Packet::new_checked(&p[..]).unwrap();
            assert_eq!(
                (ip.src_addr(), ip.dst_addr(), ip.hop_limit()),
                (dst, src, 64)
            );
            let icmp = Icmpv6Packet::new_checked(ip.payload()).unwrap();
            let r = Icmpv6Repr::parse(&dst, &src, &icmp, &ChecksumCapabilities::default()).unwrap();
            assert_eq!(
                r,
                Icmpv6Repr::EchoReply {
                    ident: 0x1234,
                    seq_no: 7,
                    data: b"ping"
                }
            );
        }
        // Not to all nodes, and not a bad checksum.
        let msg = icmp6(guest_ll(), ALL_NODES, ECHO_REQUEST, 0, &[0, 1, 0, 1]);
        let f = frame6(
            GUEST_MAC,
            multicast_mac(ALL_NODES),
            guest_ll(),
            ALL_NODES,
            64,
            IpProtocol::Icmpv6,
            &msg,
        );
        assert!(feed(&mut e, T0, &f).is_empty());
        assert_eq!(drops(&e, DropReason::Unsupported), 1);
        let mut msg = icmp6(guest_ll(), host_ll(), ECHO_REQUEST, 0, &[0, 1, 0, 1]);
        msg[7] ^= 1;
        let f = frame6(
            GUEST_MAC,
            HOST_MAC,
            guest_ll(),
            host_ll(),
            64,
            IpProtocol::Icmpv6,
            &msg,
        );
        assert!(feed(&mut e, T0, &f).is_empty());
        assert_eq!(drops(&e, DropReason::BadChecksum), 1);
        // To a foreign unicast MAC or the broadcast MAC: not the virtual host's.
        let msg = icmp6(guest_ll(), host_ll(), ECHO_REQUEST, 0, &[0, 1, 0, 1]);
        for mac in [Mac([2, 9, 9, 9, 9, 9]), Mac::BROADCAST] {
            let f = frame6(
                GUEST_MAC,
                mac,
                guest_ll(),
                host_ll(),
                64,
                IpProtocol::Icmpv6,
                &msg,
            );
            assert!(feed(&mut e, T0, &f).is_empty());
        }
    }

    #[test]
    fn claims_of_the_host_addresses_are_spoofed() {
        let (mut e, _, _) = setup();
        // An advertisement for the virtual host's address, from a guest.
        let msg = icmp6(
            guest_ll(),
            ALL_NODES,
            NEIGHBOR_ADVERT,
            0,
            &na_body(
                NA_OVERRIDE,
                host_ula(),
                &lladdr_opt(OPT_TARGET_LLADDR, GUEST_MAC),
            ),
        );
        let out = feed(
            &mut e,
            T0,
            &ndp_frame(
                GUEST_MAC,
                multicast_mac(ALL_NODES),
                guest_ll(),
                ALL_NODES,
                &msg,
            ),
        );
        assert!(out.is_empty());
        assert_eq!(drops(&e, DropReason::Spoofed), 1);
        // A router advertisement from the virtual host's link-local.
        let mut body = vec![64, 0, 0x07, 0x08, 0, 0, 0, 0, 0, 0, 0, 0];
        body.extend_from_slice(&lladdr_opt(OPT_SOURCE_LLADDR, GUEST_MAC));
        let msg = icmp6(host_ll(), ALL_NODES, ROUTER_ADVERT, 0, &body);
        let f = ndp_frame(
            GUEST_MAC,
            multicast_mac(ALL_NODES),
            host_ll(),
            ALL_NODES,
            &msg,
        );
        assert!(feed(&mut e, T0, &f).is_empty());
        assert_eq!(drops(&e, DropReason::Spoofed), 2);
        // One naming the virtual host's MAC.
        let mut body = vec![64, 0, 0x07, 0x08, 0, 0, 0, 0, 0, 0, 0, 0];
        body.extend_from_slice(&lladdr_opt(OPT_SOURCE_LLADDR, HOST_MAC));
        let msg = icmp6(guest_ll(), ALL_NODES, ROUTER_ADVERT, 0, &body);
        let f = ndp_frame(
            GUEST_MAC,
            multicast_mac(ALL_NODES),
            guest_ll(),
            ALL_NODES,
            &msg,
        );
        assert!(feed(&mut e, T0, &f).is_empty());
        assert_eq!(drops(&e, DropReason::Spoofed), 3);
        // A guest's own router advertisement: ignored.
        let mut body = vec![64, 0, 0x07, 0x08, 0, 0, 0, 0, 0, 0, 0, 0];
        body.extend_from_slice(&lladdr_opt(OPT_SOURCE_LLADDR, GUEST_MAC));
        let msg = icmp6(guest_ll(), ALL_NODES, ROUTER_ADVERT, 0, &body);
        let f = ndp_frame(
            GUEST_MAC,
            multicast_mac(ALL_NODES),
            guest_ll(),
            ALL_NODES,
            &msg,
        );
        assert!(feed(&mut e, T0, &f).is_empty());
        assert_eq!(drops(&e, DropReason::Unsupported), 1);
        // A guest sending from the virtual host's address.
        let msg = icmp6(host_ula(), ALL_NODES, ECHO_REQUEST, 0, &[0, 1, 0, 1]);
        let f = frame6(
            GUEST_MAC,
            multicast_mac(ALL_NODES),
            host_ula(),
            ALL_NODES,
            64,
            IpProtocol::Icmpv6,
            &msg,
        );
        assert!(feed(&mut e, T0, &f).is_empty());
        assert_eq!(drops(&e, DropReason::Spoofed), 4);
        assert_eq!(e.ctx.ndp.len(), 1, "only the guest's own link-local");
    }

    fn echo_from(mac: Mac, src: Ipv6Addr) -> Vec<u8> {
        let dst = host_ula();
        let msg = icmp6(src, dst, ECHO_REQUEST, 0, &[0, 1, 0, 1]);
        frame6(mac, HOST_MAC, src, dst, 64, IpProtocol::Icmpv6, &msg)
    }

    #[test]
    fn a_bound_source_from_another_mac_is_spoofed_and_moves_nothing() {
        let (mut e, _, _) = setup();
        let a = guest_ula(0x50);
        assert_eq!(feed(&mut e, T0, &echo_from(GUEST_MAC, a)).len(), 1);
        assert_eq!(e.ctx.ndp_lookup(a), Some(GUEST_MAC));
        assert!(feed(&mut e, T0, &echo_from(GUEST2_MAC, a)).is_empty());
        assert_eq!(drops(&e, DropReason::Spoofed), 1);
        assert_eq!(e.ctx.ndp_lookup(a), Some(GUEST_MAC));
        // Nor by an advertisement.
        let msg = icmp6(
            link_local(GUEST2_MAC),
            host_ll(),
            NEIGHBOR_ADVERT,
            0,
            &na_body(NA_OVERRIDE, a, &lladdr_opt(OPT_TARGET_LLADDR, GUEST2_MAC)),
        );
        let f = ndp_frame(
            GUEST2_MAC,
            HOST_MAC,
            link_local(GUEST2_MAC),
            host_ll(),
            &msg,
        );
        let _ = feed(&mut e, T0, &f);
        assert_eq!(drops(&e, DropReason::Spoofed), 2);
        assert_eq!(e.ctx.ndp_lookup(a), Some(GUEST_MAC));
        // Another MAC's link-local (its EUI-64) cannot be taken even before it is used.
        let victim = link_local(Mac([2, 0, 0, 0, 0, 0x33]));
        assert!(feed(&mut e, T0, &echo_from(GUEST2_MAC, victim)).is_empty());
        assert_eq!(drops(&e, DropReason::Spoofed), 3);
        assert_eq!(e.ctx.ndp_lookup(victim), None);
    }

    #[test]
    fn lease_mode_takes_a_mac_s_own_eui64_only() {
        let (mut e, _, _) = setup_with(|c| c.nat.source_check = SourceCheck::Lease);
        assert_eq!(feed(&mut e, T0, &echo_from(GUEST_MAC, guest_ll())).len(), 1);
        let random = guest_ula(0x77);
        assert!(feed(&mut e, T0, &echo_from(GUEST_MAC, random)).is_empty());
        assert_eq!(drops(&e, DropReason::Spoofed), 1);
    }

    #[test]
    fn a_neighbour_flood_is_bounded() {
        // One MAC: its share, then refused as a limit (in the learn mode, by its bindings).
        for mode in [SourceCheck::Learn, SourceCheck::Subnet] {
            let (mut e, _, _) = setup_with(|c| c.nat.source_check = mode);
            for n in 0..100u16 {
                let _ = feed(&mut e, T0, &echo_from(GUEST_MAC, guest_ula(n)));
            }
            assert_eq!(e.ctx.ndp.len(), MAX_NEIGHBOURS6_PER_MAC, "{mode:?}");
            assert_eq!(
                drops(&e, DropReason::Limit),
                100 - MAX_NEIGHBOURS6_PER_MAC as u64
            );
            // Idle long enough, its oldest makes room.
            let later = T0 + NEIGHBOUR_IDLE + crate::vhost::bindings::LEARNED_IDLE;
            assert_eq!(
                feed(&mut e, later, &echo_from(GUEST_MAC, guest_ula(500))).len(),
                1
            );
            assert_eq!(e.ctx.ndp_lookup(guest_ula(500)), Some(GUEST_MAC));
        }
        // Many MACs: the table never passes its bound.
        let mut ndp = Ndp::new(1);
        for i in 0..(MAX_NEIGHBOURS6 as u32 + 500) {
            let b = i.to_be_bytes();
            let mac = Mac([2, 0, b[0], b[1], b[2], b[3]]);
            let ip = Ipv6Addr::from(0xfd00_u128 << 112 | u128::from(i));
            ndp.learn(Instant::from_micros(u64::from(i)), ip, mac)
                .unwrap();
            assert!(ndp.len() <= MAX_NEIGHBOURS6);
            assert!(ndp.by_mac.len() <= MAX_NEIGHBOURS6);
        }
        assert_eq!(ndp.len(), MAX_NEIGHBOURS6);
        ndp.expire(Instant::from_secs(100_000));
        assert_eq!((ndp.len(), ndp.by_mac.len()), (0, 0));
    }

    #[test]
    fn malformed_neighbour_discovery_is_dropped() {
        let (mut e, _, _) = setup();
        let target = host_ula();
        let sn = solicited_node(target);
        let good = ns_body(target, &lladdr_opt(OPT_SOURCE_LLADDR, GUEST_MAC));
        let cases: Vec<(Vec<u8>, DropReason)> = vec![
            // Hop limit 254: it may have come through a router.
            (
                frame6(
                    GUEST_MAC,
                    multicast_mac(sn),
                    guest_ll(),
                    sn,
                    254,
                    IpProtocol::Icmpv6,
                    &icmp6(guest_ll(), sn, NEIGHBOR_SOLICIT, 0, &good),
                ),
                DropReason::Malformed,
            ),
            // Bad checksum.
            (
                {
                    let mut m = icmp6(guest_ll(), sn, NEIGHBOR_SOLICIT, 0, &good);
                    m[2] ^= 0x40;
                    ndp_frame(GUEST_MAC, multicast_mac(sn), guest_ll(), sn, &m)
                },
                DropReason::BadChecksum,
            ),
            // Code 1.
            (
                ndp_frame(
                    GUEST_MAC,
                    multicast_mac(sn),
                    guest_ll(),
                    sn,
                    &icmp6(guest_ll(), sn, NEIGHBOR_SOLICIT, 1, &good),
                ),
                DropReason::Malformed,
            ),
            // An option running past the message.
            (
                ndp_frame(
                    GUEST_MAC,
                    multicast_mac(sn),
                    guest_ll(),
                    sn,
                    &icmp6(
                        guest_ll(),
                        sn,
                        NEIGHBOR_SOLICIT,
                        0,
                        &ns_body(target, &[1, 2, 0, 0, 0, 0, 0, 0]),
                    ),
                ),
                DropReason::Malformed,
            ),
            // An option of length 0.
            (
                ndp_frame(
                    GUEST_MAC,
                    multicast_mac(sn),
                    guest_ll(),
                    sn,
                    &icmp6(
                        guest_ll(),
                        sn,
                        NEIGHBOR_SOLICIT,
                        0,
                        &ns_body(target, &[1, 0, 0, 0, 0, 0, 0, 0]),
                    ),
                ),
                DropReason::Malformed,
            ),
            // A truncated option header; a message shorter than its target.
            (
                ndp_frame(
                    GUEST_MAC,
                    multicast_mac(sn),
                    guest_ll(),
                    sn,
                    &icmp6(guest_ll(), sn, NEIGHBOR_SOLICIT, 0, &ns_body(target, &[1])),
                ),
                DropReason::Malformed,
            ),
            (
                ndp_frame(
                    GUEST_MAC,
                    multicast_mac(sn),
                    guest_ll(),
                    sn,
                    &icmp6(
                        guest_ll(),
                        sn,
                        NEIGHBOR_SOLICIT,
                        0,
                        &ns_body(target, &[])[..10],
                    ),
                ),
                DropReason::Malformed,
            ),
            // A multicast target.
            (
                ndp_frame(
                    GUEST_MAC,
                    multicast_mac(sn),
                    guest_ll(),
                    sn,
                    &icmp6(
                        guest_ll(),
                        sn,
                        NEIGHBOR_SOLICIT,
                        0,
                        &ns_body(ALL_NODES, &[]),
                    ),
                ),
                DropReason::Malformed,
            ),
            // A solicited advertisement to a multicast group.
            (
                ndp_frame(
                    GUEST_MAC,
                    multicast_mac(ALL_NODES),
                    guest_ll(),
                    ALL_NODES,
                    &icmp6(
                        guest_ll(),
                        ALL_NODES,
                        NEIGHBOR_ADVERT,
                        0,
                        &na_body(NA_SOLICITED, guest_ula(3), &[]),
                    ),
                ),
                DropReason::Malformed,
            ),
            // A link-layer option that is not the sender's MAC.
            (
                ndp_frame(
                    GUEST_MAC,
                    multicast_mac(sn),
                    guest_ll(),
                    sn,
                    &icmp6(
                        guest_ll(),
                        sn,
                        NEIGHBOR_SOLICIT,
                        0,
                        &ns_body(target, &lladdr_opt(OPT_SOURCE_LLADDR, GUEST2_MAC)),
                    ),
                ),
                DropReason::Spoofed,
            ),
        ];
        for (i, (f, why)) in cases.into_iter().enumerate() {
            let before = drops(&e, why);
            let out = feed(&mut e, T0, &f);
            assert!(out.is_empty(), "case {i} answered");
            assert_eq!(drops(&e, why), before + 1, "case {i}: {why:?}");
        }
        assert_eq!(
            e.ctx.ndp.len(),
            1,
            "only the one well-formed but spoofing NS's sender"
        );
    }

    #[test]
    fn an_unknown_guest_is_solicited_at_a_limited_rate() {
        let (mut e, _, mut out) = setup();
        let g = guest_ula(0x42);
        assert_eq!(e.ctx.ndp_resolve(T0, g, &mut out), None);
        assert_eq!(out.len(), 1);
        let (eth_dst, p) = sent(&out, 0);
        assert_eq!(eth_dst, multicast_mac(solicited_node(g)));
        let (src, dst, hop, n) = ndisc(&p);
        assert_eq!((src, dst, hop), (host_ula(), solicited_node(g), 255));
        assert_eq!(
            n,
            NdiscRepr::NeighborSolicit {
                target_addr: g,
                lladdr: Some(raw(HOST_MAC))
            }
        );
        out.clear();
        assert_eq!(
            e.ctx
                .ndp_resolve(T0 + Duration::from_millis(500), g, &mut out),
            None
        );
        assert!(out.is_empty(), "once a second");
        // Not for addresses no guest may have.
        for ip in [ALL_NODES, host_ll(), "2001:db8::1".parse().unwrap()] {
            assert_eq!(e.ctx.ndp_resolve(T0, ip, &mut out), None);
        }
        assert!(out.is_empty());
        // The guest answers.
        let msg = icmp6(
            g,
            host_ula(),
            NEIGHBOR_ADVERT,
            0,
            &na_body(
                NA_SOLICITED | NA_OVERRIDE,
                g,
                &lladdr_opt(OPT_TARGET_LLADDR, GUEST_MAC),
            ),
        );
        let f = ndp_frame(GUEST_MAC, HOST_MAC, g, host_ula(), &msg);
        assert!(feed(&mut e, T0, &f).is_empty());
        assert_eq!(e.ctx.ndp_resolve(T0, g, &mut out), Some(GUEST_MAC));
        assert_eq!(e.ctx.ndp_lookup(g), Some(GUEST_MAC));
        // Pending solicitations are bounded.
        for n in 0..(MAX_PENDING as u16 + 50) {
            let _ = e
                .ctx
                .ndp_resolve(T0 + Duration::from_secs(5), guest_ula(0x1000 + n), &mut out);
        }
        assert_eq!(out.len(), MAX_PENDING);
    }

    #[test]
    fn other_traffic_is_left_to_others() {
        let (mut e, _, _) = setup();
        // An MLDv2 report: dropped quietly as unsupported.
        let mld = icmp6(guest_ll(), "ff02::16".parse().unwrap(), 143, 0, &[0; 4]);
        let f = frame6(
            GUEST_MAC,
            Mac([0x33, 0x33, 0, 0, 0, 0x16]),
            guest_ll(),
            "ff02::16".parse().unwrap(),
            1,
            IpProtocol::Icmpv6,
            &mld,
        );
        assert!(feed(&mut e, T0, &f).is_empty());
        assert_eq!(drops(&e, DropReason::Unsupported), 1);
        // DHCPv6 to All_DHCP_Relay_Agents_and_Servers reaches the DHCPv6 server, which
        // refuses a zero UDP checksum.
        let agents: Ipv6Addr = "ff02::1:2".parse().unwrap();
        let udp = [0x02, 0x22, 0x02, 0x23, 0, 8, 0, 0];
        let f = frame6(
            GUEST_MAC,
            multicast_mac(agents),
            guest_ll(),
            agents,
            1,
            IpProtocol::Udp,
            &udp,
        );
        assert!(feed(&mut e, T0, &f).is_empty());
        assert_eq!(drops(&e, DropReason::BadChecksum), 1);
        // An echo request to a remote address: the NAT's, which sends it on.
        let remote: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let src = guest_ula(1);
        let msg = icmp6(src, remote, ECHO_REQUEST, 0, &[0, 1, 0, 1]);
        let f = frame6(
            GUEST_MAC,
            HOST_MAC,
            src,
            remote,
            64,
            IpProtocol::Icmpv6,
            &msg,
        );
        assert!(feed(&mut e, T0, &f).is_empty());
        assert_eq!(drops(&e, DropReason::Foreign), 0);
        assert_eq!(e.nat.icmp.len(), 1);
        // A unicast packet in a multicast frame: not answered.
        let msg = icmp6(src, host_ula(), ECHO_REQUEST, 0, &[0, 1, 0, 1]);
        let f = frame6(
            GUEST_MAC,
            multicast_mac(ALL_NODES),
            src,
            host_ula(),
            64,
            IpProtocol::Icmpv6,
            &msg,
        );
        assert!(feed(&mut e, T0, &f).is_empty());
        assert_eq!(drops(&e, DropReason::Foreign), 1);
        // IPv6 off: foreign, as before.
        let (mut e, _, _) = setup_with(|c| c.ipv6.enabled = false);
        assert!(feed(&mut e, T0, &rs(guest_ll(), &[])).is_empty());
        assert_eq!(drops(&e, DropReason::Foreign), 1);
    }
}
