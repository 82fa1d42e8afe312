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
///
/// What the inspectors of a decrypted connection find comes as records of
/// their own ([`FlowLogEntry::record`]: one per HTTP request, signature
/// match or anomaly), with their connection's endpoints, decision and
/// [`FlowLogEntry::conn`], before the connection's own record.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowLogEntry {
    /// Wall-clock milliseconds since the Unix epoch: the SYN, and the
    /// moment of this record.
    pub start_ms: u64,
    pub end_ms: u64,
    /// `198.18.0.1:40000` or `[2001:2::1]:40000`.
    pub client: String,
    pub server: String,
    /// The connection's number in this engine run: the same in its own
    /// record and in those of its requests and matches.
    #[serde(default)]
    pub conn: u64,
    /// Absent for a connection's record; else what this record is of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<RecordKind>,
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
    /// (Connection records.) How it ended here: `closed`, `client-reset`, `server-reset`,
    /// `timeout`, `blocked`, `bypass` (handed to the XDP fast path),
    /// `hold-timeout`, `hold-overflow`, `passthrough` (not splittable),
    /// `evicted`, `engine-stopped` (reset on both sides when the engine
    /// stopped).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub end: String,
    /// A remark, e.g. why a `decrypt` connection was not decrypted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// The ClientHello's server name was malformed (two names, a NUL or
    /// non-ASCII byte, a repeated extension, not a DNS name): why. The
    /// connection was decided without the name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni_malformed: Option<String>,
    /// The decryption log: what the TLS stage did (decrypt connections).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Box<TlsLog>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<Box<HttpLog>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<SignatureLog>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anomaly: Option<AnomalyLog>,
}

/// What a record other than a connection's is of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RecordKind {
    /// An HTTP request and its response ([`FlowLogEntry::http`]).
    Http,
    /// A content signature matched ([`FlowLogEntry::signature`]).
    Signature,
    /// An inspector stopped on a stream that broke its protocol or a
    /// bound ([`FlowLogEntry::anomaly`]).
    Anomaly,
}

impl RecordKind {
    pub fn label(self) -> &'static str {
        match self {
            RecordKind::Http => "http",
            RecordKind::Signature => "signature",
            RecordKind::Anomaly => "anomaly",
        }
    }
}

/// One HTTP request in a decrypted connection.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpLog {
    /// 1 for the connection's first request.
    pub seq: u64,
    pub method: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    pub path: String,
    /// Absent: no response came before the connection ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    pub request_body: u64,
    pub response_body: u64,
    pub duration_ms: u64,
    /// The URL rule that matched the request, and its action (`allow`,
    /// `log`, `block`: answered with a 403 page, never sent on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_rule: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_action: Option<String>,
}

/// A content signature's match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignatureLog {
    pub name: String,
    /// `alert` or `block`.
    pub action: String,
    /// `c2s` or `s2c`.
    pub dir: String,
    /// Where the match starts in that direction's plaintext.
    pub offset: u64,
}

/// Why an inspector stopped looking at a connection.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnomalyLog {
    /// `c2s` or `s2c`.
    pub dir: String,
    pub reason: String,
}

/// One decrypted (or attempted) connection's TLS record.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsLog {
    /// `forward` (SSL forward proxy) or `inbound` (inbound inspection).
    pub mode: String,
    /// The decryption profile.
    pub profile: String,
    /// `decrypted`, `decrypted-untrusted` (a certificate problem passed on
    /// to the client: the forward-untrust CA signed), `blocked`,
    /// `no-decrypt` (excluded from now on), `failed`.
    pub outcome: String,
    /// The client's leg (engine as server).
    pub client: TlsSide,
    /// The server's leg (engine as client).
    pub server: TlsSide,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_cert: Option<CertLog>,
    /// The upstream certificate's problems (`expired`, `untrusted`,
    /// `name-mismatch`, `weak`, `revoked`, `not-yet-valid`); empty when it
    /// checked out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub verdict: Vec<String>,
    /// Why, for each problem (e.g. `untrusted: unknown issuer`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub verdict_detail: Vec<String>,
    /// The CA that signed the impersonation certificate
    /// (`forward-trust/g1`, `forward-untrust-rsa/g2`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
    /// The token that CA is on (the tenant's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_token: Option<String>,
    /// `hit`, `miss` (minted for this connection) or `joined` (a mint in
    /// flight for another one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<String>,
    /// Microseconds this connection waited for its certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mint_wait_us: Option<u64>,
    /// Inbound: the server profile, and its key as `token/label`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_profile: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_key: Option<String>,
    /// Inbound: microseconds the client's handshake spent on the handshake
    /// pool (the server key's signature, or a resumption).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hsm_wait_us: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<TlsError>,
    /// Plaintext bytes inspected each way.
    pub plaintext_c2s: u64,
    pub plaintext_s2c: u64,
}

/// One leg's negotiated parameters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsSide {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suite: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    /// The session was resumed (no full handshake).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resumed: bool,
}

/// The upstream leaf as the log shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertLog {
    pub subject: String,
    pub issuer: String,
    pub sha256: String,
    /// RFC 3339, UTC.
    pub not_after: String,
    pub key: String,
}

/// Where and why the TLS stage failed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsError {
    /// `client-hello`, `upstream-handshake`, `verification`, `mint`,
    /// `downstream-handshake`, `data`.
    pub stage: String,
    pub reason: String,
}

/// The decision beside an active flow in a listing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowDecision {
    /// `handshake`, `holding`, `split`, `bypass`, `refused`, `ended`; for
    /// decrypt connections `handshaking`, `minting` (waiting for the HSM),
    /// `decrypted`, `tls-ended`.
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
    /// Bytes the engine holds for the connection now, and the most it
    /// has held (split connections: what both TCP halves have received
    /// and not yet relayed, in order or not, and have sent and not yet
    /// had acknowledged; at most their four buffers).
    #[serde(default)]
    pub buffered: u64,
    #[serde(default)]
    pub buffered_peak: u64,
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
