//! Configuration: the seed's SecureNAT settings as a TOML file.
//!
//! The file is read into a loose `RawConfig` (every field optional, strings as written) and then
//! validated into `Config`, whose fields are typed and checked. Validation is one place so that
//! the file, the control socket and SIGHUP all refuse the same mistakes with the same words: each
//! error names the field as it is written in the file.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// An Ethernet MAC address, written `00:AC:12:34:56:78` (`-` separators are accepted too).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// The broadcast address, ff:ff:ff:ff:ff:ff.
    pub const BROADCAST: Mac = Mac([0xff; 6]);

    /// The seed's default: six bytes of which the first two are 00:AC and the rest random.
    pub fn random_secure_nat(random: [u8; 4]) -> Mac {
        Mac([0x00, 0xAC, random[0], random[1], random[2], random[3]])
    }

    /// The form the seed's log lines use: `00-AC-85-40-B5-50`.
    pub fn dashed(&self) -> String {
        let b = self.0;
        format!(
            "{:02X}-{:02X}-{:02X}-{:02X}-{:02X}-{:02X}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl std::str::FromStr for Mac {
    type Err = ();
    fn from_str(s: &str) -> Result<Mac, ()> {
        let parts: Vec<&str> = s.split([':', '-']).collect();
        if parts.len() != 6 {
            return Err(());
        }
        let mut mac = [0u8; 6];
        for (i, p) in parts.iter().enumerate() {
            if p.len() != 2 {
                return Err(());
            }
            mac[i] = u8::from_str_radix(p, 16).map_err(|_| ())?;
        }
        Ok(Mac(mac))
    }
}

/// A static route pushed to DHCP clients with option 121 (RFC 3442).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct StaticRoute {
    pub(crate) dest: Ipv4Addr,
    pub(crate) prefix_len: u8,
    pub(crate) gateway: Ipv4Addr,
}

impl fmt::Display for StaticRoute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} via {}", self.dest, self.prefix_len, self.gateway)
    }
}

/// What the virtual host does with an ICMP echo request for another host (seed 3.7.4).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IcmpMode {
    /// Answer every echo request with a dummy reply, as SecureNAT does.
    Dummy,
    /// Send it through an ICMP socket and relay the real answer (or its absence).
    Real,
    /// Real where the system allows ICMP sockets, else dummy.
    Auto,
}

/// The virtual host: its MAC and its address on the virtual network.
#[derive(Clone, PartialEq, Debug)]
pub struct HostConfig {
    /// `None` until the runtime has chosen (and stored) the random default.
    pub mac: Option<Mac>,
    /// The virtual host's address (default 192.168.30.1).
    pub ip: Ipv4Addr,
    /// The virtual network's mask (default 255.255.255.0).
    pub mask: Ipv4Addr,
}

/// The user-mode NAT: its switch, timeouts and limits, and who may send what.
#[derive(Clone, PartialEq, Debug)]
pub struct NatConfig {
    /// Whether the NAT carries the guests' traffic to the sock side (default on).
    pub enabled: bool,
    /// Largest IP packet on the segment (the Ethernet payload), as the seed defines it.
    pub mtu: u16,
    /// How long an idle TCP session is kept (default 7200 s).
    pub tcp_timeout: Duration,
    /// How long an idle UDP session is kept (default 600 s).
    pub udp_timeout: Duration,
    /// How long a sock-side TCP connect may take before the guest is refused (default 30 s).
    pub tcp_connect_timeout: Duration,
    /// What is done with echo requests for other hosts (default `auto`).
    pub icmp: IcmpMode,
    /// Most NAT sessions at once (default 65536, held below the machine's socket budget).
    pub max_sessions: usize,
    /// Most NAT sessions one guest may hold at once (default 4096).
    pub max_sessions_per_guest: usize,
    /// Most TCP connections whose sock-side connect is still in progress (default 1024).
    pub max_half_open: usize,
    /// An address of the virtual network that stands for the host's 127.0.0.1 (off by default).
    pub host_loopback: Option<Ipv4Addr>,
    /// The operator's egress rules, in order (`nat::policy`); before the refused defaults.
    pub egress: Vec<crate::nat::policy::Rule>,
    /// How guests' source addresses are bound to their MACs (`vhost::bindings`).
    pub source_check: crate::vhost::bindings::SourceCheck,
    /// New sessions a guest may open per second (a one-second burst); 0: no limit.
    pub new_sessions_per_second: u32,
    /// TCP connections one guest may have connecting at once (its share of `max_half_open`).
    pub max_half_open_per_guest: usize,
    /// MiB of TCP receive rings (out-of-order and unsent guest data) one thread's connections
    /// may hold (default 256).
    pub reassembly_mib: usize,
    /// MiB of those rings one guest's connections may hold (default 32).
    pub reassembly_per_guest_mib: usize,
    /// Static bindings: these addresses only from these MACs.
    pub bindings: Vec<(Mac, Ipv4Addr)>,
}

/// The virtual DHCP server: the address range and what the clients are told.
#[derive(Clone, PartialEq, Debug)]
pub struct DhcpConfig {
    /// Whether the virtual host answers DHCP (default on).
    pub enabled: bool,
    /// First address handed out (default 192.168.30.10).
    pub range_start: Ipv4Addr,
    /// Last address handed out (default 192.168.30.200).
    pub range_end: Ipv4Addr,
    /// The mask given to the clients (default 255.255.255.0).
    pub mask: Ipv4Addr,
    /// The lease time granted (default 7200 s).
    pub lease: Duration,
    /// The router given to the clients (default the virtual host; `None`: option left out).
    pub gateway: Option<Ipv4Addr>,
    /// Zero, one or two servers (option 6).
    pub dns: Vec<Ipv4Addr>,
    /// The domain name given to the clients (default the machine's domain; `None`: left out).
    pub domain: Option<String>,
    /// Static routes given to the clients (option 121; default none).
    pub routes: Vec<StaticRoute>,
    /// Only a client's own messages are served: the client hardware address must be the
    /// frame's Ethernet source (default true).
    pub check_chaddr: bool,
    /// The domain search list (option 119; default the `domain`, if any).
    pub search: Vec<String>,
    /// NTP servers given to the clients (option 42; default none).
    pub ntp: Vec<Ipv4Addr>,
    /// Static reservations: each MAC always gets its address, which no other MAC gets.
    pub reservations: Vec<crate::vhost::dhcp::Reservation>,
}

/// The DNS relay: where the virtual host forwards the guests' queries.
#[derive(Clone, PartialEq, Debug)]
pub struct DnsConfig {
    /// Upstream resolvers; empty means "read /etc/resolv.conf at start".
    pub upstream: Vec<SocketAddr>,
    /// How long an upstream has to answer before the next one is tried (default 5 s).
    pub query_timeout: Duration,
    /// A second address of the virtual host, for DNS (default none): it answers ARP, ping and
    /// DNS there as at its own address, so that guests can be told a resolver apart from their
    /// gateway (slirp4netns's 10.0.2.3).
    pub address: Option<Ipv4Addr>,
    /// Names the relay answers itself (`[dns] hosts`), as written, in the file's order.
    pub hosts: Vec<(String, Ipv4Addr)>,
    /// A hosts(5) file read by the daemon at start and on reload (`[dns] hosts_file`).
    pub hosts_file: Option<PathBuf>,
    /// The names the daemon read from `hosts_file` (validated as `hosts` is).
    pub hosts_from_file: Vec<(String, Ipv4Addr)>,
}

/// How DHCPv6 serves the guests (`ipv6.dhcpv6`).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dhcpv6Mode {
    /// No DHCPv6: the router advertisements alone (SLAAC, RDNSS, DNSSL) configure the guests.
    Off,
    /// Information only (RFC 8415 section 6.1): DNS servers and the search list; addresses
    /// by SLAAC. The advertisements set the O flag.
    #[default]
    Stateless,
    /// Addresses leased from `ipv6.range_start..=range_end` as well (the M flag); SLAAC stays
    /// offered, so a guest without a DHCPv6 client still gets an address.
    Stateful,
}

