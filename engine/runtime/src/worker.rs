//! The multi-worker runtime's pieces: the flow router, the frame pool and queues between
//! threads, and the worker thread's loop.
//!
//! Every frame from the port goes to one owner: a worker, chosen by a symmetric hash of its
//! flow's 5-tuple (both directions of a flow hash alike), or the control thread for everything
//! that is not a NAT flow (ARP, DHCP, broadcasts, anything addressed to the virtual host itself
//! such as DNS and ping, IP fragments, other protocols). The control thread reassembles
//! fragments and hands each whole datagram to the worker its flow hashes to (`control_frame`),
//! so a flow has one owner whether or not its datagrams are fragmented. A worker owns its flows'
//! sessions, TCP reassembly state and host sockets; nothing on the per-frame path is locked.
//! Idle sessions are expired on the control thread's schedule (`Cmd::Expire`).
//!
//! Frames travel between threads in fixed-size buffers from one pool (no allocation per frame)
//! through bounded lock-free queues; a full queue drops the frame and counts it
//! (`DropReason::QueueFull`), never blocking the reader. A queue's owner is woken (an eventfd) only
//! when a batch made its queue go from empty to non-empty.

use std::hash::{BuildHasher, Hasher};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_queue::ArrayQueue;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use smoltcp::wire::{EthernetFrame, EthernetProtocol, IpProtocol, Ipv4Packet};

use crate::operator::api::WorkerReport;
use crate::port::tap::Tap;
use crate::sock::driver::{SockDriver, FIRST_RESERVED_TOKEN};
use crate::sock::uring::Ring;
use crate::sock::Backend;
use crate::tx::{NapiSwitch, TapSender};
use hubnat_core::config::{Config, Mac};
use hubnat_core::output::FrameBatch;
use hubnat_core::stats::DropReason;
use hubnat_core::Engine;

use crate::control::Clock;

pub(crate) const PORT: Token = Token(FIRST_RESERVED_TOKEN);
pub(crate) const WAKE: Token = Token(FIRST_RESERVED_TOKEN + 5);
pub(crate) const RING: Token = Token(FIRST_RESERVED_TOKEN + 6);

/// Frames handled (or forwarded) between two flushes of the output batch.
pub(crate) const MAX_FRAMES_PER_BATCH: usize = 256;

/// Sends a flow's frames to its worker, everything else to the control thread.
#[derive(Clone)]
pub struct Router {
    hasher: ahash::RandomState,
    workers: usize,
}

impl Router {
    pub fn new(workers: usize) -> Router {
        Router {
            hasher: ahash::RandomState::with_seeds(
                0x6875_626e,
                0x6174_2d72,
                0x7274_2d66,
                0x6c6f_7773,
            ),
            workers: workers.max(1),
        }
    }

    /// The control thread's index (the workers are 0..workers).
    pub fn control(&self) -> usize {
        self.workers
    }

    /// The owner of `frame`: a worker index, or `control()`.
    pub fn route(&self, frame: &[u8], host_ip: Ipv4Addr, host_mac: Mac) -> usize {
        match self.flow_hash(frame, host_ip, host_mac) {
            Some(h) => (h % self.workers as u64) as usize,
            None => self.control(),
        }
    }

    /// The symmetric hash of a NAT flow's 5-tuple, or None for the control plane.
    fn flow_hash(&self, frame: &[u8], host_ip: Ipv4Addr, host_mac: Mac) -> Option<u64> {
        let eth = EthernetFrame::new_checked(frame).ok()?;
        if eth.ethertype() != EthernetProtocol::Ipv4
            || hubnat_core::wire::mac(eth.dst_addr()) != host_mac
        {
            return None;
        }
        let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
        if ip.more_frags() || ip.frag_offset() != 0 || ip.dst_addr() == host_ip {
            return None;
        }
        let hl = usize::from(ip.header_len());
        let l4 = eth.payload().get(hl..)?;
        let (sp, dp) = match ip.next_header() {
            IpProtocol::Tcp | IpProtocol::Udp => {
                let p = l4.get(..4)?;
                (
                    u16::from_be_bytes([p[0], p[1]]),
                    u16::from_be_bytes([p[2], p[3]]),
                )
            }
            IpProtocol::Icmp => (0, 0),
            _ => return None,
        };
        let a = (u64::from(u32::from(ip.src_addr())) << 16) | u64::from(sp);
        let b = (u64::from(u32::from(ip.dst_addr())) << 16) | u64::from(dp);
        let mut h = self.hasher.build_hasher();
        h.write_u64(a.min(b));
        h.write_u64(a.max(b));
        h.write_u8(u8::from(ip.next_header()));
        Some(h.finish())
    }
}

