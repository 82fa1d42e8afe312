//! Userspace TCP: taking over live connections. This layer knows nothing of
//! TLS, AF_XDP or workers: it works on segments (`wire::segment`), sequence
//! numbers and byte streams.
//!
//! - [`reassembly`]: the out-of-order queue, first copy wins, conflicting
//!   overlaps counted (the classic IDS evasion).
//! - [`rtt`]: the retransmission timeout (RFC 6298).
//! - [`budget`]: the memory autotuned buffers grow into, engine-wide.
//! - [`cc`]: congestion control, CUBIC (RFC 9438) by default or NewReno
//!   (RFC 5681, RFC 6582), with one loss recovery.
//! - [`scoreboard`]: what the peer's SACKs say it holds (RFC 6675).
//! - [`rack`]: which segments are lost, by time (RFC 8985 RACK).
//! - [`conn`]: one endpoint in a synchronized state, sans I/O.
//! - [`sim`]: a seeded lossy link between two endpoints on a virtual clock.
//! - [`split`]: taking over: handshake tracking and the two halves it
//!   continues.
//! - [`stream`]: a half as a byte stream, what stages above see.

pub mod budget;
pub mod cc;
pub mod conn;
pub mod rack;
pub mod reassembly;
pub mod rtt;
pub mod scoreboard;
pub mod sim;
pub mod split;
pub mod stream;
