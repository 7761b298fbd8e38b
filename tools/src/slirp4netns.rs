//! `hubnat slirp4netns`: slirp4netns 1.x's command line, readiness protocol and API socket in
//! front of `hubnat run`, so that podman, rootlesskit and buildah run hubnat where they would run
//! slirp4netns (a symlink or copy of hubnat named `slirp4netns`, or podman's `network_cmd_path`).
//!
//! The network is slirp4netns's, derived from `--cidr` (default 10.0.2.0/24): the gateway at
//! network + 2, the DNS relay at + 3, the guest at + 100 (`--configure` gives it that address,
//! bound to its MAC; without it, DHCP offers it first). Without `--disable-host-loopback` the
//! virtual host is at + 3 (DNS relay, DHCP server) and the gateway at + 2 is the host-loopback
//! alias (`nat.host_loopback`, which answers ARP and stands for the host's 127.0.0.1). With it,
//! the loopback must not be reachable, so there is no such alias: the virtual host is the
//! gateway at + 2 and + 3 is its DNS address (`dns.address`), where it answers DNS (and ARP and
//! ping) as slirp4netns does.
//!
//! The front end runs `hubnat run` in this process with the arguments it derives (a TAP made in
//! the target's namespaces, a private state directory and control socket). Once the TAP is open
//! and the runtime's threads exist it starts its own threads: one serving the API socket, which
//! turns slirp4netns's requests into `forward-*` requests on the private control socket, and
//! one watching the exit descriptor, which stops hubnat as SIGTERM does.

use std::ffi::OsString;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::{json, Value};

use hubnat_core::config::RawConfig;
use hubnat_daemon::machine;
use hubnat_runtime::port::tap::GuestSetup;

/// The slirp4netns release whose command line and API this front end follows.
const SLIRP4NETNS_VERSION: &str = "1.2.0";

/// slirp4netns's limit on an API request, kept: a request of this size or more is refused.
const API_REQUEST_MAX: usize = 4096;

/// How long an API client may take to send its request or read the answer.
const API_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a request to hubnat's control socket may take.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

/// A base configuration file for the front end's hubnat (its egress rules, DNS upstreams,
/// limits); the network's own settings are then derived from the command line.
const CONFIG_ENV: &str = "HUBNAT_SLIRP4NETNS_CONFIG";

/// The private directory's name prefix; the cleanup process removes only such a directory.
const DIR_PREFIX: &str = "hubnat-slirp4netns.";

/// The hidden option that makes a process the private directory's cleanup watch.
const CLEANUP_OPTION: &str = "hubnat-internal-cleanup";

const USAGE: &str = "\
Usage: slirp4netns [OPTION]... PID|PATH [TAPNAME]
User-mode networking for unprivileged network namespaces (hubnat's slirp4netns front end).

-c, --configure          bring up the interface (and lo), with the guest address and a default route
-e, --exit-fd=FD         specify the FD for terminating slirp4netns
-r, --ready-fd=FD        specify the FD to write to when the network is configured
-m, --mtu=MTU            specify MTU (default=1500, min=576, max=65520)
-6, --enable-ipv6        serve IPv6 too: fd00::/64 by router advertisement, gateway fd00::2
-a, --api-socket=PATH    specify API socket path
--cidr=CIDR              specify network address CIDR (default=10.0.2.0/24, prefix 1-25)
--disable-host-loopback  prohibit connecting to 127.0.0.1:* on the host namespace
--netns-type=TYPE        specify network namespace type ([path|pid], default=pid)
--userns-path=PATH       specify user namespace path
--enable-sandbox         accepted: hubnat always confines itself (user, capabilities, Landlock)
--enable-seccomp         accepted: hubnat always filters its system calls (seccomp)
--disable-dns            do not offer the DNS relay to the guest by DHCP
--macaddress=MAC         specify the MAC address of the TAP (only valid with -c)
--target-type=TYPE       specify the target type (netns only; bess is not supported)
-h, --help               show this help and exit
-v, --version            show version and exit
";

/// What hubnat adds to slirp4netns's help: where things are, and what it does not do.
fn help_notes() -> String {
    format!(
        "\
The network (network address N of --cidr): the gateway is N+2, the DNS relay N+3, the guest
N+100 (--configure sets it; without, DHCP offers it first). Without --disable-host-loopback,
N+2 reaches the host's 127.0.0.1.
--api-socket answers add_hostfwd, list_hostfwd and remove_hostfwd as slirp4netns 1.2 does,
through port forwards of hubnat's.
Not supported: binding host sockets to an outbound address or interface (outbound-addr,
outbound-addr6), IPv6, the bess target type.
Environment: {CONFIG_ENV}=FILE starts from that hubnat configuration file
(egress rules, DNS upstreams, limits); HUBNAT_LOG sets the log filter. The log names the
control socket, for `hubnat --control SOCKET status`.
"
    )
}

fn version_text() -> String {
    format!(
        "slirp4netns version {SLIRP4NETNS_VERSION} (hubnat {})\n\
         hubnat: {} (a user-mode NAT in place of libslirp)\n",
        env!("CARGO_PKG_VERSION"),
        env!("CARGO_PKG_VERSION"),
    )
}

/// Runs the front end when hubnat is invoked as `slirp4netns` (argv[0]'s file name) or as
/// `hubnat slirp4netns`; None for any other invocation.
pub(crate) fn dispatch(argv: &[OsString]) -> Option<i32> {
    let name = argv
        .first()
        .and_then(|a| Path::new(a).file_name())
        .and_then(|n| n.to_str());
    if name == Some("slirp4netns") {
        return Some(main(argv[1..].to_vec(), None));
    }
    if argv.get(1).and_then(|a| a.to_str()) == Some("slirp4netns") {
        return Some(main(argv[2..].to_vec(), None));
    }
    None
}

/// The front end with slirp4netns's arguments (after the program name); the exit status.
/// `control` is a control socket named with `hubnat --control` (else one in the private
/// directory).
pub(crate) fn main(args: Vec<OsString>, control: Option<PathBuf>) -> i32 {
    let mut text = Vec::with_capacity(args.len());
    for a in args {
        match a.into_string() {
            Ok(s) => text.push(s),
            Err(a) => {
                eprintln!("slirp4netns: argument {a:?} is not valid UTF-8");
                return 1;
            }
        }
    }
    match parse(&text) {
        Ok(Parsed::Help) => {
            print!("{USAGE}\n{}", help_notes());
            0
        }
        Ok(Parsed::Version) => {
            print!("{}", version_text());
            0
        }
        Ok(Parsed::Cleanup(dir)) => {
            cleanup_watch(&dir);
            0
        }
        Ok(Parsed::Run(opts)) => match start(*opts, control) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("hubnat: {e:#}");
                1
            }
        },
        Err(e) => {
            eprintln!("slirp4netns: {e}\n(hubnat's slirp4netns front end: see slirp4netns --help)");
            1
        }
    }
}

/// What the command line asks for.
#[derive(Debug, PartialEq)]
enum Parsed {
    Help,
    Version,
    Run(Box<Opts>),
    /// The private directory's cleanup watch (an internal process of the front end).
    Cleanup(PathBuf),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NetnsType {
    /// The target is a PID: its network namespace, and its user namespace.
    Pid,
    /// The target is a network namespace file.
    Path,
}

/// slirp4netns's options, checked.
#[derive(Clone, Debug, PartialEq)]
struct Opts {
    configure: bool,
    exit_fd: Option<RawFd>,
    ready_fd: Option<RawFd>,
    mtu: u16,
    network: Network,
    disable_host_loopback: bool,
    netns_type: NetnsType,
    userns_path: Option<PathBuf>,
    api_socket: Option<PathBuf>,
    enable_ipv6: bool,
    disable_dns: bool,
    mac: Option<[u8; 6]>,
    /// The PID or the namespace path, as given.
    target: String,
    tap: String,
}

impl Default for Opts {
    fn default() -> Opts {
        Opts {
            configure: false,
            exit_fd: None,
            ready_fd: None,
            mtu: 1500,
            network: Network {
                addr: Ipv4Addr::new(10, 0, 2, 0),
                prefix: 24,
            },
            disable_host_loopback: false,
            netns_type: NetnsType::Pid,
            userns_path: None,
            api_socket: None,
            enable_ipv6: false,
            disable_dns: false,
            mac: None,
            target: String::new(),
            tap: "tap0".to_owned(),
        }
    }
}

/// Whether an option takes a value.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Takes {
    Nothing,
    Value,
}

