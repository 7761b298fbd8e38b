//! Fair shares end to end, with two guests on one segment (a bridge behind hubnat's TAP, each
//! guest in a namespace of its own, leased by busybox udhcpc): while guest A floods SYNs to many
//! ports of a host that never answers, sweeps UDP ports, floods the DNS relay and sends fragments
//! that never complete, guest B's HTTP requests all succeed and its iperf3 runs; A cannot take
//! B's address by spoofing its IP, by a RELEASE or DECLINE in B's name, or by draining the pool
//! with made-up clients, after which a real newcomer still gets a lease. Under an open-files
//! limit of 1024, a guest sweeping ports is refused past its share while the other is served and
//! the lease file is still written.

#[macro_use]
mod common;

use std::path::Path;
use std::time::{Duration, SystemTime};

use hubnat_daemon::leases::{LeaseStore, WallClock};

use common::{ctl_json, wait_until, Lab, Netns, Proc, GUEST_A_MAC, GUEST_B_MAC, SERVER_IP};

/// A host of the server's network that never answers (its connects hang until ARP gives up).
const BLACKHOLE: &str = "10.77.0.99";

fn config(ops: &Path) -> String {
    format!(
        "[dns]\nupstream = [\"{BLACKHOLE}\"]\nquery_timeout = 5\n[control]\nsocket = \"{}\"\nreverse_lookup = false\n",
        ops.join("ctl.sock").display()
    )
}

const UDHCPC_SCRIPT: &str = r#"#!/bin/sh
case "$1" in
  deconfig) ip link set "$interface" up; ip -4 addr flush dev "$interface" ;;
  bound|renew)
    ip -4 addr flush dev "$interface"
    ip addr add "$ip/$mask" dev "$interface"
    [ -n "$router" ] && ip route replace default via "$router" dev "$interface"
    echo "$ip" > "@DIR@/lease.$interface.$(cat /proc/sys/kernel/hostname 2>/dev/null)"
    ;;
esac
exit 0
"#;

/// Runs udhcpc once in `ns` on its eth0; the address it was given.
fn lease(lab: &Lab, ns: &Netns) -> Option<String> {
    let script = lab.write_script("udhcpc-fair", UDHCPC_SCRIPT);
    let out = ns.exec(&[
        "busybox",
        "udhcpc",
        "-i",
        "eth0",
        "-n",
        "-q",
        "-f",
        "-t",
        "5",
        "-T",
        "1",
        "-s",
        script.to_str().unwrap(),
    ]);
    if !out.status.success() {
        return None;
    }
    ns.addrs("eth0")
        .first()
        .map(|a| a.split('/').next().unwrap_or_default().to_owned())
}

/// A lab with two leased guests behind hubnat (its guest namespace is only their bridge).
fn two_guest_lab(lab: &Lab) -> (Netns, String, Netns, String) {
    lab.guest
        .exec_ok(&["ip", "-4", "addr", "flush", "dev", &lab.tap]);
    let (a, b) = lab.two_guests();
    let a_ip = lease(lab, &a).expect("guest A leased");
    let b_ip = lease(lab, &b).expect("guest B leased");
    assert_ne!(a_ip, b_ip);
    (a, a_ip, b, b_ip)
}

fn host_mac(ops: &Path) -> String {
    let h = ctl_json(ops, &["host", "get"]);
    h["mac"]
        .as_str()
        .expect("the virtual host's MAC")
        .to_owned()
}

/// Starts `hubnat-testsrv inject` in `ns` (guest A's floods and spoofs) in the background.
fn inject(ns: &Netns, dir: &Path, name: &'static str, args: &[&str]) -> Proc {
    let bin = common::testsrv_bin();
    let mut all = vec![bin.to_str().unwrap(), "inject", "--iface", "eth0"];
    all.extend_from_slice(args);
    Proc::spawn(name, ns.cmd(&all), Some(dir.join(name)))
}

fn drops(ops: &Path, why: &str) -> u64 {
    ctl_json(ops, &["status"])["drops"][why]
        .as_u64()
        .unwrap_or(0)
}

/// B's request succeeds. The time allowed covers SYN retransmits at 1 and 3 s: during A's
/// floods the TAP's queue may be full when B's SYN arrives, and the kernel then drops it before
/// hubnat (or its fairness) ever sees it.
fn curl_ok(ns: &Netns) -> bool {
    let out = ns.exec(&[
        "curl",
        "-sS",
        "--max-time",
        "15",
        &format!("http://{SERVER_IP}:8080/index.html"),
    ]);
    out.status.success() && String::from_utf8_lossy(&out.stdout).contains("for B")
}

