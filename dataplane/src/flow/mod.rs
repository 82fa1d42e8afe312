//! Flows: their direction-free identity, which worker owns each one, and the
//! per-worker table with idle expiry on a timer wheel. Knows nothing of
//! sockets or TLS.

pub mod log;
pub mod shard;
pub mod table;
pub mod wheel;

pub use log::{
    AnomalyLog, CertLog, FlowDecision, FlowLogEntry, HttpLog, MapOp, RecordKind, SignatureLog,
    TlsError, TlsLog, TlsSide,
};
pub use shard::{FlowId, Sharder};
pub use table::{FlowSummary, FlowTable, Observed, Side};
