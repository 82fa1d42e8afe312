//! Private keys in files, read once to be imported into a token: PEM
//! `PRIVATE KEY` (PKCS#8, RFC 5208), `EC PRIVATE KEY` (SEC1, RFC 5915) and
//! `RSA PRIVATE KEY` (PKCS#1, RFC 8017), EC on P-256 or P-384 and RSA of
//! 2048 or 3072 bits. The secret parts live in [`Zeroizing`] buffers, are
//! handed to the token and dropped; nothing here writes them anywhere.

use zeroize::Zeroizing;

use crate::{token::KeyAlg, HsmError, Result};

/// DER of the named curves' OIDs (as CKA_EC_PARAMS takes them).
pub const OID_P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
pub const OID_P384: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
/// id-ecPublicKey and rsaEncryption, the OID contents only.
const EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];

/// A private key's parts, as C_CreateObject takes them.
pub enum KeyParts {
    Ec {
        alg: KeyAlg,
        /// The private scalar, big-endian.
        d: Zeroizing<Vec<u8>>,
        /// The uncompressed public point.
        point: Vec<u8>,
    },
    Rsa {
        alg: KeyAlg,
        n: Vec<u8>,
        e: Vec<u8>,
        d: Zeroizing<Vec<u8>>,
        p: Zeroizing<Vec<u8>>,
        q: Zeroizing<Vec<u8>>,
        dp: Zeroizing<Vec<u8>>,
        dq: Zeroizing<Vec<u8>>,
        qinv: Zeroizing<Vec<u8>>,
    },
}

impl KeyParts {
    pub fn alg(&self) -> KeyAlg {
        match self {
            KeyParts::Ec { alg, .. } | KeyParts::Rsa { alg, .. } => *alg,
        }
    }
}

fn bad(why: impl Into<String>) -> HsmError {
    HsmError::Invalid(why.into())
}

/// A DER reader over one buffer.
struct Der<'a>(&'a [u8]);

impl<'a> Der<'a> {
    /// The next element: (tag, contents).
    fn next(&mut self) -> Result<(u8, &'a [u8])> {
        let b = self.0;
        let malformed = || bad("the key file is not well-formed DER");
        let (&tag, rest) = b.split_first().ok_or_else(malformed)?;
        let (&first, rest) = rest.split_first().ok_or_else(malformed)?;
        let (len, rest) = if first < 0x80 {
            (usize::from(first), rest)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 3 || rest.len() < n {
                return Err(malformed());
            }
            let len = rest[..n]
                .iter()
                .fold(0usize, |acc, &x| acc << 8 | usize::from(x));
            (len, &rest[n..])
        };
        if rest.len() < len {
            return Err(malformed());
        }
        self.0 = &rest[len..];
        Ok((tag, &rest[..len]))
    }

    fn expect(&mut self, tag: u8, what: &str) -> Result<&'a [u8]> {
        if self.0.is_empty() {
            return Err(bad(format!("the key file has no {what} where one belongs")));
        }
        match self.next()? {
            (t, v) if t == tag => Ok(v),
            _ => Err(bad(format!("the key file has no {what} where one belongs"))),
        }
    }

    /// An INTEGER's magnitude (leading zero bytes dropped).
    fn uint(&mut self, what: &str) -> Result<&'a [u8]> {
        let v = self.expect(0x02, what)?;
        let start = v.iter().position(|&b| b != 0).unwrap_or(v.len());
        Ok(&v[start..])
    }
}

/// The PEM labels of private keys.
const KEY_TAGS: [&str; 4] = [
    "PRIVATE KEY",
    "EC PRIVATE KEY",
    "RSA PRIVATE KEY",
    "ENCRYPTED PRIVATE KEY",
];

/// Reads the one PEM private key in `text` (other blocks, such as its
/// certificate, are passed over; two keys are refused: which one was
/// meant, and would the other be destroyed with the file?).
pub fn parse_private_key_pem(text: &str) -> Result<KeyParts> {
    let blocks = pem::parse_many(text).map_err(|e| bad(format!("not a PEM private key: {e}")))?;
    let mut keys = blocks.iter().filter(|b| KEY_TAGS.contains(&b.tag()));
    let p = match (keys.next(), keys.next()) {
        (Some(p), None) => p,
        (Some(_), Some(_)) => {
            return Err(bad(
                "the file holds more than one private key: import each from a file of its own",
            ))
        }
        (None, _) => {
            let tags: Vec<&str> = blocks.iter().map(|b| b.tag()).collect();
            return Err(match tags.is_empty() {
                true => bad("not a PEM private key: no PEM block"),
                false => bad(format!(
                    "a PEM {tags:?} file, not a private key (PRIVATE KEY, EC PRIVATE KEY or RSA \
                     PRIVATE KEY)"
                )),
            });
        }
    };
    if p.headers()
        .get("Proc-Type")
        .is_some_and(|v| v.contains("ENCRYPTED"))
    {
        return Err(bad(ENCRYPTED));
    }
    let der = Zeroizing::new(p.contents().to_vec());
    match p.tag() {
        "PRIVATE KEY" => pkcs8(&der),
        "EC PRIVATE KEY" => sec1(&der, None),
        "RSA PRIVATE KEY" => pkcs1(&der),
        "ENCRYPTED PRIVATE KEY" => Err(bad(ENCRYPTED)),
        _ => unreachable!("one of KEY_TAGS"),
    }
}

const ENCRYPTED: &str = "the key is encrypted: decrypt it to a file only root can read first \
                         (openssl pkey -in KEY -out PLAIN), import that, then destroy both";

