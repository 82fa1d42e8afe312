//! Frame classification for the userspace path: the TCP 5-tuple of a frame
//! (behind up to two VLAN tags and any IPv6 extension headers), or why there
//! is none. Parsing never panics: every input yields a value.

use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use loupe_common::{v4_mapped, FlowKey};
use thiserror::Error;

const IPPROTO_TCP: u8 = 6;

/// The facts of one TCP frame the engine keys on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpFrame {
    /// Direction-specific key, as the frame travels.
    pub key: FlowKey,
    /// Raw TCP flag bits (FIN 0x01 ... CWR 0x80).
    pub flags: u8,
    pub payload_len: usize,
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
pub(crate) fn slice_tcp(frame: &[u8]) -> Result<(SlicedPacket<'_>, FlowKey), FrameError> {
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
    let key = match &packet.transport {
        Some(TransportSlice::Tcp(tcp)) => FlowKey::new(
            src,
            dst,
            tcp.source_port(),
            tcp.destination_port(),
            IPPROTO_TCP,
        ),
        _ => return Err(FrameError::NotTcp),
    };
    Ok((packet, key))
}

/// Parse an Ethernet frame and return its TCP facts.
pub fn parse_tcp(frame: &[u8]) -> Result<TcpFrame, FrameError> {
    let (packet, key) = slice_tcp(frame)?;
    let Some(TransportSlice::Tcp(tcp)) = &packet.transport else {
        return Err(FrameError::NotTcp);
    };
    Ok(TcpFrame {
        key,
        flags: tcp.header_slice().get(13).copied().unwrap_or(0),
        payload_len: tcp.payload().len(),
    })
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

    #[test]
    fn ipv4_tcp_key_and_flags() {
        let f = parse_tcp(&tcp_v4(40000, 443, b"hello")).unwrap();
        assert_eq!(f.key.src, v4_mapped([198, 18, 0, 1]));
        assert_eq!(f.key.dst, v4_mapped([198, 18, 0, 2]));
        assert_eq!((f.key.src_port, f.key.dst_port), (40000, 443));
        assert_eq!(f.flags & 0x02, 0x02, "SYN");
        assert_eq!(f.payload_len, 5);
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
        let f = parse_tcp(&frame).unwrap();
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
            assert_eq!(parse_tcp(&frame), Err(FrameError::Malformed));
        }
    }

    #[test]
    fn truncations_never_panic_and_are_errors() {
        let frame = tcp_v4(1, 443, b"payload");
        for cut in 0..54 {
            assert!(parse_tcp(&frame[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn udp_and_arp_are_not_tcp() {
        let b = PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv4([198, 18, 0, 1], [198, 18, 0, 2], 64)
            .udp(53, 53);
        let mut f = Vec::new();
        b.write(&mut f, b"q").unwrap();
        assert_eq!(parse_tcp(&f), Err(FrameError::NotTcp));
        let mut arp = vec![0xffu8; 12];
        arp.extend_from_slice(&[0x08, 0x06]);
        arp.extend_from_slice(&[0u8; 28]);
        assert_eq!(parse_tcp(&arp), Err(FrameError::NotTcp));
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
        assert_eq!(parse_tcp(&f), Err(FrameError::Fragment));
    }
}
