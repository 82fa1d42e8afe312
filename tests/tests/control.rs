//! The control process with a real dataplane and real peers: policies
//! decide connections by server name (curl through nginx), change live
//! without touching running connections, survive malformed input, and the
//! dataplane outlives control. Every decision reaches the flow log with
//! the rule that made it; the sockets refuse users who are not root.

use std::{
    io::Write,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use loupe_tests::{
    control::{dataplane_socket, Control},
    engine::Engine,
    harness::{CLIENT_V4, SERVER_V4, SERVER_V6},
    https::{curl_sha256, hex, Nginx, INDEX_HTML, SERVER_NAME},
    proc::Proc,
    wait_until, Harness, HarnessConfig,
};
use serde_json::Value;
use sha2::{Digest, Sha256};

const MIB: usize = 1 << 20;

/// Writes a policy file (and its category file) into the harness dir.
fn policy(h: &Harness, name: &str, text: &str) -> PathBuf {
    let path = h.dir.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::write(
        h.dir.join("categories.toml"),
        "financial-services = [\"*.bank.loupe.test\"]\nhealth = [\"*.clinic.loupe.test\"]\n",
    )
    .unwrap();
    path
}

/// A dataplane serving the control socket, and a daemon on `policy`.
fn start(h: &Harness, policy: Option<&Path>) -> (Engine, Control) {
    let sock = dataplane_socket(h);
    let engine = Engine::start(h, &["--control-socket", sock.to_str().unwrap()]).expect("engine");
    let control = Control::start(h, &sock, policy, &[]).expect("control");
    (engine, control)
}

fn field<'a>(r: &'a Value, k: &str) -> &'a str {
    r[k].as_str().unwrap_or("")
}

fn xdp(engine: &Engine, path: &str) -> u64 {
    engine.stats().map_or(0, |r| r.xdp_packets(path))
}

const SNI_POLICY: &str = r#"
[policy]
categories = "categories.toml"
default_action = "tcp-split"

[[rules]]
name = "exempt-finance"
categories = ["financial-services"]
action = "no-decrypt"

[[rules]]
name = "block-malware"
sni = ["*.malware.loupe.test"]
action = "block"
"#;

#[test]
fn the_server_name_selects_the_rule() {
    let h = Harness::new(HarnessConfig::default()).expect("harness");
    let p = policy(&h, "sni.toml", SNI_POLICY);
    let (engine, mut control) = start(&h, Some(&p));
    assert_eq!(control.wait_in_sync().unwrap(), 1);
    let nginx = Nginx::start(&h, 443).expect("nginx");
    let sha = nginx.add_file("blob", 2 * MIB, 5).unwrap();

    // no-decrypt: bypassed, byte-exact, nothing split.
    let before = xdp(&engine, "flow_bypass");
    let args = nginx.curl_args_for("www.bank.loupe.test", SERVER_V4, "blob");
    let (got, _) = curl_sha256(&h, &args).expect("curl through the bypass");
    assert_eq!(got, sha);
    // The report is rewritten every 100 ms from counters the workers
    // publish as often: wait for one taken after the transfer (its
    // packets on the XDP fast path), not only after the decision.
    let r = engine
        .wait_stats(
            "the pass and the transfer in the stats",
            Duration::from_secs(30),
            |r| {
                (r.split_total().policy_pass == 1 && r.xdp_packets("flow_bypass") - before > 1000)
                    .then(|| r.clone())
            },
        )
        .expect("2 MiB across the XDP fast path after a pass");
    assert_eq!(r.split_total().split, 0);
    let rec = control
        .wait_record("the no-decrypt record", |r| {
            field(r, "rule") == "exempt-finance"
        })
        .unwrap();
    assert_eq!(field(&rec, "action"), "no-decrypt");
    assert_eq!(field(&rec, "sni"), "www.bank.loupe.test");
    assert_eq!(field(&rec, "end"), "bypass");
    assert!(field(&rec, "server").ends_with(":443"), "{rec}");
    assert!(field(&rec, "time").ends_with('Z'), "{rec}");

    // block: curl is refused with a TLS alert; the server never sees data.
    let args = nginx.curl_args_for("x.malware.loupe.test", SERVER_V4, "blob");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = h.client.command("curl").args(&args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(35), "{err}");
    assert!(err.contains("alert access denied"), "{err}");
    let rec = control
        .wait_record("the block record", |r| field(r, "rule") == "block-malware")
        .unwrap();
    assert_eq!(
        (field(&rec, "action"), field(&rec, "end")),
        ("block", "blocked")
    );
    assert_eq!(field(&rec, "sni"), "x.malware.loupe.test");
    engine
        .wait_stats("the refusal in the stats", Duration::from_secs(30), |r| {
            (r.split_total().refused == 1).then_some(())
        })
        .unwrap();

    // The default: split, and logged when it ends.
    let (got, _) = curl_sha256(&h, &nginx.curl_args(SERVER_V4, "blob")).expect("curl split");
    assert_eq!(got, sha);
    let rec = control
        .wait_record("the split's record", |r| field(r, "action") == "tcp-split")
        .unwrap();
    assert_eq!(field(&rec, "rule"), "(default)");
    assert_eq!(field(&rec, "sni"), SERVER_NAME);
    assert!(
        rec["bytes_s2c"].as_u64().unwrap() >= 2 * MIB as u64,
        "{rec}"
    );
    assert!(
        matches!(field(&rec, "end"), "closed" | "client-reset"),
        "{rec}"
    );

    // The CLI shows the decisions; the metrics count them. The workers
    // publish their flow listings every 250 ms: wait for one that has the
    // flow (the test can get here sooner than that after the start).
    let text = wait_until(
        "the pass in the flow listing",
        Duration::from_secs(30),
        || {
            let flows = control
                .cli(&["flows", "--filter", "exempt-finance"])
                .map_err(|e| e.to_string())?;
            let text = String::from_utf8_lossy(&flows.stdout).into_owned();
            if flows.status.success() && text.contains("www.bank.loupe.test") {
                Ok(Some(text))
            } else {
                Err(text)
            }
        },
    )
    .unwrap();
    assert!(
        text.contains("bypass") && text.contains("1 flow(s)"),
        "{text}"
    );
    let tail = control.cli(&["log", "tail", "-n", "2"]).unwrap();
    assert_eq!(String::from_utf8_lossy(&tail.stdout).lines().count(), 2);
    // Worker counters reach the dataplane's report every 100 ms: wait for
    // them rather than race them.
    for want in [
        "loupe_dataplane_up 1\n",
        "loupe_policy_in_sync 1\n",
        "loupe_decisions_total{outcome=\"no-decrypt\"} 1\n",
        "loupe_decisions_total{outcome=\"refused\"} 1\n",
        "loupe_handshakes_total{opening=\"client-hello\"} 3\n",
        "loupe_flow_log_records_total{action=\"block\",end=\"blocked\"} 1\n",
        "loupe_xdp_packets_total{path=\"flow_bypass\"}",
    ] {
        wait_until("the metrics", Duration::from_secs(30), || {
            let m = control.metrics().map_err(|e| e.to_string())?;
            if m.contains(want) {
                Ok(Some(()))
            } else {
                Err(format!("metrics lack {want:?}:\n{m}"))
            }
        })
        .unwrap();
    }
    assert!(control.stop(), "control exits cleanly on SIGTERM");
    let (st, clean, _, err) = engine.stop();
    assert!(clean && st.success(), "{err}");
}

