//! Plaintext inspection of decrypted connections, end to end. Every
//! HTTP/1.1 request on a decrypted connection is a flow log record of its
//! own (method, host, path, status, content type, body sizes, its number
//! on the connection), tied to the connection's own record by `conn`. The
//! profile's signatures are looked for in the plaintext both ways, across
//! TLS records and TCP segments: a `block` signature resets the connection
//! before the whole pattern reaches the client, an `alert` one is logged
//! and the transfer completes. HTTP/2 streams are request records too,
//! and a URL rule that blocks refuses one stream alone (a 403 on it) while
//! the connection's other streams complete. A hostile stream (a request
//! head over the parser's bound) stops the parsing with an `anomaly`
//! record and is counted; its bytes still flow.
//!
//! Clients (curl) trust only Loupe's forward-trust CA; nginx serves the
//! files, its certificate from the test PKI, which the profile trusts.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use loupe_tests::{
    https::{curl_sha256, fill_pseudo_random, Nginx, INDEX_HTML, SERVER_NAME},
    mitm::{lab_policy, Mitm},
    pki::{Flaw, Key, Pki},
    wait_until,
};
use serde_json::Value;

const KIB: usize = 1 << 10;

/// The size of the files the signature tests fetch.
const LEN: usize = 64 * KIB;

/// How much plaintext nginx puts in a TLS record (its `ssl_buffer_size`):
/// the response headers and the start of the body fill the first one.
const RECORD: usize = 16 * KIB;

/// The EICAR anti-virus test file.
const EICAR: &[u8] = br"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";
const _: () = assert!(EICAR.len() == 68);

/// The literal that the `marker` signature looks for.
const MARKER: &[u8] = b"LOUPE-TEST-MARKER";

/// The bytes that the `hexmark` signature gives in hex.
const HEXMARK: &[u8] = b"\xde\xad\xbe\xefLOUPE";

/// The bytes of the `filemark` signature's file (any bytes, not only
/// text).
const FILEMARK: &[u8] = b"\x00\xffLOUPE-FILE\r\n";

/// What the POST in the HTTP test sends.
const POSTED: usize = 10_000;

/// The signatures: EICAR blocked, and two alerts, one given as a literal,
/// the other in hex.
const SIGNATURES: &str = r#"[signatures.eicar]
builtin = "eicar"
action = "block"

[signatures.marker]
pattern = "LOUPE-TEST-MARKER"
action = "alert"

[signatures.hexmark]
hex = "de ad be ef 4c 4f 55 50 45"
action = "alert"
"#;

/// Everything the harness serves decrypted, the profile looking for every
/// signature above and `filemark`, whose pattern is a file's bytes (named
/// relative to the policy file, which is beside the test PKI's directory).
fn inspecting(pki: &Pki) -> String {
    let dir = pki.roots.parent().expect("the PKI's directory");
    std::fs::write(dir.join("filemark.sig"), FILEMARK).unwrap();
    let name = dir
        .file_name()
        .expect("a named directory")
        .to_string_lossy();
    lab_policy(
        pki,
        r#"signatures = ["eicar", "marker", "hexmark", "filemark"]"#,
        &format!("{SIGNATURES}\n[signatures.filemark]\nfile = \"{name}/filemark.sig\"\n"),
    )
}

/// nginx on port 443 with a good certificate from the test PKI, HTTP/2
/// offered by ALPN or not, `extra` directives in its server block.
fn start_nginx(m: &Mitm, http2: bool, extra: &str) -> Nginx {
    let cert = m
        .pki
        .leaf("server", &[SERVER_NAME], Key::P256, Flaw::None)
        .unwrap();
    Nginx::start_with(&m.h, 443, cert, http2, extra).expect("nginx")
}

/// `len` pseudo-random bytes from `seed`, each of `marks` written over
/// them at its offset.
fn body_with(len: usize, seed: u64, marks: &[(usize, &[u8])]) -> Vec<u8> {
    let mut data = vec![0u8; len];
    fill_pseudo_random(&mut data, seed);
    for &(at, mark) in marks {
        data[at..at + mark.len()].copy_from_slice(mark);
    }
    data
}

