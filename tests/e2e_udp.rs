//! End-to-end: UDP NAT, DNS relay, ICMP and IP fragments through hubnat, with real tools (dig,
//! ping, dnsmasq as the resolver on hubnat's loopback) and the test's own UDP echo server.

mod common;

use std::time::Duration;

use common::{ctl, wait_until, Lab, Proc, SERVER_IP};

fn echo_addr(port: u16) -> String {
    format!("{SERVER_IP}:{port}")
}

#[test]
fn udp_echo_through_the_nat_with_contents_checked() {
    require_root!();
    let lab = Lab::start_with_server("");
    let _srv = lab.serve(&["udp-echo", "--listen", "0.0.0.0:7001"]);
    let out = lab.client(&[
        "udp-ping",
        "--connect",
        &echo_addr(7001),
        "--count",
        "500",
        "--size",
        "1200",
    ]);
    assert!(out.status.success(), "{out:?}\n{}", lab.hubnat_log());
    // Large datagrams: 4000 bytes leave the guest as fragments and must arrive whole (and the
    // 4000-byte answer is fragmented by hubnat toward the guest).
    let out = lab.client(&[
        "udp-ping",
        "--connect",
        &echo_addr(7001),
        "--count",
        "20",
        "--size",
        "4000",
    ]);
    assert!(out.status.success(), "{out:?}\n{}", lab.hubnat_log());
    let log = lab.hubnat_log();
    assert!(
        log.contains("SecureNAT: The UDP session")
            && log.contains(&format!("Connection destination {SERVER_IP}:7001")),
        "no session log line:\n{log}"
    );
}

#[test]
fn udp_session_expires_after_its_timeout() {
    require_root!();
    let lab = Lab::start_with_server("[nat]\nudp_timeout = 2\n");
    let _srv = lab.serve(&["udp-echo", "--listen", "0.0.0.0:7002"]);
    let out = lab.client(&["udp-ping", "--connect", &echo_addr(7002), "--count", "3"]);
    assert!(out.status.success(), "{out:?}");
    let deleted = wait_until(Duration::from_secs(8), || {
        let log = lab.hubnat_log();
        (log.contains("SecureNAT: The UDP session") && log.contains("was deleted.")).then_some(())
    });
    assert!(
        deleted.is_some(),
        "session not expired:\n{}",
        lab.hubnat_log()
    );
}

#[test]
fn past_the_per_guest_limit_new_sessions_are_refused_and_old_ones_work() {
    require_root!();
    let lab = Lab::start_with_server("[nat]\nmax_sessions_per_guest = 2\n");
    let _srv = lab.serve(&["udp-echo", "--listen", "0.0.0.0:7003"]);
    let a = lab.client(&[
        "udp-ping",
        "--connect",
        &echo_addr(7003),
        "--count",
        "2",
        "--port",
        "40001",
    ]);
    let b = lab.client(&[
        "udp-ping",
        "--connect",
        &echo_addr(7003),
        "--count",
        "2",
        "--port",
        "40002",
    ]);
    assert!(a.status.success() && b.status.success());
    let c = lab.client(&[
        "udp-ping",
        "--connect",
        &echo_addr(7003),
        "--count",
        "1",
        "--port",
        "40003",
    ]);
    assert!(!c.status.success(), "a third session was let through");
    let a = lab.client(&[
        "udp-ping",
        "--connect",
        &echo_addr(7003),
        "--count",
        "2",
        "--port",
        "40001",
    ]);
    assert!(a.status.success(), "an existing session stopped working");
}

fn start_dnsmasq(lab: &Lab) -> Proc {
    let pid = lab.dir.join("dnsmasq.pid");
    let mut cmd = lab.nat.cmd(&[
        "dnsmasq",
        "--keep-in-foreground",
        "--no-resolv",
        "--no-hosts",
    ]);
    cmd.args([
        "--conf-file=/dev/null",
        "--listen-address=127.0.0.1",
        "--bind-interfaces",
        "--port=53",
    ])
    .arg(format!("--pid-file={}", pid.display()))
    .args([
        "--host-record=www.e2e.test,10.77.0.2",
        "--address=/wild.e2e.test/10.77.0.99",
        "--user=root",
    ]);
    let p = Proc::spawn("dnsmasq", cmd, Some(lab.dir.join("dnsmasq.log")));
    lab.nat.wait_listening("udp", Some("127.0.0.1"), 53);
    p
}

const UDHCPC_SCRIPT: &str = r#"#!/bin/sh
case "$1" in
  deconfig) ip link set "$interface" up; ip -4 addr flush dev "$interface" ;;
  bound|renew)
    ip -4 addr flush dev "$interface"; ip addr add "$ip/$mask" dev "$interface"
    ip route replace default via "${router%% *}" dev "$interface"
    for d in $dns; do echo "nameserver $d"; done > "$RESOLV" ;;
