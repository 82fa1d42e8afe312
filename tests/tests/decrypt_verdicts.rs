//! What TLS interception makes of upstream server certificates, end to
//! end: broken ones (expired, not yet valid, wrong host, self-signed,
//! unknown root, missing or CA:false intermediate, SHA-1, RSA-1024) under
//! a profile that blocks them and one that passes the problem on to the
//! client; good ones of every key type and name shape, decrypted
//! byte-exact with the server's names mirrored; and the certificate
//! cache: a site's second connection (with a good certificate, and with an
//! expired one passed on), fifty simultaneous first connections, and a CA
//! rotation, counted in HSM signatures.
//!
//! Clients trust only Loupe's forward-trust CA (`Mitm::ca`); the decryption
//! profile trusts only the test PKI's root.

use std::{path::Path, time::Duration};

use loupe_dataplane::stats::TlsReport;
use loupe_tests::{
    harness::SERVER_V4,
    https::{curl_sha256, SERVER_NAME},
    mitm::Mitm,
    pki::{Flaw, Key, Pki},
    verdicts::{
        client, issuer, not_before, s_client, sans, save_pem, HsmStall, Seen, Site, TlsRelay,
    },
    wait_until, HarnessConfig,
};
use serde_json::Value;

/// A policy decrypting port 443 and 8443-8460 with the profile `verdicts`,
/// whose every certificate problem gets `on_problem` (`block` or
/// `pass-on`), trusting the test PKI.
fn policy(pki: &Pki, on_problem: &str) -> String {
    format!(
        r#"[policy]
default_action = "no-decrypt"

[profiles.verdicts]
expired = "{on_problem}"
untrusted = "{on_problem}"
name_mismatch = "{on_problem}"
weak = "{on_problem}"
revoked = "{on_problem}"
trust_store = "{}"

[[rules]]
name = "decrypt-lab"
dst = ["198.18.0.0/24", "2001:2::/64"]
ports = [443, "8443-8460"]
action = "decrypt"
profile = "verdicts"
"#,
        pki.roots.display()
    )
}

/// One broken certificate: what the engine must call it.
struct Broken {
    flaw: Flaw,
    /// Names the site (`<tag>.loupe.test`) and its files.
    tag: &'static str,
    /// The record's verdict label.
    label: &'static str,
    /// Part of the record's verdict detail.
    detail: &'static str,
}

const BROKEN: [Broken; 9] = [
    Broken {
        flaw: Flaw::Expired,
        tag: "expired",
        label: "expired",
        detail: "expired",
    },
    Broken {
        flaw: Flaw::NotYetValid,
        tag: "not-yet-valid",
        label: "not-yet-valid",
        detail: "not yet valid",
    },
    Broken {
        flaw: Flaw::WrongHost,
        tag: "wrong-host",
        label: "name-mismatch",
        detail: "name mismatch",
    },
    Broken {
        flaw: Flaw::SelfSigned,
        tag: "self-signed",
        label: "untrusted",
        detail: "self-signed",
    },
    Broken {
        flaw: Flaw::UnknownRoot,
        tag: "unknown-root",
        label: "untrusted",
        detail: "untrusted: unknown",
    },
    Broken {
        flaw: Flaw::MissingIntermediate,
        tag: "missing-intermediate",
        label: "untrusted",
        detail: "untrusted: unknown issuer",
    },
    Broken {
        flaw: Flaw::IntermediateNotCa,
        tag: "intermediate-not-ca",
        label: "untrusted",
        detail: "not a CA",
    },
    Broken {
        flaw: Flaw::Sha1,
        tag: "sha1",
        label: "weak",
        detail: "SHA-1",
    },
    Broken {
        flaw: Flaw::Rsa1024,
        tag: "rsa1024",
        label: "weak",
        detail: "RSA-1024",
    },
];

/// First port of the sites with their own certificate.
const BASE_PORT: u16 = 8443;

/// One nginx per broken certificate, on BASE_PORT + its index.
fn broken_sites(m: &Mitm) -> Vec<Site> {
    BROKEN
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let name = format!("{}.loupe.test", b.tag);
            let cert = m
                .pki
                .leaf(b.tag, &[name.as_str()], Key::P256, b.flaw)
                .unwrap_or_else(|e| panic!("{} leaf: {e:#}", b.tag));
            Site::start(m, BASE_PORT + i as u16, &name, cert, true)
                .unwrap_or_else(|e| panic!("{} site: {e:#}", b.tag))
        })
        .collect()
}

