//! SoftHSM2 sandbox for the HSM tests: one token directory per test process
//! (SoftHSM reads SOFTHSM2_CONF once, at C_Initialize), one freshly
//! initialised token per test, PINs in 0600 files. Directories of test
//! processes that have exited are swept at start.
#![allow(dead_code)]

use std::{
    fs,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicUsize, Ordering},
        OnceLock,
    },
};

use loupe_hsm::{
    pin::PinSource,
    softhsm::{init_token, SoftHsmDir},
    token::{TokenConfig, SOFTHSM2_MODULE},
};

pub const SO_PIN: &str = "so-secret-1";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("loupe-hsm")
}

/// The process's SoftHSM directory, configured before first use.
pub fn sandbox() -> &'static SoftHsmDir {
    static DIR: OnceLock<SoftHsmDir> = OnceLock::new();
    DIR.get_or_init(|| {
        sweep_stale();
        let dir = SoftHsmDir::create(&root().join(std::process::id().to_string())).unwrap();
        // Set before any thread loads the module; std's env lock guards
        // concurrent readers in this process.
        std::env::set_var("SOFTHSM2_CONF", dir.conf());
        dir
    })
}

fn sweep_stale() {
    let Ok(entries) = fs::read_dir(root()) else {
        return;
    };
    for e in entries.flatten() {
        let pid: Option<u32> = e.file_name().to_str().and_then(|s| s.parse().ok());
        if let Some(pid) = pid {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
}

/// A new token labelled after `name`, with its user PIN in a 0600 file.
pub struct TestToken {
    pub config: TokenConfig,
    pub pin_file: PathBuf,
    pub pin: String,
}

impl TestToken {
    pub fn new(name: &str) -> TestToken {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = sandbox();
        let n = N.fetch_add(1, Ordering::Relaxed);
        let label = format!("{name}-{n}");
        let pin = format!("user-pin-{n}");
        init_token(Path::new(SOFTHSM2_MODULE), &label, SO_PIN, &pin).unwrap();
        let pin_file = dir.dir.join(format!("{label}.pin"));
        write_pin(&pin_file, &pin);
        TestToken {
            config: TokenConfig {
                module: PathBuf::from(SOFTHSM2_MODULE),
                label,
                pin: PinSource::File(pin_file.clone()),
            },
            pin_file,
            pin,
        }
    }
}

pub fn write_pin(path: &Path, pin: &str) {
    loupe_hsm::pin::write_pin_file(path, pin).unwrap();
}

/// A fresh audit log path for one test.
pub fn audit_path(name: &str) -> PathBuf {
    let p = sandbox().dir.join(format!("{name}.audit.jsonl"));
    let _ = fs::remove_file(&p);
    p
}

/// A new token with its audit key, an audit log at `audit_path(name)`,
/// and a signer recording into it.
pub struct Rig {
    pub t: TestToken,
    pub token: loupe_hsm::token::Token,
    pub path: PathBuf,
    pub log: loupe_hsm::audit::AuditLog,
    pub signer: loupe_hsm::signer::Signer,
}

pub fn rig(name: &str) -> Rig {
    use loupe_hsm::{audit, ca, signer, token::Token};
    let t = TestToken::new(name);
    let token = Token::open(&t.config).unwrap();
    ca::ensure_audit_key(&token).unwrap();
    let path = audit_path(name);
    let log = audit::AuditLog::open(audit::AuditConfig::new(&path, Some(token.clone()))).unwrap();
    let signer = signer::Signer::start(
        signer::SignerConfig::new(vec![t.config.clone()]),
        Some(log.sink()),
    )
    .unwrap();
    Rig {
        t,
        token,
        path,
        log,
        signer,
    }
}

/// The records of the closed audit log at `path`, once it verifies with
/// the token's audit key, every record sealed.
pub fn verified_records(
    token: &loupe_hsm::token::Token,
    path: &Path,
) -> Vec<loupe_hsm::audit::Record> {
    use loupe_hsm::audit;
    let public = token
        .session()
        .unwrap()
        .public_key(audit::AUDIT_KEY_LABEL)
        .unwrap();
    let report = audit::verify(path, &[public]).unwrap();
    assert_eq!(report.unsealed, 0, "{report:?}");
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Polls `cond` until it holds or `deadline` passes (generous deadlines:
/// the machine may be loaded).
pub fn wait_until(deadline: std::time::Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + deadline;
    while std::time::Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    cond()
}