#[test]
fn a_live_change_keeps_the_running_split_and_bypasses_new_connections() {
    // The destination flips to no-decrypt while the download runs.
    let mut m = policy_change_mid_download(
        "[[rules]]\nname = \"bypass-lab\"\ndst = [\"198.18.0.2/32\"]\naction = \"no-decrypt\"\n",
    );
    let (h, engine) = (&m.h, &m.engine);

    // New connections are bypassed in XDP.
    let bypass_before = xdp(engine, "flow_bypass");
    let (got, _) = curl_sha256(h, &m.nginx.curl_args(SERVER_V4, "index.html")).unwrap();
    assert_eq!(got, hex(&Sha256::digest(INDEX_HTML)));
    wait_xdp_more(
        engine,
        "flow_bypass",
        bypass_before,
        3,
        "the new connection on the fast path",
    );
    engine
        .wait_stats("the pass in the stats", Duration::from_secs(30), |r| {
            (r.split_total().policy_pass == 1).then_some(())
        })
        .unwrap();

    // The old download completes byte-exact, still split; the log shows
    // both decisions with their rules and versions.
    let split = m.completed_split();
    let (engine, control) = (&m.engine, &m.control);
    assert_eq!(engine.stats().unwrap().split_total().split, 1);
    assert_eq!(field(&split, "action"), "tcp-split");
    let pass = control
        .wait_record("the bypass record", |r| field(r, "rule") == "bypass-lab")
        .unwrap();
    assert_eq!(field(&pass, "action"), "no-decrypt");
    assert_eq!(pass["policy_version"], 2);
    // `policy show` shows the new policy as written.
    let show = control.cli(&["policy", "show"]).unwrap();
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(
        text.starts_with("# version 2 from ") && text.contains("bypass-lab"),
        "{text}"
    );
    // And as compiled (asked for alone: both in one answer could pass the
    // socket's limit for a policy within its own).
    let show = control.cli(&["policy", "show", "--json"]).unwrap();
    let compiled: Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(compiled["version"], 2, "{compiled}");
    // `policy show | head -1`: the reader goes away; the CLI ends quietly.
    let out = control.cli_closed_stdout(&["policy", "show"]).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.is_empty(),
        "{:?}: {err}",
        out.status
    );
}

/// A running split download, and the policy applied in its middle.
struct MidDownload {
    h: Harness,
    engine: Engine,
    control: Control,
    nginx: Nginx,
    /// The download; returns `sha256sum`'s output.
    download: Option<std::thread::JoinHandle<String>>,
    sha: String,
    size: usize,
    /// The engine's report once it runs the new policy.
    mid: loupe_dataplane::stats::StatsReport,
}

