//! Userspace TCP: the building blocks of taking over live connections.
//! This layer knows nothing of TLS, AF_XDP or workers: it works on sequence
//! numbers, options and byte streams.
//!
//! - [`seq`]: sequence-number arithmetic modulo 2^32 (RFC 9293 §3.4).
//! - [`options`]: TCP options, parsed strictly and emitted (RFC 9293
//!   §3.2, RFC 7323, RFC 2018).
//! - [`reassembly`]: the out-of-order queue, first copy wins, conflicting
//!   overlaps counted (the classic IDS evasion).
//! - [`rtt`]: the retransmission timeout (RFC 6298).
//! - [`cc`]: NewReno congestion control (RFC 5681, RFC 6582).
//! - [`conn`]: one endpoint in a synchronized state, sans I/O.
//! - [`sim`]: a seeded lossy link between two endpoints on a virtual clock.

pub mod cc;
pub mod conn;
pub mod options;
pub mod reassembly;
pub mod rtt;
pub mod seq;
pub mod sim;
