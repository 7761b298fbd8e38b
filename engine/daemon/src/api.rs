//! The management API: what `hubnat` subcommands ask a running instance, and the answers.
//!
//! One request per line of JSON on the control socket, one response per line back. Requests are
//! handled on the event loop's thread between batches, against `&mut Engine`, so nothing is
//! shared or locked. A change goes through the very validation the configuration file does: the
//! values are merged into the file's `RawConfig` and that is validated by `Config::from_raw`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::leases::{unix_millis, WallClock};
use crate::state::write_atomically;
use hubnat_core::config::{
    Config, RawConfig, RawControl, RawDhcp, RawDns, RawHost, RawIpv6, RawNat,
};
use hubnat_core::forward::Forward;
use hubnat_core::nat::Proto;
use hubnat_core::output::FrameBatch;
use hubnat_core::sockio::SockIo;
use hubnat_core::stats::DropReason;
use hubnat_core::time::Instant;
use hubnat_core::vhost::dhcp::RawReservation;
use hubnat_core::{Engine, Mac};
use hubnat_runtime::WorkerReport;

/// A part of the configuration, as the file's tables are named (`securenat` is the top level).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Section {
    Securenat,
    Host,
    Nat,
    Dhcp,
    Dns,
    Ipv6,
}

impl Section {
    pub fn name(self) -> &'static str {
        match self {
            Section::Securenat => "securenat",
            Section::Host => "host",
            Section::Nat => "nat",
            Section::Dhcp => "dhcp",
            Section::Dns => "dns",
            Section::Ipv6 => "ipv6",
        }
    }
}

#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    /// The seed's SecureNatStatusGet, plus traffic and drop counters.
    Status,
    NatTable,
    DhcpTable,
    Get {
        section: Section,
    },
    /// Sets fields of a section (`key` as in the file, `value` as typed on a command line:
    /// lists comma-separated). `save` writes the configuration file back.
    Set {
        section: Section,
        values: BTreeMap<String, String>,
        #[serde(default)]
        save: bool,
    },
    /// Reads the configuration file again (what SIGHUP does).
    Reload,
    /// The segment's ports with their counters.
    PortList,
    /// Opens a port (`stream:PATH`, `dgram:PATH[,PEER]`, `tap:NAME`, `packet:IFACE`) and adds
    /// it to the segment.
    PortAdd {
        spec: String,
    },
    /// Removes a port by its number.
    PortRemove {
        id: u32,
    },
    /// The port forwards, with the guest each leads to now.
    ForwardList,
    /// Adds a forward (`proto` tcp|udp, `listen` ADDRESS:PORT[-LAST], `to` GUEST:PORT[-LAST]);
    /// `save` writes the configuration file back.
    ForwardAdd {
        proto: String,
        listen: String,
        to: String,
        #[serde(default)]
        save: bool,
    },
    /// Removes a forward by its number; its listeners close.
    ForwardRemove {
        id: u32,
        #[serde(default)]
        save: bool,
    },
    /// The static DHCP reservations, with what each MAC holds now.
    DhcpReserveList,
    /// Reserves `ip` for `mac` (with an optional host name): a change of `dhcp.reservation`,
    /// validated and applied as `set` does; `save` writes the configuration file back.
    DhcpReserveAdd {
        mac: String,
        ip: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        #[serde(default)]
        save: bool,
    },
    /// Removes the reservation of `mac`.
    DhcpReserveRemove {
        mac: String,
        #[serde(default)]
        save: bool,
    },
    /// Turns the connection into the event stream (`stream`): one JSON line per event until
    /// the client closes.
    Events,
    /// Starts writing the segment's frames to `path` (absolute: the daemon's working directory
    /// is not the client's), up to `max_mib` MiB (default 64).
    CaptureStart {
        path: PathBuf,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_mib: Option<u64>,
    },
    /// Ends the capture on now; its file is complete when the answer comes.
    CaptureStop,
}

/// One port forward, as `forward list` shows it.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct ForwardRow {
    pub id: u32,
    pub proto: String,
    pub listen: String,
    pub to: String,
    /// The guest's address now (None: no such guest now; connections are refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<String>,
    /// Connections (TCP) or new clients (UDP) handed to the guest, and refused.
    pub accepted: u64,
    pub refused: u64,
}

/// One port of the segment, as `port list` and `status` show it.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct PortRow {
    pub id: u32,
    pub kind: String,
    pub address: String,
    pub connected: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    pub frames_in: u64,
    pub bytes_in: u64,
    pub frames_out: u64,
    pub bytes_out: u64,
    /// Frames for the port it did not take (no peer, its buffer full).
    pub dropped_out: u64,
    /// Frames from the port the switch dropped (sent back to their own port, or forged from
    /// the virtual host's MAC).
    pub filtered_in: u64,
    /// Frames refused at the port's framing (bad length, truncated).
    pub malformed: u64,
    pub connects: u64,
    pub disconnects: u64,
    /// Guest MAC addresses learned on the port.
    pub macs: u32,
}

impl From<hubnat_runtime::port::switch::PortView> for PortRow {
    fn from(p: hubnat_runtime::port::switch::PortView) -> PortRow {
        PortRow {
            id: p.id,
            kind: p.kind.to_owned(),
            address: p.address,
            connected: p.link.connected,
            peer: p.link.peer,
            frames_in: p.rx_frames,
            bytes_in: p.rx_bytes,
            frames_out: p.tx_frames,
            bytes_out: p.tx_bytes,
            dropped_out: p.tx_dropped,
            filtered_in: p.rx_filtered,
            malformed: p.link.malformed,
            connects: p.link.connects,
            disconnects: p.link.disconnects,
            macs: p.macs,
        }
    }
}

/// `{"ok":true,"result":...}` or `{"ok":false,"error":"..."}`.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub result: Value,
}

impl Response {
    pub fn ok(result: impl Serialize) -> Response {
        Response {
            ok: true,
            error: None,
            result: serde_json::to_value(result).expect("answers serialize"),
        }
    }

    pub fn err(e: impl std::fmt::Display) -> Response {
        Response {
            ok: false,
            error: Some(e.to_string()),
            result: Value::Null,
        }
    }
}

