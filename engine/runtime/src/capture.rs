//! The segment's frames, written to a pcap file (`hubnat run --pcap`, `hubnat capture start`).
//!
//! Every thread that reads a port or writes frames to one asks `Capture::batch` once per batch
//! (one relaxed load): while no capture is on, that is all a capture costs. While one is on, the
//! thread copies each frame into a recycled buffer and pushes it, stamped, on a bounded
//! lock-free queue, within a byte budget; a full queue or budget drops the frame and counts it
//! rather than wait. One writer thread, made with the runtime (the system-call filter allows no
//! new thread later), takes the frames off the queue and writes the file, and ends the capture
//! when the file reaches its cap.
//!
//! Each frame is in the file once: as it was read from its port, or as the virtual host sent
//! it. A frame the switch forwards from one guest's port to another's is the one read.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crossbeam_queue::ArrayQueue;
use pcap_file::pcap::{PcapHeader, PcapPacket, PcapWriter};
use pcap_file::{DataLink, Endianness, TsResolution};

/// Frames waiting for the writer, at most.
const QUEUE_FRAMES: usize = 8192;
/// Bytes of buffers waiting for the writer, at most (their capacity, what they really hold).
const QUEUE_BYTES: usize = 8 << 20;
/// Buffers kept for reuse, and the largest kept: a jumbo frame's buffer is freed after use, so
/// what is kept stays small whatever the MTU.
const SPARE_BUFFERS: usize = 1024;
const SPARE_MAX: usize = 2048;
/// How long the writer sleeps when the queue is empty: threads never wake it (that would cost
/// them a system call per frame), so this is also the most a frame waits in the queue.
const WRITER_NAP: Duration = Duration::from_millis(10);
/// Frames written per hold of the lock, so that `stop` and `status` wait for no more.
const WRITE_CHUNK: usize = 512;
/// The snapshot length in the file's header: libpcap's largest, above any frame hubnat carries
/// (MTU 65520 plus the Ethernet header), so no frame is cut.
const SNAPLEN: u32 = 262_144;
/// The file's header and each frame's, in bytes (what the cap counts besides the frames).
const FILE_HEADER: u64 = 24;
const FRAME_HEADER: u64 = 16;

/// The default cap of a capture file, in MiB.
pub const DEFAULT_MAX_MIB: u64 = 64;

/// A capture, as `hubnat status` shows it: the one on now, or the last one.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CaptureStatus {
    pub active: bool,
    pub path: PathBuf,
    pub max_bytes: u64,
    /// Frames and bytes (headers included) in the file.
    pub frames: u64,
    pub bytes: u64,
    /// Frames not captured because the queue to the writer was full.
    pub dropped: u64,
    /// Why it ended (None: it is on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<String>,
}

struct Frame {
    generation: u64,
    ts: Duration,
    data: Vec<u8>,
}

/// The writer's side of the file: the pcap writer writes through a shared handle so that the
/// writer thread can flush the buffer when the queue runs dry (the pcap writer does not lend
/// its inner writer).
#[derive(Clone)]
struct Out(Arc<Mutex<BufWriter<File>>>);

impl Out {
    fn lock(&self) -> MutexGuard<'_, BufWriter<File>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Write for Out {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.lock().write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.lock().flush()
    }
}

struct Job {
    generation: u64,
    path: PathBuf,
    max_bytes: u64,
    pcap: PcapWriter<Out>,
    out: Out,
    /// Written since the last flush.
    dirty: bool,
}

#[derive(Default)]
struct State {
    job: Option<Job>,
    last: Option<CaptureStatus>,
    generations: u64,
    shutdown: bool,
}

/// The capture every thread of one runtime shares.
pub struct Capture {
    /// 0: off; else the generation of the capture on now, which each frame carries, so that a
    /// frame a thread pushed after its capture ended is not written into the next one.
    on: AtomicU64,
    queue: ArrayQueue<Frame>,
    spare: ArrayQueue<Vec<u8>>,
    queued_bytes: AtomicUsize,
    budget: usize,
    dropped: AtomicU64,
    frames: AtomicU64,
    bytes: AtomicU64,
    state: Mutex<State>,
    wake: Condvar,
}

