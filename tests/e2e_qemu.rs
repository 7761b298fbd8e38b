//! End-to-end: real QEMU guests on hubnat's socket ports. Each guest is Debian's kernel with a
//! busybox initramfs (built from Debian packages by tools/qemu-guest.sh) whose /init takes a
//! DHCP lease, resolves a name, fetches a page and pings as its kernel command line says, and
//! reports every step on the serial console (`HN-LEASE ...`, `HN-FETCH ok ...`), which the test
//! reads. Each guest boots once and does all its checks in that boot: under TCG a boot is the
//! expensive part.
//!
//! QEMU gets no network of its own: its only NIC is the socket to hubnat, and it runs in the
//! lab's hubnat namespace. The resolver behind hubnat's DNS relay is the test's dnsmasq in the
//! server namespace; the guest's resolv.conf is inside its initramfs.
//!
//! KVM is used where /dev/kvm opens and a probe boot with `-cpu host` reaches /init; otherwise
//! TCG. HUBNAT_QEMU_ACCEL=kvm or =tcg skips the probe.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{wait_until, Lab, Proc, TempDir, SERVER_IP};

const HOST_IP: &str = "192.168.30.1";
/// The name the guests resolve (through hubnat's relay to the test's dnsmasq) and fetch from.
const WWW: &str = "www.e2e.test";
const PAGE: &str = "<h1>served to a QEMU guest</h1>\nsecond line\n";
/// How long one guest may take for everything it does in its boot. Alone, a TCG boot to its
/// fetch takes about 6 s on two cores, but the tests boot up to four guests at once.
const BOOT_BUDGET: Duration = Duration::from_secs(240);

/// The guest's kernel and initramfs, and how to run them.
struct Image {
    kernel: PathBuf,
    initrd: PathBuf,
    accel: &'static [&'static str],
}

const KVM: &[&str] = &["-enable-kvm", "-cpu", "host"];
const TCG: &[&str] = &["-accel", "tcg"];

/// Builds the guest once per test binary (the tests running in parallel wait for the first),
/// or fails every test with the reason.
fn image() -> &'static Image {
    static IMAGE: OnceLock<Result<Image, String>> = OnceLock::new();
    match IMAGE.get_or_init(build_image) {
        Ok(image) => image,
        Err(why) => panic!("{why}"),
    }
}

fn build_image() -> Result<Image, String> {
    let qemu = Command::new("qemu-system-x86_64").arg("--version").output();
    if !qemu.is_ok_and(|o| o.status.success()) {
        let fix = "apt-get install --no-install-recommends qemu-system-x86";
        return Err(format!("qemu-system-x86_64 does not run here: {fix}"));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("qemu-guest.sh");
    let started = Instant::now();
    let out = Command::new(&script)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(format!(
            "{} failed ({}): the guest could not be built\n{stdout}{stderr}",
            script.display(),
            out.status
        ));
    }
    let path = |key: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(PathBuf::from)
            .ok_or_else(|| {
                format!(
                    "{} printed no {key}PATH:\n{stdout}{stderr}",
                    script.display()
                )
            })
    };
    let (kernel, initrd) = (path("kernel=")?, path("initrd=")?);
    eprintln!(
        "guest image ready in {:.1} s: {} {}",
        started.elapsed().as_secs_f64(),
        kernel.display(),
        initrd.display()
    );
    let accel = choose_accel(&kernel, &initrd)?;
    Ok(Image {
        kernel,
        initrd,
        accel,
    })
}

/// KVM where it works, else TCG. /dev/kvm opening is not enough: a nested hypervisor may refuse
/// the host CPU model's MSRs or hang the guest in its first instructions, so a probe boot must
/// reach /init.
fn choose_accel(kernel: &Path, initrd: &Path) -> Result<&'static [&'static str], String> {
    match std::env::var("HUBNAT_QEMU_ACCEL").as_deref() {
        Ok("kvm") => return Ok(KVM),
        Ok("tcg") => return Ok(TCG),
        Ok(other) => return Err(format!("HUBNAT_QEMU_ACCEL={other}: say kvm or tcg")),
        Err(_) => {}
    }
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm");
    if let Err(e) = kvm {
        eprintln!("QEMU accelerator: TCG (/dev/kvm: {e})");
        return Ok(TCG);
    }
    let dir = TempDir::new();
    let mut cmd = qemu_cmd(Command::new("qemu-system-x86_64"), kernel, initrd, KVM);
    cmd.args(["-append", "console=ttyS0 quiet panic=-1 hn.probe=1"]);
    let mut probe = Proc::spawn("qemu (KVM probe)", cmd, Some(dir.join("probe.log")));
    let started = Instant::now();
    // A working KVM reaches /init in a second or two; TCG would need about 5.
    let booted = wait_until(Duration::from_secs(15), || {
        let log = probe.log();
        if log.contains("HN-BOOT") {
            return Some(true);
        }
        (!probe.is_running()).then_some(false)
    });
    probe.stop(Duration::from_secs(3));
    if booted == Some(true) {
        eprintln!(
            "QEMU accelerator: KVM (probe boot {:.1} s)",
            started.elapsed().as_secs_f64()
        );
        Ok(KVM)
    } else {
        let log = probe.log();
        let why = log.lines().rev().find(|l| !l.trim().is_empty());
        eprintln!(
            "QEMU accelerator: TCG (a KVM probe boot did not reach /init: {})",
            why.unwrap_or("no output")
        );
        Ok(TCG)
    }
}

