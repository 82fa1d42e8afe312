//! `loupe-perf-tls`: what TLS decryption costs, against what a user would
//! run otherwise, measured in one run on the same harness.
//!
//! Paths:
//! - `direct`: a Linux bridge in the engine namespace; the client's TLS
//!   reaches the server (no inspection).
//! - `decrypt`: the engine with the control daemon, a `decrypt` rule and
//!   its HSM (SoftHSM2): a man-in-the-middle with the forward-trust CA.
//! - `sslsplit`: Debian's SSLsplit 0.5.5 in transparent mode in the engine
//!   namespace (the bridge, an nftables REDIRECT), its CA key in a file.
//!
//! Peers live in this process: a rustls server (P-256 certificates from the
//! test PKI, one per name) on sockets in the server namespace, and rustls
//! clients on sockets in the client namespace, each on a thread of its
//! own. Measured per path:
//! - bulk: 1 and 8 connections, the server sending as fast as it can for
//!   `--seconds`; Gbit/s of plaintext received.
//! - handshakes/s: `--handshake-threads` clients making new connections
//!   (handshake, one byte each way, close) for `--seconds`, to one name
//!   (decrypt: certificate cache hits) and to a new name each time
//!   (decrypt: a mint, one HSM signature, per connection).
//! - latency: 64-byte request/response round trips on one established
//!   connection (p50/p99), alone and while a handshake flood runs.
//! - HTTP requests/s: 8 keep-alive connections each sending HTTP/1.1 GETs
//!   (80 bytes) one after the other, each answered with a 1 KiB body, for
//!   `--seconds`: what the engine's HTTP/1.1 inspector parses for real.
//! - memory: the engine's RSS growth per idle decrypted connection from
//!   `--idle` to twice as many, measured before the other loads.
//!
//! And, on one core in memory, the rustls limits the proxies are held to:
//! handshake pairs per second and bulk TLS (seal + open) throughput.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::Parser;
use hdrhistogram::Histogram;
use loupe_perf::median;
use loupe_tests::{
    harness::{Harness, RELAY_PORT, SERVER_V4},
    mitm::{lab_policy, Mitm},
    netns::Netns,
    pki::{Flaw, Key, Pki},
    proc::{rss_kib, Proc},
    HarnessConfig,
};
use rustls::{
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName},
    server::ResolvesServerCertUsingSni,
    sign::CertifiedKey,
    ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection, StreamOwned,
};
use serde_json::json;

#[derive(Debug, Parser)]
#[command(name = "loupe-perf-tls")]
struct Args {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Repeats of each measurement (medians reported).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Client threads making new connections.
    #[arg(long, default_value_t = 4)]
    handshake_threads: usize,
    /// Distinct server names for the cache-miss handshakes.
    #[arg(long, default_value_t = 3000)]
    names: usize,
    /// Idle decrypted connections for the memory measurement.
    #[arg(long, default_value_t = 1000)]
    idle: usize,
    /// Round trips for the latency measurement.
    #[arg(long, default_value_t = 5000)]
    round_trips: usize,
    /// Paths to measure.
    #[arg(long, value_delimiter = ',', default_value = "direct,decrypt,sslsplit")]
    paths: Vec<String>,
}

const PORT: u16 = 443;
const NAME: &str = "bench.loupe.test";
/// The addresses the in-memory inspection pipelines are told.
const ENDS: (std::net::SocketAddr, std::net::SocketAddr) = (
    std::net::SocketAddr::V4(std::net::SocketAddrV4::new(
        std::net::Ipv4Addr::new(198, 18, 0, 1),
        40000,
    )),
    std::net::SocketAddr::V4(std::net::SocketAddrV4::new(
        std::net::Ipv4Addr::new(198, 18, 0, 2),
        443,
    )),
);

/// What the server does on a connection: the client's first byte says.
const OP_BULK: u8 = b'B';
const OP_ECHO: u8 = b'E';
const OP_PING: u8 = b'P';
/// An HTTP/1.1 request (its `G`), answered as HTTP/1.1 while they come.
const OP_HTTP: u8 = b'G';
const HTTP_REQUEST: &[u8] =
    b"GET /item HTTP/1.1\r\nHost: bench.loupe.test\r\nUser-Agent: loupe-perf\r\n\r\n";
/// Its answer's head (a 1 KiB body follows).
const HTTP_HEAD: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 1024\r\n\r\n";

fn load_cert(pki_leaf: &loupe_tests::https::ServerCert) -> anyhow::Result<CertifiedKey> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&pki_leaf.cert)?
        .collect::<Result<_, _>>()
        .context("certificate PEM")?;
    let key = PrivateKeyDer::from_pem_file(&pki_leaf.key).context("key PEM")?;
    let signing = rustls::crypto::aws_lc_rs::default_provider()
        .key_provider
        .load_private_key(key)?;
    Ok(CertifiedKey::new(chain, signing))
}

