//! The control thread: the event loop that drives the core's control plane and, with one
//! worker, everything.
//!
//! With one worker (`Options::workers` 1) everything runs on this one thread. With more, the NAT
//! flows are spread over worker threads (`worker`): this thread reads the port (unless a
//! multiqueue TAP gives each worker a queue of its own), keeps the control plane (ARP, DHCP, the
//! DNS relay, ICMP to the virtual host, fragment reassembly) and hands every other frame to the
//! worker its flow hashes to (`router`, `queues`). Host sockets take readiness from epoll or
//! from io_uring (`Options::backend`), one driver per thread. The workers' idle session expiry
//! runs on this thread's tick (`Cmd::Expire`).
//!
//! Each wake-up reads the port until it would block and handles the whole batch before writing
//! the frames it produced, so a burst costs one write pass rather than one per frame.
//!
//! The operator's side (control socket, metrics, configuration reloads, the lease file) is not
//! here: it plugs in as an `Operator`, called on this thread between batches with the engine at
//! hand (`Plane`), so nothing is locked.

use std::io;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use crate::capture::Capture;
use crate::clock::{wait, Clock};
use crate::events::EventSink;
use crate::limits::SharedLimits;
use crate::operator::{Operator, Plane};
use crate::pool::{Pool, ReadBufs};
use crate::port::link::{Link, TapLink};
use crate::port::switch::{PortId, Switch, FIRST_TAP};
use crate::port::tap::Tap;
use crate::queues::{queue_capacity, Inbox, Shared};
use crate::router::Router;
use crate::sock::dns_tcp::DnsTcp;
use crate::sock::driver::SockDriver;
use crate::sock::forward::{refuse_tcp, Forwards, Inbound, InboundConn, InboundJob};
use crate::sock::uring::Ring;
use crate::sock::Backend;
use crate::tokens::{
    port_of_token, port_token, FIRST_DNS_TCP_TOKEN, FIRST_FORWARD_TOKEN, FIRST_OPERATOR_TOKEN,
    PORT, RING, STOP, WAKE,
};
use crate::tx::{NapiSwitch, PortSender, TapSender};
use crate::worker::{self, Cmd, WorkerHandle, WorkerReport, WorkerSetup, MAX_FRAMES_PER_BATCH};
use hubnat_core::forward::GuestRef;
use hubnat_core::output::FrameBatch;
use hubnat_core::sockio::SockEvent;
use hubnat_core::stats::DropReason;
use hubnat_core::time::Instant;
use hubnat_core::Config;
use hubnat_core::Engine;
use hubnat_core::SharedSessions;

/// Largest frame the port delivers: the largest MTU plus the Ethernet header and a VLAN tag.
const MAX_FRAME: usize = crate::port::vnet::MAX_FRAME;

/// Why the loop ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    /// The stop descriptor became readable (a signal arrived).
    Stopped,
}

/// How the runtime is laid out (all of it optional: one thread, epoll, no operator).
#[derive(Default)]
pub struct Options {
    /// Worker threads for the NAT flows; 0 or 1: everything on the calling thread.
    pub workers: usize,
    /// Where host sockets get readiness from (every thread has its own driver).
    pub backend: Option<Backend>,
    /// The seeds of the flow router (`Router::with_seeds`): those a TAP's steering program was
    /// made with (`port::steer`), or None for fresh ones.
    pub flow_seeds: Option<[u64; 4]>,
    /// The table placing new TCP flows on the workers (`placement`), shared with a TAP's
    /// steering program; None: one in this process (with several workers).
    pub placement: Option<Arc<crate::placement::Placement>>,
    /// The other queues of a multiqueue TAP (the one given to `with_options` is queue 0):
    /// one per worker, each read by its worker.
    pub tap_queues: Vec<Tap>,
    /// The segment's other ports (QEMU sockets, joined interfaces, further TAPs), switched
    /// with the TAP; read by the control thread.
    pub ports: Vec<Arc<dyn Link>>,
    /// Where the TAP's NAPI polls run, switched by the load of every writing thread (None: the
    /// device has no NAPI, or it is not switched); see `tx`.
    pub napi: Option<Arc<NapiSwitch>>,
    /// The operator's side, called on the control thread between batches.
    pub operator: Option<Box<dyn Operator>>,
    /// Where the engines' events go (every thread drains its own engine after each batch);
    /// None: they are dropped.
    pub events: Option<Arc<dyn EventSink>>,
    /// A capture to start with the runtime (`--pcap`): its file, opened by the caller, the
    /// file's name and its cap in bytes.
    pub pcap: Option<(std::fs::File, std::path::PathBuf, u64)>,
    /// The directories hubnat may write in its sandbox (empty: no sandbox), named when a
    /// capture file cannot be made at run time.
    pub writable_dirs: Vec<std::path::PathBuf>,
}

