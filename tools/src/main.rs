//! `hubnat`: the daemon (`hubnat run`) and its control CLI (every other subcommand talks to a
//! running instance through its control socket).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use hubnat_core::config::{Config, LogFormat, RawConfig};
use hubnat_core::{Engine, Mac};
use hubnat_daemon::api::{
    self, ChangeView, ForwardRow, LeaseRow, NatRow, PortRow, Request, ReservationRow, Response,
    Section, StatusView,
};
use hubnat_daemon::leases::LEASE_FILE;
use hubnat_daemon::machine;
use hubnat_daemon::sandbox;
use hubnat_daemon::seclog::SecurityLog;
use hubnat_daemon::server::{bind_control, Server, ServerOptions};
use hubnat_daemon::state;
use hubnat_runtime::port::link::Link;
use hubnat_runtime::port::segment::{NapiMode, OffloadMode, QueueMode, TapPort, TapSpec};
use hubnat_runtime::port::spec::PortSpec;
use hubnat_runtime::port::tap::netns_path;
use hubnat_runtime::sock::{Backend, BackendChoice};
use hubnat_runtime::{Exit, Options, Runtime};

mod demo;
mod generate;
mod internal;
mod slirp4netns;

/// A user-mode virtual NAT and virtual DHCP server for a virtual Ethernet segment.
///
/// hubnat sits on a segment (a TAP device) as one virtual host: it answers ARP and ping, gives
/// the machines on the segment addresses by DHCP, relays their DNS, and carries their TCP and
/// UDP out through ordinary host sockets, all in user space.
#[derive(Parser)]
#[command(name = "hubnat", version, propagate_version = true)]
struct Cli {
    /// The control socket (`hubnat run` listens there, the other subcommands connect to it).
    /// Default: /run/hubnat/hubnat.sock for root, else $XDG_RUNTIME_DIR/hubnat.sock.
    #[arg(long, global = true, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Print the answer as JSON (for scripts) instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the virtual host on a segment until SIGINT or SIGTERM (SIGHUP reloads --config).
    Run(Box<RunArgs>),
    /// A first run in one command (as root): hubnat serving a guest in throwaway namespaces.
    ///
    /// A guest, hubnat and a web and DNS server, each in a network namespace of its own: the
    /// guest leases an address with a real DHCP client, pings the virtual host, looks up a
    /// name through the DNS relay and fetches a page through the NAT, each step explained,
    /// then `hubnat status`, `nat-table` and `dhcp-table` show hubnat's view. Everything is
    /// removed at the end, also on failure or Ctrl-C. Needs iproute2, busybox udhcpc or ISC
    /// dhclient, and ping.
    Demo(demo::DemoArgs),
    /// Serve a container's network namespace as slirp4netns 1.x does: its command line, ready
    /// and exit descriptors and API socket, for podman, rootlesskit and buildah (`hubnat
    /// slirp4netns --help` lists its options). A copy or symlink of hubnat named `slirp4netns`
    /// runs this.
    #[command(disable_help_flag = true, disable_version_flag = true)]
    Slirp4netns {
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "OPTION|PID|PATH|TAPNAME"
        )]
        args: Vec<OsString>,
    },
    /// SecureNAT's status: sessions by protocol, DHCP clients, uptime, traffic, drops.
    Status,
    /// The NAT session table.
    NatTable,
    /// The DHCP lease table.
    DhcpTable,
    /// The virtual host's interface: `get`, or `set ip=... mask=... mac=...`.
    Host {
        #[command(subcommand)]
        op: HostOp,
    },
    /// The virtual NAT: get, set KEY=VALUE..., enable, disable.
    Nat {
        #[command(subcommand)]
        op: SectionOp,
    },
    /// The virtual DHCP server: get, set KEY=VALUE..., enable, disable, and its static
    /// reservations: reserve list|add|remove.
    Dhcp {
        #[command(subcommand)]
        op: DhcpOp,
    },
    /// The DNS relay: get, set upstream=A,B query_timeout=N address=IP.
    Dns {
        #[command(subcommand)]
        op: HostOp,
    },
    /// The virtual host on IPv6 (router advertisements, DHCPv6, the NAT's IPv6): get, set
    /// KEY=VALUE... (prefix, ip, ra_interval, router_lifetime, dhcpv6, range_start, range_end,
    /// dns), enable, disable.
    Ipv6 {
        #[command(subcommand)]
        op: SectionOp,
    },
    /// SecureNAT as a whole: enable or disable.
    Securenat {
        #[command(subcommand)]
        op: OnOff,
    },
    /// Read the running instance's configuration file again (as SIGHUP does).
    Reload,
    /// The segment's ports: list, add SPEC, remove ID.
    Port {
        #[command(subcommand)]
        op: PortOp,
    },
    /// Ports forwarded into guests: list, add PROTO LISTEN GUEST, remove ID.
    Forward {
        #[command(subcommand)]
        op: ForwardOp,
    },
    /// Stream SecureNAT's events (what the security log records, and configuration changes),
    /// one a line, until Ctrl-C or until hubnat stops; `--json`: the JSON lines as they come.
    Events(EventsArgs),
    /// Capture the segment's frames to a pcap file: start FILE, stop.
    Capture {
        #[command(subcommand)]
        op: CaptureOp,
    },
}

#[derive(Subcommand)]
enum CaptureOp {
    /// Write every frame read from a port and every frame hubnat sends to FILE (made anew) in
    /// pcap format, until `capture stop`, hubnat's end, or the cap. With the sandbox on, FILE
    /// can be only in the state directory or a directory hubnat was given at start (that of
    /// `--pcap`, of the control socket, of a socket port, ...).
    Start {
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// Stop when the file reaches N MiB.
        #[arg(long, value_name = "N", default_value_t = hubnat_runtime::capture::DEFAULT_MAX_MIB)]
        max_mib: u64,
    },
    /// End the capture; its file is complete when this returns.
    Stop,
}

#[derive(Args)]
struct EventsArgs {
    /// Only these kinds (comma-separated): a kind whole (`session_created`) or a word of it
    /// (`dhcp`, `session`, `tcp`, `egress`, `config`). Lines saying events were lost always
    /// show.
    #[arg(long, value_delimiter = ',', value_name = "KIND,...")]
    kinds: Vec<String>,
}

#[derive(Subcommand)]
enum ForwardOp {
    /// Every forward, the guest it leads to now, and its connections accepted and refused.
    List,
    /// Listen on a host address and port (or range) and carry what arrives to a guest, which
    /// sees the client's own address: `hubnat forward add tcp 0.0.0.0:8080 vm1:80`. The guest
    /// is an IPv4 address, a MAC, or the host name it gave in DHCP (the forward follows its
    /// lease); a range maps port for port (`udp 127.0.0.1:5000-5009 vm1:6000-6009`).
    Add {
        /// `tcp` or `udp`.
        #[arg(value_name = "PROTO")]
        proto: String,
        /// ADDRESS:PORT or ADDRESS:FIRST-LAST (0.0.0.0 for every address of the host).
        #[arg(value_name = "LISTEN")]
        listen: String,
        /// GUEST:PORT or GUEST:FIRST-LAST.
        #[arg(value_name = "GUEST")]
        to: String,
        /// Also write the change back to the configuration file.
        #[arg(long)]
        save: bool,
    },
    /// Remove a forward by its number (as `forward list` shows it): its listeners close.
    Remove {
        #[arg(value_name = "ID")]
        id: u32,
        /// Also write the change back to the configuration file.
        #[arg(long)]
        save: bool,
    },
}

