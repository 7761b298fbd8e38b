//! End-to-end: `hubnat demo` as a newcomer runs it. Each step must say it succeeded, and nothing
//! of the demo may be left afterwards (namespaces, processes, files), whether it ran to the end,
//! was interrupted, or failed.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{hubnat_bin, must, TempDir};

const STEPS: usize = 8;

/// A `hubnat demo` process, its output going to a file. On drop (a failed test included) it
/// is interrupted as a user would, killed by its PID if it does not end, and anything of its
/// tag still around is removed, so a failing test leaves nothing either.
struct Demo {
    child: Child,
    out: PathBuf,
    _dir: TempDir,
}

impl Demo {
    fn start(args: &[&str], env: &[(&str, &str)]) -> Demo {
        let dir = TempDir::new();
        let out = dir.join("demo.out");
        let file = std::fs::File::create(&out).unwrap();
        let mut cmd = Command::new(hubnat_bin());
        cmd.arg("demo")
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        let child = cmd.spawn().expect("hubnat demo starts");
        Demo {
            child,
            out,
            _dir: dir,
        }
    }

    fn tag(&self) -> String {
        format!("hubnat-demo-{}", self.child.id())
    }

    fn output(&self) -> String {
        common::read(&self.out)
    }

    fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args([format!("-{sig}"), self.child.id().to_string()])
            .status();
    }

    /// Waits for the demo to end by itself.
    fn wait(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                panic!(
                    "hubnat demo did not end within {} s:\n{}",
                    within.as_secs(),
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the output contains `text`.
    fn wait_for(&mut self, text: &str, within: Duration) {
        let found = common::wait_until(within, || self.output().contains(text).then_some(()));
        if found.is_none() {
            panic!("no `{text}` in the demo's output:\n{}", self.output());
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.signal("INT");
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let tag = self.tag();
        for pid in processes_with(&tag) {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
        for ns in namespaces_with(&tag) {
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
        for (dir, _) in entries_with(Path::new("/etc/netns"), &tag)
            .into_iter()
            .chain(entries_with(&std::env::temp_dir(), &tag))
        {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Network namespaces whose name starts with `tag-`.
fn namespaces_with(tag: &str) -> Vec<String> {
    let out = common::sh(Command::new("ip").args(["netns", "list"]));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&format!("{tag}-")))
        .map(str::to_owned)
        .collect()
}

/// Entries of `dir` whose name starts with `tag-`.
fn entries_with(dir: &Path, tag: &str) -> Vec<(PathBuf, String)> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with(&format!("{tag}-"))
                .then(|| (e.path(), name))
        })
        .collect()
}

/// PIDs of processes whose command line names `tag` (every process the demo keeps running
/// does: a namespace of its, or a file in its directory).
fn processes_with(tag: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(tag))
        })
        .collect()
}

/// Nothing of the demo `tag` is left: namespaces, /etc/netns entries, its directory, and the
/// processes it named in its cleanup report (by PID) or that carry its tag.
fn assert_nothing_left(tag: &str, out: &str) {
    assert!(
        out.contains("Cleaning up:"),
        "no cleanup report in the output:\n{out}"
    );
    assert!(!out.contains("NOT CLEANED"), "{out}");
    assert_eq!(namespaces_with(tag), Vec::<String>::new(), "{out}");
    assert!(
        entries_with(Path::new("/etc/netns"), tag).is_empty(),
        "/etc/netns entries left:\n{out}"
    );
    assert!(
        entries_with(&std::env::temp_dir(), tag).is_empty(),
        "files left in the temporary directory:\n{out}"
    );
    assert_eq!(processes_with(tag), Vec::<u32>::new(), "{out}");
    let pid = regex::Regex::new(r"\(pid (\d+)\)").unwrap();
    for c in pid.captures_iter(out) {
        let p = &c[1];
        // A PID reused since by something else is no process of the demo's.
        let cmdline = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        assert!(
            !cmdline.contains("hubnat") && !cmdline.contains("dhclient"),
            "pid {p} is still running: {cmdline}\n{out}"
        );
    }
}

/// Each step's header is followed by its `ok:` line before the next header.
fn assert_every_step_ok(out: &str) {
    let mut rest = out;
    for n in 1..=STEPS {
        let header = format!("[{n}/{STEPS}] ");
        let at = rest
            .find(&header)
            .unwrap_or_else(|| panic!("no step {n} in the output:\n{out}"));
        rest = &rest[at + header.len()..];
        let end = rest
            .find(&format!("[{}/{STEPS}] ", n + 1))
            .unwrap_or(rest.len());
        assert!(
            rest[..end].contains("\n   ok: ") && !rest[..end].contains("FAILED"),
            "step {n} did not succeed:\n{out}"
        );
    }
}

fn installed(name: &str) -> bool {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .any(|d| Path::new(d).join(name).exists())
}

