//! The event loop that drives the core: frames from the port, readiness from the host sockets,
//! and timers.
//!
//! With one worker (`Options::workers` 1) everything runs on this one thread. With more, this
//! thread is the control thread and the NAT flows are spread over worker threads
//! (`worker`): it reads the port (unless a multiqueue TAP gives each worker a queue of its own),
//! keeps the control plane (ARP, DHCP, DNS relay, ICMP to the virtual host, fragments) and
//! hands every other frame to the worker its flow hashes to. Host sockets take readiness from
//! epoll (mio) or from io_uring (`Options::backend`), one driver per thread.
//!
//! Each wake-up reads the port until it would block and handles the whole batch before writing
//! the frames it produced, so a burst costs one write pass rather than one per frame.
//!
//! The same loop serves the operator: the control socket (one JSON request per line, answered
//! between batches against the engine itself, so nothing is locked), the metrics endpoint, and
//! SIGHUP (reload the configuration file). With workers, their counters and session counts are
//! read from what each last published (`Inbox::publish`), and the NAT table is asked of them
//! without waiting: the loop goes on and the request is answered once all replied (`Pending`).
//! The workers' idle session expiry runs on this thread's tick (`Cmd::Expire`). The lease table is saved whenever it changed, before
//! the frames of that batch (a DHCP ACK among them) are written.

use std::io;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::{Duration, SystemTime};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use crate::operator::api::{Control, Request, Response, WorkerReport};
use crate::operator::leases::{self, Loaded, WallClock};
use crate::operator::metrics;
use hubnat_core::config::RawConfig;

use crate::port::tap::Tap;
use crate::sock::driver::{SockDriver, FIRST_RESERVED_TOKEN};
use crate::sock::uring::Ring;
use crate::sock::Backend;
use crate::tx::{NapiSwitch, TapSender};
use crate::worker::{Cmd, Inbox, Pool, Router, Shared, WorkerHandle, WorkerSetup, RING, WAKE};
use hubnat_core::output::FrameBatch;
use hubnat_core::sockio::SockEvent;
use hubnat_core::stats::DropReason;
use hubnat_core::time::Instant;
use hubnat_core::Config;
use hubnat_core::Engine;

const PORT: Token = Token(FIRST_RESERVED_TOKEN);
const STOP: Token = Token(FIRST_RESERVED_TOKEN + 1);
const HUP: Token = Token(FIRST_RESERVED_TOKEN + 2);
const CONTROL: Token = Token(FIRST_RESERVED_TOKEN + 3);
const METRICS: Token = Token(FIRST_RESERVED_TOKEN + 4);
/// Connections (control and metrics) are tokens from here, one per slot.
const FIRST_CONN: usize = FIRST_RESERVED_TOKEN + 16;
/// Operator connections open at once; more wait in the listener's backlog.
pub const MAX_CONNS: usize = 32;
/// Longest request line (or HTTP request head) accepted.
pub const MAX_REQUEST: usize = 1 << 20;

use crate::worker::MAX_FRAMES_PER_BATCH;
/// How long the control thread waits for a worker's report (status, NAT table, metrics).
const REPORT_TIMEOUT: Duration = Duration::from_millis(500);
/// Largest frame the port delivers: the largest MTU plus the Ethernet header and a VLAN tag.
const MAX_FRAME: usize = hubnat_core::config::MAX_MTU as usize + 18;

/// How long a thread keeps polling without sleeping after it last had something to do. 150 µs
/// covers the gap between a guest's answer and its next request through a namespace on this
/// kind of machine; at 50 µs the worker slept in enough of those gaps to double the p99.9 of
/// request/response round trips, at 400 µs the spin took CPU from the peers (PERF.md).
pub(crate) const SPIN: Duration = Duration::from_micros(150);

/// Waits like `Poll::poll`, but for `SPIN` after the thread last had work it polls without
/// sleeping first. On a VM a sleeping vCPU takes tens of microseconds to be woken, most of a
/// request/response round trip through hubnat; the answer a short spin catches is usually
/// already on its way. Under load there is always work, so the spin never runs; idle, it ends
/// `SPIN` after the last event.
pub(crate) fn wait(
    poll: &mut Poll,
    events: &mut Events,
    timeout: Option<Duration>,
    last_work: &mut std::time::Instant,
) -> io::Result<()> {
    let start = std::time::Instant::now();
    let spin_until = *last_work + SPIN;
    if timeout != Some(Duration::ZERO) {
        while std::time::Instant::now() < spin_until {
            poll.poll(events, Some(Duration::ZERO))?;
            if !events.is_empty() {
                *last_work = std::time::Instant::now();
                return Ok(());
            }
            if timeout.is_some_and(|t| start.elapsed() >= t) {
                return Ok(());
            }
            std::hint::spin_loop();
        }
    }
    let left = timeout.map(|t| t.saturating_sub(start.elapsed()));
    poll.poll(events, left)?;
    if !events.is_empty() {
        *last_work = std::time::Instant::now();
    }
    Ok(())
}

