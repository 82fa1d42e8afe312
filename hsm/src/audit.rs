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
//! rewrites the whole file cannot forge. [`verify`] reports the first broken
//! record and how much of the log is sealed by a valid signature.

use std::{
    fs::{File, OpenOptions},
    io::{BufRead, BufReader, Read, Seek, SeekFrom, Write},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
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
const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What a record is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Sign,
    Keygen,
    Destroy,
    Checkpoint,
    /// TLS session secrets are exported (a decryption profile's key log
    /// was turned on): whoever reads the file can decrypt those sessions.
    KeyLog,
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
}

impl AuditConfig {
    pub fn new(path: &Path, audit_token: Option<Token>) -> AuditConfig {
        AuditConfig {
            path: path.to_path_buf(),
            checkpoint_every: 1000,
            checkpoint_interval: Duration::from_secs(10),
            audit_token,
            sync_interval: Duration::from_millis(5),
        }
    }
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

/// The writer thread and its handle.
pub struct AuditLog {
    sink: AuditSink,
    thread: Option<JoinHandle<Result<()>>>,
    path: PathBuf,
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
        let mut writer = Writer {
            file,
            path: path.clone(),
            end: 0,
            seq: 0,
            head: GENESIS.to_string(),
            unsealed: 0,
            first_unsealed: None,
            config,
            session,
        };
        writer.with_lock(|w| w.resync())?;
        let (tx, rx) = channel::bounded(4096);
        let thread = std::thread::Builder::new()
            .name("loupe-audit".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| err(format!("cannot start the writer thread: {e}")))?;
        Ok(AuditLog {
            sink: AuditSink { tx },
            thread: Some(thread),
            path,
        })
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
        thread.join().map_err(|_| self.stopped())?
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
    path: PathBuf,
    /// File length after our last write (to notice other writers).
    end: u64,
    seq: u64,
    head: String,
    unsealed: u64,
    first_unsealed: Option<Instant>,
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
            let timeout = match self.first_unsealed {
                Some(t) => self.config.checkpoint_interval.saturating_sub(t.elapsed()),
                None => Duration::from_secs(3600),
            };
            let first = match rx.recv_timeout(timeout) {
                Ok(m) => Some(m),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let mut entries = Vec::new();
            let mut flushes = Vec::new();
            for msg in first.into_iter().chain(rx.try_iter()) {
                match msg {
                    Msg::Entries(e) => entries.extend(e),
                    Msg::Flush(done) => flushes.push(done),
                }
            }
            let started = Instant::now();
            let wrote = !entries.is_empty();
            let due = self
                .first_unsealed
                .is_some_and(|t| t.elapsed() >= self.config.checkpoint_interval);
            let result = if !entries.is_empty() || due {
                self.with_lock(|w| w.append(entries, due.then_some("interval")))
            } else {
                Ok(())
            };
            if let Err(e) = &result {
                eprintln!("loupe: audit log {}: {e}", self.path.display());
            }
            for done in flushes {
                let _ = done.send(match &result {
                    Ok(()) => Ok(()),
                    Err(e) => Err(self.err(e.to_string())),
                });
            }
            if wrote {
                // Let the next group gather (the channel holds 4096 batches).
                std::thread::sleep(self.config.sync_interval.saturating_sub(started.elapsed()));
            }
        }
        if self.unsealed > 0 {
            self.with_lock(|w| w.append(Vec::new(), Some("shutdown")))?;
        }
        Ok(())
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
        if len == self.end {
            return Ok(());
        }
        let Some(last) = last_line(&mut self.file, len).map_err(|e| self.err(e))? else {
            (self.seq, self.head, self.end) = (0, GENESIS.to_string(), 0);
            return Ok(());
        };
        let rec: Record = serde_json::from_slice(&last).map_err(|e| {
            self.err(format!(
                "the last record is not valid ({e}); run `loupe audit verify` before appending"
            ))
        })?;
        self.seq = rec.seq;
        self.head = hex(&Sha256::digest(&last));
        self.end = len;
        Ok(())
    }

    fn append(&mut self, entries: Vec<Entry>, seal: Option<&str>) -> Result<()> {
        self.resync()?;
        let mut buf = Vec::new();
        for e in entries {
            self.push(&mut buf, record_of(e));
            self.unsealed += 1;
            self.first_unsealed.get_or_insert_with(Instant::now);
            if self.unsealed >= self.config.checkpoint_every {
                self.seal(&mut buf, "count");
            }
        }
        if let Some(reason) = seal {
            if self.unsealed > 0 {
                self.seal(&mut buf, reason);
            }
        }
        if buf.is_empty() {
            return Ok(());
        }
        self.file
            .write_all(&buf)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| self.err(format!("write: {e}")))?;
        self.end += buf.len() as u64;
        Ok(())
    }

    fn push(&mut self, buf: &mut Vec<u8>, mut rec: Record) {
        self.seq += 1;
        rec.seq = self.seq;
        rec.prev = std::mem::take(&mut self.head);
        if rec.kind == Kind::Checkpoint {
            rec.head = Some(rec.prev.clone());
        }
        let start = buf.len();
        serde_json::to_writer(&mut *buf, &rec).expect("records always serialise");
        self.head = hex(&Sha256::digest(&buf[start..]));
        buf.push(b'\n');
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
        let msg = checkpoint_message(self.seq + 1, &time, &self.head);
        let signed = match self.session.as_mut() {
            None => Err("no audit key configured".to_string()),
            Some(s) => match s.sign(AUDIT_KEY_LABEL, AUDIT_MECH, &msg) {
                Err(e) if e.is_session_lost() => {
                    // One re-open: the token may have been reset under us.
                    let t = self
                        .config
                        .audit_token
                        .as_ref()
                        .expect("session implies token");
                    match t.session() {
                        Ok(fresh) => {
                            *s = fresh;
                            s.sign(AUDIT_KEY_LABEL, AUDIT_MECH, &msg)
                                .map_err(|e| e.to_string())
                        }
                        Err(e) => Err(e.to_string()),
                    }
                }
                other => other.map_err(|e| e.to_string()),
            },
        };
        let (result, sig) = match signed {
            Ok(sig) => ("ok".to_string(), Some(hex(&sig))),
            Err(e) => {
                eprintln!("loupe: audit checkpoint left unsigned: {e}");
                (format!("error: {e}"), None)
            }
        };
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
        self.push(buf, rec);
        self.unsealed = 0;
        self.first_unsealed = None;
    }
}