#[derive(Subcommand)]
enum PortOp {
    /// Every port with its frame counters and the guests learned on it.
    List,
    /// Open a port and add it to the segment: `stream:PATH`, `dgram:PATH[,PEER]`,
    /// `tap:NAME`, `packet:IFACE` (see `hubnat run --help`). With the sandbox on, new sockets
    /// can be made only in the directories of the sockets given at start and the state
    /// directory, and a TAP or an interface needs privileges hubnat gave up: give those at
    /// start.
    Add {
        #[arg(value_name = "SPEC")]
        spec: String,
    },
    /// Remove a port by its number (as `port list` shows it). The segment's first TAP stays.
    Remove {
        #[arg(value_name = "ID")]
        id: u32,
    },
}

#[derive(Args)]
struct SetArgs {
    /// Fields as the configuration file names them, e.g. `lease=3600 dns=192.168.30.1,192.168.30.2`
    /// (lists comma-separated; an empty value clears an optional field).
    #[arg(value_name = "KEY=VALUE", required = true)]
    values: Vec<String>,
    /// Also write the change back to the configuration file.
    #[arg(long)]
    save: bool,
}

#[derive(Args)]
struct SaveArg {
    /// Also write the change back to the configuration file.
    #[arg(long)]
    save: bool,
}

#[derive(Subcommand)]
enum HostOp {
    /// Show the settings in effect.
    Get,
    /// Change settings; applied at once, validated as the configuration file is.
    Set(SetArgs),
}

#[derive(Subcommand)]
enum SectionOp {
    /// Show the settings in effect.
    Get,
    /// Change settings; applied at once, validated as the configuration file is.
    Set(SetArgs),
    /// Turn it on at once (`--save` also writes the configuration file).
    Enable(SaveArg),
    /// Turn it off at once (`--save` also writes the configuration file).
    Disable(SaveArg),
}

#[derive(Subcommand)]
enum DhcpOp {
    #[command(flatten)]
    Section(SectionOp),
    /// Static reservations: a MAC that always gets one address (in the range or outside it,
    /// within the subnet), which no other MAC is given.
    Reserve {
        #[command(subcommand)]
        op: ReserveOp,
    },
}

#[derive(Subcommand)]
enum ReserveOp {
    /// Every reservation, the address its MAC holds now, and another MAC still holding its
    /// address (until that lease's next renewal).
    List,
    /// Reserve IP for MAC: `hubnat dhcp reserve add 02:00:00:00:00:20 192.168.30.20 vm1`.
    /// NAME is the lease's host name when the client sends none (forwards find the guest by
    /// it). A lease another MAC holds on IP ends at its next renewal.
    Add {
        #[arg(value_name = "MAC")]
        mac: String,
        #[arg(value_name = "IP")]
        ip: String,
        #[arg(value_name = "NAME")]
        name: Option<String>,
        /// Also write the change back to the configuration file.
        #[arg(long)]
        save: bool,
    },
    /// Remove the reservation of MAC (its lease stays, if it is in the range).
    Remove {
        #[arg(value_name = "MAC")]
        mac: String,
        /// Also write the change back to the configuration file.
        #[arg(long)]
        save: bool,
    },
}

#[derive(Subcommand)]
enum OnOff {
    Enable(SaveArg),
    Disable(SaveArg),
}

#[derive(Clone, Copy, ValueEnum)]
enum FormatArg {
    Text,
    Json,
}

