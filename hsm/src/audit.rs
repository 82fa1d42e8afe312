//! The key-usage audit log: one JSON line per private-key use (and per key
//! generation or destruction), each carrying the SHA-256 of the line before
//! it, with checkpoints whose chain head is signed by an audit key held in
//! the HSM.
//!
//! Records are appended by a writer thread in batches (one `write` and one
//! `fdatasync` per batch), never by a packet worker. Several processes may
//! share one log (the engine and `loupe ca ...`): each batch is written under
//! an exclusive `flock`, after re-reading the tail if another writer moved
//! it, so the chain stays linear.
//!
//! The chain alone catches edits, deletions and reorderings anywhere before
//! the last record; the checkpoint signatures are what an attacker who
//! rewrites the whole file cannot forge. What neither can show is a cut at
//! the end, checkpoints included: so at each signed checkpoint the writer
//! also records the log's head (the checkpoint's sequence number and hash)
//! in a private data object on the token ([`Head`]), and [`verify_with`]
//! compares the file against it when the token is at hand.
//!
//! A log verifies only if every record is sealed by a signed checkpoint
//! after it: an unsigned checkpoint (the HSM failed at that moment) is a
//! failure until a later signed checkpoint seals over it (that signature
//! covers the chain head, hence every record before it), and records after
//! the last signed checkpoint fail unless the caller allows an open tail (a
//! log a writer is still appending to). An empty file is no log.

use std::{
    fs::{File, OpenOptions},
    io::{BufRead, BufReader, Read, Seek, SeekFrom, Write},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use crossbeam::channel::{self, Receiver, RecvTimeoutError, Sender};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{
    error::{HsmError, Result},
    mech::SignMech,
    token::{KeyAlg, PublicKey, Token, TokenSession},
};

/// Label of the audit key on a token.
pub const AUDIT_KEY_LABEL: &str = "loupe-audit";
/// The token's audit public key: what [`verify`] checks checkpoints with.
pub fn public_key(token: &Token) -> Result<PublicKey> {
    token.session()?.public_key(AUDIT_KEY_LABEL)
}

/// The checkpoint mechanism; the audit key is EC P-256.
pub const AUDIT_MECH: SignMech = SignMech::EcdsaP256Sha256;
/// The back-link of a log's first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// CKA_APPLICATION of the token's data objects holding audit log heads.
pub const HEAD_APPLICATION: &str = "loupe-audit";
/// A head object's label: this, then the log's id.
const HEAD_LABEL: &str = "loupe-audit-head/";

/// What the token remembers of one log: its last signed checkpoint that a
/// writer recorded there, and where the log lives. Several logs can share a
/// token (one object each, labelled with the log's id); a log's id is the
/// SHA-256 of its first record, which carries the time of its first key use
/// to the millisecond.
///
/// The path is what catches a log replaced whole by a fresh one (a new
/// first record, so a new id the token has no head for): the old log's
/// head still claims the path, and the new log does not match it. A head
/// stops claiming its path only when an operator records that a new log
/// deliberately took its place ([`supersede`], `loupe audit reset-head`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    /// The log's id.
    pub log: String,
    /// Sequence number of the checkpoint.
    pub seq: u64,
    /// SHA-256 of the checkpoint's line.
    pub hash: String,
    /// Where that line starts in the file, in bytes.
    pub offset: u64,
    /// The canonical path its writer wrote the log at ([`log_path`]);
    /// none in heads recorded before paths were kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The id of the log an operator started in this one's place at its
    /// path: the head no longer claims the path, and still checks its own
    /// log wherever that now lives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub superseded_by: Option<String>,
}

impl Head {
    fn label(log: &str) -> String {
        format!("{HEAD_LABEL}{log}")
    }

    fn parse(session: &TokenSession, label: &str, value: &[u8]) -> Result<Head> {
        serde_json::from_slice(value).map_err(|e| {
            HsmError::Invalid(format!(
                "token {:?}: the audit head object {label:?} is not valid: {e}",
                session.token()
            ))
        })
    }

    /// The head the token holds for the log `log`, if any (the furthest,
    /// should a replacement have left two objects).
    pub fn read(session: &TokenSession, log: &str) -> Result<Option<Head>> {
        let label = Head::label(log);
        let mut found: Option<Head> = None;
        for value in session.data_objects(HEAD_APPLICATION, Some(&label))? {
            let head = Head::parse(session, &label, &value)?;
            if head.log != log {
                return Err(HsmError::Invalid(format!(
                    "token {:?}: the audit head object {label:?} names another log ({})",
                    session.token(),
                    head.log
                )));
            }
            if found.as_ref().is_none_or(|f| f.seq < head.seq) {
                found = Some(head);
            }
        }
        Ok(found)
    }

    /// Every head the token holds, one per log (the furthest of each).
    pub fn all(session: &TokenSession) -> Result<Vec<Head>> {
        let mut heads: Vec<Head> = Vec::new();
        for value in session.data_objects(HEAD_APPLICATION, None)? {
            let head = Head::parse(session, HEAD_APPLICATION, &value)?;
            match heads.iter_mut().find(|h| h.log == head.log) {
                Some(h) if h.seq < head.seq => *h = head,
                Some(_) => {}
                None => heads.push(head),
            }
        }
        Ok(heads)
    }

    /// Whether this head still claims the log at `path`.
    pub fn claims(&self, path: &str) -> bool {
        self.path.as_deref() == Some(path) && self.superseded_by.is_none()
    }

    fn write(&self, session: &TokenSession) -> Result<()> {
        let value = serde_json::to_vec(self).expect("heads always serialise");
        session.set_data_object(HEAD_APPLICATION, &Head::label(&self.log), &value)
    }
}

/// The canonical form of a log's path, as heads record it: symbolic links
/// and `..` resolved (of its directory, if the file does not exist).
pub fn log_path(path: &Path) -> String {
    let resolved = std::fs::canonicalize(path).or_else(|e| {
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(e);
        };
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        std::fs::canonicalize(dir).map(|d| d.join(name))
    });
    resolved
        .unwrap_or_else(|_| path.to_path_buf())
        .display()
        .to_string()
}

/// What a record is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Sign,
    Keygen,
    /// A key made outside the token was stored on it.
    Import,
    Destroy,
    Checkpoint,
    /// TLS session secrets are exported (a decryption profile's key log
    /// was turned on): whoever reads the file can decrypt those sessions.
    KeyLog,
    /// Decrypted plaintext is copied out of the engine (pcapng files or a
    /// mirror port): whoever reads them sees those connections' content.
    Export,
    /// An operator started this log in place of another at its path
    /// (`loupe audit reset-head`): the record names the head it supersedes.
    Supersede,
    /// A secret was sealed with the master key (to be kept on disk).
    Wrap,
    /// A sealed secret was opened with the master key.
    Unwrap,
}

