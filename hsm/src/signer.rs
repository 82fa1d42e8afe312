//! The signer service: requests go into a bounded lock-free queue per token
//! (crossbeam `ArrayQueue`); HSM threads, each with its own PKCS#11 session,
//! drain it in batches and answer each requester through its own
//! completion. Requesters never block: they poll their [`Ticket`] or are
//! woken through the `Waker` they gave (a packet worker's eventfd), and only
//! the CLI uses the blocking [`Ticket::wait`].
//!
//! Failure is closed and loud: a full queue rejects at once; a request that
//! outlives its deadline is answered `Timeout` and never signed late; a
//! session or device error re-opens the session once, and if that fails the
//! token is marked down, everything queued for it is failed, new requests are
//! refused at submission, and the HSM threads retry with exponential backoff
//! (re-reading the PIN; a PIN the token rejected is not tried again until the
//! PIN source changes, so a recovering signer cannot lock the token).
//!
//! Tokens are partitions: each request names its token, and a token's
//! threads only hold sessions on that token, so one tenant's PIN and
//! sessions can never reach another tenant's keys.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Condvar, Mutex,
    },
    task::{Wake, Waker},
    thread::{JoinHandle, Thread},
    time::{Duration, Instant, SystemTime},
};

use crossbeam::{queue::ArrayQueue, utils::CachePadded};

use crate::{
    audit::{AuditSink, Entry, Kind},
    error::{HsmError, Result},
    mech::SignMech,
    token::{Token, TokenConfig, TokenSession},
};

/// How the service is shaped.
#[derive(Clone, Debug)]
pub struct SignerConfig {
    pub tokens: Vec<TokenConfig>,
    /// HSM threads (= sessions) per token.
    pub threads_per_token: usize,
    /// Most requests an HSM thread takes from the queue at once.
    pub batch: usize,
    /// Requests waiting per token before submissions are refused.
    pub queue_capacity: usize,
    /// Deadline for requests that do not set their own.
    pub default_timeout: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// CPUs the HSM threads run on, in turn (empty: wherever the
    /// scheduler puts them). A software HSM signs on these threads, so
    /// giving them cores of their own keeps signing off the packet
    /// workers' cores, as a network HSM would.
    pub cpus: Vec<usize>,
}

impl SignerConfig {
    pub fn new(tokens: Vec<TokenConfig>) -> SignerConfig {
        SignerConfig {
            tokens,
            threads_per_token: 2,
            batch: 32,
            queue_capacity: 4096,
            default_timeout: Duration::from_secs(2),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            cpus: Vec::new(),
        }
    }
}

/// CPUs online (at least 1).
pub fn online_cpus() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize
}

/// Pins the calling thread to `cpu`.
pub fn pin_thread(cpu: usize) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is a plain bitmask; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("CPU {cpu} is beyond the CPU set"),
        ));
    }
    // SAFETY: CPU_SET writes inside `set`; `cpu` is below its size.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is the calling thread; the set pointer and size are valid.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// One signing request.
#[derive(Clone, Debug)]
pub struct Request {
    /// The token (partition) holding the key.
    pub token: String,
    /// The private key's label.
    pub key: String,
    pub mech: SignMech,
    /// The bytes to sign (hashed by the service).
    pub message: Vec<u8>,
    /// What the signature is for, for the audit log.
    pub purpose: String,
    /// Who asked (worker, CLI user), for the audit log.
    pub requester: String,
    /// Overrides the configured default deadline.
    pub timeout: Option<Duration>,
}

/// The answer slot shared by a requester and an HSM thread.
struct Completion {
    ready: AtomicBool,
    abandoned: AtomicBool,
    inner: Mutex<CompletionInner>,
}

struct CompletionInner {
    result: Option<Result<Vec<u8>>>,
    waker: Option<Waker>,
}

impl Completion {
    fn complete(&self, result: Result<Vec<u8>>) {
        if let Some(w) = self.complete_deferred(result) {
            w.wake();
        }
    }

    /// Stores the answer and hands back the waker instead of calling it, so
    /// an HSM thread can wake each requester once per batch.
    fn complete_deferred(&self, result: Result<Vec<u8>>) -> Option<Waker> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.result = Some(result);
        self.ready.store(true, Ordering::Release);
        g.waker.take()
    }
}

