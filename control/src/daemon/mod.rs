//! `loupe daemon`: the control process. It holds the desired policy (the
//! last one applied, kept in its state directory across restarts), keeps
//! the dataplane running it (re-syncing whenever it (re)connects), writes
//! the flow log from the records the dataplane streams, serves the CLI on
//! its own socket and Prometheus metrics on loopback.
//!
//! The dataplane does not depend on it: if this process dies, traffic goes
//! on under the last policy and records queue in the dataplane until a
//! daemon subscribes again.

pub mod log;
pub mod metrics;

use std::{
    collections::BTreeMap,
    io::{BufReader, Write},
    net::SocketAddr,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::Context;
use loupe_dataplane::{
    api::{self, unix, Request, Response},
    flow::RecordKind,
    policy::Policy,
    stats::StatsReport,
    tls::context::Exclusion,
};
use serde::{Deserialize, Serialize};

use self::{
    log::{FlowLog, LogConfig},
    metrics::ControlCounters,
};
use crate::{
    client::{self, Conn},
    policy::{self as lang, DataplaneSpec},
};

/// A request from the CLI.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum CtlRequest {
    /// Control's state and the dataplane's report (flows included).
    Status,
    /// The policy control holds: as written, with a header line; or, with
    /// `compiled`, as compiled. One or the other, so that a policy within
    /// the limits fits in one answer.
    PolicyShow {
        #[serde(default)]
        compiled: bool,
    },
    /// Check, compile and apply a policy. The CLI sends the text of the
    /// policy and of the files it names (it reads them as its user).
    PolicyApply {
        path: String,
        text: String,
        files: BTreeMap<String, String>,
        /// Signature files, as bytes.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        blobs: BTreeMap<String, Vec<u8>>,
    },
    /// The newest lines of the flow log.
    LogTail { lines: usize },
    /// The dataplane's decryption exclusion cache; with `clear`, emptied.
    Exclusions {
        #[serde(default)]
        clear: bool,
    },
}

/// Control's own state, as `loupe status` shows it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ControlStatus {
    pub pid: u32,
    pub uptime_ms: u64,
    pub dataplane_socket: String,
    pub dataplane_connected: bool,
    /// The last problem reaching or syncing the dataplane.
    pub last_error: Option<String>,
    pub desired_version: Option<u64>,
    pub desired_digest: Option<String>,
    pub desired_source: Option<String>,
    /// The dataplane runs the desired policy.
    pub in_sync: bool,
    pub log: String,
    pub records_written: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CtlResponse {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Errors and warnings of a policy check, as file:line:col lines.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub diagnostics: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control: Option<ControlStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataplane: Option<Box<StatsReport>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<Box<Policy>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_text: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lines: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclusions: Option<Vec<Exclusion>>,
}

impl CtlResponse {
    fn error(e: impl Into<String>) -> CtlResponse {
        CtlResponse {
            ok: false,
            error: Some(e.into()),
            ..CtlResponse::default()
        }
    }
}

/// `loupe daemon`'s options.
#[derive(Debug, clap::Args)]
pub struct DaemonArgs {
    /// The dataplane's control socket (its --control-socket).
    #[arg(long, default_value = "/run/loupe/dataplane.sock")]
    dataplane: PathBuf,
    /// Group (name or id) allowed on the CLI socket besides root.
    #[arg(long)]
    group: Option<String>,
    /// The policy to run when none was applied yet (the last applied
    /// one, kept in --state-dir, wins).
    #[arg(long)]
    policy: Option<PathBuf>,
    #[arg(long, default_value = "/var/lib/loupe")]
    state_dir: PathBuf,
    /// The flow and decryption log (JSON lines).
    #[arg(long, default_value = "/var/log/loupe/flows.jsonl")]
    log: PathBuf,
    /// Rotate the log beyond this many MiB.
    #[arg(long, default_value_t = 64)]
    log_max_mib: u64,
    /// Rotated log files kept.
    #[arg(long, default_value_t = 5)]
    log_keep: usize,
    /// Serve Prometheus metrics here (loopback only), or `off`.
    #[arg(long, default_value = "127.0.0.1:9464")]
    metrics: String,
}

