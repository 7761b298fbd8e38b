//! io_uring for the host-socket driver: one ring per thread.
//!
//! TCP needs synchronous answers (how much a socket took, a peek at what it holds), so TCP
//! sends, peeks and consumes stay plain non-blocking syscalls; io_uring's multishot receive
//! cannot peek. What goes through the ring:
//!
//! - TCP connects (`IORING_OP_CONNECT`): the completion's result is the connect's outcome. Once
//!   connected, the socket gets a multishot `IORING_OP_POLL_ADD` for its readiness
//!   (edge-triggered, like mio's registration); ICMP sockets have such a poll from the start.
//! - UDP receives: one multishot `IORING_OP_RECV` per socket into a ring of provided buffers
//!   (`IORING_REGISTER_PBUF_RING`) shared by the thread's sockets. Completed datagrams wait in a
//!   per-socket queue (bounded by the buffer count: every queued datagram holds a buffer) until
//!   `udp_recv` copies one out and gives its buffer back to the ring at once. Every buffer holds
//!   the largest datagram (65507 bytes), so a datagram is never truncated: the memory is mapped
//!   lazily, and a buffer that only ever carried small datagrams costs one page. When the
//!   buffers run out (`ENOBUFS` ends the multishot) or the receive ends otherwise (an ICMP
//!   error, which is queued in order), the socket falls back to a plain `recv` until it would
//!   block, and then the multishot is armed again (or, with no buffer free, a one-shot poll).
//! - The thread's own descriptors (`watch_token`: its TAP queue, the epoll set holding its
//!   waker), as multishot polls whose completions stand for the runtime's tokens.
//!
//! Everything queued during a batch is submitted at once: a worker does it with the one
//! `io_uring_enter` that also waits (`wait`), with a timeout for the engine's timers. Such a
//! ring is made with `SINGLE_ISSUER | DEFER_TASKRUN` where the kernel takes them
//! (`Ring::for_waiting_thread`): completions are then produced only when the thread enters the
//! ring to wait, never by interrupting it. The control thread keeps waiting in epoll, with the
//! ring's fd among its sources (`Ring::new`): its operator connections, signals and listeners
//! are mio sources, and a ring with `DEFER_TASKRUN` does not reliably make its fd readable, so
//! that ring is made without it.
//!
//! A socket's operations carry its id, a generation and the operation's kind in their
//! user_data: a completion for a socket closed since (or for an id reused) is recognised and
//! ignored, its provided buffer going back to the ring. Closing cancels the socket's operations
//! (by user_data, never by fd: the fd number may already belong to a new socket) in the same
//! batch; the fd itself is closed synchronously by the driver, which is safe because every
//! operation in flight holds its own reference to the socket.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddrV4;
use std::os::fd::{AsRawFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use io_uring::types::BufRingEntry;
use io_uring::{cqueue, opcode, squeue, types, IoUring};

use crate::hostio::SockId;

/// Submission queue entries; the completion queue is eight times as large (a busy socket's
/// multishot poll posts a completion per wake-up; overflow is flushed, see `drain`).
const ENTRIES: u32 = 1024;
/// Size of a provided buffer: the largest UDP payload over IPv4 (65507) fits.
pub const BUF_SIZE: usize = 1 << 16;
/// Provided buffers per ring (a power of two).
pub const BUF_COUNT: u16 = 64;
/// The provided-buffer group of the ring's buffers.
const BGID: u16 = 0;

/// Kinds of operations, in the top byte of user_data.
const K_IGNORE: u8 = 0;
const K_POLL: u8 = 1;
const K_CONNECT: u8 = 2;
const K_RECV: u8 = 3;
const K_RPOLL: u8 = 4;
const K_TOKEN: u8 = 5;
/// user_data of cancellations (their completions are ignored).
const IGNORE: u64 = 0;

fn user_data(kind: u8, generation: u32, id: SockId) -> u64 {
    (u64::from(kind) << 56) | (u64::from(generation & 0xff_ffff) << 32) | u64::from(id)
}

fn kind_of(ud: u64) -> u8 {
    (ud >> 56) as u8
}

fn generation_of(ud: u64) -> u32 {
    ((ud >> 32) & 0xff_ffff) as u32
}

/// Readiness of one socket, in the terms the driver needs (from epoll or from a poll mask).
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct Ready {
    pub readable: bool,
    pub writable: bool,
    pub error: bool,
    pub read_closed: bool,
    pub write_closed: bool,
}

impl Ready {
    /// From a poll(2) mask (a poll completion's result).
    pub fn from_mask(mask: u32) -> Ready {
        let has = |bit: libc::c_short| mask & (bit as u16 as u32) != 0;
        let hup = has(libc::POLLHUP);
        Ready {
            readable: has(libc::POLLIN) || has(libc::POLLPRI),
            writable: has(libc::POLLOUT),
            error: has(libc::POLLERR),
            read_closed: hup || has(libc::POLLRDHUP),
            write_closed: hup || (has(libc::POLLOUT) && has(libc::POLLERR)),
        }
    }
}

/// What a completion means to the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completion {
    /// A watched socket's readiness changed.
    Ready(SockId, Ready),
    /// A `connect` succeeded; the socket is now watched for readiness.
    Connected(SockId),
    /// A `connect` failed.
    ConnectFailed(SockId, io::ErrorKind),
    /// A UDP socket has datagrams (or an error) for `udp_recv`.
    Readable(SockId),
    /// A descriptor given to `watch_token` is ready.
    Token(usize),
}