fn serve_http(lab: &Lab) -> Proc {
    lab.httpd(lab.server(), None, "for B\n")
}

#[test]
fn one_guests_floods_do_not_starve_the_other_nor_take_its_address() {
    require_root!();
    let ops_dir = common::TempDir::new();
    let ops = ops_dir.0.as_path();
    let lab = Lab::start_with_server(&config(ops));
    let (a, a_ip, b, b_ip) = two_guest_lab(&lab);
    let mac = host_mac(ops);
    let _http = serve_http(&lab);
    let _iperf = Proc::spawn(
        "iperf3 server",
        lab.server().cmd(&["iperf3", "-s", "-p", "5201"]),
        None,
    );
    assert!(
        curl_ok(&b),
        "B is served before any flood:\n{}",
        lab.hubnat_log()
    );

    // A floods, all at once.
    let d = lab.dir.0.as_path();
    let base = [
        "--src-mac",
        GUEST_A_MAC,
        "--dst-mac",
        &mac,
        "--src-ip",
        &a_ip,
    ];
    let with = |extra: &[&'static str]| -> Vec<String> {
        base.iter()
            .map(|s| s.to_string())
            .chain(extra.iter().map(|s| s.to_string()))
            .collect()
    };
    let run = |name: &'static str, extra: &[&'static str]| {
        let args = with(extra);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        inject(&a, d, name, &refs)
    };
    let floods = vec![
        run(
            "syn-flood",
            &[
                "--kind", "syn", "--dst-ip", BLACKHOLE, "--ports", "1-60000", "--count", "30000",
            ],
        ),
        run(
            "udp-sweep",
            &[
                "--kind", "udp", "--dst-ip", SERVER_IP, "--ports", "1-6000", "--count", "6000",
            ],
        ),
        run(
            "dns-flood",
            &[
                "--kind",
                "dns",
                "--dst-ip",
                "192.168.30.1",
                "--count",
                "6000",
            ],
        ),
        run(
            "frag-flood",
            &[
                "--kind", "frag", "--dst-ip", SERVER_IP, "--ports", "1-2000", "--count", "2000",
            ],
        ),
    ];
    // B meanwhile: every request succeeds, and a bulk transfer runs.
    for i in 0..10 {
        assert!(
            curl_ok(&b),
            "B's request {i} failed during A's flood:\n{}",
            lab.hubnat_log()
        );
    }
    let iperf = b.exec(&["iperf3", "-c", SERVER_IP, "-p", "5201", "-t", "3", "-J"]);
    assert!(iperf.status.success(), "B's iperf3 failed: {iperf:?}");
    for mut f in floods {
        wait_until(Duration::from_secs(30), || (!f.is_running()).then_some(()))
            .unwrap_or_else(|| panic!("{} did not finish", f.name));
    }
    assert!(curl_ok(&b), "B after the floods");
    // A's floods cost A: its excess was refused and counted (the workers publish their counts
    // a moment after they drop).
    wait_until(Duration::from_secs(10), || {
        (drops(ops, "limit") > 0).then_some(())
    })
    .unwrap_or_else(|| panic!("no refusal counted: {}", ctl_json(ops, &["status"])));

    // A spoofs B's address: dropped, and B's traffic still reaches B.
    let spoofed = drops(ops, "spoofed");
    let mut spoof = inject(
        &a,
        d,
        "spoof",
        &[
            "--src-mac",
            GUEST_A_MAC,
            "--dst-mac",
            &mac,
            "--src-ip",
            &b_ip,
            "--kind",
            "syn",
            "--dst-ip",
            SERVER_IP,
            "--ports",
            "8080",
            "--count",
            "50",
        ],
    );
    wait_until(Duration::from_secs(10), || {
        (!spoof.is_running()).then_some(())
    })
    .unwrap();
    wait_until(Duration::from_secs(10), || {
        (drops(ops, "spoofed") >= spoofed + 50).then_some(())
    })
    .unwrap_or_else(|| panic!("spoofed frames not counted: {}", ctl_json(ops, &["status"])));
    assert!(curl_ok(&b), "B lost its traffic to A's spoofing");

    // A releases and declines B's lease in B's name: refused, B keeps it.
    for kind in ["dhcp-release", "dhcp-decline"] {
        let mut p = inject(
            &a,
            d,
            "dhcp-in-bs-name",
            &[
                "--src-mac",
                GUEST_A_MAC,
                "--src-ip",
                &b_ip,
                "--client-mac",
                GUEST_B_MAC,
                "--kind",
                kind,
                "--count",
                "3",
            ],
        );
        wait_until(Duration::from_secs(10), || (!p.is_running()).then_some(())).unwrap();
    }
    let table = ctl_json(ops, &["dhcp-table"]);
    let b_mac = GUEST_B_MAC.replace(':', "-").to_uppercase();
    assert!(
        table
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["mac"] == b_mac.as_str() && l["ip"] == b_ip.as_str()),
        "B lost its lease: {table}"
    );

    // A tries to drain the pool with made-up clients from its own MAC: refused, and a real
    // newcomer (A under a new MAC) gets a lease.
    let mut starve = inject(
        &a,
        d,
        "dhcp-starve",
        &[
            "--src-mac",
            GUEST_A_MAC,
            "--kind",
            "dhcp-starve",
            "--count",
            "400",
        ],
    );
    wait_until(Duration::from_secs(10), || {
        (!starve.is_running()).then_some(())
    })
    .unwrap();
    a.exec_ok(&["ip", "link", "set", "eth0", "address", "02:00:00:00:0c:01"]);
    assert!(
        lease(&lab, &a).is_some(),
        "a real client got no lease after the drain attempt"
    );
    assert!(curl_ok(&b));
}

