//! The intercept stage driven in memory (see [`super::testkit`]): a real
//! rustls client and server at either end, Loupe's CAs signing in
//! software, time chosen by the test.

use std::{
    io::Write,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use rustls::{AlertDescription, ServerConfig};

use super::testkit::{Kit, Session};
use crate::{
    policy::{Fallback, OnError, Profile},
    tcp::stream::{ByteStream, Pump},
};

const NAME: &str = "shop.example";

fn decrypts(s: &mut Session) {
    s.run();
    assert!(!s.client.is_handshaking(), "client: {:?}", s.client_error);
    assert!(!s.server.is_handshaking(), "server: {:?}", s.server_error);
}

#[test]
fn a_connection_is_decrypted_and_bytes_cross_both_ways_exactly() {
    // Arbitrary bytes under h2: without HTTP parsing (with it, anything
    // but HTTP/2 under h2 ends the connection).
    let kit = Kit::new(Profile {
        http: false,
        ..Profile::default()
    });
    let server = kit.server_config(&[NAME], 30, &[b"h2", b"http/1.1"]);
    let mut s = Session::start(&kit, kit.client_config(&[b"h2", b"http/1.1"]), NAME, server);
    decrypts(&mut s);
    // The client sees Loupe's certificate for the server's name and the
    // protocol the server chose.
    let chain = s.client.peer_certificates().unwrap();
    assert_eq!(chain[1].as_ref(), kit.trust_ca.as_ref());
    assert_eq!(s.client.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(s.server.server_name(), Some(NAME));

    let request: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    s.client.writer().write_all(&request).unwrap();
    s.run();
    assert!(s.server_read() == request, "the request arrives byte-exact");
    let response: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
    s.server.writer().write_all(&response).unwrap();
    s.run();
    assert!(
        s.client_read() == response,
        "the response arrives byte-exact"
    );

    let r = s.stage.record();
    assert_eq!(r.outcome, "decrypted");
    assert_eq!((r.plaintext_c2s, r.plaintext_s2c), (100_000, 300_000));
    assert_eq!(r.cache.as_deref(), Some("miss"));
    assert_eq!(r.ca.as_deref(), Some("forward-trust/g1"));
    assert_eq!(kit.signer.signed.load(Ordering::SeqCst), 1);

    // close_notify from the client reaches the server, and the FIN
    // follows toward it once the alert is out.
    s.client.send_close_notify();
    s.run();
    assert!(s.server_closed, "the server reads a close_notify");
    assert!(s.spipe.closed, "and the FIN follows");
}

#[test]
fn a_second_connection_to_the_site_is_served_from_the_cache() {
    let kit = Kit::new(Profile::default());
    let server = kit.server_config(&[NAME], 30, &[]);
    for (want, resumed) in [("miss", false), ("hit", true)] {
        let mut s = Session::start(&kit, kit.client_config(&[]), NAME, server.clone());
        decrypts(&mut s);
        assert_eq!(s.stage.record().cache.as_deref(), Some(want));
        // The engine's own session with the server is resumed the second
        // time (the profile's verifier must be the one that verified it).
        assert_eq!(s.stage.record().server.resumed, resumed);
    }
    assert_eq!(kit.signer.signed.load(Ordering::SeqCst), 1);
    assert_eq!(kit.ctx.cache.stats.hits.load(Ordering::Relaxed), 1);
}

/// A returning client resumes, but only under the certificate it was
/// shown: once the site turns untrusted, its ticket from the trusted days
/// does not skip the forward-untrust certificate it must see and refuse.
#[test]
fn a_client_resumes_only_under_the_certificate_it_was_shown() {
    let kit = Kit::new(Profile {
        expired: OnError::PassOn,
        ..Profile::default()
    });
    let client = kit.client_config(&[]);
    let good = kit.server_config(&[NAME], 30, &[]);
    for resumed in [false, true] {
        let mut s = Session::start(&kit, client.clone(), NAME, good.clone());
        decrypts(&mut s);
        // Reading lets the client take the tickets the engine sent.
        s.client.writer().write_all(b"ping").unwrap();
        s.run();
        s.server.writer().write_all(b"pong").unwrap();
        s.run();
        assert_eq!(s.client_read(), b"pong");
        assert_eq!(s.stage.record().client.resumed, resumed);
    }
    // The same name, now with an expired certificate.
    let expired = kit.server_config(&[NAME], -1, &[]);
    let mut s = Session::start(&kit, client, NAME, expired);
    s.run();
    assert!(
        matches!(s.client_error, Some(rustls::Error::InvalidCertificate(_))),
        "the client resumed instead of seeing the untrusted leaf: {:?}",
        s.client_error
    );
    let r = s.stage.record();
    assert_eq!(r.ca.as_deref(), Some("forward-untrust/g1"));
    assert!(!r.client.resumed);
}

#[test]
fn a_connection_waits_parked_for_the_hsm_and_resumes_when_woken() {
    let kit = Kit::new(Profile::default());
    kit.signer.hold.store(true, Ordering::SeqCst);
    let server = kit.server_config(&[NAME], 30, &[]);
    let mut s = Session::start(&kit, kit.client_config(&[]), NAME, server.clone());
    assert_eq!(s.run(), Pump::Parked);
    assert!(s.stage.deadline().is_some());
    assert_eq!(kit.ctx.stats.parked.load(Ordering::Relaxed), 1);
    // A second connection to the same site joins the same mint.
    let mut t = Session::start(&kit, kit.client_config(&[]), NAME, server);
    assert_eq!(t.run(), Pump::Parked);
    assert_eq!(kit.signer.waiting(), 1, "one signature for both");
    assert_eq!(kit.wakes.0.load(Ordering::SeqCst), 0);
    kit.signer.release();
    assert!(
        kit.wakes.0.load(Ordering::SeqCst) >= 1,
        "the worker is woken"
    );
    decrypts(&mut s);
    decrypts(&mut t);
    assert_eq!(t.stage.record().cache.as_deref(), Some("joined"));
    assert_eq!(kit.ctx.stats.parked.load(Ordering::Relaxed), 0);
}

#[test]
fn an_hsm_that_never_answers_fails_the_connection_at_the_deadline() {
    let kit = Kit::new(Profile::default());
    kit.signer.hold.store(true, Ordering::SeqCst);
    let server = kit.server_config(&[NAME], 30, &[]);
    let mut s = Session::start(&kit, kit.client_config(&[]), NAME, server);
    assert_eq!(s.run(), Pump::Parked);
    let deadline = s.stage.deadline().unwrap();
    s.now = deadline + Duration::from_millis(1);
    s.run();
    assert_eq!(
        s.client_error,
        Some(rustls::Error::AlertReceived(
            AlertDescription::InternalError
        ))
    );
    assert!(s.aborted.1, "the server is reset");
    let r = s.stage.record();
    assert_eq!(r.outcome, "blocked");
    let e = r.error.as_ref().unwrap();
    assert_eq!(e.stage, "mint");
    assert!(e.reason.contains("did not answer"), "{e:?}");
    // The failed mint is not cached: the next connection tries again.
    kit.signer.hold.store(false, Ordering::SeqCst);
    let server = kit.server_config(&[NAME], 30, &[]);
    let mut t = Session::start(&kit, kit.client_config(&[]), NAME, server);
    decrypts(&mut t);
}

#[test]
fn an_hsm_that_is_down_blocks_per_the_profile() {
    let kit = Kit::new(Profile::default());
    kit.signer.down.store(true, Ordering::SeqCst);
    let server = kit.server_config(&[NAME], 30, &[]);
    let mut s = Session::start(&kit, kit.client_config(&[]), NAME, server);
    s.run();
    assert!(s.client_error.is_some());
    let r = s.stage.record();
    assert_eq!(
        (r.outcome.as_str(), r.error.as_ref().unwrap().stage.as_str()),
        ("blocked", "mint")
    );
    assert!(r.error.as_ref().unwrap().reason.contains("down"), "{r:?}");
}

#[test]
fn an_expired_server_certificate_is_blocked_or_passed_on_as_the_profile_says() {
    // block: an access_denied alert, nothing reaches the server's app.
    let kit = Kit::new(Profile::default());
    let server = kit.server_config(&[NAME], -1, &[]);
    let mut s = Session::start(&kit, kit.client_config(&[]), NAME, server);
    s.run();
    assert_eq!(
        s.client_error,
        Some(rustls::Error::AlertReceived(AlertDescription::AccessDenied))
    );
    let r = s.stage.record();
    assert_eq!(r.outcome, "blocked");
    assert_eq!(r.verdict, ["expired"]);
    assert_eq!(
        kit.signer.signed.load(Ordering::SeqCst),
        0,
        "nothing minted"
    );

    // pass-on: the forward-untrust CA signs, and a client trusting only the
    // forward-trust CA refuses it.
    let kit = Kit::new(Profile {
        expired: OnError::PassOn,
        ..Profile::default()
    });
    let server = kit.server_config(&[NAME], -1, &[]);
    let mut s = Session::start(&kit, kit.client_config(&[]), NAME, server);
    s.run();
    assert!(
        matches!(s.client_error, Some(rustls::Error::InvalidCertificate(_))),
        "{:?}",
        s.client_error
    );
    let r = s.stage.record();
    assert_eq!(r.ca.as_deref(), Some("forward-untrust/g1"));
    // The client refusing it is what passing on is for: not a pinned app,
    // nothing excluded.
    assert_eq!(r.outcome, "passed-on", "{r:?}");
    assert!(kit.ctx.exclusions.list().is_empty());
}

/// An expired site costs one signature, not one per connection.
#[test]
fn a_certificate_minted_expired_is_still_served_from_the_cache() {
    let kit = Kit::new(Profile {
        expired: OnError::PassOn,
        ..Profile::default()
    });
    let server = kit.server_config(&[NAME], -1, &[]);
    for want in ["miss", "hit", "hit"] {
        let mut s = Session::start(&kit, kit.client_config(&[]), NAME, server.clone());
        s.run();
        assert_eq!(s.stage.record().cache.as_deref(), Some(want));
    }
    assert_eq!(kit.signer.signed.load(Ordering::SeqCst), 1);
}

#[test]
fn a_name_mismatch_is_a_verdict_of_its_own() {
    let kit = Kit::new(Profile {
        name_mismatch: OnError::PassOn,
        ..Profile::default()
    });
    let server = kit.server_config(&["other.example"], 30, &[]);
    let mut s = Session::start(&kit, kit.client_config(&[]), NAME, server);
    s.run();
    let r = s.stage.record();
    assert_eq!(r.verdict, ["name-mismatch"]);
    assert_eq!(r.ca.as_deref(), Some("forward-untrust/g1"));
}

#[test]
fn a_server_that_asks_for_a_client_certificate_is_excluded_not_decrypted() {
    let kit = Kit::new(Profile::default());
    let (chain, key) = kit.server_cert(&[NAME], 30);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(kit.root_der.clone()).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
        .allow_unauthenticated()
        .build()
        .unwrap();
    let server = Arc::new(
        ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .unwrap(),
    );
    let mut s = Session::start(&kit, kit.client_config(&[]), NAME, server);
    s.run();
    assert_eq!(s.aborted, (true, true), "both halves reset");
    let r = s.stage.record();
    assert_eq!(r.outcome, "no-decrypt");
    assert!(r
        .error
        .as_ref()
        .unwrap()
        .reason
        .contains("client certificate"));
    let ex = kit.ctx.exclusions.list();
    assert_eq!(ex.len(), 1);
    assert_eq!(ex[0].site.sni.as_deref(), Some(NAME));
}

/// A URL rule blocking `path` on any host.
fn block_rule(name: &str, path: &str) -> crate::policy::UrlRule {
    crate::policy::UrlRule {
        name: name.into(),
        hosts: Vec::new(),
        paths: vec![path.into()],
        categories: Vec::new(),
        category_hosts: Vec::new(),
        action: crate::policy::UrlAction::Block,
    }
}

/// A kit whose policy has URL rule `name` blocking `path`.
fn kit_blocking(name: &str, path: &str) -> Kit {
    let kit = Kit::new(Profile::default());
    let mut policy = crate::policy::Policy::split_all(&[443], Vec::new());
    policy
        .profiles
        .insert("test".into(), kit.runtime().profile.clone());
    policy.url_rules.push(block_rule(name, path));
    assert!(kit.ctx.prepare(&policy).is_empty());
    kit
}

/// A client that trusts only the kit's root, not Loupe's CA (a pinned
/// app).
fn pinned_client(kit: &Kit) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(kit.root_der.clone()).unwrap();
    Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

#[test]
fn a_client_refusing_the_certificate_puts_the_site_in_the_exclusion_cache() {
    let kit = Kit::new(Profile::default());
    let server = kit.server_config(&[NAME], 30, &[]);
    // A client that trusts something else (a pinned app).
    let pinned = pinned_client(&kit);
    let mut s = Session::start(&kit, pinned, NAME, server);
    s.run();
    assert!(s.client_error.is_some());
    let r = s.stage.record();
    assert_eq!(r.outcome, "no-decrypt", "{r:?}");
    assert_eq!(r.error.as_ref().unwrap().stage, "downstream-handshake");
    let ex = kit.ctx.exclusions.list();
    assert_eq!(ex.len(), 1, "{ex:?}");
    assert!(ex[0].reason.contains("refused the certificate"));
    assert_eq!(kit.ctx.stats.no_decrypt.load(Ordering::Relaxed), 1);
}

/// Refusing a certificate once must not take a client past inspection
/// that may block: with a blocking URL rule the site is not excluded.
#[test]
fn a_refused_certificate_does_not_exclude_a_site_whose_inspection_may_block() {
    let kit = kit_blocking("no-admin", "/admin/*");
    let server = kit.server_config(&[NAME], 30, &[]);
    let pinned = pinned_client(&kit);
    let mut s = Session::start(&kit, pinned, NAME, server);
    s.run();
    assert!(s.client_error.is_some());
    let r = s.stage.record();
    assert_eq!(r.outcome, "failed", "{r:?}");
    assert!(
        r.error.as_ref().unwrap().reason.contains("not excluded"),
        "{r:?}"
    );
    assert!(kit.ctx.exclusions.list().is_empty());
}

#[test]
fn a_truncation_by_the_server_reaches_the_client_as_a_truncation() {
    let kit = Kit::new(Profile::default());
    let server = kit.server_config(&[NAME], 30, &[]);
    let mut s = Session::start(&kit, kit.client_config(&[]), NAME, server);
    decrypts(&mut s);
    s.server.writer().write_all(b"partial").unwrap();
    s.run();
    // The server's TCP ends without close_notify.
    s.spipe.peer_fin = true;
    s.run();
    assert_eq!(s.client_read(), b"partial");
    assert!(s.cpipe.closed, "the client half is closed");
    assert!(
        !s.client_closed,
        "no close_notify is invented for the client"
    );
}

#[test]
fn a_slow_client_holds_back_the_server_within_bounded_memory() {
    let kit = Kit::new(Profile::default());
    let server = kit.server_config(&[NAME], 30, &[]);
    let mut s = Session::start(&kit, kit.client_config(&[]), NAME, server);
    decrypts(&mut s);
    // The client half's send buffer is full and nobody drains it.
    s.cpipe.cap = 64 << 10;
    let big = vec![7u8; 4 << 20];
    s.server.writer().write_all(&big).unwrap();
    // Move the server's records into the server half, but do not let the
    // client read: pump the stage alone.
    let mut out = Vec::new();
    while s.server.wants_write() {
        s.server.write_tls(&mut out).unwrap();
    }
    s.spipe.rx.extend(out);
    for _ in 0..100 {
        s.stage
            .pump(&mut s.cpipe, &mut s.spipe, &mut s.relayed, s.now);
    }
    assert!(s.cpipe.tx.len() <= 64 << 10);
    // Most of the 4 MiB is still unread in the server half: its window
    // would be closed.
    assert!(s.spipe.readable() > 3 << 20, "{}", s.spipe.readable());
    // The client reads again: every byte arrives once, and the inspectors
    // saw each once, however the legs took them in pieces.
    s.cpipe.cap = usize::MAX;
    let mut got = s.client_read();
    for _ in 0..100 {
        if got.len() >= big.len() {
            break;
        }
        s.run();
        got.extend(s.client_read());
    }
    assert!(got == big, "{} bytes arrived", got.len());
    assert_eq!(s.stage.record().plaintext_s2c, big.len() as u64);
}

#[test]
fn garbage_from_the_client_after_the_hello_ends_with_an_alert_not_a_panic() {
    let kit = Kit::new(Profile::default());
    let server = kit.server_config(&[NAME], 30, &[]);
    let mut s = Session::start(&kit, kit.client_config(&[]), NAME, server);
    s.run();
    s.cpipe
        .rx
        .extend([23u8, 3, 3, 0, 5, 1, 2, 3, 4, 5, 0xff, 0xff]);
    let p = s.run();
    assert!(
        matches!(p, Pump::Abort { server: true, .. } | Pump::Go),
        "{p:?}"
    );
    assert_eq!(s.stage.record().outcome, "failed");
}

#[test]
fn unsupported_versions_fall_back_as_the_profile_says() {
    // A TLS 1.3-only profile against a TLS 1.2-only server: excluded.
    let kit = Kit::new(Profile {
        min_version: crate::policy::TlsVersion::Tls13,
        unsupported: Fallback::NoDecrypt,
        ..Profile::default()
    });
    let (chain, key) = kit.server_cert(&[NAME], 30);
    let server = Arc::new(
        ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS12])
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap(),
    );
    let mut s = Session::start(&kit, kit.client_config(&[]), NAME, server);
    s.run();
    let r = s.stage.record();
    assert_eq!(r.outcome, "no-decrypt", "{r:?}");
    assert_eq!(kit.ctx.exclusions.list().len(), 1);
}

