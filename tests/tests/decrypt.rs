//! TLS interception end to end: real clients trusting only Loupe's
//! forward-trust CA fetch from nginx through the engine, whose `decrypt`
//! rule terminates TLS with an impersonation certificate minted in the
//! HSM, and re-encrypts toward the server.

use loupe_tests::{
    harness::{SERVER_V4, SERVER_V6},
    https::{curl_sha256, Nginx, SERVER_NAME},
    mitm::{lab_policy, Mitm},
    pki::{Flaw, Key},
    wait_until,
};
use serde_json::Value;

const MIB: usize = 1 << 20;

/// Everything the harness serves decrypted, the test PKI trusted.
fn decrypt_all(pki: &loupe_tests::pki::Pki) -> String {
    lab_policy(pki, "", "")
}

#[test]
fn curl_fetches_byte_exact_through_decryption_and_sees_loupes_certificate() {
    let m = Mitm::start(decrypt_all).expect("setup");
    let cert = m
        .pki
        .leaf(
            "server",
            &[SERVER_NAME, SERVER_V4, SERVER_V6],
            Key::P256,
            Flaw::None,
        )
        .unwrap();
    let nginx = Nginx::start_with(&m.h, 443, cert, true, "").expect("nginx");
    let sha = nginx.add_file("blob", 16 * MIB, 7).unwrap();

    // HTTP/2 (curl offers h2 and nginx takes it) and HTTP/1.1, IPv4 and IPv6.
    for (addr, extra) in [(SERVER_V4, "--http2"), (SERVER_V6, "--http1.1")] {
        let mut args = m.curl_args(SERVER_NAME, addr, 443, "blob");
        args.insert(0, extra.into());
        let (got, len) = curl_sha256(&m.h, &args).expect("curl through decryption");
        assert_eq!((got.as_str(), len), (sha.as_str(), 16 * MIB as u64));
    }

    // What the client saw: a chain to Loupe's CA, the server's name.
    let out = m
        .client(
            "curl",
            &[
                vec!["-v".into(), "-o".into(), "/dev/null".into()],
                m.curl_server(""),
            ]
            .concat(),
        )
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("issuer: CN=Loupe Forward Trust CA g1"),
        "{err}"
    );
    assert!(err.contains("subject: CN=server.loupe.test"), "{err}");

    // The decryption log.
    let r = m
        .control
        .wait_record("a decrypted connection's record", |r| {
            r["tls"]["outcome"] == "decrypted" && r["tls"]["client"]["alpn"] == "h2"
        })
        .unwrap();
    let tls = &r["tls"];
    assert_eq!(r["action"], "decrypt");
    assert_eq!(r["rule"], "decrypt-lab");
    assert_eq!(tls["profile"], "lab");
    assert_eq!(tls["server"]["alpn"], "h2");
    assert_eq!(tls["client"]["version"], "TLSv1.3");
    assert_eq!(tls["server"]["version"], "TLSv1.3");
    // The engine offers X25519MLKEM768 first; nginx's OpenSSL 3.0 has no
    // ML-KEM and takes X25519.
    assert_eq!(tls["server"]["group"], "X25519");
    assert_eq!(tls["ca"], "forward-trust/g1");
    assert!(tls["upstream_cert"]["subject"]
        .as_str()
        .unwrap()
        .contains("CN=server.loupe.test"));
    assert!(
        tls["plaintext_s2c"].as_u64().unwrap() >= 16 * MIB as u64,
        "{r}"
    );

    // One mint served every connection: later ones hit the cache.
    wait_until("three records", std::time::Duration::from_secs(60), || {
        let records = m.tls_records();
        let hits = records
            .iter()
            .filter(|r| r["tls"]["cache"] == "hit")
            .count();
        if records.len() >= 3 {
            Ok(Some(hits))
        } else {
            Err(format!("{records:#?}"))
        }
    })
    .map(|hits| assert_eq!(hits, 2))
    .unwrap();
    assert_eq!(m.mints(), 1, "one HSM signature for one site");
    let tls = m
        .engine
        .wait_stats(
            "the cache counters",
            std::time::Duration::from_secs(30),
            |r| r.tls.clone().filter(|t| t.cache_hits >= 2 && t.active == 0),
        )
        .unwrap();
    assert_eq!(
        (tls.minted, tls.cache_misses, tls.decrypted),
        (1, 1, 3),
        "{tls:?}"
    );
    // The metrics say the same.
    let metrics = m.control.metrics().unwrap();
    for line in [
        "loupe_tls_handshakes_total{outcome=\"decrypted\"} 3",
        "loupe_tls_cert_cache_total{result=\"hit\"} 2",
        "loupe_tls_cert_cache_total{result=\"miss\"} 1",
        "loupe_tls_mint_latency_seconds_count 1",
        "loupe_tls_parked 0",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }
}

