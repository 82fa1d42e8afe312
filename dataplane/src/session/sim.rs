//! A split connection in simulation: a client and a server, each a
//! [`Conn`] continuing the handshake it believes it had with the other,
//! joined through [`Sessions`] by seeded links on a virtual clock. The
//! handshake frames carry each side's own SYN options, so asymmetric
//! negotiations (window shifts, MSS, timestamps or SACK on one side only)
//! reach the tracker as real peers would send them. Every frame the engine
//! sends is kept, by direction, for the tests to check against what that
//! direction's peer negotiated.

use super::{tests::Peers, *};
use crate::{
    tcp::{
        conn::{Conn, ConnConfig, Handshake, State},
        sim::{payload, App, Link, LinkConfig, Rng},
    },
    wire::{
        options::{TcpOptions, Timestamps},
        segment::Flags,
    },
};

/// The engine's buffers per half and direction (`Sessions::new`), kept
/// from growing here so the windows checked are exact.
const ENGINE_BUFFER: u32 = super::BUFFER_INITIAL as u32;

/// What one endpoint puts in its SYN (or SYN-ACK), and its receive buffer.
#[derive(Clone, Copy, Debug)]
struct SynOpts {
    mss: Option<u16>,
    /// The window shift as sent (a shift above 14 is sent as it is).
    wscale: Option<u8>,
    sack: bool,
    ts: bool,
    buffer: usize,
}

impl SynOpts {
    /// What Linux sends here: MSS 1460, shift 7, SACK, timestamps.
    fn linux() -> SynOpts {
        SynOpts {
            mss: Some(1460),
            wscale: Some(7),
            sack: true,
            ts: true,
            buffer: 256 << 10,
        }
    }

    fn options(&self, ts: Option<Timestamps>) -> TcpOptions {
        TcpOptions {
            mss: self.mss,
            window_scale: self.wscale,
            sack_permitted: self.sack,
            timestamps: ts.filter(|_| self.ts),
            ..TcpOptions::default()
        }
    }
}

/// What the two SYNs settled, written out from the RFCs here rather than
/// taken from the tracker under test.
#[derive(Clone, Copy, Debug)]
struct Settled {
    /// The shift each side applies to the windows it advertises (client's,
    /// server's); 0 without scaling.
    shifts: (u8, u8),
    scaling: bool,
    ts: bool,
    sack: bool,
    /// The MSS each side announced (client's, server's).
    mss: (u16, u16),
}

impl Settled {
    fn of(c: &SynOpts, s: &SynOpts) -> Settled {
        //= https://www.rfc-editor.org/rfc/rfc7323#section-2.2
        //# ... both sides must send Window Scale options in their <SYN>
        //# segments to enable window scaling in either direction.
        let scaling = c.wscale.is_some() && s.wscale.is_some();
        //= https://www.rfc-editor.org/rfc/rfc7323#section-2.3
        //# ... MUST use 14 instead of the specified value.
        let shift = |o: &SynOpts| o.wscale.filter(|_| scaling).map_or(0, |w| w.min(14));
        Settled {
            shifts: (shift(c), shift(s)),
            scaling,
            ts: c.ts && s.ts,
            sack: c.sack && s.sack,
            // RFC 9293 §3.7.1: 536 without the option.
            mss: (c.mss.unwrap_or(536), s.mss.unwrap_or(536)),
        }
    }
}

/// A connection to run: each side's SYN, bytes each way, the links.
#[derive(Clone, Copy, Debug)]
struct Run {
    client: SynOpts,
    server: SynOpts,
    up: usize,
    down: usize,
    link: LinkConfig,
    seed: u64,
    /// The server sends at once (the split is decided on its first
    /// bytes); otherwise it answers the client's first bytes (the split
    /// is decided on those, held and replayed).
    server_first: bool,
}

impl Run {
    fn new(client: SynOpts, server: SynOpts) -> Run {
        Run {
            client,
            server,
            up: 300_000,
            down: 300_000,
            link: LinkConfig::lossy(0.02, 0.02, 0.0),
            seed: 1,
            server_first: false,
        }
    }
}

