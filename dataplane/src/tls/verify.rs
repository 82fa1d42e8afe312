//! Upstream certificate verdicts: what is wrong, if anything, with the chain a
//! real server presented to the engine's TLS client.
//!
//! This module owns three things:
//! - [`TrustStore`]: the trust anchors (system bundle, a PEM file or DER) and
//!   optional CRLs that upstream chains are judged against;
//! - [`classify`]: the [`Verdict`] for a presented chain, in which every
//!   property (validity in time, trust, name, key and signature strength,
//!   revocation) is judged on its own, so that one problem never hides another;
//! - [`leaf_info`]: the [`LeafInfo`] the engine logs and mirrors about the
//!   upstream leaf.
//!
//! It decides nothing: a decryption profile reads the verdict and chooses to
//! block or to pass the error on to the client.
//!
//! Input is hostile (it comes from the network): nothing here panics on it,
//! and a certificate that cannot be parsed is reported, not trusted.
//!
//! Division of labour: trust (path building, signatures, CA constraints,
//! extended key usage, revocation) is rustls-webpki's, driven through
//! [`WebPkiServerVerifier`] with the aws-lc-rs provider; the name is webpki's
//! too, checked on its own; validity in time and strength are read with
//! x509-parser, so that webpki's first error cannot mask them.
//!
//! Weak is not untrusted: chain signatures made with SHA-1, or by RSA keys
//! of 1024 to 2047 bits, are verified (with aws-lc-rs's legacy algorithms)
//! so that such a chain comes out `weak`, and `untrusted` only if it does not
//! lead to an anchor for some other reason. Signatures nothing here can
//! verify (MD5, MD2, P-192 issuers) leave the chain `weak` and `untrusted`
//! ("unsupported signature algorithm"). Either way [`Verdict::trusted`] is
//! false.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::client::danger::ServerCertVerifier;
use rustls::client::{verify_server_name, WebPkiServerVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    alg_id, AlgorithmIdentifier, CertificateDer, CertificateRevocationListDer, InvalidSignature,
    ServerName, SignatureVerificationAlgorithm, UnixTime,
};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, RootCertStore};
use sha2::{Digest, Sha256};
use x509_parser::objects::{oid2abbrev, oid_registry};
use x509_parser::prelude::{FromDer, ParsedExtension, X509Certificate, X509Name};
use x509_parser::public_key::{PublicKey, RSAPublicKey};
use x509_parser::signature_algorithm::RsaSsaPssParams;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::sys::read_regular;

/// Where Debian (and derivatives) keep the system CA bundle.
pub const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Beyond this many hops the presented chain is not followed further:
/// webpki refuses paths with more than six intermediates anyway, and the walk
/// must stay cheap on hostile input.
const MAX_PATH_LEN: usize = 10;

/// Smallest RSA modulus that is not weak, in bits.
//= https://cabforum.org/working-groups/server/baseline-requirements/requirements/#6151-key-sizes
const MIN_RSA_BITS: u32 = 2048;
/// Smallest elliptic-curve field that is not weak, in bits (P-256).
const MIN_EC_BITS: u32 = 256;

/// Why a trust store or revocation data could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("cannot read {what} {}: {source}", path.display())]
    Unreadable {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "no CA certificates in {}: expected PEM blocks starting with '-----BEGIN CERTIFICATE-----'",
        path.display()
    )]
    NoCertificates { path: PathBuf },
    #[error("{} is not valid PEM ({reason}); re-export it as PEM", path.display())]
    BadPem { path: PathBuf, reason: String },
    #[error(
        "certificate {index} in {} cannot be a trust anchor: {reason}; remove or replace it",
        path.display()
    )]
    BadCertificate {
        path: PathBuf,
        index: usize,
        reason: String,
    },
    #[error("no usable trust anchors in {}; configure a bundle with at least one CA certificate", path.display())]
    NoUsableAnchors { path: PathBuf },
    #[error("no trust anchors were given; configure at least one CA certificate")]
    NoAnchors,
    #[error("trust anchor {index} cannot be used: {reason}; pass DER X.509 CA certificates")]
    BadAnchor { index: usize, reason: String },
    #[error("cannot build the chain verifier: {reason}")]
    Verifier { reason: String },
    #[error(
        "no CRL in {}: expected a DER CRL or PEM blocks starting with '-----BEGIN X509 CRL-----'",
        path.display()
    )]
    NoCrl { path: PathBuf },
    #[error("CRL {what} cannot be used: {reason}; provide complete (not delta, not indirect) X.509 v2 CRLs")]
    BadCrl { what: String, reason: String },
}

/// Why [`leaf_info`] could not describe a certificate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    #[error(
        "malformed certificate: {0}; the peer sent bytes that are not a DER X.509 certificate"
    )]
    Malformed(String),
}

/// The trust anchors, and optional revocation data, that upstream chains are
/// checked against. Cheap to clone; safe to share between threads.
#[derive(Clone)]
pub struct TrustStore {
    roots: Arc<RootCertStore>,
    crls: Vec<CertificateRevocationListDer<'static>>,
    verifier: Arc<WebPkiServerVerifier>,
    /// Anchor subject -> the subjectPublicKeyInfos of anchors with that
    /// subject, as webpki holds them: DER contents without the outer
    /// SEQUENCE header.
    anchors: HashMap<Vec<u8>, Vec<Vec<u8>>>,
}

impl fmt::Debug for TrustStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustStore")
            .field("anchors", &self.roots.len())
            .field("crls", &self.crls.len())
            .finish()
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum BadAnchors {
    Reject,
    Skip,
}

/// The largest CA bundle read (Debian's is about 200 KiB).
pub const MAX_BUNDLE_BYTES: u64 = 32 << 20;
/// The largest CRL file read (the largest public CAs' CRLs are tens of MiB).
pub const MAX_CRL_BYTES: u64 = 128 << 20;

impl TrustStore {
    /// The system bundle ([`SYSTEM_BUNDLE`]). Certificates in it that cannot
    /// be trust anchors are skipped, so that one odd entry shipped by the
    /// distribution does not stop the engine; an unreadable or empty bundle
    /// is an error naming the path.
    pub fn system() -> Result<TrustStore, TrustError> {
        Self::load_pem(Path::new(SYSTEM_BUNDLE), BadAnchors::Skip)
    }

    /// A PEM file of CA certificates. Every certificate in it must be usable:
    /// an operator who names a file means all of it.
    pub fn from_pem_file(path: &Path) -> Result<TrustStore, TrustError> {
        Self::load_pem(path, BadAnchors::Reject)
    }

    /// DER CA certificates; every one must be usable.
    pub fn from_der(roots: &[CertificateDer<'static>]) -> Result<TrustStore, TrustError> {
        let mut store = RootCertStore::empty();
        for (i, der) in roots.iter().enumerate() {
            store.add(der.clone()).map_err(|e| TrustError::BadAnchor {
                index: i + 1,
                reason: e.to_string(),
            })?;
        }
        if store.is_empty() {
            return Err(TrustError::NoAnchors);
        }
        Self::build(store, Vec::new()).map_err(|reason| TrustError::Verifier { reason })
    }

    /// Adds revocation data: CRL files, DER or PEM (`X509 CRL` blocks, several
    /// per file allowed). With CRLs present, a presented leaf or intermediate
    /// listed in a CRL of its issuer makes the verdict `revoked`;
    /// certificates no CRL speaks for are not held against the chain.
    pub fn with_crl_files<P: AsRef<Path>>(self, paths: &[P]) -> Result<TrustStore, TrustError> {
        let mut all = Vec::new();
        for path in paths {
            let path = path.as_ref();
            let crls = read_crls(path)?;
            // Checked file by file so that the error names the file at fault.
            build_verifier(&self.roots, &crls).map_err(|reason| TrustError::BadCrl {
                what: path.display().to_string(),
                reason,
            })?;
            all.extend(crls);
        }
        self.with_crls(all)
    }

    /// Adds revocation data already in memory (DER CRLs).
    pub fn with_crls(
        self,
        crls: impl IntoIterator<Item = CertificateRevocationListDer<'static>>,
    ) -> Result<TrustStore, TrustError> {
        let mut all = self.crls;
        all.extend(crls);
        let roots = Arc::unwrap_or_clone(self.roots);
        Self::build(roots, all).map_err(|reason| TrustError::BadCrl {
            what: "(given in memory)".into(),
            reason,
        })
    }

    /// Number of trust anchors.
    pub fn len(&self) -> usize {
        self.roots.len()
    }

    /// Whether there is no trust anchor (never true of a built store).
    pub fn is_empty(&self) -> bool {
        self.roots.is_empty()
    }

    /// The webpki verifier behind [`classify`], for the engine's own
    /// `ServerCertVerifier` to delegate handshake signatures
    /// (`verify_tls12_signature`, `verify_tls13_signature`,
    /// `supported_verify_schemes`) to: those use the provider's default
    /// algorithms. Its `verify_server_cert` accepts SHA-1 and RSA-1024 chain
    /// signatures (see the module documentation); judge chains with
    /// [`classify`].
    pub fn webpki_verifier(&self) -> Arc<WebPkiServerVerifier> {
        self.verifier.clone()
    }

    /// Number of CRLs consulted.
    pub fn crl_count(&self) -> usize {
        self.crls.len()
    }

    fn load_pem(path: &Path, bad: BadAnchors) -> Result<TrustStore, TrustError> {
        let bytes =
            read_regular(path, MAX_BUNDLE_BYTES).map_err(|source| TrustError::Unreadable {
                what: "CA bundle",
                path: path.to_path_buf(),
                source,
            })?;
        let mut store = RootCertStore::empty();
        let mut seen = 0usize;
        for (i, cert) in CertificateDer::pem_slice_iter(&bytes).enumerate() {
            let cert = cert.map_err(|e| TrustError::BadPem {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
            seen += 1;
            match store.add(cert) {
                Ok(()) => {}
                Err(_) if bad == BadAnchors::Skip => {}
                Err(e) => {
                    return Err(TrustError::BadCertificate {
                        path: path.to_path_buf(),
                        index: i + 1,
                        reason: e.to_string(),
                    })
                }
            }
        }
        if seen == 0 {
            return Err(TrustError::NoCertificates {
                path: path.to_path_buf(),
            });
        }
        if store.is_empty() {
            return Err(TrustError::NoUsableAnchors {
                path: path.to_path_buf(),
            });
        }
        Self::build(store, Vec::new()).map_err(|reason| TrustError::Verifier { reason })
    }

    fn build(
        roots: RootCertStore,
        crls: Vec<CertificateRevocationListDer<'static>>,
    ) -> Result<TrustStore, String> {
        let mut anchors: HashMap<Vec<u8>, Vec<Vec<u8>>> = HashMap::new();
        for ta in &roots.roots {
            anchors
                .entry(ta.subject.as_ref().to_vec())
                .or_default()
                .push(ta.subject_public_key_info.as_ref().to_vec());
        }
        let roots = Arc::new(roots);
        let verifier = build_verifier(&roots, &crls)?;
        Ok(TrustStore {
            roots,
            crls,
            verifier,
            anchors,
        })
    }

    fn is_anchor(&self, cert: &X509Certificate<'_>) -> bool {
        let (Some(subject), Some(spki)) = (
            der_contents(cert.subject().as_raw()),
            der_contents(cert.public_key().raw),
        ) else {
            return false;
        };
        self.anchors
            .get(subject)
            .is_some_and(|keys| keys.iter().any(|k| k.as_slice() == spki))
    }

    fn is_anchor_subject(&self, name: &X509Name<'_>) -> bool {
        der_contents(name.as_raw()).is_some_and(|n| self.anchors.contains_key(n))
    }
}

fn read_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TrustError> {
    let bytes = read_regular(path, MAX_CRL_BYTES).map_err(|source| TrustError::Unreadable {
        what: "CRL file",
        path: path.to_path_buf(),
        source,
    })?;
    if bytes.windows(10).any(|w| w == b"-----BEGIN") {
        let crls = CertificateRevocationListDer::pem_slice_iter(&bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TrustError::BadPem {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        if crls.is_empty() {
            return Err(TrustError::NoCrl {
                path: path.to_path_buf(),
            });
        }
        Ok(crls)
    } else if bytes.is_empty() {
        Err(TrustError::NoCrl {
            path: path.to_path_buf(),
        })
    } else {
        Ok(vec![CertificateRevocationListDer::from(bytes)])
    }
}

fn build_verifier(
    roots: &Arc<RootCertStore>,
    crls: &[CertificateRevocationListDer<'static>],
) -> Result<Arc<WebPkiServerVerifier>, String> {
    let mut builder = WebPkiServerVerifier::builder_with_provider(roots.clone(), chain_provider());
    if !crls.is_empty() {
        // CRLs are operator-supplied for some CAs, not all: a certificate no
        // CRL covers is "not known to be revoked", not an error. Stale CRLs
        // (past nextUpdate) are still used, as webpki does by default.
        //= https://www.rfc-editor.org/rfc/rfc5280#section-6.3
        builder = builder
            .with_crls(crls.iter().cloned())
            .allow_unknown_revocation_status();
    }
    builder.build().map_err(|e| e.to_string())
}

/// The aws-lc-rs provider, with legacy chain-signature algorithms added in
/// front of the default ones (see [`LEGACY`]).
fn chain_provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let mut provider = rustls::crypto::aws_lc_rs::default_provider();
            provider.signature_verification_algorithms = WebPkiSupportedAlgorithms {
                all: chain_algorithms(),
                // Handshake signatures are untouched: legacy algorithms are
                // for judging certificate chains only.
                mapping: provider.signature_verification_algorithms.mapping,
            };
            Arc::new(provider)
        })
        .clone()
}

fn chain_algorithms() -> &'static [&'static dyn SignatureVerificationAlgorithm] {
    static ALL: OnceLock<Vec<&'static dyn SignatureVerificationAlgorithm>> = OnceLock::new();
    ALL.get_or_init(|| {
        // webpki stops at the first algorithm whose identifiers match, so the
        // legacy ones (which also cover modern key sizes) must come first.
        let mut all: Vec<&'static dyn SignatureVerificationAlgorithm> = LEGACY
            .iter()
            .map(|alg| alg as &'static dyn SignatureVerificationAlgorithm)
            .collect();
        all.extend_from_slice(
            rustls::crypto::aws_lc_rs::default_provider()
                .signature_verification_algorithms
                .all,
        );
        all
    })
}

/// A chain-signature algorithm webpki's defaults refuse (SHA-1, RSA keys of
/// 1024 to 2047 bits).
///
/// Refusing them would turn a weak chain into an untrusted one and hide
/// whether it actually chains to an anchor. Accepting them here keeps the two
/// questions apart: such a chain comes out `weak` (with the reason), and
/// `untrusted` only if it is untrusted for another reason. Algorithms nothing
/// can verify (MD5, MD2, P-192 signatures) still make the chain untrusted.
struct Legacy {
    name: &'static str,
    public_key: AlgorithmIdentifier,
    signature: AlgorithmIdentifier,
    verify: &'static dyn aws_lc_rs::signature::VerificationAlgorithm,
}

impl fmt::Debug for Legacy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Legacy({})", self.name)
    }
}

impl SignatureVerificationAlgorithm for Legacy {
    fn verify_signature(
        &self,
        public_key: &[u8],
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), InvalidSignature> {
        aws_lc_rs::signature::UnparsedPublicKey::new(self.verify, public_key)
            .verify(message, signature)
            .map_err(|_| InvalidSignature)
    }