/// Wakers collected over a batch, each requester woken once: a wake-up is
/// a futex or eventfd syscall on this thread and a context switch on the
/// requester's, which at ECDSA rates costs as much as the signature. The
/// answers themselves are visible at once (a polling requester sees them);
/// only the wake-up waits, and never longer than [`WAKE_DELAY`].
#[derive(Default)]
struct Wakes {
    wakers: Vec<Waker>,
    since: Option<Instant>,
}

/// Longest a wake-up is held back to share it with later answers.
const WAKE_DELAY: Duration = Duration::from_millis(1);

impl Wakes {
    fn add(&mut self, w: Option<Waker>) {
        if let Some(w) = w {
            if !self.wakers.iter().any(|o| o.will_wake(&w)) {
                self.wakers.push(w);
            }
            self.since.get_or_insert_with(Instant::now);
        }
    }

    /// Wakes everyone if the oldest held wake-up is due.
    fn wake_due(&mut self) {
        if self.since.is_some_and(|t| t.elapsed() >= WAKE_DELAY) {
            self.wake_all();
        }
    }

    fn wake_all(&mut self) {
        self.since = None;
        for w in self.wakers.drain(..) {
            w.wake();
        }
    }
}

/// A requester's handle on one request.
pub struct Ticket {
    done: Arc<Completion>,
    deadline: Instant,
    timeout: Duration,
}

impl Ticket {
    /// True once the answer is in.
    pub fn is_ready(&self) -> bool {
        self.done.ready.load(Ordering::Acquire)
    }

    /// Takes the answer if it is in (once; later calls return `None`).
    pub fn try_take(&self) -> Option<Result<Vec<u8>>> {
        if !self.is_ready() {
            return None;
        }
        self.done
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .result
            .take()
    }

    /// Replaces the waker called when the answer arrives (called at once if
    /// it already has).
    pub fn set_waker(&self, waker: Waker) {
        let mut g = self.done.inner.lock().unwrap_or_else(|p| p.into_inner());
        if self.done.ready.load(Ordering::Acquire) {
            drop(g);
            waker.wake();
        } else {
            g.waker = Some(waker);
        }
    }

    /// Blocks until the answer arrives or the request's deadline passes.
    /// For the CLI and tests; packet workers poll instead.
    pub fn wait(self) -> Result<Vec<u8>> {
        self.set_waker(Waker::from(Arc::new(Unpark(std::thread::current()))));
        loop {
            if let Some(r) = self.try_take() {
                return r;
            }
            let now = Instant::now();
            if now >= self.deadline {
                return Err(HsmError::Timeout(self.timeout));
            }
            std::thread::park_timeout(self.deadline - now);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // An answer nobody will read: an HSM thread that has not started on
        // it skips it (no key use).
        self.done.abandoned.store(true, Ordering::Release);
    }
}

struct Unpark(Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

struct Job {
    req: Request,
    /// The request's timeout (its own or the default), and when it ends.
    timeout: Duration,
    deadline: Instant,
    done: Arc<Completion>,
}

/// Counters of one token's lane. The requesters' counter sits on a cache
/// line of its own, away from the ones HSM threads bump per signature.
#[derive(Default)]
struct LaneStats {
    submitted: CachePadded<AtomicU64>,
    signed: CachePadded<AtomicU64>,
    failed: AtomicU64,
    timed_out: AtomicU64,
    abandoned: AtomicU64,
    rejected_full: AtomicU64,
    rejected_down: AtomicU64,
    recoveries: AtomicU64,
    /// Time from submission to answer of signatures made (or failed).
    latency: LatencyStats,
}

/// Upper bounds of the latency histogram's buckets, in microseconds (the
/// last bucket, above them all, is implied).
pub const LATENCY_BOUNDS_US: [u64; 14] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000,
];

/// A lock-free fixed-bucket histogram (Prometheus style).
#[derive(Default)]
struct LatencyStats {
    buckets: [AtomicU64; LATENCY_BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
}

impl LatencyStats {
    fn record(&self, d: Duration) {
        let us = d.as_micros().min(u128::from(u64::MAX)) as u64;
        let i = LATENCY_BOUNDS_US.partition_point(|&b| b < us);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    fn snapshot(&self) -> Latency {
        Latency {
            bounds_us: LATENCY_BOUNDS_US.to_vec(),
            counts: self
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            sum_us: self.sum_us.load(Ordering::Relaxed),
        }
    }
}

/// Signing latency (submission to answer): `counts[i]` answers took at
/// most `bounds_us[i]` and more than the bound before; the last count is
/// above every bound.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Latency {
    pub bounds_us: Vec<u64>,
    pub counts: Vec<u64>,
    pub sum_us: u64,
}

/// A token's health and counters, for status and metrics.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TokenHealth {
    pub token: String,
    pub up: bool,
    /// Why it is down (or why it last went down).
    pub last_error: Option<String>,
    pub queue_depth: usize,
    pub submitted: u64,
    pub signed: u64,
    pub failed: u64,
    pub timed_out: u64,
    pub abandoned: u64,
    pub rejected_full: u64,
    pub rejected_down: u64,
    pub recoveries: u64,
    #[serde(default)]
    pub latency: Latency,
}

struct Lane {
    token: Token,
    queue: ArrayQueue<Job>,
    park: Mutex<()>,
    cv: Condvar,
    sleepers: AtomicUsize,
    down: AtomicBool,
    last_error: Mutex<Option<String>>,
    /// When the module was last re-initialized for this token (one
    /// thread does it for all, at most once a second).
    reinitialized: Mutex<Option<Instant>>,
    stats: LaneStats,
}

impl Lane {
    fn wake_one(&self) {
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = self.park.lock().unwrap_or_else(|p| p.into_inner());
            self.cv.notify_one();
        }
    }

