//! Rootless, end to end: an ordinary user (uid 65534) runs hubnat for a "rootless container" of
//! its own (a user and network namespace made by `unshare --user --map-root-user --net`), as
//! slirp4netns does. hubnat makes the TAP inside the container's namespaces (`--userns`,
//! `--netns`) while its host sockets stay in the lab's namespace; the container's DHCP client
//! gets an address and fetches a page from the lab's server through hubnat; hubnat runs with no
//! capabilities, in its sandbox.
//!
//! The user's /dev/net/tun must be readable and writable (Debian's udev makes it 0666; some
//! machines keep it 0600): hubnat runs in a mount namespace of the test's own where a device
//! node of mode 0666 covers /dev/net/tun, and the machine's /dev stays as it is.

#[macro_use]
mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::{extra_args, hubnat_bin, merge_args, must, wait_until, Lab, Proc, SERVER_IP};

/// The unprivileged user everything but the lab's plumbing runs as.
const UID: u32 = 65534;
const AS_USER: [&str; 4] = [
    "setpriv",
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
];

/// The hook script for udhcpc in the container: records what it got and configures the
/// interface itself (it never touches /etc/resolv.conf).
const UDHCPC_SCRIPT: &str = r#"#!/bin/sh
{ echo "event=$1"; echo "ip=$ip"; echo "mask=$mask"; echo "router=$router"; } > "@DIR@/udhcpc.$1"
case "$1" in
  deconfig) ip link set "$interface" up; ip -4 addr flush dev "$interface" ;;
  bound|renew)
    ip -4 addr flush dev "$interface"
    ip addr add "$ip/$mask" dev "$interface"
    if [ -n "$router" ]; then ip route replace default via "${router%% *}" dev "$interface"; fi ;;
esac
exit 0
"#;

/// The `Key:` line of /proc/PID/status.
fn status_field(pid: u32, key: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_owned()))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

/// A rootless container: the user's `unshare --user --map-root-user --net sleep`, and a
/// directory of the user's own for what runs in it.
struct Container {
    proc: Proc,
    dir: PathBuf,
}

impl Container {
    fn start(lab: &Lab) -> Container {
        let dir = lab.dir.join("user");
        std::fs::create_dir_all(&dir).unwrap();
        std::os::unix::fs::chown(&dir, Some(UID), Some(UID)).unwrap();
        let mut cmd = Command::new(AS_USER[0]);
        cmd.args(&AS_USER[1..]).args([
            "unshare",
            "--user",
            "--map-root-user",
            "--net",
            "sleep",
            "1000",
        ]);
        let mut proc = Proc::spawn("container", cmd, Some(lab.dir.join("container.log")));
        let pid = proc.pid();
        // setpriv and unshare exec in turn: the process is the container once it runs sleep.
        let ready = wait_until(Duration::from_secs(5), || {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            (comm.trim() == "sleep").then_some(())
        });
        if ready.is_none() || !proc.is_running() {
            panic!(
                "the user could not make a user and network namespace:\n{}",
                proc.log()
            );
        }
        let own = std::fs::read_link("/proc/self/ns/user").unwrap();
        assert_ne!(
            std::fs::read_link(format!("/proc/{pid}/ns/user")).unwrap(),
            own,
            "the container has no user namespace of its own"
        );
        Container { proc, dir }
    }

    fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// A command run by the user inside the container (as its root, with its capabilities
    /// there and none outside).
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(AS_USER[0]);
        c.args(&AS_USER[1..])
            .args(["nsenter", "--target", &self.pid().to_string()])
            .args(["--user", "--net", "--preserve-credentials"])
            .args(args);
        c
    }

    fn exec(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("nsenter runs")
    }

    /// Waits until `dev` exists in the container's network namespace (seen by root from
    /// outside).
    fn wait_for_link(&self, dev: &str, hubnat: &Proc) {
        let net = format!("--net=/proc/{}/ns/net", self.pid());
        let seen = wait_until(Duration::from_secs(10), || {
            let out = Command::new("nsenter")
                .args([net.as_str(), "ip", "link", "show", dev])
                .output()
                .ok()?;
            out.status.success().then_some(())
        });
        if seen.is_none() {
            panic!("{dev} did not appear in the container:\n{}", hubnat.log());
        }
    }
}