#[derive(Args)]
struct RunArgs {
    /// TAP device to create (or attach to) as the segment's first port: read and written by
    /// every thread, the fastest way in. Default: `hubnat0` when no other port is given.
    #[arg(long, value_name = "NAME")]
    tap: Option<String>,
    /// A further port of the segment (repeatable); every port is switched with the others as
    /// a learning Ethernet switch would, so guests on different ports reach each other and the
    /// virtual host serves them all. `stream:PATH`: listen on a unix stream socket for QEMU's
    /// `-netdev stream,server=off,addr.type=unix,addr.path=PATH` (one guest at a time;
    /// reconnects are served). `dgram:PATH[,PEER]`: bind a unix datagram socket for QEMU's
    /// `-netdev dgram,remote.type=unix,remote.path=PATH,local...` (the peer is learned from
    /// what it sends). `tap:NAME`: another TAP. `packet:IFACE`: join an existing interface
    /// (as --attach). `fd:N`: an inherited descriptor (as --fd).
    #[arg(long = "port", value_name = "SPEC")]
    ports: Vec<String>,
    /// Join an existing interface (a bridge port, a veth, another program's TAP) by AF_PACKET,
    /// so hubnat serves a segment it does not own (repeatable; needs CAP_NET_RAW).
    #[arg(long, value_name = "IFACE")]
    attach: Vec<String>,
    /// Serve a descriptor inherited from the launcher (repeatable): a TAP, a connected unix
    /// stream socket (QEMU's framing), a unix datagram socket or an AF_PACKET socket, told
    /// apart by the descriptor itself.
    #[arg(long = "fd", value_name = "N")]
    fds: Vec<i32>,
    /// Create the TAP device inside this network namespace (a path such as /proc/PID/ns/net, a
    /// PID, or a name made by `ip netns add`) and bring it up there, leaving its addressing to
    /// the guest's DHCP client. hubnat itself, and its host sockets, stay where it runs.
    #[arg(long, value_name = "PATH|PID|NAME")]
    netns: Option<String>,
    /// Create the TAP device from inside this user namespace (a path such as
    /// /proc/PID/ns/user, or a PID) as well: the way into a rootless container's network
    /// namespace, which only its own user namespace may add devices to, for hubnat run by the
    /// user that made it (as slirp4netns does). Without --netns, the network namespace of the
    /// same process. A short-lived child process joins both namespaces to open the device;
    /// hubnat itself, and its host sockets, stay where it runs.
    #[arg(long, value_name = "PATH|PID")]
    userns: Option<String>,
    /// Configuration file (TOML). Without it every setting takes SecureNAT's default.
    #[arg(long, short, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Where state that survives restarts is kept (the virtual host's MAC). Default: the
    /// configuration's `state_dir`, else /var/lib/hubnat (root) or ~/.local/state/hubnat.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Log filter (tracing's syntax, e.g. `info`, `debug`, `securenat=info,warn`).
    /// The HUBNAT_LOG environment variable sets it too.
    #[arg(long, value_name = "FILTER", default_value = "info")]
    log: String,
    /// Append the security log (the SecureNAT events, seed 3.7.8) to FILE.
    #[arg(long, value_name = "FILE")]
    security_log: Option<PathBuf>,
    /// `text`: `2012-12-06 15:44:52.557 SecureNAT: ...` as the seed writes it; `json`: JSON lines.
    #[arg(long, value_name = "FORMAT")]
    security_log_format: Option<FormatArg>,
    /// Serve Prometheus metrics on this loopback address, e.g. 127.0.0.1:9100 (off by default).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// Do not look up host names for the security log's "connection successful" lines.
    #[arg(long)]
    no_reverse_lookup: bool,
    /// Worker threads carrying the NAT flows (each owns its flows, their TCP state and host
    /// sockets; a control thread keeps ARP, DHCP, DNS and ICMP to the virtual host, and all
    /// idle timeouts). Default: the number of cores. 1 runs everything on one thread.
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
    /// Where host sockets get readiness from: `uring` (one io_uring per thread), `mio`
    /// (epoll), or `auto` (io_uring where the kernel allows it, else mio; the log says which).
    #[arg(long, value_name = "uring|mio|auto", default_value = "auto")]
    socket_backend: BackendChoice,
    /// How the TAP device is read with 2 or more workers. `multi`: one queue per worker,
    /// read by that worker, each flow's frames steered to its worker's queue by a program
    /// hubnat gives the kernel (eBPF; where it cannot load one, the kernel steers each flow to
    /// the queue its worker writes from) (fails if an existing device was made single-queue). `single`: one queue, read by the
    /// control thread, which hands each frame to its flow's worker. `auto` (the default):
    /// multi, or single where the device cannot be made multiqueue (the log says so).
    #[arg(long, value_name = "auto|multi|single", default_value = "auto")]
    tap_queues: QueueChoice,
    /// How the guest's kernel takes in the frames hubnat writes to the TAP. `auto` (the
    /// default): the device's queues use NAPI, as a NIC driver does; while flows send bulk
    /// data toward the guest, its polls run in kernel threads and take the frames in batches
    /// beside hubnat's next writes, and otherwise they run inside each write, for the least
    /// latency. `threaded`: always in threads. `off`: no NAPI, each write runs the guest's
    /// receive path. Switching mounts a sysfs in a private mount namespace (CAP_SYS_ADMIN);
    /// where that is refused, hubnat writes without NAPI and the log says so.
    #[arg(long, value_name = "auto|threaded|off", default_value = "auto")]
    tap_napi: NapiChoice,
    /// Whether the guest may leave work to hubnat as to a network card: `auto` (the default)
    /// offers checksum offload and TCP segmentation over IPv4 on the TAP where the kernel
    /// takes them, so the guest hands over TCP data in frames of up to 64 KiB and hubnat
    /// writes each to its host socket whole; `off` offers nothing, every frame is whole and at
    /// most the MTU. Off where the segment has other ports than the TAP (their guests could
    /// not take such frames).
    #[arg(long, value_name = "auto|off", default_value = "auto")]
    offload: OffloadChoice,
    /// Same as --tap-queues multi (kept for scripts written before --tap-queues).
    #[arg(long, hide = true)]
    multiqueue: bool,
    /// The least size of the lease journal in KiB (tests: a small one is compacted often).
    #[arg(long, hide = true, value_name = "KIB")]
    lease_journal_kib: Option<u64>,
    /// The user hubnat becomes once its TAP, sockets and files are open, when started as root.
    /// Default: `hubnat` where that user exists, else `nobody`. The state directory (and a
    /// control socket hubnat made) become that user's; the configuration file must be readable
    /// by it for SIGHUP, and its directory writable for `--save`.
    #[arg(long, value_name = "NAME")]
    user: Option<String>,
    /// Keep every privilege hubnat started with (no user change, capability drop, Landlock or
    /// system-call filter). For debugging only.
    #[arg(long, conflicts_with_all = ["user", "sandbox_check"])]
    no_sandbox: bool,
    /// Once in the sandbox, try a forbidden system call (execve) and log what happened.
    #[arg(long)]
    sandbox_check: bool,
    /// Write the segment's frames (every frame read from a port and every frame hubnat sends)
    /// to FILE in pcap format, from start. FILE is made anew (mode 0600); its directory stays
    /// writable in the sandbox, for `hubnat capture start` later. `hubnat capture stop` ends it.
    #[arg(long, value_name = "FILE")]
    pcap: Option<PathBuf>,
    /// The capture file's cap in MiB: when it is reached, the capture stops (the log says so).
    #[arg(long, value_name = "N", default_value_t = hubnat_runtime::capture::DEFAULT_MAX_MIB)]
    pcap_max_mib: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
enum QueueChoice {
    Auto,
    Multi,
    Single,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
enum OffloadChoice {
    Auto,
    Off,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
enum NapiChoice {
    Auto,
    Threaded,
    Off,
}

fn main() {
    // Under the name slirp4netns (podman's network_cmd_path), or as `hubnat slirp4netns`,
    // hubnat takes slirp4netns's command line, which clap's conventions would misread.
    let argv: Vec<OsString> = std::env::args_os().collect();
    if let Some(status) = slirp4netns::dispatch(&argv) {
        std::process::exit(status);
    }
    if let Some(status) = internal::dispatch(&argv) {
        std::process::exit(status);
    }
    let cli = Cli::parse();
    let control = cli.control.clone();
    let json = cli.json;
    let result = match cli.command {
        Command::Run(args) => run(*args, control, None),
        Command::Slirp4netns { args } => std::process::exit(slirp4netns::main(args, control)),
        Command::Demo(args) => std::process::exit(demo::main(args)),
        other => client_command(other, control, json),
    };
    if let Err(e) = result {
        eprintln!("hubnat: {e:#}");
        std::process::exit(1);
    }
}

fn init_logging(filter: &str, seclog: Option<SecurityLog>) -> Result<()> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let filter = std::env::var("HUBNAT_LOG").unwrap_or_else(|_| filter.to_owned());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .with_context(|| format!("bad log filter `{filter}`"))?;
    let stderr = tracing_subscriber::fmt::layer()
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .with_filter(filter);
    tracing_subscriber::registry()
        .with(stderr)
        .with(seclog)
        .init();
    Ok(())
}

fn uid() -> Option<u32> {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2))
                .and_then(|u| u.parse().ok())
        })
}

/// /run/hubnat/hubnat.sock for root, else $XDG_RUNTIME_DIR/hubnat.sock (or a directory of the
/// user's own under /tmp).
fn default_control_path() -> PathBuf {
    let uid = uid().unwrap_or(u32::MAX);
    if uid == 0 {
        return PathBuf::from("/run/hubnat/hubnat.sock");
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        Some(d) => PathBuf::from(d).join("hubnat.sock"),
        None => std::env::temp_dir()
            .join(format!("hubnat-{uid}"))
            .join("hubnat.sock"),
    }
}

