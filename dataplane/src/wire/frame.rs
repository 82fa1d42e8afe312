//! Frame classification for the userspace path: the TCP 5-tuple of a frame
//! (behind up to two VLAN tags and any IPv6 extension headers), or why there
//! is none. Parsing never panics: every input yields a value.

use etherparse::{NetSlice, SlicedPacket, TcpSlice, TransportSlice};
use loupe_common::{v4_mapped, FlowKey};
use thiserror::Error;

const IPPROTO_TCP: u8 = 6;

/// A frame sliced down to its TCP segment: sliced once per frame, then
/// keyed on by the worker and read by the segment parser.
#[derive(Clone, Debug)]
pub struct SlicedTcp<'a> {
    pub packet: SlicedPacket<'a>,
    pub tcp: TcpSlice<'a>,
    /// Direction-specific key, as the frame travels.
    pub key: FlowKey,
}

#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame headers are truncated or inconsistent")]
    Malformed,
    #[error("IP fragment: no complete transport header")]
    Fragment,
    #[error("not a TCP frame")]
    NotTcp,
}

/// Slices an Ethernet frame down to its TCP header and the flow key, with
/// the checks every TCP parser here shares (fragments, IPv4-mapped IPv6).
pub fn slice_tcp(frame: &[u8]) -> Result<SlicedTcp<'_>, FrameError> {
    let packet = SlicedPacket::from_ethernet(frame).map_err(|_| FrameError::Malformed)?;
    let (src, dst) = match &packet.net {
        Some(NetSlice::Ipv4(ip)) => {
            if ip.is_payload_fragmented() {
                return Err(FrameError::Fragment);
            }
            let h = ip.header();
            (
                v4_mapped(h.source_addr().octets()),
                v4_mapped(h.destination_addr().octets()),
            )
        }
        Some(NetSlice::Ipv6(ip)) => {
            if ip.is_payload_fragmented() {
                return Err(FrameError::Fragment);
            }
            let h = ip.header();
            let (src, dst) = (h.source_addr(), h.destination_addr());
            // IPv4-mapped addresses are not used on the wire (RFC 4291
            // section 2.5.5.2) and would alias IPv4 flows.
            if src.to_ipv4_mapped().is_some() || dst.to_ipv4_mapped().is_some() {
                return Err(FrameError::Malformed);
            }
            (src.octets(), dst.octets())
        }
        _ => return Err(FrameError::NotTcp),
    };
    let Some(TransportSlice::Tcp(tcp)) = &packet.transport else {
        return Err(FrameError::NotTcp);
    };
    let tcp = tcp.clone();
    let key = FlowKey::new(
        src,
        dst,
        tcp.source_port(),
        tcp.destination_port(),
        IPPROTO_TCP,
    );
    Ok(SlicedTcp { packet, tcp, key })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use etherparse::PacketBuilder;

    const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 2];

    pub(crate) fn tcp_v4(src_port: u16, dst_port: u16, payload: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv4([198, 18, 0, 1], [198, 18, 0, 2], 64)
            .tcp(src_port, dst_port, 1000, 65535)
            .syn();
        let mut out = Vec::new();
        b.write(&mut out, payload).unwrap();
        out
    }

    fn key_of(frame: &[u8]) -> Result<FlowKey, FrameError> {
        slice_tcp(frame).map(|s| s.key)
    }

    #[test]
    fn ipv4_tcp_key_and_flags() {
        let frame = tcp_v4(40000, 443, b"hello");
        let f = slice_tcp(&frame).unwrap();
        assert_eq!(f.key.src, v4_mapped([198, 18, 0, 1]));
        assert_eq!(f.key.dst, v4_mapped([198, 18, 0, 2]));
        assert_eq!((f.key.src_port, f.key.dst_port), (40000, 443));
        assert!(f.tcp.syn(), "SYN");
        assert_eq!(f.tcp.payload(), b"hello");
    }

    #[test]
    fn ipv6_behind_two_vlan_tags() {
        let b = PacketBuilder::ethernet2(MAC_A, MAC_B)
            .double_vlan(
                etherparse::VlanId::try_new(10).unwrap(),
                etherparse::VlanId::try_new(20).unwrap(),
            )
            .ipv6(
                [0x20, 0x01, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                [0x20, 0x01, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
                64,
            )
            .tcp(1234, 443, 1, 1000);
        let mut frame = Vec::new();
        b.write(&mut frame, b"x").unwrap();
        let f = slice_tcp(&frame).unwrap();
        assert_eq!(f.key.dst_port, 443);
        assert_eq!(f.key.dst[15], 2);
    }

    #[test]
    fn ipv4_mapped_addresses_in_ipv6_are_malformed() {
        let mapped = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 18, 0, 1];
        let other = [0x20, 0x01, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        for (src, dst) in [(mapped, other), (other, mapped)] {
            let mut frame = Vec::new();
            PacketBuilder::ethernet2(MAC_A, MAC_B)
                .ipv6(src, dst, 64)
                .tcp(1, 443, 1, 1000)
                .write(&mut frame, b"")
                .unwrap();
            assert_eq!(key_of(&frame), Err(FrameError::Malformed));
        }
    }

    #[test]
    fn truncations_never_panic_and_are_errors() {
        let frame = tcp_v4(1, 443, b"payload");
        for cut in 0..54 {
            assert!(key_of(&frame[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn udp_and_arp_are_not_tcp() {
        let b = PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv4([198, 18, 0, 1], [198, 18, 0, 2], 64)
            .udp(53, 53);
        let mut f = Vec::new();
        b.write(&mut f, b"q").unwrap();
        assert_eq!(key_of(&f), Err(FrameError::NotTcp));
        let mut arp = vec![0xffu8; 12];
        arp.extend_from_slice(&[0x08, 0x06]);
        arp.extend_from_slice(&[0u8; 28]);
        assert_eq!(key_of(&arp), Err(FrameError::NotTcp));
    }

    #[test]
    fn ipv4_fragment_is_reported() {
        let mut f = tcp_v4(1, 443, b"payload");
        // Set More-Fragments and recompute the IPv4 header checksum.
        f[14 + 6] |= 0x20;
        f[14 + 10] = 0;
        f[14 + 11] = 0;
        let sum = etherparse::Ipv4HeaderSlice::from_slice(&f[14..34])
            .unwrap()
            .to_header()
            .calc_header_checksum();
        f[14 + 10..14 + 12].copy_from_slice(&sum.to_be_bytes());
        assert_eq!(key_of(&f), Err(FrameError::Fragment));
    }
}
