//! The names the DNS relay answers itself instead of asking its upstreams: the guests' DHCP host
//! names (`NAME.DOMAIN`, and `NAME` alone), the named static reservations, and the operator's
//! `[dns] hosts` and `[dns] hosts_file`. A name under the DHCP domain that none of these knows
//! is answered NXDOMAIN here, so that the guests' local names never leak to the resolvers of
//! the machine.
//!
//! Who owns a name when two claim it: the operator's names first (`[dns] hosts`, then the hosts
//! file, then the reservations), and among leases the oldest one. A guest chooses the host name
//! it sends, so a later guest must not be able to take over a name others already resolve.
//!
//! The table is rebuilt from the lease table when that changes (its generation) or when the
//! configuration changes; between rebuilds a lease's expiry is checked at each lookup.
//!
//! A guest's IPv6 addresses are not in the table: they are those its MAC holds in the source
//! bindings at the moment of the question (`GuestAddrs6`), so the AAAA of its name and the PTR
//! of each address (`ip6.arpa`) follow its SLAAC, privacy and DHCPv6 addresses as they change.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use crate::config::{Config, Mac};
use crate::time::Instant;
use crate::vhost::dhcp::DhcpServer;

/// The guests' IPv6 addresses, as the source bindings hold them now.
pub(crate) trait GuestAddrs6 {
    /// The addresses other than link-local `mac` holds, in order.
    fn ipv6_of(&mut self, mac: Mac) -> Vec<Ipv6Addr>;
    /// The MAC holding `ip` (other than link-local), if one does.
    fn mac_of6(&mut self, ip: Ipv6Addr) -> Option<Mac>;
}

/// Most names `[dns] hosts` and `[dns] hosts_file` may hold together.
pub const MAX_HOSTS: usize = 10_000;
/// The TTL of a local answer: short, since a lease's name moves when the lease does.
pub const TTL: u32 = 60;

/// A label as RFC 1123 allows one: letters, digits and `-`, 1 to 63 bytes, no `-` at either end.
fn is_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// `s` as a host name the relay can answer for (one trailing dot dropped, surrounding blanks
/// ignored), or `None` when it is not one: labels as [`is_label`] says, 253 bytes at most.
pub fn normalize(s: &str) -> Option<String> {
    let s = s.trim();
    let s = s.strip_suffix('.').unwrap_or(s);
    (s.len() <= 253 && s.split('.').all(is_label)).then(|| s.to_owned())
}

/// What the relay does with a question.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Answer {
    /// One A record.
    A(Ipv4Addr, u32),
    /// AAAA records: a guest's IPv6 addresses.
    Aaaa(Vec<Ipv6Addr>, u32),
    /// One PTR record naming this host.
    Ptr(String, u32),
    /// The name is known here but has no record of the type asked (an operator's name for
    /// AAAA, a guest with no IPv6 address in use).
    NoData,
    /// A name under the local domain that is not known.
    NxDomain,
    /// Not a local name: ask the upstreams.
    Relay,
}

#[derive(Clone, Debug)]
struct Known {
    /// The name as a PTR answer gives it (a lease's with the domain).
    name: String,
    ip: Ipv4Addr,
    /// A lease's end; the operator's names do not end.
    until: Option<Instant>,
    /// The guest's MAC, for a lease's or a reservation's name: its IPv6 addresses are those
    /// bound to that MAC.
    mac: Option<Mac>,
}

impl Known {
    /// The TTL at `now`, or `None` once the lease is over.
    fn ttl(&self, now: Instant) -> Option<u32> {
        match self.until {
            None => Some(TTL),
            Some(t) if t > now => {
                let left = t.saturating_since(now).as_secs();
                Some(u32::try_from(left).unwrap_or(u32::MAX).min(TTL))
            }
            Some(_) => None,
        }
    }
}

/// The local names, indexed both ways.
#[derive(Default)]
pub(crate) struct Names {
    /// By lower-case name.
    by_name: HashMap<String, Known>,
    by_addr: HashMap<Ipv4Addr, Known>,
    /// A guest's name by its MAC: what the PTR of its IPv6 addresses gives.
    by_mac: HashMap<Mac, Known>,
    /// The DHCP domain, lower case.
    domain: Option<String>,
    /// The lease-table generation the index was built from; `None`: to be rebuilt.
    built: Option<u64>,
}