/// One line of the log. Field order is the serialisation order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub seq: u64,
    pub time: String,
    pub kind: Kind,
    pub token: String,
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mech: Option<String>,
    pub purpose: String,
    pub requester: String,
    pub result: String,
    /// Checkpoints: the hash being sealed (equal to `prev`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<String>,
    /// Checkpoints: hex DER ECDSA signature over [`checkpoint_message`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sig: Option<String>,
    pub prev: String,
}

impl Record {
    /// Places the record in a chain (its sequence number, the hash of the
    /// line before it and, for a checkpoint, the head it seals) and appends
    /// its line to `out`; returns the line's hash, the next record's `prev`.
    pub fn link(&mut self, seq: u64, prev: String, out: &mut Vec<u8>) -> String {
        self.seq = seq;
        if self.kind == Kind::Checkpoint {
            self.head = Some(prev.clone());
        }
        self.prev = prev;
        let start = out.len();
        serde_json::to_writer(&mut *out, self).expect("records always serialise");
        let hash = hex(&Sha256::digest(&out[start..]));
        out.push(b'\n');
        hash
    }
}

/// A key use to record; the writer adds seq and prev.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// When the key was used (formatted by the writer, off the HSM thread).
    pub time: SystemTime,
    pub kind: Kind,
    pub token: String,
    pub key: String,
    pub mech: Option<SignMech>,
    pub purpose: String,
    pub requester: String,
    /// `Ok(())` or the error's message.
    pub result: std::result::Result<(), String>,
}

impl Entry {
    pub fn now(kind: Kind, token: &str, key: &str, purpose: &str, requester: &str) -> Entry {
        Entry {
            time: SystemTime::now(),
            kind,
            token: token.to_string(),
            key: key.to_string(),
            mech: None,
            purpose: purpose.to_string(),
            requester: requester.to_string(),
            result: Ok(()),
        }
    }
}

/// The bytes an audit key signs at a checkpoint: domain, sequence number,
/// time and the chain head, so none of them can be moved to another record.
pub fn checkpoint_message(seq: u64, time: &str, head: &str) -> Vec<u8> {
    format!("loupe-audit-checkpoint-v1\n{seq}\n{time}\n{head}\n").into_bytes()
}

/// Where and how often to seal.
#[derive(Clone, Debug)]
pub struct AuditConfig {
    pub path: PathBuf,
    /// Seal after this many records...
    pub checkpoint_every: u64,
    /// ...or this long after the first unsealed record, whichever is first.
    pub checkpoint_interval: Duration,
    /// The token holding [`AUDIT_KEY_LABEL`]; `None` writes checkpoints
    /// without a signature (tests of the chain only).
    pub audit_token: Option<Token>,
    /// Group commit: at most one `fdatasync` per interval; records arriving
    /// meanwhile go in the next write. Bounds how long a record can sit in
    /// memory after its key use.
    pub sync_interval: Duration,
    /// After a failed write (a full disk, an I/O error), how long the
    /// writer waits before trying again with the records it kept.
    pub retry_interval: Duration,
}

impl AuditConfig {
    pub fn new(path: &Path, audit_token: Option<Token>) -> AuditConfig {
        AuditConfig {
            path: path.to_path_buf(),
            checkpoint_every: 1000,
            checkpoint_interval: Duration::from_secs(10),
            audit_token,
            sync_interval: Duration::from_millis(5),
            retry_interval: Duration::from_secs(1),
        }
    }
}

/// Records a writer keeps while its writes fail; beyond this it leaves
/// batches in the channel, whose senders then block (4096 batches on).
const MAX_PENDING: usize = 65_536;

/// The writer's health, for status and metrics: whether its writes fail,
/// and the records it keeps meanwhile.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditHealth {
    pub path: String,
    /// The last write failed: records are kept in memory and retried.
    pub failing: bool,
    /// Records kept, not yet on disk (those of a write in progress too).
    pub pending: u64,
    /// Writes that failed, since the writer started.
    pub write_errors: u64,
    /// Times writing succeeded again after failing.
    pub recoveries: u64,
    /// The last failure's reason (kept after a recovery).
    pub last_error: Option<String>,
}

enum Msg {
    Entries(Vec<Entry>),
    Flush(Sender<Result<()>>),
}

/// A cloneable handle HSM threads use to submit records. Sending blocks when
/// the writer is 4096 batches behind: no key use goes unrecorded, and the
/// HSM threads (never packet workers) take the back-pressure.
#[derive(Clone)]
pub struct AuditSink {
    tx: Sender<Msg>,
}

impl AuditSink {
    /// Runs a key operation and records `entry` with its outcome,
    /// whatever it is: the operation's error comes first, then the log's.
    pub fn around<T>(&self, mut entry: Entry, op: impl FnOnce() -> Result<T>) -> Result<T> {
        let r = op();
        entry.result = r.as_ref().map(|_| ()).map_err(|e| e.to_string());
        self.record(vec![entry])?;
        r
    }

    pub fn record(&self, entries: Vec<Entry>) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        self.tx
            .send(Msg::Entries(entries))
            .map_err(|_| HsmError::Audit {
                path: String::new(),
                reason: "the audit writer has stopped".into(),
            })
    }
}

/// How long closing waits for the writer's last checkpoint.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// The writer thread and its handle.
pub struct AuditLog {
    sink: AuditSink,
    thread: Option<JoinHandle<Result<()>>>,
    path: PathBuf,
    health: Arc<Mutex<AuditHealth>>,
}

