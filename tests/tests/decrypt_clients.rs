//! TLS interception with real clients other than curl, and with server
//! setups other than the default nginx: the openssl CLI (TLS 1.3 and 1.2,
//! and an RSA-only client), Python's `ssl`, GnuTLS's `gnutls-cli`,
//! headless Chromium with Loupe's CA in its NSS store (and without it); a
//! TLS 1.2-only server, ALPN both ways, a server that asks for a client
//! certificate (excluded then bypassed, or blocked), and a `no-decrypt`
//! rule by server name in front of the decrypt rule.

use std::time::Duration;

use loupe_tests::{
    clients::{
        chromium_dump_dom, dn_attr, first_pem, http_get, http_response, line_after, nss_home,
        run_client, s_client, x509_text, Ran,
    },
    harness::{SERVER_V4, SERVER_V6},
    https::{Nginx, SERVER_NAME},
    mitm::{lab_policy, Mitm},
    pki::{Flaw, Key, Pki},
    wait_until,
};
use serde_json::Value;

/// What nginx serves at `/` (tests/src/https.rs).
const PAGE: &str = "loupe test page\n";
/// The forward-trust CAs `loupe ca init` makes: EC P-256 and its RSA
/// companion.
const TRUST_CA: &str = "Loupe Forward Trust CA g1";
const TRUST_CA_RSA: &str = "Loupe Forward Trust CA g1 RSA";
/// The test PKI's intermediate: the issuer of the servers' real
/// certificates.
const TEST_INTERMEDIATE: &str = "Loupe Test Intermediate";
const BANK: &str = "bank.loupe.test";

/// The lab policy (see [`lab_policy`]).
fn policy(pki: &Pki, profile_extra: &str, rules_before: &str) -> String {
    lab_policy(pki, profile_extra, rules_before)
}

fn decrypt_all(pki: &Pki) -> String {
    policy(pki, "", "")
}

/// nginx with a P-256 leaf from the test PKI for `names` (and the server
/// addresses), HTTP/2 or not, `extra` server-block directives.
fn server(m: &Mitm, names: &[&str], http2: bool, extra: &str) -> Nginx {
    let mut all = names.to_vec();
    all.extend([SERVER_V4, SERVER_V6]);
    let cert = m
        .pki
        .leaf("server", &all, Key::P256, Flaw::None)
        .expect("leaf");
    Nginx::start_with(&m.h, 443, cert, http2, extra).expect("nginx")
}

