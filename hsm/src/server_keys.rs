//! Server keys for inbound inspection: an organisation's own TLS server
//! keys, held on the token under `loupe-server/<label>` so they never meet
//! the CA keys' labels. A key is generated there or imported from a file
//! (SENSITIVE, not EXTRACTABLE, sign only, checked by a signature the
//! token makes and the file's public key verifies before it is kept); a
//! CSR for it is signed there. Every generation, import and CSR signature
//! is in the audit log.

use std::time::Duration;

use rcgen::{CertificateParams, DistinguishedName, DnType, SanType};
use ring::signature::{self, UnparsedPublicKey};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::{
    audit::{AuditSink, Entry, Kind},
    ca::{spki_der, HsmKey},
    keyfile::parse_private_key_pem,
    signer::{Request, Signer},
    token::{KeyAlg, PublicKey, Token},
    HsmError, Result,
};

/// The token label prefix of server keys.
pub const PREFIX: &str = "loupe-server/";

/// Names a CSR may carry, at most.
pub const MAX_CSR_NAMES: usize = 100;

/// A CSR's subject alternative name: an IP address, or a DNS name
/// (RFC 1035 letters, digits and hyphens, labels of 1 to 63, 253 in all;
/// a wildcard only as the whole leftmost label of a name with two more).
fn san(name: &str) -> Result<SanType> {
    if let Ok(ip) = name.parse::<std::net::IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let bad = |why: &str| HsmError::Invalid(format!("{name:?} is not a DNS name: {why}"));
    if name.is_empty() || name.len() > 253 {
        return Err(bad("1 to 253 characters"));
    }
    let labels: Vec<&str> = name.split('.').collect();
    for (i, l) in labels.iter().enumerate() {
        if i == 0 && *l == "*" {
            if labels.len() < 3 {
                return Err(bad("a wildcard needs two labels after it"));
            }
            continue;
        }
        let ok = (1..=63).contains(&l.len())
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-');
        if !ok {
            return Err(bad(
                "labels are 1 to 63 letters, digits and inner hyphens (a wildcard is a \
                 whole leftmost label)",
            ));
        }
    }
    name.try_into()
        .map(SanType::DnsName)
        .map_err(|_| bad("not ASCII"))
}

/// A server key on the token, for listings.
#[derive(Clone, Debug, Serialize)]
pub struct ServerKeyInfo {
    /// As the operator names it (without [`PREFIX`]).
    pub label: String,
    pub key: &'static str,
    pub sensitive: bool,
    pub extractable: bool,
    /// Generated on the token (ALWAYS_SENSITIVE and NEVER_EXTRACTABLE).
    pub generated: bool,
    /// SHA-256 of the SubjectPublicKeyInfo (what a pin names).
    pub spki_sha256: String,
    /// What is wrong with it (a duplicate label, a missing half), if
    /// anything: listed all the same.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// Runs server-key operations on one token, recorded in `audit`.
pub struct ServerKeys<'a> {
    pub token: &'a Token,
    pub signer: &'a Signer,
    pub audit: &'a AuditSink,
    pub requester: String,
}

/// The token label of the server key an operator calls `label`, if that
/// is a label a server key may have.
pub fn token_label(label: &str) -> Result<String> {
    let ok = label.len() <= 64
        && label.starts_with(|c: char| c.is_ascii_alphanumeric())
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !ok {
        return Err(HsmError::Invalid(format!(
            "a server key label is 1 to 64 of A-Z a-z 0-9 . _ -, starting with a letter or \
             digit (not {label:?})"
        )));
    }
    Ok(format!("{PREFIX}{label}"))
}

