//! The per-worker flow table: one record per flow this worker owns, with
//! per-side counters, bounded in size, idle flows expired on a timer wheel.
//! Only the owning worker touches it; nothing here is shared.

use std::collections::HashMap;

use loupe_common::FlowKey;
use serde::{Deserialize, Serialize};

use super::{wheel::TimerWheel, FlowId};

/// The interface a frame arrived on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    /// Client-facing interface.
    Inside = 0,
    /// Server-facing interface.
    Outside = 1,
}

impl Side {
    pub fn other(self) -> Side {
        match self {
            Side::Inside => Side::Outside,
            Side::Outside => Side::Inside,
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SideCount {
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug)]
struct FlowRecord {
    /// The key of the first frame seen (its source is taken as the client).
    first: FlowKey,
    first_seen_ms: u64,
    last_seen_ms: u64,
    /// Frames received per side ([inside, outside]).
    rx: [SideCount; 2],
}

/// What [`FlowTable::observe`] did with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Observed {
    Existing,
    Created,
    /// The table is at its limit: the frame is not tracked.
    TableFull,
}

/// One flow as reported in stats.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowSummary {
    pub client: String,
    pub server: String,
    pub proto: u8,
    pub inside: SideCount,
    pub outside: SideCount,
    pub age_ms: u64,
    pub idle_ms: u64,
    /// What the policy decided (with the tcp-split action on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<super::FlowDecision>,
}

pub struct FlowTable {
    flows: HashMap<FlowId, FlowRecord>,
    wheel: TimerWheel<FlowId>,
    max_flows: usize,
    idle_timeout_ms: u64,
    expired_scratch: Vec<FlowId>,
    pub created: u64,
    pub expired: u64,
    pub rejected_full: u64,
}

