//! `loupe-dataplane`: attach the classifier to two interfaces and run the
//! AF_XDP workers until SIGINT or SIGTERM.

use std::{
    path::PathBuf,
    process::ExitCode,
    sync::{atomic::AtomicBool, Arc},
    time::Duration,
};

use clap::Parser;
use loupe_dataplane::{
    api::{unix, ApiConfig},
    config::{self, EngineConfig, HsmSettings, Prefix},
    engine,
    export::{pcapng::RingConfig, ExportConfig},
    policy::HostGlob,
    session::SessionSettings,
    tls::context::TlsSettings,
    xsk::PortConfig,
};
use loupe_hsm::{
    pin::PinSource,
    token::{TokenConfig, SOFTHSM2_MODULE},
};

/// mimalloc: buffers and signing requests are allocated on one thread and
/// freed on another, which glibc's per-thread arenas serialise.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Loupe dataplane: steer TLS flows from XDP into AF_XDP workers.
#[derive(Debug, Parser)]
#[command(name = "loupe-dataplane", version)]
struct Args {
    /// Client-facing interface.
    #[arg(long)]
    inside: String,
    /// Server-facing interface.
    #[arg(long)]
    outside: String,
    /// RX queues to serve, one worker each (default: all of them).
    #[arg(long)]
    queues: Option<u32>,
    /// XDP attach mode: native (driver) or skb (generic).
    #[arg(long, default_value = "native", value_parser = config::parse_mode)]
    xdp_mode: loupe_dataplane::ebpf::AttachMode,
    /// TCP destination ports steered to userspace, comma-separated, or `none`.
    #[arg(long, default_value = "443", value_parser = config::parse_ports)]
    steer_ports: std::vec::Vec<u16>,
    /// Server prefixes steered (repeatable; default: every address).
    #[arg(long = "steer-prefix")]
    steer_prefixes: Vec<Prefix>,
    /// Prefixes never steered, as source or destination (repeatable).
    #[arg(long = "exempt-prefix")]
    exempt_prefixes: Vec<Prefix>,
    /// Write a JSON stats report here (atomically) while running and at exit;
    /// mode 0640, in --control-group when given (it lists flows).
    #[arg(long)]
    stats_file: Option<PathBuf>,
    /// Stats report interval in milliseconds.
    #[arg(long, default_value_t = 500)]
    stats_interval_ms: u64,
    /// UMEM frames per queue.
    #[arg(long, default_value_t = PortConfig::default().frames)]
    frames: u32,
    /// Flow table limit per worker (also the tcp-split table's: when it is
    /// full, half-open handshakes are forgotten first, oldest first, then
    /// other entries that are not live splits).
    #[arg(long, default_value_t = 262_144)]
    max_flows: usize,
    /// Idle seconds before a flow is forgotten.
    #[arg(long, default_value_t = 120)]
    flow_idle_secs: u64,
    /// Do not pin workers to CPUs.
    #[arg(long)]
    no_pin: bool,
    /// Microseconds an idle worker keeps polling its rings before it
    /// sleeps (0: sleep after a few empty rounds). Frames arriving meanwhile skip a
    /// wake-up; the CPU time is spent whether they come or not.
    #[arg(long, default_value_t = loupe_dataplane::config::DEFAULT_BUSY_POLL_US,
          allow_negative_numbers = true,
          value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    busy_poll_us: u64,
    /// Microseconds an idle worker keeps polling its rings after its last
    /// work while it has its CPU to itself (0, the default: sleep after a
    /// few empty rounds). For workers that own their cores: it saves the
    /// next frames a wake-up (5000 takes a new connection's frames and the
    /// next SYN without one). A worker that finds other threads taking its
    /// CPU (a yield or a round of 1 ms or more, or a fifth of its polling
    /// time) sleeps instead for the next 50 ms (`idle_backoffs` in the
    /// stats).
    #[arg(long, default_value_t = loupe_dataplane::config::DEFAULT_IDLE_SPIN_US,
          allow_negative_numbers = true,
          value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    idle_spin_us: u64,
    /// Microseconds a busy worker runs before it yields its CPU once (0,
    /// the default: never). For workers that own their cores: threads
    /// beside it that bring its frames (a NAPI thread, ksoftirqd) get the
    /// CPU then, not when its time slice ends, so the receive rings they
    /// empty do not overflow meanwhile (at 10 Gbit/s of 1500-byte frames
    /// 100 µs is about 83 frames). On a CPU shared with other work, that
    /// work gets it for a whole time slice instead.
    #[arg(long, default_value_t = loupe_dataplane::config::DEFAULT_YIELD_EVERY_US,
          allow_negative_numbers = true,
          value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    yield_every_us: u64,
    /// Experimental: XDP forwards a steered connection's handshake in the
    /// kernel and records it; the worker takes the connection up from the
    /// record at its first data (a sleeping worker then wakes once per
    /// connection, not three times). Off by default: a connection whose
    /// record is lost before its first data is met as one already running
    /// (see --mid-flow and docs/ARCHITECTURE.md).
    #[arg(long)]
    handshake_fast_path: bool,
    /// Split every steered TCP connection: terminate both halves and relay
    /// the byte streams (the tcp-split action; TLS is left untouched).
    #[arg(long)]
    tcp_split: bool,
    /// tcp-split: pass (do not split) connections whose ClientHello names
    /// this server: a host-name glob such as `host.example`, `*.example`
    /// (every name below it) or `api-*.example` (repeatable). They are
    /// released to the XDP fast path.
    #[arg(long = "split-exempt-sni", value_name = "GLOB")]
    split_exempt_sni: Vec<HostGlob>,
    /// Serve the control socket here: the control process (`loupe
    /// daemon`) applies policies, reads status and flows, and receives the
    /// flow log through it. Mode 0660; root, this process's user and
    /// --control-group may connect.
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,
    /// Group (name or id) allowed on the control socket besides root.
    #[arg(long, value_name = "GROUP", requires = "control_socket")]
    control_group: Option<String>,
    /// Client bytes held until the decision point (a complete
    /// ClientHello), at most; beyond, the connection is released unchanged.
    #[arg(long, default_value_t = SessionSettings::default().hold_bytes)]
    hold_bytes: usize,
    /// Longest hold in milliseconds, from the first held byte; then the
    /// connection is released unchanged.
    #[arg(long, default_value_t = SessionSettings::default().hold_timeout.as_millis() as u64)]
    hold_timeout_ms: u64,
    /// On SIGTERM/SIGINT, milliseconds split connections are given to
    /// finish; those still open then are reset on both sides (and logged
    /// with the end `engine-stopped`).
    #[arg(long, default_value_t = SessionSettings::default().drain.as_millis() as u64)]
    drain_timeout_ms: u64,
    /// The most a split half's send or receive buffer grows to, in KiB
    /// (they start at 128 KiB and grow with the connection's
    /// bandwidth-delay product, as Linux's tcp_wmem/tcp_rmem maximum).
    #[arg(long, default_value_t = (SessionSettings::default().buffer_max >> 10) as u64,
          allow_negative_numbers = true,
          value_parser = clap::value_parser!(u64).range(128..=65536))]
    split_buffer_max_kib: u64,
    /// Memory all split connections' buffers may grow into beyond their
    /// initial 512 KiB each, in MiB. When it is spent, buffers stop
    /// growing and new connections are not split: tcp-split ones pass
    /// (counted), decrypt ones follow the profile's no_resources.
    #[arg(long, default_value_t = (SessionSettings::default().budget.limit() >> 20) as u64,
          allow_negative_numbers = true,
          value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    split_memory_mib: u64,
    /// Congestion control of the split halves' senders: cubic (RFC 9438,
    /// as Linux) or newreno (RFC 5681).
    #[arg(long, default_value = "cubic", value_name = "ALGORITHM")]
    split_cc: loupe_dataplane::tcp::cc::Algorithm,
    /// A connection on a steered port that the engine cannot follow from
    /// its start (seen mid-flow: running before the engine, or forgotten
    /// while idle or to make room; evicted while undecided; no room in a
    /// table of live splits), when the policy without the server name
    /// would inspect it (tcp-split, decrypt, inbound-inspect): `drop`
    /// resets it (a SYN finding no room is dropped), failing closed;
    /// `pass` leaves it to the kernel uninspected, so connections running
    /// across an engine restart carry on. A block that might apply drops
    /// it either way.
    #[arg(long, default_value = "drop", value_name = "drop|pass")]
    mid_flow: loupe_dataplane::session::MidFlow,
    /// Start the HSM signer on the token with this label (repeatable, one
    /// per partition; the first one's audit key seals the audit log).
    #[arg(long = "hsm-token")]
    hsm_tokens: Vec<String>,
    /// PKCS#11 module of the HSM.
    #[arg(long, env = "LOUPE_PKCS11_MODULE", default_value = SOFTHSM2_MODULE)]
    hsm_module: PathBuf,
    /// File with the user PIN (mode 0600); with several tokens, the files
    /// are given in the same order. Without it the PIN comes from the
    /// environment variable named by --hsm-pin-env. Never on the command line.
    #[arg(long = "hsm-pin-file")]
    hsm_pin_files: Vec<PathBuf>,
    /// Environment variable holding the PIN when no --hsm-pin-file is given.
    #[arg(long, default_value = "LOUPE_HSM_PIN")]
    hsm_pin_env: String,
    /// Keep the TLS session ticket keys across restarts in FILE, sealed by
    /// the HSM's master key (an AES-256 key made on the first token, never
    /// extractable): returning clients resume after a restart. Without
    /// it they live in memory only.
    #[arg(long, value_name = "FILE", requires = "hsm_tokens")]
    ticket_keys: Option<PathBuf>,
    /// Seconds a ticket key is used (a ticket is good for as long; the
    /// key before still opens tickets).
    #[arg(long, default_value_t = 43_200)]
    ticket_lifetime_s: u64,
    /// HSM threads (sessions) per token.
    #[arg(long, default_value_t = 2)]
    hsm_threads: usize,
    /// Most signing requests an HSM thread takes at once.
    #[arg(long, default_value_t = 8)]
    hsm_batch: usize,
    /// Pin the HSM threads to these CPUs, in turn (e.g. `--hsm-cpus 3`).
    /// A software HSM (SoftHSM2) signs on these threads: cores of their
    /// own keep signing off the packet workers' cores.
    #[arg(long, value_delimiter = ',', value_name = "CPU,...")]
    hsm_cpus: Vec<usize>,
    /// The key-usage audit log.
    #[arg(
        long,
        env = "LOUPE_AUDIT_LOG",
        default_value = "/var/lib/loupe/audit.jsonl"
    )]
    audit_log: PathBuf,
    /// CA certificates (PEM) upstream servers are checked against, for
    /// decryption profiles that name no `trust_store`.
    #[arg(long, default_value = "/etc/ssl/certs/ca-certificates.crt")]
    trust_store: PathBuf,
    /// Longest wait for the HSM to sign an impersonation certificate; then
    /// the profile's `hsm_unavailable` applies.
    #[arg(long, default_value_t = 2000)]
    hsm_timeout_ms: u64,
    /// Impersonation certificates kept (LRU).
    #[arg(long, default_value_t = 10_000)]
    cert_cache: usize,
    /// Seconds between replacements of the leaf keys (0: never).
    #[arg(long, default_value_t = 86_400)]
    leaf_key_rotate_s: u64,
    /// Most connections being decrypted at once; beyond, the profile's
    /// `no_resources` applies. Each holds TLS state and buffers both
    /// ways: a few tens of KiB idle, up to about 800 KiB when a slow peer
    /// lets both legs' buffers fill, so the default bounds the worst case
    /// near 6 GiB.
    #[arg(long, default_value_t = 8_192)]
    max_tls_sessions: usize,
    /// Write the decrypted plaintext of profiles with `export = ["pcap"]`
    /// as pcapng files in this directory (the engine user's own, mode
    /// 700). Off by default; enabling it is written to the audit log.
    #[arg(long, value_name = "DIR")]
    export_pcap: Option<PathBuf>,
    /// A capture file is closed before it passes this many MB...
    #[arg(long, default_value_t = 100, value_name = "MB")]
    pcap_file_mb: u64,
    /// ...or once it is this many seconds old.
    #[arg(long, default_value_t = 3600, value_name = "SECONDS")]
    pcap_file_secs: u64,
    /// All capture files together; the oldest are removed.
    #[arg(long, default_value_t = 1000, value_name = "MB")]
    pcap_total_mb: u64,
    /// Send the decrypted plaintext of profiles with `export =
    /// ["mirror"]` out this interface, as frames for an IDS. Off by
    /// default; enabling it is written to the audit log.
    #[arg(long, value_name = "IFACE")]
    export_mirror: Option<String>,
    /// Plaintext waiting for the exporter, at most (beyond, it is dropped
    /// and counted; decryption never waits).
    #[arg(long, default_value_t = 64, value_name = "MB")]
    export_queue_mb: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut cfg = EngineConfig::new(args.inside, args.outside);
    cfg.queues = args.queues;
    cfg.mode = args.xdp_mode;
    cfg.steer_ports = args.steer_ports;
    if !args.steer_prefixes.is_empty() {
        cfg.steer_prefixes = args.steer_prefixes;
    }
    cfg.exempt_prefixes = args.exempt_prefixes;
    cfg.stats_file = args.stats_file;
    cfg.stats_interval = Duration::from_millis(args.stats_interval_ms.max(50));
    cfg.port.frames = args.frames;
    cfg.max_flows_per_worker = args.max_flows;
    cfg.flow_idle_timeout = Duration::from_secs(args.flow_idle_secs.max(1));
    cfg.pin_workers = !args.no_pin;
    cfg.busy_poll = Duration::from_micros(args.busy_poll_us);
    cfg.idle_spin = Duration::from_micros(args.idle_spin_us);
    cfg.yield_every = Duration::from_micros(args.yield_every_us);
    cfg.tcp_split = args.tcp_split;
    cfg.handshake_fast_path = args.handshake_fast_path;
    cfg.split_exempt_sni = args.split_exempt_sni;
    cfg.hold_bytes = args.hold_bytes.max(1);
    cfg.hold_timeout = Duration::from_millis(args.hold_timeout_ms.max(1));
    cfg.drain_timeout = Duration::from_millis(args.drain_timeout_ms);
    cfg.split_buffer_max = (args.split_buffer_max_kib as usize) << 10;
    cfg.split_memory = (args.split_memory_mib as usize) << 20;
    cfg.split_congestion = args.split_cc;
    cfg.mid_flow = args.mid_flow;
    if let Some(socket) = args.control_socket {
        let group = match args
            .control_group
            .as_deref()
            .map(unix::group_id)
            .transpose()
        {
            Ok(g) => g,
            Err(e) => {
                eprintln!("loupe-dataplane: error: --control-group: {e}");
                return ExitCode::from(2);
            }
        };
        cfg.api = Some(ApiConfig {
            socket,
            access: unix::Access { group },
        });
    }
    if !args.hsm_tokens.is_empty() {
        if !args.hsm_pin_files.is_empty() && args.hsm_pin_files.len() != args.hsm_tokens.len() {
            eprintln!(
                "loupe-dataplane: error: {} --hsm-token but {} --hsm-pin-file: give one PIN \
                 file per token, or none (PIN from ${})",
                args.hsm_tokens.len(),
                args.hsm_pin_files.len(),
                args.hsm_pin_env
            );
            return ExitCode::from(2);
        }
        let online = loupe_hsm::signer::online_cpus();
        if let Some(c) = args.hsm_cpus.iter().find(|&&c| c >= online) {
            eprintln!(
                "loupe-dataplane: error: --hsm-cpus {c}: this machine has CPUs 0 to {}",
                online - 1
            );
            return ExitCode::from(2);
        }
        let tokens = args
            .hsm_tokens
            .iter()
            .enumerate()
            .map(|(i, label)| TokenConfig {
                module: args.hsm_module.clone(),
                label: label.clone(),
                pin: match args.hsm_pin_files.get(i) {
                    Some(f) => PinSource::File(f.clone()),
                    None => PinSource::Env(args.hsm_pin_env.clone()),
                },
            })
            .collect();
        cfg.hsm = Some(HsmSettings {
            tokens,
            audit_log: args.audit_log,
            threads_per_token: args.hsm_threads,
            batch: args.hsm_batch,
            cpus: args.hsm_cpus.clone(),
        });
    }
    cfg.tls = TlsSettings {
        cache_capacity: args.cert_cache,
        rotate_keys: (args.leaf_key_rotate_s > 0)
            .then(|| Duration::from_secs(args.leaf_key_rotate_s)),
        hsm_timeout: Duration::from_millis(args.hsm_timeout_ms),
        system_trust: args.trust_store,
        max_sessions: args.max_tls_sessions,
        ticket_keys: args.ticket_keys,
        ticket_lifetime: Duration::from_secs(args.ticket_lifetime_s.max(60)),
        ..TlsSettings::default()
    };

    cfg.export = ExportConfig {
        pcap: args.export_pcap.map(|dir| RingConfig {
            dir,
            file_bytes: args.pcap_file_mb.saturating_mul(1_000_000),
            file_age: Duration::from_secs(args.pcap_file_secs.max(1)),
            total_bytes: args.pcap_total_mb.saturating_mul(1_000_000),
        }),
        mirror: args.export_mirror,
        queue_bytes: args.export_queue_mb.saturating_mul(1 << 20),
    };
    if cfg.export.enabled() && cfg.hsm.is_none() {
        eprintln!(
            "loupe-dataplane: error: --export-pcap and --export-mirror copy decrypted \
             plaintext, and nothing is decrypted without --hsm-token"
        );
        return ExitCode::from(2);
    }

    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        if let Err(e) = signal_hook::flag::register(sig, stop.clone()) {
            eprintln!("loupe-dataplane: cannot install a handler for signal {sig}: {e}");
            return ExitCode::from(1);
        }
    }
    let result = engine::run(&cfg, stop, |r| {
        println!(
            "loupe-dataplane: ready: {} <-> {} in XDP {} mode, {} worker(s), program id {}",
            r.inside.name,
            r.outside.name,
            r.xdp_mode,
            r.workers.len(),
            r.program_id.map_or("?".into(), |i| i.to_string())
        );
    });
    match result {
        Ok(report) => {
            print!("{}", report.render());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("loupe-dataplane: error: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                eprintln!("  caused by: {s}");
                source = s.source();
            }
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Result<Args, String> {
        let mut argv = vec!["loupe-dataplane", "--inside", "a", "--outside", "b"];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv).map_err(|e| e.to_string())
    }

    #[test]
    fn mid_flow_connections_fail_closed_unless_asked() {
        use loupe_dataplane::session::MidFlow;
        assert_eq!(parse(&[]).unwrap().mid_flow, MidFlow::Drop);
        assert_eq!(
            parse(&["--mid-flow", "pass"]).unwrap().mid_flow,
            MidFlow::Pass
        );
        for bad in ["", "Pass", "allow", "1"] {
            let err = parse(&["--mid-flow", bad]).unwrap_err();
            assert!(
                err.contains("--mid-flow") && err.contains("drop, pass"),
                "{bad}: {err}"
            );
        }
    }

    /// A microseconds option read by `field`: 0 unless given, `value`
    /// when given, and each of `bad` refused with the option named.
    fn off_unless_asked_and_bounded(flag: &str, field: fn(&Args) -> u64, value: u64, bad: &[&str]) {
        assert_eq!(field(&parse(&[]).unwrap()), 0);
        assert_eq!(field(&parse(&[flag, &value.to_string()]).unwrap()), value);
        for b in bad {
            let err = parse(&[flag, b]).unwrap_err();
            assert!(err.contains(flag), "{b}: {err}");
        }
    }

    #[test]
    fn busy_polling_is_off_unless_asked_and_bounded() {
        off_unless_asked_and_bounded(
            "--busy-poll-us",
            |a| a.busy_poll_us,
            50,
            &["-1", "1000001", "soon"],
        );
    }

    #[test]
    fn idle_spin_is_off_unless_asked_and_bounded() {
        off_unless_asked_and_bounded(
            "--idle-spin-us",
            |a| a.idle_spin_us,
            5000,
            &["-1", "1000001", "soon"],
        );
    }

    #[test]
    fn a_busy_worker_yields_only_when_told() {
        off_unless_asked_and_bounded(
            "--yield-every-us",
            |a| a.yield_every_us,
            100,
            &["-1", "1000001", "often", ""],
        );
    }

    #[test]
    fn split_congestion_control_is_cubic_unless_asked() {
        use loupe_dataplane::tcp::cc::Algorithm;
        assert_eq!(parse(&[]).unwrap().split_cc, Algorithm::Cubic);
        let reno = parse(&["--split-cc", "NewReno"]).unwrap();
        assert_eq!(reno.split_cc, Algorithm::NewReno);
        let err = parse(&["--split-cc", "bbr"]).unwrap_err();
        assert!(
            err.contains("--split-cc") && err.contains("cubic, newreno"),
            "{err}"
        );
    }
}
