//! Deterministic replay: a capture's guest-side frames through the core, with the capture's
//! time stamps as the clock, a fixed seed for every random choice, and a scripted host side
//! (`SimSockets` plus the reactions of `script::Script`), so that the frames out are the same on
//! every run and every machine.
//!
//! The driver, per input frame at time `t` (relative to the capture's first frame):
//! 1. runs every timer due before `t`, each at its own deadline;
//! 2. hands the frame to the core;
//! 3. settles the host side: the simulated destinations react to what the core did (echo the
//!    bytes written to a socket, answer a DNS query from the table, answer a ping, close after
//!    the guest closed...), and the events this raises go back into the core, until quiet.
//!
//! After the last frame, timers run for `tail_ms` more. Output frames carry the time at which the
//! core produced them. See `pcaps/README.md` for the scenarios and how golden files are made.

pub mod craft;
pub mod decode;
pub mod gen;
pub mod gso;
pub mod pcap;
pub mod rebase;
pub mod script;

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use hubnat_core::output::FrameBatch;
use hubnat_core::sim::{SimSocket, SimSockets};
use hubnat_core::sockio::SockId;
use hubnat_core::time::Instant;
use hubnat_core::Engine;

pub use pcap::Frame;
pub use script::{Script, TcpBehaviour, UdpBehaviour};

/// Settling rounds after one input (each hands the core every event raised); a guard against a
/// script that would make the host side and the core feed each other forever.
const MAX_ROUNDS: usize = 10_000;
/// Timer runs at one instant before the driver moves on (a timer that does not advance).
const MAX_TIMER_RUNS: usize = 100_000;

/// Per simulated socket: what the driver has already reacted to.
#[derive(Default)]
struct Seen {
    behaviour: Option<TcpBehaviour>,
    fixed_sent: bool,
    fin_sent: bool,
}

/// The replay driver: one core, one simulated host side.
pub struct Driver {
    pub engine: Engine,
    pub host: SimSockets,
    pub script: Script,
    out: FrameBatch,
    rebaser: Rebaser,
    scratch: Vec<u8>,
    seen: HashMap<SockId, Seen>,
    /// The capture time that is the core's time zero.
    origin: Option<Duration>,
    now: Instant,
    started: bool,
    /// Reusable list of socket ids.
    ids: Vec<SockId>,
    /// Frames emitted so far, and the super-frames among them (`gso`).
    emitted: usize,
    marks: Vec<gso::Mark>,
}

use rebase::Rebaser;

/// The fixed pattern a `fixed:N` destination sends: byte i is `i % 251`.
pub fn pattern_byte(i: usize) -> u8 {
    (i % 251) as u8
}

impl Driver {
    pub fn new(script: Script) -> Driver {
        let mut engine = Engine::new(script.config.clone(), script.mac(), script.seed);
        engine.ctx.tcp_gso = script.tcp_gso;
        engine.ctx.udp_gso = script.udp_gso;
        let mut host = SimSockets::default();
        host.default_connect = script.default_connect;
        host.icmp_allowed = true;
        for (a, o) in &script.connects {
            host.connect_script.insert(*a, *o);
        }
        Driver {
            engine,
            host,
            script,
            out: FrameBatch::new(),
            rebaser: Rebaser::default(),
            scratch: Vec::with_capacity(2048),
            seen: HashMap::new(),
            origin: None,
            now: Instant::ZERO,
            started: false,
            ids: Vec::new(),
            emitted: 0,
            marks: Vec::new(),
        }
    }

    /// The frames emitted so far that the core marked as TCP super-frames (`Ctx::tcp_gso`):
    /// their index among every frame emitted and their segment size, in order.
    pub fn gso_marks(&self) -> &[gso::Mark] {
        &self.marks
    }

    fn at(&self, now: Instant) -> Duration {
        self.origin.unwrap_or_default() + Duration::from_micros(now.as_micros())
    }

    /// Hands the frames the core produced so far to `emit`, stamped with `now`.
    fn flush(&mut self, now: Instant, emit: &mut impl FnMut(Duration, &[u8])) {
        let ts = self.at(now);
        for (f, mss) in self.out.iter_gso() {
            if self.script.rebase {
                self.rebaser.on_output(f);
            }
            if mss != 0 {
                self.marks.push((self.emitted, mss));
            }
            self.emitted += 1;
            emit(ts, f);
        }
        self.out.clear();
        // The replay compares frames, not the security log: the events are dropped, drained
        // all the same so that the core's queue never fills.
        while self.engine.poll_event().is_some() {}
    }

    /// Feeds one captured guest frame.
    pub fn frame(&mut self, ts: Duration, frame: &[u8], emit: &mut impl FnMut(Duration, &[u8])) {
        let origin = *self.origin.get_or_insert(ts);
        let now = Instant::from_micros(ts.saturating_sub(origin).as_micros() as u64).max(self.now);
        if !self.started {
            self.started = true;
            self.engine.start(now, &mut self.out);
            self.flush(now, emit);
        }
        self.run_timers(now, emit);
        self.now = now;
        let rewritten = self.script.rebase && self.rebaser.on_input(frame, &mut self.scratch);
        if rewritten {
            let f = std::mem::take(&mut self.scratch);
            self.engine
                .handle_frame(now, &f, &mut self.host, &mut self.out);
            self.scratch = f;
        } else {
            self.engine
                .handle_frame(now, frame, &mut self.host, &mut self.out);
        }
        self.settle(now);
        self.flush(now, emit);
    }