impl ServerKeys<'_> {
    fn audited<T>(
        &self,
        kind: Kind,
        key: &str,
        purpose: &str,
        op: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        let entry = Entry::now(kind, self.token.label(), key, purpose, &self.requester);
        self.audit.around(entry, op)
    }

    /// Makes a key pair on the token.
    pub fn generate(&self, label: &str, alg: KeyAlg) -> Result<PublicKey> {
        let full = token_label(label)?;
        self.audited(
            Kind::Keygen,
            &full,
            &format!("generate server key ({})", alg.name()),
            || self.token.session()?.generate_key_pair(&full, alg),
        )
    }

    /// Imports the private key in `pem`: stored, then proven (the token
    /// signs, the file's public key verifies); a key that fails the proof
    /// is destroyed again.
    pub fn import(&self, label: &str, pem: &str) -> Result<PublicKey> {
        let full = token_label(label)?;
        let parts = parse_private_key_pem(pem)?;
        let alg = parts.alg();
        self.audited(
            Kind::Import,
            &full,
            &format!("import server key ({})", alg.name()),
            || {
                let mut s = self.token.session()?;
                let public = s.import_key_pair(&full, &parts)?;
                drop(parts);
                if let Err(e) = self.prove(&full, &public) {
                    // Undone, and said so.
                    let entry = Entry::now(
                        Kind::Destroy,
                        self.token.label(),
                        &full,
                        "undo a refused import",
                        &self.requester,
                    );
                    self.audit.around(entry, || s.destroy(&full))?;
                    return Err(e);
                }
                Ok(public)
            },
        )
    }

    /// A signature by the token's key that its public key verifies.
    fn prove(&self, full: &str, public: &PublicKey) -> Result<()> {
        let msg = b"loupe: does the token's key match its public key?";
        let sig = self.signer.sign(Request {
            token: self.token.label().to_string(),
            key: full.to_string(),
            mech: public.alg.sign_mech(),
            message: msg.to_vec(),
            purpose: "import check".into(),
            requester: self.requester.clone(),
            timeout: Some(Duration::from_secs(30)),
        })?;
        let alg: &dyn signature::VerificationAlgorithm = match public.alg {
            KeyAlg::EcP256 => &signature::ECDSA_P256_SHA256_ASN1,
            KeyAlg::EcP384 => &signature::ECDSA_P384_SHA384_ASN1,
            KeyAlg::Rsa2048 | KeyAlg::Rsa3072 => &signature::RSA_PKCS1_2048_8192_SHA256,
        };
        UnparsedPublicKey::new(alg, &public.raw)
            .verify(msg, &sig)
            .map_err(|_| {
                HsmError::Invalid(
                    "the key file's private and public parts do not belong together".into(),
                )
            })
    }

    /// A PKCS#10 request (PEM) for `names` (the first is the subject's
    /// common name; all are DNS subject alternative names), signed by the
    /// key on the token.
    pub fn csr(&self, label: &str, names: &[String], organization: Option<&str>) -> Result<String> {
        let full = token_label(label)?;
        if names.is_empty() || names.len() > MAX_CSR_NAMES {
            return Err(HsmError::Invalid(format!(
                "a CSR carries 1 to {MAX_CSR_NAMES} names"
            )));
        }
        let sans = names.iter().map(|n| san(n)).collect::<Result<Vec<_>>>()?;
        if names[0].len() > 64 {
            return Err(HsmError::Invalid(format!(
                "the first name is the subject's common name, at most 64 characters: {:?}",
                names[0]
            )));
        }
        if let Some(o) = organization {
            if o.is_empty() || o.len() > 64 || o.chars().any(char::is_control) {
                return Err(HsmError::Invalid(
                    "an organization is 1 to 64 characters, none of them control characters".into(),
                ));
            }
        }
        let public = self.token.session()?.public_key(&full)?;
        // The private key and the public key object are one pair: else
        // the request would carry a signature its own key does not verify.
        self.prove(&full, &public)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, names[0].as_str());
        if let Some(o) = organization {
            dn.push(DnType::OrganizationName, o);
        }
        params.distinguished_name = dn;
        params.subject_alt_names = sans;
        let key = HsmKey {
            signer: self.signer,
            token: self.token.label().to_string(),
            label: full.clone(),
            public,
            purpose: format!("CSR for {}", names.join(", ")),
            requester: self.requester.clone(),
        };
        let csr = params
            .serialize_request(&key)
            .map_err(|e| HsmError::Invalid(format!("cannot make the CSR: {e}")))?;
        csr.pem()
            .map_err(|e| HsmError::Invalid(format!("cannot write the CSR: {e}")))
    }

    /// The server keys on the token, with the attributes it reports.
    pub fn list(&self) -> Result<Vec<ServerKeyInfo>> {
        list_keys(self.token)
    }
}

/// The server keys on `token`, with the attributes it reports (public
/// attributes only: nothing is signed, nothing audited).
pub fn list_keys(token: &Token) -> Result<Vec<ServerKeyInfo>> {
    {
        let mut s = token.session()?;
        let mut labels = s.private_key_labels(PREFIX)?;
        labels.dedup();
        let mut out = Vec::new();
        for full in labels {
            let label = full[PREFIX.len()..].to_string();
            let read = (|| -> Result<ServerKeyInfo> {
                let flags = s.private_key_flags(&full)?;
                let get = |n: &str| flags.iter().any(|(k, v)| *k == n && *v);
                let public = s.public_key(&full)?;
                Ok(ServerKeyInfo {
                    label: label.clone(),
                    key: public.alg.name(),
                    sensitive: get("sensitive"),
                    extractable: get("extractable"),
                    generated: get("always-sensitive") && get("never-extractable"),
                    spki_sha256: Sha256::digest(spki_der(&public))
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect(),
                    problem: None,
                })
            })();
            // One broken entry does not hide the others.
            out.push(read.unwrap_or_else(|e| ServerKeyInfo {
                label,
                key: "?",
                sensitive: false,
                extractable: false,
                generated: false,
                spki_sha256: String::new(),
                problem: Some(e.to_string()),
            }));
        }
        Ok(out)
    }
}
