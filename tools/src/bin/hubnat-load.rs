//! `hubnat-load`: the TCP load generator of the comparison (tools/compare.sh), the small server
//! it runs against, and a DHCP load of many clients (tools/bench-dhcp.sh).
//!
//! - `serve`: an echo server (one thread, mio): every byte a connection sends comes back; a
//!   connection is closed when its peer closes.
//! - `rr`: request/response latency over one connection: send REQ bytes, wait for them back,
//!   repeat for the duration; p50/p99/p99.9 of the round trips.
//! - `crr`: connection rate: connect, one exchange, close, repeat; connections per second and the
//!   latency of the whole cycle.
//! - `hold`: open N connections (each confirmed by one exchange), keep them idle for a while and
//!   report how many were held (the comparison samples the NAT's memory meanwhile).
//! - `dhcp`: many DHCP clients (one MAC each) on a raw AF_PACKET socket: first one exchange
//!   (DISCOVER→OFFER, REQUEST→ACK) after another, for the latency of one; then N exchanges
//!   outstanding at once, for the leases granted per second. Each client releases its lease
//!   after the ACK, so that every exchange is a new binding.
//! - `wake`: what waking a sleeping thread costs on this machine, apart from any NAT: one
//!   thread sends a byte over a Unix socket pair to another, which sends it back, the other
//!   pinned to the sender's CPU and then to another. On a VM a wake-up across CPUs is an
//!   interrupt between virtual CPUs, whose price sets how fast any chain of hand-offs can go
//!   (a connection's cycle through a NAT is one); tools/bench-crr.sh prints it beside its runs.
//!
//! Every client prints one JSON object on stdout with `--json`, or a readable line without.

use std::collections::HashMap;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use hdrhistogram::Histogram;
use mio::net::{TcpListener, TcpStream as MioStream};
use mio::{Events, Interest, Poll, Token};
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "hubnat-load",
    version,
    about = "TCP request/response, connection-rate and connection-count load, its echo server, DHCP load, and the machine's wake-up cost"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Echo server: every byte comes back; closes a connection when its peer does.
    Serve {
        #[arg(long, default_value = "0.0.0.0:7000")]
        listen: SocketAddr,
    },
    /// Request/response latency over one connection.
    Rr(ClientArgs),
    /// Connection rate: connect, one exchange, close; repeated.
    Crr(ClientArgs),
    /// Open CONNS connections, confirm each with one exchange, hold them idle for HOLD seconds.
    Hold {
        #[command(flatten)]
        common: ClientArgs,
        /// How many connections to open.
        #[arg(long, default_value_t = 1000)]
        conns: usize,
        /// Connections being set up at once.
        #[arg(long, default_value_t = 128)]
        parallel: usize,
        /// Seconds to keep them open once set up.
        #[arg(long, default_value_t = 5.0)]
        hold: f64,
        /// Written (with the count held) once every connection is set up or has failed.
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
    /// DHCP clients on a raw socket: serial exchange latency, then leases a second with
    /// exchanges outstanding.
    Dhcp(dhcp::DhcpArgs),
    /// The cost of waking a thread that sleeps on the same CPU and on another (a byte sent
    /// back and forth over a Unix socket pair, a pause between exchanges).
    Wake(WakeArgs),
}

#[derive(Args)]
struct WakeArgs {
    /// Exchanges for each placement of the answering thread.
    #[arg(long, default_value_t = 20_000)]
    count: u32,
    /// Pause before each exchange (µs), long enough for the answering thread to be asleep
    /// (and its CPU idle) when the byte comes.
    #[arg(long, default_value_t = 50)]
    pause_us: u64,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Clone)]
