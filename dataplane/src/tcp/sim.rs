//! A deterministic network simulation for the TCP module: two [`Conn`]
//! endpoints joined by a link with seeded loss, duplication, reordering,
//! delay and corruption, on a virtual clock. No kernel, no sockets, no
//! sleeping: a transfer that takes seconds of virtual time runs in
//! milliseconds, and a seed reproduces it exactly.

use std::time::{Duration, Instant};

use super::conn::{Conn, ConnConfig, Handshake, State};
use crate::wire::{segment::Segment, seq::SeqNum};

/// SplitMix64: small, fast, and the same sequence on every machine.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }

    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
}

/// One direction of the link.
#[derive(Clone, Copy, Debug)]
pub struct LinkConfig {
    pub delay: Duration,
    /// Uniform extra delay in [0, jitter).
    pub jitter: Duration,
    pub loss: f64,
    pub duplicate: f64,
    /// Probability of an extra delay of several segment times (reorder).
    pub reorder: f64,
    /// Probability of a corrupted segment (dropped by the checksum).
    pub corrupt: f64,
}

impl LinkConfig {
    pub fn clean() -> LinkConfig {
        LinkConfig {
            delay: Duration::from_millis(5),
            jitter: Duration::ZERO,
            loss: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
            corrupt: 0.0,
        }
    }

    pub fn lossy(loss: f64, reorder: f64, duplicate: f64) -> LinkConfig {
        LinkConfig {
            loss,
            reorder,
            duplicate,
            jitter: Duration::from_micros(500),
            ..LinkConfig::clean()
        }
    }
}

/// What the link did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    pub sent: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub reordered: u64,
    pub corrupted: u64,
}

struct InFlight {
    at: Instant,
    order: u64,
    seg: Segment,
}

/// One direction of a link: segments in flight with their arrival times.
pub(crate) struct Link {
    cfg: LinkConfig,
    queue: Vec<InFlight>,
    order: u64,
    pub(crate) stats: LinkStats,
}

impl Link {
    pub(crate) fn new(cfg: LinkConfig) -> Link {
        Link {
            cfg,
            queue: Vec::new(),
            order: 0,
            stats: LinkStats::default(),
        }
    }

    pub(crate) fn send(&mut self, seg: Segment, now: Instant, rng: &mut Rng) {
        self.stats.sent += 1;
        if rng.chance(self.cfg.loss) {
            self.stats.lost += 1;
            return;
        }
        if rng.chance(self.cfg.corrupt) {
            // The wire layer's checksum check drops it.
            self.stats.corrupted += 1;
            return;
        }
        let copies = if rng.chance(self.cfg.duplicate) {
            self.stats.duplicated += 1;
            2
        } else {
            1
        };
        for _ in 0..copies {
            let mut d = self.cfg.delay;
            if !self.cfg.jitter.is_zero() {
                d += Duration::from_nanos(rng.below(self.cfg.jitter.as_nanos() as u64));
            }
            if rng.chance(self.cfg.reorder) {
                self.stats.reordered += 1;
                d += Duration::from_millis(1 + rng.below(5));
            }
            self.order += 1;
            self.queue.push(InFlight {
                at: now + d,
                order: self.order,
                seg: seg.clone(),
            });
        }
    }

    pub(crate) fn next_at(&self) -> Option<Instant> {
        self.queue.iter().map(|f| f.at).min()
    }

    /// Segments due at `now`, in arrival order.
    pub(crate) fn due(&mut self, now: Instant) -> Vec<Segment> {
        let mut due: Vec<InFlight> = Vec::new();
        let mut i = 0;
        while i < self.queue.len() {
            if self.queue[i].at <= now {
                due.push(self.queue.swap_remove(i));
            } else {
                i += 1;
            }
        }
        due.sort_by_key(|f| (f.at, f.order));
        due.into_iter().map(|f| f.seg).collect()
    }
}

/// One endpoint's application: what it sends, what it got, when it reads.
pub(crate) struct App {
    pub(crate) to_send: Vec<u8>,
    written: usize,
    pub(crate) got: Vec<u8>,
    /// Do not read before this time (a stalled reader).
    read_from: Option<Instant>,
    /// Close once everything is written, without waiting for the peer.
    close_early: bool,
    closed: bool,
    max_send_buffered: usize,
    max_readable: usize,
}

impl App {
    /// Writes `to_send`, reads everything at once; closes once written,
    /// at once (`close_early`) or after the peer's FIN.
    pub(crate) fn new(to_send: Vec<u8>, close_early: bool) -> App {
        App {
            to_send,
            written: 0,
            got: Vec::new(),
            read_from: None,
            close_early,
            closed: false,
            max_send_buffered: 0,
            max_readable: 0,
        }
    }

    pub(crate) fn run(&mut self, c: &mut Conn, now: Instant) {
        if self.written < self.to_send.len() {
            self.written += c.write(&self.to_send[self.written..]);
        }
        if self.read_from.is_none_or(|t| now >= t) {
            self.got.extend(c.read(usize::MAX));
        }
        let done_writing = self.written == self.to_send.len();
        if !self.closed && done_writing && (self.close_early || c.peer_finished()) {
            c.close();
            self.closed = true;
        }
        self.max_send_buffered = self.max_send_buffered.max(c.send_buffered());
        self.max_readable = self.max_readable.max(c.readable() + c.reorder_held());
    }
}

/// A scenario: data each way, link behaviour, seed.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub seed: u64,
    pub a_to_b: usize,
    pub b_to_a: usize,
    pub link: LinkConfig,
    pub conn: ConnConfig,
    /// B reads nothing for this long (zero window toward A).
    pub b_stall: Duration,
    /// Both sides close as soon as they have written (simultaneous close).
    pub both_close_early: bool,
    /// Give up after this much virtual time.
    pub limit: Duration,
}

impl Scenario {
    pub fn new(seed: u64, a_to_b: usize, b_to_a: usize, link: LinkConfig) -> Scenario {
        Scenario {
            seed,
            a_to_b,
            b_to_a,
            link,
            conn: ConnConfig::default(),
            b_stall: Duration::ZERO,
            both_close_early: false,
            limit: Duration::from_secs(600),
        }
    }
}

/// The outcome of a run.
#[derive(Debug)]
pub struct Outcome {
    pub a_got: Vec<u8>,
    pub b_got: Vec<u8>,
    pub a_sent: Vec<u8>,
    pub b_sent: Vec<u8>,
    pub a: Conn,
    pub b: Conn,
    pub a_to_b: LinkStats,
    pub b_to_a: LinkStats,
    pub elapsed: Duration,
    pub a_max_send_buffered: usize,
    pub b_max_readable: usize,
}

impl Outcome {
    /// Every byte arrived, in order, unchanged, both ways.
    pub fn byte_exact(&self) -> bool {
        self.a_got == self.b_sent && self.b_got == self.a_sent
    }
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("state", &self.state())
            .field("aborted", &self.aborted())
            .field("stats", &self.stats())
            .finish()
    }
}

pub(crate) fn payload(rng: &mut Rng, n: usize) -> Vec<u8> {
    (0..n).map(|_| rng.next_u64() as u8).collect()
}

/// The handshake both sides agreed on, from A's and from B's side.
pub fn handshakes(rng: &mut Rng) -> (Handshake, Handshake) {
    let (ia, ib) = (SeqNum(rng.next_u64() as u32), SeqNum(rng.next_u64() as u32));
    let (ta, tb) = (rng.next_u64() as u32, rng.next_u64() as u32);
    let a = Handshake {
        local_isn: ia,
        remote_isn: ib,
        peer_mss: 1460,
        wscale: Some((7, 7)),
        timestamps: Some((tb, ta)),
        sack_permitted: true,
        peer_window: 512 << 7,
    };
    let b = Handshake {
        local_isn: ib,
        remote_isn: ia,
        timestamps: Some((ta, tb)),
        ..a.clone()
    };
    (a, b)
}

/// Every segment's options and payload fit the MSS the peer announced
/// (which counts no options: RFC 6691), or the frame would exceed the
/// link's MTU.
fn fits(s: &Segment, peer_mss: u16) {
    let mut options = Vec::new();
    s.options.emit(&mut options);
    assert!(
        s.payload.len() + options.len() <= usize::from(peer_mss),
        "{} payload bytes and {} of options ({:?}) exceed the peer's MSS {peer_mss}",
        s.payload.len(),
        options.len(),
        s.options
    );
}