/// Starts hubnat as the user in the lab's namespace, for `container`'s namespaces, in a mount
/// namespace where /dev/net/tun is a node of mode 0666 on a tmpfs of the test's.
fn start_hubnat(lab: &Lab, container: &Container) -> Proc {
    let dev = lab.dir.join("dev");
    std::fs::create_dir_all(&dev).unwrap();
    let pid = container.pid().to_string();
    let state = container.dir.join("state");
    let control = container.dir.join("ctl.sock");
    let bin = hubnat_bin();
    // Mounts made after `unshare --mount` stay in its private mount namespace, which ends with
    // hubnat.
    let script = r#"set -e
dev=$1; shift
mount -t tmpfs -o mode=0755,size=64k hubnat-e2e-dev "$dev"
mknod -m 0666 "$dev/tun" c 10 200
mount --bind "$dev/tun" /dev/net/tun
exec "$@""#;
    let mut argv: Vec<String> = ["unshare", "--mount", "--propagation", "private"]
        .iter()
        .chain(&["sh", "-c", script, "sh"])
        .map(|s| s.to_string())
        .collect();
    argv.push(dev.to_str().unwrap().to_owned());
    argv.extend(AS_USER.iter().map(|s| s.to_string()));
    argv.push(bin.to_str().unwrap().to_owned());
    argv.extend(["run", "--tap", "tap0", "--log", "debug"].map(String::from));
    let ours = [
        "--userns",
        pid.as_str(),
        "--netns",
        pid.as_str(),
        "--state-dir",
        state.to_str().unwrap(),
        "--control",
        control.to_str().unwrap(),
    ];
    argv.extend(merge_args(&extra_args(), &ours));
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let p = Proc::spawn(
        "hubnat",
        lab.nat.cmd(&argv),
        Some(lab.dir.join("hubnat.log")),
    );
    container.wait_for_link("tap0", &p);
    p
}

/// The container's DHCP client: binds tap0 and sets the default route; returns its address.
fn udhcpc(container: &Container, hubnat: &Proc) -> String {
    let script = container.dir.join("udhcpc-script");
    let body = UDHCPC_SCRIPT.replace("@DIR@", container.dir.to_str().unwrap());
    std::fs::write(&script, body).unwrap();
    must(Command::new("chmod").arg("755").arg(&script));
    // A process another test forked while the script was open for writing holds it open until
    // it execs, and until then the script cannot run (ETXTBSY): udhcpc would go on without it.
    wait_until(Duration::from_secs(5), || {
        match Command::new(&script).arg("check").status() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => None,
            _ => Some(()),
        }
    })
    .expect("the hook script stays busy");
    let out = container.exec(&[
        "busybox",
        "udhcpc",
        "-i",
        "tap0",
        "-f",
        "-q",
        "-n",
        "-t",
        "4",
        "-T",
        "1",
        "-A",
        "1",
        "-s",
        script.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "udhcpc failed in the container: {out:?}\n{}",
        hubnat.log()
    );
    let lease = common::Lease::parse(&common::read(&container.dir.join("udhcpc.bound")));
    let ip = lease.get("ip").expect("udhcpc bound").to_owned();
    assert_eq!(lease.get("router"), Some("192.168.30.1"));
    ip
}

