//! The DHCPv6 lease table: IA_NA bindings keyed by (client DUID, IAID, MAC): the MAC is the
//! Ethernet source of the guest that asked, and part of the client's identity as it is for
//! IPv4 leases, the addresses set aside after a Decline, expiry, and the change log
//! the daemon's lease journal reads (as `dhcp::pool` keeps for IPv4).
//!
//! Bounds: every lease and every declined address holds a distinct address of the range, and
//! their sum is at most [`MAX_LEASES`] whatever the range's size (a /64 range would otherwise
//! let made-up clients grow the table without end); one MAC holds at most [`PER_MAC`] leases,
//! so one guest inventing DUIDs cannot take the range from the others.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::Ipv6Addr;
use std::time::Duration;

use crate::config::Mac;
use crate::event::{Event, Events};
use crate::time::{earliest, Instant};

/// Leases and declined addresses the table holds at most.
pub(crate) const MAX_LEASES: usize = 65536;
/// IA_NA leases one MAC may hold.
pub(crate) const PER_MAC: usize = 4;
/// How long an address a client declined (it found it in use) is kept out of use.
pub(crate) const DECLINE_HOLD: Duration = Duration::from_secs(600);
/// Changes remembered for `changed_since` (as `dhcp::pool::CHANGES_KEPT`).
pub(crate) const CHANGES_KEPT: usize = 4096;

/// One IA_NA lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease6 {
    /// Increasing from 1 (its own sequence, apart from the IPv4 leases').
    pub id: u32,
    /// When the lease was created (a renewal does not change it).
    pub leased_at: Instant,
    /// When it ends unless renewed.
    pub expires_at: Instant,
    /// The Ethernet source of the message that created it.
    pub mac: Mac,
    /// The address leased.
    pub ip: Ipv6Addr,
    /// The client's DUID (2 to 130 bytes).
    pub duid: Vec<u8>,
    /// The client's identity association.
    pub iaid: u32,
}

impl Lease6 {
    /// The DUID as hex, as the table and the log show it.
    pub fn duid_hex(&self) -> String {
        hex(&self.duid)
    }
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub(super) struct Table {
    start: u128,
    end: u128,
    leases: BTreeMap<u32, Lease6>,
    by_ip: HashMap<Ipv6Addr, u32>,
    /// DUID → its (IAID, lease id) pairs: looked up by a borrowed DUID, without a copy.
    by_duid: HashMap<Vec<u8>, Vec<(u32, u32)>>,
    per_mac: HashMap<Mac, usize>,
    expiry: BTreeSet<(Instant, u32)>,
    declined: HashMap<Ipv6Addr, Instant>,
    declined_until: BTreeSet<(Instant, Ipv6Addr)>,
    /// Where the search for a free address starts: after the last one granted, so that a
    /// grant is one look-up while the range has room.
    cursor: u128,
    next_id: u32,
    generation: u64,
    binding_generation: u64,
    changes: VecDeque<(u64, u32)>,
}

impl Table {
    pub(super) fn new(start: Ipv6Addr, end: Ipv6Addr) -> Table {
        Table {
            start: u128::from(start),
            end: u128::from(end),
            leases: BTreeMap::new(),
            by_ip: HashMap::new(),
            by_duid: HashMap::new(),
            per_mac: HashMap::new(),
            expiry: BTreeSet::new(),
            declined: HashMap::new(),
            declined_until: BTreeSet::new(),
            cursor: u128::from(start),
            next_id: 1,
            generation: 0,
            binding_generation: 0,
            changes: VecDeque::new(),
        }
    }

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

    pub(super) fn generation(&self) -> u64 {
        self.generation
    }

    pub(super) fn binding_generation(&self) -> u64 {
        self.binding_generation
    }

    pub(super) fn changed_since(&self, since: u64) -> Option<impl Iterator<Item = u32> + '_> {
        let skip = match since.cmp(&self.generation) {
            Ordering::Greater => return None,
            Ordering::Equal => self.changes.len(),
            Ordering::Less => {
                let first = self.changes.front()?.0;
                if first > since + 1 {
                    return None;
                }
                (since + 1 - first) as usize
            }
        };
        Some(self.changes.range(skip..).map(|&(_, id)| id))
    }

    pub(super) fn leases(&self) -> impl Iterator<Item = &Lease6> {
        self.leases.values()
    }

    pub(super) fn lease(&self, id: u32) -> Option<&Lease6> {
        self.leases.get(&id)
    }

    pub(super) fn find(&self, duid: &[u8], iaid: u32, mac: Mac) -> Option<&Lease6> {
        self.by_duid
            .get(duid)?
            .iter()
            .filter(|(i, _)| *i == iaid)
            .filter_map(|(_, id)| self.leases.get(id))
            .find(|l| l.mac == mac)
    }

    pub(super) fn leases_of(&self, mac: Mac) -> usize {
        self.per_mac.get(&mac).copied().unwrap_or(0)
    }

    pub(super) fn in_range(&self, ip: Ipv6Addr) -> bool {
        (self.start..=self.end).contains(&u128::from(ip))
    }

    fn full(&self) -> bool {
        self.leases.len() + self.declined.len() >= MAX_LEASES
    }

    fn free(&self, ip: Ipv6Addr) -> bool {
        self.in_range(ip) && !self.by_ip.contains_key(&ip) && !self.declined.contains_key(&ip)
    }

