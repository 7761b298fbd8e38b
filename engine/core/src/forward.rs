//! Port forwards into guests: a host address and port (or range) hubnat listens on, and the
//! guest (by IP, by MAC, or by the host name it gave in DHCP) and port each connection goes to.
//! This is the configuration's form (`[[forward]]`, and what `hubnat forward add` takes) and
//! how a guest named that way is found now. The listeners are the runtime's.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};

use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, Mac};
use crate::engine::Engine;

/// Ports one forward may span (each is a listening socket).
pub const MAX_PORTS_PER_FORWARD: u32 = 1024;
/// Listening ports of all forwards together.
pub const MAX_FORWARD_PORTS: u32 = 4096;

/// A forward as written in the file: `proto = "tcp"`, `listen = "0.0.0.0:8080"`,
/// `to = "vm1:80"`.
#[derive(Clone, Default, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RawForward {
    /// `tcp` or `udp`.
    pub proto: String,
    /// The host address and port (or `FIRST-LAST` range) to listen on.
    pub listen: String,
    /// The guest (an IPv4 address, a MAC, or a DHCP host name) and port (or range).
    pub to: String,
}

/// The transport a forward carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ForwardProto {
    /// TCP connections.
    Tcp,
    /// UDP datagrams (a session per client address).
    Udp,
}

impl fmt::Display for ForwardProto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ForwardProto::Tcp => "tcp",
            ForwardProto::Udp => "udp",
        })
    }
}

/// How a forward names its guest.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum GuestRef {
    /// By address.
    Ip(Ipv4Addr),
    /// By hardware address: whatever address its lease (or binding) gives it now.
    Mac(Mac),
    /// By the host name it sent in DHCP (option 12), case-insensitive: follows its lease.
    Name(String),
}

impl fmt::Display for GuestRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuestRef::Ip(ip) => write!(f, "{ip}"),
            GuestRef::Mac(m) => write!(f, "{m}"),
            GuestRef::Name(n) => f.write_str(n),
        }
    }
}

/// A validated forward.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Forward {
    /// TCP or UDP.
    pub proto: ForwardProto,
    /// The host address listened on.
    pub listen_ip: Ipv4Addr,
    /// The first and last host port (the same for a single port).
    pub listen_ports: (u16, u16),
    /// The guest.
    pub guest: GuestRef,
    /// The guest port of `listen_ports.0`; the others follow in order.
    pub guest_port: u16,
}

impl Forward {
    /// Every (host address, guest port) pair the forward listens on.
    pub fn ports(&self) -> impl Iterator<Item = (SocketAddrV4, u16)> + '_ {
        (self.listen_ports.0..=self.listen_ports.1).map(move |p| {
            (
                SocketAddrV4::new(self.listen_ip, p),
                self.guest_port + (p - self.listen_ports.0),
            )
        })
    }

    /// How many ports it listens on.
    pub fn len(&self) -> u32 {
        u32::from(self.listen_ports.1 - self.listen_ports.0) + 1
    }

    /// Never true (a forward has at least one port); for symmetry with `len`.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Whether it listens on any port `other` listens on (same transport and address, or
    /// either on 0.0.0.0).
    pub fn overlaps(&self, other: &Forward) -> bool {
        self.proto == other.proto
            && (self.listen_ip == other.listen_ip
                || self.listen_ip.is_unspecified()
                || other.listen_ip.is_unspecified())
            && self.listen_ports.0 <= other.listen_ports.1
            && other.listen_ports.0 <= self.listen_ports.1
    }

    /// The file's form.
    pub fn to_raw(&self) -> RawForward {
        let ports = |first: u16, last: u16| {
            if first == last {
                first.to_string()
            } else {
                format!("{first}-{last}")
            }
        };
        let last_guest = self.guest_port + (self.listen_ports.1 - self.listen_ports.0);
        RawForward {
            proto: self.proto.to_string(),
            listen: format!(
                "{}:{}",
                self.listen_ip,
                ports(self.listen_ports.0, self.listen_ports.1)
            ),
            to: format!("{}:{}", self.guest, ports(self.guest_port, last_guest)),
        }
    }
}

impl fmt::Display for Forward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let raw = self.to_raw();
        write!(f, "{} {} -> {}", raw.proto, raw.listen, raw.to)
    }
}

fn err(index: usize, field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Forward {
        index,
        field,
        message: message.into(),
    }
}

/// `8080` or `8080-8090`.
fn port_range(s: &str) -> Option<(u16, u16)> {
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let (a, b) = (a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?);
    (a >= 1 && a <= b).then_some((a, b))
}

