//! The bounded receive queue of one connection (guest → sock side).
//!
//! It holds the bytes of the receive window that could not be written to the sock-side socket yet:
//! segments that arrived out of order (behind a hole), and in-order bytes the socket refused
//! while its buffer was full. Storage is a ring of `cap` bytes (a power of two) indexed by
//! sequence number modulo `cap`, so every byte of the window `[rcv_nxt, rcv_nxt + cap)` has a
//! fixed place and nothing moves when the window slides. The ring's storage is taken when bytes
//! must wait and given back as soon as none do (`release_if_empty`), to a small per-thread pool
//! that the next connection takes it from: an idle connection holds no ring, and a busy one
//! costs no allocation per batch. At most `MAX_RANGES` separate byte ranges are tracked, a
//! segment that would need more is dropped (the guest retransmits it).

use std::cell::RefCell;
use std::net::IpAddr;

use super::seq::Seq;
use crate::FastHashMap;

/// How much ring storage the connections of one thread (one engine) may hold: in all, and for
/// one guest. A guest that leaves a hole in every connection fills its own share; past it, its
/// segments that would need a ring are dropped (and retransmitted), and the others' rings are
/// still there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RingBudget {
    /// Bytes of rings held at once, in all.
    pub(crate) total: usize,
    /// Bytes of rings one guest's connections hold at once.
    pub(crate) per_guest: usize,
}

#[cfg(test)]
impl RingBudget {
    /// No bound (tests of the ring itself).
    pub(crate) const UNLIMITED: RingBudget = RingBudget {
        total: usize::MAX,
        per_guest: usize::MAX,
    };
}

/// Ring storage held by this thread's connections.
#[derive(Default)]
struct Held {
    total: usize,
    per_guest: FastHashMap<IpAddr, usize>,
}

thread_local! {
    static HELD: RefCell<Held> = RefCell::new(Held::default());
}

/// Counts `cap` bytes for `guest` unless `budget` would be exceeded.
fn reserve(guest: IpAddr, cap: usize, budget: RingBudget) -> bool {
    HELD.with(|h| {
        let mut h = h.borrow_mut();
        let mine = h.per_guest.get(&guest).copied().unwrap_or(0);
        if h.total.saturating_add(cap) > budget.total || mine.saturating_add(cap) > budget.per_guest
        {
            return false;
        }
        h.total += cap;
        *h.per_guest.entry(guest).or_insert(0) += cap;
        true
    })
}

fn unreserve(guest: IpAddr, cap: usize) {
    HELD.with(|h| {
        let mut h = h.borrow_mut();
        h.total = h.total.saturating_sub(cap);
        if let Some(n) = h.per_guest.get_mut(&guest) {
            *n = n.saturating_sub(cap);
            if *n == 0 {
                h.per_guest.remove(&guest);
            }
        }
    })
}

/// Ring storage held by this thread's connections now (bytes), in all and for `guest`.
#[cfg(test)]
pub(crate) fn held(guest: IpAddr) -> (usize, usize) {
    HELD.with(|h| {
        let h = h.borrow();
        (h.total, h.per_guest.get(&guest).copied().unwrap_or(0))
    })
}

/// Most disjoint ranges held at once (also bounds the work per segment).
pub(crate) const MAX_RANGES: usize = 16;

/// Most free rings a thread keeps for reuse (beyond these, a released ring is freed).
pub(crate) const POOLED_RINGS: usize = 16;

thread_local! {
    static POOL: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

fn take_ring(cap: usize) -> Vec<u8> {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        match p.iter().position(|b| b.len() == cap) {
            Some(i) => p.swap_remove(i),
            None => vec![0; cap],
        }
    })
}

fn give_ring(buf: Vec<u8>) {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < POOLED_RINGS {
            p.push(buf);
        }
    })
}

pub(crate) struct RecvRing {
    cap: usize,
    buf: Vec<u8>,
    /// Whose connection this is, and its budget (counted while `buf` is held).
    guest: IpAddr,
    budget: RingBudget,
    /// Disjoint, non-adjacent `[start, end)` ranges, ascending.
    ranges: Vec<(Seq, Seq)>,
}

