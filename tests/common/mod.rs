//! The end-to-end harness: network namespaces, hubnat processes and real clients, each cleaned up
//! when dropped (also when a test fails and unwinds).
//!
//! Topology of every test: a guest namespace holding the TAP device hubnat creates there, and a
//! namespace of hubnat's own whose only routes lead to the test's server namespaces. Nothing a
//! test does can reach another address.

#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A unique, short name for this test process (interface names are limited to 15 bytes).
pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    format!("{prefix}{}x{n}", std::process::id() % 100_000)
}

/// Whether the end-to-end tests can run here (root, with `ip`).
pub fn can_run() -> bool {
    let root = std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    let ip = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip"]
        .iter()
        .any(|p| Path::new(p).exists());
    root && ip
}

/// Skips the test (with a message) where namespaces cannot be made; CI runs as root, so there
/// every end-to-end test runs.
#[macro_export]
macro_rules! require_root {
    () => {
        if !common::can_run() {
            if std::env::var_os("CI").is_some() {
                panic!("end-to-end tests need root and iproute2, and CI must run them");
            }
            eprintln!("skipped: needs root and iproute2");
            return;
        }
    };
}

pub fn sh(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    out
}

/// Runs a command and panics with its output when it fails.
pub fn must(cmd: &mut Command) -> String {
    let out = sh(cmd);
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace made by the test, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Netns {
        let name = unique(prefix);
        must(Command::new("ip").args(["netns", "add", &name]));
        // A DHCP client run by `ip netns exec` sees /etc/netns/NAME/resolv.conf as its
        // /etc/resolv.conf: the machine's own file is never touched.
        let etc = PathBuf::from("/etc/netns").join(&name);
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(etc.join("resolv.conf"), "").unwrap();
        let ns = Netns { name };
        ns.exec_ok(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// A command that runs inside the namespace.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(args);
        c
    }

    pub fn exec(&self, args: &[&str]) -> Output {
        sh(&mut self.cmd(args))
    }

    pub fn exec_ok(&self, args: &[&str]) -> String {
        must(&mut self.cmd(args))
    }

    /// Waits (up to 10 s, else panics) until a socket of `proto` ("tcp" or "udp") listens on
    /// `port` in the namespace, on address `ip` if given (bare or in brackets; None: any):
    /// servers that give no sign of being ready (dnsmasq, busybox httpd, iperf3) are ready once
    /// the kernel shows their socket, which a fixed pause on a loaded machine does not promise.
    pub fn wait_listening(&self, proto: &str, ip: Option<&str>, port: u16) {
        let flag = match proto {
            "tcp" => "-Hltn",
            "udp" => "-Hlun",
            _ => panic!("wait_listening: {proto} is neither tcp nor udp"),
        };
        let mut filter = format!("sport = :{port}");
        if let Some(ip) = ip {
            // ss reads an address in brackets whatever its family.
            let ip = ip.trim_start_matches('[').trim_end_matches(']');
            filter.push_str(&format!(" and src [{ip}]"));
        }
        wait_until(Duration::from_secs(10), || {
            let out = self.exec(&["ss", flag, &filter]);
            (out.status.success() && !out.stdout.is_empty()).then_some(())
        })
        .unwrap_or_else(|| panic!("nothing listens on {proto} {filter} in {}", self.name));
    }

    /// The IPv4 addresses (with prefix length) on `dev`.
    pub fn addrs(&self, dev: &str) -> Vec<String> {
        let out = self.exec_ok(&["ip", "-4", "-o", "addr", "show", "dev", dev]);
        out.lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                w.position(|x| x == "inet")?;
                w.next().map(str::to_owned)
            })
            .collect()
    }

    pub fn wait_for_link(&self, dev: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.exec(&["ip", "link", "show", dev]).status.success() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("link {dev} did not appear in {}", self.name);
    }

    /// Waits (up to `within`, else panics) until `dev` no longer exists here.
    pub fn wait_link_gone(&self, dev: &str, within: Duration) {
        wait_until(within, || {
            (!self.exec(&["ip", "link", "show", dev]).status.success()).then_some(())
        })
        .unwrap_or_else(|| panic!("link {dev} still in {} after {within:?}", self.name));
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(PathBuf::from("/etc/netns").join(&self.name));
    }
}

