//! When an idle worker polls its rings and when it sleeps in `poll()`.
//!
//! A worker that sleeps pays a wake-up for the next frame: on a virtual
//! machine's idle CPU, 30-40 µs (the vCPU halted and must be scheduled
//! again). A new connection's SYN, SYN-ACK and ClientHello each find the
//! worker asleep when nothing else keeps it busy. A worker that keeps
//! polling takes them without one, but only where it has its CPU to
//! itself: a polling worker that shares the CPU with another process
//! yields it to that process each round, and a frame arriving then waits
//! out the other's time slice (hundreds of µs) where a sleeping worker
//! would have been woken ahead of it.
//!
//! So after its last work a worker polls for `spin` (yielding between
//! rounds, so that the threads bringing its frames get the CPU) unless it
//! finds it shares the CPU, in either of two ways:
//! - a yield, or the gap between two idle rounds, that lasted
//!   [`LOST_CPU`] or more: another thread had a time slice there;
//! - other threads took a fifth or more of the CPU while it polled, over
//!   [`SHARE_WINDOW`] of polling (counting the yields and gaps of
//!   [`OTHERS_RAN`] or more): endpoints or other work share the CPU in
//!   short bursts, and polling would only fill the gaps between them,
//!   burning CPU for nothing (an outside probe: 42-71% of each CPU at 240
//!   connections/s on 2 shared vCPUs, against 5% sleeping, with no
//!   connection faster).
//!
//! It then goes back to sleeping after [`SPIN_BEFORE_SLEEP`] empty rounds
//! for [`SHARED_BACKOFF`]. The engine's own threads (the flow-map
//! installer, the event pump) take tens of µs per connection, well under
//! both. `busy_poll` (`--busy-poll-us`) polls for that long whether the
//! CPU is shared or not, as before.
//!
//! A busy worker gives way too: after `give_way` of work without a break
//! (no yield, no sleep) it yields once (`--yield-every-us`). Threads that
//! share its core and bring its frames wait otherwise until its time
//! slice ends: a NAPI thread (threaded NAPI, or `ksoftirqd` once softirqs
//! are deferred to it) then leaves the receive ring it empties to
//! overflow. With veth's 256-frame ring drained by such a thread on the
//! worker's core, 11% of the client's frames were dropped and sent again
//! at 8 flows (perf/README.md, "A busy worker gives way"). A yield with
//! nobody waiting returns at once.

use std::time::{Duration, Instant};

/// Empty rounds before the worker sleeps or yields. Few: a worker that
/// spins without yielding keeps its CPU from whatever else must run there
/// for frames to come, such as the NAPI thread that fills its ring. Per
/// core, the split with 64 carried 1.3-2.1 Gbit/s (1 and 8 flows), with 8
/// in another sitting 1.8-2.0; in the shared shape, alternated, 1 flow rose
/// from 0.8-1.2 to 1.6-1.7 (perf/README.md, "How long an idle worker
/// spins").
pub const SPIN_BEFORE_SLEEP: u32 = 8;

/// A yield, or a gap between idle rounds, at least this long: another
/// thread had the CPU for a time slice (the scheduler's base slice is
/// 0.75 ms; the engine's own threads run for tens of µs). Measured on 2
/// vCPUs (2026-12-04, `perf/run decide`, an instrumented build): with the
/// endpoints on the other CPU, 1-2 of 300,000-560,000 yields per engine
/// run took 1 ms or more (20-40 took 0.1-1 ms); with curl and nginx on
/// the worker's CPU, 9-15 of 170,000-300,000 (110-510 took 0.1-1 ms). A
/// threshold of 30 µs stopped the polling so often that the per-core gain
/// was lost.
pub const LOST_CPU: Duration = Duration::from_millis(1);

/// A yield or a gap between idle rounds at least this long: another
/// thread ran (a yield with nobody else to run returns in 1-2 µs).
pub const OTHERS_RAN: Duration = Duration::from_micros(10);

