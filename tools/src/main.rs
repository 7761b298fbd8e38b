//! `hubnat`: the daemon (`hubnat run`) and, later, its control CLI.

use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use hubnat_engine::config::{resolv_conf_nameservers, Config};
use hubnat_engine::control::state;
use hubnat_engine::port::tap::{netns_path, Tap};
use hubnat_engine::runtime::{Exit, Runtime};
use hubnat_engine::Engine;

/// A user-mode virtual NAT and virtual DHCP server for a virtual Ethernet segment.
///
/// hubnat sits on a segment (a TAP device) as one virtual host: it answers ARP and ping, gives
/// the machines on the segment addresses by DHCP, relays their DNS, and carries their TCP and
/// UDP out through ordinary host sockets, all in user space.
#[derive(Parser)]
#[command(name = "hubnat", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the virtual host on a segment until SIGINT or SIGTERM.
    Run(RunArgs),
}

#[derive(Args)]
struct RunArgs {
    /// TAP device to create (or attach to) as the segment.
    #[arg(long, value_name = "NAME")]
    tap: String,
    /// Create the TAP device inside this network namespace (a path such as /proc/PID/ns/net, a
    /// PID, or a name made by `ip netns add`) and bring it up there, leaving its addressing to
    /// the guest's DHCP client. hubnat itself, and its host sockets, stay where it runs.
    #[arg(long, value_name = "PATH|PID|NAME")]
    netns: Option<String>,
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
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
    };
    if let Err(e) = result {
        eprintln!("hubnat: {e:#}");
        std::process::exit(1);
    }
}

fn init_logging(filter: &str) -> Result<()> {
    let filter = std::env::var("HUBNAT_LOG").unwrap_or_else(|_| filter.to_owned());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .with_context(|| format!("bad log filter `{filter}`"))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    Ok(())
}

fn run(args: RunArgs) -> Result<()> {
    init_logging(&args.log)?;
    let mut cfg = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::defaults(),
    };
    let mut rng = SmallRng::from_os_rng();

    let state_dir = args
        .state_dir
        .clone()
        .or_else(|| cfg.state_dir.clone())
        .unwrap_or_else(state::default_state_dir);
    let mac = match cfg.host.mac {
        Some(mac) => mac,
        None => match state::load_or_create_mac(&state_dir, rng.random()) {
            Ok((mac, true)) => {
                tracing::info!(
                    "chose the virtual host's MAC {mac}, kept in {}",
                    state_dir.display()
                );
                mac
            }
            Ok((mac, false)) => mac,
            Err(e) => bail!(
                "cannot keep the virtual host's MAC in {}: {e}",
                state_dir.display()
            ),
        },
    };
    cfg.host.mac = Some(mac);
    if cfg.dns.upstream.is_empty() {
        let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        cfg.dns.upstream = resolv_conf_nameservers(&text)
            .into_iter()
            .filter(SocketAddr::is_ipv4)
            .collect();
        if cfg.dns.upstream.is_empty() {
            tracing::warn!("no IPv4 nameserver in /etc/resolv.conf: the DNS relay has no upstream");
        }
    }

    let mtu = Some(u32::from(cfg.nat.mtu));
    let tap = match &args.netns {
        Some(spec) => Tap::open_in_netns(&args.tap, mtu, &netns_path(spec))?,
        None => Tap::open(&args.tap, mtu)?,
    };

    let (stop_rx, stop_tx) = UnixStream::pair().context("cannot create the signal pipe")?;
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::low_level::pipe::register(sig, stop_tx.try_clone()?)
            .context("cannot install signal handlers")?;
    }

    let where_ = args
        .netns
        .as_deref()
        .map(|n| format!(" in network namespace {n}"))
        .unwrap_or_default();
    tracing::info!(
        "hubnat {}: virtual host {} ({}) on TAP {}{where_}, MTU {}; socket backend mio",
        env!("CARGO_PKG_VERSION"),
        cfg.host.ip,
        mac,
        tap.name(),
        cfg.nat.mtu
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

    let engine = Engine::new(cfg, mac, rng.random());
    let mut rt = Runtime::new(engine, tap, stop_rx)?;
    match rt.run()? {
        Exit::Stopped => {
            tracing::info!("stopping: {} host sockets open", rt.host.len());
        }
    }
    Ok(())
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}
