//! End-to-end: operating hubnat. The control CLI against a running instance with real traffic,
//! the security log's lines against the seed's examples, the lease file across kill -9, and the
//! metrics endpoint.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};

use common::{ctl, ctl_json, wait_until, Lab, SERVER_IP};
use hubnat_daemon::leases::{Journal, LeaseStore, WallClock};
use regex::Regex;
use serde_json::Value;

/// The seed's log lines (manual 3.7.8), one per line, as the examples print them.
const SEED_EXAMPLES: &[&str] = &[
    "2012-12-06 15:44:52.557 SecureNAT: The DHCP entry 1 was created. MAC address: 00-AC-85-40-B5-50, IP address: 192.168.30.10, host name: NT4, expiration date: 7200 seconds",
    "2012-12-06 15:45:08.104 SecureNAT: The TCP session 1 was created. Connection source 192.168.30.10:1079, Connection destination 207.46.0.166:1863",
    "2012-12-06 15:45:08.401 SecureNAT: The connection to TCP session 1: Host \"baym-sb26.msgr.hotmail.com (207.46.0.166)\", Port 1863 was successful.",
    "2012-12-06 15:45:08.666 SecureNAT: The TCP session 1 was deleted.",
    "2012-12-06 15:45:14.604 SecureNAT: The UDP session 2 was created. Connection source 192.168.30.10:1048, Connection destination 192.168.30.1:53",
];

const TS: &str = r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d{3} SecureNAT: ";
const IP: &str = r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}";

/// The seed's line forms as regular expressions: (what, expression).
fn seed_forms() -> Vec<(&'static str, Regex)> {
    let f = |s: String| Regex::new(&format!("{TS}{s}$")).unwrap();
    vec![
        (
            "dhcp",
            f(format!(
                r"The DHCP entry \d+ was created\. MAC address: [0-9A-F]{{2}}(-[0-9A-F]{{2}}){{5}}, IP address: {IP}, host name: .*, expiration date: \d+ seconds"
            )),
        ),
        (
            "session",
            f(format!(
                r"The (TCP|UDP) session \d+ was created\. Connection source {IP}:\d+, Connection destination {IP}:\d+"
            )),
        ),
        (
            "connected",
            f(format!(
                r#"The connection to TCP session \d+: Host "[^"]* \({IP}\)", Port \d+ was successful\."#
            )),
        ),
        (
            "deleted",
            f(r"The (TCP|UDP) session \d+ was deleted\.".into()),
        ),
    ]
}

#[test]
fn the_forms_match_the_seeds_own_examples() {
    let forms = seed_forms();
    for line in SEED_EXAMPLES {
        assert!(
            forms.iter().any(|(_, re)| re.is_match(line)),
            "no form matches the seed's `{line}`"
        );
    }
}

fn config(lab_dir: &Path, extra: &str) -> String {
    format!(
        "[control]\nsocket = \"{}\"\nsecurity_log = \"{}\"\nreverse_lookup = false\nmetrics = \"127.0.0.1:9464\"\n{extra}",
        lab_dir.join("ctl.sock").display(),
        lab_dir.join("security.log").display()
    )
}

fn wait_control(ops: &Path, lab: &Lab) {
    let sock = ops.join("ctl.sock");
    wait_until(Duration::from_secs(10), || {
        Command::new(common::hubnat_bin())
            .arg("--control")
            .arg(&sock)
            .arg("status")
            .output()
            .ok()
            .filter(|o| o.status.success())
    })
    .unwrap_or_else(|| panic!("control socket never answered:\n{}", lab.hubnat_log()));
}

const UDHCPC_SCRIPT: &str = r#"#!/bin/sh
{ echo "ip=$ip"; } > "@DIR@/udhcpc.$1"
case "$1" in
  deconfig) ip link set "$interface" up; ip -4 addr flush dev "$interface" ;;
  bound|renew) ip -4 addr flush dev "$interface"; ip addr add "$ip/$mask" dev "$interface" ;;
esac
exit 0
"#;

