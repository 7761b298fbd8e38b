//! The TAP port: a Linux TAP device whose far side is the guests' segment.
//!
//! hubnat creates (or attaches to) the device, optionally inside another network namespace (as
//! slirp4netns does), and reads and writes whole Ethernet frames on it.
//!
//! A frame written to a TAP is received by the kernel inside the write: the guest's whole
//! receive path runs in hubnat's thread, one frame at a time. With NAPI (`IFF_NAPI`) the kernel
//! instead queues the frame for a NAPI poll; when that poll runs in a kernel thread of its own
//! (`NapiThreading`), it takes the queued frames in batches, overlapped with hubnat's next
//! writes, and the guest's GRO can merge consecutive segments of a flow. That is how a NIC
//! driver delivers frames; hubnat's frames stay MTU-sized.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::sock::uring::restrict_and_enable;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("TAP device name `{0}` is empty or longer than 15 bytes")]
    BadName(String),
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(io::Error),
    #[error("cannot create or attach TAP device `{name}`: {source}")]
    Attach { name: String, source: io::Error },
    #[error("cannot bring TAP device `{name}` up: {source}")]
    Up { name: String, source: io::Error },
    #[error("cannot set the MTU of TAP device `{name}` to {mtu}: {source}")]
    Mtu {
        name: String,
        mtu: u32,
        source: io::Error,
    },
    #[error("cannot open network namespace {path}: {source}")]
    OpenNetns { path: PathBuf, source: io::Error },
    #[error("cannot enter network namespace {path}: {source}")]
    EnterNetns { path: PathBuf, source: io::Error },
    #[error("cannot move TAP device `{name}`'s NAPI polls to threads: {source}")]
    Napi { name: String, source: io::Error },
}

/// `ifreq` as the TUN/TAP and interface ioctls take it: a name and a union we use as flags or MTU.
#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    data: IfReqData,
}

#[repr(C)]
union IfReqData {
    flags: libc::c_short,
    mtu: libc::c_int,
    _pad: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> IfReq {
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: IfReqData { _pad: [0; 24] },
        };
        for (dst, src) in req.name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        req
    }
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// An open TAP device, non-blocking.
pub struct Tap {
    fd: OwnedFd,
    name: String,
}

impl Tap {
    /// Creates the TAP device `name` in the current network namespace, or attaches to it if it
    /// exists, and brings it up. `mtu` sets the device MTU when given.
    pub fn open(name: &str, mtu: Option<u32>) -> Result<Tap, TapError> {
        Ok(Tap::open_queues(name, mtu, 1, false)?.remove(0))
    }

    /// Like `open`, with `queues` queues: more than one makes a multiqueue device
    /// (IFF_MULTI_QUEUE), one fd per queue, among which the kernel steers flows. With `napi`,
    /// every queue delivers written frames through a NAPI poll (`IFF_NAPI`, see the module
    /// comment).
    pub fn open_queues(
        name: &str,
        mtu: Option<u32>,
        queues: usize,
        napi: bool,
    ) -> Result<Vec<Tap>, TapError> {
        let mut taps = Vec::with_capacity(queues.max(1));
        for _ in 0..queues.max(1) {
            taps.push(Tap::attach(name, queues > 1, napi)?);
        }
        if let Some(mtu) = mtu {
            taps[0].set_mtu(mtu)?;
        }
        taps[0].bring_up()?;
        Ok(taps)
    }

