//! `loupe ca ...`, `loupe key ...`, `loupe audit ...` and `loupe policy
//! check --keys`: the operator's side of the HSM.
//! Every command opens the token named by the HSM options, and every key
//! operation goes through the same signer service and audit log as the
//! engine's.

use std::{
    cell::RefCell,
    io::Write,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use loupe_dataplane::{
    policy::ServerProfile,
    tls::inbound::{leaf_spki_sha256, read_chain},
};

use crate::policy::Severity;
use loupe_hsm::{
    audit::{
        self, AuditConfig, AuditLog, AuditSink, Entry, HeadCheck, HeadFound, Kind, Problem,
        VerifyOptions, AUDIT_KEY_LABEL,
    },
    ca::{ensure_audit_key, parse_ec_spki_pem, spki_pem, CaFlavor, CaManager, CaOptions, CaRole},
    master::MasterKey,
    pin::PinSource,
    server_keys::{list_keys, ServerKeyInfo, ServerKeys},
    signer::{Signer, SignerConfig},
    token::{KeyAlg, Token, TokenConfig, SOFTHSM2_MODULE},
};

/// Which token, and where its PIN and audit log are. The PIN is never an
/// argument: a file (mode 0600) or an environment variable.
#[derive(Debug, Args)]
pub struct HsmArgs {
    /// PKCS#11 module (SoftHSM2 by default; a Luna or other HSM's library).
    #[arg(long, env = "LOUPE_PKCS11_MODULE", default_value = SOFTHSM2_MODULE)]
    module: PathBuf,
    /// Token label.
    #[arg(long, env = "LOUPE_HSM_TOKEN", default_value = "loupe")]
    token: String,
    /// File holding the token's user PIN (mode 0600).
    #[arg(long, env = "LOUPE_HSM_PIN_FILE")]
    pin_file: Option<PathBuf>,
    /// Environment variable holding the PIN, when no --pin-file is given.
    #[arg(long, default_value = "LOUPE_HSM_PIN")]
    pin_env: String,
    /// The key-usage audit log.
    #[arg(
        long,
        env = "LOUPE_AUDIT_LOG",
        default_value = "/var/lib/loupe/audit.jsonl"
    )]
    audit_log: PathBuf,
}

