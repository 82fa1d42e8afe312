//! The tcp-split action with real Linux TCP stacks at both ends: the engine
//! terminates the client's connection as the server and the server's as the
//! client, continuing both sequence spaces and options, and relays the
//! byte streams. TLS runs end to end over the two halves, so curl and
//! nginx see nothing but their own certificates and bytes. The hold and
//! its three outcomes (split, pass, block) work alike over IPv4, IPv6
//! and VLAN-tagged frames.

use std::time::Duration;

use loupe_dataplane::stats::StatsReport;
use loupe_tests::{
    control::{dataplane_socket, Control},
    engine::Engine,
    harness::{Link, SERVER_V4, SERVER_V6},
    https::{curl_sha256, Nginx},
    impair::ImpairProc,
    Harness, HarnessConfig,
};

const MIB: usize = 1 << 20;

fn split_totals(r: &StatsReport) -> (u64, u64, u64, u64) {
    let s = r.split_total();
    (s.split, s.bytes_s2c, s.bad_checksum, s.passthrough)
}

/// One HTTPS transfer of `size` bytes through a split. The connection's
/// handshake is steered to the worker, or with `extra` =
/// `--handshake-fast-path` takes the XDP fast path (recorded, taken up
/// from the record at the ClientHello).
fn https_through_split(server: &str, size: usize, extra: &[&str]) {
    let h = Harness::new(HarnessConfig::default()).expect("harness");
    let steered = !extra.contains(&"--handshake-fast-path");
    let engine = Engine::start(&h, &[&["--tcp-split"], extra].concat()).expect("engine");
    let nginx = Nginx::start(&h, 443).expect("nginx");
    let sha = nginx.add_file("blob", size, 99).expect("file");
    let (got, len) = curl_sha256(&h, &nginx.curl_args(server, "blob")).expect("curl");
    assert_eq!(len, size as u64);
    assert_eq!(got, sha, "body differs from the file served");
    let r = engine
        .wait_stats("the split in the counters", Duration::from_secs(30), |r| {
            let (split, s2c, _, _) = split_totals(r);
            (split >= 1 && s2c >= size as u64).then(|| r.clone())
        })
        .unwrap();
    let (_, _, bad, pass) = split_totals(&r);
    assert_eq!(
        (bad, pass),
        (0, 0),
        "{:?}",
        r.workers.iter().map(|w| w.split).collect::<Vec<_>>()
    );
    // SYN, SYN-ACK and the client's ACK in the kernel, or all steered.
    let s = r.split_total();
    let in_kernel = r.xdp_packets("handshake");
    if steered {
        assert_eq!((in_kernel, s.handshakes_adopted), (0, 0), "{s:?}");
    } else {
        assert!(in_kernel >= 3, "{in_kernel} handshake frames in the kernel");
        assert_eq!(
            (s.handshakes_adopted, s.handshakes_unusable),
            (1, 0),
            "{s:?}"
        );
    }
    let (status, clean, out, err) = engine.stop();
    assert!(clean && status.success(), "engine exit {status}: {err}");
    // The final report says what the split did.
    assert!(out.contains("tcp-split: 1 split"), "{out}");
}

#[test]
fn https_ipv4_over_a_split_connection() {
    https_through_split(SERVER_V4, 3 * MIB, &[]);
}

#[test]
fn https_ipv6_over_a_split_connection() {
    https_through_split(SERVER_V6, 3 * MIB, &[]);
}

#[test]
fn https_over_a_split_connection_with_the_handshake_on_the_fast_path() {
    https_through_split(SERVER_V4, 3 * MIB, &["--handshake-fast-path"]);
    https_through_split(SERVER_V6, 3 * MIB, &["--handshake-fast-path"]);
}

#[test]
fn sixty_four_mib_byte_exact_over_a_split_connection() {
    https_through_split(SERVER_V4, 64 * MIB, &[]);
}