/// slirp4netns's options: short name, long name, whether a value follows.
const OPTIONS: &[(Option<char>, &str, Takes)] = &[
    (Some('c'), "configure", Takes::Nothing),
    (Some('e'), "exit-fd", Takes::Value),
    (Some('r'), "ready-fd", Takes::Value),
    (Some('m'), "mtu", Takes::Value),
    (Some('6'), "enable-ipv6", Takes::Nothing),
    (Some('a'), "api-socket", Takes::Value),
    (None, "cidr", Takes::Value),
    (None, "disable-host-loopback", Takes::Nothing),
    (None, "netns-type", Takes::Value),
    (None, "userns-path", Takes::Value),
    (None, "enable-sandbox", Takes::Nothing),
    (None, "enable-seccomp", Takes::Nothing),
    (None, "outbound-addr", Takes::Value),
    (None, "outbound-addr6", Takes::Value),
    (None, "disable-dns", Takes::Nothing),
    (None, "macaddress", Takes::Value),
    (None, "target-type", Takes::Value),
    (Some('h'), "help", Takes::Nothing),
    (Some('v'), "version", Takes::Nothing),
    (None, CLEANUP_OPTION, Takes::Value),
];

/// Parses the command line as slirp4netns's getopt_long does (options and operands in any
/// order, `--opt=value` or `--opt value`, `-e3` or `-e 3`, `-c6` clusters, `--` ending the
/// options); a refusal names the option.
fn parse(args: &[String]) -> Result<Parsed, String> {
    let mut given: Vec<(&'static str, Option<String>)> = Vec::new();
    let mut operands = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        i += 1;
        if a == "--" {
            operands.extend(args[i..].iter().cloned());
            break;
        }
        if let Some(long) = a.strip_prefix("--") {
            let (name, inline) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v.to_owned())),
                None => (long, None),
            };
            let Some(&(_, name, takes)) = OPTIONS.iter().find(|o| o.1 == name) else {
                return Err(format!("unrecognized option '--{name}'"));
            };
            let value = match (takes, inline) {
                (Takes::Nothing, Some(_)) => {
                    return Err(format!("option '--{name}' doesn't allow an argument"))
                }
                (Takes::Nothing, None) => None,
                (Takes::Value, Some(v)) => Some(v),
                (Takes::Value, None) => {
                    let v = args
                        .get(i)
                        .ok_or_else(|| format!("option '--{name}' requires an argument"))?;
                    i += 1;
                    Some(v.clone())
                }
            };
            given.push((name, value));
        } else if a.len() > 1 && a.starts_with('-') {
            let shorts: Vec<char> = a[1..].chars().collect();
            let mut j = 0;
            while j < shorts.len() {
                let c = shorts[j];
                j += 1;
                let Some(&(_, name, takes)) = OPTIONS.iter().find(|o| o.0 == Some(c)) else {
                    return Err(format!("invalid option -- '{c}'"));
                };
                let value = if takes == Takes::Value {
                    let rest: String = shorts[j..].iter().collect();
                    j = shorts.len();
                    if !rest.is_empty() {
                        Some(rest)
                    } else {
                        let v = args
                            .get(i)
                            .ok_or_else(|| format!("option requires an argument -- '{c}'"))?;
                        i += 1;
                        Some(v.clone())
                    }
                } else {
                    None
                };
                given.push((name, value));
            }
        } else {
            operands.push(a.clone());
        }
    }
    let mut o = Opts::default();
    let mut target_type = "netns".to_owned();
    for (name, value) in given {
        let v = value.unwrap_or_default();
        let bad = |why: &str| format!("--{name}={v}: {why}");
        match name {
            "help" => return Ok(Parsed::Help),
            "version" => return Ok(Parsed::Version),
            CLEANUP_OPTION => return Ok(Parsed::Cleanup(PathBuf::from(v))),
            "configure" => o.configure = true,
            "exit-fd" => o.exit_fd = Some(fd_number(&v).ok_or_else(|| bad(FD_WHY))?),
            "ready-fd" => o.ready_fd = Some(fd_number(&v).ok_or_else(|| bad(FD_WHY))?),
            "mtu" => {
                o.mtu = v
                    .parse::<u16>()
                    .ok()
                    .filter(|m| (576..=65520).contains(m))
                    .ok_or_else(|| {
                        bad("the MTU must be an integer from 576 to 65520 (hubnat's range)")
                    })?
            }
            "enable-ipv6" => o.enable_ipv6 = true,
            "api-socket" if v.is_empty() => return Err(bad("an API socket path is needed")),
            "api-socket" => o.api_socket = Some(PathBuf::from(v)),
            "cidr" => o.network = Network::parse(&v).map_err(|why| bad(&why))?,
            "disable-host-loopback" => o.disable_host_loopback = true,
            "netns-type" => {
                o.netns_type = match v.as_str() {
                    "pid" => NetnsType::Pid,
                    "path" => NetnsType::Path,
                    _ => return Err(bad("the namespace type is `pid` or `path`")),
                }
            }
            "userns-path" if v.is_empty() => return Err(bad("a user namespace path is needed")),
            "userns-path" => o.userns_path = Some(PathBuf::from(v)),
            // hubnat's own sandbox and system-call filter are always on.
            "enable-sandbox" | "enable-seccomp" => {}
            "outbound-addr" | "outbound-addr6" => {
                return Err(bad(
                    "not supported by hubnat: its host sockets go out the way the host routes \
                     them, from the host's own addresses (leave the option out)",
                ))
            }
            "disable-dns" => o.disable_dns = true,
            "macaddress" => {
                o.mac = Some(parse_mac(&v).ok_or_else(|| {
                    bad("a MAC address is six hex bytes separated by ':', not a multicast one")
                })?)
            }
            "target-type" => target_type = v,
            other => return Err(format!("option '--{other}' is not handled")),
        }
    }
    match target_type.as_str() {
        "netns" => {}
        "bess" => {
            return Err(
                "--target-type=bess: not supported by hubnat (it serves a network namespace's \
                 TAP; for a VM, `hubnat run --port stream:PATH` serves QEMU's sockets)"
                    .into(),
            )
        }
        other => {
            return Err(format!(
                "--target-type={other}: the target type is `netns` (`bess` is not supported)"
            ))
        }
    }
    if o.mac.is_some() && !o.configure {
        return Err("--macaddress: only valid with --configure (-c)".into());
    }
    let mut operands = operands.into_iter();
    let Some(target) = operands.next() else {
        return Err(
            "the target is missing: PID (or, with --netns-type=path, a network \
                    namespace path) and TAPNAME"
                .into(),
        );
    };
    if let Some(tap) = operands.next() {
        if tap.is_empty() || tap.len() > 15 || tap.contains('/') {
            return Err(format!(
                "TAPNAME `{tap}`: a device name of 1 to 15 bytes, without '/'"
            ));
        }
        o.tap = tap;
    }
    let extra: Vec<String> = operands.collect();
    if !extra.is_empty() {
        return Err(format!(
            "too many arguments: {} (expected PID|PATH [TAPNAME])",
            extra.join(" ")
        ));
    }
    match o.netns_type {
        NetnsType::Pid if target.parse::<u32>().map_or(true, |p| p == 0) => {
            return Err(format!(
                "PID `{target}`: must be a positive integer (or give --netns-type=path)"
            ))
        }
        NetnsType::Path if target.is_empty() => {
            return Err("the network namespace path is empty".into())
        }
        _ => {}
    }
    o.target = target;
    Ok(Parsed::Run(Box::new(o)))
}

const FD_WHY: &str = "must be a descriptor number (a non-negative integer)";