/// The ClientHello the engine sends upstream, as the server reads it.
fn upstream_hello(kit: &Kit, alpn: &[&[u8]]) -> crate::tls::hello::ClientHello {
    let server = kit.server_config(&[NAME], 30, &[]);
    let mut s = Session::start(kit, kit.client_config(alpn), NAME, server);
    s.stage
        .pump(&mut s.cpipe, &mut s.spipe, &mut s.relayed, s.now);
    let mut scanner = crate::tls::hello::HelloScanner::default();
    match scanner.feed(&s.spipe.tx) {
        Some(crate::tls::hello::Hello::Tls(ch)) => ch,
        other => panic!("no ClientHello upstream: {other:?}"),
    }
}

#[test]
fn the_upstream_hello_is_as_strong_as_a_current_browsers() {
    // Durumeric et al., "The Security Impact of HTTPS Interception" (NDSS
    // 2017), grade A: TLS 1.2+, only AEAD suites with forward secrecy, no
    // broken or weak algorithms offered; and a post-quantum hybrid first.
    use crate::tls::hello::{TLS12, TLS13};
    let kit = Kit::new(Profile::default());
    let ch = upstream_hello(&kit, &[b"h2", b"http/1.1"]);
    assert_eq!(ch.sni.as_deref(), Some(NAME));
    assert_eq!(ch.alpn, [b"h2".to_vec(), b"http/1.1".to_vec()]);
    assert_eq!(ch.versions, [TLS13, TLS12]);
    assert_eq!(ch.groups.first(), Some(&0x11ec), "X25519MLKEM768 first");
    for suite in &ch.suites {
        let name = rustls::CipherSuite::from(*suite);
        let n = format!("{name:?}");
        let aead = n.contains("GCM") || n.contains("CHACHA20_POLY1305");
        let pfs = n.starts_with("TLS13_") || n.contains("ECDHE");
        assert!((aead && pfs) || *suite == 0x00ff, "weak suite offered: {n}");
    }
    // No SHA-1 or MD5 signatures accepted.
    for scheme in &ch.sig_schemes {
        let n = format!("{:?}", rustls::SignatureScheme::from(*scheme));
        assert!(!n.contains("SHA1") && !n.contains("MD5"), "{n}");
    }
}