/// A received datagram (in provided buffer `bid`) or a receive error, waiting for `udp_recv`.
enum Queued {
    Data { bid: u16, len: usize },
    Error(i32),
}

struct Udp {
    queue: VecDeque<Queued>,
    /// The multishot receive is in flight.
    recv: bool,
    /// A one-shot POLLIN is in flight (the receive is off for want of buffers).
    poll: bool,
}

enum State {
    /// A multishot readiness poll with this mask is in flight.
    Watched { mask: u32 },
    /// A connect is in flight; the kernel reads `addr` when it is submitted.
    Connecting { addr: Box<libc::sockaddr_in> },
    /// Nothing in flight (a failed connect, waiting to be closed).
    Idle,
    Udp(Udp),
}

struct Entry {
    fd: RawFd,
    generation: u32,
    state: State,
}

/// The provided buffers: a ring of `count` entries the kernel takes buffers from, and the
/// buffers themselves, both mapped anonymously (pages are only backed once written).
struct BufRing {
    entries: NonNull<BufRingEntry>,
    entries_len: usize,
    mem: NonNull<u8>,
    mem_len: usize,
    count: u16,
    tail: u16,
    /// Buffers in the ring (not held by a queued datagram or a completion not yet read).
    free: usize,
}

fn map(len: usize) -> io::Result<NonNull<u8>> {
    // SAFETY: a fresh private anonymous mapping; the result is checked.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(p.cast()).ok_or_else(|| io::Error::other("mmap returned NULL"))
}

impl BufRing {
    fn new(count: u16) -> io::Result<BufRing> {
        assert!(count.is_power_of_two());
        let entries_len = usize::from(count) * std::mem::size_of::<BufRingEntry>();
        let entries = map(entries_len)?;
        let mem_len = usize::from(count) * BUF_SIZE;
        let mem = match map(mem_len) {
            Ok(m) => m,
            Err(e) => {
                // SAFETY: mapped just above with this length, not used since.
                unsafe { libc::munmap(entries.as_ptr().cast(), entries_len) };
                return Err(e);
            }
        };
        Ok(BufRing {
            entries: entries.cast(),
            entries_len,
            mem,
            mem_len,
            count,
            tail: 0,
            free: 0,
        })
    }

