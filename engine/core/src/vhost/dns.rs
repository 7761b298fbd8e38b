//! The DNS relay of the virtual host (seed 3.7.4, "DNS Redirect"): UDP queries to the virtual
//! host's port 53 are forwarded to the real machine's resolvers (`cfg.dns.upstream`) and the answers
//! returned to the guest from the virtual host's port 53. The DNS address (`cfg.dns.address`) is
//! the virtual host's too: a query sent there is answered from there, since resolvers drop
//! answers from any other address than the one they asked.
//!
//! Every relayed query gets a fresh random ID, unique among the queries in flight, so that
//! guests cannot collide with one another and an off-path sender cannot guess what to forge.
//! Each upstream has one connected UDP socket (opened on first use); an answer counts only when
//! its ID is in flight *to that upstream* and it is a response, and then it is given back its
//! original ID. A query not answered within `cfg.dns.query_timeout` is sent once to the next
//! upstream (when there is one) and after that forgotten: the guest's resolver retries on its
//! own. With no usable upstream (none configured, or all inside the virtual network)
//! the guest gets SERVFAIL at once.
//!
//! Some names are answered here and never relayed: the guests' and the operator's (`names.rs`
//! says which). Those answers are authoritative (AA), carry the question as the guest wrote it
//! (its case too), and hold no NAT-table row since nothing is in flight.
//!
//! The NAT table shows one `Proto::Dns` row per query in flight (guest address and port, the
//! virtual host's address and port 53 it was sent to), and each is logged as a UDP session, as
//! SecureNAT's log does.
//!
//! Batched (`Engine::set_batching`, as the runtime runs), queries wait for the batch's end and
//! leave for their upstream in runs of one size, one UDP_SEGMENT send each (`Outgoing`); the
//! answers read from an upstream's socket one after another, of one size and for one guest
//! socket, go back as one UDP super-frame where the port takes them (`Ctx::udp_gso`).
//!
//! Bounds: `MAX_PENDING` queries in flight (`MAX_PENDING_PER_GUEST` for one guest); queries longer than `MAX_QUERY` are refused; the
//! deadline heap is rebuilt from the queries in flight when answered ones' stale entries pile up.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::net::{IpAddr, SocketAddr};

use rand::Rng;
use smoltcp::wire::UDP_HEADER_LEN;

use crate::config::Config;
use crate::event::Event;
use crate::nat::session::{Direction, Proto, SessionInfo};
use crate::nat::udp::{send_run, send_to_guest, HeldRun, Received, Run, MAX_UDP_PAYLOAD};
use crate::output::FrameBatch;
use crate::sockio::{SockEvent, SockId, SockIo, READ_BUDGET};
use crate::stats::DropReason;
use crate::time::{earliest, Instant};
use crate::vhost::dhcp::DhcpServer;
use crate::vhost::names::{Answer, Names, TYPE_A, TYPE_AAAA, TYPE_PTR};
use crate::wire::ip_header_len;
use crate::Ctx;

/// Queries in flight at once.
pub(crate) const MAX_PENDING: usize = 8192;
/// Queries in flight for one guest: a guest's flood of queries leaves room for the others',
/// and a resolver load of 1,000 queries outstanding (dnsperf's stress setting) fits.
pub(crate) const MAX_PENDING_PER_GUEST: usize = MAX_PENDING / 4;
/// The longest query relayed (EDNS queries are well under this).
pub(crate) const MAX_QUERY: usize = 4096;
const HEADER_LEN: usize = 12;
const QR: u8 = 0x80;
const RCODE_SERVFAIL: u8 = 2;
const RCODE_NXDOMAIN: u8 = 3;
/// Authoritative answer: a local name is this relay's own.
const AA: u8 = 0x04;
const CLASS_IN: u16 = 1;
/// The receive buffer asked for on an upstream's socket: every guest's answers arrive on it,
/// and a burst of a thousand (one resolver's outstanding queries answered at once) overflowed
/// the host's default and was lost there.
const RELAY_RCVBUF: usize = 4 << 20;
/// Spare query buffers kept for reuse.
const POOL: usize = 64;
/// The longest query that joins a run to its upstream (`Outgoing`): one that crosses any IPv4
/// path whole (576 bytes with its headers), so that no route's MTU refuses the run's segments.
const RUN_MAX_QUERY: usize = 512;

/// The resolver a guest's DNS over TCP to the virtual host is sent to: the first usable upstream.
pub(crate) fn upstream_for_tcp(ctx: &Ctx) -> Option<SocketAddr> {
    ctx.cfg
        .dns
        .upstream
        .iter()
        .copied()
        .find(|a| usable(&ctx.cfg, a))
}

/// Whether the relay can use upstream `a`: not unspecified, not port 0, not inside the virtual
/// network (that would loop back to the guests), and not IPv6 link-local (which needs an
/// interface the relay's sockets do not name).
fn usable(cfg: &Config, a: &SocketAddr) -> bool {
    let inside = match a.ip() {
        std::net::IpAddr::V4(ip) => cfg.in_subnet(ip),
        std::net::IpAddr::V6(ip) => cfg.ipv6.in_prefix(ip) || crate::wire::is_link_local(ip),
    };
    !inside && !a.ip().is_unspecified() && a.port() != 0
}

/// Whether a guest's DNS query (a UDP payload to the virtual host's port 53) must be handled by
/// the engine that has the lease table (the control thread's): its name may be a guest's, whose
/// address only that engine knows (one label, or the DHCP domain or a name under it), or it is
/// a reverse name. Any other query is answered alike by every engine, from the configuration
/// (`[dns] hosts`) or by relaying it, so a worker may take it and spare the hand-over. Queries
/// that are not plain ones (several questions, an odd opcode) are relayed everywhere: no.
pub fn needs_lease_table(cfg: &Config, query: &[u8]) -> bool {
    let Some(q) = Question::parse(query) else {
        return false;
    };
    let name = q.name.as_str();
    let reverse = ["in-addr.arpa", "ip6.arpa"]
        .iter()
        .any(|zone| name == *zone || name.strip_suffix(zone).is_some_and(|r| r.ends_with('.')));
    if !name.contains('.') || reverse {
        return true;
    }
    cfg.dhcp.domain.as_deref().is_some_and(|d| {
        let d = d.trim().trim_end_matches('.');
        let under = name.len() > d.len()
            && name.as_bytes()[name.len() - d.len() - 1] == b'.'
            && name[name.len() - d.len()..].eq_ignore_ascii_case(d);
        !d.is_empty() && (under || name.eq_ignore_ascii_case(d))
    })
}

/// Where a query a guest sent over TCP goes (`DnsRelay::route_tcp_query`).
#[derive(Debug, PartialEq, Eq)]
pub enum TcpDnsRoute {
    /// Answered here: the message to send back.
    Answer(Vec<u8>),
    /// Not a local name: for this upstream resolver.
    Relay(SocketAddr),
}

struct Upstream {
    addr: SocketAddr,
    sock: Option<SockId>,
}

/// Queries for one upstream held until the batch's end (`DnsRelay::flush`), to leave in one
/// UDP_SEGMENT send that the host's stack cuts at the resolver's socket: a burst of queries
/// (a resolver's outstanding ones, refilled as answers come back) costs the stack's route and
/// device work once per run rather than per query. `ids` are their relay IDs in order (to
/// send them on elsewhere if the upstream refuses the run).
struct Outgoing {
    upstream: usize,
    held: HeldRun,
    ids: Vec<u16>,
}

struct Pending {
    guest: SocketAddr,
    orig_id: u16,
    /// Index of the upstream it was last sent to.
    upstream: usize,
    deadline: Instant,
    /// The query as relayed (new ID), kept while another upstream remains to be tried.
    query: Option<Vec<u8>>,
    info: SessionInfo,
}

pub(crate) struct DnsRelay {
    upstreams: Vec<Upstream>,
    pending: HashMap<u16, Pending>,
    /// Queries in flight per guest address.
    pending_of: HashMap<IpAddr, usize>,
    /// (deadline, relay ID, session id); stale entries are skipped when popped.
    timers: BinaryHeap<Reverse<(Instant, u16, u32)>>,
    pool: Vec<Vec<u8>>,
    /// Upstream sockets that still had answers when their read budget ran out.
    rearm: Vec<SockId>,
    rearm_scratch: Vec<SockId>,
    /// Scratch for a query, or for answers: UDP header room, then the DNS message, or the
    /// messages of a run of answers for one super-frame; twice the largest, so that an answer
    /// read behind a run always fits whole.
    buf: Box<[u8]>,
    /// See `Engine::set_batching`: queries wait for `flush` in `outgoing`.
    batching: bool,
    /// Runs of queries waiting for the batch's end, at most one per upstream.
    outgoing: Vec<Outgoing>,
    /// The names answered here.
    names: Names,
}

impl DnsRelay {
    pub(crate) fn new(_cfg: &Config) -> DnsRelay {
        DnsRelay {
            upstreams: Vec::new(),
            pending: HashMap::new(),
            pending_of: HashMap::new(),
            timers: BinaryHeap::new(),
            pool: Vec::new(),
            rearm: Vec::new(),
            rearm_scratch: Vec::new(),
            buf: vec![0u8; UDP_HEADER_LEN + 2 * MAX_UDP_PAYLOAD].into_boxed_slice(),
            batching: false,
            outgoing: Vec::new(),
            names: Names::default(),
        }
    }

    /// The configuration changed: the local names are looked up afresh.
    pub(crate) fn reconfigured(&mut self) {
        self.names.invalidate();
    }