#[test]
fn a_profile_limits_what_the_upstream_hello_offers() {
    use crate::tls::hello::TLS13;
    let kit = Kit::new(Profile {
        min_version: crate::policy::TlsVersion::Tls13,
        suites: vec!["TLS13_AES_256_GCM_SHA384".into()],
        groups: vec!["X25519".into()],
        ..Profile::default()
    });
    let ch = upstream_hello(&kit, &[]);
    assert_eq!(ch.versions, [TLS13]);
    assert_eq!(ch.groups, [0x001d]);
    assert!(
        ch.suites.iter().all(|s| *s == 0x1302 || *s == 0x00ff),
        "{:?}",
        ch.suites
    );
}

/// A profile whose trust store has gone (deleted after the policy was
/// checked) does not stop the policy: the profile is broken, saying why,
/// and never replaced by the default profile; the other profiles work.
#[test]
fn a_profile_that_cannot_be_prepared_is_broken_not_replaced() {
    let kit = Kit::new(Profile::default());
    let mut policy = crate::policy::Policy::split_all(&[443], Vec::new());
    policy.profiles.insert(
        "gone".into(),
        Profile {
            trust_store: Some("/nonexistent/loupe/roots.pem".into()),
            ..Profile::default()
        },
    );
    policy.profiles.insert("fine".into(), Profile::default());
    let broken = kit.ctx.prepare(&policy);
    assert_eq!(broken.len(), 1, "{broken:?}");
    assert!(broken[0].contains("\"gone\""), "{broken:?}");
    let e = kit.ctx.runtime(Some("gone")).map(|_| ()).unwrap_err();
    assert!(e.contains("/nonexistent/loupe/roots.pem"), "{e}");
    assert!(kit.ctx.runtime(Some("fine")).is_ok());
    assert!(kit.ctx.runtime(None).is_ok());
}