/// Fixed-size frame buffers, recycled.
pub struct Pool {
    free: ArrayQueue<Box<[u8]>>,
    /// Buffers allocated so far (at most `free`'s capacity): a buffer is made the first time
    /// the pool runs dry, so an idle or multiqueue runtime, which hands few frames between
    /// threads, never holds the tens of MiB that full queues would take.
    made: std::sync::atomic::AtomicUsize,
    size: usize,
}

impl Pool {
    pub fn new(count: usize, size: usize) -> Pool {
        Pool {
            free: ArrayQueue::new(count.max(1)),
            made: std::sync::atomic::AtomicUsize::new(0),
            size,
        }
    }

    /// A free buffer, a new one while fewer than the pool's count exist, else None.
    pub fn get(&self) -> Option<Box<[u8]>> {
        use std::sync::atomic::Ordering::Relaxed;
        if let Some(b) = self.free.pop() {
            return Some(b);
        }
        self.made
            .fetch_update(Relaxed, Relaxed, |n| {
                (n < self.free.capacity()).then_some(n + 1)
            })
            .ok()
            .map(|_| vec![0u8; self.size].into_boxed_slice())
    }

    pub fn put(&self, b: Box<[u8]>) {
        let _ = self.free.push(b);
    }
}

/// Reassembled datagrams queued for one thread at most (each up to 64 KiB).
pub const WHOLE_CAPACITY: usize = 32;

/// How often a busy worker publishes its counters (`Inbox::publish`).
pub const PUBLISH_EVERY: Duration = Duration::from_millis(10);

/// A thread's input queue and the means to wake it.
pub struct Inbox {
    queue: ArrayQueue<(Box<[u8]>, u32)>,
    /// Datagrams the control thread reassembled for a flow this thread owns, as Ethernet
    /// frames larger than the pool's buffers (rare: one allocation each).
    whole: ArrayQueue<Box<[u8]>>,
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
        self.queue.is_empty() && self.whole.is_empty()
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
}

impl Shared {
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
        inbox.whole.push(frame)?;
        if was_empty {
            wake[to] = true;
        }
        Ok(())
    }

    /// The control thread's handling of a frame it owns, with workers: an IPv4 fragment is
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
                let to = router.route(whole, engine.ctx.cfg.host.ip, engine.ctx.mac);
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
    /// A full queue, or a dry pool (the frame then sits in the reader's own buffer, which
    /// cannot travel), drops the frame and counts it; the buffer goes back to `bufs`.
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
            stats.drop(DropReason::QueueFull);
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

/// The buffers a thread reads port frames into: pool buffers, so that a frame for another
/// thread is queued without a copy, and one of its own for when the pool runs dry.
pub(crate) struct ReadBufs {
    spare: Option<Box<[u8]>>,
    own: Box<[u8]>,
}

/// A frame read by `ReadBufs::recv`: its buffer, its length, and whether the buffer is the pool's.
pub(crate) type ReadFrame = (Box<[u8]>, usize, bool);

impl ReadBufs {
    pub fn new(frame_size: usize) -> ReadBufs {
        ReadBufs {
            spare: None,
            own: vec![0u8; frame_size].into_boxed_slice(),
        }
    }

    /// A buffer to read into, and whether it is the pool's.
    pub fn take(&mut self, pool: Option<&Pool>) -> (Box<[u8]>, bool) {
        match self.spare.take().or_else(|| pool.and_then(Pool::get)) {
            Some(b) => (b, true),
            None => (std::mem::take(&mut self.own), false),
        }
    }

    pub fn put_back(&mut self, buf: Box<[u8]>, from_pool: bool) {
        if from_pool {
            self.spare = Some(buf);
        } else {
            self.own = buf;
        }
    }

    /// Reads one frame from `tap` into a buffer of `take`; `Ok(None)` once the device would
    /// block.
    pub fn recv(&mut self, tap: &Tap, pool: Option<&Pool>) -> io::Result<Option<ReadFrame>> {
        loop {
            let (mut buf, from_pool) = self.take(pool);
            match tap.recv(&mut buf) {
                Ok(n) => return Ok(Some((buf, n, from_pool))),
                Err(e) => {
                    self.put_back(buf, from_pool);
                    match e.kind() {
                        io::ErrorKind::WouldBlock => return Ok(None),
                        io::ErrorKind::Interrupted => continue,
                        _ => return Err(e),
                    }
                }
            }
        }
    }
}