#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct StatusView {
    pub securenat: bool,
    pub nat: bool,
    pub dhcp: bool,
    pub uptime_secs: u64,
    pub tcp_sessions: usize,
    pub udp_sessions: usize,
    pub icmp_sessions: usize,
    pub dns_sessions: usize,
    /// Of the TCP, UDP and ICMP sessions, those of IPv6 guests.
    #[serde(default)]
    pub ipv6_sessions: usize,
    pub dhcp_clients: usize,
    pub frames_in: u64,
    pub bytes_in: u64,
    pub frames_out: u64,
    pub bytes_out: u64,
    /// Of `frames_in` and `frames_out`, the IPv6 ones.
    #[serde(default)]
    pub frames_in_ipv6: u64,
    #[serde(default)]
    pub frames_out_ipv6: u64,
    pub drops: BTreeMap<String, u64>,
    /// Idle sessions ended to make room in a full table.
    #[serde(default)]
    pub evicted_sessions: u64,
    /// Frames of a worker's flows that another worker read from its TAP queue and handed over.
    #[serde(default)]
    pub frames_handed_over: u64,
    /// Per worker thread (multi-worker runtime only): what each carries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workers: Vec<WorkerView>,
    /// Where the TAP's NAPI polls run, when the runtime switches them (`--tap-napi auto`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap_napi: Option<NapiView>,
    /// The segment's ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortRow>,
    /// The capture on now, else the last one (None: none since start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture: Option<hubnat_runtime::capture::CaptureStatus>,
}

/// The TAP's NAPI polls, as `status` shows them.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct NapiView {
    /// In kernel threads (bulk transfer), or else inside each write.
    pub threaded: bool,
    /// How often they moved since start.
    pub switches: u64,
}

/// One worker thread of a multi-worker runtime, as `status` shows it.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct WorkerView {
    pub worker: usize,
    pub sessions: usize,
    pub frames_in: u64,
    pub frames_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub drops: u64,
}

#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct NatRow {
    pub id: u32,
    pub proto: String,
    pub guest: String,
    pub dst: String,
    /// Who opened the session: `out` (a guest's flow) or `in` (a forward's, toward a guest).
    #[serde(default = "outbound")]
    pub direction: String,
    pub state: String,
    /// Unix milliseconds.
    pub created: u64,
    pub last_used: u64,
    pub bytes_to_host: u64,
    pub bytes_to_guest: u64,
    pub packets_to_host: u64,
    pub packets_to_guest: u64,
}

/// A row from a server that did not say a direction: every session was a guest's.
fn outbound() -> String {
    hubnat_core::nat::Direction::Out.name().to_owned()
}

#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct LeaseRow {
    pub id: u32,
    /// As the seed writes it: `00-AC-85-40-B5-50`.
    pub mac: String,
    pub ip: String,
    pub host_name: String,
    /// Unix milliseconds.
    pub leased_at: u64,
    pub expires_at: u64,
    /// The lease is on the address reserved for its MAC.
    #[serde(default)]
    pub reserved: bool,
    /// A DHCPv6 lease (its id is of the DHCPv6 sequence): the client's DUID, as hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duid: Option<String>,
    /// A DHCPv6 lease's identity association.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iaid: Option<u32>,
}

/// One static reservation, as `dhcp reserve list` shows it.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct ReservationRow {
    /// As the configuration writes it: `02:00:00:00:00:20`.
    pub mac: String,
    pub ip: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The address the MAC's lease is on now, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leased: Option<String>,
    /// Another MAC whose lease (from before the reservation) holds the address until its next
    /// renewal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_by: Option<String>,
}

/// The answer to a change.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct ChangeView {
    /// `field: old -> new`, one per changed field.
    pub changes: Vec<String>,
    /// Fields that keep their running value until the next start.
    pub restart_needed: Vec<String>,
    /// The configuration file written back, if asked.
    pub saved: Option<PathBuf>,
}

/// What the control side keeps between requests.
pub struct Control {
    /// The configuration as the file has it, with the changes made here since.
    pub raw: RawConfig,
    pub config_path: Option<PathBuf>,
    pub clock: WallClock,
}

/// How a value typed for a field becomes the file's type.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Bool,
    Int,
    Str,
    List,
}

const FIELDS: &[(Section, &[(&str, Kind)])] = &[
    (Section::Securenat, &[("enabled", Kind::Bool)]),
    (
        Section::Host,
        &[("mac", Kind::Str), ("ip", Kind::Str), ("mask", Kind::Str)],
    ),
    (
        Section::Nat,
        &[
            ("enabled", Kind::Bool),
            ("mtu", Kind::Int),
            ("tcp_timeout", Kind::Int),
            ("udp_timeout", Kind::Int),
            ("tcp_connect_timeout", Kind::Int),
            ("icmp", Kind::Str),
            ("max_sessions", Kind::Int),
            ("max_sessions_per_guest", Kind::Int),
            ("max_half_open", Kind::Int),
            ("host_loopback", Kind::Str),
            ("egress", Kind::List),
            ("source_check", Kind::Str),
            ("new_sessions_per_second", Kind::Int),
            ("max_half_open_per_guest", Kind::Int),
            ("reassembly_mib", Kind::Int),
            ("reassembly_per_guest_mib", Kind::Int),
            ("bindings", Kind::List),
        ],
    ),
    (
        Section::Dhcp,
        &[
            ("enabled", Kind::Bool),
            ("range_start", Kind::Str),
            ("range_end", Kind::Str),
            ("mask", Kind::Str),
            ("lease", Kind::Int),
            ("gateway", Kind::Str),
            ("dns", Kind::List),
            ("domain", Kind::Str),
            ("routes", Kind::List),
            ("check_chaddr", Kind::Bool),
            ("search", Kind::List),
            ("ntp", Kind::List),
        ],
    ),
    (
        Section::Dns,
        &[
            ("upstream", Kind::List),
            ("query_timeout", Kind::Int),
            ("address", Kind::Str),
        ],
    ),
    (
        Section::Ipv6,
        &[
            ("enabled", Kind::Bool),
            ("prefix", Kind::Str),
            ("ip", Kind::Str),
            ("ra_interval", Kind::Int),
            ("router_lifetime", Kind::Int),
            ("dhcpv6", Kind::Str),
            ("range_start", Kind::Str),
            ("range_end", Kind::Str),
            ("dns", Kind::List),
        ],
    ),
];

fn fields_of(section: Section) -> &'static [(&'static str, Kind)] {
    FIELDS
        .iter()
        .find(|(s, _)| *s == section)
        .map(|(_, f)| *f)
        .unwrap_or(&[])
}

fn typed(section: Section, key: &str, text: &str) -> Result<Value, String> {
    let full = |k: &str| match section {
        Section::Securenat => k.to_owned(),
        s => format!("{}.{k}", s.name()),
    };
    let Some(&(_, kind)) = fields_of(section).iter().find(|(k, _)| *k == key) else {
        let known: Vec<&str> = fields_of(section).iter().map(|(k, _)| *k).collect();
        return Err(format!(
            "unknown field `{}` (known: {})",
            full(key),
            known.join(", ")
        ));
    };
    let t = text.trim();
    Ok(match kind {
        Kind::Bool => match t {
            "true" | "on" | "yes" | "1" => Value::Bool(true),
            "false" | "off" | "no" | "0" => Value::Bool(false),
            _ => {
                return Err(format!(
                    "configuration field `{}`: `{t}` is not true or false",
                    full(key)
                ))
            }
        },
        Kind::Int => Value::from(t.parse::<u64>().map_err(|_| {
            format!(
                "configuration field `{}`: `{t}` is not a whole number",
                full(key)
            )
        })?),
        Kind::Str => Value::from(t),
        Kind::List => Value::Array(
            t.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(Value::from)
                .collect(),
        ),
    })
}