    /// Runs the timers due up to the last frame's time plus the script's tail.
    pub fn finish(&mut self, emit: &mut impl FnMut(Duration, &[u8])) {
        if self.origin.is_none() {
            return;
        }
        let end = self.now + Duration::from_millis(self.script.tail_ms);
        self.run_timers(end, emit);
    }

    /// The core's current time.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// A gap in the guest's traffic until capture time `ts`: runs every timer due meanwhile, as
    /// the next frame would, so that a fuzzer can move time on without sending anything. Nothing
    /// happens before the first frame (the capture's time zero is not known yet).
    pub fn advance(&mut self, ts: Duration, emit: &mut impl FnMut(Duration, &[u8])) {
        let Some(origin) = self.origin else { return };
        let until =
            Instant::from_micros(ts.saturating_sub(origin).as_micros() as u64).max(self.now);
        self.run_timers(until, emit);
        self.now = until;
    }

    /// Lets `act` drive the core directly at the current time (a socket event of its own, a
    /// flush, a reconfiguration...), then lets the host side react to what the core did.
    pub fn act(
        &mut self,
        act: impl FnOnce(&mut Engine, Instant, &mut SimSockets, &mut FrameBatch),
        emit: &mut impl FnMut(Duration, &[u8]),
    ) {
        let now = self.now;
        act(&mut self.engine, now, &mut self.host, &mut self.out);
        self.settle(now);
        self.flush(now, emit);
    }

    fn run_timers(&mut self, until: Instant, emit: &mut impl FnMut(Duration, &[u8])) {
        let mut runs = 0;
        while let Some(t) = self.engine.poll_timeout() {
            if t > until || runs >= MAX_TIMER_RUNS {
                break;
            }
            runs += 1;
            let t = t.max(self.now);
            self.now = t;
            self.engine.handle_timeout(t, &mut self.host, &mut self.out);
            self.settle(t);
            self.flush(t, emit);
        }
    }

    /// Lets the host side react and hands its events to the core until nothing more happens.
    fn settle(&mut self, now: Instant) {
        for _ in 0..MAX_ROUNDS {
            self.react();
            if self.host.events.is_empty() {
                break;
            }
            while let Some(ev) = self.host.events.pop_front() {
                self.engine
                    .handle_host_event(now, ev, &mut self.host, &mut self.out);
            }
        }
        for id in self.host.closed.drain(..) {
            self.seen.remove(&id);
        }
    }

    /// The simulated destinations' reactions to what the core did to their sockets.
    fn react(&mut self) {
        // Only sockets with something to react to, in id order (the hash map's order is not
        // deterministic); scanning is cheap, reacting and sorting are not.
        let mut ids = std::mem::take(&mut self.ids);
        ids.clear();
        for (id, sock) in &self.host.sockets {
            let busy = match sock {
                SimSocket::Tcp(t) => {
                    t.connected
                        && !t.aborted
                        && (!t.written.is_empty()
                            || self.seen.get(id).is_none_or(|s| {
                                !s.fin_sent
                                    && (t.shut_write
                                        || matches!(
                                            s.behaviour,
                                            Some(TcpBehaviour::Fixed(_)) | None
                                        ))
                            }))
                }
                SimSocket::Udp(u) => !u.sent.is_empty(),
                SimSocket::Icmp(i) => !i.sent.is_empty(),
            };
            if busy {
                ids.push(*id);
            }
        }
        ids.sort_unstable();
        for &id in &ids {
            match self.host.sockets.get_mut(&id) {
                Some(SimSocket::Tcp(_)) => self.react_tcp(id),
                Some(SimSocket::Udp(u)) => {
                    let sent = std::mem::take(&mut u.sent);
                    let dst = u.dst;
                    for d in sent {
                        if self.script.is_upstream(dst) {
                            if let Some(answer) = dns_answer(&self.script, &d) {
                                self.host.deliver_udp(id, &answer);
                            }
                            continue;
                        }
                        match self.script.udp_for(dst.port()) {
                            UdpBehaviour::Echo => self.host.deliver_udp(id, &d),
                            UdpBehaviour::Burst(n) => {
                                for _ in 0..n {
                                    self.host.deliver_udp(id, &d);
                                }
                            }
                            UdpBehaviour::Refuse => self.host.refuse_udp(id),
                            UdpBehaviour::Silent => {}
                        }
                    }
                }
                Some(SimSocket::Icmp(i)) => {
                    let sent = std::mem::take(&mut i.sent);
                    if self.script.icmp {
                        for (dst, msg) in sent {
                            if let Some(reply) = echo_reply(&msg) {
                                self.host.deliver_icmp(id, dst, &reply);
                            }
                        }
                    }
                }
                None => {}
            }
        }
        self.ids = ids;
    }

