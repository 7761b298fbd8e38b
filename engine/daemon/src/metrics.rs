//! The Prometheus text exposition of the counters (`--metrics ADDR`, loopback only, off by
//! default). The runtime serves it over plain HTTP/1.0, one answer per connection.

use std::fmt::Write;

use crate::api::{status_with, PortRow};
use hubnat_core::time::Instant;
use hubnat_core::Engine;
use hubnat_runtime::WorkerReport;

/// The exposition (format 0.0.4) of `engine`'s state at `now`.
pub fn render(engine: &Engine, now: Instant) -> String {
    render_with(engine, &[], now)
}

/// Appends where the TAP's NAPI polls run (`(threaded, switches)`) to an exposition.
pub fn render_napi(o: &mut String, (threaded, switches): (bool, u64)) {
    let _ = writeln!(
        o,
        "# HELP hubnat_tap_napi_threaded Whether the TAP's NAPI polls run in kernel threads (1) or inside each write (0).\n\
         # TYPE hubnat_tap_napi_threaded gauge\n\
         hubnat_tap_napi_threaded {}\n\
         # HELP hubnat_tap_napi_switches_total How often the TAP's NAPI polls moved between threads and writes.\n\
         # TYPE hubnat_tap_napi_switches_total counter\n\
         hubnat_tap_napi_switches_total {switches}",
        threaded as u8
    );
}

