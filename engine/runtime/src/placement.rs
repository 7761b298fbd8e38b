//! Which worker takes a new TCP flow.
//!
//! The router's hash alone puts a guest's connections on the workers at random. Two loads show
//! what that costs: a client that connects, exchanges and closes one connection after another
//! finds the owner of each new connection asleep half the time (it had the one before last),
//! and every wake-up is a step of the cycle; a client that opens a few bulk connections at once
//! finds them all on one worker one time in eight, at half the throughput. So a new TCP flow is
//! placed: on the worker that saw a flow end within the last 5 milliseconds (the client is
//! replacing one connection by the next, and that worker is awake) unless that worker has a
//! few more connections than the least loaded (a guest cannot pile the others' connections on
//! one worker by ending its own there; one new connection follows one end), else on the
//! preferred worker: the one with the fewest live connections, the turn passing to the next
//! worker at each placement so that a burst of SYNs, placed before any worker has counted one,
//! is spread in turn.
//!
//! The placement is kept in a table of 65,536 slots, one per bucket of the flow hash's low
//! bits: a slot names a worker and counts the connections its bucket has there, or is empty
//! (the bucket's flows follow the hash, as UDP and ICMP always do). A guest's SYN in an empty
//! bucket claims it for the chosen worker; the bucket stays that worker's while any connection
//! of it lives there (tombstones included), so a connection's frames never move, and is freed
//! when its last one goes. With a multiqueue TAP the table is an eBPF array shared with the
//! TAP's steering program (`port::steer`), which claims and reads it in the kernel as it picks a
//! frame's queue: every frame is read by its owner at once. Without one (a QEMU socket, a
//! joined interface) the router claims it as it reads the frame.
//!
//! What the kernel and the router read must agree: both compute the same choice from the same
//! words (`PREFERRED`, `END_QUEUE`, `END_TIME` on the one monotonic clock, `FOLLOW_MASK`), a
//! slot changes owner only from empty (a compare-and-swap on both sides), and only its owner
//! counts it up and down. A claim whose SYN made no connection (refused, or the virtual host's
//! own) stays until its owner's sweep frees it.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use crate::port::steer::{monotonic_ns, FlowMap};

/// Slots of the table: buckets of the flow hash's low 16 bits.
pub const SLOTS: usize = 1 << 16;
/// The word naming the worker with the fewest live connections (written by the workers).
pub(crate) const PREFERRED: usize = SLOTS;
/// The word naming the worker that last saw a guest end a connection (FIN or RST).
pub(crate) const END_QUEUE: usize = SLOTS + 1;
/// When that was, in nanoseconds of the monotonic clock (the kernel's `ktime_get_ns`).
pub(crate) const END_TIME: usize = SLOTS + 2;
/// The workers a new connection may follow to (bit i: worker i), those whose load is within
/// `FOLLOW_SLACK` of the least loaded (written with `PREFERRED`).
pub(crate) const FOLLOW_MASK: usize = SLOTS + 3;
/// The number of workers (written once, for the steering program's turn of `PREFERRED`).
pub(crate) const WORKERS: usize = SLOTS + 4;
/// Words of the table: the slots, then the five above.
pub const WORDS: usize = SLOTS + 5;
/// For this long after a guest ended a connection on a worker, its next new connection goes
/// there too. A client that replaces one connection by the next does it within tens of
/// microseconds when it has a CPU, but waits for one on a busy machine (half a millisecond was
/// too short behind a debug build's workers); a bulk client opening its connections at once
/// ends none, and they are spread.
pub(crate) const FOLLOW_NS: u64 = 5_000_000;

// TCP flags, in the header's 14th byte.
pub(crate) const FIN: u8 = 0x01;
pub(crate) const SYN: u8 = 0x02;
pub(crate) const RST: u8 = 0x04;
pub(crate) const ACK: u8 = 0x10;