/// The flow log so far and the engine's TLS counters, for failure
/// messages: what the engine did.
fn evidence(m: &Mitm) -> String {
    let records: Vec<String> = m.control.records().iter().map(Value::to_string).collect();
    let tls = m.engine.stats().ok().and_then(|r| r.tls);
    format!(
        "--- flow log\n{}\n--- engine TLS counters\n{tls:?}",
        records.join("\n")
    )
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

/// Waits for the flow-log record of a connection that reached the TLS
/// stage with `outcome` and satisfying `f`.
fn tls_record(m: &Mitm, outcome: &str, f: impl Fn(&Value) -> bool) -> Value {
    m.control
        .wait_record(&format!("a TLS record with outcome {outcome}"), |r| {
            r["tls"]["outcome"] == outcome && f(r)
        })
        .unwrap()
}

/// Asserts what openssl s_client printed for a verified connection: exit
/// 0, verification OK, the leaf's subject and issuer CN, the protocol,
/// and nginx's page.
fn assert_s_client_ok(m: &Mitm, ran: &Ran, issuer_cn: &str, protocol: &str) {
    let all = format!("{}\n{}", ran.dump(), evidence(m));
    assert!(ran.status.success() && ran.in_time, "{all}");
    assert_eq!(
        line_after(&ran.stdout, "Verify return code:"),
        Some("0 (ok)"),
        "{all}"
    );
    let subject = line_after(&ran.stdout, "subject=").unwrap_or("");
    let issuer = line_after(&ran.stdout, "issuer=").unwrap_or("");
    // Every leaf here names SERVER_NAME first (the minted ones copy it).
    assert_eq!(
        dn_attr(subject, "CN").as_deref(),
        Some(SERVER_NAME),
        "{all}"
    );
    assert_eq!(dn_attr(issuer, "CN").as_deref(), Some(issuer_cn), "{all}");
    let new = line_after(&ran.stdout, "New, ").unwrap_or("");
    assert!(new.starts_with(&format!("{protocol}, ")), "{all}");
    assert_eq!(
        http_response(&ran.stdout),
        Some(("HTTP/1.1 200 OK".to_string(), PAGE.to_string())),
        "{all}"
    );
}

/// openssl s_client with `args`, trusting only Loupe's CA, GETs the page
/// from the server through decryption over `version`.
fn s_client_get(m: &Mitm, args: &[&str], version: &str) {
    let ran = s_client(
        &m.h,
        SERVER_V4,
        443,
        SERVER_NAME,
        &m.ca,
        args,
        &http_get(SERVER_NAME),
    )
    .unwrap();
    assert_s_client_ok(m, &ran, TRUST_CA, version);
}

/// openssl s_client through decryption with `flag` (`-tls1_3`,
/// `-tls1_2`), trusting only Loupe's CA.
fn s_client_through_decryption(flag: &str, version: &str) {
    let m = Mitm::start(decrypt_all).expect("setup");
    let _nginx = server(&m, &[SERVER_NAME], false, "");
    s_client_get(&m, &[flag], version);
    let r = tls_record(&m, "decrypted", |_| true);
    assert_eq!(r["action"], "decrypt", "{r}");
    assert_eq!(r["tls"]["client"]["version"], version, "{r}");
    assert_eq!(r["tls"]["ca"], "forward-trust/g1", "{r}");
    assert_eq!(r["tls"]["client"]["sni"], SERVER_NAME, "{r}");
}

#[test]
fn openssl_s_client_over_tls13_verifies_loupes_certificate_and_reads_the_page() {
    s_client_through_decryption("-tls1_3", "TLSv1.3");
}

#[test]
fn openssl_s_client_over_tls12_verifies_loupes_certificate_and_reads_the_page() {
    s_client_through_decryption("-tls1_2", "TLSv1.2");
}

/// A ClientHello of about 20 KiB (a long ALPN list) is more than Linux's
/// client sends before an ACK (ten segments): the engine acknowledges it
/// during the hold, and the connection is decrypted, not released at the
/// hold's deadline undecided.
#[test]
fn a_clienthello_beyond_the_initial_window_is_decrypted() {
    let m = Mitm::start(decrypt_all).expect("setup");
    let _nginx = server(&m, &[SERVER_NAME], false, "");
    let mut alpn: Vec<String> = (0..100)
        .map(|i| format!("x{i:03}{}", "y".repeat(196)))
        .collect();
    alpn.push("http/1.1".into());
    let alpn = alpn.join(",");
    s_client_get(&m, &["-tls1_3", "-alpn", &alpn], "TLSv1.3");
    let r = tls_record(&m, "decrypted", |_| true);
    assert_eq!(r["tls"]["client"]["sni"], SERVER_NAME, "{r}");
    // Decided on the whole ClientHello: every protocol it offered.
    assert_eq!(r["alpn"].as_array().map(Vec::len), Some(101), "{r}");
    // The stats file is rewritten periodically: wait for the ACKs to show.
    let split = m
        .engine
        .wait_stats("the hold's ACKs counted", Duration::from_secs(30), |s| {
            let t = s.split_total();
            (t.hold_acks > 0).then_some(t)
        })
        .unwrap();
    assert_eq!(split.hold_timeouts, 0, "{split:?}");
}

/// Python's ssl (the system Python) under http.client: default context
/// with Loupe's CA, host name checked; three requests on one kept-alive
/// connection (a GET, a GET of a missing page, a HEAD); prints what it
/// saw as JSON, with how many connections it opened.
const PYTHON_GET: &str = r#"
import http.client, json, socket, ssl, sys
cafile, name, addr = sys.argv[1], sys.argv[2], sys.argv[3]
ctx = ssl.create_default_context(cafile=cafile)

class Conn(http.client.HTTPSConnection):
    connects = 0
    def connect(self):
        # The name is checked and sent (SNI, Host); the address is dialled.
        raw = socket.create_connection((addr, 443), timeout=60)
        self.sock = ctx.wrap_socket(raw, server_hostname=name)
        self.connects += 1

c = Conn(name, 443, context=ctx, timeout=60)
seen = []
for method, path in [("GET", "/"), ("GET", "/nosuch.txt"), ("HEAD", "/")]:
    c.request(method, path)
    r = c.getresponse()
    body = r.read()
    seen.append([method, path, r.status, body.decode("latin-1")])
cert = c.sock.getpeercert()
print(json.dumps({
    "issuer": dict(rdn[0] for rdn in cert["issuer"]),
    "subject": dict(rdn[0] for rdn in cert["subject"]),
    "version": c.sock.version(),
    "responses": seen,
    "connections": c.connects,
}))
c.close()
"#;

/// Python's http.client makes three requests on one connection through
/// the engine, verifying Loupe's certificate; each request is a flow log
/// record of its own with its method, host, path and status, numbered in
/// order on that connection.
#[test]
fn python_ssl_verifies_loupes_certificate_and_reads_the_page() {
    let m = Mitm::start(decrypt_all).expect("setup");
    let _nginx = server(&m, &[SERVER_NAME], false, "");
    let args: Vec<String> = vec![
        "-c".into(),
        PYTHON_GET.into(),
        m.ca.display().to_string(),
        SERVER_NAME.into(),
        SERVER_V4.into(),
    ];
    let ran = run_client(
        &m.h,
        "/usr/bin/python3",
        &args,
        &[],
        None,
        Duration::from_secs(120),
    )
    .unwrap();
    let all = format!("{}\n{}", ran.dump(), evidence(&m));
    assert!(ran.status.success() && ran.in_time, "{all}");
    let seen: Value = serde_json::from_str(ran.stdout.trim()).expect(&all);
    assert_eq!(seen["issuer"]["commonName"], TRUST_CA, "{all}");
    assert_eq!(seen["subject"]["commonName"], SERVER_NAME, "{all}");
    assert_eq!(seen["version"], "TLSv1.3", "{all}");
    assert_eq!(seen["connections"], 1, "one kept-alive connection: {all}");
    // (method, path, status), and the page for the first.
    let want = [
        ("GET", "/", 200),
        ("GET", "/nosuch.txt", 404),
        ("HEAD", "/", 200),
    ];
    let got: Vec<(&str, &str, u64)> = seen["responses"]
        .as_array()
        .expect(&all)
        .iter()
        .map(|r| (s(&r[0]), s(&r[1]), r[2].as_u64().unwrap_or(0)))
        .collect();
    assert_eq!(got, want, "{all}");
    assert_eq!(seen["responses"][0][3], PAGE, "{all}");
    assert_eq!(seen["responses"][2][3], "", "HEAD has no body: {all}");
    let r = tls_record(&m, "decrypted", |_| true);
    assert_eq!(r["tls"]["client"]["version"], "TLSv1.3", "{r}");
    // Each request is a record of its own, on that one connection.
    let mut http = wait_until("Python's three requests", Duration::from_secs(60), || {
        let found: Vec<Value> = m
            .control
            .records()
            .into_iter()
            .filter(|r| r["record"] == "http")
            .collect();
        match found.len() >= want.len() {
            true => Ok(Some(found)),
            false => Err(format!("{found:#?}\n{}", evidence(&m))),
        }
    })
    .unwrap();
    assert_eq!(http.len(), want.len(), "{http:#?}");
    http.sort_by_key(|q| q["http"]["seq"].as_u64());
    for (i, (q, (method, path, status))) in http.iter().zip(want).enumerate() {
        let h = &q["http"];
        assert_eq!(q["conn"], r["conn"], "the decrypted connection's: {q}");
        assert_eq!(h["seq"], i as u64 + 1, "{q}");
        assert_eq!(h["method"], method, "{q}");
        assert_eq!(h["host"], SERVER_NAME, "{q}");
        assert_eq!(h["path"], path, "{q}");
        assert_eq!(h["status"], status, "{q}");
    }
}

#[test]
fn gnutls_cli_verifies_loupes_certificate_and_reads_the_page() {
    let m = Mitm::start(decrypt_all).expect("setup");
    let _nginx = server(&m, &[SERVER_NAME], false, "");
    let args: Vec<String> = vec![
        format!("--x509cafile={}", m.ca.display()),
        "--port=443".into(),
        format!("--sni-hostname={SERVER_NAME}"),
        format!("--verify-hostname={SERVER_NAME}"),
        SERVER_V4.into(),
    ];
    let ran = run_client(
        &m.h,
        "gnutls-cli",
        &args,
        &[],
        Some(&http_get(SERVER_NAME)),
        Duration::from_secs(120),
    )
    .unwrap();
    let all = format!("{}\n{}", ran.dump(), evidence(&m));
    assert!(ran.status.success() && ran.in_time, "{all}");
    assert_eq!(
        line_after(&ran.stdout, "- Status:"),
        Some("The certificate is trusted."),
        "{all}"
    );
    assert!(ran.stdout.contains("- Handshake was completed"), "{all}");
    // "- subject `CN=server.loupe.test', issuer `CN=...,O=...', ..."
    let issuer = ran
        .stdout
        .split("issuer `")
        .nth(1)
        .and_then(|rest| rest.split('\'').next())
        .unwrap_or("");
    assert_eq!(dn_attr(issuer, "CN").as_deref(), Some(TRUST_CA), "{all}");
    assert_eq!(
        http_response(&ran.stdout),
        Some(("HTTP/1.1 200 OK".to_string(), PAGE.to_string())),
        "{all}"
    );
    // The engine closed cleanly (close_notify), as nginx did.
    assert!(
        ran.stdout.contains("Peer has closed the GnuTLS connection"),
        "{all}"
    );
    tls_record(&m, "decrypted", |r| {
        r["tls"]["client"]["sni"] == SERVER_NAME
    });
}

/// Headless Chromium trusting Loupe's CA (in its NSS store) dumping the
/// DOM of `path` on the harness server; with the evidence for failures.
/// It must finish in time.
fn chromium_trusting_loupe(m: &Mitm, path: &str) -> (loupe_tests::clients::Ran, String) {
    let home = m.h.dir.join("chromium-home");
    nss_home(&home, Some(&m.ca)).unwrap();
    let ran = chromium_dump_dom(
        &m.h,
        &home,
        SERVER_NAME,
        SERVER_V4,
        &format!("https://{SERVER_NAME}{path}"),
    )
    .unwrap();
    let all = format!("{}\n{}", ran.dump(), evidence(m));
    assert!(ran.in_time, "{all}");
    (ran, all)
}

#[test]
fn chromium_trusting_loupe_in_nss_loads_the_page_through_decryption() {
    let m = Mitm::start(decrypt_all).expect("setup");
    let _nginx = server(&m, &[SERVER_NAME], true, "");
    let (ran, all) = chromium_trusting_loupe(&m, "/");
    assert!(ran.stdout.contains(PAGE.trim_end()), "{all}");
    assert!(!ran.stderr.contains("ERR_CERT"), "{all}");
    let r = tls_record(&m, "decrypted", |_| true);
    assert_eq!(r["tls"]["client"]["sni"], SERVER_NAME, "{r}");
    assert_eq!(r["tls"]["client"]["alpn"], "h2", "{r}");
    assert_eq!(r["tls"]["ca"], "forward-trust/g1", "{r}");
}

/// Headless Chromium loading a page with sub-resources (a stylesheet, a
/// script, an image) over HTTP/2 through decryption: the flow log holds
/// a request record for each, with its method, host, path and status,
/// and the script ran (it writes into the page).
#[test]
fn chromium_loading_a_page_with_sub_resources_has_each_request_logged() {
    let m = Mitm::start(decrypt_all).expect("setup");
    let nginx = server(&m, &[SERVER_NAME], true, "");
    let root = &nginx.docroot;
    std::fs::write(
        root.join("page.html"),
        "<html><head><link rel=\"stylesheet\" href=\"/style.css\">\
         <script src=\"/app.js\"></script></head>\
         <body><img src=\"/dot.gif\"><p id=\"out\">waiting</p>\
         <script>run();</script></body></html>\n",
    )
    .unwrap();
    std::fs::write(root.join("style.css"), "p { color: teal; }\n").unwrap();
    std::fs::write(
        root.join("app.js"),
        "function run() { document.getElementById('out').textContent = 'ran through loupe'; }\n",
    )
    .unwrap();
    // A 1x1 GIF.
    std::fs::write(
        root.join("dot.gif"),
        b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;",
    )
    .unwrap();
    let (ran, all) = chromium_trusting_loupe(&m, "/page.html");
    assert!(
        ran.stdout.contains("ran through loupe"),
        "the script ran: {all}"
    );
    for path in ["/page.html", "/style.css", "/app.js", "/dot.gif"] {
        let r = m
            .control
            .wait_record(&format!("the request for {path}"), |r| {
                r["record"] == "http" && r["http"]["path"] == path
            })
            .unwrap();
        let q = &r["http"];
        assert_eq!(q["method"], "GET", "{r}");
        assert_eq!(q["host"], SERVER_NAME, "{r}");
        assert_eq!(q["status"], 200, "{r}");
    }
    // Over HTTP/2.
    let r = tls_record(&m, "decrypted", |_| true);
    assert_eq!(r["tls"]["client"]["alpn"], "h2", "{r}");
}

#[test]
fn chromium_without_loupes_ca_refuses_the_impersonation_certificate() {
    let m = Mitm::start(decrypt_all).expect("setup");
    let _nginx = server(&m, &[SERVER_NAME], true, "");
    let home = m.h.dir.join("chromium-home");
    nss_home(&home, None).unwrap();
    let ran = chromium_dump_dom(
        &m.h,
        &home,
        SERVER_NAME,
        SERVER_V4,
        &format!("https://{SERVER_NAME}/"),
    )
    .unwrap();
    let all = format!("{}\n{}", ran.dump(), evidence(&m));
    assert!(ran.in_time, "{all}");
    assert!(ran.stderr.contains("ERR_CERT_AUTHORITY_INVALID"), "{all}");
    assert!(!ran.stdout.contains(PAGE.trim_end()), "{all}");
    // What Chromium refused was Loupe's certificate: the engine took the
    // connection over and the client's handshake failed.
    let r = m
        .control
        .wait_record("the record of the refused impersonation", |r| {
            r["tls"]["error"]["stage"] == "downstream-handshake"
        })
        .unwrap();
    assert_eq!(r["tls"]["ca"], "forward-trust/g1", "{r}");
}

#[test]
fn an_rsa_only_client_gets_an_rsa_2048_leaf_from_the_rsa_companion_ca() {
    let m = Mitm::start(decrypt_all).expect("setup");
    let _nginx = server(&m, &[SERVER_NAME], false, "");
    let ran = s_client(
        &m.h,
        SERVER_V4,
        443,
        SERVER_NAME,
        &m.ca,
        &[
            "-tls1_2",
            "-cipher",
            "ECDHE-RSA-AES128-GCM-SHA256",
            "-sigalgs",
            "RSA+SHA256:RSA-PSS+SHA256",
        ],
        &http_get(SERVER_NAME),
    )
    .unwrap();
    let all = format!("{}\n{}", ran.dump(), evidence(&m));
    assert_s_client_ok(&m, &ran, TRUST_CA_RSA, "TLSv1.2");
    assert!(
        line_after(&ran.stdout, "New, ")
            .unwrap_or("")
            .ends_with("Cipher is ECDHE-RSA-AES128-GCM-SHA256"),
        "{all}"
    );
    let leaf = x509_text(&m.h.dir, &first_pem(&ran.stdout).expect(&all)).unwrap();
    assert!(
        leaf.contains("Public Key Algorithm: rsaEncryption"),
        "{leaf}"
    );
    assert!(leaf.contains("Public-Key: (2048 bit)"), "{leaf}");
    let r = tls_record(&m, "decrypted", |_| true);
    assert_eq!(r["tls"]["ca"], "forward-trust-rsa/g1", "{r}");
    assert_eq!(r["tls"]["client"]["version"], "TLSv1.2", "{r}");
}

/// curl through decryption trusting Loupe's CA, with `extra` options and
/// `-w` printing the HTTP version after the body; returns (body, version).
fn curl_page(m: &Mitm, extra: &[&str]) -> (String, String) {
    let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    args.extend(["-w".into(), "\n%{http_version}".into()]);
    args.extend(m.curl_server(""));
    let ran = run_client(&m.h, "curl", &args, &[], None, Duration::from_secs(150)).unwrap();
    assert!(ran.status.success(), "{}\n{}", ran.dump(), evidence(m));
    let (body, version) = ran.stdout.rsplit_once('\n').expect("curl -w output");
    (body.to_string(), version.to_string())
}

#[test]
fn a_tls12_only_server_is_decrypted_with_tls12_on_the_server_leg() {
    let m = Mitm::start(decrypt_all).expect("setup");
    let _nginx = server(&m, &[SERVER_NAME], false, "ssl_protocols TLSv1.2;");
    let (body, _) = curl_page(&m, &[]);
    assert_eq!(body, PAGE);
    let r = tls_record(&m, "decrypted", |_| true);
    assert_eq!(r["tls"]["server"]["version"], "TLSv1.2", "{r}");
    assert_eq!(r["action"], "decrypt", "{r}");
}

#[test]
fn alpn_h2_is_negotiated_end_to_end_with_an_http2_server() {
    let m = Mitm::start(decrypt_all).expect("setup");
    let _nginx = server(&m, &[SERVER_NAME], true, "");
    let (body, version) = curl_page(&m, &["--http2"]);
    assert_eq!((body.as_str(), version.as_str()), (PAGE, "2"));
    let r = tls_record(&m, "decrypted", |_| true);
    assert_eq!(r["tls"]["client"]["alpn"], "h2", "{r}");
    assert_eq!(r["tls"]["server"]["alpn"], "h2", "{r}");
}

#[test]
fn alpn_falls_back_to_http11_on_both_legs_when_the_server_has_no_http2() {
    let m = Mitm::start(decrypt_all).expect("setup");
    let _nginx = server(&m, &[SERVER_NAME], false, "");
    let (body, version) = curl_page(&m, &["--http2"]);
    assert_eq!((body.as_str(), version.as_str()), (PAGE, "1.1"));
    let r = tls_record(&m, "decrypted", |_| true);
    // curl offered h2; the server took http/1.1, and so did the client.
    assert!(
        r["alpn"]
            .as_array()
            .is_some_and(|a| a.iter().any(|p| p == "h2")),
        "{r}"
    );
    assert_eq!(r["tls"]["server"]["alpn"], "http/1.1", "{r}");
    assert_eq!(r["tls"]["client"]["alpn"], "http/1.1", "{r}");
}

/// Asks nginx to request a client certificate (any, none is fine too).
const ASK_CLIENT_CERT: &str = "ssl_verify_client optional_no_ca;";

#[test]
fn a_server_asking_for_a_client_certificate_is_excluded_then_bypassed_in_xdp() {
    // The profile's client_auth is left at its default, no-decrypt.
    let m = Mitm::start(decrypt_all).expect("setup");
    let _nginx = server(&m, &[SERVER_NAME], false, ASK_CLIENT_CERT);

    // The first connection is taken over, then cannot go on: reset.
    let ran = run_client(
        &m.h,
        "curl",
        &m.curl_server(""),
        &[],
        None,
        Duration::from_secs(150),
    )
    .unwrap();
    assert!(!ran.status.success(), "{}\n{}", ran.dump(), evidence(&m));
    assert!(
        ran.stderr.contains("reset by peer"),
        "curl should see a reset: {}\n{}",
        ran.dump(),
        evidence(&m)
    );
    let r = tls_record(&m, "no-decrypt", |_| true);
    assert!(
        s(&r["tls"]["error"]["reason"]).contains("client certificate"),
        "{r}"
    );
    // The site is in the exclusion cache; the first connection was taken
    // over (counted before the next one starts, so that the counts below
    // compare like with like).
    let before = m
        .engine
        .wait_stats(
            "the site in the exclusion cache",
            Duration::from_secs(30),
            |r| {
                (r.tls.as_ref().is_some_and(|t| t.excluded == 1)
                    && r.split_total().intercepted == 1)
                    .then(|| r.clone())
            },
        )
        .unwrap();
    let tls = before.tls.clone().unwrap();
    assert_eq!(tls.exclusion_hits, 0, "{tls:?}");
    assert_eq!(before.split_total().not_decrypted, 0);

    // The next one is released unchanged to the XDP fast path: the client
    // sees the server's real certificate.
    let ran = s_client(
        &m.h,
        SERVER_V4,
        443,
        SERVER_NAME,
        &m.pki.roots,
        &[],
        &http_get(SERVER_NAME),
    )
    .unwrap();
    assert_s_client_ok(&m, &ran, TEST_INTERMEDIATE, "TLSv1.3");
    // The engine's own counters, per worker: passed by the policy stage,
    // as not decrypted, not taken over again; its packets crossed the XDP
    // fast path.
    m.engine
        .wait_stats("the bypass in the counters", Duration::from_secs(30), |r| {
            let (b, a) = (before.split_total(), r.split_total());
            (a.not_decrypted > b.not_decrypted
                && a.intercepted == b.intercepted
                && a.policy_pass > b.policy_pass
                && r.xdp_packets("flow_bypass") > before.xdp_packets("flow_bypass")
                && r.tls.as_ref().is_some_and(|t| t.exclusion_hits == 1))
            .then_some(())
        })
        .unwrap();
    let r = m
        .control
        .wait_record("the bypass record", |r| r["end"] == "bypass")
        .unwrap();
    assert_eq!(r["action"], "decrypt", "{r}");
    assert!(s(&r["note"]).contains("exclusion cache"), "{r}");
}

#[test]
fn client_auth_block_refuses_with_a_tls_alert() {
    let m = Mitm::start(|pki| policy(pki, r#"client_auth = "block""#, "")).expect("setup");
    let _nginx = server(&m, &[SERVER_NAME], false, ASK_CLIENT_CERT);
    let ran = run_client(
        &m.h,
        "curl",
        &m.curl_server(""),
        &[],
        None,
        Duration::from_secs(150),
    )
    .unwrap();
    assert_eq!(
        ran.status.code(),
        Some(35),
        "{}\n{}",
        ran.dump(),
        evidence(&m)
    );
    assert!(
        ran.stderr.contains("alert access denied"),
        "{}\n{}",
        ran.dump(),
        evidence(&m)
    );
    let r = tls_record(&m, "blocked", |_| true);
    assert!(
        s(&r["tls"]["error"]["reason"]).contains("client certificate"),
        "{r}"
    );
    // Blocked, not excluded: nothing goes into the exclusion cache.
    let tls = m
        .engine
        .wait_stats("the block in the counters", Duration::from_secs(30), |r| {
            r.tls.clone().filter(|t| t.blocked == 1)
        })
        .unwrap();
    assert_eq!(tls.exclusions_added, 0, "{tls:?}");
}

#[test]
fn a_no_decrypt_rule_by_server_name_shows_the_real_certificate_and_bypasses_xdp() {
    let bank_rule =
        format!("[[rules]]\nname = \"exempt-bank\"\nsni = [\"{BANK}\"]\naction = \"no-decrypt\"\n");
    let m = Mitm::start(|pki| policy(pki, "", &bank_rule)).expect("setup");
    let _nginx = server(&m, &[SERVER_NAME, BANK], false, "");

    // The bank: the server's own certificate, chained to the test PKI.
    let before = m.engine.stats().unwrap();
    let ran = s_client(
        &m.h,
        SERVER_V4,
        443,
        BANK,
        &m.pki.roots,
        &[],
        &http_get(BANK),
    )
    .unwrap();
    assert_s_client_ok(&m, &ran, TEST_INTERMEDIATE, "TLSv1.3");
    let r = m
        .control
        .wait_record("the bank's record", |r| r["sni"] == BANK)
        .unwrap();
    assert_eq!(r["action"], "no-decrypt", "{r}");
    assert_eq!(r["rule"], "exempt-bank", "{r}");
    assert_eq!(r["end"], "bypass", "{r}");
    assert!(r.get("tls").is_none(), "{r}");
    m.engine
        .wait_stats("the bypass in the counters", Duration::from_secs(30), |r| {
            let (b, a) = (before.split_total(), r.split_total());
            (a.policy_pass > b.policy_pass
                && a.intercepted == b.intercepted
                && r.xdp_packets("flow_bypass") > before.xdp_packets("flow_bypass"))
            .then_some(())
        })
        .unwrap();

    // The same server by its other name is decrypted: the rule, not the
    // server, made the difference.
    let ran = s_client(
        &m.h,
        SERVER_V4,
        443,
        SERVER_NAME,
        &m.ca,
        &[],
        &http_get(SERVER_NAME),
    )
    .unwrap();
    assert_s_client_ok(&m, &ran, TRUST_CA, "TLSv1.3");
    tls_record(&m, "decrypted", |r| r["sni"] == SERVER_NAME);
    wait_until(
        "one decrypted, one bypassed",
        Duration::from_secs(30),
        || {
            let recs = m.control.records();
            let bypassed = recs.iter().filter(|r| r["end"] == "bypass").count();
            let tls = recs.iter().filter(|r| r.get("tls").is_some()).count();
            if (bypassed, tls) == (1, 1) {
                Ok(Some(()))
            } else {
                Err(format!("{recs:?}"))
            }
        },
    )
    .unwrap();
}
