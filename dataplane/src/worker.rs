//! The pinned per-queue loop, the only place where sockets, parsing and
//! flows meet. One worker serves one RX queue of both interfaces (a
//! [`QueuePort`]); it forwards the frames of flows it owns to the other
//! interface, and hands frames of flows another worker owns to that worker
//! over a lock-free ring ([`Crossbar`]), so both directions of a flow are
//! always handled by one worker.

use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    task::Wake,
    time::{Duration, Instant},
};

use crossbeam::{channel::Sender, queue::ArrayQueue};
use loupe_common::FlowKey;
use xsk_rs::FrameDesc;

mod idle;

pub use idle::IdlePolicy;
use idle::{Idle, Next};

use crate::{
    flow::{table::SideCount, FlowId, FlowLogEntry, FlowTable, MapOp, Observed, Sharder, Side},
    policy::PolicyCell,
    session::{Disposition, FrameSink, SessionSettings, Sessions},
    stats::{WorkerCounters, WorkerReport},
    wire::slice_tcp,
    xsk::{BuildError, QueuePort, MAX_FRAME_DESCS, PKT_CONTD},
};

/// Flows listed per worker in a stats report (the oldest ones; the report
/// also carries the count of all of them).
pub const FLOWS_LISTED: usize = 1024;
const BATCH: usize = 64;
/// Crossover buffers per worker, shared out over its inbound lanes, so
/// memory stays bounded as workers are added.
const CROSS_PER_WORKER: usize = 16_384;
const PUBLISH_EVERY_MS: u64 = 100;
const FLOW_LIST_EVERY_MS: u64 = 250;
const EXPIRE_EVERY_MS: u64 = 250;
/// Empty rounds in a row that make the wire quiet when the worker stops
/// (its resets out, what answers them handled).
const QUIET_ROUNDS_AT_STOP: u32 = 64;
/// Stopping: how long the resets and the frames answering them are
/// given, and the most rounds taken for what is left in the rings once
/// the program is detached.
const STOP_LINGER: Duration = Duration::from_millis(100);
const STOP_ROUNDS: usize = 1024;
/// Longest sleep: bounds how late the stop flag, stats and flow expiry are
/// seen by an idle worker. Frames and crossover wake it at once.
const POLL_TIMEOUT_MS: i32 = 10;

/// When the periodic work of a round is next due (worker clock, ms).
#[derive(Default)]
struct Schedule {
    publish: u64,
    expire: u64,
    flow_list: u64,
}

/// A frame that arrived at a worker that does not own its flow.
pub struct CrossFrame {
    /// Interface the frame arrived on.
    pub side: Side,
    pub key: FlowKey,
    pub data: Vec<u8>,
}

/// One single-producer single-consumer lane per ordered worker pair, plus a
/// lane back for the emptied buffers so steady state allocates nothing, and
/// a [`Waker`] per worker so crossover frames do not wait out a sleep.
pub struct Crossbar {
    workers: usize,
    lanes: Vec<ArrayQueue<CrossFrame>>,
    returns: Vec<ArrayQueue<Vec<u8>>>,
    wakers: Vec<Arc<Nudge>>,
    /// Stopping: workers through with their connections, and whether the
    /// engine has detached the program (no frame arrives any more).
    stopped: AtomicUsize,
    detached: AtomicBool,
}

impl Crossbar {
    pub fn new(workers: usize) -> std::io::Result<Self> {
        let n = workers * workers;
        let per_lane = (CROSS_PER_WORKER / workers.max(1)).clamp(256, 4096);
        Ok(Crossbar {
            workers,
            lanes: (0..n).map(|_| ArrayQueue::new(per_lane)).collect(),
            returns: (0..n).map(|_| ArrayQueue::new(per_lane)).collect(),
            wakers: (0..workers)
                .map(|_| Nudge::new().map(Arc::new))
                .collect::<Result<_, _>>()?,
            stopped: AtomicUsize::new(0),
            detached: AtomicBool::new(false),
        })
    }

