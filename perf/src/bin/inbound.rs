//! `loupe-perf-inbound`: SSL inbound inspection's handshake rate with the
//! server's key in SoftHSM2, in one run beside its two references:
//!
//! - **raw**: the SoftHSM2 sign rate with N sessions signing flat out (a
//!   token of this process's own, same library and key type): the most N
//!   HSM sessions can give, the limit of full handshakes through the HSM.
//! - **inbound, N sessions, batch B**: the engine with `--hsm-threads N
//!   --hsm-batch B` and an `inbound-inspect` rule in front of nginx; rustls
//!   clients (resumption off) make new connections flat out, each a full
//!   handshake whose signature the HSM makes, and one small request.
//! - **resumed**: the same with resumption on: no HSM operation.
//! - **direct**: nginx terminating TLS itself with the key in a file,
//!   behind a Linux bridge: what a user would run instead.
//!
//! Latency (connect to response) p50/p99 at full load and at half of it
//! (each client thread paced). Medians of the repetitions.

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::Parser;
use hdrhistogram::Histogram;
use loupe_hsm::{
    pin::PinSource,
    softhsm::{init_token, SoftHsmDir},
    token::{KeyAlg, Token, TokenConfig, SOFTHSM2_MODULE},
};
use loupe_perf::{avoid_cpu, histogram, median, raw_on};
use loupe_tests::{
    harness::SERVER_V4,
    https::{Nginx, ServerCert, SERVER_NAME},
    mitm::{Mitm, Options},
    netns::Netns,
    pki::{Flaw, Key, Pki},
    Harness, HarnessConfig,
};
use rustls::{
    client::Resumption,
    pki_types::{pem::PemObject, CertificateDer, ServerName},
    ClientConfig, ClientConnection, RootCertStore, StreamOwned,
};
use serde_json::json;

#[derive(Debug, Parser)]
#[command(name = "loupe-perf-inbound")]
struct Args {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Repeats of each measurement (medians reported).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Client threads making new connections.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// HSM sessions (engine --hsm-threads) to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    threads: Vec<usize>,
    /// Engine --hsm-batch values to measure.
    #[arg(long, value_delimiter = ',', default_value = "8,32")]
    batches: Vec<usize>,
    /// Server key types.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "ec-p256,rsa-2048,rsa-3072"
    )]
    keys: Vec<String>,
    /// nginx's own certificate's key type behind the engine. By default
    /// nginx serves the server profile's certificate (pinned), so it makes
    /// a signature of the same cost as the HSM's on every full handshake,
    /// on the same CPUs. With another type (`ec-p256`) the profile checks
    /// nginx's certificate against the test PKI (`upstream =
    /// "trust-store"`), and the HSM's signature dominates the path, as
    /// when the origin server is another machine.
    #[arg(long)]
    upstream_key: Option<String>,
    /// Give the HSM the last CPU to itself, as a network HSM has: the engine's
    /// HSM threads (`--hsm-cpus`) and the raw rate's signing threads run
    /// on this CPU, and everything else (the engine's workers, nginx, the
    /// clients, the harness) on the others.
    #[arg(long)]
    hsm_cpu: Option<usize>,
}

const PORT: u16 = 443;
const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: server.loupe.test\r\nConnection: close\r\n\r\n";

fn client_config(roots_pem: &Path, resume: bool) -> anyhow::Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(roots_pem)? {
        roots.add(c?)?;
    }
    let mut cfg = ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    if !resume {
        cfg.resumption = Resumption::disabled();
    }
    Ok(Arc::new(cfg))
}