/// curl arguments for `path` on the harness server over HTTP/1.1, with
/// `extra` arguments.
fn http1(m: &Mitm, path: &str, extra: &[String]) -> Vec<String> {
    let mut args = vec!["--http1.1".to_string()];
    args.extend_from_slice(extra);
    args.extend(m.curl_server(path));
    args
}

/// curl in the client namespace with `args`, then the server's `path`,
/// taking any HTTP status (no `--fail`): what it wrote on stdout.
fn curl_any_status(m: &Mitm, path: &str, args: &[&str]) -> String {
    let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    all.extend(m.curl_server(path).into_iter().filter(|a| a != "--fail"));
    let out = m.client("curl", &all).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The length of the response headers curl wrote to `path` (`-D`): where
/// the body starts in the stream from the server.
fn header_len(path: &Path) -> usize {
    let n = std::fs::metadata(path).expect("curl's header dump").len() as usize;
    assert!((1..1024).contains(&n), "{n} bytes of response headers");
    n
}

/// A record's connection id.
fn conn(r: &Value) -> u64 {
    r["conn"]
        .as_u64()
        .unwrap_or_else(|| panic!("no conn in {r:#}"))
}

/// Whether a record is a connection's own (the kinds added since say what
/// they are in `record`) and the connection reached the TLS stage.
fn is_connection(r: &Value) -> bool {
    r["record"].is_null() && r.get("tls").is_some()
}

/// The flow log's records of kind `kind` (`http`, `signature`) so far.
fn records_of(m: &Mitm, kind: &str) -> Vec<Value> {
    m.control
        .records()
        .into_iter()
        .filter(|r| r["record"] == kind)
        .collect()
}

/// Waits until at least `n` records satisfy `f`; returns them all, in the
/// log's order.
fn wait_records(m: &Mitm, what: &str, n: usize, f: impl Fn(&Value) -> bool) -> Vec<Value> {
    wait_until(what, Duration::from_secs(60), || {
        let all = m.control.records();
        let found: Vec<Value> = all.iter().filter(|r| f(r)).cloned().collect();
        if found.len() >= n {
            Ok(Some(found))
        } else {
            Err(format!(
                "{} of {} records: {all:#?}",
                found.len(),
                all.len()
            ))
        }
    })
    .unwrap()
}

/// The signature record of `name` in direction `dir` among `sigs`.
fn signature<'a>(sigs: &'a [Value], name: &str, dir: &str) -> &'a Value {
    sigs.iter()
        .find(|r| r["signature"]["name"] == name && r["signature"]["dir"] == dir)
        .unwrap_or_else(|| panic!("no {name} match {dir} in {sigs:#?}"))
}

/// Waits until the metrics page has `line`.
fn wait_metric(m: &Mitm, line: &str) {
    let name = line.split('{').next().unwrap_or(line);
    wait_until(line, Duration::from_secs(60), || {
        let text = m.control.metrics().map_err(|e| e.to_string())?;
        if text.lines().any(|l| l == line) {
            Ok(Some(()))
        } else {
            Err(text
                .lines()
                .filter(|l| l.starts_with(name))
                .collect::<Vec<_>>()
                .join("\n"))
        }
    })
    .unwrap();
}

