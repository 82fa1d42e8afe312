//! The sender's SACK scoreboard (RFC 6675): which bytes above SND.UNA the
//! peer has reported holding, so that loss recovery can resend every hole
//! the SACKs show in one round trip, rather than one hole per round trip
//! as NewReno's partial ACKs do, and count what is still in the network
//! (the "pipe").
//!
//! Ranges are kept sorted and merged, at most [`MAX_RANGES`] of them; when
//! a peer reports more, the highest are forgotten. Forgetting a SACK only
//! makes the sender more careful: fewer bytes count as delivered, fewer
//! holes as lost.

use crate::wire::seq::SeqNum;

/// SACKed ranges kept, at most. A window of a few hundred segments at a
/// few percent loss has a few dozen holes.
pub const MAX_RANGES: usize = 64;

#[derive(Clone, Debug, Default)]
pub struct Scoreboard {
    /// `[left, right)` SACKed ranges, sorted, disjoint and not touching.
    ranges: Vec<(SeqNum, SeqNum)>,
}

impl Scoreboard {
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn clear(&mut self) {
        self.ranges.clear();
    }

    /// Records a SACK block, clamped to `[una, max)` (bytes sent and not
    /// cumulatively acknowledged). The check is on offsets from `una`, not
    /// on modular comparisons: a hostile block that straddles una + 2³¹
    /// compares "after una" at its left and "before max" at its right
    /// while lying wholly outside what was sent. A block whose right edge
    /// is past `max`, or that ends at or before `una`, is ignored whole
    /// (a receiver cannot hold what was never sent: the block is bogus).
    pub fn add(&mut self, left: SeqNum, right: SeqNum, una: SeqNum, max: SeqNum) {
        self.add_with(left, right, una, max, |_, _| {});
    }

    /// As [`Scoreboard::add`], and `newly(l, r)` is called for each range
    /// of bytes the block is the first to report (the gaps between what
    /// was held), so a block repeated on every ACK costs nothing after
    /// the first.
    pub fn add_with(
        &mut self,
        left: SeqNum,
        right: SeqNum,
        una: SeqNum,
        max: SeqNum,
        mut newly: impl FnMut(SeqNum, SeqNum),
    ) {
        let span = max.0.wrapping_sub(una.0);
        let hi = right.0.wrapping_sub(una.0);
        // A left edge below una reads as an offset of 2³¹ or more: from
        // una, then.
        let lo = match left.0.wrapping_sub(una.0) {
            lo if lo >= 1 << 31 => 0,
            lo => lo,
        };
        if hi == 0 || hi > span || lo >= hi || span > 1 << 30 {
            return;
        }
        let (left, right) = (una + lo, una + hi);
        // The first range that ends at or after `left` (it may merge).
        let i = self.ranges.partition_point(|&(_, r)| r.lt(left));
        let mut j = i;
        let (mut l, mut r) = (left, right);
        let mut at = left;
        while j < self.ranges.len() && self.ranges[j].0.le(r) {
            let (jl, jr) = self.ranges[j];
            if jl.gt(at) {
                newly(at, jl);
            }
            if jr.gt(at) {
                at = jr;
            }
            if jl.lt(l) {
                l = jl;
            }
            if jr.gt(r) {
                r = jr;
            }
            j += 1;
        }
        if right.gt(at) {
            newly(at, right);
        }
        self.ranges.splice(i..j, [(l, r)]);
        self.ranges.truncate(MAX_RANGES);
    }

    /// SND.UNA moved to `una`: what it covers is no longer tracked.
    pub fn advance(&mut self, una: SeqNum) {
        let gone = self.ranges.partition_point(|&(_, r)| r.le(una));
        self.ranges.drain(..gone);
        if let Some(first) = self.ranges.first_mut() {
            if first.0.lt(una) {
                first.0 = una;
            }
        }
    }

    /// Bytes SACKed in all.
    pub fn sacked(&self) -> u32 {
        self.ranges
            .iter()
            .map(|&(l, r)| r.since(l).max(0) as u32)
            .fold(0, u32::saturating_add)
    }