/// What the control thread asks of a worker.
pub enum Cmd {
    /// Apply a new configuration (its frames, a gratuitous ARP, are the control thread's).
    Reconfigure(Box<Config>),
    /// Send counters and sessions back (and wake the control thread, which does not wait).
    Report(Sender<WorkerReport>),
    /// End the sessions idle past their timeouts at this time (the control thread keeps the
    /// schedule: a worker's engine does not expire sessions by itself).
    Expire(hubnat_core::Instant),
    /// Reset every guest session, close every host socket, end the thread.
    Shutdown,
}

/// A worker thread as the control thread holds it.
pub struct WorkerHandle {
    pub cmds: Sender<Cmd>,
    pub thread: Option<std::thread::JoinHandle<()>>,
}

/// Everything a worker thread starts with.
pub struct WorkerSetup {
    pub index: usize,
    pub engine: Engine,
    pub backend: Backend,
    pub poll: Poll,
    /// Where its frames are written (its own queue of a multiqueue TAP, or the one TAP).
    pub tap_out: Arc<Tap>,
    /// Its own queue of a multiqueue TAP, read by this worker.
    pub tap_in: Option<Arc<Tap>>,
    pub shared: Arc<Shared>,
    pub router: Router,
    pub cmds: Receiver<Cmd>,
    pub clock: Clock,
    pub frame_size: usize,
    pub napi: Option<Arc<NapiSwitch>>,
    pub events: Option<Arc<dyn crate::events::EventSink>>,
}

struct Worker {
    index: usize,
    engine: Engine,
    host: SockDriver,
    poll: Poll,
    tap_in: Option<Arc<Tap>>,
    shared: Arc<Shared>,
    router: Router,
    cmds: Receiver<Cmd>,
    clock: Clock,
    out: FrameBatch,
    host_events: Vec<hubnat_core::SockEvent>,
    wake: Vec<bool>,
    bufs: ReadBufs,
    tx: TapSender,
    /// Waits in its io_uring rather than in `poll`.
    in_ring: bool,
    events: Option<Arc<dyn crate::events::EventSink>>,
}

/// The worker thread's body.
pub fn run(setup: WorkerSetup) {
    let index = setup.index;
    match Worker::new(setup) {
        Ok(mut w) => {
            if let Err(e) = w.run() {
                tracing::error!("worker {index} stopped: {e}");
            }
        }
        Err(e) => tracing::error!("worker {index} cannot start: {e}"),
    }
}

impl Worker {
    fn new(s: WorkerSetup) -> io::Result<Worker> {
        let host = match s.backend {
            Backend::Mio => SockDriver::new(s.poll.registry().try_clone()?),
            Backend::Uring => {
                // Made on this thread: the ring accepts submissions from its creator only.
                // The worker waits in the ring itself (`run`): its TAP queue and its epoll set
                // (which holds its waker) are watched there.
                let mut host = SockDriver::with_uring(Ring::for_waiting_thread()?);
                host.watch_token(s.poll.as_raw_fd(), WAKE.0)?;
                if let Some(t) = &s.tap_in {
                    host.watch_token(t.as_raw_fd(), PORT.0)?;
                }
                host
            }
        };
        if let (Some(t), Backend::Mio) = (&s.tap_in, s.backend) {
            s.poll
                .registry()
                .register(&mut SourceFd(&t.as_raw_fd()), PORT, Interest::READABLE)?;
        }
        let mut engine = s.engine;
        engine.set_batching(true);
        let n = s.shared.inboxes.len();
        Ok(Worker {
            index: s.index,
            engine,
            host,
            poll: s.poll,
            tap_in: s.tap_in,
            shared: s.shared,
            router: s.router,
            cmds: s.cmds,
            clock: s.clock,
            out: FrameBatch::new(),
            host_events: Vec::new(),
            wake: vec![false; n],
            bufs: ReadBufs::new(s.frame_size),
            tx: TapSender::new(s.tap_out, s.napi),
            in_ring: s.backend == Backend::Uring,
            events: s.events,
        })
    }

