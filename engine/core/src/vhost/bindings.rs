//! Which guest may send from which address: the source binding of the segment.
//!
//! A guest is a MAC on the segment. Without a binding, any guest could send as another guest's
//! address: its packets would be carried, the neighbour entry would move to it (so the victim's
//! answers would go to the attacker), and per-guest limits keyed by address would be shared with
//! the victim. So each IPv4 source is bound to one MAC, by one of:
//! - a DHCP lease (the server binds and unbinds as leases come and go);
//! - a static binding of the configuration (`nat.bindings`);
//! - in the `learn` mode (the default), first use: an address no one holds is bound to the first
//!   MAC that sends from it (at most `MAX_LEARNED_PER_MAC` addresses a MAC, `MAX_LEARNED` in all),
//!   until that MAC has not used it for `LEARNED_IDLE`. Guests with static addresses keep working,
//!   and none can take an address another guest is using.
//!
//! `nat.source_check = "lease"` accepts only leases and static bindings; `"subnet"` accepts any
//! source of the virtual network from any MAC (SecureNAT's behaviour).
//!
//! Every engine checks every guest frame against its own copy (`Sources`), without a lock; in a
//! multi-worker runtime the bindings themselves live in the shared accounting
//! (`SharedSessions`), and an engine copies them again only when their generation changed.
//!
//! IPv6 sources are bound the same way in a map of their own (`Bindings<Ipv6Addr>`, checked by
//! `Sources::check6`): a guest's link-local, SLAAC and DHCPv6 addresses, up to
//! `MAX_LEARNED_PER_MAC_V6` learned a MAC (privacy addresses come and go). In the `lease` mode an
//! IPv6 source is accepted from a MAC only if it is leased or bound to it, or if its interface id
//! is that MAC's EUI-64 (the link-local every stack starts with, and EUI-64 SLAAC): the segment
//! could not even resolve its router without the link-local.

use std::collections::HashMap;
use std::fmt::Debug;
use std::hash::Hash;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::Mac;
use crate::engine::SharedSessions;
use crate::stats::DropReason;
use crate::time::Instant;

/// How guests' source addresses are checked (`nat.source_check`).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceCheck {
    /// Only addresses leased by DHCP or bound in the configuration, each from its own MAC.
    Lease,
    /// Leases, static bindings, and addresses bound to the first MAC that uses them.
    #[default]
    Learn,
    /// Any address of the virtual network from any MAC.
    Subnet,
}

/// Why an address is bound.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum BoundBy {
    /// A DHCP lease.
    Lease,
    /// `nat.bindings` in the configuration.
    Static,
    /// First use, in the `learn` mode.
    Learned,
}

/// One address's owner.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct Binding {
    /// The MAC that may send from the address.
    pub(crate) mac: Mac,
    /// Why.
    pub(crate) by: BoundBy,
    /// When the owner last sent from it (learned bindings expire by it).
    pub(crate) last_seen: Instant,
}

/// Learned IPv4 addresses a MAC may hold at once.
pub(crate) const MAX_LEARNED_PER_MAC: usize = 4;
/// Learned IPv6 addresses a MAC may hold at once: a link-local, a SLAAC address, a DHCPv6
/// lease and the temporary addresses (RFC 8981) a stack rotates through.
pub(crate) const MAX_LEARNED_PER_MAC_V6: usize = 16;
/// Learned addresses in all.
pub(crate) const MAX_LEARNED: usize = 4096;
/// A learned address unused this long is free for another MAC.
pub(crate) const LEARNED_IDLE: Duration = Duration::from_secs(600);
/// How often an engine tells the shared bindings that a learned address is still in use.
const REPORT_EVERY: Duration = Duration::from_secs(60);

/// An address family sources are bound in.
pub trait BindAddr: Copy + Eq + Hash + Debug + Send + Sync + 'static {
    /// Learned addresses of this family a MAC may hold at once.
    const MAX_LEARNED_PER_MAC: usize;
}

impl BindAddr for Ipv4Addr {
    const MAX_LEARNED_PER_MAC: usize = MAX_LEARNED_PER_MAC;
}