/// Compares a record's field with what it must be; a difference goes to
/// `problems`.
fn expect(problems: &mut Vec<String>, what: &str, got: &Value, want: &str) {
    if got != want {
        problems.push(format!("{what} is {got}, not {want:?}"));
    }
}

/// What must hold of the record of a connection to a broken site: the
/// verdict names exactly the one problem, with its detail, about the
/// certificate the site presents.
fn expect_verdict(problems: &mut Vec<String>, b: &Broken, site: &Site, r: &Value) {
    let tls = &r["tls"];
    if tls["verdict"] != serde_json::json!([b.label]) {
        problems.push(format!(
            "verdict is {}, not [{:?}]",
            tls["verdict"], b.label
        ));
    }
    let detail = tls["verdict_detail"].to_string();
    if !detail.contains(b.detail) {
        problems.push(format!("verdict_detail {detail} lacks {:?}", b.detail));
    }
    expect(
        problems,
        "upstream_cert.sha256",
        &tls["upstream_cert"]["sha256"],
        &site.leaf_sha256,
    );
}

/// Runs `check` for each broken site; fails with every problem found, per
/// site, and the records.
fn for_each_broken(
    m: &Mitm,
    sites: &[Site],
    mut check: impl FnMut(&Broken, &Site, &mut Vec<String>),
) {
    let mut all = Vec::new();
    for (b, site) in BROKEN.iter().zip(sites) {
        let mut problems = Vec::new();
        check(b, site, &mut problems);
        if !problems.is_empty() {
            all.push(format!(
                "{} (port {}):\n    {}\n    records: {}",
                b.tag,
                site.port,
                problems.join("\n    "),
                serde_json::to_string(&site.all_records(m)).unwrap_or_default()
            ));
        }
    }
    assert!(
        all.is_empty(),
        "{} of {} broken certificates misjudged:\n{}",
        all.len(),
        BROKEN.len(),
        all.join("\n")
    );
}

/// The `i`-th record of a site (waiting for it), or why there is none.
fn nth_record(m: &Mitm, site: &Site, i: usize) -> Result<Value, String> {
    site.wait_records(m, i + 1)
        .map(|r| r[i].clone())
        .map_err(|e| format!("{e:#}"))
}

#[test]
fn broken_upstream_certificates_are_blocked_under_a_block_profile() {
    let m = Mitm::start(|pki| policy(pki, "block")).expect("setup");
    let sites = broken_sites(&m);
    for_each_broken(&m, &sites, |b, site, problems| {
        let path = format!("secret-{}", b.tag);
        let ran = client(&m, "curl", &site.curl_args(&m, &path)).expect("curl");
        if ran.ok() {
            problems.push(format!("curl got through: {}", ran.stdout));
        }
        if !ran.stderr.contains("alert access denied") {
            problems.push(format!(
                "curl did not fail with an access_denied alert: {}",
                ran.stderr.trim()
            ));
        }
        match nth_record(&m, site, 0) {
            Ok(r) => {
                let tls = &r["tls"];
                expect(problems, "outcome", &tls["outcome"], "blocked");
                expect(
                    problems,
                    "error.stage",
                    &tls["error"]["stage"],
                    "verification",
                );
                expect_verdict(problems, b, site, &r);
                if tls["plaintext_c2s"] != 0 {
                    problems.push(format!("plaintext_c2s is {}", tls["plaintext_c2s"]));
                }
            }
            Err(e) => problems.push(e),
        }
        // The record is written once the connection is over: a request
        // that reached nginx is in its log by now.
        let served = site.requests();
        if !served.is_empty() {
            problems.push(format!("the server got requests: {served:?}"));
        }
    });
}

