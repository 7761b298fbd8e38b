//! `hubnat demo`: a first run in one command, as root. It builds a throwaway network of three
//! network namespaces, runs hubnat on it with a real DHCP client in the guest, shows each
//! service of the virtual host at work, and removes everything again, also on failure and on
//! Ctrl-C.
//!
//! ```text
//!   guest namespace            hubnat's namespace               server namespace
//!   DHCP client, ping,  ─TAP─  hubnat run          ──veth──     web server :80
//!   lookups, fetches           (its host sockets)   .1    .2    DNS server :53
//! ```
//!
//! The server's two services, and the guest's lookup and fetch, are this same binary (the
//! hidden `hubnat demo-helper`), so the demo needs nothing beyond iproute2, a DHCP client and
//! ping. hubnat's host sockets live in a namespace whose only route leads to the server, so
//! nothing the demo does reaches another machine or the machine's own resolver.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// `println!` that never panics: with its output gone (`hubnat demo | head`), the demo still
/// runs on to its cleanup.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// `eprintln!`, likewise.
macro_rules! say_err {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// The one name the server namespace's DNS server knows.
const NAME: &str = "www.hubnat.demo";
/// hubnat's namespace's end of the link to the server namespace, and the server's.
const NAT_SIDE: Ipv4Addr = Ipv4Addr::new(10, 199, 0, 1);
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 199, 0, 2);
/// The TAP device hubnat makes in the guest namespace.
const TAP: &str = "tap0";
const STEPS: usize = 8;
/// The host name the guest's DHCP client gives (`dhcp-table` shows it).
const GUEST_NAME: &str = "demo-guest";

const NOT_ROOT: &str = "\
hubnat demo needs root: it makes network namespaces, a veth pair and a TAP device.
Run it as `sudo hubnat demo`. To try hubnat without root, follow README.md, \"Run it\": its first
example serves a rootless container (a user and network namespace made with `unshare`).";

#[derive(Args)]
pub struct DemoArgs {
    /// After the steps, leave the namespaces and hubnat running until Ctrl-C, and print commands
    /// to explore them with.
    #[arg(long)]
    keep: bool,
    /// The guest's DHCP client: `auto` (busybox udhcpc where installed, else ISC dhclient),
    /// `udhcpc` or `dhclient`.
    #[arg(long, value_name = "auto|udhcpc|dhclient", default_value = "auto")]
    dhcp_client: ClientChoice,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, ValueEnum)]
pub enum ClientChoice {
    Auto,
    Udhcpc,
    Dhclient,
}

/// What `hubnat demo` runs inside its namespaces (`hubnat demo-helper`, outside the CLI users
/// see: see `internal`).
#[derive(Subcommand)]
pub enum Helper {
    /// The server namespace's web server (port 80) and DNS server (port 53, answering NAME
    /// with ADDR), until standard input closes.
    Serve {
        #[arg(long)]
        addr: Ipv4Addr,
        #[arg(long)]
        name: String,
        /// The namespace it runs in, for its answers.
        #[arg(long)]
        netns: String,
    },
    /// One DNS query for NAME's IPv4 address, to SERVER port 53.
    Lookup { server: Ipv4Addr, name: String },
    /// `GET /` from ADDR port 80 with `Host: HOST`; prints the status line and the body.
    Fetch { addr: Ipv4Addr, host: String },
}

/// `hubnat demo`; the process's exit status.
pub fn main(args: DemoArgs) -> i32 {
    if !super::is_root() {
        say_err!("{NOT_ROOT}");
        return 1;
    }
    let tools = match Tools::find(args.dhcp_client) {
        Ok(t) => t,
        Err(e) => {
            say_err!("hubnat demo: {e:#}");
            return 1;
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ] {
        if let Err(e) = signal_hook::flag::register(sig, Arc::clone(&stop)) {
            say_err!("hubnat demo: cannot install signal handlers: {e}");
            return 1;
        }
    }
    let mut lab = match Lab::new(Arc::clone(&stop)) {
        Ok(l) => l,
        Err(e) => {
            say_err!("hubnat demo: {e:#}");
            return 1;
        }
    };
    say!(
        "hubnat demo: a throwaway network of three network namespaces on this machine, hubnat\n\
         serving a guest on it, and each of the virtual host's services at work. Everything is\n\
         removed at the end, also on failure or Ctrl-C."
    );
    let outcome = lab.steps(&tools, args.keep);
    let mut status = match &outcome {
        Ok(()) => 0,
        Err(_) if lab.stopped() => {
            say!("\nInterrupted: stopping.");
            130
        }
        Err(e) => {
            say!("   FAILED: {e:#}");
            lab.show_logs();
            1
        }
    };
    say!("\nCleaning up:");
    let (done, problems) = lab.cleanup();
    for line in &done {
        say!("   {line}");
    }
    for p in &problems {
        say!("   NOT CLEANED: {p}");
    }
    if !problems.is_empty() && status == 0 {
        status = 1;
    }
    match status {
        0 => say!(
            "\nDone: all {STEPS} steps succeeded, and nothing of the demo is left on this machine.\n\
             Next: README.md, \"Run it\", serves a namespace, a rootless container or QEMU guests."
        ),
        130 => say!("\nStopped before the end; nothing of the demo is left."),
        _ if problems.is_empty() => {
            say!("\nThe demo failed (see above); nothing of the demo is left.")
        }
        _ => say!("\nThe demo could not remove everything it made: see NOT CLEANED above."),
    }
    status
}

/// The programs the demo runs, found before anything is made.
struct Tools {
    ip: PathBuf,
    dhcp: Dhcp,
    /// ping and the arguments before its own (`busybox ping`).
    ping: Vec<PathBuf>,
    /// Whether ping takes `-i 0.2` (iputils' does, for root), to keep the step short.
    ping_interval: bool,
    exe: PathBuf,
}

enum Dhcp {
    /// udhcpc's command (`udhcpc` or `busybox udhcpc`).
    Udhcpc(Vec<PathBuf>),
    Dhclient(PathBuf),
}

impl Dhcp {
    fn name(&self) -> &'static str {
        match self {
            Dhcp::Udhcpc(_) => "udhcpc",
            Dhcp::Dhclient(_) => "dhclient",
        }
    }
}

