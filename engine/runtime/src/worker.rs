//! A worker thread: the NAT flows the router hashes to it, their sessions, TCP state and host
//! sockets (its own socket driver), with nothing on the per-frame path locked.
//!
//! It reads its own queue of a multiqueue TAP, or frames the control thread handed over
//! (`queues::Inbox`), handles each batch and writes the frames it produced itself. Idle sessions
//! are expired on the control thread's schedule (`Cmd::Expire`), and the worker publishes its
//! counters for the control thread to read without asking (`Inbox::publish`).

use std::io;
use std::os::fd::AsRawFd;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use crate::clock::{wait, Clock};
use crate::pool::ReadBufs;
use crate::port::switch::{Switch, FIRST_TAP};
use crate::port::tap::Tap;
use crate::port::vnet;
use crate::queues::Shared;
use crate::router::Router;
use crate::sock::driver::SockDriver;
use crate::sock::uring::{FrameBufs, Ring};
use crate::sock::Backend;
use crate::tokens::{PORT, RING, WAKE};
use crate::tx::{NapiSwitch, PortSender, TapSender};
use hubnat_core::config::Config;
use hubnat_core::nat::SessionInfo;
use hubnat_core::output::FrameBatch;
use hubnat_core::stats::DropReason;
use hubnat_core::stats::Stats;
use hubnat_core::Engine;

/// Frames handled (or forwarded) between two flushes of the output batch.
pub(crate) const MAX_FRAMES_PER_BATCH: usize = 256;

/// What a worker thread reports to the control thread: its counters, its session counts, and
/// (when asked for the NAT table) its NAT sessions. The counters and counts are published by
/// the worker as it runs (no round trip); the sessions list is sent on request.
#[derive(Clone, Default, Debug, PartialEq)]
pub struct WorkerReport {
    pub stats: Stats,
    /// Sessions per protocol (indexed by `Proto::index`).
    pub counts: [usize; 4],
    /// Of the NAT's sessions, those of IPv6 guests.
    pub ipv6_sessions: usize,
    /// Empty unless the sessions were asked for.
    pub sessions: Vec<SessionInfo>,
}

impl WorkerReport {
    /// `engine`'s counters and session counts, and its sessions when `with_sessions`.
    pub fn of(engine: &Engine, with_sessions: bool) -> WorkerReport {
        WorkerReport {
            stats: engine.stats().clone(),
            counts: engine.session_counts(),
            ipv6_sessions: engine.ipv6_sessions(),
            sessions: if with_sessions {
                engine.sessions()
            } else {
                Vec::new()
            },
        }
    }

