//! RACK loss detection (RFC 8985 §6): a segment is lost once a segment
//! sent after it has been delivered (cumulatively acknowledged or SACKed)
//! and a reordering window has passed on top of the round trip. Time, not
//! a count of duplicate ACKs, decides: a lost retransmission is found like
//! any other loss, a hole with only one or two segments after it is found
//! within a round trip, and reordering shorter than the window costs no
//! retransmission at all.
//!
//! The sender's log of what it sent is kept here: one entry per segment
//! not cumulatively acknowledged, in sequence order (a retransmission
//! updates its entries in place), and a timeline of transmissions in the
//! order they went out, so that loss detection looks only at the oldest
//! transmissions still undecided (amortised O(1) per ACK). Everything is
//! empty, and may be freed, while nothing is in flight.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use crate::wire::seq::SeqNum;

/// Sent more than once: RFC 8985 §6.2 step 2's ambiguity checks apply.
const RETRANSMITTED: u8 = 1;
/// SACKed (cumulatively acknowledged entries are dropped).
const DELIVERED: u8 = 2;
/// Marked lost and not yet sent again.
const LOST: u8 = 4;

/// How long a minimum round trip stands (RFC 8985 §6.2 step 1: "a
/// windowed min-filtered estimate of recent RTT measurements").
const MIN_RTT_WINDOW: Duration = Duration::from_secs(10);
/// RFC 8985 §6.2 step 4: a DSACK keeps the widened window for 16
/// recoveries.
const REO_PERSIST: u32 = 16;
/// The window never grows past a smoothed round trip anyway.
const REO_MULT_MAX: u32 = 64;

#[derive(Clone, Copy, Debug)]
struct Sent {
    end: SeqNum,
    at: Instant,
    /// Transmission number: the order things went out (the RFC compares
    /// transmit times; one `now` covers a whole burst here, so a count
    /// tells them apart where the time cannot).
    order: u64,
    flags: u8,
}

/// What one round of loss detection found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Detected {
    /// Segments newly marked lost.
    pub lost: u32,
    /// Of them, retransmissions (lost again).
    pub lost_again: u32,
    /// When a segment still undecided is due (the RACK reorder timer).
    pub at: Option<Instant>,
}

/// One sender's RACK state; see the module note.
#[derive(Debug)]
pub struct Rack {
    /// Segments sent and not cumulatively acknowledged, in sequence order,
    /// contiguous from `base` (SND.UNA).
    sent: VecDeque<Sent>,
    base: SeqNum,
    /// `(order, start)` of transmissions not yet judged, in the order sent.
    /// A record whose entry has another order now (sent again) or was
    /// delivered is stale and dropped when met.
    timeline: VecDeque<(u64, SeqNum)>,
    /// `(order, start)` of entries marked lost, to send again.
    lost: VecDeque<(u64, SeqNum)>,
    lost_bytes: u32,
    next_order: u64,
    /// RACK.segment: the most recently sent of the delivered segments
    /// (its order and transmit time), and RACK.rtt.
    newest: Option<(u64, Instant)>,
    rtt: Duration,
    /// The newest delivered in the ACK being processed.
    best: Option<(u64, Instant)>,
    min_rtt: Option<(Duration, Instant)>,
    fack: Option<SeqNum>,
    reordering_seen: bool,
    reo_mult: u32,
    reo_persist: u32,
    dsack_round: Option<SeqNum>,
}

impl Rack {
    pub fn new(base: SeqNum) -> Rack {
        Rack {
            sent: VecDeque::new(),
            base,
            timeline: VecDeque::new(),
            lost: VecDeque::new(),
            lost_bytes: 0,
            next_order: 1,
            newest: None,
            rtt: Duration::ZERO,
            best: None,
            min_rtt: None,
            fack: None,
            reordering_seen: false,
            reo_mult: 1,
            reo_persist: 0,
            dsack_round: None,
        }
    }

