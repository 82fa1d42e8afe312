//! The report of `perf/run all`: a Markdown summary of the ratios each
//! scenario measured (against its peer from the same run) and PNG plots,
//! read from the JSON the scenarios wrote into the run's directory. A
//! scenario that did not pass has no figures here: its section says why,
//! and no table or plot shows a zero in its place.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

use anyhow::Context;
use serde_json::Value;

use crate::suite::Outcome;

/// What the summary's header says about the run.
pub struct RunInfo<'a> {
    pub started: &'a str,
    pub quick: bool,
    pub commit: &'a str,
    pub kernel: &'a str,
    pub cpus: usize,
    pub seconds: f64,
}

/// A scenario's JSON, or why there is none.
fn load(dir: &Path, outcomes: &[Outcome], scenario: &str, file: &str) -> Result<Value, String> {
    match outcomes.iter().find(|o| o.name == scenario) {
        None => return Err("not run".into()),
        Some(o) if !o.status.passed() => {
            return Err(format!(
                "not measured: {} (log: {})",
                o.status.describe(),
                o.log
            ))
        }
        Some(_) => {}
    }
    let bytes = std::fs::read(dir.join(file)).map_err(|e| format!("not measured: {file}: {e}"))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("not measured: {file}: {e}"))
}

fn num(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

/// A number with `prec` decimals, or "-" where there is none.
fn f(v: Option<f64>, prec: usize) -> String {
    v.filter(|x| x.is_finite())
        .map_or_else(|| "-".into(), |x| format!("{x:.prec$}"))
}

/// `a / b` as "0.77x", or "-" without both (or with a zero peer).
fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 && a.is_finite() => format!("{:.2}x", a / b),
        _ => "-".into(),
    }
}

fn rows(v: &Value) -> &[Value] {
    v.as_array().map_or(&[], Vec::as_slice)
}

/// The Markdown summary.
pub fn summary(dir: &Path, info: &RunInfo, outcomes: &[Outcome], plots: &[Plot]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Loupe benchmarks, {} ({})\n",
        info.started,
        if info.quick { "quick" } else { "full" }
    );
    let _ = writeln!(
        s,
        "Commit {}, Linux {}, {} CPUs; {:.0} s in all. Every ratio is against \
         its peer measured in the same run. JSON, logs and plots are beside this file.\n",
        info.commit, info.kernel, info.cpus, info.seconds
    );
    let failed = outcomes.iter().filter(|o| !o.status.passed()).count();
    if failed > 0 {
        let _ = writeln!(
            s,
            "**{failed} scenario(s) FAILED**; their figures are absent.\n"
        );
    }
    let _ = writeln!(
        s,
        "## Scenarios\n\n| scenario | status | seconds | log |\n|---|---|---|---|"
    );
    for o in outcomes {
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} | {} |",
            o.name,
            o.status.describe(),
            o.seconds,
            o.log
        );
    }
    throughput(
        &mut s,
        dir,
        outcomes,
        "wire-per-core",
        "per-core shape (the path on CPU 0, the endpoints on the last CPU)",
    );
    throughput(
        &mut s,
        dir,
        outcomes,
        "wire-shared",
        "shared shape (every CPU for everything)",
    );
    split_transfer(
        &mut s,
        dir,
        outcomes,
        "split-impaired",
        "2% loss, 2% reordering, 1% duplication on both links",
    );
    split_transfer(&mut s, dir, outcomes, "split-clean", "clean links");
    split_memory(&mut s, dir, outcomes);
    hsm(&mut s, dir, outcomes);
    decide(
        &mut s,
        dir,
        outcomes,
        "decide",
        "shared CPUs, workers sleep when idle",
    );
    decide(
        &mut s,
        dir,
        outcomes,
        "decide-per-core",
        "per-core shape, the engine polling its own core",
    );
    tls(&mut s, dir, outcomes);
    inbound(&mut s, dir, outcomes);
    policy(&mut s, dir, outcomes);
    let _ = writeln!(s, "\n## Plots\n");
    for p in plots {
        match &p.result {
            Ok(()) => {
                let _ = writeln!(s, "![{}]({})\n", p.title, p.file);
            }
            Err(why) => {
                let _ = writeln!(s, "- {}: not drawn: {why}", p.title);
            }
        }
    }
    s
}

