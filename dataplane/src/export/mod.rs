//! Export of decrypted plaintext to the tools analysts use: each decrypted
//! connection of a profile with `export = [...]` is re-told as a
//! synthetic plaintext TCP session ([`synth`]) with the original
//! addresses, ports and real timestamps, written to a ring of pcapng
//! files ([`pcapng`]) and/or sent out a mirror interface ([`mirror`]).
//!
//! Off unless the engine is started with a destination; enabling it is
//! written to the HSM audit log. The packet workers never wait for it:
//! their [`Tap`] copies each chunk into a bounded queue (by count and by
//! bytes) and one exporter thread builds and writes the frames. When the
//! queue is full the chunk is dropped and counted, and the session shows
//! a gap where it was, never shifted bytes.
//!
//! A profile may also ask for the client leg as it was on the wire
//! (`pcap-tls`): the TLS bytes exchanged with the client, re-told the same
//! way into a second ring of files in the capture directory
//! (`loupe-tls-*.pcapng`, apart so that the two sessions of one
//! connection never share a file), each connection's key log written
//! before its encrypted records as a Decryption Secrets Block, and again
//! at the start of every new file while it lasts: Wireshark decrypts the
//! capture with no key log file beside it.

pub mod mirror;
pub mod pcapng;
pub mod synth;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime},
};

use crossbeam::channel::{bounded, Receiver, RecvTimeoutError, Sender, TrySendError};
use serde::{Deserialize, Serialize};

use self::{
    mirror::Mirror,
    pcapng::{Ring, RingConfig},
    synth::{Marks, Session},
};
use crate::{
    inspect::{Direction, Inspector, Report},
    policy::ExportSink,
};

/// Where decrypted copies go.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExportConfig {
    pub pcap: Option<RingConfig>,
    /// Interface name of the mirror port.
    pub mirror: Option<String>,
    /// Plaintext bytes waiting for the exporter thread, at most.
    pub queue_bytes: u64,
}

impl ExportConfig {
    pub fn enabled(&self) -> bool {
        self.pcap.is_some() || self.mirror.is_some()
    }

    /// One line for the audit log and the start-up message.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(p) = &self.pcap {
            parts.push(format!(
                "pcapng files in {} ({} MB each, {} s each, {} MB in all)",
                p.dir.display(),
                p.file_bytes / 1_000_000,
                p.file_age.as_secs(),
                p.total_bytes / 1_000_000
            ));
        }
        if let Some(m) = &self.mirror {
            parts.push(format!("mirror port {m}"));
        }
        format!(
            "decrypted plaintext of profiles with export is copied to {}",
            parts.join(" and ")
        )
    }
}

/// Which sinks a connection is copied to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sinks {
    pub pcap: bool,
    pub mirror: bool,
    /// The client leg's TLS and key log, into the TLS ring.
    pub pcap_tls: bool,
}

impl Sinks {
    pub fn any(self) -> bool {
        self.pcap || self.mirror || self.pcap_tls
    }

    /// The plaintext sinks (the pipeline's tap).
    pub fn plaintext(self) -> bool {
        self.pcap || self.mirror
    }
}

/// The exporter's counters (all since start).
#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    events_dropped: AtomicU64,
    bytes_dropped: AtomicU64,
    queued_bytes: AtomicU64,
    pcap_files_opened: AtomicU64,
    pcap_files_removed: AtomicU64,
    pcap_bytes: AtomicU64,
    pcap_disk_bytes: AtomicU64,
    pcap_write_errors: AtomicU64,
    pcap_packets: AtomicU64,
    pcap_frames_lost: AtomicU64,
    mirror_frames: AtomicU64,
    mirror_dropped: AtomicU64,
}