#[test]
fn a_pinned_client_refusing_loupe_is_excluded_and_its_next_connection_passes() {
    let m = Mitm::start(decrypt_all).expect("setup");
    let cert = m
        .pki
        .leaf("server", &[SERVER_NAME], Key::P256, Flaw::None)
        .unwrap();
    let _nginx = Nginx::start_with(&m.h, 443, cert, false, "").expect("nginx");
    // A client that trusts only the server's own CA (a pinned app).
    let mut args = m.curl_server("");
    let i = args.iter().position(|a| a == "--cacert").unwrap();
    args[i + 1] = m.pki.roots.display().to_string();
    let out = m.client("curl", &args).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("unable to get local issuer certificate") || err.contains("self-signed"),
        "{err}"
    );
    let r = m
        .control
        .wait_record("the refused handshake", |r| {
            r["tls"]["outcome"] == "no-decrypt"
        })
        .unwrap();
    assert!(r["tls"]["error"]["reason"]
        .as_str()
        .unwrap()
        .contains("refused the certificate"));
    // It is in the exclusion cache, for this client, as the CLI lists it.
    let list = m.control.cli(&["decrypt", "exclusions", "--json"]).unwrap();
    assert!(list.status.success());
    let list: Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(list[0]["sni"], SERVER_NAME, "{list}");
    assert_eq!(list[0]["client"], "198.18.0.1", "{list}");
    // The next connection of the same client is released to the fast
    // path: the server's own certificate, which the pinned client takes.
    let before = m.engine.stats().unwrap().xdp_packets("flow_bypass");
    let out = m.client("curl", &args).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = m
        .control
        .wait_record("the passed connection", |r| r["end"] == "bypass")
        .unwrap();
    assert!(
        r["note"].as_str().unwrap().contains("exclusion cache"),
        "{r}"
    );
    m.engine
        .wait_stats(
            "packets on the fast path",
            std::time::Duration::from_secs(30),
            |r| (r.xdp_packets("flow_bypass") > before).then_some(()),
        )
        .unwrap();
    // Cleared, the site is decrypted again.
    let cleared = m
        .control
        .cli(&["decrypt", "exclusions", "--clear"])
        .unwrap();
    assert!(String::from_utf8_lossy(&cleared.stdout).contains("cleared 1"));
    let out = m.client("curl", &m.curl_server("")).unwrap();
    assert!(out.status.success());
}