impl AuditLog {
    /// Opens (creating if needed) the log, checks its tail is whole, and
    /// starts the writer.
    pub fn open(config: AuditConfig) -> Result<AuditLog> {
        let path = config.path.clone();
        let err = |reason: String| HsmError::Audit {
            path: path.display().to_string(),
            reason,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| err(format!("cannot create directory: {e}")))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&path)
            .map_err(|e| err(format!("cannot open: {e}")))?;
        let session = match &config.audit_token {
            Some(t) => {
                let mut s = t.session()?;
                s.private_key(AUDIT_KEY_LABEL).map_err(|e| {
                    err(format!(
                        "{e}; create it with `loupe ca init` or `loupe audit init-key`"
                    ))
                })?;
                Some(s)
            }
            None => None,
        };
        let health = Arc::new(Mutex::new(AuditHealth {
            path: path.display().to_string(),
            ..AuditHealth::default()
        }));
        let mut writer = Writer {
            file,
            pending: Vec::new(),
            retry_at: None,
            failure: None,
            torn: None,
            health: health.clone(),
            canonical: log_path(&path),
            path: path.clone(),
            chain: Chain {
                end: 0,
                seq: 0,
                head: GENESIS.to_string(),
                log_id: None,
                unsealed: 0,
                first_unsealed: None,
                reseal: false,
            },
            signed: None,
            config,
            session,
        };
        writer.with_lock(|w| w.resync())?;
        if let Some(t) = &writer.config.audit_token {
            sealed_by(&mut writer.file, t).map_err(err)?;
        }
        let (tx, rx) = channel::bounded(4096);
        let thread = std::thread::Builder::new()
            .name("loupe-audit".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| err(format!("cannot start the writer thread: {e}")))?;
        Ok(AuditLog {
            sink: AuditSink { tx },
            thread: Some(thread),
            path,
            health,
        })
    }

    /// Whether the writer's writes fail, and what it keeps meanwhile.
    pub fn health(&self) -> AuditHealth {
        self.health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn sink(&self) -> AuditSink {
        self.sink.clone()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Returns once every record submitted before the call is on disk.
    pub fn flush(&self) -> Result<()> {
        let (tx, rx) = channel::bounded(1);
        self.sink
            .tx
            .send(Msg::Flush(tx))
            .map_err(|_| self.stopped())?;
        rx.recv().map_err(|_| self.stopped())?
    }

    fn stopped(&self) -> HsmError {
        HsmError::Audit {
            path: self.path.display().to_string(),
            reason: "the audit writer has stopped".into(),
        }
    }

    /// Writes what is pending, seals it with a shutdown checkpoint and stops
    /// the writer. Every other sink must have been dropped (or stopped
    /// sending) for the writer to see the end.
    pub fn close(mut self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        // Replace our sender so the channel disconnects once the other
        // sinks are gone.
        let (dead, _) = channel::bounded(1);
        drop(std::mem::replace(&mut self.sink.tx, dead));
        // The writer writes what is left, then signs a last checkpoint: a
        // hung HSM may never answer that signature. The records are on
        // disk before it; after a while the checkpoint is given up (the
        // next start's first checkpoint seals them), so a hung HSM cannot
        // hold the engine's shutdown.
        match crate::join_by(thread, Instant::now() + CLOSE_GRACE) {
            Ok(joined) => joined.map_err(|_| self.stopped())?,
            Err(_) => Err(HsmError::Audit {
                path: self.path.display().to_string(),
                reason: format!(
                    "its last checkpoint was not signed within {} s (a hung HSM?): the records \
                     are written, unsealed until the next checkpoint",
                    CLOSE_GRACE.as_secs()
                ),
            }),
        }
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            eprintln!("loupe: audit log {}: {e}", self.path.display());
        }
    }
}

struct Writer {
    file: File,
    /// Records not yet on disk: taken from the channel, kept across failed
    /// writes (at most [`MAX_PENDING`] taken while failing).
    pending: Vec<Entry>,
    /// After a failed write: no new attempt before then.
    retry_at: Option<Instant>,
    /// Why the last write failed, while it does.
    failure: Option<String>,
    /// A failed write left bytes that could not be cut off: (where our
    /// log ended, the length it was left at).
    torn: Option<(u64, u64)>,
    health: Arc<Mutex<AuditHealth>>,
    path: PathBuf,
    /// [`log_path`] of `path`, recorded in the token's heads.
    canonical: String,
    /// Where the chain stands: what a batch moves, and a failed write puts
    /// back.
    chain: Chain,
    /// The last signed checkpoint of the batch being built: (seq, hash,
    /// offset of its line in the batch).
    signed: Option<(u64, String, usize)>,
    config: AuditConfig,
    session: Option<TokenSession>,
}

impl Writer {
    fn err(&self, reason: String) -> HsmError {
        HsmError::Audit {
            path: self.path.display().to_string(),
            reason,
        }
    }

