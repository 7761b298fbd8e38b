//! The segment's ports besides the TAP, end to end: QEMU's socket framings (`stream:` and
//! `dgram:`, each with a real kernel stack behind `hubnat-testsrv socket-guest`, which speaks
//! QEMU's framing), an interface joined by AF_PACKET (`--attach`, guests behind a Linux bridge
//! with their offloads on), several ports switched as one segment (guests on different ports
//! reach each other), ports added and removed at run time, and peers that break the framing.

#[macro_use]
mod common;

use common::{control_config, open_dir, udhcpc_lease, udhcpc_lease_explained};

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{ctl, ctl_json, testsrv_bin, wait_until, Lab, Netns, Proc, SERVER_IP};

const HOST_IP: &str = "192.168.30.1";

/// A guest namespace whose `eth0` is a TAP relayed by `hubnat-testsrv socket-guest` to one of
/// hubnat's socket ports (`how`: `--stream PATH` or `--dgram PATH --local PATH`).
fn socket_guest(lab: &Lab, prefix: &str, how: &[&str]) -> (Netns, Proc) {
    let ns = Netns::new(prefix);
    let mut cmd = Command::new(testsrv_bin());
    cmd.args(["socket-guest", "--netns", &ns.path(), "--tap", "eth0"])
        .args(how);
    let log = lab.dir.join(&common::unique("sg-"));
    let p = Proc::spawn("socket-guest", cmd, Some(log));
    ns.wait_for_link("eth0", Duration::from_secs(10));
    (ns, p)
}

fn ping(ns: &Netns, to: &str) -> bool {
    ns.exec(&["ping", "-c", "2", "-i", "0.2", "-W", "2", to])
        .status
        .success()
}

fn curl(ns: &Netns, url: &str) -> String {
    let out = ns.exec(&["curl", "-sS", "--max-time", "10", url]);
    assert!(out.status.success(), "curl {url}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ports(ops: &Path) -> Vec<serde_json::Value> {
    ctl_json(ops, &["port", "list"])
        .as_array()
        .expect("a list of ports")
        .clone()
}

fn port<'a>(ports: &'a [serde_json::Value], kind: &str) -> &'a serde_json::Value {
    ports
        .iter()
        .find(|p| p["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} port in {ports:?}"))
}

