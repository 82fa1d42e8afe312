//! Minting of impersonation certificates: the leaf Loupe shows a client in
//! place of the real server's.
//!
//! This module owns the bytes of that certificate. It reads the upstream
//! leaf (which arrives from the network, so it is hostile input) and the
//! Loupe CA certificate, generates the leaf's software key, builds the
//! DER `TBSCertificate` (with its own small DER encoder), and, once the
//! HSM signer service has signed those bytes, assembles the final
//! `Certificate` and checks its signature against the CA's public key.
//!
//! It knows nothing of the HSM, of caching or of TLS connections: the
//! caller submits [`Tbs::der`] to the signer (with the mechanism that
//! matches [`Tbs::kind`]), then calls [`finish`] (or [`assemble`] and
//! [`check_signature`]) with the signature it gets back.
//!
//! What the leaf carries, and why:
//! - issuer: the CA's subject `Name`, byte for byte, because name chaining
//!   compares those bytes;
//! - subject: only the upstream's commonName attribute, as sent;
//! - subjectAltName: the upstream's extension value, as sent (every name
//!   form, wildcards, IP addresses, IDNs);
//! - validity: the upstream's window inside the CA's, at most
//!   [`MintOptions::max_validity_days`] long, and shortened so that it
//!   keeps the upstream's status at minting time (valid, expired, or not
//!   yet valid);
//! - the leaf's own key, basicConstraints, keyUsage, extKeyUsage and the
//!   two key identifiers. Nothing else is copied from upstream (no AIA,
//!   CRL distribution points, SCTs or policies: they describe the real
//!   issuer, not Loupe's CA).

use std::net::IpAddr;

use aws_lc_rs::digest;
use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der, PublicKeyX509Der};
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair as _, UnparsedPublicKey};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::ParsedExtension;
use x509_parser::oid_registry::{
    Oid, OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_X509_EXT_SUBJECT_ALT_NAME, OID_X509_EXT_SUBJECT_KEY_IDENTIFIER,
};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;
use x509_parser::x509::SubjectPublicKeyInfo;

/// The validity cap used by [`MintOptions::default`], in days. Public-web
/// leaves may not be valid for more than 398 days, and some clients
/// enforce that; keeping under it means no lifetime policy tells a minted
/// leaf from a real one. One day less leaves room for the inclusive end
/// of the validity period.
pub const DEFAULT_MAX_VALIDITY_DAYS: u32 = 397;

/// Largest upstream certificate accepted. Real leaves are a few kB; this
/// only bounds what a hostile server can make the parser walk.
pub const MAX_UPSTREAM_CERT_LEN: usize = 256 * 1024;

/// Largest upstream subjectAltName extension value copied. Every minted
/// certificate carries it to every client and sits in the engine's cache,
/// so a server must not be able to make it arbitrarily large.
pub const MAX_SAN_LEN: usize = 64 * 1024;

/// Largest upstream commonName attribute (type and value) copied, for the
/// same reason. X.520 bounds the value to 64 characters; real certificates
/// sometimes exceed that, so the bound is loose.
pub const MAX_CN_LEN: usize = 4 * 1024;

/// Largest CA certificate accepted by [`Issuer::from_der`].
const MAX_CA_CERT_LEN: usize = 64 * 1024;

const DAY: i64 = 86_400;

/// Why a certificate could not be minted or checked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MintError {
    #[error("upstream certificate is {len} bytes, more than the {max} accepted")]
    UpstreamTooLarge { len: usize, max: usize },
    #[error("upstream certificate is malformed: {0}")]
    MalformedUpstream(String),
    #[error("upstream subjectAltName extension is {len} bytes, more than the {max} copied")]
    SanTooLarge { len: usize, max: usize },
    #[error("upstream commonName attribute is {len} bytes, more than the {max} copied")]
    CommonNameTooLarge { len: usize, max: usize },
    #[error(
        "upstream certificate names nobody: no subject commonName and no subjectAltName to copy"
    )]
    NoSubjectName,
    #[error(
        "upstream validity is inverted: notBefore {not_before} is after notAfter {not_after} (unix seconds)"
    )]
    InvertedValidity { not_before: i64, not_after: i64 },
    #[error("time {0} (unix seconds) is outside the years 0000-9999 a certificate can encode")]
    TimeOutOfRange(i64),
    #[error("CA certificate is malformed: {0}")]
    MalformedCa(String),
    #[error("CA certificate cannot issue certificates: {0}")]
    NotACa(String),
    #[error("CA key is not supported: {0}")]
    UnsupportedCaKey(String),
    #[error("leaf key is unusable: {0}")]
    LeafKey(String),
    #[error("serial number is zero; RFC 5280 4.1.2.2 requires a positive integer")]
    ZeroSerial,
    #[error("invalid mint options: {0}")]
    InvalidOptions(&'static str),
    #[error("the system random number generator failed")]
    Random,
    #[error("certificate to check is malformed: {0}")]
    MalformedCertificate(&'static str),
    #[error(
        "certificate's signature algorithm is not {expected}, the one the CA's key signs with"
    )]
    SignatureAlgorithmMismatch { expected: &'static str },
    #[error("certificate's issuer name is not the CA's subject name")]
    IssuerMismatch,
    #[error(
        "ECDSA signature is not a DER ECDSA-Sig-Value (a raw r||s from PKCS#11 must be converted first)"
    )]
    EcdsaSignatureNotDer,
    #[error("signature does not verify with the CA's public key")]
    BadSignature,
}

// ---------------------------------------------------------------------------
// Keys and algorithms
// ---------------------------------------------------------------------------

/// Which kind of CA key signs; decides the signatureAlgorithm of the leaf.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CaKeyKind {
    /// NIST P-256; signs with ecdsa-with-SHA256.
    EcP256,
    /// NIST P-384; signs with ecdsa-with-SHA384.
    EcP384,
    /// RSA, 2048 to 8192 bits; signs with sha256WithRSAEncryption
    /// (PKCS#1 v1.5).
    Rsa,
}

impl CaKeyKind {
    /// The name of the signature algorithm this kind of key signs with.
    pub fn signature_algorithm_name(self) -> &'static str {
        match self {
            CaKeyKind::EcP256 => "ecdsa-with-SHA256",
            CaKeyKind::EcP384 => "ecdsa-with-SHA384",
            CaKeyKind::Rsa => "sha256WithRSAEncryption",
        }
    }

    /// The DER `AlgorithmIdentifier` of that signature algorithm.
    pub fn signature_algorithm_der(self) -> Vec<u8> {
        match self {
            // RFC 5758 section 3.2: the ECDSA-with-SHA2 identifiers are
            // encoded without a parameters field.
            CaKeyKind::EcP256 => seq(&[&oid(ECDSA_WITH_SHA256)]),
            CaKeyKind::EcP384 => seq(&[&oid(ECDSA_WITH_SHA384)]),
            // RFC 4055 section 5: sha256WithRSAEncryption carries NULL
            // parameters.
            CaKeyKind::Rsa => seq(&[&oid(SHA256_WITH_RSA_ENCRYPTION), &[NULL, 0x00]]),
        }
    }

    fn verification_algorithm(self) -> &'static dyn signature::VerificationAlgorithm {
        match self {
            CaKeyKind::EcP256 => &signature::ECDSA_P256_SHA256_ASN1,
            CaKeyKind::EcP384 => &signature::ECDSA_P384_SHA384_ASN1,
            CaKeyKind::Rsa => &signature::RSA_PKCS1_2048_8192_SHA256,
        }
    }
}

/// Leaf key types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LeafKind {
    EcP256,
    Rsa2048,
}

/// A software leaf key: the PKCS#8 DER private key (what rustls's key
/// provider loads) and its SubjectPublicKeyInfo DER.
#[derive(Clone)]
pub struct LeafKey {
    pub kind: LeafKind,
    pub pkcs8: Vec<u8>,
    pub spki: Vec<u8>,
}

// The private key must never reach a log line through `{:?}`.
impl std::fmt::Debug for LeafKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeafKey")
            .field("kind", &self.kind)
            .field("pkcs8", &"<redacted>")
            .field("spki_len", &self.spki.len())
            .finish()
    }
}

/// Generates a fresh leaf key in software.
///
/// RSA-2048 generation takes tens to hundreds of milliseconds: call it off
/// the packet path, or keep a pool.
pub fn generate_leaf_key(kind: LeafKind) -> Result<LeafKey, MintError> {
    let fail = |what: &str| MintError::LeafKey(format!("{what} failed"));
    let (pkcs8, spki) = match kind {
        LeafKind::EcP256 => {
            let pair = EcdsaKeyPair::generate(&signature::ECDSA_P256_SHA256_ASN1_SIGNING)
                .map_err(|_| fail("P-256 key generation"))?;
            let pkcs8 = pair
                .to_pkcs8v1()
                .map_err(|_| fail("P-256 PKCS#8 encoding"))?;
            let spki: PublicKeyX509Der<'static> = pair
                .public_key()
                .as_der()
                .map_err(|_| fail("P-256 public key encoding"))?;
            (pkcs8.as_ref().to_vec(), spki.as_ref().to_vec())
        }
        LeafKind::Rsa2048 => {
            let pair = aws_lc_rs::rsa::KeyPair::generate(KeySize::Rsa2048)
                .map_err(|_| fail("RSA-2048 key generation"))?;
            let pkcs8: Pkcs8V1Der<'static> =
                pair.as_der().map_err(|_| fail("RSA PKCS#8 encoding"))?;
            let spki: PublicKeyX509Der<'static> = pair
                .public_key()
                .as_der()
                .map_err(|_| fail("RSA public key encoding"))?;
            (pkcs8.as_ref().to_vec(), spki.as_ref().to_vec())
        }
    };
    Ok(LeafKey { kind, pkcs8, spki })
}

/// A fresh random serial number.
///
/// The top bit is cleared so the INTEGER is positive without a 0x00 pad,
/// and the first byte is non-zero so the encoding is minimal: the serial
/// is always exactly 16 octets, well under the 20 allowed, with 127 bits
/// of randomness.
pub fn random_serial() -> Result<[u8; 16], MintError> {
    //= https://www.rfc-editor.org/rfc/rfc5280#section-4.1.2.2
    //# The serial number MUST be a positive integer assigned by the CA to
    //# each certificate.
    let mut serial = [0u8; 16];
    aws_lc_rs::rand::fill(&mut serial).map_err(|_| MintError::Random)?;
    serial[0] = (serial[0] & 0x7f).max(1);
    Ok(serial)
}

// ---------------------------------------------------------------------------
// The issuing CA
// ---------------------------------------------------------------------------

/// A CA as the minting code needs it, read from its DER certificate.
#[derive(Clone, Debug)]
pub struct Issuer {
    /// The CA certificate's subject `Name`, as encoded there.
    subject: Vec<u8>,
    /// The CA's SubjectPublicKeyInfo DER.
    spki: Vec<u8>,
    /// The contents of the subjectPublicKey BIT STRING: what aws-lc-rs
    /// verifies with (an uncompressed EC point, or an `RSAPublicKey`).
    public_key: Vec<u8>,
    key_id: Vec<u8>,
    not_before: i64,
    not_after: i64,
    kind: CaKeyKind,
}

impl Issuer {
    /// Reads a CA certificate. It must be a CA (basicConstraints cA TRUE,
    /// keyCertSign if keyUsage is present) with a P-256, P-384 or
    /// 2048–8192-bit RSA key.
    pub fn from_der(ca_cert: &[u8]) -> Result<Issuer, MintError> {
        let malformed = |what: String| MintError::MalformedCa(what);
        if ca_cert.len() > MAX_CA_CERT_LEN {
            return Err(malformed(format!(
                "{} bytes, more than the {MAX_CA_CERT_LEN} accepted",
                ca_cert.len()
            )));
        }
        let (rest, cert) =
            X509Certificate::from_der(ca_cert).map_err(|e| malformed(format!("{e}")))?;
        if !rest.is_empty() {
            return Err(malformed(format!(
                "{} bytes follow the certificate",
                rest.len()
            )));
        }
        let tbs = &cert.tbs_certificate;

        match tbs.basic_constraints() {
            Ok(Some(bc)) if bc.value.ca => {}
            Ok(_) => {
                return Err(MintError::NotACa(
                    "basicConstraints cA is not TRUE (RFC 5280 4.2.1.9)".into(),
                ))
            }
            Err(e) => return Err(malformed(format!("basicConstraints: {e}"))),
        }
        match tbs.key_usage() {
            Ok(Some(ku)) if !ku.value.key_cert_sign() => {
                return Err(MintError::NotACa(
                    "keyUsage lacks keyCertSign (RFC 5280 4.2.1.3)".into(),
                ))
            }
            Ok(_) => {}
            Err(e) => return Err(malformed(format!("keyUsage: {e}"))),
        }

        //= https://www.rfc-editor.org/rfc/rfc5280#section-4.1.2.4
        //# The issuer field MUST contain a non-empty distinguished
        //# name (DN).
        if tbs.subject.iter_attributes().next().is_none() {
            return Err(MintError::NotACa(
                "its subject is empty, and an issuer name must not be".into(),
            ));
        }

        let spki = &tbs.subject_pki;
        let kind = ca_key_kind(spki)?;
        if spki.subject_public_key.unused_bits != 0 {
            return Err(malformed(
                "subjectPublicKey has unused bits in its last byte".into(),
            ));
        }
        let public_key = spki.subject_public_key.data.to_vec();

        //= https://www.rfc-editor.org/rfc/rfc5280#section-4.2.1.1
        //# Where a key identifier has been previously established,
        //# the CA SHOULD use the previously established identifier.
        let ski = tbs
            .get_extension_unique(&OID_X509_EXT_SUBJECT_KEY_IDENTIFIER)
            .map_err(|e| malformed(format!("subjectKeyIdentifier: {e}")))?;
        let key_id = match ski {
            Some(ext) => match ext.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(id) => id.0.to_vec(),
                _ => {
                    return Err(malformed(
                        "its subjectKeyIdentifier extension does not parse".into(),
                    ))
                }
            },
            //= https://www.rfc-editor.org/rfc/rfc5280#section-4.2.1.2
            //# (1) The keyIdentifier is composed of the 160-bit SHA-1 hash of the
            //#      value of the BIT STRING subjectPublicKey (excluding the tag,
            //#      length, and number of unused bits).
            None => sha1(&public_key),
        };