#[test]
fn an_exempt_server_name_is_released_to_the_fast_path_unchanged() {
    let h = Harness::new(HarnessConfig::default()).expect("harness");
    let engine =
        Engine::start(&h, &["--tcp-split", "--split-exempt-sni", "*.loupe.test"]).expect("engine");
    let nginx = Nginx::start(&h, 443).expect("nginx");
    let size = 16 * MIB;
    let sha = nginx.add_file("blob", size, 7).expect("file");
    // curl names server.loupe.test in its ClientHello: held, then passed.
    let (got, len) = curl_sha256(&h, &nginx.curl_args(SERVER_V4, "blob")).expect("curl");
    assert_eq!((got, len), (sha, size as u64));
    let r = engine
        .wait_stats("the pass in the counters", Duration::from_secs(30), |r| {
            let s = r.split_total();
            // The report is written every 100 ms: wait for one written
            // after the transfer.
            (s.policy_pass >= 1 && s.released >= 1 && r.xdp_packets("flow_bypass") > 10_000)
                .then(|| r.clone())
        })
        .unwrap();
    let s = r.split_total();
    assert_eq!((s.split, s.hellos, s.held), (0, 1, 1), "{s:?}");
    // After the release the transfer ran on the XDP fast path: the
    // workers forwarded the handshake, the ClientHello and what arrived
    // before the engine installed the verdict; the fast path the rest.
    let bypassed = r.xdp_packets("flow_bypass");
    let in_userspace = r.worker_sum(|c| c.rx_inside.packets + c.rx_outside.packets);
    eprintln!("{bypassed} frames bypassed, {in_userspace} in userspace");
    assert!(
        bypassed > 10_000 && in_userspace * 20 < bypassed,
        "{bypassed} frames bypassed, {in_userspace} in userspace"
    );
    engine.stop();
}

/// Each connection to each of `servers` three ways, under a policy that
/// splits by default, passes `*.bank.loupe.test` and blocks
/// `*.malware.loupe.test`: every ClientHello is held until it is whole,
/// then split (byte-exact through the halves), passed (the held frames
/// released unchanged, the rest on the XDP fast path) or blocked (curl
/// reads the alert; the server gets nothing). Checks the engine's
/// counters and the flow log; returns the engine's last report.
fn held_then_split_passed_or_blocked(h: &Harness, servers: &[&str]) -> StatsReport {
    let policy = h.dir.join("policy.toml");
    std::fs::write(
        &policy,
        "[policy]\ndefault_action = \"tcp-split\"\n\
         [[rules]]\nname = \"pass-bank\"\nsni = [\"*.bank.loupe.test\"]\naction = \"no-decrypt\"\n\
         [[rules]]\nname = \"block-malware\"\nsni = [\"*.malware.loupe.test\"]\naction = \"block\"\n",
    )
    .unwrap();
    let sock = dataplane_socket(h);
    let engine = Engine::start(h, &["--control-socket", sock.to_str().unwrap()]).expect("engine");
    let control = Control::start(h, &sock, Some(&policy), &[]).expect("control");
    control.wait_in_sync().unwrap();
    let nginx = Nginx::start(h, 443).expect("nginx");
    // Large enough that the trunks carry well over a thousand frames each
    // way even as the engine acknowledges once per receive batch.
    let size = 4 * MIB;
    let sha = nginx.add_file("blob", size, 21).unwrap();

    for addr in servers {
        let (got, len) = curl_sha256(h, &nginx.curl_args(addr, "blob"))
            .unwrap_or_else(|e| panic!("split to {addr}: {e}"));
        assert_eq!((got, len), (sha.clone(), size as u64), "split to {addr}");
        let bank = nginx.curl_args_for("www.bank.loupe.test", addr, "blob");
        let (got, len) = curl_sha256(h, &bank).unwrap_or_else(|e| panic!("pass to {addr}: {e}"));
        assert_eq!((got, len), (sha.clone(), size as u64), "pass to {addr}");
        let bad = nginx.curl_args_for("x.malware.loupe.test", addr, "blob");
        let out = h.client.command("curl").args(&bad).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(35), "block to {addr}: {err}");
        assert!(
            err.contains("alert access denied"),
            "block to {addr}: {err}"
        );
    }
    let n = servers.len() as u64;
    let r = engine
        .wait_stats(
            "every decision in the stats",
            Duration::from_secs(60),
            |r| {
                let s = r.split_total();
                // Each passed transfer went (mostly) on the fast path.
                (s.split == n
                    && s.policy_pass == n
                    && s.refused == n
                    && r.xdp_packets("flow_bypass") > n * 1000)
                    .then(|| r.clone())
            },
        )
        .unwrap();
    let s = r.split_total();
    assert_eq!((s.held, s.hellos, s.released), (3 * n, 3 * n, n), "{s:?}");
    assert_eq!((s.bad_checksum, s.passthrough), (0, 0), "{s:?}");

    // One record per connection, with its server and outcome.
    for addr in servers {
        let server = if addr.contains(':') {
            format!("[{addr}]:443")
        } else {
            format!("{addr}:443")
        };
        for (rule, end) in [
            ("(default)", None),
            ("pass-bank", Some("bypass")),
            ("block-malware", Some("blocked")),
        ] {
            let rec = control
                .wait_record(&format!("{rule} to {server}"), |r| {
                    r["server"] == server.as_str() && r["rule"] == rule
                })
                .unwrap();
            match end {
                Some(end) => assert_eq!(rec["end"], end, "{rec}"),
                None => assert!(rec["bytes_s2c"].as_u64().unwrap() >= size as u64, "{rec}"),
            }
        }
    }
    let (status, clean, _, err) = engine.stop();
    assert!(clean && status.success(), "engine exit {status}: {err}");
    r
}