/// A client that reads the engine's ServerHello and goes away: its record
/// says the connection failed in the client's handshake, and why, instead
/// of carrying no outcome at all.
#[test]
fn a_client_that_abandons_its_handshake_is_logged_as_failed() {
    let kit = Kit::new(Profile::default());
    let server = kit.server_config(&[NAME], 30, &[]);
    let mut s = Session::start(&kit, kit.client_config(&[]), NAME, server);
    // The client never answers the engine's flight...
    s.aborted.0 = true;
    s.run();
    assert!(!s.cpipe.tx.is_empty(), "the engine's ServerHello went out");
    assert_eq!(s.stage.record().outcome, "", "still handshaking");
    // ... and closes its TCP.
    s.cpipe.peer_fin = true;
    s.run();
    let failed = kit.ctx.stats.failed.load(Ordering::Relaxed);
    let r = s.stage.final_record();
    assert_eq!(r.outcome, "failed", "{r:?}");
    let e = r.error.expect("an error stage and reason");
    assert_eq!(e.stage, "downstream-handshake");
    assert!(
        e.reason.contains("before completing its handshake"),
        "{e:?}"
    );
    assert_eq!(kit.ctx.stats.failed.load(Ordering::Relaxed), failed + 1);
    // Once both sides are closed the stage asks for no timer: its
    // handshake deadline, left in the past, was once re-armed for ever (a
    // worker spinning in its timers, taking no new connection).
    if s.spipe.closed {
        s.spipe.peer_fin = true;
    }
    s.run();
    s.now += Duration::from_secs(31);
    s.run();
    assert!(
        s.stage.deadline().is_none_or(|d| d > s.now),
        "a deadline in the past: {:?}",
        s.stage.deadline().map(|d| s.now - d)
    );
}

