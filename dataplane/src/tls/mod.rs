//! TLS as the dataplane sees it: byte streams, never segments, interfaces
//! or AF_XDP.
//!
//! - [`hello`]: the decision point, a client's ClientHello (kept parsed).
//! - [`intercept`]: the `decrypt` stage: TLS server toward the client, TLS
//!   client toward the server, plaintext through inspection between.
//! - [`upstream`]: the client configuration toward servers.
//! - [`verify`]: classifying the server's certificate chain.
//! - [`mint`]: impersonation certificates (TBS built here, signed in the
//!   HSM).
//! - [`cache`]: minted certificates shared by the workers, single flight.
//! - [`keys`]: the leaf keys, rotated.
//! - [`context`]: what the workers share (CAs, profiles, exclusions).
//! - [`resume`]: the client's leg resumes only under the same minted leaf.
//! - [`tickets`]: session ticket keys, rotated, kept across restarts
//!   sealed by the HSM's master key.
//! - [`inbound`]: `inbound-inspect`: the organisation's own server
//!   certificates with their keys on the HSM, and the handshake pool that
//!   signs with them off the packet workers.

pub mod cache;
pub mod context;
#[cfg(any(test, feature = "testkit"))]
pub mod fuzz;
pub mod hello;
pub mod inbound;
pub mod intercept;
pub mod keys;
pub mod mint;
pub mod resume;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
pub mod tickets;
pub mod upstream;
pub mod verify;

#[cfg(test)]
mod tests;