        Ok(Issuer {
            subject: tbs.subject.as_raw().to_vec(),
            spki: spki.raw.to_vec(),
            public_key,
            key_id,
            not_before: tbs.validity.not_before.timestamp(),
            not_after: tbs.validity.not_after.timestamp(),
            kind,
        })
    }

    /// The kind of key the CA signs with.
    pub fn kind(&self) -> CaKeyKind {
        self.kind
    }

    /// The CA certificate's notBefore, in unix seconds.
    pub fn not_before(&self) -> i64 {
        self.not_before
    }

    /// The CA certificate's notAfter, in unix seconds.
    pub fn not_after(&self) -> i64 {
        self.not_after
    }

    /// The CA's subject `Name` DER, as in its certificate.
    pub fn subject_der(&self) -> &[u8] {
        &self.subject
    }

    /// The CA's SubjectPublicKeyInfo DER.
    pub fn spki_der(&self) -> &[u8] {
        &self.spki
    }

    /// The key identifier put in minted leaves' authorityKeyIdentifier.
    pub fn key_id(&self) -> &[u8] {
        &self.key_id
    }
}

fn ca_key_kind(spki: &SubjectPublicKeyInfo<'_>) -> Result<CaKeyKind, MintError> {
    let unsupported = |what: String| MintError::UnsupportedCaKey(what);
    let alg = &spki.algorithm;
    if alg.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve: Option<Oid<'_>> = alg.parameters.as_ref().and_then(|p| p.as_oid().ok());
        let (kind, point_len) = match curve {
            Some(c) if c == OID_EC_P256 => (CaKeyKind::EcP256, 65),
            Some(c) if c == OID_NIST_EC_P384 => (CaKeyKind::EcP384, 97),
            Some(c) => return Err(unsupported(format!("EC curve {c} (P-256 or P-384 only)"))),
            None => return Err(unsupported("EC key without a named curve".into())),
        };
        // Certificate verifiers (webpki among them) take uncompressed
        // points only; catch a key they could not use here, not in a
        // browser.
        let point = &spki.subject_public_key.data;
        if point.len() != point_len || point.first() != Some(&0x04) {
            return Err(unsupported(
                "EC public key is not an uncompressed point of its curve".into(),
            ));
        }
        Ok(kind)
    } else if alg.algorithm == OID_PKCS1_RSAENCRYPTION {
        let bits = match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) => rsa_modulus_bits(rsa.modulus),
            _ => {
                return Err(MintError::MalformedCa(
                    "RSA public key does not parse".into(),
                ))
            }
        };
        if !(2048..=8192).contains(&bits) {
            return Err(unsupported(format!(
                "RSA modulus of {bits} bits (2048 to 8192 only)"
            )));
        }
        Ok(CaKeyKind::Rsa)
    } else {
        Err(unsupported(format!("key algorithm {}", alg.algorithm)))
    }
}

fn rsa_modulus_bits(modulus: &[u8]) -> usize {
    let digits: Vec<u8> = modulus.iter().copied().skip_while(|&b| b == 0).collect();
    match digits.first() {
        Some(&top) => digits.len() * 8 - top.leading_zeros() as usize,
        None => 0,
    }
}

fn sha1(data: &[u8]) -> Vec<u8> {
    digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, data)
        .as_ref()
        .to_vec()
}

// ---------------------------------------------------------------------------
// Minting
// ---------------------------------------------------------------------------

/// How leaves are minted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MintOptions {
    /// When the upstream leaf has no subjectAltName, put its commonName in
    /// one (as a dNSName or iPAddress) if it plausibly is a host name or an
    /// IP literal. Clients ignore the commonName, so such a leaf fails
    /// their name check unless this is set; leaving it unset mirrors the
    /// upstream leaf faithfully, failure included.
    pub append_cn_to_san: bool,
    /// Longest validity of a minted leaf, in days (notAfter − notBefore).
    pub max_validity_days: u32,
}

impl Default for MintOptions {
    fn default() -> Self {
        MintOptions {
            append_cn_to_san: false,
            max_validity_days: DEFAULT_MAX_VALIDITY_DAYS,
        }
    }
}

/// The to-be-signed part of a minted leaf, and what is needed to finish it.
#[derive(Clone, Debug)]
pub struct Tbs {
    /// The DER `TBSCertificate`: the bytes to sign.
    pub der: Vec<u8>,
    kind: CaKeyKind,
    not_before: i64,
    not_after: i64,
}

impl Tbs {
    /// The kind of CA key that must sign [`Tbs::der`]; its signature
    /// algorithm is already written in the TBS.
    pub fn kind(&self) -> CaKeyKind {
        self.kind
    }

    /// The minted leaf's notBefore, in unix seconds.
    pub fn not_before(&self) -> i64 {
        self.not_before
    }

    /// The minted leaf's notAfter, in unix seconds (for cache expiry).
    pub fn not_after(&self) -> i64 {
        self.not_after
    }
}

/// Builds the TBSCertificate of the impersonation leaf for `upstream_leaf`
/// (DER, as received from the server), issued by `issuer`, for `key`.
///
/// `now_unix` only matters when the validity must be shortened (see
/// [`MintOptions::max_validity_days`]). `serial` must not be zero; use
/// [`random_serial`].
pub fn build_tbs(
    upstream_leaf: &[u8],
    issuer: &Issuer,
    key: &LeafKey,
    opts: &MintOptions,
    now_unix: i64,
    serial: [u8; 16],
) -> Result<Tbs, MintError> {
    if opts.max_validity_days == 0 {
        return Err(MintError::InvalidOptions(
            "max_validity_days must be at least 1",
        ));
    }
    let upstream = Upstream::parse(upstream_leaf)?;
    let leaf_public_key = leaf_public_key(key)?;

    let (not_before, not_after) = clamp_validity(
        (upstream.not_before, upstream.not_after),
        (issuer.not_before, issuer.not_after),
        now_unix,
        opts.max_validity_days,
    )?;

    //= https://www.rfc-editor.org/rfc/rfc5280#section-4.1.2.6
    //# The subject name MAY be
    //# carried in the subject field and/or the subjectAltName extension.
    let subject = match &upstream.common_name {
        Some(cn) => seq(&[&tlv(SET, cn.attribute)]),
        None => seq(&[]),
    };
    let subject_is_empty = upstream.common_name.is_none();

    let san: Option<Vec<u8>> = match upstream.san {
        Some(value) => Some(value.to_vec()),
        None if opts.append_cn_to_san => upstream
            .common_name
            .as_ref()
            .and_then(|cn| cn_as_general_names(cn.value_tag, cn.value)),
        None => None,
    };
    if subject_is_empty && san.is_none() {
        return Err(MintError::NoSubjectName);
    }

    let extensions = leaf_extensions(
        key.kind,
        san.as_deref(),
        subject_is_empty,
        &issuer.key_id,
        &leaf_public_key,
    );

    //= https://www.rfc-editor.org/rfc/rfc5280#section-4.1.2.1
    //# When
    //# extensions are used, as expected in this profile, version MUST be 3
    //# (value is 2).
    let version = explicit(0, &tlv(INTEGER, &[0x02]));
    let validity = seq(&[&encode_time(not_before)?, &encode_time(not_after)?]);
    let der = seq(&[
        &version,
        &encode_serial(&serial)?,
        //= https://www.rfc-editor.org/rfc/rfc5280#section-4.1.2.3
        //# This field MUST contain the same algorithm identifier as the
        //# signatureAlgorithm field in the sequence Certificate (Section
        //# 4.1.1.2).
        &issuer.kind.signature_algorithm_der(),
        //= https://www.rfc-editor.org/rfc/rfc5280#section-4.1.2.4
        //# Name chaining is performed by matching the issuer
        //# distinguished name in one certificate with the subject name in a CA
        //# certificate.
        // Copied, never re-encoded: a re-encoding that differs in string
        // type or order would break byte-wise chaining.
        &issuer.subject,
        &validity,
        &subject,
        &key.spki,
        &explicit(3, &extensions),
    ]);
    Ok(Tbs {
        der,
        kind: issuer.kind,
        not_before,
        not_after,
    })
}

/// The finished certificate: `Certificate ::= SEQUENCE { tbsCertificate,
/// signatureAlgorithm, signatureValue BIT STRING }` (RFC 5280 4.1).
///
/// `signature` is the CA's signature over [`Tbs::der`] as X.509 carries it:
/// a DER `ECDSA-Sig-Value` for the EC kinds, the raw PKCS#1 v1.5 block for
/// RSA. This does not check it; see [`check_signature`] and [`finish`].
pub fn assemble(tbs: &Tbs, signature: &[u8]) -> Vec<u8> {
    //= https://www.rfc-editor.org/rfc/rfc5280#section-4.1.1.2
    //# This field MUST contain the same algorithm identifier as the
    //# signature field in the sequence tbsCertificate (Section 4.1.2.3).
    let algorithm = tbs.kind.signature_algorithm_der();
    //= https://www.rfc-editor.org/rfc/rfc5280#section-4.1.1.3
    //# This
    //# signature value is encoded as a BIT STRING and included in the
    //# signature field.
    let value = bit_string(0, signature);
    seq(&[&tbs.der, &algorithm, &value])
}

/// [`assemble`], then [`check_signature`]: the certificate, only if the
/// signature verifies with `issuer`'s key.
pub fn finish(tbs: &Tbs, signature: &[u8], issuer: &Issuer) -> Result<Vec<u8>, MintError> {
    let cert = assemble(tbs, signature);
    check_signature(&cert, issuer)?;
    Ok(cert)
}

/// Checks that `cert_der` is signed by `issuer`: its signature algorithm is
/// the one `issuer`'s key signs with (in both places it appears), its
/// issuer name is `issuer`'s subject, and the signature verifies over the
/// TBSCertificate bytes with `issuer`'s public key.
pub fn check_signature(cert_der: &[u8], issuer: &Issuer) -> Result<(), MintError> {
    let malformed = MintError::MalformedCertificate;
    let (cert, rest) = read_tlv(cert_der).map_err(malformed)?;
    if cert.tag != SEQUENCE || !rest.is_empty() {
        return Err(malformed("not a single DER SEQUENCE"));
    }
    let (tbs, rest) = read_tlv(cert.content).map_err(malformed)?;
    let (algorithm, rest) = read_tlv(rest).map_err(malformed)?;
    let (value, rest) = read_tlv(rest).map_err(malformed)?;
    if tbs.tag != SEQUENCE || algorithm.tag != SEQUENCE || value.tag != BIT_STRING {
        return Err(malformed(
            "not tbsCertificate, signatureAlgorithm, signatureValue",
        ));
    }
    if !rest.is_empty() {
        return Err(malformed("bytes follow the signatureValue"));
    }

    let expected = issuer.kind.signature_algorithm_der();
    let mismatch = MintError::SignatureAlgorithmMismatch {
        expected: issuer.kind.signature_algorithm_name(),
    };
    if algorithm.raw != expected.as_slice() {
        return Err(mismatch);
    }

    // TBSCertificate ::= SEQUENCE { [0] version OPTIONAL, serialNumber,
    // signature, issuer, ... }
    let (mut field, mut rest) = read_tlv(tbs.content).map_err(malformed)?;
    if field.tag == explicit_tag(0) {
        (field, rest) = read_tlv(rest).map_err(malformed)?;
    }
    if field.tag != INTEGER {
        return Err(malformed("tbsCertificate has no serialNumber"));
    }
    let (inner_algorithm, rest) = read_tlv(rest).map_err(malformed)?;
    if inner_algorithm.raw != expected.as_slice() {
        return Err(mismatch);
    }
    let (issuer_name, _) = read_tlv(rest).map_err(malformed)?;
    if issuer_name.raw != issuer.subject.as_slice() {
        return Err(MintError::IssuerMismatch);
    }

    let (&unused_bits, signature) = value
        .content
        .split_first()
        .ok_or(malformed("empty signatureValue"))?;
    if unused_bits != 0 {
        return Err(malformed("signatureValue has unused bits"));
    }
    if matches!(issuer.kind, CaKeyKind::EcP256 | CaKeyKind::EcP384) {
        // PKCS#11 returns ECDSA signatures as r||s; X.509 carries the DER
        // ECDSA-Sig-Value. Say so rather than "bad signature".
        match read_tlv(signature) {
            Ok((sig, rest)) if sig.tag == SEQUENCE && rest.is_empty() => {}
            _ => return Err(MintError::EcdsaSignatureNotDer),
        }
    }
    UnparsedPublicKey::new(issuer.kind.verification_algorithm(), &issuer.public_key)
        .verify(tbs.raw, signature)
        .map_err(|_| MintError::BadSignature)
}

// ---------------------------------------------------------------------------
// Reading the upstream leaf
// ---------------------------------------------------------------------------

/// What is copied from the upstream leaf.
struct Upstream<'a> {
    common_name: Option<CommonName<'a>>,
    /// The subjectAltName extnValue: a DER `GeneralNames`.
    san: Option<&'a [u8]>,
    not_before: i64,
    not_after: i64,
}

struct CommonName<'a> {
    /// The whole `AttributeTypeAndValue`, as sent.
    attribute: &'a [u8],
    /// The value's string type and contents.
    value_tag: u8,
    value: &'a [u8],
}

