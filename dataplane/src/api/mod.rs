//! The dataplane's control socket: the control process (and only it, or
//! root) applies policies, reads status and flows, and receives the flow
//! log records over newline-delimited JSON on a Unix socket (mode 0660,
//! peers checked with SO_PEERCRED).
//!
//! The dataplane never depends on control being there: it keeps running
//! with its last good policy, and queues flow records (bounded, drops
//! counted) until a control process subscribes again.

pub mod unix;

use std::{
    collections::VecDeque,
    io::{BufReader, Write},
    os::unix::net::{UnixListener, UnixStream},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread,
    time::Duration,
};

use crossbeam::channel::{Receiver, Sender};
use serde::{Deserialize, Serialize};

use self::unix::Access;
use crate::{
    flow::FlowLogEntry,
    policy::{Policy, PolicyCell},
    stats::StatsReport,
};

/// A request to the dataplane.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// The stats report (workers, counters, HSM health, flows, policy).
    Status,
    /// The running policy.
    Policy,
    /// Swap in a new policy (its version must be above the running one's).
    Apply { policy: Box<Policy> },
    /// From now on this connection receives the flow log records; one
    /// subscriber at a time (a new one replaces the old).
    Events,
}

/// An answer, or one record of an event stream.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Box<StatsReport>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<Box<Policy>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<FlowLogEntry>,
}

impl Response {
    pub fn ok() -> Response {
        Response {
            ok: true,
            ..Response::default()
        }
    }

    pub fn error(e: impl Into<String>) -> Response {
        Response {
            ok: false,
            error: Some(e.into()),
            ..Response::default()
        }
    }
}

/// What the socket asks of the engine's thread (which owns the maps).
pub enum EngineRequest {
    Status(Sender<StatsReport>),
    /// Validate, steer and swap; the answer is the running version.
    Apply(Arc<Policy>, Sender<Result<u64, String>>),
}

#[derive(Clone, Debug)]
pub struct ApiConfig {
    pub socket: PathBuf,
    pub access: Access,
}

/// Flow records waiting for a subscriber, at most this many.
pub const BACKLOG: usize = 100_000;
/// How long a client may stay connected without a request.
const IDLE_CLIENT: Duration = Duration::from_secs(60);
/// How long a reader may stall the event stream before it is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    subscriber: Mutex<Option<UnixStream>>,
    subscribed: AtomicBool,
    backlog: AtomicU64,
    dropped: AtomicU64,
}

/// The running socket server.
pub struct Api {
    shared: Arc<Shared>,
    threads: Vec<thread::JoinHandle<()>>,
    socket: PathBuf,
}

impl Api {
    /// Binds the socket and starts serving.
    pub fn start(
        cfg: &ApiConfig,
        engine: Sender<EngineRequest>,
        policy: Arc<PolicyCell>,
        events: Receiver<FlowLogEntry>,
    ) -> std::io::Result<Api> {
        let listener = unix::bind(&cfg.socket, cfg.access)?;
        listener.set_nonblocking(true)?;
        let shared = Arc::new(Shared::default());
        let accept = {
            let shared = shared.clone();
            let access = cfg.access;
            thread::Builder::new()
                .name("loupe-api".into())
                .spawn(move || accept_loop(listener, access, shared, engine, policy))?
        };
        let pump = {
            let shared = shared.clone();
            thread::Builder::new()
                .name("loupe-events".into())
                .spawn(move || pump_events(events, shared))?
        };
        Ok(Api {
            shared,
            threads: vec![accept, pump],
            socket: cfg.socket.clone(),
        })
    }

