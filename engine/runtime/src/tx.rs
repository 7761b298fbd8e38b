//! Frames toward the guest, and how the guest's kernel takes them in.
//!
//! A TAP write is where the guest's kernel receives the frame. Written plainly, the guest's
//! whole receive path (IP, TCP, the socket wake-up) runs inside the write, one frame at a time:
//! on a download that is the largest share of a worker's time. With the device's NAPI polls in
//! kernel threads, a write only queues the frame; the poll thread takes the queue in batches,
//! overlapped with hubnat's next writes, and the guest's GRO merges consecutive segments. But
//! every frame then waits for that thread to be woken, which a request/response exchange feels
//! in full. So `NapiSwitch` switches the polls to threads while the threads carrying flows write
//! large batches of large frames (a bulk transfer), and back to softirq context (inside the
//! write, as plain) when the batches or the frames are small again.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::capture::Capture;
use crate::port::switch::Switch;
use crate::port::tap::{NapiThreading, Tap, TapWriter};
use hubnat_core::output::FrameBatch;

/// Frames per batch, on average over a look's window, from which the traffic is a bulk
/// transfer's (tenths). A request/response exchange writes one frame per batch; a download,
/// even where frames are handed between threads in small groups, writes several.
const BULK_MEAN_BATCH_X10: u64 = 20;
const SOFTIRQ_MEAN_BATCH_X10: u64 = 15;

/// Mean frame size (bytes) from which the traffic is a bulk transfer's, and below which it no
/// longer is. Many small frames in large batches are not a transfer but many small exchanges
/// at once (a DNS load, an upload's ACKs): GRO has nothing to merge in them, and the poll
/// thread's wake-up per frame costs them what it costs request/response (measured: a DNS load
/// through the relay switched to threads and lost a third of its rate).
const BULK_MEAN_FRAME: u64 = 1024;
const SOFTIRQ_MEAN_FRAME: u64 = 512;

/// How often the bulk rate is looked at (at most; only when frames are written).
const WINDOW: Duration = Duration::from_millis(20);

/// Frames per second above which the polls go to threads (about 60 Mbit/s of full-size frames)
/// when batches are large enough, and below which they come back. Apart, so the mode does not
/// flap. Low: it is the batch size that tells a transfer from request/response traffic, and a
/// slow transfer gains from the threads too.
const THREADED_ABOVE: u64 = 5_000;
const SOFTIRQ_BELOW: u64 = 2_000;

/// Decides, from the frames the writing threads report, where the TAP's NAPI polls run.
pub struct NapiSwitch {
    set: Box<dyn Fn(bool) -> io::Result<()> + Send + Sync>,
    base: Instant,
    frames: AtomicU64,
    bytes: AtomicU64,
    batches: AtomicU64,
    /// Nanoseconds after `base` before which nobody looks at the rate again.
    next_look: AtomicU64,
    state: Mutex<SwitchState>,
}

#[derive(Default)]
struct SwitchState {
    threaded: bool,
    /// `frames`, `bytes`, `batches` and the time at the last look.
    frames_then: u64,
    bytes_then: u64,
    batches_then: u64,
    then: u64,
    switches: u64,
    /// The switch failed once: it is left as it is from then on.
    broken: bool,
}

impl NapiSwitch {
    /// A switch driving the device's `threaded` attribute, starting in softirq mode.
    pub fn new(threading: NapiThreading) -> NapiSwitch {
        NapiSwitch::with_setter(Box::new(move |on| threading.set(on)))
    }

    fn with_setter(set: Box<dyn Fn(bool) -> io::Result<()> + Send + Sync>) -> NapiSwitch {
        NapiSwitch {
            set,
            base: Instant::now(),
            frames: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            // The first look needs a window behind it to measure a rate over.
            next_look: AtomicU64::new(WINDOW.as_nanos() as u64),
            state: Mutex::new(SwitchState::default()),
        }
    }

    /// Reports a batch of `frames` frames, `bytes` in all, about to be written.
    pub fn note(&self, frames: usize, bytes: usize) {
        self.note_at(frames, bytes, self.base.elapsed().as_nanos() as u64);
    }