    /// Hands buffer `bid` to the kernel.
    fn give(&mut self, bid: u16) {
        if bid >= self.count {
            return;
        }
        let slot = usize::from(self.tail & (self.count - 1));
        // SAFETY: `slot` < count entries mapped; the kernel reads an entry only once the tail
        // published below covers it, and it is ours again once the kernel took it.
        let e = unsafe { &mut *self.entries.as_ptr().add(slot) };
        e.set_addr(self.mem.as_ptr() as u64 + u64::from(bid) * BUF_SIZE as u64);
        e.set_len(BUF_SIZE as u32);
        e.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
        // SAFETY: the tail lives in the first entry's reserved field, 2-byte aligned; the kernel
        // reads it with acquire semantics.
        unsafe {
            let tail = BufRingEntry::tail(self.entries.as_ptr()) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
        self.free += 1;
    }

    /// The first `len` bytes of buffer `bid`.
    fn data(&self, bid: u16, len: usize) -> &[u8] {
        let len = len.min(BUF_SIZE);
        if bid >= self.count {
            return &[];
        }
        // SAFETY: buffer `bid` lies inside the mapping; the kernel finished writing it (its
        // completion was read) and does not take it again before `give`.
        unsafe {
            std::slice::from_raw_parts(self.mem.as_ptr().add(usize::from(bid) * BUF_SIZE), len)
        }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: both mappings were made in `new` with these lengths; the buffer group was
        // unregistered (or the ring closed) before this runs.
        unsafe {
            libc::munmap(self.entries.as_ptr().cast(), self.entries_len);
            libc::munmap(self.mem.as_ptr().cast(), self.mem_len);
        }
    }
}

/// Options a ring was set up with.
#[derive(Clone, Copy, Debug, Default)]
struct Setup {
    single_issuer: bool,
    defer_taskrun: bool,
    taskrun_flag: bool,
}

pub struct Ring {
    // Dropped before `bufs`: the kernel stops using the buffers with the ring.
    ring: IoUring<squeue::Entry, cqueue::Entry>,
    bufs: Option<BufRing>,
    setup: Setup,
    entries: HashMap<SockId, Entry>,
    /// Descriptors of the thread's own, as (fd, token).
    tokens: Vec<(RawFd, usize)>,
    generation: u32,
    /// Connect addresses of sockets closed before their connect was submitted.
    retired: Vec<Box<libc::sockaddr_in>>,
    /// Completions read, before they are handled.
    cqes: Vec<(u64, i32, u32)>,
    overflows: u64,
    /// Datagrams dropped because they did not fit a buffer (cannot happen over IPv4).
    pub truncated: u64,
}

/// Whether io_uring can be used here, and why not: a ring is set up and asked whether it
/// knows the operations the driver submits.
pub fn probe() -> io::Result<()> {
    let ring = IoUring::new(8)?;
    let mut probe = io_uring::Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    for (code, name) in [
        (opcode::PollAdd::CODE, "POLL_ADD"),
        (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
        (opcode::Connect::CODE, "CONNECT"),
    ] {
        if !probe.is_supported(code) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("the kernel's io_uring lacks {name}"),
            ));
        }
    }
    Ok(())
}

fn build(setup: Setup) -> io::Result<IoUring<squeue::Entry, cqueue::Entry>> {
    let mut b = IoUring::builder();
    b.setup_cqsize(ENTRIES * 8);
    if setup.single_issuer {
        b.setup_single_issuer();
    }
    if setup.defer_taskrun {
        b.setup_defer_taskrun();
    }
    if setup.taskrun_flag {
        b.setup_taskrun_flag();
    }
    b.build(ENTRIES)
}

impl Ring {
    /// A ring for the calling thread (the only one that may submit to it), whose fd the thread
    /// waits on through epoll: made without `DEFER_TASKRUN` (see the module's documentation).
    pub fn new() -> io::Result<Ring> {
        Ring::make(false, BUF_COUNT)
    }

    /// A ring for a thread that waits in the ring itself (`wait`): with `SINGLE_ISSUER` and
    /// `DEFER_TASKRUN` where the kernel takes them.
    pub fn for_waiting_thread() -> io::Result<Ring> {
        Ring::make(true, BUF_COUNT)
    }

