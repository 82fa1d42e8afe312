//! Hand-built Ethernet frames, valid and hostile, for injection tests.
//! All carry the source MAC [`MARK_MAC`] so they can be recognised where
//! they arrive.

use etherparse::PacketBuilder;

/// "\x02LOUPE": locally administered, unicast.
pub const MARK_MAC: [u8; 6] = [0x02, 0x4c, 0x4f, 0x55, 0x50, 0x45];
pub const DST_MAC: [u8; 6] = [0xff; 6];
const CLIENT4: [u8; 4] = [198, 18, 0, 1];
const SERVER4: [u8; 4] = [198, 18, 0, 2];
const CLIENT6: [u8; 16] = [0x20, 0x01, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const SERVER6: [u8; 16] = [0x20, 0x01, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

/// Where the XDP program must send a frame, as its counter label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    Malformed,
    Fragment,
    Steer,
    /// Dropped: the receiver might take it as part of a steered
    /// connection the engine never saw it in.
    Unclassifiable,
}

pub struct Case {
    pub name: &'static str,
    pub frame: Vec<u8>,
    pub expect: Expect,
    pub vlan: bool,
    pub ipv6_ext: bool,
    /// Whether a Linux receiver shows the frame to packet sockets at all:
    /// it drops a truncated VLAN tag while untagging, before any tap.
    pub observable: bool,
}

impl Case {
    /// Whether `received` (as a packet socket on the receiver sees it, VLAN
    /// tags moved out of the data by the kernel) is this frame.
    pub fn matches(&self, received: &[u8]) -> bool {
        if received == self.frame.as_slice() {
            return true;
        }
        if !self.vlan || received.len() < 14 || received[..12] != self.frame[..12] {
            return false;
        }
        // The receiver untags one or more tags; compare after each count.
        let mut off = 12;
        loop {
            if received[12..] == self.frame[off..] {
                return true;
            }
            let tagged = off + 4 <= self.frame.len()
                && matches!(
                    u16::from_be_bytes([self.frame[off], self.frame[off + 1]]),
                    0x8100 | 0x88a8
                );
            if !tagged {
                return false;
            }
            off += 4;
        }
    }
}

pub fn tcp4(dst_port: u16) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(MARK_MAC, DST_MAC)
        .ipv4(CLIENT4, SERVER4, 64)
        .tcp(40001, dst_port, 7, 1024)
        .syn()
        .write(&mut out, &[])
        .expect("build");
    out
}

fn eth(ethertype: u16) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&DST_MAC);
    f.extend_from_slice(&MARK_MAC);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

fn ipv6_header(next: u8, payload_len: u16) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&payload_len.to_be_bytes());
    h.push(next);
    h.push(64);
    h.extend_from_slice(&CLIENT6);
    h.extend_from_slice(&SERVER6);
    h
}

/// A minimal TCP SYN header to port 443 (checksum left zero: these frames
/// test classification, not delivery to a socket).
fn tcp_header(dst_port: u16) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(&40002u16.to_be_bytes());
    t.extend_from_slice(&dst_port.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0x04, 0x00, 0, 0, 0, 0]);
    t
}

fn insert_vlan(frame: &[u8], tpid: u16, vid: u16) -> Vec<u8> {
    let mut f = frame[..12].to_vec();
    f.extend_from_slice(&tpid.to_be_bytes());
    f.extend_from_slice(&vid.to_be_bytes());
    f.extend_from_slice(&frame[12..]);
    f
}

/// TCP to port 443 behind two IPv6 authentication headers that claim 8
/// bytes each (below the 12 RFC 4302 needs): XDP walks them and steers the
/// frame; the worker's parser refuses it.
pub fn steered_but_unparseable() -> Vec<u8> {
    let mut f = eth(0x86dd);
    f.extend_from_slice(&ipv6_header(51, 8 + 8 + 20));
    f.extend_from_slice(&[51, 0, 0, 0, 0, 0, 0, 0]);
    f.extend_from_slice(&[6, 0, 0, 0, 0, 0, 0, 0]);
    f.extend_from_slice(&tcp_header(443));
    f
}