    /// Makes this report `engine`'s counters and counts (the sessions are left alone), without
    /// allocating. Returns whether anything changed.
    pub fn update_counters(&mut self, engine: &Engine) -> bool {
        let counts = engine.session_counts();
        if self.stats == *engine.stats() && self.counts == counts {
            return false;
        }
        self.stats.clone_from(engine.stats());
        self.counts = counts;
        true
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
    /// Open a forward's flow that hashes to this worker (its socket is handed over).
    Inbound(Box<crate::sock::forward::InboundJob>),
    /// Forward N was removed: end its flows.
    CloseForward(u32),
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
    /// Where its frames for the segment's first TAP are written (its own queue of a
    /// multiqueue TAP, or the one TAP); None: the segment has no TAP of the threads' own.
    pub tap_out: Option<Arc<Tap>>,
    /// The segment's ports (frames for the other ports go through it).
    pub switch: Arc<Switch>,
    /// Its own queue of a multiqueue TAP, read by this worker.
    pub tap_in: Option<Arc<Tap>>,
    pub shared: Arc<Shared>,
    pub router: Router,
    pub cmds: Receiver<Cmd>,
    pub clock: Clock,
    pub frame_size: usize,
    pub napi: Option<Arc<NapiSwitch>>,
    pub events: Option<Arc<dyn crate::events::EventSink>>,
    /// The runtime's capture (frames read and sent are copied to it while one is on).
    pub capture: Arc<crate::capture::Capture>,
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
    /// The buffers its ring reads its TAP queue into (None: it reads the queue itself).
    frame_bufs: Option<FrameBufs>,
    /// Frames the ring read, as (buffer, length), being handled.
    ring_frames: Vec<(u16, u32)>,
    tx: PortSender,
    switch: Arc<Switch>,
    capture: Arc<crate::capture::Capture>,
    /// Waits in its io_uring rather than in `poll`.
    in_ring: bool,
    events: Option<Arc<dyn crate::events::EventSink>>,
    /// Its claims in the flow placement table still without a connection at the last sweep,
    /// and when that was (`Placement::sweep`).
    placement_sweep: (Vec<u16>, std::time::Instant),
}

/// The worker thread's body. `ready` hears once the worker has made everything it needs
/// (its rings among them), or why it could not.
pub fn run(setup: WorkerSetup, ready: Sender<io::Result<()>>) {
    let index = setup.index;
    match Worker::new(setup) {
        Ok(mut w) => {
            let _ = ready.send(Ok(()));
            if let Err(e) = w.run() {
                tracing::error!("worker {index} stopped: {e}");
                w.shared
                    .worker_failed(index, &e.to_string(), w.router.control());
            }
        }
        Err(e) => {
            tracing::error!("worker {index} cannot start: {e}");
            let _ = ready.send(Err(e));
        }
    }
}

impl Worker {
    fn new(s: WorkerSetup) -> io::Result<Worker> {
        let mut frame_bufs = None;
        let host = match s.backend {
            Backend::Epoll => SockDriver::new(s.poll.registry().try_clone()?),
            Backend::Uring => {
                // Made on this thread: the ring accepts submissions from its creator only.
                // The worker waits in the ring itself (`run`): its TAP queue and its epoll set
                // (which holds its waker) are watched there.
                // The ring's buffers take each frame with its virtio-net header.
                let frame_size = s
                    .tap_in
                    .as_ref()
                    .map(|t| s.frame_size + if t.vnet_hdr() { vnet::HDR_LEN } else { 0 });
                let mut host = SockDriver::with_uring(Ring::for_waiting_thread(frame_size)?);
                host.watch_token(s.poll.as_raw_fd(), WAKE.0)?;
                if let Some(t) = &s.tap_in {
                    frame_bufs = host.read_frames(t.as_raw_fd())?;
                    if frame_bufs.is_none() {
                        host.watch_token(t.as_raw_fd(), PORT.0)?;
                    }
                }
                host
            }
        };
        if let (Some(t), Backend::Epoll) = (&s.tap_in, s.backend) {
            s.poll
                .registry()
                .register(&mut SourceFd(&t.as_raw_fd()), PORT, Interest::READABLE)?;
        }
        let mut engine = s.engine;
        engine.set_batching(true);
        engine.track_tcp_flows(s.router.placement().is_some());
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
            frame_bufs,
            ring_frames: Vec::new(),
            tx: PortSender::new(
                s.tap_out.map(|t| TapSender::new(t, s.napi)),
                Arc::clone(&s.switch),
                Arc::clone(&s.capture),
            ),
            switch: s.switch,
            capture: s.capture,
            in_ring: s.backend == Backend::Uring,
            events: s.events,
            placement_sweep: (Vec::new(), std::time::Instant::now()),
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
                let spin_until = crate::clock::spin_until(last_work);
                self.host.wait(timeout, spin_until).map(|got| {
                    if got {
                        last_work = std::time::Instant::now();
                    }
                })
            } else {
                self.host.submit();
                wait(&mut self.poll, &mut events, timeout, &mut last_work)
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
                    Ok(Cmd::CloseForward(id)) => {
                        let n = self
                            .engine
                            .close_forward(now, id, &mut self.host, &mut self.out);
                        if n > 0 {
                            tracing::info!(
                                "forward {id}: {n} flows of worker {} ended",
                                self.index
                            );
                        }
                    }
                    Ok(Cmd::Inbound(job)) => crate::sock::forward::open_inbound(
                        *job,
                        now,
                        &mut self.engine,
                        &mut self.host,
                        &mut self.out,
                    ),
                    Ok(Cmd::Shutdown) | Err(TryRecvError::Disconnected) => stop = true,
                    Err(TryRecvError::Empty) => break,
                }
            }
            if port {
                self.read_port(now)?;
            }
            self.handle_ring_frames(now)?;
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
        let mut count = (0u64, 0u64);
        // A TAP with offloads may give frames larger than the pool's buffers.
        let shared = Arc::clone(&self.shared);
        let pool = (!tap.vnet_hdr()).then_some(&shared.pool);
        loop {
            let cap = self.capture.batch();
            for _ in 0..MAX_FRAMES_PER_BATCH {
                let Some((buf, n, from_pool)) = self.bufs.recv(&tap, pool)? else {
                    self.flush();
                    self.switch.count_rx(FIRST_TAP, count.0, count.1);
                    return Ok(());
                };
                match self.ingress(now, &buf[..n], cap, false, &mut count) {
                    Some(to) => {
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
                    None => self.bufs.put_back(buf, from_pool),
                }
            }
            self.flush();
        }
    }