    fn log_end(&self) -> SeqNum {
        self.sent.back().map_or(self.base, |s| s.end)
    }

    fn start_of(&self, i: usize) -> SeqNum {
        match i {
            0 => self.base,
            _ => self.sent[i - 1].end,
        }
    }

    fn len_of(&self, i: usize) -> u32 {
        self.sent[i].end.since(self.start_of(i)).max(0) as u32
    }

    /// The entry holding `seq` (or `sent.len()`).
    fn index(&self, seq: SeqNum) -> usize {
        self.sent.partition_point(|s| s.end.le(seq))
    }

    /// Entries begin or end at `seq`: one that holds it is cut in two,
    /// both with its transmission and marks.
    fn split_at(&mut self, seq: SeqNum) {
        let i = self.index(seq);
        if i >= self.sent.len() || !seq.gt(self.start_of(i)) {
            return;
        }
        let mut first = self.sent[i];
        first.end = seq;
        if first.flags & LOST != 0 {
            self.lost.push_front((first.order, seq));
        }
        self.sent.insert(i, first);
    }

    /// `[start, end)` (a FIN counting one) went out at `now`; `again`: as
    /// a retransmission (bytes sent before, also after a timeout).
    pub fn on_send(&mut self, start: SeqNum, end: SeqNum, now: Instant, again: bool) {
        if !end.gt(start) {
            return;
        }
        let order = self.next_order;
        self.next_order += 1;
        let flags = if again { RETRANSMITTED } else { 0 };
        if self.sent.is_empty() || start.gt(self.log_end()) {
            // Nothing logged (or a gap, which the sender never leaves):
            // the log starts here.
            self.clear(start);
        }
        let log_end = self.log_end();
        let start = start.max(self.base);
        if start.lt(log_end) {
            // Sent before: the entries it covers are this transmission now.
            let upto = if end.lt(log_end) { end } else { log_end };
            self.split_at(start);
            self.split_at(upto);
            let mut i = self.index(start);
            while i < self.sent.len() && self.sent[i].end.le(upto) {
                if self.sent[i].flags & LOST != 0 {
                    self.lost_bytes = self.lost_bytes.saturating_sub(self.len_of(i));
                }
                let s = &mut self.sent[i];
                s.flags = (s.flags | RETRANSMITTED) & !LOST;
                s.at = now;
                s.order = order;
                i += 1;
            }
        }
        if end.gt(log_end) {
            self.sent.push_back(Sent {
                end,
                at: now,
                order,
                flags,
            });
        }
        self.timeline.push_back((order, start));
    }

    /// SND.UNA moved to `una`: the entries below it were delivered.
    pub fn on_cum_ack(&mut self, una: SeqNum, now: Instant) {
        // The DSACK round ends here as well as at the next DSACK: compared
        // only then, 2 GiB later, the modular order would read it as never
        // ended, and no DSACK would widen the window again.
        if self.dsack_round.is_some_and(|r| una.ge(r)) {
            self.dsack_round = None;
        }
        while let Some(&s) = self.sent.front() {
            if !s.end.le(una) {
                break;
            }
            if s.flags & LOST != 0 {
                self.lost_bytes = self.lost_bytes.saturating_sub(self.len_of(0));
            }
            self.sent.pop_front();
            self.base = s.end;
            if s.flags & DELIVERED == 0 {
                self.delivered(s, now);
            }
        }
        if self.sent.is_empty() {
            self.clear(una);
        } else if una.gt(self.base) {
            if self.sent[0].flags & LOST != 0 {
                let gone = una.since(self.base) as u32;
                self.lost_bytes = self.lost_bytes.saturating_sub(gone);
            }
            self.base = una;
        }
        // Transmissions acknowledged leave the timeline here too, not
        // only in `detect`: while RACK does not run (no SACK block from
        // the peer yet), it would otherwise grow with every segment.
        while let Some(&(order, start)) = self.timeline.front() {
            if self.undecided(order, start).is_some() {
                break;
            }
            self.timeline.pop_front();
        }
    }