impl HsmArgs {
    fn token_config(&self) -> TokenConfig {
        TokenConfig {
            module: self.module.clone(),
            label: self.token.clone(),
            pin: match &self.pin_file {
                Some(f) => PinSource::File(f.clone()),
                None => PinSource::Env(self.pin_env.clone()),
            },
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Generate the forward-trust and forward-untrust CAs (generation 1) on
    /// the token.
    Init(NewCa),
    /// Write a CA's certificates for client trust stores: PEM with the
    /// CA of the generation's key type and its RSA companion (clients must
    /// trust both), or DER of one of them.
    Export {
        /// forward-trust (the one clients must trust) or forward-untrust.
        #[arg(long, default_value = "forward-trust")]
        ca: String,
        /// Generation (default: the active one).
        #[arg(long)]
        generation: Option<u32>,
        /// DER of one certificate (the generation's own key type, or the
        /// RSA companion with --rsa).
        #[arg(long)]
        der: bool,
        #[arg(long, requires = "der")]
        rsa: bool,
        /// Output file (default: standard output).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Create the next CA generation; the previous one stays until destroyed.
    Rotate(NewCa),
    /// Destroy a CA generation's keys and certificates on the token.
    Destroy {
        #[arg(long)]
        generation: u32,
        /// Allow destroying the active generation.
        #[arg(long)]
        force: bool,
    },
    /// List the CA certificates on the token.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Store an existing server key (PEM: PKCS#8, SEC1 or PKCS#1; EC P-256
    /// or P-384, RSA 2048 or 3072) on the token, SENSITIVE and not
    /// EXTRACTABLE. The file is not changed: destroy it afterwards.
    Import {
        #[arg(long)]
        label: String,
        file: PathBuf,
    },
    /// Generate a server key on the token (it never leaves it).
    Generate {
        #[arg(long)]
        label: String,
        /// ec-p256, ec-p384, rsa-2048 or rsa-3072.
        #[arg(long = "type", default_value = "ec-p256")]
        key_type: String,
    },
    /// A certificate signing request (PEM) for a server key, signed on the
    /// token: the first --name is the subject's common name, all of them
    /// are its DNS names.
    Csr {
        #[arg(long)]
        label: String,
        #[arg(long = "name", required = true)]
        names: Vec<String>,
        /// Organization in the subject.
        #[arg(long)]
        org: Option<String>,
        /// Output file (default: standard output).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// The server keys on the token, with the attributes it reports.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct NewCa {
    /// ec-p256, ec-p384, rsa-2048 or rsa-3072.
    #[arg(long, default_value = "ec-p256")]
    algorithm: String,
    /// Organization in the CA subject.
    #[arg(long, default_value = "Loupe TLS inspection")]
    org: String,
    /// Validity in days.
    #[arg(long, default_value_t = 3650)]
    days: u32,
}

impl NewCa {
    fn options(&self) -> anyhow::Result<CaOptions> {
        if self.days == 0 {
            bail!("--days must be at least 1");
        }
        Ok(CaOptions {
            alg: self.algorithm.parse::<KeyAlg>()?,
            organization: self.org.clone(),
            validity_days: self.days,
        })
    }
}

#[derive(Debug, Subcommand)]
pub enum KeylogCommand {
    /// Print a sealed key log (a decryption profile's `keylog`) in the NSS
    /// key log format Wireshark reads. Its data keys are opened with the
    /// token's master key, each an `unwrap` record in the audit log. Exit
    /// status 1, printing nothing, when any line does not open.
    Open {
        /// The sealed key log.
        file: PathBuf,
        /// Write it here (created mode 0600, never through a link) instead
        /// of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

pub fn keylog(hsm: &HsmArgs, cmd: KeylogCommand) -> anyhow::Result<ExitCode> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let KeylogCommand::Open { file, out } = cmd;
    // A regular file only: never a wait on a FIFO.
    let input = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&file)
        .with_context(|| format!("cannot read the key log {}", file.display()))?;
    let meta = input.metadata()?;
    if !meta.is_file() {
        bail!("{}: not a regular file", file.display());
    }
    if let Some(o) = &out {
        writable_target(o)?;
        if let Ok(m) = std::fs::symlink_metadata(o) {
            // Writing the clear lines over the sealed log would lose it.
            if m.dev() == meta.dev() && m.ino() == meta.ino() {
                bail!(
                    "--out {} is the sealed key log itself: write the clear lines elsewhere",
                    o.display()
                );
            }
            // The secrets go only into a file that is ours alone.
            // SAFETY: geteuid(2) has no preconditions and cannot fail.
            let me = unsafe { libc::geteuid() };
            if m.uid() != me || m.nlink() > 1 {
                bail!(
                    "--out {} exists and is owned by uid {} or has other names (links: {}): \
                     the secrets go only into a new file or one of yours alone",
                    o.display(),
                    m.uid(),
                    m.nlink()
                );
            }
        }
    }
    let input = std::io::BufReader::new(input);
    let opened = Session::open(hsm)?.with(|token, _, sink| {
        let master = MasterKey {
            token,
            audit: sink,
            requester: requester(),
        };
        Ok(loupe_hsm::keylog::open(input, |blob| {
            master
                .open(loupe_hsm::keylog::CONTEXT, blob)
                .map_err(|e| e.to_string())
        }))
    })?;
    match opened {
        Ok(lines) => {
            match &out {
                Some(o) => write_no_follow(o, lines.as_bytes(), 0o600)?,
                None => write_out(None, lines.as_bytes())?,
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("loupe: {}: {e}", file.display());
            Ok(ExitCode::from(1))
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the whole chain, every checkpoint signature, that every record
    /// is sealed by a signed checkpoint, and (with the token) that nothing
    /// was cut from the end; report the first broken record. Exit status 1
    /// when the log does not verify.
    Verify {
        /// The audit log file.
        file: PathBuf,
        /// Audit public key(s) in PEM (from `loupe audit export-key`), to
        /// verify away from the HSM: the file alone is checked, and a cut
        /// at its end (checkpoints included) cannot be seen. Without one,
        /// the key and the log's head are read from the token.
        #[arg(long)]
        pubkey: Vec<PathBuf>,
        /// Accept records after the last signed checkpoint (a log the
        /// engine is still writing) and say how many there are.
        #[arg(long)]
        allow_open_tail: bool,
    },
    /// Record, on the token and in the audit log (--audit-log), that the
    /// log now at that path deliberately replaces the log(s) the token's
    /// heads name there (a new log started on purpose, the old one moved
    /// away): until then `loupe audit verify` reports the log as replaced.
    /// The old logs' heads stay on the token and still check them.
    ResetHead {
        /// Why, for the record (e.g. "rotated to audit.jsonl.1").
        #[arg(long)]
        reason: String,
    },
    /// Write the audit public key (PEM) for verifying logs away from the HSM.
    ExportKey {
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn requester() -> String {
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    let user = std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_default();
    format!("loupe-cli uid={uid} user={user}")
}

/// `loupe policy check --keys`: looks each server profile's key up on the
/// token `--token` names (with its PIN) and compares its public key with
/// the chain's certificate. Public attributes only: nothing is signed or
/// audited. A profile on another token is a warning (not checked). The
/// token is opened once, at the first profile.
pub fn key_check(hsm: &HsmArgs) -> impl Fn(&ServerProfile) -> Result<(), (Severity, String)> + '_ {
    let listed: RefCell<Option<Result<Vec<ServerKeyInfo>, String>>> = RefCell::new(None);
    move |sp| {
        let token = sp.token.as_deref().unwrap_or(&hsm.token);
        if token != hsm.token {
            return Err((
                Severity::Warning,
                format!(
                    "key {:?} not checked: it is on token {token:?}; check it with --token \
                     {token:?} and that token's PIN",
                    sp.key
                ),
            ));
        }
        let mut listed = listed.borrow_mut();
        let keys = listed.get_or_insert_with(|| {
            Token::open(&hsm.token_config())
                .and_then(|t| list_keys(&t))
                .map_err(|e| e.to_string())
        });
        let keys = keys.as_ref().map_err(|e| {
            (
                Severity::Error,
                format!("cannot read the keys on token {token:?}: {e}"),
            )
        })?;
        let Some(k) = keys.iter().find(|k| k.label == sp.key) else {
            return Err((
                Severity::Error,
                format!(
                    "no server key {:?} on token {token:?} (`loupe key list`; `loupe key \
                     import` or `generate` makes one)",
                    sp.key
                ),
            ));
        };
        if let Some(p) = &k.problem {
            return Err((
                Severity::Error,
                format!("server key {:?} on token {token:?}: {p}", sp.key),
            ));
        }
        let chain = read_chain(Path::new(&sp.chain))
            .map_err(|e| (Severity::Error, format!("chain file {}: {e}", sp.chain)))?;
        let want = leaf_spki_sha256(&chain[0]).map_err(|e| (Severity::Error, e))?;
        if want != k.spki_sha256 {
            return Err((
                Severity::Error,
                format!(
                    "server key {:?} on token {token:?} is not the key of the certificate in \
                     {}: the certificate's public key has SHA-256 {want}, the token's key {}",
                    sp.key, sp.chain, k.spki_sha256
                ),
            ));
        }
        Ok(())
    }
}

/// The token, its audit log and a one-thread signer, opened in that order;
/// the audit key is created first if the token has none.
struct Session {
    token: Token,
    log: AuditLog,
    signer: Signer,
}

impl Session {
    fn open(hsm: &HsmArgs) -> anyhow::Result<Session> {
        let token = Token::open(&hsm.token_config())?;
        let created = ensure_audit_key(&token)?;
        let log = AuditLog::open(AuditConfig::new(&hsm.audit_log, Some(token.clone())))?;
        if created {
            log.sink().record(vec![Entry::now(
                Kind::Keygen,
                token.label(),
                AUDIT_KEY_LABEL,
                "generate audit key (ec-p256)",
                &requester(),
            )])?;
        }
        let mut cfg = SignerConfig::new(vec![hsm.token_config()]);
        cfg.threads_per_token = 1;
        cfg.batch = 1;
        let signer = Signer::start(cfg, Some(log.sink()))?;
        Ok(Session { token, log, signer })
    }

    /// Runs `f` with the token, the signer and an audit sink; then the
    /// signer stops and the log is closed (sealed).
    fn with<T>(
        self,
        f: impl FnOnce(&Token, &Signer, &AuditSink) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let sink = self.log.sink();
        let out = f(&self.token, &self.signer, &sink);
        drop(sink);
        drop(self.signer);
        self.log.close()?;
        out
    }

    fn run<T>(self, f: impl FnOnce(&CaManager) -> anyhow::Result<T>) -> anyhow::Result<T> {
        self.with(|token, signer, audit| {
            f(&CaManager {
                token,
                signer,
                audit,
                requester: requester(),
            })
        })
    }

    /// As [`Session::keys`] for an operation that makes key `label`: if
    /// the audit log then cannot be written, the key is destroyed again
    /// (nothing is made that the log does not record).
    fn keys_made<T>(
        self,
        label: &str,
        f: impl FnOnce(&ServerKeys) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let token = self.token.clone();
        let mut made = false;
        let r = self.keys(|k| {
            let out = f(k);
            made = out.is_ok();
            out
        });
        match r {
            Err(e) if made => {
                let full = format!("{}{label}", loupe_hsm::server_keys::PREFIX);
                let undone = token.session().and_then(|mut s| s.destroy(&full));
                match undone {
                    Ok(_) => bail!(
                        "{e:#}: the audit log could not record it, so the key was destroyed \
                         again; nothing was made"
                    ),
                    Err(d) => bail!(
                        "{e:#}: the audit log could not record it, and destroying the key \
                         again failed too ({d}): remove {full:?} from the token"
                    ),
                }
            }
            r => r,
        }
    }

    fn keys<T>(self, f: impl FnOnce(&ServerKeys) -> anyhow::Result<T>) -> anyhow::Result<T> {
        self.with(|token, signer, audit| {
            f(&ServerKeys {
                token,
                signer,
                audit,
                requester: requester(),
            })
        })
    }
}

fn print_keys(keys: &[ServerKeyInfo]) -> anyhow::Result<()> {
    outln!(
        "{:<24} {:<9} {:<9} {:<11} {:<9} spki sha256",
        "label",
        "key",
        "sensitive",
        "extractable",
        "origin"
    )?;
    for k in keys {
        if let Some(p) = &k.problem {
            outln!("{:<24} BROKEN: {p}", k.label)?;
            continue;
        }
        outln!(
            "{:<24} {:<9} {:<9} {:<11} {:<9} {}",
            k.label,
            k.key,
            if k.sensitive { "yes" } else { "NO" },
            if k.extractable { "YES" } else { "no" },
            if k.generated { "generated" } else { "imported" },
            k.spki_sha256
        )?;
    }
    Ok(())
}

/// A key file, read once: a regular file of at most 1 MiB (a FIFO or a
/// device is refused without blocking on it); a file others may read is
/// said, as that key may already be known.
fn read_key_file(path: &Path) -> anyhow::Result<String> {
    use std::{
        io::Read,
        os::unix::fs::{MetadataExt, OpenOptionsExt},
    };
    const MAX: u64 = 1 << 20;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        bail!("{} is not a regular file", path.display());
    }
    if meta.len() > MAX {
        bail!("{} is over 1 MiB: not a key file", path.display());
    }
    if meta.mode() & 0o077 != 0 {
        eprintln!(
            "loupe: warning: {} could be read by others (mode {:o}): treat the key as exposed",
            path.display(),
            meta.mode() & 0o777
        );
    }
    let mut text = String::new();
    f.take(MAX)
        .read_to_string(&mut text)
        .with_context(|| format!("{}: not a PEM text file", path.display()))?;
    Ok(text)
}

/// Writes `bytes` to `out` (with `mode` if new), never through a link.
fn write_no_follow(out: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(out)
        .with_context(|| format!("cannot write {}", out.display()))?;
    // An existing file keeps its mode otherwise.
    f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", out.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("cannot write {}", out.display()))
}

/// Checks before anything is signed that `out` can be written: its
/// directory exists and it is not a link or a directory.
fn writable_target(out: &Path) -> anyhow::Result<()> {
    if let Ok(m) = std::fs::symlink_metadata(out) {
        if !m.is_file() {
            bail!("{} exists and is not a regular file", out.display());
        }
    }
    let dir = out.parent().filter(|d| !d.as_os_str().is_empty());
    if dir.is_some_and(|d| !d.is_dir()) {
        bail!("{}: no such directory", out.display());
    }
    Ok(())
}

pub fn key(hsm: &HsmArgs, cmd: KeyCommand) -> anyhow::Result<ExitCode> {
    let open = || Session::open(hsm);
    match cmd {
        KeyCommand::Import { label, file } => {
            let pem = read_key_file(&file)?;
            let public = open()?.keys_made(&label, |k| Ok(k.import(&label, &pem)?))?;
            outln!(
                "imported {} key {label:?} into token {:?}: sensitive, not extractable",
                public.alg.name(),
                hsm.token
            )?;
            outln!(
                "the key now lives on the token: destroy {} (e.g. shred -u)",
                file.display()
            )?;
        }
        KeyCommand::Generate { label, key_type } => {
            let alg = key_type.parse::<KeyAlg>()?;
            let public = open()?.keys_made(&label, |k| Ok(k.generate(&label, alg)?))?;
            outln!(
                "generated {} key {label:?} on token {:?}",
                public.alg.name(),
                hsm.token
            )?;
        }
        KeyCommand::Csr {
            label,
            names,
            org,
            out,
        } => {
            if let Some(o) = &out {
                writable_target(o)?;
            }
            let pem = open()?.keys(|k| Ok(k.csr(&label, &names, org.as_deref())?))?;
            match &out {
                Some(o) => write_no_follow(o, pem.as_bytes(), 0o644)?,
                None => write_out(None, pem.as_bytes())?,
            }
        }
        KeyCommand::List { json } => {
            let list = open()?.keys(|k| Ok(k.list()?))?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&list)?)?;
            } else {
                print_keys(&list)?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn write_out(out: Option<&Path>, bytes: &[u8]) -> anyhow::Result<()> {
    match out {
        Some(p) => {
            std::fs::write(p, bytes).with_context(|| format!("cannot write {}", p.display()))
        }
        None => crate::stdout_result(std::io::stdout().write_all(bytes)),
    }
}

fn print_cas(cas: &[loupe_hsm::ca::CaInfo]) -> anyhow::Result<()> {
    outln!(
        "{:<16} {:>3}  {:<6} {:<9} {:<32} sha256",
        "ca",
        "gen",
        "active",
        "key",
        "label"
    )?;
    for c in cas {
        outln!(
            "{:<16} {:>3}  {:<6} {:<9} {:<32} {}",
            c.role.name(),
            c.generation,
            if c.active { "yes" } else { "no" },
            c.key,
            c.label,
            c.fingerprint
        )?;
    }
    Ok(())
}

pub fn ca(hsm: &HsmArgs, cmd: CaCommand) -> anyhow::Result<ExitCode> {
    // Each command checks its arguments before the token is opened (which
    // may create the audit key and starts the signer): a typo costs nothing.
    let open = || Session::open(hsm);
    match cmd {
        CaCommand::Init(new) => {
            let opts = new.options()?;
            let made = open()?.run(|ca| Ok(ca.init(&opts)?))?;
            print_cas(&made)?;
            outln!("export the forward-trust CA for clients with `loupe ca export`")?;
        }
        CaCommand::Rotate(new) => {
            let opts = new.options()?;
            let made = open()?.run(|ca| Ok(ca.rotate(&opts)?))?;
            print_cas(&made)?;
        }
        CaCommand::Export {
            ca: which,
            generation,
            der,
            rsa,
            out,
        } => {
            let role: CaRole = which.parse()?;
            let certs = open()?.run(|ca| Ok(ca.certificates(role, generation)?))?;
            let bytes = if der {
                let flavor = if rsa {
                    CaFlavor::Rsa
                } else {
                    CaFlavor::Primary
                };
                let Some(cert) = certs.iter().find(|c| c.flavor == flavor) else {
                    bail!(
                        "this generation has no RSA companion of the {} CA",
                        role.name()
                    );
                };
                cert.der.clone()
            } else {
                certs
                    .iter()
                    .map(|c| c.pem())
                    .collect::<String>()
                    .into_bytes()
            };
            write_out(out.as_deref(), &bytes)?;
        }
        CaCommand::Destroy { generation, force } => {
            let n = open()?.run(|ca| Ok(ca.destroy(generation, force)?))?;
            outln!("destroyed CA generation {generation} ({n} objects)")?;
        }
        CaCommand::List { json } => {
            let list = open()?.run(|ca| Ok(ca.list()?))?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&list)?)?;
            } else {
                print_cas(&list)?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn audit(hsm: &HsmArgs, cmd: AuditCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        AuditCommand::ExportKey { out } => {
            let token = Token::open(&hsm.token_config())?;
            let public = audit::public_key(&token)?;
            write_out(out.as_deref(), spki_pem(&public).as_bytes())?;
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Verify {
            file,
            pubkey,
            allow_open_tail,
        } => verify_log(hsm, &file, &pubkey, allow_open_tail),
        AuditCommand::ResetHead { reason } => {
            if reason.trim().is_empty() {
                bail!("--reason must say why a new log took the old one's place");
            }
            let token = Token::open(&hsm.token_config())?;
            // Only a log whose own chain holds can take the old one's
            // place: recording a broken (or forged) one would bless it.
            if hsm.audit_log.exists() {
                let keys = [audit::public_key(&token)?];
                let opts = audit::VerifyOptions {
                    keys: &keys,
                    allow_open_tail: true,
                    head: audit::HeadCheck::Unchecked,
                };
                if let Err(broken) = audit::verify_with(&hsm.audit_log, &opts) {
                    bail!(
                        "the log at {} does not verify ({broken}): reset-head records only a log \
                         whose own records hold. Move it away and run again to start a new log",
                        hsm.audit_log.display()
                    );
                }
            }
            let log = AuditLog::open(AuditConfig::new(&hsm.audit_log, Some(token.clone())))?;
            let heads = audit::supersede(&token, &log, &reason, &requester());
            // The shutdown checkpoint seals the supersede records and puts
            // this log's own head on the token.
            log.close()?;
            let at = audit::log_path(&hsm.audit_log);
            let heads = heads?;
            if heads.is_empty() {
                outln!(
                    "audit log {at}: the token holds no head of another log at this path: \
                     nothing to supersede"
                )?;
            }
            for h in &heads {
                outln!(
                    "audit log {at}: supersedes log {} (head seq {}), recorded in the log and \
                     on the token {:?}",
                    h.log,
                    h.seq,
                    token.label()
                )?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn verify_log(
    hsm: &HsmArgs,
    file: &Path,
    pubkey: &[PathBuf],
    allow_open_tail: bool,
) -> anyhow::Result<ExitCode> {
    let (keys, head) = if pubkey.is_empty() {
        let token = Token::open(&hsm.token_config()).context(
            "no --pubkey given, so the audit key and the log's head are read from the token, \
             which failed",
        )?;
        let head = audit::token_head(&token, file)
            .context("cannot read the audit log's head from the token")?;
        (vec![audit::public_key(&token)?], head)
    } else {
        let keys = pubkey
            .iter()
            .map(|p| {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("cannot read {}", p.display()))?;
                parse_ec_spki_pem(&text).with_context(|| p.display().to_string())
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        (keys, HeadCheck::Unchecked)
    };
    let opts = VerifyOptions {
        keys: &keys,
        allow_open_tail,
        head,
    };
    let r = match audit::verify_with(file, &opts) {
        Ok(r) => r,
        Err(b) => {
            let at = if b.line == 0 { ": " } else { " at " };
            eprintln!("loupe: audit log {}: BROKEN{at}{b}", file.display());
            if b.problem == Problem::OpenTail {
                eprintln!("(pass --allow-open-tail for a log the engine is still writing)");
            }
            return Ok(ExitCode::from(1));
        }
    };
    outln!(
        "audit log {}: OK: {} records, {} checkpoints, sealed through seq {}",
        file.display(),
        r.records,
        r.checkpoints,
        r.sealed_through.map_or("none".into(), |s| s.to_string())
    )?;
    let token = &hsm.token;
    match r.head {
        HeadFound::Matched(seq) => {
            outln!(
                "head: token {token:?} holds this log's head at seq {seq}, and the file holds \
                 that record: nothing sealed was cut from its end"
            )?;
            if let Some(sealed) = r.sealed_through.filter(|&s| s > seq) {
                outln!(
                    "head: the file is sealed beyond it, through seq {sealed} (its writer \
                     stopped before recording its last checkpoint on the token)"
                )?;
            }
        }
        HeadFound::NotRecorded => outln!(
            "head: token {token:?} holds no head for this log (id {}): a cut at its end \
             cannot be seen (its first signed checkpoint is not recorded on the token yet, or \
             it was written before the token kept heads)",
            r.log_id
        )?,
        HeadFound::Unchecked => outln!(
            "head: not checked against the token (verified with --pubkey alone): what the \
             file holds verifies, but a cut at its end, checkpoints included, cannot be seen; \
             run `loupe audit verify` where the token is reachable for that"
        )?,
    }
    if r.unsealed > 0 {
        let after = r
            .sealed_through
            .map_or(String::new(), |s| format!(" (seq {s})"));
        outln!(
            "open tail: {} unsealed record{} after the last signed checkpoint{after}; nothing \
             protects {} until the next checkpoint",
            r.unsealed,
            if r.unsealed == 1 { "" } else { "s" },
            if r.unsealed == 1 { "it" } else { "them" }
        )?;
    }
    for h in &r.superseded {
        outln!(
            "head: this log took the place at this path of log {} (head seq {}), as recorded \
             with `loupe audit reset-head`",
            h.log,
            h.seq
        )?;
    }
    if !r.unsigned_checkpoints.is_empty() {
        outln!(
            "note: checkpoints left unsigned (HSM unavailable then), sealed by a later signed \
             one: seq {}",
            r.unsigned_checkpoints
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )?;
    }
    Ok(ExitCode::SUCCESS)
}
