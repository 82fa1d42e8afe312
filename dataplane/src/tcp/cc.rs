//! Congestion control: NewReno (RFC 5681 slow start and congestion
//! avoidance with RFC 3465 byte counting, fast retransmit and fast
//! recovery as modified by RFC 6582), with the undo of a reduction that
//! proved spurious (RFC 3708, from DSACKs) and a duplicate-ACK threshold
//! that rises with the reordering seen, as Linux's `tp->reordering`.

use crate::wire::seq::SeqNum;

/// What the sender must do after an ACK.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckAction {
    /// Nothing special: send what the window allows.
    None,
    /// Retransmit the first unacknowledged segment now (fast retransmit,
    /// or a partial ACK during recovery).
    Retransmit,
}

/// NewReno state of one sender.
#[derive(Clone, Debug)]
pub struct NewReno {
    mss: u32,
    cwnd: u32,
    ssthresh: u32,
    dup_acks: u32,
    /// RFC 6582 "recover": SND.NXT when fast recovery began.
    recover: Option<SeqNum>,
    /// Bytes acknowledged in congestion avoidance, toward the next MSS.
    acked_ca: u32,
    /// Duplicate ACKs that start fast retransmit: RFC 5681's three, raised
    /// when a fast retransmit proves spurious (the segment was reordered,
    /// not lost) to the reordering measured, at most [`MAX_REORDERING`].
    dupthresh: u32,
    /// cwnd and ssthresh before the last reduction, restored if every
    /// retransmission it caused proves spurious.
    undo: Option<(u32, u32)>,
}

/// The most the duplicate-ACK threshold rises to (Linux's
/// `tcp_max_reordering`).
pub const MAX_REORDERING: u32 = 300;

impl NewReno {
    pub fn new(mss: u32) -> NewReno {
        let mss = mss.max(1);
        NewReno {
            mss,
            //= https://www.rfc-editor.org/rfc/rfc5681#section-3.1
            //# IW = min (4*SMSS, max (2*SMSS, 4380 bytes))
            cwnd: (4 * mss).min((2 * mss).max(4380)),
            //# The initial value of ssthresh SHOULD be set arbitrarily high
            ssthresh: u32::MAX,
            dup_acks: 0,
            recover: None,
            acked_ca: 0,
            dupthresh: 3,
            undo: None,
        }
    }

    /// Starts from the given window rather than the initial one (tests
    /// that begin in congestion avoidance).
    #[cfg(test)]
    pub fn with_cwnd(mut self, cwnd: u32) -> NewReno {
        self.cwnd = cwnd.max(2 * self.mss);
        self
    }

    pub fn cwnd(&self) -> u32 {
        self.cwnd
    }

    pub fn ssthresh(&self) -> u32 {
        self.ssthresh
    }

    /// Extra bytes the sender may have in flight beyond cwnd: one segment
    /// for each of the first two duplicate ACKs.
    pub fn limited_transmit(&self) -> u32 {
        //= https://www.rfc-editor.org/rfc/rfc3042#section-2
        //# a TCP sender SHOULD send a segment of previously unsent data in
        //# response to each of the first two duplicate acknowledgments that
        //# arrive at the sender, if the receiver's advertised window allows,
        //# the total FlightSize would remain less than or equal to cwnd plus
        //# 2*SMSS
        // With a raised threshold, a segment for each duplicate ACK below
        // it: each says a segment left the network.
        if self.recover.is_some() {
            0
        } else {
            self.dup_acks.min(self.dupthresh - 1) * self.mss
        }
    }

    /// Duplicate ACKs that start fast retransmit now.
    pub fn dupthresh(&self) -> u32 {
        self.dupthresh
    }

    /// A retransmission proved spurious (DSACKed): the segment was
    /// reordered by `reordering` segments, and the threshold rises past
    /// that (Linux's `tcp_check_sack_reordering`).
    pub fn reordered(&mut self, reordering: u32) {
        self.dupthresh = self
            .dupthresh
            .max(reordering.saturating_add(1))
            .min(MAX_REORDERING);
    }