/// The server's configuration: a certificate per name (`NAME` and
/// `n<i>.loupe.test`).
fn server_config(pki: &Pki, names: usize) -> anyhow::Result<Arc<ServerConfig>> {
    let mut sni = ResolvesServerCertUsingSni::new();
    let mut all = vec![NAME.to_string()];
    all.extend((0..names).map(|i| format!("n{i}.loupe.test")));
    for (i, n) in all.iter().enumerate() {
        let leaf = pki.leaf(&format!("bench-{i}"), &[n.as_str()], Key::P256, Flaw::None)?;
        sni.add(n, load_cert(&leaf)?)?;
    }
    let cfg = ServerConfig::builder()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(sni));
    Ok(Arc::new(cfg))
}

/// The in-process TLS server: a thread per connection.
struct Server {
    stop: Arc<AtomicBool>,
}

impl Server {
    fn start(ns: &Netns, cfg: Arc<ServerConfig>) -> anyhow::Result<Server> {
        let listener = ns.enter(|| TcpListener::bind(format!("{SERVER_V4}:{PORT}")))??;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((sock, _)) => {
                        let cfg = cfg.clone();
                        let s = s.clone();
                        thread::spawn(move || {
                            let _ = serve(sock, cfg, &s);
                        });
                    }
                    Err(_) => thread::sleep(Duration::from_millis(1)),
                }
            }
        });
        Ok(Server { stop })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve(sock: TcpStream, cfg: Arc<ServerConfig>, stop: &AtomicBool) -> anyhow::Result<()> {
    sock.set_nodelay(true)?;
    sock.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut tls = StreamOwned::new(ServerConnection::new(cfg)?, sock);
    let mut op = [0u8; 1];
    tls.read_exact(&mut op)?;
    match op[0] {
        OP_HTTP => {
            let response = [HTTP_HEAD, &[0x5a; 1024]].concat();
            // The rest of each request, up to its blank line.
            let mut seen = 1usize;
            let mut buf = [0u8; 4096];
            loop {
                let n = tls.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                for &b in &buf[..n] {
                    let want = HTTP_REQUEST[seen % HTTP_REQUEST.len()];
                    anyhow::ensure!(b == want, "not the benchmark's request");
                    seen += 1;
                    if seen.is_multiple_of(HTTP_REQUEST.len()) {
                        tls.write_all(&response)?;
                    }
                }
            }
        }
        OP_BULK => {
            let block = vec![0x5au8; 64 << 10];
            while !stop.load(Ordering::Relaxed) {
                tls.write_all(&block)?;
            }
        }
        OP_ECHO => {
            let mut buf = [0u8; 64];
            loop {
                tls.read_exact(&mut buf)?;
                tls.write_all(&buf)?;
            }
        }
        _ => {
            tls.write_all(&[OP_PING])?;
            let _ = tls.read(&mut op);
        }
    }
    Ok(())
}

