//! The master key: an AES-256 key made on the token (SENSITIVE, not
//! EXTRACTABLE, encrypt/decrypt only) under which every secret Loupe keeps
//! on disk is sealed, with AES-GCM through PKCS#11. The key never leaves
//! the token, so losing the token (or the key on it) makes those files
//! unreadable. Each seal and open is an audit record (`wrap`, `unwrap`)
//! naming what the secret is for.
//!
//! A sealed blob is `LOUPESEAL1` ‖ IV (12 bytes, random) ‖ ciphertext ‖
//! tag (16 bytes). The additional data is the magic and the secret's
//! context ("tls ticket keys"), so a blob sealed for one use does not open
//! for another.

use ring::rand::{SecureRandom, SystemRandom};

use crate::{
    audit::{AuditSink, Entry, Kind},
    token::Token,
    HsmError, Result,
};

/// The master key's label on the token.
pub const MASTER_LABEL: &str = "loupe-master/g1";

const MAGIC: &[u8] = b"LOUPESEAL1";
const IV_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// Seals and opens secrets with the master key of `token`, recording each
/// use in `audit` as `requester`.
pub struct MasterKey<'a> {
    pub token: &'a Token,
    pub audit: &'a AuditSink,
    pub requester: String,
}

fn aad(context: &str) -> Vec<u8> {
    let mut a = MAGIC.to_vec();
    a.push(0);
    a.extend_from_slice(context.as_bytes());
    a
}

impl MasterKey<'_> {
    /// Makes the master key if the token has none (audited); true if made.
    pub fn ensure(&self) -> Result<bool> {
        let mut s = self.token.session()?;
        if s.has_secret_key(MASTER_LABEL)? {
            return Ok(false);
        }
        let entry = Entry::now(
            Kind::Keygen,
            self.token.label(),
            MASTER_LABEL,
            "generate the master key (aes-256) that seals secrets kept on disk",
            &self.requester,
        );
        self.audit
            .around(entry, || s.generate_aes_key(MASTER_LABEL))?;
        Ok(true)
    }

    /// `secret` sealed for `context`.
    pub fn seal(&self, context: &str, secret: &[u8]) -> Result<Vec<u8>> {
        let mut iv = [0u8; IV_LEN];
        SystemRandom::new()
            .fill(&mut iv)
            .map_err(|_| HsmError::Invalid("no randomness for an IV".into()))?;
        let entry = Entry::now(
            Kind::Wrap,
            self.token.label(),
            MASTER_LABEL,
            &format!("seal {context}"),
            &self.requester,
        );
        let sealed = self.audit.around(entry, || {
            self.token
                .session()?
                .aes_gcm(MASTER_LABEL, true, &iv, &aad(context), secret)
        })?;
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&iv);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// The secret `blob` holds, if it was sealed for `context` by this
    /// token's master key and not changed since.
    pub fn open(&self, context: &str, blob: &[u8]) -> Result<Vec<u8>> {
        let bad = |why: &str| HsmError::Invalid(format!("sealed {context}: {why}"));
        let rest = blob
            .strip_prefix(MAGIC)
            .ok_or_else(|| bad("not a sealed secret (no LOUPESEAL1 header)"))?;
        if rest.len() < IV_LEN + TAG_LEN {
            return Err(bad("too short"));
        }
        let (iv, sealed) = rest.split_at(IV_LEN);
        let iv: [u8; IV_LEN] = iv.try_into().expect("split at IV_LEN");
        let entry = Entry::now(
            Kind::Unwrap,
            self.token.label(),
            MASTER_LABEL,
            &format!("open {context}"),
            &self.requester,
        );
        self.audit.around(entry, || {
            let s = self.token.session()?;
            if !s.has_secret_key(MASTER_LABEL)? {
                return Err(bad(&format!(
                    "token {:?} has no master key {MASTER_LABEL:?}: it cannot be opened",
                    self.token.label()
                )));
            }
            s.aes_gcm(MASTER_LABEL, false, &iv, &aad(context), sealed)
                .map_err(|e| bad(&format!("it does not authenticate (changed, or sealed by another key or for another use): {e}")))
        })
    }
}
