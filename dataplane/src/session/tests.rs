//! Unit tests of the session table: holds, decisions, splits, refusals.

use etherparse::PacketBuilder;

use super::{decide::ACCESS_DENIED, hold::MAX_HELD_FRAMES, *};
use crate::{
    policy::{Match, Rule},
    tls::hello::tests::client_hello,
    wire::{
        options::{TcpOptions, Timestamps},
        segment::{
            tests::{fix_ipv4_checksum, with_tcp_option},
            Flags,
        },
    },
};

pub(super) const C_ISN: u32 = 1000;
pub(super) const S_ISN: u32 = 9000;

/// Builds frames as the client (inside) and as the server (outside).
pub(super) struct Peers {
    client: Template,
    server: Template,
}

impl Peers {
    pub(super) fn new() -> Peers {
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

    pub(super) fn frame(&self, from: Dir, seg: &Segment) -> Vec<u8> {
        let mut out = Vec::new();
        match from {
            Dir::Client => self.client.build(seg, &mut out),
            Dir::Server => self.server.build(seg, &mut out),
        };
        out
    }
}

pub(super) fn seg(seq: u32, ack: u32, syn: bool, payload: &[u8]) -> Segment {
    Segment {
        seq: SeqNum(seq),
        ack: SeqNum(ack),
        flags: Flags {
            syn,
            ack: ack != 0,
            ..Flags::default()
        },
        window: 65535,
        options: TcpOptions {
            mss: syn.then_some(1460),
            timestamps: Some(Timestamps { val: seq, ecr: 0 }),
            ..TcpOptions::default()
        },
        payload: payload.to_vec(),
    }
}

struct Bench {
    sp: Sessions,
    peers: Peers,
    now: Instant,
}

impl Bench {
    fn new(settings: SessionSettings) -> Bench {
        Bench::opened(settings, false)
    }

    /// A connection whose SYNs both permit SACK.
    fn with_sack(settings: SessionSettings) -> Bench {
        Bench::opened(settings, true)
    }

    fn opened(settings: SessionSettings, sack: bool) -> Bench {
        let mut b = Bench::answered(settings, sack);
        let ack = seg(C_ISN + 1, S_ISN + 1, false, b"");
        assert_eq!(b.send(Dir::Client, &ack), Disposition::Forward);
        b
    }