fn section(s: &mut String, title: &str, data: &Result<Value, String>) -> bool {
    let _ = writeln!(s, "\n## {title}\n");
    if let Err(why) = data {
        let _ = writeln!(s, "{why}");
        return false;
    }
    true
}

/// One throughput row of a wire JSON.
struct WireRow {
    path: String,
    frames: String,
    flows: u64,
    gbit: Option<f64>,
    mpps: Option<f64>,
}

fn wire_rows(v: &Value) -> Vec<WireRow> {
    rows(&v["results"])
        .iter()
        .map(|r| WireRow {
            path: r["path"].as_str().unwrap_or("?").to_string(),
            frames: r["workload"]["frames"].as_str().unwrap_or("?").to_string(),
            flows: r["workload"]["flows"].as_u64().unwrap_or(0),
            gbit: num(r, "median_gbit_per_s"),
            mpps: num(r, "median_mpps"),
        })
        .collect()
}

fn throughput(s: &mut String, dir: &Path, outcomes: &[Outcome], scenario: &str, shape: &str) {
    let data = load(dir, outcomes, scenario, &format!("{scenario}.json"));
    if !section(s, &format!("Throughput, {shape}"), &data) {
        return;
    }
    let rows = wire_rows(data.as_ref().expect("checked"));
    let peer = |to: &str, frames: &str, flows: u64| {
        rows.iter()
            .find(|r| r.path == to && r.frames == frames && r.flows == flows)
            .and_then(|r| r.gbit)
    };
    let _ = writeln!(
        s,
        "| path | frames | flows | Gbit/s | Mpps | vs bridge (offloads off) | vs kernel relay |\n|---|---|---|---|---|---|---|"
    );
    for r in &rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.path,
            r.frames,
            r.flows,
            f(r.gbit, 2),
            f(r.mpps, 3),
            ratio(r.gbit, peer("bridge_offload_off", &r.frames, r.flows)),
            ratio(r.gbit, peer("kernel_relay", &r.frames, r.flows)),
        );
    }
    let _ = writeln!(s, "\nTargets (MTU frames, at least 1.00x):\n");
    for (path, to) in [
        ("xdp_split", "kernel_relay"),
        ("xdp_userspace", "bridge_offload_off"),
    ] {
        let line: Vec<String> = rows
            .iter()
            .filter(|r| r.path == path && r.frames == "mtu")
            .map(|r| {
                format!(
                    "{} flow(s) {}",
                    r.flows,
                    ratio(r.gbit, peer(to, "mtu", r.flows))
                )
            })
            .collect();
        if !line.is_empty() {
            let _ = writeln!(s, "- {path} / {to}: {}", line.join(", "));
        }
    }
}

fn split_transfer(s: &mut String, dir: &Path, outcomes: &[Outcome], scenario: &str, links: &str) {
    let data = load(dir, outcomes, scenario, &format!("{scenario}.json"));
    if !section(
        s,
        &format!("One connection through tcp-split and a bridge, {links}"),
        &data,
    ) {
        return;
    }
    let v = data.expect("checked");
    let _ = writeln!(
        s,
        "| path | MiB each way | median s | Mbit/s each way | engine ACKs per data segment |\n|---|---|---|---|---|"
    );
    for r in rows(&v) {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} |",
            r["path"].as_str().unwrap_or("?"),
            f(num(r, "mib_each_way"), 0),
            f(num(r, "median_seconds"), 2),
            f(num(r, "median_mbit_per_s_each_way"), 1),
            f(num(r, "engine_acks_per_data_segment"), 2),
        );
    }
    let secs = |p: &str| {
        rows(&v)
            .iter()
            .find(|r| r["path"] == p)
            .and_then(|r| num(r, "median_seconds"))
    };
    let _ = writeln!(
        s,
        "\ntcp-split / bridge throughput: **{}**",
        ratio(secs("bridge"), secs("xdp_split"))
    );
}

