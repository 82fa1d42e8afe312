//! Child processes owned by a test: stopped by their PID when dropped.

use std::{
    io::Read,
    process::{Child, ExitStatus},
    time::{Duration, Instant},
};

pub struct Proc {
    pub name: String,
    child: Option<Child>,
}

impl Proc {
    pub fn new(name: impl Into<String>, child: Child) -> Self {
        Proc {
            name: name.into(),
            child: Some(child),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    pub fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("process already reaped")
    }

    /// `Some(status)` once it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: signalling our own child by the PID we started it with;
            // it is not reaped yet, so the PID cannot have been reused.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    /// Wait for exit up to `timeout`; SIGKILL after that.
    pub fn wait_timeout(&mut self, timeout: Duration) -> (ExitStatus, bool) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_wait() {
                return (st, true);
            }
            if Instant::now() >= deadline {
                self.signal(libc::SIGKILL);
                let st = self.child_mut().wait().expect("wait after SIGKILL");
                return (st, false);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Wait until `ready` answers true (or, with `Err`, the state so far);
    /// fails with the process's output if it exits first.
    pub fn wait_ready(
        &mut self,
        what: &str,
        timeout: Duration,
        mut ready: impl FnMut() -> Result<bool, String>,
    ) -> anyhow::Result<()> {
        let exited = crate::wait_until(what, timeout, || {
            if let Some(st) = self.try_wait() {
                return Ok(Some(Some(st)));
            }
            Ok(ready()?.then_some(None))
        })?;
        if let Some(st) = exited {
            let (out, err) = self.take_output();
            anyhow::bail!("{} exited during start-up ({st}): {err}{out}", self.name);
        }
        Ok(())
    }

    /// SIGTERM, then wait; returns status, stdout and stderr (if piped).
    pub fn stop(mut self, timeout: Duration) -> (ExitStatus, bool, String, String) {
        self.signal(libc::SIGTERM);
        let (st, clean) = self.wait_timeout(timeout);
        let (out, err) = self.take_output();
        (st, clean, out, err)
    }

    pub fn take_output(&mut self) -> (String, String) {
        let mut out = String::new();
        let mut err = String::new();
        if let Some(c) = self.child.as_mut() {
            if let Some(mut o) = c.stdout.take() {
                let _ = o.read_to_string(&mut out);
            }
            if let Some(mut e) = c.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
        }
        (out, err)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if c.try_wait().ok().flatten().is_none() {
                // SAFETY: our own unreaped child, by its PID.
                unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
                let deadline = Instant::now() + Duration::from_secs(10);
                while c.try_wait().ok().flatten().is_none() {
                    if Instant::now() >= deadline {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
}

/// Resident memory of a process (VmRSS), KiB; 0 if it cannot be read.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}