fn fd_number(v: &str) -> Option<RawFd> {
    v.parse::<RawFd>().ok().filter(|n| *n >= 0)
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// A MAC for the guest's TAP when `--macaddress` names none (the kernel would choose a random
/// one too): unicast and locally administered.
fn random_mac() -> [u8; 6] {
    use rand::{Rng, SeedableRng};
    let mut mac: [u8; 6] = rand::rngs::SmallRng::from_os_rng().random();
    mac[0] = (mac[0] & 0xfe) | 0x02;
    mac
}

fn parse_mac(v: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = v.split(':');
    for b in mac.iter_mut() {
        let p = parts.next()?;
        if p.is_empty() || p.len() > 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    // The kernel refuses a group address for a device.
    (parts.next().is_none() && mac[0] & 1 == 0).then_some(mac)
}

/// The virtual network (`--cidr`): its address and prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Network {
    addr: Ipv4Addr,
    prefix: u8,
}

impl Network {
    /// `A.B.C.D/P` with P from 1 to 25 (slirp4netns's bounds: the guest's N+100 must fit); the
    /// host bits are cleared.
    fn parse(v: &str) -> Result<Network, String> {
        let (a, p) = v
            .split_once('/')
            .ok_or("a CIDR is an IPv4 network and a prefix length, e.g. 10.0.2.0/24")?;
        let addr: Ipv4Addr = a
            .parse()
            .map_err(|_| format!("`{a}` is not an IPv4 address"))?;
        let prefix: u8 = p
            .parse()
            .ok()
            .filter(|p| (1..=25).contains(p))
            .ok_or("the prefix length must be 1 to 25")?;
        let net = Network { addr, prefix };
        Ok(Network {
            addr: Ipv4Addr::from(u32::from(addr) & u32::from(net.mask())),
            prefix,
        })
    }

    fn mask(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::MAX << (32 - u32::from(self.prefix)))
    }

    /// The network's address plus `n`.
    fn nth(&self, n: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) + n)
    }

    fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !u32::from(self.mask()))
    }

    fn gateway(&self) -> Ipv4Addr {
        self.nth(2)
    }

    fn guest(&self) -> Ipv4Addr {
        self.nth(100)
    }

    /// DHCP's last address: as many as a /24 has after the guest's, at most.
    fn range_end(&self) -> Ipv4Addr {
        let last = u32::from(self.broadcast()) - 1;
        Ipv4Addr::from(last.min(u32::from(self.guest()) + 154))
    }
}

impl std::fmt::Display for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Where the virtual host and the DNS relay are, as `--disable-host-loopback` decides: the
/// gateway at + 2 and the DNS relay at + 3 either way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Layout {
    /// The virtual host: DHCP server, DNS relay, ping.
    host: Ipv4Addr,
    /// The host-loopback alias (the gateway), when the host's loopback may be reached.
    loopback_alias: Option<Ipv4Addr>,
    gateway: Ipv4Addr,
    /// Where the DNS relay answers: the virtual host, or its DNS address (`dns.address`).
    dns: Ipv4Addr,
}

impl Layout {
    /// The virtual host's DNS address, when the relay is not at the virtual host's own.
    fn dns_address(&self) -> Option<Ipv4Addr> {
        (self.dns != self.host).then_some(self.dns)
    }
}

impl Opts {
    fn layout(&self) -> Layout {
        let n = &self.network;
        if self.disable_host_loopback {
            Layout {
                host: n.gateway(),
                loopback_alias: None,
                gateway: n.gateway(),
                dns: n.nth(3),
            }
        } else {
            Layout {
                host: n.nth(3),
                loopback_alias: Some(n.gateway()),
                gateway: n.gateway(),
                dns: n.nth(3),
            }
        }
    }

    /// hubnat's configuration: `base` (the file `HUBNAT_SLIRP4NETNS_CONFIG` names, or
    /// defaults) with the network's settings from the command line.
    fn raw_config(&self, mut base: RawConfig) -> RawConfig {
        let n = &self.network;
        let l = self.layout();
        base.host.ip = Some(l.host.to_string());
        base.host.mask = Some(n.mask().to_string());
        base.nat.mtu = Some(u32::from(self.mtu));
        base.nat.host_loopback = Some(l.loopback_alias.map(|a| a.to_string()).unwrap_or_default());
        base.dns.address = Some(l.dns_address().map(|a| a.to_string()).unwrap_or_default());
        // The configured guest's address is its own: bound to its MAC, so that forwards reach
        // it before it has sent anything, and kept out of DHCP's range (which would offer it to
        // another client, whose traffic the binding would then refuse).
        let mut range_start = n.guest();
        if let (true, Some(mac)) = (self.configure, self.mac) {
            range_start = n.nth(101);
            let bindings = base.nat.bindings.get_or_insert_with(Vec::new);
            let guest = n.guest().to_string();
            let taken = bindings
                .iter()
                .any(|b| b.split_whitespace().nth(1) == Some(guest.as_str()));
            if !taken {
                bindings.push(format!("{} {guest}", mac_text(mac)));
            }
        }
        base.dhcp.range_start = Some(range_start.to_string());
        base.dhcp.range_end = Some(n.range_end().to_string());
        base.dhcp.mask = Some(n.mask().to_string());
        base.dhcp.gateway = Some(l.gateway.to_string());
        base.dhcp.dns = Some(if self.disable_dns {
            Vec::new()
        } else {
            vec![l.dns.to_string()]
        });
        // slirp4netns serves IPv6 only when asked, on fd00::/64 with its gateway at fd00::2
        // (its separate DNS address, fd00::3, is not made: the gateway answers DNS).
        base.ipv6.enabled = Some(self.enable_ipv6);
        if self.enable_ipv6 {
            base.ipv6.prefix = Some("fd00::/64".into());
            base.ipv6.ip = Some("fd00::2".into());
            base.ipv6.dns = Some(if self.disable_dns {
                Vec::new()
            } else {
                vec!["fd00::2".into()]
            });
        }
        base
    }

    /// The guest's side for `--configure`.
    fn guest_setup(&self) -> Option<GuestSetup> {
        self.configure.then(|| GuestSetup {
            address: self.network.guest(),
            netmask: self.network.mask(),
            gateway: Some(self.layout().gateway),
            mac: self.mac,
        })
    }

    /// The network and user namespaces to make the TAP in (`hubnat run --netns/--userns`), as
    /// slirp4netns finds them: a PID's own (its user namespace too, unless --userns-path names
    /// one), or a path's (with --userns-path's user namespace, if given).
    fn namespaces(&self) -> Result<(PathBuf, Option<PathBuf>)> {
        let (net, user) = match self.netns_type {
            NetnsType::Pid => (
                PathBuf::from(format!("/proc/{}/ns/net", self.target)),
                Some(
                    self.userns_path
                        .clone()
                        .unwrap_or_else(|| format!("/proc/{}/ns/user", self.target).into()),
                ),
            ),
            NetnsType::Path => (PathBuf::from(&self.target), self.userns_path.clone()),
        };
        let reachable = |p: &Path| match std::fs::metadata(p) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        };
        match reachable(&net) {
            Ok(true) => {}
            Ok(false) => match self.netns_type {
                NetnsType::Pid => bail!("PID {}: no such process", self.target),
                NetnsType::Path => bail!(
                    "existing path expected when --netns-type=path: {} does not exist",
                    net.display()
                ),
            },
            Err(e) => bail!("cannot reach the network namespace {}: {e}", net.display()),
        }
        if let Some(u) = &user {
            match reachable(u) {
                Ok(true) => {}
                Ok(false) => bail!("user namespace {}: no such file", u.display()),
                Err(e) => bail!("cannot reach the user namespace {}: {e}", u.display()),
            }
        }
        // `hubnat run --netns` takes a bare word for a name from `ip netns add`: keep paths
        // paths.
        let absolute = |p: PathBuf| -> Result<PathBuf> {
            Ok(if p.is_absolute() {
                p
            } else {
                std::env::current_dir()
                    .context("cannot resolve a relative namespace path")?
                    .join(p)
            })
        };
        Ok((absolute(net)?, user.map(absolute).transpose()?))
    }
}

/// What the front end adds to `hubnat run` (see `crate::run`).
pub(crate) struct Embedding {
    /// The configuration to start with, in place of a file.
    pub raw: RawConfig,
    /// The guest's side of the TAP (`--configure`).
    pub guest: Option<GuestSetup>,
    /// Called once the TAP is open and the runtime's threads exist, before the system-call
    /// filter (the front end's threads start here, inside the sandbox), to tell readiness.
    pub on_ready: Box<dyn FnOnce() -> Result<()>>,
}

impl Embedding {
    /// `embed`'s parts, for `run`.
    #[allow(clippy::type_complexity)]
    pub(crate) fn split(
        embed: Option<Embedding>,
    ) -> (
        Option<RawConfig>,
        Option<GuestSetup>,
        Option<Box<dyn FnOnce() -> Result<()>>>,
    ) {
        match embed {
            Some(e) => (Some(e.raw), e.guest, Some(e.on_ready)),
            None => (None, None, None),
        }
    }
}