    /// Whether `seq` is SACKed.
    pub fn contains(&self, seq: SeqNum) -> bool {
        let i = self.ranges.partition_point(|&(_, r)| r.le(seq));
        self.ranges.get(i).is_some_and(|&(l, _)| l.le(seq))
    }

    /// Whether all of `[left, right)` is SACKed.
    pub fn covers(&self, left: SeqNum, right: SeqNum) -> bool {
        let i = self.ranges.partition_point(|&(_, r)| r.le(left));
        self.ranges
            .get(i)
            .is_some_and(|&(l, r)| l.le(left) && right.le(r))
    }

    /// Bytes below this are lost if not SACKed (RFC 6675 §4 IsLost): more
    /// than `need` bytes above them have been SACKed. `None` while no hole
    /// qualifies.
    pub fn lost_below(&self, need: u32) -> Option<SeqNum> {
        let mut above = 0u32;
        for &(l, r) in self.ranges.iter().rev() {
            above = above.saturating_add(r.since(l) as u32);
            if above > need {
                return Some(l);
            }
        }
        None
    }

    /// The first hole (unSACKed bytes) at or after `from` and below
    /// `below`, as `[start, end)`.
    pub fn hole_from(&self, from: SeqNum, below: SeqNum) -> Option<(SeqNum, SeqNum)> {
        let mut at = from;
        let i = self.ranges.partition_point(|&(_, r)| r.le(at));
        for &(l, r) in &self.ranges[i..] {
            if l.gt(at) {
                break;
            }
            at = r;
        }
        if !below.gt(at) {
            return None;
        }
        let end = self.ranges[i..]
            .iter()
            .map(|&(l, _)| l)
            .find(|l| l.gt(at))
            .map_or(below, |l| if l.lt(below) { l } else { below });
        Some((at, end))
    }