    fn public_key_alg_id(&self) -> AlgorithmIdentifier {
        self.public_key
    }

    fn signature_alg_id(&self) -> AlgorithmIdentifier {
        self.signature
    }

    fn fips(&self) -> bool {
        false
    }
}

/// sha1WithRSAEncryption (1.2.840.113549.1.1.5) with NULL parameters.
//= https://www.rfc-editor.org/rfc/rfc3279#section-2.2.1
const SHA1_WITH_RSA: AlgorithmIdentifier = AlgorithmIdentifier::from_slice(&[
    0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x05, 0x05, 0x00,
]);
/// ecdsa-with-SHA1 (1.2.840.10045.4.1), parameters absent.
//= https://www.rfc-editor.org/rfc/rfc3279#section-2.2.3
const ECDSA_WITH_SHA1: AlgorithmIdentifier =
    AlgorithmIdentifier::from_slice(&[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01]);

static LEGACY: [Legacy; 5] = [
    Legacy {
        name: "rsa-pkcs1-sha1",
        public_key: alg_id::RSA_ENCRYPTION,
        signature: SHA1_WITH_RSA,
        verify: &aws_lc_rs::signature::RSA_PKCS1_1024_8192_SHA1_FOR_LEGACY_USE_ONLY,
    },
    Legacy {
        name: "rsa-pkcs1-sha256-1024",
        public_key: alg_id::RSA_ENCRYPTION,
        signature: alg_id::RSA_PKCS1_SHA256,
        verify: &aws_lc_rs::signature::RSA_PKCS1_1024_8192_SHA256_FOR_LEGACY_USE_ONLY,
    },
    Legacy {
        name: "rsa-pkcs1-sha512-1024",
        public_key: alg_id::RSA_ENCRYPTION,
        signature: alg_id::RSA_PKCS1_SHA512,
        verify: &aws_lc_rs::signature::RSA_PKCS1_1024_8192_SHA512_FOR_LEGACY_USE_ONLY,
    },
    Legacy {
        name: "ecdsa-p256-sha1",
        public_key: alg_id::ECDSA_P256,
        signature: ECDSA_WITH_SHA1,
        verify: &aws_lc_rs::signature::ECDSA_P256_SHA1_ASN1,
    },
    Legacy {
        name: "ecdsa-p521-sha1",
        public_key: alg_id::ECDSA_P521,
        signature: ECDSA_WITH_SHA1,
        verify: &aws_lc_rs::signature::ECDSA_P521_SHA1_ASN1,
    },
];

/// What is wrong with an upstream chain; all false/`None` when nothing is.
/// Each field is judged independently of the others.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Verdict {
    /// The leaf or a presented intermediate is past its notAfter.
    pub expired: bool,
    /// The leaf or a presented intermediate is before its notBefore.
    pub not_yet_valid: bool,
    /// Why the chain does not lead to a trust anchor: "no certificate",
    /// "malformed certificate: ...", "self-signed", "unknown issuer",
    /// "unknown root", "issuer is not a CA", "bad signature", ...
    pub untrusted: Option<String>,
    /// The leaf is not valid for the server name.
    pub name_mismatch: bool,
    /// Why the chain is weak: "RSA-1024 key", "EC P-192 key",
    /// "SHA-1 signature", "MD5 signature"; several joined with "; ".
    pub weak: Option<String>,
    /// The leaf or an intermediate is listed in a configured CRL.
    pub revoked: bool,
}

impl Verdict {
    /// No problem at all.
    pub fn trusted(&self) -> bool {
        !self.expired
            && !self.not_yet_valid
            && self.untrusted.is_none()
            && !self.name_mismatch
            && self.weak.is_none()
            && !self.revoked
    }

    /// Short labels for logs, always in this order: "expired", "untrusted",
    /// "name-mismatch", "weak", "revoked", "not-yet-valid".
    pub fn labels(&self) -> Vec<&'static str> {
        [
            (self.expired, "expired"),
            (self.untrusted.is_some(), "untrusted"),
            (self.name_mismatch, "name-mismatch"),
            (self.weak.is_some(), "weak"),
            (self.revoked, "revoked"),
            (self.not_yet_valid, "not-yet-valid"),
        ]
        .into_iter()
        .filter_map(|(set, label)| set.then_some(label))
        .collect()
    }
}

impl fmt::Display for Verdict {
    /// "trusted", or the labels with their reasons: "untrusted (self-signed), name-mismatch".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.trusted() {
            return f.write_str("trusted");
        }
        for (i, label) in self.labels().into_iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            f.write_str(label)?;
            let reason = match label {
                "untrusted" => self.untrusted.as_deref(),
                "weak" => self.weak.as_deref(),
                _ => None,
            };
            if let Some(reason) = reason {
                write!(f, " ({reason})")?;
            }
        }
        Ok(())
    }
}

/// Classifies a presented chain: `chain` is the leaf first, then the
/// intermediates as the server sent them; `server_name` is what the client
/// asked for (its SNI, or the server's IP address when it sent none); `now`
/// is the time validity is judged at.
///
/// Only the leaf and the presented certificates on its issuer path are judged
/// for validity and strength; certificates the server sent that are not on
/// that path (stale cross-signs, unrelated extras) are ignored, as path
/// building ignores them, and so are presented copies of trust anchors.
pub fn classify(
    store: &TrustStore,
    chain: &[CertificateDer<'_>],
    server_name: &ServerName<'_>,
    now: UnixTime,
) -> Verdict {
    let mut verdict = Verdict::default();
    let Some((leaf_der, intermediates)) = chain.split_first() else {
        verdict.untrusted = Some("no certificate".into());
        return verdict;
    };

    let mut malformed = None;
    let parsed: Vec<Option<X509Certificate<'_>>> = chain
        .iter()
        .enumerate()
        .map(|(i, der)| match parse(der) {
            Ok(cert) => Some(cert),
            Err(e) => {
                malformed.get_or_insert_with(|| {
                    let which = if i == 0 {
                        "leaf".to_string()
                    } else {
                        format!("intermediate {i}")
                    };
                    format!("malformed certificate: {which}: {e}")
                });
                None
            }
        })
        .collect();
    let Some(Some(leaf)) = parsed.first() else {
        // Without a leaf nothing else can be judged; the other fields stay
        // false because they are unknown, not because they passed.
        verdict.untrusted = malformed.or_else(|| Some("malformed certificate: leaf".into()));
        return verdict;
    };

    let now_secs = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
    let path = issuer_path(store, &parsed, now_secs);
    let judged: Vec<&X509Certificate<'_>> = path
        .iter()
        .enumerate()
        .filter_map(|(pos, &i)| {
            let cert = parsed.get(i)?.as_ref()?;
            // A presented copy of an anchor is not relied on: the anchor is.
            // The leaf is always judged, even when pinned as an anchor.
            (pos == 0 || !store.is_anchor(cert)).then_some(cert)
        })
        .collect();

    //= https://www.rfc-editor.org/rfc/rfc5280#section-4.1.2.5
    //# The validity period for a certificate is the period of time from
    //# notBefore through notAfter, inclusive.
    for cert in &judged {
        let validity = cert.validity();
        if now_secs < validity.not_before.timestamp() {
            verdict.not_yet_valid = true;
        }
        if now_secs > validity.not_after.timestamp() {
            verdict.expired = true;
        }
    }

    let mut weak: Vec<String> = Vec::new();
    let last = judged.len().saturating_sub(1);
    for (pos, cert) in judged.iter().enumerate() {
        if let Some(reason) = key_weakness(cert.public_key()) {
            weak.push(reason);
        }
        // The self-signature of a root at the top of the path protects
        // nothing (nobody verifies it), so its algorithm does not weaken the
        // chain; a self-signed leaf's does, as it is all there is.
        let unverified_root = pos > 0 && pos == last && is_self_issued(cert);
        if !unverified_root {
            if let Some(reason) = signature_weakness(cert) {
                weak.push(reason.to_string());
            }
        }
    }
    let mut seen = HashSet::new();
    weak.retain(|w| seen.insert(w.clone()));
    if !weak.is_empty() {
        verdict.weak = Some(weak.join("; "));
    }

    match ParsedCertificate::try_from(leaf_der) {
        Ok(parsed_leaf) => {
            //= https://www.rfc-editor.org/rfc/rfc6125#section-6.4
            verdict.name_mismatch = verify_server_name(&parsed_leaf, server_name).is_err();
        }
        Err(e) => {
            let why = match &e {
                rustls::Error::InvalidCertificate(CertificateError::Other(o)) => {
                    webpki_reason(&o.to_string())
                }
                other => other.to_string(),
            };
            malformed.get_or_insert_with(|| format!("malformed certificate: leaf: {why}"));
        }
    }

    // Trust is judged at a time inside every judged certificate's validity,
    // so that webpki's expiry check (its highest-ranked error) cannot hide
    // whether the chain leads to an anchor. Expiry was judged above.
    let (when, overlap) = judging_time(&judged, now, now_secs);
    let mut result = chain_result(store, leaf_der, intermediates, server_name, when);
    if is_time_error(&result) {
        // webpki tried a presented certificate off the issuer path (e.g. an
        // old copy of an intermediate) and ranked its expiry above the real
        // problem: ask again with the path alone.
        let on_path: Vec<CertificateDer<'_>> = path
            .iter()
            .skip(1)
            .filter_map(|&i| chain.get(i).cloned())
            .collect();
        result = chain_result(store, leaf_der, &on_path, server_name, when);
    }

    let leaf_self_signed = is_self_issued(leaf) && !store.is_anchor(leaf);
    let unknown_root = path.len() > 1
        && path
            .last()
            .and_then(|&i| parsed.get(i)?.as_ref())
            .is_some_and(|top| is_self_issued(top) && !store.is_anchor(top));
    match result {
        Ok(()) => {}
        Err(rustls::Error::InvalidCertificate(CertificateError::Revoked)) => verdict.revoked = true,
        Err(e) => {
            verdict.untrusted = Some(untrusted_reason(
                &e,
                leaf_self_signed,
                unknown_root,
                overlap,
            ))
        }
    }
    if verdict.untrusted.is_none() {
        verdict.untrusted = leaf_key_usage(&judged).or_else(|| issuer_key_usage(&judged));
    }
    if let Some(m) = malformed {
        verdict.untrusted = Some(m);
    }
    verdict
}

/// A server's key signs the handshake (TLS 1.3 CertificateVerify, TLS 1.2
/// ECDHE ServerKeyExchange; the upstream leg offers no static RSA key
/// exchange): a leaf whose keyUsage leaves out digitalSignature may not
/// be used so. webpki does not look.
//= https://www.rfc-editor.org/rfc/rfc8446#section-4.4.2.2
//# The certificate MUST allow the key to be used for signing (i.e., the
//# digitalSignature bit MUST be set if the Key Usage extension is present)
fn leaf_key_usage(judged: &[&X509Certificate<'_>]) -> Option<String> {
    match judged.first()?.key_usage() {
        Ok(Some(ku)) if !ku.value.digital_signature() => {
            Some("leaf's key usage does not allow signing (no digitalSignature)".into())
        }
        Ok(_) => None,
        Err(_) => Some("malformed certificate: leaf's key usage".into()),
    }
}

/// An issuer on the path whose keyUsage leaves out keyCertSign may not
/// have signed the certificate below it; webpki does not look.
//= https://www.rfc-editor.org/rfc/rfc5280#section-4.2.1.3
//# The keyCertSign bit is asserted when the subject public key is
//# used for verifying signatures on public key certificates.  If the
//# keyCertSign bit is asserted, then the cA bit in the basic
//# constraints extension (Section 4.2.1.9) MUST also be asserted.
fn issuer_key_usage(judged: &[&X509Certificate<'_>]) -> Option<String> {
    judged
        .iter()
        .skip(1)
        .find_map(|cert| match cert.key_usage() {
            Ok(Some(ku)) if !ku.value.key_cert_sign() => {
                Some("issuer's key usage does not allow certificate signing".into())
            }
            Ok(_) => None,
            Err(_) => Some("malformed certificate: issuer's key usage".into()),
        })
}

fn chain_result(
    store: &TrustStore,
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    server_name: &ServerName<'_>,
    when: UnixTime,
) -> Result<(), rustls::Error> {
    match store
        .verifier
        .verify_server_cert(leaf, intermediates, server_name, &[], when)
    {
        Ok(_) => Ok(()),
        // The name is checked only after the chain passed: the chain is fine.
        Err(rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        )) => Ok(()),
        Err(e) => Err(e),
    }
}

fn is_time_error(result: &Result<(), rustls::Error>) -> bool {
    matches!(
        result,
        Err(rustls::Error::InvalidCertificate(
            CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. }
        ))
    )
}

/// The time trust is judged at: `now` moved into the intersection of the
/// judged validity periods; `now` itself (and `false`) when they do not
/// intersect.
fn judging_time(judged: &[&X509Certificate<'_>], now: UnixTime, now_secs: i64) -> (UnixTime, bool) {
    let lo = judged
        .iter()
        .map(|c| c.validity().not_before.timestamp())
        .max()
        .unwrap_or(now_secs);
    let hi = judged
        .iter()
        .map(|c| c.validity().not_after.timestamp())
        .min()
        .unwrap_or(now_secs);
    if lo > hi {
        return (now, false);
    }
    let t = now_secs.clamp(lo, hi);
    let t = u64::try_from(t).unwrap_or(0);
    (
        UnixTime::since_unix_epoch(std::time::Duration::from_secs(t)),
        true,
    )
}

fn untrusted_reason(
    err: &rustls::Error,
    leaf_self_signed: bool,
    unknown_root: bool,
    overlap: bool,
) -> String {
    use CertificateError as C;
    let cert_err = match err {
        rustls::Error::InvalidCertificate(e) => e,
        rustls::Error::InvalidCertRevocationList(e) => {
            return format!("revocation list not usable: {e:?}")
        }
        other => return format!("rejected: {other}"),
    };
    if let C::BadEncoding = cert_err {
        return "malformed certificate: rejected by the path validator".into();
    }
    // Whatever webpki tripped on first (a CA:TRUE self-signed leaf trips on
    // its basicConstraints), a self-signed leaf that is not an anchor is
    // untrusted because it is self-signed.
    if leaf_self_signed {
        return "self-signed".into();
    }
    match cert_err {
        // A leaf sent without its intermediate and a chain from an unknown CA
        // look the same from here: both end at an issuer nobody presented and
        // no anchor matches.
        C::UnknownIssuer if unknown_root => "unknown root".into(),
        C::UnknownIssuer => "unknown issuer".into(),
        C::BadSignature => "bad signature".into(),
        #[allow(deprecated)]
        C::UnsupportedSignatureAlgorithm | C::UnsupportedSignatureAlgorithmContext { .. } => {
            "unsupported signature algorithm".into()
        }
        C::UnsupportedSignatureAlgorithmForPublicKeyContext { .. } => {
            "signature algorithm does not match the issuer's key".into()
        }
        //= https://www.rfc-editor.org/rfc/rfc5280#section-4.2.1.12
        C::InvalidPurpose | C::InvalidPurposeContext { .. } => {
            "not valid for server authentication (extended key usage)".into()
        }
        C::UnknownRevocationStatus => "unknown revocation status".into(),
        C::ExpiredRevocationList | C::ExpiredRevocationListContext { .. } => {
            "revocation list expired".into()
        }
        C::Expired | C::ExpiredContext { .. } | C::NotValidYet | C::NotValidYetContext { .. } => {
            if overlap {
                "no time at which the whole chain is valid".into()
            } else {
                "validity periods of the chain do not overlap".into()
            }
        }
        C::Other(other) => webpki_reason(&other.to_string()),
        other => format!("rejected: {other:?}"),
    }
}

/// rustls passes most webpki errors on opaquely (`CertificateError::Other`,
/// displayed as the webpki variant's name); this crate does not depend on
/// webpki directly, so they are told apart by that name.
fn webpki_reason(text: &str) -> String {
    let variant = text.split(['(', ' ', '{']).next().unwrap_or(text);
    match variant {
        //= https://www.rfc-editor.org/rfc/rfc5280#section-4.2.1.9
        //# The cA boolean indicates whether the certified public key may be used
        //# to verify certificate signatures.
        "EndEntityUsedAsCa" => "issuer is not a CA".into(),
        "CaUsedAsEndEntity" => "CA certificate used as server certificate".into(),
        "PathLenConstraintViolated" => "path length constraint violated".into(),
        //= https://www.rfc-editor.org/rfc/rfc5280#section-4.2.1.10
        "NameConstraintViolation" => "name constraints violated".into(),
        "CertDistrusted" => "distrusted certificate".into(),
        "UnsupportedCriticalExtension" => "unsupported critical extension".into(),
        "UnsupportedCertVersion" => "unsupported certificate version".into(),
        "EmptyEkuExtension" => "not valid for server authentication (extended key usage)".into(),
        "SignatureAlgorithmMismatch" => "signature algorithm mismatch".into(),
        "MaximumPathDepthExceeded" => "chain too long".into(),
        "MaximumSignatureChecksExceeded"
        | "MaximumPathBuildCallsExceeded"
        | "MaximumNameConstraintComparisonsExceeded" => "chain too complex to verify".into(),
        _ => format!("rejected: {text}"),
    }
}

fn parse<'a>(der: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, String> {
    match X509Certificate::from_der(der.as_ref()) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err("trailing data after the certificate".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// The leaf and the presented certificates that issued it, in order, as
/// indices into the chain: each next one is a presented certificate whose
/// subject is the current one's issuer (and whose key identifier agrees),
/// preferring one valid at `now`. Stops at a self-issued certificate, at one
/// issued by an anchor, or when no presented certificate fits.
///
/// Names are compared byte for byte, as webpki does.
//= https://www.rfc-editor.org/rfc/rfc5280#section-7.1
fn issuer_path(store: &TrustStore, certs: &[Option<X509Certificate<'_>>], now: i64) -> Vec<usize> {
    let mut path = vec![0];
    let mut used = vec![false; certs.len()];
    let Some(Some(first)) = certs.first() else {
        return path;
    };
    let mut current = first;
    if let Some(u) = used.first_mut() {
        *u = true;
    }
    while path.len() < MAX_PATH_LEN {
        if is_self_issued(current)
            || store.is_anchor(current)
            || store.is_anchor_subject(current.issuer())
        {
            break;
        }
        let candidates = || {
            certs.iter().enumerate().skip(1).filter_map(|(i, c)| {
                let c = c.as_ref()?;
                let fits = !used.get(i).copied().unwrap_or(true)
                    && c.subject().as_raw() == current.issuer().as_raw()
                    && key_ids_agree(current, c);
                fits.then_some((i, c))
            })
        };
        let next = candidates()
            .find(|(_, c)| valid_at(c, now))
            .or_else(|| candidates().next());
        let Some((i, next)) = next else {
            break;
        };
        path.push(i);
        if let Some(u) = used.get_mut(i) {
            *u = true;
        }
        current = next;
    }
    path
}

fn valid_at(cert: &X509Certificate<'_>, now: i64) -> bool {
    let v = cert.validity();
    v.not_before.timestamp() <= now && now <= v.not_after.timestamp()
}

/// A self-issued certificate has the same name as subject and issuer.
//= https://www.rfc-editor.org/rfc/rfc5280#section-6.1
fn is_self_issued(cert: &X509Certificate<'_>) -> bool {
    cert.subject().as_raw() == cert.issuer().as_raw()
}

/// When the child names its issuer's key and the candidate names its own,
/// they must be the same key; otherwise names alone decide.
//= https://www.rfc-editor.org/rfc/rfc5280#section-4.2.1.1
//= https://www.rfc-editor.org/rfc/rfc5280#section-4.2.1.2
fn key_ids_agree(child: &X509Certificate<'_>, issuer: &X509Certificate<'_>) -> bool {
    let authority = child
        .extensions()
        .iter()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(aki) => {
                aki.key_identifier.as_ref().map(|k| k.0)
            }
            _ => None,
        });
    let subject = issuer
        .extensions()
        .iter()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(ski) => Some(ski.0),
            _ => None,
        });
    match (authority, subject) {
        (Some(a), Some(s)) => a == s,
        _ => true,
    }
}

