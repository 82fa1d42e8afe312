//! CA private keys cannot leave the token: the attributes the token reports
//! for generated keys, the token's answer to a read of CKA_VALUE, and a scan
//! of this crate's source for every place a value attribute is read.

mod common;

use common::TestToken;
use cryptoki::object::AttributeInfo;
use loupe_hsm::token::{KeyAlg, Token};

#[test]
fn generated_keys_are_sensitive_never_extractable_and_sign_only() {
    let t = TestToken::new("keys");
    let token = Token::open(&t.config).unwrap();
    let mut s = token.session().unwrap();
    for (label, alg) in [
        ("ec", KeyAlg::EcP256),
        ("ec384", KeyAlg::EcP384),
        ("rsa", KeyAlg::Rsa2048),
    ] {
        s.generate_key_pair(label, alg).unwrap();
        let flags = s.private_key_flags(label).unwrap();
        let get = |name: &str| {
            flags
                .iter()
                .find(|(n, _)| *n == name)
                .unwrap_or_else(|| panic!("{label}: token did not report {name}: {flags:?}"))
                .1
        };
        for must in [
            "token",
            "private",
            "sensitive",
            "always-sensitive",
            "never-extractable",
            "sign",
        ] {
            assert!(get(must), "{label}: {must} must be true ({flags:?})");
        }
        for must_not in ["extractable", "decrypt", "unwrap", "derive"] {
            assert!(
                !get(must_not),
                "{label}: {must_not} must be false ({flags:?})"
            );
        }
        // C_GetAttributeValue on every secret component is refused as
        // sensitive.
        let probes = s.probe_private_secrets(label).unwrap();
        assert!(!probes.is_empty());
        for (attr, info) in probes {
            assert!(
                matches!(info, AttributeInfo::Sensitive),
                "{label}: {attr:?} is {info:?}"
            );
        }
    }
    // A second key under a label in use is refused, not duplicated.
    let err = s.generate_key_pair("ec", KeyAlg::EcP256).unwrap_err();
    assert!(err.to_string().contains("already holds"), "{err}");
}

/// The only mentions of secret-bearing attributes in the crate are the
/// certificate and data-object reads (whose searches are restricted to
/// CKO_CERTIFICATE and CKO_DATA) and the size-only probe above; private
/// keys are used by handle everywhere else.
#[test]
fn no_code_path_reads_private_key_values() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut readers = Vec::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let mut current_fn = String::new();
        for line in text.lines() {
            let l = line.trim_start();
            if let Some(rest) = l.strip_prefix("pub fn ").or_else(|| l.strip_prefix("fn ")) {
                current_fn = rest.split('(').next().unwrap_or("").to_string();
            }
            let secret = [
                "AttributeType::Value",
                "AttributeType::PrivateExponent",
                "AttributeType::Prime",
                "AttributeType::Exponent1",
                "AttributeType::Exponent2",
                "AttributeType::Coefficient",
            ];
            if secret.iter().any(|a| line.contains(a)) {
                readers.push(format!(
                    "{}::{current_fn}",
                    path.file_stem().unwrap().to_string_lossy()
                ));
            }
        }
    }
    readers.sort();
    readers.dedup();
    assert_eq!(
        readers,
        [
            "token::certificate",
            "token::data_objects",
            "token::probe_private_secrets"
        ]
    );
    let token_rs = std::fs::read_to_string(src.join("token.rs")).unwrap();
    let body = |name: &str| {
        token_rs
            .split(&format!("fn {name}("))
            .nth(1)
            .and_then(|s| s.split("\n    }\n").next())
            .unwrap()
            .to_string()
    };
    assert!(
        body("certificate").contains("ObjectClass::CERTIFICATE"),
        "certificate() must search certificates only"
    );
    assert!(
        body("data_objects").contains("self.find_data(")
            && body("find_data").contains("ObjectClass::DATA"),
        "data_objects() must search data objects only"
    );
}