impl BindAddr for Ipv6Addr {
    const MAX_LEARNED_PER_MAC: usize = MAX_LEARNED_PER_MAC_V6;
}

/// The verdict on a frame's source.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Verdict {
    Bound,
    Claimable,
    Refused,
}

/// Why a first use did not bind.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ClaimRefused {
    /// Another MAC holds the address.
    Held,
    /// The MAC holds its share of learned addresses, or the table is full.
    Full,
}

impl ClaimRefused {
    /// How a frame refused for this is counted.
    pub fn drop_reason(self) -> DropReason {
        match self {
            ClaimRefused::Held => DropReason::Spoofed,
            ClaimRefused::Full => DropReason::Limit,
        }
    }
}

/// The bindings of one segment, for one address family (IPv4 unless named).
#[derive(Clone, Debug)]
pub struct Bindings<A: BindAddr = Ipv4Addr> {
    by_ip: HashMap<A, Binding>,
    learned: usize,
}

impl<A: BindAddr> Default for Bindings<A> {
    fn default() -> Self {
        Bindings {
            by_ip: HashMap::new(),
            learned: 0,
        }
    }
}

impl<A: BindAddr> Bindings<A> {
    fn verdict(&self, mode: SourceCheck, now: Instant, mac: Mac, ip: A) -> Verdict {
        match self.by_ip.get(&ip) {
            Some(b) if b.mac == mac => Verdict::Bound,
            Some(b)
                if mode == SourceCheck::Learn
                    && b.by == BoundBy::Learned
                    && now.saturating_since(b.last_seen) >= LEARNED_IDLE =>
            {
                Verdict::Claimable
            }
            Some(_) => Verdict::Refused,
            None if mode == SourceCheck::Learn => Verdict::Claimable,
            None => Verdict::Refused,
        }
    }

    /// Binds `ip` to `mac` as first use, if it is free (or its learned owner went idle) and
    /// `mac` holds fewer than `MAX_LEARNED_PER_MAC` learned addresses. True when bound.
    pub fn claim(&mut self, now: Instant, mac: Mac, ip: A) -> bool {
        self.try_claim(now, mac, ip).is_ok()
    }

    /// `claim`, saying why it did not bind.
    pub fn try_claim(&mut self, now: Instant, mac: Mac, ip: A) -> Result<(), ClaimRefused> {
        match self.verdict(SourceCheck::Learn, now, mac, ip) {
            Verdict::Bound => return Ok(()),
            Verdict::Refused => return Err(ClaimRefused::Held),
            Verdict::Claimable => {}
        }
        let mut held = 0;
        let mut idlest: Option<(A, Instant)> = None;
        for (a, b) in &self.by_ip {
            if b.mac == mac && b.by == BoundBy::Learned {
                held += 1;
                if idlest.is_none_or(|(_, t)| b.last_seen < t) {
                    idlest = Some((*a, b.last_seen));
                }
            }
        }
        if held >= A::MAX_LEARNED_PER_MAC {
            // The MAC's idlest learned address makes room, if it is idle enough.
            match idlest {
                Some((a, t)) if now.saturating_since(t) >= LEARNED_IDLE => {
                    self.by_ip.remove(&a);
                    self.learned -= 1;
                }
                _ => return Err(ClaimRefused::Full),
            }
        }
        if self.by_ip.remove(&ip).is_some() {
            self.learned -= 1;
        }
        if self.learned >= MAX_LEARNED {
            self.expire(now);
            if self.learned >= MAX_LEARNED {
                return Err(ClaimRefused::Full);
            }
        }
        self.by_ip.insert(
            ip,
            Binding {
                mac,
                by: BoundBy::Learned,
                last_seen: now,
            },
        );
        self.learned += 1;
        Ok(())
    }

    /// Binds `ip` to `mac` because of a lease or the configuration: it takes the address from
    /// whoever had learned it.
    pub fn bind(&mut self, now: Instant, ip: A, mac: Mac, by: BoundBy) {
        let old = self.by_ip.insert(
            ip,
            Binding {
                mac,
                by,
                last_seen: now,
            },
        );
        if old.is_some_and(|b| b.by == BoundBy::Learned) {
            self.learned -= 1;
        }
        if by == BoundBy::Learned {
            self.learned += 1;
        }
    }

