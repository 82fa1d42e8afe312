//! Frame classification for the userspace path: the TCP 5-tuple of a frame
//! (behind up to two VLAN tags and any IPv6 extension headers), or why there
//! is none. Parsing never panics: every input yields a value.
//!
//! The common frame (Ethernet, then IPv4 or IPv6 carrying TCP directly) is
//! sliced by a few bounds checks here; everything else (VLAN tags,
//! extension headers, anything a check here does not accept) goes to
//! etherparse, which is the reference: a property test holds the two to
//! the same answer on every frame.

use std::net::Ipv6Addr;

use etherparse::{NetSlice, SlicedPacket, TcpSlice, TransportSlice};
use loupe_common::{v4_mapped, FlowKey};
use thiserror::Error;

const IPPROTO_TCP: u8 = 6;
const ETH_LEN: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;

/// A frame sliced down to its TCP segment: sliced once per frame, then
/// keyed on by the worker and read by the segment parser.
#[derive(Clone, Debug)]
pub struct SlicedTcp<'a> {
    /// The IP header the segment came in.
    pub net: NetHeader<'a>,
    pub tcp: TcpSlice<'a>,
    /// Direction-specific key, as the frame travels.
    pub key: FlowKey,
}

/// A frame's IP header, as it lies in the frame: IPv4 with any options,
/// IPv6 the fixed 40 bytes (extension headers are not part of it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetHeader<'a> {
    V4(&'a [u8]),
    V6(&'a [u8]),
}

impl NetHeader<'_> {
    /// The header's bytes.
    pub fn raw(&self) -> &[u8] {
        match self {
            NetHeader::V4(h) | NetHeader::V6(h) => h,
        }
    }
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
    match slice_common(frame) {
        Some(sliced) => sliced,
        None => slice_general(frame),
    }
}

/// The common frame, or `None` for etherparse to decide. Accepts only what
/// etherparse would slice alike: untagged Ethernet; IPv4 (version 4, a
/// header length of at least 20 within the frame, a total length covering
/// the header and within the frame, trailing padding cut off, not a
/// fragment) or IPv6 (version 6, a non-zero payload length within the
/// frame, TCP as the next header); a TCP header etherparse accepts.
fn slice_common(frame: &[u8]) -> Option<Result<SlicedTcp<'_>, FrameError>> {
    let ether_type = u16::from_be_bytes(frame.get(12..ETH_LEN)?.try_into().ok()?);
    let ip = &frame[ETH_LEN..];
    let (net, payload, src, dst) = match ether_type {
        ETHERTYPE_IPV4 => {
            let first = *ip.first()?;
            let ihl = usize::from(first & 0x0f) * 4;
            if first >> 4 != 4 || ihl < 20 || ip.len() < ihl {
                return None;
            }
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            let more_fragments = ip[6] & 0x20 != 0;
            let offset = u16::from_be_bytes([ip[6] & 0x1f, ip[7]]);
            if total < ihl || total > ip.len() || ip[9] != IPPROTO_TCP {
                return None;
            }
            if more_fragments || offset != 0 {
                return Some(Err(FrameError::Fragment));
            }
            let src: [u8; 4] = ip[12..16].try_into().ok()?;
            let dst: [u8; 4] = ip[16..20].try_into().ok()?;
            (
                NetHeader::V4(&ip[..ihl]),
                &ip[ihl..total],
                v4_mapped(src),
                v4_mapped(dst),
            )
        }
        ETHERTYPE_IPV6 => {
            if ip.len() < 40 || ip[0] >> 4 != 6 || ip[6] != IPPROTO_TCP {
                return None;
            }
            let len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            if len == 0 || 40 + len > ip.len() {
                return None;
            }
            let src: [u8; 16] = ip[8..24].try_into().ok()?;
            let dst: [u8; 16] = ip[24..40].try_into().ok()?;
            (NetHeader::V6(&ip[..40]), &ip[40..40 + len], src, dst)
        }
        _ => return None,
    };
    if let NetHeader::V6(_) = net {
        let mapped = |a: [u8; 16]| Ipv6Addr::from(a).to_ipv4_mapped().is_some();
        if mapped(src) || mapped(dst) {
            return Some(Err(FrameError::Malformed));
        }
    }
    let tcp = TcpSlice::from_slice(payload).ok()?;
    Some(Ok(sliced(net, tcp, src, dst)))
}

