//! End-to-end: offloads on the TAP. With `--offload auto` (the default) the guest's kernel sees
//! a device that does checksums and TCP segmentation, hands hubnat TCP super-segments of up to
//! 64 KiB with their checksums only started, and everything still arrives intact; with
//! `--offload off` it segments and checksums itself.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{control_config, ctl_json, open_dir, wait_until, Lab, SERVER_IP};

const MIB: u64 = 1024 * 1024;

/// The guest's view of one of its interface's features ("on", "off"; "[fixed]" dropped).
fn feature(lab: &Lab, name: &str) -> String {
    let out = lab.guest.exec_ok(&["ethtool", "-k", &lab.tap]);
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .map(|v| v.split_whitespace().next().unwrap_or("").to_owned())
        .unwrap_or_else(|| panic!("no {name} in:\n{out}"))
}

fn wait_for_control(ops: &Path) {
    wait_until(Duration::from_secs(5), || {
        ops.join("ctl.sock").exists().then_some(())
    })
    .expect("control socket");
}

/// A lab whose hubnat runs with `--offload MODE` and a control socket in the returned
/// directory, its guest addressed.
fn lab_with_offload(mode: &str) -> (Lab, std::path::PathBuf) {
    let mut lab = Lab::bare_with_server();
    let ops = open_dir(&lab, "ops");
    lab.start_hubnat_args(&control_config(&ops), &["--offload", mode]);
    lab.address_guest();
    wait_for_control(&ops);
    (lab, ops)
}

/// Uploads `bytes` from the guest (the sink checks the digest), downloads as many, and returns
/// hubnat's (frames, bytes) in from the TAP over the upload.
fn upload_and_download(lab: &Lab, ops: &Path, bytes: u64) -> (u64, u64) {
    let _sink = lab.serve(&["tcp-sink", "--listen", "0.0.0.0:9101"]);
    let b = bytes.to_string();
    let _source = lab.serve(&[
        "tcp-source",
        "--listen",
        "0.0.0.0:9102",
        "--bytes",
        &b,
        "--seed",
        "11",
    ]);
    let before = ctl_json(ops, &["status"]);
    let up = lab.client(&[
        "put",
        "--connect",
        &format!("{SERVER_IP}:9101"),
        "--bytes",
        &b,
        "--seed",
        "5",
    ]);
    assert!(up.status.success(), "upload: {up:?}\n{}", lab.hubnat_log());
    let after = ctl_json(ops, &["status"]);
    let down = lab.client(&[
        "get",
        "--connect",
        &format!("{SERVER_IP}:9102"),
        "--bytes",
        &b,
        "--seed",
        "11",
    ]);
    assert!(
        down.status.success(),
        "download: {down:?}\n{}",
        lab.hubnat_log()
    );
    let n = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or_else(|| panic!("{k}: {v}"));
    (
        n(&after, "frames_in") - n(&before, "frames_in"),
        n(&after, "bytes_in") - n(&before, "bytes_in"),
    )
}

#[test]
fn a_guest_with_offloads_hands_over_super_segments_that_arrive_intact() {
    require_root!();
    let (lab, ops) = lab_with_offload("auto");
    if !lab.hubnat_log().contains("offloaded to hubnat") {
        // A kernel that refused TUNSETOFFLOAD says so in the log; then there is nothing to see.
        assert!(
            lab.hubnat_log().contains("refused its offloads"),
            "{}",
            lab.hubnat_log()
        );
        eprintln!("skipped: this kernel refused the TAP's offloads");
        return;
    }
    assert_eq!(feature(&lab, "tcp-segmentation-offload"), "on");
    assert_eq!(feature(&lab, "tx-checksumming"), "on");
    let (frames, bytes) = upload_and_download(&lab, &ops, 64 * MIB);
    // Without offloads an upload comes in frames of at most 1514 bytes (and as many ACKs
    // the other way); super-segments make the average several times that.
    let mean = bytes / frames.max(1);
    assert!(
        mean > 4 * 1514,
        "{frames} frames, {bytes} bytes: mean {mean}"
    );
    // No frame of the guest's was refused for what its header left to hubnat.
    let st = ctl_json(&ops, &["status"]);
    assert_eq!(st["drops"]["bad_checksum"].as_u64().unwrap_or(0), 0, "{st}");
    assert_eq!(st["drops"]["malformed"].as_u64().unwrap_or(0), 0, "{st}");
}

