//! The bounded lock-free queues between threads: each thread's inbox of frames (pool buffers)
//! and of datagrams the control thread reassembled, the counters a worker publishes there, and
//! the hand-over of frames to their owner.
//!
//! A full queue drops the frame and counts it (`DropReason::QueueFull`), never blocking the
//! reader. A queue's owner is woken (an eventfd) only when a batch made its queue go from empty
//! to non-empty.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crossbeam_queue::ArrayQueue;

use crate::pool::{Pool, ReadBufs};
use crate::router::Router;
use crate::worker::WorkerReport;
use hubnat_core::output::FrameBatch;
use hubnat_core::stats::DropReason;
use hubnat_core::Engine;

/// Reassembled datagrams queued for one thread at most (each up to 64 KiB).
pub const WHOLE_CAPACITY: usize = 32;

/// How often a busy worker publishes its counters (`Inbox::publish`).
pub const PUBLISH_EVERY: Duration = Duration::from_millis(10);

/// A thread's input queue and the means to wake it.
pub struct Inbox {
    pub(crate) queue: ArrayQueue<(Box<[u8]>, u32)>,
    /// Datagrams the control thread reassembled for a flow this thread owns, as Ethernet
    /// frames larger than the pool's buffers (rare: one allocation each).
    whole: ArrayQueue<Box<[u8]>>,
    /// Frames read from the port that are larger than the pool's buffers (a guest's TCP
    /// super-segments, with offloads on), for this thread to handle as any frame it reads:
    /// one allocation each, a few queued at most.
    large: ArrayQueue<Box<[u8]>>,
    waker: mio::Waker,
    /// The owner's counters and session counts as it last published them (`publish`), for
    /// the control thread to read without asking; locked once per published change, never per
    /// frame.
    published: Mutex<WorkerReport>,
    /// When the owner may publish again while it still has frames queued (core microseconds).
    publish_after: AtomicU64,
}

impl Inbox {
    pub fn new(capacity: usize, waker: mio::Waker) -> Inbox {
        Inbox {
            queue: ArrayQueue::new(capacity.max(1)),
            whole: ArrayQueue::new(WHOLE_CAPACITY),
            large: ArrayQueue::new(WHOLE_CAPACITY),
            waker,
            published: Mutex::new(WorkerReport::default()),
            publish_after: AtomicU64::new(0),
        }
    }

    /// Publishes `engine`'s counters and session counts for readers of `published`: at most
    /// every `PUBLISH_EVERY` while frames wait in this queue, and whenever the queue is empty
    /// (the owner may go to sleep: what it did must be visible). Unchanged counters are not
    /// written again.
    pub fn publish(&self, now: hubnat_core::Instant, engine: &Engine) {
        let due = now.as_micros() >= self.publish_after.load(Ordering::Relaxed);
        if !due && !self.is_empty() {
            return;
        }
        let mut slot = self.published.lock().unwrap_or_else(|e| e.into_inner());
        if slot.update_counters(engine) {
            let next = now + PUBLISH_EVERY;
            self.publish_after
                .store(next.as_micros(), Ordering::Relaxed);
        }
    }

    /// What the owner last published (counters and session counts, no sessions).
    pub fn published(&self) -> WorkerReport {
        self.published
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty() && self.whole.is_empty() && self.large.is_empty()
    }

    /// The next frame larger than a pool buffer for this thread (`Shared::forward_copy`).
    pub fn pop_large(&self) -> Option<Box<[u8]>> {
        self.large.pop()
    }

    pub fn pop(&self) -> Option<(Box<[u8]>, u32)> {
        self.queue.pop()
    }

    /// The next reassembled datagram for this thread.
    pub fn pop_whole(&self) -> Option<Box<[u8]>> {
        self.whole.pop()
    }

    pub fn wake(&self) {
        if let Err(e) = self.waker.wake() {
            tracing::warn!("cannot wake a thread: {e}");
        }
    }
}