fn split_memory(s: &mut String, dir: &Path, outcomes: &[Outcome]) {
    let data = load(dir, outcomes, "split-memory", "split-memory.json");
    if !section(s, "Memory per idle split connection", &data) {
        return;
    }
    let v = data.expect("checked");
    let _ = writeln!(
        s,
        "{} connections, {} split, {} passed through for memory: engine RSS grew **{} KiB per \
         connection** ({} KiB per connection of the second half; target at most 16).",
        f(num(&v, "connections"), 0),
        f(num(&v, "split_active"), 0),
        f(num(&v, "memory_passthrough"), 0),
        f(num(&v, "kib_per_connection"), 1),
        f(num(&v, "kib_per_connection_second_half"), 1),
    );
}

fn hsm(s: &mut String, dir: &Path, outcomes: &[Outcome]) {
    let data = load(dir, outcomes, "hsm", "hsm.json");
    if !section(
        s,
        "HSM signer: the service against raw SoftHSM2 at the same session count",
        &data,
    ) {
        return;
    }
    let _ = writeln!(
        s,
        "| key | sessions | batch | signatures/s | vs raw | p50 µs | p99 µs |\n|---|---|---|---|---|---|---|"
    );
    for r in rows(data.as_ref().expect("checked")) {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} |",
            r["key"].as_str().unwrap_or("?"),
            f(num(r, "threads"), 0),
            r["batch"].as_u64().map_or("raw".into(), |b| b.to_string()),
            f(num(r, "rate"), 0),
            num(r, "ratio").map_or("-".into(), |x| format!("{x:.2}x")),
            f(num(r, "p50_us"), 0),
            f(num(r, "p99_us"), 0),
        );
    }
}

fn decide(s: &mut String, dir: &Path, outcomes: &[Outcome], scenario: &str, shape: &str) {
    let data = load(dir, outcomes, scenario, &format!("{scenario}.json"));
    if !section(
        s,
        &format!("New connections: the hold and the decision against a bridge, {shape}"),
        &data,
    ) {
        return;
    }
    let v = data.expect("checked");
    let _ = writeln!(
        s,
        "| path | connections | handshake p50 ms | p90 ms | added to the p50 µs | added on the wire (SYN, SYN-ACK, ClientHello) µs |\n|---|---|---|---|---|---|"
    );
    for r in rows(&v)
        .iter()
        .filter(|r| r.get("handshake_p50_ms").is_some())
    {
        let path = r["path"].as_str().unwrap_or("?");
        let wire = rows(&v)
            .iter()
            .find(|w| w["path"] == path && w.get("wire_added_us").is_some())
            .and_then(|w| num(w, "wire_added_us"));
        let _ = writeln!(
            s,
            "| {path} | {} | {} | {} | {} | {} |",
            f(num(r, "connections"), 0),
            f(num(r, "handshake_p50_ms"), 2),
            f(num(r, "handshake_p90_ms"), 2),
            f(num(r, "handshake_added_p50_us"), 0),
            f(wire, 0),
        );
    }
    if let Some(ms) = rows(&v).iter().find_map(|r| r.get("apply_ms")) {
        let ms: Vec<f64> = rows(ms).iter().filter_map(Value::as_f64).collect();
        if !ms.is_empty() {
            let _ = writeln!(
                s,
                "\n`loupe policy apply`, CLI to dataplane: median {:.1} ms over {}.",
                crate::median(ms.clone()),
                ms.len()
            );
        }
    }
}

