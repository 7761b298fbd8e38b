//! The egress policy: which destinations a guest's flows may reach on the sock side.
//!
//! Every guest is hostile, and a NAT's sockets are opened by the host: without a policy a guest
//! reaches the host's own loopback services, a cloud's instance-metadata address (which hands
//! out credentials), and addresses no packet should be sent to. So by default these are refused:
//! this network (0.0.0.0/8), loopback (127.0.0.0/8, reachable only through the configured
//! host-loopback alias), link-local (169.254.0.0/16), multicast (224.0.0.0/4) and the reserved
//! block with the broadcast address (240.0.0.0/4); for IPv6, the unspecified address and
//! loopback (::/128, ::1/128), IPv4-mapped addresses (::ffff:0:0/96, which a host socket would
//! carry to IPv4, loopback included), link-local (fe80::/10), unique local (fc00::/7: the
//! host's own site) and multicast (ff00::/8). The operator's rules (`nat.egress`) come first,
//! in order, the first match deciding: `deny` closes more (the host's LAN), `allow` opens a
//! refused range (one port of the metadata service).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use crate::nat::session::Proto;

/// What a rule does with the destinations it matches.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Action {
    /// The flow is carried.
    Allow,
    /// The flow is refused (RST for TCP, ICMP administratively prohibited otherwise).
    Deny,
}

/// One operator rule: `allow|deny CIDR [tcp|udp|icmp] [PORT|LOW-HIGH]`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Rule {
    /// Allow or deny.
    pub(crate) action: Action,
    /// The network's address (host bits clear), of either family.
    pub(crate) net: IpAddr,
    /// The network's prefix length.
    pub(crate) prefix: u8,
    /// The protocol it applies to; None: every protocol.
    pub(crate) proto: Option<Proto>,
    /// The destination ports it applies to (TCP and UDP); None: every port.
    pub(crate) ports: Option<(u16, u16)>,
}

/// The ranges refused unless a rule allows them, with why (for the log and the docs).
pub(crate) const REFUSED_BY_DEFAULT: [(IpAddr, u8, &str); 11] = [
    (IpAddr::V4(Ipv4Addr::new(0, 0, 0, 0)), 8, "this network"),
    (IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)), 8, "loopback"),
    (
        IpAddr::V4(Ipv4Addr::new(169, 254, 0, 0)),
        16,
        "link-local (instance metadata)",
    ),
    (IpAddr::V4(Ipv4Addr::new(224, 0, 0, 0)), 4, "multicast"),
    (
        IpAddr::V4(Ipv4Addr::new(240, 0, 0, 0)),
        4,
        "reserved and broadcast",
    ),
    (IpAddr::V6(Ipv6Addr::UNSPECIFIED), 128, "unspecified"),
    (IpAddr::V6(Ipv6Addr::LOCALHOST), 128, "loopback"),
    (
        IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0)),
        96,
        "IPv4-mapped",
    ),
    (
        IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0)),
        10,
        "link-local",
    ),
    (
        IpAddr::V6(Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0)),
        7,
        "unique local",
    ),
    (
        IpAddr::V6(Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0)),
        8,
        "multicast",
    ),
];

/// The bits of `ip` as a 128-bit number and its family's width.
fn bits(ip: IpAddr) -> (u128, u32) {
    match ip {
        IpAddr::V4(a) => (u128::from(u32::from(a)), 32),
        IpAddr::V6(a) => (u128::from(a), 128),
    }
}

/// The mask of a `prefix`-bit network in a `width`-bit address.
fn mask(prefix: u8, width: u32) -> u128 {
    let all = if width == 128 {
        u128::MAX
    } else {
        (1u128 << width) - 1
    };
    all & all.checked_shl(width - u32::from(prefix)).unwrap_or(0)
}

fn in_net(ip: IpAddr, net: IpAddr, prefix: u8) -> bool {
    let ((a, w), (n, nw)) = (bits(ip), bits(net));
    w == nw && a & mask(prefix, w) == n
}