/// `raw` with `values` set in `section`, checked for types and names as the file is.
pub fn merge(
    raw: &RawConfig,
    section: Section,
    values: &BTreeMap<String, String>,
) -> Result<RawConfig, String> {
    let mut v = serde_json::to_value(raw).map_err(|e| e.to_string())?;
    for (key, text) in values {
        let value = typed(section, key, text)?;
        match section {
            Section::Securenat => v[key.as_str()] = value,
            s => v[s.name()][key.as_str()] = value,
        }
    }
    serde_json::from_value(v).map_err(|e| e.to_string())
}

/// Fills in what `hubnat run` decides rather than the file: the MAC chosen at first start.
pub fn complete(cfg: &mut Config, mac: hubnat_core::Mac) {
    cfg.host.mac.get_or_insert(mac);
}

fn blank<T: ToString>(v: Option<T>) -> Option<String> {
    Some(v.map(|x| x.to_string()).unwrap_or_default())
}

/// Every setting in effect, in the file's form (so `get` shows what a file would say).
pub fn effective_raw(cfg: &Config) -> RawConfig {
    let s = |d: std::time::Duration| Some(d.as_secs());
    RawConfig {
        enabled: Some(cfg.enabled),
        forwards: cfg.forwards.iter().map(Forward::to_raw).collect(),
        state_dir: cfg.state_dir.as_ref().map(|p| p.display().to_string()),
        host: RawHost {
            mac: cfg.host.mac.map(|m| m.to_string()),
            ip: Some(cfg.host.ip.to_string()),
            mask: Some(cfg.host.mask.to_string()),
        },
        nat: RawNat {
            enabled: Some(cfg.nat.enabled),
            mtu: Some(u32::from(cfg.nat.mtu)),
            tcp_timeout: s(cfg.nat.tcp_timeout),
            udp_timeout: s(cfg.nat.udp_timeout),
            tcp_connect_timeout: s(cfg.nat.tcp_connect_timeout),
            icmp: Some(cfg.nat.icmp),
            max_sessions: Some(cfg.nat.max_sessions),
            max_sessions_per_guest: Some(cfg.nat.max_sessions_per_guest),
            max_half_open: Some(cfg.nat.max_half_open),
            host_loopback: blank(cfg.nat.host_loopback),
            egress: Some(cfg.nat.egress.iter().map(|r| r.to_string()).collect()),
            source_check: Some(cfg.nat.source_check),
            new_sessions_per_second: Some(cfg.nat.new_sessions_per_second),
            max_half_open_per_guest: Some(cfg.nat.max_half_open_per_guest),
            reassembly_mib: Some(cfg.nat.reassembly_mib),
            reassembly_per_guest_mib: Some(cfg.nat.reassembly_per_guest_mib),
            bindings: Some(
                cfg.nat
                    .bindings
                    .iter()
                    .map(|(mac, ip)| format!("{mac} {ip}"))
                    .collect(),
            ),
        },
        dhcp: RawDhcp {
            enabled: Some(cfg.dhcp.enabled),
            range_start: Some(cfg.dhcp.range_start.to_string()),
            range_end: Some(cfg.dhcp.range_end.to_string()),
            mask: Some(cfg.dhcp.mask.to_string()),
            lease: s(cfg.dhcp.lease),
            gateway: blank(cfg.dhcp.gateway),
            dns: Some(cfg.dhcp.dns.iter().map(|d| d.to_string()).collect()),
            domain: blank(cfg.dhcp.domain.as_ref()),
            routes: Some(cfg.dhcp.routes.iter().map(|r| r.to_string()).collect()),
            check_chaddr: Some(cfg.dhcp.check_chaddr),
            search: Some(cfg.dhcp.search.clone()),
            ntp: Some(cfg.dhcp.ntp.iter().map(|a| a.to_string()).collect()),
            reservations: cfg.dhcp.reservations.iter().map(|r| r.to_raw()).collect(),
        },
        dns: RawDns {
            upstream: Some(cfg.dns.upstream.iter().map(|a| a.to_string()).collect()),
            query_timeout: s(cfg.dns.query_timeout),
            address: blank(cfg.dns.address),
            hosts: Some(
                (cfg.dns.hosts.iter())
                    .map(|(n, ip)| (n.clone(), ip.to_string()))
                    .collect(),
            ),
            hosts_file: blank(cfg.dns.hosts_file.as_ref().map(|p| p.display())),
        },
        ipv6: RawIpv6 {
            enabled: Some(cfg.ipv6.enabled),
            prefix: Some(format!("{}/64", cfg.ipv6.prefix)),
            ip: Some(cfg.ipv6.ip.to_string()),
            ra_interval: s(cfg.ipv6.ra_interval),
            router_lifetime: s(cfg.ipv6.router_lifetime),
            dhcpv6: Some(cfg.ipv6.dhcpv6),
            range_start: Some(cfg.ipv6.range_start.to_string()),
            range_end: Some(cfg.ipv6.range_end.to_string()),
            dns: Some(cfg.ipv6.dns.iter().map(|a| a.to_string()).collect()),
        },
        control: RawControl {
            socket: cfg.control.socket.as_ref().map(|p| p.display().to_string()),
            security_log: cfg
                .control
                .security_log
                .as_ref()
                .map(|p| p.display().to_string()),
            security_log_format: Some(cfg.control.security_log_format),
            metrics: blank(cfg.control.metrics),
            reverse_lookup: Some(cfg.control.reverse_lookup),
            security_log_max_mib: Some(cfg.control.security_log_max.map_or(0, |b| b >> 20)),
            log_rate: Some(cfg.control.log_rate),
        },
    }
}

/// The section of `raw` as a JSON object (the top-level scalars for `securenat`).
pub fn section_value(raw: &RawConfig, section: Section) -> Value {
    let v = serde_json::to_value(raw).expect("a configuration serializes");
    match section {
        Section::Securenat => serde_json::json!({ "enabled": v["enabled"] }),
        s => v[s.name()].clone(),
    }
}

/// `field: old -> new` for every leaf that differs.
pub fn diff(old: &RawConfig, new: &RawConfig) -> Vec<String> {
    fn flat(prefix: &str, v: &Value, out: &mut BTreeMap<String, String>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    let p = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    flat(&p, x, out);
                }
            }
            other => {
                out.insert(prefix.to_owned(), other.to_string());
            }
        }
    }
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    flat("", &serde_json::to_value(old).unwrap_or_default(), &mut a);
    flat("", &serde_json::to_value(new).unwrap_or_default(), &mut b);
    b.iter()
        .filter(|(k, v)| a.get(*k) != Some(v))
        .map(|(k, v)| {
            let was = a.get(k).map(String::as_str).unwrap_or("null");
            format!("{k}: {was} -> {v}")
        })
        .collect()
}