/// `base` (qemu-system-x86_64, possibly behind a wrapper) with the machine: no default devices
/// (above all no default NIC with user networking), the serial console on stdout, no reboot.
fn qemu_cmd(mut base: Command, kernel: &Path, initrd: &Path, accel: &[&str]) -> Command {
    base.args(accel)
        .args(["-M", "pc", "-m", "256", "-smp", "1"])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-serial", "stdio", "-no-reboot"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        // QEMU's stdin must not be the terminal of whoever runs the tests (-serial stdio would
        // put it in raw mode).
        .stdin(Stdio::null());
    base
}

/// A QEMU guest the test owns: killed by its PID when dropped.
struct Guest {
    name: String,
    qemu: Proc,
    booted: Instant,
}

impl Guest {
    /// Boots a guest whose NIC (`mac`) is `netdev` (QEMU's `-netdev` value, `id=n0`), with
    /// `hn` (the `hn.*` instructions) on its kernel command line.
    fn boot(lab: &Lab, name: &str, netdev: &str, mac: &str, hn: &str) -> Guest {
        let image = image();
        // QEMU runs as root, hubnat as its sandbox user: a datagram socket QEMU binds must be
        // writable by hubnat to be answered, hence umask 0 (exec keeps the PID the test kills).
        let base = lab.nat.cmd(&[
            "sh",
            "-c",
            "umask 000; exec \"$0\" \"$@\"",
            "qemu-system-x86_64",
        ]);
        let mut cmd = qemu_cmd(base, &image.kernel, &image.initrd, image.accel);
        cmd.args(["-netdev", netdev])
            .arg("-device")
            .arg(format!("virtio-net-pci,netdev=n0,mac={mac}"))
            .arg("-append")
            .arg(format!("console=ttyS0 quiet loglevel=3 panic=-1 {hn}"));
        let log = lab.dir.join(&format!("qemu-{name}.log"));
        let qemu = Proc::spawn("qemu-system-x86_64", cmd, Some(log));
        Guest {
            name: name.to_owned(),
            qemu,
            booted: Instant::now(),
        }
    }