/// The client saw an impersonation certificate signed by the
/// forward-untrust CA, and did not trust it.
fn expect_untrusted_view(problems: &mut Vec<String>, m: &Mitm, seen: &Seen, which: &str) {
    if seen.verified() {
        problems.push(format!("{which}: the client verified the chain"));
    }
    match &seen.leaf {
        Some(pem) => {
            let iss = save_pem(&m.h.dir, pem)
                .and_then(|p| issuer(&p))
                .unwrap_or_else(|e| format!("{e:#}"));
            if !iss.contains("Loupe Forward Untrust CA g1") {
                problems.push(format!(
                    "{which}: the client saw a certificate issued by {iss:?}, not by \
                     Loupe Forward Untrust CA g1"
                ));
            }
        }
        None => problems.push(format!(
            "{which}: no certificate (s_client exit {}: {})",
            seen.ran.status,
            seen.ran.stderr.trim()
        )),
    }
}

#[test]
fn broken_upstream_certificates_are_passed_on_signed_by_the_forward_untrust_ca() {
    let m = Mitm::start(|pki| policy(pki, "pass-on")).expect("setup");
    let sites = broken_sites(&m);
    for_each_broken(&m, &sites, |b, site, problems| {
        if b.flaw == Flaw::Rsa1024 {
            // A key too weak for its handshake signature to be verified
            // proves nothing about the server: there is nothing to pass
            // on, so it is blocked whatever the profile says, and the log
            // says why.
            let ran = client(&m, "curl", &site.curl_args(&m, "x")).expect("curl");
            if !ran.stderr.contains("alert access denied") {
                problems.push(format!("curl: {}", ran.stderr.trim()));
            }
            match nth_record(&m, site, 0) {
                Ok(r) => {
                    expect(problems, "outcome", &r["tls"]["outcome"], "blocked");
                    expect_verdict(problems, b, site, &r);
                    let reason = r["tls"]["error"]["reason"].to_string();
                    if !reason.contains("handshake failed") {
                        problems.push(format!("reason {reason} says nothing of the handshake"));
                    }
                }
                Err(e) => problems.push(e),
            }
            return;
        }
        // 1. A client that completes the handshake whatever it thinks of
        //    the certificate (openssl s_client) is shown the problem.
        match s_client(&m, site.port, &site.name, &m.ca) {
            Ok(seen) => expect_untrusted_view(problems, &m, &seen, "s_client (first)"),
            Err(e) => problems.push(format!("s_client: {e:#}")),
        }
        match nth_record(&m, site, 0) {
            Ok(r) => {
                let tls = &r["tls"];
                expect(
                    problems,
                    "s_client's outcome",
                    &tls["outcome"],
                    "decrypted-untrusted",
                );
                expect(problems, "s_client's ca", &tls["ca"], "forward-untrust/g1");
                expect_verdict(problems, b, site, &r);
            }
            Err(e) => problems.push(e),
        }
        // 2. curl, trusting Loupe's CA only, refuses it: a certificate
        //    error, never a trusted connection.
        let path = format!("secret-{}", b.tag);
        let ran = client(&m, "curl", &site.curl_args(&m, &path)).expect("curl");
        if ran.ok() {
            problems.push(format!("curl got through: {}", ran.stdout));
        }
        if !ran.stderr.contains("SSL certificate problem") {
            problems.push(format!(
                "curl did not fail on the certificate: {}",
                ran.stderr.trim()
            ));
        }
        match nth_record(&m, site, 1) {
            Ok(r) => {
                let tls = &r["tls"];
                // Refused by the client, as the profile intends.
                expect(problems, "curl's outcome", &tls["outcome"], "passed-on");
                expect(problems, "curl's ca", &tls["ca"], "forward-untrust/g1");
            }
            Err(e) => problems.push(e),
        }
        // 3. Refusing the passed-on certificate is what the client is
        //    meant to do: the next connection is still shown the problem
        //    by Loupe (not let through to the server undecrypted).
        match s_client(&m, site.port, &site.name, &m.ca) {
            Ok(seen) => expect_untrusted_view(problems, &m, &seen, "s_client (after curl)"),
            Err(e) => problems.push(format!("s_client: {e:#}")),
        }
        if !site.requests().is_empty() {
            problems.push(format!("the server got requests: {:?}", site.requests()));
        }
    });
}