/// A download of 24 MiB split by the rule `split-lab` (policy version 1),
/// then `after` applied (version 2) while it runs: the running split is
/// untouched so far.
fn policy_change_mid_download(after: &str) -> MidDownload {
    let h = Harness::new(HarnessConfig::default()).expect("harness");
    let before = policy(
        &h,
        "before.toml",
        "[[rules]]\nname = \"split-lab\"\ndst = [\"198.18.0.2/32\"]\naction = \"tcp-split\"\n",
    );
    let after = policy(&h, "after.toml", after);
    let (engine, control) = start(&h, Some(&before));
    assert_eq!(control.wait_in_sync().unwrap(), 1);
    let nginx = Nginx::start(&h, 443).expect("nginx");
    let size = 24 * MIB;
    let sha = nginx.add_file("big", size, 11).unwrap();
    let download = split_download(&h, &engine, &nginx, "big");

    let out = control
        .cli(&["policy", "apply", after.to_str().unwrap()])
        .unwrap();
    assert!(
        out.status.success(),
        "apply: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("policy version 2"));
    assert_eq!(control.wait_in_sync().unwrap(), 2);
    let mid = engine
        .wait_stats(
            "the new policy in the stats",
            Duration::from_secs(30),
            |r| (r.policy.as_ref().is_some_and(|p| p.version == 2)).then(|| r.clone()),
        )
        .unwrap();
    assert_eq!(
        mid.split_total().active,
        1,
        "the running split is untouched"
    );
    assert!(
        mid.split_total().bytes_s2c < size as u64,
        "the change must land mid-download"
    );
    MidDownload {
        h,
        engine,
        control,
        nginx,
        download: Some(download),
        sha,
        size,
        mid,
    }
}

impl MidDownload {
    /// Waits for the download: byte-exact, and logged as the split of
    /// `split-lab` under the first policy with every byte. Returns its
    /// record.
    fn completed_split(&mut self) -> Value {
        let sum = self.download.take().expect("once").join().unwrap();
        assert!(
            sum.starts_with(&self.sha),
            "download differs: {sum} vs {}",
            self.sha
        );
        let split = self
            .control
            .wait_record("the split's record", |r| field(r, "rule") == "split-lab")
            .unwrap();
        assert_eq!(split["policy_version"], 1);
        assert!(
            split["bytes_s2c"].as_u64().unwrap() as usize > self.size,
            "{split}"
        );
        split
    }
}

/// Waits until the XDP counter `path` has counted `at_least` packets
/// more than `since`.
fn wait_xdp_more(engine: &Engine, path: &str, since: u64, at_least: u64, what: &str) {
    wait_until(what, Duration::from_secs(60), || {
        let n = xdp(engine, path) - since;
        if n >= at_least {
            Ok(Some(()))
        } else {
            Err(format!("{n} more {path}"))
        }
    })
    .unwrap();
}

/// Starts a long download of `file` from nginx (rate-limited, so that a
/// policy change lands in its middle) and waits until it is split and a
/// few MiB have crossed; the thread returns `sha256sum`'s output.
fn split_download(
    h: &Harness,
    engine: &Engine,
    nginx: &Nginx,
    file: &str,
) -> std::thread::JoinHandle<String> {
    let mut args = nginx.curl_args(SERVER_V4, file);
    args.splice(0..0, ["--limit-rate".to_string(), "6M".to_string()]);
    let download = std::thread::spawn({
        let dir = h.client.name.clone();
        move || {
            let out = std::process::Command::new("ip")
                .args(["netns", "exec", &dir, "sh", "-c"])
                .arg(format!(
                    "curl {} | sha256sum",
                    args.iter()
                        .map(|a| format!("'{a}'"))
                        .collect::<Vec<_>>()
                        .join(" ")
                ))
                .stdin(Stdio::null())
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).to_string()
        }
    });
    engine
        .wait_stats("the download split", Duration::from_secs(60), |r| {
            (r.split_total().active >= 1).then_some(())
        })
        .unwrap();
    wait_until("a few MiB relayed", Duration::from_secs(60), || {
        let r = engine.stats().map_err(|e| e.to_string())?;
        let s2c: u64 = r.split_total().bytes_s2c;
        if s2c >= 2 * MIB as u64 {
            Ok(Some(()))
        } else {
            Err(format!("{s2c} bytes"))
        }
    })
    .unwrap();
    download
}

/// A new policy that no longer steers the port of a running split: the
/// split stays pinned to userspace (its frames keep coming by the flow
/// map's `steer` verdict) and completes byte-exact, while a new
/// connection to that port stays in the kernel, never split.
#[test]
fn a_live_split_stays_split_when_its_port_is_no_longer_steered() {
    // Only 8443 is steered now; 443 is the default's, no-decrypt.
    let mut m = policy_change_mid_download(
        "[[rules]]\nname = \"split-8443\"\nports = [8443]\naction = \"tcp-split\"\n",
    );
    let (h, engine) = (&m.h, &m.engine);
    assert_eq!(m.mid.steering.ports, vec![8443], "443 is no longer steered");

    // The split's frames still reach userspace, by its pin alone, and
    // the flow listing shows it split by the old rule.
    let pinned = xdp(engine, "flow_steer");
    wait_xdp_more(
        engine,
        "flow_steer",
        pinned,
        100,
        "the split's frames through its pin",
    );
    engine
        .wait_stats(
            "the split in the flow listing",
            Duration::from_secs(30),
            |r| {
                r.workers.iter().flat_map(|w| &w.flows).find_map(|f| {
                    let d = f.decision.as_ref()?;
                    (d.state == "split" && d.rule.as_deref() == Some("split-lab")).then_some(())
                })
            },
        )
        .unwrap();

    // A new connection to 443 is not steered: the kernel's path, never a
    // worker's decision.
    let pass_before = engine
        .stats()
        .unwrap()
        .xdp
        .get("pass_tcp")
        .map_or(0, |c| c.bytes);
    let (got, _) = curl_sha256(h, &m.nginx.curl_args(SERVER_V4, "index.html")).unwrap();
    assert_eq!(got, hex(&Sha256::digest(INDEX_HTML)));
    engine
        .wait_stats(
            "the new connection on the kernel's path",
            Duration::from_secs(30),
            |r| {
                // Its handshake, request and the page, at least.
                let n = r.xdp.get("pass_tcp").map_or(0, |c| c.bytes) - pass_before;
                (n >= 1000).then_some(())
            },
        )
        .unwrap();

    // The old download completes byte-exact, still split; nothing else
    // was held, decided or split.
    m.completed_split();
    let s = m.engine.stats().unwrap().split_total();
    assert_eq!(
        (s.split, s.held, s.hellos, s.policy_pass, s.refused),
        (1, 1, 1, 0, 0),
        "{s:?}"
    );
    let records = m.control.records();
    assert_eq!(records.len(), 1, "{records:?}");
}