/// The capture on for one batch (see `Capture::batch`).
#[derive(Clone, Copy, Debug)]
pub struct Batch(u64);

impl Default for Capture {
    fn default() -> Capture {
        Capture::with_limits(QUEUE_FRAMES, QUEUE_BYTES)
    }
}

impl Capture {
    fn with_limits(frames: usize, bytes: usize) -> Capture {
        Capture {
            on: AtomicU64::new(0),
            queue: ArrayQueue::new(frames.max(1)),
            spare: ArrayQueue::new(SPARE_BUFFERS),
            queued_bytes: AtomicUsize::new(0),
            budget: bytes,
            dropped: AtomicU64::new(0),
            frames: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
        }
    }

    /// The capture for this batch, if one is on: the only thing asked of a capture that is off.
    #[inline]
    pub fn batch(&self) -> Option<Batch> {
        let generation = self.on.load(Ordering::Relaxed);
        (generation != 0).then_some(Batch(generation))
    }

    /// Captures `frame` (copied) for `batch`'s capture, or counts it dropped when the queue is
    /// full.
    pub fn frame(&self, batch: Batch, frame: &[u8]) {
        let generation = batch.0;
        let mut data = self.spare.pop().unwrap_or_default();
        data.clear();
        data.extend_from_slice(frame);
        let size = data.capacity();
        let before = self.queued_bytes.fetch_add(size, Ordering::Relaxed);
        if before + size > self.budget {
            self.queued_bytes.fetch_sub(size, Ordering::Relaxed);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            self.recycle(data);
            return;
        }
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        if let Err(f) = self.queue.push(Frame {
            generation,
            ts,
            data,
        }) {
            self.queued_bytes.fetch_sub(size, Ordering::Relaxed);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            self.recycle(f.data);
        }
    }

