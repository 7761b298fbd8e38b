//! The operator's side of `hubnat run`, plugged into the runtime's control thread as its
//! `Operator`: the control socket (one JSON request per line, answered between batches against
//! the engine itself), the metrics endpoint (Prometheus text over HTTP/1.0), SIGHUP (read the
//! configuration file again), and the lease files (restored at start; whatever changed in the
//! table is appended to the journal before the frames of that batch, a DHCP ACK among them, are
//! written).
//!
//! With workers, their counters and session counts are read from what each last published, and
//! the NAT table is asked of them without waiting: the loop goes on and the request is answered
//! once all replied (`Pending`).

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::{Duration, SystemTime};

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};

use hubnat_core::config::RawConfig;
use hubnat_core::time::Instant;
use hubnat_core::Engine;
use hubnat_runtime::tokens::FIRST_OPERATOR_TOKEN;
use hubnat_runtime::{Operator, Plane, WorkerReport};

use crate::api::{Control, ForwardRow, NapiView, PortRow, Request, Response};
use crate::leases::{Change, Journal, LeaseStore, Snapshot, WallClock};
use crate::metrics;
use crate::stream::{EventHub, Subscription, MAX_STREAMS};
use hubnat_core::forward::RawForward;

const CONTROL: Token = Token(FIRST_OPERATOR_TOKEN);
const METRICS: Token = Token(FIRST_OPERATOR_TOKEN + 1);
const HUP: Token = Token(FIRST_OPERATOR_TOKEN + 2);
/// Something was published for the event streams.
const EVENTS: Token = Token(FIRST_OPERATOR_TOKEN + 3);
/// resolv.conf's watch (`resolv`).
const RESOLV: Token = Token(FIRST_OPERATOR_TOKEN + 8);
/// Connections (control and metrics) are tokens from here, one per slot.
const FIRST_CONN: usize = FIRST_OPERATOR_TOKEN + 16;
/// Control connections open at once; more wait in the listener's backlog. The metrics endpoint
/// has slots of its own, so that a flood of scrapes (or a guest that reached a loopback
/// listener) cannot lock the operator out of the control socket.
pub const MAX_CONTROL_CONNS: usize = 16;
/// Metrics connections open at once.
pub const MAX_METRICS_CONNS: usize = 16;
const MAX_CONNS: usize = MAX_CONTROL_CONNS + MAX_METRICS_CONNS;
/// Longest request line accepted on the control socket.
pub const MAX_REQUEST: usize = 1 << 20;
/// Longest HTTP request head accepted by the metrics endpoint.
pub const MAX_HTTP_HEAD: usize = 8 << 10;
/// A control connection that sends no complete request for this long is closed.
pub const CONTROL_IDLE: Duration = Duration::from_secs(30);
/// A metrics connection that has not sent its request head within this time is closed.
pub const METRICS_IDLE: Duration = Duration::from_secs(5);
/// How long a request waits for a worker's report (the NAT table).
const REPORT_TIMEOUT: Duration = Duration::from_millis(500);