    fn run(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        let mut last_work = std::time::Instant::now();
        tracing::debug!(
            "worker {} running ({} sockets)",
            self.index,
            self.host.backend_name()
        );
        loop {
            let timeout = if !self.shared.inboxes[self.index].is_empty() {
                Some(Duration::ZERO)
            } else {
                self.engine.poll_timeout().map(|t| {
                    let now = self.clock.now();
                    t.saturating_since(now) + Duration::from_micros(if t > now { 100 } else { 0 })
                })
            };
            let waited = if self.in_ring {
                // One io_uring_enter submits the batch's operations and waits.
                events.clear();
                let spin_until = last_work + crate::control::SPIN;
                self.host.wait(timeout, spin_until).map(|got| {
                    if got {
                        last_work = std::time::Instant::now();
                    }
                })
            } else {
                self.host.submit();
                crate::control::wait(&mut self.poll, &mut events, timeout, &mut last_work)
            };
            match waited {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            let now = self.clock.now();
            let mut port = false;
            let mut woken = false;
            self.host_events.clear();
            self.host
                .ring_events_and_tokens(&mut self.host_events, &mut |t| match Token(t) {
                    PORT => port = true,
                    _ => woken = true,
                });
            self.handle_host_events(now);
            if woken {
                // The epoll set holding the waker: empty its ready list.
                match self.poll.poll(&mut events, Some(Duration::ZERO)) {
                    Err(e) if e.kind() != io::ErrorKind::Interrupted => return Err(e),
                    _ => {}
                }
            }
            for event in events.iter() {
                match event.token() {
                    PORT => port = true,
                    WAKE | RING => {}
                    _ => {
                        self.host_events.clear();
                        self.host.events(event, &mut self.host_events);
                        self.handle_host_events(now);
                    }
                }
            }
            let mut stop = false;
            loop {
                match self.cmds.try_recv() {
                    Ok(Cmd::Reconfigure(cfg)) => {
                        let mut scratch = FrameBatch::new();
                        self.engine
                            .reconfigure(now, *cfg, &mut self.host, &mut scratch);
                    }
                    Ok(Cmd::Report(to)) => {
                        let _ = to.send(WorkerReport::of(&self.engine, true));
                        // The control thread does not wait for it: it looks when woken.
                        self.shared.inboxes[self.router.control()].wake();
                    }
                    Ok(Cmd::Expire(t)) => {
                        self.engine
                            .expire_sessions(t, &mut self.host, &mut self.out)
                    }
                    Ok(Cmd::Shutdown) | Err(TryRecvError::Disconnected) => stop = true,
                    Err(TryRecvError::Empty) => break,
                }
            }
            if port {
                self.read_port(now)?;
            }
            self.drain_inbox(now);
            if self.engine.poll_timeout().is_some_and(|t| t <= now) {
                self.engine
                    .handle_timeout(now, &mut self.host, &mut self.out);
            }
            self.flush();
            self.shared.inboxes[self.index].publish(now, &self.engine);
            if stop {
                let now = self.clock.now();
                let sockets = self.host.len();
                self.engine.shutdown(now, &mut self.host, &mut self.out);
                self.flush();
                self.host.submit();
                tracing::debug!(
                    "worker {} stopped: sessions reset, {sockets} host sockets closed",
                    self.index
                );
                return Ok(());
            }
        }
    }

    fn handle_host_events(&mut self, now: hubnat_core::Instant) {
        for ev in self.host_events.drain(..) {
            self.engine
                .handle_host_event(now, ev, &mut self.host, &mut self.out);
        }
    }

    /// Reads this worker's TAP queue until it would block; frames of other owners are queued
    /// for them.
    fn read_port(&mut self, now: hubnat_core::Instant) -> io::Result<()> {
        let Some(tap) = self.tap_in.clone() else {
            return Ok(());
        };
        loop {
            for _ in 0..MAX_FRAMES_PER_BATCH {
                let Some((buf, n, from_pool)) = self.bufs.recv(&tap, Some(&self.shared.pool))?
                else {
                    self.flush();
                    return Ok(());
                };
                let cfg = &self.engine.ctx.cfg;
                let to = self
                    .router
                    .route(&buf[..n], cfg.host.ip, self.engine.ctx.mac);
                if to == self.index {
                    self.engine
                        .handle_frame(now, &buf[..n], &mut self.host, &mut self.out);
                    self.bufs.put_back(buf, from_pool);
                } else {
                    let stats = &mut self.engine.ctx.stats;
                    self.shared.hand_over(
                        to,
                        (buf, from_pool),
                        n,
                        &mut self.bufs,
                        &mut self.wake,
                        stats,
                    );
                }
            }
            self.flush();
        }
    }

    /// Handles the frames queued for this worker (at most a queue's worth per wake-up).
    fn drain_inbox(&mut self, now: hubnat_core::Instant) {
        let shared = Arc::clone(&self.shared);
        let inbox = &shared.inboxes[self.index];
        while let Some(frame) = inbox.pop_whole() {
            self.engine
                .handle_reassembled(now, &frame, &mut self.host, &mut self.out);
        }
        let mut done = 0;
        while let Some((buf, len)) = inbox.pop() {
            self.engine
                .handle_frame(now, &buf[..len as usize], &mut self.host, &mut self.out);
            shared.pool.put(buf);
            done += 1;
            if done % MAX_FRAMES_PER_BATCH == 0 {
                self.flush();
                if done >= inbox.queue.capacity() {
                    break;
                }
            }
        }
    }

    fn flush(&mut self) {
        let now = self.clock.now();
        self.engine.flush(now, &mut self.host, &mut self.out);
        let failed = self.tx.send(&mut self.out);
        self.engine.ctx.stats.drops[DropReason::QueueFull as usize] += failed as u64;
        self.shared.wake_marked(&mut self.wake);
        crate::events::drain(&mut self.engine, self.events.as_deref());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hubnat_core::testing::*;
    use hubnat_core::SharedSessions;
    use std::net::SocketAddrV4;

    fn mac() -> Mac {
        hubnat_core::testing::setup().0.ctx.mac
    }

    const HOST: Ipv4Addr = Ipv4Addr::new(192, 168, 30, 1);

    #[test]
    fn flows_go_to_workers_and_the_control_plane_to_control() {
        let r = Router::new(2);
        let m = mac();
        let mut seen = [0usize; 3];
        for port in 0..64u16 {
            let f = udp_frame(
                SocketAddrV4::new(GUEST_IP, 4000 + port),
                SocketAddrV4::new(REMOTE_IP, 53),
                b"x",
            );
            seen[r.route(&f, HOST, m)] += 1;
        }
        assert_eq!(seen[2], 0, "no flow goes to control");
        assert!(seen[0] > 10 && seen[1] > 10, "flows spread: {seen:?}");
        // DNS and anything else to the virtual host, broadcasts, junk: control.
        let dns = udp_frame(
            SocketAddrV4::new(GUEST_IP, 4000),
            SocketAddrV4::new(HOST, 53),
            b"q",
        );
        assert_eq!(r.route(&dns, HOST, m), 2);
        let mut bcast = udp_frame(
            SocketAddrV4::new(GUEST_IP, 68),
            SocketAddrV4::new(Ipv4Addr::BROADCAST, 67),
            b"d",
        );
        bcast[..6].copy_from_slice(&[0xff; 6]);
        assert_eq!(r.route(&bcast, HOST, m), 2);
        assert_eq!(r.route(b"short", HOST, m), 2);
        assert_eq!(r.route(&[], HOST, m), 2);
        // Truncated L4 header: control (which counts it as malformed).
        let f = udp_frame(
            SocketAddrV4::new(GUEST_IP, 4000),
            SocketAddrV4::new(REMOTE_IP, 9),
            b"x",
        );
        assert_eq!(r.route(&f[..14 + 20 + 2], HOST, m), 2);
    }

    #[test]
    fn both_directions_hash_alike_and_fragments_go_to_control() {
        let r = Router::new(4);
        let m = mac();
        let a = SocketAddrV4::new(GUEST_IP, 4000);
        let b = SocketAddrV4::new(REMOTE_IP, 80);
        let h1 = r.flow_hash(&udp_frame(a, b, b"x"), HOST, m);
        let h2 = r.flow_hash(&udp_frame(b, a, b"x"), HOST, m);
        assert!(h1.is_some());
        assert_eq!(h1, h2);
        let mut frag = udp_frame(a, b, b"x");
        frag[14 + 6] |= 0x20; // more fragments
        assert_eq!(r.route(&frag, HOST, m), 4);
    }

    #[test]
    fn session_limits_and_ids_hold_across_workers() {
        let mk = || {
            setup_with(|c| {
                c.nat.max_sessions_per_guest = 2;
            })
        };
        let (mut a, mut ha, mut out) = mk();
        let (mut b, mut hb, _) = mk();
        let limits = Arc::new(crate::limits::SharedLimits::default());
        for e in [&mut a, &mut b] {
            e.ctx.share_sessions(limits.clone());
        }
        let frame = |port| {
            udp_frame(
                SocketAddrV4::new(GUEST_IP, port),
                SocketAddrV4::new(REMOTE_IP, 9),
                b"x",
            )
        };
        a.handle_frame(T0, &frame(4001), &mut ha, &mut out);
        b.handle_frame(T0, &frame(4002), &mut hb, &mut out);
        assert_eq!(limits.count(hubnat_core::nat::Proto::Udp, GUEST_IP), 2);
        // A third session on either worker is over the guest's limit.
        a.handle_frame(T0, &frame(4003), &mut ha, &mut out);
        assert_eq!(a.ctx.stats.drops_of(DropReason::Limit), 1);
        assert_eq!(a.nat.udp.len() + b.nat.udp.len(), 2);
        // Ids are unique across the two engines.
        let (ia, ib) = (a.sessions()[0].id, b.sessions()[0].id);
        assert_ne!(ia, ib);
        // Shutdown releases what the sessions held: a new one is let through.
        a.shutdown(T0, &mut ha, &mut out);
        assert_eq!(limits.count(hubnat_core::nat::Proto::Udp, GUEST_IP), 1);
        b.handle_frame(T0, &frame(4004), &mut hb, &mut out);
        assert_eq!(b.nat.udp.len(), 2);
    }

    /// A guest's SYN toward `dst` (no options).
    fn tcp_syn(src: SocketAddrV4, dst: SocketAddrV4) -> Vec<u8> {
        use smoltcp::wire::{TcpControl, TcpPacket, TcpRepr, TcpSeqNumber};
        let repr = TcpRepr {
            src_port: src.port(),
            dst_port: dst.port(),
            control: TcpControl::Syn,
            seq_number: TcpSeqNumber(1000),
            ack_number: None,
            window_len: 65535,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload: &[],
        };
        let mut seg = vec![0u8; repr.buffer_len()];
        repr.emit(
            &mut TcpPacket::new_unchecked(&mut seg[..]),
            &(*src.ip()).into(),
            &(*dst.ip()).into(),
            &smoltcp::phy::ChecksumCapabilities::default(),
        );
        ipv4_frame(*src.ip(), *dst.ip(), IpProtocol::Tcp, 1, 0, false, &seg)
    }

    #[test]
    fn tcp_session_limits_hold_across_workers() {
        let mk = || setup_with(|c| c.nat.max_sessions_per_guest = 1);
        let (mut a, mut ha, mut out) = mk();
        let (mut b, mut hb, _) = mk();
        let limits = Arc::new(crate::limits::SharedLimits::default());
        for e in [&mut a, &mut b] {
            e.ctx.share_sessions(limits.clone());
        }
        let dst = SocketAddrV4::new(REMOTE_IP, 80);
        a.handle_frame(
            T0,
            &tcp_syn(SocketAddrV4::new(GUEST_IP, 5001), dst),
            &mut ha,
            &mut out,
        );
        assert_eq!(limits.count(hubnat_core::nat::Proto::Tcp, GUEST_IP), 1);
        // The guest's second connection lands on the other worker: still over its limit.
        b.handle_frame(
            T0,
            &tcp_syn(SocketAddrV4::new(GUEST_IP, 5002), dst),
            &mut hb,
            &mut out,
        );
        assert_eq!(b.ctx.stats.drops_of(DropReason::Limit), 1);
        assert_eq!(b.sessions().len(), 0);
        // Once the first is gone, the other worker lets a new one through.
        a.shutdown(T0, &mut ha, &mut out);
        assert_eq!(limits.count(hubnat_core::nat::Proto::Tcp, GUEST_IP), 0);
        b.handle_frame(
            T0,
            &tcp_syn(SocketAddrV4::new(GUEST_IP, 5003), dst),
            &mut hb,
            &mut out,
        );
        assert_eq!(b.sessions().len(), 1);
    }

    #[test]
    fn the_half_open_limit_holds_across_workers() {
        let mk = || setup_with(|c| c.nat.max_half_open = 2);
        let (mut a, mut ha, mut out) = mk();
        let (mut b, mut hb, _) = mk();
        let limits = Arc::new(crate::limits::SharedLimits::default());
        for e in [&mut a, &mut b] {
            e.ctx.share_sessions(limits.clone());
        }
        let syn = |port| {
            tcp_syn(
                SocketAddrV4::new(GUEST_IP, port),
                SocketAddrV4::new(REMOTE_IP, 80),
            )
        };
        a.handle_frame(T0, &syn(5001), &mut ha, &mut out);
        b.handle_frame(T0, &syn(5002), &mut hb, &mut out);
        assert_eq!(limits.half_open(), 2);
        assert_eq!((a.nat.tcp.half_open(), b.nat.tcp.half_open()), (1, 1));
        // Each worker alone is under the limit; together they are at it.
        a.handle_frame(T0, &syn(5003), &mut ha, &mut out);
        assert_eq!(a.ctx.stats.drops_of(DropReason::Limit), 1);
        assert_eq!(a.sessions().len(), 1);
        assert_eq!(limits.half_open(), 2);
        assert_eq!(
            limits.count(hubnat_core::nat::Proto::Tcp, GUEST_IP),
            2,
            "the refused one is not counted"
        );
        // b's connect completes: its slot is free for a's next SYN.
        for ev in hb.drain_events() {
            b.handle_host_event(T0, ev, &mut hb, &mut out);
        }
        assert_eq!(limits.half_open(), 1);
        a.handle_frame(T0, &syn(5004), &mut ha, &mut out);
        assert_eq!(a.sessions().len(), 2);
        assert_eq!(limits.half_open(), 2);
        // A connection removed while connecting gives its slot back.
        a.shutdown(T0, &mut ha, &mut out);
        assert_eq!(limits.half_open(), 0);
    }

    #[test]
    fn a_worker_engine_expires_sessions_only_when_told() {
        use std::time::Duration;
        let (mut e, mut h, mut out) = setup_with(|c| c.nat.udp_timeout = Duration::from_secs(60));
        let limits = Arc::new(crate::limits::SharedLimits::default());
        e.ctx.share_sessions(limits.clone());
        e.set_external_expiry(true);
        let f = udp_frame(
            SocketAddrV4::new(GUEST_IP, 4000),
            SocketAddrV4::new(REMOTE_IP, 9),
            b"x",
        );
        e.handle_frame(T0, &f, &mut h, &mut out);
        assert_eq!(e.nat.udp.len(), 1);
        assert_eq!(e.poll_timeout(), None, "no wake-up for idle expiry");
        let late = T0 + Duration::from_secs(3600);
        e.handle_timeout(late, &mut h, &mut out);
        assert_eq!(e.nat.udp.len(), 1, "its own timers never expire it");
        // The control thread's tick: not yet idle long enough, then idle.
        e.expire_sessions(T0 + Duration::from_secs(59), &mut h, &mut out);
        assert_eq!(e.nat.udp.len(), 1);
        e.expire_sessions(T0 + Duration::from_secs(60), &mut h, &mut out);
        assert_eq!(e.nat.udp.len(), 0);
        assert_eq!(limits.count(hubnat_core::nat::Proto::Udp, GUEST_IP), 0);
        assert_eq!(h.closed.len(), 1);

        // A lone engine keeps expiring by itself, as before.
        let (mut e, mut h, mut out) = setup_with(|c| c.nat.udp_timeout = Duration::from_secs(60));
        e.handle_frame(T0, &f, &mut h, &mut out);
        assert_eq!(e.poll_timeout(), Some(T0 + Duration::from_secs(60)));
        e.handle_timeout(T0 + Duration::from_secs(60), &mut h, &mut out);
        assert_eq!(e.nat.udp.len(), 0);
    }

    #[test]
    fn a_worker_engine_keeps_tcp_timers_but_not_the_idle_one() {
        use std::time::Duration;
        let mk = || {
            setup_with(|c| {
                c.nat.tcp_timeout = Duration::from_secs(60);
                c.nat.tcp_connect_timeout = Duration::from_secs(1000);
            })
        };
        let syn = tcp_syn(
            SocketAddrV4::new(GUEST_IP, 5001),
            SocketAddrV4::new(REMOTE_IP, 80),
        );
        // Lone: the idle deadline (60 s) comes before the connect timeout.
        let (mut e, mut h, mut out) = mk();
        h.default_connect = hubnat_core::sim::ConnectOutcome::Silent;
        e.handle_frame(T0, &syn, &mut h, &mut out);
        assert_eq!(e.poll_timeout(), Some(T0 + Duration::from_secs(60)));
        // Worker: only the connect timeout is its own.
        let (mut e, mut h, mut out) = mk();
        h.default_connect = hubnat_core::sim::ConnectOutcome::Silent;
        e.set_external_expiry(true);
        e.handle_frame(T0, &syn, &mut h, &mut out);
        assert_eq!(e.poll_timeout(), Some(T0 + Duration::from_secs(1000)));
        e.handle_timeout(T0 + Duration::from_secs(100), &mut h, &mut out);
        assert_eq!(e.sessions().len(), 1);
        out.clear();
        e.expire_sessions(T0 + Duration::from_secs(59), &mut h, &mut out);
        assert_eq!(e.sessions().len(), 1);
        e.expire_sessions(T0 + Duration::from_secs(61), &mut h, &mut out);
        assert_eq!(e.sessions().len(), 0, "idle: reset");
        assert_eq!(out.len(), 1, "the guest gets its RST");
        assert_eq!(e.nat.tcp.half_open(), 0);

        // Switching on with connections open moves their idle deadlines to the external list.
        let (mut e, mut h, mut out) = mk();
        h.default_connect = hubnat_core::sim::ConnectOutcome::Silent;
        e.handle_frame(T0, &syn, &mut h, &mut out);
        e.set_external_expiry(true);
        assert_eq!(e.poll_timeout(), Some(T0 + Duration::from_secs(1000)));
        e.expire_sessions(T0 + Duration::from_secs(61), &mut h, &mut out);
        assert_eq!(e.sessions().len(), 0);
    }

    #[test]
    fn a_reload_that_shortens_the_timeouts_applies_to_open_sessions() {
        use std::time::Duration;
        let udp = udp_frame(
            SocketAddrV4::new(GUEST_IP, 4000),
            SocketAddrV4::new(REMOTE_IP, 9),
            b"x",
        );
        let syn = tcp_syn(
            SocketAddrV4::new(GUEST_IP, 5001),
            SocketAddrV4::new(REMOTE_IP, 80),
        );
        for worker in [false, true] {
            let (mut e, mut h, mut out) = setup_with(|c| {
                c.nat.udp_timeout = Duration::from_secs(600);
                c.nat.tcp_timeout = Duration::from_secs(600);
                c.nat.tcp_connect_timeout = Duration::from_secs(10_000);
            });
            h.default_connect = hubnat_core::sim::ConnectOutcome::Silent;
            e.set_external_expiry(worker);
            e.handle_frame(T0, &udp, &mut h, &mut out);
            e.handle_frame(T0, &syn, &mut h, &mut out);
            assert_eq!(e.sessions().len(), 2);
            // Ten seconds in, the timeouts become five seconds: both sessions are overdue.
            let now = T0 + Duration::from_secs(10);
            let mut cfg = e.ctx.cfg.clone();
            cfg.nat.udp_timeout = Duration::from_secs(5);
            cfg.nat.tcp_timeout = Duration::from_secs(5);
            e.reconfigure(now, cfg, &mut h, &mut out);
            if worker {
                e.expire_sessions(now, &mut h, &mut out);
            } else {
                assert!(
                    e.poll_timeout().is_some_and(|t| t <= now),
                    "worker {worker}"
                );
                e.handle_timeout(now, &mut h, &mut out);
            }
            assert_eq!(e.sessions().len(), 0, "worker {worker}");
        }
    }

    /// Queues for two workers and the control thread (each with its own poll to wake).
    fn three_inboxes() -> (Vec<Poll>, Shared) {
        let polls: Vec<Poll> = (0..3).map(|_| Poll::new().unwrap()).collect();
        let inboxes = polls
            .iter()
            .map(|p| Inbox::new(8, mio::Waker::new(p.registry(), WAKE).unwrap()))
            .collect();
        let pool = Pool::new(4, 64);
        (polls, Shared { inboxes, pool })
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
        let owner = router.route(&udp_frame(guest, dst, b"x"), HOST, mac());
        assert!(owner < 2);
        let payload: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        let frags = udp_fragments(guest, dst, &payload, 1480);
        assert_eq!(frags.len(), 3);
        let (mut whole, mut out, mut wake) = (Vec::new(), FrameBatch::new(), vec![false; 3]);
        for f in &frags {
            // Fragments are the control thread's.
            assert_eq!(router.route(f, HOST, mac()), 2);
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
        assert_eq!(router.route(&f, HOST, mac()), owner);
        e.handle_frame(T0, &f, h, &mut out);
        assert_eq!(e.nat.udp.len(), 1);
        assert_eq!(
            limits.count(hubnat_core::nat::Proto::Udp, GUEST_IP),
            1,
            "one session overall"
        );
        // The worker learnt the guest's MAC from the reassembled frame: it can answer.
        out.clear();
        h.deliver_udp(socks[0], b"reply");
        pump(e, h, &mut out, T0);
        assert_eq!(out.len(), 1);

        // Anything not a NAT fragment is handled by the control engine as before.
        let dns = udp_frame(guest, SocketAddrV4::new(HOST, 9), b"q");
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
            .find(|g| router.route(&udp_frame(*g, dst, b"x"), HOST, mac()) == 0)
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
        assert_eq!(r, crate::operator::api::WorkerReport::of(&e, false));
    }

    #[test]
    fn the_pool_makes_buffers_only_when_dry_and_never_more_than_its_count() {
        let pool = Pool::new(3, 16);
        assert!(pool.free.is_empty(), "nothing is allocated up front");
        let bufs: Vec<_> = (0..3)
            .map(|_| pool.get().expect("within the count"))
            .collect();
        assert!(bufs.iter().all(|b| b.len() == 16));
        assert!(pool.get().is_none(), "the count bounds the pool");
        for b in bufs {
            pool.put(b);
        }
        let again: Vec<_> = (0..3).map(|_| pool.get().expect("recycled")).collect();
        assert!(pool.get().is_none());
        assert_eq!(again.len(), 3);
    }

    #[test]
    fn a_full_queue_gives_the_buffer_back_and_wakes_once() {
        let poll = Poll::new().unwrap();
        let waker = mio::Waker::new(poll.registry(), WAKE).unwrap();
        let shared = Shared {
            inboxes: vec![Inbox::new(2, waker)],
            pool: Pool::new(4, 64),
        };
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