/// Polling time over which the others' share of the CPU is judged.
pub const SHARE_WINDOW: Duration = Duration::from_millis(5);

/// Other threads' share of the polling time, as 1 in this many, from
/// which the CPU counts as shared.
pub const SHARED_ONE_IN: u32 = 5;

/// How long a worker that found its CPU shared sleeps instead of polling.
pub const SHARED_BACKOFF: Duration = Duration::from_millis(50);

/// What the worker does after a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Go round again at once.
    Round,
    /// Yield the CPU, then go round again; report the yield's end with
    /// [`Idle::yielded`].
    Yield,
    /// Sleep until a frame comes; report the wake with [`Idle::woke`].
    Sleep,
    /// Yield the CPU after a long run of work, then go round again;
    /// report the yield's end with [`Idle::gave_way`].
    GiveWay,
}

/// How long a worker polls after its last work.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IdlePolicy {
    /// Polling for this long whether the CPU is shared or not
    /// (`--busy-poll-us`), also after each sleep.
    pub busy_poll: Duration,
    /// Polling for this long after the last work, while the CPU is the
    /// worker's own (`--idle-spin-us`).
    pub spin: Duration,
    /// Yielding once after this long of work without a break
    /// (`--yield-every-us`; zero: never).
    pub give_way: Duration,
}

/// An idle worker's state: how long it has found nothing to do, and
/// whether it shares its CPU.
#[derive(Debug)]
pub struct Idle {
    /// Empty rounds in a row.
    rounds: u32,
    /// The last work, or the last wake from a sleep (for `busy_poll`).
    since: Instant,
    /// The last work (for `spin`).
    worked: Instant,
    /// Slept since the last work: a worker woken by the poll timeout
    /// with nothing to do does not poll again.
    slept: bool,
    /// When the last yield of this idle spell returned.
    last_yield: Option<Instant>,
    /// Polling is off until then: the CPU was found shared.
    shared_until: Option<Instant>,
    /// Polling time in the current share window, and how much of it other
    /// threads ran.
    polled: Duration,
    others: Duration,
    /// Times the worker found its CPU shared and stopped polling.
    pub backoffs: u64,
    /// Since the last yield or sleep ended: how long the worker has held
    /// its CPU.
    running: Instant,
    /// Times the worker gave way after a long run of work.
    pub gave_way: u64,
}

impl Idle {
    pub fn new(now: Instant) -> Idle {
        Idle {
            rounds: 0,
            since: now,
            worked: now,
            slept: false,
            last_yield: None,
            shared_until: None,
            polled: Duration::ZERO,
            others: Duration::ZERO,
            backoffs: 0,
            running: now,
            gave_way: 0,
        }
    }

    /// A round did `work` (0: found nothing) and ended at `now`.
    pub fn after_round(&mut self, work: usize, now: Instant, policy: &IdlePolicy) -> Next {
        if work > 0 {
            self.rounds = 0;
            self.since = now;
            self.worked = now;
            self.slept = false;
            self.last_yield = None;
            if !policy.give_way.is_zero()
                && now.saturating_duration_since(self.running) >= policy.give_way
            {
                return Next::GiveWay;
            }
            return Next::Round;
        }
        self.rounds += 1;
        if self.rounds < SPIN_BEFORE_SLEEP {
            return Next::Round;
        }
        if now.saturating_duration_since(self.since) < policy.busy_poll {
            return Next::Yield;
        }
        let own_cpu = self.shared_until.is_none_or(|until| now >= until);
        if own_cpu && !self.slept && now.saturating_duration_since(self.worked) < policy.spin {
            // The time since the last yield returned: a round between two
            // yields that took long was preempted.
            if let Some(at) = self.last_yield {
                let gap = now.saturating_duration_since(at);
                if gap >= LOST_CPU || self.shared_by_share(gap) {
                    self.back_off(now);
                    return Next::Sleep;
                }
            }
            return Next::Yield;
        }
        Next::Sleep
    }

