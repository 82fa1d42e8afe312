//! Certificates for the tests' servers: a test root CA and intermediate
//! (what a decryption profile's `trust_store` trusts), and leaves that are
//! good or broken in one chosen way (expired, not yet valid, wrong host,
//! self-signed, unknown root, missing or CA:false intermediate, SHA-1,
//! RSA-1024). Made with rcgen; the two kinds rcgen cannot make (SHA-1
//! signatures, 1024-bit RSA keys) with the openssl CLI.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, RsaKeySize, SanType,
};

use crate::{https::ServerCert, netns::run};

/// A CA that signs.
pub struct Ca {
    pub cert_pem: String,
    pub key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// What is wrong with a leaf, if anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flaw {
    None,
    Expired,
    NotYetValid,
    /// Valid for another name only.
    WrongHost,
    SelfSigned,
    /// Signed by a root nobody trusts.
    UnknownRoot,
    /// Sent without its intermediate.
    MissingIntermediate,
    /// The intermediate says CA:false.
    IntermediateNotCa,
    Sha1,
    Rsa1024,
}

/// The leaf's key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Key {
    P256,
    P384,
    Rsa2048,
    Rsa3072,
    Rsa4096,
}

/// The test PKI: a root, an intermediate under it, and a second root
/// nobody trusts.
pub struct Pki {
    pub dir: PathBuf,
    pub root: Ca,
    inter: Ca,
    bad_inter: Ca,
    stranger: Ca,
    /// The trusted root, as a PEM file (a profile's `trust_store`).
    pub roots: PathBuf,
}

fn key_for(k: Key) -> anyhow::Result<KeyPair> {
    Ok(match k {
        Key::P256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?,
        Key::P384 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384)?,
        Key::Rsa2048 => KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, RsaKeySize::_2048)?,
        Key::Rsa3072 => KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, RsaKeySize::_3072)?,
        Key::Rsa4096 => KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, RsaKeySize::_4096)?,
    })
}

/// A server leaf's parameters: the first name as CN, every name (DNS or
/// IP) as a SAN, for server authentication, valid from `from` to `until`.
fn leaf_params(
    names: &[&str],
    from: time::OffsetDateTime,
    until: time::OffsetDateTime,
) -> anyhow::Result<CertificateParams> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, names.first().copied().unwrap_or("leaf"));
    p.distinguished_name = dn;
    for n in names {
        p.subject_alt_names
            .push(match n.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*n).try_into()?),
            });
    }
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    (p.not_before, p.not_after) = (from, until);
    Ok(p)
}

fn ca_params(cn: &str, ca: bool) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn.push(DnType::OrganizationName, "Loupe test PKI");
    p.distinguished_name = dn;
    p.is_ca = if ca {
        IsCa::Ca(BasicConstraints::Unconstrained)
    } else {
        IsCa::ExplicitNoCa
    };
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = date_time_ymd(2020, 1, 1);
    p.not_after = date_time_ymd(2060, 1, 1);
    p
}

fn new_root(cn: &str) -> anyhow::Result<Ca> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let params = ca_params(cn, true);
    let cert = params.self_signed(&key)?;
    Ok(Ca {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        issuer: Issuer::new(params, key),
    })
}

fn under(parent: &Ca, cn: &str, ca: bool) -> anyhow::Result<Ca> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let params = ca_params(cn, ca);
    let cert = params.signed_by(&key, &parent.issuer)?;
    Ok(Ca {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        issuer: Issuer::new(params, key),
    })
}

impl Pki {
    pub fn new(dir: &Path) -> anyhow::Result<Pki> {
        std::fs::create_dir_all(dir)?;
        let root = new_root("Loupe Test Root")?;
        let inter = under(&root, "Loupe Test Intermediate", true)?;
        let bad_inter = under(&root, "Loupe Test Not-a-CA", false)?;
        let stranger = new_root("Nobody Trusts This Root")?;
        let roots = dir.join("test-roots.pem");
        std::fs::write(&roots, &root.cert_pem)?;
        Ok(Pki {
            dir: dir.to_path_buf(),
            root,
            inter,
            bad_inter,
            stranger,
            roots,
        })
    }

