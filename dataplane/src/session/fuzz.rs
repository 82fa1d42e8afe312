//! A split connection's life decoded from arbitrary bytes. [`segments`]
//! (the cargo-fuzz target in `fuzz/`, and a property test here on random
//! input in every test run) turns any input into a handshake whose SYNs
//! carry well-formed option lists (MSS, window scale up to 15, SACK
//! permitted, timestamps; any order, NOP padding, an EOL) that may differ
//! between the two sides, then segments from both endpoints that are
//! mostly in the window: new data, retransmissions, data ahead of a hole,
//! ACKs with SACK blocks of what really arrived, FINs; segments far out of
//! the window carrying junk; engine segments lost on their way; timers;
//! and now and then a hostile segment (options from raw bytes, any
//! sequence and acknowledgment number).
//!
//! Checked throughout: nothing panics or loops, the halves' buffers stay
//! bounded, every byte relayed to an endpoint is the byte the other
//! endpoint sent at that offset (never junk, never a byte not yet sent), a
//! FIN is relayed only at the end of the other's stream, no half
//! acknowledges what was not sent, segments fit their peer's MSS and carry
//! timestamps exactly when negotiated. Then both endpoints finish their
//! streams; unless a hostile segment was sent (it may rightly wreck the
//! connection: an in-window RST, a TSval far ahead), each must have
//! received exactly the other's stream and FIN.

use std::time::{Duration, Instant};

use super::split::Split;
use crate::stage::Stage;
use crate::tcp::{
    conn::{ConnConfig, State},
    sim::Rng,
    split::{Dir, Track, Tracker},
};
use crate::wire::{
    options::{TcpOptions, Timestamps},
    segment::{parse_segment, Flags, Segment},
    seq::SeqNum,
};

/// The halves' buffers (small, so that windows close and open).
const BUFFER: usize = 16 << 10;

/// Reads values from the input, or zero past its end.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn take(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }

    fn u8(&mut self) -> u8 {
        self.take(1).first().copied().unwrap_or(0)
    }

    fn u16(&mut self) -> u16 {
        u16::from(self.u8()) << 8 | u16::from(self.u8())
    }

    fn u32(&mut self) -> u32 {
        let b = self.take(4);
        let mut v = [0u8; 4];
        v[..b.len()].copy_from_slice(b);
        u32::from_le_bytes(v)
    }
}

/// `o` as option bytes laid out as `layout` says: the options in some
/// order, NOPs between them, maybe an EOL and zeros to a multiple of four
/// (at most 40 bytes, as in a TCP header).
fn encode(o: &TcpOptions, layout: &mut Input) -> Vec<u8> {
    let mut items: Vec<Vec<u8>> = Vec::new();
    if let Some(mss) = o.mss {
        let [a, b] = mss.to_be_bytes();
        items.push(vec![2, 4, a, b]);
    }
    if let Some(ws) = o.window_scale {
        items.push(vec![3, 3, ws]);
    }
    if o.sack_permitted {
        items.push(vec![4, 2]);
    }
    if let Some(ts) = o.timestamps {
        let mut t = vec![8, 10];
        t.extend_from_slice(&ts.val.to_be_bytes());
        t.extend_from_slice(&ts.ecr.to_be_bytes());
        items.push(t);
    }
    if !o.sack.is_empty() {
        let mut s = vec![5, 2 + 8 * o.sack.len() as u8];
        for (l, r) in &o.sack {
            s.extend_from_slice(&l.0.to_be_bytes());
            s.extend_from_slice(&r.0.to_be_bytes());
        }
        items.push(s);
    }
    if !items.is_empty() {
        let turn = usize::from(layout.u8()) % items.len();
        items.rotate_left(turn);
    }
    let mut left: usize = 40 - items.iter().map(Vec::len).sum::<usize>();
    let mut out = Vec::with_capacity(40);
    for item in items {
        let nops = (usize::from(layout.u8()) % 3).min(left);
        out.extend(std::iter::repeat_n(1, nops));
        left -= nops;
        out.extend(item);
    }
    if left > 0 && layout.u8() & 1 == 1 {
        out.push(0);
    }
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
    out
}