/// Why a certificate's signature algorithm is weak, if it is.
//= https://www.rfc-editor.org/rfc/rfc5280#section-4.1.1.2
fn signature_weakness(cert: &X509Certificate<'_>) -> Option<&'static str> {
    let alg = &cert.signature_algorithm;
    match alg.algorithm.to_id_string().as_str() {
        "1.2.840.113549.1.1.2" => Some("MD2 signature"),
        "1.2.840.113549.1.1.3" => Some("MD4 signature"),
        "1.2.840.113549.1.1.4" => Some("MD5 signature"),
        // sha1WithRSAEncryption, its OIW alias, ecdsa-with-SHA1, dsa-with-sha1
        "1.2.840.113549.1.1.5" | "1.3.14.3.2.29" | "1.2.840.10045.4.1" | "1.2.840.10040.4.3" => {
            Some("SHA-1 signature")
        }
        // RSASSA-PSS: the hash is in the parameters, and SHA-1 when absent.
        //= https://www.rfc-editor.org/rfc/rfc4055#section-3.1
        "1.2.840.113549.1.1.10" => {
            let params = RsaSsaPssParams::try_from(alg.parameters.as_ref()?).ok()?;
            match params.hash_algorithm_oid().to_id_string().as_str() {
                "1.3.14.3.2.26" => Some("SHA-1 signature"),
                "1.2.840.113549.2.5" => Some("MD5 signature"),
                _ => None,
            }
        }
        _ => None,
    }
}

/// The kind and size of a subject public key.
enum KeyKind {
    Rsa(u32),
    Ec {
        label: &'static str,
        name: String,
        bits: u32,
    },
    Dsa(u32),
    Ed25519,
    Ed448,
    Unknown,
}

fn key_kind(spki: &SubjectPublicKeyInfo<'_>) -> KeyKind {
    match spki.algorithm.algorithm.to_id_string().as_str() {
        "1.2.840.113549.1.1.1" => match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) => KeyKind::Rsa(integer_bits(rsa.modulus)),
            _ => KeyKind::Unknown,
        },
        // id-RSASSA-PSS keys carry a plain RSAPublicKey too.
        "1.2.840.113549.1.1.10" => match RSAPublicKey::from_der(&spki.subject_public_key.data) {
            Ok((_, rsa)) => KeyKind::Rsa(integer_bits(rsa.modulus)),
            Err(_) => KeyKind::Unknown,
        },
        "1.2.840.10045.2.1" => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|oid| oid.to_id_string());
            let named = match curve.as_deref() {
                Some("1.2.840.10045.3.1.1") => Some(("p192", "P-192", 192)),
                Some("1.3.132.0.33") => Some(("p224", "P-224", 224)),
                Some("1.2.840.10045.3.1.7") => Some(("p256", "P-256", 256)),
                Some("1.3.132.0.34") => Some(("p384", "P-384", 384)),
                Some("1.3.132.0.35") => Some(("p521", "P-521", 521)),
                Some("1.3.132.0.10") => Some(("secp256k1", "secp256k1", 256)),
                _ => None,
            };
            match named {
                Some((label, name, bits)) => KeyKind::Ec {
                    label,
                    name: name.into(),
                    bits,
                },
                None => {
                    // Unnamed or unusual curve: size it by its public point.
                    let bits = match spki.parsed() {
                        Ok(PublicKey::EC(point)) => {
                            u32::try_from(point.key_size()).unwrap_or(u32::MAX)
                        }
                        _ => 0,
                    };
                    KeyKind::Ec {
                        label: "",
                        name: format!("{bits}-bit curve"),
                        bits,
                    }
                }
            }
        }
        "1.2.840.10040.4.1" => match spki.parsed() {
            // The public value is below the prime: its size is the prime's
            // size to within a byte.
            Ok(PublicKey::DSA(y)) => KeyKind::Dsa(integer_bits(y).div_ceil(8) * 8),
            _ => KeyKind::Unknown,
        },
        "1.3.101.112" => KeyKind::Ed25519,
        "1.3.101.113" => KeyKind::Ed448,
        _ => KeyKind::Unknown,
    }
}

/// Why a public key is weak, if it is.
fn key_weakness(spki: &SubjectPublicKeyInfo<'_>) -> Option<String> {
    match key_kind(spki) {
        KeyKind::Rsa(bits) if bits < MIN_RSA_BITS => Some(format!("RSA-{bits} key")),
        KeyKind::Ec { name, bits, .. } if bits < MIN_EC_BITS => Some(format!("EC {name} key")),
        KeyKind::Dsa(bits) if bits < MIN_RSA_BITS => Some(format!("DSA-{bits} key")),
        _ => None,
    }
}

fn key_label(spki: &SubjectPublicKeyInfo<'_>) -> String {
    match key_kind(spki) {
        KeyKind::Rsa(bits) => format!("rsa-{bits}"),
        KeyKind::Ec {
            label: "", bits, ..
        } => format!("ec-{bits}"),
        KeyKind::Ec { label, .. } => format!("ec-{label}"),
        KeyKind::Dsa(bits) => format!("dsa-{bits}"),
        KeyKind::Ed25519 => "ed25519".into(),
        KeyKind::Ed448 => "ed448".into(),
        KeyKind::Unknown => "unknown".into(),
    }
}

/// Significant bits of a big-endian unsigned integer (leading zeros ignored).
fn integer_bits(bytes: &[u8]) -> u32 {
    let Some(start) = bytes.iter().position(|&b| b != 0) else {
        return 0;
    };
    let rest = bytes.len() - start;
    let top = bytes.get(start).copied().unwrap_or(0);
    let bits = (rest as u64 - 1) * 8 + u64::from(8 - top.leading_zeros());
    u32::try_from(bits).unwrap_or(u32::MAX)
}

/// The contents of a DER TLV (header stripped), when `tlv` is exactly one.
fn der_contents(tlv: &[u8]) -> Option<&[u8]> {
    let (_tag, rest) = tlv.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > std::mem::size_of::<usize>() {
            return None;
        }
        let (len_bytes, rest) = rest.split_at_checked(n)?;
        let len = len_bytes
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, rest)
    };
    (rest.len() == len).then_some(rest)
}

/// What the engine logs and mirrors about the upstream leaf.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LeafInfo {
    /// Subject DN as RFC 4514 text (most specific RDN first).
    pub subject: String,
    /// Issuer DN, same form.
    pub issuer: String,
    /// SHA-256 of the DER, lowercase hex.
    pub sha256: String,
    /// notBefore, Unix seconds.
    pub not_before: i64,
    /// notAfter, Unix seconds.
    pub not_after: i64,
    /// "ec-p256", "ec-p384", "rsa-2048", "ed25519", ...
    pub key: String,
}