    /// A leaf for `names` (DNS names or IP addresses) with `key`, flawed
    /// as `flaw` says, written as `<tag>.crt` (chain) and `<tag>.key`.
    pub fn leaf(
        &self,
        tag: &str,
        names: &[&str],
        key: Key,
        flaw: Flaw,
    ) -> anyhow::Result<ServerCert> {
        let cert = self.dir.join(format!("{tag}.crt"));
        let keyf = self.dir.join(format!("{tag}.key"));
        if matches!(flaw, Flaw::Sha1 | Flaw::Rsa1024) {
            self.openssl_leaf(names, flaw, &cert, &keyf)?;
            return Ok(ServerCert { cert, key: keyf });
        }
        let k = key_for(key)?;
        let names: Vec<&str> = if flaw == Flaw::WrongHost {
            vec!["elsewhere.loupe.test"]
        } else {
            names.to_vec()
        };
        let now = time::OffsetDateTime::now_utc();
        let (from, until) = match flaw {
            Flaw::Expired => (
                now - time::Duration::days(60),
                now - time::Duration::days(1),
            ),
            Flaw::NotYetValid => (
                now + time::Duration::days(2),
                now + time::Duration::days(60),
            ),
            _ => (
                now - time::Duration::days(1),
                now + time::Duration::days(60),
            ),
        };
        let p = leaf_params(&names, from, until)?;
        let (leaf, chain) = match flaw {
            Flaw::SelfSigned => (p.self_signed(&k)?, String::new()),
            Flaw::UnknownRoot => (p.signed_by(&k, &self.stranger.issuer)?, String::new()),
            Flaw::MissingIntermediate => (p.signed_by(&k, &self.inter.issuer)?, String::new()),
            Flaw::IntermediateNotCa => (
                p.signed_by(&k, &self.bad_inter.issuer)?,
                self.bad_inter.cert_pem.clone(),
            ),
            _ => (
                p.signed_by(&k, &self.inter.issuer)?,
                self.inter.cert_pem.clone(),
            ),
        };
        std::fs::write(&cert, leaf.pem() + &chain)?;
        std::fs::write(&keyf, k.serialize_pem())?;
        Ok(ServerCert { cert, key: keyf })
    }

    /// A P-256 leaf under the intermediate for `names` (DNS names), valid
    /// from `not_before` to `not_after` (e.g. one that expired minutes ago),
    /// written as `<tag>.crt` (chain) and `<tag>.key`.
    pub fn leaf_valid(
        &self,
        tag: &str,
        names: &[&str],
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    ) -> anyhow::Result<ServerCert> {
        let cert = self.dir.join(format!("{tag}.crt"));
        let keyf = self.dir.join(format!("{tag}.key"));
        let k = key_for(Key::P256)?;
        let p = leaf_params(names, not_before, not_after)?;
        let leaf = p.signed_by(&k, &self.inter.issuer)?;
        std::fs::write(&cert, leaf.pem() + &self.inter.cert_pem)?;
        std::fs::write(&keyf, k.serialize_pem())?;
        Ok(ServerCert { cert, key: keyf })
    }

    /// SHA-1-signed or RSA-1024 leaves under the intermediate, by openssl.
    fn openssl_leaf(
        &self,
        names: &[&str],
        flaw: Flaw,
        cert: &Path,
        key: &Path,
    ) -> anyhow::Result<()> {
        let ca_cert = self.dir.join("inter.crt");
        let ca_key = self.dir.join("inter.key");
        std::fs::write(&ca_cert, &self.inter.cert_pem)?;
        std::fs::write(&ca_key, &self.inter.key_pem)?;
        let csr = cert.with_extension("csr");
        let ext = cert.with_extension("ext");
        let sans: Vec<String> = names.iter().map(|n| format!("DNS:{n}")).collect();
        std::fs::write(
            &ext,
            format!(
                "subjectAltName={}\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n",
                sans.join(",")
            ),
        )?;
        let newkey = if flaw == Flaw::Rsa1024 {
            "rsa:1024"
        } else {
            "rsa:2048"
        };
        let cn = format!("/CN={}", names.first().copied().unwrap_or("leaf"));
        run(std::process::Command::new("openssl")
            .args([
                "req", "-new", "-newkey", newkey, "-nodes", "-subj", &cn, "-keyout",
            ])
            .arg(key)
            .arg("-out")
            .arg(&csr))
        .context("openssl req")?;
        let digest = if flaw == Flaw::Sha1 {
            "-sha1"
        } else {
            "-sha256"
        };
        run(std::process::Command::new("openssl")
            .args([
                "x509",
                "-req",
                digest,
                "-days",
                "30",
                "-set_serial",
                "4242",
                "-in",
            ])
            .arg(&csr)
            .arg("-CA")
            .arg(&ca_cert)
            .arg("-CAkey")
            .arg(&ca_key)
            .arg("-extfile")
            .arg(&ext)
            .arg("-out")
            .arg(cert))
        .context("openssl x509 -req")?;
        let mut chain = std::fs::read_to_string(cert)?;
        if !chain.contains("BEGIN CERTIFICATE") {
            bail!("openssl wrote no certificate to {}", cert.display());
        }
        chain.push_str(&self.inter.cert_pem);
        std::fs::write(cert, chain)?;
        for f in [csr, ext, ca_cert, ca_key] {
            let _ = std::fs::remove_file(f);
        }
        Ok(())
    }
}