    fn unavailable(&self) -> HsmError {
        HsmError::Unavailable {
            token: self.token.label().to_string(),
            reason: self
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
                .unwrap_or_else(|| "recovering".into()),
        }
    }

    /// Marks the token down and fails everything queued for it.
    fn set_down(&self, reason: String) {
        eprintln!(
            "loupe: HSM token {:?} is down: {reason}",
            self.token.label()
        );
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
        self.down.store(true, Ordering::SeqCst);
        while let Some(job) = self.queue.pop() {
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
            job.done.complete(Err(self.unavailable()));
        }
    }

    fn set_up(&self) {
        if self.down.swap(false, Ordering::SeqCst) {
            self.stats.recoveries.fetch_add(1, Ordering::Relaxed);
            eprintln!("loupe: HSM token {:?} is back", self.token.label());
        }
    }
}

struct Shared {
    lanes: Vec<Lane>,
    by_label: HashMap<String, usize>,
    /// Tokens after the first that could not be opened at start (a wrong
    /// PIN, a missing token), and why: unavailable until a restart (a
    /// wrong PIN is never tried again, so the token's retry counter is
    /// not spent), while the other tokens serve.
    refused: Vec<(String, String)>,
    stop: AtomicBool,
    audit: Option<AuditSink>,
    config: SignerConfig,
}

