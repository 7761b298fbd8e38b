//! hubnat as slirp4netns, end to end. `hubnat slirp4netns` (the front end podman, rootlesskit
//! and buildah find where they look for slirp4netns) runs in the lab's namespace, whose only
//! route leads to the test's server namespace, and serves a guest namespace as slirp4netns
//! does: `--configure` addressing, the ready and exit descriptors, the API socket's forwards.
//! Then Debian's podman runs a container with hubnat as its slirp4netns (a symlink named so,
//! through `network_cmd_path` in a containers.conf of the test's own), with storage in a
//! temporary directory, so the machine's podman state is left as it is.

#[macro_use]
mod common;

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{hubnat_bin, must, sh, unique, wait_until, Lab, Netns, Proc, TempDir, SERVER_IP};

/// The page the server namespace serves (busybox httpd, port 8080).
const SERVER_PAGE: &str = "the server namespace's page";

/// A base configuration for the front end (`HUBNAT_SLIRP4NETNS_CONFIG`): the DNS relay's
/// upstream is the server namespace's, so that no query could reach the machine's resolver.
fn base_config(dir: &Path) -> PathBuf {
    let p = dir.join("slirp4netns-base.toml");
    std::fs::write(&p, format!("[dns]\nupstream = [\"{SERVER_IP}\"]\n")).unwrap();
    p
}

/// One API request (slirp4netns's protocol: one request per connection, the client's side
/// shut after it) and the answer.
fn api(sock: &Path, req: &str) -> String {
    let mut s = UnixStream::connect(sock)
        .unwrap_or_else(|e| panic!("cannot connect to the API socket {}: {e}", sock.display()));
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(req.as_bytes()).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    answer
}