/// Runs hubnat as the options say, until the exit descriptor or a signal stops it.
fn start(mut opts: Opts, control_flag: Option<PathBuf>) -> Result<()> {
    if opts.configure && opts.mac.is_none() {
        opts.mac = Some(random_mac());
    }
    let layout = opts.layout();
    if opts.disable_dns {
        eprintln!(
            "hubnat slirp4netns: --disable-dns: DHCP offers no DNS server; hubnat's relay still \
             answers at {} (it cannot be turned off)",
            layout.dns
        );
    }
    // Descriptors are checked before anything is made, and kept from the cleanup process.
    let ready = opts.ready_fd.map(ReadyFd::open).transpose()?;
    if let Some(fd) = opts.exit_fd {
        inherited(fd).with_context(|| format!("--exit-fd={fd}"))?;
        keep_from_children(fd);
    }
    let (netns, userns) = opts.namespaces()?;
    let base = match std::env::var_os(CONFIG_ENV) {
        Some(path) => machine::load_raw(Path::new(&path))
            .with_context(|| format!("{CONFIG_ENV}={}", Path::new(&path).display()))?,
        None => RawConfig::default(),
    };
    let raw = opts.raw_config(base);
    let dir = PrivateDir::create()?;
    let control = control_flag.unwrap_or_else(|| dir.path.join("hubnat.sock"));
    let api = match &opts.api_socket {
        Some(path) => Some(bind_api(path)?),
        None => None,
    };
    let mut argv: Vec<OsString> = ["hubnat", "run", "--tap", &opts.tap, "--state-dir"]
        .iter()
        .map(OsString::from)
        .collect();
    argv.push(dir.path.clone().into());
    argv.push("--netns".into());
    argv.push(netns.into());
    if let Some(u) = userns {
        argv.push("--userns".into());
        argv.push(u.into());
    }
    let args = match crate::Cli::try_parse_from(argv)
        .context("the arguments derived for hubnat run")?
        .command
    {
        crate::Command::Run(a) => *a,
        _ => bail!("the arguments derived for hubnat run are not `hubnat run`'s"),
    };
    let exit_fd = opts.exit_fd;
    let network = opts.network;
    let api_state = Api::new(ControlSocket(control.clone()), network.guest());
    let on_ready = Box::new(move || -> Result<()> {
        if let Some((listener, path)) = api {
            hubnat_runtime::spawn_running("slirp4netns-api", move || {
                serve_api(listener, api_state)
            })
            .context("cannot start the API socket's thread")?;
            tracing::info!("slirp4netns API socket {}", path.display());
        }
        if let Some(fd) = exit_fd {
            watch_exit_fd(fd)?;
        }
        tracing::info!(
            "slirp4netns front end: network {network}, gateway {}, DNS relay {}, guest {}{}",
            layout.gateway,
            layout.dns,
            network.guest(),
            match layout.loopback_alias {
                Some(a) => format!("; {a} reaches the host's loopback"),
                None => "; the host's loopback is not reachable".to_owned(),
            }
        );
        if let Some(r) = ready {
            r.signal()?;
        }
        Ok(())
    });
    let embed = Embedding {
        raw,
        guest: opts.guest_setup(),
        on_ready,
    };
    let result = crate::run(args, Some(control), Some(embed));
    // The cleanup process removes the directory once this process is gone; it may go now.
    drop(dir);
    result
}

/// Fails unless `fd` is an open descriptor of this process.
fn inherited(fd: RawFd) -> Result<()> {
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD)
        .map(|_| ())
        .map_err(|e| anyhow::anyhow!("descriptor {fd} is not open: {e}"))
}

/// Marks an inherited descriptor close-on-exec: the cleanup process must not hold the
/// launcher's pipes (a reader waiting for the ready pipe's end would wait for it too).
fn keep_from_children(fd: RawFd) {
    let _ = nix::fcntl::fcntl(
        fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
}

/// The ready descriptor (`-r`): "1" is written to it, and it is closed, once hubnat serves the
/// TAP (slirp4netns's readiness protocol).
struct ReadyFd {
    fd: RawFd,
    /// A duplicate of it in a descriptor this process owns (a file of its own, /dev/null, whose
    /// place it takes), written through std's safe file.
    file: File,
}

impl ReadyFd {
    fn open(fd: RawFd) -> Result<ReadyFd> {
        inherited(fd).with_context(|| format!("--ready-fd={fd}"))?;
        keep_from_children(fd);
        let file = File::open("/dev/null").context("cannot open /dev/null")?;
        nix::unistd::dup3(fd, file.as_raw_fd(), nix::fcntl::OFlag::O_CLOEXEC)
            .with_context(|| format!("--ready-fd={fd}: cannot duplicate it"))?;
        Ok(ReadyFd { fd, file })
    }

    fn signal(mut self) -> Result<()> {
        self.file
            .write_all(b"1")
            .with_context(|| format!("cannot write to --ready-fd={}", self.fd))?;
        drop(self.file);
        // The launcher's copy is the only one left: its reader sees the end.
        let _ = nix::unistd::close(self.fd);
        Ok(())
    }
}

/// Stops hubnat (as SIGTERM does) when `fd` becomes readable, hangs up or fails, on a thread
/// of its own; the poll is made here, before the system-call filter.
fn watch_exit_fd(fd: RawFd) -> Result<()> {
    let mut poll = mio::Poll::new().context("cannot watch --exit-fd")?;
    poll.registry()
        .register(
            &mut mio::unix::SourceFd(&fd),
            mio::Token(0),
            mio::Interest::READABLE,
        )
        .with_context(|| format!("cannot watch --exit-fd={fd}"))?;
    hubnat_runtime::spawn_running("slirp4netns-exit", move || {
        let mut events = mio::Events::with_capacity(4);
        loop {
            match poll.poll(&mut events, None) {
                Ok(()) if events.is_empty() => continue,
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("--exit-fd={fd}: cannot wait on it ({e}); stopping");
                    break;
                }
            }
        }
        tracing::info!("--exit-fd={fd} became readable or was closed: stopping");
        if let Err(e) = signal_hook::low_level::raise(signal_hook::consts::SIGTERM) {
            tracing::warn!("cannot stop: {e}");
        }
    })
    .context("cannot start the exit descriptor's thread")?;
    Ok(())
}

/// A directory of the front end's own (hubnat's state and control socket), removed when the
/// process is gone by a small process started for that: once sandboxed, hubnat may not remove
/// a directory from its parent.
struct PrivateDir {
    path: PathBuf,
    /// The cleanup process's standard input: it ends when this process does.
    _watch: Option<std::process::ChildStdin>,
}

impl PrivateDir {
    fn create() -> Result<PrivateDir> {
        use std::os::unix::fs::DirBuilderExt;
        use std::os::unix::process::CommandExt;
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .filter(|d| !d.is_empty() && !crate::is_root())
            .map(PathBuf::from)
            .filter(|d| d.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        let tag: u32 = {
            use rand::{Rng, SeedableRng};
            rand::rngs::SmallRng::from_os_rng().random()
        };
        let path = base.join(format!("{DIR_PREFIX}{}.{tag:08x}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let watch = std::env::current_exe().and_then(|exe| {
            let mut arg = OsString::from(format!("--{CLEANUP_OPTION}="));
            arg.push(&path);
            std::process::Command::new(exe)
                .arg0("hubnat")
                .arg("slirp4netns")
                .arg(arg)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null())
                .process_group(0)
                .spawn()
        });
        let watch = match watch {
            Ok(mut child) => child.stdin.take(),
            Err(e) => {
                eprintln!(
                    "hubnat slirp4netns: cannot start the process that removes {} at exit: {e}",
                    path.display()
                );
                None
            }
        };
        Ok(PrivateDir {
            path,
            _watch: watch,
        })
    }
}

/// The cleanup process: waits for its standard input to end (the front end is gone), then
/// removes the front end's private directory.
fn cleanup_watch(dir: &Path) {
    // A terminal's Ctrl-C or a launcher's SIGTERM to the group must not cut the cleanup short.
    let held = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ] {
        let _ = signal_hook::flag::register(sig, held.clone());
    }
    let mut sink = Vec::new();
    let _ = std::io::stdin().lock().read_to_end(&mut sink);
    let ours = dir
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with(DIR_PREFIX));
    let is_dir = std::fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir());
    if ours && is_dir {
        if let Err(e) = std::fs::remove_dir_all(dir) {
            eprintln!("hubnat slirp4netns: cannot remove {}: {e}", dir.display());
        }
    }
}

