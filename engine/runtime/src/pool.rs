//! Frame buffers: a pool of fixed-size buffers recycled between the threads (no allocation per
//! frame), and the buffers a thread reads port frames into.

use std::io;

use crossbeam_queue::ArrayQueue;

use crate::port::tap::Tap;

/// Fixed-size frame buffers, recycled.
pub struct Pool {
    free: ArrayQueue<Box<[u8]>>,
    /// Buffers allocated so far (at most `free`'s capacity): a buffer is made the first time
    /// the pool runs dry, so an idle or multiqueue runtime, which hands few frames between
    /// threads, never holds the tens of MiB that full queues would take.
    made: std::sync::atomic::AtomicUsize,
    size: usize,
}

impl Pool {
    pub fn new(count: usize, size: usize) -> Pool {
        Pool {
            free: ArrayQueue::new(count.max(1)),
            made: std::sync::atomic::AtomicUsize::new(0),
            size,
        }
    }

    /// A free buffer, a new one while fewer than the pool's count exist, else None.
    pub fn get(&self) -> Option<Box<[u8]>> {
        use std::sync::atomic::Ordering::Relaxed;
        if let Some(b) = self.free.pop() {
            return Some(b);
        }
        self.made
            .fetch_update(Relaxed, Relaxed, |n| {
                (n < self.free.capacity()).then_some(n + 1)
            })
            .ok()
            .map(|_| vec![0u8; self.size].into_boxed_slice())
    }

    /// Bytes in each buffer.
    pub fn size(&self) -> usize {
        self.size
    }

    pub fn put(&self, b: Box<[u8]>) {
        let _ = self.free.push(b);
    }
}

/// The buffers a thread reads port frames into: pool buffers, so that a frame for another
/// thread is queued without a copy, and one of its own for when the pool runs dry.
pub(crate) struct ReadBufs {
    spare: Option<Box<[u8]>>,
    own: Box<[u8]>,
}

/// A frame read by `ReadBufs::recv`: its buffer, its length, and whether the buffer is the pool's.
pub(crate) type ReadFrame = (Box<[u8]>, usize, bool);

impl ReadBufs {
    pub fn new(frame_size: usize) -> ReadBufs {
        ReadBufs {
            spare: None,
            own: vec![0u8; frame_size].into_boxed_slice(),
        }
    }

    /// A buffer to read into, and whether it is the pool's.
    pub fn take(&mut self, pool: Option<&Pool>) -> (Box<[u8]>, bool) {
        match self.spare.take().or_else(|| pool.and_then(Pool::get)) {
            Some(b) => (b, true),
            None => (std::mem::take(&mut self.own), false),
        }
    }

    pub fn put_back(&mut self, buf: Box<[u8]>, from_pool: bool) {
        if from_pool {
            self.spare = Some(buf);
        } else {
            self.own = buf;
        }
    }

    /// Reads one frame from `tap` into a buffer of `take`; `Ok(None)` once the device would
    /// block.
    pub fn recv(&mut self, tap: &Tap, pool: Option<&Pool>) -> io::Result<Option<ReadFrame>> {
        loop {
            let (mut buf, from_pool) = self.take(pool);
            match tap.recv(&mut buf) {
                Ok(n) => return Ok(Some((buf, n, from_pool))),
                Err(e) => {
                    self.put_back(buf, from_pool);
                    match e.kind() {
                        io::ErrorKind::WouldBlock => return Ok(None),
                        io::ErrorKind::Interrupted => continue,
                        _ => return Err(e),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_makes_buffers_only_when_dry_and_never_more_than_its_count() {
        let pool = Pool::new(3, 16);
        assert!(pool.free.is_empty(), "nothing is allocated up front");
        let bufs: Vec<_> = (0..3)
            .map(|_| pool.get().expect("within the count"))
            .collect();
        assert!(bufs.iter().all(|b| b.len() == 16));
        assert!(pool.get().is_none(), "the count bounds the pool");
        for b in bufs {
            pool.put(b);
        }
        let again: Vec<_> = (0..3).map(|_| pool.get().expect("recycled")).collect();
        assert!(pool.get().is_none());
        assert_eq!(again.len(), 3);
    }
}
