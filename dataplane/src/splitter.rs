//! The tcp-split action on one worker: a handshake tracker for each new
//! steered connection; after the handshake, the client's first bytes held
//! (neither forwarded nor acknowledged) until they make a decision point (a
//! complete ClientHello, other bytes, or the server speaking first), within
//! a bound on bytes and time; then the policy's verdict: release the held
//! frames unchanged and hand the flow to XDP, or split it (two TCP halves
//! and the relay between them). It owns their timers and the frames they
//! send. The worker hands every frame of a steered flow it owns here first;
//! what is not consumed it forwards unchanged.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use loupe_common::FlowKey;

use crate::{
    flow::{log::unix_ms, table::endpoint, FlowDecision, FlowId, FlowLogEntry, MapOp, Side},
    policy::{Action, Decision, Opening, Policy, Subject, Verdict},
    stats::SplitCounters,
    tcp::{
        conn::{Abort, ConnConfig},
        reassembly::Reassembler,
        split::{Dir, Passthrough, Split, Track, Tracker},
    },
    tls::hello::{Hello, HelloScanner},
    wire::{
        frame::SlicedTcp,
        segment::{parse_segment, segment_of, Parsed, Segment, SegmentError, Template},
        seq::SeqNum,
    },
};

/// How the splitter holds and decides.
#[derive(Clone, Debug)]
pub struct SplitSettings {
    /// Trackers and split connections per worker, at most.
    pub max_flows: usize,
    /// Trackers and pass-through entries idle this long are forgotten.
    pub idle: Duration,
    /// Client bytes held for a decision, at most; beyond, the connection is
    /// released unchanged.
    pub hold_bytes: usize,
    /// The longest a hold may last (from its first byte); then the
    /// connection is released unchanged. A complete ClientHello is decided
    /// on at once; the wait only runs while bytes are missing, and must
    /// outlast a client's retransmission of a lost first segment (Linux:
    /// an RTO of at least 200 ms, seen above 1 s after a connect storm).
    pub hold_timeout: Duration,
    /// The rules deciding each connection (swapped by [`Splitter::set_policy`]).
    pub policy: Arc<Policy>,
}

impl Default for SplitSettings {
    fn default() -> Self {
        SplitSettings {
            max_flows: 262_144,
            idle: Duration::from_secs(120),
            hold_bytes: 32 << 10,
            hold_timeout: Duration::from_secs(3),
            policy: Arc::new(Policy::split_all(&[443], Vec::new())),
        }
    }
}

/// Held frames of one connection beyond this count are a bound too (tiny
/// segments would otherwise cost a frame buffer each).
const MAX_HELD_FRAMES: usize = 64;

/// A connection's client bytes held until the decision.
struct Held {
    /// The frames as they arrived (released unchanged on a pass).
    frames: Vec<Vec<u8>>,
    /// Their bytes in order, fed to the scanner.
    stream: Reassembler,
    scanner: HelloScanner,
    deadline: Instant,
    fin: bool,
    /// Where the client's FIN is (it closes the hold only once every byte
    /// before it arrived).
    fin_at: Option<SeqNum>,
    /// Bytes read in order so far.
    read: u32,
    /// Client bytes held (the highest offset seen).
    bytes: u64,
    /// The oldest TSval among the held segments (the client-facing half
    /// starts TS.Recent there, so PAWS takes their replay).
    oldest_tsval: Option<u32>,
}

/// A connection before its decision.
struct Tracking {
    tracker: Tracker,
    /// The side the SYN came from.
    client: Side,
    templates: [Option<Template>; 2],
    hold: Option<Box<Held>>,
    key: FlowKey,
    /// When the SYN was seen.
    opened: Instant,
}

impl Tracking {
    /// The connection as the rules see it.
    fn subject<'a>(&self, sni: Option<&'a str>) -> Subject<'a> {
        Subject {
            client: self.key.src,
            server: self.key.dst,
            server_port: self.key.dst_port,
            sni,
        }
    }

    /// What the log and listings keep of a decision.
    fn meta(&self, policy: &Policy, d: &Decision, sni: Option<&str>) -> Box<Meta> {
        Box::new(Meta {
            action: Some(d.action),
            rule: policy.rule_name(d).to_string(),
            sni: sni.map(Into::into),
            alpn: Vec::new(),
            key: self.key,
            opened: self.opened,
            policy_version: policy.version,
            held_bytes: self.hold.as_ref().map_or(0, |h| h.bytes),
            note: None,
            logged: false,
        })
    }
}

/// A decided connection: what the log and a flow listing say of it.
struct Meta {
    action: Option<Action>,
    rule: String,
    sni: Option<String>,
    alpn: Vec<String>,
    key: FlowKey,
    opened: Instant,
    policy_version: u64,
    held_bytes: u64,
    note: Option<&'static str>,
    /// Its record was sent already (a refused connection's, at the
    /// decision).
    logged: bool,
}

/// Why a connection is decided without a decision point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NoDecision {
    /// No complete ClientHello (or other first bytes) within the hold time.
    Timeout,
    /// More held than the bound (bytes or frames).
    Overflow,
    /// Forgotten to make room while held.
    Evicted,
    /// The client closed before its ClientHello was complete.
    ClosedEarly,
    /// Cannot be split (URG before the decision, TCP Fast Open).
    Unsplittable,
}

impl NoDecision {
    fn label(self) -> &'static str {
        match self {
            NoDecision::Timeout => "hold-timeout",
            NoDecision::Overflow => "hold-overflow",
            NoDecision::Evicted => "evicted",
            NoDecision::ClosedEarly => "closed-early",
            NoDecision::Unsplittable => "passthrough",
        }
    }

    fn note(self) -> &'static str {
        match self {
            NoDecision::Timeout => {
                "no complete ClientHello within the hold time: decided without the server name"
            }
            NoDecision::Overflow => {
                "more held than the hold bound: decided without the server name"
            }
            NoDecision::Evicted => "evicted while held: decided without the server name",
            NoDecision::ClosedEarly => {
                "the client closed before its ClientHello was complete: decided without the \
                 server name"
            }
            NoDecision::Unsplittable => {
                "not splittable (URG or TCP Fast Open): decided without the server name"
            }
        }
    }
}

/// Said of `decrypt` connections until the TLS stage lands.
const DECRYPT_NOTE: &str = "decryption is not available in this release: relayed as tcp-split";

/// A fatal `access_denied` alert (RFC 8446 §6.2) in a TLS 1.2-versioned
/// record: what a blocked TLS client reads before the connection closes.
const ACCESS_DENIED: [u8; 7] = [21, 3, 3, 0, 2, 2, 49];

/// Eviction classes: half-open handshakes go first.
const EMBRYONIC: usize = 0;
const SETTLED: usize = 1;

/// Whether the queued pair `(since, id)` still names an entry that may be
/// evicted (the same entry, not a live split).
fn evictable(flows: &HashMap<FlowId, Flow>, id: FlowId, since: u64) -> bool {
    flows
        .get(&id)
        .is_some_and(|f| f.since == since && !matches!(f.entry, Entry::Split { .. }))
}

/// The tracking state of `id`, borrowing only the flow table.
fn tracking(flows: &mut HashMap<FlowId, Flow>, id: FlowId) -> Option<&mut Tracking> {
    match flows.get_mut(&id) {
        Some(Flow {
            entry: Entry::Tracking(t),
            ..
        }) => Some(t),
        _ => None,
    }
}

/// Which endpoint sent a frame that arrived on `side`.
fn dir_from(side: Side, client: Side) -> Dir {
    if side == client {
        Dir::Client
    } else {
        Dir::Server
    }
}

/// What became of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// Not ours (or passed through): forward it unchanged.
    Forward,
    /// Taken by a split connection (or dropped as bad): do not forward.
    Consumed,
}

