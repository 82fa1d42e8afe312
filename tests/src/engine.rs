//! The engine binary running in a harness's engine namespace.

use std::{
    path::PathBuf,
    process::{ExitStatus, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::Context;
use loupe_dataplane::stats::StatsReport;

use crate::{
    harness::{Harness, INSIDE_IF, OUTSIDE_IF},
    proc::Proc,
    wait::wait_until,
    workspace_bin,
};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// How long start-up may take on a loaded 2-core machine.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Engine {
    proc: Proc,
    pub stats_path: PathBuf,
}

impl Engine {
    /// Start `loupe-dataplane` on inside/outside with `extra` arguments and
    /// wait until it reports ready (first stats file written).
    pub fn start(h: &Harness, extra: &[&str]) -> anyhow::Result<Engine> {
        Engine::start_with_env(h, extra, &[])
    }

    /// [`Engine::start`] with extra environment variables for the engine
    /// (e.g. the SoftHSM configuration).
    pub fn start_with_env(
        h: &Harness,
        extra: &[&str],
        env: &[(&str, &std::ffi::OsStr)],
    ) -> anyhow::Result<Engine> {
        Engine::start_wrapped(h, &[], extra, env)
    }

    /// [`Engine::start_with_env`] under a wrapper command (e.g. `setpriv`
    /// with a reduced capability set): `wrapper... loupe-dataplane ...`.
    pub fn start_wrapped(
        h: &Harness,
        wrapper: &[&str],
        extra: &[&str],
        env: &[(&str, &std::ffi::OsStr)],
    ) -> anyhow::Result<Engine> {
        let stats_path = h.dir.join(format!(
            "engine-{}.json",
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let bin = workspace_bin("loupe-dataplane");
        let mut cmd = h
            .engine
            .command_under(wrapper, bin.to_str().context("binary path")?);
        cmd.args([
            "--inside",
            INSIDE_IF,
            "--outside",
            OUTSIDE_IF,
            "--stats-interval-ms",
            "100",
        ])
        .arg("--stats-file")
        .arg(&stats_path)
        .args(extra)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let child = cmd.spawn().context("spawning loupe-dataplane")?;
        let mut engine = Engine {
            proc: Proc::new("loupe-dataplane", child),
            stats_path,
        };
        let path = engine.stats_path.clone();
        engine
            .proc
            .wait_ready(
                "the engine to report ready",
                START_TIMEOUT,
                || match StatsReport::read(&path) {
                    Ok(r) if r.state == "running" => Ok(true),
                    Ok(r) => Err(format!("state {}", r.state)),
                    Err(e) => Err(e.to_string()),
                },
            )?;
        Ok(engine)
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn stats(&self) -> anyhow::Result<StatsReport> {
        Ok(StatsReport::read(&self.stats_path)?)
    }

    /// Wait until the stats report satisfies `f`.
    pub fn wait_stats<T>(
        &self,
        what: &str,
        timeout: Duration,
        f: impl Fn(&StatsReport) -> Option<T>,
    ) -> anyhow::Result<T> {
        wait_until(what, timeout, || {
            let r = self.stats().map_err(|e| e.to_string())?;
            match f(&r) {
                Some(v) => Ok(Some(v)),
                None => Err(summary(&r)),
            }
        })
    }

    /// Waits until a connection the engine could not follow from its
    /// start was ended as one it cannot inspect (`--mid-flow drop`); an
    /// error if any connection was split or passed instead.
    pub fn wait_uninspectable_reset(&self) -> anyhow::Result<()> {
        let s = self.wait_stats("the reset counted", Duration::from_secs(30), |r| {
            let s = r.split_total();
            (s.uninspectable >= 1).then_some(s)
        })?;
        anyhow::ensure!(
            (s.split, s.passthrough) == (0, 0),
            "split or passed as well: {s:?}"
        );
        Ok(())
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.proc.try_wait().is_none()
    }

    /// SIGTERM and wait; returns (status, exited in time, stdout, stderr).
    pub fn stop(self) -> (ExitStatus, bool, String, String) {
        self.proc.stop(Duration::from_secs(30))
    }

    /// Wait for the engine to exit on its own (after a signal sent by the
    /// test); SIGKILL after `timeout`.
    pub fn wait_exit(mut self, timeout: Duration) -> (ExitStatus, bool, String, String) {
        let (st, clean) = self.proc.wait_timeout(timeout);
        let (out, err) = self.proc.take_output();
        (st, clean, out, err)
    }

    /// SIGKILL and reap: no chance to clean up.
    pub fn kill(mut self) -> ExitStatus {
        self.proc.signal(libc::SIGKILL);
        self.proc.wait_timeout(Duration::from_secs(30)).0
    }
}

/// The XDP counters and worker totals in one line, for failure messages.
pub fn summary(r: &StatsReport) -> String {
    let xdp: Vec<String> = r
        .xdp
        .iter()
        .filter(|(_, c)| c.packets > 0)
        .map(|(k, c)| format!("{k}={}", c.packets))
        .collect();
    let sp = r.split_total();
    let split = if sp == Default::default() {
        String::new()
    } else {
        format!(" split[{sp:?}]")
    };
    format!(
        "xdp[{}] workers rx={} cross={} flows={}{split}",
        xdp.join(" "),
        r.worker_sum(|c| c.rx_inside.packets + c.rx_outside.packets),
        r.worker_sum(|c| c.cross_out),
        r.workers.iter().map(|w| w.flows_active).sum::<usize>()
    )
}
