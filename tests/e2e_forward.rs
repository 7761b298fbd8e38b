//! Port forwarding into guests, end to end: forwards added and removed at run time over the
//! control socket, reached by real clients (curl, busybox nc, hubnat-testsrv) from the test's
//! server namespace and from hubnat's own, with the guest's server seeing the client's real
//! address (a CGI script of busybox httpd reports REMOTE_ADDR); UDP from two clients at once; a
//! forward by DHCP host name following its guest to a new lease; bad forwards refused with the
//! reason and the running ones untouched.

#[macro_use]
mod common;

use common::{control_config, udhcpc_lease};

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{
    ctl_json, must, testsrv_bin, wait_until, Lab, Netns, Proc, GUEST_IP, NAT_SIDE_IP, SERVER_IP,
};

/// A lab with a server namespace and its guest at GUEST_IP, hubnat's control socket in `ops`.
fn lab() -> (Lab, PathBuf) {
    let mut lab = Lab::bare_with_server();
    let ops = lab.dir.join("ops");
    std::fs::create_dir_all(&ops).unwrap();
    must(Command::new("chmod").arg("777").arg(&ops));
    lab.start_hubnat_args(&control_config(&ops), &[]);
    let guest = format!("{GUEST_IP}/24");
    lab.guest
        .exec_ok(&["ip", "addr", "add", &guest, "dev", &lab.tap]);
    lab.guest
        .exec_ok(&["ip", "route", "add", "default", "via", "192.168.30.1"]);
    wait_until(Duration::from_secs(10), || {
        ops.join("ctl.sock").exists().then_some(())
    })
    .expect("control socket");
    (lab, ops)
}

/// busybox httpd on port 80 of `ns` with a CGI script answering the client's address and port
/// as the server saw them.
fn whoami_server(lab: &Lab, ns: &Netns) -> Proc {
    let www = lab.dir.join(&common::unique("www-"));
    std::fs::create_dir_all(www.join("cgi-bin")).unwrap();
    let cgi = www.join("cgi-bin").join("who");
    std::fs::write(
        &cgi,
        "#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\n%s:%s\\n' \"$REMOTE_ADDR\" \"$REMOTE_PORT\"\n",
    )
    .unwrap();
    must(Command::new("chmod").arg("755").arg(&cgi));
    let p = Proc::spawn(
        "busybox httpd",
        ns.cmd(&[
            "busybox",
            "httpd",
            "-f",
            "-p",
            "80",
            "-h",
            www.to_str().unwrap(),
        ]),
        None,
    );
    ns.wait_listening("tcp", None, 80);
    p
}