/// What happened: the segments the engine sent each way and what the
/// endpoints got.
struct Outcome {
    settled: Settled,
    to_client: Vec<Segment>,
    to_server: Vec<Segment>,
    /// Segments the engine sent past the right edge of the window the
    /// peer had offered so far (toward the client, toward the server).
    beyond_window: [Vec<String>; 2],
    /// The last TSval each side sent before the split (client's,
    /// server's): the clocks the halves continue.
    ts_bases: (u32, u32),
    elapsed: Duration,
    up: (Vec<u8>, Vec<u8>),
    down: (Vec<u8>, Vec<u8>),
    client: Conn,
    server: Conn,
    counters: SplitCounters,
}

fn frame_side(dir: Dir) -> Side {
    match dir {
        Dir::Client => Side::Inside,
        Dir::Server => Side::Outside,
    }
}

/// Runs `run` to the end (both endpoints closed) or ten virtual minutes.
fn simulate(run: &Run) -> Outcome {
    let mut rng = Rng::new(run.seed);
    let (c, s) = (run.client, run.server);
    let settled = Settled::of(&c, &s);
    let (c_shift, s_shift) = settled.shifts;
    let (c_isn, s_isn) = (SeqNum(rng.next_u64() as u32), SeqNum(rng.next_u64() as u32));
    let (c_ts, s_ts) = (rng.next_u64() as u32, rng.next_u64() as u32);
    let start = Instant::now();
    let mut now = start;
    let mut sp = Sessions::new(SessionSettings {
        buffer_max: 0,
        ..SessionSettings::default()
    });
    let peers = Peers::new();
    // The handshake, as each side would send it. A SYN's window is never
    // scaled; the client's ACK's is.
    let unscaled = |buffer: usize| buffer.min(65535) as u16;
    let syn = Segment {
        seq: c_isn,
        flags: Flags {
            syn: true,
            ..Flags::default()
        },
        window: unscaled(c.buffer),
        options: c.options(Some(Timestamps { val: c_ts, ecr: 0 })),
        ..Segment::default()
    };
    let synack = Segment {
        seq: s_isn,
        ack: c_isn + 1,
        flags: Flags {
            syn: true,
            ack: true,
            ..Flags::default()
        },
        window: unscaled(s.buffer),
        options: s.options(c.ts.then_some(Timestamps {
            val: s_ts,
            ecr: c_ts,
        })),
        ..Segment::default()
    };
    let ack = Segment {
        seq: c_isn + 1,
        ack: s_isn + 1,
        flags: Flags {
            ack: true,
            ..Flags::default()
        },
        window: unscaled(c.buffer >> c_shift),
        options: TcpOptions {
            timestamps: settled.ts.then_some(Timestamps {
                val: c_ts.wrapping_add(1),
                ecr: s_ts,
            }),
            ..TcpOptions::default()
        },
        ..Segment::default()
    };
    for (dir, seg) in [
        (Dir::Client, &syn),
        (Dir::Server, &synack),
        (Dir::Client, &ack),
    ] {
        let frame = peers.frame(dir, seg);
        assert_eq!(
            sp.on_frame(frame_side(dir), &frame, now),
            Disposition::Forward,
            "the handshake goes through: {seg:?}"
        );
    }
    let scaling = settled.scaling;
    let client_hs = Handshake {
        local_isn: c_isn,
        remote_isn: s_isn,
        peer_mss: settled.mss.1,
        wscale: scaling.then_some((s_shift, c_shift)),
        timestamps: settled.ts.then_some((s_ts, c_ts.wrapping_add(1))),
        sack_permitted: settled.sack,
        peer_window: u32::from(synack.window),
    };
    let server_hs = Handshake {
        local_isn: s_isn,
        remote_isn: c_isn,
        peer_mss: settled.mss.0,
        wscale: scaling.then_some((c_shift, s_shift)),
        timestamps: settled.ts.then_some((c_ts.wrapping_add(1), s_ts)),
        sack_permitted: settled.sack,
        peer_window: u32::from(ack.window) << c_shift,
    };
    let cfg = |o: &SynOpts| ConnConfig {
        recv_buffer: o.buffer,
        ..ConnConfig::default()
    };
    let mut client = Conn::new(&client_hs, cfg(&c), now);
    let mut server = Conn::new(&server_hs, cfg(&s), now);
    // Not a ClientHello (a TLS record starts with 22): split at once.
    let mut up = payload(&mut rng, run.up);
    if let Some(b) = up.first_mut() {
        *b = b'G';
    }
    // The side that speaks second starts writing once the other's first
    // bytes are in. The client closes once it has written everything, the
    // server after the client's FIN.
    let down = payload(&mut rng, run.down);
    let (mut c_pending, mut c_app, mut s_pending, mut s_app) = if run.server_first {
        let waiting = App::new(Vec::new(), false);
        (Some(up), waiting, None, App::new(down, false))
    } else {
        let waiting = App::new(Vec::new(), false);
        (None, App::new(up, true), Some(down), waiting)
    };
    // Client to engine, engine to server, server to engine, engine to
    // client.
    let mut links = [(); 4].map(|_| Link::new(run.link));
    let (mut to_client, mut to_server) = (Vec::new(), Vec::new());
    // The right edge of the window each peer offered the engine (client,
    // server), from the handshake on; a receiver never takes it back.
    let mut edges = [
        s_isn + 1 + (u32::from(ack.window) << c_shift),
        c_isn + 1 + u32::from(synack.window),
    ];
    let mut beyond_window: [Vec<String>; 2] = Default::default();
    loop {
        if !c_app.got.is_empty() {
            if let Some(data) = c_pending.take() {
                let got = std::mem::take(&mut c_app.got);
                c_app = App::new(data, true);
                c_app.got = got;
            }
        }
        if !s_app.got.is_empty() {
            if let Some(data) = s_pending.take() {
                s_app.to_send = data;
            }
        }
        c_app.run(&mut client, now);
        s_app.run(&mut server, now);
        while let Some(seg) = client.poll_transmit(now) {
            links[0].send(seg, now, &mut rng);
        }
        while let Some(seg) = server.poll_transmit(now) {
            links[2].send(seg, now, &mut rng);
        }
        for (side, frame) in std::mem::take(&mut sp.out) {
            let seg = parse_segment(&frame)
                .expect("the engine's frames parse")
                .segment;
            let to = usize::from(side == Side::Outside);
            let end = seg.seq + seg.payload.len() as u32;
            // A zero-window probe is one byte past the edge.
            if seg.payload.len() > 1 && end.gt(edges[to]) {
                let past = end.since(edges[to]);
                beyond_window[to].push(format!("{past} bytes past: {seg:?}"));
            }
            if side == Side::Inside {
                to_client.push(seg.clone());
                links[3].send(seg, now, &mut rng);
            } else {
                to_server.push(seg.clone());
                links[1].send(seg, now, &mut rng);
            }
        }
        let done = client.state() == State::Closed && server.state() == State::Closed;
        if done || now - start > Duration::from_secs(600) {
            break;
        }
        let next = [
            client.next_deadline(),
            server.next_deadline(),
            sp.next_timer(),
        ]
        .into_iter()
        .chain(links.iter().map(Link::next_at))
        .flatten()
        .min();
        let Some(next) = next else { break };
        now = now.max(next);
        // Frames the engine leaves alone go on unchanged.
        let peers_shifts = [c_shift, s_shift];
        for (from, arrive, onward) in [(Dir::Client, 0, 1), (Dir::Server, 2, 3)] {
            for seg in links[arrive].due(now) {
                let i = usize::from(from == Dir::Server);
                if seg.flags.ack {
                    let edge = seg.ack + (u32::from(seg.window) << peers_shifts[i]);
                    edges[i] = edges[i].max(edge);
                }
                let frame = peers.frame(from, &seg);
                if sp.on_frame(frame_side(from), &frame, now) == Disposition::Forward {
                    links[onward].send(seg, now, &mut rng);
                }
            }
        }
        for seg in links[3].due(now) {
            client.on_segment(&seg, now);
        }
        for seg in links[1].due(now) {
            server.on_segment(&seg, now);
        }
        sp.on_timers(now);
        client.on_timer(now);
        server.on_timer(now);
    }
    Outcome {
        settled,
        to_client,
        to_server,
        beyond_window,
        ts_bases: (c_ts.wrapping_add(1), s_ts),
        elapsed: now - start,
        up: (c_app.to_send, s_app.got),
        down: (s_app.to_send, c_app.got),
        client,
        server,
        counters: sp.counters,
    }
}