/// `hubnat run`; `embed` is what a front end (`hubnat slirp4netns`) adds: the configuration in
/// place of a file, the guest's side of the TAP, and a call once the segment is served.
fn run(
    args: RunArgs,
    control_flag: Option<PathBuf>,
    embed: Option<slirp4netns::Embedding>,
) -> Result<()> {
    // Bad flags are refused before anything is written (state directory, logs).
    let workers = args.workers.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    if workers == 0 || workers > 256 {
        bail!("--workers {workers}: choose 1 to 256");
    }
    let queues = match (args.multiqueue, args.tap_queues) {
        (true, _) | (false, QueueChoice::Multi) => QueueMode::Multi,
        (false, QueueChoice::Single) => QueueMode::Single,
        (false, QueueChoice::Auto) => QueueMode::Auto,
    };
    if queues == QueueMode::Multi && workers < 2 {
        bail!("--tap-queues multi needs --workers 2 or more (one TAP queue per worker)");
    }
    let (first_tap, specs) = port_specs(&args)?;
    let embedded = embed.is_some();
    let (embedded_raw, guest, on_ready) = slirp4netns::Embedding::split(embed);
    let raw = match (embedded_raw, &args.config) {
        (Some(raw), _) => raw,
        (None, Some(path)) => machine::load_raw(path)?,
        (None, None) => RawConfig::default(),
    };
    let (open_files, socket_budget) = machine::raise_open_files(workers + 1);
    let mut cfg = run_config(&args, &raw)?;
    // Before anything is made: a file that cannot be written is refused now.
    let pcap = match &args.pcap {
        None => None,
        Some(path) => {
            if args.pcap_max_mib == 0 {
                bail!("--pcap-max-mib 0: give 1 or more");
            }
            let path = std::path::absolute(path).unwrap_or_else(|_| path.clone());
            let file = hubnat_runtime::capture::open_file(&path).map_err(|e| {
                anyhow::anyhow!(hubnat_runtime::capture::open_error(&path, &e, &[]))
            })?;
            Some((file, path, args.pcap_max_mib.saturating_mul(1 << 20)))
        }
    };
    init_logging(&args.log, open_security_log(&cfg)?)?;
    // systemd's Type=notify, connected while its socket is still reachable (the sandbox closes
    // the way). Not for a front end: its caller's NOTIFY_SOCKET is meant for another process.
    // A socket that cannot be reached costs the notifications, not the service (as with
    // libsystemd's sd_notify); a unit waiting for them then says so.
    let notify = if embedded {
        None
    } else {
        hubnat_daemon::notify::Notifier::from_env().unwrap_or_else(|e| {
            tracing::warn!("systemd readiness: {e}; not notifying");
            None
        })
    };
    tracing::info!(
        "open files limit {open_files}: up to {socket_budget} host sockets for sessions; \
         nat.max_sessions {}, per guest {}",
        cfg.nat.max_sessions,
        cfg.nat.max_sessions_per_guest
    );
    let mut rng = SmallRng::from_os_rng();
    let state_dir = args
        .state_dir
        .clone()
        .or_else(|| cfg.state_dir.clone())
        .unwrap_or_else(state::default_state_dir);
    if cfg.dns.upstream.is_empty() {
        tracing::warn!(
            "no nameserver the relay can use in /etc/resolv.conf: the DNS relay has no upstream"
        );
    }

    let (backend, fallback) = Backend::choose(args.socket_backend).map_err(anyhow::Error::msg)?;
    if let Some(why) = &fallback {
        tracing::warn!("socket backend: {why}; using epoll");
    }
    let first_tap = first_tap.map(|name| {
        TapSpec {
            name: &name,
            netns: args.netns.as_deref().map(netns_path).or_else(|| {
                args.userns
                    .as_deref()
                    .and_then(hubnat_runtime::port::tap::userns_netns)
            }),
            userns: args
                .userns
                .as_deref()
                .map(hubnat_runtime::port::tap::userns_path),
            mtu: u32::from(cfg.nat.mtu),
            workers,
            queues,
            napi: match args.tap_napi {
                NapiChoice::Auto => NapiMode::Auto,
                NapiChoice::Threaded => NapiMode::Threaded,
                NapiChoice::Off => NapiMode::Off,
            },
            offload: match args.offload {
                OffloadChoice::Auto if specs.is_empty() => OffloadMode::Auto,
                _ => OffloadMode::Off,
            },
            guest: guest.clone(),
        }
        .open()
    });
    let port = first_tap.transpose()?;
    let mut links = Vec::new();
    for spec in &specs {
        links.push(spec.open(cfg.nat.mtu)?);
    }
    // Chosen once the ports are open, so that a port that cannot be opened leaves no state.
    let mac = virtual_host_mac(&cfg, &state_dir, rng.random())?;
    api::complete(&mut cfg, mac);
    let (stop_rx, stop_tx) = UnixStream::pair().context("cannot create the signal pipe")?;
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::low_level::pipe::register(sig, stop_tx.try_clone()?)
            .context("cannot install signal handlers")?;
    }
    log_start(&args, &cfg, port.as_ref(), &links, backend, workers);
    // Before the sandbox: loading the TAP's steering program takes privilege, and the sandbox
    // hides /proc.
    hubnat_runtime::watch_cpu_pressure();
    let flow_seeds = hubnat_runtime::router::Router::random_seeds();
    // Made here for the same reason: the steering program shares it from the kernel.
    let placement = (workers > 1)
        .then(|| std::sync::Arc::new(hubnat_runtime::placement::Placement::new(workers)));
    if let Some(p) = port.as_ref().filter(|p| p.queues.len() > 1) {
        let mut router = hubnat_runtime::router::Router::with_seeds(workers, flow_seeds);
        if let Some(pl) = &placement {
            router = router.with_placement(pl.clone());
        }
        hubnat_runtime::port::steer::steer_queues(&p.queues[0], &router);
    }
    let (server, control_path) = operator(&args, control_flag, &cfg, raw, &state_dir)?;
    let mut writable_dirs = Vec::new();
    if !args.no_sandbox {
        // Forwards below 1024: the configuration's, or any a slirp4netns client asks for (as
        // slirp4netns itself keeps the capability to open them).
        let low_ports = embedded || cfg.forwards.iter().any(|f| f.listen_ports.0 < 1024);
        writable_dirs = enter_sandbox(
            &args,
            &cfg,
            port.as_ref(),
            &specs,
            low_ports,
            &state_dir,
            control_path,
            pcap.as_ref().map(|p| p.1.as_path()),
        )?;
    } else {
        tracing::warn!("sandbox off (--no-sandbox): hubnat keeps every privilege it started with");
    }

    let (tap, taps, napi) = match port {
        Some(mut p) => {
            let first = p.queues.remove(0);
            (Some(first), p.queues, p.napi)
        }
        None => (None, Vec::new(), None),
    };
    let log_rate = cfg.control.log_rate;
    let engine = Engine::new(cfg, mac, rng.random());
    let event_hub = server.event_hub();
    let opts = Options {
        workers,
        backend: Some(backend),
        tap_queues: taps,
        flow_seeds: Some(flow_seeds),
        placement,
        ports: links,
        napi,
        operator: Some(Box::new(server)),
        events: Some(std::sync::Arc::new(hubnat_daemon::stream::TeeSink::new(
            hubnat_daemon::events::TracingSink::new(log_rate),
            event_hub,
        ))),
        pcap,
        writable_dirs,
    };
    let mut rt = Runtime::with_options(engine, tap, stop_rx, opts)?;
    if let Some(ready) = on_ready {
        // Before the system-call filter, which allows no new threads.
        ready()?;
    }
    if !args.no_sandbox {
        // Every thread exists and has made its rings: from here on, only the allow-list.
        match sandbox::install_filter().context("sandbox")? {
            true => tracing::info!("sandbox: system-call filter (seccomp) on every thread"),
            false => tracing::warn!(
                "sandbox: no system-call filter for this architecture; running without one"
            ),
        }
        if args.sandbox_check {
            tracing::info!("sandbox check: {}", sandbox::check_filter());
        }
    }
    if let Some(n) = &notify {
        n.ready("serving");
        tracing::info!("told systemd: ready ({})", n.address());
    }
    match rt.run()? {
        Exit::Stopped => {
            if let Some(n) = &notify {
                n.stopping();
            }
            tracing::info!("stopping: {} host sockets open", rt.sock.len());
        }
    }
    Ok(())
}