/// The virtual host on IPv6: its addresses, its router advertisements and DHCPv6.
#[derive(Clone, PartialEq, Debug)]
pub struct Ipv6Config {
    /// Whether the virtual host serves IPv6 at all (default on); off, IPv6 frames are dropped
    /// as foreign, as before.
    pub enabled: bool,
    /// The segment's /64 (default fd68:7562:6e61:1e::/64, a unique local prefix), advertised
    /// for SLAAC. Only the first 64 bits are set.
    pub prefix: Ipv6Addr,
    /// The virtual host's address in the prefix (default the prefix's ::1). Its link-local
    /// address is derived from its MAC.
    pub ip: Ipv6Addr,
    /// The longest time between unsolicited router advertisements (default 200 s); each is
    /// sent after a random time between a third of it and it (RFC 4861 6.2.1).
    pub ra_interval: Duration,
    /// The router lifetime advertised (default 1800 s; 0 says "not a default router").
    pub router_lifetime: Duration,
    /// How DHCPv6 serves (default stateless).
    pub dhcpv6: Dhcpv6Mode,
    /// First address a stateful DHCPv6 lease gets (default the prefix's ::1000).
    pub range_start: Ipv6Addr,
    /// Last address a stateful DHCPv6 lease gets (default the prefix's ::1fff).
    pub range_end: Ipv6Addr,
    /// DNS servers advertised (RDNSS and DHCPv6); default the virtual host's address.
    pub dns: Vec<Ipv6Addr>,
}

impl Ipv6Config {
    /// Whether `ip` is in the segment's /64.
    pub fn in_prefix(&self, ip: Ipv6Addr) -> bool {
        ip.segments()[..4] == self.prefix.segments()[..4]
    }
}

/// The security log's line format.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// `2012-12-06 15:44:52.557 SecureNAT: ...`, as the seed writes it.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// How the operator reaches a running instance: control socket, security log, metrics.
#[derive(Clone, PartialEq, Debug, Default)]
pub struct ControlConfig {
    /// `None`: the runtime's default path; `Some("")`: no control socket.
    pub socket: Option<PathBuf>,
    /// File the security log is appended to (default none).
    pub security_log: Option<PathBuf>,
    /// The security log's line format (default text).
    pub security_log_format: LogFormat,
    /// Loopback address of the Prometheus endpoint (default none: off).
    pub metrics: Option<SocketAddr>,
    /// Whether the security log resolves the host name of connections (default on).
    pub reverse_lookup: bool,
    /// The security log's size cap in bytes (it is rotated to FILE.1 there); None: no cap.
    pub security_log_max: Option<u64>,
    /// Log lines per second per kind of event, beyond which lines are counted and summarised
    /// instead of written; 0: no limit.
    pub log_rate: u32,
}

/// The whole, validated configuration.
#[derive(Clone, PartialEq, Debug)]
pub struct Config {
    /// SecureNAT as a whole: when off, the virtual host does not answer at all.
    pub enabled: bool,
    /// The virtual host's MAC and address.
    pub host: HostConfig,
    /// The NAT's settings.
    pub nat: NatConfig,
    /// The DHCP server's settings.
    pub dhcp: DhcpConfig,
    /// The DNS relay's settings.
    pub dns: DnsConfig,
    /// The virtual host on IPv6.
    pub ipv6: Ipv6Config,
    /// Where state that must survive a restart is kept (the chosen MAC, the lease table).
    pub state_dir: Option<PathBuf>,
    /// The operator's side: control socket, security log, metrics.
    pub control: ControlConfig,
    /// Ports forwarded into guests (listened on by the runtime).
    pub forwards: Vec<crate::forward::Forward>,
}

/// Why a configuration was refused; each error names the file or the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read configuration file {path}: {error}")]
    Read {
        /// The file's path.
        path: PathBuf,
        /// Why reading it failed.
        error: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("configuration file {path} is not valid TOML: {message}")]
    Parse {
        /// The file's path.
        path: PathBuf,
        /// The TOML parser's message.
        message: String,
    },
    /// A forward (`[[forward]]` number `index`, from 0) has a field that is refused.
    #[error("configuration field `forward[{index}].{field}`: {message}")]
    Forward {
        /// Which forward.
        index: usize,
        /// Its field (`listen`).
        field: &'static str,
        /// What is wrong with its value.
        message: String,
    },
    /// A static reservation (`[[dhcp.reservation]]` number `index`, from 0) has a field that
    /// is refused.
    #[error("configuration field `dhcp.reservation[{index}].{field}`: {message}")]
    Reservation {
        /// Which reservation.
        index: usize,
        /// Its field (`mac`, `ip`, `name`).
        field: &'static str,
        /// What is wrong with its value.
        message: String,
    },
    /// A field has a value that is refused.
    #[error("configuration field `{field}`: {message}")]
    Field {
        /// The field, as it is written in the file (`nat.mtu`).
        field: &'static str,
        /// What is wrong with its value.
        message: String,
    },
}

fn field_err(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Field {
        field,
        message: message.into(),
    }
}

/// The file as written: every field optional, so that a missing one takes its default.
#[derive(Clone, Default, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// SecureNAT as a whole (default on).
    pub enabled: Option<bool>,
    /// Directory for the state kept across restarts (default none).
    pub state_dir: Option<String>,
    /// The `[host]` table.
    #[serde(default)]
    pub host: RawHost,
    /// The `[nat]` table.
    #[serde(default)]
    pub nat: RawNat,
    /// The `[dhcp]` table.
    #[serde(default)]
    pub dhcp: RawDhcp,
    /// The `[dns]` table.
    #[serde(default)]
    pub dns: RawDns,
    /// The `[ipv6]` table.
    #[serde(default)]
    pub ipv6: RawIpv6,
    /// The `[control]` table.
    #[serde(default)]
    pub control: RawControl,
    /// The `[[forward]]` tables: ports forwarded into guests.
    #[serde(default, rename = "forward", skip_serializing_if = "Vec::is_empty")]
    pub forwards: Vec<crate::forward::RawForward>,
}

/// How the operator reaches a running instance (read at start; `hubnat run` flags override).
#[derive(Clone, Default, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawControl {
    /// Path of the control socket; `""` for none.
    pub socket: Option<String>,
    /// File the security log (target `securenat`) is appended to.
    pub security_log: Option<String>,
    /// `text` (the default) or `json`.
    pub security_log_format: Option<LogFormat>,
    /// Loopback address of the Prometheus endpoint, e.g. `127.0.0.1:9100`; off when missing.
    pub metrics: Option<String>,
    /// Resolve the host name of "connection successful" lines (off the data path).
    pub reverse_lookup: Option<bool>,
    /// The security log's size cap in MiB, at which it is rotated (one old file kept); 0: none.
    pub security_log_max_mib: Option<u64>,
    /// Log lines per second per kind of event (session created, DHCP entry, ...); 0: no limit.
    pub log_rate: Option<u32>,
}

/// The `[host]` table as written.
#[derive(Clone, Default, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawHost {
    /// The virtual host's MAC; missing, `""` or `auto`: a random 00:AC:... chosen once.
    pub mac: Option<String>,
    /// The virtual host's address (default 192.168.30.1).
    pub ip: Option<String>,
    /// The virtual network's mask (default 255.255.255.0).
    pub mask: Option<String>,
}