#[test]
fn an_expired_certificate_passed_on_is_minted_once_then_served_from_the_cache() {
    let m = Mitm::start(|pki| policy(pki, "pass-on")).expect("setup");
    // Expired two minutes ago, and issued after Loupe's CAs were (`ca
    // init` dates them back): the impersonation certificate can mirror
    // its validity, expired too.
    let ca_from = not_before(&m.ca).expect("the CA's notBefore");
    let now = time::OffsetDateTime::now_utc();
    let (from, until) = (
        ca_from + time::Duration::minutes(1),
        now - time::Duration::minutes(2),
    );
    assert!(
        from < until,
        "Loupe's CA is too new ({ca_from}) for this test"
    );
    let name = "stale.loupe.test";
    let cert = m
        .pki
        .leaf_valid("stale", &[name], from, until)
        .expect("leaf");
    let site = Site::start(&m, 8443, name, cert, false).expect("nginx");

    for i in 0..2 {
        // s_client completes its handshake (curl would refuse the
        // certificate, and the site would be excluded).
        let seen = s_client(&m, site.port, name, &m.ca).expect("s_client");
        let mut problems = Vec::new();
        expect_untrusted_view(&mut problems, &m, &seen, "s_client");
        let r = nth_record(&m, &site, i).unwrap();
        expect(
            &mut problems,
            "outcome",
            &r["tls"]["outcome"],
            "decrypted-untrusted",
        );
        assert!(problems.is_empty(), "connection {i}: {problems:?}: {r}");
        assert_eq!(r["tls"]["verdict"], serde_json::json!(["expired"]), "{r}");
    }
    let records = site.records(&m);
    let cache: Vec<&Value> = records.iter().map(|r| &r["tls"]["cache"]).collect();
    assert_eq!(
        cache,
        ["miss", "hit"],
        "the second connection to the site was not served from the cache ({} HSM mint \
         signatures): {records:#?}",
        m.mints()
    );
    assert_eq!(
        barrier_mint(&m, &m.ca, 1),
        2,
        "the second connection to the site made an HSM signature"
    );
}

/// A good certificate: its key, names and the name asked for.
struct Good {
    tag: &'static str,
    key: Key,
    names: Vec<String>,
    sni: String,
}

