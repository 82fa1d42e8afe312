//! Volume through decryption, byte-exact: 256 MiB down and 256 MiB up on
//! one connection, 500 decrypted connections at once, and 64 MiB each way
//! over links with loss, reordering and duplication (`loupe-impair`).

use std::time::Duration;

use loupe_tests::{
    harness::{SERVER_V4, SERVER_V6},
    https::SERVER_NAME,
    impair::{ImpairProc, LOSSY},
    mitm::{lab_policy, Mitm},
    pki::{Flaw, Key, Pki},
    tlspeer::{run_clients, Load, Mode, PeerServer},
    HarnessConfig,
};
use serde_json::Value;

const MIB: usize = 1 << 20;

fn policy(pki: &Pki) -> String {
    lab_policy(pki, "", "")
}

fn peer(m: &Mitm) -> PeerServer {
    let cert = m
        .pki
        .leaf(
            "peer",
            &[SERVER_NAME, SERVER_V4, SERVER_V6],
            Key::P256,
            Flaw::None,
        )
        .unwrap();
    PeerServer::start(&m.h, 443, &cert).expect("python TLS server")
}

/// Every connection checked out, through Loupe's certificate.
fn all_good(r: &Value, conns: u64) {
    assert_eq!(r["ok"].as_u64(), Some(conns), "{r:#}");
    assert_eq!(r["error_count"].as_u64(), Some(0), "{r:#}");
    assert_eq!(
        r["issuers"],
        serde_json::json!(["Loupe Forward Trust CA g1"]),
        "{r:#}"
    );
}

#[test]
fn a_quarter_gigabyte_each_way_arrives_byte_exact() {
    let m = Mitm::start(policy).expect("setup");
    let _peer = peer(&m);
    for mode in [Mode::Down, Mode::Up] {
        let r = run_clients(
            &m.h,
            Load {
                mode,
                bytes: 256 * MIB,
                conns: 1,
            },
            (SERVER_NAME, 443),
            &m.ca,
            Duration::from_secs(600),
        )
        .unwrap();
        all_good(&r, 1);
        eprintln!(
            "{mode:?} 256 MiB in {:.1} s ({:.0} Mbit/s)",
            r["secs"].as_f64().unwrap(),
            256.0 * 8.39 / r["secs"].as_f64().unwrap()
        );
    }
    let rec = m
        .control
        .wait_record("the upload's record", |r| {
            r["tls"]["plaintext_c2s"].as_u64().unwrap_or(0) >= 256 * MIB as u64
        })
        .unwrap();
    assert_eq!(rec["tls"]["outcome"], "decrypted");
}

#[test]
fn five_hundred_decrypted_connections_at_once_are_each_byte_exact() {
    let m = Mitm::start(policy).expect("setup");
    let _peer = peer(&m);
    let r = run_clients(
        &m.h,
        Load {
            mode: Mode::Down,
            bytes: 256 << 10,
            conns: 500,
        },
        (SERVER_NAME, 443),
        &m.ca,
        Duration::from_secs(600),
    )
    .unwrap();
    all_good(&r, 500);
    // One site, one certificate: a single HSM signature for all of them.
    assert_eq!(m.mints(), 1);
    let t = m
        .engine
        .wait_stats(
            "every connection through the TLS stage",
            Duration::from_secs(120),
            |r| {
                r.tls
                    .clone()
                    .filter(|t| t.decrypted >= 500 && t.active == 0)
            },
        )
        .unwrap();
    assert_eq!((t.failed, t.blocked, t.minted), (0, 0, 1), "{t:?}");
    assert_eq!(t.cache_hits + t.cache_joined + t.cache_misses, 500, "{t:?}");
}

#[test]
fn decryption_survives_loss_reordering_and_duplication_both_ways() {
    let m = Mitm::start_with(
        HarnessConfig {
            impair: true,
            ..HarnessConfig::default()
        },
        &[],
        policy,
    )
    .expect("setup");
    let _imp = ImpairProc::start_both(&m.h, &LOSSY, 23).expect("impairment");
    let _peer = peer(&m);
    for mode in [Mode::Down, Mode::Up] {
        let r = run_clients(
            &m.h,
            Load {
                mode,
                bytes: 64 * MIB,
                conns: 1,
            },
            (SERVER_NAME, 443),
            &m.ca,
            Duration::from_secs(900),
        )
        .unwrap();
        all_good(&r, 1);
    }
    // A split's counters join the totals when it ends, and the stats file
    // is rewritten periodically: wait for both splits to have ended.
    let s = m
        .engine
        .wait_stats("both splits ended", Duration::from_secs(120), |r| {
            let s = r.split_total();
            (s.active == 0 && s.closed + s.aborted >= 2).then_some(s)
        })
        .unwrap();
    assert!(s.retransmits > 0, "the links were impaired: {s:?}");
}
