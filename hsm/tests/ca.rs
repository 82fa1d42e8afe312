//! The CA lifecycle on a real token: init, export, rotate, destroy, each
//! audited; certificates that OpenSSL accepts as self-signed CAs.

mod common;

use std::{fs, process::Command};

use common::{audit_path, sandbox, verified_records, TestToken};
use loupe_hsm::{
    audit::{AuditConfig, AuditLog, Kind},
    ca::{ensure_audit_key, CaManager, CaOptions, CaRole},
    signer::{Signer, SignerConfig},
    token::{KeyAlg, Token},
};

fn openssl(args: &[&str]) -> String {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl is installed by scripts/setup");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn init_rotate_destroy_with_an_audit_trail() {
    let t = TestToken::new("ca");
    let token = Token::open(&t.config).unwrap();
    assert!(ensure_audit_key(&token).unwrap());
    assert!(
        !ensure_audit_key(&token).unwrap(),
        "the audit key is made once"
    );
    let path = audit_path("ca");
    let log = AuditLog::open(AuditConfig::new(&path, Some(token.clone()))).unwrap();
    let signer =
        Signer::start(SignerConfig::new(vec![t.config.clone()]), Some(log.sink())).unwrap();
    let sink = log.sink();
    let ca = CaManager {
        token: &token,
        signer: &signer,
        audit: &sink,
        requester: "ca-test".into(),
    };

    // EC CAs and their RSA companions.
    let made = ca.init(&CaOptions::default()).unwrap();
    assert_eq!(made.len(), 4);
    let kinds: Vec<(&str, &str)> = made
        .iter()
        .map(|c| (c.label.as_str(), c.key.as_str()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("loupe-ca/forward-trust/g1", "ec-p256"),
            ("loupe-ca/forward-untrust/g1", "ec-p256"),
            ("loupe-ca/forward-trust-rsa/g1", "rsa-2048"),
            ("loupe-ca/forward-untrust-rsa/g1", "rsa-2048"),
        ]
    );
    let both = ca.certificates(CaRole::ForwardTrust, None).unwrap();
    assert_eq!(both.len(), 2);
    let rsa_pem = sandbox().dir.join("ca-trust-rsa.pem");
    fs::write(&rsa_pem, both[1].pem()).unwrap();
    let text = openssl(&["x509", "-in", rsa_pem.to_str().unwrap(), "-noout", "-text"]);
    assert!(
        text.contains("CN = Loupe Forward Trust CA g1 RSA"),
        "{text}"
    );
    assert!(
        text.contains("sha256WithRSAEncryption") && text.contains("CA:TRUE, pathlen:0"),
        "{text}"
    );
    fs::remove_file(&rsa_pem).unwrap();
    let err = ca.init(&CaOptions::default()).unwrap_err().to_string();
    assert!(
        err.contains("already holds CA generation 1") && err.contains("rotate"),
        "{err}"
    );

    // The exported forward-trust certificate is a self-signed CA that
    // OpenSSL verifies against itself.
    let trust = ca.certificate(CaRole::ForwardTrust, None).unwrap();
    let pem_path = sandbox().dir.join("ca-trust.pem");
    fs::write(&pem_path, trust.pem()).unwrap();
    let p = pem_path.to_str().unwrap();
    assert!(openssl(&["verify", "-CAfile", p, p]).contains(": OK"));
    let text = openssl(&["x509", "-in", p, "-noout", "-text"]);
    assert!(text.contains("CA:TRUE, pathlen:0"), "{text}");
    assert!(text.contains("Certificate Sign, CRL Sign"), "{text}");
    assert!(text.contains("CN = Loupe Forward Trust CA g1"), "{text}");
    assert!(text.contains("ecdsa-with-SHA256"), "{text}");

    // The CA's private key is as protected as any generated key.
    let mut s = token.session().unwrap();
    let flags = s.private_key_flags(&CaRole::ForwardTrust.label(1)).unwrap();
    assert!(
        flags.contains(&("never-extractable", true)) && flags.contains(&("extractable", false))
    );

    // Rotate to RSA keys (no companion needed): generation 2 is active,
    // generation 1 stays listed.
    let rotated = ca
        .rotate(&CaOptions {
            alg: KeyAlg::Rsa2048,
            ..CaOptions::default()
        })
        .unwrap();
    assert!(rotated.iter().all(|c| c.generation == 2));
    assert_eq!(rotated.len(), 2);
    let list = ca.list().unwrap();
    assert_eq!(list.len(), 6);
    assert!(list.iter().filter(|c| c.active).all(|c| c.generation == 2));
    let active = ca.certificate(CaRole::ForwardTrust, None).unwrap();
    assert_ne!(active.fingerprint, trust.fingerprint);
    fs::write(&pem_path, active.pem()).unwrap();
    assert!(openssl(&["verify", "-CAfile", p, p]).contains(": OK"));
    assert!(openssl(&["x509", "-in", p, "-noout", "-text"]).contains("sha256WithRSAEncryption"));

    // Destroy: the active generation only with force; generation 1 goes.
    let err = ca.destroy(2, false).unwrap_err().to_string();
    assert!(err.contains("active CA"), "{err}");
    assert_eq!(
        ca.destroy(1, false).unwrap(),
        12,
        "4 key pairs + 4 certificates"
    );
    assert_eq!(ca.generations().unwrap(), vec![2]);
    assert!(ca.destroy(1, false).is_err());
    assert!(ca.certificate(CaRole::ForwardTrust, Some(1)).is_err());

    drop(sink);
    drop(signer);
    log.close().unwrap();
    let records = verified_records(&token, &path);
    let count = |k: Kind| records.iter().filter(|r| r.kind == k).count();
    assert_eq!(count(Kind::Keygen), 6);
    assert_eq!(
        count(Kind::Sign),
        6,
        "one self-signature per CA certificate"
    );
    assert_eq!(count(Kind::Destroy), 4);
    assert!(records.iter().any(|r| r.kind == Kind::Sign
        && r.purpose
            .starts_with("self-sign CA certificate CN=Loupe Forward Untrust CA g2")));
    fs::remove_file(&pem_path).unwrap();
}
