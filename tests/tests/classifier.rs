//! The XDP classifier's decisions, one frame at a time, through
//! BPF_PROG_TEST_RUN on the real program with real maps: steering by port
//! and prefix in both directions, exemptions, flow-map verdicts overriding
//! them, sockets per queue, interfaces it does not serve, and jumbo frames
//! (multi-buffer: the lengths are the whole frame's). Each case
//! checks the action and that exactly one outcome counter moved.

use etherparse::PacketBuilder;
use loupe_common::{v4_mapped, verdict, Counter, FlowKey};
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

#[test]
fn classifier_decides_each_frame_by_maps_and_counts_one_outcome() {
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
                &["198.18.0.0/24".parse().unwrap(), "2001:2::/64".parse().unwrap()],
                &["198.18.0.99".parse().unwrap(), "2001:2::99".parse().unwrap()],
            )
            .unwrap();
            // Sockets on queue 0 of both interfaces; queue 1 has none.
            let cfg = PortConfig {
                frames: 256,
                ring_size: 64,
                ..PortConfig::default()
            };
            let port = QueuePort::new(INSIDE_IF, OUTSIDE_IF, 0, cfg).expect("AF_XDP sockets");
            c.register_socket(Side::Inside, 0, port.fd(Side::Inside)).unwrap();
            c.register_socket(Side::Outside, 0, port.fd(Side::Outside)).unwrap();

            let mut flows = c.take_flow_map().unwrap();
            flows.set(&key(CLIENT, 40002, SERVER, 8080), verdict::STEER).unwrap();
            flows.set(&key(CLIENT, 40003, SERVER, 443), verdict::BYPASS).unwrap();
            flows.set(&key(CLIENT, 40004, SERVER, 443), verdict::DROP).unwrap();
            flows.set(&key(CLIENT, 40005, SERVER, 443), 99).unwrap();
            flows.set(&key(CLIENT, 40006, SERVER, 443), verdict::BYPASS).unwrap();
            flows.set(&key(SERVER, 443, CLIENT, 40006), verdict::BYPASS).unwrap();

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
                let before = c.counters().unwrap();
                let got = c.test_run(&frame, ifindex, queue).unwrap_or_else(|e| panic!("{name}: {e}"));
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
        })
        .unwrap();
}
