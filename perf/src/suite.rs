//! The scenarios of `perf/run all` and how one is run: each benchmark
//! binary as its own process group, its output in a log beside its JSON,
//! under a deadline. A scenario that exits non-zero, outlives its
//! deadline or writes no readable results is failed, and the report shows
//! it as failed, never as zeros.

use std::{
    io::Read,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

/// One benchmark of the suite.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub name: &'static str,
    /// The benchmark binary (beside `loupe-perf-all`), or any program.
    pub program: &'static str,
    /// Arguments of the full run; `{dir}` is the run's directory.
    pub args: &'static [&'static str],
    /// Arguments of `--quick`.
    pub quick_args: &'static [&'static str],
    /// The JSON files it writes into the run's directory.
    pub results: &'static [&'static str],
    /// Killed (and failed) after this long: quick, full.
    pub deadline: (Duration, Duration),
}

const MIN: u64 = 60;

/// Every scenario, in the order they run. The quick arguments are picked so
/// the whole `--quick` run stays within about five minutes on two vCPUs.
pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "wire-per-core",
        program: "loupe-perf",
        args: &["--per-core", "--json", "{dir}/wire-per-core.json"],
        quick_args: &[
            "--per-core",
            "--seconds",
            "2",
            "--repeat",
            "1",
            "--paths",
            "bridge_offload_off,xdp_userspace,xdp_split,kernel_relay",
            "--json",
            "{dir}/wire-per-core.json",
        ],
        results: &["wire-per-core.json"],
        deadline: (Duration::from_secs(3 * MIN), Duration::from_secs(30 * MIN)),
    },
    Scenario {
        name: "wire-shared",
        program: "loupe-perf",
        args: &["--json", "{dir}/wire-shared.json"],
        quick_args: &[
            "--seconds",
            "1",
            "--repeat",
            "1",
            "--paths",
            "bridge_offload_off,xdp_split,kernel_relay",
            "--json",
            "{dir}/wire-shared.json",
        ],
        results: &["wire-shared.json"],
        deadline: (Duration::from_secs(2 * MIN), Duration::from_secs(30 * MIN)),
    },
    Scenario {
        name: "split-impaired",
        program: "loupe-perf",
        args: &["--impaired-mib", "256", "--repeat", "3"],
        quick_args: &["--impaired-mib", "16", "--repeat", "1"],
        results: &["split-impaired.json"],
        deadline: (Duration::from_secs(2 * MIN), Duration::from_secs(30 * MIN)),
    },
    Scenario {
        name: "split-clean",
        program: "loupe-perf",
        args: &["--impaired-mib", "1024", "--repeat", "1", "--clean"],
        quick_args: &["--impaired-mib", "64", "--repeat", "1", "--clean"],
        results: &["split-clean.json"],
        deadline: (Duration::from_secs(2 * MIN), Duration::from_secs(30 * MIN)),
    },
    Scenario {
        name: "split-memory",
        program: "loupe-perf",
        args: &["--split-memory", "10000"],
        quick_args: &["--split-memory", "1000"],
        results: &["split-memory.json"],
        deadline: (Duration::from_secs(2 * MIN), Duration::from_secs(20 * MIN)),
    },
    Scenario {
        name: "hsm",
        program: "loupe-perf-hsm",
        args: &[],
        quick_args: &[
            "--seconds",
            "1",
            "--repeat",
            "1",
            "--threads",
            "1,2",
            "--batches",
            "1,8",
            "--keys",
            "ec-p256",
        ],
        results: &["hsm.json"],
        deadline: (Duration::from_secs(2 * MIN), Duration::from_secs(30 * MIN)),
    },
    Scenario {
        name: "decide",
        program: "loupe-perf-decide",
        args: &[],
        quick_args: &["--connections", "40", "--rounds", "1", "--applies", "5"],
        results: &["decide.json"],
        deadline: (Duration::from_secs(2 * MIN), Duration::from_secs(30 * MIN)),
    },
    // The same with a core of its own: the engine (one worker, polling
    // after its work while the core is its own, as a dataplane that owns
    // its core is run) and the control daemon on CPU 0, the endpoints on
    // the last.
    Scenario {
        name: "decide-per-core",
        program: "loupe-perf-decide",
        args: &["--per-core", "--json", "{dir}/decide-per-core.json"],
        quick_args: &[
            "--per-core",
            "--engine-arg=--idle-spin-us",
            "--engine-arg=5000",
            "--connections",
            "40",
            "--rounds",
            "1",
            "--applies",
            "2",
            "--json",
            "{dir}/decide-per-core.json",
        ],
        results: &["decide-per-core.json"],
        deadline: (Duration::from_secs(2 * MIN), Duration::from_secs(30 * MIN)),
    },
    Scenario {
        name: "tls",
        program: "loupe-perf-tls",
        args: &[],
        quick_args: &[
            "--seconds",
            "1",
            "--repeat",
            "1",
            "--idle",
            "200",
            "--round-trips",
            "1000",
            "--names",
            "500",
        ],
        results: &["tls.json"],
        deadline: (Duration::from_secs(3 * MIN), Duration::from_secs(40 * MIN)),
    },
    Scenario {
        name: "inbound",
        program: "loupe-perf-inbound",
        args: &[],
        quick_args: &[
            "--seconds",
            "1",
            "--repeat",
            "1",
            "--threads",
            "1,2",
            "--batches",
            "8",
            "--keys",
            "ec-p256",
        ],
        results: &["inbound.json"],
        deadline: (Duration::from_secs(2 * MIN), Duration::from_secs(40 * MIN)),
    },
    Scenario {
        name: "policy-check",
        program: "loupe-perf-policy",
        args: &[],
        quick_args: &["--repeat", "1", "--scenarios", "rules-10k,limits,errors"],
        results: &["policy.json"],
        deadline: (Duration::from_secs(2 * MIN), Duration::from_secs(60 * MIN)),
    },
];

