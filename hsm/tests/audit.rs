//! The audit log: chain and checkpoint signatures verify, and every kind of
//! tampering (edit, delete, reorder, a consistent rewrite, a cut tail, the
//! wrong key) is caught at the first broken record. Several writers share one
//! chain, a restart continues it, and checkpoints come by count and by time.

mod common;

use std::{fs, path::Path, time::Duration};

use common::{audit_path, wait_until, TestToken};
use loupe_hsm::{
    audit::{self, hex, AuditConfig, AuditLog, Entry, Kind, Record},
    ca::ensure_audit_key,
    token::{PublicKey, Token},
};
use sha2::{Digest, Sha256};

fn entry(i: usize) -> Entry {
    Entry::now(Kind::Sign, "tok", "key", &format!("mint leaf {i}"), "test")
}

fn setup(name: &str) -> (Token, PublicKey) {
    let t = TestToken::new(name);
    let token = Token::open(&t.config).unwrap();
    ensure_audit_key(&token).unwrap();
    let public = audit::public_key(&token).unwrap();
    (token, public)
}

/// A log of 35 records sealed every 10, plus the shutdown checkpoint.
fn sealed_log(name: &str, token: &Token) -> std::path::PathBuf {
    let path = audit_path(name);
    let mut c = AuditConfig::new(&path, Some(token.clone()));
    c.checkpoint_every = 10;
    let log = AuditLog::open(c).unwrap();
    let sink = log.sink();
    for chunk in (0..35).collect::<Vec<_>>().chunks(7) {
        sink.record(chunk.iter().map(|&i| entry(i)).collect())
            .unwrap();
    }
    drop(sink);
    log.close().unwrap();
    path
}

fn lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    fs::write(
        path,
        lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
}

#[test]
fn a_sealed_log_verifies() {
    let (token, public) = setup("audit-ok");
    let path = sealed_log("ok", &token);
    let report = audit::verify(&path, &[public]).unwrap();
    assert_eq!(report.records, 39, "{report:?}");
    assert_eq!(report.checkpoints, 4);
    assert_eq!(report.unsealed, 0);
    assert_eq!(report.sealed_through, Some(39));
    assert!(report.unsigned_checkpoints.is_empty());
    let last: Record = serde_json::from_str(lines(&path).last().unwrap()).unwrap();
    assert_eq!(last.kind, Kind::Checkpoint);
    assert_eq!(last.purpose, "checkpoint (shutdown)");
}