/// The `[nat]` table as written.
#[derive(Clone, Default, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawNat {
    /// Whether the NAT runs (default true).
    pub enabled: Option<bool>,
    /// Largest IP packet on the segment, 576 to 65520 (default 1500).
    pub mtu: Option<u32>,
    /// Idle TCP session timeout in seconds (default 7200).
    pub tcp_timeout: Option<u64>,
    /// Idle UDP session timeout in seconds (default 600).
    pub udp_timeout: Option<u64>,
    /// Sock-side TCP connect timeout in seconds (default 30).
    pub tcp_connect_timeout: Option<u64>,
    /// `dummy`, `real` or `auto` (the default).
    pub icmp: Option<IcmpMode>,
    /// Most NAT sessions at once (default 65536).
    pub max_sessions: Option<usize>,
    /// Most NAT sessions per guest (default 4096).
    pub max_sessions_per_guest: Option<usize>,
    /// Most TCP connects in progress at once (default 1024).
    pub max_half_open: Option<usize>,
    /// An address of the virtual network that stands for the host's 127.0.0.1; missing or `""`: none.
    pub host_loopback: Option<String>,
    /// Egress rules, `allow|deny CIDR [tcp|udp|icmp] [PORT|LOW-HIGH]`, first match wins.
    pub egress: Option<Vec<String>>,
    /// `learn` (the default), `lease` or `subnet`.
    pub source_check: Option<crate::vhost::bindings::SourceCheck>,
    /// New sessions a guest may open per second; 0: no limit.
    pub new_sessions_per_second: Option<u32>,
    /// A guest's share of `max_half_open`.
    pub max_half_open_per_guest: Option<usize>,
    /// MiB of TCP receive rings per thread.
    pub reassembly_mib: Option<usize>,
    /// MiB of TCP receive rings per guest (and thread).
    pub reassembly_per_guest_mib: Option<usize>,
    /// Static bindings, `"MAC IP"` each.
    pub bindings: Option<Vec<String>>,
}

/// The `[dhcp]` table as written.
#[derive(Clone, Default, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawDhcp {
    /// Whether the DHCP server runs (default true).
    pub enabled: Option<bool>,
    /// First address handed out (default 192.168.30.10).
    pub range_start: Option<String>,
    /// Last address handed out (default 192.168.30.200).
    pub range_end: Option<String>,
    /// The mask given to the clients (default 255.255.255.0).
    pub mask: Option<String>,
    /// Lease time in seconds (default 7200).
    pub lease: Option<u64>,
    /// `""` leaves the option out (seed 3.7.6).
    pub gateway: Option<String>,
    /// `[]` leaves the option out.
    pub dns: Option<Vec<String>>,
    /// `""` leaves the option out; missing means the host's own domain name.
    pub domain: Option<String>,
    /// `"10.1.0.0/16 via 192.168.30.254"`
    pub routes: Option<Vec<String>>,
    /// Refuse messages whose client hardware address is not the frame's Ethernet source.
    pub check_chaddr: Option<bool>,
    /// The domain search list; missing means `[domain]`, `[]` leaves the option out.
    pub search: Option<Vec<String>>,
    /// NTP servers (option 42); missing or `[]` leaves the option out.
    pub ntp: Option<Vec<String>>,
    /// The `[[dhcp.reservation]]` tables (last: TOML writes tables after the values).
    #[serde(default, rename = "reservation", skip_serializing_if = "Vec::is_empty")]
    pub reservations: Vec<crate::vhost::dhcp::RawReservation>,
}

/// The `[dns]` table as written.
#[derive(Clone, Default, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawDns {
    /// `"127.0.0.1"` or `"127.0.0.1:5353"`; missing means /etc/resolv.conf.
    pub upstream: Option<Vec<String>>,
    /// Seconds an upstream has to answer (default 5).
    pub query_timeout: Option<u64>,
    /// A second address of the virtual host, where it answers DNS; missing or `""`: none.
    pub address: Option<String>,
    /// Names answered by the relay itself: `{ "printer.lan" = "192.168.30.40" }`.
    pub hosts: Option<std::collections::BTreeMap<String, String>>,
    /// A hosts(5) file of more such names (IPv4 lines only); missing or `""`: none.
    pub hosts_file: Option<String>,
}

/// The `[ipv6]` table as written.
#[derive(Clone, Default, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawIpv6 {
    /// Whether the virtual host serves IPv6 (default true).
    pub enabled: Option<bool>,
    /// The segment's prefix, `ADDRESS/64` (default fd68:7562:6e61:1e::/64).
    pub prefix: Option<String>,
    /// The virtual host's address in the prefix (default the prefix's ::1).
    pub ip: Option<String>,
    /// Most seconds between unsolicited router advertisements, 4 to 1800 (default 200).
    pub ra_interval: Option<u64>,
    /// Router lifetime in seconds, 0 to 9000 (default 1800).
    pub router_lifetime: Option<u64>,
    /// `off`, `stateless` (the default) or `stateful`.
    pub dhcpv6: Option<Dhcpv6Mode>,
    /// First address of stateful DHCPv6 leases (default the prefix's ::1000).
    pub range_start: Option<String>,
    /// Last address of stateful DHCPv6 leases (default the prefix's ::1fff).
    pub range_end: Option<String>,
    /// DNS servers advertised; missing: the virtual host's address; `[]`: none.
    pub dns: Option<Vec<String>>,
}

/// The default `ipv6.prefix`: a unique local /64 (RFC 4193), fixed so that a guest's
/// addresses survive a restart.
pub const DEFAULT_IPV6_PREFIX: Ipv6Addr = Ipv6Addr::new(0xfd68, 0x7562, 0x6e61, 0x1e, 0, 0, 0, 0);

pub(crate) const DEFAULT_HOST_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 30, 1);
pub(crate) const DEFAULT_MASK: Ipv4Addr = Ipv4Addr::new(255, 255, 255, 0);
pub(crate) const DEFAULT_RANGE_START: Ipv4Addr = Ipv4Addr::new(192, 168, 30, 10);
pub(crate) const DEFAULT_RANGE_END: Ipv4Addr = Ipv4Addr::new(192, 168, 30, 200);
pub(crate) const MIN_MTU: u32 = 576;
/// The largest `nat.mtu` accepted, in bytes.
pub const MAX_MTU: u32 = 65520;

fn parse_ip(field: &'static str, v: &str) -> Result<Ipv4Addr, ConfigError> {
    v.trim()
        .parse()
        .map_err(|_| field_err(field, format!("`{v}` is not an IPv4 address")))
}

fn parse_mask(field: &'static str, v: &str) -> Result<Ipv4Addr, ConfigError> {
    let m = parse_ip(field, v)?;
    let bits = u32::from(m);
    if bits.leading_ones() + bits.trailing_zeros() != 32 || bits == 0 {
        return Err(field_err(field, format!("`{v}` is not a subnet mask")));
    }
    Ok(m)
}

/// An optional address where the empty string means "leave it out".
fn parse_blankable_ip(field: &'static str, v: &str) -> Result<Option<Ipv4Addr>, ConfigError> {
    if v.trim().is_empty() {
        Ok(None)
    } else {
        parse_ip(field, v).map(Some)
    }
}

fn parse_route(v: &str) -> Result<StaticRoute, ConfigError> {
    const F: &str = "dhcp.routes";
    let bad = || field_err(F, format!("`{v}` is not of the form `NET/LEN via GATEWAY`"));
    let mut words = v.split_whitespace();
    let (net, via, gw) = (words.next(), words.next(), words.next());
    let (Some(net), Some("via"), Some(gw), None) = (net, via, gw, words.next()) else {
        return Err(bad());
    };
    let (addr, len) = net.split_once('/').ok_or_else(bad)?;
    let dest: Ipv4Addr = addr.parse().map_err(|_| bad())?;
    let prefix_len: u8 = len.parse().map_err(|_| bad())?;
    if prefix_len > 32 {
        return Err(bad());
    }
    let gateway: Ipv4Addr = gw.parse().map_err(|_| bad())?;
    let mask = prefix_mask(prefix_len);
    if u32::from(dest) & !mask != 0 {
        return Err(field_err(
            F,
            format!("`{v}`: {dest} has bits set outside the /{prefix_len} prefix"),
        ));
    }
    Ok(StaticRoute {
        dest,
        prefix_len,
        gateway,
    })
}

pub(crate) fn prefix_mask(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - len as u32)
    }
}

pub(crate) fn parse_upstream(field: &'static str, v: &str) -> Result<SocketAddr, ConfigError> {
    let v = v.trim();
    if let Ok(sa) = v.parse::<SocketAddr>() {
        return Ok(sa);
    }
    let ip = parse_ip(field, v)?;
    Ok(SocketAddr::V4(SocketAddrV4::new(ip, 53)))
}

fn same_subnet(a: Ipv4Addr, b: Ipv4Addr, mask: Ipv4Addr) -> bool {
    let m = u32::from(mask);
    u32::from(a) & m == u32::from(b) & m
}

