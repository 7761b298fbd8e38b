//! `hubnat-chart`: turns the comparison's results (tools/compare.sh writes one JSON object a line:
//! `{round, system, metric, value, unit, ok, skipped?, note}`) into a Markdown table of medians
//! with each figure's ratio to hubnat's, and an SVG chart of the same (hand-written SVG).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::Value;

#[derive(Parser)]
#[command(
    name = "hubnat-chart",
    version,
    about = "Markdown table and SVG chart of tools/compare.sh's results"
)]
struct Cli {
    /// The results, one JSON object a line.
    #[arg(long)]
    results: PathBuf,
    /// Where to write the Markdown table ("-": stdout).
    #[arg(long)]
    markdown: Option<String>,
    /// Where to write the SVG chart.
    #[arg(long)]
    svg: Option<PathBuf>,
}

/// The reference every ratio is taken against.
const BASE: &str = "hubnat";
/// Systems in this order first, any other after them in the order met.
const ORDER: [&str; 5] = ["hubnat", "slirp4netns", "pasta", "softether", "kernel"];

#[derive(Debug, Clone, PartialEq)]
enum Cell {
    /// Median of the rounds that gave a figure, with how many did and how many ran.
    Value { v: f64, ok: usize, of: usize },
    /// Every round failed; the note of the first.
    Failed(String),
    /// Not run here, and why.
    Skipped(String),
}

