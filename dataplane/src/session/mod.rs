//! The connections one worker decides and takes over: a handshake
//! tracker for each new steered connection; after the handshake, the
//! client's first bytes held (neither forwarded nor acknowledged) until
//! they make a decision point (a complete ClientHello, other bytes, or the
//! server speaking first), within a bound on bytes and time; then the
//! policy's verdict: release the held frames unchanged and hand the flow
//! to XDP once the server has acknowledged them, or split it (two TCP
//! halves and the stage between them). Before the decision, a client's
//! SYN goes on without data or Fast Open, URG is cleared, and segments
//! the server would refuse or read otherwise are dropped. It
//! owns their timers and the frames they send. The worker hands every
//! frame of a steered flow it owns here first; what is not consumed it
//! forwards unchanged.
//!
//! - [`opening`]: a connection taken up from the handshake the XDP
//!   program recorded (its SYN and SYN-ACK took the fast path).
//! - [`hold`]: the handshake watched and the first bytes held.
//! - [`decide`]: the decision and what follows (release, split, refusal).
//! - [`table`]: the table's bound (eviction) and idle expiry.
//! - [`outbox`]: the frames built and not yet sent.
//! - [`records`]: what the flow log and listings say of a connection.
//! - [`stop`]: what becomes of them when the engine stops.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap, HashSet, VecDeque},
    sync::Arc,
    task::Waker,
    time::{Duration, Instant},
};

use loupe_common::FlowKey;

mod decide;
pub mod fuzz;
mod hold;
pub mod opening;
pub mod outbox;
mod records;
pub mod split;
mod stop;
mod table;

use self::{
    hold::{NoDecision, Tracking},
    outbox::Outbox,
    records::{absorb, add_halves, conn_id, end_reason, finding_entry, log_entry, Meta},
    split::Split,
    table::{EMBRYONIC, SETTLED},
};
use crate::{
    flow::{log::unix_ms, table::endpoint, FlowDecision, FlowId, FlowLogEntry, MapOp, Side},
    policy::{Action, Decision, Policy, Subject, Verdict},
    stats::SplitCounters,
    tcp::{
        budget::MemoryBudget,
        conn::{Abort, ConnConfig},
        reassembly::Reassembler,
        split::{Dir, Passthrough, Track, Tracker},
    },
    tls::{
        context::TlsContext,
        hello::{Hello, HelloScanner, Opening},
    },
    wire::{
        frame::{slice_tcp, SlicedTcp},
        segment::{
            headers_of, normalised, parse_segment, Normalise, Parsed, Segment, SegmentError,
            Template,
        },
        seq::SeqNum,
    },
};

/// How the sessions are held and decided.
#[derive(Clone, Debug)]
pub struct SessionSettings {
    /// Trackers and split connections per worker, at most.
    pub max_flows: usize,
    /// Trackers idle this long are forgotten (passed connections are
    /// kept until room is needed: the fast path carries their frames).
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
    /// The rules deciding each connection (swapped by [`Sessions::set_policy`]).
    pub policy: Arc<Policy>,
    /// TLS interception (`decrypt`): none without an HSM and its CAs.
    pub tls: Option<Arc<TlsContext>>,
    /// Wakes this worker when an HSM answer for a parked connection is in.
    pub waker: Option<Waker>,
    /// When the engine stops, how long connections under way are given to
    /// finish before they are reset.
    pub drain: Duration,
    /// What a half's send and receive buffers may each grow to.
    pub buffer_max: usize,
    /// Engine-wide, what the halves' buffers may grow into beyond their
    /// initial sizes; with less than a new split's base left, new
    /// connections are not split (passed, counted) or, for `decrypt`,
    /// follow the profile's `no_resources`.
    pub budget: Arc<MemoryBudget>,
    /// The halves' congestion control.
    pub congestion: crate::tcp::cc::Algorithm,
    /// The smaller MTU of the two interfaces: the halves clamp a peer's
    /// MSS option to what it carries. `None`: the options as announced.
    pub mtu: Option<u32>,
    /// The handshakes the XDP program recorded (none: every SYN and
    /// SYN-ACK is steered here).
    pub handshakes: Option<Arc<dyn opening::HandshakeRecords>>,
    /// A connection the policy would inspect but the engine cannot follow
    /// from its start: dropped (the default) or passed.
    pub mid_flow: MidFlow,
}