/// A temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        let p = std::env::temp_dir().join(unique("hubnat-e2e-"));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn join(&self, s: &str) -> PathBuf {
        self.0.join(s)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A process the test started; ended by its PID (SIGTERM, then SIGKILL) on drop.
pub struct Proc {
    pub child: Child,
    pub name: &'static str,
    log: Option<PathBuf>,
}

impl Proc {
    pub fn spawn(name: &'static str, mut cmd: Command, log: Option<PathBuf>) -> Proc {
        if let Some(log) = &log {
            let f = std::fs::File::create(log).unwrap();
            cmd.stdout(f.try_clone().unwrap()).stderr(f);
        } else {
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc { child, name, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        self.log
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY-free: kill(2) through the `kill` binary keeps unsafe out of the tests.
        let _ = Command::new("kill")
            .args([format!("-{sig}"), self.pid().to_string()])
            .stderr(Stdio::null())
            .status();
    }

    /// Stops the process with SIGTERM and waits for it (SIGKILL after `grace`).
    pub fn stop(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        if let Ok(Some(st)) = self.child.try_wait() {
            return Some(st);
        }
        self.signal(15);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        self.child.wait().ok()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(3));
    }
}

/// Extra `hubnat run` arguments for every test, from HUBNAT_E2E_ARGS (split on whitespace),
/// e.g. `--workers 2 --socket-backend mio`: CI runs the suites once per runtime variant.
pub fn extra_args() -> Vec<String> {
    std::env::var("HUBNAT_E2E_ARGS")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// `base` with `over` applied: a flag in `over` replaces the same flag (and its value) in `base`.
pub fn merge_args(base: &[String], over: &[&str]) -> Vec<String> {
    let flags: Vec<&str> = over
        .iter()
        .copied()
        .filter(|a| a.starts_with("--"))
        .collect();
    let mut out = Vec::new();
    let mut skip_value = false;
    for a in base {
        if skip_value && !a.starts_with("--") {
            skip_value = false;
            continue;
        }
        skip_value = false;
        if flags.contains(&a.as_str()) {
            skip_value = true;
            continue;
        }
        out.push(a.clone());
    }
    out.extend(over.iter().map(|s| s.to_string()));
    out
}

pub fn testsrv_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_hubnat-testsrv"))
}

pub fn hubnat_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_hubnat"))
}

/// A guest namespace with hubnat serving it from its own namespace.
// Fields drop in order: hubnat stops before its namespaces and files go.
pub struct Lab {
    pub hubnat: Option<Proc>,
    pub dir: TempDir,
    pub guest: Netns,
    pub nat: Netns,
    /// The test's server host, linked to hubnat's namespace by a veth pair (the only route out
    /// of hubnat's namespace).
    pub server: Option<Netns>,
    pub tap: String,
}

/// hubnat's namespace's address on the link to the server namespace, and the server's.
pub const NAT_SIDE_IP: &str = "10.77.0.1";
pub const SERVER_IP: &str = "10.77.0.2";
/// A static guest address (for tests that do not exercise DHCP).
pub const GUEST_IP: &str = "192.168.30.50";
/// The MACs of `Lab::two_guests`.
pub const GUEST_A_MAC: &str = "02:00:00:00:0a:01";
pub const GUEST_B_MAC: &str = "02:00:00:00:0b:01";

impl Lab {
    /// Starts hubnat with `config` (TOML text) on a TAP `tap0` made in a new guest namespace.
    pub fn start(config: &str) -> Lab {
        let dir = TempDir::new();
        let guest = Netns::new("hg");
        let nat = Netns::new("hn");
        let mut lab = Lab {
            dir,
            guest,
            nat,
            server: None,
            hubnat: None,
            tap: "tap0".into(),
        };
        lab.start_hubnat(config);
        lab
    }

    /// Like `start`, with a server namespace behind hubnat's (10.77.0.2) and the guest given a
    /// static address with hubnat as its default gateway.
    pub fn start_with_server(config: &str) -> Lab {
        Lab::start_with_server_args(config, &[])
    }

