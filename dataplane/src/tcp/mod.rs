//! Userspace TCP: taking over live connections. This layer knows nothing of
//! TLS, AF_XDP or workers: it works on segments (`wire::segment`), sequence
//! numbers and byte streams.
//!
//! - [`reassembly`]: the out-of-order queue, first copy wins, conflicting
//!   overlaps counted (the classic IDS evasion).
//! - [`rtt`]: the retransmission timeout (RFC 6298).
//! - [`cc`]: NewReno congestion control (RFC 5681, RFC 6582).
//! - [`conn`]: one endpoint in a synchronized state, sans I/O.
//! - [`sim`]: a seeded lossy link between two endpoints on a virtual clock.
//! - [`split`]: the tcp-split action: handshake tracking and the relay
//!   between a connection's two halves.
//! - [`fuzz`]: the entry point fuzzers (and a property test) drive.

pub mod cc;
pub mod conn;
pub mod fuzz;
pub mod reassembly;
pub mod rtt;
pub mod sim;
pub mod split;
