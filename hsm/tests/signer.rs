//! The signer service against a real SoftHSM2 token: every mechanism, the
//! start-up errors, back-pressure, deadlines, wake-ups, session loss, a PIN
//! change under a running signer, partitions and concurrent requesters.

mod common;

use std::{
    sync::{Arc, Mutex},
    task::{Wake, Waker},
    time::{Duration, Instant},
};

use common::{audit_path, wait_until, write_pin, TestToken};
use loupe_hsm::{
    audit::{self, verify_sig, AuditConfig, AuditLog},
    ca::ensure_audit_key,
    mech::SignMech,
    pin::PinSource,
    signer::{Request, Signer, SignerConfig},
    softhsm::close_all_sessions,
    token::{KeyAlg, PublicKey, Token},
    HsmError,
};

fn request(token: &str, key: &str, mech: SignMech, msg: &[u8]) -> Request {
    Request {
        token: token.to_string(),
        key: key.to_string(),
        mech,
        message: msg.to_vec(),
        purpose: "test".into(),
        requester: "signer-test".into(),
        timeout: Some(Duration::from_secs(30)),
    }
}

/// A fresh token holding one key pair labelled `label`.
fn token_with_key(name: &str, label: &str, alg: KeyAlg) -> (TestToken, Token, PublicKey) {
    let t = TestToken::new(name);
    let token = Token::open(&t.config).unwrap();
    let public = token
        .session()
        .unwrap()
        .generate_key_pair(label, alg)
        .unwrap();
    (t, token, public)
}

fn config(tokens: &[&TestToken], threads: usize, batch: usize) -> SignerConfig {
    let mut c = SignerConfig::new(tokens.iter().map(|t| t.config.clone()).collect());
    c.threads_per_token = threads;
    c.batch = batch;
    c.backoff_min = Duration::from_millis(50);
    c.backoff_max = Duration::from_millis(200);
    c
}

#[test]
fn every_mechanism_signs_and_verifies_in_software() {
    let t = TestToken::new("mechs");
    let token = Token::open(&t.config).unwrap();
    let mut s = token.session().unwrap();
    let keys = [
        ("p256", KeyAlg::EcP256),
        ("p384", KeyAlg::EcP384),
        ("rsa", KeyAlg::Rsa2048),
    ];
    let publics: Vec<_> = keys
        .iter()
        .map(|(l, a)| s.generate_key_pair(l, *a).unwrap())
        .collect();
    let signer = Signer::start(config(&[&t], 2, 8), None).unwrap();
    let cases = [
        (0, SignMech::EcdsaP256Sha256),
        (1, SignMech::EcdsaP384Sha384),
        (2, SignMech::RsaPkcs1Sha256),
        (2, SignMech::RsaPkcs1Sha384),
        (2, SignMech::RsaPssSha256),
        (2, SignMech::RsaPssSha384),
    ];
    for (k, mech) in cases {
        let msg = format!("message for {mech}");
        let sig = signer
            .sign(request(&t.config.label, keys[k].0, mech, msg.as_bytes()))
            .unwrap_or_else(|e| panic!("{mech}: {e}"));
        assert!(
            verify_sig(&publics[k], mech, msg.as_bytes(), &sig),
            "{mech} does not verify"
        );
        assert!(
            !verify_sig(&publics[k], mech, b"another message", &sig),
            "{mech} verifies anything"
        );
    }
    let err = signer
        .sign(request(
            &t.config.label,
            "p256",
            SignMech::EcdsaP384Sha384,
            b"x",
        ))
        .unwrap_err();
    assert!(matches!(err, HsmError::KeyMismatch { .. }), "{err}");
    let err = signer
        .sign(request(
            &t.config.label,
            "p256",
            SignMech::RsaPssSha256,
            b"x",
        ))
        .unwrap_err();
    assert!(matches!(err, HsmError::KeyMismatch { .. }), "{err}");
    assert!(
        signer.health()[0].up,
        "request errors must not take the token down"
    );
}

