//! The receive side's byte stream: in-order delivery from segments that
//! arrive out of order, duplicated, overlapping or beyond the window.
//!
//! First copy wins: a byte, once received, keeps its value. A later segment
//! that covers it with a different value is the classic IDS evasion (the
//! inspector and the endpoint reassemble differently, RFC 9293 leaves the
//! choice open); here the conflict is counted and the first value is what
//! both the inspector and the far side see, so they cannot disagree. Bytes
//! already delivered are remembered for a while (the history) so overlaps
//! with them are checked too. The history is the tail of the same queue the
//! reader takes from (bytes read stay until the history no longer needs
//! them): each delivered byte is copied in once, not once for the reader
//! and again for the history.
//!
//! Memory is bounded by `capacity`: delivered-but-unread bytes plus the span
//! of the out-of-order queue never exceed it, and [`Reassembler::window`]
//! is what the receive window must advertise so a sender cannot exceed it.
//!
//! What it holds out of order is also what the receiver reports in SACK
//! blocks: whole runs, newest arrival first ([`Reassembler::sack_blocks`]).

use std::collections::{BTreeMap, VecDeque};

use crate::wire::seq::SeqNum;

/// What one segment did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Insert {
    /// Bytes never seen before, now held (in order or not).
    pub new: usize,
    /// Bytes that repeated what was already held or delivered.
    pub duplicate: usize,
    /// Bytes that contradicted what was already held or delivered (kept
    /// the first value).
    pub conflict: usize,
    /// Bytes outside the window (before the remembered history, or beyond
    /// what the receive window allows), dropped.
    pub outside: usize,
}

/// SACK blocks an ACK carries at most: four fit in TCP's 40 bytes of
/// options, three beside the timestamps (RFC 2018 §3).
pub const SACK_BLOCKS: usize = 4;

/// One direction's reassembly state.
#[derive(Debug)]
pub struct Reassembler {
    /// RCV.NXT: the first byte not yet delivered in order.
    next: SeqNum,
    /// Stream offset of `next` (bytes delivered so far, never wraps).
    delivered: u64,
    /// The last delivered bytes: the `unread` newest wait for the reader,
    /// the `remembered` newest (read or not) are the history checked
    /// against retransmissions; older ones are dropped.
    kept: VecDeque<u8>,
    unread: usize,
    remembered: usize,
    /// Out-of-order bytes by stream offset; ranges never overlap or touch
    /// `delivered`.
    held: BTreeMap<u64, Vec<u8>>,
    held_bytes: usize,
    /// The held ranges merged where they touch, start to end: the SACK
    /// blocks (RFC 2018 §4 wants contiguous blocks, not one per segment).
    blocks: BTreeMap<u64, u64>,
    /// Where the last few out-of-order segments landed (stream offsets,
    /// most recent first), so that SACKs report the newest blocks first.
    recent: VecDeque<u64>,
    /// The most bytes `remembered` grows to.
    history_cap: usize,
    capacity: usize,
}

impl Reassembler {
    /// A stream whose next byte is `next` (the peer's ISN + 1).
    pub fn new(next: SeqNum, capacity: usize, history: usize) -> Reassembler {
        Reassembler {
            next,
            delivered: 0,
            kept: VecDeque::new(),
            unread: 0,
            remembered: 0,
            held: BTreeMap::new(),
            held_bytes: 0,
            blocks: BTreeMap::new(),
            recent: VecDeque::new(),
            history_cap: history,
            capacity,
        }
    }

    /// RCV.NXT.
    pub fn next(&self) -> SeqNum {
        self.next
    }

    /// Whether bytes at or past `seq` are held out of order.
    pub fn holds_from(&self, seq: SeqNum) -> bool {
        let at = self.delivered as i64 + i64::from(seq.since(self.next));
        self.blocks
            .last_key_value()
            .is_some_and(|(_, &end)| end as i64 > at)
    }