impl Control {
    /// Answers one request. `now` is the core's time (its origin is `self.clock.origin`).
    pub fn handle(
        &mut self,
        req: Request,
        engine: &mut Engine,
        now: Instant,
        io: &mut impl SockIo,
        out: &mut FrameBatch,
    ) -> Response {
        self.handle_with(req, engine, &[], now, io, out)
    }

    /// `handle` for a runtime whose NAT sessions are spread over worker threads: `engine` is
    /// the control thread's, `workers` what each worker last reported.
    pub fn handle_with(
        &mut self,
        req: Request,
        engine: &mut Engine,
        workers: &[WorkerReport],
        now: Instant,
        io: &mut impl SockIo,
        out: &mut FrameBatch,
    ) -> Response {
        match req {
            Request::Status => Response::ok(status_with(engine, workers, now)),
            Request::NatTable => Response::ok(self.nat_table_with(engine, workers)),
            Request::DhcpTable => Response::ok(self.dhcp_table(engine)),
            Request::Get { section } => {
                Response::ok(section_value(&effective_raw(engine.config()), section))
            }
            Request::Set {
                section,
                values,
                save,
            } => match merge(&self.raw, section, &values) {
                Err(e) => Response::err(e),
                Ok(raw) => self.apply(raw, save, "control socket", engine, now, io, out),
            },
            Request::Reload => match self.reload(engine, now, io, out) {
                Ok(r) => r,
                Err(e) => Response::err(e),
            },
            Request::DhcpReserveList => Response::ok(reservation_rows(engine)),
            Request::DhcpReserveAdd {
                mac,
                ip,
                name,
                save,
            } => match self.with_reservation_added(mac, ip, name) {
                Err(e) => Response::err(e),
                Ok(raw) => self.apply(raw, save, "control socket", engine, now, io, out),
            },
            Request::DhcpReserveRemove { mac, save } => match self.with_reservation_removed(&mac) {
                Err(e) => Response::err(e),
                Ok(raw) => self.apply(raw, save, "control socket", engine, now, io, out),
            },
            // The ports are the runtime's: the server answers these with the control thread's
            // `Plane`.
            Request::PortList
            | Request::PortAdd { .. }
            | Request::PortRemove { .. }
            | Request::ForwardList
            | Request::ForwardAdd { .. }
            | Request::ForwardRemove { .. }
            | Request::CaptureStart { .. }
            | Request::CaptureStop => Response::err(
                "ports, forwards and captures are managed by the running hubnat's control thread",
            ),
            Request::Events => Response::err("events are streamed by the control socket only"),
        }
    }

    /// The configuration as the file (and the changes made since) says it.
    pub fn raw(&self) -> &RawConfig {
        &self.raw
    }

    /// `raw` with a reservation added; the rest of its checks are the configuration's. A MAC
    /// that has one already is refused here, where the message can say what to do.
    fn with_reservation_added(
        &self,
        mac: String,
        ip: String,
        name: Option<String>,
    ) -> Result<RawConfig, String> {
        let mut raw = self.raw.clone();
        if let Ok(m) = mac.trim().parse::<Mac>() {
            let same = |r: &&RawReservation| r.mac.trim().parse::<Mac>() == Ok(m);
            if let Some(r) = raw.dhcp.reservations.iter().find(same) {
                return Err(format!(
                    "{m} is already reserved ({}): remove that reservation first",
                    r.ip
                ));
            }
        }
        raw.dhcp.reservations.push(RawReservation { mac, ip, name });
        Ok(raw)
    }

    /// `raw` without the reservation of `mac`.
    fn with_reservation_removed(&self, mac: &str) -> Result<RawConfig, String> {
        let m: Mac = (mac.trim().parse()).map_err(|_| format!("`{mac}` is not a MAC address"))?;
        let mut raw = self.raw.clone();
        let before = raw.dhcp.reservations.len();
        (raw.dhcp.reservations).retain(|r| r.mac.trim().parse::<Mac>() != Ok(m));
        if raw.dhcp.reservations.len() == before {
            return Err(format!("{m} has no reservation"));
        }
        Ok(raw)
    }

    /// Applies `raw` as a `set` would: validated, applied, saved if asked; `source` names who
    /// asked, for the log.
    #[allow(clippy::too_many_arguments)]
    pub fn apply_raw(
        &mut self,
        raw: RawConfig,
        save: bool,
        source: &str,
        engine: &mut Engine,
        now: Instant,
        io: &mut impl SockIo,
        out: &mut FrameBatch,
    ) -> Response {
        self.apply(raw, save, source, engine, now, io, out)
    }

    /// Reads the configuration file again and applies it.
    pub fn reload(
        &mut self,
        engine: &mut Engine,
        now: Instant,
        io: &mut impl SockIo,
        out: &mut FrameBatch,
    ) -> Result<Response, String> {
        let Some(path) = self.config_path.clone() else {
            return Err("hubnat runs without a configuration file (--config)".into());
        };
        let raw = crate::machine::load_raw(&path).map_err(|e| e.to_string())?;
        Ok(self.apply(raw, false, "configuration file", engine, now, io, out))
    }

    #[allow(clippy::too_many_arguments)]
    fn apply(
        &mut self,
        raw: RawConfig,
        save: bool,
        source: &str,
        engine: &mut Engine,
        now: Instant,
        io: &mut impl SockIo,
        out: &mut FrameBatch,
    ) -> Response {
        let mut cfg = match crate::machine::validate(&raw) {
            Ok(c) => c,
            Err(e) => return Response::err(e),
        };
        if save && self.config_path.is_none() {
            return Response::err(
                "--save: hubnat runs without a configuration file (--config) to write",
            );
        }
        complete(&mut cfg, engine.ctx.mac);
        if raw.control == self.raw.control {
            // Unchanged in the file: keep what `hubnat run`'s flags made of it.
            cfg.control = engine.config().control.clone();
        }
        let before = effective_raw(engine.config());
        let restart = engine.reconfigure(now, cfg.clone(), io, out);
        let mut changes = diff(&before, &effective_raw(engine.config()));
        let after_file = effective_raw(&cfg);
        for f in &restart {
            changes.extend(
                diff(&before, &after_file)
                    .into_iter()
                    .filter(|c| c.starts_with(f)),
            );
        }
        for c in &changes {
            tracing::info!("configuration changed ({source}): {c}");
        }
        for f in &restart {
            tracing::warn!("configuration field `{f}` changed: it takes effect at the next start");
        }
        self.raw = raw;
        let mut saved = None;
        if save {
            let path = self.config_path.clone().expect("checked above");
            let text = match toml::to_string(&self.raw) {
                Ok(t) => t,
                Err(e) => return Response::err(format!("cannot write the configuration: {e}")),
            };
            if let Err(e) = write_atomically(&path, text.as_bytes()) {
                return Response::err(format!("applied, but cannot write {}: {e}", path.display()));
            }
            tracing::info!("configuration saved to {}", path.display());
            saved = Some(path);
        }
        Response::ok(ChangeView {
            changes,
            restart_needed: restart.into_iter().map(str::to_owned).collect(),
            saved,
        })
    }