/// What becomes of a connection the engine cannot follow from its start
/// (seen mid-flow: running before the engine, or forgotten idle or to make
/// room; evicted while held; no room in a table full of live splits)
/// when the policy, deciding without the server name, would inspect it
/// (`tcp-split`, `decrypt`, `inbound-inspect`): none of those can start
/// mid-stream. A `block` that might apply drops such a connection either
/// way, and a `no-decrypt` passes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MidFlow {
    /// Fail closed: reset it (a SYN finding no room is dropped; the
    /// client tries again), as a stateful firewall drops TCP that opens
    /// without a SYN. A client cannot get a connection past inspection by
    /// staying quiet until it is forgotten, or by flooding the table.
    #[default]
    Drop,
    /// Fail open: leave it to the kernel, uninspected (connections
    /// running across an engine restart carry on).
    Pass,
}

impl MidFlow {
    pub const NAMES: [&'static str; 2] = ["drop", "pass"];
}

impl std::str::FromStr for MidFlow {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "drop" => Ok(MidFlow::Drop),
            "pass" => Ok(MidFlow::Pass),
            _ => Err(format!(
                "unknown mid-flow handling {s:?} (expected one of: {})",
                MidFlow::NAMES.join(", ")
            )),
        }
    }
}

/// How long a SYN on the ports of a passed connection may go without a
/// SYN-ACK before the connection is passed again as it was: the server
/// may never answer it (dropped on the way or by a firewall, or its
/// challenge ACK held back by rate limiting, RFC 5961 §7), and meanwhile
/// none of the old connection's segments fit the new handshake.
pub(crate) const SYN_UNANSWERED: Duration = Duration::from_secs(1);

/// Records of flows seen mid-stream a worker writes a second, at most:
/// past that (a flood of forged segments, each a flow of its own), they
/// are counted (`mid_flow_unlogged`), not written, so a flood cannot
/// rotate the decisions out of the flow log.
pub const MID_FLOW_RECORDS_PER_SEC: u32 = 100;

/// A half's buffers to begin with (each way), before autotuning.
pub const BUFFER_INITIAL: usize = 128 << 10;

/// Idle this long, a split's buffers give back their spare memory.
pub(crate) const TRIM_AFTER: Duration = Duration::from_secs(1);

impl SessionSettings {
    /// A new split's base (its four buffers) cannot be covered.
    pub(super) fn memory_short(&self) -> bool {
        self.budget.short_of(4 * BUFFER_INITIAL)
    }
}

impl Default for SessionSettings {
    fn default() -> Self {
        SessionSettings {
            max_flows: 262_144,
            idle: Duration::from_secs(120),
            hold_bytes: 32 << 10,
            hold_timeout: Duration::from_secs(3),
            policy: Arc::new(Policy::split_all(&[443], Vec::new())),
            tls: None,
            waker: None,
            drain: Duration::from_secs(2),
            buffer_max: 4 << 20,
            budget: Arc::new(MemoryBudget::new(1 << 30)),
            congestion: crate::tcp::cc::Algorithm::default(),
            mtu: None,
            handshakes: None,
            mid_flow: MidFlow::default(),
        }
    }
}

