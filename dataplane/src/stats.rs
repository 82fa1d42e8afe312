//! The engine's stats report: XDP counters per path, per-worker counters
//! and AF_XDP socket statistics, and the flows each worker owns. Written as
//! JSON (atomically, so readers never see half a file) and rendered as a
//! table for people.

use std::{collections::BTreeMap, fmt::Write as _, io, path::Path};

use serde::{Deserialize, Serialize};

use crate::{
    flow::{table::SideCount, FlowSummary},
    xsk::SideStats,
};

pub const STATS_VERSION: u32 = 1;

/// Flows the text report shows (the JSON lists more).
pub const FLOWS_SHOWN: usize = 20;

/// Counters one worker keeps; plain integers, owned by the worker and
/// copied out at each publish.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct WorkerCounters {
    /// Frames received from the AF_XDP socket of each interface.
    pub rx_inside: SideCount,
    pub rx_outside: SideCount,
    /// Frames handed to the TX ring of each interface.
    pub tx_inside: SideCount,
    pub tx_outside: SideCount,
    /// Frames of flows owned by another worker, sent to it.
    pub cross_out: u64,
    /// Frames received from other workers for flows this one owns.
    pub cross_in: u64,
    /// Crossover ring full: frame dropped (TCP retransmits it).
    pub cross_full: u64,
    /// No free UMEM frame to build a frame in: dropped.
    pub no_free_frame: u64,
    /// Times a side kept its split frames for a later round: it had no
    /// UMEM frame to take (none free, or its TX share held). Not drops.
    #[serde(default)]
    pub tx_deferred: u64,
    /// Frames the port cannot send (more than `MAX_FRAME_DESCS` UMEM
    /// frames, received or built): dropped.
    #[serde(default)]
    pub unsendable: u64,
    /// Frames received in more than one UMEM frame (multi-buffer: longer
    /// than one frame holds, as at jumbo MTUs).
    #[serde(default)]
    pub rx_chained: u64,
    /// Frames the split connections sent in more than one UMEM frame.
    #[serde(default)]
    pub tx_chained: u64,
    /// Steered frames with no TCP 5-tuple the worker could read: dropped
    /// where the engine holds or splits connections (it cannot tell what
    /// a receiver would take from them), forwarded unchanged otherwise.
    pub unparsed: u64,
    /// Times the TX ring could not take every pending frame.
    pub tx_ring_full: u64,
    /// Times a fill ring could not be topped up (no spare frames).
    pub fill_starved: u64,
    pub flows_created: u64,
    pub flows_expired: u64,
    /// New flows not tracked because the table was at its limit.
    pub flow_table_full: u64,
    /// Times an idle worker found other threads taking its CPU (a time
    /// slice, or a fifth of its polling time) and went back to sleeping
    /// after a few empty rounds instead of polling (`--idle-spin-us`; see
    /// `worker::idle`).
    #[serde(default)]
    pub idle_backoffs: u64,
    /// Times a busy worker yielded its CPU after `--yield-every-us` of
    /// work without a break (see `worker::idle`).
    #[serde(default)]
    pub gave_way: u64,
}

impl WorkerCounters {
    /// A frame the port could not build.
    pub fn not_built(&mut self, e: crate::xsk::BuildError) {
        match e {
            crate::xsk::BuildError::NoFreeFrame => self.no_free_frame += 1,
            crate::xsk::BuildError::Unsendable(_) => self.unsendable += 1,
        }
    }
}