    fn react_tcp(&mut self, id: SockId) {
        let Some(t) = self.host.tcp(id) else { return };
        if !t.connected || t.aborted {
            return;
        }
        let port = t.dst.port();
        let written = std::mem::take(&mut t.written);
        let (guest_closed, recv_empty) = (t.shut_write, t.recv.is_empty());
        let seen = self.seen.entry(id).or_default();
        let behaviour = *seen
            .behaviour
            .get_or_insert_with(|| self.script.tcp_for(port));
        let mut deliver: Option<Vec<u8>> = None;
        let mut fin = false;
        match behaviour {
            TcpBehaviour::Echo => {
                if !written.is_empty() {
                    deliver = Some(written.clone());
                }
                fin = guest_closed && !seen.fin_sent;
            }
            TcpBehaviour::Sink => fin = guest_closed && !seen.fin_sent,
            TcpBehaviour::Fixed(n) => {
                if !seen.fixed_sent {
                    seen.fixed_sent = true;
                    deliver = Some((0..n).map(pattern_byte).collect());
                } else {
                    fin = recv_empty && !seen.fin_sent;
                }
            }
        }
        if fin {
            seen.fin_sent = true;
        }
        if !written.is_empty() {
            // The destination read it: the socket's send buffer has room again.
            self.host.tcp_drain(id, written.len());
        }
        if let Some(d) = deliver.filter(|d| !d.is_empty()) {
            self.host.deliver_tcp(id, &d);
        }
        if fin {
            self.host.tcp_fin(id);
        }
    }
}

/// Replays `input` under `script` and returns the frames the core sent.
pub fn replay(script: &Script, input: &[Frame]) -> Vec<Frame> {
    replay_marked(script, input).0
}

/// Replays `input` under `script` and returns the frames the core sent and which of them it
/// marked as TCP super-frames (see `gso`).
pub fn replay_marked(script: &Script, input: &[Frame]) -> (Vec<Frame>, Vec<gso::Mark>) {
    let mut d = Driver::new(script.clone());
    let mut out = Vec::new();
    let mut emit = |ts: Duration, f: &[u8]| {
        out.push(Frame {
            ts,
            data: f.to_vec(),
        })
    };
    for f in input {
        d.frame(f.ts, &f.data, &mut emit);
    }
    d.finish(&mut emit);
    (out, d.marks)
}

/// An ICMP echo reply to an echo request (from its ICMP header on), or None for anything else.
pub fn echo_reply(msg: &[u8]) -> Option<Vec<u8>> {
    if msg.len() < 8 || msg[0] != 8 {
        return None;
    }
    let mut r = msg.to_vec();
    r[0] = 0;
    r[2] = 0;
    r[3] = 0;
    let c = checksum(&r);
    r[2..4].copy_from_slice(&c.to_be_bytes());
    Some(r)
}

fn checksum(b: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in b.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += w as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The name asked in a DNS query (lower case, dotted) and where the question ends.
fn dns_question(q: &[u8]) -> Option<(String, usize)> {
    let mut i = 12;
    let mut name = String::new();
    loop {
        let len = *q.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        if len > 63 || name.len() > 255 {
            return None;
        }
        let label = q.get(i..i + len)?;
        if !name.is_empty() {
            name.push('.');
        }
        name.push_str(&String::from_utf8_lossy(label).to_ascii_lowercase());
        i += len;
    }
    let end = i + 4;
    (end <= q.len()).then_some((name, end))
}

/// The upstream's answer to a relayed query, from the script's table: the A records of a
/// listed name's IPv4 addresses asked as A, the AAAA records of its IPv6 addresses asked as
/// AAAA, no records (NOERROR) for a listed name asked otherwise, NXDOMAIN for the rest.
/// Malformed queries get no answer (as from a real resolver that drops them).
pub fn dns_answer(script: &Script, q: &[u8]) -> Option<Vec<u8>> {
    if q.len() < 12 || q[2] & 0x80 != 0 || u16::from_be_bytes([q[4], q[5]]) != 1 {
        return None;
    }
    let (name, end) = dns_question(q)?;
    let qtype = u16::from_be_bytes([q[end - 4], q[end - 3]]);
    let mut a = q[..end].to_vec();
    a[2] = 0x80 | (q[2] & 0x01); // QR, RD copied
    a[3] = 0x80; // RA
    a[6..12].fill(0);
    let mut known = false;
    let mut answers = 0u8;
    for ip in script.dns_lookup(&name) {
        known = true;
        let rdata = match (ip, qtype) {
            (IpAddr::V4(v4), 1) => v4.octets().to_vec(),
            (IpAddr::V6(v6), 28) => v6.octets().to_vec(),
            _ => continue,
        };
        answers += 1;
        a.extend_from_slice(&[0xc0, 0x0c]);
        a.extend_from_slice(&qtype.to_be_bytes());
        a.extend_from_slice(&[0, 1, 0, 0, 0x01, 0x2c, 0, rdata.len() as u8]);
        a.extend_from_slice(&rdata);
    }
    a[7] = answers;
    if !known {
        a[3] |= 3;
    }
    Some(a)
}

#[cfg(test)]
mod tests;