impl DaemonArgs {
    /// The configuration, serving the CLI on `socket`.
    pub fn config(self, socket: PathBuf) -> anyhow::Result<DaemonConfig> {
        let group = self
            .group
            .as_deref()
            .map(unix::group_id)
            .transpose()
            .context("--group")?;
        let metrics = match self.metrics.as_str() {
            "off" | "none" => None,
            m => Some(
                m.parse()
                    .with_context(|| format!("--metrics {m:?}: expected ADDRESS:PORT or off"))?,
            ),
        };
        Ok(DaemonConfig {
            dataplane: self.dataplane,
            socket,
            access: unix::Access { group },
            policy: self.policy,
            state_dir: self.state_dir,
            log: LogConfig {
                path: self.log,
                max_bytes: self.log_max_mib.max(1) << 20,
                keep: self.log_keep,
            },
            metrics,
        })
    }
}

#[derive(Clone, Debug)]
pub struct DaemonConfig {
    pub dataplane: PathBuf,
    pub socket: PathBuf,
    pub access: unix::Access,
    pub policy: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub log: LogConfig,
    pub metrics: Option<SocketAddr>,
}

/// A policy as applied: its sources (so it can be shown and recompiled)
/// and what they compiled to.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Sources {
    path: String,
    text: String,
    files: BTreeMap<String, String>,
    /// The signature files it names, as bytes (kept, so that a saved
    /// policy compiles to the same patterns whatever became of them).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    blobs: BTreeMap<String, Vec<u8>>,
    /// The version it last ran under.
    version: u64,
}

struct Desired {
    sources: Sources,
    policy: Policy,
    spec: DataplaneSpec,
}

impl Sources {
    /// Compiles the sources; `saved` for a policy accepted before (see
    /// `lang::compile_saved`).
    fn compile(&self, saved: bool) -> (Option<Desired>, Vec<String>) {
        let (files, blobs) = (&self.files, &self.blobs);
        let load = move |p: &Path| {
            let key = p.display().to_string();
            files
                .get(&key)
                .map(|t| t.clone().into_bytes())
                .or_else(|| blobs.get(&key).cloned())
                .ok_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::NotFound, "the CLI could not read it")
                })
        };
        let checked = if saved {
            lang::compile_saved(Path::new(&self.path), &self.text, &load)
        } else {
            lang::compile(Path::new(&self.path), &self.text, &load)
        };
        let diagnostics = checked.diagnostics.iter().map(|d| d.to_string()).collect();
        let desired = checked.policy.map(|mut policy| {
            policy.version = self.version;
            Desired {
                sources: self.clone(),
                policy,
                spec: checked.dataplane,
            }
        });
        (desired, diagnostics)
    }

    /// Reads a policy and the files it names from disk. Checking them is
    /// the daemon's work (and `loupe policy check`'s): this only finds the
    /// category file, so a large policy is not checked twice.
    fn read(path: &Path) -> anyhow::Result<Sources> {
        let path = &std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let text = lang::read_text(path)
            .with_context(|| format!("cannot read the policy {}", path.display()))?;
        let mut files = BTreeMap::new();
        if let Some(p) = lang::category_file(path, &text) {
            // One that cannot be read is reported by the daemon, where it
            // is named.
            if let Ok(t) = lang::read_text(&p) {
                files.insert(p.display().to_string(), t);
            }
        }
        let mut blobs = BTreeMap::new();
        for p in lang::signature_files(path, &text) {
            // As above: the daemon names one that cannot be read.
            if let Ok(b) = lang::read_signature_file(&p) {
                blobs.insert(p.display().to_string(), b);
            }
        }
        Ok(Sources {
            path: path.display().to_string(),
            text,
            files,
            blobs,
            version: 0,
        })
    }
}