    /// The receive window to advertise: room left after unread bytes.
    pub fn window(&self) -> u32 {
        self.capacity.saturating_sub(self.unread) as u32
    }

    /// The most unread and out-of-order bytes it holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Raises the capacity (receive-window autotuning); never lowers it,
    /// which would take back window already advertised.
    pub fn grow(&mut self, capacity: usize) {
        self.capacity = self.capacity.max(capacity);
    }

    /// Lowers the capacity, never below what it holds (memory pressure;
    /// the window shrinks).
    pub fn shrink(&mut self, capacity: usize) {
        let held_span = self.held.last_key_value().map_or(0, |(&off, data)| {
            (off + data.len() as u64 - self.delivered) as usize
        });
        self.capacity = capacity.max(self.unread + held_span);
    }

    /// Bytes delivered in order so far.
    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    /// Frees what an idle stream holds: spare allocation, and the history
    /// (a retransmission of those bytes is then dropped as outside, never
    /// delivered; only its conflict goes uncounted).
    pub fn trim(&mut self) {
        self.remembered = 0;
        self.forget();
        if self.kept.is_empty() {
            self.kept = VecDeque::new();
        } else {
            self.kept.shrink_to_fit();
        }
    }

    /// Drops the kept bytes neither the reader nor the history needs.
    fn forget(&mut self) {
        let excess = self
            .kept
            .len()
            .saturating_sub(self.unread.max(self.remembered));
        self.kept.drain(..excess);
    }

    /// Unread in-order bytes.
    pub fn readable(&self) -> usize {
        self.unread
    }

    /// Bytes held out of order.
    pub fn held(&self) -> usize {
        self.held_bytes
    }

    /// Takes up to `max` in-order bytes.
    pub fn read(&mut self, max: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(max.min(self.unread));
        self.read_with(max, &mut |chunk| out.extend_from_slice(chunk));
        out
    }

    /// Takes up to `max` in-order bytes, handed to `sink` in place (one
    /// or two slices, no copy of its own, then an O(1) drain of plain
    /// bytes); returns how many.
    pub fn read_with(&mut self, max: usize, sink: &mut dyn FnMut(&[u8])) -> usize {
        let n = max.min(self.unread);
        let from = self.kept.len() - self.unread;
        let (a, b) = self.kept.as_slices();
        // [from, from + n) of a then b.
        let (a, b) = if from >= a.len() {
            (&b[from - a.len()..from - a.len() + n], &b[..0])
        } else {
            let first = n.min(a.len() - from);
            (&a[from..from + first], &b[..n - first])
        };
        if !a.is_empty() {
            sink(a);
        }
        if !b.is_empty() {
            sink(b);
        }
        self.unread -= n;
        self.forget();
        n
    }

    /// How many blocks [`Reassembler::sack_blocks`] returns, without
    /// making them.
    pub fn sack_block_count(&self) -> usize {
        self.blocks.len().min(SACK_BLOCKS)
    }

    /// The out-of-order ranges as SACK blocks, at most [`SACK_BLOCKS`]:
    //= https://www.rfc-editor.org/rfc/rfc2018#section-4
    //# The first SACK block (i.e., the one immediately following the
    //# kind and length fields in the option) MUST specify the contiguous
    //# block of data containing the segment which triggered this ACK
    /// Then the blocks of the segments received just before it, then the
    /// rest from the lowest: a sender learns of the newest arrivals at
    /// once, however many holes there are.
    pub fn sack_blocks(&self) -> Vec<(SeqNum, SeqNum)> {
        self.sack_blocks_led_by(None)
    }

