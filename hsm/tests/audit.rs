//! The audit log: chain and checkpoint signatures verify, and every kind of
//! tampering (edit, delete, reorder, a consistent rewrite, a cut tail, the
//! wrong key, a stripped signature, an unsealed or forged tail, an empty
//! file) is caught and named. The token keeps each log's head, so a cut at
//! the end, checkpoints included, and a log replaced whole by a fresh one
//! (its head names the path) are caught against it. Several writers
//! share one chain, a restart continues it, checkpoints come by count and by
//! time, and a checkpoint left unsigned is sealed once the HSM is back.

mod common;

use std::{fs, path::Path, time::Duration};

use common::{audit_path, wait_until, TestToken};
use loupe_hsm::{
    audit::{
        self, hex, AuditConfig, AuditLog, Broken, Entry, Head, HeadCheck, HeadFound, Kind, Problem,
        Record, VerifyOptions,
    },
    ca::ensure_audit_key,
    softhsm::close_all_sessions,
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

/// A log of 35 records sealed every 10, plus the shutdown checkpoint:
/// checkpoints at seq 11, 22, 33 and 39 (never by time, however slow).
fn sealed_log(name: &str, token: &Token) -> std::path::PathBuf {
    let path = audit_path(name);
    let mut c = AuditConfig::new(&path, Some(token.clone()));
    c.checkpoint_every = 10;
    c.checkpoint_interval = Duration::from_secs(3600);
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

fn records(lines: &[String]) -> Vec<Record> {
    lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Numbers and links `records` again as a forger would: the chain is whole.
fn rechain(records: Vec<Record>) -> Vec<String> {
    let (mut prev, mut out) = (audit::GENESIS.to_string(), Vec::new());
    for (i, mut r) in records.into_iter().enumerate() {
        prev = r.link(i as u64 + 1, prev, &mut out);
    }
    String::from_utf8(out)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Record 5 removed and every signature dropped (none would verify once
/// the rest is renumbered and re-linked).
fn without_record_5(orig: &[String]) -> Vec<Record> {
    let mut stripped = records(orig);
    stripped.remove(4);
    for r in &mut stripped {
        r.sig = None;
    }
    stripped
}

/// The log with a forged record appended, correctly linked to the last.
fn with_forged_tail(orig: &[String]) -> Vec<String> {
    let mut r = records(&orig[orig.len() - 2..orig.len() - 1]).remove(0);
    r.purpose = "mint leaf forged".into();
    let last = orig.last().unwrap();
    let mut line = Vec::new();
    r.link(orig.len() as u64 + 1, hex(&Sha256::digest(last)), &mut line);
    let mut forged = orig.to_vec();
    forged.push(String::from_utf8(line).unwrap().trim_end().to_string());
    forged
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
    let mut edited = records(&orig);
    edited[4].purpose = "mint leaf 9".into();
    check("rewrite", rechain(edited), 11, "signature does not verify");

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

/// An unsigned checkpoint fails verification until a later signed one
/// seals over it (that signature covers the chain head, hence everything
/// before it).
#[test]
fn an_unsigned_checkpoint_fails_until_a_signed_one_seals_it() {
    let path = audit_path("unsigned");
    let log = AuditLog::open(AuditConfig::new(&path, None)).unwrap();
    log.sink().record(vec![entry(1), entry(2)]).unwrap();
    log.close().unwrap();
    let err = audit::verify(&path, &[]).unwrap_err();
    assert_eq!((err.line, err.problem), (3, Problem::Unsigned), "{err}");
    assert!(
        err.reason.contains("checkpoint at seq 3 has no signature")
            && err.reason.contains("no audit key configured"),
        "{err}"
    );

    let (token, public) = setup("audit-unsigned");
    let log = AuditLog::open(AuditConfig::new(&path, Some(token))).unwrap();
    log.sink().record(vec![entry(3)]).unwrap();
    log.close().unwrap();
    let report = audit::verify(&path, &[public]).unwrap();
    assert_eq!(report.unsigned_checkpoints, vec![3], "{report:?}");
    assert_eq!((report.sealed_through, report.unsealed), (Some(5), 0));
}

/// The HSM goes away under a writer at checkpoint time: the checkpoint is
/// written unsigned (the log fails verification meanwhile), and the writer
/// seals again on its own once the HSM is back, with no new record needed.
#[test]
fn a_checkpoint_left_unsigned_is_sealed_once_the_hsm_is_back() {
    let t = TestToken::new("audit-reseal");
    let token = Token::open(&t.config).unwrap();
    ensure_audit_key(&token).unwrap();
    let public = audit::public_key(&token).unwrap();
    let path = audit_path("reseal");
    let mut c = AuditConfig::new(&path, Some(token.clone()));
    c.checkpoint_interval = Duration::from_millis(200);
    let log = AuditLog::open(c).unwrap();
    // Sessions gone and the PIN file unreadable: no session can be opened.
    let hidden = t.pin_file.with_extension("away");
    fs::rename(&t.pin_file, &hidden).unwrap();
    close_all_sessions(&token).unwrap();
    log.sink().record(vec![entry(1)]).unwrap();
    log.flush().unwrap();
    let last = || records(&lines(&path)).pop();
    assert!(
        wait_until(Duration::from_secs(30), || last()
            .is_some_and(|r| r.kind == Kind::Checkpoint)),
        "no checkpoint"
    );
    let unsigned = last().unwrap();
    assert!(
        unsigned.sig.is_none() && unsigned.result.starts_with("error:"),
        "{unsigned:?}"
    );
    let err = audit::verify(&path, std::slice::from_ref(&public)).unwrap_err();
    assert_eq!(err.problem, Problem::Unsigned, "{err}");

    fs::rename(&hidden, &t.pin_file).unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || last()
            .is_some_and(|r| r.sig.is_some())),
        "the writer did not seal again"
    );
    drop(log);
    let report = audit::verify(&path, &[public]).unwrap();
    assert_eq!(
        report.unsigned_checkpoints,
        vec![unsigned.seq],
        "{report:?}"
    );
    assert_eq!(report.records, unsigned.seq + 1, "one retry, one line");
}

#[test]
fn an_empty_file_has_no_records_and_never_verifies() {
    let path = audit_path("empty");
    fs::write(&path, "").unwrap();
    let err = audit::verify(&path, &[]).unwrap_err();
    assert!(err.reason.contains("no records"), "{err}");
}

/// What is not a regular file is refused at once, and a line too long to
/// be a record ends the reading: `/dev/zero` and a FIFO used to hang the
/// verifier and grow its memory without bound.
#[test]
fn devices_fifos_and_endless_lines_are_refused_at_once() {
    let fifo = audit_path("fifo");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path; mkfifo only creates a node.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let dir = audit_path("dir");
    fs::create_dir_all(&dir).unwrap();
    for (p, kind) in [
        (Path::new("/dev/null"), "a device"),
        (Path::new("/dev/zero"), "a device"),
        (fifo.as_path(), "a FIFO"),
        (dir.as_path(), "a directory"),
    ] {
        let err = audit::verify(p, &[]).unwrap_err();
        assert!(
            err.reason.contains(&format!("not a regular file ({kind})")),
            "{}: {err}",
            p.display()
        );
    }
    // 8 MiB without a newline: refused after the first MiB.
    let long = audit_path("long");
    fs::write(&long, vec![b'{'; 8 << 20]).unwrap();
    let err = audit::verify(&long, &[]).unwrap_err();
    assert!(err.reason.contains("a line longer than"), "{err}");
    assert_eq!(err.line, 1);
    // The same against the token, whose head is looked up by the log's
    // first line first (that lookup hung on the FIFO and read /dev/zero
    // without end).
    let (token, _) = setup("audit-odd-files");
    for (p, why) in [
        (fifo.as_path(), "not a regular file (a FIFO)"),
        (Path::new("/dev/zero"), "not a regular file (a device)"),
        (long.as_path(), "a line longer than"),
    ] {
        let err = audit::verify_on_token(p, &token, false)
            .unwrap()
            .unwrap_err();
        assert!(err.reason.contains(why), "{}: {err}", p.display());
    }
    for p in [&fifo, &long] {
        fs::remove_file(p).unwrap();
    }
    fs::remove_dir(&dir).unwrap();
}

/// Cuts and strippings that leave a whole chain: each fails on the file
/// alone, with what was found, and the record's number is printed plainly.
#[test]
fn unsealed_tails_and_stripped_checkpoints_fail() {
    let (token, public) = setup("audit-strip");
    let path = sealed_log("strip", &token);
    let orig = lines(&path);
    let keys = [public];
    let check = |name: &str, tampered: &[String], line: u64, needle: &str| {
        let p = path.with_extension(name);
        write_lines(&p, tampered);
        let err = audit::verify(&p, &keys).expect_err(name);
        assert_eq!(err.line, line, "{name}: {err}");
        assert!(err.reason.contains(needle), "{name}: {err}");
        assert!(
            err.to_string().contains(&format!("(record seq {line})")),
            "{name}: {err}"
        );
        fs::remove_file(&p).unwrap();
    };

    // The last checkpoint deleted: records 34-38 are sealed by nothing.
    check(
        "cut-checkpoint",
        &orig[..38],
        34,
        "5 records after the last signed checkpoint (seq 33) are unsealed",
    );

    // A forged record appended with a correct back-link.
    check(
        "forged-tail",
        &with_forged_tail(&orig),
        40,
        "1 record after the last signed checkpoint (seq 39) is unsealed",
    );

    // Record 5 removed, the rest renumbered and re-linked, and the
    // signatures (which no longer verify) dropped from the checkpoints.
    check(
        "stripped",
        &rechain(without_record_5(&orig)),
        10,
        "checkpoint at seq 10 has no signature",
    );

    // No checkpoint at all.
    let bare: Vec<Record> = records(&orig)
        .into_iter()
        .filter(|r| r.kind != Kind::Checkpoint)
        .collect();
    check(
        "bare",
        &rechain(bare),
        1,
        "no signed checkpoint: all 35 records are unsealed",
    );
}

fn head_of(token: &Token, path: &Path) -> Head {
    let id = audit::log_id(path).unwrap();
    Head::read(&token.session().unwrap(), &id).unwrap().unwrap()
}

fn on_token(path: &Path, token: &Token, open_tail: bool) -> Result<audit::VerifyReport, Broken> {
    audit::verify_on_token(path, token, open_tail).unwrap()
}

/// The token keeps the log's head: a cut at the end, checkpoints included,
/// is caught against it even where the file alone still verifies.
#[test]
fn the_tokens_head_catches_a_cut_tail_and_a_rewrite() {
    let (token, public) = setup("audit-head");
    let path = sealed_log("head", &token);
    let orig = lines(&path);
    let keys = [public];
    let head = head_of(&token, &path);
    assert_eq!(head.seq, 39);
    assert_eq!(head.hash, hex(&Sha256::digest(orig[38].as_bytes())));
    assert_eq!(head.log, hex(&Sha256::digest(orig[0].as_bytes())));
    let report = on_token(&path, &token, false).unwrap();
    assert_eq!(report.head, HeadFound::Matched(39), "{report:?}");
    assert_eq!(report.log_id, head.log);

    let check = |name: &str, tampered: &[String], problem: Problem, needle: &str| {
        let p = path.with_extension(name);
        write_lines(&p, tampered);
        for open_tail in [false, true] {
            let err = on_token(&p, &token, open_tail).expect_err(name);
            assert_eq!(err.problem, problem, "{name}: {err}");
            assert!(err.reason.contains(needle), "{name}: {err}");
        }
        p
    };

    // A consistent rewrite: the last 17 records and their two checkpoints
    // dropped. The file alone is a whole, sealed log.
    let p = check(
        "drop-last",
        &orig[..22],
        Problem::Truncated,
        "the log ends at seq 22 but the token's head is seq 39: the log was truncated \
         (at least 17 records cut",
    );
    let alone = audit::verify(&p, &keys).unwrap();
    assert_eq!(alone.sealed_through, Some(22));
    assert_eq!(alone.head, HeadFound::Unchecked);

    // The last checkpoint deleted.
    check(
        "cut-checkpoint",
        &orig[..38],
        Problem::Truncated,
        "ends at seq 38 but the token's head is seq 39",
    );

    // Record 5 removed, re-chained, signatures dropped: one record short.
    let mut stripped = without_record_5(&orig);
    check(
        "stripped",
        &rechain(stripped.clone()),
        Problem::Truncated,
        "ends at seq 38",
    );
    // ... and padded back to 39 records: seq 39 is another record.
    stripped.push(stripped[3].clone());
    let p = check(
        "padded",
        &rechain(stripped),
        Problem::Rewritten,
        "this is not the record the token's head names",
    );
    assert_eq!(on_token(&p, &token, false).unwrap_err().line, 39);

    // A forged record appended with a correct back-link: an open tail.
    let p = path.with_extension("forged");
    write_lines(&p, &with_forged_tail(&orig));
    let err = on_token(&p, &token, false).unwrap_err();
    assert_eq!((err.problem, err.line), (Problem::OpenTail, 40), "{err}");
    let open = on_token(&p, &token, true).unwrap();
    assert_eq!(open.head, HeadFound::Matched(39));
    assert_eq!((open.unsealed, open.sealed_through), (1, Some(39)));
}

/// A writer that appends to a log cut behind its back signs its own new
/// checkpoints, but does not move the token's head: the cut stays visible.
#[test]
fn a_writer_on_a_cut_log_leaves_the_head_where_it_was() {
    let (token, public) = setup("audit-recut");
    let path = sealed_log("recut", &token);
    let orig = lines(&path);
    let before = head_of(&token, &path);
    write_lines(&path, &orig[..22]);
    let mut c = AuditConfig::new(&path, Some(token.clone()));
    c.checkpoint_every = 10;
    let log = AuditLog::open(c).unwrap();
    log.sink().record((0..30).map(entry).collect()).unwrap();
    log.close().unwrap();
    // Whole and sealed as a file, and longer than before...
    let alone = audit::verify(&path, &[public]).unwrap();
    assert!(alone.records > 39, "{alone:?}");
    // ... but the token still names the old record 39.
    assert_eq!(head_of(&token, &path), before);
    let err = on_token(&path, &token, false).unwrap_err();
    assert_eq!((err.problem, err.line), (Problem::Rewritten, 39), "{err}");
}

/// A live log: records after the last signed checkpoint fail unless an open
/// tail is allowed, and then are counted; a log whose first checkpoint is
/// still to come has no head on the token yet.
#[test]
fn a_live_log_verifies_with_an_open_tail_only() {
    let (token, _) = setup("audit-live");
    let path = audit_path("live");
    // No interval checkpoint may seal the tail while the test looks at it.
    let live = || {
        let mut c = AuditConfig::new(&path, Some(token.clone()));
        c.checkpoint_interval = Duration::from_secs(3600);
        AuditLog::open(c).unwrap()
    };
    let log = live();
    log.sink().record(vec![entry(1), entry(2)]).unwrap();
    log.flush().unwrap();
    let err = on_token(&path, &token, false).unwrap_err();
    assert_eq!((err.problem, err.line), (Problem::OpenTail, 1), "{err}");
    assert!(
        err.reason
            .contains("no signed checkpoint: all 2 records are unsealed"),
        "{err}"
    );
    let open = on_token(&path, &token, true).unwrap();
    assert_eq!(open.head, HeadFound::NotRecorded, "{open:?}");
    assert_eq!((open.unsealed, open.sealed_through), (2, None));
    log.close().unwrap();

    let log = live();
    log.sink().record(vec![entry(3)]).unwrap();
    log.flush().unwrap();
    let err = on_token(&path, &token, false).unwrap_err();
    assert!(
        err.reason
            .contains("1 record after the last signed checkpoint (seq 3) is unsealed"),
        "{err}"
    );
    let open = on_token(&path, &token, true).unwrap();
    assert_eq!(open.head, HeadFound::Matched(3), "{open:?}");
    assert_eq!(open.unsealed, 1);
    log.close().unwrap();
    assert_eq!(
        on_token(&path, &token, false).unwrap().head,
        HeadFound::Matched(5)
    );
}

/// Logs sharing a token each have their own head, named by the log's id.
#[test]
fn logs_sharing_a_token_keep_their_own_heads() {
    let (token, public) = setup("audit-heads");
    let a = sealed_log("heads-a", &token);
    let b = audit_path("heads-b");
    let log = AuditLog::open(AuditConfig::new(&b, Some(token.clone()))).unwrap();
    log.sink()
        .record(vec![Entry::now(
            Kind::Keygen,
            "tok",
            "k",
            "another log",
            "b",
        )])
        .unwrap();
    log.close().unwrap();
    let (ha, hb) = (head_of(&token, &a), head_of(&token, &b));
    assert_ne!(ha.log, hb.log);
    assert_eq!((ha.seq, hb.seq), (39, 2));
    assert_eq!(
        on_token(&a, &token, false).unwrap().head,
        HeadFound::Matched(39)
    );
    assert_eq!(
        on_token(&b, &token, false).unwrap().head,
        HeadFound::Matched(2)
    );
    // One log's head does not pass for another's.
    let err = audit::verify_with(
        &b,
        &VerifyOptions {
            keys: &[public],
            allow_open_tail: false,
            head: HeadCheck::Token {
                head: Some(ha),
                others: Vec::new(),
                superseded: Vec::new(),
            },
        },
    )
    .unwrap_err();
    assert_eq!((err.problem, err.line), (Problem::Rewritten, 1), "{err}");
}

/// A fresh, never-sealed log put in place of a sealed one: a new first
/// record, so a new log id the token has no head for. The token's head for
/// the log that lived at this path gives the replacement away, even once a
/// writer has sealed the new log; an operator's `supersede` (`loupe audit
/// reset-head`) is what makes a deliberate new log verify, and the old
/// log, moved away, still verifies against its own head.
#[test]
fn a_log_replaced_by_a_fresh_one_is_caught_against_the_token() {
    let (token, _) = setup("audit-replaced");
    let path = sealed_log("replaced", &token);
    let orig = lines(&path);
    let old = head_of(&token, &path);
    let moved = path.with_extension("old");
    fs::copy(&path, &moved).unwrap();
    let mut fresh: Vec<Record> = records(&orig[..5]);
    for r in &mut fresh {
        r.purpose = format!("{} (not it)", r.purpose);
    }
    write_lines(&path, &rechain(fresh));
    assert_ne!(audit::log_id(&path).unwrap(), old.log);
    let canonical = fs::canonicalize(&path).unwrap();
    let replaced = |err: Broken| {
        assert_eq!((err.problem, err.line), (Problem::Replaced, 0), "{err}");
        assert!(
            err.reason.contains(&format!(
                "the log at {} was replaced: the token's head names another log (first record \
                 sha256 {}, seq 39)",
                canonical.display(),
                old.log
            )) && err.reason.contains("loupe audit reset-head"),
            "{err}"
        );
    };
    replaced(on_token(&path, &token, true).expect_err("a replaced log verified"));

    // The engine goes on writing to the replaced file and seals it: the
    // new log gets its own head, and the old one still claims the path.
    let log = AuditLog::open(AuditConfig::new(&path, Some(token.clone()))).unwrap();
    log.sink().record(vec![entry(100)]).unwrap();
    log.close().unwrap();
    assert_eq!(head_of(&token, &path).path.as_deref(), old.path.as_deref());
    replaced(on_token(&path, &token, false).unwrap_err());

    // The operator records that a new log took the old one's place.
    let log = AuditLog::open(AuditConfig::new(&path, Some(token.clone()))).unwrap();
    let gone = audit::supersede(&token, &log, "rotated", "test").unwrap();
    log.close().unwrap();
    assert_eq!(gone.len(), 1);
    assert_eq!((gone[0].log.as_str(), gone[0].seq), (old.log.as_str(), 39));
    let report = on_token(&path, &token, false).unwrap();
    assert_eq!(report.superseded.len(), 1, "{report:?}");
    assert_eq!(report.superseded[0].log, old.log);
    let why = records(&lines(&path))
        .into_iter()
        .find(|r| r.kind == Kind::Supersede)
        .unwrap();
    assert!(
        why.purpose
            .contains(&format!("supersedes log {} (head seq 39", old.log))
            && why.purpose.ends_with(": rotated"),
        "{why:?}"
    );
    // Nothing left to supersede: no second record.
    let log = AuditLog::open(AuditConfig::new(&path, Some(token.clone()))).unwrap();
    assert!(audit::supersede(&token, &log, "again", "test")
        .unwrap()
        .is_empty());
    log.close().unwrap();
    // The old log, moved away, is still checked against its own head.
    let report = on_token(&moved, &token, false).unwrap();
    assert_eq!(report.head, HeadFound::Matched(39), "{report:?}");
    write_lines(&moved, &orig[..22]);
    assert_eq!(
        on_token(&moved, &token, false).unwrap_err().problem,
        Problem::Truncated
    );
    // A later replacement of the new log is caught the same way.
    let new_id = audit::log_id(&path).unwrap();
    write_lines(&path, &rechain(records(&orig[..3])));
    let err = on_token(&path, &token, true).unwrap_err();
    assert_eq!(err.problem, Problem::Replaced, "{err}");
    assert!(err.reason.contains(&new_id), "{err}");
}

/// A new log started where none was claimed (a first log, or a log moved
/// to a new path) takes no reset: no other head names its path.
#[test]
fn a_log_moved_to_a_new_path_still_verifies_and_claims_it() {
    let (token, _) = setup("audit-moved");
    let path = sealed_log("moved-from", &token);
    let to = audit_path("moved-to");
    fs::rename(&path, &to).unwrap();
    assert_eq!(
        on_token(&to, &token, false).unwrap().head,
        HeadFound::Matched(39)
    );
    let log = AuditLog::open(AuditConfig::new(&to, Some(token.clone()))).unwrap();
    log.sink().record(vec![entry(1)]).unwrap();
    log.close().unwrap();
    let head = head_of(&token, &to);
    assert_eq!(head.path, Some(audit::log_path(&to)));
    assert_eq!(head.seq, 41);
    // The old path is free: a new log there verifies.
    let log = AuditLog::open(AuditConfig::new(&path, Some(token.clone()))).unwrap();
    log.sink().record(vec![entry(2)]).unwrap();
    log.close().unwrap();
    let report = on_token(&path, &token, false).unwrap();
    assert_eq!(report.head, HeadFound::Matched(2), "{report:?}");
}

/// Mounts a tmpfs of `size` on `dir` in a mount namespace of the calling
/// thread alone (threads it starts share it): the mount goes with the
/// namespace, so nothing stays mounted whatever becomes of the test.
fn private_tmpfs(dir: &Path, size: &str) {
    use std::ffi::CString;
    fs::create_dir_all(dir).unwrap();
    let c = |s: &str| CString::new(s).unwrap();
    let (none, root, tmpfs) = (c("none"), c("/"), c("tmpfs"));
    let (target, opts) = (c(dir.to_str().unwrap()), c(&format!("size={size}")));
    // SAFETY: plain syscalls on NUL-terminated strings that outlive them;
    // unshare(CLONE_NEWNS) affects this thread's filesystem context only.
    unsafe {
        assert_eq!(libc::unshare(libc::CLONE_NEWNS), 0, "unshare");
        assert_eq!(
            libc::mount(
                none.as_ptr(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ),
            0,
            "make / private"
        );
        assert_eq!(
            libc::mount(
                tmpfs.as_ptr(),
                target.as_ptr(),
                tmpfs.as_ptr(),
                0,
                opts.as_ptr().cast(),
            ),
            0,
            "mount tmpfs: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Fills the filesystem holding `path` until a write fails for want of
/// space.
fn fill(path: &Path) {
    let mut f = fs::File::create(path).unwrap();
    let chunk = [b'x'; 4096];
    loop {
        match std::io::Write::write(&mut f, &chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
}

/// The disk fills under the writer: a write fails part-way. The records are
/// kept and written once there is room again, in one whole chain: none is
/// lost, none twice, and the log verifies against the token.
#[test]
fn a_failed_write_loses_no_record_and_the_chain_holds() {
    let (token, _) = setup("audit-enospc");
    let dir = common::sandbox().dir.join("enospc");
    private_tmpfs(&dir, "256k");
    let path = dir.join("audit.jsonl");
    let mut c = AuditConfig::new(&path, Some(token.clone()));
    c.checkpoint_interval = Duration::from_secs(3600);
    let log = AuditLog::open(c).unwrap();
    let sink = log.sink();
    sink.record((0..10).map(entry).collect()).unwrap();
    log.flush().unwrap();

    let filler = dir.join("filler");
    fill(&filler);
    for batch in (10..60).collect::<Vec<_>>().chunks(10) {
        sink.record(batch.iter().map(|&i| entry(i)).collect())
            .unwrap();
    }
    let err = log.flush().expect_err("a write to a full disk succeeded");
    assert!(err.to_string().contains("No space left"), "{err}");
    let h = log.health();
    assert!(h.failing && h.write_errors >= 1, "{h:?}");
    assert_eq!(h.pending, 50, "{h:?}");
    assert!(
        h.last_error
            .as_deref()
            .is_some_and(|e| e.contains("No space left")),
        "{h:?}"
    );

    fs::remove_file(&filler).unwrap();
    sink.record((60..70).map(entry).collect()).unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || log.flush().is_ok()),
        "the writer did not recover"
    );
    let h = log.health();
    assert!(!h.failing && h.pending == 0 && h.recoveries == 1, "{h:?}");
    drop(sink);
    log.close().unwrap();
    let report = on_token(&path, &token, false).unwrap();
    assert_eq!(report.unsealed, 0, "{report:?}");
    let recs = records(&lines(&path));
    for i in 0..70 {
        let purpose = format!("mint leaf {i}");
        let n = recs.iter().filter(|r| r.purpose == purpose).count();
        assert_eq!(n, 1, "{purpose} is in the log {n} times");
    }
}

/// A log sealed by one token's audit key is not appended to through
/// another token (whose key would seal the rest, leaving a log no single
/// token verifies); its own token goes on appending.
#[test]
fn a_log_sealed_by_another_tokens_audit_key_is_refused() {
    let (a, _) = setup("sealed-by-a");
    let (b, _) = setup("sealed-by-b");
    let path = sealed_log("sealed-by", &a);
    let e = AuditLog::open(AuditConfig::new(&path, Some(b.clone())))
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("sealed by another audit key"), "{e}");
    let log = AuditLog::open(AuditConfig::new(&path, Some(a.clone()))).unwrap();
    log.sink().record(vec![entry(99)]).unwrap();
    log.close().unwrap();
}