    /// Every retransmission since the last reduction proved spurious: the
    /// reduction is taken back (RFC 3708 §3: the window and ssthresh as
    /// they were) and recovery ends. Returns whether there was a
    /// reduction to take back.
    pub fn undo(&mut self) -> bool {
        let Some((cwnd, ssthresh)) = self.undo.take() else {
            return false;
        };
        self.cwnd = self.cwnd.max(cwnd);
        self.ssthresh = self.ssthresh.max(ssthresh);
        self.recover = None;
        self.dup_acks = 0;
        true
    }

    pub fn in_recovery(&self) -> bool {
        self.recover.is_some()
    }

    /// An ACK that advanced SND.UNA by `acked` bytes to `una`;
    /// `flight` is the data outstanding before it.
    pub fn on_ack(&mut self, acked: u32, una: SeqNum, flight: u32) -> AckAction {
        self.dup_acks = 0;
        if let Some(recover) = self.recover {
            if una.ge(recover) {
                //= https://www.rfc-editor.org/rfc/rfc6582#section-3.2
                //# Full acknowledgments: ... Set cwnd to either (1)
                //# min (ssthresh, max(FlightSize, SMSS) + SMSS) or (2) ssthresh
                self.cwnd = self.ssthresh.min(flight.max(self.mss) + self.mss);
                self.recover = None;
                return AckAction::None;
            }
            //# Partial acknowledgments: ... retransmit the first
            //# unacknowledged segment ... deflate the congestion window by
            //# the amount of new data acknowledged ... add back SMSS bytes
            self.cwnd = self.cwnd.saturating_sub(acked);
            if acked >= self.mss {
                self.cwnd += self.mss;
            }
            return AckAction::Retransmit;
        }
        let mut acked = acked;
        if self.cwnd < self.ssthresh {
            //= https://www.rfc-editor.org/rfc/rfc3465#section-2.1
            //# The congestion window is increased by the number of bytes
            //# acknowledged
            // Byte counting, as Linux does (`tcp_slow_start`): a receiver
            // behind GRO acknowledges 8 to 50 segments at once, and
            // RFC 5681's min(N, SMSS) per ACK would then grow the window
            // by one segment where the peer's stack grows it by fifty.
            // Linux also leaves out RFC 3465's burst limit L; so does this.
            // Growth stops at ssthresh; the rest of the ACK counts toward
            // congestion avoidance.
            let grow = acked.min(self.ssthresh - self.cwnd);
            self.cwnd = self.cwnd.saturating_add(grow);
            acked -= grow;
        }
        if self.cwnd >= self.ssthresh && acked > 0 {
            //= https://www.rfc-editor.org/rfc/rfc5681#section-3.1
            //# cwnd += SMSS*SMSS/cwnd ... (byte counting variant)
            self.acked_ca += acked;
            while self.acked_ca >= self.cwnd {
                self.acked_ca -= self.cwnd;
                self.cwnd = self.cwnd.saturating_add(self.mss);
            }
        }
        AckAction::None
    }

    /// A duplicate ACK (RFC 5681 §2 definition, checked by the caller).
    /// `snd_nxt` and `flight` are the sender's current values.
    pub fn on_dup_ack(&mut self, snd_nxt: SeqNum, flight: u32) -> AckAction {
        if self.recover.is_some() {
            //= https://www.rfc-editor.org/rfc/rfc5681#section-3.2
            //# 4. For each additional duplicate ACK received (after the
            //# third), cwnd MUST be incremented by SMSS.
            self.cwnd = self.cwnd.saturating_add(self.mss);
            return AckAction::None;
        }
        self.dup_acks += 1;
        if self.dup_acks < self.dupthresh {
            return AckAction::None;
        }
        //# 2. When the third duplicate ACK is received, a TCP MUST set
        //# ssthresh to no more than ... ssthresh = max (FlightSize / 2, 2*SMSS)
        self.enter_recovery(snd_nxt, flight);
        //# 3. ... cwnd = ssthresh + 3*SMSS.
        self.cwnd = self.ssthresh + 3 * self.mss;
        AckAction::Retransmit
    }