/// The segment's first TAP (its name), and the other ports in the order given: `--port`,
/// then `--attach`, then `--fd`. Without any port, the TAP `hubnat0`; without `--tap`, a
/// `tap:` port given first is the first TAP.
fn port_specs(args: &RunArgs) -> Result<(Option<String>, Vec<PortSpec>)> {
    let mut specs = Vec::new();
    for p in &args.ports {
        specs.push(p.parse::<PortSpec>()?);
    }
    for i in &args.attach {
        specs.push(format!("packet:{i}").parse::<PortSpec>()?);
    }
    for n in &args.fds {
        specs.push(format!("fd:{n}").parse::<PortSpec>()?);
    }
    let first = match (&args.tap, specs.first()) {
        (Some(t), _) => Some(t.clone()),
        (None, None) => Some(DEFAULT_TAP.to_owned()),
        (None, Some(PortSpec::Tap(name))) => {
            let name = name.clone();
            specs.remove(0);
            Some(name)
        }
        (None, Some(_)) => None,
    };
    if first.is_none() && (args.netns.is_some() || args.userns.is_some()) {
        bail!("--netns and --userns say where to create the TAP, and no TAP is given (--tap NAME)");
    }
    // A namespace that is not there is refused now, before the state directory is written;
    // one this user may not look at is left for the TAP's opening to report.
    let namespaces = [
        ("--netns", args.netns.as_deref().map(netns_path)),
        (
            "--userns",
            args.userns
                .as_deref()
                .map(hubnat_runtime::port::tap::userns_path),
        ),
    ];
    for (flag, path) in namespaces {
        if let Some(path) = path {
            if let Err(e) = std::fs::metadata(&path) {
                if e.kind() == std::io::ErrorKind::NotFound {
                    bail!("{flag}: no namespace at {}", path.display());
                }
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    for s in first
        .iter()
        .map(|t| format!("tap:{t}"))
        .chain(specs.iter().map(|s| s.to_string()))
    {
        if !seen.insert(s.clone()) {
            bail!("port {s} is given twice");
        }
    }
    Ok((first, specs))
}

/// The TAP `hubnat run` serves when given no port.
const DEFAULT_TAP: &str = "hubnat0";

/// The configuration `hubnat run` starts with: the file's, validated on this machine, with the
/// flags that override its [control] table applied.
fn run_config(args: &RunArgs, raw: &RawConfig) -> Result<Config> {
    let mut cfg = machine::validate(raw)?;
    if let Some(p) = &args.security_log {
        cfg.control.security_log = Some(p.clone());
    }
    if let Some(f) = args.security_log_format {
        cfg.control.security_log_format = match f {
            FormatArg::Text => LogFormat::Text,
            FormatArg::Json => LogFormat::Json,
        };
    }
    if args.no_reverse_lookup {
        cfg.control.reverse_lookup = false;
    }
    if let Some(m) = &args.metrics {
        let mut r = RawConfig::default();
        r.control.metrics = Some(m.clone());
        cfg.control.metrics = Config::from_raw(&r)?.control.metrics;
    }
    Ok(cfg)
}

fn open_security_log(cfg: &Config) -> Result<Option<SecurityLog>> {
    let Some(path) = &cfg.control.security_log else {
        return Ok(None);
    };
    let log = SecurityLog::open(
        path,
        cfg.control.security_log_format,
        cfg.control.reverse_lookup,
        cfg.control.security_log_max,
    )
    .with_context(|| format!("cannot open the security log {}", path.display()))?;
    Ok(Some(log))
}

/// The configured MAC, else the one chosen at first start and kept in `state_dir`.
fn virtual_host_mac(cfg: &Config, state_dir: &Path, random: [u8; 4]) -> Result<Mac> {
    if let Some(mac) = cfg.host.mac {
        return Ok(mac);
    }
    match state::load_or_create_mac(state_dir, random) {
        Ok((mac, true)) => {
            tracing::info!(
                "chose the virtual host's MAC {mac}, kept in {}",
                state_dir.display()
            );
            Ok(mac)
        }
        Ok((mac, false)) => Ok(mac),
        Err(e) => bail!(
            "cannot keep the virtual host's MAC in {}: {e}",
            state_dir.display()
        ),
    }
}

fn log_start(
    args: &RunArgs,
    cfg: &Config,
    port: Option<&TapPort>,
    links: &[std::sync::Arc<dyn Link>],
    backend: Backend,
    workers: usize,
) {
    let mut on = Vec::new();
    if let Some(port) = port {
        let where_ = match (&args.netns, &args.userns) {
            (Some(n), Some(u)) => format!(" in network namespace {n} (user namespace {u})"),
            (Some(n), None) => format!(" in network namespace {n}"),
            (None, Some(u)) => format!(" in the namespaces of {u}"),
            (None, None) => String::new(),
        };
        let queues = port.queues.len();
        on.push(format!(
            "TAP {}{where_}{} ({}; {})",
            port.queues[0].name(),
            if queues > 1 {
                format!(" ({queues} queues)")
            } else {
                String::new()
            },
            port.napi_mode,
            if port.offloads && port.queues[0].uso() {
                "checksum, TCP and UDP segmentation offloaded to hubnat"
            } else if port.offloads {
                "checksum and TCP segmentation offloaded to hubnat"
            } else {
                "no offloads"
            },
        ));
    }
    on.extend(
        links
            .iter()
            .map(|l| format!("{} {}", l.kind(), l.address())),
    );
    tracing::info!(
        "hubnat {}: virtual host {} ({}) on {}, MTU {}; socket backend {}; {}",
        env!("CARGO_PKG_VERSION"),
        cfg.host.ip,
        cfg.host.mac.map(|m| m.to_string()).unwrap_or_default(),
        on.join(", "),
        cfg.nat.mtu,
        backend.name(),
        if workers > 1 {
            format!("{workers} worker threads and a control thread")
        } else {
            "1 worker (one thread)".to_owned()
        }
    );
    tracing::info!(
        "SecureNAT {}, NAT {}, DHCP {}{}; DNS upstream {:?}",
        on_off(cfg.enabled),
        on_off(cfg.nat.enabled),
        on_off(cfg.dhcp.enabled),
        if cfg.dhcp.enabled {
            format!(" ({} - {})", cfg.dhcp.range_start, cfg.dhcp.range_end)
        } else {
            String::new()
        },
        cfg.dns.upstream
    );
}

/// Becomes an unprivileged user with only the capabilities the data path needs, and confines
/// the file system (see `hubnat_daemon::sandbox`). `control` is the control socket's path, and
/// whether hubnat chose it (its directory is then hubnat's own). Returns the directories it
/// may write from then on.
#[allow(clippy::too_many_arguments)]
fn enter_sandbox(
    args: &RunArgs,
    cfg: &Config,
    port: Option<&TapPort>,
    specs: &[PortSpec],
    low_ports: bool,
    state_dir: &Path,
    control: Option<(PathBuf, bool)>,
    pcap: Option<&Path>,
) -> Result<Vec<PathBuf>> {
    let user = args.user.clone().unwrap_or_else(sandbox::default_user);
    let gid = if is_root() {
        Some(sandbox::lookup(&user)?.1.as_raw())
    } else {
        None
    };
    let keep = sandbox::needed_capabilities(
        port.is_some_and(|p| p.napi.is_some()),
        cfg.nat.icmp != hubnat_core::config::IcmpMode::Dummy,
        low_ports,
        gid,
    );
    let mut paths = sandbox::Paths {
        read_write: vec![state_dir.to_owned()],
        read_only: vec!["/etc".into(), "/usr/share/zoneinfo".into()],
        give: vec![state_dir.to_owned()],
    };
    if let Some(dir) = args.config.as_deref().and_then(Path::parent) {
        // The directory, not the file: an editor replaces the file, and `--save` writes a new
        // one beside it.
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        paths.read_write.push(dir.to_owned());
    }
    if let Some(log) = &cfg.control.security_log {
        // Rotation renames the log and makes a new one beside it: its directory must be
        // writable, which hubnat makes it only where the directory is its own (named hubnat).
        paths.give.push(log.clone());
        if let Some(dir) = log.parent().filter(|d| !d.as_os_str().is_empty()) {
            paths.read_write.push(dir.to_owned());
            if dir.file_name().is_some_and(|n| n == "hubnat") {
                paths.give.push(dir.to_owned());
            }
        }
    }
    // A socket port's file is removed when it leaves the segment, and `hubnat port add` may
    // make new sockets beside it.
    for spec in specs {
        if let PortSpec::Stream(path) | PortSpec::Dgram(path, _) = spec {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                paths.read_write.push(dir.to_owned());
            }
        }
    }
    if let Some((path, ours)) = control {
        paths.give.push(path.clone());
        if let Some(dir) = path.parent() {
            paths.read_write.push(dir.to_owned());
            if ours {
                paths.give.push(dir.to_owned());
            }
        }
    }
    // A capture stopped and started again at run time goes beside the first one.
    if let Some(dir) = pcap.and_then(Path::parent) {
        paths.read_write.push(dir.to_owned());
    }
    let report = sandbox::enter(&user, &keep, &paths).context("sandbox")?;
    tracing::info!("sandbox: {}", report.on.join("; "));
    for m in &report.missing {
        tracing::warn!("sandbox: {m}");
    }
    Ok(paths.read_write)
}

fn is_root() -> bool {
    uid() == Some(0)
}

/// The operator's side: the control socket, metrics, SIGHUP and the lease file; also the
/// control socket's path and whether it is the default one.
fn operator(
    args: &RunArgs,
    control_flag: Option<PathBuf>,
    cfg: &Config,
    raw: RawConfig,
    state_dir: &Path,
) -> Result<(Server, Option<(PathBuf, bool)>)> {
    // The control socket: an explicit path must work; the default one may be taken by another
    // instance, which costs this one its control socket but not its service.
    let (control_path, explicit) = match (&control_flag, &cfg.control.socket) {
        (Some(p), _) => (Some(p.clone()), true),
        (None, Some(p)) if p.as_os_str().is_empty() => (None, true),
        (None, Some(p)) => (Some(p.clone()), true),
        (None, None) => (Some(default_control_path()), false),
    };
    let control = match control_path {
        None => None,
        Some(path) => match bind_control(&path) {
            Ok(l) => {
                tracing::info!("control socket {} (mode 0600)", path.display());
                Some((l, path))
            }
            Err(e) if explicit => {
                bail!(
                    "cannot listen on the control socket {}: {e}",
                    path.display()
                )
            }
            Err(e) => {
                tracing::warn!(
                    "no control socket: {}: {e} (choose one with --control)",
                    path.display()
                );
                None
            }
        },
    };
    let metrics = match cfg.control.metrics {
        None => None,
        Some(addr) => {
            let l = mio::net::TcpListener::bind(addr)
                .with_context(|| format!("cannot listen for metrics on {addr}"))?;
            tracing::info!("metrics on http://{addr}/metrics");
            Some(l)
        }
    };
    if let Some(p) = &cfg.control.security_log {
        tracing::info!(
            "security log {} ({}{})",
            p.display(),
            match cfg.control.security_log_format {
                LogFormat::Text => "text",
                LogFormat::Json => "JSON lines",
            },
            if cfg.control.reverse_lookup {
                ", host names looked up"
            } else {
                ""
            }
        );
    }
    let (hup_rx, hup_tx) = UnixStream::pair().context("cannot create the signal pipe")?;
    signal_hook::low_level::pipe::register(signal_hook::consts::SIGHUP, hup_tx)
        .context("cannot install signal handlers")?;
    let bound = control.as_ref().map(|(_, p)| (p.clone(), !explicit));
    // Only a control socket has clients to stream events to.
    let events = match control {
        Some(_) => Some(
            hubnat_daemon::stream::EventHub::new()
                .context("cannot make the event stream's wake-up pair")?,
        ),
        None => None,
    };
    let server = Server::new(ServerOptions {
        raw,
        config_path: args.config.clone(),
        control,
        metrics,
        reload: Some(hup_rx),
        lease_file: Some(state_dir.join(LEASE_FILE)),
        lease_journal_bytes: args.lease_journal_kib.map(|k| k.saturating_mul(1024)),
        events,
        resolv: watch_resolv_conf(),
    });
    Ok((server, bound))
}

/// resolv.conf's watch, made here because the system-call filter installed later refuses
/// `inotify_init1`. Without it the upstreams change at a reload only.
fn watch_resolv_conf() -> Option<hubnat_daemon::resolv::ResolvWatch> {
    let path = Path::new(hubnat_daemon::resolv::RESOLV_CONF);
    hubnat_daemon::resolv::ResolvWatch::open(path)
        .inspect_err(|e| tracing::warn!("cannot watch {}: {e}", path.display()))
        .ok()
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

/// Sends one request to the running instance and returns its result.
fn ask(control: &Path, req: &Request) -> Result<Value> {
    let mut s = UnixStream::connect(control).with_context(|| {
        format!(
            "cannot reach hubnat at {} (is it running? --control PATH names another socket)",
            control.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    s.write_all(&line)?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer)?;
    if answer.is_empty() {
        bail!("hubnat closed the control connection without an answer");
    }
    let resp: Response = serde_json::from_str(&answer).context("unreadable answer")?;
    match resp.error {
        Some(e) if !resp.ok => bail!("{e}"),
        _ => Ok(resp.result),
    }
}

/// `hubnat events`: asks for the event stream and prints each line as it comes (`json`: as
/// is; else as the security log's text), those of the `kinds` wanted, until SIGINT or SIGTERM
/// (exit 0) or until hubnat closes the stream.
fn stream_events(control: &Path, kinds: &[String], json: bool) -> Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).context("cannot install signal handlers")?;
    }
    let mut s = UnixStream::connect(control).with_context(|| {
        format!(
            "cannot reach hubnat at {} (is it running? --control PATH names another socket)",
            control.display()
        )
    })?;
    s.write_all(b"{\"cmd\":\"events\"}\n")?;
    // Short reads, so that a signal is noticed while no event comes.
    s.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut r = BufReader::new(s);
    let mut line = Vec::new();
    let mut answered = false;
    let out = std::io::stdout();
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        match r.read_until(b'\n', &mut line) {
            Ok(_) if line.last() != Some(&b'\n') => {
                if answered {
                    eprintln!("hubnat: the event stream ended (hubnat stopped)");
                    return Ok(());
                }
                bail!("hubnat closed the control connection without an answer");
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                // A line cut by the timeout stays in `line`, to be completed by the next read.
                continue;
            }
            Err(e) => return Err(e).context("reading the event stream"),
        }
        let text = std::mem::take(&mut line);
        if !answered {
            let resp: Response = serde_json::from_slice(&text).context("unreadable answer")?;
            match resp.error {
                Some(e) if !resp.ok => bail!("{e}"),
                _ => answered = true,
            }
            continue;
        }
        let Ok(v) = serde_json::from_slice::<Value>(&text) else {
            continue;
        };
        if !hubnat_daemon::stream::kind_wanted(v["kind"].as_str().unwrap_or(""), kinds) {
            continue;
        }
        let mut o = out.lock();
        let written = if json {
            o.write_all(&text)
        } else {
            writeln!(o, "{}", hubnat_daemon::stream::readable(&v))
        };
        // A reader that went away (`| head`) ends the stream as Ctrl-C does.
        if written.and_then(|()| o.flush()).is_err() {
            return Ok(());
        }
    }
}

fn set_request(section: Section, args: &SetArgs) -> Result<Request> {
    let mut values = BTreeMap::new();
    for kv in &args.values {
        let Some((k, v)) = kv.split_once('=') else {
            bail!("`{kv}`: expected KEY=VALUE");
        };
        values.insert(k.trim().to_owned(), v.to_owned());
    }
    Ok(Request::Set {
        section,
        values,
        save: args.save,
    })
}

fn switch(section: Section, on: bool, save: bool) -> Request {
    let mut values = BTreeMap::new();
    values.insert("enabled".to_owned(), on.to_string());
    Request::Set {
        section,
        values,
        save,
    }
}

fn section_request(section: Section, op: &SectionOp) -> Result<Request> {
    Ok(match op {
        SectionOp::Get => Request::Get { section },
        SectionOp::Set(a) => set_request(section, a)?,
        SectionOp::Enable(a) => switch(section, true, a.save),
        SectionOp::Disable(a) => switch(section, false, a.save),
    })
}

fn client_command(cmd: Command, control: Option<PathBuf>, json: bool) -> Result<()> {
    let control = control.unwrap_or_else(default_control_path);
    let req = match &cmd {
        Command::Run(_) | Command::Slirp4netns { .. } | Command::Demo(_) => {
            unreachable!("handled by main")
        }
        Command::Status => Request::Status,
        Command::NatTable => Request::NatTable,
        Command::DhcpTable => Request::DhcpTable,
        Command::Reload => Request::Reload,
        Command::Events(a) => return stream_events(&control, &a.kinds, json),
        Command::Forward { op } => match op {
            ForwardOp::List => Request::ForwardList,
            ForwardOp::Add {
                proto,
                listen,
                to,
                save,
            } => Request::ForwardAdd {
                proto: proto.clone(),
                listen: listen.clone(),
                to: to.clone(),
                save: *save,
            },
            ForwardOp::Remove { id, save } => Request::ForwardRemove {
                id: *id,
                save: *save,
            },
        },
        Command::Capture { op } => match op {
            CaptureOp::Start { file, max_mib } => {
                if *max_mib == 0 {
                    bail!("--max-mib 0: give 1 or more");
                }
                Request::CaptureStart {
                    // hubnat's working directory is not this one.
                    path: std::path::absolute(file)?,
                    max_mib: Some(*max_mib),
                }
            }
            CaptureOp::Stop => Request::CaptureStop,
        },
        Command::Port { op } => match op {
            PortOp::List => Request::PortList,
            PortOp::Add { spec } => Request::PortAdd { spec: spec.clone() },
            PortOp::Remove { id } => Request::PortRemove { id: *id },
        },
        Command::Host { op } | Command::Dns { op } => {
            let section = if matches!(cmd, Command::Host { .. }) {
                Section::Host
            } else {
                Section::Dns
            };
            match op {
                HostOp::Get => Request::Get { section },
                HostOp::Set(a) => set_request(section, a)?,
            }
        }
        Command::Nat { op } => section_request(Section::Nat, op)?,
        Command::Ipv6 { op } => section_request(Section::Ipv6, op)?,
        Command::Dhcp { op } => match op {
            DhcpOp::Section(op) => section_request(Section::Dhcp, op)?,
            DhcpOp::Reserve { op } => match op {
                ReserveOp::List => Request::DhcpReserveList,
                ReserveOp::Add {
                    mac,
                    ip,
                    name,
                    save,
                } => Request::DhcpReserveAdd {
                    mac: mac.clone(),
                    ip: ip.clone(),
                    name: name.clone(),
                    save: *save,
                },
                ReserveOp::Remove { mac, save } => Request::DhcpReserveRemove {
                    mac: mac.clone(),
                    save: *save,
                },
            },
        },
        Command::Securenat { op } => match op {
            OnOff::Enable(a) => switch(Section::Securenat, true, a.save),
            OnOff::Disable(a) => switch(Section::Securenat, false, a.save),
        },
    };
    let result = ask(&control, &req)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&result)?);
        return Ok(());
    }
    match req {
        Request::Status => print_status(&serde_json::from_value(result)?),
        Request::NatTable => print_nat_table(&serde_json::from_value::<Vec<NatRow>>(result)?),
        Request::DhcpTable => print_dhcp_table(&serde_json::from_value::<Vec<LeaseRow>>(result)?),
        Request::Get { .. } => print_fields(&result),
        Request::Set { .. }
        | Request::Reload
        | Request::DhcpReserveAdd { .. }
        | Request::DhcpReserveRemove { .. } => print_change(&serde_json::from_value(result)?),
        Request::DhcpReserveList => {
            print_reservations(&serde_json::from_value::<Vec<ReservationRow>>(result)?)
        }
        Request::PortList | Request::PortAdd { .. } | Request::PortRemove { .. } => {
            print_ports(&serde_json::from_value::<Vec<PortRow>>(result)?)
        }
        Request::ForwardList | Request::ForwardAdd { .. } | Request::ForwardRemove { .. } => {
            print_forwards(&serde_json::from_value::<Vec<ForwardRow>>(result)?)
        }
        Request::CaptureStart { .. } | Request::CaptureStop => {
            print_capture(&serde_json::from_value(result)?)
        }
        // Streamed by `stream_events`, never asked this way.
        Request::Events => {}
    }
    Ok(())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