    fn note_at(&self, frames: usize, bytes: usize, now: u64) {
        self.frames.fetch_add(frames as u64, Ordering::Relaxed);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.batches.fetch_add(1, Ordering::Relaxed);
        if now < self.next_look.load(Ordering::Relaxed) {
            return;
        }
        // Another thread is looking: its look covers this batch too.
        let Ok(mut st) = self.state.try_lock() else {
            return;
        };
        if now < self.next_look.load(Ordering::Relaxed) || st.broken {
            return;
        }
        self.next_look
            .store(now + WINDOW.as_nanos() as u64, Ordering::Relaxed);
        let frames = self.frames.load(Ordering::Relaxed);
        let bytes = self.bytes.load(Ordering::Relaxed);
        let batches = self.batches.load(Ordering::Relaxed);
        let (df, db) = (frames - st.frames_then, batches - st.batches_then);
        let rate = df.saturating_mul(1_000_000_000) / (now - st.then).max(1);
        let mean_x10 = df * 10 / db.max(1);
        let mean_frame = (bytes - st.bytes_then) / df.max(1);
        st.frames_then = frames;
        st.bytes_then = bytes;
        st.batches_then = batches;
        st.then = now;
        let want = if st.threaded {
            rate >= SOFTIRQ_BELOW
                && mean_x10 >= SOFTIRQ_MEAN_BATCH_X10
                && mean_frame >= SOFTIRQ_MEAN_FRAME
        } else {
            rate >= THREADED_ABOVE
                && mean_x10 >= BULK_MEAN_BATCH_X10
                && mean_frame >= BULK_MEAN_FRAME
        };
        if want == st.threaded {
            return;
        }
        match (self.set)(want) {
            Ok(()) => {
                st.threaded = want;
                st.switches += 1;
                tracing::debug!(
                    "TAP NAPI polls {} ({rate} frames/s, {}.{} per batch, {mean_frame} bytes each)",
                    if want { "in threads" } else { "in softirq" },
                    mean_x10 / 10,
                    mean_x10 % 10
                );
            }
            Err(e) => {
                st.broken = true;
                tracing::warn!("cannot switch the TAP's NAPI polls, left as they are: {e}");
            }
        }
    }

    /// Whether the polls run in threads now, and how often that changed.
    pub fn state(&self) -> (bool, u64) {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        (st.threaded, st.switches)
    }
}

/// A writing thread's way to its TAP (the control thread's, or one worker's).
pub struct TapSender {
    /// The device the writer writes to, held so that its fd stays open.
    _tap: Arc<Tap>,
    /// A ring accepts submissions from its creator only: the sender is made on its thread.
    writer: TapWriter,
    napi: Option<Arc<NapiSwitch>>,
}

impl TapSender {
    /// A sender for the calling thread, the only one that may use it. Its ring is made now, so
    /// that a thread has every ring it needs before the system-call filter is installed.
    pub fn new(tap: Arc<Tap>, napi: Option<Arc<NapiSwitch>>) -> TapSender {
        TapSender {
            writer: TapWriter::new(&tap),
            _tap: tap,
            napi,
        }
    }

    /// Where the TAP's NAPI polls run and how often they moved, when they are switched.
    pub fn napi_state(&self) -> Option<(bool, u64)> {
        self.napi.as_ref().map(|n| n.state())
    }

    /// Writes every frame of `out` and empties it (keeping its buffers). Returns how many the
    /// device refused (queue full, link down), which the caller counts as drops.
    pub fn send(&mut self, out: &mut FrameBatch) -> usize {
        if out.is_empty() {
            return 0;
        }
        if let Some(n) = &self.napi {
            // Counted as the guest's side sees them: a super-frame is the segments it is cut
            // into (each with its headers, about 54 bytes).
            let (frames, bytes) = out.iter_gso().fold((0, 0), |(f, b), (frame, gso)| {
                let segments = match gso {
                    0 => 1,
                    g => frame.len().div_ceil(usize::from(g) + 54),
                };
                (f + segments, b + frame.len())
            });
            n.note(frames, bytes);
        }
        let failed = self.writer.send_all_gso(out.iter_gso());
        out.clear();
        failed
    }
}