esac
"#;

/// The guest configures itself by DHCP (busybox udhcpc); its resolv.conf, the namespace's own
/// file, is returned.
fn lease_with_resolv_conf(lab: &Lab) -> String {
    lab.guest
        .exec_ok(&["ip", "-4", "addr", "flush", "dev", &lab.tap]);
    let script = lab.write_script("udhcpc-dns", UDHCPC_SCRIPT);
    let resolv = format!("/etc/netns/{}/resolv.conf", lab.guest.name);
    let mut c = lab.guest.cmd(&[
        "busybox",
        "udhcpc",
        "-i",
        &lab.tap,
        "-f",
        "-q",
        "-n",
        "-t",
        "4",
        "-T",
        "1",
        "-s",
        script.to_str().unwrap(),
    ]);
    c.env("RESOLV", &resolv);
    assert!(c.output().unwrap().status.success());
    common::read(std::path::Path::new(&resolv))
}

#[test]
fn dig_resolves_through_the_dns_relay() {
    require_root!();
    let lab = Lab::start_with_server("[dns]\nupstream = [\"127.0.0.1\"]\n");
    let _dns = start_dnsmasq(&lab);
    assert!(lease_with_resolv_conf(&lab).contains("nameserver 192.168.30.1"));
    let out = lab
        .guest
        .exec_ok(&["dig", "+short", "+time=2", "+tries=2", "www.e2e.test"]);
    assert_eq!(out.trim(), "10.77.0.2", "{}", lab.hubnat_log());
    let out = lab
        .guest
        .exec_ok(&["dig", "+short", "+time=2", "+tries=2", "a.wild.e2e.test"]);
    assert_eq!(out.trim(), "10.77.0.99");
    // DNS over TCP to the virtual host is relayed too.
    let out = lab.guest.exec_ok(&[
        "dig",
        "+tcp",
        "+short",
        "+time=2",
        "+tries=2",
        "www.e2e.test",
    ]);
    assert_eq!(out.trim(), "10.77.0.2", "{}", lab.hubnat_log());
}

/// `[dns] address`: a second address of the virtual host, which DHCP offers as the DNS server.
/// A packet counter of `dev` in `ns` (tx_packets, rx_packets).
fn link_counter(ns: &common::Netns, dev: &str, what: &str) -> u64 {
    let path = format!("/sys/class/net/{dev}/statistics/{what}");
    ns.exec_ok(&["cat", &path]).trim().parse().expect(what)
}

/// The number that follows `label` in dnsperf's summary (e.g. "Queries lost:", "NOERROR").
fn dnsperf_figure(report: &str, label: &str) -> u64 {
    report
        .lines()
        .find_map(|l| l.split_once(label).map(|(_, rest)| rest))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {label:?} in dnsperf's report:\n{report}"))
}

/// A resolver's burst (dnsperf, 100 queries outstanding, names of one size) is answered whole
/// through the relay; its queries reach the upstream in runs (the NAT namespace's loopback
/// counts one packet a run) and, where the TAP takes UDP super-frames, the answers reach the
/// guest in runs too (its interface counts one packet a run).
#[test]
fn a_burst_of_queries_is_relayed_in_runs_and_answered_whole() {
    require_root!();
    let lab = Lab::start_with_server("[dns]\nupstream = [\"127.0.0.1\"]\n");
    let _dns = start_dnsmasq(&lab);
    let names: String = (1000..3000)
        .map(|i| format!("n{i}.wild.e2e.test A\n"))
        .collect();
    let file = lab.dir.join("queries");
    std::fs::write(&file, names).unwrap();
    let queries = 2 * 2000;
    let lo = || link_counter(&lab.nat, "lo", "tx_packets");
    let rx = || link_counter(&lab.guest, &lab.tap, "rx_packets");
    let (lo0, rx0) = (lo(), rx());
    let report = lab.guest.exec_ok(&[
        "dnsperf",
        "-s",
        "192.168.30.1",
        "-d",
        file.to_str().unwrap(),
        "-n",
        "2",
        "-q",
        "100",
        "-t",
        "5",
    ]);
    let (lo_sent, guest_got) = (lo() - lo0, rx() - rx0);
    eprintln!("{queries} queries: the NAT namespace's loopback carried {lo_sent} packets, the guest received {guest_got} frames");
    assert_eq!(
        dnsperf_figure(&report, "Queries completed:"),
        queries,
        "{report}"
    );
    assert_eq!(dnsperf_figure(&report, "Queries lost:"), 0, "{report}");
    assert_eq!(dnsperf_figure(&report, "NOERROR"), queries, "{report}");
    // The upstream's answers come back one by one (dnsmasq sends each alone); the queries
    // went in runs, so fewer packets than two a query crossed the loopback.
    let query_sends = lo_sent.saturating_sub(queries);
    assert!(
        query_sends < queries * 3 / 4,
        "{query_sends} sends for {queries} queries\n{}",
        lab.hubnat_log()
    );
    if lab
        .hubnat_log()
        .contains("TCP and UDP segmentation offloaded")
    {
        assert!(
            guest_got < queries * 3 / 4,
            "{guest_got} frames for {queries} answers"
        );
    }
}