#[test]
fn ipv6_connections_are_held_then_split_passed_or_blocked() {
    let h = Harness::new(HarnessConfig::default()).expect("harness");
    let r = held_then_split_passed_or_blocked(&h, &[SERVER_V6]);
    assert_eq!(r.xdp_packets("tag_vlan"), 0);
}

/// The same over a VLAN: `loupe-impair --vlan` on both links tags every
/// frame of the connections on its way to the engine and untags it on
/// its way out, dropping (and counting) any that comes back without the
/// tag. The engine's classifier walks the tag, its hold keeps the tagged
/// frames and releases them as they came, and the halves build theirs
/// with it.
#[test]
fn vlan_tagged_connections_are_held_then_split_passed_or_blocked() {
    let h = Harness::new(HarnessConfig {
        impair: true,
        ..HarnessConfig::default()
    })
    .expect("harness");
    let trunks = [Link::Client, Link::Server]
        .map(|link| ImpairProc::start(&h, link, &["--vlan", "100"]).expect("loupe-impair --vlan"));
    let r = held_then_split_passed_or_blocked(&h, &[SERVER_V4, SERVER_V6]);
    // Every TCP frame the engine saw was tagged (ARP and neighbour
    // discovery cross the trunks untagged).
    let other = r.xdp_packets("pass_non_ip") + r.xdp_packets("pass_non_tcp");
    assert_eq!(
        r.xdp_packets("tag_vlan") + other,
        r.xdp_packets("rx"),
        "{r:?}"
    );
    assert!(r.xdp_packets("tag_vlan") > 4 * 1000, "{r:?}");
    for t in trunks {
        let (to_engine, from_engine) = t.stop().unwrap();
        assert!(to_engine.frames > 1000, "{to_engine:?}");
        assert_eq!(
            from_engine.untagged, 0,
            "frames came back without their tag"
        );
        assert_eq!(to_engine.no_buffer + from_engine.no_buffer, 0);
    }
}
