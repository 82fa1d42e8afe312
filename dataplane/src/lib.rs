//! Loupe's dataplane: the XDP classifier's userspace side, AF_XDP workers,
//! and (in later stages) TCP takeover and TLS inspection.
//!
//! Layering: `wire` parses bytes and knows nothing else; `flow` keys and
//! shards flows; `xsk` owns AF_XDP sockets and UMEM frames; `ebpf` owns the
//! XDP program and its maps; only `worker` ties them together, and `engine`
//! runs the whole.

pub mod api;
pub mod config;
pub mod ebpf;
pub mod engine;
pub mod export;
pub mod flow;
pub mod inspect;
pub mod policy;
pub mod session;
pub mod stage;
pub mod stats;
pub mod sys;
pub mod tcp;
pub mod tls;
pub mod wire;
pub mod worker;
pub mod xsk;