enum Entry {
    Tracking(Box<Tracking>),
    Split {
        split: Box<Split>,
        client: Side,
        /// Frames sent by the endpoint on each side, as templates.
        templates: [Template; 2],
        armed: Option<Instant>,
        meta: Box<Meta>,
    },
    /// Left to the kernel; with what was decided, when it was.
    Passthrough(Option<Box<Meta>>),
    /// A split connection that ended: late segments of it (retransmitted
    /// ACKs, a RST racing ours) are dropped, not forwarded, until idle.
    Ended,
}

struct Flow {
    entry: Entry,
    last_seen: Instant,
    /// When it entered the eviction order (see `Splitter::evictable`).
    since: u64,
}

/// Split connections of one worker.
pub struct Splitter {
    flows: HashMap<FlowId, Flow>,
    /// Entries that may make room when the table is full, oldest first:
    /// [`EMBRYONIC`] (handshakes not complete: a SYN flood) before
    /// [`SETTLED`] (trackers holding for a decision, passed-through flows,
    /// ended connections' tombstones); never live splits. Stale pairs (the
    /// entry moved on, or went) are skipped when met and pruned on expiry.
    evictable: [VecDeque<(u64, FlowId)>; 2],
    /// The next `since`.
    epoch: u64,
    timers: BinaryHeap<Reverse<(Instant, FlowId)>>,
    conn: ConnConfig,
    settings: SplitSettings,
    /// Frames to send: (out of which interface, bytes).
    pub out: Vec<(Side, Vec<u8>)>,
    /// Changes to the XDP flow map for the worker to pass on: flows
    /// released to the fast path, live splits pinned to userspace.
    pub ops: Vec<MapOp>,
    /// Records of decided connections, for the flow log.
    pub events: Vec<FlowLogEntry>,
    spare: Vec<Vec<u8>>,
    pub counters: SplitCounters,
}

impl Splitter {
    pub fn new(settings: SplitSettings) -> Splitter {
        Splitter {
            flows: HashMap::new(),
            evictable: [VecDeque::new(), VecDeque::new()],
            epoch: 0,
            timers: BinaryHeap::new(),
            conn: ConnConfig {
                send_buffer: 128 << 10,
                recv_buffer: 128 << 10,
                ..ConnConfig::default()
            },
            settings,
            out: Vec::new(),
            ops: Vec::new(),
            events: Vec::new(),
            spare: Vec::new(),
            counters: SplitCounters::default(),
        }
    }

    /// New connections are decided by `policy` from now on; connections
    /// already decided keep their decision.
    pub fn set_policy(&mut self, policy: Arc<Policy>) {
        self.settings.policy = policy;
    }

    /// Connections tracked, split or recently ended.
    pub fn active(&self) -> usize {
        self.flows.len()
    }

    /// A steered frame of a flow this worker owns.
    pub fn on_frame(&mut self, side: Side, frame: &[u8], now: Instant) -> Disposition {
        self.on_parsed(side, frame, parse_segment(frame), now)
    }

    /// [`Splitter::on_frame`] for a frame the worker has sliced already.
    pub fn on_sliced(
        &mut self,
        side: Side,
        frame: &[u8],
        sliced: &SlicedTcp,
        now: Instant,
    ) -> Disposition {
        self.on_parsed(side, frame, segment_of(frame, sliced), now)
    }

    fn on_parsed(
        &mut self,
        side: Side,
        frame: &[u8],
        parsed: Result<Parsed, SegmentError>,
        now: Instant,
    ) -> Disposition {
        let parsed = match parsed {
            Ok(p) => p,
            Err(e) => return self.bad_frame(e),
        };
        let id = FlowId::of(&parsed.key);
        let is_syn = parsed.segment.flags.syn && !parsed.segment.flags.ack;
        // A new connection on the ports of one that passed through or
        // ended: track it afresh.
        if is_syn
            && self
                .flows
                .get(&id)
                .is_some_and(|f| matches!(f.entry, Entry::Passthrough(_) | Entry::Ended))
        {
            self.flows.remove(&id);
        }
        if !self.flows.contains_key(&id) {
            if self.flows.len() >= self.settings.max_flows && !self.evict_oldest() {
                // Every entry is a live split: leave this one untracked.
                self.counters.table_full += 1;
                return Disposition::Forward;
            }
            let entry = if is_syn {
                Entry::Tracking(Box::new(Tracking {
                    tracker: Tracker::new(self.conn.clone()),
                    client: side,
                    templates: [None, None],
                    hold: None,
                    key: parsed.key,
                    opened: now,
                }))
            } else {
                self.mid_flow(parsed.key)
            };
            let class = if is_syn { EMBRYONIC } else { SETTLED };
            let since = self.next_since(id, class);
            self.flows.insert(
                id,
                Flow {
                    entry,
                    last_seen: now,
                    since,
                },
            );
        }
        let flow = self.flows.get_mut(&id).expect("inserted above");
        flow.last_seen = now;
        let split_client = match &flow.entry {
            Entry::Passthrough(_) => return Disposition::Forward,
            Entry::Ended => {
                self.counters.after_close += 1;
                return Disposition::Consumed;
            }
            Entry::Tracking(_) => None,
            Entry::Split { client, .. } => Some(*client),
        };
        match split_client {
            None => self.track(id, side, frame, parsed, now),
            Some(client) => {
                let dir = dir_from(side, client);
                self.with_split(id, now, |s| s.on_segment(dir, &parsed.segment, now));
                Disposition::Consumed
            }
        }
    }

    /// A flow seen mid-stream: running when the engine started, or one
    /// whose state was forgotten (idle, evicted). No decision point will
    /// come, so it is decided without the server name: a block that might
    /// apply drops it (a client cannot get past a name-based block by
    /// staying quiet until it is forgotten); otherwise it is left to the
    /// kernel. The server is taken to be the endpoint with the lower port.
    fn mid_flow(&mut self, key: FlowKey) -> Entry {
        let key = if key.dst_port <= key.src_port {
            key
        } else {
            key.reversed()
        };
        let policy = self.settings.policy.clone();
        let d = policy.decide_unnamed(&Subject {
            client: key.src,
            server: key.dst,
            server_port: key.dst_port,
            sni: None,
        });
        if d.action != Action::Block {
            self.counters.passthrough += 1;
            self.ops.push(MapOp::Bypass(key));
            return Entry::Passthrough(None);
        }
        self.counters.refused += 1;
        let meta = Meta {
            action: Some(Action::Block),
            rule: policy.rule_name(&d).to_string(),
            sni: None,
            alpn: Vec::new(),
            key,
            opened: Instant::now(),
            policy_version: policy.version,
            held_bytes: 0,
            note: Some(
                "seen mid-flow (running before the engine, or forgotten while idle): decided \
                 without the server name; its segments are dropped",
            ),
            logged: true,
        };
        self.log(&meta, (0, 0), "blocked");
        Entry::Ended
    }

    fn bad_frame(&mut self, e: SegmentError) -> Disposition {
        match e {
            SegmentError::Checksum => {
                self.counters.bad_checksum += 1;
                Disposition::Consumed
            }
            SegmentError::Options(_) => {
                self.counters.bad_options += 1;
                Disposition::Consumed
            }
            // Not a TCP segment we can parse: the worker's own parser
            // decides (it forwards unparsed frames).
            SegmentError::Frame(_) => Disposition::Forward,
        }
    }

    fn track(
        &mut self,
        id: FlowId,
        side: Side,
        frame: &[u8],
        p: Parsed,
        now: Instant,
    ) -> Disposition {
        let Some(t) = tracking(&mut self.flows, id) else {
            return Disposition::Forward;
        };
        t.templates[side.index()].get_or_insert_with(|| p.template(frame));
        let was_open = t.tracker.client_data_start().is_some();
        let track = t.tracker.on_segment(dir_from(side, t.client), &p.segment);
        let open = t.tracker.client_data_start().is_some();
        if t.hold.is_some() && !open {
            // A new SYN on these ports: the held attempt was abandoned.
            t.hold = None;
        }
        if open != was_open {
            // Handshake complete (or restarted): it moves between the
            // eviction classes.
            let since = self.next_since(id, if open { SETTLED } else { EMBRYONIC });
            if let Some(f) = self.flows.get_mut(&id) {
                f.since = since;
            }
        }
        match track {
            Track::Forward => Disposition::Forward,
            Track::Pass(why) => {
                self.counters.passthrough += 1;
                if why == Passthrough::FastOpen {
                    self.counters.fast_open += 1;
                }
                if why == Passthrough::Reset {
                    return self.reset_in_hold(id, side, &p.segment);
                }
                self.undecided(id, NoDecision::Unsplittable, now)
            }
            Track::Hold => self.hold(id, frame, &p.segment, now),
            Track::Decide => {
                self.counters.server_first += 1;
                self.decide(id, &Opening::ServerFirst, Some(p.segment), now)
            }
        }
    }

