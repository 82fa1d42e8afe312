//! A hashed timing wheel: O(1) insertion, expiry work proportional to the
//! timers due (plus the slots passed), never a scan of every flow.
//!
//! Timers are not cancelled; owners re-check their item when it fires and
//! re-arm it if it is not yet due (lazy cancellation).

pub struct TimerWheel<T> {
    slots: Vec<Vec<(u64, T)>>,
    tick_ms: u64,
    /// Next tick not yet processed.
    next_tick: u64,
    len: usize,
}

impl<T> TimerWheel<T> {
    /// `slots` buckets of `tick_ms` each; timers further out than one turn
    /// wait in their bucket for their round.
    pub fn new(slots: usize, tick_ms: u64, now_ms: u64) -> Self {
        let slots = slots.max(1);
        let tick_ms = tick_ms.max(1);
        TimerWheel {
            slots: (0..slots).map(|_| Vec::new()).collect(),
            tick_ms,
            next_tick: now_ms / tick_ms,
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Arm a timer for `deadline_ms`; a deadline in the past fires at the
    /// next advance.
    pub fn insert(&mut self, deadline_ms: u64, item: T) {
        let tick = (deadline_ms.div_ceil(self.tick_ms)).max(self.next_tick);
        let n = self.slots.len() as u64;
        self.slots[(tick % n) as usize].push((tick, item));
        self.len += 1;
    }

    /// Move every timer due at or before `now_ms` into `due`.
    pub fn advance(&mut self, now_ms: u64, due: &mut Vec<T>) {
        let target = now_ms / self.tick_ms;
        if target < self.next_tick {
            return;
        }
        let n = self.slots.len() as u64;
        let steps = (target - self.next_tick + 1).min(n);
        for i in 0..steps {
            let slot = &mut self.slots[((self.next_tick + i) % n) as usize];
            let mut j = 0;
            while j < slot.len() {
                if slot[j].0 <= target {
                    let (_, item) = slot.swap_remove(j);
                    due.push(item);
                    self.len -= 1;
                } else {
                    j += 1;
                }
            }
        }
        self.next_tick = target + 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn fires_at_deadline_not_before() {
        let mut w = TimerWheel::new(8, 10, 0);
        w.insert(35, "a");
        let mut due = Vec::new();
        w.advance(30, &mut due);
        assert!(due.is_empty());
        w.advance(40, &mut due);
        assert_eq!(due, vec!["a"]);
        assert!(w.is_empty());
    }

    #[test]
    fn far_timers_wait_for_their_round() {
        let mut w = TimerWheel::new(4, 1, 0);
        w.insert(100, 1);
        let mut due = Vec::new();
        for t in 0..100 {
            w.advance(t, &mut due);
            assert!(due.is_empty(), "fired early at {t}");
        }
        w.advance(100, &mut due);
        assert_eq!(due, vec![1]);
    }

    #[test]
    fn a_long_jump_fires_everything_due() {
        let mut w = TimerWheel::new(4, 1, 0);
        for d in [1, 2, 3, 50, 500] {
            w.insert(d, d);
        }
        let mut due = Vec::new();
        w.advance(60, &mut due);
        due.sort();
        assert_eq!(due, vec![1, 2, 3, 50]);
        assert_eq!(w.len(), 1);
    }

    proptest! {
        /// Against a model: after advancing to t, exactly the timers with
        /// deadline <= t have fired, each once.
        #[test]
        fn matches_model(deadlines in proptest::collection::vec(0u64..500, 0..64),
                         steps in proptest::collection::vec(0u64..80, 1..20),
                         slots in 1usize..16, tick in 1u64..20) {
            let mut w = TimerWheel::new(slots, tick, 0);
            for (i, d) in deadlines.iter().enumerate() {
                w.insert(*d, i);
            }
            let mut fired = vec![false; deadlines.len()];
            let mut now = 0;
            let mut due = Vec::new();
            for s in steps {
                now += s;
                due.clear();
                w.advance(now, &mut due);
                for i in &due {
                    prop_assert!(!fired[*i], "fired twice");
                    prop_assert!(deadlines[*i] <= now, "early: deadline {} now {}", deadlines[*i], now);
                    fired[*i] = true;
                }
                // Everything due by the last full tick has fired.
                for (i, d) in deadlines.iter().enumerate() {
                    if d.div_ceil(tick) * tick <= now / tick * tick {
                        prop_assert!(fired[i], "late: deadline {} now {}", d, now);
                    }
                }
            }
        }
    }
}