/// What the operator's side is given (all of it optional).
#[derive(Default)]
pub struct ServerOptions {
    /// The configuration file as read at start, and its path (for `--save` and SIGHUP).
    pub raw: RawConfig,
    /// The configuration file's path.
    pub config_path: Option<PathBuf>,
    /// A bound control socket (see `bind_control`) and its path (removed at exit).
    pub control: Option<(mio::net::UnixListener, PathBuf)>,
    /// A bound metrics listener.
    pub metrics: Option<mio::net::TcpListener>,
    /// Readable when the configuration should be read again (the read end of a SIGHUP pipe).
    pub reload: Option<UnixStream>,
    /// The lease file: restored at start, saved whenever the table changes.
    pub lease_file: Option<PathBuf>,
    /// The least size of its journal (default `leases::JOURNAL_BYTES`).
    pub lease_journal_bytes: Option<u64>,
    /// Where the threads publish the events the control socket streams (`stream`); the same
    /// hub goes into the runtime's event sink (`stream::TeeSink`).
    pub events: Option<Arc<EventHub>>,
    /// resolv.conf watched: the DNS relay's upstreams follow it when the file names none.
    pub resolv: Option<crate::resolv::ResolvWatch>,
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
struct OperatorConn {
    stream: Stream,
    metrics: bool,
    inbuf: Vec<u8>,
    /// How much of `inbuf` has been searched for the end of a request already (each byte is
    /// looked at once, however the request arrives).
    scanned: usize,
    /// When it is closed unless a request completes first.
    idle_deadline: Instant,
    outbuf: Vec<u8>,
    sent: usize,
    /// Close once `outbuf` is written (the peer closed, or the metrics answer is complete).
    closing: bool,
    writable_armed: bool,
    /// A request waiting for the workers' replies (the lines after it wait too).
    pending: Option<Pending>,
    /// The connection is an event stream: it is written to, never idle, and reads nothing
    /// more.
    events: Option<Subscription>,
}

/// A request asked of the workers, answered by `poll` while the loop goes on.
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

/// The lease files and whether the table in them is the engine's.
struct LeaseFile {
    store: LeaseStore,
    /// The engine's lease-table generation the files hold.
    saved_generation: u64,
    /// The bindings in the files: a new or moved binding is written before its ACK leaves.
    saved_bindings: u64,
    /// When the files were last written: renewals, which only move an expiry, are written
    /// together at most every `RENEWALS_EVERY`.
    saved_at: Option<Instant>,
    /// Renewals are in the engine's table but not yet in the files.
    renewals_waiting: bool,
    /// Since when removals alone were appended without a sync: they are synced with the next
    /// save that must be, or `RENEWALS_EVERY` later.
    unsynced_at: Option<Instant>,
    failing: bool,
    /// The ids changed since the last save (kept for its allocation).
    ids: Vec<u32>,
    /// The same three for the DHCPv6 table, saved in the same files.
    saved_generation6: u64,
    saved_bindings6: u64,
    ids6: Vec<u32>,
}

impl LeaseFile {
    /// Records the outcome of a save of the engine's table as it is now (`synced`: made
    /// durable, with everything saved before it).
    fn saved(&mut self, engine: &Engine, now: Instant, result: io::Result<()>, synced: bool) {
        match result {
            Ok(()) => {
                self.saved_generation = engine.dhcp.generation();
                self.saved_bindings = engine.dhcp.binding_generation();
                self.saved_generation6 = engine.dhcp6.generation();
                self.saved_bindings6 = engine.dhcp6.binding_generation();
                self.saved_at = Some(now);
                self.renewals_waiting = false;
                if !synced {
                    self.unsynced_at.get_or_insert(now);
                } else {
                    self.unsynced_at = None;
                }
                if self.failing {
                    tracing::info!(
                        "lease file {} written again",
                        self.store.snapshot_path().display()
                    );
                }
                self.failing = false;
            }
            Err(e) => {
                if !self.failing {
                    tracing::error!(
                        "cannot write lease file {}: {e}",
                        self.store.snapshot_path().display()
                    );
                }
                self.failing = true;
            }
        }
    }
}

/// How often renewals alone cause the lease file to be written (a client renewing every
/// second must not make hubnat fsync every second per client).
const RENEWALS_EVERY: Duration = Duration::from_secs(1);

/// The operator's side of a running instance (see the module's comment).
pub struct Server {
    control: Control,
    control_listener: Option<(mio::net::UnixListener, PathBuf)>,
    metrics_listener: Option<mio::net::TcpListener>,
    reload: Option<UnixStream>,
    conns: Vec<Option<OperatorConn>>,
    /// A slot was freed since the listeners were last drained.
    freed: bool,
    leases: Option<LeaseFile>,
    events: Option<Arc<EventHub>>,
    /// The event lines of one loop turn (kept to reuse its allocation).
    lines: Vec<String>,
    resolv: Option<crate::resolv::ResolvWatch>,
}

impl Server {
    /// The operator's side with what `opts` gives it.
    pub fn new(opts: ServerOptions) -> Server {
        Server {
            control: Control {
                raw: opts.raw,
                config_path: opts.config_path,
                clock: WallClock {
                    origin: SystemTime::now(),
                },
            },
            control_listener: opts.control,
            metrics_listener: opts.metrics,
            reload: opts.reload,
            conns: (0..MAX_CONNS).map(|_| None).collect(),
            freed: false,
            events: opts.events,
            lines: Vec::new(),
            resolv: opts.resolv,
            leases: opts.lease_file.map(|path| LeaseFile {
                store: match opts.lease_journal_bytes {
                    Some(b) => LeaseStore::with_journal_bytes(path, b),
                    None => LeaseStore::new(path),
                },
                saved_generation: 0,
                saved_bindings: 0,
                saved_at: None,
                renewals_waiting: false,
                unsynced_at: None,
                failing: false,
                ids: Vec::new(),
                saved_generation6: 0,
                saved_bindings6: 0,
                ids6: Vec::new(),
            }),
        }
    }

    /// The hub the event streams are fed from, for the runtime's event sink.
    pub fn event_hub(&self) -> Option<Arc<EventHub>> {
        self.events.clone()
    }

    /// Publishes the configuration changes a successful `r` lists to the event streams.
    fn publish_changes(&self, r: &Response, source: &'static str) {
        let (Some(hub), true) = (&self.events, r.ok) else {
            return;
        };
        if let Some(changes) = r.result["changes"].as_array() {
            for c in changes.iter().filter_map(serde_json::Value::as_str) {
                hub.publish_change(source, c);
            }
        }
    }

