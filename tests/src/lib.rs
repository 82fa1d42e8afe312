//! The network-namespace test harness: three namespaces (client, engine,
//! server) joined by two veth pairs with two queues each, addresses only
//! from the benchmarking ranges (198.18.0.0/15, 2001:2::/48), real peers
//! (curl, nginx, the Linux TCP stack) and the engine binary in between.
//!
//! Everything a harness creates is removed when it is dropped, on success
//! or panic: processes it started (by PID), its namespaces (and with them
//! every link and XDP program in them), its temporary directory.

pub mod clients;
pub mod control;
pub mod engine;
pub mod frames;
pub mod harness;
pub mod https;
pub mod impair;
pub mod mitm;
pub mod netns;
pub mod pki;
pub mod proc;
pub mod raw;
pub mod softhsm;
pub mod tcp;
pub mod tlspeer;
pub mod verdicts;
pub mod wait;

pub use engine::Engine;
pub use harness::{Harness, HarnessConfig, Role};
pub use proc::Proc;
pub use wait::wait_until;

use std::path::PathBuf;

/// A binary built from this workspace (`cargo build --release --bins`).
/// `LOUPE_BIN_DIR` overrides the directory.
pub fn workspace_bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("LOUPE_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("target")
                .join("release")
        });
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the workspace binaries first \
         (`cargo build --release --bins`; scripts/test does this)",
        path.display()
    );
    path
}

/// Whether this process may create namespaces and attach XDP (root).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