impl RecvRing {
    /// `cap` is rounded up to a power of two; the storage, when taken, counts against
    /// `budget` for `guest`.
    pub(crate) fn new(cap: usize, guest: IpAddr, budget: RingBudget) -> RecvRing {
        RecvRing {
            cap: cap.next_power_of_two(),
            buf: Vec::new(),
            guest,
            budget,
            ranges: Vec::new(),
        }
    }

    pub(crate) fn cap(&self) -> usize {
        self.cap
    }

    /// The budget the ring counts against.
    pub(crate) fn budget(&self) -> RingBudget {
        self.budget
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Bytes held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.ranges.iter().map(|(s, e)| e.since(*s)).sum()
    }

    /// Bytes the ring holds on the heap (zero until first used).
    #[cfg(test)]
    pub(crate) fn allocated(&self) -> usize {
        self.buf.capacity() + self.ranges.capacity() * std::mem::size_of::<(Seq, Seq)>()
    }

    /// Stores `data` at `seq`. The caller has trimmed it to `[rcv_nxt, rcv_nxt + cap)`.
    /// Returns false (storing nothing) when it would need more than `MAX_RANGES` ranges.
    pub(crate) fn insert(&mut self, rcv_nxt: Seq, seq: Seq, data: &[u8]) -> bool {
        if data.is_empty() {
            return true;
        }
        debug_assert!(seq >= rcv_nxt && (seq + data.len()).since(rcv_nxt) <= self.cap);
        let (start, end) = (seq, seq + data.len());
        // Where the new range goes, and which existing ones it touches.
        let first = self.ranges.iter().position(|r| r.1 >= start);
        let touching = match first {
            Some(i) => self.ranges[i..].iter().take_while(|r| r.0 <= end).count(),
            None => 0,
        };
        if touching == 0 && self.ranges.len() >= MAX_RANGES {
            return false;
        }
        if self.buf.is_empty() {
            if !reserve(self.guest, self.cap, self.budget) {
                return false;
            }
            self.buf = take_ring(self.cap);
            self.ranges.reserve_exact(MAX_RANGES);
        }
        let at = seq.0 as usize & (self.cap - 1);
        let first_part = data.len().min(self.cap - at);
        self.buf[at..at + first_part].copy_from_slice(&data[..first_part]);
        self.buf[..data.len() - first_part].copy_from_slice(&data[first_part..]);
        let i = first.unwrap_or(self.ranges.len());
        if touching == 0 {
            self.ranges.insert(i, (start, end));
        } else {
            let merged = (
                start.min(self.ranges[i].0),
                end.max(self.ranges[i + touching - 1].1),
            );
            self.ranges.drain(i + 1..i + touching);
            self.ranges[i] = merged;
        }
        true
    }

    /// How many bytes from `rcv_nxt` on are held without a hole.
    pub(crate) fn contiguous(&self, rcv_nxt: Seq) -> usize {
        match self.ranges.first() {
            Some(&(s, e)) if s <= rcv_nxt => e.since(rcv_nxt),
            _ => 0,
        }
    }

    /// The `n` bytes from `seq` on (held), as at most two slices of the ring.
    pub(crate) fn slices(&self, seq: Seq, n: usize) -> (&[u8], &[u8]) {
        let at = seq.0 as usize & (self.cap - 1);
        let first = n.min(self.cap - at);
        (&self.buf[at..at + first], &self.buf[..n - first])
    }

    /// Gives the storage back to the pool when nothing waits in it.
    pub(crate) fn release_if_empty(&mut self) {
        if self.ranges.is_empty() && !self.buf.is_empty() {
            unreserve(self.guest, self.cap);
            give_ring(std::mem::take(&mut self.buf));
        }
    }

    /// Forgets everything before `rcv_nxt` (written to the socket).
    pub(crate) fn advance(&mut self, rcv_nxt: Seq) {
        self.ranges.retain(|r| r.1 > rcv_nxt);
        if let Some(r) = self.ranges.first_mut() {
            r.0 = r.0.max(rcv_nxt);
        }
    }