    /// The lab's namespaces (guest, hubnat's, and a server behind hubnat's, 10.77.0.2), with
    /// hubnat not started: a test that runs hubnat its own way (`start_hubnat_cmd`).
    pub fn bare_with_server() -> Lab {
        let dir = TempDir::new();
        let guest = Netns::new("hg");
        let nat = Netns::new("hn");
        let server = Netns::new("hs");
        let (a, b) = (unique("va"), unique("vb"));
        must(Command::new("ip").args([
            "link",
            "add",
            &a,
            "netns",
            &nat.name,
            "type",
            "veth",
            "peer",
            "name",
            &b,
            "netns",
            &server.name,
        ]));
        nat.exec_ok(&["ip", "addr", "add", &format!("{NAT_SIDE_IP}/24"), "dev", &a]);
        nat.exec_ok(&["ip", "link", "set", &a, "up"]);
        server.exec_ok(&["ip", "addr", "add", &format!("{SERVER_IP}/24"), "dev", &b]);
        server.exec_ok(&["ip", "link", "set", &b, "up"]);
        Lab {
            dir,
            guest,
            nat,
            server: Some(server),
            hubnat: None,
            tap: "tap0".into(),
        }
    }

    /// Gives the guest its static address on the TAP and its default route via the virtual host.
    pub fn address_guest(&self) {
        self.guest.exec_ok(&[
            "ip",
            "addr",
            "add",
            &format!("{GUEST_IP}/24"),
            "dev",
            &self.tap,
        ]);
        self.guest
            .exec_ok(&["ip", "route", "add", "default", "via", "192.168.30.1"]);
    }

    /// `start_with_server` with extra `hubnat run` arguments (they take the place of the same
    /// flags in HUBNAT_E2E_ARGS).
    pub fn start_with_server_args(config: &str, args: &[&str]) -> Lab {
        let mut lab = Lab::bare_with_server();
        lab.start_hubnat_args(config, args);
        lab.address_guest();
        lab
    }

    pub fn server(&self) -> &Netns {
        self.server.as_ref().expect("a lab with a server namespace")
    }

    /// Starts `hubnat-testsrv ARGS` in the server namespace and waits until it listens.
    pub fn serve(&self, args: &[&str]) -> Proc {
        let bin = testsrv_bin();
        let mut all = vec![bin.to_str().unwrap()];
        all.extend_from_slice(args);
        let log = self.dir.join(&unique("srv-"));
        let p = Proc::spawn("hubnat-testsrv", self.server().cmd(&all), Some(log));
        wait_until(Duration::from_secs(5), || {
            p.log().contains("listening").then_some(())
        })
        .expect("test server did not start");
        p
    }

    /// Serves `page` as /index.html with busybox httpd on port 8080 of `ns`, bound to `addr`
    /// (`None`: every address), and waits a moment for it to listen.
    pub fn httpd(&self, ns: &Netns, addr: Option<&str>, page: &str) -> Proc {
        let www = self.dir.join(&unique("www-"));
        std::fs::create_dir_all(&www).unwrap();
        std::fs::write(www.join("index.html"), page).unwrap();
        let listen = addr.unwrap_or("8080");
        let p = Proc::spawn(
            "busybox httpd",
            ns.cmd(&[
                "busybox",
                "httpd",
                "-f",
                "-p",
                listen,
                "-h",
                www.to_str().unwrap(),
            ]),
            None,
        );
        let (ip, port) = match listen.rsplit_once(':') {
            Some((ip, port)) => (Some(ip), port),
            None => (None, listen),
        };
        ns.wait_listening("tcp", ip, port.parse().unwrap());
        p
    }

    /// Runs `hubnat-testsrv ARGS` in the guest namespace (a client) and returns its output.
    pub fn client(&self, args: &[&str]) -> Output {
        let bin = testsrv_bin();
        let mut all = vec![bin.to_str().unwrap()];
        all.extend_from_slice(args);
        self.guest.exec(&all)
    }

    pub fn start_hubnat(&mut self, config: &str) {
        self.start_hubnat_args(config, &[]);
    }

    /// Ends hubnat with SIGKILL (nothing saved at exit) and waits until its TAP is gone: a
    /// killed process's io_uring may hold the device open a moment after it has exited, and a
    /// hubnat started meanwhile would find the old device still there.
    pub fn kill_hubnat(&mut self) {
        let p = self.hubnat.take().expect("hubnat runs");
        p.signal(9);
        drop(p);
        self.guest
            .wait_link_gone(&self.tap, Duration::from_secs(10));
    }

    pub fn start_hubnat_args(&mut self, config: &str, args: &[&str]) {
        self.start_hubnat_wrapped(config, args, &[]);
    }