/// Binds the API socket (a stale file is replaced, as slirp4netns does).
fn bind_api(path: &Path) -> Result<(UnixListener, PathBuf)> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            bail!(
                "--api-socket={}: exists and is not a socket: not replaced",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("--api-socket={}: cannot replace it", path.display()))?;
    }
    let l = UnixListener::bind(path)
        .with_context(|| format!("--api-socket={}: cannot listen", path.display()))?;
    // Forwards open host ports: only the launcher's user may ask for them, as with hubnat's
    // control socket.
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .with_context(|| format!("--api-socket={}: cannot make it private", path.display()))?;
    Ok((l, path.to_owned()))
}

/// Serves the API socket: one connection at a time, one request each.
fn serve_api(listener: UnixListener, mut api: Api<ControlSocket>) {
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                if let Err(e) = answer_one(&mut api, stream) {
                    tracing::warn!("slirp4netns API: {e}");
                }
            }
            Err(e) => {
                tracing::warn!("slirp4netns API: cannot accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn answer_one(api: &mut Api<ControlSocket>, mut s: UnixStream) -> std::io::Result<()> {
    s.set_read_timeout(Some(API_TIMEOUT))?;
    s.set_write_timeout(Some(API_TIMEOUT))?;
    let answer = match read_request(&mut s)? {
        Some(req) => {
            // The client's bytes, escaped: they are not the log's to interpret.
            tracing::info!(
                "slirp4netns API request: {}",
                String::from_utf8_lossy(&req).trim().escape_debug()
            );
            api.answer(&req)
        }
        None => error_json("bad request: too large message"),
    };
    s.write_all(answer.as_bytes())?;
    let _ = s.shutdown(std::net::Shutdown::Both);
    Ok(())
}

/// Reads a request: until the client shuts its side (as slirp4netns asks), or until the bytes
/// so far are a whole JSON value (for clients that do not), or the timeout. None when it
/// reaches `API_REQUEST_MAX` bytes.
fn read_request(s: &mut impl Read) -> std::io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let n = match s.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break
            }
            Err(e) => return Err(e),
        };
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() >= API_REQUEST_MAX {
            return Ok(None);
        }
        if serde_json::from_slice::<Value>(&buf).is_ok() {
            break;
        }
    }
    Ok(Some(buf))
}

/// How the API reaches hubnat: one control-socket request, its result or error.
trait Hubnat {
    fn ask(&mut self, req: &Value) -> Result<Value, String>;
}

/// The front end's hubnat, through its control socket.
struct ControlSocket(PathBuf);

impl Hubnat for ControlSocket {
    fn ask(&mut self, req: &Value) -> Result<Value, String> {
        let fail = |e: std::io::Error| format!("hubnat's control socket: {e}");
        let mut s = UnixStream::connect(&self.0).map_err(fail)?;
        s.set_read_timeout(Some(CONTROL_TIMEOUT)).map_err(fail)?;
        s.set_write_timeout(Some(CONTROL_TIMEOUT)).map_err(fail)?;
        let mut line = req.to_string();
        line.push('\n');
        s.write_all(line.as_bytes()).map_err(fail)?;
        s.shutdown(std::net::Shutdown::Write).map_err(fail)?;
        let mut answer = String::new();
        BufReader::new(s.take(1 << 20))
            .read_line(&mut answer)
            .map_err(fail)?;
        let v: Value = serde_json::from_str(&answer)
            .map_err(|e| format!("hubnat's control socket: unreadable answer ({e})"))?;
        if v.get("ok").and_then(Value::as_bool) == Some(true) {
            Ok(v.get("result").cloned().unwrap_or(Value::Null))
        } else {
            Err(v
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("hubnat refused the request without a reason")
                .to_owned())
        }
    }
}

/// One forward made through the API, as slirp4netns lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct HostFwd {
    id: u32,
    udp: bool,
    host: SocketAddrV4,
    guest: SocketAddrV4,
}

impl HostFwd {
    fn proto(&self) -> &'static str {
        if self.udp {
            "udp"
        } else {
            "tcp"
        }
    }

    /// Whether hubnat's forward `row` (as `forward-list` shows it) is this one.
    fn is(&self, row: &Value) -> bool {
        let field = |k: &str| row.get(k).and_then(Value::as_str);
        field("proto").is_some_and(|p| p.eq_ignore_ascii_case(self.proto()))
            && field("listen").and_then(|l| l.parse().ok()) == Some(self.host)
            && field("to").and_then(|t| t.parse().ok()) == Some(self.guest)
    }
}

/// slirp4netns's API over hubnat's forwards. Its ids are its own (from 1, as slirp4netns
/// numbers them), so they stay what the client was told whatever hubnat numbers.
struct Api<H> {
    hubnat: H,
    /// The guest's address, where a forward leads when the request names none.
    guest: Ipv4Addr,
    next_id: u32,
    forwards: Vec<HostFwd>,
}

/// `{"error":{"desc":DESC}}`, as slirp4netns writes it.
fn error_json(desc: &str) -> String {
    format!(
        "{{\"error\":{{\"desc\":{}}}}}",
        serde_json::to_string(desc).unwrap_or_else(|_| "\"\"".into())
    )
}

/// A port number as slirp4netns takes it: a JSON number, integral, 1 to 65535.
fn port_arg(args: Option<&Value>, key: &str) -> Option<u16> {
    let n = args?.get(key)?.as_f64()?;
    (n.fract() == 0.0 && (1.0..=65535.0).contains(&n)).then_some(n as u16)
}

/// An IPv4 address argument: `default` when missing or empty, None when malformed.
fn addr_arg(args: Option<&Value>, key: &str, default: Ipv4Addr) -> Option<Ipv4Addr> {
    match args.and_then(|a| a.get(key)) {
        None | Some(Value::Null) => Some(default),
        Some(Value::String(s)) if s.is_empty() => Some(default),
        Some(Value::String(s)) => s.parse().ok(),
        Some(_) => None,
    }
}

impl<H: Hubnat> Api<H> {
    fn new(hubnat: H, guest: Ipv4Addr) -> Api<H> {
        Api {
            hubnat,
            guest,
            next_id: 1,
            forwards: Vec::new(),
        }
    }

    /// The answer to one request, byte for byte as slirp4netns 1.2 writes its own.
    fn answer(&mut self, req: &[u8]) -> String {
        let Ok(v) = serde_json::from_slice::<Value>(req) else {
            return error_json("bad request: cannot parse JSON");
        };
        if !v.is_object() {
            return error_json("bad request: json_object() failed");
        }
        let Some(execute) = v.get("execute").and_then(Value::as_str) else {
            return error_json("bad request: no execute found");
        };
        let args = v.get("arguments");
        match execute {
            "add_hostfwd" => self.add(args),
            "list_hostfwd" => self.list(),
            "remove_hostfwd" => self.remove(args),
            _ => error_json("bad request: unknown execute"),
        }
    }

    fn add(&mut self, args: Option<&Value>) -> String {
        let bad =
            |what: &str| error_json(&format!("bad request: add_hostfwd: bad arguments.{what}"));
        let udp = match args.and_then(|a| a.get("proto")).and_then(Value::as_str) {
            Some("tcp") => false,
            Some("udp") => true,
            _ => return bad("proto"),
        };
        let Some(host_addr) = addr_arg(args, "host_addr", Ipv4Addr::UNSPECIFIED) else {
            return bad("host_addr");
        };
        let Some(host_port) = port_arg(args, "host_port") else {
            return bad("host_port");
        };
        let Some(guest_addr) = addr_arg(args, "guest_addr", self.guest) else {
            return bad("guest_addr");
        };
        let Some(guest_port) = port_arg(args, "guest_port") else {
            return bad("guest_port");
        };
        let fwd = HostFwd {
            id: self.next_id,
            udp,
            host: SocketAddrV4::new(host_addr, host_port),
            guest: SocketAddrV4::new(guest_addr, guest_port),
        };
        let req = json!({
            "cmd": "forward-add",
            "proto": fwd.proto(),
            "listen": fwd.host.to_string(),
            "to": fwd.guest.to_string(),
        });
        match self.hubnat.ask(&req) {
            Ok(_) => {
                self.next_id += 1;
                let id = fwd.id;
                self.forwards.push(fwd);
                format!("{{\"return\":{{\"id\":{id}}}}}")
            }
            Err(e) => error_json(&format!("bad request: add_hostfwd: {e}")),
        }
    }

