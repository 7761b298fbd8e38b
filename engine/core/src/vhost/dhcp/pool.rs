//! The address pool and the lease table of the DHCP server: which address a client gets, the
//! offers and declines that hold addresses back, the addresses remembered for clients that come
//! back, lease expiry, and the restore of a saved table.
//!
//! A static reservation gives its MAC one address, in the range or outside it: that address is
//! never given to another MAC, and the reserved MAC is given it before anything else. While it
//! cannot be (another MAC's lease from before the reservation still holds it, or the reserved
//! MAC declined it), the reserved MAC is served from the range like any client, and is moved to
//! its address at its next renewal (NAK) once the address is free.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::time::Duration;

use super::Reservation;
use crate::config::{DhcpConfig, Mac};
use crate::event::{Event, Events};
use crate::time::{earliest, Instant};

/// How long an OFFER holds its address for the client it was made to.
pub(crate) const OFFER_HOLD: Duration = Duration::from_secs(60);
/// How long an address a client DECLINEd (it found it in use) is kept out of the pool.
pub(crate) const DECLINE_HOLD: Duration = Duration::from_secs(600);
/// Bound on remembered client → address pairs (they are also bounded by the range size: each
/// remembered address belongs to one client only).
pub(crate) const MAX_REMEMBERED: usize = 65536;
/// Changes of the lease table remembered for `Pool::changed_since`. A reader that falls further
/// behind is told so and reads the whole table instead: memory stays bounded whether or not
/// anyone reads.
pub(crate) const CHANGES_KEPT: usize = 4096;

/// One entry of the lease table (what `DhcpTable` shows).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// Increasing from 1: the number in the seed's "The DHCP entry N was created" line.
    pub id: u32,
    /// When the entry was created (a renewal does not change it).
    pub leased_at: Instant,
    /// When the lease ends unless the client renews it.
    pub expires_at: Instant,
    /// The client's hardware address.
    pub mac: Mac,
    /// The address leased.
    pub ip: Ipv4Addr,
    /// Option 12 of the client, printable ASCII only; empty when the client sent none.
    pub host_name: String,
}

#[derive(Clone, Copy, Debug)]
struct Offer {
    mac: Mac,
    until: Instant,
}

#[derive(Clone, Copy, Debug)]
struct Remembered {
    ip: Ipv4Addr,
    at: Instant,
}

/// The lease table and the state that decides which address is free for whom.
pub(super) struct Pool {
    cfg: DhcpConfig,
    /// By id, so that listing is in creation order.
    leases: BTreeMap<u32, Lease>,
    by_ip: HashMap<Ipv4Addr, u32>,
    by_mac: HashMap<Mac, u32>,
    expiry: BTreeSet<(Instant, u32)>,
    next_id: u32,
    offers: HashMap<Ipv4Addr, Offer>,
    offer_of: HashMap<Mac, Ipv4Addr>,
    declined: HashMap<Ipv4Addr, Instant>,
    memory: HashMap<Mac, Remembered>,
    remembered_by: HashMap<Ipv4Addr, Mac>,
    /// The reservations of `cfg`, both ways (index into `cfg.reservations`; reserved MAC).
    reserved: HashMap<Mac, usize>,
    reserved_ip: HashMap<Ipv4Addr, Mac>,
    /// When expired offers and declines are next swept.
    sweep_at: Option<Instant>,
    /// Bumped whenever the lease table changes (entry added, renewed or removed), so the runtime
    /// knows when to save it.
    generation: u64,
    binding_generation: u64,
    /// (generation after the change, id of the lease changed), oldest first, at most
    /// `CHANGES_KEPT`: what a lease journal appends since the generation it last saw.
    changes: VecDeque<(u64, u32)>,
}