/// `decrypt` rules without a profile use the default one, which must
/// enforce the policy's URL rules like every named profile (it once kept
/// the rule-less policy it was built with at start).
#[test]
fn the_default_profile_takes_the_policys_url_rules() {
    let kit = Kit::new(Profile::default());
    let mut policy = crate::policy::Policy::split_all(&[443], Vec::new());
    policy.url_rules.push(block_rule("no-secrets", "/secret/*"));
    assert!(kit.ctx.prepare(&policy).is_empty());
    let rt = kit.ctx.runtime(None).expect("default");
    assert!(
        rt.inspection.enforces_urls(),
        "default profile enforces URL rules"
    );
    // And a policy without them leaves the default without them.
    policy.url_rules.clear();
    assert!(kit.ctx.prepare(&policy).is_empty());
    assert!(!kit.ctx.runtime(None).unwrap().inspection.enforces_urls());
}

/// With a URL rule that blocks, HTTP/2 is still offered and a blocked
/// stream is refused on its own: the client gets the 403 on that stream,
/// the server never sees it, and the other stream completes.
#[test]
fn an_h2_stream_a_url_rule_blocks_is_refused_alone() {
    use loona_hpack::{Decoder, Encoder};

    use crate::inspect::http2::{frame, parse, PREFACE};
    let kit = kit_blocking("no-admin", "/admin/*");
    let server = kit.server_config(&[NAME], 30, &[b"h2"]);
    let mut s = Session::start(&kit, kit.client_config(&[b"h2", b"http/1.1"]), NAME, server);
    decrypts(&mut s);
    assert_eq!(s.client.alpn_protocol(), Some(&b"h2"[..]), "h2 stays");

    let mut enc = Encoder::new();
    let get = |enc: &mut Encoder, path: &str| {
        enc.encode([
            (&b":method"[..], &b"GET"[..]),
            (b":scheme", b"https"),
            (b":authority", NAME.as_bytes()),
            (b":path", path.as_bytes()),
        ])
    };
    let mut c = PREFACE.to_vec();
    c.extend(frame(0x4, 0, 0, &[]));
    c.extend(frame(0x1, 0x5, 1, &get(&mut enc, "/admin/users")));
    c.extend(frame(0x1, 0x5, 3, &get(&mut enc, "/shop")));
    s.client.writer().write_all(&c).unwrap();
    s.run();
    let up = s.server_read();
    let seen: Vec<u32> = parse(&up[PREFACE.len()..])
        .iter()
        .filter(|f| f.0 == 0x1)
        .map(|f| f.2)
        .collect();
    assert_eq!(seen, [3], "the server sees only the allowed stream");

    let mut senc = Encoder::new();
    let mut r = frame(0x4, 0, 0, &[]);
    r.extend(frame(
        0x1,
        0x4,
        3,
        &senc.encode([(&b":status"[..], &b"200"[..])]),
    ));
    r.extend(frame(0x0, 0x1, 3, b"welcome"));
    s.server.writer().write_all(&r).unwrap();
    s.run();
    let down = parse(&s.client_read());
    let mut dec = Decoder::new();
    let mut answers = Vec::new();
    for (kind, _, stream, payload) in &down {
        match kind {
            0x1 => {
                let mut status = Vec::new();
                dec.decode_with_cb(payload, |n, v| {
                    if &n[..] == b":status" {
                        status = v.into_owned();
                    }
                })
                .unwrap();
                answers.push((*stream, String::from_utf8(status).unwrap()));
            }
            0x0 => answers.push((*stream, String::from_utf8_lossy(payload).into_owned())),
            _ => {}
        }
    }
    assert_eq!(answers.len(), 4, "{answers:?}");
    assert_eq!(answers[0], (1, "403".into()));
    assert!(answers[1].1.contains("no-admin"), "the page names the rule");
    assert_eq!(answers[2..], [(3, "200".into()), (3, "welcome".into())]);
    assert_eq!(kit.ctx.stats.inspect_blocks.load(Ordering::Relaxed), 1);
    let r = s.stage.record();
    assert_eq!(r.outcome, "decrypted", "the connection goes on: {r:?}");
    assert!(r.error.is_none(), "{r:?}");
}