/// What every thread of the runtime shares: the queues (workers 0..n, then the control
/// thread's) and the buffer pool.
pub struct Shared {
    pub inboxes: Vec<Inbox>,
    pub pool: Pool,
    /// Why a worker stopped on its own (an error it could not go on after): the control
    /// thread ends the runtime with it rather than serve the segment with a thread missing.
    failure: Mutex<Option<String>>,
    /// Whether `failure` holds a reason: what the control thread asks on every wake-up, so
    /// that the common answer (none) costs a load, not a lock.
    failed: AtomicBool,
}

/// Pushes `frame` onto `queue`, marking `wake` when the queue's thread had nothing waiting
/// (`was_empty`: it may be asleep); gives the frame back when the queue is full.
fn push_boxed(
    queue: &ArrayQueue<Box<[u8]>>,
    frame: Box<[u8]>,
    was_empty: bool,
    wake: &mut bool,
) -> Result<(), Box<[u8]>> {
    queue.push(frame)?;
    if was_empty {
        *wake = true;
    }
    Ok(())
}

impl Shared {
    pub fn new(inboxes: Vec<Inbox>, pool: Pool) -> Shared {
        Shared {
            inboxes,
            pool,
            failure: Mutex::new(None),
            failed: AtomicBool::new(false),
        }
    }

    /// Records that worker `index` stopped because of `why` (the first such reason is kept)
    /// and wakes the control thread (`control`: its inbox) to end the runtime.
    pub fn worker_failed(&self, index: usize, why: &str, control: usize) {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert_with(|| format!("worker {index} stopped: {why}"));
        self.failed.store(true, Ordering::Release);
        self.inboxes[control].wake();
    }

    /// Why a worker stopped on its own, if one did.
    pub fn failure(&self) -> Option<String> {
        if !self.failed.load(Ordering::Acquire) {
            return None;
        }
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Queues `buf[..len]` for thread `to`; gives the buffer back when the queue is full.
    /// Marks `wake[to]` when the queue was empty (the owner may be asleep).
    pub fn forward(
        &self,
        to: usize,
        buf: Box<[u8]>,
        len: usize,
        wake: &mut [bool],
    ) -> Result<(), Box<[u8]>> {
        let inbox = &self.inboxes[to];
        let was_empty = inbox.queue.is_empty();
        match inbox.queue.push((buf, len as u32)) {
            Ok(()) => {
                if was_empty {
                    wake[to] = true;
                }
                Ok(())
            }
            Err((buf, _)) => Err(buf),
        }
    }

    /// Queues a copy of `frame` for thread `to`: in a pool buffer, or allocated when it is
    /// larger than those. False when the pool is dry or the queue full (the caller drops the
    /// frame and counts it). Marks `wake[to]` when the queue was empty.
    pub fn forward_copy(&self, to: usize, frame: &[u8], wake: &mut [bool]) -> bool {
        if frame.len() > self.pool.size() {
            let inbox = &self.inboxes[to];
            let was_empty = inbox.is_empty();
            return push_boxed(&inbox.large, frame.into(), was_empty, &mut wake[to]).is_ok();
        }
        let Some(mut buf) = self.pool.get() else {
            return false;
        };
        buf[..frame.len()].copy_from_slice(frame);
        match self.forward(to, buf, frame.len(), wake) {
            Ok(()) => true,
            Err(buf) => {
                self.pool.put(buf);
                false
            }
        }
    }

    /// Queues a reassembled datagram (an Ethernet frame) for thread `to`; gives it back when the
    /// queue is full. Marks `wake[to]` when the queue was empty.
    pub fn forward_whole(
        &self,
        to: usize,
        frame: Box<[u8]>,
        wake: &mut [bool],
    ) -> Result<(), Box<[u8]>> {
        let inbox = &self.inboxes[to];
        let was_empty = inbox.whole.is_empty();
        push_boxed(&inbox.whole, frame, was_empty, &mut wake[to])
    }

    /// The control thread's handling of a frame it owns, with workers: an IP fragment is
    /// reassembled here (this thread owns reassembly and its timeouts), and the whole datagram
    /// goes to the owner of its flow: this engine, or a worker's queue (a full queue drops it
    /// and counts it). Anything else is handled here. `whole` is scratch space.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn control_frame(
        &self,
        router: &Router,
        engine: &mut Engine,
        whole: &mut Vec<u8>,
        now: hubnat_core::Instant,
        frame: &[u8],
        io: &mut impl hubnat_core::SockIo,
        out: &mut FrameBatch,
        wake: &mut [bool],
    ) {
        match engine.reassemble(now, frame, whole) {
            hubnat_core::Reassembly::NotFragment => engine.handle_frame(now, frame, io, out),
            hubnat_core::Reassembly::Taken => {}
            hubnat_core::Reassembly::Whole => {
                let to = router.route(whole, &engine.ctx.cfg, engine.ctx.mac);
                if to >= router.control() {
                    engine.handle_reassembled(now, whole, io, out);
                } else if self
                    .forward_whole(to, whole.as_slice().into(), wake)
                    .is_err()
                {
                    engine.ctx.stats.drop(DropReason::QueueFull);
                }
            }
        }
    }

