//! The session ids and limits shared by the engines of a multi-worker runtime (the core's
//! `SharedSessions`): taken when a session is created or ends (not per frame), so a lock is
//! cheap here.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use hubnat_core::nat::Proto;
use hubnat_core::SharedSessions;

/// Session counts per protocol and guest, half-open TCP connections and the session id
/// sequence, for every engine of one runtime.
#[derive(Default)]
pub struct SharedLimits {
    counts: Mutex<HashMap<(u8, Ipv4Addr), usize>>,
    totals: [AtomicU32; 4],
    /// TCP connections whose connect on the sock side is in progress, across the engines.
    half_open: AtomicU32,
    session_ids: AtomicU32,
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

    fn admit(&self, proto: Proto, guest: Ipv4Addr, total: usize, per: usize) -> bool {
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

    fn release(&self, proto: Proto, guest: Ipv4Addr) {
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

    fn admit_half_open(&self, max: usize) -> bool {
        self.half_open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                ((n as usize) < max).then_some(n + 1)
            })
            .is_ok()
    }

    fn release_half_open(&self) {
        let _ = self
            .half_open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    fn half_open(&self) -> usize {
        self.half_open.load(Ordering::Acquire) as usize
    }

    fn count(&self, proto: Proto, guest: Ipv4Addr) -> usize {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts
            .get(&(proto.index() as u8, guest))
            .copied()
            .unwrap_or(0)
    }
}
