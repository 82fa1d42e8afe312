//! Helpers the benchmark binaries share.

pub mod wire_delay;

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use loupe_hsm::{mech::SignMech, token::Token};

/// The median of the samples (the upper one of the middle two for an even
/// count); 0 for none.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

/// Microsecond histograms up to a minute.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

/// Keeps the calling thread (and every process and thread it starts
/// after) off `cpu`: on every other online CPU.
pub fn avoid_cpu(cpu: usize) -> anyhow::Result<()> {
    let online = loupe_hsm::signer::online_cpus();
    // The engine pins its workers from CPU 0 up: the HSM's is the last.
    anyhow::ensure!(
        cpu + 1 == online && online > 1,
        "CPU {cpu}: give the last CPU ({}), which the engine's workers (pinned from CPU 0 up) \
         leave alone",
        online - 1
    );
    // SAFETY: cpu_set_t is a plain bitmask; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for c in (0..online).filter(|&c| c != cpu) {
        // SAFETY: CPU_SET writes inside `set`; `c` is an online CPU.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: pid 0 is the calling thread; the set pointer and size are valid.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    anyhow::ensure!(
        rc == 0,
        "sched_setaffinity: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// Raw rate: `threads` sessions signing flat out; per-signature times.
pub fn raw(
    token: &Token,
    key: &str,
    mech: SignMech,
    threads: usize,
    secs: f64,
) -> anyhow::Result<(f64, Histogram<u64>)> {
    raw_on(token, key, mech, threads, secs, None)
}

/// [`raw`] with the signing threads pinned to `cpu`.
pub fn raw_on(
    token: &Token,
    key: &str,
    mech: SignMech,
    threads: usize,
    secs: f64,
    cpu: Option<usize>,
) -> anyhow::Result<(f64, Histogram<u64>)> {
    let mut sessions = (0..threads)
        .map(|_| token.session())
        .collect::<Result<Vec<_>, _>>()?;
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let mut hist = histogram();
    let total: u64 = std::thread::scope(|s| {
        let handles: Vec<_> = sessions
            .iter_mut()
            .map(|sess| {
                s.spawn(move || {
                    if let Some(c) = cpu {
                        loupe_hsm::signer::pin_thread(c).expect("pin a raw signing thread");
                    }
                    let mut n = 0u64;
                    let mut h = histogram();
                    let msg = [7u8; 256];
                    loop {
                        let t0 = Instant::now();
                        if t0 >= end {
                            break;
                        }
                        sess.sign(key, mech, &msg).expect("raw sign");
                        let _ = h.record(t0.elapsed().as_micros().max(1) as u64);
                        n += 1;
                    }
                    (n, h)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                let (n, th) = h.join().expect("raw thread");
                let _ = hist.add(&th);
                n
            })
            .sum()
    });
    Ok((total as f64 / start.elapsed().as_secs_f64(), hist))
}