/// The exporter's state for `loupe status` and the metrics.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExportReport {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pcap_dir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<String>,
    /// Connections copied so far.
    pub connections: u64,
    /// Plaintext chunks (and their bytes) lost because the queue was full.
    pub events_dropped: u64,
    pub bytes_dropped: u64,
    pub queued_bytes: u64,
    pub pcap_files_opened: u64,
    pub pcap_files_removed: u64,
    pub pcap_packets: u64,
    /// Frames that did not reach the files (a failed write, a directory
    /// that cannot be used, a full disk).
    #[serde(default)]
    pub pcap_frames_lost: u64,
    pub pcap_bytes: u64,
    /// What the ring's files take on disk now.
    pub pcap_disk_bytes: u64,
    pub pcap_write_errors: u64,
    pub mirror_frames: u64,
    /// Frames the mirror interface did not take (queue full, link down).
    pub mirror_dropped: u64,
}

/// One connection, as its events name it.
struct Conn {
    /// Where its frames go (for a TLS leg: `pcap`, meaning the TLS ring).
    sinks: Sinks,
    session: Session,
    /// The TLS leg's copy (else the plaintext's).
    tls: bool,
    id: u64,
}

enum What {
    Open,
    Data(Direction, Vec<u8>),
    /// Key log lines (TLS leg).
    Keys(Vec<u8>),
    Fin(Direction),
    Reset,
}

struct Event {
    conn: Arc<Conn>,
    at: SystemTime,
    /// The stream positions before this event.
    marks: Marks,
    what: What,
}

impl Event {
    fn cost(&self) -> u64 {
        64 + match &self.what {
            What::Data(_, b) | What::Keys(b) => b.len() as u64,
            _ => 0,
        }
    }
}

/// The exporter: the queue, its thread and its counters.
pub struct Exporter {
    tx: Sender<Event>,
    has: Sinks,
    describe: String,
    pcap_dir: Option<String>,
    mirror_name: Option<String>,
    queue_bytes: u64,
    counters: Arc<Counters>,
    next_id: AtomicU64,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe)
    }
}

/// TLS legs whose key logs are kept for new files, at most.
const MAX_TLS_LEGS: usize = 65_536;

/// Chunks waiting, at most (besides the byte bound).
const QUEUE_EVENTS: usize = 65_536;

