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
        // Provisioning only: softhsm2-util takes its PINs as arguments, so
        // they are throwaway values that exist for this sandbox alone.
        let out = hsm
            .command("softhsm2-util")
            .args(["--init-token", "--free", "--label", token])
            .args(["--so-pin", "so-pin-0000", "--pin", "user-pin-0000"])
            .output()
            .context("softhsm2-util (installed by scripts/setup)")?;
        if !out.status.success() {
            bail!(
                "softhsm2-util --init-token: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        hsm.set_pin_file("user-pin-0000")?;
        Ok(hsm)
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