    /// Holds a client frame until the decision; decides once the held
    /// bytes make a decision point, or releases them at the bound.
    fn hold(&mut self, id: FlowId, frame: &[u8], seg: &Segment, now: Instant) -> Disposition {
        let Some(t) = tracking(&mut self.flows, id) else {
            return Disposition::Forward;
        };
        let Some(start) = t.tracker.client_data_start() else {
            return Disposition::Forward;
        };
        let held = t.hold.get_or_insert_with(|| {
            self.counters.held += 1;
            let deadline = now + self.settings.hold_timeout;
            self.timers.push(Reverse((deadline, id)));
            Box::new(Held {
                frames: Vec::new(),
                stream: Reassembler::new(start, self.settings.hold_bytes, 0),
                scanner: HelloScanner::default(),
                deadline,
                fin: false,
                fin_at: None,
                read: 0,
                bytes: 0,
                oldest_tsval: None,
            })
        });
        let end = i64::from(seg.seq.since(start)) + seg.payload.len() as i64;
        let ins = held.stream.insert(seg.seq, &seg.payload);
        let fin_news = seg.flags.fin && !held.fin;
        if ins.new > 0 || fin_news || ins.conflict > 0 {
            held.frames.push(frame.to_vec());
            if let Some(ts) = seg.options.timestamps {
                if held
                    .oldest_tsval
                    .is_none_or(|o| SeqNum(ts.val).lt(SeqNum(o)))
                {
                    held.oldest_tsval = Some(ts.val);
                }
            }
        }
        held.fin |= seg.flags.fin;
        if seg.flags.fin {
            held.fin_at = Some(seg.seq + seg.payload.len() as u32);
        }
        held.bytes = held.bytes.max(end.max(0) as u64);
        if end > self.settings.hold_bytes as i64 || held.frames.len() > MAX_HELD_FRAMES {
            self.counters.hold_overflows += 1;
            // This frame is among the held ones, whatever happens to them.
            self.undecided(id, NoDecision::Overflow, now);
            return Disposition::Consumed;
        }
        let ready = held.stream.read(usize::MAX);
        held.read += ready.len() as u32;
        let closed = held.fin_at == Some(start + held.read);
        let opening = match held.scanner.feed(&ready) {
            Some(Hello::Tls(ch)) => {
                self.counters.hellos += 1;
                Opening::Tls(ch)
            }
            Some(Hello::NotTls) => {
                self.counters.not_tls += 1;
                Opening::Other
            }
            // The client closed before completing its ClientHello: the
            // name will not come.
            None if closed => {
                self.undecided(id, NoDecision::ClosedEarly, now);
                return Disposition::Consumed;
            }
            None => return Disposition::Consumed,
        };
        self.decide(id, &opening, None, now);
        Disposition::Consumed
    }

    /// The policy's verdict on a connection at its decision point.
    /// `pending` is the segment that forced the decision, not held.
    fn decide(
        &mut self,
        id: FlowId,
        opening: &Opening,
        pending: Option<Segment>,
        now: Instant,
    ) -> Disposition {
        let Some(t) = tracking(&mut self.flows, id) else {
            return Disposition::Forward;
        };
        let policy = self.settings.policy.clone();
        let decision = policy.decide(&t.subject(opening.sni()));
        let mut meta = t.meta(&policy, &decision, opening.sni());
        if let Opening::Tls(ch) = opening {
            meta.alpn = ch
                .alpn
                .iter()
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .collect();
        }
        meta.note = (decision.action == Action::Decrypt).then_some(DECRYPT_NOTE);
        match decision.action.verdict() {
            Verdict::Pass => {
                self.counters.policy_pass += 1;
                self.release(id, meta, "bypass");
                Disposition::Forward
            }
            Verdict::Split => self.start_split(id, pending, now, meta, None),
            Verdict::Refuse => {
                self.counters.refused += 1;
                self.log(&meta, (meta.held_bytes, 0), "blocked");
                meta.logged = true;
                // A TLS client reads why; anything else is reset.
                let alert = matches!(opening, Opening::Tls(_)).then_some(&ACCESS_DENIED[..]);
                self.start_split(id, pending, now, meta, Some(alert))
            }
        }
    }

    /// A RST while the client's bytes are held. One its receiver would
    /// take (RFC 5961 §3.2: exactly at the next sequence number it expects;
    /// from the client, anywhere up to the end of its held bytes, which the
    /// server never saw) ends the connection: it goes through, the held
    /// bytes do not. Any other is dropped, and the hold goes on: a forged
    /// RST must not get a connection past the decision.
    fn reset_in_hold(&mut self, id: FlowId, side: Side, seg: &Segment) -> Disposition {
        let Some(t) = tracking(&mut self.flows, id) else {
            return Disposition::Forward;
        };
        let held = t.hold.as_ref().map_or(0, |h| h.bytes);
        let plausible = match dir_from(side, t.client) {
            Dir::Client => t
                .tracker
                .client_data_start()
                .is_some_and(|s| (0..=held as i64).contains(&i64::from(seg.seq.since(s)))),
            Dir::Server => t.tracker.server_data_start() == Some(seg.seq),
        };
        if !plausible {
            self.counters.bogus_resets += 1;
            return Disposition::Consumed;
        }
        self.counters.passthrough += 1;
        if let Some(h) = t.hold.take() {
            for f in h.frames {
                keep_spare(&mut self.spare, f);
            }
        }
        if let Some(f) = self.flows.get_mut(&id) {
            f.entry = Entry::Ended;
        }
        Disposition::Forward
    }

    /// Decides a connection that reached no decision point, without its
    /// server name ([`Policy::decide_unnamed`]: a block that might apply
    /// does). Refusals and splits go ahead wherever the halves can be
    /// built; a split cannot be kept for an evicted or unsplittable
    /// connection, which is then passed.
    fn undecided(&mut self, id: FlowId, why: NoDecision, now: Instant) -> Disposition {
        let Some(t) = tracking(&mut self.flows, id) else {
            return Disposition::Forward;
        };
        let policy = self.settings.policy.clone();
        let d = policy.decide_unnamed(&t.subject(None));
        let mut meta = t.meta(&policy, &d, None);
        meta.note = Some(why.note());
        match d.action.verdict() {
            Verdict::Refuse => {
                self.counters.refused += 1;
                self.log(&meta, (meta.held_bytes, 0), "blocked");
                meta.logged = true;
                self.start_split(id, None, now, meta, Some(None))
            }
            Verdict::Split
                if matches!(
                    why,
                    NoDecision::Timeout | NoDecision::Overflow | NoDecision::ClosedEarly
                ) =>
            {
                self.start_split(id, None, now, meta, None)
            }
            Verdict::Split => {
                meta.action = None;
                meta.rule = format!("({})", why.label());
                self.release(id, meta, "bypass");
                Disposition::Forward
            }
            Verdict::Pass => {
                self.release(id, meta, "bypass");
                Disposition::Forward
            }
        }
    }

    /// Sends a connection's record to the flow log.
    fn log(&mut self, meta: &Meta, relayed: (u64, u64), end: &str) {
        self.events.push(log_entry(meta, relayed, end));
    }