/// How far above the least loaded worker one may be and still take the connection that
/// follows an ended one (8 connections, and an eighth): a guest that ends connections on one
/// worker as fast as it can draws the others' new connections there only so far. A client that
/// replaces its connections has a few still closing on its worker, more the slower the machine:
/// behind a debug build's workers at most 3 on an idle machine and 4 under six CPU hogs, and
/// enough more in a CI run to pass a slack of 4 a few times a second, each time moving the
/// client to the other worker, where both workers then took the two CPUs from the client and
/// its server (a slack of 1 did so on an idle machine: its cycles' p99 went from 1.1 to 7 ms).
fn follow_slack(least: u32) -> u32 {
    8 + least / 8
}

/// How often a worker frees the slots it holds with no connection in them (`sweep`).
pub const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// A slot: the owner plus one in the high half, the owner's connections of the bucket in the
/// low half; 0 when empty.
fn slot_of(worker: usize, count: u32) -> u64 {
    ((worker as u64 + 1) << 32) | u64::from(count)
}

/// Where a new TCP flow goes, shared by the router's clones on every thread.
pub struct Placement {
    words: Words,
    /// Each worker's live TCP connections (tombstones not counted), as it last published them.
    loads: Box<[AtomicU32]>,
    workers: usize,
    /// A TAP's steering program reads the table (and notes the guests' ends itself).
    steered: AtomicBool,
}

enum Words {
    /// In the kernel, shared with the TAP's steering program.
    Kernel(FlowMap),
    /// In this process alone.
    Heap(Box<[AtomicU64]>),
}

impl Placement {
    /// A table for `workers` workers, in the kernel where it may be made there (an eBPF array
    /// the TAP's steering program can share; it takes CAP_BPF or CAP_SYS_ADMIN), else here.
    pub fn new(workers: usize) -> Placement {
        match FlowMap::create(WORDS) {
            Ok(map) => Placement::with_words(workers, Words::Kernel(map)),
            Err(e) => {
                tracing::debug!("flow placement kept in the process (no eBPF array: {e})");
                Placement::in_process(workers)
            }
        }
    }

    /// A table in this process alone (no steering program can read it).
    pub fn in_process(workers: usize) -> Placement {
        let words = (0..WORDS).map(|_| AtomicU64::new(0)).collect();
        Placement::with_words(workers, Words::Heap(words))
    }

    fn with_words(workers: usize, words: Words) -> Placement {
        let workers = workers.max(1);
        let p = Placement {
            words,
            loads: (0..workers).map(|_| AtomicU32::new(0)).collect(),
            workers,
            steered: AtomicBool::new(false),
        };
        p.words()[WORKERS].store(workers as u64, Ordering::Relaxed);
        p
    }

    /// The eBPF array behind the table, for the TAP's steering program; None when the table is
    /// in this process.
    pub fn kernel_map(&self) -> Option<&FlowMap> {
        match &self.words {
            Words::Kernel(m) => Some(m),
            Words::Heap(_) => None,
        }
    }

    /// A steering program shares the table now (`port::steer::steer_queues`).
    pub fn set_steered(&self) {
        self.steered.store(true, Ordering::Relaxed);
    }

    fn words(&self) -> &[AtomicU64] {
        match &self.words {
            Words::Kernel(m) => m.words(),
            Words::Heap(w) => w,
        }
    }

    fn slot(&self, hash: u32) -> &AtomicU64 {
        &self.words()[hash as usize % SLOTS]
    }

    /// The owner named by a non-empty slot (None for a value no worker of ours wrote).
    fn owner_in(&self, v: u64) -> Option<usize> {
        let w = (v >> 32).checked_sub(1)? as usize;
        (w < self.workers).then_some(w)
    }

    /// The owner of a guest's TCP frame with flow hash `hash` and `flags`: its bucket's
    /// worker; for a SYN in an empty bucket, the worker it is placed on now (the bucket is
    /// claimed for it). None: the bucket is empty and the frame follows the hash. A FIN or RST
    /// of a placed flow marks its worker as the place of the guest's next new connection.
    pub fn owner(&self, hash: u32, flags: u8) -> Option<usize> {
        let slot = self.slot(hash);
        let v = slot.load(Ordering::Acquire);
        if v != 0 {
            let w = self.owner_in(v)?;
            // Where a steering program reads the table, it notes ends as it reads them; noting
            // them again here, later, would let a second connection follow one end.
            if flags & (FIN | RST) != 0 && !self.steered.load(Ordering::Relaxed) {
                self.note_end(w);
            }
            return Some(w);
        }
        if flags & (FIN | SYN | RST | ACK) != SYN {
            return None;
        }
        Some(self.claim(hash, self.choose()))
    }