/// The injection corpus: each case and the path XDP must take.
pub fn hostile_cases() -> Vec<Case> {
    let case = |name, frame, expect| Case {
        name,
        frame,
        expect,
        vlan: false,
        ipv6_ext: false,
        observable: true,
    };
    let mut cases = Vec::new();

    cases.push(case(
        "ipv4 ethertype, no IP header",
        eth(0x0800),
        Expect::Malformed,
    ));

    let mut f = tcp4(443);
    f[14] = 0x43; // IHL 3 (< 5)
    cases.push(case("ipv4 IHL 3", f, Expect::Malformed));

    let mut f = tcp4(443);
    f[14] = 0x4f; // IHL 15: 60-byte header, frame too short for it
    cases.push(case("ipv4 IHL beyond frame", f, Expect::Malformed));

    let mut f = tcp4(443);
    f[14] = 0x55; // version 5
    cases.push(case("ipv4 version 5", f, Expect::Malformed));

    let mut f = tcp4(443);
    f[16] = 0x05; // total length 1300+ > frame
    cases.push(case("ipv4 total length beyond frame", f, Expect::Malformed));

    let f = tcp4(443);
    cases.push(case(
        "tcp header truncated",
        f[..14 + 20 + 10].to_vec(),
        Expect::Malformed,
    ));

    let mut f = tcp4(443);
    f[14 + 20 + 12] = 0x20; // data offset 2
    cases.push(case("tcp data offset 2", f, Expect::Malformed));

    let mut f = tcp4(443);
    f[14 + 20 + 12] = 0xf0; // data offset 15: options beyond the segment
    cases.push(case("tcp options beyond segment", f, Expect::Malformed));

    let mut f = eth(0x86dd);
    f.extend_from_slice(&ipv6_header(6, 20)[..20]);
    cases.push(case("ipv6 header truncated", f, Expect::Malformed));

    // A first fragment to a steered port: the server would reassemble a
    // segment the engine never saw. Dropped, its datagram never completes.
    let mut f = tcp4(443);
    f[14 + 6] = 0x20; // More Fragments
    cases.push(Case {
        observable: false,
        ..case("ipv4 first fragment", f, Expect::Unclassifiable)
    });
    // To a port nobody steers: forwarded.
    let mut f = tcp4(8080);
    f[14 + 6] = 0x20;
    cases.push(case("ipv4 first fragment, other port", f, Expect::Fragment));
    // Too short to show its ports (RFC 1858's tiny fragment).
    let mut f = tcp4(443);
    f[14 + 6] = 0x20;
    f[14 + 2..14 + 4].copy_from_slice(&22u16.to_be_bytes());
    f.truncate(14 + 22);
    cases.push(Case {
        observable: false,
        ..case("ipv4 first fragment of 2 bytes", f, Expect::Unclassifiable)
    });

    let mut f = tcp4(443);
    f[14 + 7] = 0x10; // offset 16*8
    cases.push(case("ipv4 later fragment", f, Expect::Fragment));

    // IPv6 hop-by-hop (PadN) then TCP to 443: valid, steered.
    let mut f = eth(0x86dd);
    f.extend_from_slice(&ipv6_header(0, 8 + 20));
    f.extend_from_slice(&[6, 0, 1, 4, 0, 0, 0, 0]);
    f.extend_from_slice(&tcp_header(443));
    cases.push(Case {
        ipv6_ext: true,
        ..case("ipv6 hop-by-hop + tcp 443", f, Expect::Steer)
    });

    // Destination options header claiming 2 KiB.
    let mut f = eth(0x86dd);
    f.extend_from_slice(&ipv6_header(60, 8 + 20));
    f.extend_from_slice(&[6, 255, 1, 4, 0, 0, 0, 0]);
    f.extend_from_slice(&tcp_header(443));
    // (The ipv6_ext tag counts chains walked to their end, so not this one.)
    cases.push(case(
        "ipv6 extension header beyond frame",
        f,
        Expect::Malformed,
    ));

    // Eight destination-options headers: longer than XDP walks.
    let mut f = eth(0x86dd);
    f.extend_from_slice(&ipv6_header(60, 8 * 8 + 20));
    for i in 0..8 {
        let next = if i == 7 { 6 } else { 60 };
        f.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
    }
    f.extend_from_slice(&tcp_header(443));
    // The server walks on and finds TCP: dropped.
    cases.push(Case {
        ipv6_ext: true,
        observable: false,
        ..case("ipv6 extension chain too long", f, Expect::Unclassifiable)
    });

    // IPv4-mapped source address in an IPv6 packet (RFC 4291 2.5.5.2).
    let mut f = eth(0x86dd);
    let mut h = ipv6_header(6, 20);
    h[8..24].copy_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 18, 0, 1]);
    f.extend_from_slice(&h);
    f.extend_from_slice(&tcp_header(443));
    cases.push(case("ipv6 with ipv4-mapped source", f, Expect::Malformed));

    // Hop-by-hop after destination options (RFC 8200 4.3: only first).
    let mut f = eth(0x86dd);
    f.extend_from_slice(&ipv6_header(60, 8 + 8 + 20));
    f.extend_from_slice(&[0, 0, 1, 4, 0, 0, 0, 0]);
    f.extend_from_slice(&[6, 0, 1, 4, 0, 0, 0, 0]);
    f.extend_from_slice(&tcp_header(443));
    cases.push(case("ipv6 hop-by-hop not first", f, Expect::Malformed));

    // IPv6 fragment header, offset 8.
    let mut f = eth(0x86dd);
    f.extend_from_slice(&ipv6_header(44, 8 + 20));
    f.extend_from_slice(&[6, 0, 0, 8, 0, 0, 0, 1]);
    f.extend_from_slice(&tcp_header(443));
    cases.push(case("ipv6 fragment", f, Expect::Fragment));

    // An IPv6 first fragment whose extension chain runs past it: the rest,
    // and TCP, would come in a later fragment.
    let mut f = eth(0x86dd);
    f.extend_from_slice(&ipv6_header(44, 8 + 8));
    f.extend_from_slice(&[60, 0, 0, 1, 0, 0, 0, 3]);
    f.extend_from_slice(&[6, 4, 1, 4, 0, 0, 0, 0]);
    cases.push(Case {
        observable: false,
        ..case(
            "ipv6 first fragment, chain beyond it",
            f,
            Expect::Unclassifiable,
        )
    });

    // IPv6 first fragment (offset 0, more follow) to a steered port.
    let mut f = eth(0x86dd);
    f.extend_from_slice(&ipv6_header(44, 8 + 20));
    f.extend_from_slice(&[6, 0, 0, 1, 0, 0, 0, 2]);
    f.extend_from_slice(&tcp_header(443));
    cases.push(Case {
        ipv6_ext: true,
        observable: false,
        ..case("ipv6 first fragment", f, Expect::Unclassifiable)
    });

    cases.push(Case {
        vlan: true,
        ..case(
            "802.1Q + tcp 443",
            insert_vlan(&tcp4(443), 0x8100, 10),
            Expect::Steer,
        )
    });
    cases.push(Case {
        vlan: true,
        ..case(
            "QinQ + tcp 443",
            insert_vlan(&insert_vlan(&tcp4(443), 0x8100, 20), 0x88a8, 30),
            Expect::Steer,
        )
    });
    // Three tags: more than XDP walks; dropped.
    cases.push(Case {
        vlan: true,
        observable: false,
        ..case(
            "three VLAN tags + tcp 443",
            insert_vlan(
                &insert_vlan(&insert_vlan(&tcp4(443), 0x8100, 20), 0x8100, 25),
                0x88a8,
                30,
            ),
            Expect::Unclassifiable,
        )
    });
    let mut f = eth(0x8100);
    f.extend_from_slice(&[0, 10]);
    cases.push(Case {
        observable: false,
        ..case("802.1Q tag truncated", f, Expect::Malformed)
    });

    cases
}