    /// Every worker has stopped its connections (see `Worker::run`).
    pub fn all_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst) >= self.workers
    }

    /// The program is detached: the workers take what is left in their
    /// rings and return.
    pub fn set_detached(&self) {
        self.detached.store(true, Ordering::SeqCst);
        for w in &self.wakers {
            w.wake_if_sleeping();
        }
    }

    fn lane(&self, from: usize, to: usize) -> &ArrayQueue<CrossFrame> {
        &self.lanes[from * self.workers + to]
    }

    /// Buffers returned to `from` by `to`.
    fn returns(&self, from: usize, to: usize) -> &ArrayQueue<Vec<u8>> {
        &self.returns[from * self.workers + to]
    }

    fn inbound_pending(&self, to: usize) -> bool {
        (0..self.workers).any(|from| !self.lane(from, to).is_empty())
    }
}

/// Wakes a worker sleeping in poll(): an eventfd it polls, written only
/// when it has announced that it sleeps. Other workers nudge it for
/// crossover frames; the HSM signer nudges it (as a [`std::task::Waker`],
/// once per batch however many answers it carries) when signatures for
/// its parked connections are in.
///
/// Ordering (all SeqCst): the sleeper stores `sleeping`, then checks its
/// lanes and `hsm`; a sender pushes (or sets `hsm`), then loads
/// `sleeping`. Either the sleeper sees the work, or the sender sees the
/// flag and writes the eventfd.
pub struct Nudge {
    fd: OwnedFd,
    sleeping: AtomicBool,
    /// HSM answers arrived for this worker's parked connections.
    hsm: AtomicBool,
}

impl Wake for Nudge {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.hsm.store(true, Ordering::SeqCst);
        self.wake_if_sleeping();
    }
}