    /// The rest of the console line `HN-KEY ...`, once the guest printed it; a panic (with the
    /// console and hubnat's log) when the step failed, the guest ended or time ran out.
    fn step(&mut self, lab: &Lab, key: &str) -> String {
        let tag = format!("HN-{key}");
        let deadline = self.booted + BOOT_BUDGET;
        loop {
            let console = self.qemu.log();
            let found = console.lines().find_map(|l| {
                let at = l.find(&tag)?;
                let rest = &l[at + tag.len()..];
                (rest.is_empty() || rest.starts_with(' ')).then(|| rest.trim().to_owned())
            });
            if let Some(rest) = found {
                if rest.starts_with("failed") || rest.ends_with("failed") {
                    self.fail(lab, &format!("step {key} failed: {rest}"));
                }
                eprintln!(
                    "guest {}: {tag} {rest} ({:.1} s after boot)",
                    self.name,
                    self.booted.elapsed().as_secs_f64()
                );
                return rest;
            }
            if console.contains("HN-DONE") || !self.qemu.is_running() {
                self.fail(lab, &format!("the guest ended without {tag}"));
            }
            if Instant::now() > deadline {
                self.fail(lab, &format!("no {tag} within {BOOT_BUDGET:?}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn fail(&self, lab: &Lab, why: &str) -> ! {
        panic!(
            "guest {}: {why}\n--- console ---\n{}\n--- hubnat (last lines) ---\n{}",
            self.name,
            self.qemu.log(),
            tail(&lab.hubnat_log(), 60)
        );
    }

    /// Kills QEMU by its PID at once, as a crash would, and reaps it.
    fn kill(mut self) {
        self.qemu.signal(9);
        self.qemu.stop(Duration::from_secs(5));
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn stream_netdev(path: &Path) -> String {
    format!(
        "stream,id=n0,server=off,addr.type=unix,addr.path={}",
        path.display()
    )
}

fn dgram_netdev(hubnat: &Path, local: &Path) -> String {
    format!(
        "dgram,id=n0,local.type=unix,local.path={},remote.type=unix,remote.path={}",
        local.display(),
        hubnat.display()
    )
}

/// A lab whose hubnat has only socket ports, with a web server and a DNS server (the relay's
/// upstream) in the server namespace.
// Fields drop in order: the servers stop before the lab's namespaces go.
struct World {
    _dns: Proc,
    _www: Proc,
    lab: Lab,
    /// Where the sockets are (hubnat's and QEMU's).
    vm: PathBuf,
}

impl World {
    /// `ports`: `--port` values, `@` standing for the socket directory; `dhcp`: lines for the
    /// `[dhcp]` table.
    fn start(ports: &[&str], dhcp: &str) -> World {
        // The guest image first: its build or KVM probe must not eat into hubnat's time.
        image();
        let mut lab = Lab::bare_with_server();
        let vm = lab.dir.join("vm");
        std::fs::create_dir_all(&vm).unwrap();
        let dns = lab.dnsmasq(lab.server(), SERVER_IP, &[&format!("{WWW},{SERVER_IP}")]);
        let www = lab.httpd(lab.server(), None, PAGE);
        let config = format!(
            "[dns]\nupstream = [\"{SERVER_IP}\"]\n\n[dhcp]\n{dhcp}\n\n[control]\n\
             socket = \"{}\"\nreverse_lookup = false\n",
            lab.dir.join("ctl.sock").display()
        );
        let specs: Vec<String> = ports
            .iter()
            .map(|p| p.replace('@', vm.to_str().unwrap()))
            .collect();
        let mut args = Vec::new();
        for s in &specs {
            args.extend(["--port", s.as_str()]);
        }
        lab.start_hubnat_cmd(&config, &args);
        // QEMU gives up at once when the stream socket is not there yet.
        for s in &specs {
            let path = PathBuf::from(s.split_once(':').unwrap().1);
            let up = wait_until(Duration::from_secs(10), || {
                let hubnat = lab.hubnat.as_mut().unwrap();
                (path.exists() || !hubnat.is_running()).then_some(())
            });
            if up.is_none() || !path.exists() {
                panic!(
                    "hubnat did not make {}:\n{}",
                    path.display(),
                    lab.hubnat_log()
                );
            }
        }
        World {
            _dns: dns,
            _www: www,
            lab,
            vm,
        }
    }

    fn sock(&self, name: &str) -> PathBuf {
        self.vm.join(name)
    }
}

/// What every guest that fetches is told to do.
fn fetch_instructions() -> String {
    format!("hn.lookup={WWW} hn.fetch=http://{WWW}:8080/index.html")
}

/// The lease is in the default pool with hubnat as router and nameserver; the name resolves to
/// the server; the page arrives whole. Returns the guest's address.
fn check_lease_lookup_fetch(world: &World, g: &mut Guest) -> String {
    let lab = &world.lab;
    let lease = g.step(lab, "LEASE");
    let ip = lease
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    let addr: std::net::Ipv4Addr = ip
        .parse()
        .unwrap_or_else(|_| g.fail(lab, &format!("no address in the lease line {lease:?}")));
    let o = addr.octets();
    assert!(
        o[..3] == [192, 168, 30] && (10..=200).contains(&o[3]),
        "address {ip} outside the pool"
    );
    for want in [
        "mask=24",
        &format!("router={HOST_IP}"),
        &format!("dns={HOST_IP}"),
    ] {
        assert!(
            lease.split_whitespace().any(|w| w == want),
            "lease line {lease:?} lacks {want}"
        );
    }
    let lookup = g.step(lab, "LOOKUP");
    assert_eq!(lookup, format!("{WWW} -> {SERVER_IP}"));
    let fetch = g.step(lab, "FETCH");
    let first = PAGE.lines().next().unwrap();
    assert_eq!(fetch, format!("ok {} {first}", PAGE.len()));
    ip
}

#[test]
fn a_stream_guest_leases_resolves_and_fetches() {
    require_root!();
    let world = World::start(&["stream:@/hubnat.sock"], "");
    let mut g = Guest::boot(
        &world.lab,
        "stream",
        &stream_netdev(&world.sock("hubnat.sock")),
        "52:54:00:4e:01:01",
        &fetch_instructions(),
    );
    check_lease_lookup_fetch(&world, &mut g);
    g.step(&world.lab, "DONE");
    // The guest powered itself off: QEMU exits of its own accord (-no-reboot).
    let ended = wait_until(Duration::from_secs(30), || {
        (!g.qemu.is_running()).then_some(())
    });
    assert!(ended.is_some(), "QEMU still runs after poweroff");
    let log = world.lab.hubnat_log();
    assert!(
        log.contains("MAC address: 52-54-00-4E-01-01") && log.contains("host name: hn-guest"),
        "no DHCP entry for the guest in hubnat's log:\n{}",
        tail(&log, 60)
    );
}

#[test]
fn a_dgram_guest_leases_resolves_and_fetches() {
    require_root!();
    let world = World::start(&["dgram:@/hubnat.sock"], "");
    let mut g = Guest::boot(
        &world.lab,
        "dgram",
        &dgram_netdev(&world.sock("hubnat.sock"), &world.sock("qemu.sock")),
        "52:54:00:4e:02:01",
        &fetch_instructions(),
    );
    check_lease_lookup_fetch(&world, &mut g);
    g.step(&world.lab, "DONE");
}

/// A guest on a stream port and one on a datagram port of the same hubnat ping each other:
/// frames switched between the ports. The pool is two addresses, so each guest knows the
/// other's (its own is the one it got); both boot at once and keep trying until the other
/// answers.
#[test]
fn guests_on_two_ports_ping_each_other() {
    require_root!();
    let world = World::start(
        &["stream:@/a.sock", "dgram:@/b.sock"],
        "range_start = \"192.168.30.10\"\nrange_end = \"192.168.30.11\"",
    );
    let hn = "hn.ping=192.168.30.10,192.168.30.11 hn.pingtime=180 hn.wait=60";
    let mut a = Guest::boot(
        &world.lab,
        "a",
        &stream_netdev(&world.sock("a.sock")),
        "52:54:00:4e:03:0a",
        hn,
    );
    let mut b = Guest::boot(
        &world.lab,
        "b",
        &dgram_netdev(&world.sock("b.sock"), &world.sock("qb.sock")),
        "52:54:00:4e:03:0b",
        hn,
    );
    let ip_a = a.step(&world.lab, "LEASE");
    let ip_b = b.step(&world.lab, "LEASE");
    let ip_a = ip_a.split_whitespace().next().unwrap().to_owned();
    let ip_b = ip_b.split_whitespace().next().unwrap().to_owned();
    assert_ne!(ip_a, ip_b);
    assert_eq!(a.step(&world.lab, "PING"), format!("{ip_b} ok"));
    assert_eq!(b.step(&world.lab, "PING"), format!("{ip_a} ok"));
}

/// QEMU killed (as in a crash) and started again on the same sockets is served again: on the
/// stream port the new QEMU's connection replaces the dead one's; on the datagram port the new
/// QEMU binds another path, which hubnat learns from its first frame. Each comes back to its
/// address (same MAC) and fetches the page again.
#[test]
fn a_restarted_qemu_is_served_again() {
    require_root!();
    let world = World::start(&["stream:@/s.sock", "dgram:@/d.sock"], "");
    let lab = &world.lab;
    let hn = format!("{} hn.wait=300", fetch_instructions());
    let (mac_s, mac_d) = ("52:54:00:4e:04:01", "52:54:00:4e:04:02");
    let stream = stream_netdev(&world.sock("s.sock"));
    let mut s1 = Guest::boot(lab, "s1", &stream, mac_s, &hn);
    let mut d1 = Guest::boot(
        lab,
        "d1",
        &dgram_netdev(&world.sock("d.sock"), &world.sock("q1.sock")),
        mac_d,
        &hn,
    );
    let ip_s = check_lease_lookup_fetch(&world, &mut s1);
    let ip_d = check_lease_lookup_fetch(&world, &mut d1);
    s1.kill();
    d1.kill();
    let mut s2 = Guest::boot(lab, "s2", &stream, mac_s, &hn);
    let mut d2 = Guest::boot(
        lab,
        "d2",
        &dgram_netdev(&world.sock("d.sock"), &world.sock("q2.sock")),
        mac_d,
        &hn,
    );
    assert_eq!(check_lease_lookup_fetch(&world, &mut s2), ip_s);
    assert_eq!(check_lease_lookup_fetch(&world, &mut d2), ip_d);
    // hubnat's own account: the stream port saw two clients and lost the first; the datagram
    // port answers the new QEMU's path.
    let ports = common::ctl_json(&lab.dir.0, &["port", "list"]);
    let port = |kind: &str| {
        ports
            .as_array()
            .and_then(|a| a.iter().find(|p| p["kind"] == kind))
            .unwrap_or_else(|| panic!("no {kind} port in {ports}"))
            .clone()
    };
    let (sp, dp) = (port("stream"), port("dgram"));
    assert_eq!(sp["connects"], 2, "{sp}");
    assert_eq!(sp["disconnects"], 1, "{sp}");
    assert_eq!(sp["connected"], true, "{sp}");
    let q2 = world.sock("q2.sock");
    assert_eq!(dp["peer"].as_str(), q2.to_str(), "{dp}");
    assert_eq!(dp["malformed"], 0, "{dp}");
}