/// What one half must do toward its peer, from what that peer negotiated.
#[derive(Debug)]
struct Expect {
    /// The MSS the peer announced.
    peer_mss: u16,
    /// The shift the peer applies to this half's windows: the one the
    /// endpoint this half impersonates announced.
    shift: u8,
    ts: bool,
    sack: bool,
    /// The last TSval of the endpoint this half impersonates, and of its
    /// peer, before the split; and how long the run lasted.
    ts_base: u32,
    peer_ts_base: u32,
    elapsed: Duration,
}

/// The largest payload and the largest window (as the peer scales it) the
/// half sent; panics at the first segment that breaks what its peer
/// negotiated.
fn check_half(name: &str, segs: &[Segment], e: &Expect) -> (usize, u32) {
    let (mut max_payload, mut max_window) = (0, 0);
    for seg in segs.iter().filter(|s| !s.flags.rst) {
        let o = &seg.options;
        assert_eq!(
            o.timestamps.is_some(),
            e.ts,
            "{name}: timestamps on {seg:?}"
        );
        if let Some(t) = o.timestamps {
            // The impersonated endpoint's clock goes on (its peer's PAWS
            // would drop a restarted one), and the echo is a value the
            // peer sent.
            let ms = e.elapsed.as_millis() as u32 + 1;
            assert!(
                t.val.wrapping_sub(e.ts_base) <= ms,
                "{name}: TSval {} does not continue {}: {seg:?}",
                t.val,
                e.ts_base
            );
            assert!(
                t.ecr.wrapping_sub(e.peer_ts_base) <= ms,
                "{name}: TSecr {} is not the peer's (from {}): {seg:?}",
                t.ecr,
                e.peer_ts_base
            );
        }
        assert!(
            e.sack || o.sack.is_empty(),
            "{name}: SACK blocks on {seg:?}"
        );
        assert!(
            o.mss.is_none() && o.window_scale.is_none() && !o.sack_permitted,
            "{name}: a SYN option on {seg:?}"
        );
        // The options it carries (timestamps, SACK blocks) count against
        // the peer's MSS (RFC 6691).
        let mut opts = Vec::new();
        o.emit(&mut opts);
        assert!(
            seg.payload.len() + opts.len() <= usize::from(e.peer_mss),
            "{name}: {} bytes and {} of options, more than the peer's MSS {} allows: {seg:?}",
            seg.payload.len(),
            opts.len(),
            e.peer_mss
        );
        let window = u32::from(seg.window) << e.shift;
        assert!(
            window <= ENGINE_BUFFER,
            "{name}: a window of {window} bytes (field {} << {}) over a buffer of {ENGINE_BUFFER}",
            seg.window,
            e.shift
        );
        max_payload = max_payload.max(seg.payload.len());
        max_window = max_window.max(window);
    }
    (max_payload, max_window)
}