    /// Queries in flight.
    pub(crate) fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Whether `sock` is one of the upstream sockets.
    pub(crate) fn owns(&self, sock: SockId) -> bool {
        self.upstreams.iter().any(|u| u.sock == Some(sock))
    }

    /// See `Engine::set_batching`.
    pub(crate) fn set_batching(&mut self, on: bool) {
        self.batching = on;
    }

    /// Ends a batch: sends every run of queries still waiting.
    pub(crate) fn flush(&mut self, ctx: &mut Ctx, io: &mut impl SockIo) {
        while let Some(o) = self.outgoing.pop() {
            self.send_outgoing(o, ctx, io);
        }
    }

    /// Shutdown: closes the upstream sockets and forgets the queries in flight.
    pub(crate) fn close_all(&mut self, io: &mut impl SockIo) {
        self.drop_outgoing();
        for u in &mut self.upstreams {
            if let Some(s) = u.sock.take() {
                io.close(s);
            }
        }
        self.pending.clear();
        self.pending_of.clear();
        self.rearm.clear();
    }

    /// The socket to upstream `i` if it is open.
    #[cfg(test)]
    pub(crate) fn upstream_socket(&self, i: usize) -> Option<SockId> {
        self.upstreams.get(i).and_then(|u| u.sock)
    }

    /// Follows the configuration's upstream list (the runtime may fill or replace it); a change
    /// closes the old sockets and forgets the queries in flight.
    fn sync(&mut self, ctx: &mut Ctx, io: &mut impl SockIo) {
        let wanted = ctx
            .cfg
            .dns
            .upstream
            .iter()
            .copied()
            .filter(|a| usable(&ctx.cfg, a));
        if wanted.clone().eq(self.upstreams.iter().map(|u| u.addr)) {
            return;
        }
        self.drop_outgoing();
        for u in self.upstreams.drain(..) {
            if let Some(s) = u.sock {
                io.close(s);
            }
        }
        self.pending_of.clear();
        for (_, p) in self.pending.drain() {
            ctx.events.push(Event::SessionDeleted {
                proto: Proto::Dns,
                id: p.info.id,
            });
        }
        self.timers.clear();
        self.upstreams = wanted.map(|addr| Upstream { addr, sock: None }).collect();
    }

    /// The socket to upstream `i`, opened on first use.
    fn socket(&mut self, i: usize, io: &mut impl SockIo) -> io::Result<SockId> {
        let u = &mut self.upstreams[i];
        if let Some(s) = u.sock {
            return Ok(s);
        }
        let s = io.udp_open(u.addr)?;
        io.udp_rcvbuf(s, RELAY_RCVBUF);
        u.sock = Some(s);
        Ok(s)
    }

    /// A query of `guest` is no longer in flight.
    fn answered(&mut self, guest: IpAddr) {
        if let Some(n) = self.pending_of.get_mut(&guest) {
            *n -= 1;
            if *n == 0 {
                self.pending_of.remove(&guest);
            }
        }
    }