    /// Up to three ranges held beyond `rcv_nxt`, for SACK blocks (RFC 2018).
    pub(crate) fn sack_blocks(&self, rcv_nxt: Seq) -> [Option<(u32, u32)>; 3] {
        let mut out = [None; 3];
        for (slot, r) in out
            .iter_mut()
            .zip(self.ranges.iter().filter(|r| r.0 > rcv_nxt))
        {
            *slot = Some((r.0 .0, r.1 .0));
        }
        out
    }
}

impl Drop for RecvRing {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            unreserve(self.guest, self.cap);
            give_ring(std::mem::take(&mut self.buf));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 168, 30, 10));

    #[test]
    fn rings_count_against_the_budget_and_come_back() {
        let budget = RingBudget {
            total: 3 << 10,
            per_guest: 2 << 10,
        };
        let other = IpAddr::from([192, 168, 30, 11]);
        let start = held(G);
        let mut a = RecvRing::new(1024, G, budget);
        let mut b = RecvRing::new(1024, G, budget);
        let mut c = RecvRing::new(1024, G, budget);
        let mut d = RecvRing::new(1024, other, budget);
        assert!(a.insert(Seq(0), Seq(10), b"x"));
        assert!(b.insert(Seq(0), Seq(10), b"x"));
        assert!(
            !c.insert(Seq(0), Seq(10), b"x"),
            "the guest's share is spent"
        );
        assert!(
            d.insert(Seq(0), Seq(10), b"x"),
            "another guest still gets a ring"
        );
        assert_eq!(held(G).1 - start.1, 2048);
        drop(a);
        b.advance(Seq(11));
        b.release_if_empty();
        assert_eq!(held(G).1, start.1, "released rings are no longer counted");
        assert!(c.insert(Seq(0), Seq(10), b"x"));
    }

    #[test]
    fn storage_goes_back_to_the_pool_when_empty() {
        let mut r = RecvRing::new(1 << 14, G, RingBudget::UNLIMITED);
        r.insert(Seq(0), Seq(0), b"abc");
        assert!(r.allocated() >= 1 << 14);
        r.release_if_empty();
        assert!(r.allocated() >= 1 << 14, "bytes still wait");
        r.advance(Seq(3));
        r.release_if_empty();
        assert_eq!(r.buf.capacity(), 0);
        // The next ring of that size comes from the pool.
        let mut q = RecvRing::new(1 << 14, G, RingBudget::UNLIMITED);
        q.insert(Seq(10), Seq(10), b"x");
        assert_eq!(q.slices(Seq(10), 1).0, b"x");
    }

    #[test]
    fn fills_holes_and_merges() {
        let mut r = RecvRing::new(16, G, RingBudget::UNLIMITED);
        let base = Seq(u32::MAX - 5);
        assert!(r.insert(base, base + 4, b"efgh"));
        assert!(r.insert(base, base + 10, b"kl"));
        assert_eq!(r.contiguous(base), 0);
        assert_eq!(r.sack_blocks(base)[0], Some(((base + 4).0, (base + 8).0)));
        assert!(r.sack_blocks(base)[1].is_some());
        // Overlapping fill of the first hole.
        assert!(r.insert(base, base, b"abcdef"));
        assert_eq!(r.contiguous(base), 8);
        let (a, b) = r.slices(base, 8);
        assert_eq!([a, b].concat(), b"abcdefgh");
        r.advance(base + 3);
        assert_eq!(r.contiguous(base + 3), 5);
        assert_eq!(r.len(), 7);
        assert!(r.insert(base + 3, base + 8, b"ij"));
        assert_eq!(r.contiguous(base + 3), 9);
        let (a, b) = r.slices(base + 3, 9);
        assert_eq!([a, b].concat(), b"defghijkl");
        r.advance(base + 12);
        assert!(r.is_empty());
    }

    #[test]
    fn range_count_is_bounded() {
        let mut r = RecvRing::new(1024, G, RingBudget::UNLIMITED);
        let base = Seq(0);
        for i in 0..MAX_RANGES {
            assert!(r.insert(base, base + (2 + i * 4), b"x"));
        }
        assert!(!r.insert(base, base + 900, b"y"));
        // Extending an existing range is still fine.
        assert!(r.insert(base, base + 3, b"z"));
        assert_eq!(r.len(), MAX_RANGES + 1);
    }
}