#[test]
fn sessions_resume_toward_the_server_and_toward_a_returning_client() {
    let m = Mitm::start(decrypt_all).expect("setup");
    let cert = m
        .pki
        .leaf("server", &[SERVER_NAME], Key::P256, Flaw::None)
        .unwrap();
    let _nginx = Nginx::start_with(&m.h, 443, cert, false, "").expect("nginx");
    let sess = m.h.dir.join("client.session");
    let sess = sess.to_str().unwrap();
    let get = format!("GET / HTTP/1.1\r\nHost: {SERVER_NAME}\r\nConnection: close\r\n\r\n");
    for (i, flag) in ["-sess_out", "-sess_in"].iter().enumerate() {
        let ran = loupe_tests::clients::s_client(
            &m.h,
            SERVER_V4,
            443,
            SERVER_NAME,
            &m.ca,
            &[flag, sess],
            get.as_bytes(),
        )
        .unwrap();
        assert!(ran.status.success(), "{}", ran.dump());
        // The second time the client offers its ticket and the engine
        // takes it: no certificate, no mint lookup.
        assert_eq!(ran.stdout.contains("Reused,"), i == 1, "{}", ran.dump());
        assert!(ran.stdout.contains("loupe test page"), "{}", ran.dump());
    }
    let records = wait_until("both records", std::time::Duration::from_secs(60), || {
        let r = m.tls_records();
        if r.len() >= 2 {
            Ok(Some(r))
        } else {
            Err(format!("{r:?}"))
        }
    })
    .unwrap();
    // The engine resumes its own session with the server the second time,
    // and the returning client's session with it.
    assert_ne!(records[0]["tls"]["server"]["resumed"], true, "{records:#?}");
    assert_eq!(records[1]["tls"]["server"]["resumed"], true, "{records:#?}");
    assert_ne!(records[0]["tls"]["client"]["resumed"], true, "{records:#?}");
    assert_eq!(records[1]["tls"]["client"]["resumed"], true, "{records:#?}");
}

/// A profile's key log: both legs' secrets, each line sealed (the run's
/// data key sealed by the HSM's master key), so the file shows no secret;
/// `loupe keylog open` gives the NSS lines back (an audited unwrap) and
/// refuses a changed line. Turning it on is in the audit log.
#[test]
fn a_profile_with_a_key_log_writes_both_legs_secrets_sealed_and_audits_it() {
    let keylog = std::env::temp_dir().join(format!("loupe-keylog-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&keylog);
    let path = keylog.display().to_string();
    let m = Mitm::start(|pki| lab_policy(pki, &format!("keylog = \"{path}\""), "")).expect("setup");
    let cert = m
        .pki
        .leaf("server", &[SERVER_NAME], Key::P256, Flaw::None)
        .unwrap();
    let _nginx = Nginx::start_with(&m.h, 443, cert, false, "").expect("nginx");
    let out = m.client("curl", &m.curl_server("")).unwrap();
    assert!(out.status.success());
    // TLS 1.3, two handshakes (the client's leg and the server's): five
    // secrets each.
    let sealed = wait_until("the key log", std::time::Duration::from_secs(30), || {
        let t = std::fs::read_to_string(&keylog).unwrap_or_default();
        match t.lines().filter(|l| l.starts_with("R ")).count() {
            n if n >= 10 => Ok(Some(t)),
            _ => Err(t),
        }
    })
    .unwrap();
    let _ = std::fs::remove_file(&keylog);
    assert!(!sealed.contains("SECRET"), "{sealed}");
    let dir = std::env::temp_dir().join(format!("loupe-keylog-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("sealed.log");
    std::fs::write(&file, &sealed).unwrap();
    let opened = m.open_keylog(&file);
    assert!(opened.status.success(), "{opened:?}");
    let text = String::from_utf8(opened.stdout).unwrap();
    let randoms: std::collections::BTreeSet<&str> = text
        .lines()
        .filter(|l| l.starts_with("CLIENT_TRAFFIC_SECRET_0 "))
        .filter_map(|l| l.split(' ').nth(1))
        .collect();
    assert_eq!(randoms.len(), 2, "{text}");
    assert!(text.lines().all(|l| l.split(' ').count() == 3), "{text}");
    // --out: an existing file readable by others gets mode 0600 before
    // the secrets go in; the sealed log itself is never written over; a
    // FIFO is refused at once.
    use std::os::unix::fs::PermissionsExt;
    let out = dir.join("keys.txt");
    std::fs::write(&out, "old\n").unwrap();
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(m.open_keylog_to(&file, Some(&out)).status.success());
    assert_eq!(std::fs::read_to_string(&out).unwrap(), text);
    let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // Someone else's file, or another name for one, never gets them.
    let mine = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&out).unwrap());
    std::os::unix::fs::chown(&out, Some(65534), None).unwrap();
    let theirs = m.open_keylog_to(&file, Some(&out));
    assert!(!theirs.status.success());
    assert!(String::from_utf8_lossy(&theirs.stderr).contains("owned by uid 65534"));
    std::os::unix::fs::chown(&out, Some(mine), None).unwrap();
    let linked = dir.join("linked.txt");
    std::fs::hard_link(&out, &linked).unwrap();
    assert!(!m.open_keylog_to(&file, Some(&out)).status.success());
    std::fs::remove_file(&linked).unwrap();
    let same = m.open_keylog_to(&file, Some(&file));
    assert!(!same.status.success());
    assert!(String::from_utf8_lossy(&same.stderr).contains("is the sealed key log itself"));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), sealed);
    let fifo = dir.join("fifo");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let refused = m.open_keylog(&fifo);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not a regular file"));
    // One changed character in a sealed line: refused, naming the line,
    // nothing printed.
    let at = sealed.find("\nR ").unwrap() + 10;
    let mut changed = sealed.clone().into_bytes();
    changed[at] = if changed[at] == b'0' { b'1' } else { b'0' };
    std::fs::write(&file, &changed).unwrap();
    let refused = m.open_keylog(&file);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert!(refused.stdout.is_empty());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("line 3:"), "{err}");
    // Turning it on, and sealing its key, are in the engine's audit log;
    // opening it is in the CLI's.
    let audit = std::fs::read_to_string(&m.hsm.audit_log).unwrap();
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"kind\":\"key-log\"") && l.contains(&path)),
        "{audit}"
    );
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"kind\":\"wrap\"") && l.contains("seal tls key log")),
        "{audit}"
    );
    let cli = std::fs::read_to_string(m.keylog_cli_audit()).unwrap();
    assert!(
        cli.lines()
            .any(|l| l.contains("\"kind\":\"unwrap\"") && l.contains("open tls key log")),
        "{cli}"
    );
}