/// Reads a policy from disk for `policy apply`: the CLI's side.
pub fn apply_request(path: &Path) -> anyhow::Result<CtlRequest> {
    let s = Sources::read(path)?;
    Ok(CtlRequest::PolicyApply {
        path: s.path,
        text: s.text,
        files: s.files,
        blobs: s.blobs,
    })
}

struct State {
    desired: Option<Desired>,
    /// Changes whenever `desired` does.
    generation: u64,
    /// The ticket of the apply that made `desired` (0: none since start).
    applied_ticket: u64,
    connected: bool,
    last_error: Option<String>,
    counters: ControlCounters,
    log: FlowLog,
}

impl State {
    /// Whether the dataplane (as reported) runs the desired policy.
    fn in_sync(&self, dp: Option<&StatsReport>) -> bool {
        match (dp, &self.desired) {
            (Some(r), Some(d)) => runs(r, &d.policy),
            _ => false,
        }
    }
}

/// Checks and compiles sources (`saved`: accepted before, see
/// `lang::compile_saved`). The daemon's is [`Sources::compile`]; a test
/// puts a slow one in its place.
type Compiler = dyn Fn(&Sources, bool) -> (Option<Desired>, Vec<String>) + Send + Sync;

/// Policies the CLI may have checked at once; another apply meanwhile is
/// refused (each check of a policy at the limits takes memory).
const MAX_CHECKING: usize = 4;

struct Daemon {
    cfg: DaemonConfig,
    state: Mutex<State>,
    /// Serialises what reaches the dataplane (an apply's or a re-sync's
    /// push): held for the round trip to the dataplane, never while a
    /// policy is checked, so a large policy holds up no other apply, no
    /// status and no re-sync.
    applying: Mutex<()>,
    /// Applies are numbered as they arrive; one that finishes its check
    /// after a later one was applied is refused rather than put over it.
    tickets: AtomicU64,
    /// Applies being checked now.
    checking: AtomicUsize,
    compiler: Box<Compiler>,
    started: Instant,
    stop: Arc<AtomicBool>,
}

/// A place among the [`MAX_CHECKING`] applies checked at once.
struct CheckSlot<'a>(&'a AtomicUsize);

impl<'a> CheckSlot<'a> {
    fn take(count: &'a AtomicUsize) -> Option<CheckSlot<'a>> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_CHECKING).then_some(n + 1)
            })
            .ok()
            .map(|_| CheckSlot(count))
    }
}

impl Drop for CheckSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

const DP_TIMEOUT: Duration = Duration::from_secs(15);
/// Flow records acknowledged at once, at most (well within the dataplane's
/// window, so it never waits on us).
const ACK_EVERY: usize = 64;

impl Daemon {
    fn new(
        cfg: DaemonConfig,
        desired: Option<Desired>,
        log: FlowLog,
        stop: Arc<AtomicBool>,
    ) -> Daemon {
        Daemon {
            state: Mutex::new(State {
                desired,
                generation: 0,
                applied_ticket: 0,
                connected: false,
                last_error: None,
                counters: ControlCounters::default(),
                log,
            }),
            applying: Mutex::new(()),
            tickets: AtomicU64::new(0),
            checking: AtomicUsize::new(0),
            compiler: Box::new(Sources::compile),
            started: Instant::now(),
            stop,
            cfg,
        }
    }

    fn state_file(&self) -> PathBuf {
        self.cfg.state_dir.join("policy.json")
    }

    fn dataplane_status(&self) -> anyhow::Result<StatsReport> {
        let r: Response = client::call(&self.cfg.dataplane, &Request::Status, DP_TIMEOUT)?;
        match (r.ok, r.status) {
            (true, Some(s)) => Ok(*s),
            _ => anyhow::bail!(
                "the dataplane refused: {}",
                r.error.unwrap_or_else(|| "no status".into())
            ),
        }
    }