    /// Handles the frames the ring read from this worker's TAP queue, in place; frames of
    /// other owners are copied to them.
    fn handle_ring_frames(&mut self, now: hubnat_core::Instant) -> io::Result<()> {
        let Some(bufs) = self.frame_bufs.clone() else {
            return Ok(());
        };
        self.host.take_frames(&mut self.ring_frames);
        if self.ring_frames.is_empty() {
            return self.host.frames_handled();
        }
        let mut count = (0u64, 0u64);
        let frames = std::mem::take(&mut self.ring_frames);
        let vnet_hdr = self.tap_in.as_ref().is_some_and(|t| t.vnet_hdr());
        let mut cap = self.capture.batch();
        for (i, &(bid, len)) in frames.iter().enumerate() {
            bufs.handle(bid, len, |buf| {
                if buf.is_empty() {
                    return;
                }
                let (frame, left) = if vnet_hdr {
                    match vnet::take_leaving(buf) {
                        Ok(f) => f,
                        Err(why) => {
                            tracing::trace!("TAP frame refused: {why:?}");
                            self.engine.ctx.stats.drop(DropReason::Malformed);
                            return;
                        }
                    }
                } else {
                    (buf, vnet::Left::default())
                };
                if let Some(size) = left.udp_segment {
                    // The guest's datagrams sent as one: each goes on as a frame of its own
                    // (the NAT sends them on in one UDP_SEGMENT send again).
                    let whole = vnet::cut_udp(frame, size, |d| {
                        if let Some(to) = self.ingress(now, d, cap, false, &mut count) {
                            self.copy_over(to, d);
                        }
                    });
                    if !whole {
                        self.engine.ctx.stats.drop(DropReason::Malformed);
                    }
                    return;
                }
                // A transport checksum left to hubnat is completed only where something else
                // than this worker's engine reads the frame: another thread, a capture, another
                // port of the switch. The engine itself does not look at it.
                let local = cap.is_none() && !self.switch.several();
                let skip = match left.checksum {
                    Some(l) if local && l.is_transport(frame) => Some(l),
                    Some(l) => {
                        l.complete(frame);
                        None
                    }
                    None => None,
                };
                if let Some(to) = self.ingress(now, frame, cap, skip.is_some(), &mut count) {
                    if let Some(l) = skip {
                        l.complete(frame);
                    }
                    self.copy_over(to, frame);
                }
            });
            if (i + 1) % MAX_FRAMES_PER_BATCH == 0 {
                self.flush();
                cap = self.capture.batch();
            }
        }
        self.ring_frames = frames;
        self.ring_frames.clear();
        self.flush();
        self.switch.count_rx(FIRST_TAP, count.0, count.1);
        self.host.frames_handled()
    }