    /// Relays a guest's query (the UDP payload it sent to `server`, the virtual host's port 53
    /// at one of its addresses).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn handle_query(
        &mut self,
        now: Instant,
        ctx: &mut Ctx,
        dhcp: &DhcpServer,
        guest: SocketAddr,
        server: SocketAddr,
        query: &[u8],
        io: &mut impl SockIo,
        out: &mut FrameBatch,
    ) -> Result<(), DropReason> {
        // Lent out of `self` for the call, which needs `self` too; an empty box allocates nothing.
        let mut buf = std::mem::take(&mut self.buf);
        let r = match self.local_answer(now, ctx, dhcp, query, &mut buf[UDP_HEADER_LEN..]) {
            Some(len) => send_to_guest(ctx, out, &mut buf, len, server, guest),
            None => self.relay_query(now, ctx, (guest, server), query, io, out, &mut buf),
        };
        self.buf = buf;
        r
    }

    /// `handle_query`, with `buf` as scratch space at least as large as a UDP datagram.
    #[allow(clippy::too_many_arguments)]
    fn relay_query(
        &mut self,
        now: Instant,
        ctx: &mut Ctx,
        (guest, host): (SocketAddr, SocketAddr),
        query: &[u8],
        io: &mut impl SockIo,
        out: &mut FrameBatch,
        buf: &mut [u8],
    ) -> Result<(), DropReason> {
        if query.len() < HEADER_LEN || query.len() > MAX_QUERY {
            return Err(DropReason::Malformed);
        }
        if query[2] & QR != 0 {
            // A response sent to the relay: not a question.
            return Err(DropReason::Unsupported);
        }
        self.sync(ctx, io);
        if self.upstreams.is_empty() {
            let len = servfail(query, &mut buf[UDP_HEADER_LEN..]);
            return send_to_guest(ctx, out, buf, len, host, guest);
        }
        if self.pending.len() >= MAX_PENDING
            || self
                .pending_of
                .get(&guest.ip())
                .is_some_and(|&n| n >= MAX_PENDING_PER_GUEST)
        {
            return Err(DropReason::Limit);
        }
        let id = self.fresh_id(ctx)?;
        let relayed = &mut buf[..query.len()];
        relayed.copy_from_slice(query);
        relayed[..2].copy_from_slice(&id.to_be_bytes());
        // Batched, the first upstream that can be opened (its send, at the batch's end, moves
        // on if it fails); else the first that takes the query now.
        let deferred = self.batching && relayed.len() <= RUN_MAX_QUERY;
        let upstream = if deferred {
            (0..self.upstreams.len()).find(|&i| self.socket(i, io).is_ok())
        } else {
            self.send_from(0, relayed, io)
        };
        let Some(upstream) = upstream else {
            return Err(DropReason::QueueFull);
        };
        let query_copy = (upstream + 1 < self.upstreams.len()).then(|| {
            let mut v = self.pool.pop().unwrap_or_default();
            v.clear();
            v.extend_from_slice(relayed);
            v
        });
        let sid = ctx.next_session_id();
        ctx.events.push(Event::SessionCreated {
            proto: Proto::Dns,
            id: sid,
            src: guest,
            dst: host,
        });
        let deadline = now + ctx.cfg.dns.query_timeout;
        *self.pending_of.entry(guest.ip()).or_insert(0) += 1;
        self.pending.insert(
            id,
            Pending {
                guest,
                orig_id: u16::from_be_bytes([query[0], query[1]]),
                upstream,
                deadline,
                query: query_copy,
                info: SessionInfo {
                    bytes_to_host: query.len() as u64,
                    packets_to_host: 1,
                    ..SessionInfo::opened(
                        sid,
                        Proto::Dns,
                        (guest, host),
                        Direction::Out,
                        now,
                        "Querying",
                    )
                },
            },
        );
        self.timers.push(Reverse((deadline, id, sid)));
        if deferred {
            self.defer(upstream, id, relayed, ctx, io);
        }
        if self.timers.len() > 4 * MAX_PENDING {
            // Answered queries leave their deadlines behind until they pop; under a high query
            // rate, rebuild from the queries still in flight so the heap stays bounded.
            self.timers = self
                .pending
                .iter()
                .map(|(&id, p)| Reverse((p.deadline, id, p.info.id)))
                .collect();
        }
        Ok(())
    }

    /// Sends `datagram` to the first upstream from `first` on that can be opened and takes it;
    /// which one.
    fn send_from(&mut self, first: usize, datagram: &[u8], io: &mut impl SockIo) -> Option<usize> {
        for i in first..self.upstreams.len() {
            let Ok(sock) = self.socket(i, io) else {
                continue;
            };
            match io.udp_send(sock, datagram) {
                Ok(_) => return Some(i),
                Err(e) => tracing::debug!("DNS query to {}: {e}", self.upstreams[i].addr),
            }
        }
        None
    }

    /// Holds query `id` (`datagram`, as relayed) for the batch's end: it joins the run waiting
    /// for its upstream where it can, else that run leaves now and a new one starts.
    fn defer(
        &mut self,
        upstream: usize,
        id: u16,
        datagram: &[u8],
        ctx: &mut Ctx,
        io: &mut impl SockIo,
    ) {
        if let Some(k) = self.outgoing.iter().position(|o| o.upstream == upstream) {
            let o = &mut self.outgoing[k];
            if o.held.join(datagram) {
                o.ids.push(id);
                return;
            }
            let o = self.outgoing.swap_remove(k);
            self.send_outgoing(o, ctx, io);
        }
        let buf = self.pool.pop().unwrap_or_default();
        self.outgoing.push(Outgoing {
            upstream,
            held: HeldRun::new(buf, datagram),
            ids: vec![id],
        });
    }

    /// Sends a run of queries to its upstream; if the upstream refuses it, each query goes on
    /// to the next upstream that takes it, as a query sent at once would, or is given up.
    fn send_outgoing(&mut self, o: Outgoing, ctx: &mut Ctx, io: &mut impl SockIo) {
        let (run, payload) = (&o.held.run, &o.held.payload);
        let sent = match self.upstreams.get(o.upstream).and_then(|u| u.sock) {
            Some(s) if run.datagrams > 1 => io.udp_send_segments(s, payload, run.segment),
            Some(s) => io.udp_send(s, payload),
            None => Err(io::ErrorKind::NotConnected.into()),
        };
        if let Err(e) = sent {
            if let Some(u) = self.upstreams.get(o.upstream) {
                tracing::debug!("DNS queries to {}: {e}", u.addr);
            }
            for (datagram, &id) in payload.chunks(run.segment.max(1)).zip(&o.ids) {
                let next = self.send_from(o.upstream + 1, datagram, io);
                let Some(p) = self.pending.get_mut(&id) else {
                    continue;
                };
                match next {
                    Some(i) => {
                        p.upstream = i;
                        if i + 1 >= self.upstreams.len() {
                            let q = p.query.take();
                            self.recycle(q);
                        }
                    }
                    None => {
                        let Some(p) = self.pending.remove(&id) else {
                            continue;
                        };
                        self.answered(p.guest.ip());
                        self.recycle(p.query);
                        ctx.events.push(Event::SessionDeleted {
                            proto: Proto::Dns,
                            id: p.info.id,
                        });
                        ctx.stats.drop(DropReason::QueueFull);
                    }
                }
            }
        }
        self.recycle(Some(o.held.payload));
    }

    /// Forgets the runs of queries waiting (their upstreams are gone).
    fn drop_outgoing(&mut self) {
        while let Some(o) = self.outgoing.pop() {
            self.recycle(Some(o.held.payload));
        }
    }

    /// The answer to `query` if it asks for a local name, written to `out`; its length.
    fn local_answer(
        &mut self,
        now: Instant,
        ctx: &mut Ctx,
        dhcp: &DhcpServer,
        query: &[u8],
        out: &mut [u8],
    ) -> Option<usize> {
        let q = Question::parse(query)?;
        let answer = (self.names).lookup(now, (&ctx.cfg, dhcp), &q.name, q.qtype, &mut ctx.sources);
        write_answer(query, &q, &answer, out)
    }

    /// What to do with one query a guest sent over TCP (the message without its length
    /// prefix): answer it with the message returned (a local name, or SERVFAIL when no upstream
    /// is usable), or pass it to the upstream returned. `None`: not a query at all.
    pub(crate) fn route_tcp_query(
        &mut self,
        now: Instant,
        ctx: &mut Ctx,
        dhcp: &DhcpServer,
        query: &[u8],
    ) -> Option<TcpDnsRoute> {
        if query.len() < HEADER_LEN || query[2] & QR != 0 {
            return None;
        }
        // A TCP message can be longer than any datagram: answers here are short, so a query
        // that long is never a local name's.
        let mut out = vec![0u8; query.len().min(MAX_QUERY) + 512];
        if query.len() <= MAX_QUERY {
            if let Some(len) = self.local_answer(now, ctx, dhcp, query, &mut out) {
                out.truncate(len);
                return Some(TcpDnsRoute::Answer(out));
            }
        }
        Some(match upstream_for_tcp(ctx) {
            Some(up) => TcpDnsRoute::Relay(up),
            None => {
                let len = servfail(query, &mut out);
                out.truncate(len);
                TcpDnsRoute::Answer(out)
            }
        })
    }

    /// A random ID no query in flight has.
    fn fresh_id(&mut self, ctx: &mut Ctx) -> Result<u16, DropReason> {
        // At most MAX_PENDING of 65536 IDs are taken: a few draws always suffice in practice.
        for _ in 0..64 {
            let id = ctx.rng.random::<u16>();
            if !self.pending.contains_key(&id) {
                return Ok(id);
            }
        }
        Err(DropReason::Limit)
    }

    /// Handles `ev` if it is for an upstream socket; else gives it back.
    pub(crate) fn handle_sock_event(
        &mut self,
        now: Instant,
        ctx: &mut Ctx,
        ev: SockEvent,
        io: &mut impl SockIo,
        out: &mut FrameBatch,
    ) -> Option<SockEvent> {
        match ev {
            SockEvent::Readable(sock) => {
                let Some(more) = self.read_socket(now, ctx, sock, io, out) else {
                    return Some(ev);
                };
                if more && !self.rearm.contains(&sock) {
                    self.rearm.push(sock);
                }
                None
            }
            // Failures surface on the reads, and queries are sent at once or not at all.
            SockEvent::Failed(sock, _) | SockEvent::Writable(sock) if self.owns(sock) => None,
            _ => Some(ev),
        }
    }

    /// Reads answers from `sock` if it is an upstream socket: `None` if it is not one of ours,
    /// else whether data may remain after the read budget.
    fn read_socket(
        &mut self,
        now: Instant,
        ctx: &mut Ctx,
        sock: SockId,
        io: &mut impl SockIo,
        out: &mut FrameBatch,
    ) -> Option<bool> {
        let mut buf = std::mem::take(&mut self.buf);
        let more = self.read_answers(now, ctx, sock, io, out, &mut buf);
        self.buf = buf;
        more
    }

    fn read_answers(
        &mut self,
        now: Instant,
        ctx: &mut Ctx,
        sock: SockId,
        io: &mut impl SockIo,
        out: &mut FrameBatch,
        buf: &mut [u8],
    ) -> Option<bool> {
        let idx = self.upstreams.iter().position(|u| u.sock == Some(sock))?;
        // Answers for one guest socket that follow each other with one size, each fitting
        // the guest's MTU whole, leave as one UDP super-frame where the port takes them.
        let mut run = Run::default();
        let mut run_ends = None;
        let mut more = true;
        for _ in 0..READ_BUDGET {
            let at = UDP_HEADER_LEN + run.bytes;
            let n = match io.udp_recv(sock, &mut buf[at..at + MAX_UDP_PAYLOAD]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    more = false;
                    break;
                }
                Err(e) => {
                    // Refused (no resolver there) or failed: the queries time out and move on.
                    tracing::debug!("DNS upstream {}: {e}", self.upstreams[idx].addr);
                    if e.kind() == io::ErrorKind::ConnectionRefused {
                        continue;
                    }
                    more = false;
                    break;
                }
            };
            let ends = match self.answer(now, ctx, idx, &mut buf[at..at + n]) {
                Ok(ends) => ends,
                Err(why) => {
                    ctx.stats.drop(why);
                    continue;
                }
            };
            let whole = (ctx.cfg.nat.mtu as usize)
                .saturating_sub(UDP_HEADER_LEN + ip_header_len(ends.0.ip()));
            let joins = ctx.udp_gso && n <= whole;
            let r = Received::of((n, 0));
            if joins && run_ends == Some(ends) && run.takes(r) {
                run.add(r);
                continue;
            }
            // It cannot join the run: the run leaves first, and it takes its place.
            if let Some(prev) = run_ends.take() {
                send_run(ctx, out, buf, &run, (prev.0, prev.1, None));
                buf.copy_within(at..at + n, UDP_HEADER_LEN);
                run = Run::default();
            }
            if joins {
                run.add(r);
                run_ends = Some(ends);
            } else if let Err(why) = send_to_guest(ctx, out, buf, n, ends.0, ends.1) {
                ctx.stats.drop(why);
            }
        }
        if let Some(prev) = run_ends {
            send_run(ctx, out, buf, &run, (prev.0, prev.1, None));
        }
        Some(more)
    }

    /// Takes `msg`, a message from `upstream`, as the answer to the query in flight that it
    /// names, and gives it that query's ID: from where and to whom it goes back.
    fn answer(
        &mut self,
        now: Instant,
        ctx: &mut Ctx,
        upstream: usize,
        msg: &mut [u8],
    ) -> Result<(SocketAddr, SocketAddr), DropReason> {
        if msg.len() < HEADER_LEN {
            return Err(DropReason::Malformed);
        }
        let id = u16::from_be_bytes([msg[0], msg[1]]);
        let ours = self
            .pending
            .get(&id)
            .is_some_and(|p| p.upstream == upstream && msg[2] & QR != 0);
        if !ours {
            // Late, forged, or from the wrong resolver.
            return Err(DropReason::Foreign);
        }
        let Some(mut p) = self.pending.remove(&id) else {
            return Err(DropReason::Foreign);
        };
        self.answered(p.guest.ip());
        msg[..2].copy_from_slice(&p.orig_id.to_be_bytes());
        p.info.last_used = now;
        ctx.events.push(Event::SessionDeleted {
            proto: Proto::Dns,
            id: p.info.id,
        });
        self.recycle(p.query.take());
        // From where the guest sent it (its `dst` row in the NAT table).
        Ok((p.info.dst, p.guest))
    }

    fn recycle(&mut self, v: Option<Vec<u8>>) {
        if let Some(v) = v {
            if self.pool.len() < POOL {
                self.pool.push(v);
            }
        }
    }

    pub(crate) fn sessions(&self, into: &mut Vec<SessionInfo>) {
        into.extend(self.pending.values().map(|p| p.info.clone()));
    }

    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        let due_now = (!self.rearm.is_empty()).then_some(Instant::ZERO);
        earliest(due_now, self.timers.peek().map(|r| r.0 .0))
    }

    /// Reads the upstream sockets left with answers, then sends the queries past their
    /// deadline to the next upstream once, and forgets them after that.
    pub(crate) fn handle_timeout(
        &mut self,
        now: Instant,
        ctx: &mut Ctx,
        io: &mut impl SockIo,
        out: &mut FrameBatch,
    ) {
        std::mem::swap(&mut self.rearm, &mut self.rearm_scratch);
        let mut list = std::mem::take(&mut self.rearm_scratch);
        for sock in list.drain(..) {
            if self.read_socket(now, ctx, sock, io, out) == Some(true)
                && !self.rearm.contains(&sock)
            {
                self.rearm.push(sock);
            }
        }
        self.rearm_scratch = list;

        while let Some(&Reverse((deadline, id, sid))) = self.timers.peek() {
            if deadline > now {
                break;
            }
            self.timers.pop();
            let live = self
                .pending
                .get(&id)
                .is_some_and(|p| p.info.id == sid && p.deadline == deadline);
            if !live {
                continue;
            }
            let Some(mut p) = self.pending.remove(&id) else {
                continue;
            };
            if let Some(query) = p.query.take() {
                let next = p.upstream + 1;
                let sent = next < self.upstreams.len()
                    && self
                        .socket(next, io)
                        .and_then(|s| io.udp_send(s, &query))
                        .is_ok();
                self.recycle(Some(query));
                if sent {
                    p.upstream = next;
                    p.deadline = now + ctx.cfg.dns.query_timeout;
                    p.info.packets_to_host += 1;
                    self.timers.push(Reverse((p.deadline, id, sid)));
                    self.pending.insert(id, p);
                    continue;
                }
            }
            self.answered(p.guest.ip());
            ctx.events.push(Event::SessionDeleted {
                proto: Proto::Dns,
                id: p.info.id,
            });
        }
    }
}