    fn attach(name: &str, multi_queue: bool, napi: bool) -> Result<Tap, TapError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('/') {
            return Err(TapError::BadName(name.to_owned()));
        }
        let path = CString::new("/dev/net/tun").expect("no NUL");
        // SAFETY: `path` is a valid NUL-terminated string; the returned fd is checked below.
        let raw = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(TapError::OpenTun(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a freshly opened fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut req = IfReq::new(name);
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI;
        if multi_queue {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        if napi {
            flags |= libc::IFF_NAPI;
        }
        req.data.flags = flags as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes an `ifreq`, which `IfReq` lays out; `req` outlives the call.
        check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req as *mut IfReq) })
            .map_err(|source| TapError::Attach {
                name: name.to_owned(),
                source,
            })?;
        Ok(Tap {
            fd,
            name: name.to_owned(),
        })
    }

    /// Like `open`, but creates the device inside the network namespace at `netns` (a path such
    /// as /proc/PID/ns/net or /run/netns/NAME). The calling thread returns to its own namespace;
    /// the device's fd stays bound to the one it was created in.
    pub fn open_in_netns(name: &str, mtu: Option<u32>, netns: &Path) -> Result<Tap, TapError> {
        Ok(Tap::open_queues_in_netns(name, mtu, 1, false, netns)?.remove(0))
    }

    /// `open_queues` inside the network namespace at `netns` (see `open_in_netns`).
    pub fn open_queues_in_netns(
        name: &str,
        mtu: Option<u32>,
        queues: usize,
        napi: bool,
        netns: &Path,
    ) -> Result<Vec<Tap>, TapError> {
        let target = File::open(netns).map_err(|source| TapError::OpenNetns {
            path: netns.to_owned(),
            source,
        })?;
        let own_path = Path::new("/proc/thread-self/ns/net");
        let own = File::open(own_path).map_err(|source| TapError::OpenNetns {
            path: own_path.to_owned(),
            source,
        })?;
        setns(target.as_fd()).map_err(|source| TapError::EnterNetns {
            path: netns.to_owned(),
            source,
        })?;
        let result = Tap::open_queues(name, mtu, queues, napi);
        if let Err(source) = setns(own.as_fd()) {
            // Staying in the guest's namespace would send host traffic into it: refuse to go on.
            return Err(TapError::EnterNetns {
                path: own_path.to_owned(),
                source,
            });
        }
        result
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn ifreq_ioctl(&self, request: libc::c_ulong, req: &mut IfReq) -> io::Result<()> {
        // SAFETY: an AF_INET datagram socket is only used as a handle for interface ioctls.
        let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if sock < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `sock` was just created and is owned here.
        let sock = unsafe { OwnedFd::from_raw_fd(sock) };
        // SAFETY: the SIOC*IF* requests used here take an `ifreq`, laid out by `IfReq`.
        check(unsafe { libc::ioctl(sock.as_raw_fd(), request, req as *mut IfReq) })
    }

    fn bring_up(&self) -> Result<(), TapError> {
        let err = |source| TapError::Up {
            name: self.name.clone(),
            source,
        };
        let mut req = IfReq::new(&self.name);
        self.ifreq_ioctl(libc::SIOCGIFFLAGS, &mut req)
            .map_err(err)?;
        // SAFETY: SIOCGIFFLAGS filled the `flags` member of the union.
        let flags = unsafe { req.data.flags };
        req.data.flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        self.ifreq_ioctl(libc::SIOCSIFFLAGS, &mut req).map_err(err)
    }

    fn set_mtu(&self, mtu: u32) -> Result<(), TapError> {
        let mut req = IfReq::new(&self.name);
        req.data.mtu = mtu as libc::c_int;
        self.ifreq_ioctl(libc::SIOCSIFMTU, &mut req)
            .map_err(|source| TapError::Mtu {
                name: self.name.clone(),
                mtu,
                source,
            })
    }

    /// Reads one frame; `Err(WouldBlock)` when none is waiting.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the duration of the call.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Writes one frame.
    pub fn send(&self, frame: &[u8]) -> io::Result<usize> {
        // SAFETY: `frame` is valid for reads of `frame.len()` bytes for the duration of the call.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

/// Frames per io_uring submission (a bigger batch is written in several).
const WRITE_RING_ENTRIES: u32 = 256;

/// Writes a batch of frames to a TAP with one system call: a TAP takes one frame per write(2),
/// so without a ring every frame pays a kernel entry and exit of its own. Each thread that
/// writes has its own writer (a ring accepts submissions from its creator only). Where the
/// kernel refuses io_uring, frames go out one write(2) each.
pub struct TapWriter {
    ring: Option<io_uring::IoUring>,
    /// The TAP fd. Not registered with the ring: a registered file is only let go when the
    /// kernel tears the ring down, in the background after the process exits, and until then
    /// the device would outlive hubnat.
    fd: RawFd,
    submissions: u64,
}

impl TapWriter {
    /// A writer for `tap`, made on (and used only by) the calling thread.
    pub fn new(tap: &Tap) -> TapWriter {
        let fd = tap.as_raw_fd();
        // Restricted to writes (see `restrict_and_enable`).
        let ring = io_uring::IoUring::builder()
            .setup_single_issuer()
            .setup_r_disabled()
            .build(WRITE_RING_ENTRIES)
            .and_then(|r| {
                restrict_and_enable(&r, &[io_uring::opcode::Write::CODE], 0, &[])?;
                Ok(r)
            });
        let ring = match ring {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::debug!("TAP writes one frame per write(2): io_uring unavailable ({e})");
                None
            }
        };
        TapWriter {
            ring,
            fd,
            submissions: 0,
        }
    }

    /// Whether frames go out in batches (io_uring) or one write(2) each.
    pub fn batched(&self) -> bool {
        self.ring.is_some()
    }

    /// System calls made for frames so far (one per batch with a ring, one per frame without).
    pub fn submissions(&self) -> u64 {
        self.submissions
    }

    fn write_each(&mut self, frames: &mut dyn Iterator<Item = &[u8]>) -> usize {
        let mut failed = 0;
        for f in frames {
            self.submissions += 1;
            // SAFETY: `f` is valid for reads of `f.len()` bytes for the duration of the call.
            let n = unsafe { libc::write(self.fd, f.as_ptr().cast(), f.len()) };
            if n < 0 {
                failed += 1;
            }
        }
        failed
    }

    /// Writes every frame of `frames` to the TAP this writer was made for; returns how many the
    /// device refused (queue full, link down), which the caller counts as drops.
    pub fn send_all<'a>(&mut self, mut frames: impl Iterator<Item = &'a [u8]>) -> usize {
        let Some(ring) = self.ring.as_mut() else {
            return self.write_each(&mut frames);
        };
        let mut failed = 0;
        let mut frames = frames.peekable();
        while frames.peek().is_some() {
            let mut queued = 0usize;
            {
                let mut sq = ring.submission();
                while queued < WRITE_RING_ENTRIES as usize {
                    let Some(f) = frames.next() else { break };
                    let len = u32::try_from(f.len()).unwrap_or(u32::MAX);
                    let sqe =
                        io_uring::opcode::Write::new(io_uring::types::Fd(self.fd), f.as_ptr(), len)
                            .offset(u64::MAX)
                            .build();
                    // SAFETY: the frame's bytes stay borrowed until every completion of this
                    // submission has been reaped below, before `send_all` returns.
                    if unsafe { sq.push(&sqe) }.is_err() {
                        failed += 1;
                        continue;
                    }
                    queued += 1;
                }
            }
            if queued == 0 {
                continue;
            }
            self.submissions += 1;
            // Writes to a TAP complete inline; waiting for all of them keeps the borrow sound.
            let mut done = 0usize;
            while done < queued {
                match ring.submit_and_wait(queued - done) {
                    Ok(_) => {}
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                        ) => {}
                    Err(e) => {
                        // The kernel took none of the entries (it reports an error only then).
                        // Dropping the ring discards them unsubmitted; later batches go out
                        // one write(2) each.
                        tracing::warn!("TAP writes fall back to write(2): io_uring failed: {e}");
                        failed += queued - done;
                        self.ring = None;
                        return failed + self.write_each(&mut frames);
                    }
                }
                for cqe in ring.completion() {
                    done += 1;
                    if cqe.result() < 0 {
                        failed += 1;
                    }
                }
            }
        }
        failed
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

fn setns(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: `fd` is an open namespace fd; setns only changes this thread's namespace.
    check(unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) })
}