impl<'a> Upstream<'a> {
    fn parse(der: &'a [u8]) -> Result<Upstream<'a>, MintError> {
        let malformed = |what: String| MintError::MalformedUpstream(what);
        if der.len() > MAX_UPSTREAM_CERT_LEN {
            return Err(MintError::UpstreamTooLarge {
                len: der.len(),
                max: MAX_UPSTREAM_CERT_LEN,
            });
        }
        let (rest, cert) = X509Certificate::from_der(der).map_err(|e| malformed(format!("{e}")))?;
        if !rest.is_empty() {
            return Err(malformed(format!(
                "{} bytes follow the certificate",
                rest.len()
            )));
        }
        let tbs = &cert.tbs_certificate;

        let common_name = last_common_name(tbs.subject.as_raw())
            .map_err(|e| malformed(format!("subject: {e}")))?;
        if let Some(cn) = &common_name {
            if cn.attribute.len() > MAX_CN_LEN {
                return Err(MintError::CommonNameTooLarge {
                    len: cn.attribute.len(),
                    max: MAX_CN_LEN,
                });
            }
        }

        //= https://www.rfc-editor.org/rfc/rfc5280#section-4.2
        //# A certificate MUST NOT include more
        //# than one instance of a particular extension.
        // With two subjectAltNames, which one a client reads is anyone's
        // guess; refuse rather than pick.
        let san_ext = tbs
            .get_extension_unique(&OID_X509_EXT_SUBJECT_ALT_NAME)
            .map_err(|e| malformed(format!("subjectAltName: {e}")))?;
        let san = match san_ext {
            None => None,
            Some(ext) => {
                if ext.value.len() > MAX_SAN_LEN {
                    return Err(MintError::SanTooLarge {
                        len: ext.value.len(),
                        max: MAX_SAN_LEN,
                    });
                }
                //= https://www.rfc-editor.org/rfc/rfc5280#section-4.2.1.6
                //# GeneralNames ::= SEQUENCE SIZE (1..MAX) OF GeneralName
                match ext.parsed_extension() {
                    ParsedExtension::SubjectAlternativeName(names)
                        if !names.general_names.is_empty() => {}
                    ParsedExtension::SubjectAlternativeName(_) => {
                        return Err(malformed("subjectAltName holds no name".into()))
                    }
                    _ => return Err(malformed("subjectAltName does not parse".into())),
                }
                // The value is copied whole, so it must be exactly one
                // DER element: nothing may trail it.
                match read_tlv(ext.value) {
                    Ok((names, rest)) if names.tag == SEQUENCE && rest.is_empty() => {}
                    _ => {
                        return Err(malformed(
                            "subjectAltName is not a single DER SEQUENCE".into(),
                        ))
                    }
                }
                Some(ext.value)
            }
        };

        let not_before = tbs.validity.not_before.timestamp();
        let not_after = tbs.validity.not_after.timestamp();
        if not_before > not_after {
            return Err(MintError::InvertedValidity {
                not_before,
                not_after,
            });
        }
        Ok(Upstream {
            common_name,
            san,
            not_before,
            not_after,
        })
    }
}

/// The last commonName attribute of a DER `Name`, if any. The last one is
/// the most specific, and the one TLS clients that still read the
/// commonName use.
fn last_common_name(name: &[u8]) -> Result<Option<CommonName<'_>>, &'static str> {
    //= https://www.rfc-editor.org/rfc/rfc5280#section-4.1.2.4
    //# RDNSequence ::= SEQUENCE OF RelativeDistinguishedName
    //#
    //# RelativeDistinguishedName ::=
    //#   SET SIZE (1..MAX) OF AttributeTypeAndValue
    let (name, rest) = read_tlv(name)?;
    if name.tag != SEQUENCE || !rest.is_empty() {
        return Err("not a DER SEQUENCE");
    }
    let mut found = None;
    let mut rdns = name.content;
    while !rdns.is_empty() {
        let (rdn, rest) = read_tlv(rdns)?;
        rdns = rest;
        if rdn.tag != SET {
            return Err("a RelativeDistinguishedName is not a SET");
        }
        let mut attributes = rdn.content;
        while !attributes.is_empty() {
            let (attribute, rest) = read_tlv(attributes)?;
            attributes = rest;
            if attribute.tag != SEQUENCE {
                return Err("an AttributeTypeAndValue is not a SEQUENCE");
            }
            let (kind, rest) = read_tlv(attribute.content)?;
            let (value, rest) = read_tlv(rest)?;
            if kind.tag != OBJECT_IDENTIFIER || !rest.is_empty() {
                return Err("an AttributeTypeAndValue is not a type and a value");
            }
            if kind.content == COMMON_NAME_OID_CONTENT {
                found = Some(CommonName {
                    attribute: attribute.raw,
                    value_tag: value.tag,
                    value: value.content,
                });
            }
        }
    }
    Ok(found)
}

/// The leaf key's subjectPublicKey bits, after checking that its SPKI is
/// one DER element of the kind it claims.
fn leaf_public_key(key: &LeafKey) -> Result<Vec<u8>, MintError> {
    let bad = |what: &str| MintError::LeafKey(what.to_string());
    let (rest, spki) =
        SubjectPublicKeyInfo::from_der(&key.spki).map_err(|_| bad("its SPKI does not parse"))?;
    if !rest.is_empty() {
        return Err(bad("bytes follow its SPKI"));
    }
    let alg = &spki.algorithm;
    let matches = match key.kind {
        LeafKind::EcP256 => {
            alg.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY
                && alg
                    .parameters
                    .as_ref()
                    .and_then(|p| p.as_oid().ok())
                    .is_some_and(|curve| curve == OID_EC_P256)
        }
        LeafKind::Rsa2048 => alg.algorithm == OID_PKCS1_RSAENCRYPTION,
    };
    if !matches {
        return Err(bad("its SPKI is not of its kind"));
    }
    Ok(spki.subject_public_key.data.to_vec())
}

/// A `GeneralNames` holding the commonName, if it plausibly is a host name
/// (dNSName) or an IP literal (iPAddress).
fn cn_as_general_names(value_tag: u8, value: &[u8]) -> Option<Vec<u8>> {
    // Only string types whose bytes are the characters; a host name is
    // ASCII, and an A-label already is.
    if !matches!(
        value_tag,
        UTF8_STRING | PRINTABLE_STRING | IA5_STRING | TELETEX_STRING
    ) {
        return None;
    }
    let text = std::str::from_utf8(value).ok()?;
    let name = if let Ok(ip) = text.parse::<IpAddr>() {
        //= https://www.rfc-editor.org/rfc/rfc5280#section-4.2.1.6
        //# For IP
        //# version 4, as specified in [RFC791], the octet string MUST contain
        //# exactly four octets.  For IP version 6, as specified in
        //# [RFC2460], the octet string MUST contain exactly sixteen octets.
        let octets = match ip {
            IpAddr::V4(v4) => v4.octets().to_vec(),
            IpAddr::V6(v6) => v6.octets().to_vec(),
        };
        tlv(context_primitive(7), &octets)
    } else if plausible_dns_name(text) {
        //= https://www.rfc-editor.org/rfc/rfc5280#section-4.2.1.6
        //# When the subjectAltName extension contains a domain name system
        //# label, the domain name MUST be stored in the dNSName (an IA5String).
        tlv(context_primitive(2), text.as_bytes())
    } else {
        return None;
    };
    Some(seq(&[&name]))
}

/// A host name in preferred name syntax (letters, digits, hyphens; and
/// underscores, which real names carry), optionally with a leading `*.`
/// wildcard over at least two labels.
fn plausible_dns_name(name: &str) -> bool {
    let name = match name.strip_prefix("*.") {
        Some(rest) if rest.split('.').count() >= 2 => rest,
        Some(_) => return false,
        None => name,
    };
    if name.is_empty() || name.len() > 253 {
        return false;
    }
    let labels_ok = name.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    // An all-digit last label is a mangled IP address, not a host name.
    let last_label_alphabetic = name
        .rsplit('.')
        .next()
        .is_some_and(|label| !label.bytes().all(|b| b.is_ascii_digit()));
    labels_ok && last_label_alphabetic
}

// ---------------------------------------------------------------------------
// Validity
// ---------------------------------------------------------------------------

/// The minted validity window: the upstream window inside the CA's, cut
/// to at most `max_days` so that it keeps the upstream's status at `now`
/// (valid, expired, or not yet valid).
fn clamp_validity(
    upstream: (i64, i64),
    ca: (i64, i64),
    now: i64,
    max_days: u32,
) -> Result<(i64, i64), MintError> {
    let (upstream_not_before, upstream_not_after) = upstream;
    let (ca_not_before, ca_not_after) = ca;
    if upstream_not_before > upstream_not_after {
        return Err(MintError::InvertedValidity {
            not_before: upstream_not_before,
            not_after: upstream_not_after,
        });
    }
    let start = upstream_not_before.max(ca_not_before);
    let end = upstream_not_after.min(ca_not_after);
    // No overlap with the CA's window: the upstream certificate expired
    // before the CA was made (or starts after it ends). The mirror keeps
    // its state at the CA's edge: expired from the CA's first second on,
    // or not valid until the CA's last; never valid when the original is
    // not (a profile that passes the problem on must show it).
    if upstream_not_after < ca_not_before {
        return Ok((ca_not_before, ca_not_before));
    }
    if upstream_not_before > ca_not_after {
        return Ok((ca_not_after, ca_not_after));
    }
    let max = i64::from(max_days) * DAY;
    if end.saturating_sub(start) <= max {
        return Ok((start, end));
    }
    Ok(if now < start {
        // Not yet valid upstream: not yet valid here, from the same moment.
        (start, start.saturating_add(max))
    } else if now > end {
        // Expired upstream: expired here, at the same moment.
        (end.saturating_sub(max), end)
    } else {
        // Valid now: a day of slack before now for clients whose clocks
        // run behind, never before the window opens.
        let not_before = start.max(now.saturating_sub(DAY));
        (not_before, end.min(not_before.saturating_add(max)))
    })
}

/// A DER `Time`.
fn encode_time(unix: i64) -> Result<Vec<u8>, MintError> {
    let out_of_range = MintError::TimeOutOfRange(unix);
    let days = unix.div_euclid(DAY);
    let seconds = unix.rem_euclid(DAY);
    let (year, month, day) = civil_from_days(days).ok_or(out_of_range)?;
    if !(0..=9999).contains(&year) {
        return Err(MintError::TimeOutOfRange(unix));
    }
    let (hour, minute, second) = (seconds / 3600, seconds % 3600 / 60, seconds % 60);
    //= https://www.rfc-editor.org/rfc/rfc5280#section-4.1.2.5
    //# CAs conforming to this profile MUST always encode certificate
    //# validity dates through the year 2049 as UTCTime; certificate validity
    //# dates in 2050 or later MUST be encoded as GeneralizedTime.
    // UTCTime reads years 50-99 as 19YY, so it cannot carry a year before
    // 1950 either: those take GeneralizedTime too.
    Ok(if (1950..=2049).contains(&year) {
        //= https://www.rfc-editor.org/rfc/rfc5280#section-4.1.2.5.1
        //# For the purposes of this profile, UTCTime values MUST be expressed in
        //# Greenwich Mean Time (Zulu) and MUST include seconds (i.e., times are
        //# YYMMDDHHMMSSZ), even where the number of seconds is zero.
        let text = format!(
            "{:02}{month:02}{day:02}{hour:02}{minute:02}{second:02}Z",
            year % 100
        );
        tlv(UTC_TIME, text.as_bytes())
    } else {
        //= https://www.rfc-editor.org/rfc/rfc5280#section-4.1.2.5.2
        //# For the purposes of this profile, GeneralizedTime values MUST be
        //# expressed in Greenwich Mean Time (Zulu) and MUST include seconds
        //# (i.e., times are YYYYMMDDHHMMSSZ), even where the number of seconds
        //# is zero.  GeneralizedTime values MUST NOT include fractional seconds.
        let text = format!("{year:04}{month:02}{day:02}{hour:02}{minute:02}{second:02}Z");
        tlv(GENERALIZED_TIME, text.as_bytes())
    })
}

/// The proleptic Gregorian (year, month, day) of a count of days since
/// 1970-01-01; `None` only for counts far outside any certificate's range.
fn civil_from_days(days: i64) -> Option<(i64, i64, i64)> {
    // Count from 0000-03-01, so that each 400-year era (146,097 days) ends
    // with the leap day and the month lengths from March on repeat in a
    // 153-day, 5-month pattern.
    let shifted = days.checked_add(719_468)?;
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = era
        .checked_mul(400)?
        .checked_add(year_of_era + i64::from(month <= 2))?;
    Some((year, month, day))
}

// ---------------------------------------------------------------------------
// Extensions
// ---------------------------------------------------------------------------

/// The `Extensions` SEQUENCE of a minted leaf.
fn leaf_extensions(
    kind: LeafKind,
    san: Option<&[u8]>,
    subject_is_empty: bool,
    authority_key_id: &[u8],
    leaf_public_key: &[u8],
) -> Vec<u8> {
    let mut extensions = Vec::new();

    //= https://www.rfc-editor.org/rfc/rfc5280#section-4.2.1.9
    //# This extension MAY appear as a critical or
    //# non-critical extension in end entity certificates.
    // Critical, and cA FALSE (the DEFAULT, so the SEQUENCE is empty in
    // DER): no client may take this leaf for a CA.
    extensions.push(extension(BASIC_CONSTRAINTS, true, &seq(&[])));

    //= https://www.rfc-editor.org/rfc/rfc5280#section-4.2.1.3
    //# When present, conforming CAs
    //# SHOULD mark this extension as critical.
    // digitalSignature (bit 0) for the TLS handshake signature, and
    // keyEncipherment (bit 2) for RSA keys, which TLS 1.2 RSA key exchange
    // uses. DER drops trailing zero bits: the unused-bit count says how many.
    let key_usage = match kind {
        LeafKind::EcP256 => bit_string(7, &[0x80]),
        LeafKind::Rsa2048 => bit_string(5, &[0xa0]),
    };
    extensions.push(extension(KEY_USAGE, true, &key_usage));

    //= https://www.rfc-editor.org/rfc/rfc5280#section-4.2.1.12
    //# id-kp-serverAuth             OBJECT IDENTIFIER ::= { id-kp 1 }
    extensions.push(extension(
        EXT_KEY_USAGE,
        false,
        &seq(&[&oid(KP_SERVER_AUTH)]),
    ));

    if let Some(names) = san {
        //= https://www.rfc-editor.org/rfc/rfc5280#section-4.2.1.6
        //# If the subject field
        //# contains an empty sequence, then the issuing CA MUST include a
        //# subjectAltName extension that is marked as critical.  When including
        //# the subjectAltName extension in a certificate that has a non-empty
        //# subject distinguished name, conforming CAs SHOULD mark the
        //# subjectAltName extension as non-critical.
        extensions.push(extension(SUBJECT_ALT_NAME, subject_is_empty, names));
    }

    //= https://www.rfc-editor.org/rfc/rfc5280#section-4.2.1.1
    //# The keyIdentifier field of the authorityKeyIdentifier extension MUST
    //# be included in all certificates generated by conforming CAs to
    //# facilitate certification path construction.
    // AuthorityKeyIdentifier ::= SEQUENCE { keyIdentifier [0] IMPLICIT
    // OCTET STRING, ... }
    let authority_key_identifier = seq(&[&tlv(context_primitive(0), authority_key_id)]);
    extensions.push(extension(
        AUTHORITY_KEY_IDENTIFIER,
        false,
        &authority_key_identifier,
    ));

    //= https://www.rfc-editor.org/rfc/rfc5280#section-4.2.1.2
    //# To assist
    //# applications in identifying the appropriate end entity certificate,
    //# this extension SHOULD be included in all end entity certificates.
    // Method (1): SHA-1 of the subjectPublicKey bits.
    extensions.push(extension(
        SUBJECT_KEY_IDENTIFIER,
        false,
        &tlv(OCTET_STRING, &sha1(leaf_public_key)),
    ));

    let parts: Vec<&[u8]> = extensions.iter().map(Vec::as_slice).collect();
    seq(&parts)
}

/// `Extension ::= SEQUENCE { extnID, critical BOOLEAN DEFAULT FALSE,
/// extnValue OCTET STRING }`; DER omits `critical` when it is FALSE.
fn extension(id: &[u32], critical: bool, value: &[u8]) -> Vec<u8> {
    let id = oid(id);
    let value = tlv(OCTET_STRING, value);
    if critical {
        seq(&[&id, &[BOOLEAN, 0x01, 0xff], &value])
    } else {
        seq(&[&id, &value])
    }
}

// ---------------------------------------------------------------------------
// DER
// ---------------------------------------------------------------------------

const BOOLEAN: u8 = 0x01;
const INTEGER: u8 = 0x02;
const BIT_STRING: u8 = 0x03;
const OCTET_STRING: u8 = 0x04;
const NULL: u8 = 0x05;
const OBJECT_IDENTIFIER: u8 = 0x06;
const UTF8_STRING: u8 = 0x0c;
const PRINTABLE_STRING: u8 = 0x13;
const TELETEX_STRING: u8 = 0x14;
const IA5_STRING: u8 = 0x16;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;
const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;

/// id-at-commonName (2.5.4.3), as the contents of its DER OID.
const COMMON_NAME_OID_CONTENT: &[u8] = &[0x55, 0x04, 0x03];

const BASIC_CONSTRAINTS: &[u32] = &[2, 5, 29, 19];
const KEY_USAGE: &[u32] = &[2, 5, 29, 15];
const EXT_KEY_USAGE: &[u32] = &[2, 5, 29, 37];
const SUBJECT_ALT_NAME: &[u32] = &[2, 5, 29, 17];
const AUTHORITY_KEY_IDENTIFIER: &[u32] = &[2, 5, 29, 35];
const SUBJECT_KEY_IDENTIFIER: &[u32] = &[2, 5, 29, 14];
const KP_SERVER_AUTH: &[u32] = &[1, 3, 6, 1, 5, 5, 7, 3, 1];
const ECDSA_WITH_SHA256: &[u32] = &[1, 2, 840, 10045, 4, 3, 2];
const ECDSA_WITH_SHA384: &[u32] = &[1, 2, 840, 10045, 4, 3, 3];
const SHA256_WITH_RSA_ENCRYPTION: &[u32] = &[1, 2, 840, 113_549, 1, 1, 11];

/// The tag of a context-specific, constructed `[n]` (an EXPLICIT tag).
fn explicit_tag(n: u8) -> u8 {
    0xa0 | n
}

/// The tag of a context-specific, primitive `[n]` (an IMPLICIT tag over a
/// primitive type).
fn context_primitive(n: u8) -> u8 {
    0x80 | n
}

fn explicit(n: u8, inner: &[u8]) -> Vec<u8> {
    tlv(explicit_tag(n), inner)
}

fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 6);
    out.push(tag);
    // DER lengths: short form below 128, else the fewest big-endian bytes.
    match u8::try_from(content.len()) {
        Ok(short) if short < 0x80 => out.push(short),
        _ => {
            let bytes = content.len().to_be_bytes();
            let digits: Vec<u8> = bytes.iter().copied().skip_while(|&b| b == 0).collect();
            out.push(0x80 | digits.len() as u8);
            out.extend_from_slice(&digits);
        }
    }
    out.extend_from_slice(content);
    out
}