/// Why the loop ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    /// The stop descriptor became readable (a signal arrived).
    Stopped,
}

/// A monotonic clock mapped onto the core's `Instant`.
#[derive(Clone, Copy)]
pub struct Clock(std::time::Instant);

impl Default for Clock {
    fn default() -> Clock {
        Clock(std::time::Instant::now())
    }
}

impl Clock {
    pub fn now(&self) -> Instant {
        Instant::from_micros(self.0.elapsed().as_micros() as u64)
    }
}

/// What the operator side of the loop is given (all of it optional).
#[derive(Default)]
pub struct Options {
    /// The configuration file as read at start, and its path (for `--save` and SIGHUP).
    pub raw: RawConfig,
    pub config_path: Option<PathBuf>,
    /// A bound control socket (see `bind_control`) and its path (removed at exit).
    pub control: Option<(mio::net::UnixListener, PathBuf)>,
    /// A bound metrics listener.
    pub metrics: Option<mio::net::TcpListener>,
    /// Readable when the configuration should be read again (the read end of a SIGHUP pipe).
    pub reload: Option<UnixStream>,
    /// The lease file: loaded by `Runtime::new`, saved whenever the table changes.
    pub lease_file: Option<PathBuf>,
    /// Worker threads for the NAT flows; 0 or 1: everything on the calling thread.
    pub workers: usize,
    /// Where host sockets get readiness from (every thread has its own driver).
    pub backend: Option<Backend>,
    /// The other queues of a multiqueue TAP (the one given to `with_options` is queue 0):
    /// one per worker, each read by its worker.
    pub tap_queues: Vec<Tap>,
    /// Where the TAP's NAPI polls run, switched by the load of every writing thread (None: the
    /// device has no NAPI, or it is not switched); see `tx`.
    pub napi: Option<Arc<NapiSwitch>>,
    /// Where the engines' events go (every thread drains its own engine after each batch);
    /// None: they are dropped.
    pub events: Option<Arc<dyn crate::events::EventSink>>,
}

enum Stream {
    Unix(mio::net::UnixStream),
    Tcp(mio::net::TcpStream),
}

impl Stream {
    fn source(&mut self) -> &mut dyn mio::event::Source {
        match self {
            Stream::Unix(s) => s,
            Stream::Tcp(s) => s,
        }
    }
}