    fn recycle(&self, data: Vec<u8>) {
        if data.capacity() <= SPARE_MAX {
            let _ = self.spare.push(data);
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts capturing into `file` (opened by the caller, where the sandbox lets it), named
    /// `path` for the operator; ends at `max_bytes`. Refused while a capture is on.
    pub fn start(&self, file: File, path: &Path, max_bytes: u64) -> io::Result<()> {
        let mut st = self.lock();
        if let Some(job) = &st.job {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "a capture to {} is on: stop it first (hubnat capture stop)",
                    job.path.display()
                ),
            ));
        }
        if max_bytes < FILE_HEADER + FRAME_HEADER + 64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the cap holds no frame: give 1 MiB or more",
            ));
        }
        let out = Out(Arc::new(Mutex::new(BufWriter::with_capacity(
            64 << 10,
            file,
        ))));
        let pcap = PcapWriter::with_header(out.clone(), header()).map_err(io::Error::other)?;
        // The header reaches the file now, so that a file that cannot be written fails the
        // request rather than the writer later.
        out.lock().flush()?;
        st.generations += 1;
        let generation = st.generations;
        self.dropped.store(0, Ordering::Relaxed);
        self.frames.store(0, Ordering::Relaxed);
        self.bytes.store(FILE_HEADER, Ordering::Relaxed);
        st.job = Some(Job {
            generation,
            path: path.to_owned(),
            max_bytes,
            pcap,
            out,
            dirty: false,
        });
        self.on.store(generation, Ordering::Relaxed);
        drop(st);
        self.wake.notify_all();
        tracing::info!(
            "capture: writing the segment's frames to {} (cap {} MiB)",
            path.display(),
            max_bytes >> 20
        );
        Ok(())
    }

    /// Ends the capture on now: what is queued is written, the file flushed and closed. None
    /// when no capture is on.
    pub fn stop(&self, why: &str) -> Option<CaptureStatus> {
        self.on.store(0, Ordering::Relaxed);
        let mut st = self.lock();
        let mut job = st.job.take()?;
        let end = match self.write_some(&mut job, usize::MAX) {
            Some(cut) if !cut.is_empty() => cut,
            _ => why.to_owned(),
        };
        Some(self.finish(&mut st, job, end))
    }

    /// The capture on now, else the last one (None: there was none).
    pub fn status(&self) -> Option<CaptureStatus> {
        let st = self.lock();
        match &st.job {
            Some(job) => Some(self.view(job, None)),
            None => st.last.clone(),
        }
    }

    fn view(&self, job: &Job, ended: Option<String>) -> CaptureStatus {
        CaptureStatus {
            active: ended.is_none(),
            path: job.path.clone(),
            max_bytes: job.max_bytes,
            frames: self.frames.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            ended,
        }
    }

    /// Writes up to `limit` queued frames into `job`. Some(reason) when the capture must end
    /// (its cap, a failed write); Some("") when the queue is empty; None when `limit` frames
    /// were written and more may wait.
    fn write_some(&self, job: &mut Job, limit: usize) -> Option<String> {
        let mut done = 0;
        while done < limit {
            let Some(f) = self.queue.pop() else {
                return Some(String::new());
            };
            self.queued_bytes
                .fetch_sub(f.data.capacity(), Ordering::Relaxed);
            if f.generation != job.generation {
                self.recycle(f.data);
                continue;
            }
            let size = FRAME_HEADER + f.data.len() as u64;
            let bytes = self.bytes.load(Ordering::Relaxed);
            if bytes + size > job.max_bytes {
                self.recycle(f.data);
                return Some(format!(
                    "the file reached its cap of {} MiB",
                    job.max_bytes >> 20
                ));
            }
            // Microsecond stamps: what the header says the file holds.
            let ts = Duration::from_micros(f.ts.as_micros() as u64);
            let packet = PcapPacket::new(ts, f.data.len() as u32, &f.data);
            if let Err(e) = job.pcap.write_packet(&packet) {
                self.recycle(f.data);
                return Some(format!("writing the file failed: {e}"));
            }
            self.recycle(f.data);
            job.dirty = true;
            self.frames.fetch_add(1, Ordering::Relaxed);
            self.bytes.fetch_add(size, Ordering::Relaxed);
            done += 1;
        }
        None
    }

    /// Ends `job`: flushes and closes its file, keeps its status, and says so in the log.
    fn finish(&self, st: &mut State, job: Job, mut why: String) -> CaptureStatus {
        self.on.store(0, Ordering::Relaxed);
        if let Err(e) = job.out.lock().flush() {
            why = format!("{why}; flushing the file failed: {e}");
        }
        let status = self.view(&job, Some(why.clone()));
        tracing::info!(
            "capture to {} ended ({why}): {} frames, {} bytes written, {} frames dropped (the queue to the writer was full)",
            job.path.display(),
            status.frames,
            status.bytes,
            status.dropped
        );
        st.last = Some(status.clone());
        status
    }

    /// The writer thread's loop, until `shutdown`.
    fn write_loop(&self) {
        let mut st = self.lock();
        loop {
            if st.shutdown {
                return;
            }
            let Some(mut job) = st.job.take() else {
                // Frames pushed after a capture ended are nobody's.
                while let Some(f) = self.queue.pop() {
                    self.queued_bytes
                        .fetch_sub(f.data.capacity(), Ordering::Relaxed);
                    self.recycle(f.data);
                }
                st = self.wake.wait(st).unwrap_or_else(|p| p.into_inner());
                continue;
            };
            match self.write_some(&mut job, WRITE_CHUNK) {
                None => st.job = Some(job),
                Some(why) if why.is_empty() => {
                    if std::mem::take(&mut job.dirty) {
                        let flushed = job.out.lock().flush();
                        if let Err(e) = flushed {
                            self.finish(&mut st, job, format!("writing the file failed: {e}"));
                            continue;
                        }
                    }
                    st.job = Some(job);
                    st = (self.wake.wait_timeout(st, WRITER_NAP))
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
                Some(why) => {
                    self.finish(&mut st, job, why);
                }
            }
        }
    }

    /// Starts the writer thread and returns once it runs (before the system-call filter, see
    /// `spawn_running`); `shutdown` ends it.
    pub fn spawn_writer(self: &Arc<Self>) -> io::Result<std::thread::JoinHandle<()>> {
        let me = Arc::clone(self);
        crate::spawn_running("hubnat-capture", move || me.write_loop())
    }

    /// Ends the capture on now (written and closed) and the writer thread's loop.
    pub fn shutdown(&self) {
        self.stop("hubnat stopped");
        self.lock().shutdown = true;
        self.wake.notify_all();
    }
}

