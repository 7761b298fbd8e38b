//! The scripted host side of a replay: how connects end, what each TCP destination does with a
//! connection, how UDP and ICMP destinations answer, and the DNS upstream's fixed table.
//!
//! A script is a small TOML file (`pcaps/NAME.toml`); every field is optional:
//!
//! ```toml
//! seed = 1                        # seeds every random choice of the core
//! tail_ms = 3000                  # timers run this long past the last input frame
//! rebase = true                   # translate guests' ACK/TSecr to the replayed core's ISN/TSval
//! tcp_gso = false                 # the port takes TCP super-frames toward the guest, as a TAP
//!                                 # with offloads does (`Ctx::tcp_gso`; see `gso`)
//! udp_gso = false                 # and UDP super-frames, as a TAP with USO does (`Ctx::udp_gso`)
//!
//! [host]
//! default_connect = "accept"      # accept | refuse | silent | unreachable
//! connects = { "10.0.0.2:81" = "refuse", "[2001:db8::5]:81" = "refuse" }
//! tcp = "echo"                    # echo | sink | "fixed:N" (N bytes toward the guest, then FIN)
//! tcp_ports = { "80" = "fixed:20000" }
//! udp = "echo"                    # echo | silent | refuse | "burst:N" (N copies at once)
//! udp_ports = { "9" = "refuse" }
//! icmp = true                     # ICMP echo requests sent out are answered
//! dns = { "example.com" = "10.0.0.80", "v6.example.com" = ["10.0.0.81", "2001:db8::81"] }
//!                                 # A records of the IPv4 addresses, AAAA of the IPv6 ones
//!
//! [engine]                        # hubnat's own configuration (same fields as hubnat.toml)
//! nat = { tcp_connect_timeout = 3 }
//! ```

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};

use serde::Deserialize;

use hubnat_core::config::{Config, Mac, RawConfig};
use hubnat_core::sim::ConnectOutcome;

/// The virtual host MAC of every replay (and of the lab that records the real-client captures).
pub const REPLAY_MAC: Mac = Mac([0x00, 0xac, 0x00, 0x00, 0x00, 0x01]);
/// The DNS upstream the replayed core relays to (answered from the script's table).
pub const REPLAY_UPSTREAM: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 53, 0, 1), 53);
/// The DHCP domain of a replay unless the script sets one (the default would be the machine's).
pub const REPLAY_DOMAIN: &str = "replay.test";

#[derive(thiserror::Error, Debug)]
pub enum ScriptError {
    #[error("script: {0}")]
    Parse(String),
    #[error("script field `{field}`: {why}")]
    Field { field: String, why: String },
    #[error("script engine configuration: {0}")]
    Config(#[from] hubnat_core::config::ConfigError),
}

fn field(field: &str, why: impl Into<String>) -> ScriptError {
    ScriptError::Field {
        field: field.to_owned(),
        why: why.into(),
    }
}

/// What a TCP destination does with a connection.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum TcpBehaviour {
    /// Writes back every byte it reads; closes after the guest does.
    Echo,
    /// Reads and discards; closes after the guest does.
    Sink,
    /// Sends this many bytes of a fixed pattern at once, closes once the guest took them all.
    Fixed(usize),
}

/// What a UDP destination does with a datagram.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum UdpBehaviour {
    Echo,
    Silent,
    /// Answers with ICMP port unreachable.
    Refuse,
    /// Answers with this many copies at once (1 to 64): a run for the core to read.
    Burst(u8),
}

#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
struct RawScript {
    seed: Option<u64>,
    tail_ms: Option<u64>,
    rebase: Option<bool>,
    tcp_gso: Option<bool>,
    udp_gso: Option<bool>,
    #[serde(default)]
    host: RawHostSide,
    #[serde(default)]
    engine: RawConfig,
}

#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
struct RawHostSide {
    default_connect: Option<String>,
    #[serde(default)]
    connects: BTreeMap<String, String>,
    tcp: Option<String>,
    #[serde(default)]
    tcp_ports: BTreeMap<String, String>,
    udp: Option<String>,
    #[serde(default)]
    udp_ports: BTreeMap<String, String>,
    icmp: Option<bool>,
    #[serde(default)]
    dns: BTreeMap<String, Addresses>,
}

/// A name's addresses in the DNS table: one, or a list (an A and an AAAA record).
#[derive(Deserialize, Debug)]
#[serde(untagged)]
enum Addresses {
    One(String),
    Many(Vec<String>),
}

