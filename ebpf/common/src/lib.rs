//! Types shared by the XDP program (`ebpf/xdp`) and the userspace dataplane.
//!
//! Everything here is `#[repr(C)]` and has no padding the kernel could leave
//! uninitialised: the same bytes are map keys and values on both sides. The
//! crate is `no_std` so the eBPF program can use it; the `user` feature adds
//! the `aya::Pod` impls the loader needs.
#![no_std]

/// Addresses are stored as 16 bytes: IPv6 as is, IPv4 as an IPv4-mapped IPv6
/// address (`::ffff:a.b.c.d`, RFC 4291 section 2.5.5.2). One key type and one
/// LPM trie then cover both families.
pub type Addr = [u8; 16];

/// Map an IPv4 address (network byte order octets) into [`Addr`].
#[inline(always)]
pub const fn v4_mapped(octets: [u8; 4]) -> Addr {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3],
    ]
}

/// Prefix-length offset of an IPv4 prefix stored as IPv4-mapped IPv6.
pub const V4_MAPPED_PREFIX_BITS: u32 = 96;

/// Direction-specific flow key as the XDP program sees a frame: source and
/// destination as sent. Userspace installs both directions of a flow.
/// Ports are in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub src: Addr,
    pub dst: Addr,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl FlowKey {
    pub const fn new(src: Addr, dst: Addr, src_port: u16, dst_port: u16, proto: u8) -> Self {
        FlowKey {
            src,
            dst,
            src_port,
            dst_port,
            proto,
            _pad: [0; 3],
        }
    }

    /// The key of the opposite direction of the same flow.
    pub const fn reversed(&self) -> Self {
        FlowKey::new(self.dst, self.src, self.dst_port, self.src_port, self.proto)
    }
}

/// Verdicts userspace installs in the flow map (`FLOWS`).
pub mod verdict {
    /// Forward to the peer interface in the kernel (DEVMAP), never to userspace.
    pub const BYPASS: u32 = 1;
    /// Drop in XDP.
    pub const DROP: u32 = 2;
    /// Send to the AF_XDP socket of the receiving queue.
    pub const STEER: u32 = 3;
}

/// Per-interface facts the XDP program needs, keyed by ingress ifindex in
/// `IFACES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IfaceInfo {
    /// Slot of this interface: `PEERS[slot]` is the interface frames leave
    /// by, `XSKS[slot * MAX_QUEUES + queue]` the AF_XDP socket of a queue.
    pub slot: u32,
}

/// Interfaces the program serves (inside, outside).
pub const MAX_IFACES: u32 = 2;
/// RX queues per interface the XSKMAP has room for.
pub const MAX_QUEUES: u32 = 64;
/// Flow map capacity (LRU: the least recently used entry is evicted).
pub const MAX_FLOWS: u32 = 262_144;
/// Steering ports and prefixes capacity.
pub const MAX_STEER_PORTS: u32 = 1024;
pub const MAX_PREFIXES: u32 = 16_384;

/// Bytes of a handshake frame a [`Handshake`] keeps: two VLAN tags, IPv4
/// with 40 bytes of options and TCP with 40 (142 bytes), or IPv6 with 38
/// bytes of extension headers. A longer one is steered instead.
pub const HANDSHAKE_FRAME_MAX: usize = 160;
/// Handshakes the kernel keeps at once, half-open and opened each (LRU:
/// the least recently used goes; preallocated, about 17 MiB for both). A
/// record is needed from a connection's SYN to its first data. A SYN flood
/// pushes out half-open records only, as it pushes half-open connections
/// out of the engine's table; their connections are then met as already
/// running. Opened ones only other opened connections can push out.
pub const MAX_HANDSHAKES: u32 = 16_384;

/// A connection's opening as the XDP program carried it in the kernel,
/// keyed in `HANDSHAKES` (then `OPENED`) by its SYN's [`FlowKey`] (client
/// to server): the
/// SYN, the server's SYN-ACK and the client's last pure ACK, whole, so the
/// worker that gets the first steered segment can take the connection up
/// as if it had seen them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Handshake {
    /// When the SYN was recorded (`bpf_ktime_get_ns`, CLOCK_MONOTONIC).
    pub syn_ns: u64,
    /// The SYN's sequence number: the SYN-ACK must acknowledge it + 1.
    pub isn: u32,
    /// The SYN-ACK's (the server's ISN), once it came: the client's ACK
    /// must acknowledge it + 1.
    pub s_isn: u32,
    /// Bytes of `syn`, `synack` and `ack` in use; 0: none yet.
    pub syn_len: u16,
    pub synack_len: u16,
    pub ack_len: u16,
    /// Non-zero once a frame of the connection was steered: from then on
    /// every frame of it is, and the record no longer changes.
    pub steered: u8,
    /// The interface slot the SYN came in on: the client's side. Frames
    /// of the connection from the wrong side are steered.
    pub client_slot: u8,
    pub syn: [u8; HANDSHAKE_FRAME_MAX],
    pub synack: [u8; HANDSHAKE_FRAME_MAX],
    pub ack: [u8; HANDSHAKE_FRAME_MAX],
}

/// Indices in the `SETTINGS` array.
pub mod setting {
    /// Non-zero: SYN, SYN-ACK and the client's pure ACKs of steered
    /// connections before their first data take the fast path and are
    /// recorded in `HANDSHAKES`;
    /// zero: they are steered like every other frame.
    pub const HANDSHAKE_FAST_PATH: u32 = 0;
    pub const COUNT: u32 = 1;
}