/// `hubnat ARGS` against the lab's control socket, expected to fail: its message.
fn ctl_fails(ops: &Path, args: &[&str]) -> String {
    let out = Command::new(common::hubnat_bin())
        .arg("--control")
        .arg(ops.join("ctl.sock"))
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{args:?} succeeded: {out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A TAP guest, a QEMU-stream guest and a QEMU-dgram guest on one hubnat: each leases an
/// address, the socket guests fetch a page from the server namespace through the NAT, and every
/// guest reaches the others directly (switched between ports, not routed).
#[test]
fn socket_ports_and_the_tap_are_one_segment() {
    require_root!();
    let mut lab = Lab::bare_with_server();
    let ops = open_dir(&lab, "ops");
    let (a, b, c) = (ops.join("a.sock"), ops.join("b.sock"), ops.join("c.sock"));
    let stream = format!("stream:{}", a.display());
    let dgram = format!("dgram:{}", b.display());
    lab.start_hubnat_args(
        &control_config(&ops),
        &["--port", &stream, "--port", &dgram],
    );
    wait_until(Duration::from_secs(10), || b.exists().then_some(()))
        .expect("the dgram port's socket");
    let _www = lab.httpd(lab.server(), None, "through a socket port\n");
    let tap_ip = udhcpc_lease(&lab, &lab.guest, &lab.tap, &[]);
    let (gb, _sb) = socket_guest(&lab, "gs", &["--stream", a.to_str().unwrap()]);
    let (gc, _sc) = socket_guest(
        &lab,
        "gd",
        &[
            "--dgram",
            b.to_str().unwrap(),
            "--local",
            c.to_str().unwrap(),
        ],
    );
    let ip_b = udhcpc_lease(&lab, &gb, "eth0", &[]);
    let ip_c = udhcpc_lease(&lab, &gc, "eth0", &[]);
    let url = format!("http://{SERVER_IP}:8080/index.html");
    assert_eq!(curl(&gb, &url), "through a socket port\n");
    assert_eq!(curl(&gc, &url), "through a socket port\n");
    assert!(ping(&gb, HOST_IP));
    assert!(ping(&gb, &ip_c), "stream guest to dgram guest");
    assert!(ping(&gc, &tap_ip), "dgram guest to the TAP guest");
    assert!(ping(&lab.guest, &ip_b), "TAP guest to stream guest");
    let list = ports(&ops);
    assert_eq!(list.len(), 3, "{list:?}");
    for kind in ["tap", "stream", "dgram"] {
        let p = port(&list, kind);
        assert_eq!(p["connected"], true, "{p}");
        assert_eq!(p["macs"], 1, "one guest learned on {p}");
        assert!(p["frames_in"].as_u64().unwrap() > 10, "{p}");
        assert!(p["frames_out"].as_u64().unwrap() > 10, "{p}");
        assert_eq!(p["malformed"], 0, "{p}");
    }
    let status = ctl_json(&ops, &["status"]);
    assert_eq!(status["ports"].as_array().unwrap().len(), 3);
    let text = ctl(&ops, &["status"]);
    assert!(
        text.contains("stream") && text.contains(a.to_str().unwrap()),
        "{text}"
    );
}

/// A port added over the control socket serves a guest at once; one removed closes its
/// socket (the guest's relay sees the end) and its file; bad requests change nothing.
#[test]
fn ports_come_and_go_at_run_time() {
    require_root!();
    let mut lab = Lab::bare_with_server();
    let ops = open_dir(&lab, "ops");
    lab.start_hubnat_args(&control_config(&ops), &[]);
    wait_until(Duration::from_secs(10), || {
        ops.join("ctl.sock").exists().then_some(())
    })
    .expect("control socket");
    udhcpc_lease(&lab, &lab.guest, &lab.tap, &[]);
    // The state directory is the sandbox's own: sockets may be made there at run time.
    let path = lab.dir.join("state").join("vm2.sock");
    let spec = format!("stream:{}", path.display());
    let list = ctl_json(&ops, &["port", "add", &spec]);
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    let (g, mut relay) = socket_guest(&lab, "gr", &["--stream", path.to_str().unwrap()]);
    // Should the lease fail (as it did once, with nothing in hubnat's log), say which side
    // stalled: the port's counters, and what the relay and its interface saw.
    let explain = || -> String {
        let relay_logs: Vec<String> = std::fs::read_dir(&lab.dir.0)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("sg-"))
            .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
            .collect();
        format!(
            "port list: {}\nrelay running: {}\nrelay log: {}\nguest eth0: {}",
            ctl_json(&ops, &["port", "list"]),
            relay.is_running(),
            relay_logs.join("\n---\n"),
            String::from_utf8_lossy(&g.exec(&["ip", "-s", "link", "show", "eth0"]).stdout)
        )
    };
    udhcpc_lease_explained(&lab, &g, "eth0", &[], explain);
    assert!(ping(&g, HOST_IP));
    // Refused, with the reason; the ports are as they were.
    assert!(ctl_fails(&ops, &["port", "add", "vde:/tmp/x"]).contains("expected"));
    assert!(ctl_fails(&ops, &["port", "add", &spec]).contains(path.to_str().unwrap()));
    assert!(
        ctl_fails(&ops, &["port", "add", "stream:/nonexistent/dir/x.sock"])
            .contains("/nonexistent/dir/x.sock")
    );
    assert!(ctl_fails(&ops, &["port", "remove", "0"]).contains("first TAP"));
    assert!(ctl_fails(&ops, &["port", "remove", "9"]).contains("no port 9"));
    assert_eq!(ports(&ops).len(), 2);
    let id = port(&ports(&ops), "stream")["id"]
        .as_u64()
        .unwrap()
        .to_string();
    ctl(&ops, &["port", "remove", &id]);
    assert_eq!(ports(&ops).len(), 1);
    let ended = wait_until(Duration::from_secs(5), || {
        (!relay.is_running()).then_some(())
    });
    assert!(ended.is_some(), "the relay saw its connection end");
    assert!(!path.exists(), "the socket file is removed with the port");
    assert!(ping(&lab.guest, HOST_IP), "the TAP guest is still served");
}

/// A client that sends a length over the MTU is disconnected, a truncated frame is counted,
/// and the port then serves the next client; the other ports never notice.
#[test]
fn a_stream_peer_that_breaks_the_framing_is_dropped() {
    require_root!();
    let mut lab = Lab::bare_with_server();
    let ops = open_dir(&lab, "ops");
    let path = ops.join("s.sock");
    let spec = format!("stream:{}", path.display());
    lab.start_hubnat_args(&control_config(&ops), &["--port", &spec]);
    lab.guest.wait_for_link(&lab.tap, Duration::from_secs(10));
    wait_until(Duration::from_secs(10), || path.exists().then_some(()))
        .expect("the stream port's socket");
    // 70,000 bytes announced: over any MTU.
    let mut bad = UnixStream::connect(&path).unwrap();
    bad.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut msg = 70_000u32.to_be_bytes().to_vec();
    msg.extend_from_slice(&[0u8; 64]);
    bad.write_all(&msg).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(bad.read(&mut buf).unwrap_or(0), 0, "hubnat hung up");
    // A frame cut short by the client's end.
    let mut cut = UnixStream::connect(&path).unwrap();
    let mut msg = 100u32.to_be_bytes().to_vec();
    msg.extend_from_slice(&[0u8; 40]);
    cut.write_all(&msg).unwrap();
    drop(cut);
    let counted = wait_until(Duration::from_secs(5), || {
        let p = port(&ports(&ops), "stream").clone();
        (p["malformed"] == 2).then_some(p)
    });
    let p = counted.unwrap_or_else(|| panic!("{:?}", ports(&ops)));
    assert!(p["disconnects"].as_u64().unwrap() >= 2, "{p}");
    let (g, _relay) = socket_guest(&lab, "gk", &["--stream", path.to_str().unwrap()]);
    udhcpc_lease(&lab, &g, "eth0", &[]);
    assert!(ping(&g, HOST_IP));
    udhcpc_lease(&lab, &lab.guest, &lab.tap, &[]);
    assert!(ping(&lab.guest, HOST_IP));
    assert!(
        lab.hubnat_log().contains("70000"),
        "the log names the bad length"
    );
}

/// `--attach` alone (no TAP of hubnat's): hubnat joins a veth whose peer is on a Linux bridge,
/// and serves two guests behind that bridge whose offloads are on (partial checksums, TSO
/// super-frames): leases, a page, a 4 MiB upload through the NAT, and the guests reach each
/// other over the bridge.
#[test]
fn attach_serves_guests_on_a_bridge() {
    require_root!();
    let mut lab = Lab::bare_with_server();
    let ops = open_dir(&lab, "ops");
    let g = &lab.guest;
    g.exec_ok(&["ip", "link", "add", "br0", "type", "bridge"]);
    g.exec_ok(&["ip", "link", "set", "br0", "up"]);
    let (near, far) = (common::unique("hp"), common::unique("hq"));
    g.exec_ok(&[
        "ip",
        "link",
        "add",
        &far,
        "type",
        "veth",
        "peer",
        "name",
        &near,
        "netns",
        &lab.nat.name,
    ]);
    g.exec_ok(&["ip", "link", "set", &far, "master", "br0"]);
    g.exec_ok(&["ip", "link", "set", &far, "up"]);
    lab.nat.exec_ok(&["ip", "link", "set", &near, "up"]);
    let (ga, gb) = lab.two_guests_on_bridge("br0");
    lab.start_hubnat_cmd(&control_config(&ops), &["--attach", &near]);
    wait_until(Duration::from_secs(10), || {
        ops.join("ctl.sock").exists().then_some(())
    })
    .expect("control socket");
    let _www = lab.httpd(lab.server(), None, "through an attached interface\n");
    let _sink = lab.serve(&["tcp-sink", "--listen", "0.0.0.0:9001"]);
    udhcpc_lease(&lab, &ga, "eth0", &[]);
    let ip_b = udhcpc_lease(&lab, &gb, "eth0", &[]);
    let url = format!("http://{SERVER_IP}:8080/index.html");
    assert_eq!(curl(&ga, &url), "through an attached interface\n");
    let bin = testsrv_bin();
    let up = ga.exec(&[
        bin.to_str().unwrap(),
        "put",
        "--connect",
        &format!("{SERVER_IP}:9001"),
        "--bytes",
        "4194304",
    ]);
    assert!(up.status.success(), "{up:?}\n{}", lab.hubnat_log());
    assert!(ping(&ga, &ip_b));
    assert!(ping(&ga, HOST_IP));
    let list = ports(&ops);
    assert_eq!(list.len(), 1, "{list:?}");
    let p = port(&list, "packet");
    assert_eq!(p["address"], near.as_str());
    // Both guests, and the bridge itself (its own frames: IPv6 solicitations and the like).
    assert!(p["macs"].as_u64().unwrap() >= 2, "both guests learned: {p}");
    assert_eq!(p["malformed"], 0, "{p}");
}

/// `--fd`: a launcher hands hubnat one end of a connected stream pair (here as its standard
/// input) and the guest's side the other; the guest is served through it, and `port list`
/// shows the inherited descriptor.
#[test]
fn an_inherited_descriptor_is_a_port() {
    require_root!();
    let mut lab = Lab::bare_with_server();
    let ops = open_dir(&lab, "ops");
    let (ours, theirs) = UnixStream::pair().unwrap();
    lab.start_hubnat_cmd_with(
        &control_config(&ops),
        &["--fd", "0"],
        Stdio::from(OwnedFd::from(theirs)),
    );
    let ns = Netns::new("gf");
    let mut cmd = Command::new(testsrv_bin());
    cmd.args([
        "socket-guest",
        "--netns",
        &ns.path(),
        "--tap",
        "eth0",
        "--stream-stdin",
    ])
    .stdin(Stdio::from(OwnedFd::from(ours)));
    let _relay = Proc::spawn("socket-guest", cmd, Some(lab.dir.join("sg-fd.log")));
    ns.wait_for_link("eth0", Duration::from_secs(10));
    wait_until(Duration::from_secs(10), || {
        ops.join("ctl.sock").exists().then_some(())
    })
    .expect("control socket");
    let _www = lab.httpd(lab.server(), None, "through an inherited descriptor\n");
    udhcpc_lease(&lab, &ns, "eth0", &[]);
    let url = format!("http://{SERVER_IP}:8080/index.html");
    assert_eq!(curl(&ns, &url), "through an inherited descriptor\n");
    let list = ports(&ops);
    assert_eq!(list.len(), 1, "{list:?}");
    let p = port(&list, "fd");
    assert_eq!(p["connected"], true, "{p}");
    assert_eq!(p["address"], "fd:0", "{p}");
}
