//! The XDP classifier's decisions, one frame at a time, through
//! BPF_PROG_TEST_RUN on the real program with real maps: steering by port
//! and prefix in both directions, exemptions, flow-map verdicts overriding
//! them, sockets per queue, interfaces it does not serve, and jumbo frames
//! (multi-buffer: the lengths are the whole frame's), and a connection's
//! handshake on the fast path, recorded for the worker. Each case checks
//! the action and that exactly one outcome counter moved.

use etherparse::PacketBuilder;
use loupe_common::{v4_mapped, verdict, Counter, FlowKey, Handshake};
use loupe_dataplane::{
    ebpf::Classifier,
    flow::Side,
    sys,
    xsk::{PortConfig, QueuePort},
};
use loupe_tests::{
    harness::{INSIDE_IF, OUTSIDE_IF},
    Harness, HarnessConfig,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;
const MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];

#[derive(Clone, Copy)]
enum Ip {
    V4([u8; 4]),
    V6([u8; 16]),
}

fn v6(last: u16, subnet: u16) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[..4].copy_from_slice(&[0x20, 0x01, 0, 2]);
    a[6..8].copy_from_slice(&subnet.to_be_bytes());
    a[14..].copy_from_slice(&last.to_be_bytes());
    a
}

/// A SYN (no ACK) from `sport` to `dport` over IPv4.
fn syn_v4(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(MAC, MAC)
        .ipv4(src, dst, 64)
        .tcp(sport, dport, 1, 1000)
        .syn()
        .write(&mut out, b"")
        .unwrap();
    out
}

fn tcp(src: Ip, sport: u16, dst: Ip, dport: u16) -> Vec<u8> {
    tcp_carrying(src, sport, dst, dport, 1)
}

/// A TCP segment with `len` bytes of payload.
fn tcp_carrying(src: Ip, sport: u16, dst: Ip, dport: u16, len: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let b = PacketBuilder::ethernet2(MAC, MAC);
    let payload = vec![b'x'; len];
    match (src, dst) {
        (Ip::V4(s), Ip::V4(d)) => b
            .ipv4(s, d, 64)
            .tcp(sport, dport, 1, 1000)
            .write(&mut out, &payload),
        (Ip::V6(s), Ip::V6(d)) => b
            .ipv6(s, d, 64)
            .tcp(sport, dport, 1, 1000)
            .write(&mut out, &payload),
        _ => panic!("mixed families"),
    }
    .unwrap();
    out
}

/// An IPv6 segment whose TCP header lies past the first 4 KB, beyond the
/// linear head of a multi-buffer frame: a 2 KB destination options header
/// (Pad1 options) and a 2 KB routing header (no segments left) before it.
fn v6_long_chain(payload: usize) -> Vec<u8> {
    let mut f = tcp_carrying(Ip::V6(v6(1, 0)), 40001, Ip::V6(v6(2, 0)), 443, payload);
    let mut chain = vec![0u8; 4096];
    // Destination options, then routing, then TCP; 255: (255 + 1) x 8.
    chain[..2].copy_from_slice(&[43, 255]);
    chain[2048..2050].copy_from_slice(&[6, 255]);
    // Ethernet (14), then the IPv6 payload length (4) and next header (6).
    let plen = u16::from_be_bytes([f[18], f[19]]) + 4096;
    f[18..20].copy_from_slice(&plen.to_be_bytes());
    f[20] = 60;
    f.splice(54..54, chain);
    f
}

