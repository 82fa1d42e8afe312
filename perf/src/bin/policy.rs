//! `loupe-perf-policy`: how long `loupe policy check` takes on policies at
//! (and beyond) the documented limits, and how much memory it needs.
//!
//! Each scenario writes a generated policy (and category file) into a
//! temporary directory and runs the real CLI on it, `--repeat` times;
//! the table has the median wall time, the median CPU time (user and
//! system: steadier than wall time on a shared machine) and the largest
//! peak RSS. A run that outlasts `--timeout-s` is killed and shown as
//! `>T`. Each run's outcome is checked (a valid policy exits 0; an invalid one exits 1 and
//! names the expected error), so a fast wrong answer is no figure.
//!
//! Scenarios:
//! - `oversize`: a policy file of 17 MiB (the limit is 16 MiB);
//! - `rules-100k`: 100,000 rules of one glob each (the limit is 10,000);
//! - `rules-1k-x100`, `rules-2k-x100`: 1,000 and 2,000 rules of 100 globs;
//! - `rules-10k`: 10,000 rules of one glob each;
//! - `limits`: 10,000 rules of 100 globs (1,000,000 globs, the limit);
//! - `prefixes`: 10,000 rules with 16,384 server prefixes (the limit);
//! - `categories`: 1,000 categories of 1,000 globs, 10,000 rules naming
//!   them;
//! - `errors`: 10,000 rules of 100 malformed globs (a million errors,
//!   each with its position).

use std::{
    fmt::Write as _,
    os::unix::process::ExitStatusExt,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::Parser;
use loupe_perf::median;
use serde::Serialize;

#[derive(Debug, Parser)]
#[command(name = "loupe-perf-policy")]
struct Args {
    /// Runs per scenario (the median time is reported).
    #[arg(long, default_value_t = 3)]
    repeat: u32,
    /// Scenarios to run (all by default).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "oversize,rules-100k,rules-1k-x100,rules-2k-x100,rules-10k,limits,prefixes,categories,errors"
    )]
    scenarios: Vec<String>,
    /// A run taking longer is killed and shown as `>T`.
    #[arg(long, default_value_t = 600)]
    timeout_s: u64,
    /// The `loupe` binary to time (default: the workspace's release build).
    #[arg(long)]
    loupe: Option<PathBuf>,
}

/// What a scenario's check must end with.
enum Expect {
    Valid,
    /// Exit 1, with this text in what it printed.
    Error(&'static str),
}

/// Short names from numbers: base 36.
fn b36(mut n: usize) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[n % 36]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).expect("ASCII")
}

/// `[[rules]]` number `r` with `fields` (TOML lines).
fn rule(out: &mut String, r: usize, fields: &str) {
    let action = ["block", "no-decrypt", "tcp-split"][r % 3];
    let _ = write!(
        out,
        "[[rules]]\nname = \"r{r}\"\naction = \"{action}\"\n{fields}\n"
    );
}

/// `n` rules of `globs` server-name globs each: every rule its own domain
/// (exact names, and every tenth glob a `*.` one); every 1000th rule also
/// covers the next rule's domain, which makes that rule shadowed (a
/// warning), so the analysis has real work.
fn glob_rules(n: usize, globs: usize, bad: bool) -> String {
    let mut out = String::with_capacity(n * globs * 12);
    for r in 0..n {
        let dom = b36(r);
        let mut list = String::from("sni = [");
        // Every 1000th rule swaps its last glob for the next rule's domain.
        let covers_next = r % 1000 == 999 && !bad;
        for g in 0..globs - usize::from(covers_next) {
            let host = b36(g);
            if bad {
                let _ = write!(list, "\"{host}..{dom}.e\",");
            } else if g.is_multiple_of(10) {
                let _ = write!(list, "\"*.{host}.{dom}.e\",");
            } else {
                let _ = write!(list, "\"{host}.{dom}.e\",");
            }
        }
        if covers_next {
            let _ = write!(list, "\"*.{}.e\",", b36(r + 1));
        }
        list.push(']');
        rule(&mut out, r, &list);
    }
    out
}