    /// Duplicate ACKs came in below the threshold and the hole they show
    /// outlasted the reordering window: it is lost (RFC 8985 §6.2),
    /// fast recovery as at the threshold.
    pub fn on_reorder_timeout(&mut self, snd_nxt: SeqNum, flight: u32) -> AckAction {
        if self.recover.is_some() || self.dup_acks == 0 {
            return AckAction::None;
        }
        let dup = self.dup_acks.min(3);
        self.enter_recovery(snd_nxt, flight);
        self.cwnd = self.ssthresh + dup * self.mss;
        AckAction::Retransmit
    }

    /// A tail loss probe found the connection stalled with data out: the
    /// congestion response of fast recovery (RFC 8985 §7.4), without the
    /// inflation for duplicate ACKs that did not come.
    pub fn on_tail_loss(&mut self, snd_nxt: SeqNum, flight: u32) -> AckAction {
        if self.recover.is_some() {
            return AckAction::None;
        }
        self.enter_recovery(snd_nxt, flight);
        self.cwnd = self.ssthresh;
        AckAction::Retransmit
    }

    fn enter_recovery(&mut self, snd_nxt: SeqNum, flight: u32) {
        self.undo = Some((self.cwnd, self.ssthresh));
        self.ssthresh = (flight / 2).max(2 * self.mss);
        self.recover = Some(snd_nxt);
        self.dup_acks = 0;
    }

