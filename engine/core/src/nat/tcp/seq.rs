//! TCP sequence-number arithmetic (RFC 9293 3.4): 32-bit numbers compared modulo 2^32.

use std::cmp::Ordering;
use std::fmt;
use std::ops::{Add, Sub};

/// A sequence number. Ordering is circular: `a < b` when `b` is less than 2^31 ahead of `a`,
/// which is meaningful only for numbers within one window of each other.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub(crate) struct Seq(pub u32);

impl Seq {
    /// The signed distance from `other` to `self`.
    pub(crate) fn diff(self, other: Seq) -> i32 {
        self.0.wrapping_sub(other.0) as i32
    }

    /// The distance from `other` up to `self`, which must not be behind it (zero if it is).
    pub(crate) fn since(self, other: Seq) -> usize {
        self.diff(other).max(0) as usize
    }

    pub(crate) fn max(self, other: Seq) -> Seq {
        if self >= other {
            self
        } else {
            other
        }
    }

    pub(crate) fn min(self, other: Seq) -> Seq {
        if self <= other {
            self
        } else {
            other
        }
    }

    /// Whether `self` lies in `[start, end)`.
    pub(crate) fn in_range(self, start: Seq, end: Seq) -> bool {
        start <= self && self < end
    }
}

impl PartialOrd for Seq {
    fn partial_cmp(&self, other: &Seq) -> Option<Ordering> {
        Some(self.diff(*other).cmp(&0))
    }
}

impl Add<usize> for Seq {
    type Output = Seq;
    fn add(self, n: usize) -> Seq {
        Seq(self.0.wrapping_add(n as u32))
    }
}

impl Sub<usize> for Seq {
    type Output = Seq;
    fn sub(self, n: usize) -> Seq {
        Seq(self.0.wrapping_sub(n as u32))
    }
}

impl fmt::Debug for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_around() {
        let a = Seq(u32::MAX - 1);
        let b = a + 4;
        assert_eq!(b, Seq(2));
        assert!(a < b);
        assert_eq!(b.since(a), 4);
        assert_eq!(a.since(b), 0);
        assert_eq!(a.diff(b), -4);
        assert_eq!(a.max(b), b);
        assert_eq!(a.min(b), a);
        assert!(Seq(0).in_range(a, b));
        assert!(!b.in_range(a, b));
        assert_eq!(b - 4, a);
    }
}