    /// slirp4netns 1.2 answers `{"entries":[...]}` without the `return` its manual shows;
    /// clients written against it read that, so it is kept.
    fn list(&self) -> String {
        let entries: Vec<String> = self
            .forwards
            .iter()
            .map(|f| {
                format!(
                    "{{\"id\":{},\"proto\":\"{}\",\"host_addr\":\"{}\",\"host_port\":{},\
                     \"guest_addr\":\"{}\",\"guest_port\":{}}}",
                    f.id,
                    f.proto(),
                    f.host.ip(),
                    f.host.port(),
                    f.guest.ip(),
                    f.guest.port()
                )
            })
            .collect();
        format!("{{\"entries\":[{}]}}", entries.join(","))
    }

    fn remove(&mut self, args: Option<&Value>) -> String {
        let id = args
            .and_then(|a| a.get("id"))
            .and_then(Value::as_f64)
            .filter(|n| n.fract() == 0.0);
        let Some(at) = id.and_then(|id| self.forwards.iter().position(|f| f.id as f64 == id))
        else {
            return error_json("bad request: remove_hostfwd: bad arguments.id");
        };
        let fwd = self.forwards[at].clone();
        let fail = |e: String| error_json(&format!("bad request: remove_hostfwd: {e}"));
        let listed = match self.hubnat.ask(&json!({"cmd": "forward-list"})) {
            Ok(v) => v,
            Err(e) => return fail(e),
        };
        let theirs = listed
            .as_array()
            .into_iter()
            .flatten()
            .filter(|row| fwd.is(row))
            .filter_map(|row| row.get("id").and_then(Value::as_u64))
            .max();
        // A forward someone removed through hubnat's own CLI is gone already: what was asked.
        if let Some(id) = theirs {
            if let Err(e) = self.hubnat.ask(&json!({"cmd": "forward-remove", "id": id})) {
                return fail(e);
            }
        }
        self.forwards.remove(at);
        "{\"return\":{}}".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    fn opts(s: &str) -> Opts {
        match parse(&args(s)) {
            Ok(Parsed::Run(o)) => *o,
            other => panic!("{s}: {other:?}"),
        }
    }

    fn refused(s: &str) -> String {
        match parse(&args(s)) {
            Err(e) => e,
            other => panic!("{s}: accepted as {other:?}"),
        }
    }

    #[test]
    fn podmans_command_line() {
        // podman 4.3, rootful, with a published port through the API socket.
        let o = opts(
            "--disable-host-loopback --mtu=65520 --enable-sandbox --enable-seccomp \
             --enable-ipv6 -c -e 3 -r 4 --api-socket /run/libpod/abc.net \
             --netns-type=path /run/netns/netns-1234 tap0",
        );
        assert!(o.configure && o.disable_host_loopback && o.enable_ipv6);
        assert_eq!((o.exit_fd, o.ready_fd, o.mtu), (Some(3), Some(4), 65520));
        assert_eq!(o.api_socket, Some(PathBuf::from("/run/libpod/abc.net")));
        assert_eq!(o.netns_type, NetnsType::Path);
        assert_eq!(o.target, "/run/netns/netns-1234");
        assert_eq!(o.tap, "tap0");
        assert_eq!(o.network, Network::parse("10.0.2.0/24").unwrap());
        // Rootless podman after the container started: a PID, and a CIDR of its own.
        let o = opts("--mtu=1500 --cidr=10.5.0.0/16 -c -e 3 -r 4 4242 tap0");
        assert_eq!((o.netns_type, o.target.as_str()), (NetnsType::Pid, "4242"));
        assert_eq!(o.network.to_string(), "10.5.0.0/16");
    }

    #[test]
    fn rootlesskits_command_line() {
        let o = opts(
            "--mtu 65520 -r 3 --disable-host-loopback --cidr 10.0.2.0/24 --api-socket /x.sock \
             --enable-sandbox --enable-seccomp 1234 tap0",
        );
        assert_eq!((o.mtu, o.ready_fd, o.configure), (65520, Some(3), false));
        assert_eq!(o.api_socket, Some(PathBuf::from("/x.sock")));
    }

    #[test]
    fn getopt_forms() {
        let o = opts("-ce3 -r4 -m1400 -6 -a/s.sock 99");
        assert!(o.configure && o.enable_ipv6);
        assert_eq!((o.exit_fd, o.ready_fd, o.mtu), (Some(3), Some(4), 1400));
        assert_eq!(o.api_socket, Some(PathBuf::from("/s.sock")));
        assert_eq!(o.tap, "tap0", "TAPNAME defaults to tap0");
        let o = opts("--exit-fd=5 --ready-fd 6 --userns-path=/proc/9/ns/user 9 eth0");
        assert_eq!((o.exit_fd, o.ready_fd), (Some(5), Some(6)));
        assert_eq!(o.userns_path, Some(PathBuf::from("/proc/9/ns/user")));
        // Operands first, then options; `--` ends the options.
        let o = opts("9 eth0 -c --macaddress=02:00:00:00:00:01");
        assert_eq!(o.mac, Some([2, 0, 0, 0, 0, 1]));
        assert_eq!(opts("-c -- 9 -x").tap, "-x");
        assert_eq!(opts("--target-type=netns 9").target, "9");
        assert_eq!(parse(&args("-c --help 9")), Ok(Parsed::Help));
        assert_eq!(parse(&args("-v")), Ok(Parsed::Version));
        assert_eq!(parse(&args("--version")), Ok(Parsed::Version));
    }

    #[test]
    fn bad_values_are_refused_with_the_option_named() {
        for (line, named) in [
            ("--mtu=abc 1", "--mtu=abc"),
            ("--mtu=65521 1", "--mtu=65521"),
            ("-m 100 1", "--mtu=100"),
            ("-e abc 1", "--exit-fd=abc"),
            ("--ready-fd=-1 1", "--ready-fd=-1"),
            ("--cidr=10.0.2.0/26 1", "--cidr=10.0.2.0/26"),
            ("--cidr=foo 1", "--cidr=foo"),
            ("--cidr=10.0.2.300/24 1", "--cidr=10.0.2.300/24"),
            ("--netns-type=foo 1", "--netns-type=foo"),
            ("--outbound-addr=1.2.3.4 1", "--outbound-addr=1.2.3.4"),
            ("--outbound-addr6=::1 1", "--outbound-addr6=::1"),
            ("-c --macaddress=zz 1", "--macaddress=zz"),
            (
                "-c --macaddress=01:00:5e:00:00:01 1",
                "--macaddress=01:00:5e:00:00:01",
            ),
            ("--macaddress=02:00:00:00:00:01 1", "--macaddress"),
            ("--target-type=bess /tmp/s", "--target-type=bess"),
            ("--target-type=foo 1", "--target-type=foo"),
            ("--bogus 1", "'--bogus'"),
            ("-x 1", "'x'"),
            ("--configure=1 1", "'--configure'"),
            ("--exit-fd", "'--exit-fd'"),
            ("-e", "'e'"),
            ("abc tap0", "PID `abc`"),
            ("0 tap0", "PID `0`"),
            ("1 tap0 extra", "too many arguments"),
            ("1 averyveryverylongname", "TAPNAME"),
            ("", "target is missing"),
        ] {
            let e = refused(line);
            assert!(e.contains(named), "{line}: {e}");
        }
        assert!(refused("--outbound-addr=1.2.3.4 1").contains("not supported"));
    }

    #[test]
    fn help_and_version_say_what_podman_and_rootlesskit_look_for() {
        let help = format!("{USAGE}\n{}", help_notes());
        for opt in [
            "--netns-type",
            "--userns-path",
            "--disable-host-loopback",
            "--mtu",
            "--enable-sandbox",
            "--enable-seccomp",
            "--enable-ipv6",
            "--cidr",
            "--api-socket",
            "--configure",
            "--exit-fd",
            "--ready-fd",
            "--macaddress",
            "--disable-dns",
        ] {
            assert!(help.contains(opt), "{opt} missing from the help");
        }
        // podman passes --outbound-addr only where the help shows it: it is refused here, so
        // the help must not claim it (nor --outbound-addr6, which contains it).
        assert!(!help.contains("--outbound-addr"));
        let version = version_text();
        let first = version.lines().next().unwrap();
        assert!(first.starts_with("slirp4netns version 1.2.0"), "{first}");
        let number = first.split_whitespace().nth(2).unwrap();
        assert_eq!(number.split('.').count(), 3);
        assert!(number.split('.').all(|p| p.parse::<u32>().is_ok()));
    }

    #[test]
    fn the_network_follows_the_cidr_and_the_loopback_choice() {
        // slirp4netns's own layout: the gateway is the host's loopback, DNS at + 3.
        let o = opts("-c 1");
        let raw = o.raw_config(RawConfig::default());
        assert_eq!(raw.host.ip.as_deref(), Some("10.0.2.3"));
        assert_eq!(raw.host.mask.as_deref(), Some("255.255.255.0"));
        assert_eq!(raw.nat.host_loopback.as_deref(), Some("10.0.2.2"));
        assert_eq!(raw.nat.mtu, Some(1500));
        assert_eq!(raw.dhcp.range_start.as_deref(), Some("10.0.2.100"));
        assert_eq!(raw.dhcp.range_end.as_deref(), Some("10.0.2.254"));
        assert_eq!(raw.dhcp.gateway.as_deref(), Some("10.0.2.2"));
        assert_eq!(raw.dhcp.dns, Some(vec!["10.0.2.3".to_owned()]));
        assert_eq!(
            o.guest_setup(),
            Some(GuestSetup {
                address: Ipv4Addr::new(10, 0, 2, 100),
                netmask: Ipv4Addr::new(255, 255, 255, 0),
                gateway: Some(Ipv4Addr::new(10, 0, 2, 2)),
                mac: None,
            })
        );
        assert_eq!(
            raw.dns.address.as_deref(),
            Some(""),
            "DNS at the virtual host's own"
        );
        // --disable-host-loopback: no loopback alias; the virtual host is the gateway and + 3
        // its DNS address.
        let o = opts("--disable-host-loopback --cidr=192.168.7.77/25 --mtu=9000 -c 1");
        let raw = o.raw_config(RawConfig::default());
        assert_eq!(raw.host.ip.as_deref(), Some("192.168.7.2"));
        assert_eq!(raw.host.mask.as_deref(), Some("255.255.255.128"));
        assert_eq!(raw.nat.host_loopback.as_deref(), Some(""));
        assert_eq!(raw.dns.address.as_deref(), Some("192.168.7.3"));
        assert_eq!(raw.dhcp.range_start.as_deref(), Some("192.168.7.100"));
        assert_eq!(raw.dhcp.range_end.as_deref(), Some("192.168.7.126"));
        assert_eq!(raw.dhcp.gateway.as_deref(), Some("192.168.7.2"));
        assert_eq!(raw.dhcp.dns, Some(vec!["192.168.7.3".to_owned()]));
        assert_eq!(raw.nat.mtu, Some(9000));
        // The configured guest's MAC and address are bound, and kept out of DHCP's range.
        let o = opts("-c --macaddress=02:00:00:00:00:64 1");
        let raw = o.raw_config(RawConfig::default());
        assert_eq!(
            raw.nat.bindings,
            Some(vec!["02:00:00:00:00:64 10.0.2.100".to_owned()])
        );
        assert_eq!(raw.dhcp.range_start.as_deref(), Some("10.0.2.101"));
        let mac = random_mac();
        assert_eq!(mac[0] & 0x03, 0x02, "unicast, locally administered");
        // A big network's range stays a /24's size.
        let o = opts("--cidr=10.8.0.0/8 1");
        let raw = o.raw_config(RawConfig::default());
        assert_eq!(raw.dhcp.range_end.as_deref(), Some("10.0.0.254"));
        assert_eq!(o.guest_setup(), None, "no --configure, no addressing");
        // --disable-dns: DHCP offers no server.
        let raw = opts("--disable-dns 1").raw_config(RawConfig::default());
        assert_eq!(raw.dhcp.dns, Some(vec![]));
        // IPv6 only with --enable-ipv6, on slirp4netns's fd00::/64.
        let machine = hubnat_core::config::Machine::default();
        let c = hubnat_core::config::Config::from_raw_on(&raw, &machine).unwrap();
        assert!(!c.ipv6.enabled);
        let raw = opts("--enable-ipv6 1").raw_config(RawConfig::default());
        let c = hubnat_core::config::Config::from_raw_on(&raw, &machine).unwrap();
        assert!(c.ipv6.enabled);
        assert_eq!(c.ipv6.ip, "fd00::2".parse::<std::net::Ipv6Addr>().unwrap());
        assert_eq!(c.ipv6.dns, vec![c.ipv6.ip]);
        // Each layout is a configuration hubnat accepts.
        for line in [
            "1",
            "--disable-host-loopback 1",
            "--cidr=172.16.0.0/12 1",
            "-c --macaddress=02:00:00:00:00:64 --disable-host-loopback 1",
        ] {
            let o = opts(line);
            let raw = o.raw_config(RawConfig::default());
            let machine = hubnat_core::config::Machine::default();
            let c = hubnat_core::config::Config::from_raw_on(&raw, &machine)
                .unwrap_or_else(|e| panic!("{line}: {e}"));
            // The relay answers at + 3 either way, and DHCP says so.
            let dns = o.network.nth(3);
            assert!(c.host_addresses().contains(&dns), "{line}");
            assert_eq!(c.dhcp.dns, vec![dns], "{line}");
            assert_eq!(c.dhcp.gateway, Some(o.network.gateway()), "{line}");
        }
    }

    #[test]
    fn namespaces_are_found_as_slirp4netns_finds_them() {
        let me = std::process::id().to_string();
        let (net, user) = opts(&me).namespaces().unwrap();
        assert_eq!(net, PathBuf::from(format!("/proc/{me}/ns/net")));
        assert_eq!(user, Some(PathBuf::from(format!("/proc/{me}/ns/user"))));
        let (net, user) = opts("--netns-type=path /proc/self/ns/net")
            .namespaces()
            .unwrap();
        assert_eq!((net, user), (PathBuf::from("/proc/self/ns/net"), None));
        let e = opts("--netns-type=path /nonexistent/netns").namespaces();
        assert!(format!("{:#}", e.unwrap_err()).contains("existing path expected"));
        let e = opts("999999999").namespaces();
        assert!(format!("{:#}", e.unwrap_err()).contains("no such process"));
    }

    /// A scripted hubnat: records requests, answers from its own forward table.
    #[derive(Default)]
    struct FakeHubnat {
        asked: Vec<Value>,
        rows: Vec<Value>,
        refuse: Option<String>,
    }

    impl Hubnat for FakeHubnat {
        fn ask(&mut self, req: &Value) -> Result<Value, String> {
            self.asked.push(req.clone());
            if let Some(e) = &self.refuse {
                return Err(e.clone());
            }
            match req["cmd"].as_str().unwrap() {
                "forward-add" => {
                    let id = self.rows.len() as u64 + 7;
                    let mut row = req.clone();
                    row.as_object_mut().unwrap().remove("cmd");
                    row["id"] = json!(id);
                    self.rows.push(row);
                    Ok(Value::Array(self.rows.clone()))
                }
                "forward-list" => Ok(Value::Array(self.rows.clone())),
                "forward-remove" => {
                    let id = req["id"].as_u64().unwrap();
                    self.rows.retain(|r| r["id"].as_u64() != Some(id));
                    Ok(Value::Array(self.rows.clone()))
                }
                other => Err(format!("unknown command {other}")),
            }
        }
    }

    fn api() -> Api<FakeHubnat> {
        Api::new(FakeHubnat::default(), Ipv4Addr::new(10, 0, 2, 100))
    }

    #[test]
    fn api_requests_become_forwards_and_answers_match_slirp4netns() {
        let mut a = api();
        // As podman sends it: guest_addr empty, a newline after the object.
        let add = br#"{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_addr":"0.0.0.0","host_port":8080,"guest_addr":"","guest_port":80}}
"#;
        assert_eq!(a.answer(add), r#"{"return":{"id":1}}"#);
        assert_eq!(
            a.hubnat.asked[0],
            json!({"cmd": "forward-add", "proto": "tcp", "listen": "0.0.0.0:8080", "to": "10.0.2.100:80"})
        );
        let add = br#"{"execute": "add_hostfwd", "arguments": {"proto": "udp", "host_addr": "127.0.0.1", "host_port": 5353, "guest_addr": "10.0.2.5", "guest_port": 53}}"#;
        assert_eq!(a.answer(add), r#"{"return":{"id":2}}"#);
        // host_addr left out: every address.
        let add = br#"{"execute": "add_hostfwd", "arguments": {"proto": "tcp", "host_port": 2222, "guest_port": 22}}"#;
        assert_eq!(a.answer(add), r#"{"return":{"id":3}}"#);
        assert_eq!(
            a.answer(br#"{"execute": "list_hostfwd"}"#),
            concat!(
                r#"{"entries":[{"id":1,"proto":"tcp","host_addr":"0.0.0.0","host_port":8080,"guest_addr":"10.0.2.100","guest_port":80},"#,
                r#"{"id":2,"proto":"udp","host_addr":"127.0.0.1","host_port":5353,"guest_addr":"10.0.2.5","guest_port":53},"#,
                r#"{"id":3,"proto":"tcp","host_addr":"0.0.0.0","host_port":2222,"guest_addr":"10.0.2.100","guest_port":22}]}"#
            )
        );
        // The API's id 2 is hubnat's 8: the right one is removed.
        assert_eq!(
            a.answer(br#"{"execute": "remove_hostfwd", "arguments": {"id": 2}}"#),
            r#"{"return":{}}"#
        );
        assert_eq!(
            a.hubnat.asked.last().unwrap(),
            &json!({"cmd": "forward-remove", "id": 8})
        );
        assert_eq!(a.hubnat.rows.len(), 2);
        assert_eq!(
            a.answer(br#"{"execute": "remove_hostfwd", "arguments": {"id": 2}}"#),
            r#"{"error":{"desc":"bad request: remove_hostfwd: bad arguments.id"}}"#
        );
        assert_eq!(
            a.answer(br#"{"execute": "list_hostfwd"}"#),
            concat!(
                r#"{"entries":[{"id":1,"proto":"tcp","host_addr":"0.0.0.0","host_port":8080,"guest_addr":"10.0.2.100","guest_port":80},"#,
                r#"{"id":3,"proto":"tcp","host_addr":"0.0.0.0","host_port":2222,"guest_addr":"10.0.2.100","guest_port":22}]}"#
            )
        );
        // Removed behind the API's back: removing it is still what was asked.
        a.hubnat.rows.clear();
        assert_eq!(
            a.answer(br#"{"execute": "remove_hostfwd", "arguments": {"id": 1}}"#),
            r#"{"return":{}}"#
        );
        let empty = Api::new(FakeHubnat::default(), Ipv4Addr::new(10, 0, 2, 100));
        assert_eq!(empty.list(), r#"{"entries":[]}"#);
    }

    #[test]
    fn bad_api_requests_get_slirp4netns_errors() {
        let mut a = api();
        let err = |d: &str| format!(r#"{{"error":{{"desc":"{d}"}}}}"#);
        for (req, desc) in [
            (&b"garbage"[..], "bad request: cannot parse JSON"),
            (b"[1]", "bad request: json_object() failed"),
            (b"{}", "bad request: no execute found"),
            (br#"{"execute": 1}"#, "bad request: no execute found"),
            (br#"{"execute": "foo"}"#, "bad request: unknown execute"),
            (
                br#"{"execute": "add_hostfwd"}"#,
                "bad request: add_hostfwd: bad arguments.proto",
            ),
            (
                br#"{"execute": "add_hostfwd", "arguments": {"proto": "sctp", "host_port": 1, "guest_port": 1}}"#,
                "bad request: add_hostfwd: bad arguments.proto",
            ),
            (
                br#"{"execute": "add_hostfwd", "arguments": {"proto": "tcp", "host_addr": "x", "host_port": 1, "guest_port": 1}}"#,
                "bad request: add_hostfwd: bad arguments.host_addr",
            ),
            (
                br#"{"execute": "add_hostfwd", "arguments": {"proto": "tcp", "host_port": 0, "guest_port": 1}}"#,
                "bad request: add_hostfwd: bad arguments.host_port",
            ),
            (
                br#"{"execute": "add_hostfwd", "arguments": {"proto": "tcp", "host_port": 70000, "guest_port": 1}}"#,
                "bad request: add_hostfwd: bad arguments.host_port",
            ),
            (
                br#"{"execute": "add_hostfwd", "arguments": {"proto": "tcp", "host_port": "80", "guest_port": 1}}"#,
                "bad request: add_hostfwd: bad arguments.host_port",
            ),
            (
                br#"{"execute": "add_hostfwd", "arguments": {"proto": "tcp", "host_port": 1, "guest_addr": "::1", "guest_port": 1}}"#,
                "bad request: add_hostfwd: bad arguments.guest_addr",
            ),
            (
                br#"{"execute": "add_hostfwd", "arguments": {"proto": "tcp", "host_port": 1}}"#,
                "bad request: add_hostfwd: bad arguments.guest_port",
            ),
            (
                br#"{"execute": "remove_hostfwd"}"#,
                "bad request: remove_hostfwd: bad arguments.id",
            ),
        ] {
            assert_eq!(a.answer(req), err(desc), "{}", String::from_utf8_lossy(req));
        }
        assert!(a.hubnat.asked.is_empty(), "nothing bad reached hubnat");
        // hubnat's refusal (a port taken, forwards not there) is the client's error, quoted.
        a.hubnat.refuse = Some("cannot listen on 0.0.0.0:80: \"in use\"".into());
        assert_eq!(
            a.answer(br#"{"execute": "add_hostfwd", "arguments": {"proto": "tcp", "host_port": 80, "guest_port": 80}}"#),
            r#"{"error":{"desc":"bad request: add_hostfwd: cannot listen on 0.0.0.0:80: \"in use\""}}"#
        );
        assert_eq!(
            a.list(),
            r#"{"entries":[]}"#,
            "a refused forward is not listed"
        );
    }

    #[test]
    fn requests_are_read_whole_and_bounded() {
        let mut whole: &[u8] = br#"{"execute": "list_hostfwd"}"#;
        assert_eq!(
            read_request(&mut whole).unwrap().unwrap(),
            br#"{"execute": "list_hostfwd"}"#
        );
        let big = vec![b' '; API_REQUEST_MAX];
        assert_eq!(read_request(&mut &big[..]).unwrap(), None);
        // A client that does not shut its side down is answered once its object is whole.
        let (mut client, mut server) = UnixStream::pair().unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        client.write_all(br#"{"execute": "list_hostfwd"}"#).unwrap();
        let t = std::time::Instant::now();
        assert!(read_request(&mut server).unwrap().is_some());
        assert!(t.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn the_api_socket_answers_over_a_real_socket() {
        let dir = std::env::temp_dir().join(format!("hubnat-s4-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let result = std::panic::catch_unwind(|| {
            // A stale socket file is replaced; anything else is not.
            let _stale = UnixListener::bind(&path).unwrap();
            let (listener, _) = bind_api(&path).unwrap();
            let mode = std::os::unix::fs::PermissionsExt::mode(
                &std::fs::metadata(&path).unwrap().permissions(),
            );
            assert_eq!(mode & 0o777, 0o600, "the API socket is the launcher's only");
            let notsock = dir.join("file");
            std::fs::write(&notsock, "x").unwrap();
            assert!(bind_api(&notsock).is_err());
            // No control socket behind it: an add fails with hubnat's reason.
            let api = Api::new(
                ControlSocket(dir.join("none.sock")),
                Ipv4Addr::new(10, 0, 2, 100),
            );
            std::thread::spawn(move || serve_api(listener, api));
            for (req, want) in [
                (
                    r#"{"execute": "list_hostfwd"}"#,
                    r#"{"entries":[]}"#.to_owned(),
                ),
                (
                    r#"{"execute": "add_hostfwd", "arguments": {"proto": "tcp", "host_port": 8080, "guest_port": 80}}"#,
                    String::new(),
                ),
            ] {
                let mut s = UnixStream::connect(&path).unwrap();
                s.write_all(req.as_bytes()).unwrap();
                s.shutdown(std::net::Shutdown::Write).unwrap();
                let mut got = String::new();
                s.read_to_string(&mut got).unwrap();
                if want.is_empty() {
                    assert!(
                        got.starts_with(
                            r#"{"error":{"desc":"bad request: add_hostfwd: hubnat's control socket"#
                        ),
                        "{got}"
                    );
                } else {
                    assert_eq!(got, want);
                }
            }
        });
        let _ = std::fs::remove_dir_all(&dir);
        if let Err(p) = result {
            std::panic::resume_unwind(p);
        }
    }
}