/// Checks everything each half sent against what its peer negotiated,
/// and that the bytes went through whole both ways.
fn check(o: &Outcome) {
    let s = &o.settled;
    assert!(
        o.up.0 == o.up.1,
        "upload differs ({} of {} bytes)",
        o.up.1.len(),
        o.up.0.len()
    );
    assert!(
        o.down.0 == o.down.1,
        "download differs ({} of {} bytes)",
        o.down.1.len(),
        o.down.0.len()
    );
    assert_eq!((o.client.aborted(), o.server.aborted()), (None, None));
    assert_eq!(
        (o.counters.split, o.counters.aborted),
        (1, 0),
        "{:?}",
        o.counters
    );
    // Toward the client the engine is the server: the client's MSS bounds
    // its segments and the server's shift scales its windows; toward the
    // server, the other way round.
    let (c_ts, s_ts) = o.ts_bases;
    let halves = [
        (
            "toward the client",
            &o.to_client,
            s.mss.0,
            s.shifts.1,
            (s_ts, c_ts),
        ),
        (
            "toward the server",
            &o.to_server,
            s.mss.1,
            s.shifts.0,
            (c_ts, s_ts),
        ),
    ];
    for (i, (name, segs, peer_mss, shift, (ts_base, peer_ts_base))) in
        halves.into_iter().enumerate()
    {
        assert!(
            o.beyond_window[i].is_empty(),
            "{name}: sent beyond the peer's window: {:?}",
            &o.beyond_window[i][..o.beyond_window[i].len().min(3)]
        );
        let e = Expect {
            peer_mss,
            shift,
            ts: s.ts,
            sack: s.sack,
            ts_base,
            peer_ts_base,
            elapsed: o.elapsed,
        };
        let (payload, window) = check_half(name, segs, &e);
        // Bulk data both ways: full-sized segments, and a window that
        // opens as wide as the buffer and the shift allow.
        let ts_len = if s.ts { 12 } else { 0 };
        assert_eq!(payload, usize::from(peer_mss) - ts_len, "{name}: {e:?}");
        let widest = (ENGINE_BUFFER >> shift).min(65535) << shift;
        assert_eq!(window, widest, "{name}: the widest window, {e:?}");
    }
}

