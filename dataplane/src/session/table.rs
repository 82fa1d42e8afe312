//! The session table's bound: which entries make room when it is full
//! (half-open handshakes first, never live splits), and idle expiry.

use super::*;

/// Eviction classes: half-open handshakes (and flows seen mid-stream,
/// which cost nothing to forget) go first.
pub(super) const EMBRYONIC: usize = 0;

pub(super) const SETTLED: usize = 1;

/// Whether the queued pair `(since, id)` still names an entry that may be
/// evicted (the same entry, not a live split).
pub(super) fn evictable(flows: &HashMap<FlowId, Flow>, id: FlowId, since: u64) -> bool {
    flows
        .get(&id)
        .is_some_and(|f| f.since == since && !matches!(f.entry, Entry::Split { .. }))
}

impl Sessions {
    /// Forgets trackers idle longer than the idle timeout, and ended
    /// connections' tombstones sooner (split connections end through their
    /// own timers; passed ones are kept until room is needed).
    pub fn expire(&mut self, now: Instant) {
        let idle = self.settings.idle;
        let before = self.flows.len();
        // Ended connections are remembered a little longer than a peer's
        // retransmissions last.
        // Under pressure: less than an eighth of the budget left.
        let budget = &self.settings.budget;
        let pressure = budget.short_of(budget.limit() / 8);
        self.flows.retain(|_, f| match &mut f.entry {
            Entry::Split { split, .. } => {
                // Idle a while: its buffers' spare memory goes back.
                if now.duration_since(f.last_seen) >= TRIM_AFTER {
                    split.trim(pressure);
                }
                true
            }
            Entry::Ended { .. } | Entry::Closed => {
                now.duration_since(f.last_seen) < idle.min(Duration::from_secs(60))
            }
            // On the XDP fast path a passed connection sends the worker
            // nothing, however busy: idle here says nothing of it. Kept
            // (without its listing) until room is needed, so that a SYN
            // forged on its ports finds it passed (see
            // `Sessions::not_reopened`): forgotten, it would be met as a
            // flow seen mid-stream and, where the policy would inspect it
            // without its name, reset (an outside probe).
            Entry::Passthrough(meta) => {
                if now.duration_since(f.last_seen) >= idle {
                    *meta = None;
                }
                true
            }
            _ => now.duration_since(f.last_seen) < idle,
        });
        self.counters.expired += (before - self.flows.len()) as u64;
        for queue in &mut self.evictable {
            queue.retain(|(since, id)| evictable(&self.flows, *id, *since));
        }
    }

    /// A place in the eviction order for `id`.
    pub(super) fn next_since(&mut self, id: FlowId, class: usize) -> u64 {
        let since = self.epoch;
        self.epoch += 1;
        self.evictable[class].push_back((since, id));
        since
    }

    /// Makes room by forgetting the oldest entry that is not a live
    /// split; a tracker's held frames go out unchanged first, and its flow
    /// to the fast path (as on a pass), unless the hold acknowledged them:
    /// then the connection becomes a relay and stays. Later segments of a
    /// forgotten flow pass through as those of any flow the engine did not
    /// see start. Returns false when only live splits are left.
    pub(super) fn evict_oldest(&mut self) -> bool {
        for class in [EMBRYONIC, SETTLED] {
            while let Some((since, id)) = self.evictable[class].pop_front() {
                if !evictable(&self.flows, id, since) {
                    continue;
                }
                let holding = self
                    .flows
                    .get(&id)
                    .is_some_and(|f| matches!(&f.entry, Entry::Tracking(t) if t.hold.is_some()));
                if holding {
                    self.undecided(id, NoDecision::Evicted, Instant::now());
                    // Decided as a relay (its ClientHello was acknowledged
                    // during the hold, so only a half that retransmits can
                    // deliver it): a live split now, which is kept; room
                    // is made elsewhere.
                    if self
                        .flows
                        .get(&id)
                        .is_some_and(|f| matches!(f.entry, Entry::Split { .. }))
                    {
                        continue;
                    }
                }
                self.flows.remove(&id);
                self.counters.evicted += 1;
                return true;
            }
        }
        false
    }
}