    /// An address for a new lease: the first of `hints` that is free, else the next free one
    /// after the cursor; never one of `taken` (given to another IA of the same message).
    pub(super) fn choose(&self, hints: &[Ipv6Addr], taken: &[Ipv6Addr]) -> Option<Ipv6Addr> {
        if self.full() {
            return None;
        }
        let ok = |ip: Ipv6Addr| self.free(ip) && !taken.contains(&ip);
        if let Some(&h) = hints.iter().find(|&&h| ok(h)) {
            return Some(h);
        }
        // Only used addresses can be skipped: past that many, one must be free (if the
        // range has it), so the scan is bounded by the table, not by the range.
        let size = self.end - self.start + 1;
        let used = (self.leases.len() + self.declined.len() + taken.len()) as u128;
        let mut at = self.cursor.clamp(self.start, self.end);
        for _ in 0..size.min(used + 1) {
            if ok(Ipv6Addr::from(at)) {
                return Some(Ipv6Addr::from(at));
            }
            at = if at == self.end { self.start } else { at + 1 };
        }
        None
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn grant(
        &mut self,
        now: Instant,
        duid: &[u8],
        iaid: u32,
        mac: Mac,
        ip: Ipv6Addr,
        lease: Duration,
        events: &mut Events,
    ) -> u32 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        self.cursor = u128::from(ip).saturating_add(1);
        let l = Lease6 {
            id,
            leased_at: now,
            expires_at: now + lease,
            mac,
            ip,
            duid: duid.to_vec(),
            iaid,
        };
        events.push(Event::Dhcp6EntryCreated {
            id,
            mac,
            ip,
            duid: l.duid_hex(),
            iaid,
            lease,
        });
        self.insert(l);
        self.changed(id, true);
        id
    }

    fn insert(&mut self, l: Lease6) {
        self.by_ip.insert(l.ip, l.id);
        self.by_duid
            .entry(l.duid.clone())
            .or_default()
            .push((l.iaid, l.id));
        *self.per_mac.entry(l.mac).or_default() += 1;
        self.expiry.insert((l.expires_at, l.id));
        self.leases.insert(l.id, l);
    }

    pub(super) fn extend(&mut self, id: u32, now: Instant, lease: Duration) {
        let Some(l) = self.leases.get_mut(&id) else {
            return;
        };
        self.expiry.remove(&(l.expires_at, id));
        l.expires_at = now + lease;
        self.expiry.insert((l.expires_at, id));
        self.changed(id, false);
    }

    pub(super) fn remove(&mut self, id: u32, events: &mut Events) -> Option<Lease6> {
        let l = self.leases.remove(&id)?;
        self.by_ip.remove(&l.ip);
        if let Some(v) = self.by_duid.get_mut(&l.duid) {
            v.retain(|&(_, i)| i != id);
            if v.is_empty() {
                self.by_duid.remove(&l.duid);
            }
        }
        if let Some(n) = self.per_mac.get_mut(&l.mac) {
            *n -= 1;
            if *n == 0 {
                self.per_mac.remove(&l.mac);
            }
        }
        self.expiry.remove(&(l.expires_at, id));
        events.push(Event::Dhcp6EntryDeleted {
            id,
            mac: l.mac,
            ip: l.ip,
        });
        self.changed(id, true);
        Some(l)
    }

    /// Ends lease `id` and keeps its address out of use for `DECLINE_HOLD`.
    pub(super) fn decline(&mut self, id: u32, now: Instant, events: &mut Events) {
        if let Some(l) = self.remove(id, events) {
            let until = now + DECLINE_HOLD;
            self.declined.insert(l.ip, until);
            self.declined_until.insert((until, l.ip));
        }
    }

    pub(super) fn expire(&mut self, now: Instant, events: &mut Events) {
        while let Some(&(t, id)) = self.expiry.first() {
            if t > now {
                break;
            }
            self.remove(id, events);
        }
        while let Some(&(t, ip)) = self.declined_until.first() {
            if t > now {
                break;
            }
            self.declined_until.pop_first();
            self.declined.remove(&ip);
        }
    }

    pub(super) fn poll_timeout(&self) -> Option<Instant> {
        earliest(
            self.expiry.first().map(|e| e.0),
            self.declined_until.first().map(|e| e.0),
        )
    }

    /// Loads saved leases: expired ones, those outside the range, and those that repeat an
    /// id, an address or a (DUID, IAID), or pass a bound, are skipped.
    pub(super) fn restore(&mut self, now: Instant, leases: Vec<Lease6>) -> usize {
        let mut kept = 0;
        for l in leases {
            let dup = self.leases.contains_key(&l.id)
                || self.by_ip.contains_key(&l.ip)
                || self.find(&l.duid, l.iaid, l.mac).is_some();
            if l.expires_at <= now
                || l.id == 0
                || !self.in_range(l.ip)
                || dup
                || l.duid.len() < 2
                || l.duid.len() > super::message::MAX_DUID
                || self.leases_of(l.mac) >= PER_MAC
                || self.full()
            {
                continue;
            }
            self.next_id = self.next_id.max(l.id.wrapping_add(1).max(1));
            self.cursor = u128::from(l.ip).saturating_add(1);
            self.insert(l);
            kept += 1;
        }
        kept
    }

    /// A new range: leases and declines outside it end.
    pub(super) fn set_range(&mut self, start: Ipv6Addr, end: Ipv6Addr, events: &mut Events) {
        self.start = u128::from(start);
        self.end = u128::from(end);
        let outside: Vec<u32> = self
            .leases
            .values()
            .filter(|l| !self.in_range(l.ip))
            .map(|l| l.id)
            .collect();
        for id in outside {
            self.remove(id, events);
        }
        let (s, e) = (self.start, self.end);
        self.declined
            .retain(|ip, _| (s..=e).contains(&u128::from(*ip)));
        self.declined_until
            .retain(|(_, ip)| (s..=e).contains(&u128::from(*ip)));
    }
}