    /// Sends `d` to the dataplane under a version above both the running
    /// one and the one `d` last had; on success `d` becomes the desired
    /// policy (and is saved), made by the apply of `ticket` (`None`: a
    /// re-sync of the desired one). The caller holds `applying`.
    /// Returns the version it runs as, and the dataplane's warnings (parts
    /// it could not prepare, whose connections it blocks).
    fn push(
        &self,
        mut d: Desired,
        dp: &StatsReport,
        ticket: Option<u64>,
    ) -> Result<(u64, Vec<String>), String> {
        check_spec(&d.spec, dp)?;
        let running = dp.policy.as_ref().map_or(0, |p| p.version);
        let version = running.max(d.sources.version) + 1;
        d.policy.version = version;
        let req = Request::Apply {
            policy: Box::new(d.policy.clone()),
        };
        let r: Response = match client::call(&self.cfg.dataplane, &req, DP_TIMEOUT) {
            Ok(r) => r,
            Err(e) => {
                // No answer (a timeout, a dropped connection): it may have
                // been applied all the same. Ask, rather than guess.
                let applied = self.dataplane_status().is_ok_and(|s| runs(&s, &d.policy));
                if !applied {
                    return Err(format!("{e:#}"));
                }
                Response::ok()
            }
        };
        if !r.ok {
            return Err(format!(
                "the dataplane rejected the policy: {}",
                r.error.unwrap_or_default()
            ));
        }
        d.sources.version = version;
        if let Err(e) = self.save(&d.sources) {
            eprintln!("loupe: warning: cannot save the applied policy: {e:#}");
        }
        let mut st = lock(&self.state);
        st.desired = Some(d);
        st.generation += 1;
        if let Some(t) = ticket {
            st.applied_ticket = t;
        }
        let warnings = r
            .warnings
            .iter()
            .map(|w| format!("loupe-dataplane: warning: {w}"))
            .collect();
        Ok((version, warnings))
    }

