//! The CA lifecycle: the forward-trust CA (clients trust it; it signs the
//! impersonation certificates of servers whose own certificate checked out)
//! and the forward-untrust CA (nobody trusts it; it signs when the upstream
//! certificate failed its checks, so the client sees the failure too).
//!
//! Each CA exists in generations `g1, g2, ...` labelled
//! `loupe-ca/forward-trust/gN` and `loupe-ca/forward-untrust/gN`; the highest
//! generation is active. A generation whose keys are EC also gets an
//! RSA-2048 companion of each CA (`loupe-ca/forward-trust-rsa/gN`, ...),
//! as a firewall keeps both kinds: a client that verifies only RSA
//! signatures must be shown an all-RSA chain. Key pairs are generated on the token, the
//! self-signed certificates are signed inside it through the [`Signer`], and
//! the certificates are stored on the token next to their keys. Every key
//! generation, signature and destruction is an audit record.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyUsagePurpose,
    PublicKeyData, SerialNumber, SignatureAlgorithm, SigningKey,
};
use ring::rand::SecureRandom;
use sha2::{Digest, Sha256};

use crate::{
    audit::{hex, AuditSink, Entry, Kind, AUDIT_KEY_LABEL},
    error::{HsmError, Result},
    signer::{Request, Signer},
    token::{KeyAlg, PublicKey, Token, TokenSession},
};

/// Which CA.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CaRole {
    ForwardTrust,
    ForwardUntrust,
}

impl CaRole {
    pub const BOTH: [CaRole; 2] = [CaRole::ForwardTrust, CaRole::ForwardUntrust];

    /// The role as operators write it.
    pub fn name(self) -> &'static str {
        match self {
            CaRole::ForwardTrust => "forward-trust",
            CaRole::ForwardUntrust => "forward-untrust",
        }
    }

    pub fn prefix(self) -> &'static str {
        match self {
            CaRole::ForwardTrust => "loupe-ca/forward-trust/g",
            CaRole::ForwardUntrust => "loupe-ca/forward-untrust/g",
        }
    }

    pub fn label(self, generation: u32) -> String {
        format!("{}{generation}", self.prefix())
    }

    /// The label of the CA of this role and flavor in `generation`.
    pub fn label_of(self, flavor: CaFlavor, generation: u32) -> String {
        match flavor {
            CaFlavor::Primary => self.label(generation),
            CaFlavor::Rsa => format!("{}-rsa/g{generation}", self.prefix().trim_end_matches("/g")),
        }
    }

    fn common_name(self, flavor: CaFlavor, generation: u32) -> String {
        let suffix = match flavor {
            CaFlavor::Primary => "",
            CaFlavor::Rsa => " RSA",
        };
        match self {
            CaRole::ForwardTrust => format!("Loupe Forward Trust CA g{generation}{suffix}"),
            CaRole::ForwardUntrust => format!("Loupe Forward Untrust CA g{generation}{suffix}"),
        }
    }
}

/// Which CA of a role within a generation: the one with the generation's
/// own key type, or the RSA companion made beside an EC one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CaFlavor {
    Primary,
    Rsa,
}

impl CaFlavor {
    pub const BOTH: [CaFlavor; 2] = [CaFlavor::Primary, CaFlavor::Rsa];
}

impl std::str::FromStr for CaRole {
    type Err = HsmError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "trust" | "forward-trust" => Ok(CaRole::ForwardTrust),
            "untrust" | "forward-untrust" => Ok(CaRole::ForwardUntrust),
            _ => Err(HsmError::Invalid(format!(
                "unknown CA {s:?} (forward-trust or forward-untrust)"
            ))),
        }
    }
}

/// Options for new CA generations.
#[derive(Clone, Debug)]
pub struct CaOptions {
    pub alg: KeyAlg,
    pub organization: String,
    pub validity_days: u32,
}

