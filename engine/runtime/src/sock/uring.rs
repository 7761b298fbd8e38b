//! io_uring for the host-socket driver: one ring per thread.
//!
//! TCP needs synchronous answers (how much a socket took, a peek at what it holds), so TCP
//! sends, peeks and consumes stay plain non-blocking syscalls; io_uring's multishot receive
//! cannot peek. What goes through the ring:
//!
//! - TCP and ICMP sockets' readiness: a multishot `IORING_OP_POLL_ADD` each (edge-triggered,
//!   like mio's registration), from the moment the driver made the socket. A TCP connect is a
//!   plain non-blocking `connect` (the driver's documentation says why); a socket still
//!   connecting finishes on its first writable readiness.
//! - UDP receives: one multishot `IORING_OP_RECV` per socket into a ring of provided buffers
//!   (`IORING_REGISTER_PBUF_RING`) shared by the thread's sockets. Completed datagrams wait in a
//!   per-socket queue (bounded by the buffer count: every queued datagram holds a buffer) until
//!   `udp_recv` copies one out and gives its buffer back to the ring at once. Every buffer holds
//!   the largest datagram (65507 bytes), so a datagram is never truncated: the memory is mapped
//!   lazily, and a buffer that only ever carried small datagrams costs one page. When the
//!   buffers run out (`ENOBUFS` ends the multishot) or the receive ends otherwise (an ICMP
//!   error, which is queued in order), the socket falls back to a plain `recv` until it would
//!   block, and then the multishot is armed again (or, with no buffer free, a one-shot poll).
//! - The thread's TAP queue (`read_frames`): one multishot `IORING_OP_READ_MULTISHOT` into a
//!   second group of provided buffers, each the size of the largest frame. A frame is a
//!   completion: no `read` per frame, and none that finds the queue empty. The thread handles
//!   each frame in place and gives its buffer back at once (`FrameBufs::handle`); when the
//!   buffers ran out before it came (`ENOBUFS` ends the multishot), `frames_handled` arms the
//!   read again. Where the kernel has no multishot read the queue is watched like below.
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

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;

use std::os::fd::{AsRawFd, RawFd};
use std::ptr::NonNull;
use std::rc::Rc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use io_uring::types::BufRingEntry;
use io_uring::{cqueue, opcode, squeue, types, IoUring};

use hubnat_core::sockio::SockId;
use hubnat_core::FastHashMap;

/// Submission queue entries; the completion queue is eight times as large (a busy socket's
/// multishot poll posts a completion per wake-up; overflow is flushed, see `drain`).
const ENTRIES: u32 = 1024;
/// Size of a provided buffer: the largest UDP payload over IPv4 (65507) fits.
pub const BUF_SIZE: usize = 1 << 16;
/// Provided buffers per ring (a power of two).
pub const BUF_COUNT: u16 = 64;
/// The provided-buffer group of the ring's buffers.
const BGID: u16 = 0;
/// The provided-buffer group the thread's TAP queue is read into (`read_frames`).
const FRAME_BGID: u16 = 1;
/// Memory the frame buffers of one ring may take (at least 64 buffers, at most 512): with
/// frames of MTU 1500 that is 512 buffers (a batch of 512 frames per wake-up), with frames of
/// 64 KiB (MTU 65520, or a guest's TCP super-segments) 64, 4 MiB. Pages are backed only once
/// written: a large buffer that carries small frames costs one.
const FRAME_BUF_BUDGET: usize = 2 << 20;

/// Kinds of operations, in the top byte of user_data.
const K_IGNORE: u8 = 0;
const K_POLL: u8 = 1;
const K_RECV: u8 = 3;
const K_RPOLL: u8 = 4;
const K_TOKEN: u8 = 5;
const K_FRAME: u8 = 6;
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
    /// A UDP socket has datagrams (or an error) for `udp_recv`.
    Readable(SockId),
    /// A descriptor given to `watch_token` is ready.
    Token(usize),
}

/// A received datagram (in provided buffer `bid`, `len` bytes from `start`) or a receive error,
/// waiting for `udp_recv_segments`. `segment`: the size of the datagrams of a run the host's
/// stack handed over as one (UDP_GRO), 0 for one datagram.
enum Queued {
    Data {
        bid: u16,
        start: u16,
        len: usize,
        segment: u16,
    },
    Error(i32),
}

struct Udp {
    /// Received by recvmsg, whose control messages say the size of a run's datagrams (the
    /// socket has UDP_GRO on): `runs`.
    runs: bool,
    queue: VecDeque<Queued>,
    /// The multishot receive is in flight.
    recv: bool,
    /// A one-shot POLLIN is in flight (the receive is off for want of buffers).
    poll: bool,
}

