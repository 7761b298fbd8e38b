//! `hubnat-load`: the TCP load generator of the comparison (tools/compare.sh), and the small server
//! it runs against.
//!
//! - `serve`: an echo server (one thread, mio): every byte a connection sends comes back; a
//!   connection is closed when its peer closes.
//! - `rr`: request/response latency over one connection: send REQ bytes, wait for them back,
//!   repeat for the duration; p50/p99/p99.9 of the round trips.
//! - `crr`: connection rate: connect, one exchange, close, repeat; connections per second and the
//!   latency of the whole cycle.
//! - `hold`: open N connections (each confirmed by one exchange), keep them idle for a while and
//!   report how many were held (the comparison samples the NAT's memory meanwhile).
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
    about = "TCP request/response, connection-rate and connection-count load, and its echo server"
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
    raise_nofile();
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
    };
    if let Err(e) = r {
        eprintln!("hubnat-load: {e:#}");
        std::process::exit(1);
    }
}

/// Lifts the soft limit on open files to the hard limit (10,000 connections need it).
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
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