fn tls(s: &mut String, dir: &Path, outcomes: &[Outcome]) {
    let data = load(dir, outcomes, "tls", "tls.json");
    if !section(s, "TLS: decryption against direct TLS and SSLsplit", &data) {
        return;
    }
    let v = data.expect("checked");
    let paths: Vec<&Value> = rows(&v)
        .iter()
        .filter(|r| r.get("path").is_some())
        .collect();
    let _ = writeln!(
        s,
        "| path | 1 conn Gbit/s | 8 conns Gbit/s | handshakes/s (cache hit) | (miss) | RTT p50 µs | p99 µs | p99 under a flood µs | HTTP requests/s | KiB per idle connection | failed handshakes |\n|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for r in &paths {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r["path"].as_str().unwrap_or("?"),
            f(num(r, "bulk_1_gbit"), 2),
            f(num(r, "bulk_8_gbit"), 2),
            f(num(r, "handshakes_hit_per_s"), 0),
            f(num(r, "handshakes_miss_per_s"), 0),
            f(num(r, "rtt_p50_us"), 0),
            f(num(r, "rtt_p99_us"), 0),
            f(num(r, "flood_rtt_p99_us"), 0),
            f(num(r, "http_requests_per_s"), 0),
            f(num(r, "kib_per_idle_connection"), 1),
            f(num(r, "failed_handshakes"), 0),
        );
    }
    let get = |p: &str, k: &str| {
        paths
            .iter()
            .find(|r| r["path"] == p)
            .and_then(|r| num(r, k))
    };
    for peer in ["direct", "sslsplit"] {
        if get(peer, "bulk_1_gbit").is_some() && get("decrypt", "bulk_1_gbit").is_some() {
            let _ = writeln!(
                s,
                "\ndecrypt / {peer}: bulk 1 connection {}, 8 connections {}, handshakes (cache hit) {}, (miss) {}",
                ratio(get("decrypt", "bulk_1_gbit"), get(peer, "bulk_1_gbit")),
                ratio(get("decrypt", "bulk_8_gbit"), get(peer, "bulk_8_gbit")),
                ratio(get("decrypt", "handshakes_hit_per_s"), get(peer, "handshakes_hit_per_s")),
                ratio(get("decrypt", "handshakes_miss_per_s"), get(peer, "handshakes_miss_per_s")),
            );
        }
    }
}

fn inbound(s: &mut String, dir: &Path, outcomes: &[Outcome]) {
    let data = load(dir, outcomes, "inbound", "inbound.json");
    if !section(
        s,
        "Inbound inspection: full handshakes/s with the key in SoftHSM2",
        &data,
    ) {
        return;
    }
    let _ = writeln!(
        s,
        "| key | HSM sessions | batch | handshakes/s | raw signatures/s | vs raw | resumed/s | nginx, key in a file |\n|---|---|---|---|---|---|---|---|"
    );
    for r in rows(data.as_ref().expect("checked")) {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            r["key"].as_str().unwrap_or("?"),
            f(num(r, "hsm_sessions"), 0),
            f(num(r, "batch"), 0),
            f(num(r, "inbound_full_per_s"), 0),
            f(num(r, "raw_sign_per_s"), 0),
            num(r, "ratio_to_raw").map_or("-".into(), |x| format!("{x:.2}x")),
            f(num(r, "inbound_resumed_per_s"), 0),
            f(num(r, "direct_full_per_s"), 0),
        );
    }
}

fn policy(s: &mut String, dir: &Path, outcomes: &[Outcome]) {
    let data = load(dir, outcomes, "policy-check", "policy.json");
    if !section(s, "`loupe policy check` on large policies", &data) {
        return;
    }
    let _ = writeln!(
        s,
        "| scenario | file MiB | median s | peak MiB | outcome |\n|---|---|---|---|---|"
    );
    for r in rows(data.as_ref().expect("checked")) {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} |",
            r["scenario"].as_str().unwrap_or("?"),
            f(num(r, "file_mib"), 1),
            // A run that timed out has no time: shown as such, not as 0.
            num(r, "median_s").map_or("timed out".into(), |x| format!("{x:.3}")),
            f(num(r, "peak_rss_mib"), 0),
            r["outcome"].as_str().unwrap_or("?").replace('|', "\\|"),
        );
    }
}

/// One plot: its file (in the run's directory) and whether it was drawn.
pub struct Plot {
    pub title: String,
    pub file: String,
    pub result: Result<(), String>,
}

