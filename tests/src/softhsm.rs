//! A private SoftHSM2 for one test or demo run: its own token directory and
//! config (handed to child processes through `SOFTHSM2_CONF`, so runs never
//! share tokens), one initialised token, the user PIN in a 0600 file and an
//! audit log path. Everything lives in one directory removed on drop.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicUsize, Ordering},
};

use anyhow::{bail, Context};
use loupe_hsm::{pin::write_pin_file, softhsm::SoftHsmDir};

/// The sandbox; see the module note.
pub struct SoftHsm {
    pub dir: PathBuf,
    pub token: String,
    pub pin_file: PathBuf,
    pub audit_log: PathBuf,
    sandbox: SoftHsmDir,
    keep: bool,
}

impl SoftHsm {
    /// Creates the directory under `/tmp` and a token labelled `token`.
    pub fn new(token: &str) -> anyhow::Result<SoftHsm> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "loupe-softhsm-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        let sandbox = SoftHsmDir::create(&dir)?;
        let hsm = SoftHsm {
            sandbox,
            pin_file: dir.join("user.pin"),
            audit_log: dir.join("audit.jsonl"),
            token: token.to_string(),
            dir,
            keep: false,
        };
        hsm.init_token(token, "user-pin-0000")?;
        hsm.set_pin_file("user-pin-0000")?;
        Ok(hsm)
    }

    /// Initialises token `label` in this HSM with user PIN `pin`.
    fn init_token(&self, label: &str, pin: &str) -> anyhow::Result<()> {
        // Provisioning only: softhsm2-util takes its PINs as arguments, so
        // they are throwaway values that exist for this sandbox alone.
        let out = self
            .command("softhsm2-util")
            .args(["--init-token", "--free", "--label", label])
            .args(["--so-pin", "so-pin-0000", "--pin", pin])
            .output()
            .context("softhsm2-util (installed by scripts/setup)")?;
        if !out.status.success() {
            bail!(
                "softhsm2-util --init-token: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Initialises a second token, `label`, in this HSM with its own user
    /// PIN (a tenant's partition); returns its PIN file (mode 0600).
    pub fn add_token(&self, label: &str, pin: &str) -> anyhow::Result<PathBuf> {
        self.init_token(label, pin)?;
        let file = self.dir.join(format!("{label}.pin"));
        write_pin_file(&file, pin)?;
        Ok(file)
    }

    /// Writes `pin` to the PIN file (mode 0600).
    pub fn set_pin_file(&self, pin: &str) -> anyhow::Result<()> {
        Ok(write_pin_file(&self.pin_file, pin)?)
    }

    pub fn conf(&self) -> PathBuf {
        self.sandbox.conf()
    }

    /// A command whose environment points at this sandbox: SoftHSM config,
    /// token label, PIN file and audit log.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(program);
        c.env("SOFTHSM2_CONF", self.conf())
            .env("LOUPE_HSM_TOKEN", &self.token)
            .env("LOUPE_HSM_PIN_FILE", &self.pin_file)
            .env("LOUPE_AUDIT_LOG", &self.audit_log)
            .env_remove("LOUPE_HSM_PIN");
        c
    }

    /// Runs `loupe args...` against this sandbox.
    pub fn loupe(&self, args: &[&str]) -> Output {
        self.command(crate::workspace_bin("loupe"))
            .args(args)
            .output()
            .expect("run loupe")
    }

    /// Runs `loupe args...` against token `label` of this HSM (one made by
    /// [`SoftHsm::add_token`]), with that token's own audit log.
    pub fn loupe_on(&self, label: &str, args: &[&str]) -> Output {
        self.command(crate::workspace_bin("loupe"))
            .env("LOUPE_HSM_TOKEN", label)
            .env("LOUPE_HSM_PIN_FILE", self.dir.join(format!("{label}.pin")))
            // Each token its own audit log (one sealed by another token's
            // audit key is refused).
            .env(
                "LOUPE_AUDIT_LOG",
                self.dir.join(format!("{label}.audit.jsonl")),
            )
            .args(args)
            .output()
            .expect("run loupe")
    }

    /// Keeps the directory after drop (for the demo to show files).
    pub fn keep(&mut self) -> &Path {
        self.keep = true;
        &self.dir
    }
}

impl Drop for SoftHsm {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// The sandbox's token served over a Unix socket by `p11-kit server`, as a
/// network HSM is reached over the network: the engine loads the p11-kit
/// client module, and the test can take the "HSM" down (kill the server)
/// and bring it back (start it again on the same socket).
pub struct RemoteHsm {
    proc: Option<crate::proc::Proc>,
    pub socket: PathBuf,
    conf: PathBuf,
    token: String,
}

/// p11-kit's client module (Debian's p11-kit-modules).
pub const P11_KIT_CLIENT: &str = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so";

impl RemoteHsm {
    pub fn start(hsm: &SoftHsm) -> anyhow::Result<RemoteHsm> {
        let mut r = RemoteHsm {
            proc: None,
            socket: hsm.dir.join("p11-kit.sock"),
            conf: hsm.conf(),
            token: hsm.token.clone(),
        };
        r.up()?;
        Ok(r)
    }

    /// `P11_KIT_SERVER_ADDRESS` for clients.
    pub fn address(&self) -> String {
        format!("unix:path={}", self.socket.display())
    }

    /// Starts the server (again).
    pub fn up(&mut self) -> anyhow::Result<()> {
        let _ = fs::remove_file(&self.socket);
        let run = self.socket.with_extension("run");
        fs::create_dir_all(&run)?;
        use std::os::unix::process::CommandExt;
        // Its own process group: the server forks a process per client,
        // and an outage must take them all.
        let child = Command::new("p11-kit")
            .process_group(0)
            .args(["server", "-f", "-n"])
            .arg(&self.socket)
            .args(["--provider", "/usr/lib/softhsm/libsofthsm2.so"])
            .arg(format!("pkcs11:token={}", self.token))
            .env("SOFTHSM2_CONF", &self.conf)
            .env("XDG_RUNTIME_DIR", &run)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("p11-kit server (Debian's p11-kit, installed by scripts/setup)")?;
        let mut p = crate::proc::Proc::new("p11-kit server", child);
        let socket = self.socket.clone();
        p.wait_ready(
            "p11-kit to serve the token",
            std::time::Duration::from_secs(30),
            || Ok(socket.exists()),
        )?;
        self.proc = Some(p);
        Ok(())
    }

    /// Kills the server and the processes it forked for its clients
    /// (SIGKILL to the process group it leads): the HSM is gone.
    pub fn down(&mut self) {
        if let Some(mut p) = self.proc.take() {
            let pgid = p.pid() as i32;
            // SAFETY: kill(2) on the process group our child leads (made
            // with process_group(0)); the child is not reaped yet, so the
            // group id cannot have been reused.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            p.wait_timeout(std::time::Duration::from_secs(30));
        }
    }
}

impl RemoteHsm {
    /// Freezes the server and its forked processes (SIGSTOP to the process
    /// group), or thaws them (SIGCONT): a hung HSM that keeps its
    /// connections open and answers nothing.
    pub fn freeze(&self, frozen: bool) {
        if let Some(p) = &self.proc {
            let pgid = p.pid() as i32;
            let sig = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
            // SAFETY: kill(2) on the process group our child leads, not
            // reaped yet (as in `down`).
            unsafe { libc::kill(-pgid, sig) };
        }
    }
}

impl Drop for RemoteHsm {
    fn drop(&mut self) {
        self.down();
    }
}