fn curl(ns: &Netns, url: &str) -> Result<String, String> {
    let out = ns.exec(&["curl", "-sS", "--max-time", "5", url]);
    if out.status.success() {
        // busybox httpd listens on an IPv6 socket: an IPv4 client is `[::ffff:A.B.C.D]:PORT`.
        let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        Ok(text.replacen("[::ffff:", "", 1).replacen(']', "", 1))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn forward(ops: &Path, args: &[&str]) -> serde_json::Value {
    let mut a = vec!["forward"];
    a.extend_from_slice(args);
    ctl_json(ops, &a)
}

/// `hubnat forward ARGS`, expected to fail: its message.
fn forward_fails(ops: &Path, args: &[&str]) -> String {
    let out = Command::new(common::hubnat_bin())
        .arg("--control")
        .arg(ops.join("ctl.sock"))
        .arg("forward")
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "forward {args:?} succeeded: {out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A forward added at run time reaches the guest's HTTP server, which sees the client's real
/// address (a client on the host's loopback is shown as the virtual host); removing it closes
/// its listener and the connections it carried.
#[test]
fn a_forward_reaches_a_guest_server_with_the_clients_address() {
    require_root!();
    let (lab, ops) = lab();
    let _www = whoami_server(&lab, &lab.guest);
    let list = forward(
        &ops,
        &["add", "tcp", "0.0.0.0:8080", &format!("{GUEST_IP}:80")],
    );
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    // From the server namespace, through hubnat's namespace's address.
    let url = format!("http://{NAT_SIDE_IP}:8080/cgi-bin/who");
    let seen = curl(lab.server(), &url).unwrap_or_else(|e| panic!("{e}\n{}", lab.hubnat_log()));
    assert!(
        seen.starts_with(&format!("{SERVER_IP}:")),
        "the guest saw {seen}"
    );
    // Found by ARP for that first connection, the guest is listed with its address now.
    assert_eq!(forward(&ops, &["list"])[0]["guest"], GUEST_IP);
    // From hubnat's own namespace, on its loopback: shown as the virtual host.
    let seen = curl(&lab.nat, "http://127.0.0.1:8080/cgi-bin/who").unwrap();
    assert!(seen.starts_with("192.168.30.1:"), "the guest saw {seen}");
    // The sessions are inbound ones in the NAT table while they last; a long-lived one:
    let echo = Proc::spawn(
        "tcp-echo",
        lab.guest.cmd(&[
            testsrv_bin().to_str().unwrap(),
            "tcp-echo",
            "--listen",
            "0.0.0.0:7000",
        ]),
        Some(lab.dir.join("tcp-echo.log")),
    );
    // Connected before the guest listens, the client would only get the guest's reset.
    wait_until(Duration::from_secs(5), || {
        echo.log().contains("listening").then_some(())
    })
    .expect("tcp-echo listens");
    forward(
        &ops,
        &["add", "tcp", "0.0.0.0:7000", &format!("{GUEST_IP}:7000")],
    );
    let mut held = lab.server().cmd(&["busybox", "nc", NAT_SIDE_IP, "7000"]);
    held.stdin(Stdio::piped());
    let mut held = Proc::spawn("nc", held, None);
    let inbound = wait_until(Duration::from_secs(5), || {
        let t = ctl_json(&ops, &["nat-table"]);
        let rows = t.as_array().cloned().unwrap_or_default();
        rows.into_iter().find(|r| {
            r["direction"] == "in" && r["guest"].as_str().unwrap_or("").ends_with(":7000")
        })
    });
    assert!(inbound.is_some(), "{}", ctl_json(&ops, &["nat-table"]));
    let list = forward(&ops, &["list"]);
    let id = list
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["listen"] == "0.0.0.0:7000")
        .unwrap()["id"]
        .as_u64()
        .unwrap()
        .to_string();
    forward(&ops, &["remove", &id]);
    assert!(
        wait_until(Duration::from_secs(5), || (!held.is_running())
            .then_some(()))
        .is_some(),
        "the connection of a removed forward is closed"
    );
    let refused = lab
        .server()
        .exec(&["busybox", "nc", "-w", "2", NAT_SIDE_IP, "7000"]);
    assert!(
        !refused.status.success(),
        "the listener is gone: {refused:?}"
    );
    drop(echo);
    // The other forward still works.
    assert!(curl(lab.server(), &url).is_ok());
}

/// A UDP forward keeps a session per client: two clients at once each get their own echoes.
#[test]
fn udp_echo_through_a_forward_from_two_clients_at_once() {
    require_root!();
    let (lab, ops) = lab();
    let bin = testsrv_bin();
    let _echo = Proc::spawn(
        "udp-echo",
        lab.guest.cmd(&[
            bin.to_str().unwrap(),
            "udp-echo",
            "--listen",
            "0.0.0.0:7001",
        ]),
        None,
    );
    lab.guest.wait_listening("udp", None, 7001);
    forward(
        &ops,
        &["add", "udp", "0.0.0.0:7001", &format!("{GUEST_IP}:7001")],
    );
    let target = format!("{NAT_SIDE_IP}:7001");
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let mut c = lab.server().cmd(&[
                bin.to_str().unwrap(),
                "udp-ping",
                "--connect",
                &target,
                "--count",
                "200",
                "--size",
                "300",
            ]);
            c.stdout(Stdio::piped()).stderr(Stdio::piped());
            c.spawn().unwrap()
        })
        .collect();
    for c in clients {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "{out:?}\n{}", lab.hubnat_log());
    }
    // A table is read again if a busy worker's rows came too late for one reading.
    let inbound_udp = || {
        let rows = ctl_json(&ops, &["nat-table"]);
        let n = rows
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["direction"] == "in" && r["proto"] == "UDP")
            .count();
        (n, rows)
    };
    wait_until(Duration::from_secs(5), || {
        (inbound_udp().0 == 2).then_some(())
    })
    .unwrap_or_else(|| panic!("not a session per client: {}", inbound_udp().1));
}