impl Tools {
    fn find(choice: ClientChoice) -> Result<Tools> {
        let ip = which("ip").ok_or_else(|| {
            anyhow!("needs iproute2's `ip` to make namespaces (apt-get install iproute2)")
        })?;
        let busybox = which("busybox");
        let busybox_has = |applet: &str| {
            busybox.as_ref().is_some_and(|b| {
                Command::new(b).arg("--list").output().is_ok_and(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .any(|l| l == applet)
                })
            })
        };
        let udhcpc = which("udhcpc").map(|p| vec![p]).or_else(|| {
            busybox_has("udhcpc")
                .then(|| vec![busybox.clone().unwrap_or_default(), "udhcpc".into()])
        });
        let dhclient = which("dhclient");
        let dhcp = match (choice, udhcpc, dhclient) {
            (ClientChoice::Auto | ClientChoice::Udhcpc, Some(u), _) => Dhcp::Udhcpc(u),
            (ClientChoice::Auto | ClientChoice::Dhclient, _, Some(d)) => Dhcp::Dhclient(d),
            (ClientChoice::Udhcpc, None, _) => {
                bail!("--dhcp-client udhcpc: not installed (apt-get install udhcpc)")
            }
            (ClientChoice::Dhclient, _, None) => {
                bail!("--dhcp-client dhclient: not installed (apt-get install isc-dhcp-client)")
            }
            (ClientChoice::Auto, None, None) => bail!(
                "needs a DHCP client for the guest: busybox udhcpc (apt-get install udhcpc) or \
                 ISC dhclient (apt-get install isc-dhcp-client)"
            ),
        };
        let ping = match which("ping") {
            Some(p) => vec![p],
            None if busybox_has("ping") => {
                vec![busybox.clone().unwrap_or_default(), "ping".into()]
            }
            None => bail!("needs ping (apt-get install iputils-ping) or busybox"),
        };
        let ping_interval = ping.len() == 1
            && Command::new(&ping[0])
                .arg("-V")
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("iputils"));
        let exe = std::env::current_exe().context("cannot find hubnat's own executable")?;
        Ok(Tools {
            ip,
            dhcp,
            ping,
            ping_interval,
            exe,
        })
    }
}

/// `name` in $PATH, or in the system directories a root shell has (sudo may not pass them).
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// A process the demo started and ends by its PID.
struct Kid {
    what: String,
    child: Child,
    /// The server helper ends when this closes, even if the demo itself is killed.
    stdin: Option<ChildStdin>,
}

/// What a short command left behind.
struct Ran {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn ok(&self) -> bool {
        self.status.success()
    }

    /// stderr, else stdout, for an error message.
    fn why(&self) -> String {
        let text = if self.stderr.trim().is_empty() {
            &self.stdout
        } else {
            &self.stderr
        };
        let last: Vec<&str> = text.trim().lines().rev().take(3).collect();
        let last: Vec<&str> = last.into_iter().rev().collect();
        format!("{} ({})", last.join(" / "), self.status)
    }
}

/// Everything the demo made, undone by `cleanup` (and by Drop, should anything unwind).
struct Lab {
    tag: String,
    dir: PathBuf,
    guest: String,
    nat: String,
    server: String,
    /// Namespaces made, in order.
    namespaces: Vec<String>,
    /// /etc/netns/NAME directories made.
    etc: Vec<PathBuf>,
    /// /etc/netns itself, when the demo made it.
    etc_root: Option<PathBuf>,
    kids: Vec<Kid>,
    stop: Arc<AtomicBool>,
    runs: usize,
    cleaned: bool,
}

/// What the guest's DHCP client got.
#[derive(Debug)]
struct Lease {
    ip: Ipv4Addr,
    prefix: u32,
    router: Ipv4Addr,
    dns: Ipv4Addr,
    seconds: String,
}