impl Nudge {
    fn new() -> std::io::Result<Nudge> {
        // SAFETY: eventfd(2) with valid flags; the fd is owned right below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Nudge {
            // SAFETY: a fresh fd nothing else owns.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            sleeping: AtomicBool::new(false),
            hsm: AtomicBool::new(false),
        })
    }

    fn wake_if_sleeping(&self) {
        if self.sleeping.load(Ordering::SeqCst) {
            let one = 1u64.to_ne_bytes();
            // SAFETY: 8-byte write to our eventfd; EAGAIN (counter full)
            // means a wake-up is already pending.
            unsafe { libc::write(self.fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        }
    }

    fn drain(&self) {
        let mut buf = [0u8; 8];
        // SAFETY: 8-byte read from our non-blocking eventfd.
        unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    }
}

/// How a worker's sessions reach the rest of the engine.
pub struct SplitLinks {
    /// Settings for its sessions (the policy comes from `policy`).
    pub settings: SessionSettings,
    /// Changes to the XDP flow map (the engine's thread owns the map).
    pub ops: Sender<MapOp>,
    /// Records for the flow log (none without a control socket).
    pub events: Option<Sender<FlowLogEntry>>,
    /// The running policy; the sessions start with the first one.
    pub policy: Arc<PolicyCell>,
}

/// What a worker shares with the engine thread.
#[derive(Default)]
pub struct WorkerShared {
    pub report: Mutex<WorkerReport>,
}

pub struct Worker {
    id: usize,
    port: QueuePort,
    sharder: Sharder,
    crossbar: Arc<Crossbar>,
    table: FlowTable,
    counters: WorkerCounters,
    shared: Arc<WorkerShared>,
    cpu: Option<usize>,
    epoch: Instant,
    /// Workers sent crossover frames in this iteration.
    kicked: Vec<bool>,
    /// Of the split frames a round tried to send, which went (reused).
    gone: Vec<bool>,
    /// Decisions and the tcp-split action, once there is a policy.
    sessions: Option<Sessions>,
    links: Option<SplitLinks>,
    /// The policy generation the sessions run.
    policy_seen: u64,
    /// How long after its last work the worker keeps polling its rings
    /// (yielding the CPU between rounds) before it sleeps in poll().
    idle_policy: IdlePolicy,
    /// The last round expired flows or published the report: its length
    /// says nothing of whether the worker shares its CPU.
    housekeeping: bool,
    /// Per side, a multi-buffer frame whose descriptors are still coming
    /// (a receive batch can end inside one).
    chains: [Chain; 2],
}

/// The descriptors of one multi-buffer frame, and its bytes gathered.
#[derive(Default)]
struct Chain {
    descs: Vec<FrameDesc>,
    bytes: Vec<u8>,
}

impl Worker {
    pub fn new(
        id: usize,
        port: QueuePort,
        sharder: Sharder,
        crossbar: Arc<Crossbar>,
        max_flows: usize,
        idle_timeout: Duration,
        shared: Arc<WorkerShared>,
    ) -> Self {
        let kicked = vec![false; crossbar.workers];
        Worker {
            id,
            port,
            sharder,
            crossbar,
            table: FlowTable::new(max_flows, idle_timeout.as_millis() as u64, 0),
            counters: WorkerCounters::default(),
            shared,
            cpu: None,
            epoch: Instant::now(),
            kicked,
            gone: Vec::new(),
            sessions: None,
            links: None,
            policy_seen: 0,
            idle_policy: IdlePolicy::default(),
            housekeeping: false,
            chains: Default::default(),
        }
    }

    /// How long to keep polling after the last work before sleeping: a
    /// frame that arrives meanwhile is taken without a wake-up (tens of µs
    /// on a virtual machine's idle CPU), at the cost of that CPU time (see
    /// [`idle`]).
    pub fn set_idle_policy(&mut self, policy: IdlePolicy) {
        self.idle_policy = policy;
    }

    /// Decides the steered connections this worker owns by the policy in
    /// `links` (from the first one published there on).
    pub fn enable_split(&mut self, links: SplitLinks) {
        self.links = Some(links);
        self.follow_policy();
    }

    /// Picks up a new policy between batches: connections not decided yet
    /// are decided by it; decided ones keep their decision.
    fn follow_policy(&mut self) {
        let Some(links) = &self.links else { return };
        let generation = links.policy.generation();
        if generation == self.policy_seen {
            return;
        }
        self.policy_seen = generation;
        let Some(policy) = links.policy.current() else {
            return;
        };
        match self.sessions.as_mut() {
            Some(sp) => sp.set_policy(policy),
            None => {
                let mut settings = links.settings.clone();
                settings.policy = policy;
                settings.waker = Some(std::task::Waker::from(
                    self.crossbar.wakers[self.id].clone(),
                ));
                self.sessions = Some(Sessions::new(settings));
            }
        }
    }

    pub fn set_cpu(&mut self, cpu: Option<usize>) {
        self.cpu = cpu;
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Run until `stop` is set, then stop the split connections (see
    /// [`Worker::stop_sessions`]); publishes a final report before returning.
    pub fn run(mut self, stop: &AtomicBool) {
        let mut rx = vec![FrameDesc::default(); BATCH];
        let mut idle = Idle::new(Instant::now());
        let mut next = Schedule::default();
        while !stop.load(Ordering::Relaxed) {
            let work = self.round(&mut rx, &mut next);
            self.idle_or_spin(work, &mut idle);
        }
        self.stop_sessions(&mut rx, &mut next);
        self.crossbar.stopped.fetch_add(1, Ordering::SeqCst);
        // Until the engine detaches the program frames still come: they
        // are handled (new connections' dropped, counted), not left in
        // the rings; then what reached the rings before the detach.
        while !self.crossbar.detached.load(Ordering::SeqCst) {
            let work = self.round(&mut rx, &mut next);
            self.idle_or_spin(work, &mut idle);
        }
        for _ in 0..STOP_ROUNDS {
            if self.round(&mut rx, &mut next) == 0 {
                break;
            }
        }
        self.publish(true, self.now_ms());
    }

    /// The engine is stopping. New connections are no longer taken; the
    /// connections under way get up to the drain deadline to finish
    /// (frames keep flowing both ways meanwhile); those still unfinished
    /// then are reset on both sides and logged as `engine-stopped`. The
    /// frames answering those resets are still handled for a moment (the
    /// program is detached only after the workers return).
    fn stop_sessions(&mut self, rx: &mut [FrameDesc], next: &mut Schedule) {
        let Some(sp) = self.sessions.as_mut() else {
            return;
        };
        sp.stop_taking();
        let deadline = Instant::now() + sp.drain();
        let mut idle = Idle::new(Instant::now());
        while Instant::now() < deadline
            && self.sessions.as_ref().is_some_and(|sp| sp.unfinished() > 0)
        {
            let work = self.round(rx, next);
            self.idle_or_spin(work, &mut idle);
        }
        if let Some(sp) = self.sessions.as_mut() {
            sp.stop_all(Instant::now());
        }
        // The resets out, and what answers them handled, until the wire is
        // quiet (or a bound: a peer that keeps sending is not waited for).
        let quiet_by = Instant::now() + STOP_LINGER;
        let mut quiet_rounds = 0;
        while Instant::now() < quiet_by && quiet_rounds < QUIET_ROUNDS_AT_STOP {
            let work = self.round(rx, next);
            if work == 0 && self.port.pending_tx() == 0 {
                quiet_rounds += 1;
            } else {
                quiet_rounds = 0;
            }
        }
    }

    fn idle_or_spin(&mut self, work: usize, idle: &mut Idle) {
        // Completions count as work: while TX drains, keep spinning;
        // if it stalls, sleep (poll also kicks copy-mode TX).
        let (backoffs, gave_way) = (idle.backoffs, idle.gave_way);
        if std::mem::take(&mut self.housekeeping) {
            idle.unmeasured();
        }
        match idle.after_round(work, Instant::now(), &self.idle_policy) {
            Next::Round => {}
            Next::Yield => {
                let began = Instant::now();
                std::thread::yield_now();
                idle.yielded(began, Instant::now());
            }
            Next::Sleep => {
                self.sleep_for_frames();
                idle.woke(Instant::now());
            }
            Next::GiveWay => {
                std::thread::yield_now();
                idle.gave_way(Instant::now());
            }
        }
        self.counters.idle_backoffs += idle.backoffs - backoffs;
        self.counters.gave_way += idle.gave_way - gave_way;
    }

    /// One round: frames in, crossbar, timers, frames out, and the
    /// periodic expiry and report. Returns the work done (0: idle).
    fn round(&mut self, rx: &mut [FrameDesc], next: &mut Schedule) -> usize {
        // One clock read per round, for frames, timers and expiry alike.
        let now = Instant::now();
        let now_ms = now.duration_since(self.epoch).as_millis() as u64;
        self.follow_policy();
        let mut work = self.port.reclaim();
        self.port.refill();
        if let Some(sp) = self.sessions.as_mut() {
            sp.begin_batch();
        }
        for side in [Side::Inside, Side::Outside] {
            let n = self.port.recv(side, rx);
            work += n;
            if let Some(first) = rx[..n].first() {
                self.port.prefetch(first);
            }
            for (i, desc) in rx[..n].iter().enumerate() {
                if let Some(next) = rx[..n].get(i + 1) {
                    self.port.prefetch(next);
                }
                self.on_desc(side, *desc, now, now_ms);
            }
        }
        work += self.drain_crossbar(now, now_ms);
        // Frames written straight into the port count as work, as those
        // `send_split` builds do.
        let queued = self.port.pending_tx();
        if let Some(sp) = self.sessions.as_mut() {
            // The split connections' frames go straight into free UMEM
            // frames; what the port refuses waits in `out` (send_split).
            sp.end_batch_into(now, Some(&mut self.port));
            if self.crossbar.wakers[self.id]
                .hsm
                .swap(false, Ordering::SeqCst)
            {
                sp.on_wake(now);
                work += 1;
            }
            sp.on_timers_into(now, Some(&mut self.port));
        }
        work += self.port.pending_tx().saturating_sub(queued);
        work += self.send_split();
        // Owners of crossed frames start on them while this one transmits.
        self.wake_owners();
        let sent = self.port.flush();
        add(&mut self.counters.tx_inside, sent[Side::Inside.index()]);
        add(&mut self.counters.tx_outside, sent[Side::Outside.index()]);
        // The frames are out: now the wake-ups of the threads that
        // carry out flow-map changes and records.
        self.hand_off();

        if now_ms >= next.expire || now_ms >= next.publish {
            self.housekeeping = true;
        }
        if now_ms >= next.expire {
            next.expire = now_ms + EXPIRE_EVERY_MS;
            self.table.expire(now_ms);
            if let Some(sp) = self.sessions.as_mut() {
                sp.expire(now);
            }
        }
        if now_ms >= next.publish {
            next.publish = now_ms + PUBLISH_EVERY_MS;
            let with_flows = now_ms >= next.flow_list;
            if with_flows {
                next.flow_list = now_ms + FLOW_LIST_EVERY_MS;
            }
            self.publish(with_flows, now_ms);
        }
        work
    }

    /// One received descriptor: a frame of its own, or part of a chain
    /// that is handled once its last descriptor is in.
    fn on_desc(&mut self, side: Side, desc: FrameDesc, now: Instant, now_ms: u64) {
        let chain = &mut self.chains[side.index()];
        let more = desc.options() & PKT_CONTD != 0;
        if chain.descs.is_empty() && !more {
            return self.on_frame(side, &[desc], &[], now, now_ms);
        }
        chain.descs.push(desc);
        chain.bytes.extend_from_slice(self.port.data(&desc));
        if more {
            return;
        }
        let descs = std::mem::take(&mut chain.descs);
        let bytes = std::mem::take(&mut chain.bytes);
        self.counters.rx_chained += 1;
        if descs.len() > MAX_FRAME_DESCS as usize {
            // Longer than the TX path takes (the MTU was raised after the
            // start): forwarded, it would be refused and its frames never
            // completed.
            self.counters.unsendable += 1;
            self.port.release_chain(&descs);
        } else {
            self.on_frame(side, &descs, &bytes, now, now_ms);
        }
        // The buffers are kept for the next chain.
        let (mut descs, mut bytes) = (descs, bytes);
        descs.clear();
        bytes.clear();
        self.chains[side.index()] = Chain { descs, bytes };
    }

    /// A whole received frame in its descriptors (one, or a chain whose
    /// bytes `gathered` holds).
    fn on_frame(
        &mut self,
        side: Side,
        descs: &[FrameDesc],
        gathered: &[u8],
        now: Instant,
        now_ms: u64,
    ) {
        let data = match descs {
            [one] => self.port.data(one),
            _ => gathered,
        };
        let len = data.len();
        let count = match side {
            Side::Inside => &mut self.counters.rx_inside,
            Side::Outside => &mut self.counters.rx_outside,
        };
        count.packets += 1;
        count.bytes += len as u64;
        let Some(sliced) = slice_tcp(data).ok() else {
            // Steered by XDP (TCP on steered ports, as it read the frame)
            // yet unparseable here, where the two parsers differ at the
            // edges. With sessions it is dropped: the engine cannot tell
            // what a receiver would take from it into a connection it
            // holds or splits. Without, it goes on as every frame does.
            self.counters.unparsed += 1;
            if self.sessions.is_some() {
                self.port.release_chain(descs);
            } else {
                self.port.send_chain(side.other(), descs);
            }
            return;
        };
        let key = sliced.key;
        let owner = self.sharder.owner(&FlowId::of(&key));
        if owner == self.id {
            // The sessions continue from this slicing (one per frame).
            let consumed = self
                .sessions
                .as_mut()
                .is_some_and(|sp| sp.on_sliced(side, data, &sliced, now) == Disposition::Consumed);
            self.observe(&key, side, len, now_ms);
            if consumed {
                self.port.release_chain(descs);
            } else {
                self.port.send_chain(side.other(), descs);
            }
            return;
        }
        let mut buf = self
            .crossbar
            .returns(self.id, owner)
            .pop()
            .unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(data);
        self.port.release_chain(descs);
        let msg = CrossFrame {
            side,
            key,
            data: buf,
        };
        if self.crossbar.lane(self.id, owner).push(msg).is_ok() {
            self.counters.cross_out += 1;
            self.kicked[owner] = true;
        } else {
            self.counters.cross_full += 1;
        }
    }

    fn observe(&mut self, key: &FlowKey, side: Side, len: usize, now_ms: u64) {
        match self.table.observe(key, side, len, now_ms) {
            Observed::Created => self.counters.flows_created += 1,
            Observed::TableFull => self.counters.flow_table_full += 1,
            Observed::Existing => {}
        }
    }

    fn drain_crossbar(&mut self, now: Instant, now_ms: u64) -> usize {
        let mut n = 0;
        for from in 0..self.sharder.workers() {
            if from == self.id {
                continue;
            }
            // At most a batch per lane, so a busy peer cannot keep this
            // worker from its own rings.
            for _ in 0..BATCH {
                let Some(msg) = self.crossbar.lane(from, self.id).pop() else {
                    break;
                };
                n += 1;
                self.counters.cross_in += 1;
                self.observe(&msg.key, msg.side, msg.data.len(), now_ms);
                let consumed = self.sessions.as_mut().is_some_and(|sp| {
                    sp.on_frame(msg.side, &msg.data, now) == Disposition::Consumed
                });
                if !consumed {
                    if let Err(e) = self.port.build_send(msg.side.other(), &msg.data) {
                        self.counters.not_built(e);
                    }
                }
                // Hand the buffer back; if its lane is full it is freed.
                let _ = self.crossbar.returns(from, self.id).push(msg.data);
            }
        }
        n
    }

    /// Sends the frames the split connections produced.
    fn send_split(&mut self) -> usize {
        let Some(sp) = self.sessions.as_mut() else {
            return 0;
        };
        let n = sp.out.len();
        // A side out of frames (none free, or its TX share held) keeps
        // its frames, in order, for the next round: dropping them would
        // cost the split connections a retransmission timeout each. The
        // other side's frames still go: a slow server must not hold up
        // what the client is sent.
        let mut gone = std::mem::take(&mut self.gone);
        let (port, counters) = (&mut self.port, &mut self.counters);
        send_each_side_in_order(&sp.out, &mut gone, |side, bytes| {
            match port.build_send(side, bytes) {
                Ok(parts) => {
                    if parts > 1 {
                        counters.tx_chained += 1;
                    }
                    true
                }
                Err(BuildError::NoFreeFrame) => {
                    counters.tx_deferred += 1;
                    false
                }
                // Never buildable: dropped, or it would hold up every
                // frame behind it for good.
                Err(e @ BuildError::Unsendable(_)) => {
                    counters.not_built(e);
                    true
                }
            }
        });
        sp.sent(&gone);
        self.gone = gone;
        n
    }

    /// Hands the flow-map changes and the records the split connections
    /// made to the threads that carry them out. Called once this round's
    /// frames are out: waking those threads (a futex each) can cost this
    /// one its CPU, and the frames are what a client waits for.
    fn hand_off(&mut self) {
        let (Some(sp), Some(links)) = (self.sessions.as_mut(), &self.links) else {
            return;
        };
        for op in sp.ops.drain(..) {
            // A full channel only means a released flow stays in
            // userspace (forwarded unchanged), or a pin is missed.
            if links.ops.try_send(op).is_ok() && matches!(op, MapOp::Bypass(_)) {
                sp.counters.released += 1;
            }
        }
        for e in sp.events.drain(..) {
            if let Some(tx) = &links.events {
                if tx.try_send(e).is_err() {
                    sp.counters.log_dropped += 1;
                }
            }
        }
    }

    fn wake_owners(&mut self) {
        for (owner, kicked) in self.kicked.iter_mut().enumerate() {
            if std::mem::take(kicked) {
                self.crossbar.wakers[owner].wake_if_sleeping();
            }
        }
    }

    fn publish(&mut self, with_flows: bool, now_ms: u64) {
        self.counters.tx_ring_full = self.port.tx_ring_full;
        self.counters.fill_starved = self.port.fill_starved;
        self.counters.flows_expired = self.table.expired;
        let flows = with_flows.then(|| {
            let sp = self.sessions.as_ref();
            self.table.snapshot(
                FLOWS_LISTED,
                now_ms,
                |k| sp.is_some_and(|sp| sp.opened(k)),
                |k| sp.and_then(|sp| sp.describe(k)),
            )
        });
        let xsk = self.port.kernel_stats();
        let report = WorkerReport {
            id: self.id,
            queue: self.port.queue(),
            cpu: self.cpu,
            counters: self.counters,
            xsk_inside: xsk[Side::Inside.index()],
            xsk_outside: xsk[Side::Outside.index()],
            flows_active: self.table.len(),
            tx_pending: self.port.pending_tx(),
            split: self.sessions.as_ref().map_or_else(Default::default, |sp| {
                let mut c = sp.counters;
                c.add(&sp.live());
                c
            }),
            flows: Vec::new(),
        };
        if let Ok(mut shared) = self.shared.report.lock() {
            let old_flows = std::mem::take(&mut shared.flows);
            *shared = report;
            shared.flows = flows.unwrap_or(old_flows);
        }
    }

    /// Block up to POLL_TIMEOUT_MS until a frame arrives on either socket
    /// or another worker hands over a frame.
    fn sleep_for_frames(&self) {
        let waker = &self.crossbar.wakers[self.id];
        waker.sleeping.store(true, Ordering::SeqCst);
        if !self.crossbar.inbound_pending(self.id) && !waker.hsm.load(Ordering::SeqCst) {
            let mut fds = [
                pollin(self.port.fd(Side::Inside)),
                pollin(self.port.fd(Side::Outside)),
                pollin(waker.fd.as_raw_fd()),
            ];
            // SAFETY: valid pollfd entries on fds this worker owns (its
            // sockets, its eventfd); poll only writes their revents.
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, POLL_TIMEOUT_MS) };
            if fds[2].revents != 0 {
                waker.drain();
            }
        }
        waker.sleeping.store(false, Ordering::SeqCst);
    }
}

/// The split connections write their frames straight into the port's
/// free frames (see [`QueuePort::build_send_with`]).
impl FrameSink for QueuePort {
    fn build(&mut self, side: Side, len: usize, fill: &mut dyn FnMut(&mut [u8])) -> bool {
        self.build_send_with(side, len, fill).is_ok()
    }
}

/// Offers `out`'s frames to `send` in order (false: that side has no
/// frame to take now) and says in `gone` which went. A side that could
/// not take one is offered nothing more this time, so each side's frames
/// stay in their order; the other side's still go.
fn send_each_side_in_order(
    out: &[(Side, Vec<u8>)],
    gone: &mut Vec<bool>,
    mut send: impl FnMut(Side, &[u8]) -> bool,
) {
    let mut blocked = [false; 2];
    gone.clear();
    for (side, bytes) in out {
        let went = !blocked[side.index()] && send(*side, bytes);
        blocked[side.index()] |= !went;
        gone.push(went);
    }
}

fn pollin(fd: i32) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

fn add(c: &mut SideCount, (packets, bytes): (u64, u64)) {
    c.packets += packets;
    c.bytes += bytes;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A side out of frames keeps its own frames in order; the other
    /// side's frames behind them still go.
    #[test]
    fn a_blocked_side_holds_back_only_its_own_frames() {
        let out: Vec<(Side, Vec<u8>)> = [
            (Side::Inside, 1),
            (Side::Outside, 2),
            (Side::Outside, 3),
            (Side::Inside, 4),
            (Side::Outside, 5),
            (Side::Inside, 6),
        ]
        .into_iter()
        .map(|(s, b)| (s, vec![b]))
        .collect();
        // The outside has room for one frame.
        let mut room = 1;
        let mut offered = Vec::new();
        let mut gone = vec![true; 9];
        send_each_side_in_order(&out, &mut gone, |side, bytes| {
            offered.push(bytes[0]);
            match side {
                Side::Inside => true,
                Side::Outside if room > 0 => {
                    room -= 1;
                    true
                }
                Side::Outside => false,
            }
        });
        assert_eq!(gone, [true, true, false, true, false, true]);
        // Nothing is offered past a refusal on its side.
        assert_eq!(offered, [1, 2, 3, 4, 6]);
    }
}