/// The guest's interface's packet counter `what` (tx_packets, rx_packets).
fn counter(lab: &Lab, what: &str) -> u64 {
    let path = format!("/sys/class/net/{}/statistics/{what}", lab.tap);
    lab.guest
        .exec_ok(&["cat", &path])
        .trim()
        .parse()
        .expect(what)
}

/// Runs of datagrams sent as one (UDP_SEGMENT) from the guest to a udp-echo and back; every
/// datagram must come back whole. Returns the guest's (packets sent, packets received) over it.
fn udp_runs(lab: &Lab, rounds: u32, batch: u32) -> (u64, u64) {
    // The echo takes each run whole (UDP_GRO) and sends it back as one (UDP_SEGMENT).
    let _echo = lab.serve(&["udp-echo", "--listen", "0.0.0.0:9103", "--runs"]);
    let (tx, rx) = (counter(lab, "tx_packets"), counter(lab, "rx_packets"));
    let out = lab.client(&[
        "udp-gso-ping",
        "--connect",
        &format!("{SERVER_IP}:9103"),
        "--rounds",
        &rounds.to_string(),
        "--batch",
        &batch.to_string(),
        "--size",
        "1000",
    ]);
    assert!(
        out.status.success(),
        "udp-gso-ping: {out:?}\n{}",
        lab.hubnat_log()
    );
    (
        counter(lab, "tx_packets") - tx,
        counter(lab, "rx_packets") - rx,
    )
}

#[test]
fn a_guest_sending_runs_of_datagrams_hands_over_uso_frames_and_each_arrives_whole() {
    require_root!();
    let (lab, ops) = lab_with_offload("auto");
    let uso = lab
        .hubnat_log()
        .contains("TCP and UDP segmentation offloaded");
    let (rounds, batch) = (20, 32);
    let (sent, received) = udp_runs(&lab, rounds, batch);
    eprintln!("{rounds} runs of {batch}: the guest sent {sent} frames, received {received}");
    if uso {
        assert_eq!(feature(&lab, "tx-udp-segmentation"), "on");
        // One frame a run (a resent run, a neighbour solicitation: a few more), where the
        // guest segmenting itself would send one a datagram. Back, each run reaches hubnat's
        // socket whole and the guest as one frame.
        assert!(
            sent < u64::from(rounds * batch) / 4,
            "the guest sent {sent} frames for {rounds} runs of {batch}"
        );
        assert!(
            received < u64::from(rounds * batch) / 4,
            "the guest received {received} frames for {rounds} runs of {batch}"
        );
    } else {
        eprintln!("this kernel has no USO on a TAP: the guest cut its runs itself");
    }
    let st = ctl_json(&ops, &["status"]);
    assert_eq!(st["drops"]["malformed"].as_u64().unwrap_or(0), 0, "{st}");
    assert_eq!(st["drops"]["bad_checksum"].as_u64().unwrap_or(0), 0, "{st}");
}

#[test]
fn with_offload_off_the_guest_segments_and_checksums_itself() {
    require_root!();
    let (lab, ops) = lab_with_offload("off");
    assert!(
        lab.hubnat_log().contains("no offloads"),
        "{}",
        lab.hubnat_log()
    );
    assert_eq!(feature(&lab, "tcp-segmentation-offload"), "off");
    let (frames, bytes) = upload_and_download(&lab, &ops, 16 * MIB);
    let mean = bytes / frames.max(1);
    assert!(mean <= 1514, "{frames} frames, {bytes} bytes: mean {mean}");
    // A run of datagrams the application sends as one is cut by the guest's own kernel.
    let (sent, received) = udp_runs(&lab, 5, 32);
    assert!(sent >= 5 * 32, "{sent} frames sent");
    assert!(received >= 5 * 32, "{received} frames received");
}