/// How a scenario ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Status {
    Passed,
    /// Exited non-zero or by a signal; the log's last lines say why.
    Failed {
        exit: String,
        tail: String,
    },
    /// Outlived its deadline and was killed.
    TimedOut {
        after_s: u64,
        tail: String,
    },
    /// The runner was told to stop (SIGINT, SIGTERM, SIGHUP) and killed it.
    Interrupted {
        tail: String,
    },
    /// Exited zero but a results file is missing or not JSON.
    NoResults {
        missing: Vec<String>,
    },
    /// Could not be started at all.
    NotStarted {
        error: String,
    },
}

impl Status {
    pub fn passed(&self) -> bool {
        matches!(self, Status::Passed)
    }

    /// One line for the summary table.
    pub fn describe(&self) -> String {
        match self {
            Status::Passed => "passed".into(),
            Status::Failed { exit, tail } => format!("FAILED ({exit}): {}", last_line(tail)),
            Status::TimedOut { after_s, tail } => {
                format!("FAILED (killed after {after_s} s): {}", last_line(tail))
            }
            Status::Interrupted { tail } => {
                format!("FAILED (interrupted): {}", last_line(tail))
            }
            Status::NoResults { missing } => {
                format!("FAILED (no results: {})", missing.join(", "))
            }
            Status::NotStarted { error } => format!("FAILED (not started: {error})"),
        }
    }
}

fn last_line(s: &str) -> String {
    let l = s.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
    // Keep the Markdown table one row per scenario.
    l.replace('|', "\\|").chars().take(200).collect()
}

/// What one scenario did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Outcome {
    pub name: String,
    pub command: String,
    pub seconds: f64,
    /// The log's file name in the run's directory.
    pub log: String,
    #[serde(flatten)]
    pub status: Status,
}

