//! The tcp-split action with real Linux TCP stacks at both ends: the engine
//! terminates the client's connection as the server and the server's as the
//! client, continuing both sequence spaces and options, and relays the
//! byte streams. TLS runs end to end over the two halves, so curl and
//! nginx see nothing but their own certificates and bytes.

use std::time::Duration;

use loupe_dataplane::stats::StatsReport;
use loupe_tests::{
    engine::Engine,
    harness::{SERVER_V4, SERVER_V6},
    https::{curl_sha256, Nginx},
    Harness, HarnessConfig,
};

const MIB: usize = 1 << 20;

fn split_totals(r: &StatsReport) -> (u64, u64, u64, u64) {
    let s = r.split_total();
    (s.split, s.bytes_s2c, s.bad_checksum, s.passthrough)
}

fn https_through_split(server: &str, size: usize) {
    let h = Harness::new(HarnessConfig::default()).expect("harness");
    let engine = Engine::start(&h, &["--tcp-split"]).expect("engine");
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
    let (status, clean, out, err) = engine.stop();
    assert!(clean && status.success(), "engine exit {status}: {err}");
    // The final report says what the split did.
    assert!(out.contains("tcp-split: 1 split"), "{out}");
}

#[test]
fn https_ipv4_over_a_split_connection() {
    https_through_split(SERVER_V4, 3 * MIB);
}

#[test]
fn https_ipv6_over_a_split_connection() {
    https_through_split(SERVER_V6, 3 * MIB);
}

#[test]
fn sixty_four_mib_byte_exact_over_a_split_connection() {
    https_through_split(SERVER_V4, 64 * MIB);
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
