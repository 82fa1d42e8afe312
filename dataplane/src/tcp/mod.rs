//! Userspace TCP: the building blocks of taking over live connections.
//! This layer knows nothing of TLS, AF_XDP or workers: it works on sequence
//! numbers, options and byte streams.
//!
//! - [`seq`]: sequence-number arithmetic modulo 2^32 (RFC 9293 §3.4).
//! - [`options`]: TCP options, parsed strictly and emitted (RFC 9293
//!   §3.2, RFC 7323, RFC 2018).
//! - [`reassembly`]: the out-of-order queue, first copy wins, conflicting
//!   overlaps counted (the classic IDS evasion).

pub mod options;
pub mod reassembly;
pub mod seq;
