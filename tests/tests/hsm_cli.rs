//! `loupe ca ...` and `loupe audit ...` as an operator runs them, against a
//! private SoftHSM2: the CA lifecycle, a trust-store export OpenSSL accepts
//! (the DER export is the token's certificate), audit verification and its
//! failure, named, on each kind of tampering (a cut tail or a log replaced
//! whole caught against the token's head; `reset-head` for a new log on
//! purpose), and the clear errors for a wrong PIN, a loose PIN file, a
//! missing token and a PIN on the command line.

use std::{fs, os::unix::fs::PermissionsExt, process::Output};

use loupe_hsm::audit::{self, Kind, Record};
use loupe_tests::softhsm::SoftHsm;
use sha2::{Digest, Sha256};

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

/// `loupe audit verify` found the log broken: exit status 1, and why.
fn broken(out: &Output) -> String {
    assert_eq!(
        out.status.code(),
        Some(1),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn sha256_hex(bytes: &[u8]) -> String {
    audit::hex(&Sha256::digest(bytes))
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
    let export = |args: &[&str], out: &std::path::Path| {
        let out = ["--out", out.to_str().unwrap()];
        ok(&hsm.loupe(&[&["ca", "export"], args, &out].concat()))
    };
    let der = hsm.dir.join("untrust.der");
    export(&["--der", "--rsa", "--ca", "forward-untrust"], &der);
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
    // It is the very certificate the token holds under that CA's label...
    let list: serde_json::Value =
        serde_json::from_str(&ok(&hsm.loupe(&["ca", "list", "--json"]))).unwrap();
    let on_token = list
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["label"] == "loupe-ca/forward-untrust-rsa/g1")
        .unwrap_or_else(|| panic!("{list}"));
    assert_eq!(
        sha256_hex(&fs::read(&der).unwrap()),
        on_token["fingerprint"].as_str().unwrap(),
        "the DER export is not the token's certificate"
    );
    // ... and the one the PEM export of that CA carries.
    let untrust_pem = hsm.dir.join("untrust.pem");
    export(&["--ca", "forward-untrust"], &untrust_pem);
    let der_as_pem = ok(&std::process::Command::new("openssl")
        .args(["x509", "-inform", "DER", "-outform", "PEM", "-in"])
        .arg(&der)
        .output()
        .unwrap());
    let bundle = fs::read_to_string(&untrust_pem).unwrap().replace('\r', "");
    assert!(
        der_as_pem.starts_with("-----BEGIN CERTIFICATE-----") && bundle.contains(der_as_pem.trim()),
        "the DER export is not in the PEM export:\n{der_as_pem}\n{bundle}"
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
    let err = broken(&out);
    assert!(
        err.contains("BROKEN at line") && err.contains("was altered"),
        "{err}"
    );
    // The record's number is printed as a number.
    let line = err
        .split("BROKEN at line ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .unwrap();
    assert!(err.contains(&format!("(record seq {line}):")), "{err}");
}

fn records(lines: &[String]) -> Vec<Record> {
    lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The records as a whole chain again, numbered from 1: what a forger who
/// can write the file (but not sign) makes of it.
fn rechain(records: Vec<Record>) -> String {
    let (mut prev, mut out) = (audit::GENESIS.to_string(), Vec::new());
    for (i, mut r) in records.into_iter().enumerate() {
        prev = r.link(i as u64 + 1, prev, &mut out);
    }
    String::from_utf8(out).unwrap()
}

fn joined(lines: &[String]) -> String {
    lines.iter().map(|l| format!("{l}\n")).collect()
}

/// Each way of hiding a key use by writing the file is caught and named,
/// with exit status 1: a cut at the end (checkpoints included) against the
/// token's head, the rest from the file alone. `--pubkey` alone verifies
/// what the file holds and says the head was not checked.
#[test]
fn audit_verify_names_each_tampering_and_checks_the_tokens_head() {
    let hsm = SoftHsm::new("loupe").unwrap();
    ok(&hsm.loupe(&["ca", "init"]));
    ok(&hsm.loupe(&["ca", "rotate"]));
    let key = hsm.dir.join("audit.pem");
    let key = key.to_str().unwrap();
    ok(&hsm.loupe(&["audit", "export-key", "--out", key]));
    let log = hsm.audit_log.to_str().unwrap();
    let text = fs::read_to_string(log).unwrap();
    let lines: Vec<String> = text.lines().map(str::to_string).collect();
    let recs = records(&lines);
    let last = recs.len() as u64;
    let checkpoints: Vec<u64> = recs
        .iter()
        .filter(|r| r.kind == Kind::Checkpoint)
        .map(|r| r.seq)
        .collect();
    // One sealed run of the CLI each: `ca init` and `ca rotate`.
    assert_eq!(checkpoints.len(), 2, "{text}");
    assert_eq!(checkpoints[1], last);
    let first = checkpoints[0];
    let pubkey = ["--pubkey", key];
    let verify = |name: &str, body: &str, args: &[&str]| {
        let p = hsm.dir.join(name);
        fs::write(&p, body).unwrap();
        let mut a = vec!["audit", "verify", p.to_str().unwrap()];
        a.extend(args);
        hsm.loupe(&a)
    };
    let both: [&[&str]; 2] = [&[], &pubkey];

    // The whole log: the token's head is checked; with --pubkey it is not.
    let out = ok(&hsm.loupe(&["audit", "verify", log]));
    assert!(
        out.contains(": OK:") && out.contains(&format!("holds this log's head at seq {last}")),
        "{out}"
    );
    let out = ok(&hsm.loupe(&["audit", "verify", log, "--pubkey", key]));
    assert!(
        out.contains(": OK:") && out.contains("head: not checked against the token"),
        "{out}"
    );

    // A consistent rewrite: `ca rotate`'s records and checkpoint dropped.
    // The file alone is a whole sealed log; the token's head shows the cut.
    let cut = joined(&lines[..first as usize]);
    let out = ok(&verify("cut.jsonl", &cut, &pubkey));
    assert!(
        out.contains(&format!("sealed through seq {first}")) && out.contains("head: not checked"),
        "{out}"
    );
    let err = broken(&verify("cut.jsonl", &cut, &[]));
    assert!(
        err.contains(&format!(
            "the log ends at seq {first} but the token's head is seq {last}: the log was truncated"
        )),
        "{err}"
    );

    // The last checkpoint deleted.
    let no_checkpoint = joined(&lines[..lines.len() - 1]);
    let err = broken(&verify("cut-checkpoint.jsonl", &no_checkpoint, &pubkey));
    assert!(
        err.contains(&format!(
            "after the last signed checkpoint (seq {first}) are unsealed"
        )) && err.contains("pass --allow-open-tail"),
        "{err}"
    );
    let err = broken(&verify("cut-checkpoint.jsonl", &no_checkpoint, &[]));
    assert!(
        err.contains(&format!("the log ends at seq {} but", last - 1)),
        "{err}"
    );

    // A forged record appended with a correct back-link.
    let mut forged = recs[recs.len() - 2].clone();
    forged.purpose = "forged".into();
    let mut tail = Vec::new();
    forged.link(
        last + 1,
        sha256_hex(lines[lines.len() - 1].as_bytes()),
        &mut tail,
    );
    let body = text.clone() + std::str::from_utf8(&tail).unwrap();
    for args in both {
        let err = broken(&verify("forged.jsonl", &body, args));
        assert!(
            err.contains(&format!(
                "1 record after the last signed checkpoint (seq {last}) is unsealed"
            )) && err.contains("pass --allow-open-tail"),
            "{err}"
        );
    }
    // A live log's open tail is accepted on request, and counted.
    let out = ok(&verify("forged.jsonl", &body, &["--allow-open-tail"]));
    assert!(
        out.contains(&format!(
            "open tail: 1 unsealed record after the last signed checkpoint (seq {last})"
        )) && out.contains(&format!("holds this log's head at seq {last}")),
        "{out}"
    );

    // Rewritten with record 2 removed, re-chained, signatures dropped.
    let mut stripped = recs.clone();
    stripped.remove(1);
    for r in &mut stripped {
        r.sig = None;
    }
    let body = rechain(stripped);
    let err = broken(&verify("stripped.jsonl", &body, &pubkey));
    assert!(
        err.contains(&format!("checkpoint at seq {} has no signature", first - 1)),
        "{err}"
    );
    let err = broken(&verify("stripped.jsonl", &body, &[]));
    assert!(err.contains("the log was truncated"), "{err}");

    // No checkpoint at all.
    let bare: Vec<Record> = recs
        .into_iter()
        .filter(|r| r.kind != Kind::Checkpoint)
        .collect();
    let n = bare.len();
    let err = broken(&verify("bare.jsonl", &rechain(bare), &pubkey));
    assert!(
        err.contains(&format!(
            "no signed checkpoint: all {n} records are unsealed"
        )),
        "{err}"
    );

    // An empty file and /dev/null are no log.
    for args in both {
        let err = broken(&verify("empty.jsonl", "", args));
        assert!(err.contains("no records"), "{err}");
        let mut a = vec!["audit", "verify", "/dev/null"];
        a.extend(args);
        let err = broken(&hsm.loupe(&a));
        assert!(err.contains("not a regular file (a device)"), "{err}");
    }
}

/// The log replaced whole by a fresh, never-sealed one: caught against the
/// token's head for the log at that path, even with --allow-open-tail, until
/// the operator records the new log with `loupe audit reset-head`; the old
/// log, moved away, still verifies.
#[test]
fn a_replaced_log_fails_until_reset_head_records_it() {
    let hsm = SoftHsm::new("loupe").unwrap();
    ok(&hsm.loupe(&["ca", "init"]));
    let log = hsm.audit_log.to_str().unwrap();
    let text = fs::read_to_string(log).unwrap();
    let lines: Vec<String> = text.lines().map(str::to_string).collect();
    let old_id = sha256_hex(lines[0].as_bytes());
    let old_seq = lines.len();
    let moved = hsm.dir.join("audit.jsonl.1");
    fs::rename(log, &moved).unwrap();
    let mut fresh = records(&lines[..2]);
    for r in &mut fresh {
        r.purpose = "not it".into();
    }
    fs::write(log, rechain(fresh)).unwrap();
    let verify = |args: &[&str]| hsm.loupe(&[&["audit", "verify", log], args].concat());
    let canonical = fs::canonicalize(log).unwrap();
    let err = broken(&verify(&["--allow-open-tail"]));
    assert!(
        err.contains(&format!(
            "the log at {} was replaced: the token's head names another log (first record \
             sha256 {old_id}, seq {old_seq})",
            canonical.display()
        )) && err.contains("loupe audit reset-head"),
        "{err}"
    );
    let err = fails(&hsm.loupe(&["audit", "reset-head", "--reason", " "]));
    assert!(err.contains("--reason must say why"), "{err}");
    // A log whose own records do not hold is never recorded as the new
    // one, and is left as it was.
    let good = fs::read_to_string(log).unwrap();
    let altered = good.replacen("not it", "not It", 1);
    fs::write(log, &altered).unwrap();
    let err = fails(&hsm.loupe(&["audit", "reset-head", "--reason", "tampered"]));
    assert!(err.contains("does not verify"), "{err}");
    assert_eq!(fs::read_to_string(log).unwrap(), altered);
    fs::write(log, good).unwrap();
    let out = ok(&hsm.loupe(&[
        "audit",
        "reset-head",
        "--reason",
        "rotated to audit.jsonl.1",
    ]));
    assert!(
        out.contains(&format!("supersedes log {old_id} (head seq {old_seq})")),
        "{out}"
    );
    let out = ok(&verify(&[]));
    assert!(
        out.contains(": OK:")
            && out.contains(&format!(
                "took the place at this path of log {old_id} (head seq {old_seq})"
            )),
        "{out}"
    );
    let recs = records(
        &fs::read_to_string(log)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect::<Vec<_>>(),
    );
    assert!(
        recs.iter().any(|r| r.kind == Kind::Supersede
            && r.purpose.ends_with(": rotated to audit.jsonl.1")
            && r.requester.starts_with("loupe-cli uid=")),
        "{recs:?}"
    );
    let out = ok(&hsm.loupe(&["audit", "verify", moved.to_str().unwrap()]));
    assert!(
        out.contains(&format!("holds this log's head at seq {old_seq}")),
        "{out}"
    );
    let out = ok(&hsm.loupe(&["audit", "reset-head", "--reason", "again"]));
    assert!(out.contains("nothing to supersede"), "{out}");
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

/// `loupe key ...` as an operator runs it: an existing key imported (and
/// the operator told to destroy the file), one generated, both listed as
/// the token reports them, a CSR OpenSSL verifies, clear errors for a
/// key file that is not one and a label in use.
#[test]
fn server_keys_from_the_command_line() {
    let hsm = SoftHsm::new("loupe").unwrap();
    let key = hsm.dir.join("site.pem");
    ok(&std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
        ])
        .arg("-out")
        .arg(&key)
        .output()
        .unwrap());
    let k = key.to_str().unwrap();
    let said = ok(&hsm.loupe(&["key", "import", "--label", "site", k]));
    assert!(said.contains("sensitive, not extractable"), "{said}");
    assert!(said.contains("destroy"), "{said}");
    ok(&hsm.loupe(&["key", "generate", "--label", "api", "--type", "ec-p384"]));
    let list = ok(&hsm.loupe(&["key", "list"]));
    let row = |label: &str| {
        list.lines()
            .find(|l| l.starts_with(label))
            .unwrap_or_else(|| panic!("{label} in {list}"))
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    assert_eq!(
        row("site")[..5],
        ["site", "rsa-2048", "yes", "no", "imported"]
    );
    assert_eq!(
        row("api")[..5],
        ["api", "ec-p384", "yes", "no", "generated"]
    );
    let csr = hsm.dir.join("site.csr");
    ok(&hsm.loupe(&[
        "key",
        "csr",
        "--label",
        "site",
        "--name",
        "www.site.test",
        "--out",
        csr.to_str().unwrap(),
    ]));
    let text = ok(&std::process::Command::new("openssl")
        .args(["req", "-verify", "-noout", "-text", "-in"])
        .arg(&csr)
        .output()
        .unwrap());
    assert!(text.contains("DNS:www.site.test"), "{text}");
    // Its public key is the imported file's.
    let pubs = |args: &[&str]| {
        ok(&std::process::Command::new("openssl")
            .args(args)
            .output()
            .unwrap())
    };
    assert_eq!(
        pubs(&["req", "-in", csr.to_str().unwrap(), "-pubkey", "-noout"]),
        pubs(&["pkey", "-in", k, "-pubout"])
    );
    let bad = hsm.dir.join("bad.pem");
    fs::write(
        &bad,
        "-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let err = fails(&hsm.loupe(&["key", "import", "--label", "x", bad.to_str().unwrap()]));
    assert!(err.contains("not a private key"), "{err}");
    let err = fails(&hsm.loupe(&["key", "import", "--label", "site", k]));
    assert!(err.contains("already holds"), "{err}");
    let audit = fs::read_to_string(&hsm.audit_log).unwrap();
    assert!(audit.contains("\"import\"") && audit.contains("loupe-server/site"));

    // A file with two keys: which was meant? Refused.
    let two = hsm.dir.join("two.pem");
    let text = fs::read_to_string(&key).unwrap();
    fs::write(&two, format!("{text}{text}")).unwrap();
    let err = fails(&hsm.loupe(&["key", "import", "--label", "two", two.to_str().unwrap()]));
    assert!(err.contains("more than one private key"), "{err}");
    // A FIFO is refused at once, not waited on.
    let fifo = hsm.dir.join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo(3) with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let err = fails(&hsm.loupe(&["key", "import", "--label", "f", fifo.to_str().unwrap()]));
    assert!(err.contains("not a regular file"), "{err}");
    // A key the audit log cannot record is not kept.
    let err = fails(&hsm.loupe(&[
        "key",
        "--audit-log",
        "/dev/full",
        "generate",
        "--label",
        "unrecorded",
    ]));
    assert!(err.contains("destroyed again"), "{err}");
    let list = ok(&hsm.loupe(&["key", "list"]));
    assert!(!list.contains("unrecorded"), "{list}");
    // A CSR for a path that cannot be written signs nothing.
    let before = fs::read_to_string(&hsm.audit_log).unwrap().lines().count();
    let nowhere = hsm.dir.join("no-such-dir/x.csr");
    let err = fails(&hsm.loupe(&[
        "key",
        "csr",
        "--label",
        "site",
        "--name",
        "a.test",
        "--out",
        nowhere.to_str().unwrap(),
    ]));
    assert!(err.contains("no such directory"), "{err}");
    assert_eq!(
        fs::read_to_string(&hsm.audit_log).unwrap().lines().count(),
        before
    );
}