impl FlowTable {
    pub fn new(max_flows: usize, idle_timeout_ms: u64, now_ms: u64) -> Self {
        FlowTable {
            flows: HashMap::new(),
            // 1 s ticks, one turn = 4.3 minutes; longer timeouts wait rounds.
            wheel: TimerWheel::new(256, 1000, now_ms),
            max_flows,
            idle_timeout_ms: idle_timeout_ms.max(1),
            expired_scratch: Vec::new(),
            created: 0,
            expired: 0,
            rejected_full: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// Account one frame of `len` bytes that arrived on `side`.
    pub fn observe(&mut self, key: &FlowKey, side: Side, len: usize, now_ms: u64) -> Observed {
        let id = FlowId::of(key);
        if let Some(rec) = self.flows.get_mut(&id) {
            rec.last_seen_ms = now_ms;
            let c = &mut rec.rx[side.index()];
            c.packets += 1;
            c.bytes += len as u64;
            return Observed::Existing;
        }
        if self.flows.len() >= self.max_flows {
            self.rejected_full += 1;
            return Observed::TableFull;
        }
        let mut rx = [SideCount::default(); 2];
        rx[side.index()] = SideCount {
            packets: 1,
            bytes: len as u64,
        };
        self.flows.insert(
            id,
            FlowRecord {
                first: *key,
                first_seen_ms: now_ms,
                last_seen_ms: now_ms,
                rx,
            },
        );
        self.wheel
            .insert(now_ms.saturating_add(self.idle_timeout_ms), id);
        self.created += 1;
        Observed::Created
    }

    /// Drop flows idle for the timeout; returns how many went.
    pub fn expire(&mut self, now_ms: u64) -> usize {
        let mut due = std::mem::take(&mut self.expired_scratch);
        due.clear();
        self.wheel.advance(now_ms, &mut due);
        let mut removed = 0;
        for id in due.drain(..) {
            let Some(rec) = self.flows.get(&id) else {
                continue;
            };
            let deadline = rec.last_seen_ms.saturating_add(self.idle_timeout_ms);
            if deadline <= now_ms {
                self.flows.remove(&id);
                removed += 1;
            } else {
                self.wheel.insert(deadline, id);
            }
        }
        self.expired_scratch = due;
        self.expired += removed as u64;
        removed
    }

    /// Up to `limit` flows, oldest first. Linear in the table size (a
    /// selection, not a full sort): it runs on the worker.
    /// `annotate` adds what was decided for a flow.
    pub fn snapshot(
        &self,
        limit: usize,
        now_ms: u64,
        opened: impl Fn(&FlowKey) -> bool,
        annotate: impl Fn(&FlowKey) -> Option<super::FlowDecision>,
    ) -> Vec<FlowSummary> {
        if limit == 0 {
            return Vec::new();
        }
        let mut recs: Vec<&FlowRecord> = self.flows.values().collect();
        if recs.len() > limit {
            // The connections past their handshake first (`opened`), then
            // the flows that exchanged the most, older first among equals:
            // a flood of handshakes (SYNs however large, sent again and
            // again) cannot push the connections out of the listing,
            // whenever it began.
            let mut ranked: Vec<_> = recs
                .into_iter()
                .map(|r| {
                    let rank = (
                        std::cmp::Reverse((opened(&r.first), exchanged(&r.rx))),
                        r.first_seen_ms,
                    );
                    (rank, r)
                })
                .collect();
            ranked.select_nth_unstable_by_key(limit - 1, |(rank, _)| *rank);
            ranked.truncate(limit);
            recs = ranked.into_iter().map(|(_, r)| r).collect();
        }
        recs.sort_by_key(|r| r.first_seen_ms);
        recs.into_iter()
            .map(|r| FlowSummary {
                client: endpoint(&r.first.src, r.first.src_port),
                server: endpoint(&r.first.dst, r.first.dst_port),
                proto: r.first.proto,
                inside: r.rx[0],
                outside: r.rx[1],
                age_ms: now_ms.saturating_sub(r.first_seen_ms),
                idle_ms: now_ms.saturating_sub(r.last_seen_ms),
                decision: annotate(&r.first),
            })
            .collect()
    }
}

/// How much a flow exchanged, for ranking flows in a listing: first the
/// frames that went both ways (the fewer of the two sides'), then the
/// bytes both ways. A frame sent again and again from one side (a SYN
/// flood, with data or without) ranks below any connection whose ends
/// both spoke a few times.
pub fn exchanged(rx: &[SideCount; 2]) -> (u64, u64) {
    (
        rx[0].packets.min(rx[1].packets),
        rx[0].bytes.saturating_add(rx[1].bytes),
    )
}

impl FlowSummary {
    /// [`exchanged`] of this flow.
    pub fn exchanged(&self) -> (u64, u64) {
        exchanged(&[self.inside, self.outside])
    }
}

/// `198.18.0.1:443` or `[2001:2::1]:443`.
pub fn endpoint(addr: &[u8; 16], port: u16) -> String {
    let v6 = std::net::Ipv6Addr::from(*addr);
    match v6.to_ipv4_mapped() {
        Some(v4) => format!("{v4}:{port}"),
        None => format!("[{v6}]:{port}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use loupe_common::v4_mapped;

    fn key(port: u16) -> FlowKey {
        FlowKey::new(
            v4_mapped([198, 18, 0, 1]),
            v4_mapped([198, 18, 0, 2]),
            port,
            443,
            6,
        )
    }

    #[test]
    fn both_directions_share_one_record() {
        let mut t = FlowTable::new(10, 1000, 0);
        assert_eq!(t.observe(&key(1), Side::Inside, 100, 0), Observed::Created);
        assert_eq!(
            t.observe(&key(1).reversed(), Side::Outside, 60, 1),
            Observed::Existing
        );
        assert_eq!(t.len(), 1);
        let s = &t.snapshot(10, 2, |_| false, |_| None)[0];
        assert_eq!(s.client, "198.18.0.1:1");
        assert_eq!(s.server, "198.18.0.2:443");
        assert_eq!(
            s.inside,
            SideCount {
                packets: 1,
                bytes: 100
            }
        );
        assert_eq!(
            s.outside,
            SideCount {
                packets: 1,
                bytes: 60
            }
        );
    }

    #[test]
    fn table_is_bounded() {
        let mut t = FlowTable::new(2, 1000, 0);
        t.observe(&key(1), Side::Inside, 1, 0);
        t.observe(&key(2), Side::Inside, 1, 0);
        assert_eq!(t.observe(&key(3), Side::Inside, 1, 0), Observed::TableFull);
        assert_eq!(t.len(), 2);
        assert_eq!(t.rejected_full, 1);
    }

    #[test]
    fn idle_flows_expire_and_active_ones_stay() {
        let mut t = FlowTable::new(10, 5000, 0);
        t.observe(&key(1), Side::Inside, 1, 0);
        t.observe(&key(2), Side::Inside, 1, 0);
        // Flow 2 keeps talking.
        for now in (1000..=9000).step_by(1000) {
            t.observe(&key(2), Side::Outside, 1, now);
            t.expire(now);
        }
        assert_eq!(t.len(), 1);
        assert_eq!(t.expired, 1);
        t.expire(20_000);
        assert!(t.is_empty());
    }

    #[test]
    fn snapshot_lists_the_oldest_flows_first() {
        let mut t = FlowTable::new(100, 60_000, 0);
        for port in (1..=50).rev() {
            t.observe(&key(port), Side::Inside, 1, 1000 - port as u64);
        }
        let s = t.snapshot(5, 2000, |_| false, |_| None);
        let ports: Vec<&str> = s.iter().map(|f| f.client.as_str()).collect();
        assert_eq!(
            ports,
            [
                "198.18.0.1:50",
                "198.18.0.1:49",
                "198.18.0.1:48",
                "198.18.0.1:47",
                "198.18.0.1:46"
            ]
        );
        assert_eq!(t.snapshot(0, 2000, |_| false, |_| None).len(), 0);
        assert_eq!(t.snapshot(500, 2000, |_| false, |_| None).len(), 50);
    }

    /// A flood of SYNs (large ones, each sent twice and answered) that
    /// began first takes the listing's room from neither the connections
    /// past their handshake nor their order.
    #[test]
    fn a_flood_of_handshakes_leaves_the_listing_to_the_connections() {
        let mut t = FlowTable::new(10_000, 60_000, 0);
        for port in 1000..3000 {
            for _ in 0..2 {
                t.observe(&key(port), Side::Inside, 1566, 10);
                t.observe(&key(port).reversed(), Side::Outside, 74, 10);
            }
        }
        // Connections that carried little: a handshake and a few bytes.
        let live = [7u16, 8, 9];
        for (i, port) in live.into_iter().enumerate() {
            let at = 20 + i as u64;
            t.observe(&key(port), Side::Inside, 100, at);
            t.observe(&key(port).reversed(), Side::Outside, 66, at);
        }
        let opened = |k: &FlowKey| live.contains(&k.src_port);
        let s = t.snapshot(100, 100, opened, |_| None);
        assert_eq!(s.len(), 100);
        let ports: Vec<&str> = s.iter().map(|f| f.client.as_str()).collect();
        // The flood's oldest, then the connections: oldest first.
        assert_eq!(
            ports[97..],
            ["198.18.0.1:7", "198.18.0.1:8", "198.18.0.1:9"]
        );
        // Among flows not past their handshake, those that exchanged more.
        let mut t = FlowTable::new(10, 60_000, 0);
        t.observe(&key(1), Side::Inside, 74, 0);
        t.observe(&key(2), Side::Inside, 74, 5);
        t.observe(&key(2).reversed(), Side::Outside, 74, 5);
        let s = t.snapshot(1, 10, |_| false, |_| None);
        assert_eq!(s[0].client, "198.18.0.1:2");
    }

    #[test]
    fn ipv6_endpoints_are_bracketed() {
        let mut a = [0u8; 16];
        a[0] = 0x20;
        a[1] = 0x01;
        a[3] = 2;
        a[15] = 1;
        assert_eq!(endpoint(&a, 443), "[2001:2::1]:443");
    }
}