/// Until a policy is applied the dataplane holds, decides and splits
/// nothing: steered connections cross its workers unchanged, over IPv4
/// and IPv6, with or without a daemon. The first policy applied decides
/// the next connection.
#[test]
fn until_a_policy_is_applied_steered_flows_are_forwarded_unchanged() {
    let h = Harness::new(HarnessConfig::default()).expect("harness");
    let sock = dataplane_socket(&h);
    let engine = Engine::start(&h, &["--control-socket", sock.to_str().unwrap()]).expect("engine");
    let nginx = Nginx::start(&h, 443).expect("nginx");
    let size = 3 * MIB;
    let sha = nginx.add_file("blob", size, 17).unwrap();
    let unchanged = |what: &str, transfers: u64| {
        let r = engine
            .wait_stats(what, Duration::from_secs(30), |r| {
                // Every byte of the bodies went through a worker.
                (r.xdp.get("steer").map_or(0, |c| c.bytes) >= transfers * size as u64
                    && r.worker_sum(|c| c.tx_inside.bytes) >= transfers * size as u64)
                    .then(|| r.clone())
            })
            .unwrap();
        assert!(r.policy.is_none(), "{:?}", r.policy);
        assert_eq!(r.split_total(), Default::default(), "{what}");
        assert_eq!(r.xdp_packets("flow_bypass"), 0);
        assert_eq!(r.xdp_packets("flow_drop"), 0);
    };

    // No daemon at all.
    for addr in [SERVER_V4, SERVER_V6] {
        let (got, len) = curl_sha256(&h, &nginx.curl_args(addr, "blob")).unwrap();
        assert_eq!((got, len), (sha.clone(), size as u64), "{addr}");
    }
    unchanged("two transfers through the workers", 2);
    assert!(dataplane_status(&sock)["status"]["policy"].is_null());

    // A daemon without a policy changes nothing.
    let control = Control::start(&h, &sock, None, &[]).expect("control");
    control.wait_connected().unwrap();
    let (got, _) = curl_sha256(&h, &nginx.curl_args(SERVER_V4, "blob")).unwrap();
    assert_eq!(got, sha);
    unchanged("a third transfer through the workers", 3);
    assert!(control.records().is_empty(), "{:?}", control.records());

    // The first policy decides the next connection.
    let p = policy(
        &h,
        "p.toml",
        "[[rules]]\nname = \"split-all\"\naction = \"tcp-split\"\n",
    );
    let out = control
        .cli(&["policy", "apply", p.to_str().unwrap()])
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(control.wait_in_sync().unwrap(), 1);
    let (got, _) = curl_sha256(&h, &nginx.curl_args(SERVER_V4, "blob")).unwrap();
    assert_eq!(got, sha);
    engine
        .wait_stats(
            "the split under the first policy",
            Duration::from_secs(30),
            |r| (r.split_total().split == 1).then_some(()),
        )
        .unwrap();
}

/// A client with Python's ClientHello for `name`, sent by a real Linux
/// stack in one of these ways (`how`):
/// - a number, or `all`: that many bytes of it (or all), corked so that the
///   FIN it closes with at once rides on the segment with its last bytes;
/// - `dup`: whole, with a second server_name extension naming `name`;
/// - `nul`: whole, its only server_name `name` with a NUL after it.
///
/// Prints its local port, then `reset` or `eof` and what it read, in hex.
const HOSTILE_CLIENT: &str = r#"
import socket, ssl, struct, sys
name, how, addr = sys.argv[1], sys.argv[2], sys.argv[3]
malform = how in ("dup", "nul")
inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
ctx = ssl.create_default_context()
ctx.check_hostname = False
tls = ctx.wrap_bio(inc, out, server_hostname=None if how == "nul" else name)
try:
    tls.do_handshake()
except ssl.SSLWantReadError:
    pass
hello = out.read()
if malform:
    body = hello[9:]
    i = 2 + 32
    i += 1 + body[i]
    i += 2 + struct.unpack(">H", body[i:i + 2])[0]
    i += 1 + body[i]
    host = name.encode() + (b"\0" if how == "nul" else b"")
    sni = struct.pack(">HHHBH", 0, len(host) + 5, len(host) + 3, 0, len(host)) + host
    exts = body[i + 2:] + sni
    body = body[:i] + struct.pack(">H", len(exts)) + exts
    msg = bytes([1]) + struct.pack(">I", len(body))[1:] + body
    hello = bytes([22, 3, 1]) + struct.pack(">H", len(msg)) + msg
elif how != "all":
    hello = hello[:int(how)]
s = socket.create_connection((addr, 443), timeout=30)
print("port", s.getsockname()[1], flush=True)
if not malform:
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
s.sendall(hello)
if not malform:
    s.shutdown(socket.SHUT_WR)
got = b""
try:
    while True:
        b = s.recv(4096)
        if not b:
            break
        got += b
    print("eof", got.hex())
except ConnectionResetError:
    print("reset", got.hex())
"#;

/// Runs [`HOSTILE_CLIENT`] for `name` and `how`; returns its port and its
/// outcome line.
fn hostile_client(h: &Harness, name: &str, how: &str) -> (u16, String) {
    let out = h
        .client
        .command("python3")
        .args(["-c", HOSTILE_CLIENT, name, how, SERVER_V4])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines = text.lines();
    let port = lines
        .next()
        .and_then(|l| l.strip_prefix("port "))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{text}"));
    (port, lines.next().unwrap_or("").to_string())
}