impl Default for CaOptions {
    fn default() -> Self {
        CaOptions {
            alg: KeyAlg::EcP256,
            organization: "Loupe TLS inspection".into(),
            validity_days: 3650,
        }
    }
}

/// One CA certificate on the token.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CaInfo {
    pub role: CaRole,
    pub flavor: CaFlavor,
    /// The key type (`ec-p256`, `rsa-2048`, ...).
    pub key: String,
    pub generation: u32,
    pub label: String,
    pub active: bool,
    /// SHA-256 of the DER certificate, hex.
    pub fingerprint: String,
    #[serde(skip)]
    pub der: Vec<u8>,
}

impl CaInfo {
    pub fn pem(&self) -> String {
        pem::encode(&pem::Pem::new("CERTIFICATE", self.der.clone()))
    }
}

/// A key in the token, seen through the signer, as rcgen's signing key.
pub(crate) struct HsmKey<'a> {
    pub(crate) signer: &'a Signer,
    pub(crate) token: String,
    pub(crate) label: String,
    pub(crate) public: PublicKey,
    pub(crate) purpose: String,
    pub(crate) requester: String,
}

fn rcgen_alg(alg: KeyAlg) -> &'static SignatureAlgorithm {
    match alg {
        KeyAlg::EcP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
        KeyAlg::EcP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
        KeyAlg::Rsa2048 | KeyAlg::Rsa3072 => &rcgen::PKCS_RSA_SHA256,
    }
}

impl PublicKeyData for PublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        rcgen_alg(self.alg)
    }
}

impl PublicKeyData for HsmKey<'_> {
    fn der_bytes(&self) -> &[u8] {
        self.public.der_bytes()
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.public.algorithm()
    }
}

impl SigningKey for HsmKey<'_> {
    fn sign(&self, msg: &[u8]) -> std::result::Result<Vec<u8>, rcgen::Error> {
        self.signer
            .sign(Request {
                token: self.token.clone(),
                key: self.label.clone(),
                mech: self.public.alg.sign_mech(),
                message: msg.to_vec(),
                purpose: self.purpose.clone(),
                requester: self.requester.clone(),
                timeout: Some(Duration::from_secs(30)),
            })
            .map_err(|e| {
                eprintln!("loupe: HSM signature for {} failed: {e}", self.label);
                rcgen::Error::RemoteKeyError
            })
    }
}

/// SubjectPublicKeyInfo DER of a token public key.
pub fn spki_der(public: &PublicKey) -> Vec<u8> {
    public.subject_public_key_info()
}

/// PEM `PUBLIC KEY` of a token public key.
pub fn spki_pem(public: &PublicKey) -> String {
    pem::encode(&pem::Pem::new("PUBLIC KEY", spki_der(public)))
}

/// Parses a PEM EC public key (P-256 or P-384) as written by [`spki_pem`].
pub fn parse_ec_spki_pem(text: &str) -> Result<PublicKey> {
    let p =
        pem::parse(text).map_err(|e| HsmError::Invalid(format!("not a PEM public key: {e}")))?;
    if p.tag() != "PUBLIC KEY" {
        return Err(HsmError::Invalid(format!(
            "PEM block is {:?}, not PUBLIC KEY",
            p.tag()
        )));
    }
    for alg in [KeyAlg::EcP256, KeyAlg::EcP384] {
        let len = if alg == KeyAlg::EcP256 { 65 } else { 97 };
        let probe = PublicKey {
            alg,
            raw: vec![0x04; len],
        };
        let template = spki_der(&probe);
        let prefix = &template[..template.len() - len];
        if p.contents().len() == template.len() && p.contents().starts_with(prefix) {
            return Ok(PublicKey {
                alg,
                raw: p.contents()[prefix.len()..].to_vec(),
            });
        }
    }
    Err(HsmError::Invalid(
        "not an EC P-256 or P-384 public key".into(),
    ))
}