/// Describes a leaf certificate (DER).
pub fn leaf_info(der: &[u8]) -> Result<LeafInfo, CertError> {
    let cert = match X509Certificate::from_der(der) {
        Ok(([], cert)) => cert,
        Ok(_) => {
            return Err(CertError::Malformed(
                "trailing data after the certificate".into(),
            ))
        }
        Err(e) => return Err(CertError::Malformed(e.to_string())),
    };
    let digest = Sha256::digest(der);
    let mut sha256 = String::with_capacity(64);
    for b in digest {
        let _ = write!(sha256, "{b:02x}");
    }
    let validity = cert.validity();
    Ok(LeafInfo {
        subject: dn_text(cert.subject()),
        issuer: dn_text(cert.issuer()),
        sha256,
        not_before: validity.not_before.timestamp(),
        not_after: validity.not_after.timestamp(),
        key: key_label(cert.public_key()),
    })
}

/// A DN as RFC 4514 text: RDNs in reverse order, joined with ",";
/// multi-valued RDNs joined with "+"; values that are not strings as "#hex".
/// Control characters are escaped too, so that hostile names cannot forge
/// log lines.
//= https://www.rfc-editor.org/rfc/rfc4514#section-2.1
fn dn_text(name: &X509Name<'_>) -> String {
    let mut out = String::new();
    let rdns: Vec<_> = name.iter_rdn().collect();
    for (i, rdn) in rdns.iter().rev().enumerate() {
        if i > 0 {
            out.push(',');
        }
        for (j, atv) in rdn.iter().enumerate() {
            if j > 0 {
                out.push('+');
            }
            let oid = atv.attr_type();
            //= https://www.rfc-editor.org/rfc/rfc4514#section-3
            let short = match oid.to_id_string().as_str() {
                "2.5.4.3" => Some("CN"),
                "2.5.4.7" => Some("L"),
                "2.5.4.8" => Some("ST"),
                "2.5.4.10" => Some("O"),
                "2.5.4.11" => Some("OU"),
                "2.5.4.6" => Some("C"),
                "2.5.4.9" => Some("STREET"),
                "0.9.2342.19200300.100.1.25" => Some("DC"),
                "0.9.2342.19200300.100.1.1" => Some("UID"),
                _ => None,
            };
            match short {
                Some(s) => out.push_str(s),
                None => match oid2abbrev(oid, oid_registry()) {
                    Ok(s) => out.push_str(s),
                    Err(_) => out.push_str(&oid.to_id_string()),
                },
            }
            out.push('=');
            match atv.as_str() {
                Ok(value) => escape_dn_value(value, &mut out),
                Err(_) => {
                    out.push('#');
                    for b in atv.attr_value().data.iter() {
                        let _ = write!(out, "{b:02x}");
                    }
                }
            }
        }
    }
    out
}