/// A parsed script.
#[derive(Clone, Debug)]
pub struct Script {
    pub seed: u64,
    pub tail_ms: u64,
    pub rebase: bool,
    /// The core sends TCP super-frames toward the guest (`Ctx::tcp_gso`), which a replay
    /// records with their marks (`gso`).
    pub tcp_gso: bool,
    /// The core sends UDP super-frames toward the guest too (`Ctx::udp_gso`).
    pub udp_gso: bool,
    pub default_connect: ConnectOutcome,
    pub connects: Vec<(SocketAddr, ConnectOutcome)>,
    pub tcp: TcpBehaviour,
    pub tcp_ports: Vec<(u16, TcpBehaviour)>,
    pub udp: UdpBehaviour,
    pub udp_ports: Vec<(u16, UdpBehaviour)>,
    pub icmp: bool,
    /// Lower-case name (no trailing dot) → address; a name may have several.
    pub dns: Vec<(String, IpAddr)>,
    pub config: Config,
}

impl Default for Script {
    fn default() -> Script {
        Script::parse("").expect("the empty script is valid")
    }
}

fn connect_outcome(f: &str, v: &str) -> Result<ConnectOutcome, ScriptError> {
    match v {
        "accept" => Ok(ConnectOutcome::Accept),
        "refuse" => Ok(ConnectOutcome::Refuse),
        "silent" => Ok(ConnectOutcome::Silent),
        "unreachable" => Ok(ConnectOutcome::Unreachable(
            hubnat_core::sockio::Unreachable::Host,
        )),
        _ => Err(field(
            f,
            format!("`{v}` is not accept, refuse, silent or unreachable"),
        )),
    }
}

fn tcp_behaviour(f: &str, v: &str) -> Result<TcpBehaviour, ScriptError> {
    match v {
        "echo" => Ok(TcpBehaviour::Echo),
        "sink" => Ok(TcpBehaviour::Sink),
        _ => match v.strip_prefix("fixed:").map(str::parse::<usize>) {
            Some(Ok(n)) if n <= 64 << 20 => Ok(TcpBehaviour::Fixed(n)),
            _ => Err(field(
                f,
                format!("`{v}` is not echo, sink or fixed:N (N ≤ 64 MiB)"),
            )),
        },
    }
}

fn udp_behaviour(f: &str, v: &str) -> Result<UdpBehaviour, ScriptError> {
    match v {
        "echo" => Ok(UdpBehaviour::Echo),
        "silent" => Ok(UdpBehaviour::Silent),
        "refuse" => Ok(UdpBehaviour::Refuse),
        _ => match v.strip_prefix("burst:").map(str::parse::<u8>) {
            Some(Ok(n @ 1..=64)) => Ok(UdpBehaviour::Burst(n)),
            _ => Err(field(
                f,
                format!("`{v}` is not echo, silent, refuse or burst:N (N from 1 to 64)"),
            )),
        },
    }
}

fn port(f: &str, v: &str) -> Result<u16, ScriptError> {
    v.parse()
        .map_err(|_| field(f, format!("`{v}` is not a port")))
}

impl Script {
    pub fn parse(text: &str) -> Result<Script, ScriptError> {
        let raw: RawScript = toml::from_str(text).map_err(|e| ScriptError::Parse(e.to_string()))?;
        let h = &raw.host;
        let mut engine = raw.engine.clone();
        if engine.dns.upstream.is_none() {
            engine.dns.upstream = Some(vec![REPLAY_UPSTREAM.to_string()]);
        }
        if engine.dhcp.domain.is_none() {
            engine.dhcp.domain = Some(REPLAY_DOMAIN.to_owned());
        }
        if engine.host.mac.is_none() {
            engine.host.mac = Some(REPLAY_MAC.to_string());
        }
        let config = Config::from_raw(&engine)?;
        let mut connects = Vec::new();
        for (k, v) in &h.connects {
            let a: SocketAddr = k
                .parse()
                .map_err(|_| field("host.connects", format!("`{k}` is not ADDR:PORT")))?;
            connects.push((a, connect_outcome("host.connects", v)?));
        }
        let mut tcp_ports = Vec::new();
        for (k, v) in &h.tcp_ports {
            tcp_ports.push((
                port("host.tcp_ports", k)?,
                tcp_behaviour("host.tcp_ports", v)?,
            ));
        }
        let mut udp_ports = Vec::new();
        for (k, v) in &h.udp_ports {
            udp_ports.push((
                port("host.udp_ports", k)?,
                udp_behaviour("host.udp_ports", v)?,
            ));
        }
        let mut dns = Vec::new();
        for (k, v) in &h.dns {
            let name = k.trim_end_matches('.').to_ascii_lowercase();
            let list = match v {
                Addresses::One(a) => std::slice::from_ref(a),
                Addresses::Many(l) => &l[..],
            };
            for a in list {
                let ip: IpAddr = a
                    .parse()
                    .map_err(|_| field("host.dns", format!("`{a}` is not an IP address")))?;
                dns.push((name.clone(), ip));
            }
        }
        Ok(Script {
            seed: raw.seed.unwrap_or(1),
            tail_ms: raw.tail_ms.unwrap_or(3000),
            rebase: raw.rebase.unwrap_or(true),
            tcp_gso: raw.tcp_gso.unwrap_or(false),
            udp_gso: raw.udp_gso.unwrap_or(false),
            default_connect: connect_outcome(
                "host.default_connect",
                h.default_connect.as_deref().unwrap_or("accept"),
            )?,
            connects,
            tcp: tcp_behaviour("host.tcp", h.tcp.as_deref().unwrap_or("echo"))?,
            tcp_ports,
            udp: udp_behaviour("host.udp", h.udp.as_deref().unwrap_or("echo"))?,
            udp_ports,
            icmp: h.icmp.unwrap_or(true),
            dns,
            config,
        })
    }

