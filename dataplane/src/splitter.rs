//! The tcp-split action on one worker: a handshake tracker for each new
//! steered connection, then the split connection (two TCP halves and the
//! relay between them) once the handshake is done, their timers, and the
//! frames they send. The worker hands every frame of a steered flow it owns
//! here first; what is not consumed it forwards unchanged.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap},
    time::{Duration, Instant},
};

use loupe_common::FlowKey;

use crate::{
    flow::{FlowId, Side},
    stats::SplitCounters,
    tcp::{
        conn::{Abort, ConnConfig},
        split::{Dir, Passthrough, Split, Track, Tracker},
    },
    wire::segment::{parse_segment, Parsed, SegmentError, Template},
};

/// What became of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// Not ours (or passed through): forward it unchanged.
    Forward,
    /// Taken by a split connection (or dropped as bad): do not forward.
    Consumed,
}

enum Entry {
    Tracking {
        tracker: Tracker,
        /// The side the SYN came from.
        client: Side,
        templates: [Option<Template>; 2],
    },
    Split {
        split: Box<Split>,
        client: Side,
        /// Frames sent by the endpoint on each side, as templates.
        templates: [Template; 2],
        armed: Option<Instant>,
    },
    Passthrough,
    /// A split connection that ended: late segments of it (retransmitted
    /// ACKs, a RST racing ours) are dropped, not forwarded, until idle.
    Ended,
}

struct Flow {
    entry: Entry,
    last_seen: Instant,
}

/// Split connections of one worker.
pub struct Splitter {
    flows: HashMap<FlowId, Flow>,
    timers: BinaryHeap<Reverse<(Instant, FlowId)>>,
    conn: ConnConfig,
    max_flows: usize,
    idle: Duration,
    /// Frames to send: (out of which interface, bytes).
    pub out: Vec<(Side, Vec<u8>)>,
    /// Connections released to the XDP fast path: the worker installs
    /// them as `bypass` in the flow map (both directions).
    pub release: Vec<FlowKey>,
    spare: Vec<Vec<u8>>,
    pub counters: SplitCounters,
}

impl Splitter {
    pub fn new(max_flows: usize, idle: Duration) -> Splitter {
        Splitter {
            flows: HashMap::new(),
            timers: BinaryHeap::new(),
            conn: ConnConfig {
                send_buffer: 128 << 10,
                recv_buffer: 128 << 10,
                ..ConnConfig::default()
            },
            max_flows,
            idle,
            out: Vec::new(),
            release: Vec::new(),
            spare: Vec::new(),
            counters: SplitCounters::default(),
        }
    }

    /// Connections tracked, split or recently ended.
    pub fn active(&self) -> usize {
        self.flows.len()
    }