/// `{dir}` in each argument replaced by the run's directory.
pub fn expand(args: &[&str], dir: &Path) -> Vec<String> {
    let d = dir.to_string_lossy();
    args.iter().map(|a| a.replace("{dir}", &d)).collect()
}

/// Runs `program args` with `env_dir` as the results directory, its
/// stdout and stderr into `dir/<name>.log`, in its own process group; the
/// whole group is killed at the deadline, when `stop` is set, and after
/// the scenario exits (what it left running fails it), so nothing it
/// started lingers.
pub fn run(
    name: &str,
    program: &Path,
    args: &[String],
    dir: &Path,
    results: &[&str],
    deadline: Duration,
    stop: &AtomicBool,
) -> Outcome {
    let log_name = format!("{name}.log");
    let log_path = dir.join(&log_name);
    let command = std::iter::once(program.display().to_string())
        .chain(args.iter().cloned())
        .collect::<Vec<_>>()
        .join(" ");
    let start = Instant::now();
    let status =
        spawn_and_wait(program, args, dir, &log_path, deadline, stop).unwrap_or_else(|e| {
            Status::NotStarted {
                error: format!("{e:#}"),
            }
        });
    let status = match status {
        Status::Passed => {
            let missing: Vec<String> = results
                .iter()
                .filter(|f| !readable_json(&dir.join(f)))
                .map(|f| f.to_string())
                .collect();
            if missing.is_empty() {
                Status::Passed
            } else {
                Status::NoResults { missing }
            }
        }
        other => other,
    };
    Outcome {
        name: name.into(),
        command,
        seconds: start.elapsed().as_secs_f64(),
        log: log_name,
        status,
    }
}

fn readable_json(p: &Path) -> bool {
    std::fs::read(p)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some()
}