/// Runs a scenario to the end (both sides closed) or the time limit.
pub fn run(sc: &Scenario) -> Outcome {
    let mut rng = Rng::new(sc.seed);
    let start = Instant::now();
    let mut now = start;
    let (ha, hb) = handshakes(&mut rng);
    let mut a = Conn::new(&ha, sc.conn.clone(), now);
    let mut b = Conn::new(&hb, sc.conn.clone(), now);
    let mut app_a = App::new(payload(&mut rng, sc.a_to_b), true);
    let mut app_b = App {
        read_from: (!sc.b_stall.is_zero()).then(|| start + sc.b_stall),
        ..App::new(payload(&mut rng, sc.b_to_a), sc.both_close_early)
    };
    let mut ab = Link::new(sc.link);
    let mut ba = Link::new(sc.link);
    loop {
        app_a.run(&mut a, now);
        app_b.run(&mut b, now);
        while let Some(s) = a.poll_transmit(now) {
            fits(&s, ha.peer_mss);
            ab.send(s, now, &mut rng);
        }
        while let Some(s) = b.poll_transmit(now) {
            fits(&s, hb.peer_mss);
            ba.send(s, now, &mut rng);
        }
        let done = a.state() == State::Closed && b.state() == State::Closed;
        if done || now - start > sc.limit {
            break;
        }
        let next = [
            a.next_deadline(),
            b.next_deadline(),
            ab.next_at(),
            ba.next_at(),
            app_b.read_from.filter(|&t| t > now),
        ]
        .into_iter()
        .flatten()
        .min();
        let Some(next) = next else { break };
        now = now.max(next);
        for s in ab.due(now) {
            b.on_segment(&s, now);
        }
        for s in ba.due(now) {
            a.on_segment(&s, now);
        }
        a.on_timer(now);
        b.on_timer(now);
    }
    Outcome {
        a_got: app_a.got,
        b_got: app_b.got,
        a_sent: app_a.to_send,
        b_sent: app_b.to_send,
        a_max_send_buffered: app_a.max_send_buffered,
        b_max_readable: app_b.max_readable,
        a,
        b,
        a_to_b: ab.stats,
        b_to_a: ba.stats,
        elapsed: now - start,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{
        tcp::{
            budget::MemoryBudget,
            conn::{Abort, OOW_ACK_BURST, OOW_ACK_INTERVAL},
        },
        wire::{options::TcpOptions, segment::Flags},
    };

    fn check(o: &Outcome) {
        assert!(
            o.byte_exact(),
            "a got {}/{} b got {}/{} after {:?}: a {:?} b {:?} links {:?} {:?}",
            o.a_got.len(),
            o.b_sent.len(),
            o.b_got.len(),
            o.a_sent.len(),
            o.elapsed,
            o.a,
            o.b,
            o.a_to_b,
            o.b_to_a
        );
        assert_eq!((o.a.state(), o.b.state()), (State::Closed, State::Closed));
        assert_eq!((o.a.aborted(), o.b.aborted()), (None, None));
        // Fast retransmissions are counted as they go out, never more
        // than the retransmissions.
        for c in [&o.a, &o.b] {
            let st = c.stats();
            assert!(st.fast_retransmits <= st.retransmits, "{st:?}");
        }
    }

    #[test]
    fn a_clean_link_carries_a_mebibyte_each_way() {
        let o = run(&Scenario::new(1, 1 << 20, 1 << 20, LinkConfig::clean()));
        check(&o);
        assert_eq!(o.a.stats().retransmits + o.b.stats().retransmits, 0);
        assert_eq!(o.a.stats().rto_expirations + o.b.stats().rto_expirations, 0);
    }

    /// Both directions carry data over a lossy, reordering link: the SACK
    /// and DSACK blocks ride on data segments too (RFC 2018 §4), whose
    /// payload shrinks to leave them room (`run` checks every segment
    /// against the MSS).
    #[test]
    fn sacks_ride_on_data_segments_which_shrink_to_fit_them() {
        let mut sc = Scenario::new(53, 4 << 20, 4 << 20, LinkConfig::lossy(0.02, 0.02, 0.01));
        sc.conn.dsack = true;
        let o = run(&sc);
        check(&o);
        let (a, b) = (o.a.stats(), o.b.stats());
        assert!(a.sacks_on_data > 0 && b.sacks_on_data > 0, "{a:?} {b:?}");
        assert!(a.dsacks_out > 0 && b.dsacks_out > 0, "{a:?} {b:?}");
    }

    /// While the sender holds a SACK block of its own, a retransmission
    /// goes out at the size its bytes first had, without blocks that do
    /// not fit (cut to fit, its tail would be a second segment), and new
    /// data is shortened to carry the block.
    #[test]
    fn a_retransmission_keeps_its_size_and_new_data_makes_room_for_blocks() {
        let (mut a, mut b, now) = established(29);
        let mss = 1448; // 1460 less the timestamps
        a.write(&[3; 1448]);
        let lost = a.poll_transmit(now).expect("a's segment");
        assert_eq!(lost.payload.len(), mss);
        // b's first segment to a is lost, its second held above a hole.
        b.write(&[4; 2 * 1448]);
        let _first = b.poll_transmit(now).expect("b's first");
        let second = b.poll_transmit(now).expect("b's second");
        a.on_segment(&second, now);
        let dupack = a.poll_transmit(now).expect("a's duplicate ACK");
        assert!(dupack.payload.is_empty() && dupack.options.sack.len() == 1);
        // a's retransmission timer brings the lost segment back whole.
        let mut resent = None;
        for _ in 0..10 {
            let t = a.next_deadline().expect("a timer");
            a.on_timer(t);
            while let Some(s) = a.poll_transmit(t) {
                if s.seq == lost.seq && !s.payload.is_empty() {
                    resent = Some((s, t));
                }
            }
            if resent.is_some() {
                break;
            }
        }
        let (re, t) = resent.expect("a retransmission");
        assert_eq!(re.payload.len(), mss, "{re:?}");
        assert!(
            re.options.sack.is_empty(),
            "no room beside 1448 bytes: {re:?}"
        );
        b.on_segment(&re, t);
        // b's ACK reaches a, but none of b's resent bytes: a keeps its
        // hole and its block (b's ACK rides on its resend, which a gets
        // as a bare ACK at the same sequence number).
        let mut t = t;
        while a.snd_una() != re.seq + mss as u32 {
            t += Duration::from_millis(50);
            b.on_timer(t);
            while let Some(s) = b.poll_transmit(t) {
                let bare = Segment {
                    payload: Vec::new(),
                    ..s
                };
                a.on_segment(&bare, t);
            }
            assert!(t < now + Duration::from_secs(30), "b never acknowledged");
        }
        // New data: shortened by the option (4 bytes and 8 a block).
        a.write(&[5; 3000]);
        let next = a.poll_transmit(t).expect("new data");
        assert_eq!(next.payload.len(), mss - 12, "{next:?}");
        assert_eq!(next.options.sack.len(), 1, "{next:?}");
        assert_eq!(a.stats().sacks_on_data, 1);
    }

    #[test]
    fn loss_reordering_and_duplication_never_corrupt_the_stream() {
        let mut total = LinkStats::default();
        for seed in 0..24 {
            let link = LinkConfig {
                corrupt: 0.005,
                ..LinkConfig::lossy(0.02, 0.02, 0.01)
            };
            let o = run(&Scenario::new(seed, 300_000, 200_000, link));
            check(&o);
            for l in [o.a_to_b, o.b_to_a] {
                total.sent += l.sent;
                total.lost += l.lost;
                total.reordered += l.reordered;
                total.duplicated += l.duplicated;
                total.corrupted += l.corrupted;
            }
        }
        // The impairments really happened, at about their rates.
        assert!(total.lost * 100 > total.sent, "{total:?}");
        assert!(
            total.reordered * 100 > total.sent && total.duplicated * 200 > total.sent,
            "{total:?}"
        );
        assert!(total.corrupted > 0, "{total:?}");
    }

    #[test]
    fn heavy_loss_still_completes_with_retransmissions() {
        let o = run(&Scenario::new(
            7,
            200_000,
            10_000,
            LinkConfig::lossy(0.15, 0.05, 0.02),
        ));
        check(&o);
        assert!(o.a.stats().retransmits > 0 || o.a.stats().rto_expirations > 0);
    }

    #[test]
    fn a_stalled_reader_throttles_the_sender_through_the_window() {
        let mut sc = Scenario::new(3, 4 << 20, 0, LinkConfig::clean());
        sc.conn.send_buffer = 128 << 10;
        sc.conn.recv_buffer = 64 << 10;
        // Receive autotuning on: a reader that takes nothing grows
        // nothing (once it reads again, the window may grow).
        sc.conn.recv_buffer_max = 2 << 20;
        sc.b_stall = Duration::from_secs(60);
        let o = run(&sc);
        check(&o);
        // The sender probed the zero window instead of giving up, and
        // neither side's memory grew past its initial buffers.
        assert!(o.a.stats().zero_window_probes > 0, "{:?}", o.a.stats());
        assert!(o.a_max_send_buffered <= 128 << 10);
        assert!(o.b_max_readable <= 64 << 10, "{}", o.b_max_readable);
        assert!(o.elapsed >= Duration::from_secs(60));
    }

    /// Zero-window probes to a reader that answers each with its window
    /// still shut go out at intervals that about double, as the RFC 9293
    /// §3.8.6.1 timer backs off: the timeout for the probe's byte (backed
    /// off) and the persist timer (from the estimate) take turns, and must
    /// not back off on top of each other (a probe saw 0.2 s, 1 s, then
    /// 6.8 s between probes; here 0.6, 1.2, 2.4, 4.8 s ... up to 120 s).
    /// And the sender never gives up on a reader that answers: a review
    /// found the timeout left armed between probes, firing without a
    /// probe's answer to show the reader alive, and the connection
    /// aborted after about ten minutes.
    #[test]
    fn zero_window_probes_back_off_evenly() {
        let (mut a, mut b, t0) = established(14);
        // b never reads: its buffer fills and its window shuts.
        a.write(&vec![3u8; 1 << 20]);
        let mut now = t0;
        let mut probes = Vec::new();
        while now - t0 < Duration::from_secs(30 * 60) {
            exchange_refusing_probes(&mut a, &mut b, now, |_| probes.push(now - t0));
            let next = [a.next_deadline(), b.next_deadline()]
                .into_iter()
                .flatten()
                .min()
                .expect("a timer runs");
            now = next.max(now);
            a.on_timer(now);
        }
        assert_eq!(a.state(), State::Established);
        assert_eq!(a.aborted(), None);
        assert!(probes.len() >= 20, "{probes:?}");
        let gaps: Vec<Duration> = probes.windows(2).map(|w| w[1] - w[0]).collect();
        for g in gaps.windows(2) {
            let ratio = g[1].as_secs_f64() / g[0].as_secs_f64();
            assert!(
                (1.4..=3.0).contains(&ratio) || g[1] >= crate::tcp::rtt::RTO_MAX,
                "{gaps:?}"
            );
        }
        // Probing goes on to the end, at most two capped timers apart.
        let last = *probes.last().unwrap();
        assert!(last >= Duration::from_secs(30 * 60 - 130), "{gaps:?}");
        assert!(
            gaps.iter()
                .all(|g| *g <= 2 * crate::tcp::rtt::RTO_MAX + Duration::from_secs(1)),
            "{gaps:?}"
        );
    }

    /// A reader that paused with its window shut and then reads again
    /// opens the window with a plain ACK (the probe byte it refused still
    /// unacknowledged): the sender sends at once, full segments, with the
    /// window it had. An outside probe found the sender waiting for its
    /// next backed-off probe (4.9 s and 11.7 s stalls) because the probe
    /// byte stayed in flight and sender SWS avoidance then refused every
    /// segment short of a full one.
    #[test]
    fn a_window_that_opens_after_refused_probes_is_used_at_once() {
        // Less than a segment, as a Linux reader with SO_RCVBUF 2048
        // offers (724 bytes): the window never takes a full segment.
        let fixed = ConnConfig {
            recv_buffer: 1000,
            recv_buffer_max: 1000,
            ..ConnConfig::default()
        };
        let (data, _) = refused_probes_then_reopened(15, fixed);
        assert!(!data.is_empty(), "nothing sent on the window update");
        assert!(data.iter().any(|&n| n > 500), "{data:?}");
    }

    /// A refused probe's timeout is no sign of congestion (RFC 9293
    /// §3.8.6.1 keeps probing out of it; Linux's probe timer leaves the
    /// window alone), nor are the duplicate ACKs that refuse probes:
    /// when the reader's window opens again, the sender sends the
    /// congestion window it had when the window shut, at once. It used to
    /// take the congestion window down to one segment at every probe's
    /// timeout, as a loss does, and to ramp up again from there.
    #[test]
    fn refused_probes_leave_the_congestion_window_alone() {
        let roomy = ConnConfig {
            recv_buffer: 256 << 10,
            recv_buffer_max: 256 << 10,
            ..ConnConfig::default()
        };
        let (data, cwnd) = refused_probes_then_reopened(16, roomy);
        let sent: usize = data.iter().sum();
        assert!(cwnd >= 4 * 1448, "{cwnd}");
        assert!(sent + 1448 > cwnd as usize, "{cwnd} {data:?}");
    }

    /// Moves segments both ways at `now` until neither side has more,
    /// except that b refuses each zero-window probe (a byte at its
    /// RCV.NXT alone), as Linux refuses a byte past a shut window: an ACK
    /// that takes nothing. `on_probe` sees the sender at each probe.
    fn exchange_refusing_probes(
        a: &mut Conn,
        b: &mut Conn,
        now: Instant,
        mut on_probe: impl FnMut(&Conn),
    ) {
        let mut moved = true;
        while moved {
            moved = false;
            while let Some(s) = a.poll_transmit(now) {
                if s.payload.len() == 1 && b.rcv_nxt() == s.seq {
                    on_probe(a);
                    b.ack_now();
                } else {
                    b.on_segment(&s, now);
                }
                moved = true;
            }
            b.on_timer(now);
            while let Some(ack) = b.poll_transmit(now) {
                a.on_segment(&ack, now);
                moved = true;
            }
        }
    }

    /// Runs a sender into a reader configured with `b_cfg` that reads
    /// nothing for 10 s (refusing every probe byte, as Linux refuses a
    /// byte past a shut window), then reads everything: the payload
    /// sizes the sender sends in answer to the window update, and its
    /// congestion window when the first probe went out.
    fn refused_probes_then_reopened(seed: u64, b_cfg: ConnConfig) -> (Vec<usize>, u32) {
        let (mut a, mut b, mut now) = warmed_up_pair(seed, b_cfg, 900, 50);
        let t0 = now;
        let mut probes = 0;
        let mut cwnd = None;
        let mut on_probe = |a: &Conn| {
            probes += 1;
            cwnd.get_or_insert(a.cwnd_for_tests());
        };
        while now - t0 < Duration::from_secs(10) {
            if a.send_space() > 0 {
                a.write(&[3u8; 4 << 10]);
            }
            exchange_refusing_probes(&mut a, &mut b, now, &mut on_probe);
            // Nothing out and nothing waiting: more to write first.
            let Some(t) = a.next_deadline() else { continue };
            // b's delayed ACK first, if it is due sooner.
            now = b.next_deadline().map_or(t, |u| t.min(u)).max(now);
            a.on_timer(now);
        }
        exchange_refusing_probes(&mut a, &mut b, now, &mut on_probe);
        assert!(probes >= 4, "{probes} probes");
        assert_eq!(a.state(), State::Established);
        // b reads everything: its window update goes out, and a answers.
        now += Duration::from_millis(1);
        assert!(!b.read(usize::MAX).is_empty());
        let mut out = Vec::new();
        while let Some(ack) = b.poll_transmit(now) {
            a.on_segment(&ack, now);
            out.extend(std::iter::from_fn(|| a.poll_transmit(now)));
        }
        let cwnd = cwnd.expect("a probe went out");
        (out.iter().map(|s| s.payload.len()).collect(), cwnd)
    }

    #[test]
    fn simultaneous_close_ends_cleanly() {
        let mut sc = Scenario::new(5, 10_000, 10_000, LinkConfig::clean());
        sc.both_close_early = true;
        check(&run(&sc));
    }

    /// Autotuning: on a link whose bandwidth-delay product is far above
    /// the initial buffers, the sender's send buffer and the receiver's
    /// window grow (within the maxima and the budget), and the transfer
    /// takes a fraction of the round trips it takes at the initial sizes.
    /// The budget gets back every byte when the connections go.
    #[test]
    fn buffers_grow_with_the_bandwidth_delay_product_within_the_budget() {
        let fixed = ConnConfig {
            send_buffer: 64 << 10,
            recv_buffer: 64 << 10,
            send_buffer_max: 64 << 10,
            recv_buffer_max: 64 << 10,
            // The run ends when both are closed: not 10 s later.
            time_wait: Duration::from_millis(1),
            ..ConnConfig::default()
        };
        let budget = Arc::new(MemoryBudget::new(3 << 20));
        let tuned = ConnConfig {
            send_buffer_max: 2 << 20,
            recv_buffer_max: 2 << 20,
            budget: Some(budget.clone()),
            ..fixed.clone()
        };
        let mut sc = Scenario::new(41, 16 << 20, 0, LinkConfig::clean());
        sc.conn = fixed;
        let slow = run(&sc);
        check(&slow);
        assert_eq!(slow.a.buffer_sizes(), (64 << 10, 64 << 10));
        sc.conn = tuned;
        let fast = run(&sc);
        check(&fast);
        let (a_send, _) = fast.a.buffer_sizes();
        let (_, b_recv) = fast.b.buffer_sizes();
        assert!(a_send > 1 << 20 && b_recv > 1 << 20, "{a_send} {b_recv}");
        assert!(a_send <= 2 << 20 && b_recv <= 2 << 20);
        assert!(budget.used() <= 3 << 20);
        assert!(
            fast.elapsed * 4 < slow.elapsed,
            "{:?} vs {:?}",
            fast.elapsed,
            slow.elapsed
        );
        // Each side's growth came from the budget; the 3 MiB ran out
        // before both reached 2 MiB, and what was refused is counted.
        assert!(budget.refused() > 0);
        assert_eq!(
            budget.used(),
            a_send + b_recv + fast.a.buffer_sizes().1 + fast.b.buffer_sizes().0 - 4 * (64 << 10)
        );
        // Idle, the send buffer's growth goes back at once; the receive
        // buffer's only under memory pressure (its window shrinks).
        let mut fast = fast;
        let used = budget.used();
        fast.a.trim(false);
        assert_eq!(fast.a.buffer_sizes().0, 64 << 10);
        assert_eq!(budget.used(), used - (a_send - (64 << 10)));
        fast.b.trim(false);
        assert_eq!(fast.b.buffer_sizes().1, b_recv);
        fast.b.trim(true);
        assert_eq!(fast.b.buffer_sizes().1, 64 << 10);
        assert_eq!(budget.used(), 0);
        drop(fast);
        assert_eq!(budget.used(), 0);
    }

    /// A link that reorders but never loses: the receiver DSACKs the
    /// retransmissions reordering provoked, the sender takes back those
    /// reductions and raises its duplicate-ACK threshold, so later
    /// reordering provokes fewer; every byte still arrives once, in order.
    #[test]
    fn reordering_alone_costs_reductions_that_dsacks_undo() {
        let link = LinkConfig {
            reorder: 0.03,
            ..LinkConfig::lossy(0.0, 0.0, 0.0)
        };
        let mut sc = Scenario::new(47, 8 << 20, 0, link);
        sc.conn.dsack = true;
        let o = run(&sc);
        check(&o);
        let (a, b) = (o.a.stats(), o.b.stats());
        assert!(o.a_to_b.reordered > 100, "{:?}", o.a_to_b);
        assert!(a.fast_retransmits > 0, "{a:?}");
        assert!(b.dsacks_out > 0 && a.dsacks_in > 0, "{a:?} {b:?}");
        assert!(a.spurious_undone > 0, "{a:?}");
        assert!(o.a.dupthresh() > 3);
        // Reordering stopped provoking retransmissions: with a fixed
        // threshold of three there were more than one per reordering.
        assert!(
            a.retransmits * 4 < o.a_to_b.reordered,
            "{} retransmissions for {} reordered segments",
            a.retransmits,
            o.a_to_b.reordered
        );
    }

    /// On a long path with rare losses, CUBIC climbs back to the window
    /// a loss cut in seconds, whatever the round trip, where NewReno
    /// needs a round trip per segment: 64 MiB over 100 ms with 0.02 %
    /// loss take NewReno about 65 s of virtual time and CUBIC about 45.
    /// At a short round trip it is Reno-friendly: no slower than NewReno.
    #[test]
    fn cubic_regains_a_long_paths_window_sooner_than_newreno() {
        use crate::tcp::cc::Algorithm;
        let transfer = |delay: u64, loss: f64, congestion: Algorithm| {
            let link = LinkConfig {
                delay: Duration::from_millis(delay),
                jitter: Duration::ZERO,
                ..LinkConfig::lossy(loss, 0.0, 0.0)
            };
            let mut sc = Scenario::new(61, 64 << 20, 0, link);
            sc.conn.send_buffer = 16 << 20;
            sc.conn.recv_buffer = 16 << 20;
            sc.conn.congestion = congestion;
            let o = run(&sc);
            check(&o);
            assert!(o.a_to_b.lost > 5, "{:?}", o.a_to_b);
            o.elapsed
        };
        let reno = transfer(50, 0.0002, Algorithm::NewReno);
        let cubic = transfer(50, 0.0002, Algorithm::Cubic);
        assert!(cubic * 13 < reno * 10, "CUBIC {cubic:?}, NewReno {reno:?}");
        let reno = transfer(5, 0.001, Algorithm::NewReno);
        let cubic = transfer(5, 0.001, Algorithm::Cubic);
        assert!(cubic <= reno, "CUBIC {cubic:?}, NewReno {reno:?}");
    }

    /// A peer cannot grow the engine's send buffer without taking data:
    /// a flood of duplicate ACKs inflates the window in recovery, and a
    /// partial ACK then finds the window large, but nothing grows then.
    #[test]
    fn duplicate_acks_in_recovery_grow_no_send_buffer() {
        let mut rng = Rng::new(53);
        let (ha, hb) = handshakes(&mut rng);
        let now = Instant::now();
        let cfg = ConnConfig {
            send_buffer: 64 << 10,
            send_buffer_max: 4 << 20,
            ..ConnConfig::default()
        };
        let mut a = Conn::new(&ha, cfg, now);
        let mut b = Conn::new(&hb, ConnConfig::default(), now);
        assert_eq!(a.write(&vec![1; 1 << 20]), 64 << 10);
        let mut flight = Vec::new();
        while let Some(s) = a.poll_transmit(now) {
            flight.push(s);
        }
        assert!(flight.len() >= 3);
        b.ack_now();
        let template = b.poll_transmit(now).expect("an ACK");
        let una = template.ack;
        let dup = |sacked: &Segment| Segment {
            window: u16::MAX,
            options: TcpOptions {
                sack: vec![(sacked.seq, sacked.seq + sacked.payload.len() as u32)],
                ..template.options.clone()
            },
            ..template.clone()
        };
        for _ in 0..2000 {
            a.on_segment(&dup(&flight[2]), now);
        }
        assert!(a.cc_in_recovery_for_tests());
        let partial = Segment {
            ack: una + flight[0].payload.len() as u32,
            ..dup(&flight[2])
        };
        a.on_segment(&partial, now);
        assert_eq!(a.buffer_sizes().0, 64 << 10);
    }

    fn established(seed: u64) -> (Conn, Conn, Instant) {
        let mut rng = Rng::new(seed);
        let (ha, hb) = handshakes(&mut rng);
        let now = Instant::now();
        (
            Conn::new(&ha, ConnConfig::default(), now),
            Conn::new(&hb, ConnConfig::default(), now),
            now,
        )
    }

    #[test]
    fn fin_wait_2_gives_up_on_a_peer_that_never_closes() {
        let (mut a, mut b, now) = established(9);
        a.close();
        deliver(&mut a, &mut b, now); // our FIN
        deliver(&mut b, &mut a, now); // its ACK, no FIN
        assert_eq!(a.state(), State::FinWait2);
        let limit = ConnConfig::default().fin_wait2;
        let at = a.next_deadline().expect("a FIN-WAIT-2 timer");
        assert_eq!(at, now + limit);
        a.on_timer(now + limit / 2);
        assert_eq!(a.state(), State::FinWait2);
        a.on_timer(at);
        assert_eq!(
            (a.state(), a.aborted()),
            (State::Closed, Some(Abort::TimedOut))
        );
        // The peer is told.
        let rst = a.poll_transmit(at).expect("a RST");
        assert!(rst.flags.rst);
        assert!(a.poll_transmit(at).is_none());
    }

    #[test]
    fn fin_wait_2_waits_while_the_peer_still_sends() {
        let (mut a, mut b, now) = established(10);
        a.close();
        deliver(&mut a, &mut b, now);
        deliver(&mut b, &mut a, now);
        assert_eq!(a.state(), State::FinWait2);
        let limit = ConnConfig::default().fin_wait2;
        // 50 s later the peer sends more: the wait starts again.
        let later = now + limit - Duration::from_secs(10);
        assert_eq!(b.write(b"still talking"), 13);
        deliver(&mut b, &mut a, later);
        a.on_timer(now + limit);
        assert_eq!(a.state(), State::FinWait2);
        a.on_timer(later + limit - Duration::from_secs(1));
        assert_eq!(a.state(), State::FinWait2);
        a.on_timer(later + limit);
        assert_eq!(a.state(), State::Closed);
    }

    /// Two established ends after a clean 300 KB transfer from a to b,
    /// which opened a's congestion window past 60 segments.
    fn warmed_up(seed: u64) -> (Conn, Conn, Instant) {
        warmed_up_rtt(seed, Duration::ZERO)
    }

    /// `s` reaches b, which ACKs it at once; what a sends on that ACK.
    fn answered(a: &mut Conn, b: &mut Conn, s: &Segment, now: Instant) -> Vec<Segment> {
        let mut out = Vec::new();
        b.on_segment(s, now);
        b.ack_now();
        while let Some(ack) = b.poll_transmit(now) {
            a.on_segment(&ack, now);
            out.extend(std::iter::from_fn(|| a.poll_transmit(now)));
        }
        out
    }

    fn deliver(from: &mut Conn, to: &mut Conn, now: Instant) -> usize {
        let mut n = 0;
        while let Some(s) = from.poll_transmit(now) {
            to.on_segment(&s, now);
            n += 1;
        }
        n
    }

    /// A payload lent from the send buffer is the stream's next bytes,
    /// also where it lies in two pieces across the buffer's wrap: frames
    /// are built from the lent pieces, so a wrong range or piece order
    /// would corrupt the stream.
    #[test]
    fn lent_payloads_are_the_stream_across_the_buffer_wrap() {
        let (mut a, mut b, now) = established(31);
        let stream: Vec<u8> = (0..400_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let (mut put, mut got, mut wrapped) = (0, Vec::new(), 0);
        while got.len() < stream.len() {
            // Uneven writes, so the buffer's head and tail move apart.
            let end = (put + 7_777).min(stream.len());
            put += a.write(&stream[put..end]);
            while let Some(mut seg) = a.poll_transmit_lent(now) {
                assert!(seg.payload.is_empty());
                let (x, y) = a.lent();
                wrapped += usize::from(!x.is_empty() && !y.is_empty());
                seg.payload = [x, y].concat();
                b.on_segment(&seg, now);
            }
            got.extend(b.read(usize::MAX));
            deliver(&mut b, &mut a, now);
        }
        assert!(got == stream, "the stream arrived changed");
        assert!(wrapped > 0, "no payload crossed the wrap");
    }

    /// A receiver that acknowledges a whole flight with one ACK (as one
    /// behind GRO does): slow start still doubles the flight each round
    /// trip, by counting the bytes acknowledged. One segment per ACK
    /// would add one segment per round trip.
    #[test]
    fn slow_start_doubles_the_flight_behind_one_ack_per_round_trip() {
        let (mut a, mut b, mut now) = established(23);
        a.write(&[7; 120_000]);
        let mut flights = Vec::new();
        for _ in 0..4 {
            let mut sent = 0;
            while let Some(s) = a.poll_transmit(now) {
                sent += s.payload.len();
                b.on_segment(&s, now);
            }
            b.read(usize::MAX);
            // Only b's newest ACK reaches a.
            let mut last = None;
            while let Some(ack) = b.poll_transmit(now) {
                last = Some(ack);
            }
            if last.is_none() {
                b.ack_now();
                last = b.poll_transmit(now);
            }
            a.on_segment(&last.expect("an ACK"), now);
            flights.push(sent);
            now += Duration::from_millis(1);
        }
        for w in flights.windows(2) {
            assert!(w[1] >= 2 * w[0], "flights {flights:?}");
        }
    }

    /// The halves count the data segments they take and the pure ACKs
    /// they send (the ACK ratio the benchmarks report).
    #[test]
    fn data_segments_in_and_pure_acks_out_are_counted() {
        let (mut a, mut b, now) = established(29);
        a.write(&[3; 10_000]);
        let data = deliver(&mut a, &mut b, now);
        b.read(usize::MAX);
        b.ack_now();
        let acks = deliver(&mut b, &mut a, now);
        assert!(data > 1 && acks >= 1, "{data} {acks}");
        let (sa, sb) = (a.stats(), b.stats());
        assert_eq!((sb.data_in, sb.pure_acks_out), (data as u64, acks as u64));
        assert_eq!((sa.data_in, sa.pure_acks_out), (0, 0));
    }

    #[test]
    fn acks_that_sack_new_data_count_as_duplicates_even_as_the_window_moves() {
        let (mut a, mut b, now) = established(17);
        a.write(&[1; 20_000]);
        let mut queue: std::collections::VecDeque<Segment> =
            std::iter::from_fn(|| a.poll_transmit(now)).collect();
        // The initial window: 3 segments of 1460 bytes (RFC 5681's 4380).
        assert_eq!(queue.len(), 3);
        // The first segment is lost. Each later one draws an ACK that SACKs
        // it, and the reader opens the window a little each time (as Linux
        // does); limited transmit sends a new segment for each of the first
        // two, whose ACKs bring the third duplicate.
        let lost = queue.pop_front().unwrap();
        let mut acks = 0;
        while let Some(s) = queue.pop_front() {
            b.on_segment(&s, now);
            let mut ack = b.poll_transmit(now).expect("ACK");
            assert!(!ack.options.sack.is_empty());
            acks += 1;
            ack.window = ack.window.wrapping_add(acks);
            a.on_segment(&ack, now);
            queue.extend(std::iter::from_fn(|| a.poll_transmit(now)));
            if a.stats().fast_retransmits > 0 {
                break;
            }
        }
        assert_eq!(
            (acks, a.stats().fast_retransmits),
            (3, 1),
            "{:?}",
            a.stats()
        );
        assert!(queue.iter().any(|s| s.seq == lost.seq), "{queue:?}");
    }

    #[test]
    fn a_lost_retransmission_is_sent_again_without_waiting_for_the_timeout() {
        let (mut a, mut b, now) = established(19);
        // Moves `data` from a to b, dropping the first `drops` data
        // segments that start at `lost`; returns how many were dropped.
        let exchange = |a: &mut Conn, b: &mut Conn, data: &[u8], lost: Option<SeqNum>| {
            let mut written = a.write(data);
            let mut dropped = 0;
            for _ in 0..1000 {
                let mut progressed = false;
                // One segment at a time, each answered at once, as on a
                // wire.
                while let Some(s) = a.poll_transmit(now) {
                    progressed = true;
                    if Some(s.seq) == lost && !s.payload.is_empty() && dropped < 2 {
                        dropped += 1;
                        continue;
                    }
                    b.on_segment(&s, now);
                    while let Some(ack) = b.poll_transmit(now) {
                        a.on_segment(&ack, now);
                    }
                }
                progressed |= !b.read(usize::MAX).is_empty();
                written += a.write(&data[written..]);
                if !progressed {
                    // b's delayed ACK; a's own timers never run, so a
                    // retransmission timeout cannot help it.
                    b.on_timer(now + Duration::from_secs(1));
                    match b.poll_transmit(now) {
                        Some(ack) => a.on_segment(&ack, now),
                        None => break,
                    }
                }
            }
            dropped
        };
        // A clean transfer first opens the congestion window.
        let warm: Vec<u8> = vec![1; 300_000];
        assert_eq!(exchange(&mut a, &mut b, &warm, None), 0);
        // Then the next segment is lost, and so is its fast retransmission;
        // everything else arrives.
        let start = a.snd_una();
        let data: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        assert_eq!(exchange(&mut a, &mut b, &data, Some(start)), 2);
        let st = a.stats();
        assert_eq!((st.lost_retransmits, st.rto_expirations), (1, 0), "{st:?}");
        assert_eq!(a.snd_una(), start + data.len() as u32, "{st:?}");
    }

    /// RFC 6675: every hole the SACKs of one flight show lost is resent
    /// as those SACKs arrive, not one hole per round trip as NewReno's
    /// partial ACKs would; the pipe, not the inflated window, paces them.
    #[test]
    fn every_hole_the_sacks_show_is_resent_within_the_round_trip() {
        let (mut a, mut b, now) = warmed_up(23);
        // One flight of 60 segments; the 6th, 16th and 26th are lost.
        a.write(&vec![2u8; 60 * 1448]);
        let mut flight = Vec::new();
        while let Some(s) = a.poll_transmit(now) {
            flight.push(s);
        }
        assert_eq!(flight.len(), 60);
        let lost: Vec<SeqNum> = [5, 15, 25].iter().map(|&i| flight[i].seq).collect();
        let mut resent = Vec::new();
        for (i, s) in flight.iter().enumerate() {
            if ![5, 15, 25].contains(&i) {
                resent.extend(answered(&mut a, &mut b, s, now));
            }
        }
        // All three holes went out again before any retransmission could
        // have been acknowledged, each once.
        let resent_seqs: Vec<SeqNum> = resent
            .iter()
            .filter(|r| !r.payload.is_empty() && lost.contains(&r.seq))
            .map(|r| r.seq)
            .collect();
        assert_eq!(resent_seqs, lost, "{:?}", a.stats());
        let st = a.stats();
        assert_eq!((st.retransmits, st.rto_expirations), (3, 0), "{st:?}");
        // They arrive: everything is acknowledged, recovery ends.
        for r in &resent {
            b.on_segment(r, now);
        }
        b.ack_now();
        deliver(&mut b, &mut a, now);
        assert_eq!(a.snd_una(), flight[59].seq + 1448);
        assert!(!a.cc_in_recovery_for_tests());
    }

    /// A retransmission lost during SACK recovery, with no new data sent
    /// after it that SACKs could show lost, is resent again 1.25 SRTT
    /// after it went (by the probe timer when no ACK comes, or by an ACK
    /// that still shows the hole), not at the retransmission timeout;
    /// and a partial ACK landing on a hole already resent does not
    /// resend it at once.
    #[test]
    fn a_hole_resent_and_lost_again_in_sack_recovery_is_resent_once_more() {
        let (mut a, mut b, t0) = warmed_up(31);
        a.write(&vec![4u8; 60 * 1448]);
        let mut flight = Vec::new();
        while let Some(s) = a.poll_transmit(t0) {
            flight.push(s);
        }
        assert_eq!(flight.len(), 60);
        let (first, second) = (flight[5].seq, flight[25].seq);
        let exchange = answered;
        let mut out = Vec::new();
        // All but the 6th and the 26th arrive (the last one later).
        for (i, s) in flight.iter().enumerate().take(59) {
            if i != 5 && i != 25 {
                out.extend(exchange(&mut a, &mut b, s, t0));
            }
        }
        let resends = |out: &[Segment], seq: SeqNum| out.iter().filter(|r| r.seq == seq).count();
        assert_eq!((resends(&out, first), resends(&out, second)), (1, 1));
        // The resend of the first hole arrives, that of the second is
        // lost: the partial ACK lands on the second, already resent, and
        // nothing goes out for it yet.
        let soon = t0 + Duration::from_micros(200);
        let mut after = Vec::new();
        for r in out.iter().filter(|r| r.seq == first) {
            after.extend(exchange(&mut a, &mut b, r, soon));
        }
        assert_eq!(a.snd_una(), second);
        assert_eq!(resends(&after, second), 0);
        // No ACK comes: the probe timer finds the resend overdue (1.25
        // SRTT, at least 1 ms, after it), well before the 200 ms RTO.
        let due = a.next_deadline().expect("a timer");
        assert!(due <= soon + Duration::from_millis(2), "{:?}", due - t0);
        a.on_timer(due);
        let mut fired = Vec::new();
        while let Some(r) = a.poll_transmit(due) {
            fired.push(r);
        }
        assert_eq!(resends(&fired, second), 1, "{:?}", a.stats());
        // ACKs within the wait after that resend do not resend it again;
        // one a round trip later that still shows the hole does.
        let again = exchange(&mut a, &mut b, &flight[59], due);
        assert_eq!(resends(&again, second), 0);
        let later = due + Duration::from_millis(5);
        let more = exchange(&mut a, &mut b, &flight[58], later);
        assert_eq!(resends(&more, second), 1);
        let st = a.stats();
        assert_eq!((st.lost_retransmits, st.rto_expirations), (2, 0), "{st:?}");
    }

    /// A peer that falls silent in SACK recovery (a Linux receiver whose
    /// memory is full drops every segment and ACKs none) is sent the
    /// first hole again once when its resend is overdue, and then nothing
    /// until the retransmission timeout: only an ACK that came after a
    /// resend can show it overdue. Before, the probe timer alone resent
    /// it every 1.25 SRTT (later, backed off), with no ACK to clock it.
    /// An ACK that moves SND.UNA starts the wait over for the next hole.
    #[test]
    fn a_silent_peer_in_sack_recovery_gets_one_resend_then_the_timeout() {
        let (mut a, mut b, t0) = warmed_up(37);
        a.write(&vec![7u8; 60 * 1448]);
        let flight = flight(&mut a, t0);
        assert_eq!(flight.len(), 60);
        let (first, second) = (flight[5].seq, flight[25].seq);
        // All but the 6th and the 26th arrive and are ACKed at once: both
        // holes are resent.
        let mut out = Vec::new();
        for (i, s) in flight.iter().enumerate() {
            if i != 5 && i != 25 {
                out.extend(answered(&mut a, &mut b, s, t0));
            }
        }
        let resends = |out: &[Segment], seq: SeqNum| out.iter().filter(|r| r.seq == seq).count();
        assert_eq!((resends(&out, first), resends(&out, second)), (1, 1));
        // Then b drops everything and ACKs nothing; the resends of `hole`
        // each time `a`'s timer fires, until the timeout or 2 s.
        let silent = |a: &mut Conn, now: &mut Instant, hole: SeqNum| {
            let from = *now;
            let mut at = Vec::new();
            let mut last = None;
            let rtos = a.stats().rto_expirations;
            while a.stats().rto_expirations == rtos && *now - from < Duration::from_secs(2) {
                *now = a.next_deadline().expect("a timer runs while data is out");
                a.on_timer(*now);
                while let Some(r) = a.poll_transmit(*now) {
                    if r.seq == hole && a.stats().rto_expirations == rtos {
                        at.push(*now - from);
                        last = Some(r);
                    }
                }
            }
            (at, last)
        };
        let mut now = t0;
        let (at, last) = silent(&mut a, &mut now, first);
        assert_eq!(at.len(), 1, "{at:?}");
        assert!(at[0] <= Duration::from_millis(2), "{at:?}");
        assert_eq!(a.stats().rto_expirations, 1);
        // That resend arrives: SND.UNA moves to the second hole, whose
        // resend is overdue by then. The ACK clocks one more resend of
        // it, and nothing follows before the next timeout.
        let ack_out = answered(&mut a, &mut b, &last.expect("a resend"), now);
        assert_eq!(a.snd_una(), second);
        let (at, _) = silent(&mut a, &mut now, second);
        assert_eq!(
            resends(&ack_out, second) + at.len(),
            1,
            "{ack_out:?} {at:?}"
        );
        assert_eq!(a.stats().rto_expirations, 2);
        // The timeout's resend arrives; so does the rest: all acknowledged.
        let end = flight[59].seq + flight[59].payload.len() as u32;
        for _ in 0..100 {
            if a.snd_una() == end {
                break;
            }
            while let Some(s) = a.poll_transmit(now) {
                b.on_segment(&s, now);
            }
            b.ack_now();
            while let Some(ack) = b.poll_transmit(now) {
                a.on_segment(&ack, now);
            }
        }
        assert_eq!(a.snd_una(), end, "{:?}", a.stats());
    }

    /// A peer that falls silent with a flight out: once the timeout has
    /// fired, the timer alone paces the resends of SND.UNA (RFC 6298
    /// §5.5, doubling), as Linux's loss state does. Before, the go-back-N
    /// resend armed a tail probe two SRTTs (10 ms) out, whose recovery
    /// resent the hole again every few milliseconds until the next
    /// timeout: a silent server got one segment 87 times in 19 s.
    #[test]
    fn after_a_timeout_only_the_backed_off_timer_resends_to_a_silent_peer() {
        let (mut a, _b, t0) = warmed_up_rtt(43, Duration::from_millis(2));
        a.write(&vec![5u8; 20 * 1448]);
        let una = a.snd_una();
        assert_eq!(flight(&mut a, t0).len(), 20);
        // Nothing comes back. Every send of SND.UNA's segment for 60 s.
        let mut now = t0;
        let mut at = Vec::new();
        while now - t0 < Duration::from_secs(60) && a.state() == State::Established {
            now = a.next_deadline().expect("a timer runs while data is out");
            a.on_timer(now);
            while let Some(s) = a.poll_transmit(now) {
                if s.seq == una && !s.payload.is_empty() {
                    at.push((now - t0, a.stats().rto_expirations));
                }
            }
        }
        // Before the first timeout: the tail probe's resend at most.
        let before = at.iter().filter(|(_, rtos)| *rtos == 0).count();
        assert!(before <= 1, "{at:?}");
        // After it: one resend per expiry, each wait twice the last.
        let after: Vec<Duration> = at.iter().filter(|(_, r)| *r > 0).map(|(t, _)| *t).collect();
        assert_eq!(after.len() as u64, a.stats().rto_expirations, "{at:?}");
        for w in after.windows(3) {
            let (g1, g2) = (w[1] - w[0], w[2] - w[1]);
            assert!(g2 >= g1 * 2 - Duration::from_millis(1), "{after:?}");
        }
        assert!(after.len() <= 10, "{after:?}");
    }

    /// A forged ACK whose SACK block straddles SND.UNA + 2³¹ (modular
    /// comparisons take it for a range between SND.UNA and SND.MAX) is
    /// ignored: nothing is resent beyond what was sent, nor the whole
    /// buffer at once.
    #[test]
    fn a_sack_block_outside_what_was_sent_is_ignored() {
        let (mut a, mut b, now) = warmed_up(37);
        a.write(&vec![6u8; 100 * 1448]);
        let mut flight = Vec::new();
        while let Some(s) = a.poll_transmit(now) {
            flight.push(s);
        }
        assert!(flight.len() >= 30);
        let snd_max = a.snd_max_for_tests();
        b.ack_now();
        let template = b.poll_transmit(now).expect("an ACK");
        let una = template.ack;
        let forged = Segment {
            options: TcpOptions {
                sack: vec![
                    (una + 1448, una + 2896),
                    (una + 0x7FFF_FFFF, una + 0xC000_0000),
                ],
                ..template.options.clone()
            },
            ..template.clone()
        };
        for _ in 0..3 {
            a.on_segment(&forged, now);
        }
        let mut sent = Vec::new();
        while let Some(s) = a.poll_transmit(now) {
            sent.push(s);
        }
        assert!(
            sent.iter()
                .all(|s| (s.seq + s.payload.len() as u32).le(snd_max)),
            "sent beyond SND.MAX"
        );
        // At most the first segment is resent (three duplicate ACKs SACK
        // one real segment: fast retransmit), never the buffer.
        assert!(sent.len() <= 1, "{} segments", sent.len());
    }

    /// The receiver's SACK option as it goes on the wire: whole blocks,
    /// the newest arrival's first, only as many as fit beside the
    /// timestamps (three). Before, one block per segment in sequence
    /// order left a sender blind to everything past the first three
    /// segments after a hole.
    #[test]
    fn sacks_report_whole_blocks_newest_first_as_many_as_fit() {
        let (mut a, mut b, now) = warmed_up(29);
        a.write(&vec![3u8; 20 * 1448]);
        let mut flight = Vec::new();
        while let Some(s) = a.poll_transmit(now) {
            flight.push(s);
        }
        assert!(flight.len() >= 20);
        let end = |i: usize| flight[i].seq + flight[i].payload.len() as u32;
        let mut last = None;
        for (i, s) in flight.iter().enumerate().take(20) {
            if [2, 5, 8, 11, 14].contains(&i) {
                continue;
            }
            b.on_segment(s, now);
            b.ack_now();
            while let Some(ack) = b.poll_transmit(now) {
                last = Some(ack);
            }
        }
        let sack = last.expect("an ACK").options.sack;
        assert_eq!(
            sack,
            vec![
                (flight[15].seq, end(19)),
                (flight[12].seq, end(13)),
                (flight[9].seq, end(10)),
            ]
        );
    }

    /// A segment from the peer of a [`bare`] connection: `payload` from
    /// `seq`, acknowledging nothing new, with a FIN or not.
    fn from_peer(seq: u32, payload: &[u8], fin: bool) -> Segment {
        Segment {
            seq: SeqNum(seq),
            ack: SeqNum(2),
            flags: Flags {
                ack: true,
                fin,
                ..Flags::default()
            },
            window: 65535,
            payload: payload.to_vec(),
            ..Segment::default()
        }
    }

    /// A handshake without options (ISNs 1 and 100, MSS 1460) and the
    /// peer's window.
    fn bare(peer_window: u32) -> Handshake {
        Handshake {
            local_isn: SeqNum(1),
            remote_isn: SeqNum(100),
            peer_mss: 1460,
            wscale: None,
            timestamps: None,
            sack_permitted: false,
            peer_window,
        }
    }

    /// Karn's algorithm (RFC 6298 §3) without timestamps: after a
    /// timeout the go-back-N resends bytes sent before, and an ACK that
    /// comes just after may answer the first sending. No sample is taken
    /// from it; one was (a millisecond, for a segment out for a second),
    /// as the review of the rewind to a refused probe's byte noticed.
    #[test]
    fn a_go_back_n_resend_is_not_timed() {
        let t0 = Instant::now();
        let mut a = Conn::new(&bare(65535), ConnConfig::default(), t0);
        assert_eq!(a.write(&[7; 1000]), 1000);
        let first = a.poll_transmit(t0).expect("data");
        assert!(a.poll_transmit(t0).is_none());
        let rto = a.next_deadline().expect("the timer runs");
        a.on_timer(rto);
        let again = a.poll_transmit(rto).expect("the resend");
        assert_eq!(again.seq, first.seq);
        let ack = Segment {
            ack: first.seq + 1000,
            ..from_peer(101, &[], false)
        };
        a.on_segment(&ack, rto + Duration::from_millis(1));
        assert_eq!(a.snd_una(), first.seq + 1000);
        assert_eq!(a.srtt_for_tests(), None);
    }

    #[test]
    fn a_retransmission_carries_no_byte_that_was_never_sent() {
        let now = Instant::now();
        // A peer whose window (1000) is below the MSS: the first segment
        // is cut to the window, with more data waiting.
        let mut a = Conn::new(&bare(1000), ConnConfig::default(), now);
        assert_eq!(a.write(&[7; 5000]), 5000);
        let first = a.poll_transmit(now).expect("data");
        assert_eq!((first.seq, first.payload.len()), (SeqNum(2), 1000));
        assert!(a.poll_transmit(now).is_none());
        // It is lost: three duplicate ACKs.
        let dup = Segment {
            seq: SeqNum(101),
            ack: SeqNum(2),
            flags: Flags {
                ack: true,
                ..Flags::default()
            },
            window: 1000,
            ..Segment::default()
        };
        for _ in 0..3 {
            a.on_segment(&dup, now);
        }
        // The retransmission is what was sent: a byte beyond SND.MAX would
        // draw an ACK the sender refuses as acknowledging unsent data.
        let again = a.poll_transmit(now).expect("the fast retransmission");
        assert_eq!(a.stats().fast_retransmits, 1);
        assert_eq!((again.seq, again.payload.len()), (SeqNum(2), 1000));
        let ack = Segment {
            ack: SeqNum(1002),
            ..dup
        };
        a.on_segment(&ack, now);
        assert_eq!((a.snd_una(), a.stats().bad_acks), (SeqNum(1002), 0));
    }

    #[test]
    fn a_peer_that_permits_sack_and_sends_no_blocks_still_gets_a_fast_retransmit() {
        // No blocks at all, or only blocks for data never sent (a
        // middlebox that randomised the sequence numbers and left the
        // blocks untranslated).
        let never_sent = SeqNum(2 + 1000 * 1460);
        for blocks in [vec![], vec![(never_sent, never_sent + 1460)]] {
            let t0 = Instant::now();
            let hs = Handshake {
                sack_permitted: true,
                ..bare(65535)
            };
            let mut a = Conn::new(&hs, ConnConfig::default(), t0);
            assert_eq!(a.write(&[7; 10 * 1460]), 10 * 1460);
            while a.poll_transmit(t0).is_some() {}
            let ack = |n: u32, sack: &[(SeqNum, SeqNum)]| Segment {
                seq: SeqNum(101),
                ack: SeqNum(2 + n * 1460),
                flags: Flags {
                    ack: true,
                    ..Flags::default()
                },
                window: 65535,
                options: TcpOptions {
                    sack: sack.to_vec(),
                    ..TcpOptions::default()
                },
                ..Segment::default()
            };
            // The first segment is acknowledged: a round trip is measured.
            let now = t0 + Duration::from_millis(10);
            a.on_segment(&ack(1, &[]), now);
            while a.poll_transmit(now).is_some() {}
            // The second is lost; three duplicate ACKs.
            let now = now + Duration::from_millis(1);
            for _ in 0..3 {
                a.on_segment(&ack(1, &blocks), now);
            }
            let again: Vec<SeqNum> = std::iter::from_fn(|| a.poll_transmit(now))
                .map(|s| s.seq)
                .collect();
            assert!(
                again.contains(&SeqNum(2 + 1460)),
                "{blocks:?}: no fast retransmission: {again:?}"
            );
            assert_eq!(a.stats().fast_retransmits, 1);
        }
    }

    #[test]
    fn a_closed_window_still_takes_the_peers_acks() {
        let now = Instant::now();
        let cfg = ConnConfig {
            recv_buffer: 1000,
            ..ConnConfig::default()
        };
        let mut a = Conn::new(&bare(65535), cfg, now);
        let ack = Flags {
            ack: true,
            ..Flags::default()
        };
        // The peer fills the buffer nobody reads: the window closes.
        let data = Segment {
            seq: SeqNum(101),
            ack: SeqNum(2),
            flags: ack,
            window: 65535,
            payload: vec![1; 1000],
            ..Segment::default()
        };
        a.on_segment(&data, now);
        assert_eq!(a.readable(), 1000);
        assert_eq!(a.write(&[2; 500]), 500);
        let sent: Vec<Segment> = std::iter::from_fn(|| a.poll_transmit(now)).collect();
        assert!(sent.iter().all(|s| s.window == 0), "{sent:?}");
        assert_eq!(sent.iter().map(|s| s.payload.len()).sum::<usize>(), 500);
        // The peer probed the closed window with a byte of new data (RFC
        // 9293 §3.8.6.1), so its segments now start one past RCV.NXT; one
        // acknowledges our data.
        let acked = Segment {
            seq: SeqNum(1102),
            ack: SeqNum(502),
            flags: ack,
            window: 65535,
            ..Segment::default()
        };
        //= https://www.rfc-editor.org/rfc/rfc9293#section-3.10.7.4
        //= type=test
        //# If the RCV.WND is zero, no segments will be acceptable, but
        //# special allowance should be made to accept valid ACKs, URGs,
        //# and RSTs.
        a.on_segment(&acked, now);
        assert_eq!(a.snd_una(), SeqNum(502));
        assert_eq!(a.readable(), 1000);
        // Far from RCV.NXT it is no ACK of this connection's.
        let far = Segment {
            seq: SeqNum(1101 + 5000),
            ack: SeqNum(502),
            ..acked
        };
        a.write(&[3; 10]);
        while a.poll_transmit(now).is_some() {}
        let far = Segment {
            ack: SeqNum(512),
            ..far
        };
        a.on_segment(&far, now);
        assert_eq!(a.snd_una(), SeqNum(502));
    }

    #[test]
    fn a_fin_out_of_order_ends_the_stream_where_it_stands() {
        let now = Instant::now();
        let data = from_peer;
        // Ten bytes, a FIN at 121 before the ten between, then sixteen
        // bytes from 111 (six past the FIN) and some wholly past it.
        let mut a = Conn::new(&bare(65535), ConnConfig::default(), now);
        a.on_segment(&data(101, &[1; 10], false), now);
        a.on_segment(&data(121, b"", true), now);
        a.on_segment(&data(111, &[2; 16], false), now);
        a.on_segment(&data(122, b"PAST", false), now);
        assert_eq!(a.rcv_nxt(), SeqNum(122), "the FIN taken at 121");
        let mut want = vec![1; 10];
        want.extend([2; 10]);
        assert_eq!(a.read(usize::MAX), want);
        assert!(a.peer_finished());
        // Two FINs in different places: the first stands, and its
        // repeat is taken once the bytes before it come.
        let mut b = Conn::new(&bare(65535), ConnConfig::default(), now);
        b.on_segment(&data(141, b"", true), now);
        b.on_segment(&data(131, b"", true), now);
        b.on_segment(&data(101, &[3; 40], false), now);
        assert_eq!(b.rcv_nxt(), SeqNum(142));
        assert_eq!(b.read(usize::MAX), vec![3; 40]);
        assert!(b.peer_finished());
        // Bytes held past a FIN that comes later: that FIN is refused (the
        // gap's filling would carry RCV.NXT over it), and the true one,
        // at the end of the bytes, is taken.
        let mut c = Conn::new(&bare(65535), ConnConfig::default(), now);
        c.on_segment(&data(151, &[4; 50], false), now);
        c.on_segment(&data(121, &[5; 30], true), now);
        c.on_segment(&data(101, &[6; 50], false), now);
        c.on_segment(&data(201, b"", true), now);
        assert_eq!(c.rcv_nxt(), SeqNum(202));
        let want: Vec<u8> = [vec![6; 20], vec![5; 30], vec![4; 50]].concat();
        assert_eq!(c.read(usize::MAX), want);
        assert!(c.peer_finished());
    }

    #[test]
    fn no_byte_past_the_peers_fin_is_taken() {
        let now = Instant::now();
        let mut a = Conn::new(&bare(65535), ConnConfig::default(), now);
        // Ten bytes and the FIN: RCV.NXT is 112, the FIN at 111.
        a.on_segment(&from_peer(101, &[1; 10], true), now);
        assert_eq!(a.rcv_nxt(), SeqNum(112));
        // A hostile peer resends its last byte with one more after it, in
        // the FIN's place: the segment ends at RCV.NXT, so it is old by the
        // table, and only its old byte may be compared.
        a.on_segment(&from_peer(110, &[1, 9], false), now);
        // And one that is out of the window entirely, overlapping the end.
        a.on_segment(&from_peer(105, &[1; 200_000], false), now);
        assert_eq!(a.rcv_nxt(), SeqNum(112));
        assert_eq!(a.read(usize::MAX), vec![1; 10]);
        assert_eq!(a.readable(), 0);
    }

    #[test]
    fn a_lost_tail_is_probed_after_two_rtts_not_the_retransmission_timeout() {
        let (mut a, mut b, now) = established(23);
        let wire = |a: &mut Conn, b: &mut Conn, t: Instant, lose: &dyn Fn(&Segment) -> bool| {
            while let Some(s) = a.poll_transmit(t) {
                if !lose(&s) {
                    b.on_segment(&s, t);
                }
                while let Some(ack) = b.poll_transmit(t) {
                    a.on_segment(&ack, t);
                }
            }
        };
        // Some clean traffic first, so the sender has an RTT estimate.
        let mut t = now;
        for _ in 0..20 {
            a.write(&[1; 3000]);
            t += Duration::from_millis(1);
            wire(&mut a, &mut b, t, &|_| false);
            b.read(usize::MAX);
        }
        assert_eq!(a.snd_una(), a.snd_max_for_tests());
        // Three segments; the last two are lost, so no duplicate ACK comes.
        a.write(&[2; 4000]);
        let first = a.snd_una();
        wire(&mut a, &mut b, t, &|s| s.seq != first);
        let deadline = a.next_deadline().expect("a timer");
        assert!(
            deadline < t + Duration::from_millis(100),
            "the probe is due in {:?}",
            deadline - t
        );
        a.on_timer(deadline);
        wire(&mut a, &mut b, deadline, &|_| false);
        // b acknowledges the repaired segment after its delayed-ACK timer;
        // the partial ACK brings the last one.
        let mut t = deadline;
        for _ in 0..3 {
            t += Duration::from_millis(40);
            b.on_timer(t);
            while let Some(ack) = b.poll_transmit(t) {
                a.on_segment(&ack, t);
            }
            wire(&mut a, &mut b, t, &|_| false);
        }
        let st = a.stats();
        assert_eq!((st.tail_probes, st.rto_expirations), (1, 0), "{st:?}");
        assert_eq!(a.snd_una(), first + 4000, "{st:?}");
        assert_eq!(b.read(usize::MAX), vec![2; 4000]);
    }

    /// A sender and a peer with an 8 KB receive buffer (its whole window)
    /// after a round trip learned while the peer kept up: well under the
    /// probe's ten-millisecond floor.
    fn small_window_peer(seed: u64) -> (Conn, Conn, Instant) {
        let small = ConnConfig {
            recv_buffer: 8 << 10,
            ..ConnConfig::default()
        };
        let (a, b, t) = warmed_up_pair(seed, small, 3000, 20);
        assert_eq!(a.snd_una(), a.snd_max_for_tests());
        (a, b, t)
    }

    /// A sender and a peer configured with `b_cfg` after `rounds` writes
    /// of `chunk` bytes, a millisecond apart, each read and acknowledged
    /// at once: a clean start that leaves a round trip learned.
    fn warmed_up_pair(
        seed: u64,
        b_cfg: ConnConfig,
        chunk: usize,
        rounds: usize,
    ) -> (Conn, Conn, Instant) {
        let mut rng = Rng::new(seed);
        let (ha, hb) = handshakes(&mut rng);
        let mut t = Instant::now();
        let mut a = Conn::new(&ha, ConnConfig::default(), t);
        let mut b = Conn::new(&hb, b_cfg, t);
        for _ in 0..rounds {
            a.write(&vec![1; chunk]);
            deliver(&mut a, &mut b, t);
            b.read(usize::MAX);
            b.ack_now();
            deliver(&mut b, &mut a, t);
            t += Duration::from_millis(1);
        }
        (a, b, t)
    }

    /// A slow reader's buffer is full after each flight, so its stack sits
    /// on the ACK until the application reads (Linux ACKs at once only
    /// when its window would not shrink). Once a tail probe sent at a full
    /// window proved spurious, a flight that fills this peer's window
    /// allows for a delayed ACK before its tail is probed, as one segment
    /// out does (RFC 8985 §7.2). Before, a probe went out ten
    /// milliseconds after most flights to a reader taking 8 KB every
    /// twenty, and was DSACKed: 12 probes in 40 flights here.
    #[test]
    fn a_flight_that_fills_a_slow_readers_window_is_not_probed_before_it_reads() {
        let (mut a, mut b, mut t) = small_window_peer(47);
        let (mut read, mut flights) = (0, 0);
        for _ in 0..40 {
            a.write(&[2; 16 << 10]);
            let mut n = 0;
            while let Some(s) = a.poll_transmit(t) {
                n += s.payload.len();
                b.on_segment(&s, t);
            }
            flights += usize::from(n >= 4 << 10);
            // b's stack holds its ACK: the buffer is full.
            while b.poll_transmit(t).is_some() {}
            // Whatever a's timers send before the next read reaches b,
            // and b answers that at once (a copy draws a DSACK).
            let next_read = t + Duration::from_millis(20);
            while let Some(due) = a.next_deadline().filter(|&d| d < next_read) {
                a.on_timer(due);
                deliver(&mut a, &mut b, due);
                deliver(&mut b, &mut a, due);
            }
            t = next_read;
            read += b.read(8 << 10).len();
            b.ack_now();
            deliver(&mut b, &mut a, t);
        }
        let st = a.stats();
        assert!(
            flights >= 35 && read >= 35 * (4 << 10),
            "{flights} flights, {read} bytes read"
        );
        // The one probe that taught it, undone by its DSACK.
        assert!(st.tail_probes <= 1, "{st:?}");
        assert_eq!(
            (st.retransmits, st.spurious_undone),
            (st.tail_probes, st.tail_probes),
            "{st:?}"
        );
    }

    /// The allowance for a slow reader's delayed ACK is judged against
    /// the window the ACK at hand announces, not the one before it: a
    /// partial ACK (a Linux receiver's delayed-ACK timer firing while the
    /// flight is still arriving) that leaves the rest of the flight
    /// filling the window defers the probe as a full flight does.
    #[test]
    fn a_partial_ack_that_leaves_the_window_full_defers_the_probe() {
        let (mut a, mut b, mut t) = small_window_peer(59);
        // One spurious probe at a full window teaches a that b holds its
        // ACKs while its buffer is full.
        a.write(&[2; 8 << 10]);
        deliver(&mut a, &mut b, t);
        while b.poll_transmit(t).is_some() {}
        let due = a.next_deadline().expect("a probe");
        a.on_timer(due);
        deliver(&mut a, &mut b, due);
        deliver(&mut b, &mut a, due);
        t = due + Duration::from_millis(20);
        b.read(usize::MAX);
        b.ack_now();
        deliver(&mut b, &mut a, t);
        assert_eq!(a.stats().tail_probes, 1, "{:?}", a.stats());
        assert_eq!(a.snd_una(), a.snd_max_for_tests());
        // A flight to the edge of b's window; b ACKs its first three
        // segments only, its window shrunk by what it holds.
        a.write(&[3; 16 << 10]);
        let f = flight(&mut a, t);
        assert!(f.len() >= 5, "{} segments", f.len());
        for s in &f {
            b.on_segment(s, t);
        }
        while b.poll_transmit(t).is_some() {}
        b.ack_now();
        let mut ack = b.poll_transmit(t).expect("an ACK");
        let edge = ack.ack + (u32::from(ack.window) << 7);
        ack.ack = f[3].seq;
        ack.window = (edge.since(ack.ack) >> 7) as u16;
        a.on_segment(&ack, t);
        assert!(a.poll_transmit(t).is_none(), "the window is full");
        // Two SRTTs (10 ms at least) plus the 200 ms allowance fall past
        // the RTO here, so the RTO is the next timer: no probe first.
        let due = a.next_deadline().expect("a timer");
        assert!(
            due - t >= Duration::from_millis(200),
            "probed {:?} after a partial ACK at a full window",
            due - t
        );
    }

    /// A reader that keeps up, whose window a flight fills (a small
    /// buffer): a lost flight is probed two round trips after it went,
    /// not left to the retransmission timeout. Its ACKs come at once, so
    /// there is no delayed ACK to wait for.
    #[test]
    fn a_lost_flight_that_fills_a_prompt_readers_window_is_probed_not_timed_out() {
        let (mut a, mut b, t) = small_window_peer(53);
        a.write(&[3; 8 << 10]);
        // The whole flight, the peer's window full, is lost.
        let lost = std::iter::from_fn(|| a.poll_transmit(t)).count();
        assert!(lost >= 5, "{lost} segments");
        let due = a.next_deadline().expect("a timer");
        assert!(
            due < t + Duration::from_millis(100),
            "the probe is due in {:?}",
            due - t
        );
        let mut now = t;
        while a.snd_una() != a.snd_max_for_tests() && now < t + Duration::from_secs(1) {
            now = a.next_deadline().expect("a timer while data is out");
            a.on_timer(now);
            // What that sends, its ACKs and what they draw, until quiet.
            while deliver(&mut a, &mut b, now) > 0 {
                b.read(usize::MAX);
                b.ack_now();
                deliver(&mut b, &mut a, now);
            }
        }
        let st = a.stats();
        assert_eq!(a.snd_una(), a.snd_max_for_tests(), "{st:?}");
        assert_eq!((st.tail_probes, st.rto_expirations), (1, 0), "{st:?}");
        assert_eq!(b.read(usize::MAX), Vec::<u8>::new());
    }

    #[test]
    fn rst_needs_the_exact_sequence_number_otherwise_it_is_challenged() {
        let (mut a, mut b, now) = established(9);
        a.write(b"hello");
        deliver(&mut a, &mut b, now);
        let mut rst = Segment {
            seq: b.rcv_nxt() + 100,
            flags: Flags {
                rst: true,
                ..Flags::default()
            },
            ..Segment::default()
        };
        b.on_segment(&rst, now);
        assert_eq!(b.state(), State::Established);
        assert_eq!(b.stats().challenge_acks, 1);
        let challenge = b.poll_transmit(now).expect("challenge ACK");
        assert!(challenge.flags.ack && challenge.ack == b.rcv_nxt());
        rst.seq = b.rcv_nxt() + 1_000_000;
        b.on_segment(&rst, now);
        assert_eq!(
            (b.state(), b.stats().challenge_acks),
            (State::Established, 1)
        );
        rst.seq = b.rcv_nxt();
        b.on_segment(&rst, now);
        assert_eq!(
            (b.state(), b.aborted()),
            (State::Closed, Some(Abort::Reset))
        );
    }

    /// A flood of refused segments without data (forged RSTs in the
    /// window, SYNs, stray ACKs far out of it) draws a few ACKs per half
    /// second, not one each (RFC 5961 §10): a probe saw 1703 challenge
    /// ACKs in 3 s. The rest are counted. Data below the window is still
    /// answered every time (with its DSACK), and the limit passes.
    #[test]
    fn refused_segments_without_data_draw_a_few_acks_per_half_second() {
        let (mut a, mut b, now) = established(12);
        a.write(b"hello");
        deliver(&mut a, &mut b, now);
        while b.poll_transmit(now).is_some() {}
        let rcv_nxt = b.rcv_nxt();
        let flood = |b: &mut Conn, t: Instant| {
            let mut answers = 0;
            for i in 0..300u32 {
                let flags = match i % 3 {
                    0 => Flags {
                        rst: true,
                        ..Flags::default()
                    },
                    1 => Flags {
                        syn: true,
                        ..Flags::default()
                    },
                    _ => Flags {
                        ack: true,
                        ..Flags::default()
                    },
                };
                let seq = if flags.ack {
                    rcv_nxt + 50_000_000
                } else {
                    rcv_nxt + 100
                };
                b.on_segment(
                    &Segment {
                        seq,
                        flags,
                        ..Segment::default()
                    },
                    t,
                );
                answers += flight(b, t).len();
            }
            answers
        };
        assert_eq!(flood(&mut b, now), OOW_ACK_BURST as usize);
        assert_eq!(b.stats().acks_rate_limited, 300 - u64::from(OOW_ACK_BURST));
        assert_eq!(b.state(), State::Established);
        // Later in the same interval: still quiet.
        let t = now + OOW_ACK_INTERVAL / 2;
        assert_eq!(flood(&mut b, t), 0);
        // A copy of the data already taken is answered all the same.
        let old = Segment {
            seq: SeqNum(rcv_nxt.0.wrapping_sub(5)),
            payload: b"hello".to_vec(),
            flags: Flags {
                ack: true,
                ..Flags::default()
            },
            ack: a.snd_una(),
            ..Segment::default()
        };
        b.on_segment(&old, t);
        let ack = b.poll_transmit(t).expect("an ACK for data");
        assert_eq!(ack.ack, rcv_nxt);
        // The next interval answers again.
        assert_eq!(
            flood(&mut b, now + OOW_ACK_INTERVAL),
            OOW_ACK_BURST as usize
        );
        // And the connection still works.
        a.write(b"still fine");
        deliver(&mut a, &mut b, now + OOW_ACK_INTERVAL);
        assert_eq!(b.read(100), b"hellostill fine");
    }

    #[test]
    fn syn_in_established_gets_a_challenge_ack_and_changes_nothing() {
        let (mut a, mut b, now) = established(11);
        let syn = Segment {
            seq: b.rcv_nxt(),
            flags: Flags {
                syn: true,
                ..Flags::default()
            },
            ..Segment::default()
        };
        b.on_segment(&syn, now);
        assert_eq!(
            (b.state(), b.stats().challenge_acks),
            (State::Established, 1)
        );
        assert!(b.poll_transmit(now).is_some());
        a.write(b"still fine");
        deliver(&mut a, &mut b, now);
        assert_eq!(b.read(100), b"still fine");
    }

    #[test]
    fn acks_for_unsent_data_and_old_timestamps_are_dropped() {
        let (mut a, mut b, now) = established(13);
        a.write(b"abc");
        let seg = a.poll_transmit(now).unwrap();
        // An ACK beyond anything A sent.
        let mut bogus = b.poll_transmit(now).unwrap_or_else(|| Segment {
            seq: b.snd_una(),
            ack: b.rcv_nxt(),
            flags: Flags {
                ack: true,
                ..Flags::default()
            },
            window: 512,
            ..Segment::default()
        });
        bogus.ack = a.snd_una() + 10_000;
        a.on_segment(&bogus, now);
        assert_eq!(a.stats().bad_acks, 1);
        assert_eq!(a.snd_una(), seg.seq);
        // PAWS: a segment whose TSval went backwards is not accepted.
        let mut old = seg.clone();
        b.on_segment(&seg, now);
        let ts = old.options.timestamps.as_mut().unwrap();
        ts.val = ts.val.wrapping_sub(1000);
        old.seq = b.rcv_nxt();
        old.payload = b"zzz".to_vec();
        b.on_segment(&old, now);
        assert_eq!(b.stats().paws_drops, 1);
        assert_eq!(b.read(100), b"abc");
    }

    #[test]
    fn conflicting_retransmissions_are_counted_and_the_first_copy_kept() {
        let (mut a, mut b, now) = established(17);
        a.write(b"original");
        let seg = a.poll_transmit(now).unwrap();
        b.on_segment(&seg, now);
        let mut evil = seg.clone();
        evil.payload = b"0riginal".to_vec();
        b.on_segment(&evil, now);
        assert_eq!(b.stats().overlap_conflicts, 1);
        assert_eq!(b.read(100), b"original");
    }

    /// Two ends after a 300 KB transfer from a to b in which every flight
    /// is acknowledged `rtt` after it went: a's round trip (and RACK's
    /// minimum) is `rtt`, its window past 60 segments.
    fn warmed_up_rtt(seed: u64, rtt: Duration) -> (Conn, Conn, Instant) {
        let (mut a, mut b, mut now) = established(seed);
        let warm = vec![1u8; 300_000];
        let mut written = 0;
        while written < warm.len() || a.send_buffered() > 0 {
            written += a.write(&warm[written..]);
            deliver(&mut a, &mut b, now);
            b.read(usize::MAX);
            b.ack_now();
            now += rtt;
            deliver(&mut b, &mut a, now);
        }
        assert!(a.cc_cwnd_for_tests() > 60 * 1448);
        (a, b, now)
    }

    /// All that `from` sends at `now`.
    fn flight(from: &mut Conn, now: Instant) -> Vec<Segment> {
        std::iter::from_fn(|| from.poll_transmit(now)).collect()
    }

    /// RACK (RFC 8985 §6.2): a hole with only two segments SACKed after
    /// it (fewer than three duplicate ACKs' worth, and an ACK that moved
    /// SND.UNA, so no duplicate ACK at all) is resent a quarter of the
    /// minimum round trip after the ACK that showed it, not by the tail
    /// loss probe two round trips later.
    #[test]
    fn a_hole_with_two_sacked_segments_behind_it_is_resent_a_reordering_window_after_the_ack() {
        let rtt = Duration::from_millis(10);
        let (mut a, mut b, t0) = warmed_up_rtt(41, rtt);
        a.write(&vec![3u8; 4 * 1448]);
        let f = flight(&mut a, t0);
        assert_eq!(f.len(), 4);
        for s in [&f[0], &f[2], &f[3]] {
            b.on_segment(s, t0 + rtt / 2);
        }
        let t1 = t0 + rtt;
        deliver(&mut b, &mut a, t1);
        assert_eq!(a.snd_una(), f[1].seq);
        assert!(a.poll_transmit(t1).is_none());
        let due = a.next_deadline().expect("the reorder timer");
        assert!(
            due > t1 && due <= t1 + rtt / 4 + Duration::from_micros(100),
            "due {:?} after the ACK",
            due - t1
        );
        a.on_timer(due);
        let resent = flight(&mut a, due);
        assert_eq!(
            resent.iter().map(|s| s.seq).collect::<Vec<_>>(),
            vec![f[1].seq]
        );
        assert_eq!(resent[0].payload.len(), 1448);
        let st = a.stats();
        assert_eq!(
            (st.fast_retransmits, st.tail_probes, st.rto_expirations),
            (1, 0, 0),
            "{st:?}"
        );
    }

    /// Reordering shorter than RACK's window costs no retransmission,
    /// even when more than three segments' worth is SACKed past the late
    /// one (RFC 6675's IsLost would have resent it at once), once the
    /// sender has seen reordering (RFC 8985 §6.2 step 3).
    #[test]
    fn reordering_within_the_reordering_window_is_not_retransmitted() {
        let rtt = Duration::from_millis(10);
        let (mut a, mut b, mut t) = warmed_up_rtt(47, rtt);
        for (n, late) in [(2, 1000), (8, 1500)] {
            let late = Duration::from_micros(late);
            a.write(&vec![4u8; n * 1448]);
            let f = flight(&mut a, t);
            assert_eq!(f.len(), n);
            for s in &f[1..] {
                b.on_segment(s, t + rtt / 2);
            }
            deliver(&mut b, &mut a, t + rtt);
            assert!(a.poll_transmit(t + rtt).is_none());
            let due = a.next_deadline().expect("a timer");
            assert!(
                due > t + rtt + late,
                "due {:?} after the ACK",
                due - t - rtt
            );
            // The late one arrives.
            b.on_segment(&f[0], t + rtt / 2 + late);
            deliver(&mut b, &mut a, t + rtt + late);
            assert_eq!(a.snd_una(), a.snd_max_for_tests());
            assert!(flight(&mut a, t + rtt + late).is_empty());
            b.read(usize::MAX);
            t += 2 * rtt;
        }
        let st = a.stats();
        assert_eq!((st.retransmits, st.fast_retransmits), (0, 0), "{st:?}");
        assert!(!a.cc_in_recovery_for_tests());
    }

    /// RACK finds a lost retransmission as it finds any loss: a segment
    /// sent after it was delivered and the window passed. Here the
    /// resend of the first hole is lost and the resend of the second,
    /// sent after it, arrives: the ACK for it shows the first lost again
    /// (the older heuristics waited 1.25 round trips, or three segments
    /// SACKed past SND.MAX).
    #[test]
    fn a_lost_retransmission_is_found_by_the_ack_for_a_later_retransmission() {
        let rtt = Duration::from_millis(10);
        let (mut a, mut b, t0) = warmed_up_rtt(43, rtt);
        a.write(&vec![5u8; 40 * 1448]);
        let f = flight(&mut a, t0);
        assert_eq!(f.len(), 40);
        let (h1, h2) = (f[5].seq, f[25].seq);
        for s in f.iter().filter(|s| s.seq != h1 && s.seq != h2) {
            b.on_segment(s, t0 + rtt / 2);
        }
        let t1 = t0 + rtt;
        let mut resent = Vec::new();
        while let Some(ack) = b.poll_transmit(t1) {
            a.on_segment(&ack, t1);
            resent.extend(flight(&mut a, t1));
        }
        let seqs: Vec<SeqNum> = resent.iter().map(|s| s.seq).collect();
        assert_eq!(seqs, vec![h1, h2], "{:?}", a.stats());
        // h1's resend is lost, h2's arrives.
        b.on_segment(&resent[1], t1 + rtt / 2);
        let t2 = t1 + rtt;
        let mut again = Vec::new();
        while let Some(ack) = b.poll_transmit(t2) {
            a.on_segment(&ack, t2);
            again.extend(flight(&mut a, t2));
        }
        let seqs: Vec<SeqNum> = again.iter().map(|s| s.seq).collect();
        assert_eq!(seqs, vec![h1], "{:?}", a.stats());
        let st = a.stats();
        assert_eq!((st.lost_retransmits, st.rto_expirations), (1, 0), "{st:?}");
        b.on_segment(&again[0], t2 + rtt / 2);
        deliver(&mut b, &mut a, t2 + rtt);
        assert_eq!(a.snd_una(), a.snd_max_for_tests());
    }

    /// RFC 5681 §4.2: the segment that fills the last hole is
    /// acknowledged at once, not after the delayed-ACK timer (a sender
    /// in recovery waits on that ACK).
    #[test]
    fn the_segment_that_fills_a_hole_is_acknowledged_at_once() {
        let (mut a, mut b, now) = established(53);
        a.write(&vec![6u8; 3 * 1448]);
        let f = flight(&mut a, now);
        assert_eq!(f.len(), 3);
        b.on_segment(&f[0], now);
        assert!(b.poll_transmit(now).is_none(), "one in-order segment waits");
        b.on_segment(&f[2], now);
        let dup = b.poll_transmit(now).expect("out of order: an ACK at once");
        assert_eq!(dup.ack, f[1].seq);
        b.on_segment(&f[1], now);
        let ack = b
            .poll_transmit(now)
            .expect("the hole filled: an ACK at once");
        assert_eq!(ack.ack, f[2].seq + 1448);
        assert!(ack.options.sack.is_empty());
    }

    /// A copy of bytes held out of order (above RCV.NXT) is reported too:
    /// a DSACK block first, then the block that holds it, though another
    /// block is newer (RFC 2883 §4), so a sender whose retransmission it
    /// was can tell it was spurious; the sender takes it as one.
    #[test]
    fn a_copy_of_bytes_held_out_of_order_is_dsacked_before_their_block() {
        let (mut a, mut b, now) = established(67);
        // A first flight through, so the window has room for six.
        a.write(&vec![8u8; 3 * 1448]);
        deliver(&mut a, &mut b, now);
        deliver(&mut b, &mut a, now);
        a.write(&vec![8u8; 6 * 1448]);
        let f = flight(&mut a, now);
        assert_eq!(f.len(), 6);
        // 0 and 3 lost: 1-2 and 4-5 held, 4-5 the newest block.
        for (i, s) in f.iter().enumerate() {
            if i != 0 && i != 3 {
                b.on_segment(s, now);
            }
        }
        while b.poll_transmit(now).is_some() {}
        let end = |i: usize| f[i].seq + 1448;
        b.on_segment(&f[2], now);
        let ack = b.poll_transmit(now).expect("a duplicate: an ACK at once");
        assert_eq!(ack.ack, f[0].seq);
        assert_eq!(
            ack.options.sack,
            [(f[2].seq, end(2)), (f[1].seq, end(2)), (f[4].seq, end(5))],
            "{ack:?}"
        );
        assert_eq!((b.stats().dsacks_out, b.stats().duplicates), (1, 1));
        // Reported once: the next ACK carries the held blocks only, the
        // one the copy landed in first (RFC 2018 §4: the latest arrival).
        b.ack_now();
        let next = b.poll_transmit(now).expect("an ACK");
        assert_eq!(next.options.sack, [(f[1].seq, end(2)), (f[4].seq, end(5))]);
        // The sender reads the first block as a DSACK.
        a.on_segment(&ack, now);
        assert_eq!(a.stats().dsacks_in, 1, "{:?}", a.stats());
        // Two copies before an ACK goes: the first one's block comes
        // second though the other block is the newest arrival.
        b.on_segment(&f[1], now);
        b.on_segment(&f[5], now);
        let first = b.poll_transmit(now).expect("an ACK");
        assert_eq!(
            first.options.sack,
            [(f[1].seq, end(1)), (f[1].seq, end(2)), (f[4].seq, end(5))],
            "{first:?}"
        );
        b.ack_now();
        let second = b.poll_transmit(now).expect("an ACK");
        assert_eq!(
            second.options.sack,
            [(f[5].seq, end(5)), (f[4].seq, end(5)), (f[1].seq, end(2))],
            "{second:?}"
        );
    }

    /// A retransmission that repacketized the flight (Linux collapses
    /// segments it resends) and begins below RCV.NXT carries bytes this
    /// side already has: that part is reported in a DSACK (RFC 2883 §4,
    /// as Linux does), so the sender can tell that much of its resend was
    /// spurious, while the new bytes are taken.
    #[test]
    fn a_resend_partly_below_rcv_nxt_is_dsacked_for_that_part() {
        let (mut a, mut b, now) = established(71);
        a.write(&vec![8u8; 3 * 1448]);
        let f = flight(&mut a, now);
        assert_eq!(f.len(), 3);
        // The third is lost; a resend spans the second's tail and it.
        b.on_segment(&f[0], now);
        b.on_segment(&f[1], now);
        while b.poll_transmit(now).is_some() {}
        let from = f[1].seq + 724;
        let resend = Segment {
            seq: from,
            payload: vec![8u8; 724 + 1448],
            ..f[2].clone()
        };
        b.on_segment(&resend, now);
        let ack = b.poll_transmit(now).expect("an ACK at once");
        assert_eq!(ack.ack, f[2].seq + 1448);
        assert_eq!(ack.options.sack, [(from, f[2].seq)], "{ack:?}");
        // Reported, not counted a duplicate: it carried new bytes too.
        assert_eq!((b.stats().dsacks_out, b.stats().duplicates), (1, 0));
        assert_eq!(b.read(usize::MAX), vec![8u8; 3 * 1448]);
        a.on_segment(&ack, now);
        assert_eq!(a.stats().dsacks_in, 1, "{:?}", a.stats());
        // A segment whose head reaches below the stream's start (a broken
        // or forged peer) has its bytes taken but draws no DSACK for bytes
        // that were never sent.
        let (mut a2, mut c, now) = established(73);
        a2.write(&[9u8; 1000]);
        let first = a2.poll_transmit(now).expect("a segment");
        let odd = Segment {
            seq: SeqNum(first.seq.0.wrapping_sub(100)),
            payload: vec![9u8; 1100],
            ..first
        };
        c.on_segment(&odd, now);
        c.ack_now();
        let ack = c.poll_transmit(now).expect("an ACK");
        assert!(ack.options.sack.is_empty(), "{ack:?}");
        assert_eq!(c.stats().dsacks_out, 0);
    }

    /// A copy of a FIN already taken is reported by a DSACK block that
    /// covers it (one sequence number; with its data, the data and the
    /// FIN), never by an empty block, which RFC 2018 has no place for.
    #[test]
    fn a_duplicate_fin_is_dsacked_with_the_number_it_takes() {
        let (mut a, mut b, now) = established(75);
        a.write(&[4u8; 100]);
        a.close();
        let f = flight(&mut a, now);
        let data_fin = f.last().expect("a segment").clone();
        assert!(data_fin.flags.fin && data_fin.payload.len() == 100, "{f:?}");
        for s in &f {
            b.on_segment(s, now);
        }
        while b.poll_transmit(now).is_some() {}
        let end = data_fin.seq + 101;
        assert_eq!(b.rcv_nxt(), end);
        // The data and the FIN again.
        b.on_segment(&data_fin, now);
        let ack = b.poll_transmit(now).expect("an ACK");
        assert_eq!(ack.options.sack, [(data_fin.seq, end)], "{ack:?}");
        // The FIN alone again.
        let fin = Segment {
            seq: data_fin.seq + 100,
            payload: Vec::new(),
            ..data_fin.clone()
        };
        b.on_segment(&fin, now);
        let ack = b.poll_transmit(now).expect("an ACK");
        assert_eq!(ack.ack, end);
        assert_eq!(ack.options.sack, [(data_fin.seq + 100, end)], "{ack:?}");
        assert!(ack.options.sack.iter().all(|(l, r)| r.gt(*l)));
    }

    /// A retransmission of bytes received long ago (beyond the conflict
    /// history) is still reported in a DSACK, so the sender can undo:
    /// everything below RCV.NXT that this side delivered was received.
    #[test]
    fn a_duplicate_older_than_the_history_is_still_dsacked() {
        let mut rng = Rng::new(59);
        let (ha, hb) = handshakes(&mut rng);
        let now = Instant::now();
        let cfg = ConnConfig {
            history: 1448,
            ..ConnConfig::default()
        };
        let mut a = Conn::new(&ha, ConnConfig::default(), now);
        let mut b = Conn::new(&hb, cfg, now);
        a.write(&vec![7u8; 20 * 1448]);
        let f = flight(&mut a, now);
        for s in &f {
            b.on_segment(s, now);
        }
        b.read(usize::MAX);
        b.ack_now();
        while b.poll_transmit(now).is_some() {}
        b.on_segment(&f[0], now);
        let ack = b.poll_transmit(now).expect("an ACK");
        assert_eq!(
            ack.options.sack.first(),
            Some(&(f[0].seq, f[0].seq + 1448)),
            "{ack:?}"
        );
        assert_eq!(b.stats().dsacks_out, 1);
        // A segment from before anything this side received is not.
        let mut old = f[0].clone();
        old.seq = f[0].seq + (-100_000i32) as u32;
        b.on_segment(&old, now);
        let ack = b.poll_transmit(now).expect("an ACK");
        assert!(ack.options.sack.is_empty(), "{ack:?}");
    }
}
