//! Congestion control: the window a sender may have in flight.
//!
//! Two algorithms share one loss-recovery machine: slow start with
//! RFC 3465 byte counting, fast retransmit and fast recovery as modified
//! by RFC 6582, the undo of a reduction that proved spurious (RFC 3708,
//! from DSACKs) and a duplicate-ACK threshold that rises with the
//! reordering seen, as Linux's `tp->reordering`. They differ in how the
//! window grows in congestion avoidance and how far a loss cuts it:
//! - [`Algorithm::Cubic`] (RFC 9438, the default, as in Linux): growth
//!   by a cubic function of the time since the last reduction, never
//!   slower than Reno would grow, and a cut to 0.7 of the flight;
//! - [`Algorithm::NewReno`] (RFC 5681): one segment per window, a cut
//!   to half.

use std::time::{Duration, Instant};

use crate::wire::seq::SeqNum;

/// Which window growth and reduction a sender uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Algorithm {
    /// RFC 5681 congestion avoidance, halving on loss.
    NewReno,
    /// RFC 9438.
    #[default]
    Cubic,
}

impl Algorithm {
    pub const NAMES: [&'static str; 2] = ["cubic", "newreno"];

    pub fn name(self) -> &'static str {
        match self {
            Algorithm::NewReno => "newreno",
            Algorithm::Cubic => "cubic",
        }
    }
}

impl std::str::FromStr for Algorithm {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "cubic" => Ok(Algorithm::Cubic),
            "newreno" | "reno" => Ok(Algorithm::NewReno),
            _ => Err(format!(
                "unknown congestion control {s:?} (expected one of: {})",
                Algorithm::NAMES.join(", ")
            )),
        }
    }
}

/// CUBIC's scaling constant C, in segments per second cubed: the value
/// RFC 9438 §5 sets it to, and Linux uses.
const CUBIC_C: f64 = 0.4;
//= https://www.rfc-editor.org/rfc/rfc9438#section-4.6
//# The parameter β_cubic SHOULD be set to 0.7
const CUBIC_BETA: f64 = 0.7;
/// α_cubic = 3 × (1 − β_cubic) / (1 + β_cubic): the Reno-friendly
/// estimate grows this many segments per window, so that with β_cubic it
/// takes the same share of a link as Reno (RFC 9438 §4.3).
const CUBIC_ALPHA: f64 = 3.0 * (1.0 - CUBIC_BETA) / (1.0 + CUBIC_BETA);

/// CUBIC's state between reductions, in bytes and seconds (RFC 9438
/// §4.1.2). Saved whole with a reduction so that an undo restores it.
#[derive(Clone, Copy, Debug, Default)]
struct Cubic {
    /// W_max: the window just before the last reduction, lowered by fast
    /// convergence (§4.7).
    w_max: f64,
    /// cwnd_prior: the window when ssthresh was last set.
    cwnd_prior: f64,
    /// t_epoch: when the current congestion avoidance stage began; `None`
    /// until the first ACK of one (after slow start, a reduction, or a
    /// stretch the sender did not fill its window).
    epoch: Option<Instant>,
    /// K: seconds from `epoch` until W_cubic reaches W_max again.
    k: f64,
    /// W_est: the window Reno would have now (§4.3).
    w_est: f64,
    /// Growth owed below a whole byte.
    frac: f64,
    /// The reduction was a timeout: the next stage starts with K = 0 and
    /// W_max at its start (§4.8).
    after_timeout: bool,
}

/// What a reduction changed, restored if every retransmission it caused
/// proves spurious.
#[derive(Clone, Copy, Debug)]
struct Undo {
    cwnd: u32,
    ssthresh: u32,
    cubic: Cubic,
}

/// What the sender must do after an ACK.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckAction {
    /// Nothing special: send what the window allows.
    None,
    /// Retransmit the first unacknowledged segment now (fast retransmit,
    /// or a partial ACK during recovery).
    Retransmit,
}