/// The switch between a TAP device's NAPI polls running in softirq context, inside each write
/// (a frame reaches the guest at once: the least latency), and in kernel threads of their own
/// (frames are taken in batches while hubnat goes on: the most throughput). It is the device's
/// `threaded` attribute in sysfs, which needs at least one queue opened with NAPI.
pub struct NapiThreading {
    file: File,
}

impl NapiThreading {
    /// Opens the switch of device `name`, in the network namespace at `netns` (None: this
    /// thread's), and sets it to softirq polls. The sysfs mounted in this process may show
    /// another namespace's devices, so a short-lived thread mounts a sysfs of its own, in a mount
    /// namespace of its own that goes away with it; the open file keeps working after. Without
    /// the privilege to mount, the process's /sys is used if it shows this very device.
    pub fn open(name: &str, netns: Option<&Path>) -> io::Result<NapiThreading> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('/') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "bad device name",
            ));
        }
        let attr = format!("/sys/class/net/{name}/threaded");
        let own_mount = {
            let attr = attr.clone();
            let netns = netns.map(Path::to_owned);
            std::thread::spawn(move || -> io::Result<File> {
                if let Some(p) = netns {
                    setns(File::open(p)?.as_fd())?;
                }
                // SAFETY: unshare only gives this (short-lived, spawned here) thread a mount
                // namespace of its own.
                check(unsafe { libc::unshare(libc::CLONE_NEWNS) })?;
                // Nothing mounted here may propagate back to the host's mount namespace.
                // SAFETY: constant NUL-terminated strings; the flags only change propagation.
                check(unsafe {
                    libc::mount(
                        std::ptr::null(),
                        c"/".as_ptr(),
                        std::ptr::null(),
                        libc::MS_REC | libc::MS_PRIVATE,
                        std::ptr::null(),
                    )
                })?;
                // SAFETY: constant NUL-terminated strings; a sysfs over /sys in this thread's
                // private mount namespace only.
                check(unsafe {
                    libc::mount(
                        c"sysfs".as_ptr(),
                        c"/sys".as_ptr(),
                        c"sysfs".as_ptr(),
                        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                        std::ptr::null(),
                    )
                })?;
                OpenOptions::new().read(true).write(true).open(&attr)
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("sysfs thread panicked")))
        };
        let file = match own_mount {
            Ok(f) => f,
            Err(e) if netns.is_none() && Self::sysfs_shows(name) => {
                tracing::debug!(
                    "NAPI switch through the process's /sys ({e} with a sysfs of its own)"
                );
                OpenOptions::new().read(true).write(true).open(&attr)?
            }
            Err(e) => return Err(e),
        };
        let t = NapiThreading { file };
        t.set(false)?;
        Ok(t)
    }

    /// Whether /sys/class/net/NAME is this namespace's device NAME (same interface index).
    fn sysfs_shows(name: &str) -> bool {
        let Ok(c) = CString::new(name) else {
            return false;
        };
        // SAFETY: `c` is a valid NUL-terminated string.
        let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
        let shown = std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex"));
        index != 0 && shown.is_ok_and(|s| s.trim().parse() == Ok(index))
    }

    /// Whether the polls run in kernel threads.
    pub fn get(&self) -> io::Result<bool> {
        let mut buf = [0u8; 16];
        let n = self.file.read_at(&mut buf, 0)?;
        Ok(buf[..n].first().is_some_and(|&b| b != b'0'))
    }

    /// Polls in kernel threads (`true`) or in softirq context (`false`).
    pub fn set(&self, threaded: bool) -> io::Result<()> {
        self.file
            .write_at(if threaded { b"1" } else { b"0" }, 0)
            .map(|_| ())
    }
}