    fn run(mut self, rx: Receiver<Msg>) -> Result<()> {
        loop {
            let mut timeout = match self.chain.first_unsealed {
                Some(t) => self.config.checkpoint_interval.saturating_sub(t.elapsed()),
                None => Duration::from_secs(3600),
            };
            if let Some(t) = self.retry_at {
                timeout = timeout.min(t.saturating_duration_since(Instant::now()));
            }
            let mut next = if self.pending.len() < MAX_PENDING {
                match rx.recv_timeout(timeout) {
                    Ok(m) => Some(m),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            } else {
                // Kept as many as we may: the rest waits in the channel
                // (its senders block) until a write goes through.
                std::thread::sleep(timeout);
                None
            };
            let mut flushes = Vec::new();
            while let Some(msg) = next.take() {
                match msg {
                    Msg::Entries(e) => self.pending.extend(e),
                    Msg::Flush(done) => flushes.push(done),
                }
                if self.pending.len() < MAX_PENDING {
                    next = rx.try_recv().ok();
                }
            }
            self.set_health(|h| h.pending = self.pending.len() as u64);
            let started = Instant::now();
            let due = self
                .chain
                .first_unsealed
                .is_some_and(|t| t.elapsed() >= self.config.checkpoint_interval);
            let may = self.retry_at.is_none_or(|t| Instant::now() >= t);
            let wrote = may && !self.pending.is_empty();
            let result = if may && (wrote || due) {
                let r = self.with_lock(|w| w.append(due.then_some("interval")));
                self.attempted(&r);
                r
            } else {
                match &self.failure {
                    Some(e) => Err(self.err(e.clone())),
                    None => Ok(()),
                }
            };
            for done in flushes {
                let _ = done.send(match &result {
                    Ok(()) => Ok(()),
                    Err(e) => Err(self.err(e.to_string())),
                });
            }
            if wrote && result.is_ok() {
                // Let the next group gather (the channel holds 4096 batches).
                std::thread::sleep(self.config.sync_interval.saturating_sub(started.elapsed()));
            }
        }
        self.shutdown()
    }

    /// The last records and the shutdown checkpoint. A disk still failing
    /// gets a few more tries; records that cannot be written then go to
    /// stderr (the service's journal), unchained, rather than nowhere.
    fn shutdown(&mut self) -> Result<()> {
        let mut tries = 0;
        while !self.pending.is_empty() || self.chain.unsealed > 0 || self.chain.reseal {
            let r = self.with_lock(|w| w.append(Some("shutdown")));
            self.attempted(&r);
            let Err(e) = r else { break };
            tries += 1;
            if tries < 3 {
                std::thread::sleep(self.config.retry_interval);
                continue;
            }
            if !self.pending.is_empty() {
                eprintln!(
                    "loupe: audit log {}: {} records could not be written at shutdown; \
                     they follow, unchained:",
                    self.path.display(),
                    self.pending.len()
                );
                for e in &self.pending {
                    eprintln!(
                        "{}",
                        serde_json::to_string(&record_of(e)).unwrap_or_default()
                    );
                }
            }
            return Err(e);
        }
        Ok(())
    }

    fn set_health(&self, f: impl FnOnce(&mut AuditHealth)) {
        f(&mut self.health.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Books a write attempt: a failure is said on stderr (when it starts
    /// or its reason changes), counted and retried later with the records
    /// kept; the first success after failures is said too.
    fn attempted(&mut self, r: &Result<()>) {
        let pending = self.pending.len();
        match r {
            Ok(()) => {
                self.retry_at = None;
                if let Some(e) = self.failure.take() {
                    eprintln!(
                        "loupe: audit log {}: writing again (it failed: {e}); no record was lost",
                        self.path.display()
                    );
                    self.set_health(|h| h.recoveries += 1);
                }
                self.set_health(|h| {
                    h.failing = false;
                    h.pending = pending as u64;
                });
            }
            Err(e) => {
                let reason = e.to_string();
                self.retry_at = Some(Instant::now() + self.config.retry_interval);
                if self.failure.as_ref() != Some(&reason) {
                    eprintln!(
                        "loupe: AUDIT LOG NOT WRITTEN: {reason}; {pending} records kept in \
                         memory, retried every {:?}",
                        self.config.retry_interval
                    );
                }
                self.set_health(|h| {
                    h.failing = true;
                    h.pending = pending as u64;
                    h.write_errors += 1;
                    h.last_error = Some(reason.clone());
                });
                self.failure = Some(reason);
            }
        }
    }

    /// Runs `f` holding an exclusive flock on the log.
    fn with_lock<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        let fd = self.file.as_raw_fd();
        // SAFETY: fd is an open descriptor owned by self.file for the
        // duration of the call.
        if unsafe { libc::flock(fd, libc::LOCK_EX) } != 0 {
            return Err(self.err(format!("flock: {}", std::io::Error::last_os_error())));
        }
        let out = f(self);
        // SAFETY: as above.
        unsafe { libc::flock(fd, libc::LOCK_UN) };
        out
    }

    /// Re-reads the tail if the file is not where we left it: another
    /// process appended, or this is the first look.
    fn resync(&mut self) -> Result<()> {
        let len = self
            .file
            .metadata()
            .map_err(|e| self.err(format!("stat: {e}")))?
            .len();
        if len == self.chain.end {
            return Ok(());
        }
        if len < self.chain.end {
            // Writers only append: someone else cut or emptied the file.
            // Appending goes on (key uses must be recorded), but the
            // token's head is not moved back (see `record_head`).
            eprintln!(
                "loupe: audit log {}: the file shrank from {} to {len} bytes under the \
                 writer: it was cut or replaced; check it with `loupe audit verify`",
                self.path.display(),
                self.chain.end
            );
        }
        if len < self.chain.end || self.chain.log_id.is_none() {
            self.chain.log_id = line_at(&self.file, 0).map(|l| hex(&Sha256::digest(l)));
        }
        let Some(last) = last_line(&mut self.file, len).map_err(|e| self.err(e))? else {
            (self.chain.seq, self.chain.head, self.chain.end) = (0, GENESIS.to_string(), 0);
            return Ok(());
        };
        let rec: Record = serde_json::from_slice(&last).map_err(|e| {
            self.err(format!(
                "the last record is not valid ({e}); run `loupe audit verify` before appending"
            ))
        })?;
        self.chain.seq = rec.seq;
        self.chain.head = hex(&Sha256::digest(&last));
        self.chain.end = len;
        Ok(())
    }

    /// Writes the pending records, and a checkpoint when `seal` says so
    /// (or the count does). A failed write changes nothing: the pending
    /// records stay, the chain state is put back, and what the write left
    /// of a line is cut off, so the next attempt re-reads a whole tail.
    fn append(&mut self, seal: Option<&str>) -> Result<()> {
        self.repair_torn()?;
        self.resync()?;
        let saved = self.chain.clone();
        let mut buf = Vec::new();
        let entries = std::mem::take(&mut self.pending);
        for e in &entries {
            self.push(&mut buf, record_of(e));
            self.chain.unsealed += 1;
            self.chain.first_unsealed.get_or_insert_with(Instant::now);
            if self.chain.unsealed >= self.config.checkpoint_every {
                self.seal(&mut buf, "count");
            }
        }
        if let Some(reason) = seal {
            if self.chain.unsealed > 0 || self.chain.reseal {
                self.seal(&mut buf, reason);
            }
        }
        if buf.is_empty() {
            return Ok(());
        }
        let base = self.chain.end;
        let signed = self.signed.take();
        if let Err(e) = self
            .file
            .write_all(&buf)
            .and_then(|()| self.file.sync_data())
        {
            self.pending = entries;
            self.chain = saved;
            self.cut_back();
            return Err(self.err(format!("write: {e}")));
        }
        self.chain.end += buf.len() as u64;
        if let Some((seq, hash, at)) = signed {
            let head = self.chain.log_id.clone().map(|log| Head {
                log,
                seq,
                hash,
                offset: base + at as u64,
                path: Some(self.canonical.clone()),
                superseded_by: None,
            });
            // The checkpoint is on disk and signed whatever happens here;
            // a head left behind only weakens the check of a cut tail.
            if let Err(e) = head
                .ok_or_else(|| "the log has no id".to_string())
                .and_then(|h| self.record_head(h))
            {
                eprintln!(
                    "loupe: audit log {}: the token's head was not moved to seq {seq}: {e}",
                    self.path.display()
                );
            }
        }
        Ok(())
    }

    /// After a failed write, under the lock: cuts off what it left beyond
    /// the last whole record (part of a line, or lines not known to be on
    /// disk), as they will be written again. If that fails too, it is tried
    /// again before the next write, unless the file changed meanwhile.
    fn cut_back(&mut self) {
        let Ok(len) = self.file.metadata().map(|m| m.len()) else {
            return;
        };
        if len > self.chain.end {
            if let Err(e) = self.file.set_len(self.chain.end) {
                eprintln!(
                    "loupe: audit log {}: cannot cut the failed write's {} bytes: {e}",
                    self.path.display(),
                    len - self.chain.end
                );
                self.torn = Some((self.chain.end, len));
            }
        }
    }

    fn repair_torn(&mut self) -> Result<()> {
        let Some((end, left)) = self.torn else {
            return Ok(());
        };
        let len = self
            .file
            .metadata()
            .map_err(|e| self.err(format!("stat: {e}")))?
            .len();
        if len == left {
            self.file
                .set_len(end)
                .map_err(|e| self.err(format!("cutting a failed write's bytes: {e}")))?;
        }
        self.torn = None;
        Ok(())
    }

    /// Moves the token's head for this log to `new`, after checking that
    /// the file still holds the record the old head names: a writer that
    /// appends to a log cut behind its back must not make the token forget
    /// the cut.
    fn record_head(&mut self, mut new: Head) -> std::result::Result<(), String> {
        let old = self.with_session(|s| Head::read(s, &new.log))?;
        if old.is_none() {
            // This log's first head: say so if it takes another's path.
            let others = self.with_session(|s| Head::all(s))?;
            let path = &self.canonical;
            for h in others.iter().filter(|h| h.claims(path)) {
                eprintln!(
                    "loupe: audit log {path}: the token's head names another log at this path \
                     (first record sha256 {}, seq {}): this log replaced it, and \
                     `loupe audit verify` fails until an operator records that it did so on \
                     purpose with `loupe audit reset-head`",
                    h.log, h.seq
                );
            }
        }
        if let Some(old) = old {
            new.superseded_by = old.superseded_by.clone();
            let kept = || format!("the head stays at seq {}", old.seq);
            if old.seq >= new.seq {
                return Err(format!(
                    "the token's head for this log is seq {}, not before this checkpoint: \
                     the log was cut or rewritten; {}",
                    old.seq,
                    kept()
                ));
            }
            let there = line_at(&self.file, old.offset).map(|l| hex(&Sha256::digest(l)));
            if there.as_deref() != Some(old.hash.as_str()) {
                return Err(format!(
                    "the file no longer holds the record the token's head names (seq {} at \
                     byte {}): the log was cut or rewritten; {}",
                    old.seq,
                    old.offset,
                    kept()
                ));
            }
        }
        self.with_session(|s| new.write(s))
    }

    /// Runs `f` on the audit token's session, re-opening it once if it was
    /// lost (the token may have been reset under us).
    fn with_session<T>(
        &mut self,
        mut f: impl FnMut(&mut TokenSession) -> Result<T>,
    ) -> std::result::Result<T, String> {
        let Some(s) = self.session.as_mut() else {
            return Err("no audit key configured".into());
        };
        match f(s) {
            Err(e) if e.is_session_lost() => {
                let t = self
                    .config
                    .audit_token
                    .as_ref()
                    .expect("session implies token");
                *s = t.session().map_err(|e| e.to_string())?;
                f(s).map_err(|e| e.to_string())
            }
            other => other.map_err(|e| e.to_string()),
        }
    }

    /// Appends `rec` to `buf`; returns where its line starts in `buf`.
    fn push(&mut self, buf: &mut Vec<u8>, mut rec: Record) -> usize {
        self.chain.seq += 1;
        let start = buf.len();
        self.chain.head = rec.link(self.chain.seq, std::mem::take(&mut self.chain.head), buf);
        if self.chain.seq == 1 {
            self.chain.log_id = Some(self.chain.head.clone());
        }
        start
    }

    /// Appends a checkpoint record sealing everything before it.
    fn seal(&mut self, buf: &mut Vec<u8>, reason: &str) {
        let time = rfc3339(SystemTime::now());
        let token = self
            .config
            .audit_token
            .as_ref()
            .map(|t| t.label().to_string())
            .unwrap_or_default();
        let msg = checkpoint_message(self.chain.seq + 1, &time, &self.chain.head);
        let signed = self.with_session(|s| s.sign(AUDIT_KEY_LABEL, AUDIT_MECH, &msg));
        if signed.is_err() && self.chain.unsealed == 0 {
            // A retry with nothing new since the unsigned checkpoint before:
            // another unsigned one would add nothing. Try again later.
            self.chain.first_unsealed = Some(Instant::now());
            return;
        }
        let (result, sig) = match signed {
            Ok(sig) => ("ok".to_string(), Some(hex(&sig))),
            Err(e) => {
                eprintln!("loupe: audit checkpoint left unsigned: {e}");
                (format!("error: {e}"), None)
            }
        };
        let was_signed = sig.is_some();
        let rec = Record {
            seq: 0,
            time,
            kind: Kind::Checkpoint,
            token,
            key: AUDIT_KEY_LABEL.to_string(),
            mech: Some(AUDIT_MECH.name().to_string()),
            purpose: format!("checkpoint ({reason})"),
            requester: "loupe-audit".to_string(),
            result,
            head: None,
            sig,
            prev: String::new(),
        };
        let at = self.push(buf, rec);
        self.chain.unsealed = 0;
        self.chain.reseal = !was_signed;
        if was_signed {
            self.signed = Some((self.chain.seq, self.chain.head.clone(), at));
            self.chain.first_unsealed = None;
        } else {
            self.chain.first_unsealed = Some(Instant::now());
        }
    }
}

/// A writer's chain state.
#[derive(Clone)]
struct Chain {
    /// File length after our last write (to notice other writers).
    end: u64,
    seq: u64,
    head: String,
    /// The log's id (hash of its first record), once it has one.
    log_id: Option<String>,
    unsealed: u64,
    first_unsealed: Option<Instant>,
    /// The last checkpoint went unsigned: seal again at the next interval,
    /// so that a signed checkpoint covers it once the HSM is back.
    reseal: bool,
}

fn record_of(e: &Entry) -> Record {
    Record {
        seq: 0,
        time: rfc3339(e.time),
        kind: e.kind,
        token: e.token.clone(),
        key: e.key.clone(),
        mech: e.mech.map(|m| m.name().to_string()),
        purpose: e.purpose.clone(),
        requester: e.requester.clone(),
        result: match &e.result {
            Ok(()) => "ok".to_string(),
            Err(msg) => format!("error: {msg}"),
        },
        head: None,
        sig: None,
        prev: String::new(),
    }
}

/// The line starting at byte `offset` of `file`, without its newline; `None`
/// if there is no whole line there.
fn line_at(file: &File, offset: u64) -> Option<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mut line = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = file
            .read_at(&mut chunk, offset + line.len() as u64)
            .ok()
            .filter(|&n| n > 0)?;
        if let Some(i) = chunk[..n].iter().position(|&b| b == b'\n') {
            line.extend_from_slice(&chunk[..i]);
            return Some(line);
        }
        line.extend_from_slice(&chunk[..n]);
        // No record is this long: not a log's line.
        if line.len() as u64 > MAX_RECORD_LINE {
            return None;
        }
    }
}

/// How far back from its end a log is searched for its last signed
/// checkpoint when it is opened.
const SEALED_BY_WINDOW: u64 = 4 << 20;

/// Refuses a log whose last signed checkpoint (within the last
/// [`SEALED_BY_WINDOW`] bytes) does not verify with `token`'s audit key:
/// another token's key sealed it, and records sealed by two keys would
/// leave a log no single token verifies.
fn sealed_by(file: &mut File, token: &Token) -> std::result::Result<(), String> {
    let len = file.metadata().map_err(|e| format!("stat: {e}"))?.len();
    let start = len.saturating_sub(SEALED_BY_WINDOW);
    let mut tail = vec![0u8; (len - start) as usize];
    file.seek(SeekFrom::Start(start))
        .and_then(|_| file.read_exact(&mut tail))
        .map_err(|e| format!("read: {e}"))?;
    let last = tail
        .split(|&b| b == b'\n')
        .rev()
        .filter_map(|l| serde_json::from_slice::<Record>(l).ok())
        .find(|r| r.kind == Kind::Checkpoint && r.sig.is_some());
    let Some(rec) = last else {
        return Ok(());
    };
    let Some(sig) = rec.sig.as_deref().and_then(unhex) else {
        return Ok(());
    };
    let public = token
        .session()
        .and_then(|s| s.public_key(AUDIT_KEY_LABEL))
        .map_err(|e| e.to_string())?;
    let msg = checkpoint_message(rec.seq, &rec.time, &rec.prev);
    if verify_sig(&public, AUDIT_MECH, &msg, &sig) {
        return Ok(());
    }
    Err(format!(
        "it is sealed by another audit key (record seq {}, token {:?} in its records), not \
         token {:?}'s: give this token its own audit log",
        rec.seq,
        rec.token,
        token.label()
    ))
}

/// The last complete line of a file of length `len`, without its newline;
/// `None` for an empty file. A file not ending in a newline is an error: a
/// record was cut short.
fn last_line(file: &mut File, len: u64) -> std::result::Result<Option<Vec<u8>>, String> {
    if len == 0 {
        return Ok(None);
    }
    let mut tail = Vec::new();
    let mut chunk = 4096u64;
    loop {
        let start = len.saturating_sub(chunk);
        tail.resize((len - start) as usize, 0);
        file.seek(SeekFrom::Start(start))
            .and_then(|_| file.read_exact(&mut tail))
            .map_err(|e| format!("read: {e}"))?;
        if tail.last() != Some(&b'\n') {
            return Err(
                "the last record is cut short (no newline): a write was interrupted; \
                        run `loupe audit verify` and repair the tail before appending"
                    .into(),
            );
        }
        let body = &tail[..tail.len() - 1];
        if let Some(i) = body.iter().rposition(|&b| b == b'\n') {
            return Ok(Some(body[i + 1..].to_vec()));
        }
        if start == 0 {
            return Ok(Some(body.to_vec()));
        }
        if chunk > MAX_RECORD_LINE {
            return Err(format!(
                "the last line is longer than {MAX_RECORD_LINE} bytes: not a record"
            ));
        }
        chunk *= 4;
    }
}

/// What [`verify_with`] checks a log against.
#[derive(Clone, Debug)]
pub struct VerifyOptions<'a> {
    /// The audit public keys (EC P-256) checkpoints must verify with.
    pub keys: &'a [PublicKey],
    /// Accept records after the last signed checkpoint: a log a writer is
    /// still appending to. They are counted, and nothing protects them yet.
    pub allow_open_tail: bool,
    /// The token's head for this log ([`token_head`]), or `Unchecked`
    /// away from the token.
    pub head: HeadCheck,
}