/// Options to `encode`, parsed back: the parser must give what was meant.
fn laid_out(o: TcpOptions, layout: &mut Input) -> TcpOptions {
    let bytes = encode(&o, layout);
    let back = TcpOptions::parse(&bytes);
    assert_eq!(back.as_ref(), Ok(&o), "options {bytes:?}");
    o
}

/// SYN options from the input: each option present or not, an MSS of at
/// least 88 (room for the timestamp option and 64 bytes), any shift up to
/// 15 (used as 14).
fn syn_options(input: &mut Input, tsval: u32, ecr: u32) -> TcpOptions {
    let f = input.u8();
    let mss = 88 + input.u16() % 9000;
    let ws = input.u8() % 16;
    TcpOptions {
        mss: (f & 1 != 0).then_some(mss),
        window_scale: (f & 2 != 0).then_some(ws),
        sack_permitted: f & 4 != 0,
        timestamps: (f & 8 != 0).then_some(Timestamps { val: tsval, ecr }),
        ..TcpOptions::default()
    }
}

/// One endpoint, as the input plays it.
struct End {
    /// Its ISN and the other endpoint's.
    isn: SeqNum,
    peer_isn: SeqNum,
    stream: Vec<u8>,
    /// Bytes of `stream` sent (the highest offset, in the window), and
    /// acknowledged by the engine.
    sent: usize,
    acked: usize,
    fin_sent: bool,
    fin_acked: bool,
    /// What the engine relayed to it, by offset in the other's stream.
    got: Vec<Option<u8>>,
    /// The in-order part of `got`.
    rcv: usize,
    fin_got: bool,
    /// Its receive buffer and window shift; the shift the engine's half
    /// facing it uses (the other endpoint's).
    buffer: u32,
    shift: u8,
    engine_shift: u8,
    /// The MSS it announced, and the most it sends in one segment (the
    /// other endpoint's MSS, less the timestamp option).
    mss: u16,
    send_mss: usize,
    /// Its TSval clock (from this value on) and the engine's latest.
    ts: Option<u32>,
    recent: u32,
    sack: bool,
    /// The right edge of the engine's window, over its own sequence numbers.
    edge: SeqNum,
    /// The engine's next segments toward it to lose.
    lose: u8,
}

impl End {
    fn seq(&self, off: usize) -> SeqNum {
        self.isn + 1 + off as u32
    }

    /// The stream offset of the right edge of the engine's window.
    fn edge_offset(&self) -> usize {
        self.edge.since(self.seq(0)).max(0) as usize
    }

    /// Where a segment from `off` of up to `size` bytes may end: what was
    /// sent may go again, new data only into the window; where it is
    /// shut, one byte of new data probes it, once. None: nothing to send.
    fn may_send(&self, off: usize, size: usize) -> Option<usize> {
        let len = self.stream.len();
        if off >= len {
            return None;
        }
        let limit = self.edge_offset().max(self.sent);
        let end = (off + size).min(len).min(limit);
        match end > off {
            true => Some(end),
            false => (off == self.sent && off == self.edge_offset()).then_some(off + 1),
        }
    }

    /// Where a segment without data goes: after the FIN once sent.
    fn next_seq(&self) -> SeqNum {
        self.seq(self.sent) + u32::from(self.fin_sent)
    }

    /// The acknowledgment it sends: what arrived in order, and the FIN.
    fn ack(&self) -> SeqNum {
        self.peer_isn + 1 + self.rcv as u32 + u32::from(self.fin_got)
    }

    /// A segment from this end at `off` carrying `payload`, with its ACK,
    /// window and options (SACK blocks of what arrived out of order).
    fn segment(
        &self,
        off: usize,
        payload: Vec<u8>,
        elapsed: Duration,
        layout: &mut Input,
    ) -> Segment {
        let window = (self.buffer >> self.shift).min(65535) as u16;
        let timestamps = self.ts.map(|base| Timestamps {
            val: base.wrapping_add(elapsed.as_millis() as u32),
            ecr: self.recent,
        });
        let mut sack = Vec::new();
        if self.sack {
            let mut i = self.rcv;
            while i < self.got.len() && sack.len() < 3 {
                if self.got[i].is_none() {
                    i += 1;
                    continue;
                }
                let start = i;
                while i < self.got.len() && self.got[i].is_some() {
                    i += 1;
                }
                let base = self.peer_isn + 1;
                sack.push((base + start as u32, base + i as u32));
            }
        }
        let options = TcpOptions {
            timestamps,
            sack,
            ..TcpOptions::default()
        };
        Segment {
            seq: self.seq(off),
            ack: self.ack(),
            flags: Flags {
                ack: true,
                psh: !payload.is_empty(),
                ..Flags::default()
            },
            window,
            options: laid_out(options, layout),
            payload,
        }
    }