    /// Claims the bucket of `hash` for `worker` if it is empty; the bucket's owner either way.
    pub fn claim(&self, hash: u32, worker: usize) -> usize {
        match self.slot(hash).compare_exchange(
            0,
            slot_of(worker, 0),
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => worker,
            Err(v) => self.owner_in(v).unwrap_or(worker),
        }
    }

    /// The worker a new connection goes to now (the steering program chooses alike): the one
    /// a guest last ended a connection on, once per end (a burst of SYNs after one end does not
    /// all follow it); else the preferred one, which then passes to the next worker, so that a
    /// burst of SYNs placed before any worker has counted them is spread in turn.
    pub(crate) fn choose(&self) -> usize {
        let w = self.words();
        let since = monotonic_ns().saturating_sub(w[END_TIME].load(Ordering::Relaxed));
        let ended = w[END_QUEUE].load(Ordering::Relaxed);
        let may_follow = ended < 64 && w[FOLLOW_MASK].load(Ordering::Relaxed) >> ended & 1 == 1;
        if since < FOLLOW_NS && may_follow {
            w[END_TIME].store(0, Ordering::Relaxed);
            return (ended as usize).min(self.workers - 1);
        }
        let pick = (w[PREFERRED].load(Ordering::Relaxed) as usize).min(self.workers - 1);
        let next = if pick + 1 >= self.workers {
            0
        } else {
            pick + 1
        };
        w[PREFERRED].store(next as u64, Ordering::Relaxed);
        pick
    }

    fn note_end(&self, worker: usize) {
        let w = self.words();
        w[END_QUEUE].store(worker as u64, Ordering::Relaxed);
        w[END_TIME].store(monotonic_ns(), Ordering::Relaxed);
    }

    /// `worker` entered a connection of bucket `hash` in its table (the bucket is its own:
    /// claimed before the connection was made).
    pub fn opened(&self, hash: u32, worker: usize) {
        let slot = self.slot(hash);
        let mut v = slot.load(Ordering::Acquire);
        loop {
            let next = match self.owner_in(v) {
                Some(w) if w == worker => v + 1,
                // Freed meanwhile by a sweep: claimed again, with its connection.
                None if v == 0 => slot_of(worker, 1),
                _ => {
                    tracing::debug!(
                        "flow placement: bucket {:#x} is not worker {worker}'s",
                        hash as usize % SLOTS
                    );
                    return;
                }
            };
            match slot.compare_exchange_weak(v, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return,
                Err(now) => v = now,
            }
        }
    }

    /// `worker` removed a connection of bucket `hash` from its table; the last one frees it.
    pub fn closed(&self, hash: u32, worker: usize) {
        let slot = self.slot(hash);
        let mut v = slot.load(Ordering::Acquire);
        loop {
            if self.owner_in(v) != Some(worker) || v as u32 == 0 {
                return;
            }
            let next = if v as u32 == 1 { 0 } else { v - 1 };
            match slot.compare_exchange_weak(v, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return,
                Err(now) => v = now,
            }
        }
    }

    /// `worker` has `live` connections now: the preferred worker becomes the one with the
    /// fewest, unless the present one has no more than any other.
    pub fn publish_load(&self, worker: usize, live: usize) {
        let Some(l) = self.loads.get(worker) else {
            return;
        };
        l.store(live.min(u32::MAX as usize) as u32, Ordering::Relaxed);
        let load = |i: usize| self.loads[i].load(Ordering::Relaxed);
        let (least, min) = (0..self.workers)
            .map(|i| (i, load(i)))
            .min_by_key(|&(_, n)| n)
            .unwrap_or((0, 0));
        let pref = &self.words()[PREFERRED];
        let now = (pref.load(Ordering::Relaxed) as usize).min(self.workers - 1);
        if load(now) > min {
            pref.store(least as u64, Ordering::Relaxed);
        }
        let limit = min.saturating_add(follow_slack(min));
        let mask = (0..self.workers.min(64))
            .filter(|&i| load(i) <= limit)
            .fold(0u64, |m, i| m | 1 << i);
        self.words()[FOLLOW_MASK].store(mask, Ordering::Relaxed);
    }