impl Rule {
    /// Whether the rule covers a flow of `proto` to `ip`:`port` (port 0 for ICMP).
    pub(crate) fn matches(&self, proto: Proto, ip: IpAddr, port: u16) -> bool {
        in_net(ip, self.net, self.prefix)
            && self
                .proto
                .is_none_or(|p| p == proto || (p == Proto::Udp && proto == Proto::Dns))
            && self
                .ports
                .is_none_or(|(lo, hi)| (lo..=hi).contains(&port) && proto != Proto::Icmp)
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let action = match self.action {
            Action::Allow => "allow",
            Action::Deny => "deny",
        };
        write!(f, "{action} {}/{}", self.net, self.prefix)?;
        if let Some(p) = self.proto {
            write!(f, " {}", p.name().to_ascii_lowercase())?;
        }
        match self.ports {
            Some((lo, hi)) if lo == hi => write!(f, " {lo}"),
            Some((lo, hi)) => write!(f, " {lo}-{hi}"),
            None => Ok(()),
        }
    }
}

impl FromStr for Rule {
    type Err = String;

    fn from_str(s: &str) -> Result<Rule, String> {
        let mut words = s.split_whitespace();
        let action = match words.next() {
            Some("allow") => Action::Allow,
            Some("deny") => Action::Deny,
            _ => return Err(format!("`{s}`: a rule starts with allow or deny")),
        };
        let cidr = words
            .next()
            .ok_or_else(|| format!("`{s}`: the destination (ADDRESS/PREFIX) is missing"))?;
        let (addr_text, prefix) = match cidr.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (cidr, None),
        };
        let addr: IpAddr = addr_text
            .parse()
            .map_err(|_| format!("`{s}`: `{addr_text}` is not an IP address"))?;
        let (value, width) = bits(addr);
        let prefix: u8 = match prefix.map(str::parse::<u32>) {
            None => width as u8,
            Some(Ok(p)) if p <= width => p as u8,
            Some(_) => {
                return Err(format!(
                    "`{s}`: `/{}` is not a prefix length (0 to {width})",
                    prefix.unwrap_or_default()
                ))
            }
        };
        let m = mask(prefix, width);
        if value & !m != 0 {
            let net = match addr {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from((value & m) as u32)),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(value & m)),
            };
            return Err(format!(
                "`{s}`: {addr}/{prefix} has host bits set (the network is {net}/{prefix})"
            ));
        }
        let mut rule = Rule {
            action,
            net: addr,
            prefix,
            proto: None,
            ports: None,
        };
        let mut next = words.next();
        let proto = match next {
            Some("tcp") => Some(Some(Proto::Tcp)),
            Some("udp") => Some(Some(Proto::Udp)),
            Some("icmp") => Some(Some(Proto::Icmp)),
            Some("any") => Some(None),
            _ => None,
        };
        if let Some(p) = proto {
            rule.proto = p;
            next = words.next();
        }
        if let Some(ports) = next {
            if rule.proto.is_none_or(|p| p == Proto::Icmp) {
                return Err(format!("`{s}`: ports need tcp or udp before them"));
            }
            let (lo, hi) = ports.split_once('-').unwrap_or((ports, ports));
            let port = |p: &str| match p.parse::<u16>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(format!("`{s}`: `{p}` is not a port (1 to 65535)")),
            };
            let (lo, hi) = (port(lo)?, port(hi)?);
            if lo > hi {
                return Err(format!("`{s}`: the port range {lo}-{hi} is empty"));
            }
            rule.ports = Some((lo, hi));
        }
        if let Some(extra) = words.next() {
            return Err(format!("`{s}`: unexpected `{extra}`"));
        }
        Ok(rule)
    }
}

/// Whether a flow of `proto` to `ip`:`port` may leave: the first of `rules` that matches
/// decides; with none, the ranges of `REFUSED_BY_DEFAULT` are refused and the rest allowed.
pub(crate) fn permits(rules: &[Rule], proto: Proto, ip: IpAddr, port: u16) -> bool {
    if let Some(r) = rules.iter().find(|r| r.matches(proto, ip, port)) {
        return r.action == Action::Allow;
    }
    !REFUSED_BY_DEFAULT
        .iter()
        .any(|&(net, prefix, _)| in_net(ip, net, prefix))
}