fn secs(field: &'static str, v: Option<u64>, default: u64) -> Result<Duration, ConfigError> {
    let v = v.unwrap_or(default);
    if v == 0 {
        return Err(field_err(field, "must be at least 1 second"));
    }
    Ok(Duration::from_secs(v))
}

impl Config {
    /// Every setting at the seed's default (the MAC still to be chosen by the caller).
    pub fn defaults() -> Config {
        Config::from_raw(&RawConfig::default()).expect("the defaults are valid")
    }

    /// Validates `raw` on a machine that offers no defaults of its own (tests, the replay).
    pub fn from_raw(raw: &RawConfig) -> Result<Config, ConfigError> {
        Config::from_raw_on(raw, &Machine::default())
    }

    /// Validates `raw`; what it leaves to the machine (the DHCP domain, the DNS relay's
    /// upstreams) comes from `machine`.
    pub fn from_raw_on(raw: &RawConfig, machine: &Machine) -> Result<Config, ConfigError> {
        let host = host_config(raw)?;
        let nat = nat_config(raw, &host, machine)?;
        let mut dhcp = dhcp_config(raw, &host, machine)?;
        let dns = dns_config(raw, &host, &nat, &dhcp, machine)?;
        if let (None, Some(a)) = (&raw.dhcp.dns, dns.address) {
            // An address set apart for DNS is the one guests are meant to use: DHCP offers it
            // unless `dhcp.dns` names servers of its own.
            dhcp.dns = vec![a];
        }
        let ipv6 = ipv6_config(raw)?;
        let control = control_config(raw)?;
        let forwards = crate::forward::validate_all(&raw.forwards)?;
        let mut cfg = Config {
            control,
            forwards,
            enabled: raw.enabled.unwrap_or(true),
            host,
            nat,
            dhcp,
            dns,
            ipv6,
            state_dir: raw.state_dir.as_ref().map(PathBuf::from),
        };
        // Last: a reserved address must be none that any other part gives or answers at.
        cfg.dhcp.reservations =
            crate::vhost::dhcp::reservation::validate_all(&raw.dhcp.reservations, &cfg)?;
        Ok(cfg)
    }

    pub(crate) fn in_subnet(&self, ip: Ipv4Addr) -> bool {
        same_subnet(ip, self.host.ip, self.host.mask)
    }

    /// Whether the virtual host itself answers at `ip`: its own address or the DNS address
    /// (the host-loopback alias is not the virtual host's: it stands for the machine's
    /// loopback, through the NAT).
    pub(crate) fn is_host_address(&self, ip: Ipv4Addr) -> bool {
        ip == self.host.ip || Some(ip) == self.dns.address
    }

    /// The virtual host's addresses, for a caller that must tell its frames from the NAT's at
    /// the cost of two comparisons: its own and the DNS address (its own again without one).
    pub fn host_addresses(&self) -> [Ipv4Addr; 2] {
        [self.host.ip, self.dns.address.unwrap_or(self.host.ip)]
    }
}

fn parse_ip6(field: &'static str, v: &str) -> Result<Ipv6Addr, ConfigError> {
    v.trim()
        .parse()
        .map_err(|_| field_err(field, format!("`{v}` is not an IPv6 address")))
}

/// `prefix`'s first 64 bits with `iid` as the last 64.
fn in_64(prefix: Ipv6Addr, iid: u64) -> Ipv6Addr {
    Ipv6Addr::from((u128::from(prefix) & !u128::from(u64::MAX)) | u128::from(iid))
}

/// `[ipv6]`: the virtual host's IPv6 side.
fn ipv6_config(raw: &RawConfig) -> Result<Ipv6Config, ConfigError> {
    let r = &raw.ipv6;
    let prefix = match r.prefix.as_deref().map(str::trim) {
        None => DEFAULT_IPV6_PREFIX,
        Some(v) => {
            let bad = |why: &str| field_err("ipv6.prefix", format!("`{v}`: {why}"));
            let (addr, len) = v.split_once('/').unwrap_or((v, "64"));
            let addr = parse_ip6("ipv6.prefix", addr)?;
            if len.trim() != "64" {
                return Err(bad(
                    "the prefix must be a /64 (SLAAC needs 64 bits of interface id)",
                ));
            }
            if u128::from(addr) & u128::from(u64::MAX) != 0 {
                return Err(bad("has bits set past the /64"));
            }
            let unicast = !(addr.is_multicast()
                || addr.is_unspecified()
                || addr.is_loopback()
                || addr.segments()[0] & 0xffc0 == 0xfe80);
            if !unicast {
                return Err(bad(
                    "must be a unicast prefix (not link-local, multicast or ::)",
                ));
            }
            addr
        }
    };
    let cfg = Ipv6Config {
        enabled: r.enabled.unwrap_or(true),
        prefix,
        ip: in_64(prefix, 1),
        ra_interval: secs("ipv6.ra_interval", r.ra_interval, 200)?,
        router_lifetime: Duration::from_secs(r.router_lifetime.unwrap_or(1800)),
        dhcpv6: r.dhcpv6.unwrap_or_default(),
        range_start: in_64(prefix, 0x1000),
        range_end: in_64(prefix, 0x1fff),
        dns: Vec::new(),
    };
    let in_prefix = |field: &'static str, v: &Option<String>, d: Ipv6Addr| match v {
        None => Ok(d),
        Some(v) => {
            let a = parse_ip6(field, v)?;
            if !cfg.in_prefix(a) || u128::from(a) & u128::from(u64::MAX) == 0 {
                return Err(field_err(
                    field,
                    format!("{a} is not a host address in {prefix}/64"),
                ));
            }
            Ok(a)
        }
    };
    let ip = in_prefix("ipv6.ip", &r.ip, cfg.ip)?;
    let range_start = in_prefix("ipv6.range_start", &r.range_start, cfg.range_start)?;
    let range_end = in_prefix("ipv6.range_end", &r.range_end, cfg.range_end)?;
    if range_start > range_end {
        return Err(field_err(
            "ipv6.range_end",
            format!("{range_end} is below ipv6.range_start {range_start}"),
        ));
    }
    if (range_start..=range_end).contains(&ip) {
        return Err(field_err(
            "ipv6.ip",
            format!("{ip} is inside the DHCPv6 range {range_start}..={range_end}"),
        ));
    }
    let ra = cfg.ra_interval.as_secs();
    if !(4..=1800).contains(&ra) {
        return Err(field_err(
            "ipv6.ra_interval",
            format!("{ra} is outside 4..=1800"),
        ));
    }
    let lifetime = cfg.router_lifetime.as_secs();
    if lifetime > 9000 {
        return Err(field_err(
            "ipv6.router_lifetime",
            format!("{lifetime} is above 9000 (RFC 4861)"),
        ));
    }
    let dns = match &r.dns {
        None => vec![ip],
        Some(list) => {
            if list.len() > 3 {
                return Err(field_err("ipv6.dns", "at most 3 servers"));
            }
            list.iter()
                .map(|v| parse_ip6("ipv6.dns", v))
                .collect::<Result<_, _>>()?
        }
    };
    Ok(Ipv6Config {
        ip,
        range_start,
        range_end,
        dns,
        ..cfg
    })
}

/// `[host]`: the virtual host's interface.
fn host_config(raw: &RawConfig) -> Result<HostConfig, ConfigError> {
    let mac = match raw.host.mac.as_deref().map(str::trim) {
        None | Some("") | Some("auto") => None,
        Some(s) => {
            let mac: Mac = s
                .parse()
                .map_err(|_| field_err("host.mac", format!("`{s}` is not a MAC address")))?;
            if mac.0[0] & 1 != 0 {
                return Err(field_err("host.mac", "a multicast MAC cannot be a host's"));
            }
            Some(mac)
        }
    };
    let host_ip = match &raw.host.ip {
        Some(v) => parse_ip("host.ip", v)?,
        None => DEFAULT_HOST_IP,
    };
    let host_mask = match &raw.host.mask {
        Some(v) => parse_mask("host.mask", v)?,
        None => DEFAULT_MASK,
    };
    Ok(HostConfig {
        mac,
        ip: host_ip,
        mask: host_mask,
    })
}

