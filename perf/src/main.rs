//! `loupe-perf wire`: throughput and packet rate through the bump in the
//! wire, for the kernel path a user would otherwise run and for each of the
//! engine's paths, measured back to back in one run on the same harness
//! shape so the ratios are meaningful on a shared, noisy machine.
//!
//! Paths: a Linux bridge in the engine namespace with offloads on and off;
//! the engine with nothing steered (XDP DEVMAP fast path); the engine
//! steering the flow through AF_XDP workers (userspace wire); the engine
//! splitting each connection (tcp-split); and the kernel-socket relay a
//! user could pick instead of tcp-split (socat behind an nftables REDIRECT
//! on the bridge, offloads off like the engine's paths).
//! Workloads: MTU-size frames (MSS 1448) with 1, 8 and 100 flows, small
//! frames (MSS 88) with 1 and 8, with iperf3 as the load. Packets per second are frames
//! sent by the two endpoints' veths per second (with offloads on these are
//! GSO super-frames, which is the point of offloads).

use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use clap::Parser;
use loupe_perf::{median, Shape};
use loupe_tests::{
    engine::Engine,
    harness::{Role, PEER_IF, SERVER_V4},
    impair::{ImpairProc, ImpairStats, LOSSY},
    tcp::both_ways,
    Harness, HarnessConfig, Proc,
};
use serde::Serialize;

#[derive(Debug, Parser)]
#[command(name = "loupe-perf")]
struct Args {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// Repetitions of each measurement (the median is reported).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    repeat: u32,
    /// Write the results as JSON here (default: wire.json in the results
    /// directory).
    #[arg(long)]
    json: Option<String>,
    /// Only these paths (comma-separated).
    #[arg(long)]
    paths: Option<String>,
    /// Only these workloads (comma-separated FRAMES:FLOWS, e.g. `mtu:1,mtu:8`;
    /// FRAMES is `mtu` or `small`).
    #[arg(long)]
    workloads: Option<String>,
    /// Instead of throughput: the engine's memory per established split
    /// connection, with this many idle connections open.
    #[arg(long)]
    split_memory: Option<usize>,
    /// (Internal) the server ends of --split-memory's connections.
    #[arg(long, hide = true)]
    split_memory_serve: Option<usize>,
    #[arg(long, hide = true, default_value = "")]
    serve_addr: String,
    /// Instead of throughput on clean links: one connection moving this
    /// many MiB each way over impaired links (2% loss, 2% reordering, 1%
    /// duplication on both), through a Linux bridge and through tcp-split.
    #[arg(long)]
    impaired_mib: Option<usize>,
    /// With --impaired-mib: the same transfer over clean links (no
    /// loupe-impair), the clean half of the soak.
    #[arg(long)]
    clean: bool,
    /// The fair shape: the path under test (the engine's threads, the
    /// relay's socat, the bridge's softirq work) gets CPU 0 alone, and all
    /// endpoint work (iperf3 at both ends, their veths' receive processing
    /// through RPS) the last CPU, as if the endpoints were other machines.
    #[arg(long)]
    per_core: bool,
    /// The MTU of every link (default 1500). Above 3818 a frame spans
    /// several UMEM frames: the engine's multi-buffer path.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1280..=9000))]
    mtu: Option<u32>,
    /// Pass this argument to the engine as well (repeatable), e.g.
    /// `--engine-arg=--split-cc=newreno` to compare congestion controls.
    #[arg(long = "engine-arg", value_name = "ARG", allow_hyphen_values = true)]
    engine_args: Vec<String>,
}

const PORT: u16 = 5201;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Path {
    BridgeOffloadOn,
    BridgeOffloadOff,
    XdpDevmap,
    XdpUserspace,
    XdpSplit,
    KernelRelay,
}

impl Path {
    const ALL: [Path; 6] = [
        Path::BridgeOffloadOn,
        Path::BridgeOffloadOff,
        Path::XdpDevmap,
        Path::XdpUserspace,
        Path::XdpSplit,
        Path::KernelRelay,
    ];

