//! Static reservations (`[[dhcp.reservation]]`, `hubnat dhcp reserve add`): a MAC that always
//! gets one address, inside the dynamic range or outside it, and that no other MAC is given.
//! This is the configuration's form and its validation; the pool (`pool.rs`) honours them.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::config::{Config, ConfigError, Mac};

/// A reservation as written in the file: `mac = "02:00:00:00:00:20"`, `ip = "192.168.30.20"`,
/// `name = "vm1"` (optional).
#[derive(Clone, Default, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RawReservation {
    /// The client's hardware address.
    pub mac: String,
    /// The address it always gets.
    pub ip: String,
    /// Its host name when its DHCP client sends none (forwards find it by this name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A validated reservation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reservation {
    /// The client's hardware address.
    pub mac: Mac,
    /// The address it always gets.
    pub ip: Ipv4Addr,
    /// Its host name when its DHCP client sends none.
    pub name: Option<String>,
}

impl Reservation {
    /// The file's form.
    pub fn to_raw(&self) -> RawReservation {
        RawReservation {
            mac: self.mac.to_string(),
            ip: self.ip.to_string(),
            name: self.name.clone(),
        }
    }
}

fn err(index: usize, field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Reservation {
        index,
        field,
        message: message.into(),
    }
}

/// A host name as RFC 1123 allows one label of it: letters, digits and `-`, 1 to 63 bytes, not
/// starting or ending with `-`. Stricter than what a client may send, because the operator's
/// name is what a forward is written with and what other tools will resolve.
fn is_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Validates the reservations against the rest of the configuration (`cfg`, whose own
/// `dhcp.reservations` is not read): each field is named in its error
/// (`dhcp.reservation[2].ip`).
pub(crate) fn validate_all(
    raw: &[RawReservation],
    cfg: &Config,
) -> Result<Vec<Reservation>, ConfigError> {
    let d = &cfg.dhcp;
    let (host_mask, dhcp_mask) = (u32::from(cfg.host.mask), u32::from(d.mask));
    let mut out: Vec<Reservation> = Vec::with_capacity(raw.len());
    for (i, r) in raw.iter().enumerate() {
        let m = r.mac.trim();
        let mac: Mac = m
            .parse()
            .map_err(|_| err(i, "mac", format!("`{m}` is not a MAC address")))?;
        if mac.0[0] & 1 != 0 || mac == Mac::default() {
            return Err(err(i, "mac", format!("{mac} cannot be a client's MAC")));
        }
        if Some(mac) == cfg.host.mac {
            return Err(err(i, "mac", format!("{mac} is the virtual host's MAC")));
        }
        if let Some(j) = out.iter().position(|o| o.mac == mac) {
            return Err(err(
                i,
                "mac",
                format!("{mac} is already reserved (dhcp.reservation[{j}])"),
            ));
        }

        let a = r.ip.trim();
        let ip: Ipv4Addr = a
            .parse()
            .map_err(|_| err(i, "ip", format!("`{a}` is not an IPv4 address")))?;
        let n = u32::from(ip);
        // The clients' subnet is the one DHCP gives them; it lies in the virtual host's, and
        // both must hold the address for the client to reach the virtual host at all.
        let subnets = [
            (
                u32::from(cfg.host.ip),
                host_mask,
                "the virtual host's subnet",
            ),
            (
                u32::from(d.range_start),
                dhcp_mask,
                "the DHCP clients' subnet",
            ),
        ];
        for (base, mask, what) in subnets {
            if n & mask != base & mask {
                return Err(err(i, "ip", format!("{ip} is outside {what}")));
            }
            let hosts = !mask;
            // A /31 or /32 has no network or broadcast address to keep out.
            if hosts >= 3 && (n & hosts == 0 || n & hosts == hosts) {
                return Err(err(
                    i,
                    "ip",
                    format!("{ip} is the network or broadcast address of {what}"),
                ));
            }
        }
        if cfg.is_host_address(ip) {
            return Err(err(i, "ip", format!("{ip} is the virtual host's address")));
        }
        let refuse = |what: &str| Err(err(i, "ip", format!("{ip} is {what}")));
        if Some(ip) == cfg.nat.host_loopback {
            return refuse("the host-loopback alias (`nat.host_loopback`)");
        }
        if Some(ip) == d.gateway {
            return refuse("the gateway given to clients (`dhcp.gateway`)");
        }
        if d.dns.contains(&ip) {
            return refuse("a DNS server given to clients (`dhcp.dns`)");
        }
        if d.ntp.contains(&ip) {
            return refuse("an NTP server given to clients (`dhcp.ntp`)");
        }
        if let Some((other, _)) = cfg.nat.bindings.iter().find(|(m, b)| *b == ip && *m != mac) {
            return refuse(&format!("bound to {other} (`nat.bindings`)"));
        }
        if let Some(j) = out.iter().position(|o| o.ip == ip) {
            return refuse(&format!("already reserved (dhcp.reservation[{j}])"));
        }

        let name = match r.name.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(s) if !is_label(s) => {
                return Err(err(
                    i,
                    "name",
                    format!("`{s}` is not a host name (letters, digits and `-`, 1 to 63, not starting or ending with `-`)"),
                ))
            }
            Some(s) => {
                if let Some(j) = out.iter().position(|o| {
                    o.name
                        .as_deref()
                        .is_some_and(|x| x.eq_ignore_ascii_case(s))
                }) {
                    return Err(err(
                        i,
                        "name",
                        format!("`{s}` is already the name of dhcp.reservation[{j}]"),
                    ));
                }
                Some(s.to_owned())
            }
        };
        out.push(Reservation { mac, ip, name });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RawConfig;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_raw(&RawConfig::from_toml(text).unwrap())
    }

    fn res(mac: &str, ip: &str, name: Option<&str>) -> String {
        let name = name.map_or(String::new(), |n| format!("name = \"{n}\"\n"));
        format!("[[dhcp.reservation]]\nmac = \"{mac}\"\nip = \"{ip}\"\n{name}")
    }

    #[test]
    fn reservations_load_inside_and_outside_the_range() {
        let text = res("02:00:00:00:00:20", "192.168.30.20", Some("vm1"))
            + &res("02-00-00-00-00-21", "192.168.30.250", None);
        let c = load(&text).unwrap();
        assert_eq!(
            c.dhcp.reservations,
            vec![
                Reservation {
                    mac: Mac([2, 0, 0, 0, 0, 0x20]),
                    ip: Ipv4Addr::new(192, 168, 30, 20),
                    name: Some("vm1".into()),
                },
                Reservation {
                    mac: Mac([2, 0, 0, 0, 0, 0x21]),
                    ip: Ipv4Addr::new(192, 168, 30, 250),
                    name: None,
                },
            ]
        );
        // The file's form loads back to the same.
        assert_eq!(
            c.dhcp.reservations[1].to_raw(),
            RawReservation {
                mac: "02:00:00:00:00:21".into(),
                ip: "192.168.30.250".into(),
                name: None,
            }
        );
    }

    #[test]
    fn bad_reservations_name_the_entry_and_the_field() {
        let ok = res("02:00:00:00:00:20", "192.168.30.20", Some("vm1"));
        let cases = [
            (
                res("02:00:00:00:00", "192.168.30.21", None),
                "mac",
                "not a MAC",
            ),
            (
                res("01:00:5e:00:00:01", "192.168.30.21", None),
                "mac",
                "client",
            ),
            (
                res("02:00:00:00:00:20", "192.168.30.21", None),
                "mac",
                "reservation[0]",
            ),
            (
                res("02:00:00:00:00:21", "192.168.30.x", None),
                "ip",
                "not an IPv4",
            ),
            (
                res("02:00:00:00:00:21", "192.168.31.21", None),
                "ip",
                "outside",
            ),
            (
                res("02:00:00:00:00:21", "192.168.30.0", None),
                "ip",
                "network or broadcast",
            ),
            (
                res("02:00:00:00:00:21", "192.168.30.255", None),
                "ip",
                "network or broadcast",
            ),
            (
                res("02:00:00:00:00:21", "192.168.30.1", None),
                "ip",
                "virtual host",
            ),
            (
                res("02:00:00:00:00:21", "192.168.30.20", None),
                "ip",
                "reservation[0]",
            ),
            (
                res("02:00:00:00:00:21", "192.168.30.21", Some("a_b")),
                "name",
                "host name",
            ),
            (
                res("02:00:00:00:00:21", "192.168.30.21", Some("-vm")),
                "name",
                "host name",
            ),
            (
                res("02:00:00:00:00:21", "192.168.30.21", Some(&"x".repeat(64))),
                "name",
                "1 to 63",
            ),
            (
                res("02:00:00:00:00:21", "192.168.30.21", Some("VM1")),
                "name",
                "reservation[0]",
            ),
        ];
        for (second, field, why) in cases {
            let e = load(&(ok.clone() + &second))
                .expect_err(&second)
                .to_string();
            let want = format!("`dhcp.reservation[1].{field}`");
            assert!(e.contains(&want) && e.contains(why), "{second}: {e}");
        }
        // What other settings give clients or bind is not reservable either.
        let e = load(&format!(
            "[dhcp]\nntp = [\"192.168.30.5\"]\n{}",
            res("02:00:00:00:00:21", "192.168.30.5", None)
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("dhcp.reservation[0].ip") && e.contains("NTP"),
            "{e}"
        );
        let e = load(&format!(
            "[nat]\nbindings = [\"02:00:00:00:00:99 192.168.30.6\"]\n{}",
            res("02:00:00:00:00:21", "192.168.30.6", None)
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("dhcp.reservation[0].ip") && e.contains("bindings"),
            "{e}"
        );
        let e = load(&format!(
            "[nat]\nhost_loopback = \"192.168.30.2\"\n{}",
            res("02:00:00:00:00:21", "192.168.30.2", None)
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("host-loopback"), "{e}");
        // A missing field is the file's error.
        assert!(
            RawConfig::from_toml("[[dhcp.reservation]]\nmac = \"02:00:00:00:00:21\"\n").is_err()
        );
    }
}