/// A forward naming its guest by DHCP host name follows the guest when its address changes.
#[test]
fn a_forward_by_host_name_follows_the_guests_lease() {
    require_root!();
    let (lab, ops) = lab();
    lab.guest
        .exec_ok(&["ip", "-4", "addr", "flush", "dev", &lab.tap]);
    let first = udhcpc_lease(&lab, &lab.guest, &lab.tap, &["-x", "hostname:web1"]);
    let _www = whoami_server(&lab, &lab.guest);
    let list = forward(&ops, &["add", "tcp", "0.0.0.0:8081", "web1:80"]);
    assert_eq!(list[0]["guest"], first.as_str(), "{list}");
    let url = format!("http://{NAT_SIDE_IP}:8081/cgi-bin/who");
    let seen = curl(lab.server(), &url).unwrap_or_else(|e| panic!("{e}\n{}", lab.hubnat_log()));
    assert!(seen.starts_with(SERVER_IP), "{seen}");
    // The guest comes back as another machine (a new MAC): a new lease, a new address.
    lab.guest.exec_ok(&[
        "ip",
        "link",
        "set",
        &lab.tap,
        "address",
        "02:00:00:00:0c:01",
    ]);
    let second = udhcpc_lease(&lab, &lab.guest, &lab.tap, &["-x", "hostname:web1"]);
    assert_ne!(first, second);
    let list = forward(&ops, &["list"]);
    assert_eq!(list[0]["guest"], second.as_str(), "{list}");
    let seen = curl(lab.server(), &url).unwrap_or_else(|e| panic!("{e}\n{}", lab.hubnat_log()));
    assert!(seen.starts_with(SERVER_IP), "{seen}");
}

/// Bad forwards are refused with the reason, and the running ones stay as they were.
#[test]
fn bad_forwards_are_refused_and_change_nothing() {
    require_root!();
    let (lab, ops) = lab();
    let _www = whoami_server(&lab, &lab.guest);
    forward(
        &ops,
        &["add", "tcp", "0.0.0.0:8082", &format!("{GUEST_IP}:80")],
    );
    // A port another program holds.
    let _other = Proc::spawn(
        "nc -l",
        lab.nat.cmd(&["busybox", "nc", "-l", "-p", "9999"]),
        None,
    );
    lab.nat.wait_listening("tcp", None, 9999);
    let e = forward_fails(
        &ops,
        &["add", "tcp", "0.0.0.0:9999", &format!("{GUEST_IP}:80")],
    );
    assert!(e.contains("9999") && e.contains("in use"), "{e}");
    let e = forward_fails(&ops, &["add", "tcp", "0.0.0.0:8083", "nosuchguest:80"]);
    assert!(e.contains("nosuchguest"), "{e}");
    let e = forward_fails(&ops, &["add", "tcp", "0.0.0.0:9000-8000", "vm1:80"]);
    assert!(e.contains("forward[1].listen"), "{e}");
    let e = forward_fails(
        &ops,
        &["add", "tcp", "0.0.0.0:8082", &format!("{GUEST_IP}:81")],
    );
    assert!(e.contains("overlaps"), "{e}");
    let e = forward_fails(
        &ops,
        &["add", "sctp", "0.0.0.0:1", &format!("{GUEST_IP}:1")],
    );
    assert!(e.contains("proto"), "{e}");
    let e = forward_fails(&ops, &["remove", "99"]);
    assert!(e.contains("no forward 99"), "{e}");
    let list = forward(&ops, &["list"]);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    let url = format!("http://{NAT_SIDE_IP}:8082/cgi-bin/who");
    assert!(
        curl(lab.server(), &url).is_ok(),
        "the running forward still works"
    );
    // A client of a forward whose guest is gone gets a refusal at once, not a hang.
    lab.guest.exec_ok(&["ip", "link", "set", &lab.tap, "down"]);
    forward(&ops, &["add", "tcp", "0.0.0.0:8084", "192.168.30.77:80"]);
    let t = std::time::Instant::now();
    let out = lab.server().exec(&[
        "curl",
        "-sS",
        "--max-time",
        "10",
        &format!("http://{NAT_SIDE_IP}:8084/"),
    ]);
    assert!(!out.status.success());
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "refused, not hung: {:?}",
        String::from_utf8_lossy(&out.stderr)
    );
}