/// `[nat]`: the NAT's limits, policy and source binding, held below `machine`'s socket budget.
fn nat_config(
    raw: &RawConfig,
    host: &HostConfig,
    machine: &Machine,
) -> Result<NatConfig, ConfigError> {
    let (host_ip, host_mask) = (host.ip, host.mask);
    let mtu = raw.nat.mtu.unwrap_or(1500);
    if !(MIN_MTU..=MAX_MTU).contains(&mtu) {
        return Err(field_err(
            "nat.mtu",
            format!("{mtu} is outside {MIN_MTU}..={MAX_MTU}"),
        ));
    }
    let host_loopback = match raw.nat.host_loopback.as_deref() {
        None | Some("") => None,
        Some(v) => {
            let ip = parse_ip("nat.host_loopback", v)?;
            if !same_subnet(ip, host_ip, host_mask) || ip == host_ip {
                return Err(field_err(
                        "nat.host_loopback",
                        format!("{ip} must be an address of the virtual network other than the virtual host's"),
                    ));
            }
            Some(ip)
        }
    };
    let positive = |field: &'static str, v: Option<usize>, d: usize| match v.unwrap_or(d) {
        0 => Err(field_err(field, "must be at least 1")),
        n => Ok(n),
    };
    let mut nat = NatConfig {
        enabled: raw.nat.enabled.unwrap_or(true),
        mtu: mtu as u16,
        tcp_timeout: secs("nat.tcp_timeout", raw.nat.tcp_timeout, 7200)?,
        udp_timeout: secs("nat.udp_timeout", raw.nat.udp_timeout, 600)?,
        tcp_connect_timeout: secs("nat.tcp_connect_timeout", raw.nat.tcp_connect_timeout, 30)?,
        icmp: raw.nat.icmp.unwrap_or(IcmpMode::Auto),
        max_sessions: positive("nat.max_sessions", raw.nat.max_sessions, 65536)?,
        max_sessions_per_guest: positive(
            "nat.max_sessions_per_guest",
            raw.nat.max_sessions_per_guest,
            4096,
        )?,
        max_half_open: positive("nat.max_half_open", raw.nat.max_half_open, 1024)?,
        host_loopback,
        egress: raw
            .nat
            .egress
            .iter()
            .flatten()
            .map(|r| r.parse().map_err(|e: String| field_err("nat.egress", e)))
            .collect::<Result<_, _>>()?,
        source_check: raw.nat.source_check.unwrap_or_default(),
        new_sessions_per_second: raw.nat.new_sessions_per_second.unwrap_or(10_000),
        max_half_open_per_guest: 0,
        reassembly_mib: positive("nat.reassembly_mib", raw.nat.reassembly_mib, 256)?,
        reassembly_per_guest_mib: positive(
            "nat.reassembly_per_guest_mib",
            raw.nat.reassembly_per_guest_mib,
            32,
        )?,
        bindings: Vec::new(),
    };
    nat.max_half_open_per_guest = match raw.nat.max_half_open_per_guest {
        Some(0) => {
            return Err(field_err(
                "nat.max_half_open_per_guest",
                "must be at least 1",
            ))
        }
        Some(n) => n,
        None => (nat.max_half_open / 4).max(1),
    };
    for b in raw.nat.bindings.iter().flatten() {
        let bad = |why: &str| field_err("nat.bindings", format!("`{b}`: {why}"));
        let mut w = b.split_whitespace();
        let (Some(m), Some(a), None) = (w.next(), w.next(), w.next()) else {
            return Err(bad("give a MAC and an address"));
        };
        let mac: Mac = m.parse().map_err(|_| bad("not a MAC address"))?;
        let ip: Ipv4Addr = a.parse().map_err(|_| bad("not an IPv4 address"))?;
        if !same_subnet(ip, host_ip, host_mask) || ip == host_ip {
            return Err(bad("the address must be a guest's of the virtual network"));
        }
        if nat.bindings.iter().any(|(_, other)| *other == ip) {
            return Err(bad("the address is bound twice"));
        }
        nat.bindings.push((mac, ip));
    }
    if let Some(budget) = machine.socket_budget {
        // Every session holds a host socket: no more sessions than the process may open
        // sockets, so that the lease file and the operator's connections always find a
        // descriptor. A guest's share stays below the total.
        let budget = budget.max(1);
        if nat.max_sessions > budget {
            nat.max_sessions = budget;
            // A guest's default share stays a share: one guest alone cannot take every socket.
            // A share the operator set is kept, within the total.
            let share = match raw.nat.max_sessions_per_guest {
                Some(_) => budget,
                None => (budget / 4).max(1),
            };
            nat.max_sessions_per_guest = nat.max_sessions_per_guest.min(share);
        }
        nat.max_half_open = nat.max_half_open.min(nat.max_sessions);
        nat.max_half_open_per_guest = nat.max_half_open_per_guest.min(nat.max_half_open);
    }

    Ok(nat)
}

/// `[dhcp]`: the virtual DHCP server.
fn dhcp_config(
    raw: &RawConfig,
    host: &HostConfig,
    machine: &Machine,
) -> Result<DhcpConfig, ConfigError> {
    let (host_ip, host_mask) = (host.ip, host.mask);
    let d = &raw.dhcp;
    let range_start = match &d.range_start {
        Some(v) => parse_ip("dhcp.range_start", v)?,
        None => DEFAULT_RANGE_START,
    };
    let range_end = match &d.range_end {
        Some(v) => parse_ip("dhcp.range_end", v)?,
        None => DEFAULT_RANGE_END,
    };
    let dmask = match &d.mask {
        Some(v) => parse_mask("dhcp.mask", v)?,
        None => DEFAULT_MASK,
    };
    if u32::from(range_start) > u32::from(range_end) {
        return Err(field_err(
            "dhcp.range_start",
            format!("{range_start} is after dhcp.range_end {range_end}"),
        ));
    }
    for (field, a) in [
        ("dhcp.range_start", range_start),
        ("dhcp.range_end", range_end),
    ] {
        if !same_subnet(a, host_ip, host_mask) {
            return Err(field_err(
                field,
                format!("{a} is outside the virtual host's subnet {host_ip}/{host_mask}"),
            ));
        }
    }
    let gateway = match &d.gateway {
        Some(v) => parse_blankable_ip("dhcp.gateway", v)?,
        None => Some(host_ip),
    };
    if let Some(gw) = gateway {
        if !same_subnet(gw, range_start, dmask) {
            return Err(field_err(
                "dhcp.gateway",
                format!("{gw} is not in the clients' subnet {range_start}/{dmask}"),
            ));
        }
    }
    let dns = match &d.dns {
        Some(list) => {
            if list.len() > 2 {
                return Err(field_err("dhcp.dns", "at most two servers"));
            }
            let mut v = Vec::new();
            for s in list {
                if let Some(ip) = parse_blankable_ip("dhcp.dns", s)? {
                    v.push(ip);
                }
            }
            v
        }
        None => vec![host_ip],
    };
    let domain = match &d.domain {
        Some(s) if s.trim().is_empty() => None,
        Some(s) => {
            let s = s.trim();
            if s.len() > 253
                || !s
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-.".contains(&b))
            {
                return Err(field_err(
                    "dhcp.domain",
                    format!("`{s}` is not a domain name"),
                ));
            }
            Some(s.to_owned())
        }
        None => machine.domain.clone(),
    };
    let mut routes = Vec::new();
    for r in d.routes.iter().flatten() {
        routes.push(parse_route(r)?);
    }
    let search = match &d.search {
        Some(list) => search_list(list)?,
        // The domain the clients are told is the one their resolver should try names in; a
        // machine's domain that is no name for option 119 is still option 15's.
        None => domain
            .iter()
            .map(|s| s.trim_end_matches('.'))
            .filter(|s| crate::wire::dhcp_options::is_domain_name(s))
            .map(str::to_owned)
            .collect(),
    };
    let mut ntp = Vec::new();
    for s in d.ntp.iter().flatten() {
        if let Some(ip) = parse_blankable_ip("dhcp.ntp", s)? {
            ntp.push(ip);
        }
    }
    if ntp.len() > MAX_NTP {
        return Err(field_err("dhcp.ntp", format!("at most {MAX_NTP} servers")));
    }
    Ok(DhcpConfig {
        enabled: d.enabled.unwrap_or(true),
        range_start,
        range_end,
        mask: dmask,
        lease: secs("dhcp.lease", d.lease, 7200)?,
        gateway,
        dns,
        domain,
        routes,
        check_chaddr: d.check_chaddr.unwrap_or(true),
        search,
        ntp,
        // Checked against the whole configuration once it is known (`from_raw_on`).
        reservations: Vec::new(),
    })
}