/// The worker threads as the control thread holds them, and what it shares with them.
pub(crate) struct Workers {
    handles: Vec<WorkerHandle>,
    /// The queues and the buffer pool (None without workers).
    shared: Option<Arc<Shared>>,
    /// The configuration they were last given.
    cfg: Config,
}

impl Workers {
    pub(crate) fn len(&self) -> usize {
        self.handles.len()
    }

    /// Sends `cmd` to worker `i` and wakes it; false when the worker is gone.
    fn tell(&self, i: usize, cmd: Cmd) -> bool {
        let sent = self.handles[i].cmds.send(cmd).is_ok();
        if let (true, Some(sh)) = (sent, &self.shared) {
            sh.inboxes[i].wake();
        }
        sent
    }

    /// The counters and session counts every worker last published (no round trip).
    pub(crate) fn published(&self) -> Vec<WorkerReport> {
        match &self.shared {
            Some(sh) => sh.inboxes[..self.len()]
                .iter()
                .map(Inbox::published)
                .collect(),
            None => Vec::new(),
        }
    }

    /// Asks every worker for its sessions; the replies come on the receivers.
    pub(crate) fn ask_sessions(&self) -> Vec<(usize, mpsc::Receiver<WorkerReport>)> {
        let mut replies = Vec::new();
        for i in 0..self.len() {
            let (tx, rx) = mpsc::channel();
            if self.tell(i, Cmd::Report(tx)) {
                replies.push((i, rx));
            }
        }
        replies
    }

    /// Gives the workers `cfg` if it changed since they were last given one.
    fn sync(&mut self, cfg: &Config) {
        if self.handles.is_empty() || *cfg == self.cfg {
            return;
        }
        self.cfg = cfg.clone();
        for i in 0..self.len() {
            self.tell(i, Cmd::Reconfigure(Box::new(self.cfg.clone())));
        }
    }

    /// Tells every worker to shut down and joins its thread.
    fn stop(&mut self) {
        for i in 0..self.len() {
            self.tell(i, Cmd::Shutdown);
        }
        for w in &mut self.handles {
            if let Some(t) = w.thread.take() {
                if t.join().is_err() {
                    tracing::error!("a worker thread panicked");
                }
            }
        }
        self.handles.clear();
    }
}

/// The control thread's loop and everything it owns.
pub struct Runtime {
    /// The control plane's engine (with one worker: the only engine).
    pub engine: Engine,
    /// This thread's host-socket driver.
    pub sock: SockDriver,
    poll: Poll,
    /// The segment's first TAP, read and written by the threads themselves (None: the
    /// segment's ports are all read through the switch).
    tap: Option<Arc<Tap>>,
    switch: Arc<Switch>,
    /// The port forwards' listeners, and the forwards they were opened for.
    forwards: Forwards,
    synced_forwards: Vec<hubnat_core::forward::Forward>,
    inbound: Vec<Inbound>,
    /// Inbound flows for a guest named by an address ARP has not seen yet: asked for, waiting
    /// (until the deadline) for its answer.
    awaiting_arp: Vec<AwaitingArp>,
    /// When the switch next forgets silent addresses.
    next_age: Instant,
    /// The guests' DNS over TCP to the virtual host, local names answered (None: the host has
    /// no loopback to listen on; the NAT then carries it straight to the resolver).
    dns_tcp: Option<DnsTcp>,
    workers: Workers,
    router: Router,
    wake: Vec<bool>,
    bufs: ReadBufs,
    tx: PortSender,
    stop: UnixStream,
    clock: Clock,
    out: FrameBatch,
    sock_events: Vec<SockEvent>,
    operator: Option<Box<dyn Operator>>,
    /// When the workers are next told to expire idle sessions (None: no workers).
    next_expire: Option<Instant>,
    /// Scratch for a datagram reassembled here for a worker's flow.
    whole: Vec<u8>,
    events: Option<Arc<dyn EventSink>>,
    capture: Arc<Capture>,
    capture_writer: Option<std::thread::JoinHandle<()>>,
    writable_dirs: Vec<std::path::PathBuf>,
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.workers.stop();
        if let Some(op) = &mut self.operator {
            op.stop();
        }
        self.capture.shutdown();
        if let Some(t) = self.capture_writer.take() {
            if t.join().is_err() {
                tracing::error!("the capture writer thread panicked");
            }
        }
    }
}

impl Runtime {
    /// `stop` becomes readable when the loop should end (the read end of a signal pipe).
    pub fn new(engine: Engine, tap: Tap, stop: UnixStream) -> io::Result<Runtime> {
        Runtime::with_options(engine, Some(tap), stop, Options::default())
    }