/// A partition after the first that cannot be opened (a wrong PIN, a
/// missing token) is left out and reported; the first signs as usual.
#[test]
fn a_later_partition_that_cannot_open_is_left_out_and_the_first_signs() {
    let (a, _token, public) = token_with_key("tenant-a", "k", KeyAlg::EcP256);
    let b = TestToken::new("tenant-b");
    let mut wrong = b.config.clone();
    let wrong_file = b.pin_file.with_extension("wrong");
    write_pin(&wrong_file, "not-the-pin");
    wrong.pin = PinSource::File(wrong_file);
    let mut missing = a.config.clone();
    missing.label = "no-such-token".into();
    let mut c = SignerConfig::new(vec![a.config.clone(), wrong, missing]);
    c.threads_per_token = 1;
    let signer = Signer::start(c, None).unwrap();
    let sig = signer
        .sign(request(
            &a.config.label,
            "k",
            SignMech::EcdsaP256Sha256,
            b"m",
        ))
        .unwrap();
    assert!(verify_sig(&public, SignMech::EcdsaP256Sha256, b"m", &sig));
    let err = signer
        .sign(request(
            &b.config.label,
            "k",
            SignMech::EcdsaP256Sha256,
            b"m",
        ))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains(&b.config.label) && err.contains("PIN"),
        "{err}"
    );
    let err = signer
        .sign(request(
            "no-such-token",
            "k",
            SignMech::EcdsaP256Sha256,
            b"m",
        ))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("no token labelled"), "{err}");
    let health = signer.health();
    assert_eq!(health.len(), 3, "{health:?}");
    assert!(health[0].up, "{health:?}");
    for h in &health[1..] {
        assert!(!h.up && h.last_error.is_some(), "{health:?}");
    }
    let handle = signer.handle();
    assert!(handle.is_up(&a.config.label));
    assert!(!handle.is_up(&b.config.label));
}

#[test]
fn wrong_pin_missing_token_and_loose_pin_file_fail_at_start() {
    let t = TestToken::new("startup");
    let mut c = t.config.clone();
    let wrong = t.pin_file.with_extension("wrong");
    write_pin(&wrong, "not-the-pin");
    c.pin = PinSource::File(wrong);
    let err = Signer::start(SignerConfig::new(vec![c]), None)
        .err()
        .unwrap();
    assert!(matches!(err, HsmError::PinIncorrect(_)), "{err}");
    assert!(err.to_string().contains(&t.config.label), "{err}");

    let mut c = t.config.clone();
    c.label = "no-such-token".into();
    let err = Signer::start(SignerConfig::new(vec![c]), None)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("no token labelled \"no-such-token\"") && err.contains(&t.config.label),
        "{err}"
    );

    let mut c = t.config.clone();
    c.pin = PinSource::Env("LOUPE_SIGNER_TEST_UNSET_PIN".into());
    let err = Signer::start(SignerConfig::new(vec![c]), None)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("LOUPE_SIGNER_TEST_UNSET_PIN is not set"),
        "{err}"
    );

    let mut c = t.config.clone();
    c.module = "/nonexistent/libpkcs11.so".into();
    let err = Signer::start(SignerConfig::new(vec![c]), None)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("cannot load the PKCS#11 module /nonexistent"),
        "{err}"
    );
}

