//! The core's events as the seed's security log lines (SoftEther manual 3.7.8).
//!
//! `TracingSink` is the runtime's `EventSink`: it emits each event through `tracing` with target
//! `securenat`, so that the security log (`seclog`) and any other subscriber get them with the
//! seed's words. The words live here and nowhere else.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use hubnat_core::event::Event;
use hubnat_core::nat::Proto;
use hubnat_runtime::events::EventSink;

/// The `tracing` target of the security log's events.
pub const TARGET: &str = "securenat";

/// The `event` field of a "connection successful" line (the one `seclog` names the host of).
pub const TCP_CONNECTED: &str = "tcp_connected";

/// The `event` field of a session a forward opened toward a guest (the seed's line is that of
/// any session, so the JSON lines tell the direction by this).
pub const INBOUND_SESSION: &str = "inbound_session";

/// The runtime's event sink: every event becomes a `securenat` tracing event, at most
/// `per_second` a second of each kind (0: no limit). Beyond that, lines are counted, and the
/// count is logged as one line when the kind's next second begins: a flood of sessions costs a
/// line a second, not a line a session, on stderr and in the security log.
pub struct TracingSink {
    per_second: u64,
    start: Instant,
    kinds: [KindLimit; KINDS],
}

/// One kind's window: the second it counts (since `start`), lines written and lines held back
/// in it. Atomics: the sink is called from every thread, never under a lock.
#[derive(Default)]
struct KindLimit {
    second: AtomicU64,
    written: AtomicU64,
    held: AtomicU64,
}

const KINDS: usize = 8;

/// The kind of `e` (its variant), as an index, and its name for the summary line.
fn kind(e: &Event) -> (usize, &'static str) {
    match e {
        Event::DhcpEntryCreated { .. } | Event::Dhcp6EntryCreated { .. } => {
            (0, "DHCP entry created")
        }
        Event::DhcpEntryDeleted { .. } | Event::Dhcp6EntryDeleted { .. } => {
            (1, "DHCP entry deleted")
        }
        Event::DhcpPoolExhausted { .. } => (2, "DHCP pool exhausted"),
        Event::SessionCreated { .. } | Event::InboundSessionCreated { .. } => {
            (3, "session created")
        }
        Event::SessionDeleted { .. } => (4, "session deleted"),
        Event::TcpConnected { .. } => (5, "connection successful"),
        Event::TcpConnectFailed { .. } => (6, "connection failed"),
        Event::EgressRefused { .. } => (7, "refused by the egress policy"),
    }
}

impl TracingSink {
    /// A sink that writes at most `per_second` lines a second of each kind (0: all).
    pub fn new(per_second: u32) -> TracingSink {
        TracingSink {
            per_second: u64::from(per_second),
            start: Instant::now(),
            kinds: Default::default(),
        }
    }

    /// Whether the line for `e` may be written now; logs the summary of the kind's previous
    /// second first when lines were held back in it.
    fn admit(&self, e: &Event) -> bool {
        if self.per_second == 0 {
            return true;
        }
        let (i, name) = kind(e);
        let k = &self.kinds[i];
        let now = self.start.elapsed().as_secs();
        let second = k.second.load(Ordering::Relaxed);
        if now != second
            && k.second
                .compare_exchange(second, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            // This thread opened the new second: it reports the old one.
            k.written.store(0, Ordering::Relaxed);
            let held = k.held.swap(0, Ordering::Relaxed);
            if held > 0 {
                tracing::warn!(
                    target: TARGET,
                    event = "suppressed",
                    "SecureNAT: {held} \"{name}\" lines suppressed (more than {} a second).",
                    self.per_second
                );
            }
        }
        if k.written.fetch_add(1, Ordering::Relaxed) < self.per_second {
            true
        } else {
            k.held.fetch_add(1, Ordering::Relaxed);
            false
        }
    }
}

impl EventSink for TracingSink {
    fn event(&self, e: &Event) {
        if self.admit(e) {
            emit(e);
        }
    }
}

