//! Stopping: what the sessions do when the engine is told to stop. New
//! connections are no longer taken; the splits that do not finish within
//! the engine's drain deadline, and connections still held for a
//! decision, are reset on both sides and logged as `engine-stopped`, so
//! no peer is left waiting on a connection nobody serves any more.

use std::time::Instant;

use super::{
    decide::Start,
    records::{Meta, ENGINE_STOPPED},
    Entry, FlowId, Sessions,
};

impl Sessions {
    /// From now on frames of connections not known yet are dropped
    /// (counted as `refused_stopping`): a new connection is neither split
    /// nor released while the engine goes. Its client retransmits, and
    /// reaches the server once the engine has gone.
    pub fn stop_taking(&mut self) {
        self.stopping = true;
    }

    /// How long connections under way are given when the engine stops.
    pub fn drain(&self) -> std::time::Duration {
        self.settings.drain
    }

    /// Connections that would lose bytes if the engine stopped now: splits
    /// not through with their bytes, and connections held for a decision.
    pub fn unfinished(&self) -> usize {
        self.flows
            .values()
            .filter(|f| match &f.entry {
                Entry::Split { split, .. } => !split.finished(),
                Entry::Tracking(t) => t.hold.is_some(),
                _ => false,
            })
            .count()
    }

    /// Resets every unfinished connection on both sides (the RSTs go to
    /// `out`) and logs each one that was not logged yet with the end
    /// `engine-stopped`.
    pub fn stop_all(&mut self, now: Instant) {
        self.stopping = true;
        let ids: Vec<FlowId> = self.flows.keys().copied().collect();
        for id in ids {
            let held = match self.flows.get(&id).map(|f| &f.entry) {
                Some(Entry::Split { split, .. }) if !split.finished() => false,
                Some(Entry::Tracking(t)) if t.hold.is_some() => true,
                _ => continue,
            };
            self.counters.stopped += 1;
            if held {
                self.stop_held(id, now);
            } else {
                self.with_split(id, now, |s| s.stop());
            }
        }
    }

    /// A connection held for a decision when the engine stopped: refused
    /// (both ends reset, nothing held reaches the server), since the
    /// decision it waited for will not be made.
    fn stop_held(&mut self, id: FlowId, now: Instant) {
        let Some(Entry::Tracking(t)) = self.flows.get(&id).map(|f| &f.entry) else {
            return;
        };
        let held_bytes = t.hold.as_ref().map_or(0, |h| h.bytes);
        let meta = Box::new(Meta {
            action: None,
            rule: format!("({ENGINE_STOPPED})"),
            sni: None,
            alpn: Vec::new(),
            key: t.key,
            conn: super::conn_id(),
            opened: t.opened,
            policy_version: self.settings.policy.version,
            held_bytes,
            sni_malformed: None,
            note: Some("held for a decision when the engine stopped: reset on both sides".into()),
            logged: true,
        });
        self.log(&meta, (held_bytes, 0), ENGINE_STOPPED);
        self.start_split(id, None, now, meta, Start::Refuse(None));
    }
}
