//! End-to-end: TCP through hubnat against the guest's real Linux TCP stack (curl, iperf3, the
//! test's own put/get/echo clients and servers), with and without loss on the guest's link.

mod common;

use std::time::{Duration, Instant};

use common::{Lab, Proc, SERVER_IP};

const MIB: u64 = 1024 * 1024;

fn at(port: u16) -> String {
    format!("{SERVER_IP}:{port}")
}

#[test]
fn curl_fetches_a_page() {
    require_root!();
    let lab = Lab::start_with_server("");
    let _httpd = lab.httpd(lab.server(), None, "<h1>hello through hubnat</h1>\n");
    let page = lab.guest.exec_ok(&[
        "curl",
        "-sS",
        "--max-time",
        "10",
        "http://10.77.0.2:8080/index.html",
    ]);
    assert_eq!(
        page,
        "<h1>hello through hubnat</h1>\n",
        "{}",
        lab.hubnat_log()
    );
    let log = lab.hubnat_log();
    assert!(log.contains("SecureNAT: The TCP session"), "{log}");
    assert!(
        log.contains("(10.77.0.2)\", Port 8080 was successful."),
        "no connection log line:\n{log}"
    );
}

fn transfer_both_ways(lab: &Lab, bytes: u64) {
    let _sink = lab.serve(&["tcp-sink", "--listen", "0.0.0.0:9001"]);
    let b = bytes.to_string();
    let _source = lab.serve(&[
        "tcp-source",
        "--listen",
        "0.0.0.0:9002",
        "--bytes",
        &b,
        "--seed",
        "7",
    ]);
    let up = lab.client(&["put", "--connect", &at(9001), "--bytes", &b, "--seed", "3"]);
    assert!(
        up.status.success(),
        "upload: {up:?}\n{}",
        tail(&lab.hubnat_log())
    );
    let down = lab.client(&["get", "--connect", &at(9002), "--bytes", &b, "--seed", "7"]);
    assert!(
        down.status.success(),
        "download: {down:?}\n{}",
        tail(&lab.hubnat_log())
    );
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

#[test]
fn hundred_mib_up_and_down_arrive_intact() {
    require_root!();
    let lab = Lab::start_with_server("");
    transfer_both_ways(&lab, 100 * MIB);
}

/// Impairs the guest's link both ways. This kernel has no netem, so: nftables on the TAP drops
/// 2% of TCP frames each way and duplicates 1% of the guest's; HTB with a slow class that
/// nftables sends a random 10% of the guest's frames into reorders them.
fn impair_guest_link(lab: &Lab) {
    let tap = lab.tap.as_str();
    let rx = format!("{{ type filter hook ingress device \"{tap}\" priority 0; }}");
    let tx = format!("{{ type filter hook egress device \"{tap}\" priority 0; }}");
    let dup = format!("\"{tap}\"");
    let tcp = [
        "meta", "l4proto", "tcp", "numgen", "random", "mod", "100", "<",
    ];
    let rule = |chain: &str, tail: &[&str]| {
        let mut v = vec!["nft", "add", "rule", "netdev", "impair", chain];
        v.extend_from_slice(&tcp);
        v.extend_from_slice(tail);
        v.iter().map(|s| s.to_string()).collect::<Vec<String>>()
    };
    let cmds: Vec<Vec<String>> = vec![
        ["nft", "add", "table", "netdev", "impair"]
            .map(String::from)
            .to_vec(),
        ["nft", "add", "chain", "netdev", "impair", "rx", &rx]
            .map(String::from)
            .to_vec(),
        ["nft", "add", "chain", "netdev", "impair", "tx", &tx]
            .map(String::from)
            .to_vec(),
        rule("rx", &["2", "drop"]),
        rule("tx", &["2", "drop"]),
        rule("tx", &["1", "dup", "to", &dup]),
        rule("tx", &["10", "meta", "priority", "set", "1:20"]),
        [
            "tc", "qdisc", "add", "dev", tap, "root", "handle", "1:", "htb", "default", "10",
        ]
        .map(String::from)
        .to_vec(),
        [
            "tc", "class", "add", "dev", tap, "parent", "1:", "classid", "1:10", "htb", "rate",
            "20gbit",
        ]
        .map(String::from)
        .to_vec(),
        [
            "tc", "class", "add", "dev", tap, "parent", "1:", "classid", "1:20", "htb", "rate",
            "20mbit",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for c in &cmds {
        let args: Vec<&str> = c.iter().map(String::as_str).collect();
        lab.guest.exec_ok(&args);
    }
}

#[test]
fn transfers_survive_loss_duplication_and_reordering() {
    require_root!();
    let lab = Lab::start_with_server("");
    impair_guest_link(&lab);
    transfer_both_ways(&lab, 16 * MIB);
}

#[test]
fn two_hundred_concurrent_connections_complete() {
    require_root!();
    let lab = Lab::start_with_server("");
    let _echo = lab.serve(&["tcp-echo", "--listen", "0.0.0.0:9003"]);
    let out = lab.client(&[
        "multi",
        "--connect",
        &at(9003),
        "--conns",
        "200",
        "--bytes",
        "65536",
    ]);
    assert!(out.status.success(), "{out:?}\n{}", tail(&lab.hubnat_log()));
}

#[test]
fn a_closed_port_is_refused_at_once() {
    require_root!();
    let lab = Lab::start_with_server("");
    let t = Instant::now();
    let out = lab.client(&["put", "--connect", &at(9), "--bytes", "1"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Connection refused"), "{err}");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "refusal took {:?}",
        t.elapsed()
    );
    // curl says the same in its own words (exit code 7: could not connect).
    let out = lab
        .guest
        .exec(&["curl", "-sS", "--max-time", "10", "http://10.77.0.2:9/"]);
    assert_eq!(out.status.code(), Some(7), "{out:?}");
}

#[test]
fn iperf3_completes_both_ways() {
    require_root!();
    let lab = Lab::start_with_server("");
    let _srv = Proc::spawn(
        "iperf3",
        lab.server().cmd(&["iperf3", "-s", "-p", "5201"]),
        None,
    );
    lab.server().wait_listening("tcp", None, 5201);
    for reverse in [false, true] {
        let mut args = vec!["iperf3", "-c", SERVER_IP, "-p", "5201", "-t", "3", "-J"];
        if reverse {
            args.push("-R");
        }
        // One retry: in CI, under the 2-worker variant with the other TCP tests running at the
        // same time, one run in several dozen printed no result (cause still open, see the
        // issue notes); the first attempt's output is kept in the test's log.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let out = lab.guest.exec(&args);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            if out.status.success() && text.contains("bits_per_second") {
                break;
            }
            let report = format!(
                "iperf3 (reverse {reverse}, attempt {attempt}) exit {:?}:\n{text}\nstderr: {}\n{}",
                out.status.code(),
                String::from_utf8_lossy(&out.stderr),
                tail(&lab.hubnat_log())
            );
            assert!(attempt < 2, "{report}");
            eprintln!("{report}");
        }
    }
}

#[test]
fn window_scale_and_sack_are_negotiated() {
    require_root!();
    let lab = Lab::start_with_server("");
    let _sink = lab.serve(&["tcp-sink", "--listen", "0.0.0.0:9004"]);
    let pcap = lab.dir.join("guest.pcap");
    let mut dump = Proc::spawn(
        "tcpdump",
        lab.guest.cmd(&[
            "tcpdump",
            // Without immediate mode this libpcap hands packets over in blocks, and a stop
            // before the block fills loses them.
            "--immediate-mode",
            "-Z",
            "root",
            "-i",
            &lab.tap,
            "-U",
            "-w",
            pcap.to_str().unwrap(),
            "tcp",
        ]),
        Some(lab.dir.join("tcpdump.log")),
    );
    // The capture is open once tcpdump says so; a fixed pause lost the whole exchange on a
    // loaded CI machine.
    common::wait_until(Duration::from_secs(10), || {
        dump.log().contains("listening on").then_some(())
    })
    .unwrap_or_else(|| panic!("tcpdump did not start: {}", dump.log()));
    let up = lab.client(&["put", "--connect", &at(9004), "--bytes", "100000"]);
    assert!(up.status.success());
    std::thread::sleep(Duration::from_millis(300));
    dump.stop(Duration::from_secs(2));
    let text = lab.guest.exec_ok(&[
        "tcpdump",
        "-nn",
        "-r",
        pcap.to_str().unwrap(),
        "tcp[tcpflags] & tcp-syn != 0",
    ]);
    let synack = text
        .lines()
        .find(|l| l.contains("10.77.0.2.9004 >") && l.contains("[S.]"))
        .unwrap_or_else(|| panic!("no SYN-ACK in capture:\n{text}"));
    assert!(synack.contains("wscale"), "{synack}");
    assert!(synack.contains("sackOK"), "{synack}");
    assert!(synack.contains("mss 1460"), "{synack}");
}

/// With `--tap-napi auto` (the default), a bulk download moves the TAP's NAPI polls into kernel
/// threads, and the small exchanges after it bring them back into the writes; the data arrives
/// intact either way.
#[test]
fn a_bulk_download_moves_napi_polls_to_threads_and_back() {
    require_root!();
    let ops = common::TempDir::new();
    let cfg = format!(
        "[control]\nsocket = \"{}\"\n",
        ops.join("ctl.sock").display()
    );
    let lab = Lab::start_with_server_args(&cfg, &["--tap-napi", "auto"]);
    // The start-up line comes after the TAP is up (and the state directory written), which is
    // all the lab waits for.
    common::wait_until(Duration::from_secs(10), || {
        lab.hubnat_log()
            .contains("NAPI polls switched by load")
            .then_some(())
    })
    .unwrap_or_else(|| panic!("NAPI not switchable:\n{}", tail(&lab.hubnat_log())));
    let _source = lab.serve(&[
        "tcp-source",
        "--listen",
        "0.0.0.0:9002",
        "--bytes",
        &(100 * MIB).to_string(),
        "--seed",
        "5",
    ]);
    let b = (100 * MIB).to_string();
    let down = lab.client(&["get", "--connect", &at(9002), "--bytes", &b, "--seed", "5"]);
    assert!(down.status.success(), "download: {down:?}");
    let log = lab.hubnat_log();
    let Some(threaded) = log.find("TAP NAPI polls in threads") else {
        panic!("the download did not move the polls:\n{}", tail(&log));
    };
    // Pings 50 ms apart: single frames, a rate far below the bulk threshold.
    lab.guest
        .exec_ok(&["ping", "-c", "8", "-i", "0.05", "-W", "1", SERVER_IP]);
    let back = common::wait_until(Duration::from_secs(2), || {
        lab.hubnat_log()[threaded..]
            .contains("TAP NAPI polls in softirq")
            .then_some(())
    });
    assert!(
        back.is_some(),
        "the polls stayed in threads:\n{}",
        tail(&lab.hubnat_log())
    );
    // The operator sees it too.
    let st = common::ctl_json(&ops.0, &["status"]);
    assert_eq!(st["tap_napi"]["threaded"], false, "{st}");
    assert!(st["tap_napi"]["switches"].as_u64().unwrap() >= 2, "{st}");
}