    /// As [`Reassembler::sack_blocks`], the block holding `seq` first if
    /// one does (of every block held, not only the four reported): the
    /// block a DSACK of bytes above RCV.NXT was cut from, which RFC 2883
    /// §4 puts right after it.
    pub fn sack_blocks_led_by(&self, seq: Option<SeqNum>) -> Vec<(SeqNum, SeqNum)> {
        let lead = seq
            .map(|s| self.delivered as i64 + i64::from(s.since(self.next)))
            .filter(|&o| o >= self.delivered as i64)
            .map(|o| o as u64);
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(SACK_BLOCKS);
        let containing = |o: u64| {
            self.blocks
                .range(..=o)
                .next_back()
                .filter(|&(_, &end)| end > o)
                .map(|(&s, &e)| (s, e))
        };
        let lowest = self.blocks.iter().map(|(&s, &e)| (s, e));
        for b in lead
            .into_iter()
            .chain(self.recent.iter().copied())
            .filter_map(containing)
            .chain(lowest)
        {
            if out.len() == SACK_BLOCKS {
                break;
            }
            if !out.contains(&b) {
                out.push(b);
            }
        }
        out.into_iter()
            .map(|(s, e)| {
                let l = self.next + (s - self.delivered) as u32;
                (l, l + (e - s) as u32)
            })
            .collect()
    }

    /// Takes in a segment's payload starting at `seq`.
    pub fn insert(&mut self, seq: SeqNum, data: &[u8]) -> Insert {
        let mut r = Insert::default();
        if data.is_empty() {
            return r;
        }
        // Stream offsets of the segment; RFC 9293 §3.10.7.4 acceptance is
        // relative to RCV.NXT, so offsets are signed around `delivered`.
        let rel = i64::from(seq.since(self.next));
        let start = self.delivered as i64 + rel;
        let end = start + data.len() as i64;
        let lowest = self.delivered as i64 - self.remembered as i64;
        let limit = (self.delivered + self.window() as u64) as i64;

        let mut from = start;
        if from < lowest {
            let skip = (lowest - from).min(data.len() as i64);
            r.outside += skip as usize;
            from += skip;
        }
        let to = end.min(limit);
        if end > to {
            r.outside += (end - to.max(from)) as usize;
        }
        if from >= to {
            return r;
        }
        let byte = |off: i64| data[(off - start) as usize];

        // Already delivered: compare with history.
        let delivered = self.delivered as i64;
        let mut off = from;
        while off < to.min(delivered) {
            let h = self.kept.len() as i64 - (delivered - off);
            if self.kept[h as usize] == byte(off) {
                r.duplicate += 1;
            } else {
                r.conflict += 1;
            }
            off += 1;
        }
        // Held out of order: compare; gaps get the new bytes.
        let off = off.max(delivered) as u64;
        let to = to as u64;
        if off < to {
            // `data` covers stream offsets [start, end); `start` may be
            // negative only for bytes before `delivered`, already skipped.
            let base = start as u64;
            if off == self.delivered && self.held.range(..to).next().is_none() {
                // In order with nothing held in its way (the common case):
                // straight to the reader, not through the out-of-order map.
                let bytes = &data[off.wrapping_sub(base) as usize..to.wrapping_sub(base) as usize];
                r.new += bytes.len();
                self.advance(bytes);
            } else if off > self.delivered && self.held.len() >= self.max_ranges() {
                // Too many separate pieces (tiny segments scattered over
                // the window): this one is dropped, the sender resends.
                r.outside += (to - off) as usize;
            } else {
                self.merge(off, to, base, data, &mut r);
                // One entry per block: the segment's block replaces the
                // older arrivals it now contains.
                if let Some((&s, &e)) = self.blocks.range(..=off).next_back() {
                    self.recent.retain(|&o| o < s || o >= e);
                }
                self.recent.push_front(off);
                self.recent.truncate(SACK_BLOCKS);
            }
            self.deliver();
        }
        r
    }

