//! `loupe-perf-hsm`: how fast the HSM signs, raw and through the signer
//! service, in one run on one private SoftHSM2 token.
//!
//! - raw: N threads, each with its own logged-in session, calling the same
//!   per-signature code the service runs (software hash, C_Sign, DER) in a
//!   loop. This is the limit N sessions can reach.
//! - service: the signer with N HSM threads (N sessions) and batch size B,
//!   fed by one requester thread that keeps 2*N*B requests in flight (enough
//!   to fill every batch), polls its tickets and sleeps until woken, with
//!   the audit log on (as in production). Latency at that load is mostly
//!   queueing (Little's law: window / rate).
//! - idle latency: the same service with one request in flight at a time:
//!   submit-to-answer, what one handshake waits when the HSM is not busy.
//!   The raw rows give the bare signature time for comparison.
//!
//! Latencies are HDR histograms (microseconds). The figure of merit is
//! service / raw throughput at the same N (target >= 0.90).

use std::{
    collections::VecDeque,
    path::{Path, PathBuf},
    sync::Arc,
    task::{Wake, Waker},
    thread::Thread,
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::Parser;
use hdrhistogram::Histogram;
use loupe_hsm::{
    audit::{AuditConfig, AuditLog},
    ca::ensure_audit_key,
    mech::SignMech,
    pin::PinSource,
    signer::{Request, Signer, SignerConfig},
    softhsm::{init_token, SoftHsmDir},
    token::{KeyAlg, Token, TokenConfig, SOFTHSM2_MODULE},
};
use loupe_perf::{histogram, median, raw};
use serde::Serialize;

/// The engine's allocator: requests are allocated by requesters and freed by
/// HSM and audit threads, which glibc's per-thread arenas serialise.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "loupe-perf-hsm")]
struct Args {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Repetitions (the median is reported).
    #[arg(long, default_value_t = 3)]
    repeat: u32,
    /// Session / HSM-thread counts.
    #[arg(long, default_value = "1,2,4,8", value_delimiter = ',')]
    threads: Vec<usize>,
    /// Batch sizes for the service.
    #[arg(long, default_value = "1,8,32", value_delimiter = ',')]
    batches: Vec<usize>,
    /// Keys: ec-p256, rsa-2048.
    #[arg(long, default_value = "ec-p256,rsa-2048", value_delimiter = ',')]
    keys: Vec<String>,
    /// Run the service without the audit log (diagnosis only: production
    /// always audits).
    #[arg(long)]
    no_audit: bool,
    /// Write the results as JSON here (default: hsm.json in the results
    /// directory).
    #[arg(long)]
    json: Option<String>,
}

#[derive(Debug, Serialize)]
struct Row {
    key: String,
    threads: usize,
    batch: Option<usize>,
    /// Signatures per second (median of the repetitions).
    rate: f64,
    /// service rate / raw rate at the same thread count.
    ratio: Option<f64>,
    /// Latency at full load (service) or per signature (raw).
    p50_us: u64,
    p99_us: u64,
    /// Service latency with one request in flight.
    idle_p50_us: Option<u64>,
    idle_p99_us: Option<u64>,
}

struct Unpark(Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

/// One service measurement's shape.
#[derive(Clone, Copy)]
struct Load {
    threads: usize,
    batch: usize,
    secs: f64,
    no_audit: bool,
    /// Requests in flight (default: 2 * threads * batch).
    window: Option<usize>,
}

/// Service rate and latency under `load`.
fn service(
    cfg: &TokenConfig,
    audit: &Path,
    key: &str,
    mech: SignMech,
    load: Load,
) -> anyhow::Result<(f64, Histogram<u64>)> {
    let Load {
        threads,
        batch,
        secs,
        no_audit,
        window,
    } = load;
    let token = Token::open(cfg)?;
    let mut ac = AuditConfig::new(audit, Some(token));
    ac.checkpoint_every = 1000;
    let log = AuditLog::open(ac)?;
    let mut sc = SignerConfig::new(vec![cfg.clone()]);
    sc.threads_per_token = threads;
    sc.batch = batch;
    sc.default_timeout = Duration::from_secs(30);
    let signer = Signer::start(sc, (!no_audit).then(|| log.sink()))?;
    let window = window.unwrap_or((2 * threads * batch).max(16));
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut hist = histogram();
    let mut inflight = VecDeque::with_capacity(window);
    let req = || Request {
        token: cfg.label.clone(),
        key: key.to_string(),
        mech,
        message: vec![7u8; 256],
        purpose: "perf".into(),
        requester: "loupe-perf-hsm".into(),
        timeout: None,
    };
    // Warm up for a tenth of the time, then count.
    let warm = Instant::now() + Duration::from_secs_f64(secs / 10.0);
    let mut counting: Option<Instant> = None;
    let end = warm + Duration::from_secs_f64(secs);
    let mut done = 0u64;
    loop {
        let now = Instant::now();
        if counting.is_none() && now >= warm {
            counting = Some(now);
            done = 0;
            hist.reset();
        }
        if now >= end {
            break;
        }
        while inflight.len() < window {
            inflight.push_back((Instant::now(), signer.submit(req(), Some(waker.clone()))?));
        }
        let before = inflight.len();
        let mut err = None;
        inflight.retain(|(t0, ticket): &(Instant, loupe_hsm::signer::Ticket)| {
            match ticket.try_take() {
                Some(r) => {
                    if let Err(e) = r {
                        err = Some(e);
                    }
                    let _ = hist.record(t0.elapsed().as_micros().max(1) as u64);
                    false
                }
                None => true,
            }
        });
        if let Some(e) = err {
            return Err(e).context("service sign");
        }
        done += (before - inflight.len()) as u64;
        if before == inflight.len() {
            std::thread::park_timeout(Duration::from_millis(5));
        }
    }
    let rate = done as f64 / counting.map_or(secs, |c| c.elapsed().as_secs_f64());
    drop(inflight);
    drop(signer);
    log.close()?;
    Ok((rate, hist))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = SoftHsmDir::create(
        &std::env::temp_dir().join(format!("loupe-perf-hsm-{}", std::process::id())),
    )?;
    let _cleanup = Cleanup(dir.dir.clone());
    // Before the module is loaded, which reads it once.
    std::env::set_var("SOFTHSM2_CONF", dir.conf());
    let module = PathBuf::from(SOFTHSM2_MODULE);
    init_token(&module, "perf", "so-perf", "user-perf")?;
    let pin_file = dir.dir.join("pin");
    loupe_hsm::pin::write_pin_file(&pin_file, "user-perf")?;
    let cfg = TokenConfig {
        module,
        label: "perf".into(),
        pin: PinSource::File(pin_file),
    };
    let token = Token::open(&cfg)?;
    ensure_audit_key(&token)?;
    let mut rows = Vec::new();
    println!(
        "{:<9} {:>7} {:>5} {:>8} {:>6} {:>8} {:>8} {:>9} {:>9}",
        "key", "threads", "batch", "sig/s", "ratio", "p50 us", "p99 us", "idle p50", "idle p99"
    );
    for key in &args.keys {
        let alg: KeyAlg = key.parse()?;
        token.session()?.generate_key_pair(key, alg)?;
        let mech = alg.sign_mech();
        for &n in &args.threads {
            // Repetitions interleave raw and service runs, so drift in a
            // shared machine's speed hits both sides of each ratio alike.
            let nb = args.batches.len();
            let mut raw_rates = Vec::new();
            let mut raw_hist = histogram();
            let mut rates = vec![Vec::new(); nb];
            let mut hists = vec![histogram(); nb];
            let mut idles = vec![histogram(); nb];
            for r in 0..args.repeat {
                let (rate, h) = raw(&token, key, mech, n, args.seconds)?;
                raw_rates.push(rate);
                raw_hist.add(&h)?;
                for (i, &b) in args.batches.iter().enumerate() {
                    let audit = dir.dir.join(format!("audit-{key}-{n}-{b}-{r}.jsonl"));
                    let load = Load {
                        threads: n,
                        batch: b,
                        secs: args.seconds,
                        no_audit: args.no_audit,
                        window: None,
                    };
                    let (rate, h) = service(&cfg, &audit, key, mech, load)?;
                    rates[i].push(rate);
                    hists[i].add(&h)?;
                    let idle = Load {
                        secs: args.seconds / 3.0,
                        window: Some(1),
                        ..load
                    };
                    let (_, h) = service(&cfg, &audit, key, mech, idle)?;
                    idles[i].add(&h)?;
                    let _ = std::fs::remove_file(&audit);
                }
            }
            let raw_rate = median(raw_rates);
            let (p50, p99) = (
                raw_hist.value_at_quantile(0.5),
                raw_hist.value_at_quantile(0.99),
            );
            println!(
                "{key:<9} {n:>7} {:>5} {raw_rate:>8.0} {:>6} {p50:>8} {p99:>8}",
                "raw", ""
            );
            rows.push(Row {
                key: key.clone(),
                threads: n,
                batch: None,
                rate: raw_rate,
                ratio: None,
                p50_us: p50,
                p99_us: p99,
                idle_p50_us: None,
                idle_p99_us: None,
            });
            for (i, &b) in args.batches.iter().enumerate() {
                let rate = median(std::mem::take(&mut rates[i]));
                let (hist, idle) = (&hists[i], &idles[i]);
                let row = Row {
                    key: key.clone(),
                    threads: n,
                    batch: Some(b),
                    rate,
                    ratio: Some(rate / raw_rate),
                    p50_us: hist.value_at_quantile(0.5),
                    p99_us: hist.value_at_quantile(0.99),
                    idle_p50_us: Some(idle.value_at_quantile(0.5)),
                    idle_p99_us: Some(idle.value_at_quantile(0.99)),
                };
                println!(
                    "{key:<9} {n:>7} {b:>5} {rate:>8.0} {:>6.2} {:>8} {:>8} {:>9} {:>9}",
                    rate / raw_rate,
                    row.p50_us,
                    row.p99_us,
                    row.idle_p50_us.unwrap_or(0),
                    row.idle_p99_us.unwrap_or(0)
                );
                rows.push(row);
            }
        }
    }
    let written =
        loupe_perf::write_results_to(args.json.as_deref().map(Path::new), "hsm.json", &rows)?;
    println!("results: {}", written.display());
    Ok(())
}

/// Removes the benchmark's SoftHSM directory, whatever happens.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