/// The first operator rule that denies `ip`:`port` for `proto` (the defaults aside): how the
/// configuration refuses a DNS upstream the policy would not let a guest reach.
pub(crate) fn denied_by(rules: &[Rule], proto: Proto, ip: IpAddr, port: u16) -> Option<&Rule> {
    rules
        .iter()
        .find(|r| r.matches(proto, ip, port))
        .filter(|r| r.action == Action::Deny)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(list: &[&str]) -> Vec<Rule> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn the_defaults_refuse_special_ranges_and_allow_the_rest() {
        let none = [];
        for ip in [
            "0.1.2.3",
            "127.0.0.1",
            "127.9.9.9",
            "169.254.169.254",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
        ] {
            let ip: Ipv4Addr = ip.parse().unwrap();
            assert!(
                !permits(&none, Proto::Tcp, std::net::IpAddr::from(ip), 80),
                "{ip} allowed"
            );
            assert!(
                !permits(&none, Proto::Icmp, std::net::IpAddr::from(ip), 0),
                "{ip} allowed"
            );
        }
        for ip in [
            "10.0.0.1",
            "192.168.1.1",
            "8.8.8.8",
            "126.255.255.255",
            "128.0.0.1",
        ] {
            assert!(permits(&none, Proto::Udp, ip.parse().unwrap(), 53), "{ip}");
        }
    }

    #[test]
    fn the_first_matching_rule_decides() {
        let r = rules(&[
            "deny 192.168.1.0/24",
            "allow 169.254.169.254/32 tcp 80",
            "allow 127.0.0.1 udp 5000-5010",
        ]);
        let md = Ipv4Addr::new(169, 254, 169, 254);
        assert!(permits(&r, Proto::Tcp, std::net::IpAddr::from(md), 80));
        assert!(
            !permits(&r, Proto::Tcp, std::net::IpAddr::from(md), 443),
            "only port 80 was opened"
        );
        assert!(
            !permits(&r, Proto::Udp, std::net::IpAddr::from(md), 80),
            "only TCP was opened"
        );
        assert!(!permits(
            &r,
            Proto::Udp,
            std::net::IpAddr::from(Ipv4Addr::new(192, 168, 1, 7)),
            53
        ));
        assert!(permits(
            &r,
            Proto::Udp,
            std::net::IpAddr::from(Ipv4Addr::LOCALHOST),
            5005
        ));
        assert!(
            permits(
                &r,
                Proto::Dns,
                std::net::IpAddr::from(Ipv4Addr::LOCALHOST),
                5005
            ),
            "DNS is UDP"
        );
        assert!(!permits(
            &r,
            Proto::Udp,
            std::net::IpAddr::from(Ipv4Addr::LOCALHOST),
            5011
        ));
        assert!(permits(
            &r,
            Proto::Icmp,
            std::net::IpAddr::from(Ipv4Addr::new(192, 168, 2, 1)),
            0
        ));
        assert_eq!(
            denied_by(
                &r,
                Proto::Udp,
                std::net::IpAddr::from(Ipv4Addr::new(192, 168, 1, 1)),
                53
            )
            .map(|r| r.prefix),
            Some(24)
        );
    }

    #[test]
    fn rules_print_as_they_parse() {
        for s in [
            "allow 169.254.169.254/32 tcp 80",
            "deny 10.0.0.0/8",
            "deny 0.0.0.0/0 udp 1-1023",
            "allow 127.0.0.0/8 icmp",
        ] {
            assert_eq!(s.parse::<Rule>().unwrap().to_string(), s);
        }
        assert_eq!(
            "allow 127.0.0.1".parse::<Rule>().unwrap().to_string(),
            "allow 127.0.0.1/32"
        );
    }

    #[test]
    fn ipv6_destinations_have_their_own_defaults_and_rules() {
        let none = [];
        for ip in [
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "fe80::1",
            "fd00::5",
            "ff02::1",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(!permits(&none, Proto::Tcp, ip, 80), "{ip} allowed");
        }
        let global: IpAddr = "2001:db8::80".parse().unwrap();
        assert!(permits(&none, Proto::Tcp, global, 80));
        let r = rules(&["deny 2001:db8::/32 tcp 80", "allow fd00:1::/64"]);
        assert!(!permits(&r, Proto::Tcp, global, 80));
        assert!(permits(&r, Proto::Tcp, global, 443));
        assert!(permits(&r, Proto::Udp, "fd00:1::9".parse().unwrap(), 53));
        // A rule of one family never matches the other.
        let all4 = rules(&["deny 0.0.0.0/0"]);
        assert!(permits(&all4, Proto::Tcp, global, 80));
        assert_eq!(r[0].to_string(), "deny 2001:db8::/32 tcp 80");
    }

    #[test]
    fn malformed_rules_say_what_is_wrong() {
        for (s, why) in [
            ("permit 1.2.3.4", "allow or deny"),
            ("allow", "missing"),
            ("allow 1.2.3", "not an IP address"),
            ("allow 1.2.3.4/33", "prefix length (0 to 32)"),
            ("allow 2001:db8::/129", "prefix length (0 to 128)"),
            (
                "allow 2001:db8::1/64",
                "host bits set (the network is 2001:db8::/64)",
            ),
            ("allow 10.0.0.1/8", "host bits"),
            ("allow 10.0.0.0/8 80", "ports need tcp or udp"),
            ("allow 10.0.0.0/8 icmp 80", "ports need tcp or udp"),
            ("allow 10.0.0.0/8 tcp 0", "not a port"),
            ("allow 10.0.0.0/8 tcp 90-80", "empty"),
            ("allow 10.0.0.0/8 tcp 80 x", "unexpected"),
        ] {
            let e = s.parse::<Rule>().unwrap_err();
            assert!(e.contains(why), "{s}: {e}");
        }
    }
}