enum State {
    /// A multishot readiness poll with this mask is in flight.
    Watched {
        mask: u32,
    },
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
    /// Bytes in each buffer (`BUF_SIZE` but in tests).
    size: usize,
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
    fn new(count: u16, size: usize) -> io::Result<BufRing> {
        assert!(count.is_power_of_two());
        let entries_len = usize::from(count) * std::mem::size_of::<BufRingEntry>();
        let entries = map(entries_len)?;
        let mem_len = usize::from(count) * size;
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
            size,
            tail: 0,
            free: 0,
        })
    }

    /// `count` buffers of `size` bytes, registered with `ring` as group `bgid`, all in the
    /// kernel's hands.
    fn registered(ring: &IoUring, count: u16, size: usize, bgid: u16) -> io::Result<BufRing> {
        let mut b = BufRing::new(count, size)?;
        // SAFETY: the entries stay mapped until after the group is unregistered (`Ring`'s
        // drop, which runs before the buffers are dropped: see `Ring::ring`).
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                b.entries.as_ptr() as u64,
                b.count,
                bgid,
                0,
            )
        }?;
        for bid in 0..b.count {
            b.give(bid);
        }
        Ok(b)
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
        e.set_addr(self.mem.as_ptr() as u64 + u64::from(bid) * self.size as u64);
        e.set_len(self.size as u32);
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

    /// The first `len` bytes of buffer `bid`, to change in place (a frame's header taken off).
    fn data_mut(&mut self, bid: u16, len: usize) -> &mut [u8] {
        let len = len.min(self.size);
        if bid >= self.count {
            return &mut [];
        }
        // SAFETY: as in `data`; the kernel does not touch the buffer before `give`, and the
        // exclusive borrow of the ring keeps any other view of it away.
        unsafe {
            std::slice::from_raw_parts_mut(self.mem.as_ptr().add(usize::from(bid) * self.size), len)
        }
    }

    /// The first `len` bytes of buffer `bid`.
    fn data(&self, bid: u16, len: usize) -> &[u8] {
        let len = len.min(self.size);
        if bid >= self.count {
            return &[];
        }
        // SAFETY: buffer `bid` lies inside the mapping; the kernel finished writing it (its
        // completion was read) and does not take it again before `give`.
        unsafe {
            std::slice::from_raw_parts(self.mem.as_ptr().add(usize::from(bid) * self.size), len)
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

/// The buffers a thread's TAP queue is read into, shared by its ring (which hands them to
/// the kernel) and the thread (which handles the frames in them). They are unmapped when both
/// let go, the ring having stopped the read by then.
#[derive(Clone)]
pub struct FrameBufs(Rc<RefCell<BufRing>>);

impl FrameBufs {
    /// Calls `f` with frame `bid` (`len` bytes, as `Ring::take_frames` gave them), then gives
    /// its buffer back to the kernel.
    pub fn handle<R>(&self, bid: u16, len: u32, f: impl FnOnce(&mut [u8]) -> R) -> R {
        let r = f(self.0.borrow_mut().data_mut(bid, len as usize));
        self.0.borrow_mut().give(bid);
        r
    }
}

/// The multishot read of the thread's TAP queue (`Ring::read_frames`).
struct FrameRead {
    fd: RawFd,
    bufs: FrameBufs,
    /// The multishot read is in flight.
    armed: bool,
    /// Frames read, as (buffer, length), in order, until the thread takes them.
    ready: Vec<(u16, u32)>,
    /// The error that ended the read, for the thread to report.
    failed: Option<i32>,
}

pub struct Ring {
    // Dropped before `bufs` and `frames`: the kernel stops using the buffers with the ring.
    ring: IoUring<squeue::Entry, cqueue::Entry>,
    bufs: Option<BufRing>,
    frames: Option<FrameRead>,
    setup: Setup,
    entries: FastHashMap<SockId, Entry>,
    /// Descriptors of the thread's own, as (fd, token).
    tokens: Vec<(RawFd, usize)>,
    generation: u32,
    /// Completions read, before they are handled.
    cqes: Vec<(u64, i32, u32)>,
    overflows: u64,
    /// Datagrams dropped because they did not fit a buffer (cannot happen over IPv4).
    pub truncated: u64,
    /// What a multishot recvmsg of a socket with runs asks for (no address, room for the
    /// UDP_GRO control message); the kernel reads it when the receive is armed.
    runs_msg: Box<MsgTemplate>,
}

/// A `msghdr` that only describes sizes (its pointers are null), shared by every multishot
/// recvmsg of a ring.
struct MsgTemplate(libc::msghdr);

// SAFETY: the msghdr's pointers are all null: it refers to no memory, only sizes.
unsafe impl Send for MsgTemplate {}

impl MsgTemplate {
    fn new() -> MsgTemplate {
        // SAFETY: msghdr is plain data, for which all zeroes is a valid (empty) value.
        let mut m: libc::msghdr = unsafe { std::mem::zeroed() };
        // SAFETY: CMSG_SPACE only computes a size.
        m.msg_controllen =
            unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) } as _;
        MsgTemplate(m)
    }
}

/// The size of a run's datagrams in control messages `control` (a UDP_GRO message); 0: none.
pub(crate) fn gro_segment(control: &[u8]) -> u16 {
    let hdr = std::mem::size_of::<libc::cmsghdr>();
    let mut at = 0;
    while at + hdr <= control.len() {
        let c = &control[at..];
        let len = usize::from_ne_bytes(c[..8].try_into().expect("8 bytes"));
        let level = i32::from_ne_bytes(c[8..12].try_into().expect("4 bytes"));
        let kind = i32::from_ne_bytes(c[12..16].try_into().expect("4 bytes"));
        if len < hdr || at + len > control.len() {
            break;
        }
        if level == libc::SOL_UDP && kind == libc::UDP_GRO && len >= hdr + 4 {
            let v = i32::from_ne_bytes(c[hdr..hdr + 4].try_into().expect("4 bytes"));
            return u16::try_from(v).unwrap_or(0);
        }
        // Each message is padded to the alignment of a cmsghdr's length field.
        at += len.next_multiple_of(std::mem::size_of::<usize>());
    }
    0
}

