//! Server keys (inbound inspection) on a real token: imported from the
//! files OpenSSL writes and generated there, SENSITIVE and not
//! EXTRACTABLE as the token itself and opensc's pkcs11-tool report, their
//! values unreadable; CSRs OpenSSL verifies; each step audited.

mod common;

use std::{fs, path::Path, process::Command};

use common::{rig, sandbox, verified_records, Rig};
use loupe_hsm::{
    audit::{AuditSink, Kind},
    ca::spki_der,
    server_keys::{ServerKeys, PREFIX},
    signer::Signer,
    token::{KeyAlg, Token, SOFTHSM2_MODULE},
};

fn run(program: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(program)
        .args(args)
        .env("SOFTHSM2_CONF", sandbox().conf())
        .output()
        .unwrap_or_else(|e| panic!("{program} (installed by scripts/setup): {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn openssl(args: &[&str]) -> String {
    let (ok, text) = run("openssl", args);
    assert!(ok, "openssl {args:?}: {text}");
    text
}

fn manager<'a>(token: &'a Token, signer: &'a Signer, sink: &'a AuditSink) -> ServerKeys<'a> {
    ServerKeys {
        token,
        signer,
        audit: sink,
        requester: "server-keys-test".into(),
    }
}

/// `csr` written to `path`, as `openssl req -verify -text` shows it.
fn verified_csr(path: &Path, csr: &str) -> String {
    fs::write(path, csr).unwrap();
    openssl(&[
        "req",
        "-in",
        &path.display().to_string(),
        "-verify",
        "-noout",
        "-text",
    ])
}

/// A new private key file (PKCS#8 PEM) from `openssl genpkey`.
fn genpkey(algorithm: &str, option: &str, out: &Path) {
    openssl(&[
        "genpkey",
        "-algorithm",
        algorithm,
        "-pkeyopt",
        option,
        "-out",
        &out.display().to_string(),
    ]);
}

/// The DER SubjectPublicKeyInfo of a PEM key file, as OpenSSL reads it.
fn openssl_spki(key: &Path) -> Vec<u8> {
    let der = key.with_extension("spki");
    openssl(&[
        "pkey",
        "-in",
        &key.display().to_string(),
        "-pubout",
        "-outform",
        "DER",
        "-out",
        &der.display().to_string(),
    ]);
    fs::read(der).unwrap()
}

