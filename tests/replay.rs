//! Replay regressions: every scenario in pcaps/ is replayed through the core and compared, frame
//! by frame, with its golden output. On a difference the first differing frame is printed
//! decoded. `HUBNAT_BLESS=1 cargo test --test replay` rewrites the golden files on purpose
//! (and the crafted inputs, from `hubnat_replay::craft`); review them with
//! `hubnat-pcap show` / `git diff --stat` before committing.
//!
//! A scenario run with `tcp_gso` also has `NAME.out.gso`, the frames the core marked as TCP
//! super-frames (`hubnat_replay::gso`): compared, blessed and reviewed with the golden output.

use std::path::{Path, PathBuf};

use hubnat_replay::{self as replay, craft, decode, gso, pcap, Script};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../pcaps")
}

fn bless() -> bool {
    std::env::var_os("HUBNAT_BLESS").is_some_and(|v| v != "0")
}

fn script_for(name: &str) -> Script {
    let p = dir().join(format!("{name}.toml"));
    match std::fs::read_to_string(&p) {
        Ok(text) => Script::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
        Err(_) => Script::default(),
    }
}

/// The super-frame marks a golden output has (none without its `NAME.out.gso`).
fn golden_marks(name: &str) -> Vec<gso::Mark> {
    let p = dir().join(format!("{name}.out.gso"));
    match std::fs::read_to_string(&p) {
        Ok(text) => gso::parse_marks(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
        Err(_) => Vec::new(),
    }
}

/// The scenario names: every NAME.in.pcap in pcaps/.
fn scenarios() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir())
        .expect("pcaps/ exists")
        .filter_map(|e| {
            let n = e.ok()?.file_name().into_string().ok()?;
            n.strip_suffix(".in.pcap").map(str::to_owned)
        })
        .collect();
    v.sort();
    v
}

#[test]
fn crafted_inputs_are_what_the_crafter_makes() {
    let mut failures = Vec::new();
    for name in craft::NAMES {
        let (text, input) = craft::build(name).unwrap();
        let path = dir().join(format!("{name}.in.pcap"));
        if bless() {
            // Written by `every_scenario_replays_to_its_golden_output`, before its replays.
            return;
        }
        let toml = std::fs::read_to_string(dir().join(format!("{name}.toml"))).unwrap_or_default();
        if toml != text {
            failures.push(format!("{name}.toml is not the crafted scenario's script"));
        }
        let committed = pcap::read(&path).unwrap_or_else(|e| panic!("{e}"));
        if let Some(m) = decode::compare(&committed, &input) {
            failures.push(format!(
                "{name}.in.pcap is not what craft::build makes:\n{m}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{}\n(regenerate on purpose with HUBNAT_BLESS=1 cargo test --test replay)",
        failures.join("\n")
    );
}

#[test]
fn every_scenario_replays_to_its_golden_output() {
    if bless() {
        for name in craft::NAMES {
            let (text, input) = craft::build(name).unwrap();
            pcap::write(&dir().join(format!("{name}.in.pcap")), &input).unwrap();
            let toml = dir().join(format!("{name}.toml"));
            if text.is_empty() {
                let _ = std::fs::remove_file(toml);
            } else {
                std::fs::write(toml, text).unwrap();
            }
        }
    }
    let names = scenarios();
    assert!(
        names.len() >= 10,
        "only {} scenarios in pcaps/",
        names.len()
    );
    let mut failures = Vec::new();
    for name in &names {
        let input = pcap::read(&dir().join(format!("{name}.in.pcap"))).unwrap();
        let script = script_for(name);
        let (got, marks) = replay::replay_marked(&script, &input);
        // Whatever the golden says, a marked frame must be one a device can cut and complete.
        for &(i, mss) in &marks {
            let f = &got[i].data;
            if !gso::partial_checksum_holds(f) || gso::cut(f, mss).is_err() {
                failures.push(format!(
                    "scenario `{name}`: frame {} is marked GSO {mss} but is no valid super-frame: {}",
                    i + 1,
                    decode::describe_marked(f, mss)
                ));
            }
        }
        let golden = dir().join(format!("{name}.out.pcap"));
        if bless() {
            pcap::write(&golden, &got).unwrap();
            let gso_file = dir().join(format!("{name}.out.gso"));
            if marks.is_empty() {
                let _ = std::fs::remove_file(gso_file);
            } else {
                std::fs::write(gso_file, gso::marks_to_text(&marks)).unwrap();
            }
            eprintln!(
                "blessed {name}: {} frames out, {} super-frames",
                got.len(),
                marks.len()
            );
            continue;
        }
        let expected = pcap::read(&golden).unwrap_or_else(|e| panic!("{e}"));
        if let Some(m) = decode::compare(&expected, &got) {
            failures.push(format!("scenario `{name}`: {m}"));
        } else if let Some(m) = gso::compare_marks(&golden_marks(name), &marks) {
            failures.push(format!("scenario `{name}`: {m}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{}\n(if the change is intended: HUBNAT_BLESS=1 cargo test --test replay, then review)",
        failures.join("\n")
    );
}

#[test]
fn replay_is_deterministic_within_a_process() {
    if bless() {
        return; // the files are being rewritten
    }
    // Two replays in one process get differently seeded hash maps: the output must not care.
    for name in scenarios() {
        let input = pcap::read(&dir().join(format!("{name}.in.pcap"))).unwrap();
        let script = script_for(&name);
        let (a, ma) = replay::replay_marked(&script, &input);
        let (b, mb) = replay::replay_marked(&script, &input);
        if let Some(m) = decode::compare(&a, &b) {
            panic!("scenario `{name}` replays differently twice: {m}");
        }
        if let Some(m) = gso::compare_marks(&ma, &mb) {
            panic!("scenario `{name}` replays differently twice: {m}");
        }
    }
}

#[test]
fn a_changed_frame_is_reported_decoded() {
    if bless() {
        return;
    }
    let input = pcap::read(&dir().join("udp.in.pcap")).unwrap();
    let script = script_for("udp");
    let mut got = replay::replay(&script, &input);
    let golden = got.clone();
    let last = got.len() - 1;
    let l = got[last].data.len();
    got[last].data[l - 1] ^= 0xff;
    let text = decode::compare(&golden, &got).unwrap().to_string();
    assert!(text.contains(&format!("frame {}", last + 1)), "{text}");
    assert!(text.contains("UDP 7 >"), "{text}");
    assert!(text.contains("bytes differ from offset"), "{text}");
}
