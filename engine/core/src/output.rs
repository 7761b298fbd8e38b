//! Frames the core emits, gathered per batch so the port can write them in one go.

/// A batch of outgoing frames. Buffers are kept across `clear()`, so once the batch has grown to
/// its working size, emitting a frame allocates nothing.
#[derive(Default)]
pub struct FrameBatch {
    bufs: Vec<Vec<u8>>,
    /// Per frame: the segment size a TCP or UDP super-frame is to be cut into by the guest's
    /// side of the port (0: a frame as it is). See `segment::push` and `udp::send_run`.
    gso: Vec<u16>,
    len: usize,
}

impl FrameBatch {
    /// An empty batch.
    pub fn new() -> FrameBatch {
        FrameBatch::default()
    }

    /// Appends a frame of exactly `size` zeroed bytes and lets `fill` write it.
    pub(crate) fn push_with<R>(&mut self, size: usize, fill: impl FnOnce(&mut [u8]) -> R) -> R {
        if self.len == self.bufs.len() {
            self.bufs.push(Vec::with_capacity(size.max(1514)));
            self.gso.push(0);
        }
        self.gso[self.len] = 0;
        let buf = &mut self.bufs[self.len];
        buf.clear();
        buf.resize(size, 0);
        self.len += 1;
        fill(buf)
    }

    /// `push_with` for a builder that writes every byte of the frame it keeps (headers in full,
    /// then a payload it may cut short with `truncate_last`): the buffer is not zeroed first, so
    /// a 64 KiB frame costs no pass to clear what is about to be written over.
    pub(crate) fn push_with_written<R>(
        &mut self,
        size: usize,
        fill: impl FnOnce(&mut [u8]) -> R,
    ) -> R {
        if self.len == self.bufs.len() {
            self.bufs.push(Vec::with_capacity(size.max(1514)));
            self.gso.push(0);
        }
        self.gso[self.len] = 0;
        let buf = &mut self.bufs[self.len];
        if buf.len() >= size {
            buf.truncate(size);
        } else {
            buf.resize(size, 0);
        }
        self.len += 1;
        fill(buf)
    }

    /// Appends a copy of `frame`.
    pub fn push(&mut self, frame: &[u8]) {
        self.push_with(frame.len(), |b| b.copy_from_slice(frame));
    }

    /// Drops the last frame pushed (a builder that found it could not finish).
    pub(crate) fn pop(&mut self) {
        self.len = self.len.saturating_sub(1);
    }

    /// Marks the last frame pushed as a super-frame of segments of `mss` payload bytes (TCP),
    /// or of datagrams of `mss` payload bytes (UDP).
    pub(crate) fn set_gso_last(&mut self, mss: u16) {
        if self.len > 0 {
            self.gso[self.len - 1] = mss;
        }
    }

    /// The frames with their segment sizes (0: not a super-frame), in order.
    pub fn iter_gso(&self) -> impl Iterator<Item = (&[u8], u16)> {
        self.bufs[..self.len]
            .iter()
            .zip(&self.gso)
            .map(|(b, &g)| (b.as_slice(), g))
    }

    /// Shortens the last frame pushed to `len` bytes (a builder that wrote less than it
    /// reserved, e.g. a TCP segment whose socket had fewer bytes than the window allowed).
    pub(crate) fn truncate_last(&mut self, len: usize) {
        if self.len > 0 {
            self.bufs[self.len - 1].truncate(len);
        }
    }

    /// How many frames the batch holds.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the batch holds no frame.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The frames, in the order they were emitted.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        self.bufs[..self.len].iter().map(|b| b.as_slice())
    }

    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn get(&self, i: usize) -> Option<&[u8]> {
        (i < self.len).then(|| self.bufs[i].as_slice())
    }

    /// Keeps only the frames `keep` says yes to, given each with its segment size (see
    /// `iter_gso`), in their order (the buffers of the others stay for reuse).
    pub fn retain(&mut self, mut keep: impl FnMut(&[u8], u16) -> bool) {
        let mut kept = 0;
        for i in 0..self.len {
            if keep(&self.bufs[i], self.gso[i]) {
                self.bufs.swap(kept, i);
                self.gso.swap(kept, i);
                kept += 1;
            }
        }
        self.len = kept;
    }

    /// Empties the batch, keeping its buffers.
    pub fn clear(&mut self) {
        self.len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused() {
        let mut b = FrameBatch::new();
        b.push(&[1, 2, 3]);
        b.push_with(2, |f| f.copy_from_slice(&[4, 5]));
        assert_eq!(
            b.iter().collect::<Vec<_>>(),
            vec![&[1, 2, 3][..], &[4, 5][..]]
        );
        let p = b.bufs[0].as_ptr();
        b.clear();
        assert!(b.is_empty());
        b.push(&[9]);
        assert_eq!(b.bufs[0].as_ptr(), p);
        assert_eq!(b.get(0), Some(&[9][..]));
        assert_eq!(b.get(1), None);
    }

    #[test]
    fn retain_keeps_the_chosen_frames_in_order() {
        let mut b = FrameBatch::new();
        for i in 0..6u8 {
            b.push(&[i]);
        }
        b.retain(|f, _| f[0] % 2 == 0);
        assert_eq!(
            b.iter().collect::<Vec<_>>(),
            vec![&[0][..], &[2][..], &[4][..]]
        );
        b.push(&[7]);
        assert_eq!(b.len(), 4);
        assert_eq!(b.get(3), Some(&[7][..]));
    }
}
