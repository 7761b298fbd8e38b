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

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::Mac;
use crate::engine::SharedSessions;
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

/// Learned addresses a MAC may hold at once.
pub(crate) const MAX_LEARNED_PER_MAC: usize = 4;
/// Learned addresses in all.
pub(crate) const MAX_LEARNED: usize = 4096;
/// A learned address unused this long is free for another MAC.
pub(crate) const LEARNED_IDLE: Duration = Duration::from_secs(600);
/// How often an engine tells the shared bindings that a learned address is still in use.
const REPORT_EVERY: Duration = Duration::from_secs(60);

/// The verdict on a frame's source.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Verdict {
    Bound,
    Claimable,
    Refused,
}

/// The bindings of one segment.
#[derive(Clone, Default, Debug)]
pub struct Bindings {
    by_ip: HashMap<Ipv4Addr, Binding>,
    learned: usize,
}

impl Bindings {
    fn verdict(&self, mode: SourceCheck, now: Instant, mac: Mac, ip: Ipv4Addr) -> Verdict {
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
    pub fn claim(&mut self, now: Instant, mac: Mac, ip: Ipv4Addr) -> bool {
        match self.verdict(SourceCheck::Learn, now, mac, ip) {
            Verdict::Bound => return true,
            Verdict::Refused => return false,
            Verdict::Claimable => {}
        }
        let held = self
            .by_ip
            .values()
            .filter(|b| b.mac == mac && b.by == BoundBy::Learned)
            .count();
        if held >= MAX_LEARNED_PER_MAC {
            // The MAC's idlest learned address makes room, if it is idle enough.
            return false;
        }
        if self.by_ip.remove(&ip).is_some() {
            self.learned -= 1;
        }
        if self.learned >= MAX_LEARNED {
            self.expire(now);
            if self.learned >= MAX_LEARNED {
                return false;
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
        true
    }

    /// Binds `ip` to `mac` because of a lease or the configuration: it takes the address from
    /// whoever had learned it.
    pub fn bind(&mut self, now: Instant, ip: Ipv4Addr, mac: Mac, by: BoundBy) {
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
    pub fn unbind(&mut self, ip: Ipv4Addr, by: BoundBy) {
        if self.by_ip.get(&ip).is_some_and(|b| b.by == by) {
            self.by_ip.remove(&ip);
            if by == BoundBy::Learned {
                self.learned -= 1;
            }
        }
    }

    /// Records that `ip` is in use by its owner now.
    pub fn touch(&mut self, now: Instant, ip: Ipv4Addr) {
        if let Some(b) = self.by_ip.get_mut(&ip) {
            b.last_seen = b.last_seen.max(now);
        }
    }

    /// The owner of `ip`, if bound.
    pub(crate) fn get(&self, ip: Ipv4Addr) -> Option<&Binding> {
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
}

impl Sources {
    /// Makes the bindings those of `shared` (the engines of one runtime see the same).
    pub(crate) fn share(&mut self, shared: Arc<dyn SharedSessions>) {
        self.shared = Some(shared);
        self.generation = u64::MAX;
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
        let gone: Vec<Ipv4Addr> = self
            .local
            .by_ip
            .iter()
            .filter(|(ip, b)| b.by == BoundBy::Lease && !leases.iter().any(|(l, _)| l == *ip))
            .map(|(ip, _)| *ip)
            .collect();
        for ip in gone {
            self.unbind(ip, BoundBy::Lease);
        }
        for &(ip, mac) in leases {
            let current = self.local.get(ip);
            if current.is_none_or(|b| b.by != BoundBy::Lease || b.mac != mac) {
                self.bind(now, ip, mac, BoundBy::Lease);
            }
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
}