    /// Unsacked bytes in `[from, below)`.
    pub fn holes_between(&self, from: SeqNum, below: SeqNum) -> u32 {
        if !below.gt(from) {
            return 0;
        }
        let mut sacked = 0u32;
        for &(l, r) in &self.ranges {
            let l = if l.lt(from) { from } else { l };
            let r = if r.gt(below) { below } else { r };
            if r.gt(l) {
                sacked = sacked.saturating_add(r.since(l) as u32);
            }
        }
        (below.since(from) as u32).saturating_sub(sacked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(n: u32) -> SeqNum {
        SeqNum(n)
    }

    fn board(blocks: &[(u32, u32)]) -> Scoreboard {
        let mut b = Scoreboard::default();
        for &(l, r) in blocks {
            b.add(s(l), s(r), s(100), s(10_000));
        }
        b
    }

    #[test]
    fn blocks_merge_and_stay_sorted_within_what_was_sent() {
        // (9_900, 20_000) reaches past what was sent: bogus, ignored.
        let b = board(&[
            (500, 600),
            (300, 400),
            (400, 450),
            (0, 150),
            (9_900, 20_000),
        ]);
        assert_eq!(
            b.ranges,
            vec![(s(100), s(150)), (s(300), s(450)), (s(500), s(600))]
        );
        let mut b = board(&[(300, 400), (500, 600), (700, 800)]);
        b.add(s(350), s(750), s(100), s(10_000));
        assert_eq!(b.ranges, vec![(s(300), s(800))]);
        assert_eq!(b.sacked(), 500);
        assert!(b.contains(s(300)) && b.contains(s(799)) && !b.contains(s(800)));
        b.advance(s(400));
        assert_eq!(b.ranges, vec![(s(400), s(800))]);
        b.advance(s(800));
        assert!(b.is_empty());
    }

    #[test]
    fn a_block_reports_only_the_bytes_it_is_first_to_hold() {
        let mut b = board(&[(300, 400), (500, 600)]);
        let mut newly = Vec::new();
        b.add_with(s(250), s(700), s(100), s(10_000), |l, r| {
            newly.push((l.0, r.0))
        });
        assert_eq!(newly, vec![(250, 300), (400, 500), (600, 700)]);
        newly.clear();
        b.add_with(s(300), s(650), s(100), s(10_000), |l, r| {
            newly.push((l.0, r.0))
        });
        assert!(newly.is_empty());
        assert!(b.covers(s(250), s(700)) && b.covers(s(400), s(401)));
        assert!(!b.covers(s(200), s(300)) && !b.covers(s(600), s(701)));
    }

    #[test]
    fn holes_are_lost_below_enough_sacked_bytes() {
        // Holes at 100..200, 300..400, 500..600; SACKed 200..300,
        // 400..500, 600..700.
        let b = board(&[(200, 300), (400, 500), (600, 700)]);
        assert_eq!(b.lost_below(99), Some(s(600)));
        assert_eq!(b.lost_below(150), Some(s(400)));
        assert_eq!(b.lost_below(250), Some(s(200)));
        assert_eq!(b.lost_below(300), None);
        assert_eq!(b.hole_from(s(100), s(600)), Some((s(100), s(200))));
        assert_eq!(b.hole_from(s(150), s(600)), Some((s(150), s(200))));
        assert_eq!(b.hole_from(s(200), s(600)), Some((s(300), s(400))));
        assert_eq!(b.hole_from(s(450), s(600)), Some((s(500), s(600))));
        assert_eq!(b.hole_from(s(550), s(560)), Some((s(550), s(560))));
        assert_eq!(b.hole_from(s(600), s(700)), None);
        assert_eq!(b.hole_from(s(300), s(300)), None);
        assert_eq!(b.holes_between(s(100), s(600)), 300);
        assert_eq!(b.holes_between(s(250), s(450)), 100);
        assert_eq!(b.holes_between(s(700), s(650)), 0);
    }

    #[test]
    fn the_board_is_bounded_and_forgets_the_highest() {
        let mut b = Scoreboard::default();
        for i in 0..(MAX_RANGES as u32 + 10) {
            b.add(s(1000 + 20 * i), s(1010 + 20 * i), s(0), s(1 << 20));
        }
        assert_eq!(b.ranges.len(), MAX_RANGES);
        assert_eq!(b.ranges[0], (s(1000), s(1010)));
        // A low block still goes in, pushing the highest out.
        b.add(s(10), s(20), s(0), s(1 << 20));
        assert_eq!((b.ranges.len(), b.ranges[0]), (MAX_RANGES, (s(10), s(20))));
    }

    /// Blocks outside what was sent are ignored whole, including ones
    /// that straddle una + 2³¹ (which modular comparisons would take for
    /// a range between una and max) and ones reaching past max; a block
    /// reaching below una is clamped to it.
    #[test]
    fn bogus_blocks_are_ignored() {
        let una = SeqNum(0xFFFF_0000);
        let max = una + 10_000;
        let mut b = Scoreboard::default();
        for (l, r) in [
            (una + 0x7FFF_FFFF, una + 0xC000_0000),
            (una + 0x7000_0000, una + 0xEFFF_FFFF),
            (una + 9_000, una + 10_001),
            (una + 20_000, una + 30_000),
            (una + 5_000, una + 4_000),
            (una + 0xFFFF_0000, una),
            (una + 100, una + 100),
        ] {
            b.add(l, r, una, max);
        }
        assert!(b.is_empty(), "{:?}", b.ranges);
        b.add(una + 0xFFFF_FF00, una + 500, una, max);
        assert_eq!(b.ranges, vec![(una, una + 500)]);
        assert_eq!((b.sacked(), b.lost_below(0)), (500, Some(una)));
    }

    #[test]
    fn sequence_numbers_wrap() {
        let mut b = Scoreboard::default();
        let una = SeqNum(u32::MAX - 100);
        b.add(una + 50, una + 150, una, una + 1000);
        b.add(una + 200, una + 300, una, una + 1000);
        assert_eq!(b.sacked(), 200);
        assert_eq!(b.hole_from(una, una + 300), Some((una, una + 50)));
        assert_eq!(
            b.hole_from(una + 60, una + 300),
            Some((una + 150, una + 200))
        );
        assert_eq!(b.lost_below(150), Some(una + 50));
        b.advance(una + 160);
        assert_eq!(b.sacked(), 100);
    }
}