fn seq(parts: &[&[u8]]) -> Vec<u8> {
    tlv(SEQUENCE, &parts.concat())
}

fn bit_string(unused_bits: u8, bytes: &[u8]) -> Vec<u8> {
    let mut content = Vec::with_capacity(bytes.len() + 1);
    content.push(unused_bits);
    content.extend_from_slice(bytes);
    tlv(BIT_STRING, &content)
}

/// A DER OBJECT IDENTIFIER from its arcs (at least two; the first two are
/// packed in one subidentifier, each subidentifier in base 128).
fn oid(arcs: &[u32]) -> Vec<u8> {
    let mut content = Vec::new();
    let mut push = |value: u64| {
        let mut groups = Vec::new();
        let mut rest = value;
        loop {
            groups.push((rest & 0x7f) as u8);
            rest >>= 7;
            if rest == 0 {
                break;
            }
        }
        let last = groups.len() - 1;
        for (i, group) in groups.iter().rev().enumerate() {
            content.push(if i == last { *group } else { group | 0x80 });
        }
    };
    if let [first, second, rest @ ..] = arcs {
        push(u64::from(*first) * 40 + u64::from(*second));
        for arc in rest {
            push(u64::from(*arc));
        }
    }
    tlv(OBJECT_IDENTIFIER, &content)
}

/// A positive INTEGER in its minimal encoding.
fn encode_serial(serial: &[u8; 16]) -> Result<Vec<u8>, MintError> {
    let digits: Vec<u8> = serial.iter().copied().skip_while(|&b| b == 0).collect();
    let first = *digits.first().ok_or(MintError::ZeroSerial)?;
    let mut content = Vec::with_capacity(17);
    // A set top bit would make it negative: a 0x00 in front keeps it
    // positive (17 octets at most, under the 20 allowed).
    if first & 0x80 != 0 {
        content.push(0);
    }
    content.extend_from_slice(&digits);
    Ok(tlv(INTEGER, &content))
}

/// One DER element read from a buffer.
struct Tlv<'a> {
    tag: u8,
    content: &'a [u8],
    /// Tag, length and contents.
    raw: &'a [u8],
}