/// The tcp-split action's counters on one worker.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SplitCounters {
    /// Connections split after their handshake.
    pub split: u64,
    /// Split connections right now.
    pub active: u64,
    /// Split connections that ended (cleanly or not).
    pub closed: u64,
    /// Halves that ended with a RST or a timeout (and of those, by a RST
    /// from their peer, or by giving up on retransmissions).
    pub aborted: u64,
    pub resets_received: u64,
    pub timed_out: u64,
    /// Connections left alone: already running, or a RST in the hold.
    pub passthrough: u64,
    /// Client SYNs sent on without their data, FIN, URG or TCP Fast Open
    /// option, and client segments before the decision sent on (or held)
    /// with URG cleared: so the server reads what the engine decided on.
    #[serde(default)]
    pub syn_stripped: u64,
    #[serde(default)]
    pub urgent_cleared: u64,
    /// Connections taken up from the handshake the XDP program recorded
    /// (their SYN and SYN-ACK took the fast path), and records found but
    /// unusable (a frame that does not parse or does not fit the flow:
    /// the connection is then met as one already running).
    #[serde(default)]
    pub handshakes_adopted: u64,
    #[serde(default)]
    pub handshakes_unusable: u64,
    /// Records made before the sessions began (before the first policy):
    /// not used, the connection ran on unwatched.
    #[serde(default)]
    pub handshakes_before: u64,
    /// Pass-through connections handed to the XDP fast path (installed as
    /// `bypass` in the flow map, both directions).
    pub released: u64,
    /// New connections not tracked because the split table was full of
    /// live splits.
    pub table_full: u64,
    /// Connections the policy would inspect but the engine could not
    /// follow from their start (seen mid-flow, evicted while held, no
    /// room), ended under `--mid-flow drop` (counted as refused too).
    #[serde(default)]
    pub uninspectable: u64,
    /// SYNs on the ports of a live connection that the server answered
    /// with an ACK, not a SYN-ACK: the connection went on as it was.
    #[serde(default)]
    pub syns_on_live: u64,
    /// Records of flows seen mid-stream and reset not written: more than
    /// `MID_FLOW_RECORDS_PER_SEC` in a second (a flood of forged
    /// segments).
    #[serde(default)]
    pub mid_flow_unlogged: u64,
    /// Entries forgotten to make room (oldest first; trackers, passed-
    /// through flows and tombstones, never live splits).
    #[serde(default)]
    pub evicted: u64,
    /// Trackers and tombstones forgotten after idling (passed connections
    /// are kept until room is needed: the fast path carries them).
    pub expired: u64,
    /// Segments of connections that had already ended, dropped (and
    /// but for a RST answered with one, when a split ended).
    pub after_close: u64,
    /// Of those, the ones answered with a RST (as a closed port answers).
    #[serde(default)]
    pub after_close_resets: u64,
    /// Segments dropped: bad TCP checksum, malformed options.
    pub bad_checksum: u64,
    pub bad_options: u64,
    /// Of split connections, ended and live (a live one's so far):
    /// retransmissions, challenge ACKs, bytes that contradicted bytes
    /// already received, segments outside the window, PAWS drops.
    pub retransmits: u64,
    pub challenge_acks: u64,
    /// ACKs not sent for refused segments without data (over the limit of
    /// a few per half second per connection, RFC 5961 §10).
    #[serde(default)]
    pub acks_rate_limited: u64,
    pub overlap_conflicts: u64,
    pub out_of_window: u64,
    pub duplicates: u64,
    pub paws_drops: u64,
    /// Bytes relayed client to server and back (ended and live connections).
    pub bytes_c2s: u64,
    pub bytes_s2c: u64,
    /// Connections whose first client bytes were held for a decision; of
    /// the decisions: complete ClientHellos, other first bytes, servers
    /// that spoke first, and connections the policy passed (released).
    #[serde(default)]
    pub held: u64,
    #[serde(default)]
    pub hellos: u64,
    #[serde(default)]
    pub not_tls: u64,
    #[serde(default)]
    pub server_first: u64,
    #[serde(default)]
    pub policy_pass: u64,
    /// Holds given up, released unchanged: no decision in time, or more
    /// held bytes than the bound.
    #[serde(default)]
    pub hold_timeouts: u64,
    /// Of the holds given up on timeout, those still missing the client's
    /// first bytes (lost before the engine and not resent in time, or
    /// withheld by the client); the others had a ClientHello begun and not
    /// finished.
    #[serde(default)]
    pub hold_timeouts_start_missing: u64,
    #[serde(default)]
    pub hold_overflows: u64,
    /// ACKs sent as the server during a hold, for ClientHellos larger
    /// than the client's initial window.
    #[serde(default)]
    pub hold_acks: u64,
    /// Duplicate ACKs sent as the server during a hold, with SACK blocks
    /// where agreed, when bytes before the held ones were missing (so the
    /// client resends them within a round trip, not at its timeout).
    #[serde(default)]
    pub hold_sacks: u64,
    /// Segments dropped before the decision because their receiver would
    /// refuse them, or read from them what the engine cannot follow (no
    /// ACK flag, an ACK of unsent data, a stale timestamp or echo, past
    /// the window, a segment that does not fit the handshake).
    #[serde(default)]
    pub hold_refused: u64,
    /// Holds in which a byte came twice with different values: such a
    /// connection is relayed, never passed to the fast path.
    #[serde(default)]
    pub hold_conflicts: u64,
    /// Of the retransmissions: retransmission timeouts, fast retransmits
    /// (duplicate ACKs, partial ACKs), and retransmissions found lost
    /// (later data SACKed) and sent again.
    #[serde(default)]
    pub timeouts: u64,
    #[serde(default)]
    pub fast_retransmits: u64,
    #[serde(default)]
    pub lost_retransmits: u64,
    /// Tail loss probes sent.
    #[serde(default)]
    pub tail_probes: u64,
    /// `decrypt` decisions that went to TLS interception, and those the
    /// profile or the exclusion cache left encrypted (released).
    #[serde(default)]
    pub intercepted: u64,
    #[serde(default)]
    pub not_decrypted: u64,
    /// Connections refused by a `block` rule.
    #[serde(default)]
    pub refused: u64,
    /// Flow-log records lost because the engine's queue was full.
    #[serde(default)]
    pub log_dropped: u64,
    /// When the engine stopped: connections reset on both sides (live
    /// splits past the drain deadline, and holds), and frames of new
    /// connections dropped while it drained.
    #[serde(default)]
    pub stopped: u64,
    #[serde(default)]
    pub refused_stopping: u64,
    /// ClientHellos whose server name was malformed (decided without it).
    #[serde(default)]
    pub sni_malformed: u64,
    /// TLS handshake records whose ClientHello did not parse (decided
    /// without a name, never decrypted).
    #[serde(default)]
    pub hello_malformed: u64,
    /// Of splits, ended and live, both halves: segments received with data, and
    /// segments sent without (pure ACKs, window updates).
    #[serde(default)]
    pub data_segments_in: u64,
    #[serde(default)]
    pub pure_acks_out: u64,
    /// RSTs during the hold that their receiver would not take, dropped.
    #[serde(default)]
    pub bogus_resets: u64,
    /// Handshakes with a window shift above 14, used as 14 (RFC 7323
    /// §2.3: the peer does the same).
    #[serde(default)]
    pub wscale_clamped: u64,
    /// New connections not split (passed, or under `decrypt` handled by
    /// the profile's `no_resources`) because the buffer memory budget was
    /// spent.
    #[serde(default)]
    pub memory_passthrough: u64,
    /// Of splits' halves, ended and live: window reductions taken back because every
    /// retransmission was DSACKed (reordering, not loss), and DSACKs
    /// received.
    #[serde(default)]
    pub spurious_undone: u64,
    #[serde(default)]
    pub dsacks_in: u64,
    /// DSACK blocks the halves sent (duplicates they received), and data
    /// segments they sent with SACK blocks (RFC 2018 §4: on every ACK
    /// while blocks are held, data segments shortened to fit them).
    #[serde(default)]
    pub dsacks_out: u64,
    #[serde(default)]
    pub sacks_on_data: u64,
    /// The live splits' buffer sizes now, summed (they grow by autotuning
    /// within `--split-memory-mib`).
    #[serde(default)]
    pub buffer_capacity: u64,
    /// What the hold and the decision cost the worker on the segment that
    /// completed a ClientHello (its parse, the policy, the release or the
    /// takeover): decisions by the bucket of [`DECISION_BUCKETS_US`] they
    /// fall in (the last one: above the others).
    #[serde(default)]
    pub decision_us: [u64; DECISION_BUCKETS],
}

