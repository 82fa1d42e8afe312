//! SSL inbound inspection end to end: the organisation's own servers
//! (nginx with an EC P-256 and an RSA-2048 certificate from the test PKI),
//! their keys imported into the SoftHSM token with `loupe key import`, and
//! `inbound-inspect` rules naming server profiles. Real clients (curl,
//! `openssl s_client` over TLS 1.3 and 1.2, Python's `ssl`, `gnutls-cli`)
//! trust only the test PKI, so a verified handshake shows they were given
//! the server's own certificate; the engine signed each full handshake on
//! the HSM (one audit record each) and none for a resumed one. The HSM
//! going away fails new handshakes with a handshake_failure alert and a
//! logged reason while a running transfer goes on, and inbound inspection
//! recovers by itself when it returns.

use std::{path::Path, process::Stdio, time::Duration};

use loupe_tests::{
    clients::{first_pem, http_get, http_response, line_after, run_client, s_client, Ran},
    harness::{SERVER_V4, SERVER_V6},
    https::{Nginx, ServerCert, SERVER_NAME},
    mitm::{Mitm, Options},
    pki::{Flaw, Key, Pki},
    proc::Proc,
    softhsm::SoftHsm,
    wait_until,
};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// What nginx serves at `/` (tests/src/https.rs).
const PAGE: &str = "loupe test page\n";
/// The audit log's purpose for a handshake signature.
const HANDSHAKE: &str = "TLS handshake signature (inbound inspection)";

/// Ports: the EC server, the RSA server, a server presenting another
/// certificate than its profile pins, a profile whose key is not on the
/// token.
const EC_PORT: u16 = 443;
const RSA_PORT: u16 = 8443;
const IMPOSTOR_PORT: u16 = 8444;
const NO_KEY_PORT: u16 = 8445;

fn leaf_of(pki: &Pki, tag: &str) -> ServerCert {
    ServerCert {
        cert: pki.dir.join(format!("{tag}.crt")),
        key: pki.dir.join(format!("{tag}.key")),
    }
}