/// What is known of the token's head for the log being verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeadCheck {
    /// Not read: the log is verified away from the token, and a cut at its
    /// end, checkpoints included, cannot be seen.
    Unchecked,
    /// Read from the token.
    Token {
        /// The head it holds for this log, if any.
        head: Option<Head>,
        /// Heads of other logs that claim this log's path: it was replaced.
        others: Vec<Head>,
        /// Heads of other logs that this one superseded at its path.
        superseded: Vec<Head>,
    },
}

/// What became of the head check in a log that verified.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HeadFound {
    /// Not checked (see [`HeadCheck::Unchecked`]).
    #[default]
    Unchecked,
    /// The token holds no head for this log: a log whose first signed
    /// checkpoint the token has not recorded (or one from before heads
    /// were kept). A cut at its end cannot be seen either.
    NotRecorded,
    /// The file holds the record the token's head names, at this seq.
    Matched(u64),
}

/// What [`verify_with`] found in a log that passed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub records: u64,
    pub checkpoints: u64,
    /// Sequence number of the last checkpoint with a valid signature.
    pub sealed_through: Option<u64>,
    /// Records after that checkpoint: the open tail (non-zero only when it
    /// was allowed).
    pub unsealed: u64,
    /// Checkpoints written without a signature (the HSM failed then), each
    /// sealed by a later signed checkpoint.
    pub unsigned_checkpoints: Vec<u64>,
    /// The log's id: SHA-256 of its first record.
    pub log_id: String,
    pub head: HeadFound,
    /// The heads of the logs this one deliberately replaced at its path.
    pub superseded: Vec<Head>,
}