    fn make(defer: bool, buf_count: u16) -> io::Result<Ring> {
        let all = Setup {
            single_issuer: true,
            defer_taskrun: true,
            taskrun_flag: true,
        };
        let mut tries = vec![
            all,
            Setup {
                taskrun_flag: false,
                ..all
            },
            Setup {
                single_issuer: true,
                ..Setup::default()
            },
            Setup::default(),
        ];
        if !defer {
            tries.drain(..2);
        }
        let mut last = None;
        let mut made = None;
        for setup in tries {
            match build(setup) {
                Ok(r) => {
                    made = Some((r, setup));
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let Some((ring, setup)) = made else {
            return Err(last.unwrap_or_else(|| io::Error::other("no io_uring")));
        };
        tracing::debug!(
            "io_uring set up: single issuer {}, deferred task running {}",
            setup.single_issuer,
            setup.defer_taskrun
        );
        let bufs = match BufRing::new(buf_count).and_then(|mut b| {
            // SAFETY: the entries stay mapped until after the group is unregistered (`Drop`).
            unsafe {
                ring.submitter().register_buf_ring_with_flags(
                    b.entries.as_ptr() as u64,
                    b.count,
                    BGID,
                    0,
                )
            }?;
            for bid in 0..b.count {
                b.give(bid);
            }
            Ok(b)
        }) {
            Ok(b) => Some(b),
            Err(e) => {
                tracing::debug!("io_uring: no provided buffers ({e}); UDP receives by readiness");
                None
            }
        };
        Ok(Ring {
            ring,
            bufs,
            setup,
            entries: HashMap::new(),
            tokens: Vec::new(),
            generation: 0,
            retired: Vec::new(),
            cqes: Vec::new(),
            overflows: 0,
            truncated: 0,
        })
    }

    /// The ring's fd: readable when completions are waiting (rings made by `new`).
    pub fn fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }

    fn push(&mut self, sqe: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: what the entries pushed here reference (a connect's address) is kept
            // alive until they are submitted (`Entry::state`, `retired`).
            if unsafe { self.ring.submission().push(sqe) }.is_ok() {
                return Ok(());
            }
            // Queue full: hand what is there to the kernel and try again.
            self.ring.submit()?;
        }
    }

    fn push_or_warn(&mut self, sqe: &squeue::Entry, what: &str) {
        if let Err(e) = self.push(sqe) {
            tracing::warn!("io_uring: cannot {what}: {e}");
        }
    }

    fn next_generation(&mut self) -> u32 {
        self.generation = self.generation.wrapping_add(1) & 0xff_ffff;
        self.generation
    }

    fn poll_sqe(fd: RawFd, mask: u32, ud: u64, multi: bool) -> squeue::Entry {
        opcode::PollAdd::new(types::Fd(fd), mask)
            .multi(multi)
            .build()
            .user_data(ud)
    }

    fn recv_sqe(fd: RawFd, ud: u64) -> squeue::Entry {
        // MSG_TRUNC: the result is the datagram's length even where it did not fit.
        opcode::RecvMulti::new(types::Fd(fd), BGID)
            .flags(libc::MSG_TRUNC)
            .build()
            .user_data(ud)
    }

    /// Starts watching `fd` (socket `id`) for reading, and for writing if asked.
    pub fn watch(&mut self, fd: RawFd, id: SockId, writable: bool) -> io::Result<()> {
        let mut mask = (libc::POLLIN | libc::POLLRDHUP) as u16 as u32;
        if writable {
            mask |= libc::POLLOUT as u16 as u32;
        }
        let generation = self.next_generation();
        self.push(&Ring::poll_sqe(
            fd,
            mask,
            user_data(K_POLL, generation, id),
            true,
        ))?;
        self.entries.insert(
            id,
            Entry {
                fd,
                generation,
                state: State::Watched { mask },
            },
        );
        Ok(())
    }

    /// Connects socket `id` (non-blocking, unconnected) to `dst`; the outcome comes back as
    /// `Connected` (and the socket is then watched for reading and writing) or `ConnectFailed`.
    pub fn connect(&mut self, fd: RawFd, id: SockId, dst: SocketAddrV4) -> io::Result<()> {
        let addr = Box::new(libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: dst.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*dst.ip()).to_be(),
            },
            sin_zero: [0; 8],
        });
        let generation = self.next_generation();
        let sqe = opcode::Connect::new(
            types::Fd(fd),
            (&*addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
        .build()
        .user_data(user_data(K_CONNECT, generation, id));
        self.push(&sqe)?;
        self.entries.insert(
            id,
            Entry {
                fd,
                generation,
                state: State::Connecting { addr },
            },
        );
        Ok(())
    }

    /// Receives on UDP socket `id` through the provided buffers (or watches its readiness where
    /// the ring has none); `udp_recv` hands the datagrams out.
    pub fn udp(&mut self, fd: RawFd, id: SockId) -> io::Result<()> {
        if self.bufs.is_none() {
            return self.watch(fd, id, false);
        }
        let generation = self.next_generation();
        self.push(&Ring::recv_sqe(fd, user_data(K_RECV, generation, id)))?;
        self.entries.insert(
            id,
            Entry {
                fd,
                generation,
                state: State::Udp(Udp {
                    queue: VecDeque::new(),
                    recv: true,
                    poll: false,
                }),
            },
        );
        Ok(())
    }

    /// The next datagram of UDP socket `id` (truncated to `buf`), or None when the socket's
    /// datagrams do not come through the ring. `Err(WouldBlock)` when none is waiting.
    pub fn udp_recv(&mut self, id: SockId, buf: &mut [u8]) -> Option<io::Result<usize>> {
        let e = self.entries.get_mut(&id)?;
        let State::Udp(u) = &mut e.state else {
            return None;
        };
        match u.queue.pop_front() {
            Some(Queued::Data { bid, len }) => {
                let bufs = self.bufs.as_mut()?;
                let data = bufs.data(bid, len);
                let n = data.len().min(buf.len());
                buf[..n].copy_from_slice(&data[..n]);
                bufs.give(bid);
                return Some(Ok(n));
            }
            Some(Queued::Error(errno)) => return Some(Err(io::Error::from_raw_os_error(errno))),
            None => {}
        }
        if u.recv {
            return Some(Err(io::ErrorKind::WouldBlock.into()));
        }
        // The multishot receive ended: read the socket itself until it would block.
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes during the call.
        let n = unsafe { libc::recv(e.fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n >= 0 {
            return Some(Ok(n as usize));
        }
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::WouldBlock {
            let (fd, generation) = (e.fd, e.generation);
            let free = self.bufs.as_ref().map_or(0, |b| b.free);
            let sqe = if free > 0 {
                u.recv = true;
                Ring::recv_sqe(fd, user_data(K_RECV, generation, id))
            } else if !u.poll {
                u.poll = true;
                let mask = libc::POLLIN as u16 as u32;
                Ring::poll_sqe(fd, mask, user_data(K_RPOLL, generation, id), false)
            } else {
                return Some(Err(err));
            };
            self.push_or_warn(&sqe, "arm a receive");
        }
        Some(Err(err))
    }

    /// Watches one of the thread's own descriptors: its readiness comes back as `Token(token)`.
    pub fn watch_token(&mut self, fd: RawFd, token: usize) -> io::Result<()> {
        let index = self.tokens.len() as u32;
        let mask = libc::POLLIN as u16 as u32;
        self.push(&Ring::poll_sqe(fd, mask, user_data(K_TOKEN, 0, index), true))?;
        self.tokens.push((fd, token));
        Ok(())
    }

    fn cancel(&mut self, ud: u64) {
        let sqe = opcode::AsyncCancel::new(ud).build().user_data(IGNORE);
        self.push_or_warn(&sqe, "cancel an operation");
    }

    /// Forgets socket `id`: cancels its operations (in this batch) and gives the buffers of
    /// its unread datagrams back. Its fd may be closed right after: the operations in flight
    /// hold the socket until they are cancelled.
    pub fn unwatch(&mut self, id: SockId) {
        let Some(e) = self.entries.remove(&id) else {
            return;
        };
        let ud = |kind| user_data(kind, e.generation, id);
        match e.state {
            State::Watched { .. } => self.cancel(ud(K_POLL)),
            State::Connecting { addr } => {
                self.retired.push(addr);
                self.cancel(ud(K_CONNECT));
            }
            State::Idle => {}
            State::Udp(u) => {
                if u.recv {
                    self.cancel(ud(K_RECV));
                }
                if u.poll {
                    self.cancel(ud(K_RPOLL));
                }
                if let Some(bufs) = self.bufs.as_mut() {
                    for q in u.queue {
                        if let Queued::Data { bid, .. } = q {
                            bufs.give(bid);
                        }
                    }
                }
            }
        }
    }

    fn after_enter(&mut self) {
        if self.ring.submission().is_empty() {
            self.retired.clear();
        }
    }

    /// Submits everything queued (once per batch), for a thread that waits elsewhere.
    pub fn submit(&mut self) -> io::Result<()> {
        let sq = self.ring.submission();
        // An overflowed completion queue is flushed only by entering the kernel.
        let enter = !sq.is_empty() || sq.cq_overflow() || sq.taskrun();
        drop(sq);
        if enter {
            self.ring.submit()?;
            self.after_enter();
        }
        Ok(())
    }

    /// Submits, and runs the kernel's deferred completions, without waiting.
    fn enter_nowait(&mut self) -> io::Result<()> {
        let to_submit = self.ring.submission().len() as u32;
        // SAFETY: no argument is passed; the queued entries' memory is alive (see `push`).
        let r = unsafe {
            self.ring.submitter().enter::<libc::sigset_t>(
                to_submit,
                0,
                io_uring::EnterFlags::GETEVENTS.bits(),
                None,
            )
        };
        self.after_enter();
        match r {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn has_completions(&mut self) -> bool {
        !self.ring.completion().is_empty()
    }

    /// Submits what the batch queued and waits for a completion, at most `timeout` (None:
    /// without limit) — one `io_uring_enter`. Until `spin_until` it first polls for
    /// completions without sleeping (see `runtime::wait`). True when completions are waiting.
    pub fn wait(&mut self, timeout: Option<Duration>, spin_until: Instant) -> io::Result<bool> {
        let start = Instant::now();
        if timeout == Some(Duration::ZERO) || start < spin_until {
            self.enter_nowait()?;
            if timeout == Some(Duration::ZERO) || self.has_completions() {
                return Ok(self.has_completions());
            }
            while Instant::now() < spin_until {
                if timeout.is_some_and(|t| start.elapsed() >= t) {
                    return Ok(false);
                }
                // Deferred completions are produced only by entering the ring: with the
                // TASKRUN flag the kernel says when there are some.
                let enter = self.setup.defer_taskrun
                    && (!self.setup.taskrun_flag || self.ring.submission().taskrun());
                if enter {
                    self.enter_nowait()?;
                }
                if self.has_completions() {
                    return Ok(true);
                }
                std::hint::spin_loop();
            }
        }
        let left = timeout.map(|t| t.saturating_sub(start.elapsed()));
        let r = match left {
            Some(Duration::ZERO) => return self.enter_nowait().map(|()| self.has_completions()),
            Some(left) => {
                let ts = types::Timespec::from(left);
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args)
            }
            None => self.ring.submitter().submit_and_wait(1),
        };
        self.after_enter();
        match r {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR | libc::EBUSY)) => {
            }
            Err(e) => return Err(e),
        }
        Ok(self.has_completions())
    }

    /// Reads every completion into `into`. Polls the kernel ended (a CQE without the MORE
    /// flag) are armed again.
    pub fn drain(&mut self, into: &mut Vec<Completion>) {
        let mut cqes = std::mem::take(&mut self.cqes);
        loop {
            cqes.clear();
            cqes.extend(
                self.ring
                    .completion()
                    .map(|c| (c.user_data(), c.result(), c.flags())),
            );
            for &(ud, res, flags) in &cqes {
                self.complete(ud, res, flags, into);
            }
            // Completions the queue had no room for wait in the kernel: flush them, read again.
            if !self.ring.submission().cq_overflow() {
                break;
            }
            self.overflows += 1;
            if self.overflows.is_power_of_two() {
                tracing::debug!(
                    "io_uring completion queue overflowed ({} times)",
                    self.overflows
                );
            }
            if let Err(e) = self.ring.submit() {
                tracing::warn!("io_uring: cannot flush completions: {e}");
                break;
            }
        }
        self.cqes = cqes;
    }

    fn complete(&mut self, ud: u64, res: i32, flags: u32, into: &mut Vec<Completion>) {
        let more = cqueue::more(flags);
        let bid = cqueue::buffer_select(flags);
        if bid.is_some() {
            if let Some(b) = self.bufs.as_mut() {
                b.free = b.free.saturating_sub(1);
            }
        }
        let kind = kind_of(ud);
        if kind == K_TOKEN {
            let Some(&(fd, token)) = self.tokens.get(ud as u32 as usize) else {
                return;
            };
            if !more {
                let mask = libc::POLLIN as u16 as u32;
                self.push_or_warn(&Ring::poll_sqe(fd, mask, ud, true), "re-arm a poll");
            }
            if res != -libc::ECANCELED {
                into.push(Completion::Token(token));
            }
            return;
        }
        let id = ud as u32 as SockId;
        let live = kind != K_IGNORE
            && self
                .entries
                .get(&id)
                .is_some_and(|e| e.generation == generation_of(ud));
        if !live {
            // A cancellation's result, or an operation of a socket closed since.
            self.give_back(bid);
            return;
        }
        let e = self.entries.get_mut(&id).expect("checked live");
        let fd = e.fd;
        match (kind, &mut e.state) {
            (K_POLL, State::Watched { mask }) => {
                let mask = *mask;
                let ready = if res >= 0 {
                    Ready::from_mask(res as u32)
                } else {
                    Ready {
                        error: true,
                        readable: true,
                        ..Ready::default()
                    }
                };
                if !more {
                    self.push_or_warn(&Ring::poll_sqe(fd, mask, ud, true), "re-arm a poll");
                }
                if res != -libc::ECANCELED {
                    into.push(Completion::Ready(id, ready));
                }
            }
            (K_CONNECT, State::Connecting { .. }) => {
                if res == -libc::ECANCELED {
                    e.state = State::Idle;
                } else if res < 0 {
                    e.state = State::Idle;
                    let kind = io::Error::from_raw_os_error(-res).kind();
                    into.push(Completion::ConnectFailed(id, kind));
                } else {
                    let mask = (libc::POLLIN | libc::POLLRDHUP | libc::POLLOUT) as u16 as u32;
                    e.state = State::Watched { mask };
                    let poll = user_data(K_POLL, e.generation, id);
                    into.push(Completion::Connected(id));
                    self.push_or_warn(&Ring::poll_sqe(fd, mask, poll, true), "watch a socket");
                }
            }
            (K_RECV, State::Udp(u)) => {
                if !more {
                    u.recv = false;
                }
                let was_empty = u.queue.is_empty();
                match (res, bid) {
                    (n, Some(bid)) if n >= 0 && n as usize <= BUF_SIZE => {
                        u.queue.push_back(Queued::Data {
                            bid,
                            len: n as usize,
                        });
                    }
                    (n, bid) if n >= 0 => {
                        // Larger than a buffer: its tail is lost.
                        self.truncated += 1;
                        tracing::debug!("io_uring: a {n}-byte datagram did not fit a buffer");
                        self.give_back(bid);
                        return;
                    }
                    // Out of buffers, or cancelled: `udp_recv` reads the socket itself.
                    (n, _) if n == -libc::ENOBUFS || n == -libc::ECANCELED => {}
                    (n, _) => u.queue.push_back(Queued::Error(-n)),
                }
                // The core hears of datagrams when the queue fills from empty, and when the
                // receive ended (it then reads until `udp_recv` would block, which re-arms).
                if (was_empty && !u.queue.is_empty()) || !more {
                    into.push(Completion::Readable(id));
                }
            }
            (K_RPOLL, State::Udp(u)) => {
                u.poll = false;
                into.push(Completion::Readable(id));
            }
            _ => self.give_back(bid),
        }
    }

    fn give_back(&mut self, bid: Option<u16>) {
        if let (Some(bid), Some(b)) = (bid, self.bufs.as_mut()) {
            b.give(bid);
        }
    }

    pub fn watched(&self) -> usize {
        self.entries.len()
    }

    /// Provided buffers in the kernel's hands (None: the ring has none).
    pub fn free_buffers(&self) -> Option<usize> {
        self.bufs.as_ref().map(|b| b.free)
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        if self.bufs.is_some() {
            // Nothing selects a buffer any more before they are unmapped.
            let _ = self.ring.submitter().unregister_buf_ring(BGID);
        }
    }
}