    /// Leaves a connection to the kernel for good (held frames go out
    /// unchanged, the flow goes to the XDP fast path) without a decision
    /// by the rules: `why` (logged once the handshake was seen), or none.
    fn pass(&mut self, id: FlowId, why: Option<&'static str>) {
        let Some(t) = tracking(&mut self.flows, id) else {
            return;
        };
        let meta = Box::new(Meta {
            action: None,
            rule: why.map_or_else(String::new, |w| format!("({w})")),
            sni: None,
            alpn: Vec::new(),
            key: t.key,
            opened: t.opened,
            policy_version: self.settings.policy.version,
            held_bytes: t.hold.as_ref().map_or(0, |h| h.bytes),
            note: None,
            logged: why.is_none(),
        });
        self.release(id, meta, why.unwrap_or("bypass"));
    }

    /// Releases a tracked connection: held frames out unchanged, the flow
    /// to the fast path, its record to the log.
    fn release(&mut self, id: FlowId, meta: Box<Meta>, end: &str) {
        if !meta.logged {
            self.log(&meta, (meta.held_bytes, 0), end);
        }
        let Some(flow) = self.flows.get_mut(&id) else {
            return;
        };
        if let Entry::Tracking(t) = &mut flow.entry {
            if let Some(held) = t.hold.take() {
                let to = t.client.other();
                self.out.extend(held.frames.into_iter().map(|f| (to, f)));
            }
            self.ops.push(MapOp::Bypass(t.key));
        }
        flow.entry = Entry::Passthrough(Some(meta));
    }

    /// Takes over a connection: the held client bytes go into the
    /// client-facing half (acknowledged at once), then `pending` (the
    /// server's first data) into the server-facing one. `refuse`: the
    /// connection is refused instead (with this farewell to the client,
    /// or a RST), the server reset.
    fn start_split(
        &mut self,
        id: FlowId,
        pending: Option<Segment>,
        now: Instant,
        meta: Box<Meta>,
        refuse: Option<Option<&'static [u8]>>,
    ) -> Disposition {
        let Some(t) = tracking(&mut self.flows, id) else {
            return Disposition::Forward;
        };
        let oldest = t.hold.as_ref().and_then(|h| h.oldest_tsval);
        let (Some(halves), [Some(a), Some(b)]) =
            (t.tracker.split(now, oldest), t.templates.clone())
        else {
            // Only before the handshake completed (TCP Fast Open, an odd
            // handshake). A refusal drops the connection here (its held
            // bytes, and what follows until it idles out); anything else
            // leaves it alone rather than guess.
            if refuse.is_some() {
                if let Some(f) = self.flows.get_mut(&id) {
                    f.entry = Entry::Ended;
                }
                return Disposition::Consumed;
            }
            self.counters.passthrough += 1;
            self.pass(id, Some("passthrough"));
            return Disposition::Forward;
        };
        let client = t.client;
        let key = t.key;
        let frames = t.hold.take().map(|h| h.frames).unwrap_or_default();
        if refuse.is_none() {
            self.counters.split += 1;
        }
        // However the policy changes the steering, this flow stays here.
        self.ops.push(MapOp::Steer(key));
        self.flows.get_mut(&id).expect("present").entry = Entry::Split {
            split: Box::new(Split::new(halves)),
            client,
            templates: [a, b],
            armed: None,
            meta,
        };
        let mut held = Vec::with_capacity(frames.len());
        for f in frames {
            // Parsed once already when held; only valid frames were kept.
            if let Ok(p) = parse_segment(&f) {
                held.push(p.segment);
            }
            keep_spare(&mut self.spare, f);
        }
        if !held.is_empty() || refuse.is_some() {
            self.with_split(id, now, |s| {
                for seg in &held {
                    s.on_segment(Dir::Client, seg, now);
                }
                s.client.ack_now();
                if let Some(farewell) = refuse {
                    s.refuse(farewell);
                }
            });
        }
        if let Some(seg) = pending {
            self.with_split(id, now, |s| s.on_segment(Dir::Server, &seg, now));
        }
        Disposition::Consumed
    }

    /// Runs `f` on a split connection, then sends what it has to send and
    /// re-arms its timer; leaves a tombstone once both halves are closed.
    fn with_split(&mut self, id: FlowId, now: Instant, f: impl FnOnce(&mut Split)) {
        let Some(flow) = self.flows.get_mut(&id) else {
            return;
        };
        let Entry::Split {
            split,
            client,
            templates,
            armed,
            meta,
        } = &mut flow.entry
        else {
            return;
        };
        f(split);
        while let Some((dir, seg)) = split.poll_transmit(now) {
            // Toward the client: as the server (the endpoint on the other
            // side); toward the server: as the client.
            let to = if dir == Dir::Client {
                *client
            } else {
                client.other()
            };
            let mut buf = self.spare.pop().unwrap_or_default();
            buf.clear();
            templates[to.other().index()].build(&seg, &mut buf);
            self.out.push((to, buf));
        }
        // Logged when the bytes are through, not after TIME-WAIT.
        if !meta.logged && split.finished() {
            meta.logged = true;
            self.events
                .push(log_entry(meta, split.relayed(), end_reason(split)));
        }
        if split.done() {
            absorb(&mut self.counters, split);
            self.ops.push(MapOp::Forget(meta.key));
            flow.entry = Entry::Ended;
            flow.since = self.epoch;
            self.evictable[SETTLED].push_back((self.epoch, id));
            self.epoch += 1;
            return;
        }
        if let Some(next) = split.next_deadline() {
            if armed.is_none_or(|a| next < a) {
                *armed = Some(next);
                self.timers.push(Reverse((next, id)));
            }
        }
    }

    /// Runs the timers that are due.
    pub fn on_timers(&mut self, now: Instant) {
        while let Some(Reverse((at, id))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            match self.flows.get_mut(&id) {
                Some(Flow {
                    entry: Entry::Split { armed, .. },
                    ..
                }) if *armed == Some(at) => {
                    *armed = None;
                    self.with_split(id, now, |s| s.on_timer(now));
                }
                Some(Flow {
                    entry: Entry::Tracking(t),
                    ..
                }) if t.hold.as_ref().is_some_and(|h| h.deadline == at) => {
                    self.counters.hold_timeouts += 1;
                    self.undecided(id, NoDecision::Timeout, now);
                }
                _ => {}
            }
        }
    }

    /// Forgets trackers and pass-through entries idle longer than the idle
    /// timeout (split connections end through their own timers).
    pub fn expire(&mut self, now: Instant) {
        let idle = self.settings.idle;
        let before = self.flows.len();
        // Ended connections are remembered a little longer than a peer's
        // retransmissions last.
        self.flows.retain(|_, f| match f.entry {
            Entry::Split { .. } => true,
            Entry::Ended => now.duration_since(f.last_seen) < idle.min(Duration::from_secs(60)),
            _ => now.duration_since(f.last_seen) < idle,
        });
        self.counters.expired += (before - self.flows.len()) as u64;
        for queue in &mut self.evictable {
            queue.retain(|(since, id)| evictable(&self.flows, *id, *since));
        }
    }

    /// A place in the eviction order for `id`.
    fn next_since(&mut self, id: FlowId, class: usize) -> u64 {
        let since = self.epoch;
        self.epoch += 1;
        self.evictable[class].push_back((since, id));
        since
    }

    /// Makes room by forgetting the oldest entry that is not a live
    /// split; a tracker's held frames go out unchanged first, and its flow
    /// to the fast path (as on a pass). Later segments of a forgotten flow
    /// pass through as those of any flow the engine did not see start.
    /// Returns false when only live splits are left.
    fn evict_oldest(&mut self) -> bool {
        for class in [EMBRYONIC, SETTLED] {
            while let Some((since, id)) = self.evictable[class].pop_front() {
                if !evictable(&self.flows, id, since) {
                    continue;
                }
                let holding = self
                    .flows
                    .get(&id)
                    .is_some_and(|f| matches!(&f.entry, Entry::Tracking(t) if t.hold.is_some()));
                if holding {
                    self.undecided(id, NoDecision::Evicted, Instant::now());
                }
                self.flows.remove(&id);
                self.counters.evicted += 1;
                return true;
            }
        }
        false
    }