/// Most NTP servers `dhcp.ntp` may name (option 42 holds 63; clients use a few).
const MAX_NTP: usize = 8;
/// Most domains `dhcp.search` may name: resolvers use a handful, and the encoded list's
/// compression pointers reach back 16 KiB.
const MAX_SEARCH: usize = 32;

/// `dhcp.search`: domain names, a trailing dot allowed, blank entries skipped.
fn search_list(list: &[String]) -> Result<Vec<String>, ConfigError> {
    const F: &str = "dhcp.search";
    if list.len() > MAX_SEARCH {
        return Err(field_err(F, format!("at most {MAX_SEARCH} domains")));
    }
    let mut out = Vec::new();
    for s in list {
        let s = s.trim();
        let name = s.strip_suffix('.').unwrap_or(s);
        if name.is_empty() {
            continue;
        }
        if !crate::wire::dhcp_options::is_domain_name(name) {
            return Err(field_err(
                F,
                format!("`{s}` is not a domain name (labels of letters, digits and `-`)"),
            ));
        }
        out.push(name.to_owned());
    }
    Ok(out)
}

/// `[dns]`: the relay's upstreams (the machine's when none are named), none an egress rule
/// denies, and the DNS address, which must be free for the virtual host to take.
fn dns_config(
    raw: &RawConfig,
    host: &HostConfig,
    nat: &NatConfig,
    dhcp: &DhcpConfig,
    machine: &Machine,
) -> Result<DnsConfig, ConfigError> {
    let mut upstream = Vec::new();
    for s in raw.dns.upstream.iter().flatten() {
        upstream.push(parse_upstream("dns.upstream", s)?);
    }
    for u in &upstream {
        let denied =
            crate::nat::policy::denied_by(&nat.egress, crate::nat::Proto::Udp, u.ip(), u.port());
        if let Some(rule) = denied {
            return Err(field_err(
                "dns.upstream",
                format!("{u} is denied by the egress rule `{rule}`"),
            ));
        }
    }
    if upstream.is_empty() {
        upstream = machine.nameservers.clone();
    }
    let address = match raw.dns.address.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(v) => Some(dns_address(parse_ip("dns.address", v)?, host, nat, dhcp)?),
    };
    let mut hosts = Vec::new();
    for (name, ip) in raw.dns.hosts.iter().flatten() {
        let Some(n) = crate::vhost::names::normalize(name) else {
            return Err(field_err(
                "dns.hosts",
                format!("`{name}` is not a host name (labels of letters, digits and `-`)"),
            ));
        };
        hosts.push((n, parse_ip("dns.hosts", ip)?));
    }
    let hosts_file = match raw.dns.hosts_file.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(p) => Some(PathBuf::from(p)),
    };
    let mut hosts_from_file = Vec::new();
    if hosts_file.is_some() {
        for (name, ip) in &machine.hosts_file {
            let Some(n) = crate::vhost::names::normalize(name) else {
                return Err(field_err(
                    "dns.hosts_file",
                    format!("`{name}` is not a host name"),
                ));
            };
            hosts_from_file.push((n, *ip));
        }
    }
    let max = crate::vhost::names::MAX_HOSTS;
    if hosts.len() + hosts_from_file.len() > max {
        return Err(field_err(
            if hosts.len() > max {
                "dns.hosts"
            } else {
                "dns.hosts_file"
            },
            format!("at most {max} names in `dns.hosts` and `dns.hosts_file` together"),
        ));
    }
    Ok(DnsConfig {
        upstream,
        query_timeout: secs("dns.query_timeout", raw.dns.query_timeout, 5)?,
        address,
        hosts,
        hosts_file,
        hosts_from_file,
    })
}

/// Checks that `ip` can be the virtual host's DNS address: an address of the virtual network
/// that nothing else on it has or may be given, since the virtual host answers ARP for it.
fn dns_address(
    ip: Ipv4Addr,
    host: &HostConfig,
    nat: &NatConfig,
    dhcp: &DhcpConfig,
) -> Result<Ipv4Addr, ConfigError> {
    let refuse = |why: String| Err(field_err("dns.address", format!("{ip} {why}")));
    if !same_subnet(ip, host.ip, host.mask) {
        return refuse(format!(
            "is outside the virtual host's subnet {}/{}",
            host.ip, host.mask
        ));
    }
    if ip == host.ip {
        return refuse("is the virtual host's own address".into());
    }
    let hosts = !u32::from(host.mask);
    let host_bits = u32::from(ip) & hosts;
    // A /31 has no network or broadcast address to keep out (a /32 has no other address).
    if hosts >= 3 && (host_bits == 0 || host_bits == hosts) {
        return refuse("is the virtual network's network or broadcast address".into());
    }
    if Some(ip) == nat.host_loopback {
        return refuse("is the host-loopback alias (`nat.host_loopback`)".into());
    }
    if (u32::from(dhcp.range_start)..=u32::from(dhcp.range_end)).contains(&u32::from(ip)) {
        return refuse(format!(
            "is inside the DHCP range {}-{}",
            dhcp.range_start, dhcp.range_end
        ));
    }
    if nat.bindings.iter().any(|(_, b)| *b == ip) {
        return refuse("is bound to a guest (`nat.bindings`)".into());
    }
    Ok(ip)
}

/// `[control]`: the operator's side.
fn control_config(raw: &RawConfig) -> Result<ControlConfig, ConfigError> {
    let c = &raw.control;
    let metrics = match c.metrics.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(v) => {
            let sa: SocketAddr = v.parse().map_err(|_| {
                field_err("control.metrics", format!("`{v}` is not an address:port"))
            })?;
            if !sa.ip().is_loopback() {
                return Err(field_err(
                    "control.metrics",
                    format!("{sa} is not a loopback address"),
                ));
            }
            Some(sa)
        }
    };
    Ok(ControlConfig {
        socket: c.socket.as_ref().map(|s| PathBuf::from(s.trim())),
        security_log: c
            .security_log
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(PathBuf::from),
        security_log_format: c.security_log_format.unwrap_or_default(),
        metrics,
        reverse_lookup: c.reverse_lookup.unwrap_or(true),
        security_log_max: match c.security_log_max_mib.unwrap_or(64) {
            0 => None,
            mib => Some(
                mib.checked_mul(1 << 20)
                    .ok_or_else(|| field_err("control.security_log_max_mib", "is too large"))?,
            ),
        },
        log_rate: c.log_rate.unwrap_or(200),
    })
}

impl RawConfig {
    /// Reads a configuration file's text; the error is the TOML parser's message.
    pub fn from_toml(text: &str) -> Result<RawConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }
}

/// Facts about the machine hubnat runs on that a configuration defaults to: read by the daemon
/// (the core reads no files) and handed to `Config::from_raw_on`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Machine {
    /// The machine's DNS domain (the DHCP domain unless the configuration names one).
    pub domain: Option<String>,
    /// Its resolvers (the DNS relay's upstreams unless the configuration names some).
    pub nameservers: Vec<SocketAddr>,
    /// How many host sockets the process can open beside what it keeps for itself (its open
    /// files limit less a reserve): the session totals are held below it. None: no limit.
    pub socket_budget: Option<usize>,
    /// The names of the configuration's `[dns] hosts_file`, as the daemon read them.
    pub hosts_file: Vec<(String, Ipv4Addr)>,
}