//= https://www.rfc-editor.org/rfc/rfc4514#section-2.4
fn escape_dn_value(value: &str, out: &mut String) {
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        match c {
            '"' | '+' | ',' | ';' | '<' | '>' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '#' if i == 0 => out.push_str("\\#"),
            ' ' if i == 0 || i == last => out.push_str("\\ "),
            c if c.is_control() => {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    let _ = write!(out, "\\{b:02x}");
                }
            }
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use rcgen::{
        date_time_ymd, BasicConstraints, CertificateParams, CertificateRevocationListParams,
        DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair,
        KeyUsagePurpose, RevocationReason, RevokedCertParams, RsaKeySize, SerialNumber,
    };

    use super::*;

    type Date = (i32, u8, u8);

    fn at((y, m, d): Date) -> UnixTime {
        let secs = date_time_ymd(y, m, d).unix_timestamp();
        UnixTime::since_unix_epoch(std::time::Duration::from_secs(secs as u64))
    }

    /// The moment every test judges at, unless it says otherwise.
    fn now() -> UnixTime {
        at((2030, 1, 1))
    }

    fn dns(name: &str) -> ServerName<'static> {
        ServerName::try_from(name.to_string()).unwrap()
    }

    fn dn(cn: &str) -> DistinguishedName {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Loupe Test");
        dn.push(DnType::CommonName, cn);
        dn
    }

    fn p256() -> KeyPair {
        KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
    }

    struct Ca {
        der: CertificateDer<'static>,
        issuer: Issuer<'static, KeyPair>,
    }

    fn ca_params(cn: &str, from: Date, until: Date) -> CertificateParams {
        let mut p = CertificateParams::default();
        p.distinguished_name = dn(cn);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        p.not_before = date_time_ymd(from.0, from.1, from.2);
        p.not_after = date_time_ymd(until.0, until.1, until.2);
        p
    }

    fn root(cn: &str) -> Ca {
        let key = p256();
        let params = ca_params(cn, (2020, 1, 1), (2040, 1, 1));
        let der = params.self_signed(&key).unwrap().der().clone();
        Ca {
            der,
            issuer: Issuer::new(params, key),
        }
    }

    fn sub_ca(params: CertificateParams, key: KeyPair, parent: &Ca) -> Ca {
        let der = params
            .signed_by(&key, &parent.issuer)
            .unwrap()
            .der()
            .clone();
        Ca {
            der,
            issuer: Issuer::new(params, key),
        }
    }

    fn intermediate(cn: &str, parent: &Ca) -> Ca {
        sub_ca(ca_params(cn, (2020, 1, 1), (2040, 1, 1)), p256(), parent)
    }

    fn leaf_params(sans: &[&str]) -> CertificateParams {
        let mut p =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        p.distinguished_name = dn(sans.first().copied().unwrap_or("leaf"));
        p.not_before = date_time_ymd(2025, 1, 1);
        p.not_after = date_time_ymd(2035, 1, 1);
        p
    }

    fn sign(params: &CertificateParams, key: &KeyPair, parent: &Ca) -> CertificateDer<'static> {
        params.signed_by(key, &parent.issuer).unwrap().der().clone()
    }

    /// root -> intermediate, with a store holding the root.
    struct Pki {
        root: Ca,
        int: Ca,
        store: TrustStore,
    }

    fn pki() -> Pki {
        let root = root("Loupe Test Root");
        let int = intermediate("Loupe Test Intermediate", &root);
        let store = TrustStore::from_der(std::slice::from_ref(&root.der)).unwrap();
        Pki { root, int, store }
    }

    impl Pki {
        /// A chain (leaf, intermediate) for a leaf built from `params`.
        fn chain(&self, params: &CertificateParams, key: &KeyPair) -> Vec<CertificateDer<'static>> {
            vec![sign(params, key, &self.int), self.int.der.clone()]
        }

        fn simple_chain(&self, sans: &[&str]) -> Vec<CertificateDer<'static>> {
            self.chain(&leaf_params(sans), &p256())
        }
    }

    fn untrusted(reason: &str) -> Verdict {
        Verdict {
            untrusted: Some(reason.into()),
            ..Verdict::default()
        }
    }

    fn name_mismatch() -> Verdict {
        Verdict {
            name_mismatch: true,
            ..Verdict::default()
        }
    }

    fn weak(reason: &str) -> Verdict {
        Verdict {
            weak: Some(reason.into()),
            ..Verdict::default()
        }
    }

    struct TempFile(PathBuf);

    impl TempFile {
        fn new(name: &str, contents: &[u8]) -> TempFile {
            static N: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "loupe-verify-{}-{}-{name}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::write(&path, contents).unwrap();
            TempFile(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn pem(der: &[u8], label: &str) -> String {
        // Minimal base64 so the tests need no extra crate.
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut b64 = String::new();
        for chunk in der.chunks(3) {
            let n =
                chunk.iter().fold(0u32, |a, &b| (a << 8) | u32::from(b)) << (8 * (3 - chunk.len()));
            for i in 0..4 {
                if i <= chunk.len() {
                    b64.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    b64.push('=');
                }
            }
        }
        let mut out = format!("-----BEGIN {label}-----\n");
        for line in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(line).unwrap());
            out.push('\n');
        }
        out.push_str(&format!("-----END {label}-----\n"));
        out
    }

    fn crl(issuer: &Ca, serials: &[u8]) -> CertificateRevocationListDer<'static> {
        CertificateRevocationListParams {
            this_update: date_time_ymd(2029, 12, 1),
            next_update: date_time_ymd(2030, 2, 1),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|&s| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&[s]),
                    revocation_time: date_time_ymd(2029, 12, 1),
                    reason_code: Some(RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&issuer.issuer)
        .unwrap()
        .der()
        .clone()
    }

    fn legacy(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    fn legacy_store() -> TrustStore {
        TrustStore::from_der(&[legacy(LEGACY_ROOT)]).unwrap()
    }

    // --- good chains -------------------------------------------------------

    #[test]
    fn p256_leaf_is_trusted() {
        let pki = pki();
        let chain = pki.simple_chain(&["www.example.test"]);
        let v = classify(&pki.store, &chain, &dns("www.example.test"), now());
        assert_eq!(v, Verdict::default());
        assert!(v.trusted());
        assert!(v.labels().is_empty());
    }

    #[test]
    fn p384_leaf_is_trusted() {
        let pki = pki();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let chain = pki.chain(&leaf_params(&["www.example.test"]), &key);
        let v = classify(&pki.store, &chain, &dns("www.example.test"), now());
        assert_eq!(v, Verdict::default());
    }

    #[test]
    fn rsa2048_leaf_is_trusted() {
        let pki = pki();
        let key = KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, RsaKeySize::_2048).unwrap();
        let chain = pki.chain(&leaf_params(&["www.example.test"]), &key);
        let v = classify(&pki.store, &chain, &dns("www.example.test"), now());
        assert_eq!(v, Verdict::default());
    }

    #[test]
    fn rsa4096_leaf_is_trusted() {
        let pki = pki();
        let key = KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, RsaKeySize::_4096).unwrap();
        let chain = pki.chain(&leaf_params(&["www.example.test"]), &key);
        let v = classify(&pki.store, &chain, &dns("www.example.test"), now());
        assert_eq!(v, Verdict::default());
    }

    #[test]
    fn wildcard_leaf_matches_exactly_one_label() {
        let pki = pki();
        let chain = pki.simple_chain(&["*.example.test"]);
        let judge = |name: &str| classify(&pki.store, &chain, &dns(name), now());
        assert_eq!(judge("a.example.test"), Verdict::default());
        assert_eq!(judge("example.test"), name_mismatch());
        assert_eq!(judge("a.b.example.test"), name_mismatch());
    }

    #[test]
    fn leaf_with_100_sans_matches_the_100th() {
        let pki = pki();
        let names: Vec<String> = (1..=100).map(|i| format!("host{i}.example.test")).collect();
        let sans: Vec<&str> = names.iter().map(String::as_str).collect();
        let chain = pki.simple_chain(&sans);
        let judge = |name: &str| classify(&pki.store, &chain, &dns(name), now());
        assert_eq!(judge("host100.example.test"), Verdict::default());
        assert_eq!(judge("host101.example.test"), name_mismatch());
    }

    #[test]
    fn idn_name_in_a_label_form_matches() {
        let pki = pki();
        let chain = pki.simple_chain(&["xn--bcher-kva.example.test"]);
        let v = classify(
            &pki.store,
            &chain,
            &dns("xn--bcher-kva.example.test"),
            now(),
        );
        assert_eq!(v, Verdict::default());
    }

    #[test]
    fn ip_address_san_matches_ip_server_name() {
        let pki = pki();
        let chain = pki.simple_chain(&["192.0.2.10", "2001:db8::1"]);
        let ip = |s: &str| ServerName::from(s.parse::<IpAddr>().unwrap());
        let judge = |name: ServerName<'_>| classify(&pki.store, &chain, &name, now());
        assert_eq!(judge(ip("192.0.2.10")), Verdict::default());
        assert_eq!(judge(ip("2001:db8::1")), Verdict::default());
        assert_eq!(judge(ip("192.0.2.11")), name_mismatch());
    }

    #[test]
    fn chain_sent_with_its_root_is_trusted() {
        let pki = pki();
        let mut chain = pki.simple_chain(&["www.example.test"]);
        chain.push(pki.root.der.clone());
        let v = classify(&pki.store, &chain, &dns("www.example.test"), now());
        assert_eq!(v, Verdict::default());
    }

    #[test]
    fn extra_certificate_off_the_path_is_not_judged() {
        let pki = pki();
        let other = root("Unrelated Root");
        let mut stale = leaf_params(&["stale.example.test"]);
        stale.not_before = date_time_ymd(2010, 1, 1);
        stale.not_after = date_time_ymd(2011, 1, 1);
        let mut chain = pki.simple_chain(&["www.example.test"]);
        chain.push(sign(&stale, &p256(), &other));
        let v = classify(&pki.store, &chain, &dns("www.example.test"), now());
        assert_eq!(v, Verdict::default());
    }

    #[test]
    fn stale_copy_of_the_intermediate_is_ignored() {
        let root = root("Loupe Test Root");
        let key = p256();
        let old = ca_params("Loupe Test Intermediate", (2015, 1, 1), (2020, 1, 1));
        let current = ca_params("Loupe Test Intermediate", (2020, 1, 1), (2040, 1, 1));
        let old_der = old.signed_by(&key, &root.issuer).unwrap().der().clone();
        let int = sub_ca(current, key, &root);
        let store = TrustStore::from_der(std::slice::from_ref(&root.der)).unwrap();
        let leaf = sign(&leaf_params(&["www.example.test"]), &p256(), &int);
        let chain = vec![leaf, old_der, int.der.clone()];
        let v = classify(&store, &chain, &dns("www.example.test"), now());
        assert_eq!(v, Verdict::default());
    }

    #[test]
    fn pinned_self_signed_leaf_is_trusted() {
        let key = p256();
        let leaf = leaf_params(&["pinned.example.test"])
            .self_signed(&key)
            .unwrap();
        let store = TrustStore::from_der(&[leaf.der().clone()]).unwrap();
        let v = classify(
            &store,
            &[leaf.der().clone()],
            &dns("pinned.example.test"),
            now(),
        );
        assert_eq!(v, Verdict::default());
    }

    // --- time ----------------------------------------------------------------

    #[test]
    fn expired_leaf_is_expired_only() {
        let pki = pki();
        let mut params = leaf_params(&["www.example.test"]);
        params.not_before = date_time_ymd(2021, 1, 1);
        params.not_after = date_time_ymd(2022, 1, 1);
        let chain = pki.chain(&params, &p256());
        let v = classify(&pki.store, &chain, &dns("www.example.test"), now());
        let expected = Verdict {
            expired: true,
            ..Verdict::default()
        };
        assert_eq!(v, expected);
        assert_eq!(v.labels(), ["expired"]);
    }

    #[test]
    fn expired_intermediate_is_expired_only() {
        let root = root("Loupe Test Root");
        let int = sub_ca(
            ca_params("Loupe Test Intermediate", (2020, 1, 1), (2026, 1, 1)),
            p256(),
            &root,
        );
        let store = TrustStore::from_der(std::slice::from_ref(&root.der)).unwrap();
        let leaf = sign(&leaf_params(&["www.example.test"]), &p256(), &int);
        let v = classify(
            &store,
            &[leaf, int.der.clone()],
            &dns("www.example.test"),
            now(),
        );
        let expected = Verdict {
            expired: true,
            ..Verdict::default()
        };
        assert_eq!(v, expected);
    }

    #[test]
    fn leaf_before_not_before_is_not_yet_valid_only() {
        let pki = pki();
        let mut params = leaf_params(&["www.example.test"]);
        params.not_before = date_time_ymd(2031, 1, 1);
        let chain = pki.chain(&params, &p256());
        let v = classify(&pki.store, &chain, &dns("www.example.test"), now());
        let expected = Verdict {
            not_yet_valid: true,
            ..Verdict::default()
        };
        assert_eq!(v, expected);
        assert_eq!(v.labels(), ["not-yet-valid"]);
    }

    #[test]
    fn validity_ends_are_inclusive() {
        let pki = pki();
        let chain = pki.simple_chain(&["www.example.test"]);
        let name = dns("www.example.test");
        let end = at((2035, 1, 1));
        assert_eq!(classify(&pki.store, &chain, &name, end), Verdict::default());
        let after = UnixTime::since_unix_epoch(std::time::Duration::from_secs(end.as_secs() + 1));
        assert!(classify(&pki.store, &chain, &name, after).expired);
    }

    #[test]
    fn expired_and_untrusted_are_both_reported() {
        let pki = pki();
        let stranger = root("Stranger Root");
        let stranger_int = intermediate("Stranger Intermediate", &stranger);
        let mut params = leaf_params(&["www.example.test"]);
        params.not_before = date_time_ymd(2021, 1, 1);
        params.not_after = date_time_ymd(2022, 1, 1);
        let chain = vec![
            sign(&params, &p256(), &stranger_int),
            stranger_int.der.clone(),
        ];
        let v = classify(&pki.store, &chain, &dns("www.example.test"), now());
        let expected = Verdict {
            expired: true,
            untrusted: Some("unknown issuer".into()),
            ..Verdict::default()
        };
        assert_eq!(v, expected);
        assert_eq!(v.labels(), ["expired", "untrusted"]);
    }

    #[test]
    fn chain_whose_validity_periods_never_overlap_is_untrusted() {
        let root = root("Loupe Test Root");
        let int = sub_ca(
            ca_params("Loupe Test Intermediate", (2020, 1, 1), (2024, 1, 1)),
            p256(),
            &root,
        );
        let store = TrustStore::from_der(std::slice::from_ref(&root.der)).unwrap();
        let leaf = sign(&leaf_params(&["www.example.test"]), &p256(), &int);
        let v = classify(
            &store,
            &[leaf, int.der.clone()],
            &dns("www.example.test"),
            now(),
        );
        let expected = Verdict {
            expired: true,
            untrusted: Some("validity periods of the chain do not overlap".into()),
            ..Verdict::default()
        };
        assert_eq!(v, expected);
    }

    // --- name ----------------------------------------------------------------

    #[test]
    fn wrong_host_is_name_mismatch_only() {
        let pki = pki();
        let chain = pki.simple_chain(&["www.example.test"]);
        let v = classify(&pki.store, &chain, &dns("other.example.test"), now());
        assert_eq!(v, name_mismatch());
        assert_eq!(v.labels(), ["name-mismatch"]);
    }

    // --- trust ---------------------------------------------------------------

    #[test]
    fn self_signed_leaf_is_untrusted_self_signed() {
        let pki = pki();
        let leaf = leaf_params(&["self.example.test"])
            .self_signed(&p256())
            .unwrap();
        let v = classify(
            &pki.store,
            &[leaf.der().clone()],
            &dns("self.example.test"),
            now(),
        );
        assert_eq!(v, untrusted("self-signed"));
    }

    #[test]
    fn self_signed_leaf_for_another_host_is_untrusted_and_name_mismatch() {
        let pki = pki();
        let leaf = leaf_params(&["self.example.test"])
            .self_signed(&p256())
            .unwrap();
        let v = classify(
            &pki.store,
            &[leaf.der().clone()],
            &dns("www.example.test"),
            now(),
        );
        let expected = Verdict {
            untrusted: Some("self-signed".into()),
            name_mismatch: true,
            ..Verdict::default()
        };
        assert_eq!(v, expected);
    }

    #[test]
    fn self_signed_ca_leaf_is_untrusted_self_signed() {
        let pki = pki();
        let mut params = leaf_params(&["self.example.test"]);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let leaf = params.self_signed(&p256()).unwrap();
        let v = classify(
            &pki.store,
            &[leaf.der().clone()],
            &dns("self.example.test"),
            now(),
        );
        assert_eq!(v, untrusted("self-signed"));
    }

    #[test]
    fn chain_from_unknown_ca_is_untrusted_unknown_issuer() {
        let pki = pki();
        let stranger = root("Stranger Root");
        let stranger_int = intermediate("Stranger Intermediate", &stranger);
        let leaf = sign(&leaf_params(&["www.example.test"]), &p256(), &stranger_int);
        let chain = vec![leaf, stranger_int.der.clone()];
        let v = classify(&pki.store, &chain, &dns("www.example.test"), now());
        assert_eq!(v, untrusted("unknown issuer"));
    }

    #[test]
    fn chain_ending_at_a_presented_unknown_root_is_untrusted_unknown_root() {
        let pki = pki();
        let stranger = root("Stranger Root");
        let stranger_int = intermediate("Stranger Intermediate", &stranger);
        let leaf = sign(&leaf_params(&["www.example.test"]), &p256(), &stranger_int);
        let chain = vec![leaf, stranger_int.der.clone(), stranger.der.clone()];
        let v = classify(&pki.store, &chain, &dns("www.example.test"), now());
        assert_eq!(v, untrusted("unknown root"));
    }

    #[test]
    fn missing_intermediate_is_untrusted() {
        let pki = pki();
        let chain = pki.simple_chain(&["www.example.test"]);
        let leaf_only = &chain[..1];
        let v = classify(&pki.store, leaf_only, &dns("www.example.test"), now());
        assert_eq!(v, untrusted("unknown issuer"));
    }

    /// The verdict on a leaf for www.example.test issued by an
    /// intermediate made from `params` under a trusted root.
    fn through_intermediate(params: CertificateParams) -> Verdict {
        let root = root("Loupe Test Root");
        let int = sub_ca(params, p256(), &root);
        let store = TrustStore::from_der(std::slice::from_ref(&root.der)).unwrap();
        let leaf = sign(&leaf_params(&["www.example.test"]), &p256(), &int);
        classify(
            &store,
            &[leaf, int.der.clone()],
            &dns("www.example.test"),
            now(),
        )
    }

    #[test]
    fn intermediate_with_ca_false_is_untrusted_issuer_not_ca() {
        let mut params = ca_params("Not A CA", (2020, 1, 1), (2040, 1, 1));
        params.is_ca = IsCa::ExplicitNoCa;
        let v = through_intermediate(params);
        assert_eq!(v, untrusted("issuer is not a CA"));
    }

    #[test]
    fn intermediate_without_basic_constraints_is_untrusted_issuer_not_ca() {
        let mut params = ca_params("Not A CA", (2020, 1, 1), (2040, 1, 1));
        params.is_ca = IsCa::NoCa;
        let v = through_intermediate(params);
        assert_eq!(v, untrusted("issuer is not a CA"));
    }

    #[test]
    fn intermediate_without_key_cert_sign_is_untrusted() {
        let mut params = ca_params("Signs No Certificates", (2020, 1, 1), (2040, 1, 1));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let v = through_intermediate(params);
        assert_eq!(
            v,
            untrusted("issuer's key usage does not allow certificate signing")
        );
        // One whose key usage includes keyCertSign is trusted.
        let pki = pki();
        let v = classify(
            &pki.store,
            &pki.simple_chain(&["www.example.test"]),
            &dns("www.example.test"),
            now(),
        );
        assert!(v.trusted(), "{v:?}");
    }

    #[test]
    fn a_leaf_whose_key_usage_does_not_allow_signing_is_untrusted() {
        let pki = pki();
        let name = dns("www.example.test");
        let mut params = leaf_params(&["www.example.test"]);
        params.key_usages = vec![KeyUsagePurpose::KeyEncipherment];
        let v = classify(&pki.store, &pki.chain(&params, &p256()), &name, now());
        assert_eq!(
            v,
            untrusted("leaf's key usage does not allow signing (no digitalSignature)")
        );
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let v = classify(&pki.store, &pki.chain(&params, &p256()), &name, now());
        assert!(v.trusted(), "{v:?}");
    }

    #[test]
    fn an_unknown_critical_extension_is_named_not_dumped() {
        let pki = pki();
        let mut params = leaf_params(&["www.example.test"]);
        let mut ext =
            rcgen::CustomExtension::from_oid_content(&[1, 3, 6, 1, 4, 1, 55555, 1], vec![5, 0]);
        ext.set_criticality(true);
        params.custom_extensions.push(ext);
        let chain = pki.chain(&params, &p256());
        let v = classify(&pki.store, &chain, &dns("www.example.test"), now());
        let why = v.untrusted.expect("untrusted");
        assert!(why.contains("unsupported critical extension"), "{why}");
        assert!(!why.contains("Other("), "{why}");
    }

    #[test]
    fn ca_certificate_as_leaf_is_untrusted() {
        let pki = pki();
        let mut params = leaf_params(&["www.example.test"]);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let chain = pki.chain(&params, &p256());
        let v = classify(&pki.store, &chain, &dns("www.example.test"), now());
        assert_eq!(v, untrusted("CA certificate used as server certificate"));
    }

    #[test]
    fn client_auth_only_leaf_is_untrusted() {
        let pki = pki();
        let mut params = leaf_params(&["www.example.test"]);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let chain = pki.chain(&params, &p256());
        let v = classify(&pki.store, &chain, &dns("www.example.test"), now());
        assert_eq!(
            v,
            untrusted("not valid for server authentication (extended key usage)")
        );
    }

    #[test]
    fn leaf_signed_by_an_impostor_key_is_untrusted_bad_signature() {
        let pki = pki();
        let impostor = Ca {
            der: pki.int.der.clone(),
            issuer: Issuer::new(
                ca_params("Loupe Test Intermediate", (2020, 1, 1), (2040, 1, 1)),
                p256(),
            ),
        };
        let leaf = sign(&leaf_params(&["www.example.test"]), &p256(), &impostor);
        let v = classify(
            &pki.store,
            &[leaf, pki.int.der.clone()],
            &dns("www.example.test"),
            now(),
        );
        assert_eq!(v, untrusted("bad signature"));
    }

    // --- malformed input -----------------------------------------------------

    #[test]
    fn empty_chain_is_untrusted_no_certificate() {
        let pki = pki();
        let v = classify(&pki.store, &[], &dns("www.example.test"), now());
        assert_eq!(v, untrusted("no certificate"));
    }

    #[test]
    fn malformed_leaf_is_untrusted_malformed() {
        let pki = pki();
        let chain = [CertificateDer::from(
            b"\x30\x03\x02\x01\x00garbage".to_vec(),
        )];
        let v = classify(&pki.store, &chain, &dns("www.example.test"), now());
        let reason = v.untrusted.clone().unwrap();
        assert!(
            reason.starts_with("malformed certificate: leaf: "),
            "{reason}"
        );
        assert_eq!(v, untrusted(&reason));
    }

    #[test]
    fn malformed_intermediate_is_untrusted_malformed() {
        let pki = pki();
        let mut chain = pki.simple_chain(&["www.example.test"]);
        chain.push(CertificateDer::from(vec![0xff; 40]));
        let v = classify(&pki.store, &chain, &dns("www.example.test"), now());
        let reason = v.untrusted.clone().unwrap();
        assert!(
            reason.starts_with("malformed certificate: intermediate 2: "),
            "{reason}"
        );
        assert_eq!(v, untrusted(&reason));
    }

    #[test]
    fn truncated_or_corrupted_certificates_never_panic() {
        let pki = pki();
        let chain = pki.simple_chain(&["www.example.test"]);
        let name = dns("www.example.test");
        let leaf = chain[0].as_ref().to_vec();
        for len in 0..leaf.len() {
            let bad = vec![CertificateDer::from(leaf[..len].to_vec()), chain[1].clone()];
            let v = classify(&pki.store, &bad, &name, now());
            assert!(!v.trusted());
            let swapped = vec![chain[0].clone(), CertificateDer::from(leaf[..len].to_vec())];
            assert!(!classify(&pki.store, &swapped, &name, now()).trusted());
        }
        for i in 0..leaf.len() {
            let mut bad = leaf.clone();
            bad[i] ^= 0xff;
            let v = classify(
                &pki.store,
                &[CertificateDer::from(bad), chain[1].clone()],
                &name,
                now(),
            );
            assert!(!v.trusted(), "flipping byte {i} kept the chain trusted");
        }
    }

    // --- strength --------------------------------------------------------------

    #[test]
    fn sha1_signed_leaf_is_weak_only() {
        let store = legacy_store();
        let v = classify(
            &store,
            &[legacy(LEGACY_SHA1)],
            &dns("sha1.legacy.test"),
            now(),
        );
        assert_eq!(v, weak("SHA-1 signature"));
        assert_eq!(v.labels(), ["weak"]);
    }

    #[test]
    fn rsa1024_leaf_is_weak_only() {
        let store = legacy_store();
        let v = classify(
            &store,
            &[legacy(LEGACY_RSA1024)],
            &dns("rsa1024.legacy.test"),
            now(),
        );
        assert_eq!(v, weak("RSA-1024 key"));
    }

    #[test]
    fn p192_leaf_is_weak_only() {
        let store = legacy_store();
        let v = classify(
            &store,
            &[legacy(LEGACY_P192)],
            &dns("p192.legacy.test"),
            now(),
        );
        assert_eq!(v, weak("EC P-192 key"));
    }

    #[test]
    fn intermediate_with_rsa1024_key_is_weak_only() {
        let store = legacy_store();
        let chain = [legacy(LEGACY_UNDERWEAK), legacy(LEGACY_WEAKCA)];
        let v = classify(&store, &chain, &dns("underweak.legacy.test"), now());
        assert_eq!(v, weak("RSA-1024 key"));
    }

    #[test]
    fn md5_signed_leaf_is_weak_and_untrusted() {
        let store = legacy_store();
        let v = classify(
            &store,
            &[legacy(LEGACY_MD5)],
            &dns("md5.legacy.test"),
            now(),
        );
        let expected = Verdict {
            untrusted: Some("unsupported signature algorithm".into()),
            weak: Some("MD5 signature".into()),
            ..Verdict::default()
        };
        assert_eq!(v, expected);
    }

    #[test]
    fn presented_copy_of_the_anchor_is_not_judged() {
        // The anchor is relied on, not the copy the server sent.
        let store = legacy_store();
        let chain = [legacy(LEGACY_RSA1024), legacy(LEGACY_ROOT)];
        let v = classify(&store, &chain, &dns("rsa1024.legacy.test"), now());
        assert_eq!(v, weak("RSA-1024 key"));
    }

    #[test]
    fn ecdsa_sha1_signed_leaf_is_weak_only() {
        let store = TrustStore::from_der(&[legacy(LEGACY_ECROOT)]).unwrap();
        let v = classify(
            &store,
            &[legacy(LEGACY_ECSHA1)],
            &dns("ecsha1.legacy.test"),
            now(),
        );
        assert_eq!(v, weak("SHA-1 signature"));
    }

    #[test]
    fn sha1_self_signature_of_an_unknown_root_is_not_weak() {
        // Nobody verifies a root's own signature, so it weakens nothing; the
        // chain is untrusted for what it is: it ends at a root nobody trusts.
        let store = legacy_store();
        let chain = [legacy(LEGACY_UNDERSHA1ROOT), legacy(LEGACY_SHA1ROOT)];
        let v = classify(&store, &chain, &dns("undersha1root.legacy.test"), now());
        assert_eq!(v, untrusted("unknown root"));
    }

    #[test]
    fn stale_intermediate_does_not_mask_unknown_issuer() {
        // webpki ranks the stale copy's expiry above "unknown issuer"; the
        // verdict must still say why the chain is untrusted, and not expired.
        let root = root("Stranger Root");
        let key = p256();
        let old = ca_params("Loupe Test Intermediate", (2015, 1, 1), (2020, 1, 1));
        let current = ca_params("Loupe Test Intermediate", (2020, 1, 1), (2040, 1, 1));
        let old_der = old.signed_by(&key, &root.issuer).unwrap().der().clone();
        let int = sub_ca(current, key, &root);
        let leaf = sign(&leaf_params(&["www.example.test"]), &p256(), &int);
        let chain = vec![leaf, old_der, int.der.clone()];
        let v = classify(&pki().store, &chain, &dns("www.example.test"), now());
        assert_eq!(v, untrusted("unknown issuer"));
    }

    // --- revocation ------------------------------------------------------------

    fn revocable_chain(pki: &Pki) -> Vec<CertificateDer<'static>> {
        let mut params = leaf_params(&["www.example.test"]);
        params.serial_number = Some(SerialNumber::from_slice(&[0x42]));
        pki.chain(&params, &p256())
    }

    #[test]
    fn revoked_leaf_with_crl_is_revoked_only() {
        let pki = pki();
        let store = pki
            .store
            .clone()
            .with_crls([crl(&pki.int, &[0x42])])
            .unwrap();
        let chain = revocable_chain(&pki);
        let v = classify(&store, &chain, &dns("www.example.test"), now());
        let expected = Verdict {
            revoked: true,
            ..Verdict::default()
        };
        assert_eq!(v, expected);
        assert_eq!(v.labels(), ["revoked"]);
        // Without the CRL, the same chain is fine.
        assert_eq!(
            classify(&pki.store, &chain, &dns("www.example.test"), now()),
            Verdict::default()
        );
    }

    #[test]
    fn revoked_intermediate_is_revoked() {
        let root = root("Loupe Test Root");
        let mut params = ca_params("Loupe Test Intermediate", (2020, 1, 1), (2040, 1, 1));
        params.serial_number = Some(SerialNumber::from_slice(&[0x07]));
        let int = sub_ca(params, p256(), &root);
        let store = TrustStore::from_der(std::slice::from_ref(&root.der))
            .unwrap()
            .with_crls([crl(&root, &[0x07])])
            .unwrap();
        let leaf = sign(&leaf_params(&["www.example.test"]), &p256(), &int);
        let v = classify(
            &store,
            &[leaf, int.der.clone()],
            &dns("www.example.test"),
            now(),
        );
        assert!(v.revoked);
        assert_eq!(v.labels(), ["revoked"]);
    }

    #[test]
    fn revoked_and_expired_are_both_reported() {
        let pki = pki();
        let store = pki
            .store
            .clone()
            .with_crls([crl(&pki.int, &[0x42])])
            .unwrap();
        let mut params = leaf_params(&["www.example.test"]);
        params.serial_number = Some(SerialNumber::from_slice(&[0x42]));
        params.not_before = date_time_ymd(2021, 1, 1);
        params.not_after = date_time_ymd(2022, 1, 1);
        let chain = pki.chain(&params, &p256());
        let v = classify(&store, &chain, &dns("www.example.test"), now());
        let expected = Verdict {
            expired: true,
            revoked: true,
            ..Verdict::default()
        };
        assert_eq!(v, expected);
    }

    #[test]
    fn crl_of_another_ca_does_not_affect_a_chain() {
        let pki = pki();
        let other = root("Other Root");
        let store = TrustStore::from_der(&[pki.root.der.clone(), other.der.clone()])
            .unwrap()
            .with_crls([crl(&other, &[0x42])])
            .unwrap();
        let chain = revocable_chain(&pki);
        assert_eq!(
            classify(&store, &chain, &dns("www.example.test"), now()),
            Verdict::default()
        );
    }

    #[test]
    fn crl_files_in_pem_and_der_are_read() {
        let pki = pki();
        let crl = crl(&pki.int, &[0x42]);
        let pem_file = TempFile::new("crl.pem", pem(crl.as_ref(), "X509 CRL").as_bytes());
        let der_file = TempFile::new("crl.der", crl.as_ref());
        let chain = revocable_chain(&pki);
        for file in [&pem_file, &der_file] {
            let store = pki.store.clone().with_crl_files(&[&file.0]).unwrap();
            assert_eq!(store.crl_count(), 1);
            assert!(classify(&store, &chain, &dns("www.example.test"), now()).revoked);
        }
    }

    #[test]
    fn crl_file_errors_name_the_file() {
        let pki = pki();
        let missing = PathBuf::from("/nonexistent/loupe/revoked.crl");
        let err = pki.store.clone().with_crl_files(&[missing]).unwrap_err();
        assert!(matches!(err, TrustError::Unreadable { .. }), "{err}");
        assert!(
            err.to_string().contains("/nonexistent/loupe/revoked.crl"),
            "{err}"
        );

        let cert_pem = TempFile::new(
            "not-a-crl.pem",
            pem(pki.root.der.as_ref(), "CERTIFICATE").as_bytes(),
        );
        let err = pki
            .store
            .clone()
            .with_crl_files(&[&cert_pem.0])
            .unwrap_err();
        assert!(matches!(err, TrustError::NoCrl { .. }), "{err}");

        let junk = TempFile::new("junk.crl", b"\x30\x03\x02\x01\x00");
        let err = pki.store.clone().with_crl_files(&[&junk.0]).unwrap_err();
        assert!(matches!(err, TrustError::BadCrl { .. }), "{err}");
        assert!(
            err.to_string().contains(&junk.0.display().to_string()),
            "{err}"
        );
    }

    // --- trust store -----------------------------------------------------------

    #[test]
    fn pem_file_with_two_roots_loads_both() {
        let a = root("Root A");
        let b = root("Root B");
        let text = pem(a.der.as_ref(), "CERTIFICATE") + &pem(b.der.as_ref(), "CERTIFICATE");
        let file = TempFile::new("roots.pem", text.as_bytes());
        let store = TrustStore::from_pem_file(&file.0).unwrap();
        assert_eq!(store.len(), 2);
        assert!(!store.is_empty());
    }

    #[test]
    fn pem_file_missing_is_unreadable_and_names_the_path() {
        let err = TrustStore::from_pem_file(Path::new("/nonexistent/loupe/ca.pem")).unwrap_err();
        assert!(matches!(err, TrustError::Unreadable { .. }), "{err}");
        assert!(
            err.to_string().contains("/nonexistent/loupe/ca.pem"),
            "{err}"
        );
    }

    #[test]
    fn pem_file_without_certificates_is_rejected() {
        let file = TempFile::new("empty.pem", b"just some text\n");
        let err = TrustStore::from_pem_file(&file.0).unwrap_err();
        assert!(matches!(err, TrustError::NoCertificates { .. }), "{err}");
        assert!(
            err.to_string().contains(&file.0.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn pem_file_with_garbage_base64_is_rejected() {
        let text = "-----BEGIN CERTIFICATE-----\n!!!! not base64 !!!!\n-----END CERTIFICATE-----\n";
        let file = TempFile::new("garbage.pem", text.as_bytes());
        let err = TrustStore::from_pem_file(&file.0).unwrap_err();
        assert!(matches!(err, TrustError::BadPem { .. }), "{err}");
    }

    #[test]
    fn pem_file_with_a_bad_certificate_is_rejected() {
        let good = root("Root A");
        let text =
            pem(good.der.as_ref(), "CERTIFICATE") + &pem(b"not a certificate", "CERTIFICATE");
        let file = TempFile::new("bad.pem", text.as_bytes());
        let err = TrustStore::from_pem_file(&file.0).unwrap_err();
        assert!(
            matches!(err, TrustError::BadCertificate { index: 2, .. }),
            "{err}"
        );
    }

    #[test]
    fn der_roots_must_be_present_and_valid() {
        assert!(matches!(
            TrustStore::from_der(&[]),
            Err(TrustError::NoAnchors)
        ));
        let junk = CertificateDer::from(vec![1, 2, 3]);
        assert!(matches!(
            TrustStore::from_der(&[junk]),
            Err(TrustError::BadAnchor { index: 1, .. })
        ));
    }

    #[test]
    fn system_bundle_loads_or_names_its_path() {
        match TrustStore::system() {
            Ok(store) => assert!(store.len() > 10),
            Err(e) => {
                assert!(!Path::new(SYSTEM_BUNDLE).exists());
                assert!(e.to_string().contains(SYSTEM_BUNDLE), "{e}");
            }
        }
    }

    // --- verdict ---------------------------------------------------------------

    #[test]
    fn labels_come_in_a_fixed_order() {
        let all = Verdict {
            expired: true,
            not_yet_valid: true,
            untrusted: Some("self-signed".into()),
            name_mismatch: true,
            weak: Some("SHA-1 signature".into()),
            revoked: true,
        };
        assert_eq!(
            all.labels(),
            [
                "expired",
                "untrusted",
                "name-mismatch",
                "weak",
                "revoked",
                "not-yet-valid"
            ]
        );
        assert!(!all.trusted());
        assert_eq!(
            all.to_string(),
            "expired, untrusted (self-signed), name-mismatch, weak (SHA-1 signature), revoked, not-yet-valid"
        );
        assert_eq!(Verdict::default().to_string(), "trusted");
    }

    // --- leaf info -------------------------------------------------------------

    #[test]
    fn leaf_info_describes_the_leaf() {
        let pki = pki();
        let chain = pki.simple_chain(&["www.example.test"]);
        let info = leaf_info(chain[0].as_ref()).unwrap();
        let digest = Sha256::digest(chain[0].as_ref());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            info,
            LeafInfo {
                subject: "CN=www.example.test,O=Loupe Test".into(),
                issuer: "CN=Loupe Test Intermediate,O=Loupe Test".into(),
                sha256: hex,
                not_before: date_time_ymd(2025, 1, 1).unix_timestamp(),
                not_after: date_time_ymd(2035, 1, 1).unix_timestamp(),
                key: "ec-p256".into(),
            }
        );
    }

    #[test]
    fn leaf_info_labels_key_types() {
        let pki = pki();
        let label = |key: &KeyPair| {
            let der = sign(&leaf_params(&["k.example.test"]), key, &pki.int);
            leaf_info(der.as_ref()).unwrap().key
        };
        let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let rsa = KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, RsaKeySize::_2048).unwrap();
        let ed = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        assert_eq!(label(&p384), "ec-p384");
        assert_eq!(label(&rsa), "rsa-2048");
        assert_eq!(label(&ed), "ed25519");
        let key = |pem: &str| leaf_info(legacy(pem).as_ref()).unwrap().key;
        assert_eq!(key(LEGACY_RSA1024), "rsa-1024");
        assert_eq!(key(LEGACY_P192), "ec-p192");
    }

    #[test]
    fn leaf_info_escapes_hostile_names() {
        let pki = pki();
        let mut params = leaf_params(&["www.example.test"]);
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "evil,CN=x\n+ \"q\"#");
        let der = sign(&params, &p256(), &pki.int);
        let info = leaf_info(der.as_ref()).unwrap();
        assert_eq!(info.subject, "CN=evil\\,CN=x\\0a\\+ \\\"q\\\"#");
    }

    #[test]
    fn leaf_info_of_garbage_is_an_error() {
        assert!(matches!(leaf_info(b"nope"), Err(CertError::Malformed(_))));
        assert!(matches!(leaf_info(&[]), Err(CertError::Malformed(_))));
    }

    // --- fixtures --------------------------------------------------------------
    //
    // rcgen cannot sign with SHA-1 or MD5 nor make RSA-1024 or P-192 keys, so
    // these were made once with OpenSSL 3.0 (`openssl req -x509 -newkey
    // rsa:2048` for the root, `openssl x509 -req -sha1|-md5|-sha256` for the
    // others); all are valid from 2026-11-30 for about a century.
    // LEGACY_ROOT: RSA-2048, sha256WithRSAEncryption, self-signed.
    // LEGACY_SHA1: RSA-2048 leaf, sha1WithRSAEncryption by the root.
    // LEGACY_RSA1024: RSA-1024 leaf, sha256WithRSAEncryption by the root.
    // LEGACY_MD5: RSA-2048 leaf, md5WithRSAEncryption by the root.
    // LEGACY_P192: P-192 leaf, sha256WithRSAEncryption by the root.
    // LEGACY_WEAKCA: RSA-1024 CA, signed by the root.
    // LEGACY_UNDERWEAK: P-256 leaf signed by LEGACY_WEAKCA.
    // LEGACY_ECROOT: P-256, ecdsa-with-SHA256, self-signed.
    // LEGACY_ECSHA1: P-256 leaf, ecdsa-with-SHA1 by LEGACY_ECROOT.
    // LEGACY_SHA1ROOT: RSA-2048, sha1WithRSAEncryption, self-signed.
    // LEGACY_UNDERSHA1ROOT: P-256 leaf, sha256WithRSAEncryption by LEGACY_SHA1ROOT.
    // Each leaf's only SAN is <name>.legacy.test.

    const LEGACY_ROOT: &str = "\
-----BEGIN CERTIFICATE-----
MIIDNDCCAhygAwIBAgIUNXS4H4eAn1ciMieCLOV8fXoEywMwDQYJKoZIhvcNAQEL
BQAwMTETMBEGA1UECgwKTG91cGUgVGVzdDEaMBgGA1UEAwwRTG91cGUgTGVnYWN5
IFJvb3QwIBcNMjYxMTMwMDc1MjI4WhgPMjEyNjExMDYwNzUyMjhaMDExEzARBgNV
BAoMCkxvdXBlIFRlc3QxGjAYBgNVBAMMEUxvdXBlIExlZ2FjeSBSb290MIIBIjAN
BgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEArYPdawipvBPBCTiy2O0kOmjFDHDk
YQuXa6w5YMKXp1g95PTed39WwK+JYHuZ2Z6RY7xozKO6kNaoy1TDfNuLpqf4YYsO
ETQriPCULQUbShRsBZk5qdvmSRSwHoSlkrx/+33LSeccBArkZO7fvXC5OTrSVgG9
SPxg3gJzazcfkKcFXPLMSgntJgZaTCL4xDypI075fhRfZdxGYZJlnbv24j8hUwlx
mWUQdYHtfNIXZGpcKD8/V8VO6klWXw9etlCQFCY/Rl/jHIhsRV4dSSpdVZrCfiae
qwowtCvGETuCUHJG1JK5WQ45Z/Je09P+okG77RZcD5IOo1mowrb0D2QY1QIDAQAB
o0IwQDAPBgNVHRMBAf8EBTADAQH/MA4GA1UdDwEB/wQEAwIBBjAdBgNVHQ4EFgQU
XgfZOZnJOZSti7TM4k+h7U1Mni8wDQYJKoZIhvcNAQELBQADggEBAHLWXzARaJNa
5/ehTzPK7QcLjP9AWFg4Wae2WsqSNkNc0sKEybu8jgXSij0yRExK7OvTVhkmOurs
X9WCGGJTdW/Zbz8aBUyT5O6czx8uYbd0V8LinzcsJh+rjXh4EC3z87hSEqFv2YaD
h5gDggTZaB86VTSZVdVaY8445X88LtV2tJYnSlTSlK2Ofcc0IBFwyFSn6EebHWxq
PQYX2UuAuERFm3PVNwY/4NDIGvYiKZt9X3fIoUTu3zjNEKbcRaOZgkD7EttWCxUd
POH/VDgtFPahZdJBDkm16vCSHlMgB9ZLwRdGuDDqii+liTo2pZh+1uD4fL684b5m
nDwH0LXJXNY=
-----END CERTIFICATE-----
";
    const LEGACY_SHA1: &str = "\
-----BEGIN CERTIFICATE-----
MIIDdTCCAl2gAwIBAgIUDBpTIVe/L4xVPwhycZpm5nKWJkowDQYJKoZIhvcNAQEF
BQAwMTETMBEGA1UECgwKTG91cGUgVGVzdDEaMBgGA1UEAwwRTG91cGUgTGVnYWN5
IFJvb3QwIBcNMjYxMTMwMDc1MjI4WhgPMjEyNTA2MjQwNzUyMjhaMDAxEzARBgNV
BAoMCkxvdXBlIFRlc3QxGTAXBgNVBAMMEHNoYTEubGVnYWN5LnRlc3QwggEiMA0G
CSqGSIb3DQEBAQUAA4IBDwAwggEKAoIBAQDQyzeQ1NlJiSB+xB6LSyggPppbNWIY
ieYRGaL4MGlNIxWHvaayjGyYlyOn/1eDbPOCoGvFLePzGDWCgNWoJipZwq2CX7Qn
cI3hx1NwaRM0J0+HRT9911l7j6LfkYsMISUnMpJPJ1zJ7iFk/fu20GDT0k7q1knD
6ir6k/iY+fBZRqITy7M7EcehON7SYaGX5oNb8guAg4bapqSEpSM7J8T8zZ7kD89q
UpGCKg2WtNAqPDJOD4EK3JGKWxVYXh6oK1ZwchP+htqhCzXCPl5mIM68Ec8cOcoC
oq4LUhNdGXq1nc3/2KOe9sA9fWvCJRpP58+KSwlJy1ApfdBAQCuaO9PNAgMBAAGj
gYMwgYAwDAYDVR0TAQH/BAIwADAbBgNVHREEFDASghBzaGExLmxlZ2FjeS50ZXN0
MBMGA1UdJQQMMAoGCCsGAQUFBwMBMB0GA1UdDgQWBBQeMJaAncdDbgDNE1Z9tYdi
TMeR1DAfBgNVHSMEGDAWgBReB9k5mck5lK2LtMziT6HtTUyeLzANBgkqhkiG9w0B
AQUFAAOCAQEAEzTBKJn1zE3BfpcOhp25SAn6kZ5kILvtuqYTBDnUnP665Xo73mSu
oXBo42NkYASNCLele5GCBDXbvHksP9mVXwjIhSUfUi3pO2DMWwkJjV6sE+5a+P5C
JrQwzJT14pnLx8W7vMP5cU6crntt5J5j+WtLsgKrXeUYaGqd1ncoJsjIt3TZtcUC
SBlKrIr5lVR3D+APNrYVM2pVn7PBPpaTEJI18PMo6JIOQq6N6M7pQHM0Ut42pZyk
MprogZ5AOWuCtyF6C+XGX78iEJVs05YYrceMFrXNa4K8E241FGcsjgyeTngKC1lI
WWTxhr/XuTCKRXAUTGHORYEMdBKgNjGMIg==
-----END CERTIFICATE-----
";
    const LEGACY_RSA1024: &str = "\
-----BEGIN CERTIFICATE-----
MIIC9zCCAd+gAwIBAgIUDBpTIVe/L4xVPwhycZpm5nKWJkswDQYJKoZIhvcNAQEL
BQAwMTETMBEGA1UECgwKTG91cGUgVGVzdDEaMBgGA1UEAwwRTG91cGUgTGVnYWN5
IFJvb3QwIBcNMjYxMTMwMDc1MjI4WhgPMjEyNTA2MjQwNzUyMjhaMDMxEzARBgNV
BAoMCkxvdXBlIFRlc3QxHDAaBgNVBAMME3JzYTEwMjQubGVnYWN5LnRlc3QwgZ8w
DQYJKoZIhvcNAQEBBQADgY0AMIGJAoGBANE7g9gjv4y/ZrQfZB6U/9rh4AJ1xLx4
zS+M6mqADdvaRNfQADYox13JUVThld2iHAt+4snRYZ0K9wZ6XUultPWSem6FKhwv
+DWUzDrQd4rHtQzi2LJjBNLJiOeeZiKTW4LERIzzrWatCK3RG/fjEESvEads309J
D3zZUieA0w5DAgMBAAGjgYYwgYMwDAYDVR0TAQH/BAIwADAeBgNVHREEFzAVghNy
c2ExMDI0LmxlZ2FjeS50ZXN0MBMGA1UdJQQMMAoGCCsGAQUFBwMBMB0GA1UdDgQW
BBQYwLgdaoF8FubtpNQ5ubgozWgtOjAfBgNVHSMEGDAWgBReB9k5mck5lK2LtMzi
T6HtTUyeLzANBgkqhkiG9w0BAQsFAAOCAQEAIWybIjGFRUwT5svftD523s+pV4wl
piGABgH9QEnlSAHtYdNihALABXSlNL+eW4MzTgM+SWY0Rdxlnpq0Cqwb7ba3RFdG
RsUAJC0hDRSM+WXQmkJHySZpvbgxeei8knTBS1ZTzNV/rXRQnANDsoGLyozTlyGO
46BnvSYoKwX7fGpFwxfXLJIK82ffCgVfr/QJ7Zr+lRsfmT0BP5ydb3u2BOxhll1L
qzKUScuFezbMdWnIu/x4yFbRWklrm9Pgw/Iwu6lJt7nbJ5/Axv6gLxdRRcDZJdJT
ORiwc4tsYVjRlzsdMPkm5XCHzvBBGGFuJEnQM+0TLamWltoYrMeuSYkVjw==
-----END CERTIFICATE-----
";
    const LEGACY_MD5: &str = "\
-----BEGIN CERTIFICATE-----
MIIDcjCCAlqgAwIBAgIUDBpTIVe/L4xVPwhycZpm5nKWJkwwDQYJKoZIhvcNAQEE
BQAwMTETMBEGA1UECgwKTG91cGUgVGVzdDEaMBgGA1UEAwwRTG91cGUgTGVnYWN5
IFJvb3QwIBcNMjYxMTMwMDc1MjI4WhgPMjEyNTA2MjQwNzUyMjhaMC8xEzARBgNV
BAoMCkxvdXBlIFRlc3QxGDAWBgNVBAMMD21kNS5sZWdhY3kudGVzdDCCASIwDQYJ
KoZIhvcNAQEBBQADggEPADCCAQoCggEBAJzfc1xuTeEhFN6AdP3NMBNXtMHwi5BO
b0GJR70qVG3d4KNivh4kcDqNoXVUuxNFqyDHI7gqqyAXYMfYLUDJQ9gnChrs3fvI
Hl8AmgiLtrmzvVtlKDcejHtDSQvqiuc04J7NrKuqcfNUXd2Z3j/aOAMlY21ci4CG
L8BQzbv7yzackm1tHvnQDYETes12N8coq05FGIASOM06DJnWp/5VbvVBDyEhp5WD
caFXlunOz4Rmg9GZdJf/4+EN19z8QagxScyVSowTzKdyntw7RrpkJrH64DPmZYTH
hLuV/B2BZ4efknR2i9jGpU5upjS9gT+8uc/LwYWHtuGlD62u1SqOfjcCAwEAAaOB
gTB/MAwGA1UdEwEB/wQCMAAwGgYDVR0RBBMwEYIPbWQ1LmxlZ2FjeS50ZXN0MBMG
A1UdJQQMMAoGCCsGAQUFBwMBMB0GA1UdDgQWBBS65I7uP1A891ePDRBn7ys5WgcZ
MjAfBgNVHSMEGDAWgBReB9k5mck5lK2LtMziT6HtTUyeLzANBgkqhkiG9w0BAQQF
AAOCAQEAS4vAsx9rrWeqdwbt3ZGP093+S2VHTGl2bTBtMFcv0Si3xsv2z/Jl1GxA
uWEEgQAaqnCP2NLkjUKsUBGYvJCUiZ8SoKe+mvZlXcpuG8XWPwDSnjYej9el+Bbm
m7V7MthkEJWtFS0qjYW/YW45QQIdkGmzfkQNo+laJLBkjF1urdbvLyvVQaqiXGb3
bWBY++6Ubp+7t7AP5ERBifuhHbEq7o86dyMUH15bI/99k7xgeDEJZmZLNo8/9Mgj
g5WmlBQngize7ov0pBe6mIQ1MNwB7UVwjer7Tp0s3jbMBXCA2j3SY8pC1+nXbJRH
2SfWdkyVUUfiwvJXvYYwB1Xt8v4t8A==
-----END CERTIFICATE-----
";
    const LEGACY_P192: &str = "\
-----BEGIN CERTIFICATE-----
MIICmjCCAYKgAwIBAgIUDBpTIVe/L4xVPwhycZpm5nKWJk0wDQYJKoZIhvcNAQEL
BQAwMTETMBEGA1UECgwKTG91cGUgVGVzdDEaMBgGA1UEAwwRTG91cGUgTGVnYWN5
IFJvb3QwIBcNMjYxMTMwMDc1MjI4WhgPMjEyNTA2MjQwNzUyMjhaMDAxEzARBgNV
BAoMCkxvdXBlIFRlc3QxGTAXBgNVBAMMEHAxOTIubGVnYWN5LnRlc3QwSTATBgcq
hkjOPQIBBggqhkjOPQMBAQMyAASaRTF5he/Nq231wAQfoZ5cNdK+00YnZO+39jTs
FPEhtHWXmjDSvffkq5JVpoojLJ+jgYMwgYAwDAYDVR0TAQH/BAIwADAbBgNVHREE
FDASghBwMTkyLmxlZ2FjeS50ZXN0MBMGA1UdJQQMMAoGCCsGAQUFBwMBMB0GA1Ud
DgQWBBTIMImCTb3D3frpaEX8JlY0EU9gxDAfBgNVHSMEGDAWgBReB9k5mck5lK2L
tMziT6HtTUyeLzANBgkqhkiG9w0BAQsFAAOCAQEABSTIvDtgsWAT2dTPF4fddpaw
3QiRhqLSrGXCHpKDb+awW8TOs+FnLQpeIyXSFGg3iiyznZeqccAb1xCFfGv/nXUh
IcMIYRXOqfz9+RBfG9+Piq+JfhidqSt06bgm1SlGvBS/pYp0YGDtVr6d8sqU3o3Y
VJB/NvmvgkhLhFxxsHq7tJUn0co39P0NcOhqW7H3u8hT1kS8NJZX7HiaXfeFh3hv
XSa1gllbWEGEMO0/pgQU7IfO4JjapyleKGFX6BJB7U6rzY4fLdBXay8StLvGY8cB
6VI3wfj8vU0SucpYZll7f9snyWgrqDeCDZ8oslZZhddWu+fQuIVio+zxVWFRFA==
-----END CERTIFICATE-----
";
    const LEGACY_WEAKCA: &str = "\
-----BEGIN CERTIFICATE-----
MIIC0jCCAbqgAwIBAgIUDBpTIVe/L4xVPwhycZpm5nKWJk4wDQYJKoZIhvcNAQEL
BQAwMTETMBEGA1UECgwKTG91cGUgVGVzdDEaMBgGA1UEAwwRTG91cGUgTGVnYWN5
IFJvb3QwIBcNMjYxMTMwMDc1MjI5WhgPMjEyNTA2MjQwNzUyMjlaMDIxEzARBgNV
BAoMCkxvdXBlIFRlc3QxGzAZBgNVBAMMEndlYWtjYS5sZWdhY3kudGVzdDCBnzAN
BgkqhkiG9w0BAQEFAAOBjQAwgYkCgYEAsLI1U2gwglenKHXwcgmyKf5hImSfk7uu
aPtjopv6n8sCHcVUTTNn4sQ6FrHq1Rf5A3t0M7rt4uedAIagNYff04jJaYP76SAA
uAdfHdlVRqpnM58KIpkhBXAUTAiOJeXO8mjXqbEeR1MlV04j+FpS9516cKVuHFks
pS0qSt7YeC0CAwEAAaNjMGEwDwYDVR0TAQH/BAUwAwEB/zAOBgNVHQ8BAf8EBAMC
AQYwHQYDVR0OBBYEFOvWZ66iG9DJdZ4zumpg/R+gtKk7MB8GA1UdIwQYMBaAFF4H
2TmZyTmUrYu0zOJPoe1NTJ4vMA0GCSqGSIb3DQEBCwUAA4IBAQBW5FWHLpfiJmYI
nm2kDIhj5+zxMi2usIHSnPUz5UUXgelB3QagAonYYyP4Y7Q3PRVIIBkko74AsmE3
Y/dRNac3dhtMNImXXYg/wQXXvpRNt3nOvz1dfaV4EHB/87nWaShvDUKKMA23W3xu
vEMmNgb51dJQFCLTL+CFgecFFkowNhLPi3qXg579pML+zx44DTH7oMIEdngwBW1E
Sq6E8sca/0FOQg7AX9I4j6OS7mSfuyyGuhN7RfdVOKiukH2NYgQ6Q67g+rfZsjON
HtApyTldLRCXZRN+YTqiMCNXyeXit2EiJXIXoaxb5KyViMk7tsYbPM4fH2cFXa/B
1bvDE+ER
-----END CERTIFICATE-----
";
    const LEGACY_UNDERWEAK: &str = "\
-----BEGIN CERTIFICATE-----
MIICNDCCAZ2gAwIBAgIUcuh5uIXD/8CrvkeWFUpgIgS5mzQwDQYJKoZIhvcNAQEL
BQAwMjETMBEGA1UECgwKTG91cGUgVGVzdDEbMBkGA1UEAwwSd2Vha2NhLmxlZ2Fj
eS50ZXN0MCAXDTI2MTEzMDA3NTIyOVoYDzIxMjUwNjI0MDc1MjI5WjA1MRMwEQYD
VQQKDApMb3VwZSBUZXN0MR4wHAYDVQQDDBV1bmRlcndlYWsubGVnYWN5LnRlc3Qw
WTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAATST/m31mf0rG7K8H9QUbYYApuq3l82
dJ0+IiD5tBgRYQuvqiUiMDDQk2x0Eldhq6e2tNusFzlGKsiYqqJRim7Co4GIMIGF
MAwGA1UdEwEB/wQCMAAwIAYDVR0RBBkwF4IVdW5kZXJ3ZWFrLmxlZ2FjeS50ZXN0
MBMGA1UdJQQMMAoGCCsGAQUFBwMBMB0GA1UdDgQWBBT9+bgC+VhVGMzLmZur7cz1
l5UCjTAfBgNVHSMEGDAWgBTr1meuohvQyXWeM7pqYP0foLSpOzANBgkqhkiG9w0B
AQsFAAOBgQBVvoTdfW47p8YeD6Tu1ryK2v27zhmtWgcdRxyqG34+piKTYs3l4HQE
qqjcKvMem/jno5/5aS2bco1igKtI+hVwlgI80tS88YabsTkSsXbLjSHJaBhpM73w
NOPzBqR0azIKuyzjY/6KLtPeqW5kgkSpCqUlGbqQ0eVFowb71tKWQg==
-----END CERTIFICATE-----
";
    const LEGACY_ECROOT: &str = "\
-----BEGIN CERTIFICATE-----
MIIBrTCCAVSgAwIBAgIUFeY20WuO8663VJ0hgL8BhQJkO5EwCgYIKoZIzj0EAwIw
NDETMBEGA1UECgwKTG91cGUgVGVzdDEdMBsGA1UEAwwUTG91cGUgTGVnYWN5IEVD
IFJvb3QwIBcNMjYxMTMwMDc1NjUxWhgPMjEyNjExMDYwNzU2NTFaMDQxEzARBgNV
BAoMCkxvdXBlIFRlc3QxHTAbBgNVBAMMFExvdXBlIExlZ2FjeSBFQyBSb290MFkw
EwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAENydnvjRxInr6Oehe4NO1qjJGDvXieBsI
UKMpj1dl/sIcF7yzx6acozViniw8q+rGlTlm5eRcU4EJAx7VdbEqlaNCMEAwDwYD
VR0TAQH/BAUwAwEB/zAOBgNVHQ8BAf8EBAMCAQYwHQYDVR0OBBYEFHt/dPRfadxR
Ysw7eZVcwDKAxSYoMAoGCCqGSM49BAMCA0cAMEQCIGORrABnn8FjQIFTwdbaExAU
MImtoL5/qWbT6RluqXf2AiAaVctFfuy3Of3ohZMpEH8WYxBb0B6GHEcVCK95v0zU
PQ==
-----END CERTIFICATE-----
";
    const LEGACY_ECSHA1: &str = "\
-----BEGIN CERTIFICATE-----
MIIB7jCCAZWgAwIBAgIUdqZD5XbYKHcHgMaQ8lMxGaW1o/0wCQYHKoZIzj0EATA0
MRMwEQYDVQQKDApMb3VwZSBUZXN0MR0wGwYDVQQDDBRMb3VwZSBMZWdhY3kgRUMg
Um9vdDAgFw0yNjExMzAwNzU2NTJaGA8yMTI1MDYyNDA3NTY1MlowMjETMBEGA1UE
CgwKTG91cGUgVGVzdDEbMBkGA1UEAwwSZWNzaGExLmxlZ2FjeS50ZXN0MFkwEwYH
KoZIzj0CAQYIKoZIzj0DAQcDQgAEwyxmCXypg3o/RxfXp0RlMd7Zb2Mhsl51cu0a
WGM2PS1xavhFBrOS3h4wH2DivOFxDg0dWKeYvCoHd7NHLhxk5qOBhTCBgjAMBgNV
HRMBAf8EAjAAMB0GA1UdEQQWMBSCEmVjc2hhMS5sZWdhY3kudGVzdDATBgNVHSUE
DDAKBggrBgEFBQcDATAdBgNVHQ4EFgQUdGIt5Z/gTqd8lZte878Y37n/trMwHwYD
VR0jBBgwFoAUe3909F9p3FFizDt5lVzAMoDFJigwCQYHKoZIzj0EAQNIADBFAiEA
y7KbvmfkOm/ALSYclWXD0mBGTKYg7mO9QltpMLe5KzECIDE0dkLrtciuH8Txjr/w
lGEpR/MzBbv829EJwLCu5DIy
-----END CERTIFICATE-----
";
    const LEGACY_SHA1ROOT: &str = "\
-----BEGIN CERTIFICATE-----
MIIDMDCCAhigAwIBAgIULcu88C+CAeW+wI9rzwIEZaoj+hMwDQYJKoZIhvcNAQEF
BQAwLzETMBEGA1UECgwKTG91cGUgVGVzdDEYMBYGA1UEAwwPTG91cGUgU0hBMSBS
b290MCAXDTI2MTEzMDA3NTY1MloYDzIxMjYxMTA2MDc1NjUyWjAvMRMwEQYDVQQK
DApMb3VwZSBUZXN0MRgwFgYDVQQDDA9Mb3VwZSBTSEExIFJvb3QwggEiMA0GCSqG
SIb3DQEBAQUAA4IBDwAwggEKAoIBAQCvRpfbVgTwYo1aDEy1LrTozAQh0b7LRIR2
/39C/kLbxG/UnsTTXREtHu6eeG6JWzh0vbT5fPULyuePeBO6J1irnI/TX4yfSGCr
sVlljUcDfkOyJ8RoxN22bYMT/8CsepXMP4sBRUP8vya9qCt+BmigmyhSybl4OArz
h/0LCN4wmNPdTq8DvayA1ZWvdg1Emk9mE+s8V+fGEOlG1upDo7Paet5TgVH099pH
kHVuCsXARemAgC+q0XMOahY4E+bh1+ORBn/N4dnNrFU59YCffi753NuH+QNLbdc8
Rt5HjVbX9Fbp/PIHQ5vX+etBxIhBa8DLLhEd1gD1/Wla0VIA2D5rAgMBAAGjQjBA
MA8GA1UdEwEB/wQFMAMBAf8wDgYDVR0PAQH/BAQDAgEGMB0GA1UdDgQWBBTywHzK
RQTDkl20FCrgs8K8HV3t4jANBgkqhkiG9w0BAQUFAAOCAQEAcPij6J5OOlC6AiyW
jVy2yw7PabxNRvk9aw4sjLoLKzo1FbxYfwhDVUQnGtV4RWLFQUMOry62X7zDaMRb
p5gzuFXEJglggNGbZ3btYiOOCBlmvwAoddWEtWk8uAaxAK0bbDwfZT+lzL303p08
kr8BohlR7BO0rFqyqBNurDB6fLZNiIPp95wiG+ETHi9lgvoQN0MhaMqxZWbOQCi4
Zqf65rOiOWOhl1MrDTSjUlu9ftiBeiYHChcIgbJd6S93lORp5Yb3jM/CXLa9rLLN
C7gQes8GC0b5KCY0h1gz0y5CugLVrJIQp86lFL73L1c8QOVBrFOvdn2+Gy+x4JnH
eISkGw==
-----END CERTIFICATE-----
";
    const LEGACY_UNDERSHA1ROOT: &str = "\
-----BEGIN CERTIFICATE-----
MIICujCCAaKgAwIBAgIUd3lxhcZi4mJY+hD5gOKkyCOIF7wwDQYJKoZIhvcNAQEL
BQAwLzETMBEGA1UECgwKTG91cGUgVGVzdDEYMBYGA1UEAwwPTG91cGUgU0hBMSBS
b290MCAXDTI2MTEzMDA3NTY1MloYDzIxMjUwNjI0MDc1NjUyWjA5MRMwEQYDVQQK
DApMb3VwZSBUZXN0MSIwIAYDVQQDDBl1bmRlcnNoYTFyb290LmxlZ2FjeS50ZXN0
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAETMqTiqdfL1KirKarGPrUW4AoZxsq
rPAAKmge5Y+8EcG+lov1ctMJ6eobngjlGbRzTw61v2qBrj02tniibYE1bqOBjDCB
iTAMBgNVHRMBAf8EAjAAMCQGA1UdEQQdMBuCGXVuZGVyc2hhMXJvb3QubGVnYWN5
LnRlc3QwEwYDVR0lBAwwCgYIKwYBBQUHAwEwHQYDVR0OBBYEFFlBB37PvH0ySbp0
cfUcdX1d99zKMB8GA1UdIwQYMBaAFPLAfMpFBMOSXbQUKuCzwrwdXe3iMA0GCSqG
SIb3DQEBCwUAA4IBAQB2c0EYzbkkP9qzME+bXUEpLFUoAS1dBSMSHUHIymdgUjg0
QenpYoAbZ6gu5iXAjoN0nBApS/CcrR1c52Gi5mqineu4r/OrqndfmFIlSZTkMolS
E+MeUOqVJM5NZJF9vXZI7bxKLPZk6eWbMTzYfvvHxEzvQAYRPrLiizYR6/ieWO0d
LgLau+Cw9XcC39B1DbWGc73MwYpoVPq9ducmoLYsPbRWV+KeZ61QkcLt+wD00ynH
u7rG0n5Ou2CwJzfMmZhzF9a3B8ag6sjmJi4LVLefY0fYvKSDn3GBtkbyneATZiQ8
IgyJxAaKtWOm/9aFPMaTlUhPahtDo5uwlTIOKK0r
-----END CERTIFICATE-----
";
}