fn key(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> FlowKey {
    FlowKey::new(v4_mapped(src), v4_mapped(dst), sport, dport, 6)
}

/// (name, frame, ingress ifindex, rx queue, expected action, outcome counter)
type Case = (&'static str, Vec<u8>, u32, u32, u32, Counter);

const CLIENT: [u8; 4] = [198, 18, 0, 1];
const SERVER: [u8; 4] = [198, 18, 0, 2];

/// The classifier loaded and filled as the engine does (port 443 and 8080
/// steered for two prefixes, an exempt address each, sockets on queue 0 of
/// both interfaces), run in the engine namespace of a harness:
/// `f(classifier, inside, outside, lo)`.
fn with_classifier(f: impl FnOnce(&mut Classifier, u32, u32, u32) + Send) {
    let h = Harness::new(HarnessConfig::default()).expect("harness");
    h.engine
        .enter(|| {
            let inside = sys::ifindex(INSIDE_IF).unwrap();
            let outside = sys::ifindex(OUTSIDE_IF).unwrap();
            let lo = sys::ifindex("lo").unwrap();
            let mut c = Classifier::load().expect("load");
            c.set_interfaces(inside, outside).unwrap();
            c.set_steering(
                &[443],
                &[
                    "198.18.0.0/24".parse().unwrap(),
                    "2001:2::/64".parse().unwrap(),
                ],
                &[
                    "198.18.0.99".parse().unwrap(),
                    "2001:2::99".parse().unwrap(),
                ],
            )
            .unwrap();
            // Sockets on queue 0 of both interfaces; queue 1 has none.
            let cfg = PortConfig {
                frames: 256,
                ring_size: 64,
                ..PortConfig::default()
            };
            let port = QueuePort::new(INSIDE_IF, OUTSIDE_IF, 0, cfg).expect("AF_XDP sockets");
            c.register_socket(Side::Inside, 0, port.fd(Side::Inside))
                .unwrap();
            c.register_socket(Side::Outside, 0, port.fd(Side::Outside))
                .unwrap();
            f(&mut c, inside, outside, lo);
        })
        .unwrap();
}

/// Runs `frame` through the program: the action must be `action`, `Rx`
/// and `counter` must move by one (by the whole frame's bytes for `Rx`)
/// and no other outcome counter at all.
fn check(
    c: &Classifier,
    name: &str,
    frame: &[u8],
    ifindex: u32,
    queue: u32,
    action: u32,
    counter: Counter,
) {
    let before = c.counters().unwrap();
    let got = c
        .test_run(frame, ifindex, queue)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let after = c.counters().unwrap();
    assert_eq!(got, action, "{name}: action");
    for ((ctr, b), (_, a)) in before.iter().zip(after.iter()) {
        let delta = a.packets - b.packets;
        let want = if *ctr == Counter::Rx || *ctr == counter {
            1
        } else if ctr.is_outcome() {
            0
        } else {
            delta
        };
        assert_eq!(delta, want, "{name}: counter {}", ctr.label());
        if *ctr == Counter::Rx {
            // The whole frame, fragments included.
            assert_eq!(a.bytes - b.bytes, frame.len() as u64, "{name}: bytes");
        }
    }
}

#[test]
fn classifier_decides_each_frame_by_maps_and_counts_one_outcome() {
    // The handshake fast path is off in a freshly loaded program: SYNs
    // are steered like every other frame (the cases below say so).
    with_classifier(|c, inside, outside, lo| {
        let mut flows = c.take_flow_map().unwrap();
        flows
            .set(&key(CLIENT, 40002, SERVER, 8080), verdict::STEER)
            .unwrap();
        flows
            .set(&key(CLIENT, 40003, SERVER, 443), verdict::BYPASS)
            .unwrap();
        flows
            .set(&key(CLIENT, 40004, SERVER, 443), verdict::DROP)
            .unwrap();
        flows.set(&key(CLIENT, 40005, SERVER, 443), 99).unwrap();
        flows
            .set(&key(CLIENT, 40006, SERVER, 443), verdict::BYPASS)
            .unwrap();
        flows
            .set(&key(SERVER, 443, CLIENT, 40006), verdict::BYPASS)
            .unwrap();

        let (c4, s4) = (Ip::V4(CLIENT), Ip::V4(SERVER));
        let mut udp = Vec::new();
        PacketBuilder::ethernet2(MAC, MAC)
            .ipv4(CLIENT, SERVER, 64)
            .udp(5000, 443)
            .write(&mut udp, b"q")
            .unwrap();
        // Jumbo frames: the test run puts all but the first page's
        // worth in fragments, as a multi-buffer driver does.
        let jumbo4 = tcp_carrying(c4, 40001, s4, 443, 8960);
        let jumbo6 = tcp_carrying(Ip::V6(v6(1, 0)), 40001, Ip::V6(v6(2, 0)), 443, 8940);
        let mut cut4 = jumbo4.clone();
        cut4.truncate(8000);
        let mut cut6 = jumbo6.clone();
        cut6.truncate(8000);
        let chained = v6_long_chain(4000);
        let mut chain_cut = chained.clone();
        chain_cut.truncate(4100);
        // The chain ends where the frame does: no TCP header to read.
        let mut chain_only = v6_long_chain(0);
        chain_only.truncate(chain_only.len() - 20);
        let plen = u16::from_be_bytes([chain_only[18], chain_only[19]]) - 20;
        chain_only[18..20].copy_from_slice(&plen.to_be_bytes());
        let mut arp = vec![0xff; 6];
        arp.extend_from_slice(&MAC);
        arp.extend_from_slice(&[0x08, 0x06]);
        arp.extend_from_slice(&[0; 28]);

        #[rustfmt::skip]
            let cases: Vec<Case> = vec![
                ("client to steered port", tcp(c4, 40001, s4, 443), inside, 0, XDP_REDIRECT, Counter::Steer),
                ("same on a queue without socket", tcp(c4, 40001, s4, 443), inside, 1, XDP_REDIRECT, Counter::SteerNoSocket),
                ("server reply from steered port", tcp(s4, 443, c4, 40001), outside, 0, XDP_REDIRECT, Counter::Steer),
                ("other port", tcp(c4, 40001, s4, 8080), inside, 0, XDP_REDIRECT, Counter::PassTcp),
                ("server outside steered prefix", tcp(c4, 40001, Ip::V4([198, 19, 0, 2]), 443), inside, 0, XDP_REDIRECT, Counter::PassTcp),
                ("exempt source", tcp(Ip::V4([198, 18, 0, 99]), 40001, s4, 443), inside, 0, XDP_REDIRECT, Counter::PassExempt),
                ("exempt destination", tcp(c4, 40001, Ip::V4([198, 18, 0, 99]), 443), inside, 0, XDP_REDIRECT, Counter::PassExempt),
                ("ipv6 to steered port", tcp(Ip::V6(v6(1, 0)), 40001, Ip::V6(v6(2, 0)), 443), inside, 0, XDP_REDIRECT, Counter::Steer),
                ("ipv6 outside steered prefix", tcp(Ip::V6(v6(1, 0)), 40001, Ip::V6(v6(2, 1)), 443), inside, 0, XDP_REDIRECT, Counter::PassTcp),
                ("ipv6 exempt", tcp(Ip::V6(v6(0x99, 0)), 40001, Ip::V6(v6(2, 0)), 443), inside, 0, XDP_REDIRECT, Counter::PassExempt),
                ("ipv6 with ipv4-mapped destination", tcp(Ip::V6(v6(1, 0)), 40001, Ip::V6(v4_mapped(SERVER)), 443), inside, 0, XDP_REDIRECT, Counter::Malformed),
                ("udp", udp, inside, 0, XDP_REDIRECT, Counter::PassNonTcp),
                ("arp", arp, inside, 0, XDP_REDIRECT, Counter::PassNonIp),
                ("flow verdict steer beats port", tcp(c4, 40002, s4, 8080), inside, 0, XDP_REDIRECT, Counter::FlowSteer),
                ("flow verdict bypass beats port", tcp(c4, 40003, s4, 443), inside, 0, XDP_REDIRECT, Counter::FlowBypass),
                ("a new SYN on bypassed ports is steered", syn_v4(CLIENT, 40003, SERVER, 443), inside, 0, XDP_REDIRECT, Counter::Steer),
                ("flow verdict drop", tcp(c4, 40004, s4, 443), inside, 0, XDP_DROP, Counter::FlowDrop),
                ("flow keys are per direction", tcp(s4, 443, c4, 40003), outside, 0, XDP_REDIRECT, Counter::Steer),
                ("unknown verdict falls through", tcp(c4, 40005, s4, 443), inside, 0, XDP_REDIRECT, Counter::Steer),
                ("a bypassed flow's replies bypass", tcp(s4, 443, c4, 40006), outside, 0, XDP_REDIRECT, Counter::FlowBypass),
                ("a new SYN on its ports is steered", syn_v4(CLIENT, 40006, SERVER, 443), inside, 0, XDP_REDIRECT, Counter::Steer),
                ("and its old verdict is gone: replies are steered", tcp(s4, 443, c4, 40006), outside, 0, XDP_REDIRECT, Counter::Steer),
                ("and so is the client's", tcp(c4, 40006, s4, 443), inside, 0, XDP_REDIRECT, Counter::Steer),
                ("ipv4 jumbo frame to steered port", jumbo4, inside, 0, XDP_REDIRECT, Counter::Steer),
                ("ipv6 jumbo frame to steered port", jumbo6, inside, 0, XDP_REDIRECT, Counter::Steer),
                ("ipv4 jumbo frame cut short of its total length", cut4, inside, 0, XDP_REDIRECT, Counter::Malformed),
                ("ipv6 jumbo frame cut short of its payload length", cut6, inside, 0, XDP_REDIRECT, Counter::Malformed),
                ("ipv6 jumbo frame with its tcp header past 4 KB", chained, inside, 0, XDP_REDIRECT, Counter::Steer),
                ("and that frame cut short", chain_cut, inside, 0, XDP_REDIRECT, Counter::Malformed),
                ("a chain that leaves no room for the tcp header", chain_only, inside, 0, XDP_REDIRECT, Counter::Malformed),
                ("interface not served", tcp(c4, 40001, s4, 443), lo, 0, XDP_PASS, Counter::UnknownIface),
            ];

        for (name, frame, ifindex, queue, action, counter) in cases {
            check(c, name, &frame, ifindex, queue, action, counter);
        }
    });
}

/// A TCP segment of an IPv4 connection with the given flags
/// (`S`yn, `A`ck, `F`in, `R`st), sequence and acknowledgment numbers.
fn seg_v4(
    (src, sport): ([u8; 4], u16),
    (dst, dport): ([u8; 4], u16),
    flags: &str,
    seq: u32,
    ack: u32,
    payload: &[u8],
) -> Vec<u8> {
    let mut out = Vec::new();
    let mut b = PacketBuilder::ethernet2(MAC, MAC)
        .ipv4(src, dst, 64)
        .tcp(sport, dport, seq, 64240);
    if flags.contains('S') {
        b = b.syn();
    }
    if flags.contains('A') {
        b = b.ack(ack);
    }
    if flags.contains('F') {
        b = b.fin();
    }
    if flags.contains('R') {
        b = b.rst();
    }
    b.write(&mut out, payload).unwrap();
    out
}

/// Sets the TCP checksum of an untagged IPv4 frame without IP options.
fn fix_tcp_checksum(f: &mut [u8]) {
    f[50..52].fill(0);
    let mut sum: u32 = 0;
    let mut add = |b: &[u8]| {
        for w in b.chunks(2) {
            sum += u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]));
        }
    };
    add(&f[26..34]);
    add(&[0, 6]);
    add(&((f.len() - 34) as u16).to_be_bytes());
    add(&f[34..]);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    f[50..52].copy_from_slice(&(!(sum as u16)).to_be_bytes());
}