    /// A connection whose SYN-ACK came, the client's ACK not yet.
    fn answered(settings: SessionSettings, sack: bool) -> Bench {
        let mut b = Bench {
            sp: Sessions::new(settings),
            peers: Peers::new(),
            now: Instant::now(),
        };
        let mut syn = seg(C_ISN, 0, true, b"");
        syn.options.sack_permitted = sack;
        assert_eq!(b.send(Dir::Client, &syn), Disposition::Forward);
        let mut synack = seg(S_ISN, C_ISN + 1, true, b"");
        synack.options.sack_permitted = sack;
        assert_eq!(b.send(Dir::Server, &synack), Disposition::Forward);
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
        self.sp.out.drain().collect()
    }
}

/// No byte of the client's went toward the server since the last look.
fn assert_nothing_reached_the_server(b: &mut Bench, why: &str) {
    let out = b.sent();
    assert!(
        segments(&out, Side::Outside)
            .iter()
            .all(|s| s.payload.is_empty()),
        "{why}: the ClientHello reached the server"
    );
}

/// Connections passed to the fast path, or on their way there (their held
/// frames released, the server's ACK of them not yet seen).
fn bypassed(sp: &Sessions) -> usize {
    let releasing = sp
        .flows
        .values()
        .filter(|f| matches!(f.entry, Entry::Releasing(_)))
        .count();
    releasing
        + sp.ops
            .iter()
            .filter(|o| matches!(o, MapOp::Bypass(_)))
            .count()
}

/// Bypass verdicts sent to XDP.
fn on_fast_path(sp: &Sessions) -> usize {
    sp.ops
        .iter()
        .filter(|o| matches!(o, MapOp::Bypass(_)))
        .count()
}

/// Split everything on port 443 but `*.bank.example`.
fn bank_exempt() -> SessionSettings {
    SessionSettings {
        policy: Arc::new(Policy::split_all(
            &[443],
            vec!["*.bank.example".parse().unwrap()],
        )),
        ..SessionSettings::default()
    }
}

/// The one segment sent toward the client among `out`.
fn only_ack_to_client(out: &[(Side, Vec<u8>)]) -> Segment {
    let acks = segments(out, Side::Inside);
    let [a] = &acks[..] else {
        panic!("one ACK to the client: {acks:?}")
    };
    a.clone()
}

/// A policy of no rule but the default.
fn with_default(action: Action) -> SessionSettings {
    let mut p = Policy::split_all(&[443], Vec::new());
    p.default_action = action;
    SessionSettings {
        policy: Arc::new(p),
        ..SessionSettings::default()
    }
}

/// A policy of one rule on server names; the rest is split.
fn one_rule(action: Action, sni: &str) -> SessionSettings {
    let mut p = Policy::split_all(&[443], Vec::new());
    p.rules.push(Rule {
        name: "the-rule".into(),
        matcher: Match {
            sni: vec![sni.parse().unwrap()],
            ..Match::default()
        },
        action,
        profile: None,
        server_profile: None,
    });
    SessionSettings {
        policy: Arc::new(p),
        ..SessionSettings::default()
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

/// The rest of a forgotten connection's ClientHello (from offset 100)
/// goes nowhere: the server gets a RST (and the probe) at most, never a
/// byte; the client is answered with a RST.
fn rest_is_reset(b: &mut Bench, rest: &[u8]) {
    let (d, _) = b.client_data(100, rest);
    assert_eq!(d, Disposition::Consumed);
    let out = b.sent();
    let to_server = segments(&out, Side::Outside);
    assert!(
        to_server.iter().all(|s| s.payload.is_empty()),
        "{to_server:?}"
    );
    assert!(segments(&out, Side::Inside).iter().all(|s| s.flags.rst));
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
    let mut sp = Sessions::new(SessionSettings {
        max_flows: 3,
        ..SessionSettings::default()
    });
    let send = |sp: &mut Sessions, port: u16, from: Dir, s: &Segment| {
        let side = if from == Dir::Client {
            Side::Inside
        } else {
            Side::Outside
        };
        sp.on_frame(side, &Peers::on_port(port).frame(from, s), now)
    };
    // A handshake and the client's first bytes (not TLS: split at once).
    let split_on = |sp: &mut Sessions, port: u16| {
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
    assert_eq!(sp.live().active, 2);
    // With only live splits left, a new connection goes untracked.
    let mut sp1 = Sessions::new(SessionSettings {
        max_flows: 1,
        ..SessionSettings::default()
    });
    split_on(&mut sp1, 1);
    assert_eq!(sp1.counters.split, 1);
    send(&mut sp1, 2, Dir::Client, &seg(C_ISN, 0, true, b""));
    assert_eq!((sp1.counters.evicted, sp1.counters.table_full), (0, 1));
}

#[test]
fn a_clienthello_in_two_segments_is_held_then_split() {
    let mut b = Bench::new(SessionSettings::default());
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

/// A ClientHello whose first segment is lost: the server would answer the
/// second with a duplicate ACK and a SACK block at once, and the client
/// would resend the first within a round trip. The hold answers so, as
/// the server, acknowledging nothing new, so an exempt connection still
/// goes to the fast path once the first segment comes.
#[test]
fn a_segment_after_missing_first_bytes_draws_a_duplicate_ack_with_sack() {
    let mut b = Bench::with_sack(bank_exempt());
    let hello = client_hello("www.bank.example", &[]);
    let (first, rest) = hello.split_at(100);
    let (d, f2) = b.client_data(100, rest);
    assert_eq!(d, Disposition::Consumed);
    let out = b.sent();
    assert!(segments(&out, Side::Outside).is_empty(), "{out:?}");
    let a = &only_ack_to_client(&out);
    assert!(a.flags.ack && !a.flags.syn && !a.flags.rst && a.payload.is_empty());
    assert_eq!((a.seq, a.ack), (SeqNum(S_ISN + 1), SeqNum(C_ISN + 1)));
    assert_eq!(a.window, 65535, "the window the server offered");
    let end = C_ISN + 1 + hello.len() as u32;
    assert_eq!(a.options.sack, [(SeqNum(C_ISN + 101), SeqNum(end))]);
    // The echo is of the last segment in order (the handshake's ACK).
    assert_eq!(a.options.timestamps.unwrap().ecr, C_ISN + 1);
    assert_eq!(b.sp.counters.hold_sacks, 1);
    // The same segment again says nothing new: no second ACK.
    b.client_data(100, rest);
    assert!(b.sent().is_empty());
    // The first segment, resent (with the client's clock of then),
    // completes the ClientHello: released unchanged, in arrival order,
    // and the flow goes to the fast path.
    let mut again = seg(C_ISN + 1, S_ISN + 1, false, first);
    again.options.timestamps = Some(Timestamps {
        val: C_ISN + 2000,
        ecr: S_ISN,
    });
    b.send(Dir::Client, &again);
    let f1 = b.peers.frame(Dir::Client, &again);
    assert_eq!(b.sent(), vec![(Side::Outside, f2), (Side::Outside, f1)]);
    assert_eq!((b.sp.counters.policy_pass, bypassed(&b.sp)), (1, 1));
    assert_eq!(b.sp.counters.hold_acks, 0);
}

/// A hold that times out still waiting for the client's first bytes is
/// counted apart from one whose ClientHello began and stalled: the first
/// is loss before the engine, the second a slow or evasive client.
#[test]
fn a_hold_timing_out_without_the_first_bytes_is_counted_apart() {
    let mut b = Bench::with_sack(SessionSettings::default());
    let timeout = SessionSettings::default().hold_timeout;
    b.client_data(1448, &[7; 1448]);
    b.sp.on_timers(b.now + timeout);
    let c = &b.sp.counters;
    assert_eq!((c.hold_timeouts, c.hold_timeouts_start_missing), (1, 1));
}

/// A missing segment between held ones: the duplicate ACK reports only
/// what is above its ACK (a block at the ACK would be discarded); without
/// SACK it is a plain duplicate ACK.
#[test]
fn a_gap_inside_the_clienthello_draws_blocks_above_the_ack_only() {
    for sack in [true, false] {
        let mut b = Bench::opened(SessionSettings::default(), sack);
        let hello = client_hello("shop.example", &[b"h2"]);
        let (a, bc) = hello.split_at(100);
        let (_, c) = bc.split_at(100);
        b.client_data(0, a);
        assert!(b.sent().is_empty(), "bytes in order draw nothing yet");
        b.client_data(200, c);
        let d = &only_ack_to_client(&b.sent());
        assert_eq!(d.ack, SeqNum(C_ISN + 1));
        let end = C_ISN + 1 + hello.len() as u32;
        let want = if sack {
            vec![(SeqNum(C_ISN + 201), SeqNum(end))]
        } else {
            Vec::new()
        };
        assert_eq!(d.options.sack, want);
        b.client_data(100, &bc[..100]);
        assert_eq!((b.sp.counters.hellos, b.sp.counters.split), (1, 1));
    }
}

/// A ClientHello beyond the initial window, with holes: the segment that
/// brings two segments in order draws one ACK of them, whose SACK blocks
/// all lie above it.
#[test]
fn an_ack_of_bytes_in_order_carries_only_the_blocks_above_it() {
    let mut b = Bench::with_sack(SessionSettings::default());
    let long: Vec<Vec<u8>> = (0..100u8).map(|i| vec![b'a' + i % 26; 200]).collect();
    let alpn: Vec<&[u8]> = long.iter().map(Vec::as_slice).collect();
    let hello = client_hello("big.example", &alpn);
    const MSS: usize = 1460;
    let chunk = |i: usize| &hello[i * MSS..(i + 1) * MSS];
    for i in [0, 2, 4] {
        b.client_data((i * MSS) as u32, chunk(i));
    }
    b.sent();
    b.client_data(MSS as u32, chunk(1));
    let a = &only_ack_to_client(&b.sent());
    assert_eq!(a.ack, SeqNum(C_ISN + 1 + 3 * MSS as u32));
    let at = |i: usize| SeqNum(C_ISN + 1 + (i * MSS) as u32);
    assert_eq!(a.options.sack, [(at(4), at(5))]);
    assert_eq!((b.sp.counters.hold_acks, b.sp.counters.hold_sacks), (1, 2));
}

/// The client's FIN after missing bytes: the block covers its sequence
/// number, as a receiver's does (else the sender does not count the
/// segment as SACKed).
#[test]
fn a_fin_after_missing_bytes_is_inside_the_block() {
    let hello = client_hello("shop.example", &[]);
    let end = C_ISN + 1 + hello.len() as u32;
    // On the last data segment, and alone after it.
    for alone in [false, true] {
        let mut b = Bench::with_sack(SessionSettings::default());
        let mut last = seg(C_ISN + 101, S_ISN + 1, false, &hello[100..]);
        last.flags.fin = !alone;
        b.send(Dir::Client, &last);
        if alone {
            b.sent();
            let mut fin = seg(end, S_ISN + 1, false, b"");
            fin.flags.fin = true;
            b.send(Dir::Client, &fin);
        }
        let d = &only_ack_to_client(&b.sent());
        assert_eq!(d.ack, SeqNum(C_ISN + 1));
        assert_eq!(d.options.sack, [(SeqNum(C_ISN + 101), SeqNum(end + 1))]);
    }
    // A FIN alone after the last bytes, when a lower block arrived since:
    // the block it ends (drew the ACK) comes first, then the other.
    let mut b = Bench::with_sack(SessionSettings::default());
    let at = |o: usize| SeqNum(C_ISN + 1 + o as u32);
    b.client_data(300, &hello[300..]);
    b.client_data(100, &hello[100..200]);
    b.sent();
    let mut fin = seg(end, S_ISN + 1, false, b"");
    fin.flags.fin = true;
    b.send(Dir::Client, &fin);
    let d = &only_ack_to_client(&b.sent());
    let blocks = [(at(300), SeqNum(end + 1)), (at(100), at(200))];
    assert_eq!(d.options.sack, blocks);
}

/// Sends a ClientHello of about 20 KiB for `name` as a Linux client
/// would: ten segments of 1460 bytes, then only what the ACKs it gets
/// open. Checks each ACK the hold sends; returns the ClientHello, the
/// segments the hold acknowledged it with and the bytes sent toward the
/// server.
fn send_a_large_clienthello(b: &mut Bench, name: &str) -> (Vec<u8>, Vec<Segment>, Vec<u8>) {
    let long: Vec<Vec<u8>> = (0..100u8).map(|i| vec![b'a' + i % 26; 200]).collect();
    let alpn: Vec<&[u8]> = long.iter().map(Vec::as_slice).collect();
    let hello = client_hello(name, &alpn);
    assert!(hello.len() > 16 << 10, "{}", hello.len());
    const MSS: usize = 1460;
    let window = 10 * MSS;
    let (mut sent, mut acked) = (0usize, 0usize);
    let (mut acks, mut upstream) = (Vec::new(), Vec::new());
    while sent < hello.len() {
        let before = sent;
        while sent < hello.len() && sent < acked + window {
            let end = (sent + MSS).min(hello.len());
            b.client_data(sent as u32, &hello[sent..end]);
            sent = end;
        }
        let held = b.sp.counters.hellos == 0;
        let out = b.sent();
        for s in segments(&out, Side::Outside) {
            upstream.extend_from_slice(&s.payload);
        }
        for a in segments(&out, Side::Inside) {
            if !held {
                continue; // what follows the decision
            }
            assert!(a.flags.ack && !a.flags.rst && a.payload.is_empty(), "{a:?}");
            let upto = a.ack.since(SeqNum(C_ISN + 1)) as usize;
            assert!(upto <= sent, "acknowledged beyond what was sent");
            // The window's right edge stays where the server put it.
            assert_eq!(upto + usize::from(a.window), 65535, "{a:?}");
            assert_eq!(a.seq, SeqNum(S_ISN + 1));
            acked = acked.max(upto);
            acks.push(a);
        }
        assert!(
            sent > before || b.sp.counters.hellos == 1,
            "stalled at {sent}"
        );
    }
    (hello, acks, upstream)
}

/// A ClientHello larger than the client's initial window (ten segments):
/// the client sends no more until acknowledged, so the hold acknowledges
/// it as the server, and the ClientHello completes and is decided on
/// instead of timing out undecided (and undecrypted).
#[test]
fn a_clienthello_larger_than_the_initial_window_is_acknowledged_in_the_hold() {
    let mut b = Bench::new(one_rule(Action::Block, "big.example"));
    let (_, acks, upstream) = send_a_large_clienthello(&mut b, "big.example");
    assert!(
        upstream.is_empty(),
        "a refused ClientHello reached the server"
    );
    // The ClientHello came whole and was decided on by its name.
    assert_eq!(b.sp.counters.hellos, 1);
    assert_eq!(b.sp.counters.hold_timeouts, 0);
    assert_eq!(b.sp.counters.refused, 1);
    assert!(b.sp.counters.hold_acks > 0);
    // Each carried the server's clock and echoed the client's.
    let ts = acks[0].options.timestamps.expect("timestamps");
    assert_eq!(ts.val, S_ISN);
    assert!(ts.ecr > C_ISN);
}

/// A connection whose ClientHello the hold acknowledged is never passed
/// to the fast path: the client will not send those bytes again, so they
/// go to the server through a half that retransmits them.
#[test]
fn an_acknowledged_clienthello_is_relayed_not_bypassed() {
    let mut b = Bench::new(one_rule(Action::NoDecrypt, "big.example"));
    let (hello, _, relayed) = send_a_large_clienthello(&mut b, "big.example");
    assert_eq!(b.sp.counters.hellos, 1);
    assert_eq!(b.sp.counters.policy_pass, 1);
    assert_eq!(bypassed(&b.sp), 0);
    assert_eq!(b.sp.counters.split, 1);
    let e = &b.sp.events;
    assert!(
        e.is_empty() || e[0].action == Some(Action::NoDecrypt),
        "{e:?}"
    );
    // The ClientHello leaves toward the server from the relay's half (as
    // far as the server's window lets it), not as the held frames.
    assert!(!relayed.is_empty() && relayed.len() <= hello.len());
    assert_eq!(relayed[..], hello[..relayed.len()]);
}

/// A held connection whose ClientHello the hold acknowledged, evicted to
/// make room: the client will not send those bytes again, so it becomes a
/// relay that delivers them and stays in the table (a live split is never
/// evicted), instead of being forgotten with the bytes it owes the server.
#[test]
fn an_acknowledged_clienthello_evicted_from_the_hold_is_relayed_and_kept() {
    let mut b = Bench::new(SessionSettings {
        max_flows: 1,
        ..SessionSettings::default()
    });
    let long: Vec<Vec<u8>> = (0..100u8).map(|i| vec![b'a' + i % 26; 200]).collect();
    let alpn: Vec<&[u8]> = long.iter().map(Vec::as_slice).collect();
    let hello = client_hello("big.example", &alpn);
    // The client's initial window: ten segments, acknowledged by the hold.
    let first = 10 * 1460;
    for off in (0..first).step_by(1460) {
        b.client_data(off as u32, &hello[off..off + 1460]);
    }
    assert!(b.sp.counters.hold_acks > 0);
    let acked = segments(&b.sent(), Side::Inside)
        .iter()
        .map(|a| a.ack.since(SeqNum(C_ISN + 1)) as usize)
        .max()
        .expect("the hold's ACK");
    assert!(acked > 0 && b.sp.counters.hellos == 0);
    // Another connection needs the place.
    // Its SYN finds no room: the policy would split it, which the engine
    // cannot, so it is dropped (`--mid-flow drop`: the client tries again).
    let other = Peers::on_port(40001).frame(Dir::Client, &seg(C_ISN, 0, true, b""));
    assert_eq!(
        b.sp.on_frame(Side::Inside, &other, b.now),
        Disposition::Consumed
    );
    assert_eq!(b.sp.counters.split, 1);
    assert_eq!(b.sp.counters.table_full, 1, "no room: only a live split");
    assert_eq!(b.sp.counters.uninspectable, 1);
    assert_eq!(bypassed(&b.sp), 0);
    let d = b.sp.describe(&e_key()).expect("the relay is still listed");
    assert_eq!(d.state, "split");
    // What the hold acknowledged goes to the server from the relay's half,
    // as fast as the server's ACKs open its window.
    let mut to_server: Vec<u8> = Vec::new();
    for _ in 0..50 {
        for s in segments(&b.sent(), Side::Outside) {
            let off = s.seq.since(SeqNum(C_ISN + 1)) as usize;
            if off == to_server.len() {
                to_server.extend_from_slice(&s.payload);
            }
        }
        if to_server.len() >= acked {
            break;
        }
        let ack = seg(S_ISN + 1, C_ISN + 1 + to_server.len() as u32, false, b"");
        b.send(Dir::Server, &ack);
    }
    assert!(to_server.len() >= acked, "{} of {acked}", to_server.len());
    assert_eq!(to_server[..], hello[..to_server.len()]);
    // The rest of the ClientHello follows through the relay, and no
    // record is written before the connection ends.
    let (d, _) = b.client_data(first as u32, &hello[first..first + 1460]);
    assert_eq!(d, Disposition::Consumed);
    assert!(b.sp.events.is_empty(), "{:?}", b.sp.events);
}

#[test]
fn held_data_older_than_a_later_ack_is_not_taken_for_a_duplicate() {
    let mut b = Bench::new(SessionSettings::default());
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
    // The rest comes after the ACK, as the client's clock says (an older
    // TSval than the ACK's would fail the server's PAWS, and the hold
    // drops it as the server would).
    let mut rest = seg(C_ISN + 51, S_ISN + 1, false, &hello[50..]);
    rest.options.timestamps = Some(Timestamps {
        val: 5001,
        ecr: S_ISN,
    });
    b.send(Dir::Client, &rest);
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
    let mut b = Bench::new(bank_exempt());
    let hello = client_hello("www.bank.example", &[]);
    let (first, rest) = hello.split_at(100);
    let (_, f1) = b.client_data(0, first);
    let (_, f2) = b.client_data(100, rest);
    let out = b.sent();
    assert_eq!(out, vec![(Side::Outside, f1), (Side::Outside, f2)]);
    assert_eq!(b.sp.counters.policy_pass, 1);
    assert_eq!(bypassed(&b.sp), 1);
    // Its cost is counted once: on the segment that completed the hello.
    assert_eq!(b.sp.counters.decision_us.iter().sum::<u64>(), 1);
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
    // Not on the fast path yet: until the server acknowledges the released
    // bytes, the client's frames go out behind them, in order (on the fast
    // path a copy sent right after could overtake them).
    assert_eq!(on_fast_path(&b.sp), 0);
    let (d, again) = b.client_data(0, first);
    assert_eq!(d, Disposition::Consumed);
    assert_eq!(b.sent(), vec![(Side::Outside, again)]);
    // A copy of those bytes that says otherwise goes nowhere.
    let evil = client_hello("www.evil.example", &[]);
    let at = evil.len().min(hello.len()) - 50;
    assert_ne!(evil[..at], hello[..at]);
    assert_eq!(b.client_data(0, &evil[..at]).0, Disposition::Consumed);
    assert!(b.sent().is_empty(), "the differing copy was sent");
    assert_eq!(b.sp.counters.hold_conflicts, 1);
    let end = C_ISN + 1 + hello.len() as u32;
    let short = seg(S_ISN + 1, end - 1, false, b"");
    assert_eq!(b.send(Dir::Server, &short), Disposition::Forward);
    assert_eq!(on_fast_path(&b.sp), 0, "not all acknowledged");
    let acked = seg(S_ISN + 1, end, false, b"");
    assert_eq!(b.send(Dir::Server, &acked), Disposition::Forward);
    assert_eq!(on_fast_path(&b.sp), 1, "all acknowledged");
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
    // The ClientHello had begun: not a loss before the engine.
    assert_eq!(b.sp.counters.hold_timeouts_start_missing, 0);
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
    let timeout = SessionSettings::default().hold_timeout;
    // Split by default: the held bytes go into the split.
    let mut b = Bench::new(SessionSettings::default());
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

/// A hold that times out under a decrypt rule has nothing to decrypt:
/// relayed, it would carry the client's TLS undecrypted (a ClientHello
/// sent slowly would get past the rule), so the profile's `unsupported`
/// decides: `block` (the default) refuses it, `no-decrypt` relays it.
#[test]
fn a_hold_without_a_decision_under_decrypt_follows_the_profile() {
    use crate::policy::{Fallback, Profile};
    let timeout = SessionSettings::default().hold_timeout;
    for unsupported in [Fallback::Block, Fallback::NoDecrypt] {
        let mut policy = Policy::split_all(&[443], Vec::new());
        policy.rules.push(Rule {
            name: "decrypt-all".into(),
            matcher: Match::default(),
            action: Action::Decrypt,
            profile: Some("p".into()),
            server_profile: None,
        });
        policy.profiles.insert(
            "p".into(),
            Profile {
                unsupported,
                ..Profile::default()
            },
        );
        let mut b = Bench::new(SessionSettings {
            policy: Arc::new(policy),
            ..SessionSettings::default()
        });
        b.client_data(0, &[22, 3, 1, 0x40, 0, 1, 0, 0x3f, 0xfc]);
        b.sp.on_timers(b.now + timeout);
        let c = b.sp.counters;
        assert_eq!(c.hold_timeouts, 1);
        if unsupported == Fallback::NoDecrypt {
            assert_eq!((c.split, c.refused), (1, 0));
            continue;
        }
        assert_eq!((c.split, c.refused), (0, 1));
        assert_reset_both_ways(&b.sent());
        let e = &b.sp.events[0];
        assert_eq!(
            (e.end.as_str(), e.action),
            ("blocked", Some(Action::Decrypt))
        );
        assert!(
            e.note.as_deref().is_some_and(|n| n.contains("unsupported")),
            "{e:?}"
        );
    }
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

/// URG from the client before the decision is cleared: a server reading
/// without SO_OOBINLINE would take the byte before the pointer out of the
/// stream, and read other bytes than the decision did. URG used to pass
/// the connection undecided, which let any client skip inspection.
#[test]
fn urgent_data_before_the_decision_is_read_in_line() {
    let urgent = |s: &mut Segment| {
        s.flags.urg = true;
    };
    // An exempt name: passed, its held frame released without URG.
    let mut b = Bench::new(bank_exempt());
    let mut s = seg(
        C_ISN + 1,
        S_ISN + 1,
        false,
        &client_hello("www.bank.example", &[]),
    );
    urgent(&mut s);
    assert_eq!(b.send(Dir::Client, &s), Disposition::Consumed);
    assert_eq!((bypassed(&b.sp), b.sp.counters.urgent_cleared), (1, 1));
    let released = segments(&b.sent(), Side::Outside);
    assert_eq!(released.len(), 1);
    assert!(!released[0].flags.urg);
    assert_eq!(released[0].payload, s.payload);
    // Another: split on its name, never passed undecided.
    let mut b = Bench::new(bank_exempt());
    let mut s = seg(
        C_ISN + 1,
        S_ISN + 1,
        false,
        &client_hello("www.evil.example", &[]),
    );
    urgent(&mut s);
    b.send(Dir::Client, &s);
    let c = &b.sp.counters;
    assert_eq!((c.split, c.passthrough, bypassed(&b.sp)), (1, 0, 0));
    // A block by name still blocks.
    let mut b = Bench::new(one_rule(Action::Block, "*.bad.example"));
    let mut s = seg(
        C_ISN + 1,
        S_ISN + 1,
        false,
        &client_hello("www.bad.example", &[]),
    );
    urgent(&mut s);
    b.send(Dir::Client, &s);
    assert_eq!((b.sp.counters.refused, bypassed(&b.sp)), (1, 0));
    // A pure ACK with URG in the hold goes on, cleared.
    let mut b = Bench::new(bank_exempt());
    let mut ack = seg(C_ISN + 1, S_ISN + 1, false, b"");
    urgent(&mut ack);
    ack.window = 1000;
    assert_eq!(b.send(Dir::Client, &ack), Disposition::Consumed);
    let on = segments(&b.sent(), Side::Outside);
    assert_eq!(on.len(), 1);
    assert!(!on[0].flags.urg && on[0].window == 1000);
}

#[test]
fn more_than_the_bound_is_released() {
    let mut b = Bench::new(SessionSettings {
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
    let mut b = Bench::new(SessionSettings::default());
    b.client_data(0, b"GET / HTTP/1.1\r\n\r\n");
    assert_eq!((b.sp.counters.not_tls, b.sp.counters.split), (1, 1));
    let to_server = segments(&b.sent(), Side::Outside);
    assert_eq!(to_server[0].payload, b"GET / HTTP/1.1\r\n\r\n");

    let mut b = Bench::new(SessionSettings::default());
    let banner = seg(S_ISN + 1, C_ISN + 1, false, b"220 smtp ready\r\n");
    assert_eq!(b.send(Dir::Server, &banner), Disposition::Consumed);
    assert_eq!((b.sp.counters.server_first, b.sp.counters.split), (1, 1));
    let to_client = segments(&b.sent(), Side::Inside);
    assert_eq!(to_client[0].payload, b"220 smtp ready\r\n");
}

#[test]
fn a_reset_during_the_hold_ends_it_and_the_held_data_stays() {
    let mut b = Bench::new(SessionSettings::default());
    b.client_data(0, &[22, 3, 1]);
    // A RST at the end of the held bytes: the client is gone. The server
    // gets it at the first held byte, where it takes it (at the end it
    // would challenge it and keep its socket).
    let mut rst = seg(C_ISN + 4, S_ISN + 1, false, b"");
    rst.flags.rst = true;
    assert_eq!(b.send(Dir::Client, &rst), Disposition::Consumed);
    let out = b.sent();
    let on = segments(&out, Side::Outside);
    assert_eq!(on.len(), 1, "the held bytes are not released: {on:?}");
    assert!(on[0].flags.rst && on[0].payload.is_empty());
    assert_eq!(on[0].seq, SeqNum(C_ISN + 1));
    assert_eq!((b.sp.counters.split, bypassed(&b.sp)), (0, 0));
    assert_eq!(b.sp.counters.passthrough, 1, "counted once");
    // Within the held bytes, a RST is neither where the server takes one
    // nor the client's next: dropped, and the hold goes on.
    let mut b = Bench::new(SessionSettings::default());
    b.client_data(0, &[22, 3, 1]);
    let mut inside = seg(C_ISN + 2, S_ISN + 1, false, b"");
    inside.flags.rst = true;
    assert_eq!(b.send(Dir::Client, &inside), Disposition::Consumed);
    assert_eq!(
        (b.sp.counters.bogus_resets, b.sp.counters.passthrough),
        (1, 0)
    );
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
    assert_eq!(b.sp.counters.passthrough, 0, "nothing passed");
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
    let mut sp = Sessions::new(one_rule(Action::Block, "*.bad.example"));
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
    // Both ends are reset, each where it expects the next byte: the
    // client at what it acknowledged, the server at the dropped segment,
    // and the server is probed one below, should that miss.
    let out: Vec<_> = sp.out.drain().collect();
    assert_reset_both_ways(&out);
    assert_eq!(segments(&out, Side::Inside)[0].seq, SeqNum(S_ISN + 1));
    let to_server = segments(&out, Side::Outside);
    assert_eq!(
        to_server
            .iter()
            .map(|s| (s.seq, s.flags.rst))
            .collect::<Vec<_>>(),
        [(SeqNum(C_ISN + 1), true), (SeqNum(C_ISN), false)]
    );
    // Later segments go nowhere; each is answered with a RST back (so an
    // end the first RST missed is reset at its next segment: here the
    // server's answer to the probe, its exact numbers).
    let probe_answer = peers.frame(Dir::Server, &seg(S_ISN + 1, C_ISN + 1, false, b""));
    assert_eq!(
        sp.on_frame(Side::Outside, &probe_answer, Instant::now()),
        Disposition::Consumed
    );
    let out: Vec<_> = sp.out.drain().collect();
    assert_eq!(out.len(), 1);
    let back = &segments(&out, Side::Outside)[0];
    assert_eq!((back.seq, back.flags.rst), (SeqNum(C_ISN + 1), true));
    // A RST is never answered.
    let mut rst = seg(S_ISN + 1, C_ISN + 1, false, b"");
    rst.flags.rst = true;
    let rst = peers.frame(Dir::Server, &rst);
    assert_eq!(
        sp.on_frame(Side::Outside, &rst, Instant::now()),
        Disposition::Consumed
    );
    assert!(sp.out.is_empty());
    // Nor is a RST of a connection nobody follows: it goes on, and
    // nothing is kept or logged.
    let mut sp = Sessions::new(one_rule(Action::Block, "*.bad.example"));
    assert_eq!(
        sp.on_frame(Side::Outside, &rst, Instant::now()),
        Disposition::Forward
    );
    assert_eq!((sp.active(), sp.events.len(), sp.out.len()), (0, 0, 0));
    // Without a block that might apply, a policy that passes it leaves it
    // to the kernel.
    let mut passing = Policy::split_all(&[443], Vec::new());
    passing.default_action = Action::NoDecrypt;
    let mut sp = Sessions::new(SessionSettings {
        policy: Arc::new(passing),
        ..SessionSettings::default()
    });
    assert_eq!(
        sp.on_frame(Side::Inside, &f, Instant::now()),
        Disposition::Forward
    );
    assert_eq!((bypassed(&sp), sp.counters.uninspectable), (1, 0));
    // One that would split it, which cannot start mid-stream: reset
    // (`--mid-flow drop`, the default)...
    let mut sp = Sessions::new(SessionSettings::default());
    assert_eq!(
        sp.on_frame(Side::Inside, &f, Instant::now()),
        Disposition::Consumed
    );
    assert_eq!(
        (
            bypassed(&sp),
            sp.counters.uninspectable,
            sp.counters.refused
        ),
        (0, 1, 1)
    );
    assert_reset_both_ways(&sp.out);
    let e = &sp.events[0];
    assert_eq!((e.end.as_str(), e.rule.as_str()), ("blocked", "(mid-flow)"));
    assert!(
        e.note.as_deref().is_some_and(|n| n.contains("tcp-split")),
        "{e:?}"
    );
    // ...or passed uninspected with `--mid-flow pass`.
    let mut sp = Sessions::new(SessionSettings {
        mid_flow: MidFlow::Pass,
        ..SessionSettings::default()
    });
    assert_eq!(
        sp.on_frame(Side::Inside, &f, Instant::now()),
        Disposition::Forward
    );
    assert_eq!((bypassed(&sp), sp.counters.uninspectable), (1, 0));
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
    e_key_on(40000)
}

/// The key of a connection from client port `cport`.
fn e_key_on(cport: u16) -> FlowKey {
    let f = Peers::on_port(cport).frame(Dir::Client, &seg(C_ISN, 0, true, b""));
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
    let mut b = Bench::new(SessionSettings::default());
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
    let mut b = Bench::new(SessionSettings::default());
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

/// A live split's halves' counters show while it runs (`live`), and move
/// to the worker's totals when it ends: the sum never goes back, and a
/// long transfer's duplicates or retransmissions are not hidden until
/// its end.
#[test]
fn a_live_splits_counters_show_before_it_ends_and_move_to_the_totals() {
    let mut b = Bench::new(SessionSettings::default());
    let hello = client_hello("a.example", &[]);
    b.client_data(0, &hello);
    b.sent();
    // The client sends its ClientHello again: a duplicate for the half.
    b.client_data(0, &hello);
    let total = |b: &Bench| {
        let mut t = b.sp.counters;
        t.add(&b.sp.live());
        t
    };
    let live = b.sp.live();
    assert_eq!((live.active, live.duplicates), (1, 1), "{live:?}");
    assert_eq!((b.sp.counters.duplicates, b.sp.counters.closed), (0, 0));
    assert_eq!(total(&b).data_segments_in, 2);
    let n = hello.len() as u32;
    let mut rst = seg(C_ISN + 1 + n, S_ISN + 1, false, b"");
    rst.flags.rst = true;
    b.send(Dir::Client, &rst);
    let live = b.sp.live();
    assert_eq!((live.active, live.duplicates), (0, 0), "{live:?}");
    let t = total(&b);
    assert_eq!(
        (t.duplicates, t.closed, t.data_segments_in),
        (1, 1, 2),
        "{t:?}"
    );
}

/// A split connection whose ClientHello (of the returned length) the
/// server acknowledged; nothing sent since.
fn split_and_acked() -> (Bench, u32) {
    let mut b = Bench::new(SessionSettings::default());
    let hello = client_hello("a.example", &[]);
    let n = hello.len() as u32;
    b.client_data(0, &hello);
    b.send(Dir::Server, &seg(S_ISN + 1, C_ISN + 1 + n, false, b""));
    b.sent();
    (b, n)
}

/// A client that closed second (the engine's client half in TIME-WAIT)
/// opens a new connection from the same port at once: its SYN starts a
/// new connection (passed on, tracked afresh) and the finished split is
/// logged, instead of the SYN falling into the old split and the client
/// waiting a SYN retransmission out.
#[test]
fn a_new_syn_on_the_ports_of_a_finished_split_starts_afresh() {
    let (mut b, n) = split_and_acked();
    // The server closes first.
    let mut fin = seg(S_ISN + 1, C_ISN + 1 + n, false, b"");
    fin.flags.fin = true;
    b.send(Dir::Server, &fin);
    let toward_client = segments(&b.sent(), Side::Inside);
    assert!(
        toward_client.iter().any(|s| s.flags.fin),
        "{toward_client:?}"
    );
    // The client acknowledges and closes: the engine's client half is in
    // TIME-WAIT; the server acknowledges the engine's FIN.
    let mut fin = seg(C_ISN + 1 + n, S_ISN + 2, false, b"");
    fin.flags.fin = true;
    b.send(Dir::Client, &fin);
    b.sent();
    b.send(Dir::Server, &seg(S_ISN + 2, C_ISN + 2 + n, false, b""));
    b.sent();
    assert!(
        b.sp.events.iter().any(|e| e.end == "closed"),
        "{:?}",
        b.sp.events
    );
    let logged = b.sp.events.len();
    // A new connection on the same ports.
    let syn = seg(C_ISN + 1_000_000, 0, true, b"");
    assert_eq!(b.send(Dir::Client, &syn), Disposition::Forward);
    assert_eq!(b.sp.events.len(), logged, "logged once: {:?}", b.sp.events);
    let synack = seg(S_ISN + 5_000_000, C_ISN + 1_000_001, true, b"");
    assert_eq!(b.send(Dir::Server, &synack), Disposition::Forward);
}

/// A split that ended cleanly answers a late segment with a RST, as a
/// closed port does: here the server, its FIN's ACK lost, resends the FIN
/// after the engine's half left TIME-WAIT; dropped unanswered, it would
/// resend it for minutes in LAST-ACK.
#[test]
fn a_cleanly_ended_split_resets_a_late_fin() {
    let (mut b, n) = split_and_acked();
    // The client closes first; the server answers with its FIN, and the
    // engine's server half (FIN-WAIT-2) goes to TIME-WAIT, its ACK lost.
    let mut fin = seg(C_ISN + 1 + n, S_ISN + 1, false, b"");
    fin.flags.fin = true;
    b.send(Dir::Client, &fin);
    b.sent();
    b.send(Dir::Server, &seg(S_ISN + 1, C_ISN + 2 + n, false, b""));
    let mut server_fin = seg(S_ISN + 1, C_ISN + 2 + n, false, b"");
    server_fin.flags.fin = true;
    b.send(Dir::Server, &server_fin);
    b.send(Dir::Client, &seg(C_ISN + 2 + n, S_ISN + 2, false, b""));
    b.sent();
    assert!(
        b.sp.events.iter().any(|e| e.end == "closed"),
        "{:?}",
        b.sp.events
    );
    // TIME-WAIT is over: the split is gone.
    b.now += Duration::from_secs(120);
    b.sp.on_timers(b.now);
    assert_eq!(b.sp.live().active, 0);
    b.sent();
    // The server's FIN again: a RST at its ACK comes back, nothing goes on.
    assert_eq!(b.send(Dir::Server, &server_fin), Disposition::Consumed);
    let out = b.sent();
    assert!(segments(&out, Side::Inside).is_empty(), "{out:?}");
    let back = segments(&out, Side::Outside);
    assert_eq!(back.len(), 1, "{back:?}");
    assert!(
        back[0].flags.rst && back[0].seq == SeqNum(C_ISN + 2 + n),
        "{back:?}"
    );
    // A RST is not answered.
    let mut rst = seg(S_ISN + 2, C_ISN + 2 + n, false, b"");
    rst.flags.rst = true;
    assert_eq!(b.send(Dir::Server, &rst), Disposition::Consumed);
    assert!(b.sent().is_empty());
    // Both counted after the end; the FIN's answer as a RST sent.
    let c = &b.sp.counters;
    assert_eq!((c.after_close, c.after_close_resets), (2, 1));
}

#[test]
fn a_flow_seen_mid_stream_is_not_blamed_on_a_rule() {
    let mut sp = Sessions::new(one_rule(Action::Block, "*.bad.example"));
    let data = seg(C_ISN + 1, S_ISN + 1, false, b"\x16\x03\x01");
    let f = Peers::new().frame(Dir::Client, &data);
    sp.on_frame(Side::Inside, &f, Instant::now());
    let e = &sp.events[0];
    assert_eq!(
        (e.action, e.rule.as_str()),
        (Some(Action::Block), "(mid-flow)")
    );
    assert!(e.note.as_deref().is_some_and(|n| n.contains("mid-flow")));
}

#[test]
fn stopping_resets_a_live_split_on_both_sides_and_logs_it() {
    let mut b = Bench::new(SessionSettings::default());
    let req = b"GET / HTTP/1.1\r\n\r\n";
    b.client_data(0, req);
    b.sent();
    b.sp.stop_taking();
    assert_eq!(b.sp.unfinished(), 1);
    b.sp.stop_all(b.now);
    let out = b.sent();
    assert_reset_both_ways(&out);
    // Each RST at the sequence number its receiver expects next: the
    // client has had nothing from the server; the server has the request.
    let rst = |to| {
        segments(&out, to)
            .into_iter()
            .find(|s| s.flags.rst)
            .unwrap()
            .seq
    };
    assert_eq!(rst(Side::Inside), SeqNum(S_ISN + 1));
    assert_eq!(rst(Side::Outside), SeqNum(C_ISN + 1 + req.len() as u32));
    let e = b.sp.events.last().expect("a record");
    assert_eq!(
        (e.end.as_str(), e.action, e.bytes_c2s),
        ("engine-stopped", Some(Action::TcpSplit), req.len() as u64)
    );
    assert_eq!((b.sp.counters.stopped, b.sp.unfinished()), (1, 0));
}

/// A client that reads nothing is still reset when the engine stops. Its
/// window is shut and it refused the engine's zero-window probe, so
/// SND.NXT is one past what it expects: a RST there lies outside its
/// window and Linux drops it unseen (curl waited on, an outside run).
/// The RST goes at the window's edge, the byte it expects; and should a
/// RST of ours miss anyway, the peer's next segment (its challenge ACK)
/// is answered with a RST at the sequence number it acknowledges.
#[test]
fn a_reader_with_a_shut_window_is_reset_where_it_expects_when_the_engine_stops() {
    let mut b = Bench::new(SessionSettings::default());
    let req = b"GET / HTTP/1.1\r\n\r\n";
    let n = req.len() as u32;
    b.client_data(0, req);
    b.sent();
    let body = [7u8; 1000];
    b.send(Dir::Server, &seg(S_ISN + 1, C_ISN + 1 + n, false, &body));
    assert!(segments(&b.sent(), Side::Inside)
        .iter()
        .any(|s| s.payload.len() == body.len()));
    // The client takes it all and shuts its window; the server sends more.
    let mut shut = seg(C_ISN + 1 + n, S_ISN + 1 + 1000, false, b"");
    shut.window = 0;
    b.send(Dir::Client, &shut);
    b.send(Dir::Server, &seg(S_ISN + 1001, C_ISN + 1 + n, false, &body));
    b.sent();
    // The persist timer sends the probe (an RTO or so later).
    let mut probe = Vec::new();
    for _ in 0..60 {
        b.now += Duration::from_millis(500);
        b.sp.on_timers(b.now);
        probe = segments(&b.sent(), Side::Inside);
        if !probe.is_empty() {
            break;
        }
    }
    assert!(
        probe
            .iter()
            .any(|s| s.seq == SeqNum(S_ISN + 1001) && s.payload.len() == 1),
        "a zero-window probe of one new byte: {probe:?}"
    );
    // Refused: the client acknowledges what it had, the window still shut.
    shut.options.timestamps = Some(Timestamps {
        val: C_ISN + 2 + n,
        ecr: 0,
    });
    b.send(Dir::Client, &shut);
    b.sent();

    b.sp.stop_all(b.now);
    let out = b.sent();
    assert_reset_both_ways(&out);
    let rst = segments(&out, Side::Inside)
        .into_iter()
        .find(|s| s.flags.rst)
        .unwrap();
    assert_eq!(rst.seq, SeqNum(S_ISN + 1001), "{rst:?}");

    // A peer our RST missed answers it with a challenge ACK: it is told
    // at once, with a RST at what it acknowledges.
    shut.options.timestamps = Some(Timestamps {
        val: C_ISN + 3 + n,
        ecr: 0,
    });
    assert_eq!(b.send(Dir::Client, &shut), Disposition::Consumed);
    let back = segments(&b.sent(), Side::Inside);
    assert!(
        matches!(&back[..], [r] if r.flags.rst && r.seq == SeqNum(S_ISN + 1001)),
        "{back:?}"
    );
    // A RST is not answered.
    let mut peer_rst = seg(C_ISN + 1 + n, 0, false, b"");
    peer_rst.flags.rst = true;
    b.send(Dir::Client, &peer_rst);
    assert!(b.sent().is_empty());
}

#[test]
fn a_connection_held_for_its_decision_is_reset_when_the_engine_stops() {
    let mut b = Bench::new(SessionSettings::default());
    let hello = client_hello("a.example", &[]);
    assert_eq!(b.client_data(0, &hello[..100]).0, Disposition::Consumed);
    assert_eq!(b.sp.unfinished(), 1);
    b.sp.stop_all(b.now);
    // Nothing held reaches the server; both ends are reset.
    assert_reset_both_ways(&b.sent());
    let e = b.sp.events.last().expect("a record");
    assert_eq!(
        (e.end.as_str(), e.rule.as_str(), e.action),
        ("engine-stopped", "(engine-stopped)", None)
    );
    assert_eq!(b.sp.events.len(), 1, "{:?}", b.sp.events);
    assert_eq!(b.sp.unfinished(), 0);
}

#[test]
fn while_stopping_new_connections_are_dropped_and_live_ones_still_served() {
    let mut b = Bench::new(SessionSettings::default());
    b.client_data(0, b"GET / HTTP/1.1\r\n\r\n");
    b.sent();
    b.sp.stop_taking();
    let other = Peers::on_port(40001);
    let syn = other.frame(Dir::Client, &seg(C_ISN, 0, true, b""));
    assert_eq!(
        b.sp.on_frame(Side::Inside, &syn, b.now),
        Disposition::Consumed
    );
    assert_eq!(b.sp.counters.refused_stopping, 1);
    assert!(b.sp.describe(&e_key_on(40001)).is_none());
    // The live split still relays.
    let (d, _) = b.client_data(18, b"more");
    assert_eq!(d, Disposition::Consumed);
    let to_server = segments(&b.sent(), Side::Outside);
    assert!(
        to_server.iter().any(|s| s.payload == b"more"),
        "{to_server:?}"
    );
}

/// ClientHellos naming a blocked site, made malformed on purpose: the TLS
/// parser refuses some whole (a NUL in the name, the extension twice),
/// takes others without a name (an address). Each is decided without a
/// name and fails closed: the block that might apply blocks it, nothing
/// reaches the server, and its record says why it had no name. (They
/// used to be relayed as "not TLS", byte for byte, to a server that could
/// read the name.)
#[test]
fn a_malformed_server_name_cannot_get_past_a_block() {
    use crate::tls::hello::tests::with_extension;
    let bare = client_hello("198.18.0.2", &[]);
    let sni = |name: &[u8]| {
        let mut ext = ((name.len() + 3) as u16).to_be_bytes().to_vec();
        ext.push(0);
        ext.extend_from_slice(&(name.len() as u16).to_be_bytes());
        ext.extend_from_slice(name);
        ext
    };
    let cases = [
        (
            with_extension(&bare, 0, &sni(b"x.bad.example\0")),
            "a NUL byte in the host name",
        ),
        (
            with_extension(&client_hello("a.example", &[]), 0, &sni(b"x.bad.example")),
            "the server_name extension appears more than once",
        ),
        (
            with_extension(&bare, 0, &sni(b"198.18.0.2")),
            "not a DNS host name",
        ),
        (
            with_extension(&bare, 0, &sni(b"x.bad .example")),
            "not a DNS host name",
        ),
    ];
    for (hello, why) in cases {
        let mut b = Bench::new(one_rule(Action::Block, "*.bad.example"));
        let (d, _) = b.client_data(0, &hello);
        assert_eq!(d, Disposition::Consumed);
        assert_eq!(b.sp.counters.sni_malformed, 1, "{why}");
        assert_eq!(
            (b.sp.counters.split, b.sp.counters.refused),
            (0, 1),
            "{why}"
        );
        assert_nothing_reached_the_server(&mut b, why);
        assert_eq!(bypassed(&b.sp), 0);
        let e = b.sp.events.last().expect("a record");
        assert_eq!(
            (e.end.as_str(), e.rule.as_str(), e.sni.as_deref()),
            ("blocked", "the-rule", None),
            "{why}"
        );
        assert_eq!(e.sni_malformed.as_deref(), Some(why));
        assert!(
            e.note.as_deref().is_some_and(|n| n.contains("malformed")),
            "{why}: {e:?}"
        );
    }
}

/// Without a block that might apply, a ClientHello the TLS parser
/// refuses is decided by the rules that do not need a name: relayed (not
/// decrypted, never passed to the fast path unseen), and logged as
/// malformed.
#[test]
fn a_malformed_hello_without_a_block_is_relayed_and_logged() {
    let hello = crate::tls::hello::tests::with_extension(
        &client_hello("a.example", &[]),
        0,
        &[
            0, 14, 0, 0, 11, b'b', b'.', b'e', b'x', b'a', b'm', b'p', b'l', b'e', b'.', b'x',
        ],
    );
    let mut b = Bench::new(one_rule(Action::NoDecrypt, "*.example"));
    b.client_data(0, &hello);
    assert_eq!(b.sp.counters.hello_malformed, 1);
    assert_eq!((b.sp.counters.split, b.sp.counters.policy_pass), (1, 0));
    assert_eq!(bypassed(&b.sp), 0);
    let mut rst = seg(C_ISN + 1 + hello.len() as u32, S_ISN + 1, false, b"");
    rst.flags.rst = true;
    b.send(Dir::Client, &rst);
    let e = b.sp.events.last().expect("a record");
    assert_eq!((e.action, e.sni.as_deref()), (Some(Action::TcpSplit), None));
    assert!(
        e.note
            .as_deref()
            .is_some_and(|n| n.contains("malformed ClientHello")),
        "{e:?}"
    );
}

#[test]
fn a_split_reports_the_bytes_it_holds_and_the_most_it_held() {
    let mut b = Bench::new(SessionSettings::default());
    let request = b"GET / HTTP/1.1\r\n\r\n";
    b.client_data(0, request);
    let held = |b: &Bench| {
        let d = b.sp.describe(&e_key()).expect("listed");
        (d.state, d.buffered, d.buffered_peak)
    };
    // Sent to the server, not yet acknowledged: held.
    let n = request.len() as u64;
    assert_eq!(held(&b), ("split".into(), n, n));
    let to_server = segments(&b.sent(), Side::Outside);
    assert_eq!(to_server[0].payload, request);
    // The server's ACK frees it; the most held stays.
    let ack = seg(S_ISN + 1, C_ISN + 1 + request.len() as u32, false, b"");
    b.send(Dir::Server, &ack);
    assert_eq!(held(&b), ("split".into(), 0, n));
}

/// A client that closes during the hold, before its ClientHello is
/// complete: its name will never come, so a block that might apply
/// blocks it. Neither its bytes nor its FIN reach the server, and the
/// refusal is logged as decided without the server name.
#[test]
fn a_fin_during_the_hold_cannot_escape_a_block() {
    let hello = client_hello("www.bad.example", &[]);
    // The FIN alone after part of the ClientHello, or on the segment
    // carrying its last bytes so far.
    for fin_on_data in [false, true] {
        let mut b = Bench::new(one_rule(Action::Block, "*.bad.example"));
        let cut = 100;
        let mut part = seg(C_ISN + 1, S_ISN + 1, false, &hello[..cut]);
        part.flags.fin = fin_on_data;
        assert_eq!(b.send(Dir::Client, &part), Disposition::Consumed);
        if !fin_on_data {
            assert_eq!(b.sp.counters.refused, 0, "still held");
            let mut fin = seg(C_ISN + 1 + cut as u32, S_ISN + 1, false, b"");
            fin.flags.fin = true;
            assert_eq!(b.send(Dir::Client, &fin), Disposition::Consumed);
        }
        assert_eq!(b.sp.counters.refused, 1, "fin on data: {fin_on_data}");
        let out = b.sent();
        assert_reset_both_ways(&out);
        assert!(
            segments(&out, Side::Outside).iter().all(|s| !s.flags.fin),
            "the client's FIN crossed: {out:?}"
        );
        assert_eq!(bypassed(&b.sp), 0);
        let e = &b.sp.events;
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(
            (e[0].action, e[0].end.as_str(), e[0].rule.as_str()),
            (Some(Action::Block), "blocked", "the-rule")
        );
        assert_eq!(e[0].sni, None);
        assert!(
            e[0].note.as_deref().unwrap_or("").contains("closed before"),
            "{e:?}"
        );
        // Its retransmissions are the refused connection's, not a new
        // flow's: nothing is forwarded.
        assert_eq!(b.send(Dir::Client, &part), Disposition::Consumed);
        assert!(segments(&b.sent(), Side::Outside)
            .iter()
            .all(|s| s.payload.is_empty()));
    }
}

/// A FIN on the segment that completes the ClientHello: the connection
/// is decided by its name. Under a block, nothing of it (bytes or FIN)
/// reaches the server; the client reads the alert.
#[test]
fn a_fin_on_the_last_clienthello_bytes_is_decided_by_the_name() {
    let hello = client_hello("www.bad.example", &[]);
    let (first, rest) = hello.split_at(100);
    let last = |b: &mut Bench| {
        b.client_data(0, first);
        let mut s = seg(C_ISN + 1 + 100, S_ISN + 1, false, rest);
        s.flags.fin = true;
        assert_eq!(b.send(Dir::Client, &s), Disposition::Consumed);
    };
    let mut b = Bench::new(one_rule(Action::Block, "*.bad.example"));
    last(&mut b);
    assert_eq!((b.sp.counters.hellos, b.sp.counters.refused), (1, 1));
    let out = b.sent();
    let to_server = segments(&out, Side::Outside);
    assert!(
        to_server
            .iter()
            .all(|s| s.payload.is_empty() && !s.flags.fin && s.flags.rst),
        "{to_server:?}"
    );
    assert_eq!(to_server.len(), 1, "{to_server:?}");
    let to_client = segments(&out, Side::Inside);
    let alert: Vec<u8> = to_client.iter().flat_map(|s| s.payload.clone()).collect();
    assert_eq!(alert, ACCESS_DENIED);
    // The client's bytes and its FIN are acknowledged.
    let past_fin = SeqNum(C_ISN + 1 + hello.len() as u32 + 1);
    assert!(to_client.iter().any(|s| s.ack == past_fin), "{to_client:?}");
    let e = &b.sp.events;
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(e[0].sni.as_deref(), Some("www.bad.example"));
    assert_eq!(
        (e[0].end.as_str(), e[0].rule.as_str()),
        ("blocked", "the-rule")
    );

    // Under a split, the ClientHello and then the FIN go to the server.
    let mut b = Bench::new(SessionSettings::default());
    last(&mut b);
    assert_eq!(b.sp.counters.split, 1);
    let to_server = segments(&b.sent(), Side::Outside);
    let relayed: Vec<u8> = to_server.iter().flat_map(|s| s.payload.clone()).collect();
    assert_eq!(relayed, hello);
    let fin = to_server
        .iter()
        .find(|s| s.flags.fin)
        .expect("the FIN relayed");
    assert_eq!(
        fin.seq + fin.payload.len() as u32,
        SeqNum(C_ISN + 1 + hello.len() as u32)
    );
}

/// A connection held for its ClientHello and forgotten to make room (a
/// full table): decided without its name, so a block that might apply
/// blocks it. Nothing of the ClientHello reaches the server, the refusal
/// is logged once, and the connection stays refused.
#[test]
fn a_held_connection_evicted_under_a_block_is_refused() {
    let mut b = Bench::new(SessionSettings {
        max_flows: 1,
        ..one_rule(Action::Block, "*.bad.example")
    });
    let hello = client_hello("www.bad.example", &[]);
    let (d, _) = b.client_data(0, &hello[..100]);
    assert_eq!(d, Disposition::Consumed);
    assert!(b.sent().is_empty(), "held");
    // Another connection needs the place.
    let other = Peers::on_port(40001).frame(Dir::Client, &seg(C_ISN, 0, true, b""));
    assert_eq!(
        b.sp.on_frame(Side::Inside, &other, b.now),
        Disposition::Forward
    );
    assert_eq!((b.sp.counters.evicted, b.sp.counters.refused), (1, 1));
    let out = b.sent();
    assert_reset_both_ways(&out);
    assert_eq!(bypassed(&b.sp), 0);
    let e = &b.sp.events;
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(
        (e[0].end.as_str(), e[0].rule.as_str()),
        ("blocked", "the-rule")
    );
    assert!(
        e[0].note.as_deref().unwrap_or("").contains("evicted"),
        "{e:?}"
    );
    // The rest of its ClientHello, arriving later, goes nowhere: the
    // forgotten connection is seen mid-flow and blocked again (logged as
    // such, not blamed on the rule).
    rest_is_reset(&mut b, &hello[100..]);
    assert_eq!(b.sp.events[1].rule, "(mid-flow)");
    assert!(
        b.sp.events.iter().all(|e| e.end == "blocked"),
        "{:?}",
        b.sp.events
    );
    // No pin is left behind in XDP for it.
    let pinned =
        b.sp.ops
            .iter()
            .filter(|o| matches!(o, MapOp::Steer(_)))
            .count();
    let forgotten =
        b.sp.ops
            .iter()
            .filter(|o| matches!(o, MapOp::Forget(_)))
            .count();
    assert_eq!(pinned, forgotten, "{:?}", b.sp.ops);
}

/// A SYN on the ports of a passed connection (one forged by anyone who
/// can spoof the client's address) takes it off the fast path to be
/// decided afresh; the server, whose connection is established, answers
/// with a challenge ACK, not a SYN-ACK. The connection goes back to the
/// fast path as decided: it used to be left to the new handshake, which
/// none of its segments fit, and hung (an outside probe). Without the
/// pass on record (forgotten), it is met as one seen mid-flow.
#[test]
fn a_syn_on_a_passed_connections_ports_that_opens_nothing_changes_nothing() {
    let mut b = Bench::new(bank_exempt());
    let hello = client_hello("www.bank.example", &[]);
    b.client_data(0, &hello);
    let end = C_ISN + 1 + hello.len() as u32;
    b.send(Dir::Server, &seg(S_ISN + 1, end, false, b""));
    assert_eq!(on_fast_path(&b.sp), 1);
    b.sent();
    let forged = seg(77_777, 0, true, b"");
    assert_eq!(b.send(Dir::Client, &forged), Disposition::Forward);
    assert_eq!(b.sp.describe(&e_key()).unwrap().state, "handshake");
    let challenge = seg(S_ISN + 1, end, false, b"");
    assert_eq!(b.send(Dir::Server, &challenge), Disposition::Forward);
    let d = b.sp.describe(&e_key()).unwrap();
    assert_eq!(
        (d.state.as_str(), d.action),
        ("bypass", Some(Action::NoDecrypt))
    );
    assert_eq!((on_fast_path(&b.sp), b.sp.counters.syns_on_live), (2, 1));
    // Its segments pass as before.
    assert_eq!(
        b.client_data(hello.len() as u32, b"more").0,
        Disposition::Forward
    );
    assert!(b.sent().is_empty());
    // Idle here (on the fast path it may be busy), it is still known: a
    // later forged SYN the server answers with an ACK changes nothing
    // either, where forgotten it was reset (an outside probe).
    let idle = SessionSettings::default().idle;
    b.now += idle * 2;
    b.sp.expire(b.now);
    assert_eq!(b.sp.describe(&e_key()).unwrap().state, "bypass");
    assert_eq!(b.send(Dir::Client, &forged), Disposition::Forward);
    assert_eq!(b.send(Dir::Server, &challenge), Disposition::Forward);
    assert_eq!(b.sp.counters.syns_on_live, 2);
    // A SYN the server never answers (dropped on the way, or its challenge
    // ACK held back by rate limiting): the connection is passed again
    // after a second.
    assert_eq!(b.send(Dir::Client, &forged), Disposition::Forward);
    assert_eq!(b.sp.describe(&e_key()).unwrap().state, "handshake");
    b.sp.on_timers(b.now + SYN_UNANSWERED / 2);
    assert_eq!(b.sp.describe(&e_key()).unwrap().state, "handshake");
    b.sp.on_timers(b.now + SYN_UNANSWERED);
    assert_eq!(b.sp.describe(&e_key()).unwrap().state, "bypass");
    assert_eq!((on_fast_path(&b.sp), b.sp.counters.syns_on_live), (4, 3));
    assert!(b.sent().is_empty());

    // Forgotten: the SYN finds nothing on record. The policy would split
    // it, which it cannot mid-stream: both ends are reset.
    let mut b = Bench::new(SessionSettings::default());
    b.sp = Sessions::new(SessionSettings::default());
    assert_eq!(b.send(Dir::Client, &forged), Disposition::Forward);
    assert_eq!(b.send(Dir::Server, &challenge), Disposition::Consumed);
    let out = b.sent();
    assert_reset_both_ways(&out);
    assert_eq!(b.sp.counters.uninspectable, 1);
}

/// Forged segments of connections nobody follows (each seen mid-flow,
/// reset, kept as a tombstone) are the first to make room: a flood of
/// them cannot push out a connection held for its decision, which an
/// outside probe managed (the held connection was then reset), nor write
/// more than a hundred records a second.
#[test]
fn forged_mid_flow_segments_make_room_before_a_held_connection() {
    let mut b = Bench::new(SessionSettings {
        max_flows: 3,
        ..SessionSettings::default()
    });
    let hello = client_hello("www.example", &[]);
    b.client_data(0, &hello[..100]);
    for port in 41000..41100 {
        let forged = Peers::on_port(port).frame(Dir::Client, &seg(7, 9, false, b"x"));
        assert_eq!(
            b.sp.on_frame(Side::Inside, &forged, b.now),
            Disposition::Consumed
        );
    }
    assert_eq!(b.sp.counters.evicted, 98);
    assert_eq!(b.sp.describe(&e_key()).expect("kept").state, "holding");
    // Nor fill the flow log: a hundred records a second, the rest counted.
    assert_eq!(b.sp.events.len(), MID_FLOW_RECORDS_PER_SEC as usize);
    assert_eq!(b.sp.counters.mid_flow_unlogged, 0);
    let forged = Peers::on_port(41100).frame(Dir::Client, &seg(7, 9, false, b"x"));
    b.sp.on_frame(Side::Inside, &forged, b.now);
    assert_eq!(b.sp.counters.mid_flow_unlogged, 1);
    let later = b.now + Duration::from_secs(1);
    let forged = Peers::on_port(41101).frame(Dir::Client, &seg(7, 9, false, b"x"));
    b.sp.on_frame(Side::Inside, &forged, later);
    assert_eq!(b.sp.events.len(), MID_FLOW_RECORDS_PER_SEC as usize + 1);
    b.sent();
    b.client_data(100, &hello[100..]);
    assert_eq!(b.sp.counters.split, 1, "decided on its name");
}

/// A held connection evicted (to make room) under a policy that would
/// split it whatever its name: the engine can no longer follow it, and a
/// pass would carry it uninspected (an outside probe had a connection
/// forgotten so). `--mid-flow drop`, the default, refuses it: nothing of
/// its ClientHello reaches the server, both ends are reset, and the rest
/// of it, arriving later, is met mid-flow and reset again. `pass` passes
/// it, as before.
#[test]
fn a_held_connection_evicted_under_an_inspecting_policy_fails_closed() {
    for mid_flow in [MidFlow::Drop, MidFlow::Pass] {
        let mut b = Bench::new(SessionSettings {
            max_flows: 1,
            mid_flow,
            ..SessionSettings::default()
        });
        let hello = client_hello("www.example", &[]);
        let (d, _) = b.client_data(0, &hello[..100]);
        assert_eq!(d, Disposition::Consumed);
        let other = Peers::on_port(40001).frame(Dir::Client, &seg(C_ISN, 0, true, b""));
        assert_eq!(
            b.sp.on_frame(Side::Inside, &other, b.now),
            Disposition::Forward,
            "{mid_flow:?}: room made"
        );
        let c = b.sp.counters;
        let out = b.sent();
        if mid_flow == MidFlow::Pass {
            assert_eq!((c.evicted, c.refused, c.uninspectable), (1, 0, 0));
            // Released: the held bytes go on unchanged.
            let to_server = segments(&out, Side::Outside);
            assert_eq!(to_server.len(), 1, "{to_server:?}");
            assert_eq!(to_server[0].payload, hello[..100]);
            continue;
        }
        assert_eq!((c.evicted, c.refused, c.uninspectable), (1, 1, 1));
        assert_reset_both_ways(&out);
        assert_eq!(bypassed(&b.sp), 0);
        let e = &b.sp.events[0];
        assert_eq!((e.end.as_str(), e.rule.as_str()), ("blocked", "(evicted)"));
        let note = e.note.as_deref().unwrap_or("");
        assert!(
            note.contains("tcp-split") && note.contains("--mid-flow drop"),
            "{e:?}"
        );
        rest_is_reset(&mut b, &hello[100..]);
        assert_eq!(b.sp.counters.uninspectable, 2);
    }
}

/// Within a receive batch the halves only take segments in; at its end
/// each connection runs its stage and transmits once: one ACK for the
/// whole batch (a stretch ACK, as a receiver behind GRO sends), where
/// segment by segment it acknowledges every second one.
#[test]
fn a_receive_batch_draws_one_ack_for_all_its_segments() {
    let mut b = Bench::new(SessionSettings::default());
    let hello = client_hello("shop.example", &[b"h2"]);
    b.client_data(0, &hello);
    assert_eq!(b.sp.counters.split, 1);
    b.sent();
    let acks_toward_client = |out: &[(Side, Vec<u8>)]| {
        segments(out, Side::Inside)
            .iter()
            .filter(|s| s.flags.ack && s.payload.is_empty())
            .map(|s| s.ack)
            .collect::<Vec<_>>()
    };
    let mut off = hello.len() as u32;
    // Ten segments in one batch: nothing goes out until its end, then one
    // ACK for all of them.
    b.sp.begin_batch();
    for _ in 0..10 {
        b.client_data(off, &[6; 1000]);
        off += 1000;
    }
    assert!(b.sent().is_empty(), "sent within the batch");
    b.sp.end_batch(b.now);
    let out = b.sent();
    assert_eq!(acks_toward_client(&out), [SeqNum(C_ISN + 1 + off)]);
    // And the bytes went on toward the server in the same burst.
    assert!(!segments(&out, Side::Outside).is_empty());
    // Ten more segment by segment: an ACK for every second.
    for _ in 0..10 {
        b.client_data(off, &[5; 1000]);
        off += 1000;
    }
    let one_by_one = acks_toward_client(&b.sent());
    assert!(one_by_one.len() >= 5, "{one_by_one:?}");
    // A batch with nothing for a connection sends nothing.
    b.sp.begin_batch();
    b.sp.end_batch(b.now);
    assert!(b.sent().is_empty());
}

/// Transmit memory lent for a batch, as the worker lends its free UMEM
/// frames: each frame it takes lands in `taken`, written over stale bytes;
/// the frame numbered `refuse[side]` for a side (counting from 0) is
/// refused, later ones taken again.
struct Lent {
    refuse: [Option<usize>; 2],
    asked: [usize; 2],
    taken: Vec<(Side, Vec<u8>)>,
}

impl FrameSink for Lent {
    fn build(&mut self, side: Side, len: usize, fill: &mut dyn FnMut(&mut [u8])) -> bool {
        let n = self.asked[side.index()];
        self.asked[side.index()] += 1;
        if self.refuse[side.index()] == Some(n) {
            return false;
        }
        let mut frame = vec![0xa5; len];
        fill(&mut frame);
        self.taken.push((side, frame));
        true
    }
}

/// A batch's frames are written straight into the memory the worker
/// lends, whole and checksummed. Once it refuses one for a side, that
/// frame and the side's later ones wait in `out`, in order, while the
/// other side's still go straight; and a side with frames already waiting
/// in `out` sends none past them.
#[test]
fn a_batch_writes_its_frames_into_lent_memory_never_past_frames_waiting() {
    let batch = |refuse: [Option<usize>; 2], waiting: bool| {
        let mut b = Bench::new(SessionSettings::default());
        let hello = client_hello("shop.example", &[b"h2"]);
        b.client_data(0, &hello);
        assert_eq!(b.sp.counters.split, 1);
        b.sent();
        if waiting {
            b.sp.out.push((Side::Outside, b"waiting".to_vec()));
        }
        let mut off = hello.len() as u32;
        b.sp.begin_batch();
        for i in 0..10u8 {
            b.client_data(off, &[i; 1000]);
            off += 1000;
        }
        let mut lent = Lent {
            refuse,
            asked: [0; 2],
            taken: Vec::new(),
        };
        b.sp.end_batch_into(b.now, Some(&mut lent));
        (lent, b.sent())
    };
    // What the server is sent, the frames taken first: the client's bytes
    // in order, each segment where the last ended.
    let to_server = |taken: &[(Side, Vec<u8>)], out: &[(Side, Vec<u8>)]| {
        let mut all = segments(taken, Side::Outside);
        all.extend(segments(out, Side::Outside));
        for w in all.windows(2) {
            assert_eq!(w[1].seq, w[0].seq + w[0].payload.len() as u32);
        }
        all.iter()
            .flat_map(|s| s.payload.clone())
            .collect::<Vec<u8>>()
    };
    let sent: Vec<u8> = (0..10u8).flat_map(|i| [i; 1000]).collect();

    // All taken: nothing left in `out`, the ACK and the data frames whole
    // (as many as the server's window takes: the client's first bytes).
    let (lent, out) = batch([None, None], false);
    assert!(out.is_empty(), "{} frames not taken", out.len());
    let data = segments(&lent.taken, Side::Outside).len();
    assert!(data >= 2, "{data} data segments");
    assert_eq!(segments(&lent.taken, Side::Inside).len(), 1);
    let relayed = to_server(&lent.taken, &out);
    assert!(
        !relayed.is_empty() && sent.starts_with(&relayed),
        "the server is sent {} bytes that are not the client's first",
        relayed.len()
    );

    // The server's second frame refused: it and the rest wait, in order;
    // the client's ACK still goes straight.
    let (lent, out) = batch([None, Some(1)], false);
    assert_eq!(segments(&lent.taken, Side::Outside).len(), 1);
    assert_eq!(segments(&out, Side::Outside).len(), data - 1);
    assert_eq!(
        lent.asked[Side::Outside.index()],
        2,
        "asked for more after a refusal"
    );
    assert_eq!(segments(&lent.taken, Side::Inside).len(), 1);
    assert!(to_server(&lent.taken, &out) == relayed);

    // A frame waiting for the server: every new one goes behind it.
    let (lent, out) = batch([None, None], true);
    assert_eq!(lent.asked[Side::Outside.index()], 0);
    assert_eq!(out[0], (Side::Outside, b"waiting".to_vec()));
    assert!(to_server(&[], &out[1..]) == relayed);
    assert_eq!(segments(&lent.taken, Side::Inside).len(), 1);
}

/// With the buffer memory budget spent, a new tcp-split connection is
/// passed to the fast path unsplit, and counted.
#[test]
fn a_spent_memory_budget_passes_new_connections_unsplit() {
    let budget = Arc::new(MemoryBudget::new(4 * BUFFER_INITIAL));
    let settings = SessionSettings {
        budget: budget.clone(),
        ..SessionSettings::default()
    };
    let mut b = Bench::new(settings.clone());
    let hello = client_hello("shop.example", &[b"h2"]);
    // Room for a base: split.
    b.client_data(0, &hello);
    assert_eq!(b.sp.counters.split, 1);
    // Spent (by other connections' growth): the next is passed.
    assert!(budget.take(1));
    let mut b = Bench::new(settings);
    assert_eq!(b.client_data(0, &hello).0, Disposition::Consumed);
    assert_eq!(
        (b.sp.counters.split, b.sp.counters.memory_passthrough),
        (0, 1)
    );
    assert_eq!(bypassed(&b.sp), 1);
    // The held ClientHello goes on unchanged toward the server.
    let out = b.sent();
    assert!(segments(&out, Side::Outside)
        .iter()
        .any(|s| s.payload == hello));
}

/// A ClientHello the decision's parser takes but rustls refuses (here a
/// pre_shared_key extension that does not parse) cannot be decrypted: when
/// a decrypt rule matches it, it is decided again without its name, as a
/// malformed hello, and logged so; a good one under the same rule is
/// intercepted.
#[test]
fn a_hello_rustls_refuses_is_not_decrypted_but_decided_as_malformed() {
    use crate::{policy::Profile, tls::testkit::Kit};
    let kit = Kit::new(Profile::default());
    let decrypting = || SessionSettings {
        tls: Some(kit.ctx.clone()),
        ..one_rule(Action::Decrypt, "*.example")
    };
    let good = client_hello("a.example", &[]);
    let mut b = Bench::new(decrypting());
    b.client_data(0, &good);
    assert_eq!(
        (b.sp.counters.intercepted, b.sp.counters.hello_malformed),
        (1, 0)
    );

    let bad = crate::tls::hello::tests::with_extension(&good, 41, &[1, 2, 3]);
    let mut b = Bench::new(decrypting());
    let (d, _) = b.client_data(0, &bad);
    assert_eq!(d, Disposition::Consumed);
    assert_eq!(
        (b.sp.counters.intercepted, b.sp.counters.hello_malformed),
        (0, 1)
    );
    // Without a name the decrypt rule does not match; the default splits.
    assert_eq!((b.sp.counters.split, b.sp.counters.policy_pass), (1, 0));
    let mut rst = seg(C_ISN + 1 + bad.len() as u32, S_ISN + 1, false, b"");
    rst.flags.rst = true;
    b.send(Dir::Client, &rst);
    let e = b.sp.events.last().expect("a record");
    assert_eq!(e.sni.as_deref(), None, "{e:?}");
    assert_eq!(
        e.sni_malformed.as_deref(),
        Some("the TLS library refuses the ClientHello"),
        "{e:?}"
    );
}

/// A server that closes before the client's first bytes did not speak
/// first: the connection is decided without a name and fails closed, so a
/// cooperating server cannot open the way for a ClientHello with a blocked
/// name (found by an outside probe: the hello reached the server whole).
#[test]
fn a_server_fin_before_the_hello_is_decided_without_a_name_and_fails_closed() {
    let mut b = Bench::new(one_rule(Action::Block, "*.bad.example"));
    let mut fin = seg(S_ISN + 1, C_ISN + 1, false, b"");
    fin.flags.fin = true;
    b.send(Dir::Server, &fin);
    assert_eq!(b.sp.counters.refused, 1);
    let hello = client_hello("x.bad.example", &[]);
    b.client_data(0, &hello);
    assert_nothing_reached_the_server(&mut b, "a server FIN first");
    let e = b.sp.events.last().expect("a record");
    assert_eq!((e.end.as_str(), e.rule.as_str()), ("blocked", "the-rule"));
    assert!(
        e.note
            .as_deref()
            .is_some_and(|n| n.contains("closed before")),
        "{e:?}"
    );

    // A server that speaks first (data) is decided by the rules that
    // need no name, as before: here the default.
    let mut b = Bench::new(one_rule(Action::Block, "*.bad.example"));
    b.send(
        Dir::Server,
        &seg(S_ISN + 1, C_ISN + 1, false, b"220 hello\r\n"),
    );
    assert_eq!((b.sp.counters.refused, b.sp.counters.server_first), (0, 1));
}

/// A client announcing an MSS its link cannot carry (9000 on a 1500-byte
/// MTU) gets segments the link does carry: the client-facing half clamps
/// the option to the MTU, as Linux clamps to the path MTU. Without the
/// clamp it sends the server's 8000 bytes in one frame the link drops,
/// and again on every retransmission.
#[test]
fn a_peer_mss_beyond_the_link_mtu_is_clamped_to_it() {
    for (mtu, most) in [(Some(1500), 1460 - 12), (None, 8000)] {
        let mut b = Bench {
            sp: Sessions::new(SessionSettings {
                mtu,
                ..SessionSettings::default()
            }),
            peers: Peers::new(),
            now: Instant::now(),
        };
        let mut syn = seg(C_ISN, 0, true, b"");
        syn.options.mss = Some(9000);
        b.send(Dir::Client, &syn);
        b.send(Dir::Server, &seg(S_ISN, C_ISN + 1, true, b""));
        b.send(Dir::Client, &seg(C_ISN + 1, S_ISN + 1, false, b""));
        b.client_data(0, b"GET /");
        assert_eq!(b.sp.counters.split, 1);
        b.sent();
        let reply = seg(S_ISN + 1, C_ISN + 6, false, &[7; 8000]);
        assert_eq!(b.send(Dir::Server, &reply), Disposition::Consumed);
        let out = b.sent();
        let to_client = segments(&out, Side::Inside);
        let sizes: Vec<usize> = to_client.iter().map(|s| s.payload.len()).collect();
        // Full segments: as large as the (clamped) MSS, none larger.
        assert_eq!(sizes.iter().max(), Some(&most), "{mtu:?}: {sizes:?}");
    }
}

/// A forged SYN (another ISN) after the handshake, before the first data:
/// the server challenges it and goes on, and so does the hold: the
/// ClientHello after it is held and decided, not forwarded undecided.
#[test]
fn a_forged_syn_before_the_first_data_changes_nothing() {
    let mut b = Bench::new(SessionSettings::default());
    assert_eq!(
        b.send(Dir::Client, &seg(77_000, 0, true, b"")),
        Disposition::Forward
    );
    let hello = client_hello("shop.example", &[]);
    assert_eq!(b.client_data(0, &hello).0, Disposition::Consumed);
    assert_eq!((b.sp.counters.hellos, b.sp.counters.split), (1, 1));
    assert_eq!(b.sp.counters.passthrough, 0);
}

/// A SYN carrying data, with or without a Fast Open cookie: it goes on
/// without them, so the server cannot take the bytes before the decision;
/// the client sends them again after the handshake, where they are held
/// and decided (one byte, or a cookie, on a SYN used to pass the
/// connection uninspected).
#[test]
fn data_or_fast_open_on_a_syn_does_not_pass_the_connection() {
    for tfo in [false, true] {
        let mut b = Bench {
            sp: Sessions::new(bank_exempt()),
            peers: Peers::new(),
            now: Instant::now(),
        };
        let syn = seg(C_ISN, 0, true, &client_hello("www.bank.example", &[]));
        let mut frame = b.peers.frame(Dir::Client, &syn);
        if tfo {
            // The option with an 8-byte cookie.
            frame = with_tcp_option(&frame, &[34, 10, 1, 2, 3, 4, 5, 6, 7, 8]);
            assert!(parse_segment(&frame).unwrap().segment.options.fast_open);
        }
        assert_eq!(
            b.sp.on_frame(Side::Inside, &frame, b.now),
            Disposition::Consumed
        );
        let out = b.sent();
        let on = segments(&out, Side::Outside);
        assert_eq!(on.len(), 1, "{tfo}");
        assert!(on[0].flags.syn && on[0].payload.is_empty() && !on[0].options.fast_open);
        assert_eq!((on[0].seq, on[0].options.mss), (syn.seq, syn.options.mss));
        assert_eq!(
            b.send(Dir::Server, &seg(S_ISN, C_ISN + 1, true, b"")),
            Disposition::Forward
        );
        b.client_data(0, &client_hello("www.evil.example", &[]));
        let c = &b.sp.counters;
        assert_eq!(
            (c.split, c.passthrough, c.policy_pass, c.syn_stripped),
            (1, 0, 0, 1),
            "{tfo}"
        );
    }
}

/// Two copies of a ClientHello's bytes that differ in the server name:
/// the engine reads the first, a server's kernel may keep the other (Linux
/// takes a longer segment over a shorter one it holds out of order). Passed
/// to the fast path, the held frames would let the server read a name the
/// decision never saw; relayed, the server gets the bytes decided on.
#[test]
fn a_hold_with_two_versions_of_a_byte_is_relayed_never_passed() {
    let mut b = Bench::new(bank_exempt());
    let bank = client_hello("www.bank.example", &[]);
    // The same hello naming another server (rustls shuffles its
    // extensions: two of its hellos may differ in layout, and the name
    // may be last).
    let at = bank
        .windows(16)
        .position(|w| w == b"www.bank.example")
        .expect("the name");
    let mut evil = bank.clone();
    evil[at..at + 16].copy_from_slice(b"www.evil.example");
    let n = bank.len();
    b.client_data(1, &bank[1..n - 1]);
    b.client_data(1, &evil[1..]);
    b.client_data(0, &bank[..1]);
    assert_eq!(b.sp.counters.hold_conflicts, 1);
    assert_eq!(bypassed(&b.sp), 0, "not passed to the fast path");
    assert_eq!(b.sp.counters.split, 1, "relayed");
    let out = b.sent();
    let relayed: Vec<u8> = segments(&out, Side::Outside)
        .iter()
        .flat_map(|s| s.payload.clone())
        .collect();
    // The first copy of each byte: the bank's, and the evil copy's last
    // byte, which only it carried.
    let first: Vec<u8> = bank[..n - 1]
        .iter()
        .chain(&evil[n - 1..])
        .copied()
        .collect();
    assert_eq!(relayed, first, "the server reads the name decided on");
    let has = |name: &[u8]| relayed.windows(name.len()).any(|w| w == name);
    assert!(has(b"www.bank.example") && !has(b"www.evil.example"));
}

/// Client data the server would drop (no ACK flag, an ACK of data it
/// never sent, a timestamp older than the last it took, a corrupt IPv4
/// header) is not held: the decision is made on what the server reads.
#[test]
fn held_bytes_are_only_ones_the_server_would_take() {
    let bank = client_hello("www.bank.example", &[]);
    let evil = client_hello("www.evil.example", &[]);
    let no_ack = |s: &mut Segment| s.flags.ack = false;
    let unsent = |s: &mut Segment| s.ack = SeqNum(S_ISN + 1000);
    let stale = |s: &mut Segment| {
        s.options.timestamps = Some(Timestamps {
            val: C_ISN - 5,
            ecr: S_ISN,
        })
    };
    let syn = |s: &mut Segment| s.flags.syn = true;
    let no_clock = |s: &mut Segment| s.options.timestamps = None;
    // Past the server's window (65535 from its SYN-ACK).
    let beyond = |s: &mut Segment| s.seq = SeqNum(C_ISN + 1 + 65535 - 10);
    // An echo of a clock the server never sent (its SYN-ACK's is S_ISN).
    let wrong_echo = |s: &mut Segment| {
        s.options.timestamps = Some(Timestamps {
            val: C_ISN + 1,
            ecr: S_ISN + 7,
        })
    };
    let forged: [&dyn Fn(&mut Segment); 7] = [
        &no_ack,
        &unsent,
        &stale,
        &syn,
        &no_clock,
        &beyond,
        &wrong_echo,
    ];
    // After the handshake, and on the handshake's own last segment (its
    // ACK carrying the first bytes), where the ACK alone would complete
    // the server's handshake.
    for with_ack in [false, true] {
        for (i, forge) in forged.iter().enumerate() {
            let mut b = if with_ack {
                Bench::answered(bank_exempt(), false)
            } else {
                Bench::new(bank_exempt())
            };
            let mut first = seg(C_ISN + 1, S_ISN + 1, false, &bank);
            forge(&mut first);
            assert_eq!(
                b.send(Dir::Client, &first),
                Disposition::Consumed,
                "{with_ack} {i}"
            );
            assert_eq!(b.sp.counters.hold_refused, 1, "{with_ack} {i}");
            b.client_data(0, &evil);
            assert_eq!(
                b.sp.counters.policy_pass, 0,
                "{with_ack} {i}: decided on the name read"
            );
            assert_eq!(b.sp.counters.split, 1, "{with_ack} {i}");
        }
    }
    // Past the window on the handshake's last segment: the window ends
    // 10 bytes into the hello.
    let mut b = Bench {
        sp: Sessions::new(bank_exempt()),
        peers: Peers::new(),
        now: Instant::now(),
    };
    b.send(Dir::Client, &seg(C_ISN, 0, true, b""));
    let mut synack = seg(S_ISN, C_ISN + 1, true, b"");
    synack.window = 10;
    b.send(Dir::Server, &synack);
    let first = seg(C_ISN + 1, S_ISN + 1, false, &bank);
    assert_eq!(b.send(Dir::Client, &first), Disposition::Consumed);
    assert_eq!(b.sp.counters.hold_refused, 1, "beyond the window");
    // A corrupt IPv4 header checksum: a bad frame, not held.
    let mut b = Bench::new(bank_exempt());
    let mut frame = b
        .peers
        .frame(Dir::Client, &seg(C_ISN + 1, S_ISN + 1, false, &bank));
    frame[24] ^= 0x01;
    let before = b.sp.counters.bad_checksum;
    b.sp.on_frame(Side::Inside, &frame, b.now);
    assert_eq!(b.sp.counters.bad_checksum, before + 1);
    b.client_data(0, &evil);
    assert_eq!(b.sp.counters.policy_pass, 0);
    assert_eq!(b.sp.counters.split, 1);
}

/// Held frames the server might not read as the hold did, though each
/// alone is one it takes: a TTL other than the handshake's (one set to
/// expire between the engine and the server), or timestamps running
/// backwards in the order they came (the server's PAWS drops the later
/// one once the first moved its clock). Such a hold is relayed, never
/// passed; the relay takes the bytes as the hold did.
#[test]
fn a_hold_the_server_might_read_otherwise_is_relayed() {
    let bank = client_hello("www.bank.example", &[]);
    // A TTL one lower than the handshake's.
    let mut b = Bench::new(bank_exempt());
    let mut frame = b
        .peers
        .frame(Dir::Client, &seg(C_ISN + 1, S_ISN + 1, false, &bank));
    frame[22] -= 1;
    fix_ipv4_checksum(&mut frame);
    b.sp.on_frame(Side::Inside, &frame, b.now);
    assert_eq!((bypassed(&b.sp), b.sp.counters.split), (0, 1), "ttl");
    // IPv4 options (a source route would be one).
    let mut b = Bench::new(bank_exempt());
    let frame = b
        .peers
        .frame(Dir::Client, &seg(C_ISN + 1, S_ISN + 1, false, &bank));
    let frame = crate::wire::segment::tests::with_ipv4_options(&frame);
    b.sp.on_frame(Side::Inside, &frame, b.now);
    assert_eq!((bypassed(&b.sp), b.sp.counters.split), (0, 1), "options");
    // Clocks backwards: [0, 100) at 2000, then [100, ..) at 1500.
    let mut b = Bench::new(bank_exempt());
    let at = |off: usize, end: usize, val: u32| {
        let mut s = seg(C_ISN + 1 + off as u32, S_ISN + 1, false, &bank[off..end]);
        s.options.timestamps = Some(Timestamps { val, ecr: S_ISN });
        s
    };
    b.send(Dir::Client, &at(0, 100, 2000));
    b.send(Dir::Client, &at(100, bank.len(), 1500));
    assert_eq!((bypassed(&b.sp), b.sp.counters.split), (0, 1), "clocks");
    let relayed: Vec<u8> = segments(&b.sent(), Side::Outside)
        .iter()
        .flat_map(|s| s.payload.clone())
        .collect();
    assert_eq!(relayed, bank, "the relay took both, as the hold did");
    // In order, the same hello is passed.
    let mut b = Bench::new(bank_exempt());
    b.send(Dir::Client, &at(0, 100, 1500));
    b.send(Dir::Client, &at(100, bank.len(), 2000));
    assert_eq!(bypassed(&b.sp), 1, "clocks in order");
}

/// A segment after the SYN-ACK that does not fit the handshake (an ACK of
/// unsent data, an old ACK, the ClientHello one byte before the ISN + 1,
/// which Linux trims and takes) used to pass the connection undecided,
/// and the server read a ClientHello nobody decided on (an outside
/// probe). It is dropped now, and the connection is held and decided.
#[test]
fn a_misfit_after_the_synack_cannot_pass_the_connection() {
    let evil = client_hello("www.evil.example", &[]);
    let mut junk_first = vec![b'x'];
    junk_first.extend_from_slice(&evil);
    let misfits = [
        seg(C_ISN + 1, S_ISN + 10, false, b""),
        seg(C_ISN + 1, S_ISN, false, b""),
        seg(C_ISN, S_ISN + 1, false, &junk_first),
        seg(C_ISN + 1, S_ISN + 2, false, &evil),
    ];
    for (i, m) in misfits.iter().enumerate() {
        let mut b = Bench::answered(bank_exempt(), false);
        assert_eq!(b.send(Dir::Client, m), Disposition::Consumed, "{i}");
        assert!(b.sent().is_empty(), "{i}: nothing reached the server");
        b.send(Dir::Client, &seg(C_ISN + 1, S_ISN + 1, false, b""));
        b.client_data(0, &evil);
        let c = &b.sp.counters;
        assert_eq!(
            (c.passthrough, c.policy_pass, c.split, c.hold_refused),
            (0, 0, 1, 1),
            "{i}"
        );
    }
    // A RST before the handshake is through, one the server ignores (the
    // wrong sequence number): it goes on, and so does the tracking (an
    // idle tracker once passed what came next undecided).
    let mut b = Bench::answered(bank_exempt(), false);
    let mut rst = seg(C_ISN + 5000, 0, false, b"");
    rst.flags.rst = true;
    assert_eq!(b.send(Dir::Client, &rst), Disposition::Forward);
    b.send(Dir::Client, &seg(C_ISN + 1, S_ISN + 1, false, b""));
    b.client_data(0, &evil);
    let c = &b.sp.counters;
    assert_eq!((c.passthrough, c.policy_pass, c.split), (0, 0, 1));
}

/// The frames the worker sent leave the queue; those it kept stay, in
/// their order.
#[test]
fn sent_frames_leave_the_queue_and_kept_ones_stay_in_order() {
    let mut b = Bench::new(SessionSettings::default());
    b.sp.out = (1..=5u8)
        .map(|i| {
            (
                if i % 2 == 0 {
                    Side::Inside
                } else {
                    Side::Outside
                },
                vec![i],
            )
        })
        .collect();
    b.sp.sent(&[true, false, true, false, true]);
    assert_eq!(
        b.sent(),
        vec![(Side::Inside, vec![2]), (Side::Inside, vec![4])]
    );
}
