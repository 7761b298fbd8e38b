//! io_uring readiness for the host-socket driver: one ring per worker thread.
//!
//! TCP needs synchronous answers (how much a socket took, a peek at what it holds), so sends,
//! peeks and receives stay plain non-blocking syscalls. What the ring replaces is epoll: each
//! socket gets one multishot `IORING_OP_POLL_ADD` (edge-triggered, like mio's registration), and
//! closing one submits `IORING_OP_POLL_REMOVE`. Submissions are queued during a batch and
//! submitted once, before the thread waits (`submit`). The ring's own fd is what the thread's
//! event loop waits on; completions are read with `drain`.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use crate::hostio::SockId;

/// Submission queue entries; the completion queue is eight times as large (a busy socket's
/// multishot poll posts a completion per wake-up; overflow is flushed, see `drain`).
const ENTRIES: u32 = 1024;
/// user_data of POLL_REMOVE requests (their completions are ignored).
const REMOVE: u64 = u64::MAX;

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

struct Watch {
    fd: RawFd,
    mask: u32,
    user_data: u64,
}

pub struct Ring {
    ring: IoUring<squeue::Entry, cqueue::Entry>,
    watches: HashMap<SockId, Watch>,
    generation: u32,
    /// Entries pushed since the last submit.
    queued: usize,
    overflows: u64,
}

/// Whether io_uring can be used here, and why not: a ring is set up and asked whether it
/// knows the operations the driver submits.
pub fn probe() -> io::Result<()> {
    let ring = IoUring::new(8)?;
    let mut probe = io_uring::Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    for (code, name) in [
        (opcode::PollAdd::CODE, "POLL_ADD"),
        (opcode::PollRemove::CODE, "POLL_REMOVE"),
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

impl Ring {
    /// A ring for the calling thread (the only one that may submit to it).
    pub fn new() -> io::Result<Ring> {
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_cqsize(ENTRIES * 8)
            .build(ENTRIES)
            .or_else(|_| IoUring::new(ENTRIES))?;
        Ok(Ring {
            ring,
            watches: HashMap::new(),
            generation: 0,
            queued: 0,
            overflows: 0,
        })
    }

    /// The ring's fd: readable when completions are waiting.
    pub fn fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }

    fn push(&mut self, sqe: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: the entries pushed here (poll add/remove) reference no memory of ours.
            if unsafe { self.ring.submission().push(sqe) }.is_ok() {
                self.queued += 1;
                return Ok(());
            }
            // Queue full: hand what is there to the kernel and try again.
            self.ring.submit()?;
            self.queued = 0;
        }
    }

    fn arm(&mut self, fd: RawFd, mask: u32, user_data: u64) -> io::Result<()> {
        let sqe = opcode::PollAdd::new(types::Fd(fd), mask)
            .multi(true)
            .build()
            .user_data(user_data);
        self.push(&sqe)
    }

    /// Starts watching `fd` (socket `id`) for reading, and for writing if asked.
    pub fn watch(&mut self, fd: RawFd, id: SockId, writable: bool) -> io::Result<()> {
        let mut mask = (libc::POLLIN | libc::POLLRDHUP) as u16 as u32;
        if writable {
            mask |= libc::POLLOUT as u16 as u32;
        }
        self.generation = self.generation.wrapping_add(1);
        let user_data = (u64::from(self.generation) << 32) | u64::from(id);
        self.arm(fd, mask, user_data)?;
        self.watches.insert(
            id,
            Watch {
                fd,
                mask,
                user_data,
            },
        );
        Ok(())
    }

    /// Stops watching socket `id`. Its fd may be closed right after: the kernel keeps the
    /// socket until the removal is submitted (before the thread next waits).
    pub fn unwatch(&mut self, id: SockId) {
        if let Some(w) = self.watches.remove(&id) {
            let sqe = opcode::PollRemove::new(w.user_data)
                .build()
                .user_data(REMOVE);
            if let Err(e) = self.push(&sqe) {
                tracing::warn!("io_uring: cannot remove a poll: {e}");
            }
        }
    }

    /// Submits everything queued (once per batch).
    pub fn submit(&mut self) -> io::Result<()> {
        let sq = self.ring.submission();
        // An overflowed completion queue is flushed only by entering the kernel.
        let enter = self.queued > 0 || sq.cq_overflow() || sq.taskrun();
        drop(sq);
        if enter {
            self.ring.submit()?;
            self.queued = 0;
        }
        Ok(())
    }

    /// Reads every completion: the readiness of live sockets goes to `into`; polls the kernel
    /// ended (CQE without the MORE flag) are armed again.
    pub fn drain(&mut self, into: &mut Vec<(SockId, Ready)>) {
        let mut rearm: Vec<(RawFd, u32, u64)> = Vec::new();
        loop {
            self.drain_once(into, &mut rearm);
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
        for (fd, mask, ud) in rearm {
            if let Err(e) = self.arm(fd, mask, ud) {
                tracing::warn!("io_uring: cannot re-arm a poll: {e}");
            }
        }
    }

    fn drain_once(&mut self, into: &mut Vec<(SockId, Ready)>, rearm: &mut Vec<(RawFd, u32, u64)>) {
        for cqe in self.ring.completion() {
            let ud = cqe.user_data();
            if ud == REMOVE {
                continue;
            }
            let id = ud as u32 as SockId;
            let Some(w) = self.watches.get(&id).filter(|w| w.user_data == ud) else {
                // A poll of a socket closed since, or its cancellation.
                continue;
            };
            let res = cqe.result();
            let ready = if res >= 0 {
                Ready::from_mask(res as u32)
            } else {
                Ready {
                    error: true,
                    readable: true,
                    ..Ready::default()
                }
            };
            if !cqueue::more(cqe.flags()) {
                rearm.push((w.fd, w.mask, w.user_data));
            }
            if res != -libc::ECANCELED {
                into.push((id, ready));
            }
        }
    }

    pub fn watched(&self) -> usize {
        self.watches.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_masks_translate() {
        let r = Ready::from_mask((libc::POLLIN | libc::POLLOUT) as u32);
        assert!(r.readable && r.writable && !r.error && !r.read_closed);
        let r = Ready::from_mask((libc::POLLHUP | libc::POLLERR) as u32);
        assert!(r.error && r.read_closed && r.write_closed && !r.readable);
        let r = Ready::from_mask(libc::POLLRDHUP as u32);
        assert!(r.read_closed && !r.write_closed);
    }
}