    /// Where the transmission `order` that began at `start` is in the
    /// log, if it is still there and neither delivered nor marked lost.
    fn undecided(&self, order: u64, start: SeqNum) -> Option<usize> {
        let i = self.index(start);
        (i < self.sent.len()
            && self.sent[i].order == order
            && self.sent[i].flags & (DELIVERED | LOST) == 0)
            .then_some(i)
    }

    /// `[left, right)` was newly SACKed; `covered(l, r)` says whether the
    /// peer now holds all of `[l, r)`. A segment counts as delivered only
    /// once all of it is SACKed: the log is never cut at a block's edge,
    /// or a peer SACKing single bytes would shred it (each cut an insert
    /// in the middle of the log, each piece resent on its own).
    pub fn on_sacked(
        &mut self,
        left: SeqNum,
        right: SeqNum,
        now: Instant,
        covered: impl Fn(SeqNum, SeqNum) -> bool,
    ) {
        let mut i = self.index(left);
        while i < self.sent.len() && self.start_of(i).lt(right) {
            let s = self.sent[i];
            if s.flags & DELIVERED == 0 && covered(self.start_of(i), s.end) {
                if s.flags & LOST != 0 {
                    self.lost_bytes = self.lost_bytes.saturating_sub(self.len_of(i));
                }
                self.sent[i].flags = (s.flags | DELIVERED) & !LOST;
                self.delivered(s, now);
            }
            i += 1;
        }
    }

    /// RFC 8985 §6.2 steps 1-3 for one delivered segment.
    fn delivered(&mut self, s: Sent, now: Instant) {
        let rtt = now.saturating_duration_since(s.at);
        //= https://www.rfc-editor.org/rfc/rfc8985#section-6.2
        //# If Segment.retransmitted is TRUE, ... (2) The segment was last
        //# retransmitted less than RACK.min_rtt ago.
        // (The ACK is likely for the original: no evidence of order.)
        let min_rtt = self.min_rtt.map_or(Duration::ZERO, |m| m.0);
        if s.flags & RETRANSMITTED != 0 && rtt < min_rtt {
            return;
        }
        if self
            .min_rtt
            .is_none_or(|(m, t)| rtt <= m || now.saturating_duration_since(t) > MIN_RTT_WINDOW)
        {
            self.min_rtt = Some((rtt, now));
        }
        if self.best.is_none_or(|(o, _)| s.order > o) {
            self.best = Some((s.order, s.at));
        }
        //= https://www.rfc-editor.org/rfc/rfc8985#section-6.2
        //# If Segment.end_seq > RACK.fack, then RACK.fack = Segment.end_seq
        //# ... Else if Segment.end_seq < RACK.fack and
        //# Segment.retransmitted is FALSE, then RACK.reordering_seen = TRUE.
        match self.fack {
            Some(f) if !s.end.gt(f) => {
                if s.end.lt(f) && s.flags & RETRANSMITTED == 0 {
                    self.reordering_seen = true;
                }
            }
            _ => self.fack = Some(s.end),
        }
    }

    /// The ACK's deliveries are in: RACK.segment and RACK.rtt follow the
    /// most recently sent of them.
    pub fn end_ack(&mut self, now: Instant) {
        if let Some((order, at)) = self.best.take() {
            self.rtt = now.saturating_duration_since(at);
            if self.newest.is_none_or(|(o, _)| order > o) {
                self.newest = Some((order, at));
            }
        }
    }