impl Lab {
    fn new(stop: Arc<AtomicBool>) -> Result<Lab> {
        let tag = format!("hubnat-demo-{}", std::process::id());
        // A name of its own under the shared temporary directory: made here or not at all.
        let suffix: u32 = SmallRng::from_os_rng().random();
        let dir = std::env::temp_dir().join(format!("{tag}-{suffix:08x}"));
        fs::DirBuilder::new()
            .mode(0o755)
            .create(&dir)
            .with_context(|| format!("cannot make {}", dir.display()))?;
        Ok(Lab {
            guest: format!("{tag}-guest"),
            nat: format!("{tag}-nat"),
            server: format!("{tag}-server"),
            tag,
            dir,
            namespaces: Vec::new(),
            etc: Vec::new(),
            etc_root: None,
            kids: Vec::new(),
            stop,
            runs: 0,
            cleaned: false,
        })
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn check_stop(&self) -> Result<()> {
        if self.stopped() {
            bail!("interrupted");
        }
        Ok(())
    }

    fn steps(&mut self, t: &Tools, keep: bool) -> Result<()> {
        step(
            1,
            "Three network namespaces, linked",
            "Each is a network stack of its own on this machine, so nothing here reaches your \
             real network.",
        );
        self.namespaces_and_link(t)?;
        let w = self.server.len();
        say!(
            "   guest   {:<w$}  a machine on hubnat's segment: hubnat makes TAP {TAP} here",
            self.guest
        );
        say!(
            "   hubnat  {:<w$}  hubnat and its host sockets; the only route leads to the server",
            self.nat
        );
        say!(
            "   server  {:<w$}  {SERVER}, linked by a veth pair to {NAT_SIDE} in hubnat's",
            self.server
        );
        ok("namespaces made");

        step(
            2,
            "A web server and a DNS server in the server namespace",
            &format!(
                "They stand for the Internet: the DNS server knows one name, {NAME} \
                 ({SERVER})."
            ),
        );
        self.start_server(t)?;
        ok(&format!(
            "web server on {SERVER}:80, DNS server on {SERVER}:53"
        ));

        step(
            3,
            "hubnat, serving the guest",
            "It runs in its own namespace and makes its TAP device in the guest's; its DNS relay's \
             upstream is the server's DNS server.",
        );
        let (pid, took) = self.start_hubnat(t)?;
        ok(&format!(
            "hubnat (pid {pid}) serves: {} ms after start it sent READY=1 to $NOTIFY_SOCKET, \
             as it does to systemd",
            took.as_millis()
        ));

        step(
            4,
            "The guest leases an address from hubnat's DHCP server",
            &format!(
                "A real DHCP client ({}) asks; its hook script applies the address and the route \
                 and touches nothing else (not /etc/resolv.conf).",
                t.dhcp.name()
            ),
        );
        let lease = self.lease(t)?;
        say!("   address  {}/{}", lease.ip, lease.prefix);
        say!("   router   {} (hubnat's virtual host)", lease.router);
        say!("   DNS      {} (hubnat's DNS relay)", lease.dns);
        say!("   lease    {} s", lease.seconds);
        // For --keep: the guest's own resolv.conf (`ip netns exec` shows it as /etc/resolv.conf
        // there) names the relay, so nslookup or curl by name work in the guest.
        let _ = fs::write(
            Path::new("/etc/netns")
                .join(&self.guest)
                .join("resolv.conf"),
            format!("nameserver {}\n", lease.dns),
        );
        ok(&format!("{} leased", lease.ip));

        step(
            5,
            "The guest pings the virtual host",
            "hubnat answers ARP and ping for its own address.",
        );
        let mut argv = vec![
            t.ip.clone(),
            "netns".into(),
            "exec".into(),
            self.guest.clone().into(),
        ];
        argv.extend(t.ping.iter().cloned());
        let mut ping = argv_command(&argv);
        ping.args(["-c", "3", "-W", "2"]);
        if t.ping_interval {
            ping.args(["-i", "0.2"]);
        }
        let ping = self.run(ping.arg(lease.router.to_string()), Duration::from_secs(15))?;
        for line in ping.stdout.lines().filter(|l| {
            l.contains("transmitted") || l.contains("min/avg") || l.contains("round-trip")
        }) {
            say!("   {}", line.trim());
        }
        if !ping.ok() {
            bail!("no answer to ping from {}: {}", lease.router, ping.why());
        }
        ok(&format!("{} answers", lease.router));

        step(
            6,
            "The guest looks up a name through hubnat's DNS relay",
            &format!(
                "The guest asks {}; hubnat relays the question to its upstream, {SERVER}, and \
                 the answer back.",
                lease.dns
            ),
        );
        let look = self.in_guest(t, &["lookup", &lease.dns.to_string(), NAME])?;
        print_indented(&look.stdout);
        if !look.ok() {
            bail!("lookup of {NAME} failed: {}", look.why());
        }
        let addr: Ipv4Addr = look
            .stdout
            .split_whitespace()
            .find_map(|w| w.parse().ok())
            .ok_or_else(|| anyhow!("the lookup printed no address"))?;
        ok(&format!("{NAME} is {addr}"));

        step(
            7,
            "The guest fetches a page from the server, through the NAT",
            "hubnat ends the guest's TCP connection and opens its own, from its namespace, to the \
             server.",
        );
        let fetch = self.in_guest(t, &["fetch", &addr.to_string(), NAME])?;
        print_indented(&fetch.stdout);
        if !fetch.ok() {
            bail!("fetch from {addr} failed: {}", fetch.why());
        }
        ok("page fetched");

        step(
            8,
            "hubnat's own view: status, NAT table, DHCP table",
            "These talk to the running hubnat through its control socket.",
        );
        for cmd in ["status", "nat-table", "dhcp-table"] {
            let sock = self.dir.join("hubnat.sock");
            say!("   $ hubnat --control {} {cmd}", sock.display());
            let out = self.run(
                Command::new(&t.exe).arg("--control").arg(&sock).arg(cmd),
                Duration::from_secs(10),
            )?;
            print_indented(&out.stdout);
            if !out.ok() {
                bail!("hubnat {cmd} failed: {}", out.why());
            }
        }
        ok("hubnat answers on its control socket");

        if keep {
            self.keep(t, &lease)?;
        }
        Ok(())
    }

    /// `ip netns add` for each namespace (with an empty /etc/netns/NAME/resolv.conf, which
    /// `ip netns exec` shows as /etc/resolv.conf: no process of the demo sees, or could
    /// rewrite, the machine's own), and the veth link between hubnat's and the server's.
    fn namespaces_and_link(&mut self, t: &Tools) -> Result<()> {
        let root = Path::new("/etc/netns");
        if !root.exists() {
            self.etc_root = Some(root.to_owned());
        }
        for ns in [self.guest.clone(), self.nat.clone(), self.server.clone()] {
            if Path::new("/run/netns").join(&ns).exists() {
                bail!("namespace {ns} exists already (`ip netns del {ns}` removes it)");
            }
            self.ip(t, &["netns", "add", &ns])?;
            self.namespaces.push(ns.clone());
            let etc = Path::new("/etc/netns").join(&ns);
            fs::create_dir_all(&etc).with_context(|| format!("cannot make {}", etc.display()))?;
            self.etc.push(etc.clone());
            fs::write(etc.join("resolv.conf"), "")
                .with_context(|| format!("cannot write {}/resolv.conf", etc.display()))?;
            self.ip(t, &["-n", &ns, "link", "set", "lo", "up"])?;
        }
        let (nat, server) = (self.nat.clone(), self.server.clone());
        #[rustfmt::skip]
        self.ip(t, &["link", "add", "demo-nat", "netns", &nat, "type", "veth",
                     "peer", "name", "demo-server", "netns", &server])?;
        let nat_cidr = format!("{NAT_SIDE}/24");
        let server_cidr = format!("{SERVER}/24");
        self.ip(
            t,
            &["-n", &nat, "addr", "add", &nat_cidr, "dev", "demo-nat"],
        )?;
        self.ip(t, &["-n", &nat, "link", "set", "demo-nat", "up"])?;
        self.ip(
            t,
            &[
                "-n",
                &server,
                "addr",
                "add",
                &server_cidr,
                "dev",
                "demo-server",
            ],
        )?;
        self.ip(t, &["-n", &server, "link", "set", "demo-server", "up"])?;
        Ok(())
    }

    fn ip(&mut self, t: &Tools, args: &[&str]) -> Result<()> {
        let out = self.run(Command::new(&t.ip).args(args), Duration::from_secs(10))?;
        if !out.ok() {
            bail!("ip {}: {}", args.join(" "), out.why());
        }
        Ok(())
    }

    fn start_server(&mut self, t: &Tools) -> Result<()> {
        let log = self.dir.join("server.log");
        let mut cmd = Command::new(&t.ip);
        cmd.args(["netns", "exec", &self.server])
            .arg(&t.exe)
            .args([
                "demo-helper",
                "serve",
                "--addr",
                &SERVER.to_string(),
                "--name",
                NAME,
            ])
            .args(["--netns", &self.server]);
        self.spawn("the web and DNS server", cmd, &log, true)?;
        self.wait_for(Duration::from_secs(10), "the web and DNS server", || {
            let text = fs::read_to_string(&log).unwrap_or_default();
            text.lines().any(|l| l == "ready").then_some(())
        })
    }

    fn start_hubnat(&mut self, t: &Tools) -> Result<(u32, Duration)> {
        let config = self.dir.join("hubnat.toml");
        fs::write(
            &config,
            format!(
                "# hubnat demo: the DNS relay's only upstream is the server namespace's DNS \
                 server.\n[dns]\nupstream = [\"{SERVER}\"]\n"
            ),
        )
        .context("cannot write hubnat's configuration")?;
        // hubnat reports readiness as it does to systemd, on a socket of the demo's.
        let notify_path = self.dir.join("notify.sock");
        let notify = UnixDatagram::bind(&notify_path).context("cannot make the notify socket")?;
        notify.set_read_timeout(Some(Duration::from_millis(100)))?;
        let mut cmd = Command::new(&t.ip);
        cmd.args(["netns", "exec", &self.nat])
            .arg(&t.exe)
            .args(["run", "--tap", TAP, "--netns", &self.guest, "--config"])
            .arg(&config)
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .arg("--control")
            .arg(self.dir.join("hubnat.sock"))
            .arg("--no-reverse-lookup")
            .env("NOTIFY_SOCKET", &notify_path);
        say!(
            "   $ ip netns exec {} hubnat run --tap {TAP} --netns {} --config {} ...",
            self.nat,
            self.guest,
            config.display()
        );
        let started = Instant::now();
        let pid = self.spawn("hubnat", cmd, &self.dir.join("hubnat.log"), false)?;
        let deadline = started + Duration::from_secs(20);
        let mut buf = [0u8; 256];
        loop {
            self.check_stop()?;
            if let Ok(n) = notify.recv(&mut buf) {
                if String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .any(|l| l == "READY=1")
                {
                    return Ok((pid, started.elapsed()));
                }
            }
            if let Some(st) = self.exited("hubnat") {
                bail!("hubnat exited at start ({st})");
            }
            if Instant::now() > deadline {
                bail!("hubnat did not say it was ready within 20 s");
            }
        }
    }

    fn lease(&mut self, t: &Tools) -> Result<Lease> {
        let file = self.dir.join("lease");
        let hook = self.dir.join("dhcp-hook");
        let dir = self.dir.display().to_string();
        match &t.dhcp {
            Dhcp::Udhcpc(cmd) => {
                write_script(&hook, &UDHCPC_HOOK.replace("@DIR@", &dir))?;
                let mut argv = vec![t.ip.clone(), "netns".into(), "exec".into()];
                argv.push(self.guest.clone().into());
                argv.extend(cmd.iter().cloned());
                let mut c = argv_command(&argv);
                // One exchange and out (-q): no daemon stays behind; -n fails rather than
                // retrying forever.
                c.args(["-i", TAP, "-f", "-q", "-n", "-t", "5", "-T", "2"])
                    .args(["-x", &format!("hostname:{GUEST_NAME}"), "-s"])
                    .arg(&hook);
                let out = self.run(&mut c, Duration::from_secs(30))?;
                if !out.ok() {
                    bail!("udhcpc got no lease: {}", out.why());
                }
            }
            Dhcp::Dhclient(bin) => {
                write_script(&hook, &DHCLIENT_HOOK.replace("@DIR@", &dir))?;
                let conf = self.dir.join("dhclient.conf");
                fs::write(
                    &conf,
                    format!(
                        "send host-name \"{GUEST_NAME}\";\ntimeout 20;\n\
                         request subnet-mask, routers, domain-name-servers;\n"
                    ),
                )?;
                let mut c = Command::new(&t.ip);
                // In the foreground (-d) as a child of the demo, ended with it; its own files
                // in the demo's directory.
                c.args(["netns", "exec", &self.guest])
                    .arg(bin)
                    .args(["-d", "-v", "-1", "-sf"])
                    .arg(&hook)
                    .arg("-cf")
                    .arg(&conf)
                    .arg("-lf")
                    .arg(self.dir.join("dhclient.leases"))
                    .arg("-pf")
                    .arg(self.dir.join("dhclient.pid"))
                    .arg(TAP);
                self.spawn("dhclient", c, &self.dir.join("dhclient.log"), false)?;
                let log = self.dir.join("dhclient.log");
                self.wait_for(Duration::from_secs(30), "dhclient's lease", || {
                    file.exists().then_some(())
                })
                .map_err(|e| {
                    let tail = tail(&log, 3);
                    anyhow!("{e}: {}", tail.join(" / "))
                })?;
            }
        }
        parse_lease(&fs::read_to_string(&file).unwrap_or_default())
    }

    /// `hubnat demo-helper ARGS` in the guest namespace.
    fn in_guest(&mut self, t: &Tools, args: &[&str]) -> Result<Ran> {
        let mut c = Command::new(&t.ip);
        c.args(["netns", "exec", &self.guest])
            .arg(&t.exe)
            .arg("demo-helper")
            .args(args);
        self.run(&mut c, Duration::from_secs(15))
    }

    fn keep(&mut self, t: &Tools, lease: &Lease) -> Result<()> {
        let exe = t.exe.display();
        let sock = self.dir.join("hubnat.sock");
        say!(
            "\nLeft running (--keep). Try, in another terminal:\n\
             \x20  sudo ip netns exec {g} ping {r}\n\
             \x20  sudo ip netns exec {g} nslookup {NAME}        (the guest's resolv.conf names \
             the relay)\n\
             \x20  sudo ip netns exec {g} curl http://{NAME}/\n\
             \x20  sudo {exe} --control {s} nat-table\n\
             \x20  sudo {exe} --control {s} dhcp-table\n\
             hubnat's log: {log}\n\
             Press Ctrl-C to stop and clean up.",
            g = self.guest,
            r = lease.router,
            s = sock.display(),
            log = self.dir.join("hubnat.log").display(),
        );
        let _ = std::io::stdout().flush();
        while !self.stopped() {
            if let Some(st) = self.exited("hubnat") {
                bail!("hubnat exited ({st})");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        say!("\nCtrl-C: stopping, as asked.");
        Ok(())
    }

    /// Starts a long-lived process in a process group of its own (Ctrl-C reaches the demo
    /// only, which ends its children in order), output to `log`.
    fn spawn(&mut self, what: &str, mut cmd: Command, log: &Path, stdin: bool) -> Result<u32> {
        let out =
            fs::File::create(log).with_context(|| format!("cannot make {}", log.display()))?;
        cmd.stdout(out.try_clone()?)
            .stderr(out)
            .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
            .process_group(0);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {what}"))?;
        let pid = child.id();
        let stdin = child.stdin.take();
        self.kids.push(Kid {
            what: what.to_owned(),
            child,
            stdin,
        });
        Ok(pid)
    }

    /// The exit status of the started process `what`, once it has exited.
    fn exited(&mut self, what: &str) -> Option<ExitStatus> {
        let kid = self.kids.iter_mut().find(|k| k.what == what)?;
        kid.child.try_wait().ok().flatten()
    }

    /// Runs a short command to its end (or `within`, or Ctrl-C, which end it by its PID).
    fn run(&mut self, cmd: &mut Command, within: Duration) -> Result<Ran> {
        self.runs += 1;
        let (o, e) = (
            self.dir.join(format!("run-{}.out", self.runs)),
            self.dir.join(format!("run-{}.err", self.runs)),
        );
        let what = format!("{:?}", cmd.get_program());
        cmd.stdout(fs::File::create(&o)?)
            .stderr(fs::File::create(&e)?)
            .stdin(Stdio::null())
            .process_group(0);
        let mut child = cmd.spawn().with_context(|| format!("cannot run {what}"))?;
        let deadline = Instant::now() + within;
        let status = loop {
            if let Some(st) = child.try_wait()? {
                break st;
            }
            if self.stopped() || Instant::now() > deadline {
                kill_group(&mut child);
                self.check_stop()?;
                bail!("{what} did not finish within {} s", within.as_secs());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let ran = Ran {
            status,
            stdout: fs::read_to_string(&o).unwrap_or_default(),
            stderr: fs::read_to_string(&e).unwrap_or_default(),
        };
        let _ = (fs::remove_file(&o), fs::remove_file(&e));
        Ok(ran)
    }

    fn wait_for(
        &self,
        within: Duration,
        what: &str,
        mut ready: impl FnMut() -> Option<()>,
    ) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            self.check_stop()?;
            if ready().is_some() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("no sign of {what} within {} s", within.as_secs());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The end of each log, for a failed step.
    fn show_logs(&self) {
        for (name, file) in [
            ("hubnat", "hubnat.log"),
            ("server", "server.log"),
            ("dhclient", "dhclient.log"),
        ] {
            let lines = tail(&self.dir.join(file), 12);
            if !lines.is_empty() {
                say!("   --- {name}'s log, last lines ---");
                for l in lines {
                    say!("   {l}");
                }
            }
        }
    }

    /// Ends every process the demo started (by PID), and anything else still in its
    /// namespaces, then removes the namespaces, their /etc/netns directories and the demo's
    /// directory. Returns what was done and what could not be.
    fn cleanup(&mut self) -> (Vec<String>, Vec<String>) {
        let (mut done, mut problems) = (Vec::new(), Vec::new());
        if self.cleaned {
            return (done, problems);
        }
        self.cleaned = true;
        // The last started first: the DHCP client, then hubnat (which resets the guest's TCP
        // sessions and closes its sockets while the guest is still there), then the server.
        while let Some(mut kid) = self.kids.pop() {
            let pid = kid.child.id();
            drop(kid.stdin.take());
            match stop_child(&mut kid.child) {
                Ok(how) => done.push(format!("{} (pid {pid}) {how}", kid.what)),
                Err(e) => problems.push(format!("{} (pid {pid}): {e}", kid.what)),
            }
        }
        let ip = which("ip").unwrap_or_else(|| PathBuf::from("ip"));
        for ns in std::mem::take(&mut self.namespaces).iter().rev() {
            // A process the demo did not start itself (a client's own child) would keep the
            // namespace alive after `ip netns del`.
            let pids = Command::new(&ip)
                .args(["netns", "pids", ns])
                .stderr(Stdio::null())
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            for pid in pids
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                match kill(Pid::from_raw(pid), Signal::SIGKILL) {
                    Ok(()) => done.push(format!("ended pid {pid}, left in {ns}")),
                    Err(e) => problems.push(format!("pid {pid} in {ns}: {e}")),
                }
            }
            match Command::new(&ip).args(["netns", "del", ns]).output() {
                Ok(o) if o.status.success() => done.push(format!("deleted namespace {ns}")),
                Ok(o) => problems.push(format!(
                    "namespace {ns}: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                )),
                Err(e) => problems.push(format!("namespace {ns}: {e}")),
            }
        }
        for etc in std::mem::take(&mut self.etc) {
            if let Err(e) = fs::remove_dir_all(&etc) {
                problems.push(format!("{}: {e}", etc.display()));
            }
        }
        if let Some(root) = self.etc_root.take() {
            // Only if empty: something else may have come to use it meanwhile.
            let _ = fs::remove_dir(root);
        }
        match fs::remove_dir_all(&self.dir) {
            Ok(()) => done.push(format!(
                "removed {} and the namespaces' /etc/netns entries",
                self.dir.display()
            )),
            Err(e) => problems.push(format!("{}: {e}", self.dir.display())),
        }
        let left: Vec<String> = Command::new(&ip)
            .args(["netns", "list"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.starts_with(&format!("{}-", self.tag)))
            .map(str::to_owned)
            .collect();
        if !left.is_empty() {
            problems.push(format!("namespaces still listed: {}", left.join(", ")));
        }
        (done, problems)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Only reached with work left when something unwound past `main`'s own cleanup.
        let (_, problems) = self.cleanup();
        for p in problems {
            say_err!("hubnat demo: not cleaned: {p}");
        }
    }
}

/// SIGTERM by PID, then SIGKILL after 5 s; how it ended.
fn stop_child(child: &mut Child) -> Result<String> {
    if let Some(st) = child.try_wait()? {
        return Ok(format!("had exited ({st})"));
    }
    let pid = Pid::from_raw(i32::try_from(child.id())?);
    // The server helper may already be leaving, its standard input closed.
    let _ = kill(pid, Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if child.try_wait()?.is_some() {
            return Ok("stopped".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    kill_group(child);
    Ok("killed (it ignored SIGTERM for 5 s)".into())
}

/// SIGKILL to the process group the demo made for `child` (its PID), so that what it started
/// (a shell's children) goes with it, and reaps it.
fn kill_group(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A step's title, and why it is there (wrapped for a terminal).
fn step(n: usize, title: &str, why: &str) {
    say!("\n[{n}/{STEPS}] {title}");
    let mut line = String::new();
    for word in why.split_whitespace() {
        if !line.is_empty() && line.len() + 1 + word.len() > 88 {
            say!("   {line}");
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    say!("   {line}");
}

fn ok(what: &str) {
    say!("   ok: {what}");
    let _ = std::io::stdout().flush();
}

fn print_indented(text: &str) {
    for l in text.lines() {
        say!("   {l}");
    }
}

fn argv_command(argv: &[PathBuf]) -> Command {
    let mut c = Command::new(&argv[0]);
    c.args(&argv[1..]);
    c
}

fn tail(path: &Path, n: usize) -> Vec<String> {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| l.to_string())
        .collect()
}

fn write_script(path: &Path, body: &str) -> Result<()> {
    fs::write(path, body).with_context(|| format!("cannot write {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// udhcpc's hook: the address and the default route, and the lease recorded for the demo
/// (written whole, then renamed, so the demo never reads half of it). Nothing else of the
/// machine is touched.
const UDHCPC_HOOK: &str = r#"#!/bin/sh
case "$1" in
  deconfig)
    ip link set "$interface" up
    ip -4 addr flush dev "$interface" ;;
  bound|renew)
    ip -4 addr flush dev "$interface"
    ip addr add "$ip/$mask" dev "$interface"
    [ -z "$router" ] || ip route replace default via "${router%% *}" dev "$interface"
    printf 'ip=%s\nprefix=%s\nrouter=%s\ndns=%s\nlease=%s\n' \
      "$ip" "$mask" "${router%% *}" "${dns%% *}" "$lease" > "@DIR@/lease.part"
    mv "@DIR@/lease.part" "@DIR@/lease" ;;
esac
exit 0
"#;

/// dhclient's hook, to the same effect (its variables have other names; the mask is dotted).
const DHCLIENT_HOOK: &str = r#"#!/bin/sh
case "$reason" in
  PREINIT)
    ip link set "$interface" up ;;
  BOUND|RENEW|REBIND|REBOOT)
    ip -4 addr flush dev "$interface"
    ip addr add "$new_ip_address/$new_subnet_mask" dev "$interface"
    [ -z "$new_routers" ] || ip route replace default via "${new_routers%% *}" dev "$interface"
    printf 'ip=%s\nprefix=%s\nrouter=%s\ndns=%s\nlease=%s\n' "$new_ip_address" \
      "$new_subnet_mask" "${new_routers%% *}" "${new_domain_name_servers%% *}" \
      "$new_dhcp_lease_time" > "@DIR@/lease.part"
    mv "@DIR@/lease.part" "@DIR@/lease" ;;
esac
exit 0
"#;

/// The hooks' record: `key=value` lines; the mask as a prefix length or dotted.
fn parse_lease(text: &str) -> Result<Lease> {
    let get = |k: &str| {
        text.lines()
            .filter_map(|l| l.split_once('='))
            .find(|(key, _)| *key == k)
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_default()
    };
    let addr = |k: &str| -> Result<Ipv4Addr> {
        let v = get(k);
        v.parse()
            .map_err(|_| anyhow!("the lease has no {k} (`{v}`): hubnat sends it by default"))
    };
    let mask = get("prefix");
    let prefix = match mask.parse::<u32>() {
        Ok(p) if p <= 32 => p,
        _ => mask
            .parse::<Ipv4Addr>()
            .map(|m| u32::from(m).count_ones())
            .map_err(|_| anyhow!("the lease has no subnet mask (`{mask}`)"))?,
    };
    Ok(Lease {
        ip: addr("ip")?,
        prefix,
        router: addr("router")?,
        dns: addr("dns")?,
        seconds: get("lease"),
    })
}

/// `hubnat demo-helper`: what the demo runs inside its namespaces.
pub fn helper(op: Helper) -> Result<()> {
    match op {
        Helper::Serve { addr, name, netns } => serve(addr, &name, &netns),
        Helper::Lookup { server, name } => {
            let started = Instant::now();
            let addrs = lookup(server, &name)?;
            let ms = started.elapsed().as_millis();
            for a in addrs {
                say!("{name} has address {a} (answered by {server} in {ms} ms)");
            }
            Ok(())
        }
        Helper::Fetch { addr, host } => fetch(addr, &host),
    }
}

/// The web server and the DNS server, each on a thread, until standard input closes (the demo
/// holds its other end: it closes at cleanup, or when the demo dies however it dies).
fn serve(addr: Ipv4Addr, name: &str, netns: &str) -> Result<()> {
    let http = TcpListener::bind(SocketAddrV4::new(addr, 80))
        .with_context(|| format!("cannot listen on {addr}:80"))?;
    let dns = UdpSocket::bind(SocketAddrV4::new(addr, 53))
        .with_context(|| format!("cannot listen on {addr}:53"))?;
    let netns = netns.to_owned();
    std::thread::spawn(move || {
        for conn in http.incoming().flatten() {
            let netns = netns.clone();
            std::thread::spawn(move || answer_http(conn, &netns));
        }
    });
    let name = name.to_owned();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        loop {
            let Ok((n, from)) = dns.recv_from(&mut buf) else {
                continue;
            };
            if let Some(reply) = dns_answer(&buf[..n], &name, addr) {
                say!("dns: question from {from}");
                let _ = dns.send_to(&reply, from);
            }
        }
    });
    say!("ready");
    std::io::stdout().flush()?;
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    Ok(())
}

fn answer_http(mut conn: TcpStream, netns: &str) {
    let peer = conn
        .peer_addr()
        .map(|a| a.ip().to_string())
        .unwrap_or_default();
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let first = String::from_utf8_lossy(&head)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    say!("http: {first} from {peer}");
    let (status, body) = if first.starts_with("GET / ") {
        (
            "200 OK",
            format!(
                "Hello from the demo's web server, in namespace {netns}.\n\
                 Your connection came from {peer}: hubnat's address, not the guest's. That is \
                 the NAT.\n"
            ),
        )
    } else {
        ("404 Not Found", "Only / is here.\n".to_owned())
    };
    let _ = write!(
        conn,
        "HTTP/1.0 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
}

/// GET / and print the status line and the body; an error unless the status is 200.
fn fetch(addr: Ipv4Addr, host: &str) -> Result<()> {
    let to = SocketAddr::from((addr, 80));
    let mut conn = TcpStream::connect_timeout(&to, Duration::from_secs(5))
        .with_context(|| format!("cannot connect to {to}"))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        conn,
        "GET / HTTP/1.0\r\nHost: {host}\r\nUser-Agent: hubnat-demo\r\n\r\n"
    )?;
    let mut reply = Vec::new();
    conn.read_to_end(&mut reply)
        .with_context(|| format!("reading the answer from {to}"))?;
    let text = String::from_utf8_lossy(&reply);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.lines().next().unwrap_or_default();
    say!("GET http://{host}/ -> {status}");
    for l in BufReader::new(body.as_bytes()).lines() {
        say!("{}", l?);
    }
    if status.split_whitespace().nth(1) != Some("200") {
        bail!("{to} answered `{status}`");
    }
    Ok(())
}

/// One A query, tried twice; the addresses of the answer.
fn lookup(server: Ipv4Addr, name: &str) -> Result<Vec<Ipv4Addr>> {
    let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    sock.connect((server, 53))
        .with_context(|| format!("cannot reach {server}:53"))?;
    sock.set_read_timeout(Some(Duration::from_secs(2)))?;
    let id: u16 = SmallRng::from_os_rng().random();
    let query = dns_query(id, name)?;
    let mut buf = [0u8; 1500];
    for _ in 0..2 {
        sock.send(&query)?;
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            let Ok(n) = sock.recv(&mut buf) else {
                break;
            };
            if n >= 2 && buf[..2] == id.to_be_bytes() {
                return dns_addresses(&buf[..n], name);
            }
        }
    }
    bail!("no answer from {server}:53 within 4 s")
}

fn dns_query(id: u16, name: &str) -> Result<Vec<u8>> {
    let mut q = Vec::with_capacity(18 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    // A standard query, recursion desired, one question.
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        if label.is_empty() || label.len() > 63 {
            bail!("`{name}` is not a DNS name");
        }
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&[0, 1, 0, 1]); // type A, class IN
    Ok(q)
}

/// The name at `pos` (following compression pointers) and the position just after it.
fn read_name(msg: &[u8], mut pos: usize) -> Option<(String, usize)> {
    let mut labels = Vec::new();
    let mut after = None;
    for _ in 0..128 {
        let len = usize::from(*msg.get(pos)?);
        match len {
            0 => return Some((labels.join("."), after.unwrap_or(pos + 1))),
            l if l & 0xC0 == 0xC0 => {
                after.get_or_insert(pos + 2);
                pos = ((l & 0x3F) << 8) | usize::from(*msg.get(pos + 1)?);
            }
            l if l < 64 => {
                let label = msg.get(pos + 1..pos + 1 + l)?;
                labels.push(String::from_utf8_lossy(label).into_owned());
                pos += 1 + l;
            }
            _ => return None,
        }
    }
    None
}

/// The A records of an answer, or why there are none.
fn dns_addresses(msg: &[u8], name: &str) -> Result<Vec<Ipv4Addr>> {
    let bad = || anyhow!("malformed DNS answer ({} bytes)", msg.len());
    if msg.len() < 12 {
        return Err(bad());
    }
    match msg[3] & 0x0F {
        0 => {}
        3 => bail!("{name}: no such name (NXDOMAIN)"),
        rcode => bail!("{name}: the server answered with error {rcode}"),
    }
    let count = |i: usize| usize::from(u16::from_be_bytes([msg[i], msg[i + 1]]));
    let (questions, answers) = (count(4), count(6));
    let mut pos = 12;
    for _ in 0..questions {
        pos = read_name(msg, pos).ok_or_else(bad)?.1 + 4;
    }
    let mut found = Vec::new();
    for _ in 0..answers {
        let p = read_name(msg, pos).ok_or_else(bad)?.1;
        let head = msg.get(p..p + 10).ok_or_else(bad)?;
        let kind = u16::from_be_bytes([head[0], head[1]]);
        let class = u16::from_be_bytes([head[2], head[3]]);
        let len = usize::from(u16::from_be_bytes([head[8], head[9]]));
        let data = msg.get(p + 10..p + 10 + len).ok_or_else(bad)?;
        if kind == 1 && class == 1 && len == 4 {
            found.push(Ipv4Addr::new(data[0], data[1], data[2], data[3]));
        }
        pos = p + 10 + len;
    }
    if found.is_empty() {
        bail!("{name}: the answer has no IPv4 address");
    }
    Ok(found)
}

/// The server's answer to `query`: `addr` for `name` (type A), no record for its other
/// types, NXDOMAIN for any other name. None for what is not a plain query.
fn dns_answer(query: &[u8], name: &str, addr: Ipv4Addr) -> Option<Vec<u8>> {
    // A response, or an opcode other than QUERY, or not exactly one question.
    if query.len() < 12 || query[2] & 0xF8 != 0 || query[4..6] != [0, 1] {
        return None;
    }
    let (qname, end) = read_name(query, 12)?;
    let question = query.get(12..end + 4)?;
    let qtype = u16::from_be_bytes([query[end], query[end + 1]]);
    let known = qname.eq_ignore_ascii_case(name);
    let answer = known && qtype == 1;
    let mut r = Vec::with_capacity(question.len() + 28);
    r.extend_from_slice(&query[..2]);
    // Response, authoritative, the query's recursion-desired bit, "recursion available" (as
    // the resolvers it stands for say); NXDOMAIN for other names.
    r.push(0x84 | (query[2] & 0x01));
    r.push(0x80 | if known { 0 } else { 3 });
    r.extend_from_slice(&[0, 1, 0, u8::from(answer), 0, 0, 0, 0]);
    r.extend_from_slice(question);
    if answer {
        // The question's name (a pointer to offset 12), A, IN, 60 s, 4 bytes.
        r.extend_from_slice(&[0xC0, 0x0C, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        r.extend_from_slice(&addr.octets());
    }
    Some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dns_server_answers_its_name_and_only_it() {
        let addr = Ipv4Addr::new(10, 199, 0, 2);
        let q = dns_query(0x1234, "WWW.hubnat.demo").unwrap();
        let r = dns_answer(&q, NAME, addr).unwrap();
        assert_eq!(r[..2], [0x12, 0x34]);
        assert_eq!(dns_addresses(&r, NAME).unwrap(), vec![addr]);
        let q = dns_query(7, "other.example").unwrap();
        let r = dns_answer(&q, NAME, addr).unwrap();
        let e = dns_addresses(&r, "other.example").unwrap_err();
        assert!(e.to_string().contains("NXDOMAIN"), "{e}");
        // Its own answers (and truncated junk) are not questions.
        assert!(dns_answer(&r, NAME, addr).is_none());
        assert!(dns_answer(&q[..14], NAME, addr).is_none());
    }

    #[test]
    fn names_are_read_through_compression_pointers_and_loops_end() {
        let q = dns_query(1, NAME).unwrap();
        let r = dns_answer(&q, NAME, Ipv4Addr::LOCALHOST).unwrap();
        let answer_at = q.len();
        assert_eq!(
            read_name(&r, answer_at),
            Some((NAME.to_owned(), answer_at + 2))
        );
        // A pointer to itself.
        let mut looped = vec![0u8; 12];
        looped.extend_from_slice(&[0xC0, 12]);
        assert_eq!(read_name(&looped, 12), None);
        assert!(dns_query(1, "a..b").is_err());
    }

    #[test]
    fn leases_from_either_hook_are_read() {
        let l = parse_lease(
            "ip=192.168.30.10\nprefix=24\nrouter=192.168.30.1\ndns=192.168.30.1\nlease=7200\n",
        )
        .unwrap();
        assert_eq!(
            (l.ip, l.prefix, l.seconds.as_str()),
            (Ipv4Addr::new(192, 168, 30, 10), 24, "7200")
        );
        let l = parse_lease("ip=192.168.30.11\nprefix=255.255.255.0\nrouter=192.168.30.1\ndns=192.168.30.1\nlease=7200\n")
            .unwrap();
        assert_eq!(l.prefix, 24);
        let e =
            parse_lease("ip=192.168.30.11\nprefix=24\nrouter=\ndns=192.168.30.1\n").unwrap_err();
        assert!(e.to_string().contains("no router"), "{e}");
    }
}