    /// Ends the binding of `ip` if it is of kind `by`.
    pub fn unbind(&mut self, ip: A, by: BoundBy) {
        if self.by_ip.get(&ip).is_some_and(|b| b.by == by) {
            self.by_ip.remove(&ip);
            if by == BoundBy::Learned {
                self.learned -= 1;
            }
        }
    }

    /// Records that `ip` is in use by its owner now.
    pub fn touch(&mut self, now: Instant, ip: A) {
        if let Some(b) = self.by_ip.get_mut(&ip) {
            b.last_seen = b.last_seen.max(now);
        }
    }

    /// The owner of `ip`, if bound.
    /// What making the lease bindings those of `leases` takes: the lease bindings to end, and
    /// the leases not bound (or bound otherwise) yet.
    fn lease_changes(&self, leases: &[(A, Mac)]) -> (Vec<A>, Vec<(A, Mac)>) {
        let gone = (self.by_ip.iter())
            .filter(|(ip, b)| b.by == BoundBy::Lease && !leases.iter().any(|(l, _)| l == *ip))
            .map(|(ip, _)| *ip)
            .collect();
        let new = (leases.iter().copied())
            .filter(|&(ip, mac)| {
                self.get(ip)
                    .is_none_or(|b| b.by != BoundBy::Lease || b.mac != mac)
            })
            .collect();
        (gone, new)
    }

    pub(crate) fn get(&self, ip: A) -> Option<&Binding> {
        self.by_ip.get(&ip)
    }

    fn expire(&mut self, now: Instant) {
        let before = self.by_ip.len();
        self.by_ip.retain(|_, b| {
            b.by != BoundBy::Learned || now.saturating_since(b.last_seen) < LEARNED_IDLE
        });
        self.learned -= before - self.by_ip.len();
    }
}

/// An engine's view of the bindings: its own copy, kept in step with the shared ones when the
/// engine is one of several.
#[derive(Default)]
pub(crate) struct Sources {
    local: Bindings,
    generation: u64,
    shared: Option<Arc<dyn SharedSessions>>,
    /// When each learned address was last reported in use to the shared bindings.
    reported: HashMap<Ipv4Addr, Instant>,
    /// The IPv6 bindings: this engine's copy, and its generation when shared.
    local6: Bindings<Ipv6Addr>,
    generation6: Option<u64>,
    reported6: HashMap<Ipv6Addr, Instant>,
}

/// What the DNS relay's names see of the IPv6 bindings.
impl crate::vhost::names::GuestAddrs6 for Sources {
    /// The IPv6 addresses other than link-local that `mac` holds now (a DHCPv6 lease's, those
    /// it sends from), at most 8, in order: what the DNS relay answers for its name's AAAA.
    fn ipv6_of(&mut self, mac: Mac) -> Vec<Ipv6Addr> {
        self.refresh6();
        let mut v: Vec<Ipv6Addr> = (self.local6.by_ip.iter())
            .filter(|(ip, b)| b.mac == mac && !crate::wire::is_link_local(**ip))
            .map(|(ip, _)| *ip)
            .collect();
        v.sort_unstable();
        v.truncate(8);
        v
    }

    /// The MAC holding the IPv6 address `ip`, unless it is link-local: whose name the PTR of
    /// `ip` gives.
    fn mac_of6(&mut self, ip: Ipv6Addr) -> Option<Mac> {
        if crate::wire::is_link_local(ip) {
            return None;
        }
        self.refresh6();
        self.local6.get(ip).map(|b| b.mac)
    }
}

/// The MAC whose modified EUI-64 interface id (RFC 4291 appendix A) ends `ip`, if its interface
/// id is one.
pub(crate) fn eui64_mac(ip: Ipv6Addr) -> Option<Mac> {
    let o = ip.octets();
    (o[11] == 0xff && o[12] == 0xfe).then(|| Mac([o[8] ^ 0x02, o[9], o[10], o[13], o[14], o[15]]))
}