/// A packets/bytes pair; one per [`Counter`] per CPU in `COUNTERS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterValue {
    pub packets: u64,
    pub bytes: u64,
}

macro_rules! counters {
    ($( $(#[$doc:meta])* $name:ident = $idx:expr, $label:expr; )*) => {
        /// Index of a per-CPU counter in the `COUNTERS` array.
        ///
        /// Every frame the program sees is counted once in `Rx` and once in
        /// exactly one *outcome* counter (`Counter::is_outcome`); the tag
        /// counters (`Vlan`, `Ipv6Ext`) are extra information.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Counter {
            $( $(#[$doc])* $name = $idx, )*
        }

        impl Counter {
            pub const ALL: &'static [Counter] = &[$(Counter::$name,)*];

            /// Stable name used in stats output.
            pub const fn label(self) -> &'static str {
                match self { $(Counter::$name => $label,)* }
            }
        }
    };
}

counters! {
    /// Every frame the program ran on.
    Rx = 0, "rx";
    /// Not IPv4/IPv6 (ARP, LLDP, ...): DEVMAP to the peer.
    PassNonIp = 1, "pass_non_ip";
    /// IP but not TCP (ICMP, UDP other than blocked QUIC, ...): DEVMAP.
    PassNonTcp = 2, "pass_non_tcp";
    /// TCP not matching the steering maps: DEVMAP.
    PassTcp = 3, "pass_tcp";
    /// TCP to a steered port but from or to an exempt prefix: DEVMAP.
    PassExempt = 4, "pass_exempt";
    /// Steered by port/prefix to the AF_XDP socket of the receiving queue.
    Steer = 5, "steer";
    /// Would be steered, but no AF_XDP socket is bound on that queue: DEVMAP.
    SteerNoSocket = 6, "steer_no_socket";
    /// Flow map hit, verdict bypass: DEVMAP.
    FlowBypass = 7, "flow_bypass";
    /// Flow map hit, verdict drop: XDP_DROP.
    FlowDrop = 8, "flow_drop";
    /// Flow map hit, verdict steer: AF_XDP socket.
    FlowSteer = 9, "flow_steer";
    /// Truncated or inconsistent headers: DEVMAP, never userspace.
    Malformed = 10, "malformed";
    /// IPv4/IPv6 fragments (no complete L4 header to classify): later
    /// fragments, and first ones not of a steered TCP connection: DEVMAP.
    Fragment = 11, "fragment";
    /// The DEVMAP had no entry for the peer: XDP_DROP.
    NoPeer = 12, "no_peer";
    /// Ingress interface not configured in IFACES: XDP_PASS to the stack.
    UnknownIface = 13, "unknown_iface";
    /// Tag: frame carried one or two VLAN tags.
    Vlan = 14, "tag_vlan";
    /// Tag: IPv6 frame with extension headers before the transport header.
    Ipv6Ext = 15, "tag_ipv6_ext";
    /// QUIC (UDP/443) to a destination whose decryption profile blocks
    /// it: XDP_DROP (browsers fall back to TLS over TCP).
    QuicDrop = 16, "quic_drop";
    /// A steered connection's SYN, SYN-ACK or handshake ACK before its
    /// first data: recorded in `HANDSHAKES`, DEVMAP to the peer.
    Handshake = 17, "handshake";
    /// What the receiver might take as part of a steered connection
    /// without the engine seeing it: the first fragment of a TCP segment
    /// on steered ports (the receiver would reassemble bytes the engine
    /// never held; without its first fragment the datagram never
    /// completes), one too short to show its ports, and IPv6 extension
    /// chains or VLAN tags beyond what the program walks: XDP_DROP.
    Unclassifiable = 18, "drop_unclassifiable";
}

pub const COUNTER_COUNT: u32 = 19;

impl Counter {
    /// Outcome counters partition `Rx`: their sum equals `Rx`.
    pub const fn is_outcome(self) -> bool {
        !matches!(self, Counter::Rx | Counter::Vlan | Counter::Ipv6Ext)
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] data without padding (FlowKey pads explicitly),
    // valid for every bit pattern.
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::IfaceInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::CounterValue {}
    // SAFETY: as above (Handshake's fields fill it to a multiple of 8).
    unsafe impl aya::Pod for super::Handshake {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_indices_are_dense_and_unique() {
        assert_eq!(Counter::ALL.len() as u32, COUNTER_COUNT);
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as u32, i as u32, "{c:?}");
        }
    }

    #[test]
    fn flow_key_has_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<FlowKey>(), 16 + 16 + 2 + 2 + 1 + 3);
    }

    #[test]
    fn handshake_has_no_implicit_padding() {
        assert_eq!(
            core::mem::size_of::<Handshake>(),
            8 + 4 + 4 + 2 + 2 + 2 + 1 + 1 + 3 * HANDSHAKE_FRAME_MAX
        );
    }

    #[test]
    fn reversed_twice_is_identity() {
        let k = FlowKey::new(
            v4_mapped([198, 18, 0, 1]),
            v4_mapped([198, 18, 0, 2]),
            1,
            443,
            6,
        );
        assert_eq!(k.reversed().reversed(), k);
        assert_eq!(k.reversed().dst_port, 1);
    }
}
