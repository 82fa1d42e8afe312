//! `loupe-perf-decide`: what a policy decision costs a new connection,
//! and how long a live policy change takes.
//!
//! New HTTPS connections (curl to nginx, one request each, the connection
//! closed after it) measured by curl: the TLS handshake done
//! (`time_appconnect`) and the response complete (`time_total`). Paths, in
//! rounds that alternate so a noisy stretch hits all of them:
//! - `bridge`: a Linux bridge in the engine namespace (the kernel path);
//! - `no-decrypt`: the engine with the control daemon; a `no-decrypt` rule
//!   matches, so each connection's ClientHello is held, decided on, and the
//!   flow handed to the XDP fast path;
//! - `tcp-split`: the same with a `tcp-split` rule: both halves terminated.
//!
//! Then `loupe policy apply` wall time (CLI to the dataplane running the
//! new version), alternating two policies.

use std::{
    collections::HashMap,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::Parser;
use loupe_dataplane::stats::{SplitCounters, DECISION_BUCKETS_US};
use loupe_perf::{
    median,
    wire_delay::{self, Capture, Stage, STAGES},
    Shape,
};
use loupe_tests::{
    control::{dataplane_socket, Control},
    engine::Engine,
    harness::SERVER_V4,
    https::Nginx,
    Harness, HarnessConfig,
};

#[derive(Debug, Parser)]
#[command(name = "loupe-perf-decide")]
struct Args {
    /// New connections per path per round.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..))]
    connections: u64,
    /// Rounds (each path once per round; medians over all samples).
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Policy applies to time.
    #[arg(long, default_value_t = 20)]
    applies: usize,
    /// More loupe-dataplane arguments for the engine paths (one flag or
    /// value each; repeat), e.g. `--engine-arg=--busy-poll-us --engine-arg=0`.
    #[arg(long = "engine-arg", allow_hyphen_values = true)]
    engine_args: Vec<String>,
    /// The fair shape: the path (the engine with one worker and the control
    /// daemon, or the bridge's softirq work) on CPU 0 alone, one queue per
    /// link; curl, nginx, tcpdump and the endpoints' receive processing on
    /// the last CPU, as if the endpoints were other machines.
    #[arg(long)]
    per_core: bool,
    /// Write the results as JSON here (default: decide.json in the results
    /// directory).
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

const PATHS: [&str; 3] = ["bridge", "no-decrypt", "tcp-split"];

fn policy(h: &Harness, action: &str) -> anyhow::Result<std::path::PathBuf> {
    let p = h.dir.join(format!("{action}.toml"));
    std::fs::write(
        &p,
        format!("[[rules]]\nname = \"{action}-all\"\naction = \"{action}\"\n"),
    )?;
    Ok(p)
}

/// One connection's times from curl's start, in seconds.
#[derive(Clone, Copy)]
struct Times {
    /// TCP handshake done (the SYN and SYN-ACK crossed the path).
    connect: f64,
    /// TLS handshake done.
    appconnect: f64,
    /// Response complete.
    total: f64,
}

/// `n` new connections, one request each.
fn connections(h: &Harness, nginx: &Nginx, n: usize) -> anyhow::Result<Vec<Times>> {
    let mut args = nginx.curl_args_many(SERVER_V4, "index.html", n);
    args.splice(
        0..0,
        ["-w", "%{time_connect} %{time_appconnect} %{time_total}\\n"].map(String::from),
    );
    let out = h.client.command("curl").args(&args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout)?;
    let samples: Vec<Times> = text
        .lines()
        .filter_map(|l| {
            let mut f = l.split(' ').map(|x| x.parse::<f64>().ok());
            Some(Times {
                connect: f.next()??,
                appconnect: f.next()??,
                total: f.next()??,
            })
        })
        .collect();
    anyhow::ensure!(samples.len() == n, "{} samples of {n}", samples.len());
    Ok(samples)
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    loupe_perf::quantile_sorted(&v, p)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let shape = args.per_core.then(Shape::new).transpose()?;
    if let Some(s) = shape {
        s.endpoints_here()?;
    }
    let mut samples: Vec<Vec<Times>> = vec![Vec::new(); PATHS.len()];
    let mut wire: Vec<HashMap<Stage, Vec<f64>>> = vec![HashMap::new(); PATHS.len()];
    // The engine's own counters of what each decision cost its worker.
    let mut costs = vec![SplitCounters::default(); PATHS.len()];
    for round in 0..args.rounds.max(1) {
        for (i, path) in PATHS.iter().enumerate() {
            let h = Harness::new(HarnessConfig {
                queues: if shape.is_some() { 1 } else { 2 },
                ..Default::default()
            })?;
            let mut kept: Option<(Engine, Control)> = None;
            if *path == "bridge" {
                h.bridge_up()?;
            } else {
                let sock = dataplane_socket(&h);
                let mut engine_args = vec!["--control-socket", sock.to_str().context("path")?];
                engine_args.extend(args.engine_args.iter().map(String::as_str));
                if shape.is_some() {
                    // Placed with the rest of the path by the shape, as in
                    // `perf/run wire --per-core`.
                    engine_args.push("--no-pin");
                }
                let engine = Engine::start(&h, &engine_args)?;
                let p = policy(&h, path)?;
                let control = Control::start(&h, &sock, Some(&p), &[])?;
                control.wait_in_sync()?;
                kept = Some((engine, control));
            }
            if let Some(s) = shape {
                let pids: Vec<u32> = kept
                    .iter()
                    .flat_map(|(e, c)| [Some(e.pid()), c.pid()])
                    .flatten()
                    .collect();
                s.apply(&h, &pids)?;
            }
            let nginx = Nginx::start(&h, 443)?;
            let caps = (
                Capture::start(&h.client, &h.dir, "client", 443)?,
                Capture::start(&h.server, &h.dir, "server", 443)?,
            );
            let s = connections(&h, &nginx, args.connections as usize)?;
            let (c, sv) = (caps.0.finish()?, caps.1.finish()?);
            let delays = wire_delay::delays(&c, &sv, 443);
            // A capture that matched nothing is a failed measurement, not
            // a delay of NaN.
            for stage in STAGES {
                anyhow::ensure!(
                    delays.get(&stage).is_some_and(|d| !d.is_empty()),
                    "round {round} {path}: no {} matched between the client's capture ({} \
                     packets) and the server's ({})",
                    stage.name(),
                    c.len(),
                    sv.len()
                );
            }
            for (stage, d) in delays {
                wire[i].entry(stage).or_default().extend(d);
            }
            if let Some((engine, _)) = &kept {
                let want = args.connections;
                let sp = engine.wait_stats(
                    "every connection decided",
                    Duration::from_secs(60),
                    |r| {
                        let sp = r.split_total();
                        (sp.split + sp.policy_pass >= want).then_some(sp)
                    },
                )?;
                costs[i].add(&sp);
            }
            eprintln!(
                "  round {round} {path:<11} connect median {:.3} ms, handshake {:.2} ms, total {:.2} ms",
                median(s.iter().map(|x| x.connect).collect()) * 1e3,
                median(s.iter().map(|x| x.appconnect).collect()) * 1e3,
                median(s.iter().map(|x| x.total).collect()) * 1e3
            );
            samples[i].extend(s);
        }
    }
    println!(
        "\n{:<11} {:>6} {:>13} {:>16} {:>12} {:>14} {:>12} {:>14}",
        "path",
        "conns",
        "connect p50",
        "handshake p50",
        "p90",
        "total p50",
        "vs bridge",
        "added p50"
    );
    let base = median(samples[0].iter().map(|x| x.total).collect());
    let base_hs = median(samples[0].iter().map(|x| x.appconnect).collect());
    let mut rows = Vec::new();
    for (path, s) in PATHS.iter().zip(&samples) {
        let hs: Vec<f64> = s.iter().map(|x| x.appconnect).collect();
        let tot: Vec<f64> = s.iter().map(|x| x.total).collect();
        let c50 = median(s.iter().map(|x| x.connect).collect());
        let cdf: Vec<f64> = loupe_perf::percentiles(hs.clone())
            .into_iter()
            .map(|s| s * 1e3)
            .collect();
        let (hs50, hs90, t50) = (median(hs.clone()), percentile(hs, 0.9), median(tot));
        // What the path adds to the median TLS handshake against the bridge.
        let added_us = (hs50 - base_hs) * 1e6;
        println!(
            "{path:<11} {:>6} {:>10.3} ms {:>13.2} ms {:>9.2} ms {:>11.2} ms {:>11.2}x {:>11.0} us",
            s.len(),
            c50 * 1e3,
            hs50 * 1e3,
            hs90 * 1e3,
            t50 * 1e3,
            t50 / base,
            added_us
        );
        rows.push(serde_json::json!({
            "path": path, "connections": s.len(), "connect_p50_ms": c50 * 1e3,
            "handshake_p50_ms": hs50 * 1e3, "handshake_p90_ms": hs90 * 1e3,
            "total_p50_ms": t50 * 1e3, "total_vs_bridge": t50 / base,
            "handshake_added_p50_us": added_us,
            // The 0th..100th percentiles, for the plot of `perf/run all`.
            "handshake_cdf_ms": cdf,
        }));
    }

    // The path's own delay on the packets a new connection waits for.
    println!(
        "\none-way delay on the wire, client capture to server capture (p50, us):\n\
         {:<11} {:>8} {:>8} {:>13} {:>13} {:>16}",
        "path", "SYN", "SYN-ACK", "ClientHello", "server first", "added (3 first)"
    );
    let p50 =
        |w: &HashMap<Stage, Vec<f64>>, s: Stage| w.get(&s).map_or(f64::NAN, |v| median(v.clone()));
    let critical = [Stage::Syn, Stage::SynAck, Stage::Hello];
    let base: f64 = critical.iter().map(|s| p50(&wire[0], *s)).sum();
    for (path, w) in PATHS.iter().zip(&wire) {
        let sum: f64 = critical.iter().map(|s| p50(w, *s)).sum();
        println!(
            "{path:<11} {:>8.1} {:>8.1} {:>13.1} {:>13.1} {:>16.1}",
            p50(w, Stage::Syn),
            p50(w, Stage::SynAck),
            p50(w, Stage::Hello),
            p50(w, Stage::ServerFirst),
            sum - base
        );
        let mut row = serde_json::json!({"path": path, "wire_added_us": sum - base});
        for s in STAGES {
            row[format!("wire_{}_p50_us", s.name())] = serde_json::json!(p50(w, s));
            row[format!("wire_{}_samples", s.name())] =
                serde_json::json!(w.get(&s).map_or(0, Vec::len));
        }
        rows.push(row);
    }

    println!(
        "\nhold + decision in the worker (the segment completing the ClientHello: parse, \
         policy, release or takeover), from the engine's counters:"
    );
    for (path, c) in PATHS.iter().zip(&costs).skip(1) {
        let n: u64 = c.decision_us.iter().sum();
        let p50 = c.decision_p50_within_us();
        println!(
            "{path:<11} {n:>6} decisions, p50 {}; by bucket (us, upper bounds {:?} and above): {:?}",
            p50.map_or("above the last bound".into(), |b| format!("at most {b} us")),
            DECISION_BUCKETS_US,
            c.decision_us
        );
        rows.push(serde_json::json!({
            "path": path, "decisions": n, "decision_p50_within_us": p50,
            "decision_buckets_us": DECISION_BUCKETS_US, "decision_counts": c.decision_us,
        }));
    }

    // Live apply: CLI to the dataplane running the new version.
    let h = Harness::new(HarnessConfig::default())?;
    let sock = dataplane_socket(&h);
    let engine = Engine::start(&h, &["--control-socket", sock.to_str().context("path")?])?;
    let (a, b) = (policy(&h, "tcp-split")?, policy(&h, "no-decrypt")?);
    let control = Control::start(&h, &sock, Some(&a), &[])?;
    control.wait_in_sync()?;
    let mut ms = Vec::new();
    for i in 0..args.applies {
        let p: &Path = if i % 2 == 0 { &b } else { &a };
        let started = Instant::now();
        let out = control.cli(&["policy", "apply", p.to_str().context("path")?])?;
        let took = started.elapsed();
        anyhow::ensure!(
            out.status.success(),
            "apply: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        ms.push(took.as_secs_f64() * 1e3);
    }
    let want = 1 + args.applies as u64;
    let versions = engine.wait_stats("the last version running", Duration::from_secs(30), |r| {
        r.policy
            .as_ref()
            .filter(|p| p.version == want)
            .map(|p| p.version)
    })?;
    println!(
        "\npolicy apply (loupe policy apply, CLI start to the dataplane running it): median \
         {:.1} ms, p90 {:.1} ms over {} applies (dataplane at version {versions})",
        median(ms.clone()),
        percentile(ms.clone(), 0.9),
        ms.len()
    );
    rows.push(serde_json::json!({"apply_ms": ms}));
    drop(control);
    drop(engine);
    loupe_perf::write_results_to(args.json.as_deref(), "decide.json", &rows)?;
    Ok(())
}