fn span(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m {s}s"),
        _ => format!("{d}d {h}h {m}m"),
    }
}

/// Prints rows as columns, each as wide as its widest cell.
fn table(head: &[&str], rows: &[Vec<String>]) {
    let mut w: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(head.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

fn print_status(s: &StatusView) {
    let on = |b: bool| if b { "on" } else { "off" }.to_owned();
    let mut rows = vec![
        vec!["SecureNAT".into(), on(s.securenat)],
        vec!["Virtual NAT".into(), on(s.nat)],
        vec!["Virtual DHCP server".into(), on(s.dhcp)],
        vec!["Uptime".into(), span(s.uptime_secs)],
        vec!["TCP sessions".into(), s.tcp_sessions.to_string()],
        vec!["UDP sessions".into(), s.udp_sessions.to_string()],
        vec!["ICMP sessions".into(), s.icmp_sessions.to_string()],
        vec!["DNS sessions".into(), s.dns_sessions.to_string()],
        vec![
            "Of them IPv6 (TCP, UDP, ICMP)".into(),
            s.ipv6_sessions.to_string(),
        ],
        vec!["DHCP clients".into(), s.dhcp_clients.to_string()],
        vec![
            "Frames in / out".into(),
            format!("{} / {}", s.frames_in, s.frames_out),
        ],
        vec![
            "IPv6 frames in / out".into(),
            format!("{} / {}", s.frames_in_ipv6, s.frames_out_ipv6),
        ],
        vec![
            "Bytes in / out".into(),
            format!("{} / {}", s.bytes_in, s.bytes_out),
        ],
    ];
    if !s.workers.is_empty() {
        rows.push(vec![
            "Frames handed between workers".into(),
            s.frames_handed_over.to_string(),
        ]);
    }
    if let Some(n) = &s.tap_napi {
        rows.push(vec![
            "TAP NAPI polls".into(),
            format!(
                "{} ({} switches)",
                if n.threaded {
                    "in kernel threads"
                } else {
                    "inside each write"
                },
                n.switches
            ),
        ]);
    }
    for (why, n) in &s.drops {
        rows.push(vec![format!("Dropped: {why}"), n.to_string()]);
    }
    if let Some(c) = &s.capture {
        rows.push(vec!["Capture".into(), capture_line(c)]);
    }
    table(&["Item", "Value"], &rows);
    if !s.ports.is_empty() {
        println!();
        print_ports(&s.ports);
    }
}

/// A capture in one line: where, how far, and whether it is on or why it ended.
fn capture_line(c: &hubnat_runtime::capture::CaptureStatus) -> String {
    format!(
        "{} {}: {} frames, {} of {} MiB, {} dropped",
        match &c.ended {
            None => "on,".to_owned(),
            Some(why) => format!("ended ({why}),"),
        },
        c.path.display(),
        c.frames,
        mib(c.bytes),
        c.max_bytes >> 20,
        c.dropped
    )
}

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / f64::from(1u32 << 20))
}