    /// A DSACK arrived (RFC 8985 §6.2 step 4): once per round trip the
    /// window widens by a quarter of the minimum RTT, for the next 16
    /// recoveries.
    pub fn on_dsack(&mut self, snd_una: SeqNum, snd_nxt: SeqNum) {
        if self.dsack_round.is_some_and(|r| snd_una.ge(r)) {
            self.dsack_round = None;
        }
        if self.dsack_round.is_none() {
            self.dsack_round = Some(snd_nxt);
            self.reo_mult = (self.reo_mult + 1).min(REO_MULT_MAX);
            self.reo_persist = REO_PERSIST;
        }
    }

    /// A retransmission proved spurious: the segment was reordered. The
    /// RFC's step 3 cannot see that case (the late original counts as
    /// retransmitted), so it is marked here.
    pub fn saw_reordering(&mut self) {
        self.reordering_seen = true;
    }

    /// A recovery ended: the widened window lasts `REO_PERSIST` of them.
    pub fn on_recovery_exit(&mut self) {
        if self.reo_persist > 0 {
            self.reo_persist -= 1;
            if self.reo_persist == 0 {
                self.reo_mult = 1;
            }
        }
    }

    /// RACK.reo_wnd (RFC 8985 §6.2 step 4). `sacked_segments` is what
    /// the scoreboard holds, in segments.
    pub fn reo_wnd(
        &self,
        in_recovery: bool,
        sacked_segments: u32,
        dupthresh: u32,
        srtt: Duration,
    ) -> Duration {
        //= https://www.rfc-editor.org/rfc/rfc8985#section-6.2
        //# If RACK.reordering_seen is FALSE: If in fast or timeout
        //# recovery, return 0. Else if RACK.segs_sacked >= DupThresh,
        //# return 0.
        if !self.reordering_seen && (in_recovery || sacked_segments >= dupthresh) {
            return Duration::ZERO;
        }
        //# Return min(RACK.reo_wnd_mult * RACK.min_RTT / 4, SRTT)
        let min_rtt = self.min_rtt.map_or(Duration::ZERO, |m| m.0);
        (min_rtt / 4 * self.reo_mult).min(srtt.max(min_rtt))
    }

    /// RFC 8985 §6.2 step 5: every segment sent before RACK.segment whose
    /// transmit time plus RACK.rtt plus `reo_wnd` has passed is lost.
    /// The timeline is in transmit order, so the first one not yet due
    /// ends the walk and sets the timer.
    pub fn detect(&mut self, now: Instant, reo_wnd: Duration) -> Detected {
        let mut found = Detected::default();
        let Some((newest, _)) = self.newest else {
            return found;
        };
        while let Some(&(order, start)) = self.timeline.front() {
            let Some(i) = self.undecided(order, start) else {
                self.timeline.pop_front();
                continue;
            };
            if order >= newest {
                break;
            }
            let due = self.sent[i].at + self.rtt + reo_wnd;
            if due > now {
                found.at = Some(due);
                break;
            }
            self.timeline.pop_front();
            // Every entry of this transmission (one segment, or pieces of
            // it the log cut).
            let mut j = i;
            while j < self.sent.len() && self.sent[j].order == order {
                let s = self.sent[j];
                if s.flags & (DELIVERED | LOST) == 0 {
                    self.sent[j].flags |= LOST;
                    self.lost_bytes = self.lost_bytes.saturating_add(self.len_of(j));
                    self.lost.push_back((order, self.start_of(j)));
                    found.lost += 1;
                    found.lost_again += u32::from(s.flags & RETRANSMITTED != 0);
                }
                j += 1;
            }
        }
        found
    }

    /// The first segment marked lost and not sent again yet, as
    /// `[start, end)`.
    pub fn next_lost(&mut self) -> Option<(SeqNum, SeqNum)> {
        while let Some(&(order, start)) = self.lost.front() {
            let i = self.index(start);
            if i < self.sent.len() && self.sent[i].order == order && self.sent[i].flags & LOST != 0
            {
                return Some((self.start_of(i), self.sent[i].end));
            }
            self.lost.pop_front();
        }
        None
    }