/// curl in `ns`: the page, or None when it cannot be fetched.
fn curl(ns: &Netns, url: &str) -> Option<String> {
    let out = ns.exec(&["curl", "-s", "--max-time", "5", url]);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A ready FIFO opened for reading, non-blocking (the front end's open for writing then does
/// not wait).
fn ready_fifo(path: &Path) -> File {
    must(Command::new("mkfifo").arg(path));
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .unwrap()
}

/// Waits for "1" on the ready FIFO and then its end (the front end closed it).
fn read_ready(ready: &mut File, proc: &mut Proc) {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = [0u8; 16];
    loop {
        match ready.read(&mut buf) {
            // No writer: before the front end opened its end, or after it closed it.
            Ok(0) if got.is_empty() => {}
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("ready FIFO: {e}"),
        }
        assert!(
            Instant::now() < deadline,
            "no readiness in 20 s (read {got:?}):\n{}",
            proc.log()
        );
        assert!(
            proc.is_running(),
            "the front end ended before it was ready:\n{}",
            proc.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(got, b"1", "slirp4netns's readiness is \"1\", then the end");
}

/// The front end's private directory (its control socket's), from its log.
fn private_dir(proc: &Proc) -> PathBuf {
    let log = proc.log();
    let line = log
        .lines()
        .find(|l| l.contains("control socket "))
        .unwrap_or_else(|| panic!("no control socket in the log:\n{log}"));
    let path = line
        .split("control socket ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap();
    Path::new(path).parent().unwrap().to_owned()
}

/// `hubnat slirp4netns` in the lab's namespace serving its guest namespace, with its exit
/// descriptor (3) and ready descriptor (4) on FIFOs the test holds, as a launcher's pipes.
struct FrontEnd {
    proc: Proc,
    /// The exit FIFO, open for writing too: closing it is the launcher's "stop".
    exit: Option<File>,
    /// The ready FIFO, open for reading, non-blocking.
    ready: File,
    api: PathBuf,
    started: Instant,
}

impl FrontEnd {
    fn start(lab: &Lab, flags: &[&str]) -> FrontEnd {
        let (exit_path, ready_path) = (lab.dir.join("exit.fifo"), lab.dir.join("ready.fifo"));
        must(Command::new("mkfifo").arg(&exit_path));
        // Opened read-write, the exit FIFO has a writer at once (the front end's read-only
        // open does not wait), and its end comes when the test closes it.
        let exit = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&exit_path)
            .unwrap();
        let ready = ready_fifo(&ready_path);
        let api = lab.dir.join("slirp4netns.sock");
        let hubnat = hubnat_bin();
        let guest = lab.guest.path();
        let mut argv = vec![
            "sh",
            "-c",
            r#"exec "$0" "$@" 3<"$S4_EXIT" 4>"$S4_READY""#,
            hubnat.to_str().unwrap(),
            "slirp4netns",
        ];
        argv.extend_from_slice(flags);
        argv.extend_from_slice(&[
            "-e",
            "3",
            "-r",
            "4",
            "--api-socket",
            api.to_str().unwrap(),
            "--netns-type=path",
            &guest,
            "tap0",
        ]);
        let mut cmd = lab.nat.cmd(&argv);
        cmd.env("S4_EXIT", &exit_path)
            .env("S4_READY", &ready_path)
            .env("HUBNAT_SLIRP4NETNS_CONFIG", base_config(&lab.dir.0))
            .env("HUBNAT_LOG", "debug");
        let started = Instant::now();
        let proc = Proc::spawn(
            "hubnat slirp4netns",
            cmd,
            Some(lab.dir.join(&unique("slirp4netns-log-"))),
        );
        FrontEnd {
            proc,
            exit: Some(exit),
            ready,
            api,
            started,
        }
    }

    /// Waits for "1" on the ready descriptor and then its end (the front end closed it);
    /// the time it took.
    fn wait_ready(&mut self) -> Duration {
        read_ready(&mut self.ready, &mut self.proc);
        self.started.elapsed()
    }

    fn private_dir(&self) -> PathBuf {
        private_dir(&self.proc)
    }

    /// Closes the exit descriptor and waits for the front end to end; its exit status code.
    fn close_exit(&mut self) -> Option<i32> {
        self.exit.take();
        let ended = wait_until(Duration::from_secs(10), || {
            self.proc.child.try_wait().ok().flatten()
        });
        ended.and_then(|st| st.code())
    }
}

/// dig in `ns` asking `server` for NAME's A record (over TCP with `+tcp`): the answer, or
/// None when nothing answered.
fn dig(ns: &Netns, server: &str, extra: &[&str], name: &str) -> Option<String> {
    let at = format!("@{server}");
    let mut args = vec!["dig", &at, "+short", "+time=2", "+tries=2"];
    args.extend_from_slice(extra);
    args.push(name);
    let out = ns.exec(&args);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The guest namespace is served as slirp4netns serves it: addressed by `--configure` (with
/// podman's flags), ready on `-r`, out to the server, names looked up at the DNS relay's
/// 10.0.2.3, the host's loopback refused, a port forwarded through the API socket, stopped by
/// `-e`.
#[test]
fn a_namespace_is_served_as_slirp4netns_serves_it() {
    require_root!();
    let lab = Lab::bare_with_server();
    let _server = lab.httpd(lab.server(), None, SERVER_PAGE);
    let _dns = lab.dnsmasq(lab.server(), SERVER_IP, &["s4.hubnat.test,10.77.0.9"]);
    let mut front = FrontEnd::start(
        &lab,
        &["--configure", "--mtu", "1500", "--disable-host-loopback"],
    );
    let ready = front.wait_ready();
    eprintln!("ready after {ready:?}");
    assert_eq!(lab.guest.addrs("tap0"), vec!["10.0.2.100/24".to_owned()]);
    let route = lab.guest.exec_ok(&["ip", "-4", "route", "show", "default"]);
    assert!(route.contains("via 10.0.2.2 dev tap0"), "{route}");
    let link = lab.guest.exec_ok(&["ip", "-o", "link", "show", "tap0"]);
    assert!(link.contains("mtu 1500") && link.contains(",UP"), "{link}");
    let lo = lab.guest.exec_ok(&["ip", "-o", "link", "show", "lo"]);
    assert!(lo.contains(",UP"), "{lo}");

    // Out through hubnat to the server namespace, the lab's only route.
    let page = curl(&lab.guest, &format!("http://{SERVER_IP}:8080/"));
    assert_eq!(page.as_deref(), Some(SERVER_PAGE), "{}", front.proc.log());
    // The DNS relay at 10.0.2.3 (hubnat's DNS address, the gateway being the virtual host),
    // over UDP and TCP, to the server namespace's resolver; it answers ping too.
    for extra in [&[][..], &["+tcp"][..]] {
        assert_eq!(
            dig(&lab.guest, "10.0.2.3", extra, "s4.hubnat.test").as_deref(),
            Some("10.77.0.9"),
            "{extra:?}\n{}",
            front.proc.log()
        );
    }
    let ping = lab.guest.exec(&["ping", "-c", "1", "-W", "2", "10.0.2.3"]);
    assert!(ping.status.success(), "10.0.2.3 answers ping");
    // --disable-host-loopback: the gateway does not lead to hubnat's loopback.
    let _loopback = lab.httpd(&lab.nat, Some("127.0.0.1:8081"), "the host's loopback");
    assert_eq!(curl(&lab.guest, "http://10.0.2.2:8081/"), None);

    // A port forwarded through the API socket, to a server in the guest.
    let _guest_server = lab.httpd(&lab.guest, None, "the guest's page");
    let add = r#"{"execute": "add_hostfwd", "arguments": {"proto": "tcp", "host_addr": "127.0.0.1", "host_port": 18080, "guest_port": 8080}}"#;
    let answer = api(&front.api, add);
    assert_eq!(
        answer, r#"{"return":{"id":1}}"#,
        "add_hostfwd needs hubnat's port forwards (the control socket's forward-add)"
    );
    assert_eq!(
        curl(&lab.nat, "http://127.0.0.1:18080/").as_deref(),
        Some("the guest's page"),
        "{}",
        front.proc.log()
    );
    assert_eq!(
        api(&front.api, r#"{"execute": "list_hostfwd"}"#),
        r#"{"entries":[{"id":1,"proto":"tcp","host_addr":"127.0.0.1","host_port":18080,"guest_addr":"10.0.2.100","guest_port":8080}]}"#
    );
    assert_eq!(
        api(
            &front.api,
            r#"{"execute": "remove_hostfwd", "arguments": {"id": 1}}"#
        ),
        r#"{"return":{}}"#
    );
    assert_eq!(curl(&lab.nat, "http://127.0.0.1:18080/"), None);
    assert_eq!(
        api(&front.api, r#"{"execute": "nope"}"#),
        r#"{"error":{"desc":"bad request: unknown execute"}}"#
    );

    // -e: the launcher's end of the exit descriptor closes; hubnat stops as on SIGTERM, its
    // TAP and private directory go.
    let dir = front.private_dir();
    assert!(dir.is_dir(), "{}", dir.display());
    let t = Instant::now();
    assert_eq!(front.close_exit(), Some(0), "{}", front.proc.log());
    eprintln!("stopped {:?} after the exit descriptor closed", t.elapsed());
    assert!(front
        .proc
        .log()
        .contains("--exit-fd=3 became readable or was closed"));
    assert!(!lab
        .guest
        .exec(&["ip", "link", "show", "tap0"])
        .status
        .success());
    assert!(
        wait_until(Duration::from_secs(5), || (!dir.exists()).then_some(())).is_some(),
        "{} is left behind",
        dir.display()
    );
}

/// Without --disable-host-loopback, the gateway stands for the host's 127.0.0.1 and the DNS
/// relay has slirp4netns's address (network + 3).
#[test]
fn the_gateway_reaches_the_hosts_loopback_unless_disabled() {
    require_root!();
    let lab = Lab::bare_with_server();
    let mut front = FrontEnd::start(&lab, &["-c", "--cidr=10.9.0.0/24"]);
    front.wait_ready();
    assert_eq!(lab.guest.addrs("tap0"), vec!["10.9.0.100/24".to_owned()]);
    let _loopback = lab.httpd(&lab.nat, Some("127.0.0.1:8081"), "the host's loopback");
    assert_eq!(
        curl(&lab.guest, "http://10.9.0.2:8081/").as_deref(),
        Some("the host's loopback"),
        "{}",
        front.proc.log()
    );
    let ping = lab.guest.exec(&["ping", "-c", "1", "-W", "2", "10.9.0.3"]);
    assert!(ping.status.success(), "the virtual host at network + 3");
    assert_eq!(front.close_exit(), Some(0), "{}", front.proc.log());
}

/// Starts a rootless container (uid 65534's `unshare --user --map-root-user --net`) and
/// `hubnat slirp4netns` as that user for it, by PID (its user namespace joined, as rootless
/// podman has slirp4netns do), in a mount namespace where /dev/net/tun is a node of mode 0666
/// on a tmpfs of the test's (the machine's /dev stays as it is). The script writes the
/// container's PID, then becomes the front end, whose ready descriptor is `$S4_READY`.
const ROOTLESS_SCRIPT: &str = r#"set -e
dev="$S4_DIR/dev"
mkdir -p "$dev"
mount -t tmpfs -o mode=0755,size=64k hubnat-e2e-dev "$dev"
mknod -m 0666 "$dev/tun" c 10 200
mount --bind "$dev/tun" /dev/net/tun
setpriv --reuid=65534 --regid=65534 --clear-groups unshare --user --map-root-user --net sleep 600 &
container=$!
echo "$container" > "$S4_DIR/container.pid"
i=0
while [ "$(cat /proc/$container/comm)" != sleep ] && [ $i -lt 250 ]; do sleep 0.02; i=$((i+1)); done
exec setpriv --reuid=65534 --regid=65534 --clear-groups "$S4_HUBNAT" slirp4netns   --configure --disable-host-loopback --mtu=65520 -r 4 "$container" tap0 4>"$S4_READY"
"#;

/// A process ended by its PID when dropped.
struct KillOnDrop(Option<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    }
}

/// Rootless: an ordinary user runs the front end for a container of its own, named by PID as
/// rootless podman names it; the container is addressed, reaches the server, and the front
/// end runs with no capability.
#[test]
fn a_users_container_is_served_by_pid() {
    require_root!();
    let lab = Lab::bare_with_server();
    let _server = lab.httpd(lab.server(), None, SERVER_PAGE);
    let ready_path = lab.dir.join("ready.fifo");
    let mut ready = ready_fifo(&ready_path);
    let hubnat = hubnat_bin();
    let mut cmd = lab.nat.cmd(&[
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        ROOTLESS_SCRIPT,
    ]);
    cmd.env("S4_DIR", &lab.dir.0)
        .env("S4_READY", &ready_path)
        .env("S4_HUBNAT", &hubnat)
        .env("HUBNAT_SLIRP4NETNS_CONFIG", base_config(&lab.dir.0))
        .env_remove("XDG_RUNTIME_DIR");
    let mut container = KillOnDrop(None);
    let mut front = Proc::spawn(
        "hubnat slirp4netns (rootless)",
        cmd,
        Some(lab.dir.join("rootless-log")),
    );
    // The container is the test's to end from the moment it exists, ready or not.
    let pid_file = lab.dir.join("container.pid");
    let pid: u32 = wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|p| p.trim().parse().ok())
    })
    .unwrap_or_else(|| panic!("the container did not start:\n{}", front.log()));
    container.0 = Some(pid);
    read_ready(&mut ready, &mut front);
    let inside = |args: &[&str]| {
        let mut c = Command::new("nsenter");
        c.args(["-t", &pid.to_string(), "--net"]).args(args);
        sh(&mut c)
    };
    let addr = String::from_utf8_lossy(&inside(&["ip", "-4", "-o", "addr", "show", "tap0"]).stdout)
        .into_owned();
    assert!(addr.contains("10.0.2.100/24"), "{addr}");
    let page = inside(&[
        "curl",
        "-s",
        "--max-time",
        "5",
        &format!("http://{SERVER_IP}:8080/"),
    ]);
    assert_eq!(
        String::from_utf8_lossy(&page.stdout),
        SERVER_PAGE,
        "{}",
        front.log()
    );
    let status = std::fs::read_to_string(format!("/proc/{}/status", front.pid())).unwrap();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap_or_default()
            .trim()
            .to_owned()
    };
    assert!(field("Uid:").starts_with("65534"), "{status}");
    assert_eq!(field("CapEff:"), "0000000000000000");
    let dir = private_dir(&front);
    assert_eq!(
        front.stop(Duration::from_secs(5)).and_then(|s| s.code()),
        Some(0)
    );
    assert!(
        wait_until(Duration::from_secs(5), || (!dir.exists()).then_some(())).is_some(),
        "{} is left behind",
        dir.display()
    );
}

/// Whether `path` is a statically linked ELF executable (no program interpreter), as a
/// container of nothing but busybox needs it.
fn is_static_elf(path: &Path) -> bool {
    let Ok(b) = std::fs::read(path) else {
        return false;
    };
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(b[32..40].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(54), u16_at(56));
    (0..phnum).all(|i| {
        let at = phoff + i * phentsize;
        // PT_INTERP (3) names the dynamic loader.
        b.get(at..at + 4) != Some(&3u32.to_le_bytes()[..])
    })
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Podman with everything of its own in a temporary directory: storage (vfs), run state,
/// temporary files, network configuration, and a containers.conf whose `network_cmd_path` is
/// a symlink named slirp4netns to hubnat. Every command runs in the lab's namespace.
// Fields drop in order: the containers go before the directory.
struct Podman {
    netns: String,
    runtime: Option<&'static str>,
    /// The front end's base configuration (podman hands its environment on).
    config: PathBuf,
    /// /var/lib/containers did not exist before: podman's blob cache made there goes too.
    made_var_lib: bool,
    dir: TempDir,
}

const IMAGE: &str = "localhost/hubnat-slirp4netns-test:latest";

impl Podman {
    fn new(lab: &Lab) -> Podman {
        let config = base_config(&lab.dir.0);
        let made_var_lib = !Path::new("/var/lib/containers").exists();
        let dir = TempDir::new();
        for d in ["bin", "tmp", "cni", "rootfs/bin", "rootfs/www"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        std::os::unix::fs::symlink(hubnat_bin(), dir.join("bin/slirp4netns")).unwrap();
        let conf = format!(
            r#"[containers]
# This machine's hard limits may be below podman's defaults for root.
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]

[engine]
network_cmd_path = "{bin}"
tmp_dir = "{tmp}"
events_logger = "none"
cgroup_manager = "cgroupfs"

[network]
network_config_dir = "{cni}"
"#,
            bin = dir.join("bin/slirp4netns").display(),
            tmp = dir.join("tmp").display(),
            cni = dir.join("cni").display(),
        );
        std::fs::write(dir.join("containers.conf"), conf).unwrap();
        let storage = format!(
            "[storage]\ndriver = \"vfs\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
            dir.join("root").display(),
            dir.join("runroot").display()
        );
        std::fs::write(dir.join("storage.conf"), storage).unwrap();
        // runc where it is installed: crun refuses machines with cgroup v1 and v2 controllers
        // both mounted.
        let runtime = which("runc").map(|_| "runc");
        Podman {
            netns: lab.nat.path(),
            runtime,
            config,
            made_var_lib,
            dir,
        }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.netns)).arg("podman");
        c.args(["--root", self.dir.join("root").to_str().unwrap()])
            .args(["--runroot", self.dir.join("runroot").to_str().unwrap()])
            .args(["--storage-driver", "vfs"]);
        if let Some(r) = self.runtime {
            c.args(["--runtime", r]);
        }
        c.args(args)
            .env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", self.dir.join("storage.conf"))
            .env("TMPDIR", self.dir.join("tmp"))
            .env("HUBNAT_SLIRP4NETNS_CONFIG", &self.config)
            .stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        sh(&mut self.cmd(args))
    }

    fn must(&self, args: &[&str]) -> String {
        must(&mut self.cmd(args))
    }

    /// An image of busybox-static and its applets, with /www/index.html, made by
    /// `podman import` of a root file system tarball.
    fn build_image(&self, busybox: &Path) {
        let root = self.dir.join("rootfs");
        std::fs::copy(busybox, root.join("bin/busybox")).unwrap();
        let list = must(Command::new(busybox).arg("--list"));
        for applet in list.lines().map(str::trim).filter(|a| !a.is_empty()) {
            if applet != "busybox" {
                let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(applet));
            }
        }
        std::fs::write(root.join("www/index.html"), "the container's page").unwrap();
        let tar = self.dir.join("rootfs.tar");
        must(
            Command::new("tar")
                .arg("-C")
                .arg(&root)
                .arg("-cf")
                .arg(&tar)
                .arg("."),
        );
        self.must(&["import", tar.to_str().unwrap(), IMAGE]);
    }

    /// PIDs of the front ends podman started (their argv[0] is the symlink).
    fn front_ends(&self) -> Vec<u32> {
        let link = self.dir.join("bin/slirp4netns");
        let link = link.to_str().unwrap();
        let mut pids = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if cmdline.split(|&b| b == 0).next() == Some(link.as_bytes()) {
                pids.push(pid);
            }
        }
        pids
    }

    fn cmdline(pid: u32) -> Vec<String> {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .unwrap_or_default()
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let quiet = |args: &[&str]| {
            let _ = self
                .cmd(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        };
        quiet(&["rm", "--force", "--all", "--time", "0"]);
        quiet(&["rmi", "--all", "--force"]);
        // What podman may have left running (the front ends it started), by PID.
        for pid in self.front_ends() {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
        // Mounts podman made under the directory (a container's /dev/shm), then the directory.
        let dir = self.dir.0.to_str().unwrap().to_owned();
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut mounts: Vec<&str> = mountinfo
            .lines()
            .filter_map(|l| l.split_whitespace().nth(4))
            .filter(|m| m.starts_with(&dir))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = Command::new("umount").args(["-l", m]).status();
        }
        if self.made_var_lib {
            let _ = std::fs::remove_dir_all("/var/lib/containers");
        }
    }
}

/// Debian's podman runs a container whose network is hubnat in slirp4netns's place: the
/// container gets 10.0.2.100, reaches the server namespace, and a published port reaches its
/// httpd through hubnat's forward (podman's `port_handler=slirp4netns`, the API socket). The
/// front end stops with the container.
#[test]
fn podman_runs_a_container_on_hubnat() {
    require_root!();
    let in_ci = std::env::var_os("CI").is_some();
    let podman_runs = Command::new("podman")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !podman_runs {
        assert!(
            !in_ci,
            "podman is not installed: .ci/run installs it for CI"
        );
        eprintln!(
            "skipped: podman is not installed (apt-get install --no-install-recommends podman)"
        );
        return;
    }
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| is_static_elf(p));
    let Some(busybox) = busybox else {
        assert!(
            !in_ci,
            "busybox is not static here: .ci/run installs busybox-static"
        );
        eprintln!("skipped: the image needs busybox-static (apt-get install busybox-static)");
        return;
    };
    let lab = Lab::bare_with_server();
    let _server = lab.httpd(lab.server(), None, SERVER_PAGE);
    let _dns = lab.dnsmasq(lab.server(), SERVER_IP, &["s4.hubnat.test,10.77.0.9"]);
    let podman = Podman::new(&lab);
    let t = Instant::now();
    podman.build_image(&busybox);
    eprintln!("image built in {:?}", t.elapsed());
    let name = unique("hubnat-s4-");
    let t = Instant::now();
    let out = podman.run(&[
        "run",
        "-d",
        "--name",
        &name,
        "--network",
        "slirp4netns:port_handler=slirp4netns",
        "-p",
        "18080:80",
        // The relay's address, which podman writes by default too, but followed by the
        // machine's own nameservers: named alone, it keeps them out of the container.
        "--dns",
        "10.0.2.3",
        IMAGE,
        "httpd",
        "-f",
        "-p",
        "80",
        "-h",
        "/www",
    ]);
    assert!(
        out.status.success(),
        "podman run: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("container up in {:?}", t.elapsed());
    let fronts = podman.front_ends();
    assert_eq!(fronts.len(), 1, "one front end for the container");
    let argv = Podman::cmdline(fronts[0]);
    for flag in [
        "-c",
        "-e",
        "-r",
        "--api-socket",
        "--netns-type=path",
        "tap0",
    ] {
        assert!(argv.iter().any(|a| a == flag), "{flag} not in {argv:?}");
    }

    // The container's address, as slirp4netns's --configure gives it.
    let addr = podman.must(&["exec", &name, "ip", "-4", "-o", "addr", "show", "tap0"]);
    assert!(addr.contains("10.0.2.100/24"), "{addr}");
    // The published port, through hubnat's forward (before the container has sent anything).
    assert_eq!(
        curl(&lab.nat, "http://127.0.0.1:18080/").as_deref(),
        Some("the container's page"),
        "the published port needs hubnat's port forwards (forward-add)"
    );
    // Out to the server namespace.
    let page = podman.must(&[
        "exec",
        &name,
        "wget",
        "-q",
        "-O",
        "-",
        &format!("http://{SERVER_IP}:8080/"),
    ]);
    assert_eq!(page, SERVER_PAGE);
    // DNS through hubnat's relay, to the server namespace's resolver.
    let resolv = podman.must(&["exec", &name, "cat", "/etc/resolv.conf"]);
    assert!(resolv.contains("nameserver 10.0.2.3"), "{resolv}");
    // (busybox's nslookup asks for AAAA too, which the test's resolver refuses: its status
    // says so, the A answer is what counts.)
    let out = podman.run(&["exec", &name, "nslookup", "s4.hubnat.test"]);
    let answer = String::from_utf8_lossy(&out.stdout);
    assert!(answer.contains("Address: 10.77.0.9"), "{answer}");

    // The container goes: conmon's end of the exit pipe closes, and the front end stops.
    let t = Instant::now();
    podman.must(&["rm", "--force", "--time", "0", &name]);
    assert!(
        wait_until(Duration::from_secs(10), || podman
            .front_ends()
            .is_empty()
            .then_some(()))
        .is_some(),
        "the front end outlived its container"
    );
    eprintln!("front end gone {:?} after podman rm", t.elapsed());
    let leftovers = || -> Vec<_> {
        std::fs::read_dir(podman.dir.join("tmp"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n.to_string_lossy().starts_with("hubnat-slirp4netns."))
            .collect()
    };
    let gone = wait_until(Duration::from_secs(5), || {
        leftovers().is_empty().then_some(())
    });
    assert!(
        gone.is_some(),
        "private directories left: {:?}",
        leftovers()
    );
}