fn record_of(e: Entry) -> Record {
    Record {
        seq: 0,
        time: rfc3339(e.time),
        kind: e.kind,
        token: e.token,
        key: e.key,
        mech: e.mech.map(|m| m.name().to_string()),
        purpose: e.purpose,
        requester: e.requester,
        result: match e.result {
            Ok(()) => "ok".to_string(),
            Err(msg) => format!("error: {msg}"),
        },
        head: None,
        sig: None,
        prev: String::new(),
    }
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
        chunk *= 4;
    }
}

/// What [`verify`] found in a log whose chain is whole.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub records: u64,
    pub checkpoints: u64,
    /// Sequence number of the last checkpoint with a valid signature.
    pub sealed_through: Option<u64>,
    /// Records after that checkpoint (not protected against a rewrite).
    pub unsealed: u64,
    /// Checkpoints written without a signature (the HSM failed then).
    pub unsigned_checkpoints: Vec<u64>,
}

/// The first place the chain breaks.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line} (record seq {seq:?}): {reason}")]
pub struct Broken {
    pub line: u64,
    pub seq: Option<u64>,
    pub reason: String,
}

/// Checks every record's sequence number and back-link, and every signed
/// checkpoint against `keys` (the audit public keys, EC P-256).
pub fn verify(path: &Path, keys: &[PublicKey]) -> std::result::Result<VerifyReport, Broken> {
    let broken = |line: u64, seq: Option<u64>, reason: String| Broken { line, seq, reason };
    let file = File::open(path).map_err(|e| broken(0, None, format!("cannot open: {e}")))?;
    let mut reader = BufReader::new(file);
    let mut report = VerifyReport::default();
    let mut prev_hash = GENESIS.to_string();
    let mut expect_seq = 1u64;
    let mut line_no = 0u64;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .map_err(|e| broken(line_no + 1, None, format!("read: {e}")))?;
        if n == 0 {
            break;
        }
        line_no += 1;
        if buf.last() != Some(&b'\n') {
            return Err(broken(
                line_no,
                None,
                "the record is cut short (no newline)".into(),
            ));
        }
        let line = &buf[..buf.len() - 1];
        let rec: Record = serde_json::from_slice(line)
            .map_err(|e| broken(line_no, None, format!("not a valid record: {e}")))?;
        let at = Some(rec.seq);
        if rec.seq != expect_seq {
            return Err(broken(
                line_no,
                at,
                format!(
                    "sequence number {} where {expect_seq} was expected: records were \
                     deleted, inserted or reordered here",
                    rec.seq
                ),
            ));
        }
        if rec.prev != prev_hash {
            return Err(broken(
                line_no,
                at,
                format!(
                    "its back-link does not match the hash of the record before it: record \
                     {} was altered (or this one was)",
                    rec.seq - 1
                ),
            ));
        }
        if rec.kind == Kind::Checkpoint {
            report.checkpoints += 1;
            if rec.head.as_deref() != Some(rec.prev.as_str()) {
                return Err(broken(
                    line_no,
                    at,
                    "checkpoint head differs from its back-link".into(),
                ));
            }
            match &rec.sig {
                None => report.unsigned_checkpoints.push(rec.seq),
                Some(sig_hex) => {
                    let sig = unhex(sig_hex)
                        .ok_or_else(|| broken(line_no, at, "signature is not hex".into()))?;
                    let msg = checkpoint_message(rec.seq, &rec.time, &rec.prev);
                    if !keys.iter().any(|k| verify_sig(k, AUDIT_MECH, &msg, &sig)) {
                        return Err(broken(
                            line_no,
                            at,
                            if keys.is_empty() {
                                "no audit public key was given to check the checkpoint".into()
                            } else {
                                "the checkpoint signature does not verify with the audit key".into()
                            },
                        ));
                    }
                    report.sealed_through = Some(rec.seq);
                    report.unsealed = 0;
                }
            }
        } else {
            report.unsealed += 1;
        }
        report.records += 1;
        prev_hash = hex(&Sha256::digest(line));
        expect_seq += 1;
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