    pub fn nat_table(&self, engine: &Engine) -> Vec<NatRow> {
        self.nat_table_with(engine, &[])
    }

    /// The NAT table of the control engine and every worker's sessions, by id.
    pub fn nat_table_with(&self, engine: &Engine, workers: &[WorkerReport]) -> Vec<NatRow> {
        let ms = |t| unix_millis(self.clock.wall(t));
        let mut sessions = engine.sessions();
        for w in workers {
            sessions.extend(w.sessions.iter().cloned());
        }
        sessions.sort_by_key(|s| s.id);
        sessions
            .into_iter()
            .map(|s| NatRow {
                id: s.id,
                proto: s.proto.name().to_owned(),
                guest: s.guest.to_string(),
                dst: s.dst.to_string(),
                direction: s.direction.name().to_owned(),
                state: s.state.to_owned(),
                created: ms(s.created),
                last_used: ms(s.last_used),
                bytes_to_host: s.bytes_to_host,
                bytes_to_guest: s.bytes_to_guest,
                packets_to_host: s.packets_to_host,
                packets_to_guest: s.packets_to_guest,
            })
            .collect()
    }

    pub fn dhcp_table(&self, engine: &Engine) -> Vec<LeaseRow> {
        let ms = |t| unix_millis(self.clock.wall(t));
        engine
            .dhcp
            .leases()
            .map(|l| LeaseRow {
                id: l.id,
                mac: l.mac.dashed(),
                ip: l.ip.to_string(),
                host_name: l.host_name.clone(),
                leased_at: ms(l.leased_at),
                expires_at: ms(l.expires_at),
                reserved: engine.dhcp.reserved_for(l.ip) == Some(l.mac),
                duid: None,
                iaid: None,
            })
            .chain(engine.dhcp6.leases().map(|l| LeaseRow {
                id: l.id,
                mac: l.mac.dashed(),
                ip: l.ip.to_string(),
                host_name: String::new(),
                leased_at: ms(l.leased_at),
                expires_at: ms(l.expires_at),
                reserved: false,
                duid: Some(l.duid_hex()),
                iaid: Some(l.iaid),
            }))
            .collect()
    }
}

/// The reservations in force, each with the lease its MAC has and who else holds its address.
pub fn reservation_rows(engine: &Engine) -> Vec<ReservationRow> {
    engine
        .dhcp
        .reservations()
        .iter()
        .map(|r| ReservationRow {
            mac: r.mac.to_string(),
            ip: r.ip.to_string(),
            name: r.name.clone(),
            leased: (engine.dhcp.leases())
                .find(|l| l.mac == r.mac)
                .map(|l| l.ip.to_string()),
            held_by: (engine.dhcp.leases())
                .find(|l| l.ip == r.ip && l.mac != r.mac)
                .map(|l| l.mac.to_string()),
        })
        .collect()
}

pub fn status(engine: &Engine, now: Instant) -> StatusView {
    status_with(engine, &[], now)
}