/// A client that closes during the hold, its FIN on the segment with the
/// last bytes it sends, under a block on server names: with its
/// ClientHello cut short the name never comes and it is reset (a block
/// might apply); with the whole ClientHello it is blocked by its name and
/// reads the alert. Either way the server gets the connection's
/// handshake and a RST, never a byte.
#[test]
fn a_client_closing_during_the_hold_cannot_escape_a_block() {
    let b = BlockBench::new(2);
    let (h, control) = (&b.h, &b.control);
    let tap = h
        .client
        .enter(|| loupe_tests::raw::RawSocket::open(loupe_tests::harness::PEER_IF))
        .unwrap()
        .unwrap();

    let (cut_port, cut) = hostile_client(h, "x.malware.loupe.test", "100");
    assert!(cut.starts_with("reset"), "{cut}");
    let (whole_port, whole) = hostile_client(h, "x.malware.loupe.test", "all");
    // access_denied, then the engine's FIN.
    assert_eq!(whole, "eof 15030300020231");

    // Both FINs rode on data, as meant.
    let mut fin_with_data = Vec::new();
    let mut buf = vec![0u8; 4096];
    wait_until(
        "the clients' FINs on the tap",
        Duration::from_secs(30),
        || {
            while let Some(n) = tap
                .recv(&mut buf, Duration::from_millis(50))
                .map_err(|e| e.to_string())?
            {
                if let Ok(p) = loupe_dataplane::wire::segment::parse_segment(&buf[..n]) {
                    if p.key.dst_port == 443 && p.segment.flags.fin && !p.segment.payload.is_empty()
                    {
                        fin_with_data.push(p.key.src_port);
                    }
                }
            }
            if fin_with_data.contains(&cut_port) && fin_with_data.contains(&whole_port) {
                Ok(Some(()))
            } else {
                Err(format!("FINs on data from ports {fin_with_data:?}"))
            }
        },
    )
    .unwrap();

    let r = b.all_refused_unread(&[cut_port, whole_port]);
    assert_eq!((r.split, r.policy_pass, r.held), (0, 0, 2), "{r:?}");
    let cut_rec = control
        .wait_record("the cut one's record", |r| {
            field(r, "client") == format!("{CLIENT_V4}:{cut_port}")
        })
        .unwrap();
    assert_eq!(
        (field(&cut_rec, "rule"), field(&cut_rec, "end")),
        ("block-malware", "blocked")
    );
    assert!(cut_rec["sni"].is_null(), "{cut_rec}");
    assert!(
        field(&cut_rec, "note").contains("closed before"),
        "{cut_rec}"
    );
    let whole_rec = control
        .wait_record("the whole one's record", |r| {
            field(r, "client") == format!("{CLIENT_V4}:{whole_port}")
        })
        .unwrap();
    assert_eq!(
        (field(&whole_rec, "rule"), field(&whole_rec, "sni")),
        ("block-malware", "x.malware.loupe.test")
    );
}

/// The engine and its daemon under [`SNI_POLICY`], before a plain TCP
/// server on port 443 that records what it reads from each of the first
/// `n` connections it accepts: (client port, bytes, how it ended).
struct BlockBench {
    h: Harness,
    engine: Engine,
    control: Control,
    n: usize,
    server: std::cell::Cell<Option<std::thread::JoinHandle<ServerReads>>>,
}

type ServerReads = Vec<(u16, usize, Result<usize, std::io::ErrorKind>)>;

