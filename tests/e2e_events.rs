//! End-to-end: `hubnat events`, the control socket's event stream. Clients stream while a guest
//! takes a lease and opens a TCP session: the stream shows the DHCP entry and the session's
//! life with their fields; a client that never reads loses lines (and hears how many once it
//! reads) without holding the guest up; streams are limited in number, never closed as idle,
//! and `hubnat events` ends cleanly on Ctrl-C and when hubnat stops.

#[macro_use]
mod common;

use common::{control_config, open_dir, udhcpc_lease};

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{ctl, wait_until, Lab, Proc, SERVER_IP};
use regex::Regex;
use serde_json::Value;

const GUEST_MAC: &str = "02:00:00:00:7e:01";

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

/// `hubnat events ARGS` against the lab's socket, its output (and errors) in `log`.
fn events_cli(ops: &Path, args: &[&str], log: PathBuf) -> Proc {
    let mut cmd = Command::new(common::hubnat_bin());
    cmd.arg("--control")
        .arg(ops.join("ctl.sock"))
        .arg("events")
        .args(args);
    Proc::spawn("hubnat events", cmd, Some(log))
}

/// The JSON objects among a file's lines.
fn json_lines(p: &Path) -> Vec<Value> {
    common::read(p)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect()
}

/// Opens a stream by hand and reads its answer (byte by byte: nothing after it is taken).
fn raw_stream(ops: &Path) -> (UnixStream, Value) {
    let mut s = UnixStream::connect(ops.join("ctl.sock")).unwrap();
    s.write_all(b"{\"cmd\":\"events\"}\n").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut answer = Vec::new();
    let mut b = [0u8; 1];
    while answer.last() != Some(&b'\n') {
        assert_eq!(s.read(&mut b).unwrap(), 1, "the answer ended early");
        answer.push(b[0]);
    }
    (s, serde_json::from_slice(&answer).unwrap())
}