    /// The yield [`Next::GiveWay`] asked for returned at `now`.
    pub fn gave_way(&mut self, now: Instant) {
        self.running = now;
        self.gave_way += 1;
    }

    /// A yield that began at `began` returned at `now`.
    pub fn yielded(&mut self, began: Instant, now: Instant) {
        self.running = now;
        let took = now.saturating_duration_since(began);
        if took >= LOST_CPU || self.shared_by_share(took) {
            self.back_off(now);
        } else {
            self.last_yield = Some(now);
        }
    }

    /// Counts `span` of polling (a yield, or a round after one) into the
    /// share window; true when a window closes with the others at
    /// [`SHARED_ONE_IN`] or more of it.
    fn shared_by_share(&mut self, span: Duration) -> bool {
        self.polled += span;
        if span >= OTHERS_RAN {
            self.others += span;
        }
        if self.polled < SHARE_WINDOW {
            return false;
        }
        let shared = self.others * SHARED_ONE_IN >= self.polled;
        self.polled = Duration::ZERO;
        self.others = Duration::ZERO;
        shared
    }

    /// The round just ended did work of its own that is not frames (flow
    /// expiry, the report): its length is not a sign of a shared CPU.
    pub fn unmeasured(&mut self) {
        self.last_yield = None;
    }

    /// The worker woke from a sleep at `now` (a frame, or the timeout).
    pub fn woke(&mut self, now: Instant) {
        self.running = now;
        self.since = now;
        self.slept = true;
        self.last_yield = None;
    }

