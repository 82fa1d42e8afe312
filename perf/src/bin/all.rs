//! `perf/run all [--quick]`: every benchmark scenario in turn, each as its
//! own process with a deadline, into `perf/results/<UTC time>/` (JSON and
//! a log per scenario), then `summary.md` (the ratios, each against its
//! peer from the same run), `summary.json` and PNG plots there. Exits 1
//! when any scenario failed; a failed scenario is reported as failed.

use std::{
    path::{Path, PathBuf},
    sync::{atomic::AtomicBool, Arc},
    time::Instant,
};

use anyhow::Context;
use clap::Parser;
use loupe_perf::{report, suite};

#[derive(Debug, Parser)]
#[command(name = "loupe-perf-all")]
struct Args {
    /// Short measurements: the whole run in about five minutes.
    #[arg(long)]
    quick: bool,
    /// Only these scenarios (comma-separated; default all).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Where the run's directory is made.
    #[arg(long, default_value = "perf/results")]
    results_root: PathBuf,
    /// Run nothing: redraw the summary and plots of an earlier run's
    /// directory from its JSON (and its summary.json's outcomes).
    #[arg(long, value_name = "DIR")]
    report_only: Option<PathBuf>,
}

fn describe_git() -> String {
    std::process::Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// Removes the namespaces of a scenario that was killed (it could not
/// remove them itself); says so when it cannot.
fn sweep(bin_dir: &Path) {
    let harness = bin_dir.join("loupe-harness");
    match std::process::Command::new(&harness).arg("sweep").status() {
        Ok(st) if st.success() => {}
        Ok(st) => eprintln!("warning: {} sweep: {st}", harness.display()),
        Err(e) => eprintln!("warning: {} sweep: {e}", harness.display()),
    }
}

/// Writes the run's summary.md, summary.json and plots; returns the
/// Markdown.
fn write_report(
    dir: &std::path::Path,
    info: &report::RunInfo,
    outcomes: &[suite::Outcome],
) -> anyhow::Result<String> {
    let plots = report::plots(dir, outcomes);
    let md = report::summary(dir, info, outcomes, &plots);
    std::fs::write(dir.join("summary.md"), &md)?;
    std::fs::write(
        dir.join("summary.json"),
        serde_json::to_vec_pretty(&serde_json::json!({
            "started": info.started, "quick": info.quick, "commit": info.commit,
            "kernel": info.kernel, "cpus": info.cpus, "seconds": info.seconds,
            "scenarios": outcomes,
            "plots": plots.iter().map(|p| serde_json::json!({
                "file": p.file, "drawn": p.result.is_ok(), "error": p.result.as_ref().err(),
            })).collect::<Vec<_>>(),
        }))?,
    )?;
    Ok(md)
}

/// `--report-only`: the earlier run's own record, redrawn.
fn redraw(dir: &std::path::Path) -> anyhow::Result<()> {
    let file = dir.join("summary.json");
    let v: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&file).with_context(|| format!("read {}", file.display()))?,
    )
    .with_context(|| format!("{}: not JSON", file.display()))?;
    let outcomes: Vec<suite::Outcome> = serde_json::from_value(v["scenarios"].clone())
        .with_context(|| format!("{}: no scenario outcomes", file.display()))?;
    let text = |k: &str| v[k].as_str().unwrap_or("unknown").to_string();
    let (started, commit, kernel) = (text("started"), text("commit"), text("kernel"));
    let info = report::RunInfo {
        started: &started,
        quick: v["quick"].as_bool().unwrap_or(false),
        commit: &commit,
        kernel: &kernel,
        cpus: v["cpus"].as_u64().unwrap_or(0) as usize,
        seconds: v["seconds"].as_f64().unwrap_or(0.0),
    };
    println!("{}", write_report(dir, &info, &outcomes)?);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(dir) = &args.report_only {
        return redraw(dir);
    }
    for name in &args.only {
        anyhow::ensure!(
            suite::SCENARIOS.iter().any(|s| s.name == name),
            "unknown scenario {name}; the scenarios: {}",
            suite::SCENARIOS
                .iter()
                .map(|s| s.name)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let bin_dir = std::env::current_exe()?
        .parent()
        .context("the binary's directory")?
        .to_path_buf();
    // Ctrl-C or a TERM stops the scenario running (its whole process
    // group) and writes the report of what ran; they would not reach the
    // scenario's own group otherwise.
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ] {
        signal_hook::flag::register(sig, stop.clone())?;
    }
    let dir = suite::run_dir(&args.results_root);
    std::fs::create_dir_all(&args.results_root)
        .with_context(|| format!("create {}", args.results_root.display()))?;
    // A run's directory is its own: never mixed with an earlier run's files.
    std::fs::create_dir(&dir).with_context(|| format!("create {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let started = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    eprintln!("results: {}", dir.display());
    let start = Instant::now();
    let mut outcomes = Vec::new();
    for s in suite::SCENARIOS
        .iter()
        .filter(|s| args.only.is_empty() || args.only.iter().any(|o| o == s.name))
    {
        let (argv, deadline) = if args.quick {
            (s.quick_args, s.deadline.0)
        } else {
            (s.args, s.deadline.1)
        };
        eprintln!("== {} ({:.0} s in)", s.name, start.elapsed().as_secs_f64());
        let o = suite::run(
            s.name,
            &bin_dir.join(s.program),
            &suite::expand(argv, &dir),
            &dir,
            s.results,
            deadline,
            &stop,
        );
        eprintln!("   {} in {:.0} s", o.status.describe(), o.seconds);
        if !o.status.passed() {
            sweep(&bin_dir);
        }
        outcomes.push(o);
        if stop.load(std::sync::atomic::Ordering::SeqCst) {
            eprintln!("stopped: the scenarios after this one were not run");
            break;
        }
    }
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let commit = describe_git();
    let info = report::RunInfo {
        started: &started,
        quick: args.quick,
        commit: &commit,
        kernel: &kernel,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        seconds: start.elapsed().as_secs_f64(),
    };
    let md = write_report(&dir, &info, &outcomes)?;
    println!("{md}");
    let failed: Vec<&str> = outcomes
        .iter()
        .filter(|o| !o.status.passed())
        .map(|o| o.name.as_str())
        .collect();
    eprintln!(
        "summary: {} ({:.0} s)",
        dir.join("summary.md").display(),
        start.elapsed().as_secs_f64()
    );
    if stop.load(std::sync::atomic::Ordering::SeqCst) {
        std::process::exit(130);
    }
    if !failed.is_empty() {
        eprintln!("FAILED: {}", failed.join(", "));
        std::process::exit(1);
    }
    Ok(())
}