    /// The first `n` frames of `out` were copied out: their buffers are
    /// kept for the next frames.
    pub fn sent(&mut self, n: usize) {
        for (_, buf) in self.out.drain(..n) {
            keep_spare(&mut self.spare, buf);
        }
    }

    /// What was decided for a flow, for a listing.
    pub fn describe(&self, key: &FlowKey) -> Option<FlowDecision> {
        let flow = self.flows.get(&FlowId::of(key))?;
        let with = |state: &str, meta: Option<&Meta>, relayed: (u64, u64)| FlowDecision {
            state: state.into(),
            action: meta.and_then(|m| m.action),
            rule: meta.map(|m| m.rule.clone()).filter(|r| !r.is_empty()),
            sni: meta.and_then(|m| m.sni.clone()),
            relayed_c2s: relayed.0,
            relayed_s2c: relayed.1,
        };
        Some(match &flow.entry {
            Entry::Tracking(t) if t.hold.is_some() => with("holding", None, (0, 0)),
            Entry::Tracking(_) => with("handshake", None, (0, 0)),
            Entry::Split { split, meta, .. } => {
                let state = if meta.action == Some(Action::Block) {
                    "refused"
                } else {
                    "split"
                };
                with(state, Some(meta), split.relayed())
            }
            Entry::Passthrough(meta) => with("bypass", meta.as_deref(), (0, 0)),
            Entry::Ended => with("ended", None, (0, 0)),
        })
    }

    /// Split connections right now, and bytes relayed by those still open.
    pub fn live(&self) -> (u64, u64, u64) {
        let mut n = 0;
        let (mut c2s, mut s2c) = (0, 0);
        for f in self.flows.values() {
            if let Entry::Split { split, meta, .. } = &f.entry {
                if meta.action == Some(Action::Block) {
                    continue; // refused, not relaying
                }
                n += 1;
                let (a, b) = split.relayed();
                c2s += a;
                s2c += b;
            }
        }
        (n, c2s, s2c)
    }
}

/// A connection's record for the flow log.
fn log_entry(meta: &Meta, (c2s, s2c): (u64, u64), end: &str) -> FlowLogEntry {
    let end_ms = unix_ms();
    let duration_ms = meta.opened.elapsed().as_millis() as u64;
    FlowLogEntry {
        start_ms: end_ms.saturating_sub(duration_ms),
        end_ms,
        client: endpoint(&meta.key.src, meta.key.src_port),
        server: endpoint(&meta.key.dst, meta.key.dst_port),
        sni: meta.sni.clone(),
        alpn: meta.alpn.clone(),
        action: meta.action,
        rule: meta.rule.clone(),
        policy_version: meta.policy_version,
        bytes_c2s: c2s,
        bytes_s2c: s2c,
        duration_ms,
        end: end.into(),
        note: meta.note.map(Into::into),
    }
}

/// Why a split connection ended, for its record.
fn end_reason(split: &Split) -> &'static str {
    let (c, s) = (split.client.aborted(), split.server.aborted());
    if c == Some(Abort::Reset) {
        "client-reset"
    } else if s == Some(Abort::Reset) {
        "server-reset"
    } else if c == Some(Abort::TimedOut) || s == Some(Abort::TimedOut) {
        "timeout"
    } else {
        "closed"
    }
}

/// Keeps a frame buffer for reuse, up to a bound.
fn keep_spare(spare: &mut Vec<Vec<u8>>, buf: Vec<u8>) {
    if spare.len() < 256 {
        spare.push(buf);
    }
}