/// What kind of failure [`Broken`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Problem {
    /// The file cannot be read, a line is not a record, or the last one is
    /// cut short.
    Malformed,
    /// A record was deleted, inserted, reordered or altered.
    Chain,
    /// A checkpoint's signature does not verify (or there is no key).
    Signature,
    /// A checkpoint without a signature that no later one seals.
    Unsigned,
    /// Records after the last signed checkpoint, and no open tail allowed.
    OpenTail,
    /// The file holds no record.
    NoRecords,
    /// The file ends before the token's head.
    Truncated,
    /// The file's record at the token's head is another one.
    Rewritten,
    /// Another log's head claims the file's path: the whole log was
    /// replaced by another one.
    Replaced,
}

/// Why a log does not verify: the first broken record, or what is wrong
/// with the log as a whole (`line` 0).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct Broken {
    pub line: u64,
    pub seq: Option<u64>,
    pub problem: Problem,
    pub reason: String,
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.line, self.seq) {
            (0, _) => write!(f, "{}", self.reason),
            (line, Some(seq)) => write!(f, "line {line} (record seq {seq}): {}", self.reason),
            (line, None) => write!(f, "line {line}: {}", self.reason),
        }
    }
}

/// The log's id (SHA-256 of its first line), if the file has a whole first
/// line.
pub fn log_id(path: &Path) -> Option<String> {
    // Only a regular file has one (a FIFO would block, a device not end).
    let file = open_log(path).ok()?;
    line_at(&file, 0).map(|l| hex(&Sha256::digest(l)))
}

/// Reads the head `token` holds for the log at `path`, and the heads of
/// other logs at that path. A file without a first record has no head (and
/// [`verify_with`] says what is wrong).
pub fn token_head(token: &Token, path: &Path) -> Result<HeadCheck> {
    let session = token.session()?;
    let id = log_id(path);
    let head = match &id {
        Some(id) => Head::read(&session, id)?,
        None => None,
    };
    let at = log_path(path);
    let (mut others, mut superseded) = (Vec::new(), Vec::new());
    for h in Head::all(&session)? {
        if Some(&h.log) == id.as_ref() {
            continue;
        }
        if h.claims(&at) {
            others.push(h);
        } else if id.is_some() && h.superseded_by == id {
            superseded.push(h);
        }
    }
    Ok(HeadCheck::Token {
        head,
        others,
        superseded,
    })
}