/// How long stopping waits for an HSM thread inside a call to the token.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// The running service. Dropping it stops the HSM threads; queued requests
/// are answered `Shutdown`.
pub struct Signer {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

/// A cloneable submission handle for requesters.
#[derive(Clone)]
pub struct SignerHandle {
    shared: Arc<Shared>,
}

impl Signer {
    /// Opens every token and starts its HSM threads, each with a logged-in
    /// session of its own. The first token (the audit log's) must open: a
    /// wrong PIN or a missing token fails here, with the token named. One
    /// of the others that cannot be opened is reported and left out
    /// (unavailable, see [`SignerHandle::submit`]), so one tenant's wrong
    /// PIN does not stop the others.
    pub fn start(config: SignerConfig, audit: Option<AuditSink>) -> Result<Signer> {
        if config.tokens.is_empty() {
            return Err(HsmError::Invalid(
                "the signer needs at least one token".into(),
            ));
        }
        if config.threads_per_token == 0 || config.batch == 0 || config.queue_capacity == 0 {
            return Err(HsmError::Invalid(
                "threads per token, batch size and queue capacity must be at least 1".into(),
            ));
        }
        let mut lanes = Vec::new();
        let mut by_label = HashMap::new();
        let mut sessions = Vec::new();
        let mut refused: Vec<(String, String)> = Vec::new();
        for (i, tc) in config.tokens.iter().enumerate() {
            if by_label.contains_key(&tc.label) || refused.iter().any(|r| r.0 == tc.label) {
                return Err(HsmError::Invalid(format!(
                    "token {:?} is configured twice",
                    tc.label
                )));
            }
            let opened = Token::open(tc).and_then(|token| {
                let mine = (0..config.threads_per_token)
                    .map(|_| token.session())
                    .collect::<Result<Vec<_>>>()?;
                Ok((token, mine))
            });
            let (token, mine) = match opened {
                Ok(t) => t,
                Err(e) if i == 0 => return Err(e),
                Err(e) => {
                    eprintln!(
                        "loupe: HSM token {:?} cannot be used: {e}; its keys are unavailable \
                         until the engine restarts (the other tokens serve)",
                        tc.label
                    );
                    refused.push((tc.label.clone(), e.to_string()));
                    continue;
                }
            };
            by_label.insert(tc.label.clone(), lanes.len());
            for session in mine {
                sessions.push((lanes.len(), session));
            }
            lanes.push(Lane {
                token,
                queue: ArrayQueue::new(config.queue_capacity),
                park: Mutex::new(()),
                cv: Condvar::new(),
                sleepers: AtomicUsize::new(0),
                down: AtomicBool::new(false),
                last_error: Mutex::new(None),
                reinitialized: Mutex::new(None),
                stats: LaneStats::default(),
            });
        }
        let shared = Arc::new(Shared {
            lanes,
            by_label,
            refused,
            stop: AtomicBool::new(false),
            audit,
            config,
        });
        let mut threads = Vec::new();
        for (i, (lane, session)) in sessions.into_iter().enumerate() {
            let s = shared.clone();
            let name = format!("loupe-hsm-{i}");
            let cpu = (!s.config.cpus.is_empty()).then(|| s.config.cpus[i % s.config.cpus.len()]);
            let t = std::thread::Builder::new()
                .name(name)
                .spawn(move || {
                    if let Some(c) = cpu {
                        if let Err(e) = pin_thread(c) {
                            eprintln!("loupe: warning: cannot pin HSM thread {i} to CPU {c}: {e}");
                        }
                    }
                    HsmThread::new(s, lane, session).run()
                })
                .map_err(|e| HsmError::Invalid(format!("cannot start an HSM thread: {e}")))?;
            threads.push(t);
        }
        Ok(Signer { shared, threads })
    }

    pub fn handle(&self) -> SignerHandle {
        SignerHandle {
            shared: self.shared.clone(),
        }
    }

    /// The tokens it serves, logged in: others read their certificates
    /// through these rather than logging in again.
    pub fn served(&self) -> Vec<Token> {
        self.shared.lanes.iter().map(|l| l.token.clone()).collect()
    }

    /// The tokens it left out at start, and why (never logged into again).
    pub fn refused(&self) -> Vec<(String, String)> {
        self.shared.refused.clone()
    }

    /// Submits a request; see [`SignerHandle::submit`].
    pub fn submit(&self, req: Request, waker: Option<Waker>) -> Result<Ticket> {
        self.handle().submit(req, waker)
    }

    /// Submits and waits (CLI and tests).
    pub fn sign(&self, req: Request) -> Result<Vec<u8>> {
        self.submit(req, None)?.wait()
    }

    pub fn health(&self) -> Vec<TokenHealth> {
        self.handle().health()
    }

    /// Stops the HSM threads and answers whatever is still queued.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for lane in &self.shared.lanes {
            let _g = lane.park.lock().unwrap_or_else(|p| p.into_inner());
            lane.cv.notify_all();
        }
        // A thread inside a PKCS#11 call to a hung HSM may never return:
        // it is waited for a while, then left behind (the process is
        // stopping), so a hung HSM cannot hold the engine's shutdown.
        let deadline = Instant::now() + STOP_GRACE;
        for t in self.threads.drain(..) {
            if crate::join_by(t, deadline).is_err() {
                eprintln!(
                    "loupe: an HSM thread is still inside a call to the token after {} s (a \
                     hung HSM?): left behind",
                    STOP_GRACE.as_secs()
                );
            }
        }
        for lane in &self.shared.lanes {
            while let Some(job) = lane.queue.pop() {
                job.done.complete(Err(HsmError::Shutdown));
            }
        }
    }
}