    /// Fills `[from, to)` around the held ranges.
    fn merge(&mut self, from: u64, to: u64, base: u64, data: &[u8], r: &mut Insert) {
        // Offsets relative to `base` in modular arithmetic: `base` may be
        // "negative" (a segment reaching back before the stream's start).
        let at = |o: u64| o.wrapping_sub(base) as usize;
        let slice = |a: u64, b: u64| data[at(a)..at(b)].to_vec();
        let mut pos = from;
        // Held ranges never overlap: only the last one starting before
        // `from` can reach into it, then those starting inside. (Not a
        // scan from the lowest: that made each insert linear in what is
        // held, and a sender of tiny scattered segments quadratic.)
        let before = self
            .held
            .range(..from)
            .next_back()
            .filter(|(&s, d)| s + d.len() as u64 > from);
        let overlapping: Vec<(u64, usize)> = before
            .into_iter()
            .chain(self.held.range(from..to))
            .map(|(&s, d)| (s, d.len()))
            .collect();
        for (s, len) in overlapping {
            if pos < s {
                self.put(pos, slice(pos, s));
                r.new += (s - pos) as usize;
                pos = s;
            }
            let stop = to.min(s + len as u64);
            let held = &self.held[&s][(pos - s) as usize..(stop - s) as usize];
            let new = &data[at(pos)..at(stop)];
            let same = held.iter().zip(new).filter(|(a, b)| a == b).count();
            r.duplicate += same;
            r.conflict += held.len() - same;
            pos = stop;
        }
        if pos < to {
            self.put(pos, slice(pos, to));
            r.new += (to - pos) as usize;
        }
    }

    /// Separate out-of-order pieces (segments) held at most: one per 64
    /// bytes of capacity (a window of full segments needs one per 1448),
    /// at least 4096 (a sender of small messages behind one hole). Each
    /// costs a map node and an allocation beyond its bytes, about 100
    /// bytes: 400 KiB at most for a 128 KiB window.
    fn max_ranges(&self) -> usize {
        (self.capacity / 64).max(4096)
    }

    fn put(&mut self, at: u64, bytes: Vec<u8>) {
        let end = at + bytes.len() as u64;
        self.held_bytes += bytes.len();
        self.held.insert(at, bytes);
        // Join the block that ends where this starts, and the one that
        // starts where it ends (the ranges themselves never overlap).
        let mut start = at;
        let mut stop = end;
        if let Some((&s, &e)) = self.blocks.range(..at).next_back() {
            if e == at {
                start = s;
            }
        }
        if let Some(e) = self.blocks.remove(&end) {
            stop = e;
        }
        self.blocks.insert(start, stop);
    }

    /// Moves held ranges that now start at `delivered` to the reader.
    fn deliver(&mut self) {
        while let Some(entry) = self.held.first_entry() {
            if *entry.key() != self.delivered {
                break;
            }
            let bytes = entry.remove();
            self.held_bytes -= bytes.len();
            self.advance(&bytes);
        }
        // The first block went whole: its ranges were contiguous.
        while let Some(entry) = self.blocks.first_entry() {
            if *entry.get() > self.delivered {
                break;
            }
            entry.remove();
        }
        let delivered = self.delivered;
        self.recent.retain(|&o| o >= delivered);
    }