    fn save(&self, s: &Sources) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.cfg.state_dir)?;
        let tmp = self.state_file().with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(s)?)?;
        std::fs::rename(&tmp, self.state_file())?;
        Ok(())
    }

    /// Makes the dataplane run the desired policy, if it does not. The
    /// policy is compiled again (its files may have changed) before the
    /// swap is serialised; an apply meanwhile makes this one moot.
    fn sync(&self, dp: &StatsReport) -> Result<Option<u64>, String> {
        let (digest, sources, generation) = {
            let st = lock(&self.state);
            match &st.desired {
                Some(d) => (d.policy.digest.clone(), d.sources.clone(), st.generation),
                None => return Ok(None),
            }
        };
        let runs_digest = |dp: &StatsReport| dp.policy.as_ref().is_some_and(|p| p.digest == digest);
        if runs_digest(dp) {
            return Ok(None);
        }
        let (desired, diagnostics) = (self.compiler)(&sources, true);
        for line in &diagnostics {
            eprintln!("{line}");
        }
        let d = desired.ok_or_else(|| {
            format!(
                "the saved policy no longer compiles: {}",
                diagnostics.join("; ")
            )
        })?;
        let _one = lock(&self.applying);
        if lock(&self.state).generation != generation {
            // An apply replaced it, and made the dataplane run that.
            return Ok(None);
        }
        // Asked again: the dataplane may have changed while we compiled.
        let dp = self.dataplane_status().map_err(|e| format!("{e:#}"))?;
        if runs_digest(&dp) {
            return Ok(None);
        }
        let (v, warnings) = self.push(d, &dp, None)?;
        for w in &warnings {
            eprintln!("{w}");
        }
        Ok(Some(v))
    }

    fn apply(&self, sources: Sources) -> CtlResponse {
        let ticket = self.tickets.fetch_add(1, Ordering::AcqRel) + 1;
        let rejected = |e: String, diagnostics: Vec<String>| {
            lock(&self.state).counters.applies_rejected += 1;
            CtlResponse {
                diagnostics,
                ..CtlResponse::error(e)
            }
        };
        // Checked outside `applying`: however long it takes, other
        // applies, status and re-syncs go on.
        let Some(slot) = CheckSlot::take(&self.checking) else {
            return rejected(
                format!(
                    "{MAX_CHECKING} policies are being checked already; try again when they \
                     are done (the running policy is unchanged)"
                ),
                Vec::new(),
            );
        };
        let (desired, diagnostics) = (self.compiler)(&sources, false);
        drop(slot);
        let Some(d) = desired else {
            return rejected(
                "the policy has errors; the running policy is unchanged".into(),
                diagnostics,
            );
        };
        let _one = lock(&self.applying);
        let later = {
            let st = lock(&self.state);
            (st.applied_ticket > ticket).then(|| st.desired.as_ref().map(|d| d.policy.version))
        };
        if let Some(version) = later {
            return rejected(
                format!(
                    "a policy sent after this one was applied while this one was being checked \
                     (it runs as version {}); this one was not applied",
                    version.unwrap_or_default()
                ),
                diagnostics,
            );
        }
        let dp = match self.dataplane_status() {
            Ok(dp) => dp,
            Err(e) => return rejected(format!("{e:#}; nothing was applied"), diagnostics),
        };
        match self.push(d, &dp, Some(ticket)) {
            Ok((v, warnings)) => {
                lock(&self.state).counters.applies_ok += 1;
                let mut diagnostics = diagnostics;
                diagnostics.extend(warnings);
                CtlResponse {
                    ok: true,
                    version: Some(v),
                    diagnostics,
                    ..CtlResponse::default()
                }
            }
            Err(e) => rejected(format!("{e}; the running policy is unchanged"), diagnostics),
        }
    }

    fn status(&self) -> CtlResponse {
        let dp = self.dataplane_status();
        let st = lock(&self.state);
        let desired = st.desired.as_ref();
        let in_sync = st.in_sync(dp.as_ref().ok());
        CtlResponse {
            ok: true,
            control: Some(ControlStatus {
                pid: std::process::id(),
                uptime_ms: self.started.elapsed().as_millis() as u64,
                dataplane_socket: self.cfg.dataplane.display().to_string(),
                dataplane_connected: dp.is_ok(),
                last_error: dp
                    .as_ref()
                    .err()
                    .map(|e| format!("{e:#}"))
                    .or_else(|| st.last_error.clone()),
                desired_version: desired.map(|d| d.policy.version),
                desired_digest: desired.map(|d| d.policy.digest.clone()),
                desired_source: desired.map(|d| d.sources.path.clone()),
                in_sync,
                log: st.log.path().display().to_string(),
                records_written: st.log.written,
            }),
            dataplane: dp.ok().map(Box::new),
            ..CtlResponse::default()
        }
    }

    fn handle(&self, req: CtlRequest) -> CtlResponse {
        match req {
            CtlRequest::Status => self.status(),
            CtlRequest::PolicyShow { compiled } => {
                let st = lock(&self.state);
                match &st.desired {
                    Some(d) if compiled => CtlResponse {
                        ok: true,
                        version: Some(d.policy.version),
                        policy: Some(Box::new(d.policy.clone())),
                        ..CtlResponse::default()
                    },
                    Some(d) => CtlResponse {
                        ok: true,
                        version: Some(d.policy.version),
                        policy_text: Some(format!(
                            "# version {} from {} (digest {})\n{}",
                            d.policy.version, d.policy.source, d.policy.digest, d.sources.text
                        )),
                        ..CtlResponse::default()
                    },
                    None => CtlResponse::error("no policy was applied yet"),
                }
            }
            CtlRequest::PolicyApply {
                path,
                text,
                files,
                blobs,
            } => self.apply(Sources {
                path,
                text,
                files,
                blobs,
                version: 0,
            }),
            CtlRequest::Exclusions { clear } => {
                match client::call::<Response>(
                    &self.cfg.dataplane,
                    &Request::Exclusions { clear },
                    DP_TIMEOUT,
                ) {
                    Ok(Response {
                        ok: true,
                        exclusions,
                        ..
                    }) => CtlResponse {
                        ok: true,
                        exclusions,
                        ..CtlResponse::default()
                    },
                    Ok(r) => CtlResponse::error(format!(
                        "the dataplane refused: {}",
                        r.error.unwrap_or_default()
                    )),
                    Err(e) => CtlResponse::error(format!("cannot reach the dataplane: {e:#}")),
                }
            }
            CtlRequest::LogTail { lines } => {
                let path = lock(&self.state).log.path().to_path_buf();
                match log::tail(&path, lines.min(100_000)) {
                    Ok((lines, cut)) => CtlResponse {
                        ok: true,
                        lines,
                        error: cut.then(|| {
                            format!(
                                "earlier records of {} are not shown: the last {} MiB read \
                                 begin inside one",
                                path.display(),
                                log::TAIL_WINDOW >> 20
                            )
                        }),
                        ..CtlResponse::default()
                    },
                    Err(e) => CtlResponse::error(format!("cannot read {}: {e}", path.display())),
                }
            }
        }
    }

    fn serve_client(&self, stream: UnixStream, slot: &unix::Slot) {
        let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
        let Ok(read) = stream.try_clone() else { return };
        let mut reader = unix::LineReader::new(BufReader::new(read));
        let mut out = &stream;
        while let Ok(Some(line)) = reader.read_line() {
            let _busy = slot.busy();
            let resp = match serde_json::from_str::<CtlRequest>(&line) {
                Ok(req) => self.handle(req),
                Err(e) => CtlResponse::error(format!("bad request: {e}")),
            };
            if out.write_all(&api::line(&resp)).is_err() {
                return;
            }
        }
    }

    /// Writes a record to the flow log. An error means it is not stored
    /// (and must not be acknowledged).
    fn record(
        &self,
        e: &loupe_dataplane::flow::FlowLogEntry,
        stamp: Option<log::Stamp>,
    ) -> anyhow::Result<()> {
        let mut st = lock(&self.state);
        match st.log.write(e, stamp) {
            Ok(true) => {
                let c = &mut st.counters;
                match (e.record, &e.http, &e.signature) {
                    (Some(RecordKind::Http), Some(h), _) => {
                        let key = (
                            method_label(&h.method),
                            h.status.map_or("none".into(), |s| s.to_string()),
                        );
                        *c.http.entry(key).or_default() += 1;
                        if let (Some(rule), Some(action)) = (&h.url_rule, &h.url_action) {
                            *c.url_rules
                                .entry((rule.clone(), action.clone()))
                                .or_default() += 1;
                        }
                    }
                    (Some(RecordKind::Signature), _, Some(s)) => {
                        *c.signatures
                            .entry((s.name.clone(), s.action.clone()))
                            .or_default() += 1;
                    }
                    (Some(_), _, _) => c.anomalies += 1,
                    (None, _, _) => {
                        let key = (
                            e.action.map_or("none", |a| a.label()).to_string(),
                            e.end.clone(),
                        );
                        *c.records.entry(key).or_default() += 1;
                    }
                }
                Ok(())
            }
            Ok(false) => Ok(()), // a repeat, written already
            Err(err) => {
                st.counters.log_errors += 1;
                anyhow::bail!(
                    "cannot write the flow log {}: {err} (records wait in the dataplane)",
                    st.log.path().display()
                )
            }
        }
    }

    fn set_link(&self, connected: bool, error: Option<String>) {
        let mut st = lock(&self.state);
        if connected && !st.connected {
            st.counters.dataplane_reconnects += 1;
        }
        st.connected = connected;
        if error.is_some() || connected {
            st.last_error = error;
        }
    }

    /// Keeps the dataplane in sync and its records flowing into the log,
    /// reconnecting whenever the connection breaks.
    fn link(&self) {
        let mut last_complaint: Option<String> = None;
        while !self.stop.load(Ordering::Relaxed) {
            match self.link_once() {
                Ok(()) => {}
                Err(e) => {
                    let msg = format!("{e:#}");
                    if last_complaint.as_deref() != Some(&msg) {
                        eprintln!("loupe: dataplane: {msg} (retrying)");
                        last_complaint = Some(msg.clone());
                    }
                    self.set_link(false, Some(msg));
                }
            }
            for _ in 0..5 {
                if self.stop.load(Ordering::Relaxed) {
                    return;
                }
                thread::sleep(Duration::from_millis(100));
            }
        }
    }

    fn link_once(&self) -> anyhow::Result<()> {
        let dp = self.dataplane_status()?;
        // Subscribe before syncing, so no record is missed in between.
        let mut events = Conn::open(&self.cfg.dataplane, DP_TIMEOUT)?;
        events.send(&Request::Events)?;
        let ack: Response = events.recv()?;
        anyhow::ensure!(ack.ok, "events refused: {}", ack.error.unwrap_or_default());
        // From here a quiet stream is no error: look up often, to ack.
        events.set_read_timeout(Duration::from_millis(50))?;
        self.set_link(true, None);
        eprintln!(
            "loupe: dataplane connected (pid {}, policy {})",
            dp.pid,
            dp.policy
                .as_ref()
                .map_or("none".into(), |p| format!("version {}", p.version))
        );
        match self.sync(&dp) {
            Ok(Some(v)) => eprintln!("loupe: dataplane re-synced to policy version {v}"),
            Ok(None) => {}
            Err(e) => {
                eprintln!("loupe: error: cannot sync the dataplane's policy: {e}");
                self.set_link(true, Some(e));
            }
        }
        // Acknowledged in batches: when the stream pauses, or every
        // ACK_EVERY records (the dataplane sends a bounded window ahead).
        let mut unacked: Option<u64> = None;
        let mut since_ack = 0usize;
        while !self.stop.load(Ordering::Relaxed) {
            let next = events.poll::<serde_json::Value>()?;
            if next.is_none() || since_ack >= ACK_EVERY {
                if let Some(upto) = unacked.take() {
                    events.send(&Request::Ack { upto })?;
                    since_ack = 0;
                }
            }
            // A record this version cannot read is counted and skipped;
            // the stream goes on.
            let Some(v) = next else {
                continue;
            };
            match serde_json::from_value::<Response>(v) {
                Ok(Response {
                    event: Some(e),
                    seq,
                    run,
                    ..
                }) => {
                    let stamp = seq.zip(run).map(|(seq, run)| log::Stamp { run, seq });
                    // Stored, then acknowledged: a record is never lost,
                    // and a repeat is recognised by its stamp.
                    self.record(&e, stamp)?;
                    if seq.is_some() {
                        unacked = seq;
                        since_ack += 1;
                    }
                }
                Ok(_) => {}
                Err(err) => {
                    lock(&self.state).counters.log_errors += 1;
                    eprintln!("loupe: warning: a flow record not understood: {err}");
                }
            }
        }
        Ok(())
    }
}