impl Drop for Signer {
    fn drop(&mut self) {
        self.stop();
    }
}

impl SignerHandle {
    /// Queues a request. Never blocks: a full queue, a token that is down,
    /// an unknown token or a stopped service are immediate errors. `waker`
    /// is called when the answer is ready.
    pub fn submit(&self, req: Request, waker: Option<Waker>) -> Result<Ticket> {
        let sh = &self.shared;
        if sh.stop.load(Ordering::Acquire) {
            return Err(HsmError::Shutdown);
        }
        let lane = match sh.by_label.get(&req.token) {
            Some(&i) => &sh.lanes[i],
            None => match sh.refused.iter().find(|r| r.0 == req.token) {
                Some((token, why)) => {
                    return Err(HsmError::Unavailable {
                        token: token.clone(),
                        reason: format!("{why} (at start; restart the engine once fixed)"),
                    })
                }
                None => return Err(HsmError::UnknownToken(req.token)),
            },
        };
        if lane.down.load(Ordering::SeqCst) {
            lane.stats.rejected_down.fetch_add(1, Ordering::Relaxed);
            return Err(lane.unavailable());
        }
        let timeout = req.timeout.unwrap_or(sh.config.default_timeout);
        let deadline = Instant::now() + timeout;
        let done = Arc::new(Completion {
            ready: AtomicBool::new(false),
            abandoned: AtomicBool::new(false),
            inner: Mutex::new(CompletionInner {
                result: None,
                waker,
            }),
        });
        let job = Job {
            req,
            timeout,
            deadline,
            done: done.clone(),
        };
        if lane.queue.push(job).is_err() {
            lane.stats.rejected_full.fetch_add(1, Ordering::Relaxed);
            return Err(HsmError::QueueFull {
                token: lane.token.label().to_string(),
                capacity: sh.config.queue_capacity,
            });
        }
        lane.stats.submitted.fetch_add(1, Ordering::Relaxed);
        lane.wake_one();
        Ok(Ticket {
            done,
            deadline,
            timeout,
        })
    }

    /// Whether `token` is served and up (a submission would be queued).
    pub fn is_up(&self, token: &str) -> bool {
        let sh = &self.shared;
        !sh.stop.load(Ordering::Acquire)
            && sh
                .by_label
                .get(token)
                .is_some_and(|&i| !sh.lanes[i].down.load(Ordering::SeqCst))
    }

    pub fn health(&self) -> Vec<TokenHealth> {
        let refused = self.shared.refused.iter().map(|(token, why)| TokenHealth {
            token: token.clone(),
            up: false,
            last_error: Some(why.clone()),
            queue_depth: 0,
            submitted: 0,
            signed: 0,
            failed: 0,
            timed_out: 0,
            abandoned: 0,
            rejected_full: 0,
            rejected_down: 0,
            recoveries: 0,
            latency: Latency::default(),
        });
        self.shared
            .lanes
            .iter()
            .map(|l| {
                let s = &l.stats;
                TokenHealth {
                    token: l.token.label().to_string(),
                    up: !l.down.load(Ordering::SeqCst),
                    last_error: l
                        .last_error
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone(),
                    queue_depth: l.queue.len(),
                    submitted: s.submitted.load(Ordering::Relaxed),
                    signed: s.signed.load(Ordering::Relaxed),
                    failed: s.failed.load(Ordering::Relaxed),
                    timed_out: s.timed_out.load(Ordering::Relaxed),
                    abandoned: s.abandoned.load(Ordering::Relaxed),
                    rejected_full: s.rejected_full.load(Ordering::Relaxed),
                    rejected_down: s.rejected_down.load(Ordering::Relaxed),
                    recoveries: s.recoveries.load(Ordering::Relaxed),
                    latency: s.latency.snapshot(),
                }
            })
            .chain(refused)
            .collect()
    }
}