/// 10,000 rules with 16,384 server prefixes between them, IPv4 and IPv6.
fn prefix_rules() -> String {
    let mut out = String::new();
    let mut next = 0usize;
    let mut prefix = || {
        let i = next;
        next += 1;
        if i.is_multiple_of(2) {
            let a = std::net::Ipv4Addr::from(
                u32::from(std::net::Ipv4Addr::new(198, 18, 0, 0)) + i as u32,
            );
            format!("\"{a}/32\"")
        } else {
            format!("\"2001:2::{i:x}/128\"")
        }
    };
    for r in 0..10_000 {
        let count = if r < 6_384 { 2 } else { 1 };
        let list: Vec<String> = (0..count).map(|_| prefix()).collect();
        rule(&mut out, r, &format!("dst = [{}]", list.join(",")));
    }
    out
}

/// Writes the scenario's files into `dir`; the policy's path and what its
/// check must end with.
fn scenario(name: &str, dir: &Path) -> anyhow::Result<(PathBuf, Expect)> {
    let policy = dir.join(format!("{name}.toml"));
    let (text, expect) = match name {
        "oversize" => {
            let mut t = String::from("[[rules]]\nname = \"a\"\naction = \"block\"\n");
            let line = format!("# {}\n", "x".repeat(78));
            while t.len() < 17 << 20 {
                t.push_str(&line);
            }
            (t, Expect::Error("larger than"))
        }
        "rules-100k" => (
            glob_rules(100_000, 1, false),
            Expect::Error("at most 10000"),
        ),
        "rules-1k-x100" => (glob_rules(1_000, 100, false), Expect::Valid),
        "rules-2k-x100" => (glob_rules(2_000, 100, false), Expect::Valid),
        "rules-10k" => (glob_rules(10_000, 1, false), Expect::Valid),
        "limits" => (glob_rules(10_000, 100, false), Expect::Valid),
        "prefixes" => (prefix_rules(), Expect::Valid),
        "categories" => {
            let mut cats = String::new();
            for c in 0..1_000 {
                let dom = b36(c);
                let list: Vec<String> = (0..1_000)
                    .map(|g| format!("\"{}.{dom}.c\"", b36(g)))
                    .collect();
                let _ = writeln!(cats, "c{c} = [{}]", list.join(","));
            }
            std::fs::write(dir.join("cats.toml"), cats)?;
            let mut t = String::from("[policy]\ncategories = \"cats.toml\"\n");
            for r in 0..10_000 {
                let a = std::net::Ipv4Addr::from(
                    u32::from(std::net::Ipv4Addr::new(198, 18, 0, 0)) + r as u32,
                );
                rule(
                    &mut t,
                    r,
                    &format!("categories = [\"c{}\"]\ndst = [\"{a}/32\"]", r % 1_000),
                );
            }
            (t, Expect::Valid)
        }
        "errors" => (
            glob_rules(10_000, 100, true),
            Expect::Error("a label is empty"),
        ),
        other => anyhow::bail!("unknown scenario {other:?}"),
    };
    std::fs::write(&policy, text)?;
    Ok((policy, expect))
}

/// One run's figures.
struct Run {
    wall_s: f64,
    /// User and system time.
    cpu_s: f64,
    peak_kib: u64,
    /// `None` when it was killed at the timeout.
    status: Option<ExitStatus>,
}