/// Sends `n` configuration changes on one connection (alternating the UDP timeout), reading
/// the answers as it goes: a burst of `config_changed` events.
fn change_burst(ops: &Path, n: usize) {
    let mut s = UnixStream::connect(ops.join("ctl.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut answer = String::new();
    for batch in 0..n.div_ceil(100) {
        let mut req = String::new();
        for i in 0..100 {
            let secs = 200 + (batch * 100 + i) % 2;
            req.push_str(&format!(
                "{{\"cmd\":\"set\",\"section\":\"nat\",\"values\":{{\"udp_timeout\":\"{secs}\"}}}}\n"
            ));
        }
        s.write_all(req.as_bytes()).unwrap();
        for _ in 0..100 {
            answer.clear();
            r.read_line(&mut answer).unwrap();
            assert!(answer.contains("\"ok\":true"), "{answer}");
        }
    }
}

fn find(lines: &[Value], f: impl Fn(&Value) -> bool) -> Option<&Value> {
    lines.iter().find(|v| f(v))
}

#[test]
fn events_stream_the_lease_and_the_session_and_a_stalled_reader_stalls_nothing() {
    require_root!();
    let mut lab = Lab::bare_with_server();
    let ops = open_dir(&lab, "ops");
    lab.start_hubnat_args(&control_config(&ops), &[]);
    wait_control(&ops, &lab);
    let started = Instant::now();
    let json_log = lab.dir.join("events.json");
    let text_log = lab.dir.join("events.txt");
    let mut json_cli = events_cli(&ops, &["--json"], json_log.clone());
    let mut text_cli = events_cli(&ops, &["--kinds", "dhcp,config"], text_log.clone());

    // Both are streaming once a change made now reaches them.
    let mut n = 0;
    wait_until(Duration::from_secs(10), || {
        n += 1;
        ctl(&ops, &["nat", "set", &format!("tcp_timeout={}", 3600 + n)]);
        let json = json_lines(&json_log)
            .iter()
            .any(|v| v["kind"] == "config_changed");
        let text = common::read(&text_log)
            .contains("configuration changed (control socket): nat.tcp_timeout");
        (json && text).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "no stream started:\n{}\n{}",
            common::read(&json_log),
            common::read(&text_log)
        )
    });
    let change = find(&json_lines(&json_log), |v| v["kind"] == "config_changed")
        .cloned()
        .unwrap();
    assert_eq!(change["source"], "control socket");
    assert!(change["change"]
        .as_str()
        .unwrap()
        .starts_with("nat.tcp_timeout: "));
    assert!(change["time"].as_str().unwrap().contains('T'), "{change}");

    // A client that never reads past the answer.
    let (mut stalled, answer) = raw_stream(&ops);
    assert_eq!(answer["ok"], true, "{answer}");
    assert_eq!(answer["result"]["streaming"], true, "{answer}");

    // At most 8 streams: with 5 more, a ninth is refused, and the slots come back.
    let extra: Vec<_> = (0..5).map(|_| raw_stream(&ops)).collect();
    assert!(extra.iter().all(|(_, a)| a["ok"] == true));
    let (_, refused) = raw_stream(&ops);
    assert_eq!(refused["ok"], false, "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("event streams are open already"),
        "{refused}"
    );
    drop(extra);

    // A burst far larger than what the stalled client's socket and its buffer in hubnat hold.
    change_burst(&ops, 4000);

    // The guest takes a lease and fetches a page meanwhile: nothing waits for the stalled one.
    lab.guest
        .exec_ok(&["ip", "link", "set", &lab.tap, "address", GUEST_MAC]);
    let ip = udhcpc_lease(&lab, &lab.guest, &lab.tap, &["-x", "hostname:e2e-events"]);
    let _httpd = lab.httpd(lab.server(), None, "hello events\n");
    let url = format!("http://{SERVER_IP}:8080/index.html");
    let page = lab
        .guest
        .exec_ok(&["curl", "-sS", "--max-time", "10", &url]);
    assert_eq!(page, "hello events\n");

    // The stream has the DHCP entry and the session's life, with their fields.
    let dst = format!("{SERVER_IP}:8080");
    let seen = wait_until(Duration::from_secs(30), || {
        let lines = json_lines(&json_log);
        let created = find(&lines, |v| {
            v["kind"] == "session_created" && v["proto"] == "TCP" && v["dst"] == dst.as_str()
        })?
        .clone();
        let id = created["session"].clone();
        find(&lines, |v| {
            v["kind"] == "session_deleted" && v["session"] == id
        })?;
        Some(lines)
    })
    .unwrap_or_else(|| {
        panic!(
            "no session's life in the stream:\n{}\n{}",
            common::read(&json_log),
            lab.hubnat_log()
        )
    });
    let dhcp = find(&seen, |v| v["kind"] == "dhcp_entry_created").expect("DHCP entry streamed");
    assert_eq!(dhcp["mac"], "02-00-00-00-7E-01", "{dhcp}");
    assert_eq!(dhcp["ip"], ip.as_str(), "{dhcp}");
    assert_eq!(dhcp["host_name"], "e2e-events", "{dhcp}");
    assert!(dhcp["id"].is_u64() && dhcp["lease_secs"].as_u64() > Some(0));
    assert!(dhcp["message"]
        .as_str()
        .unwrap()
        .starts_with("SecureNAT: The DHCP entry"));
    let created = find(&seen, |v| {
        v["kind"] == "session_created" && v["dst"] == dst.as_str()
    })
    .unwrap();
    let id = created["session"].as_u64().expect("a session id");
    let src = created["src"].as_str().unwrap();
    assert!(src.starts_with(&format!("{ip}:")), "{created}");
    let connected = find(&seen, |v| {
        v["kind"] == "tcp_connected" && v["session"] == id
    })
    .unwrap_or_else(|| panic!("no tcp_connected for session {id}"));
    assert_eq!(connected["ip"], SERVER_IP);
    assert_eq!(connected["port"], 8080);
    let deleted = find(&seen, |v| {
        v["kind"] == "session_deleted" && v["session"] == id
    })
    .unwrap();
    assert_eq!(deleted["proto"], "TCP");
    // In the order they happened.
    let pos = |w: &Value| seen.iter().position(|v| v == w).unwrap();
    assert!(pos(dhcp) < pos(created) && pos(created) < pos(connected));
    assert!(pos(connected) < pos(deleted));
    for v in &seen {
        assert!(v["time"].is_string() && v["kind"].is_string(), "{v}");
    }

    // The stalled client reads at last: it hears how many lines it lost, then the stream goes
    // on for it.
    let mut r = BufReader::new(stalled.try_clone().unwrap());
    let mut line = String::new();
    let mut lost = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    while lost.is_none() && Instant::now() < deadline {
        line.clear();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        let v: Value = serde_json::from_str(&line).unwrap();
        if v["kind"] == "lost" {
            lost = v["count"].as_u64();
        }
    }
    let lost = lost.expect("a `lost` line for the stalled client");
    assert!(lost > 0);
    ctl(&ops, &["nat", "set", "udp_timeout=77"]);
    let after = wait_until(Duration::from_secs(10), || {
        line.clear();
        r.read_line(&mut line).ok()?;
        (line.contains("nat.udp_timeout: ") && line.contains(" -> 77")).then_some(())
    });
    assert!(after.is_some(), "the stalled client's stream ended");
    let _ = stalled.flush();

    // Longer than the control socket's idle timeout (30 s): streams are not idle.
    if let Some(rest) = Duration::from_secs(32).checked_sub(started.elapsed()) {
        std::thread::sleep(rest);
    }
    ctl(&ops, &["nat", "set", "udp_timeout=78"]);
    wait_until(Duration::from_secs(10), || {
        common::read(&json_log)
            .contains("nat.udp_timeout: 77 -> 78")
            .then_some(())
    })
    .unwrap_or_else(|| panic!("the stream was closed:\n{}", common::read(&json_log)));

    // Ctrl-C ends `hubnat events` cleanly.
    json_cli.signal(2);
    let st = wait_until(Duration::from_secs(5), || json_cli.child.try_wait().ok()?)
        .expect("hubnat events did not end on SIGINT");
    assert!(st.success(), "{st:?}");

    // So does hubnat's stopping; the readable form is the security log's text, filtered.
    let mut hubnat = lab.hubnat.take().unwrap();
    hubnat.stop(Duration::from_secs(10));
    let st = wait_until(Duration::from_secs(5), || text_cli.child.try_wait().ok()?)
        .expect("hubnat events did not end with hubnat");
    assert!(st.success(), "{st:?}");
    let text = common::read(&text_log);
    let re = Regex::new(&format!(
        r"(?m)^\d{{4}}-\d{{2}}-\d{{2}} \d{{2}}:\d{{2}}:\d{{2}}\.\d{{3}} SecureNAT: The DHCP entry \d+ was created\. MAC address: 02-00-00-00-7E-01, IP address: {}, host name: e2e-events, expiration date: \d+ seconds$",
        regex::escape(&ip)
    ))
    .unwrap();
    assert!(re.is_match(&text), "{text}");
    assert!(!text.contains("session"), "filtered out: {text}");
    assert!(text.contains("the event stream ended"), "{text}");
}