    /// Whether the segment at `seq` is marked lost.
    pub fn is_lost(&self, seq: SeqNum) -> bool {
        let i = self.index(seq);
        i < self.sent.len() && self.sent[i].flags & LOST != 0
    }

    /// Bytes from `seq` to the end of the segment that holds it, as it
    /// went out.
    pub fn segment_from(&self, seq: SeqNum) -> Option<u32> {
        let i = self.index(seq);
        (i < self.sent.len() && !seq.lt(self.base))
            .then(|| self.sent[i].end.since(seq).max(0) as u32)
    }

    /// Bytes marked lost and not sent again (RFC 6675's pipe leaves them
    /// out).
    pub fn lost_bytes(&self) -> u32 {
        self.lost_bytes
    }

    /// A reduction was undone: nothing it found lost is to be sent again.
    /// Those segments are judged again, oldest transmission first.
    pub fn unmark_lost(&mut self) {
        if self.lost_bytes == 0 && self.lost.is_empty() {
            return;
        }
        let mut again = Vec::new();
        for i in 0..self.sent.len() {
            if self.sent[i].flags & LOST != 0 {
                self.sent[i].flags &= !LOST;
                again.push((self.sent[i].order, self.start_of(i)));
            }
        }
        again.sort_unstable_by_key(|&(order, _)| std::cmp::Reverse(order));
        for record in again {
            self.timeline.push_front(record);
        }
        self.lost.clear();
        self.lost_bytes = 0;
    }

    /// Forgets the log (a retransmission timeout sends everything again
    /// from `base`); what was learnt of the path stays.
    pub fn clear(&mut self, base: SeqNum) {
        self.sent.clear();
        self.timeline.clear();
        self.lost.clear();
        self.lost_bytes = 0;
        self.base = base;
    }

    /// Entries logged (for tests and bounds).
    pub fn logged(&self) -> usize {
        self.sent.len()
    }

    /// Transmissions on the timeline (for tests and bounds).
    pub fn timed(&self) -> usize {
        self.timeline.len()
    }