    /// Takes a segment the engine sent it; `other` is what the other
    /// endpoint sent so far (its stream, and how far).
    fn receive(&mut self, seg: &Segment, other: (&[u8], usize, bool), hostile: bool) {
        let (stream, sent, fin_sent) = other;
        if seg.flags.rst {
            assert!(
                hostile,
                "the engine reset a connection nothing was wrong with: {seg:?}"
            );
            return;
        }
        assert_eq!(
            seg.options.timestamps.is_some(),
            self.ts.is_some(),
            "{seg:?}"
        );
        // Options (timestamps, SACK blocks) and payload within the MSS
        // (RFC 6691).
        let mut opts = Vec::new();
        seg.options.emit(&mut opts);
        assert!(
            seg.payload.len() + opts.len() <= usize::from(self.mss),
            "{seg:?}"
        );
        let off = i64::from(seg.seq.since(self.peer_isn + 1));
        if !seg.payload.is_empty() {
            let end = off + seg.payload.len() as i64;
            assert!(
                off >= 0 && end as usize <= sent,
                "relayed [{off}, {end}) of a stream sent up to {sent}"
            );
            let want = &stream[off as usize..end as usize];
            assert!(
                seg.payload == want,
                "relayed bytes at {off} differ from those sent"
            );
            for (i, b) in seg.payload.iter().enumerate() {
                self.got[off as usize + i].get_or_insert(*b);
            }
            while self.rcv < self.got.len() && self.got[self.rcv].is_some() {
                self.rcv += 1;
            }
        }
        if seg.flags.fin {
            let at = off + seg.payload.len() as i64;
            // (A hostile FIN in the window rightly ends the stream early.)
            assert!(
                hostile || (fin_sent && at == stream.len() as i64),
                "a FIN relayed at {at}, the stream is {} long, its FIN sent: {fin_sent}",
                stream.len()
            );
            if at >= 0 && self.rcv == at as usize {
                self.fin_got = true;
            }
        }
        if let (Some(t), Some(_)) = (seg.options.timestamps, self.ts) {
            if SeqNum(t.val).gt(SeqNum(self.recent)) {
                self.recent = t.val;
            }
        }
        if seg.flags.ack {
            let acked = i64::from(seg.ack.since(self.isn + 1));
            let most = self.sent as i64 + i64::from(self.fin_sent);
            assert!(
                hostile || acked <= most,
                "the engine acknowledged {acked} of {most} sent"
            );
            if acked > self.acked as i64 {
                self.acked = (acked as usize).min(self.sent);
                self.fin_acked |= self.fin_sent && acked == most;
            }
            let edge = seg.ack + (u32::from(seg.window) << self.engine_shift);
            if edge.gt(self.edge) {
                self.edge = edge;
            }
        }
    }

    /// Everything sent, acknowledged and received, both ways.
    fn finished(&self) -> bool {
        self.acked == self.stream.len()
            && self.fin_acked
            && self.rcv == self.got.len()
            && self.fin_got
    }
}

/// The connection: the split, both ends, the clock.
struct World {
    split: Split,
    ends: [End; 2],
    start: Instant,
    now: Instant,
    hostile: bool,
}

impl World {
    fn index(dir: Dir) -> usize {
        match dir {
            Dir::Client => 0,
            Dir::Server => 1,
        }
    }

    /// Sends `seg` from `dir`'s end, then delivers what the engine sends.
    fn send(&mut self, dir: Dir, seg: &Segment) {
        self.split.on_segment(dir, seg, self.now);
        self.deliver();
    }