/// Gives the guest's interface `mac` and runs busybox udhcpc once; the address it was given.
fn udhcpc(lab: &Lab, mac: &str) -> Option<String> {
    let script = lab.write_script("udhcpc-script", UDHCPC_SCRIPT);
    let bound = lab.dir.join("udhcpc.bound");
    let _ = std::fs::remove_file(&bound);
    lab.guest
        .exec_ok(&["ip", "link", "set", &lab.tap, "address", mac]);
    let args = [
        "busybox",
        "udhcpc",
        "-i",
        &lab.tap,
        "-f",
        "-q",
        "-n",
        "-t",
        "5",
        "-T",
        "1",
        "-A",
        "1",
        "-x",
        "hostname:e2e-ops",
        "-s",
        script.to_str().unwrap(),
    ];
    let _ = lab.guest.cmd(&args).output();
    let text = common::read(&bound);
    text.lines()
        .find_map(|l| l.strip_prefix("ip="))
        .map(str::to_owned)
        .filter(|s| !s.is_empty())
}

fn udp_session_to(table: &Value, dst: &str) -> Option<Value> {
    table
        .as_array()?
        .iter()
        .find(|s| s["proto"] == "UDP" && s["dst"] == dst)
        .cloned()
}

#[test]
fn tables_status_nat_disable_metrics_and_the_security_log() {
    require_root!();
    // The operator's files live beside the lab (whose directory is made with it).
    let ops_dir = common::TempDir::new();
    let ops = ops_dir.0.as_path();
    let lab = Lab::start_with_server(&config(ops, "[nat]\nudp_timeout = 4\n"));
    wait_control(ops, &lab);
    let _srv = lab.serve(&["udp-echo", "--listen", "0.0.0.0:7101"]);
    let dst = format!("{SERVER_IP}:7101");
    let ping = |count: &str| {
        let out = lab.client(&[
            "udp-ping",
            "--connect",
            &dst,
            "--count",
            count,
            "--size",
            "700",
            "--port",
            "40101",
        ]);
        assert!(out.status.success(), "{out:?}\n{}", lab.hubnat_log());
    };

    // Transfers: the same session's byte counts grow from one read to the next.
    // A table is read again if a busy worker's rows came too late for one reading.
    let listed = || {
        common::wait_until(Duration::from_secs(5), || {
            udp_session_to(&ctl_json(ops, &["nat-table"]), &dst)
        })
    };
    ping("20");
    let first = listed().expect("session listed");
    ping("30");
    let second = listed().expect("still listed");
    assert_eq!(first["id"], second["id"]);
    let (a, b) = (
        first["bytes_to_host"].as_u64().unwrap(),
        second["bytes_to_host"].as_u64().unwrap(),
    );
    assert!(a >= 20 * 700 && b >= a + 30 * 700, "{a} then {b}");
    assert!(second["bytes_to_guest"].as_u64().unwrap() > first["bytes_to_guest"].as_u64().unwrap());
    let human = ctl(ops, &["nat-table"]);
    assert!(human.contains("UDP") && human.contains(&dst), "{human}");

    let st = ctl_json(ops, &["status"]);
    assert!(st["udp_sessions"].as_u64().unwrap() >= 1, "{st}");
    assert!(st["frames_in"].as_u64().unwrap() >= 50);
    assert!(st["drops"].is_object());
    assert!(ctl(ops, &["status"]).contains("UDP sessions"));

    // Metrics, from inside hubnat's namespace (loopback there).
    let m = lab.nat.exec_ok(&[
        "bash",
        "-c",
        "exec 3<>/dev/tcp/127.0.0.1/9464; printf 'GET /metrics HTTP/1.0\\r\\n\\r\\n' >&3; cat <&3",
    ]);
    assert!(m.starts_with("HTTP/1.0 200 OK"), "{m}");
    assert!(m.contains("hubnat_sessions{proto=\"udp\"}"), "{m}");

    // A refused change names the field, as the file's validation does, and changes nothing.
    let out = Command::new(common::hubnat_bin())
        .arg("--control")
        .arg(ops.join("ctl.sock"))
        .args(["dhcp", "set", "range_start=10.0.0.1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("dhcp.range_start"));

    // NAT off: no new session; DHCP still answers.
    let out = ctl(ops, &["nat", "disable"]);
    assert!(out.contains("nat.enabled: true -> false"), "{out}");
    assert_eq!(ctl_json(ops, &["nat", "get"])["enabled"], false);
    let out = lab.client(&[
        "udp-ping",
        "--connect",
        &format!("{SERVER_IP}:7101"),
        "--count",
        "2",
        "--port",
        "40102",
    ]);
    assert!(
        !out.status.success(),
        "a datagram went through with NAT off"
    );
    let table = ctl_json(ops, &["nat-table"]);
    assert!(
        !table
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["guest"].as_str().unwrap().ends_with(":40102")),
        "{table}"
    );
    let ip = udhcpc(&lab, "02:00:00:00:70:01").expect("DHCP works with NAT off");
    let leases = ctl_json(ops, &["dhcp-table"]);
    let l = &leases.as_array().unwrap()[0];
    assert_eq!(l["mac"], "02-00-00-00-70-01");
    assert_eq!(l["ip"], ip.as_str());
    assert_eq!(l["host_name"], "e2e-ops");
    assert!(ctl(ops, &["dhcp-table"]).contains("02-00-00-00-70-01"));
    let out = ctl(ops, &["nat", "enable"]);
    assert!(out.contains("nat.enabled: false -> true"), "{out}");
    assert!(lab
        .hubnat_log()
        .contains("configuration changed (control socket): nat.enabled"));

    // The security log: every line has one of the seed's forms; the UDP session and DHCP entry
    // are there, and the session's deletion after its idle timeout.
    let log_path = ops.join("security.log");
    wait_until(Duration::from_secs(15), || {
        common::read(&log_path)
            .contains("was deleted.")
            .then_some(())
    })
    .unwrap_or_else(|| panic!("no deletion logged:\n{}", common::read(&log_path)));
    let text = common::read(&log_path);
    let forms = seed_forms();
    let mut seen = std::collections::BTreeSet::new();
    for line in text.lines() {
        let (what, _) = forms
            .iter()
            .find(|(_, re)| re.is_match(line))
            .unwrap_or_else(|| panic!("`{line}` has none of the seed's forms"));
        seen.insert(*what);
    }
    for want in ["dhcp", "session", "deleted"] {
        assert!(seen.contains(want), "no {want} line in\n{text}");
    }
    assert!(
        text.contains(&format!("Connection destination {dst}")),
        "{text}"
    );
    assert!(
        text.contains(&format!("IP address: {ip}, host name: e2e-ops")),
        "{text}"
    );
}

#[test]
fn leases_survive_kill_9_and_a_corrupt_lease_file_is_set_aside() {
    require_root!();
    let ops_dir = common::TempDir::new();
    let ops = ops_dir.0.as_path();
    let cfg = config(ops, "");
    let mut lab = Lab::start(&cfg);
    wait_control(ops, &lab);
    let a = udhcpc(&lab, "02:00:00:00:71:0a").expect("first client bound");
    let b = udhcpc(&lab, "02:00:00:00:71:0b").expect("second client bound");
    assert_ne!(a, b);
    assert_eq!(ctl_json(ops, &["dhcp-table"]).as_array().unwrap().len(), 2);

    // kill -9: no chance to save anything at exit.
    lab.kill_hubnat();
    let file = lab.dir.join("state").join("leases.json");
    let saved: Value = serde_json::from_str(&common::read(&file)).expect("lease file is JSON");
    // The bindings made since start are in the journal beside the snapshot; read together
    // (as hubnat reads them at start), they hold both.
    let on_disk = LeaseStore::new(file.clone())
        .load(&WallClock {
            origin: SystemTime::now(),
        })
        .expect("lease files readable");
    assert_eq!(on_disk.leases.len(), 2, "{saved}\n{on_disk:?}");
    assert!(
        matches!(on_disk.journal, Journal::Replayed { torn: false, .. }),
        "{on_disk:?}"
    );

    lab.start_hubnat(&cfg);
    wait_control(ops, &lab);
    let table = ctl_json(ops, &["dhcp-table"]);
    let macs: Vec<&str> = table
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["mac"].as_str().unwrap())
        .collect();
    assert_eq!(macs, ["02-00-00-00-71-0A", "02-00-00-00-71-0B"], "{table}");
    assert!(
        lab.hubnat_log().contains("restored 2 of 2 leases"),
        "{}",
        lab.hubnat_log()
    );
    // The second client comes back first and still gets its own address; a newcomer gets
    // neither of the two.
    assert_eq!(
        udhcpc(&lab, "02:00:00:00:71:0b").as_deref(),
        Some(b.as_str())
    );
    let c = udhcpc(&lab, "02:00:00:00:71:0c").expect("a new client is served");
    assert!(c != a && c != b, "{c} given twice");
    assert_eq!(
        udhcpc(&lab, "02:00:00:00:71:0a").as_deref(),
        Some(a.as_str())
    );

    // A corrupt file is reported and kept aside, not silently emptied.
    lab.kill_hubnat();
    std::fs::write(&file, b"{\"version\": 1, \"leases\": [trunc").unwrap();
    lab.start_hubnat(&cfg);
    wait_control(ops, &lab);
    let log = lab.hubnat_log();
    assert!(
        log.contains("is corrupt") && log.contains("set aside as"),
        "{log}"
    );
    let aside: Vec<_> = std::fs::read_dir(lab.dir.join("state"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("leases.json.corrupt-")
        })
        .collect();
    assert_eq!(aside.len(), 1);
    assert_eq!(
        std::fs::read(aside[0].path()).unwrap(),
        b"{\"version\": 1, \"leases\": [trunc"
    );
    assert_eq!(ctl_json(ops, &["dhcp-table"]).as_array().unwrap().len(), 0);
}