impl BlockBench {
    fn new(n: usize) -> BlockBench {
        let h = Harness::new(HarnessConfig::default()).expect("harness");
        let p = policy(&h, "sni.toml", SNI_POLICY);
        let (engine, control) = start(&h, Some(&p));
        control.wait_in_sync().unwrap();
        let listener = loupe_tests::tcp::listen(&h.server, &format!("{SERVER_V4}:443")).unwrap();
        listener.set_nonblocking(true).unwrap();
        let server = std::thread::spawn(move || {
            let mut got = Vec::new();
            let deadline = std::time::Instant::now() + Duration::from_secs(120);
            while got.len() < n && std::time::Instant::now() < deadline {
                match listener.accept() {
                    Ok((mut s, peer)) => {
                        s.set_nonblocking(false).unwrap();
                        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                        let mut buf = Vec::new();
                        let end = std::io::Read::read_to_end(&mut s, &mut buf);
                        got.push((peer.port(), buf.len(), end.map_err(|e| e.kind())));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
            got
        });
        BlockBench {
            h,
            engine,
            control,
            n,
            server: std::cell::Cell::new(Some(server)),
        }
    }

    /// Checks that the server read nothing from the clients on `ports` and
    /// saw each reset, and that all `n` were refused; returns the counters.
    fn all_refused_unread(&self, ports: &[u16]) -> loupe_dataplane::stats::SplitCounters {
        let server = self.server.take().expect("checked once");
        let mut accepted = server.join().unwrap();
        accepted.sort();
        let mut want: Vec<_> = ports
            .iter()
            .map(|p| (*p, 0, Err(std::io::ErrorKind::ConnectionReset)))
            .collect();
        want.sort();
        assert_eq!(accepted, want, "what the server read");
        let n = self.n as u64;
        self.engine
            .wait_stats("the refusals in the stats", Duration::from_secs(30), |r| {
                (r.split_total().refused == n).then(|| r.split_total())
            })
            .unwrap()
    }
}

/// ClientHellos for a blocked name, malformed on purpose (the server_name
/// extension twice; a NUL in the name), to a plain TCP server that would
/// read the name: each is blocked as one without a name (a block might
/// apply), the server reads nothing, and the records say why. They used
/// to be relayed as "not TLS", byte for byte.
#[test]
fn a_malformed_server_name_cannot_get_past_a_block() {
    let b = BlockBench::new(2);
    let mut ports = Vec::new();
    for (how, why) in [
        ("dup", "the server_name extension appears more than once"),
        ("nul", "a NUL byte in the host name"),
    ] {
        let (port, outcome) = hostile_client(&b.h, "x.malware.loupe.test", how);
        // Refused with a RST: nothing of the server's comes back.
        assert_eq!(outcome, "reset ", "{how}");
        let rec = b
            .control
            .wait_record("the malformed one's record", |r| {
                field(r, "client") == format!("{CLIENT_V4}:{port}")
            })
            .unwrap();
        assert_eq!(
            (
                field(&rec, "rule"),
                field(&rec, "end"),
                field(&rec, "sni_malformed")
            ),
            ("block-malware", "blocked", why),
            "{rec}"
        );
        assert!(rec["sni"].is_null(), "{rec}");
        ports.push(port);
    }
    let r = b.all_refused_unread(&ports);
    assert_eq!(
        (r.split, r.sni_malformed, r.hello_malformed),
        (0, 2, 2),
        "{r:?}"
    );
}

/// Each malformed policy is refused with its error, and the running one
/// stays: same version, same digest, still deciding.
#[test]
fn malformed_policies_are_refused_and_the_running_one_stays() {
    let h = Harness::new(HarnessConfig::default()).expect("harness");
    let good = policy(
        &h,
        "good.toml",
        "[[rules]]\nname = \"split-all\"\naction = \"tcp-split\"\n",
    );
    let (engine, control) = start(&h, Some(&good));
    assert_eq!(control.wait_in_sync().unwrap(), 1);
    let digest = engine
        .wait_stats("the policy in the stats", Duration::from_secs(30), |r| {
            r.policy.as_ref().map(|p| p.digest.clone())
        })
        .unwrap();
    // The digest of what runs is that of the file applied (it names no
    // category file).
    assert_eq!(digest, hex(&Sha256::digest(std::fs::read(&good).unwrap())));
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../control/tests/policies/bad");
    let mut files: Vec<_> = std::fs::read_dir(&corpus)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 20);
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let expect = text
            .lines()
            .next()
            .unwrap()
            .trim_start_matches("# expect: ");
        let msg = expect.split_once(": ").unwrap().1;
        let out = control
            .cli(&["policy", "apply", f.to_str().unwrap()])
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{}: {err}", f.display());
        assert!(
            err.contains(msg),
            "{}: expected {msg:?} in {err}",
            f.display()
        );
        assert!(err.contains("the running policy is unchanged"), "{err}");
    }
    // A policy that checks but is written for another dataplane.
    let other = policy(
        &h,
        "other.toml",
        "[dataplane]\ninside = \"eth7\"\n[[rules]]\nname = \"x\"\naction = \"block\"\n",
    );
    let out = control
        .cli(&["policy", "apply", other.to_str().unwrap()])
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("inside = \"eth7\""),
        "{err}"
    );
    // Nothing changed.
    let r = engine.stats().unwrap();
    let p = r.policy.unwrap();
    assert_eq!((p.version, p.digest), (1, digest));
    let s = control.status().unwrap();
    assert_eq!(s["control"]["in_sync"], true);
    // ...and the running policy still decides.
    let nginx = Nginx::start(&h, 443).expect("nginx");
    curl_sha256(&h, &nginx.curl_args(SERVER_V4, "index.html")).unwrap();
    engine
        .wait_stats(
            "a split by the running policy",
            Duration::from_secs(30),
            |r| (r.split_total().split == 1).then_some(()),
        )
        .unwrap();
    let m = control.metrics().unwrap();
    let rejected = format!("loupe_policy_rejections_total {}\n", files.len() + 1);
    assert!(m.contains(&rejected), "{m}");
}

/// Waits until `n` flow records wait in the dataplane.
fn wait_backlog(sock: &Path, n: u64, what: &str) {
    wait_until(what, Duration::from_secs(60), || {
        let q = dataplane_status(sock)["status"]["log_queue"].clone();
        if q["backlog"] == n {
            Ok(Some(()))
        } else {
            Err(q.to_string())
        }
    })
    .unwrap();
}

/// Status of the dataplane's own socket, asked directly.
fn dataplane_status(sock: &Path) -> Value {
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(b"{\"op\":\"status\"}\n").unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(s), &mut line).unwrap();
    serde_json::from_str(&line).unwrap()
}

