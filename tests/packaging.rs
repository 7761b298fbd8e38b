//! What tools/install.sh installs: the man pages and completions `hubnat generate` makes from
//! the CLI, the systemd unit (accepted by `systemd-analyze verify`, and enough for hubnat: it
//! starts, serves and reports readiness with only the unit's capabilities), the example
//! configuration, and the install itself (staged in a temporary directory).

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{hubnat_bin, must, TempDir};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn unit_text() -> String {
    std::fs::read_to_string(repo().join("tools/systemd/hubnat.service")).unwrap()
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Skips (with a message) where `tool` is missing; CI installs it, so there it must be.
macro_rules! require_tool {
    ($tool:expr) => {
        if !have($tool) {
            if std::env::var_os("CI").is_some() {
                panic!("{} is missing, and CI must run this test", $tool);
            }
            eprintln!("skipped: {} is not installed", $tool);
            return;
        }
    };
}

/// The subcommands `hubnat --help` lists (without `help`).
fn subcommands() -> Vec<String> {
    let help = must(Command::new(hubnat_bin()).arg("--help"));
    let mut names = Vec::new();
    let mut in_commands = false;
    for line in help.lines() {
        if line.starts_with("Commands:") {
            in_commands = true;
            continue;
        }
        if in_commands {
            if !line.starts_with("  ") {
                break;
            }
            let name = line.split_whitespace().next().unwrap_or_default();
            if !name.is_empty() && name != "help" {
                names.push(name.to_owned());
            }
        }
    }
    assert!(names.len() > 10, "too few subcommands in --help:\n{help}");
    names
}

#[test]
fn man_pages_name_every_subcommand_and_render() {
    let dir = TempDir::new();
    let out = must(
        Command::new(hubnat_bin())
            .args(["generate", "man"])
            .arg(dir.join("man")),
    );
    let written: BTreeSet<String> = out
        .lines()
        .map(|l| {
            Path::new(l)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let main = std::fs::read_to_string(dir.join("man/hubnat.1")).unwrap();
    assert!(
        main.starts_with(".ie") || main.contains(".TH hubnat 1"),
        "{main}"
    );
    for sub in subcommands() {
        assert!(
            // roff escapes every '-'.
            main.contains(&format!("hubnat\\-{}(1)", sub.replace('-', "\\-"))),
            "hubnat.1 does not name {sub}"
        );
        assert!(
            written.contains(&format!("hubnat-{sub}.1")),
            "no page for {sub}: {written:?}"
        );
    }
    // Internal subcommands stay out of sight.
    assert!(
        !main.contains("demo\\-helper") && !main.contains("generate"),
        "{main}"
    );
    let run = std::fs::read_to_string(dir.join("man/hubnat-run.1")).unwrap();
    assert!(
        run.contains("\\-\\-netns") && run.contains("\\-\\-tap"),
        "{run}"
    );

    require_tool!("man");
    let rendered = must(
        Command::new("man")
            .args(["-P", "cat", "-l"])
            .arg(dir.join("man/hubnat.1"))
            .env("MANWIDTH", "100"),
    );
    assert!(rendered.contains("SUBCOMMANDS"), "{rendered}");
    assert!(rendered.contains("hubnat-demo(1)"), "{rendered}");
    let rendered = must(
        Command::new("man")
            .args(["-P", "cat", "-l"])
            .arg(dir.join("man/hubnat-run.1"))
            .env("MANWIDTH", "100"),
    );
    assert!(rendered.contains("--state-dir"), "{rendered}");
}

#[test]
fn completions_for_bash_zsh_and_fish() {
    let dir = TempDir::new();
    for (shell, file) in [
        ("bash", "hubnat.bash"),
        ("zsh", "_hubnat"),
        ("fish", "hubnat.fish"),
    ] {
        let out = must(
            Command::new(hubnat_bin())
                .args(["generate", "completions", shell])
                .arg(dir.join(shell)),
        );
        assert_eq!(out.trim(), dir.join(shell).join(file).to_str().unwrap());
        let text = std::fs::read_to_string(dir.join(shell).join(file)).unwrap();
        for word in ["demo", "nat-table", "--netns"] {
            assert!(text.contains(word), "{shell} completions lack {word}");
        }
        assert!(
            !text.contains("demo-helper"),
            "{shell}: internal subcommand shown"
        );
    }
    if have("bash") {
        must(
            Command::new("bash")
                .arg("-n")
                .arg(dir.join("bash/hubnat.bash")),
        );
    }
    let bad = common::sh(Command::new(hubnat_bin()).args([
        "generate",
        "completions",
        "tcsh",
        "/nonexistent",
    ]));
    assert!(!bad.status.success());
}

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    require_tool!("systemd-analyze");
    let dir = TempDir::new();
    // The unit as tools/install.sh writes it, with ExecStart at this build's binary (verify
    // checks that the program exists).
    let unit = unit_text().replace("/usr/local/bin/hubnat", hubnat_bin().to_str().unwrap());
    let path = dir.join("hubnat.service");
    std::fs::write(&path, unit).unwrap();
    let out = common::sh(
        Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&path),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    // verify exits 0 on unknown keys and bad values ("ignoring"): those lines name the file.
    let about_unit: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("hubnat.service"))
        .collect();
    assert!(
        out.status.success() && about_unit.is_empty(),
        "systemd-analyze verify: {}\n{stderr}",
        out.status
    );
    // Its readiness protocol is the one hubnat speaks.
    let text = unit_text();
    assert!(text.contains("\nType=notify\n"), "{text}");
}

/// The unit's CapabilityBoundingSet, as setpriv names capabilities (`+net_admin,...`).
fn unit_capabilities() -> String {
    let text = unit_text();
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit bounds the capabilities");
    line.split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_ascii_lowercase()))
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn hubnat_serves_with_only_the_units_capabilities_and_notifies_readiness() {
    require_root!();
    require_tool!("setpriv");
    // hubnat as the unit starts it: root, its bounding set (which, for root, is what an
    // exec'd program gets), no-new-privs; readiness to a notification socket of the test's.
    let mut lab = common::Lab::bare_with_server();
    let notify_path = lab.dir.join("notify");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let bounding = format!("-all,{}", unit_capabilities());
    let env = format!("NOTIFY_SOCKET={}", notify_path.display());
    lab.start_hubnat_wrapped(
        "",
        &[],
        &[
            "env",
            &env,
            "setpriv",
            "--bounding-set",
            &bounding,
            "--no-new-privs",
            "--",
        ],
    );
    let mut buf = [0u8; 256];
    let n = notify
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no readiness from hubnat: {e}\n{}", lab.hubnat_log()));
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg}");
    // Serving: a guest gets a lease and the virtual host answers.
    let hook = lab.write_script(
        "hook",
        "#!/bin/sh\n[ \"$1\" = bound ] && ip addr add $ip/$mask dev $interface\nexit 0\n",
    );
    let lease = lab.guest.exec(&[
        "busybox",
        "udhcpc",
        "-i",
        "tap0",
        "-f",
        "-q",
        "-n",
        "-t",
        "5",
        "-T",
        "1",
        "-s",
        hook.to_str().unwrap(),
    ]);
    assert!(lease.status.success(), "{lease:?}\n{}", lab.hubnat_log());
    let ping = lab
        .guest
        .exec(&["ping", "-c", "1", "-W", "2", "192.168.30.1"]);
    assert!(ping.status.success(), "{ping:?}\n{}", lab.hubnat_log());
    let log = lab.hubnat_log();
    assert!(log.contains("sandbox: running as user"), "{log}");
    // SIGTERM: STOPPING=1, then a clean exit.
    let status = lab.hubnat.as_mut().unwrap().stop(Duration::from_secs(10));
    let n = notify
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no STOPPING=1 from hubnat: {e}\n{}", lab.hubnat_log()));
    assert!(
        String::from_utf8_lossy(&buf[..n])
            .lines()
            .any(|l| l == "STOPPING=1"),
        "{}",
        lab.hubnat_log()
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        lab.hubnat_log()
    );
}