/// The rootless run end to end; `ping_sockets`: whether the lab lets the user's group open
/// ping sockets (then guests' pings go out for real, else they get dummy replies).
fn rootless_run(ping_sockets: bool) {
    let lab = Lab::bare_with_server();
    if ping_sockets {
        lab.nat.exec_ok(&[
            "sysctl",
            "-qw",
            &format!("net.ipv4.ping_group_range={UID} {UID}"),
        ]);
    }
    let page = "hello from the server namespace, through a rootless hubnat\n";
    let _httpd = lab.httpd(lab.server(), None, page);
    let container = Container::start(&lab);
    let hubnat = start_hubnat(&lab, &container);
    let hpid = hubnat.pid();

    let ip = udhcpc(&container, &hubnat);
    assert!(ip.starts_with("192.168.30."), "address {ip}");
    // The helper that made the device inside the container's namespaces lengthened its queue
    // as hubnat does for a device of its own.
    let link = container.exec(&["ip", "link", "show", "tap0"]);
    let shown = String::from_utf8_lossy(&link.stdout);
    assert!(shown.contains("qlen 2048"), "{shown}");
    // The container's namespace is fresh: lo is its device 1, so 2 is the first device made in
    // it. hubnat makes tap0 once: a device closed and made anew (a fallback after the fact)
    // vanishes for a moment, and a DHCP client started when it appeared fails on it.
    let index = shown.split(':').next().unwrap_or("").trim();
    assert_eq!(
        index,
        "2",
        "tap0 was made more than once:\n{shown}\n{}",
        hubnat.log()
    );
    let url = format!("http://{SERVER_IP}:8080/index.html");
    let got = container.exec(&["curl", "-sS", "--noproxy", "*", "--max-time", "10", &url]);
    assert!(
        got.status.success(),
        "fetch failed: {got:?}\n{}",
        hubnat.log()
    );
    assert_eq!(String::from_utf8_lossy(&got.stdout), page);
    // With ping sockets the server answers for real; without, hubnat answers itself (dummy
    // mode), even for an address no host of the lab has.
    let target = if ping_sockets {
        SERVER_IP
    } else {
        "10.77.0.99"
    };
    let ping = container.exec(&["ping", "-c", "2", "-i", "0.2", "-W", "2", target]);
    assert!(
        ping.status.success(),
        "ping {target}: {ping:?}\n{}",
        hubnat.log()
    );

    // hubnat is the user, with no capability, in its sandbox.
    let uids = status_field(hpid, "Uid:");
    assert!(
        uids.split_whitespace().all(|u| u == "65534"),
        "Uid {uids}\n{}",
        hubnat.log()
    );
    assert_eq!(status_field(hpid, "CapEff:"), "0000000000000000");
    assert_eq!(status_field(hpid, "CapPrm:"), "0000000000000000");
    assert_eq!(status_field(hpid, "CapAmb:"), "0000000000000000");
    assert_eq!(status_field(hpid, "NoNewPrivs:"), "1");
    assert_eq!(status_field(hpid, "Seccomp:"), "2");
    // Its host sockets are the lab's: hubnat never left its network namespace.
    let lab_net = std::fs::metadata(lab.nat.path()).unwrap().ino();
    let its_net = std::fs::read_link(format!("/proc/{hpid}/ns/net")).unwrap();
    assert_eq!(
        its_net,
        Path::new(&format!("net:[{lab_net}]")),
        "hubnat is not in the lab's namespace"
    );
    let log = hubnat.log();
    assert!(log.contains("not root: no user change"), "{log}");
    assert!(log.contains("no capabilities"), "{log}");
    let icmp = if ping_sockets {
        "ICMP sockets available"
    } else {
        "ICMP sockets unavailable"
    };
    assert!(log.contains(icmp), "no `{icmp}` in the log:\n{log}");
}

#[test]
fn an_unprivileged_hubnat_serves_a_rootless_container() {
    require_root!();
    rootless_run(true);
}

#[test]
fn without_ping_sockets_pings_get_dummy_replies() {
    require_root!();
    rootless_run(false);
}

/// A namespace of another user's cannot be joined; hubnat says which and why, and stops.
#[test]
fn another_users_namespace_is_refused_clearly() {
    require_root!();
    let lab = Lab::bare_with_server();
    // Root's container: the user may not even open its namespaces.
    let mut cmd = Command::new("unshare");
    cmd.args(["--user", "--map-root-user", "--net", "sleep", "1000"]);
    let other = Proc::spawn("root's container", cmd, None);
    let pid = other.pid().to_string();
    wait_until(Duration::from_secs(5), || {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == "sleep").then_some(())
    })
    .expect("root's container did not start");
    let dir = lab.dir.join("user");
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(UID), Some(UID)).unwrap();
    let bin = hubnat_bin();
    let mut argv: Vec<&str> = AS_USER.to_vec();
    let state = dir.join("state");
    let control = dir.join("ctl.sock");
    argv.extend([
        bin.to_str().unwrap(),
        "run",
        "--tap",
        "tap0",
        "--userns",
        &pid,
        "--state-dir",
        state.to_str().unwrap(),
        "--control",
        control.to_str().unwrap(),
    ]);
    let mut cmd = lab.nat.cmd(&argv);
    let out = cmd.output().expect("hubnat runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "hubnat started: {err}");
    assert!(
        err.contains(&format!("cannot open the user namespace of PID {pid}")),
        "unclear error: {err}"
    );
}