#[test]
fn the_dataplane_outlives_control_and_resyncs() {
    let h = Harness::new(HarnessConfig::default()).expect("harness");
    let p = policy(
        &h,
        "p.toml",
        "[[rules]]\nname = \"split-lab\"\ndst = [\"198.18.0.0/24\"]\naction = \"tcp-split\"\n",
    );
    let sock = dataplane_socket(&h);
    let (engine, mut control) = start(&h, Some(&p));
    control.wait_in_sync().unwrap();
    let nginx = Nginx::start(&h, 443).expect("nginx");
    let sha = nginx.add_file("blob", MIB, 3).unwrap();

    // Control dies: traffic goes on under the last policy; its records
    // wait in the dataplane.
    control.kill();
    for _ in 0..3 {
        let (got, _) = curl_sha256(&h, &nginx.curl_args(SERVER_V4, "blob")).unwrap();
        assert_eq!(got, sha);
    }
    engine
        .wait_stats(
            "three splits under the last policy",
            Duration::from_secs(60),
            |r| (r.split_total().split == 3).then_some(()),
        )
        .unwrap();
    wait_until(
        "the records queued in the dataplane",
        Duration::from_secs(60),
        || {
            let s = dataplane_status(&sock);
            let q = &s["status"]["log_queue"];
            if q["backlog"] == 3 && q["subscribed"] == false {
                Ok(Some(()))
            } else {
                Err(q.to_string())
            }
        },
    )
    .unwrap();
    assert_eq!(control.records().len(), 0);

    // Control comes back: in sync at once, the queued records logged.
    control.restart().unwrap();
    assert_eq!(
        control.wait_in_sync().unwrap(),
        1,
        "no new version: nothing changed"
    );
    wait_until(
        "the queued records in the log",
        Duration::from_secs(60),
        || {
            let n = control.records().len();
            if n == 3 {
                Ok(Some(()))
            } else {
                Err(format!("{n} records"))
            }
        },
    )
    .unwrap();
    assert!(control
        .records()
        .iter()
        .all(|r| field(r, "rule") == "split-lab"));
    // Written, so acknowledged: nothing waits in the dataplane any more,
    // and a daemon restarted again writes nothing twice.
    wait_backlog(&sock, 0, "the records acknowledged");
    let seqs: Vec<u64> = control
        .records()
        .iter()
        .filter_map(|r| r["seq"].as_u64())
        .collect();
    assert_eq!(seqs, vec![1, 2, 3]);
    control.restart().unwrap();
    control.wait_in_sync().unwrap();
    assert_eq!(control.records().len(), 3);

    // The dataplane restarts (no policy): control re-syncs it.
    let (st, clean, _, err) = engine.stop();
    assert!(clean && st.success(), "{err}");
    let engine =
        Engine::start(&h, &["--control-socket", sock.to_str().unwrap()]).expect("engine again");
    assert_eq!(
        control.wait_in_sync().unwrap(),
        2,
        "re-applied under a new version"
    );
    engine
        .wait_stats(
            "the re-synced policy in the stats",
            Duration::from_secs(30),
            |r| {
                r.policy
                    .as_ref()
                    .filter(|p| p.version == 2 && p.rules == 1)
                    .map(|_| ())
            },
        )
        .unwrap();
    let (got, _) = curl_sha256(&h, &nginx.curl_args(SERVER_V4, "blob")).unwrap();
    assert_eq!(got, sha);
    engine
        .wait_stats(
            "a split under the re-synced policy",
            Duration::from_secs(30),
            |r| (r.split_total().split == 1).then_some(()),
        )
        .unwrap();
    let out = String::from_utf8(std::fs::read(&control.output).unwrap()).unwrap();
    assert!(out.contains("re-synced to policy version 2"), "{out}");
}

/// A profile's trust store deleted after the policy was applied: a
/// restarted dataplane still gets the whole policy (its block rule above
/// all), with a warning naming the file, instead of no policy at all.
#[test]
fn a_saved_policy_whose_trust_store_is_gone_still_resyncs() {
    let h = Harness::new(HarnessConfig::default()).expect("harness");
    let roots = h.dir.join("roots.pem");
    std::fs::copy("/etc/ssl/certs/ca-certificates.crt", &roots).unwrap();
    let p = policy(
        &h,
        "p.toml",
        "[profiles.strict]\ntrust_store = \"roots.pem\"\n\
         [[rules]]\nname = \"no-bank\"\nsni = [\"*.bank.loupe.test\"]\naction = \"block\"\n\
         [[rules]]\nname = \"inspect\"\ndst = [\"198.18.0.0/24\"]\naction = \"decrypt\"\n\
         profile = \"strict\"\n",
    );
    let sock = dataplane_socket(&h);
    let (engine, control) = start(&h, Some(&p));
    assert_eq!(control.wait_in_sync().unwrap(), 1);
    std::fs::remove_file(&roots).unwrap();
    let (st, clean, _, err) = engine.stop();
    assert!(clean && st.success(), "{err}");
    let engine =
        Engine::start(&h, &["--control-socket", sock.to_str().unwrap()]).expect("engine again");
    assert_eq!(control.wait_in_sync().unwrap(), 2, "re-applied");
    engine
        .wait_stats("the whole policy re-synced", Duration::from_secs(30), |r| {
            r.policy.as_ref().filter(|p| p.rules == 2).map(|_| ())
        })
        .unwrap();
    let out = String::from_utf8_lossy(&std::fs::read(&control.output).unwrap()).into_owned();
    assert!(
        out.contains("warning: trust_store") && out.contains("roots.pem"),
        "{out}"
    );
}

/// Runs `loupe --socket SOCK status` as nobody.
fn as_nobody(sock: &Path) -> (Option<i32>, String) {
    let bin = loupe_tests::workspace_bin("loupe");
    let child = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(bin)
        .arg("--socket")
        .arg(sock)
        .arg("status")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut p = Proc::new("loupe as nobody", child);
    let (st, _) = p.wait_timeout(Duration::from_secs(60));
    let (_, err) = p.take_output();
    (st.code(), err)
}

