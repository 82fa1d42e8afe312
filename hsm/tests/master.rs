//! The master key on a real token: made once (SENSITIVE, not EXTRACTABLE,
//! its value unreadable as pkcs11-tool reports too), sealing and opening
//! secrets with AES-GCM on the token; a blob changed by one bit, opened
//! for another use or after the key is gone does not open; every step is
//! in the audit log.

mod common;

use std::process::Command;

use common::{rig, sandbox, verified_records, Rig};
use cryptoki::object::{Attribute, AttributeType, ObjectClass};
use loupe_hsm::{
    audit::Kind,
    master::{MasterKey, MASTER_LABEL},
    token::SOFTHSM2_MODULE,
};

#[test]
fn the_master_key_seals_and_opens_only_what_it_sealed_for_that_use() {
    let Rig {
        t,
        token,
        path,
        log,
        signer,
    } = rig("master");
    let sink = log.sink();
    let mk = MasterKey {
        token: &token,
        audit: &sink,
        requester: "master-test".into(),
    };
    assert!(mk.ensure().unwrap(), "made");
    assert!(!mk.ensure().unwrap(), "made once");

    let secret = b"ticket keys: 32 bytes of secret!";
    let blob = mk.seal("tls ticket keys", secret).unwrap();
    assert!(!blob.windows(secret.len()).any(|w| w == secret));
    assert_eq!(mk.open("tls ticket keys", &blob).unwrap(), secret);
    // Sealed twice, two different blobs (a fresh IV each time).
    assert_ne!(mk.seal("tls ticket keys", secret).unwrap(), blob);
    // Another use, a changed bit, a cut: refused.
    let e = mk.open("key log", &blob).unwrap_err().to_string();
    assert!(e.contains("does not authenticate"), "{e}");
    for i in [0, 12, blob.len() - 1] {
        let mut bad = blob.clone();
        bad[i] ^= 1;
        assert!(mk.open("tls ticket keys", &bad).is_err(), "byte {i}");
    }
    assert!(mk.open("tls ticket keys", &blob[..20]).is_err());

    // The key: sensitive, not extractable, its value never given out.
    let s = token.session().unwrap();
    let raw = s.raw();
    let found = raw
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(MASTER_LABEL.as_bytes().to_vec()),
        ])
        .unwrap();
    assert_eq!(found.len(), 1);
    let attrs = raw
        .get_attributes(
            found[0],
            &[
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::Value,
            ],
        )
        .unwrap();
    assert!(attrs.contains(&Attribute::Sensitive(true)), "{attrs:?}");
    assert!(attrs.contains(&Attribute::Extractable(false)), "{attrs:?}");
    assert!(
        !attrs.iter().any(|a| matches!(a, Attribute::Value(_))),
        "{attrs:?}"
    );
    let out = Command::new("pkcs11-tool")
        .args([
            "--module",
            SOFTHSM2_MODULE,
            "--token-label",
            &t.config.label,
        ])
        .args([
            "--login",
            "--pin",
            &t.pin,
            "--list-objects",
            "--type",
            "secrkey",
        ])
        .env("SOFTHSM2_CONF", sandbox().conf())
        .output()
        .expect("pkcs11-tool (installed by scripts/setup)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(MASTER_LABEL), "{text}");
    let access = text
        .lines()
        .find(|l| l.trim_start().starts_with("Access:"))
        .unwrap_or("");
    let items: Vec<&str> = access
        .trim_start()
        .trim_start_matches("Access:")
        .split(',')
        .map(str::trim)
        .collect();
    assert!(items.contains(&"sensitive"), "{text}");
    assert!(items.contains(&"never extractable"), "{text}");
    assert!(!items.contains(&"extractable"), "{text}");
    drop(s);

    // Without the key, nothing opens.
    token
        .session()
        .unwrap()
        .destroy_secret_key(MASTER_LABEL)
        .unwrap();
    let e = mk.open("tls ticket keys", &blob).unwrap_err().to_string();
    assert!(e.contains("no master key"), "{e}");

    drop(sink);
    drop(signer);
    log.close().unwrap();
    let records = verified_records(&token, &path);
    let kinds: Vec<Kind> = records
        .iter()
        .filter(|r| r.key == MASTER_LABEL)
        .map(|r| r.kind)
        .collect();
    assert_eq!(kinds.iter().filter(|k| **k == Kind::Keygen).count(), 1);
    assert_eq!(kinds.iter().filter(|k| **k == Kind::Wrap).count(), 2);
    // Opens that reached the key: one good, one for another use, two
    // changed (IV, tag), one without the key; the failed ones recorded as
    // failed. (A changed header and a cut blob are refused before the
    // token is asked: no key use.)
    let unwraps: Vec<_> = records.iter().filter(|r| r.kind == Kind::Unwrap).collect();
    assert_eq!(unwraps.len(), 5, "{unwraps:?}");
    assert_eq!(unwraps.iter().filter(|r| r.result == "ok").count(), 1);
}