/// One HSM thread: one session, one lane.
struct HsmThread {
    shared: Arc<Shared>,
    lane: usize,
    session: Option<TokenSession>,
    /// SHA-256 of a PIN the token rejected, so it is not tried again.
    bad_pin: Option<[u8; 32]>,
}

impl HsmThread {
    fn new(shared: Arc<Shared>, lane: usize, session: TokenSession) -> HsmThread {
        HsmThread {
            shared,
            lane,
            session: Some(session),
            bad_pin: None,
        }
    }

    fn lane(&self) -> &Lane {
        &self.shared.lanes[self.lane]
    }

    fn stopping(&self) -> bool {
        self.shared.stop.load(Ordering::Acquire)
    }

    fn run(mut self) {
        let batch_max = self.shared.config.batch;
        let mut jobs = Vec::with_capacity(batch_max);
        let mut entries = Vec::new();
        let mut wakes = Wakes::default();
        while !self.stopping() {
            if self.session.is_none() {
                self.recover();
                continue;
            }
            while jobs.len() < batch_max {
                match self.lane().queue.pop() {
                    Some(j) => jobs.push(j),
                    None => break,
                }
            }
            if jobs.is_empty() {
                self.park();
                continue;
            }
            for job in jobs.drain(..) {
                if self.session.is_none() {
                    // The token went down earlier in this batch.
                    wakes.add(job.done.complete_deferred(Err(self.lane().unavailable())));
                    continue;
                }
                if let Some(entry) = self.serve(job, &mut wakes) {
                    entries.push(entry);
                }
                wakes.wake_due();
            }
            wakes.wake_all();
            if let Some(audit) = &self.shared.audit {
                if let Err(e) = audit.record(std::mem::take(&mut entries)) {
                    eprintln!("loupe: {e}");
                }
            }
        }
    }

