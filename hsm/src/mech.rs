//! Signature mechanisms the signer offers, and the software half of each:
//! hashing, PKCS#1 DigestInfo, and the ECDSA `r || s` → DER conversion.
//!
//! The message is hashed here, in software, and only the digest crosses into
//! the token (`CKM_ECDSA`, `CKM_RSA_PKCS`, `CKM_RSA_PKCS_PSS`): the HSM sees
//! 32 or 48 bytes instead of a whole certificate, and every token that
//! supports the raw mechanisms works, whether or not it has the combined
//! hash-and-sign ones.

use cryptoki::mechanism::{
    rsa::{PkcsMgfType, PkcsPssParams},
    Mechanism, MechanismType,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256, Sha384};

use crate::error::{HsmError, Result};

/// A signature scheme, named as TLS 1.3 names them (RFC 8446 §4.2.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SignMech {
    EcdsaP256Sha256,
    EcdsaP384Sha384,
    RsaPkcs1Sha256,
    RsaPkcs1Sha384,
    RsaPssSha256,
    RsaPssSha384,
}

/// DER DigestInfo prefixes for PKCS#1 v1.5 (RFC 8017 §9.2, note 1).
const DIGEST_INFO_SHA256: &[u8] = &[
    0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05,
    0x00, 0x04, 0x20,
];
const DIGEST_INFO_SHA384: &[u8] = &[
    0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02, 0x05,
    0x00, 0x04, 0x30,
];

impl SignMech {
    pub const ALL: [SignMech; 6] = [
        SignMech::EcdsaP256Sha256,
        SignMech::EcdsaP384Sha384,
        SignMech::RsaPkcs1Sha256,
        SignMech::RsaPkcs1Sha384,
        SignMech::RsaPssSha256,
        SignMech::RsaPssSha384,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SignMech::EcdsaP256Sha256 => "ecdsa-p256-sha256",
            SignMech::EcdsaP384Sha384 => "ecdsa-p384-sha384",
            SignMech::RsaPkcs1Sha256 => "rsa-pkcs1-sha256",
            SignMech::RsaPkcs1Sha384 => "rsa-pkcs1-sha384",
            SignMech::RsaPssSha256 => "rsa-pss-sha256",
            SignMech::RsaPssSha384 => "rsa-pss-sha384",
        }
    }

    pub fn is_ecdsa(self) -> bool {
        matches!(self, SignMech::EcdsaP256Sha256 | SignMech::EcdsaP384Sha384)
    }

    fn digest(self, msg: &[u8]) -> Vec<u8> {
        match self {
            SignMech::EcdsaP256Sha256 | SignMech::RsaPkcs1Sha256 | SignMech::RsaPssSha256 => {
                Sha256::digest(msg).to_vec()
            }
            SignMech::EcdsaP384Sha384 | SignMech::RsaPkcs1Sha384 | SignMech::RsaPssSha384 => {
                Sha384::digest(msg).to_vec()
            }
        }
    }

    /// The PKCS#11 mechanism and the bytes to hand to C_Sign for `msg`.
    pub fn prepare(self, msg: &[u8]) -> (Mechanism<'static>, Vec<u8>) {
        let digest = self.digest(msg);
        match self {
            SignMech::EcdsaP256Sha256 | SignMech::EcdsaP384Sha384 => (Mechanism::Ecdsa, digest),
            SignMech::RsaPkcs1Sha256 | SignMech::RsaPkcs1Sha384 => {
                let prefix = if self == SignMech::RsaPkcs1Sha256 {
                    DIGEST_INFO_SHA256
                } else {
                    DIGEST_INFO_SHA384
                };
                let mut data = prefix.to_vec();
                data.extend_from_slice(&digest);
                (Mechanism::RsaPkcs, data)
            }
            SignMech::RsaPssSha256 => (
                // RFC 8446 §4.2.3: PSS with MGF1 over the same hash and a
                // salt as long as the digest.
                Mechanism::RsaPkcsPss(PkcsPssParams {
                    hash_alg: MechanismType::SHA256,
                    mgf: PkcsMgfType::MGF1_SHA256,
                    s_len: 32.into(),
                }),
                digest,
            ),
            SignMech::RsaPssSha384 => (
                Mechanism::RsaPkcsPss(PkcsPssParams {
                    hash_alg: MechanismType::SHA384,
                    mgf: PkcsMgfType::MGF1_SHA384,
                    s_len: 48.into(),
                }),
                digest,
            ),
        }
    }

    /// Turns the token's output into the wire form: DER `ECDSA-Sig-Value`
    /// for ECDSA (PKCS#11 returns `r || s`), unchanged for RSA.
    pub fn finish(self, key: &str, raw: Vec<u8>) -> Result<Vec<u8>> {
        let want = match self {
            SignMech::EcdsaP256Sha256 => 64,
            SignMech::EcdsaP384Sha384 => 96,
            _ => return Ok(raw),
        };
        if raw.len() != want {
            return Err(HsmError::KeyMismatch {
                label: key.to_string(),
                mech: self.name(),
                reason: format!(
                    "the token returned a {}-byte signature, expected {want} (wrong curve?)",
                    raw.len()
                ),
            });
        }
        Ok(ecdsa_der(&raw[..want / 2], &raw[want / 2..]))
    }
}