/// The congestion state of one sender.
#[derive(Clone, Debug)]
pub struct Congestion {
    algorithm: Algorithm,
    mss: u32,
    cwnd: u32,
    ssthresh: u32,
    dup_acks: u32,
    /// RFC 6582 "recover": SND.NXT when fast recovery began.
    recover: Option<SeqNum>,
    /// NewReno: bytes acknowledged in congestion avoidance, toward the
    /// next MSS.
    acked_ca: u32,
    cubic: Cubic,
    /// The sender last stopped because cwnd was full (not the peer's
    /// window, not a lack of data): only then does avoidance grow it.
    cwnd_limited: bool,
    /// Duplicate ACKs that start fast retransmit: RFC 5681's three, raised
    /// when a fast retransmit proves spurious (the segment was reordered,
    /// not lost) to the reordering measured, at most [`MAX_REORDERING`].
    dupthresh: u32,
    /// The state before the last reduction, restored if every
    /// retransmission it caused proves spurious.
    undo: Option<Undo>,
}

/// The most the duplicate-ACK threshold rises to (Linux's
/// `tcp_max_reordering`).
pub const MAX_REORDERING: u32 = 300;

impl Congestion {
    pub fn new(mss: u32, algorithm: Algorithm) -> Congestion {
        let mss = mss.max(1);
        Congestion {
            algorithm,
            mss,
            //= https://www.rfc-editor.org/rfc/rfc5681#section-3.1
            //# IW = min (4*SMSS, max (2*SMSS, 4380 bytes))
            cwnd: (4 * mss).min((2 * mss).max(4380)),
            //# The initial value of ssthresh SHOULD be set arbitrarily high
            ssthresh: u32::MAX,
            dup_acks: 0,
            recover: None,
            acked_ca: 0,
            cubic: Cubic::default(),
            cwnd_limited: true,
            dupthresh: 3,
            undo: None,
        }
    }