/// Runs CA operations on one token: key pairs are made in `session`,
/// certificates are signed through `signer`, and key generation and
/// destruction are recorded in `audit`.
pub struct CaManager<'a> {
    pub token: &'a Token,
    pub signer: &'a Signer,
    pub audit: &'a AuditSink,
    /// Who is acting, for the audit log (e.g. `cli uid=0`).
    pub requester: String,
}

impl CaManager<'_> {
    fn session(&self) -> Result<TokenSession> {
        self.token.session()
    }

    /// Runs a key operation and records it in the audit log, whatever its
    /// outcome; the operation's error comes first, then the log's.
    fn audited<T>(
        &self,
        kind: Kind,
        label: &str,
        purpose: &str,
        op: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        let entry = Entry::now(kind, self.token.label(), label, purpose, &self.requester);
        self.audit.around(entry, op)
    }

    /// Generations present on the token, ascending.
    pub fn generations(&self) -> Result<Vec<u32>> {
        generations_on(&self.session()?)
    }

    /// Creates generation 1 of both CAs. Refuses if any generation exists.
    pub fn init(&self, opts: &CaOptions) -> Result<Vec<CaInfo>> {
        if let Some(g) = self.generations()?.last() {
            return Err(HsmError::Invalid(format!(
                "token {:?} already holds CA generation {g}; use `loupe ca rotate` for a new \
                 one",
                self.token.label()
            )));
        }
        self.create_generation(1, opts)
    }

    /// Creates the next generation; the previous ones stay until destroyed
    /// (clients may still hold certificates they issued).
    pub fn rotate(&self, opts: &CaOptions) -> Result<Vec<CaInfo>> {
        let Some(&last) = self.generations()?.last() else {
            return Err(HsmError::Invalid(format!(
                "token {:?} has no CA yet; run `loupe ca init` first",
                self.token.label()
            )));
        };
        self.create_generation(last + 1, opts)
    }

    fn create_generation(&self, generation: u32, opts: &CaOptions) -> Result<Vec<CaInfo>> {
        let mut session = self.session()?;
        let mut out = Vec::new();
        let rsa_primary = matches!(opts.alg, KeyAlg::Rsa2048 | KeyAlg::Rsa3072);
        for flavor in CaFlavor::BOTH {
            let alg = match flavor {
                CaFlavor::Primary => opts.alg,
                CaFlavor::Rsa if rsa_primary => continue,
                CaFlavor::Rsa => KeyAlg::Rsa2048,
            };
            for role in CaRole::BOTH {
                let label = role.label_of(flavor, generation);
                let purpose = format!("generate {} CA key ({})", role.name(), alg.name());
                let public = self.audited(Kind::Keygen, &label, &purpose, || {
                    session.generate_key_pair(&label, alg)
                })?;
                let cn = role.common_name(flavor, generation);
                let der = self.self_sign(&label, public, &cn, opts)?;
                session.store_certificate(&label, &der, &subject_of(&der)?)?;
                out.push(CaInfo {
                    role,
                    flavor,
                    key: alg.name().into(),
                    generation,
                    fingerprint: hex(&Sha256::digest(&der)),
                    label,
                    active: true,
                    der,
                });
            }
        }
        Ok(out)
    }

    fn self_sign(
        &self,
        label: &str,
        public: PublicKey,
        cn: &str,
        opts: &CaOptions,
    ) -> Result<Vec<u8>> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        dn.push(DnType::OrganizationName, opts.organization.as_str());
        params.distinguished_name = dn;
        // A CA that signs leaves only: pathLenConstraint 0 (RFC 5280 §4.2.1.9).
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs() as i64;
        let ts = |t: i64| {
            time::OffsetDateTime::from_unix_timestamp(t)
                .map_err(|e| HsmError::Invalid(format!("validity: {e}")))
        };
        // Backdated an hour for clients with slow clocks.
        params.not_before = ts(now - 3600)?;
        params.not_after = ts(now + i64::from(opts.validity_days) * 86_400)?;
        let mut serial = [0u8; 16];
        ring::rand::SystemRandom::new()
            .fill(&mut serial)
            .map_err(|_| HsmError::Invalid("no randomness for the serial number".into()))?;
        serial[0] &= 0x7f;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let key = HsmKey {
            signer: self.signer,
            token: self.token.label().to_string(),
            label: label.to_string(),
            public,
            purpose: format!("self-sign CA certificate CN={cn} serial={}", hex(&serial)),
            requester: self.requester.clone(),
        };
        let cert = params
            .self_signed(&key)
            .map_err(|e| HsmError::Invalid(format!("building the certificate of {label}: {e}")))?;
        Ok(cert.der().to_vec())
    }

    /// Every CA certificate on the token, oldest first.
    pub fn list(&self) -> Result<Vec<CaInfo>> {
        list_cas(self.token)
    }

    /// The certificate of `role` in `generation` (the active one if `None`),
    /// of the generation's own key type.
    pub fn certificate(&self, role: CaRole, generation: Option<u32>) -> Result<CaInfo> {
        self.certificates(role, generation)?
            .into_iter()
            .find(|c| c.flavor == CaFlavor::Primary)
            .ok_or_else(|| self.no_ca(role, generation))
    }

    /// Every certificate of `role` in `generation` (the active one if
    /// `None`): the primary, and the RSA companion when there is one.
    pub fn certificates(&self, role: CaRole, generation: Option<u32>) -> Result<Vec<CaInfo>> {
        let list: Vec<CaInfo> = self
            .list()?
            .into_iter()
            .filter(|c| c.role == role && generation.map_or(c.active, |g| c.generation == g))
            .collect();
        if list.is_empty() {
            return Err(self.no_ca(role, generation));
        }
        Ok(list)
    }

    fn no_ca(&self, role: CaRole, generation: Option<u32>) -> HsmError {
        match generation {
            Some(g) => {
                HsmError::Invalid(format!("no {} CA generation {g} on the token", role.name()))
            }
            None => HsmError::Invalid(format!(
                "no {} CA on token {:?}; run `loupe ca init`",
                role.name(),
                self.token.label()
            )),
        }
    }

    /// Destroys both CAs of `generation` (keys and certificates). The active
    /// generation is only destroyed with `allow_active`.
    pub fn destroy(&self, generation: u32, allow_active: bool) -> Result<usize> {
        let gens = self.generations()?;
        if !gens.contains(&generation) {
            return Err(HsmError::Invalid(format!(
                "no CA generation {generation} on token {:?} (present: {gens:?})",
                self.token.label()
            )));
        }
        if gens.last() == Some(&generation) && !allow_active {
            return Err(HsmError::Invalid(format!(
                "generation {generation} is the active CA; rotate first, or pass --force to \
                 leave the engine without a CA"
            )));
        }
        let mut session = self.session()?;
        let mut n = 0;
        for flavor in CaFlavor::BOTH {
            for role in CaRole::BOTH {
                let label = role.label_of(flavor, generation);
                if flavor == CaFlavor::Rsa && session.certificate(&label)?.is_none() {
                    continue; // no RSA companion in this generation
                }
                let purpose = format!("destroy {} CA generation {generation}", role.name());
                n += self.audited(Kind::Destroy, &label, &purpose, || session.destroy(&label))?;
            }
        }
        Ok(n)
    }
}