#[test]
fn imported_and_generated_server_keys_stay_on_the_token_and_sign_csrs() {
    let Rig {
        t,
        token,
        path,
        log,
        signer,
    } = rig("srvkeys");
    let sink = log.sink();
    let keys = manager(&token, &signer, &sink);
    let dir = sandbox().dir.join(format!("files-{}", t.config.label));
    fs::create_dir_all(&dir).unwrap();
    let file = |name: &str| dir.join(name).display().to_string();

    // The files OpenSSL writes: PKCS#8 EC and RSA, SEC1, PKCS#1.
    genpkey("EC", "ec_paramgen_curve:P-256", &dir.join("ec.pem"));
    openssl(&["ec", "-in", &file("ec.pem"), "-out", &file("ec-sec1.pem")]);
    genpkey("RSA", "rsa_keygen_bits:2048", &dir.join("rsa.pem"));
    openssl(&[
        "rsa",
        "-in",
        &file("rsa.pem"),
        "-traditional",
        "-out",
        &file("rsa-pkcs1.pem"),
    ]);
    genpkey("EC", "ec_paramgen_curve:P-384", &dir.join("ec384.pem"));
    assert!(fs::read_to_string(file("ec-sec1.pem"))
        .unwrap()
        .contains("EC PRIVATE KEY"));
    assert!(fs::read_to_string(file("rsa-pkcs1.pem"))
        .unwrap()
        .contains("RSA PRIVATE KEY"));
    for (label, name, alg) in [
        ("web-ec", "ec.pem", KeyAlg::EcP256),
        ("web-ec-sec1", "ec-sec1.pem", KeyAlg::EcP256),
        ("web-rsa", "rsa.pem", KeyAlg::Rsa2048),
        ("web-rsa-pkcs1", "rsa-pkcs1.pem", KeyAlg::Rsa2048),
        ("web-ec384", "ec384.pem", KeyAlg::EcP384),
    ] {
        let pem = fs::read_to_string(file(name)).unwrap();
        let public = keys.import(label, &pem).unwrap();
        assert_eq!(public.alg, alg, "{label}");
        assert_eq!(
            spki_der(&public),
            openssl_spki(&dir.join(name)),
            "{label}: the token holds the file's key"
        );
    }
    keys.generate("api", KeyAlg::EcP256).unwrap();
    keys.generate("api-rsa", KeyAlg::Rsa2048).unwrap();

    // The token's own word: sensitive, not extractable, values unreadable.
    let list = keys.list().unwrap();
    let labels: Vec<&str> = list.iter().map(|k| k.label.as_str()).collect();
    assert_eq!(
        labels,
        [
            "api",
            "api-rsa",
            "web-ec",
            "web-ec-sec1",
            "web-ec384",
            "web-rsa",
            "web-rsa-pkcs1"
        ]
    );
    for k in &list {
        assert!(k.sensitive && !k.extractable, "{k:?}");
        assert_eq!(k.generated, k.label.starts_with("api"), "{k:?}");
    }
    let mut s = token.session().unwrap();
    for k in &list {
        for (attr, info) in s
            .probe_private_secrets(&format!("{PREFIX}{}", k.label))
            .unwrap()
        {
            assert!(
                matches!(info, cryptoki::object::AttributeInfo::Sensitive),
                "{}: {attr:?} is {info:?}",
                k.label
            );
        }
    }
    // opensc's pkcs11-tool sees the same.
    let (ok, text) = run(
        "pkcs11-tool",
        &[
            "--module",
            SOFTHSM2_MODULE,
            "--token-label",
            &t.config.label,
            "--login",
            "--pin",
            &t.pin,
            "--list-objects",
            "--type",
            "privkey",
        ],
    );
    assert!(ok, "{text}");
    for block in text.split("Private Key Object").skip(1) {
        if !block.contains(PREFIX) {
            continue;
        }
        let access = block
            .lines()
            .find(|l| l.trim_start().starts_with("Access:"))
            .unwrap_or_else(|| panic!("no Access line: {block}"));
        let items: Vec<&str> = access
            .split_once(':')
            .unwrap()
            .1
            .split(',')
            .map(str::trim)
            .collect();
        assert!(items.contains(&"sensitive"), "{access}");
        assert!(!items.contains(&"extractable"), "{access}");
    }
    // (pkcs11-tool has no way to ask for a private key's value; the
    // token's refusal of every secret component is checked above.)

    // A CSR signed on the token, which OpenSSL verifies, for its key.
    for label in ["web-rsa", "api"] {
        let names = vec!["www.example.test".to_string(), "example.test".to_string()];
        let csr = keys.csr(label, &names, Some("Example")).unwrap();
        let shown = verified_csr(&dir.join(format!("{label}.csr")), &csr);
        assert!(shown.contains("CN=www.example.test") || shown.contains("CN = www.example.test"));
        assert!(shown.contains("DNS:example.test"), "{shown}");
    }

    // Bad input: a clear error, nothing stored.
    let before = keys.list().unwrap().len();
    let pem = fs::read_to_string(file("ec.pem")).unwrap();
    for (label, text, want) in [
        ("web-ec", pem.as_str(), "already holds"),
        ("bad/label", pem.as_str(), "label"),
        ("x", "not a key", "not a PEM"),
    ] {
        let err = keys.import(label, text).unwrap_err().to_string();
        assert!(err.contains(want), "{label}: {err}");
    }
    // A file whose public half is another key's: refused after the check.
    let mixed = mix_public(&fs::read_to_string(file("ec-sec1.pem")).unwrap(), &dir);
    let err = keys.import("mixed", &mixed).unwrap_err().to_string();
    assert!(err.contains("do not belong together"), "{err}");
    assert_eq!(keys.list().unwrap().len(), before, "nothing kept");

    // Every step in the audit log.
    drop(sink);
    drop(signer);
    log.close().unwrap();
    let records = verified_records(&token, &path);
    let of = |kind: Kind, label: &str| {
        records
            .iter()
            .filter(|r| r.kind == kind && r.key == format!("{PREFIX}{label}"))
            .count()
    };
    assert_eq!(
        of(Kind::Import, "web-ec"),
        2,
        "the import and the refused one"
    );
    assert_eq!(of(Kind::Keygen, "api"), 1);
    assert_eq!(
        of(Kind::Sign, "web-rsa"),
        3,
        "the import check, the CSR's key check and the CSR"
    );
    assert_eq!(of(Kind::Import, "mixed"), 1);
    assert_eq!(
        of(Kind::Destroy, "mixed"),
        1,
        "the refused import undone, recorded"
    );
}

/// A SEC1 key file with its public key replaced by a fresh key's.
fn mix_public(sec1: &str, dir: &Path) -> String {
    let other = dir.join("other.pem");
    genpkey("EC", "ec_paramgen_curve:P-256", &other);
    let theirs = openssl_spki(&other);
    let point = &theirs[theirs.len() - 65..];
    let der = pem::parse(sec1).unwrap().contents().to_vec();
    // The public key is the last 65 bytes of the SEC1 structure.
    let mut mixed = der.clone();
    let at = mixed.len() - 65;
    mixed[at..].copy_from_slice(point);
    pem::encode(&pem::Pem::new("EC PRIVATE KEY", mixed))
}