/// A host name a DHCP client may give: letters, digits, `-`, `_` and `.`, 1 to 63 bytes.
fn is_host_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl RawForward {
    /// Validates forward number `index` of the file (the field named in every error).
    pub fn validate(&self, index: usize) -> Result<Forward, ConfigError> {
        let proto = match self.proto.trim().to_ascii_lowercase().as_str() {
            "tcp" => ForwardProto::Tcp,
            "udp" => ForwardProto::Udp,
            other => return Err(err(index, "proto", format!("`{other}`: tcp or udp"))),
        };
        let (ip, ports) = self.listen.trim().rsplit_once(':').ok_or_else(|| {
            err(
                index,
                "listen",
                format!("`{}`: ADDRESS:PORT or ADDRESS:FIRST-LAST", self.listen),
            )
        })?;
        let listen_ip: Ipv4Addr = ip.parse().map_err(|_| {
            err(
                index,
                "listen",
                format!("`{ip}` is not an IPv4 address of this host (0.0.0.0 for every one)"),
            )
        })?;
        if listen_ip.is_multicast() || listen_ip.is_broadcast() {
            return Err(err(
                index,
                "listen",
                format!("{listen_ip} is not an address to listen on"),
            ));
        }
        let listen_ports = port_range(ports).ok_or_else(|| {
            err(
                index,
                "listen",
                format!("`{ports}`: a port 1-65535 or a range FIRST-LAST with FIRST <= LAST"),
            )
        })?;
        let count = u32::from(listen_ports.1 - listen_ports.0) + 1;
        if count > MAX_PORTS_PER_FORWARD {
            return Err(err(
                index,
                "listen",
                format!("{count} ports: a forward spans at most {MAX_PORTS_PER_FORWARD}"),
            ));
        }
        let (guest, gports) = self.to.trim().rsplit_once(':').ok_or_else(|| {
            err(
                index,
                "to",
                format!(
                    "`{}`: GUEST:PORT (GUEST an address, a MAC or a host name)",
                    self.to
                ),
            )
        })?;
        let guest = if let Ok(ip) = guest.parse::<Ipv4Addr>() {
            if ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast() || ip.is_loopback() {
                return Err(err(
                    index,
                    "to",
                    format!("{ip} cannot be a guest's address"),
                ));
            }
            GuestRef::Ip(ip)
        } else if let Ok(mac) = guest.parse::<Mac>() {
            if mac.0[0] & 1 != 0 {
                return Err(err(index, "to", format!("{mac} is a multicast MAC")));
            }
            GuestRef::Mac(mac)
        } else if is_host_name(guest) {
            GuestRef::Name(guest.to_ascii_lowercase())
        } else {
            return Err(err(
                index,
                "to",
                format!("`{guest}` is neither an IPv4 address, a MAC nor a host name"),
            ));
        };
        let guest_ports = port_range(gports).ok_or_else(|| {
            err(
                index,
                "to",
                format!("`{gports}`: a port 1-65535 or a range FIRST-LAST with FIRST <= LAST"),
            )
        })?;
        if guest_ports.1 - guest_ports.0 != listen_ports.1 - listen_ports.0 {
            return Err(err(
                index,
                "to",
                format!(
                    "{} guest ports for {count} listening ports: give as many",
                    u32::from(guest_ports.1 - guest_ports.0) + 1
                ),
            ));
        }
        Ok(Forward {
            proto,
            listen_ip,
            listen_ports,
            guest,
            guest_port: guest_ports.0,
        })
    }
}

/// Validates every forward and that no two listen on the same port.
pub fn validate_all(raw: &[RawForward]) -> Result<Vec<Forward>, ConfigError> {
    let mut out: Vec<Forward> = Vec::with_capacity(raw.len());
    let mut total = 0u32;
    for (i, r) in raw.iter().enumerate() {
        let f = r.validate(i)?;
        if let Some(j) = out.iter().position(|o| o.overlaps(&f)) {
            return Err(err(
                i,
                "listen",
                format!("{} overlaps forward[{j}] ({})", r.listen, out[j]),
            ));
        }
        total += f.len();
        if total > MAX_FORWARD_PORTS {
            return Err(err(
                i,
                "listen",
                format!("forwards listen on at most {MAX_FORWARD_PORTS} ports in all"),
            ));
        }
        out.push(f);
    }
    Ok(out)
}

impl Engine {
    /// Asks the segment who has `ip` (an ARP request from the virtual host): a guest a forward
    /// names by an address it has not used yet is found once it answers. False (nothing sent)
    /// for an address off the virtual network or one of the virtual host's own.
    pub fn ask_arp(&mut self, ip: Ipv4Addr, out: &mut crate::FrameBatch) -> bool {
        let asked = self.ctx.cfg.in_subnet(ip) && !self.ctx.is_host_address(ip);
        if asked {
            crate::vhost::arp::push_request(out, self.ctx.mac, self.ctx.cfg.host.ip, ip);
        }
        asked
    }