fn sliced<'a>(
    net: NetHeader<'a>,
    tcp: TcpSlice<'a>,
    src: [u8; 16],
    dst: [u8; 16],
) -> SlicedTcp<'a> {
    let key = FlowKey::new(
        src,
        dst,
        tcp.source_port(),
        tcp.destination_port(),
        IPPROTO_TCP,
    );
    SlicedTcp { net, tcp, key }
}

/// Any frame, through etherparse.
fn slice_general(frame: &[u8]) -> Result<SlicedTcp<'_>, FrameError> {
    let SlicedPacket { net, transport, .. } =
        SlicedPacket::from_ethernet(frame).map_err(|_| FrameError::Malformed)?;
    // The header's bytes, borrowed from the frame rather than the slicing.
    let in_frame = |h: &[u8]| {
        let at = h.as_ptr() as usize - frame.as_ptr() as usize;
        &frame[at..at + h.len()]
    };
    let (net, src, dst) = match net {
        Some(NetSlice::Ipv4(ip)) => {
            if ip.is_payload_fragmented() {
                return Err(FrameError::Fragment);
            }
            let h = ip.header();
            (
                NetHeader::V4(in_frame(h.slice())),
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
            (
                NetHeader::V6(in_frame(h.slice())),
                src.octets(),
                dst.octets(),
            )
        }
        _ => return Err(FrameError::NotTcp),
    };
    let Some(TransportSlice::Tcp(tcp)) = transport else {
        return Err(FrameError::NotTcp);
    };
    Ok(sliced(net, tcp, src, dst))
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

    /// Where a slicing's parts lie in the frame, to compare two slicings.
    type Places = (FlowKey, [(usize, usize); 3], bool);

    fn places(frame: &[u8], r: Result<SlicedTcp<'_>, FrameError>) -> Result<Places, FrameError> {
        let at = |s: &[u8]| (s.as_ptr() as usize - frame.as_ptr() as usize, s.len());
        r.map(|s| {
            (
                s.key,
                [
                    at(s.net.raw()),
                    at(s.tcp.header_slice()),
                    at(s.tcp.payload()),
                ],
                matches!(s.net, NetHeader::V4(_)),
            )
        })
    }

    fn ipv6(payload: &[u8], ext: bool) -> Vec<u8> {
        let src = [0x20, 0x01, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let dst = [0x20, 0x01, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        let mut f = Vec::new();
        let b = PacketBuilder::ethernet2(MAC_A, MAC_B).ipv6(src, dst, 64);
        if ext {
            // A hop-by-hop options header (8 bytes of padding) before TCP.
            let mut ip = etherparse::Ipv6Header {
                source: src,
                destination: dst,
                hop_limit: 64,
                next_header: etherparse::IpNumber::IPV6_HEADER_HOP_BY_HOP,
                ..Default::default()
            };
            let tcp = etherparse::TcpHeader::new(1234, 443, 9, 1000);
            let hop = [6u8, 0, 1, 4, 0, 0, 0, 0];
            ip.payload_length = (hop.len() + tcp.header_len() + payload.len()) as u16;
            f.extend_from_slice(&MAC_B);
            f.extend_from_slice(&MAC_A);
            f.extend_from_slice(&[0x86, 0xdd]);
            ip.write(&mut f).unwrap();
            f.extend_from_slice(&hop);
            let mut tcp = tcp;
            tcp.checksum = 0;
            tcp.write(&mut f).unwrap();
            f.extend_from_slice(payload);
            return f;
        }
        b.tcp(1234, 443, 9, 1000).write(&mut f, payload).unwrap();
        f
    }

    /// The frames the mutations start from: each kind the fast path takes
    /// and the ones it leaves to etherparse.
    fn base_frames() -> Vec<Vec<u8>> {
        let mut padded = tcp_v4(1, 443, b"");
        padded.extend_from_slice(&[0; 6]);
        let mut v4_options = Vec::new();
        let mut ip = etherparse::Ipv4Header::new(
            24,
            64,
            etherparse::IpNumber::TCP,
            [198, 18, 0, 1],
            [198, 18, 0, 2],
        )
        .unwrap();
        ip.options = [1, 1, 1, 0][..].try_into().unwrap();
        ip.header_checksum = ip.calc_header_checksum();
        v4_options.extend_from_slice(&MAC_B);
        v4_options.extend_from_slice(&MAC_A);
        v4_options.extend_from_slice(&[8, 0]);
        ip.write(&mut v4_options).unwrap();
        etherparse::TcpHeader::new(5, 443, 1, 100)
            .write(&mut v4_options)
            .unwrap();
        v4_options.extend_from_slice(b"data");
        let mut vlan = Vec::new();
        PacketBuilder::ethernet2(MAC_A, MAC_B)
            .single_vlan(etherparse::VlanId::try_new(7).unwrap())
            .ipv4([198, 18, 0, 1], [198, 18, 0, 2], 64)
            .tcp(1, 443, 1, 100)
            .write(&mut vlan, b"x")
            .unwrap();
        let mut mapped = ipv6(b"m", false);
        mapped[14 + 8..14 + 24]
            .copy_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 18, 0, 1]);
        let mut fragment = tcp_v4(1, 443, b"f");
        fragment[14 + 6] |= 0x20;
        vec![
            tcp_v4(40000, 443, b"hello, world"),
            mapped,
            fragment,
            padded,
            v4_options,
            vlan,
            ipv6(b"hello", false),
            ipv6(b"", false),
            ipv6(b"hi", true),
        ]
    }

    #[test]
    fn the_common_frames_take_the_fast_path() {
        for f in [tcp_v4(1, 443, b"x"), ipv6(b"x", false)] {
            let fast = slice_common(&f).expect("taken").unwrap();
            assert_eq!(fast.tcp.payload(), b"x");
        }
        // Tagged, or with an extension header: left to etherparse.
        let frames = base_frames();
        assert!(slice_common(&frames[5]).is_none(), "VLAN");
        assert!(slice_common(&frames[8]).is_none(), "hop-by-hop");
        assert!(slice_general(&frames[8]).is_ok());
        // Errors it answers itself.
        assert_eq!(
            slice_common(&frames[1]).unwrap().err(),
            Some(FrameError::Malformed)
        );
        assert_eq!(
            slice_common(&frames[2]).unwrap().err(),
            Some(FrameError::Fragment)
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4096))]

        /// Whatever the fast path takes, it slices as etherparse does:
        /// same key, same IP header, TCP header and payload, or the same
        /// error. The mutations land mostly in the headers.
        #[test]
        fn the_fast_path_agrees_with_etherparse(
            base in 0usize..9,
            edits in proptest::collection::vec((0usize..96, proptest::prelude::any::<u8>()), 0..4),
            length in proptest::option::of(-24i32..24),
            cut in proptest::option::of(0usize..120),
        ) {
            let mut f = base_frames().swap_remove(base);
            // A length field near its true value (or 0): the IPv4 total
            // length or the IPv6 payload length, where the edges are.
            if let Some(delta) = length {
                // Behind one VLAN tag at most, as the base frames are.
                let l3 = if f[12..14] == [0x81, 0x00] { 18 } else { 14 };
                let at = l3 + if f[l3 - 2..l3] == [0x86, 0xdd] { 4 } else { 2 };
                if f.len() >= at + 2 {
                    let old = i32::from(u16::from_be_bytes([f[at], f[at + 1]]));
                    let new = if delta == -24 { 0 } else { (old + delta).clamp(0, 0xffff) };
                    f[at..at + 2].copy_from_slice(&(new as u16).to_be_bytes());
                }
            }
            for (at, v) in edits {
                if at < f.len() {
                    f[at] = v;
                }
            }
            if let Some(cut) = cut {
                f.truncate(cut);
            }
            if let Some(fast) = slice_common(&f) {
                proptest::prop_assert_eq!(places(&f, fast), places(&f, slice_general(&f)));
            }
            // And the entry point is one of the two.
            proptest::prop_assert_eq!(places(&f, slice_tcp(&f)), places(&f, slice_general(&f)));
        }
    }
}