#[test]
fn under_an_open_files_limit_a_guest_is_refused_past_its_share_and_others_are_served() {
    require_root!();
    let ops_dir = common::TempDir::new();
    let ops = ops_dir.0.as_path();
    let mut lab = Lab::start_with_server(&config(ops));
    // Again, under a soft and hard limit of 1024 open files.
    drop(lab.hubnat.take());
    lab.start_hubnat_wrapped(&config(ops), &[], &["prlimit", "--nofile=1024:1024"]);
    let (a, a_ip, b, _) = two_guest_lab(&lab);
    let log = lab.hubnat_log();
    assert!(log.contains("open files limit 1024"), "{log}");
    let mac = host_mac(ops);
    let _http = serve_http(&lab);
    let _echo = lab.serve(&["udp-echo", "--listen", "0.0.0.0:7000"]);
    // A opens far more UDP sessions than the process has descriptors.
    let mut sweep = inject(
        &a,
        lab.dir.0.as_path(),
        "udp-sweep",
        &[
            "--src-mac",
            GUEST_A_MAC,
            "--dst-mac",
            &mac,
            "--src-ip",
            &a_ip,
            "--kind",
            "udp",
            "--dst-ip",
            SERVER_IP,
            "--ports",
            "1-3000",
            "--count",
            "3000",
        ],
    );
    wait_until(Duration::from_secs(20), || {
        (!sweep.is_running()).then_some(())
    })
    .unwrap();
    // The injector has written every frame, but the workers may still be
    // working through their queues: wait for the refusals to be counted.
    let st = wait_until(Duration::from_secs(10), || {
        let st = ctl_json(ops, &["status"]);
        (st["drops"]["limit"].as_u64().unwrap_or(0) > 0).then_some(st)
    })
    .unwrap_or_else(|| panic!("no refusal counted: {}", ctl_json(ops, &["status"])));
    assert!(st["udp_sessions"].as_u64().unwrap() < 1024, "{st}");
    // B is served, by TCP and UDP, and a new lease still reaches the lease file.
    assert!(curl_ok(&b), "B refused:\n{}", lab.hubnat_log());
    let ping = b.exec(&[
        common::testsrv_bin().to_str().unwrap(),
        "udp-ping",
        "--connect",
        &format!("{SERVER_IP}:7000"),
        "--count",
        "3",
    ]);
    assert!(ping.status.success(), "{ping:?}");
    b.exec_ok(&["ip", "link", "set", "eth0", "address", "02:00:00:00:0d:01"]);
    let fresh = lease(&lab, &b).expect("a lease under the limit");
    // On disk: the snapshot and the journal of changes since, read as hubnat reads them.
    let on_disk = LeaseStore::new(lab.dir.join("state").join("leases.json"))
        .load(&WallClock {
            origin: SystemTime::now(),
        })
        .expect("lease files readable");
    assert!(
        on_disk.leases.iter().any(|l| l.ip.to_string() == fresh),
        "the new lease is not on disk: {on_disk:?}"
    );
    assert!(
        !lab.hubnat_log().contains("Too many open files"),
        "{}",
        lab.hubnat_log()
    );
}