    /// Frees the slots `worker` claimed that have held no connection since its last sweep
    /// (`pending`, which it keeps between sweeps and which this refills): claims of SYNs that
    /// made no connection. One sweep apart, a claim still waiting for its connection (a
    /// forwarded connection on its way to the worker) is not taken from it.
    pub fn sweep(&self, worker: usize, pending: &mut Vec<u16>) {
        let empty = slot_of(worker, 0);
        let words = &self.words()[..SLOTS];
        for &i in pending.iter() {
            let _ = words[usize::from(i)].compare_exchange(
                empty,
                0,
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
        }
        pending.clear();
        pending.extend(
            (0..SLOTS)
                .filter(|&i| words[i].load(Ordering::Relaxed) == empty)
                .map(|i| i as u16),
        );
    }

    /// The slot of bucket `hash`: (owner, connections), or None when empty.
    #[cfg(test)]
    pub(crate) fn slot_state(&self, hash: u32) -> Option<(usize, u32)> {
        let v = self.slot(hash).load(Ordering::Acquire);
        Some((self.owner_in(v)?, v as u32))
    }

    /// Sets a control word (tests of the steering program).
    #[cfg(test)]
    pub(crate) fn set_word(&self, i: usize, v: u64) {
        self.words()[i].store(v, Ordering::Relaxed);
    }

    #[cfg(test)]
    pub(crate) fn word(&self, i: usize) -> u64 {
        self.words()[i].load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_syn_claims_its_bucket_and_the_bucket_stays_while_a_connection_lives() {
        let p = Placement::in_process(2);
        p.publish_load(0, 3);
        p.publish_load(1, 1);
        assert_eq!(p.word(PREFERRED), 1, "the worker with fewer connections");
        // Not a SYN: no claim, the frame follows the hash.
        assert_eq!(p.owner(7, ACK), None);
        assert_eq!(p.owner(7, SYN | ACK), None);
        assert_eq!(p.owner(7, SYN), Some(1));
        assert_eq!(p.slot_state(7), Some((1, 0)));
        // Another flow of the bucket follows it, whatever is preferred now.
        p.publish_load(1, 9);
        assert_eq!(p.word(PREFERRED), 0);
        assert_eq!(p.owner(7 + SLOTS as u32, SYN), Some(1));
        assert_eq!(p.owner(7, ACK), Some(1));
        // Its connections counted: the bucket is freed with the last.
        p.opened(7, 1);
        p.opened(7 + SLOTS as u32, 1);
        assert_eq!(p.slot_state(7), Some((1, 2)));
        p.closed(7, 1);
        assert_eq!(p.slot_state(7), Some((1, 1)));
        // Only the owner counts it.
        p.closed(7, 0);
        p.opened(7, 0);
        assert_eq!(p.slot_state(7), Some((1, 1)));
        p.closed(7, 1);
        assert_eq!(p.slot_state(7), None);
        assert_eq!(p.owner(7, ACK), None);
    }

    #[test]
    fn a_new_connection_follows_the_one_that_just_ended() {
        let p = Placement::in_process(2);
        p.publish_load(0, 0);
        p.publish_load(1, 0);
        assert_eq!(p.owner(1, SYN), Some(0));
        p.opened(1, 0);
        p.publish_load(0, 1);
        assert_eq!(p.word(PREFERRED), 1);
        // The guest closes it and connects again at once: the same worker, once.
        assert_eq!(p.owner(1, FIN | ACK), Some(0));
        assert_eq!(p.owner(2, SYN), Some(0));
        assert_eq!(p.owner(3, SYN), Some(1), "the end was followed already");
        // Long after the end, the preferred one.
        assert_eq!(p.owner(1, RST), Some(0));
        p.set_word(END_TIME, monotonic_ns() - 2 * FOLLOW_NS);
        assert_eq!(
            p.owner(4, SYN),
            Some(0),
            "the preferred one's turn passed on"
        );
    }

    #[test]
    fn where_a_steering_program_notes_ends_the_router_does_not() {
        let p = Placement::in_process(2);
        p.set_steered();
        p.claim(1, 1);
        assert_eq!(p.owner(1, FIN), Some(1));
        assert_eq!(p.word(END_TIME), 0);
    }

    #[test]
    fn a_burst_of_syns_takes_the_workers_in_turn() {
        let p = Placement::in_process(3);
        let got: Vec<_> = (0..7).map(|h| p.owner(h, SYN).unwrap()).collect();
        assert_eq!(got, [0, 1, 2, 0, 1, 2, 0]);
        // A published load puts the turn on the least loaded.
        p.publish_load(1, 5);
        p.publish_load(2, 5);
        p.publish_load(0, 5);
        p.publish_load(1, 2);
        assert_eq!(p.owner(10, SYN), Some(1));
    }

    #[test]
    fn ends_on_a_loaded_worker_draw_no_more_connections_there() {
        let p = Placement::in_process(2);
        p.publish_load(1, 0);
        p.publish_load(0, 8);
        assert_eq!(
            p.word(FOLLOW_MASK),
            0b11,
            "8 more than the least: still followed"
        );
        assert_eq!(p.owner(1, SYN), Some(1));
        p.opened(1, 1);
        assert_eq!(p.owner(1, RST), Some(1));
        p.slot(2).store(slot_of(0, 1), Ordering::Relaxed);
        assert_eq!(p.owner(2, FIN), Some(0));
        assert_eq!(p.owner(3, SYN), Some(0), "followed");
        p.publish_load(0, 9);
        assert_eq!(p.word(FOLLOW_MASK), 0b10);
        // The slack grows by an eighth of the least load.
        p.publish_load(1, 16);
        p.publish_load(0, 26);
        assert_eq!(p.word(FOLLOW_MASK), 0b11);
        p.publish_load(0, 27);
        assert_eq!(p.word(FOLLOW_MASK), 0b10);
        assert_eq!(p.owner(2, FIN), Some(0));
        assert_eq!(p.owner(4, SYN), Some(1), "not followed past the slack");
    }

    #[test]
    fn parallel_connections_are_spread_evenly() {
        let p = Placement::in_process(2);
        let mut on = [0usize; 2];
        let mut live = [0usize; 2];
        for h in 0..10u32 {
            let w = p.owner(h, SYN).unwrap();
            p.opened(h, w);
            live[w] += 1;
            p.publish_load(w, live[w]);
            on[w] += 1;
        }
        assert_eq!(on, [5, 5]);
    }

    #[test]
    fn a_sweep_frees_claims_without_connections_one_sweep_late() {
        let p = Placement::in_process(2);
        assert_eq!(p.claim(5, 1), 1);
        assert_eq!(p.claim(5, 0), 1, "claimed already");
        assert_eq!(p.claim(6, 1), 1);
        let mut pending = Vec::new();
        p.sweep(1, &mut pending);
        assert_eq!(p.slot_state(5), Some((1, 0)), "a claim is kept one sweep");
        // Slot 6's connection arrives between the sweeps.
        p.opened(6, 1);
        p.sweep(1, &mut pending);
        assert_eq!(p.slot_state(5), None);
        assert_eq!(p.slot_state(6), Some((1, 1)));
        // Another worker's sweep leaves worker 1's claims alone.
        assert_eq!(p.claim(7, 1), 1);
        let mut other = Vec::new();
        p.sweep(0, &mut other);
        p.sweep(0, &mut other);
        assert_eq!(p.slot_state(7), Some((1, 0)));
        // A connection opened on a freed slot claims it again.
        p.opened(5, 0);
        assert_eq!(p.slot_state(5), Some((0, 1)));
    }
}