    /// A steered frame of a flow this worker owns.
    pub fn on_frame(&mut self, side: Side, frame: &[u8], now: Instant) -> Disposition {
        let parsed = match parse_segment(frame) {
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
                .is_some_and(|f| matches!(f.entry, Entry::Passthrough | Entry::Ended))
        {
            self.flows.remove(&id);
        }
        if !self.flows.contains_key(&id) {
            if self.flows.len() >= self.max_flows {
                self.counters.table_full += 1;
                return Disposition::Forward;
            }
            let entry = if is_syn {
                Entry::Tracking {
                    tracker: Tracker::new(self.conn.clone()),
                    client: side,
                    templates: [None, None],
                }
            } else {
                // A flow already running when the engine started (or one
                // whose state expired): leave it alone, in the kernel.
                self.counters.passthrough += 1;
                self.release.push(parsed.key);
                Entry::Passthrough
            };
            self.flows.insert(
                id,
                Flow {
                    entry,
                    last_seen: now,
                },
            );
        }
        let flow = self.flows.get_mut(&id).expect("inserted above");
        flow.last_seen = now;
        let split_client = match &flow.entry {
            Entry::Passthrough => return Disposition::Forward,
            Entry::Ended => {
                self.counters.after_close += 1;
                return Disposition::Consumed;
            }
            Entry::Tracking { .. } => None,
            Entry::Split { client, .. } => Some(*client),
        };
        match split_client {
            None => self.track(id, side, frame, parsed, now),
            Some(client) => {
                let dir = if side == client {
                    Dir::Client
                } else {
                    Dir::Server
                };
                self.with_split(id, now, |s| s.on_segment(dir, &parsed.segment, now));
                Disposition::Consumed
            }
        }
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
        let Some(Flow {
            entry:
                Entry::Tracking {
                    tracker,
                    client,
                    templates,
                },
            ..
        }) = self.flows.get_mut(&id)
        else {
            return Disposition::Forward;
        };
        let dir = if side == *client {
            Dir::Client
        } else {
            Dir::Server
        };
        templates[side.index()].get_or_insert_with(|| p.template(frame));
        let track = tracker.on_segment(dir, &p.segment, now);
        let (halves, consume) = match track {
            Track::Forward => return Disposition::Forward,
            Track::Pass(why) => {
                self.counters.passthrough += 1;
                if why == Passthrough::FastOpen {
                    self.counters.fast_open += 1;
                }
                self.release.push(p.key);
                self.flows.get_mut(&id).expect("present").entry = Entry::Passthrough;
                return Disposition::Forward;
            }
            Track::SplitAfter(h) => (h, false),
            Track::SplitWith(h) => (h, true),
        };
        let client = *client;
        let [Some(a), Some(b)] = templates.clone() else {
            // Both directions have been seen by now (SYN, SYN-ACK).
            self.counters.passthrough += 1;
            self.flows.get_mut(&id).expect("present").entry = Entry::Passthrough;
            return Disposition::Forward;
        };
        self.counters.split += 1;
        self.flows.get_mut(&id).expect("present").entry = Entry::Split {
            split: Box::new(Split::new(*halves)),
            client,
            templates: [a, b],
            armed: None,
        };
        if consume {
            self.with_split(id, now, |s| s.on_segment(Dir::Client, &p.segment, now));
            Disposition::Consumed
        } else {
            // The client's handshake ACK goes on to the server as it is.
            Disposition::Forward
        }
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
        if split.done() {
            absorb(&mut self.counters, split);
            flow.entry = Entry::Ended;
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
            let due = match self.flows.get_mut(&id) {
                Some(Flow {
                    entry: Entry::Split { armed, .. },
                    ..
                }) if *armed == Some(at) => {
                    *armed = None;
                    true
                }
                _ => false,
            };
            if due {
                self.with_split(id, now, |s| s.on_timer(now));
            }
        }
    }

    /// Forgets trackers and pass-through entries idle longer than the idle
    /// timeout (split connections end through their own timers).
    pub fn expire(&mut self, now: Instant) {
        let idle = self.idle;
        let before = self.flows.len();
        // Ended connections are remembered a little longer than a peer's
        // retransmissions last.
        self.flows.retain(|_, f| match f.entry {
            Entry::Split { .. } => true,
            Entry::Ended => now.duration_since(f.last_seen) < idle.min(Duration::from_secs(60)),
            _ => now.duration_since(f.last_seen) < idle,
        });
        self.counters.expired += (before - self.flows.len()) as u64;
    }

    /// Takes back a buffer the worker has copied out.
    pub fn recycle(&mut self, buf: Vec<u8>) {
        if self.spare.len() < 256 {
            self.spare.push(buf);
        }
    }

    /// Split connections right now, and bytes relayed by those still open.
    pub fn live(&self) -> (u64, u64, u64) {
        let mut n = 0;
        let (mut c2s, mut s2c) = (0, 0);
        for f in self.flows.values() {
            if let Entry::Split { split, .. } = &f.entry {
                n += 1;
                let (a, b) = split.relayed();
                c2s += a;
                s2c += b;
            }
        }
        (n, c2s, s2c)
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
