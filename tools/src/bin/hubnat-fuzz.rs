//! `hubnat-fuzz`: drives the sans-IO core with random and mutated frames, host-socket events and
//! jumps of time, and when the core panics, shrinks the case to a minimal one and writes it out.
//!
//! Each case is a configuration (MTU, NAT and DHCP on or off, session limits, ICMP mode,
//! timeouts, the simulated host side's behaviour) and a short sequence of steps played through
//! the replay `Driver`, whose scripted host side answers what the core sends: frames in
//! (captured, crafted, mutated), events of the host sockets, flows a port forward hands the core
//! (an accepted connection or a client's datagram, toward a guest), jumps of time that run the
//! timers, flushes, reconfigurations. The seeds are every frame of every `pcaps/*.in.pcap` and frames
//! crafted here, IPv6 among them (neighbour discovery and router solicitations with random
//! options, DHCPv6 with random options, TCP, UDP and ICMPv6 to the virtual host and beyond,
//! chains of extension headers with bad lengths, fragments out of order and overlapping).
//! Mutations are byte-level (bit flips, interesting values, truncation, extension,
//! splicing two frames) and header-aware (Ethernet, ARP, IPv4, IPv6, TCP, UDP, ICMP, DHCP fields);
//! checksums are recomputed for most mutated frames, so that they get past the checksum checks
//! into the code behind them.
//!
//! Overflow checks matter here: an arithmetic overflow in the core is a bug the fuzzer must see
//! as a panic, not a wrap it silently survives. The debug build (the CI smoke) has them; a long
//! run wants the release build's speed *and* the checks:
//!
//! ```sh
//! RUSTFLAGS="-C overflow-checks=on" cargo run --release -p hubnat-tools --bin hubnat-fuzz -- --seconds 3600
//! # or, without touching RUSTFLAGS, the release profile with the checks on:
//! CARGO_PROFILE_RELEASE_OVERFLOW_CHECKS=true cargo run --release -p hubnat-tools --bin hubnat-fuzz -- --seconds 3600
//! ```
//!
//! The binary warns at start when it was built without them.

use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant as WallClock, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Parser;
use hubnat_core::config::{IcmpMode, Mac};
use hubnat_core::sim::{ConnectOutcome, SimSocket};
use hubnat_core::stats::DropReason;
use hubnat_core::{InboundTarget, Reassembly, SockEvent, Stats};
use hubnat_replay::craft::{self, Guest6, EPOCH, GUEST_IP, HOST_IP, SERVER_IP, SERVER_IP6};
use hubnat_replay::script::{REPLAY_MAC, REPLAY_UPSTREAM};
use hubnat_replay::{decode, pcap, Driver, Script, TcpBehaviour, UdpBehaviour};
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const LONG_ABOUT: &str = "\
Fuzz hubnat's core: random and mutated frames, host-socket events and jumps of time.