/// Records that the log `log` writes deliberately takes the place of the
/// logs whose heads the token holds for its path (an operator started a new
/// log, or the old one was moved away): one [`Kind::Supersede`] record per
/// head in the log (its first record, for a new file), written before
/// the heads are marked superseded by this log's id. Returns the heads
/// superseded (none: nothing to do, nothing recorded). The log's own head
/// follows at its next signed checkpoint (at the latest when it closes).
pub fn supersede(
    token: &Token,
    log: &AuditLog,
    reason: &str,
    requester: &str,
) -> Result<Vec<Head>> {
    let session = token.session()?;
    let at = log_path(log.path());
    let current = log_id(log.path());
    let heads: Vec<Head> = Head::all(&session)?
        .into_iter()
        .filter(|h| h.claims(&at) && Some(&h.log) != current.as_ref())
        .collect();
    if heads.is_empty() {
        return Ok(heads);
    }
    log.sink().record(
        heads
            .iter()
            .map(|h| {
                Entry::now(
                    Kind::Supersede,
                    token.label(),
                    HEAD_LABEL.trim_end_matches('/'),
                    &format!(
                        "new log at {at} supersedes log {} (head seq {}, sha256 {}): {reason}",
                        h.log, h.seq, h.hash
                    ),
                    requester,
                )
            })
            .collect(),
    )?;
    log.flush()?;
    let id = log_id(log.path()).ok_or_else(|| HsmError::Audit {
        path: at.clone(),
        reason: "no whole first record after the supersede record was written".into(),
    })?;
    for h in &heads {
        Head {
            superseded_by: Some(id.clone()),
            ..h.clone()
        }
        .write(&session)?;
    }
    Ok(heads)
}

/// Verifies the log at `path` with the audit key and the head held by
/// `token`, where the log is sealed: the full check. The outer error is
/// the token's; the inner one the log's.
pub fn verify_on_token(
    path: &Path,
    token: &Token,
    allow_open_tail: bool,
) -> Result<std::result::Result<VerifyReport, Broken>> {
    let keys = [public_key(token)?];
    let head = token_head(token, path)?;
    Ok(verify_with(
        path,
        &VerifyOptions {
            keys: &keys,
            allow_open_tail,
            head,
        },
    ))
}

/// Checks the log's records against `keys` alone, away from the token: no
/// open tail, head unchecked. See [`verify_with`].
pub fn verify(path: &Path, keys: &[PublicKey]) -> std::result::Result<VerifyReport, Broken> {
    verify_with(
        path,
        &VerifyOptions {
            keys,
            allow_open_tail: false,
            head: HeadCheck::Unchecked,
        },
    )
}

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// The longest line a record can take (records are a few hundred bytes;
/// a reason given to `reset-head` is the longest part). Past it, reading
/// stops: a log replaced by `/dev/zero` or a file without newlines cannot
/// exhaust memory.
const MAX_RECORD_LINE: u64 = 1 << 20;

/// Opens a log to verify: a regular file. Opened non-blocking so that a
/// FIFO named by mistake is an error at once, not a verifier stuck in
/// `open` or `read`.
fn open_log(path: &Path) -> std::result::Result<File, String> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("cannot open: {e}"))?;
    let t = file
        .metadata()
        .map_err(|e| format!("cannot stat: {e}"))?
        .file_type();
    if t.is_file() {
        return Ok(file);
    }
    let kind = if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else {
        "a device"
    };
    Err(format!("not a regular file ({kind}): an audit log is one"))
}