impl Sources {
    /// Makes the bindings those of `shared` (the engines of one runtime see the same).
    pub(crate) fn share(&mut self, shared: Arc<dyn SharedSessions>) {
        self.generation = u64::MAX;
        // An implementation that keeps no IPv6 bindings leaves each engine its own.
        self.generation6 = shared.bindings6_generation().map(|_| u64::MAX);
        self.shared = Some(shared);
    }

    fn refresh(&mut self) {
        if let Some(s) = &self.shared {
            let g = s.bindings_generation();
            if g != self.generation {
                self.local = s.bindings();
                self.generation = g;
            }
        }
    }

    fn shared6(&self) -> Option<&Arc<dyn SharedSessions>> {
        self.shared.as_ref().filter(|_| self.generation6.is_some())
    }

    fn refresh6(&mut self) {
        let Some(s) = self.shared6() else { return };
        let g = s.bindings6_generation();
        if g != self.generation6 {
            self.local6 = s.bindings6();
            self.generation6 = g;
        }
    }

    /// Whether `mac` may send from the IPv6 address `ip` now (binding it by first use where the
    /// mode allows); the refusal says how to count the frame: `Spoofed` (another MAC holds it)
    /// or `Limit` (the MAC holds its share of learned addresses).
    ///
    /// An interface id that is a MAC's EUI-64 belongs to that MAC alone: no other may take it by
    /// first use (else a guest could claim a victim's link-local before the victim comes up),
    /// and in the `lease` mode the MAC may send from it unbound.
    pub(crate) fn check6(
        &mut self,
        mode: SourceCheck,
        now: Instant,
        mac: Mac,
        ip: Ipv6Addr,
    ) -> Result<(), DropReason> {
        if mode == SourceCheck::Subnet {
            return Ok(());
        }
        self.refresh6();
        let eui = eui64_mac(ip);
        match self.local6.verdict(mode, now, mac, ip) {
            Verdict::Bound => {
                self.local6.touch(now, ip);
                if let Some(s) = self.shared6() {
                    let s = Arc::clone(s);
                    if self.reported6.len() >= MAX_LEARNED {
                        let local = &self.local6;
                        self.reported6.retain(|ip, _| local.get(*ip).is_some());
                    }
                    let last = self.reported6.entry(ip).or_insert(now);
                    if now.saturating_since(*last) >= REPORT_EVERY {
                        *last = now;
                        s.touch_binding6(now, ip);
                    }
                }
                Ok(())
            }
            _ if eui.is_some_and(|m| m != mac) => Err(DropReason::Spoofed),
            Verdict::Refused if mode == SourceCheck::Lease => {
                let held = self.local6.get(ip).is_some();
                if eui == Some(mac) && !held {
                    Ok(())
                } else {
                    Err(DropReason::Spoofed)
                }
            }
            Verdict::Refused => Err(DropReason::Spoofed),
            Verdict::Claimable => {
                let r = match self.shared6() {
                    Some(s) => {
                        let r = s.claim_binding6(now, mac, ip);
                        if r.is_ok() {
                            // Seen at once, before the next refresh brings the shared copy.
                            self.local6.bind(now, ip, mac, BoundBy::Learned);
                        }
                        r
                    }
                    None => self.local6.try_claim(now, mac, ip),
                };
                r.map_err(ClaimRefused::drop_reason)
            }
        }
    }

    /// Makes the IPv6 lease bindings those of `leases` (address, MAC): the DHCPv6 lease table
    /// changed.
    pub(crate) fn sync_leases6(&mut self, now: Instant, leases: &[(Ipv6Addr, Mac)]) {
        self.refresh();
        let (gone, new) = self.local6.lease_changes(leases);
        for ip in gone {
            self.unbind6(ip, BoundBy::Lease);
        }
        for (ip, mac) in new {
            self.bind6(now, ip, mac, BoundBy::Lease);
        }
    }