/// Emits `e` through `tracing` (target `securenat`): the seed's line as the message, at info
/// (warn for an exhausted pool). A "connection successful" event also carries the fields
/// `event`, `session`, `ip`, `port` and `host_name` (the address until a reverse lookup names
/// it), which the security log's lookup relies on.
pub fn emit(e: &Event) {
    match e {
        _ if level(e) == tracing::Level::WARN => {
            tracing::warn!(target: TARGET, "{}", seed_text(e));
        }
        Event::TcpConnected { id, ip, port } => {
            let host_name = ip.to_string();
            tracing::info!(
                target: TARGET,
                event = TCP_CONNECTED,
                session = id,
                ip = %ip,
                port = port,
                host_name = host_name.as_str(),
                "{}",
                tcp_connected_text(*id, &host_name, *ip, *port)
            );
        }
        Event::InboundSessionCreated { .. } => {
            tracing::info!(
                target: TARGET,
                event = INBOUND_SESSION,
                inbound = true,
                "{}",
                seed_text(e)
            );
        }
        _ => tracing::info!(target: TARGET, "{}", seed_text(e)),
    }
}

/// The level `e` is logged at: warn where the segment lacks something or a guest was refused.
pub fn level(e: &Event) -> tracing::Level {
    match e {
        Event::DhcpPoolExhausted { .. } | Event::EgressRefused { .. } => tracing::Level::WARN,
        _ => tracing::Level::INFO,
    }
}

/// The `event` field `emit` gives `e`'s line, if any (the JSON lines tell these apart by it).
pub fn event_field(e: &Event) -> Option<&'static str> {
    match e {
        Event::TcpConnected { .. } => Some(TCP_CONNECTED),
        Event::InboundSessionCreated { .. } => Some(INBOUND_SESSION),
        _ => None,
    }
}

/// The seed's line for `e` (without its timestamp).
pub fn seed_text(e: &Event) -> String {
    match e {
        Event::DhcpEntryCreated {
            id,
            mac,
            ip,
            host_name,
            lease,
        } => format!(
            "SecureNAT: The DHCP entry {id} was created. MAC address: {}, IP address: {ip}, host name: {host_name}, expiration date: {} seconds",
            mac.dashed(),
            lease.as_secs()
        ),
        Event::DhcpEntryDeleted { id, mac, ip } => format!(
            "SecureNAT: The DHCP entry {id} was deleted. MAC address: {}, IP address: {ip}",
            mac.dashed()
        ),
        Event::Dhcp6EntryCreated {
            id,
            mac,
            ip,
            duid,
            iaid,
            lease,
        } => format!(
            "SecureNAT: The DHCPv6 entry {id} was created. MAC address: {}, IP address: {ip}, DUID: {duid}, IAID: {iaid}, expiration date: {} seconds",
            mac.dashed(),
            lease.as_secs()
        ),
        Event::Dhcp6EntryDeleted { id, mac, ip } => format!(
            "SecureNAT: The DHCPv6 entry {id} was deleted. MAC address: {}, IP address: {ip}",
            mac.dashed()
        ),
        Event::DhcpPoolExhausted { mac } => format!(
            "SecureNAT: The DHCP server has no free address for the client {}.",
            mac.dashed()
        ),
        Event::SessionCreated { proto, id, src, dst }
        | Event::InboundSessionCreated { proto, id, src, dst } => format!(
            "SecureNAT: The {} session {id} was created. Connection source {src}, Connection destination {dst}",
            log_name(*proto)
        ),
        Event::SessionDeleted { proto, id } => {
            format!("SecureNAT: The {} session {id} was deleted.", log_name(*proto))
        }
        Event::TcpConnected { id, ip, port } => {
            tcp_connected_text(*id, &ip.to_string(), *ip, *port)
        }
        Event::EgressRefused { proto, src, dst } => format!(
            "SecureNAT: The {} connection from {src} to {dst} was refused by the egress policy.",
            log_name(*proto)
        ),
        Event::TcpConnectFailed {
            id,
            ip,
            port,
            reason,
        } => format!(
            "SecureNAT: The connection to TCP session {id}: Host \"{ip}\", Port {port} failed: {reason}."
        ),
    }
}