    /// Hands what the threads published since the last turn to every event stream.
    fn pump_events(&mut self, registry: &Registry) {
        let Some(hub) = &self.events else {
            return;
        };
        self.lines.clear();
        let dropped = hub.drain(&mut self.lines);
        if self.lines.is_empty() && dropped == 0 {
            return;
        }
        for slot in 0..MAX_CONTROL_CONNS {
            let streaming = self.conns[slot]
                .as_ref()
                .is_some_and(|c| c.events.is_some() && !c.closing);
            if !streaming {
                continue;
            }
            let Some(mut c) = self.conns[slot].take() else {
                continue;
            };
            let Some(mut sub) = c.events.take() else {
                continue;
            };
            sub.lose(dropped);
            let (mut flushed, mut broken) = (false, false);
            for line in &self.lines {
                // Once a turn, a full buffer is written out before lines are counted lost: a
                // client that reads loses nothing to a burst larger than the buffer.
                if !flushed && !sub.fits(&c.outbuf, c.sent, line) {
                    flushed = true;
                    if write_out(&mut c).is_err() {
                        broken = true;
                        break;
                    }
                }
                sub.offer(&mut c.outbuf, &mut c.sent, line);
            }
            c.events = Some(sub);
            if broken {
                self.close_conn(registry, c);
            } else {
                self.finish_conn(slot, c, registry);
            }
        }
    }

    fn restore_leases(&mut self, engine: &mut Engine, now: Instant) {
        let Some(file) = &mut self.leases else {
            return;
        };
        let path = file.store.snapshot_path().to_owned();
        let journal_path = file.store.journal_path().to_owned();
        match file.store.load(&self.control.clock) {
            Ok(loaded) => {
                match &loaded.snapshot {
                    Snapshot::Missing => {
                        tracing::info!("lease file {}: none yet, starting empty", path.display())
                    }
                    Snapshot::Read(_) => {}
                    Snapshot::Corrupt { reason, moved_to } => tracing::error!(
                        "lease file {} is corrupt ({reason}); set aside as {}, starting with an empty lease table",
                        path.display(),
                        moved_to.display()
                    ),
                }
                match &loaded.journal {
                    Journal::Missing | Journal::Folded => {}
                    Journal::Replayed {
                        frames,
                        records,
                        torn,
                    } => {
                        tracing::info!(
                            "lease journal {}: {records} changes in {frames} saves replayed",
                            journal_path.display()
                        );
                        if *torn {
                            tracing::warn!(
                                "lease journal {}: its last save was cut short (a crash before it was acknowledged) and is ignored",
                                journal_path.display()
                            );
                        }
                    }
                    Journal::SetAside {
                        reason,
                        moved_to,
                        applied,
                    } => tracing::error!(
                        "lease journal {} set aside as {}: {reason} ({applied} of its saves replayed)",
                        journal_path.display(),
                        moved_to.display()
                    ),
                }
                let total = loaded.leases.len();
                let kept = engine.dhcp.restore(now, loaded.leases);
                let total6 = loaded.leases6.len();
                let kept6 = engine.dhcp6.restore(now, loaded.leases6);
                if !matches!(loaded.snapshot, Snapshot::Corrupt { .. }) {
                    tracing::info!(
                        "lease file {}: restored {kept} of {total} leases (the others had expired or no longer fit the range)",
                        path.display()
                    );
                    if total6 > 0 {
                        tracing::info!(
                            "lease file {}: restored {kept6} of {total6} DHCPv6 leases",
                            path.display()
                        );
                    }
                }
            }
            Err(e) => tracing::error!("cannot read lease file {}: {e}", path.display()),
        }
        // Write the table as restored (expired entries gone, a corrupt file replaced) and
        // start the journal.
        self.compact_leases(engine, now);
    }

    /// Writes the whole table (snapshot and a restarted journal).
    fn compact_leases(&mut self, engine: &Engine, now: Instant) {
        let Some(file) = &mut self.leases else {
            return;
        };
        let result = file.store.compact_all(
            engine.dhcp.leases(),
            engine.dhcp6.leases(),
            &self.control.clock,
        );
        file.saved(engine, now, result, true);
    }

