//! The multi-worker runtime end to end: many concurrent TCP and UDP flows spread over two
//! worker threads, every one intact; the control socket shows both workers carried flows; a
//! multiqueue TAP works the same, its steering program putting every frame on its flow's
//! worker's queue and placing a client's back-to-back connections on one worker; SIGTERM resets
//! and closes everything and joins the threads.

mod common;

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{ctl_json, Lab, SERVER_IP};

/// Held by the tests that load both cores with flows and by the one that measures where a
/// client's back-to-back connections land, so that the measurement does not share the machine
/// with the loads (the tests of one binary run at once). Behind a loaded worker a client's
/// closing connections pile up past what the placement lets a new one follow to, and the loop
/// moves to the other worker: right for a busy worker, but not what that test measures.
static CORES: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// `CORES`, also after a test that held it failed.
fn cores() -> std::sync::MutexGuard<'static, ()> {
    CORES.lock().unwrap_or_else(|e| e.into_inner())
}

fn config(lab_dir: &std::path::Path) -> String {
    format!(
        "[control]\nsocket = \"{}\"\n",
        lab_dir.join("ctl.sock").display()
    )
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Runs `tcp` TCP connections (`multi`, each echoing 256 KiB) and `udp` UDP flows (each its own
/// source port, 50 datagrams checked) at the same time; panics unless all complete intact.
fn run_flows(lab: &Lab, tcp: u32, udp: u16) {
    let bin = common::testsrv_bin();
    let bin = bin.to_str().unwrap();
    let echo_tcp = format!("{SERVER_IP}:9101");
    let echo_udp = format!("{SERVER_IP}:9102");
    let multi = lab
        .guest
        .cmd(&[
            bin,
            "multi",
            "--connect",
            &echo_tcp,
            "--conns",
            &tcp.to_string(),
            "--bytes",
            "262144",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pings: Vec<_> = (0..udp)
        .map(|i| {
            let port = (41000 + i).to_string();
            lab.guest
                .cmd(&[
                    bin,
                    "udp-ping",
                    "--connect",
                    &echo_udp,
                    "--count",
                    "50",
                    "--size",
                    "700",
                    "--port",
                    &port,
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let out = multi.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "TCP flows failed: {out:?}\n{}",
        tail(&lab.hubnat_log())
    );
    for (i, p) in pings.into_iter().enumerate() {
        let out = p.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "UDP flow {i} failed: {out:?}\n{}",
            tail(&lab.hubnat_log())
        );
    }
}

/// Both workers carried frames and sessions; session ids are unique across them. The TCP
/// flows have closed by now, so only the `udp` UDP flows hold sessions, placed by a flow hash
/// keyed afresh on every run: with `udp` of at least 24, all on one worker happens once in
/// some 8 million runs (with 8 it was once in 128, often enough to fail CI).
fn check_spread(dir: &std::path::Path, udp: usize) {
    assert!(
        udp >= 24,
        "too few UDP flows to expect both workers to hold one"
    );
    let st = ctl_json(dir, &["status"]);
    let workers = st["workers"].as_array().expect("status lists workers");
    assert_eq!(workers.len(), 2, "{st}");
    for w in workers {
        assert!(w["frames_in"].as_u64().unwrap() > 100, "idle worker: {st}");
        assert!(w["sessions"].as_u64().unwrap() > 0, "no sessions: {st}");
    }
    assert_eq!(st["udp_sessions"].as_u64().unwrap() as usize, udp, "{st}");
    let table = ctl_json(dir, &["nat-table"]);
    let rows = table.as_array().unwrap();
    let ids: HashSet<u64> = rows.iter().map(|r| r["id"].as_u64().unwrap()).collect();
    assert_eq!(ids.len(), rows.len(), "session ids repeat across workers");
}

fn stop_cleanly(lab: &mut Lab) {
    let p = lab.hubnat.as_mut().unwrap();
    let st = p.stop(Duration::from_secs(10)).expect("hubnat ended");
    assert!(
        st.success(),
        "exit status {st:?}\n{}",
        tail(&lab.hubnat_log())
    );
    let log = lab.hubnat_log();
    assert!(
        log.contains("2 worker threads joined"),
        "no clean shutdown in the log:\n{}",
        tail(&log)
    );
}

#[test]
fn many_flows_spread_over_two_workers_and_all_complete() {
    require_root!();
    let _cores = cores();
    let dir = common::TempDir::new();
    // One TAP queue: the control thread reads every frame and hands each to its flow's worker.
    let mut lab = Lab::start_with_server_args(
        &config(&dir.0),
        &["--workers", "2", "--tap-queues", "single"],
    );
    let _tcp = lab.serve(&["tcp-echo", "--listen", "0.0.0.0:9101"]);
    let _udp = lab.serve(&["udp-echo", "--listen", "0.0.0.0:9102"]);
    run_flows(&lab, 64, 64);
    check_spread(&dir.0, 64);
    assert!(
        lab.hubnat_log()
            .contains("2 worker threads and a control thread"),
        "{}",
        tail(&lab.hubnat_log())
    );
    stop_cleanly(&mut lab);
    // The device goes with the process, at once (nothing of hubnat's keeps it open).
    let shown = lab.guest.exec(&["ip", "link", "show", &lab.tap]);
    assert!(!shown.status.success(), "{} outlived hubnat", lab.tap);
}

#[test]
fn a_multiqueue_tap_gives_each_worker_a_queue() {
    require_root!();
    let _cores = cores();
    let dir = common::TempDir::new();
    let mut lab = Lab::start_with_server_args(
        &config(&dir.0),
        &["--workers", "2", "--tap-queues", "multi"],
    );
    let _tcp = lab.serve(&["tcp-echo", "--listen", "0.0.0.0:9101"]);
    let _udp = lab.serve(&["udp-echo", "--listen", "0.0.0.0:9102"]);
    run_flows(&lab, 32, 24);
    check_spread(&dir.0, 24);
    let steering = steering_line(&lab);
    let log = lab.hubnat_log();
    assert!(log.contains("(2 queues)"));
    // Where the kernel takes hubnat's steering program, the TAP steers every frame of a flow
    // to its worker's queue: no worker read a frame of the other's flows, the first SYNs
    // included. Where it refuses one (no CAP_BPF in a container, a seccomp filter, a kernel
    // without eBPF), the log must say why, and the flows above completed by hand-overs.
    if steering.contains("each flow's frames steered to its worker (eBPF") {
        // New TCP flows are placed by the table the program shares with the router (an
        // eBPF array, made where the program could be loaded), and still no frame of a placed
        // flow was read by the other worker.
        assert!(steering.contains("new TCP flows placed"), "{}", tail(&log));
        let st = ctl_json(&dir.0, &["status"]);
        assert_eq!(st["frames_handed_over"], 0, "{st}");
    } else {
        assert!(
            steering.contains("TAP queues: steered by the kernel's flow table"),
            "neither steered nor a reason:\n{}",
            tail(&log)
        );
        eprintln!("this kernel refused the steering program: {steering}");
    }
    stop_cleanly(&mut lab);
}

/// The line in which hubnat says how its TAP's queues are steered. It is written once the
/// queues are open, which can be well after the device came up on a busy machine: a test that
/// looked at once could take a kernel that steers for one that refused.
fn steering_line(lab: &Lab) -> String {
    common::wait_until(Duration::from_secs(10), || {
        let log = lab.hubnat_log();
        let line = log.lines().find(|l| l.contains("TAP queues:"))?;
        Some(line.to_owned())
    })
    .unwrap_or_else(|| {
        panic!(
            "hubnat never said how its TAP queues are steered:\n{}",
            tail(&lab.hubnat_log())
        )
    })
}

/// Frames each worker read from its TAP queue, by the control socket's `status`.
fn frames_in_by_worker(dir: &std::path::Path) -> Vec<u64> {
    let st = ctl_json(dir, &["status"]);
    st["workers"]
        .as_array()
        .expect("status lists workers")
        .iter()
        .map(|w| w["frames_in"].as_u64().unwrap())
        .collect()
}

/// A guest that connects, exchanges a byte and closes, over and over (the kernel's own TCP
/// client), has each new connection placed on the worker its last one ended on: one worker
/// reads nearly all of its frames, where the flow hash alone would split them about evenly.
///
/// Measured in short rounds, each its own loop: a client that waits for a CPU for longer than
/// the placement follows an end (a busy CI machine) starts over on the preferred worker, and
/// one such move in a single long loop could leave any split of its frames. So half the rounds
/// must stay on one worker, not every round: by the hash alone no round of forty connections or
/// more would (nine tenths of a round's frames on one worker would take some 36 of 40
/// connections there, a chance below one in a million).
#[test]
fn a_client_that_reconnects_in_a_loop_stays_on_one_worker() {
    require_root!();
    let _cores = cores();
    let dir = common::TempDir::new();
    let mut lab = Lab::start_with_server_args(
        &config(&dir.0),
        &["--workers", "2", "--tap-queues", "multi"],
    );
    if !steering_line(&lab).contains("new TCP flows placed") {
        eprintln!("skipped: no steering program with a placement table on this kernel");
        stop_cleanly(&mut lab);
        return;
    }
    let _tcp = lab.serve(&["tcp-echo", "--listen", "0.0.0.0:9101"]);
    let load = env!("CARGO_BIN_EXE_hubnat-load");
    let to = format!("{SERVER_IP}:9101");
    const ROUNDS: usize = 10;
    let mut kept = 0;
    let mut rounds = Vec::new();
    for _ in 0..ROUNDS {
        let before = frames_in_by_worker(&dir.0);
        let out = lab
            .guest
            .exec(&[load, "crr", "--connect", &to, "--duration", "0.5", "--json"]);
        assert!(
            out.status.success(),
            "crr: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            tail(&lab.hubnat_log())
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let conns = v["connections"].as_u64().unwrap();
        assert!(conns >= 40, "{v}");
        let after = frames_in_by_worker(&dir.0);
        let read: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        let all: u64 = read.iter().sum();
        assert!(all >= conns * 4, "{read:?} frames for {conns} connections");
        let most = *read.iter().max().unwrap();
        if most * 10 >= all * 9 {
            kept += 1;
        }
        rounds.push(format!(
            "{read:?} ({conns} connections, p99 {} us)",
            v["p99_us"]
        ));
    }
    let st = ctl_json(&dir.0, &["status"]);
    assert!(
        kept * 2 >= ROUNDS,
        "frames per worker in each round: {rounds:#?}: the connections were not kept on one \
         worker in {kept} of {ROUNDS} rounds\n{st}\n{}",
        tail(&lab.hubnat_log())
    );
    assert_eq!(st["frames_handed_over"], 0, "{st}");
    stop_cleanly(&mut lab);
}

#[test]
fn an_existing_single_queue_tap_falls_back_to_one_queue() {
    require_root!();
    let _cores = cores();
    let dir = common::TempDir::new();
    let args = ["--workers", "2", "--tap-queues", "auto"];
    let mut lab = Lab::start_with_server_args(&config(&dir.0), &args);
    // hubnat's own device goes with it; a persistent single-queue one takes its name.
    stop_cleanly(&mut lab);
    let tap = lab.tap.clone();
    lab.guest
        .exec_ok(&["ip", "tuntap", "add", "mode", "tap", "name", &tap]);
    lab.start_hubnat_args(&config(&dir.0), &args);
    // The device was there before hubnat: wait until hubnat has it up and attached (a route
    // via the gateway is refused on a link that is down).
    common::wait_until(Duration::from_secs(10), || {
        let link = lab.guest.exec_ok(&["ip", "link", "show", &tap]);
        link.contains("LOWER_UP").then_some(())
    })
    .unwrap_or_else(|| panic!("{tap} never came up:\n{}", tail(&lab.hubnat_log())));
    let ip = format!("{}/24", common::GUEST_IP);
    lab.guest.exec_ok(&["ip", "addr", "add", &ip, "dev", &tap]);
    lab.guest
        .exec_ok(&["ip", "route", "add", "default", "via", "192.168.30.1"]);
    let _tcp = lab.serve(&["tcp-echo", "--listen", "0.0.0.0:9101"]);
    let _udp = lab.serve(&["udp-echo", "--listen", "0.0.0.0:9102"]);
    run_flows(&lab, 16, 24);
    check_spread(&dir.0, 24);
    let log = lab.hubnat_log();
    assert!(
        log.contains("exists as a single-queue device") && !log.contains("(2 queues)"),
        "{}",
        tail(&log)
    );
    stop_cleanly(&mut lab);
}

#[test]
fn bad_runtime_flags_are_refused_before_anything_is_written() {
    let dir = common::TempDir::new();
    let state = dir.0.join("state");
    for (args, says) in [
        (&["--workers", "0"][..], "--workers 0: choose 1 to 256"),
        (
            &["--workers", "1", "--tap-queues", "multi"][..],
            "needs --workers 2 or more",
        ),
        (
            &["--workers", "1", "--multiqueue"][..],
            "needs --workers 2 or more",
        ),
        (
            &["--tap-queues", "some"][..],
            "possible values: auto, multi, single",
        ),
        (
            &["--no-sandbox", "--user", "nobody"][..],
            "'--no-sandbox' cannot be used with '--user <NAME>'",
        ),
        (
            &["--no-sandbox", "--sandbox-check"][..],
            "'--no-sandbox' cannot be used with '--sandbox-check'",
        ),
        (
            &["--netns", "/nonexistent/net"][..],
            "--netns: no namespace at /nonexistent/net",
        ),
        (
            &["--netns", "hubnat-no-such-namespace"][..],
            "--netns: no namespace at /run/netns/hubnat-no-such-namespace",
        ),
        (
            &["--userns", "/nonexistent/user"][..],
            "--userns: no namespace at /nonexistent/user",
        ),
        (
            &["--config", "/nonexistent/hubnat.toml"][..],
            "cannot read configuration file /nonexistent/hubnat.toml: No such file or directory",
        ),
    ] {
        let out = Command::new(common::hubnat_bin())
            .args(["run", "--tap", "hnbad0", "--state-dir"])
            .arg(&state)
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(err.contains(says), "{args:?}: {err}");
        // The reason once: an error that also names it as its source is printed twice.
        assert!(err.matches("(os error").count() <= 1, "{args:?}: {err}");
        assert!(!state.exists(), "{args:?} wrote the state directory");
    }
}

#[test]
fn a_port_that_cannot_be_opened_leaves_no_state() {
    let dir = common::TempDir::new();
    let state = dir.0.join("state");
    let missing = dir.0.join("no-such-dir").join("sock");
    let stream = format!("stream:{}", missing.display());
    for port in ["fd:99", "packet:hnbad-noif", stream.as_str()] {
        let out = Command::new(common::hubnat_bin())
            .args(["run", "--port", port, "--state-dir"])
            .arg(&state)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{port} was accepted");
        assert!(err.contains(&format!("port {port}: ")), "{port}: {err}");
        assert!(!state.exists(), "{port} wrote the state directory");
    }
}