    /// Gives back the log's memory while nothing is in flight.
    pub fn shrink(&mut self) {
        if self.sent.is_empty() {
            self.sent = VecDeque::new();
            self.timeline = VecDeque::new();
            self.lost = VecDeque::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSS: u32 = 1000;

    fn s(n: u32) -> SeqNum {
        SeqNum(n)
    }

    /// Ten segments sent at `t0`, one a millisecond.
    fn ten(t0: Instant) -> Rack {
        let mut r = Rack::new(s(0));
        for i in 0..10 {
            let at = t0 + Duration::from_millis(u64::from(i));
            r.on_send(s(i * MSS), s((i + 1) * MSS), at, false);
        }
        r
    }

    fn sack(r: &mut Rack, l: u32, h: u32, now: Instant) {
        r.on_sacked(s(l), s(h), now, |a, b| a.ge(s(l)) && b.le(s(h)));
        r.end_ack(now);
    }

    #[test]
    fn a_segment_sent_before_a_delivered_one_is_lost_after_the_window() {
        let t0 = Instant::now();
        let mut r = ten(t0);
        // Segment 3 (sent at 3 ms) is SACKed at 13 ms: RTT 10 ms.
        let now = t0 + Duration::from_millis(13);
        sack(&mut r, 3 * MSS, 4 * MSS, now);
        // Segments 0-2 were sent 1-3 ms earlier: with a 2 ms window,
        // 0 and 1 are lost now, 2 at 14 ms.
        let d = r.detect(now, Duration::from_millis(2));
        assert_eq!(d.lost, 2);
        assert_eq!(d.at, Some(t0 + Duration::from_millis(14)));
        assert_eq!(r.lost_bytes(), 2 * MSS);
        assert_eq!(r.next_lost(), Some((s(0), s(MSS))));
        // Resent, it is no longer lost; the next one is.
        r.on_send(s(0), s(MSS), now, true);
        assert_eq!(r.next_lost(), Some((s(MSS), s(2 * MSS))));
        assert_eq!(r.lost_bytes(), MSS);
        let d = r.detect(t0 + Duration::from_millis(14), Duration::from_millis(2));
        assert_eq!(d.lost, 1);
        // Segments sent after the delivered one are never judged by it.
        assert_eq!(d.at, None);
        assert!(!r.is_lost(s(4 * MSS)));
    }

    #[test]
    fn a_retransmission_is_lost_once_something_sent_after_it_is_delivered() {
        let t0 = Instant::now();
        let mut r = ten(t0);
        let now = t0 + Duration::from_millis(13);
        sack(&mut r, 3 * MSS, 4 * MSS, now);
        r.detect(now, Duration::ZERO);
        r.on_send(s(0), s(MSS), now, true);
        // Segment 9's original went out before the resend; delivered, it
        // says nothing of it.
        let later = now + Duration::from_millis(10);
        sack(&mut r, 9 * MSS, 10 * MSS, later);
        let d = r.detect(later, Duration::ZERO);
        assert_eq!(d.lost_again, 0);
        // New data sent after the resend, delivered: the resend is lost.
        r.on_send(s(10 * MSS), s(11 * MSS), later, false);
        let after = later + Duration::from_millis(10);
        sack(&mut r, 10 * MSS, 11 * MSS, after);
        let d = r.detect(after, Duration::ZERO);
        assert_eq!(d.lost_again, 1);
        assert!(r.is_lost(s(0)));
    }

    #[test]
    fn reordering_is_seen_and_widens_nothing_until_a_dsack() {
        let t0 = Instant::now();
        let mut r = ten(t0);
        let now = t0 + Duration::from_millis(13);
        sack(&mut r, 3 * MSS, 4 * MSS, now);
        let srtt = Duration::from_millis(10);
        // Before reordering is seen: no window once enough is SACKed, or
        // in recovery.
        assert_eq!(r.reo_wnd(false, 1, 3, srtt), Duration::from_micros(2500));
        assert_eq!(r.reo_wnd(false, 3, 3, srtt), Duration::ZERO);
        assert_eq!(r.reo_wnd(true, 1, 3, srtt), Duration::ZERO);
        // Segment 1, never resent, arrives below the highest delivered.
        r.on_cum_ack(s(0), now);
        sack(&mut r, MSS, 2 * MSS, now);
        assert_eq!(r.reo_wnd(true, 3, 3, srtt), Duration::from_micros(2500));
        r.on_dsack(s(0), s(10 * MSS));
        r.on_dsack(s(0), s(10 * MSS));
        assert_eq!(r.reo_wnd(true, 3, 3, srtt), Duration::from_millis(5));
        for _ in 0..REO_PERSIST {
            r.on_recovery_exit();
        }
        assert_eq!(r.reo_wnd(true, 3, 3, srtt), Duration::from_micros(2500));
        // A DSACK after more than 2 GiB without one starts a new round.
        r.on_cum_ack(s(10 * MSS), now);
        let quarter = r.reo_wnd(true, 3, 3, srtt);
        r.on_dsack(s(10 * MSS), s(20 * MSS));
        assert_eq!(r.reo_wnd(true, 3, 3, srtt), quarter * 2);
        let mut una = 10 * MSS;
        // Three quarters of the sequence space on: the round's end, compared
        // from here, would be half the space or more ahead.
        for _ in 0..3 {
            una = una.wrapping_add(1 << 30);
            r.on_cum_ack(s(una), now);
        }
        r.on_dsack(s(una), s(una.wrapping_add(MSS)));
        assert_eq!(r.reo_wnd(true, 3, 3, srtt), quarter * 3);
    }

    #[test]
    fn the_log_splits_where_blocks_and_resends_cut_and_empties_when_acked() {
        let t0 = Instant::now();
        let mut r = ten(t0);
        let now = t0 + Duration::from_millis(20);
        // A block ending inside segment 5 delivers nothing and cuts
        // nothing; the rest of it delivers the segment.
        sack(&mut r, 5 * MSS, 5 * MSS + 400, now);
        assert_eq!((r.logged(), r.newest), (10, None));
        r.on_sacked(s(5 * MSS + 400), s(6 * MSS), now, |a, b| {
            a.ge(s(5 * MSS)) && b.le(s(6 * MSS))
        });
        r.end_ack(now);
        assert_eq!(r.logged(), 10);
        r.detect(now, Duration::ZERO);
        assert_eq!(r.lost_bytes(), 5 * MSS);
        // A resend of half a lost segment leaves the rest lost.
        r.on_send(s(0), s(500), now, true);
        assert_eq!(r.next_lost(), Some((s(500), s(MSS))));
        assert_eq!(r.lost_bytes(), 5 * MSS - 500);
        assert_eq!(r.segment_from(s(200)), Some(300));
        r.on_cum_ack(s(3 * MSS + 10), now);
        assert_eq!(r.lost_bytes(), 2 * MSS - 10);
        // Undone: nothing is lost, and the two are judged again.
        r.unmark_lost();
        assert_eq!((r.lost_bytes(), r.next_lost()), (0, None));
        assert_eq!(r.detect(now, Duration::ZERO).lost, 2);
        assert_eq!(r.lost_bytes(), 2 * MSS - 10);
        r.unmark_lost();
        r.on_cum_ack(s(10 * MSS), now);
        assert_eq!(r.logged(), 0);
        r.shrink();
        assert_eq!(r.sent.capacity(), 0);
        // A new flight starts the log again where the last ended.
        r.on_send(s(10 * MSS), s(11 * MSS), now, false);
        assert_eq!(r.segment_from(s(10 * MSS)), Some(MSS));
    }

    #[test]
    fn a_resend_of_an_ambiguous_segment_acked_too_soon_is_no_evidence() {
        let t0 = Instant::now();
        let mut r = ten(t0);
        let now = t0 + Duration::from_millis(10);
        r.on_cum_ack(s(MSS), now); // min RTT 10 ms
        r.end_ack(now);
        r.on_send(s(MSS), s(2 * MSS), now, true);
        // ACKed 1 ms after the resend: the original's ACK, not the
        // resend's. RACK.segment stays segment 0.
        r.on_cum_ack(s(2 * MSS), now + Duration::from_millis(1));
        r.end_ack(now + Duration::from_millis(1));
        assert_eq!(r.newest.map(|n| n.0), Some(1));
    }

    /// A peer that SACKs single bytes (a hostile one) neither cuts the
    /// log into pieces nor delivers anything with them.
    #[test]
    fn single_byte_sacks_cut_nothing() {
        let t0 = Instant::now();
        let mut r = ten(t0);
        let now = t0 + Duration::from_millis(20);
        for b in (1..10 * MSS).step_by(7) {
            r.on_sacked(s(b), s(b + 1), now, |_, _| false);
            r.end_ack(now);
        }
        assert_eq!((r.logged(), r.newest), (10, None));
        assert_eq!(r.detect(now, Duration::ZERO), Detected::default());
    }

    #[test]
    fn the_timeline_stays_a_window_long_without_detection() {
        // A peer that never SACKs: RACK never runs `detect`, and the
        // cumulative ACKs alone keep the log and the timeline bounded.
        let t0 = Instant::now();
        let mut r = ten(t0);
        for i in 10..100_000u32 {
            let now = t0 + Duration::from_micros(u64::from(i));
            r.on_cum_ack(s((i - 9) * MSS), now);
            r.on_send(s(i * MSS), s((i + 1) * MSS), now, false);
            assert!(r.logged() <= 10 && r.timed() <= 10, "at {i}: {}", r.timed());
        }
    }
}
