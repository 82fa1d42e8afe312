//! What a returning client may resume: the client's leg resumes only a
//! session made under the same minted certificate and profile.
//!
//! The ticket key and the session cache are shared by every connection,
//! but a resumed handshake shows the client no certificate. Unbound, a
//! ticket issued while a site's certificate was trusted (a leaf from the
//! forward-trust CA) would resume after the site turned untrusted (a leaf
//! from the untrust CA, which the client is meant to see and refuse), or
//! after the profile changed. So each connection's server configuration
//! wraps both in a [`Bound`] that prefixes what it stores with a digest of
//! (profile, minted leaf); a ticket or session id of another binding does
//! not decrypt or is not found, and the client gets a full handshake.

use std::sync::Arc;

use rustls::{
    pki_types::CertificateDer,
    server::{ProducesTickets, StoresServerSessions},
    ServerConfig,
};
use sha2::{Digest, Sha256};

/// The shared ticketer and session cache, seen through one binding.
#[derive(Debug)]
pub struct Bound {
    binding: [u8; 32],
    tickets: Arc<dyn ProducesTickets>,
    store: Arc<dyn StoresServerSessions>,
}

impl Bound {
    fn prefixed(&self, rest: &[u8]) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.binding.len() + rest.len());
        v.extend_from_slice(&self.binding);
        v.extend_from_slice(rest);
        v
    }

    fn strip(&self, mut v: Vec<u8>) -> Option<Vec<u8>> {
        if v.len() < self.binding.len() || v[..self.binding.len()] != self.binding {
            return None;
        }
        v.drain(..self.binding.len());
        Some(v)
    }
}

/// Binds `cfg`'s resumption (taken from the profile's shared
/// configuration) to `profile` and the minted leaf `cert`.
pub fn bind(cfg: &mut ServerConfig, profile: &str, cert: &CertificateDer<'_>) {
    let mut h = Sha256::new();
    h.update((profile.len() as u64).to_be_bytes());
    h.update(profile.as_bytes());
    h.update(cert.as_ref());
    let bound = Arc::new(Bound {
        binding: h.finalize().into(),
        tickets: cfg.ticketer.clone(),
        store: cfg.session_storage.clone(),
    });
    cfg.ticketer = bound.clone();
    cfg.session_storage = bound;
}

impl ProducesTickets for Bound {
    fn enabled(&self) -> bool {
        self.tickets.enabled()
    }

    fn lifetime(&self) -> u32 {
        self.tickets.lifetime()
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.tickets.encrypt(&self.prefixed(plain))
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.strip(self.tickets.decrypt(cipher)?)
    }
}

impl StoresServerSessions for Bound {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        self.store.put(self.prefixed(&key), value)
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.store.get(&self.prefixed(key))
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.store.take(&self.prefixed(key))
    }

    fn can_cache(&self) -> bool {
        self.store.can_cache()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::server::ServerSessionMemoryCache;

    fn cfg_for(profile: &str, cert: &[u8], shared: &ServerConfig) -> ServerConfig {
        let mut c = shared.clone();
        bind(&mut c, profile, &CertificateDer::from(cert.to_vec()));
        c
    }

    fn shared() -> ServerConfig {
        let mut c = ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(super::super::context::OneCert(None)));
        c.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new().unwrap();
        c.session_storage = ServerSessionMemoryCache::new(16);
        c
    }

    #[test]
    fn a_ticket_opens_only_under_its_own_binding() {
        let s = shared();
        let a = cfg_for("p", b"leaf-a", &s);
        let t = a.ticketer.encrypt(b"state").unwrap();
        assert_eq!(a.ticketer.decrypt(&t).as_deref(), Some(&b"state"[..]));
        assert_eq!(
            cfg_for("p", b"leaf-a", &s).ticketer.decrypt(&t).as_deref(),
            Some(&b"state"[..])
        );
        assert!(cfg_for("p", b"leaf-b", &s).ticketer.decrypt(&t).is_none());
        assert!(cfg_for("q", b"leaf-a", &s).ticketer.decrypt(&t).is_none());
        // An unbound ticket of the same key does not open either.
        assert!(a
            .ticketer
            .decrypt(&s.ticketer.encrypt(b"x").unwrap())
            .is_none());
    }

    #[test]
    fn a_session_id_is_found_only_under_its_own_binding() {
        let s = shared();
        let a = cfg_for("p", b"leaf-a", &s);
        assert!(a.session_storage.put(b"id".to_vec(), b"state".to_vec()));
        assert!(cfg_for("p", b"leaf-b", &s)
            .session_storage
            .get(b"id")
            .is_none());
        assert!(cfg_for("p", b"leaf-b", &s)
            .session_storage
            .take(b"id")
            .is_none());
        assert_eq!(
            a.session_storage.take(b"id").as_deref(),
            Some(&b"state"[..])
        );
        assert!(a.session_storage.get(b"id").is_none());
    }
}