/// Writes a SERVFAIL answer to `query` into `out`; returns its length. The question is echoed
/// when it can be delimited, else the answer carries the header alone.
fn servfail(query: &[u8], out: &mut [u8]) -> usize {
    let qdcount = u16::from_be_bytes([query[4], query[5]]);
    let question_end = (qdcount == 1).then(|| question_end(query)).flatten();
    let len = question_end.unwrap_or(HEADER_LEN);
    out[..len].copy_from_slice(&query[..len]);
    out[2] = QR | (query[2] & 0x79); // opcode and RD kept, AA and TC cleared
    out[3] = 0x80 | RCODE_SERVFAIL; // RA
    let qd = u16::from(question_end.is_some());
    out[4..6].copy_from_slice(&qd.to_be_bytes());
    out[6..12].fill(0);
    len
}

/// The one question of a standard query, as the local names are looked up.
struct Question {
    /// Lower case, dots between labels, no trailing dot.
    name: String,
    qtype: u16,
    /// Where the question ends in the query.
    end: usize,
}

impl Question {
    /// The question of `msg` if it is one the local names could answer: a standard query
    /// (opcode 0) with one question of class IN whose name is plain ASCII without compression.
    fn parse(msg: &[u8]) -> Option<Question> {
        if msg.len() < HEADER_LEN || msg[2] & (QR | 0x78) != 0 || msg[4..6] != [0, 1] {
            return None;
        }
        let mut name = String::new();
        let mut i = HEADER_LEN;
        loop {
            let l = *msg.get(i)? as usize;
            i += 1;
            if l == 0 {
                break;
            }
            if l & 0xc0 != 0 || name.len() + l + 1 > 255 {
                return None;
            }
            let label = msg.get(i..i + l)?;
            // A dot inside a label would make two names look alike.
            if !label.iter().all(|&b| b.is_ascii_graphic() && b != b'.') {
                return None;
            }
            if !name.is_empty() {
                name.push('.');
            }
            name.extend(label.iter().map(|&b| b.to_ascii_lowercase() as char));
            i += l;
        }
        let fixed = msg.get(i..i + 4)?;
        let qtype = u16::from_be_bytes([fixed[0], fixed[1]]);
        let class = u16::from_be_bytes([fixed[2], fixed[3]]);
        (class == CLASS_IN && !name.is_empty()).then_some(Question {
            name,
            qtype,
            end: i + 4,
        })
    }
}

/// Writes the answer to `query` into `out` (the header, the question as the guest wrote it,
/// then the record if there is one); its length, or `None` when the upstreams should answer.
fn write_answer(query: &[u8], q: &Question, answer: &Answer, out: &mut [u8]) -> Option<usize> {
    let (rcode, rtype, ttl, records): (u8, u16, u32, Vec<Vec<u8>>) = match answer {
        Answer::Relay => return None,
        Answer::NxDomain => (RCODE_NXDOMAIN, 0, 0, Vec::new()),
        Answer::NoData => (0, 0, 0, Vec::new()),
        Answer::A(ip, ttl) => (0, TYPE_A, *ttl, vec![ip.octets().to_vec()]),
        Answer::Aaaa(ips, ttl) => {
            let rdata = ips.iter().map(|ip| ip.octets().to_vec()).collect();
            (0, TYPE_AAAA, *ttl, rdata)
        }
        Answer::Ptr(name, ttl) => {
            let mut rdata = Vec::with_capacity(name.len() + 2);
            for label in name.split('.') {
                rdata.push(u8::try_from(label.len()).ok()?);
                rdata.extend_from_slice(label.as_bytes());
            }
            rdata.push(0);
            (0, TYPE_PTR, *ttl, vec![rdata])
        }
    };
    let len = q.end + records.iter().map(|r| 12 + r.len()).sum::<usize>();
    if len > out.len() {
        return None;
    }
    out[..q.end].copy_from_slice(&query[..q.end]);
    out[2] = QR | AA | (query[2] & 0x01); // RD echoed
    out[3] = 0x80 | rcode; // RA: the relay recurses for everything else
    out[4..6].copy_from_slice(&1u16.to_be_bytes());
    out[6..8].copy_from_slice(&u16::try_from(records.len()).ok()?.to_be_bytes());
    out[8..12].fill(0);
    let mut at = q.end;
    for rdata in records {
        let rr = &mut out[at..at + 12 + rdata.len()];
        // The owner is the question's name, by a pointer to it (offset 12).
        rr[..2].copy_from_slice(&[0xc0, 0x0c]);
        rr[2..4].copy_from_slice(&rtype.to_be_bytes());
        rr[4..6].copy_from_slice(&CLASS_IN.to_be_bytes());
        rr[6..10].copy_from_slice(&ttl.to_be_bytes());
        rr[10..12].copy_from_slice(&u16::try_from(rdata.len()).ok()?.to_be_bytes());
        rr[12..].copy_from_slice(&rdata);
        at += 12 + rdata.len();
    }
    Some(len)
}