/// Upper bounds (µs) of the decision-cost buckets of [`SplitCounters`].
pub const DECISION_BUCKETS_US: [u64; DECISION_BUCKETS - 1] = [5, 10, 20, 50, 100, 200, 500];
pub const DECISION_BUCKETS: usize = 8;

impl SplitCounters {
    /// Counts a decision that cost `took`.
    pub fn count_decision(&mut self, took: std::time::Duration) {
        let us = took.as_micros() as u64;
        let i = DECISION_BUCKETS_US
            .iter()
            .position(|b| us <= *b)
            .unwrap_or(DECISION_BUCKETS - 1);
        self.decision_us[i] += 1;
    }

    /// The bound the median decision cost is within (µs; `None` with no
    /// decision, or a median above the last bound).
    pub fn decision_p50_within_us(&self) -> Option<u64> {
        let n: u64 = self.decision_us.iter().sum();
        let mut seen = 0;
        for (i, c) in self.decision_us.iter().enumerate() {
            seen += c;
            if n > 0 && seen * 2 >= n {
                return DECISION_BUCKETS_US.get(i).copied();
            }
        }
        None
    }
}

impl SplitCounters {
    /// Adds another worker's counters to these.
    pub fn add(&mut self, o: &SplitCounters) {
        self.split += o.split;
        self.active += o.active;
        self.closed += o.closed;
        self.aborted += o.aborted;
        self.resets_received += o.resets_received;
        self.timed_out += o.timed_out;
        self.passthrough += o.passthrough;
        self.syn_stripped += o.syn_stripped;
        self.urgent_cleared += o.urgent_cleared;
        self.handshakes_adopted += o.handshakes_adopted;
        self.handshakes_unusable += o.handshakes_unusable;
        self.handshakes_before += o.handshakes_before;
        self.released += o.released;
        self.table_full += o.table_full;
        self.uninspectable += o.uninspectable;
        self.syns_on_live += o.syns_on_live;
        self.mid_flow_unlogged += o.mid_flow_unlogged;
        self.evicted += o.evicted;
        self.expired += o.expired;
        self.after_close += o.after_close;
        self.after_close_resets += o.after_close_resets;
        self.bad_checksum += o.bad_checksum;
        self.bad_options += o.bad_options;
        self.retransmits += o.retransmits;
        self.challenge_acks += o.challenge_acks;
        self.acks_rate_limited += o.acks_rate_limited;
        self.overlap_conflicts += o.overlap_conflicts;
        self.out_of_window += o.out_of_window;
        self.duplicates += o.duplicates;
        self.paws_drops += o.paws_drops;
        self.bytes_c2s += o.bytes_c2s;
        self.bytes_s2c += o.bytes_s2c;
        self.held += o.held;
        self.hellos += o.hellos;
        self.not_tls += o.not_tls;
        self.hello_malformed += o.hello_malformed;
        self.data_segments_in += o.data_segments_in;
        self.pure_acks_out += o.pure_acks_out;
        self.server_first += o.server_first;
        self.policy_pass += o.policy_pass;
        self.hold_timeouts += o.hold_timeouts;
        self.hold_timeouts_start_missing += o.hold_timeouts_start_missing;
        self.hold_overflows += o.hold_overflows;
        self.hold_acks += o.hold_acks;
        self.hold_sacks += o.hold_sacks;
        self.hold_refused += o.hold_refused;
        self.hold_conflicts += o.hold_conflicts;
        self.timeouts += o.timeouts;
        self.fast_retransmits += o.fast_retransmits;
        self.lost_retransmits += o.lost_retransmits;
        self.tail_probes += o.tail_probes;
        self.refused += o.refused;
        self.log_dropped += o.log_dropped;
        self.stopped += o.stopped;
        self.refused_stopping += o.refused_stopping;
        self.sni_malformed += o.sni_malformed;
        self.bogus_resets += o.bogus_resets;
        self.wscale_clamped += o.wscale_clamped;
        self.memory_passthrough += o.memory_passthrough;
        self.spurious_undone += o.spurious_undone;
        self.dsacks_in += o.dsacks_in;
        self.dsacks_out += o.dsacks_out;
        self.sacks_on_data += o.sacks_on_data;
        self.buffer_capacity += o.buffer_capacity;
        for (a, b) in self.decision_us.iter_mut().zip(o.decision_us) {
            *a += b;
        }
        self.intercepted += o.intercepted;
        self.not_decrypted += o.not_decrypted;
    }
}