/// [`check`] for a frame from queue 0 that is redirected (to the peer or
/// to a socket: the outcome counter says which).
fn go(c: &Classifier, name: &str, frame: &[u8], ifindex: u32, counter: Counter) {
    check(c, name, frame, ifindex, 0, XDP_REDIRECT, counter)
}

fn record(c: &Classifier, key: &FlowKey) -> Option<Handshake> {
    c.handshake(key).unwrap().map(|(h, _)| h)
}

/// Whether the record under `key` is among the opened ones.
fn opened(c: &Classifier, key: &FlowKey) -> bool {
    c.handshake(key).unwrap().expect("a record").1
}

/// With the handshake fast path on, a steered connection's SYN, the
/// SYN-ACK acknowledging it and the ACKs in between are forwarded in the
/// kernel and recorded whole; its first data and everything after are
/// steered, and the record stops changing. What does not fit a handshake
/// (a SYN-ACK for another SYN, a SYN carrying data, a SYN too long to
/// record) is steered as before.
#[test]
fn a_connections_handshake_takes_the_fast_path_and_is_recorded() {
    with_classifier(|c, inside, outside, _lo| {
        c.set_handshake_fast_path(true).unwrap();
        let (cl, sv) = (CLIENT, SERVER);
        let k = key(cl, 41000, sv, 443);
        let syn = seg_v4((cl, 41000), (sv, 443), "S", 1000, 0, b"");
        go(c, "syn", &syn, inside, Counter::Handshake);
        let r = record(c, &k).expect("the SYN is recorded under its own key");
        assert_eq!(&r.syn[..r.syn_len as usize], &syn[..], "the SYN, whole");
        assert_eq!((r.isn, r.synack_len, r.steered), (1000, 0, 0));
        assert!(
            record(c, &k.reversed()).is_none(),
            "one record, keyed by the SYN"
        );

        go(c, "the SYN resent", &syn, inside, Counter::Handshake);
        assert_eq!(
            record(c, &k),
            Some(r),
            "a resent SYN leaves the record as it was"
        );

        let wrong = seg_v4((sv, 443), (cl, 41000), "SA", 5000, 1000, b"");
        go(
            c,
            "a SYN-ACK acknowledging another SYN",
            &wrong,
            outside,
            Counter::Steer,
        );
        let r = record(c, &k).unwrap();
        assert_eq!(
            (r.synack_len, r.steered),
            (0, 1),
            "not recorded; the rest goes to the worker"
        );
        let synack = seg_v4((sv, 443), (cl, 41000), "SA", 5000, 1001, b"");
        go(c, "then the right one", &synack, outside, Counter::Steer);
        go(
            c,
            "and a new SYN on those ports",
            &syn,
            inside,
            Counter::Steer,
        );
        assert_eq!(record(c, &k).unwrap().synack_len, 0);

        let k = key(cl, 41001, sv, 443);
        let syn = seg_v4((cl, 41001), (sv, 443), "S", 7, 0, b"");
        go(c, "syn", &syn, inside, Counter::Handshake);
        go(
            c,
            "pure ACK before the SYN-ACK",
            &seg_v4((cl, 41001), (sv, 443), "A", 8, 9001, b""),
            inside,
            Counter::Steer,
        );
        assert_eq!(
            record(c, &k).unwrap().steered,
            1,
            "out of order: the worker takes over"
        );

        let k = key(cl, 41002, sv, 443);
        let syn = seg_v4((cl, 41002), (sv, 443), "S", 7, 0, b"");
        let synack = seg_v4((sv, 443), (cl, 41002), "SA", 9000, 8, b"");
        go(c, "syn", &syn, inside, Counter::Handshake);
        go(c, "syn-ack", &synack, outside, Counter::Handshake);
        let r = record(c, &k).unwrap();
        assert_eq!(
            &r.synack[..r.synack_len as usize],
            &synack[..],
            "the SYN-ACK, whole"
        );
        assert_eq!(r.steered, 0);
        let ack = seg_v4((cl, 41002), (sv, 443), "A", 8, 9001, b"");
        go(c, "the handshake's ACK", &ack, inside, Counter::Handshake);
        let r = record(c, &k).unwrap();
        assert_eq!(
            &r.ack[..r.ack_len as usize],
            &ack[..],
            "the client's ACK, whole"
        );
        assert!(
            opened(c, &k),
            "the client's ACK moves the record to the opened ones"
        );
        // A window update: the last ACK is the one kept.
        let update = seg_v4((cl, 41002), (sv, 443), "A", 8, 9001, b"");
        let update = {
            let mut f = update;
            f[48..50].copy_from_slice(&1000u16.to_be_bytes());
            fix_tcp_checksum(&mut f);
            f
        };
        go(c, "another ACK", &update, inside, Counter::Handshake);
        let r = record(c, &k).unwrap();
        assert_eq!(&r.ack[..r.ack_len as usize], &update[..]);
        let data = seg_v4((cl, 41002), (sv, 443), "A", 8, 9001, b"hello");
        go(c, "first data", &data, inside, Counter::Steer);
        let after = record(c, &k).unwrap();
        assert_eq!(after.steered, 1);
        assert_eq!(
            (after.syn, after.synack),
            (r.syn, r.synack),
            "the record stands"
        );
        go(c, "pure ACKs after it", &ack, inside, Counter::Steer);
        go(
            c,
            "the server's too",
            &seg_v4((sv, 443), (cl, 41002), "A", 9001, 13, b""),
            outside,
            Counter::Steer,
        );

        let k = key(cl, 41010, sv, 443);
        go(
            c,
            "syn",
            &seg_v4((cl, 41010), (sv, 443), "S", 7, 0, b""),
            inside,
            Counter::Handshake,
        );
        go(
            c,
            "syn-ack",
            &seg_v4((sv, 443), (cl, 41010), "SA", 9000, 8, b""),
            outside,
            Counter::Handshake,
        );
        go(
            c,
            "a server's pure ACK before any data",
            &seg_v4((sv, 443), (cl, 41010), "A", 9001, 8, b""),
            outside,
            Counter::Steer,
        );
        assert_eq!(record(c, &k).unwrap().steered, 1);

        // The handshake's ACK must acknowledge the SYN-ACK from just past
        // the SYN: a keepalive probe (one byte back) goes to the worker.
        let k = key(cl, 41011, sv, 443);
        go(
            c,
            "syn",
            &seg_v4((cl, 41011), (sv, 443), "S", 7, 0, b""),
            inside,
            Counter::Handshake,
        );
        go(
            c,
            "syn-ack",
            &seg_v4((sv, 443), (cl, 41011), "SA", 9000, 8, b""),
            outside,
            Counter::Handshake,
        );
        assert_eq!(record(c, &k).unwrap().s_isn, 9000);
        go(
            c,
            "a keepalive probe as the first ACK",
            &seg_v4((cl, 41011), (sv, 443), "A", 7, 9001, b""),
            inside,
            Counter::Steer,
        );
        let r = record(c, &k).unwrap();
        assert_eq!(
            (r.ack_len, r.steered),
            (0, 1),
            "not recorded as the handshake's ACK"
        );
        let k = key(cl, 41012, sv, 443);
        go(
            c,
            "syn",
            &seg_v4((cl, 41012), (sv, 443), "S", 7, 0, b""),
            inside,
            Counter::Handshake,
        );
        go(
            c,
            "syn-ack",
            &seg_v4((sv, 443), (cl, 41012), "SA", 9000, 8, b""),
            outside,
            Counter::Handshake,
        );
        go(
            c,
            "an ACK of something the server never sent",
            &seg_v4((cl, 41012), (sv, 443), "A", 8, 9500, b""),
            inside,
            Counter::Steer,
        );
        assert_eq!(record(c, &k).unwrap().ack_len, 0);

        // A corrupt SYN-ACK goes on unrecorded (the client drops it); the
        // server's next one is recorded.
        let k = key(cl, 41120, sv, 443);
        go(
            c,
            "syn",
            &seg_v4((cl, 41120), (sv, 443), "S", 7, 0, b""),
            inside,
            Counter::Handshake,
        );
        let synack = seg_v4((sv, 443), (cl, 41120), "SA", 9000, 8, b"");
        let mut corrupt = synack.clone();
        corrupt[50] ^= 0x40;
        go(
            c,
            "a corrupt syn-ack",
            &corrupt,
            outside,
            Counter::Malformed,
        );
        let r = record(c, &k).unwrap();
        assert_eq!((r.synack_len, r.steered), (0, 0), "nothing recorded");
        go(c, "the server's next", &synack, outside, Counter::Handshake);
        let r = record(c, &k).unwrap();
        assert_eq!(&r.synack[..r.synack_len as usize], &synack[..]);
        // With options (and so a longer header) it checks alike.
        let k = key(cl, 41121, sv, 443);
        go(
            c,
            "syn",
            &seg_v4((cl, 41121), (sv, 443), "S", 7, 0, b""),
            inside,
            Counter::Handshake,
        );
        let mut long = Vec::new();
        // MSS 1460, SACK permitted, window scale 7, a NOP: 12 bytes.
        PacketBuilder::ethernet2(MAC, MAC)
            .ipv4(sv, cl, 64)
            .tcp(443, 41121, 9000, 64240)
            .syn()
            .ack(8)
            .options_raw(&[2, 4, 5, 180, 4, 2, 3, 3, 7, 1, 0, 0])
            .unwrap()
            .write(&mut long, b"")
            .unwrap();
        // And an IPv6 one (its pseudo-header is 40 bytes).
        let mut syn6 = Vec::new();
        let (cl6, sv6) = (v6(1, 0), v6(2, 0));
        PacketBuilder::ethernet2(MAC, MAC)
            .ipv6(cl6, sv6, 64)
            .tcp(41122, 443, 7, 64240)
            .syn()
            .write(&mut syn6, b"")
            .unwrap();
        go(c, "an ipv6 syn", &syn6, inside, Counter::Handshake);
        let mut v6_synack = Vec::new();
        PacketBuilder::ethernet2(MAC, MAC)
            .ipv6(sv6, cl6, 64)
            .tcp(443, 41122, 9000, 64240)
            .syn()
            .ack(8)
            .options_raw(&[2, 4, 5, 160])
            .unwrap()
            .write(&mut v6_synack, b"")
            .unwrap();
        go(
            c,
            "an ipv6 syn-ack",
            &v6_synack,
            outside,
            Counter::Handshake,
        );
        let k6 = FlowKey::new(cl6, sv6, 41122, 443, 6);
        assert_eq!(record(c, &k6).unwrap().synack_len as usize, v6_synack.len());
        go(
            c,
            "a syn-ack with options",
            &long,
            outside,
            Counter::Handshake,
        );
        assert_eq!(record(c, &k).unwrap().synack_len as usize, long.len());

        // Each end's frames come in on its own side.
        let k = key(cl, 41013, sv, 443);
        let syn = seg_v4((cl, 41013), (sv, 443), "S", 7, 0, b"");
        go(c, "syn", &syn, inside, Counter::Handshake);
        assert_eq!(
            record(c, &k).unwrap().client_slot,
            0,
            "the inside interface"
        );
        let other = seg_v4((cl, 41013), (sv, 443), "S", 99, 0, b"");
        go(
            c,
            "the client's SYN, new ISN, from the server's side",
            &other,
            outside,
            Counter::Steer,
        );
        assert_eq!(record(c, &k).unwrap().isn, 7, "the record stands");
        let synack = seg_v4((sv, 443), (cl, 41013), "SA", 9000, 8, b"");
        go(
            c,
            "a SYN-ACK from the client's side",
            &synack,
            inside,
            Counter::Steer,
        );
        let r = record(c, &k).unwrap();
        assert_eq!((r.synack_len, r.steered), (0, 1));

        // Once the server answered, a SYN with another ISN (forged) goes
        // on in the kernel, as the server challenges it, and the record
        // stands; a resent SYN renews the record's copy of the SYN.
        let k = key(cl, 41015, sv, 443);
        go(
            c,
            "syn",
            &seg_v4((cl, 41015), (sv, 443), "S", 7, 0, b""),
            inside,
            Counter::Handshake,
        );
        go(
            c,
            "syn-ack",
            &seg_v4((sv, 443), (cl, 41015), "SA", 9000, 8, b""),
            outside,
            Counter::Handshake,
        );
        go(
            c,
            "a SYN with another ISN",
            &seg_v4((cl, 41015), (sv, 443), "S", 99, 0, b""),
            inside,
            Counter::Handshake,
        );
        let r = record(c, &k).unwrap();
        assert_eq!(
            (r.isn, r.s_isn, r.steered),
            (7, 9000, 0),
            "the record stands"
        );
        let k = key(cl, 41016, sv, 443);
        let good = seg_v4((cl, 41016), (sv, 443), "S", 7, 0, b"");
        let mut bad = good.clone();
        bad[50] ^= 0xff;
        go(c, "a corrupt SYN", &bad, inside, Counter::Handshake);
        go(c, "resent whole", &good, inside, Counter::Handshake);
        let r = record(c, &k).unwrap();
        assert_eq!(
            &r.syn[..r.syn_len as usize],
            &good[..],
            "the resent copy kept"
        );

        // The server's own SYN (a simultaneous open) goes to the worker,
        // the record unmarked for it to be judged against.
        let k = key(cl, 41017, sv, 443);
        go(
            c,
            "syn",
            &seg_v4((cl, 41017), (sv, 443), "S", 7, 0, b""),
            inside,
            Counter::Handshake,
        );
        go(
            c,
            "the server's SYN",
            &seg_v4((sv, 443), (cl, 41017), "S", 9000, 0, b""),
            outside,
            Counter::Steer,
        );
        assert_eq!(record(c, &k).unwrap().steered, 0);

        // A new connection on the ports of one the worker released: the
        // worker may still hold that one, so this one is its whole.
        let mut flows = c.take_flow_map().unwrap();
        flows
            .set(&key(cl, 41014, sv, 443), verdict::BYPASS)
            .unwrap();
        let syn = seg_v4((cl, 41014), (sv, 443), "S", 7, 0, b"");
        go(
            c,
            "a new SYN on bypassed ports",
            &syn,
            inside,
            Counter::Steer,
        );
        assert!(record(c, &key(cl, 41014, sv, 443)).is_none());
        // The same SYN as the first fragment of its datagram, on other
        // bypassed ports: it must not take the bypass (its flags may not
        // even be in it), so it is dropped and never completes.
        flows
            .set(&key(cl, 41015, sv, 443), verdict::BYPASS)
            .unwrap();
        let mut frag = seg_v4((cl, 41015), (sv, 443), "S", 7, 0, b"");
        frag[14 + 6] = 0x20; // More Fragments (XDP reads no IP checksum)
        check(
            c,
            "a SYN's first fragment on bypassed ports",
            &frag,
            inside,
            0,
            XDP_DROP,
            Counter::Unclassifiable,
        );

        let k = key(cl, 41003, sv, 443);
        go(
            c,
            "a SYN carrying data (TCP Fast Open)",
            &seg_v4((cl, 41003), (sv, 443), "S", 7, 0, b"early"),
            inside,
            Counter::Steer,
        );
        assert!(record(c, &k).is_none());
        go(
            c,
            "a FIN before anything",
            &seg_v4((cl, 41004), (sv, 443), "FA", 7, 1, b""),
            inside,
            Counter::Steer,
        );
        go(
            c,
            "a RST with a SYN",
            &seg_v4((cl, 41005), (sv, 443), "SR", 7, 0, b""),
            inside,
            Counter::Steer,
        );

        // 14 + 40 + 72 (destination options) + 20 = 146: recorded; with
        // 88 bytes of options, 162: longer than a record holds, steered.
        let long_syn = |opts: usize, port: u16| {
            let mut out = Vec::new();
            PacketBuilder::ethernet2(MAC, MAC)
                .ipv6(v6(1, 0), v6(2, 0), 64)
                .tcp(port, 443, 1, 1000)
                .syn()
                .write(&mut out, b"")
                .unwrap();
            let mut ext = vec![0u8; opts];
            ext[..2].copy_from_slice(&[6, (opts / 8 - 1) as u8]);
            let plen = u16::from_be_bytes([out[18], out[19]]) + opts as u16;
            out[18..20].copy_from_slice(&plen.to_be_bytes());
            out[20] = 60;
            out.splice(54..54, ext);
            out
        };
        let v6key = |port| FlowKey::new(v6(1, 0), v6(2, 0), port, 443, 6);
        let fits = long_syn(72, 41006);
        assert_eq!(fits.len(), 146);
        go(
            c,
            "an IPv6 SYN with extension headers",
            &fits,
            inside,
            Counter::Handshake,
        );
        assert_eq!(record(c, &v6key(41006)).unwrap().syn_len, 146);
        let too_long = long_syn(88, 41007);
        assert_eq!(too_long.len(), 162);
        go(
            c,
            "a SYN longer than a record",
            &too_long,
            inside,
            Counter::Steer,
        );
        assert!(record(c, &v6key(41007)).is_none());

        // A SYN flood larger than the half-open records pushes out a
        // half-open connection's record, never an opened one's.
        let half = key(cl, 41020, sv, 443);
        go(
            c,
            "syn",
            &seg_v4((cl, 41020), (sv, 443), "S", 7, 0, b""),
            inside,
            Counter::Handshake,
        );
        let k = key(cl, 41021, sv, 443);
        go(
            c,
            "syn",
            &seg_v4((cl, 41021), (sv, 443), "S", 7, 0, b""),
            inside,
            Counter::Handshake,
        );
        go(
            c,
            "syn-ack",
            &seg_v4((sv, 443), (cl, 41021), "SA", 9000, 8, b""),
            outside,
            Counter::Handshake,
        );
        go(
            c,
            "ack",
            &seg_v4((cl, 41021), (sv, 443), "A", 8, 9001, b""),
            inside,
            Counter::Handshake,
        );
        let flood = loupe_common::MAX_HANDSHAKES + 4096;
        for i in 0..flood {
            let src = [198, 18, 1 + (i >> 16) as u8, 0];
            let f = seg_v4((src, (i & 0xffff) as u16), (sv, 443), "S", i, 0, b"");
            assert_eq!(c.test_run(&f, inside, 0).unwrap(), XDP_REDIRECT);
        }
        assert!(
            record(c, &half).is_none(),
            "the flood pushed out the half-open record"
        );
        let r = record(c, &k).expect("the opened record outlives the flood");
        assert!(opened(c, &k) && r.ack_len > 0 && r.steered == 0);
        go(
            c,
            "its first data after the flood",
            &seg_v4((cl, 41021), (sv, 443), "A", 8, 9001, b"hi"),
            inside,
            Counter::Steer,
        );
        assert_eq!(record(c, &k).unwrap().steered, 1);

        c.set_handshake_fast_path(false).unwrap();
        go(
            c,
            "switched off",
            &seg_v4((cl, 41008), (sv, 443), "S", 7, 0, b""),
            inside,
            Counter::Steer,
        );
        assert!(record(c, &key(cl, 41008, sv, 443)).is_none());
        go(
            c,
            "an unsteered port is not recorded",
            &seg_v4((cl, 41009), (sv, 8080), "S", 7, 0, b""),
            inside,
            Counter::PassTcp,
        );
    });
}