impl Names {
    /// The configuration changed: rebuild before the next lookup.
    pub(crate) fn invalidate(&mut self) {
        self.built = None;
    }

    fn add(&mut self, key: String, k: Known) {
        self.by_addr.entry(k.ip).or_insert_with(|| k.clone());
        if let Some(mac) = k.mac {
            self.by_mac.entry(mac).or_insert_with(|| k.clone());
        }
        self.by_name.entry(key).or_insert(k);
    }

    /// A lease's or a reservation's host name: `label.DOMAIN` and `label` alone.
    fn add_host(&mut self, label: &str, ip: Ipv4Addr, mac: Mac, until: Option<Instant>) {
        if !is_label(label) {
            // What a client sent may be anything printable; only a label can be looked up.
            return;
        }
        let bare = label.to_ascii_lowercase();
        let name = match &self.domain {
            Some(d) => format!("{label}.{d}"),
            None => label.to_owned(),
        };
        let fqdn = name.to_ascii_lowercase();
        if self.by_name.contains_key(&fqdn) || self.by_name.contains_key(&bare) {
            // Taken already by someone listed before (the operator, or an older lease).
            return;
        }
        let k = Known {
            name,
            ip,
            until,
            mac: Some(mac),
        };
        self.add(bare, k.clone());
        self.add(fqdn, k);
    }

    fn rebuild(&mut self, cfg: &Config, dhcp: &DhcpServer) {
        self.by_name.clear();
        self.by_addr.clear();
        self.by_mac.clear();
        self.domain = (cfg.dhcp.domain.as_deref())
            .and_then(normalize)
            .map(|d| d.to_ascii_lowercase());
        for (name, ip) in cfg.dns.hosts.iter().chain(&cfg.dns.hosts_from_file) {
            let k = Known {
                name: name.clone(),
                ip: *ip,
                until: None,
                mac: None,
            };
            self.add(name.to_ascii_lowercase(), k);
        }
        for r in &cfg.dhcp.reservations {
            if let Some(n) = &r.name {
                self.add_host(n, r.ip, r.mac, None);
            }
        }
        // The oldest lease keeps a name two guests claim (ids break ties between leases made
        // at the same instant; they only grow until they wrap, which the time makes moot).
        let mut leases: Vec<_> = dhcp.leases().filter(|l| is_label(&l.host_name)).collect();
        leases.sort_by_key(|l| (l.leased_at, l.id));
        for l in leases {
            self.add_host(&l.host_name, l.ip, l.mac, Some(l.expires_at));
        }
        self.built = Some(dhcp.generation());
    }

    /// What to do with a question for `qname` (lower case, no trailing dot) of type `qtype`;
    /// `guests6` gives the guests' IPv6 addresses in use, for AAAA and `ip6.arpa` PTR.
    pub(crate) fn lookup(
        &mut self,
        now: Instant,
        (cfg, dhcp): (&Config, &DhcpServer),
        qname: &str,
        qtype: u16,
        guests6: &mut dyn GuestAddrs6,
    ) -> Answer {
        if self.built != Some(dhcp.generation()) {
            self.rebuild(cfg, dhcp);
        }
        if let Some(rest) = qname.strip_suffix(".in-addr.arpa") {
            let Some(ip) = reverse_ip(rest) else {
                return Answer::Relay;
            };
            return reverse_answer(self.by_addr.get(&ip), now, qtype);
        }
        if let Some(rest) = qname.strip_suffix(".ip6.arpa") {
            let Some(ip) = reverse_ip6(rest) else {
                return Answer::Relay;
            };
            let mac = guests6.mac_of6(ip);
            return reverse_answer(mac.and_then(|m| self.by_mac.get(&m)), now, qtype);
        }
        if let Some((k, ttl)) = self.by_name.get(qname).and_then(|k| Some((k, k.ttl(now)?))) {
            return match (qtype, k.mac) {
                (TYPE_A, _) => Answer::A(k.ip, ttl),
                (TYPE_AAAA, Some(mac)) => {
                    let addrs = guests6.ipv6_of(mac);
                    if addrs.is_empty() {
                        Answer::NoData
                    } else {
                        Answer::Aaaa(addrs, ttl)
                    }
                }
                _ => Answer::NoData,
            };
        }
        match &self.domain {
            // The domain itself exists (its names do), with nothing of its own to give.
            Some(d) if qname == d => Answer::NoData,
            Some(d)
                if qname.len() > d.len() + 1 && qname.ends_with(d.as_str()) && {
                    qname.as_bytes()[qname.len() - d.len() - 1] == b'.'
                } =>
            {
                Answer::NxDomain
            }
            _ => Answer::Relay,
        }
    }
}

