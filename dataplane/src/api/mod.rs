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
    time::{Duration, Instant},
};

use crossbeam::channel::{Receiver, Sender};
use serde::{Deserialize, Serialize};

use self::unix::Access;
use crate::{
    flow::FlowLogEntry,
    policy::{Policy, PolicyCell},
    stats::StatsReport,
    tls::context::{Exclusion, TlsContext},
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
    /// subscriber at a time (a new one replaces the old). Each record has
    /// a `seq`; the subscriber answers `ack` with the highest `seq` it has
    /// stored, and unacknowledged records go again to the next subscriber
    /// (at least once; `run` and `seq` let a reader drop repeats).
    Events,
    /// On an event stream: records up to `upto` are stored.
    Ack { upto: u64 },
    /// The decryption exclusion cache (and with `clear`, empty it).
    Exclusions {
        #[serde(default)]
        clear: bool,
    },
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
    /// An event's number in this dataplane run, from 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// The dataplane run the event belongs to (its start, Unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<u64>,
    /// The decryption exclusion cache (before a clear).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclusions: Option<Vec<Exclusion>>,
    /// An applied policy's parts the engine could not prepare (a profile
    /// whose key log, trust store or server key failed): their
    /// connections are blocked, each line says why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
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
    /// Validate, steer and swap; the answer is the running version and
    /// what of it could not be prepared.
    Apply(Arc<Policy>, Sender<Result<(u64, Vec<String>), String>>),
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
/// When the engine stops, how long the subscriber is given to take and
/// acknowledge the last records.
const FLUSH_ON_STOP: Duration = Duration::from_secs(3);
/// How long a reader may stall the event stream before it is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    /// A new subscriber, handed to the event pump.
    subscriber: Mutex<Option<UnixStream>>,
    subscribed: AtomicBool,
    /// This run's id (its start, Unix ms).
    run: u64,
    backlog: AtomicU64,
    dropped: AtomicU64,
    /// TLS interception, for the exclusion cache.
    tls: Option<Arc<TlsContext>>,
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
        tls: Option<Arc<TlsContext>>,
    ) -> std::io::Result<Api> {
        let listener = unix::bind(&cfg.socket, cfg.access)?;
        listener.set_nonblocking(true)?;
        let shared = Arc::new(Shared {
            run: crate::flow::log::unix_ms(),
            tls,
            ..Shared::default()
        });
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
        move |stream, slot| serve(stream, slot, &handler_shared, &engine, &policy),
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
fn serve(
    stream: UnixStream,
    slot: &unix::Slot,
    shared: &Shared,
    engine: &Sender<EngineRequest>,
    cell: &PolicyCell,
) {
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
        let _busy = slot.busy();
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
                    Ok(Ok((v, warnings))) => Response {
                        version: Some(v),
                        warnings,
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
            Request::Ack { .. } => Response::error("ack outside an event stream"),
            Request::Exclusions { clear } => match &shared.tls {
                Some(t) => {
                    let list = t.exclusions.list();
                    if clear {
                        t.exclusions.clear();
                    }
                    Response {
                        exclusions: Some(list),
                        ..Response::ok()
                    }
                }
                None => Response::error(
                    "decryption is not running in this dataplane (start it with --hsm-token)",
                ),
            },
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

/// The event stream's subscriber, as the pump holds it.
struct Subscriber {
    stream: UnixStream,
    acks: unix::LineReader<BufReader<UnixStream>>,
}

/// Moves flow records from the workers to the subscriber, keeping up to
/// [`BACKLOG`] of them until acknowledged (the oldest go first when it is
/// full, counted). A new subscriber gets every unacknowledged record again.
fn pump_events(events: Receiver<FlowLogEntry>, shared: Arc<Shared>) {
    let mut backlog: VecDeque<(u64, FlowLogEntry)> = VecDeque::new();
    let mut seq = 0u64;
    // The front records written to the current subscriber, unacknowledged.
    let mut sent = 0usize;
    let mut sub: Option<Subscriber> = None;
    // Stopping: the last records (the workers' final ones among them) go
    // out and are acknowledged, within a bound.
    let mut stop_by = None;
    loop {
        if shared.stop.load(Ordering::Relaxed) {
            let by = *stop_by.get_or_insert_with(|| Instant::now() + FLUSH_ON_STOP);
            let flushed = events.is_empty() && (backlog.is_empty() || sub.is_none());
            if flushed || Instant::now() >= by {
                break;
            }
        }
        // With records waiting for room in the window (or to go before
        // the engine stops), look again soon.
        let waiting = (sub.is_some() && backlog.len() > sent) || stop_by.is_some();
        let wait = Duration::from_millis(if waiting { 5 } else { 100 });
        let first = match events.recv_timeout(wait) {
            Ok(e) => Some(e),
            Err(crossbeam::channel::RecvTimeoutError::Timeout) => None,
            Err(crossbeam::channel::RecvTimeoutError::Disconnected) => {
                // The workers are gone (the engine is stopping).
                thread::sleep(Duration::from_millis(20));
                None
            }
        };
        for e in first.into_iter().chain(events.try_iter()) {
            if backlog.len() >= BACKLOG {
                backlog.pop_front();
                sent = sent.saturating_sub(1);
                shared.dropped.fetch_add(1, Ordering::Relaxed);
            }
            seq += 1;
            backlog.push_back((seq, e));
        }
        if let Some(stream) = lock(&shared.subscriber).take() {
            if let Some(old) = sub.take() {
                let _ = old.stream.shutdown(std::net::Shutdown::Both);
            }
            // Acks are read without waiting (the timeout is the read side's
            // only; writes keep theirs).
            let _ = stream.set_read_timeout(Some(Duration::from_millis(1)));
            sub = stream.try_clone().ok().map(|r| Subscriber {
                stream,
                acks: unix::LineReader::new(BufReader::new(r)),
            });
            sent = 0;
        }
        if let Some(s) = sub.as_mut() {
            if !send_window(s, &mut backlog, &mut sent, shared.run) {
                // Gone or stalled: what it did not acknowledge waits for the
                // next one.
                sub = None;
                sent = 0;
            }
        }
        shared.subscribed.store(sub.is_some(), Ordering::Relaxed);
        shared
            .backlog
            .store(backlog.len() as u64, Ordering::Relaxed);
    }
    if !backlog.is_empty() {
        eprintln!(
            "loupe-dataplane: warning: {} flow records were not acknowledged by the control \
             process and are lost with this run",
            backlog.len()
        );
    }
}

/// Records in flight to a subscriber (written, not acknowledged), at most:
/// neither side ever blocks on the other's unread bytes.
const WINDOW: usize = 512;

/// Takes the subscriber's acknowledgements and writes what fits in the
/// window; false when the subscriber is gone.
fn send_window(
    s: &mut Subscriber,
    backlog: &mut VecDeque<(u64, FlowLogEntry)>,
    sent: &mut usize,
    run: u64,
) -> bool {
    loop {
        if read_acks(s, backlog, sent) {
            return false;
        }
        if *sent >= backlog.len() || *sent >= WINDOW {
            return true;
        }
        let end = backlog.len().min(*sent + WINDOW / 4).min(WINDOW);
        for (n, e) in backlog.range(*sent..end) {
            let r = Response {
                event: Some(e.clone()),
                seq: Some(*n),
                run: Some(run),
                ..Response::ok()
            };
            if reply(&mut s.stream, &r).is_err() {
                return false;
            }
            *sent += 1;
        }
    }
}

/// Drops acknowledged records (never more than were sent); true when the
/// subscriber hung up.
fn read_acks(
    s: &mut Subscriber,
    backlog: &mut VecDeque<(u64, FlowLogEntry)>,
    sent: &mut usize,
) -> bool {
    loop {
        match s.acks.read_line() {
            Ok(Some(line)) => {
                if let Ok(Request::Ack { upto }) = serde_json::from_str(&line) {
                    while *sent > 0 && backlog.front().is_some_and(|(n, _)| *n <= upto) {
                        backlog.pop_front();
                        *sent -= 1;
                    }
                }
            }
            Ok(None) => return true,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(rule: &str) -> FlowLogEntry {
        FlowLogEntry {
            rule: rule.into(),
            ..FlowLogEntry::default()
        }
    }

    /// Reads the next event line from a subscriber's end.
    fn next(r: &mut unix::LineReader<BufReader<UnixStream>>) -> (u64, String) {
        let line = r.read_line().unwrap().unwrap();
        let resp: Response = serde_json::from_str(&line).unwrap();
        (resp.seq.unwrap(), resp.event.unwrap().rule)
    }

    fn subscribe(shared: &Shared) -> (UnixStream, unix::LineReader<BufReader<UnixStream>>) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        *lock(&shared.subscriber) = Some(theirs);
        let r = unix::LineReader::new(BufReader::new(ours.try_clone().unwrap()));
        (ours, r)
    }

    /// Waits (with a generous deadline) until `cond` holds.
    fn wait_for(what: &str, cond: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while !cond() {
            assert!(std::time::Instant::now() < deadline, "timed out: {what}");
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// With no control process the dataplane keeps the newest 100,000
    /// records, drops the oldest beyond and counts them; the status
    /// answer (what `loupe status` and the metrics read) carries both
    /// numbers, and a subscriber gets what was kept, oldest first.
    #[test]
    fn the_backlog_keeps_a_hundred_thousand_and_counts_what_it_drops() {
        assert_eq!(BACKLOG, 100_000, "the README promises 100,000");
        let (tx, rx) = crossbeam::channel::unbounded();
        let shared = Arc::new(Shared::default());
        let pump = {
            let shared = shared.clone();
            thread::spawn(move || pump_events(rx, shared))
        };
        let extra = 7;
        for i in 0..BACKLOG + extra {
            tx.send(entry(&i.to_string())).unwrap();
        }
        wait_for("every record taken by the pump", || {
            tx.is_empty() && shared.backlog.load(Ordering::Relaxed) == BACKLOG as u64
        });
        wait_for("the drops counted", || {
            shared.dropped.load(Ordering::Relaxed) == extra as u64
        });

        // The status answer, through the socket's own handler.
        let (engine_tx, engine_rx) = crossbeam::channel::bounded::<EngineRequest>(1);
        let engine = thread::spawn(move || {
            if let Ok(EngineRequest::Status(reply)) = engine_rx.recv() {
                let _ = reply.send(StatsReport::default());
            }
        });
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let server = {
            let shared = shared.clone();
            let slot = unix::Slot::new(theirs.try_clone().unwrap());
            thread::spawn(move || serve(theirs, &slot, &shared, &engine_tx, &PolicyCell::default()))
        };
        (&ours).write_all(&line(&Request::Status)).unwrap();
        let mut r = unix::LineReader::new(BufReader::new(ours.try_clone().unwrap()));
        let resp: Response = serde_json::from_str(&r.read_line().unwrap().unwrap()).unwrap();
        let q = resp.status.expect("a status").log_queue;
        assert_eq!(
            (q.backlog, q.dropped, q.subscribed),
            (BACKLOG as u64, extra as u64, false)
        );
        drop((ours, r));
        server.join().unwrap();
        engine.join().unwrap();

        // The oldest went; the first kept is the one after them.
        let (ours, mut r) = subscribe(&shared);
        assert_eq!(next(&mut r), (extra as u64 + 1, extra.to_string()));
        // Gone before the pump stops: it is writing to a full socket.
        drop((ours, r));
        shared.stop.store(true, Ordering::Relaxed);
        pump.join().unwrap();
    }

    #[test]
    fn unacknowledged_records_go_again_to_the_next_subscriber() {
        let (tx, rx) = crossbeam::channel::unbounded();
        let shared = Arc::new(Shared {
            run: 7,
            ..Shared::default()
        });
        let pump = {
            let shared = shared.clone();
            thread::spawn(move || pump_events(rx, shared))
        };
        for r in ["a", "b", "c"] {
            tx.send(entry(r)).unwrap();
        }
        let (mut first, mut r1) = subscribe(&shared);
        assert_eq!(next(&mut r1), (1, "a".into()));
        assert_eq!(next(&mut r1), (2, "b".into()));
        assert_eq!(next(&mut r1), (3, "c".into()));
        // Only the first is stored before this subscriber goes away.
        first.write_all(&line(&Request::Ack { upto: 1 })).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while shared.backlog.load(Ordering::Relaxed) != 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "the ack was not taken"
            );
            thread::sleep(Duration::from_millis(5));
        }
        drop((first, r1));
        tx.send(entry("d")).unwrap();
        let (mut second, mut r2) = subscribe(&shared);
        assert_eq!(next(&mut r2), (2, "b".into()));
        assert_eq!(next(&mut r2), (3, "c".into()));
        assert_eq!(next(&mut r2), (4, "d".into()));
        second.write_all(&line(&Request::Ack { upto: 4 })).unwrap();
        while shared.backlog.load(Ordering::Relaxed) != 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the ack was not taken"
            );
            thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(shared.dropped.load(Ordering::Relaxed), 0);
        shared.stop.store(true, Ordering::Relaxed);
        pump.join().unwrap();
    }

    #[test]
    fn at_most_a_window_is_in_flight_and_acks_move_it() {
        let (tx, rx) = crossbeam::channel::unbounded();
        let shared = Arc::new(Shared::default());
        let pump = {
            let shared = shared.clone();
            thread::spawn(move || pump_events(rx, shared))
        };
        let n = WINDOW * 3;
        for i in 0..n {
            tx.send(entry(&i.to_string())).unwrap();
        }
        let (mut ours, mut r) = subscribe(&shared);
        // Without acknowledgements, a window's worth and no more.
        for i in 1..=WINDOW as u64 {
            assert_eq!(next(&mut r), (i, (i - 1).to_string()));
        }
        ours.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let more = r.read_line().unwrap_err();
        assert_eq!(more.kind(), std::io::ErrorKind::WouldBlock, "{more}");
        ours.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        // Acks move it on: everything arrives, in order.
        let mut got = WINDOW as u64;
        ours.write_all(&line(&Request::Ack { upto: got })).unwrap();
        while (got as usize) < n {
            let (seq, rule) = next(&mut r);
            assert_eq!((seq, rule), (got + 1, got.to_string()));
            got = seq;
            if got.is_multiple_of(100) || got as usize == n {
                ours.write_all(&line(&Request::Ack { upto: got })).unwrap();
            }
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while shared.backlog.load(Ordering::Relaxed) != 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the last ack was not taken"
            );
            thread::sleep(Duration::from_millis(5));
        }
        // An ack beyond what was sent drops nothing unsent.
        tx.send(entry("late")).unwrap();
        ours.write_all(&line(&Request::Ack { upto: 1_000_000 }))
            .unwrap();
        assert_eq!(next(&mut r), (n as u64 + 1, "late".into()));
        shared.stop.store(true, Ordering::Relaxed);
        pump.join().unwrap();
    }
}