/// A thread's way to the segment's ports: its own batched writer for the first TAP (if the
/// segment has one), and the switch for the rest.
pub struct PortSender {
    tap: Option<TapSender>,
    switch: Arc<Switch>,
    capture: Arc<Capture>,
}

impl PortSender {
    /// `tap`: the calling thread's writer for the switch's batched port; `capture`: where the
    /// frames sent are captured while a capture is on.
    pub fn new(tap: Option<TapSender>, switch: Arc<Switch>, capture: Arc<Capture>) -> PortSender {
        PortSender {
            tap,
            switch,
            capture,
        }
    }

    /// Where the TAP's NAPI polls run and how often they moved, when they are switched.
    pub fn napi_state(&self) -> Option<(bool, u64)> {
        self.tap.as_ref().and_then(TapSender::napi_state)
    }

    /// Sends every frame of `out` to its port and empties it (keeping its buffers). Returns
    /// how many the batched TAP refused; the other ports count their own refusals.
    pub fn send(&mut self, out: &mut FrameBatch) -> usize {
        if out.is_empty() {
            return 0;
        }
        // Before the switch keeps only the batched port's: every frame sent, whatever its port.
        if let Some(c) = self.capture.batch() {
            out.iter().for_each(|f| self.capture.frame(c, f));
        }
        if self.tap.is_none() || self.switch.several() {
            let switch = &self.switch;
            out.retain(|f, gso| switch.egress(f, gso));
        }
        let Some(tap) = &mut self.tap else {
            out.clear();
            return 0;
        };
        let frames = out.len() as u64;
        let bytes = out.iter().map(|f| f.len() as u64).sum();
        let failed = tap.send(out);
        self.switch.count_batched_tx(frames, bytes, failed as u64);
        failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::port::tap::test_support::{frame, number, with_tap_and_capture};
    use std::sync::Mutex as StdMutex;

    const MS: u64 = 1_000_000;
    /// A full-size frame at MTU 1500, as a download writes.
    const FULL: usize = 1514;

    fn recording() -> (NapiSwitch, Arc<StdMutex<Vec<bool>>>) {
        let calls = Arc::new(StdMutex::new(Vec::new()));
        let c = Arc::clone(&calls);
        let sw = NapiSwitch::with_setter(Box::new(move |on| {
            c.lock().unwrap().push(on);
            Ok(())
        }));
        (sw, calls)
    }

    /// Many frames per batch at a high rate switch to threads within a window or two; single
    /// frames at any rate (an echo exchange) never do; once the bulk stops, the polls come back.
    #[test]
    fn bulk_switches_to_threads_and_back() {
        let (sw, calls) = recording();
        // 40k single-frame batches a second: request/response, stays in softirq.
        for i in 0..2000u64 {
            sw.note_at(1, FULL, i * 25_000);
        }
        assert!(calls.lock().unwrap().is_empty());
        // A download: 64-frame batches every 0.5 ms (128k frames/s).
        let start = 50 * MS;
        for i in 0..200u64 {
            sw.note_at(64, 64 * FULL, start + i * MS / 2);
        }
        assert_eq!(*calls.lock().unwrap(), vec![true]);
        assert!(sw.state().0);
        // It stops. The first look after it may still see the end of the transfer in its
        // window; the one after sees the rate gone and switches back.
        sw.note_at(1, FULL, start + 300 * MS);
        sw.note_at(1, FULL, start + 330 * MS);
        assert_eq!(*calls.lock().unwrap(), vec![true, false]);
        assert_eq!(sw.state(), (false, 2));
        // A download handed over in groups of 3 frames, 60k frames/s: bulk too.
        let start = 1000 * MS;
        for i in 0..1000u64 {
            sw.note_at(3, 3 * FULL, start + i * 50_000);
        }
        assert_eq!(*calls.lock().unwrap(), vec![true, false, true]);
    }

    /// Large batches of small frames (a DNS load: answers of about 100 bytes, 60 in a batch)
    /// never go to threads; a transfer whose frames turn small (its ACKs only) comes back.
    #[test]
    fn small_frames_stay_in_softirq_whatever_the_batch() {
        let (sw, calls) = recording();
        for i in 0..1000u64 {
            sw.note_at(60, 60 * 100, i * MS / 2);
        }
        assert!(calls.lock().unwrap().is_empty());
        let start = 1000 * MS;
        for i in 0..100u64 {
            sw.note_at(64, 64 * FULL, start + i * MS / 2);
        }
        assert_eq!(*calls.lock().unwrap(), vec![true]);
        for i in 0..200u64 {
            sw.note_at(32, 32 * 66, start + 100 * MS + i * MS / 2);
        }
        assert_eq!(*calls.lock().unwrap(), vec![true, false]);
    }

    /// Between the two thresholds the mode stays as it is, either way.
    #[test]
    fn rates_between_the_thresholds_do_not_flap() {
        let (sw, calls) = recording();
        // 3k frames/s in batches of 3: below THREADED_ABOVE.
        for i in 0..500u64 {
            sw.note_at(3, 3 * FULL, i * MS);
        }
        assert!(calls.lock().unwrap().is_empty());
        for i in 0..100u64 {
            sw.note_at(100, 100 * FULL, 500 * MS + i * MS);
        }
        assert_eq!(*calls.lock().unwrap(), vec![true]);
        // Back to 3k/s: above SOFTIRQ_BELOW, stays in threads.
        for i in 0..500u64 {
            sw.note_at(3, 3 * FULL, 600 * MS + i * MS);
        }
        assert_eq!(*calls.lock().unwrap(), vec![true]);
    }

    /// A switch that fails is left alone: no retry on every batch, no flapping.
    #[test]
    fn a_failing_switch_is_tried_once() {
        let tries = Arc::new(AtomicU64::new(0));
        let t = Arc::clone(&tries);
        let sw = NapiSwitch::with_setter(Box::new(move |_| {
            t.fetch_add(1, Ordering::Relaxed);
            Err(io::Error::from_raw_os_error(libc::EPERM))
        }));
        for i in 0..1000u64 {
            sw.note_at(64, 64 * FULL, i * MS / 2);
        }
        assert_eq!(tries.load(Ordering::Relaxed), 1);
        assert_eq!(sw.state(), (false, 0));
    }

    /// On a real device: a queue opened with NAPI, its switch flipped both ways through a sysfs
    /// of its own, and frames written in each mode reach the device whole and in order.
    #[test]
    fn napi_switch_on_a_real_tap() {
        with_tap_and_capture("hnnapi0", true, |tap, capture| {
            let threading = NapiThreading::open("hnnapi0", None).expect("threaded attribute");
            assert!(!threading.get().unwrap());
            threading.set(true).unwrap();
            assert!(threading.get().unwrap());
            let sw = Arc::new(NapiSwitch::new(threading));
            let mut s = TapSender::new(Arc::new(tap), Some(Arc::clone(&sw)));
            let mut out = FrameBatch::new();
            let mut next = 0u32;
            // Bulk long enough to switch to threads, then single frames.
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_millis(100) {
                for _ in 0..64 {
                    out.push(&frame(next, 1400));
                    next += 1;
                }
                assert_eq!(s.send(&mut out), 0);
                std::thread::sleep(Duration::from_micros(500));
            }
            assert!(sw.state().0, "bulk switched the polls to threads");
            for _ in 0..3 {
                std::thread::sleep(WINDOW + Duration::from_millis(5));
                out.push(&frame(next, 1000));
                next += 1;
                assert_eq!(s.send(&mut out), 0);
            }
            assert!(!sw.state().0, "single frames switched them back");
            let got = capture(next as usize);
            let seq: Vec<u32> = got.iter().map(|f| number(f)).collect();
            assert_eq!(seq, (0..next).collect::<Vec<_>>());
        });
    }
}
