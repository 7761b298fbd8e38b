//! `hubnat-pcap`: capture hubnat's port, replay captures through the core deterministically,
//! compare captures, and make the crafted scenarios and the benchmark's input.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use hubnat_replay::{self as replay, craft, decode, gen, pcap, Script};
use hubnat_runtime::port::af_packet::{Direction, PacketSocket};
use hubnat_runtime::port::tap::netns_path;

mod steps;

#[derive(Parser)]
#[command(
    name = "hubnat-pcap",
    about = "Record, replay and compare hubnat captures"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Capture the frames of an interface (hubnat's TAP, seen from the guest's side) until
    /// SIGINT/SIGTERM or --seconds.
    Record {
        /// Network namespace of the interface: a path, a PID, or an `ip netns` name.
        #[arg(long)]
        netns: Option<String>,
        #[arg(long, default_value = "tap0")]
        iface: String,
        #[arg(long)]
        out: PathBuf,
        /// Keep only the frames the guest sent (the replay's input).
        #[arg(long)]
        guest_only: bool,
        #[arg(long)]
        seconds: Option<f64>,
    },
    /// Replay a capture's guest frames through the core with a scripted host side (TCP
    /// super-frame marks, if any, go to OUT's `.gso` file beside it).
    Replay {
        #[arg(long = "in")]
        input: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// The host-side script (TOML); default: NAME.toml beside the input when it exists.
        #[arg(long)]
        script: Option<PathBuf>,
    },
    /// Compare two captures frame by frame; prints the first difference decoded.
    Diff { a: PathBuf, b: PathBuf },
    /// Print every frame of a capture, decoded (with the TCP super-frame marks of FILE's
    /// `.gso` file beside it, when there is one).
    Show { file: PathBuf },
    /// Write the replay benchmark's input: N TCP uploads carrying M MB in all.
    Gen {
        #[arg(long, default_value_t = 64)]
        flows: u32,
        #[arg(long, default_value_t = 100)]
        mbytes: u64,
        #[arg(long)]
        out: PathBuf,
    },
    /// Where connect-exchange-close cycles spend their time (`hubnat-load crr`): given a
    /// capture on the client's side of the NAT and one on the server's, both stamped by the
    /// kernel's clock (tcpdump -w in each namespace), prints each step's median and 90th
    /// percentile and whose time it is (the NAT's, the client's or the server's).
    Steps {
        #[arg(long)]
        client: PathBuf,
        #[arg(long)]
        server: PathBuf,
        /// The server's port.
        #[arg(long, default_value_t = 7000)]
        port: u16,
    },
    /// Write a crafted scenario's input (NAME.in.pcap) and script (NAME.toml) into DIR.
    Craft {
        /// A scenario name, or `all`.
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "pcaps")]
        dir: PathBuf,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Record {
            netns,
            iface,
            out,
            guest_only,
            seconds,
        } => record(netns.as_deref(), &iface, &out, guest_only, seconds),
        Cmd::Replay { input, out, script } => {
            let script = load_script(&input, script.as_deref())?;
            let frames = pcap::read(&input)?;
            let (got, marks) = replay::replay_marked(&script, &frames);
            pcap::write(&out, &got)?;
            // The core's super-frame marks, which a pcap cannot hold, beside it (`gso`).
            let gso_file = out.with_extension("gso");
            if !marks.is_empty() {
                std::fs::write(&gso_file, replay::gso::marks_to_text(&marks))
                    .with_context(|| format!("writing {}", gso_file.display()))?;
            }
            eprintln!(
                "{} frames in, {} frames out ({} super-frames)",
                frames.len(),
                got.len(),
                marks.len()
            );
            Ok(())
        }
        Cmd::Diff { a, b } => {
            let (fa, fb) = (pcap::read(&a)?, pcap::read(&b)?);
            match decode::compare(&fa, &fb) {
                None => {
                    println!("same: {} frames", fa.len());
                    Ok(())
                }
                Some(m) => {
                    print!("{m}");
                    std::process::exit(1)
                }
            }
        }
        Cmd::Show { file } => {
            // A golden output's super-frame marks, when it has them (`NAME.out.gso`).
            let gso_file = file.with_extension("gso");
            let marks = match std::fs::read_to_string(&gso_file) {
                Ok(text) => replay::gso::parse_marks(&text)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", gso_file.display()))?,
                Err(_) => Vec::new(),
            };
            let mut marks = marks.into_iter().peekable();
            for (i, f) in pcap::read(&file)?.iter().enumerate() {
                let mss = marks.next_if(|&(m, _)| m == i).map_or(0, |(_, mss)| mss);
                println!(
                    "{:4} {}.{:06} {}",
                    i + 1,
                    f.ts.as_secs(),
                    f.ts.subsec_micros(),
                    decode::describe_marked(&f.data, mss)
                );
            }
            Ok(())
        }
        Cmd::Gen { flows, mbytes, out } => {
            let f = File::create(&out).with_context(|| format!("creating {}", out.display()))?;
            let mut w = pcap::Writer::new(BufWriter::new(f))?;
            let mut err = None;
            let n = gen::generate(flows, mbytes << 20, |ts, frame| {
                if err.is_none() {
                    err = w.write(ts, frame).err();
                }
            });
            if let Some(e) = err {
                bail!("writing {}: {e}", out.display());
            }
            drop(w);
            eprintln!("{n} frames, {flows} flows, {mbytes} MiB of payload");
            Ok(())
        }
        Cmd::Steps {
            client,
            server,
            port,
        } => {
            let (c, s) = (pcap::read(&client)?, pcap::read(&server)?);
            match steps::table(&c, &s, port) {
                Some(t) => {
                    print!("{t}");
                    Ok(())
                }
                None => bail!(
                    "no connection to port {port} in {} could be paired with one in {}",
                    client.display(),
                    server.display()
                ),
            }
        }
        Cmd::Craft { name, dir } => {
            let names: Vec<&str> = if name == "all" {
                craft::NAMES.to_vec()
            } else {
                vec![name.as_str()]
            };
            for n in names {
                let Some((script, input)) = craft::build(n) else {
                    bail!(
                        "no crafted scenario `{n}` (known: {})",
                        craft::NAMES.join(", ")
                    );
                };
                pcap::write(&dir.join(format!("{n}.in.pcap")), &input)?;
                let toml = dir.join(format!("{n}.toml"));
                if script.is_empty() {
                    let _ = std::fs::remove_file(&toml);
                } else {
                    std::fs::write(&toml, script)?;
                }
                eprintln!("{n}: {} frames", input.len());
            }
            Ok(())
        }
    }
}