    /// Hands the next in-order bytes to the reader (and the history).
    fn advance(&mut self, bytes: &[u8]) {
        self.delivered += bytes.len() as u64;
        self.next = self.next + bytes.len() as u32;
        // By slice, not by byte: VecDeque copies a slice in at most two
        // memcpys, where an iterator of bytes is written one by one.
        self.kept.extend(bytes);
        self.unread += bytes.len();
        self.remembered = (self.remembered + bytes.len()).min(self.history_cap);
        self.forget();
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn seg(r: &mut Reassembler, isn: SeqNum, off: u32, data: &[u8]) -> Insert {
        r.insert(isn + off, data)
    }

    /// `read_with` hands over the same bytes as `read`, in order, up to
    /// its limit, across the queue's wrap.
    #[test]
    fn read_with_hands_over_what_read_would_return() {
        let isn = SeqNum(7);
        let bytes: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
        let mut a = Reassembler::new(isn, 1 << 16, 0);
        let mut b = Reassembler::new(isn, 1 << 16, 0);
        let mut got = Vec::new();
        let mut off = 0;
        let mut wrapped = false;
        // Reads and writes interleaved so that the queue wraps.
        for (put, take) in [(1000, 700), (1000, 900), (1000, 5000)] {
            for r in [&mut a, &mut b] {
                seg(r, isn, off, &bytes[off as usize..(off + put) as usize]);
            }
            off += put;
            let want = a.read(take);
            let mut chunks = 0;
            let n = b.read_with(take, &mut |c| {
                chunks += 1;
                got.extend_from_slice(c);
            });
            assert_eq!(n, want.len());
            assert!(chunks <= 2);
            wrapped |= chunks == 2;
            assert!(got[got.len() - n..] == want[..]);
        }
        assert!(got == bytes);
        assert!(wrapped, "never read across the wrap");
        assert_eq!(b.read_with(10, &mut |_| panic!("nothing left")), 0);
    }

    /// SACK blocks are whole runs (not one per segment), the newest
    /// arrival's first, then the ones before it, then the lowest.
    #[test]
    fn sack_blocks_are_contiguous_and_newest_first() {
        let isn = SeqNum(1000);
        let mut r = Reassembler::new(isn, 1 << 16, 1 << 16);
        let block = |a: u32, b: u32| (isn + a, isn + b);
        seg(&mut r, isn, 10, &[1; 10]);
        seg(&mut r, isn, 20, &[1; 10]);
        assert_eq!(r.sack_blocks(), vec![block(10, 30)]);
        seg(&mut r, isn, 50, &[1; 10]);
        assert_eq!(r.sack_blocks(), vec![block(50, 60), block(10, 30)]);
        for off in [70, 90, 110, 130] {
            seg(&mut r, isn, off, &[1; 10]);
        }
        let newest_four = vec![
            block(130, 140),
            block(110, 120),
            block(90, 100),
            block(70, 80),
        ];
        assert_eq!(r.sack_blocks(), newest_four);
        // Filling between two blocks joins them, and it is the newest.
        seg(&mut r, isn, 30, &[1; 20]);
        assert_eq!(
            r.sack_blocks(),
            vec![
                block(10, 60),
                block(130, 140),
                block(110, 120),
                block(90, 100)
            ]
        );
        // The hole at 0 filled: that block is delivered; the rest stay,
        // newest first, then the lowest.
        seg(&mut r, isn, 0, &[1; 10]);
        assert_eq!(r.next(), isn + 60);
        assert_eq!(r.sack_blocks(), newest_four);
    }

    #[test]
    fn out_of_order_segments_are_delivered_in_order() {
        let isn = SeqNum(u32::MAX - 3);
        let mut r = Reassembler::new(isn, 1 << 16, 1 << 16);
        assert_eq!(seg(&mut r, isn, 5, b"fgh").new, 3);
        assert_eq!(r.readable(), 0);
        assert_eq!(r.sack_blocks(), vec![((isn + 5), (isn + 8))]);
        seg(&mut r, isn, 0, b"abcde");
        assert_eq!(r.read(100), b"abcdefgh");
        assert_eq!(r.next(), (isn + 8));
        assert!(r.sack_blocks().is_empty());
    }

    /// A sender scattering tiny segments over the window (every other
    /// byte) cannot make the reassembler hold more than its bound of
    /// separate pieces; the rest is dropped as outside, and the stream
    /// still completes once the gaps arrive.
    #[test]
    fn scattered_tiny_segments_are_held_up_to_a_bound() {
        let isn = SeqNum(7);
        let mut r = Reassembler::new(isn, 128 << 10, 0);
        let mut outside = 0;
        for off in (1..(128u32 << 10)).step_by(2) {
            outside += seg(&mut r, isn, off, &[9]).outside;
        }
        assert_eq!(r.held(), r.max_ranges());
        assert_eq!(outside, (64 << 10) - r.max_ranges());
        assert_eq!(r.max_ranges(), 4096);
        // The front gap fills and delivers the first held piece.
        seg(&mut r, isn, 0, &[9]);
        assert_eq!((r.readable(), r.held()), (2, 4095));
    }

    /// Trimming an idle stream keeps its unread bytes and its window;
    /// only the history of delivered bytes goes.
    #[test]
    fn trimming_keeps_unread_bytes() {
        let isn = SeqNum(10);
        let mut r = Reassembler::new(isn, 1000, 100);
        seg(&mut r, isn, 0, b"abcdef");
        assert_eq!(r.read(2), b"ab");
        r.trim();
        assert_eq!((r.readable(), r.window()), (4, 996));
        assert_eq!(r.read(10), b"cdef");
        // A retransmission of trimmed history is outside, not a conflict.
        let i = seg(&mut r, isn, 0, b"XY");
        assert_eq!((i.conflict, i.outside), (0, 2));
        r.trim();
        assert_eq!((r.readable(), r.window()), (0, 1000));
    }

    #[test]
    fn first_copy_wins_and_conflicts_are_counted() {
        let isn = SeqNum(1000);
        let mut r = Reassembler::new(isn, 1 << 16, 1 << 16);
        seg(&mut r, isn, 4, b"efgh");
        let ins = seg(&mut r, isn, 2, b"cdXXgh");
        assert_eq!((ins.new, ins.duplicate, ins.conflict), (2, 2, 2));
        seg(&mut r, isn, 0, b"ab");
        assert_eq!(r.read(100), b"abcdefgh");
        // A retransmission of delivered bytes with different content.
        let ins = seg(&mut r, isn, 0, b"abZd");
        assert_eq!((ins.duplicate, ins.conflict, ins.new), (3, 1, 0));
    }

    #[test]
    fn bytes_beyond_the_window_or_history_are_outside() {
        let isn = SeqNum(7);
        let mut r = Reassembler::new(isn, 8, 2);
        let ins = seg(&mut r, isn, 4, b"efghijkl");
        assert_eq!((ins.new, ins.outside), (4, 4));
        seg(&mut r, isn, 0, b"abcd");
        assert_eq!(r.window(), 0, "unread bytes close the window");
        assert_eq!(seg(&mut r, isn, 8, b"i").outside, 1);
        assert_eq!(r.read(3), b"abc");
        assert_eq!(r.window(), 3);
        // History keeps only the last 2 delivered bytes.
        let ins = seg(&mut r, isn, 0, b"abcdefgh");
        assert_eq!((ins.outside, ins.duplicate), (6, 2));
    }

    proptest! {
        /// The history is the tail of the reader's queue: whatever was
        /// read, the last `cap` delivered bytes (and no older ones) are
        /// checked against a retransmission, and the queue keeps no more
        /// than the unread bytes or the history, whichever is more.
        #[test]
        fn the_history_outlives_reads_by_exactly_its_size(
            cap in 0usize..300,
            steps in proptest::collection::vec((1usize..200, 0usize..250), 1..40),
        ) {
            let isn = SeqNum(u32::MAX - 1000);
            let mut r = Reassembler::new(isn, 1 << 20, cap);
            let mut stream = Vec::new();
            let mut read = Vec::new();
            for (i, (put, take)) in steps.into_iter().enumerate() {
                let chunk: Vec<u8> = (0..put).map(|j| (i * 7 + j) as u8).collect();
                prop_assert_eq!(seg(&mut r, isn, stream.len() as u32, &chunk).new, put);
                stream.extend_from_slice(&chunk);
                read.extend(r.read(take));
                prop_assert_eq!(r.kept.len(), r.readable().max(cap.min(stream.len())));
                prop_assert_eq!(r.readable(), stream.len() - read.len());
            }
            // A retransmission of everything, one byte changed in the
            // oldest remembered position (when there is one).
            let remembered = cap.min(stream.len());
            let mut again = stream.clone();
            let first = stream.len() - remembered;
            if remembered > 0 {
                again[first] ^= 0xff;
            }
            let ins = seg(&mut r, isn, 0, &again);
            prop_assert_eq!(ins.outside, first);
            prop_assert_eq!(ins.conflict, usize::from(remembered > 0));
            prop_assert_eq!(ins.duplicate, remembered.saturating_sub(1));
            read.extend(r.read(usize::MAX));
            prop_assert_eq!(read, stream);
        }
    }

    /// The reference: every stream position holds its first value.
    struct Model {
        known: Vec<Option<u8>>,
        conflicts: usize,
    }

    impl Model {
        fn insert(&mut self, off: usize, data: &[u8]) {
            for (i, &b) in data.iter().enumerate() {
                match self.known[off + i] {
                    None => self.known[off + i] = Some(b),
                    Some(k) if k != b => self.conflicts += 1,
                    Some(_) => {}
                }
            }
        }

        fn prefix(&self) -> Vec<u8> {
            self.known.iter().map_while(|b| *b).collect()
        }

        /// Runs of known bytes from `from` on, as `[start, end)`.
        fn runs_after(&self, from: usize) -> Vec<(usize, usize)> {
            let mut runs = Vec::new();
            let mut start = None;
            for i in from..=self.known.len() {
                match (self.known.get(i).copied().flatten(), start) {
                    (Some(_), None) => start = Some(i),
                    (None, Some(s)) => {
                        runs.push((s, i));
                        start = None;
                    }
                    _ => {}
                }
            }
            runs
        }
    }

    proptest! {
        #[test]
        fn matches_the_first_copy_model(
            isn: u32,
            stream in proptest::collection::vec(any::<u8>(), 1..600),
            segs in proptest::collection::vec((0usize..600, 1usize..120, any::<bool>()), 1..60),
        ) {
            let isn = SeqNum(isn);
            let mut r = Reassembler::new(isn, 1 << 20, 1 << 20);
            let mut m = Model { known: vec![None; stream.len()], conflicts: 0 };
            let mut conflicts = 0;
            let mut out = Vec::new();
            for (off, len, corrupt) in segs {
                let off = off % stream.len();
                let end = (off + len).min(stream.len());
                let mut data = stream[off..end].to_vec();
                if corrupt {
                    data.iter_mut().step_by(3).for_each(|b| *b = b.wrapping_add(1));
                }
                m.insert(off, &data);
                conflicts += r.insert(isn + off as u32, &data).conflict;
                out.extend(r.read(usize::MAX));
                // The SACK blocks are exactly the model's runs of known
                // bytes past the delivered prefix: whole, never touching,
                // the one holding the newest segment first (when it is
                // held out of order).
                let delivered = out.len();
                let blocks: Vec<(usize, usize)> = r
                    .sack_blocks()
                    .iter()
                    .map(|&(l, e)| (l.since(isn) as usize, e.since(isn) as usize))
                    .collect();
                let runs = m.runs_after(delivered);
                prop_assert!(blocks.len() == runs.len().min(SACK_BLOCKS), "{:?} {:?}", blocks, runs);
                for b in &blocks {
                    prop_assert!(runs.contains(b), "{:?} not in {:?}", b, runs);
                }
                if off > delivered && !data.is_empty() {
                    prop_assert!(blocks[0].0 <= off && off < blocks[0].1, "{:?} {}", blocks, off);
                }
            }
            let want = m.prefix();
            prop_assert_eq!(&out, &want);
            prop_assert_eq!(conflicts, m.conflicts);
            prop_assert_eq!(r.next(), isn + want.len() as u32);
            prop_assert_eq!(r.held() + want.len(), m.known.iter().filter(|b| b.is_some()).count());
        }
    }
}