/// The largest MSS a link of `mtu` carries for the family of `key`
/// (RFC 9293 §3.7.1: the MTU less the fixed IP and TCP headers).
fn mss_max(mtu: Option<u32>, key: &FlowKey) -> u16 {
    let Some(mtu) = mtu else { return u16::MAX };
    let v4 = std::net::Ipv6Addr::from(key.src).to_ipv4_mapped().is_some();
    let headers = if v4 { 40 } else { 60 };
    u16::try_from(mtu.saturating_sub(headers)).unwrap_or(u16::MAX)
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
        /// Took segments in this receive batch; pumped and transmitted at
        /// its end ([`Sessions::end_batch`]).
        pending: bool,
        meta: Box<Meta>,
    },
    /// Left to the kernel; with what was decided, when it was.
    Passthrough(Option<Box<Meta>>),
    /// Passed, its held frames released; still carried here until the
    /// server acknowledges them (see [`Releasing`]).
    Releasing(Box<Releasing>),
    /// A connection that ended here: late segments of it are dropped,
    /// not forwarded, until idle. With `answer` (a split connection that
    /// ended, cleanly or not), each of them but a RST is answered with a
    /// RST back, as a closed port does (RFC 9293 §3.10.7.1; Linux once
    /// TIME-WAIT is over): a peer our RST missed (it came outside the
    /// peer's window, and the peer answered with a challenge ACK, RFC
    /// 5961 §3.2) learns at its next segment that the connection is gone,
    /// and so does one still resending its FIN after the half that
    /// closed first left TIME-WAIT. Without (ended before it was split:
    /// refused under `--mid-flow drop` or before its handshake completed,
    /// or reset during the hold), they go unanswered.
    Ended {
        answer: bool,
    },
    /// Refused with no connection state behind it (seen mid-flow): every
    /// later segment but a RST is dropped and answered with a RST back to
    /// its sender, as a closed port answers (RFC 9293 §3.10.7.1), until
    /// idle. So an end that missed the first reset (its peer's first
    /// segment seen was a keepalive, one below what it expects) is reset
    /// at its next segment, or at its answer to the probe that went with
    /// the reset ([`Parsed::reset_on`]).
    Closed,
}

/// A passed connection whose held frames went to the server, not yet
/// acknowledged. Were the flow on the XDP fast path at once, a client
/// frame of those bytes sent right after could overtake the released ones
/// (the fast path is quicker than a worker's transmit) and be the copy the
/// server reads: an outside probe got `evil.example` read where
/// `bank.example` was passed, 8 times in 40. Until the server's ACK covers
/// the released bytes, the client's frames go out behind them, in order,
/// so later copies of those bytes are old duplicates to the server; then
/// the flow moves to the fast path. A client copy of them that differs is
/// dropped: should the server have dropped the released frames (a listener
/// still in SYN-RECEIVED checks more than the hold can), it reads the
/// client's retransmission, which must say what was decided on.
struct Releasing {
    meta: Option<Box<Meta>>,
    key: FlowKey,
    client: Side,
    /// Where the client's bytes start, and those released in order.
    start: SeqNum,
    decided: Vec<u8>,
}

impl Releasing {
    /// The end of the bytes released in order.
    fn until(&self) -> SeqNum {
        self.start + self.decided.len() as u32
    }

    /// Whether `payload` at `seq` says other than what was decided on
    /// where the two overlap.
    fn differs(&self, seq: SeqNum, payload: &[u8]) -> bool {
        let off = i64::from(seq.since(self.start));
        let (from, to) = (
            off.max(0),
            (off + payload.len() as i64).min(self.decided.len() as i64),
        );
        from < to
            && payload[(from - off) as usize..(to - off) as usize]
                != self.decided[from as usize..to as usize]
    }
}

struct Flow {
    entry: Entry,
    last_seen: Instant,
    /// When it entered the eviction order (see `Sessions::evictable`).
    since: u64,
}

/// Split connections of one worker.
pub struct Sessions {
    flows: HashMap<FlowId, Flow>,
    /// Entries that may make room when the table is full, oldest first:
    /// [`EMBRYONIC`] (handshakes not complete: a SYN flood; flows seen
    /// mid-stream, passed or reset: forged segments) before [`SETTLED`]
    /// (trackers holding for a decision, passed-through flows, ended
    /// connections' tombstones); never live splits. Stale pairs (the
    /// entry moved on, or went) are skipped when met and pruned on expiry.
    evictable: [VecDeque<(u64, FlowId)>; 2],
    /// The next `since`.
    epoch: u64,
    timers: BinaryHeap<Reverse<(Instant, FlowId)>>,
    conn: ConnConfig,
    settings: SessionSettings,
    /// Frames to send: (out of which interface, bytes).
    pub out: Outbox,
    /// Changes to the XDP flow map for the worker to pass on: flows
    /// released to the fast path, live splits pinned to userspace.
    pub ops: Vec<MapOp>,
    /// Records of decided connections, for the flow log.
    pub events: Vec<FlowLogEntry>,
    spare: Vec<Vec<u8>>,
    /// Split connections whose stage waits for the HSM.
    parked: HashSet<FlowId>,
    /// Between [`Sessions::begin_batch`] and [`Sessions::end_batch`]: the
    /// split connections that took segments, to pump once at the end.
    batch: Option<Vec<FlowId>>,
    batch_spare: Vec<FlowId>,
    /// The engine is stopping: no new connection is taken.
    stopping: bool,
    /// When these sessions began: a connection whose handshake XDP
    /// recorded before then ran on without them (its first bytes may be
    /// through already) and is met as one already running.
    created: Instant,
    /// Records of flows seen mid-stream in the current second: when it
    /// began, how many (see [`MID_FLOW_RECORDS_PER_SEC`]).
    mid_flow_records: (Instant, u32),
    pub counters: SplitCounters,
}