/// A line of points.
#[derive(Clone, Debug)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// Draws every plot the run's results allow into `dir`.
pub fn plots(dir: &Path, outcomes: &[Outcome]) -> Vec<Plot> {
    let mut out = Vec::new();
    let mut add = |title: &str, file: &str, r: Result<Chart, String>| {
        let result = r.and_then(|c| c.draw(&dir.join(file)).map_err(|e| format!("{e:#}")));
        out.push(Plot {
            title: title.into(),
            file: file.into(),
            result,
        });
    };
    for (scenario, shape) in [("wire-per-core", "per-core"), ("wire-shared", "shared")] {
        add(
            &format!("Throughput against flows, MTU frames, {shape} shape"),
            &format!("throughput-{shape}.png"),
            load(dir, outcomes, scenario, &format!("{scenario}.json")).and_then(|v| {
                let mut series: Vec<Series> = Vec::new();
                for r in wire_rows(&v) {
                    let (Some(g), true) = (r.gbit, r.frames == "mtu") else {
                        continue;
                    };
                    push_point(&mut series, r.path, (r.flows as f64, g));
                }
                Chart::new(
                    format!("Throughput, MTU frames, {shape} shape"),
                    "flows",
                    "Gbit/s",
                    series,
                    true,
                )
            }),
        );
    }
    for (scenario, shape) in [("decide", "shared"), ("decide-per-core", "per-core")] {
        add(
            &format!("New connections: TLS handshake time CDF, {shape} shape"),
            &format!("{scenario}-handshake-cdf.png"),
            load(dir, outcomes, scenario, &format!("{scenario}.json")).and_then(|v| {
                let series = rows(&v)
                    .iter()
                    .filter_map(|r| {
                        let cdf = r.get("handshake_cdf_ms")?.as_array()?;
                        let n = cdf.len().saturating_sub(1).max(1) as f64;
                        Some(Series {
                            label: r["path"].as_str().unwrap_or("?").into(),
                            points: cdf
                                .iter()
                                .enumerate()
                                .filter_map(|(i, ms)| Some((ms.as_f64()?, i as f64 / n)))
                                .collect(),
                        })
                    })
                    .collect();
                Chart::new(
                    format!("TLS handshake (curl's appconnect), new connections, {shape} shape"),
                    "ms",
                    "fraction of handshakes",
                    series,
                    false,
                )
                .map(Chart::cdf)
            }),
        );
    }
    add(
        "Inbound inspection: full handshakes/s against HSM sessions",
        "inbound-handshakes-vs-sessions.png",
        load(dir, outcomes, "inbound", "inbound.json").and_then(|v| {
            let mut series: Vec<Series> = Vec::new();
            for r in rows(&v) {
                let (Some(key), Some(n)) = (r["key"].as_str(), num(r, "hsm_sessions")) else {
                    continue;
                };
                if let Some(rate) = num(r, "inbound_full_per_s") {
                    let batch = r["batch"].as_u64().unwrap_or(0);
                    push_point(&mut series, format!("{key}, batch {batch}"), (n, rate));
                }
                if let Some(raw) = num(r, "raw_sign_per_s") {
                    // The same raw rate is on each batch's row.
                    push_point(
                        &mut series,
                        format!("{key}, raw SoftHSM2 signatures"),
                        (n, raw),
                    );
                }
            }
            Chart::new(
                "Inbound full handshakes/s (key in SoftHSM2)".into(),
                "HSM sessions",
                "per second",
                series,
                false,
            )
        }),
    );
    add(
        "HSM signer: signatures/s against sessions",
        "hsm-signatures-vs-sessions.png",
        load(dir, outcomes, "hsm", "hsm.json").and_then(|v| {
            let mut series: Vec<Series> = Vec::new();
            for r in rows(&v) {
                let (Some(key), Some(n), Some(rate)) =
                    (r["key"].as_str(), num(r, "threads"), num(r, "rate"))
                else {
                    continue;
                };
                let label = match r["batch"].as_u64() {
                    Some(b) => format!("{key}, service batch {b}"),
                    None => format!("{key}, raw"),
                };
                push_point(&mut series, label, (n, rate));
            }
            Chart::new(
                "HSM signer against raw SoftHSM2".into(),
                "sessions",
                "signatures/s",
                series,
                false,
            )
        }),
    );
    out
}