/// Reads one DER element from the front of `input`, returning it and what
/// follows. Strict: definite, minimal lengths and single-byte tags only.
fn read_tlv(input: &[u8]) -> Result<(Tlv<'_>, &[u8]), &'static str> {
    let (&tag, rest) = input.split_first().ok_or("truncated: no tag")?;
    if tag & 0x1f == 0x1f {
        return Err("multi-byte tag");
    }
    let (&first, mut rest) = rest.split_first().ok_or("truncated: no length")?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 {
            return Err("indefinite length, which DER forbids");
        }
        if count > 4 {
            return Err("length of more than four bytes");
        }
        let (bytes, after) = rest
            .split_at_checked(count)
            .ok_or("truncated: length bytes missing")?;
        rest = after;
        if bytes.first() == Some(&0) {
            return Err("non-minimal length, which DER forbids");
        }
        let len = bytes
            .iter()
            .fold(0usize, |len, &b| (len << 8) | usize::from(b));
        if len < 0x80 {
            return Err("non-minimal length, which DER forbids");
        }
        len
    };
    let (content, rest) = rest
        .split_at_checked(len)
        .ok_or("truncated: contents shorter than their length")?;
    let raw = input
        .get(..input.len() - rest.len())
        .ok_or("internal: element outside its input")?;
    Ok((Tlv { tag, content, raw }, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::io::{Read, Write};
    use std::sync::{Arc, OnceLock};
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::RsaKeyPair;
    use rcgen::{
        BasicConstraints, CertificateParams, CrlDistributionPoint, CustomExtension,
        DistinguishedName, DnType, DnValue, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose, SanType,
    };
    use rustls::client::danger::ServerCertVerifier;
    use rustls::client::WebPkiServerVerifier;
    use rustls::pki_types::{
        CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime,
    };
    use rustls::sign::{CertifiedKey, SingleCertAndKey};
    use rustls::{
        CertificateError, ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig,
        ServerConnection, SupportedProtocolVersion,
    };
    use x509_parser::extensions::{GeneralName, X509Extension};
    use x509_parser::oid_registry as reg;
    use x509_parser::time::ASN1Time;

    const ALL_CA_KINDS: [CaKeyKind; 3] = [CaKeyKind::EcP256, CaKeyKind::EcP384, CaKeyKind::Rsa];

    // ----- fixtures --------------------------------------------------------

    fn now() -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    /// The CA's software signing key, standing in for the HSM.
    enum Signer {
        Ec(EcdsaKeyPair),
        Rsa(RsaKeyPair),
    }

    impl Signer {
        fn sign(&self, message: &[u8]) -> Vec<u8> {
            let rng = SystemRandom::new();
            match self {
                Signer::Ec(pair) => pair.sign(&rng, message).unwrap().as_ref().to_vec(),
                Signer::Rsa(pair) => {
                    let mut signature = vec![0; pair.public_modulus_len()];
                    pair.sign(&signature::RSA_PKCS1_SHA256, &rng, message, &mut signature)
                        .unwrap();
                    signature
                }
            }
        }
    }

    struct TestCa {
        der: Vec<u8>,
        issuer: Issuer,
        signer: Signer,
        /// The PKCS#8 of the CA key, to make other signers from.
        pkcs8: Vec<u8>,
    }

    fn rcgen_alg(kind: CaKeyKind) -> &'static rcgen::SignatureAlgorithm {
        match kind {
            CaKeyKind::EcP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            CaKeyKind::EcP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            CaKeyKind::Rsa => &rcgen::PKCS_RSA_SHA256,
        }
    }

    fn set_validity(params: &mut CertificateParams, not_before: i64, not_after: i64) {
        params.not_before = ASN1Time::from_timestamp(not_before).unwrap().to_datetime();
        params.not_after = ASN1Time::from_timestamp(not_after).unwrap().to_datetime();
    }

    fn make_ca(kind: CaKeyKind, name: &str, not_before: i64, not_after: i64) -> TestCa {
        let key = KeyPair::generate_for(rcgen_alg(kind)).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(
            DnType::CountryName,
            DnValue::PrintableString("ZZ".try_into().unwrap()),
        );
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Loupe tests");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, not_before, not_after);
        let der = params.self_signed(&key).unwrap().der().to_vec();
        let pkcs8 = key.serialize_der();
        let signer = match kind {
            CaKeyKind::EcP256 => Signer::Ec(
                EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, &pkcs8)
                    .unwrap(),
            ),
            CaKeyKind::EcP384 => Signer::Ec(
                EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P384_SHA384_ASN1_SIGNING, &pkcs8)
                    .unwrap(),
            ),
            CaKeyKind::Rsa => Signer::Rsa(RsaKeyPair::from_pkcs8(&pkcs8).unwrap()),
        };
        let issuer = Issuer::from_der(&der).unwrap();
        TestCa {
            der,
            issuer,
            signer,
            pkcs8,
        }
    }

    /// One CA of each kind, valid from a year ago for ten years, shared by
    /// the tests (RSA key generation is slow).
    fn ca(kind: CaKeyKind) -> &'static TestCa {
        static CAS: [OnceLock<TestCa>; 3] = [const { OnceLock::new() }; 3];
        let slot = match kind {
            CaKeyKind::EcP256 => 0,
            CaKeyKind::EcP384 => 1,
            CaKeyKind::Rsa => 2,
        };
        CAS[slot].get_or_init(|| {
            let now = now();
            make_ca(
                kind,
                &format!("Loupe test CA {kind:?}"),
                now - 365 * DAY,
                now + 3650 * DAY,
            )
        })
    }

    /// Parameters of an upstream leaf, valid from 30 days ago for 90 days.
    fn upstream_params(cn: Option<&str>, sans: &[&str]) -> CertificateParams {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        if let Some(cn) = cn {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        params.subject_alt_names = sans
            .iter()
            .map(|name| match name.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*name).try_into().unwrap()),
            })
            .collect();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = now();
        set_validity(&mut params, now - 30 * DAY, now + 60 * DAY);
        params
    }

    /// The upstream leaf, signed by a stand-in for the site's real CA.
    fn sign_upstream(params: &CertificateParams) -> Vec<u8> {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::default();
        ca_params.distinguished_name = DistinguishedName::new();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "Upstream Public CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let upstream_ca = rcgen::Issuer::new(ca_params, ca_key);
        let leaf_key = KeyPair::generate().unwrap();
        params
            .signed_by(&leaf_key, &upstream_ca)
            .unwrap()
            .der()
            .to_vec()
    }

    fn upstream(cn: Option<&str>, sans: &[&str]) -> Vec<u8> {
        sign_upstream(&upstream_params(cn, sans))
    }

    fn ec_key() -> LeafKey {
        generate_leaf_key(LeafKind::EcP256).unwrap()
    }

    fn rsa_key() -> &'static LeafKey {
        static KEY: OnceLock<LeafKey> = OnceLock::new();
        KEY.get_or_init(|| generate_leaf_key(LeafKind::Rsa2048).unwrap())
    }

    fn mint_full(
        ca: &TestCa,
        upstream: &[u8],
        key: &LeafKey,
        opts: &MintOptions,
        now: i64,
    ) -> Result<Vec<u8>, MintError> {
        let tbs = build_tbs(upstream, &ca.issuer, key, opts, now, random_serial()?)?;
        let signature = ca.signer.sign(&tbs.der);
        finish(&tbs, &signature, &ca.issuer)
    }

    /// `build_tbs` for `upstream` with a fresh EC key, the default options,
    /// the current time and a random serial.
    fn tbs_for(ca: &TestCa, upstream: &[u8]) -> Result<Tbs, MintError> {
        build_tbs(
            upstream,
            &ca.issuer,
            &ec_key(),
            &MintOptions::default(),
            now(),
            random_serial().unwrap(),
        )
    }

    fn appending() -> MintOptions {
        MintOptions {
            append_cn_to_san: true,
            ..MintOptions::default()
        }
    }

    fn mint(ca: &TestCa, upstream: &[u8]) -> Vec<u8> {
        mint_full(ca, upstream, &ec_key(), &MintOptions::default(), now()).unwrap()
    }

    fn parse(der: &[u8]) -> X509Certificate<'_> {
        let (rest, cert) = X509Certificate::from_der(der).unwrap();
        assert!(rest.is_empty());
        cert
    }

    fn oid_content(arcs: &[u32]) -> Vec<u8> {
        read_tlv(&oid(arcs)).unwrap().0.content.to_vec()
    }

    fn find_ext<'a>(cert: &'a X509Certificate<'a>, arcs: &[u32]) -> Option<&'a X509Extension<'a>> {
        let id = oid_content(arcs);
        cert.extensions().iter().find(|e| e.oid.as_bytes() == id)
    }

    fn upstream_san_value(der: &[u8]) -> Vec<u8> {
        let cert = parse(der);
        find_ext(&cert, SUBJECT_ALT_NAME).unwrap().value.to_vec()
    }

    /// webpki (through rustls) validates `leaf` for `name` at `at`, with
    /// `ca_der` as the only root.
    fn webpki_verify(ca_der: &[u8], leaf: &[u8], name: &str, at: i64) -> Result<(), rustls::Error> {
        let mut roots = RootCertStore::empty();
        roots.add(CertificateDer::from(ca_der.to_vec())).unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .unwrap();
        verifier
            .verify_server_cert(
                &CertificateDer::from(leaf.to_vec()),
                &[],
                &ServerName::try_from(name.to_string()).unwrap(),
                &[],
                UnixTime::since_unix_epoch(Duration::from_secs(at as u64)),
            )
            .map(|_| ())
    }

    /// Moves every pending TLS byte from one side to the other.
    fn pump(from: &mut Connection, to: &mut Connection) {
        let mut wire = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut wire).unwrap();
        }
        let mut rest = &wire[..];
        while !rest.is_empty() {
            to.read_tls(&mut rest).unwrap();
            to.process_new_packets().unwrap();
        }
    }

    /// A real in-memory handshake: rustls serves the minted leaf with the
    /// generated key, and a rustls client that trusts only the CA accepts
    /// it and exchanges data.
    fn handshake(
        ca_kind: CaKeyKind,
        leaf_kind: LeafKind,
        version: &'static SupportedProtocolVersion,
    ) {
        let ca = ca(ca_kind);
        let key = match leaf_kind {
            LeafKind::EcP256 => ec_key(),
            LeafKind::Rsa2048 => rsa_key().clone(),
        };
        let up = upstream(Some("www.example.com"), &["www.example.com", "example.com"]);
        let leaf = mint_full(ca, &up, &key, &MintOptions::default(), now()).unwrap();

        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let signing_key = provider
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                key.pkcs8.clone(),
            )))
            .unwrap();
        let certified = CertifiedKey::new(vec![CertificateDer::from(leaf.clone())], signing_key);
        certified.keys_match().unwrap();
        let server_config = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[version])
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));

        let mut roots = RootCertStore::empty();
        roots.add(CertificateDer::from(ca.der.clone())).unwrap();
        let client_config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();

        let mut client = Connection::from(
            ClientConnection::new(
                Arc::new(client_config),
                ServerName::try_from("www.example.com").unwrap(),
            )
            .unwrap(),
        );
        let mut server = Connection::from(ServerConnection::new(Arc::new(server_config)).unwrap());
        for _ in 0..10 {
            if !client.is_handshaking() && !server.is_handshaking() {
                break;
            }
            pump(&mut client, &mut server);
            pump(&mut server, &mut client);
        }
        assert!(!client.is_handshaking() && !server.is_handshaking());
        assert_eq!(client.protocol_version(), Some(version.version));
        assert_eq!(
            client.peer_certificates().unwrap()[0].as_ref(),
            leaf.as_slice()
        );

        client.writer().write_all(b"GET / HTTP/1.1\r\n").unwrap();
        pump(&mut client, &mut server);
        let mut received = [0u8; 16];
        server.reader().read_exact(&mut received).unwrap();
        assert_eq!(&received, b"GET / HTTP/1.1\r\n");
    }

    /// The (notBefore, notAfter) of a leaf minted at `now` for an upstream
    /// leaf valid over `upstream`, by a P-256 CA valid over `ca_window`.
    fn minted_validity(upstream_window: (i64, i64), ca_window: (i64, i64), now: i64) -> (i64, i64) {
        let ca = make_ca(CaKeyKind::EcP256, "Validity CA", ca_window.0, ca_window.1);
        let mut params = upstream_params(Some("v.example"), &["v.example"]);
        set_validity(&mut params, upstream_window.0, upstream_window.1);
        let up = sign_upstream(&params);
        let leaf = mint_full(&ca, &up, &ec_key(), &MintOptions::default(), now).unwrap();
        let cert = parse(&leaf);
        let validity = cert.validity();
        (
            validity.not_before.timestamp(),
            validity.not_after.timestamp(),
        )
    }

    const MAX: i64 = DEFAULT_MAX_VALIDITY_DAYS as i64 * DAY;

    // ----- signature -------------------------------------------------------

    #[test]
    fn signature_verifies_under_p256_ca() {
        let cert = mint(
            ca(CaKeyKind::EcP256),
            &upstream(Some("a.example"), &["a.example"]),
        );
        check_signature(&cert, &ca(CaKeyKind::EcP256).issuer).unwrap();
        assert_eq!(
            parse(&cert).signature_algorithm.algorithm,
            reg::OID_SIG_ECDSA_WITH_SHA256
        );
    }

    #[test]
    fn signature_verifies_under_p384_ca() {
        let cert = mint(
            ca(CaKeyKind::EcP384),
            &upstream(Some("a.example"), &["a.example"]),
        );
        check_signature(&cert, &ca(CaKeyKind::EcP384).issuer).unwrap();
        assert_eq!(
            parse(&cert).signature_algorithm.algorithm,
            reg::OID_SIG_ECDSA_WITH_SHA384
        );
    }

    #[test]
    fn signature_verifies_under_rsa_ca() {
        let cert = mint(
            ca(CaKeyKind::Rsa),
            &upstream(Some("a.example"), &["a.example"]),
        );
        check_signature(&cert, &ca(CaKeyKind::Rsa).issuer).unwrap();
        let parsed = parse(&cert);
        assert_eq!(
            parsed.signature_algorithm.algorithm,
            reg::OID_PKCS1_SHA256WITHRSA
        );
        // sha256WithRSAEncryption carries NULL parameters.
        assert_eq!(
            CaKeyKind::Rsa.signature_algorithm_der(),
            [
                0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b, 0x05,
                0x00
            ]
        );
    }

    #[test]
    fn every_flipped_signature_bit_fails_check() {
        for kind in ALL_CA_KINDS {
            let ca = ca(kind);
            let up = upstream(Some("a.example"), &["a.example"]);
            let tbs = tbs_for(ca, &up).unwrap();
            let signature = ca.signer.sign(&tbs.der);
            finish(&tbs, &signature, &ca.issuer).unwrap();
            for bit in 0..signature.len() * 8 {
                let mut bad = signature.clone();
                bad[bit / 8] ^= 1 << (bit % 8);
                assert!(
                    finish(&tbs, &bad, &ca.issuer).is_err(),
                    "{kind:?}: flipped signature bit {bit} verified"
                );
            }
        }
    }

    #[test]
    fn every_flipped_tbs_bit_fails_check() {
        for kind in ALL_CA_KINDS {
            let ca = ca(kind);
            let up = upstream(Some("a.example"), &["a.example"]);
            let tbs = tbs_for(ca, &up).unwrap();
            let signature = ca.signer.sign(&tbs.der);
            for bit in 0..tbs.der.len() * 8 {
                let mut bad = tbs.clone();
                bad.der[bit / 8] ^= 1 << (bit % 8);
                assert!(
                    finish(&bad, &signature, &ca.issuer).is_err(),
                    "{kind:?}: flipped TBS bit {bit} verified"
                );
            }
        }
    }

    #[test]
    fn flipped_bit_in_key_identifier_is_a_bad_signature() {
        // A flip that leaves the DER well formed fails on the signature
        // itself, not on structure.
        let ca = ca(CaKeyKind::EcP256);
        let up = upstream(Some("a.example"), &["a.example"]);
        let tbs = tbs_for(ca, &up).unwrap();
        let signature = ca.signer.sign(&tbs.der);
        let mut bad = tbs.clone();
        // The TBS ends with the subjectKeyIdentifier's SHA-1.
        *bad.der.last_mut().unwrap() ^= 0x01;
        assert!(matches!(
            finish(&bad, &signature, &ca.issuer),
            Err(MintError::BadSignature)
        ));
    }

    #[test]
    fn signature_by_another_key_fails_check() {
        let ca = ca(CaKeyKind::EcP256);
        let impostor = make_ca(CaKeyKind::EcP256, "Impostor", now() - DAY, now() + DAY);
        let up = upstream(Some("a.example"), &["a.example"]);
        let tbs = tbs_for(ca, &up).unwrap();
        let signature = impostor.signer.sign(&tbs.der);
        assert!(matches!(
            finish(&tbs, &signature, &ca.issuer),
            Err(MintError::BadSignature)
        ));
    }

    #[test]
    fn raw_r_s_ecdsa_signature_is_refused_with_a_hint() {
        let ca = ca(CaKeyKind::EcP256);
        let fixed =
            EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &ca.pkcs8)
                .unwrap();
        let up = upstream(Some("a.example"), &["a.example"]);
        let tbs = tbs_for(ca, &up).unwrap();
        let raw = fixed.sign(&SystemRandom::new(), &tbs.der).unwrap();
        assert_eq!(raw.as_ref().len(), 64);
        let err = finish(&tbs, raw.as_ref(), &ca.issuer).unwrap_err();
        assert!(matches!(err, MintError::EcdsaSignatureNotDer), "{err}");
    }

    #[test]
    fn check_refuses_a_cert_of_another_signature_algorithm() {
        let cert = mint(
            ca(CaKeyKind::EcP256),
            &upstream(Some("a.example"), &["a.example"]),
        );
        assert!(matches!(
            check_signature(&cert, &ca(CaKeyKind::Rsa).issuer),
            Err(MintError::SignatureAlgorithmMismatch { .. })
        ));
    }

    #[test]
    fn check_refuses_a_cert_naming_another_issuer() {
        let other = make_ca(CaKeyKind::EcP256, "Other CA", now() - DAY, now() + DAY);
        let cert = mint(
            ca(CaKeyKind::EcP256),
            &upstream(Some("a.example"), &["a.example"]),
        );
        assert!(matches!(
            check_signature(&cert, &other.issuer),
            Err(MintError::IssuerMismatch)
        ));
    }

    #[test]
    fn check_refuses_every_truncation_of_a_minted_cert() {
        let ca = ca(CaKeyKind::EcP256);
        let cert = mint(ca, &upstream(Some("a.example"), &["a.example"]));
        for len in 0..cert.len() {
            assert!(
                check_signature(&cert[..len], &ca.issuer).is_err(),
                "length {len}"
            );
        }
        let mut longer = cert.clone();
        longer.push(0);
        assert!(check_signature(&longer, &ca.issuer).is_err());
    }

    // ----- chain validation and handshakes ---------------------------------

    #[test]
    fn webpki_accepts_upstream_dns_names() {
        for kind in ALL_CA_KINDS {
            let ca = ca(kind);
            let leaf = mint(
                ca,
                &upstream(Some("www.example.com"), &["www.example.com", "example.com"]),
            );
            webpki_verify(&ca.der, &leaf, "www.example.com", now()).unwrap();
            webpki_verify(&ca.der, &leaf, "example.com", now()).unwrap();
        }
    }

    #[test]
    fn webpki_accepts_upstream_wildcard() {
        let ca = ca(CaKeyKind::EcP256);
        let leaf = mint(ca, &upstream(Some("*.example.net"), &["*.example.net"]));
        webpki_verify(&ca.der, &leaf, "mail.example.net", now()).unwrap();
        assert!(webpki_verify(&ca.der, &leaf, "a.b.example.net", now()).is_err());
    }

    #[test]
    fn webpki_accepts_upstream_ip_addresses() {
        let ca = ca(CaKeyKind::Rsa);
        let leaf = mint(
            ca,
            &upstream(Some("192.0.2.7"), &["192.0.2.7", "2001:db8::7"]),
        );
        webpki_verify(&ca.der, &leaf, "192.0.2.7", now()).unwrap();
        webpki_verify(&ca.der, &leaf, "2001:db8::7", now()).unwrap();
    }

    #[test]
    fn webpki_refuses_names_upstream_does_not_carry() {
        let ca = ca(CaKeyKind::EcP256);
        let leaf = mint(ca, &upstream(Some("www.example.com"), &["www.example.com"]));
        let err = webpki_verify(&ca.der, &leaf, "www.example.org", now()).unwrap_err();
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext { .. })
            ),
            "{err:?}"
        );
    }

    #[test]
    fn handshake_p256_ca_ec_leaf() {
        handshake(CaKeyKind::EcP256, LeafKind::EcP256, &rustls::version::TLS13);
    }

    #[test]
    fn handshake_p256_ca_rsa_leaf() {
        handshake(
            CaKeyKind::EcP256,
            LeafKind::Rsa2048,
            &rustls::version::TLS13,
        );
    }

    #[test]
    fn handshake_p384_ca_ec_leaf() {
        handshake(CaKeyKind::EcP384, LeafKind::EcP256, &rustls::version::TLS13);
    }

    #[test]
    fn handshake_p384_ca_rsa_leaf() {
        handshake(
            CaKeyKind::EcP384,
            LeafKind::Rsa2048,
            &rustls::version::TLS13,
        );
    }

    #[test]
    fn handshake_rsa_ca_ec_leaf() {
        handshake(CaKeyKind::Rsa, LeafKind::EcP256, &rustls::version::TLS13);
    }

    #[test]
    fn handshake_rsa_ca_rsa_leaf() {
        handshake(CaKeyKind::Rsa, LeafKind::Rsa2048, &rustls::version::TLS13);
    }

    #[test]
    fn handshake_tls12_rsa_leaf_under_p256_ca() {
        handshake(
            CaKeyKind::EcP256,
            LeafKind::Rsa2048,
            &rustls::version::TLS12,
        );
    }

    #[test]
    fn handshake_tls12_ec_leaf_under_rsa_ca() {
        handshake(CaKeyKind::Rsa, LeafKind::EcP256, &rustls::version::TLS12);
    }

    // ----- fields ----------------------------------------------------------

    #[test]
    fn version_is_v3() {
        let leaf = mint(
            ca(CaKeyKind::EcP256),
            &upstream(Some("a.example"), &["a.example"]),
        );
        assert_eq!(parse(&leaf).version(), x509_parser::x509::X509Version::V3);
    }

    #[test]
    fn common_name_is_copied_exactly() {
        let up = upstream(Some("www.example.com"), &["www.example.com"]);
        let leaf = mint(ca(CaKeyKind::EcP256), &up);
        // The upstream subject is that one CN, so the whole Name matches.
        assert_eq!(
            parse(&leaf).subject().as_raw(),
            parse(&up).subject().as_raw()
        );
        assert_eq!(parse(&leaf).subject().to_string(), "CN=www.example.com");
    }

    #[test]
    fn printable_string_common_name_keeps_its_string_type() {
        let mut params = upstream_params(None, &["printable.example"]);
        params.distinguished_name.push(
            DnType::CommonName,
            DnValue::PrintableString("printable.example".try_into().unwrap()),
        );
        let up = sign_upstream(&params);
        let leaf = mint(ca(CaKeyKind::EcP256), &up);
        let cert = parse(&leaf);
        let cn = cert.subject().iter_common_name().next().unwrap();
        assert_eq!(
            cn.attr_value().tag(),
            x509_parser::der_parser::ber::Tag::PrintableString
        );
        assert_eq!(cert.subject().as_raw(), parse(&up).subject().as_raw());
    }

    #[test]
    fn only_the_common_name_of_the_upstream_subject_is_copied() {
        let mut params = upstream_params(None, &["shop.example"]);
        params.distinguished_name.push(DnType::CountryName, "US");
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Example Shop Inc.");
        params
            .distinguished_name
            .push(DnType::CommonName, "shop.example");
        let up = sign_upstream(&params);
        let leaf = mint(ca(CaKeyKind::EcP256), &up);
        let cert = parse(&leaf);
        assert_eq!(cert.subject().iter_attributes().count(), 1);
        let upstream_cert = parse(&up);
        let upstream_cn = last_common_name(upstream_cert.subject().as_raw())
            .unwrap()
            .unwrap();
        assert_eq!(
            cert.subject().as_raw(),
            seq(&[&tlv(SET, upstream_cn.attribute)]).as_slice()
        );
    }

    #[test]
    fn last_of_several_common_names_is_copied() {
        let mut params = upstream_params(None, &["b.example"]);
        params
            .distinguished_name
            .push(DnType::CommonName, "a.example");
        // rcgen keeps one value per type; add the second CN as a custom
        // attribute under the same OID.
        params
            .distinguished_name
            .push(DnType::CustomDnType(vec![2, 5, 4, 3]), "b.example");
        let up = sign_upstream(&params);
        let leaf = mint(ca(CaKeyKind::EcP256), &up);
        let cert = parse(&leaf);
        let cns: Vec<&str> = cert
            .subject()
            .iter_common_name()
            .map(|cn| cn.as_str().unwrap())
            .collect();
        assert_eq!(cns, ["b.example"]);
    }

    #[test]
    fn subject_alt_names_are_byte_identical_to_upstream() {
        let up = upstream(
            Some("www.example.com"),
            &[
                "www.example.com",
                "*.cdn.example.com",
                "192.0.2.1",
                "2001:db8::1",
            ],
        );
        let leaf = mint(ca(CaKeyKind::EcP256), &up);
        let cert = parse(&leaf);
        let san = find_ext(&cert, SUBJECT_ALT_NAME).unwrap();
        assert_eq!(san.value, upstream_san_value(&up).as_slice());
        assert!(!san.critical, "non-empty subject: SAN is not critical");
    }

    #[test]
    fn every_upstream_general_name_form_is_copied() {
        let mut params = upstream_params(Some("forms.example"), &["forms.example"]);
        params.subject_alt_names.push(SanType::Rfc822Name(
            "admin@forms.example".try_into().unwrap(),
        ));
        params
            .subject_alt_names
            .push(SanType::URI("https://forms.example/".try_into().unwrap()));
        let up = sign_upstream(&params);
        let leaf = mint(ca(CaKeyKind::EcP256), &up);
        let cert = parse(&leaf);
        assert_eq!(
            find_ext(&cert, SUBJECT_ALT_NAME).unwrap().value,
            upstream_san_value(&up).as_slice()
        );
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert!(san
            .value
            .general_names
            .iter()
            .any(|n| matches!(n, GeneralName::RFC822Name("admin@forms.example"))));
    }

    #[test]
    fn hundred_subject_alt_names_are_copied() {
        let names: Vec<String> = (0..100).map(|i| format!("host{i}.example.com")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let up = upstream(Some("host0.example.com"), &refs);
        let ca = ca(CaKeyKind::EcP384);
        let leaf = mint(ca, &up);
        let cert = parse(&leaf);
        assert_eq!(
            find_ext(&cert, SUBJECT_ALT_NAME).unwrap().value,
            upstream_san_value(&up).as_slice()
        );
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert_eq!(san.value.general_names.len(), 100);
        webpki_verify(&ca.der, &leaf, "host99.example.com", now()).unwrap();
    }

    #[test]
    fn idn_names_are_copied_as_sent() {
        // A U-label commonName (UTF8String) and an A-label dNSName.
        let up = upstream(Some("bücher.example"), &["xn--bcher-kva.example"]);
        let ca = ca(CaKeyKind::EcP256);
        let leaf = mint(ca, &up);
        let cert = parse(&leaf);
        let cn = cert.subject().iter_common_name().next().unwrap();
        assert_eq!(
            cn.attr_value().tag(),
            x509_parser::der_parser::ber::Tag::Utf8String
        );
        assert_eq!(cn.as_slice(), "bücher.example".as_bytes());
        assert_eq!(
            find_ext(&cert, SUBJECT_ALT_NAME).unwrap().value,
            upstream_san_value(&up).as_slice()
        );
        webpki_verify(&ca.der, &leaf, "xn--bcher-kva.example", now()).unwrap();
    }

    #[test]
    fn issuer_is_the_ca_subject_bytes() {
        for kind in ALL_CA_KINDS {
            let ca = ca(kind);
            let leaf = mint(ca, &upstream(Some("a.example"), &["a.example"]));
            let ca_cert = parse(&ca.der);
            assert_eq!(parse(&leaf).issuer().as_raw(), ca_cert.subject().as_raw());
            assert_eq!(ca.issuer.subject_der(), ca_cert.subject().as_raw());
        }
    }

    #[test]
    fn basic_constraints_are_critical_and_not_a_ca() {
        let leaf = mint(
            ca(CaKeyKind::EcP256),
            &upstream(Some("a.example"), &["a.example"]),
        );
        let cert = parse(&leaf);
        let bc = cert.basic_constraints().unwrap().unwrap();
        assert!(bc.critical);
        assert!(!bc.value.ca);
        assert_eq!(bc.value.path_len_constraint, None);
    }

    #[test]
    fn ec_leaf_key_usage_is_digital_signature_only() {
        let leaf = mint(
            ca(CaKeyKind::EcP256),
            &upstream(Some("a.example"), &["a.example"]),
        );
        let cert = parse(&leaf);
        let ku = cert.key_usage().unwrap().unwrap();
        assert!(ku.critical);
        assert_eq!(ku.value.flags, 1, "digitalSignature alone");
    }

    #[test]
    fn rsa_leaf_key_usage_adds_key_encipherment() {
        let up = upstream(Some("a.example"), &["a.example"]);
        let leaf = mint_full(
            ca(CaKeyKind::EcP256),
            &up,
            rsa_key(),
            &MintOptions::default(),
            now(),
        )
        .unwrap();
        let cert = parse(&leaf);
        let ku = cert.key_usage().unwrap().unwrap();
        assert!(ku.critical);
        assert!(ku.value.digital_signature() && ku.value.key_encipherment());
        assert_eq!(ku.value.flags, 0b101);
    }

    #[test]
    fn extended_key_usage_is_server_auth_only() {
        let leaf = mint(
            ca(CaKeyKind::EcP256),
            &upstream(Some("a.example"), &["a.example"]),
        );
        let cert = parse(&leaf);
        let eku = cert.extended_key_usage().unwrap().unwrap();
        assert!(!eku.critical);
        assert!(eku.value.server_auth);
        assert!(!eku.value.client_auth && !eku.value.any && eku.value.other.is_empty());
    }

    #[test]
    fn authority_key_identifier_is_the_ca_subject_key_identifier() {
        for kind in ALL_CA_KINDS {
            let ca = ca(kind);
            let leaf = mint(ca, &upstream(Some("a.example"), &["a.example"]));
            let ca_cert = parse(&ca.der);
            let ca_ski = match find_ext(&ca_cert, SUBJECT_KEY_IDENTIFIER)
                .unwrap()
                .parsed_extension()
            {
                ParsedExtension::SubjectKeyIdentifier(id) => id.0.to_vec(),
                other => panic!("{other:?}"),
            };
            let cert = parse(&leaf);
            let aki = find_ext(&cert, AUTHORITY_KEY_IDENTIFIER).unwrap();
            assert!(!aki.critical);
            match aki.parsed_extension() {
                ParsedExtension::AuthorityKeyIdentifier(aki) => {
                    assert_eq!(aki.key_identifier.as_ref().unwrap().0, ca_ski.as_slice());
                    assert!(aki.authority_cert_issuer.is_none());
                    assert!(aki.authority_cert_serial.is_none());
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn subject_key_identifier_is_sha1_of_the_leaf_key() {
        let key = ec_key();
        let up = upstream(Some("a.example"), &["a.example"]);
        let leaf = mint_full(
            ca(CaKeyKind::EcP256),
            &up,
            &key,
            &MintOptions::default(),
            now(),
        )
        .unwrap();
        let cert = parse(&leaf);
        let ski = find_ext(&cert, SUBJECT_KEY_IDENTIFIER).unwrap();
        assert!(!ski.critical);
        let bits = &cert.public_key().subject_public_key.data;
        match ski.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(id) => assert_eq!(id.0, sha1(bits).as_slice()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn subject_public_key_info_is_the_leaf_key() {
        let key = rsa_key();
        let up = upstream(Some("a.example"), &["a.example"]);
        let leaf = mint_full(
            ca(CaKeyKind::EcP384),
            &up,
            key,
            &MintOptions::default(),
            now(),
        )
        .unwrap();
        assert_eq!(parse(&leaf).public_key().raw, key.spki.as_slice());
    }

    #[test]
    fn nothing_else_is_copied_from_upstream() {
        let mut params = upstream_params(Some("full.example"), &["full.example"]);
        params.crl_distribution_points = vec![CrlDistributionPoint {
            uris: vec!["http://crl.example/ca.crl".into()],
        }];
        let ca_issuers = seq(&[&seq(&[
            &oid(&[1, 3, 6, 1, 5, 5, 7, 48, 2]),
            &tlv(context_primitive(6), b"http://ca.example/ca.crt"),
        ])]);
        params.custom_extensions = vec![
            CustomExtension::from_oid_content(&[1, 3, 6, 1, 5, 5, 7, 1, 1], ca_issuers),
            CustomExtension::from_oid_content(
                &[1, 3, 6, 1, 4, 1, 11129, 2, 4, 2],
                tlv(OCTET_STRING, &[0x00, 0x00]),
            ),
            CustomExtension::from_oid_content(
                &[2, 5, 29, 32],
                seq(&[&seq(&[&oid(&[2, 23, 140, 1, 2, 1])])]),
            ),
        ];
        let up = sign_upstream(&params);
        assert!(parse(&up).extensions().len() >= 7);
        let leaf = mint(ca(CaKeyKind::EcP256), &up);
        let cert = parse(&leaf);
        let ids: Vec<Vec<u8>> = cert
            .extensions()
            .iter()
            .map(|e| e.oid.as_bytes().to_vec())
            .collect();
        let expected: Vec<Vec<u8>> = [
            BASIC_CONSTRAINTS,
            KEY_USAGE,
            EXT_KEY_USAGE,
            SUBJECT_ALT_NAME,
            AUTHORITY_KEY_IDENTIFIER,
            SUBJECT_KEY_IDENTIFIER,
        ]
        .iter()
        .map(|arcs| oid_content(arcs))
        .collect();
        assert_eq!(ids, expected);
    }

    #[test]
    fn random_serials_are_positive_minimal_and_16_octets() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            let serial = random_serial().unwrap();
            assert!(serial[0] != 0 && serial[0] < 0x80);
            assert_eq!(encode_serial(&serial).unwrap().len(), 2 + 16);
            assert!(seen.insert(serial));
        }
    }

    #[test]
    fn minted_serial_is_positive_and_at_most_16_octets() {
        let ca = ca(CaKeyKind::EcP256);
        let up = upstream(Some("a.example"), &["a.example"]);
        let serial = random_serial().unwrap();
        let tbs = build_tbs(
            &up,
            &ca.issuer,
            &ec_key(),
            &MintOptions::default(),
            now(),
            serial,
        )
        .unwrap();
        let leaf = finish(&tbs, &ca.signer.sign(&tbs.der), &ca.issuer).unwrap();
        let cert = parse(&leaf);
        let raw = cert.raw_serial();
        assert!(raw.len() <= 16);
        assert!(raw[0] & 0x80 == 0 && raw[0] != 0, "positive and minimal");
        assert_eq!(raw, serial.as_slice());
    }

    #[test]
    fn serial_with_top_bit_set_gets_a_zero_pad() {
        assert_eq!(
            encode_serial(&[0xff; 16]).unwrap(),
            [&[INTEGER, 17, 0x00][..], &[0xff; 16][..]].concat()
        );
        let mut small = [0u8; 16];
        small[15] = 5;
        assert_eq!(encode_serial(&small).unwrap(), [INTEGER, 1, 5]);
    }

    #[test]
    fn zero_serial_is_refused() {
        let ca = ca(CaKeyKind::EcP256);
        let up = upstream(Some("a.example"), &["a.example"]);
        assert!(matches!(
            build_tbs(
                &up,
                &ca.issuer,
                &ec_key(),
                &MintOptions::default(),
                now(),
                [0; 16]
            ),
            Err(MintError::ZeroSerial)
        ));
    }

    // ----- names without a SAN, or without a CN -----------------------------

    #[test]
    fn no_common_name_gives_empty_subject_and_critical_san() {
        let up = upstream(None, &["nocn.example"]);
        let ca = ca(CaKeyKind::EcP256);
        let leaf = mint(ca, &up);
        let cert = parse(&leaf);
        assert_eq!(cert.subject().as_raw(), [SEQUENCE, 0x00]);
        let san = find_ext(&cert, SUBJECT_ALT_NAME).unwrap();
        assert!(san.critical);
        assert_eq!(san.value, upstream_san_value(&up).as_slice());
        webpki_verify(&ca.der, &leaf, "nocn.example", now()).unwrap();
    }

    #[test]
    fn subject_without_common_name_gives_empty_subject() {
        let mut params = upstream_params(None, &["org-only.example"]);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Org Only");
        let leaf = mint(ca(CaKeyKind::EcP256), &sign_upstream(&params));
        let cert = parse(&leaf);
        assert_eq!(cert.subject().as_raw(), [SEQUENCE, 0x00]);
        assert!(find_ext(&cert, SUBJECT_ALT_NAME).unwrap().critical);
    }

    #[test]
    fn append_cn_to_san_adds_a_dns_name() {
        let ca = ca(CaKeyKind::EcP256);
        let up = upstream(Some("legacy.example.com"), &[]);
        let opts = appending();
        let leaf = mint_full(ca, &up, &ec_key(), &opts, now()).unwrap();
        let cert = parse(&leaf);
        let san = find_ext(&cert, SUBJECT_ALT_NAME).unwrap();
        assert!(!san.critical);
        assert_eq!(
            san.value,
            seq(&[&tlv(0x82, b"legacy.example.com")]).as_slice()
        );
        webpki_verify(&ca.der, &leaf, "legacy.example.com", now()).unwrap();
    }

    #[test]
    fn append_cn_to_san_adds_a_wildcard() {
        let up = upstream(Some("*.legacy.example"), &[]);
        let opts = appending();
        let ca = ca(CaKeyKind::EcP256);
        let leaf = mint_full(ca, &up, &ec_key(), &opts, now()).unwrap();
        webpki_verify(&ca.der, &leaf, "www.legacy.example", now()).unwrap();
    }

    #[test]
    fn append_cn_to_san_adds_an_ip_address() {
        let ca = ca(CaKeyKind::EcP256);
        let opts = appending();
        let leaf = mint_full(
            ca,
            &upstream(Some("198.51.100.9"), &[]),
            &ec_key(),
            &opts,
            now(),
        )
        .unwrap();
        let cert = parse(&leaf);
        assert_eq!(
            find_ext(&cert, SUBJECT_ALT_NAME).unwrap().value,
            seq(&[&tlv(0x87, &[198, 51, 100, 9])]).as_slice()
        );
        webpki_verify(&ca.der, &leaf, "198.51.100.9", now()).unwrap();

        let leaf = mint_full(
            ca,
            &upstream(Some("2001:db8::53"), &[]),
            &ec_key(),
            &opts,
            now(),
        )
        .unwrap();
        webpki_verify(&ca.der, &leaf, "2001:db8::53", now()).unwrap();
    }

    #[test]
    fn append_cn_to_san_off_gives_no_san() {
        let ca = ca(CaKeyKind::EcP256);
        let leaf = mint(ca, &upstream(Some("legacy.example.com"), &[]));
        let cert = parse(&leaf);
        assert!(find_ext(&cert, SUBJECT_ALT_NAME).is_none());
        assert_eq!(
            cert.subject()
                .iter_common_name()
                .next()
                .unwrap()
                .as_str()
                .unwrap(),
            "legacy.example.com"
        );
        // Like the upstream leaf, it names nothing webpki will match.
        assert!(webpki_verify(&ca.der, &leaf, "legacy.example.com", now()).is_err());
    }

    #[test]
    fn append_cn_to_san_skips_a_common_name_that_is_no_host_name() {
        let opts = appending();
        for cn in [
            "Example Corp Server",
            "bücher.example",
            "*.example",
            "1.2.3",
            "-a.example",
            "",
        ] {
            let leaf = mint_full(
                ca(CaKeyKind::EcP256),
                &upstream(Some(cn), &[]),
                &ec_key(),
                &opts,
                now(),
            )
            .unwrap();
            assert!(
                find_ext(&parse(&leaf), SUBJECT_ALT_NAME).is_none(),
                "{cn:?}"
            );
        }
    }

    #[test]
    fn append_cn_to_san_keeps_an_upstream_san() {
        let opts = appending();
        let up = upstream(Some("cn.example"), &["san.example"]);
        let leaf = mint_full(ca(CaKeyKind::EcP256), &up, &ec_key(), &opts, now()).unwrap();
        assert_eq!(
            find_ext(&parse(&leaf), SUBJECT_ALT_NAME).unwrap().value,
            upstream_san_value(&up).as_slice()
        );
    }

    #[test]
    fn no_common_name_and_no_san_is_refused() {
        let mut params = upstream_params(None, &[]);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Nameless");
        let up = sign_upstream(&params);
        let ca = ca(CaKeyKind::EcP256);
        let opts = appending();
        assert!(matches!(
            build_tbs(
                &up,
                &ca.issuer,
                &ec_key(),
                &opts,
                now(),
                random_serial().unwrap()
            ),
            Err(MintError::NoSubjectName)
        ));
    }

    #[test]
    fn plausible_dns_names() {
        for ok in [
            "a",
            "example.com",
            "*.example.com",
            "a-b.c_d.example",
            "xn--bcher-kva.example",
        ] {
            assert!(plausible_dns_name(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "a..b",
            "*.com",
            "a.*.com",
            "-a.com",
            "a-.com",
            "a b.com",
            "1.2.3.4",
            "a.123",
            &"a".repeat(64),
            "example.com.",
        ] {
            assert!(!plausible_dns_name(bad), "{bad}");
        }
    }

    // ----- validity ----------------------------------------------------------

    #[test]
    fn short_upstream_validity_is_kept() {
        let now = now();
        let up = (now - 30 * DAY, now + 60 * DAY);
        assert_eq!(
            minted_validity(up, (now - 365 * DAY, now + 3650 * DAY), now),
            up
        );
    }

    #[test]
    fn long_upstream_validity_is_clamped_around_now() {
        let now = now();
        let (nb, na) = minted_validity(
            (now - 400 * DAY, now + 800 * DAY),
            (now - 1000 * DAY, now + 3650 * DAY),
            now,
        );
        assert_eq!(nb, now - DAY);
        assert_eq!(na, nb + MAX);
    }

    #[test]
    fn clamped_validity_does_not_start_before_upstream() {
        let now = now();
        let start = now - 2 * 3600;
        let (nb, na) = minted_validity(
            (start, now + 800 * DAY),
            (now - 1000 * DAY, now + 3650 * DAY),
            now,
        );
        assert_eq!((nb, na), (start, start + MAX));
    }

    #[test]
    fn clamped_validity_does_not_end_after_upstream() {
        let now = now();
        let end = now + 10 * DAY;
        let (nb, na) = minted_validity(
            (now - 800 * DAY, end),
            (now - 1000 * DAY, now + 3650 * DAY),
            now,
        );
        assert_eq!((nb, na), (now - DAY, end));
    }

    #[test]
    fn expired_upstream_stays_expired() {
        let now = now();
        let end = now - 100 * DAY;
        let ca_window = (now - 2000 * DAY, now + 3650 * DAY);
        let (nb, na) = minted_validity((now - 1000 * DAY, end), ca_window, now);
        assert_eq!((nb, na), (end - MAX, end));
        // A short expired window is mirrored as it is.
        let short = (now - 50 * DAY, now - 20 * DAY);
        assert_eq!(minted_validity(short, ca_window, now), short);

        let ca = make_ca(CaKeyKind::EcP256, "Old CA", ca_window.0, ca_window.1);
        let mut params = upstream_params(Some("old.example"), &["old.example"]);
        set_validity(&mut params, now - 1000 * DAY, end);
        let leaf = mint_full(
            &ca,
            &sign_upstream(&params),
            &ec_key(),
            &MintOptions::default(),
            now,
        )
        .unwrap();
        let err = webpki_verify(&ca.der, &leaf, "old.example", now).unwrap_err();
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(CertificateError::ExpiredContext { .. })
            ),
            "{err:?}"
        );
    }

    #[test]
    fn not_yet_valid_upstream_stays_not_yet_valid() {
        let now = now();
        let start = now + 10 * DAY;
        let (nb, na) = minted_validity(
            (start, now + 1000 * DAY),
            (now - 1000 * DAY, now + 3650 * DAY),
            now,
        );
        assert_eq!((nb, na), (start, start + MAX));
        assert!(nb > now);
    }

    #[test]
    fn ca_expiring_before_upstream_caps_not_after() {
        let now = now();
        let ca_end = now + 20 * DAY;
        let (nb, na) = minted_validity(
            (now - 30 * DAY, now + 300 * DAY),
            (now - 365 * DAY, ca_end),
            now,
        );
        assert_eq!((nb, na), (now - 30 * DAY, ca_end));
    }

    #[test]
    fn ca_younger_than_upstream_raises_not_before() {
        let now = now();
        let ca_start = now - 5 * DAY;
        let (nb, _) = minted_validity(
            (now - 30 * DAY, now + 60 * DAY),
            (ca_start, now + 3650 * DAY),
            now,
        );
        assert_eq!(nb, ca_start);
    }

    #[test]
    fn upstream_validity_before_the_ca_is_minted_expired_at_the_cas_start() {
        let now = now();
        let ca = make_ca(CaKeyKind::EcP256, "New CA", now - DAY, now + 3650 * DAY);
        let mut params = upstream_params(Some("gone.example"), &["gone.example"]);
        set_validity(&mut params, now - 500 * DAY, now - 100 * DAY);
        let up = sign_upstream(&params);
        let tbs = build_tbs(
            &up,
            &ca.issuer,
            &ec_key(),
            &MintOptions::default(),
            now,
            random_serial().unwrap(),
        )
        .unwrap();
        assert_eq!((tbs.not_before(), tbs.not_after()), (now - DAY, now - DAY));
        assert!(tbs.not_after() < now, "still expired");
        // And one that starts after the CA ends is not yet valid at its end.
        let mut params = upstream_params(Some("later.example"), &["later.example"]);
        set_validity(&mut params, now + 4000 * DAY, now + 4100 * DAY);
        let up = sign_upstream(&params);
        let tbs = build_tbs(
            &up,
            &ca.issuer,
            &ec_key(),
            &MintOptions::default(),
            now,
            random_serial().unwrap(),
        )
        .unwrap();
        assert_eq!(tbs.not_before(), now + 3650 * DAY);
        assert!(tbs.not_before() > now, "not yet valid");
    }

    #[test]
    fn inverted_upstream_validity_is_refused() {
        let now = now();
        let mut params = upstream_params(Some("inv.example"), &["inv.example"]);
        set_validity(&mut params, now + DAY, now - DAY);
        let up = sign_upstream(&params);
        let ca = ca(CaKeyKind::EcP256);
        assert!(matches!(
            build_tbs(
                &up,
                &ca.issuer,
                &ec_key(),
                &MintOptions::default(),
                now,
                random_serial().unwrap()
            ),
            Err(MintError::InvertedValidity { .. })
        ));
    }

    #[test]
    fn absurd_upstream_validity_is_clamped() {
        // 1900 to 9999 (the "no well-defined expiration" date).
        let now = now();
        let start = rcgen::date_time_ymd(1900, 1, 1).unix_timestamp();
        let end = rcgen::date_time_ymd(9999, 12, 31).unix_timestamp() + DAY - 1;
        let (nb, na) = minted_validity((start, end), (now - 365 * DAY, now + 3650 * DAY), now);
        assert_eq!((nb, na), (now - DAY, now - DAY + MAX));
    }

    #[test]
    fn times_from_2050_are_generalized_time() {
        let ca_window = (
            rcgen::date_time_ymd(2040, 1, 1).unix_timestamp(),
            rcgen::date_time_ymd(2060, 1, 1).unix_timestamp(),
        );
        let ca = make_ca(CaKeyKind::EcP256, "Future CA", ca_window.0, ca_window.1);
        let mut params = upstream_params(Some("future.example"), &["future.example"]);
        set_validity(
            &mut params,
            rcgen::date_time_ymd(2049, 6, 1).unix_timestamp(),
            rcgen::date_time_ymd(2051, 6, 1).unix_timestamp(),
        );
        let up = sign_upstream(&params);
        let now = rcgen::date_time_ymd(2049, 12, 1).unix_timestamp();
        let leaf = mint_full(&ca, &up, &ec_key(), &MintOptions::default(), now).unwrap();
        let cert = parse(&leaf);
        let validity = cert.validity();
        assert!(!validity.not_before.is_generalizedtime());
        assert!(validity.not_after.is_generalizedtime());
        // 2049-11-30 as UTCTime, and 397 days on, 2051-01-01, as
        // GeneralizedTime.
        let expected = seq(&[
            &tlv(UTC_TIME, b"491130000000Z"),
            &tlv(GENERALIZED_TIME, b"20510101000000Z"),
        ]);
        assert!(leaf
            .windows(expected.len())
            .any(|w| w == expected.as_slice()));
    }

    #[test]
    fn time_encoding_switches_at_1950_and_2050() {
        let ts = |y, m, d| rcgen::date_time_ymd(y, m, d).unix_timestamp();
        assert_eq!(
            encode_time(ts(1950, 1, 1)).unwrap(),
            tlv(UTC_TIME, b"500101000000Z")
        );
        assert_eq!(
            encode_time(ts(1950, 1, 1) - 1).unwrap(),
            tlv(GENERALIZED_TIME, b"19491231235959Z")
        );
        assert_eq!(
            encode_time(ts(2050, 1, 1) - 1).unwrap(),
            tlv(UTC_TIME, b"491231235959Z")
        );
        assert_eq!(
            encode_time(ts(2050, 1, 1)).unwrap(),
            tlv(GENERALIZED_TIME, b"20500101000000Z")
        );
        assert_eq!(
            encode_time(ts(2000, 2, 29) + 12 * 3600 + 34 * 60 + 56).unwrap(),
            tlv(UTC_TIME, b"000229123456Z")
        );
        assert_eq!(
            encode_time(ts(9999, 12, 31) + DAY - 1).unwrap(),
            tlv(GENERALIZED_TIME, b"99991231235959Z")
        );
        assert!(matches!(
            encode_time(ts(9999, 12, 31) + DAY),
            Err(MintError::TimeOutOfRange(_))
        ));
        assert!(matches!(
            encode_time(i64::MIN),
            Err(MintError::TimeOutOfRange(_))
        ));
        assert!(matches!(
            encode_time(i64::MAX),
            Err(MintError::TimeOutOfRange(_))
        ));
    }

    #[test]
    fn civil_dates_agree_with_the_time_crate() {
        let first = rcgen::date_time_ymd(1, 1, 1).unix_timestamp();
        let last = rcgen::date_time_ymd(9999, 12, 31).unix_timestamp();
        let mut unix = first;
        while unix <= last {
            let reference = ASN1Time::from_timestamp(unix).unwrap().to_datetime();
            let (year, month, day) = civil_from_days(unix.div_euclid(DAY)).unwrap();
            assert_eq!(
                (year, month, day),
                (
                    i64::from(reference.year()),
                    i64::from(u8::from(reference.month())),
                    i64::from(reference.day())
                ),
                "at {unix}"
            );
            unix += 7 * DAY + 3601;
        }
    }

    #[test]
    fn zero_max_validity_is_refused() {
        let ca = ca(CaKeyKind::EcP256);
        let opts = MintOptions {
            max_validity_days: 0,
            ..MintOptions::default()
        };
        assert!(matches!(
            build_tbs(
                &upstream(Some("a.example"), &["a.example"]),
                &ca.issuer,
                &ec_key(),
                &opts,
                now(),
                random_serial().unwrap()
            ),
            Err(MintError::InvalidOptions(_))
        ));
    }

    #[test]
    fn custom_max_validity_is_honoured() {
        let ca = ca(CaKeyKind::EcP256);
        let opts = MintOptions {
            max_validity_days: 7,
            ..MintOptions::default()
        };
        let now = now();
        let tbs = build_tbs(
            &upstream(Some("a.example"), &["a.example"]),
            &ca.issuer,
            &ec_key(),
            &opts,
            now,
            random_serial().unwrap(),
        )
        .unwrap();
        assert_eq!(
            (tbs.not_before(), tbs.not_after()),
            (now - DAY, now + 6 * DAY)
        );
    }

    // ----- the issuer ----------------------------------------------------------

    #[test]
    fn issuer_reads_kind_validity_and_key_id() {
        for kind in ALL_CA_KINDS {
            let ca = ca(kind);
            let cert = parse(&ca.der);
            assert_eq!(ca.issuer.kind(), kind);
            assert_eq!(
                ca.issuer.not_before(),
                cert.validity().not_before.timestamp()
            );
            assert_eq!(ca.issuer.not_after(), cert.validity().not_after.timestamp());
            assert_eq!(ca.issuer.spki_der(), cert.public_key().raw);
            // rcgen's identifier is a truncated SHA-256, not method (1): the
            // CA's own value is the one used.
            assert_ne!(
                ca.issuer.key_id(),
                sha1(&cert.public_key().subject_public_key.data).as_slice()
            );
        }
    }

    /// A P-256 CA certificate without a subjectKeyIdentifier, built by hand.
    fn ca_without_ski() -> TestCa {
        let rng = SystemRandom::new();
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
        let pair =
            EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref())
                .unwrap();
        let spki: PublicKeyX509Der<'static> = pair.public_key().as_der().unwrap();
        let name = seq(&[&tlv(
            SET,
            &seq(&[&oid(&[2, 5, 4, 3]), &tlv(UTF8_STRING, b"CA without SKI")]),
        )]);
        let (not_before, not_after) = (now() - 10 * DAY, now() + 3650 * DAY);
        let validity = seq(&[
            &encode_time(not_before).unwrap(),
            &encode_time(not_after).unwrap(),
        ]);
        let extensions = seq(&[
            &extension(BASIC_CONSTRAINTS, true, &seq(&[&[BOOLEAN, 0x01, 0xff]])),
            // keyCertSign (5) and cRLSign (6).
            &extension(KEY_USAGE, true, &bit_string(1, &[0x06])),
        ]);
        let der = seq(&[
            &explicit(0, &tlv(INTEGER, &[0x02])),
            &encode_serial(&[0x11; 16]).unwrap(),
            &CaKeyKind::EcP256.signature_algorithm_der(),
            &name,
            &validity,
            &name,
            spki.as_ref(),
            &explicit(3, &extensions),
        ]);
        let tbs = Tbs {
            der,
            kind: CaKeyKind::EcP256,
            not_before,
            not_after,
        };
        let signature = pair.sign(&rng, &tbs.der).unwrap();
        let der = assemble(&tbs, signature.as_ref());
        let issuer = Issuer::from_der(&der).unwrap();
        TestCa {
            der,
            issuer,
            signer: Signer::Ec(pair),
            pkcs8: pkcs8.as_ref().to_vec(),
        }
    }

    #[test]
    fn ca_without_ski_gets_sha1_key_id() {
        let ca = ca_without_ski();
        let cert = parse(&ca.der);
        assert!(find_ext(&cert, SUBJECT_KEY_IDENTIFIER).is_none());
        let expected = sha1(&cert.public_key().subject_public_key.data);
        assert_eq!(ca.issuer.key_id(), expected.as_slice());

        let leaf = mint(&ca, &upstream(Some("a.example"), &["a.example"]));
        let leaf_cert = parse(&leaf);
        match find_ext(&leaf_cert, AUTHORITY_KEY_IDENTIFIER)
            .unwrap()
            .parsed_extension()
        {
            ParsedExtension::AuthorityKeyIdentifier(aki) => {
                assert_eq!(aki.key_identifier.as_ref().unwrap().0, expected.as_slice())
            }
            other => panic!("{other:?}"),
        }
        webpki_verify(&ca.der, &leaf, "a.example", now()).unwrap();
    }

    #[test]
    fn leaf_certificate_is_refused_as_issuer() {
        let up = upstream(Some("a.example"), &["a.example"]);
        assert!(matches!(Issuer::from_der(&up), Err(MintError::NotACa(_))));
    }

    #[test]
    fn ca_without_key_cert_sign_is_refused() {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::CrlSign];
        let der = params.self_signed(&key).unwrap().der().to_vec();
        assert!(matches!(Issuer::from_der(&der), Err(MintError::NotACa(_))));
    }

    #[test]
    fn unsupported_ca_keys_are_refused() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let der = params.self_signed(&key).unwrap().der().to_vec();
        assert!(matches!(
            Issuer::from_der(&der),
            Err(MintError::UnsupportedCaKey(_))
        ));
    }

    #[test]
    fn every_truncation_of_the_ca_is_refused() {
        let der = &ca(CaKeyKind::EcP256).der;
        for len in 0..der.len() {
            assert!(Issuer::from_der(&der[..len]).is_err(), "length {len}");
        }
    }

    // ----- hostile upstream input --------------------------------------------

    #[test]
    fn every_truncation_of_upstream_is_refused() {
        let ca = ca(CaKeyKind::EcP256);
        let key = ec_key();
        let up = upstream(Some("www.example.com"), &["www.example.com", "192.0.2.1"]);
        build_tbs(
            &up,
            &ca.issuer,
            &key,
            &MintOptions::default(),
            now(),
            [1; 16],
        )
        .unwrap();
        for len in 0..up.len() {
            let result = build_tbs(
                &up[..len],
                &ca.issuer,
                &key,
                &MintOptions::default(),
                now(),
                [1; 16],
            );
            assert!(
                matches!(result, Err(MintError::MalformedUpstream(_))),
                "length {len}: {:?}",
                result.map(|_| ())
            );
        }
    }

    #[test]
    fn corrupted_upstream_never_panics() {
        let ca = ca(CaKeyKind::EcP256);
        let key = ec_key();
        let opts = appending();
        let up = upstream(
            Some("www.example.com"),
            &["www.example.com", "*.example.com"],
        );
        for i in 0..up.len() {
            for mask in [0x01, 0x80, 0xff] {
                let mut bad = up.clone();
                bad[i] ^= mask;
                // Ok or Err, never a panic; and any TBS built is DER.
                if let Ok(tbs) = build_tbs(&bad, &ca.issuer, &key, &opts, now(), [1; 16]) {
                    let (tlv, rest) = read_tlv(&tbs.der).unwrap();
                    assert!(tlv.tag == SEQUENCE && rest.is_empty());
                }
            }
        }
    }

    #[test]
    fn garbage_upstream_is_refused() {
        let ca = ca(CaKeyKind::EcP256);
        for garbage in [
            &b""[..],
            b"\x30",
            b"\x30\x80\x00\x00",
            b"\x30\x84\xff\xff\xff\xff",
            b"-----BEGIN CERTIFICATE-----",
            &[0u8; 100],
        ] {
            assert!(matches!(
                tbs_for(ca, garbage),
                Err(MintError::MalformedUpstream(_))
            ));
        }
    }

    #[test]
    fn trailing_bytes_after_upstream_are_refused() {
        let ca = ca(CaKeyKind::EcP256);
        let mut up = upstream(Some("a.example"), &["a.example"]);
        up.push(0);
        assert!(matches!(
            tbs_for(ca, &up),
            Err(MintError::MalformedUpstream(_))
        ));
    }

    #[test]
    fn oversized_san_extension_is_refused() {
        // About 100 kB of names.
        let names: Vec<String> = (0..2200)
            .map(|i| format!("host-{i:05}.a-rather-long-subdomain.example.com"))
            .collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let up = upstream(
            Some("host-00000.a-rather-long-subdomain.example.com"),
            &refs,
        );
        assert!(up.len() > 100_000);
        let ca = ca(CaKeyKind::EcP256);
        let result = tbs_for(ca, &up);
        assert!(
            matches!(
                result,
                Err(MintError::SanTooLarge {
                    max: MAX_SAN_LEN,
                    ..
                })
            ),
            "{:?}",
            result.map(|_| ())
        );
    }

    #[test]
    fn oversized_upstream_is_refused() {
        let ca = ca(CaKeyKind::EcP256);
        let huge = vec![0u8; MAX_UPSTREAM_CERT_LEN + 1];
        assert!(matches!(
            tbs_for(ca, &huge),
            Err(MintError::UpstreamTooLarge { .. })
        ));
    }

    #[test]
    fn oversized_common_name_is_refused() {
        let cn = "a".repeat(MAX_CN_LEN);
        let up = upstream(Some(&cn), &["a.example"]);
        let ca = ca(CaKeyKind::EcP256);
        assert!(matches!(
            tbs_for(ca, &up),
            Err(MintError::CommonNameTooLarge { .. })
        ));
    }

    #[test]
    fn duplicate_san_extensions_are_refused() {
        let mut params = upstream_params(Some("dup.example"), &["dup.example"]);
        params.custom_extensions = vec![CustomExtension::from_oid_content(
            &[2, 5, 29, 17],
            seq(&[&tlv(0x82, b"evil.example")]),
        )];
        let up = sign_upstream(&params);
        let ca = ca(CaKeyKind::EcP256);
        assert!(matches!(
            tbs_for(ca, &up),
            Err(MintError::MalformedUpstream(_))
        ));
    }

    #[test]
    fn malformed_san_extensions_are_refused() {
        let ca = ca(CaKeyKind::EcP256);
        for value in [
            seq(&[]),                                             // no name
            tlv(OCTET_STRING, b"x"),                              // not a SEQUENCE
            [seq(&[&tlv(0x82, b"a.example")]), vec![0]].concat(), // trailing byte
        ] {
            let mut params = upstream_params(Some("bad.example"), &[]);
            params.custom_extensions = vec![CustomExtension::from_oid_content(
                &[2, 5, 29, 17],
                value.clone(),
            )];
            let up = sign_upstream(&params);
            assert!(
                matches!(tbs_for(ca, &up), Err(MintError::MalformedUpstream(_))),
                "{value:02x?}"
            );
        }
    }

    #[test]
    fn leaf_key_of_the_wrong_kind_is_refused() {
        let ca = ca(CaKeyKind::EcP256);
        let up = upstream(Some("a.example"), &["a.example"]);
        let mut key = ec_key();
        key.kind = LeafKind::Rsa2048;
        assert!(matches!(
            build_tbs(
                &up,
                &ca.issuer,
                &key,
                &MintOptions::default(),
                now(),
                [1; 16]
            ),
            Err(MintError::LeafKey(_))
        ));
        let mut key = ec_key();
        key.spki.push(0);
        assert!(matches!(
            build_tbs(
                &up,
                &ca.issuer,
                &key,
                &MintOptions::default(),
                now(),
                [1; 16]
            ),
            Err(MintError::LeafKey(_))
        ));
    }

    #[test]
    fn leaf_key_debug_hides_the_private_key() {
        let key = ec_key();
        let shown = format!("{key:?}");
        assert!(shown.contains("redacted"));
        assert!(!shown.contains(&format!("{:?}", key.pkcs8)));
    }

    // ----- the DER encoder ------------------------------------------------------

    #[test]
    fn oid_encoder_matches_the_registry() {
        for (arcs, known) in [
            (BASIC_CONSTRAINTS, reg::OID_X509_EXT_BASIC_CONSTRAINTS),
            (KEY_USAGE, reg::OID_X509_EXT_KEY_USAGE),
            (EXT_KEY_USAGE, reg::OID_X509_EXT_EXTENDED_KEY_USAGE),
            (SUBJECT_ALT_NAME, reg::OID_X509_EXT_SUBJECT_ALT_NAME),
            (
                AUTHORITY_KEY_IDENTIFIER,
                reg::OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER,
            ),
            (
                SUBJECT_KEY_IDENTIFIER,
                reg::OID_X509_EXT_SUBJECT_KEY_IDENTIFIER,
            ),
            (ECDSA_WITH_SHA256, reg::OID_SIG_ECDSA_WITH_SHA256),
            (ECDSA_WITH_SHA384, reg::OID_SIG_ECDSA_WITH_SHA384),
            (SHA256_WITH_RSA_ENCRYPTION, reg::OID_PKCS1_SHA256WITHRSA),
        ] {
            assert_eq!(oid_content(arcs), known.as_bytes(), "{arcs:?}");
        }
        assert_eq!(oid_content(KP_SERVER_AUTH), [0x2b, 6, 1, 5, 5, 7, 3, 1]);
        assert_eq!(oid_content(&[2, 5, 4, 3]), COMMON_NAME_OID_CONTENT);
    }

    #[test]
    fn der_lengths_are_minimal() {
        for len in [0usize, 1, 127, 128, 255, 256, 65_535, 65_536] {
            let encoded = tlv(OCTET_STRING, &vec![0xab; len]);
            let (element, rest) = read_tlv(&encoded).unwrap();
            assert_eq!(element.content.len(), len);
            assert!(rest.is_empty());
            let header = encoded.len() - len;
            let expected_header = match len {
                0..=127 => 2,
                128..=255 => 3,
                256..=65_535 => 4,
                _ => 5,
            };
            assert_eq!(header, expected_header, "length {len}");
        }
    }

    #[test]
    fn der_reader_refuses_non_der_lengths() {
        assert!(read_tlv(&[0x04, 0x80, 0x00, 0x00]).is_err(), "indefinite");
        assert!(
            read_tlv(&[0x04, 0x81, 0x05, 1, 2, 3, 4, 5]).is_err(),
            "long form for short"
        );
        assert!(read_tlv(&[0x04, 0x82, 0x00, 0x80]).is_err(), "leading zero");
        assert!(
            read_tlv(&[0x04, 0x85, 1, 0, 0, 0, 0]).is_err(),
            "five length bytes"
        );
        assert!(read_tlv(&[0x1f, 0x01, 0x00]).is_err(), "multi-byte tag");
        assert!(read_tlv(&[0x04, 0x02, 0x00]).is_err(), "short contents");
    }
}
