//! tcp-split between Linux peers over impaired links: `loupe-impair` on
//! both the client's and the server's link drops, reorders, duplicates and
//! corrupts segments with seeded rates, and both directions must still
//! arrive byte-exact.
//!
//! CI moves 16 MiB each way; the soak (1 GiB each way, beside a Linux
//! bridge over the same impairment) is `perf/run split-impaired`.

use std::{
    io::{Read, Write},
    net::Shutdown,
    time::Duration,
};

use loupe_dataplane::stats::SplitCounters;
use loupe_tests::{
    engine::Engine,
    harness::{Link, SERVER_V4},
    https::fill_pseudo_random,
    impair::{ImpairProc, ImpairStats, LOSSY},
    tcp::{both_ways, connect, listen, receive, tcp_ext, tune},
    Harness, HarnessConfig,
};
use sha2::{Digest, Sha256};

/// The one split connection's counters once it has ended.
fn ended(engine: &Engine) -> SplitCounters {
    engine
        .wait_stats("the split to end", Duration::from_secs(60), |r| {
            let s = r.split_total();
            (s.closed == 1).then_some(s)
        })
        .unwrap()
}

fn impaired_harness() -> Harness {
    Harness::new(HarnessConfig {
        impair: true,
        ..HarnessConfig::default()
    })
    .expect("harness")
}

/// Each direction of each link saw real impairment at about its rate.
fn check_rates(link: &str, dirs: (ImpairStats, ImpairStats), loss: f64) {
    for (name, s) in [("to the engine", dirs.0), ("from the engine", dirs.1)] {
        assert!(s.frames > 1000, "{link} {name}: {s:?}");
        let rate = s.dropped as f64 / s.frames as f64;
        assert!(
            (loss * 0.5..loss * 1.5).contains(&rate),
            "{link} {name}: loss {rate:.4}: {s:?}"
        );
        assert!(s.reordered > 0 && s.duplicated > 0, "{link} {name}: {s:?}");
    }
}

#[test]
fn both_directions_arrive_byte_exact_under_loss_reordering_and_duplication() {
    let h = impaired_harness();
    let [imp_c, imp_s] = ImpairProc::start_both(&h, &LOSSY, 11).expect("impairment");
    let engine = Engine::start(&h, &["--tcp-split"]).expect("engine");
    let len = 16 << 20;
    let took = both_ways(&h, &format!("{SERVER_V4}:443"), len).unwrap();
    let r = ended(&engine);
    assert_eq!((r.split, r.aborted, r.passthrough), (1, 0, 0), "{r:?}");
    assert!(r.retransmits > 0 && r.duplicates > 0, "{r:?}");
    assert_eq!((r.bytes_c2s, r.bytes_s2c), (len as u64, len as u64));
    // The halves both send and receive: their SACK blocks rode on data
    // segments too (before, on pure ACKs only: sacks_on_data was 0), and
    // the Linux peers took them; the bytes above arrived whole. (That no
    // frame exceeds the MSS the simulators check on every segment.)
    assert!(r.sacks_on_data > 0, "{r:?}");
    let c = imp_c.stop().unwrap();
    let s = imp_s.stop().unwrap();
    eprintln!(
        "{} MiB each way in {took:?} ({:.0} Mbit/s each way); engine {r:?}; \
         client link {c:?}; server link {s:?}",
        len >> 20,
        len as f64 * 8.0 / took.as_secs_f64() / 1e6
    );
    check_rates("client link", c, 0.02);
    check_rates("server link", s, 0.02);
    engine.stop();
}

#[test]
fn corrupted_segments_are_dropped_by_checksum_and_recovered() {
    let h = impaired_harness();
    // Corruption on the client link only: the engine sees the client's
    // corrupted segments (and drops them), the client sees the engine's.
    let imp = ImpairProc::start(
        &h,
        Link::Client,
        &["--corrupt", "0.01", "--loss", "0.005", "--seed", "21"],
    )
    .expect("impairment");
    let engine = Engine::start(&h, &["--tcp-split"]).expect("engine");
    both_ways(&h, &format!("{SERVER_V4}:443"), 4 << 20).unwrap();
    let r = ended(&engine);
    let (to_engine, from_engine) = imp.stop().unwrap();
    assert!(to_engine.corrupted > 10 && from_engine.corrupted > 10);
    // Corrupted segments towards the engine failed its checksum there (a
    // flipped bit always changes a 1's-complement sum) and none was
    // relayed: the transfer is byte-exact. A few escape the count: a flip
    // in the destination port sends the frame past the engine's steering,
    // to a server that drops it for its checksum.
    assert!(
        r.bad_checksum <= to_engine.corrupted && r.bad_checksum * 10 >= to_engine.corrupted * 9,
        "{r:?} {to_engine:?}"
    );
    assert_eq!((r.split, r.aborted), (1, 0), "{r:?}");
    engine.stop();
}

/// A client's first data segment lost before the engine: the segments
/// after it are held, unseen by the server, which would have answered
/// each with a duplicate ACK and SACK blocks. The hold answers so in its
/// place, and Linux resends the lost segment in SACK recovery instead of
/// waiting for its retransmission timeout (a second or more after a
/// connect storm, as in the 1000-connection test).
#[test]
fn a_lost_first_segment_is_resent_in_sack_recovery_not_at_the_timeout() {
    let h = impaired_harness();
    let imp = ImpairProc::start(&h, Link::Client, &["--drop-first-data"]).expect("impairment");
    let engine = Engine::start(&h, &["--tcp-split"]).expect("engine");
    let addr = format!("{SERVER_V4}:443");
    let listener = listen(&h.server, &addr).unwrap();
    let before = tcp_ext(&h.client).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let (_, digest) = receive(&mut s).expect("server read");
        s.write_all(&digest).expect("server write");
    });
    let mut c = connect(&h.client, &addr).unwrap();
    tune(&c, Duration::from_secs(60));
    // Three segments, not TLS: decided as soon as the first bytes come.
    let mut d = vec![0; 4000];
    fill_pseudo_random(&mut d, 7);
    d[0] = b'G';
    c.write_all(&d).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut digest = Vec::new();
    c.read_to_end(&mut digest).unwrap();
    assert_eq!(digest, Sha256::digest(&d).to_vec());
    server.join().unwrap();
    let r = ended(&engine);
    let (to_engine, _) = imp.stop().unwrap();
    assert_eq!(to_engine.dropped, 1, "{to_engine:?}");
    let after = tcp_ext(&h.client).unwrap();
    // Without the duplicate ACK the client's only way out is its RTO
    // (its tail probe repeats the last segment, which the hold ignores),
    // after which it resends in loss recovery, never SACK recovery.
    let grew = |k: &str| after[k] - before[k];
    assert!(grew("TCPSackRecovery") >= 1, "{after:?}");
    assert!(r.hold_sacks >= 1, "{r:?}");
    assert_eq!(
        (r.not_tls, r.hold_timeouts, r.hold_acks),
        (1, 0, 0),
        "{r:?}"
    );
    engine.stop();
}