/// A connection the HTTP/2 enforcer cannot follow (here a CONNECT tunnel
/// while URL rules may block) ends with a GOAWAY the client can read,
/// then close_notify; the server is reset.
#[test]
fn an_h2_connection_the_enforcer_cannot_follow_ends_with_a_goaway() {
    use loona_hpack::Encoder;

    use crate::inspect::http2::{frame, parse, PREFACE};
    let kit = kit_blocking("no-admin", "/admin/*");
    let server = kit.server_config(&[NAME], 30, &[b"h2"]);
    let mut s = Session::start(&kit, kit.client_config(&[b"h2"]), NAME, server);
    decrypts(&mut s);
    s.server.writer().write_all(&frame(0x4, 0, 0, &[])).unwrap();
    s.run();
    let connect = Encoder::new().encode([
        (&b":method"[..], &b"CONNECT"[..]),
        (b":authority", b"elsewhere.test:443"),
    ]);
    let mut c = PREFACE.to_vec();
    c.extend(frame(0x4, 0, 0, &[]));
    c.extend(frame(0x1, 0x4, 1, &connect));
    s.client.writer().write_all(&c).unwrap();
    s.run();
    let down = parse(&s.client_read());
    let (kind, _, _, payload) = down.last().expect("frames for the client");
    assert_eq!(*kind, 0x7, "a GOAWAY last: {down:?}");
    assert_eq!(&payload[4..8], &[0, 0, 0, 1], "PROTOCOL_ERROR");
    assert!(s.client_closed, "then close_notify");
    let r = s.stage.record();
    assert!(
        r.error.as_ref().unwrap().reason.contains("CONNECT"),
        "{r:?}"
    );
}