    /// Appends what changed since the last save to the journal; compacts when it cannot.
    fn save_lease_changes(&mut self, engine: &Engine, now: Instant) {
        let Some(file) = &mut self.leases else {
            return;
        };
        let (Some(changed), Some(changed6)) = (
            engine.dhcp.changed_since(file.saved_generation),
            engine.dhcp6.changed_since(file.saved_generation6),
        ) else {
            // More changed than the engine remembers.
            return self.compact_leases(engine, now);
        };
        file.ids.clear();
        file.ids.extend(changed);
        file.ids6.clear();
        file.ids6.extend(changed6);
        // A frame holds each lease's last state once.
        for ids in [&mut file.ids, &mut file.ids6] {
            ids.sort_unstable();
            ids.dedup();
        }
        let changes = file.ids.iter().map(|&id| match engine.dhcp.lease(id) {
            Some(l) => Change::Put(l),
            None => Change::Remove(id),
        });
        let changes6 = file.ids6.iter().map(|&id| match engine.dhcp6.lease(id) {
            Some(l) => Change::Put6(l),
            None => Change::Remove6(id),
        });
        let changes = changes.chain(changes6);
        // A lease given or renewed must be on disk before its answer leaves. A removal alone
        // need not: a crash that loses it leaves the lease to its owner until it expires, and
        // the next save that syncs makes it durable too (it precedes it in the file).
        let sync = file.ids.iter().any(|&id| engine.dhcp.lease(id).is_some())
            || file.ids6.iter().any(|&id| engine.dhcp6.lease(id).is_some())
            || file
                .unsynced_at
                .is_some_and(|t| now.saturating_since(t) >= RENEWALS_EVERY);
        match file.store.append(changes, &self.control.clock, sync) {
            Ok(true) => file.saved(engine, now, Ok(()), sync),
            Ok(false) => self.compact_leases(engine, now),
            Err(e) => {
                tracing::warn!(
                    "cannot append to lease journal {}: {e}; writing the whole table",
                    file.store.journal_path().display()
                );
                self.compact_leases(engine, now)
            }
        }
    }

    fn on_reload(&mut self, plane: &mut Plane<'_>) {
        if let Some(r) = &self.reload {
            let mut buf = [0u8; 64];
            while matches!((&*r).read(&mut buf), Ok(n) if n > 0) {}
        }
        tracing::info!("SIGHUP: reading the configuration file again");
        match self
            .control
            .reload(plane.engine, plane.now, plane.sock, plane.out)
        {
            Ok(r) if r.ok => {
                self.publish_changes(&r, "configuration file");
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
    }

    /// resolv.conf changed: the relay's upstreams follow it, unless the configuration names
    /// its own (then the file is not what they come from).
    fn on_resolv(&mut self, plane: &mut Plane<'_>) {
        let Some(w) = &mut self.resolv else {
            return;
        };
        let configured = (self.control.raw.dns.upstream.as_ref()).is_some_and(|u| !u.is_empty());
        if !w.changed() || configured {
            return;
        }
        let new = w.nameservers();
        let dns = &mut plane.engine.ctx.cfg.dns;
        if new != dns.upstream {
            tracing::info!(
                "DNS upstreams changed (resolv.conf): {} -> {}",
                crate::resolv::show(&dns.upstream),
                crate::resolv::show(&new)
            );
            // Reaches the workers (DNS over TCP) when this call returns; the relay follows it
            // at its next query.
            dns.upstream = new;
        }
    }

    /// A free slot of the control connections' (`metrics` false) or the metrics endpoint's.
    fn free_slot(&self, metrics: bool) -> Option<usize> {
        let slots = if metrics {
            MAX_CONTROL_CONNS..MAX_CONNS
        } else {
            0..MAX_CONTROL_CONNS
        };
        slots.into_iter().find(|&i| self.conns[i].is_none())
    }

    /// Accepts what waits on the control socket (`metrics` false) or the metrics listener.
    fn accept(&mut self, metrics: bool, plane: &mut Plane<'_>) {
        while let Some(slot) = self.free_slot(metrics) {
            let accepted = if metrics {
                let Some(l) = &self.metrics_listener else {
                    return;
                };
                l.accept().map(|(s, _)| Stream::Tcp(s))
            } else {
                let Some((l, _)) = &self.control_listener else {
                    return;
                };
                l.accept().map(|(s, _)| Stream::Unix(s))
            };
            match accepted {
                Ok(s) => self.add_conn(slot, s, metrics, plane),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    let what = if metrics { "metrics" } else { "control socket" };
                    tracing::warn!("{what}: accept failed: {e}");
                    return;
                }
            }
        }
    }

    fn add_conn(&mut self, slot: usize, mut stream: Stream, metrics: bool, plane: &mut Plane<'_>) {
        let token = Token(FIRST_CONN + slot);
        if let Err(e) = plane
            .registry
            .register(stream.source(), token, Interest::READABLE)
        {
            tracing::warn!("cannot watch an operator connection: {e}");
            return;
        }
        let idle = if metrics { METRICS_IDLE } else { CONTROL_IDLE };
        self.conns[slot] = Some(OperatorConn {
            stream,
            metrics,
            inbuf: Vec::new(),
            scanned: 0,
            idle_deadline: plane.now + idle,
            outbuf: Vec::new(),
            sent: 0,
            closing: false,
            writable_armed: false,
            pending: None,
            events: None,
        });
        // Edge-triggered: what arrived before registration must be read now.
        self.on_conn(slot, plane);
    }

    fn on_conn(&mut self, slot: usize, plane: &mut Plane<'_>) {
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
                Ok(_) if c.events.is_some() => {
                    // A stream's client has nothing more to ask: what it sends is read, to see
                    // it close, and dropped.
                }
                Ok(n) => {
                    c.inbuf.extend_from_slice(&buf[..n]);
                    let limit = if c.metrics {
                        MAX_HTTP_HEAD
                    } else {
                        MAX_REQUEST
                    };
                    if c.inbuf.len() > limit {
                        c.inbuf.clear();
                        c.scanned = 0;
                        c.closing = true;
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.close_conn(plane.registry, c);
                    return;
                }
            }
        }
        if c.metrics {
            answer_metrics(&mut c, plane);
        } else if let Some(mut sub) = c.events.take() {
            // Writable again: room may have been made for the count of lines it lost.
            if write_out(&mut c).is_err() {
                self.close_conn(plane.registry, c);
                return;
            }
            sub.catch_up(&mut c.outbuf, &mut c.sent);
            c.events = Some(sub);
        } else {
            self.serve_lines(&mut c, plane);
        }
        self.finish_conn(slot, c, plane.registry);
    }