impl Sessions {
    pub fn new(settings: SessionSettings) -> Sessions {
        Sessions {
            flows: HashMap::new(),
            evictable: [VecDeque::new(), VecDeque::new()],
            epoch: 0,
            timers: BinaryHeap::new(),
            conn: ConnConfig {
                send_buffer: BUFFER_INITIAL,
                recv_buffer: BUFFER_INITIAL,
                send_buffer_max: settings.buffer_max.max(BUFFER_INITIAL),
                recv_buffer_max: settings.buffer_max.max(BUFFER_INITIAL),
                budget: Some(settings.budget.clone()),
                congestion: settings.congestion,
                ..ConnConfig::default()
            },
            settings,
            out: Outbox::default(),
            ops: Vec::new(),
            events: Vec::new(),
            spare: Vec::new(),
            parked: HashSet::new(),
            batch: None,
            batch_spare: Vec::new(),
            stopping: false,
            created: Instant::now(),
            mid_flow_records: (Instant::now(), 0),
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
        match slice_tcp(frame) {
            Ok(sliced) => self.on_sliced(side, frame, &sliced, now),
            Err(e) => self.bad_frame(e.into()),
        }
    }

    /// [`Sessions::on_frame`] for a frame the worker has sliced already.
    pub fn on_sliced(
        &mut self,
        side: Side,
        frame: &[u8],
        sliced: &SlicedTcp,
        now: Instant,
    ) -> Disposition {
        let payload = sliced.tcp.payload();
        self.on_parsed(side, frame, headers_of(frame, sliced), payload, now)
    }

    /// `parsed`'s segment has an empty payload: `payload` is its payload,
    /// in the frame. A split half reads it there; anything else gets a
    /// copy of its own.
    fn on_parsed(
        &mut self,
        side: Side,
        frame: &[u8],
        parsed: Result<Parsed, SegmentError>,
        payload: &[u8],
        now: Instant,
    ) -> Disposition {
        let mut parsed = match parsed {
            Ok(p) => p,
            Err(e) => return self.bad_frame(e),
        };
        let id = FlowId::of(&parsed.key);
        let is_syn = parsed.segment.flags.syn && !parsed.segment.flags.ack;
        // A new connection on the ports of one that passed through or
        // ended, or of a split whose halves are through with their bytes
        // (TIME-WAIT at most, which may take a new SYN: RFC 9293
        // §3.10.7.4; a client that closed second reuses its port at once):
        // track it afresh.
        let mut passed_before = None;
        if is_syn {
            let stale = self.flows.get(&id).is_some_and(|f| match &f.entry {
                Entry::Passthrough(_)
                | Entry::Releasing(_)
                | Entry::Ended { .. }
                | Entry::Closed => true,
                Entry::Split { split, .. } => split.finished(),
                Entry::Tracking(_) => false,
            });
            if stale {
                passed_before = self.retire(id);
            }
        }
        // Its SYN took the fast path (so the worker did not retire the
        // entry): a record newer than anything seen of the entry is a new
        // connection on these ports.
        if !is_syn && self.newer_connection(id, &parsed.key, now) {
            self.retire(id);
        }
        if !self.flows.contains_key(&id) {
            if self.stopping {
                self.counters.refused_stopping += 1;
                return Disposition::Consumed;
            }
            if self.flows.len() >= self.settings.max_flows && !self.evict_oldest() {
                // Every entry is a live split: this one goes untracked,
                // as the policy says without its name and `mid_flow`.
                self.counters.table_full += 1;
                return self.no_room(side, frame, &parsed, payload.len(), is_syn);
            }
            // Its handshake took the fast path: taken up from the record.
            let recorded = self.recorded(&parsed.key, &parsed.segment, now);
            let entry = if let Some(r) = &recorded {
                self.tracking(r.syn.key, r.client, r.opened)
            } else if is_syn {
                self.tracking(parsed.key, side, now)
            } else if parsed.segment.flags.rst {
                // A RST of a connection nobody follows ends it and carries
                // no bytes: it goes on, and nothing is kept or logged (a
                // flood of forged ones must not fill the table or the log).
                return Disposition::Forward;
            } else {
                self.mid_flow(side, frame, &parsed, now)
            };
            // Among the first to make room: a handshake not yet through
            // (moved on once it is), or a flow seen mid-stream, passed or
            // reset, whose next segment meets the same decision if it is
            // forgotten (a flood of forged segments must not push out the
            // connections held for a decision).
            let since = self.next_since(id, EMBRYONIC);
            self.flows.insert(
                id,
                Flow {
                    entry,
                    last_seen: now,
                    since,
                },
            );
            if let Some(r) = recorded {
                self.replay(id, r, now);
            }
            if let Some(t) = tracking(&mut self.flows, id) {
                if passed_before.is_some() {
                    self.timers.push(Reverse((now + SYN_UNANSWERED, id)));
                }
                t.passed_before = passed_before;
            }
        }
        let flow = self.flows.get_mut(&id).expect("inserted above");
        flow.last_seen = now;
        let split_client = match &mut flow.entry {
            Entry::Passthrough(_) => return Disposition::Forward,
            Entry::Releasing(r) => {
                if side == r.client {
                    if r.differs(parsed.segment.seq, payload) {
                        self.counters.hold_conflicts += 1;
                        return Disposition::Consumed;
                    }
                    // Behind the released frames, in the same queue.
                    let mut buf = take_spare(&mut self.spare);
                    buf.extend_from_slice(frame);
                    self.out.push((side.other(), buf));
                    return Disposition::Consumed;
                }
                let s = &parsed.segment;
                if s.flags.ack && s.ack.ge(r.until()) {
                    self.ops.push(MapOp::Bypass(r.key));
                    let meta = r.meta.take();
                    flow.entry = Entry::Passthrough(meta);
                }
                return Disposition::Forward;
            }
            Entry::Ended { answer: false } => {
                self.counters.after_close += 1;
                return Disposition::Consumed;
            }
            Entry::Ended { answer: true } | Entry::Closed => {
                self.counters.after_close += 1;
                if self.reset_sender(side, frame, &parsed, payload.len()) {
                    self.counters.after_close_resets += 1;
                }
                return Disposition::Consumed;
            }
            Entry::Tracking(_) => None,
            Entry::Split { client, .. } => Some(*client),
        };
        match split_client {
            None => {
                parsed.segment.payload = payload.to_vec();
                self.track(id, side, frame, parsed, now)
            }
            Some(client) => {
                let dir = dir_from(side, client);
                match (self.batch.as_mut(), &mut flow.entry) {
                    (Some(batch), Entry::Split { split, pending, .. }) => {
                        split.receive_with(dir, &parsed.segment, payload, now);
                        if !std::mem::replace(pending, true) {
                            batch.push(id);
                        }
                    }
                    _ => self.with_split(id, now, |s| {
                        s.receive_with(dir, &parsed.segment, payload, now);
                        s.pump(now);
                    }),
                }
                Disposition::Consumed
            }
        }
    }

    /// A tracker for a new connection whose SYN (`key`) came from `client`.
    fn tracking(&self, key: FlowKey, client: Side, opened: Instant) -> Entry {
        Entry::Tracking(Box::new(Tracking {
            tracker: Tracker::new(ConnConfig {
                mss_max: mss_max(self.settings.mtu, &key),
                ..self.conn.clone()
            }),
            client,
            templates: [None, None],
            hold: None,
            key,
            opened,
            passed_before: None,
        }))
    }

    /// Forgets a flow for a new connection on its ports; a finished
    /// split is accounted for as when its halves close.
    /// Forgets the entry of `id`; if it was a passed connection, returns
    /// what was decided of it.
    fn retire(&mut self, id: FlowId) -> Option<Option<Box<Meta>>> {
        let flow = self.flows.remove(&id)?;
        self.parked.remove(&id);
        match flow.entry {
            Entry::Passthrough(meta) => return Some(meta),
            Entry::Releasing(r) => return Some(r.meta),
            _ => {}
        }
        if let Entry::Split {
            split, mut meta, ..
        } = flow.entry
        {
            if !meta.logged {
                meta.logged = true;
                self.events.push(log_entry(
                    &meta,
                    split.relayed(),
                    end_reason(&split),
                    split.stage().final_tls_record().as_ref(),
                ));
            }
            absorb(&mut self.counters, &split);
            self.ops.push(MapOp::Forget(meta.key));
        }
        None
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

    /// Sends a connection's record to the flow log.
    fn log(&mut self, meta: &Meta, relayed: (u64, u64), end: &str) {
        self.events.push(log_entry(meta, relayed, end, None));
    }

    /// Runs `f` on a split connection, then sends what it has to send and
    /// re-arms its timer; leaves a tombstone once both halves are closed.
    fn with_split(&mut self, id: FlowId, now: Instant, f: impl FnOnce(&mut Split)) {
        self.with_split_into(id, now, None, f);
    }

    /// As [`Sessions::with_split`], its frames written into `sink` while
    /// it has room (and `out` holds none for their side, which would go
    /// first), the rest into `out`.
    fn with_split_into(
        &mut self,
        id: FlowId,
        now: Instant,
        mut sink: Option<&mut (dyn FrameSink + 'static)>,
        f: impl FnOnce(&mut Split),
    ) {
        let Some(flow) = self.flows.get_mut(&id) else {
            return;
        };
        let Entry::Split {
            split,
            client,
            templates,
            armed,
            meta,
            ..
        } = &mut flow.entry
        else {
            return;
        };
        f(split);
        for found in split.take_findings() {
            self.events.push(finding_entry(meta, found));
        }
        if split.parked() {
            self.parked.insert(id);
        } else {
            self.parked.remove(&id);
        }
        // A side with frames in `out` (earlier ones, or ones its share
        // of the UMEM held back) takes no frame straight to the sink:
        // that one would go out first.
        let mut queued =
            [Side::Inside, Side::Outside].map(|side| sink.is_none() || self.out.has(side));
        while let Some((dir, seg)) = split.poll_transmit_lent(now) {
            // Toward the client: as the server (the endpoint on the other
            // side); toward the server: as the client.
            let to = if dir == Dir::Client {
                *client
            } else {
                client.other()
            };
            let template = &templates[to.other().index()];
            let payload = split.lent(dir);
            if let (false, Some(sink)) = (queued[to.index()], sink.as_deref_mut()) {
                let bytes = payload.0.len() + payload.1.len();
                let head = template.headers(&seg, bytes);
                let len = head.frame_len(bytes);
                if sink.build(to, len, &mut |frame| head.write(payload, frame)) {
                    continue;
                }
                queued[to.index()] = true;
            }
            let mut buf = take_spare(&mut self.spare);
            template.build_with(&seg, payload, &mut buf);
            self.out.push((to, buf));
        }
        // Logged when the bytes are through, not after TIME-WAIT.
        if !meta.logged && split.finished() {
            meta.logged = true;
            self.events.push(log_entry(
                meta,
                split.relayed(),
                end_reason(split),
                split.stage().final_tls_record().as_ref(),
            ));
        }
        if split.done() {
            self.parked.remove(&id);
            absorb(&mut self.counters, split);
            self.ops.push(MapOp::Forget(meta.key));
            flow.entry = Entry::Ended { answer: true };
            flow.since = self.epoch;
            self.evictable[SETTLED].push_back((self.epoch, id));
            self.epoch += 1;
            return;
        }
        if let Some(next) = split.next_deadline() {
            // A deadline already past (one a half or stage did not clear)
            // is looked at again on a later round, never over and over in
            // this one: `on_timers` would not return.
            let next = next.max(now + Duration::from_millis(1));
            if armed.is_none_or(|a| next < a) {
                *armed = Some(next);
                self.timers.push(Reverse((next, id)));
            }
        }
    }

    /// A receive batch begins: segments for split connections are taken
    /// in by their halves only, until [`Sessions::end_batch`].
    pub fn begin_batch(&mut self) {
        if self.batch.is_none() {
            self.batch = Some(std::mem::take(&mut self.batch_spare));
        }
    }

    /// The batch is over: each split connection that took segments runs
    /// its stage and transmits once (one ACK for the batch, as a receiver
    /// behind GRO sends; data relayed in one burst).
    pub fn end_batch(&mut self, now: Instant) {
        self.end_batch_into(now, None);
    }

    /// As [`Sessions::end_batch`], the frames written into `sink` while
    /// it has room (the rest into `out`, as always).
    pub fn end_batch_into(
        &mut self,
        now: Instant,
        mut sink: Option<&mut (dyn FrameSink + 'static)>,
    ) {
        let Some(mut ids) = self.batch.take() else {
            return;
        };
        for id in ids.drain(..) {
            if let Some(Flow {
                entry: Entry::Split { pending, .. },
                ..
            }) = self.flows.get_mut(&id)
            {
                *pending = false;
                self.with_split_into(id, now, sink.as_deref_mut(), |s| s.pump(now));
            }
        }
        self.batch_spare = ids;
    }

    /// The worker was woken for connections waiting on the HSM: pump
    /// them (those whose answer is not in stay parked).
    pub fn on_wake(&mut self, now: Instant) {
        let ids: Vec<FlowId> = self.parked.iter().copied().collect();
        for id in ids {
            self.with_split(id, now, |s| s.pump(now));
        }
    }

    /// When [`Sessions::on_timers`] may next have work (an entry may have
    /// been re-armed or gone since).
    #[cfg(test)]
    pub(crate) fn next_timer(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((at, _))| *at)
    }

    /// Connections waiting for the HSM.
    pub fn parked(&self) -> usize {
        self.parked.len()
    }

    /// Runs the timers that are due.
    pub fn on_timers(&mut self, now: Instant) {
        self.on_timers_into(now, None);
    }

    /// As [`Sessions::on_timers`], the split connections' frames written
    /// into `sink` while it has room.
    pub fn on_timers_into(
        &mut self,
        now: Instant,
        mut sink: Option<&mut (dyn FrameSink + 'static)>,
    ) {
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
                    self.with_split_into(id, now, sink.as_deref_mut(), |s| s.on_timer(now));
                }
                Some(Flow {
                    entry: Entry::Tracking(t),
                    ..
                }) if t.hold.as_ref().is_some_and(|h| h.deadline == at) => {
                    self.counters.hold_timeouts += 1;
                    if t.hold.as_ref().is_some_and(|h| h.decided.is_empty()) {
                        self.counters.hold_timeouts_start_missing += 1;
                    }
                    self.undecided(id, NoDecision::Timeout, now);
                }
                Some(Flow {
                    entry: Entry::Tracking(t),
                    ..
                }) if t.passed_before.is_some()
                    && t.tracker.awaiting_synack()
                    && t.opened + SYN_UNANSWERED == at =>
                {
                    self.restore_pass(id);
                }
                _ => {}
            }
        }
    }

    /// The frames of `out` marked in `gone` were copied out: they leave
    /// the queue and their buffers are kept for the next frames; the rest
    /// stay, in order.
    pub fn sent(&mut self, gone: &[bool]) {
        let mut i = 0;
        let spare = &mut self.spare;
        self.out.retain_mut(|(_, buf)| {
            let keep = !gone.get(i).copied().unwrap_or(false);
            i += 1;
            if !keep {
                keep_spare(spare, std::mem::take(buf));
            }
            keep
        });
    }

    /// Whether a flow got past its handshake: held for a decision,
    /// split, passed on its ClientHello, or ended as a split. A listing
    /// puts these first, so a flood of handshakes (or of segments met
    /// mid-flow) cannot push the connections out of it.
    pub fn opened(&self, key: &FlowKey) -> bool {
        self.flows
            .get(&FlowId::of(key))
            .is_some_and(|f| match &f.entry {
                Entry::Tracking(t) => t.hold.is_some(),
                Entry::Passthrough(meta) => meta.is_some(),
                Entry::Split { .. } | Entry::Releasing(_) | Entry::Ended { .. } => true,
                Entry::Closed => false,
            })
    }

    /// What was decided for a flow, for a listing.
    pub fn describe(&self, key: &FlowKey) -> Option<FlowDecision> {
        let flow = self.flows.get(&FlowId::of(key))?;
        let with = |state: &str, meta: Option<&Meta>, split: Option<&Split>| FlowDecision {
            state: state.into(),
            action: meta.and_then(|m| m.action),
            rule: meta.map(|m| m.rule.clone()).filter(|r| !r.is_empty()),
            sni: meta.and_then(|m| m.sni.clone()),
            relayed_c2s: split.map_or(0, |s| s.relayed().0),
            relayed_s2c: split.map_or(0, |s| s.relayed().1),
            buffered: split.map_or(0, Split::buffered),
            buffered_peak: split.map_or(0, Split::buffered_peak),
        };
        Some(match &flow.entry {
            Entry::Tracking(t) if t.hold.is_some() => with("holding", None, None),
            Entry::Tracking(_) => with("handshake", None, None),
            Entry::Split { split, meta, .. } => {
                let state = match (meta.action, split.stage().tls_record()) {
                    (Some(Action::Block), _) => "refused",
                    (_, Some(_)) if split.parked() => "minting",
                    (_, Some(t)) if t.outcome.starts_with("decrypted") => "decrypted",
                    (_, Some(t)) if t.outcome.is_empty() && !split.finished() => "handshaking",
                    (_, Some(_)) => "tls-ended",
                    _ => "split",
                };
                with(state, Some(meta), Some(split))
            }
            Entry::Passthrough(meta) => with("bypass", meta.as_deref(), None),
            Entry::Releasing(r) => with("bypass", r.meta.as_deref(), None),
            Entry::Ended { .. } => with("ended", None, None),
            Entry::Closed => with("reset", None, None),
        })
    }

    /// What the split connections still open count now, to be added to
    /// [`Sessions::counters`] (which holds the ended ones' totals): how
    /// many relay (`active`), the bytes they relayed, their halves'
    /// buffer sizes summed (autotuned; what they may hold), and their
    /// halves' TCP counters so far. As a connection ends its counts move
    /// from here to there, so the sum never goes back.
    pub fn live(&self) -> SplitCounters {
        let mut l = SplitCounters::default();
        for f in self.flows.values() {
            if let Entry::Split { split, meta, .. } = &f.entry {
                l.buffer_capacity += split.buffer_capacity();
                add_halves(&mut l, split);
                if meta.action == Some(Action::Block) {
                    continue; // refused, not relaying
                }
                l.active += 1;
                let (a, b) = split.relayed();
                l.bytes_c2s += a;
                l.bytes_s2c += b;
            }
        }
        l
    }
}

/// Transmit memory a frame can be written into where it is sent from
/// (the worker lends its free UMEM frames for a round), so that it is not
/// built in a buffer and copied there after.
pub trait FrameSink {
    /// Writes a frame of `len` bytes to go out on `side`: `fill` is given
    /// exactly `len` bytes to write it into. False, with nothing written,
    /// when there is no room (no frame free, the side at its share of
    /// them, more bytes than a frame holds): the caller keeps the frame.
    fn build(&mut self, side: Side, len: usize, fill: &mut dyn FnMut(&mut [u8])) -> bool;
}

/// An empty frame buffer, a spare one if there is any.
fn take_spare(spare: &mut Vec<Vec<u8>>) -> Vec<u8> {
    let mut buf = spare.pop().unwrap_or_default();
    buf.clear();
    buf
}

/// Keeps a frame buffer for reuse, up to a bound.
fn keep_spare(spare: &mut Vec<Vec<u8>>, buf: Vec<u8>) {
    if spare.len() < 256 {
        spare.push(buf);
    }
}

#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;