/// The policy as guests meet it: through the engine, with a simulated sock side.
#[cfg(test)]
mod engine_tests {
    use std::net::{Ipv4Addr, SocketAddrV4};

    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{
        Icmpv4Packet, Icmpv4Repr, IpAddress, IpProtocol, Ipv4Packet, TcpControl, TcpPacket,
        TcpRepr, TcpSeqNumber,
    };

    use crate::event::Event;
    use crate::sim::SimSocket;
    use crate::stats::DropReason;
    use crate::testing::*;

    fn tcp_syn(src: SocketAddrV4, dst: SocketAddrV4) -> Vec<u8> {
        let repr = TcpRepr {
            src_port: src.port(),
            dst_port: dst.port(),
            control: TcpControl::Syn,
            seq_number: TcpSeqNumber(1000),
            ack_number: None,
            window_len: 65535,
            window_scale: None,
            max_seg_size: Some(1460),
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload: &[],
        };
        let mut seg = vec![0u8; repr.buffer_len()];
        repr.emit(
            &mut TcpPacket::new_unchecked(&mut seg[..]),
            &IpAddress::Ipv4(*src.ip()),
            &IpAddress::Ipv4(*dst.ip()),
            &ChecksumCapabilities::default(),
        );
        ipv4_frame(*src.ip(), *dst.ip(), IpProtocol::Tcp, 1, 0, false, &seg)
    }

    fn icmp_echo(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
        let repr = Icmpv4Repr::EchoRequest {
            ident: 7,
            seq_no: 1,
            data: b"ping",
        };
        let mut m = vec![0u8; repr.buffer_len()];
        repr.emit(
            &mut Icmpv4Packet::new_unchecked(&mut m[..]),
            &ChecksumCapabilities::default(),
        );
        ipv4_frame(src, dst, IpProtocol::Icmp, 1, 0, false, &m)
    }