    /// A frame read from the TAP queue: captured (`cap`: the batch's capture, if one is on),
    /// switched, counted in `count` (frames, bytes), and handled here if this worker owns its
    /// flow (`checksum_left`: its transport checksum was left to hubnat and not completed,
    /// see `Engine::handle_frame_checksum_left`); else the owner's index.
    fn ingress(
        &mut self,
        now: hubnat_core::Instant,
        frame: &[u8],
        cap: Option<crate::capture::Batch>,
        checksum_left: bool,
        count: &mut (u64, u64),
    ) -> Option<usize> {
        if let Some(c) = cap {
            self.capture.frame(c, frame);
        }
        if self.switch.several() {
            if !self.switch.ingress(FIRST_TAP, frame) {
                return None;
            }
        } else {
            count.0 += 1;
            count.1 += frame.len() as u64;
        }
        let to = self
            .router
            .route(frame, &self.engine.ctx.cfg, self.engine.ctx.mac);
        if to != self.index {
            if to != self.router.control() {
                self.engine.ctx.stats.handed_over += 1;
            }
            return Some(to);
        }
        if checksum_left {
            self.engine
                .handle_frame_checksum_left(now, frame, &mut self.host, &mut self.out);
        } else {
            self.engine
                .handle_frame(now, frame, &mut self.host, &mut self.out);
        }
        None
    }

    /// Queues a copy of `frame` for worker `to` (dropped and counted when the pool is dry or
    /// the queue full).
    fn copy_over(&mut self, to: usize, frame: &[u8]) {
        if !self.shared.forward_copy(to, frame, &mut self.wake) {
            self.engine.ctx.stats.drop(DropReason::QueueFull);
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
        while let Some(frame) = inbox.pop_large() {
            self.engine
                .handle_frame(now, &frame, &mut self.host, &mut self.out);
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

    /// Counts the batch's new and removed TCP connections in the placement table and
    /// publishes this worker's load, before the batch's frames go out (a guest's next connect
    /// may follow the SYN-ACK at once).
    fn update_placement(&mut self) {
        let Some(p) = self.router.placement() else {
            return;
        };
        let (router, me) = (&self.router, self.index);
        self.engine
            .drain_tcp_flow_changes(|a, b, opened| router.tcp_flow_changed(me, a, b, opened));
        p.publish_load(me, self.engine.live_tcp_connections());
        let (pending, last) = &mut self.placement_sweep;
        if last.elapsed() >= crate::placement::SWEEP_EVERY {
            *last = std::time::Instant::now();
            p.sweep(me, pending);
        }
    }

    fn flush(&mut self) {
        let now = self.clock.now();
        // What the batch's calls already settled (a connect whose handshake was over) is
        // answered in this batch's frames.
        self.host_events.clear();
        self.host.immediate_events(&mut self.host_events);
        self.handle_host_events(now);
        self.engine.flush(now, &mut self.host, &mut self.out);
        self.update_placement();
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
    use smoltcp::wire::IpProtocol;
    use std::net::SocketAddrV4;

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
        assert_eq!(
            limits.count(
                hubnat_core::nat::Proto::Udp,
                std::net::IpAddr::from(GUEST_IP)
            ),
            2
        );
        // A third session on either worker is over the guest's limit.
        a.handle_frame(T0, &frame(4003), &mut ha, &mut out);
        assert_eq!(a.ctx.stats.drops_of(DropReason::Limit), 1);
        assert_eq!(a.nat.udp.len() + b.nat.udp.len(), 2);
        // Ids are unique across the two engines.
        let (ia, ib) = (a.sessions()[0].id, b.sessions()[0].id);
        assert_ne!(ia, ib);
        // Shutdown releases what the sessions held: a new one is let through.
        a.shutdown(T0, &mut ha, &mut out);
        assert_eq!(
            limits.count(
                hubnat_core::nat::Proto::Udp,
                std::net::IpAddr::from(GUEST_IP)
            ),
            1
        );
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
        assert_eq!(
            limits.count(
                hubnat_core::nat::Proto::Tcp,
                std::net::IpAddr::from(GUEST_IP)
            ),
            1
        );
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
        assert_eq!(
            limits.count(
                hubnat_core::nat::Proto::Tcp,
                std::net::IpAddr::from(GUEST_IP)
            ),
            0
        );
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
            limits.count(
                hubnat_core::nat::Proto::Tcp,
                std::net::IpAddr::from(GUEST_IP)
            ),
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
        assert_eq!(
            limits.count(
                hubnat_core::nat::Proto::Udp,
                std::net::IpAddr::from(GUEST_IP)
            ),
            0
        );
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
}