/// Appends the segment's ports' counters to an exposition.
pub fn render_ports(o: &mut String, ports: &[PortRow]) {
    type Sample = (Option<&'static str>, fn(&PortRow) -> u64);
    let families: [(&str, &str, &str, &[Sample]); 5] = [
        (
            "hubnat_port_frames_total",
            "Frames read from (in) and sent to (out) each port.",
            "counter",
            &[
                (Some("in"), |p| p.frames_in),
                (Some("out"), |p| p.frames_out),
            ],
        ),
        (
            "hubnat_port_bytes_total",
            "Bytes read from (in) and sent to (out) each port.",
            "counter",
            &[(Some("in"), |p| p.bytes_in), (Some("out"), |p| p.bytes_out)],
        ),
        (
            "hubnat_port_dropped_total",
            "Frames dropped at each port: not taken by it (out), dropped by the switch \
             (filtered), refused by its framing (malformed).",
            "counter",
            &[
                (Some("out"), |p| p.dropped_out),
                (Some("filtered"), |p| p.filtered_in),
                (Some("malformed"), |p| p.malformed),
            ],
        ),
        (
            "hubnat_port_connected",
            "Whether each port has a peer (1) or not (0).",
            "gauge",
            &[(None, |p| u64::from(p.connected))],
        ),
        (
            "hubnat_port_guests",
            "Guest MAC addresses learned on each port.",
            "gauge",
            &[(None, |p| u64::from(p.macs))],
        ),
    ];
    for (name, help, kind, samples) in families {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for p in ports {
            for (direction, value) in samples {
                let dir = direction
                    .map(|d| format!(",direction=\"{d}\""))
                    .unwrap_or_default();
                let _ = writeln!(
                    o,
                    "{name}{{port=\"{}\",kind=\"{}\"{dir}}} {}",
                    p.id,
                    p.kind,
                    value(p)
                );
            }
        }
    }
}

/// `render` for a multi-worker runtime: the control engine plus the workers' reports.
pub fn render_with(engine: &Engine, workers: &[WorkerReport], now: Instant) -> String {
    let s = status_with(engine, workers, now);
    let mut o = String::with_capacity(2048);
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
        let _ = writeln!(o, "# HELP hubnat_{name} {help}");
        let _ = writeln!(o, "# TYPE hubnat_{name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(o, "hubnat_{name}{labels} {v}");
        }
    };
    metric(
        "uptime_seconds",
        "gauge",
        "Seconds since start.",
        &[("", s.uptime_secs)],
    );
    metric(
        "enabled",
        "gauge",
        "Whether SecureNAT, the NAT and the DHCP server are on (1) or off (0).",
        &[
            ("{function=\"securenat\"}", s.securenat as u64),
            ("{function=\"nat\"}", s.nat as u64),
            ("{function=\"dhcp\"}", s.dhcp as u64),
        ],
    );
    metric(
        "sessions",
        "gauge",
        "NAT sessions open, by protocol.",
        &[
            ("{proto=\"tcp\"}", s.tcp_sessions as u64),
            ("{proto=\"udp\"}", s.udp_sessions as u64),
            ("{proto=\"icmp\"}", s.icmp_sessions as u64),
            ("{proto=\"dns\"}", s.dns_sessions as u64),
        ],
    );
    metric(
        "sessions_by_family",
        "gauge",
        "NAT sessions (TCP, UDP, ICMP) open, by the guest's IP family.",
        &[
            (
                "{family=\"ipv4\"}",
                (s.tcp_sessions + s.udp_sessions + s.icmp_sessions - s.ipv6_sessions) as u64,
            ),
            ("{family=\"ipv6\"}", s.ipv6_sessions as u64),
        ],
    );
    metric(
        "dhcp_leases",
        "gauge",
        "DHCP leases held.",
        &[("", s.dhcp_clients as u64)],
    );
    metric(
        "frames_total",
        "counter",
        "Frames from (in) and to (out) the segment.",
        &[
            ("{direction=\"in\"}", s.frames_in),
            ("{direction=\"out\"}", s.frames_out),
        ],
    );
    metric(
        "ipv6_frames_total",
        "counter",
        "Of frames_total, the IPv6 frames, from (in) and to (out) the segment.",
        &[
            ("{direction=\"in\"}", s.frames_in_ipv6),
            ("{direction=\"out\"}", s.frames_out_ipv6),
        ],
    );
    metric(
        "frames_handed_over_total",
        "counter",
        "Frames of a worker's flows that another worker read from its TAP queue and handed over.",
        &[("", s.frames_handed_over)],
    );
    metric(
        "bytes_total",
        "counter",
        "Bytes of frames from (in) and to (out) the segment.",
        &[
            ("{direction=\"in\"}", s.bytes_in),
            ("{direction=\"out\"}", s.bytes_out),
        ],
    );
    let drops: Vec<(String, u64)> = s
        .drops
        .iter()
        .map(|(k, v)| (format!("{{reason=\"{k}\"}}"), *v))
        .collect();
    let drops: Vec<(&str, u64)> = drops.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    metric(
        "drops_total",
        "counter",
        "Frames dropped, by reason.",
        &drops,
    );
    metric(
        "sessions_evicted_total",
        "counter",
        "Idle sessions ended to make room for new ones in a full table.",
        &[("", s.evicted_sessions)],
    );
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use hubnat_core::testing::*;
    use std::net::SocketAddrV4;

    #[test]
    fn every_sample_line_is_name_labels_value() {
        let (mut e, mut h, mut out) = setup();
        let f = udp_frame(
            SocketAddrV4::new(GUEST_IP, 4000),
            SocketAddrV4::new(REMOTE_IP, 9),
            b"x",
        );
        e.handle_frame(T0, &f, &mut h, &mut out);
        e.handle_frame(T0, b"short", &mut h, &mut out);
        let mut text = render(&e, Instant::from_secs(42));
        render_napi(&mut text, (true, 3));
        let port = PortRow {
            id: 2,
            kind: "stream".into(),
            address: "/run/vm.sock".into(),
            connected: true,
            peer: None,
            frames_in: 5,
            bytes_in: 500,
            frames_out: 6,
            bytes_out: 600,
            dropped_out: 1,
            filtered_in: 0,
            malformed: 3,
            connects: 1,
            disconnects: 0,
            macs: 1,
        };
        render_ports(&mut text, &[port]);
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(name.starts_with("hubnat_"), "{line}");
            value.parse::<u64>().unwrap_or_else(|_| panic!("{line}"));
        }
        assert!(text.contains("hubnat_uptime_seconds 42\n"));
        assert!(text.contains("hubnat_sessions{proto=\"udp\"} 1\n"));
        assert!(text.contains("hubnat_sessions_by_family{family=\"ipv4\"} 1\n"));
        assert!(text.contains("hubnat_sessions_by_family{family=\"ipv6\"} 0\n"));
        assert!(text.contains("hubnat_ipv6_frames_total{direction=\"in\"} 0\n"));
        assert!(text.contains("hubnat_frames_total{direction=\"in\"} 2\n"));
        assert!(text.contains("hubnat_drops_total{reason=\"malformed\"} 1\n"));
        assert!(text.contains("# TYPE hubnat_bytes_total counter\n"));
        assert!(text.contains("hubnat_tap_napi_threaded 1\n"));
        assert!(text.contains("hubnat_tap_napi_switches_total 3\n"));
        assert!(text.contains("# TYPE hubnat_tap_napi_switches_total counter\n"));
        assert!(text.contains(
            "hubnat_port_frames_total{port=\"2\",kind=\"stream\",direction=\"out\"} 6\n"
        ));
        assert!(text.contains(
            "hubnat_port_dropped_total{port=\"2\",kind=\"stream\",direction=\"malformed\"} 3\n"
        ));
        assert!(text.contains("hubnat_port_connected{port=\"2\",kind=\"stream\"} 1\n"));
        // One TYPE line per family, its samples together.
        assert_eq!(text.matches("# TYPE hubnat_port_frames_total ").count(), 1);
    }
}