    /// The retransmission timer expired.
    pub fn on_rto(&mut self, flight: u32) {
        //= https://www.rfc-editor.org/rfc/rfc5681#section-3.1
        //# ssthresh = max (FlightSize / 2, 2*SMSS)  (4)
        //# ... upon a timeout, cwnd MUST be set to no more than the loss
        //# window, LW, which equals 1 full-sized segment
        self.ssthresh = (flight / 2).max(2 * self.mss);
        self.cwnd = self.mss;
        self.dup_acks = 0;
        self.recover = None;
        self.acked_ca = 0;
        // Go-back-N after a timeout resends the whole flight: never undone.
        self.undo = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSS: u32 = 1000;

    #[test]
    fn the_first_two_duplicate_acks_allow_a_segment_each() {
        let mut c = NewReno::new(MSS);
        assert_eq!(c.limited_transmit(), 0);
        c.on_dup_ack(SeqNum(5000), 4 * MSS);
        assert_eq!(c.limited_transmit(), MSS);
        c.on_dup_ack(SeqNum(5000), 4 * MSS);
        assert_eq!(c.limited_transmit(), 2 * MSS);
        // The third starts fast recovery, which has its own inflation.
        assert_eq!(c.on_dup_ack(SeqNum(5000), 4 * MSS), AckAction::Retransmit);
        assert_eq!(c.limited_transmit(), 0);
        c.on_ack(4 * MSS, SeqNum(5000), 4 * MSS);
        assert_eq!(c.limited_transmit(), 0);
    }

    #[test]
    fn slow_start_then_congestion_avoidance() {
        let mut c = NewReno::new(MSS);
        assert_eq!(c.cwnd(), 4 * MSS);
        c.on_ack(MSS, SeqNum(1000), 4 * MSS);
        assert_eq!(c.cwnd(), 5 * MSS);
        c.on_rto(10 * MSS);
        assert_eq!((c.cwnd(), c.ssthresh()), (MSS, 5 * MSS));
        for _ in 0..4 {
            c.on_ack(MSS, SeqNum(0), MSS);
        }
        assert_eq!(c.cwnd(), 5 * MSS);
        // Now in avoidance: one MSS per cwnd of acknowledged bytes.
        for _ in 0..5 {
            c.on_ack(MSS, SeqNum(0), 5 * MSS);
        }
        assert_eq!(c.cwnd(), 6 * MSS);
    }

    #[test]
    fn three_dup_acks_start_recovery_and_partial_acks_retransmit() {
        let mut c = NewReno::new(MSS).with_cwnd(10 * MSS);
        let nxt = SeqNum(10_000);
        assert_eq!(c.on_dup_ack(nxt, 10 * MSS), AckAction::None);
        assert_eq!(c.on_dup_ack(nxt, 10 * MSS), AckAction::None);
        assert_eq!(c.on_dup_ack(nxt, 10 * MSS), AckAction::Retransmit);
        assert!(c.in_recovery());
        assert_eq!((c.ssthresh(), c.cwnd()), (5 * MSS, 8 * MSS));
        c.on_dup_ack(nxt, 10 * MSS);
        assert_eq!(c.cwnd(), 9 * MSS);
        // Partial ACK: retransmit, stay in recovery.
        assert_eq!(
            c.on_ack(2 * MSS, SeqNum(2000), 10 * MSS),
            AckAction::Retransmit
        );
        assert!(c.in_recovery());
        // Full ACK: leave recovery with cwnd <= ssthresh.
        assert_eq!(c.on_ack(8 * MSS, nxt, 8 * MSS), AckAction::None);
        assert!(!c.in_recovery());
        assert_eq!(c.cwnd(), 5 * MSS);
    }

    /// A stretch ACK (a receiver behind GRO) grows the window in slow
    /// start by every byte it acknowledges, up to ssthresh; the rest
    /// counts toward congestion avoidance.
    #[test]
    fn slow_start_counts_the_bytes_a_stretch_ack_acknowledges() {
        let mut c = NewReno::new(MSS);
        c.on_ack(8 * MSS, SeqNum(8000), 8 * MSS);
        assert_eq!(c.cwnd(), 12 * MSS);
        // Past ssthresh: slow start stops there, and the rest of the ACK
        // is counted in avoidance (a window's worth adds one segment).
        c.on_rto(20 * MSS);
        assert_eq!((c.cwnd(), c.ssthresh()), (MSS, 10 * MSS));
        c.on_ack(9 * MSS, SeqNum(0), MSS);
        assert_eq!(c.cwnd(), 10 * MSS);
        c.on_ack(10 * MSS, SeqNum(0), 10 * MSS);
        assert_eq!(c.cwnd(), 11 * MSS);
        // A huge stretch ACK in avoidance adds a segment per window.
        c.on_ack(11 * MSS + 12 * MSS, SeqNum(0), 30 * MSS);
        assert_eq!(c.cwnd(), 13 * MSS);
    }

    /// A fast retransmit that proves spurious is taken back whole, and
    /// the next needs as many duplicate ACKs as the reordering seen.
    #[test]
    fn a_spurious_reduction_is_undone_and_the_threshold_rises() {
        let mut c = NewReno::new(MSS).with_cwnd(20 * MSS);
        let nxt = SeqNum(20_000);
        for _ in 0..3 {
            c.on_dup_ack(nxt, 20 * MSS);
        }
        assert!(c.in_recovery());
        assert_eq!(c.ssthresh(), 10 * MSS);
        c.reordered(6);
        assert!(c.undo());
        assert!(!c.in_recovery());
        assert_eq!(
            (c.cwnd(), c.ssthresh(), c.dupthresh()),
            (20 * MSS, u32::MAX, 7)
        );
        // Only once per reduction; the threshold never falls.
        assert!(!c.undo());
        c.reordered(2);
        assert_eq!(c.dupthresh(), 7);
        // Six duplicate ACKs now are reordering: limited transmit, no
        // retransmission; the seventh is loss.
        for i in 1..7 {
            assert_eq!(c.on_dup_ack(nxt, 20 * MSS), AckAction::None);
            assert_eq!(c.limited_transmit(), i * MSS);
        }
        assert_eq!(c.on_dup_ack(nxt, 20 * MSS), AckAction::Retransmit);
        // Below the threshold, a hole that outlasts the reordering window
        // is loss all the same (RACK), once.
        assert!(c.undo());
        c.on_ack(MSS, SeqNum(21_000), 20 * MSS);
        assert_eq!(c.on_reorder_timeout(nxt, 20 * MSS), AckAction::None);
        c.on_dup_ack(nxt, 20 * MSS);
        c.on_dup_ack(nxt, 20 * MSS);
        assert_eq!(c.on_reorder_timeout(nxt, 20 * MSS), AckAction::Retransmit);
        assert!(c.in_recovery());
        assert_eq!(c.cwnd(), c.ssthresh() + 2 * MSS);
        assert_eq!(c.on_reorder_timeout(nxt, 20 * MSS), AckAction::None);
        // After a timeout there is nothing to undo; the bound holds.
        c.on_rto(20 * MSS);
        assert!(!c.undo());
        c.reordered(1000);
        assert_eq!((c.cwnd(), c.dupthresh()), (MSS, MAX_REORDERING));
    }
}