impl Exporter {
    /// Opens the destinations (so that a bad one stops the engine's start
    /// with its reason) and starts the exporter thread.
    pub fn start(cfg: &ExportConfig) -> Result<Arc<Exporter>, String> {
        let ring = cfg.pcap.clone().map(Ring::open).transpose()?;
        let tls_ring = cfg
            .pcap
            .clone()
            .map(|c| Ring::open_named(c, pcapng::TLS))
            .transpose()?;
        let mirror = cfg.mirror.as_deref().map(Mirror::open).transpose()?;
        let (tx, rx) = bounded(QUEUE_EVENTS);
        let counters = Arc::new(Counters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let worker = Worker {
            rx,
            ring,
            tls_ring,
            keys: BTreeMap::new(),
            mirror,
            counters: counters.clone(),
            stop: stop.clone(),
            buf: Vec::with_capacity(2048),
            blocks: Vec::with_capacity(64 << 10),
        };
        let thread = std::thread::Builder::new()
            .name("loupe-export".into())
            .spawn(move || worker.run())
            .map_err(|e| format!("cannot start the exporter thread: {e}"))?;
        Ok(Arc::new(Exporter {
            tx,
            has: Sinks {
                pcap: cfg.pcap.is_some(),
                mirror: cfg.mirror.is_some(),
                pcap_tls: cfg.pcap.is_some(),
            },
            describe: cfg.describe(),
            pcap_dir: cfg.pcap.as_ref().map(|p| p.dir.display().to_string()),
            mirror_name: cfg.mirror.clone(),
            queue_bytes: cfg.queue_bytes.max(1 << 20),
            counters,
            next_id: AtomicU64::new(1),
            stop,
            thread: Mutex::new(Some(thread)),
        }))
    }

    /// What the engine copies where, in a sentence.
    pub fn describe(&self) -> &str {
        &self.describe
    }

    /// The sinks of `wanted` this exporter has.
    pub fn sinks(&self, wanted: &[ExportSink]) -> Sinks {
        Sinks {
            pcap: self.has.pcap && wanted.contains(&ExportSink::Pcap),
            mirror: self.has.mirror && wanted.contains(&ExportSink::Mirror),
            pcap_tls: self.has.pcap_tls && wanted.contains(&ExportSink::PcapTls),
        }
    }

    /// The inspector copying one connection's plaintext.
    pub fn tap(self: &Arc<Self>, sinks: Sinks, client: SocketAddr, server: SocketAddr) -> Tap {
        let sinks = Sinks {
            pcap_tls: false,
            ..sinks
        };
        self.tap_of(sinks, false, client, server)
    }

    /// The copy of one connection's client leg as TLS (none unless
    /// `sinks` has `pcap_tls`): fed by the TLS stage, with the leg's key
    /// log through [`Tap::keys`].
    pub fn tls_tap(
        self: &Arc<Self>,
        sinks: Sinks,
        client: SocketAddr,
        server: SocketAddr,
    ) -> Option<Tap> {
        let only = Sinks {
            pcap: true,
            mirror: false,
            pcap_tls: false,
        };
        sinks
            .pcap_tls
            .then(|| self.tap_of(only, true, client, server))
    }

    fn tap_of(
        self: &Arc<Self>,
        sinks: Sinks,
        tls: bool,
        client: SocketAddr,
        server: SocketAddr,
    ) -> Tap {
        let id = self.next_id.fetch_add(1, Relaxed);
        Tap {
            exp: self.clone(),
            conn: Arc::new(Conn {
                sinks,
                session: Session::new(client, server, id),
                tls,
                id,
            }),
            marks: Marks::default(),
            opened: false,
            closed: false,
        }
    }

    fn send(&self, ev: Event) {
        let c = &self.counters;
        let cost = ev.cost();
        let queued = c.queued_bytes.fetch_add(cost, Relaxed) + cost;
        let refused = queued > self.queue_bytes
            || match self.tx.try_send(ev) {
                Ok(()) => false,
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => true,
            };
        if refused {
            c.queued_bytes.fetch_sub(cost, Relaxed);
            c.events_dropped.fetch_add(1, Relaxed);
            c.bytes_dropped.fetch_add(cost - 64, Relaxed);
        }
    }

    pub fn report(&self) -> ExportReport {
        let c = &self.counters;
        ExportReport {
            pcap_dir: self.pcap_dir.clone(),
            mirror: self.mirror_name.clone(),
            connections: c.connections.load(Relaxed),
            events_dropped: c.events_dropped.load(Relaxed),
            bytes_dropped: c.bytes_dropped.load(Relaxed),
            queued_bytes: c.queued_bytes.load(Relaxed),
            pcap_files_opened: c.pcap_files_opened.load(Relaxed),
            pcap_files_removed: c.pcap_files_removed.load(Relaxed),
            pcap_packets: c.pcap_packets.load(Relaxed),
            pcap_frames_lost: c.pcap_frames_lost.load(Relaxed),
            pcap_bytes: c.pcap_bytes.load(Relaxed),
            pcap_disk_bytes: c.pcap_disk_bytes.load(Relaxed),
            pcap_write_errors: c.pcap_write_errors.load(Relaxed),
            mirror_frames: c.mirror_frames.load(Relaxed),
            mirror_dropped: c.mirror_dropped.load(Relaxed),
        }
    }

    /// Writes out what is queued, closes the current file and ends the
    /// thread (at engine stop, after the workers).
    pub fn stop(&self) {
        self.stop.store(true, Relaxed);
        let t = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = t {
            let _ = t.join();
        }
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The exporter thread's side.
struct Worker {
    rx: Receiver<Event>,
    ring: Option<Ring>,
    tls_ring: Option<Ring>,
    /// The key log of each TLS leg still going, and which of its FINs
    /// were seen: a new TLS file starts with them.
    keys: BTreeMap<u64, (Vec<u8>, [bool; 2])>,
    mirror: Option<Mirror>,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    buf: Vec<u8>,
    blocks: Vec<u8>,
}

impl Worker {
    fn run(mut self) {
        loop {
            match self.rx.recv_timeout(Duration::from_millis(200)) {
                Ok(ev) => {
                    self.counters.queued_bytes.fetch_sub(ev.cost(), Relaxed);
                    self.handle(ev);
                    if self.rx.is_empty() {
                        self.publish();
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    for r in [self.ring.as_mut(), self.tls_ring.as_mut()]
                        .into_iter()
                        .flatten()
                    {
                        r.tick(Instant::now());
                    }
                    self.publish();
                    if self.stop.load(Relaxed) {
                        break;
                    }
                }
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if self.stop.load(Relaxed) && self.rx.is_empty() {
                break;
            }
        }
        self.publish();
    }

    /// The ring's counters, for the report (each event is written at
    /// once: nothing is buffered).
    /// (Both rings together.)
    fn publish(&mut self) {
        let rings: Vec<&Ring> = [self.ring.as_ref(), self.tls_ring.as_ref()]
            .into_iter()
            .flatten()
            .collect();
        let sum = |f: &dyn Fn(&Ring) -> u64| rings.iter().map(|r| f(r)).sum::<u64>();
        let c = &self.counters;
        c.pcap_files_opened
            .store(sum(&|r| r.counts.files_opened), Relaxed);
        c.pcap_files_removed
            .store(sum(&|r| r.counts.files_removed), Relaxed);
        c.pcap_bytes.store(sum(&|r| r.counts.bytes), Relaxed);
        c.pcap_write_errors
            .store(sum(&|r| r.counts.write_errors), Relaxed);
        c.pcap_disk_bytes.store(sum(&|r| r.disk_bytes()), Relaxed);
    }

    /// A TLS leg's key log: kept for new files, and written now.
    fn keys(&mut self, conn: &Conn, lines: &[u8]) {
        self.keys
            .entry(conn.id)
            .or_default()
            .0
            .extend_from_slice(lines);
        // A leg whose end was lost (a full queue) is forgotten with age.
        while self.keys.len() > MAX_TLS_LEGS {
            self.keys.pop_first();
        }
        self.blocks.clear();
        pcapng::secrets(lines, &mut self.blocks);
        self.write_tls();
    }

    /// Writes `self.blocks` to the TLS ring, a new file starting with the
    /// key logs of the legs still going.
    fn write_tls(&mut self) -> bool {
        let Some(r) = self.tls_ring.as_mut() else {
            return false;
        };
        let keys = &self.keys;
        r.write_with(&self.blocks, Instant::now(), || {
            let mut pre = Vec::new();
            for (lines, _) in keys.values() {
                pcapng::secrets(lines, &mut pre);
            }
            pre
        })
    }

    /// Forgets a TLS leg's keys once it has ended.
    fn ended(&mut self, conn: &Conn, what: &What) {
        let gone = match what {
            What::Reset => true,
            What::Fin(dir) => self.keys.get_mut(&conn.id).is_some_and(|(_, fin)| {
                fin[*dir as usize] = true;
                fin[0] && fin[1]
            }),
            _ => false,
        };
        if gone {
            self.keys.remove(&conn.id);
        }
    }

    fn handle(&mut self, ev: Event) {
        if let What::Keys(lines) = &ev.what {
            self.keys(&ev.conn, lines);
            return;
        }
        let sinks = ev.conn.sinks;
        let mss = self.mirror.as_ref().map_or(1500, |m| m.mtu).min(1500);
        let mss = ev.conn.session.mss(mss);
        let s = &ev.conn.session;
        let mut frames = 0u64;
        let mut mirrored = 0u64;
        let mut dropped = 0u64;
        self.blocks.clear();
        {
            let blocks = &mut self.blocks;
            let mirror = self.mirror.as_ref().filter(|_| sinks.mirror);
            let mut out = |f: &[u8]| {
                frames += 1;
                if sinks.pcap {
                    pcapng::packet(f, ev.at, blocks);
                }
                if let Some(m) = mirror {
                    if m.send(f) {
                        mirrored += 1;
                    } else {
                        dropped += 1;
                    }
                }
            };
            match &ev.what {
                What::Open => s.open(&mut self.buf, &mut out),
                What::Data(dir, bytes) => {
                    s.data(*dir, &ev.marks, bytes, mss, &mut self.buf, &mut out)
                }
                What::Fin(dir) => s.fin(*dir, &ev.marks, &mut self.buf, &mut out),
                What::Reset => s.reset(&ev.marks, &mut self.buf, &mut out),
                What::Keys(_) => {}
            }
        }
        if matches!(ev.what, What::Open) {
            self.counters.connections.fetch_add(1, Relaxed);
        }
        self.counters.mirror_frames.fetch_add(mirrored, Relaxed);
        self.counters.mirror_dropped.fetch_add(dropped, Relaxed);
        if sinks.pcap {
            let written = if ev.conn.tls {
                self.write_tls()
            } else {
                self.ring
                    .as_mut()
                    .is_some_and(|r| r.write(&self.blocks, Instant::now()))
            };
            if written {
                self.counters.pcap_packets.fetch_add(frames, Relaxed);
            } else {
                self.counters.pcap_frames_lost.fetch_add(frames, Relaxed);
            }
        }
        if ev.conn.tls {
            self.ended(&ev.conn, &ev.what);
        }
    }
}

/// Copies one connection's plaintext to the exporter; an [`Inspector`]
/// that never blocks and never reports.
pub struct Tap {
    exp: Arc<Exporter>,
    conn: Arc<Conn>,
    marks: Marks,
    opened: bool,
    closed: bool,
}

impl Tap {
    fn event(&self, what: What) {
        self.exp.send(Event {
            conn: self.conn.clone(),
            at: SystemTime::now(),
            marks: self.marks,
            what,
        });
    }

    fn ensure_open(&mut self) {
        if !self.opened {
            self.opened = true;
            self.event(What::Open);
        }
    }

    /// Key log lines of a TLS leg, to go before its records that need
    /// them.
    pub fn keys(&mut self, lines: Vec<u8>) {
        if !lines.is_empty() {
            self.ensure_open();
            self.event(What::Keys(lines));
        }
    }
}

impl Inspector for Tap {
    fn on_data(&mut self, dir: Direction, data: &[u8], _now: Instant, _report: &mut Report) {
        if data.is_empty() {
            return;
        }
        self.ensure_open();
        self.event(What::Data(dir, data.to_vec()));
        self.marks.sent[dir as usize] += data.len() as u64;
    }

    fn on_end(&mut self, dir: Direction, _now: Instant, _report: &mut Report) {
        let d = dir as usize;
        if self.marks.fin[d] {
            return;
        }
        self.ensure_open();
        self.event(What::Fin(dir));
        self.marks.fin[d] = true;
        self.closed = self.marks.fin.iter().all(|f| *f);
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        // Ended without both FINs: blocked, failed or the engine stopped.
        if self.opened && !self.closed {
            self.event(What::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::wire::segment::parse_segment;

    /// Reads back the Enhanced Packet Blocks' frames of a pcapng file.
    fn frames_of(bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut at = 0;
        while at + 12 <= bytes.len() {
            let kind = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
            let len = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
            if kind == 6 {
                let caplen =
                    u32::from_le_bytes(bytes[at + 20..at + 24].try_into().unwrap()) as usize;
                out.push(bytes[at + 28..at + 28 + caplen].to_vec());
            }
            at += len;
        }
        out
    }

    fn exporter(name: &str, queue_bytes: u64) -> (Arc<Exporter>, std::path::PathBuf) {
        let d = std::env::temp_dir().join(format!("loupe-export-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
        let cfg = ExportConfig {
            pcap: Some(RingConfig {
                dir: d.clone(),
                file_bytes: 64 << 20,
                file_age: Duration::from_secs(3600),
                total_bytes: 128 << 20,
            }),
            mirror: None,
            queue_bytes,
        };
        (Exporter::start(&cfg).unwrap(), d)
    }

    fn one_file(d: &std::path::Path) -> Vec<u8> {
        let files: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(files.len(), 1, "{files:?}");
        std::fs::read(&files[0]).unwrap()
    }

    #[test]
    fn a_tapped_connection_is_written_as_a_tcp_session_with_its_bytes_exact() {
        let (exp, d) = exporter("exact", 64 << 20);
        let sinks = exp.sinks(&[ExportSink::Pcap, ExportSink::Mirror]);
        assert_eq!(
            sinks,
            Sinks {
                pcap: true,
                mirror: false,
                pcap_tls: false,
            }
        );
        let mut tap = exp.tap(
            sinks,
            "198.18.0.1:40001".parse().unwrap(),
            "198.18.0.2:443".parse().unwrap(),
        );
        let now = Instant::now();
        let mut r = Report::default();
        let body: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        tap.on_data(
            Direction::ClientToServer,
            b"GET / HTTP/1.1\r\n\r\n",
            now,
            &mut r,
        );
        tap.on_data(Direction::ServerToClient, &body[..70_000], now, &mut r);
        tap.on_data(Direction::ServerToClient, &body[70_000..], now, &mut r);
        tap.on_end(Direction::ServerToClient, now, &mut r);
        tap.on_end(Direction::ClientToServer, now, &mut r);
        drop(tap);
        exp.stop();
        let frames = frames_of(&one_file(&d));
        let segs: Vec<_> = frames
            .iter()
            .map(|f| parse_segment(f).unwrap().segment)
            .collect();
        assert!(segs[0].flags.syn);
        assert!(!segs.iter().any(|s| s.flags.rst), "a clean end has no RST");
        assert_eq!(segs.iter().filter(|s| s.flags.fin).count(), 2);
        let got: Vec<u8> = frames
            .iter()
            .filter_map(|f| {
                let p = parse_segment(f).unwrap();
                (p.key.src_port == 443).then_some(p.segment.payload)
            })
            .flatten()
            .collect();
        assert_eq!(got, body);
        assert_eq!(exp.report().connections, 1);
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// The TLS leg's copy goes to its own files, its keys as Decryption
    /// Secrets Blocks before its records; a new file starts with the keys
    /// of the legs still going, not of those that ended.
    #[test]
    fn a_tls_legs_keys_come_before_its_records_and_start_each_new_file() {
        let d = std::env::temp_dir().join(format!("loupe-export-{}-tls", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
        let exp = Exporter::start(&ExportConfig {
            pcap: Some(RingConfig {
                dir: d.clone(),
                file_bytes: 8192,
                file_age: Duration::from_secs(3600),
                total_bytes: 1 << 20,
            }),
            mirror: None,
            queue_bytes: 64 << 20,
        })
        .unwrap();
        let wanted = [ExportSink::PcapTls];
        let sinks = exp.sinks(&wanted);
        assert!(sinks.pcap_tls && !sinks.plaintext());
        let ends = |port: u16| {
            (
                format!("198.18.0.1:{port}").parse().unwrap(),
                "198.18.0.2:443".parse().unwrap(),
            )
        };
        let (c, s) = ends(40001);
        assert!(exp.tls_tap(exp.sinks(&[ExportSink::Pcap]), c, s).is_none());
        let mut ended = exp.tls_tap(sinks, c, s).unwrap();
        let (c, s) = ends(40002);
        let mut going = exp.tls_tap(sinks, c, s).unwrap();
        let now = Instant::now();
        let mut r = Report::default();
        ended.on_data(Direction::ClientToServer, b"hello-1", now, &mut r);
        ended.keys(b"CLIENT_RANDOM 01 aa\n".to_vec());
        ended.on_data(Direction::ServerToClient, b"records-1", now, &mut r);
        going.on_data(Direction::ClientToServer, b"hello-2", now, &mut r);
        going.keys(b"CLIENT_RANDOM 02 bb\n".to_vec());
        ended.on_end(Direction::ClientToServer, now, &mut r);
        ended.on_end(Direction::ServerToClient, now, &mut r);
        drop(ended);
        // Enough to fill the first 8 KiB file: a second one starts.
        for _ in 0..4 {
            going.on_data(Direction::ServerToClient, &[b'r'; 3000], now, &mut r);
        }
        drop(going);
        exp.stop();
        let mut files: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        files.sort();
        assert!(files.len() >= 2, "{files:?}");
        assert!(
            files.iter().all(|f| f.starts_with("loupe-tls-")),
            "{files:?}"
        );
        // Block kinds in order, with the secrets' text.
        let blocks = |name: &str| {
            let b = std::fs::read(d.join(name)).unwrap();
            let mut out = Vec::new();
            let mut at = 0;
            while at + 12 <= b.len() {
                let kind = u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
                let len = u32::from_le_bytes(b[at + 4..at + 8].try_into().unwrap()) as usize;
                let text = match kind {
                    0xA => {
                        let n = u32::from_le_bytes(b[at + 12..at + 16].try_into().unwrap());
                        String::from_utf8(b[at + 16..at + 16 + n as usize].to_vec()).unwrap()
                    }
                    6 => {
                        let f = &b[at + 28..at + len - 4];
                        let p = parse_segment(f).unwrap();
                        String::from_utf8_lossy(&p.segment.payload).into_owned()
                    }
                    _ => String::new(),
                };
                out.push((kind, text));
                at += len;
            }
            out
        };
        let first = blocks(&files[0]);
        let at = |want: &str| first.iter().position(|(_, t)| t.starts_with(want)).unwrap();
        assert_eq!(first[at("CLIENT_RANDOM 01")].0, 0xA, "{first:?}");
        assert!(at("hello-1") < at("CLIENT_RANDOM 01"));
        assert!(at("CLIENT_RANDOM 01") < at("records-1"));
        assert!(at("CLIENT_RANDOM 02") < at("rrr"));
        let last = blocks(files.last().unwrap());
        let secrets: Vec<&str> = last
            .iter()
            .filter(|(k, _)| *k == 0xA)
            .map(|(_, t)| t.as_str())
            .collect();
        assert_eq!(secrets, ["CLIENT_RANDOM 02 bb\n"], "only the leg going on");
        assert_eq!(last[2].0, 0xA, "right after the header blocks");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_connection_that_ends_without_fins_is_reset_and_a_full_queue_drops_and_counts() {
        let (exp, d) = exporter("drop", 1 << 20);
        let sinks = exp.sinks(&[ExportSink::Pcap]);
        let mut tap = exp.tap(
            sinks,
            "[2001:2::1]:40002".parse().unwrap(),
            "[2001:2::2]:443".parse().unwrap(),
        );
        let now = Instant::now();
        let mut r = Report::default();
        // A chunk larger than the 1 MiB queue is dropped and counted; the
        // stream positions still advance past it.
        tap.on_data(Direction::ServerToClient, &vec![b'x'; 2 << 20], now, &mut r);
        tap.on_data(Direction::ServerToClient, &[b'y'; 5000], now, &mut r);
        drop(tap);
        exp.stop();
        let rep = exp.report();
        assert_eq!(rep.events_dropped, 1, "{rep:?}");
        assert_eq!(rep.bytes_dropped, 2 << 20);
        assert_eq!(rep.queued_bytes, 0);
        let frames = frames_of(&one_file(&d));
        let last = parse_segment(frames.last().unwrap()).unwrap().segment;
        assert!(last.flags.rst);
        let written: u64 = frames
            .iter()
            .map(|f| parse_segment(f).unwrap().segment.payload.len() as u64)
            .sum();
        assert_eq!(written, 5000);
        // The bytes after the gap sit where the stream put them.
        let first_y = frames
            .iter()
            .map(|f| parse_segment(f).unwrap().segment)
            .find(|s| s.payload.first() == Some(&b'y'))
            .unwrap();
        let syn_ack = parse_segment(&frames[1]).unwrap().segment;
        assert_eq!(first_y.seq.0.wrapping_sub(syn_ack.seq.0), 1 + (2 << 20));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