#[test]
fn quic_to_a_decrypted_destination_is_dropped_in_xdp_when_the_profile_says_so() {
    use std::net::UdpSocket;
    let m = Mitm::start(|pki| lab_policy(pki, "block_quic = true", "")).expect("setup");
    let server = |port: u16| {
        m.h.server
            .enter(move || UdpSocket::bind(format!("{SERVER_V4}:{port}")))
            .unwrap()
            .unwrap()
    };
    let (quic, other) = (server(443), server(8443));
    let client =
        m.h.client
            .enter(|| UdpSocket::bind("198.18.0.1:0"))
            .unwrap()
            .unwrap();
    // QUIC first, then the others: had QUIC not been dropped, it would
    // have arrived before them.
    for _ in 0..20 {
        client.send_to(b"quic initial", (SERVER_V4, 443)).unwrap();
    }
    for _ in 0..20 {
        client.send_to(b"not quic", (SERVER_V4, 8443)).unwrap();
    }
    other
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = other
        .recv_from(&mut buf)
        .expect("UDP to another port passes");
    assert_eq!(&buf[..n], b"not quic");
    quic.set_nonblocking(true).unwrap();
    assert!(
        quic.recv_from(&mut buf).is_err(),
        "a QUIC datagram got through"
    );
    let r = m
        .engine
        .wait_stats(
            "the drops counted",
            std::time::Duration::from_secs(30),
            |r| (r.xdp_packets("quic_drop") >= 20).then(|| r.clone()),
        )
        .unwrap();
    assert_eq!(r.xdp_packets("quic_drop"), 20);
    // The decrypt rule's destinations.
    assert_eq!(r.steering.quic_blocked, ["2001:2::/64", "198.18.0.0/24"]);
}