fn print_capture(c: &hubnat_runtime::capture::CaptureStatus) {
    println!("capture {}", capture_line(c));
}

fn print_forwards(rows: &[ForwardRow]) {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|f| {
            vec![
                f.id.to_string(),
                f.proto.clone(),
                f.listen.clone(),
                f.to.clone(),
                f.guest.clone().unwrap_or_else(|| "(none now)".into()),
                format!("{} / {}", f.accepted, f.refused),
            ]
        })
        .collect();
    table(
        &[
            "Forward",
            "Proto",
            "Listen",
            "To",
            "Guest",
            "Accepted / refused",
        ],
        &rows,
    );
}

fn print_ports(rows: &[PortRow]) {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|p| {
            vec![
                p.id.to_string(),
                p.kind.clone(),
                p.address.clone(),
                match (&p.peer, p.connected) {
                    (Some(peer), true) => peer.clone(),
                    (None, true) => "yes".into(),
                    (_, false) => "no".into(),
                },
                format!("{} / {}", p.frames_in, p.frames_out),
                format!("{} / {}", p.bytes_in, p.bytes_out),
                p.macs.to_string(),
                format!(
                    "{} out, {} filtered, {} malformed",
                    p.dropped_out, p.filtered_in, p.malformed
                ),
                format!("{} / {}", p.connects, p.disconnects),
            ]
        })
        .collect();
    table(
        &[
            "Port",
            "Kind",
            "Address",
            "Peer",
            "Frames in / out",
            "Bytes in / out",
            "Guests",
            "Dropped",
            "Connects / drops",
        ],
        &rows,
    );
}