    fn deliver(&mut self) {
        let mut out = 0;
        while let Some((dir, seg)) = self.split.poll_transmit(self.now) {
            out += 1;
            assert!(out < 100_000, "poll_transmit never runs dry");
            let i = Self::index(dir);
            let [a, b] = &mut self.ends;
            let (to, from) = if i == 0 { (a, &*b) } else { (b, &*a) };
            if to.lose > 0 {
                to.lose -= 1;
                continue;
            }
            to.receive(&seg, (&from.stream, from.sent, from.fin_sent), self.hostile);
        }
        let (c, s) = (&self.split.client, &self.split.server);
        assert!(c.readable() + c.reorder_held() <= BUFFER);
        assert!(s.readable() + s.reorder_held() <= BUFFER);
        assert!(c.send_buffered() <= BUFFER && s.send_buffered() <= BUFFER);
    }

    fn timer(&mut self, by: Duration) {
        self.now += by;
        self.split.on_timer(self.now);
        self.deliver();
    }

    /// Data from `dir`'s end: new, again, ahead of a hole, or far outside
    /// the window (junk). New data goes only into the window the engine
    /// offered; where it is shut, one byte of new data probes it (RFC 9293
    /// §3.8.6.1), as a sender does.
    fn data(&mut self, dir: Dir, input: &mut Input) {
        let e = &self.ends[Self::index(dir)];
        let kind = input.u8();
        let size = usize::from(input.u16()) % (e.send_mss + 1);
        let elapsed = self.now - self.start;
        if kind >= 248 {
            // Far beyond any window the engine offers: never relayed.
            let off = e.acked + (1 << 20) + usize::from(input.u16());
            let seg = e.segment(off, vec![0xa5; size.max(1)], elapsed, input);
            return self.send(dir, &seg);
        }
        let off = match kind {
            0..=159 => e.sent,
            160..=207 => e.acked + usize::from(input.u16()) % (e.sent - e.acked + 1),
            _ => e.sent + usize::from(input.u16()) % (4 * e.send_mss),
        };
        let Some(end) = e.may_send(off, size.max(1)) else {
            return self.ack(dir, input);
        };
        let seg = e.segment(off, e.stream[off..end].to_vec(), elapsed, input);
        let e = &mut self.ends[Self::index(dir)];
        e.sent = e.sent.max(end);
        self.send(dir, &seg);
    }

    fn ack(&mut self, dir: Dir, input: &mut Input) {
        let e = &self.ends[Self::index(dir)];
        let mut seg = e.segment(e.sent, Vec::new(), self.now - self.start, input);
        seg.seq = e.next_seq();
        self.send(dir, &seg);
    }

    /// The FIN, once everything was sent, in the window (or probing it).
    fn fin(&mut self, dir: Dir, input: &mut Input) {
        let e = &mut self.ends[Self::index(dir)];
        if e.sent < e.stream.len() {
            return self.data(dir, input);
        }
        if e.stream.len() > e.edge_offset() {
            return self.ack(dir, input);
        }
        e.fin_sent = true;
        let mut seg = e.segment(e.stream.len(), Vec::new(), self.now - self.start, input);
        seg.flags.fin = true;
        self.send(dir, &seg);
    }

    /// A segment whose options come from raw bytes and whose numbers are
    /// anything near the connection's; no payload, no SYN or RST.
    fn hostile(&mut self, dir: Dir, input: &mut Input) {
        self.hostile = true;
        let e = &self.ends[Self::index(dir)];
        let n = usize::from(input.u8() % 41);
        let options = TcpOptions::parse(input.take(n)).unwrap_or_default();
        let seg = Segment {
            seq: e.next_seq() + (input.u32() % 0x40000).wrapping_sub(0x20000),
            ack: e.ack() + (input.u32() % 0x40000).wrapping_sub(0x20000),
            flags: Flags {
                ack: true,
                fin: input.u8() & 1 == 1,
                ..Flags::default()
            },
            window: input.u16(),
            options,
            payload: Vec::new(),
        };
        self.send(dir, &seg);
    }