#[test]
fn good_upstream_certificates_are_decrypted_with_their_names_mirrored() {
    let m = Mitm::start(|pki| policy(pki, "block")).expect("setup");
    let plain = |tag, key| Good {
        tag,
        key,
        names: vec![SERVER_NAME.to_string()],
        sni: SERVER_NAME.to_string(),
    };
    let mut many: Vec<String> = (0..99).map(|i| format!("san-{i:03}.loupe.test")).collect();
    many.push("many.loupe.test".into());
    let cases = [
        plain("rsa2048", Key::Rsa2048),
        plain("rsa4096", Key::Rsa4096),
        plain("p256", Key::P256),
        plain("p384", Key::P384),
        Good {
            tag: "wildcard",
            key: Key::P256,
            names: vec!["*.loupe.test".into()],
            sni: SERVER_NAME.into(),
        },
        Good {
            tag: "many-sans",
            key: Key::P256,
            names: many,
            sni: "many.loupe.test".into(),
        },
        Good {
            tag: "idn",
            key: Key::P256,
            names: vec!["xn--bcher-kva.loupe.test".into()],
            sni: "xn--bcher-kva.loupe.test".into(),
        },
    ];
    const LEN: usize = 1 << 20;
    let mut all = Vec::new();
    for (i, g) in cases.iter().enumerate() {
        let names: Vec<&str> = g.names.iter().map(String::as_str).collect();
        let cert = m
            .pki
            .leaf(g.tag, &names, g.key, Flaw::None)
            .unwrap_or_else(|e| panic!("{} leaf: {e:#}", g.tag));
        let upstream_sans = sans(&cert.cert).expect("the leaf's names");
        let want: Vec<String> = g.names.iter().map(|n| format!("DNS:{n}")).collect();
        assert_eq!(
            upstream_sans, want,
            "{}: the leaf's names as openssl reads them",
            g.tag
        );
        let site = Site::start(&m, BASE_PORT + i as u16, &g.sni, cert, false)
            .unwrap_or_else(|e| panic!("{} site: {e:#}", g.tag));
        let sha = site.nginx.add_file("blob", LEN, 11 + i as u64).unwrap();
        let mut problems = Vec::new();

        // Byte-exact through decryption.
        match curl_sha256(&m.h, &site.curl_args(&m, "blob")) {
            Ok((got, len)) if got == sha && len == LEN as u64 => {}
            Ok((got, len)) => problems.push(format!("curl got {len} bytes, sha256 {got}")),
            Err(e) => problems.push(format!("{e:#}")),
        }
        // The impersonation certificate: verified by a client trusting
        // Loupe's CA for the name asked, carrying the server's names.
        match s_client(&m, site.port, &g.sni, &m.ca) {
            Ok(seen) => {
                if !seen.verified() {
                    problems.push(format!(
                        "s_client did not verify: {:?} {}",
                        seen.verify,
                        seen.ran.stderr.trim()
                    ));
                }
                match seen.leaf.as_deref().map(|p| save_pem(&m.h.dir, p)) {
                    Some(Ok(path)) => {
                        let iss = issuer(&path).unwrap_or_default();
                        if !iss.contains("Loupe Forward Trust CA g1") {
                            problems.push(format!("issuer {iss:?}"));
                        }
                        let minted = sans(&path).unwrap_or_default();
                        if minted != upstream_sans {
                            problems.push(format!(
                                "the client saw names {minted:?}, the server's are \
                                 {upstream_sans:?}"
                            ));
                        }
                    }
                    _ => problems.push(format!("no certificate: {}", seen.ran.stderr.trim())),
                }
            }
            Err(e) => problems.push(format!("s_client: {e:#}")),
        }
        match site.wait_records(&m, 2) {
            Ok(records) => {
                for r in &records {
                    let tls = &r["tls"];
                    expect(&mut problems, "outcome", &tls["outcome"], "decrypted");
                    expect(&mut problems, "ca", &tls["ca"], "forward-trust/g1");
                    if tls.get("verdict").is_some() {
                        problems.push(format!("verdict {}", tls["verdict"]));
                    }
                    expect(
                        &mut problems,
                        "upstream_cert.sha256",
                        &tls["upstream_cert"]["sha256"],
                        &site.leaf_sha256,
                    );
                }
                if !records
                    .iter()
                    .any(|r| r["tls"]["plaintext_s2c"].as_u64() >= Some(LEN as u64))
                {
                    problems.push("no record carried the whole body".into());
                }
            }
            Err(e) => problems.push(format!("{e:#}")),
        }
        if !site.requests().iter().any(|l| l.contains("GET /blob")) {
            problems.push(format!("nginx logged no GET /blob: {:?}", site.requests()));
        }
        if !problems.is_empty() {
            all.push(format!(
                "{} (port {}): {}\n    records: {}",
                g.tag,
                site.port,
                problems.join("\n    "),
                serde_json::to_string(&site.all_records(&m)).unwrap_or_default()
            ));
        }
    }
    assert!(
        all.is_empty(),
        "{} of {} good certificates mishandled:\n{}",
        all.len(),
        cases.len(),
        all.join("\n")
    );
}

/// curl arguments trusting `ca` instead.
fn with_ca(mut args: Vec<String>, ca: &Path) -> Vec<String> {
    let i = args.iter().position(|a| a == "--cacert").expect("--cacert");
    args[i + 1] = ca.display().to_string();
    args
}

/// A good site for the cache tests.
fn good_site(m: &Mitm, tag: &str, port: u16, name: &str) -> Site {
    let cert = m
        .pki
        .leaf(tag, &[name], Key::P256, Flaw::None)
        .expect("leaf");
    Site::start(m, port, name, cert, false).expect("nginx")
}

/// One connection to a site no connection went to yet, then waits until
/// the HSM audit log shows `before + 1` mint signatures; returns the count
/// then. Signatures are audited in the order they are made, so one made
/// earlier for another connection is in the log by then too.
fn barrier_mint(m: &Mitm, ca: &Path, before: usize) -> usize {
    let site = good_site(m, "barrier", 8460, "barrier.loupe.test");
    let ran = client(m, "curl", &with_ca(site.curl_args(m, ""), ca)).expect("curl");
    assert!(ran.ok(), "curl to the barrier site: {}", ran.stderr);
    wait_until(
        "the barrier site's signature in the audit log",
        Duration::from_secs(60),
        || {
            let n = m.mints();
            if n > before {
                Ok(Some(n))
            } else {
                Err(format!("{n} mints"))
            }
        },
    )
    .unwrap()
}

