//! Loupe's root of trust. Every private-key operation of the engine's CAs
//! happens inside a PKCS#11 token; this crate owns all access to it.
//!
//! - [`token`]: modules, tokens by label, logged-in sessions, key generation
//!   with explicit attributes, public keys and stored certificates.
//! - [`signer`]: the batched signer service packet workers submit to.
//! - [`audit`]: the hash-chained key-usage log and its verifier.
//! - [`ca`]: the forward-trust / forward-untrust CA lifecycle.
//! - [`server_keys`]: an organisation's own server keys (inbound
//!   inspection): generated or imported, never extractable; CSRs.
//! - [`keyfile`]: private key files read for an import.
//! - [`master`]: the master key (AES-256 on the token) sealing secrets
//!   kept on disk.
//! - [`mech`]: signature mechanisms and their software halves.
//! - [`pin`]: PIN sources (0600 file or environment, never argv).
//! - [`softhsm`]: SoftHSM2 provisioning for the embedded default.

pub mod audit;
pub mod ca;
pub mod error;
pub mod keyfile;
pub mod keylog;
pub mod master;
pub mod mech;
pub mod pin;
pub mod server_keys;
pub mod signer;
pub mod softhsm;
pub mod token;

pub use error::{HsmError, Result};

/// Joins `t` if it ends by `deadline`; else hands it back, to be left
/// behind: a thread inside a PKCS#11 call to a hung HSM may never return,
/// and must not hold a shutdown.
pub fn join_by<T>(
    t: std::thread::JoinHandle<T>,
    deadline: std::time::Instant,
) -> std::result::Result<std::thread::Result<T>, std::thread::JoinHandle<T>> {
    while !t.is_finished() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    if t.is_finished() {
        Ok(t.join())
    } else {
        Err(t)
    }
}
