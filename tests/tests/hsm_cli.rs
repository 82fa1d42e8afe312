//! `loupe ca ...` and `loupe audit ...` as an operator runs them, against a
//! private SoftHSM2: the CA lifecycle, a trust-store export OpenSSL accepts,
//! audit verification (and its failure on a tampered log), and the clear
//! errors for a wrong PIN, a loose PIN file, a missing token and a PIN on
//! the command line.

use std::{fs, os::unix::fs::PermissionsExt, process::Output};

use loupe_tests::softhsm::SoftHsm;

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fails(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "unexpected success: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn ca_lifecycle_and_audit_verify_from_the_command_line() {
    let hsm = SoftHsm::new("loupe").unwrap();
    let init = ok(&hsm.loupe(&["ca", "init"]));
    assert!(
        init.contains("loupe-ca/forward-trust/g1") && init.contains("loupe-ca/forward-untrust/g1"),
        "{init}"
    );
    assert!(fails(&hsm.loupe(&["ca", "init"])).contains("use `loupe ca rotate`"));

    let pem = hsm.dir.join("trust.pem");
    ok(&hsm.loupe(&["ca", "export", "--out", pem.to_str().unwrap()]));
    let verify = std::process::Command::new("openssl")
        .args(["verify", "-CAfile"])
        .args([&pem, &pem])
        .output()
        .unwrap();
    assert!(ok(&verify).contains(": OK"));
    // The bundle holds the EC CA and its RSA companion, for clients that
    // verify only RSA signatures.
    let bundle = std::fs::read_to_string(&pem).unwrap();
    assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 2, "{bundle}");
    let der = hsm.dir.join("untrust.der");
    ok(&hsm.loupe(&[
        "ca",
        "export",
        "--der",
        "--rsa",
        "--ca",
        "forward-untrust",
        "--out",
        der.to_str().unwrap(),
    ]));
    let text = ok(&std::process::Command::new("openssl")
        .args([
            "x509", "-inform", "DER", "-noout", "-subject", "-text", "-in",
        ])
        .arg(&der)
        .output()
        .unwrap());
    assert!(
        text.contains("CN = Loupe Forward Untrust CA g1 RSA")
            && text.contains("Public-Key: (2048 bit)"),
        "{text}"
    );

    ok(&hsm.loupe(&["ca", "rotate", "--algorithm", "ec-p384"]));
    let list = ok(&hsm.loupe(&["ca", "list", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    let active: Vec<_> = v
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["active"] == true)
        .map(|c| c["generation"].as_u64().unwrap())
        .collect();
    assert_eq!(active, [2, 2, 2, 2], "{list}");
    assert!(fails(&hsm.loupe(&["ca", "destroy", "--generation", "2"])).contains("active CA"));
    assert!(ok(&hsm.loupe(&["ca", "destroy", "--generation", "1"])).contains("12 objects"));

    // The audit log verifies, against the token and against an exported key.
    let log = hsm.audit_log.to_str().unwrap().to_string();
    let report = ok(&hsm.loupe(&["audit", "verify", &log]));
    assert!(
        report.contains(": OK:") && report.contains("sealed through"),
        "{report}"
    );
    let key = hsm.dir.join("audit.pem");
    ok(&hsm.loupe(&["audit", "export-key", "--out", key.to_str().unwrap()]));
    ok(&hsm.loupe(&["audit", "verify", &log, "--pubkey", key.to_str().unwrap()]));

    // A tampered copy is caught, with the line, and exit status 1.
    let text = fs::read_to_string(&hsm.audit_log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() > 10, "{text}");
    let tampered = hsm.dir.join("tampered.jsonl");
    fs::write(
        &tampered,
        text.replacen("forward-untrust CA key", "forward-untrust CA kez", 1),
    )
    .unwrap();
    let out = hsm.loupe(&[
        "audit",
        "verify",
        tampered.to_str().unwrap(),
        "--pubkey",
        key.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("BROKEN at line") && err.contains("was altered"),
        "{err}"
    );
}

#[test]
fn operator_errors_are_clear_and_the_pin_is_never_an_argument() {
    let hsm = SoftHsm::new("loupe").unwrap();
    hsm.set_pin_file("wrong-pin").unwrap();
    assert!(fails(&hsm.loupe(&["ca", "list"])).contains("wrong PIN for token \"loupe\""));

    hsm.set_pin_file("user-pin-0000").unwrap();
    fs::set_permissions(&hsm.pin_file, fs::Permissions::from_mode(0o644)).unwrap();
    let err = fails(&hsm.loupe(&["ca", "list"]));
    assert!(
        err.contains("mode 0644") && err.contains("chmod 600"),
        "{err}"
    );
    fs::set_permissions(&hsm.pin_file, fs::Permissions::from_mode(0o600)).unwrap();

    let err = fails(&hsm.loupe(&["ca", "--token", "elsewhere", "list"]));
    assert!(
        err.contains("no token labelled \"elsewhere\"") && err.contains("\"loupe\""),
        "{err}"
    );

    let err = fails(&hsm.loupe(&["ca", "--pin", "user-pin-0000", "list"]));
    assert!(err.contains("unexpected argument '--pin'"), "{err}");

    let err = fails(&hsm.loupe(&["ca", "--module", "/nonexistent.so", "list"]));
    assert!(
        err.contains("cannot load the PKCS#11 module /nonexistent.so"),
        "{err}"
    );

    // The PIN from an environment variable works too.
    let out = hsm
        .command(loupe_tests::workspace_bin("loupe"))
        .env_remove("LOUPE_HSM_PIN_FILE")
        .env("LOUPE_HSM_PIN", "user-pin-0000")
        .args(["ca", "list"])
        .output()
        .unwrap();
    ok(&out);
}