struct Results {
    systems: Vec<String>,
    /// Metric keys in display order.
    metrics: Vec<String>,
    units: BTreeMap<String, String>,
    cells: BTreeMap<(String, String), Cell>,
    /// Notes of partial results (some rounds failed, fewer connections held than asked).
    partial_notes: BTreeMap<(String, String), String>,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Sort key of a metric: throughput by MTU and direction (each direction's plain row, then its
/// offloads-on row, then its IPv6 row), latency, rate, memory by count.
fn metric_rank(m: &str) -> (u32, u64, String) {
    let num = |s: &str| s.rsplit('_').next().and_then(|x| x.parse::<u64>().ok());
    let tput = |dir: u64, rest: &str| {
        let variant = if rest.starts_with("_ofl_") {
            1
        } else if rest.starts_with("6_") {
            2
        } else {
            0
        };
        (0, num(m).unwrap_or(0) * 8 + dir * 4 + variant)
    };
    let (group, n) = if let Some(rest) = m.strip_prefix("tput_up") {
        tput(0, rest)
    } else if let Some(rest) = m.strip_prefix("tput_down") {
        tput(1, rest)
    } else if m.starts_with("pps_") {
        (0, 1_000_000 + u64::from(m != "pps_up"))
    } else if m.starts_with("rr_") {
        (
            1,
            ["rr_p50", "rr_p99", "rr_p999"]
                .iter()
                .position(|x| *x == m)
                .unwrap_or(9) as u64,
        )
    } else if m.starts_with("crr_") {
        (2, u64::from(m != "crr_rate"))
    } else if m.starts_with("mem_") {
        (3, num(m).unwrap_or(0) * 2)
    } else if m.starts_with("held_") {
        (3, num(m).unwrap_or(0) * 2 + 1)
    } else if let Some(i) = ["fwd_in_", "fwd_out_", "fwd_in_addr_", "fwd_out_addr_"]
        .iter()
        .rposition(|p| m.starts_with(p))
    {
        (4, num(m).unwrap_or(0) * 4 + i as u64)
    } else {
        (5, 0)
    };
    (group, n, m.to_owned())
}

/// A readable name for a metric, and whether a higher figure is the better one.
fn describe(m: &str) -> (String, bool) {
    let tail = m.rsplit('_').next().unwrap_or("");
    match m {
        _ if m.starts_with("tput_up_ofl_") => (
            format!("iperf3 guest → server, MTU {tail}, guest offloads on"),
            true,
        ),
        _ if m.starts_with("tput_down_ofl_") => (
            format!("iperf3 server → guest, MTU {tail}, guest offloads on"),
            true,
        ),
        _ if m.starts_with("tput_up6_") => {
            (format!("iperf3 guest → server over IPv6, MTU {tail}"), true)
        }
        _ if m.starts_with("tput_down6_") => {
            (format!("iperf3 server → guest over IPv6, MTU {tail}"), true)
        }
        _ if m.starts_with("tput_up_") => (format!("iperf3 guest → server, MTU {tail}"), true),
        _ if m.starts_with("tput_down_") => (format!("iperf3 server → guest, MTU {tail}"), true),
        "pps_up" => ("UDP 64-byte datagrams guest → server".into(), true),
        "pps_down" => ("UDP 64-byte datagrams server → guest".into(), true),
        "rr_p50" => ("request/response p50".into(), false),
        "rr_p99" => ("request/response p99".into(), false),
        "rr_p999" => ("request/response p99.9".into(), false),
        "crr_rate" => ("connection rate (connect, exchange, close)".into(), true),
        "crr_p50" => ("connect, exchange, close: p50".into(), false),
        _ if m.starts_with("mem_") => (format!("peak RSS, {tail} idle TCP connections"), false),
        _ if m.starts_with("held_") => (format!("connections held of {tail}"), true),
        _ if m.starts_with("fwd_in_addr_") => (
            format!("iperf3 forwarded, client on the NAT side's address → guest, MTU {tail}"),
            true,
        ),
        _ if m.starts_with("fwd_out_addr_") => (
            format!("iperf3 forwarded, guest → client on the NAT side's address, MTU {tail}"),
            true,
        ),
        _ if m.starts_with("fwd_in_") => (
            format!("iperf3 forwarded, client on 127.0.0.1 → guest, MTU {tail}"),
            true,
        ),
        _ if m.starts_with("fwd_out_") => (
            format!("iperf3 forwarded, guest → client on 127.0.0.1, MTU {tail}"),
            true,
        ),
        _ => (m.to_owned(), true),
    }
}

/// The unit a metric is written in, where no result line named one.
fn default_unit(m: &str) -> &'static str {
    match m {
        _ if m.starts_with("tput_") || m.starts_with("fwd_") => "Gbit/s",
        "crr_rate" => "conn/s",
        _ if m.starts_with("rr_") || m.starts_with("crr_") => "µs",
        _ if m.starts_with("mem_") => "MiB",
        _ if m.starts_with("held_") => "conns",
        _ => "",
    }
}

fn load(text: &str) -> Result<Results> {
    let mut systems: Vec<String> = Vec::new();
    let mut metrics = BTreeSet::new();
    let mut units = BTreeMap::new();
    // (system, metric) -> (values, runs, first failure, skip note, partial note)
    type Acc = (
        Vec<f64>,
        usize,
        Option<String>,
        Option<String>,
        Option<String>,
    );
    let mut acc: BTreeMap<(String, String), Acc> = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value =
            serde_json::from_str(line).with_context(|| format!("results line {}", i + 1))?;
        let field = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
        let (system, metric, note) = (field("system"), field("metric"), field("note"));
        if system.is_empty() || metric.is_empty() {
            bail!("results line {}: no system or metric", i + 1);
        }
        if !systems.contains(&system) {
            systems.push(system.clone());
        }
        metrics.insert(metric.clone());
        let unit = field("unit");
        if !unit.is_empty() {
            units.insert(metric.clone(), unit);
        }
        let e = acc.entry((system, metric)).or_default();
        let ok = v.get("ok").and_then(Value::as_bool).unwrap_or(false);
        let skipped = v.get("skipped").and_then(Value::as_bool).unwrap_or(false);
        match v.get("value").and_then(Value::as_f64) {
            Some(x) if ok && x.is_finite() => {
                e.0.push(x);
                e.1 += 1;
                if !note.is_empty() {
                    e.4.get_or_insert(note);
                }
            }
            _ if skipped => {
                e.3.get_or_insert(note);
            }
            _ => {
                e.1 += 1;
                e.2.get_or_insert(if note.is_empty() {
                    "failed".into()
                } else {
                    note
                });
            }
        }
    }
    systems.sort_by_key(|s| ORDER.iter().position(|o| o == s).unwrap_or(ORDER.len()));
    for m in &metrics {
        if !units.contains_key(m) && !default_unit(m).is_empty() {
            units.insert(m.clone(), default_unit(m).to_owned());
        }
    }
    let mut metrics: Vec<String> = metrics.into_iter().collect();
    metrics.sort_by_key(|m| metric_rank(m));
    let mut cells = BTreeMap::new();
    let mut partial_notes = BTreeMap::new();
    for (key, (mut vals, runs, fail, skip, partial)) in acc {
        let cell = if !vals.is_empty() {
            let ok = vals.len();
            if let Some(n) = partial.or(if ok < runs { fail } else { None }) {
                partial_notes.insert(key.clone(), n);
            }
            Cell::Value {
                v: median(&mut vals),
                ok,
                of: runs,
            }
        } else if let Some(f) = fail {
            Cell::Failed(f)
        } else {
            Cell::Skipped(skip.unwrap_or_else(|| "not run".into()))
        };
        cells.insert(key, cell);
    }
    Ok(Results {
        systems,
        metrics,
        units,
        cells,
        partial_notes,
    })
}

fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

impl Results {
    fn value(&self, system: &str, metric: &str) -> Option<f64> {
        match self.cells.get(&(system.to_owned(), metric.to_owned())) {
            Some(Cell::Value { v, .. }) => Some(*v),
            _ => None,
        }
    }

    fn ratio(&self, system: &str, metric: &str) -> Option<f64> {
        let base = self.value(BASE, metric).filter(|b| *b != 0.0)?;
        Some(self.value(system, metric)? / base)
    }

    fn markdown(&self) -> String {
        let mut notes: Vec<String> = Vec::new();
        let mut note_ref = |text: String| -> usize {
            match notes.iter().position(|n| *n == text) {
                Some(i) => i + 1,
                None => {
                    notes.push(text);
                    notes.len()
                }
            }
        };
        let mut out = String::new();
        out.push_str("| figure |");
        for s in &self.systems {
            let _ = write!(out, " {s} |");
        }
        out.push_str("\n|---|");
        for _ in &self.systems {
            out.push_str("---:|");
        }
        out.push('\n');
        for m in &self.metrics {
            let (label, higher) = describe(m);
            let unit = self.units.get(m).map(String::as_str).unwrap_or("");
            let better = if higher { "higher" } else { "lower" };
            let _ = write!(out, "| {label} ({unit}; {better} is better) |");
            for s in &self.systems {
                let key = (s.clone(), m.clone());
                let text = match self.cells.get(&key) {
                    None => String::new(),
                    Some(Cell::Value { v, ok, of }) => {
                        let mut t = fmt_num(*v);
                        if s != BASE {
                            if let Some(r) = self.ratio(s, m) {
                                let _ = write!(t, " ({}×)", fmt_num(r));
                            }
                        }
                        if ok < of {
                            let _ = write!(t, " [{ok} of {of} rounds]");
                        }
                        if let Some(n) = self.partial_notes.get(&key) {
                            let _ = write!(t, " [^{}]", note_ref(format!("{s}: {n}")));
                        }
                        t
                    }
                    Some(Cell::Failed(n)) => {
                        format!("failed [^{}]", note_ref(format!("{s}: {n}")))
                    }
                    Some(Cell::Skipped(n)) => format!("— [^{}]", note_ref(format!("{s}: {n}"))),
                };
                let _ = write!(out, " {} |", text.replace('|', "\\|"));
            }
            out.push('\n');
        }
        if !notes.is_empty() {
            out.push('\n');
            for (i, n) in notes.iter().enumerate() {
                let _ = writeln!(out, "[^{}]: {}", i + 1, n.replace('\n', " "));
            }
        }
        out
    }