/// Every CA certificate on `token`, oldest generation first (primary
/// before RSA companion, forward-trust before forward-untrust). Needs only
/// a session: the engine reads its CAs with it.
pub fn list_cas(token: &Token) -> Result<Vec<CaInfo>> {
    let session = token.session()?;
    let gens = generations_on(&session)?;
    let active = gens.last().copied();
    let mut out = Vec::new();
    for g in gens {
        for flavor in CaFlavor::BOTH {
            for role in CaRole::BOTH {
                let label = role.label_of(flavor, g);
                if let Some(der) = session.certificate(&label)? {
                    let key = session.public_key(&label)?.alg.name().to_string();
                    out.push(CaInfo {
                        role,
                        flavor,
                        key,
                        generation: g,
                        fingerprint: hex(&Sha256::digest(&der)),
                        label,
                        active: Some(g) == active,
                        der,
                    });
                }
            }
        }
    }
    Ok(out)
}

/// CA generations present on the token, ascending.
fn generations_on(session: &TokenSession) -> Result<Vec<u32>> {
    let mut gens: Vec<u32> = session
        .private_key_labels(CaRole::ForwardTrust.prefix())?
        .iter()
        .filter_map(|l| l.strip_prefix(CaRole::ForwardTrust.prefix())?.parse().ok())
        .collect();
    gens.sort_unstable();
    gens.dedup();
    Ok(gens)
}