/// Frames the worker builds for one side, unsent (its receiver drains
/// slowly), stop at that side's TX share while free frames are left:
/// those are the fill rings' (a TX backlog once took them all, and the
/// kernel dropped received frames for want of a fill descriptor). The
/// other side still builds, and a flush frees the share again.
#[test]
fn a_tx_backlog_stops_at_its_share_and_leaves_the_fill_rings_theirs() {
    let h = Harness::new(HarnessConfig::default()).expect("harness");
    h.engine
        .enter(|| {
            let cfg = PortConfig {
                frames: 512,
                ring_size: 64,
                ..PortConfig::default()
            };
            let share = cfg.tx_share() as usize;
            let mut port = QueuePort::new(INSIDE_IF, OUTSIDE_IF, 0, cfg).expect("AF_XDP sockets");
            let frame = syn_v4([198, 18, 0, 1], 40000, [198, 18, 0, 2], 443);
            let mut built = 0;
            while port.build_send(Side::Outside, &frame).is_ok() {
                built += 1;
                assert!(built <= share, "built past the share of {share}");
            }
            assert_eq!(built, share);
            assert!(
                port.free_frames() > cfg.reserve() as usize,
                "the share stopped it, not an empty free list: {} free",
                port.free_frames()
            );
            // The other side has a share of its own.
            port.build_send(Side::Inside, &frame)
                .expect("the inside builds");
            // Once the backlog is out and completed, the side builds again.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while port.pending_tx() > 0 {
                port.flush();
                port.reclaim();
                assert!(std::time::Instant::now() < deadline, "TX never completed");
                std::thread::yield_now();
            }
            port.build_send(Side::Outside, &frame)
                .expect("the share is free again");
        })
        .unwrap();
}