    /// Like `new`, laid out as `opts` says: starts the workers and registers the operator's
    /// sources, whose `start` runs before the first frame. `tap` is the segment's first TAP
    /// (the fast path: its queues are read by the threads, its writes batched); the other
    /// ports are `opts.ports`. There must be at least one port.
    pub fn with_options(
        mut engine: Engine,
        tap: Option<Tap>,
        stop: UnixStream,
        mut opts: Options,
    ) -> io::Result<Runtime> {
        if tap.is_none() && opts.ports.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the segment needs at least one port",
            ));
        }
        if tap.is_none() && !opts.tap_queues.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "TAP queues without a TAP",
            ));
        }
        stop.set_nonblocking(true)?;
        let clock = Clock::default();
        let poll = Poll::new()?;
        let backend = opts.backend.unwrap_or(Backend::Epoll);
        let sock = sock_driver(backend, &poll)?;
        let n_workers = if opts.workers > 1 { opts.workers } else { 0 };
        let multiqueue = n_workers > 0 && !opts.tap_queues.is_empty();
        if multiqueue && opts.tap_queues.len() + 1 != n_workers {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a multiqueue TAP needs one queue per worker",
            ));
        }
        let tap = tap.map(Arc::new);
        // The TAP alone on the segment (no other port's guest would take a super-frame).
        engine.ctx.tcp_gso = tap.as_ref().is_some_and(|t| t.vnet_hdr()) && opts.ports.is_empty();
        engine.ctx.udp_gso = engine.ctx.tcp_gso && tap.as_ref().is_some_and(|t| t.uso());
        let switch = Arc::new(Switch::new(engine.ctx.mac.0));
        if let Some(tap) = &tap {
            let id = switch
                .add(Arc::new(TapLink::new(Arc::clone(tap))))
                .map_err(io::Error::other)?;
            debug_assert_eq!(id, FIRST_TAP);
            switch.set_batched(FIRST_TAP);
            if !multiqueue {
                poll.registry().register(
                    &mut SourceFd(&tap.as_raw_fd()),
                    PORT,
                    Interest::READABLE,
                )?;
            }
        }
        for link in opts.ports.drain(..) {
            add_port(&switch, poll.registry(), link)?;
        }
        poll.registry()
            .register(&mut SourceFd(&stop.as_raw_fd()), STOP, Interest::READABLE)?;
        if let Some(op) = &mut opts.operator {
            op.register(poll.registry())?;
        }
        engine.set_batching(true);
        let dns_tcp = match DnsTcp::open(poll.registry(), FIRST_DNS_TCP_TOKEN) {
            Ok(d) => {
                engine.ctx.dns_over_tcp = Some(d.addr().into());
                Some(d)
            }
            Err(e) => {
                tracing::warn!(
                    "DNS over TCP goes straight to the resolver, local names unanswered there: no listener on the loopback ({e})"
                );
                None
            }
        };
        let mut router = match opts.flow_seeds {
            Some(seeds) => Router::with_seeds(n_workers, seeds),
            None => Router::new(n_workers),
        };
        if n_workers > 1 {
            let p = opts
                .placement
                .take()
                .unwrap_or_else(|| Arc::new(crate::placement::Placement::in_process(n_workers)));
            router = router.with_placement(p);
        }
        // Its writer thread is made now, whether or not a capture is asked for: the system-call
        // filter installed after start allows no new thread.
        let capture = Arc::new(Capture::default());
        let capture_writer = capture.spawn_writer()?;
        if let Some((file, path, max)) = opts.pcap.take() {
            if let Err(e) = capture.start(file, &path, max) {
                capture.shutdown();
                let _ = capture_writer.join();
                return Err(io::Error::new(
                    e.kind(),
                    format!("capture {}: {e}", path.display()),
                ));
            }
        }
        let workers = spawn_workers(
            &mut engine,
            &poll,
            tap.as_ref(),
            &switch,
            &router,
            clock,
            backend,
            &mut opts,
            n_workers,
            &capture,
        )?;
        let next_expire = (n_workers > 0).then(|| clock.now() + expiry_tick(&engine.ctx.cfg));
        let tx = PortSender::new(
            tap.as_ref()
                .map(|t| TapSender::new(Arc::clone(t), opts.napi.clone())),
            Arc::clone(&switch),
            Arc::clone(&capture),
        );
        let next_age = clock.now() + AGE_TICK;
        let mut rt = Runtime {
            engine,
            sock,
            poll,
            tap,
            switch,
            forwards: Forwards::new(FIRST_FORWARD_TOKEN),
            synced_forwards: Vec::new(),
            inbound: Vec::new(),
            awaiting_arp: Vec::new(),
            next_age,
            dns_tcp,
            workers,
            router,
            wake: vec![false; n_workers + 1],
            bufs: ReadBufs::new(MAX_FRAME),
            tx,
            stop,
            clock,
            out: FrameBatch::new(),
            sock_events: Vec::new(),
            operator: opts.operator.take(),
            next_expire,
            whole: Vec::new(),
            events: opts.events.clone(),
            capture,
            capture_writer: Some(capture_writer),
            writable_dirs: std::mem::take(&mut opts.writable_dirs),
        };
        rt.with_operator(|op, plane| op.start(plane));
        rt.sync_forwards();
        Ok(rt)
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
            let timeout = self.timeout();
            self.sock.submit();
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
                    WAKE | RING => {}
                    Token(t) if port_of_token(t).is_some() => {
                        self.read_link(now, port_of_token(t).unwrap_or_default())
                    }
                    Token(t) if self.forwards.owns(t) => self.forward_ready(now, t),
                    Token(t) if self.dns_tcp.as_ref().is_some_and(|d| d.owns(t)) => {
                        if let Some(d) = &mut self.dns_tcp {
                            d.ready(self.poll.registry(), (&mut self.engine, now), t);
                        }
                    }
                    Token(t) if t >= FIRST_OPERATOR_TOKEN => {
                        self.with_operator(|op, plane| op.ready(event.token(), plane))
                    }
                    _ => {
                        self.sock_events.clear();
                        self.sock.events(event, &mut self.sock_events);
                        self.handle_sock_events(now);
                    }
                }
            }
            self.sock_events.clear();
            self.sock.ring_events(&mut self.sock_events);
            self.handle_sock_events(now);
            self.drain_inbox(now);
            if self.engine.poll_timeout().is_some_and(|t| t <= now) {
                self.engine
                    .handle_timeout(now, &mut self.sock, &mut self.out);
            }
            self.tick_expiry(now);
            if !self.awaiting_arp.is_empty() {
                self.retry_awaiting_arp(now);
            }
            if now >= self.next_age {
                self.switch.age();
                if let Some(d) = &mut self.dns_tcp {
                    d.sweep(self.poll.registry());
                }
                self.next_age = now + AGE_TICK;
            }
            if self.operator.is_some() {
                self.with_operator(|op, plane| op.poll(plane));
            }
            self.flush();
            if stop {
                self.drain_stop();
                self.shutdown();
                return Ok(Exit::Stopped);
            }
            if let Some(why) = self.workers.shared.as_ref().and_then(|s| s.failure()) {
                self.shutdown();
                return Err(io::Error::other(why));
            }
        }
    }

    /// How long the loop may sleep: until the engine's next timer, the workers' expiry tick or
    /// the operator's deadline; not at all while frames wait in this thread's inbox.
    fn timeout(&self) -> Option<Duration> {
        let inbox_waiting = self
            .workers
            .shared
            .as_ref()
            .is_some_and(|s| !s.inboxes[self.router.control()].is_empty());
        if inbox_waiting {
            return Some(Duration::ZERO);
        }
        let next = hubnat_core::time::earliest(self.engine.poll_timeout(), self.next_expire);
        let next =
            hubnat_core::time::earliest(next, self.operator.as_ref().and_then(|op| op.deadline()));
        let next =
            hubnat_core::time::earliest(next, self.awaiting_arp.iter().map(|a| a.next_ask).min());
        next.map(|t| {
            let now = self.clock.now();
            t.saturating_since(now) + Duration::from_micros(if t > now { 100 } else { 0 })
        })
    }

    fn handle_sock_events(&mut self, now: Instant) {
        for ev in self.sock_events.drain(..) {
            self.engine
                .handle_host_event(now, ev, &mut self.sock, &mut self.out);
        }
    }

    /// Calls the operator with this thread's `Plane`, then hands a changed configuration to the
    /// workers.
    fn with_operator(&mut self, f: impl FnOnce(&mut dyn Operator, &mut Plane<'_>)) {
        let Some(mut op) = self.operator.take() else {
            return;
        };
        let mut plane = Plane {
            now: self.clock.now(),
            engine: &mut self.engine,
            sock: &mut self.sock,
            out: &mut self.out,
            registry: self.poll.registry(),
            switch: &self.switch,
            forwards: &mut self.forwards,
            workers: &self.workers,
            napi: self.tx.napi_state(),
            capture: &self.capture,
            writable_dirs: &self.writable_dirs,
        };
        f(op.as_mut(), &mut plane);
        self.operator = Some(op);
        self.workers.sync(&self.engine.ctx.cfg);
        self.sync_forwards();
    }

    /// Opens and closes forwards' listeners to match the configuration, when it changed.
    fn sync_forwards(&mut self) {
        if self.engine.ctx.cfg.forwards == self.synced_forwards {
            return;
        }
        self.synced_forwards = self.engine.ctx.cfg.forwards.clone();
        // Failures are logged; the forward is listed as not listening.
        let (closed, _) = self
            .forwards
            .sync(&self.synced_forwards, self.poll.registry());
        let now = self.clock.now();
        end_forwards(
            &closed,
            now,
            &mut self.engine,
            &mut self.sock,
            &mut self.out,
            &self.workers,
        );
        self.awaiting_arp
            .retain(|a| !closed.contains(&a.inbound.forward));
    }

    /// Hands on the inbound flows whose guest answered ARP, refuses those whose time is up,
    /// and asks again for the others.
    fn retry_awaiting_arp(&mut self, now: Instant) {
        for mut a in std::mem::take(&mut self.awaiting_arp) {
            if self.engine.find_guest(&a.inbound.guest).is_some() || now >= a.deadline {
                // Found; or, past the wait, refused as for a guest that is not there.
                self.hand_inbound(now, a.inbound, false);
                continue;
            }
            if now >= a.next_ask {
                if let GuestRef::Ip(ip) = a.inbound.guest {
                    self.engine.ask_arp(ip, &mut self.out);
                }
                a.next_ask = now + ARP_ASK_EVERY;
            }
            self.awaiting_arp.push(a);
        }
        self.flush();
    }

    /// Takes what a forward's listener has and opens each flow on the thread that owns it.
    fn forward_ready(&mut self, now: Instant, token: usize) {
        let mut inbound = std::mem::take(&mut self.inbound);
        self.forwards.ready(token, &mut inbound);
        for inb in inbound.drain(..) {
            self.hand_inbound(now, inb, true);
        }
        self.inbound = inbound;
        self.flush();
    }

    /// Finds the guest an inbound flow is for, and opens the flow here or on the worker its
    /// frames will be routed to. A guest not there now: a TCP client gets a reset at once.
    fn hand_inbound(&mut self, now: Instant, inb: Inbound, may_wait: bool) {
        let id = inb.forward;
        if !self.forwards.exists(id) {
            // Removed while its flow waited for ARP.
            if let InboundConn::Tcp(stream) = inb.conn {
                refuse_tcp(stream);
            }
            return;
        }
        let found = self.engine.find_guest(&inb.guest);
        if let (None, GuestRef::Ip(ip), true) = (found, &inb.guest, may_wait) {
            if self.awaiting_arp.len() < MAX_AWAITING_ARP && self.engine.ask_arp(*ip, &mut self.out)
            {
                self.awaiting_arp.push(AwaitingArp {
                    inbound: inb,
                    deadline: now + ARP_WAIT,
                    next_ask: now + ARP_ASK_EVERY,
                });
                return;
            }
        }
        let Some((ip, mac)) = found else {
            tracing::debug!(
                "forward {id}: no guest {} now: {} refused",
                inb.guest,
                inb.client
            );
            self.forwards.count(id, false);
            if let InboundConn::Tcp(stream) = inb.conn {
                refuse_tcp(stream);
            }
            return;
        };
        let target = hubnat_core::InboundTarget {
            guest: std::net::SocketAddrV4::new(ip, inb.guest_port),
            guest_mac: mac,
            forward: id,
        };
        let source = match self.engine.inbound_source(inb.client) {
            Ok(s) => s,
            Err(why) => {
                tracing::debug!("forward {id}: {} refused: {why}", inb.client);
                self.forwards.count(id, false);
                if let InboundConn::Tcp(stream) = inb.conn {
                    refuse_tcp(stream);
                }
                return;
            }
        };
        self.forwards.count(id, true);
        let proto = match inb.conn {
            InboundConn::Tcp(_) => smoltcp::wire::IpProtocol::Tcp,
            InboundConn::Udp(..) => smoltcp::wire::IpProtocol::Udp,
        };
        // The guest's answers go to `source`: to the virtual host's own address they are
        // the control thread's, else they follow their flow's hash.
        let owner = if self.workers.len() == 0 || *source.ip() == self.engine.ctx.cfg.host.ip {
            self.router.control()
        } else {
            self.router
                .route_flow(proto, target.guest.into(), source.into())
        };
        let job = InboundJob {
            inbound: inb,
            target,
        };
        if owner == self.router.control() {
            crate::sock::forward::open_inbound(
                job,
                now,
                &mut self.engine,
                &mut self.sock,
                &mut self.out,
            );
        } else if !self.workers.tell(owner, Cmd::Inbound(Box::new(job))) {
            tracing::warn!("forward {id}: worker {owner} is gone");
        }
    }

    /// Resets every guest session and closes every host socket, the workers' first (they are
    /// joined), then this thread's.
    fn shutdown(&mut self) {
        let workers = self.workers.len();
        self.workers.stop();
        let now = self.clock.now();
        let sockets = self.sock.len();
        self.engine.shutdown(now, &mut self.sock, &mut self.out);
        if let Some(d) = &mut self.dns_tcp {
            d.close_all(self.poll.registry());
        }
        self.flush();
        self.sock.submit();
        tracing::info!(
            "stopped: guest sessions reset, {sockets} host sockets of the control thread closed, {workers} worker threads joined"
        );
    }

    /// Tells every worker to expire its idle sessions when the tick is due: the workers' engines
    /// keep no idle timers of their own (their sleep is not cut short for them), the control
    /// thread keeps the schedule.
    fn tick_expiry(&mut self, now: Instant) {
        if self.next_expire.is_none_or(|t| t > now) {
            return;
        }
        for i in 0..self.workers.len() {
            self.workers.tell(i, Cmd::Expire(now));
        }
        self.next_expire = Some(now + expiry_tick(&self.engine.ctx.cfg));
    }

    fn read_port(&mut self, now: Instant) -> io::Result<()> {
        let Some(tap) = self.tap.clone() else {
            return Ok(());
        };
        // Edge-triggered: read until the device would block, flushing every batch.
        let (mut frames, mut bytes) = (0u64, 0u64);
        loop {
            let cap = self.capture.batch();
            for _ in 0..MAX_FRAMES_PER_BATCH {
                // With workers, frames are read into pool buffers so that a worker's frame is
                // queued without a copy; this thread's own frames reuse the buffer.
                // A TAP with offloads may give frames larger than the pool's buffers: those
                // are read into this thread's own and copied to their worker.
                let pool = self.workers.shared.as_ref().map(|sh| &sh.pool);
                let pool = pool.filter(|_| !tap.vnet_hdr());
                let Some((buf, n, from_pool)) = self.bufs.recv(&tap, pool)? else {
                    self.flush();
                    self.switch.count_rx(FIRST_TAP, frames, bytes);
                    return Ok(());
                };
                if let Some(c) = cap {
                    self.capture.frame(c, &buf[..n]);
                }
                if self.switch.several() {
                    if !self.switch.ingress(FIRST_TAP, &buf[..n]) {
                        self.bufs.put_back(buf, from_pool);
                        continue;
                    }
                } else {
                    frames += 1;
                    bytes += n as u64;
                }
                self.dispatch(now, buf, n, from_pool);
            }
            self.flush();
        }
    }

    /// Reads port `id` (a port other than the first TAP) until it has nothing more; a port
    /// that fails for good is removed from the segment.
    fn read_link(&mut self, now: Instant, id: PortId) {
        let Some(link) = self.switch.link(id) else {
            // Removed, with events of its token still in this wake-up's list.
            return;
        };
        let mut done = 0;
        let mut cap = self.capture.batch();
        loop {
            let pool = self.workers.shared.as_ref().map(|sh| &sh.pool);
            let (mut buf, from_pool) = self.bufs.take(pool);
            match link.recv(&mut buf) {
                Ok(Some(n)) => {
                    if let Some(c) = cap {
                        self.capture.frame(c, &buf[..n]);
                    }
                    if self.switch.ingress(id, &buf[..n]) {
                        self.dispatch(now, buf, n, from_pool);
                    } else {
                        self.bufs.put_back(buf, from_pool);
                    }
                    done += 1;
                    if done % MAX_FRAMES_PER_BATCH == 0 {
                        self.flush();
                        cap = self.capture.batch();
                    }
                }
                Ok(None) => {
                    self.bufs.put_back(buf, from_pool);
                    break;
                }
                Err(e) => {
                    self.bufs.put_back(buf, from_pool);
                    tracing::warn!(
                        "port {id} ({} {}) failed and leaves the segment: {e}",
                        link.kind(),
                        link.address()
                    );
                    if let Err(e) = remove_port(&self.switch, self.poll.registry(), id) {
                        tracing::warn!("port {id}: {e}");
                    }
                    break;
                }
            }
        }
        self.flush();
    }

    /// A frame read from a port, for the engines: handled here, or handed to its flow's worker.
    fn dispatch(&mut self, now: Instant, buf: Box<[u8]>, n: usize, from_pool: bool) {
        let me = self.router.control();
        let to = if self.workers.len() == 0 {
            me
        } else {
            let cfg = &self.engine.ctx.cfg;
            self.router.route(&buf[..n], cfg, self.engine.ctx.mac)
        };
        if to == me {
            self.handle_own(now, &buf[..n]);
            self.bufs.put_back(buf, from_pool);
            return;
        }
        let sh = self.workers.shared.as_ref().expect("workers share queues");
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

    /// Handles a frame this thread owns; with workers, fragments are reassembled and the
    /// datagram handed to its flow's owner (`Shared::control_frame`).
    fn handle_own(&mut self, now: Instant, frame: &[u8]) {
        match &self.workers.shared {
            None => self
                .engine
                .handle_frame(now, frame, &mut self.sock, &mut self.out),
            Some(sh) => sh.control_frame(
                &self.router,
                &mut self.engine,
                &mut self.whole,
                now,
                frame,
                &mut self.sock,
                &mut self.out,
                &mut self.wake,
            ),
        }
    }

    /// Handles the frames workers passed here (a multiqueue TAP's control-plane frames).
    fn drain_inbox(&mut self, now: Instant) {
        let Some(sh) = self.workers.shared.clone() else {
            return;
        };
        let inbox = &sh.inboxes[self.router.control()];
        let mut done = 0;
        while let Some(frame) = inbox.pop_large() {
            self.handle_own(now, &frame);
        }
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
        // What the batch's calls already settled (a connect whose handshake was over) is
        // answered in this batch's frames.
        self.sock_events.clear();
        self.sock.immediate_events(&mut self.sock_events);
        self.handle_sock_events(now);
        self.engine.flush(now, &mut self.sock, &mut self.out);
        // What the batch changed is the operator's before its frames leave (the lease table
        // reaches the disk before the ACK that grants a lease reaches the guest).
        if let Some(op) = &mut self.operator {
            op.before_write(&self.engine, now);
        }
        let failed = self.tx.send(&mut self.out);
        // The device's queue is full or the link is down: drop, count, go on.
        self.engine.ctx.stats.drops[DropReason::QueueFull as usize] += failed as u64;
        if let Some(sh) = &self.workers.shared {
            sh.wake_marked(&mut self.wake);
        }
        crate::events::drain(&mut self.engine, self.events.as_deref());
    }

    fn drain_stop(&mut self) {
        let mut buf = [0u8; 64];
        while matches!((&self.stop).read(&mut buf), Ok(n) if n > 0) {}
    }
}

/// This thread's host-socket driver, its ring (if any) registered with `poll`.
fn sock_driver(backend: Backend, poll: &Poll) -> io::Result<SockDriver> {
    Ok(match backend {
        Backend::Epoll => SockDriver::new(poll.registry().try_clone()?),
        Backend::Uring => {
            let ring = Ring::new()?;
            poll.registry()
                .register(&mut SourceFd(&ring.fd()), RING, Interest::READABLE)?;
            SockDriver::with_uring(ring)
        }
    })
}

/// Starts `n` worker threads (none for 0), each with an engine of its own that shares session
/// ids and limits with `engine`, and the queues and pool they share with this thread.
#[allow(clippy::too_many_arguments)]
fn spawn_workers(
    engine: &mut Engine,
    poll: &Poll,
    tap: Option<&Arc<Tap>>,
    switch: &Arc<Switch>,
    router: &Router,
    clock: Clock,
    backend: Backend,
    opts: &mut Options,
    n: usize,
    capture: &Arc<Capture>,
) -> io::Result<Workers> {
    let mut workers = Workers {
        handles: Vec::new(),
        shared: None,
        cfg: engine.ctx.cfg.clone(),
    };
    if n == 0 {
        return Ok(workers);
    }
    let multiqueue = !opts.tap_queues.is_empty();
    let frame_size = usize::from(engine.ctx.cfg.nat.mtu) + 18;
    // A guest that segments nothing itself (offloads on) sends frames of up to 64 KiB: they
    // are read into buffers that large, and travel between threads apart from the pool's.
    let read_size = if tap.is_some_and(|t| t.vnet_hdr()) {
        crate::port::vnet::MAX_FRAME
    } else {
        frame_size
    };
    let sessions: Arc<dyn SharedSessions> = Arc::new(SharedLimits::default());
    engine.ctx.share_sessions(Arc::clone(&sessions));
    let cap = queue_capacity(frame_size);
    let mut polls = Vec::new();
    let mut inboxes = Vec::new();
    for _ in 0..n {
        let p = Poll::new()?;
        inboxes.push(Inbox::new(cap, mio::Waker::new(p.registry(), WAKE)?));
        polls.push(p);
    }
    inboxes.push(Inbox::new(cap, mio::Waker::new(poll.registry(), WAKE)?));
    // Every queue full, plus a batch in hand for every thread.
    let count = (n + 1) * (cap + 2);
    let shared = Arc::new(Shared::new(inboxes, Pool::new(count, frame_size)));
    let mut queues = opts.tap_queues.drain(..).map(Arc::new);
    let (ready_tx, ready_rx) = mpsc::channel();
    for (index, p) in polls.into_iter().enumerate() {
        let mut e = Engine::new(
            engine.ctx.cfg.clone(),
            engine.ctx.mac,
            rand::Rng::random(&mut engine.ctx.rng),
        );
        e.ctx.share_sessions(Arc::clone(&sessions));
        e.ctx.dns_over_tcp = engine.ctx.dns_over_tcp;
        e.ctx.tcp_gso = engine.ctx.tcp_gso;
        e.ctx.udp_gso = engine.ctx.udp_gso;
        // Idle expiry is the control thread's schedule (`tick_expiry`).
        e.set_external_expiry(true);
        let (tap_in, tap_out) = match tap {
            None => (None, None),
            Some(tap) if !multiqueue => (None, Some(Arc::clone(tap))),
            Some(tap) if index == 0 => (Some(Arc::clone(tap)), Some(Arc::clone(tap))),
            Some(_) => {
                let q = queues.next().ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidInput, "one TAP queue per worker")
                })?;
                (Some(Arc::clone(&q)), Some(q))
            }
        };
        let (tx, rx) = mpsc::channel();
        let setup = WorkerSetup {
            index,
            engine: e,
            backend,
            poll: p,
            tap_out,
            tap_in,
            switch: Arc::clone(switch),
            shared: Arc::clone(&shared),
            router: router.clone(),
            cmds: rx,
            clock,
            frame_size: read_size,
            napi: opts.napi.clone(),
            events: opts.events.clone(),
            capture: Arc::clone(capture),
        };
        let ready = ready_tx.clone();
        let thread = std::thread::Builder::new()
            .name(format!("hubnat-w{index}"))
            .spawn(move || worker::run(setup, ready))?;
        workers.handles.push(WorkerHandle {
            cmds: tx,
            thread: Some(thread),
        });
    }
    workers.shared = Some(shared);
    // Every worker has its rings before this returns (the caller may install a system-call
    // filter that makes no more).
    for _ in 0..n {
        let started = ready_rx
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("a worker thread ended at start")));
        if let Err(e) = started {
            workers.stop();
            return Err(e);
        }
    }
    Ok(workers)
}