    /// The virtual host MAC of the replay.
    pub fn mac(&self) -> Mac {
        self.config.host.mac.unwrap_or(REPLAY_MAC)
    }

    pub fn tcp_for(&self, port: u16) -> TcpBehaviour {
        self.tcp_ports
            .iter()
            .find(|(p, _)| *p == port)
            .map_or(self.tcp, |(_, b)| *b)
    }

    pub fn udp_for(&self, port: u16) -> UdpBehaviour {
        self.udp_ports
            .iter()
            .find(|(p, _)| *p == port)
            .map_or(self.udp, |(_, b)| *b)
    }

    /// The addresses of `name` in the DNS table (none: the name is not in it).
    pub fn dns_lookup<'a>(&'a self, name: &'a str) -> impl Iterator<Item = IpAddr> + 'a {
        self.dns
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, ip)| *ip)
    }

    /// Whether `a` is the DNS upstream the core relays to.
    pub fn is_upstream(&self, a: SocketAddr) -> bool {
        self.config.dns.upstream.contains(&a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_destinations_and_records() {
        let s = Script::parse(
            "[host]\nconnects = { \"[2001:db8::5]:81\" = \"refuse\" }\n\
             dns = { \"v6.test\" = [\"10.0.0.81\", \"2001:db8::81\"], \"only6.test\" = \"2001:db8::82\" }\n",
        )
        .unwrap();
        assert_eq!(
            s.connects,
            vec![("[2001:db8::5]:81".parse().unwrap(), ConnectOutcome::Refuse)]
        );
        let v6: Vec<IpAddr> = s.dns_lookup("v6.test").collect();
        assert_eq!(
            v6,
            vec![
                "10.0.0.81".parse::<IpAddr>().unwrap(),
                "2001:db8::81".parse().unwrap()
            ]
        );
        assert_eq!(s.dns_lookup("only6.test").count(), 1);
        assert_eq!(s.dns_lookup("nowhere.test").count(), 0);
    }

    #[test]
    fn defaults_are_deterministic() {
        let s = Script::default();
        assert_eq!(s.seed, 1);
        assert_eq!(s.mac(), REPLAY_MAC);
        assert_eq!(s.config.dhcp.domain.as_deref(), Some(REPLAY_DOMAIN));
        assert!(s.is_upstream(REPLAY_UPSTREAM.into()));
        assert_eq!(s.tcp_for(80), TcpBehaviour::Echo);
        assert!(!s.tcp_gso);
        assert!(Script::parse("tcp_gso = true").unwrap().tcp_gso);
    }

    #[test]
    fn fields_parse_and_bad_ones_are_named() {
        let s = Script::parse(
            "seed = 7\n[host]\ndefault_connect = \"refuse\"\ntcp_ports = { \"80\" = \"fixed:100\" }\n\
             udp_ports = { \"9\" = \"refuse\" }\ndns = { \"Example.COM.\" = \"10.0.0.80\" }\n\
             [engine]\nnat = { tcp_connect_timeout = 3 }\n",
        )
        .unwrap();
        assert_eq!(s.seed, 7);
        assert_eq!(s.default_connect, ConnectOutcome::Refuse);
        assert_eq!(s.tcp_for(80), TcpBehaviour::Fixed(100));
        assert_eq!(s.udp_for(9), UdpBehaviour::Refuse);
        assert_eq!(
            s.dns_lookup("example.com").collect::<Vec<_>>(),
            vec![IpAddr::V4(Ipv4Addr::new(10, 0, 0, 80))]
        );
        assert_eq!(s.config.nat.tcp_connect_timeout.as_secs(), 3);
        for bad in [
            "[host]\ntcp = \"fixed:x\"",
            "[host]\ndefault_connect = \"maybe\"",
            "[host]\nconnects = { \"nowhere\" = \"accept\" }",
            "[host]\ndns = { \"a\" = [\"10.0.0.1\", \"2001:db8::zz\"] }",
            "[host]\nudp_ports = { \"99999\" = \"echo\" }",
            "unknown = 1",
            "[engine]\nnat = { mtu = 1 }",
        ] {
            assert!(Script::parse(bad).is_err(), "{bad}");
        }
    }
}