/// Makes the servers' certificates, imports their keys into the token,
/// and returns the policy.
fn inbound_policy(pki: &Pki, hsm: &SoftHsm) -> anyhow::Result<String> {
    let names = [SERVER_NAME, SERVER_V4, SERVER_V6];
    for (tag, key) in [("web-ec", Key::P256), ("web-rsa", Key::Rsa2048)] {
        let c = pki.leaf(tag, &names, key, Flaw::None)?;
        let out = hsm.loupe(&["key", "import", "--label", tag, c.key.to_str().unwrap()]);
        anyhow::ensure!(
            out.status.success(),
            "loupe key import: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Valid, from the same PKI, but not the certificate the profile pins.
    pki.leaf("impostor", &names, Key::P256, Flaw::None)?;
    let chain = |tag: &str| leaf_of(pki, tag).cert.display().to_string();
    Ok(format!(
        r#"[policy]
default_action = "no-decrypt"

[server_profiles.web-ec]
chain = "{ec}"
key = "web-ec"

[server_profiles.web-rsa]
chain = "{rsa}"
key = "web-rsa"

[server_profiles.no-key]
chain = "{ec}"
key = "not-on-the-token"

[[rules]]
name = "inbound-ec"
dst = ["198.18.0.2/32", "2001:2::2/128"]
ports = [{EC_PORT}, {IMPOSTOR_PORT}]
action = "inbound-inspect"
server_profile = "web-ec"

[[rules]]
name = "inbound-rsa"
dst = ["198.18.0.2/32", "2001:2::2/128"]
ports = [{RSA_PORT}]
action = "inbound-inspect"
server_profile = "web-rsa"

[[rules]]
name = "inbound-no-key"
dst = ["198.18.0.2/32"]
ports = [{NO_KEY_PORT}]
action = "inbound-inspect"
server_profile = "no-key"
"#,
        ec = chain("web-ec"),
        rsa = chain("web-rsa"),
    ))
}

fn start(opts: Options) -> Mitm {
    Mitm::start_opts_hsm(opts, inbound_policy).expect("setup")
}

fn evidence(m: &Mitm) -> String {
    let records: Vec<String> = m.control.records().iter().map(Value::to_string).collect();
    let audit = std::fs::read_to_string(&m.hsm.audit_log).unwrap_or_default();
    format!(
        "--- flow log\n{}\n--- audit log\n{audit}",
        records.join("\n")
    )
}

/// Handshake signatures in the audit log, by key label on the token.
fn handshake_signatures(audit: &Path, key: &str) -> usize {
    let label = format!("loupe-server/{key}");
    std::fs::read_to_string(audit)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["kind"] == "sign" && r["purpose"] == HANDSHAKE && r["key"] == label)
        .count()
}

/// The first certificate of a PEM file, as PEM.
fn leaf_pem(path: &Path) -> String {
    first_pem(&std::fs::read_to_string(path).unwrap()).expect("a certificate")
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The leaf's DER SHA-256, as the flow log shows it.
fn leaf_sha256(path: &Path) -> String {
    let pem = leaf_pem(path);
    let b64: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<Vec<_>>()
        .concat();
    let der = base64_decode(&b64);
    sha256_hex(&der)
}

fn base64_decode(s: &str) -> Vec<u8> {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter(|c| *c != b'=') {
        let v = A.iter().position(|a| *a == c).expect("base64") as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

const PYTHON_GET: &str = r#"
import hashlib, json, socket, ssl, sys
cafile, name, addr, port, path = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
ctx = ssl.create_default_context(cafile=cafile)
with socket.create_connection((addr, port), timeout=60) as raw:
    with ctx.wrap_socket(raw, server_hostname=name, suppress_ragged_eofs=False) as s:
        s.sendall(("GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % (path, name)).encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        print(json.dumps({
            "cert_sha256": hashlib.sha256(s.getpeercert(binary_form=True)).hexdigest(),
            "version": s.version(),
            "status": head.split(b"\r\n")[0].decode(),
            "body_sha256": hashlib.sha256(body).hexdigest(),
        }))
"#;

/// The flow-log records of decrypted connections to `port`.
fn inbound_records(m: &Mitm, port: u16) -> Vec<Value> {
    let server = format!("{SERVER_V4}:{port}");
    m.control
        .records()
        .into_iter()
        .filter(|r| r["server"] == server.as_str() && r.get("tls").is_some())
        .collect()
}

fn openssl(m: &Mitm, port: u16, extra: &[&str]) -> Ran {
    s_client(
        &m.h,
        SERVER_V4,
        port,
        SERVER_NAME,
        &m.pki.roots,
        extra,
        &http_get(SERVER_NAME),
    )
    .unwrap()
}

/// Every client fetches from the EC and the RSA server through inbound
/// inspection: each verifies the server's own certificate against the
/// test PKI alone, bodies arrive byte-exact, the flow log says `inbound`
/// with the key's token and label, and the audit log holds one handshake
/// signature per full handshake.
#[test]
fn clients_fetch_through_inbound_inspection_with_the_servers_own_certificate() {
    let m = start(Options::default());
    for (port, tag, key_kind) in [
        (EC_PORT, "web-ec", "ec-p256"),
        (RSA_PORT, "web-rsa", "rsa-2048"),
    ] {
        let cert = leaf_of(&m.pki, tag);
        let leaf = leaf_pem(&cert.cert);
        let nginx = Nginx::start_with(&m.h, port, cert.clone(), true, "").expect("nginx");
        let body_sha = nginx.add_file("blob.bin", 1 << 20, 7).unwrap();
        let at =
            |what: &str, ran: &Ran| format!("{what} on {port}: {}\n{}", ran.dump(), evidence(&m));

        // curl, HTTP/2, trusting only the test PKI; the body hashed.
        let url = format!("https://{SERVER_NAME}:{port}/blob.bin");
        let resolve = format!("{SERVER_NAME}:{port}:{SERVER_V4}");
        let roots = m.pki.roots.display().to_string();
        let script = format!(
            "curl -sS --fail --max-time 120 --http2 --cacert '{roots}' --resolve '{resolve}' \
             -w '%{{http_version}}\\n' -o /dev/stdout '{url}' | head -c {len} | sha256sum; \
             curl -sS --fail --max-time 120 --http2 --cacert '{roots}' --resolve '{resolve}' \
             -o /dev/null -w '%{{http_version}}' '{url}'",
            len = 1 << 20
        );
        let ran = run_client(
            &m.h,
            "sh",
            &["-c".into(), script],
            &[],
            None,
            Duration::from_secs(180),
        )
        .unwrap();
        let all = at("curl", &ran);
        assert!(ran.status.success() && ran.in_time, "{all}");
        assert_eq!(
            ran.stdout.split_whitespace().next(),
            Some(body_sha.as_str()),
            "{all}"
        );
        assert!(ran.stdout.trim_end().ends_with('2'), "HTTP/2: {all}");

        // openssl s_client over TLS 1.3 and TLS 1.2: the certificate it
        // verified is the server's own, byte for byte.
        for version in ["-tls1_3", "-tls1_2"] {
            let ran = openssl(&m, port, &[version, "-showcerts"]);
            let all = at(version, &ran);
            assert!(ran.status.success() && ran.in_time, "{all}");
            assert_eq!(
                line_after(&ran.stdout, "Verification:"),
                Some("OK"),
                "{all}"
            );
            assert_eq!(
                first_pem(&ran.stdout).as_deref(),
                Some(leaf.as_str()),
                "{all}"
            );
            assert_eq!(
                http_response(&ran.stdout),
                Some(("HTTP/1.1 200 OK".to_string(), PAGE.to_string())),
                "{all}"
            );
        }

        // Python's ssl.
        let ran = run_client(
            &m.h,
            "/usr/bin/python3",
            &[
                "-c".into(),
                PYTHON_GET.into(),
                m.pki.roots.display().to_string(),
                SERVER_NAME.into(),
                SERVER_V4.into(),
                port.to_string(),
                "/blob.bin".into(),
            ],
            &[],
            None,
            Duration::from_secs(120),
        )
        .unwrap();
        let all = at("python", &ran);
        assert!(ran.status.success() && ran.in_time, "{all}");
        let seen: Value = serde_json::from_str(ran.stdout.trim()).expect(&all);
        assert_eq!(seen["cert_sha256"], leaf_sha256(&cert.cert), "{all}");
        assert_eq!(seen["status"], "HTTP/1.1 200 OK", "{all}");
        assert_eq!(seen["body_sha256"], body_sha.as_str(), "{all}");

        // gnutls-cli.
        let ran = run_client(
            &m.h,
            "gnutls-cli",
            &[
                format!("--x509cafile={}", m.pki.roots.display()),
                format!("--port={port}"),
                format!("--sni-hostname={SERVER_NAME}"),
                format!("--verify-hostname={SERVER_NAME}"),
                SERVER_V4.into(),
            ],
            &[],
            Some(&http_get(SERVER_NAME)),
            Duration::from_secs(120),
        )
        .unwrap();
        let all = at("gnutls-cli", &ran);
        assert!(ran.status.success() && ran.in_time, "{all}");
        assert_eq!(
            line_after(&ran.stdout, "- Status:"),
            Some("The certificate is trusted."),
            "{all}"
        );
        assert_eq!(
            http_response(&ran.stdout),
            Some(("HTTP/1.1 200 OK".to_string(), PAGE.to_string())),
            "{all}"
        );

        // Six connections (two curl, two openssl, Python, gnutls-cli),
        // each decrypted as inbound with the server's key, each a full
        // handshake signed once on the HSM.
        let recs = wait_until("six inbound records", Duration::from_secs(60), || {
            let recs = inbound_records(&m, port);
            if recs.len() >= 6 {
                Ok(Some(recs))
            } else {
                Err(evidence(&m))
            }
        })
        .unwrap();
        assert_eq!(recs.len(), 6, "{}", evidence(&m));
        for r in &recs {
            let t = &r["tls"];
            assert_eq!(r["action"], "inbound-inspect", "{r}");
            assert_eq!(t["mode"], "inbound", "{r}");
            assert_eq!(t["outcome"], "decrypted", "{r}");
            assert_eq!(t["server_key"], format!("{}/{tag}", m.hsm.token), "{r}");
            assert_eq!(t["upstream_cert"]["sha256"], leaf_sha256(&cert.cert), "{r}");
            assert_eq!(t["upstream_cert"]["key"], key_kind, "{r}");
            assert!(t.get("ca").is_none(), "{r}");
            assert_ne!(t["client"]["resumed"], true, "{r}");
        }
        assert_eq!(
            handshake_signatures(&m.hsm.audit_log, tag),
            6,
            "{}",
            evidence(&m)
        );
    }
    // The engine proved each key against its chain when the policy was
    // applied (one audited signature each), and the verifier of the audit
    // log accepts the whole chain of records.
    let log = m.hsm.audit_log.display().to_string();
    let verify = m.hsm.loupe(&["audit", "verify", "--allow-open-tail", &log]);
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
}

/// A returning client resumes (TLS 1.3 ticket, TLS 1.2 ticket or session
/// ID): no HSM operation.
#[test]
fn a_resumed_handshake_costs_no_hsm_signature() {
    let m = start(Options::default());
    let cert = leaf_of(&m.pki, "web-ec");
    let _nginx = Nginx::start_with(&m.h, EC_PORT, cert, false, "").expect("nginx");
    for version in ["-tls1_3", "-tls1_2"] {
        let sess = m.h.dir.join(format!("session{version}.pem"));
        let sess = sess.display().to_string();
        let before = handshake_signatures(&m.hsm.audit_log, "web-ec");
        let first = openssl(&m, EC_PORT, &[version, "-sess_out", &sess]);
        let all = format!("{}\n{}", first.dump(), evidence(&m));
        assert!(first.status.success() && first.in_time, "{all}");
        assert!(first.stdout.contains("New, TLSv1"), "{all}");
        wait_until(
            "the full handshake's signature",
            Duration::from_secs(30),
            || {
                let n = handshake_signatures(&m.hsm.audit_log, "web-ec");
                if n == before + 1 {
                    Ok(Some(()))
                } else {
                    Err(format!("{n} signatures, {before} before"))
                }
            },
        )
        .unwrap();
        let again = openssl(&m, EC_PORT, &[version, "-sess_in", &sess]);
        let all = format!("{}\n{}", again.dump(), evidence(&m));
        assert!(again.status.success() && again.in_time, "{all}");
        assert!(again.stdout.contains("Reused, TLSv1"), "{all}");
        assert_eq!(
            http_response(&again.stdout),
            Some(("HTTP/1.1 200 OK".to_string(), PAGE.to_string())),
            "{all}"
        );
        let resumed = m
            .control
            .wait_record("the resumed connection's record", |r| {
                r["tls"]["client"]["resumed"] == true
                    && r["tls"]["client"]["version"]
                        == if version == "-tls1_3" {
                            "TLSv1.3"
                        } else {
                            "TLSv1.2"
                        }
            })
            .unwrap();
        assert_eq!(resumed["tls"]["outcome"], "decrypted", "{resumed}");
        // Nothing more was signed for it.
        assert_eq!(
            handshake_signatures(&m.hsm.audit_log, "web-ec"),
            before + 1,
            "{all}"
        );
    }
}

/// A server presenting another certificate than the one its profile pins
/// is refused (access_denied to the client, nothing signed); a profile
/// whose key is not on the token cannot be used and its connections are
/// blocked with the reason.
#[test]
fn a_server_not_presenting_the_pinned_certificate_and_a_missing_key_are_blocked() {
    let m = start(Options::default());
    let impostor = leaf_of(&m.pki, "impostor");
    let _a = Nginx::start_with(&m.h, IMPOSTOR_PORT, impostor, false, "").expect("nginx");
    let _b =
        Nginx::start_with(&m.h, NO_KEY_PORT, leaf_of(&m.pki, "web-ec"), false, "").expect("nginx");
    let ran = openssl(&m, IMPOSTOR_PORT, &["-tls1_3"]);
    let all = format!("{}\n{}", ran.dump(), evidence(&m));
    assert!(!ran.status.success(), "{all}");
    assert!(ran.stderr.contains("access denied"), "{all}");
    let r = m
        .control
        .wait_record("the impostor's refusal", |r| {
            r["server"] == format!("{SERVER_V4}:{IMPOSTOR_PORT}").as_str()
                && r["tls"]["outcome"] == "blocked"
        })
        .unwrap();
    assert_eq!(r["tls"]["error"]["stage"], "verification", "{r}");
    let why = r["tls"]["error"]["reason"].as_str().unwrap_or("");
    assert!(why.contains("pins"), "{r}");
    assert_eq!(handshake_signatures(&m.hsm.audit_log, "web-ec"), 0, "{all}");

    let ran = openssl(&m, NO_KEY_PORT, &["-tls1_3"]);
    let all = format!("{}\n{}", ran.dump(), evidence(&m));
    assert!(!ran.status.success(), "{all}");
    let r = m
        .control
        .wait_record("the refusal for the missing key", |r| {
            r["server"] == format!("{SERVER_V4}:{NO_KEY_PORT}").as_str()
        })
        .unwrap();
    let note = r.to_string();
    assert!(
        note.contains("server profile \\\"no-key\\\" cannot be used"),
        "{r}"
    );
    assert!(note.contains("not-on-the-token"), "{r}");

    // `loupe policy apply` says so too: the policy applies (its other
    // rules are enforced), with a warning naming the profile and the key.
    let err = m.apply_again();
    assert!(
        err.lines().any(
            |l| l.starts_with("loupe-dataplane: warning: server profile \"no-key\"")
                && l.contains("not-on-the-token")
                && l.ends_with("its connections are blocked")
        ),
        "{err}"
    );
}

/// A rate-limited download of `file` (of `mib` MiB) from the EC server
/// through inbound inspection, running in the background: written to
/// `out` if given, then hashed (the SHA-256 is its stdout). Returns it
/// and the file's SHA-256, once the engine counts it decrypted.
fn background_download(
    m: &Mitm,
    nginx: &Nginx,
    mib: usize,
    rate: &str,
    out: &Path,
) -> (Proc, String) {
    let sha = nginx.add_file("big", mib << 20, 3).unwrap();
    let roots = m.pki.roots.display().to_string();
    let out = out.display();
    let script = format!(
        "curl -sS --fail --max-time 280 --limit-rate {rate} --cacert '{roots}' --resolve \
         '{SERVER_NAME}:{EC_PORT}:{SERVER_V4}' -o '{out}' 'https://{SERVER_NAME}:{EC_PORT}/big' \
         && sha256sum '{out}'"
    );
    let child =
        m.h.client
            .command("sh")
            .args(["-c", &script])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
    let slow = Proc::new("slow curl", child);
    m.engine
        .wait_stats("the download decrypted", Duration::from_secs(60), |r| {
            r.tls.as_ref().filter(|t| t.decrypted >= 1).map(|_| ())
        })
        .unwrap();
    (slow, sha)
}

/// The download finished, byte-exact.
fn finished_whole(mut slow: Proc, sha: &str) {
    let (status, in_time) = slow.wait_timeout(Duration::from_secs(300));
    let (stdout, err) = slow.take_output();
    assert!(status.success() && in_time, "{err}");
    assert_eq!(stdout.split_whitespace().next(), Some(sha), "{err}");
}

/// A new handshake refused for the HSM: handshake_failure to the client,
/// the reason in the record.
fn refused_for_the_hsm(m: &Mitm) {
    let ran = openssl(m, EC_PORT, &["-tls1_3"]);
    let all = format!("{}\n{}", ran.dump(), evidence(m));
    assert!(!ran.status.success(), "{all}");
    assert!(ran.stderr.contains("handshake failure"), "{all}");
    let r = m
        .control
        .wait_record("a refusal naming the HSM", |r| {
            r["tls"]["outcome"] == "failed"
                && r["tls"]["error"]["reason"]
                    .as_str()
                    .is_some_and(|e| e.contains("HSM"))
        })
        .unwrap();
    assert_eq!(r["tls"]["error"]["stage"], "downstream-handshake", "{r}");
}

/// New inbound handshakes succeed again (the HSM is back).
fn handshakes_again(m: &Mitm) {
    wait_until(
        "a new inbound handshake again",
        Duration::from_secs(120),
        || {
            let ran = openssl(m, EC_PORT, &["-tls1_3"]);
            if ran.status.success() && ran.stdout.contains("Verification: OK") {
                Ok(Some(()))
            } else {
                Err(ran.dump())
            }
        },
    )
    .unwrap();
}

/// The HSM goes away (its `p11-kit server` killed) while an inbound
/// download runs: the download goes on byte-exact, new handshakes get a
/// handshake_failure alert with the reason logged, and inbound inspection
/// recovers by itself when the HSM is back.
#[test]
fn an_hsm_outage_fails_new_inbound_handshakes_keeps_flows_and_recovers() {
    let mut m = start(Options {
        remote_hsm: true,
        ..Options::default()
    });
    let nginx =
        Nginx::start_with(&m.h, EC_PORT, leaf_of(&m.pki, "web-ec"), false, "").expect("nginx");
    let (slow, sha) = background_download(&m, &nginx, 64, "8M", &m.h.dir.join("big.out"));
    m.remote.as_mut().unwrap().down();
    refused_for_the_hsm(&m);
    m.remote.as_mut().unwrap().up().unwrap();
    handshakes_again(&m);
    finished_whole(slow, &sha);
}

/// The HSM hangs (its `p11-kit server` stopped with SIGSTOP: connections
/// stay open, nothing is answered) while an inbound download runs: the
/// download keeps moving through the freeze without a pause beyond
/// jitter (no packet worker waits for the HSM), new handshakes fail with
/// handshake_failure by the HSM deadline instead of hanging, and once the
/// HSM thaws they succeed again.
#[test]
fn a_frozen_hsm_stalls_no_running_flow_and_fails_new_handshakes_by_the_deadline() {
    let m = start(Options {
        remote_hsm: true,
        ..Options::default()
    });
    let nginx =
        Nginx::start_with(&m.h, EC_PORT, leaf_of(&m.pki, "web-ec"), false, "").expect("nginx");
    let out = m.h.dir.join("big.out");
    let (slow, sha) = background_download(&m, &nginx, 96, "4M", &out);
    let size = || std::fs::metadata(&out).map_or(0, |m| m.len());
    wait_until("the download under way", Duration::from_secs(60), || {
        if size() > 1 << 20 {
            Ok(Some(()))
        } else {
            Err(format!("{} bytes", size()))
        }
    })
    .unwrap();

    let remote = m.remote.as_ref().unwrap();
    remote.freeze(true);
    let frozen = std::time::Instant::now();
    let at_freeze = size();
    // A new handshake: refused by the deadline (2 s for the signature,
    // with margins), not left hanging.
    refused_for_the_hsm(&m);
    let took = frozen.elapsed();
    assert!(took < Duration::from_secs(15), "took {took:?}");
    // The download's progress, sampled through the freeze: it never
    // stands still for long (a worker waiting on the HSM would stop it for
    // the whole freeze).
    let mut last = (size(), std::time::Instant::now());
    let mut longest = Duration::ZERO;
    while frozen.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
        let now = (size(), std::time::Instant::now());
        if now.0 > last.0 {
            last = now;
        } else {
            longest = longest.max(now.1 - last.1);
        }
    }
    let moved = size() - at_freeze;
    remote.freeze(false);
    assert!(
        moved >= 8 << 20,
        "{moved} bytes in 10 s of HSM freeze: {}",
        evidence(&m)
    );
    assert!(
        longest < Duration::from_secs(3),
        "the download stood still for {longest:?} while the HSM was frozen"
    );
    handshakes_again(&m);
    finished_whole(slow, &sha);
}

/// Two more tenants in one engine, each with its own token and PIN:
/// `tenant-b` holds `web-b`; `tenant-c`'s PIN file is wrong. B's rule
/// signs on B's token (its audit records name it); a rule of the engine's
/// first tenant naming B's key label finds nothing on its own token and is
/// blocked, however the label is spelled elsewhere; C's wrong PIN leaves
/// B (and the engine) working, and C's connections fail with the reason.
#[test]
fn tenants_sign_only_with_their_own_tokens_and_a_wrong_pin_leaves_the_others_working() {
    let opts = Options {
        extra_tokens: vec![
            ("tenant-b".into(), "pin-b-1111".into(), "pin-b-1111".into()),
            ("tenant-c".into(), "pin-c-2222".into(), "wrong-9999".into()),
        ],
        ..Options::default()
    };
    let m = Mitm::start_opts_hsm(opts, |pki, hsm| {
        let names = [SERVER_NAME, SERVER_V4];
        for (tag, token) in [("web-b", "tenant-b"), ("web-c", "tenant-c")] {
            let c = pki.leaf(tag, &names, Key::P256, Flaw::None)?;
            let out = hsm.loupe_on(
                token,
                &["key", "import", "--label", tag, c.key.to_str().unwrap()],
            );
            anyhow::ensure!(
                out.status.success(),
                "loupe key import on {token}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let chain = |tag: &str| leaf_of(pki, tag).cert.display().to_string();
        Ok(format!(
            r#"[policy]
default_action = "no-decrypt"

[server_profiles.b]
chain = "{b}"
key = "web-b"
token = "tenant-b"

# The first tenant's profile, naming B's key label: its own token has none.
[server_profiles.a-borrows-b]
chain = "{b}"
key = "web-b"

[server_profiles.c]
chain = "{c}"
key = "web-c"
token = "tenant-c"

[[rules]]
name = "tenant-b"
dst = ["198.18.0.2/32"]
ports = [{EC_PORT}]
action = "inbound-inspect"
server_profile = "b"

[[rules]]
name = "tenant-a"
dst = ["198.18.0.2/32"]
ports = [{RSA_PORT}]
action = "inbound-inspect"
server_profile = "a-borrows-b"

[[rules]]
name = "tenant-c"
dst = ["198.18.0.2/32"]
ports = [{IMPOSTOR_PORT}]
action = "inbound-inspect"
server_profile = "c"
"#,
            b = chain("web-b"),
            c = chain("web-c"),
        ))
    })
    .expect("setup");
    let _servers: Vec<Nginx> = [
        (EC_PORT, "web-b"),
        (RSA_PORT, "web-b"),
        (IMPOSTOR_PORT, "web-c"),
    ]
    .into_iter()
    .map(|(port, tag)| Nginx::start_with(&m.h, port, leaf_of(&m.pki, tag), false, "").unwrap())
    .collect();

    // Tenant C's token is down with the reason; the others are up.
    let health = m
        .engine
        .wait_stats("tenant C reported down", Duration::from_secs(60), |r| {
            r.hsm
                .iter()
                .find(|h| h.token == "tenant-c" && !h.up)
                .cloned()
        })
        .unwrap();
    assert!(health.last_error.is_some(), "{health:?}");
    let stats = m.engine.stats().unwrap();
    for t in [m.hsm.token.as_str(), "tenant-b"] {
        assert!(
            stats.hsm.iter().any(|h| h.token == t && h.up),
            "{t}: {:?}",
            stats.hsm
        );
    }

    // Tenant B: its own key, on its own token.
    let ran = openssl(&m, EC_PORT, &["-tls1_3"]);
    let all = format!("{}\n{}", ran.dump(), evidence(&m));
    assert!(ran.status.success(), "{all}");
    assert_eq!(
        line_after(&ran.stdout, "Verification:"),
        Some("OK"),
        "{all}"
    );
    assert_eq!(
        first_pem(&ran.stdout).as_deref(),
        Some(leaf_pem(&leaf_of(&m.pki, "web-b").cert).as_str()),
        "{all}"
    );
    let r = m
        .control
        .wait_record("tenant B's connection", |r| {
            r["server"] == format!("{SERVER_V4}:{EC_PORT}").as_str() && r.get("tls").is_some()
        })
        .unwrap();
    assert_eq!(r["tls"]["server_key"], "tenant-b/web-b", "{r}");
    let audit = std::fs::read_to_string(&m.hsm.audit_log).unwrap();
    let signs: Vec<Value> = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["purpose"] == HANDSHAKE)
        .collect();
    assert_eq!(signs.len(), 1, "{audit}");
    assert_eq!(signs[0]["token"], "tenant-b", "{audit}");

    // Tenant A naming B's label: nothing on A's token, blocked.
    let ran = openssl(&m, RSA_PORT, &["-tls1_3"]);
    assert!(!ran.status.success(), "{}", ran.dump());
    let r = m
        .control
        .wait_record("tenant A's refusal", |r| {
            r["server"] == format!("{SERVER_V4}:{RSA_PORT}").as_str()
        })
        .unwrap();
    let text = r.to_string();
    assert!(
        text.contains("a-borrows-b") && text.contains(&format!("on token \\\"{}\\\"", m.hsm.token)),
        "{r}"
    );

    // Tenant C: its token is unavailable (wrong PIN); the handshake fails
    // with the reason, nothing is signed.
    let ran = openssl(&m, IMPOSTOR_PORT, &["-tls1_3"]);
    assert!(!ran.status.success(), "{}", ran.dump());
    assert!(ran.stderr.contains("handshake failure"), "{}", ran.dump());
    let r = m
        .control
        .wait_record("tenant C's refusal", |r| {
            r["server"] == format!("{SERVER_V4}:{IMPOSTOR_PORT}").as_str()
        })
        .unwrap();
    let why = r["tls"]["error"]["reason"].as_str().unwrap_or("");
    assert!(why.contains("tenant-c"), "{r}");
    // And B still works after C's failure.
    let ran = openssl(&m, EC_PORT, &["-tls1_3"]);
    assert!(ran.status.success(), "{}", ran.dump());
}

/// `loupe policy check --keys` looks each server profile's key up on the
/// token: a key that is not the certificate's, or is missing, is an
/// error at the `key` line; a profile on another token is a warning; the
/// right EC and RSA keys pass. Without `--keys` the file alone is
/// checked (and passes).
#[test]
fn policy_check_with_keys_finds_a_missing_or_mismatched_server_key() {
    let hsm = SoftHsm::new("keys").unwrap();
    let pki = Pki::new(&hsm.dir.join("pki")).unwrap();
    let names = [SERVER_NAME];
    let ec = pki.leaf("ec", &names, Key::P256, Flaw::None).unwrap();
    let rsa = pki.leaf("rsa", &names, Key::Rsa2048, Flaw::None).unwrap();
    let other = pki.leaf("other", &names, Key::P256, Flaw::None).unwrap();
    for (label, file) in [("ec", &ec.key), ("rsa", &rsa.key), ("mismatch", &other.key)] {
        let out = hsm.loupe(&["key", "import", "--label", label, file.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let policy = hsm.dir.join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            r#"[server_profiles.ec]
chain = "{ec}"
key = "ec"
[server_profiles.rsa]
chain = "{rsa}"
key = "rsa"
[server_profiles.mismatch]
chain = "{ec}"
key = "mismatch"
[server_profiles.missing]
chain = "{ec}"
key = "absent"
[server_profiles.elsewhere]
chain = "{ec}"
key = "ec"
token = "tenant-x"
"#,
            ec = ec.cert.display(),
            rsa = rsa.cert.display()
        ),
    )
    .unwrap();
    let file = policy.to_str().unwrap();
    let plain = hsm.loupe(&["policy", "check", file]);
    assert!(
        plain.status.success(),
        "{}",
        String::from_utf8_lossy(&plain.stderr)
    );
    let out = hsm.loupe(&["policy", "check", "--keys", file]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{err}");
    let at = |line: usize, severity: &str, what: &str| {
        let place = format!("{file}:{line}:7: {severity}: ");
        err.lines()
            .any(|l| l.starts_with(&place) && l.contains(what))
    };
    assert!(at(9, "error", "is not the key of the certificate"), "{err}");
    assert!(at(12, "error", "no server key \"absent\""), "{err}");
    assert!(at(15, "warning", "not checked"), "{err}");
    for line in [3, 6] {
        assert!(
            !err.contains(&format!("{file}:{line}:")),
            "line {line}: {err}"
        );
    }
}

/// With `--ticket-keys` the session ticket keys outlive the engine,
/// sealed in the file by the master key on the token (never in clear;
/// each seal and open in the audit log): a client resumes after an engine
/// restart, at no HSM signature.
#[test]
fn sealed_ticket_keys_let_a_client_resume_after_an_engine_restart() {
    let dir = std::env::temp_dir().join(format!("loupe-ticket-keys-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    struct Gone(std::path::PathBuf);
    impl Drop for Gone {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _gone = Gone(dir.clone());
    let file = dir.join("tickets.sealed");
    let mut m = start(Options {
        engine_args: vec!["--ticket-keys".into(), file.display().to_string()],
        ..Options::default()
    });
    let _nginx =
        Nginx::start_with(&m.h, EC_PORT, leaf_of(&m.pki, "web-ec"), false, "").expect("nginx");
    let sealed = std::fs::read(&file).unwrap();
    assert!(sealed.starts_with(b"LOUPESEAL1"), "{sealed:?}");

    let sess = m.h.dir.join("session.pem");
    let sess = sess.display().to_string();
    let first = openssl(&m, EC_PORT, &["-tls1_3", "-sess_out", &sess]);
    let all = format!("{}\n{}", first.dump(), evidence(&m));
    assert!(
        first.status.success() && first.stdout.contains("New, TLSv1"),
        "{all}"
    );
    wait_until(
        "the full handshake's signature",
        Duration::from_secs(30),
        || match handshake_signatures(&m.hsm.audit_log, "web-ec") {
            1 => Ok(Some(())),
            n => Err(format!("{n} signatures")),
        },
    )
    .unwrap();

    m.restart_engine().unwrap();
    let again = openssl(&m, EC_PORT, &["-tls1_3", "-sess_in", &sess]);
    let all = format!("{}\n{}", again.dump(), evidence(&m));
    assert!(again.status.success(), "{all}");
    assert!(again.stdout.contains("Reused, TLSv1.3"), "{all}");
    assert_eq!(
        http_response(&again.stdout),
        Some(("HTTP/1.1 200 OK".to_string(), PAGE.to_string())),
        "{all}"
    );
    assert_eq!(handshake_signatures(&m.hsm.audit_log, "web-ec"), 1, "{all}");

    // The master key's uses are on record: made once, the keys sealed at
    // the first start and opened (then sealed again) at the second.
    let audit = std::fs::read_to_string(&m.hsm.audit_log).unwrap();
    let of = |kind: &str, purpose: &str| {
        audit
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|r| r["kind"] == kind && r["purpose"] == purpose && r["result"] == "ok")
            .count()
    };
    assert!(of("wrap", "seal tls ticket keys") >= 2, "{audit}");
    assert_eq!(of("unwrap", "open tls ticket keys"), 1, "{audit}");
}

/// A server key replaced on the token after the policy was applied (the
/// old one deleted, a new one made under its label) signs for no
/// certificate: the handshake fails on the engine with the reason, not
/// blamed on the client, and nothing unverifiable reaches it.
#[test]
fn a_key_replaced_on_the_token_fails_handshakes_with_the_reason() {
    let m = start(Options::default());
    let _nginx =
        Nginx::start_with(&m.h, EC_PORT, leaf_of(&m.pki, "web-ec"), false, "").expect("nginx");
    let ok = openssl(&m, EC_PORT, &["-tls1_3"]);
    assert!(ok.status.success(), "{}", ok.dump());
    let pin = std::fs::read_to_string(&m.hsm.pin_file).unwrap();
    for kind in ["privkey", "pubkey"] {
        let out = m
            .hsm
            .command("pkcs11-tool")
            .args(["--module", "/usr/lib/softhsm/libsofthsm2.so"])
            .args([
                "--token-label",
                &m.hsm.token,
                "--login",
                "--pin",
                pin.trim(),
            ])
            .args([
                "--delete-object",
                "--type",
                kind,
                "--label",
                "loupe-server/web-ec",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = m
        .hsm
        .loupe(&["key", "generate", "--label", "web-ec", "--type", "ec-p256"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ran = openssl(&m, EC_PORT, &["-tls1_3"]);
    let all = format!("{}\n{}", ran.dump(), evidence(&m));
    assert!(!ran.status.success(), "{all}");
    assert!(ran.stderr.contains("handshake failure"), "{all}");
    let r = m
        .control
        .wait_record("the refusal naming the key", |r| {
            r["tls"]["outcome"] == "failed" && r["server"] == "198.18.0.2:443"
        })
        .unwrap();
    let why = r["tls"]["error"]["reason"].as_str().unwrap_or("");
    assert_eq!(r["tls"]["error"]["stage"], "downstream-handshake", "{r}");
    assert!(why.contains("web-ec"), "{r}");
    assert!(!why.contains("client's TLS"), "{r}");
}

/// SIGTERM reaches an engine whose HSM hangs (its `p11-kit server`
/// stopped) with a signature outstanding: it exits within seconds, not
/// when the HSM answers.
#[test]
fn the_engine_stops_promptly_while_its_hsm_hangs() {
    let mut m = start(Options {
        remote_hsm: true,
        ..Options::default()
    });
    let _nginx =
        Nginx::start_with(&m.h, EC_PORT, leaf_of(&m.pki, "web-ec"), false, "").expect("nginx");
    let up = m.engine.stats().unwrap().uptime_ms;
    m.remote.as_ref().unwrap().freeze(true);
    // A handshake whose signature the hung HSM holds.
    let ran = openssl(&m, EC_PORT, &["-tls1_3"]);
    assert!(!ran.status.success(), "{}", ran.dump());
    // The engine's own loop goes on past its CA refresh (every 10 s, a
    // call to the HSM): its report keeps being written.
    m.engine
        .wait_stats(
            "the engine's report past its CA refresh",
            Duration::from_secs(60),
            |r| (r.uptime_ms > up + 13_000).then_some(()),
        )
        .unwrap();
    let pid = m.engine.pid() as i32;
    let asked = std::time::Instant::now();
    // SAFETY: kill(2) on the engine this test started, not yet reaped.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let stopped = wait_until("the engine to exit", Duration::from_secs(60), || {
        if m.engine.alive() {
            Err("running".into())
        } else {
            Ok(Some(asked.elapsed()))
        }
    });
    m.remote.as_ref().unwrap().freeze(false);
    let took = stopped.unwrap();
    assert!(took < Duration::from_secs(20), "took {took:?}");
}