#[test]
fn every_kind_of_tampering_is_caught_at_the_first_broken_record() {
    let (token, public) = setup("audit-tamper");
    let path = sealed_log("tamper", &token);
    let orig = lines(&path);
    let keys = [public.clone()];
    let check = |name: &str, tampered: Vec<String>, line: u64, needle: &str| {
        let p = path.with_extension(name);
        write_lines(&p, &tampered);
        let err = audit::verify(&p, &keys).expect_err(name);
        assert_eq!(err.line, line, "{name}: {err}");
        assert!(err.reason.contains(needle), "{name}: {err}");
        fs::remove_file(&p).unwrap();
    };

    // Edit record 5: record 6's back-link no longer matches.
    let mut edited = orig.clone();
    edited[4] = edited[4].replace("mint leaf 4", "mint leaf 9");
    assert_ne!(edited[4], orig[4]);
    check("edit", edited, 6, "record 5 was altered");

    // Delete record 5: a gap in the sequence at line 5.
    let mut deleted = orig.clone();
    deleted.remove(4);
    check("delete", deleted, 5, "6 where 5 was expected");

    // Swap records 7 and 8.
    let mut swapped = orig.clone();
    swapped.swap(6, 7);
    check("reorder", swapped, 7, "8 where 7 was expected");

    // Edit record 5 and recompute every hash after it: the chain is whole
    // again, but the next checkpoint's signature no longer matches.
    let mut rewritten = Vec::new();
    let mut prev = "0".repeat(64);
    for (i, l) in orig.iter().enumerate() {
        let mut r: Record = serde_json::from_str(l).unwrap();
        if i == 4 {
            r.purpose = "mint leaf 9".into();
        }
        r.prev = prev.clone();
        if r.head.is_some() {
            r.head = Some(prev.clone());
        }
        let line = serde_json::to_string(&r).unwrap();
        prev = hex(&Sha256::digest(line.as_bytes()));
        rewritten.push(line);
    }
    check("rewrite", rewritten, 11, "signature does not verify");

    // Move the last checkpoint in time.
    let mut retimed = orig.clone();
    let mut r: Record = serde_json::from_str(retimed.last().unwrap()).unwrap();
    r.time = "2000-01-01T00:00:00.000Z".into();
    *retimed.last_mut().unwrap() = serde_json::to_string(&r).unwrap();
    check("retime", retimed, 39, "signature does not verify");

    // Cut the last record short.
    let p = path.with_extension("cut");
    let mut text = fs::read_to_string(&path).unwrap();
    text.truncate(text.len() - 10);
    fs::write(&p, text).unwrap();
    let err = audit::verify(&p, &keys).unwrap_err();
    assert!(err.line == 39 && err.reason.contains("cut short"), "{err}");
    // ... and a writer refuses to append to it.
    let open = AuditLog::open(AuditConfig::new(&p, None));
    assert!(open.err().unwrap().to_string().contains("cut short"));
    fs::remove_file(&p).unwrap();

    // Another key (an attacker's) does not verify the real checkpoints.
    let other = setup("audit-other").1;
    let err = audit::verify(&path, &[other]).unwrap_err();
    assert!(err.line == 11 && err.reason.contains("signature"), "{err}");
    let err = audit::verify(&path, &[]).unwrap_err();
    assert!(err.reason.contains("no audit public key"), "{err}");
}

#[test]
fn writers_in_parallel_keep_one_chain_and_restarts_continue_it() {
    let (token, public) = setup("audit-share");
    let path = audit_path("share");
    let open = || {
        let mut c = AuditConfig::new(&path, Some(token.clone()));
        c.checkpoint_every = 25;
        AuditLog::open(c).unwrap()
    };
    let (a, b) = (open(), open());
    std::thread::scope(|s| {
        for log in [&a, &b] {
            let sink = log.sink();
            s.spawn(move || {
                for i in 0..50 {
                    sink.record(vec![entry(i), entry(i + 1000)]).unwrap();
                }
            });
        }
    });
    a.close().unwrap();
    b.close().unwrap();
    let first = audit::verify(&path, std::slice::from_ref(&public)).unwrap();
    assert_eq!(first.records - first.checkpoints, 200, "{first:?}");
    assert_eq!(first.unsealed, 0);

    let c = open();
    c.sink().record(vec![entry(7)]).unwrap();
    c.close().unwrap();
    let second = audit::verify(&path, &[public]).unwrap();
    assert_eq!(second.records, first.records + 2, "{second:?}");
}

#[test]
fn a_quiet_log_is_sealed_by_time() {
    let (token, public) = setup("audit-interval");
    let path = audit_path("interval");
    let mut c = AuditConfig::new(&path, Some(token));
    c.checkpoint_interval = Duration::from_millis(200);
    let log = AuditLog::open(c).unwrap();
    log.sink().record(vec![entry(1)]).unwrap();
    log.flush().unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || {
            fs::read_to_string(&path)
                .unwrap()
                .contains("checkpoint (interval)")
        }),
        "no interval checkpoint"
    );
    let report = audit::verify(&path, &[public]).unwrap();
    assert_eq!((report.records, report.unsealed), (2, 0), "{report:?}");
    drop(log);
}

#[test]
fn a_log_without_an_audit_key_says_its_checkpoints_are_unsigned() {
    let path = audit_path("unsigned");
    let log = AuditLog::open(AuditConfig::new(&path, None)).unwrap();
    log.sink().record(vec![entry(1), entry(2)]).unwrap();
    log.close().unwrap();
    let report = audit::verify(&path, &[]).unwrap();
    assert_eq!(report.unsigned_checkpoints, vec![3]);
    assert_eq!(report.sealed_through, None);
    assert_eq!(report.unsealed, 2);
}