pub(crate) const TYPE_A: u16 = 1;
pub(crate) const TYPE_AAAA: u16 = 28;
pub(crate) const TYPE_PTR: u16 = 12;

/// The answer to a reverse name whose address names `known` (a PTR question gets its name);
/// an address nobody here holds is the upstreams' to answer.
fn reverse_answer(known: Option<&Known>, now: Instant, qtype: u16) -> Answer {
    match known.and_then(|k| Some((k, k.ttl(now)?))) {
        Some((k, ttl)) if qtype == TYPE_PTR => Answer::Ptr(k.name.clone(), ttl),
        Some(_) => Answer::NoData,
        None => Answer::Relay,
    }
}

/// The 32 nibbles of an `ip6.arpa` name (least significant first, one hex digit a label, either
/// case) as the address they spell.
fn reverse_ip6(rest: &str) -> Option<Ipv6Addr> {
    let mut value: u128 = 0;
    let mut n = 0;
    for label in rest.split('.') {
        let &[digit] = label.as_bytes() else {
            return None;
        };
        let v = char::from(digit).to_digit(16)?;
        if n == 32 {
            return None;
        }
        value |= u128::from(v) << (4 * n);
        n += 1;
    }
    (n == 32).then(|| Ipv6Addr::from(value))
}

/// `D.C.B.A` (of `D.C.B.A.in-addr.arpa`) as the address `A.B.C.D`.
fn reverse_ip(rest: &str) -> Option<Ipv4Addr> {
    let mut o = [0u8; 4];
    let mut parts = rest.split('.');
    for i in (0..4).rev() {
        let p = parts.next()?;
        // No leading zeros, no signs: one spelling per address.
        let digits = p.bytes().all(|b| b.is_ascii_digit());
        if !digits || p.is_empty() || p.len() > 3 || (p.len() > 1 && p.starts_with('0')) {
            return None;
        }
        o[i] = p.parse().ok()?;
    }
    parts.next().is_none().then(|| Ipv4Addr::from(o))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        assert_eq!(normalize(" Printer.LAN. "), Some("Printer.LAN".into()));
        assert_eq!(normalize("vm1"), Some("vm1".into()));
        for bad in [
            "", ".", "a..b", "-a.lan", "a-.lan", "a_b.lan", "ä.lan", "a b",
        ] {
            assert_eq!(normalize(bad), None, "{bad}");
        }
        assert_eq!(normalize(&"a".repeat(64)), None);
        let long = vec!["a".repeat(63); 4].join(".");
        assert_eq!(normalize(&long), None, "{} bytes", long.len());
    }

    #[test]
    fn ip6_reverse_names_are_32_nibbles() {
        let ip: Ipv6Addr = "fd68:7562:6e61:1e::1a2b".parse().unwrap();
        let name = "b.2.a.1.0.0.0.0.0.0.0.0.0.0.0.0.e.1.0.0.1.6.e.6.2.6.5.7.8.6.d.f";
        assert_eq!(reverse_ip6(name), Some(ip));
        assert_eq!(reverse_ip6(&name.to_ascii_uppercase()), Some(ip));
        let short = &name[2..];
        let long = format!("0.{name}");
        for bad in [
            short,
            long.as_str(),
            "",
            "g.2.a.1",
            &name.replace("b.2", "b2."),
        ] {
            assert_eq!(reverse_ip6(bad), None, "{bad}");
        }
    }

    #[test]
    fn reverse_names_parse_one_way() {
        assert_eq!(reverse_ip("4.3.2.1"), Some(Ipv4Addr::new(1, 2, 3, 4)));
        for bad in [
            "3.2.1",
            "5.4.3.2.1",
            "04.3.2.1",
            "256.3.2.1",
            "+4.3.2.1",
            "",
        ] {
            assert_eq!(reverse_ip(bad), None, "{bad}");
        }
    }
}