#[test]
fn users_other_than_root_are_refused_on_both_sockets() {
    let h = Harness::new(HarnessConfig::default()).expect("harness");
    let (engine, control) = start(&h, None);
    // Let nobody reach the sockets' directory: the sockets' own mode and
    // the peer check are what must refuse.
    std::fs::set_permissions(&h.dir, std::fs::Permissions::from_mode(0o711)).unwrap();
    let dp = dataplane_socket(&h);
    for sock in [&control.socket, &dp] {
        let mode = std::fs::metadata(sock).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660, "{}", sock.display());
        let (code, err) = as_nobody(sock);
        assert_eq!(code, Some(1), "{err}");
        assert!(err.contains("Permission denied"), "{err}");
    }
    // Even with the file opened to everyone, SO_PEERCRED refuses.
    for sock in [&control.socket, &dp] {
        std::fs::set_permissions(sock, std::fs::Permissions::from_mode(0o666)).unwrap();
        let (code, err) = as_nobody(sock);
        assert_eq!(code, Some(1), "{err}");
        assert!(err.contains("permission denied: uid 65534"), "{err}");
    }
    // Root still gets in.
    let s = control.status().unwrap();
    assert_eq!(s["control"]["dataplane_connected"], true);
    drop(engine);
}

/// More records than the dataplane sends ahead (its window) wait while the
/// daemon is away; all of them reach the log once it is back, once each.
#[test]
fn a_large_backlog_reaches_the_log_whole() {
    let h = Harness::new(HarnessConfig::default()).expect("harness");
    let p = policy(
        &h,
        "p.toml",
        "[[rules]]\nname = \"pass-all\"\naction = \"no-decrypt\"\n",
    );
    let sock = dataplane_socket(&h);
    let (engine, mut control) = start(&h, Some(&p));
    control.wait_in_sync().unwrap();
    let nginx = Nginx::start(&h, 443).expect("nginx");
    control.kill();
    const N: usize = 1500;
    let args = nginx.curl_args_many(SERVER_V4, "index.html", N);
    let out = h.client.command("curl").args(&args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_backlog(&sock, N as u64, "every record queued");
    control.restart().unwrap();
    wait_until("every record in the log", Duration::from_secs(120), || {
        let n = control.records().len();
        if n == N {
            Ok(Some(()))
        } else {
            Err(format!("{n} records"))
        }
    })
    .unwrap();
    let seqs: Vec<u64> = control
        .records()
        .iter()
        .filter_map(|r| r["seq"].as_u64())
        .collect();
    assert_eq!(seqs, (1..=N as u64).collect::<Vec<_>>());
    wait_backlog(&sock, 0, "every record acknowledged");
    assert_eq!(engine.stats().unwrap().split_total().log_dropped, 0);
}

/// A connection that reuses the ports of one the policy passed (its
/// flow is bypassed in XDP both ways) is decided afresh: the old
/// verdict must not carry a blocked server name past the policy.
#[test]
fn reused_ports_do_not_inherit_a_pass() {
    let h = Harness::new(HarnessConfig::default()).expect("harness");
    let p = policy(&h, "sni.toml", SNI_POLICY);
    let (engine, control) = start(&h, Some(&p));
    control.wait_in_sync().unwrap();
    let nginx = Nginx::start(&h, 443).expect("nginx");
    let run = |name: &str| {
        let mut args = nginx.curl_args_for(name, SERVER_V4, "index.html");
        // The same client port both times; the server closes first, so
        // the client's side is free at once.
        args.splice(
            0..0,
            ["--local-port", "40123", "-H", "Connection: close"].map(String::from),
        );
        h.client.command("curl").args(&args).output().unwrap()
    };
    let first = run("www.bank.loupe.test");
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    engine
        .wait_stats("the pass installed", Duration::from_secs(30), |r| {
            (r.split_total().released >= 1).then_some(())
        })
        .unwrap();
    let second = run("x.malware.loupe.test");
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(35), "{err}");
    assert!(err.contains("alert access denied"), "{err}");
    let rec = control
        .wait_record("the block on the reused ports", |r| {
            field(r, "rule") == "block-malware"
        })
        .unwrap();
    assert_eq!(field(&rec, "client"), "198.18.0.1:40123");
}

/// Idle connections fill neither socket for long: with more of them than
/// either serves at once, `loupe status` is answered (the dataplane
/// reached, the policy running), a policy is applied, and a restarted
/// daemon reaches the dataplane again, each in seconds (idle clients used
/// to lock the CLI out for 30 s and the daemon for 60 s).
#[test]
fn idle_connections_lock_out_neither_the_cli_nor_the_daemon() {
    let h = Harness::new(HarnessConfig::default()).expect("harness");
    let first = policy(
        &h,
        "first.toml",
        "[[rules]]\nname = \"split-all\"\naction = \"tcp-split\"\n",
    );
    let second = policy(
        &h,
        "second.toml",
        "[[rules]]\nname = \"pass-all\"\naction = \"no-decrypt\"\n",
    );
    let (_engine, mut control) = start(&h, Some(&first));
    assert_eq!(control.wait_in_sync().unwrap(), 1);
    let sock = dataplane_socket(&h);
    // More idle connections than either socket serves at once.
    let idle = loupe_dataplane::api::unix::MAX_CLIENTS + 8;
    let mut held = Vec::new();
    for path in [&control.socket, &sock] {
        for _ in 0..idle {
            held.push(std::os::unix::net::UnixStream::connect(path).unwrap());
        }
    }
    // Far below the old lock-outs, and generous for a loaded machine.
    let soon = Duration::from_secs(10);
    assert_eq!(control.wait_in_sync_within(soon).unwrap(), 1);
    let out = control
        .cli(&["policy", "apply", second.to_str().unwrap()])
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(control.wait_in_sync_within(soon).unwrap(), 2);
    // A restarted daemon reaches the dataplane through the idle crowd.
    for _ in 0..idle {
        held.push(std::os::unix::net::UnixStream::connect(&sock).unwrap());
    }
    control.restart().unwrap();
    assert_eq!(control.wait_in_sync_within(soon).unwrap(), 2);
    drop(held);
}