impl std::fmt::Display for SignMech {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for SignMech {
    type Err = HsmError;
    fn from_str(s: &str) -> Result<Self> {
        SignMech::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| HsmError::Invalid(format!("unknown signature mechanism {s:?}")))
    }
}

/// DER `SEQUENCE { INTEGER r, INTEGER s }` (RFC 3279 §2.2.3).
pub fn ecdsa_der(r: &[u8], s: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(r.len() + s.len() + 6);
    der_uint(&mut body, r);
    der_uint(&mut body, s);
    let mut out = vec![0x30];
    der_len(&mut out, body.len());
    out.extend_from_slice(&body);
    out
}

/// Appends a DER INTEGER holding the unsigned big-endian `v`: minimal length,
/// with a 0x00 pad when the top bit is set.
pub fn der_uint(out: &mut Vec<u8>, v: &[u8]) {
    let start = v
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(v.len().saturating_sub(1));
    let v = if v.is_empty() {
        &[0u8][..]
    } else {
        &v[start..]
    };
    let pad = v[0] & 0x80 != 0;
    out.push(0x02);
    der_len(out, v.len() + usize::from(pad));
    if pad {
        out.push(0);
    }
    out.extend_from_slice(v);
}

/// Appends a DER length (X.690 §8.1.3).
pub fn der_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|&&b| b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_integers_are_minimal_and_positive() {
        let mut v = Vec::new();
        der_uint(&mut v, &[0, 0, 0x7f]);
        assert_eq!(v, [0x02, 0x01, 0x7f]);
        v.clear();
        der_uint(&mut v, &[0x80, 1]);
        assert_eq!(v, [0x02, 0x03, 0x00, 0x80, 0x01]);
        v.clear();
        der_uint(&mut v, &[0, 0]);
        assert_eq!(v, [0x02, 0x01, 0x00]);
    }

    #[test]
    fn long_lengths_use_the_long_form() {
        let mut v = Vec::new();
        der_len(&mut v, 0x7f);
        der_len(&mut v, 0x80);
        der_len(&mut v, 0x1234);
        assert_eq!(v, [0x7f, 0x81, 0x80, 0x82, 0x12, 0x34]);
    }

    #[test]
    fn wrong_length_ecdsa_output_is_a_key_mismatch() {
        let err = SignMech::EcdsaP384Sha384
            .finish("k", vec![1; 64])
            .unwrap_err();
        assert!(err.to_string().contains("expected 96"), "{err}");
        let ok = SignMech::EcdsaP256Sha256
            .finish("k", vec![0x80; 64])
            .unwrap();
        assert_eq!(ok[0], 0x30);
        assert_eq!(ok.len(), 2 + 2 * (2 + 33));
    }

    #[test]
    fn names_round_trip() {
        for m in SignMech::ALL {
            assert_eq!(m.name().parse::<SignMech>().unwrap(), m);
        }
        assert!("md5".parse::<SignMech>().is_err());
    }
}