/// One curl fetching three files over one kept-alive HTTP/1.1 connection:
/// each request is a record of its own, numbered in order, with the
/// connection's `conn` and addresses; a POST (on a connection of its own)
/// says how much it sent and what nginx answered.
#[test]
fn http1_requests_on_one_connection_are_each_logged() {
    let m = Mitm::start(|pki| lab_policy(pki, "", "")).expect("setup");
    // Files of no type nginx knows are sent as application/octet-stream.
    let nginx = start_nginx(&m, false, "default_type application/octet-stream;");
    nginx.add_file("small.bin", 1000, 1).unwrap();
    nginx.add_file("large.bin", 200 * KIB, 2).unwrap();
    // In the order fetched: name, length, content type.
    let files = [
        ("small.bin", 1000, "application/octet-stream"),
        ("index.html", INDEX_HTML.len(), "text/html"),
        ("large.bin", 200 * KIB, "application/octet-stream"),
    ];
    let mut args = m.curl_server("");
    // Without its URL: one per file follows.
    args.truncate(args.len() - 1);
    args.extend([
        "--http1.1".to_string(),
        "-w".into(),
        "%{http_code} %{num_connects} %{size_download}\n".into(),
    ]);
    for (name, _, _) in files {
        args.extend([
            "-o".to_string(),
            "/dev/null".into(),
            format!("https://{SERVER_NAME}:443/{name}"),
        ]);
    }
    let out = m.client("curl", &args).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // curl's own account: a connection made for the first request, reused
    // for the others.
    let seen = String::from_utf8_lossy(&out.stdout);
    let want: Vec<String> = files
        .iter()
        .enumerate()
        .map(|(i, (_, len, _))| format!("200 {} {len}", u8::from(i == 0)))
        .collect();
    assert_eq!(seen.lines().collect::<Vec<_>>(), want, "{seen}");

    // The log: three requests on one connection, as they came.
    let mut gets = wait_records(&m, "the three GET records", 3, |r| {
        r["record"] == "http" && r["http"]["method"] == "GET"
    });
    assert_eq!(gets.len(), 3, "{gets:#?}");
    gets.sort_by_key(|r| r["http"]["seq"].as_u64());
    let c = conn(&gets[0]);
    let own = m
        .control
        .wait_record("the connection's own record", |r| {
            is_connection(r) && r["conn"] == c
        })
        .unwrap();
    assert_eq!(own["tls"]["outcome"], "decrypted", "{own:#}");
    assert_eq!(own["tls"]["client"]["alpn"], "http/1.1", "{own:#}");
    assert_eq!(own["sni"], SERVER_NAME, "{own:#}");
    assert_eq!(own["action"], "decrypt", "{own:#}");
    assert_eq!(own["rule"], "decrypt-lab", "{own:#}");
    for (i, (r, (name, len, content_type))) in gets.iter().zip(files).enumerate() {
        let h = &r["http"];
        assert_eq!(conn(r), c, "{r:#}");
        assert_eq!(h["seq"], i as u64 + 1, "{r:#}");
        assert_eq!(h["method"], "GET", "{r:#}");
        assert_eq!(h["host"], SERVER_NAME, "{r:#}");
        assert_eq!(h["path"], format!("/{name}"), "{r:#}");
        assert_eq!(h["status"], 200, "{r:#}");
        assert_eq!(h["content_type"], content_type, "{r:#}");
        assert_eq!(h["request_body"], 0, "{r:#}");
        assert_eq!(h["response_body"], len as u64, "{r:#}");
        assert!(h["duration_ms"].is_u64(), "{r:#}");
        for field in ["client", "server", "sni", "action", "rule"] {
            assert_eq!(r[field], own[field], "{field} in {r:#}");
        }
    }
    wait_metric(
        &m,
        r#"loupe_http_requests_total{method="GET",status="200"} 3"#,
    );

    // A POST with a body of a known size; nginx takes none on static
    // files and answers 405 (curl's --fail left out, and its
    // `Expect: 100-continue`, which would put an interim response first).
    let body = m.h.dir.join("post.bin");
    std::fs::write(&body, "p".repeat(POSTED)).unwrap();
    let seen = curl_any_status(
        &m,
        "small.bin",
        &[
            "--http1.1",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_download}",
            "-H",
            "Expect:",
            "--data-binary",
            &format!("@{}", body.display()),
        ],
    );
    let (code, answered) = seen
        .split_once(' ')
        .unwrap_or_else(|| panic!("curl wrote {seen:?}"));
    assert_eq!(code, "405", "{seen}");
    let answered: u64 = answered.trim().parse().unwrap();
    let post = m
        .control
        .wait_record("the POST's record", |r| {
            r["record"] == "http" && r["http"]["method"] == "POST"
        })
        .unwrap();
    let h = &post["http"];
    assert_ne!(conn(&post), c, "{post:#}");
    assert_eq!(h["seq"], 1, "{post:#}");
    assert_eq!(h["host"], SERVER_NAME, "{post:#}");
    assert_eq!(h["path"], "/small.bin", "{post:#}");
    assert_eq!(h["status"], 405, "{post:#}");
    assert_eq!(h["request_body"], POSTED as u64, "{post:#}");
    assert_eq!(h["response_body"], answered, "{post:#}");
    wait_metric(
        &m,
        r#"loupe_http_requests_total{method="POST",status="405"} 1"#,
    );
    // Every record names its connection.
    let all = m.control.records();
    assert!(all.iter().all(|r| r["conn"].is_u64()), "{all:#?}");
}