    /// The (type, code, from) of the one ICMP message in `out`, if that is what it holds.
    fn icmp_out(out: &crate::FrameBatch) -> Option<(u8, u8, Ipv4Addr)> {
        let p = packets(out);
        let ip = Ipv4Packet::new_checked(p.first()?.as_slice()).ok()?;
        (ip.next_header() == IpProtocol::Icmp).then(|| {
            let m = ip.payload();
            (m[0], m[1], ip.src_addr())
        })
    }

    fn refusals(e: &mut crate::Engine) -> usize {
        std::iter::from_fn(|| e.poll_event())
            .filter(|ev| matches!(ev, Event::EgressRefused { .. }))
            .count()
    }

    const GUEST: SocketAddrV4 = SocketAddrV4::new(GUEST_IP, 40000);

    #[test]
    fn loopback_and_metadata_are_refused_visibly_by_default() {
        let (mut e, mut h, mut out) = setup();
        let lo = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 18080);
        e.handle_frame(T0, &udp_frame(GUEST, lo, b"x"), &mut h, &mut out);
        assert_eq!(icmp_out(&out), Some((3, 13, HOST_IP)), "admin prohibited");
        assert!(h.sockets.is_empty(), "no socket for a refused flow");
        out.clear();

        let md = SocketAddrV4::new(Ipv4Addr::new(169, 254, 169, 254), 80);
        e.handle_frame(T0, &tcp_syn(GUEST, md), &mut h, &mut out);
        let p = packets(&out);
        let ip = Ipv4Packet::new_checked(p[0].as_slice()).unwrap();
        let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
        assert!(tcp.rst(), "a refused SYN is reset");
        assert!(h.sockets.is_empty());
        out.clear();

        e.handle_frame(
            T0,
            &icmp_echo(GUEST_IP, Ipv4Addr::new(127, 0, 0, 1)),
            &mut h,
            &mut out,
        );
        assert_eq!(icmp_out(&out), Some((3, 13, HOST_IP)));
        assert_eq!(e.stats().drops_of(DropReason::Policy), 3);
        assert_eq!(refusals(&mut e), 3);
    }

    #[test]
    fn an_allow_rule_opens_one_port_and_a_deny_rule_closes_a_network() {
        let (mut e, mut h, mut out) = setup_with(|c| {
            c.nat.egress = vec![
                "allow 127.0.0.1 udp 5000".parse().unwrap(),
                "deny 10.9.0.0/16".parse().unwrap(),
            ]
        });
        let open = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 5000);
        e.handle_frame(T0, &udp_frame(GUEST, open, b"x"), &mut h, &mut out);
        assert!(
            h.sockets.values().any(
                |s| matches!(s, SimSocket::Udp(u) if u.dst == std::net::SocketAddr::from(open))
            ),
            "the allowed port is carried"
        );
        let other = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 5001);
        e.handle_frame(T0, &udp_frame(GUEST, other, b"x"), &mut h, &mut out);
        let lan = SocketAddrV4::new(Ipv4Addr::new(10, 9, 1, 1), 53);
        e.handle_frame(T0, &udp_frame(GUEST, lan, b"x"), &mut h, &mut out);
        assert_eq!(h.sockets.len(), 1);
        assert_eq!(e.stats().drops_of(DropReason::Policy), 2);
    }

    #[test]
    fn the_host_loopback_alias_is_the_door_to_the_hosts_loopback() {
        let alias = Ipv4Addr::new(192, 168, 30, 2);
        let (mut e, mut h, mut out) = setup_with(|c| c.nat.host_loopback = Some(alias));
        let to = SocketAddrV4::new(alias, 18080);
        e.handle_frame(T0, &udp_frame(GUEST, to, b"x"), &mut h, &mut out);
        let lo = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 18080);
        assert!(h
            .sockets
            .values()
            .any(|s| matches!(s, SimSocket::Udp(u) if u.dst == std::net::SocketAddr::from(lo))));
        assert_eq!(e.stats().drops_of(DropReason::Policy), 0);
    }
}
