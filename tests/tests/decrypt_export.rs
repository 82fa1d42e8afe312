//! Decrypted plaintext handed to the tools analysts use, end to end:
//! pcapng files that tshark reads (HTTP/1.1 and HTTP/2 requests listed,
//! bodies byte-exact with `-z follow`), the mirror port where tshark and
//! ngrep see the decrypted HTTP as an IDS would, and the key log with
//! which tshark decrypts a capture of the encrypted client leg.
//!
//! Clients (curl) trust only Loupe's forward-trust CA; nginx serves the
//! files with a certificate from the test PKI, which the profile trusts.

use std::{
    fs::File,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use loupe_tests::{
    harness::{HarnessConfig, Role, PEER_IF, SERVER_V4},
    https::{curl_sha256, Nginx, INDEX_HTML, SERVER_NAME},
    mitm::{lab_policy, Mitm},
    pki::{Flaw, Key, Pki},
    wait_until, Proc,
};

const KIB: usize = 1 << 10;

/// nginx on `port` (HTTP/1.1 only), its certificate from the test PKI.
fn start_nginx_on(m: &Mitm, port: u16) -> Nginx {
    let cert = m
        .pki
        .leaf("server", &[SERVER_NAME], Key::P256, Flaw::None)
        .unwrap();
    Nginx::start_with(
        &m.h,
        port,
        cert,
        false,
        "default_type application/octet-stream;",
    )
    .expect("nginx")
}

fn start_nginx(m: &Mitm, http2: bool) -> Nginx {
    let cert = m
        .pki
        .leaf("server", &[SERVER_NAME], Key::P256, Flaw::None)
        .unwrap();
    Nginx::start_with(
        &m.h,
        443,
        cert,
        http2,
        "default_type application/octet-stream;",
    )
    .expect("nginx")
}

/// A private directory (mode 700) for the captures, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("loupe-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
        Dir(d)
    }

    fn files(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs tshark and returns its standard output (it must succeed).
fn tshark(args: &[&str]) -> String {
    let out = Command::new("tshark")
        .args(args)
        .output()
        .expect("tshark (Debian package tshark)");
    assert!(
        out.status.success(),
        "tshark {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The TCP streams of a capture as `tshark -z follow,tcp,raw` shows them:
/// (client → server bytes, server → client bytes), for stream `n`.
fn follow(file: &Path, n: usize) -> (Vec<u8>, Vec<u8>) {
    let mut c2s = Vec::new();
    let mut s2c = Vec::new();
    for (second, bytes) in follow_chunks(file, &[], &format!("tcp,raw,{n}")) {
        match second {
            true => s2c.extend(bytes),
            false => c2s.extend(bytes),
        }
    }
    (c2s, s2c)
}

/// What `tshark -z follow,WHAT` shows in raw mode (`what` such as
/// `tcp,raw,0` or `http2,raw,1,3`), tshark given `extra` arguments first
/// (a decode-as): its chunks in order, each with whether the second node
/// (the server) sent it.
fn follow_chunks(file: &Path, extra: &[&str], what: &str) -> Vec<(bool, Vec<u8>)> {
    let f = file.display().to_string();
    let z = format!("follow,{what}");
    let text = tshark(&[&["-r", &f][..], extra, &["-q", "-z", &z]].concat());
    let mut chunks = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        if line.starts_with("Node 1:") {
            inside = true;
            continue;
        }
        if !inside || line.starts_with("====") {
            continue;
        }
        // The second node's data is indented with a tab.
        let (second, hex) = match line.strip_prefix('\t') {
            Some(h) => (true, h),
            None => (false, line),
        };
        let hex = hex.trim();
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            continue;
        }
        let bytes = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex from tshark"))
            .collect();
        chunks.push((second, bytes));
    }
    chunks
}

/// The response body of HTTP/2 stream `h2` on TCP stream `tcp`, as
/// `tshark -z follow,http2,raw` gives it (port 443 decoded as HTTP/2):
/// tshark shows each of the stream's DATA frames whole, its 9-byte header
/// and then the payload (padding, if any, after it); the payloads in
/// order are the body. The other chunks (the decoded header blocks) are
/// left out.
fn h2_body(file: &Path, tcp: usize, h2: u32) -> Vec<u8> {
    let chunks = follow_chunks(
        file,
        &["-d", "tcp.port==443,http2"],
        &format!("http2,raw,{tcp},{h2}"),
    );
    let mut body = Vec::new();
    for (_, c) in chunks.iter().filter(|(second, _)| *second) {
        let Some((head, payload)) = c.split_first_chunk::<9>() else {
            continue;
        };
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        if head[3] != 0 || len != payload.len() || stream != h2 {
            continue;
        }
        let payload = match head[4] & 0x8 != 0 {
            // PADDED: a length byte, the data, then that much padding.
            true => {
                let pad = *payload.first().expect("a padded DATA frame") as usize;
                &payload[1..payload.len() - pad]
            }
            false => payload,
        };
        body.extend_from_slice(payload);
    }
    body
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// curl arguments for several `paths` on one connection.
fn curl_many(m: &Mitm, proto: &str, paths: &[&str]) -> Vec<String> {
    let mut args = m.curl_server(paths[0]);
    args.insert(0, proto.to_string());
    let base = args.last().unwrap().trim_end_matches(paths[0]).to_string();
    args.extend(paths[1..].iter().map(|p| format!("{base}{p}")));
    args.extend(["-o".to_string(), "/dev/null".to_string()]);
    for _ in 1..paths.len() {
        args.extend(["-o".to_string(), "/dev/null".to_string()]);
    }
    args
}

/// curl fetching `paths` over one connection; it must succeed.
fn fetch(m: &Mitm, proto: &str, paths: &[&str]) {
    let out = m.client("curl", &curl_many(m, proto, paths)).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The capture file in `dir` once it holds two connections' ends (FINs or
/// RSTs): the exporter writes whenever its queue is empty.
fn two_ended(dir: &Dir) -> PathBuf {
    wait_until(
        "both connections' ends in the capture",
        Duration::from_secs(60),
        || {
            let files = dir.files();
            let Some(f) = files.first() else {
                return Err("no capture file yet".into());
            };
            let ends = tshark(&[
                "-r",
                &f.display().to_string(),
                "-Y",
                "tcp.flags.fin == 1 || tcp.flags.reset == 1",
                "-T",
                "fields",
                "-e",
                "tcp.stream",
            ]);
            let streams: std::collections::BTreeSet<&str> = ends.lines().collect();
            match streams.len() >= 2 {
                true => Ok(Some(f.clone())),
                false => Err(format!("ends seen in streams {streams:?}")),
            }
        },
    )
    .unwrap()
}

/// A profile that decrypts without `export`, for the rule on port 8443
/// (before the lab rule, whose profile exports).
fn quiet_rule(pki: &Pki) -> String {
    format!(
        r#"[profiles.quiet]
trust_store = "{}"

[[rules]]
name = "decrypt-quiet"
dst = ["198.18.0.0/24"]
ports = [8443]
action = "decrypt"
profile = "quiet"
"#,
        pki.roots.display()
    )
}

/// HTTP/1.1 (two requests on one connection) and HTTP/2 (two streams)
/// through the engine: the pcapng files list every request with its
/// method, host and path (tshark decoding port 443 as HTTP, then as
/// HTTP/2), the bodies follow byte-exact (HTTP/2's through tshark's
/// HTTP/2 stream follow), the files are private, and the start of the
/// export is in the audit log. A connection decrypted under a profile
/// without `export` (port 8443) is not in them.
#[test]
fn decrypted_connections_are_written_as_pcapng_that_tshark_reads() {
    let dir = Dir::new("pcap");
    let d = dir.0.display().to_string();
    let m = Mitm::start_with(HarnessConfig::default(), &["--export-pcap", &d], |pki| {
        lab_policy(pki, r#"export = ["pcap"]"#, &quiet_rule(pki))
    })
    .expect("setup");
    let nginx = start_nginx(&m, true);
    nginx.add_file("one.bin", 100 * KIB, 1).unwrap();
    nginx.add_file("two.bin", 3000, 2).unwrap();
    let one = std::fs::read(nginx.docroot.join("one.bin")).unwrap();
    let two = std::fs::read(nginx.docroot.join("two.bin")).unwrap();
    let quiet = start_nginx_on(&m, 8443);
    quiet.add_file("quiet.bin", 20 * KIB, 5).unwrap();

    // First the connection that must not be exported: the exporter writes
    // in order, so it would be in the file before the others end.
    let mut args = m.curl_args(SERVER_NAME, SERVER_V4, 8443, "quiet.bin");
    args.extend(["--http1.1".into(), "-o".into(), "/dev/null".into()]);
    let out = m.client("curl", &args).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let own = m
        .control
        .wait_record("the port 8443 connection's record", |r| {
            r["record"].is_null() && r["rule"] == "decrypt-quiet" && r.get("tls").is_some()
        })
        .unwrap();
    assert_eq!(own["tls"]["outcome"], "decrypted", "{own:#}");
    fetch(&m, "--http1.1", &["one.bin", "two.bin"]);
    fetch(&m, "--http2", &["one.bin", "index.html"]);

    let file = two_ended(&dir);
    assert_eq!(dir.files().len(), 1, "{:?}", dir.files());
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the capture holds plaintext");
    let f = file.display().to_string();

    // HTTP/1.1: both requests, with the real addresses and ports.
    let h1 = tshark(&[
        "-r",
        &f,
        "-d",
        "tcp.port==443,http",
        "-Y",
        "http.request",
        "-T",
        "fields",
        "-e",
        "ip.src",
        "-e",
        "ip.dst",
        "-e",
        "tcp.dstport",
        "-e",
        "http.request.method",
        "-e",
        "http.host",
        "-e",
        "http.request.uri",
    ]);
    let lines: Vec<&str> = h1.lines().collect();
    assert_eq!(
        lines,
        vec![
            format!("198.18.0.1\t198.18.0.2\t443\tGET\t{SERVER_NAME}\t/one.bin"),
            format!("198.18.0.1\t198.18.0.2\t443\tGET\t{SERVER_NAME}\t/two.bin"),
        ],
        "{h1}"
    );
    // HTTP/2: both streams' requests (pseudo-headers from HPACK).
    let h2 = tshark(&[
        "-r",
        &f,
        "-d",
        "tcp.port==443,http2",
        "-Y",
        "http2.type == 1",
        "-T",
        "fields",
        "-e",
        "http2.header.value",
    ]);
    for path in ["/one.bin", "/index.html"] {
        assert!(
            h2.lines().any(|l| l.split(',').any(|v| v == path)),
            "{path} in {h2}"
        );
    }
    // Byte-exact: stream 0 (HTTP/1.1) carries both bodies whole, stream 1
    // (HTTP/2) the preface.
    let (c2s, s2c) = follow(&file, 0);
    assert!(
        c2s.starts_with(b"GET /one.bin HTTP/1.1\r\n"),
        "{}",
        String::from_utf8_lossy(&c2s)
    );
    assert!(contains(&s2c, &one), "the 100 KiB body, whole and in order");
    assert!(contains(&s2c, &two));
    let (c2s, s2c) = follow(&file, 1);
    assert!(c2s.starts_with(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"));
    // On the wire the 100 KiB body is cut by DATA frame headers; tshark's
    // HTTP/2 follow of its stream (1) has its frames, whose payloads are
    // the body byte-exact, and of the second stream (3) the page.
    assert!(!contains(&s2c, &one), "framed on the TCP stream");
    let body = h2_body(&file, 1, 1);
    assert!(
        body == one,
        "the 100 KiB body over HTTP/2, byte-exact ({} bytes followed)",
        body.len()
    );
    let page = h2_body(&file, 1, 3);
    assert_eq!(String::from_utf8_lossy(&page), INDEX_HTML);
    // The connection under the profile without export is not there.
    let ports = tshark(&[&["-r", &f][..], &["-T", "fields", "-e", "tcp.dstport"]].concat());
    assert!(!ports.lines().any(|p| p == "8443"), "{ports}");

    // Timestamps are the real ones (within the test's run).
    let t = tshark(&[
        "-r",
        &f,
        "-c",
        "1",
        "-T",
        "fields",
        "-e",
        "frame.time_epoch",
    ]);
    let t: f64 = t.trim().parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((now - 600.0..=now).contains(&t), "{t} vs {now}");

    let s = m.engine.stats().unwrap();
    let e = s.tls.and_then(|t| t.export).expect("export report");
    assert_eq!(e.connections, 2, "only the exporting profile's: {e:?}");
    assert_eq!(e.events_dropped, 0, "{e:?}");
    assert!(e.pcap_packets > 80, "{e:?}");
    let audit = std::fs::read_to_string(&m.hsm.audit_log).unwrap();
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"export\"") && l.contains(&d)),
        "the audit log records the export: {audit}"
    );
}

/// A capture process in the IDS namespace, writing to a file, ready once
/// `ready` appears in its output.
fn capture(m: &Mitm, name: &str, program: &str, args: &[&str], out: &Path, ready: &str) -> Proc {
    let ids = m.h.ids.as_ref().expect("a harness with a mirror port");
    let child = ids
        .command(program)
        .args(args)
        .stdout(File::create(out).unwrap())
        .stderr(File::create(out.with_extension("err")).unwrap())
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    let mut p = Proc::new(name, child);
    let err = out.with_extension("err");
    p.wait_ready(
        &format!("{name} capturing"),
        Duration::from_secs(60),
        || {
            let text = std::fs::read_to_string(out).unwrap_or_default()
                + &std::fs::read_to_string(&err).unwrap_or_default();
            Ok(text.contains(ready))
        },
    )
    .unwrap();
    p
}

/// The engine with a mirror port (`--export-mirror mirror`, the
/// harness's fourth namespace on its other end) and the lab policy's
/// profile copying to it.
fn mirroring() -> Mitm {
    Mitm::start_with(
        HarnessConfig {
            mirror: true,
            ..HarnessConfig::default()
        },
        &["--export-mirror", "mirror"],
        |pki| lab_policy(pki, r#"export = ["mirror"]"#, ""),
    )
    .expect("setup")
}

/// The mirror port: tshark on the IDS end decodes the decrypted HTTP/1.1
/// requests live, and ngrep finds a content pattern in a response body;
/// the engine's end of the port receives nothing back.
#[test]
fn the_mirror_port_feeds_tshark_and_ngrep_as_an_ids() {
    let dir = Dir::new("mirror");
    let m = mirroring();
    let nginx = start_nginx(&m, false);
    let mut body = vec![b'.'; 50 * KIB];
    body[40_000..40_020].copy_from_slice(b"IDS-LOOKS-FOR-THIS-1");
    std::fs::write(nginx.docroot.join("find.txt"), &body).unwrap();

    let live = dir.0.join("tshark.txt");
    let tshark_live = capture(
        &m,
        "tshark",
        "tshark",
        &[
            "-i",
            PEER_IF,
            "-l",
            "-d",
            "tcp.port==443,http",
            "-Y",
            "http.request",
            "-T",
            "fields",
            "-e",
            "http.request.method",
            "-e",
            "http.request.uri",
        ],
        &live,
        "Capturing on",
    );
    let grep = dir.0.join("ngrep.txt");
    let ngrep = capture(
        &m,
        "ngrep",
        "ngrep",
        &[
            "-d",
            PEER_IF,
            "-l",
            "-q",
            "-W",
            "single",
            "IDS-LOOKS-FOR-THIS",
            "tcp",
        ],
        &grep,
        "interface:",
    );
    fetch(&m, "--http1.1", &["find.txt", "index.html"]);

    wait_until("tshark and ngrep saw it", Duration::from_secs(60), || {
        let t = std::fs::read_to_string(&live).unwrap_or_default();
        let g = std::fs::read_to_string(&grep).unwrap_or_default();
        if t.contains("GET\t/find.txt")
            && t.contains("GET\t/index.html")
            && g.contains("IDS-LOOKS-FOR-THIS-1")
        {
            Ok(Some(()))
        } else {
            Err(format!("tshark: {t:?}\nngrep: {g:?}"))
        }
    })
    .unwrap();
    let g = std::fs::read_to_string(&grep).unwrap();
    assert!(
        g.contains("198.18.0.2:443 -> 198.18.0.1:"),
        "the server's real address: {g}"
    );
    drop(tshark_live);
    drop(ngrep);
    let s = m.engine.stats().unwrap();
    let e = s.tls.and_then(|t| t.export).expect("export report");
    assert!(e.mirror_frames > 30, "{e:?}");
    assert_eq!(e.mirror_dropped, 0, "{e:?}");
    assert_eq!(e.pcap_packets, 0, "no pcap configured: {e:?}");
    // Send-only: the engine's end of the port took nothing in.
    let rx = m.h.iface_counter(Role::Engine, "mirror", "rx_packets");
    assert_eq!(rx.unwrap(), 0);
    let audit = std::fs::read_to_string(&m.hsm.audit_log).unwrap();
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"export\"") && l.contains("mirror port mirror")),
        "the audit log records the mirror export: {audit}"
    );
}

/// Whether the engine's end of the mirror port has carrier (`up`).
fn mirror_carrier(m: &Mitm, up: bool) {
    let want = if up { "1" } else { "0" };
    wait_until(
        &format!("the mirror port's carrier to be {want}"),
        Duration::from_secs(60),
        || {
            let out =
                m.h.engine
                    .exec("cat", &["/sys/class/net/mirror/carrier"])
                    .map_err(|e| e.to_string())?;
            let now = String::from_utf8_lossy(&out.stdout).trim().to_string();
            match now == want {
                true => Ok(Some(())),
                false => Err(format!("carrier {now:?}")),
            }
        },
    )
    .unwrap();
}

/// An absent consumer: the IDS end of the mirror port is down (no
/// carrier on the engine's end). Decryption goes on (a 2 MiB body arrives
/// byte-exact) and every frame the port did not take is counted, none
/// passed off as sent; with the IDS end up again, frames go out again.
#[test]
fn a_mirror_port_without_its_consumer_counts_drops_and_decryption_goes_on() {
    let m = mirroring();
    let nginx = start_nginx(&m, false);
    let sha = nginx.add_file("big.bin", 2 << 20, 9).unwrap();
    let ids = m.h.ids.as_ref().expect("a harness with a mirror port");
    ids.ip(&["link", "set", PEER_IF, "down"]).unwrap();
    mirror_carrier(&m, false);

    let mut args = m.curl_server("big.bin");
    args.insert(0, "--http1.1".into());
    let (got, len) = curl_sha256(&m.h, &args).expect("the transfer");
    assert_eq!((got.as_str(), len), (sha.as_str(), 2 << 20), "byte-exact");
    // The connection's end is exported (and dropped) last.
    let e = m
        .engine
        .wait_stats("the drops counted", Duration::from_secs(60), |s| {
            let e = s.tls.as_ref()?.export.clone()?;
            (e.connections == 1 && e.mirror_dropped > 1000 && e.queued_bytes == 0).then_some(e)
        })
        .unwrap();
    assert_eq!(e.mirror_frames, 0, "nothing passed off as sent: {e:?}");
    assert_eq!(e.events_dropped, 0, "{e:?}");
    let tx =
        m.h.iface_counter(Role::Engine, "mirror", "tx_packets")
            .unwrap();
    assert_eq!(tx, 0, "the port sent nothing");

    // The consumer back: frames go out and are counted as sent.
    ids.ip(&["link", "set", PEER_IF, "up"]).unwrap();
    mirror_carrier(&m, true);
    fetch(&m, "--http1.1", &["index.html"]);
    m.engine
        .wait_stats("frames sent again", Duration::from_secs(60), |s| {
            let e = s.tls.as_ref()?.export.clone()?;
            (e.connections == 2 && e.mirror_frames > 5).then_some(())
        })
        .unwrap();
}

/// The profile's key log, opened with `loupe keylog open`, is Wireshark's
/// format: with it, tshark decrypts a capture of the encrypted client leg
/// and shows the HTTP request.
#[test]
fn tshark_decrypts_a_capture_of_the_client_leg_with_the_key_log() {
    let dir = Dir::new("keylog");
    let sealed = dir.0.join("keys.sealed");
    let s = sealed.display().to_string();
    let m = Mitm::start(|pki| lab_policy(pki, &format!("keylog = \"{s}\""), "")).expect("setup");
    let nginx = start_nginx(&m, false);
    nginx.add_file("secret.bin", 5000, 3).unwrap();
    let cap = dir.0.join("client.pcapng");
    let err = dir.0.join("client.err");
    // tcpdump, packet-buffered: the file is whole when it stops.
    let child =
        m.h.client
            .command("tcpdump")
            .args([
                "-i",
                PEER_IF,
                "--immediate-mode",
                "-U",
                "-w",
                &cap.display().to_string(),
                "tcp port 443",
            ])
            .stdout(Stdio::null())
            .stderr(File::create(&err).unwrap())
            .spawn()
            .unwrap();
    let mut p = Proc::new("tcpdump", child);
    p.wait_ready("tcpdump capturing", Duration::from_secs(60), || {
        Ok(std::fs::read_to_string(&err)
            .unwrap_or_default()
            .contains("listening on"))
    })
    .unwrap();
    fetch(&m, "--http1.1", &["secret.bin"]);
    // The capture is complete once tcpdump has stopped.
    let (_, clean, _, _) = p.stop(Duration::from_secs(30));
    assert!(clean, "tcpdump stopped");
    let opened = m.open_keylog(&sealed);
    assert!(opened.status.success(), "{opened:?}");
    let keylog = dir.0.join("keys.log");
    std::fs::write(&keylog, &opened.stdout).unwrap();
    let k = keylog.display().to_string();
    let c = cap.display().to_string();
    let fields = [
        "-Y",
        "http.request",
        "-T",
        "fields",
        "-e",
        "http.request.uri",
    ];
    let plain = tshark(&[&["-r", &c][..], &fields].concat());
    let opt = format!("tls.keylog_file:{k}");
    let keyed = tshark(&[&["-r", &c, "-o", &opt][..], &fields].concat());
    assert_eq!(keyed.trim(), "/secret.bin", "decrypted with the key log");
    // The same keys in the capture itself (a Decryption Secrets Block, as
    // editcap puts them there): no side file needed.
    let embedded = dir.0.join("with-keys.pcapng");
    let e = embedded.display().to_string();
    let out = Command::new("editcap")
        .args(["--inject-secrets", &format!("tls,{k}"), &c, &e])
        .output()
        .expect("editcap");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let inside = tshark(&[&["-r", &e][..], &fields].concat());
    assert_eq!(
        inside.trim(),
        "/secret.bin",
        "decrypted with the embedded keys"
    );
    let shown = plain;
    assert!(
        shown.trim().is_empty(),
        "nothing readable without keys: {shown}"
    );
}

/// `export = ["pcap-tls"]`: the engine writes the client leg as it was
/// on the wire, with its keys in Decryption Secrets Blocks, so tshark
/// decrypts HTTP/1.1 and HTTP/2 from that file alone; with the blocks
/// taken out (editcap) nothing is readable.
#[test]
fn the_engine_writes_the_client_legs_tls_with_its_keys_inside() {
    let dir = Dir::new("pcap-tls");
    let d = dir.0.display().to_string();
    let m = Mitm::start_with(HarnessConfig::default(), &["--export-pcap", &d], |pki| {
        lab_policy(pki, r#"export = ["pcap-tls"]"#, "")
    })
    .expect("setup");
    let nginx = start_nginx(&m, true);
    nginx.add_file("one.bin", 20 * KIB, 1).unwrap();
    fetch(&m, "--http1.1", &["one.bin"]);
    fetch(&m, "--http2", &["index.html"]);
    let file = two_ended(&dir);
    assert_eq!(dir.files().len(), 1, "{:?}", dir.files());
    let name = file.file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.starts_with("loupe-tls-"), "{name}: no plaintext file");
    let f = file.display().to_string();
    // The ClientHello as the client sent it.
    let sni = tshark(&[
        "-r",
        &f,
        "-Y",
        "tls.handshake.type == 1",
        "-T",
        "fields",
        "-e",
        "tls.handshake.extensions_server_name",
    ]);
    assert_eq!(
        sni.lines().collect::<Vec<_>>(),
        [SERVER_NAME, SERVER_NAME],
        "{sni}"
    );
    let h1_fields = [
        "-Y",
        "http.request",
        "-T",
        "fields",
        "-e",
        "http.request.uri",
    ];
    let h1 = tshark(&[&["-r", &f][..], &h1_fields].concat());
    assert_eq!(
        h1.trim(),
        "/one.bin",
        "HTTP/1.1 decrypted from the file alone"
    );
    let h2 = tshark(&[
        "-r",
        &f,
        "-Y",
        "http2.type == 1",
        "-T",
        "fields",
        "-e",
        "http2.header.value",
    ]);
    assert!(
        h2.lines().any(|l| l.split(',').any(|v| v == "/index.html")),
        "HTTP/2 decrypted from the file alone: {h2}"
    );
    // Without the blocks, the same file is only ciphertext.
    let bare = dir.0.join("bare.pcapng");
    let out = Command::new("editcap")
        .args(["--discard-all-secrets", &f, &bare.display().to_string()])
        .output()
        .expect("editcap");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let without = tshark(&[&["-r", &bare.display().to_string()][..], &h1_fields].concat());
    assert!(without.trim().is_empty(), "{without}");
}

/// A destination the engine cannot use stops its start, saying why, with
/// nothing attached: a capture directory others can read, one that does
/// not exist, a mirror port that does not exist, is the engine's own or
/// is loopback.
#[test]
fn an_unusable_export_destination_stops_the_start_with_its_reason() {
    let open = Dir::new("open");
    std::fs::set_permissions(&open.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let o = open.0.display().to_string();
    let cases: [(&[&str], &str); 5] = [
        (&["--export-pcap", &o], "chmod 700"),
        (
            &["--export-pcap", "/nonexistent/loupe-pcap"],
            "cannot write captures in /nonexistent/loupe-pcap",
        ),
        (&["--export-mirror", "nosuch0"], "cannot mirror to nosuch0"),
        (
            &["--export-mirror", "inside"],
            "the mirror port inside is one of the engine's own interfaces",
        ),
        (&["--export-mirror", "lo"], "it is a loopback interface"),
    ];
    for (args, want) in cases {
        let e = Mitm::start_with(HarnessConfig::default(), args, |pki| {
            lab_policy(pki, r#"export = ["pcap", "mirror"]"#, "")
        })
        .err()
        .unwrap_or_else(|| panic!("{args:?} started"));
        let e = format!("{e:#}");
        assert!(e.contains(want), "{args:?}: {e}");
    }
}
