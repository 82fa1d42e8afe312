//! tcp-split between Linux peers over impaired links: `loupe-impair` on
//! both the client's and the server's link drops, reorders, duplicates and
//! corrupts segments with seeded rates, and both directions must still
//! arrive byte-exact.
//!
//! The transfer size defaults to 16 MiB each way (CI); set
//! `LOUPE_IMPAIR_BYTES` for the soak (`perf/run split-soak` runs 1 GiB).

use std::{
    io::{Read, Write},
    net::{Shutdown, TcpStream},
    time::{Duration, Instant},
};

use loupe_tests::{
    engine::Engine,
    harness::{Link, SERVER_V4},
    impair::{ImpairProc, ImpairStats},
    tcp::{connect, listen, set_cubic},
    Harness, HarnessConfig,
};
use sha2::{Digest, Sha256};

fn size() -> usize {
    std::env::var("LOUPE_IMPAIR_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16 << 20)
}

/// Pseudo-random bytes (so no pattern lines up with segment boundaries).
fn fill(seed: u64, buf: &mut [u8]) {
    let mut x = seed | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let n = chunk.len();
        chunk.copy_from_slice(&x.to_le_bytes()[..n]);
    }
}

/// Sends `len` pseudo-random bytes from `seed`, returns their SHA-256.
fn send(mut s: TcpStream, seed: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut left = len;
    let mut n = 0;
    while left > 0 {
        let k = left.min(buf.len());
        fill(seed.wrapping_add(n), &mut buf[..k]);
        s.write_all(&buf[..k])?;
        hash.update(&buf[..k]);
        left -= k;
        n += 1;
    }
    s.shutdown(Shutdown::Write)?;
    Ok(hash.finalize().to_vec())
}

/// Reads to EOF; returns (bytes, SHA-256).
fn receive(mut s: TcpStream) -> std::io::Result<(usize, Vec<u8>)> {
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Ok((total, hash.finalize().to_vec()));
        }
        hash.update(&buf[..n]);
        total += n;
    }
}

/// One connection through the split, `len` bytes each way at once.
/// Returns the client's upload and download results and the server's.
fn both_ways(h: &Harness, len: usize) -> Duration {
    let addr = format!("{SERVER_V4}:443");
    let listener = listen(&h.server, &addr).unwrap();
    let server = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        set_cubic(&s);
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(120))).unwrap();
        let w = s.try_clone().unwrap();
        let sender = std::thread::spawn(move || send(w, 2, len).expect("server send"));
        let got = receive(s).expect("server receive");
        (got, sender.join().unwrap())
    });
    let t0 = Instant::now();
    let c = connect(&h.client, &addr).unwrap();
    set_cubic(&c);
    c.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    c.set_write_timeout(Some(Duration::from_secs(120))).unwrap();
    let w = c.try_clone().unwrap();
    let sender = std::thread::spawn(move || send(w, 1, len).expect("client send"));
    let (down, down_hash) = receive(c).expect("client receive");
    let up_hash = sender.join().unwrap();
    let ((up, up_seen), down_sent) = server.join().unwrap();
    let took = t0.elapsed();
    assert_eq!((up, down), (len, len), "bytes up/down");
    assert!(up_seen == up_hash, "upload differs");
    assert!(down_hash == down_sent, "download differs");
    took
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
    let rates = ["--loss", "0.02", "--reorder", "0.02", "--duplicate", "0.01"];
    let imp_c = ImpairProc::start(&h, Link::Client, &[&rates[..], &["--seed", "11"]].concat())
        .expect("client-side impairment");
    let imp_s = ImpairProc::start(&h, Link::Server, &[&rates[..], &["--seed", "12"]].concat())
        .expect("server-side impairment");
    let engine = Engine::start(&h, &["--tcp-split"]).expect("engine");
    let len = size();
    let took = both_ways(&h, len);
    let r = engine
        .wait_stats("the split to end", Duration::from_secs(60), |r| {
            let s = r.split_total();
            (s.closed == 1).then_some(s)
        })
        .unwrap();
    assert_eq!((r.split, r.aborted, r.passthrough), (1, 0, 0), "{r:?}");
    assert!(r.retransmits > 0 && r.duplicates > 0, "{r:?}");
    assert_eq!((r.bytes_c2s, r.bytes_s2c), (len as u64, len as u64));
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
    both_ways(&h, 4 << 20);
    let r = engine
        .wait_stats("the split to end", Duration::from_secs(60), |r| {
            let s = r.split_total();
            (s.closed == 1).then_some(s)
        })
        .unwrap();
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