/// Whether io_uring can be used here, and why not: a ring is set up and asked whether it
/// knows the operations the driver submits.
pub fn probe() -> io::Result<()> {
    let ring = IoUring::new(8)?;
    let mut probe = io_uring::Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    // The driver's rings are restricted to their opcodes (`restrict_driver_ring`): a kernel
    // that cannot do that gets no io_uring from hubnat.
    let restricted = IoUring::builder().setup_r_disabled().build(8)?;
    restrict_driver_ring(&restricted, false)?;
    for (code, name) in [
        (opcode::PollAdd::CODE, "POLL_ADD"),
        (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
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

/// Limits an io_uring, set up disabled (`IORING_SETUP_R_DISABLED`), to the submission opcodes
/// `ops` (with the SQE flags `flags`) and the register opcodes `register_ops`, then enables it.
/// io_uring's work is not seen by seccomp, so a ring that could take any opcode would be a way
/// around the system-call filter; a restricted one takes only what hubnat submits.
pub(crate) fn restrict_and_enable(
    ring: &IoUring,
    ops: &[u8],
    flags: u8,
    register_ops: &[u8],
) -> io::Result<()> {
    use io_uring::register::Restriction;
    let mut res: Vec<Restriction> = ops.iter().map(|&op| Restriction::sqe_op(op)).collect();
    res.extend(register_ops.iter().map(|&op| Restriction::register_op(op)));
    res.push(Restriction::sqe_flags_allowed(flags));
    ring.submitter().register_restrictions(&mut res)?;
    ring.submitter().register_enable_rings()
}

/// What this driver's rings may do: the operations it submits, provided buffers for multishot
/// receives, and taking the buffer ring back at the end.
/// The multishot read is allowed only where the kernel knows it: a restriction naming an
/// opcode the kernel does not know is refused, and the ring with it.
fn restrict_driver_ring(ring: &IoUring, read_multi: bool) -> io::Result<()> {
    let mut ops = vec![
        opcode::PollAdd::CODE,
        opcode::AsyncCancel::CODE,
        opcode::RecvMulti::CODE,
        opcode::RecvMsgMulti::CODE,
    ];
    if read_multi {
        ops.push(opcode::ReadMulti::CODE);
    }
    restrict_and_enable(
        ring,
        &ops,
        squeue::Flags::BUFFER_SELECT.bits(),
        &[IORING_UNREGISTER_PBUF_RING],
    )
}

/// Buffers for frames of `frame_size` bytes, registered with `ring` as `FRAME_BGID` and
/// handed to the kernel.
fn frame_bufs(ring: &IoUring, frame_size: usize) -> io::Result<FrameBufs> {
    let count = (FRAME_BUF_BUDGET / frame_size.max(1)).clamp(64, 512);
    let count = 1u16 << (usize::BITS - 1 - count.leading_zeros());
    let b = BufRing::registered(ring, count, frame_size, FRAME_BGID)?;
    Ok(FrameBufs(Rc::new(RefCell::new(b))))
}

/// Whether the kernel has the multishot read (`IORING_OP_READ_MULTISHOT`).
fn has_read_multi(ring: &IoUring) -> bool {
    let mut probe = io_uring::Probe::new();
    ring.submitter().register_probe(&mut probe).is_ok()
        && probe.is_supported(opcode::ReadMulti::CODE)
}

/// io_uring_register(2)'s opcode that takes a provided-buffer ring back (the kernel's value;
/// the io-uring crate keeps its own copy private).
const IORING_UNREGISTER_PBUF_RING: u8 = 23;

fn build(setup: Setup) -> io::Result<IoUring<squeue::Entry, cqueue::Entry>> {
    let mut b = IoUring::builder();
    b.setup_cqsize(ENTRIES * 8);
    // Enabled once restricted (`restrict_driver_ring`).
    b.setup_r_disabled();
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
        Ring::make(false, BUF_COUNT, BUF_SIZE, None)
    }

    /// A ring for a thread that waits in the ring itself (`wait`): with `SINGLE_ISSUER` and
    /// `DEFER_TASKRUN` where the kernel takes them. With `frame_size`, it has buffers of that
    /// size to read a TAP queue into (`read_frames`), registered here: once restricted, the
    /// ring takes no new buffers.
    pub fn for_waiting_thread(frame_size: Option<usize>) -> io::Result<Ring> {
        Ring::make(true, BUF_COUNT, BUF_SIZE, frame_size)
    }

    fn make(
        defer: bool,
        buf_count: u16,
        buf_size: usize,
        frame_size: Option<usize>,
    ) -> io::Result<Ring> {
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
        let bufs = match BufRing::registered(&ring, buf_count, buf_size, BGID) {
            Ok(b) => Some(b),
            Err(e) => {
                tracing::debug!("io_uring: no provided buffers ({e}); UDP receives by readiness");
                None
            }
        };
        let read_multi = has_read_multi(&ring);
        let frames = match frame_size
            .filter(|_| read_multi)
            .map(|size| frame_bufs(&ring, size))
        {
            Some(Ok(bufs)) => Some(FrameRead {
                fd: -1,
                bufs,
                armed: false,
                ready: Vec::new(),
                failed: None,
            }),
            Some(Err(e)) => {
                tracing::debug!("io_uring: no buffers for the TAP queue ({e}); read by readiness");
                None
            }
            None => None,
        };
        restrict_driver_ring(&ring, read_multi)?;
        Ok(Ring {
            ring,
            bufs,
            frames,
            setup,
            entries: FastHashMap::default(),
            tokens: Vec::new(),
            generation: 0,
            cqes: Vec::new(),
            overflows: 0,
            truncated: 0,
            runs_msg: Box::new(MsgTemplate::new()),
        })
    }

    /// The ring's fd: readable when completions are waiting (rings made by `new`).
    pub fn fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }

    fn push(&mut self, sqe: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: what the entries pushed here reference (the multishot recvmsg's header,
            // `runs_msg`) lives as long as the ring.
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

    /// The multishot receive of a UDP socket: recvmsg for one with `runs`.
    fn recv_sqe(&self, fd: RawFd, ud: u64, runs: bool) -> squeue::Entry {
        if runs {
            return opcode::RecvMsgMulti::new(types::Fd(fd), &self.runs_msg.0, BGID)
                .flags(libc::MSG_TRUNC as u32)
                .build()
                .user_data(ud);
        }
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

    /// Receives on UDP socket `id` through the provided buffers (or watches its readiness where
    /// the ring has none); `udp_recv_segments` hands the datagrams out. With `runs` (the socket
    /// has UDP_GRO on) by recvmsg, which says how a run the host handed over as one is cut.
    pub fn udp(&mut self, fd: RawFd, id: SockId, runs: bool) -> io::Result<()> {
        if self.bufs.is_none() {
            return self.watch(fd, id, false);
        }
        let generation = self.next_generation();
        self.push(&self.recv_sqe(fd, user_data(K_RECV, generation, id), runs))?;
        self.entries.insert(
            id,
            Entry {
                fd,
                generation,
                state: State::Udp(Udp {
                    runs,
                    queue: VecDeque::new(),
                    recv: true,
                    poll: false,
                }),
            },
        );
        Ok(())
    }

    /// The next datagram of UDP socket `id` (truncated to `buf`), or run of datagrams with the
    /// size of each (0: one datagram; see `SockIo::udp_recv_segments`), or None when the
    /// socket's datagrams do not come through the ring. `Err(WouldBlock)` when none is waiting.
    pub fn udp_recv_segments(
        &mut self,
        id: SockId,
        buf: &mut [u8],
    ) -> Option<io::Result<(usize, usize)>> {
        let e = self.entries.get_mut(&id)?;
        let State::Udp(u) = &mut e.state else {
            return None;
        };
        match u.queue.pop_front() {
            Some(Queued::Data {
                bid,
                start,
                len,
                segment,
            }) => {
                let bufs = self.bufs.as_mut()?;
                let start = usize::from(start);
                let data = &bufs.data(bid, start + len)[start.min(start + len)..];
                let n = data.len().min(buf.len());
                buf[..n].copy_from_slice(&data[..n]);
                bufs.give(bid);
                return Some(Ok((n, usize::from(segment))));
            }
            Some(Queued::Error(errno)) => return Some(Err(io::Error::from_raw_os_error(errno))),
            None => {}
        }
        if u.recv {
            return Some(Err(io::ErrorKind::WouldBlock.into()));
        }
        // The multishot receive ended: read the socket itself until it would block.
        let got = if u.runs {
            crate::sock::driver::recv_segments(e.fd, buf)
        } else {
            // SAFETY: `buf` is valid for writes of `buf.len()` bytes during the call.
            let n = unsafe { libc::recv(e.fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n >= 0 {
                Ok((n as usize, 0))
            } else {
                Err(io::Error::last_os_error())
            }
        };
        let err = match got {
            Ok(r) => return Some(Ok(r)),
            Err(e) => e,
        };
        if err.kind() == io::ErrorKind::WouldBlock {
            let (fd, generation, runs) = (e.fd, e.generation, u.runs);
            let free = self.bufs.as_ref().map_or(0, |b| b.free);
            let sqe = if free > 0 {
                u.recv = true;
                self.recv_sqe(fd, user_data(K_RECV, generation, id), runs)
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
    /// Reads `fd` (the thread's TAP queue, non-blocking) by a multishot read into the buffers
    /// the ring was made with (`for_waiting_thread`); the frames are taken with `take_frames`.
    /// None where the kernel has no multishot read or the buffers could not be set up: the
    /// caller then watches the queue with `watch_token` and reads it itself.
    pub fn read_frames(&mut self, fd: RawFd) -> io::Result<Option<FrameBufs>> {
        let Some(f) = self.frames.as_mut() else {
            return Ok(None);
        };
        f.fd = fd;
        let bufs = f.bufs.clone();
        self.frames_handled()?;
        Ok(Some(bufs))
    }

    /// Moves the frames read so far into `into` (as (buffer, length)), to be handled with
    /// `FrameBufs::handle`.
    pub fn take_frames(&mut self, into: &mut Vec<(u16, u32)>) {
        if let Some(f) = self.frames.as_mut() {
            into.append(&mut f.ready);
        }
    }

    /// After the frames taken were handled: arms the read again if it ended (its buffers ran
    /// out); an error that ended it is returned once.
    pub fn frames_handled(&mut self) -> io::Result<()> {
        let Some(f) = self.frames.as_mut() else {
            return Ok(());
        };
        if let Some(errno) = f.failed.take() {
            return Err(io::Error::from_raw_os_error(errno));
        }
        if f.armed || f.fd < 0 {
            return Ok(());
        }
        // Length 0: each read takes a whole provided buffer (the kernel refuses any other).
        let sqe = opcode::ReadMulti::new(types::Fd(f.fd), 0, FRAME_BGID)
            .build()
            .user_data(user_data(K_FRAME, 0, 0));
        f.armed = true;
        self.push(&sqe)
    }

    pub fn watch_token(&mut self, fd: RawFd, token: usize) -> io::Result<()> {
        let index = self.tokens.len() as u32;
        let mask = libc::POLLIN as u16 as u32;
        self.push(&Ring::poll_sqe(
            fd,
            mask,
            user_data(K_TOKEN, 0, index),
            true,
        ))?;
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

    /// Submits everything queued (once per batch), for a thread that waits elsewhere.
    pub fn submit(&mut self) -> io::Result<()> {
        let sq = self.ring.submission();
        // An overflowed completion queue is flushed only by entering the kernel.
        let enter = !sq.is_empty() || sq.cq_overflow() || sq.taskrun();
        drop(sq);
        if enter {
            self.ring.submit()?;
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
                if !crate::clock::spin_turn(spin_until) {
                    break;
                }
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
        match r {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                ) => {}
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
        let kind = kind_of(ud);
        if kind == K_FRAME {
            self.frame_read(res, more, bid);
            return;
        }
        if bid.is_some() {
            if let Some(b) = self.bufs.as_mut() {
                b.free = b.free.saturating_sub(1);
            }
        }
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
        let buf_size = self.bufs.as_ref().map_or(0, |b| b.size);
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
            (K_RECV, State::Udp(u)) => {
                if !more {
                    u.recv = false;
                }
                let was_empty = u.queue.is_empty();
                let got = match (res, bid) {
                    (n, Some(bid)) if n >= 0 && u.runs => {
                        let Some(bufs) = self.bufs.as_ref() else {
                            return;
                        };
                        let buffer = bufs.data(bid, n as usize);
                        match types::RecvMsgOut::parse(buffer, &self.runs_msg.0) {
                            Ok(m) if !m.is_payload_truncated() => {
                                let start = buffer.len() - m.payload_data().len();
                                Some(Queued::Data {
                                    bid,
                                    start: start as u16,
                                    len: m.payload_data().len(),
                                    segment: gro_segment(m.control_data()),
                                })
                            }
                            _ => None,
                        }
                    }
                    (n, Some(bid)) if n >= 0 && n as usize <= buf_size => Some(Queued::Data {
                        bid,
                        start: 0,
                        len: n as usize,
                        segment: 0,
                    }),
                    _ => None,
                };
                match (res, bid) {
                    _ if got.is_some() => u.queue.extend(got),
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
                // The core hears of datagrams when the queue fills from empty, and of an ended
                // receive (it then reads until `udp_recv` would block, which re-arms); with
                // datagrams queued it was told already and reads them first.
                if was_empty && (!u.queue.is_empty() || !more) {
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

    fn frame_read(&mut self, res: i32, more: bool, bid: Option<u16>) {
        let Some(f) = self.frames.as_mut() else {
            return;
        };
        if !more {
            f.armed = false;
        }
        if bid.is_some() {
            if let Ok(mut b) = f.bufs.0.try_borrow_mut() {
                b.free = b.free.saturating_sub(1);
            }
        }
        match (res, bid) {
            // An empty read still holds a buffer: the thread gives it back with the rest (the
            // buffers may be borrowed by a frame being handled right now).
            (n, Some(bid)) => f.ready.push((bid, n.max(0) as u32)),
            // Out of buffers (armed again once the thread gave them back), or the ring's end.
            (n, None) if n == -libc::ENOBUFS || n == -libc::ECANCELED || n >= 0 => {}
            (n, None) => f.failed = Some(-n),
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
        // Requests still in flight (the polls of the thread's TAP queue among them) hold their
        // files until the kernel tears the ring down, in the background after it is closed: a
        // TAP device would outlive hubnat and a new instance could not take its name at once.
        // Cancelling them all now lets the files go before this returns.
        let any = opcode::AsyncCancel2::new(types::CancelBuilder::any().all())
            .build()
            .user_data(IGNORE);
        if self.push(&any).is_ok() {
            let ts = types::Timespec::from(Duration::from_millis(200));
            let args = types::SubmitArgs::new().timespec(&ts);
            let _ = self.ring.submitter().submit_with_args(1, &args);
        }
        // Nothing selects a buffer any more before they are unmapped.
        if self.bufs.is_some() {
            let _ = self.ring.submitter().unregister_buf_ring(BGID);
        }
        if self.frames.is_some() {
            let _ = self.ring.submitter().unregister_buf_ring(FRAME_BGID);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, UdpSocket};

    #[test]
    fn poll_masks_translate() {
        let r = Ready::from_mask((libc::POLLIN | libc::POLLOUT) as u32);
        assert!(r.readable && r.writable && !r.error && !r.read_closed);
        let r = Ready::from_mask((libc::POLLHUP | libc::POLLERR) as u32);
        assert!(r.error && r.read_closed && r.write_closed && !r.readable);
        let r = Ready::from_mask(libc::POLLRDHUP as u32);
        assert!(r.read_closed && !r.write_closed);
    }

    #[test]
    fn user_data_carries_kind_generation_and_id() {
        let ud = user_data(K_RECV, 0x12_3456, 0xdead_beef);
        assert_eq!(kind_of(ud), K_RECV);
        assert_eq!(generation_of(ud), 0x12_3456);
        assert_eq!(ud as u32, 0xdead_beef);
        // Generations wrap within their 24 bits.
        assert_eq!(generation_of(user_data(K_POLL, 0x0100_0001, 1)), 1);
    }

    fn ring(bufs: u16) -> Option<Ring> {
        probe().ok()?;
        Some(Ring::make(true, bufs, BUF_SIZE, None).unwrap())
    }

    /// Waits up to 50 ms in the ring, then reads the completions.
    fn pump(r: &mut Ring, into: &mut Vec<Completion>) {
        r.wait(Some(Duration::from_millis(50)), Instant::now())
            .unwrap();
        r.drain(into);
    }

    fn pump_until(r: &mut Ring, want: impl Fn(&Completion) -> bool) -> Vec<Completion> {
        let mut got = Vec::new();
        for _ in 0..100 {
            pump(r, &mut got);
            if got.iter().any(&want) {
                return got;
            }
        }
        panic!("completion did not come: {got:?}");
    }

    /// Reads every frame `r` has read from its queue (as `Worker` does), until `want` came
    /// or a second passes.
    fn read_queue(r: &mut Ring, bufs: &FrameBufs, want: usize) -> Vec<Vec<u8>> {
        let (mut got, mut taken, mut completions) = (Vec::new(), Vec::new(), Vec::new());
        let until = Instant::now() + Duration::from_secs(1);
        while got.len() < want && Instant::now() < until {
            pump(r, &mut completions);
            r.take_frames(&mut taken);
            for (bid, len) in taken.drain(..) {
                bufs.handle(bid, len, |f| got.push(f.to_vec()));
            }
            r.frames_handled().unwrap();
        }
        got
    }

    #[test]
    fn a_queue_read_by_the_ring_gives_every_frame_in_order_past_its_buffers() {
        use std::os::unix::net::UnixDatagram;
        if probe().is_err() {
            return;
        }
        // Frames of 128 KiB: the budget makes the fewest buffers, 64.
        let mut r = Ring::make(true, 8, 2048, Some(128 << 10)).unwrap();
        let (tx, rx) = UnixDatagram::pair().unwrap();
        rx.set_nonblocking(true).unwrap();
        let Some(bufs) = r.read_frames(rx.as_raw_fd()).unwrap() else {
            eprintln!("skipped: this kernel has no multishot read");
            return;
        };
        assert_eq!(bufs.0.borrow().count, 64);
        // 150 frames queued before the ring looks: it runs out of buffers twice.
        let frames: Vec<Vec<u8>> = (0..150u8).map(|i| vec![i; 60 + usize::from(i)]).collect();
        for f in &frames {
            tx.send(f).unwrap();
        }
        assert_eq!(read_queue(&mut r, &bufs, 150), frames);
        // The read stays armed for what comes later, and the largest frame arrives whole.
        let big = vec![7u8; 100 << 10];
        tx.send(&big).unwrap();
        tx.send(b"after").unwrap();
        assert_eq!(read_queue(&mut r, &bufs, 2), vec![big, b"after".to_vec()]);
        assert_eq!(
            bufs.0.borrow().free,
            64,
            "every buffer went back to the kernel"
        );
    }

    #[test]
    fn an_error_that_ends_the_read_is_reported_once() {
        if probe().is_err() {
            return;
        }
        let mut r = Ring::make(true, 8, 2048, Some(2048)).unwrap();
        // A listening TCP socket cannot be read: the read ends with an error.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let Some(_bufs) = r.read_frames(l.as_raw_fd()).unwrap() else {
            return;
        };
        let mut completions = Vec::new();
        let mut failed = None;
        for _ in 0..20 {
            pump(&mut r, &mut completions);
            if let Err(e) = r.frames_handled() {
                failed = Some(e);
                break;
            }
        }
        let e = failed.expect("the failed read is reported");
        assert_eq!(e.raw_os_error(), Some(libc::ENOTCONN), "{e}");
    }

    fn tcp_socket() -> std::os::fd::OwnedFd {
        use std::os::fd::FromRawFd;
        // SAFETY: plain socket creation, checked below.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        assert!(fd >= 0);
        // SAFETY: a fresh fd owned by nobody else.
        unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }
    }

    /// A peer, and a non-blocking UDP socket connected to it.
    fn udp_pair() -> (UdpSocket, UdpSocket) {
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        let ours = UdpSocket::bind("127.0.0.1:0").unwrap();
        ours.connect(peer.local_addr().unwrap()).unwrap();
        peer.connect(ours.local_addr().unwrap()).unwrap();
        ours.set_nonblocking(true).unwrap();
        (peer, ours)
    }

    #[test]
    fn udp_round_trip_through_provided_buffers() {
        let Some(mut r) = ring(8) else { return };
        let (peer, ours) = udp_pair();
        r.udp(ours.as_raw_fd(), 1, false).unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(
            r.udp_recv_segments(1, &mut buf)
                .unwrap()
                .unwrap_err()
                .kind(),
            io::ErrorKind::WouldBlock
        );
        pump(&mut r, &mut Vec::new());
        peer.send(b"hello").unwrap();
        pump_until(&mut r, |c| *c == Completion::Readable(1));
        assert_eq!(r.free_buffers(), Some(7), "the datagram holds a buffer");
        assert_eq!(r.udp_recv_segments(1, &mut buf).unwrap().unwrap(), (5, 0));
        assert_eq!(&buf[..5], b"hello");
        assert_eq!(r.free_buffers(), Some(8), "given back at once");
        assert_eq!(
            r.udp_recv_segments(1, &mut buf)
                .unwrap()
                .unwrap_err()
                .kind(),
            io::ErrorKind::WouldBlock
        );
        // Truncated to the caller's buffer, like recv(2).
        peer.send(&[9u8; 100]).unwrap();
        pump_until(&mut r, |c| *c == Completion::Readable(1));
        assert_eq!(r.udp_recv_segments(1, &mut buf).unwrap().unwrap(), (64, 0));
        // Not a ring socket: the caller receives itself.
        assert!(r.udp_recv_segments(99, &mut buf).is_none());
    }

    /// Reads every datagram `r` has for socket `id` until it would block, pumping between.
    fn read_all(r: &mut Ring, id: SockId, want: usize, buf: &mut [u8]) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        for _ in 0..200 {
            loop {
                match r.udp_recv_segments(id, buf).unwrap() {
                    Ok((n, _)) => got.push(buf[..n].to_vec()),
                    Err(e) => {
                        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
                        break;
                    }
                }
            }
            if got.len() >= want {
                return got;
            }
            pump(r, &mut Vec::new());
        }
        panic!("{} of {want} datagrams came", got.len());
    }

    #[test]
    fn a_burst_larger_than_the_buffers_arrives_whole_and_in_order() {
        let Some(mut r) = ring(8) else { return };
        let (peer, ours) = udp_pair();
        r.udp(ours.as_raw_fd(), 1, false).unwrap();
        pump(&mut r, &mut Vec::new());
        const N: u32 = 100;
        for i in 0..N {
            peer.send(&i.to_be_bytes()).unwrap();
        }
        // The receive runs out of buffers (ENOBUFS ends it): the core is told to read.
        let got = pump_until(&mut r, |c| *c == Completion::Readable(1));
        assert_eq!(
            got.iter()
                .filter(|c| **c == Completion::Readable(1))
                .count(),
            1
        );
        assert_eq!(r.free_buffers(), Some(0), "every buffer holds a datagram");
        let mut buf = [0u8; 16];
        let got = read_all(&mut r, 1, N as usize, &mut buf);
        let want: Vec<Vec<u8>> = (0..N).map(|i| i.to_be_bytes().to_vec()).collect();
        assert_eq!(got, want);
        // Re-armed: the next datagram comes through the buffers again.
        pump(&mut r, &mut Vec::new());
        assert_eq!(r.free_buffers(), Some(8));
        peer.send(b"after").unwrap();
        pump_until(&mut r, |c| *c == Completion::Readable(1));
        assert_eq!(r.free_buffers(), Some(7));
        assert_eq!(r.udp_recv_segments(1, &mut buf).unwrap().unwrap(), (5, 0));
    }

    #[test]
    fn the_largest_datagram_arrives_intact() {
        let Some(mut r) = ring(8) else { return };
        let (peer, ours) = udp_pair();
        r.udp(ours.as_raw_fd(), 1, false).unwrap();
        pump(&mut r, &mut Vec::new());
        let big: Vec<u8> = (0..65507u32).map(|i| (i * 7 % 251) as u8).collect();
        peer.send(&big).unwrap();
        peer.send(b"small").unwrap();
        pump_until(&mut r, |c| *c == Completion::Readable(1));
        let mut buf = vec![0u8; 65535];
        let got = read_all(&mut r, 1, 2, &mut buf);
        assert_eq!(got[0], big);
        assert_eq!(got[1], b"small");
        assert_eq!(r.truncated, 0);
    }

    #[test]
    fn a_datagram_larger_than_a_buffer_is_counted_and_its_buffer_returned() {
        // Cannot happen with `BUF_SIZE` buffers over IPv4; smaller ones show the accounting.
        if probe().is_err() {
            return;
        }
        let mut r = Ring::make(true, 8, 2048, None).unwrap();
        let (peer, ours) = udp_pair();
        r.udp(ours.as_raw_fd(), 1, false).unwrap();
        pump(&mut r, &mut Vec::new());
        peer.send(&[1u8; 3000]).unwrap();
        peer.send(b"fits").unwrap();
        pump_until(&mut r, |c| *c == Completion::Readable(1));
        assert_eq!(r.truncated, 1);
        let mut buf = [0u8; 4096];
        assert_eq!(read_all(&mut r, 1, 1, &mut buf), vec![b"fits".to_vec()]);
        assert_eq!(r.free_buffers(), Some(8));
    }

    #[test]
    fn a_port_unreachable_comes_in_order_and_the_receive_goes_on() {
        let Some(mut r) = ring(8) else { return };
        let (peer, ours) = udp_pair();
        r.udp(ours.as_raw_fd(), 1, false).unwrap();
        pump(&mut r, &mut Vec::new());
        peer.send(b"one").unwrap();
        pump_until(&mut r, |c| *c == Completion::Readable(1));
        drop(peer);
        ours.send(b"nobody").unwrap();
        let mut buf = [0u8; 16];
        let mut results = Vec::new();
        for _ in 0..100 {
            pump(&mut r, &mut Vec::new());
            while let Some(res) = r.udp_recv_segments(1, &mut buf) {
                match res {
                    Ok((n, _)) => results.push(Ok(buf[..n].to_vec())),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => results.push(Err(e.kind())),
                }
            }
            if results.len() >= 2 {
                break;
            }
        }
        assert_eq!(
            results,
            vec![Ok(b"one".to_vec()), Err(io::ErrorKind::ConnectionRefused)]
        );
    }

    #[test]
    fn completions_of_a_closed_socket_are_ignored_after_its_id_is_reused() {
        let Some(mut r) = ring(8) else { return };
        let (peer, ours) = udp_pair();
        r.udp(ours.as_raw_fd(), 1, false).unwrap();
        pump(&mut r, &mut Vec::new());
        for i in 0..3u8 {
            peer.send(&[i]).unwrap();
        }
        // The datagrams complete, unread; then the socket is closed and id 1 reused.
        r.wait(Some(Duration::from_millis(20)), Instant::now())
            .unwrap();
        r.unwatch(1);
        drop(ours);
        let (peer2, ours2) = udp_pair();
        r.udp(ours2.as_raw_fd(), 1, false).unwrap();
        // A refused TCP connect watched under another reused id: its error must not reach
        // the new owner.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = crate::sock::addr::RawAddr::new(listener.local_addr().unwrap());
        drop(listener);
        let tcp = tcp_socket();
        // SAFETY: `addr` holds a socket address of `addr.len()` bytes, alive for the call.
        unsafe { libc::connect(tcp.as_raw_fd(), addr.as_ptr(), addr.len()) };
        r.watch(tcp.as_raw_fd(), 2, true).unwrap();
        r.wait(Some(Duration::from_millis(20)), Instant::now())
            .unwrap();
        r.unwatch(2);
        drop(tcp);
        let (_p3, ours3) = udp_pair();
        r.udp(ours3.as_raw_fd(), 2, false).unwrap();
        let mut got = Vec::new();
        for _ in 0..5 {
            pump(&mut r, &mut got);
        }
        assert!(got.is_empty(), "stale completions came through: {got:?}");
        assert_eq!(r.free_buffers(), Some(8), "the stale buffers went back");
        let mut buf = [0u8; 8];
        assert_eq!(
            r.udp_recv_segments(1, &mut buf)
                .unwrap()
                .unwrap_err()
                .kind(),
            io::ErrorKind::WouldBlock
        );
        peer2.send(b"new").unwrap();
        pump_until(&mut r, |c| *c == Completion::Readable(1));
        assert_eq!(r.udp_recv_segments(1, &mut buf).unwrap().unwrap(), (3, 0));
        assert_eq!(&buf[..3], b"new");
    }

    #[test]
    fn waiting_ends_at_the_timeout_without_completions() {
        let Some(mut r) = ring(8) else { return };
        let start = Instant::now();
        let got = r.wait(Some(Duration::from_millis(50)), start).unwrap();
        let took = start.elapsed();
        assert!(!got);
        assert!(
            took >= Duration::from_millis(50) && took < Duration::from_millis(500),
            "{took:?}"
        );
        // Spinning first does not change that.
        let start = Instant::now();
        let got = r
            .wait(
                Some(Duration::from_millis(30)),
                start + Duration::from_millis(10),
            )
            .unwrap();
        assert!(!got);
        assert!(start.elapsed() >= Duration::from_millis(30));
        let mut into = Vec::new();
        r.drain(&mut into);
        assert!(into.is_empty());
    }

    #[test]
    fn a_watched_descriptor_wakes_the_wait_with_its_token() {
        let Some(mut r) = ring(8) else { return };
        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        r.watch_token(b.as_raw_fd(), 42).unwrap();
        let mut got = Vec::new();
        pump(&mut r, &mut got);
        assert!(got.is_empty());
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            std::io::Write::write_all(&mut a, b"x").unwrap();
            a
        });
        let start = Instant::now();
        assert!(r.wait(Some(Duration::from_secs(5)), start).unwrap());
        assert!(start.elapsed() < Duration::from_secs(4));
        r.drain(&mut got);
        assert_eq!(got, vec![Completion::Token(42)]);
        t.join().unwrap();
    }

    #[test]
    fn a_ring_waited_on_through_epoll_completes_too() {
        // The control thread's kind (no DEFER_TASKRUN): completions appear without a wait.
        if probe().is_err() {
            return;
        }
        let mut r = Ring::new().unwrap();
        let (peer, ours) = udp_pair();
        r.udp(ours.as_raw_fd(), 1, false).unwrap();
        r.submit().unwrap();
        peer.send(b"ping").unwrap();
        let mut got = Vec::new();
        for _ in 0..100 {
            std::thread::sleep(Duration::from_millis(10));
            r.drain(&mut got);
            if !got.is_empty() {
                break;
            }
        }
        assert_eq!(got, vec![Completion::Readable(1)]);
        let mut buf = [0u8; 8];
        assert_eq!(r.udp_recv_segments(1, &mut buf).unwrap().unwrap(), (4, 0));
    }
}