/// Checks every record's sequence number and back-link, every checkpoint's
/// signature, that every record is sealed by a signed checkpoint after it
/// (but an open tail, when allowed), and that the file holds the record the
/// token's head names. Reports the first broken record; whole-log failures
/// (no records, another log's head claiming the path, a cut end, an
/// unsigned or open tail) are checked after the chain, in that order.
pub fn verify_with(
    path: &Path,
    opts: &VerifyOptions<'_>,
) -> std::result::Result<VerifyReport, Broken> {
    let broken = |line: u64, seq: Option<u64>, problem: Problem, reason: String| Broken {
        line,
        seq,
        problem,
        reason,
    };
    let file = open_log(path).map_err(|e| broken(0, None, Problem::Malformed, e))?;
    let head = match &opts.head {
        HeadCheck::Token { head, .. } => head.as_ref(),
        HeadCheck::Unchecked => None,
    };
    let mut reader = BufReader::new(file);
    let mut report = VerifyReport::default();
    let mut prev_hash = GENESIS.to_string();
    let mut expect_seq = 1u64;
    let mut line_no = 0u64;
    let mut buf = Vec::new();
    // Unsigned checkpoints since the last signed one: (line, seq, result).
    let mut unsigned: Vec<(u64, u64, String)> = Vec::new();
    // The first record after the last signed checkpoint: (line, seq).
    let mut open_from: Option<(u64, u64)> = None;
    loop {
        buf.clear();
        let n = reader
            .by_ref()
            .take(MAX_RECORD_LINE + 1)
            .read_until(b'\n', &mut buf)
            .map_err(|e| broken(line_no + 1, None, Problem::Malformed, format!("read: {e}")))?;
        if n == 0 {
            break;
        }
        line_no += 1;
        if n as u64 > MAX_RECORD_LINE {
            return Err(broken(
                line_no,
                None,
                Problem::Malformed,
                format!("a line longer than {MAX_RECORD_LINE} bytes: not a record"),
            ));
        }
        if buf.last() != Some(&b'\n') {
            return Err(broken(
                line_no,
                None,
                Problem::Malformed,
                "the record is cut short (no newline)".into(),
            ));
        }
        let line = &buf[..buf.len() - 1];
        let rec: Record = serde_json::from_slice(line).map_err(|e| {
            broken(
                line_no,
                None,
                Problem::Malformed,
                format!("not a valid record: {e}"),
            )
        })?;
        let at = Some(rec.seq);
        let chain = |reason: String| broken(line_no, at, Problem::Chain, reason);
        if rec.seq != expect_seq {
            return Err(chain(format!(
                "sequence number {} where {expect_seq} was expected: records were \
                 deleted, inserted or reordered here",
                rec.seq
            )));
        }
        if rec.prev != prev_hash {
            return Err(chain(format!(
                "its back-link does not match the hash of the record before it: record \
                 {} was altered (or this one was)",
                rec.seq - 1
            )));
        }
        let hash = hex(&Sha256::digest(line));
        if rec.seq == 1 {
            report.log_id = hash.clone();
        }
        if let Some(h) = head {
            let rewritten = if rec.seq == 1 && h.log != hash {
                Some(format!(
                    "the token's head is for another log (id {}), not this one: the log \
                     was rewritten from its first record",
                    h.log
                ))
            } else if rec.seq == h.seq && h.hash != hash {
                Some(format!(
                    "this is not the record the token's head names (sha256 {}): the log was \
                     rewritten here or before",
                    h.hash
                ))
            } else {
                None
            };
            if let Some(reason) = rewritten {
                return Err(broken(line_no, at, Problem::Rewritten, reason));
            }
        }
        if rec.kind == Kind::Checkpoint {
            report.checkpoints += 1;
            if rec.head.as_deref() != Some(rec.prev.as_str()) {
                return Err(chain("checkpoint head differs from its back-link".into()));
            }
            match &rec.sig {
                None => unsigned.push((line_no, rec.seq, rec.result.clone())),
                Some(sig_hex) => {
                    let bad_sig = |reason: String| broken(line_no, at, Problem::Signature, reason);
                    let sig =
                        unhex(sig_hex).ok_or_else(|| bad_sig("signature is not hex".into()))?;
                    let msg = checkpoint_message(rec.seq, &rec.time, &rec.prev);
                    if !opts
                        .keys
                        .iter()
                        .any(|k| verify_sig(k, AUDIT_MECH, &msg, &sig))
                    {
                        return Err(bad_sig(if opts.keys.is_empty() {
                            "no audit public key was given to check the checkpoint".into()
                        } else {
                            "the checkpoint signature does not verify with the audit key".into()
                        }));
                    }
                    report.sealed_through = Some(rec.seq);
                    report.unsealed = 0;
                    report
                        .unsigned_checkpoints
                        .extend(unsigned.drain(..).map(|(_, seq, _)| seq));
                    open_from = None;
                }
            }
        } else {
            report.unsealed += 1;
            open_from.get_or_insert((line_no, rec.seq));
        }
        report.records += 1;
        prev_hash = hash;
        expect_seq += 1;
    }
    let last = report.records;
    if last == 0 {
        return Err(broken(
            0,
            None,
            Problem::NoRecords,
            "no records: the file is empty".into(),
        ));
    }
    if let HeadCheck::Token {
        others, superseded, ..
    } = &opts.head
    {
        if let Some(h) = others.first() {
            return Err(broken(
                0,
                None,
                Problem::Replaced,
                format!(
                    "the log at {} was replaced: the token's head names another log (first \
                     record sha256 {}, seq {}){}; if a new log was started there on purpose, \
                     record that with `loupe audit reset-head`",
                    h.path.as_deref().unwrap_or_default(),
                    h.log,
                    h.seq,
                    match others.len() - 1 {
                        0 => String::new(),
                        n => format!(" and {} more", plural(n as u64, "log", "logs")),
                    }
                ),
            ));
        }
        report.superseded = superseded.clone();
    }
    report.head = match (&opts.head, head) {
        (HeadCheck::Unchecked, _) => HeadFound::Unchecked,
        (HeadCheck::Token { .. }, None) => HeadFound::NotRecorded,
        (HeadCheck::Token { .. }, Some(h)) if h.seq > last => {
            return Err(broken(
                0,
                None,
                Problem::Truncated,
                format!(
                    "the log ends at seq {last} but the token's head is seq {}: the log was \
                     truncated (at least {} cut from its end, checkpoints included)",
                    h.seq,
                    plural(h.seq - last, "record", "records")
                ),
            ));
        }
        (HeadCheck::Token { .. }, Some(h)) => HeadFound::Matched(h.seq),
    };
    if let Some((line, seq, result)) = unsigned.into_iter().next() {
        let why = if result == "ok" {
            "its result says ok, so the signature was removed".to_string()
        } else {
            format!("its writer could not sign ({result})")
        };
        return Err(broken(
            line,
            Some(seq),
            Problem::Unsigned,
            format!(
                "checkpoint at seq {seq} has no signature, and no later signed checkpoint \
                 seals it: {why}"
            ),
        ));
    }
    if let Some((line, seq)) = open_from.filter(|_| !opts.allow_open_tail) {
        let n = report.unsealed;
        let reason = match report.sealed_through {
            Some(sealed) => format!(
                "{} after the last signed checkpoint (seq {sealed}) {} unsealed",
                plural(n, "record", "records"),
                if n == 1 { "is" } else { "are" }
            ),
            None => format!(
                "no signed checkpoint: all {} unsealed",
                plural(n, "record is", "records are")
            ),
        };
        return Err(broken(line, Some(seq), Problem::OpenTail, reason));
    }
    Ok(report)
}

/// Verifies a signature made by the signer (DER ECDSA or raw RSA) in
/// software with ring. Used by `audit verify` and by tests.
pub fn verify_sig(key: &PublicKey, mech: SignMech, msg: &[u8], sig: &[u8]) -> bool {
    use ring::signature as rs;
    let alg: &dyn rs::VerificationAlgorithm = match (key.alg, mech) {
        (KeyAlg::EcP256, SignMech::EcdsaP256Sha256) => &rs::ECDSA_P256_SHA256_ASN1,
        (KeyAlg::EcP384, SignMech::EcdsaP384Sha384) => &rs::ECDSA_P384_SHA384_ASN1,
        (KeyAlg::Rsa2048 | KeyAlg::Rsa3072, SignMech::RsaPkcs1Sha256) => {
            &rs::RSA_PKCS1_2048_8192_SHA256
        }
        (KeyAlg::Rsa2048 | KeyAlg::Rsa3072, SignMech::RsaPkcs1Sha384) => {
            &rs::RSA_PKCS1_2048_8192_SHA384
        }
        (KeyAlg::Rsa2048 | KeyAlg::Rsa3072, SignMech::RsaPssSha256) => {
            &rs::RSA_PSS_2048_8192_SHA256
        }
        (KeyAlg::Rsa2048 | KeyAlg::Rsa3072, SignMech::RsaPssSha384) => {
            &rs::RSA_PSS_2048_8192_SHA384
        }
        _ => return false,
    };
    rs::UnparsedPublicKey::new(alg, &key.raw)
        .verify(msg, sig)
        .is_ok()
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// RFC 3339 UTC time with milliseconds, e.g. `2026-11-27T04:00:00.123Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_matches_known_instants() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_795_752_000_123);
        assert_eq!(rfc3339(t), "2026-11-27T04:00:00.123Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn hex_round_trips_and_rejects_junk() {
        assert_eq!(hex(&[0, 0xab, 0xff]), "00abff");
        assert_eq!(unhex("00abff").unwrap(), [0, 0xab, 0xff]);
        assert!(unhex("abc").is_none());
        assert!(unhex("zz").is_none());
    }
}