    fn label(self) -> &'static str {
        match self {
            Path::BridgeOffloadOn => "bridge_offload_on",
            Path::BridgeOffloadOff => "bridge_offload_off",
            Path::XdpDevmap => "xdp_devmap",
            Path::XdpUserspace => "xdp_userspace",
            Path::XdpSplit => "xdp_split",
            Path::KernelRelay => "kernel_relay",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
struct Workload {
    frames: &'static str,
    mss: Option<u32>,
    flows: u32,
}

impl Workload {
    /// As `--workloads` names it: FRAMES:FLOWS.
    fn name(&self) -> String {
        format!("{}:{}", self.frames, self.flows)
    }
}

const WORKLOADS: [Workload; 5] = [
    Workload {
        frames: "mtu",
        mss: None,
        flows: 1,
    },
    Workload {
        frames: "mtu",
        mss: None,
        flows: 8,
    },
    Workload {
        frames: "mtu",
        mss: None,
        flows: 100,
    },
    Workload {
        frames: "small",
        mss: Some(88),
        flows: 1,
    },
    Workload {
        frames: "small",
        mss: Some(88),
        flows: 8,
    },
];

#[derive(Debug, Serialize)]
struct Sample {
    /// When the sample began, seconds since the benchmark did: the paths'
    /// samples alternate (see [`run_paths`]).
    began_s: f64,
    gbit_per_s: f64,
    mpps: f64,
    retransmits: u64,
    /// Frames the client sent (data, its retransmissions, its few ACKs):
    /// what `retransmits` is a share of.
    client_frames: u64,
    /// Frames the endpoints' veths could not hand to the path (their
    /// `tx_dropped`): for the engine's paths, the XDP receive ring of its
    /// veth was full because its receive processing (on the path's CPU)
    /// fell behind. The kernel relay's and the bridge's drops are in the
    /// receive backlog instead and do not show here.
    path_refused: u64,
    /// In the fair shape: the path's CPU busy time per Gbit carried, ms
    /// (what the path costs; its throughput also depends on the
    /// endpoints' CPU, which this does not).
    path_cpu_ms_per_gbit: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Result {
    path: Path,
    workload: Workload,
    samples: Vec<Sample>,
    /// None (null in the JSON) when the workload failed: never a zero.
    median_gbit_per_s: Option<f64>,
    median_mpps: Option<f64>,
    /// The fair shape's path CPU per Gbit, ms (median).
    median_path_cpu_ms_per_gbit: Option<f64>,
    /// The client's retransmissions per thousand frames it sent (median):
    /// what the path lost.
    median_retransmits_per_mille: Option<f64>,
    /// Attempts that failed, with why; each sample gets [`ATTEMPTS`].
    failed_attempts: Vec<String>,
    /// Why the workload has no figure: a sample failed every attempt.
    failed: Option<String>,
}

/// Tries per sample: one iperf3 run that fails (on a loaded 2-core
/// machine a relay's data connection is sometimes reset) is run again and
/// recorded; a sample that fails every try fails its workload.
const ATTEMPTS: usize = 3;

#[derive(Debug, Serialize)]
struct Report {
    kernel: String,
    cpus: usize,
    /// The fair shape (`--per-core`): the path on CPU 0, endpoints on the
    /// last CPU; otherwise everything shares every CPU.
    per_core: bool,
    /// The links' MTU.
    mtu: u32,
    seconds: u32,
    repeat: u32,
    results: Vec<Result>,
}

/// Retransmissions per thousand frames sent, None without frames.
fn per_mille(retransmits: u64, frames: u64) -> Option<f64> {
    (frames > 0).then(|| retransmits as f64 * 1000.0 / frames as f64)
}

/// The endpoints' veths' counters a sample reads before and after.
struct Endpoints {
    client_tx: u64,
    server_tx: u64,
    /// Frames either endpoint's veth could not hand to the path.
    refused: u64,
}

impl Endpoints {
    fn read(h: &Harness) -> anyhow::Result<Endpoints> {
        Ok(Endpoints {
            client_tx: h.iface_counter(Role::Client, PEER_IF, "tx_packets")?,
            server_tx: h.iface_counter(Role::Server, PEER_IF, "tx_packets")?,
            refused: h.iface_counter(Role::Client, PEER_IF, "tx_dropped")?
                + h.iface_counter(Role::Server, PEER_IF, "tx_dropped")?,
        })
    }

    fn tx(&self) -> u64 {
        self.client_tx + self.server_tx
    }
}

fn iperf_server(h: &Harness, shape: Option<Shape>) -> anyhow::Result<Proc> {
    let child = Shape::endpoint(shape, &h.server, "iperf3")
        .args(["-s", "-B", SERVER_V4, "-p", &PORT.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("spawning iperf3 -s")?;
    let proc = Proc::new("iperf3-server", child);
    loupe_tests::wait_until("iperf3 to listen", Duration::from_secs(20), || {
        Ok(h.server
            .listens_on(&format!("{SERVER_V4}:{PORT}"))?
            .then_some(()))
    })?;
    Ok(proc)
}

/// When the benchmark began, for [`Sample::began_s`].
static BEGAN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

fn measure(h: &Harness, w: Workload, seconds: u32, shape: Option<Shape>) -> anyhow::Result<Sample> {
    let mut args = vec![
        "-c".to_string(),
        SERVER_V4.into(),
        "-p".into(),
        PORT.to_string(),
        "-t".into(),
        seconds.to_string(),
        "-P".into(),
        w.flows.to_string(),
        "-J".into(),
    ];
    if let Some(mss) = w.mss {
        args.extend(["-M".into(), mss.to_string()]);
    }
    let before = Endpoints::read(h)?;
    let busy_before = shape
        .map(|s| loupe_perf::cpu_busy_seconds(s.path_cpu))
        .transpose()?;
    let start = Instant::now();
    let began_s = start
        .duration_since(*BEGAN.get_or_init(Instant::now))
        .as_secs_f64();
    let out = Shape::endpoint(shape, &h.client, "iperf3")
        .args(&args)
        .output()?;
    let elapsed = start.elapsed().as_secs_f64();
    let after = Endpoints::read(h)?;
    let busy = match (shape, busy_before) {
        (Some(s), Some(b)) => Some(loupe_perf::cpu_busy_seconds(s.path_cpu)? - b),
        _ => None,
    };
    if !out.status.success() {
        bail!(
            "iperf3 {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
    // iperf3 -J exits 0 with an "error" member when a test stops early
    // (e.g. a data connection reset): say what it said.
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3 {args:?} reported: {e}");
    }
    let end = &v["end"];
    let bps = end["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 JSON lacks end.sum_received")?;
    let retransmits = end["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
    // iperf3's bits over its own test time; the CPU was read around the
    // whole run (its connection setup too), a little more than that.
    let gbit = bps / 1e9 * f64::from(seconds);
    Ok(Sample {
        began_s,
        gbit_per_s: bps / 1e9,
        mpps: (after.tx() - before.tx()) as f64 / elapsed / 1e6,
        retransmits,
        client_frames: after.client_tx.saturating_sub(before.client_tx),
        path_refused: after.refused.saturating_sub(before.refused),
        path_cpu_ms_per_gbit: busy.filter(|_| gbit > 0.0).map(|b| b * 1e3 / gbit),
    })
}

/// The workloads `--workloads` names, in their usual order (all without it).
fn workloads(args: &Args) -> anyhow::Result<Vec<Workload>> {
    let Some(list) = &args.workloads else {
        return Ok(WORKLOADS.to_vec());
    };
    let wanted: Vec<&str> = list.split(',').map(str::trim).collect();
    for name in &wanted {
        anyhow::ensure!(
            WORKLOADS.iter().any(|w| w.name() == *name),
            "unknown workload {name} (known: {})",
            WORKLOADS.map(|w| w.name()).join(", ")
        );
    }
    Ok(WORKLOADS
        .into_iter()
        .filter(|w| wanted.contains(&w.name().as_str()))
        .collect())
}

/// A path that failed as a whole (its harness, its engine, or a check
/// after its runs: the relay took nothing, the split split nothing, the
/// engine exited badly) fails each of its rows, `rows` (one per
/// workload, measured or not): their samples are kept without medians,
/// with the reason. The other paths' rows are untouched.
fn path_failed(rows: &mut [Result], why: &str) {
    let why = format!("the path failed: {why}");
    for r in rows {
        r.median_gbit_per_s = None;
        r.median_mpps = None;
        r.median_path_cpu_ms_per_gbit = None;
        r.median_retransmits_per_mille = None;
        r.failed.get_or_insert_with(|| why.clone());
    }
}

/// A path set up for measuring: its harness, the engine or relay, the
/// shape and the iperf3 server. Fields drop in order: the processes before
/// the harness they run in.
struct Live {
    path: Path,
    shape: Option<Shape>,
    _server: Proc,
    engine: Option<Engine>,
    relay: Option<Proc>,
    h: Harness,
}

fn start_path(path: Path, args: &Args) -> anyhow::Result<Live> {
    let cfg = HarnessConfig {
        offloads: path == Path::BridgeOffloadOn,
        // One core for the path: one queue per link, so the engine runs
        // one worker (two time-sharing one CPU cross every other flow's
        // frames between them), and the kernel's paths the same links.
        queues: if args.per_core { 1 } else { 2 },
        mtu: args.mtu,
        ..Default::default()
    };
    let h = Harness::new(cfg)?;
    let shape = args.per_core.then(Shape::new).transpose()?;
    // In the fair shape the engine's threads are placed with the rest of
    // the path, not pinned one per CPU.
    let mut pin: Vec<&str> = args.engine_args.iter().map(String::as_str).collect();
    if shape.is_some() {
        pin.push("--no-pin");
        // The engine as set up for a core of its own, with its NAPI
        // thread beside it: the worker gives way every 100 µs of work
        // (perf/README.md, "A busy worker gives way"), unless asked
        // otherwise.
        if !pin.iter().any(|a| a.starts_with("--yield-every-us")) {
            pin.extend(["--yield-every-us", "100"]);
        }
    }
    let pin = &pin[..];
    fn with<'a>(a: &[&'a str], pin: &[&'a str]) -> Vec<&'a str> {
        [a, pin].concat()
    }
    let mut relay = None;
    let engine = match path {
        Path::BridgeOffloadOn | Path::BridgeOffloadOff => {
            h.bridge_up()?;
            None
        }
        Path::KernelRelay => {
            relay = Some(h.relay_up(PORT)?);
            None
        }
        Path::XdpDevmap => Some(Engine::start(&h, &with(&["--steer-ports", "none"], pin))?),
        Path::XdpUserspace => Some(Engine::start(
            &h,
            &with(&["--steer-ports", &PORT.to_string()], pin),
        )?),
        Path::XdpSplit => Some(Engine::start(
            &h,
            &with(&["--steer-ports", &PORT.to_string(), "--tcp-split"], pin),
        )?),
    };
    if let Some(s) = shape {
        let pids: Vec<u32> = engine
            .iter()
            .map(|e| e.pid())
            .chain(relay.iter().map(|r: &Proc| r.pid()))
            .collect();
        s.apply(&h, &pids)?;
        s.place_napi(&h, engine.is_some())?;
    }
    let server = iperf_server(&h, shape)?;
    Ok(Live {
        path,
        shape,
        _server: server,
        engine,
        relay,
        h,
    })
}

impl Live {
    /// One sample of `w`, with [`ATTEMPTS`] tries; the failed tries are
    /// added to `failed_attempts`.
    fn sample(
        &self,
        w: Workload,
        seconds: u32,
        failed_attempts: &mut Vec<String>,
    ) -> Option<Sample> {
        for _ in 0..ATTEMPTS {
            match measure(&self.h, w, seconds, self.shape) {
                Ok(s) => return Some(s),
                Err(e) => {
                    eprintln!("  {} {} x{}: {e:#}", self.path.label(), w.frames, w.flows);
                    failed_attempts.push(format!("{e:#}"));
                }
            }
        }
        None
    }

    /// The checks after the runs (the path carried what it should have),
    /// then the engine's stop, which must be clean.
    fn finish(self) -> anyhow::Result<()> {
        if self.relay.is_some() {
            let taken = self.h.relay_redirected()?;
            anyhow::ensure!(taken > 0, "the relay took no connection");
        }
        if let Some(engine) = self.engine {
            let r = engine.stats()?;
            if self.path == Path::XdpSplit {
                let split = r.split_total().split;
                anyhow::ensure!(split > 0, "split path split no connection");
            }
            if matches!(self.path, Path::XdpUserspace | Path::XdpSplit) {
                anyhow::ensure!(r.xdp_packets("steer") > 0, "userspace path steered nothing");
            } else {
                anyhow::ensure!(r.xdp_packets("steer") == 0, "devmap path steered frames");
            }
            let (status, _, _, err) = engine.stop();
            anyhow::ensure!(status.success(), "engine: {status}: {err}");
        }
        Ok(())
    }
}

/// One path's samples of one workload.
#[derive(Default)]
struct Cell {
    samples: Vec<Sample>,
    failed_attempts: Vec<String>,
    /// A sample failed every try: no more are taken.
    failed: Option<String>,
}

impl Cell {
    fn into_result(self, path: Path, workload: Workload) -> Result {
        let samples = self.samples;
        let ok = self.failed.is_none() && !samples.is_empty();
        Result {
            path,
            workload,
            median_gbit_per_s: ok.then(|| median(samples.iter().map(|s| s.gbit_per_s).collect())),
            median_mpps: ok.then(|| median(samples.iter().map(|s| s.mpps).collect())),
            median_path_cpu_ms_per_gbit: median_of_all(ok, &samples, |s| s.path_cpu_ms_per_gbit),
            median_retransmits_per_mille: median_of_all(ok, &samples, |s| {
                per_mille(s.retransmits, s.client_frames)
            }),
            samples,
            failed_attempts: self.failed_attempts,
            failed: self.failed,
        }
    }
}

/// The median of a figure every sample has; None when one lacks it, or
/// when the workload is not `ok`.
fn median_of_all(ok: bool, samples: &[Sample], f: impl Fn(&Sample) -> Option<f64>) -> Option<f64> {
    samples
        .iter()
        .map(f)
        .collect::<Option<Vec<f64>>>()
        .filter(|v| ok && !v.is_empty())
        .map(median)
}

/// Every path is set up first; then each workload's samples are taken
/// in turns, one of each path and again (`--repeat` rounds), so that the
/// medians a ratio compares come from the same minutes of a shared
/// machine's load, not from paths measured a minute or two apart. A path
/// that fails to start, or whose checks after the runs fail, fails its
/// own rows; the others are measured.
fn run_paths(paths: &[Path], workloads: &[Workload], args: &Args) -> Vec<Result> {
    let mut live: Vec<Option<Live>> = Vec::new();
    let mut why: Vec<Option<String>> = Vec::new();
    for &p in paths {
        eprintln!("path {} up", p.label());
        match start_path(p, args) {
            Ok(l) => {
                live.push(Some(l));
                why.push(None);
            }
            Err(e) => {
                eprintln!("path {} failed: {e:#}", p.label());
                live.push(None);
                why.push(Some(format!("{e:#}")));
            }
        }
    }
    let mut cells: Vec<Vec<Cell>> = paths
        .iter()
        .map(|_| workloads.iter().map(|_| Cell::default()).collect())
        .collect();
    for (wi, &w) in workloads.iter().enumerate() {
        for _ in 0..args.repeat {
            for (l, row) in live.iter().zip(cells.iter_mut()) {
                let (Some(l), cell) = (l, &mut row[wi]) else {
                    continue;
                };
                if cell.failed.is_some() {
                    continue;
                }
                match l.sample(w, args.seconds, &mut cell.failed_attempts) {
                    Some(s) => cell.samples.push(s),
                    None => cell.failed = cell.failed_attempts.last().cloned(),
                }
            }
        }
        for (&p, row) in paths.iter().zip(&cells) {
            let cell = &row[wi];
            let gbit: Vec<f64> = cell.samples.iter().map(|s| s.gbit_per_s).collect();
            if cell.failed.is_some() || gbit.is_empty() {
                eprintln!("  {:<20} {:<5} x{:<3} FAILED", p.label(), w.frames, w.flows);
            } else {
                eprintln!(
                    "  {:<20} {:<5} x{:<3} {:>7.2} Gbit/s",
                    p.label(),
                    w.frames,
                    w.flows,
                    median(gbit)
                );
            }
        }
    }
    for (l, why) in live.iter_mut().zip(why.iter_mut()) {
        if let Some(l) = l.take() {
            let label = l.path.label();
            if let Err(e) = l.finish() {
                eprintln!("path {label} failed: {e:#}");
                *why = Some(format!("{e:#}"));
            }
        }
    }
    let mut results = Vec::new();
    for ((&p, row), why) in paths.iter().zip(cells).zip(why) {
        let first = results.len();
        for (&w, cell) in workloads.iter().zip(row) {
            results.push(cell.into_result(p, w));
        }
        if let Some(why) = why {
            path_failed(&mut results[first..], &why);
        }
    }
    results
}

/// Opens `n` connections through the engine with --tcp-split, moves a
/// little data on each (so both halves exist and have touched their
/// buffers), and reports the engine's RSS growth per connection.
fn split_memory(n: usize) -> anyhow::Result<()> {
    use std::io::{BufRead, Read, Write};
    // The client ends are open here, the server ends in a child process
    // (one process may not have both ends of 10,000 connections open).
    raise_open_files(n as u64 + 1024)?;
    let h = Harness::new(HarnessConfig::default())?;
    let engine = Engine::start(&h, &["--steer-ports", "443", "--tcp-split"])?;
    let addr = format!("{SERVER_V4}:443");
    let before = loupe_tests::proc::rss_kib(engine.pid());
    let exe = std::env::current_exe()?;
    let mut server = h
        .server
        .command(exe.to_str().context("binary path")?)
        .args([
            "--split-memory-serve",
            &n.to_string(),
            "--serve-addr",
            &addr,
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting the server process")?;
    let mut lines = std::io::BufReader::new(server.stdout.take().context("server stdout")?).lines();
    anyhow::ensure!(
        lines.next().transpose()?.as_deref() == Some("listening"),
        "the server process did not start"
    );
    let mut clients = Vec::with_capacity(n);
    // RSS at half of them too: the growth over the second half is free
    // of what the first connections touch once (frame buffers, tables).
    let mut half = 0;
    for i in 0..n {
        if i == n / 2 {
            engine.wait_stats("half the connections split", Duration::from_secs(60), |r| {
                (r.split_total().active >= i as u64).then_some(())
            })?;
            half = loupe_tests::proc::rss_kib(engine.pid());
        }
        let mut c = loupe_tests::tcp::connect(&h.client, &addr)
            .with_context(|| format!("connection {i}"))?;
        c.write_all(b"ping")?;
        let mut b = [0u8; 4];
        c.read_exact(&mut b)?;
        clients.push(c);
    }
    anyhow::ensure!(
        lines.next().transpose()?.as_deref() == Some("all accepted"),
        "the server process did not accept them all"
    );
    let sp = engine.wait_stats("all connections split", Duration::from_secs(60), |r| {
        let sp = r.split_total();
        (sp.active >= n as u64).then_some(sp)
    })?;
    let after = loupe_tests::proc::rss_kib(engine.pid());
    let per = (after.saturating_sub(before)) as f64 / n as f64;
    let marginal = (after.saturating_sub(half)) as f64 / (n - n / 2) as f64;
    println!(
        "split memory: {n} established split connections ({} active, {} not split for \
         memory): engine RSS {before} KiB -> {half} KiB at half -> {after} KiB: {per:.1} KiB \
         per connection, {marginal:.1} KiB per connection of the second half; buffers {} KiB",
        sp.active,
        sp.memory_passthrough,
        sp.buffer_capacity >> 10
    );
    loupe_perf::write_results(
        "split-memory.json",
        &serde_json::json!({
            "connections": n, "split_active": sp.active,
            "memory_passthrough": sp.memory_passthrough,
            "rss_before_kib": before, "rss_half_kib": half, "rss_after_kib": after,
            "kib_per_connection": per, "kib_per_connection_second_half": marginal,
        }),
    )?;
    drop(clients);
    drop(server.stdin.take());
    let st = server.wait()?;
    anyhow::ensure!(st.success(), "server process: {st}");
    let (status, _, _, err) = engine.stop();
    anyhow::ensure!(status.success(), "engine: {status}: {err}");
    Ok(())
}

/// The server ends of [`split_memory`]'s connections (run in the server's
/// namespace): accepts `n` on `addr`, echoes each one's four bytes, says
/// so on stdout and keeps them open until stdin closes.
fn split_memory_serve(n: usize, addr: &str) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    raise_open_files(n as u64 + 1024)?;
    let listener = std::net::TcpListener::bind(addr)?;
    println!("listening");
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        let (mut s, _) = listener.accept()?;
        let mut b = [0u8; 4];
        s.read_exact(&mut b)?;
        s.write_all(&b)?;
        conns.push(s);
    }
    println!("all accepted");
    std::io::stdout().flush()?;
    let mut rest = Vec::new();
    std::io::stdin().read_to_end(&mut rest)?;
    Ok(())
}

/// Raises this process's open-file limit to at least `want` (root may
/// raise the hard limit too).
fn raise_open_files(want: u64) -> anyhow::Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid pointer to an rlimit for the call to fill.
    anyhow::ensure!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0,
        "getrlimit: {}",
        std::io::Error::last_os_error()
    );
    if lim.rlim_cur >= want {
        return Ok(());
    }
    lim.rlim_cur = want;
    lim.rlim_max = lim.rlim_max.max(want);
    // SAFETY: a valid rlimit for the call to read.
    anyhow::ensure!(
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0,
        "cannot open {want} files (setrlimit: {})",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// The same transfer over the same seeded impairment, through a Linux
/// bridge (the kernel path) and through tcp-split, back to back.
fn impaired(mib: usize, repeat: u32, clean: bool, engine_args: &[String]) -> anyhow::Result<()> {
    let len = mib << 20;
    // Rounds alternate the paths, so a noisy stretch of the machine hits
    // both; each path's figure is its median.
    let mut secs: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut acks_per_data = Vec::new();
    for round in 0..repeat.max(1) {
        for (i, split) in [false, true].into_iter().enumerate() {
            let h = Harness::new(HarnessConfig {
                impair: !clean,
                ..HarnessConfig::default()
            })?;
            let impair = if clean {
                None
            } else {
                Some(ImpairProc::start_both(&h, &LOSSY, 11)?)
            };
            let engine = if split {
                let mut a = vec!["--tcp-split"];
                a.extend(engine_args.iter().map(String::as_str));
                Some(Engine::start(&h, &a)?)
            } else {
                h.bridge_up()?;
                None
            };
            let took = both_ways(&h, &format!("{SERVER_V4}:443"), len)?;
            let mut all = ImpairStats::default();
            for p in impair.into_iter().flatten() {
                let (a, b) = p.stop()?;
                all.add(&a);
                all.add(&b);
            }
            eprintln!(
                "  round {round} {:<10} {mib} MiB each way in {took:.1?}: {:.1} Mbit/s each way \
                 ({} of {} frames dropped)",
                if split { "xdp_split" } else { "bridge" },
                len as f64 * 8.0 / took.as_secs_f64() / 1e6,
                all.dropped,
                all.frames
            );
            if let Some(e) = engine {
                // Its halves' final counts: once the split has ended.
                let sp = e.wait_stats(
                    "the split to end",
                    std::time::Duration::from_secs(60),
                    |r| (r.split_total().closed >= 1).then(|| r.split_total()),
                )?;
                anyhow::ensure!(sp.split == 1 && sp.aborted == 0, "split: {sp:?}");
                let per = sp.pure_acks_out as f64 / sp.data_segments_in.max(1) as f64;
                eprintln!(
                    "    engine: {} data segments in, {} pure ACKs out ({per:.2} per data \
                     segment), {} retransmissions ({} fast, {} of lost retransmissions, {} \
                     tail probes, {} timeouts, {} reductions undone)",
                    sp.data_segments_in,
                    sp.pure_acks_out,
                    sp.retransmits,
                    sp.fast_retransmits,
                    sp.lost_retransmits,
                    sp.tail_probes,
                    sp.timeouts,
                    sp.spurious_undone
                );
                acks_per_data.push(per);
                e.stop();
            }
            secs[i].push(took.as_secs_f64());
        }
    }
    let rows: Vec<_> = ["bridge", "xdp_split"]
        .into_iter()
        .zip(&secs)
        .map(|(label, s)| {
            let median_s = median(s.clone());
            serde_json::json!({
                "path": label, "mib_each_way": mib, "seconds": s,
                "median_seconds": median_s,
                "median_mbit_per_s_each_way": len as f64 * 8.0 / median_s / 1e6,
                "engine_acks_per_data_segment": (label == "xdp_split")
                    .then(|| median(acks_per_data.clone())),
            })
        })
        .collect();
    let ratio = median(secs[0].clone()) / median(secs[1].clone());
    println!(
        "median over {repeat}: bridge {:.1} s, tcp-split {:.1} s; tcp-split / bridge throughput {ratio:.2}; \
         the engine's pure ACKs per data segment received {:.2}",
        median(secs[0].clone()),
        median(secs[1].clone()),
        median(acks_per_data.clone())
    );
    let name = if clean {
        "split-clean.json"
    } else {
        "split-impaired.json"
    };
    loupe_perf::write_results(name, &rows)?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    BEGAN.get_or_init(Instant::now);
    let args = Args::parse();
    if let Some(n) = args.split_memory_serve {
        return split_memory_serve(n, &args.serve_addr);
    }
    if let Some(n) = args.split_memory {
        return split_memory(n);
    }
    if let Some(mib) = args.impaired_mib {
        return impaired(mib, args.repeat, args.clean, &args.engine_args);
    }
    let paths: Vec<Path> = match &args.paths {
        None => Path::ALL.to_vec(),
        Some(list) => list
            .split(',')
            .map(|p| {
                Path::ALL
                    .into_iter()
                    .find(|x| x.label() == p.trim())
                    .with_context(|| format!("unknown path {p}"))
            })
            .collect::<anyhow::Result<_>>()?,
    };
    // Checked before any harness is up.
    let workloads = workloads(&args)?;
    let results = run_paths(&paths, &workloads, &args);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let report = Report {
        kernel,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        per_core: args.per_core,
        mtu: args.mtu.unwrap_or(1500),
        seconds: args.seconds,
        repeat: args.repeat,
        results,
    };
    let written = loupe_perf::write_results_to(
        args.json.as_deref().map(std::path::Path::new),
        "wire.json",
        &report,
    )?;

    // Table with ratios against the bridge with offloads off and against
    // the kernel relay (same run).
    println!(
        "\n{} shape, MTU {}\n{:<20} {:<6} {:>5} {:>10} {:>9} {:>13} {:>9} {:>16} {:>9}",
        if args.per_core {
            "per-core (path on CPU 0, endpoints on the last CPU)"
        } else {
            "shared (every CPU for everything)"
        },
        report.mtu,
        "path",
        "frames",
        "flows",
        "Gbit/s",
        "Mpps",
        "vs bridge-off",
        "vs relay",
        "CPU 0 ms/Gbit",
        "retx/1000"
    );
    let ratio = |r: &Result, to: Path| {
        report
            .results
            .iter()
            .find(|b| b.path == to && b.workload == r.workload)
            .and_then(|b| b.median_gbit_per_s.filter(|g| *g > 0.0))
            .zip(r.median_gbit_per_s)
            .map(|(peer, ours)| format!("{:.2}x", ours / peer))
            .unwrap_or_else(|| "-".into())
    };
    for r in &report.results {
        let (Some(gbit), Some(mpps)) = (r.median_gbit_per_s, r.median_mpps) else {
            println!(
                "{:<20} {:<6} {:>5} {:>10}",
                r.path.label(),
                r.workload.frames,
                r.workload.flows,
                "FAILED"
            );
            continue;
        };
        println!(
            "{:<20} {:<6} {:>5} {:>10.2} {:>9.3} {:>13} {:>9} {:>16} {:>9}",
            r.path.label(),
            r.workload.frames,
            r.workload.flows,
            gbit,
            mpps,
            ratio(r, Path::BridgeOffloadOff),
            ratio(r, Path::KernelRelay),
            r.median_path_cpu_ms_per_gbit
                .map(|c| format!("{c:.0}"))
                .unwrap_or_else(|| "-".into()),
            r.median_retransmits_per_mille
                .map(|c| format!("{c:.1}"))
                .unwrap_or_else(|| "-".into())
        );
    }
    println!("\nJSON: {}", written.display());
    let failed: Vec<String> = report
        .results
        .iter()
        .filter_map(|r| {
            r.failed.as_ref().map(|e| {
                format!(
                    "{} {} x{}: {e}",
                    r.path.label(),
                    r.workload.frames,
                    r.workload.flows
                )
            })
        })
        .collect();
    anyhow::ensure!(
        failed.is_empty(),
        "{} workload(s) failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(retransmits: u64, client_frames: u64) -> Sample {
        Sample {
            began_s: 0.0,
            gbit_per_s: 1.0,
            mpps: 0.1,
            retransmits,
            client_frames,
            path_refused: 0,
            path_cpu_ms_per_gbit: None,
        }
    }

    const W: Workload = Workload {
        frames: "mtu",
        mss: None,
        flows: 1,
    };

    #[test]
    fn the_retransmit_rate_is_per_thousand_frames_sent() {
        assert_eq!(per_mille(5, 1000), Some(5.0));
        assert_eq!(per_mille(0, 250), Some(0.0));
        assert_eq!(per_mille(3, 0), None);
        let cell = Cell {
            samples: vec![sample(10, 1000), sample(40, 1000), sample(20, 1000)],
            ..Default::default()
        };
        let r = cell.into_result(Path::XdpSplit, W);
        assert_eq!(r.median_retransmits_per_mille, Some(20.0));
    }

    /// A sample without frames (counters unreadable as zero) or a failed
    /// workload gives no rate, never a zero.
    #[test]
    fn no_rate_without_frames_or_for_a_failed_workload() {
        let cell = Cell {
            samples: vec![sample(10, 1000), sample(0, 0)],
            ..Default::default()
        };
        assert_eq!(
            cell.into_result(Path::XdpSplit, W)
                .median_retransmits_per_mille,
            None
        );
        let cell = Cell {
            samples: vec![sample(10, 1000)],
            failed: Some("iperf3 failed".into()),
            ..Default::default()
        };
        assert_eq!(
            cell.into_result(Path::XdpSplit, W)
                .median_retransmits_per_mille,
            None
        );
    }
}