#[test]
fn the_example_configuration_is_valid() {
    let text = std::fs::read_to_string(repo().join("tools/systemd/hubnat.toml")).unwrap();
    let raw = hubnat_core::config::RawConfig::from_toml(&text).unwrap_or_else(|e| panic!("{e}"));
    hubnat_core::config::Config::from_raw(&raw).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn install_sh_stages_everything_and_dry_run_changes_nothing() {
    let dir = TempDir::new();
    let script = repo().join("tools/install.sh");
    let stage = dir.join("stage");
    let dry = must(
        Command::new("bash")
            .arg(&script)
            .args(["--dry-run", "--destdir"])
            .arg(&stage)
            .arg("--bin")
            .arg(hubnat_bin())
            .arg("/usr"),
    );
    assert!(dry.contains("dry run: nothing was changed"), "{dry}");
    assert!(!stage.exists(), "--dry-run wrote {}", stage.display());
    let out = must(
        Command::new("bash")
            .arg(&script)
            .arg("--destdir")
            .arg(&stage)
            .arg("--bin")
            .arg(hubnat_bin())
            .arg("/usr"),
    );
    for f in [
        "usr/bin/hubnat",
        "usr/share/man/man1/hubnat.1",
        "usr/share/man/man1/hubnat-run.1",
        "usr/share/man/man1/hubnat-demo.1",
        "usr/share/bash-completion/completions/hubnat",
        "usr/share/zsh/site-functions/_hubnat",
        "usr/share/fish/vendor_completions.d/hubnat.fish",
        "etc/systemd/system/hubnat.service",
        "etc/hubnat/hubnat.toml",
    ] {
        let p = stage.join(f);
        assert!(p.is_file(), "{f} not installed:\n{out}");
        // Every line the dry run printed, the real run did.
        assert!(
            dry.contains(p.to_str().unwrap()),
            "dry run did not list {f}:\n{dry}"
        );
    }
    let unit = std::fs::read_to_string(stage.join("etc/systemd/system/hubnat.service")).unwrap();
    assert!(
        unit.contains("\nExecStart=/usr/bin/hubnat run --config /etc/hubnat/hubnat.toml\n"),
        "{unit}"
    );
    // A second run keeps the operator's configuration.
    std::fs::write(stage.join("etc/hubnat/hubnat.toml"), "# mine\n").unwrap();
    must(
        Command::new("bash")
            .arg(&script)
            .arg("--destdir")
            .arg(&stage)
            .arg("--bin")
            .arg(hubnat_bin())
            .arg("/usr"),
    );
    assert_eq!(
        std::fs::read_to_string(stage.join("etc/hubnat/hubnat.toml")).unwrap(),
        "# mine\n"
    );
    assert!(stage.join("etc/hubnat/hubnat.toml.example").is_file());
}