fn spawn_and_wait(
    program: &Path,
    args: &[String],
    dir: &Path,
    log_path: &Path,
    deadline: Duration,
    stop: &AtomicBool,
) -> anyhow::Result<Status> {
    use anyhow::Context;
    let log = std::fs::File::create(log_path)
        .with_context(|| format!("create {}", log_path.display()))?;
    let mut child = Command::new(program)
        .args(args)
        .env(crate::RESULTS_ENV, dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .with_context(|| format!("spawn {}", program.display()))?;
    let pgid = child.id() as i32;
    let start = Instant::now();
    let end = loop {
        match child.try_wait() {
            Ok(Some(st)) => break End::Exited(st),
            Ok(None) => {}
            Err(e) => break End::Lost(e),
        }
        if stop.load(Ordering::SeqCst) {
            break End::Interrupted;
        }
        if start.elapsed() >= deadline {
            break End::TimedOut;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // Whatever the end, nothing the scenario started outlives it.
    let leftover = kill_group(pgid, &mut child);
    let tail = tail_of(log_path, 2000);
    Ok(match end {
        End::Exited(st) if st.success() && !leftover => Status::Passed,
        End::Exited(st) if st.success() => Status::Failed {
            exit: "exited 0 but left processes running (killed)".into(),
            tail,
        },
        End::Exited(st) => Status::Failed {
            exit: st.to_string(),
            tail,
        },
        End::Lost(e) => Status::Failed {
            exit: format!("waiting for it failed: {e}"),
            tail,
        },
        End::TimedOut => Status::TimedOut {
            after_s: deadline.as_secs(),
            tail,
        },
        End::Interrupted => Status::Interrupted { tail },
    })
}

/// How the wait for a scenario ended.
enum End {
    Exited(std::process::ExitStatus),
    Lost(std::io::Error),
    TimedOut,
    Interrupted,
}

/// Whether any process of the group still exists (a zombie counts until
/// it is reaped).
fn group_alive(pgid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks whether the group exists.
    unsafe { libc::kill(-pgid, 0) == 0 }
}

/// Waits up to `limit` for the group to be gone, reaping the leader.
fn group_gone_within(pgid: i32, child: &mut std::process::Child, limit: Duration) -> bool {
    let until = Instant::now() + limit;
    loop {
        let _ = child.try_wait();
        if !group_alive(pgid) {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Ends the scenario's process group: a moment for members that are
/// exiting anyway, then SIGTERM, then SIGKILL, each waited on; reaps the
/// leader. Returns whether anything had to be signalled.
fn kill_group(pgid: i32, child: &mut std::process::Child) -> bool {
    if group_gone_within(pgid, child, Duration::from_secs(2)) {
        return false;
    }
    for sig in [libc::SIGTERM, libc::SIGKILL] {
        // SAFETY: -pgid names the process group this runner created for
        // the scenario (process_group(0) made the child its leader).
        unsafe { libc::kill(-pgid, sig) };
        if group_gone_within(pgid, child, Duration::from_secs(5)) {
            break;
        }
    }
    let _ = child.wait();
    true
}

/// The last `max` bytes of a file, as text.
pub fn tail_of(path: &Path, max: usize) -> String {
    let mut buf = Vec::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_end(&mut buf);
    }
    let from = buf.len().saturating_sub(max);
    String::from_utf8_lossy(&buf[from..]).into_owned()
}

/// The directory of a run: `perf/results/<UTC time>`.
pub fn run_dir(root: &Path) -> PathBuf {
    root.join(utc_stamp(std::time::SystemTime::now()))
}

/// `YYYY-MM-DDTHH-MM-SSZ` (a file name, so no colons).
pub fn utc_stamp(t: std::time::SystemTime) -> String {
    // `2026-11-27T04:00:00.123Z` without the milliseconds.
    let full = loupe_hsm::audit::rfc3339(t);
    format!("{}Z", full[..19].replace(':', "-"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("loupe-suite-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// `sh -c script` run as scenario `name` into `d`.
    fn run_sh(name: &str, d: &Path, script: &str, results: &[&str], secs: u64) -> Outcome {
        let args = vec!["-c".to_string(), script.to_string()];
        let stop = AtomicBool::new(false);
        run(
            name,
            Path::new("/bin/sh"),
            &args,
            d,
            results,
            Duration::from_secs(secs),
            &stop,
        )
    }

    #[test]
    fn a_scenario_that_writes_its_results_passes_and_sees_the_run_directory() {
        let d = tmp("pass");
        let script = "echo working; echo '{\"x\": 1}' > \"$LOUPE_PERF_RESULTS/ok.json\"";
        let o = run_sh("ok", &d, script, &["ok.json"], 60);
        assert_eq!(o.status, Status::Passed, "{o:?}");
        assert!(std::fs::read_to_string(d.join("ok.log"))
            .unwrap()
            .contains("working"));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_non_zero_exit_is_failed_with_the_logs_last_line() {
        let d = tmp("fail");
        let script =
            "echo '{}' > \"$LOUPE_PERF_RESULTS/bad.json\"; echo 'iperf3 refused' >&2; exit 3";
        let o = run_sh("bad", &d, script, &["bad.json"], 60);
        match &o.status {
            Status::Failed { exit, tail } => {
                assert!(exit.contains('3'), "{exit}");
                assert!(tail.contains("iperf3 refused"));
            }
            s => panic!("{s:?}"),
        }
        assert!(o.status.describe().starts_with("FAILED"));
        assert!(o.status.describe().contains("iperf3 refused"));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_pass_without_readable_results_is_failed() {
        let d = tmp("nores");
        let script = "echo 'not json' > \"$LOUPE_PERF_RESULTS/a.json\"";
        let o = run_sh("quiet", &d, script, &["a.json", "b.json"], 60);
        assert_eq!(
            o.status,
            Status::NoResults {
                missing: vec!["a.json".into(), "b.json".into()]
            }
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_scenario_past_its_deadline_is_killed_with_what_it_started() {
        let d = tmp("hang");
        let pidfile = d.join("grandchild.pid");
        let script = format!("sleep 600 & echo $! > {}; wait", pidfile.display());
        let start = Instant::now();
        let o = run_sh("hang", &d, &script, &[], 1);
        assert!(
            matches!(o.status, Status::TimedOut { after_s: 1, .. }),
            "{o:?}"
        );
        assert!(start.elapsed() < Duration::from_secs(30));
        // The grandchild was in the group: gone (or a zombie of init's,
        // reaped shortly).
        let pid = pid_in(&pidfile);
        assert!(
            gone(pid),
            "the scenario's background process {pid} outlived it"
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    /// Whether `pid` is gone (or a zombie about to be reaped), waited for
    /// on a generous deadline.
    fn gone(pid: i32) -> bool {
        (0..200).any(|_| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let dead = stat.is_empty() || stat.split(' ').nth(2) == Some("Z");
            if !dead {
                std::thread::sleep(Duration::from_millis(50));
            }
            dead
        })
    }

    fn pid_in(file: &Path) -> i32 {
        std::fs::read_to_string(file)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    #[test]
    fn a_pass_that_leaves_a_process_running_is_failed_and_the_process_killed() {
        let d = tmp("leak");
        let pidfile = d.join("left.pid");
        let script = format!(
            "echo '{{}}' > \"$LOUPE_PERF_RESULTS/l.json\"; sleep 600 & echo $! > {}",
            pidfile.display()
        );
        let o = run_sh("leak", &d, &script, &["l.json"], 60);
        match &o.status {
            Status::Failed { exit, .. } => assert!(exit.contains("left processes"), "{exit}"),
            s => panic!("{s:?}"),
        }
        let pid = pid_in(&pidfile);
        assert!(gone(pid), "the scenario's leftover {pid} outlived it");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_stop_request_kills_the_running_scenario() {
        let d = tmp("stop");
        let pidfile = d.join("child.pid");
        let script = format!("sleep 600 & echo $! > {}; wait", pidfile.display());
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let setter = {
            let (stop, pidfile) = (stop.clone(), pidfile.clone());
            std::thread::spawn(move || {
                // Once the scenario is under way.
                while !pidfile.exists() {
                    std::thread::sleep(Duration::from_millis(20));
                }
                stop.store(true, Ordering::SeqCst);
            })
        };
        let start = Instant::now();
        let o = run(
            "stopped",
            Path::new("/bin/sh"),
            &["-c".to_string(), script],
            &d,
            &[],
            Duration::from_secs(600),
            &stop,
        );
        setter.join().unwrap();
        assert!(matches!(o.status, Status::Interrupted { .. }), "{o:?}");
        assert!(o.status.describe().starts_with("FAILED (interrupted)"));
        assert!(start.elapsed() < Duration::from_secs(60));
        let pid = pid_in(&pidfile);
        assert!(gone(pid), "the scenario's process {pid} outlived the stop");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_missing_program_is_not_started() {
        let d = tmp("missing");
        let o = run(
            "none",
            Path::new("/nonexistent/loupe-perf-x"),
            &[],
            &d,
            &[],
            Duration::from_secs(5),
            &AtomicBool::new(false),
        );
        assert!(
            matches!(&o.status, Status::NotStarted { error } if error.contains("loupe-perf-x")),
            "{o:?}"
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn stamps_are_utc_times_without_colons() {
        let at = |s: u64| utc_stamp(std::time::UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00-00-00Z");
        // 2026-12-02 04:42:58 UTC.
        assert_eq!(at(1_796_186_578), "2026-12-02T04-42-58Z");
    }

    #[test]
    fn every_scenario_names_its_results_and_its_dir_placeholders_expand() {
        for s in SCENARIOS {
            assert!(!s.results.is_empty(), "{}", s.name);
            let a = expand(s.args, Path::new("/r"));
            assert!(a.iter().all(|x| !x.contains("{dir}")));
        }
    }
}