struct ClientArgs {
    /// The echo server (`hubnat-load serve`).
    #[arg(long)]
    connect: SocketAddr,
    /// Seconds to run (rr, crr), or to set up connections in (hold).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Request size in bytes (echoed back).
    #[arg(long, default_value_t = 1)]
    size: usize,
    /// Seconds to wait for any one step (connect, answer) before giving up.
    #[arg(long, default_value_t = 5.0)]
    timeout: f64,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

fn main() {
    // 10,000 connections need more than the usual soft limit; best effort: without it the hold
    // mode reports how many it could open.
    hubnat_daemon::machine::raise_open_files_limit();
    let r = match Cli::parse().cmd {
        Cmd::Serve { listen } => serve(listen),
        Cmd::Rr(a) => rr(&a),
        Cmd::Crr(a) => crr(&a),
        Cmd::Hold {
            common,
            conns,
            parallel,
            hold,
            ready_file,
        } => hold_conns(&common, conns, parallel, hold, ready_file),
        Cmd::Dhcp(a) => dhcp::run(&a),
        Cmd::Wake(a) => wake::run(&a),
    };
    if let Err(e) = r {
        eprintln!("hubnat-load: {e:#}");
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------------------------------------
// The server

const LISTENER: Token = Token(usize::MAX);

struct Conn {
    s: MioStream,
    /// Bytes read but not yet written back.
    pending: Vec<u8>,
}

fn serve(listen: SocketAddr) -> Result<()> {
    let mut poll = Poll::new()?;
    let mut l = TcpListener::bind(listen).with_context(|| format!("bind {listen}"))?;
    poll.registry()
        .register(&mut l, LISTENER, Interest::READABLE)?;
    eprintln!("listening on {listen}");
    let mut conns: HashMap<usize, Conn> = HashMap::new();
    let mut next = 0usize;
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(e.into());
        }
        for ev in events.iter() {
            if ev.token() == LISTENER {
                loop {
                    match l.accept() {
                        Ok((mut s, _)) => {
                            let _ = s.set_nodelay(true);
                            next = next.wrapping_add(1) % (usize::MAX - 1);
                            poll.registry()
                                .register(&mut s, Token(next), Interest::READABLE)?;
                            conns.insert(
                                next,
                                Conn {
                                    s,
                                    pending: Vec::new(),
                                },
                            );
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        // Out of descriptors or a connection reset before accept: go on.
                        Err(e) => {
                            eprintln!("accept: {e}");
                            break;
                        }
                    }
                }
                continue;
            }
            let id = ev.token().0;
            let done = match conns.get_mut(&id) {
                Some(c) => echo(c, &mut buf, &poll, id),
                None => continue,
            };
            if done {
                if let Some(mut c) = conns.remove(&id) {
                    let _ = poll.registry().deregister(&mut c.s);
                }
            }
        }
    }
}

/// Moves what is readable back out; true when the connection is finished.
fn echo(c: &mut Conn, buf: &mut [u8], poll: &Poll, id: usize) -> bool {
    // Flush what an earlier short write left.
    if !c.pending.is_empty() {
        match c.s.write(&c.pending) {
            Ok(n) => {
                c.pending.drain(..n);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
        if !c.pending.is_empty() {
            return false;
        }
        let _ = poll
            .registry()
            .reregister(&mut c.s, Token(id), Interest::READABLE);
    }
    loop {
        let n = match c.s.read(buf) {
            Ok(0) => {
                let _ = c.s.shutdown(Shutdown::Write);
                return true;
            }
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return true,
        };
        let mut off = 0;
        while off < n {
            match c.s.write(&buf[off..n]) {
                Ok(w) => off += w,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    c.pending.extend_from_slice(&buf[off..n]);
                    let _ = poll.registry().reregister(
                        &mut c.s,
                        Token(id),
                        Interest::READABLE | Interest::WRITABLE,
                    );
                    return false;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return true,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Clients

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.001))
}

fn new_hist() -> Histogram<u64> {
    // 1 µs ..= 60 s in nanoseconds, 3 significant digits.
    Histogram::new_with_bounds(1_000, 60_000_000_000, 3).expect("valid histogram bounds")
}

fn record(h: &mut Histogram<u64>, d: Duration) {
    let ns = (d.as_nanos() as u64).clamp(h.low(), h.high());
    h.record(ns).expect("clamped into the histogram's range");
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

fn latency_json(h: &Histogram<u64>) -> serde_json::Value {
    json!({
        "p50_us": us(h.value_at_quantile(0.50)),
        "p99_us": us(h.value_at_quantile(0.99)),
        "p999_us": us(h.value_at_quantile(0.999)),
        "max_us": us(h.max()),
        "mean_us": h.mean() / 1000.0,
    })
}

/// One exchange: `req` out, the same number of bytes back.
fn exchange(s: &mut TcpStream, req: &[u8], back: &mut [u8]) -> io::Result<()> {
    s.write_all(req)?;
    s.read_exact(&mut back[..req.len()])
}

fn connect(a: &ClientArgs) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&a.connect, secs(a.timeout))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(secs(a.timeout)))?;
    s.set_write_timeout(Some(secs(a.timeout)))?;
    Ok(s)
}

fn check_size(a: &ClientArgs) -> Result<()> {
    if a.size == 0 || a.size > 1 << 20 {
        bail!("--size must be 1 ..= 1048576 bytes");
    }
    Ok(())
}

fn rr(a: &ClientArgs) -> Result<()> {
    check_size(a)?;
    let req = vec![0x5au8; a.size];
    let mut back = vec![0u8; a.size];
    let mut s = connect(a).with_context(|| format!("connect {}", a.connect))?;
    // One exchange before the clock starts: the connection and both ends are warm.
    exchange(&mut s, &req, &mut back).context("first exchange")?;
    let mut h = new_hist();
    let start = Instant::now();
    let end = start + secs(a.duration);
    let mut n = 0u64;
    while Instant::now() < end {
        let t = Instant::now();
        exchange(&mut s, &req, &mut back).with_context(|| format!("exchange {n}"))?;
        record(&mut h, t.elapsed());
        n += 1;
    }
    let el = start.elapsed().as_secs_f64();
    let _ = s.shutdown(Shutdown::Write);
    if a.json {
        let mut v = latency_json(&h);
        v["mode"] = json!("rr");
        v["exchanges"] = json!(n);
        v["per_sec"] = json!(n as f64 / el);
        v["size"] = json!(a.size);
        println!("{v}");
    } else {
        println!(
            "rr: {n} exchanges of {} B in {el:.2} s: p50 {:.1} µs, p99 {:.1} µs, p99.9 {:.1} µs",
            a.size,
            us(h.value_at_quantile(0.5)),
            us(h.value_at_quantile(0.99)),
            us(h.value_at_quantile(0.999))
        );
    }
    Ok(())
}

fn crr(a: &ClientArgs) -> Result<()> {
    check_size(a)?;
    let req = vec![0xa5u8; a.size];
    let mut back = vec![0u8; a.size];
    let mut h = new_hist();
    let start = Instant::now();
    let end = start + secs(a.duration);
    let (mut n, mut failed) = (0u64, 0u64);
    let mut first_err: Option<String> = None;
    while Instant::now() < end {
        let t = Instant::now();
        let r = connect(a).and_then(|mut s| {
            exchange(&mut s, &req, &mut back)?;
            // Our side closes first; the echo server then closes its own.
            drop(s);
            Ok(())
        });
        match r {
            Ok(()) => {
                record(&mut h, t.elapsed());
                n += 1;
            }
            Err(e) => {
                failed += 1;
                first_err.get_or_insert_with(|| e.to_string());
                // A refused or timed-out connection repeated in a tight loop measures nothing.
                if failed > 100 && failed > n {
                    break;
                }
            }
        }
    }
    let el = start.elapsed().as_secs_f64();
    if n == 0 {
        bail!(
            "no connection completed ({failed} failed: {})",
            first_err.unwrap_or_default()
        );
    }
    if a.json {
        let mut v = latency_json(&h);
        v["mode"] = json!("crr");
        v["connections"] = json!(n);
        v["failed"] = json!(failed);
        v["per_sec"] = json!(n as f64 / el);
        v["first_error"] = json!(first_err);
        println!("{v}");
    } else {
        println!(
            "crr: {n} connections in {el:.2} s ({:.0}/s), {failed} failed; cycle p50 {:.1} µs, p99 {:.1} µs",
            n as f64 / el,
            us(h.value_at_quantile(0.5)),
            us(h.value_at_quantile(0.99))
        );
    }
    Ok(())
}

#[derive(PartialEq)]
enum HoldState {
    Connecting,
    Sent,
    Held,
}

fn hold_conns(
    a: &ClientArgs,
    want: usize,
    parallel: usize,
    hold: f64,
    ready_file: Option<PathBuf>,
) -> Result<()> {
    check_size(a)?;
    let req = vec![0x33u8; a.size];
    let mut buf = vec![0u8; 64 * 1024];
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(1024);
    let mut conns: Vec<Option<(MioStream, HoldState, usize, Instant)>> = Vec::with_capacity(want);
    let (mut started, mut inflight, mut held, mut failed) = (0usize, 0usize, 0usize, 0usize);
    let mut first_err: Option<String> = None;
    let t0 = Instant::now();
    let deadline = t0 + secs(a.duration.max(a.timeout));
    let step = secs(a.timeout);
    let fail = |e: String, first_err: &mut Option<String>, failed: &mut usize| {
        *failed += 1;
        first_err.get_or_insert(e);
    };
    while held + failed < want && Instant::now() < deadline {
        // A whole first wave failed and none got through: the path is down, not slow.
        if held == 0 && failed >= parallel.max(1).min(want) {
            break;
        }
        while started < want && inflight < parallel.max(1) {
            match MioStream::connect(a.connect) {
                Ok(mut s) => {
                    poll.registry()
                        .register(&mut s, Token(started), Interest::WRITABLE)?;
                    conns.push(Some((s, HoldState::Connecting, 0, Instant::now())));
                    inflight += 1;
                }
                Err(e) => {
                    // Keep indices aligned with tokens.
                    fail(e.to_string(), &mut first_err, &mut failed);
                    conns.push(None);
                }
            }
            started += 1;
        }
        poll.poll(&mut events, Some(Duration::from_millis(100)))?;
        for ev in events.iter() {
            let i = ev.token().0;
            let Some(Some((s, st, got, _))) = conns.get_mut(i) else {
                continue;
            };
            let r: io::Result<bool> = (|| {
                if *st == HoldState::Connecting {
                    if let Some(e) = s.take_error()? {
                        return Err(e);
                    }
                    match s.peer_addr() {
                        Ok(_) => {}
                        Err(e) if e.kind() == ErrorKind::NotConnected => return Ok(false),
                        Err(e) => return Err(e),
                    }
                    s.set_nodelay(true)?;
                    // The request is tiny: one write on a fresh connection takes it whole.
                    let n = s.write(&req)?;
                    if n != req.len() {
                        return Err(io::Error::other("short write of the request"));
                    }
                    *st = HoldState::Sent;
                    poll.registry()
                        .reregister(s, Token(i), Interest::READABLE)?;
                }
                if *st == HoldState::Sent {
                    loop {
                        match s.read(&mut buf) {
                            Ok(0) => return Err(io::Error::other("closed by the peer")),
                            Ok(n) => {
                                *got += n;
                                if *got >= req.len() {
                                    return Ok(true);
                                }
                            }
                            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                            Err(e) => return Err(e),
                        }
                    }
                }
                Ok(false)
            })();
            match r {
                Ok(true) => {
                    *st = HoldState::Held;
                    let _ = poll.registry().deregister(s);
                    held += 1;
                    inflight -= 1;
                }
                Ok(false) => {}
                Err(e) => {
                    *st = HoldState::Held;
                    *got = usize::MAX;
                    let _ = poll.registry().deregister(s);
                    inflight -= 1;
                    fail(e.to_string(), &mut first_err, &mut failed);
                }
            }
        }
        // Connections stuck longer than the step timeout count as failed.
        let now = Instant::now();
        for (s, st, got, since) in conns.iter_mut().flatten() {
            if *st != HoldState::Held && now.duration_since(*since) > step {
                *st = HoldState::Held;
                *got = usize::MAX;
                let _ = poll.registry().deregister(s);
                inflight -= 1;
                fail("timed out".into(), &mut first_err, &mut failed);
            }
        }
    }
    let setup = t0.elapsed().as_secs_f64();
    if let Some(p) = &ready_file {
        std::fs::write(p, format!("{held}\n")).with_context(|| format!("write {}", p.display()))?;
    }
    std::thread::sleep(secs(hold));
    // Every held connection must still be there: one more exchange on each would be a workload
    // of its own, so check only that none was closed under us.
    let mut lost = 0usize;
    for (s, st, got, _) in conns.iter_mut().flatten() {
        if *st == HoldState::Held && *got != usize::MAX {
            let _ = s.set_nodelay(true);
            match s.read(&mut buf) {
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                _ => lost += 1,
            }
        }
    }
    if a.json {
        println!(
            "{}",
            json!({
                "mode": "hold",
                "requested": want,
                "held": held,
                "failed": failed,
                "lost_while_held": lost,
                "setup_s": setup,
                "first_error": first_err,
            })
        );
    } else {
        println!(
            "hold: {held} of {want} connections held ({failed} failed, {lost} lost while held), set up in {setup:.2} s{}",
            first_err.map(|e| format!("; first error: {e}")).unwrap_or_default()
        );
    }
    if held == 0 {
        bail!("no connection could be held");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// DHCP

mod dhcp {
    use std::collections::{HashMap, VecDeque};
    use std::net::{Ipv4Addr, SocketAddrV4};
    use std::time::{Duration, Instant};

    use anyhow::{bail, Context, Result};
    use clap::Args;
    use hdrhistogram::Histogram;
    use hubnat_core::config::Mac;
    use hubnat_replay::craft;
    use hubnat_runtime::port::af_packet::{Direction, PacketSocket};
    use serde_json::json;
    use smoltcp::wire::IpProtocol;

    use super::{latency_json, new_hist, record, us};

    const DISCOVER: u8 = 1;
    const OFFER: u8 = 2;
    const REQUEST: u8 = 3;
    const ACK: u8 = 5;
    const NAK: u8 = 6;
    const RELEASE: u8 = 7;

    #[derive(Args, Clone)]
    pub struct DhcpArgs {
        /// The interface the clients are on (the guest's side of the server's segment).
        #[arg(long)]
        iface: String,
        /// Distinct clients (MAC addresses); keep within the server's address range.
        #[arg(long, default_value_t = 150)]
        clients: u32,
        /// Exchanges one after another, each timed (after 10 untimed ones).
        #[arg(long, default_value_t = 1000)]
        serial: u32,
        /// Exchanges in the concurrent phase.
        #[arg(long, default_value_t = 3000)]
        exchanges: u32,
        /// Exchanges outstanding at once in the concurrent phase (at most one per client).
        #[arg(long, default_value_t = 32)]
        outstanding: u32,
        /// Seconds before a message without an answer is sent again.
        #[arg(long, default_value_t = 1.0)]
        retry: f64,
        /// Seconds a phase may take in all.
        #[arg(long, default_value_t = 120.0)]
        timeout: f64,
        /// Keep the leases: no RELEASE after an ACK (a client's later exchanges are renewals).
        #[arg(long)]
        no_release: bool,
        /// The second byte of the clients' MACs (02:XX:..), so that two runs do not collide.
        #[arg(long, default_value_t = 0x4c)]
        mac_tag: u8,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    }

    /// What an exchange waits for.
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    enum Step {
        Offer,
        Ack { ip: Ipv4Addr, server: Ipv4Addr },
    }

    struct Exchange {
        client: u32,
        step: Step,
        started: Instant,
        sent: Instant,
    }

    /// A server's answer, as far as the clients care.
    struct Reply {
        kind: u8,
        xid: u32,
        yiaddr: Ipv4Addr,
        server: Ipv4Addr,
        server_mac: Mac,
    }

    fn parse_reply(f: &[u8]) -> Option<Reply> {
        // Ethernet, IPv4 without options or with, UDP 67 → 68, BOOTREPLY.
        if f.len() < 14 + 20 + 8 + 240 || f[12..14] != [0x08, 0x00] {
            return None;
        }
        let ip = &f[14..];
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        if ip[0] >> 4 != 4 || ip[9] != 17 || ihl < 20 || ip.len() < ihl + 8 {
            return None;
        }
        let udp = &ip[ihl..];
        if udp[0..2] != 67u16.to_be_bytes() || udp[2..4] != 68u16.to_be_bytes() {
            return None;
        }
        let m = &udp[8..];
        if m.len() < 240 || m[0] != 2 || m[236..240] != [99, 130, 83, 99] {
            return None;
        }
        let xid = u32::from_be_bytes([m[4], m[5], m[6], m[7]]);
        let yiaddr = Ipv4Addr::new(m[16], m[17], m[18], m[19]);
        let (mut kind, mut server) = (0, Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]));
        let mut i = 240;
        while i < m.len() {
            match m[i] {
                0 => i += 1,
                255 => break,
                code => {
                    let len = usize::from(*m.get(i + 1)?);
                    let v = m.get(i + 2..i + 2 + len)?;
                    match (code, len) {
                        (53, 1) => kind = v[0],
                        (54, 4) => server = Ipv4Addr::new(v[0], v[1], v[2], v[3]),
                        _ => {}
                    }
                    i += 2 + len;
                }
            }
        }
        let mut server_mac = [0u8; 6];
        server_mac.copy_from_slice(&f[6..12]);
        Some(Reply {
            kind,
            xid,
            yiaddr,
            server,
            server_mac: Mac(server_mac),
        })
    }

    struct Clients {
        sock: PacketSocket,
        mac_tag: u8,
        give_back: bool,
        ident: u16,
        /// Each client's exchange count, so that every exchange has its own xid.
        rounds: Vec<u32>,
        retries: u64,
        naks: u64,
        buf: Vec<u8>,
    }

    impl Clients {
        fn mac(&self, c: u32) -> Mac {
            let b = c.to_be_bytes();
            Mac([0x02, self.mac_tag, b[0], b[1], b[2], b[3]])
        }

        fn xid(&self, c: u32) -> u32 {
            (c << 12) | (self.rounds[c as usize] & 0xfff)
        }

        fn send(&mut self, c: u32, step: Step) -> Result<()> {
            let mac = self.mac(c);
            let xid = self.xid(c);
            let prl = (55u8, vec![1, 3, 6, 15, 51, 54]);
            let msg = match step {
                Step::Offer => craft::dhcp(mac, xid, Ipv4Addr::UNSPECIFIED, DISCOVER, &[prl]),
                Step::Ack { ip, server } => craft::dhcp(
                    mac,
                    xid,
                    Ipv4Addr::UNSPECIFIED,
                    REQUEST,
                    &[
                        (50, ip.octets().to_vec()),
                        (54, server.octets().to_vec()),
                        prl,
                    ],
                ),
            };
            self.ident = self.ident.wrapping_add(1);
            let frame = craft::dhcp_frame(mac, Ipv4Addr::UNSPECIFIED, false, &msg, self.ident);
            self.sock.send(&frame).context("send")
        }

        /// Gives the address back (unicast to the server, as a client does), so that the next
        /// exchange of this client is a new binding again.
        fn release(&mut self, c: u32, r: &Reply) -> Result<()> {
            let mac = self.mac(c);
            let msg = craft::dhcp(
                mac,
                self.xid(c),
                r.yiaddr,
                RELEASE,
                &[(54, r.server.octets().to_vec())],
            );
            self.ident = self.ident.wrapping_add(1);
            let d = craft::udp(
                SocketAddrV4::new(r.yiaddr, 68),
                SocketAddrV4::new(r.server, 67),
                &msg,
            );
            let ip = craft::ipv4(
                r.yiaddr,
                r.server,
                IpProtocol::Udp,
                self.ident,
                (0, false),
                &d,
            );
            self.sock
                .send(&craft::ethernet(r.server_mac, mac, 0x0800, &ip))
                .context("send")
        }

        /// The next answer to one of our clients, or None when the read timed out.
        fn recv(&mut self) -> Result<Option<Reply>> {
            loop {
                match self.sock.recv(&mut self.buf).context("receive")? {
                    None => return Ok(None),
                    Some((_, Direction::Outgoing)) => continue,
                    Some((n, Direction::Incoming)) => {
                        if let Some(r) = parse_reply(&self.buf[..n]) {
                            return Ok(Some(r));
                        }
                    }
                }
            }
        }

        /// Runs `total` exchanges with at most `outstanding` in flight, handing each to the
        /// client that has been idle longest; returns the latency histogram and elapsed time.
        fn run(
            &mut self,
            clients: u32,
            total: u32,
            outstanding: u32,
            retry: Duration,
            timeout: Duration,
        ) -> Result<(Histogram<u64>, Duration)> {
            let mut h = new_hist();
            let mut idle: VecDeque<u32> = (0..clients).collect();
            let mut flight: HashMap<u32, Exchange> = HashMap::new();
            let (mut started, mut done) = (0u32, 0u32);
            let begin = Instant::now();
            let mut last_scan = begin;
            while done < total {
                while started < total && (flight.len() as u32) < outstanding {
                    let Some(c) = idle.pop_front() else { break };
                    self.rounds[c as usize] = self.rounds[c as usize].wrapping_add(1);
                    let now = Instant::now();
                    self.send(c, Step::Offer)?;
                    flight.insert(
                        self.xid(c),
                        Exchange {
                            client: c,
                            step: Step::Offer,
                            started: now,
                            sent: now,
                        },
                    );
                    started += 1;
                }
                if begin.elapsed() > timeout {
                    bail!(
                        "{done} of {total} exchanges done in {:.0} s; {} waiting",
                        timeout.as_secs_f64(),
                        flight.len()
                    );
                }
                let got = self.recv()?;
                // Late answers are looked for on a clock, not only when the wire is quiet: a
                // lost message must not wait for the other exchanges to end.
                if got.is_none() || last_scan.elapsed() >= retry / 4 {
                    last_scan = Instant::now();
                    let now = last_scan;
                    let late: Vec<u32> = flight
                        .iter()
                        .filter(|(_, e)| now.duration_since(e.sent) >= retry)
                        .map(|(&x, _)| x)
                        .collect();
                    for x in late {
                        let (c, step) = {
                            let e = flight.get_mut(&x).expect("listed above");
                            e.sent = now;
                            (e.client, e.step)
                        };
                        self.retries += 1;
                        self.send(c, step)?;
                    }
                }
                let Some(r) = got else { continue };
                let Some(e) = flight.get_mut(&r.xid) else {
                    continue;
                };
                match (e.step, r.kind) {
                    (Step::Offer, OFFER) => {
                        e.step = Step::Ack {
                            ip: r.yiaddr,
                            server: r.server,
                        };
                        e.sent = Instant::now();
                        let (c, step) = (e.client, e.step);
                        self.send(c, step)?;
                    }
                    (Step::Ack { .. }, ACK) => {
                        record(&mut h, e.started.elapsed());
                        let c = e.client;
                        flight.remove(&r.xid);
                        if self.give_back {
                            self.release(c, &r)?;
                        }
                        idle.push_back(c);
                        done += 1;
                    }
                    (Step::Ack { .. }, NAK) => {
                        // Start over with a DISCOVER.
                        self.naks += 1;
                        e.step = Step::Offer;
                        e.sent = Instant::now();
                        let c = e.client;
                        self.send(c, Step::Offer)?;
                    }
                    _ => {}
                }
            }
            Ok((h, begin.elapsed()))
        }
    }

    pub fn run(a: &DhcpArgs) -> Result<()> {
        if a.clients == 0 || a.clients > 1 << 20 || a.outstanding == 0 {
            bail!("--clients must be 1 ..= 1048576 and --outstanding at least 1");
        }
        let sock = PacketSocket::open(&a.iface, Duration::from_millis(5))
            .with_context(|| format!("AF_PACKET on {}", a.iface))?;
        let mut cl = Clients {
            sock,
            mac_tag: a.mac_tag,
            give_back: !a.no_release,
            ident: 0,
            rounds: vec![0; a.clients as usize],
            retries: 0,
            naks: 0,
            buf: vec![0u8; 2048],
        };
        let retry = Duration::from_secs_f64(a.retry.max(0.01));
        let timeout = Duration::from_secs_f64(a.timeout.max(1.0));
        // Untimed: the server's and our first exchanges warm caches and allocations.
        cl.run(a.clients, 10.min(a.clients), 1, retry, timeout)
            .context("warm-up")?;
        let (serial, serial_el) = cl
            .run(a.clients, a.serial, 1, retry, timeout)
            .context("serial exchanges")?;
        let serial_retries = cl.retries;
        let outstanding = a.outstanding.min(a.clients);
        let (conc, conc_el) = cl
            .run(a.clients, a.exchanges, outstanding, retry, timeout)
            .context("concurrent exchanges")?;
        let rate = f64::from(a.exchanges) / conc_el.as_secs_f64().max(1e-9);
        if a.json {
            let mut s = latency_json(&serial);
            s["exchanges"] = json!(a.serial);
            s["per_sec"] = json!(f64::from(a.serial) / serial_el.as_secs_f64().max(1e-9));
            s["retries"] = json!(serial_retries);
            let mut c = latency_json(&conc);
            c["exchanges"] = json!(a.exchanges);
            c["outstanding"] = json!(outstanding);
            c["leases_per_sec"] = json!(rate);
            c["elapsed_s"] = json!(conc_el.as_secs_f64());
            c["retries"] = json!(cl.retries - serial_retries);
            let v = json!({
                "mode": "dhcp",
                "clients": a.clients,
                "serial": s,
                "concurrent": c,
                "naks": cl.naks,
            });
            println!("{v}");
        } else {
            println!(
                "dhcp serial: {} exchanges: p50 {:.1} µs, p99 {:.1} µs ({} retries)",
                a.serial,
                us(serial.value_at_quantile(0.5)),
                us(serial.value_at_quantile(0.99)),
                serial_retries
            );
            println!(
                "dhcp concurrent: {} exchanges, {outstanding} outstanding, {} clients: {rate:.0} leases/s, p50 {:.1} µs, p99 {:.1} µs ({} retries, {} NAKs)",
                a.exchanges,
                a.clients,
                us(conc.value_at_quantile(0.5)),
                us(conc.value_at_quantile(0.99)),
                cl.retries - serial_retries,
                cl.naks
            );
        }
        Ok(())
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn a_reply_is_parsed_and_other_frames_are_not() {
            let mac = Mac([2, 0x4c, 0, 0, 0, 7]);
            let mut m = craft::dhcp(
                mac,
                0x1234,
                Ipv4Addr::UNSPECIFIED,
                OFFER,
                &[(54, vec![192, 168, 30, 1])],
            );
            m[0] = 2;
            m[16..20].copy_from_slice(&[192, 168, 30, 10]);
            let d = craft::udp(
                SocketAddrV4::new(Ipv4Addr::new(192, 168, 30, 1), 67),
                SocketAddrV4::new(Ipv4Addr::BROADCAST, 68),
                &m,
            );
            let ip = craft::ipv4(
                Ipv4Addr::new(192, 168, 30, 1),
                Ipv4Addr::BROADCAST,
                IpProtocol::Udp,
                1,
                (0, false),
                &d,
            );
            let server = Mac([0, 0xac, 1, 2, 3, 4]);
            let f = craft::ethernet(Mac::BROADCAST, server, 0x0800, &ip);
            let r = parse_reply(&f).unwrap();
            assert_eq!((r.kind, r.xid), (OFFER, 0x1234));
            assert_eq!(r.yiaddr, Ipv4Addr::new(192, 168, 30, 10));
            assert_eq!(r.server, Ipv4Addr::new(192, 168, 30, 1));
            assert_eq!(r.server_mac, server);
            // Truncated anywhere: no panic, no reply.
            for n in 0..f.len() {
                let _ = parse_reply(&f[..n]);
            }
            // A client's own message is not a reply.
            let own = craft::dhcp_frame(mac, Ipv4Addr::UNSPECIFIED, false, &m[..], 1);
            assert!(parse_reply(&own).is_none());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Wake-up cost

mod wake {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};

    use anyhow::{bail, Context, Result};
    use hdrhistogram::Histogram;
    use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
    use nix::unistd::Pid;
    use serde_json::json;

    use super::{latency_json, new_hist, record, us, WakeArgs};

    fn pin(cpu: usize) -> Result<()> {
        let mut set = CpuSet::new();
        set.set(cpu).context("CPU number")?;
        sched_setaffinity(Pid::from_raw(0), &set).with_context(|| format!("pinning to CPU {cpu}"))
    }

    /// The CPUs this process may run on, in order.
    fn allowed_cpus() -> Result<Vec<usize>> {
        let allowed = sched_getaffinity(Pid::from_raw(0)).context("reading the CPU affinity")?;
        Ok((0..CpuSet::count())
            .filter(|&c| allowed.is_set(c).unwrap_or(false))
            .collect())
    }

    /// The sender's `write` (which wakes the answering thread) and the whole exchange, with
    /// the sender on `mine` and the answering thread on `theirs`.
    fn measure(
        mine: usize,
        theirs: usize,
        a: &WakeArgs,
    ) -> Result<(Histogram<u64>, Histogram<u64>)> {
        let (mut here, mut there) = UnixStream::pair().context("socket pair")?;
        let answerer = std::thread::spawn(move || -> Result<()> {
            pin(theirs)?;
            let mut b = [0u8; 1];
            // Pinned: the sender may begin.
            there.write_all(&b)?;
            // Ends when the sender closes its end.
            while there.read(&mut b)? == 1 {
                there.write_all(&b)?;
            }
            Ok(())
        });
        pin(mine)?;
        let (mut write, mut exchange) = (new_hist(), new_hist());
        let mut b = [0u8; 1];
        if here.read_exact(&mut b).is_err() {
            // It ended before it began: say why.
            drop(here);
            return match answerer.join() {
                Ok(Err(e)) => Err(e.context("the answering thread")),
                _ => bail!("the answering thread ended before it began"),
            };
        }
        let pause = Duration::from_micros(a.pause_us);
        for _ in 0..a.count {
            std::thread::sleep(pause);
            let t = Instant::now();
            here.write_all(&b)?;
            let written = t.elapsed();
            here.read_exact(&mut b)?;
            record(&mut write, written);
            record(&mut exchange, t.elapsed());
        }
        drop(here);
        match answerer.join() {
            Ok(r) => r?,
            Err(_) => bail!("the answering thread panicked"),
        }
        Ok((write, exchange))
    }

    pub fn run(a: &WakeArgs) -> Result<()> {
        if a.count == 0 {
            bail!("--count must be at least 1");
        }
        let cpus = allowed_cpus()?;
        let Some(&first) = cpus.first() else {
            bail!("no CPU in this process's affinity");
        };
        let mut places = vec![("same_cpu", first)];
        match cpus.get(1) {
            Some(&other) => places.push(("other_cpu", other)),
            None => eprintln!("hubnat-load: one CPU allowed: measuring the same CPU only"),
        }
        let mut out = serde_json::Map::new();
        for (name, theirs) in places {
            let (write, exchange) = measure(first, theirs, a)?;
            if a.json {
                out.insert(
                    name.to_owned(),
                    json!({ "cpu": theirs, "write": latency_json(&write), "exchange": latency_json(&exchange) }),
                );
            } else {
                println!(
                    "wake, answering thread on CPU {theirs} ({}): the waking write p50 {:.1} µs (mean {:.1}), the exchange p50 {:.1} µs (mean {:.1})",
                    name.replace('_', " "),
                    us(write.value_at_quantile(0.5)),
                    write.mean() / 1000.0,
                    us(exchange.value_at_quantile(0.5)),
                    exchange.mean() / 1000.0,
                );
            }
        }
        if a.json {
            out.insert("mode".to_owned(), json!("wake"));
            out.insert("count".to_owned(), json!(a.count));
            println!("{}", serde_json::Value::Object(out));
        }
        Ok(())
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn every_exchange_is_counted_and_takes_at_least_its_write() {
            let cpu = allowed_cpus().unwrap()[0];
            let a = WakeArgs {
                count: 50,
                pause_us: 0,
                json: true,
            };
            let (write, exchange) = measure(cpu, cpu, &a).unwrap();
            assert_eq!((write.len(), exchange.len()), (50, 50));
            assert!(exchange.min() >= write.min());
            assert!(exchange.max() >= write.max());
        }
    }
}