#[test]
fn sighup_reloads_the_file_and_a_bad_file_changes_nothing() {
    require_root!();
    let ops_dir = common::TempDir::new();
    let ops = ops_dir.0.as_path();
    let lab = Lab::start(&config(ops, "[nat]\nudp_timeout = 300\n"));
    wait_control(ops, &lab);
    assert_eq!(ctl_json(ops, &["nat", "get"])["udp_timeout"], 300);
    let file = lab.dir.join("hubnat.toml");
    let hup = || lab.hubnat.as_ref().expect("hubnat runs").signal(1);

    std::fs::write(&file, config(ops, "[nat]\nudp_timeout = 123\n")).unwrap();
    hup();
    let reloaded = wait_until(Duration::from_secs(5), || {
        (ctl_json(ops, &["nat", "get"])["udp_timeout"] == 123).then_some(())
    });
    assert!(
        reloaded.is_some(),
        "SIGHUP did not reload:\n{}",
        lab.hubnat_log()
    );
    assert!(
        lab.hubnat_log().contains("nat.udp_timeout: 300 -> 123"),
        "{}",
        lab.hubnat_log()
    );

    // A file with a mistake is refused with the field named; the running settings stay.
    std::fs::write(&file, config(ops, "[dhcp]\nrange_start = \"10.0.0.1\"\n")).unwrap();
    hup();
    let refused = wait_until(Duration::from_secs(5), || {
        lab.hubnat_log().contains("dhcp.range_start").then_some(())
    });
    assert!(refused.is_some(), "{}", lab.hubnat_log());
    assert_eq!(ctl_json(ops, &["nat", "get"])["udp_timeout"], 123);
    assert!(lab
        .hubnat
        .as_ref()
        .is_some_and(|p| p.log().contains("dhcp.range_start")));
}