/// Makes sure the token holds the audit key; returns true if it was
/// created now (the caller records that once the log is open).
pub fn ensure_audit_key(token: &Token) -> Result<bool> {
    let mut s = token.session()?;
    match s.private_key(AUDIT_KEY_LABEL) {
        Ok(_) => Ok(false),
        Err(HsmError::ObjectNotFound { .. }) => {
            s.generate_key_pair(AUDIT_KEY_LABEL, KeyAlg::EcP256)?;
            Ok(true)
        }
        Err(e) => Err(e),
    }
}

/// The subject Name of a DER certificate (X.509 `tbsCertificate.subject`),
/// for CKA_SUBJECT.
pub fn subject_of(cert: &[u8]) -> Result<Vec<u8>> {
    let bad = || HsmError::Invalid("malformed certificate DER".into());
    let (_, cert_body, _) = tlv(cert).ok_or_else(bad)?;
    let (_, tbs, _) = tlv(cert_body).ok_or_else(bad)?;
    let mut rest = tbs;
    let mut fields = Vec::new();
    while !rest.is_empty() {
        let (whole, _, next) = tlv(rest).ok_or_else(bad)?;
        fields.push(whole);
        rest = next;
    }
    // [0] version (optional), serial, signature, issuer, validity, subject.
    let skip = usize::from(fields.first().is_some_and(|f| f[0] == 0xa0));
    fields.get(skip + 4).map(|f| f.to_vec()).ok_or_else(bad)
}

/// Splits one DER TLV off `b`: (whole element, contents, rest).
fn tlv(b: &[u8]) -> Option<(&[u8], &[u8], &[u8])> {
    let first = *b.get(1)?;
    let (len, hdr) = if first < 0x80 {
        (first as usize, 2)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = len << 8 | *b.get(2 + i)? as usize;
        }
        (len, 2 + n)
    };
    let end = hdr.checked_add(len)?;
    if end > b.len() {
        return None;
    }
    Some((&b[..end], &b[hdr..end], &b[end..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tlv_rejects_truncation_and_reads_long_lengths() {
        assert!(tlv(&[0x30, 0x05, 1, 2]).is_none());
        let mut long = vec![0x04, 0x81, 0x80];
        long.extend([0u8; 0x80]);
        let (whole, body, rest) = tlv(&long).unwrap();
        assert_eq!((whole.len(), body.len(), rest.len()), (0x83, 0x80, 0));
        assert!(tlv(&[0x30, 0x80]).is_none());
    }

    #[test]
    fn ec_public_keys_round_trip_through_pem() {
        let mut raw = vec![0x04];
        raw.extend((0..64).map(|i| i as u8));
        let k = PublicKey {
            alg: KeyAlg::EcP256,
            raw,
        };
        assert_eq!(parse_ec_spki_pem(&spki_pem(&k)).unwrap(), k);
        assert!(parse_ec_spki_pem(
            "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n"
        )
        .is_err());
    }
}
