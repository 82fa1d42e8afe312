//! The control daemon (`loupe daemon`) in a harness's engine namespace,
//! beside a dataplane started with `--control-socket`, and the `loupe` CLI
//! talking to it.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Output, Stdio},
    time::Duration,
};

use anyhow::Context;
use serde_json::Value;

use crate::{netns::Netns, proc::Proc, wait::wait_until, workspace_bin, Harness};

/// Where the metrics are served (in the engine namespace's loopback).
pub const METRICS: &str = "127.0.0.1:9464";

pub struct Control {
    proc: Option<Proc>,
    /// The daemon's CLI socket.
    pub socket: PathBuf,
    /// The dataplane's control socket.
    pub dataplane: PathBuf,
    pub state_dir: PathBuf,
    pub log: PathBuf,
    /// The daemon's stdout and stderr, appended across restarts.
    pub output: PathBuf,
    policy: Option<PathBuf>,
    extra: Vec<String>,
    /// A command the daemon runs under (e.g. `setpriv` to another user).
    wrapper: Vec<String>,
    /// The harness's engine namespace (not owned: the harness removes it).
    engine: Netns,
}

/// The dataplane socket a test's engine serves: pass
/// `["--control-socket", <this>]` to `Engine::start`.
pub fn dataplane_socket(h: &Harness) -> PathBuf {
    h.dir.join("dataplane.sock")
}

impl Control {
    /// Starts the daemon for the dataplane at `dataplane` with `policy`
    /// (if any) and waits until it serves its socket.
    pub fn start(
        h: &Harness,
        dataplane: &Path,
        policy: Option<&Path>,
        extra: &[&str],
    ) -> anyhow::Result<Control> {
        Control::start_in(h, &h.dir, &[], dataplane, policy, extra)
    }

    /// [`Control::start`] with its sockets, state and log under `dir`,
    /// run under `wrapper` (e.g. `setpriv` to another user).
    pub fn start_in(
        h: &Harness,
        dir: &Path,
        wrapper: &[&str],
        dataplane: &Path,
        policy: Option<&Path>,
        extra: &[&str],
    ) -> anyhow::Result<Control> {
        let mut c = Control {
            proc: None,
            socket: dir.join("control.sock"),
            dataplane: dataplane.to_path_buf(),
            state_dir: dir.join("control-state"),
            log: dir.join("log").join("flows.jsonl"),
            output: h.dir.join("control.out"),
            policy: policy.map(Path::to_path_buf),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            wrapper: wrapper.iter().map(|s| s.to_string()).collect(),
            engine: Netns::existing(&h.engine.name, true),
        };
        c.spawn()?;
        Ok(c)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let bin = workspace_bin("loupe");
        let out = File::options()
            .create(true)
            .append(true)
            .open(&self.output)?;
        let mut cmd = self
            .engine
            .command_under(&self.wrapper, bin.to_str().context("path")?);
        cmd.arg("--socket")
            .arg(&self.socket)
            .arg("daemon")
            .arg("--dataplane")
            .arg(&self.dataplane)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--log")
            .arg(&self.log)
            .args(["--metrics", METRICS]);
        if let Some(p) = &self.policy {
            cmd.arg("--policy").arg(p);
        }
        cmd.args(&self.extra)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = cmd.spawn().context("spawning loupe daemon")?;
        let mut proc = Proc::new("loupe daemon", child);
        let socket = self.socket.clone();
        let output = self.output.clone();
        proc.wait_ready(
            "the control daemon to serve",
            Duration::from_secs(60),
            || {
                if socket.exists() {
                    Ok(true)
                } else {
                    Err(std::fs::read_to_string(&output).unwrap_or_default())
                }
            },
        )?;
        self.proc = Some(proc);
        Ok(())
    }

    /// Kills the daemon (SIGKILL: no clean-up) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.signal(libc::SIGKILL);
            p.wait_timeout(Duration::from_secs(30));
        }
    }

    /// Starts it again with the same settings and state directory.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn()
    }

    /// SIGTERM; returns whether it exited cleanly in time.
    pub fn stop(&mut self) -> bool {
        match self.proc.take() {
            Some(p) => {
                let (st, clean, _, _) = p.stop(Duration::from_secs(30));
                clean && st.success()
            }
            None => true,
        }
    }

    /// `loupe --socket <daemon> ARGS` in the engine namespace.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<Output> {
        Ok(self.cli_command(args)?.output()?)
    }

    /// [`Control::cli`] with a standard output whose reader is gone
    /// (as `loupe ARGS | head -c 0`).
    pub fn cli_closed_stdout(&self, args: &[&str]) -> anyhow::Result<Output> {
        let (reader, writer) = std::io::pipe()?;
        drop(reader);
        let mut cmd = self.cli_command(args)?;
        Ok(cmd.stdout(writer).stderr(Stdio::piped()).output()?)
    }

    fn cli_command(&self, args: &[&str]) -> anyhow::Result<std::process::Command> {
        let bin = workspace_bin("loupe");
        let mut cmd = self.engine.command(bin.to_str().context("path")?);
        cmd.arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null());
        Ok(cmd)
    }

    /// `loupe status --json`.
    pub fn status(&self) -> anyhow::Result<Value> {
        let out = self.cli(&["status", "--json"])?;
        anyhow::ensure!(
            out.status.success(),
            "loupe status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// The daemon's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// Waits until the daemon reaches the dataplane and the dataplane runs
    /// the daemon's policy; returns that policy's version.
    pub fn wait_in_sync(&self) -> anyhow::Result<u64> {
        self.wait_in_sync_within(Duration::from_secs(60))
    }

    /// [`Control::wait_in_sync`] with a deadline of `timeout`.
    pub fn wait_in_sync_within(&self, timeout: Duration) -> anyhow::Result<u64> {
        self.wait_control("control and dataplane in sync", timeout, |c| {
            if c["dataplane_connected"] == true && c["in_sync"] == true {
                c["desired_version"].as_u64()
            } else {
                None
            }
        })
    }

    /// Waits until the daemon reaches the dataplane, whatever either
    /// runs.
    pub fn wait_connected(&self) -> anyhow::Result<()> {
        self.wait_control(
            "the daemon at the dataplane",
            Duration::from_secs(60),
            |c| (c["dataplane_connected"] == true).then_some(()),
        )
    }

    /// Waits until the `control` part of `loupe status` satisfies `f`.
    fn wait_control<T>(
        &self,
        what: &str,
        timeout: Duration,
        f: impl Fn(&Value) -> Option<T>,
    ) -> anyhow::Result<T> {
        wait_until(what, timeout, || {
            let s = self.status().map_err(|e| e.to_string())?;
            let c = &s["control"];
            match f(c) {
                Some(v) => Ok(Some(v)),
                None => Err(c.to_string()),
            }
        })
    }

    /// The flow log's records so far (the live file).
    pub fn records(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits for a record that satisfies `f`.
    pub fn wait_record(&self, what: &str, f: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
        wait_until(what, Duration::from_secs(60), || {
            let all = self.records();
            match all.iter().find(|r| f(r)) {
                Some(r) => Ok(Some(r.clone())),
                None => Err(format!(
                    "{} records: {:?}",
                    all.len(),
                    all.iter().rev().take(5).collect::<Vec<_>>()
                )),
            }
        })
    }

    /// The metrics page, scraped in the engine namespace.
    pub fn metrics(&self) -> anyhow::Result<String> {
        let out = self
            .engine
            .command("curl")
            .args(["-sS", "--max-time", "30"])
            .arg(format!("http://{METRICS}/metrics"))
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.kill();
    }
}