/// Adds a point to the series of that label (made if new); a second point
/// at the same x is dropped.
fn push_point(series: &mut Vec<Series>, label: String, p: (f64, f64)) {
    match series.iter_mut().find(|s| s.label == label) {
        Some(s) if s.points.iter().any(|q| q.0 == p.0) => {}
        Some(s) => s.points.push(p),
        None => series.push(Series {
            label,
            points: vec![p],
        }),
    }
}

/// A line chart, checked to have something to draw.
pub struct Chart {
    title: String,
    x_desc: &'static str,
    y_desc: &'static str,
    series: Vec<Series>,
    log_x: bool,
    cdf: bool,
}

impl Chart {
    pub fn new(
        title: String,
        x_desc: &'static str,
        y_desc: &'static str,
        mut series: Vec<Series>,
        log_x: bool,
    ) -> Result<Chart, String> {
        for s in &mut series {
            s.points
                .retain(|p| p.0.is_finite() && p.1.is_finite() && (!log_x || p.0 > 0.0));
            s.points.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        series.retain(|s| !s.points.is_empty());
        if series.is_empty() {
            return Err("the results hold no points for it".into());
        }
        Ok(Chart {
            title,
            x_desc,
            y_desc,
            series,
            log_x,
            cdf: false,
        })
    }

    /// A distribution: y runs from 0 to 1, the legend goes below the curves.
    pub fn cdf(self) -> Chart {
        Chart { cdf: true, ..self }
    }

    /// Draws the chart as a PNG at `path`.
    pub fn draw(&self, path: &Path) -> anyhow::Result<()> {
        use plotters::prelude::*;
        fonts()?;
        let tx = |x: f64| if self.log_x { x.log10() } else { x };
        let pts = || self.series.iter().flat_map(|s| s.points.iter());
        let (mut x0, mut x1) = pts().fold((f64::MAX, f64::MIN), |(a, b), p| {
            (a.min(tx(p.0)), b.max(tx(p.0)))
        });
        if x1 - x0 < 1e-9 {
            (x0, x1) = (x0 - 1.0, x1 + 1.0);
        }
        let pad = (x1 - x0) * 0.05;
        let y_max = pts().fold(0f64, |a, p| a.max(p.1)).max(1e-9);
        // Room above the lines for the legend, except in a CDF (which ends
        // at 1, the legend below its curves).
        let cdf = self.cdf;
        let y1 = y_max * if cdf { 1.1 } else { 1.4 };
        let integer_x = pts().all(|p| p.0.fract() == 0.0);
        let root = BitMapBackend::new(path, (960, 600)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(&self.title, ("sans-serif", 24))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(90)
            .build_cartesian_2d((x0 - pad)..(x1 + pad), 0f64..y1)?;
        let log_x = self.log_x;
        let x_fmt = move |x: &f64| {
            let v = if log_x { 10f64.powf(*x) } else { *x };
            if integer_x && (v - v.round()).abs() > 1e-6 {
                // Sessions and flows come whole: no label between them.
                String::new()
            } else if integer_x || v.abs() >= 100.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.2}")
                    .trim_end_matches('0')
                    .trim_end_matches('.')
                    .to_string()
            }
        };
        let y_fmt = move |y: &f64| {
            if y1 >= 100.0 {
                format!("{y:.0}")
            } else {
                format!("{y:.1}")
            }
        };
        chart
            .configure_mesh()
            .x_desc(self.x_desc)
            .y_desc(self.y_desc)
            .x_label_formatter(&x_fmt)
            .y_label_formatter(&y_fmt)
            .label_style(("sans-serif", 16))
            .draw()?;
        for (i, s) in self.series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(
                    s.points.iter().map(|p| (tx(p.0), p.1)),
                    color.stroke_width(2),
                ))?
                .label(s.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(2))
                });
            chart.draw_series(
                s.points
                    .iter()
                    .map(|p| Circle::new((tx(p.0), p.1), 3, color.filled())),
            )?;
        }
        chart
            .configure_series_labels()
            .position(if cdf {
                SeriesLabelPosition::LowerRight
            } else {
                SeriesLabelPosition::UpperRight
            })
            .label_font(("sans-serif", 16))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
        root.present()
            .with_context(|| format!("write {}", path.display()))?;
        Ok(())
    }
}