    fn back_off(&mut self, now: Instant) {
        self.shared_until = Some(now + SHARED_BACKOFF);
        self.last_yield = None;
        self.polled = Duration::ZERO;
        self.others = Duration::ZERO;
        self.backoffs += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    fn spin(us: u64) -> IdlePolicy {
        IdlePolicy {
            spin: US * us as u32,
            ..IdlePolicy::default()
        }
    }

    /// Empty rounds until the first that is not `Next::Round`, each 1 µs
    /// after the last; returns it and the time it was asked at.
    fn first_decision(idle: &mut Idle, t: &mut Instant, policy: &IdlePolicy) -> Next {
        for _ in 0..SPIN_BEFORE_SLEEP {
            *t += US;
            let next = idle.after_round(0, *t, policy);
            if next != Next::Round {
                return next;
            }
        }
        panic!("still going round after {SPIN_BEFORE_SLEEP} empty rounds");
    }

    /// A worker with `policy` that did work and has gone past its empty
    /// rounds, polling.
    fn polling(policy: &IdlePolicy) -> (Idle, Instant) {
        let mut t = Instant::now();
        let mut idle = Idle::new(t);
        idle.after_round(1, t, policy);
        assert_eq!(first_decision(&mut idle, &mut t, policy), Next::Yield);
        (idle, t)
    }

    /// A yield that lasts `d`.
    fn yield_for(idle: &mut Idle, t: &mut Instant, d: Duration) {
        let began = *t;
        *t += d;
        idle.yielded(began, *t);
    }

    #[test]
    fn without_spin_a_worker_sleeps_after_a_few_empty_rounds() {
        let mut t = Instant::now();
        let mut idle = Idle::new(t);
        let policy = spin(0);
        assert_eq!(idle.after_round(3, t, &policy), Next::Round);
        assert_eq!(first_decision(&mut idle, &mut t, &policy), Next::Sleep);
        assert_eq!(idle.rounds, SPIN_BEFORE_SLEEP);
    }

    #[test]
    fn a_worker_polls_for_the_spin_after_its_last_work_then_sleeps() {
        let policy = spin(5000);
        let (mut idle, mut t) = polling(&policy);
        // Yields of 2 µs and rounds of 1 µs, until 5 ms after the work.
        let mut yields = 0;
        loop {
            yield_for(&mut idle, &mut t, US * 2);
            t += US;
            match idle.after_round(0, t, &policy) {
                Next::Yield => yields += 1,
                Next::Sleep => break,
                other => panic!("an idle worker past its empty rounds was told to {other:?}"),
            }
        }
        assert!((1600..=1670).contains(&yields), "{yields} yields");
        assert_eq!(idle.backoffs, 0);
        // Woken by the poll timeout with nothing to do: no second spin.
        t += Duration::from_millis(10);
        idle.woke(t);
        assert_eq!(first_decision(&mut idle, &mut t, &policy), Next::Sleep);
        // Work again: the spin starts over.
        idle.after_round(1, t, &policy);
        assert_eq!(first_decision(&mut idle, &mut t, &policy), Next::Yield);
    }

    #[test]
    fn a_long_yield_means_a_shared_cpu_and_stops_polling_for_the_backoff() {
        let policy = spin(100_000);
        let (mut idle, mut t) = polling(&policy);
        // Someone else ran for a time slice during the yield.
        yield_for(&mut idle, &mut t, LOST_CPU);
        assert_eq!(idle.backoffs, 1);
        assert_eq!(idle.after_round(0, t, &policy), Next::Sleep);
        // New work within the backoff: a few rounds, then sleep, not poll.
        t += Duration::from_millis(1);
        idle.woke(t);
        idle.after_round(1, t, &policy);
        assert_eq!(first_decision(&mut idle, &mut t, &policy), Next::Sleep);
        // After the backoff, polling again.
        t += SHARED_BACKOFF;
        idle.woke(t);
        idle.after_round(1, t, &policy);
        assert_eq!(first_decision(&mut idle, &mut t, &policy), Next::Yield);
        assert_eq!(idle.backoffs, 1);
    }

    #[test]
    fn a_round_preempted_between_yields_means_a_shared_cpu() {
        let policy = spin(100_000);
        let (mut idle, mut t) = polling(&policy);
        yield_for(&mut idle, &mut t, US);
        // The next empty round came 1 ms later: preempted, not yielded.
        t += LOST_CPU;
        assert_eq!(idle.after_round(0, t, &policy), Next::Sleep);
        assert_eq!(idle.backoffs, 1);
        // A round with work between two yields is no sign of it.
        t += SHARED_BACKOFF;
        idle.after_round(1, t, &policy);
        assert_eq!(first_decision(&mut idle, &mut t, &policy), Next::Yield);
        yield_for(&mut idle, &mut t, US);
        t += Duration::from_millis(3);
        assert_eq!(idle.after_round(1, t, &policy), Next::Round);
        assert_eq!(first_decision(&mut idle, &mut t, &policy), Next::Yield);
        assert_eq!(idle.backoffs, 1);
        // Nor is a long empty round that published the report.
        yield_for(&mut idle, &mut t, US);
        t += Duration::from_millis(2);
        idle.unmeasured();
        assert_eq!(idle.after_round(0, t, &policy), Next::Yield);
        assert_eq!(idle.backoffs, 1);
    }

    /// Polls with `policy` for `for_`, each yield taking `d` except every
    /// `every`th, which takes `long`; rounds of 1 µs. The backoffs seen.
    fn poll_with_yields(
        policy: &IdlePolicy,
        for_: Duration,
        d: Duration,
        every: u32,
        long: Duration,
    ) -> u64 {
        let (mut idle, mut t) = polling(policy);
        let end = t + for_;
        let mut n = 0;
        while t < end {
            n += 1;
            let took = if n % every == 0 { long } else { d };
            yield_for(&mut idle, &mut t, took);
            t += US;
            if idle.after_round(0, t, policy) != Next::Yield {
                break;
            }
        }
        idle.backoffs
    }

    #[test]
    fn others_taking_a_fifth_of_the_polling_time_mean_a_shared_cpu() {
        let policy = spin(100_000);
        // Endpoints running 40 µs in every third yield: a third of the time.
        assert_eq!(
            poll_with_yields(&policy, SHARE_WINDOW * 2, US * 2, 3, US * 40),
            1
        );
        // The engine's own threads, 50 µs in every 500th: 3%.
        assert_eq!(
            poll_with_yields(&policy, Duration::from_millis(50), US * 2, 500, US * 50),
            0
        );
        // Yields alone, however many: no one else ran.
        assert_eq!(
            poll_with_yields(&policy, Duration::from_millis(50), US * 2, 1, US * 2),
            0
        );
    }

    #[test]
    fn busy_poll_polls_on_a_shared_cpu_and_after_each_wake() {
        let policy = IdlePolicy {
            busy_poll: Duration::from_millis(100),
            ..IdlePolicy::default()
        };
        let (mut idle, mut t) = polling(&policy);
        yield_for(&mut idle, &mut t, LOST_CPU * 5);
        assert_eq!(idle.after_round(0, t, &policy), Next::Yield);
        // Past it: sleep; woken with nothing to do, poll again.
        t += Duration::from_millis(100);
        assert_eq!(idle.after_round(0, t, &policy), Next::Sleep);
        idle.woke(t);
        assert_eq!(idle.after_round(0, t + US, &policy), Next::Yield);
    }

    /// A worker that gives way after `give_way_us` of work, at its start.
    struct Busy {
        idle: Idle,
        t: Instant,
        policy: IdlePolicy,
    }

    impl Busy {
        fn new(give_way_us: u32) -> Busy {
            let t = Instant::now();
            Busy {
                idle: Idle::new(t),
                t,
                policy: IdlePolicy {
                    give_way: US * give_way_us,
                    ..IdlePolicy::default()
                },
            }
        }

        /// Rounds of work `round_us` long each, for `for_ms`: the times
        /// the worker gave way (each yield taking 1 µs).
        fn work_for(&mut self, round_us: u32, for_ms: u64) -> u64 {
            let end = self.t + Duration::from_millis(for_ms);
            let before = self.idle.gave_way;
            while self.t < end {
                self.t += US * round_us;
                match self.idle.after_round(1, self.t, &self.policy) {
                    Next::Round => {}
                    Next::GiveWay => {
                        self.t += US;
                        self.idle.gave_way(self.t);
                    }
                    other => panic!("a working worker was told to {other:?}"),
                }
            }
            self.idle.gave_way - before
        }
    }

    #[test]
    fn a_busy_worker_gives_way_after_each_run_of_work() {
        let mut w = Busy::new(100);
        // Rounds of 30 µs: the fourth reaches 100 µs (120), then again
        // from the yield's end (1 µs later): 10 ms make 83.
        let n = w.work_for(30, 10);
        assert!((80..=84).contains(&n), "{n}");
        // Rounds longer than the run: a yield after each.
        assert_eq!(w.work_for(250, 10), 40);
        // Idle rounds never give way, whatever the time since the last.
        w.t += Duration::from_millis(5);
        assert_eq!(
            first_decision(&mut w.idle, &mut w.t, &w.policy),
            Next::Sleep
        );
    }

    #[test]
    fn a_sleep_or_an_idle_yield_starts_the_run_over() {
        let policy = IdlePolicy {
            give_way: US * 100,
            spin: Duration::from_millis(5),
            ..IdlePolicy::default()
        };
        let (mut idle, mut t) = polling(&policy);
        // Work 90 µs after an idle yield: not yet.
        yield_for(&mut idle, &mut t, US * 2);
        t += US * 90;
        assert_eq!(idle.after_round(1, t, &policy), Next::Round);
        t += US * 20;
        assert_eq!(idle.after_round(1, t, &policy), Next::GiveWay);
        idle.gave_way(t);
        // Asleep, woken 80 µs of work ago: not yet.
        t += Duration::from_millis(1);
        idle.woke(t);
        t += US * 80;
        assert_eq!(idle.after_round(1, t, &policy), Next::Round);
        assert_eq!(idle.gave_way, 1);
    }

    #[test]
    fn without_give_way_a_busy_worker_never_yields() {
        assert_eq!(Busy::new(0).work_for(500, 100), 0);
    }
}