/// The status of the control engine plus its workers' reports (sessions and counters summed).
pub fn status_with(engine: &Engine, workers: &[WorkerReport], now: Instant) -> StatusView {
    let mut counts = engine.session_counts();
    let mut ipv6_sessions = engine.ipv6_sessions();
    let mut st = engine.stats().clone();
    let mut views = Vec::new();
    for (i, w) in workers.iter().enumerate() {
        for (a, b) in counts.iter_mut().zip(w.counts) {
            *a += b;
        }
        st.merge(&w.stats);
        ipv6_sessions += w.ipv6_sessions;
        views.push(WorkerView {
            worker: i,
            sessions: w.counts.iter().sum(),
            frames_in: w.stats.frames_in,
            frames_out: w.stats.frames_out,
            bytes_in: w.stats.bytes_in,
            bytes_out: w.stats.bytes_out,
            drops: w.stats.drops.iter().sum(),
        });
    }
    let count = |p: Proto| counts[p.index()];
    let st = &st;
    let cfg = engine.config();
    StatusView {
        securenat: cfg.enabled,
        nat: cfg.nat.enabled,
        dhcp: cfg.dhcp.enabled,
        uptime_secs: now.saturating_since(Instant::ZERO).as_secs(),
        tcp_sessions: count(Proto::Tcp),
        udp_sessions: count(Proto::Udp),
        icmp_sessions: count(Proto::Icmp),
        dns_sessions: count(Proto::Dns),
        ipv6_sessions,
        dhcp_clients: engine.dhcp.leases().count(),
        frames_in: st.frames_in,
        bytes_in: st.bytes_in,
        frames_out: st.frames_out,
        bytes_out: st.bytes_out,
        frames_in_ipv6: st.frames_in_ipv6,
        frames_out_ipv6: st.frames_out_ipv6,
        evicted_sessions: st.evicted,
        frames_handed_over: st.handed_over,
        drops: DropReason::ALL
            .iter()
            .map(|d| (d.name().to_owned(), st.drops_of(*d)))
            .collect(),
        workers: views,
        tap_napi: None,
        ports: Vec::new(),
        capture: None,
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddrV4};

    use super::*;
    use hubnat_core::sim::SimSockets;
    use hubnat_core::testing::*;

    fn control() -> Control {
        Control {
            raw: RawConfig::default(),
            config_path: None,
            clock: WallClock {
                origin: std::time::SystemTime::now(),
            },
        }
    }

    /// The engine as `hubnat run` makes it: MAC and upstreams decided.
    fn setup() -> (Engine, SimSockets, FrameBatch) {
        let (mut e, h, out) = hubnat_core::testing::setup();
        let mac = e.ctx.mac;
        // As `hubnat run` starts: the defaults on this machine.
        e.ctx.cfg = crate::machine::validate(&RawConfig::default()).unwrap();
        complete(&mut e.ctx.cfg, mac);
        (e, h, out)
    }

    fn set(section: Section, kv: &[(&str, &str)]) -> Request {
        Request::Set {
            section,
            values: kv
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            save: false,
        }
    }

    fn udp_to(e: &mut Engine, h: &mut SimSockets, out: &mut FrameBatch, sport: u16, dport: u16) {
        let f = udp_frame(
            SocketAddrV4::new(GUEST_IP, sport),
            SocketAddrV4::new(REMOTE_IP, dport),
            b"hello",
        );
        e.handle_frame(T0, &f, h, out);
    }

    #[test]
    fn requests_and_responses_are_one_json_object_each() {
        let r: Request =
            serde_json::from_str(r#"{"cmd":"set","section":"nat","values":{"enabled":"false"}}"#)
                .unwrap();
        assert_eq!(r, set(Section::Nat, &[("enabled", "false")]));
        let r: Request = serde_json::from_str(r#"{"cmd":"nat-table"}"#).unwrap();
        assert_eq!(r, Request::NatTable);
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"format-disk"}"#).is_err());
        let text = serde_json::to_string(&Response::err("no")).unwrap();
        assert_eq!(text, r#"{"ok":false,"error":"no"}"#);
    }

    #[test]
    fn typed_values_and_their_errors_name_the_field() {
        let mut v = BTreeMap::new();
        v.insert("dns".to_string(), "192.168.30.1, 192.168.30.2".to_string());
        v.insert("lease".to_string(), "3600".to_string());
        v.insert("enabled".to_string(), "off".to_string());
        let raw = merge(&RawConfig::default(), Section::Dhcp, &v).unwrap();
        assert_eq!(raw.dhcp.dns.as_deref().unwrap().len(), 2);
        assert_eq!(raw.dhcp.lease, Some(3600));
        assert_eq!(raw.dhcp.enabled, Some(false));
        for (section, k, val, want) in [
            (Section::Dhcp, "lease", "soon", "dhcp.lease"),
            (Section::Nat, "enabled", "maybe", "nat.enabled"),
            (Section::Nat, "colour", "red", "nat.colour"),
            (Section::Securenat, "nat", "x", "`nat`"),
        ] {
            let mut v = BTreeMap::new();
            v.insert(k.to_string(), val.to_string());
            let e = merge(&RawConfig::default(), section, &v).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
        // Every field of the table is one the file knows, with the file's type.
        for (section, fields) in FIELDS {
            for (k, kind) in *fields {
                let val = match kind {
                    Kind::Bool => "true",
                    Kind::Int => "5",
                    Kind::Str | Kind::List => "x",
                };
                let mut v = BTreeMap::new();
                v.insert(k.to_string(), val.to_string());
                if let Err(e) = merge(&RawConfig::default(), *section, &v) {
                    // Only the enum-typed fields may refuse a made-up word.
                    assert!(
                        *k == "icmp" || *k == "source_check" || *k == "dhcpv6",
                        "{}.{k}: {e}",
                        section.name()
                    );
                }
            }
        }
    }

    #[test]
    fn a_change_is_validated_as_the_file_is() {
        let (mut e, mut h, mut out) = setup();
        let mut c = control();
        let r = c.handle(
            set(Section::Dhcp, &[("range_start", "10.0.0.1")]),
            &mut e,
            T0,
            &mut h,
            &mut out,
        );
        assert!(!r.ok);
        let msg = r.error.unwrap();
        assert!(
            msg.contains("`dhcp.range_start`") && msg.contains("outside"),
            "{msg}"
        );
        assert_eq!(e.config().dhcp.range_start, Ipv4Addr::new(192, 168, 30, 10));
        assert_eq!(
            c.raw,
            RawConfig::default(),
            "a refused change leaves nothing behind"
        );
    }

    #[test]
    fn nat_disable_stops_new_sessions_and_keeps_the_others_and_dhcp() {
        let (mut e, mut h, mut out) = setup();
        let mut c = control();
        udp_to(&mut e, &mut h, &mut out, 4000, 53000);
        assert_eq!(e.sessions().len(), 1);
        let r = c.handle(
            set(Section::Nat, &[("enabled", "false")]),
            &mut e,
            T0,
            &mut h,
            &mut out,
        );
        assert!(r.ok, "{r:?}");
        let change: ChangeView = serde_json::from_value(r.result).unwrap();
        assert_eq!(change.changes, vec!["nat.enabled: true -> false"]);
        assert!(change.restart_needed.is_empty());
        udp_to(&mut e, &mut h, &mut out, 4001, 53000);
        assert_eq!(e.stats().drops_of(DropReason::Disabled), 1);
        assert_eq!(e.sessions().len(), 1, "the open session is not dropped");
        assert!(e.config().dhcp.enabled);
        let st = status(&e, T0);
        assert!(!st.nat && st.dhcp && st.securenat);
        assert_eq!(st.udp_sessions, 1);
        assert_eq!(st.drops["disabled"], 1);
        // And back on.
        let r = c.handle(
            set(Section::Nat, &[("enabled", "true")]),
            &mut e,
            T0,
            &mut h,
            &mut out,
        );
        assert!(r.ok);
        udp_to(&mut e, &mut h, &mut out, 4001, 53000);
        assert_eq!(e.sessions().len(), 2);
    }

    #[test]
    fn dhcp_change_keeps_sessions_and_leases_in_range() {
        let (mut e, mut h, mut out) = setup();
        let mut c = control();
        udp_to(&mut e, &mut h, &mut out, 4000, 53000);
        let lease = |id, last| hubnat_core::vhost::dhcp::Lease {
            id,
            leased_at: T0,
            expires_at: T0 + std::time::Duration::from_secs(100),
            mac: hubnat_core::Mac([2, 0, 0, 0, 0, id as u8]),
            ip: Ipv4Addr::new(192, 168, 30, last),
            host_name: String::new(),
        };
        assert_eq!(e.dhcp.restore(T0, vec![lease(1, 20), lease(2, 150)]), 2);
        let r = c.handle(
            set(
                Section::Dhcp,
                &[("range_end", "192.168.30.100"), ("lease", "60")],
            ),
            &mut e,
            T0,
            &mut h,
            &mut out,
        );
        assert!(r.ok, "{r:?}");
        let ids: Vec<u32> = c.dhcp_table(&e).iter().map(|l| l.id).collect();
        assert_eq!(
            ids,
            vec![1],
            "the lease outside the new range is gone, the other kept"
        );
        assert_eq!(e.sessions().len(), 1);
        let got = section_value(&effective_raw(e.config()), Section::Dhcp);
        assert_eq!(got["range_end"], "192.168.30.100");
        assert_eq!(got["lease"], 60);
    }

    #[test]
    fn start_time_settings_wait_for_a_restart_and_host_moves_announce() {
        let (mut e, mut h, mut out) = setup();
        let mut c = control();
        let r = c.handle(
            set(Section::Nat, &[("mtu", "9000")]),
            &mut e,
            T0,
            &mut h,
            &mut out,
        );
        let change: ChangeView = serde_json::from_value(r.result).unwrap();
        assert_eq!(change.restart_needed, vec!["nat.mtu"]);
        assert_eq!(change.changes, vec!["nat.mtu: 1500 -> 9000"]);
        assert_eq!(e.config().nat.mtu, 1500);
        assert_eq!(
            c.raw.nat.mtu,
            Some(9000),
            "kept for --save and the next start"
        );
        assert!(out.is_empty());
        let r = c.handle(
            set(Section::Securenat, &[("enabled", "false")]),
            &mut e,
            T0,
            &mut h,
            &mut out,
        );
        assert!(r.ok);
        assert!(!e.config().enabled);
        let r = c.handle(
            set(Section::Securenat, &[("enabled", "true")]),
            &mut e,
            T0,
            &mut h,
            &mut out,
        );
        assert!(r.ok);
        assert_eq!(out.len(), 1, "a gratuitous ARP when SecureNAT comes back");
    }

    #[test]
    fn ipv6_is_set_at_run_time_and_a_bad_prefix_changes_nothing() {
        let (mut e, mut h, mut out) = setup();
        let mut c = control();
        let r = c.handle(
            set(
                Section::Ipv6,
                &[("dhcpv6", "stateful"), ("ra_interval", "60")],
            ),
            &mut e,
            T0,
            &mut h,
            &mut out,
        );
        assert!(r.ok, "{r:?}");
        assert_eq!(
            e.config().ipv6.dhcpv6,
            hubnat_core::config::Dhcpv6Mode::Stateful
        );
        assert_eq!(e.config().ipv6.ra_interval.as_secs(), 60);
        let r = c.handle(
            set(Section::Ipv6, &[("prefix", "fd00:1::/48")]),
            &mut e,
            T0,
            &mut h,
            &mut FrameBatch::new(),
        );
        let msg = r.error.unwrap_or_default();
        assert!(msg.contains("`ipv6.prefix`"), "{msg}");
        assert_eq!(
            e.config().ipv6.prefix,
            hubnat_core::config::DEFAULT_IPV6_PREFIX
        );
        let got = section_value(&effective_raw(e.config()), Section::Ipv6);
        assert_eq!(got["dhcpv6"], "stateful");
        assert_eq!(got["prefix"], "fd68:7562:6e61:1e::/64");
    }

    #[test]
    fn the_dns_address_is_set_and_cleared_at_run_time() {
        let (mut e, mut h, mut out) = setup();
        let mut c = control();
        let dns = Ipv4Addr::new(192, 168, 30, 3);
        let ask = |c: &mut Control, e: &mut Engine, h: &mut SimSockets, value: &str| {
            let req = set(Section::Dns, &[("address", value)]);
            c.handle(req, e, T0, h, &mut FrameBatch::new())
        };
        let r = ask(&mut c, &mut e, &mut h, "192.168.30.3");
        assert!(r.ok, "{r:?}");
        let change: ChangeView = serde_json::from_value(r.result).unwrap();
        let changes = change.changes.join("\n");
        assert!(
            changes.contains(r#"dns.address: "" -> "192.168.30.3""#),
            "{changes}"
        );
        assert!(
            changes.contains(r#"dhcp.dns: ["192.168.30.1"] -> ["192.168.30.3"]"#),
            "DHCP offers it from now on: {changes}"
        );
        assert!(change.restart_needed.is_empty());
        assert_eq!(e.config().dns.address, Some(dns));
        let got = section_value(&effective_raw(e.config()), Section::Dns);
        assert_eq!(got["address"], "192.168.30.3");
        // A query there is the relay's (not a NAT flow to an address of the network).
        let q = udp_frame(
            SocketAddrV4::new(GUEST_IP, 3000),
            SocketAddrV4::new(dns, 53),
            b"\x00\x01\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x01\x00\x01",
        );
        let before = e.stats().drops_of(DropReason::Loop);
        e.handle_frame(T0, &q, &mut h, &mut out);
        assert_eq!(e.stats().drops_of(DropReason::Loop), before);

        let r = ask(&mut c, &mut e, &mut h, "192.168.30.50");
        let msg = r.error.unwrap_or_default();
        assert!(
            msg.contains("`dns.address`") && msg.contains("DHCP range"),
            "{msg}"
        );
        assert_eq!(
            e.config().dns.address,
            Some(dns),
            "a refused change changes nothing"
        );

        let r = ask(&mut c, &mut e, &mut h, "");
        assert!(r.ok, "{r:?}");
        assert_eq!(e.config().dns.address, None);
        assert_eq!(e.config().dhcp.dns, vec![e.config().host.ip]);
        assert_eq!(
            section_value(&effective_raw(e.config()), Section::Dns)["address"],
            ""
        );
    }

    #[test]
    fn start_flags_for_the_control_table_are_not_a_change() {
        let (mut e, mut h, mut out) = setup();
        e.ctx.cfg.control.metrics = Some("127.0.0.1:9100".parse().unwrap());
        let mut c = control();
        let r = c.handle(
            set(Section::Dhcp, &[("lease", "60")]),
            &mut e,
            T0,
            &mut h,
            &mut out,
        );
        let change: ChangeView = serde_json::from_value(r.result).unwrap();
        assert_eq!(change.changes, vec!["dhcp.lease: 7200 -> 60"]);
        assert!(change.restart_needed.is_empty());
        assert!(e.config().control.metrics.is_some());
    }

    #[test]
    fn save_writes_a_file_that_loads_back_and_reload_reads_it() {
        let dir = std::env::temp_dir().join(format!("hubnat-api-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("hubnat.toml");
        std::fs::write(&path, "[nat]\nudp_timeout = 30\n").unwrap();
        let (mut e, mut h, mut out) = setup();
        let mut c = control();
        // Without a file there is nothing to save to.
        let mut req = set(Section::Dhcp, &[("lease", "600")]);
        if let Request::Set { save, .. } = &mut req {
            *save = true;
        }
        assert!(!c.handle(req.clone(), &mut e, T0, &mut h, &mut out).ok);
        c.raw = crate::machine::load_raw(&path).unwrap();
        c.config_path = Some(path.clone());
        let r = c.handle(req, &mut e, T0, &mut h, &mut out);
        assert!(r.ok, "{r:?}");
        let back = crate::machine::load_raw(&path).unwrap();
        assert_eq!(back.dhcp.lease, Some(600));
        assert_eq!(back.nat.udp_timeout, Some(30), "what the file said is kept");
        // An edit of the file, then a reload (SIGHUP).
        std::fs::write(&path, "[dhcp]\nenabled = false\n").unwrap();
        let r = c.handle(Request::Reload, &mut e, T0, &mut h, &mut out);
        assert!(r.ok, "{r:?}");
        assert!(!e.config().dhcp.enabled);
        assert_eq!(e.config().dhcp.lease, std::time::Duration::from_secs(7200));
        std::fs::write(&path, "[dhcp]\nlease = 0\n").unwrap();
        let r = c.handle(Request::Reload, &mut e, T0, &mut h, &mut out);
        assert!(r.error.unwrap().contains("dhcp.lease"));
        assert!(!e.config().dhcp.enabled, "a refused reload changes nothing");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn reserve(mac: &str, ip: &str, name: Option<&str>, save: bool) -> Request {
        Request::DhcpReserveAdd {
            mac: mac.into(),
            ip: ip.into(),
            name: name.map(str::to_owned),
            save,
        }
    }

    #[test]
    fn reservations_are_added_listed_and_removed_as_a_change_of_the_file() {
        let (mut e, mut h, mut out) = setup();
        let mut c = control();
        let r: Request = serde_json::from_str(
            r#"{"cmd":"dhcp-reserve-add","mac":"02:00:00:00:00:20","ip":"192.168.30.20"}"#,
        )
        .unwrap();
        assert_eq!(
            r,
            reserve("02:00:00:00:00:20", "192.168.30.20", None, false)
        );
        let r = c.handle(
            reserve("02:00:00:00:00:20", "192.168.30.20", Some("vm1"), false),
            &mut e,
            T0,
            &mut h,
            &mut out,
        );
        assert!(r.ok, "{r:?}");
        let change: ChangeView = serde_json::from_value(r.result).unwrap();
        assert!(
            change.changes[0].starts_with("dhcp.reservation: null -> "),
            "{change:?}"
        );
        let res = &e.config().dhcp.reservations;
        assert_eq!(res.len(), 1);
        assert_eq!(res[0].ip, Ipv4Addr::new(192, 168, 30, 20));
        assert_eq!(c.raw.dhcp.reservations.len(), 1);

        // Refused: the same MAC again, and what the configuration refuses, with the field.
        let r = c.handle(
            reserve("02-00-00-00-00-20", "192.168.30.21", None, false),
            &mut e,
            T0,
            &mut h,
            &mut out,
        );
        assert!(r
            .error
            .unwrap()
            .contains("already reserved (192.168.30.20)"));
        let r = c.handle(
            reserve("02:00:00:00:00:21", "192.168.31.21", None, false),
            &mut e,
            T0,
            &mut h,
            &mut out,
        );
        let msg = r.error.unwrap();
        assert!(msg.contains("`dhcp.reservation[1].ip`"), "{msg}");
        assert_eq!(c.raw.dhcp.reservations.len(), 1, "nothing left behind");

        let r = c.handle(Request::DhcpReserveList, &mut e, T0, &mut h, &mut out);
        let rows: Vec<ReservationRow> = serde_json::from_value(r.result).unwrap();
        assert_eq!(
            rows,
            vec![ReservationRow {
                mac: "02:00:00:00:00:20".into(),
                ip: "192.168.30.20".into(),
                name: Some("vm1".into()),
                leased: None,
                held_by: None,
            }]
        );
        let got = section_value(&effective_raw(e.config()), Section::Dhcp);
        assert_eq!(got["reservation"][0]["name"], "vm1");

        let remove = |mac: &str| Request::DhcpReserveRemove {
            mac: mac.into(),
            save: false,
        };
        let r = c.handle(remove("02:00:00:00:00:99"), &mut e, T0, &mut h, &mut out);
        assert!(r.error.unwrap().contains("no reservation"));
        let r = c.handle(remove("nonsense"), &mut e, T0, &mut h, &mut out);
        assert!(r.error.unwrap().contains("not a MAC"));
        let r = c.handle(remove("02-00-00-00-00-20"), &mut e, T0, &mut h, &mut out);
        assert!(r.ok, "{r:?}");
        assert!(e.config().dhcp.reservations.is_empty());
        assert!(c.raw.dhcp.reservations.is_empty());
    }

    #[test]
    fn the_lease_table_marks_leases_on_their_reserved_address() {
        let (mut e, mut h, mut out) = setup();
        let mut c = control();
        let lease = |id: u32, last: u8| hubnat_core::vhost::dhcp::Lease {
            id,
            leased_at: T0,
            expires_at: T0 + std::time::Duration::from_secs(100),
            mac: hubnat_core::Mac([2, 0, 0, 0, 0, last]),
            ip: Ipv4Addr::new(192, 168, 30, last),
            host_name: String::new(),
        };
        assert_eq!(e.dhcp.restore(T0, vec![lease(1, 0x20), lease(2, 0x21)]), 2);
        // .0x21 (33) reserved for its MAC; .0x20's MAC reserved elsewhere; .50 for nobody here.
        for (mac, ip) in [
            ("02:00:00:00:00:21", "192.168.30.33"),
            ("02:00:00:00:00:20", "192.168.30.150"),
            ("02:00:00:00:00:50", "192.168.30.32"),
        ] {
            let r = c.handle(reserve(mac, ip, None, false), &mut e, T0, &mut h, &mut out);
            assert!(r.ok, "{r:?}");
        }
        let marks: Vec<(u32, bool)> = c
            .dhcp_table(&e)
            .iter()
            .map(|l| (l.id, l.reserved))
            .collect();
        assert_eq!(marks, vec![(1, false), (2, true)]);
        let r = c.handle(Request::DhcpReserveList, &mut e, T0, &mut h, &mut out);
        let rows: Vec<ReservationRow> = serde_json::from_value(r.result).unwrap();
        let state: Vec<(Option<&str>, Option<&str>)> = rows
            .iter()
            .map(|r| (r.leased.as_deref(), r.held_by.as_deref()))
            .collect();
        assert_eq!(
            state,
            vec![
                (Some("192.168.30.33"), None),
                (Some("192.168.30.32"), None),
                (None, Some("02:00:00:00:00:20")),
            ]
        );
    }

    #[test]
    fn saved_reservations_and_options_load_back() {
        let dir = std::env::temp_dir().join(format!("hubnat-api-res-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("hubnat.toml");
        std::fs::write(&path, "[dhcp]\nlease = 600\n[dns]\nquery_timeout = 3\n").unwrap();
        let (mut e, mut h, mut out) = setup();
        let mut c = control();
        c.raw = crate::machine::load_raw(&path).unwrap();
        c.config_path = Some(path.clone());
        let r = c.handle(
            set(
                Section::Dhcp,
                &[("search", "a.test, b.test"), ("ntp", "192.168.30.1")],
            ),
            &mut e,
            T0,
            &mut h,
            &mut out,
        );
        assert!(r.ok, "{r:?}");
        for (mac, ip, name) in [
            ("02:00:00:00:00:20", "192.168.30.20", Some("vm1")),
            ("02:00:00:00:00:21", "192.168.30.250", None),
        ] {
            let r = c.handle(reserve(mac, ip, name, true), &mut e, T0, &mut h, &mut out);
            assert!(r.ok, "{r:?}");
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("[[dhcp.reservation]]"), "{text}");
        let back = crate::machine::load_raw(&path).unwrap();
        assert_eq!(back, c.raw);
        let cfg = crate::machine::validate(&back).unwrap();
        assert_eq!(cfg.dhcp.reservations, e.config().dhcp.reservations);
        assert_eq!(cfg.dhcp.search, vec!["a.test".to_string(), "b.test".into()]);
        assert_eq!(cfg.dhcp.ntp, vec![Ipv4Addr::new(192, 168, 30, 1)]);
        assert_eq!(cfg.dhcp.lease, std::time::Duration::from_secs(600));
        // A reload of the same file changes nothing.
        let r = c.handle(Request::Reload, &mut e, T0, &mut h, &mut out);
        let change: ChangeView = serde_json::from_value(r.result).unwrap();
        assert!(change.changes.is_empty(), "{change:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