#[test]
fn a_full_queue_refuses_at_once_and_every_accepted_request_is_answered() {
    let (t, _, public) = token_with_key("full", "rsa", KeyAlg::Rsa2048);
    let mut c = config(&[&t], 1, 1);
    c.queue_capacity = 4;
    let signer = Signer::start(c, None).unwrap();
    let mut tickets = Vec::new();
    let mut refused = 0;
    for i in 0..64u32 {
        let msg = i.to_be_bytes();
        let started = Instant::now();
        match signer.submit(
            request(&t.config.label, "rsa", SignMech::RsaPssSha256, &msg),
            None,
        ) {
            Ok(ticket) => tickets.push((msg, ticket)),
            Err(HsmError::QueueFull { capacity: 4, .. }) => refused += 1,
            Err(e) => panic!("unexpected {e}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "submission blocked"
        );
    }
    assert!(refused > 0, "64 RSA requests never filled a 4-slot queue");
    for (msg, ticket) in tickets {
        let sig = ticket.wait().unwrap();
        assert!(verify_sig(&public, SignMech::RsaPssSha256, &msg, &sig));
    }
    let h = &signer.health()[0];
    assert_eq!(h.rejected_full, refused);
    assert_eq!(h.signed + h.rejected_full, 64);
    // Every signature made is in the latency histogram, and RSA-2048 on
    // SoftHSM takes more than 100 µs.
    assert_eq!(h.latency.counts.iter().sum::<u64>(), h.signed);
    assert_eq!(h.latency.counts.len(), h.latency.bounds_us.len() + 1);
    assert_eq!(h.latency.counts[0], 0, "{:?}", h.latency);
    assert!(h.latency.sum_us >= 100 * h.signed);
}

/// A request whose deadline passes while it waits behind a busy job is
/// answered `Timeout` by the HSM thread itself (its ticket is held, never
/// waited on, so it is not skipped as abandoned) and is never signed.
#[test]
fn an_expired_request_is_answered_timeout_and_never_signed() {
    let (t, token, _) = token_with_key("deadline", "k", KeyAlg::EcP256);
    ensure_audit_key(&token).unwrap();
    let path = audit_path("deadline");
    let log = AuditLog::open(AuditConfig::new(&path, Some(token.clone()))).unwrap();
    let signer = Signer::start(config(&[&t], 1, 8), Some(log.sink())).unwrap();
    let label = &t.config.label;
    let busy = signer
        .submit(
            request(label, "k", SignMech::EcdsaP256Sha256, b"busy"),
            None,
        )
        .unwrap();
    let mut r = request(label, "k", SignMech::EcdsaP256Sha256, b"late");
    r.timeout = Some(Duration::ZERO);
    let late = signer.submit(r, None).unwrap();
    busy.wait().unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || late.is_ready()),
        "the HSM thread never answered the expired request"
    );
    let err = late.try_take().unwrap().unwrap_err();
    assert!(matches!(err, HsmError::Timeout(_)), "{err}");
    let h = &signer.health()[0];
    assert_eq!((h.timed_out, h.abandoned, h.signed), (1, 0, 1), "{h:?}");
    drop(late);
    drop(signer);
    log.close().unwrap();
    let public = audit::public_key(&token).unwrap();
    let report = audit::verify(&path, &[public]).unwrap();
    // The busy job's signature and the shutdown checkpoint: the expired
    // request left no key use behind.
    assert_eq!((report.records, report.checkpoints), (2, 1), "{report:?}");
}

struct ChannelWaker(Mutex<crossbeam::channel::Sender<()>>);

impl Wake for ChannelWaker {
    fn wake(self: Arc<Self>) {
        let _ = self.0.lock().unwrap().send(());
    }
}

#[test]
fn the_requester_is_woken_not_blocked() {
    let (t, _, _) = token_with_key("waker", "k", KeyAlg::EcP256);
    let signer = Signer::start(config(&[&t], 1, 8), None).unwrap();
    let (tx, rx) = crossbeam::channel::unbounded();
    let waker = Waker::from(Arc::new(ChannelWaker(Mutex::new(tx))));
    let ticket = signer
        .submit(
            request(&t.config.label, "k", SignMech::EcdsaP256Sha256, b"m"),
            Some(waker),
        )
        .unwrap();
    rx.recv_timeout(Duration::from_secs(30))
        .expect("never woken");
    assert!(ticket.is_ready());
    assert!(ticket.try_take().unwrap().is_ok());
    assert!(ticket.try_take().is_none(), "an answer is taken once");
}