/// Adds an ended split connection's totals to the worker's counters.
fn absorb(counters: &mut SplitCounters, split: &Split) {
    let (c2s, s2c) = split.relayed();
    counters.bytes_c2s += c2s;
    counters.bytes_s2c += s2c;
    counters.closed += 1;
    for c in [&split.client, &split.server] {
        let s = c.stats();
        counters.retransmits += s.retransmits + s.rto_expirations;
        counters.timeouts += s.rto_expirations;
        counters.fast_retransmits += s.fast_retransmits;
        counters.lost_retransmits += s.lost_retransmits;
        counters.tail_probes += s.tail_probes;
        counters.challenge_acks += s.challenge_acks;
        counters.overlap_conflicts += s.overlap_conflicts;
        counters.out_of_window += s.out_of_window;
        counters.duplicates += s.duplicates;
        counters.paws_drops += s.paws_drops;
        match c.aborted() {
            Some(Abort::Reset) => counters.resets_received += 1,
            Some(Abort::TimedOut) => counters.timed_out += 1,
            Some(Abort::Local) | None => {}
        }
        if c.aborted().is_some() {
            counters.aborted += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use etherparse::PacketBuilder;

    use super::*;
    use crate::{
        policy::{Match, Rule},
        tls::hello::tests::client_hello,
        wire::{
            options::{TcpOptions, Timestamps},
            segment::Flags,
        },
    };

    const C_ISN: u32 = 1000;
    const S_ISN: u32 = 9000;

    /// Builds frames as the client (inside) and as the server (outside).
    struct Peers {
        client: Template,
        server: Template,
    }

    impl Peers {
        fn new() -> Peers {
            Peers::on_port(40000)
        }

        /// The client on source port `cport`.
        fn on_port(cport: u16) -> Peers {
            let template = |src: [u8; 4], dst: [u8; 4], sp: u16, dp: u16| {
                let b = PacketBuilder::ethernet2([2; 6], [3; 6])
                    .ipv4(src, dst, 64)
                    .tcp(sp, dp, 1, 1);
                let mut f = Vec::new();
                b.write(&mut f, b"").unwrap();
                parse_segment(&f).unwrap().template(&f)
            };
            Peers {
                client: template([198, 18, 0, 1], [198, 18, 0, 2], cport, 443),
                server: template([198, 18, 0, 2], [198, 18, 0, 1], 443, cport),
            }
        }

        fn frame(&self, from: Dir, seg: &Segment) -> Vec<u8> {
            let mut out = Vec::new();
            match from {
                Dir::Client => self.client.build(seg, &mut out),
                Dir::Server => self.server.build(seg, &mut out),
            };
            out
        }
    }

    fn seg(seq: u32, ack: u32, syn: bool, payload: &[u8]) -> Segment {
        Segment {
            seq: SeqNum(seq),
            ack: SeqNum(ack),
            flags: Flags {
                syn,
                ack: ack != 0,
                ..Flags::default()
            },
            window: 1000,
            options: TcpOptions {
                mss: syn.then_some(1460),
                timestamps: Some(Timestamps { val: seq, ecr: 0 }),
                ..TcpOptions::default()
            },
            payload: payload.to_vec(),
        }
    }

    struct Bench {
        sp: Splitter,
        peers: Peers,
        now: Instant,
    }

    impl Bench {
        fn new(settings: SplitSettings) -> Bench {
            let mut b = Bench {
                sp: Splitter::new(settings),
                peers: Peers::new(),
                now: Instant::now(),
            };
            assert_eq!(
                b.send(Dir::Client, &seg(C_ISN, 0, true, b"")),
                Disposition::Forward
            );
            let synack = seg(S_ISN, C_ISN + 1, true, b"");
            assert_eq!(b.send(Dir::Server, &synack), Disposition::Forward);
            let ack = seg(C_ISN + 1, S_ISN + 1, false, b"");
            assert_eq!(b.send(Dir::Client, &ack), Disposition::Forward);
            b
        }

        fn send(&mut self, from: Dir, s: &Segment) -> Disposition {
            let side = match from {
                Dir::Client => Side::Inside,
                Dir::Server => Side::Outside,
            };
            let frame = self.peers.frame(from, s);
            self.sp.on_frame(side, &frame, self.now)
        }

        /// Client data at stream offset `off`.
        fn client_data(&mut self, off: u32, data: &[u8]) -> (Disposition, Vec<u8>) {
            let s = seg(C_ISN + 1 + off, S_ISN + 1, false, data);
            (
                self.send(Dir::Client, &s),
                self.peers.frame(Dir::Client, &s),
            )
        }

        /// Frames sent since the last call: (toward which side, segment).
        fn sent(&mut self) -> Vec<(Side, Vec<u8>)> {
            std::mem::take(&mut self.sp.out)
        }
    }

    fn bypassed(sp: &Splitter) -> usize {
        sp.ops
            .iter()
            .filter(|o| matches!(o, MapOp::Bypass(_)))
            .count()
    }

    /// A policy of no rule but the default.
    fn with_default(action: Action) -> SplitSettings {
        let mut p = Policy::split_all(&[443], Vec::new());
        p.default_action = action;
        SplitSettings {
            policy: Arc::new(p),
            ..SplitSettings::default()
        }
    }

    /// A policy of one rule on server names; the rest is split.
    fn one_rule(action: Action, sni: &str) -> SplitSettings {
        let mut p = Policy::split_all(&[443], Vec::new());
        p.rules.push(Rule {
            name: "the-rule".into(),
            matcher: Match {
                sni: vec![sni.parse().unwrap()],
                ..Match::default()
            },
            action,
            profile: None,
        });
        SplitSettings {
            policy: Arc::new(p),
            ..SplitSettings::default()
        }
    }

    /// One RST to each end, and no client byte to the server.
    fn assert_reset_both_ways(out: &[(Side, Vec<u8>)]) {
        let rst = |to| segments(out, to).iter().filter(|s| s.flags.rst).count();
        assert_eq!((rst(Side::Inside), rst(Side::Outside)), (1, 1), "{out:?}");
        assert!(segments(out, Side::Outside)
            .iter()
            .all(|s| s.payload.is_empty()));
    }

    fn segments(out: &[(Side, Vec<u8>)], to: Side) -> Vec<Segment> {
        out.iter()
            .filter(|(s, _)| *s == to)
            .map(|(_, f)| parse_segment(f).unwrap().segment)
            .collect()
    }

    #[test]
    fn a_full_table_forgets_its_oldest_tracker_never_a_live_split() {
        let now = Instant::now();
        let mut sp = Splitter::new(SplitSettings {
            max_flows: 3,
            ..SplitSettings::default()
        });
        let send = |sp: &mut Splitter, port: u16, from: Dir, s: &Segment| {
            let side = if from == Dir::Client {
                Side::Inside
            } else {
                Side::Outside
            };
            sp.on_frame(side, &Peers::on_port(port).frame(from, s), now)
        };
        // A handshake and the client's first bytes (not TLS: split at once).
        let split_on = |sp: &mut Splitter, port: u16| {
            send(sp, port, Dir::Client, &seg(C_ISN, 0, true, b""));
            send(sp, port, Dir::Server, &seg(S_ISN, C_ISN + 1, true, b""));
            let data = seg(C_ISN + 1, S_ISN + 1, false, b"GET /");
            send(sp, port, Dir::Client, &data);
        };
        // A live split on port 1...
        split_on(&mut sp, 1);
        assert_eq!(sp.counters.split, 1);
        // ...an established connection on port 2 that has not spoken yet,
        // and a half-open handshake on port 3 fill the table.
        send(&mut sp, 2, Dir::Client, &seg(C_ISN, 0, true, b""));
        send(&mut sp, 2, Dir::Server, &seg(S_ISN, C_ISN + 1, true, b""));
        send(
            &mut sp,
            2,
            Dir::Client,
            &seg(C_ISN + 1, S_ISN + 1, false, b""),
        );
        send(&mut sp, 3, Dir::Client, &seg(C_ISN, 0, true, b""));
        assert_eq!(sp.active(), 3);
        // A flood of SYNs: each takes the place of the oldest tracker.
        for port in 4..100 {
            let d = send(&mut sp, port, Dir::Client, &seg(C_ISN, 0, true, b""));
            assert_eq!(d, Disposition::Forward);
            assert_eq!(sp.active(), 3);
        }
        assert_eq!((sp.counters.evicted, sp.counters.table_full), (96, 0));
        // The split lives on: its segments are still consumed.
        let more = seg(C_ISN + 6, S_ISN + 1, false, b"more");
        assert_eq!(send(&mut sp, 1, Dir::Client, &more), Disposition::Consumed);
        // Half-open handshakes went first: the established one on port 2,
        // older than all of them, is still tracked and splits when it
        // speaks.
        let data = seg(C_ISN + 1, S_ISN + 1, false, b"GET /");
        assert_eq!(send(&mut sp, 2, Dir::Client, &data), Disposition::Consumed);
        assert_eq!(sp.live().0, 2);
        // With only live splits left, a new connection goes untracked.
        let mut sp1 = Splitter::new(SplitSettings {
            max_flows: 1,
            ..SplitSettings::default()
        });
        split_on(&mut sp1, 1);
        assert_eq!(sp1.counters.split, 1);
        send(&mut sp1, 2, Dir::Client, &seg(C_ISN, 0, true, b""));
        assert_eq!((sp1.counters.evicted, sp1.counters.table_full), (0, 1));
    }

    #[test]
    fn a_clienthello_in_two_segments_is_held_then_split() {
        let mut b = Bench::new(SplitSettings::default());
        let hello = client_hello("shop.example", &[b"h2"]);
        let (first, rest) = hello.split_at(100);
        assert_eq!(b.client_data(0, first).0, Disposition::Consumed);
        // Held: nothing forwarded, nothing acknowledged.
        assert!(b.sent().is_empty());
        assert_eq!(b.sp.counters.split, 0);
        assert_eq!(b.client_data(100, rest).0, Disposition::Consumed);
        assert_eq!((b.sp.counters.hellos, b.sp.counters.split), (1, 1));
        let out = b.sent();
        // The client's bytes are acknowledged at once, as the server...
        let to_client = segments(&out, Side::Inside);
        let end = SeqNum(C_ISN + 1 + hello.len() as u32);
        assert!(
            to_client.iter().any(|s| s.flags.ack && s.ack == end),
            "{to_client:?}"
        );
        // ...and sent to the server by the server-facing half, as the client.
        let to_server = segments(&out, Side::Outside);
        let relayed: Vec<u8> = to_server.iter().flat_map(|s| s.payload.clone()).collect();
        assert_eq!(relayed, hello);
        assert_eq!(to_server[0].seq, SeqNum(C_ISN + 1));
        assert_eq!(bypassed(&b.sp), 0);
        // Pinned to userspace, whatever the steering maps say later.
        assert!(matches!(b.sp.ops[..], [MapOp::Steer(_)]), "{:?}", b.sp.ops);
    }

    #[test]
    fn held_data_older_than_a_later_ack_is_not_taken_for_a_duplicate() {
        let mut b = Bench::new(SplitSettings::default());
        let hello = client_hello("shop.example", &[]);
        // Held data with TSval 1001, then a pure ACK with TSval 5000 goes by.
        let mut data = seg(C_ISN + 1, S_ISN + 1, false, &hello[..50]);
        data.options.timestamps = Some(Timestamps {
            val: 1001,
            ecr: S_ISN,
        });
        b.send(Dir::Client, &data);
        let mut ack = seg(C_ISN + 1, S_ISN + 1, false, b"");
        ack.options.timestamps = Some(Timestamps {
            val: 5000,
            ecr: S_ISN,
        });
        assert_eq!(b.send(Dir::Client, &ack), Disposition::Forward);
        b.client_data(50, &hello[50..]);
        assert_eq!(b.sp.counters.split, 1);
        let out = b.sent();
        let relayed: Vec<u8> = segments(&out, Side::Outside)
            .iter()
            .flat_map(|s| s.payload.clone())
            .collect();
        assert_eq!(relayed, hello);
        // The server-facing half's clock continues past the client's.
        let ts = segments(&out, Side::Outside)[0].options.timestamps.unwrap();
        assert!(SeqNum(ts.val).gt(SeqNum(5000)) || ts.val == 5000, "{ts:?}");
    }

    #[test]
    fn an_exempt_server_name_releases_the_held_frames_unchanged() {
        let mut b = Bench::new(SplitSettings {
            policy: Arc::new(Policy::split_all(
                &[443],
                vec!["*.bank.example".parse().unwrap()],
            )),
            ..SplitSettings::default()
        });
        let hello = client_hello("www.bank.example", &[]);
        let (first, rest) = hello.split_at(100);
        let (_, f1) = b.client_data(0, first);
        let (_, f2) = b.client_data(100, rest);
        let out = b.sent();
        assert_eq!(out, vec![(Side::Outside, f1), (Side::Outside, f2)]);
        assert_eq!(b.sp.counters.policy_pass, 1);
        assert_eq!(bypassed(&b.sp), 1);
        // The decision is logged with its rule and the server name.
        let e = &b.sp.events[..];
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].action, Some(Action::NoDecrypt));
        assert_eq!(e[0].rule, "split-exempt-sni");
        assert_eq!(e[0].sni.as_deref(), Some("www.bank.example"));
        assert_eq!(
            (e[0].end.as_str(), e[0].bytes_c2s),
            ("bypass", hello.len() as u64)
        );
        assert_eq!(e[0].client, "198.18.0.1:40000");
        assert_eq!(e[0].server, "198.18.0.2:443");
        // Later frames pass through (until XDP takes the flow).
        assert_eq!(
            b.client_data(hello.len() as u32, b"more").0,
            Disposition::Forward
        );
        assert_eq!(b.sp.counters.split, 0);
    }

    #[test]
    fn a_hold_without_a_decision_is_released_at_the_deadline() {
        let settings = with_default(Action::NoDecrypt);
        let timeout = settings.hold_timeout;
        let mut b = Bench::new(settings);
        // A record header announcing 16 KiB, and a little of it.
        let (d, f) = b.client_data(0, &[22, 3, 1, 0x40, 0, 1, 0, 0x3f, 0xfc]);
        assert_eq!(d, Disposition::Consumed);
        // A retransmission of it is not held twice.
        b.client_data(0, &[22, 3, 1, 0x40, 0, 1, 0, 0x3f, 0xfc]);
        b.sp.on_timers(b.now + timeout / 2);
        assert!(b.sent().is_empty());
        b.sp.on_timers(b.now + timeout);
        assert_eq!(b.sent(), vec![(Side::Outside, f)]);
        assert_eq!(b.sp.counters.hold_timeouts, 1);
        assert_eq!(bypassed(&b.sp), 1);
        assert_eq!(b.sp.events.len(), 1);
        // Decided without the server name, by the default.
        assert_eq!(b.sp.events[0].action, Some(Action::NoDecrypt));
        assert_eq!(b.sp.events[0].rule, crate::policy::DEFAULT_RULE);
        assert!(b.sp.events[0]
            .note
            .as_deref()
            .unwrap()
            .contains("hold time"));
    }

    #[test]
    fn a_hold_without_a_decision_is_split_or_refused_by_the_addresses() {
        let timeout = SplitSettings::default().hold_timeout;
        // Split by default: the held bytes go into the split.
        let mut b = Bench::new(SplitSettings::default());
        b.client_data(0, &[22, 3, 1, 0x40, 0, 1, 0, 0x3f, 0xfc]);
        b.sp.on_timers(b.now + timeout);
        assert_eq!((b.sp.counters.hold_timeouts, b.sp.counters.split), (1, 1));
        let to_server = segments(&b.sent(), Side::Outside);
        assert_eq!(to_server[0].payload, [22, 3, 1, 0x40, 0, 1, 0, 0x3f, 0xfc]);
        // A block on server names might apply: refused (a client cannot
        // get around it by never finishing its ClientHello).
        let mut b = Bench::new(one_rule(Action::Block, "*.bad.example"));
        b.client_data(0, &[22, 3, 1, 0x40, 0, 1, 0, 0x3f, 0xfc]);
        b.sp.on_timers(b.now + timeout);
        assert_reset_both_ways(&b.sent());
        assert_eq!(b.sp.counters.refused, 1);
        assert_eq!(b.sp.events[0].end, "blocked");
        assert_eq!(b.sp.events[0].rule, "the-rule");
    }

    #[test]
    fn a_clienthello_in_too_many_pieces_does_not_escape_a_block() {
        let mut b = Bench::new(one_rule(Action::Block, "*.bad.example"));
        let hello = client_hello("www.bad.example", &[]);
        for (i, byte) in hello.iter().enumerate().take(MAX_HELD_FRAMES + 1) {
            b.client_data(i as u32, &[*byte]);
        }
        assert_eq!(b.sp.counters.hold_overflows, 1);
        assert_eq!(b.sp.counters.refused, 1);
        let out = b.sent();
        assert!(segments(&out, Side::Outside)
            .iter()
            .all(|s| s.payload.is_empty() && s.flags.rst));
        assert_eq!(bypassed(&b.sp), 0);
    }

    #[test]
    fn urgent_data_before_the_decision_cannot_escape_a_block() {
        let mut b = Bench::new(one_rule(Action::Block, "*.bad.example"));
        let mut s = seg(C_ISN + 1, S_ISN + 1, false, b"\x16\x03\x01");
        s.flags.urg = true;
        assert_eq!(b.send(Dir::Client, &s), Disposition::Consumed);
        assert_eq!((b.sp.counters.refused, bypassed(&b.sp)), (1, 0));
        // Without a block that might apply, it is passed through as before.
        let mut b = Bench::new(SplitSettings::default());
        assert_eq!(b.send(Dir::Client, &s), Disposition::Forward);
        assert_eq!((b.sp.counters.passthrough, bypassed(&b.sp)), (1, 1));
        assert_eq!(b.sp.events[0].rule, "(passthrough)");
    }

    #[test]
    fn more_than_the_bound_is_released() {
        let mut b = Bench::new(SplitSettings {
            hold_bytes: 2000,
            ..with_default(Action::NoDecrypt)
        });
        let mut frames = Vec::new();
        let (_, f) = b.client_data(0, &[22, 3, 1, 0x40, 0, 1, 0, 0x3f, 0xfc]);
        frames.push(f);
        let (_, f) = b.client_data(9, &[0; 1400]);
        frames.push(f);
        assert!(b.sent().is_empty());
        let (_, f) = b.client_data(1409, &[0; 1400]);
        frames.push(f);
        let out = b.sent();
        assert_eq!(
            out,
            frames
                .into_iter()
                .map(|f| (Side::Outside, f))
                .collect::<Vec<_>>()
        );
        assert_eq!(b.sp.counters.hold_overflows, 1);
    }

    #[test]
    fn other_protocols_and_servers_speaking_first_are_split_at_once() {
        let mut b = Bench::new(SplitSettings::default());
        b.client_data(0, b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!((b.sp.counters.not_tls, b.sp.counters.split), (1, 1));
        let to_server = segments(&b.sent(), Side::Outside);
        assert_eq!(to_server[0].payload, b"GET / HTTP/1.1\r\n\r\n");

        let mut b = Bench::new(SplitSettings::default());
        let banner = seg(S_ISN + 1, C_ISN + 1, false, b"220 smtp ready\r\n");
        assert_eq!(b.send(Dir::Server, &banner), Disposition::Consumed);
        assert_eq!((b.sp.counters.server_first, b.sp.counters.split), (1, 1));
        let to_client = segments(&b.sent(), Side::Inside);
        assert_eq!(to_client[0].payload, b"220 smtp ready\r\n");
    }

    #[test]
    fn a_reset_during_the_hold_ends_it_and_the_held_data_stays() {
        let mut b = Bench::new(SplitSettings::default());
        b.client_data(0, &[22, 3, 1]);
        // A RST at the end of the held bytes: the client is gone.
        let mut rst = seg(C_ISN + 4, S_ISN + 1, false, b"");
        rst.flags.rst = true;
        assert_eq!(b.send(Dir::Client, &rst), Disposition::Forward);
        assert!(b.sent().is_empty(), "the held bytes are not released");
        assert_eq!((b.sp.counters.split, bypassed(&b.sp)), (0, 0));
        // Late segments of it are dropped.
        assert_eq!(b.client_data(3, b"x").0, Disposition::Consumed);
    }

    #[test]
    fn a_forged_reset_during_the_hold_is_dropped_and_the_hold_goes_on() {
        let mut b = Bench::new(one_rule(Action::Block, "*.bad.example"));
        let hello = client_hello("www.bad.example", &[]);
        b.client_data(0, &hello[..100]);
        for (dir, seq) in [(Dir::Client, C_ISN + 5000), (Dir::Server, S_ISN + 77)] {
            let mut rst = seg(seq, 0, false, b"");
            rst.flags.rst = true;
            assert_eq!(b.send(dir, &rst), Disposition::Consumed);
        }
        assert_eq!((b.sp.counters.bogus_resets, bypassed(&b.sp)), (2, 0));
        b.client_data(100, &hello[100..]);
        assert_eq!(b.sp.counters.refused, 1, "the block still applies");
    }

    #[test]
    fn a_fin_ahead_of_missing_bytes_does_not_end_the_hold() {
        let mut b = Bench::new(one_rule(Action::Block, "*.bad.example"));
        let hello = client_hello("www.bad.example", &[]);
        // A FIN far ahead, then the ClientHello: decided by its name.
        let mut fin = seg(C_ISN + 1 + 20_000, S_ISN + 1, false, b"");
        fin.flags.fin = true;
        assert_eq!(b.send(Dir::Client, &fin), Disposition::Consumed);
        assert_eq!(b.sp.events.len(), 0);
        b.client_data(0, &hello);
        assert_eq!(b.sp.events[0].sni.as_deref(), Some("www.bad.example"));
        assert_eq!(b.sp.events[0].end, "blocked");
    }

    #[test]
    fn a_flow_seen_mid_stream_is_dropped_when_a_block_might_apply() {
        let mut sp = Splitter::new(one_rule(Action::Block, "*.bad.example"));
        let peers = Peers::new();
        let data = seg(C_ISN + 1, S_ISN + 1, false, b"\x16\x03\x01");
        let f = peers.frame(Dir::Client, &data);
        assert_eq!(
            sp.on_frame(Side::Inside, &f, Instant::now()),
            Disposition::Consumed
        );
        assert_eq!((sp.counters.refused, bypassed(&sp)), (1, 0));
        assert_eq!(sp.events[0].end, "blocked");
        assert_eq!(sp.events[0].server, "198.18.0.2:443");
        // Without a block that might apply, it is left to the kernel.
        let mut sp = Splitter::new(SplitSettings::default());
        assert_eq!(
            sp.on_frame(Side::Inside, &f, Instant::now()),
            Disposition::Forward
        );
        assert_eq!(bypassed(&sp), 1);
    }

    #[test]
    fn a_blocked_tls_client_reads_an_alert_and_the_server_is_reset() {
        let mut b = Bench::new(one_rule(Action::Block, "*.bad.example"));
        let hello = client_hello("www.bad.example", &[]);
        b.client_data(0, &hello);
        assert_eq!((b.sp.counters.refused, b.sp.counters.split), (1, 0));
        let out = b.sent();
        let to_server = segments(&out, Side::Outside);
        assert_eq!(to_server.len(), 1, "{to_server:?}");
        assert!(to_server[0].flags.rst && to_server[0].seq == SeqNum(C_ISN + 1));
        assert!(
            to_server[0].payload.is_empty(),
            "no client byte reaches the server"
        );
        let to_client = segments(&out, Side::Inside);
        let alert: Vec<u8> = to_client.iter().flat_map(|s| s.payload.clone()).collect();
        assert_eq!(alert, ACCESS_DENIED);
        assert!(to_client.iter().any(|s| s.flags.fin), "{to_client:?}");
        assert!(to_client
            .iter()
            .all(|s| s.ack == SeqNum(C_ISN + 1 + hello.len() as u32)));
        let e = &b.sp.events;
        assert_eq!(e.len(), 1);
        assert_eq!(
            (e[0].action, e[0].end.as_str()),
            (Some(Action::Block), "blocked")
        );
        assert_eq!(e[0].rule, "the-rule");
        assert_eq!(
            b.sp.describe(&e_key()).map(|d| d.state),
            Some("refused".into())
        );
        // The client closes in turn: the connection ends without a second
        // record.
        let fin_seq = C_ISN + 1 + hello.len() as u32;
        let mut fin = seg(
            fin_seq,
            S_ISN + 1 + ACCESS_DENIED.len() as u32 + 1,
            false,
            b"",
        );
        fin.flags.fin = true;
        b.send(Dir::Client, &fin);
        // (The client half waits out TIME-WAIT.)
        b.sp.on_timers(b.now + Duration::from_secs(600));
        assert_eq!(b.sp.events.len(), 1);
        assert_eq!(
            b.sp.describe(&e_key()).map(|d| d.state),
            Some("ended".into())
        );
    }

    /// The key of the bench's connection, client to server.
    fn e_key() -> FlowKey {
        let f = Peers::new().frame(Dir::Client, &seg(C_ISN, 0, true, b""));
        parse_segment(&f).unwrap().key
    }

    #[test]
    fn a_blocked_client_that_does_not_speak_tls_is_reset() {
        let mut settings = one_rule(Action::Block, "*");
        Arc::make_mut(&mut settings.policy).default_action = Action::Block;
        let mut b = Bench::new(settings);
        b.client_data(0, b"GET / HTTP/1.0\r\n\r\n");
        assert_reset_both_ways(&b.sent());
        assert_eq!(b.sp.events[0].rule, crate::policy::DEFAULT_RULE);
    }

    #[test]
    fn a_new_policy_decides_new_connections_only() {
        let mut b = Bench::new(SplitSettings::default());
        b.client_data(0, &client_hello("a.example", &[]));
        assert_eq!(b.sp.counters.split, 1);
        // Now everything is no-decrypt: the running split stays split.
        let mut p = Policy::split_all(&[443], Vec::new());
        p.default_action = Action::NoDecrypt;
        p.version = 7;
        b.sp.set_policy(Arc::new(p));
        assert_eq!(b.sp.describe(&e_key()).unwrap().state, "split");
        let more = seg(C_ISN + 1 + 500, S_ISN + 1, false, b"x");
        assert_eq!(b.send(Dir::Client, &more), Disposition::Consumed);
        // A new connection (another client port) passes.
        b.peers = Peers::on_port(40001);
        b.send(Dir::Client, &seg(C_ISN, 0, true, b""));
        b.send(Dir::Server, &seg(S_ISN, C_ISN + 1, true, b""));
        b.send(Dir::Client, &seg(C_ISN + 1, S_ISN + 1, false, b""));
        b.client_data(0, &client_hello("a.example", &[]));
        assert_eq!((b.sp.counters.split, b.sp.counters.policy_pass), (1, 1));
        let e = b.sp.events.last().unwrap();
        assert_eq!(
            (e.policy_version, e.rule.as_str()),
            (7, crate::policy::DEFAULT_RULE)
        );
    }

    #[test]
    fn an_ended_split_is_logged_with_its_bytes_and_unpinned() {
        let mut b = Bench::new(SplitSettings::default());
        let hello = client_hello("a.example", &[]);
        b.client_data(0, &hello);
        b.sent();
        let n = hello.len() as u32;
        // The client resets: the split ends at once.
        let mut rst = seg(C_ISN + 1 + n, S_ISN + 1, false, b"");
        rst.flags.rst = true;
        b.send(Dir::Client, &rst);
        let e = b.sp.events.last().expect("a record");
        assert_eq!(
            (e.end.as_str(), e.bytes_c2s),
            ("client-reset", u64::from(n))
        );
        assert_eq!(e.action, Some(Action::TcpSplit));
        assert!(
            matches!(b.sp.ops.last(), Some(MapOp::Forget(_))),
            "{:?}",
            b.sp.ops
        );
    }
}