    /// Starts from the given window rather than the initial one, in
    /// congestion avoidance (tests).
    #[cfg(test)]
    pub fn with_cwnd(mut self, cwnd: u32) -> Congestion {
        self.cwnd = cwnd.max(2 * self.mss);
        self
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
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
    /// they were; RFC 9438 §4.9: CUBIC's state too) and recovery ends.
    /// Returns whether there was a reduction to take back.
    pub fn undo(&mut self) -> bool {
        let Some(undo) = self.undo.take() else {
            return false;
        };
        // In recovery the window is the one from before it: nothing there
        // grows it but the duplicate ACKs' inflation, which must not
        // outlive the episode. After it, the window grew by ACKs and may
        // be the larger.
        self.cwnd = if self.recover.is_some() {
            undo.cwnd
        } else {
            self.cwnd.max(undo.cwnd)
        };
        self.ssthresh = self.ssthresh.max(undo.ssthresh);
        self.cubic = undo.cubic;
        self.recover = None;
        self.dup_acks = 0;
        true
    }

    pub fn in_recovery(&self) -> bool {
        self.recover.is_some()
    }

    /// The sender stopped sending: `limited` if what stopped it was this
    /// window (rather than the peer's window or the data to send).
    pub fn set_cwnd_limited(&mut self, limited: bool) {
        self.cwnd_limited = limited;
    }

    /// An ACK that advanced SND.UNA by `acked` bytes to `una` at `now`;
    /// `flight` is the data outstanding before it, `rtt` the smoothed
    /// round trip (zero before any sample).
    pub fn on_ack(
        &mut self,
        acked: u32,
        una: SeqNum,
        flight: u32,
        now: Instant,
        rtt: Duration,
    ) -> AckAction {
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
        // A window the sender did not use is not grown (RFC 7661): in slow
        // start, unless at least half of it was in flight (Linux's
        // `tcp_is_cwnd_limited`); in avoidance, unless the sender was
        // stopped by it. Otherwise an application-limited flow's window
        // would grow without bound, and a later loss would "restore" it.
        let half_used = flight.saturating_mul(2) > self.cwnd;
        if !(self.cwnd_limited || (half_used && self.cwnd < self.ssthresh)) {
            if self.algorithm == Algorithm::Cubic {
                self.cubic.epoch = None;
            }
            return AckAction::None;
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
            match self.algorithm {
                Algorithm::NewReno => self.reno_avoid(acked),
                Algorithm::Cubic => self.cubic_avoid(acked, now, rtt),
            }
        }
        AckAction::None
    }

    fn reno_avoid(&mut self, acked: u32) {
        //= https://www.rfc-editor.org/rfc/rfc5681#section-3.1
        //# cwnd += SMSS*SMSS/cwnd ... (byte counting variant)
        self.acked_ca += acked;
        while self.acked_ca >= self.cwnd {
            self.acked_ca -= self.cwnd;
            self.cwnd = self.cwnd.saturating_add(self.mss);
        }
    }

    /// RFC 9438 §4.2-4.5: congestion avoidance by the cubic function,
    /// or by the Reno-friendly estimate where that is larger.
    fn cubic_avoid(&mut self, acked: u32, now: Instant, rtt: Duration) {
        let mss = f64::from(self.mss);
        let cwnd = f64::from(self.cwnd);
        let c = &mut self.cubic;
        // A sender that did not fill its window (the relay had nothing to
        // send, or the peer's window was smaller) learns nothing about
        // the path: no growth, and the epoch starts again when it fills
        // the window, so the idle time is not counted as probing time
        // (as FreeBSD does; Linux shifts the epoch by the idle time).
        if !self.cwnd_limited {
            c.epoch = None;
            return;
        }
        let epoch = match c.epoch {
            Some(epoch) => epoch,
            None => {
                // A new stage. Below W_max the curve climbs back to it
                // in K seconds; at or above it (no reduction yet, a
                // reduction undone, or after a timeout) it starts flat
                // at the current window (K = 0, W_max = cwnd).
                if c.after_timeout || c.w_max <= cwnd {
                    c.w_max = cwnd;
                    c.k = 0.0;
                } else {
                    //= https://www.rfc-editor.org/rfc/rfc9438#section-4.2
                    //# K = cubic_root((W_max - cwnd_epoch) / C)
                    c.k = ((c.w_max - cwnd) / mss / CUBIC_C).cbrt();
                }
                c.after_timeout = false;
                c.w_est = cwnd;
                c.frac = 0.0;
                c.epoch = Some(now);
                now
            }
        };
        //= https://www.rfc-editor.org/rfc/rfc9438#section-4.2
        //# W_cubic(t) = C * (t - K)^3 + W_max
        let w_cubic = |t: f64| CUBIC_C * (t - c.k).powi(3) * mss + c.w_max;
        let t = now.saturating_duration_since(epoch).as_secs_f64();
        // §4.3: once the estimate reaches the window before the last
        // reduction, it grows as Reno's does (α = 1).
        let alpha = if c.w_est >= c.cwnd_prior {
            1.0
        } else {
            CUBIC_ALPHA
        };
        //= https://www.rfc-editor.org/rfc/rfc9438#section-4.3
        //# W_est = W_est + α_cubic * segments_acked / cwnd
        c.w_est += alpha * f64::from(acked) * mss / cwnd;
        let next = if w_cubic(t) < c.w_est {
            // Reno-friendly region: the window Reno would have.
            c.w_est
        } else {
            // Concave and convex regions (§4.4, §4.5): toward where the
            // curve will be a round trip from now, at most 1.5 windows,
            // by (target - cwnd) / cwnd of each segment acknowledged.
            let target = w_cubic(t + rtt.as_secs_f64()).clamp(cwnd, 1.5 * cwnd);
            cwnd + (target - cwnd) * f64::from(acked) / cwnd
        };
        let grow = (next - cwnd).max(0.0) + c.frac;
        let whole = grow.floor();
        c.frac = grow - whole;
        self.cwnd = self
            .cwnd
            .saturating_add(whole.min(f64::from(u32::MAX)) as u32);
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
        self.enter_recovery(snd_nxt, flight);
        //= https://www.rfc-editor.org/rfc/rfc5681#section-3.2
        //# 3. ... cwnd = ssthresh + 3*SMSS.
        self.cwnd = self.ssthresh + 3 * self.mss;
        AckAction::Retransmit
    }

    /// A duplicate ACK when RACK, not their count, decides loss (RFC 8985
    /// §6): outside recovery it lets limited transmit send a segment; it
    /// never starts a recovery. In recovery it changes nothing: RACK runs
    /// with SACK, whose recovery sends by the pipe against ssthresh
    /// (RFC 6675 §5, no inflation), and an inflated window would outlive
    /// an undo (which keeps the larger of the two).
    pub fn count_dup_ack(&mut self) {
        if self.recover.is_none() {
            self.dup_acks = self.dup_acks.saturating_add(1);
        }
    }

    /// A loss found otherwise than by duplicate ACKs: a tail loss probe
    /// found the connection stalled with data out (RFC 8985 §7.4), or the
    /// SACK scoreboard shows the first unacknowledged segment lost before
    /// enough duplicate ACKs came (RFC 6675 §5: IsLost(HighACK + 1)).
    /// The congestion response of fast recovery, without the inflation
    /// for duplicate ACKs.
    pub fn on_loss(&mut self, snd_nxt: SeqNum, flight: u32) -> AckAction {
        if self.recover.is_some() {
            return AckAction::None;
        }
        self.enter_recovery(snd_nxt, flight);
        self.cwnd = self.ssthresh;
        AckAction::Retransmit
    }

    fn enter_recovery(&mut self, snd_nxt: SeqNum, flight: u32) {
        self.undo = Some(Undo {
            cwnd: self.cwnd,
            ssthresh: self.ssthresh,
            cubic: self.cubic,
        });
        self.ssthresh = self.reduced(flight);
        self.recover = Some(snd_nxt);
        self.dup_acks = 0;
    }

    /// The new ssthresh after a loss with `flight` outstanding, recording
    /// the loss in CUBIC's state.
    fn reduced(&mut self, flight: u32) -> u32 {
        let floor = 2 * self.mss;
        match self.algorithm {
            //= https://www.rfc-editor.org/rfc/rfc5681#section-3.1
            //# ssthresh = max (FlightSize / 2, 2*SMSS)            (4)
            Algorithm::NewReno => (flight / 2).max(floor),
            Algorithm::Cubic => {
                let cwnd = f64::from(self.cwnd);
                let c = &mut self.cubic;
                // §4.7 fast convergence: a loss below the last W_max
                // means the share of the path shrank; give up more.
                c.w_max = if cwnd < c.w_max {
                    cwnd * (1.0 + CUBIC_BETA) / 2.0
                } else {
                    cwnd
                };
                c.cwnd_prior = cwnd;
                c.epoch = None;
                // §4.6: the flight, not cwnd (which may not have been
                // filled), times β_cubic.
                ((f64::from(flight) * CUBIC_BETA) as u32).max(floor)
            }
        }
    }

    /// The retransmission timer expired.
    pub fn on_rto(&mut self, flight: u32) {
        //= https://www.rfc-editor.org/rfc/rfc5681#section-3.1
        //# ... upon a timeout, cwnd MUST be set to no more than the loss
        //# window, LW, which equals 1 full-sized segment
        // ssthresh as after any loss: half the flight for NewReno,
        // β_cubic of it for CUBIC (RFC 9438 §4.8).
        self.ssthresh = self.reduced(flight);
        self.cubic.after_timeout = true;
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

    /// An ACK at one fixed instant (NewReno does not look at the clock).
    fn ack(c: &mut Congestion, acked: u32, una: SeqNum, flight: u32) -> AckAction {
        c.on_ack(acked, una, flight, Instant::now(), Duration::ZERO)
    }

    #[test]
    fn the_first_two_duplicate_acks_allow_a_segment_each() {
        let mut c = Congestion::new(MSS, Algorithm::NewReno);
        assert_eq!(c.limited_transmit(), 0);
        c.on_dup_ack(SeqNum(5000), 4 * MSS);
        assert_eq!(c.limited_transmit(), MSS);
        c.on_dup_ack(SeqNum(5000), 4 * MSS);
        assert_eq!(c.limited_transmit(), 2 * MSS);
        // The third starts fast recovery, which has its own inflation.
        assert_eq!(c.on_dup_ack(SeqNum(5000), 4 * MSS), AckAction::Retransmit);
        assert_eq!(c.limited_transmit(), 0);
        ack(&mut c, 4 * MSS, SeqNum(5000), 4 * MSS);
        assert_eq!(c.limited_transmit(), 0);
    }

    #[test]
    fn slow_start_then_congestion_avoidance() {
        let mut c = Congestion::new(MSS, Algorithm::NewReno);
        assert_eq!(c.cwnd(), 4 * MSS);
        ack(&mut c, MSS, SeqNum(1000), 4 * MSS);
        assert_eq!(c.cwnd(), 5 * MSS);
        c.on_rto(10 * MSS);
        assert_eq!((c.cwnd(), c.ssthresh()), (MSS, 5 * MSS));
        for _ in 0..4 {
            ack(&mut c, MSS, SeqNum(0), MSS);
        }
        assert_eq!(c.cwnd(), 5 * MSS);
        // Now in avoidance: one MSS per cwnd of acknowledged bytes.
        for _ in 0..5 {
            ack(&mut c, MSS, SeqNum(0), 5 * MSS);
        }
        assert_eq!(c.cwnd(), 6 * MSS);
    }

    #[test]
    fn three_dup_acks_start_recovery_and_partial_acks_retransmit() {
        let mut c = Congestion::new(MSS, Algorithm::NewReno).with_cwnd(10 * MSS);
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
            ack(&mut c, 2 * MSS, SeqNum(2000), 10 * MSS),
            AckAction::Retransmit
        );
        assert!(c.in_recovery());
        // Full ACK: leave recovery with cwnd <= ssthresh.
        assert_eq!(ack(&mut c, 8 * MSS, nxt, 8 * MSS), AckAction::None);
        assert!(!c.in_recovery());
        assert_eq!(c.cwnd(), 5 * MSS);
    }

    /// A stretch ACK (a receiver behind GRO) grows the window in slow
    /// start by every byte it acknowledges, up to ssthresh; the rest
    /// counts toward congestion avoidance.
    #[test]
    fn slow_start_counts_the_bytes_a_stretch_ack_acknowledges() {
        let mut c = Congestion::new(MSS, Algorithm::NewReno);
        ack(&mut c, 8 * MSS, SeqNum(8000), 8 * MSS);
        assert_eq!(c.cwnd(), 12 * MSS);
        // Past ssthresh: slow start stops there, and the rest of the ACK
        // is counted in avoidance (a window's worth adds one segment).
        c.on_rto(20 * MSS);
        assert_eq!((c.cwnd(), c.ssthresh()), (MSS, 10 * MSS));
        ack(&mut c, 9 * MSS, SeqNum(0), MSS);
        assert_eq!(c.cwnd(), 10 * MSS);
        ack(&mut c, 10 * MSS, SeqNum(0), 10 * MSS);
        assert_eq!(c.cwnd(), 11 * MSS);
        // A huge stretch ACK in avoidance adds a segment per window.
        ack(&mut c, 11 * MSS + 12 * MSS, SeqNum(0), 30 * MSS);
        assert_eq!(c.cwnd(), 13 * MSS);
    }

    /// A fast retransmit that proves spurious is taken back whole, and
    /// the next needs as many duplicate ACKs as the reordering seen.
    #[test]
    fn a_spurious_reduction_is_undone_and_the_threshold_rises() {
        let mut c = Congestion::new(MSS, Algorithm::NewReno).with_cwnd(20 * MSS);
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
        // Counted for RACK, duplicate ACKs allow limited transmit and
        // never start a recovery however many come.
        assert!(c.undo());
        ack(&mut c, MSS, SeqNum(21_000), 20 * MSS);
        for _ in 0..20 {
            c.count_dup_ack();
        }
        assert!(!c.in_recovery());
        assert_eq!(c.limited_transmit(), 6 * MSS);
        // Nor do they grow the window in a recovery: an undo gives back
        // the window from before it, not one inflated by them.
        let before = c.cwnd();
        assert_eq!(c.on_loss(nxt, 20 * MSS), AckAction::Retransmit);
        for _ in 0..100 {
            c.count_dup_ack();
        }
        assert!(c.undo());
        assert_eq!(c.cwnd(), before);
        // Nor does the inflation of a recovery that duplicate ACKs
        // started and drive (a peer that sends no SACK blocks).
        let before = c.cwnd();
        while c.on_dup_ack(nxt, 20 * MSS) != AckAction::Retransmit {}
        for _ in 0..100 {
            c.on_dup_ack(nxt, 20 * MSS);
        }
        assert!(c.cwnd() > before, "inflated in recovery");
        assert!(c.undo());
        assert_eq!(c.cwnd(), before);
        // After a timeout there is nothing to undo; the bound holds.
        c.on_rto(20 * MSS);
        assert!(!c.undo());
        c.reordered(1000);
        assert_eq!((c.cwnd(), c.dupthresh()), (MSS, MAX_REORDERING));
    }

    /// One round trip of a CUBIC sender that keeps its window full: a
    /// window's worth acknowledged a segment at a time, `rtt` after the
    /// last round.
    fn round(c: &mut Congestion, now: &mut Instant, rtt: Duration) {
        *now += rtt;
        for _ in 0..c.cwnd() / MSS {
            c.on_ack(MSS, SeqNum(0), c.cwnd(), *now, rtt);
        }
    }

    /// A CUBIC sender at `segments` segments that has just lost one:
    /// three duplicate ACKs, then the full ACK that ends recovery.
    fn cubic_after_loss(segments: u32) -> Congestion {
        let mut c = Congestion::new(MSS, Algorithm::Cubic).with_cwnd(segments * MSS);
        let nxt = SeqNum(segments * MSS);
        for _ in 0..3 {
            c.on_dup_ack(nxt, segments * MSS);
        }
        assert!(c.in_recovery());
        c.on_ack(
            segments * MSS,
            nxt,
            segments * MSS,
            Instant::now(),
            Duration::ZERO,
        );
        assert!(!c.in_recovery());
        c
    }

    /// RFC 9438 §4.6 and §4.2: a loss cuts to 0.7 of the flight, and on a
    /// long path the window climbs back to where it was in K seconds,
    /// fast at first and flattening near W_max (concave), then probes
    /// beyond it faster and faster (convex).
    #[test]
    fn cubic_cuts_to_seven_tenths_and_regains_the_lost_window_in_k_seconds() {
        let mut c = cubic_after_loss(100);
        assert_eq!((c.ssthresh(), c.cwnd()), (70 * MSS, 70 * MSS));
        // K = cbrt((100 - 70) / 0.4) = 4.22 s; at 100 ms per round trip,
        // 42 rounds.
        let (rtt, mut now) = (Duration::from_millis(100), Instant::now());
        let mut grown = Vec::new();
        for _ in 0..42 {
            let before = c.cwnd();
            round(&mut c, &mut now, rtt);
            grown.push(c.cwnd() - before);
        }
        let cwnd = c.cwnd() / MSS;
        assert!((97..=103).contains(&cwnd), "after K: {cwnd} segments");
        // Concave: the first rounds grow most, the ones near W_max least.
        // (The very first starts the epoch: t = 0, where the curve is at
        // the window and the Reno-friendly estimate leads.)
        assert!(grown[0] < MSS && grown[1] >= 2 * MSS, "{grown:?}");
        assert!(grown[38..].iter().all(|&g| g <= MSS), "{grown:?}");
        // Convex: past W_max the growth speeds up again, at 3C(t - K)²
        // segments a second: 3 segments a round 5 s on.
        for _ in 0..50 {
            round(&mut c, &mut now, rtt);
        }
        let before = c.cwnd();
        round(&mut c, &mut now, rtt);
        assert!(c.cwnd() - before >= 2 * MSS, "{}", c.cwnd() - before);
        // Never more than 1.5 windows in one round trip.
        let before = c.cwnd();
        round(&mut c, &mut now, Duration::from_secs(30));
        assert!(
            c.cwnd() <= before + before / 2 + MSS,
            "{} -> {}",
            before,
            c.cwnd()
        );
    }

    /// RFC 9438 §4.3: at a short round trip the cubic curve barely moves,
    /// and the window grows as the Reno-friendly estimate: α_cubic (0.53)
    /// segments per round trip until it reaches the window before the
    /// loss, then one.
    #[test]
    fn cubic_at_a_short_round_trip_grows_as_fast_as_reno_would() {
        let mut c = cubic_after_loss(100);
        let (rtt, mut now) = (Duration::from_millis(1), Instant::now());
        for _ in 0..40 {
            round(&mut c, &mut now, rtt);
        }
        // 70 + 40 × 0.53 = 91.2 segments.
        let cwnd = c.cwnd() / MSS;
        assert!((90..=92).contains(&cwnd), "{cwnd} segments");
        for _ in 0..40 {
            round(&mut c, &mut now, rtt);
        }
        // 100 after 57 rounds at 0.53, then 1 per round: 123.
        let cwnd = c.cwnd() / MSS;
        assert!((121..=124).contains(&cwnd), "{cwnd} segments");
    }

    /// RFC 9438 §4.7: a second loss below the last W_max lowers W_max
    /// further, to (1 + β) / 2 of the window, so a flow losing its share
    /// releases it sooner.
    #[test]
    fn cubic_fast_convergence_lowers_w_max_after_a_loss_below_it() {
        let mut c = cubic_after_loss(100);
        assert_eq!(c.cubic.w_max, f64::from(100 * MSS));
        let (rtt, mut now) = (Duration::from_millis(100), Instant::now());
        round(&mut c, &mut now, rtt);
        let cwnd = c.cwnd();
        assert!(cwnd < 100 * MSS);
        let nxt = SeqNum(1 << 20);
        for _ in 0..3 {
            c.on_dup_ack(nxt, cwnd);
        }
        assert_eq!(c.cubic.w_max, f64::from(cwnd) * 0.85);
        assert_eq!(c.ssthresh(), (f64::from(cwnd) * 0.7) as u32);
    }

    /// A sender that does not fill its window does not grow it, and its
    /// idle time does not count as time on the curve.
    #[test]
    fn cubic_does_not_grow_a_window_the_sender_did_not_fill() {
        let mut c = cubic_after_loss(100);
        let (rtt, mut now) = (Duration::from_millis(100), Instant::now());
        let cwnd = c.cwnd();
        c.set_cwnd_limited(false);
        for _ in 0..100 {
            now += rtt;
            c.on_ack(MSS, SeqNum(0), cwnd / 2, now, rtt);
        }
        assert_eq!(c.cwnd(), cwnd);
        c.set_cwnd_limited(true);
        // Ten seconds later the window fills again: the climb starts at
        // the beginning of the curve, not ten seconds into it (which
        // would be a jump of 1.5 windows).
        round(&mut c, &mut now, rtt);
        assert!(c.cwnd() < cwnd + 5 * MSS, "{} -> {}", cwnd, c.cwnd());
    }

    /// RFC 9438 §4.8: after a timeout, slow start up to β_cubic of the
    /// flight, then a stage that starts flat at its own window (K = 0).
    /// §4.9: an undone reduction restores CUBIC's state with the window.
    #[test]
    fn cubic_after_a_timeout_and_an_undo() {
        let mut c = Congestion::new(MSS, Algorithm::Cubic).with_cwnd(100 * MSS);
        c.on_rto(100 * MSS);
        assert_eq!((c.cwnd(), c.ssthresh()), (MSS, 70 * MSS));
        let (rtt, mut now) = (Duration::from_millis(100), Instant::now());
        while c.cwnd() < c.ssthresh() {
            round(&mut c, &mut now, rtt);
        }
        round(&mut c, &mut now, rtt);
        assert_eq!(c.cubic.k, 0.0);
        assert!(c.cubic.w_max >= f64::from(70 * MSS) && c.cubic.w_max < f64::from(71 * MSS));
        // A reduction, then every retransmission proves spurious.
        let (cwnd, w_max, epoch) = (c.cwnd(), c.cubic.w_max, c.cubic.epoch);
        for _ in 0..3 {
            c.on_dup_ack(SeqNum(1 << 20), cwnd);
        }
        assert!(c.cubic.epoch.is_none());
        assert!(c.undo());
        assert_eq!(
            (c.cwnd(), c.cubic.w_max, c.cubic.epoch),
            (cwnd, w_max, epoch)
        );
    }

    /// RFC 7661: a window the sender does not use is not grown. In slow
    /// start it grows while at least half of it is in flight; beyond
    /// that, only while the sender is stopped by it.
    #[test]
    fn an_unused_window_does_not_grow() {
        for algorithm in [Algorithm::NewReno, Algorithm::Cubic] {
            let mut c = Congestion::new(MSS, algorithm);
            c.set_cwnd_limited(false);
            let now = Instant::now();
            for _ in 0..100 {
                c.on_ack(MSS, SeqNum(0), MSS, now, Duration::ZERO);
            }
            assert_eq!(c.cwnd(), 4 * MSS, "{algorithm:?}");
            c.on_ack(MSS, SeqNum(0), 3 * MSS, now, Duration::ZERO);
            assert_eq!(c.cwnd(), 5 * MSS, "{algorithm:?}");
            let mut c = Congestion::new(MSS, algorithm).with_cwnd(20 * MSS);
            c.on_rto(40 * MSS);
            c.set_cwnd_limited(true);
            while c.cwnd() < c.ssthresh() {
                c.on_ack(MSS, SeqNum(0), c.cwnd(), now, Duration::ZERO);
            }
            let cwnd = c.cwnd();
            c.set_cwnd_limited(false);
            for i in 0..1000 {
                let later = now + Duration::from_millis(i);
                c.on_ack(MSS, SeqNum(0), cwnd, later, Duration::from_millis(1));
            }
            assert_eq!(c.cwnd(), cwnd, "{algorithm:?}");
        }
    }
}