    /// `start_hubnat_args` with hubnat run under `wrapper` (e.g. `prlimit --nofile=1024:1024`).
    pub fn start_hubnat_wrapped(&mut self, config: &str, args: &[&str], wrapper: &[&str]) {
        let cfg = self.dir.join("hubnat.toml");
        std::fs::write(&cfg, config).unwrap();
        let bin = hubnat_bin();
        let mut argv = wrapper.to_vec();
        argv.push(bin.to_str().unwrap());
        let mut cmd = self.nat.cmd(&argv);
        cmd.args([
            "run",
            "--tap",
            &self.tap,
            "--netns",
            &self.guest.path(),
            "--config",
        ])
        .arg(&cfg)
        .arg("--state-dir")
        .arg(self.dir.join("state"))
        .args(["--log", "debug"])
        .args(merge_args(&extra_args(), args));
        let p = Proc::spawn("hubnat", cmd, Some(self.dir.join("hubnat.log")));
        self.hubnat = Some(p);
        self.guest.wait_for_link(&self.tap, Duration::from_secs(10));
    }

    /// Starts hubnat in its namespace with `args` as they are after `hubnat run` (no TAP of
    /// the lab's: the test names every port), the lab's state directory, `config` and debug
    /// logs, plus HUBNAT_E2E_ARGS.
    pub fn start_hubnat_cmd(&mut self, config: &str, args: &[&str]) {
        self.start_hubnat_cmd_with(config, args, Stdio::null());
    }

    /// `start_hubnat_cmd` with `stdin` as hubnat's standard input (a descriptor handed to it,
    /// as a launcher would: `--fd 0`).
    pub fn start_hubnat_cmd_with(&mut self, config: &str, args: &[&str], stdin: Stdio) {
        let cfg = self.dir.join("hubnat.toml");
        std::fs::write(&cfg, config).unwrap();
        let bin = hubnat_bin();
        let mut cmd = self.nat.cmd(&[bin.to_str().unwrap(), "run", "--config"]);
        cmd.arg(&cfg)
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .args(["--log", "debug"])
            .args(merge_args(&extra_args(), args))
            .stdin(stdin);
        let p = Proc::spawn("hubnat", cmd, Some(self.dir.join("hubnat.log")));
        self.hubnat = Some(p);
    }

    /// Two guests on one segment: a bridge in the guest namespace with hubnat's TAP on it, and
    /// two namespaces each linked to the bridge by a veth pair (their end named `eth0`, with
    /// MACs 02:00:00:00:0a:01 and 02:00:00:00:0b:01). Neither has an address yet.
    pub fn two_guests(&self) -> (Netns, Netns) {
        let g = &self.guest;
        g.exec_ok(&["ip", "link", "add", "br0", "type", "bridge"]);
        g.exec_ok(&["ip", "link", "set", &self.tap, "master", "br0"]);
        g.exec_ok(&["ip", "link", "set", &self.tap, "up"]);
        g.exec_ok(&["ip", "link", "set", "br0", "up"]);
        self.two_guests_on_bridge("br0")
    }

    /// Two guest namespaces on `bridge` (a bridge in the lab's guest namespace), as
    /// `two_guests` makes them.
    pub fn two_guests_on_bridge(&self, bridge: &str) -> (Netns, Netns) {
        let g = &self.guest;
        let make = |prefix: &str, mac: &str| {
            let ns = Netns::new(prefix);
            let near = unique("vg");
            g.exec_ok(&[
                "ip", "link", "add", &near, "type", "veth", "peer", "name", "eth0", "netns",
                &ns.name,
            ]);
            g.exec_ok(&["ip", "link", "set", &near, "master", bridge]);
            g.exec_ok(&["ip", "link", "set", &near, "up"]);
            ns.exec_ok(&["ip", "link", "set", "eth0", "address", mac]);
            ns.exec_ok(&["ip", "link", "set", "eth0", "up"]);
            ns
        };
        (make("ga", GUEST_A_MAC), make("gb", GUEST_B_MAC))
    }

    pub fn hubnat_log(&self) -> String {
        self.hubnat.as_ref().map(Proc::log).unwrap_or_default()
    }

    /// Writes a DHCP client hook script (`@DIR@` in it stands for the test's directory) that records what the client received and configures
    /// the interface itself, so no client ever runs the system's own hooks (which would rewrite
    /// /etc/resolv.conf).
    pub fn write_script(&self, name: &str, body: &str) -> PathBuf {
        let p = self.dir.join(name);
        let body = body.replace("@DIR@", self.dir.0.to_str().unwrap());
        std::fs::write(&p, body).unwrap();
        must(Command::new("chmod").arg("755").arg(&p));
        p
    }
}