#[test]
fn lost_sessions_are_reopened_without_failing_requests() {
    let (t, token, _) = token_with_key("reset", "k", KeyAlg::EcP256);
    let signer = Signer::start(config(&[&t], 2, 8), None).unwrap();
    let sign = || {
        signer.sign(request(
            &t.config.label,
            "k",
            SignMech::EcdsaP256Sha256,
            b"m",
        ))
    };
    sign().unwrap();
    for _ in 0..3 {
        close_all_sessions(&token).unwrap();
        for _ in 0..4 {
            sign().expect("a token reset must be invisible to requesters");
        }
    }
    let h = &signer.health()[0];
    assert!(h.up && h.failed == 0, "{h:?}");
}

#[test]
fn a_pin_change_under_the_signer_fails_closed_until_the_pin_source_follows() {
    let (t, token, public) = token_with_key("repin", "k", KeyAlg::EcP256);
    let signer = Signer::start(config(&[&t], 2, 8), None).unwrap();
    let label = t.config.label.clone();
    let sign = || signer.sign(request(&label, "k", SignMech::EcdsaP256Sha256, b"m"));
    sign().unwrap();

    // The operator changes the PIN on the HSM and the token is reset.
    let admin = token.session().unwrap();
    let new_pin = "rotated-pin-2";
    admin
        .raw()
        .set_pin(&t.pin.clone().into(), &new_pin.to_string().into())
        .unwrap();
    drop(admin);
    close_all_sessions(&token).unwrap();

    let err = sign().unwrap_err();
    assert!(matches!(err, HsmError::Unavailable { .. }), "{err}");
    // Down: refused at submission, fast, with the reason.
    let started = Instant::now();
    let err = signer
        .submit(request(&label, "k", SignMech::EcdsaP256Sha256, b"m"), None)
        .err()
        .expect("a down token must refuse at submission");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refusal must not wait on the HSM"
    );
    assert!(err.to_string().contains("wrong PIN"), "{err}");
    assert!(
        wait_until(Duration::from_secs(10), || {
            signer.health()[0]
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("not retrying until PIN file"))
        }),
        "{:?}",
        signer.health()
    );
    assert!(!signer.health()[0].up);

    // The PIN file follows; the signer comes back on its own.
    write_pin(&t.pin_file, new_pin);
    assert!(
        wait_until(Duration::from_secs(20), || signer.health()[0].up),
        "{:?}",
        signer.health()
    );
    for _ in 0..4 {
        let sig = sign().unwrap();
        assert!(verify_sig(&public, SignMech::EcdsaP256Sha256, b"m", &sig));
    }
    assert_eq!(signer.health()[0].recoveries, 1);
}

#[test]
fn partitions_keep_keys_and_pins_apart() {
    let a = TestToken::new("tenant-a");
    let b = TestToken::new("tenant-b");
    let tb = Token::open(&b.config).unwrap();
    tb.session()
        .unwrap()
        .generate_key_pair("tenant-key", KeyAlg::EcP256)
        .unwrap();
    let signer = Signer::start(config(&[&a, &b], 1, 8), None).unwrap();
    let msg = b"partition";
    signer
        .sign(request(
            &b.config.label,
            "tenant-key",
            SignMech::EcdsaP256Sha256,
            msg,
        ))
        .unwrap();
    let err = signer
        .sign(request(
            &a.config.label,
            "tenant-key",
            SignMech::EcdsaP256Sha256,
            msg,
        ))
        .unwrap_err();
    assert!(matches!(err, HsmError::ObjectNotFound { .. }), "{err}");
    let err = signer
        .sign(request(
            "tenant-c",
            "tenant-key",
            SignMech::EcdsaP256Sha256,
            msg,
        ))
        .unwrap_err();
    assert!(matches!(err, HsmError::UnknownToken(_)), "{err}");
    assert!(signer.health().iter().all(|h| h.up));

    // Tenant A's PIN does not open tenant B's token.
    let mut crossed = b.config.clone();
    crossed.pin = a.config.pin.clone();
    let err = Token::open(&crossed).unwrap_err();
    assert!(matches!(err, HsmError::PinIncorrect(_)), "{err}");
}