/// The "connection successful" line, with the host named `host_name`.
pub fn tcp_connected_text(id: u32, host_name: &str, ip: std::net::IpAddr, port: u16) -> String {
    format!("SecureNAT: The connection to TCP session {id}: Host \"{host_name} ({ip})\", Port {port} was successful.")
}

/// A protocol as the seed's log names it: the DNS relay's queries are UDP sessions there.
fn log_name(proto: Proto) -> &'static str {
    match proto {
        Proto::Dns => Proto::Udp.name(),
        p => p.name(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_of_one_kind_is_cut_to_the_rate_and_others_pass() {
        let sink = TracingSink::new(3);
        let created = Event::SessionDeleted {
            proto: Proto::Udp,
            id: 1,
        };
        let failed = Event::TcpConnectFailed {
            id: 2,
            ip: std::net::IpAddr::from(std::net::Ipv4Addr::LOCALHOST),
            port: 1,
            reason: "refused".into(),
        };
        let passed = (0..100).filter(|_| sink.admit(&created)).count();
        // Within one second (the test is far shorter), unless the second turned meanwhile.
        assert!(passed == 3 || passed == 6, "{passed}");
        assert!(sink.admit(&failed), "another kind has its own budget");
        let (i, _) = kind(&created);
        assert!(sink.kinds[i].held.load(Ordering::Relaxed) >= 94);
        assert!(
            (0..10).all(|_| TracingSink::new(0).admit(&created)),
            "0: no limit"
        );
    }
    use std::net::{Ipv4Addr, SocketAddrV4};
    use std::time::Duration;

    #[test]
    fn the_lines_are_the_seeds() {
        let mac: hubnat_core::Mac = "00-AC-85-40-B5-50".parse().unwrap();
        let c = Ipv4Addr::new(192, 168, 30, 10);
        let far = Ipv4Addr::new(207, 46, 0, 166);
        let src = SocketAddrV4::new(c, 1079);
        let dst = SocketAddrV4::new(far, 1863);
        let cases = [
            (
                Event::DhcpEntryCreated {
                    id: 1,
                    mac,
                    ip: c,
                    host_name: "NT4".into(),
                    lease: Duration::from_secs(7200),
                },
                "SecureNAT: The DHCP entry 1 was created. MAC address: 00-AC-85-40-B5-50, IP address: 192.168.30.10, host name: NT4, expiration date: 7200 seconds",
            ),
            (
                Event::DhcpEntryDeleted { id: 1, mac, ip: c },
                "SecureNAT: The DHCP entry 1 was deleted. MAC address: 00-AC-85-40-B5-50, IP address: 192.168.30.10",
            ),
            (
                Event::DhcpPoolExhausted { mac },
                "SecureNAT: The DHCP server has no free address for the client 00-AC-85-40-B5-50.",
            ),
            (
                Event::Dhcp6EntryCreated {
                    id: 3,
                    mac,
                    ip: "fd68:7562:6e61:1e::1000".parse().unwrap(),
                    duid: "0003000100ac8540b550".into(),
                    iaid: 7,
                    lease: Duration::from_secs(7200),
                },
                "SecureNAT: The DHCPv6 entry 3 was created. MAC address: 00-AC-85-40-B5-50, IP address: fd68:7562:6e61:1e::1000, DUID: 0003000100ac8540b550, IAID: 7, expiration date: 7200 seconds",
            ),
            (
                Event::Dhcp6EntryDeleted {
                    id: 3,
                    mac,
                    ip: "fd68:7562:6e61:1e::1000".parse().unwrap(),
                },
                "SecureNAT: The DHCPv6 entry 3 was deleted. MAC address: 00-AC-85-40-B5-50, IP address: fd68:7562:6e61:1e::1000",
            ),
            (
                Event::SessionCreated {
                    proto: Proto::Tcp,
                    id: 1,
                    src: std::net::SocketAddr::from(src),
                    dst: std::net::SocketAddr::from(dst),
                },
                "SecureNAT: The TCP session 1 was created. Connection source 192.168.30.10:1079, Connection destination 207.46.0.166:1863",
            ),
            (
                Event::SessionCreated {
                    proto: Proto::Dns,
                    id: 2,
                    src: std::net::SocketAddr::from(src),
                    dst: std::net::SocketAddr::from(SocketAddrV4::new(Ipv4Addr::new(192, 168, 30, 1), 53)),
                },
                "SecureNAT: The UDP session 2 was created. Connection source 192.168.30.10:1079, Connection destination 192.168.30.1:53",
            ),
            (
                Event::SessionCreated {
                    proto: Proto::Icmp,
                    id: 3,
                    src: std::net::SocketAddr::from(SocketAddrV4::new(c, 7)),
                    dst: std::net::SocketAddr::from(SocketAddrV4::new(far, 0)),
                },
                "SecureNAT: The ICMP session 3 was created. Connection source 192.168.30.10:7, Connection destination 207.46.0.166:0",
            ),
            (
                Event::InboundSessionCreated {
                    proto: Proto::Tcp,
                    id: 5,
                    src: std::net::SocketAddr::from(dst),
                    dst: std::net::SocketAddr::from(src),
                },
                "SecureNAT: The TCP session 5 was created. Connection source 207.46.0.166:1863, Connection destination 192.168.30.10:1079",
            ),
            (
                Event::TcpConnected {
                    id: 1,
                    ip: std::net::IpAddr::from(far),
                    port: 1863,
                },
                "SecureNAT: The connection to TCP session 1: Host \"207.46.0.166 (207.46.0.166)\", Port 1863 was successful.",
            ),
            (
                Event::TcpConnectFailed {
                    id: 4,
                    ip: std::net::IpAddr::from(far),
                    port: 80,
                    reason: "timed out".into(),
                },
                "SecureNAT: The connection to TCP session 4: Host \"207.46.0.166\", Port 80 failed: timed out.",
            ),
            (
                Event::SessionDeleted {
                    proto: Proto::Udp,
                    id: 2,
                },
                "SecureNAT: The UDP session 2 was deleted.",
            ),
            (
                Event::SessionDeleted {
                    proto: Proto::Dns,
                    id: 2,
                },
                "SecureNAT: The UDP session 2 was deleted.",
            ),
        ];
        for (e, line) in cases {
            assert_eq!(seed_text(&e), line);
        }
        assert_eq!(
            tcp_connected_text(1, "baym-sb26.msgr.hotmail.com", std::net::IpAddr::from(far), 1863),
            "SecureNAT: The connection to TCP session 1: Host \"baym-sb26.msgr.hotmail.com (207.46.0.166)\", Port 1863 was successful."
        );
    }

    #[test]
    fn an_inbound_session_has_the_seeds_line_and_says_so_in_json() {
        use std::io::Write;
        use std::sync::{Arc, Mutex};
        use tracing_subscriber::layer::SubscriberExt;

        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let format = hubnat_core::config::LogFormat::Json;
        let log =
            crate::seclog::SecurityLog::with_writer(Box::new(buf.clone()), format, None).unwrap();
        let client = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 7), 40000);
        let guest = SocketAddrV4::new(Ipv4Addr::new(192, 168, 30, 10), 80);
        let e = Event::InboundSessionCreated {
            proto: Proto::Tcp,
            id: 9,
            src: std::net::SocketAddr::from(client),
            dst: std::net::SocketAddr::from(guest),
        };
        let sub = tracing_subscriber::registry().with(log);
        tracing::subscriber::with_default(sub, || TracingSink::new(0).event(&e));
        let mut text = String::new();
        for _ in 0..200 {
            text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
            if text.ends_with('\n') {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(v["event"], INBOUND_SESSION);
        assert_eq!(
            v["message"],
            "SecureNAT: The TCP session 9 was created. Connection source 198.51.100.7:40000, Connection destination 192.168.30.10:80"
        );
    }
}