Each case is a configuration (MTU 576/1500/9000/65520, NAT and DHCP on or off, small session
limits, ICMP mode, short timeouts, how the simulated host answers) and a short sequence of steps
played through the deterministic replay driver: frames in (every frame of pcaps/*.in.pcap and
crafted ones, IPv6 among them: neighbour discovery, DHCPv6, TCP, UDP and ICMPv6, extension
header chains and fragments; mutated bit- and byte-wise and field by field for Ethernet, ARP,
IPv4, IPv6, TCP, UDP, ICMP, ICMPv6 and DHCP, checksums recomputed or not), host-socket events (readable, writable, connected,
connect failed, failed; data, FIN, refusals from the destinations), inbound flows of port
forwards (accepted connections and clients' datagrams toward a guest), jumps of time small and large
(past every idle timeout) that run the timers, flushes, reconfigurations, shutdown.

A panic is caught, the case is shrunk (steps removed, frame bytes cut and zeroed, settings reset,
as long as it still panics at the same place) and written to --out as CASE.in.pcap (the frames,
as fed to the core), CASE.steps (every step, the panic message and backtrace) and CASE.toml (the
replay script: configuration and host side). `--reproduce CASE` runs it again.

Every run is deterministic for a given --seed (and the same pcaps/). Exit status: 0 no panic,
1 a panic was found, 2 an error of the harness (arguments, files), 3 a case ran past
--case-timeout (a hang).

Overflow checks must be on (an overflow is a bug to find, not to wrap): the debug build has them;
for a long run build with `--release` and RUSTFLAGS=\"-C overflow-checks=on\" (or
CARGO_PROFILE_RELEASE_OVERFLOW_CHECKS=true). The binary warns when they are off.";

#[derive(Parser)]
#[command(
    name = "hubnat-fuzz",
    version,
    about = "Fuzz the core with mutated frames, socket events and time jumps; shrink and report any panic",
    long_about = LONG_ABOUT
)]
struct Cli {
    /// Seed of the run (each case's own derives from it and the case's number); default: from
    /// the clock, printed at start.
    #[arg(long)]
    seed: Option<u64>,
    /// Stop after this many cases.
    #[arg(long)]
    cases: Option<u64>,
    /// Stop after this many seconds (60 when neither --cases nor --seconds is given).
    #[arg(long)]
    seconds: Option<f64>,
    /// Run only case N of the seed (the number a run reports).
    #[arg(long, value_name = "N")]
    only: Option<u64>,
    /// Run a written case again: PATH without extension (PATH.steps, PATH.in.pcap, PATH.toml).
    #[arg(long, value_name = "PATH")]
    reproduce: Option<PathBuf>,
    /// The seed captures: every NAME.in.pcap here (and NAME.toml, whose host tables are used).
    #[arg(long, default_value = DEFAULT_PCAPS)]
    pcaps: PathBuf,
    /// Where a failing case is written.
    #[arg(long, default_value = "target/fuzz")]
    out: PathBuf,
    /// Steps of a generated case at most (a window of a capture may add its frames).
    #[arg(long, default_value_t = 40)]
    max_steps: usize,
    /// Time given to shrinking a failing case, in seconds.
    #[arg(long, default_value_t = 120.0)]
    shrink_seconds: f64,
    /// A case running longer than this (seconds) is reported as a hang.
    #[arg(long, default_value_t = 60.0)]
    case_timeout: f64,
    /// Print each case before running it (its steps, as a written case has them; with --only).
    #[arg(long)]
    print: bool,
    /// Check the run and shrink machinery against a fake target with a known bug.
    #[arg(long, hide = true)]
    self_test: bool,
}

const DEFAULT_PCAPS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../pcaps");

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hubnat-fuzz: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    install_hook();
    if !overflow_checks_on() {
        eprintln!(
            "fuzz: warning: this build has no overflow checks: overflows in the core go unseen \
             (build with RUSTFLAGS=\"-C overflow-checks=on\")"
        );
    }
    if let Some(path) = &cli.reproduce {
        return reproduce(path);
    }
    let pool = Pool::load(&cli.pcaps)?;
    if cli.self_test {
        let dir = cli.out.join("self-test");
        let summary = self_test(&pool, &dir)?;
        println!("fuzz: self-test passed: {summary}");
        return Ok(ExitCode::SUCCESS);
    }
    let seed = cli.seed.unwrap_or_else(|| {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        splitmix(t.as_nanos() as u64)
    });
    println!(
        "fuzz: seed {seed}; {} frames from {} captures in {}, {} crafted",
        pool.seeds.iter().map(|s| s.frames.len()).sum::<usize>(),
        pool.seeds.len(),
        cli.pcaps.display(),
        pool.crafted.len()
    );
    let opts = RunOpts {
        seed,
        cases: cli.cases,
        seconds: match (cli.cases, cli.seconds) {
            (None, None) => Some(60.0),
            (_, s) => s,
        },
        only: cli.only,
        max_steps: cli.max_steps.max(1),
        shrink_seconds: cli.shrink_seconds,
        progress: true,
        print: cli.print,
    };
    watchdog(Duration::from_secs_f64(cli.case_timeout.max(1.0)), seed);
    let out = fuzz(&pool, &opts, &mut run_core);
    let (s, elapsed) = (&out.stats, out.stats.elapsed.as_secs_f64());
    println!(
        "{}; slowest case {} ({:.2} s)",
        core_stats_line(),
        s.slowest.0,
        s.slowest.1.as_secs_f64()
    );
    let Some(found) = out.found else {
        println!(
            "fuzz: {} cases, {} frames, {elapsed:.1} s, no panic (seed {seed})",
            s.cases, s.frames
        );
        return Ok(ExitCode::SUCCESS);
    };
    let stem = format!("case-{seed}-{}", found.index);
    let path = report(&cli.out, &stem, &found, seed, &mut run_core)?;
    println!(
        "fuzz: {} cases, {} frames, {elapsed:.1} s, PANIC in case {} (seed {seed}): {} at {}",
        s.cases, s.frames, found.index, found.panic.message, found.panic.location
    );
    println!(
        "fuzz: minimal case: {} (rerun: hubnat-fuzz --reproduce {})",
        path.display(),
        path.display()
    );
    Ok(ExitCode::from(1))
}

// ---- cases ----------------------------------------------------------------------------------

/// One fuzz case: the core's configuration and host side, and what happens to it, in order.
#[derive(Clone, Debug, PartialEq)]
struct Case {
    script: ScriptSrc,
    knobs: Knobs,
    steps: Vec<Step>,
}

/// The replay script of a case: generated from a `Variant` (so that shrinking can reset its
/// fields one by one), or read back from a written case.
#[derive(Clone, Debug, PartialEq)]
enum ScriptSrc {
    Variant(Variant),
    Text(String),
}

impl ScriptSrc {
    fn text(&self) -> Cow<'_, str> {
        match self {
            ScriptSrc::Variant(v) => Cow::Owned(v.script_toml()),
            ScriptSrc::Text(t) => Cow::Borrowed(t),
        }
    }
}

/// How the harness drives the core beyond the script: what a runtime may choose.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Knobs {
    /// `set_batching(true)`, flushing after each run of frames (as the runtime, per batch).
    batching: bool,
    /// Fragments go through `reassemble`/`handle_reassembled` (the multi-worker path).
    split_reassembly: bool,
    /// `set_external_expiry(true)`: idle sessions end only at `expire` steps.
    external_expiry: bool,
    /// Send buffer of each simulated TCP socket (small ones make the core queue and wait).
    send_buffer: usize,
    /// Whether the simulated host lets the core open ICMP sockets.
    icmp_sockets: bool,
}

impl Default for Knobs {
    fn default() -> Knobs {
        Knobs {
            batching: false,
            split_reassembly: false,
            external_expiry: false,
            send_buffer: 1 << 20,
            icmp_sockets: true,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Step {
    Frame(FrameStep),
    /// Microseconds of silence: the timers due meanwhile run.
    Jump(u64),
    /// A socket event, as a driver might report it, for a socket the core has (or had) open.
    Event(Ev, Pick),
    /// A destination does something on the host side of an open socket (the event follows).
    Host(HostAct, u8),
    Flush,
    Expire,
    /// `reconfigure` with the `[engine]` table written inline (`engine = { ... }`).
    Reconfigure(String),
    Shutdown,
    /// A port forward hands the core a flow toward a guest.
    Inbound(InboundStep),
}

/// A forward's flow: a TCP connection accepted from `client` (a socket adopted as the runtime
/// does), or a UDP datagram of `payload` from it; both for `guest` at `mac`.
#[derive(Clone, Debug, PartialEq)]
struct InboundStep {
    udp: bool,
    client: SocketAddrV4,
    guest: SocketAddrV4,
    mac: Mac,
    payload: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq)]
struct FrameStep {
    data: Vec<u8>,
    /// Recompute the IPv4 header and TCP/UDP/ICMP checksums just before feeding it.
    fix: bool,
    /// Whether SEQ and ACK of a TCP segment follow the conversation.
    sync: Sync,
}

/// A TCP segment whose SEQ and ACK are set, when fed, from what the core last sent on its
/// connection: a guest that follows the conversation, so that crafted and mutated segments land
/// in the window instead of being refused at the door.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Sync {
    Off,
    /// Everything the core sent is acknowledged.
    Full,
    /// The core's last data segment is not (a duplicate ACK), and its second half is selectively
    /// acknowledged when the segment has a SACK option: the sender's recovery paths.
    Partial,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Ev {
    Readable,
    Writable,
    Connected,
    ConnectFailed(ErrorKind),
    Failed(ErrorKind),
}

/// Which socket an event is for: open ones by rank (lowest id first, modulo their count, so a
/// step keeps a meaning when shrinking removes others), or ids no longer (or not yet) open.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Pick {
    Open(u8),
    Stale(u8),
}

#[derive(Clone, Debug, PartialEq)]
enum HostAct {
    TcpData(Vec<u8>),
    TcpFin,
    TcpDrain(u32),
    UdpData(Vec<u8>),
    UdpRefuse,
    IcmpData(Ipv4Addr, Vec<u8>),
}

/// The error kinds events carry (all within the workspace's minimum Rust version).
const KINDS: [ErrorKind; 8] = [
    ErrorKind::ConnectionRefused,
    ErrorKind::ConnectionReset,
    ErrorKind::ConnectionAborted,
    ErrorKind::TimedOut,
    ErrorKind::BrokenPipe,
    ErrorKind::PermissionDenied,
    ErrorKind::AddrNotAvailable,
    ErrorKind::Other,
];

impl Case {
    fn frames(&self) -> usize {
        self.steps
            .iter()
            .filter(|s| matches!(s, Step::Frame(_)))
            .count()
    }

    /// What shrinking makes smaller, most important first.
    fn cost(&self) -> (usize, usize, usize, usize, u64) {
        let (mut bytes, mut nonzero, mut jumps) = (0, 0, 0u64);
        for s in &self.steps {
            let data: &[u8] = match s {
                Step::Frame(f) => &f.data,
                Step::Host(HostAct::TcpData(d) | HostAct::UdpData(d), _) => d,
                Step::Host(HostAct::IcmpData(_, d), _) => d,
                Step::Inbound(i) => &i.payload,
                Step::Jump(us) => {
                    jumps = jumps.saturating_add(*us);
                    &[]
                }
                _ => &[],
            };
            bytes += data.len();
            nonzero += data.iter().filter(|b| **b != 0).count();
        }
        let setup = match &self.script {
            ScriptSrc::Variant(v) => v.simpler().len(),
            ScriptSrc::Text(_) => 0,
        } + self.knobs.simpler().len();
        (self.steps.len(), bytes, nonzero, setup, jumps)
    }

    /// Merges consecutive jumps (one jump of their sum runs the same timers at the same times)
    /// and drops empty ones.
    fn normalize(&mut self) {
        let mut steps: Vec<Step> = Vec::with_capacity(self.steps.len());
        for s in self.steps.drain(..) {
            match (steps.last_mut(), s) {
                (_, Step::Jump(0)) => {}
                (Some(Step::Jump(a)), Step::Jump(b)) => *a = a.saturating_add(b),
                (_, s) => steps.push(s),
            }
        }
        self.steps = steps;
    }
}

impl Knobs {
    fn simpler(&self) -> Vec<Knobs> {
        let d = Knobs::default();
        let mut v = Vec::new();
        let mut try_one = |k: Knobs| {
            if k != *self {
                v.push(k);
            }
        };
        try_one(Knobs {
            batching: d.batching,
            ..*self
        });
        try_one(Knobs {
            split_reassembly: d.split_reassembly,
            ..*self
        });
        try_one(Knobs {
            external_expiry: d.external_expiry,
            ..*self
        });
        try_one(Knobs {
            send_buffer: d.send_buffer,
            ..*self
        });
        try_one(Knobs {
            icmp_sockets: d.icmp_sockets,
            ..*self
        });
        v
    }
}

/// The frame as it is handed to the core (before any `sync` rewrite).
fn prepare(f: &FrameStep) -> Cow<'_, [u8]> {
    if f.fix {
        let mut v = f.data.clone();
        fix_checksums(&mut v);
        Cow::Owned(v)
    } else {
        Cow::Borrowed(&f.data)
    }
}

// ---- the configuration of a case ------------------------------------------------------------

/// Every setting a case varies; rendered as a replay script (TOML) when the case runs.
#[derive(Clone, Debug, PartialEq)]
struct Variant {
    /// `[host]` tables gathered from the seeds' scripts (DNS names, refused ports...).
    host: Arc<str>,
    seed: u64,
    rebase: bool,
    connect: ConnectOutcome,
    tcp: TcpBehaviour,
    udp: UdpBehaviour,
    /// The port takes TCP and UDP super-frames toward the guest (`tcp_gso`, `udp_gso`).
    gso: bool,
    icmp_answers: bool,
    enabled: bool,
    nat: bool,
    mtu: u32,
    tcp_timeout: u64,
    udp_timeout: u64,
    connect_timeout: u64,
    icmp: IcmpMode,
    max_sessions: usize,
    per_guest: usize,
    half_open: usize,
    loopback: bool,
    dhcp: bool,
    range: (u8, u8),
    lease: u64,
    gateway: bool,
    /// 0: no DNS option, 1: the default, 2: two servers.
    dhcp_dns: u8,
    /// 0: the replay's domain, 1: none, 2: a 243-character one.
    domain: u8,
    routes: u8,
    dns_timeout: u64,
    two_upstreams: bool,
    /// `dns.address` is `DNS_IP` (where the DHCP range leaves it free).
    dns_address: bool,
    /// `nat.source_check`: "learn" (the default), "lease" or "subnet" (mutated sources reach
    /// the protocols instead of stopping at the binding check).
    source_check: &'static str,
    /// A search list, an NTP server, and two guests' MACs reserved (one address outside the
    /// range, one that may be inside it).
    dhcp_extras: bool,
    /// `[ipv6]`: 0 the default (DHCPv6 stateless), 1 stateful, 2 stateful with a range of two
    /// addresses, 3 DHCPv6 off, 4 IPv6 off, 5 stateful and not a default router. (A short
    /// `ra_interval` would fill the long jumps of time with advertisements.)
    ipv6: u8,
}

/// The host-loopback alias of the variants that have one.
const ALIAS_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 30, 2);
/// The virtual host's DNS address in the variants that have one.
const DNS_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 30, 3);
/// A port forward's client (TEST-NET-2: only ever a simulated socket's peer).
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);

impl Variant {
    fn plain(host: Arc<str>) -> Variant {
        Variant {
            host,
            seed: 1,
            rebase: true,
            connect: ConnectOutcome::Accept,
            tcp: TcpBehaviour::Echo,
            udp: UdpBehaviour::Echo,
            gso: false,
            icmp_answers: true,
            enabled: true,
            nat: true,
            mtu: 1500,
            tcp_timeout: 7200,
            udp_timeout: 600,
            connect_timeout: 30,
            icmp: IcmpMode::Auto,
            max_sessions: 65536,
            per_guest: 4096,
            half_open: 1024,
            loopback: false,
            dhcp: true,
            range: (10, 200),
            lease: 7200,
            gateway: true,
            dhcp_dns: 1,
            domain: 0,
            routes: 0,
            dns_timeout: 5,
            two_upstreams: false,
            dns_address: false,
            source_check: "learn",
            dhcp_extras: false,
            ipv6: 0,
        }
    }

    /// A random variant; `base` (the script of the capture a case replays) sets the host side
    /// the capture needs before the dice are thrown on it.
    fn random(rng: &mut SmallRng, host: Arc<str>, base: Option<&Script>) -> Variant {
        let mut v = Variant::plain(host);
        if let Some(s) = base {
            v.rebase = s.rebase;
            v.connect = s.default_connect;
            v.tcp = s.tcp;
            v.udp = s.udp;
            v.icmp_answers = s.icmp;
            v.icmp = s.config.nat.icmp;
            v.connect_timeout = s.config.nat.tcp_connect_timeout.as_secs();
        }
        let p = 0.3;
        v.seed = rng.random_range(0..1000);
        if rng.random_bool(0.1) {
            v.rebase = !v.rebase;
        }
        if rng.random_bool(p) {
            v.connect = pick(
                rng,
                &[
                    ConnectOutcome::Accept,
                    ConnectOutcome::Refuse,
                    ConnectOutcome::Silent,
                    ConnectOutcome::Unreachable(hubnat_core::sockio::Unreachable::Host),
                ],
            );
        }
        if rng.random_bool(p) {
            v.tcp = match rng.random_range(0..4) {
                0 => TcpBehaviour::Echo,
                1 => TcpBehaviour::Sink,
                2 => TcpBehaviour::Fixed(rng.random_range(0..3000)),
                _ => TcpBehaviour::Fixed(rng.random_range(3000..200_000)),
            };
        }
        if rng.random_bool(p) {
            v.udp = pick(
                rng,
                &[
                    UdpBehaviour::Echo,
                    UdpBehaviour::Silent,
                    UdpBehaviour::Refuse,
                    UdpBehaviour::Burst(3),
                ],
            );
        }
        if rng.random_bool(p) {
            v.gso = !v.gso;
        }
        if rng.random_bool(0.15) {
            v.icmp_answers = !v.icmp_answers;
        }
        v.enabled = !rng.random_bool(0.03);
        v.nat = !rng.random_bool(0.08);
        if rng.random_bool(0.5) {
            v.mtu = if rng.random_bool(0.9) {
                pick(rng, &[576, 1500, 9000, 65520])
            } else {
                rng.random_range(576..=65520)
            };
        }
        if rng.random_bool(p) {
            v.tcp_timeout = pick(rng, &[1, 2, 5, 30, 7200]);
        }
        if rng.random_bool(p) {
            v.udp_timeout = pick(rng, &[1, 2, 5, 60, 600]);
        }
        if rng.random_bool(p) {
            v.connect_timeout = pick(rng, &[1, 2, 30]);
        }
        if rng.random_bool(p) {
            v.icmp = pick(rng, &[IcmpMode::Dummy, IcmpMode::Real, IcmpMode::Auto]);
        }
        if rng.random_bool(0.2) {
            v.max_sessions = pick(rng, &[1, 2, 3, 8]);
        }
        if rng.random_bool(0.2) {
            v.per_guest = pick(rng, &[1, 2, 4]);
        }
        if rng.random_bool(0.2) {
            v.half_open = pick(rng, &[1, 2]);
        }
        v.loopback = rng.random_bool(0.2);
        v.dhcp = !rng.random_bool(0.08);
        if rng.random_bool(0.25) {
            v.range = pick(rng, &[(10, 10), (10, 11), (2, 254), (200, 200), (50, 52)]);
        }
        if rng.random_bool(p) {
            v.lease = pick(rng, &[1, 5, 60, 7200]);
        }
        v.gateway = !rng.random_bool(0.1);
        if rng.random_bool(0.2) {
            v.dhcp_dns = rng.random_range(0..3);
        }
        if rng.random_bool(0.2) {
            v.domain = rng.random_range(0..3);
        }
        if rng.random_bool(0.2) {
            v.routes = pick(rng, &[1, 3, 40]);
        }
        if rng.random_bool(p) {
            v.dns_timeout = pick(rng, &[1, 2, 5]);
        }
        v.two_upstreams = rng.random_bool(0.15);
        v.dns_address = rng.random_bool(0.2);
        if rng.random_bool(0.5) {
            v.source_check = pick(rng, &["subnet", "subnet", "lease"]);
        }
        v.dhcp_extras = rng.random_bool(0.25);
        if rng.random_bool(0.5) {
            v.ipv6 = pick(rng, &[1, 1, 2, 3, 4, 5]);
        }
        v
    }

    /// The variants one field closer to `plain`.
    fn simpler(&self) -> Vec<Variant> {
        let plain = Variant::plain(self.host.clone());
        let mut out = Vec::new();
        macro_rules! reset {
            ($($f:ident),*) => {$(
                if self.$f != plain.$f {
                    let mut c = self.clone();
                    c.$f = plain.$f;
                    out.push(c);
                }
            )*};
        }
        reset!(
            seed,
            rebase,
            connect,
            tcp,
            udp,
            icmp_answers,
            enabled,
            nat,
            mtu,
            tcp_timeout,
            udp_timeout,
            connect_timeout,
            icmp,
            max_sessions,
            per_guest,
            half_open,
            loopback,
            dhcp,
            range,
            lease,
            gateway,
            dhcp_dns,
            domain,
            routes,
            dns_timeout,
            two_upstreams,
            dns_address,
            source_check,
            dhcp_extras,
            ipv6
        );
        out
    }

    /// The `[engine]` table as one inline TOML table (one line: a reconfiguration step).
    fn engine_toml(&self) -> String {
        let icmp = match self.icmp {
            IcmpMode::Dummy => "dummy",
            IcmpMode::Real => "real",
            IcmpMode::Auto => "auto",
        };
        let mut nat = format!(
            "enabled = {}, mtu = {}, tcp_timeout = {}, udp_timeout = {}, \
             tcp_connect_timeout = {}, icmp = \"{icmp}\", max_sessions = {}, \
             max_sessions_per_guest = {}, max_half_open = {}",
            self.nat,
            self.mtu,
            self.tcp_timeout,
            self.udp_timeout,
            self.connect_timeout,
            self.max_sessions,
            self.per_guest,
            self.half_open
        );
        if self.loopback {
            let _ = write!(nat, ", host_loopback = \"{ALIAS_IP}\"");
        }
        let _ = write!(nat, ", source_check = \"{}\"", self.source_check);
        let mut dhcp = format!(
            "enabled = {}, range_start = \"192.168.30.{}\", range_end = \"192.168.30.{}\", \
             lease = {}",
            self.dhcp, self.range.0, self.range.1, self.lease
        );
        if !self.gateway {
            dhcp.push_str(", gateway = \"\"");
        }
        match self.dhcp_dns {
            0 => dhcp.push_str(", dns = []"),
            2 => dhcp.push_str(", dns = [\"192.168.30.1\", \"10.53.0.1\"]"),
            _ => {}
        }
        match self.domain {
            1 => dhcp.push_str(", domain = \"\""),
            2 => {
                let label = "x".repeat(60);
                let _ = write!(dhcp, ", domain = \"{label}.{label}.{label}.{label}\"");
            }
            _ => {}
        }
        if self.routes > 0 {
            let routes: Vec<String> = (0..self.routes)
                .map(|i| match i {
                    0 => "0.0.0.0/0 via 192.168.30.1".to_owned(),
                    1 => "10.9.8.7/32 via 192.168.30.1".to_owned(),
                    _ => format!("10.{i}.0.0/16 via 192.168.30.{i}"),
                })
                .map(|r| format!("\"{r}\""))
                .collect();
            let _ = write!(dhcp, ", routes = [{}]", routes.join(", "));
        }
        if self.dhcp_extras {
            let (a, b) = (craft::guest_mac(1), craft::guest_mac(2));
            let _ = write!(
                dhcp,
                ", search = [\"a.test\", \"b.a.test\"], ntp = [\"192.168.30.1\"], reservation = \
                 [{{ mac = \"{a}\", ip = \"192.168.30.250\", name = \"vm1\" }}, \
                 {{ mac = \"{b}\", ip = \"192.168.30.60\" }}]"
            );
        }
        let mut dns = format!("query_timeout = {}", self.dns_timeout);
        if self.two_upstreams {
            let _ = write!(
                dns,
                ", upstream = [\"{REPLAY_UPSTREAM}\", \"10.53.0.2:5353\"]"
            );
        }
        // The configuration refuses a DNS address inside the DHCP range.
        let last = DNS_IP.octets()[3];
        if self.dns_address && !(self.range.0..=self.range.1).contains(&last) {
            let _ = write!(dns, ", address = \"{DNS_IP}\"");
        }
        let ipv6 = match self.ipv6 {
            1 => ", ipv6 = { dhcpv6 = \"stateful\" }",
            2 => {
                ", ipv6 = { dhcpv6 = \"stateful\", range_start = \"fd68:7562:6e61:1e::1000\", \
                 range_end = \"fd68:7562:6e61:1e::1001\" }"
            }
            3 => ", ipv6 = { dhcpv6 = \"off\" }",
            4 => ", ipv6 = { enabled = false }",
            5 => ", ipv6 = { dhcpv6 = \"stateful\", router_lifetime = 0 }",
            _ => "",
        };
        format!(
            "{{ enabled = {}, nat = {{ {nat} }}, dhcp = {{ {dhcp} }}, dns = {{ {dns} }}{ipv6} }}",
            self.enabled
        )
    }

    fn script_toml(&self) -> String {
        let gso = self.gso;
        let connect = match self.connect {
            ConnectOutcome::Accept => "accept",
            ConnectOutcome::Refuse => "refuse",
            ConnectOutcome::Silent => "silent",
            ConnectOutcome::Unreachable(_) => "unreachable",
        };
        format!(
            "seed = {}\ntail_ms = 0\nrebase = {}\ntcp_gso = {gso}\nudp_gso = {gso}\nengine = {}\n\n[host]\n\
             default_connect = \"{connect}\"\ntcp = \"{}\"\nudp = \"{}\"\nicmp = {}\n{}",
            self.seed,
            self.rebase,
            self.engine_toml(),
            tcp_name(self.tcp),
            udp_name(self.udp),
            self.icmp_answers,
            self.host
        )
    }
}

fn tcp_name(b: TcpBehaviour) -> String {
    match b {
        TcpBehaviour::Echo => "echo".to_owned(),
        TcpBehaviour::Sink => "sink".to_owned(),
        TcpBehaviour::Fixed(n) => format!("fixed:{n}"),
    }
}

fn udp_name(b: UdpBehaviour) -> String {
    match b {
        UdpBehaviour::Echo => "echo".to_owned(),
        UdpBehaviour::Silent => "silent".to_owned(),
        UdpBehaviour::Refuse => "refuse".to_owned(),
        UdpBehaviour::Burst(n) => format!("burst:{n}"),
    }
}

// ---- seeds ----------------------------------------------------------------------------------

struct Seed {
    frames: Vec<pcap::Frame>,
    script: Script,
}

struct Pool {
    seeds: Vec<Seed>,
    crafted: Vec<Vec<u8>>,
    /// The `[host]` tables of every seed's script, merged.
    host: Arc<str>,
}

impl Pool {
    fn load(dir: &Path) -> Result<Pool> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .with_context(|| format!("reading the seed captures in {}", dir.display()))?
            .filter_map(|e| {
                let n = e.ok()?.file_name().into_string().ok()?;
                n.strip_suffix(".in.pcap").map(str::to_owned)
            })
            .collect();
        // Sorted: the same seed must give the same cases on every machine.
        names.sort();
        let mut seeds = Vec::new();
        let (mut dns, mut connects, mut tcp_ports, mut udp_ports) = (
            BTreeMap::new(),
            BTreeMap::new(),
            BTreeMap::new(),
            BTreeMap::new(),
        );
        for name in &names {
            let frames = pcap::read(&dir.join(format!("{name}.in.pcap")))?;
            let toml = dir.join(format!("{name}.toml"));
            let script = if toml.exists() {
                let text = std::fs::read_to_string(&toml)
                    .with_context(|| format!("reading {}", toml.display()))?;
                Script::parse(&text).with_context(|| toml.display().to_string())?
            } else {
                Script::default()
            };
            for (n, ip) in &script.dns {
                dns.entry(n.clone()).or_insert(*ip);
            }
            for (a, o) in &script.connects {
                let o = match o {
                    ConnectOutcome::Accept => "accept",
                    ConnectOutcome::Refuse => "refuse",
                    ConnectOutcome::Silent => "silent",
                    ConnectOutcome::Unreachable(_) => "unreachable",
                };
                connects.entry(*a).or_insert(o);
            }
            for (p, b) in &script.tcp_ports {
                tcp_ports.entry(*p).or_insert(tcp_name(*b));
            }
            for (p, b) in &script.udp_ports {
                udp_ports.entry(*p).or_insert(udp_name(*b));
            }
            if !frames.is_empty() {
                seeds.push(Seed { frames, script });
            }
        }
        if seeds.is_empty() {
            bail!("no NAME.in.pcap with frames in {}", dir.display());
        }
        fn table<K: std::fmt::Display, V: std::fmt::Display>(
            name: &str,
            m: &BTreeMap<K, V>,
        ) -> String {
            let items: Vec<String> = m
                .iter()
                .map(|(k, v)| format!("\"{k}\" = \"{v}\""))
                .collect();
            format!("{name} = {{ {} }}\n", items.join(", "))
        }
        let host = table("connects", &connects)
            + &table("tcp_ports", &tcp_ports)
            + &table("udp_ports", &udp_ports)
            + &table("dns", &dns);
        // A fixed stream: the crafted pool must be the same on every run of a seed.
        let mut rng = SmallRng::seed_from_u64(0x6875_626e_6174);
        let mut g = Guest::default();
        let mut crafted = Vec::new();
        while crafted.len() < 300 {
            crafted.extend(g.frames(&mut rng).into_iter().map(|f| f.data));
        }
        Ok(Pool {
            seeds,
            crafted,
            host: host.into(),
        })
    }

    fn any_frame(&self, rng: &mut SmallRng) -> &[u8] {
        if rng.random_bool(0.3) {
            &self.crafted[rng.random_range(0..self.crafted.len())]
        } else {
            let s = &self.seeds[rng.random_range(0..self.seeds.len())];
            &s.frames[rng.random_range(0..s.frames.len())].data
        }
    }
}

// ---- case generation ------------------------------------------------------------------------

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn pick<T: Copy>(rng: &mut SmallRng, from: &[T]) -> T {
    from[rng.random_range(0..from.len())]
}

/// Case `index` of the run seeded `seed` (regenerated alone by `--only`).
fn generate(pool: &Pool, seed: u64, index: u64, max_steps: usize) -> Case {
    let mut rng = SmallRng::seed_from_u64(splitmix(seed ^ splitmix(index)));
    let window = rng.random_bool(0.45);
    let base = window.then(|| rng.random_range(0..pool.seeds.len()));
    let variant = Variant::random(
        &mut rng,
        pool.host.clone(),
        base.map(|b| &pool.seeds[b].script),
    );
    let knobs = Knobs {
        batching: rng.random_bool(0.25),
        split_reassembly: rng.random_bool(0.2),
        external_expiry: rng.random_bool(0.15),
        send_buffer: if rng.random_bool(0.7) {
            1 << 20
        } else {
            pick(&mut rng, &[0, 1, 100, 1460, 4096, 65536])
        },
        icmp_sockets: rng.random_bool(0.8),
    };
    let mut g = Guest::default();
    let mut steps = Vec::new();
    if let Some(b) = base {
        // A window of a capture, in order and with its own timing, a few frames mutated and
        // other steps slipped in: the capture leads the core into deep states (an established
        // connection, a lease), where the changes then land.
        let frames = &pool.seeds[b].frames;
        let len = rng.random_range(1..=frames.len().min(48));
        let start = if rng.random_bool(0.5) {
            0
        } else {
            rng.random_range(0..=frames.len() - len)
        };
        let p_mutate = pick(&mut rng, &[0.0, 0.05, 0.15, 0.4]);
        let mut prev = frames[start].ts;
        for f in &frames[start..start + len] {
            let gap = f.ts.saturating_sub(prev).as_micros() as u64;
            prev = f.ts;
            let gap = match rng.random_range(0..20) {
                0 => gap / 10,
                1 => gap.saturating_mul(10),
                _ => gap,
            };
            steps.push(Step::Jump(gap));
            let mut data = f.data.clone();
            let mutated = rng.random_bool(p_mutate);
            if mutated {
                mutate(&mut rng, &mut data, pool);
            }
            steps.push(Step::Frame(FrameStep {
                data,
                fix: mutated && rng.random_bool(0.75),
                sync: Sync::Off,
            }));
            if rng.random_bool(0.1) {
                steps.extend(random_steps(&mut rng, pool, &mut g));
            }
        }
        for _ in 0..rng.random_range(0..4) {
            steps.extend(random_steps(&mut rng, pool, &mut g));
        }
    } else {
        let n = rng.random_range(1..=max_steps);
        while steps.len() < n {
            steps.extend(random_steps(&mut rng, pool, &mut g));
        }
    }
    let mut case = Case {
        script: ScriptSrc::Variant(variant),
        knobs,
        steps,
    };
    case.normalize();
    case
}

/// One random step (several for a train of fragments).
fn random_steps(rng: &mut SmallRng, pool: &Pool, g: &mut Guest) -> Vec<Step> {
    match rng.random_range(0..100) {
        0..=29 => {
            let mut data = pool.any_frame(rng).to_vec();
            let mutated = rng.random_bool(0.7);
            if mutated {
                mutate(rng, &mut data, pool);
            }
            vec![Step::Frame(FrameStep {
                data,
                fix: mutated && rng.random_bool(0.75),
                sync: if rng.random_bool(0.15) {
                    Sync::Full
                } else {
                    Sync::Off
                },
            })]
        }
        30..=57 => g
            .frames(rng)
            .into_iter()
            .map(|mut f| {
                if rng.random_bool(0.25) {
                    mutate(rng, &mut f.data, pool);
                    f.fix = rng.random_bool(0.8);
                }
                Step::Frame(f)
            })
            .collect(),
        58..=68 => vec![Step::Jump(random_jump(rng))],
        69..=71 => g.inbound(rng),
        72..=79 => {
            let ev = match rng.random_range(0..10) {
                0..=2 => Ev::Readable,
                3..=4 => Ev::Writable,
                5..=6 => Ev::Connected,
                7..=8 => Ev::ConnectFailed(pick(rng, &KINDS)),
                _ => Ev::Failed(pick(rng, &KINDS)),
            };
            let pick = if rng.random_bool(0.92) {
                Pick::Open(rng.random())
            } else {
                Pick::Stale(rng.random())
            };
            vec![Step::Event(ev, pick)]
        }
        80..=92 => vec![Step::Host(random_host_act(rng), rng.random())],
        93..=95 => vec![Step::Flush],
        96..=97 => vec![Step::Expire],
        98 => {
            let v = Variant::random(rng, pool.host.clone(), None);
            vec![Step::Reconfigure(format!("engine = {}", v.engine_toml()))]
        }
        _ => vec![Step::Shutdown],
    }
}

/// Silences of every scale: within a retransmission timeout, around the connect and DNS
/// timeouts, past the idle timeouts and the lease, and far beyond.
fn random_jump(rng: &mut SmallRng) -> u64 {
    const S: u64 = 1_000_000;
    match rng.random_range(0..100) {
        0..=34 => rng.random_range(0..100_000),
        35..=59 => rng.random_range(100_000..=5 * S),
        60..=79 => rng.random_range(5 * S..=120 * S),
        80..=91 => rng.random_range(120 * S..=1000 * S),
        92..=98 => rng.random_range(1000 * S..=8000 * S),
        _ => pick(rng, &[86_400 * S, 30 * 86_400 * S]),
    }
}

fn random_data(rng: &mut SmallRng) -> Vec<u8> {
    let len = match rng.random_range(0..20) {
        0 => 0,
        1..=8 => rng.random_range(1..100),
        9..=15 => rng.random_range(100..2000),
        16..=18 => rng.random_range(2000..10_000),
        _ => rng.random_range(60_000..70_000),
    };
    let mut d = vec![0u8; len];
    if rng.random_bool(0.7) {
        rng.fill(&mut d[..]);
    }
    d
}

fn random_host_act(rng: &mut SmallRng) -> HostAct {
    match rng.random_range(0..10) {
        0..=2 => HostAct::TcpData(random_data(rng)),
        3 => HostAct::TcpFin,
        4 => HostAct::TcpDrain(pick(rng, &[1, 100, 1460, 65536, 1 << 20])),
        5 => {
            let mut d = random_data(rng);
            if rng.random_bool(0.5) && d.len() >= 12 {
                // An answer-shaped datagram, for the DNS relay's upstream socket.
                d[2] |= 0x80;
                d[4..6].copy_from_slice(&[0, 1]);
            }
            HostAct::UdpData(d)
        }
        6 => HostAct::UdpData(random_data(rng)),
        7 => HostAct::UdpRefuse,
        _ => {
            let mut m = random_data(rng);
            if rng.random_bool(0.6) {
                m.truncate(100);
                m.resize(m.len().max(8), 0);
                m[0] = pick(rng, &[0, 0, 3, 11, 8]);
                m[1] = 0;
            }
            HostAct::IcmpData(pick(rng, &[SERVER_IP, HOST_IP, Ipv4Addr::LOCALHOST]), m)
        }
    }
}

// ---- crafted frames -------------------------------------------------------------------------

/// A crafted guest: builds well-formed frames of every kind the core handles, and TCP segments
/// that continue the connections it opened.
#[derive(Default)]
struct Guest {
    flows: Vec<Flow>,
    ident: u16,
}

struct Flow {
    mac: Mac,
    src: SocketAddr,
    dst: SocketAddr,
    seq: u32,
    win: u16,
}

const PORTS: [u16; 16] = [
    0, 1, 7, 9, 19, 53, 67, 68, 80, 81, 82, 123, 5353, 8080, 33434, 65535,
];

fn addr(rng: &mut SmallRng) -> Ipv4Addr {
    match rng.random_range(0..20) {
        0 => Ipv4Addr::UNSPECIFIED,
        1 => Ipv4Addr::BROADCAST,
        2 => Ipv4Addr::new(192, 168, 30, 255),
        3 => Ipv4Addr::LOCALHOST,
        4 => Ipv4Addr::new(224, 0, 0, 1),
        5 => ALIAS_IP,
        6 => Ipv4Addr::new(192, 168, 30, 10),
        7 => Ipv4Addr::new(192, 168, 30, 200),
        8 => Ipv4Addr::new(192, 168, 30, 201),
        9 => Ipv4Addr::new(192, 168, 31, 5),
        10 => *REPLAY_UPSTREAM.ip(),
        11 => Ipv4Addr::new(10, 77, 0, 80),
        12 => Ipv4Addr::new(169, 254, 1, 1),
        13 => Ipv4Addr::from(rng.random::<u32>()),
        14..=15 => HOST_IP,
        16..=17 => GUEST_IP,
        _ => SERVER_IP,
    }
}

fn mac(rng: &mut SmallRng) -> Mac {
    match rng.random_range(0..8) {
        0 => Mac::BROADCAST,
        1 => Mac([0x01, 0, 0x5e, 0, 0, 1]),
        2 => Mac([0; 6]),
        3 => REPLAY_MAC,
        4 => Mac(rng.random()),
        _ => craft::guest_mac(rng.random_range(1..4)),
    }
}

/// An IPv4 packet; `frag` is the raw flags and fragment offset field.
fn ip4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, ident: u16, frag: u16, payload: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; 20];
    b[0] = 0x45;
    put16(&mut b, 2, (20 + payload.len()).min(0xffff) as u16);
    put16(&mut b, 4, ident);
    put16(&mut b, 6, frag);
    b[8] = 64;
    b[9] = proto;
    b[12..16].copy_from_slice(&src.octets());
    b[16..20].copy_from_slice(&dst.octets());
    let c = checksum(0, &b);
    put16(&mut b, 10, c);
    b.extend_from_slice(payload);
    b
}

/// A TCP segment in the frame of its family (IPv4 with DF, or IPv6).
fn eth_segment(mac: Mac, src: SocketAddr, dst: SocketAddr, ident: u16, seg: &[u8]) -> Vec<u8> {
    match (src.ip(), dst.ip()) {
        (IpAddr::V6(s), IpAddr::V6(d)) => eth_ip6(mac, d, &craft::ipv6(s, d, 6, 64, seg)),
        (IpAddr::V4(s), IpAddr::V4(d)) => eth_ip(mac, d, &ip4(s, d, 6, ident, 0x4000, seg)),
        // A flow is crafted of one family; a mixed one is left as an IPv4 frame from nowhere.
        _ => eth_ip(mac, Ipv4Addr::UNSPECIFIED, seg),
    }
}

/// An IPv6 packet in its frame: to the group's MAC for multicast, else the virtual host's.
fn eth_ip6(src_mac: Mac, dst: Ipv6Addr, packet: &[u8]) -> Vec<u8> {
    let dst_mac = if dst.is_multicast() {
        let o = dst.octets();
        Mac([0x33, 0x33, o[12], o[13], o[14], o[15]])
    } else {
        REPLAY_MAC
    };
    craft::ethernet(dst_mac, src_mac, 0x86dd, packet)
}

/// The addresses a crafted IPv6 packet goes to: the virtual host's, guests', groups, the
/// remote server, and those the egress policy refuses.
fn addr6(rng: &mut SmallRng, g: &Guest6) -> Ipv6Addr {
    match rng.random_range(0..20) {
        0 => Ipv6Addr::UNSPECIFIED,
        1 => Ipv6Addr::LOCALHOST,
        2 => "ff02::1".parse().unwrap(),
        3 => "ff02::2".parse().unwrap(),
        4 => "ff02::1:2".parse().unwrap(),
        5 => "ff02::1:ff00:1".parse().unwrap(),
        6 => hubnat_core::wire::link_local(REPLAY_MAC),
        7 => "::ffff:10.77.0.2".parse().unwrap(),
        8 => "fe80::1".parse().unwrap(),
        9 => "fc00::1".parse().unwrap(),
        10 => g.ll,
        11 => g.ula,
        12 => Ipv6Addr::from(rng.random::<u128>()),
        13 => Ipv6Addr::from(u128::from(craft::host_ip6()) + 0x1000),
        14..=16 => craft::host_ip6(),
        _ => SERVER_IP6,
    }
}

fn eth_ip(src_mac: Mac, dst: Ipv4Addr, packet: &[u8]) -> Vec<u8> {
    let dst_mac = if dst.is_broadcast() {
        Mac::BROADCAST
    } else {
        REPLAY_MAC
    };
    craft::ethernet(dst_mac, src_mac, 0x0800, packet)
}

impl Guest {
    fn ident(&mut self) -> u16 {
        self.ident = self.ident.wrapping_add(1);
        self.ident
    }

    /// A forward's flow toward a guest: a client's datagram, or an accepted connection, most
    /// often answered by the guest's SYN-ACK (its ACK field set from the core's SYN when fed)
    /// and then continued as any crafted connection.
    fn inbound(&mut self, rng: &mut SmallRng) -> Vec<Step> {
        let m = if rng.random_bool(0.9) {
            craft::guest_mac(rng.random_range(1..3))
        } else {
            mac(rng)
        };
        let guest_ip = if rng.random_bool(0.85) {
            GUEST_IP
        } else {
            addr(rng)
        };
        let guest = SocketAddrV4::new(guest_ip, pick(rng, &[22, 53, 80, 80, 8080, 0]));
        let other = addr(rng);
        let client_ip = pick(
            rng,
            &[CLIENT_IP, CLIENT_IP, SERVER_IP, Ipv4Addr::LOCALHOST, other],
        );
        let client = SocketAddrV4::new(client_ip, pick(rng, &[40000, 40001, 53, 1, 0, 65535]));
        let udp = rng.random_bool(0.4);
        let payload = if udp { random_data(rng) } else { Vec::new() };
        let mut steps = vec![Step::Inbound(InboundStep {
            udp,
            client,
            guest,
            mac: m,
            payload: payload[..payload.len().min(65_507)].to_vec(),
        })];
        if !udp && rng.random_bool(0.7) {
            // A client on the host's loopback is shown to the guest as the virtual host.
            let shown = if client_ip.is_loopback() {
                SocketAddrV4::new(HOST_IP, client.port())
            } else {
                client
            };
            let isn = rng.random();
            let opts = if rng.random_bool(0.7) {
                vec![
                    2, 4, 5, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7,
                ]
            } else {
                tcp_options(rng)
            };
            let flags = craft::SYN | craft::ACK;
            let seg = craft::tcp(guest, shown, flags, isn, 0, 64240, &opts, &[]);
            let ident = self.ident();
            let p = ip4(guest_ip, *shown.ip(), 6, ident, 0x4000, &seg);
            steps.push(Step::Frame(FrameStep {
                data: eth_ip(m, *shown.ip(), &p),
                fix: false,
                sync: Sync::Full,
            }));
            self.flows.push(Flow {
                mac: m,
                src: guest.into(),
                dst: shown.into(),
                seq: isn.wrapping_add(1),
                win: 64240,
            });
            if self.flows.len() > 8 {
                self.flows.remove(0);
            }
        }
        steps
    }

    fn frames(&mut self, rng: &mut SmallRng) -> Vec<FrameStep> {
        let plain = |data| FrameStep {
            data,
            fix: false,
            sync: Sync::Off,
        };
        if rng.random_bool(0.3) {
            return self.frames6(rng);
        }
        let m = craft::guest_mac(rng.random_range(1..3));
        let me = if rng.random_bool(0.85) {
            GUEST_IP
        } else {
            addr(rng)
        };
        match rng.random_range(0..100) {
            0..=7 => {
                let tpa = pick(rng, &[HOST_IP, HOST_IP, ALIAS_IP, DNS_IP, me, SERVER_IP]);
                let op = pick(rng, &[1, 1, 2]);
                let (tha, dst) = if op == 1 {
                    (Mac([0; 6]), Mac::BROADCAST)
                } else {
                    (REPLAY_MAC, REPLAY_MAC)
                };
                let spa = if rng.random_bool(0.15) {
                    Ipv4Addr::UNSPECIFIED
                } else {
                    me
                };
                vec![plain(craft::arp(m, op, m, spa, tha, tpa, dst))]
            }
            8..=21 => vec![plain(self.dhcp(rng, m))],
            22..=31 => {
                let other = addr(rng);
                let dst = pick(rng, &[HOST_IP, HOST_IP, SERVER_IP, ALIAS_IP, DNS_IP, other]);
                let size = pick(rng, &[0, 8, 56, 1400, 1472, 8972, 30_000, 65_000]);
                let mut data = vec![0u8; size];
                rng.fill(&mut data[..]);
                let msg = craft::icmp_echo(rng.random(), rng.random(), &data);
                let ident = self.ident();
                vec![plain(eth_ip(m, dst, &ip4(me, dst, 1, ident, 0, &msg)))]
            }
            32..=43 => {
                let (dst, payload) = match rng.random_range(0..6) {
                    0..=1 => {
                        let name = pick(
                            rng,
                            &[
                                "www.example.test",
                                "WWW.Example.Test.",
                                "nothing.test",
                                "x",
                                "",
                            ],
                        );
                        let q = craft::dns_query(rng.random(), name, pick(rng, &[1, 28, 255, 0]));
                        (
                            SocketAddrV4::new(pick(rng, &[HOST_IP, HOST_IP, DNS_IP]), 53),
                            q,
                        )
                    }
                    2 => (
                        SocketAddrV4::new(addr(rng), pick(rng, &PORTS)),
                        random_data(rng),
                    ),
                    _ => (
                        SocketAddrV4::new(SERVER_IP, pick(rng, &[7, 9, 19, 7, 1234])),
                        random_data(rng),
                    ),
                };
                let src = SocketAddrV4::new(me, pick(rng, &[5000, 5001, 68, 53, 0]));
                let ident = self.ident();
                let u = craft::udp(src, dst, &payload[..payload.len().min(65_000)]);
                vec![plain(eth_ip(
                    m,
                    *dst.ip(),
                    &ip4(me, *dst.ip(), 17, ident, 0, &u),
                ))]
            }
            44..=55 => {
                let dst = match rng.random_range(0..10) {
                    0 => SocketAddrV4::new(HOST_IP, pick(rng, &[80, 53])),
                    1 => SocketAddrV4::new(pick(rng, &[ALIAS_IP, DNS_IP]), pick(rng, &[80, 53])),
                    2 => SocketAddrV4::new(addr(rng), pick(rng, &PORTS)),
                    _ => SocketAddrV4::new(SERVER_IP, pick(rng, &[80, 80, 81, 82, 8080, 7, 0])),
                };
                let src = SocketAddrV4::new(me, pick(rng, &[40000, 40001, 40002, 0, 65535]));
                let isn = rng.random();
                let opts = if rng.random_bool(0.7) {
                    vec![
                        2, 4, 5, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7,
                    ]
                } else {
                    tcp_options(rng)
                };
                let mut flags = craft::SYN;
                if rng.random_bool(0.1) {
                    flags |= pick(rng, &[craft::FIN, craft::ACK, craft::RST, 0x20, 0xc0]);
                }
                let seg = craft::tcp(src, dst, flags, isn, 0, 64240, &opts, &[]);
                let ident = self.ident();
                self.flows.push(Flow {
                    mac: m,
                    src: src.into(),
                    dst: dst.into(),
                    seq: isn.wrapping_add(1),
                    win: 64240,
                });
                if self.flows.len() > 8 {
                    self.flows.remove(0);
                }
                let p = ip4(*src.ip(), *dst.ip(), 6, ident, 0x4000, &seg);
                vec![plain(eth_ip(m, *dst.ip(), &p))]
            }
            56..=85 if !self.flows.is_empty() => {
                let i = rng.random_range(0..self.flows.len());
                let sync = pick(rng, &[Sync::Full, Sync::Full, Sync::Full, Sync::Partial]);
                let (flags, copies) = if sync == Sync::Partial {
                    // Duplicate ACKs, up to past the three of a fast retransmit.
                    (craft::ACK, rng.random_range(1..=4))
                } else {
                    let flags = pick(
                        rng,
                        &[
                            craft::ACK,
                            craft::ACK | craft::PSH,
                            craft::ACK | craft::PSH,
                            craft::ACK | craft::FIN,
                            craft::RST,
                            craft::RST | craft::ACK,
                            craft::SYN,
                            craft::ACK | 0x20,
                        ],
                    );
                    (flags, 1)
                };
                let payload = if flags & craft::PSH != 0 || rng.random_bool(0.1) {
                    let mut d = vec![0u8; pick(rng, &[1, 10, 536, 1460, 3000, 8960])];
                    rng.fill(&mut d[..]);
                    d
                } else {
                    Vec::new()
                };
                let opts = if sync == Sync::Partial && rng.random_bool(0.8) {
                    // One SACK block, filled in when the segment is fed.
                    vec![1, 1, 5, 10, 0, 0, 0, 0, 0, 0, 0, 0]
                } else if rng.random_bool(0.2) {
                    tcp_options(rng)
                } else {
                    Vec::new()
                };
                let ident = self.ident();
                let f = &mut self.flows[i];
                // Mostly the connection's own window: a changed one is no duplicate ACK.
                if rng.random_bool(0.1) {
                    f.win = pick(rng, &[64240, 0, 1, 65535, 512]);
                }
                let seg = craft::tcp(f.src, f.dst, flags, f.seq, 0, f.win, &opts, &payload);
                f.seq = f.seq.wrapping_add(payload.len() as u32);
                let sync = if rng.random_bool(0.9) {
                    sync
                } else {
                    Sync::Off
                };
                let data = eth_segment(f.mac, f.src, f.dst, ident, &seg);
                (0..copies)
                    .map(|_| FrameStep {
                        data: data.clone(),
                        fix: false,
                        sync,
                    })
                    .collect()
            }
            86..=93 => self.fragments(rng, m, me),
            _ => {
                // Frames that are barely frames.
                let mut d = vec![0u8; rng.random_range(0..64)];
                rng.fill(&mut d[..]);
                if d.len() >= 14 && rng.random_bool(0.7) {
                    d[..6].copy_from_slice(&REPLAY_MAC.0);
                    d[6..12].copy_from_slice(&m.0);
                    let t = pick(rng, &[0x0800u16, 0x0806, 0x86dd, 0x8100]);
                    put16(&mut d, 12, t);
                }
                vec![plain(d)]
            }
        }
    }

    fn dhcp(&mut self, rng: &mut SmallRng, m: Mac) -> Vec<u8> {
        let kind = pick(rng, &[1, 1, 3, 3, 3, 4, 7, 8, 2, 5, 6, 0, 9]);
        let renewing = rng.random_bool(0.25);
        let ciaddr = if renewing {
            pick(
                rng,
                &[
                    Ipv4Addr::new(192, 168, 30, 10),
                    GUEST_IP,
                    Ipv4Addr::new(10, 1, 1, 1),
                ],
            )
        } else {
            Ipv4Addr::UNSPECIFIED
        };
        let mut msg = craft::dhcp(m, rng.random(), ciaddr, kind, &[]);
        msg.truncate(240);
        if rng.random_bool(0.8) {
            msg.extend_from_slice(&[53, 1, kind]);
        }
        msg.extend(dhcp_options(rng));
        let ident = self.ident();
        craft::dhcp_frame(m, ciaddr, renewing && rng.random_bool(0.7), &msg, ident)
    }

    /// A datagram cut into fragments, sometimes out of order, doubled, overlapping, incomplete,
    /// or reaching past 65535 bytes.
    fn fragments(&mut self, rng: &mut SmallRng, m: Mac, me: Ipv4Addr) -> Vec<FrameStep> {
        let dst = pick(rng, &[SERVER_IP, SERVER_IP, HOST_IP]);
        let (proto, l4) = if rng.random_bool(0.6) {
            let mut d = vec![0u8; rng.random_range(9..4000)];
            rng.fill(&mut d[..]);
            let src = SocketAddrV4::new(me, 5000);
            (17, craft::udp(src, SocketAddrV4::new(dst, 7), &d))
        } else {
            let mut d = vec![0u8; rng.random_range(0..4000)];
            rng.fill(&mut d[..]);
            (1, craft::icmp_echo(rng.random(), 1, &d))
        };
        let ident = self.ident();
        let piece = 8 * rng.random_range(1..=185usize);
        let mut parts: Vec<(usize, usize)> = (0..l4.len())
            .step_by(piece)
            .map(|o| (o, (o + piece).min(l4.len())))
            .collect();
        match rng.random_range(0..10) {
            0..=1 => parts.shuffle(rng),
            2 => {
                let i = rng.random_range(0..parts.len());
                parts.push(parts[i]);
            }
            3 if parts.len() > 1 => {
                // The second piece starts inside the first.
                parts[1].0 = parts[1].0.saturating_sub(8);
            }
            4 if parts.len() > 1 => {
                parts.remove(rng.random_range(0..parts.len()));
            }
            _ => {}
        }
        let far = rng.random_bool(0.05);
        let last = parts.iter().map(|p| p.1).max().unwrap_or(0);
        parts
            .into_iter()
            .map(|(a, b)| {
                let off = if far && b == last { 8190 * 8 } else { a };
                let mf = if b < last { 0x2000 } else { 0 };
                let frag = mf | ((off / 8) as u16 & 0x1fff);
                FrameStep {
                    data: eth_ip(m, dst, &ip4(me, dst, proto, ident, frag, &l4[a..b])),
                    fix: false,
                    sync: Sync::Off,
                }
            })
            .collect()
    }
}

impl Guest {
    /// An IPv6 frame of a crafted guest (several for a train of fragments).
    fn frames6(&mut self, rng: &mut SmallRng) -> Vec<FrameStep> {
        let plain = |data| FrameStep {
            data,
            fix: false,
            sync: Sync::Off,
        };
        let g = Guest6::new(craft::guest_mac(rng.random_range(1..3)));
        let me = match rng.random_range(0..10) {
            0..=4 => g.ula,
            5..=7 => g.ll,
            8 => Ipv6Addr::UNSPECIFIED,
            _ => addr6(rng, &g),
        };
        match rng.random_range(0..100) {
            0..=24 => vec![plain(ndp(rng, &g, me))],
            25..=39 => vec![plain(dhcpv6(rng, &g))],
            40..=51 => {
                let dst = addr6(rng, &g);
                let mut data = vec![0u8; pick(rng, &[0, 8, 56, 1232, 1452, 8952, 30_000])];
                rng.fill(&mut data[..]);
                let mut msg = craft::icmp_echo(rng.random(), rng.random(), &data);
                msg[0] = pick(rng, &[128, 128, 128, 129, 1, 2, 3, 4, 130, 143]);
                vec![plain(icmp6_packet(&g, me, dst, 64, msg))]
            }
            52..=65 => {
                let dst = match rng.random_range(0..6) {
                    0..=1 => {
                        let name = pick(rng, &["www.example.test", "nothing.test", "x"]);
                        let q = craft::dns_query(rng.random(), name, pick(rng, &[1, 28, 255]));
                        let to = pick(rng, &[craft::host_ip6(), craft::host_ip6(), g.ll]);
                        let to = if to == g.ll {
                            hubnat_core::wire::link_local(REPLAY_MAC)
                        } else {
                            to
                        };
                        let src = SocketAddrV6::new(me, 5000, 0, 0);
                        let d = craft::udp(src, SocketAddrV6::new(to, 53, 0, 0), &q);
                        return vec![plain(eth_ip6(g.mac, to, &craft::ipv6(me, to, 17, 64, &d)))];
                    }
                    2 => SocketAddrV6::new(addr6(rng, &g), pick(rng, &PORTS), 0, 0),
                    _ => SocketAddrV6::new(SERVER_IP6, pick(rng, &[7, 9, 19, 7, 1234]), 0, 0),
                };
                let src = SocketAddrV6::new(me, pick(rng, &[5000, 5001, 546, 53, 0]), 0, 0);
                let payload = random_data(rng);
                let d = craft::udp(src, dst, &payload[..payload.len().min(65_000)]);
                let hop = pick(rng, &[64, 64, 1, 0, 255]);
                vec![plain(eth_ip6(
                    g.mac,
                    *dst.ip(),
                    &craft::ipv6(me, *dst.ip(), 17, hop, &d),
                ))]
            }
            66..=77 => {
                let dst = match rng.random_range(0..8) {
                    0 => SocketAddrV6::new(craft::host_ip6(), pick(rng, &[80, 53]), 0, 0),
                    1 => SocketAddrV6::new(addr6(rng, &g), pick(rng, &PORTS), 0, 0),
                    _ => SocketAddrV6::new(SERVER_IP6, pick(rng, &[80, 80, 81, 82, 7, 0]), 0, 0),
                };
                let src = SocketAddrV6::new(me, pick(rng, &[40000, 40001, 40002, 0]), 0, 0);
                let isn = rng.random();
                let opts = if rng.random_bool(0.7) {
                    vec![
                        2, 4, 5, 0xa0, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7,
                    ]
                } else {
                    tcp_options(rng)
                };
                let seg = craft::tcp(src, dst, craft::SYN, isn, 0, 64240, &opts, &[]);
                self.flows.push(Flow {
                    mac: g.mac,
                    src: src.into(),
                    dst: dst.into(),
                    seq: isn.wrapping_add(1),
                    win: 64240,
                });
                if self.flows.len() > 8 {
                    self.flows.remove(0);
                }
                vec![plain(eth_segment(g.mac, src.into(), dst.into(), 0, &seg))]
            }
            78..=89 => vec![plain(extension_chain(rng, &g, me))],
            _ => self.fragments6(rng, &g, me),
        }
    }

    /// An IPv6 datagram cut into fragments: out of order, doubled, overlapping, incomplete,
    /// atomic, or reaching past 65535 bytes.
    fn fragments6(&mut self, rng: &mut SmallRng, g: &Guest6, me: Ipv6Addr) -> Vec<FrameStep> {
        let dst = pick(rng, &[SERVER_IP6, SERVER_IP6, craft::host_ip6()]);
        let (proto, l4) = if rng.random_bool(0.6) {
            let mut d = vec![0u8; rng.random_range(9..4000)];
            rng.fill(&mut d[..]);
            let src = SocketAddrV6::new(me, 5000, 0, 0);
            (17, craft::udp(src, SocketAddrV6::new(dst, 7, 0, 0), &d))
        } else {
            let mut d = vec![0u8; rng.random_range(0..4000)];
            rng.fill(&mut d[..]);
            let mut m = craft::icmp_echo(rng.random(), 1, &d);
            m[0] = 128;
            put16(&mut m, 2, 0);
            let c = craft::checksum6(me, dst, 58, &m);
            put16(&mut m, 2, c);
            (58, m)
        };
        let ident = rng.random();
        let piece = 8 * rng.random_range(1..=181usize);
        let mut parts: Vec<(usize, usize)> = (0..l4.len())
            .step_by(piece)
            .map(|o| (o, (o + piece).min(l4.len())))
            .collect();
        match rng.random_range(0..10) {
            0..=1 => parts.shuffle(rng),
            2 => {
                let i = rng.random_range(0..parts.len());
                parts.push(parts[i]);
            }
            3 if parts.len() > 1 => parts[1].0 = parts[1].0.saturating_sub(8),
            4 if parts.len() > 1 => {
                parts.remove(rng.random_range(0..parts.len()));
            }
            // A piece that does not end on 8 bytes but says more follow.
            5 if parts.len() > 1 => parts[0].1 -= 1,
            _ => {}
        }
        let far = rng.random_bool(0.05);
        let last = parts.iter().map(|p| p.1).max().unwrap_or(0);
        let atomic = parts.len() == 1 && rng.random_bool(0.5);
        parts
            .into_iter()
            .map(|(a, b)| {
                let off = if far && b == last { 8191 * 8 } else { a };
                // A lone fragment is atomic (offset 0, no more) or waits for more.
                let more = b < last || !atomic;
                let p = craft::ipv6_fragment(me, dst, proto, ident, off, more, &l4[a..b]);
                FrameStep {
                    data: eth_ip6(g.mac, dst, &p),
                    fix: false,
                    sync: Sync::Off,
                }
            })
            .collect()
    }
}

/// An ICMPv6 message from `src` to `dst` in its frame, its checksum filled in.
fn icmp6_packet(g: &Guest6, src: Ipv6Addr, dst: Ipv6Addr, hop: u8, mut msg: Vec<u8>) -> Vec<u8> {
    if msg.len() >= 4 {
        put16(&mut msg, 2, 0);
        let c = craft::checksum6(src, dst, 58, &msg);
        put16(&mut msg, 2, c);
    }
    eth_ip6(g.mac, dst, &craft::ipv6(src, dst, 58, hop, &msg))
}

/// Neighbour discovery options: link-layer addresses (the sender's, the host's, others),
/// prefixes, MTU, DNS, unknown ones, and lengths of 0 or past the message.
fn nd_options(rng: &mut SmallRng, g: &Guest6) -> Vec<u8> {
    let mut o = Vec::new();
    for _ in 0..rng.random_range(0..=3) {
        match rng.random_range(0..8) {
            0..=2 => {
                o.extend_from_slice(&[pick(rng, &[1, 1, 2]), 1]);
                let other = Mac(rng.random());
                let m = pick(rng, &[g.mac, g.mac, REPLAY_MAC, other]);
                o.extend_from_slice(&m.0);
            }
            3 => {
                o.extend_from_slice(&[3, 4, 64, 0xc0]);
                o.extend_from_slice(&[0, 0, 0x0e, 0x10, 0, 0, 0x07, 0x08, 0, 0, 0, 0]);
                o.extend_from_slice(&addr6(rng, g).octets());
            }
            4 => o.extend_from_slice(&[5, 1, 0, 0, 0, 0, 5, 0xdc]),
            5 => {
                o.extend_from_slice(&[25, 3, 0, 0, 0, 0, 1, 0]);
                o.extend_from_slice(&addr6(rng, g).octets());
            }
            6 => o.extend_from_slice(&[pick(rng, &[1, 2, 99]), 0, 0, 0, 0, 0, 0, 0]),
            _ => {
                let n = rng.random_range(1..5u8);
                o.extend_from_slice(&[rng.random(), n + rng.random_range(0..2)]);
                o.extend((0..usize::from(n) * 8 - 2).map(|_| rng.random::<u8>()));
            }
        }
    }
    o
}

/// A neighbour solicitation or advertisement, router solicitation or advertisement, with
/// random options, mostly as RFC 4861 wants it (hop limit 255, code 0).
fn ndp(rng: &mut SmallRng, g: &Guest6, me: Ipv6Addr) -> Vec<u8> {
    let ty = pick(rng, &[135, 135, 136, 133, 133, 134, 137]);
    let target = pick(
        rng,
        &[
            craft::host_ip6(),
            hubnat_core::wire::link_local(REPLAY_MAC),
            g.ula,
            g.ll,
            SERVER_IP6,
        ],
    );
    let mut msg = vec![ty, 0, 0, 0];
    match ty {
        133 => msg.extend_from_slice(&[0; 4]),
        134 => msg.extend_from_slice(&[64, rng.random(), 7, 8, 0, 0, 0, 0, 0, 0, 0, 0]),
        136 => {
            msg.extend_from_slice(&[pick(rng, &[0x20, 0x60, 0xe0, 0]), 0, 0, 0]);
            msg.extend_from_slice(&target.octets());
        }
        _ => {
            msg.extend_from_slice(&[0; 4]);
            msg.extend_from_slice(&target.octets());
        }
    }
    msg.extend(nd_options(rng, g));
    if rng.random_bool(0.1) {
        msg[1] = rng.random();
    }
    let dst = match rng.random_range(0..6) {
        0 => hubnat_core::wire::link_local(REPLAY_MAC),
        1 => "ff02::2".parse().unwrap(),
        2 => "ff02::1".parse().unwrap(),
        3 => {
            let o = target.octets();
            Ipv6Addr::new(
                0xff02,
                0,
                0,
                0,
                0,
                1,
                0xff00 | u16::from(o[13]),
                u16::from_be_bytes([o[14], o[15]]),
            )
        }
        _ => addr6(rng, g),
    };
    let hop = if rng.random_bool(0.9) {
        255
    } else {
        pick(rng, &[254, 1, 64])
    };
    icmp6_packet(g, me, dst, hop, msg)
}

/// A DHCPv6 option.
fn opt6(code: u16, data: &[u8]) -> Vec<u8> {
    let mut v = code.to_be_bytes().to_vec();
    v.extend_from_slice(&(data.len().min(0xffff) as u16).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// A DHCPv6 client message of any type with random options: client and server ids (ours,
/// another's, odd ones), IA_NAs with addresses, rapid commit, option requests, unknown
/// options, and lengths that run past their container.
fn dhcpv6(rng: &mut SmallRng, g: &Guest6) -> Vec<u8> {
    let kind = pick(rng, &[1, 1, 3, 3, 4, 5, 6, 8, 9, 11, 11, 2, 7, 12, 0]);
    let mut m = vec![kind, rng.random(), rng.random(), rng.random()];
    let duid = |rng: &mut SmallRng, mac: Mac| -> Vec<u8> {
        match rng.random_range(0..6) {
            0 => Vec::new(),
            1 => (0..rng.random_range(1..140))
                .map(|_| rng.random())
                .collect(),
            _ => [&[0u8, 3, 0, 1][..], &mac.0].concat(),
        }
    };
    for _ in 0..rng.random_range(0..=6) {
        let o = match rng.random_range(0..12) {
            0..=2 => {
                let d = duid(rng, g.mac);
                opt6(1, &d)
            }
            3..=4 => {
                let mac = pick(rng, &[REPLAY_MAC, REPLAY_MAC, g.mac]);
                let d = duid(rng, mac);
                opt6(2, &d)
            }
            5..=7 => {
                let mut ia = rng.random_range(0..4u32).to_be_bytes().to_vec();
                ia.extend_from_slice(&[0; 8]);
                for _ in 0..rng.random_range(0..3) {
                    let mut a = addr6(rng, g).octets().to_vec();
                    a.extend_from_slice(&rng.random::<[u8; 8]>());
                    if rng.random_bool(0.2) {
                        a.extend(opt6(13, &[0, 2, b'x']));
                    }
                    ia.extend(opt6(pick(rng, &[5, 5, 5, 13]), &a));
                }
                opt6(pick(rng, &[3, 3, 3, 4, 25]), &ia)
            }
            8 => opt6(14, &[]),
            9 => opt6(6, &[0, 23, 0, 24, 0, rng.random()]),
            10 => opt6(8, &rng.random::<[u8; 2]>()),
            _ => {
                let data: Vec<u8> = (0..rng.random_range(0..40)).map(|_| rng.random()).collect();
                opt6(rng.random(), &data)
            }
        };
        m.extend(o);
    }
    if m.len() > 6 && rng.random_bool(0.15) {
        // An option length that runs past the message.
        let at = 4 + 2;
        let l = be16(&m, at).unwrap_or(0);
        put16(&mut m, at, l.wrapping_add(rng.random_range(1..300)));
    }
    let to_host = rng.random_bool(0.15);
    let dst = if to_host {
        craft::host_ip6()
    } else {
        "ff02::1:2".parse().unwrap()
    };
    let src = if rng.random_bool(0.9) { g.ll } else { g.ula };
    let d = craft::udp(
        SocketAddrV6::new(src, 546, 0, 0),
        SocketAddrV6::new(dst, 547, 0, 0),
        &m,
    );
    eth_ip6(g.mac, dst, &craft::ipv6(src, dst, 17, 1, &d))
}

/// A packet behind a random chain of extension headers (hop-by-hop, destination options,
/// routing, fragment), some with lengths past the packet, a hop-by-hop out of place, or two
/// fragment headers.
fn extension_chain(rng: &mut SmallRng, g: &Guest6, me: Ipv6Addr) -> Vec<u8> {
    let other = addr6(rng, g);
    let dst = pick(rng, &[craft::host_ip6(), SERVER_IP6, SERVER_IP6, other]);
    let (proto, upper) = match rng.random_range(0..3) {
        0 => {
            let payload = random_data(rng);
            let d = craft::udp(
                SocketAddrV6::new(me, 5000, 0, 0),
                SocketAddrV6::new(dst, pick(rng, &[7, 53, 547]), 0, 0),
                &payload[..payload.len().min(65_000)],
            );
            (17u8, d)
        }
        1 => {
            let s = SocketAddrV6::new(me, 40000, 0, 0);
            let d = SocketAddrV6::new(dst, 80, 0, 0);
            (
                6,
                craft::tcp(s, d, craft::SYN, rng.random(), 0, 64240, &[], &[]),
            )
        }
        _ => {
            let mut m = craft::icmp_echo(rng.random(), 1, b"chain");
            m[0] = pick(rng, &[128, 135, 133]);
            put16(&mut m, 2, 0);
            let c = craft::checksum6(me, dst, 58, &m);
            put16(&mut m, 2, c);
            (58, m)
        }
    };
    let kinds: Vec<u8> = (0..rng.random_range(1..=10))
        .map(|i| {
            if i == 0 && rng.random_bool(0.5) {
                0
            } else {
                pick(rng, &[0, 60, 60, 43, 44, 59, 135])
            }
        })
        .collect();
    // Built from the upper layer outward: each header names the one after it.
    let mut body = upper;
    let mut next = proto;
    for &k in kinds.iter().rev() {
        let mut h = if k == 44 {
            let off: u16 = pick(rng, &[0, 0, 1, 8, 0xfff8]);
            let mut h = vec![next, 0];
            h.extend_from_slice(&off.to_be_bytes());
            h.extend_from_slice(&rng.random::<u32>().to_be_bytes());
            h
        } else {
            let units = rng.random_range(0..3u8);
            let mut h = vec![next, units];
            if k == 43 {
                h.extend_from_slice(&[pick(rng, &[0, 2, 4]), rng.random_range(0..3)]);
            }
            let len = 8 + 8 * usize::from(units);
            while h.len() < len {
                // Pad1 and PadN options mostly; an unknown option now and then.
                h.push(if rng.random_bool(0.9) { 0 } else { 0xc2 });
            }
            h
        };
        if rng.random_bool(0.1) && h.len() > 1 {
            h[1] = rng.random();
        }
        h.extend_from_slice(&body);
        body = h;
        next = k;
    }
    eth_ip6(g.mac, dst, &craft::ipv6(me, dst, next, 64, &body))
}

fn tcp_options(rng: &mut SmallRng) -> Vec<u8> {
    let mut o = Vec::new();
    for _ in 0..rng.random_range(1..=4) {
        match rng.random_range(0..12) {
            0 => {
                o.extend_from_slice(&[2, 4]);
                o.extend_from_slice(
                    &pick(rng, &[0u16, 1, 88, 536, 1460, 8960, 65535]).to_be_bytes(),
                );
            }
            1 => o.extend_from_slice(&[3, 3, pick(rng, &[0, 1, 7, 14, 15, 255])]),
            2 => o.extend_from_slice(&[4, 2]),
            3 => {
                let n = rng.random_range(0..=4);
                o.extend_from_slice(&[5, 2 + 8 * n]);
                for _ in 0..2 * n {
                    o.extend_from_slice(&rng.random::<u32>().to_be_bytes());
                }
            }
            4 => {
                o.extend_from_slice(&[8, 10]);
                o.extend_from_slice(&rng.random::<u64>().to_be_bytes());
            }
            5 => o.push(1),
            6 => o.push(0),
            7 => o.extend_from_slice(&[pick(rng, &[2, 3, 4, 5, 8, 30]), 0]),
            8 => o.extend_from_slice(&[pick(rng, &[2, 3, 5, 8]), 1]),
            9 => o.extend_from_slice(&[pick(rng, &[2, 5, 8]), 255, 1, 2]),
            10 => o.extend_from_slice(&[2, 3, 5]),
            _ => {
                let n = rng.random_range(2..12);
                o.extend_from_slice(&[rng.random_range(9..=255), n]);
                o.extend((2..n).map(|_| rng.random::<u8>()));
            }
        }
    }
    o.truncate(40);
    while o.len() & 3 != 0 {
        o.push(1);
    }
    o
}

fn dhcp_options(rng: &mut SmallRng) -> Vec<u8> {
    let mut o = Vec::new();
    let ip = |rng: &mut SmallRng| -> [u8; 4] {
        pick(
            rng,
            &[
                [192, 168, 30, 10],
                [192, 168, 30, 11],
                [192, 168, 30, 200],
                [192, 168, 30, 201],
                [192, 168, 30, 1],
                [0, 0, 0, 0],
                [10, 1, 2, 3],
                [255, 255, 255, 255],
            ],
        )
    };
    for _ in 0..rng.random_range(0..8) {
        match rng.random_range(0..18) {
            0 => o.extend_from_slice(&[53, 1, rng.random_range(0..=9)]),
            1 => o.extend_from_slice(&[53, pick(rng, &[0, 2])]),
            2..=3 => {
                o.extend_from_slice(&[50, 4]);
                o.extend_from_slice(&ip(rng));
            }
            4 => {
                o.extend_from_slice(&[54, 4]);
                o.extend_from_slice(&ip(rng));
            }
            5 => {
                let n = pick(rng, &[0u8, 1, 7, 255]);
                o.extend_from_slice(&[61, n]);
                o.extend((0..n).map(|_| rng.random::<u8>()));
            }
            6 => {
                let n = pick(rng, &[0u8, 1, 8, 63, 255]);
                o.extend_from_slice(&[12, n]);
                o.extend((0..n).map(|i| match i % 5 {
                    0 => b'a',
                    1 => 0,
                    2 => 0xff,
                    3 => b'\n',
                    _ => b'-',
                }));
            }
            7 => {
                let n = pick(rng, &[0u8, 3, 255]);
                o.extend_from_slice(&[55, n]);
                o.extend((0..n).map(|i| i.wrapping_add(1)));
            }
            8 => {
                o.extend_from_slice(&[57, 2]);
                o.extend_from_slice(&pick(rng, &[0u16, 1, 300, 576, 1500, 65535]).to_be_bytes());
            }
            9 => {
                o.extend_from_slice(&[51, 4]);
                o.extend_from_slice(&pick(rng, &[0u32, 1, u32::MAX]).to_be_bytes());
            }
            10 => o.extend_from_slice(&[52, 1, pick(rng, &[0, 1, 2, 3, 255])]),
            11 => o.extend_from_slice(&[81, 5, 0, 0, 0, 1, b'a']),
            12 => o.extend_from_slice(&[82, 6, 1, 4, 1, 2, 3, 4]),
            13 => o.resize(o.len() + rng.random_range(1..40), 0),
            14 => o.push(255),
            15 => o.extend_from_slice(&[pick(rng, &[12, 61, 55, 50]), 200, 1, 2]),
            16 => o.extend_from_slice(&[121, 5, 24, 10, 1, 2, 192]),
            _ => {
                let n = rng.random_range(0..20);
                o.extend_from_slice(&[rng.random_range(1..=254), n]);
                o.extend((0..n).map(|_| rng.random::<u8>()));
            }
        }
    }
    if rng.random_bool(0.85) {
        o.push(255);
    }
    o
}

// ---- bytes and checksums --------------------------------------------------------------------

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Writes where the bytes exist; a field past the end of a cut frame is simply not there.
fn put16(b: &mut [u8], at: usize, v: u16) {
    if let Some(s) = b.get_mut(at..at + 2) {
        s.copy_from_slice(&v.to_be_bytes());
    }
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    if let Some(s) = b.get_mut(at..at + 4) {
        s.copy_from_slice(&v.to_be_bytes());
    }
}

fn put(b: &mut [u8], at: usize, v: &[u8]) {
    if let Some(s) = b.get_mut(at..at + v.len()) {
        s.copy_from_slice(v);
    }
}

/// The Internet checksum of `data` added to `sum` (a pseudo-header's), complemented.
fn checksum(mut sum: u32, data: &[u8]) -> u16 {
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Offsets of the layers of a frame, as far as its bytes go.
#[derive(Clone, Copy, Default, Debug)]
struct Layout {
    ethertype: u16,
    ip: bool,
    /// IPv6 (`ip` too): no header checksum; the transport's covers the IPv6 pseudo-header.
    v6: bool,
    /// A fragment (a whole datagram's checksum cannot be checked in one).
    fragment: bool,
    /// Where the IPv4 payload starts and ends (the total length, cut to the frame).
    l4: usize,
    end: usize,
    proto: u8,
    /// A first (or only) fragment: the transport header is there.
    first: bool,
    dhcp: Option<usize>,
}

fn layout(b: &[u8]) -> Layout {
    let mut l = Layout {
        ethertype: be16(b, 12).unwrap_or(0),
        ..Layout::default()
    };
    if l.ethertype == 0x86dd {
        return layout6(b, l);
    }
    if l.ethertype != 0x0800 || b.len() < 34 {
        return l;
    }
    let ihl = usize::from(b[14] & 0x0f) * 4;
    if ihl < 20 || 14 + ihl > b.len() {
        return l;
    }
    l.ip = true;
    l.l4 = 14 + ihl;
    l.end = (14 + usize::from(be16(b, 16).unwrap_or(0))).clamp(l.l4, b.len());
    l.proto = b[23];
    l.first = be16(b, 20).unwrap_or(0) & 0x1fff == 0;
    l.fragment = be16(b, 20).unwrap_or(0) & 0x3fff != 0;
    if l.proto == 17 && l.first && l.l4 + 8 + 240 <= b.len() {
        let (sp, dp) = (be16(b, l.l4).unwrap_or(0), be16(b, l.l4 + 2).unwrap_or(0));
        if dp == 67 || sp == 68 {
            l.dhcp = Some(l.l4 + 8);
        }
    }
    l
}

/// The layers of an IPv6 frame: the extension headers walked to the upper layer (a fragment
/// that is not the first stops the walk).
fn layout6(b: &[u8], mut l: Layout) -> Layout {
    if b.len() < 54 {
        return l;
    }
    l.ip = true;
    l.v6 = true;
    l.first = true;
    l.end = (54 + usize::from(be16(b, 18).unwrap_or(0))).min(b.len());
    let mut next = b[20];
    let mut at = 54;
    for _ in 0..8 {
        match next {
            0 | 43 | 60 if at + 2 <= l.end => {
                next = b[at];
                at += 8 + 8 * usize::from(b[at + 1]);
            }
            44 if at + 8 <= l.end => {
                l.fragment = true;
                l.first = be16(b, at + 2).unwrap_or(0) & !7 == 0;
                next = b[at];
                at += 8;
            }
            _ => break,
        }
    }
    l.l4 = at.min(l.end);
    l.proto = next;
    l
}

/// The sum of the pseudo-header of a transport message of `len` bytes (IPv4's or IPv6's).
fn pseudo_sum(b: &[u8], l: Layout, len: usize, proto: u8) -> u32 {
    let addrs = if l.v6 { 22..54 } else { 26..34 };
    let mut s = 0u32;
    for i in addrs.step_by(2) {
        s += u32::from(be16(b, i).unwrap_or(0));
    }
    s + u32::from(proto) + len as u32
}

/// Recomputes the transport checksum (whole datagrams only: a fragment cannot be checked alone)
/// and then the IPv4 header's.
fn fix_checksums(b: &mut [u8]) {
    let l = layout(b);
    if !l.ip {
        return;
    }
    if !l.fragment {
        let len = l.end - l.l4;
        let pseudo = |len: usize, proto: u8, b: &[u8]| pseudo_sum(b, l, len, proto);
        match l.proto {
            6 if len >= 20 => {
                put16(b, l.l4 + 16, 0);
                let c = checksum(pseudo(len, 6, b), &b[l.l4..l.end]);
                put16(b, l.l4 + 16, c);
            }
            17 if len >= 8 => {
                // The UDP length field decides what the checksum covers, when it fits.
                let ulen = usize::from(be16(b, l.l4 + 4).unwrap_or(0));
                let len = if (8..=len).contains(&ulen) { ulen } else { len };
                put16(b, l.l4 + 6, 0);
                let c = checksum(pseudo(len, 17, b), &b[l.l4..l.l4 + len]);
                put16(b, l.l4 + 6, if c == 0 { 0xffff } else { c });
            }
            1 if len >= 4 && !l.v6 => {
                put16(b, l.l4 + 2, 0);
                let c = checksum(0, &b[l.l4..l.end]);
                put16(b, l.l4 + 2, c);
            }
            58 if len >= 4 && l.v6 => {
                put16(b, l.l4 + 2, 0);
                let c = checksum(pseudo(len, 58, b), &b[l.l4..l.end]);
                put16(b, l.l4 + 2, c);
            }
            _ => {}
        }
    }
    if l.v6 {
        return;
    }
    put16(b, 24, 0);
    let c = checksum(0, &b[14..l.l4]);
    put16(b, 24, c);
}

/// Makes the IPv4 total length and the UDP length agree with the frame again after an edit.
fn fix_lengths(b: &mut [u8]) {
    let l = layout(b);
    if !l.ip {
        return;
    }
    if l.v6 {
        let payload = (b.len() - 54).min(0xffff);
        put16(b, 18, payload as u16);
        if l.proto == 17 && l.first && b.len() >= l.l4 + 8 {
            put16(b, l.l4 + 4, (b.len() - l.l4).min(0xffff) as u16);
        }
        return;
    }
    let total = (b.len() - 14).min(0xffff);
    put16(b, 16, total as u16);
    if l.proto == 17 && l.first && b.len() >= l.l4 + 8 {
        put16(b, l.l4 + 4, (14 + total - l.l4) as u16);
    }
}

// ---- mutations ------------------------------------------------------------------------------

const BYTES: [u8; 10] = [0, 1, 0x7f, 0x80, 0xff, 0xfe, 0x40, 0x20, 0x10, 0x08];

fn word(rng: &mut SmallRng, len: usize) -> u16 {
    let len = len as u16;
    let r = rng.random();
    pick(
        rng,
        &[
            0,
            1,
            7,
            8,
            19,
            20,
            0x7f,
            0x80,
            0xff,
            0x100,
            576,
            1500,
            9000,
            0x7fff,
            0x8000,
            0xfffe,
            0xffff,
            len,
            len.wrapping_sub(14),
            len.wrapping_sub(13),
            len.wrapping_sub(15),
            len.wrapping_sub(34),
            r,
        ],
    )
}

fn mutate(rng: &mut SmallRng, b: &mut Vec<u8>, pool: &Pool) {
    let n = match rng.random_range(0..10) {
        0..=5 => 1,
        6..=8 => 2,
        _ => rng.random_range(3..=6),
    };
    for _ in 0..n {
        match rng.random_range(0..100) {
            0..=9 if !b.is_empty() => {
                for _ in 0..rng.random_range(1..=3) {
                    let i = rng.random_range(0..b.len());
                    b[i] ^= 1 << rng.random_range(0..8);
                }
            }
            10..=17 if !b.is_empty() => {
                let i = rng.random_range(0..b.len());
                b[i] = if rng.random_bool(0.2) {
                    b.len() as u8
                } else {
                    pick(rng, &BYTES)
                };
            }
            18..=22 if b.len() >= 2 => {
                let i = rng.random_range(0..b.len() - 1);
                let w = word(rng, b.len());
                put16(b, i, w);
            }
            23..=28 => {
                let l = layout(b);
                let r = rng.random_range(0..=b.len());
                let cut = pick(
                    rng,
                    &[
                        r,
                        14,
                        13,
                        33,
                        34,
                        l.l4,
                        l.l4 + 4,
                        l.l4 + 8,
                        l.l4 + 20,
                        l.end.saturating_sub(1),
                    ],
                );
                b.truncate(cut);
            }
            29..=33 => {
                let k = match rng.random_range(0..10) {
                    0..=5 => rng.random_range(1..64),
                    6..=8 => rng.random_range(64..2000),
                    _ => rng.random_range(2000..66_000),
                };
                let fill = rng.random_range(0..4);
                let start = b.len();
                b.resize(start + k, if fill == 1 { 0xff } else { 0 });
                if fill == 2 {
                    rng.fill(&mut b[start..]);
                } else if fill == 3 && start > 0 {
                    for i in start..b.len() {
                        b[i] = b[i % start];
                    }
                }
            }
            34..=37 => {
                let other = pool.any_frame(rng);
                let i = rng.random_range(0..=b.len());
                let j = if rng.random_bool(0.5) {
                    i.min(other.len())
                } else {
                    rng.random_range(0..=other.len())
                };
                b.truncate(i);
                b.extend_from_slice(&other[j..]);
            }
            38..=41 => fix_lengths(b),
            _ => field(rng, b),
        }
    }
}

/// A header-aware change to one field of one layer.
fn field(rng: &mut SmallRng, b: &mut Vec<u8>) {
    let l = layout(b);
    let mut layers = vec![0u8];
    if l.ethertype == 0x0806 && b.len() >= 22 {
        layers.extend([1, 1, 1]);
    }
    if l.ip {
        layers.extend([2, 2, 2]);
        if l.first && l.end > l.l4 {
            layers.extend([3, 3, 3, 3]);
        }
        if l.dhcp.is_some() {
            layers.extend([4, 4, 4, 4, 4]);
        }
    }
    match pick(rng, &layers) {
        0 => eth_field(rng, b),
        1 => arp_field(rng, b),
        2 if l.v6 => ip6_field(rng, b, l),
        2 => ip_field(rng, b, l),
        3 => match l.proto {
            6 => tcp_field(rng, b, l),
            17 => udp_field(rng, b, l),
            1 | 58 => icmp_field(rng, b, l),
            _ if l.v6 => ip6_field(rng, b, l),
            _ => ip_field(rng, b, l),
        },
        _ => dhcp_field(rng, b, l),
    }
}

fn eth_field(rng: &mut SmallRng, b: &mut Vec<u8>) {
    match rng.random_range(0..4) {
        0 => {
            let m = mac(rng);
            put(b, 0, &m.0);
        }
        1 => {
            let m = mac(rng);
            put(b, 6, &m.0);
        }
        2 => {
            let t = pick(
                rng,
                &[
                    0x0800, 0x0806, 0x86dd, 0x8100, 0x88a8, 0, 0x05dc, 0x0600, 0xffff,
                ],
            );
            put16(b, 12, t);
        }
        _ if b.len() >= 12 => {
            // A VLAN tag in front of the real type.
            let tag = [0x81, 0x00, 0, rng.random()];
            b.splice(12..12, tag);
        }
        _ => {}
    }
}

fn arp_field(rng: &mut SmallRng, b: &mut [u8]) {
    match rng.random_range(0..9) {
        0 => put16(b, 14, pick(rng, &[0, 1, 6, 0xffff])),
        1 => put16(b, 16, pick(rng, &[0x0800, 0x86dd, 0, 0x0806])),
        2 => put(b, 18, &[pick(rng, &[0, 1, 6, 16, 255])]),
        3 => put(b, 19, &[pick(rng, &[0, 1, 4, 16, 255])]),
        4 => put16(b, 20, pick(rng, &[0, 1, 2, 3, 4, 8, 9, 0xffff])),
        5 => put(b, 22, &mac(rng).0),
        6 => put(b, 28, &addr(rng).octets()),
        7 => put(b, 32, &mac(rng).0),
        _ => put(b, 38, &addr(rng).octets()),
    }
}

fn ip_options(rng: &mut SmallRng) -> Vec<u8> {
    let mut o = match rng.random_range(0..7) {
        0 => vec![1; 4],
        1 => vec![0; 4],
        2 => vec![7, 7, 4, 0, 0, 0, 0],
        3 => vec![131, 11, 4, 10, 77, 0, 2, 10, 77, 0, 3],
        4 => vec![7, 0],
        5 => vec![7, 255, 4],
        _ => vec![68, 12, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    };
    while o.len() & 3 != 0 {
        o.push(0);
    }
    o
}

/// One field of the IPv6 header or of its first extension header.
fn ip6_field(rng: &mut SmallRng, b: &mut [u8], l: Layout) {
    match rng.random_range(0..8) {
        0 => {
            let v = pick(rng, &[6, 6, 4, 0, 15]);
            put(b, 14, &[v << 4 | rng.random_range(0..16u8)]);
        }
        1 => {
            let w = word(rng, b.len());
            put16(b, 18, w);
        }
        2 => {
            let r = rng.random();
            put(b, 20, &[pick(rng, &[0, 6, 17, 58, 43, 44, 60, 59, 50, r])]);
        }
        3 => put(b, 21, &[pick(rng, &[0, 1, 2, 64, 254, 255])]),
        4 => {
            // A source or destination from the addresses that matter.
            let g = Guest6::new(craft::guest_mac(1));
            let a = addr6(rng, &g).octets();
            put(b, pick(rng, &[22, 38]), &a);
        }
        5 if l.l4 > 54 => put(b, 55, &[rng.random()]),
        6 if l.l4 > 54 => {
            let r = rng.random();
            put(b, 54, &[pick(rng, &[0, 6, 17, 44, 58, 59, r])]);
        }
        _ => {
            // Flow label and traffic class: nothing should care.
            let r = rng.random();
            put16(b, 15, r);
        }
    }
}

fn ip_field(rng: &mut SmallRng, b: &mut Vec<u8>, l: Layout) {
    match rng.random_range(0..12) {
        0 => {
            let v = pick(rng, &[4, 4, 4, 4, 0, 5, 6, 15]);
            put(b, 14, &[v << 4 | rng.random_range(0..16u8)]);
        }
        1 => put(b, 15, &[rng.random()]),
        2 => {
            let w = word(rng, b.len());
            put16(b, 16, w);
        }
        3 => {
            let r = rng.random();
            put16(b, 18, pick(rng, &[0, 1, 0xffff, r]));
        }
        4 => {
            let old = be16(b, 20).unwrap_or(0);
            let off = pick(rng, &[0u16, 1, 2, 3, 8, 100, 185, 1000, 8189, 8190, 8191]);
            let v = match rng.random_range(0..6) {
                0 => old | 0x2000,
                1 => old & !0x2000,
                2 => (old & 0xe000) | off,
                3 => 0x2000 | off,
                4 => old | 0x8000 | 0x4000,
                _ => rng.random(),
            };
            put16(b, 20, v);
        }
        5 => put(b, 22, &[pick(rng, &[0, 1, 64, 255])]),
        6 => put(
            b,
            23,
            &[pick(rng, &[1, 6, 17, 0, 2, 4, 41, 47, 50, 58, 132, 255])],
        ),
        7 => put(b, 26, &addr(rng).octets()),
        8 => put(b, 30, &addr(rng).octets()),
        9 => {
            // Options inserted with the header length and total length kept right.
            let o = ip_options(rng);
            let ihl = l.l4 - 14;
            if ihl + o.len() <= 60 {
                b.splice(l.l4..l.l4, o.iter().copied());
                b[14] = (b[14] & 0xf0) | ((ihl + o.len()) / 4) as u8;
                let total = be16(b, 16).unwrap_or(0).wrapping_add(o.len() as u16);
                put16(b, 16, total);
            }
        }
        10 => {
            let o = ip_options(rng);
            b.splice(l.l4..l.l4, o);
        }
        _ => put(b, 14, &[0x40 | pick(rng, &[15, 6, 5, 4])]),
    }
}

fn tcp_field(rng: &mut SmallRng, b: &mut Vec<u8>, l: Layout) {
    let t = l.l4;
    let shift = |rng: &mut SmallRng, v: u32| -> u32 {
        match rng.random_range(0..6) {
            0 => v.wrapping_add(rng.random_range(1..4)),
            1 => v.wrapping_sub(rng.random_range(1..4)),
            2 => v.wrapping_add(pick(rng, &[1000, 65535, 1 << 20, 1 << 31])),
            3 => v.wrapping_sub(pick(rng, &[1000, 65535, 1 << 20, 1 << 31])),
            4 => pick(rng, &[0, u32::MAX, 1 << 31]),
            _ => rng.random(),
        }
    };
    match rng.random_range(0..12) {
        0 => put16(b, t, pick(rng, &PORTS)),
        1 => put16(b, t + 2, pick(rng, &PORTS)),
        2 => {
            let v = shift(rng, be32(b, t + 4).unwrap_or(0));
            put32(b, t + 4, v);
        }
        3 => {
            let v = shift(rng, be32(b, t + 8).unwrap_or(0));
            put32(b, t + 8, v);
        }
        4 => {
            let low = b.get(t + 12).map_or(0, |x| x & 0x0f);
            put(b, t + 12, &[rng.random_range(0..16u8) << 4 | low]);
        }
        5 => {
            let f = pick(
                rng,
                &[
                    0x02, 0x12, 0x10, 0x11, 0x04, 0x14, 0x18, 0x03, 0x30, 0x00, 0xff, 0xc2, 0x06,
                ],
            );
            put(
                b,
                t + 13,
                &[if rng.random_bool(0.2) {
                    rng.random()
                } else {
                    f
                }],
            );
        }
        6 => {
            let r = rng.random();
            put16(b, t + 14, pick(rng, &[0, 1, 0x7fff, 0xffff, r]));
        }
        7 => {
            let r = rng.random();
            put16(b, t + 18, pick(rng, &[0, 1, 0xffff, r]));
            if rng.random_bool(0.7) {
                if let Some(f) = b.get_mut(t + 13) {
                    *f |= 0x20;
                }
            }
        }
        8..=9 if b.len() >= t + 20 => {
            // New options; consistent (data offset and total length follow) or not.
            let old = b
                .get(t + 12)
                .map_or(20, |x| usize::from(x >> 4) * 4)
                .clamp(20, b.len() - t);
            let o = tcp_options(rng);
            let grown = o.len() as isize - (old as isize - 20);
            b.splice(t + 20..t + old, o.iter().copied());
            if rng.random_bool(0.8) {
                let low = b[t + 12] & 0x0f;
                b[t + 12] = (((20 + o.len()) / 4) as u8) << 4 | low;
                let total = be16(b, 16).unwrap_or(0) as isize + grown;
                put16(b, 16, total.clamp(0, 0xffff) as u16);
            }
        }
        10 => {
            if rng.random_bool(0.5) {
                let mut d = vec![0u8; pick(rng, &[1, 100, 1460, 9000, 65000])];
                rng.fill(&mut d[..]);
                b.extend_from_slice(&d);
            } else {
                let keep = (t + 20).min(b.len());
                b.truncate(keep);
            }
            if rng.random_bool(0.8) {
                fix_lengths(b);
            }
        }
        _ => {
            let v = b
                .get(t + 12)
                .map_or(0, |x| (x & 0xf0) | rng.random_range(0..16u8));
            put(b, t + 12, &[v]);
        }
    }
}

fn udp_field(rng: &mut SmallRng, b: &mut Vec<u8>, l: Layout) {
    let u = l.l4;
    match rng.random_range(0..7) {
        0 => put16(b, u, pick(rng, &PORTS)),
        1 => put16(b, u + 2, pick(rng, &PORTS)),
        2 => {
            let w = word(rng, b.len().saturating_sub(u));
            put16(b, u + 4, w);
        }
        3 => put16(b, u + 6, pick(rng, &[0, 0xffff])),
        4 => {
            // A DNS query (to the relay, or anywhere) replacing the payload.
            let names = ["www.example.test", "a.b.c.d.e.f.g", "", "xn--zz.test"];
            let mut q = craft::dns_query(rng.random(), pick(rng, &names), pick(rng, &[1, 28, 12]));
            match rng.random_range(0..6) {
                0 => put16(&mut q, 4, pick(rng, &[0, 2, 0xffff])),
                1 => q[2] |= 0x80,
                2 => {
                    // A compression pointer to itself.
                    q.truncate(12);
                    q.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
                }
                3 => q.truncate(rng.random_range(0..q.len())),
                4 => {
                    q.truncate(12);
                    for _ in 0..60 {
                        q.push(63);
                        q.extend_from_slice(&[b'z'; 63]);
                    }
                    q.extend_from_slice(&[0, 0, 1, 0, 1]);
                }
                _ => {}
            }
            b.truncate(u + 8);
            b.extend_from_slice(&q);
            if rng.random_bool(0.5) {
                put16(b, u + 2, 53);
            }
            fix_lengths(b);
        }
        5 => {
            if rng.random_bool(0.5) {
                let d = random_data(rng);
                b.extend_from_slice(&d);
            } else {
                let keep = rng.random_range(u.min(b.len())..=b.len());
                b.truncate(keep);
            }
            if rng.random_bool(0.8) {
                fix_lengths(b);
            }
        }
        _ => {
            let (s, d) = (be16(b, u).unwrap_or(0), be16(b, u + 2).unwrap_or(0));
            put16(b, u, d);
            put16(b, u + 2, s);
        }
    }
}

fn icmp_field(rng: &mut SmallRng, b: &mut Vec<u8>, l: Layout) {
    let c = l.l4;
    match rng.random_range(0..6) {
        0 => {
            let (t, code) = pick(
                rng,
                &[
                    (8, 0),
                    (0, 0),
                    (3, 0),
                    (3, 1),
                    (3, 3),
                    (3, 4),
                    (11, 0),
                    (5, 1),
                    (13, 0),
                    (17, 0),
                    (12, 0),
                ],
            );
            put(b, c, &[t, code]);
        }
        1 => put(b, c + 1, &[rng.random()]),
        2 => {
            let r = rng.random();
            put32(b, c + 4, pick(rng, &[0, u32::MAX, r]));
        }
        3 => {
            // An error quoting a packet of a NAT flow (either way), as a router would send it.
            let (src, dst) = if rng.random_bool(0.5) {
                (GUEST_IP, SERVER_IP)
            } else {
                (SERVER_IP, GUEST_IP)
            };
            let proto = pick(rng, &[6, 17, 1]);
            let mut inner = ip4(src, dst, proto, 1, 0, &[0; 8]);
            put16(&mut inner, 20, pick(rng, &[40000, 5000, 80]));
            put16(&mut inner, 22, pick(rng, &[80, 7, 40000]));
            if rng.random_bool(0.3) {
                put16(&mut inner, 2, pick(rng, &[0, 8, 0xffff]));
            }
            inner.truncate(rng.random_range(0..=inner.len()).max(20));
            b.truncate(c);
            b.extend_from_slice(&[
                pick(rng, &[3, 11, 12]),
                pick(rng, &[0, 1, 3, 4]),
                0,
                0,
                0,
                0,
                0,
                0,
            ]);
            b.extend_from_slice(&inner);
            fix_lengths(b);
        }
        4 => {
            let keep = (c + rng.random_range(0..8)).min(b.len());
            b.truncate(keep);
            if rng.random_bool(0.8) {
                fix_lengths(b);
            }
        }
        _ => {
            let d = random_data(rng);
            b.extend_from_slice(&d);
            if rng.random_bool(0.8) {
                fix_lengths(b);
            }
        }
    }
}

fn dhcp_field(rng: &mut SmallRng, b: &mut Vec<u8>, l: Layout) {
    let Some(d) = l.dhcp else { return };
    match rng.random_range(0..10) {
        0 => put(b, d, &[pick(rng, &[0, 1, 2, 3, 255])]),
        1 => put(b, d + 1, &[pick(rng, &[0, 1, 6, 255])]),
        2 => put(b, d + 2, &[pick(rng, &[0, 1, 6, 16, 17, 255])]),
        3 => put16(b, d + 10, pick(rng, &[0, 0x8000, 0xffff, 1])),
        4 => {
            let at = d + 12 + 4 * rng.random_range(0..4);
            put(b, at, &addr(rng).octets());
        }
        5 => {
            let mut ch = [0u8; 16];
            if rng.random_bool(0.5) {
                ch[..6].copy_from_slice(&mac(rng).0);
            } else {
                rng.fill(&mut ch[..]);
            }
            put(b, d + 28, &ch);
        }
        6 => put32(b, d + 236, rng.random()),
        7 => {
            // sname and file full: options there (for an overload option) or garbage.
            let mut area = if rng.random_bool(0.5) {
                dhcp_options(rng)
            } else {
                vec![b'A'; 192]
            };
            area.resize(192, 0);
            put(b, d + 44, &area);
        }
        _ => {
            b.truncate(d + 240);
            if rng.random_bool(0.8) {
                b.extend_from_slice(&[53, 1, rng.random_range(1..=8)]);
            }
            b.extend(dhcp_options(rng));
            if rng.random_bool(0.8) {
                fix_lengths(b);
            }
        }
    }
}

// ---- the real target: the core through the replay driver -----------------------------------

/// What the core last sent on each TCP connection.
#[derive(Default)]
struct Conversation {
    flows: HashMap<FlowKey, Heard>,
}

/// Guest address and port, remote address and port (an IPv4 address as its u32).
type FlowKey = (u128, u16, u128, u16);

#[derive(Clone, Copy)]
struct Heard {
    /// The sequence number after the core's furthest segment.
    next: u32,
    /// The core's last acknowledgement.
    ack: Option<u32>,
    /// The core's last segment with data: sequence number and length.
    last: Option<(u32, u32)>,
}

/// (source, source port, destination, destination port, TCP offset) of a TCP frame.
fn tcp_tuple(b: &[u8]) -> Option<(u128, u16, u128, u16, usize)> {
    let l = layout(b);
    if !l.ip || l.proto != 6 || !l.first || l.end < l.l4 + 20 {
        return None;
    }
    let (src, dst) = if l.v6 {
        let a = |at: usize| Some(u128::from_be_bytes(b.get(at..at + 16)?.try_into().ok()?));
        (a(22)?, a(38)?)
    } else {
        (u128::from(be32(b, 26)?), u128::from(be32(b, 30)?))
    };
    Some((src, be16(b, l.l4)?, dst, be16(b, l.l4 + 2)?, l.l4))
}

impl Conversation {
    fn on_output(&mut self, f: &[u8]) {
        let Some((src, sp, dst, dp, t)) = tcp_tuple(f) else {
            return;
        };
        let l = layout(f);
        let (Some(seq), Some(ack), Some(&flags), Some(&off)) =
            (be32(f, t + 4), be32(f, t + 8), f.get(t + 13), f.get(t + 12))
        else {
            return;
        };
        let payload = (l.end - t).saturating_sub(usize::from(off >> 4) * 4) as u32;
        let next = seq
            .wrapping_add(payload)
            .wrapping_add(u32::from(flags & 0x03 != 0));
        let e = self.flows.entry((dst, dp, src, sp)).or_insert(Heard {
            next,
            ack: None,
            last: None,
        });
        // A retransmission does not move `next` back; a SYN-ACK starts a connection over.
        if next.wrapping_sub(e.next) as i32 > 0 || flags & 0x02 != 0 {
            e.next = next;
        }
        if payload > 0 {
            e.last = Some((seq, payload));
        }
        if flags & 0x10 != 0 {
            e.ack = Some(ack);
        }
    }

    fn sync(&self, b: &mut [u8], how: Sync) {
        let Some((src, sp, dst, dp, t)) = tcp_tuple(b) else {
            return;
        };
        let Some(h) = self.flows.get(&(src, sp, dst, dp)) else {
            return;
        };
        if let Some(a) = h.ack {
            put32(b, t + 4, a);
        }
        match (how, h.last) {
            (Sync::Partial, Some((seq, len))) => {
                put32(b, t + 8, seq);
                if len >= 2 {
                    if let Some(at) = sack_option(b, t) {
                        put32(b, at, seq.wrapping_add(len / 2));
                        put32(b, at + 4, seq.wrapping_add(len));
                    }
                }
            }
            _ => put32(b, t + 8, h.next),
        }
        fix_checksums(b);
    }
}

/// Where the first block of a segment's SACK option is.
fn sack_option(b: &[u8], t: usize) -> Option<usize> {
    let end = (t + usize::from(b.get(t + 12)? >> 4) * 4).min(b.len());
    let mut i = t + 20;
    while i < end {
        match b[i] {
            0 => return None,
            1 => i += 1,
            kind => {
                let len = usize::from(*b.get(i + 1)?);
                if len < 2 {
                    return None;
                }
                if kind == 5 && len >= 10 && i + 10 <= end {
                    return Some(i + 2);
                }
                i += len;
            }
        }
    }
    None
}

/// The socket a step means, when there is one.
fn resolve(d: &Driver, pick: Pick, tcp_only: bool, max_id: u32) -> Option<u32> {
    match pick {
        Pick::Open(k) => {
            let ids = if tcp_only {
                d.host.ids(|s| matches!(s, SimSocket::Tcp(_)))
            } else {
                d.host.ids(|_| true)
            };
            (!ids.is_empty()).then(|| ids[usize::from(k) % ids.len()])
        }
        Pick::Stale(k) => {
            let ids: Vec<u32> = (1..=max_id + 1)
                .filter(|id| !d.host.sockets.contains_key(id))
                .collect();
            (!ids.is_empty()).then(|| ids[usize::from(k) % ids.len()])
        }
    }
}

/// Runs `case` through the core (a panic is the finding); `fed` receives each frame as it was
/// handed to the core.
fn run_core(case: &Case, mut fed: Option<&mut Vec<Vec<u8>>>) {
    let script = Script::parse(&case.script.text()).expect("the harness writes valid scripts");
    let mut d = Driver::new(script);
    d.host.tcp_send_buffer = case.knobs.send_buffer;
    d.host.icmp_allowed = case.knobs.icmp_sockets;
    d.engine.set_batching(case.knobs.batching);
    d.engine.set_external_expiry(case.knobs.external_expiry);
    let talk = RefCell::new(Conversation::default());
    let mut emit = |_: Duration, f: &[u8]| talk.borrow_mut().on_output(f);
    let mut t = EPOCH;
    let mut max_id = 0u32;
    for (i, step) in case.steps.iter().enumerate() {
        match step {
            Step::Frame(f) => {
                let mut bytes = prepare(f).into_owned();
                if f.sync != Sync::Off {
                    talk.borrow().sync(&mut bytes, f.sync);
                }
                if let Some(v) = fed.as_deref_mut() {
                    v.push(bytes.clone());
                }
                let mut taken = false;
                if case.knobs.split_reassembly {
                    d.advance(t, &mut emit);
                    d.act(
                        |e, now, io, out| {
                            let mut whole = Vec::new();
                            match e.reassemble(now, &bytes, &mut whole) {
                                Reassembly::NotFragment => {}
                                Reassembly::Taken => taken = true,
                                Reassembly::Whole => {
                                    taken = true;
                                    e.handle_reassembled(now, &whole, io, out);
                                }
                            }
                        },
                        &mut emit,
                    );
                }
                if !taken {
                    d.frame(t, &bytes, &mut emit);
                }
                let batch_ends = !matches!(case.steps.get(i + 1), Some(Step::Frame(_)));
                if case.knobs.batching && batch_ends {
                    d.act(|e, now, io, out| e.flush(now, io, out), &mut emit);
                }
            }
            Step::Jump(us) => {
                t += Duration::from_micros(*us);
                d.advance(t, &mut emit);
            }
            Step::Event(ev, pick) => {
                let tcp_only = matches!(ev, Ev::Connected | Ev::ConnectFailed(_));
                if let Some(id) = resolve(&d, *pick, tcp_only, max_id) {
                    let ev = match *ev {
                        Ev::Readable => SockEvent::Readable(id),
                        Ev::Writable => SockEvent::Writable(id),
                        Ev::Connected => SockEvent::Connected(id),
                        Ev::ConnectFailed(k) => SockEvent::ConnectFailed(id, k),
                        Ev::Failed(k) => SockEvent::Failed(id, k),
                    };
                    d.act(
                        |e, now, io, out| e.handle_host_event(now, ev, io, out),
                        &mut emit,
                    );
                }
            }
            Step::Host(act, k) => {
                let kind: fn(&SimSocket) -> bool = match act {
                    HostAct::TcpData(_) | HostAct::TcpFin | HostAct::TcpDrain(_) => {
                        |s| matches!(s, SimSocket::Tcp(_))
                    }
                    HostAct::UdpData(_) | HostAct::UdpRefuse => |s| matches!(s, SimSocket::Udp(_)),
                    HostAct::IcmpData(..) => |s| matches!(s, SimSocket::Icmp(_)),
                };
                let ids = d.host.ids(kind);
                if !ids.is_empty() {
                    let id = ids[usize::from(*k) % ids.len()];
                    d.act(
                        |_, _, io, _| match act {
                            HostAct::TcpData(x) => io.deliver_tcp(id, x),
                            HostAct::TcpFin => io.tcp_fin(id),
                            HostAct::TcpDrain(n) => io.tcp_drain(id, *n as usize),
                            HostAct::UdpData(x) => io.deliver_udp(id, x),
                            HostAct::UdpRefuse => io.refuse_udp(id),
                            HostAct::IcmpData(from, x) => io.deliver_icmp(id, (*from).into(), x),
                        },
                        &mut emit,
                    );
                }
            }
            Step::Flush => d.act(|e, now, io, out| e.flush(now, io, out), &mut emit),
            Step::Expire => d.act(|e, now, io, out| e.expire_sessions(now, io, out), &mut emit),
            Step::Reconfigure(text) => {
                let cfg = Script::parse(text)
                    .expect("the harness writes valid configurations")
                    .config;
                d.act(
                    |e, now, io, out| {
                        e.reconfigure(now, cfg, io, out);
                    },
                    &mut emit,
                );
            }
            Step::Shutdown => d.act(|e, now, io, out| e.shutdown(now, io, out), &mut emit),
            Step::Inbound(i) => {
                let to = InboundTarget {
                    guest: i.guest,
                    guest_mac: i.mac,
                    forward: 1,
                };
                d.act(
                    |e, now, io, out| {
                        // A refusal is an answer like any other; a panic is the finding.
                        let _ = if i.udp {
                            let sock = io.adopt_udp(i.client.into());
                            e.udp_inbound(now, sock, i.client, to, &i.payload, io, out)
                        } else {
                            let sock = io.adopt_tcp(i.client.into());
                            e.tcp_inbound(now, sock, i.client, to, io, out)
                        };
                    },
                    &mut emit,
                );
            }
        }
        if let Some(&m) = d.host.sockets.keys().max() {
            max_id = max_id.max(m);
        }
    }
    if SHRINKING.load(Ordering::Relaxed) {
        return;
    }
    CORE_STATS.with(|s| {
        let mut s = s.borrow_mut();
        s.0.merge(d.engine.stats());
        s.1 += u64::from(max_id);
    });
}

thread_local! {
    /// What the core did over the cases run (that did not panic; shrinking's runs aside) and how
    /// many host sockets it opened: whether the frames get past the checks into the protocols,
    /// not just dropped.
    static CORE_STATS: RefCell<(Stats, u64)> = RefCell::new((Stats::default(), 0));
}

fn core_stats_line() -> String {
    CORE_STATS.with(|s| {
        let (st, sockets) = &*s.borrow();
        let drops: Vec<String> = DropReason::ALL
            .iter()
            .map(|r| format!("{} {}", r.name(), st.drops_of(*r)))
            .collect();
        format!(
            "fuzz: the core took {} frames and sent {}, opened {sockets} host sockets; dropped: {}",
            st.frames_in,
            st.frames_out,
            drops.join(", ")
        )
    })
}

// ---- catching panics ------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq)]
struct PanicRecord {
    message: String,
    /// file:line:column; shrinking keeps a case only while it panics *here*, so that it does
    /// not slide to another bug on the way.
    location: String,
    backtrace: Option<String>,
}

thread_local! {
    static CATCHING: Cell<bool> = const { Cell::new(false) };
    static CAUGHT: RefCell<Option<PanicRecord>> = const { RefCell::new(None) };
}
static WANT_BACKTRACE: AtomicBool = AtomicBool::new(false);

/// Panics inside `catch` are recorded quietly (thousands happen while shrinking); any other
/// panic is reported by the default hook as usual.
fn install_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if !CATCHING.with(Cell::get) {
                return previous(info);
            }
            let p = info.payload();
            let message = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(a panic without a message)".to_owned());
            let location = info
                .location()
                .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
                .unwrap_or_default();
            let backtrace = WANT_BACKTRACE
                .load(Ordering::Relaxed)
                .then(|| trim_backtrace(&std::backtrace::Backtrace::force_capture().to_string()));
            CAUGHT.with(|c| {
                *c.borrow_mut() = Some(PanicRecord {
                    message,
                    location,
                    backtrace,
                })
            });
        }));
    });
}

/// The frames from where the panic was raised down to the harness's own, without the hook's
/// and the unwinder's above them nor the thread start below.
fn trim_backtrace(bt: &str) -> String {
    let lines: Vec<&str> = bt.lines().collect();
    // A frame is a numbered line ("  12: name") and the "at file:line" lines under it.
    let frame_starts: Vec<usize> = (0..lines.len())
        .filter(|&i| {
            let l = lines[i].trim_start();
            l.split_once(':')
                .is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
        .collect();
    // Above the panic: the hook and the unwinder, up to `rust_begin_unwind` and the panic
    // functions of core (`panic_fmt`, `expect_failed`...). Below the case: catch_unwind.
    let raised = frame_starts
        .iter()
        .position(|&i| lines[i].contains("begin_unwind"))
        .map_or(0, |p| p + 1);
    let first = (raised..frame_starts.len())
        .find(|&p| {
            let l = lines[frame_starts[p]];
            !(l.contains("core::panicking")
                || l.contains("core::option::")
                || l.contains("core::result::"))
        })
        .unwrap_or(raised);
    let last = (first..frame_starts.len())
        .find(|&p| {
            let l = lines[frame_starts[p]];
            l.contains("AssertUnwindSafe") || l.contains("catch_unwind")
        })
        .unwrap_or(frame_starts.len());
    let (Some(&from), to) = (frame_starts.get(first), frame_starts.get(last).copied()) else {
        return bt.to_owned();
    };
    lines[from..to.unwrap_or(lines.len()).max(from)].join("\n")
}

/// Whether this build checks arithmetic overflow (the core is built with the same settings).
fn overflow_checks_on() -> bool {
    catch(|| {
        let x = std::hint::black_box(u8::MAX);
        std::hint::black_box(x + 1);
    })
    .is_some()
}

/// Started (in ms since the watchdog began) when a case began running, u64::MAX when idle.
static RUNNING_SINCE: AtomicU64 = AtomicU64::new(u64::MAX);
static CURRENT_CASE: AtomicU64 = AtomicU64::new(0);
static SHRINKING: AtomicBool = AtomicBool::new(false);
static CLOCK: std::sync::OnceLock<WallClock> = std::sync::OnceLock::new();

fn clock_ms() -> u64 {
    CLOCK.get_or_init(WallClock::now).elapsed().as_millis() as u64
}

fn catch(f: impl FnOnce()) -> Option<PanicRecord> {
    CATCHING.with(|c| c.set(true));
    CAUGHT.with(|c| c.borrow_mut().take());
    RUNNING_SINCE.store(clock_ms(), Ordering::Relaxed);
    let r = panic::catch_unwind(AssertUnwindSafe(f));
    RUNNING_SINCE.store(u64::MAX, Ordering::Relaxed);
    CATCHING.with(|c| c.set(false));
    let caught = CAUGHT.with(|c| c.borrow_mut().take());
    r.err().map(|_| {
        caught.unwrap_or_else(|| PanicRecord {
            message: "(panic not recorded)".to_owned(),
            location: String::new(),
            backtrace: None,
        })
    })
}

/// A hang cannot be caught like a panic: a thread watches the running case and ends the
/// process when one takes too long, saying which it was.
fn watchdog(limit: Duration, seed: u64) {
    clock_ms();
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(500));
        let since = RUNNING_SINCE.load(Ordering::Relaxed);
        if since != u64::MAX && clock_ms().saturating_sub(since) > limit.as_millis() as u64 {
            let n = CURRENT_CASE.load(Ordering::Relaxed);
            let what = if SHRINKING.load(Ordering::Relaxed) {
                "a shrunk form of case"
            } else {
                "case"
            };
            eprintln!(
                "fuzz: {what} {n} (seed {seed}) has run for over {} s: a hang? \
                 Run the case alone with --seed {seed} --only {n}",
                limit.as_secs()
            );
            std::process::exit(3);
        }
    });
}

// ---- the run and the shrinker (generic over the target, for the self-test) ------------------

struct RunOpts {
    seed: u64,
    cases: Option<u64>,
    seconds: Option<f64>,
    only: Option<u64>,
    max_steps: usize,
    shrink_seconds: f64,
    progress: bool,
    print: bool,
}

#[derive(Default)]
struct RunStats {
    cases: u64,
    frames: u64,
    elapsed: Duration,
    /// The case that took longest, and how long (a slow one is where a hang would start).
    slowest: (u64, Duration),
}

struct Found {
    index: u64,
    /// The first panic, and the minimal case with its panic.
    original: (Case, PanicRecord),
    case: Case,
    panic: PanicRecord,
    shrink_runs: u64,
    shrink_time: Duration,
}

struct RunOutcome {
    stats: RunStats,
    found: Option<Found>,
}

fn fuzz<T: FnMut(&Case, Option<&mut Vec<Vec<u8>>>)>(
    pool: &Pool,
    opts: &RunOpts,
    target: &mut T,
) -> RunOutcome {
    let start = WallClock::now();
    let mut stats = RunStats::default();
    let mut next_progress = Duration::from_secs(30);
    let (first, last) = match opts.only {
        Some(n) => (n, n),
        None => (0, u64::MAX),
    };
    for index in first..=last {
        let elapsed = start.elapsed();
        if opts.cases.is_some_and(|n| stats.cases >= n)
            || opts.seconds.is_some_and(|s| elapsed.as_secs_f64() >= s)
        {
            break;
        }
        if opts.progress && elapsed >= next_progress {
            next_progress += Duration::from_secs(30);
            eprintln!(
                "fuzz: {} cases, {} frames, {:.0} s...",
                stats.cases,
                stats.frames,
                elapsed.as_secs_f64()
            );
        }
        let case = generate(pool, opts.seed, index, opts.max_steps);
        stats.cases += 1;
        stats.frames += case.frames() as u64;
        CURRENT_CASE.store(index, Ordering::Relaxed);
        if opts.print {
            let frames: Vec<Vec<u8>> = pcap_frames(&case, &[])
                .into_iter()
                .map(|f| f.data)
                .collect();
            println!(
                "# case {index}\n{}{}",
                case.script.text(),
                steps_text(&case, &frames)
            );
        }
        let t0 = WallClock::now();
        let caught = catch(|| target(&case, None));
        if t0.elapsed() > stats.slowest.1 {
            stats.slowest = (index, t0.elapsed());
        }
        if let Some(p) = caught {
            stats.elapsed = start.elapsed();
            if opts.progress {
                eprintln!(
                    "fuzz: case {index} panicked: {} at {}; shrinking ({} steps, {} frames)...",
                    p.message,
                    p.location,
                    case.steps.len(),
                    case.frames()
                );
            }
            let t0 = WallClock::now();
            let mut s = Shrinker {
                target,
                location: p.location.clone(),
                deadline: t0 + Duration::from_secs_f64(opts.shrink_seconds.max(0.0)),
                runs: 0,
                last: p.clone(),
            };
            SHRINKING.store(true, Ordering::Relaxed);
            let small = s.shrink(case.clone());
            SHRINKING.store(false, Ordering::Relaxed);
            let (runs, panic) = (s.runs, s.last);
            return RunOutcome {
                stats,
                found: Some(Found {
                    index,
                    original: (case, p),
                    case: small,
                    panic,
                    shrink_runs: runs,
                    shrink_time: t0.elapsed(),
                }),
            };
        }
    }
    stats.elapsed = start.elapsed();
    RunOutcome { stats, found: None }
}

struct Shrinker<'a, T> {
    target: &'a mut T,
    location: String,
    deadline: WallClock,
    runs: u64,
    /// The panic of the last case kept.
    last: PanicRecord,
}

impl<T: FnMut(&Case, Option<&mut Vec<Vec<u8>>>)> Shrinker<'_, T> {
    fn keeps(&mut self, c: &Case) -> bool {
        if WallClock::now() >= self.deadline {
            return false;
        }
        self.runs += 1;
        let target = &mut *self.target;
        match catch(|| target(c, None)) {
            Some(p) if p.location == self.location => {
                self.last = p;
                true
            }
            _ => false,
        }
    }

    fn shrink(&mut self, mut case: Case) -> Case {
        loop {
            let before = case.cost();
            self.remove_steps(&mut case);
            self.simplify_setup(&mut case);
            for i in 0..case.steps.len() {
                self.simplify_step(&mut case, i);
            }
            if case.cost() >= before || WallClock::now() >= self.deadline {
                return case;
            }
        }
    }

    /// Removes runs of steps, long runs first (ddmin-like), from the end backward.
    fn remove_steps(&mut self, case: &mut Case) {
        let mut k = (case.steps.len() / 2).max(1);
        loop {
            let mut end = case.steps.len();
            while end > 0 {
                let start = end.saturating_sub(k);
                let mut c = case.clone();
                c.steps.drain(start..end);
                c.normalize();
                if self.keeps(&c) {
                    *case = c;
                    end = start.min(case.steps.len());
                } else {
                    end = start;
                }
            }
            if k == 1 {
                break;
            }
            k /= 2;
        }
    }

    fn simplify_setup(&mut self, case: &mut Case) {
        let mut progress = true;
        while progress {
            progress = false;
            let mut options: Vec<Case> = case
                .knobs
                .simpler()
                .into_iter()
                .map(|k| Case {
                    knobs: k,
                    ..case.clone()
                })
                .collect();
            if let ScriptSrc::Variant(v) = &case.script {
                options.extend(v.simpler().into_iter().map(|v| Case {
                    script: ScriptSrc::Variant(v),
                    ..case.clone()
                }));
            }
            for c in options {
                if self.keeps(&c) {
                    *case = c;
                    progress = true;
                    break;
                }
            }
        }
    }

    fn with_step(case: &Case, i: usize, s: Step) -> Case {
        let mut c = case.clone();
        c.steps[i] = s;
        c
    }

    fn simplify_step(&mut self, case: &mut Case, i: usize) {
        let Some(step) = case.steps.get(i).cloned() else {
            return;
        };
        match step {
            Step::Frame(f) => {
                if f.sync != Sync::Off {
                    let c = Self::with_step(
                        case,
                        i,
                        Step::Frame(FrameStep {
                            sync: Sync::Off,
                            ..f.clone()
                        }),
                    );
                    if self.keeps(&c) {
                        *case = c;
                    }
                }
                self.shrink_bytes(case, i);
            }
            Step::Jump(us) => {
                let mut v = us;
                for candidate in [0, v / 2] {
                    if candidate < v && self.keeps(&Self::with_step(case, i, Step::Jump(candidate)))
                    {
                        v = candidate;
                        case.steps[i] = Step::Jump(v);
                    }
                }
                while v > 1 && self.keeps(&Self::with_step(case, i, Step::Jump(v / 2))) {
                    v /= 2;
                    case.steps[i] = Step::Jump(v);
                }
            }
            Step::Event(ev, Pick::Stale(_) | Pick::Open(1..)) => {
                let c = Self::with_step(case, i, Step::Event(ev, Pick::Open(0)));
                if self.keeps(&c) {
                    *case = c;
                }
            }
            Step::Host(act, k) => {
                if k != 0 && self.keeps(&Self::with_step(case, i, Step::Host(act.clone(), 0))) {
                    case.steps[i] = Step::Host(act.clone(), 0);
                }
                let k = match &case.steps[i] {
                    Step::Host(_, k) => *k,
                    _ => k,
                };
                let data = match &act {
                    HostAct::TcpData(d) | HostAct::UdpData(d) | HostAct::IcmpData(_, d) => {
                        d.clone()
                    }
                    _ => return,
                };
                let with = |d: Vec<u8>| match &act {
                    HostAct::TcpData(_) => HostAct::TcpData(d),
                    HostAct::UdpData(_) => HostAct::UdpData(d),
                    HostAct::IcmpData(a, _) => HostAct::IcmpData(*a, d),
                    other => other.clone(),
                };
                let mut len = data.len();
                while len > 0 {
                    let shorter = data[..len / 2].to_vec();
                    if !self.keeps(&Self::with_step(case, i, Step::Host(with(shorter), k))) {
                        break;
                    }
                    len /= 2;
                    case.steps[i] = Step::Host(with(data[..len].to_vec()), k);
                }
            }
            _ => {}
        }
    }

    /// Cuts bytes out of a frame (runs of them, long runs first, from the end: truncation
    /// first), then zeroes what it can.
    fn shrink_bytes(&mut self, case: &mut Case, i: usize) {
        let frame = |case: &Case| match &case.steps[i] {
            Step::Frame(f) => f.clone(),
            _ => unreachable!("step {i} is a frame"),
        };
        let set = |case: &Case, data: Vec<u8>| {
            let f = frame(case);
            Self::with_step(case, i, Step::Frame(FrameStep { data, ..f }))
        };
        let mut k = (frame(case).data.len() / 2).max(1);
        loop {
            let mut end = frame(case).data.len();
            while end > 0 {
                let start = end.saturating_sub(k);
                let mut d = frame(case).data;
                d.drain(start..end);
                let c = set(case, d);
                if self.keeps(&c) {
                    *case = c;
                }
                end = start;
            }
            if k == 1 {
                break;
            }
            k /= 2;
        }
        let mut k = frame(case).data.len().max(1);
        loop {
            let len = frame(case).data.len();
            let mut start = 0;
            while start < len {
                let end = (start + k).min(len);
                let mut d = frame(case).data;
                if d[start..end].iter().any(|b| *b != 0) {
                    d[start..end].fill(0);
                    let c = set(case, d);
                    if self.keeps(&c) {
                        *case = c;
                    }
                }
                start = end;
            }
            if k == 1 {
                break;
            }
            k /= 2;
        }
    }
}

// ---- writing and reading cases --------------------------------------------------------------

fn hex(d: &[u8]) -> String {
    if d.is_empty() {
        return "-".to_owned();
    }
    d.iter()
        .fold(String::with_capacity(2 * d.len()), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn unhex(s: &str) -> Result<Vec<u8>> {
    if s == "-" {
        return Ok(Vec::new());
    }
    if s.len() & 1 != 0 || !s.is_ascii() {
        bail!("not hex");
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).context("bad hex"))
        .collect()
}

fn kind_name(k: ErrorKind) -> String {
    format!("{k:?}")
}

fn ev_text(ev: Ev) -> String {
    match ev {
        Ev::Readable => "readable".to_owned(),
        Ev::Writable => "writable".to_owned(),
        Ev::Connected => "connected".to_owned(),
        Ev::ConnectFailed(k) => format!("connect-failed:{}", kind_name(k)),
        Ev::Failed(k) => format!("failed:{}", kind_name(k)),
    }
}

/// A frame decoded in one line, for the reader of a steps file.
fn describe(f: &[u8]) -> String {
    let mut d = String::new();
    // The decoder promises not to panic on any input; the report must not depend on that.
    if catch(|| d = decode::describe(f)).is_some() {
        d = "(undecodable)".to_owned();
    }
    d
}

/// The steps file: one step a line; frames are the pcap's, in order (their byte counts are
/// repeated here as a check).
fn steps_text(case: &Case, frames: &[Vec<u8>]) -> String {
    let k = &case.knobs;
    let mut s = format!(
        "knobs batching={} split_reassembly={} external_expiry={} send_buffer={} icmp_sockets={}\n",
        u8::from(k.batching),
        u8::from(k.split_reassembly),
        u8::from(k.external_expiry),
        k.send_buffer,
        u8::from(k.icmp_sockets)
    );
    let mut n = 0;
    for step in &case.steps {
        let line = match step {
            Step::Frame(_) => {
                n += 1;
                let f = frames.get(n - 1).map_or(&[][..], Vec::as_slice);
                format!("frame {}  # {}", f.len(), describe(f))
            }
            Step::Jump(us) => format!("jump {us}"),
            Step::Event(ev, Pick::Open(k)) => format!("event {} open {k}", ev_text(*ev)),
            Step::Event(ev, Pick::Stale(k)) => format!("event {} stale {k}", ev_text(*ev)),
            Step::Host(a, k) => match a {
                HostAct::TcpData(d) => format!("tcp-data {k} {}", hex(d)),
                HostAct::TcpFin => format!("tcp-fin {k}"),
                HostAct::TcpDrain(n) => format!("tcp-drain {k} {n}"),
                HostAct::UdpData(d) => format!("udp-data {k} {}", hex(d)),
                HostAct::UdpRefuse => format!("udp-refuse {k}"),
                HostAct::IcmpData(a, d) => format!("icmp-data {k} {a} {}", hex(d)),
            },
            Step::Flush => "flush".to_owned(),
            Step::Expire => "expire".to_owned(),
            Step::Reconfigure(t) => format!("reconfigure {t}"),
            Step::Shutdown => "shutdown".to_owned(),
            Step::Inbound(i) => format!(
                "inbound {} {} {} {} {}",
                if i.udp { "udp" } else { "tcp" },
                i.client,
                i.guest,
                i.mac,
                hex(&i.payload)
            ),
        };
        s.push_str(&line);
        s.push('\n');
    }
    s
}

fn parse_case(script: String, steps: &str, frames: Vec<pcap::Frame>) -> Result<Case> {
    let mut frames = frames.into_iter();
    let mut knobs = Knobs::default();
    let mut out = Vec::new();
    for (n, line) in steps.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let err = || format!("line {}: `{line}`", n + 1);
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        // Trailing comments, except in a reconfiguration's TOML (which has none of its own).
        let rest = match rest.split_once(" #") {
            Some((r, _)) if word != "reconfigure" => r,
            _ => rest,
        };
        let args: Vec<&str> = rest.split_whitespace().collect();
        let arg = |i: usize| args.get(i).copied().with_context(err);
        let num = |i: usize| -> Result<u64> { arg(i)?.parse().with_context(err) };
        let sock = |i: usize| -> Result<u8> { arg(i)?.parse().with_context(err) };
        let step = match word {
            "knobs" => {
                for kv in &args {
                    let (k, v) = kv.split_once('=').with_context(err)?;
                    let v: usize = v.parse().with_context(err)?;
                    match k {
                        "batching" => knobs.batching = v != 0,
                        "split_reassembly" => knobs.split_reassembly = v != 0,
                        "external_expiry" => knobs.external_expiry = v != 0,
                        "send_buffer" => knobs.send_buffer = v,
                        "icmp_sockets" => knobs.icmp_sockets = v != 0,
                        _ => bail!("{}: unknown knob {k}", err()),
                    }
                }
                continue;
            }
            "frame" => {
                let f = frames
                    .next()
                    .with_context(|| format!("{}: the pcap has no more frames", err()))?;
                if f.data.len() as u64 != num(0)? {
                    bail!("{}: the pcap's frame has {} bytes", err(), f.data.len());
                }
                Step::Frame(FrameStep {
                    data: f.data,
                    fix: false,
                    sync: Sync::Off,
                })
            }
            "jump" => Step::Jump(num(0)?),
            "event" => {
                let (name, kind) = arg(0)?.split_once(':').unwrap_or((arg(0)?, ""));
                let kind = || {
                    KINDS
                        .iter()
                        .copied()
                        .find(|k| kind_name(*k) == kind)
                        .with_context(err)
                };
                let ev = match name {
                    "readable" => Ev::Readable,
                    "writable" => Ev::Writable,
                    "connected" => Ev::Connected,
                    "connect-failed" => Ev::ConnectFailed(kind()?),
                    "failed" => Ev::Failed(kind()?),
                    _ => bail!("{}: unknown event", err()),
                };
                let pick = match arg(1)? {
                    "open" => Pick::Open(sock(2)?),
                    "stale" => Pick::Stale(sock(2)?),
                    _ => bail!("{}: open or stale?", err()),
                };
                Step::Event(ev, pick)
            }
            "tcp-data" => Step::Host(
                HostAct::TcpData(unhex(arg(1)?).with_context(err)?),
                sock(0)?,
            ),
            "tcp-fin" => Step::Host(HostAct::TcpFin, sock(0)?),
            "tcp-drain" => Step::Host(HostAct::TcpDrain(num(1)? as u32), sock(0)?),
            "udp-data" => Step::Host(
                HostAct::UdpData(unhex(arg(1)?).with_context(err)?),
                sock(0)?,
            ),
            "udp-refuse" => Step::Host(HostAct::UdpRefuse, sock(0)?),
            "icmp-data" => Step::Host(
                HostAct::IcmpData(
                    arg(1)?.parse().with_context(err)?,
                    unhex(arg(2)?).with_context(err)?,
                ),
                sock(0)?,
            ),
            "flush" => Step::Flush,
            "expire" => Step::Expire,
            "shutdown" => Step::Shutdown,
            "inbound" => Step::Inbound(InboundStep {
                udp: match arg(0)? {
                    "udp" => true,
                    "tcp" => false,
                    _ => bail!("{}: tcp or udp?", err()),
                },
                client: arg(1)?.parse().with_context(err)?,
                guest: arg(2)?.parse().with_context(err)?,
                mac: arg(3)?
                    .parse()
                    .map_err(|()| anyhow::anyhow!("{}: not a MAC", err()))?,
                payload: unhex(arg(4)?).with_context(err)?,
            }),
            "reconfigure" => {
                Script::parse(rest).with_context(err)?;
                Step::Reconfigure(rest.to_owned())
            }
            _ => bail!("{}: unknown step", err()),
        };
        out.push(step);
    }
    Ok(Case {
        script: ScriptSrc::Text(script),
        knobs,
        steps: out,
    })
}

/// The frames of a case as the core got them, each stamped with the time it was fed.
fn pcap_frames(case: &Case, fed: &[Vec<u8>]) -> Vec<pcap::Frame> {
    let mut t = EPOCH;
    let mut out = Vec::new();
    for s in &case.steps {
        match s {
            Step::Jump(us) => t += Duration::from_micros(*us),
            Step::Frame(f) => {
                let data = fed
                    .get(out.len())
                    .cloned()
                    .unwrap_or_else(|| prepare(f).into_owned());
                out.push(pcap::Frame { ts: t, data });
            }
            _ => {}
        }
    }
    out
}

/// Writes STEM.in.pcap, STEM.steps and STEM.toml into `dir`; returns DIR/STEM.
fn write_case(
    dir: &Path,
    stem: &str,
    case: &Case,
    fed: &[Vec<u8>],
    header: &str,
) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let base = dir.join(stem);
    let frames = pcap_frames(case, fed);
    let data: Vec<Vec<u8>> = frames.iter().map(|f| f.data.clone()).collect();
    pcap::write(&base.with_extension("in.pcap"), &frames)?;
    let mut text = String::new();
    for l in header.lines() {
        let _ = writeln!(text, "# {l}");
    }
    text.push_str(&steps_text(case, &data));
    let steps = base.with_extension("steps");
    std::fs::write(&steps, text).with_context(|| format!("writing {}", steps.display()))?;
    let toml = base.with_extension("toml");
    std::fs::write(&toml, case.script.text().as_bytes())
        .with_context(|| format!("writing {}", toml.display()))?;
    Ok(base)
}

fn read_case(base: &Path) -> Result<Case> {
    let base = base.with_extension("");
    // `case.steps` or `case` alike; `with_extension("")` leaves a `.in` from `.in.pcap`.
    let base = base.with_extension("");
    let read = |ext: &str| -> Result<String> {
        let p = base.with_extension(ext);
        std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
    };
    let frames = pcap::read(&base.with_extension("in.pcap"))?;
    let script = read("toml")?;
    // Checked here, so that a bad file is an error of its own and not a panic of the run.
    Script::parse(&script).with_context(|| format!("{}.toml", base.display()))?;
    parse_case(script, &read("steps")?, frames)
}

/// Shrinks are done: runs the minimal case once more (with a backtrace this time), writes it,
/// reads it back and checks that the written case panics the same way.
fn report<T: FnMut(&Case, Option<&mut Vec<Vec<u8>>>)>(
    dir: &Path,
    stem: &str,
    found: &Found,
    seed: u64,
    target: &mut T,
) -> Result<PathBuf> {
    let mut fed = Vec::new();
    WANT_BACKTRACE.store(true, Ordering::Relaxed);
    let again = catch(|| target(&found.case, Some(&mut fed)));
    WANT_BACKTRACE.store(false, Ordering::Relaxed);
    let p = again.as_ref().unwrap_or(&found.panic);
    let (oc, op) = &found.original;
    let header = format!(
        "hubnat-fuzz: case {} of seed {seed} (regenerate it: hubnat-fuzz --seed {seed} --only {})\n\
         panic: {}\nat: {}\n\
         shrunk from {} steps ({} frames) to {} steps ({} frames) in {} runs, {:.1} s\n\
         first panic: {} at {}\n\
         rerun: hubnat-fuzz --reproduce {}\n\n\
         Steps: frame LEN (the pcap's next frame), jump MICROSECONDS, event KIND open|stale N (the\n\
         Nth open socket, lowest id first, modulo their count), tcp-data|udp-data N HEX, tcp-fin N,\n\
         tcp-drain N BYTES, udp-refuse N, icmp-data N FROM HEX (the Nth socket of that kind),\n\
         flush, expire, shutdown, reconfigure ENGINE-TOML.\n\n\
         backtrace:\n{}",
        found.index,
        found.index,
        p.message,
        p.location,
        oc.steps.len(),
        oc.frames(),
        found.case.steps.len(),
        found.case.frames(),
        found.shrink_runs,
        found.shrink_time.as_secs_f64(),
        op.message,
        op.location,
        dir.join(stem).display(),
        p.backtrace.as_deref().unwrap_or("(none)")
    );
    let path = write_case(dir, stem, &found.case, &fed, &header)?;
    let back = read_case(&path)?;
    match catch(|| target(&back, None)) {
        Some(q) if q.location == found.panic.location => {}
        other => eprintln!(
            "fuzz: warning: the written case does not panic at the same place when read back \
             ({:?}); the case in memory did",
            other.map(|q| q.location)
        ),
    }
    Ok(path)
}

fn reproduce(path: &Path) -> Result<ExitCode> {
    let case = read_case(path)?;
    WANT_BACKTRACE.store(true, Ordering::Relaxed);
    match catch(|| run_core(&case, None)) {
        None => {
            println!(
                "fuzz: {} ({} steps, {} frames): no panic",
                path.display(),
                case.steps.len(),
                case.frames()
            );
            Ok(ExitCode::SUCCESS)
        }
        Some(p) => {
            println!(
                "fuzz: {}: PANIC: {} at {}\n{}",
                path.display(),
                p.message,
                p.location,
                p.backtrace.unwrap_or_default()
            );
            Ok(ExitCode::from(1))
        }
    }
}

// ---- self-test ------------------------------------------------------------------------------

const FAKE_JUMP: u64 = 600_000_000;

/// A target with a known bug: it panics on a frame whose IPv4 total length field is 0xffff once
/// ten minutes have passed. The minimal case is two steps: one jump of at least ten minutes,
/// then an 18-byte frame of zeros but for the ethertype and that field.
fn fake_target(case: &Case, mut fed: Option<&mut Vec<Vec<u8>>>) {
    let mut t = 0u64;
    for s in &case.steps {
        match s {
            Step::Jump(us) => t = t.saturating_add(*us),
            Step::Frame(f) => {
                let b = prepare(f);
                if let Some(v) = fed.as_deref_mut() {
                    v.push(b.to_vec());
                }
                if t >= FAKE_JUMP && b.len() >= 18 && b[12..14] == [8, 0] && b[16..18] == [0xff; 2]
                {
                    panic!("fake bug: total length 0xffff after {} s", t / 1_000_000);
                }
            }
            _ => {}
        }
    }
}

fn self_test(pool: &Pool, dir: &Path) -> Result<String> {
    let opts = RunOpts {
        seed: 1,
        cases: Some(500_000),
        seconds: Some(120.0),
        only: None,
        max_steps: 40,
        shrink_seconds: 60.0,
        progress: false,
        print: false,
    };
    let mut target = fake_target;
    let out = fuzz(pool, &opts, &mut target);
    let Some(found) = out.found else {
        bail!("the fake bug was not found in {} cases", out.stats.cases);
    };
    let mut expect = [0u8; 18];
    expect[12] = 8;
    expect[16] = 0xff;
    expect[17] = 0xff;
    let minimal = match found.case.steps.as_slice() {
        [Step::Jump(j), Step::Frame(f)] => *j >= FAKE_JUMP && *prepare(f) == expect[..],
        _ => false,
    };
    if !minimal {
        bail!("the shrunk case is not minimal: {:?}", found.case.steps);
    }
    let path = report(dir, "self-test", &found, opts.seed, &mut target)?;
    let back = read_case(&path)?;
    match catch(|| fake_target(&back, None)) {
        Some(p) if p.location == found.panic.location => {}
        other => bail!("the written case does not panic the same way: {other:?}"),
    }
    Ok(format!(
        "fake bug found in case {} (after {} cases), shrunk from {} steps to 2 in {} runs",
        found.index,
        out.stats.cases,
        found.original.0.steps.len(),
        found.shrink_runs
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_machinery_catches_and_shrinks_a_known_bug() {
        install_hook();
        let pool = Pool::load(Path::new(DEFAULT_PCAPS)).unwrap();
        let dir = std::env::temp_dir().join(format!("hubnat-fuzz-test-{}", std::process::id()));
        let r = self_test(&pool, &dir);
        let _ = std::fs::remove_dir_all(&dir);
        r.unwrap();
    }

    #[test]
    fn cases_are_deterministic_and_survive_the_steps_file() {
        let pool = Pool::load(Path::new(DEFAULT_PCAPS)).unwrap();
        for i in 0..50 {
            let a = generate(&pool, 7, i, 40);
            assert_eq!(a, generate(&pool, 7, i, 40));
            let fed: Vec<Vec<u8>> = a
                .steps
                .iter()
                .filter_map(|s| match s {
                    Step::Frame(f) => Some(prepare(f).into_owned()),
                    _ => None,
                })
                .collect();
            let text = steps_text(&a, &fed);
            let b = parse_case(a.script.text().into_owned(), &text, pcap_frames(&a, &fed)).unwrap();
            assert_eq!(steps_text(&b, &fed), text);
            Script::parse(&b.script.text()).unwrap();
        }
    }

    #[test]
    fn checksums_fixed_are_the_crafted_ones() {
        let mut rng = SmallRng::seed_from_u64(3);
        let mut g = Guest::default();
        for _ in 0..200 {
            // (The barely-frames of random bytes, under 64 bytes, are no checksummed packets;
            // a datagram cut short or a chain of extension headers with a wrong length has no
            // one right checksum.)
            for f in g.frames(&mut rng).into_iter().filter(|f| {
                let d = describe(&f.data);
                f.data.len() >= 64 && !d.contains("malformed") && !d.contains("past")
            }) {
                let mut d = f.data.clone();
                fix_checksums(&mut d);
                assert_eq!(d, f.data, "{}", describe(&f.data));
            }
        }
    }
}