/// What the outside probe broke, held: a label taken by any object is
/// refused before anything is made, racing makers leave one key at most,
/// a broken entry does not hide the others from `list`, a small RSA
/// exponent is refused, and CSR names are DNS names or IP addresses.
#[test]
fn labels_races_broken_entries_and_names() {
    use cryptoki::{
        mechanism::Mechanism,
        object::{Attribute, ObjectClass},
    };
    let Rig {
        token, log, signer, ..
    } = rig("srvkeys2");
    let sink = log.sink();
    let keys = manager(&token, &signer, &sink);
    let private_keys = |label: &str| {
        token
            .session()
            .unwrap()
            .raw()
            .find_objects(&[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::Label(format!("{PREFIX}{label}").into_bytes()),
            ])
            .unwrap()
            .len()
    };
    // A lone public key object holds the label: nothing is made.
    keys.generate("stale", KeyAlg::EcP256).unwrap();
    let s = token.session().unwrap();
    for h in s
        .raw()
        .find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Label(format!("{PREFIX}stale").into_bytes()),
        ])
        .unwrap()
    {
        s.raw().destroy_object(h).unwrap();
    }
    let err = keys
        .generate("stale", KeyAlg::EcP256)
        .unwrap_err()
        .to_string();
    assert!(err.contains("already holds a public key"), "{err}");
    assert_eq!(private_keys("stale"), 0);

    // Makers racing for one label: one key at most, never two.
    std::thread::scope(|sc| {
        for _ in 0..4 {
            sc.spawn(|| {
                let _ = keys.generate("race", KeyAlg::EcP256);
            });
        }
    });
    assert!(private_keys("race") <= 1);

    // A second private key under one label (made behind Loupe's back):
    // listed as broken, the others still listed.
    keys.generate("fine", KeyAlg::EcP256).unwrap();
    keys.generate("twice", KeyAlg::EcP256).unwrap();
    s.raw()
        .generate_key_pair(
            &Mechanism::EccKeyPairGen,
            &[
                Attribute::Token(true),
                Attribute::EcParams(vec![
                    0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07,
                ]),
                Attribute::Label(format!("{PREFIX}twice").into_bytes()),
            ],
            &[
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Label(format!("{PREFIX}twice").into_bytes()),
            ],
        )
        .unwrap();
    let list = keys.list().unwrap();
    let fine = list.iter().find(|k| k.label == "fine").unwrap();
    assert!(fine.problem.is_none() && fine.sensitive);
    let twice = list.iter().find(|k| k.label == "twice").unwrap();
    assert!(twice.problem.is_some(), "{twice:?}");

    // RSA with e = 3.
    let dir = sandbox().dir.join("files-srvkeys2");
    fs::create_dir_all(&dir).unwrap();
    let e3 = dir.join("e3.pem");
    openssl(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-pkeyopt",
        "rsa_keygen_pubexp:3",
        "-out",
        &e3.display().to_string(),
    ]);
    let err = keys
        .import("e3", &fs::read_to_string(&e3).unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("public exponent"), "{err}");

    // CSR names.
    for bad in [
        "",
        " ",
        "evil.com\nDNS:x",
        "evil.com,DNS:attacker.com",
        "a..b",
        ".example.com",
        "-x.example.com",
        "*",
        "*.com",
        "a.*.example.com",
        "f*o.example.com",
        "under_score.example.com",
    ] {
        let err = keys
            .csr("fine", &[bad.to_string()], None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a DNS name"), "{bad:?}: {err}");
    }
    let long = format!("{}.example.com", "a".repeat(64));
    assert!(keys.csr("fine", &[long], None).is_err());
    assert!(keys
        .csr("fine", &["a.test".into()], Some("Evil\nO=Fake"))
        .is_err());
    let many: Vec<String> = (0..101).map(|i| format!("n{i}.example.test")).collect();
    assert!(keys.csr("fine", &many, None).is_err());
    let csr = keys
        .csr(
            "fine",
            &[
                "*.example.test".into(),
                "192.0.2.1".into(),
                "2001:db8::1".into(),
            ],
            None,
        )
        .unwrap();
    let text = verified_csr(&dir.join("fine.csr"), &csr);
    assert!(text.contains("DNS:*.example.test"), "{text}");
    assert!(text.contains("IP Address:192.0.2.1"), "{text}");
    drop(sink);
    drop(signer);
    log.close().unwrap();
}
