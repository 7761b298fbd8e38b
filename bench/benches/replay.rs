//! The replay benchmark: a generated capture (N TCP uploads, M MiB of payload, mixed frame
//! sizes) replayed through the core with the simulated host side, one Driver per worker.
//!
//!   HUBNAT_BENCH_FLOWS=64 HUBNAT_BENCH_MBYTES=64 cargo bench -p hubnat-bench --bench replay
//!
//! Reports frames/s, Gbit/s (of input frame bytes), ns per frame (hdrhistogram p50/p99/p99.9,
//! one worker), the overhead against a baseline that only reads and parses the pcap, and the
//! wall-clock figures with 1 and 2 workers. "Workers" here are threads each running its own
//! Engine on the share of flows a symmetric flow hash gives it: the multi-worker runtime does
//! not exist yet, so this measures how the core shards, not the runtime.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use hubnat_bench::{parse_only, Shards};
use hubnat_replay::{gen, pcap, Driver, Frame, Script};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn replay_share(frames: &[&Frame], hist: Option<&mut Histogram<u64>>) -> (Duration, u64) {
    let script = Script::parse(gen::SCRIPT).expect("valid");
    let mut d = Driver::new(script);
    let mut outs = 0u64;
    let mut emit = |_ts: Duration, _f: &[u8]| outs += 1;
    let start = Instant::now();
    match hist {
        Some(h) => {
            for f in frames {
                let t = Instant::now();
                d.frame(f.ts, &f.data, &mut emit);
                let _ = h.record(t.elapsed().as_nanos() as u64);
            }
        }
        None => {
            for f in frames {
                d.frame(f.ts, &f.data, &mut emit);
            }
        }
    }
    d.finish(&mut emit);
    (start.elapsed(), outs)
}

fn main() {
    // `cargo bench` passes --bench; a filter argument that is not ours means "not this bench".
    if std::env::args()
        .skip(1)
        .any(|a| !a.starts_with('-') && !"replay".contains(&a))
    {
        return;
    }
    let flows = env("HUBNAT_BENCH_FLOWS", 64) as u32;
    let mbytes = env("HUBNAT_BENCH_MBYTES", 64);
    let path = std::env::temp_dir().join(format!("hubnat-bench-{}.pcap", std::process::id()));
    {
        let f = std::fs::File::create(&path).expect("temp file");
        let mut w = pcap::Writer::new(std::io::BufWriter::new(f)).expect("pcap header");
        gen::generate(flows, mbytes << 20, |ts, fr| {
            w.write(ts, fr).expect("write")
        });
    }
    let file_len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);

    // Baseline: read the pcap and parse every frame's headers.
    let t = Instant::now();
    let frames = pcap::read(&path).expect("read the generated pcap");
    let mut sink = 0u64;
    for f in &frames {
        sink = sink.wrapping_add(parse_only(&f.data));
    }
    let baseline = t.elapsed();
    std::hint::black_box(sink);
    let _ = std::fs::remove_file(&path);
    let n = frames.len() as u64;
    let bytes: u64 = frames.iter().map(|f| f.data.len() as u64).sum();

    // One worker, with the per-frame histogram.
    let all: Vec<&Frame> = frames.iter().collect();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("histogram");
    let (t1h, outs) = replay_share(&all, Some(&mut hist));
    // One worker without the clock reads around every frame (the throughput figure).
    let (t1, _) = replay_share(&all, None);

    // Two workers: shard by the runtime's router (the control thread's few frames go with
    // worker 0's); each thread replays its share.
    let shards = Shards::new(2);
    let mut shares: [Vec<&Frame>; 2] = [Vec::new(), Vec::new()];
    for f in &frames {
        shares[shards.owner(&f.data).min(1)].push(f);
    }
    let t = Instant::now();
    std::thread::scope(|s| {
        let hs: Vec<_> = shares
            .iter()
            .map(|sh| s.spawn(move || replay_share(sh, None)))
            .collect();
        for h in hs {
            h.join().expect("worker");
        }
    });
    let t2 = t.elapsed();

    let fps = |d: Duration| n as f64 / d.as_secs_f64();
    let gbps = |d: Duration| bytes as f64 * 8.0 / d.as_secs_f64() / 1e9;
    println!("replay benchmark: {flows} flows, {mbytes} MiB payload, {n} frames in ({bytes} bytes, pcap {file_len} bytes), {outs} frames out");
    println!(
        "baseline (read + parse pcap): {:.3} s, {:.0} frames/s, {:.1} ns/frame",
        baseline.as_secs_f64(),
        fps(baseline),
        baseline.as_nanos() as f64 / n as f64
    );
    for (name, d) in [("1 worker", t1), ("2 workers", t2)] {
        println!(
            "{name}: {:.3} s, {:.0} frames/s, {:.2} Gbit/s, {:.1} ns/frame (wall), overhead vs baseline {:.1} ns/frame",
            d.as_secs_f64(),
            fps(d),
            gbps(d),
            d.as_nanos() as f64 / n as f64,
            (d.as_nanos() as f64 - baseline.as_nanos() as f64) / n as f64
        );
    }
    println!(
        "1 worker, per frame (timed run, {:.3} s): p50 {} ns, p99 {} ns, p99.9 {} ns, max {} ns, mean {:.0} ns",
        t1h.as_secs_f64(),
        hist.value_at_quantile(0.50),
        hist.value_at_quantile(0.99),
        hist.value_at_quantile(0.999),
        hist.max(),
        hist.mean()
    );
    println!(
        "2-worker shares: {} / {} frames",
        shares[0].len(),
        shares[1].len()
    );
}