mod tests {
    use super::*;

    fn with(f: impl FnOnce(&mut SynOpts)) -> SynOpts {
        let mut o = SynOpts::linux();
        f(&mut o);
        o
    }

    #[test]
    fn each_half_scales_its_windows_by_the_shift_its_peer_expects() {
        for (i, (c, s)) in [(0, 14), (14, 0), (2, 9), (9, 2)].into_iter().enumerate() {
            let run = Run {
                server_first: i % 2 == 1,
                ..Run::new(with(|o| o.wscale = Some(c)), with(|o| o.wscale = Some(s)))
            };
            let o = simulate(&run);
            let first = if run.server_first {
                o.counters.server_first
            } else {
                o.counters.not_tls
            };
            assert_eq!(first, 1, "{:?}", o.counters);
            assert_eq!(o.settled.shifts, (c, s));
            check(&o);
        }
    }

    #[test]
    fn one_side_without_window_scaling_turns_it_off_both_ways() {
        for (c, s) in [(None, Some(9)), (Some(9), None)] {
            let run = Run::new(with(|o| o.wscale = c), with(|o| o.wscale = s));
            let o = simulate(&run);
            assert!(!o.settled.scaling);
            check(&o);
        }
    }

    #[test]
    fn each_half_sizes_its_segments_for_its_own_peers_mss() {
        let cases = [
            (Some(536), Some(1460)),
            (Some(1460), Some(536)),
            (Some(1460), Some(9000)),
            (Some(9000), Some(1460)),
            // No option: 536.
            (None, Some(1460)),
            (Some(1460), None),
        ];
        for (i, (c, s)) in cases.into_iter().enumerate() {
            let run = Run {
                server_first: i % 2 == 1,
                ..Run::new(with(|o| o.mss = c), with(|o| o.mss = s))
            };
            check(&simulate(&run));
        }
    }

    #[test]
    fn timestamps_on_one_side_only_are_used_on_neither_half() {
        for (c, s) in [(true, false), (false, true)] {
            let run = Run::new(with(|o| o.ts = c), with(|o| o.ts = s));
            let o = simulate(&run);
            assert!(!o.settled.ts);
            // Segments are then full MSS (checked), with no option at all.
            check(&o);
        }
    }

    #[test]
    fn sack_blocks_go_only_where_both_sides_permitted_sack() {
        for (c, s) in [(true, false), (false, true), (true, true)] {
            let run = Run::new(with(|o| o.sack = c), with(|o| o.sack = s));
            let o = simulate(&run);
            check(&o);
            // The links lose segments both ways, so each half had
            // out-of-order data to report.
            for segs in [&o.to_client, &o.to_server] {
                let blocks = segs.iter().filter(|s| !s.options.sack.is_empty()).count();
                assert_eq!(blocks > 0, c && s, "{blocks} segments with SACK blocks");
            }
        }
    }

    #[test]
    fn each_half_sends_within_the_window_its_own_peer_offered() {
        // A peer with a small buffer next to one with a large one: the
        // small window (and its shift) must bound the half facing it from
        // the first segment on, before any ACK of its own said so.
        let small = |shift| {
            with(|o| {
                o.buffer = 3000;
                o.wscale = Some(shift);
            })
        };
        let large = |shift| with(|o| o.wscale = Some(shift));
        let cases = [
            (small(0), large(9)),
            (large(9), small(0)),
            (small(2), large(0)),
        ];
        for (c, s) in cases {
            // Whoever speaks first, the other half has only the handshake
            // to go by when its first segment leaves.
            for server_first in [false, true] {
                check(&simulate(&Run {
                    server_first,
                    ..Run::new(c, s)
                }));
            }
        }
    }

    #[test]
    fn a_window_shift_above_14_is_used_as_14() {
        // A client announcing 15: the server uses 14 (RFC 7323 §2.3), and
        // so must the half that speaks to it as the client.
        let run = Run::new(with(|o| o.wscale = Some(15)), with(|o| o.wscale = Some(3)));
        let o = simulate(&run);
        assert_eq!(o.settled.shifts, (14, 3));
        check(&o);
        assert_eq!(o.counters.wscale_clamped, 1, "{:?}", o.counters);
    }
}