/// The benchmark's client: rustls without the post-quantum hybrid, so
/// its ClientHello fits one segment: SSLsplit 0.5.5 reads the server name
/// from the first segment only, and a hybrid key share (1.2 KB) pushes it
/// out (it then connects without a name).
fn client_config(ca: &Path) -> anyhow::Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca)? {
        roots.add(c?)?;
    }
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.kx_groups.retain(|g| {
        g.name() != rustls::NamedGroup::X25519MLKEM768 && g.name() != rustls::NamedGroup::MLKEM768
    });
    Ok(Arc::new(
        ClientConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

fn connect(
    ns: &Netns,
    cfg: &Arc<ClientConfig>,
    name: &str,
) -> anyhow::Result<StreamOwned<ClientConnection, TcpStream>> {
    let sock = ns.enter(|| {
        TcpStream::connect_timeout(
            &format!("{SERVER_V4}:{PORT}").parse().expect("addr"),
            Duration::from_secs(20),
        )
    })??;
    sock.set_nodelay(true)?;
    sock.set_read_timeout(Some(Duration::from_secs(60)))?;
    let conn = ClientConnection::new(cfg.clone(), ServerName::try_from(name.to_string())?)?;
    Ok(StreamOwned::new(conn, sock))
}

/// Plaintext Gbit/s over `conns` connections for `secs`.
fn bulk(ns: &Netns, cfg: &Arc<ClientConfig>, conns: usize, secs: u64) -> anyhow::Result<f64> {
    let bytes = Arc::new(AtomicU64::new(0));
    let go = Arc::new(AtomicBool::new(true));
    let mut threads = Vec::new();
    for _ in 0..conns {
        let mut tls = connect(ns, cfg, NAME)?;
        tls.write_all(&[OP_BULK])?;
        let (bytes, go) = (bytes.clone(), go.clone());
        threads.push(thread::spawn(move || {
            let mut buf = vec![0u8; 256 << 10];
            while go.load(Ordering::Relaxed) {
                match tls.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        bytes.fetch_add(n as u64, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    // Past the ramp-up, count a window of `secs`.
    thread::sleep(Duration::from_millis(500));
    let (b0, t0) = (bytes.load(Ordering::Relaxed), Instant::now());
    thread::sleep(Duration::from_secs(secs));
    let (b1, took) = (bytes.load(Ordering::Relaxed), t0.elapsed());
    go.store(false, Ordering::Relaxed);
    drop(threads);
    Ok((b1 - b0) as f64 * 8.0 / took.as_secs_f64() / 1e9)
}

/// New connections per second by `threads` clients for `secs`; `names`
/// gives each connection's server name.
fn handshakes(
    ns: &Netns,
    cfg: &Arc<ClientConfig>,
    threads: usize,
    secs: u64,
    names: Arc<dyn Fn(u64) -> String + Send + Sync>,
) -> anyhow::Result<(f64, u64)> {
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let next = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut hs = Vec::new();
    for _ in 0..threads {
        let (cfg, done, failed, next, names) = (
            cfg.clone(),
            done.clone(),
            failed.clone(),
            next.clone(),
            names.clone(),
        );
        let ns = Netns::existing(&ns.name, true);
        hs.push(thread::spawn(move || {
            while Instant::now() < deadline {
                let name = names(next.fetch_add(1, Ordering::Relaxed));
                let ok = (|| -> anyhow::Result<()> {
                    let mut tls = connect(&ns, &cfg, &name)?;
                    tls.write_all(&[OP_PING])?;
                    let mut b = [0u8; 1];
                    tls.read_exact(&mut b)?;
                    tls.conn.send_close_notify();
                    let _ = tls.flush();
                    Ok(())
                })();
                match ok {
                    Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    let t0 = Instant::now();
    for h in hs {
        let _ = h.join();
    }
    Ok((
        done.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64(),
        failed.load(Ordering::Relaxed),
    ))
}

/// HTTP/1.1 requests per second over `conns` keep-alive connections, each
/// sending its next request once the last response is whole.
fn http_requests(
    ns: &Netns,
    cfg: &Arc<ClientConfig>,
    conns: usize,
    secs: u64,
) -> anyhow::Result<f64> {
    let done = Arc::new(AtomicU64::new(0));
    let go = Arc::new(AtomicBool::new(true));
    let mut threads = Vec::new();
    for _ in 0..conns {
        let mut tls = connect(ns, cfg, NAME)?;
        let (done, go) = (done.clone(), go.clone());
        threads.push(thread::spawn(move || -> anyhow::Result<()> {
            let mut response = vec![0u8; HTTP_HEAD.len() + 1024];
            while go.load(Ordering::Relaxed) {
                tls.write_all(HTTP_REQUEST)?;
                tls.read_exact(&mut response)?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        }));
    }
    thread::sleep(Duration::from_millis(500));
    let (n0, t0) = (done.load(Ordering::Relaxed), Instant::now());
    thread::sleep(Duration::from_secs(secs));
    let (n1, took) = (done.load(Ordering::Relaxed), t0.elapsed());
    go.store(false, Ordering::Relaxed);
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("a client panicked"))??;
    }
    Ok((n1 - n0) as f64 / took.as_secs_f64())
}

/// 64-byte round trips on one connection: (p50, p99) in microseconds.
fn latency(ns: &Netns, cfg: &Arc<ClientConfig>, n: usize) -> anyhow::Result<(f64, f64)> {
    let mut tls = connect(ns, cfg, NAME)?;
    tls.write_all(&[OP_ECHO])?;
    let mut h = Histogram::<u64>::new(3)?;
    let msg = [7u8; 64];
    let mut buf = [0u8; 64];
    for i in 0..n + 100 {
        let t = Instant::now();
        tls.write_all(&msg)?;
        tls.read_exact(&mut buf)?;
        if i >= 100 {
            h.record(t.elapsed().as_micros() as u64)?;
        }
    }
    Ok((
        h.value_at_quantile(0.5) as f64,
        h.value_at_quantile(0.99) as f64,
    ))
}

/// One path's setup: what runs on the harness, and the CA clients trust.
enum Setup {
    /// The engine, and the directory of its pcapng files (`decrypt-pcap`).
    Decrypt {
        mitm: Box<Mitm>,
        _pcap: Option<PcapDir>,
    },
    Plain(Box<Plain>),
}

/// A private directory for the engine's decrypted captures, removed with
/// what is in it when the path's run ends.
struct PcapDir(PathBuf);

impl PcapDir {
    fn new() -> anyhow::Result<PcapDir> {
        use std::os::unix::fs::PermissionsExt;
        let d = std::env::temp_dir().join(format!("loupe-perf-pcap-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir(&d)?;
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700))?;
        Ok(PcapDir(d))
    }
}

impl Drop for PcapDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Plain {
    ca: PathBuf,
    pki: Pki,
    _sslsplit: Option<Proc>,
    h: Harness,
}

impl Setup {
    fn start(path: &str) -> anyhow::Result<Setup> {
        if path == "decrypt-pcap" {
            // HTTP/1.1 records and every connection written as pcapng.
            let dir = PcapDir::new()?;
            let d = dir.0.display().to_string();
            let m = Mitm::start_with(HarnessConfig::default(), &["--export-pcap", &d], |pki| {
                lab_policy(pki, r#"export = ["pcap"]"#, "")
            })?;
            return Ok(Setup::Decrypt {
                mitm: Box::new(m),
                _pcap: Some(dir),
            });
        }
        if let Some(inspect) = path.strip_prefix("decrypt") {
            let (profile, tables) = inspecting(inspect)?;
            return Ok(Setup::Decrypt {
                mitm: Box::new(Mitm::start(|pki| lab_policy(pki, &profile, &tables))?),
                _pcap: None,
            });
        }
        let h = Harness::new(HarnessConfig::default())?;
        let pki = Pki::new(&h.dir.join("pki"))?;
        let (ca, sslsplit) = match path {
            "sslsplit" => {
                let (ca, p) = sslsplit_up(&h)?;
                (ca, Some(p))
            }
            "direct" => {
                h.bridge_up()?;
                (pki.roots.clone(), None)
            }
            other => anyhow::bail!(
                "unknown path {other:?} (direct, decrypt, decrypt-off, decrypt-sigN, decrypt-pcap, \
                 sslsplit)"
            ),
        };
        Ok(Setup::Plain(Box::new(Plain {
            ca,
            pki,
            _sslsplit: sslsplit,
            h,
        })))
    }

    fn h(&self) -> &Harness {
        match self {
            Setup::Decrypt { mitm: m, .. } => &m.h,
            Setup::Plain(p) => &p.h,
        }
    }

    fn pki(&self) -> &Pki {
        match self {
            Setup::Decrypt { mitm: m, .. } => &m.pki,
            Setup::Plain(p) => &p.pki,
        }
    }

    fn ca(&self) -> &Path {
        match self {
            Setup::Decrypt { mitm: m, .. } => &m.ca,
            Setup::Plain(p) => &p.ca,
        }
    }

    fn engine_pid(&self) -> Option<u32> {
        match self {
            Setup::Decrypt { mitm: m, .. } => Some(m.engine.pid()),
            Setup::Plain(_) => None,
        }
    }
}

/// SSLsplit in the engine namespace behind the redirect, with a P-256 CA
/// of its own (a file); returns the CA clients trust, and the process.
fn sslsplit_up(h: &Harness) -> anyhow::Result<(PathBuf, Proc)> {
    h.redirect_up(PORT)?;
    let loupe_tests::https::ServerCert { cert, key } = loupe_tests::https::self_signed_p256(
        &h.dir.join("sslsplit-ca.crt"),
        &h.dir.join("sslsplit-ca.key"),
        "/CN=SSLsplit bench CA",
        &[
            "basicConstraints=critical,CA:TRUE",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    )?;
    let log = std::fs::File::create(h.dir.join("sslsplit.log"))?;
    let child = h
        .engine
        .command("sslsplit")
        .args(["-u", "root", "-k"])
        .arg(&key)
        .arg("-c")
        .arg(&cert)
        .args(["ssl", "0.0.0.0", &RELAY_PORT.to_string()])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("spawning sslsplit (Debian's sslsplit, installed by scripts/setup)")?;
    let p = h.relay_ready(Proc::new("sslsplit", child))?;
    Ok((cert, p))
}

/// What a `decrypt` path's profile inspects, from what follows `decrypt`
/// in its name: nothing (the default: HTTP/1.1 records on), `-off` (no
/// inspector), `-sigN` (N alert signatures of 16 pseudo-random bytes,
/// which random traffic never matches, and HTTP/1.1). The profile's
/// extra lines and the signature tables.
fn inspecting(suffix: &str) -> anyhow::Result<(String, String)> {
    if suffix.is_empty() {
        return Ok((String::new(), String::new()));
    }
    if suffix == "-off" {
        return Ok(("http = false".into(), String::new()));
    }
    let n: usize = suffix
        .strip_prefix("-sig")
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("decrypt{suffix}: expected -off or -sigN"))?;
    let names: Vec<String> = (0..n).map(|i| format!("\"s{i}\"")).collect();
    let tables: String = random_patterns(n, 16)
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let hex: String = p.iter().map(|b| format!("{b:02x}")).collect();
            format!("[signatures.s{i}]\nhex = \"{hex}\"\n")
        })
        .collect();
    Ok((format!("signatures = [{}]", names.join(",")), tables))
}

/// `n` patterns of `len` pseudo-random bytes (a fixed seed).
fn random_patterns(n: usize, len: usize) -> Vec<Vec<u8>> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..n)
        .map(|_| {
            (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect()
        })
        .collect()
}

/// The inspectors on one core, in memory, for each configuration: bulk
/// Gbit/s of one HTTP/1.1 response's body in 16 KiB chunks, and
/// request/response pairs per second (80-byte request, 1 KiB body).
fn inspector_limits(secs: u64) -> anyhow::Result<Vec<(String, f64, f64)>> {
    use loupe_dataplane::{
        export::{pcapng::RingConfig, ExportConfig, Exporter},
        inspect::{
            signature::{SignatureAction, SignatureSet},
            Direction, Inspection,
        },
        policy::ExportSink,
    };
    let dir = PcapDir::new()?;
    let exporter = Exporter::start(&ExportConfig {
        pcap: Some(RingConfig {
            dir: dir.0.clone(),
            file_bytes: 100_000_000,
            file_age: Duration::from_secs(3600),
            total_bytes: 400_000_000,
        }),
        mirror: None,
        queue_bytes: 64 << 20,
    })
    .map_err(anyhow::Error::msg)?;
    let sinks = exporter.sinks(&[ExportSink::Pcap]);
    let set = |n: usize| -> anyhow::Result<Option<Arc<SignatureSet>>> {
        let sigs: Vec<(String, Vec<u8>, SignatureAction)> = random_patterns(n, 16)
            .into_iter()
            .enumerate()
            .map(|(i, p)| (format!("s{i}"), p, SignatureAction::Alert))
            .collect();
        Ok(Some(Arc::new(
            SignatureSet::new(&sigs).map_err(anyhow::Error::msg)?,
        )))
    };
    // (`off` first: the pipeline's own cost, nothing to compare with.)
    let configs = [
        ("off", Inspection::default()),
        (
            "http",
            Inspection {
                http: true,
                ..Inspection::default()
            },
        ),
        (
            "http+sig100",
            Inspection {
                http: true,
                signatures: set(100)?,
                ..Inspection::default()
            },
        ),
        (
            "http+sig10000",
            Inspection {
                http: true,
                signatures: set(10_000)?,
                ..Inspection::default()
            },
        ),
        // The worker's side of the export (a copy into the exporter's
        // queue); the exporter thread writes on the other core, and what
        // it cannot keep up with is dropped (said below).
        (
            "http+pcap",
            Inspection {
                http: true,
                export: Some((exporter.clone(), sinks)),
                ..Inspection::default()
            },
        ),
    ];
    let request = b"GET /bulk HTTP/1.1\r\nHost: bench.loupe.test\r\nUser-Agent: loupe-perf\r\n\r\n";
    let mut chunk = vec![0u8; 16 << 10];
    let mut x = 1u64;
    for b in chunk.iter_mut() {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *b = (x >> 56) as u8;
    }
    let small = [
        &b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 1024\r\n\r\n"[..],
        &chunk[..1024],
    ]
    .concat();
    let mut out = Vec::new();
    for (label, insp) in configs {
        let now = Instant::now();
        let mut p = insp.pipeline(None, None, ENDS);
        p.data(Direction::ClientToServer, request, now);
        p.data(
            Direction::ServerToClient,
            b"HTTP/1.1 200 OK\r\nContent-Length: 9000000000000000000\r\n\r\n",
            now,
        );
        let t0 = Instant::now();
        let mut bytes = 0u64;
        while t0.elapsed() < Duration::from_secs(secs) {
            for _ in 0..64 {
                p.data(Direction::ServerToClient, &chunk, now);
            }
            bytes += 64 * chunk.len() as u64;
        }
        let gbit = bytes as f64 * 8.0 / t0.elapsed().as_secs_f64() / 1e9;
        let mut p = insp.pipeline(None, None, ENDS);
        let t0 = Instant::now();
        let mut pairs = 0u64;
        while t0.elapsed() < Duration::from_secs(secs) {
            for _ in 0..256 {
                p.data(Direction::ClientToServer, request, now);
                p.data(Direction::ServerToClient, &small, now);
            }
            pairs += 256;
            anyhow::ensure!(p.blocked().is_none(), "a random pattern matched");
            p.take_findings();
        }
        let rate = pairs as f64 / t0.elapsed().as_secs_f64();
        eprintln!("  {label}: {gbit:.2} Gbit/s bulk, {rate:.0} requests/s");
        out.push((label.to_string(), gbit, rate));
    }
    exporter.stop();
    let e = exporter.report();
    eprintln!(
        "  http+pcap: the exporter wrote {} frames ({} MB), dropped {} chunks ({} MB) it could \
         not keep up with",
        e.pcap_packets,
        e.pcap_bytes / 1_000_000,
        e.events_dropped,
        e.bytes_dropped / 1_000_000
    );
    Ok(out)
}

/// The HTTP/2 inspector on one core, in memory, as an observer (`h2`) and
/// as the enforcer that re-frames the connection (`h2+url-enforce`: a URL
/// rule that blocks, never matched): bulk DATA on one stream, and
/// request/response streams (a GET; 200 with a 1 KiB body).
fn h2_limits(secs: u64) -> anyhow::Result<Vec<(String, f64, f64)>> {
    use loupe_dataplane::{
        inspect::{
            http2::{encode_block, frame, PREFACE},
            Direction::{self, ClientToServer as C2S, ServerToClient as S2C},
            Inspection, Pipeline,
        },
        policy::{UrlAction, UrlRule},
    };
    let never = Arc::new(vec![UrlRule {
        name: "never".into(),
        hosts: Vec::new(),
        paths: vec!["/never-requested".into()],
        categories: Vec::new(),
        category_hosts: Vec::new(),
        action: UrlAction::Block,
    }]);
    let configs = [
        (
            "h2",
            Inspection {
                http: true,
                ..Inspection::default()
            },
        ),
        (
            "h2+url-enforce",
            Inspection {
                http: true,
                url_rules: Some(never),
                ..Inspection::default()
            },
        ),
    ];
    let block = |fields: &[(&str, &str)]| {
        let f: Vec<(Vec<u8>, Vec<u8>)> = fields
            .iter()
            .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect();
        let mut out = Vec::new();
        encode_block(&f, &mut out);
        out
    };
    let request = block(&[
        (":method", "GET"),
        (":scheme", "https"),
        (":authority", NAME),
        (":path", "/item"),
        ("user-agent", "loupe-perf"),
    ]);
    let answer = block(&[
        (":status", "200"),
        ("content-type", "application/octet-stream"),
        ("content-length", "1024"),
    ]);
    let now = Instant::now();
    // Everything fed is taken and passed on (what goes out is dropped).
    let feed = |p: &mut Pipeline, dir: Direction, bytes: &[u8]| -> anyhow::Result<()> {
        p.data(dir, bytes, now);
        let mut rest = bytes;
        while p.rewrites() && !rest.is_empty() {
            let n = p.rewrite(dir, rest, now);
            for d in [C2S, S2C] {
                if let Some(o) = p.output(d) {
                    o.clear();
                }
            }
            anyhow::ensure!(n > 0 && p.blocked().is_none(), "the enforcer stopped");
            rest = &rest[n..];
        }
        Ok(())
    };
    let open = |p: &mut Pipeline| -> anyhow::Result<()> {
        let mut c = PREFACE.to_vec();
        // Windows as large as they go: the benchmark is not flow control.
        c.extend(frame(0x4, 0, 0, &[0, 4, 0x7f, 0xff, 0xff, 0xff]));
        c.extend(frame(0x8, 0, 0, &0x7fff_0000u32.to_be_bytes()));
        feed(p, C2S, &c)?;
        feed(p, S2C, &frame(0x4, 0, 0, &[]))
    };
    let data = vec![0x5au8; 16_384];
    let mut out = Vec::new();
    for (label, insp) in configs {
        let mut p = insp.pipeline(Some(b"h2"), None, ENDS);
        open(&mut p)?;
        feed(&mut p, C2S, &frame(0x1, 0x5, 1, &request))?;
        feed(&mut p, S2C, &frame(0x1, 0x4, 1, &answer))?;
        let one = frame(0x0, 0, 1, &data);
        let t0 = Instant::now();
        let mut bytes = 0u64;
        while t0.elapsed() < Duration::from_secs(secs) {
            for _ in 0..64 {
                feed(&mut p, S2C, &one)?;
            }
            bytes += 64 * data.len() as u64;
            p.take_findings();
        }
        let gbit = bytes as f64 * 8.0 / t0.elapsed().as_secs_f64() / 1e9;
        let mut p = insp.pipeline(Some(b"h2"), None, ENDS);
        open(&mut p)?;
        let body = &data[..1024];
        let t0 = Instant::now();
        let mut id = 1u32;
        let mut pairs = 0u64;
        while t0.elapsed() < Duration::from_secs(secs) {
            for _ in 0..256 {
                feed(&mut p, C2S, &frame(0x1, 0x5, id, &request))?;
                let mut s = frame(0x1, 0x4, id, &answer);
                s.extend(frame(0x0, 0x1, id, body));
                feed(&mut p, S2C, &s)?;
                id += 2;
            }
            pairs += 256;
            anyhow::ensure!(p.blocked().is_none(), "blocked");
            p.take_findings();
        }
        let rate = pairs as f64 / t0.elapsed().as_secs_f64();
        eprintln!("  {label}: {gbit:.2} Gbit/s bulk, {rate:.0} requests/s");
        out.push((label.to_string(), gbit, rate));
    }
    Ok(out)
}

/// rustls on one core, in memory: handshake pairs per second and bulk
/// (seal + open) Gbit/s, with a P-256 certificate.
fn rustls_limits(pki: &Pki, secs: u64) -> anyhow::Result<(f64, f64)> {
    let leaf = pki.leaf("mem", &[NAME], Key::P256, Flaw::None)?;
    let server = {
        let ck = load_cert(&leaf)?;
        Arc::new(
            ServerConfig::builder()
                .with_no_client_auth()
                .with_single_cert(ck.cert.clone(), PrivateKeyDer::from_pem_file(&leaf.key)?)?,
        )
    };
    let client = client_config(&pki.roots)?;
    let pair = || -> anyhow::Result<(ClientConnection, ServerConnection)> {
        let mut c = ClientConnection::new(client.clone(), ServerName::try_from(NAME)?)?;
        let mut s = ServerConnection::new(server.clone())?;
        let mut buf = Vec::new();
        while c.is_handshaking() || s.is_handshaking() {
            buf.clear();
            c.write_tls(&mut buf)?;
            s.read_tls(&mut &buf[..])?;
            s.process_new_packets()?;
            buf.clear();
            s.write_tls(&mut buf)?;
            c.read_tls(&mut &buf[..])?;
            c.process_new_packets()?;
        }
        Ok((c, s))
    };
    let t0 = Instant::now();
    let mut n = 0u64;
    while t0.elapsed() < Duration::from_secs(secs) {
        pair()?;
        n += 1;
    }
    let pairs = n as f64 / t0.elapsed().as_secs_f64();
    let (mut c, mut s) = pair()?;
    c.set_buffer_limit(None);
    let chunk = vec![0x5au8; 64 << 10];
    let mut out = [0u8; 64 << 10];
    let mut wire = Vec::with_capacity(1 << 20);
    let (t0, mut bytes) = (Instant::now(), 0u64);
    while t0.elapsed() < Duration::from_secs(secs) {
        c.writer().write_all(&chunk)?;
        wire.clear();
        while c.wants_write() {
            c.write_tls(&mut wire)?;
        }
        let mut rd = &wire[..];
        while !rd.is_empty() {
            s.read_tls(&mut rd)?;
            s.process_new_packets()?;
            while let Ok(k) = s.reader().read(&mut out) {
                if k == 0 {
                    break;
                }
                bytes += k as u64;
            }
        }
    }
    Ok((pairs, bytes as f64 * 8.0 / t0.elapsed().as_secs_f64() / 1e9))
}

/// A connection that made one echo round trip and then idles.
fn idle_connection(
    client: &Netns,
    cfg: &Arc<ClientConfig>,
) -> anyhow::Result<StreamOwned<ClientConnection, TcpStream>> {
    let mut tls = connect(client, cfg, NAME)?;
    tls.write_all(&[OP_ECHO])?;
    tls.write_all(&[1u8; 64])?;
    let mut b = [0u8; 64];
    tls.read_exact(&mut b)?;
    Ok(tls)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut rows = Vec::new();
    let mut table = Vec::new();
    for path in &args.paths {
        eprintln!("== {path}");
        let s = Setup::start(path)?;
        // Thousands of connections a second leave their ports in TIME-WAIT
        // on the client: without reuse and a wide range, the second round
        // ran out of ports and measured that instead of the path.
        s.h().client.exec(
            "sysctl",
            &[
                "-qw",
                "net.ipv4.tcp_tw_reuse=1",
                "net.ipv4.ip_local_port_range=1024 65000",
            ],
        )?;
        let server_cfg = server_config(s.pki(), args.names)?;
        let _server = Server::start(&s.h().server, server_cfg)?;
        let cfg = client_config(s.ca())?;
        let client = &s.h().client;
        // Memory per idle decrypted connection, first: on an engine whose
        // tables have not yet grown for the other loads. The growth is
        // taken between a first and a second batch of `--idle`
        // connections, so that memory the allocator already holds (and
        // the first batch reuses) does not hide the cost. One connection
        // first mints the certificate.
        let mem = match s.engine_pid() {
            Some(pid) => {
                let _first = idle_connection(client, &cfg)?;
                let mut idle = Vec::with_capacity(2 * args.idle);
                let mut rss = Vec::new();
                for _ in 0..2 {
                    for _ in 0..args.idle {
                        idle.push(idle_connection(client, &cfg)?);
                    }
                    // The engine's worker settles (acks sent, buffers trimmed).
                    thread::sleep(Duration::from_secs(2));
                    rss.push(rss_kib(pid));
                }
                drop(idle);
                Some(rss[1].saturating_sub(rss[0]) as f64 / args.idle as f64)
            }
            None => None,
        };
        // Warm: connections for a second (the decrypt path minted its
        // first certificate above, or here).
        let (_, failed) = handshakes(client, &cfg, 1, 1, Arc::new(|_| NAME.to_string()))?;
        if failed > 0 {
            let log = std::fs::read_to_string(s.h().dir.join("sslsplit.log")).unwrap_or_default();
            anyhow::bail!("{path}: the first connections failed\n{log}");
        }
        let mut b1 = Vec::new();
        let mut b8 = Vec::new();
        let mut hit = Vec::new();
        let mut miss = Vec::new();
        let mut lat = Vec::new();
        let mut flood_lat = Vec::new();
        let mut reqs = Vec::new();
        let mut failures = 0;
        let mut name_base = 0u64;
        for r in 0..args.repeat {
            b1.push(bulk(client, &cfg, 1, args.seconds)?);
            b8.push(bulk(client, &cfg, 8, args.seconds)?);
            let (rate, f) = handshakes(
                client,
                &cfg,
                args.handshake_threads,
                args.seconds,
                Arc::new(|_| NAME.to_string()),
            )?;
            hit.push(rate);
            failures += f;
            let names = args.names as u64;
            let base = name_base;
            let (rate, f) = handshakes(
                client,
                &cfg,
                args.handshake_threads,
                args.seconds,
                Arc::new(move |i| format!("n{}.loupe.test", (base + i) % names)),
            )?;
            name_base += (rate * args.seconds as f64) as u64 + 1;
            miss.push(rate);
            failures += f;
            lat.push(latency(client, &cfg, args.round_trips)?);
            reqs.push(http_requests(client, &cfg, 8, args.seconds)?);
            // The same round trips while a handshake flood runs.
            let flood = {
                let ns = Netns::existing(&client.name, true);
                let cfg = cfg.clone();
                let secs = args.seconds * 3;
                thread::spawn(move || {
                    handshakes(&ns, &cfg, 2, secs, Arc::new(|_| NAME.to_string()))
                })
            };
            flood_lat.push(latency(client, &cfg, args.round_trips)?);
            let _ = flood.join();
            eprintln!(
                "  round {r}: bulk {:.2}/{:.2} Gbit/s (1/8), handshakes {:.0}/s hit {:.0}/s miss, rtt p50 {:.0} us p99 {:.0} us, under flood p99 {:.0} us, {:.0} HTTP requests/s",
                b1[r], b8[r], hit[r], miss[r], lat[r].0, lat[r].1, flood_lat[r].1, reqs[r]
            );
        }
        if let Setup::Decrypt { mitm, .. } = &s {
            // What the exporter kept up with: a capture that dropped
            // chunks is not the whole traffic, whatever the speed.
            if let Some(e) = mitm.engine.stats()?.tls.and_then(|t| t.export) {
                eprintln!(
                    "  export: {} connections, {} frames, {} MB written, {} chunks ({} MB) dropped",
                    e.connections,
                    e.pcap_packets,
                    e.pcap_bytes / 1_000_000,
                    e.events_dropped,
                    e.bytes_dropped / 1_000_000
                );
            }
        }
        let row = json!({
            "path": path,
            "bulk_1_gbit": median(b1.clone()), "bulk_8_gbit": median(b8.clone()),
            "handshakes_hit_per_s": median(hit.clone()), "handshakes_miss_per_s": median(miss.clone()),
            "rtt_p50_us": median(lat.iter().map(|l| l.0).collect()),
            "rtt_p99_us": median(lat.iter().map(|l| l.1).collect()),
            "flood_rtt_p99_us": median(flood_lat.iter().map(|l| l.1).collect()),
            "http_requests_per_s": median(reqs.clone()),
            "kib_per_idle_connection": mem,
            "failed_handshakes": failures,
        });
        table.push(row.clone());
        rows.push(row);
    }
    eprintln!("== rustls on one core, in memory");
    let h = Harness::new(HarnessConfig::default())?;
    let pki = Pki::new(&h.dir.join("pki"))?;
    let (pairs, gbit) = rustls_limits(&pki, args.seconds)?;
    rows.push(json!({"rustls_handshake_pairs_per_s": pairs, "rustls_bulk_gbit_one_core": gbit}));
    eprintln!("== inspectors on one core, in memory");
    let mut limits = inspector_limits(args.seconds)?;
    limits.extend(h2_limits(args.seconds)?);
    for (label, g, rate) in &limits {
        rows.push(
            json!({"inspectors": label, "bulk_gbit_one_core": g, "requests_per_s_one_core": rate}),
        );
    }

    println!(
        "\n{:<16} {:>9} {:>9} {:>11} {:>11} {:>9} {:>9} {:>11} {:>9} {:>9}",
        "path",
        "1 conn",
        "8 conns",
        "hs/s hit",
        "hs/s miss",
        "rtt p50",
        "rtt p99",
        "p99 flood",
        "KiB/conn",
        "HTTP r/s"
    );
    for r in &table {
        println!(
            "{:<16} {:>6.2} Gb {:>6.2} Gb {:>11.0} {:>11.0} {:>6.0} us {:>6.0} us {:>8.0} us {:>9} {:>9.0}",
            r["path"].as_str().unwrap_or(""),
            r["bulk_1_gbit"].as_f64().unwrap_or(0.0),
            r["bulk_8_gbit"].as_f64().unwrap_or(0.0),
            r["handshakes_hit_per_s"].as_f64().unwrap_or(0.0),
            r["handshakes_miss_per_s"].as_f64().unwrap_or(0.0),
            r["rtt_p50_us"].as_f64().unwrap_or(0.0),
            r["rtt_p99_us"].as_f64().unwrap_or(0.0),
            r["flood_rtt_p99_us"].as_f64().unwrap_or(0.0),
            r["kib_per_idle_connection"]
                .as_f64()
                .map_or("-".into(), |k| format!("{k:.1}")),
            r["http_requests_per_s"].as_f64().unwrap_or(0.0),
        );
    }
    println!(
        "rustls in memory, one core: {pairs:.0} handshake pairs/s, {gbit:.2} Gbit/s bulk (seal+open)"
    );
    for (label, g, rate) in &limits[1..] {
        println!(
            "inspectors in memory, one core, {label}: {g:.2} Gbit/s bulk, {rate:.0} requests/s"
        );
    }
    loupe_perf::write_results("tls.json", &rows)?;
    Ok(())
}