#[test]
fn idle_operator_connections_are_closed_and_cannot_lock_the_operator_out() {
    require_root!();
    let ops_dir = common::TempDir::new();
    let ops = ops_dir.0.as_path();
    let lab = Lab::start(&config(ops, ""));
    wait_control(ops, &lab);
    // More idle metrics connections than the endpoint has slots, each saying when hubnat
    // closed it (the ones beyond the slots wait in the backlog, then get their turn).
    let idle = "for i in $(seq 20); do (exec 3<>/dev/tcp/127.0.0.1/9464 && cat <&3 >/dev/null; \
                echo closed) & done; wait";
    let mut idlers = common::Proc::spawn(
        "idle metrics clients",
        lab.nat.cmd(&["bash", "-c", idle]),
        Some(lab.dir.join("idlers.log")),
    );
    std::thread::sleep(Duration::from_millis(500));
    // The control socket has slots of its own: it answers while the metrics slots are full.
    let st = ctl_json(ops, &["status"]);
    assert!(st["frames_in"].is_u64(), "{st}");
    // Every idle connection is closed by hubnat (5 s each, two turns), none left hanging.
    wait_until(Duration::from_secs(20), || {
        (!idlers.is_running()).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "idle metrics connections were not closed:\n{}",
            lab.hubnat_log()
        )
    });
    assert_eq!(
        idlers.log().matches("closed").count(),
        20,
        "{}",
        idlers.log()
    );
    // A control connection that never sends a request is closed too (after 30 s, so here only
    // checked to be still served meanwhile), and the metrics endpoint serves again.
    let m = lab.nat.exec_ok(&[
        "bash",
        "-c",
        "exec 3<>/dev/tcp/127.0.0.1/9464; printf 'GET /metrics HTTP/1.0\\r\\n\\r\\n' >&3; cat <&3",
    ]);
    assert!(m.starts_with("HTTP/1.0 200 OK"), "{m}");
}
