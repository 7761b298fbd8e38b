//! Capturing the segment to a pcap file, end to end: `hubnat run --pcap` from start (a real
//! DHCP client's exchange is in the file, which tcpdump reads), `hubnat capture start` and
//! `stop` at run time, files hubnat may not write (at start and in its sandbox), and the cap.

#[macro_use]
mod common;

use common::{control_config, open_dir, udhcpc_lease};

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{ctl, ctl_json, must, wait_until, Lab};

const HOST_IP: &str = "192.168.30.1";

/// What `tcpdump -r FILE -nn -v` prints (it must read the file without complaint).
fn tcpdump(file: &Path) -> String {
    let out = Command::new("tcpdump")
        .arg("-r")
        .arg(file)
        .args(["-nn", "-v"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tcpdump -r {}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

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

fn wait_for_control(ops: &Path) {
    wait_until(Duration::from_secs(10), || {
        ops.join("ctl.sock").exists().then_some(())
    })
    .expect("control socket");
}

/// `--pcap` from start: the guest's DHCP exchange, both ways, is in the file once hubnat has
/// stopped, and the log says how the capture ended.
#[test]
fn a_lease_is_in_the_capture_from_start() {
    require_root!();
    let mut lab = Lab::bare_with_server();
    let ops = open_dir(&lab, "ops");
    let caps = open_dir(&lab, "caps");
    let file = caps.join("start.pcap");
    lab.start_hubnat_args(&control_config(&ops), &["--pcap", file.to_str().unwrap()]);
    wait_for_control(&ops);
    udhcpc_lease(&lab, &lab.guest, &lab.tap, &[]);
    let status = ctl_json(&ops, &["status"]);
    assert_eq!(status["capture"]["active"], true, "{status}");
    let human = ctl(&ops, &["status"]);
    assert!(
        human.contains("Capture") && human.contains("start.pcap"),
        "{human}"
    );
    let st = lab.hubnat.as_mut().unwrap().stop(Duration::from_secs(10));
    assert!(st.is_some_and(|s| s.success()), "{}", lab.hubnat_log());
    let log = lab.hubnat_log();
    assert!(
        log.contains("ended (hubnat stopped)") && log.contains("frames dropped"),
        "{log}"
    );
    let dump = tcpdump(&file);
    for kind in ["Discover", "Offer", "Request", "ACK"] {
        assert!(
            dump.contains(&format!("DHCP-Message (53), length 1: {kind}")),
            "no DHCP {kind} in the capture:\n{dump}"
        );
    }
    // Both directions: the guest's requests and the virtual host's replies.
    assert!(dump.contains("BOOTP/DHCP, Request") && dump.contains("BOOTP/DHCP, Reply"));
}

/// A file hubnat cannot make at start is refused with the reason, before anything is made
/// (no TAP in the guest's namespace).
#[test]
fn an_unwritable_file_is_refused_at_start() {
    require_root!();
    let mut lab = Lab::bare_with_server();
    let ops = open_dir(&lab, "ops");
    let guest = lab.guest.path();
    lab.start_hubnat_cmd(
        &control_config(&ops),
        &[
            "--tap",
            "tap0",
            "--netns",
            &guest,
            "--pcap",
            "/nonexistent/dir/x.pcap",
        ],
    );
    let p = lab.hubnat.as_mut().unwrap();
    let ended = wait_until(Duration::from_secs(10), || {
        p.child.try_wait().ok().flatten()
    });
    let log = lab.hubnat_log();
    assert!(ended.is_some_and(|s| !s.success()), "{log}");
    assert!(
        log.contains("/nonexistent/dir/x.pcap") && log.contains("No such file"),
        "{log}"
    );
    assert!(
        lab.guest
            .exec(&["ip", "link", "show", "tap0"])
            .status
            .code()
            != Some(0)
    );
}

/// `capture start` and `stop` at run time: a second file, readable by tcpdump, with the
/// guest's pings in it; refusals leave the capture as it was.
#[test]
fn a_capture_at_run_time() {
    require_root!();
    let mut lab = Lab::bare_with_server();
    let ops = open_dir(&lab, "ops");
    let caps = open_dir(&lab, "caps");
    let first = caps.join("first.pcap");
    lab.start_hubnat_args(
        &control_config(&ops),
        &["--pcap", first.to_str().unwrap(), "--pcap-max-mib", "8"],
    );
    wait_for_control(&ops);
    udhcpc_lease(&lab, &lab.guest, &lab.tap, &[]);
    // Already on (from start): refused.
    let why = ctl_fails(&ops, &["capture", "start", "/tmp/never.pcap"]);
    assert!(
        why.contains("first.pcap") && why.contains("stop it first"),
        "{why}"
    );
    assert!(ctl(&ops, &["capture", "stop"]).contains("ended"));
    assert!(ctl_fails(&ops, &["capture", "stop"]).contains("no capture is on"));
    assert!(tcpdump(&first).contains("BOOTP/DHCP"));

    // Outside the directories the sandbox lets hubnat write (the lab's directory is one: its
    // configuration file is there), in one DAC would allow.
    let other = common::TempDir::new();
    must(Command::new("chmod").arg("777").arg(&other.0));
    let elsewhere = other.join("x.pcap");
    let why = ctl_fails(&ops, &["capture", "start", elsewhere.to_str().unwrap()]);
    let sandboxed = !common::extra_args().iter().any(|a| a == "--no-sandbox");
    if sandboxed {
        assert!(
            why.contains("x.pcap") && why.contains("sandbox") && why.contains("state"),
            "{why}"
        );
        assert!(!elsewhere.exists());
    }
    assert_eq!(ctl_json(&ops, &["status"])["capture"]["active"], false);

    // Beside the first (its directory stays writable), and in the state directory.
    for second in [
        caps.join("second.pcap"),
        lab.dir.join("state").join("s.pcap"),
    ] {
        let st = ctl_json(&ops, &["capture", "start", second.to_str().unwrap()]);
        assert_eq!(st["active"], true, "{st}");
        assert!(lab
            .guest
            .exec(&["ping", "-c", "3", "-i", "0.2", "-W", "2", HOST_IP])
            .status
            .success());
        let st = ctl_json(&ops, &["capture", "stop"]);
        assert_eq!(st["ended"], "stopped by the operator", "{st}");
        assert!(st["frames"].as_u64().unwrap() >= 6, "{st}");
        let dump = tcpdump(&second);
        assert!(
            dump.contains(&format!("> {HOST_IP}: ICMP echo request"))
                && dump.contains(&format!("{HOST_IP} > "))
                && dump.contains("ICMP echo reply"),
            "{dump}"
        );
    }
}

/// The cap ends the capture: the file stays under it, tcpdump reads it, and the log and
/// `status` say why it ended.
#[test]
fn the_cap_stops_the_capture() {
    require_root!();
    let mut lab = Lab::bare_with_server();
    let ops = open_dir(&lab, "ops");
    let caps = open_dir(&lab, "caps");
    lab.start_hubnat_args(&control_config(&ops), &[]);
    wait_for_control(&ops);
    udhcpc_lease(&lab, &lab.guest, &lab.tap, &[]);
    let file = caps.join("capped.pcap");
    ctl(
        &ops,
        &["capture", "start", file.to_str().unwrap(), "--max-mib", "1"],
    );
    // About 2.8 MB both ways: well past the cap.
    lab.guest
        .exec(&["ping", "-f", "-c", "1000", "-s", "1400", "-W", "1", HOST_IP]);
    let ended = wait_until(Duration::from_secs(10), || {
        let st = ctl_json(&ops, &["status"]);
        (st["capture"]["active"] == false).then_some(st)
    })
    .expect("the capture ends at its cap");
    let why = ended["capture"]["ended"].as_str().unwrap().to_owned();
    assert!(why.contains("cap of 1 MiB"), "{ended}");
    let len = std::fs::metadata(&file).unwrap().len();
    assert!(len <= 1 << 20 && len > (1 << 20) - 2000, "{len}");
    assert!(tcpdump(&file).contains("ICMP echo"));
    assert!(
        lab.hubnat_log().contains("reached its cap of 1 MiB"),
        "{}",
        lab.hubnat_log()
    );
}