impl Read for Stream {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(b),
            Stream::Tcp(s) => s.read(b),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(b),
            Stream::Tcp(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// An operator's connection: the control protocol or one HTTP request for the metrics.
struct Conn {
    stream: Stream,
    metrics: bool,
    inbuf: Vec<u8>,
    outbuf: Vec<u8>,
    sent: usize,
    /// Close once `outbuf` is written (the peer closed, or the metrics answer is complete).
    closing: bool,
    writable_armed: bool,
    /// A request waiting for the workers' replies (the lines after it wait too).
    pending: Option<Pending>,
}

/// A request asked of the workers, answered by `poll_pending` while the loop goes on.
struct Pending {
    req: Request,
    /// Per worker, until it replied.
    replies: Vec<(usize, Option<mpsc::Receiver<WorkerReport>>)>,
    got: Vec<WorkerReport>,
    deadline: Instant,
}

impl Pending {
    /// Collects the replies in; true once every worker replied (or is gone), or at the
    /// deadline (the late ones are left out).
    fn ready(&mut self, now: Instant) -> bool {
        let mut waiting = false;
        for (i, rx) in &mut self.replies {
            let Some(r) = rx else { continue };
            match r.try_recv() {
                Ok(rep) => {
                    self.got.push(rep);
                    *rx = None;
                }
                Err(mpsc::TryRecvError::Disconnected) => *rx = None,
                Err(mpsc::TryRecvError::Empty) if now >= self.deadline => {
                    tracing::warn!("worker {i} did not report in time");
                    *rx = None;
                }
                Err(mpsc::TryRecvError::Empty) => waiting = true,
            }
        }
        !waiting
    }
}

pub struct Runtime {
    pub engine: Engine,
    pub host: SockDriver,
    poll: Poll,
    tap: Arc<Tap>,
    workers: Vec<WorkerHandle>,
    shared: Option<Arc<Shared>>,
    router: Router,
    wake: Vec<bool>,
    /// The configuration the workers were last given.
    worker_cfg: Config,
    bufs: crate::worker::ReadBufs,
    /// Made on first use, on the thread that runs the loop (its ring's only submitter).
    tx: TapSender,
    stop: UnixStream,
    clock: Clock,
    out: FrameBatch,
    host_events: Vec<SockEvent>,
    control: Control,
    control_listener: Option<(mio::net::UnixListener, PathBuf)>,
    metrics_listener: Option<mio::net::TcpListener>,
    reload: Option<UnixStream>,
    conns: Vec<Option<Conn>>,
    lease_file: Option<PathBuf>,
    saved_generation: u64,
    lease_save_failing: bool,
    /// When the workers are next told to expire idle sessions (None: no workers).
    next_expire: Option<Instant>,
    /// Scratch for a datagram reassembled here for a worker's flow.
    whole: Vec<u8>,
    events: Option<Arc<dyn crate::events::EventSink>>,
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.stop_workers();
        if let Some((_, path)) = &self.control_listener {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Runtime {
    /// `stop` becomes readable when the loop should end (the read end of a signal pipe).
    pub fn new(engine: Engine, tap: Tap, stop: UnixStream) -> io::Result<Runtime> {
        Runtime::with_options(engine, tap, stop, Options::default())
    }

    /// Like `new`, with the operator's side: restores the lease file and registers the
    /// listeners given.
    pub fn with_options(
        engine: Engine,
        tap: Tap,
        stop: UnixStream,
        mut opts: Options,
    ) -> io::Result<Runtime> {
        stop.set_nonblocking(true)?;
        let clock = Clock::default();
        let wall = WallClock {
            origin: SystemTime::now(),
        };
        let poll = Poll::new()?;
        let backend = opts.backend.unwrap_or(Backend::Mio);
        let host = match backend {
            Backend::Mio => SockDriver::new(poll.registry().try_clone()?),
            Backend::Uring => {
                let ring = Ring::new()?;
                poll.registry()
                    .register(&mut SourceFd(&ring.fd()), RING, Interest::READABLE)?;
                SockDriver::with_uring(ring)
            }
        };
        let n_workers = if opts.workers > 1 { opts.workers } else { 0 };
        let multiqueue = n_workers > 0 && !opts.tap_queues.is_empty();
        if multiqueue && opts.tap_queues.len() + 1 != n_workers {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a multiqueue TAP needs one queue per worker",
            ));
        }
        let tap = Arc::new(tap);
        if !multiqueue {
            poll.registry()
                .register(&mut SourceFd(&tap.as_raw_fd()), PORT, Interest::READABLE)?;
        }
        poll.registry()
            .register(&mut SourceFd(&stop.as_raw_fd()), STOP, Interest::READABLE)?;
        if let Some(r) = &opts.reload {
            r.set_nonblocking(true)?;
            poll.registry()
                .register(&mut SourceFd(&r.as_raw_fd()), HUP, Interest::READABLE)?;
        }
        if let Some((l, _)) = &mut opts.control {
            poll.registry().register(l, CONTROL, Interest::READABLE)?;
        }
        if let Some(l) = &mut opts.metrics {
            poll.registry().register(l, METRICS, Interest::READABLE)?;
        }
        let mut engine = engine;
        engine.set_batching(true);
        let frame_size = usize::from(engine.ctx.cfg.nat.mtu) + 18;
        let router = Router::new(n_workers);
        let mut workers = Vec::new();
        let mut shared = None;
        if n_workers > 0 {
            let sessions: Arc<dyn hubnat_core::SharedSessions> =
                Arc::new(crate::limits::SharedLimits::default());
            engine.ctx.share_sessions(Arc::clone(&sessions));
            let cap = crate::worker::queue_capacity(frame_size);
            let mut polls = Vec::new();
            let mut inboxes = Vec::new();
            for _ in 0..n_workers {
                let p = Poll::new()?;
                inboxes.push(Inbox::new(cap, mio::Waker::new(p.registry(), WAKE)?));
                polls.push(p);
            }
            inboxes.push(Inbox::new(cap, mio::Waker::new(poll.registry(), WAKE)?));
            // Every queue full, plus a batch in hand for every thread.
            let count = (n_workers + 1) * (cap + 2);
            let sh = Arc::new(Shared {
                inboxes,
                pool: Pool::new(count, frame_size),
            });
            let mut queues = opts.tap_queues.drain(..).map(Arc::new);
            for (index, p) in polls.into_iter().enumerate() {
                let mut e = Engine::new(
                    engine.ctx.cfg.clone(),
                    engine.ctx.mac,
                    rand::Rng::random(&mut engine.ctx.rng),
                );
                e.ctx.share_sessions(Arc::clone(&sessions));
                // Idle expiry is this thread's schedule (`tick_expiry`).
                e.set_external_expiry(true);
                let (tap_in, tap_out) = if !multiqueue {
                    (None, Arc::clone(&tap))
                } else if index == 0 {
                    (Some(Arc::clone(&tap)), Arc::clone(&tap))
                } else {
                    let q = queues.next().expect("checked: one queue per worker");
                    (Some(Arc::clone(&q)), q)
                };
                let (tx, rx) = mpsc::channel();
                let setup = WorkerSetup {
                    index,
                    engine: e,
                    backend,
                    poll: p,
                    tap_out,
                    tap_in,
                    shared: Arc::clone(&sh),
                    router: router.clone(),
                    cmds: rx,
                    clock,
                    frame_size,
                    napi: opts.napi.clone(),
                    events: opts.events.clone(),
                };
                let thread = std::thread::Builder::new()
                    .name(format!("hubnat-w{index}"))
                    .spawn(move || crate::worker::run(setup))?;
                workers.push(WorkerHandle {
                    cmds: tx,
                    thread: Some(thread),
                });
            }
            shared = Some(sh);
        }
        let wake = vec![false; n_workers + 1];
        let tx = TapSender::new(Arc::clone(&tap), opts.napi.clone());
        let worker_cfg = engine.ctx.cfg.clone();
        let mut rt = Runtime {
            engine,
            host,
            poll,
            tap,
            workers,
            shared,
            router,
            wake,
            worker_cfg,
            bufs: crate::worker::ReadBufs::new(MAX_FRAME),
            tx,
            stop,
            clock,
            out: FrameBatch::new(),
            host_events: Vec::new(),
            control: Control {
                raw: opts.raw,
                config_path: opts.config_path,
                clock: wall,
            },
            control_listener: opts.control,
            metrics_listener: opts.metrics,
            reload: opts.reload,
            conns: (0..MAX_CONNS).map(|_| None).collect(),
            lease_file: opts.lease_file,
            saved_generation: 0,
            lease_save_failing: false,
            next_expire: None,
            whole: Vec::new(),
            events: opts.events,
        };
        if !rt.workers.is_empty() {
            rt.next_expire = Some(clock.now() + expiry_tick(&rt.engine.ctx.cfg));
        }
        rt.restore_leases();
        Ok(rt)
    }

    fn restore_leases(&mut self) {
        let Some(path) = self.lease_file.clone() else {
            return;
        };
        let now = self.clock.now();
        match leases::load(&path, &self.control.clock) {
            Ok(Loaded::Missing) => {
                tracing::info!("lease file {}: none yet, starting empty", path.display())
            }
            Ok(Loaded::Leases(list)) => {
                let total = list.len();
                let kept = self.engine.dhcp.restore(now, list);
                tracing::info!(
                    "lease file {}: restored {kept} of {total} leases (the others had expired or no longer fit the range)",
                    path.display()
                );
            }
            Ok(Loaded::Corrupt { reason, moved_to }) => tracing::error!(
                "lease file {} is corrupt ({reason}); set aside as {}, starting with an empty lease table",
                path.display(),
                moved_to.display()
            ),
            Err(e) => tracing::error!("cannot read lease file {}: {e}", path.display()),
        }
        // Write the table as restored (expired entries gone, a corrupt file replaced).
        self.write_leases();
    }

    /// Writes the lease table if it changed since it was last written (one comparison per
    /// batch when it did not).
    fn save_leases(&mut self) {
        if self.lease_file.is_some() && self.engine.dhcp.generation() != self.saved_generation {
            self.write_leases();
        }
    }

    fn write_leases(&mut self) {
        let Some(path) = &self.lease_file else {
            return;
        };
        let generation = self.engine.dhcp.generation();
        match leases::save(path, self.engine.dhcp.leases(), &self.control.clock) {
            Ok(()) => {
                self.saved_generation = generation;
                if self.lease_save_failing {
                    tracing::info!("lease file {} written again", path.display());
                }
                self.lease_save_failing = false;
            }
            Err(e) => {
                if !self.lease_save_failing {
                    tracing::error!("cannot write lease file {}: {e}", path.display());
                }
                self.lease_save_failing = true;
            }
        }
    }

    /// The number of worker threads (0: this thread carries every flow).
    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    /// Runs until the stop descriptor is readable; then every guest TCP session is reset and
    /// every host socket closed, the workers' too, and the worker threads are joined.
    pub fn run(&mut self) -> io::Result<Exit> {
        let mut events = Events::with_capacity(1024);
        let mut last_work = std::time::Instant::now();
        self.engine.start(self.clock.now(), &mut self.out);
        self.flush();
        loop {
            let inbox_waiting = self
                .shared
                .as_ref()
                .is_some_and(|s| !s.inboxes[self.router.control()].is_empty());
            let timeout = if inbox_waiting {
                Some(Duration::ZERO)
            } else {
                let next =
                    hubnat_core::time::earliest(self.engine.poll_timeout(), self.next_expire);
                let next = hubnat_core::time::earliest(next, self.pending_deadline());
                next.map(|t| {
                    let now = self.clock.now();
                    t.saturating_since(now) + Duration::from_micros(if t > now { 100 } else { 0 })
                })
            };
            self.host.submit();
            match wait(&mut self.poll, &mut events, timeout, &mut last_work) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            let now = self.clock.now();
            let mut stop = false;
            for event in events.iter() {
                match event.token() {
                    PORT => self.read_port(now)?,
                    STOP => stop = true,
                    HUP => self.on_reload(now),
                    CONTROL => self.accept_control(),
                    METRICS => self.accept_metrics(),
                    WAKE | RING => {}
                    Token(t) if (FIRST_CONN..FIRST_CONN + MAX_CONNS).contains(&t) => {
                        self.on_conn(t - FIRST_CONN, now)
                    }
                    _ => {
                        self.host_events.clear();
                        self.host.events(event, &mut self.host_events);
                        for ev in self.host_events.drain(..) {
                            self.engine
                                .handle_host_event(now, ev, &mut self.host, &mut self.out);
                        }
                    }
                }
            }
            self.host_events.clear();
            self.host.ring_events(&mut self.host_events);
            for ev in self.host_events.drain(..) {
                self.engine
                    .handle_host_event(now, ev, &mut self.host, &mut self.out);
            }
            self.drain_inbox(now);
            if self.engine.poll_timeout().is_some_and(|t| t <= now) {
                self.engine
                    .handle_timeout(now, &mut self.host, &mut self.out);
            }
            self.tick_expiry(now);
            self.poll_pending(now);
            self.flush();
            if stop {
                self.drain_stop();
                self.shutdown();
                return Ok(Exit::Stopped);
            }
        }
    }

    /// Resets every guest session and closes every host socket, the workers' first (they are
    /// joined), then this thread's.
    fn shutdown(&mut self) {
        let workers = self.workers.len();
        self.stop_workers();
        let now = self.clock.now();
        let sockets = self.host.len();
        self.engine.shutdown(now, &mut self.host, &mut self.out);
        self.flush();
        self.host.submit();
        tracing::info!(
            "stopped: guest sessions reset, {sockets} host sockets of the control thread closed, {workers} worker threads joined"
        );
    }

    /// Tells every worker to shut down and joins its thread.
    fn stop_workers(&mut self) {
        for w in &self.workers {
            let _ = w.cmds.send(Cmd::Shutdown);
        }
        if let Some(sh) = &self.shared {
            for i in 0..self.workers.len() {
                sh.inboxes[i].wake();
            }
        }
        for w in &mut self.workers {
            if let Some(t) = w.thread.take() {
                if t.join().is_err() {
                    tracing::error!("a worker thread panicked");
                }
            }
        }
        self.workers.clear();
    }

    /// Tells every worker to expire its idle sessions when the tick is due: the workers' engines
    /// keep no idle timers of their own (their sleep is not cut short for them), the control
    /// thread keeps the schedule.
    fn tick_expiry(&mut self, now: Instant) {
        if self.next_expire.is_none_or(|t| t > now) {
            return;
        }
        for (i, w) in self.workers.iter().enumerate() {
            if w.cmds.send(Cmd::Expire(now)).is_ok() {
                if let Some(sh) = &self.shared {
                    sh.inboxes[i].wake();
                }
            }
        }
        self.next_expire = Some(now + expiry_tick(&self.engine.ctx.cfg));
    }

    /// Gives the workers the control engine's configuration if it changed.
    fn sync_workers(&mut self) {
        if self.workers.is_empty() || self.engine.ctx.cfg == self.worker_cfg {
            return;
        }
        self.worker_cfg = self.engine.ctx.cfg.clone();
        for (i, w) in self.workers.iter().enumerate() {
            let _ = w
                .cmds
                .send(Cmd::Reconfigure(Box::new(self.worker_cfg.clone())));
            if let Some(sh) = &self.shared {
                sh.inboxes[i].wake();
            }
        }
    }

    fn read_port(&mut self, now: hubnat_core::Instant) -> io::Result<()> {
        // Edge-triggered: read until the device would block, flushing every batch.
        let me = self.router.control();
        loop {
            for _ in 0..MAX_FRAMES_PER_BATCH {
                // With workers, frames are read into pool buffers so that a worker's frame is
                // queued without a copy; this thread's own frames reuse the buffer.
                let pool = self.shared.as_ref().map(|sh| &sh.pool);
                let Some((buf, n, from_pool)) = self.bufs.recv(&self.tap, pool)? else {
                    self.flush();
                    return Ok(());
                };
                let to = if self.workers.is_empty() {
                    me
                } else {
                    let cfg = &self.engine.ctx.cfg;
                    self.router
                        .route(&buf[..n], cfg.host.ip, self.engine.ctx.mac)
                };
                if to == me {
                    self.handle_own(now, &buf[..n]);
                    self.bufs.put_back(buf, from_pool);
                    continue;
                }
                let sh = self.shared.as_ref().expect("workers share queues");
                let stats = &mut self.engine.ctx.stats;
                sh.hand_over(
                    to,
                    (buf, from_pool),
                    n,
                    &mut self.bufs,
                    &mut self.wake,
                    stats,
                );
            }
            self.flush();
        }
    }

    /// Handles a frame this thread owns; with workers, fragments are reassembled and the
    /// datagram handed to its flow's owner (`Shared::control_frame`).
    fn handle_own(&mut self, now: Instant, frame: &[u8]) {
        match &self.shared {
            None => self
                .engine
                .handle_frame(now, frame, &mut self.host, &mut self.out),
            Some(sh) => sh.control_frame(
                &self.router,
                &mut self.engine,
                &mut self.whole,
                now,
                frame,
                &mut self.host,
                &mut self.out,
                &mut self.wake,
            ),
        }
    }

    /// Handles the frames workers passed here (a multiqueue TAP's control-plane frames).
    fn drain_inbox(&mut self, now: hubnat_core::Instant) {
        let Some(sh) = self.shared.clone() else {
            return;
        };
        let inbox = &sh.inboxes[self.router.control()];
        let mut done = 0;
        while let Some((buf, len)) = inbox.pop() {
            self.handle_own(now, &buf[..len as usize]);
            sh.pool.put(buf);
            done += 1;
            if done % MAX_FRAMES_PER_BATCH == 0 {
                self.flush();
                if done >= 4 * MAX_FRAMES_PER_BATCH {
                    break;
                }
            }
        }
    }

    fn flush(&mut self) {
        let now = self.clock.now();
        self.engine.flush(now, &mut self.host, &mut self.out);
        // The lease table reaches the disk before the ACK that grants a lease reaches the guest.
        self.save_leases();
        let failed = self.tx.send(&mut self.out);
        // The device's queue is full or the link is down: drop, count, go on.
        self.engine.ctx.stats.drops[DropReason::QueueFull as usize] += failed as u64;
        if let Some(sh) = &self.shared {
            sh.wake_marked(&mut self.wake);
        }
        crate::events::drain(&mut self.engine, self.events.as_deref());
    }

    fn drain_stop(&mut self) {
        let mut buf = [0u8; 64];
        while matches!((&self.stop).read(&mut buf), Ok(n) if n > 0) {}
    }

    fn on_reload(&mut self, now: Instant) {
        if let Some(r) = &self.reload {
            let mut buf = [0u8; 64];
            while matches!((&*r).read(&mut buf), Ok(n) if n > 0) {}
        }
        tracing::info!("SIGHUP: reading the configuration file again");
        match self
            .control
            .reload(&mut self.engine, now, &mut self.host, &mut self.out)
        {
            Ok(r) if r.ok => {
                if r.result["changes"].as_array().is_some_and(|c| c.is_empty()) {
                    tracing::info!("configuration unchanged");
                }
            }
            Ok(r) => tracing::error!(
                "configuration not reloaded: {}",
                r.error.unwrap_or_default()
            ),
            Err(e) => tracing::error!("configuration not reloaded: {e}"),
        }
        self.sync_workers();
    }

    fn free_slot(&self) -> Option<usize> {
        self.conns.iter().position(Option::is_none)
    }

    fn accept_control(&mut self) {
        while let Some(slot) = self.free_slot() {
            let Some((l, _)) = &self.control_listener else {
                return;
            };
            match l.accept() {
                Ok((s, _)) => self.add_conn(slot, Stream::Unix(s), false),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!("control socket: accept failed: {e}");
                    return;
                }
            }
        }
    }

    fn accept_metrics(&mut self) {
        while let Some(slot) = self.free_slot() {
            let Some(l) = &self.metrics_listener else {
                return;
            };
            match l.accept() {
                Ok((s, _)) => self.add_conn(slot, Stream::Tcp(s), true),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!("metrics: accept failed: {e}");
                    return;
                }
            }
        }
    }