    /// Answers the complete request lines of `c`, in order. A NAT table with workers is asked
    /// of them (`Pending`): the lines after it wait for its answer, and the loop goes on.
    fn serve_lines(&mut self, c: &mut OperatorConn, plane: &mut Plane<'_>) {
        while c.pending.is_none() && c.events.is_none() {
            let Some(at) = c.inbuf[c.scanned..].iter().position(|&b| b == b'\n') else {
                c.scanned = c.inbuf.len();
                return;
            };
            let nl = c.scanned + at;
            let line: Vec<u8> = c.inbuf.drain(..=nl).collect();
            c.scanned = 0;
            c.idle_deadline = plane.now + CONTROL_IDLE;
            let resp = match serde_json::from_slice::<Request>(&line) {
                Ok(Request::NatTable) if plane.workers() > 0 => {
                    c.pending = Some(Pending {
                        req: Request::NatTable,
                        replies: plane
                            .ask_sessions()
                            .into_iter()
                            .map(|(i, rx)| (i, Some(rx)))
                            .collect(),
                        got: Vec::new(),
                        deadline: plane.now + REPORT_TIMEOUT,
                    });
                    continue;
                }
                Ok(Request::Events) => match self.events.as_ref().map(|h| h.subscribe()) {
                    None => Response::err("this hubnat streams no events"),
                    Some(None) => Response::err(format!(
                        "{MAX_STREAMS} event streams are open already: close one first"
                    )),
                    Some(Some(sub)) => {
                        c.events = Some(sub);
                        // A stream only writes: what followed the request is not a request.
                        c.inbuf.clear();
                        c.scanned = 0;
                        Response::ok(serde_json::json!({ "streaming": true }))
                    }
                },
                Ok(Request::PortList) => Response::ok(port_rows(plane)),
                Ok(Request::ForwardList) => Response::ok(forward_rows(plane)),
                Ok(Request::ForwardAdd {
                    proto,
                    listen,
                    to,
                    save,
                }) => {
                    let mut raw = self.control.raw().clone();
                    let new = RawForward { proto, listen, to };
                    match unknown_guest(&new, raw.forwards.len(), plane) {
                        Some(why) => Response::err(why),
                        None => {
                            raw.forwards.push(new);
                            self.change_forwards(raw, save, plane)
                        }
                    }
                }
                Ok(Request::ForwardRemove { id, save }) => {
                    match plane.forwards().into_iter().find(|f| f.id == id) {
                        None => Response::err(format!("no forward {id}")),
                        Some(f) => {
                            let mut raw = self.control.raw().clone();
                            raw.forwards
                                .retain(|r| r.validate(0).ok().as_ref() != Some(&f.forward));
                            self.change_forwards(raw, save, plane)
                        }
                    }
                }
                Ok(Request::PortAdd { spec }) => add_port(&spec, plane),
                Ok(Request::CaptureStart { path, max_mib }) => {
                    let mib = max_mib.unwrap_or(hubnat_runtime::capture::DEFAULT_MAX_MIB);
                    match plane.capture_start(&path, mib.saturating_mul(1 << 20)) {
                        Ok(status) => Response::ok(status),
                        Err(e) => Response::err(e),
                    }
                }
                Ok(Request::CaptureStop) => match plane.capture_stop() {
                    Some(status) => Response::ok(status),
                    None => Response::err("no capture is on"),
                },
                Ok(Request::PortRemove { id }) => match plane.remove_port(id) {
                    Ok(()) => Response::ok(port_rows(plane)),
                    Err(e) => Response::err(e),
                },
                Ok(req) => {
                    let status = matches!(req, Request::Status);
                    let source = match req {
                        Request::Set { .. } => Some("control socket"),
                        Request::Reload => Some("configuration file"),
                        _ => None,
                    };
                    // Counters and session counts as the workers last published them.
                    let reports = if status {
                        plane.published()
                    } else {
                        Vec::new()
                    };
                    let mut r = self.control.handle_with(
                        req,
                        plane.engine,
                        &reports,
                        plane.now,
                        plane.sock,
                        plane.out,
                    );
                    if let Some(source) = source {
                        self.publish_changes(&r, source);
                    }
                    if status && r.ok {
                        r.result["ports"] =
                            serde_json::to_value(port_rows(plane)).expect("serializes");
                        if let Some(c) = plane.capture_status() {
                            r.result["capture"] = serde_json::to_value(c).expect("serializes");
                        }
                    }
                    if let (true, Some((threaded, switches))) = (status && r.ok, plane.napi_state())
                    {
                        r.result["tap_napi"] =
                            serde_json::to_value(NapiView { threaded, switches })
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

    fn close_conn(&mut self, registry: &Registry, mut c: OperatorConn) {
        let _ = registry.deregister(c.stream.source());
        self.freed = true;
    }

    /// Accepts the connections that waited in the listeners' backlogs while every slot was
    /// taken (the listeners are edge-triggered: no new event comes for them).
    fn accept_waiting(&mut self, plane: &mut Plane<'_>) {
        if std::mem::take(&mut self.freed) {
            self.accept(false, plane);
            self.accept(true, plane);
        }
    }

    /// Closes the connections whose idle time is up (one waiting for the workers is not idle,
    /// nor is an event stream, which waits for events by design).
    fn close_idle(&mut self, plane: &Plane<'_>) {
        for slot in 0..self.conns.len() {
            let expired = self.conns[slot].as_ref().is_some_and(|c| {
                c.pending.is_none() && c.events.is_none() && c.idle_deadline <= plane.now
            });
            if let Some(c) = self.conns[slot].take_if(|_| expired) {
                let what = if c.metrics { "metrics" } else { "control" };
                tracing::debug!("{what} connection closed: idle");
                self.close_conn(plane.registry, c);
            }
        }
    }

    /// Writes what `c` has to send, closes it when done and closing, or watches it again.
    fn finish_conn(&mut self, slot: usize, mut c: OperatorConn, registry: &Registry) {
        if write_out(&mut c).is_err() {
            self.close_conn(registry, c);
            return;
        }
        if c.sent == c.outbuf.len() {
            c.outbuf.clear();
            c.sent = 0;
            if c.closing && c.pending.is_none() {
                self.close_conn(registry, c);
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
            if registry
                .reregister(c.stream.source(), token, interest)
                .is_err()
            {
                self.close_conn(registry, c);
                return;
            }
            c.writable_armed = want_write;
        }
        self.conns[slot] = Some(c);
    }
}

impl Operator for Server {
    fn register(&mut self, registry: &Registry) -> io::Result<()> {
        if let Some(r) = &self.reload {
            r.set_nonblocking(true)?;
            registry.register(&mut SourceFd(&r.as_raw_fd()), HUP, Interest::READABLE)?;
        }
        if let Some((l, _)) = &mut self.control_listener {
            registry.register(l, CONTROL, Interest::READABLE)?;
        }
        if let Some(l) = &mut self.metrics_listener {
            registry.register(l, METRICS, Interest::READABLE)?;
        }
        if let Some(h) = &self.events {
            registry.register(&mut SourceFd(&h.wake_fd()), EVENTS, Interest::READABLE)?;
        }
        if let Some(w) = &self.resolv {
            registry.register(&mut SourceFd(&w.fd()), RESOLV, Interest::READABLE)?;
        }
        Ok(())
    }

    fn start(&mut self, plane: &mut Plane<'_>) {
        self.restore_leases(plane.engine, plane.now);
    }

    fn ready(&mut self, token: Token, plane: &mut Plane<'_>) {
        match token {
            CONTROL => self.accept(false, plane),
            METRICS => self.accept(true, plane),
            HUP => self.on_reload(plane),
            RESOLV => self.on_resolv(plane),
            // Drained by `poll`, which runs after this in the same turn.
            EVENTS => {
                if let Some(h) = &self.events {
                    h.clear_wake();
                }
            }
            Token(t) if (FIRST_CONN..FIRST_CONN + MAX_CONNS).contains(&t) => {
                self.on_conn(t - FIRST_CONN, plane)
            }
            _ => {}
        }
        self.accept_waiting(plane);
    }

    /// Answers the requests whose workers have all replied, or whose time is up (with what
    /// came), then the lines that waited behind them.
    fn poll(&mut self, plane: &mut Plane<'_>) {
        self.close_idle(plane);
        self.pump_events(plane.registry);
        for slot in 0..self.conns.len() {
            let ready = self.conns[slot]
                .as_mut()
                .and_then(|c| c.pending.as_mut())
                .is_some_and(|p| p.ready(plane.now));
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
                plane.engine,
                &p.got,
                plane.now,
                plane.sock,
                plane.out,
            );
            serde_json::to_writer(&mut c.outbuf, &resp).expect("responses serialize");
            c.outbuf.push(b'\n');
            self.serve_lines(&mut c, plane);
            self.finish_conn(slot, c, plane.registry);
        }
        self.accept_waiting(plane);
    }

    fn deadline(&self) -> Option<Instant> {
        let conns = self
            .conns
            .iter()
            .flatten()
            .filter_map(|c| match &c.pending {
                Some(p) => Some(p.deadline),
                None if c.events.is_some() => None,
                None => Some(c.idle_deadline),
            })
            .min();
        // Renewals waiting for their write (`before_write` runs after the wake-up's batch).
        let renewals = self
            .leases
            .as_ref()
            .filter(|f| f.renewals_waiting)
            .and_then(|f| f.saved_at)
            .map(|t| t + RENEWALS_EVERY);
        let unsynced = self
            .leases
            .as_ref()
            .and_then(|f| f.unsynced_at)
            .map(|t| t + RENEWALS_EVERY);
        hubnat_core::time::earliest(conns, hubnat_core::time::earliest(renewals, unsynced))
    }

    /// Saves the lease table's changes when a binding changed (before the ACK that made it
    /// leaves), or when renewals wait and the last save is `RENEWALS_EVERY` old (two
    /// comparisons per batch when nothing changed).
    fn before_write(&mut self, engine: &Engine, now: Instant) {
        let Some(f) = &self.leases else {
            return;
        };
        let binding_changed = engine.dhcp.binding_generation() != f.saved_bindings
            || engine.dhcp6.binding_generation() != f.saved_bindings6;
        let renewed = engine.dhcp.generation() != f.saved_generation
            || engine.dhcp6.generation() != f.saved_generation6;
        let due = f
            .saved_at
            .is_none_or(|t| now.saturating_since(t) >= RENEWALS_EVERY);
        let sync_due = f
            .unsynced_at
            .is_some_and(|t| now.saturating_since(t) >= RENEWALS_EVERY);
        if binding_changed || (renewed && due) {
            self.save_lease_changes(engine, now);
        } else if let Some(f) = &mut self.leases {
            f.renewals_waiting = renewed;
            if !sync_due {
                return;
            }
            match f.store.sync() {
                Ok(()) => f.unsynced_at = None,
                Err(e) => {
                    tracing::warn!(
                        "cannot sync lease journal {}: {e}; writing the whole table",
                        f.store.journal_path().display()
                    );
                    self.compact_leases(engine, now);
                }
            }
        }
    }

    fn stop(&mut self) {
        if let Some((_, path)) = &self.control_listener {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Writes what it can of `c`'s output now; the rest waits for the socket to be writable.
fn write_out(c: &mut OperatorConn) -> io::Result<()> {
    while c.sent < c.outbuf.len() {
        match c.stream.write(&c.outbuf[c.sent..]) {
            Ok(0) => break,
            Ok(n) => c.sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One HTTP/1.0 answer per connection, once the request head is in.
impl Server {
    /// Applies a configuration whose forwards changed: the listeners are opened first, so that
    /// a port already taken is refused with the reason and nothing changes.
    fn change_forwards(&mut self, raw: RawConfig, save: bool, plane: &mut Plane<'_>) -> Response {
        let cfg = match crate::machine::validate(&raw) {
            Ok(c) => c,
            Err(e) => return Response::err(e),
        };
        let failed = plane.sync_forwards(&cfg.forwards);
        if let Some((f, e)) = failed.into_iter().next() {
            let now_wanted = plane.engine.ctx.cfg.forwards.clone();
            plane.sync_forwards(&now_wanted);
            return Response::err(format!("forward {f}: {e}"));
        }
        let r = self.control.apply_raw(
            raw,
            save,
            "control socket",
            plane.engine,
            plane.now,
            plane.sock,
            plane.out,
        );
        if !r.ok {
            let now_wanted = plane.engine.ctx.cfg.forwards.clone();
            plane.sync_forwards(&now_wanted);
            return r;
        }
        self.publish_changes(&r, "control socket");
        Response::ok(forward_rows(plane))
    }
}

/// A forward added at run time that names its guest by host name or MAC must name one that
/// is there now (a typo is caught at once); by address it may wait for a guest with a static
/// address hubnat has not seen yet. In the configuration file any is accepted.
fn unknown_guest(new: &RawForward, index: usize, plane: &Plane<'_>) -> Option<String> {
    use hubnat_core::forward::GuestRef;
    let f = new.validate(index).ok()?;
    match &f.guest {
        GuestRef::Ip(_) => None,
        g if plane.engine.find_guest(g).is_some() => None,
        GuestRef::Name(n) => Some(format!(
            "forward {f}: no guest has the host name `{n}` (the name its DHCP client sent) now"
        )),
        GuestRef::Mac(m) => Some(format!(
            "forward {f}: no guest with MAC {m} has a lease now"
        )),
    }
}

fn forward_rows(plane: &Plane<'_>) -> Vec<ForwardRow> {
    plane
        .forwards()
        .into_iter()
        .map(|v| {
            let raw = v.forward.to_raw();
            ForwardRow {
                id: v.id,
                proto: raw.proto,
                listen: raw.listen,
                to: raw.to,
                guest: plane
                    .engine
                    .find_guest(&v.forward.guest)
                    .map(|(ip, _)| ip.to_string()),
                accepted: v.accepted,
                refused: v.refused,
            }
        })
        .collect()
}

fn port_rows(plane: &Plane<'_>) -> Vec<PortRow> {
    plane.ports().into_iter().map(PortRow::from).collect()
}

/// Opens the port `spec` names and adds it to the segment; the answer is the ports then, or
/// why it could not be (the segment is unchanged).
fn add_port(spec: &str, plane: &mut Plane<'_>) -> Response {
    use hubnat_runtime::port::spec::PortSpec;
    let spec: PortSpec = match spec.parse() {
        Ok(s) => s,
        Err(e) => return Response::err(e),
    };
    if matches!(spec, PortSpec::Fd(_)) {
        return Response::err("fd: ports are given on hubnat run's command line only");
    }
    let link = match spec.open(plane.engine.ctx.cfg.nat.mtu) {
        Ok(l) => l,
        Err(e) => return Response::err(e),
    };
    match plane.add_port(link) {
        Ok(_) => Response::ok(port_rows(plane)),
        Err(e) => Response::err(format!("port {spec}: {e}")),
    }
}

fn answer_metrics(c: &mut OperatorConn, plane: &mut Plane<'_>) {
    if !c.outbuf.is_empty() || c.inbuf.is_empty() {
        return;
    }
    // The head ends at an empty line; only what arrived since the last look is searched (from
    // 3 bytes before it, where an end could straddle two reads).
    let from = c.scanned.saturating_sub(3);
    let tail = &c.inbuf[from..];
    let head_done =
        tail.windows(4).any(|w| w == b"\r\n\r\n") || tail.windows(2).any(|w| w == b"\n\n");
    c.scanned = c.inbuf.len();
    if !head_done && !c.closing {
        return;
    }
    let first = c.inbuf.split(|&b| b == b'\n').next().unwrap_or_default();
    let first = String::from_utf8_lossy(first);
    let mut words = first.split_whitespace();
    let (method, target) = (words.next(), words.next());
    let (status, body) = match (method, target) {
        (Some("GET"), Some("/metrics" | "/")) => {
            let reports = plane.published();
            let mut body = metrics::render_with(plane.engine, &reports, plane.now);
            if let Some(state) = plane.napi_state() {
                metrics::render_napi(&mut body, state);
            }
            metrics::render_ports(&mut body, &port_rows(plane));
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

    fn lease_server(path: &Path) -> Server {
        Server::new(ServerOptions {
            raw: RawConfig::default(),
            config_path: None,
            control: None,
            metrics: None,
            reload: None,
            lease_file: Some(path.to_owned()),
            lease_journal_bytes: None,
            events: None,
            resolv: None,
        })
    }

    #[test]
    fn a_dhcpv6_lease_is_saved_before_its_reply_and_restored_at_start() {
        use hubnat_core::config::Dhcpv6Mode;
        use hubnat_core::testing::{dhcpv6_rapid_solicit, setup_with, GUEST_MAC, T0};
        let d = std::env::temp_dir().join(format!("hubnat-server-v6-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let path = d.join(crate::leases::LEASE_FILE);
        let stateful = |c: &mut hubnat_core::config::Config| c.ipv6.dhcpv6 = Dhcpv6Mode::Stateful;
        let duid = [0u8, 3, 0, 1, 2, 0, 0, 0, 0, 7];

        let mut s = lease_server(&path);
        let (mut e, mut h, mut out) = setup_with(stateful);
        s.restore_leases(&mut e, T0);
        e.handle_frame(
            T0,
            &dhcpv6_rapid_solicit(GUEST_MAC, &duid, 3),
            &mut h,
            &mut out,
        );
        assert_eq!(out.len(), 1, "the Reply");
        s.before_write(&e, T0);
        let before: Vec<_> = e
            .dhcp6
            .leases()
            .map(|l| (l.id, l.ip, l.mac, l.iaid))
            .collect();
        assert_eq!(before.len(), 1);

        // A restart: the journal's record is replayed onto the snapshot.
        let mut s2 = lease_server(&path);
        let (mut e2, _, _) = setup_with(stateful);
        s2.restore_leases(&mut e2, T0);
        let after: Vec<_> = e2
            .dhcp6
            .leases()
            .map(|l| (l.id, l.ip, l.mac, l.iaid))
            .collect();
        assert_eq!(after, before);
        assert_eq!(e2.dhcp6.leases().next().unwrap().duid, duid);
        // And the table the control socket lists shows it.
        let rows = s2.control.dhcp_table(&e2);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].duid.as_deref(), Some("00030001020000000007"));
        assert_eq!(rows[0].iaid, Some(3));
        assert_eq!(rows[0].mac, GUEST_MAC.dashed());
        std::fs::remove_dir_all(&d).unwrap();
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
}