/// Makes the capture file `path` anew, readable by its owner only (it holds the guests'
/// traffic).
pub fn open_file(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// Why `path` cannot be a capture file, for the operator: in the sandbox (`writable` the
/// directories it lets hubnat write; empty: no sandbox), a refusal names where it can be.
pub fn open_error(path: &Path, e: &io::Error, writable: &[PathBuf]) -> String {
    let refused = matches!(
        e.kind(),
        io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem
    ) || e.raw_os_error() == Some(libc::EPERM);
    if !refused || writable.is_empty() {
        return format!("cannot write the capture file {}: {e}", path.display());
    }
    let dirs: Vec<String> = writable.iter().map(|d| d.display().to_string()).collect();
    format!(
        "cannot write the capture file {}: {e}. In its sandbox, hubnat writes only in {} \
         (its state directory and the directories given at start; `hubnat run --pcap FILE` \
         makes FILE's directory one of them)",
        path.display(),
        dirs.join(", ")
    )
}

fn header() -> PcapHeader {
    PcapHeader {
        version_major: 2,
        version_minor: 4,
        ts_correction: 0,
        ts_accuracy: 0,
        snaplen: SNAPLEN,
        datalink: DataLink::ETHERNET,
        ts_resolution: TsResolution::MicroSecond,
        endianness: Endianness::native(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pcap_file::pcap::PcapReader;

    fn frame(n: u8, len: usize) -> Vec<u8> {
        let mut f = vec![n; len];
        f[..6].copy_from_slice(&[0xff; 6]);
        f
    }

    fn temp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("hubnat-capture-{}-{name}.pcap", std::process::id()))
    }

    fn read_back(path: &Path) -> Vec<(Duration, Vec<u8>)> {
        let mut r = PcapReader::new(File::open(path).unwrap()).unwrap();
        assert_eq!(r.header().datalink, DataLink::ETHERNET);
        let mut got = Vec::new();
        while let Some(p) = r.next_packet() {
            let p = p.unwrap();
            assert_eq!(p.orig_len as usize, p.data.len());
            got.push((p.timestamp, p.data.into_owned()));
        }
        got
    }

    #[test]
    fn an_idle_capture_takes_nothing() {
        let c = Capture::default();
        assert!(c.batch().is_none());
        assert!(c.queue.is_empty());
        assert!(c.status().is_none());
    }

    #[test]
    fn frames_are_written_in_order_with_their_time() {
        let path = temp("order");
        let c = Arc::new(Capture::default());
        let writer = c.spawn_writer().unwrap();
        let before = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        c.start(open_file(&path).unwrap(), &path, 1 << 20).unwrap();
        let b = c.batch().expect("on");
        let frames: Vec<Vec<u8>> = (0..100u8).map(|n| frame(n, 60 + n as usize)).collect();
        for f in &frames {
            c.frame(b, f);
        }
        let st = c.stop("done").expect("was on");
        let after = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        assert!(c.batch().is_none(), "off once stopped");
        assert_eq!((st.frames, st.dropped, st.active), (100, 0, false));
        assert_eq!(st.ended.as_deref(), Some("done"));
        let got = read_back(&path);
        assert_eq!(got.len(), 100);
        assert_eq!(
            st.bytes,
            std::fs::metadata(&path).unwrap().len(),
            "status counts what the file holds"
        );
        for (i, (ts, data)) in got.iter().enumerate() {
            assert_eq!(data, &frames[i]);
            assert!(*ts + Duration::from_micros(1) >= before && *ts <= after);
            if i > 0 {
                assert!(*ts >= got[i - 1].0);
            }
        }
        c.shutdown();
        writer.join().unwrap();
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_full_queue_or_budget_drops_and_counts() {
        let path = temp("full");
        // No writer thread: nothing leaves the queue until `stop`.
        let c = Capture::with_limits(4, 1 << 20);
        c.start(open_file(&path).unwrap(), &path, 1 << 20).unwrap();
        let b = c.batch().unwrap();
        for n in 0..10 {
            c.frame(b, &frame(n, 100));
        }
        assert_eq!(c.status().unwrap().dropped, 6);
        let st = c.stop("done").unwrap();
        assert_eq!((st.frames, st.dropped), (4, 6));
        assert_eq!(read_back(&path).len(), 4);

        let c = Capture::with_limits(100, 4096);
        c.start(open_file(&path).unwrap(), &path, 1 << 20).unwrap();
        let b = c.batch().unwrap();
        for n in 0..10 {
            c.frame(b, &frame(n, 1500));
        }
        assert!(c.queued_bytes.load(Ordering::Relaxed) <= 4096);
        let st = c.stop("done").unwrap();
        assert_eq!(st.frames + st.dropped, 10);
        assert!(st.dropped >= 8, "the byte budget holds two frames at most");
        assert_eq!(c.queued_bytes.load(Ordering::Relaxed), 0);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn the_cap_ends_the_capture() {
        let path = temp("cap");
        let c = Arc::new(Capture::default());
        let writer = c.spawn_writer().unwrap();
        let cap = 64 * 1024;
        c.start(open_file(&path).unwrap(), &path, cap).unwrap();
        let b = c.batch().unwrap();
        for n in 0..200 {
            c.frame(b, &frame(n as u8, 1000));
        }
        let t0 = std::time::Instant::now();
        while c.batch().is_some() {
            assert!(t0.elapsed() < Duration::from_secs(10), "the cap stops it");
            std::thread::sleep(Duration::from_millis(5));
        }
        let st = c.status().unwrap();
        assert!(!st.active);
        assert!(st.ended.as_deref().unwrap().contains("cap"));
        let len = std::fs::metadata(&path).unwrap().len();
        assert!(len <= cap && len > cap - 1100, "{len}");
        assert_eq!(read_back(&path).len() as u64, st.frames);
        assert!(c.stop("again").is_none(), "nothing is on");
        c.shutdown();
        writer.join().unwrap();
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn frames_of_an_ended_capture_stay_out_of_the_next() {
        let path = temp("gen");
        let c = Capture::default();
        c.start(open_file(&path).unwrap(), &path, 1 << 20).unwrap();
        let old = c.batch().unwrap();
        c.stop("done").unwrap();
        c.start(open_file(&path).unwrap(), &path, 1 << 20).unwrap();
        // A thread still in a batch of the first capture.
        c.frame(old, &frame(1, 60));
        c.frame(c.batch().unwrap(), &frame(2, 60));
        let err = c.start(open_file(&temp("gen2")).unwrap(), &path, 1 << 20);
        assert_eq!(err.unwrap_err().kind(), io::ErrorKind::AlreadyExists);
        c.stop("done").unwrap();
        let got = read_back(&path);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].1, frame(2, 60));
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(temp("gen2"));
    }

    #[test]
    fn a_refusal_in_the_sandbox_names_where_files_can_go() {
        let e = io::Error::from_raw_os_error(libc::EACCES);
        let dirs = [PathBuf::from("/var/lib/hubnat"), PathBuf::from("/tmp/caps")];
        let m = open_error(Path::new("/root/x.pcap"), &e, &dirs);
        assert!(m.contains("/root/x.pcap") && m.contains("/var/lib/hubnat, /tmp/caps"));
        let m = open_error(Path::new("/root/x.pcap"), &e, &[]);
        assert!(!m.contains("sandbox"));
    }
}