    /// Signs one job and answers it; returns its audit entry when the key
    /// was used (or its use was attempted).
    fn serve(&mut self, job: Job, wakes: &mut Wakes) -> Option<Entry> {
        let stats = &self.shared.lanes[self.lane].stats;
        if job.done.abandoned.load(Ordering::Acquire) {
            stats.abandoned.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        if Instant::now() >= job.deadline {
            stats.timed_out.fetch_add(1, Ordering::Relaxed);
            wakes.add(
                job.done
                    .complete_deferred(Err(HsmError::Timeout(job.timeout))),
            );
            return None;
        }
        let req = &job.req;
        let mut result = self.sign_once(req);
        if matches!(&result, Err(e) if e.is_session_lost()) {
            // The session (or the login) is gone: re-open once, then retry.
            let shared = self.shared.clone();
            let lane = &shared.lanes[self.lane];
            match self.reopen() {
                Ok(()) => result = self.sign_once(req),
                Err(e) => {
                    self.session = None;
                    lane.set_down(e.reason());
                    result = Err(lane.unavailable());
                }
            }
            if matches!(&result, Err(e) if e.is_session_lost()) {
                self.session = None;
                let reason = result
                    .as_ref()
                    .err()
                    .map(|e| e.to_string())
                    .unwrap_or_default();
                lane.set_down(reason);
            }
        }
        let lane = &self.shared.lanes[self.lane];
        match &result {
            Ok(_) => lane.stats.signed.fetch_add(1, Ordering::Relaxed),
            Err(_) => lane.stats.failed.fetch_add(1, Ordering::Relaxed),
        };
        // Submitted at `deadline - timeout`.
        let submitted = job.deadline.checked_sub(job.timeout);
        if let Some(at) = submitted {
            lane.stats.latency.record(at.elapsed());
        }
        let req = job.req;
        let entry = self.shared.audit.is_some().then(|| Entry {
            time: SystemTime::now(),
            kind: Kind::Sign,
            token: req.token,
            key: req.key,
            mech: Some(req.mech),
            purpose: req.purpose,
            requester: req.requester,
            result: result.as_ref().map(|_| ()).map_err(|e| e.to_string()),
        });
        wakes.add(job.done.complete_deferred(result));
        entry
    }

    fn sign_once(&mut self, req: &Request) -> Result<Vec<u8>> {
        match self.session.as_mut() {
            Some(s) => s.sign(&req.key, req.mech, &req.message),
            None => Err(self.lane().unavailable()),
        }
    }

    /// Re-opens this thread's session with the PIN read once. A PIN the
    /// token rejected is remembered and not tried again until the source
    /// changes: a network HSM locks its user after a few failures.
    fn reopen(&mut self) -> std::result::Result<(), Reopen> {
        let shared = self.shared.clone();
        let token = &shared.lanes[self.lane].token;
        let pin = token.config().pin.read().map_err(Reopen::Pin)?;
        let digest = crate::pin::digest(&pin);
        if self.bad_pin == Some(digest) {
            return Err(Reopen::KnownBad(format!(
                "wrong PIN; not retrying until {} changes",
                token.config().pin.describe()
            )));
        }
        match token.session_with(&pin) {
            Ok(s) => {
                self.session = Some(s);
                self.bad_pin = None;
                Ok(())
            }
            Err(e) => {
                if matches!(e, HsmError::PinIncorrect(_)) {
                    self.bad_pin = Some(digest);
                }
                Err(Reopen::Token(e))
            }
        }
    }

    /// Waits for work (or a stop), without a lost wake-up: the sleeper count
    /// is raised under the lock before the queue is checked again.
    fn park(&self) {
        let lane = self.lane();
        let g = lane.park.lock().unwrap_or_else(|p| p.into_inner());
        lane.sleepers.fetch_add(1, Ordering::SeqCst);
        if lane.queue.is_empty() && !self.stopping() {
            let _ = lane.cv.wait_timeout(g, Duration::from_millis(100));
        }
        lane.sleepers.fetch_sub(1, Ordering::SeqCst);
    }

    /// Backs off and re-opens the session until it works or the service
    /// stops.
    fn recover(&mut self) {
        let cfg = &self.shared.config;
        let (min, max) = (cfg.backoff_min, cfg.backoff_max.max(cfg.backoff_min));
        let mut backoff = min;
        while !self.stopping() {
            {
                let lane = self.lane();
                let g = lane.park.lock().unwrap_or_else(|p| p.into_inner());
                if !self.stopping() {
                    let _ = lane.cv.wait_timeout(g, backoff);
                }
            }
            if self.stopping() {
                return;
            }
            backoff = (backoff * 2).min(max);
            let shared = self.shared.clone();
            let lane = &shared.lanes[self.lane];
            match self.reopen() {
                Ok(()) => {
                    lane.set_up();
                    return;
                }
                Err(e @ Reopen::Pin(_)) => lane.set_down(e.reason()),
                Err(e) => {
                    *lane.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.reason());
                    if matches!(&e, Reopen::Token(t) if t.is_device_gone()) {
                        // A device that stays lost may need the module to
                        // reconnect (a network HSM's client library does
                        // only at C_Initialize).
                        let mut last = lane.reinitialized.lock().unwrap_or_else(|p| p.into_inner());
                        if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                            *last = Some(Instant::now());
                            if let Err(e) = lane.token.reinitialize_module() {
                                eprintln!("loupe: HSM token {:?}: {e}", lane.token.label());
                            }
                        }
                    }
                    if matches!(&e, Reopen::Token(t) if !matches!(t, HsmError::PinIncorrect(_))) {
                        // The token may be back in another slot; not
                        // finding it is the device being gone too.
                        if let Err(e) = lane.token.refind_slot() {
                            *lane.last_error.lock().unwrap_or_else(|p| p.into_inner()) =
                                Some(e.to_string());
                        }
                    }
                }
            }
        }
    }
}

/// Why a session could not be re-opened.
enum Reopen {
    /// The PIN source could not be read.
    Pin(HsmError),
    /// The PIN is one the token already rejected (not tried again).
    KnownBad(String),
    /// The token refused (a wrong PIN among other reasons).
    Token(HsmError),
}

impl Reopen {
    fn reason(&self) -> String {
        match self {
            Reopen::Pin(e) | Reopen::Token(e) => e.to_string(),
            Reopen::KnownBad(why) => why.clone(),
        }
    }
}