fn run_to_the_end(client: &str) {
    let started = Instant::now();
    let mut demo = Demo::start(&["--dhcp-client", client], &[]);
    let status = demo.wait(Duration::from_secs(120));
    let out = demo.output();
    assert!(status.success(), "hubnat demo failed ({status}):\n{out}");
    assert_every_step_ok(&out);
    for want in [
        "192.168.30.1 answers",
        "www.hubnat.demo has address 10.199.0.2",
        "HTTP/1.0 200 OK",
        "came from 10.199.0.1",
        "10.199.0.2:80",
        "demo-guest",
        &match client {
            "auto" => "A real DHCP client (".to_owned(),
            _ => format!("A real DHCP client ({client})"),
        },
        "Done: all 8 steps succeeded",
    ] {
        assert!(out.contains(want), "no `{want}` in the output:\n{out}");
    }
    assert_nothing_left(&demo.tag(), &out);
    eprintln!(
        "hubnat demo with {client}: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn every_step_succeeds_and_nothing_is_left() {
    require_root!();
    run_to_the_end("auto");
    // Both clients the demo knows, where installed (CI installs both).
    for client in ["udhcpc", "dhclient"] {
        if installed(client) {
            run_to_the_end(client);
        } else {
            eprintln!("{client} not installed: not tried");
        }
    }
}

#[test]
fn ctrl_c_in_the_middle_cleans_up() {
    require_root!();
    // A ping that takes its time (first in PATH, where the demo looks), so that Ctrl-C comes
    // while step 5 runs: hubnat and the server up, the guest served, a client in its namespace.
    let slow = TempDir::new();
    let ping = slow.join("ping");
    std::fs::write(
        &ping,
        "#!/bin/sh\n[ \"$1\" = -V ] && { echo 'ping from iputils (slow stand-in)'; exit 0; }\n\
         sleep 60\n",
    )
    .unwrap();
    must(Command::new("chmod").arg("755").arg(&ping));
    let path = format!(
        "{}:{}",
        slow.0.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut demo = Demo::start(&[], &[("PATH", &path)]);
    demo.wait_for("[5/8] ", Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(300));
    demo.signal("INT");
    let status = demo.wait(Duration::from_secs(30));
    let out = demo.output();
    assert_eq!(status.code(), Some(130), "{out}");
    assert!(out.contains("Interrupted"), "{out}");
    assert!(!out.contains("Done: all"), "{out}");
    assert_nothing_left(&demo.tag(), &out);
    // The stand-in was ended with its process group, not left sleeping.
    let stand_in = slow.0.to_string_lossy().into_owned();
    assert_eq!(processes_with(&stand_in), Vec::<u32>::new(), "{out}");
}

#[test]
fn keep_runs_until_ctrl_c_then_cleans_up() {
    require_root!();
    let mut demo = Demo::start(&["--keep"], &[]);
    demo.wait_for("Press Ctrl-C", Duration::from_secs(60));
    // Still serving: the guest reaches the server through hubnat, as the demo says to try.
    let guest = format!("{}-guest", demo.tag());
    let ping = common::sh(Command::new("ip").args([
        "netns",
        "exec",
        &guest,
        "ping",
        "-c",
        "1",
        "-W",
        "2",
        "192.168.30.1",
    ]));
    assert!(ping.status.success(), "{ping:?}\n{}", demo.output());
    demo.signal("INT");
    let status = demo.wait(Duration::from_secs(30));
    let out = demo.output();
    assert!(status.success(), "{status}:\n{out}");
    assert_every_step_ok(&out);
    assert_nothing_left(&demo.tag(), &out);
}

#[test]
fn a_failing_step_says_why_and_cleans_up() {
    require_root!();
    // hubnat refuses a bad log filter at start: step 3 fails after the namespaces and the
    // server exist.
    let mut demo = Demo::start(&[], &[("HUBNAT_LOG", "no=such=filter")]);
    let status = demo.wait(Duration::from_secs(60));
    let out = demo.output();
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(out.contains("FAILED: hubnat exited at start"), "{out}");
    assert!(
        out.contains("bad log filter"),
        "hubnat's log not shown:\n{out}"
    );
    assert_nothing_left(&demo.tag(), &out);
}

#[test]
fn without_root_it_says_what_to_do() {
    require_root!();
    // As user nobody: the demo must refuse before making anything.
    let bin = hubnat_bin();
    let out = common::sh(
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&bin)
            .arg("demo"),
    );
    let text = String::from_utf8_lossy(&out.stderr);
    if text.contains("Permission denied") {
        eprintln!("skipped: {} is not executable by nobody", bin.display());
        return;
    }
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(text.contains("hubnat demo needs root"), "{text}");
    assert!(text.contains("sudo hubnat demo"), "{text}");
    assert!(text.contains("README.md, \"Run it\""), "{text}");
}