/// What a DHCP client received, as key=value lines its hook script wrote.
#[derive(Debug, Default, Clone)]
pub struct Lease {
    pub vars: std::collections::BTreeMap<String, String>,
}

impl Lease {
    pub fn parse(text: &str) -> Lease {
        let mut vars = std::collections::BTreeMap::new();
        for line in text.lines() {
            if let Some((k, v)) = line.split_once('=') {
                vars.insert(k.trim().to_owned(), v.trim().trim_matches('\'').to_owned());
            }
        }
        Lease { vars }
    }

    pub fn get(&self, k: &str) -> Option<&str> {
        self.vars
            .get(k)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }
}

/// Reads a whole file, or an empty string.
pub fn read(p: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open(p) {
        let _ = f.read_to_string(&mut s);
    }
    s
}

/// Polls `f` until it returns Some or `within` passes.
pub fn wait_until<T>(within: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `hubnat --control DIR/ctl.sock ARGS...` (the socket a test's `[control]` table names); its
/// output, or a panic with it.
pub fn ctl(dir: &Path, args: &[&str]) -> String {
    must(
        Command::new(hubnat_bin())
            .arg("--control")
            .arg(dir.join("ctl.sock"))
            .args(args),
    )
}

/// The first address of each hop `traceroute -n` printed (`*` for a hop nothing answered).
pub fn traceroute_hops(output: &str) -> Vec<String> {
    output
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            w.next()?.parse::<u32>().ok()?;
            Some(w.next()?.to_owned())
        })
        .collect()
}

/// `ctl` with `--json`, parsed.
pub fn ctl_json(dir: &Path, args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.push("--json");
    let out = ctl(dir, &a);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

impl Lab {
    /// dnsmasq as a DNS server only (no DHCP, no hosts file, no upstream of its own) in `ns`,
    /// listening on `addr` port 53 and answering `records` (dnsmasq's `--host-record` values,
    /// `NAME,ADDR`): the resolver a test names as hubnat's `[dns] upstream`, so nothing ever
    /// reaches the machine's own.
    pub fn dnsmasq(&self, ns: &Netns, addr: &str, records: &[&str]) -> Proc {
        let mut cmd = ns.cmd(&[
            "dnsmasq",
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
        ]);
        cmd.args(["--conf-file=/dev/null", "--bind-interfaces", "--port=53"])
            .arg(format!("--listen-address={addr}"))
            .arg(format!(
                "--pid-file={}",
                self.dir.join(&unique("dnsmasq-pid-")).display()
            ))
            .args(records.iter().map(|r| format!("--host-record={r}")))
            .arg("--user=root");
        let log = self.dir.join(&unique("dnsmasq-"));
        let p = Proc::spawn("dnsmasq", cmd, Some(log));
        ns.wait_listening("udp", Some(addr), 53);
        p
    }
}

/// A busybox udhcpc hook that applies the lease's address and default route to the interface
/// and nothing else (never a resolv.conf).
pub const UDHCPC_CONFIGURE: &str = r#"#!/bin/sh
case "$1" in
  deconfig) ip link set "$interface" up; ip -4 addr flush dev "$interface" ;;
  bound|renew)
    ip -4 addr flush dev "$interface"
    ip addr add "$ip/$mask" dev "$interface"
    [ -n "$router" ] && ip route replace default via "$router" dev "$interface"
    ;;
esac
exit 0
"#;

/// Leases an address for `iface` in `ns` with busybox udhcpc and `UDHCPC_CONFIGURE` (`extra`:
/// more udhcpc arguments, e.g. `-x hostname:vm1`); the address it got. Fails the test, with
/// hubnat's log, when no lease came.
pub fn udhcpc_lease(lab: &Lab, ns: &Netns, iface: &str, extra: &[&str]) -> String {
    udhcpc_lease_explained(lab, ns, iface, extra, String::new)
}