/// The DNS domain a resolv.conf names: its `domain` or first `search` entry.
pub fn resolv_conf_domain(text: &str) -> Option<String> {
    for line in text.lines() {
        let mut w = line.split_whitespace();
        if let Some("domain" | "search") = w.next() {
            if let Some(d) = w.next() {
                let d = d.trim_end_matches('.');
                if !d.is_empty() {
                    return Some(d.to_owned());
                }
            }
        }
    }
    None
}

/// The upstream resolvers of /etc/resolv.conf (its `nameserver` lines), port 53.
pub fn resolv_conf_nameservers(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver")).then(|| w.next()).flatten()
        })
        .filter_map(|s| s.parse::<std::net::IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_raw(&RawConfig::from_toml(text).unwrap())
    }

    fn field_of(e: ConfigError) -> &'static str {
        match e {
            ConfigError::Field { field, .. } => field,
            other => panic!("expected a field error, got {other}"),
        }
    }

    #[test]
    fn defaults_are_the_seeds() {
        let c = Config::defaults();
        assert!(c.enabled && c.nat.enabled && c.dhcp.enabled);
        assert_eq!(c.host.ip, Ipv4Addr::new(192, 168, 30, 1));
        assert_eq!(c.host.mask, Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(c.nat.mtu, 1500);
        assert_eq!(c.nat.tcp_timeout, Duration::from_secs(7200));
        assert_eq!(c.nat.udp_timeout, Duration::from_secs(600));
        assert_eq!(c.dhcp.range_start, Ipv4Addr::new(192, 168, 30, 10));
        assert_eq!(c.dhcp.range_end, Ipv4Addr::new(192, 168, 30, 200));
        assert_eq!(c.dhcp.lease, Duration::from_secs(7200));
        assert_eq!(c.dhcp.gateway, Some(Ipv4Addr::new(192, 168, 30, 1)));
        assert_eq!(c.dhcp.dns, vec![Ipv4Addr::new(192, 168, 30, 1)]);
        assert_eq!(c.host.mac, None);
    }

    #[test]
    fn ipv6_defaults_and_refusals() {
        let c = Config::defaults();
        assert!(c.ipv6.enabled);
        assert_eq!(
            c.ipv6.prefix,
            "fd68:7562:6e61:1e::".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(
            c.ipv6.ip,
            "fd68:7562:6e61:1e::1".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(c.ipv6.dns, vec![c.ipv6.ip]);
        assert_eq!(c.ipv6.dhcpv6, Dhcpv6Mode::Stateless);
        assert!(c.ipv6.in_prefix(c.ipv6.range_start) && c.ipv6.range_start < c.ipv6.range_end);
        let c = load("[ipv6]\nprefix = \"fd00:1::/64\"\ndhcpv6 = \"stateful\"\n").unwrap();
        assert_eq!(c.ipv6.ip, "fd00:1::1".parse::<Ipv6Addr>().unwrap());
        assert_eq!(
            c.ipv6.range_end,
            "fd00:1::1fff".parse::<Ipv6Addr>().unwrap()
        );
        for (text, field) in [
            ("prefix = \"fd00:1::/48\"", "ipv6.prefix"),
            ("prefix = \"fd00:1::5/64\"", "ipv6.prefix"),
            ("prefix = \"fe80::/64\"", "ipv6.prefix"),
            ("prefix = \"ff02::/64\"", "ipv6.prefix"),
            ("prefix = \"nonsense/64\"", "ipv6.prefix"),
            ("ip = \"fd00:2::1\"", "ipv6.ip"),
            ("ip = \"fd68:7562:6e61:1e::1000\"", "ipv6.ip"),
            (
                "range_start = \"fd68:7562:6e61:1e::2000\"",
                "ipv6.range_end",
            ),
            ("ra_interval = 2", "ipv6.ra_interval"),
            ("router_lifetime = 9001", "ipv6.router_lifetime"),
            ("dns = [\"x\"]", "ipv6.dns"),
        ] {
            let e = load(&format!("[ipv6]\n{text}\n")).unwrap_err();
            assert_eq!(field_of(e), field, "{text}");
        }
    }

    #[test]
    fn random_mac_starts_00_ac() {
        let m = Mac::random_secure_nat([1, 2, 3, 4]);
        assert_eq!(m.0[..2], [0x00, 0xAC]);
        assert_eq!(m.dashed(), "00-AC-01-02-03-04");
        assert_eq!("00-ac-01-02-03-04".parse::<Mac>(), Ok(m));
    }

    #[test]
    fn blank_gateway_dns_domain_are_left_out() {
        let c = load("[dhcp]\ngateway = \"\"\ndns = []\ndomain = \"\"\n").unwrap();
        assert_eq!(c.dhcp.gateway, None);
        assert!(c.dhcp.dns.is_empty());
        assert_eq!(c.dhcp.domain, None);
    }

    #[test]
    fn search_list_and_ntp_servers() {
        let c = load("[dhcp]\ndomain = \"example.test\"\n").unwrap();
        assert_eq!(c.dhcp.search, vec!["example.test".to_string()]);
        assert!(c.dhcp.ntp.is_empty());
        let c =
            load("[dhcp]\nsearch = [\"a.test.\", \" b.test\", \"\"]\nntp = [\"192.168.30.1\"]\n")
                .unwrap();
        assert_eq!(c.dhcp.search, vec!["a.test".to_string(), "b.test".into()]);
        assert_eq!(c.dhcp.ntp, vec![Ipv4Addr::new(192, 168, 30, 1)]);
        let c = load("[dhcp]\ndomain = \"example.test\"\nsearch = []\n").unwrap();
        assert!(c.dhcp.search.is_empty());
        // A machine's domain that is no search domain leaves the list empty, not the start.
        let machine = Machine {
            domain: Some("bad..domain".into()),
            ..Machine::default()
        };
        let c = Config::from_raw_on(&RawConfig::default(), &machine).unwrap();
        assert!(c.dhcp.search.is_empty());
        let many = ["\"192.168.30.1\""; 9].join(", ");
        for (text, field) in [
            ("[dhcp]\nsearch = [\"a..test\"]", "dhcp.search"),
            ("[dhcp]\nsearch = [\"a_b.test\"]", "dhcp.search"),
            ("[dhcp]\nntp = [\"ntp.example\"]", "dhcp.ntp"),
            (&format!("[dhcp]\nntp = [{many}]"), "dhcp.ntp"),
        ] {
            let e = load(text).expect_err(text);
            assert_eq!(field_of(e), field, "{text}");
        }
    }

    #[test]
    fn bad_configurations_name_the_field() {
        let cases = [
            ("[dhcp]\nrange_start = \"10.0.0.1\"", "dhcp.range_start"),
            ("[dhcp]\nrange_end = \"192.168.31.5\"", "dhcp.range_end"),
            (
                "[dhcp]\nrange_start = \"192.168.30.100\"\nrange_end = \"192.168.30.50\"",
                "dhcp.range_start",
            ),
            ("[dhcp]\ngateway = \"10.9.9.9\"", "dhcp.gateway"),
            (
                "[dhcp]\ndns = [\"1.1.1.1\", \"1.0.0.1\", \"8.8.8.8\"]",
                "dhcp.dns",
            ),
            (
                "[dhcp]\nroutes = [\"10.0.0.0/8 to 1.2.3.4\"]",
                "dhcp.routes",
            ),
            ("[host]\nmask = \"255.0.255.0\"", "host.mask"),
            ("[host]\nip = \"300.1.1.1\"", "host.ip"),
            ("[host]\nmac = \"01:00:5e:00:00:01\"", "host.mac"),
            ("[nat]\nmtu = 100", "nat.mtu"),
            ("[nat]\nudp_timeout = 0", "nat.udp_timeout"),
            ("[control]\nmetrics = \"0.0.0.0:9100\"", "control.metrics"),
            ("[control]\nmetrics = \"localhost\"", "control.metrics"),
        ];
        for (text, field) in cases {
            let e = load(text).expect_err(text);
            assert_eq!(field_of(e), field, "{text}");
        }
    }

    #[test]
    fn unknown_fields_and_bad_toml_are_refused() {
        assert!(RawConfig::from_toml("[dhcp]\nrange = 3").is_err());
        assert!(RawConfig::from_toml("[dhcp\n").is_err());
    }

    #[test]
    fn routes_parse() {
        let c = load("[dhcp]\nroutes = [\"10.1.0.0/16 via 192.168.30.254\"]").unwrap();
        assert_eq!(
            c.dhcp.routes,
            vec![StaticRoute {
                dest: Ipv4Addr::new(10, 1, 0, 0),
                prefix_len: 16,
                gateway: Ipv4Addr::new(192, 168, 30, 254)
            }]
        );
    }

    #[test]
    fn upstream_forms() {
        let c = load("[dns]\nupstream = [\"127.0.0.1\", \"127.0.0.2:5353\"]").unwrap();
        assert_eq!(c.dns.upstream[0], "127.0.0.1:53".parse().unwrap());
        assert_eq!(c.dns.upstream[1], "127.0.0.2:5353".parse().unwrap());
        let ns = resolv_conf_nameservers("# x\nnameserver 10.0.0.2\nsearch a.b\nnameserver ::1\n");
        assert_eq!(ns.len(), 2);
    }

    #[test]
    fn dns_hosts_are_validated_and_bounded() {
        let c = load("[dns]\nhosts = { \"Printer.lan.\" = \"192.168.30.40\" }\n").unwrap();
        assert_eq!(
            c.dns.hosts,
            vec![("Printer.lan".to_owned(), Ipv4Addr::new(192, 168, 30, 40))]
        );
        for text in [
            "[dns]\nhosts = { \"a_b\" = \"192.168.30.40\" }",
            "[dns]\nhosts = { \"a\" = \"::1\" }",
        ] {
            assert_eq!(field_of(load(text).unwrap_err()), "dns.hosts", "{text}");
        }
        // The file's names count only with a file configured, and toward the same bound.
        let machine = Machine {
            hosts_file: vec![("nas".into(), Ipv4Addr::new(10, 0, 0, 1)); 3],
            ..Machine::default()
        };
        let c = Config::from_raw_on(&RawConfig::default(), &machine).unwrap();
        assert!(c.dns.hosts_from_file.is_empty());
        let raw = RawConfig::from_toml("[dns]\nhosts_file = \"/h\"").unwrap();
        let c = Config::from_raw_on(&raw, &machine).unwrap();
        assert_eq!(c.dns.hosts_from_file.len(), 3);
        let machine = Machine {
            hosts_file: vec![("nas".into(), Ipv4Addr::new(10, 0, 0, 1)); MAX_HOSTS_TEST + 1],
            ..Machine::default()
        };
        let e = Config::from_raw_on(&raw, &machine).unwrap_err();
        assert_eq!(field_of(e), "dns.hosts_file");
    }

    const MAX_HOSTS_TEST: usize = crate::vhost::names::MAX_HOSTS;

    #[test]
    fn session_totals_stay_within_the_socket_budget() {
        let machine = Machine {
            socket_budget: Some(900),
            ..Machine::default()
        };
        let c = Config::from_raw_on(&RawConfig::default(), &machine).unwrap();
        assert_eq!(c.nat.max_sessions, 900);
        assert_eq!(
            c.nat.max_sessions_per_guest, 225,
            "a quarter: a share, not the lot"
        );
        assert_eq!(c.nat.max_half_open, 900);
        assert_eq!(c.nat.max_half_open_per_guest, 256);
        let raw = RawConfig::from_toml("[nat]\nmax_sessions_per_guest = 800\n").unwrap();
        let c = Config::from_raw_on(&raw, &machine).unwrap();
        assert_eq!(
            c.nat.max_sessions_per_guest, 800,
            "a share the operator set is kept"
        );
        let raw = RawConfig::from_toml("[nat]\nmax_sessions = 100\n").unwrap();
        let c = Config::from_raw_on(&raw, &machine).unwrap();
        assert_eq!(
            (c.nat.max_sessions, c.nat.max_sessions_per_guest),
            (100, 4096)
        );
        let c = Config::from_raw(&RawConfig::default()).unwrap();
        assert_eq!(c.nat.max_sessions, 65536, "no budget, no clamp");
    }

    #[test]
    fn the_dns_address_is_offered_by_dhcp_unless_dhcp_dns_names_servers() {
        let c = load("[dns]\naddress = \"192.168.30.3\"\n").unwrap();
        let alias = Ipv4Addr::new(192, 168, 30, 3);
        assert_eq!(c.dns.address, Some(alias));
        assert_eq!(c.dhcp.dns, vec![alias]);
        assert!(c.is_host_address(alias) && c.is_host_address(c.host.ip));
        assert_eq!(c.host_addresses(), [c.host.ip, alias]);
        let c =
            load("[dns]\naddress = \"192.168.30.3\"\n[dhcp]\ndns = [\"192.168.30.1\"]\n").unwrap();
        assert_eq!(c.dhcp.dns, vec![Ipv4Addr::new(192, 168, 30, 1)]);
        let c = load("[dns]\naddress = \"192.168.30.3\"\n[dhcp]\ndns = []\n").unwrap();
        assert!(c.dhcp.dns.is_empty());
        let c = load("[dns]\naddress = \"\"\n").unwrap();
        assert_eq!(c.dns.address, None);
        assert_eq!(c.dhcp.dns, vec![c.host.ip]);
        assert!(!c.is_host_address(alias));
        assert_eq!(c.host_addresses(), [c.host.ip; 2]);
    }

    #[test]
    fn a_dns_address_must_be_free_on_the_virtual_network() {
        let refused = [
            ("[dns]\naddress = \"10.0.0.3\"", "outside the virtual host's subnet"),
            ("[dns]\naddress = \"192.168.30.1\"", "own address"),
            ("[dns]\naddress = \"192.168.30.0\"", "network or broadcast"),
            ("[dns]\naddress = \"192.168.30.255\"", "network or broadcast"),
            ("[dns]\naddress = \"192.168.30.50\"", "inside the DHCP range"),
            ("[dns]\naddress = \"192.168.30.10\"", "inside the DHCP range"),
            ("[dns]\naddress = \"192.168.30.200\"", "inside the DHCP range"),
            ("[dns]\naddress = \"dns.example\"", "not an IPv4 address"),
            (
                "[nat]\nhost_loopback = \"192.168.30.2\"\n[dns]\naddress = \"192.168.30.2\"",
                "host-loopback alias",
            ),
            (
                "[nat]\nbindings = [\"02:00:00:00:00:05 192.168.30.5\"]\n[dns]\naddress = \"192.168.30.5\"",
                "bound to a guest",
            ),
        ];
        for (text, why) in refused {
            let e = load(text).expect_err(text);
            let message = e.to_string();
            assert_eq!(field_of(e), "dns.address", "{text}");
            assert!(message.contains(why), "{text}: {message}");
        }
        // Just outside the range, and beside the host-loopback alias, it is free.
        load("[nat]\nhost_loopback = \"192.168.30.2\"\n[dns]\naddress = \"192.168.30.201\"")
            .unwrap();
        let c = load("[dhcp]\nrange_start = \"192.168.30.100\"\n[dns]\naddress = \"192.168.30.3\"")
            .unwrap();
        assert_eq!(c.dns.address, Some(Ipv4Addr::new(192, 168, 30, 3)));
    }

    #[test]
    fn egress_rules_are_checked_and_a_denied_upstream_is_refused() {
        let c = load("[nat]\negress = [\"deny 10.0.0.0/8\", \"allow 169.254.169.254 tcp 80\"]\n")
            .unwrap();
        assert_eq!(c.nat.egress.len(), 2);
        let e = load("[nat]\negress = [\"allow 10.0.0.1/8\"]\n").unwrap_err();
        assert_eq!(field_of(e), "nat.egress");
        let e = load("[nat]\negress = [\"deny 10.0.0.0/8\"]\n[dns]\nupstream = [\"10.0.0.53\"]\n")
            .unwrap_err();
        assert_eq!(field_of(e), "dns.upstream");
    }
}
