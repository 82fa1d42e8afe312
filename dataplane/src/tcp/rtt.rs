//! Retransmission timeout (RFC 6298).

use std::time::Duration;

/// Lower bound of the RTO. RFC 6298 §2.4 says the RTO SHOULD be rounded up
/// to 1 s; like Linux we deliberately use 200 ms: the engine sits between
/// two Linux peers whose own minimum is 200 ms, and a slower floor would
/// make every loss on a split connection stall five times longer than on
/// the direct one.
pub const RTO_MIN: Duration = Duration::from_millis(200);
/// Upper bound (RFC 6298 §2.5: "a maximum value MAY be placed on RTO
/// provided it is at least 60 seconds").
pub const RTO_MAX: Duration = Duration::from_secs(60);
/// Before any measurement (RFC 6298 §2.1).
pub const RTO_INITIAL: Duration = Duration::from_secs(1);

/// SRTT, RTTVAR and the RTO with its backoff.
#[derive(Clone, Debug)]
pub struct RttEstimator {
    srtt: Option<Duration>,
    rttvar: Duration,
    rto: Duration,
    backoff: u32,
}

impl Default for RttEstimator {
    fn default() -> Self {
        RttEstimator {
            srtt: None,
            rttvar: Duration::ZERO,
            rto: RTO_INITIAL,
            backoff: 0,
        }
    }
}

impl RttEstimator {
    /// Takes a round-trip sample R. Callers follow Karn's algorithm
    /// (RFC 6298 §3): no samples from retransmitted segments, unless the
    /// timestamp option identifies the transmission (RFC 7323 §4).
    pub fn sample(&mut self, r: Duration) {
        match self.srtt {
            //= https://www.rfc-editor.org/rfc/rfc6298#section-2.2
            //# When the first RTT measurement R is made, the host MUST set
            //# SRTT <- R, RTTVAR <- R/2, RTO <- SRTT + max (G, K*RTTVAR)
            None => {
                self.srtt = Some(r);
                self.rttvar = r / 2;
            }
            //= https://www.rfc-editor.org/rfc/rfc6298#section-2.3
            //# RTTVAR <- (1 - beta) * RTTVAR + beta * |SRTT - R'|
            //# SRTT <- (1 - alpha) * SRTT + alpha * R'
            Some(srtt) => {
                let diff = srtt.abs_diff(r);
                self.rttvar = self.rttvar * 3 / 4 + diff / 4;
                self.srtt = Some(srtt * 7 / 8 + r / 8);
            }
        }
        let srtt = self.srtt.unwrap_or(r);
        // G (clock granularity) is 1 ms here.
        let k_rttvar = (self.rttvar * 4).max(Duration::from_millis(1));
        self.rto = (srtt + k_rttvar).clamp(RTO_MIN, RTO_MAX);
        //= https://www.rfc-editor.org/rfc/rfc6298#section-5
        //# (5.7) ... after new data is acknowledged ... the RTO is recomputed
        self.backoff = 0;
    }

    /// The current timeout, with backoff applied.
    pub fn rto(&self) -> Duration {
        //= https://www.rfc-editor.org/rfc/rfc6298#section-5
        //# (5.5) The host MUST set RTO <- RTO * 2 ("back off the timer").
        backed_off(self.rto, self.backoff)
    }

    /// The timeout as estimated, without the backoff: what a timer with a
    /// backoff of its own (the persist timer) doubles.
    pub fn base_rto(&self) -> Duration {
        self.rto
    }

    /// Doubles the timeout after it expired.
    pub fn back_off(&mut self) {
        self.backoff = self.backoff.saturating_add(1);
    }

    /// Consecutive expirations without progress.
    pub fn backoffs(&self) -> u32 {
        self.backoff
    }

    /// New data was acknowledged: the backoff ends (the next RTO is the
    /// estimate again, RFC 6298 §5 note after 5.7).
    pub fn progress(&mut self) {
        self.backoff = 0;
    }

    pub fn srtt(&self) -> Option<Duration> {
        self.srtt
    }
}

/// `base` doubled `times` times, at most [`RTO_MAX`].
pub fn backed_off(base: Duration, times: u32) -> Duration {
    base.saturating_mul(1 << times.min(16)).min(RTO_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_sample_sets_srtt_and_half_variance() {
        let mut e = RttEstimator::default();
        assert_eq!(e.rto(), RTO_INITIAL);
        e.sample(Duration::from_millis(100));
        assert_eq!(e.srtt(), Some(Duration::from_millis(100)));
        // 100 + 4 * 50 = 300 ms.
        assert_eq!(e.rto(), Duration::from_millis(300));
    }

    #[test]
    fn later_samples_smooth_with_alpha_and_beta() {
        let mut e = RttEstimator::default();
        e.sample(Duration::from_millis(100));
        e.sample(Duration::from_millis(200));
        // RTTVAR = 3/4*50 + 1/4*100 = 62.5; SRTT = 7/8*100 + 1/8*200 = 112.5.
        assert_eq!(e.srtt(), Some(Duration::from_micros(112_500)));
        assert_eq!(e.rto(), Duration::from_micros(112_500 + 250_000));
    }

    #[test]
    fn backoff_doubles_up_to_the_maximum_and_a_sample_resets_it() {
        let mut e = RttEstimator::default();
        e.sample(Duration::from_millis(10));
        assert_eq!(e.rto(), RTO_MIN);
        e.back_off();
        e.back_off();
        assert_eq!(e.rto(), RTO_MIN * 4);
        for _ in 0..20 {
            e.back_off();
        }
        assert_eq!(e.rto(), RTO_MAX);
        e.sample(Duration::from_millis(10));
        assert_eq!(e.rto(), RTO_MIN);
    }
}
