//! Sequence numbers: 32-bit, compared modulo 2^32 (RFC 9293 §3.4).

use std::{cmp::Ordering, fmt};

/// A TCP sequence (or acknowledgment) number.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SeqNum(pub u32);

/// `seq + n`, wrapping.
impl std::ops::Add<u32> for SeqNum {
    type Output = SeqNum;
    fn add(self, n: u32) -> SeqNum {
        SeqNum(self.0.wrapping_add(n))
    }
}

impl SeqNum {
    /// The distance from `earlier` to `self`, as a signed value: positive
    /// when `self` is after `earlier`.
    pub fn since(self, earlier: SeqNum) -> i32 {
        self.0.wrapping_sub(earlier.0) as i32
    }

    //= https://www.rfc-editor.org/rfc/rfc9293#section-3.4
    //# The symbol "=<" means "less than or equal" (modulo 2**32).
    pub fn lt(self, other: SeqNum) -> bool {
        self.since(other) < 0
    }

    pub fn le(self, other: SeqNum) -> bool {
        self.since(other) <= 0
    }

    pub fn gt(self, other: SeqNum) -> bool {
        self.since(other) > 0
    }

    pub fn ge(self, other: SeqNum) -> bool {
        self.since(other) >= 0
    }

    /// The later of two sequence numbers.
    #[must_use]
    pub fn max(self, other: SeqNum) -> SeqNum {
        if self.ge(other) {
            self
        } else {
            other
        }
    }

    /// True if `self` is in `[start, start + len)`.
    pub fn in_window(self, start: SeqNum, len: u32) -> bool {
        self.0.wrapping_sub(start.0) < len
    }

    /// Modular ordering, meaningful for numbers less than 2^31 apart.
    pub fn cmp_mod(self, other: SeqNum) -> Ordering {
        self.since(other).cmp(&0)
    }
}

impl fmt::Display for SeqNum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn comparisons_wrap_around_zero() {
        let a = SeqNum(u32::MAX - 5);
        let b = a + 10;
        assert_eq!(b, SeqNum(4));
        assert!(a.lt(b) && b.gt(a) && a.le(a) && a.ge(a));
        assert_eq!(b.since(a), 10);
        assert_eq!(a.since(b), -10);
        assert!(b.in_window(a, 11) && !b.in_window(a, 10));
        assert_eq!(a.max(b), b);
    }

    proptest! {
        #[test]
        fn ordering_is_consistent_within_half_the_space(base: u32, d in 1u32..(1 << 31)) {
            let a = SeqNum(base);
            let b = a + d;
            prop_assert!(a.lt(b));
            prop_assert!(!b.lt(a));
            prop_assert!(b.gt(a) && b.ge(a) && a.le(b));
            prop_assert_eq!(i64::from(b.since(a)), i64::from(d));
            prop_assert_eq!(a.cmp_mod(b), Ordering::Less);
        }

        #[test]
        fn windows_match_offsets(start: u32, len in 0u32..u32::MAX, off: u32) {
            let s = SeqNum(start);
            prop_assert_eq!((s + off).in_window(s, len), off < len);
        }
    }
}