/// The end of the first question (name, type, class), if it is well formed.
fn question_end(msg: &[u8]) -> Option<usize> {
    let mut i = HEADER_LEN;
    loop {
        let l = *msg.get(i)? as usize;
        i += 1;
        if l == 0 {
            break;
        }
        if l & 0xc0 != 0 {
            return None;
        }
        i += l;
    }
    (i + 4 <= msg.len()).then_some(i + 4)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Mac;
    use crate::sim::SimSockets;
    use crate::testing::*;
    use smoltcp::wire::ETHERNET_HEADER_LEN;
    use std::net::Ipv4Addr;
    use std::net::SocketAddrV4;
    use std::time::Duration;

    const UP1: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 53), 53);
    const UP2: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 54), 5353);

    fn guest() -> SocketAddrV4 {
        SocketAddrV4::new(GUEST_IP, 1048)
    }

    fn host53() -> SocketAddrV4 {
        SocketAddrV4::new(HOST_IP, 53)
    }

    /// A query for "a.example" type A with ID `id`.
    fn query(id: u16) -> Vec<u8> {
        let mut q = id.to_be_bytes().to_vec();
        q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
        q.extend_from_slice(b"\x01a\x07example\x00\x00\x01\x00\x01");
        q
    }

    fn answer_to(relayed: &[u8]) -> Vec<u8> {
        let mut a = relayed.to_vec();
        a[2] |= QR;
        a[3] = 0x80;
        a.extend_from_slice(b"answer-bytes");
        a
    }

    fn setup2() -> (crate::Engine, SimSockets, FrameBatch) {
        setup_with(|c| {
            c.dns.upstream = vec![UP1.into(), UP2.into()];
            c.dns.query_timeout = Duration::from_secs(2);
        })
    }

    /// The socket of upstream `i` and the last query sent on it.
    fn last_sent(e: &crate::Engine, h: &mut SimSockets, i: usize) -> (SockId, Vec<u8>) {
        let s = e.dns.upstream_socket(i).unwrap();
        (s, h.udp(s).unwrap().sent.last().unwrap().clone())
    }

    /// A resolver load of 1,000 queries outstanding from one guest is relayed whole; the
    /// guest's share ends at MAX_PENDING_PER_GUEST, and another guest is still served then.
    #[test]
    fn a_thousand_outstanding_from_one_guest_are_all_relayed() {
        let (mut e, mut h, mut out) = setup2();
        let send = |e: &mut crate::Engine, h: &mut SimSockets, out: &mut FrameBatch, from, id| {
            e.handle_frame(T0, &udp_frame(from, host53(), &query(id)), h, out);
        };
        for id in 0..1000 {
            send(&mut e, &mut h, &mut out, guest(), id);
        }
        let s1 = e.dns.upstream_socket(0).unwrap();
        assert_eq!(h.udp(s1).unwrap().sent.len(), 1000);
        assert_eq!(e.stats().drops_of(DropReason::Limit), 0);
        for id in 1000..MAX_PENDING_PER_GUEST as u16 + 10 {
            send(&mut e, &mut h, &mut out, guest(), id);
        }
        assert_eq!(h.udp(s1).unwrap().sent.len(), MAX_PENDING_PER_GUEST);
        assert_eq!(e.stats().drops_of(DropReason::Limit), 10);
        let other = SocketAddrV4::new(Ipv4Addr::new(192, 168, 30, 99), 5000);
        send(&mut e, &mut h, &mut out, other, 7);
        assert_eq!(h.udp(s1).unwrap().sent.len(), MAX_PENDING_PER_GUEST + 1);
    }

    #[test]
    fn relays_with_a_fresh_id_and_restores_it() {
        let (mut e, mut h, mut out) = setup2();
        e.handle_frame(
            T0,
            &udp_frame(guest(), host53(), &query(0x1234)),
            &mut h,
            &mut out,
        );
        let (s1, relayed) = last_sent(&e, &mut h, 0);
        assert_eq!(h.udp(s1).unwrap().dst, std::net::SocketAddr::from(UP1));
        assert_eq!(relayed[2..], query(0x1234)[2..]);
        let new_id = u16::from_be_bytes([relayed[0], relayed[1]]);
        let rows = e.sessions();
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].proto, rows[0].guest, rows[0].dst),
            (Proto::Dns, guest().into(), host53().into())
        );

        // A wrong ID is ignored.
        let mut wrong = answer_to(&relayed);
        wrong[..2].copy_from_slice(&new_id.wrapping_add(1).to_be_bytes());
        h.deliver_udp(s1, &wrong);
        pump(&mut e, &mut h, &mut out, T0);
        assert!(out.is_empty());
        assert_eq!(e.stats().drops_of(DropReason::Foreign), 1);

        h.deliver_udp(s1, &answer_to(&relayed));
        pump(&mut e, &mut h, &mut out, T0);
        let p = packets(&out);
        assert_eq!(p.len(), 1);
        let (from, to, payload) = parse_udp(&p[0]);
        assert_eq!((from, to), (host53(), guest()));
        assert_eq!(payload[..2], 0x1234u16.to_be_bytes());
        assert_eq!(payload[2..], answer_to(&relayed)[2..]);
        assert_eq!(e.dns.pending(), 0);
        assert!(e.sessions().is_empty());
        // A duplicate answer finds nothing in flight.
        h.deliver_udp(s1, &answer_to(&relayed));
        pump(&mut e, &mut h, &mut out, T0);
        assert_eq!(out.len(), 1);
    }

    /// A query for a name of one label of `label` bytes, type A, ID `id`.
    fn query_of_label(id: u16, label: usize) -> Vec<u8> {
        let mut q = id.to_be_bytes().to_vec();
        q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
        q.push(label as u8);
        q.extend(std::iter::repeat_n(b'q', label));
        q.extend_from_slice(b"\x07example\x00\x00\x01\x00\x01");
        q
    }

    /// Batched, a burst of queries of one size leaves for its upstream in one send, and one of
    /// another size in a send of its own; their answers, one size to one guest socket, reach
    /// the guest as one super-frame, each with the ID the guest gave it.
    #[test]
    fn batched_queries_and_their_answers_travel_in_runs() {
        let (mut e, mut h, mut out) = setup2();
        e.set_batching(true);
        e.ctx.udp_gso = true;
        for id in 0..10 {
            let q = query_of_label(id, 3);
            e.handle_frame(T0, &udp_frame(guest(), host53(), &q), &mut h, &mut out);
        }
        let s1 = e.dns.upstream_socket(0).unwrap();
        assert!(
            h.udp(s1).unwrap().sent.is_empty(),
            "the run waits for the batch's end"
        );
        // One of another size: the run leaves, and it waits in a run of its own.
        let odd = query_of_label(100, 9);
        e.handle_frame(T0, &udp_frame(guest(), host53(), &odd), &mut h, &mut out);
        assert_eq!(h.udp(s1).unwrap().sends, vec![10]);
        e.flush(T0, &mut h, &mut out);
        let u = h.udp(s1).unwrap();
        assert_eq!(u.sends, vec![10, 1]);
        let relayed = u.sent.clone();
        let ids: std::collections::HashSet<_> = relayed.iter().map(|r| [r[0], r[1]]).collect();
        assert_eq!(ids.len(), 11);
        assert_eq!(relayed[3][2..], query_of_label(3, 3)[2..]);
        assert_eq!(relayed[10][2..], odd[2..]);

        out.clear();
        for r in &relayed {
            h.deliver_udp(s1, &answer_to(r));
        }
        pump(&mut e, &mut h, &mut out, T0);
        let frames: Vec<(Vec<u8>, u16)> = out.iter_gso().map(|(f, g)| (f.to_vec(), g)).collect();
        assert_eq!(frames.len(), 2);
        let (sup, size) = &frames[0];
        assert_eq!(usize::from(*size), answer_to(&relayed[0]).len());
        let mut cut = Vec::new();
        crate::wire::gso::cut(sup, *size, |f| cut.push(f[ETHERNET_HEADER_LEN..].to_vec())).unwrap();
        assert_eq!(cut.len(), 10);
        for (id, p) in cut.iter().enumerate() {
            let (from, to, msg) = parse_udp(p);
            assert_eq!((from, to), (host53(), guest()));
            assert_eq!(msg, answer_to(&query_of_label(id as u16, 3)));
        }
        assert_eq!(frames[1].1, 0);
        assert_eq!(
            parse_udp(&frames[1].0[ETHERNET_HEADER_LEN..]).2,
            answer_to(&odd)
        );
        assert_eq!(e.dns.pending(), 0);
    }

    /// A run its upstream refuses goes on to the next upstream query by query; with none left
    /// to take them, the queries are given up and counted, and nothing stays in flight.
    #[test]
    fn a_refused_run_moves_on_query_by_query_or_is_given_up() {
        for second_refuses in [false, true] {
            let (mut e, mut h, mut out) = setup2();
            e.set_batching(true);
            for id in 0..4 {
                e.handle_frame(
                    T0,
                    &udp_frame(guest(), host53(), &query(id)),
                    &mut h,
                    &mut out,
                );
            }
            h.no_route.push((*UP1.ip()).into());
            if second_refuses {
                h.no_route.push((*UP2.ip()).into());
            }
            e.flush(T0, &mut h, &mut out);
            let s1 = e.dns.upstream_socket(0).unwrap();
            assert!(h.udp(s1).unwrap().sent.is_empty());
            if second_refuses {
                assert_eq!(e.stats().drops_of(DropReason::QueueFull), 4);
                assert_eq!(e.dns.pending(), 0);
                assert!(e.sessions().is_empty());
                continue;
            }
            let s2 = e.dns.upstream_socket(1).unwrap();
            let u2 = h.udp(s2).unwrap();
            assert_eq!(u2.sends, vec![1, 1, 1, 1]);
            let relayed = u2.sent.clone();
            // Answered by the upstream that has them now.
            for r in &relayed {
                h.deliver_udp(s2, &answer_to(r));
            }
            out.clear();
            pump(&mut e, &mut h, &mut out, T0);
            assert_eq!(packets(&out).len(), 4);
            assert_eq!(e.dns.pending(), 0);
        }
    }

    #[test]
    fn answer_from_the_wrong_upstream_is_ignored_and_timeout_moves_on() {
        let (mut e, mut h, mut out) = setup2();
        e.handle_frame(
            T0,
            &udp_frame(guest(), host53(), &query(7)),
            &mut h,
            &mut out,
        );
        let (s1, relayed) = last_sent(&e, &mut h, 0);
        // Open the second upstream's socket with another guest's query... it goes to UP1 too,
        // so force it: time the first query out, which sends it to UP2.
        assert_eq!(e.poll_timeout(), Some(T0 + Duration::from_secs(2)));
        e.handle_timeout(T0 + Duration::from_secs(2), &mut h, &mut out);
        let (s2, retried) = last_sent(&e, &mut h, 1);
        assert_eq!(h.udp(s2).unwrap().dst, std::net::SocketAddr::from(UP2));
        assert_eq!(retried, relayed);
        // Now only UP2 may answer.
        h.deliver_udp(s1, &answer_to(&relayed));
        pump(&mut e, &mut h, &mut out, T0);
        assert!(out.is_empty());
        assert_eq!(e.stats().drops_of(DropReason::Foreign), 1);
        h.deliver_udp(s2, &answer_to(&relayed));
        pump(&mut e, &mut h, &mut out, T0);
        assert_eq!(out.len(), 1);
        assert_eq!(parse_udp(&packets(&out)[0]).2[..2], 7u16.to_be_bytes());
    }

    #[test]
    fn unanswered_query_is_forgotten_after_the_last_upstream() {
        let (mut e, mut h, mut out) = setup2();
        e.handle_frame(
            T0,
            &udp_frame(guest(), host53(), &query(9)),
            &mut h,
            &mut out,
        );
        let t1 = T0 + Duration::from_secs(2);
        e.handle_timeout(t1, &mut h, &mut out);
        assert_eq!(e.dns.pending(), 1);
        assert_eq!(e.poll_timeout(), Some(t1 + Duration::from_secs(2)));
        e.handle_timeout(t1 + Duration::from_secs(2), &mut h, &mut out);
        assert_eq!(e.dns.pending(), 0);
        assert_eq!(e.poll_timeout(), None);
        assert!(out.is_empty());
        // Sent once to each upstream.
        let s1 = e.dns.upstream_socket(0).unwrap();
        let s2 = e.dns.upstream_socket(1).unwrap();
        assert_eq!(h.udp(s1).unwrap().sent.len(), 1);
        assert_eq!(h.udp(s2).unwrap().sent.len(), 1);
    }

    #[test]
    fn concurrent_queries_get_distinct_ids() {
        let (mut e, mut h, mut out) = setup2();
        for port in 0..200u16 {
            let g = SocketAddrV4::new(GUEST_IP, 2000 + port);
            e.handle_frame(T0, &udp_frame(g, host53(), &query(1)), &mut h, &mut out);
        }
        let s1 = e.dns.upstream_socket(0).unwrap();
        let mut ids: Vec<u16> = h
            .udp(s1)
            .unwrap()
            .sent
            .iter()
            .map(|q| u16::from_be_bytes([q[0], q[1]]))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 200);
        assert_eq!(e.sessions().len(), 200);
    }

    #[test]
    fn no_upstream_answers_servfail() {
        let (mut e, mut h, mut out) = setup_with(|c| {
            // Link-local and in-network resolvers are unusable.
            c.dns.upstream = vec![
                "[fe80::1]:53".parse().unwrap(),
                "[fd68:7562:6e61:1e::5]:53".parse().unwrap(),
                "192.168.30.5:53".parse().unwrap(),
            ];
        });
        e.handle_frame(
            T0,
            &udp_frame(guest(), host53(), &query(0xbeef)),
            &mut h,
            &mut out,
        );
        let p = packets(&out);
        assert_eq!(p.len(), 1);
        let (from, _, a) = parse_udp(&p[0]);
        assert_eq!(from, host53());
        assert_eq!(a[..2], 0xbeefu16.to_be_bytes());
        assert_eq!(a[2] & QR, QR);
        assert_eq!(a[3] & 0x0f, RCODE_SERVFAIL);
        assert_eq!(a[4..6], [0, 1]);
        assert_eq!(a.len(), query(0).len());
        assert!(h.sockets.is_empty());
        assert_eq!(upstream_for_tcp(&e.ctx), None);
    }

    #[test]
    fn malformed_queries_are_dropped() {
        let (mut e, mut h, mut out) = setup2();
        e.handle_frame(
            T0,
            &udp_frame(guest(), host53(), &[1, 2, 3]),
            &mut h,
            &mut out,
        );
        assert_eq!(e.stats().drops_of(DropReason::Malformed), 1);
        e.handle_frame(
            T0,
            &udp_frame(guest(), host53(), &vec![0; MAX_QUERY + 1]),
            &mut h,
            &mut out,
        );
        assert_eq!(e.stats().drops_of(DropReason::Malformed), 2);
        let mut resp = query(1);
        resp[2] |= QR;
        e.handle_frame(T0, &udp_frame(guest(), host53(), &resp), &mut h, &mut out);
        assert_eq!(e.stats().drops_of(DropReason::Unsupported), 1);
        assert_eq!(e.dns.pending(), 0);
        // A short answer from the upstream is malformed.
        e.handle_frame(
            T0,
            &udp_frame(guest(), host53(), &query(1)),
            &mut h,
            &mut out,
        );
        let (s1, _) = last_sent(&e, &mut h, 0);
        h.deliver_udp(s1, &[0; 5]);
        pump(&mut e, &mut h, &mut out, T0);
        assert_eq!(e.stats().drops_of(DropReason::Malformed), 3);
        assert!(out.is_empty());
    }

    const DNS_ADDRESS: Ipv4Addr = Ipv4Addr::new(192, 168, 30, 3);

    fn dns53() -> SocketAddrV4 {
        SocketAddrV4::new(DNS_ADDRESS, 53)
    }

    fn setup_dns_address() -> (crate::Engine, SimSockets, FrameBatch) {
        setup_with(|c| {
            c.dns.upstream = vec![UP1.into()];
            c.dns.address = Some(DNS_ADDRESS);
        })
    }

    /// The ARP answer in `out`, if there is one: (sender MAC, sender address).
    fn arp_reply(out: &FrameBatch) -> Option<(Mac, Ipv4Addr)> {
        use smoltcp::wire::{ArpOperation, ArpPacket, ArpRepr, EthernetFrame};
        out.iter().find_map(|f| {
            let eth = EthernetFrame::new_checked(f).ok()?;
            let arp = ArpRepr::parse(&ArpPacket::new_checked(eth.payload()).ok()?).ok()?;
            match arp {
                ArpRepr::EthernetIpv4 {
                    operation: ArpOperation::Reply,
                    source_hardware_addr,
                    source_protocol_addr,
                    ..
                } => Some((crate::wire::mac(source_hardware_addr), source_protocol_addr)),
                _ => None,
            }
        })
    }

    /// A guest's "who has `ip`?".
    fn who_has(ip: Ipv4Addr) -> Vec<u8> {
        let mut b = FrameBatch::new();
        crate::vhost::arp::push_request(&mut b, GUEST_MAC, GUEST_IP, ip);
        b.get(0).unwrap().to_vec()
    }

    #[test]
    fn the_dns_address_relays_queries_and_answers_from_itself() {
        let (mut e, mut h, mut out) = setup_dns_address();
        e.handle_frame(
            T0,
            &udp_frame(guest(), dns53(), &query(0x0d0d)),
            &mut h,
            &mut out,
        );
        let (s1, relayed) = last_sent(&e, &mut h, 0);
        assert_eq!(h.udp(s1).unwrap().dst, std::net::SocketAddr::from(UP1));
        let rows = e.sessions();
        assert_eq!(
            (rows[0].proto, rows[0].guest, rows[0].dst),
            (Proto::Dns, guest().into(), dns53().into())
        );
        // A query to the virtual host's own address at the same time keeps its own.
        let other = SocketAddrV4::new(GUEST_IP, 1049);
        e.handle_frame(
            T0,
            &udp_frame(other, host53(), &query(0x0101)),
            &mut h,
            &mut out,
        );
        let (_, relayed_other) = last_sent(&e, &mut h, 0);
        h.deliver_udp(s1, &answer_to(&relayed));
        h.deliver_udp(s1, &answer_to(&relayed_other));
        pump(&mut e, &mut h, &mut out, T0);
        let p = packets(&out);
        assert_eq!(p.len(), 2);
        let (from, to, payload) = parse_udp(&p[0]);
        assert_eq!((from, to), (dns53(), guest()));
        assert_eq!(payload[..2], 0x0d0du16.to_be_bytes());
        assert_eq!(parse_udp(&p[1]).0, host53());
        // With no usable upstream, the SERVFAIL comes from where the query went too.
        let (mut e, mut h, mut out) = setup_with(|c| {
            c.dns.upstream = vec![];
            c.dns.address = Some(DNS_ADDRESS);
        });
        e.handle_frame(
            T0,
            &udp_frame(guest(), dns53(), &query(5)),
            &mut h,
            &mut out,
        );
        let (from, _, a) = parse_udp(&packets(&out)[0]);
        assert_eq!(from, dns53());
        assert_eq!(a[3] & 0x0f, RCODE_SERVFAIL);
    }

    #[test]
    fn other_ports_at_the_dns_address_are_unreachable_from_it() {
        use smoltcp::wire::{Icmpv4Message, Icmpv4Packet, Ipv4Packet};
        let (mut e, mut h, mut out) = setup_dns_address();
        let to = SocketAddrV4::new(DNS_ADDRESS, 67);
        e.handle_frame(T0, &udp_frame(guest(), to, b"x"), &mut h, &mut out);
        let p = packets(&out);
        assert_eq!(p.len(), 1);
        let ip = Ipv4Packet::new_checked(&p[0][..]).unwrap();
        assert_eq!((ip.src_addr(), ip.dst_addr()), (DNS_ADDRESS, GUEST_IP));
        let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
        assert_eq!(icmp.msg_type(), Icmpv4Message::DstUnreachable);
        assert!(h.sockets.is_empty(), "nothing is carried to the sock side");
        assert!(e.sessions().is_empty());
    }

    #[test]
    fn arp_for_the_dns_address_follows_the_configuration() {
        let (mut e, mut h, mut out) = setup_dns_address();
        e.start(T0, &mut out);
        assert_eq!(out.len(), 2, "both addresses are announced");
        out.clear();
        e.handle_frame(T0, &who_has(DNS_ADDRESS), &mut h, &mut out);
        assert_eq!(arp_reply(&out), Some((HOST_MAC, DNS_ADDRESS)));
        out.clear();
        // A guest cannot take the address over: its frames from it are not a guest's.
        let from_dns = udp_frame(dns53(), SocketAddrV4::new(REMOTE_IP, 53), b"x");
        e.handle_frame(T0, &from_dns, &mut h, &mut out);
        assert_eq!(e.stats().drops_of(DropReason::Foreign), 1);
        assert!(e.ctx.arp.lookup(DNS_ADDRESS).is_none());

        // Removed at run time: the address is nobody's, and nothing answers for it.
        let mut cfg = e.config().clone();
        cfg.dns.address = None;
        e.reconfigure(T0, cfg.clone(), &mut h, &mut out);
        assert!(out.is_empty(), "nothing to announce");
        e.handle_frame(T0, &who_has(DNS_ADDRESS), &mut h, &mut out);
        assert_eq!(arp_reply(&out), None);
        e.handle_frame(
            T0,
            &udp_frame(guest(), dns53(), &query(1)),
            &mut h,
            &mut out,
        );
        assert_eq!(e.stats().drops_of(DropReason::Loop), 1);
        assert_eq!(e.dns.pending(), 0);

        // Set again: announced, answered.
        cfg.dns.address = Some(DNS_ADDRESS);
        e.reconfigure(T0, cfg.clone(), &mut h, &mut out);
        assert_eq!(out.len(), 1, "a gratuitous ARP for the address");
        out.clear();
        e.handle_frame(T0, &who_has(DNS_ADDRESS), &mut h, &mut out);
        assert_eq!(arp_reply(&out), Some((HOST_MAC, DNS_ADDRESS)));
        out.clear();
        e.reconfigure(T0, cfg, &mut h, &mut out);
        assert!(out.is_empty(), "unchanged: not announced again");
    }

    #[test]
    fn large_answers_are_fragmented_and_tcp_upstream_is_the_first() {
        let (mut e, mut h, mut out) = setup2();
        assert_eq!(upstream_for_tcp(&e.ctx), Some(UP1.into()));
        e.handle_frame(
            T0,
            &udp_frame(guest(), host53(), &query(3)),
            &mut h,
            &mut out,
        );
        let (s1, relayed) = last_sent(&e, &mut h, 0);
        let mut a = answer_to(&relayed);
        a.resize(3000, 0xab);
        h.deliver_udp(s1, &a);
        pump(&mut e, &mut h, &mut out, T0);
        let p = packets(&out);
        assert_eq!(p.len(), 3);
        let joined = join_fragments(&p);
        assert_eq!(joined.len(), 8 + 3000);
        assert_eq!(joined[8..10], 3u16.to_be_bytes());
        assert_eq!(joined[10..], a[2..]);
    }

    /// A query for `name` of type `qtype`, with ID 0x4242 and recursion desired.
    fn query_for(name: &str, qtype: u16) -> Vec<u8> {
        let mut q = vec![0x42, 0x42, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for l in name.split('.') {
            q.push(l.len() as u8);
            q.extend_from_slice(l.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&CLASS_IN.to_be_bytes());
        q
    }

    /// A local answer: (rcode, the question as echoed, the one record's (type, TTL, rdata)).
    struct Reply {
        rcode: u8,
        question: Vec<u8>,
        record: Option<(u16, u32, Vec<u8>)>,
    }

    /// Asks `name` at `now`; the local answer, or `None` when the query went upstream.
    fn ask(
        e: &mut crate::Engine,
        h: &mut SimSockets,
        now: Instant,
        name: &str,
        qtype: u16,
    ) -> Option<Reply> {
        let mut out = FrameBatch::new();
        let q = query_for(name, qtype);
        e.handle_frame(now, &udp_frame(guest(), host53(), &q), h, &mut out);
        let p = packets(&out);
        if p.is_empty() {
            return None;
        }
        let (from, to, a) = parse_udp(&p[0]);
        assert_eq!((from, to), (host53(), guest()));
        assert_eq!(a[..2], q[..2], "ID echoed");
        assert_eq!(a[2] & (QR | AA | 1), QR | AA | 1, "an authoritative answer");
        let qend = q.len();
        let ancount = u16::from_be_bytes([a[6], a[7]]);
        let record = (ancount == 1).then(|| {
            let rr = &a[qend..];
            assert_eq!(rr[..2], [0xc0, 0x0c]);
            let rdlen = u16::from_be_bytes([rr[10], rr[11]]) as usize;
            assert_eq!(rr.len(), 12 + rdlen);
            (
                u16::from_be_bytes([rr[2], rr[3]]),
                u32::from_be_bytes([rr[6], rr[7], rr[8], rr[9]]),
                rr[12..].to_vec(),
            )
        });
        assert!(ancount <= 1);
        Some(Reply {
            rcode: a[3] & 0x0f,
            question: a[12..qend].to_vec(),
            record,
        })
    }

    fn a_of(r: &Reply) -> (Ipv4Addr, u32) {
        let (t, ttl, d) = r.record.clone().expect("an A record");
        assert_eq!(t, TYPE_A);
        (Ipv4Addr::new(d[0], d[1], d[2], d[3]), ttl)
    }

    fn ptr_of(r: &Reply) -> String {
        let (t, _, d) = r.record.clone().expect("a PTR record");
        assert_eq!(t, TYPE_PTR);
        let mut labels = Vec::new();
        let mut i = 0;
        while d[i] != 0 {
            let l = d[i] as usize;
            labels.push(String::from_utf8(d[i + 1..i + 1 + l].to_vec()).unwrap());
            i += l + 1;
        }
        labels.join(".")
    }

    const TYPE_AAAA: u16 = 28;
    const IP_A: Ipv4Addr = Ipv4Addr::new(192, 168, 30, 20);
    const IP_B: Ipv4Addr = Ipv4Addr::new(192, 168, 30, 21);
    const IP_C: Ipv4Addr = Ipv4Addr::new(192, 168, 30, 22);

    fn lease(id: u32, last: u8, ip: Ipv4Addr, name: &str, at: u64, until: u64) -> Lease {
        Lease {
            id,
            leased_at: Instant::from_secs(at),
            expires_at: Instant::from_secs(until),
            mac: Mac([2, 0, 0, 0, 1, last]),
            ip,
            host_name: name.into(),
        }
    }

    use crate::vhost::dhcp::Lease;
    use crate::vhost::names::TTL;

    /// A relay with the domain `lan`, one upstream, and leases: vm1 (the oldest), a newer
    /// guest that also calls itself VM1, and web, whose lease ends at 31 s.
    fn setup_names() -> (crate::Engine, SimSockets) {
        let (mut e, h, _) = setup_with(|c| {
            c.dns.upstream = vec![UP1.into()];
            c.dhcp.domain = Some("lan".into());
        });
        let kept = e.dhcp.restore(
            T0,
            vec![
                lease(1, 1, IP_A, "vm1", 1, 3600),
                lease(2, 2, IP_B, "VM1", 2, 3600),
                lease(3, 3, IP_C, "web", 3, 31),
            ],
        );
        assert_eq!(kept, 3);
        (e, h)
    }

    /// Over TCP the same names are answered here; the rest goes to the first usable upstream,
    /// and with none the guest gets SERVFAIL; an answer sent to the relay ends the connection.
    #[test]
    fn queries_over_tcp_are_answered_or_routed() {
        let (mut e, _) = setup_names();
        let now = Instant::from_secs(10);
        let q = query_for("vm1.lan", TYPE_A);
        let Some(TcpDnsRoute::Answer(a)) = e.route_tcp_dns(now, &q) else {
            panic!("vm1.lan is answered here");
        };
        assert_eq!(a[..2], q[..2], "the guest's own ID");
        assert_eq!(a[a.len() - 4..], IP_A.octets());
        assert_eq!(
            e.route_tcp_dns(now, &query_for("example.org", TYPE_A)),
            Some(TcpDnsRoute::Relay(std::net::SocketAddr::from(UP1)))
        );
        let mut answer = q.clone();
        answer[2] |= QR;
        assert_eq!(e.route_tcp_dns(now, &answer), None);
        assert_eq!(e.route_tcp_dns(now, &q[..5]), None);
        e.ctx.cfg.dns.upstream.clear();
        let Some(TcpDnsRoute::Answer(f)) = e.route_tcp_dns(now, &query_for("example.org", 1))
        else {
            panic!("SERVFAIL without an upstream");
        };
        assert_eq!(f[3] & 0x0f, RCODE_SERVFAIL);
    }

    #[test]
    fn a_guests_name_has_the_ipv6_addresses_its_mac_holds() {
        use crate::vhost::bindings::BoundBy;
        let (mut e, _) = setup_names();
        let now = Instant::from_secs(10);
        let vm1 = Mac([2, 0, 0, 0, 1, 1]);
        let (a, b): (std::net::Ipv6Addr, std::net::Ipv6Addr) = (
            "fd68:7562:6e61:1e::1000".parse().unwrap(),
            "fd68:7562:6e61:1e:0:ff:fe00:101".parse().unwrap(),
        );
        for ip in [b, a, "fe80::1".parse().unwrap()] {
            e.ctx.sources.bind6(now, ip, vm1, BoundBy::Learned);
        }
        let Some(TcpDnsRoute::Answer(m)) = e.route_tcp_dns(now, &query_for("vm1.lan", TYPE_AAAA))
        else {
            panic!("answered here");
        };
        assert_eq!(
            u16::from_be_bytes([m[6], m[7]]),
            2,
            "two records, not the link-local"
        );
        let qend = query_for("vm1.lan", TYPE_AAAA).len();
        let mut got = Vec::new();
        let mut at = qend;
        while at < m.len() {
            let rr = &m[at..];
            assert_eq!(u16::from_be_bytes([rr[2], rr[3]]), TYPE_AAAA);
            assert_eq!(u16::from_be_bytes([rr[10], rr[11]]), 16);
            got.push(std::net::Ipv6Addr::from(
                <[u8; 16]>::try_from(&rr[12..28]).unwrap(),
            ));
            at += 28;
        }
        assert_eq!(got, [a, b]);
        // The operator's names have no IPv6 address here.
        e.ctx.cfg.dns.hosts = vec![("nas.lan".into(), std::net::Ipv4Addr::new(10, 1, 1, 1))];
        e.dns.reconfigured();
        let Some(TcpDnsRoute::Answer(m)) = e.route_tcp_dns(now, &query_for("nas.lan", TYPE_AAAA))
        else {
            panic!("answered here");
        };
        assert_eq!(u16::from_be_bytes([m[6], m[7]]), 0);
    }

    /// The `ip6.arpa` name of `ip`.
    fn ip6_arpa(ip: std::net::Ipv6Addr) -> String {
        let v = u128::from(ip);
        let nibbles: Vec<String> = (0..32)
            .map(|i| format!("{:x}", (v >> (4 * i)) & 0xf))
            .collect();
        format!("{}.ip6.arpa", nibbles.join("."))
    }

    #[test]
    fn a_guests_ipv6_addresses_have_its_name_for_ptr() {
        use crate::vhost::bindings::BoundBy;
        let (mut e, mut h) = setup_names();
        let now = Instant::from_secs(10);
        let (vm1, newer) = (Mac([2, 0, 0, 0, 1, 1]), Mac([2, 0, 0, 0, 1, 2]));
        let a: std::net::Ipv6Addr = "fd68:7562:6e61:1e::1000".parse().unwrap();
        let link_local: std::net::Ipv6Addr = "fe80::1".parse().unwrap();
        let other: std::net::Ipv6Addr = "fd68:7562:6e61:1e::2000".parse().unwrap();
        for (ip, mac) in [(a, vm1), (link_local, vm1), (other, newer)] {
            e.ctx.sources.bind6(now, ip, mac, BoundBy::Learned);
        }
        let r = ask(&mut e, &mut h, now, &ip6_arpa(a), TYPE_PTR).unwrap();
        assert_eq!(ptr_of(&r), "vm1.lan");
        assert_eq!(r.record.unwrap().1, TTL);
        // Upper-case nibbles name the same address; another type has no record.
        let r = ask(&mut e, &mut h, now, &ip6_arpa(a).to_uppercase(), TYPE_PTR).unwrap();
        assert_eq!(ptr_of(&r), "vm1.lan");
        let r = ask(&mut e, &mut h, now, &ip6_arpa(a), TYPE_A).unwrap();
        assert_eq!((r.rcode, r.record.is_none()), (0, true));
        // Relayed: a link-local address, an address no guest holds, one of a guest without a
        // name of its own (the newer claimant of vm1), a name that is not 32 nibbles.
        assert!(ask(&mut e, &mut h, now, &ip6_arpa(link_local), TYPE_PTR).is_none());
        let nobody: std::net::Ipv6Addr = "fd68:7562:6e61:1e::3000".parse().unwrap();
        assert!(ask(&mut e, &mut h, now, &ip6_arpa(nobody), TYPE_PTR).is_none());
        assert!(ask(&mut e, &mut h, now, &ip6_arpa(other), TYPE_PTR).is_none());
        assert!(ask(&mut e, &mut h, now, "0.ip6.arpa", TYPE_PTR).is_none());
        // Once the address is no longer vm1's, its reverse name is not either.
        e.ctx.sources.unbind6(a, BoundBy::Learned);
        assert!(ask(&mut e, &mut h, now, &ip6_arpa(a), TYPE_PTR).is_none());
    }

    #[test]
    fn lease_names_are_answered_locally() {
        let (mut e, mut h) = setup_names();
        let now = Instant::from_secs(10);
        let r = ask(&mut e, &mut h, now, "vm1.lan", TYPE_A).unwrap();
        assert_eq!((r.rcode, a_of(&r)), (0, (IP_A, TTL)));
        // Case-insensitive, and the question comes back as the guest wrote it.
        let r = ask(&mut e, &mut h, now, "Vm1.LAN", TYPE_A).unwrap();
        assert_eq!(a_of(&r).0, IP_A);
        assert_eq!(r.question, query_for("Vm1.LAN", TYPE_A)[12..]);
        // The bare name, a single label.
        let r = ask(&mut e, &mut h, now, "vm1", TYPE_A).unwrap();
        assert_eq!(a_of(&r).0, IP_A);
        // The lease's remaining time when it is shorter than the usual TTL.
        let r = ask(&mut e, &mut h, now, "web.lan", TYPE_A).unwrap();
        assert_eq!(a_of(&r), (IP_C, 21));
        // vm1 uses no IPv6 address: the name exists, with no AAAA record.
        let r = ask(&mut e, &mut h, now, "vm1.lan", TYPE_AAAA).unwrap();
        assert_eq!((r.rcode, r.record.is_none()), (0, true));
        // The reverse name gives the full name.
        let r = ask(&mut e, &mut h, now, "20.30.168.192.in-addr.arpa", TYPE_PTR).unwrap();
        assert_eq!(ptr_of(&r), "vm1.lan");
        let r = ask(&mut e, &mut h, now, "22.30.168.192.In-Addr.Arpa", TYPE_PTR).unwrap();
        assert_eq!(ptr_of(&r), "web.lan");
        // Unknown names under the domain stay here.
        let r = ask(&mut e, &mut h, now, "nope.lan", TYPE_A).unwrap();
        assert_eq!((r.rcode, r.record.is_none()), (RCODE_NXDOMAIN, true));
        let r = ask(&mut e, &mut h, now, "x.vm1.lan", TYPE_A).unwrap();
        assert_eq!(r.rcode, RCODE_NXDOMAIN);
        assert!(
            e.dhcp.leases().count() == 3 && h.sockets.is_empty(),
            "nothing relayed"
        );
        // Everything else is relayed: another domain, an unknown bare name, another address.
        assert!(ask(&mut e, &mut h, now, "vm1.example", TYPE_A).is_none());
        assert!(ask(&mut e, &mut h, now, "printer", TYPE_A).is_none());
        assert!(ask(&mut e, &mut h, now, "9.9.9.9.in-addr.arpa", TYPE_PTR).is_none());
        let s1 = e.dns.upstream_socket(0).unwrap();
        assert_eq!(h.udp(s1).unwrap().sent.len(), 3);
        // Once a lease is over its name is gone, before the pool's sweep notices.
        let later = Instant::from_secs(40);
        let r = ask(&mut e, &mut h, later, "web.lan", TYPE_A).unwrap();
        assert_eq!(r.rcode, RCODE_NXDOMAIN);
    }

    #[test]
    fn the_older_lease_keeps_a_name_two_guests_claim() {
        let (mut e, mut h) = setup_names();
        let now = Instant::from_secs(10);
        // Guest B (leased later) sent VM1 too: the name stays guest A's, both ways.
        let r = ask(&mut e, &mut h, now, "vm1.lan", TYPE_A).unwrap();
        assert_eq!(a_of(&r).0, IP_A);
        assert!(ask(&mut e, &mut h, now, "21.30.168.192.in-addr.arpa", TYPE_PTR).is_none());
        // Once A's lease is gone (its address is no longer in the range), B has it.
        let mut cfg = e.config().clone();
        cfg.dhcp.range_start = IP_B;
        let mut out = FrameBatch::new();
        e.reconfigure(now, cfg, &mut h, &mut out);
        let r = ask(&mut e, &mut h, now, "vm1.lan", TYPE_A).unwrap();
        assert_eq!(a_of(&r).0, IP_B);
    }

    #[test]
    fn operator_names_come_first() {
        let (mut e, mut h, _) = setup_with(|c| {
            c.dns.upstream = vec![UP1.into()];
            c.dhcp.domain = Some("lan".into());
            c.dns.hosts = vec![("Printer.lan".into(), Ipv4Addr::new(192, 168, 30, 40))];
            c.dns.hosts_from_file = vec![
                ("nas".into(), Ipv4Addr::new(10, 1, 2, 3)),
                ("printer.lan".into(), Ipv4Addr::new(10, 9, 9, 9)),
            ];
            c.dhcp.reservations = vec![crate::vhost::dhcp::Reservation {
                mac: Mac([2, 0, 0, 0, 9, 9]),
                ip: Ipv4Addr::new(192, 168, 30, 60),
                name: Some("db".into()),
            }];
        });
        // A guest that calls itself db or printer gets neither name.
        e.dhcp.restore(
            T0,
            vec![
                lease(1, 1, IP_A, "db", 1, 3600),
                lease(2, 2, IP_B, "printer", 1, 3600),
            ],
        );
        let now = Instant::from_secs(10);
        let r = ask(&mut e, &mut h, now, "printer.lan", TYPE_A).unwrap();
        assert_eq!(a_of(&r), (Ipv4Addr::new(192, 168, 30, 40), TTL));
        let r = ask(&mut e, &mut h, now, "40.30.168.192.in-addr.arpa", TYPE_PTR).unwrap();
        assert_eq!(ptr_of(&r), "Printer.lan");
        let r = ask(&mut e, &mut h, now, "NAS", TYPE_A).unwrap();
        assert_eq!(a_of(&r).0, Ipv4Addr::new(10, 1, 2, 3));
        let r = ask(&mut e, &mut h, now, "3.2.1.10.in-addr.arpa", TYPE_PTR).unwrap();
        assert_eq!(ptr_of(&r), "nas");
        // The reservation's name, with or without a lease.
        for n in ["db.lan", "db"] {
            let r = ask(&mut e, &mut h, now, n, TYPE_A).unwrap();
            assert_eq!(a_of(&r).0, Ipv4Addr::new(192, 168, 30, 60), "{n}");
        }
        let r = ask(&mut e, &mut h, now, "60.30.168.192.in-addr.arpa", TYPE_PTR).unwrap();
        assert_eq!(ptr_of(&r), "db.lan");
        // Nor the bare `printer`: the two spellings of one name never part ways.
        assert!(ask(&mut e, &mut h, now, "printer", TYPE_A).is_none());
        // A change of the table is seen at once.
        let mut cfg = e.config().clone();
        cfg.dns.hosts.clear();
        let mut out = FrameBatch::new();
        e.reconfigure(now, cfg, &mut h, &mut out);
        let r = ask(&mut e, &mut h, now, "printer.lan", TYPE_A).unwrap();
        assert_eq!(a_of(&r).0, Ipv4Addr::new(10, 9, 9, 9));
        // Without a domain, only bare names are local and nothing is NXDOMAIN here.
        let mut cfg = e.config().clone();
        cfg.dhcp.domain = None;
        e.reconfigure(now, cfg, &mut h, &mut out);
        assert_eq!(
            a_of(&ask(&mut e, &mut h, now, "db", TYPE_A).unwrap())
                .0
                .octets()[3],
            60
        );
        assert!(ask(&mut e, &mut h, now, "nope.lan", TYPE_A).is_none());
    }

    #[test]
    fn odd_questions_are_relayed_not_answered() {
        let (mut e, mut h) = setup_names();
        let now = Instant::from_secs(10);
        let mut out = FrameBatch::new();
        // Class CH, two questions, a compressed name, an opcode other than QUERY.
        let mut chaos = query_for("vm1.lan", TYPE_A);
        let n = chaos.len();
        chaos[n - 1] = 3;
        let mut two = query_for("vm1.lan", TYPE_A);
        two[5] = 2;
        let mut ptr = query_for("vm1.lan", TYPE_A);
        ptr[12] = 0xc0;
        let mut notify = query_for("vm1.lan", TYPE_A);
        notify[2] |= 4 << 3;
        for q in [chaos, two, ptr, notify] {
            e.handle_frame(now, &udp_frame(guest(), host53(), &q), &mut h, &mut out);
        }
        assert!(out.is_empty());
        let s1 = e.dns.upstream_socket(0).unwrap();
        assert_eq!(h.udp(s1).unwrap().sent.len(), 4);
    }
}