/// Resolves `--netns`: a path, a PID (its /proc/PID/ns/net), or a name made by `ip netns add`.
pub fn netns_path(spec: &str) -> PathBuf {
    if spec.bytes().all(|b| b.is_ascii_digit()) && !spec.is_empty() {
        PathBuf::from(format!("/proc/{spec}/ns/net"))
    } else if spec.contains('/') {
        PathBuf::from(spec)
    } else {
        PathBuf::from(format!("/run/netns/{spec}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netns_specs() {
        assert_eq!(netns_path("1234"), PathBuf::from("/proc/1234/ns/net"));
        assert_eq!(netns_path("guest"), PathBuf::from("/run/netns/guest"));
        assert_eq!(netns_path("/run/netns/x"), PathBuf::from("/run/netns/x"));
    }

    /// Every frame of a batch bigger than the ring reaches the device's kernel side, intact and
    /// in order, in one submission per ring-full.
    #[test]
    fn a_batch_reaches_the_device_in_order() {
        test_support::with_tap_and_capture("hnbatch0", false, |tap, capture| {
            let mut writer = TapWriter::new(&tap);
            let count = WRITE_RING_ENTRIES as usize + 44;
            let frames: Vec<Vec<u8>> = (0..count)
                .map(|i| test_support::frame(i as u32, 100 + i % 50))
                .collect();
            assert_eq!(writer.send_all(frames.iter().map(|f| f.as_slice())), 0);
            if writer.batched() {
                assert_eq!(writer.submissions(), 2);
            } else {
                assert_eq!(writer.submissions(), count as u64);
            }
            let got = capture(count);
            assert_eq!(got.len(), count);
            assert!(got == frames, "frames differ or were reordered");
        });
    }

    #[test]
    fn bad_names_are_refused() {
        assert!(matches!(Tap::open("", None), Err(TapError::BadName(_))));
        assert!(matches!(
            Tap::open("a-name-that-is-too-long", None),
            Err(TapError::BadName(_))
        ));
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;
    use crate::port::af_packet::{Direction, PacketSocket};

    /// A test frame numbered `i`, `len` bytes long (at least 18), to a unicast MAC that is not
    /// the device's, so the kernel drops it after its packet taps have seen it.
    pub fn frame(i: u32, len: usize) -> Vec<u8> {
        let mut f = vec![0x02, 0, 0, 0, 0, 9, 0x02, 0, 0, 0, 0, 1, 0x88, 0xb5];
        f.extend_from_slice(&i.to_be_bytes());
        f.extend((18..len.max(18)).map(|b| (b as u32 + i) as u8));
        f
    }

    /// The number `frame` gave a frame.
    pub fn number(f: &[u8]) -> u32 {
        u32::from_be_bytes([f[14], f[15], f[16], f[17]])
    }

    /// Runs `test` with a TAP named `name` (with NAPI if `napi`) in a network namespace of a
    /// thread of its own, and a
    /// capture of what is written to it: `capture(n)` returns the test frames seen, up to `n`,
    /// waiting at most 2 s for each. Needs CAP_NET_ADMIN (CI runs as root); skipped without.
    pub fn with_tap_and_capture(
        name: &'static str,
        napi: bool,
        test: impl FnOnce(Tap, &mut dyn FnMut(usize) -> Vec<Vec<u8>>) + Send + 'static,
    ) {
        std::thread::spawn(move || {
            // SAFETY: unshare only moves this (test-owned) thread into a new network namespace.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                eprintln!("skipped: no CAP_NET_ADMIN ({})", io::Error::last_os_error());
                return;
            }
            let tap = Tap::open_queues(name, None, 1, napi)
                .expect("TAP in a fresh namespace")
                .remove(0);
            let capture =
                PacketSocket::open(name, std::time::Duration::from_secs(2)).expect("packet socket");
            // Room for every test's frames: the capture is read only after they were written.
            crate::sock::driver::setsockopt_int(
                capture.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                8 << 20,
            )
            .expect("SO_RCVBUFFORCE");
            let mut read = |count: usize| {
                let mut buf = vec![0u8; 65536];
                let mut got = Vec::new();
                while got.len() < count {
                    match capture.recv(&mut buf).expect("capture") {
                        Some((n, Direction::Incoming)) if buf[12..14] == [0x88, 0xb5] => {
                            got.push(buf[..n].to_vec())
                        }
                        Some(_) => {}
                        None => break,
                    }
                }
                got
            };
            test(tap, &mut read);
        })
        .join()
        .expect("test thread");
    }
}
