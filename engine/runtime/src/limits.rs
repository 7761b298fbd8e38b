//! The session ids and limits shared by the engines of a multi-worker runtime (the core's
//! `SharedSessions`): taken when a session is created or ends (not per frame), so a lock is
//! cheap here.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use std::sync::atomic::AtomicU64;

use hubnat_core::nat::Proto;
use hubnat_core::time::Instant;
use hubnat_core::vhost::bindings::{Bindings, BoundBy, ClaimRefused};
use hubnat_core::FastHashMap;
use hubnat_core::{Mac, SharedSessions};

/// The key of a guest's half-open TCP count in `counts` (beside the protocols' indexes).
const HALF_OPEN: u8 = u8::MAX;

/// Session counts per protocol and guest, half-open TCP connections and the session id
/// sequence, for every engine of one runtime.
#[derive(Default)]
pub struct SharedLimits {
    counts: Mutex<FastHashMap<(u8, IpAddr), usize>>,
    totals: [AtomicU32; 4],
    /// TCP connections whose connect on the sock side is in progress, across the engines.
    half_open: AtomicU32,
    session_ids: AtomicU32,
    /// The segment's source bindings; engines copy them when `bindings_generation` moved.
    bindings: Mutex<Bindings>,
    bindings_generation: AtomicU64,
    /// The IPv6 source bindings, kept as the IPv4 ones are.
    bindings6: Mutex<Bindings<Ipv6Addr>>,
    bindings6_generation: AtomicU64,
}

impl SharedLimits {
    fn with_bindings<T>(&self, f: impl FnOnce(&mut Bindings) -> T) -> T {
        let mut b = self.bindings.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut b)
    }

    fn bindings_changed(&self) {
        self.bindings_generation.fetch_add(1, Ordering::Release);
    }

    fn with_bindings6<T>(&self, f: impl FnOnce(&mut Bindings<Ipv6Addr>) -> T) -> T {
        let mut b = self.bindings6.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut b)
    }

    fn bindings6_changed(&self) {
        self.bindings6_generation.fetch_add(1, Ordering::Release);
    }
}

impl SharedSessions for SharedLimits {
    fn next_session_id(&self) -> u32 {
        loop {
            let id = self
                .session_ids
                .fetch_add(1, Ordering::Relaxed)
                .wrapping_add(1);
            if id != 0 {
                return id;
            }
        }
    }

    fn admit(&self, proto: Proto, guest: IpAddr, total: usize, per: usize) -> bool {
        let i = proto.index();
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = counts.entry((i as u8, guest)).or_insert(0);
        if *n >= per || self.totals[i].load(Ordering::Relaxed) as usize >= total {
            if *n == 0 {
                counts.remove(&(i as u8, guest));
            }
            return false;
        }
        *n += 1;
        self.totals[i].fetch_add(1, Ordering::Relaxed);
        true
    }

    fn release(&self, proto: Proto, guest: IpAddr) {
        let i = proto.index();
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&(i as u8, guest)) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&(i as u8, guest));
            }
            self.totals[i].fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn admit_half_open(&self, guest: IpAddr, max: usize, per_guest: usize) -> bool {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = counts.entry((HALF_OPEN, guest)).or_insert(0);
        let taken = *n < per_guest
            && self
                .half_open
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| {
                    ((h as usize) < max).then_some(h + 1)
                })
                .is_ok();
        if taken {
            *n += 1;
        } else if *n == 0 {
            counts.remove(&(HALF_OPEN, guest));
        }
        taken
    }

    fn release_half_open(&self, guest: IpAddr) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&(HALF_OPEN, guest)) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&(HALF_OPEN, guest));
            }
            let _ = self
                .half_open
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| h.checked_sub(1));
        }
    }

    fn half_open(&self) -> usize {
        self.half_open.load(Ordering::Acquire) as usize
    }

    fn bindings_generation(&self) -> u64 {
        self.bindings_generation.load(Ordering::Acquire)
    }

    fn bindings(&self) -> Bindings {
        self.with_bindings(|b| b.clone())
    }

    fn claim_binding(&self, now: Instant, mac: Mac, ip: Ipv4Addr) -> bool {
        let claimed = self.with_bindings(|b| b.claim(now, mac, ip));
        if claimed {
            self.bindings_changed();
        }
        claimed
    }

    fn bind(&self, now: Instant, ip: Ipv4Addr, mac: Mac, by: BoundBy) {
        self.with_bindings(|b| b.bind(now, ip, mac, by));
        self.bindings_changed();
    }

    fn unbind(&self, ip: Ipv4Addr, by: BoundBy) {
        self.with_bindings(|b| b.unbind(ip, by));
        self.bindings_changed();
    }

    fn touch_binding(&self, now: Instant, ip: Ipv4Addr) {
        // Not a change the engines need to copy: only expiry reads it, here.
        self.with_bindings(|b| b.touch(now, ip));
    }

    fn bindings6_generation(&self) -> Option<u64> {
        Some(self.bindings6_generation.load(Ordering::Acquire))
    }

    fn bindings6(&self) -> Bindings<Ipv6Addr> {
        self.with_bindings6(|b| b.clone())
    }

    fn claim_binding6(&self, now: Instant, mac: Mac, ip: Ipv6Addr) -> Result<(), ClaimRefused> {
        let r = self.with_bindings6(|b| b.try_claim(now, mac, ip));
        if r.is_ok() {
            self.bindings6_changed();
        }
        r
    }

    fn bind6(&self, now: Instant, ip: Ipv6Addr, mac: Mac, by: BoundBy) {
        self.with_bindings6(|b| b.bind(now, ip, mac, by));
        self.bindings6_changed();
    }

    fn unbind6(&self, ip: Ipv6Addr, by: BoundBy) {
        self.with_bindings6(|b| b.unbind(ip, by));
        self.bindings6_changed();
    }

    fn touch_binding6(&self, now: Instant, ip: Ipv6Addr) {
        self.with_bindings6(|b| b.touch(now, ip));
    }

    fn count(&self, proto: Proto, guest: IpAddr) -> usize {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts
            .get(&(proto.index() as u8, guest))
            .copied()
            .unwrap_or(0)
    }
}
