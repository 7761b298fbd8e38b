//! The rate at which each guest may open sessions: a token bucket per guest address, so that a
//! flood of new flows costs the flooder (its new sessions are refused) and not its neighbours.

use std::net::IpAddr;

use crate::time::Instant;
use crate::FastHashMap;

/// Guests tracked at once; past it, the buckets that are full again (idle guests) are dropped.
const MAX_GUESTS: usize = 4096;
/// One session's worth, in the buckets' unit.
const TOKEN: u64 = 1_000_000;

#[derive(Clone, Copy)]
struct Bucket {
    /// Millionths of a session.
    tokens: u64,
    at: Instant,
}

/// The token buckets of one engine.
#[derive(Default)]
pub(crate) struct NewSessions {
    buckets: FastHashMap<IpAddr, Bucket>,
}

impl NewSessions {
    /// Takes a token from `guest`'s bucket, which fills at `per_second` and holds one second's
    /// worth; false when it is empty. `per_second` 0 means no limit.
    pub(crate) fn admit(&mut self, now: Instant, guest: IpAddr, per_second: u32) -> bool {
        if per_second == 0 {
            return true;
        }
        let rate = u64::from(per_second);
        let cap = rate * TOKEN;
        if self.buckets.len() >= MAX_GUESTS && !self.buckets.contains_key(&guest) {
            self.buckets.retain(|_, b| {
                b.tokens + (now.saturating_since(b.at).as_micros() as u64).saturating_mul(rate)
                    < cap
            });
        }
        let b = self.buckets.entry(guest).or_insert(Bucket {
            tokens: cap,
            at: now,
        });
        let elapsed = now.saturating_since(b.at).as_micros() as u64;
        b.tokens = b
            .tokens
            .saturating_add(elapsed.saturating_mul(rate))
            .min(cap);
        b.at = b.at.max(now);
        if b.tokens >= TOKEN {
            b.tokens -= TOKEN;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_of_one_second_then_the_rate() {
        let mut n = NewSessions::default();
        let g = IpAddr::from([192, 168, 30, 10]);
        let other = IpAddr::from([192, 168, 30, 11]);
        let t0 = Instant::from_secs(1);
        assert_eq!((0..150).filter(|_| n.admit(t0, g, 100)).count(), 100);
        assert!(n.admit(t0, other, 100), "another guest has its own bucket");
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!((0..50).filter(|_| n.admit(t1, g, 100)).count(), 10);
        assert!((0..1000).all(|_| n.admit(t1, g, 0)), "0: no limit");
    }
}