    /// Stops serving and removes the socket file.
    pub fn stop(self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn accept_loop(
    listener: UnixListener,
    access: Access,
    shared: Arc<Shared>,
    engine: Sender<EngineRequest>,
    policy: Arc<PolicyCell>,
) {
    let handler_shared = shared.clone();
    unix::accept_loop(
        &listener,
        access,
        &shared.stop,
        "loupe-dataplane: control socket",
        |why| line(&Response::error(why)),
        move |stream| serve(stream, &handler_shared, &engine, &policy),
    );
}

/// A message as one line.
pub fn line(r: &impl Serialize) -> Vec<u8> {
    let mut l = serde_json::to_vec(r).unwrap_or_default();
    l.push(b'\n');
    l
}

fn reply(w: &mut impl Write, r: &Response) -> std::io::Result<()> {
    w.write_all(&line(r))
}

/// Answers one client's requests until it hangs up (or subscribes).
fn serve(stream: UnixStream, shared: &Shared, engine: &Sender<EngineRequest>, cell: &PolicyCell) {
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = unix::LineReader::new(BufReader::new(read_half));
    let mut out = &stream;
    let mut idle_since = std::time::Instant::now();
    loop {
        let line = match reader.read_line() {
            Ok(Some(l)) => l,
            Ok(None) => return,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                // A client that says nothing for long gives its slot up.
                if shared.stop.load(Ordering::Relaxed) || idle_since.elapsed() > IDLE_CLIENT {
                    return;
                }
                continue;
            }
            Err(e) => {
                let _ = reply(&mut out, &Response::error(format!("bad request: {e}")));
                return;
            }
        };
        idle_since = std::time::Instant::now();
        let request: Request = match serde_json::from_str(&line) {
            Ok(r) => r,
            Err(e) => {
                if reply(&mut out, &Response::error(format!("bad request: {e}"))).is_err() {
                    return;
                }
                continue;
            }
        };
        let response = match request {
            Request::Status => {
                ask(engine, EngineRequest::Status).map_or_else(Response::error, |mut s| {
                    s.log_queue.backlog = shared.backlog.load(Ordering::Relaxed);
                    s.log_queue.dropped = shared.dropped.load(Ordering::Relaxed);
                    s.log_queue.subscribed = shared.subscribed.load(Ordering::Relaxed);
                    Response {
                        status: Some(Box::new(s)),
                        ..Response::ok()
                    }
                })
            }
            Request::Policy => Response {
                policy: cell.current().map(|p| Box::new((*p).clone())),
                ..Response::ok()
            },
            Request::Apply { policy } => {
                match ask(engine, |tx| EngineRequest::Apply(Arc::new(*policy), tx)) {
                    Ok(Ok(v)) => Response {
                        version: Some(v),
                        ..Response::ok()
                    },
                    Ok(Err(e)) | Err(e) => Response::error(e),
                }
            }
            Request::Events => {
                if reply(&mut out, &Response::ok()).is_err() {
                    return;
                }
                let old = lock(&shared.subscriber).replace(stream);
                shared.subscribed.store(true, Ordering::Relaxed);
                if let Some(old) = old {
                    let _ = old.shutdown(std::net::Shutdown::Both);
                }
                return;
            }
        };
        if reply(&mut out, &response).is_err() {
            return;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sends a request to the engine's thread and waits for its answer.
fn ask<T>(
    engine: &Sender<EngineRequest>,
    make: impl FnOnce(Sender<T>) -> EngineRequest,
) -> Result<T, String> {
    let (tx, rx) = crossbeam::channel::bounded(1);
    engine
        .send(make(tx))
        .map_err(|_| "the engine is stopping".to_string())?;
    rx.recv_timeout(Duration::from_secs(10))
        .map_err(|_| "the engine did not answer within 10 s".to_string())
}

/// Moves flow records from the workers to the subscriber, keeping up to
/// [`BACKLOG`] of them while there is none (the oldest go first, counted).
fn pump_events(events: Receiver<FlowLogEntry>, shared: Arc<Shared>) {
    let mut backlog: VecDeque<FlowLogEntry> = VecDeque::new();
    while !shared.stop.load(Ordering::Relaxed) {
        let first = events.recv_timeout(Duration::from_millis(100)).ok();
        for e in first.into_iter().chain(events.try_iter()) {
            if backlog.len() >= BACKLOG {
                backlog.pop_front();
                shared.dropped.fetch_add(1, Ordering::Relaxed);
            }
            backlog.push_back(e);
        }
        let mut sub = lock(&shared.subscriber);
        if let Some(stream) = sub.as_mut() {
            while let Some(e) = backlog.front() {
                let r = Response {
                    event: Some(e.clone()),
                    ..Response::ok()
                };
                if reply(stream, &r).is_err() {
                    // Gone or stalled: keep the record for the next one.
                    *sub = None;
                    break;
                }
                backlog.pop_front();
            }
        }
        shared.subscribed.store(sub.is_some(), Ordering::Relaxed);
        drop(sub);
        shared
            .backlog
            .store(backlog.len() as u64, Ordering::Relaxed);
    }
}