    /// Hands a frame read into `buf` (a pool buffer when `from_pool`) to thread `to`'s queue.
    /// A frame in the reader's own buffer (the pool was dry, or the frame may be larger than
    /// its buffers) travels as a copy (`forward_copy`). A full queue or a dry pool drops the
    /// frame and counts it; the buffer goes back to `bufs`.
    pub(crate) fn hand_over(
        &self,
        to: usize,
        (buf, from_pool): (Box<[u8]>, bool),
        len: usize,
        bufs: &mut ReadBufs,
        wake: &mut [bool],
        stats: &mut hubnat_core::Stats,
    ) {
        if !from_pool {
            if !self.forward_copy(to, &buf[..len], wake) {
                stats.drop(DropReason::QueueFull);
            }
            bufs.put_back(buf, false);
        } else if let Err(buf) = self.forward(to, buf, len, wake) {
            stats.drop(DropReason::QueueFull);
            bufs.put_back(buf, true);
        }
    }

    /// Wakes the threads marked in `wake` and clears the marks.
    pub fn wake_marked(&self, wake: &mut [bool]) {
        for (i, w) in wake.iter_mut().enumerate() {
            if std::mem::take(w) {
                self.inboxes[i].wake();
            }
        }
    }
}

/// The depth of each queue for frames of `frame_size` bytes: 4096 frames, fewer for large
/// MTUs (about 16 MiB of buffers a queue, at least 64 frames). Deep enough to ride out the
/// bursts in which the control thread reads the port faster than one worker handles its flows
/// (at 1024, a single upload overflowed it tens of thousands of times a run); buffers are
/// touched only when used.
pub fn queue_capacity(frame_size: usize) -> usize {
    ((16 << 20) / frame_size.max(1)).clamp(64, 4096)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokens::WAKE;
    use hubnat_core::testing::*;
    use hubnat_core::SharedSessions;
    use mio::Poll;
    use smoltcp::wire::{IpProtocol, Ipv4Packet};
    use std::net::SocketAddrV4;
    use std::sync::Arc;

    /// Queues for two workers and the control thread (each with its own poll to wake).
    fn three_inboxes() -> (Vec<Poll>, Shared) {
        let polls: Vec<Poll> = (0..3).map(|_| Poll::new().unwrap()).collect();
        let inboxes = polls
            .iter()
            .map(|p| Inbox::new(8, mio::Waker::new(p.registry(), WAKE).unwrap()))
            .collect();
        let pool = Pool::new(4, 64);
        (polls, Shared::new(inboxes, pool))
    }

    /// The fragments (8-byte aligned pieces of `chunk` bytes) of a UDP datagram from `src` to
    /// `dst` carrying `payload`.
    fn udp_fragments(
        src: SocketAddrV4,
        dst: SocketAddrV4,
        payload: &[u8],
        chunk: usize,
    ) -> Vec<Vec<u8>> {
        let mut udp = vec![0u8; 8 + payload.len()];
        hubnat_core::wire::emit_udp(
            &mut udp,
            *src.ip(),
            src.port(),
            *dst.ip(),
            dst.port(),
            payload,
        );
        udp.chunks(chunk)
            .enumerate()
            .map(|(i, c)| {
                let more = (i + 1) * chunk < udp.len();
                ipv4_frame(
                    *src.ip(),
                    *dst.ip(),
                    IpProtocol::Udp,
                    77,
                    i * chunk,
                    more,
                    c,
                )
            })
            .collect()
    }

    #[test]
    fn a_fragmented_datagram_is_reassembled_by_control_and_handled_by_its_flows_worker() {
        let (_polls, shared) = three_inboxes();
        let router = Router::new(2);
        let limits = Arc::new(crate::limits::SharedLimits::default());
        let mk = || {
            let (mut e, h, _) = setup();
            e.ctx.share_sessions(limits.clone());
            (e, h)
        };
        let (mut ctl, mut hc) = mk();
        let mut workers = [mk(), mk()];
        for (e, _) in &mut workers {
            e.set_external_expiry(true);
        }
        let (guest, dst) = (
            SocketAddrV4::new(GUEST_IP, 4000),
            SocketAddrV4::new(REMOTE_IP, 9),
        );
        let owner = router.route(&udp_frame(guest, dst, b"x"), &ctl.ctx.cfg, HOST_MAC);
        assert!(owner < 2);
        let payload: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        let frags = udp_fragments(guest, dst, &payload, 1480);
        assert_eq!(frags.len(), 3);
        let (mut whole, mut out, mut wake) = (Vec::new(), FrameBatch::new(), vec![false; 3]);
        for f in &frags {
            // Fragments are the control thread's.
            assert_eq!(router.route(f, &ctl.ctx.cfg, HOST_MAC), 2);
            shared.control_frame(
                &router, &mut ctl, &mut whole, T0, f, &mut hc, &mut out, &mut wake,
            );
        }
        assert_eq!(ctl.sessions().len(), 0, "no session on the control thread");
        assert_eq!(ctl.stats().frames_in, 3);
        assert!(wake[owner], "the owner is woken");
        assert!(shared.inboxes[1 - owner].is_empty());
        assert!(!shared.inboxes[owner].is_empty());
        // The owner handles it as one datagram.
        let (e, h) = &mut workers[owner];
        let frame = shared.inboxes[owner].pop_whole().unwrap();
        assert_eq!(frame.len(), 14 + 20 + 8 + payload.len());
        e.handle_reassembled(T0, &frame, h, &mut out);
        let socks = h.ids(|s| matches!(s, hubnat_core::sim::SimSocket::Udp(_)));
        assert_eq!(socks.len(), 1);
        assert_eq!(h.udp(socks[0]).unwrap().sent, vec![payload.clone()]);
        // Later unfragmented datagrams of the flow go to the same worker and session.
        let f = udp_frame(guest, dst, b"again");
        assert_eq!(router.route(&f, &ctl.ctx.cfg, HOST_MAC), owner);
        e.handle_frame(T0, &f, h, &mut out);
        assert_eq!(e.nat.udp.len(), 1);
        assert_eq!(
            limits.count(
                hubnat_core::nat::Proto::Udp,
                std::net::IpAddr::from(GUEST_IP)
            ),
            1,
            "one session overall"
        );
        // The worker learnt the guest's MAC from the reassembled frame: it can answer.
        out.clear();
        h.deliver_udp(socks[0], b"reply");
        pump(e, h, &mut out, T0);
        assert_eq!(out.len(), 1);

        // Anything not a NAT fragment is handled by the control engine as before.
        let dns = udp_frame(guest, SocketAddrV4::new(HOST_IP, 9), b"q");
        shared.control_frame(
            &router, &mut ctl, &mut whole, T0, &dns, &mut hc, &mut out, &mut wake,
        );
        assert_eq!(ctl.stats().frames_in, 4);
        // A bad fragment is counted where it arrived.
        let mut bad = frags[0].clone();
        bad[14 + 10] ^= 0xff; // IP checksum
        shared.control_frame(
            &router, &mut ctl, &mut whole, T0, &bad, &mut hc, &mut out, &mut wake,
        );
        assert_eq!(ctl.stats().drops_of(DropReason::BadChecksum), 1);
    }

    #[test]
    fn reassembled_datagrams_beyond_the_queue_are_dropped_and_counted() {
        let (_polls, shared) = three_inboxes();
        let router = Router::new(2);
        let (mut ctl, mut hc, mut out) = setup();
        let mut wake = vec![false; 3];
        let mut whole = Vec::new();
        let dst = SocketAddrV4::new(REMOTE_IP, 9);
        let guest = (4000..)
            .map(|p| SocketAddrV4::new(GUEST_IP, p))
            .find(|g| router.route(&udp_frame(*g, dst, b"x"), &ctl.ctx.cfg, HOST_MAC) == 0)
            .unwrap();
        let n = WHOLE_CAPACITY + 3;
        for i in 0..n {
            let mut frags = udp_fragments(guest, dst, &[i as u8; 2000], 1480);
            for f in &mut frags {
                // A new identification per datagram.
                f[14 + 4..14 + 6].copy_from_slice(&(i as u16).to_be_bytes());
                let mut ip = Ipv4Packet::new_unchecked(&mut f[14..]);
                ip.fill_checksum();
                shared.control_frame(
                    &router, &mut ctl, &mut whole, T0, f, &mut hc, &mut out, &mut wake,
                );
            }
        }
        assert_eq!(ctl.stats().drops_of(DropReason::QueueFull), 3);
        let mut got = 0;
        while shared.inboxes[0].pop_whole().is_some() {
            got += 1;
        }
        assert_eq!(got, WHOLE_CAPACITY);
    }

    #[test]
    fn a_malformed_reassembled_frame_is_counted_not_handled() {
        let (mut e, mut h, mut out) = setup();
        for f in [
            &b"short"[..],
            &udp_frame(
                SocketAddrV4::new(GUEST_IP, 1),
                SocketAddrV4::new(REMOTE_IP, 9),
                b"x",
            )[..40],
        ] {
            e.handle_reassembled(T0, f, &mut h, &mut out);
        }
        let mut frag = udp_frame(
            SocketAddrV4::new(GUEST_IP, 1),
            SocketAddrV4::new(REMOTE_IP, 9),
            b"x",
        );
        frag[14 + 6] |= 0x20;
        let mut ip = Ipv4Packet::new_unchecked(&mut frag[14..]);
        ip.fill_checksum();
        e.handle_reassembled(T0, &frag, &mut h, &mut out);
        assert_eq!(e.stats().drops_of(DropReason::Malformed), 3);
        assert_eq!(e.sessions().len(), 0);
    }

    #[test]
    fn a_busy_workers_counters_are_readable_without_asking_it() {
        let (_polls, shared) = three_inboxes();
        let shared = Arc::new(shared);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (sh, st) = (Arc::clone(&shared), Arc::clone(&stop));
        // A worker that never looks at its commands: it handles frames and publishes.
        let busy = std::thread::spawn(move || {
            let (mut e, mut h, mut out) = setup();
            let f = udp_frame(
                SocketAddrV4::new(GUEST_IP, 4000),
                SocketAddrV4::new(REMOTE_IP, 9),
                b"x",
            );
            let mut t = T0;
            while !st.load(Ordering::Relaxed) {
                e.handle_frame(t, &f, &mut h, &mut out);
                out.clear();
                // Frames keep waiting in its queue: it publishes on its period only.
                if let Some(b) = sh.pool.get() {
                    let _ = sh.forward(0, b, 1, &mut [false; 3]);
                }
                sh.inboxes[0].publish(t, &e);
                t = t + Duration::from_millis(1);
            }
            e.ctx.stats.frames_in
        });
        let give_up = std::time::Instant::now() + Duration::from_secs(30);
        let seen = |min: u64| loop {
            assert!(std::time::Instant::now() < give_up, "never published");
            let r = shared.inboxes[0].published();
            if r.stats.frames_in > min {
                return r;
            }
            std::thread::yield_now();
        };
        let first = seen(0);
        assert_eq!(first.counts[hubnat_core::nat::Proto::Udp.index()], 1);
        assert!(first.sessions.is_empty());
        let later = seen(first.stats.frames_in);
        assert!(later.stats.bytes_in > first.stats.bytes_in);
        stop.store(true, Ordering::Relaxed);
        let total = busy.join().unwrap();
        assert!(total >= later.stats.frames_in);
    }

    #[test]
    fn publishing_is_rate_limited_while_frames_wait_and_immediate_when_idle() {
        let (_polls, shared) = three_inboxes();
        let inbox = &shared.inboxes[0];
        let (mut e, mut h, mut out) = setup();
        let f = udp_frame(
            SocketAddrV4::new(GUEST_IP, 4000),
            SocketAddrV4::new(REMOTE_IP, 9),
            b"x",
        );
        e.handle_frame(T0, &f, &mut h, &mut out);
        inbox.publish(T0, &e);
        assert_eq!(inbox.published().stats.frames_in, 1);
        // Busy (a frame waits): not again before PUBLISH_EVERY.
        let b = shared.pool.get().unwrap();
        shared.forward(0, b, 1, &mut [false; 3]).unwrap();
        e.handle_frame(T0, &f, &mut h, &mut out);
        inbox.publish(T0 + Duration::from_millis(1), &e);
        assert_eq!(inbox.published().stats.frames_in, 1);
        inbox.publish(T0 + PUBLISH_EVERY, &e);
        assert_eq!(inbox.published().stats.frames_in, 2);
        // Idle (queue empty): at once.
        let (b, _) = shared.inboxes[0].pop().unwrap();
        shared.pool.put(b);
        e.handle_frame(T0, &f, &mut h, &mut out);
        inbox.publish(T0 + PUBLISH_EVERY, &e);
        let r = inbox.published();
        assert_eq!(r.stats.frames_in, 3);
        assert_eq!(r, crate::worker::WorkerReport::of(&e, false));
    }

    #[test]
    fn the_first_worker_failure_is_kept_and_wakes_the_control_thread() {
        let mut poll = Poll::new().unwrap();
        let waker = mio::Waker::new(poll.registry(), WAKE).unwrap();
        let shared = Shared::new(vec![Inbox::new(2, waker)], Pool::new(4, 64));
        assert_eq!(shared.failure(), None);
        shared.worker_failed(1, "Invalid argument (os error 22)", 0);
        shared.worker_failed(0, "later", 0);
        assert_eq!(
            shared.failure().as_deref(),
            Some("worker 1 stopped: Invalid argument (os error 22)")
        );
        let mut events = mio::Events::with_capacity(4);
        poll.poll(&mut events, Some(Duration::from_secs(1)))
            .unwrap();
        assert!(events.iter().any(|e| e.token() == WAKE));
    }

    #[test]
    fn a_full_queue_gives_the_buffer_back_and_wakes_once() {
        let poll = Poll::new().unwrap();
        let waker = mio::Waker::new(poll.registry(), WAKE).unwrap();
        let shared = Shared::new(vec![Inbox::new(2, waker)], Pool::new(4, 64));
        let mut wake = vec![false];
        let b = shared.pool.get().unwrap();
        assert!(shared.forward(0, b, 10, &mut wake).is_ok());
        assert!(wake[0], "empty -> non-empty wakes");
        wake[0] = false;
        let b = shared.pool.get().unwrap();
        assert!(shared.forward(0, b, 10, &mut wake).is_ok());
        assert!(!wake[0], "a non-empty queue is not woken again");
        let b = shared.pool.get().unwrap();
        let back = shared.forward(0, b, 10, &mut wake);
        assert!(back.is_err(), "full: the buffer comes back");
        shared.pool.put(back.unwrap_err());
        let (buf, len) = shared.inboxes[0].pop().unwrap();
        assert_eq!((buf.len(), len), (64, 10));
    }
}
