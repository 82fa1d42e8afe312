//! Named network namespaces (`ip netns`), and running code inside one.

use std::{
    fs::File,
    os::fd::AsRawFd,
    process::{Command, Output},
};

use anyhow::{bail, Context};

/// Run a command and fail with its stderr unless it succeeds.
pub fn run(cmd: &mut Command) -> anyhow::Result<Output> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(out)
}

pub fn ip(args: &[&str]) -> anyhow::Result<Output> {
    run(Command::new("ip").args(args))
}

/// A network namespace this process created; deleted on drop unless kept.
pub struct Netns {
    pub name: String,
    keep: bool,
}

impl Netns {
    pub fn create(name: &str) -> anyhow::Result<Netns> {
        ip(&["netns", "add", name])?;
        let ns = Netns {
            name: name.into(),
            keep: false,
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Adopt an existing namespace (for `loupe-harness down`).
    pub fn existing(name: &str, keep: bool) -> Netns {
        Netns {
            name: name.into(),
            keep,
        }
    }

    /// Leave the namespace in place when dropped.
    pub fn keep(&mut self) {
        self.keep = true;
    }

    pub fn ip(&self, args: &[&str]) -> anyhow::Result<Output> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// `ip netns exec NAME program args...` as a Command.
    pub fn command(&self, program: &str) -> Command {
        self.command_under::<&str>(&[], program)
    }

    /// [`Netns::command`] run under `wrapper` (e.g. `setpriv ... --`):
    /// `ip netns exec NAME wrapper... program`.
    pub fn command_under<S: AsRef<std::ffi::OsStr>>(
        &self,
        wrapper: &[S],
        program: &str,
    ) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name])
            .args(wrapper)
            .arg(program);
        c
    }

    pub fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<Output> {
        run(self.command(program).args(args))
    }

    /// Run `f` on a thread that has entered this namespace. Sockets created
    /// there stay in the namespace wherever they are used afterwards.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
        let file = File::open(format!("/run/netns/{}", self.name))
            .with_context(|| format!("cannot open namespace {}", self.name))?;
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on a valid namespace fd affects only this
                // (short-lived, scoped) thread.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(anyhow::anyhow!(
                        "setns({}): {}",
                        self.name,
                        std::io::Error::last_os_error()
                    ));
                }
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("thread in namespace {} panicked", self.name))?
        })
    }

    /// Whether some socket in the namespace listens on TCP `addr` (as `ss`
    /// prints it, e.g. `198.18.0.2:443`).
    pub fn listens_on(&self, addr: &str) -> Result<bool, String> {
        let out = self.exec("ss", &["-Hltn"]).map_err(|e| e.to_string())?;
        Ok(String::from_utf8_lossy(&out.stdout).contains(addr))
    }

    /// PIDs of processes still inside the namespace.
    pub fn pids(&self) -> Vec<i32> {
        Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn delete(&mut self) -> anyhow::Result<()> {
        // Only this harness starts processes in its namespaces (their names
        // are unique to it), so whatever is left in them is ours.
        for pid in self.pids() {
            // SAFETY: kill by PID of a process inside our own namespace.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        self.keep = true;
        ip(&["netns", "del", &self.name]).map(|_| ())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if !self.keep {
            if let Err(e) = self.delete() {
                eprintln!("harness: cannot delete namespace {}: {e}", self.name);
            }
        }
    }
}

/// Names of all network namespaces (`ip netns list`).
pub fn list() -> Vec<String> {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(String::from)
        .collect()
}

/// Namespaces named `lp-<pid>-...` whose creating process is gone.
pub fn stale_namespaces() -> Vec<String> {
    list()
        .into_iter()
        .filter(|name| {
            name.strip_prefix("lp-")
                .and_then(|rest| rest.split('-').next())
                .and_then(|pid| pid.parse::<i32>().ok())
                // SAFETY: kill with signal 0 only checks that the PID exists.
                .is_some_and(|pid| unsafe { libc::kill(pid, 0) } != 0)
        })
        .collect()
}