/// The engine's TLS counters once they show `minted` mints and no
/// connection in the TLS stage (the stats file lags the audit log).
fn settled_stats(m: &Mitm, minted: u64) -> TlsReport {
    m.engine
        .wait_stats("the TLS counters", Duration::from_secs(30), |r| {
            r.tls
                .clone()
                .filter(|t| t.minted >= minted && t.active == 0)
        })
        .unwrap()
}

#[test]
fn a_sites_second_connection_is_served_from_the_cache_without_a_signature() {
    let m = Mitm::start(|pki| policy(pki, "block")).expect("setup");
    let site = good_site(&m, "cached", 443, SERVER_NAME);
    let first = client(&m, "curl", &site.curl_args(&m, "")).expect("curl");
    assert!(first.ok(), "first connection: {}", first.stderr);
    let r = nth_record(&m, &site, 0).unwrap();
    assert_eq!(r["tls"]["cache"], "miss", "{r}");
    wait_until("the first mint audited", Duration::from_secs(60), || {
        Ok((m.mints() >= 1).then_some(()))
    })
    .unwrap();

    let second = client(&m, "curl", &site.curl_args(&m, "")).expect("curl");
    assert!(second.ok(), "second connection: {}", second.stderr);
    let r = nth_record(&m, &site, 1).unwrap();
    assert_eq!(r["tls"]["outcome"], "decrypted", "{r}");
    assert_eq!(r["tls"]["cache"], "hit", "{r}");

    // Two signatures in all once the barrier site's is in: its own and
    // the first connection's.
    assert_eq!(
        barrier_mint(&m, &m.ca, 1),
        2,
        "the second connection made an HSM signature"
    );
    let tls = settled_stats(&m, 2);
    assert_eq!(
        (tls.minted, tls.cache_misses, tls.cache_hits),
        (2, 2, 1),
        "{tls:?}"
    );
}

#[test]
fn fifty_simultaneous_first_connections_to_a_site_make_one_signature() {
    const N: usize = 50;
    const NAME: &str = "crowd.loupe.test";
    // The HSM is held still below for as long as the fifty connections
    // take to ask for their certificate: the signer must wait that long.
    let m = Mitm::start_with(
        HarnessConfig::default(),
        &["--hsm-timeout-ms", "120000"],
        |pki| policy(pki, "block"),
    )
    .expect("setup");
    // nginx on 8459 behind a relay on 443 that sees when the engine has
    // finished each upstream handshake (and so looked the certificate up).
    let site = good_site(&m, "crowd", 8459, NAME);
    site.nginx.add_file("page", 32 << 10, 5).unwrap();
    let relay = TlsRelay::start(
        &m.h,
        format!("{SERVER_V4}:443").parse().unwrap(),
        format!("{SERVER_V4}:8459").parse().unwrap(),
        N,
    )
    .expect("relay");
    assert_eq!(m.mints(), 0);

    // One curl, fifty transfers started at once on fifty connections (no
    // HTTP/2 multiplexing, no TLS session reuse between them).
    let mut args = m.curl_args(NAME, SERVER_V4, 443, "page");
    let url = args.pop().unwrap();
    args.extend(
        [
            "--http1.1",
            "--no-sessionid",
            "--parallel",
            "--parallel-immediate",
            "--parallel-max",
            "50",
            "-H",
            "Connection: close",
            "-w",
            "%{http_code} %{size_download}\\n",
        ]
        .map(String::from),
    );
    for _ in 0..N {
        args.extend(["-o".into(), "/dev/null".into(), url.clone()]);
    }
    // The first lookup's mint cannot finish until every connection has
    // looked its certificate up: they all meet one mint in flight.
    let stall = HsmStall::lock(&m.hsm.dir).expect("stall the HSM");
    let ran = std::thread::scope(|s| {
        let curl = s.spawn(|| client(&m, "curl", &args).expect("curl"));
        let met = wait_until(
            "every connection at its certificate lookup",
            Duration::from_secs(120),
            || {
                let (a, f) = (relay.accepted(), relay.finished());
                if f >= N {
                    Ok(Some(()))
                } else {
                    Err(format!("{a} connections, {f} upstream handshakes done"))
                }
            },
        );
        drop(stall);
        let ran = curl.join().expect("curl thread");
        met.unwrap();
        ran
    });
    let done = ran
        .stdout
        .lines()
        .filter(|l| *l == format!("200 {}", 32 << 10))
        .count();
    assert!(
        ran.ok() && done == N,
        "{done} of {N} transfers succeeded ({}): {}\n{}",
        ran.status,
        ran.stderr,
        ran.stdout
    );

    let records = wait_until(
        &format!("{N} records of {NAME}"),
        Duration::from_secs(90),
        || {
            let r: Vec<Value> = m
                .tls_records()
                .into_iter()
                .filter(|r| r["sni"] == NAME)
                .collect();
            if r.len() >= N {
                Ok(Some(r))
            } else {
                Err(format!("{} so far", r.len()))
            }
        },
    )
    .unwrap();
    let count = |what: &str| records.iter().filter(|r| r["tls"]["cache"] == what).count();
    let (miss, hit, joined) = (count("miss"), count("hit"), count("joined"));
    assert_eq!(records.len(), N, "{records:#?}");
    assert!(
        records.iter().all(|r| r["tls"]["outcome"] == "decrypted"),
        "{records:#?}"
    );
    // All fifty looked up while the one mint was in flight.
    assert_eq!(
        (miss, joined, hit),
        (1, N - 1, 0),
        "cache use of {N} simultaneous first connections: {records:#?}"
    );
    assert_eq!(
        barrier_mint(&m, &m.ca, 1),
        2,
        "{N} simultaneous first connections to one site made more than one signature"
    );
    let tls = settled_stats(&m, 2);
    assert_eq!(
        (tls.minted, tls.cache_misses, tls.cache_joined),
        (2, 2, N as u64 - 1),
        "{tls:?}"
    );
}