    /// Binds the IPv6 address `ip` to `mac` (a DHCPv6 lease or the configuration), in the
    /// shared bindings too.
    pub(crate) fn bind6(&mut self, now: Instant, ip: Ipv6Addr, mac: Mac, by: BoundBy) {
        if let Some(s) = self.shared6() {
            s.bind6(now, ip, mac, by);
        }
        self.local6.bind(now, ip, mac, by);
    }

    /// Ends an IPv6 binding of kind `by`, in the shared bindings too.
    pub(crate) fn unbind6(&mut self, ip: Ipv6Addr, by: BoundBy) {
        if let Some(s) = self.shared6() {
            s.unbind6(ip, by);
        }
        self.local6.unbind(ip, by);
        self.reported6.remove(&ip);
    }

    /// Whether `mac` may send from `ip` now (binding it by first use where the mode allows).
    pub(crate) fn check(
        &mut self,
        mode: SourceCheck,
        now: Instant,
        mac: Mac,
        ip: Ipv4Addr,
    ) -> bool {
        if mode == SourceCheck::Subnet {
            return true;
        }
        self.refresh();
        match self.local.verdict(mode, now, mac, ip) {
            Verdict::Bound => {
                self.local.touch(now, ip);
                if let Some(s) = &self.shared {
                    let last = self.reported.entry(ip).or_insert(now);
                    if now.saturating_since(*last) >= REPORT_EVERY {
                        *last = now;
                        s.touch_binding(now, ip);
                    }
                }
                true
            }
            Verdict::Refused => false,
            Verdict::Claimable => match &self.shared {
                Some(s) => {
                    let ok = s.claim_binding(now, mac, ip);
                    if ok {
                        // Seen at once, before the next refresh brings the shared copy.
                        self.local.bind(now, ip, mac, BoundBy::Learned);
                    }
                    ok
                }
                None => self.local.claim(now, mac, ip),
            },
        }
    }

    /// Whether `check` would let `mac` send from `ip` now, without binding or touching
    /// anything (a guest about to be sent a flow must be able to answer it).
    pub(crate) fn would_accept(
        &mut self,
        mode: SourceCheck,
        now: Instant,
        mac: Mac,
        ip: Ipv4Addr,
    ) -> bool {
        if mode == SourceCheck::Subnet {
            return true;
        }
        self.refresh();
        self.local.verdict(mode, now, mac, ip) != Verdict::Refused
    }

    /// Binds `ip` to `mac` (a lease or the configuration), in the shared bindings too.
    pub(crate) fn bind(&mut self, now: Instant, ip: Ipv4Addr, mac: Mac, by: BoundBy) {
        if let Some(s) = &self.shared {
            s.bind(now, ip, mac, by);
        }
        self.local.bind(now, ip, mac, by);
    }

    /// When `ip`'s owner was last seen sending from it, as far as this engine knows.
    pub(crate) fn last_seen(&self, ip: Ipv4Addr) -> Option<Instant> {
        self.local.get(ip).map(|b| b.last_seen)
    }

    /// Makes the lease bindings those of `leases` (address, MAC): the lease table changed.
    pub(crate) fn sync_leases(&mut self, now: Instant, leases: &[(Ipv4Addr, Mac)]) {
        self.refresh();
        let (gone, new) = self.local.lease_changes(leases);
        for ip in gone {
            self.unbind(ip, BoundBy::Lease);
        }
        for (ip, mac) in new {
            self.bind(now, ip, mac, BoundBy::Lease);
        }
    }