/// The script given, else NAME.toml beside NAME.in.pcap, else the default.
fn load_script(input: &Path, given: Option<&Path>) -> Result<Script> {
    let path = given.map(Path::to_owned).or_else(|| {
        let name = input.file_name()?.to_str()?.strip_suffix(".in.pcap")?;
        let p = input.with_file_name(format!("{name}.toml"));
        p.exists().then_some(p)
    });
    match path {
        None => Ok(Script::default()),
        Some(p) => {
            let text =
                std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
            Script::parse(&text).with_context(|| p.display().to_string())
        }
    }
}

fn record(
    netns: Option<&str>,
    iface: &str,
    out: &Path,
    guest_only: bool,
    seconds: Option<f64>,
) -> Result<()> {
    let timeout = Duration::from_millis(100);
    let sock = match netns {
        Some(ns) => PacketSocket::open_in_netns(iface, &netns_path(ns), timeout),
        None => PacketSocket::open(iface, timeout),
    }
    .with_context(|| format!("opening a packet socket on {iface}"))?;
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&stop))?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, Arc::clone(&stop))?;
    let f = File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut w = pcap::Writer::new(BufWriter::new(f))?;
    eprintln!("recording {iface} into {}", out.display());
    let started = Instant::now();
    let deadline = seconds.map(|s| started + Duration::from_secs_f64(s));
    let mut buf = vec![0u8; 65536];
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) && deadline.is_none_or(|d| Instant::now() < d) {
        let Some((len, dir)) = sock.recv(&mut buf)? else {
            continue;
        };
        if guest_only && dir != Direction::Outgoing {
            continue;
        }
        let ts = SystemTime::now().duration_since(UNIX_EPOCH)?;
        w.write(ts, &buf[..len.min(buf.len())])?;
        n += 1;
    }
    let mut inner = w.into_inner();
    std::io::Write::flush(&mut inner)?;
    eprintln!("{n} frames recorded");
    Ok(())
}