#[test]
fn a_ca_rotation_makes_the_next_connection_mint_under_the_new_ca() {
    let m = Mitm::start(|pki| policy(pki, "block")).expect("setup");
    let site = good_site(&m, "rotating", 443, SERVER_NAME);
    let verbose = |ca: &Path| {
        let mut args = vec!["-v".to_string(), "-o".into(), "/dev/null".into()];
        args.extend(with_ca(site.curl_args(&m, ""), ca));
        client(&m, "curl", &args).expect("curl")
    };

    let before = verbose(&m.ca);
    assert!(before.ok(), "{}", before.stderr);
    assert!(
        before
            .stderr
            .contains("issuer: CN=Loupe Forward Trust CA g1"),
        "{}",
        before.stderr
    );
    wait_until("the first mint audited", Duration::from_secs(60), || {
        Ok((m.mints() >= 1).then_some(()))
    })
    .unwrap();
    assert_eq!(m.mints(), 1);
    assert_eq!(
        m.engine.stats().unwrap().tls.map(|t| t.ca_generation),
        Some(1)
    );

    let rotate = m.hsm.loupe(&["ca", "rotate"]);
    assert!(
        rotate.status.success(),
        "loupe ca rotate: {}",
        String::from_utf8_lossy(&rotate.stderr)
    );
    // The engine re-reads the token's CAs every 10 s.
    m.engine
        .wait_stats(
            "the engine to use CA generation 2",
            Duration::from_secs(90),
            |r| r.tls.as_ref().filter(|t| t.ca_generation == 2).map(|_| ()),
        )
        .unwrap();
    let ca2 = m.h.dir.join("loupe-ca-g2.pem");
    let export = m
        .hsm
        .loupe(&["ca", "export", "--out", ca2.to_str().unwrap()]);
    assert!(
        export.status.success(),
        "loupe ca export: {}",
        String::from_utf8_lossy(&export.stderr)
    );

    let after = verbose(&ca2);
    assert!(after.ok(), "{}", after.stderr);
    assert!(
        after
            .stderr
            .contains("issuer: CN=Loupe Forward Trust CA g2"),
        "{}",
        after.stderr
    );
    let r = nth_record(&m, &site, 1).unwrap();
    assert_eq!(r["tls"]["ca"], "forward-trust/g2", "{r}");
    assert_eq!(r["tls"]["cache"], "miss", "{r}");
    wait_until("the second mint audited", Duration::from_secs(60), || {
        let n = m.mints();
        if n >= 2 {
            Ok(Some(()))
        } else {
            Err(format!("{n} mints"))
        }
    })
    .unwrap();
    // And no more than that one: the barrier site's makes three.
    assert_eq!(barrier_mint(&m, &ca2, 2), 3);
}