#[test]
fn concurrent_requesters_are_all_answered_and_audited() {
    let (t, token, public) = token_with_key("busy", "k", KeyAlg::EcP256);
    ensure_audit_key(&token).unwrap();
    let path = audit_path("busy");
    let mut ac = AuditConfig::new(&path, Some(token.clone()));
    ac.checkpoint_every = 64;
    let log = AuditLog::open(ac).unwrap();
    let signer = Signer::start(config(&[&t], 2, 8), Some(log.sink())).unwrap();
    let handle = signer.handle();
    std::thread::scope(|s| {
        for r in 0..4 {
            let (handle, public, label) = (handle.clone(), public.clone(), t.config.label.clone());
            s.spawn(move || {
                let tickets: Vec<_> = (0..100)
                    .map(|i| {
                        let msg = format!("requester {r} message {i}");
                        let mut req =
                            request(&label, "k", SignMech::EcdsaP256Sha256, msg.as_bytes());
                        req.requester = format!("requester-{r}");
                        (msg, handle.submit(req, None).unwrap())
                    })
                    .collect();
                for (msg, t) in tickets {
                    let sig = t.wait().unwrap();
                    assert!(verify_sig(
                        &public,
                        SignMech::EcdsaP256Sha256,
                        msg.as_bytes(),
                        &sig
                    ));
                }
            });
        }
    });
    drop(handle);
    drop(signer);
    log.close().unwrap();
    let audit_pub = audit::public_key(&token).unwrap();
    let report = audit::verify(&path, &[audit_pub]).unwrap();
    assert_eq!(report.records - report.checkpoints, 400, "{report:?}");
    assert_eq!(report.unsealed, 0);
    assert!(report.checkpoints >= 400 / 64, "{report:?}");
}

/// `cpus`: each HSM thread is pinned to its CPU in turn (the kernel's own
/// record of the thread's affinity says so), and signs there. Other
/// tests' HSM threads in this process are not pinned (their list names
/// every CPU), so exactly this signer's two threads name the last CPU
/// alone.
#[test]
fn hsm_threads_run_on_the_cpus_they_are_given() {
    let (t, _token, _) = token_with_key("pinned", "k", KeyAlg::EcP256);
    let last = loupe_hsm::signer::online_cpus() - 1;
    assert!(
        last >= 1,
        "this test needs two CPUs to tell pinned from not"
    );
    let mut c = config(&[&t], 2, 8);
    c.cpus = vec![last];
    let signer = Signer::start(c, None).unwrap();
    let sig = signer
        .sign(request(
            &t.config.label,
            "k",
            SignMech::EcdsaP256Sha256,
            b"on its own core",
        ))
        .unwrap();
    assert!(!sig.is_empty());
    // The threads name and pin themselves once they run, which on a loaded
    // machine can be after the first signature: wait for both.
    let pinned_threads = || {
        let mut seen = Vec::new();
        for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if !comm.starts_with("loupe-hsm-") {
                continue;
            }
            // A thread of another test may exit between the listing and here.
            let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
                continue;
            };
            let allowed = status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .unwrap()
                .trim()
                .to_string();
            seen.push(allowed);
        }
        seen
    };
    let count = |seen: &[String]| seen.iter().filter(|a| **a == last.to_string()).count();
    wait_until(Duration::from_secs(30), || count(&pinned_threads()) >= 2);
    let seen = pinned_threads();
    assert_eq!(count(&seen), 2, "HSM threads' CPUs: {seen:?}");
}