/// Where the plots' font is looked for (Debian's fonts-dejavu-core, which
/// scripts/setup installs).
const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

/// Registers the plots' font once.
fn fonts() -> anyhow::Result<()> {
    static DONE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let path: PathBuf = FONTS
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .ok_or_else(|| {
                format!(
                    "no font for the plots at {} (Debian: apt-get install fonts-dejavu-core; \
                     scripts/setup does)",
                    FONTS.join(" or ")
                )
            })?;
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        plotters::style::register_font(
            "sans-serif",
            plotters::style::FontStyle::Normal,
            Box::leak(bytes.into_boxed_slice()),
        )
        .map_err(|_| format!("{}: not a font", path.display()))
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::suite::Status;
    use serde_json::json;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("loupe-report-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn outcome(name: &str, status: Status) -> Outcome {
        Outcome {
            name: name.into(),
            command: format!("loupe-perf {name}"),
            seconds: 12.0,
            log: format!("{name}.log"),
            status,
        }
    }

    fn info() -> RunInfo<'static> {
        RunInfo {
            started: "2026-12-02T05-00-00Z",
            quick: true,
            commit: "abc1234",
            kernel: "6.18",
            cpus: 2,
            seconds: 300.0,
        }
    }

    fn wire_row(path: &str, flows: u64, gbit: f64) -> Value {
        json!({"path": path, "workload": {"frames": "mtu", "mss": null, "flows": flows},
               "samples": [], "median_gbit_per_s": gbit, "median_mpps": gbit / 12.0})
    }

    fn write(dir: &Path, file: &str, v: &Value) {
        std::fs::write(dir.join(file), serde_json::to_vec(v).unwrap()).unwrap();
    }

    fn wire(dir: &Path) {
        write(
            dir,
            "wire-per-core.json",
            &json!({"kernel": "6.18", "cpus": 2, "per_core": true, "seconds": 2, "repeat": 1,
            "results": [
                wire_row("bridge_offload_off", 1, 8.0), wire_row("xdp_userspace", 1, 6.0),
                wire_row("xdp_split", 1, 2.0), wire_row("kernel_relay", 1, 4.0),
                wire_row("xdp_split", 8, 3.0), wire_row("kernel_relay", 8, 2.0),
            ]}),
        );
    }

    #[test]
    fn ratios_are_against_the_peer_of_the_same_workload() {
        let d = tmp("ratios");
        wire(&d);
        let o = [outcome("wire-per-core", Status::Passed)];
        let md = summary(&d, &info(), &o, &[]);
        assert!(
            md.contains("| xdp_split | mtu | 1 | 2.00 | 0.167 | 0.25x | 0.50x |"),
            "{md}"
        );
        // No bridge row for 8 flows: no ratio rather than a made-up one.
        assert!(
            md.contains("| xdp_split | mtu | 8 | 3.00 | 0.250 | - | 1.50x |"),
            "{md}"
        );
        assert!(md.contains("- xdp_split / kernel_relay: 1 flow(s) 0.50x, 8 flow(s) 1.50x"));
        assert!(md.contains("- xdp_userspace / bridge_offload_off: 1 flow(s) 0.75x"));
        assert!(md.contains("| wire-per-core | passed | 12 |"));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_failed_scenario_shows_why_and_none_of_its_figures() {
        let d = tmp("failed");
        // Results left by the scenario before it failed are not its result.
        wire(&d);
        let o = [outcome(
            "wire-per-core",
            Status::Failed {
                exit: "exit status: 1".into(),
                tail: "path xdp_split\nError: iperf3 failed: refused\n".into(),
            },
        )];
        let plots = plots(&d, &o);
        let md = summary(&d, &info(), &o, &plots);
        assert!(md.contains("**1 scenario(s) FAILED**"), "{md}");
        assert!(md.contains("not measured: FAILED (exit status: 1): Error: iperf3 failed: refused"));
        assert!(!md.contains("| xdp_split |"), "{md}");
        assert!(!md.contains("0.50x"), "{md}");
        assert!(!d.join("throughput-per-core.png").exists());
        assert!(md.contains("not drawn: not measured: FAILED"), "{md}");
        // Scenarios that were not run are said to be so, not zero.
        assert!(
            md.contains("## Memory per idle split connection\n\nnot run"),
            "{md}"
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn the_plots_are_pngs_of_the_runs_results() {
        let d = tmp("plots");
        wire(&d);
        let cdf = |base: f64| {
            (0..=100)
                .map(|i| base + i as f64 * 0.01)
                .collect::<Vec<_>>()
        };
        write(
            &d,
            "decide.json",
            &json!([
                {"path": "bridge", "connections": 40, "handshake_p50_ms": 1.5, "handshake_cdf_ms": cdf(1.0)},
                {"path": "tcp-split", "connections": 40, "handshake_p50_ms": 1.7, "handshake_cdf_ms": cdf(1.2)},
                {"path": "bridge", "wire_added_us": 0.0},
                {"apply_ms": [4.0, 5.0, 6.0]},
            ]),
        );
        write(
            &d,
            "inbound.json",
            &json!([
                {"key": "ec-p256", "hsm_sessions": 1, "batch": 8, "inbound_full_per_s": 900.0, "raw_sign_per_s": 1000.0},
                {"key": "ec-p256", "hsm_sessions": 2, "batch": 8, "inbound_full_per_s": 1700.0, "raw_sign_per_s": 1900.0},
            ]),
        );
        let o = [
            outcome("wire-per-core", Status::Passed),
            outcome("decide", Status::Passed),
            outcome("inbound", Status::Passed),
        ];
        let plots = plots(&d, &o);
        for file in [
            "throughput-per-core.png",
            "decide-handshake-cdf.png",
            "inbound-handshakes-vs-sessions.png",
        ] {
            let p = plots.iter().find(|p| p.file == file).expect(file);
            assert_eq!(p.result, Ok(()), "{file}");
            let bytes = std::fs::read(d.join(file)).unwrap();
            assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{file}");
            // Width and height from the IHDR chunk.
            assert_eq!(&bytes[16..24], &[0, 0, 3, 192, 0, 0, 2, 88], "{file}");
        }
        let hsm = plots
            .iter()
            .find(|p| p.file == "hsm-signatures-vs-sessions.png")
            .unwrap();
        assert_eq!(hsm.result, Err("not run".into()));
        let md = summary(&d, &info(), &o, &plots);
        assert!(md.contains(
            "![New connections: TLS handshake time CDF, shared shape](decide-handshake-cdf.png)"
        ));
        assert!(md.contains("| tcp-split | 40 | 1.70 |"), "{md}");
        assert!(md.contains("median 5.0 ms over 3"), "{md}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_chart_without_points_is_not_drawn() {
        let empty = vec![Series {
            label: "x".into(),
            points: vec![(f64::NAN, 1.0), (0.0, 2.0)],
        }];
        // NaN is dropped, and 0 has no place on a log axis.
        assert!(Chart::new("t".into(), "x", "y", empty.clone(), true).is_err());
        assert!(Chart::new("t".into(), "x", "y", empty, false).is_ok());
    }

    #[test]
    fn a_timed_out_policy_check_shows_as_such_not_as_zero() {
        let d = tmp("policy");
        write(
            &d,
            "policy.json",
            &json!([{"scenario": "rules-100k", "file_mib": 9.5, "median_s": null,
                     "peak_rss_mib": 80.0, "outcome": "timed out"}]),
        );
        let md = summary(&d, &info(), &[outcome("policy-check", Status::Passed)], &[]);
        assert!(
            md.contains("| rules-100k | 9.5 | timed out | 80 | timed out |"),
            "{md}"
        );
        let _ = std::fs::remove_dir_all(&d);
    }
}