#[cfg(test)]
mod split_counter_tests {
    use super::SplitCounters;

    #[test]
    fn decision_costs_fall_in_their_buckets_and_give_a_median_bound() {
        use std::time::Duration;
        let mut c = SplitCounters::default();
        assert_eq!(c.decision_p50_within_us(), None);
        for us in [3, 5, 6, 15, 15, 15, 700] {
            c.count_decision(Duration::from_micros(us));
        }
        assert_eq!(c.decision_us, [2, 1, 3, 0, 0, 0, 0, 1]);
        // 7 decisions: the 4th is in the 20 µs bucket.
        assert_eq!(c.decision_p50_within_us(), Some(20));
        let mut slow = SplitCounters::default();
        slow.count_decision(Duration::from_millis(2));
        assert_eq!(slow.decision_p50_within_us(), None);
    }

    #[test]
    fn adding_workers_counters_sums_every_field() {
        // Every field at 1, through serde (so a field added later is in).
        let mut v = serde_json::to_value(SplitCounters::default()).unwrap();
        for (_, f) in v.as_object_mut().unwrap().iter_mut() {
            match f {
                serde_json::Value::Array(a) => a.iter_mut().for_each(|x| *x = 1.into()),
                _ => *f = 1.into(),
            }
        }
        let one: SplitCounters = serde_json::from_value(v).unwrap();
        let mut sum = SplitCounters::default();
        sum.add(&one);
        sum.add(&one);
        let sum = serde_json::to_value(sum).unwrap();
        for (name, f) in sum.as_object().unwrap() {
            match f {
                serde_json::Value::Array(a) => {
                    assert!(a.iter().all(|x| x == 2), "field {name} is not summed")
                }
                _ => assert_eq!(f, 2, "field {name} is not summed"),
            }
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct WorkerReport {
    pub id: usize,
    pub queue: u32,
    /// CPU the worker is pinned to, when pinning succeeded.
    pub cpu: Option<usize>,
    pub counters: WorkerCounters,
    pub xsk_inside: SideStats,
    pub xsk_outside: SideStats,
    pub flows_active: usize,
    /// Frames waiting for TX or for their completion (a gauge).
    #[serde(default)]
    pub tx_pending: usize,
    /// The tcp-split action (zero when it is off).
    #[serde(default)]
    pub split: SplitCounters,
    /// Owned flows, oldest first, at most `FLOWS_LISTED` of them (with
    /// more, the connections past their handshake first, then the flows
    /// that exchanged the most: `FlowTable::snapshot`).
    pub flows: Vec<FlowSummary>,
}

impl From<&crate::policy::Steering> for SteeringReport {
    fn from(s: &crate::policy::Steering) -> Self {
        let text = |ps: &[crate::policy::Prefix]| ps.iter().map(|p| p.to_string()).collect();
        SteeringReport {
            ports: s.ports.clone(),
            prefixes: text(&s.prefixes),
            exempt: text(&s.exempt),
            quic_blocked: text(&s.quic),
        }
    }
}

/// The running policy, as a status shows it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PolicyInfo {
    pub version: u64,
    pub digest: String,
    pub source: String,
    pub rules: usize,
    pub default_action: String,
}

/// Flow log records waiting in the dataplane for the control process.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct LogQueueReport {
    pub backlog: u64,
    /// Records lost to a full backlog (control away too long).
    pub dropped: u64,
    /// A control process receives them now.
    pub subscribed: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct IfaceReport {
    pub name: String,
    pub ifindex: u32,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SteeringReport {
    pub ports: Vec<u16>,
    pub prefixes: Vec<String>,
    pub exempt: Vec<String>,
    /// Destinations QUIC (UDP/443) is dropped to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quic_blocked: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct StatsReport {
    pub version: u32,
    /// "running" while the engine runs, "stopped" in the final report.
    pub state: String,
    pub pid: u32,
    pub uptime_ms: u64,
    pub xdp_mode: String,
    pub program_id: Option<u32>,
    pub inside: IfaceReport,
    pub outside: IfaceReport,
    pub steering: SteeringReport,
    /// XDP program counters by label (see loupe_common::Counter).
    pub xdp: BTreeMap<String, SideCount>,
    pub workers: Vec<WorkerReport>,
    /// Health and counters of each HSM token (empty without an HSM).
    #[serde(default)]
    pub hsm: Vec<loupe_hsm::signer::TokenHealth>,
    /// The key-usage audit log's writer (none without an HSM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<loupe_hsm::audit::AuditHealth>,
    /// The policy deciding new connections (none: steered flows are only
    /// observed and forwarded).
    #[serde(default)]
    pub policy: Option<PolicyInfo>,
    /// Filled in by the control socket.
    #[serde(default)]
    pub log_queue: LogQueueReport,
    /// TLS interception (none without an HSM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsReport>,
}

/// TLS interception's counters, all workers together.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TlsReport {
    /// The CA generation minting (0: no CA, decryption unavailable).
    pub ca_generation: u32,
    /// Each token's CA generation, when the engine has several (tenants).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub ca_generations: std::collections::BTreeMap<String, u32>,
    /// Connections in the TLS stage now, and waiting for the HSM.
    pub active: u64,
    pub parked: u64,
    /// Handshakes by outcome: decrypted (trusted upstream), decrypted with
    /// the problem passed on (forward-untrust), blocked, left encrypted
    /// (excluded from now on), failed.
    pub decrypted: u64,
    pub passed_on: u64,
    pub blocked: u64,
    pub no_decrypt: u64,
    pub failed: u64,
    /// The certificate cache: held, hits, misses (mints started), lookups
    /// that joined a mint in flight, mints done, failed, evicted.
    pub cached: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub cache_joined: u64,
    pub minted: u64,
    pub mint_failed: u64,
    pub cache_evicted: u64,
    /// Mint latency: counts per bucket (upper bounds in µs, the last
    /// unbounded) and the sum.
    pub mint_bounds_us: Vec<u64>,
    pub mint_counts: Vec<u64>,
    pub mint_sum_us: u64,
    /// Sites in the decryption exclusion cache, added so far, and the
    /// connections passed because of them.
    pub excluded: u64,
    pub exclusions_added: u64,
    pub exclusion_hits: u64,
    /// The decrypted-plaintext exporter (none when off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export: Option<crate::export::ExportReport>,
}

impl TlsReport {
    pub fn of(ctx: &crate::tls::context::TlsContext) -> TlsReport {
        use std::sync::atomic::Ordering::Relaxed;
        let s = &ctx.stats;
        let c = &ctx.cache.stats;
        TlsReport {
            ca_generation: ctx.cas().generation,
            ca_generations: ctx.ca_generations(),
            active: s.active.load(Relaxed),
            parked: s.parked.load(Relaxed),
            decrypted: s.decrypted.load(Relaxed),
            passed_on: s.passed_on.load(Relaxed),
            blocked: s.blocked.load(Relaxed),
            no_decrypt: s.no_decrypt.load(Relaxed),
            failed: s.failed.load(Relaxed),
            cached: ctx.cache.len() as u64,
            cache_hits: c.hits.load(Relaxed),
            cache_misses: c.misses.load(Relaxed),
            cache_joined: c.joined.load(Relaxed),
            minted: c.minted.load(Relaxed),
            mint_failed: c.failed.load(Relaxed),
            cache_evicted: c.evicted.load(Relaxed),
            mint_bounds_us: crate::tls::context::MINT_BUCKETS_US.to_vec(),
            mint_counts: s.mint_latency.iter().map(|b| b.load(Relaxed)).collect(),
            mint_sum_us: s.mint_sum_us.load(Relaxed),
            excluded: ctx.exclusions.list().len() as u64,
            exclusions_added: ctx.exclusions.added.load(Relaxed),
            exclusion_hits: ctx.exclusions.hits.load(Relaxed),
            export: ctx.export.as_ref().map(|e| e.report()),
        }
    }
}

impl StatsReport {
    pub fn xdp_packets(&self, label: &str) -> u64 {
        self.xdp.get(label).map_or(0, |c| c.packets)
    }

    /// The tcp-split counters of all workers together.
    pub fn split_total(&self) -> SplitCounters {
        let mut t = SplitCounters::default();
        for w in &self.workers {
            t.add(&w.split);
        }
        t
    }

    /// Sum of one worker counter over all workers.
    pub fn worker_sum(&self, f: impl Fn(&WorkerCounters) -> u64) -> u64 {
        self.workers.iter().map(|w| f(&w.counters)).sum()
    }

    /// Writes the report to `path` through a temporary file and a rename.
    /// It lists flows (addresses, server names): mode 0640, owned by
    /// `group` (the control socket's) when given, readable by nobody else.
    pub fn write_atomic(&self, path: &Path, group: Option<u32>) -> io::Result<()> {
        use std::{
            io::Write as _,
            os::unix::fs::{OpenOptionsExt, PermissionsExt},
        };
        let tmp = path.with_extension("tmp");
        let json = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        // A leftover from a crash may carry other permissions: start over.
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o640)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        // The umask may have taken bits the mode asked for: set it whole.
        f.set_permissions(std::fs::Permissions::from_mode(0o640))?;
        if let Some(gid) = group {
            std::os::unix::fs::fchown(&f, None, Some(gid))?;
        }
        f.write_all(&json)?;
        drop(f);
        std::fs::rename(&tmp, path)
    }

    pub fn read(path: &Path) -> io::Result<StatsReport> {
        let bytes = std::fs::read(path)?;
        serde_json::from_slice(&bytes).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is not a loupe stats file: {e}", path.display()),
            )
        })
    }

    /// A human-readable summary.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "loupe dataplane (pid {}, {}, up {:.1}s): {} -> {} in XDP {} mode, program id {}",
            self.pid,
            self.state,
            self.uptime_ms as f64 / 1000.0,
            self.inside.name,
            self.outside.name,
            self.xdp_mode,
            self.program_id.map_or("?".into(), |i| i.to_string()),
        );
        let _ = writeln!(
            s,
            "steering: tcp ports {:?}, prefixes [{}], exempt [{}]",
            self.steering.ports,
            self.steering.prefixes.join(", "),
            self.steering.exempt.join(", ")
        );
        match &self.policy {
            Some(p) => {
                let _ = writeln!(
                    s,
                    "policy: version {} from {} ({} rules, default {}), digest {}",
                    p.version,
                    p.source,
                    p.rules,
                    p.default_action,
                    p.digest.chars().take(12).collect::<String>()
                );
            }
            None => {
                let _ = writeln!(s, "policy: none (steered flows are forwarded unchanged)");
            }
        }
        let _ = writeln!(s, "\nXDP paths            packets          bytes");
        for (label, c) in &self.xdp {
            if c.packets > 0 || label == "rx" || label == "steer" {
                let _ = writeln!(s, "  {label:<16} {:>10} {:>14}", c.packets, c.bytes);
            }
        }
        let _ = writeln!(
            s,
            "\nworker queue cpu  rx(in/out)        tx(in/out)        cross(out/in/full) unparsed flows"
        );
        for w in &self.workers {
            let c = &w.counters;
            let _ = writeln!(
                s,
                "  {:<4} {:<5} {:<4} {:>8}/{:<8} {:>8}/{:<8} {:>6}/{}/{} {:>10} {:>5}",
                w.id,
                w.queue,
                w.cpu.map_or("-".into(), |c| c.to_string()),
                c.rx_inside.packets,
                c.rx_outside.packets,
                c.tx_inside.packets,
                c.tx_outside.packets,
                c.cross_out,
                c.cross_in,
                c.cross_full,
                c.unparsed,
                w.flows_active,
            );
        }
        let drops: u64 = self
            .workers
            .iter()
            .map(|w| {
                w.counters.cross_full
                    + w.counters.no_free_frame
                    + w.counters.unsendable
                    + w.xsk_inside.rx_lost()
                    + w.xsk_outside.rx_lost()
            })
            .sum();
        let _ = writeln!(s, "drops in userspace and AF_XDP rings: {drops}");
        let backoffs: u64 = self.workers.iter().map(|w| w.counters.idle_backoffs).sum();
        if backoffs > 0 {
            let _ = writeln!(
                s,
                "idle polling (--idle-spin-us) stopped {backoffs} times: other threads took a worker's CPU"
            );
        }
        // Records for the control process: only the control socket knows
        // the queue (a stats file has none of it).
        let q = &self.log_queue;
        let lost = q.dropped + self.split_total().log_dropped;
        if q.subscribed || q.backlog > 0 || lost > 0 {
            let _ = writeln!(
                s,
                "flow records: {} waiting for control ({}), {lost} dropped (queue full)",
                q.backlog,
                if q.subscribed {
                    "control subscribed"
                } else {
                    "no control process"
                }
            );
        }
        let sp = self.split_total();
        if sp.split + sp.passthrough > 0 {
            let _ = writeln!(
                s,
                "tcp-split: {} split ({} active, {} ended, {} aborted halves), {} passed \
                 through ({} released to XDP), {} forgotten when full, {}/{} bytes relayed c->s/s->c, {} retransmits \
                 ({} timeouts, {} fast, {} lost again, {} tail probes, {} reductions undone), \
                 {} DSACKs and {} data segments with SACK blocks sent, {} conflicting overlaps, {}/{} bad checksums/options, \
                 {} challenge ACKs ({} more answers to refused segments held back), {} segments after the end ({} answered with a RST); \
                 {} taken up from handshakes XDP recorded ({} records unusable, {} from before the policy); decisions: {} held, {} \
                 ClientHellos, {} other, {} server first, {} passed by policy, {} refused ({} \
                 of them reset as not inspectable: seen mid-flow, evicted or no room, under \
                 --mid-flow drop; {} of their records not written, over 100 a second), {} SYNs on a live connection's ports it went on from, {}/{} \
                 holds decided without a name on timeout/bound ({} of the timeouts missing \
                 the client's first bytes), {} ACKs of large ClientHellos, {} duplicate \
                 ACKs for missing first bytes, {} held segments the server would refuse dropped, \
                 {} holds with conflicting bytes relayed, {}/{} SYNs/segments normalised \
                 (data, Fast Open, URG), {} window shifts above 14 used as 14; buffers {} KiB, {} not split for memory; \
                 decisions cost the worker {} at the median",
                sp.split,
                sp.active,
                sp.closed,
                sp.aborted,
                sp.passthrough,
                sp.released,
                sp.evicted,
                sp.bytes_c2s,
                sp.bytes_s2c,
                sp.retransmits,
                sp.timeouts,
                sp.fast_retransmits,
                sp.lost_retransmits,
                sp.tail_probes,
                sp.spurious_undone,
                sp.dsacks_out,
                sp.sacks_on_data,
                sp.overlap_conflicts,
                sp.bad_checksum,
                sp.bad_options,
                sp.challenge_acks,
                sp.acks_rate_limited,
                sp.after_close,
                sp.after_close_resets,
                sp.handshakes_adopted,
                sp.handshakes_unusable,
                sp.handshakes_before,
                sp.held,
                sp.hellos,
                sp.not_tls,
                sp.server_first,
                sp.policy_pass,
                sp.refused,
                sp.uninspectable,
                sp.mid_flow_unlogged,
                sp.syns_on_live,
                sp.hold_timeouts,
                sp.hold_overflows,
                sp.hold_timeouts_start_missing,
                sp.hold_acks,
                sp.hold_sacks,
                sp.hold_refused,
                sp.hold_conflicts,
                sp.syn_stripped,
                sp.urgent_cleared,
                sp.wscale_clamped,
                sp.buffer_capacity >> 10,
                sp.memory_passthrough,
                match (sp.decision_p50_within_us(), sp.decision_us.iter().sum::<u64>()) {
                    (_, 0) => "nothing yet".to_string(),
                    (Some(b), _) => format!("at most {b} µs"),
                    (None, _) => format!("over {} µs", DECISION_BUCKETS_US[DECISION_BUCKETS - 2]),
                }
            );
        }
        for h in &self.hsm {
            let _ = writeln!(
                s,
                "HSM token {:?}: {}, queue {}, signed {}, failed {}, timed out {}, refused \
                 (full/down) {}/{}, recoveries {}{}",
                h.token,
                if h.up { "up" } else { "DOWN" },
                h.queue_depth,
                h.signed,
                h.failed,
                h.timed_out,
                h.rejected_full,
                h.rejected_down,
                h.recoveries,
                h.last_error
                    .as_ref()
                    .map_or(String::new(), |e| format!(", last error: {e}"))
            );
        }
        if let Some(a) = &self.audit {
            let _ = writeln!(
                s,
                "audit log {}: {}, {} records pending, {} failed writes, {} recoveries{}",
                a.path,
                if a.failing {
                    "FAILING (records kept in memory, retried)"
                } else {
                    "writing"
                },
                a.pending,
                a.write_errors,
                a.recoveries,
                a.last_error
                    .as_ref()
                    .map_or(String::new(), |e| format!(", last error: {e}"))
            );
        }
        if let Some(t) = &self.tls {
            let _ = writeln!(
                s,
                "decrypt: CA generation {}{}, {} active ({} waiting for the HSM); handshakes: \
                 {} decrypted, {} passed on untrusted, {} blocked, {} left encrypted, {} failed; \
                 certificates: {} cached, {} hits, {} misses, {} joined, {} mint failures; \
                 {} sites excluded",
                t.ca_generation,
                if t.ca_generations.len() > 1 {
                    let each: Vec<String> = t
                        .ca_generations
                        .iter()
                        .map(|(token, g)| format!("{token} g{g}"))
                        .collect();
                    format!(" (by token: {})", each.join(", "))
                } else {
                    String::new()
                },
                t.active,
                t.parked,
                t.decrypted,
                t.passed_on,
                t.blocked,
                t.no_decrypt,
                t.failed,
                t.cached,
                t.cache_hits,
                t.cache_misses,
                t.cache_joined,
                t.mint_failed,
                t.excluded
            );
            if let Some(e) = &t.export {
                let mut to = Vec::new();
                if let Some(d) = &e.pcap_dir {
                    to.push(format!(
                        "pcapng in {d} ({} frames, {} files, {} bytes on disk, {} write errors, \
                         {} frames lost)",
                        e.pcap_packets,
                        e.pcap_files_opened,
                        e.pcap_disk_bytes,
                        e.pcap_write_errors,
                        e.pcap_frames_lost
                    ));
                }
                if let Some(m) = &e.mirror {
                    to.push(format!(
                        "mirror port {m} ({} frames, {} not taken)",
                        e.mirror_frames, e.mirror_dropped
                    ));
                }
                let _ = writeln!(
                    s,
                    "export: {} connections to {}; {} chunks ({} bytes) dropped",
                    e.connections,
                    to.join(" and "),
                    e.events_dropped,
                    e.bytes_dropped
                );
            }
        }
        let mut flows: Vec<&FlowSummary> = self.workers.iter().flat_map(|w| &w.flows).collect();
        if !flows.is_empty() {
            // The connections past their handshake, then the flows that
            // exchanged the most, of every worker's.
            flows.sort_by_key(|f| {
                let opened = f
                    .decision
                    .as_ref()
                    .is_some_and(|d| !matches!(d.state.as_str(), "handshake" | "reset"));
                std::cmp::Reverse((opened, f.exchanged()))
            });
            let _ = writeln!(
                s,
                "\nflows, most exchanged first (client -> server: packets in/out, bytes in/out)"
            );
            for f in flows.iter().take(FLOWS_SHOWN) {
                let _ = writeln!(
                    s,
                    "  {} -> {}: {}/{} pkts, {}/{} bytes",
                    f.client,
                    f.server,
                    f.inside.packets,
                    f.outside.packets,
                    f.inside.bytes,
                    f.outside.bytes
                );
            }
            let active: usize = self.workers.iter().map(|w| w.flows_active).sum();
            let active = active.max(flows.len());
            if active > FLOWS_SHOWN {
                let _ = writeln!(
                    s,
                    "  ... {} more active ({} of them listed in the JSON)",
                    active - FLOWS_SHOWN,
                    flows.len().saturating_sub(FLOWS_SHOWN)
                );
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_a_file() {
        let dir = std::env::temp_dir().join(format!("loupe-stats-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("stats.json");
        let mut r = StatsReport {
            version: STATS_VERSION,
            state: "running".into(),
            ..Default::default()
        };
        r.xdp.insert(
            "steer".into(),
            SideCount {
                packets: 3,
                bytes: 180,
            },
        );
        r.workers.push(WorkerReport::default());
        // A leftover temporary file open to all does not lend its mode.
        std::fs::write(path.with_extension("tmp"), "old").unwrap();
        std::fs::set_permissions(
            path.with_extension("tmp"),
            std::os::unix::fs::PermissionsExt::from_mode(0o666),
        )
        .unwrap();
        r.write_atomic(&path, None).unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o640, "it lists flows: not world-readable");
        let back = StatsReport::read(&path).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.xdp_packets("steer"), 3);
        assert!(back.render().contains("steer"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// `loupe status` shows the flow records waiting for control and
    /// those lost, from the queue and from the workers' channel.
    #[test]
    fn the_report_shows_the_flow_record_queue_and_its_drops() {
        let mut r = StatsReport::default();
        assert!(!r.render().contains("flow records"), "{}", r.render());
        r.log_queue.backlog = 100_000;
        r.log_queue.dropped = 7;
        let mut w = WorkerReport::default();
        w.split.log_dropped = 2;
        r.workers.push(w);
        let text = r.render();
        assert!(
            text.contains(
                "flow records: 100000 waiting for control (no control process), 9 dropped"
            ),
            "{text}"
        );
    }

    /// The drops line counts frames lost to a full RX ring, which the
    /// kernel counts apart from `rx_dropped`.
    #[test]
    fn the_drops_line_counts_a_full_rx_ring() {
        let mut w = WorkerReport::default();
        w.counters.cross_full = 1;
        w.xsk_inside.rx_dropped = 10;
        w.xsk_inside.rx_ring_full = 200;
        // The same dry fill ring as rx_dropped: not counted twice.
        w.xsk_inside.rx_fill_ring_empty_descs = 10;
        w.xsk_outside.rx_ring_full = 3000;
        let mut r = StatsReport::default();
        r.workers.push(w);
        let text = r.render();
        assert!(
            text.contains("drops in userspace and AF_XDP rings: 3211"),
            "{text}"
        );
    }

    /// `loupe stats` says when idle polling found its CPU shared.
    #[test]
    fn the_report_shows_idle_polling_backoffs() {
        let mut r = StatsReport::default();
        r.workers.push(WorkerReport::default());
        assert!(!r.render().contains("idle polling"), "{}", r.render());
        for n in [3, 4] {
            let mut w = WorkerReport::default();
            w.counters.idle_backoffs = n;
            r.workers.push(w);
        }
        let text = r.render();
        assert!(
            text.contains("idle polling (--idle-spin-us) stopped 7 times"),
            "{text}"
        );
    }

    /// The text shows the connections past their handshake first, then
    /// the flows that exchanged the most, whichever worker lists them,
    /// and counts the rest from the active flows, not from those listed.
    #[test]
    fn the_report_shows_the_busiest_flows_and_counts_the_rest() {
        let flow = |port: u16, packets: u64, state: &str| FlowSummary {
            client: format!("198.18.0.1:{port}"),
            server: "198.18.0.2:443".into(),
            proto: 6,
            inside: SideCount {
                packets,
                bytes: 1000 * packets,
            },
            outside: SideCount {
                packets,
                bytes: 60 * packets,
            },
            age_ms: 0,
            idle_ms: 0,
            decision: Some(crate::flow::FlowDecision {
                state: state.into(),
                ..Default::default()
            }),
        };
        let mut w0 = WorkerReport {
            flows_active: 5000,
            ..Default::default()
        };
        // A flood of handshakes, each answered a few times.
        w0.flows = (1000..1030).map(|p| flow(p, 4, "handshake")).collect();
        let mut w1 = WorkerReport {
            flows_active: 3,
            ..Default::default()
        };
        w1.flows = vec![flow(7, 2, "split")];
        let r = StatsReport {
            workers: vec![w0, w1],
            ..Default::default()
        };
        let text = r.render();
        let first = text
            .lines()
            .skip_while(|l| !l.starts_with("flows, most exchanged first"))
            .nth(1)
            .unwrap_or_else(|| panic!("no flows: {text}"));
        assert!(first.contains("198.18.0.1:7 "), "{text}");
        let more = format!(
            "... {} more active ({} of them listed in the JSON)",
            5003 - FLOWS_SHOWN,
            31 - FLOWS_SHOWN
        );
        assert!(text.contains(&more), "{text}");
    }

    #[test]
    fn garbage_is_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("loupe-stats-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("stats.json");
        std::fs::write(&path, b"{nope").unwrap();
        let e = StatsReport::read(&path).unwrap_err().to_string();
        assert!(e.contains("not a loupe stats file"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
