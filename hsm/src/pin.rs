//! Where a token's user PIN comes from: a file only its owner can read, or an
//! environment variable. Never the command line, where `ps` shows it.

use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use cryptoki::types::AuthPin;
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};

use crate::error::{HsmError, Result};

/// A PIN's SHA-256: what is remembered of a PIN (which one logged in,
/// which one the token rejected), never the PIN itself.
pub fn digest(pin: &AuthPin) -> [u8; 32] {
    Sha256::digest(pin.expose_secret().as_bytes()).into()
}

/// A PIN source named in configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PinSource {
    /// A file with mode 0600 (or stricter), owned by this user or root; one
    /// line, trailing newline ignored.
    File(PathBuf),
    /// An environment variable's name.
    Env(String),
}

impl PinSource {
    /// Reads the PIN now. Called at start-up and again on every recovery
    /// attempt, so an operator can rotate the PIN without a restart.
    pub fn read(&self) -> Result<AuthPin> {
        let raw = match self {
            PinSource::File(path) => read_file(path)?,
            PinSource::Env(var) => match std::env::var(var) {
                Ok(v) => v,
                Err(_) => {
                    return Err(HsmError::Pin(format!(
                        "environment variable {var} is not set (or not UTF-8)"
                    )))
                }
            },
        };
        let pin = raw.trim_end_matches(['\n', '\r']);
        if pin.is_empty() {
            return Err(HsmError::Pin(format!(
                "{} holds an empty PIN",
                self.describe()
            )));
        }
        Ok(AuthPin::from(pin.to_string()))
    }

    /// Names the source for messages, without its contents.
    pub fn describe(&self) -> String {
        match self {
            PinSource::File(p) => format!("PIN file {}", p.display()),
            PinSource::Env(v) => format!("environment variable {v}"),
        }
    }
}

/// Writes `pin` to `path` as a PIN file this module accepts: mode 0600 from
/// the start, replaced atomically (provisioning, tests and benchmarks).
pub fn write_pin_file(path: &Path, pin: &str) -> std::io::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(format!("{pin}\n").as_bytes())?;
    drop(f);
    fs::rename(&tmp, path)
}

fn read_file(path: &PathBuf) -> Result<String> {
    let meta = fs::metadata(path)
        .map_err(|e| HsmError::Pin(format!("cannot read PIN file {}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(HsmError::Pin(format!(
            "PIN file {} is not a regular file",
            path.display()
        )));
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(HsmError::Pin(format!(
            "PIN file {} has mode {mode:04o}: group and others must have no access \
             (chmod 600 {})",
            path.display(),
            path.display()
        )));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if meta.uid() != euid && meta.uid() != 0 {
        return Err(HsmError::Pin(format!(
            "PIN file {} is owned by uid {}, not by this user (uid {euid}) or root",
            path.display(),
            meta.uid()
        )));
    }
    fs::read_to_string(path)
        .map_err(|e| HsmError::Pin(format!("cannot read PIN file {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use secrecy::ExposeSecret;

    use super::*;

    /// A PIN file in a directory removed when the guard drops.
    struct Temp(PathBuf);

    impl Drop for Temp {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn temp(name: &str, body: &str, mode: u32) -> (Temp, PathBuf) {
        let dir = std::env::temp_dir().join(format!("loupe-pin-{}-{name}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("pin");
        fs::write(&p, body).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        (Temp(dir), p)
    }

    #[test]
    fn file_with_owner_only_mode_is_read_without_newline() {
        let (_t, p) = temp("ok", "1234\n", 0o600);
        let pin = PinSource::File(p).read().unwrap();
        assert_eq!(pin.expose_secret(), "1234");
    }

    #[test]
    fn group_readable_file_is_refused_with_the_fix() {
        let (_t, p) = temp("loose", "1234\n", 0o640);
        let err = PinSource::File(p).read().unwrap_err().to_string();
        assert!(
            err.contains("mode 0640") && err.contains("chmod 600"),
            "{err}"
        );
    }

    #[test]
    fn empty_file_and_missing_variable_are_errors() {
        let (_t, p) = temp("empty", "\n", 0o600);
        assert!(PinSource::File(p)
            .read()
            .unwrap_err()
            .to_string()
            .contains("empty PIN"));
        let err = PinSource::Env("LOUPE_TEST_PIN_SURELY_UNSET".into())
            .read()
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("LOUPE_TEST_PIN_SURELY_UNSET is not set"),
            "{err}"
        );
    }
}
