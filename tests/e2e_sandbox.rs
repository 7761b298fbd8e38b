//! The sandbox end to end: while `hubnat run` serves traffic, /proc shows it as an unprivileged
//! user, with no-new-privs, a seccomp filter and only the documented capabilities; a system call
//! outside the filter's list fails from inside the process; `--no-sandbox` keeps root.

#[macro_use]
mod common;

use std::time::Duration;

use common::{wait_until, Lab, SERVER_IP};

/// The `Key:` line of /proc/PID/status.
fn status_field(pid: u32, key: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_owned()))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

/// Carries TCP both ways and UDP through the NAT (the sandbox must not get in the data
/// path's way).
fn fetch(lab: &Lab) {
    let at = |port: u16| format!("{SERVER_IP}:{port}");
    let _sink = lab.serve(&["tcp-sink", "--listen", "0.0.0.0:9001"]);
    let _source = lab.serve(&[
        "tcp-source",
        "--listen",
        "0.0.0.0:9002",
        "--bytes",
        "1048576",
        "--seed",
        "7",
    ]);
    let _echo = lab.serve(&["udp-echo", "--listen", "0.0.0.0:7101"]);
    let up = lab.client(&[
        "put",
        "--connect",
        &at(9001),
        "--bytes",
        "1048576",
        "--seed",
        "3",
    ]);
    assert!(up.status.success(), "upload: {up:?}\n{}", lab.hubnat_log());
    let down = lab.client(&[
        "get",
        "--connect",
        &at(9002),
        "--bytes",
        "1048576",
        "--seed",
        "7",
    ]);
    assert!(
        down.status.success(),
        "download: {down:?}\n{}",
        lab.hubnat_log()
    );
    let ping = lab.client(&["udp-ping", "--connect", &at(7101), "--count", "5"]);
    assert!(ping.status.success(), "udp: {ping:?}\n{}", lab.hubnat_log());
}

const CAP_NET_ADMIN: u64 = 1 << 12;
const CAP_NET_RAW: u64 = 1 << 13;

#[test]
fn a_running_hubnat_is_unprivileged_filtered_and_still_serves() {
    require_root!();
    let lab = Lab::start_with_server_args("", &["--sandbox-check"]);
    fetch(&lab);
    let pid = lab.hubnat.as_ref().unwrap().pid();
    let uids = status_field(pid, "Uid:");
    assert!(
        uids.split_whitespace().all(|u| u != "0"),
        "still root: Uid {uids}\n{}",
        lab.hubnat_log()
    );
    assert_eq!(status_field(pid, "NoNewPrivs:"), "1");
    assert_eq!(status_field(pid, "Seccomp:"), "2");
    let eff = u64::from_str_radix(&status_field(pid, "CapEff:"), 16).unwrap();
    assert_eq!(
        eff & !(CAP_NET_ADMIN | CAP_NET_RAW),
        0,
        "capabilities beyond the documented ones: {eff:#x}"
    );
    let bnd = u64::from_str_radix(&status_field(pid, "CapBnd:"), 16).unwrap();
    assert_eq!(
        bnd & !(CAP_NET_ADMIN | CAP_NET_RAW),
        0,
        "bounding set {bnd:#x}"
    );
    let log = lab.hubnat_log();
    assert!(
        log.contains("sandbox check: execve refused"),
        "the filter let execve through:\n{log}"
    );
    assert!(log.contains("no-new-privs"), "{log}");
    // Every thread is filtered, not just the main one.
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let tid = task.unwrap().file_name();
        let status =
            std::fs::read_to_string(format!("/proc/{pid}/task/{}/status", tid.to_string_lossy()))
                .unwrap();
        assert!(
            status
                .lines()
                .any(|l| l.starts_with("Seccomp:") && l.ends_with('2')),
            "thread {tid:?} is not filtered"
        );
    }
}

#[test]
fn without_napi_switching_or_real_icmp_no_capability_is_kept() {
    require_root!();
    let lab = Lab::start_with_server_args("[nat]\nicmp = \"dummy\"\n", &["--tap-napi", "off"]);
    fetch(&lab);
    let pid = lab.hubnat.as_ref().unwrap().pid();
    assert_eq!(status_field(pid, "CapEff:"), "0000000000000000");
    assert_eq!(status_field(pid, "CapPrm:"), "0000000000000000");
    assert!(lab.hubnat_log().contains("no capabilities"));
}

#[test]
fn no_sandbox_keeps_root_and_says_so() {
    require_root!();
    let lab = Lab::start_with_server_args("", &["--no-sandbox"]);
    let pid = lab.hubnat.as_ref().unwrap().pid();
    wait_until(Duration::from_secs(5), || {
        lab.hubnat_log().contains("sandbox off").then_some(())
    })
    .expect("no warning that the sandbox is off");
    assert!(status_field(pid, "Uid:").starts_with('0'));
    assert_eq!(status_field(pid, "Seccomp:"), "0");
}