    /// Both ends send what is left from the first byte not acknowledged
    /// (again what was sent, new data into the window, a probe where it is
    /// shut), then their FINs, and acknowledge what they got; time goes on
    /// between rounds. True once both have finished.
    fn finish(&mut self) -> bool {
        let mut layout = Input(&[]);
        for _ in 0..4000 {
            for dir in [Dir::Client, Dir::Server] {
                let i = Self::index(dir);
                let elapsed = self.now - self.start;
                let mut off = self.ends[i].acked;
                while let Some(end) = self.ends[i].may_send(off, self.ends[i].send_mss) {
                    let e = &self.ends[i];
                    let seg = e.segment(off, e.stream[off..end].to_vec(), elapsed, &mut layout);
                    self.ends[i].sent = self.ends[i].sent.max(end);
                    self.send(dir, &seg);
                    off = end;
                }
                let e = &mut self.ends[i];
                if e.acked == e.stream.len() && !e.fin_acked {
                    e.fin_sent = true;
                    let mut seg = e.segment(e.stream.len(), Vec::new(), elapsed, &mut layout);
                    seg.flags.fin = true;
                    self.send(dir, &seg);
                }
                let e = &self.ends[i];
                let mut ack = e.segment(e.sent, Vec::new(), elapsed, &mut layout);
                ack.seq = e.next_seq();
                self.send(dir, &ack);
            }
            if self.ends.iter().all(End::finished) {
                return true;
            }
            self.timer(Duration::from_millis(50));
        }
        false
    }
}