/// Whether the dataplane runs `p` (this version of it: during an apply
/// the answer is no until control has recorded the new version).
fn runs(dp: &StatsReport, p: &Policy) -> bool {
    dp.policy
        .as_ref()
        .is_some_and(|r| r.digest == p.digest && r.version == p.version)
}

/// Whether the running dataplane is the one the policy is written for.
fn check_spec(spec: &DataplaneSpec, dp: &StatsReport) -> Result<(), String> {
    let mut wrong = Vec::new();
    if let Some(i) = &spec.inside {
        if *i != dp.inside.name {
            wrong.push(format!(
                "inside = {i:?} but the dataplane's is {:?}",
                dp.inside.name
            ));
        }
    }
    if let Some(o) = &spec.outside {
        if *o != dp.outside.name {
            wrong.push(format!(
                "outside = {o:?} but the dataplane's is {:?}",
                dp.outside.name
            ));
        }
    }
    if let Some(w) = spec.workers {
        if w != dp.workers.len() {
            wrong.push(format!(
                "workers = {w} but the dataplane runs {}",
                dp.workers.len()
            ));
        }
    }
    for t in &spec.hsm_tokens {
        if !dp.hsm.iter().any(|h| h.token == *t) {
            wrong.push(format!("[hsm] token {t:?} is not served by the dataplane"));
        }
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the policy is written for another dataplane ({}); restart the dataplane with \
             matching options",
            wrong.join("; ")
        ))
    }
}