impl Pool {
    pub(super) fn new(cfg: &DhcpConfig) -> Pool {
        let (reserved, reserved_ip) = Self::index_reservations(cfg);
        Pool {
            reserved,
            reserved_ip,
            cfg: cfg.clone(),
            leases: BTreeMap::new(),
            by_ip: HashMap::new(),
            by_mac: HashMap::new(),
            expiry: BTreeSet::new(),
            next_id: 1,
            offers: HashMap::new(),
            offer_of: HashMap::new(),
            declined: HashMap::new(),
            memory: HashMap::new(),
            remembered_by: HashMap::new(),
            sweep_at: None,
            generation: 0,
            binding_generation: 0,
            changes: VecDeque::new(),
        }
    }

    /// Every lease-table change bumps the generation through here, so that the change log and
    /// the generation cannot disagree.
    fn changed(&mut self, id: u32, binding: bool) {
        self.generation += 1;
        if binding {
            self.binding_generation += 1;
        }
        if self.changes.len() == CHANGES_KEPT {
            self.changes.pop_front();
        }
        self.changes.push_back((self.generation, id));
    }

    /// The ids of the leases changed (created, renewed or removed) after generation `since`, in
    /// order and possibly repeated; None when older changes than are kept would be needed.
    pub(super) fn changed_since(&self, since: u64) -> Option<impl Iterator<Item = u32> + '_> {
        let skip = match since.cmp(&self.generation) {
            Ordering::Greater => return None,
            Ordering::Equal => self.changes.len(),
            Ordering::Less => {
                // Generations in the log are consecutive: the one after `since` must be there.
                let first = self.changes.front()?.0;
                if first > since + 1 {
                    return None;
                }
                (since + 1 - first) as usize
            }
        };
        Some(self.changes.range(skip..).map(|&(_, id)| id))
    }

    pub(super) fn lease(&self, id: u32) -> Option<&Lease> {
        self.leases.get(&id)
    }

    pub(super) fn generation(&self) -> u64 {
        self.generation
    }

    fn index_reservations(cfg: &DhcpConfig) -> (HashMap<Mac, usize>, HashMap<Ipv4Addr, Mac>) {
        let by_mac = cfg
            .reservations
            .iter()
            .enumerate()
            .map(|(i, r)| (r.mac, i))
            .collect();
        let by_ip = cfg.reservations.iter().map(|r| (r.ip, r.mac)).collect();
        (by_mac, by_ip)
    }

    /// The reservation of `mac`, if it has one.
    pub(super) fn reservation_of(&self, mac: Mac) -> Option<&Reservation> {
        self.reserved
            .get(&mac)
            .and_then(|&i| self.cfg.reservations.get(i))
    }

    /// The MAC `ip` is reserved for, if any.
    pub(super) fn reserved_for(&self, ip: Ipv4Addr) -> Option<Mac> {
        self.reserved_ip.get(&ip).copied()
    }

    /// The reserved address `mac` should move to: its reservation, when that is not `ip` and
    /// is free for it now.
    pub(super) fn reserved_elsewhere(
        &self,
        mac: Mac,
        ip: Ipv4Addr,
        now: Instant,
        host_ip: Ipv4Addr,
    ) -> Option<Ipv4Addr> {
        let r = self.reservation_of(mac)?.ip;
        (r != ip && self.free_for(mac, r, now, host_ip)).then_some(r)
    }

    /// A counter that changes when a binding is made, moved or ended (not on a renewal).
    pub(super) fn binding_generation(&self) -> u64 {
        self.binding_generation
    }

    /// Leases granted at least `min_age` ago, as (id, address, granted at).
    pub(super) fn granted_before(
        &self,
        t: Instant,
    ) -> impl Iterator<Item = (u32, Ipv4Addr, Instant)> + '_ {
        // A reserved address would go back to its own MAC only, not to the client waiting.
        self.leases
            .values()
            .filter(move |l| l.leased_at <= t && self.in_range(l.ip))
            .filter(|l| !self.reserved_ip.contains_key(&l.ip))
            .map(|l| (l.id, l.ip, l.leased_at))
    }

    /// Ends lease `id` before its time (its address is taken back).
    pub(super) fn take_back(&mut self, id: u32, events: &mut Events) {
        self.remove_lease(id, events);
    }

    pub(super) fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.leases.values()
    }

    pub(super) fn lease_of(&self, mac: Mac) -> Option<&Lease> {
        self.by_mac.get(&mac).and_then(|id| self.leases.get(id))
    }

    pub(super) fn is_leased(&self, ip: Ipv4Addr) -> bool {
        self.by_ip.contains_key(&ip)
    }

    #[cfg(test)]
    pub(super) fn no_offers(&self) -> bool {
        self.offers.is_empty()
    }

    pub(super) fn config(&self) -> &DhcpConfig {
        &self.cfg
    }

    /// Loads a saved lease table. Entries that are expired, outside the range, or that repeat an
    /// id, address or MAC already in the table are skipped. Returns how many were kept.
    pub(super) fn restore(&mut self, now: Instant, leases: Vec<Lease>) -> usize {
        let mut kept = 0;
        for l in leases {
            let fresh = l.expires_at > now
                && l.id != 0
                && !self.leases.contains_key(&l.id)
                && !self.by_mac.contains_key(&l.mac)
                && l.mac.0[0] & 1 == 0
                && self.free_for(l.mac, l.ip, now, Ipv4Addr::UNSPECIFIED);
            if !fresh {
                tracing::debug!(id = l.id, ip = %l.ip, mac = %l.mac, "saved DHCP lease skipped");
                continue;
            }
            self.next_id = self.next_id.max(l.id.wrapping_add(1).max(1));
            self.remember(l.mac, l.ip, now);
            self.insert_lease(l);
            kept += 1;
        }
        kept
    }

    /// Applies a new DHCP configuration: leases, offers, declines and remembered addresses that
    /// are no longer in the range (or now collide with the gateway or a DNS server) are dropped;
    /// what another MAC holds of an address now reserved is given up: offers and remembered
    /// addresses at once, a lease at its next renewal.
    pub(super) fn reconfigure(&mut self, cfg: &DhcpConfig, events: &mut Events) {
        self.cfg = cfg.clone();
        (self.reserved, self.reserved_ip) = Self::index_reservations(cfg);
        let none = Ipv4Addr::UNSPECIFIED;
        let gone: Vec<u32> = self
            .leases
            .values()
            .filter(|l| !self.assignable(l.ip, none))
            .map(|l| l.id)
            .collect();
        for id in gone {
            self.remove_lease(id, events);
        }
        for l in self.leases.values() {
            match self.reserved_for(l.ip) {
                Some(owner) if owner != l.mac => tracing::warn!(
                    "DHCP: {} is now reserved for {owner}; the lease of {} on it ends at its next renewal (NAK)",
                    l.ip,
                    l.mac
                ),
                _ => {}
            }
            if let Some(r) = self.reservation_of(l.mac).filter(|r| r.ip != l.ip) {
                tracing::info!(
                    "DHCP: {} holds {}; it moves to its reserved address {} at its next renewal once that is free",
                    l.mac,
                    l.ip,
                    r.ip
                );
            }
        }
        let stale_offers: Vec<Ipv4Addr> = self
            .offers
            .iter()
            .filter(|(ip, o)| !self.keeps(**ip, o.mac))
            .map(|(ip, _)| *ip)
            .collect();
        let stale_memory: Vec<Ipv4Addr> = self
            .remembered_by
            .iter()
            .filter(|(ip, mac)| !self.keeps(**ip, **mac))
            .map(|(ip, _)| *ip)
            .collect();
        let declined: Vec<Ipv4Addr> = self.declined.keys().copied().collect();
        for ip in declined {
            if !self.assignable(ip, none) {
                self.declined.remove(&ip);
            }
        }
        for ip in stale_offers {
            self.cancel_offer_ip(ip);
        }
        for ip in stale_memory {
            if let Some(mac) = self.remembered_by.remove(&ip) {
                self.memory.remove(&mac);
            }
        }
    }

    /// Whether `mac` may keep an offer or a memory of `ip` under the configuration in force.
    fn keeps(&self, ip: Ipv4Addr, mac: Mac) -> bool {
        self.assignable(ip, Ipv4Addr::UNSPECIFIED)
            && self.reserved_for(ip).is_none_or(|owner| owner == mac)
    }

    pub(super) fn poll_timeout(&self) -> Option<Instant> {
        earliest(self.expiry.first().map(|&(t, _)| t), self.sweep_at)
    }

    /// Ends the leases that expired, and forgets the offers and declines that ran out.
    pub(super) fn handle_timeout(&mut self, now: Instant, events: &mut Events) {
        self.expire(now, events);
        if self.sweep_at.is_some_and(|t| t <= now) {
            self.offers.retain(|_, o| o.until > now);
            let offers = &self.offers;
            self.offer_of.retain(|_, ip| offers.contains_key(ip));
            self.declined.retain(|_, &mut t| t > now);
            self.sweep_at = self
                .offers
                .values()
                .map(|o| o.until)
                .chain(self.declined.values().copied())
                .min();
        }
    }

    /// Whether `mac` was given `ip` (leased or offered): only then may it decline it, so that a
    /// client cannot take another's address out of use.
    pub(super) fn holds(&self, mac: Mac, ip: Ipv4Addr) -> bool {
        let held =
            self.lease_of(mac).is_some_and(|l| l.ip == ip) || self.offer_of.get(&mac) == Some(&ip);
        held && self.in_pool(ip)
    }

    /// Takes `ip`, which `mac` declined, out of use for [`DECLINE_HOLD`].
    pub(super) fn decline(&mut self, now: Instant, mac: Mac, ip: Ipv4Addr, events: &mut Events) {
        if let Some(&id) = self.by_mac.get(&mac) {
            if self.leases[&id].ip == ip {
                self.remove_lease(id, events);
            }
        }
        self.cancel_offer_ip(ip);
        if let Some(m) = self.remembered_by.remove(&ip) {
            self.memory.remove(&m);
        }
        let until = now + DECLINE_HOLD;
        self.declined.insert(ip, until);
        self.schedule_sweep(until);
    }

    /// Ends the lease of `mac` if it is on `ip`.
    pub(super) fn release(&mut self, mac: Mac, ip: Ipv4Addr, events: &mut Events) {
        if let Some(&id) = self.by_mac.get(&mac) {
            if self.leases[&id].ip == ip {
                self.remove_lease(id, events);
            }
        }
    }

    fn in_range(&self, ip: Ipv4Addr) -> bool {
        (u32::from(self.cfg.range_start)..=u32::from(self.cfg.range_end)).contains(&u32::from(ip))
    }

    /// In the range, or reserved (which may lie outside it).
    fn in_pool(&self, ip: Ipv4Addr) -> bool {
        self.in_range(ip) || self.reserved_ip.contains_key(&ip)
    }

    /// An address of the range, or a reserved one, that the server may hand out at all (not
    /// the subnet's network or broadcast address, nor the virtual host's, the gateway's or a
    /// DNS or NTP server's).
    fn assignable(&self, ip: Ipv4Addr, host_ip: Ipv4Addr) -> bool {
        let cfg = &self.cfg;
        let n = u32::from(ip);
        let mask = u32::from(cfg.mask);
        let net = u32::from(cfg.range_start) & mask;
        self.in_pool(ip)
            && n & mask == net
            && (mask == u32::MAX || (n != net && n != net | !mask))
            && ip != host_ip
            && Some(ip) != cfg.gateway
            && !cfg.dns.contains(&ip)
            && !cfg.ntp.contains(&ip)
    }

    /// Whether `ip` may be given to `mac` now: ours to give, not reserved for another MAC, and
    /// not leased or offered to another client, nor declined.
    pub(super) fn free_for(&self, mac: Mac, ip: Ipv4Addr, now: Instant, host_ip: Ipv4Addr) -> bool {
        self.assignable(ip, host_ip)
            && self.reserved_for(ip).is_none_or(|owner| owner == mac)
            && self
                .by_ip
                .get(&ip)
                .is_none_or(|id| self.leases[id].mac == mac)
            && self
                .offers
                .get(&ip)
                .is_none_or(|o| o.mac == mac || o.until <= now)
            && self.declined.get(&ip).is_none_or(|&t| t <= now)
    }

    pub(super) fn choose(
        &self,
        now: Instant,
        host_ip: Ipv4Addr,
        mac: Mac,
        requested: Option<Ipv4Addr>,
    ) -> Option<Ipv4Addr> {
        let free = |ip: Ipv4Addr| self.free_for(mac, ip, now, host_ip);
        if let Some(r) = self.reservation_of(mac) {
            if free(r.ip) {
                return Some(r.ip);
            }
        }
        if let Some(l) = self.lease_of(mac) {
            if free(l.ip) {
                return Some(l.ip);
            }
        }
        if let Some(&ip) = self.offer_of.get(&mac) {
            if free(ip) {
                return Some(ip);
            }
        }
        if let Some(ip) = requested.filter(|&ip| free(ip)) {
            return Some(ip);
        }
        if let Some(r) = self.memory.get(&mac) {
            if free(r.ip) {
                return Some(r.ip);
            }
        }
        // A fresh address: prefer one that no other client may come back for.
        let mut fallback = None;
        for n in u32::from(self.cfg.range_start)..=u32::from(self.cfg.range_end) {
            let ip = Ipv4Addr::from(n);
            if !free(ip) {
                continue;
            }
            match self.remembered_by.get(&ip) {
                Some(&m) if m != mac => {
                    fallback.get_or_insert(ip);
                }
                _ => return Some(ip),
            }
        }
        fallback
    }

    fn schedule_sweep(&mut self, at: Instant) {
        self.sweep_at = Some(self.sweep_at.map_or(at, |t| t.min(at)));
    }

    pub(super) fn reserve(&mut self, now: Instant, mac: Mac, ip: Ipv4Addr) {
        if self.offer_of.get(&mac).is_some_and(|&old| old != ip) {
            self.cancel_offer_mac(mac);
        }
        let until = now + OFFER_HOLD;
        if let Some(prev) = self.offers.insert(ip, Offer { mac, until }) {
            if prev.mac != mac && self.offer_of.get(&prev.mac) == Some(&ip) {
                self.offer_of.remove(&prev.mac);
            }
        }
        self.offer_of.insert(mac, ip);
        self.schedule_sweep(until);
    }

    pub(super) fn cancel_offer_mac(&mut self, mac: Mac) {
        if let Some(ip) = self.offer_of.remove(&mac) {
            if self.offers.get(&ip).is_some_and(|o| o.mac == mac) {
                self.offers.remove(&ip);
            }
        }
    }

    fn cancel_offer_ip(&mut self, ip: Ipv4Addr) {
        if let Some(o) = self.offers.remove(&ip) {
            if self.offer_of.get(&o.mac) == Some(&ip) {
                self.offer_of.remove(&o.mac);
            }
        }
    }

    fn remember(&mut self, mac: Mac, ip: Ipv4Addr, now: Instant) {
        if let Some(old_mac) = self.remembered_by.insert(ip, mac) {
            if old_mac != mac {
                self.memory.remove(&old_mac);
            }
        }
        if let Some(prev) = self.memory.insert(mac, Remembered { ip, at: now }) {
            if prev.ip != ip && self.remembered_by.get(&prev.ip) == Some(&mac) {
                self.remembered_by.remove(&prev.ip);
            }
        }
        if self.memory.len() > MAX_REMEMBERED {
            let oldest = self
                .memory
                .iter()
                .filter(|(m, _)| **m != mac)
                .min_by_key(|(_, r)| r.at)
                .map(|(m, r)| (*m, r.ip));
            if let Some((m, ip)) = oldest {
                self.memory.remove(&m);
                self.remembered_by.remove(&ip);
            }
        }
    }

    /// ACKs `ip` to `mac`: renews its lease, or creates one (moving the client off another).
    pub(super) fn commit(
        &mut self,
        now: Instant,
        mac: Mac,
        ip: Ipv4Addr,
        host_name: String,
        events: &mut Events,
    ) {
        self.cancel_offer_mac(mac);
        self.cancel_offer_ip(ip);
        let expires_at = now + self.cfg.lease;
        if let Some(&id) = self.by_mac.get(&mac) {
            let l = self.leases.get_mut(&id).expect("by_mac points at a lease");
            if l.ip == ip {
                self.expiry.remove(&(l.expires_at, id));
                l.expires_at = expires_at;
                if !host_name.is_empty() {
                    l.host_name = host_name;
                }
                self.expiry.insert((expires_at, id));
                self.remember(mac, ip, now);
                self.changed(id, false);
                return;
            }
            self.remove_lease(id, events);
        }
        let mut id = self.next_id;
        while self.leases.contains_key(&id) || id == 0 {
            id = id.wrapping_add(1);
        }
        self.next_id = id.wrapping_add(1).max(1);
        events.push(Event::DhcpEntryCreated {
            id,
            mac,
            ip,
            host_name: host_name.clone(),
            lease: self.cfg.lease,
        });
        self.insert_lease(Lease {
            id,
            leased_at: now,
            expires_at,
            mac,
            ip,
            host_name,
        });
        self.remember(mac, ip, now);
    }

    fn insert_lease(&mut self, l: Lease) {
        self.changed(l.id, true);
        self.by_ip.insert(l.ip, l.id);
        self.by_mac.insert(l.mac, l.id);
        self.expiry.insert((l.expires_at, l.id));
        self.leases.insert(l.id, l);
    }

    fn remove_lease(&mut self, id: u32, events: &mut Events) {
        if let Some(l) = self.leases.remove(&id) {
            self.changed(id, true);
            self.by_ip.remove(&l.ip);
            self.by_mac.remove(&l.mac);
            self.expiry.remove(&(l.expires_at, id));
            events.push(Event::DhcpEntryDeleted {
                id,
                mac: l.mac,
                ip: l.ip,
            });
        }
    }

    pub(super) fn expire(&mut self, now: Instant, events: &mut Events) {
        while let Some(&(t, id)) = self.expiry.first() {
            if t > now {
                break;
            }
            self.remove_lease(id, events);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vhost::dhcp::tests::{
        config, ip, msg, Net, A, ACK, B, C, D, HOST_IP, NAK, RELEASE, REQUEST,
    };

    fn lease(id: u32, mac: Mac, a: Ipv4Addr, expires: u64) -> Lease {
        Lease {
            id,
            leased_at: Instant::from_secs(0),
            expires_at: Instant::from_secs(expires),
            mac,
            ip: a,
            host_name: format!("h{id}"),
        }
    }

    #[test]
    fn restore_keeps_valid_entries_only() {
        let mut n = Net::new(config());
        let now = n.now;
        let kept = n.engine.dhcp.restore(
            now,
            vec![
                lease(5, A, ip(20), 5000),
                lease(6, B, ip(21), 500),                        // expired
                lease(7, C, ip(250), 5000),                      // outside the range
                lease(8, D, ip(20), 5000),                       // address taken
                lease(9, A, ip(22), 5000),                       // MAC taken
                lease(5, Mac([2, 0, 0, 0, 1, 1]), ip(23), 5000), // id taken
                lease(3, Mac([2, 0, 0, 0, 1, 2]), ip(24), 5000),
            ],
        );
        assert_eq!(kept, 2);
        let ids: Vec<u32> = n.leases().iter().map(|l| l.id).collect();
        assert_eq!(ids, vec![3, 5]);
        // The restored client gets its address back, and renewing does not log "created".
        assert_eq!(n.offer(A), ip(20));
        let r = n.one(&msg(REQUEST, A).configured_at(ip(20)));
        assert_eq!(r.kind, ACK);
        assert_eq!(n.created(), 0);
        // Others cannot take it; new entries continue after the highest id.
        assert_eq!(n.one(&msg(REQUEST, B).requested(ip(20))).kind, NAK);
        n.dora(B);
        assert_eq!(n.leases().last().unwrap().id, 6);
        assert_eq!(n.engine.dhcp.lease_of(B).unwrap().id, 6);
    }

    #[test]
    fn the_change_log_names_each_changed_lease_and_says_when_it_fell_behind() {
        let mut n = Net::new(config());
        let g0 = n.engine.dhcp.generation();
        let changed = |n: &Net, since| {
            n.engine
                .dhcp
                .changed_since(since)
                .map(|it| it.collect::<Vec<u32>>())
        };
        assert_eq!(changed(&n, g0), Some(vec![]));
        let a = n.dora(A);
        n.dora(B);
        let g1 = n.engine.dhcp.generation();
        assert_eq!(changed(&n, g0), Some(vec![1, 2]));
        // A renewal and a release are changes too.
        assert_eq!(n.one(&msg(REQUEST, A).configured_at(a)).kind, ACK);
        n.silent(&msg(RELEASE, B).configured_at(ip(11)).server(HOST_IP));
        assert_eq!(changed(&n, g1), Some(vec![1, 2]));
        assert!(n.engine.dhcp.lease(2).is_none());
        assert_eq!(n.engine.dhcp.lease(1).unwrap().mac, A);
        assert_eq!(changed(&n, n.engine.dhcp.generation() + 1), None);
        // Past what is kept: the reader must save the whole table.
        for _ in 0..CHANGES_KEPT {
            n.one(&msg(REQUEST, A).configured_at(a));
        }
        assert_eq!(changed(&n, g1), None);
        let g = n.engine.dhcp.generation();
        assert_eq!(changed(&n, g - 3), Some(vec![1, 1, 1]));
        assert!(n.engine.dhcp.pool.changes.len() <= CHANGES_KEPT);
    }

    #[test]
    fn reconfigure_drops_what_is_outside_the_new_range() {
        let mut n = Net::new(config());
        assert_eq!(n.dora(A), ip(10));
        n.one(&msg(REQUEST, B).requested(ip(100)));
        let mut cfg = n.engine.dhcp.config().clone();
        cfg.range_start = ip(50);
        n.engine.dhcp.reconfigure(&cfg, &mut n.engine.ctx.events);
        n.drain();
        let l = n.leases();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].mac, B);
        assert_eq!(n.deleted(1), 1);
        assert_eq!(n.offer(A), ip(50));
    }

    #[test]
    fn remembered_addresses_are_bounded_by_the_range() {
        let mut cfg = config();
        cfg.dhcp.range_start = ip(10);
        cfg.dhcp.range_end = ip(11);
        let mut n = Net::new(cfg);
        for i in 0..20u8 {
            let mac = Mac([2, 0, 0, 0, 2, i]);
            let a = n.dora(mac);
            n.silent(&msg(RELEASE, mac).configured_at(a).server(HOST_IP));
        }
        let s = &n.engine.dhcp.pool;
        assert!(s.memory.len() <= 2 && s.remembered_by.len() <= 2);
        assert_eq!(s.memory.len(), s.remembered_by.len());
        assert!(s.leases.is_empty() && s.by_ip.is_empty() && s.by_mac.is_empty());
        assert!(s.expiry.is_empty());
    }
}