/// One connection: TLS, one request, the response to its end.
fn fetch(ns: &Netns, cfg: &Arc<ClientConfig>) -> anyhow::Result<()> {
    let sock = ns.enter(|| {
        TcpStream::connect_timeout(
            &format!("{SERVER_V4}:{PORT}").parse().expect("addr"),
            Duration::from_secs(20),
        )
    })??;
    sock.set_nodelay(true)?;
    sock.set_read_timeout(Some(Duration::from_secs(30)))?;
    let conn = ClientConnection::new(cfg.clone(), ServerName::try_from(SERVER_NAME)?)?;
    let mut tls = StreamOwned::new(conn, sock);
    tls.write_all(REQUEST)?;
    let mut buf = [0u8; 4096];
    let mut got = 0;
    loop {
        match tls.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if got > 0 && e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e.into()),
        }
    }
    anyhow::ensure!(got > 0, "no response");
    Ok(())
}

/// Connections per second by `clients` threads for `secs`, each thread
/// paced to `per_thread` connections a second if given; latencies in µs.
fn load(
    ns: &Netns,
    cfg: &Arc<ClientConfig>,
    clients: usize,
    secs: u64,
    per_thread: Option<f64>,
) -> anyhow::Result<(f64, Histogram<u64>, u64)> {
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let hist = Arc::new(Mutex::new(histogram()));
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    let mut hs = Vec::new();
    for _ in 0..clients {
        let (cfg, done, failed, hist) = (cfg.clone(), done.clone(), failed.clone(), hist.clone());
        let ns = Netns::existing(&ns.name, true);
        hs.push(thread::spawn(move || {
            let mut h = histogram();
            let mut next = Instant::now();
            while Instant::now() < end {
                if let Some(rate) = per_thread {
                    let now = Instant::now();
                    if next > now {
                        thread::sleep(next - now);
                    }
                    next += Duration::from_secs_f64(1.0 / rate);
                }
                let t0 = Instant::now();
                match fetch(&ns, &cfg) {
                    Ok(()) => {
                        let _ = h.record(t0.elapsed().as_micros().max(1) as u64);
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            let _ = hist.lock().unwrap().add(&h);
        }));
    }
    for h in hs {
        let _ = h.join();
    }
    let rate = done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    let h = hist.lock().unwrap().clone();
    Ok((rate, h, failed.load(Ordering::Relaxed)))
}

fn key_of(name: &str) -> anyhow::Result<Key> {
    Ok(match name {
        "ec-p256" => Key::P256,
        "ec-p384" => Key::P384,
        "rsa-2048" => Key::Rsa2048,
        "rsa-3072" => Key::Rsa3072,
        other => {
            anyhow::bail!("unknown key type {other:?} (ec-p256, ec-p384, rsa-2048, rsa-3072)")
        }
    })
}

/// The engine with an inbound-inspect rule for the harness server, its
/// key (`kind`) imported into the token; nginx serving with the same
/// certificate (pinned), or with one of key type `upstream` checked
/// against the test PKI.
fn inbound(
    kind: Key,
    upstream: Option<Key>,
    threads: usize,
    batch: usize,
    hsm_cpu: Option<usize>,
) -> anyhow::Result<(Mitm, Nginx)> {
    let (t, b) = (threads.to_string(), batch.to_string());
    let mut engine_args = vec!["--hsm-threads".into(), t, "--hsm-batch".into(), b];
    if let Some(c) = hsm_cpu {
        engine_args.extend(["--hsm-cpus".into(), c.to_string()]);
    }
    let opts = Options {
        engine_args,
        ..Options::default()
    };
    let m = Mitm::start_opts_hsm(opts, |pki, hsm| {
        let c = pki.leaf("web", &[SERVER_NAME, SERVER_V4], kind, Flaw::None)?;
        let out = hsm.loupe(&["key", "import", "--label", "web", c.key.to_str().unwrap()]);
        anyhow::ensure!(
            out.status.success(),
            "loupe key import: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let check = match upstream {
            None => String::new(),
            Some(k) => {
                pki.leaf("origin", &[SERVER_NAME, SERVER_V4], k, Flaw::None)?;
                format!(
                    "upstream = \"trust-store\"\n[profiles.origin]\ntrust_store = \"{}\"\n",
                    pki.roots.display()
                )
            }
        };
        let profile = if upstream.is_some() {
            "profile = \"origin\"\n"
        } else {
            ""
        };
        Ok(format!(
            "[policy]\ndefault_action = \"no-decrypt\"\n[server_profiles.web]\nchain = \"{}\"\n\
             key = \"web\"\n{check}[[rules]]\nname = \"inbound\"\ndst = [\"198.18.0.2/32\"]\n\
             ports = [{PORT}]\naction = \"inbound-inspect\"\nserver_profile = \"web\"\n{profile}",
            c.cert.display()
        ))
    })?;
    let served = if upstream.is_some() { "origin" } else { "web" };
    let cert = ServerCert {
        cert: m.pki.dir.join(format!("{served}.crt")),
        key: m.pki.dir.join(format!("{served}.key")),
    };
    let nginx = Nginx::start_with(&m.h, PORT, cert, false, "")?;
    Ok((m, nginx))
}

struct Measured {
    rate: f64,
    p50: f64,
    p99: f64,
    failed: u64,
}

/// `repeat` runs of `load`, medians.
fn measure(
    ns: &Netns,
    cfg: &Arc<ClientConfig>,
    args: &Args,
    per_thread: Option<f64>,
) -> anyhow::Result<Measured> {
    let (mut rates, mut p50, mut p99, mut failed) = (Vec::new(), Vec::new(), Vec::new(), 0);
    for _ in 0..args.repeat {
        let (r, h, f) = load(ns, cfg, args.clients, args.seconds, per_thread)?;
        rates.push(r);
        p50.push(h.value_at_quantile(0.5) as f64);
        p99.push(h.value_at_quantile(0.99) as f64);
        failed += f;
    }
    Ok(Measured {
        rate: median(rates),
        p50: median(p50),
        p99: median(p99),
        failed,
    })
}

/// Full load, then half of it (paced), then resumed at full load.
fn three_loads(
    ns: &Netns,
    roots: &Path,
    args: &Args,
) -> anyhow::Result<(Measured, Measured, Measured)> {
    // Thousands of connections a second leave the client's ports in
    // TIME-WAIT: reuse them, from a wide range (as perf/run tls does).
    ns.exec(
        "sysctl",
        &[
            "-qw",
            "net.ipv4.tcp_tw_reuse=1",
            "net.ipv4.ip_local_port_range=1024 65000",
        ],
    )?;
    let full_cfg = client_config(roots, false)?;
    // Warm (the first connection, and the engine's upstream session).
    fetch(ns, &full_cfg).context("the first connection")?;
    let full = measure(ns, &full_cfg, args, None)?;
    let half_rate = (full.rate / 2.0 / args.clients as f64).max(0.5);
    let half = measure(ns, &full_cfg, args, Some(half_rate))?;
    let resume_cfg = client_config(roots, true)?;
    fetch(ns, &resume_cfg)?;
    let resumed = measure(ns, &resume_cfg, args, None)?;
    Ok((full, half, resumed))
}

/// Removes the raw token's directory when the run ends, however it ends.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn raw_token() -> anyhow::Result<(Token, Cleanup)> {
    let dir = SoftHsmDir::create(
        &std::env::temp_dir().join(format!("loupe-perf-inbound-{}", std::process::id())),
    )?;
    let cleanup = Cleanup(dir.dir.clone());
    // Before the module is loaded in this process, which reads it once.
    std::env::set_var("SOFTHSM2_CONF", dir.conf());
    let module = PathBuf::from(SOFTHSM2_MODULE);
    init_token(&module, "raw", "so-raw", "user-raw")?;
    let pin_file = dir.dir.join("pin");
    loupe_hsm::pin::write_pin_file(&pin_file, "user-raw")?;
    let token = Token::open(&TokenConfig {
        module,
        label: "raw".into(),
        pin: PinSource::File(pin_file),
    })?;
    Ok((token, cleanup))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(c) = args.hsm_cpu {
        avoid_cpu(c)?;
    }
    let (token, _cleanup) = raw_token()?;
    let upstream = args.upstream_key.as_deref().map(key_of).transpose()?;
    let mut rows = Vec::new();
    let mut lines = Vec::new();
    for key in &args.keys {
        let kind = key_of(key)?;
        let alg: KeyAlg = key.parse()?;
        token.session()?.generate_key_pair(key, alg)?;
        // What the user would run instead: nginx with the key in a file.
        eprintln!("== {key}: direct (nginx, key in a file, a bridge between)");
        let direct = {
            let h = Harness::new(HarnessConfig::default())?;
            h.bridge_up()?;
            let pki = Pki::new(&h.dir.join("pki"))?;
            let cert = pki.leaf("web", &[SERVER_NAME, SERVER_V4], kind, Flaw::None)?;
            let _nginx = Nginx::start_with(&h, PORT, cert, false, "")?;
            three_loads(&h.client, &pki.roots, &args)?
        };
        for &n in &args.threads {
            let mut raws = Vec::new();
            for _ in 0..args.repeat {
                raws.push(
                    raw_on(
                        &token,
                        key,
                        alg.sign_mech(),
                        n,
                        args.seconds as f64,
                        args.hsm_cpu,
                    )?
                    .0,
                );
            }
            let raw_rate = median(raws);
            for &b in &args.batches {
                eprintln!("== {key}: inbound, {n} HSM sessions, batch {b}");
                let (m, _nginx) = inbound(kind, upstream, n, b, args.hsm_cpu)?;
                let (full, half, resumed) = three_loads(&m.h.client, &m.pki.roots, &args)?;
                let ratio = full.rate / raw_rate;
                let line = format!(
                    "{key:<9} {n:>2} {b:>3} {raw_rate:>9.0} {:>9.0} {ratio:>6.3} {:>9.0} \
                     {:>8.0} {:>8.0} {:>8.0} {:>8.0} {:>9.0} {:>8.0} {:>6}",
                    full.rate,
                    resumed.rate,
                    half.p50,
                    half.p99,
                    full.p50,
                    full.p99,
                    direct.0.rate,
                    direct.2.rate,
                    full.failed + half.failed + resumed.failed,
                );
                eprintln!("{line}");
                eprintln!(
                    "  resumed p50 {:.0} us p99 {:.0} us; nginx full p50 {:.0} us, resumed p50 {:.0} us",
                    resumed.p50, resumed.p99, direct.0.p50, direct.2.p50
                );
                lines.push(line);
                rows.push(json!({
                    "key": key, "hsm_sessions": n, "batch": b,
                    "raw_sign_per_s": raw_rate,
                    "inbound_full_per_s": full.rate, "ratio_to_raw": ratio,
                    "inbound_resumed_per_s": resumed.rate,
                    "half_load_p50_us": half.p50, "half_load_p99_us": half.p99,
                    "full_load_p50_us": full.p50, "full_load_p99_us": full.p99,
                    "direct_full_per_s": direct.0.rate, "direct_resumed_per_s": direct.2.rate,
                    "direct_full_p50_us": direct.0.p50, "direct_full_p99_us": direct.0.p99,
                    "failed": full.failed + half.failed + resumed.failed,
                }));
            }
        }
    }
    println!(
        "\n{:<9} {:>2} {:>3} {:>9} {:>9} {:>6} {:>9} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8} {:>6}",
        "key",
        "N",
        "B",
        "raw sig/s",
        "full hs/s",
        "ratio",
        "resumed",
        "½ p50us",
        "½ p99us",
        "p50 us",
        "p99 us",
        "nginx",
        "nginx rs",
        "failed"
    );
    for l in &lines {
        println!("{l}");
    }
    loupe_perf::write_results("inbound.json", &rows)?;
    Ok(())
}