/// Drives a split connection through the life `data` describes (see the
/// module note).
pub fn segments(data: &[u8]) {
    // Whole frames first: the parser must refuse or accept cleanly.
    let _ = parse_segment(data);
    let mut input = Input(data);
    let start = Instant::now();
    let cfg = ConnConfig {
        send_buffer: BUFFER,
        recv_buffer: BUFFER,
        history: 4 << 10,
        ..ConnConfig::default()
    };
    let (c_isn, s_isn) = (SeqNum(input.u32()), SeqNum(input.u32()));
    let (c_ts, s_ts) = (input.u32(), input.u32());
    let c = laid_out(syn_options(&mut input, c_ts, 0), &mut input);
    let s = laid_out(syn_options(&mut input, s_ts, c_ts), &mut input);
    // What the SYNs settled (RFC 7323 §2.2, §2.3, §3.2; RFC 2018; RFC
    // 9293 §3.7.1), from each side.
    let scaling = c.window_scale.is_some() && s.window_scale.is_some();
    let shift = |o: &TcpOptions| o.window_scale.filter(|_| scaling).map_or(0, |w| w.min(14));
    let ts = c.timestamps.is_some() && s.timestamps.is_some();
    let sack = c.sack_permitted && s.sack_permitted;
    let mss = |o: &TcpOptions| o.mss.unwrap_or(536);
    // Receive buffers of at least one unit of the window: a window that
    // rounds down to nothing for good is a reader that never reads.
    let buffers = [1 << 10, 16 << 10, 64 << 10, 1 << 20];
    let mut buffer = |o: &TcpOptions| buffers[usize::from(input.u8() % 4)].max(1 << shift(o));
    let (c_buf, s_buf) = (buffer(&c), buffer(&s));
    let mut rng = Rng::new(u64::from(input.u32()));
    let mut stream = |n: usize| -> Vec<u8> { (0..n).map(|_| rng.next_u64() as u8).collect() };
    let (up, down) = (
        stream(usize::from(input.u16()) % 40_000),
        stream(usize::from(input.u16()) % 40_000),
    );

    let mut tracker = Tracker::new(cfg);
    let mk =
        |seq: SeqNum, ack: Option<SeqNum>, syn: bool, window: u32, options: TcpOptions| Segment {
            seq,
            ack: ack.unwrap_or_default(),
            flags: Flags {
                syn,
                ack: ack.is_some(),
                ..Flags::default()
            },
            window: window.min(65535) as u16,
            options,
            payload: Vec::new(),
        };
    let c_ack_ts = ts.then_some(Timestamps {
        val: c_ts.wrapping_add(1),
        ecr: s_ts,
    });
    let handshake = [
        (Dir::Client, mk(c_isn, None, true, c_buf, c.clone())),
        (
            Dir::Server,
            mk(s_isn, Some(c_isn + 1), true, s_buf, s.clone()),
        ),
        (
            Dir::Client,
            mk(
                c_isn + 1,
                Some(s_isn + 1),
                false,
                c_buf >> shift(&c),
                TcpOptions {
                    timestamps: c_ack_ts,
                    ..TcpOptions::default()
                },
            ),
        ),
    ];
    for (dir, seg) in &handshake {
        assert_eq!(tracker.on_segment(*dir, seg), Track::Forward, "{seg:?}");
    }
    let halves = tracker
        .split(start, None)
        .expect("an established handshake splits");
    let end = |isn: SeqNum, peer_isn: SeqNum, stream: Vec<u8>, other_len: usize| End {
        isn,
        peer_isn,
        stream,
        sent: 0,
        acked: 0,
        fin_sent: false,
        fin_acked: false,
        got: vec![None; other_len],
        rcv: 0,
        fin_got: false,
        buffer: 0,
        shift: 0,
        engine_shift: 0,
        mss: 0,
        send_mss: 0,
        ts: None,
        recent: 0,
        sack,
        edge: isn + 1,
        lose: 0,
    };
    let ts_len = if ts { 12 } else { 0 };
    let client = End {
        buffer: c_buf,
        shift: shift(&c),
        engine_shift: shift(&s),
        mss: mss(&c),
        send_mss: usize::from(mss(&s)) - ts_len,
        ts: ts.then_some(c_ts.wrapping_add(2)),
        recent: s_ts,
        // The server's SYN-ACK window (never scaled), over the client's
        // own sequence numbers.
        edge: c_isn + 1 + s_buf.min(65535),
        ..end(c_isn, s_isn, up.clone(), down.len())
    };
    let server = End {
        buffer: s_buf,
        shift: shift(&s),
        engine_shift: shift(&c),
        mss: mss(&s),
        send_mss: usize::from(mss(&c)) - ts_len,
        ts: ts.then_some(s_ts.wrapping_add(1)),
        recent: c_ts.wrapping_add(1),
        // The window of the client's ACK, over the server's numbers.
        edge: s_isn + 1 + ((c_buf >> shift(&c)).min(65535) << shift(&c)),
        ..end(s_isn, c_isn, down, up.len())
    };
    let mut world = World {
        split: Split::new(halves, Stage::Relay),
        ends: [client, server],
        start,
        now: start,
        hostile: false,
    };
    for _ in 0..256 {
        if input.0.is_empty() {
            break;
        }
        let op = input.u8();
        let dir = if op & 1 == 0 {
            Dir::Client
        } else {
            Dir::Server
        };
        match op >> 1 {
            0..=59 => world.data(dir, &mut input),
            60..=79 => world.ack(dir, &mut input),
            80..=89 => world.fin(dir, &mut input),
            90..=109 => {
                // Time passes; the whole run stays well inside the
                // timeouts (FIN-WAIT-2, retransmissions given up) that
                // would end a connection rightly.
                if world.now - start < Duration::from_secs(25) {
                    world.timer(Duration::from_millis(10 * u64::from(input.u8() % 32)));
                }
            }
            110..=121 => world.ends[World::index(dir)].lose = input.u8() % 4,
            // Rarely: most runs must finish for the end-to-end check.
            123 if input.u8() < 64 => world.hostile(dir, &mut input),
            _ => world.data(dir, &mut input),
        }
    }
    let finished = world.finish();
    if !world.hostile {
        let [c, s] = &world.ends;
        assert!(
            finished,
            "not finished: client sent {}/{} acked {} fin {}/{}, got {}/{} fin {}; server sent {}/{} \
             acked {} fin {}/{}, got {}/{} fin {}; halves {:?} {:?}",
            c.sent,
            c.stream.len(),
            c.acked,
            c.fin_sent,
            c.fin_acked,
            c.rcv,
            c.got.len(),
            c.fin_got,
            s.sent,
            s.stream.len(),
            s.acked,
            s.fin_sent,
            s.fin_acked,
            s.rcv,
            s.got.len(),
            s.fin_got,
            world.split.client,
            world.split.server
        );
        let (c, s) = (&world.split.client, &world.split.server);
        assert_eq!((c.aborted(), s.aborted()), (None, None));
        assert!(
            [c.state(), s.state()].iter().all(|st| matches!(
                st,
                State::TimeWait | State::Closed | State::LastAck | State::Closing
            )),
            "{c:?} {s:?}"
        );
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn every_relayed_byte_is_the_byte_sent_and_all_of_them_arrive(
            data in proptest::collection::vec(any::<u8>(), 0..4096)
        ) {
            super::segments(&data);
        }
    }
}