fn pkcs8(der: &[u8]) -> Result<KeyParts> {
    let mut outer = Der(der);
    let mut info = Der(outer.expect(0x30, "PrivateKeyInfo")?);
    info.uint("version")?;
    let mut alg = Der(info.expect(0x30, "algorithm")?);
    let oid = alg.expect(0x06, "algorithm OID")?;
    let key = info.expect(0x04, "private key")?;
    if oid == EC_PUBLIC_KEY {
        let (tag, params) = alg.next()?;
        let mut curve = vec![tag, params.len() as u8];
        curve.extend_from_slice(params);
        sec1(key, Some(curve))
    } else if oid == RSA_ENCRYPTION {
        pkcs1(key)
    } else {
        Err(bad("the key is neither EC nor RSA"))
    }
}

/// SEC1 `ECPrivateKey`; `curve` from PKCS#8's algorithm when it has it.
fn sec1(der: &[u8], curve: Option<Vec<u8>>) -> Result<KeyParts> {
    let mut outer = Der(der);
    let mut k = Der(outer.expect(0x30, "ECPrivateKey")?);
    k.uint("version")?;
    let d = Zeroizing::new(k.expect(0x04, "private scalar")?.to_vec());
    let (mut curve, mut point) = (curve, None);
    while !k.0.is_empty() {
        match k.next()? {
            (0xa0, v) => {
                if curve.as_deref().is_some_and(|c| c != v) {
                    return Err(bad("the EC key names two different curves"));
                }
                curve = Some(v.to_vec());
            }
            (0xa1, v) => {
                let bits = Der(v).expect(0x03, "public key")?;
                // (The BIT STRING's unused-bits byte first.)
                point = bits.get(1..).map(<[u8]>::to_vec);
            }
            _ => {}
        }
    }
    let alg = match curve.as_deref() {
        Some(OID_P256) => KeyAlg::EcP256,
        Some(OID_P384) => KeyAlg::EcP384,
        Some(_) => return Err(bad("the EC key is not on P-256 or P-384")),
        None => return Err(bad("the EC key does not name its curve")),
    };
    let size = if alg == KeyAlg::EcP256 { 32 } else { 48 };
    let point = point.ok_or_else(|| {
        bad("the EC key file holds no public key (write it with `openssl pkey`, which includes it)")
    })?;
    if d.len() > size || point.len() != 1 + 2 * size || point[0] != 0x04 {
        return Err(bad("the EC key's parts have the wrong sizes for its curve"));
    }
    // The scalar at the curve's full size, as CKA_VALUE takes it.
    let mut full = Zeroizing::new(vec![0u8; size - d.len()]);
    full.extend_from_slice(&d);
    Ok(KeyParts::Ec {
        alg,
        d: full,
        point,
    })
}

fn pkcs1(der: &[u8]) -> Result<KeyParts> {
    let mut outer = Der(der);
    let mut k = Der(outer.expect(0x30, "RSAPrivateKey")?);
    k.uint("version")?;
    let n = k.uint("modulus")?.to_vec();
    let e = k.uint("public exponent")?.to_vec();
    let secret = |k: &mut Der, what| -> Result<Zeroizing<Vec<u8>>> {
        Ok(Zeroizing::new(k.uint(what)?.to_vec()))
    };
    let d = secret(&mut k, "private exponent")?;
    let p = secret(&mut k, "prime 1")?;
    let q = secret(&mut k, "prime 2")?;
    let dp = secret(&mut k, "exponent 1")?;
    let dq = secret(&mut k, "exponent 2")?;
    let qinv = secret(&mut k, "coefficient")?;
    let bits = n
        .first()
        .map_or(0, |b| (n.len() - 1) * 8 + (8 - b.leading_zeros() as usize));
    let alg = match bits {
        2048 => KeyAlg::Rsa2048,
        3072 => KeyAlg::Rsa3072,
        bits => {
            return Err(bad(format!(
                "an RSA key of {bits} bits (2048 or 3072 are taken)"
            )))
        }
    };
    // A small public exponent (3) is refused, as e = 65537 is the norm.
    let small = e.len() < 3 || (e.len() == 3 && e[..] < [0x01, 0x00, 0x01][..]);
    if small || e.last().is_some_and(|b| b & 1 == 0) {
        return Err(bad(
            "the RSA public exponent is not an odd number of at least 65537",
        ));
    }
    Ok(KeyParts::Rsa {
        alg,
        n,
        e,
        d,
        p,
        q,
        dp,
        dq,
        qinv,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broken_and_unsupported_files_say_what_they_are() {
        let two = "-----BEGIN PRIVATE KEY-----\nMAA=\n-----END PRIVATE KEY-----\n".repeat(2);
        let traditional = "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\n\
                           DEK-Info: AES-128-CBC,00000000000000000000000000000000\n\nMAA=\n\
                           -----END RSA PRIVATE KEY-----\n";
        for (text, want) in [
            (two.as_str(), "more than one private key"),
            (traditional, "encrypted"),
            ("hello", "not a PEM private key"),
            (
                "-----BEGIN PUBLIC KEY-----\nMAA=\n-----END PUBLIC KEY-----\n",
                "not a private key",
            ),
            (
                "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMAA=\n-----END ENCRYPTED PRIVATE KEY-----\n",
                "encrypted",
            ),
            (
                "-----BEGIN PRIVATE KEY-----\nMAA=\n-----END PRIVATE KEY-----\n",
                "no version",
            ),
            (
                "-----BEGIN RSA PRIVATE KEY-----\nMIIB\n-----END RSA PRIVATE KEY-----\n",
                "not well-formed",
            ),
        ] {
            let err = parse_private_key_pem(text).err().expect(want).to_string();
            assert!(err.contains(want), "{want}: {err}");
        }
    }
}
