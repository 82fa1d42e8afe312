//! What the flow log and listings say of a connection: its decision,
//! its end, and the counters an ended split adds to the worker's.

use std::sync::atomic::{AtomicU64, Ordering};

use super::*;
use crate::{
    flow::{AnomalyLog, HttpLog, RecordKind, SignatureLog, TlsLog},
    inspect::Finding,
};

/// A new connection's number ([`FlowLogEntry::conn`]): unique in this
/// engine run, across workers.
pub(super) fn conn_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A decided connection: what the log and a flow listing say of it.
pub(super) struct Meta {
    pub(super) action: Option<Action>,
    pub(super) rule: String,
    pub(super) sni: Option<String>,
    pub(super) alpn: Vec<String>,
    pub(super) key: FlowKey,
    /// Its number in the log ([`conn_id`]).
    pub(super) conn: u64,
    pub(super) opened: Instant,
    pub(super) policy_version: u64,
    pub(super) held_bytes: u64,
    pub(super) note: Option<String>,
    /// What was wrong with the ClientHello's server name.
    pub(super) sni_malformed: Option<&'static str>,
    /// Its record was sent already (a refused connection's, at the
    /// decision).
    pub(super) logged: bool,
}

/// A connection's record for the flow log.
pub(super) fn log_entry(
    meta: &Meta,
    (c2s, s2c): (u64, u64),
    end: &str,
    tls: Option<&TlsLog>,
) -> FlowLogEntry {
    let end_ms = unix_ms();
    let duration_ms = meta.opened.elapsed().as_millis() as u64;
    FlowLogEntry {
        start_ms: end_ms.saturating_sub(duration_ms),
        end_ms,
        client: endpoint(&meta.key.src, meta.key.src_port),
        server: endpoint(&meta.key.dst, meta.key.dst_port),
        conn: meta.conn,
        sni: meta.sni.clone(),
        alpn: meta.alpn.clone(),
        action: meta.action,
        rule: meta.rule.clone(),
        policy_version: meta.policy_version,
        bytes_c2s: c2s,
        bytes_s2c: s2c,
        duration_ms,
        end: end.into(),
        note: meta.note.clone(),
        sni_malformed: meta.sni_malformed.map(Into::into),
        tls: tls.map(|t| Box::new(t.clone())),
        ..FlowLogEntry::default()
    }
}

/// The record of something an inspector found in `meta`'s connection.
pub(super) fn finding_entry(meta: &Meta, f: Finding) -> FlowLogEntry {
    let now = unix_ms();
    let mut e = FlowLogEntry {
        start_ms: now,
        end_ms: now,
        client: endpoint(&meta.key.src, meta.key.src_port),
        server: endpoint(&meta.key.dst, meta.key.dst_port),
        conn: meta.conn,
        sni: meta.sni.clone(),
        action: meta.action,
        rule: meta.rule.clone(),
        policy_version: meta.policy_version,
        ..FlowLogEntry::default()
    };
    match f {
        Finding::Http(r) => {
            e.record = Some(RecordKind::Http);
            e.start_ms = now.saturating_sub(r.duration_ms);
            e.duration_ms = r.duration_ms;
            e.http = Some(Box::new(HttpLog {
                seq: r.seq,
                method: r.method,
                host: r.host,
                path: r.path,
                status: r.status,
                content_type: r.content_type,
                request_body: r.request_body,
                response_body: r.response_body,
                duration_ms: r.duration_ms,
                url_rule: r.url_rule,
                url_action: r.url_action.map(|a| a.label().to_string()),
            }));
        }
        Finding::Signature(h) => {
            e.record = Some(RecordKind::Signature);
            e.signature = Some(SignatureLog {
                name: h.name.to_string(),
                action: h.action.label().into(),
                dir: h.dir.label().into(),
                offset: h.offset,
            });
        }
        Finding::Anomaly { dir, reason } => {
            e.record = Some(RecordKind::Anomaly);
            e.anomaly = Some(AnomalyLog {
                dir: dir.label().into(),
                reason,
            });
        }
    }
    e
}

/// The end of a connection reset because the engine stopped.
pub(super) const ENGINE_STOPPED: &str = "engine-stopped";

/// Why a split connection ended, for its record.
pub(super) fn end_reason(split: &Split) -> &'static str {
    let (c, s) = (split.client.aborted(), split.server.aborted());
    if split.stopped() {
        ENGINE_STOPPED
    } else if c == Some(Abort::Reset) {
        "client-reset"
    } else if s == Some(Abort::Reset) {
        "server-reset"
    } else if c == Some(Abort::TimedOut) || s == Some(Abort::TimedOut) {
        "timeout"
    } else {
        "closed"
    }
}

/// Adds an ended split connection's totals to the worker's counters.
pub(super) fn absorb(counters: &mut SplitCounters, split: &Split) {
    let (c2s, s2c) = split.relayed();
    counters.bytes_c2s += c2s;
    counters.bytes_s2c += s2c;
    counters.closed += 1;
    add_halves(counters, split);
    for c in [&split.client, &split.server] {
        match c.aborted() {
            Some(Abort::Reset) => counters.resets_received += 1,
            Some(Abort::TimedOut) => counters.timed_out += 1,
            Some(Abort::Local) | None => {}
        }
        if c.aborted().is_some() {
            counters.aborted += 1;
        }
    }
}

/// Adds what a split's two halves counted so far (their TCP work:
/// retransmissions, DSACKs, segments in and ACKs out) to `counters`: for
/// an ended split once, when it ends; for a live one into each snapshot
/// ([`super::Sessions::live`]), so that a long transfer's
/// retransmissions show while it runs.
pub(super) fn add_halves(counters: &mut SplitCounters, split: &Split) {
    for c in [&split.client, &split.server] {
        let s = c.stats();
        counters.retransmits += s.retransmits + s.rto_expirations;
        counters.timeouts += s.rto_expirations;
        counters.fast_retransmits += s.fast_retransmits;
        counters.lost_retransmits += s.lost_retransmits;
        counters.tail_probes += s.tail_probes;
        counters.spurious_undone += s.spurious_undone;
        counters.dsacks_in += s.dsacks_in;
        counters.dsacks_out += s.dsacks_out;
        counters.sacks_on_data += s.sacks_on_data;
        counters.challenge_acks += s.challenge_acks;
        counters.acks_rate_limited += s.acks_rate_limited;
        counters.overlap_conflicts += s.overlap_conflicts;
        counters.out_of_window += s.out_of_window;
        counters.duplicates += s.duplicates;
        counters.paws_drops += s.paws_drops;
        counters.data_segments_in += s.data_in;
        counters.pure_acks_out += s.pure_acks_out;
    }
}