fn print_nat_table(rows: &[NatRow]) {
    let now = now_ms();
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.id.to_string(),
                r.proto.clone(),
                r.direction.clone(),
                r.guest.clone(),
                r.dst.clone(),
                r.state.clone(),
                span(now.saturating_sub(r.created) / 1000),
                span(now.saturating_sub(r.last_used) / 1000),
                r.bytes_to_host.to_string(),
                r.bytes_to_guest.to_string(),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "Proto",
            "Dir",
            "Source",
            "Destination",
            "State",
            "Age",
            "Idle",
            "Sent",
            "Received",
        ],
        &rows,
    );
}

fn print_dhcp_table(rows: &[LeaseRow]) {
    let now = now_ms();
    // DHCPv6 leases add their client's DUID and IAID; a table without any looks as before.
    let v6 = rows.iter().any(|r| r.duid.is_some());
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut row = vec![
                r.id.to_string(),
                r.mac.clone(),
                r.ip.clone(),
                r.host_name.clone(),
                span(now.saturating_sub(r.leased_at) / 1000),
                span(r.expires_at.saturating_sub(now) / 1000),
                if r.reserved { "yes" } else { "" }.to_owned(),
            ];
            if v6 {
                row.push(r.duid.clone().unwrap_or_default());
                row.push(r.iaid.map(|i| i.to_string()).unwrap_or_default());
            }
            row
        })
        .collect();
    let mut head = vec![
        "ID",
        "MAC address",
        "IP address",
        "Host name",
        "Leased for",
        "Expires in",
        "Reserved",
    ];
    if v6 {
        head.extend(["DUID", "IAID"]);
    }
    table(&head, &rows);
}

fn print_reservations(rows: &[ReservationRow]) {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let now = match (&r.leased, &r.held_by) {
                (Some(ip), _) if *ip == r.ip => "leased".to_owned(),
                (Some(ip), _) => format!("leased {ip} (moves at its renewal)"),
                (None, Some(other)) => format!("held by {other} until its renewal"),
                (None, None) => "not leased".to_owned(),
            };
            vec![
                r.mac.clone(),
                r.ip.clone(),
                r.name.clone().unwrap_or_default(),
                now,
            ]
        })
        .collect();
    table(&["MAC address", "IP address", "Name", "Now"], &rows);
}

fn print_fields(v: &Value) {
    let Some(m) = v.as_object() else {
        println!("{v}");
        return;
    };
    let rows: Vec<Vec<String>> = m
        .iter()
        .map(|(k, v)| {
            let shown = match v {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                Value::Array(a) => a
                    .iter()
                    .map(|x| {
                        x.as_str()
                            .map(str::to_owned)
                            .unwrap_or_else(|| x.to_string())
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
                other => other.to_string(),
            };
            vec![k.clone(), shown]
        })
        .collect();
    table(&["Setting", "Value"], &rows);
}

fn print_change(c: &ChangeView) {
    if c.changes.is_empty() {
        println!("nothing changed");
    }
    for ch in &c.changes {
        println!("{ch}");
    }
    for f in &c.restart_needed {
        println!("{f}: takes effect at the next start");
    }
    if let Some(p) = &c.saved {
        println!("saved to {}", p.display());
    }
}