/// Ends the flows of the forwards `closed` (removed) on every thread.
pub(crate) fn end_forwards(
    closed: &[u32],
    now: Instant,
    engine: &mut Engine,
    sock: &mut SockDriver,
    out: &mut FrameBatch,
    workers: &Workers,
) {
    for &id in closed {
        let n = engine.close_forward(now, id, sock, out);
        if n > 0 {
            tracing::info!("forward {id}: {n} flows of the control thread ended");
        }
        for w in 0..workers.len() {
            workers.tell(w, Cmd::CloseForward(id));
        }
    }
}

/// An inbound flow waiting for its guest's ARP answer.
struct AwaitingArp {
    inbound: Inbound,
    deadline: Instant,
    next_ask: Instant,
}

/// How long an inbound flow waits for its guest to answer ARP, how often it is asked, and how
/// many flows may wait at once (beyond, they are refused as for a guest that is not there).
const ARP_WAIT: Duration = Duration::from_secs(1);
const ARP_ASK_EVERY: Duration = Duration::from_millis(250);
const MAX_AWAITING_ARP: usize = 1024;

/// How often the switch looks for silent addresses to forget.
const AGE_TICK: Duration = Duration::from_secs(10);

/// Adds `link` to the segment and registers it with the control thread's poll.
pub(crate) fn add_port(
    switch: &Switch,
    registry: &mio::Registry,
    link: Arc<dyn Link>,
) -> io::Result<PortId> {
    let id = switch.add(Arc::clone(&link)).map_err(io::Error::other)?;
    if let Err(e) = link.register(registry, port_token(id)) {
        let _ = switch.remove(id);
        return Err(e);
    }
    tracing::info!(
        "port {id} ({} {}) joined the segment",
        link.kind(),
        link.address()
    );
    Ok(id)
}

/// Removes port `id` from the segment and from the control thread's poll.
pub(crate) fn remove_port(
    switch: &Switch,
    registry: &mio::Registry,
    id: PortId,
) -> Result<(), crate::port::switch::SwitchError> {
    let link = switch.remove(id)?;
    if let Err(e) = link.deregister(registry) {
        tracing::debug!("port {id}: deregistering: {e}");
    }
    tracing::info!(
        "port {id} ({} {}) left the segment",
        link.kind(),
        link.address()
    );
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

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