/// dig gets its answers there over UDP (dig takes them only from the address it asked) and
/// TCP, and ping answers; `hubnat dns set address=` takes it away at run time, and it no longer
/// answers at all.
#[test]
fn dig_resolves_through_the_dns_address() {
    require_root!();
    let ops = common::TempDir::new();
    let lab = Lab::start_with_server(&format!(
        "[dns]\nupstream = [\"127.0.0.1\"]\naddress = \"192.168.30.3\"\n[control]\nsocket = \"{}\"\n",
        ops.join("ctl.sock").display()
    ));
    let _dns = start_dnsmasq(&lab);
    let resolv = lease_with_resolv_conf(&lab);
    assert_eq!(
        resolv.trim(),
        "nameserver 192.168.30.3",
        "{}",
        lab.hubnat_log()
    );
    let dig = |extra: &[&str]| {
        let mut args = vec!["dig", "@192.168.30.3", "+short", "+time=2", "+tries=2"];
        args.extend_from_slice(extra);
        args.push("www.e2e.test");
        let out = lab.guest.exec(&args);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    assert_eq!(
        dig(&[]).as_deref(),
        Some("10.77.0.2"),
        "{}",
        lab.hubnat_log()
    );
    assert_eq!(dig(&["+tcp"]).as_deref(), Some("10.77.0.2"));
    assert!(ping(&lab, "192.168.30.3"));
    assert!(ctl(&ops.0, &["dns", "get"]).contains("192.168.30.3"));

    let out = ctl(&ops.0, &["dns", "set", "address="]);
    assert!(out.contains("dns.address"), "{out}");
    lab.guest
        .exec_ok(&["ip", "neigh", "flush", "dev", &lab.tap]);
    assert!(!ping(&lab, "192.168.30.3"), "the address still answers");
    assert_eq!(dig(&["+time=1", "+tries=1"]), None);
    assert!(
        ping(&lab, "192.168.30.1"),
        "the virtual host itself goes on"
    );
}

fn ping(lab: &Lab, ip: &str) -> bool {
    lab.guest
        .exec(&["ping", "-c", "2", "-i", "0.2", "-W", "1", ip])
        .status
        .success()
}

#[test]
fn ping_in_dummy_mode_answers_for_any_host() {
    require_root!();
    let lab = Lab::start_with_server("[nat]\nicmp = \"dummy\"\n");
    assert!(ping(&lab, SERVER_IP));
    assert!(
        ping(&lab, "10.77.0.123"),
        "dummy mode answers even for absent hosts"
    );
}

#[test]
fn ping_in_real_mode_answers_only_for_existing_hosts() {
    require_root!();
    let lab = Lab::start_with_server("[nat]\nicmp = \"real\"\n");
    assert!(ping(&lab, SERVER_IP), "{}", lab.hubnat_log());
    assert!(
        !ping(&lab, "10.77.0.123"),
        "real mode answered for an absent host"
    );
}

#[test]
fn udp_to_a_closed_port_gives_port_unreachable() {
    require_root!();
    let lab = Lab::start_with_server("");
    // Nothing listens on 7999: the kernel's port unreachable is reflected to the guest, whose
    // connected socket then reports "connection refused".
    let out = lab.client(&["udp-ping", "--connect", &echo_addr(7999), "--count", "1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("refused"), "{err}");
}

#[test]
fn host_loopback_alias_reaches_the_hosts_loopback() {
    require_root!();
    let lab = Lab::start_with_server("[nat]\nhost_loopback = \"192.168.30.2\"\n");
    let bin = common::testsrv_bin();
    let _srv = Proc::spawn(
        "hubnat-testsrv",
        lab.nat.cmd(&[
            bin.to_str().unwrap(),
            "udp-echo",
            "--listen",
            "127.0.0.1:7005",
        ]),
        None,
    );
    lab.nat.wait_listening("udp", Some("127.0.0.1"), 7005);
    let out = lab.client(&["udp-ping", "--connect", "192.168.30.2:7005", "--count", "5"]);
    assert!(out.status.success(), "{out:?}\n{}", lab.hubnat_log());
}