/// Runs the daemon until SIGINT or SIGTERM.
pub fn run(cfg: DaemonConfig) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())?;
    }
    let log = FlowLog::open(cfg.log.clone())
        .with_context(|| format!("cannot open the flow log {}", cfg.log.path.display()))?;
    let state_file = cfg.state_dir.join("policy.json");
    // The last applied policy wins over --policy: it is what the operator
    // applied most recently.
    let sources = if state_file.exists() {
        let s: Sources = serde_json::from_slice(&std::fs::read(&state_file)?)
            .with_context(|| format!("{} is corrupt", state_file.display()))?;
        eprintln!(
            "loupe: policy: the last applied one (version {}, from {})",
            s.version, s.path
        );
        Some(s)
    } else if let Some(p) = &cfg.policy {
        Some(Sources::read(p)?)
    } else {
        None
    };
    let saved = state_file.exists();
    let desired = match sources {
        Some(s) => {
            let (d, diagnostics) = s.compile(saved);
            for line in &diagnostics {
                eprintln!("{line}");
            }
            Some(d.with_context(|| format!("the policy {} has errors", s.path))?)
        }
        None => {
            eprintln!(
                "loupe: no policy yet: the dataplane keeps what it runs until `loupe policy apply`"
            );
            None
        }
    };
    let listener = unix::bind(&cfg.socket, cfg.access)
        .with_context(|| format!("cannot serve {}", cfg.socket.display()))?;
    listener.set_nonblocking(true)?;
    let daemon = Arc::new(Daemon::new(cfg, desired, log, stop.clone()));
    let mut threads = Vec::new();
    if let Some(addr) = daemon.cfg.metrics {
        let d = daemon.clone();
        threads.push(metrics::serve(addr, stop.clone(), move || {
            let dp = d.dataplane_status().ok();
            let counters = {
                let st = lock(&d.state);
                ControlCounters {
                    desired_version: st.desired.as_ref().map(|x| x.policy.version),
                    in_sync: st.in_sync(dp.as_ref()),
                    ..st.counters.clone()
                }
            };
            metrics::render(dp.as_ref(), &counters)
        })?);
    }
    {
        let d = daemon.clone();
        threads.push(
            thread::Builder::new()
                .name("loupe-link".into())
                .spawn(move || d.link())?,
        );
    }
    println!(
        "loupe: ready: serving {} (dataplane {}, log {}{})",
        daemon.cfg.socket.display(),
        daemon.cfg.dataplane.display(),
        daemon.cfg.log.path.display(),
        daemon
            .cfg
            .metrics
            .map_or(String::new(), |m| format!(", metrics http://{m}/metrics"))
    );
    let d = daemon.clone();
    unix::accept_loop(
        &listener,
        daemon.cfg.access,
        &stop,
        "loupe: control socket",
        |why| api::line(&CtlResponse::error(why)),
        move |s, slot| d.serve_client(s, slot),
    );
    for t in threads {
        let _ = t.join();
    }
    let _ = std::fs::remove_file(&daemon.cfg.socket);
    Ok(())
}

/// A request method as a metric label: the standard ones (RFC 9110 §9,
/// RFC 5789) as written, any other as `other` (a client chooses them, so
/// they must not grow the metrics without bound).
fn method_label(m: &str) -> String {
    const KNOWN: [&str; 9] = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
    ];
    match KNOWN.contains(&m) {
        true => m.to_string(),
        false => "other".into(),
    }
}

#[cfg(test)]
mod tests;