    fn add_conn(&mut self, slot: usize, mut stream: Stream, metrics: bool) {
        let token = Token(FIRST_CONN + slot);
        if let Err(e) = self
            .poll
            .registry()
            .register(stream.source(), token, Interest::READABLE)
        {
            tracing::warn!("cannot watch an operator connection: {e}");
            return;
        }
        self.conns[slot] = Some(Conn {
            stream,
            metrics,
            inbuf: Vec::new(),
            outbuf: Vec::new(),
            sent: 0,
            closing: false,
            writable_armed: false,
            pending: None,
        });
        // Edge-triggered: what arrived before registration must be read now.
        self.on_conn(slot, self.clock.now());
    }

    fn on_conn(&mut self, slot: usize, now: Instant) {
        let Some(mut c) = self.conns[slot].take() else {
            return;
        };
        let mut buf = [0u8; 4096];
        loop {
            match c.stream.read(&mut buf) {
                Ok(0) => {
                    c.closing = true;
                    break;
                }
                Ok(n) => {
                    c.inbuf.extend_from_slice(&buf[..n]);
                    if c.inbuf.len() > MAX_REQUEST {
                        c.inbuf.clear();
                        c.closing = true;
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.close_conn(c);
                    return;
                }
            }
        }
        if c.metrics {
            self.answer_metrics(&mut c, now);
        } else {
            self.serve_lines(&mut c, now);
        }
        self.finish_conn(slot, c);
    }

    /// Answers the complete request lines of `c`, in order. A NAT table with workers is asked
    /// of them (`Pending`): the lines after it wait for its answer, and this thread goes on.
    fn serve_lines(&mut self, c: &mut Conn, now: Instant) {
        while c.pending.is_none() {
            let Some(nl) = c.inbuf.iter().position(|&b| b == b'\n') else {
                return;
            };
            let line: Vec<u8> = c.inbuf.drain(..=nl).collect();
            let resp = match serde_json::from_slice::<Request>(&line) {
                Ok(Request::NatTable) if !self.workers.is_empty() => {
                    c.pending = Some(self.ask_sessions(Request::NatTable, now));
                    continue;
                }
                Ok(req) => {
                    let status = matches!(req, Request::Status);
                    // Counters and session counts as the workers last published them.
                    let reports = if status { self.published() } else { Vec::new() };
                    let mut r = self.control.handle_with(
                        req,
                        &mut self.engine,
                        &reports,
                        now,
                        &mut self.host,
                        &mut self.out,
                    );
                    self.sync_workers();
                    if let (true, Some((threaded, switches))) =
                        (status && r.ok, self.tx.napi_state())
                    {
                        r.result["tap_napi"] =
                            serde_json::to_value(crate::operator::api::NapiView {
                                threaded,
                                switches,
                            })
                            .expect("serializes");
                    }
                    r
                }
                Err(e) => Response::err(format!("bad request: {e}")),
            };
            serde_json::to_writer(&mut c.outbuf, &resp).expect("responses serialize");
            c.outbuf.push(b'\n');
        }
    }

    /// Asks every worker for its sessions; `poll_pending` answers `req` once all replied or
    /// `REPORT_TIMEOUT` passed.
    fn ask_sessions(&self, req: Request, now: Instant) -> Pending {
        let mut replies = Vec::new();
        for (i, w) in self.workers.iter().enumerate() {
            let (tx, rx) = mpsc::channel();
            if w.cmds.send(Cmd::Report(tx)).is_ok() {
                if let Some(sh) = &self.shared {
                    sh.inboxes[i].wake();
                }
                replies.push((i, Some(rx)));
            }
        }
        Pending {
            req,
            replies,
            got: Vec::new(),
            deadline: now + REPORT_TIMEOUT,
        }
    }

    /// The earliest deadline of a request waiting for the workers.
    fn pending_deadline(&self) -> Option<Instant> {
        self.conns
            .iter()
            .flatten()
            .filter_map(|c| c.pending.as_ref().map(|p| p.deadline))
            .min()
    }

    /// Answers the requests whose workers have all replied, or whose time is up (with what
    /// came), then the lines that waited behind them.
    fn poll_pending(&mut self, now: Instant) {
        for slot in 0..self.conns.len() {
            let ready = self.conns[slot]
                .as_mut()
                .and_then(|c| c.pending.as_mut())
                .is_some_and(|p| p.ready(now));
            if !ready {
                continue;
            }
            let Some(mut c) = self.conns[slot].take() else {
                continue;
            };
            let Some(p) = c.pending.take() else {
                continue;
            };
            let resp = self.control.handle_with(
                p.req,
                &mut self.engine,
                &p.got,
                now,
                &mut self.host,
                &mut self.out,
            );
            serde_json::to_writer(&mut c.outbuf, &resp).expect("responses serialize");
            c.outbuf.push(b'\n');
            self.serve_lines(&mut c, now);
            self.finish_conn(slot, c);
        }
    }

    /// The counters and session counts every worker last published (no round trip).
    fn published(&self) -> Vec<WorkerReport> {
        match &self.shared {
            Some(sh) => sh.inboxes[..self.workers.len()]
                .iter()
                .map(crate::worker::Inbox::published)
                .collect(),
            None => Vec::new(),
        }
    }

    /// Writes what `c` has to send, closes it when done and closing, or watches it again.
    fn finish_conn(&mut self, slot: usize, mut c: Conn) {
        // Write what can be written now; the rest when the socket is writable.
        while c.sent < c.outbuf.len() {
            match c.stream.write(&c.outbuf[c.sent..]) {
                Ok(0) => break,
                Ok(n) => c.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.close_conn(c);
                    return;
                }
            }
        }
        if c.sent == c.outbuf.len() {
            c.outbuf.clear();
            c.sent = 0;
            if c.closing && c.pending.is_none() {
                self.close_conn(c);
                return;
            }
        }
        let want_write = !c.outbuf.is_empty();
        if want_write != c.writable_armed {
            let interest = if want_write {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            let token = Token(FIRST_CONN + slot);
            if self
                .poll
                .registry()
                .reregister(c.stream.source(), token, interest)
                .is_err()
            {
                self.close_conn(c);
                return;
            }
            c.writable_armed = want_write;
        }
        self.conns[slot] = Some(c);
    }

    /// One HTTP/1.0 answer per connection, once the request head is in.
    fn answer_metrics(&mut self, c: &mut Conn, now: Instant) {
        if !c.outbuf.is_empty() || c.inbuf.is_empty() {
            return;
        }
        let head_done = c.inbuf.windows(4).any(|w| w == b"\r\n\r\n")
            || c.inbuf.windows(2).any(|w| w == b"\n\n");
        if !head_done && !c.closing {
            return;
        }
        let first = c.inbuf.split(|&b| b == b'\n').next().unwrap_or_default();
        let first = String::from_utf8_lossy(first);
        let mut words = first.split_whitespace();
        let (method, target) = (words.next(), words.next());
        let (status, body) = match (method, target) {
            (Some("GET"), Some("/metrics" | "/")) => {
                let reports = self.published();
                let mut body = metrics::render_with(&self.engine, &reports, now);
                if let Some(state) = self.tx.napi_state() {
                    metrics::render_napi(&mut body, state);
                }
                ("200 OK", body)
            }
            (Some("GET"), _) => ("404 Not Found", "not found: try /metrics\n".to_owned()),
            _ => ("405 Method Not Allowed", "GET only\n".to_owned()),
        };
        let _ = write!(
            c.outbuf,
            "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        c.inbuf.clear();
        c.closing = true;
    }

    fn close_conn(&mut self, mut c: Conn) {
        let _ = self.poll.registry().deregister(c.stream.source());
    }
}

/// How often the workers are told to expire idle sessions: a tenth of the shortest idle
/// timeout, between 100 ms and 1 s (a session ends at most that late).
fn expiry_tick(cfg: &Config) -> Duration {
    let shortest = cfg
        .nat
        .udp_timeout
        .min(cfg.nat.tcp_timeout)
        .min(hubnat_core::nat::icmp::IDLE_TIMEOUT);
    (shortest / 10).clamp(Duration::from_millis(100), Duration::from_secs(1))
}

/// Binds the control socket at `path`, readable and writable by its owner only. A stale socket
/// (nobody answering) is replaced; a live one means another instance uses the path.
pub fn bind_control(path: &Path) -> io::Result<mio::net::UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("another hubnat answers on {}", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let l = mio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(frames: u64) -> WorkerReport {
        let mut r = WorkerReport::default();
        r.stats.frames_in = frames;
        r
    }

    #[test]
    fn a_pending_request_is_ready_when_every_worker_replied_or_its_time_is_up() {
        let t0 = Instant::from_secs(1);
        let (tx0, rx0) = mpsc::channel();
        let (tx1, rx1) = mpsc::channel();
        let mut p = Pending {
            req: Request::NatTable,
            replies: vec![(0, Some(rx0)), (1, Some(rx1))],
            got: Vec::new(),
            deadline: t0 + REPORT_TIMEOUT,
        };
        assert!(!p.ready(t0));
        tx1.send(report(1)).unwrap();
        assert!(!p.ready(t0), "worker 0 has not replied");
        tx0.send(report(0)).unwrap();
        assert!(p.ready(t0));
        assert_eq!(p.got, vec![report(1), report(0)]);

        // One never replies, one is gone: ready at the deadline, with what came.
        let (_tx0, rx0) = mpsc::channel::<WorkerReport>();
        let (tx1, rx1) = mpsc::channel();
        let mut p = Pending {
            req: Request::NatTable,
            replies: vec![(0, Some(rx0)), (1, Some(rx1))],
            got: Vec::new(),
            deadline: t0 + REPORT_TIMEOUT,
        };
        drop(tx1);
        assert!(!p.ready(t0));
        assert!(p.ready(t0 + REPORT_TIMEOUT));
        assert!(p.got.is_empty());
    }

    #[test]
    fn the_expiry_tick_follows_the_shortest_timeout() {
        let mut cfg = Config::defaults();
        assert_eq!(expiry_tick(&cfg), Duration::from_secs(1));
        cfg.nat.udp_timeout = Duration::from_secs(2);
        assert_eq!(expiry_tick(&cfg), Duration::from_millis(200));
        cfg.nat.udp_timeout = Duration::from_secs(1);
        assert_eq!(expiry_tick(&cfg), Duration::from_millis(100));
    }
}