fn cpu_seconds(u: &libc::rusage) -> f64 {
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

fn run_once(
    loupe: &Path,
    policy: &Path,
    err_file: &Path,
    timeout: Duration,
) -> anyhow::Result<Run> {
    let err = std::fs::File::create(err_file)?;
    let start = Instant::now();
    let child = Command::new(loupe)
        .args(["policy", "check"])
        .arg(policy)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .context("spawning loupe")?;
    let pid = child.id() as libc::pid_t;
    let run = |usage: &libc::rusage, status: Option<ExitStatus>| Run {
        wall_s: start.elapsed().as_secs_f64(),
        cpu_s: cpu_seconds(usage),
        peak_kib: usage.ru_maxrss as u64,
        status,
    };
    loop {
        let mut status = 0;
        // SAFETY: a zeroed rusage the call fills in; wait4(2) on our own
        // child, which std's Child never reaps (it is not waited on).
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: as above; both pointers live across the call.
        let rc = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if rc == pid {
            return Ok(run(&usage, Some(ExitStatus::from_raw(status))));
        }
        anyhow::ensure!(rc == 0, "wait4: {}", std::io::Error::last_os_error());
        if start.elapsed() > timeout {
            // SAFETY: kill(2) of our own child, not yet reaped.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            // SAFETY: reaps it; both pointers live across the call.
            unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
            return Ok(run(&usage, None));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[derive(Serialize)]
struct Row {
    scenario: String,
    file_mib: f64,
    /// Median wall seconds; `None` when a run timed out.
    median_s: Option<f64>,
    /// Median CPU seconds (user and system).
    median_cpu_s: Option<f64>,
    runs_s: Vec<f64>,
    peak_rss_mib: f64,
    outcome: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let loupe = args
        .loupe
        .clone()
        .unwrap_or_else(|| loupe_tests::workspace_bin("loupe"));
    let dir = std::env::temp_dir().join(format!("loupe-perf-policy-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let timeout = Duration::from_secs(args.timeout_s);
    let mut rows = Vec::new();
    println!(
        "{:<14} {:>9} {:>10} {:>10} {:>10}  {:<30}  runs (s)",
        "scenario", "file MiB", "median s", "cpu s", "peak MiB", "outcome"
    );
    for name in &args.scenarios {
        let (policy, expect) = scenario(name, &dir)?;
        let file_mib = std::fs::metadata(&policy)?.len() as f64 / (1 << 20) as f64;
        let err_file = dir.join("stderr.txt");
        let (mut runs, mut cpu, mut rss) = (Vec::new(), Vec::new(), 0u64);
        let mut outcome = String::new();
        let mut timed_out = false;
        for _ in 0..args.repeat {
            let run = run_once(&loupe, &policy, &err_file, timeout)?;
            runs.push(run.wall_s);
            cpu.push(run.cpu_s);
            rss = rss.max(run.peak_kib);
            let Some(status) = run.status else {
                timed_out = true;
                outcome = format!("killed after {} s", args.timeout_s);
                break;
            };
            let stderr = std::fs::read(&err_file)?;
            let stderr = String::from_utf8_lossy(&stderr);
            outcome = match (&expect, status.code()) {
                (Expect::Valid, Some(0)) => "valid".into(),
                (Expect::Error(want), Some(1)) if stderr.contains(want) => {
                    format!("refused: {want}")
                }
                (_, code) => {
                    let tail: String = stderr.chars().take(300).collect();
                    anyhow::bail!("{name}: unexpected outcome (exit {code:?}): {tail}");
                }
            };
        }
        let median_s = (!timed_out).then(|| median(runs.clone()));
        let median_cpu_s = (!timed_out).then(|| median(cpu));
        let shown =
            |m: Option<f64>| m.map_or(format!(">{}", args.timeout_s), |m| format!("{m:.3}"));
        println!(
            "{:<14} {:>9.1} {:>10} {:>10} {:>10.0}  {:<30}  {}",
            name,
            file_mib,
            shown(median_s),
            shown(median_cpu_s),
            rss as f64 / 1024.0,
            outcome,
            runs.iter()
                .map(|r| format!("{r:.3}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        rows.push(Row {
            scenario: name.clone(),
            file_mib,
            median_s,
            median_cpu_s,
            runs_s: runs,
            peak_rss_mib: rss as f64 / 1024.0,
            outcome,
        });
        let _ = std::fs::remove_file(&policy);
    }
    let _ = std::fs::remove_dir_all(&dir);
    loupe_perf::write_results("policy.json", &rows)?;
    Ok(())
}
