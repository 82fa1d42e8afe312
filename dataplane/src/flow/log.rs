//! What a worker reports about its flows beyond counters: the record of
//! each decided connection (the control process writes it to the flow and
//! decryption log), the decision shown beside an active flow, and the
//! changes to the XDP flow map a worker asks the engine thread to make.

use loupe_common::FlowKey;
use serde::{Deserialize, Serialize};

use crate::policy::Action;

/// One connection's record, sent when its fate is known: at the decision
/// for `no-decrypt` (the flow then leaves userspace) and `block`, at the
/// end for split connections. Fields the TLS stage adds (per-side version,
/// cipher, group, upstream certificate, verdict) come as further optional
/// fields; readers must ignore fields they do not know.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowLogEntry {
    /// Wall-clock milliseconds since the Unix epoch: the SYN, and the
    /// moment of this record.
    pub start_ms: u64,
    pub end_ms: u64,
    /// `198.18.0.1:40000` or `[2001:2::1]:40000`.
    pub client: String,
    pub server: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alpn: Vec<String>,
    /// The action decided (`None`: the connection never reached a decision
    /// point, see `end`).
    pub action: Option<Action>,
    /// The rule that decided, `(default)`, or why no rule did.
    pub rule: String,
    pub policy_version: u64,
    /// Bytes relayed (split), or held before the decision (others).
    pub bytes_c2s: u64,
    pub bytes_s2c: u64,
    pub duration_ms: u64,
    /// How it ended here: `closed`, `client-reset`, `server-reset`,
    /// `timeout`, `blocked`, `bypass` (handed to the XDP fast path),
    /// `hold-timeout`, `hold-overflow`, `passthrough` (not splittable),
    /// `evicted`.
    pub end: String,
    /// A remark, e.g. that `decrypt` ran as `tcp-split`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// The decision beside an active flow in a listing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowDecision {
    /// `handshake`, `holding`, `split`, `bypass`, `refused`, `ended`.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<Action>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    /// Bytes relayed so far (split connections).
    #[serde(default)]
    pub relayed_c2s: u64,
    #[serde(default)]
    pub relayed_s2c: u64,
}

/// A change to the XDP flow map (both directions of the flow).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapOp {
    /// The flow leaves userspace: forwarded in the kernel from now on.
    Bypass(FlowKey),
    /// The flow stays steered to userspace whatever the steering maps say
    /// (a live split must survive a policy that stops steering its port).
    Steer(FlowKey),
    /// Forget the flow's entry (its split ended).
    Forget(FlowKey),
}

/// Milliseconds since the Unix epoch, now.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