/// `udhcpc_lease`, whose failure also prints what `explain` says (the state of whatever lies
/// between the client and hubnat).
pub fn udhcpc_lease_explained(
    lab: &Lab,
    ns: &Netns,
    iface: &str,
    extra: &[&str],
    explain: impl FnOnce() -> String,
) -> String {
    let script = lab.write_script("udhcpc-configure", UDHCPC_CONFIGURE);
    let mut args = vec!["busybox", "udhcpc", "-i", iface, "-f", "-q", "-n"];
    args.extend_from_slice(&["-t", "6", "-T", "1", "-A", "1"]);
    args.extend_from_slice(extra);
    args.extend_from_slice(&["-s", script.to_str().unwrap()]);
    let out = ns.exec(&args);
    assert!(
        out.status.success(),
        "udhcpc on {iface} in {}: {out:?}\n{}\n{}",
        ns.name,
        lab.hubnat_log(),
        explain()
    );
    let addrs = ns.addrs(iface);
    assert_eq!(addrs.len(), 1, "one address on {iface}: {addrs:?}");
    addrs[0].split('/').next().unwrap().to_owned()
}

/// A directory of the lab's that hubnat's sandbox user may write too (for its control socket,
/// captures, socket ports).
pub fn open_dir(lab: &Lab, name: &str) -> PathBuf {
    let d = lab.dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    must(Command::new("chmod").arg("777").arg(&d));
    d
}

/// A configuration that puts hubnat's control socket in `ops` and turns reverse lookups off.
pub fn control_config(ops: &Path) -> String {
    format!(
        "[control]\nsocket = \"{}\"\nreverse_lookup = false\n",
        ops.join("ctl.sock").display()
    )
}

/// The addresses of `Lab::start_with_router`: hubnat's namespace and the router on one link,
/// the router and the server on another.
pub const ROUTED_NAT_IP: &str = "10.78.0.1";
pub const ROUTER_NEAR_IP: &str = "10.78.0.2";
pub const ROUTER_FAR_IP: &str = "10.79.0.1";
pub const ROUTED_SERVER_IP: &str = "10.79.0.2";

/// A veth pair between namespaces `a` and `b`, `a_ip` and `b_ip` (with their prefix lengths)
/// on its ends, both up.
fn veth_between(a: &Netns, a_ip: &str, b: &Netns, b_ip: &str) {
    let (na, nb) = (unique("va"), unique("vb"));
    must(Command::new("ip").args([
        "link", "add", &na, "netns", &a.name, "type", "veth", "peer", "name", &nb, "netns", &b.name,
    ]));
    a.exec_ok(&["ip", "addr", "add", a_ip, "dev", &na]);
    a.exec_ok(&["ip", "link", "set", &na, "up"]);
    b.exec_ok(&["ip", "addr", "add", b_ip, "dev", &nb]);
    b.exec_ok(&["ip", "link", "set", &nb, "up"]);
}

impl Lab {
    /// A lab whose server is one real router away: guest ─ hubnat's namespace (10.78.0.1) ─
    /// router (10.78.0.2 | 10.79.0.1, forwarding) ─ server (10.79.0.2), each namespace routed
    /// to the others' links only; hubnat started with `config` and `args`, the guest given a
    /// static address with hubnat as its gateway. The router's namespace is returned beside
    /// the lab (the lab's `server` is the server's). ICMP errors are not rate limited in the
    /// router and the server, so that every probe of a test is answered.
    pub fn start_with_router(config: &str, args: &[&str]) -> (Lab, Netns) {
        let dir = TempDir::new();
        let guest = Netns::new("hg");
        let nat = Netns::new("hn");
        let router = Netns::new("hr");
        let server = Netns::new("hs");
        veth_between(
            &nat,
            &format!("{ROUTED_NAT_IP}/24"),
            &router,
            &format!("{ROUTER_NEAR_IP}/24"),
        );
        veth_between(
            &router,
            &format!("{ROUTER_FAR_IP}/24"),
            &server,
            &format!("{ROUTED_SERVER_IP}/24"),
        );
        router.exec_ok(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        nat.exec_ok(&["ip", "route", "add", "10.79.0.0/24", "via", ROUTER_NEAR_IP]);
        server.exec_ok(&["ip", "route", "add", "10.78.0.0/24", "via", ROUTER_FAR_IP]);
        for ns in [&router, &server] {
            ns.exec_ok(&["sysctl", "-qw", "net.ipv4.icmp_ratelimit=0"]);
        }
        let mut lab = Lab {
            dir,
            guest,
            nat,
            server: Some(server),
            hubnat: None,
            tap: "tap0".into(),
        };
        lab.start_hubnat_args(config, args);
        lab.address_guest();
        (lab, router)
    }
}