    fn svg(&self) -> String {
        const COLORS: [&str; 8] = [
            "#d9480f", "#1c7ed6", "#2f9e44", "#7048e8", "#868e96", "#e8590c", "#0ca678", "#c2255c",
        ];
        let (w, left, bar_w, row_h, head_h, gap) = (900.0, 150.0, 560.0, 18.0, 24.0, 14.0);
        let n = self.systems.len().max(1) as f64;
        let panel_h = head_h + n * row_h + gap;
        let h = 40.0 + panel_h * self.metrics.len() as f64;
        let mut o = String::new();
        let _ = writeln!(
            o,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(o, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
        let _ = writeln!(
            o,
            r#"<text x="10" y="24" font-size="16" font-weight="bold">hubnat and its peers (medians; ratio to hubnat in brackets)</text>"#
        );
        for (pi, m) in self.metrics.iter().enumerate() {
            let y0 = 40.0 + panel_h * pi as f64;
            let (label, higher) = describe(m);
            let unit = self.units.get(m).map(String::as_str).unwrap_or("");
            let better = if higher { "higher" } else { "lower" };
            let _ = writeln!(
                o,
                r#"<text x="10" y="{}" font-weight="bold">{} ({}; {better} is better)</text>"#,
                y0 + 16.0,
                esc(&label),
                esc(unit)
            );
            let max = self
                .systems
                .iter()
                .filter_map(|s| self.value(s, m))
                .fold(0.0f64, f64::max);
            for (si, s) in self.systems.iter().enumerate() {
                let y = y0 + head_h + row_h * si as f64;
                let color = COLORS[si % COLORS.len()];
                let _ = writeln!(
                    o,
                    r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
                    left - 8.0,
                    y + 12.0,
                    esc(s)
                );
                let text = match self.cells.get(&(s.clone(), m.clone())) {
                    Some(Cell::Value { v, .. }) => {
                        let len = if max > 0.0 { bar_w * v / max } else { 0.0 };
                        let _ = writeln!(
                            o,
                            r##"<rect x="{left}" y="{}" width="{len:.1}" height="{}" fill="{color}"/>"##,
                            y + 2.0,
                            row_h - 4.0
                        );
                        let mut t = format!("{} {}", fmt_num(*v), unit);
                        if s != BASE {
                            if let Some(r) = self.ratio(s, m) {
                                let _ = write!(t, " ({}×)", fmt_num(r));
                            }
                        }
                        (left + len + 6.0, t)
                    }
                    Some(Cell::Failed(_)) => (left + 6.0, "failed".to_owned()),
                    Some(Cell::Skipped(_)) => (left + 6.0, "not run".to_owned()),
                    None => (left + 6.0, String::new()),
                };
                let _ = writeln!(
                    o,
                    r##"<text x="{:.1}" y="{}" fill="#333">{}</text>"##,
                    text.0,
                    y + 12.0,
                    esc(&text.1)
                );
            }
        }
        o.push_str("</svg>\n");
        o
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let text = std::fs::read_to_string(&cli.results)
        .with_context(|| format!("read {}", cli.results.display()))?;
    let r = load(&text)?;
    if let Some(p) = &cli.svg {
        std::fs::write(p, r.svg()).with_context(|| format!("write {}", p.display()))?;
    }
    match cli.markdown.as_deref() {
        Some("-") => print!("{}", r.markdown()),
        Some(p) => std::fs::write(p, r.markdown()).with_context(|| format!("write {p}"))?,
        None => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
{"round":1,"system":"pasta","metric":"tput_up_1500","value":2.0,"unit":"Gbit/s","ok":true,"note":""}
{"round":1,"system":"hubnat","metric":"tput_up_1500","value":4.0,"unit":"Gbit/s","ok":true,"note":""}
{"round":2,"system":"hubnat","metric":"tput_up_1500","value":6.0,"unit":"Gbit/s","ok":true,"note":""}
{"round":1,"system":"hubnat","metric":"rr_p50","value":null,"unit":"","ok":false,"note":"connect: refused"}
{"round":1,"system":"pasta","metric":"rr_p50","value":30.5,"unit":"µs","ok":true,"note":""}
{"round":1,"system":"kernel","metric":"mem_1000","value":null,"unit":"","ok":false,"skipped":true,"note":"no NAT process"}
{"round":1,"system":"softether","metric":"tput_up_1500","value":null,"unit":"","ok":false,"note":"iperf3: timeout"}
{"round":2,"system":"softether","metric":"tput_up_1500","value":0.2,"unit":"Gbit/s","ok":true,"note":""}
"#;

    #[test]
    fn medians_ratios_failures_and_skips() {
        let r = load(SAMPLE).unwrap();
        assert_eq!(r.systems, ["hubnat", "pasta", "softether", "kernel"]);
        assert_eq!(r.metrics, ["tput_up_1500", "rr_p50", "mem_1000"]);
        assert_eq!(r.value("hubnat", "tput_up_1500"), Some(5.0));
        assert_eq!(r.ratio("pasta", "tput_up_1500"), Some(0.4));
        // hubnat failed: no ratio for the others.
        assert_eq!(r.ratio("pasta", "rr_p50"), None);
        let md = r.markdown();
        let tput = md.lines().find(|l| l.contains("MTU 1500")).unwrap();
        assert!(tput.contains("| 5.00 | 2.00 (0.400×) | 0.200 (0.040×) [1 of 2 rounds]"));
        let rr = md
            .lines()
            .find(|l| l.contains("request/response p50"))
            .unwrap();
        assert!(rr.contains("failed [^"), "{rr}");
        assert!(rr.contains("| 30.5 |"), "{rr}");
        assert!(md.contains("hubnat: connect: refused"));
        assert!(md.contains("kernel: no NAT process"));
        assert!(md.contains("softether: iperf3: timeout"));
        let svg = r.svg();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("2.00 Gbit/s (0.400×)"));
        assert!(svg.contains(">failed<"));
    }

    #[test]
    fn bad_lines_are_errors() {
        assert!(load("{not json").is_err());
        assert!(load(r#"{"metric":"x"}"#).is_err());
        assert!(load("\n\n").unwrap().metrics.is_empty());
    }

    #[test]
    fn offloads_on_rows_follow_their_plain_rows_and_say_so() {
        let mut m = vec![
            "tput_down_ofl_1500",
            "tput_up_65520",
            "tput_down_1500",
            "tput_up_ofl_1500",
            "tput_up_1500",
        ];
        m.sort_by_key(|m| metric_rank(m));
        assert_eq!(
            m,
            [
                "tput_up_1500",
                "tput_up_ofl_1500",
                "tput_down_1500",
                "tput_down_ofl_1500",
                "tput_up_65520"
            ]
        );
        assert_eq!(
            describe("tput_down_ofl_1500"),
            (
                "iperf3 server → guest, MTU 1500, guest offloads on".to_owned(),
                true
            )
        );
        assert_eq!(default_unit("tput_up_ofl_1500"), "Gbit/s");
    }

    #[test]
    fn ipv6_rows_follow_their_direction_and_say_so() {
        let mut m = vec![
            "tput_down6_1500",
            "tput_up_65520",
            "pps_up",
            "tput_down_1500",
            "tput_up6_1500",
            "tput_up_ofl_1500",
            "tput_up_1500",
        ];
        m.sort_by_key(|m| metric_rank(m));
        assert_eq!(
            m,
            [
                "tput_up_1500",
                "tput_up_ofl_1500",
                "tput_up6_1500",
                "tput_down_1500",
                "tput_down6_1500",
                "tput_up_65520",
                "pps_up"
            ]
        );
        assert_eq!(
            describe("tput_up6_1500"),
            ("iperf3 guest → server over IPv6, MTU 1500".to_owned(), true)
        );
        assert_eq!(
            describe("tput_down6_65520"),
            (
                "iperf3 server → guest over IPv6, MTU 65520".to_owned(),
                true
            )
        );
        assert_eq!(default_unit("tput_down6_1500"), "Gbit/s");
    }

    #[test]
    fn even_median() {
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
    }
}