    /// Ends a binding of kind `by`, in the shared bindings too.
    pub(crate) fn unbind(&mut self, ip: Ipv4Addr, by: BoundBy) {
        if let Some(s) = &self.shared {
            s.unbind(ip, by);
        }
        self.local.unbind(ip, by);
        self.reported.remove(&ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Mac = Mac([2, 0, 0, 0, 0, 0x0a]);
    const B: Mac = Mac([2, 0, 0, 0, 0, 0x0b]);
    const T0: Instant = Instant::from_secs(1);

    fn ip(n: u8) -> Ipv4Addr {
        Ipv4Addr::new(192, 168, 30, n)
    }

    #[test]
    fn first_use_binds_and_another_mac_is_refused_until_the_owner_goes_idle() {
        let mut s = Sources::default();
        assert!(s.check(SourceCheck::Learn, T0, A, ip(50)));
        assert!(
            !s.check(SourceCheck::Learn, T0, B, ip(50)),
            "B spoofs A's address"
        );
        assert!(s.check(SourceCheck::Learn, T0 + Duration::from_secs(500), A, ip(50)));
        let later = T0 + Duration::from_secs(500) + LEARNED_IDLE;
        assert!(
            s.check(SourceCheck::Learn, later, B, ip(50)),
            "A left it idle"
        );
        assert!(!s.check(SourceCheck::Learn, later, A, ip(50)));
    }

    #[test]
    fn a_mac_learns_a_few_addresses_only() {
        let mut s = Sources::default();
        for n in 0..MAX_LEARNED_PER_MAC as u8 {
            assert!(s.check(SourceCheck::Learn, T0, A, ip(60 + n)));
        }
        assert!(!s.check(SourceCheck::Learn, T0, A, ip(99)));
        assert!(s.check(SourceCheck::Learn, T0, B, ip(99)));
    }

    #[test]
    fn leases_take_precedence_and_lease_mode_knows_nothing_else() {
        let mut s = Sources::default();
        assert!(s.check(SourceCheck::Learn, T0, A, ip(10)));
        s.bind(T0, ip(10), B, BoundBy::Lease);
        assert!(
            !s.check(SourceCheck::Learn, T0, A, ip(10)),
            "leased to B now"
        );
        assert!(s.check(SourceCheck::Lease, T0, B, ip(10)));
        assert!(!s.check(SourceCheck::Lease, T0, A, ip(11)), "not leased");
        s.unbind(ip(10), BoundBy::Lease);
        assert!(!s.check(SourceCheck::Lease, T0, B, ip(10)));
        assert!(
            s.check(SourceCheck::Subnet, T0, A, ip(10)),
            "subnet mode checks nothing"
        );
    }

    fn ip6(n: u16) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0, 0, 1, 0x1234, 0, 0, n)
    }

    #[test]
    fn ipv6_sources_bind_by_first_use_and_eui64_is_its_mac_s() {
        let mut s = Sources::default();
        let mode = SourceCheck::Learn;
        assert_eq!(s.check6(mode, T0, A, ip6(1)), Ok(()));
        assert_eq!(s.check6(mode, T0, B, ip6(1)), Err(DropReason::Spoofed));
        // A's link-local is A's even before A uses it.
        let a_ll = crate::wire::link_local(A);
        assert_eq!(eui64_mac(a_ll), Some(A));
        assert_eq!(s.check6(mode, T0, B, a_ll), Err(DropReason::Spoofed));
        assert_eq!(s.check6(mode, T0, A, a_ll), Ok(()));
        // A MAC's share, then a limit; an idle address of its own makes room.
        for n in 2..MAX_LEARNED_PER_MAC_V6 as u16 {
            assert_eq!(s.check6(mode, T0, A, ip6(n)), Ok(()));
        }
        assert_eq!(s.check6(mode, T0, A, ip6(99)), Err(DropReason::Limit));
        let later = T0 + LEARNED_IDLE;
        assert_eq!(s.check6(mode, later, A, ip6(99)), Ok(()));
        // The IPv4 bindings are apart.
        assert!(s.check(mode, T0, B, ip(1)));
        // Lease mode: a MAC's own EUI-64 addresses, and bound ones, only.
        let mut s = Sources::default();
        let mode = SourceCheck::Lease;
        assert_eq!(s.check6(mode, T0, A, a_ll), Ok(()));
        assert_eq!(s.check6(mode, T0, B, a_ll), Err(DropReason::Spoofed));
        assert_eq!(s.check6(mode, T0, A, ip6(5)), Err(DropReason::Spoofed));
        s.bind6(T0, ip6(5), A, BoundBy::Lease);
        assert_eq!(s.check6(mode, T0, A, ip6(5)), Ok(()));
        s.unbind6(ip6(5), BoundBy::Lease);
        assert_eq!(s.check6(mode, T0, A, ip6(5)), Err(DropReason::Spoofed));
    }
}
