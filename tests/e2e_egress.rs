//! The egress policy end to end: a guest that routes 127.0.0.0/8 at hubnat (with route_localnet,
//! as an attacker would) reaches neither the host's loopback listeners (TCP and UDP) nor the
//! instance-metadata address 169.254.169.254 (a listener on that address of the NAT namespace's
//! loopback stands in for a cloud's); an allow rule added at run time opens them, and removing
//! it closes them again; the host-loopback alias reaches 127.0.0.1 all along.

#[macro_use]
mod common;

use std::path::Path;
use std::time::Duration;

use common::{ctl, ctl_json, wait_until, Lab, Proc};

const ALIAS: &str = "192.168.30.2";

fn config(ops: &Path) -> String {
    format!(
        "[nat]\nhost_loopback = \"{ALIAS}\"\n[control]\nsocket = \"{}\"\nsecurity_log = \"{}\"\nreverse_lookup = false\n",
        ops.join("ctl.sock").display(),
        ops.join("security.log").display()
    )
}

/// Whether the guest fetches the page at `url` (a refused connection fails at once: RST).
fn fetch(lab: &Lab, url: &str) -> bool {
    let out = lab.guest.exec(&["curl", "-sS", "--max-time", "3", url]);
    out.status.success() && String::from_utf8_lossy(&out.stdout).contains("loopback service")
}

/// Whether the guest's datagrams to `addr` come back.
fn echo(lab: &Lab, addr: &str) -> bool {
    lab.client(&["udp-ping", "--connect", addr, "--count", "2"])
        .status
        .success()
}

#[test]
fn loopback_and_metadata_are_refused_until_allowed_at_run_time() {
    require_root!();
    let ops_dir = common::TempDir::new();
    let ops = ops_dir.0.as_path();
    let lab = Lab::start_with_server(&config(ops));
    // Services of the host: on its loopback, and on the metadata address.
    lab.nat
        .exec_ok(&["ip", "addr", "add", "169.254.169.254/32", "dev", "lo"]);
    let page = "loopback service\n";
    let _lo_http = lab.httpd(&lab.nat, Some("127.0.0.1:18080"), page);
    let _md_http = lab.httpd(&lab.nat, Some("169.254.169.254:80"), page);
    let bin = common::testsrv_bin();
    let _lo_udp = Proc::spawn(
        "udp echo on loopback",
        lab.nat.cmd(&[
            bin.to_str().unwrap(),
            "udp-echo",
            "--listen",
            "127.0.0.1:7300",
        ]),
        None,
    );
    lab.nat.wait_listening("udp", Some("127.0.0.1"), 7300);
    // The guest sends 127.0.0.0/8 to hubnat instead of its own loopback (which it gives up, so
    // that answers from 127.0.0.1 are not martians to it).
    let g = &lab.guest;
    g.exec_ok(&["ip", "addr", "flush", "dev", "lo"]);
    g.exec_ok(&["ip", "link", "set", "lo", "down"]);
    g.exec_ok(&["sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1"]);
    g.exec_ok(&[
        "sysctl",
        "-qw",
        &format!("net.ipv4.conf.{}.route_localnet=1", lab.tap),
    ]);
    g.exec_ok(&[
        "ip",
        "route",
        "add",
        "127.0.0.0/8",
        "via",
        "192.168.30.1",
        "dev",
        &lab.tap,
    ]);
    wait_until(Duration::from_secs(10), || {
        ctl_json(ops, &["status"])["frames_in"].as_u64().map(|_| ())
    })
    .expect("control socket");

    let lo_url = "http://127.0.0.1:18080/index.html";
    let md_url = "http://169.254.169.254/index.html";
    let alias_url = format!("http://{ALIAS}:18080/index.html");
    assert!(
        fetch(&lab, &alias_url),
        "the alias is the documented door:\n{}",
        lab.hubnat_log()
    );
    assert!(!fetch(&lab, lo_url), "the host's loopback was reached");
    assert!(!fetch(&lab, md_url), "the metadata address was reached");
    assert!(
        !echo(&lab, "127.0.0.1:7300"),
        "UDP reached the host's loopback"
    );
    let st = ctl_json(ops, &["status"]);
    assert!(st["drops"]["policy"].as_u64().unwrap_or(0) >= 3, "{st}");

    // Opened at run time, with the same syntax as the file.
    ctl(
        ops,
        &[
            "nat",
            "set",
            "egress=allow 127.0.0.1 tcp 18080,allow 127.0.0.1 udp 7300,allow 169.254.169.254 tcp 80",
        ],
    );
    assert!(
        fetch(&lab, lo_url),
        "allowed, yet refused:\n{}",
        lab.hubnat_log()
    );
    assert!(fetch(&lab, md_url));
    assert!(echo(&lab, "127.0.0.1:7300"));
    let rules = ctl_json(ops, &["nat", "get"]);
    assert_eq!(rules["egress"].as_array().map(Vec::len), Some(3), "{rules}");

    // A malformed rule is refused with the field named, and nothing changes.
    let bad = std::process::Command::new(common::hubnat_bin())
        .arg("--control")
        .arg(ops.join("ctl.sock"))
        .args(["nat", "set", "egress=allow 127.0.0.1/33"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("nat.egress"),
        "{bad:?}"
    );
    assert!(fetch(&lab, lo_url));

    // Removed: closed again.
    ctl(ops, &["nat", "set", "egress="]);
    assert!(!fetch(&lab, lo_url));
    assert!(!fetch(&lab, md_url));
    assert!(!echo(&lab, "127.0.0.1:7300"));
    assert!(fetch(&lab, &alias_url));

    let log = std::fs::read_to_string(ops.join("security.log")).unwrap_or_default();
    assert!(
        log.contains("to 127.0.0.1:18080 was refused by the egress policy."),
        "{log}"
    );
}