    /// The guest `r` names, now: its address and MAC. By name or MAC through the lease table
    /// (a lease that has ended names nobody) or a DHCP reservation; by address through the
    /// lease table, the configuration's static bindings, or the neighbours ARP has seen.
    pub fn find_guest(&self, r: &GuestRef) -> Option<(Ipv4Addr, Mac)> {
        let mut leases = self.dhcp.leases();
        // A reserved guest is where its lease is, else at the address it will be given.
        let reserved = |res: &crate::vhost::dhcp::Reservation| {
            let now = self.dhcp.leases().find(|l| l.mac == res.mac);
            (now.map_or(res.ip, |l| l.ip), res.mac)
        };
        match r {
            // The operator's name for a machine first; then the newest lease of that name: a
            // guest that came back as another machine (a new MAC) is the one meant, not the
            // lease it left behind.
            GuestRef::Name(n) => (self.dhcp.reservations().iter())
                .find(|res| {
                    res.name
                        .as_deref()
                        .is_some_and(|x| x.eq_ignore_ascii_case(n))
                })
                .map(reserved)
                .or_else(|| {
                    leases
                        .filter(|l| l.host_name.eq_ignore_ascii_case(n))
                        .max_by_key(|l| l.id)
                        .map(|l| (l.ip, l.mac))
                }),
            GuestRef::Mac(m) => leases
                .find(|l| l.mac == *m)
                .map(|l| (l.ip, l.mac))
                .or_else(|| {
                    self.ctx
                        .cfg
                        .nat
                        .bindings
                        .iter()
                        .find(|(mac, _)| mac == m)
                        .map(|(mac, ip)| (*ip, *mac))
                })
                .or_else(|| {
                    (self.dhcp.reservations().iter())
                        .find(|res| res.mac == *m)
                        .map(reserved)
                }),
            GuestRef::Ip(ip) => leases
                .find(|l| l.ip == *ip)
                .map(|l| l.mac)
                .or_else(|| {
                    self.ctx
                        .cfg
                        .nat
                        .bindings
                        .iter()
                        .find(|(_, b)| b == ip)
                        .map(|(mac, _)| *mac)
                })
                .or_else(|| self.ctx.arp.lookup(*ip))
                .map(|mac| (*ip, mac)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(proto: &str, listen: &str, to: &str) -> RawForward {
        RawForward {
            proto: proto.into(),
            listen: listen.into(),
            to: to.into(),
        }
    }

    #[test]
    fn forwards_parse_and_print_back() {
        for (p, l, t) in [
            ("tcp", "0.0.0.0:8080", "vm1:80"),
            ("udp", "127.0.0.1:5000-5009", "192.168.30.10:6000-6009"),
            ("tcp", "10.0.0.1:22", "02:00:00:00:0a:01:22"),
        ] {
            let f = raw(p, l, t).validate(0).unwrap();
            assert_eq!(f.to_raw(), raw(p, l, t));
        }
        let f = raw("TCP", "0.0.0.0:8080-8082", "VM1:80-82")
            .validate(0)
            .unwrap();
        assert_eq!(f.guest, GuestRef::Name("vm1".into()));
        let ports: Vec<_> = f.ports().map(|(a, g)| (a.port(), g)).collect();
        assert_eq!(ports, vec![(8080, 80), (8081, 81), (8082, 82)]);
    }

    #[test]
    fn bad_forwards_name_the_field() {
        for (r, field) in [
            (raw("sctp", "0.0.0.0:1", "vm1:1"), "forward[3].proto"),
            (raw("tcp", "0.0.0.0", "vm1:1"), "forward[3].listen"),
            (raw("tcp", "host:80", "vm1:1"), "forward[3].listen"),
            (raw("tcp", "0.0.0.0:0", "vm1:1"), "forward[3].listen"),
            (raw("tcp", "0.0.0.0:90-80", "vm1:1"), "forward[3].listen"),
            (
                raw("tcp", "0.0.0.0:1-2000", "vm1:1-2000"),
                "forward[3].listen",
            ),
            (raw("tcp", "0.0.0.0:80", "vm1"), "forward[3].to"),
            (raw("tcp", "0.0.0.0:80", "vm 1:80"), "forward[3].to"),
            (raw("tcp", "0.0.0.0:80", "127.0.0.1:80"), "forward[3].to"),
            (raw("tcp", "0.0.0.0:80-81", "vm1:80"), "forward[3].to"),
            (raw("tcp", "0.0.0.0:80", "vm1:70000"), "forward[3].to"),
        ] {
            let e = r.validate(3).unwrap_err().to_string();
            assert!(e.contains(field), "{r:?}: {e}");
        }
    }

    #[test]
    fn overlapping_forwards_are_refused() {
        let ok = validate_all(&[
            raw("tcp", "0.0.0.0:80", "vm1:80"),
            raw("udp", "0.0.0.0:80", "vm1:80"),
            raw("tcp", "127.0.0.1:81", "vm1:81"),
        ]);
        assert_eq!(ok.unwrap().len(), 3);
        let e = validate_all(&[
            raw("tcp", "127.0.0.1:8000-8010", "vm1:1-11"),
            raw("tcp", "0.0.0.0:8010", "vm2:80"),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("forward[1].listen") && e.contains("forward[0]"),
            "{e}"
        );
    }
}
