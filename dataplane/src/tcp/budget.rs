//! The memory the halves' buffers may grow into, shared by every split
//! connection of the engine (all workers). A half starts with small buffers
//! and autotuning ([`super::conn`]) grows them toward the bandwidth-delay
//! product; each growth is taken from here, and a half gives back all it
//! took when it is dropped. When the budget is spent, halves keep the
//! buffers they have and new connections are not split (the session table
//! passes them through and counts them).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

#[derive(Debug)]
pub struct MemoryBudget {
    limit: usize,
    used: AtomicUsize,
    /// Growths refused because the budget was spent.
    refused: AtomicU64,
}

impl MemoryBudget {
    pub fn new(limit: usize) -> MemoryBudget {
        MemoryBudget {
            limit,
            used: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
        }
    }

    /// Takes `n` bytes, all or nothing.
    pub fn take(&self, n: usize) -> bool {
        let granted = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|&u| u <= self.limit)
            })
            .is_ok();
        if !granted {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        granted
    }

    /// Gives back `n` bytes taken before.
    pub fn give(&self, n: usize) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                Some(used.saturating_sub(n))
            });
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Less than `reserve` left: new connections are not split.
    pub fn short_of(&self, reserve: usize) -> bool {
        self.limit.saturating_sub(self.used()) < reserve
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_all_or_nothing_and_gives_back() {
        let b = MemoryBudget::new(100);
        assert!(b.take(60));
        assert!(!b.take(50));
        assert_eq!((b.used(), b.refused()), (60, 1));
        assert!(b.short_of(41) && !b.short_of(40));
        b.give(60);
        assert!(b.take(100));
        assert!(!b.take(1));
        b.give(1000);
        assert_eq!(b.used(), 0);
    }
}