/// The EICAR string in the middle of a 64 KiB body, across the end of
/// nginx's first TLS record (and so across two records and the segments
/// that carry them): the connection is reset before the client has the
/// whole string, and the log says which signature did it and where. The
/// same body without it, before and after, arrives byte-exact.
#[test]
fn eicar_split_across_records_and_segments_is_blocked_and_a_clean_body_passes() {
    let m = Mitm::start(inspecting).expect("setup");
    let nginx = start_nginx(&m, false, "");
    let clean = body_with(LEN, 3, &[]);
    let clean_sha = nginx.add_bytes("clean.bin", &clean).unwrap();

    // The clean body first: byte-exact, and how long nginx's response
    // headers are, which come before the body in the server's stream.
    let headers = m.h.dir.join("clean.headers");
    let args = http1(
        &m,
        "clean.bin",
        &["-D".to_string(), headers.display().to_string()],
    );
    let (sha, len) = curl_sha256(&m.h, &args).expect("the clean body");
    assert_eq!((sha.as_str(), len), (clean_sha.as_str(), LEN as u64));
    let head = header_len(&headers);

    // The same bytes with EICAR where its first 30 bytes end nginx's
    // first record and the rest begin the second. The headers are as long
    // (the same size, and nginx's dates and ETag have fixed widths).
    let at = RECORD - 30 - head;
    let eicar = body_with(LEN, 3, &[(at, EICAR)]);
    nginx.add_bytes("eicar.bin", &eicar).unwrap();
    let got_path = m.h.dir.join("eicar.got");
    let args = http1(
        &m,
        "eicar.bin",
        &["-o".to_string(), got_path.display().to_string()],
    );
    let out = m.client("curl", &args).unwrap();
    assert!(
        !out.status.success(),
        "the EICAR body got through: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = std::fs::read(got_path).unwrap_or_default();
    assert!(eicar.starts_with(&got), "the client got other bytes");
    assert!(
        got.len() < at + EICAR.len(),
        "{} bytes of the body reached the client: all of the string",
        got.len()
    );

    // The log: the match, where it starts in the server's plaintext, and
    // the connection it ended.
    let sig = m
        .control
        .wait_record("the EICAR match", |r| r["record"] == "signature")
        .unwrap();
    let s = &sig["signature"];
    assert_eq!(s["name"], "eicar", "{sig:#}");
    assert_eq!(s["action"], "block", "{sig:#}");
    assert_eq!(s["dir"], "s2c", "{sig:#}");
    assert_eq!(s["offset"], (head + at) as u64, "{sig:#}");
    let c = conn(&sig);
    let own = m
        .control
        .wait_record("the blocked connection's record", |r| {
            is_connection(r) && r["conn"] == c
        })
        .unwrap();
    assert_eq!(own["tls"]["error"]["stage"], "data", "{own:#}");
    assert!(
        own["tls"]["error"]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("signature \"eicar\""),
        "{own:#}"
    );

    // The block was this connection's only: the clean body again.
    let args = http1(&m, "clean.bin", &[]);
    let (sha, len) = curl_sha256(&m.h, &args).expect("the clean body again");
    assert_eq!((sha.as_str(), len), (clean_sha.as_str(), LEN as u64));
    let conns = wait_records(&m, "all three connections", 3, is_connection);
    assert_eq!(conns.len(), 3, "{conns:#?}");
    let sigs = records_of(&m, "signature");
    assert_eq!(sigs.len(), 1, "{sigs:#?}");
    wait_metric(
        &m,
        r#"loupe_signature_hits_total{signature="eicar",action="block"} 1"#,
    );
}

/// Alert signatures, a literal, one given in hex and one from a file, in
/// a body (and the literal in a request header): each match is logged with
/// its direction and offset, and the body arrives byte-exact.
#[test]
fn an_alert_signature_is_logged_and_the_transfer_completes() {
    let m = Mitm::start(inspecting).expect("setup");
    let nginx = start_nginx(&m, false, "");
    let (marker_at, hexmark_at, filemark_at) = (40_000, 50_000, 30_000);
    let data = body_with(
        LEN,
        4,
        &[
            (marker_at, MARKER),
            (hexmark_at, HEXMARK),
            (filemark_at, FILEMARK),
        ],
    );
    let want = nginx.add_bytes("marked.bin", &data).unwrap();
    let headers = m.h.dir.join("marked.headers");
    let probe = format!("X-Loupe-Probe: {}", std::str::from_utf8(MARKER).unwrap());
    let args = http1(
        &m,
        "marked.bin",
        &[
            "-D".to_string(),
            headers.display().to_string(),
            "-H".to_string(),
            probe,
        ],
    );
    let (sha, len) = curl_sha256(&m.h, &args).expect("the marked body");
    assert_eq!((sha.as_str(), len), (want.as_str(), LEN as u64));
    let head = header_len(&headers);

    let sigs = wait_records(&m, "four matches", 4, |r| r["record"] == "signature");
    let body_marker = signature(&sigs, "marker", "s2c");
    let body_hexmark = signature(&sigs, "hexmark", "s2c");
    let body_filemark = signature(&sigs, "filemark", "s2c");
    let header_marker = signature(&sigs, "marker", "c2s");
    for sig in [body_marker, body_hexmark, body_filemark, header_marker] {
        assert_eq!(sig["signature"]["action"], "alert", "{sig:#}");
    }
    assert_eq!(
        body_filemark["signature"]["offset"],
        (head + filemark_at) as u64,
        "{body_filemark:#}"
    );
    assert_eq!(
        body_marker["signature"]["offset"],
        (head + marker_at) as u64,
        "{body_marker:#}"
    );
    assert_eq!(
        body_hexmark["signature"]["offset"],
        (head + hexmark_at) as u64,
        "{body_hexmark:#}"
    );
    // In the request's headers, after its request line.
    let off = header_marker["signature"]["offset"].as_u64();
    assert!(
        off.is_some_and(|o| (20..512).contains(&o)),
        "{header_marker:#}"
    );

    // One connection, which went on to its end without an error, and its
    // request logged whole.
    let c = conn(body_marker);
    let own = m
        .control
        .wait_record("the connection's own record", |r| {
            is_connection(r) && r["conn"] == c
        })
        .unwrap();
    assert_eq!(own["tls"]["outcome"], "decrypted", "{own:#}");
    assert!(own["tls"]["error"].is_null(), "{own:#}");
    let sigs = records_of(&m, "signature");
    assert_eq!(sigs.len(), 4, "{sigs:#?}");
    assert!(sigs.iter().all(|r| conn(r) == c), "{sigs:#?}");
    let http = records_of(&m, "http");
    assert_eq!(http.len(), 1, "{http:#?}");
    assert_eq!(http[0]["http"]["status"], 200, "{http:#?}");
    assert_eq!(http[0]["http"]["response_body"], LEN as u64, "{http:#?}");
    wait_metric(
        &m,
        r#"loupe_signature_hits_total{signature="marker",action="alert"} 2"#,
    );
    wait_metric(
        &m,
        r#"loupe_signature_hits_total{signature="hexmark",action="alert"} 1"#,
    );
    wait_metric(
        &m,
        r#"loupe_signature_hits_total{signature="filemark",action="alert"} 1"#,
    );
}

/// The same marked body over HTTP/1.1 and over HTTP/2: both arrive
/// byte-exact, both raise the alert, and each request is a record of its
/// own (HTTP/2 parsed as HTTP/2, never taken for HTTP/1.1).
#[test]
fn http2_connections_are_parsed_as_http2_and_signatures_still_apply() {
    let m = Mitm::start(inspecting).expect("setup");
    let nginx = start_nginx(&m, true, "");
    // Well inside the first DATA frame of the HTTP/2 response.
    let marker_at = 1000;
    let data = body_with(LEN, 5, &[(marker_at, MARKER)]);
    let want = nginx.add_bytes("marked.bin", &data).unwrap();
    for version in ["--http1.1", "--http2"] {
        let mut args = m.curl_server("marked.bin");
        args.insert(0, version.into());
        let (sha, len) = curl_sha256(&m.h, &args).expect(version);
        assert_eq!(
            (sha.as_str(), len),
            (want.as_str(), LEN as u64),
            "{version}"
        );
    }

    let conns = wait_records(&m, "both connections' records", 2, is_connection);
    assert_eq!(conns.len(), 2, "{conns:#?}");
    let by_alpn = |alpn: &str| {
        conns
            .iter()
            .find(|r| r["tls"]["client"]["alpn"] == alpn)
            .unwrap_or_else(|| panic!("no {alpn} connection in {conns:#?}"))
    };
    let (h1, h2) = (conn(by_alpn("http/1.1")), conn(by_alpn("h2")));
    for r in &conns {
        assert_eq!(r["tls"]["outcome"], "decrypted", "{r:#}");
        assert!(r["tls"]["error"].is_null(), "{r:#}");
    }

    // The alert on each connection.
    let sigs = wait_records(&m, "a match on each connection", 2, |r| {
        r["record"] == "signature"
    });
    for c in [h1, h2] {
        let sig = sigs
            .iter()
            .find(|r| conn(r) == c)
            .unwrap_or_else(|| panic!("no match on connection {c} in {sigs:#?}"));
        let s = &sig["signature"];
        assert_eq!(s["name"], "marker", "{sig:#}");
        assert_eq!(s["action"], "alert", "{sig:#}");
        assert_eq!(s["dir"], "s2c", "{sig:#}");
        assert!(
            s["offset"].as_u64().is_some_and(|o| o > marker_at as u64),
            "{sig:#}"
        );
    }

    // Each connection's request is logged, the same way.
    let http = wait_records(&m, "both requests' records", 2, |r| r["record"] == "http");
    assert_eq!(http.len(), 2, "{http:#?}");
    for c in [h1, h2] {
        let r = http
            .iter()
            .find(|r| conn(r) == c)
            .unwrap_or_else(|| panic!("no request on connection {c} in {http:#?}"));
        let q = &r["http"];
        assert_eq!(q["method"], "GET", "{r:#}");
        assert_eq!(q["host"], SERVER_NAME, "{r:#}");
        assert_eq!(q["path"], "/marked.bin", "{r:#}");
        assert_eq!(q["status"], 200, "{r:#}");
        assert_eq!(q["response_body"], LEN as u64, "{r:#}");
    }
    wait_metric(
        &m,
        r#"loupe_http_requests_total{method="GET",status="200"} 2"#,
    );
}

/// curl fetching three files over one HTTP/2 connection (three streams):
/// each is a record of its own, numbered in order, on one `conn`, with
/// its status, content type and body size.
#[test]
fn http2_streams_on_one_connection_are_each_logged() {
    let m = Mitm::start(|pki| lab_policy(pki, "", "")).expect("setup");
    let nginx = start_nginx(&m, true, "default_type application/octet-stream;");
    nginx.add_file("small.bin", 1000, 1).unwrap();
    nginx.add_file("large.bin", 200 * KIB, 2).unwrap();
    let mut args = m.curl_server("small.bin");
    let base = args.pop().unwrap();
    let base = base.trim_end_matches("small.bin").to_string();
    args.extend([
        "--http2".to_string(),
        "-w".into(),
        "%{http_code} %{http_version} %{num_connects}\n".into(),
    ]);
    for f in ["small.bin", "index.html", "large.bin", "missing.bin"] {
        args.extend([format!("{base}{f}"), "-o".into(), "/dev/null".into()]);
    }
    // --fail would stop at the 404.
    args.retain(|a| a != "--fail");
    let out = m.client("curl", &args).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        ["200 2 1", "200 2 0", "200 2 0", "404 2 0"],
        "one HTTP/2 connection: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let http = wait_records(&m, "four request records", 4, |r| r["record"] == "http");
    let c = conn(&http[0]);
    let got: Vec<(u64, &str, u64, &str, u64)> = http
        .iter()
        .map(|r| {
            assert_eq!(conn(r), c, "one connection: {r:#}");
            let q = &r["http"];
            assert_eq!(q["method"], "GET", "{r:#}");
            assert_eq!(q["host"], SERVER_NAME, "{r:#}");
            (
                q["seq"].as_u64().unwrap(),
                q["path"].as_str().unwrap(),
                q["status"].as_u64().unwrap(),
                q["content_type"].as_str().unwrap_or(""),
                q["response_body"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got[0],
        (1, "/small.bin", 200, "application/octet-stream", 1000)
    );
    assert_eq!(
        got[1],
        (2, "/index.html", 200, "text/html", INDEX_HTML.len() as u64)
    );
    assert_eq!(
        got[2],
        (
            3,
            "/large.bin",
            200,
            "application/octet-stream",
            200 * KIB as u64
        )
    );
    assert_eq!((got[3].0, got[3].1, got[3].2), (4, "/missing.bin", 404));
}

/// A hostile request (one header field of 70 KB, a head beyond the
/// parser's 64 KiB bound) through the engine: the parser stops with an
/// `anomaly` record on that connection, saying why and which way, the
/// anomaly is counted in the metrics, and the bytes still flow (no URL
/// rule could block, so nothing is reset): nginx, told to take heads that
/// large, answers and the page arrives whole.
#[test]
fn a_request_head_over_the_bound_is_logged_as_an_anomaly_and_counted() {
    let m = Mitm::start(|pki| lab_policy(pki, "", "")).expect("setup");
    let _nginx = start_nginx(&m, false, "large_client_header_buffers 4 128k;");
    let flood = format!("X-Flood: {}", "a".repeat(70_000));
    let page = curl_any_status(
        &m,
        "index.html",
        &["--http1.1", "-H", &flood, "-w", "\n%{http_code}"],
    );
    assert_eq!(page, format!("{INDEX_HTML}\n200"), "the bytes still flow");
    let bad = m
        .control
        .wait_record("the anomaly record", |r| r["record"] == "anomaly")
        .unwrap();
    let a = &bad["anomaly"];
    assert_eq!(a["dir"], "c2s", "{bad:#}");
    assert!(
        a["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("a head over 64 KiB"),
        "{bad:#}"
    );
    let own = m
        .control
        .wait_record("the connection's own record", |r| {
            is_connection(r) && r["conn"] == bad["conn"]
        })
        .unwrap();
    assert_eq!(own["tls"]["outcome"], "decrypted", "{own:#}");
    assert_eq!(own["sni"], SERVER_NAME, "{own:#}");
    wait_metric(&m, "loupe_inspect_anomalies_total 1");
    // The parser stopped there: the request is not a record of its own.
    assert!(
        records_of(&m, "http").is_empty(),
        "{:#?}",
        records_of(&m, "http")
    );
}

/// A URL rule blocking a path: the client is answered with a 403 page
/// naming the rule, the server never sees the request (its access log has
/// only the others), and the log and metrics name the rule. Over HTTP/1.1
/// the connection then ends; over HTTP/2 only that stream is refused and
/// the requests before and after it on the same connection complete. A
/// percent-encoded path does not get around it.
#[test]
fn a_url_rule_answers_a_blocked_request_with_a_403_page_naming_it() {
    const URL_RULES: &str = r#"[[url_rules]]
name = "no-secrets"
path = ["/secret*"]
action = "block"

[[url_rules]]
name = "watch-public"
host = ["*.loupe.test"]
path = ["/public*"]
action = "log"
"#;
    let m = Mitm::start(|pki| lab_policy(pki, "", URL_RULES)).expect("setup");
    let access = m.h.dir.join("access.log");
    // (nginx offers HTTP/2.)
    let nginx = start_nginx(&m, true, &format!("access_log {};", access.display()));
    nginx.add_file("secret.bin", 1000, 7).unwrap();
    let public = nginx.add_file("public.bin", 5000, 8).unwrap();

    // Over HTTP/1.1.
    let page = m.h.dir.join("page.html");
    let seen = curl_any_status(
        &m,
        "secret.bin?x=1",
        &[
            "--http1.1",
            "-o",
            &page.display().to_string(),
            "-w",
            "%{http_code} %{http_version}",
        ],
    );
    assert_eq!(seen, "403 1.1");
    let body = std::fs::read_to_string(&page).unwrap();
    assert!(body.contains("<b>no-secrets</b>"), "{body}");

    // Over HTTP/2: three requests on one connection, the middle one
    // blocked; the others arrive whole.
    let mut args = m.curl_server("public.bin");
    let base = args.pop().unwrap();
    let base = base.trim_end_matches("public.bin").to_string();
    args.retain(|a| a != "--fail");
    args.extend([
        "--http2".to_string(),
        "-w".into(),
        "%{http_code} %{http_version} %{num_connects}\n".into(),
    ]);
    let outs: Vec<PathBuf> = (0..3).map(|i| m.h.dir.join(format!("h2-{i}"))).collect();
    for (f, out) in ["public.bin", "%73ecret.bin", "public.bin"]
        .iter()
        .zip(&outs)
    {
        args.extend([format!("{base}{f}"), "-o".into(), out.display().to_string()]);
    }
    let out = m.client("curl", &args).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        ["200 2 1", "403 2 0", "200 2 0"],
        "one HTTP/2 connection: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let body = std::fs::read_to_string(&outs[1]).unwrap();
    assert!(body.contains("<b>no-secrets</b>"), "{body}");
    let mut want = vec![0u8; 5000];
    fill_pseudo_random(&mut want, 8);
    for f in [&outs[0], &outs[2]] {
        let got = std::fs::read(f).unwrap();
        assert!(got == want, "{} arrives byte-exact", f.display());
    }

    // Another path, on a new connection, goes through and is logged with
    // the rule that watches it.
    let args = http1(&m, "public.bin", &[]);
    let (sha, len) = curl_sha256(&m.h, &args).expect("the public file");
    assert_eq!((sha.as_str(), len), (public.as_str(), 5000));

    let blocked = m
        .control
        .wait_record("the blocked request", |r| {
            r["record"] == "http" && r["http"]["url_action"] == "block"
        })
        .unwrap();
    let h = &blocked["http"];
    assert_eq!(h["path"], "/secret.bin?x=1", "{blocked:#}");
    assert_eq!(h["status"], 403, "{blocked:#}");
    assert_eq!(h["url_rule"], "no-secrets", "{blocked:#}");
    let own = m
        .control
        .wait_record("the blocked connection's record", |r| {
            is_connection(r) && r["conn"] == blocked["conn"]
        })
        .unwrap();
    assert!(
        own["tls"]["error"]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("URL rule \"no-secrets\""),
        "{own:#}"
    );
    let logged = m
        .control
        .wait_record("the public request", |r| {
            r["record"] == "http" && r["http"]["path"] == "/public.bin"
        })
        .unwrap();
    assert_eq!(logged["http"]["status"], 200, "{logged:#}");
    assert_eq!(logged["http"]["url_rule"], "watch-public", "{logged:#}");
    assert_eq!(logged["http"]["url_action"], "log", "{logged:#}");
    wait_metric(
        &m,
        r#"loupe_url_rule_hits_total{rule="no-secrets",action="block"} 2"#,
    );
    wait_metric(
        &m,
        r#"loupe_url_rule_hits_total{rule="watch-public",action="log"} 3"#,
    );
    // The HTTP/2 connection was not blocked: its record has no error.
    let h2 = m
        .control
        .wait_record("the refused stream", |r| {
            r["record"] == "http" && r["http"]["url_action"] == "block" && r["http"]["seq"] == 2
        })
        .unwrap();
    assert_eq!(h2["http"]["status"], 403, "{h2:#}");
    let own = m
        .control
        .wait_record("the HTTP/2 connection's record", |r| {
            is_connection(r) && r["conn"] == h2["conn"]
        })
        .unwrap();
    assert_eq!(own["tls"]["outcome"], "decrypted", "{own:#}");
    assert!(own["tls"]["error"].is_null(), "{own:#}");
    // The server saw the public request only.
    let seen = wait_until("nginx's access log", Duration::from_secs(60), || {
        let text = std::fs::read_to_string(&access).map_err(|e| e.to_string())?;
        match text.contains("GET /public.bin") {
            true => Ok(Some(text)),
            false => Err(text),
        }
    })
    .unwrap();
    assert!(!seen.contains("secret"), "{seen}");
}
