//! TCP segments on the wire: a frame parsed into the [`Segment`] the TCP
//! layer works on (checksum verified, options parsed strictly), and frames
//! built from segments after the headers of the endpoint being
//! impersonated (its MACs, VLAN tags, addresses and ports); and a
//! client's frames with what would let a server read other bytes than the
//! engine decided on taken out ([`normalised`]).

use loupe_common::FlowKey;
use thiserror::Error;

use super::{
    frame::{slice_tcp, FrameError, NetHeader, SlicedTcp},
    options::{OptionError, TcpOptions},
    seq::SeqNum,
};

/// TCP header flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flags {
    pub fin: bool,
    pub syn: bool,
    pub rst: bool,
    pub psh: bool,
    pub ack: bool,
    pub urg: bool,
}

/// A segment as this layer sees it (the wire layer adds addresses, ports
/// and the checksum).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub seq: SeqNum,
    pub ack: SeqNum,
    pub flags: Flags,
    /// The window field as on the wire (not yet scaled).
    pub window: u16,
    pub options: TcpOptions,
    pub payload: Vec<u8>,
}

impl Segment {
    /// SEG.LEN: payload plus one for each of SYN and FIN. The payload is
    /// given apart: the segment's own, or the frame's where it was left
    /// ([`headers_of`]).
    pub fn seg_len(&self, payload: &[u8]) -> u32 {
        payload.len() as u32 + u32::from(self.flags.syn) + u32::from(self.flags.fin)
    }
}

/// Why a frame is not a usable segment.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum SegmentError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("TCP checksum mismatch")]
    Checksum,
    #[error("TCP options: {0}")]
    Options(#[from] OptionError),
}

/// The addressing of one direction of a flow, taken from a frame the
/// endpoint sent: everything needed to send frames as that endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    /// Ethernet header with any VLAN tags, up to the IP header.
    l2: Vec<u8>,
    ip: IpPair,
    src_port: u16,
    dst_port: u16,
    marks: IpMarks,
}

/// What the endpoint put in its IP header besides addresses, copied onto
/// the frames sent as it: TTL or hop limit, DSCP, and the IPv6 flow label
/// (RFC 6437: one label per flow). ECN bits are never copied: a generated
/// segment must not claim ECN-capable transport (ECT) on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct IpMarks {
    hops: u8,
    /// DSCP in the upper six bits, ECN bits zero.
    dscp: u8,
    flow_label: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum IpPair {
    V4([u8; 4], [u8; 4]),
    V6([u8; 16], [u8; 16]),
}

impl IpPair {
    /// The fixed IP header's length.
    fn header_len(&self) -> usize {
        match self {
            IpPair::V4(..) => 20,
            IpPair::V6(..) => 40,
        }
    }

    /// Source and destination address bytes.
    fn addrs(&self) -> (&[u8], &[u8]) {
        match self {
            IpPair::V4(s, d) => (s, d),
            IpPair::V6(s, d) => (s, d),
        }
    }
}

/// A parsed segment and where it came from.
#[derive(Clone, Debug)]
pub struct Parsed {
    pub key: FlowKey,
    pub segment: Segment,
    /// Length of the L2 header (with VLAN tags) and the addressing, for
    /// [`Parsed::template`]; kept as facts so that parsing allocates no
    /// template for the segments that never need one.
    l2_len: usize,
    ip: IpPair,
    src_port: u16,
    dst_port: u16,
    marks: IpMarks,
    /// IPv4 options or IPv6 extension headers came before the segment.
    ip_extras: bool,
}

impl Parsed {
    /// Whether this frame came the way `tpl`'s did (`frame` is the one it
    /// was parsed from): the same link header (addresses, VLAN tags) and
    /// TTL or hop limit, and no IPv4 options or IPv6 extension headers.
    /// A frame that differs may take another path to the receiver, expire
    /// on the way (a TTL set to), or be read otherwise there (a source
    /// route, a destination option it does not know).
    pub fn came_like(&self, tpl: &Template, frame: &[u8]) -> bool {
        !self.ip_extras
            && self.marks.hops == tpl.marks.hops
            && frame.get(..self.l2_len) == Some(&tpl.l2[..])
    }

    /// The template for sending as this segment's sender; `frame` is the
    /// frame it was parsed from.
    pub fn template(&self, frame: &[u8]) -> Template {
        Template {
            l2: frame[..self.l2_len].to_vec(),
            ip: self.ip,
            src_port: self.src_port,
            dst_port: self.dst_port,
            marks: self.marks,
        }
    }

    /// The RST a closed port answers this segment with (RFC 9293
    /// §3.10.7.1), for a connection nobody holds state for: back to its
    /// sender, at what the segment's ACK says the sender expects next (or,
    /// with no ACK, a RST|ACK of the segment), which the sender takes
    /// (RFC 5961 §3.2 wants exactly that number). `None` for a RST, which
    /// is never answered. `payload_len`: the segment's payload, which
    /// [`headers_of`] leaves in the frame.
    pub fn reset_back(&self, frame: &[u8], payload_len: usize) -> Option<Vec<u8>> {
        let seg = &self.segment;
        if seg.flags.rst {
            return None;
        }
        let rst = Flags {
            rst: true,
            ..Flags::default()
        };
        let back = if seg.flags.ack {
            Segment {
                seq: seg.ack,
                flags: rst,
                ..Segment::default()
            }
        } else {
            let len = payload_len as u32 + u32::from(seg.flags.syn) + u32::from(seg.flags.fin);
            Segment {
                ack: seg.seq + len,
                flags: Flags { ack: true, ..rst },
                ..Segment::default()
            }
        };
        let sender = self.template(frame);
        let mut l2 = sender.l2;
        // Back the way it came: the link addresses swapped (any VLAN tags
        // stay), a TTL of the usual 64.
        let (dst, src) = l2.split_at_mut(6);
        dst.swap_with_slice(&mut src[..6]);
        let receiver = Template {
            l2,
            ip: match self.ip {
                IpPair::V4(s, d) => IpPair::V4(d, s),
                IpPair::V6(s, d) => IpPair::V6(d, s),
            },
            src_port: self.dst_port,
            dst_port: self.src_port,
            marks: IpMarks {
                hops: 64,
                dscp: 0,
                flow_label: 0,
            },
        };
        let mut out = Vec::new();
        receiver.build(&back, &mut out);
        Some(out)
    }

    /// What resets this segment's receiver, sent as its sender, in place
    /// of the segment: a RST at the segment's sequence number, which the
    /// receiver takes when it is the next it expects; then an ACK one
    /// below, outside the receiver's window wherever the RST could miss
    /// (a keepalive probe sits one below the next byte, a retransmission
    /// further), which the receiver answers with an ACK of its own exact
    /// numbers (RFC 9293 §3.10.7.4) for [`Parsed::reset_back`] to answer.
    /// Where the RST was taken, the receiver answers the ACK with a RST,
    /// which is not answered. `None` for a RST.
    pub fn reset_on(&self, frame: &[u8]) -> Option<[Vec<u8>; 2]> {
        let seg = &self.segment;
        if seg.flags.rst {
            return None;
        }
        let sender = self.template(frame);
        let [mut rst, mut probe] = [Vec::new(), Vec::new()];
        let flags = Flags {
            ack: seg.flags.ack,
            rst: true,
            ..Flags::default()
        };
        let at = |seq, flags| Segment {
            seq,
            ack: seg.ack,
            flags,
            ..Segment::default()
        };
        sender.build(&at(seg.seq, flags), &mut rst);
        let ack = Flags {
            ack: true,
            ..Flags::default()
        };
        sender.build(&at(SeqNum(seg.seq.0.wrapping_sub(1)), ack), &mut probe);
        Some([rst, probe])
    }
}

/// Parses a TCP frame, verifying its checksum.
pub fn parse_segment(frame: &[u8]) -> Result<Parsed, SegmentError> {
    segment_of(frame, &slice_tcp(frame)?)
}

/// The segment of a frame already sliced (`sliced` came from `frame`),
/// checksum verified and options parsed.
pub fn segment_of(frame: &[u8], sliced: &SlicedTcp) -> Result<Parsed, SegmentError> {
    let mut parsed = headers_of(frame, sliced)?;
    parsed.segment.payload = sliced.tcp.payload().to_vec();
    Ok(parsed)
}

/// As [`segment_of`], but the segment's payload is left empty: it is
/// `sliced.tcp.payload()`, read from the frame where it lies.
pub fn headers_of(frame: &[u8], sliced: &SlicedTcp) -> Result<Parsed, SegmentError> {
    let SlicedTcp { net, tcp, key } = sliced;
    let key = *key;
    let raw = net.raw();
    let (ip, marks) = match net {
        NetHeader::V4(h) => {
            // A receiver drops a header whose checksum fails (RFC 791,
            // RFC 1122 §3.2.1.2): taken here, it would be bytes the
            // server never sees.
            if ipv4_header_checksum(h) != 0 {
                return Err(SegmentError::Checksum);
            }
            let marks = IpMarks {
                hops: h[8],
                dscp: h[1] & 0xfc,
                flow_label: 0,
            };
            let addr = |at: usize| -> [u8; 4] { h[at..at + 4].try_into().expect("4 bytes") };
            (IpPair::V4(addr(12), addr(16)), marks)
        }
        NetHeader::V6(h) => {
            let word = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
            let marks = IpMarks {
                hops: h[7],
                dscp: ((word >> 20) & 0xfc) as u8,
                flow_label: word & 0x000f_ffff,
            };
            let addr = |at: usize| -> [u8; 16] { h[at..at + 16].try_into().expect("16 bytes") };
            (IpPair::V6(addr(8), addr(24)), marks)
        }
    };
    let ip_start = raw.as_ptr() as usize - frame.as_ptr() as usize;
    let tcp_start = tcp.slice().as_ptr() as usize - frame.as_ptr() as usize;
    let ip_extras = match net {
        NetHeader::V4(h) => h.len() > 20,
        // Extension headers lie between the fixed header and TCP.
        NetHeader::V6(h) => tcp_start != ip_start + h.len(),
    };
    //= https://www.rfc-editor.org/rfc/rfc1071#section-1
    //# To check a checksum, the 1's complement sum is computed over the
    //# same set of octets, including the checksum field.  If the result
    //# is all 1 bits (-0 in 1's complement arithmetic), the check
    //# succeeds.
    // Summing the field in, rather than comparing it with a computed one,
    // accepts both zeros of 1's complement: Linux sends 0xffff where the
    // checksum computes to 0 (skb_checksum_help's CSUM_MANGLED_0), about
    // one frame in 65536.
    let bytes = tcp.slice();
    let len = u32::try_from(bytes.len()).map_err(|_| FrameError::Malformed)?;
    let (src, dst) = ip.addrs();
    let pseudo = sum16(sum16(sum16(0, src), dst), &[0, 6]) + len;
    if fold(sum16(pseudo, bytes)) != 0 {
        return Err(SegmentError::Checksum);
    }
    let options = TcpOptions::parse(tcp.options())?;
    let segment = Segment {
        seq: SeqNum(tcp.sequence_number()),
        ack: SeqNum(tcp.acknowledgment_number()),
        flags: Flags {
            fin: tcp.fin(),
            syn: tcp.syn(),
            rst: tcp.rst(),
            psh: tcp.psh(),
            ack: tcp.ack(),
            urg: tcp.urg(),
        },
        window: tcp.window_size(),
        options,
        payload: Vec::new(),
    };
    Ok(Parsed {
        key,
        segment,
        l2_len: ip_start,
        ip,
        src_port: tcp.source_port(),
        dst_port: tcp.destination_port(),
        marks,
        ip_extras,
    })
}

/// What a normaliser takes out of a client's frame before it goes on,
/// so that the server reads the bytes the engine decided on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Normalise {
    /// The URG flag and its pointer. A receiver reading without
    /// SO_OOBINLINE (the default) takes the byte before the pointer out of
    /// the stream (RFC 6093 §3), which the engine's reading keeps; cleared,
    /// every byte is read in line, as the engine read them.
    Urgent,
    /// A SYN's data, FIN, URG and TCP Fast Open option (RFC 7413): the
    /// server then answers with a plain SYN-ACK, and the client sends its
    /// bytes again after the handshake, where they are held and decided
    /// on. Data on a SYN may otherwise be taken by the server (with a
    /// Fast Open cookie, or queued as RFC 9293 §3.10.7.2 allows) before
    /// any decision.
    Syn,
    /// A RST moved to this sequence number (and URG cleared): the one its
    /// receiver takes at once (RFC 5961 §3.2).
    ResetAt(SeqNum),
}

/// `frame` (a TCP frame whose checksum was verified) with what `how`
/// names taken out: the IP length and checksums fixed, the TCP checksum
/// updated from the frame's own (RFC 1624), so that neither the addresses
/// nor any IPv6 routing header need reading. `None` for a frame that is
/// not TCP.
pub fn normalised(frame: &[u8], how: Normalise) -> Option<Vec<u8>> {
    let sliced = slice_tcp(frame).ok()?;
    let at = |p: &[u8]| p.as_ptr() as usize - frame.as_ptr() as usize;
    let ip_start = at(sliced.net.raw());
    let tcp_start = at(sliced.tcp.slice());
    let old = sliced.tcp.slice();
    let hdr = sliced.tcp.header_len();
    let keep = match how {
        Normalise::Urgent | Normalise::ResetAt(_) => old.len(),
        Normalise::Syn => hdr,
    };
    let mut out = frame[..tcp_start + keep].to_vec();
    let tcp = &mut out[tcp_start..];
    const FIN: u8 = 0x01;
    const URG: u8 = 0x20;
    tcp[13] &= !URG;
    tcp[18..20].fill(0);
    match how {
        Normalise::Syn => {
            tcp[13] &= !FIN;
            TcpOptions::blank_fast_open(&mut tcp[20..hdr]);
        }
        Normalise::ResetAt(seq) => tcp[4..8].copy_from_slice(&seq.0.to_be_bytes()),
        Normalise::Urgent => {}
    }
    // The checksum: the pseudo-header's addresses and protocol are the
    // same, so with S the sum of the segment with its checksum field,
    // len + S is what the rest sums to less; the new field is that less
    // the new length and the new segment's sum (1's complement arithmetic,
    // modulo 0xffff).
    const M: u64 = 0xffff;
    let residue = |x: u32| u64::from(x) % M;
    let before = residue(old.len() as u32) + residue(sum16(0, old));
    tcp[16..18].fill(0);
    let after = residue(keep as u32) + residue(sum16(0, tcp));
    let field = ((before + 2 * M - after) % M) as u16;
    tcp[16..18].copy_from_slice(&field.to_be_bytes());
    let ip_len = out.len() - ip_start;
    match sliced.net {
        NetHeader::V4(h) => {
            let ip = &mut out[ip_start..ip_start + h.len()];
            ip[2..4].copy_from_slice(&u16::try_from(ip_len).ok()?.to_be_bytes());
            ip[10..12].fill(0);
            let c = ipv4_header_checksum(ip);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
        }
        NetHeader::V6(_) => {
            let payload = u16::try_from(ip_len - 40).ok()?;
            out[ip_start + 4..ip_start + 6].copy_from_slice(&payload.to_be_bytes());
        }
    }
    Some(out)
}

/// RFC 1071 ones'-complement sum of `bytes` (big-endian 16-bit words, an
/// odd last byte padded with zero) added to `acc`, for [`fold`].
///
/// Every frame's payload goes through here twice (checked on the way in,
/// summed on the way out), so it takes 32 bytes at a time: the sum is
/// independent of byte order up to one final swap (RFC 1071 §2(B)), so
/// the words are added as they lie in memory (little-endian here, no
/// per-word swap), 4-byte words into eight 64-bit lanes that no carry
/// links (the compiler adds them side by side in vector registers; one
/// 128-bit accumulator was a chain of dependent add-with-carry, about a
/// quarter slower over an MTU's payload). A lane takes 2^32 words before
/// it could overflow, 128 GiB of input. The lanes' carries are folded
/// back at the end; 2^16 ≡ 1 modulo 0xffff, so wider words add alike.
/// Folding by end-around carry keeps a non-zero sum non-zero, as the
/// two-byte loop did.
fn sum16(acc: u32, bytes: &[u8]) -> u32 {
    const LANES: usize = 8;
    let mut lanes = [0u64; LANES];
    let mut blocks = bytes.chunks_exact(LANES * 4);
    for block in &mut blocks {
        for (lane, word) in lanes.iter_mut().zip(block.chunks_exact(4)) {
            *lane += u64::from(u32::from_ne_bytes(word.try_into().expect("4 bytes")));
        }
    }
    // The last 0-31 bytes: words in memory order, an odd byte padded.
    // Spelt out rather than copied into a padded block: a copy of a
    // length known only at run time is a call to memcpy, which cost the
    // short sums (the addresses of the pseudo-header) more than the sum.
    let mut words = blocks.remainder().chunks_exact(4);
    let mut x = lanes.iter().map(|&l| u128::from(l)).sum::<u128>();
    for word in &mut words {
        x += u128::from(u32::from_ne_bytes(word.try_into().expect("4 bytes")));
    }
    let last = match *words.remainder() {
        [a] => [a, 0, 0, 0],
        [a, b] => [a, b, 0, 0],
        [a, b, c] => [a, b, c, 0],
        _ => [0; 4],
    };
    x += u128::from(u32::from_ne_bytes(last));
    while x >> 16 != 0 {
        x = (x & 0xffff) + (x >> 16);
    }
    let x = x as u16;
    // The sum in memory order is the big-endian sum with its bytes swapped
    // on a little-endian machine.
    acc + u32::from(if cfg!(target_endian = "little") {
        x.swap_bytes()
    } else {
        x
    })
}

/// The 1's complement checksum of an IPv4 header (RFC 791): with its
/// checksum field zeroed, the value to put there; with the field as sent,
/// 0 when it checks.
pub(crate) fn ipv4_header_checksum(header: &[u8]) -> u16 {
    fold(sum16(0, header))
}

fn fold(mut acc: u32) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

impl Template {
    /// A template for frames Loupe makes up rather than impersonates (the
    /// decrypted copies [`crate::export`] writes): untagged Ethernet from
    /// `src_mac` to `dst_mac`, `src` to `dst` (one address family; a mixed
    /// pair is written as IPv6 with the IPv4 address mapped), TTL 64.
    pub fn synthetic(
        src_mac: [u8; 6],
        dst_mac: [u8; 6],
        src: std::net::SocketAddr,
        dst: std::net::SocketAddr,
    ) -> Template {
        use std::net::IpAddr;
        let ip = match (src.ip(), dst.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => IpPair::V4(s.octets(), d.octets()),
            (s, d) => {
                let v6 = |a: IpAddr| match a {
                    IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
                    IpAddr::V6(a) => a.octets(),
                };
                IpPair::V6(v6(s), v6(d))
            }
        };
        let mut l2 = Vec::with_capacity(14);
        l2.extend_from_slice(&dst_mac);
        l2.extend_from_slice(&src_mac);
        l2.extend_from_slice(match ip {
            IpPair::V4(..) => &[0x08, 0x00],
            IpPair::V6(..) => &[0x86, 0xdd],
        });
        Template {
            l2,
            ip,
            src_port: src.port(),
            dst_port: dst.port(),
            marks: IpMarks {
                hops: 64,
                dscp: 0,
                flow_label: 0,
            },
        }
    }

    /// Bytes of Ethernet, IP and TCP header (without options) in front of
    /// a payload.
    pub fn header_len(&self) -> usize {
        self.l2.len() + self.ip.header_len() + 20
    }

    /// Builds the frame that carries `seg` from this template's endpoint;
    /// returns its length.
    pub fn build(&self, seg: &Segment, out: &mut Vec<u8>) -> usize {
        self.build_with(seg, (&seg.payload, &[]), out)
    }

    /// As [`Template::build`], with the payload given apart from the
    /// segment (in two pieces, as a ring buffer lends it): appended to
    /// `out`; returns the frame's length.
    pub fn build_with(&self, seg: &Segment, payload: (&[u8], &[u8]), out: &mut Vec<u8>) -> usize {
        let head = self.headers(seg, payload.0.len() + payload.1.len());
        let start = out.len();
        out.extend_from_slice(head.bytes());
        out.extend_from_slice(payload.0);
        out.extend_from_slice(payload.1);
        head.sum_into(&mut out[start..]);
        out.len() - start
    }

    /// Every header of the frame that carries `seg` and `payload` bytes
    /// from this template's endpoint, IPv4 checksum done, the TCP one
    /// left to [`Headers::write`] (it covers the payload).
    pub fn headers(&self, seg: &Segment, payload: usize) -> Headers {
        let mut opt_buf = [0; 40];
        let opt_len = seg.options.emit_into(&mut opt_buf);
        let opts = &opt_buf[..opt_len];
        let tcp_len = 20 + opts.len() + payload;
        let mut h = Headers {
            buf: [0; HEADERS_MAX],
            len: 0,
            tcp_start: 0,
            pseudo: 0,
        };
        let mut put = |bytes: &[u8]| {
            h.buf[h.len..h.len + bytes.len()].copy_from_slice(bytes);
            h.len += bytes.len();
        };
        put(&self.l2);
        let ip_start = self.l2.len();
        match self.ip {
            IpPair::V4(s, d) => {
                let total = (20 + tcp_len) as u16;
                put(&[0x45, self.marks.dscp]);
                put(&total.to_be_bytes());
                // ID 0 with DF set (RFC 6864 §4.1: atomic datagrams).
                put(&[0, 0, 0x40, 0, self.marks.hops, 6, 0, 0]);
                put(&s);
                put(&d);
            }
            IpPair::V6(s, d) => {
                let word = 6 << 28 | u32::from(self.marks.dscp) << 20 | self.marks.flow_label;
                put(&word.to_be_bytes());
                put(&(tcp_len as u16).to_be_bytes());
                put(&[6, self.marks.hops]);
                put(&s);
                put(&d);
            }
        }
        let tcp_start = ip_start + self.ip.header_len();
        put(&self.src_port.to_be_bytes());
        put(&self.dst_port.to_be_bytes());
        put(&seg.seq.0.to_be_bytes());
        put(&seg.ack.0.to_be_bytes());
        let f = seg.flags;
        let flags = u8::from(f.fin)
            | u8::from(f.syn) << 1
            | u8::from(f.rst) << 2
            | u8::from(f.psh) << 3
            | u8::from(f.ack) << 4
            | u8::from(f.urg) << 5;
        put(&[(((20 + opts.len()) / 4) as u8) << 4, flags]);
        put(&seg.window.to_be_bytes());
        put(&[0, 0, 0, 0]);
        put(opts);
        if let IpPair::V4(..) = self.ip {
            let c = ipv4_header_checksum(&h.buf[ip_start..ip_start + 20]);
            h.buf[ip_start + 10..ip_start + 12].copy_from_slice(&c.to_be_bytes());
        }
        // Pseudo-header (RFC 9293 §3.1; RFC 8200 §8.1 for IPv6).
        let (src, dst) = self.ip.addrs();
        h.pseudo = sum16(sum16(sum16(0, src), dst), &[0, 6]) + tcp_len as u32;
        h.tcp_start = tcp_start;
        h
    }
}

/// Room for a frame's headers: the link header a template was taken
/// from (Ethernet with two VLAN tags, 22 bytes, is the most the XDP
/// program steers to userspace; etherparse would slice up to three link
/// extensions, MACsec among them, 62), IPv6 (40), TCP with the most
/// options (60).
const HEADERS_MAX: usize = 256;

/// A frame's headers, built before its payload is placed (see
/// [`Template::headers`]): written into a buffer of the frame's length
/// wherever that lies (a UMEM frame, a `Vec`).
pub struct Headers {
    buf: [u8; HEADERS_MAX],
    len: usize,
    tcp_start: usize,
    /// The pseudo-header's sum, TCP length included.
    pseudo: u32,
}

impl Headers {
    pub fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// The frame's length with `payload` bytes.
    pub fn frame_len(&self, payload: usize) -> usize {
        self.len + payload
    }

    /// Writes the whole frame, these headers and `payload`, into `out`
    /// (exactly [`Headers::frame_len`] bytes) and sets its TCP checksum.
    pub fn write(&self, payload: (&[u8], &[u8]), out: &mut [u8]) {
        let (head, rest) = out.split_at_mut(self.len);
        head.copy_from_slice(self.bytes());
        let (first, second) = rest.split_at_mut(payload.0.len());
        first.copy_from_slice(payload.0);
        second.copy_from_slice(payload.1);
        self.sum_into(out);
    }

    /// Sets the TCP checksum of `frame`, these headers and their payload.
    fn sum_into(&self, frame: &mut [u8]) {
        let c = fold(sum16(self.pseudo, &frame[self.tcp_start..]));
        frame[self.tcp_start + 16..self.tcp_start + 18].copy_from_slice(&c.to_be_bytes());
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use etherparse::PacketBuilder;

    use super::*;
    use crate::wire::options::Timestamps;

    fn frame_v4(payload: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .single_vlan(etherparse::VlanId::try_new(7).unwrap())
            .ipv4([198, 18, 0, 1], [198, 18, 0, 2], 64)
            .tcp(40000, 443, 1000, 501)
            .ack(77)
            .psh()
            .options_raw(&[1, 1, 8, 10, 0, 0, 0, 5, 0, 0, 0, 6])
            .unwrap();
        let mut out = Vec::new();
        b.write(&mut out, payload).unwrap();
        out
    }

    /// `f` (untagged IPv4) with four bytes of IPv4 options (NOPs and an
    /// end of list), its header checksum fixed.
    pub(crate) fn with_ipv4_options(f: &[u8]) -> Vec<u8> {
        let mut out = f[..34].to_vec();
        out.extend_from_slice(&[1, 1, 1, 0]);
        out.extend_from_slice(&f[34..]);
        out[14] = 0x46;
        let total = u16::from_be_bytes([out[16], out[17]]) + 4;
        out[16..18].copy_from_slice(&total.to_be_bytes());
        fix_ipv4_checksum(&mut out);
        out
    }

    /// Sets the IPv4 header checksum of an untagged frame, whatever its
    /// header length.
    pub(crate) fn fix_ipv4_checksum(f: &mut [u8]) {
        let end = 14 + usize::from(f[14] & 0x0f) * 4;
        f[24..26].fill(0);
        let c = ipv4_header_checksum(&f[14..end]);
        f[24..26].copy_from_slice(&c.to_be_bytes());
    }

    /// `f` (untagged IPv4 without options) with `opt` added to its TCP
    /// options (padded with NOPs), lengths and checksums fixed: for
    /// options [`TcpOptions::emit`] does not write (Fast Open).
    pub(crate) fn with_tcp_option(f: &[u8], opt: &[u8]) -> Vec<u8> {
        let hdr = usize::from(f[46] >> 4) * 4;
        let mut opt = opt.to_vec();
        while !opt.len().is_multiple_of(4) {
            opt.push(1);
        }
        let mut out = f[..34 + hdr].to_vec();
        out.extend_from_slice(&opt);
        out.extend_from_slice(&f[34 + hdr..]);
        out[46] = (((hdr + opt.len()) / 4) as u8) << 4 | (out[46] & 0x0f);
        let total = (out.len() - 14) as u16;
        out[16..18].copy_from_slice(&total.to_be_bytes());
        fix_ipv4_checksum(&mut out);
        out[50..52].fill(0);
        let tcp_len = out.len() - 34;
        let pseudo = sum16(sum16(sum16(0, &out[26..30]), &out[30..34]), &[0, 6]) + tcp_len as u32;
        let c = fold(sum16(pseudo, &out[34..]));
        out[50..52].copy_from_slice(&c.to_be_bytes());
        out
    }

    /// `f` (untagged IPv6) with an empty Destination Options header.
    pub(crate) fn with_destination_options(f: &[u8]) -> Vec<u8> {
        let mut out = f[..54].to_vec();
        // Next header TCP, 8 bytes long, one PadN option of 4 bytes.
        out.extend_from_slice(&[6, 0, 1, 4, 0, 0, 0, 0]);
        out.extend_from_slice(&f[54..]);
        out[20] = 60;
        let len = u16::from_be_bytes([out[18], out[19]]) + 8;
        out[18..20].copy_from_slice(&len.to_be_bytes());
        out
    }

    #[test]
    fn a_frame_comes_like_another_only_by_the_same_ip_path() {
        let v4 = |ttl: u8| {
            let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
                .ipv4([198, 18, 0, 1], [198, 18, 0, 2], ttl)
                .tcp(40000, 443, 1000, 501);
            let mut out = Vec::new();
            b.write(&mut out, b"hello").unwrap();
            out
        };
        let base = v4(64);
        let tpl = parse_segment(&base).unwrap().template(&base);
        let like = |f: &[u8]| parse_segment(f).unwrap().came_like(&tpl, f);
        assert!(like(&base));
        assert!(!like(&v4(63)), "another TTL");
        let opts = with_ipv4_options(&base);
        assert_eq!(parse_segment(&opts).unwrap().segment.payload, b"hello");
        assert!(!like(&opts), "IPv4 options");
        let mut tagged = base[..12].to_vec();
        tagged.extend_from_slice(&[0x81, 0x00, 0x00, 0x07]);
        tagged.extend_from_slice(&base[12..]);
        assert!(!like(&tagged), "a VLAN tag");
        let mut moved = base.clone();
        moved[0] ^= 1;
        assert!(!like(&moved), "another MAC address");

        let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv6(
                [0x20, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                [0x20, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
                64,
            )
            .tcp(40000, 443, 1000, 501);
        let mut v6 = Vec::new();
        b.write(&mut v6, b"hello").unwrap();
        let tpl = parse_segment(&v6).unwrap().template(&v6);
        assert!(parse_segment(&v6).unwrap().came_like(&tpl, &v6));
        let ext = with_destination_options(&v6);
        let p = parse_segment(&ext).unwrap();
        assert_eq!(p.segment.payload, b"hello");
        assert!(!p.came_like(&tpl, &ext), "an IPv6 extension header");
    }

    /// Normalised frames parse (checksums right, IPv4 and IPv6, with
    /// IPv4 options and an IPv6 extension header) and lose exactly what
    /// was asked.
    #[test]
    fn normalised_frames_lose_only_what_was_asked() {
        let v6 = |b: etherparse::TcpHeader| {
            let b = PacketBuilder::ethernet2([2; 6], [3; 6])
                .ipv6(
                    [0x20, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                    [0x20, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
                    64,
                )
                .tcp_header(b);
            let mut out = Vec::new();
            b.write(&mut out, b"early data").unwrap();
            out
        };
        let v4 = |b: etherparse::TcpHeader| {
            let b = PacketBuilder::ethernet2([2; 6], [3; 6])
                .ipv4([198, 18, 0, 1], [198, 18, 0, 2], 64)
                .tcp_header(b);
            let mut out = Vec::new();
            b.write(&mut out, b"early data").unwrap();
            out
        };
        let mut syn = etherparse::TcpHeader::new(40000, 443, 1000, 65535);
        syn.syn = true;
        syn.fin = true;
        syn.urg = true;
        syn.urgent_pointer = 3;
        // MSS, Fast Open with an 8-byte cookie, timestamps; then the
        // experimental Fast Open form.
        syn.set_options_raw(&[
            2, 4, 5, 0xb4, 34, 10, 1, 2, 3, 4, 5, 6, 7, 8, 8, 10, 0, 0, 0, 9, 0, 0, 0, 0, 1, 1,
            254, 4, 0xf9, 0x89,
        ])
        .unwrap();
        for f in [
            v4(syn.clone()),
            v6(syn.clone()),
            with_ipv4_options(&v4(syn.clone())),
            with_destination_options(&v6(syn.clone())),
        ] {
            let p = parse_segment(&f).unwrap().segment;
            assert!(p.options.fast_open && p.flags.fin && p.flags.urg);
            let n = normalised(&f, Normalise::Syn).unwrap();
            let q = parse_segment(&n).unwrap().segment;
            assert!(q.payload.is_empty() && q.flags.syn && !q.flags.fin && !q.flags.urg);
            assert!(!q.options.fast_open);
            assert_eq!(
                (q.options.mss, q.options.timestamps),
                (p.options.mss, p.options.timestamps)
            );
            assert_eq!(q.seq, p.seq);
            let u = normalised(&f, Normalise::Urgent).unwrap();
            let q = parse_segment(&u).unwrap().segment;
            assert!(!q.flags.urg && q.flags.fin && q.options.fast_open);
            assert_eq!(q.payload, b"early data");
            assert_eq!(u.len(), f.len());
            let r = normalised(&f, Normalise::ResetAt(SeqNum(77))).unwrap();
            let q = parse_segment(&r).unwrap().segment;
            assert_eq!((q.seq, q.ack, q.payload.len()), (SeqNum(77), p.ack, 10));
        }
        // Odd payload lengths (the sum pads the last byte), a byte at a
        // time up to an MSS, with and without Ethernet padding after.
        let mut urg = etherparse::TcpHeader::new(40000, 443, 1000, 65535);
        urg.urg = true;
        urg.urgent_pointer = 1;
        urg.ack = true;
        for len in (1..1460).step_by(97) {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let b = PacketBuilder::ethernet2([2; 6], [3; 6])
                .ipv4([198, 18, 0, 1], [198, 18, 0, 2], 64)
                .tcp_header(urg.clone());
            let mut f = Vec::new();
            b.write(&mut f, &payload).unwrap();
            for pad in [0, 5] {
                let mut g = f.clone();
                g.extend(std::iter::repeat_n(0, pad));
                let u = normalised(&g, Normalise::Urgent).unwrap();
                let q = parse_segment(&u).unwrap().segment;
                assert!(!q.flags.urg, "{len} {pad}");
                assert_eq!(q.payload, payload, "{len} {pad}");
                assert_eq!(u.len(), f.len(), "{len} {pad}: padding cut");
            }
        }
    }

    #[test]
    fn parse_then_build_reproduces_the_frame() {
        let f = frame_v4(b"hello");
        let p = parse_segment(&f).unwrap();
        assert_eq!((p.segment.seq, p.segment.ack), (SeqNum(1000), SeqNum(77)));
        assert!(p.segment.flags.ack && p.segment.flags.psh && !p.segment.flags.syn);
        assert_eq!(p.segment.window, 501);
        assert_eq!(
            p.segment.options.timestamps,
            Some(Timestamps { val: 5, ecr: 6 })
        );
        let mut out = Vec::new();
        p.template(&f).build(&p.segment, &mut out);
        // Our frame parses back to the same segment with valid checksums.
        let back = parse_segment(&out).unwrap();
        assert_eq!(back.segment, p.segment);
        assert_eq!(back.key, p.key);
        assert_eq!(back.template(&out), p.template(&f));
    }

    /// An IPv6 segment with FIN (seq 5) from port 1 to 443, with `ack`
    /// if given.
    fn fin_v6(payload: &[u8], ack: Option<u32>) -> Vec<u8> {
        let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv6(
                [0x20, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                [0x20, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
                64,
            )
            .tcp(1, 443, 5, 9)
            .fin();
        let b = match ack {
            Some(a) => b.ack(a),
            None => b,
        };
        let mut f = Vec::new();
        b.write(&mut f, payload).unwrap();
        f
    }

    #[test]
    fn ipv6_segments_round_trip() {
        let f = fin_v6(b"odd", Some(3));
        let p = parse_segment(&f).unwrap();
        let mut out = Vec::new();
        p.template(&f).build(&p.segment, &mut out);
        assert_eq!(parse_segment(&out).unwrap().segment, p.segment);
    }

    /// The resets for a connection nobody holds state for: back to the
    /// sender the way its frame came (link addresses swapped, its VLAN
    /// tag kept), at the number its ACK expects; on to the receiver as the
    /// sender, at the segment's own number, and an ACK one below that
    /// draws the receiver's exact numbers. All parse (checksums right).
    #[test]
    fn resets_go_back_and_on_at_the_expected_numbers() {
        let f = frame_v4(b"hello");
        let p = parse_segment(&f).unwrap();
        let back = p.reset_back(&f, 5).unwrap();
        let b = parse_segment(&back).unwrap();
        assert_eq!(b.key, p.key.reversed());
        assert_eq!((&back[..6], &back[6..12]), (&f[6..12], &f[..6]));
        assert_eq!(back[12..16], f[12..16], "the VLAN tag");
        assert_eq!(
            (b.segment.seq, b.segment.flags.rst, b.segment.flags.ack),
            (SeqNum(77), true, false)
        );
        assert!(b.segment.payload.is_empty());
        let [rst, probe] = p.reset_on(&f).unwrap();
        for (frame, seq, rst) in [(rst, 1000, true), (probe, 999, false)] {
            let o = parse_segment(&frame).unwrap();
            assert_eq!(o.key, p.key);
            assert_eq!(frame[..16], f[..16]);
            let s = o.segment;
            assert_eq!((s.seq, s.ack), (SeqNum(seq), SeqNum(77)));
            assert_eq!((s.flags.rst, s.flags.ack), (rst, true));
            assert!(s.payload.is_empty());
        }
        // Without an ACK, the sender is answered with RST|ACK of the
        // segment; IPv6 alike.
        let f6 = fin_v6(b"odd", None);
        let p6 = parse_segment(&f6).unwrap();
        let back = parse_segment(&p6.reset_back(&f6, 3).unwrap()).unwrap();
        assert_eq!(back.key, p6.key.reversed());
        let s = back.segment;
        assert!(s.flags.rst && s.flags.ack);
        assert_eq!(s.ack, SeqNum(5 + 3 + 1), "past the data and the FIN");
        // A RST is never answered.
        let mut rst = p.clone();
        rst.segment.flags.rst = true;
        assert!(rst.reset_back(&f, 0).is_none() && rst.reset_on(&f).is_none());
    }

    #[test]
    fn both_zeros_of_ones_complement_are_good_checksums() {
        // Find a segment whose checksum computes to 0, then send it as
        // Linux does, with 0xffff in the field.
        let (mut f, field) = (0u32..)
            .map(|i| {
                let f = frame_v4(&i.to_be_bytes());
                let field = f.len() - 4 - 12 - 4; // the field, before options and payload
                (f, field)
            })
            .find(|(f, field)| f[*field..*field + 2] == [0, 0])
            .unwrap();
        assert!(parse_segment(&f).is_ok());
        f[field..field + 2].copy_from_slice(&[0xff, 0xff]);
        assert!(parse_segment(&f).is_ok());
        f[field + 1] = 0xfe;
        assert_eq!(parse_segment(&f).unwrap_err(), SegmentError::Checksum);
    }

    #[test]
    fn ttl_dscp_and_flow_label_are_copied_and_ecn_is_not() {
        // IPv4: TTL 57, DSCP 46 (EF) with ECT(0).
        let mut f = frame_v4(b"x");
        let ip = 18; // Ethernet + one VLAN tag
        f[ip + 1] = 46 << 2 | 0b10;
        f[ip + 8] = 57;
        let c = fold(sum16(0, &{
            let mut h = f[ip..ip + 20].to_vec();
            h[10..12].fill(0);
            h
        }));
        f[ip + 10..ip + 12].copy_from_slice(&c.to_be_bytes());
        let p = parse_segment(&f).unwrap();
        let mut out = Vec::new();
        p.template(&f).build(&p.segment, &mut out);
        assert_eq!((out[ip + 1], out[ip + 8]), (46 << 2, 57));
        assert!(parse_segment(&out).is_ok());
        // IPv6: hop limit 33, DSCP 10 with CE, flow label 0xabcde.
        let b = PacketBuilder::ethernet2([2; 6], [3; 6])
            .ipv6([1; 16], [2; 16], 33)
            .tcp(1, 443, 5, 9)
            .ack(3);
        let mut f = Vec::new();
        b.write(&mut f, b"v6").unwrap();
        let word: u32 = 6 << 28 | (10 << 2 | 0b11) << 20 | 0xabcde;
        f[14..18].copy_from_slice(&word.to_be_bytes());
        let p = parse_segment(&f).unwrap();
        let mut out = Vec::new();
        p.template(&f).build(&p.segment, &mut out);
        let got = u32::from_be_bytes(out[14..18].try_into().unwrap());
        assert_eq!(got, 6 << 28 | (10 << 2) << 20 | 0xabcde);
        assert_eq!(out[14 + 7], 33);
    }

    #[test]
    fn a_bad_checksum_or_bad_options_is_refused() {
        let mut f = frame_v4(b"hello");
        let last = f.len() - 1;
        f[last] ^= 0xff;
        assert_eq!(parse_segment(&f).unwrap_err(), SegmentError::Checksum);
        let b = PacketBuilder::ethernet2([2; 6], [3; 6])
            .ipv4([198, 18, 0, 1], [198, 18, 0, 2], 64)
            .tcp(1, 2, 3, 4)
            .options_raw(&[2, 3, 0, 0])
            .unwrap();
        let mut f = Vec::new();
        b.write(&mut f, b"").unwrap();
        assert!(matches!(parse_segment(&f), Err(SegmentError::Options(_))));
    }

    /// The two-byte loop [`sum16`] replaced, as the reference.
    fn sum16_by_words(mut acc: u32, bytes: &[u8]) -> u32 {
        let mut chunks = bytes.chunks_exact(2);
        for c in &mut chunks {
            acc += u32::from(u16::from_be_bytes([c[0], c[1]]));
        }
        if let [last] = chunks.remainder() {
            acc += u32::from(*last) << 8;
        }
        acc
    }

    proptest::proptest! {
        #[test]
        fn the_wide_sum_folds_to_the_two_byte_sum(
            acc in 0u32..0x3_0000,
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..2000),
        ) {
            proptest::prop_assert_eq!(
                fold(sum16(acc, &bytes)),
                fold(sum16_by_words(acc, &bytes))
            );
        }
    }

    #[test]
    fn the_wide_sum_at_the_edges() {
        // All ones (a sum that must stay 0xffff, never fold to 0), all
        // zeros, odd lengths across the 4-byte words and the 32-byte
        // blocks, 64 KiB of 0xff.
        for len in [
            0, 1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 1448, 1449, 65_535,
        ] {
            for fill in [0x00u8, 0x01, 0x80, 0xff] {
                let b = vec![fill; len];
                assert_eq!(
                    fold(sum16(0, &b)),
                    fold(sum16_by_words(0, &b)),
                    "{len} x {fill:#x}"
                );
            }
        }
        // A segment whose checksum field is right sums to 0 after folding.
        let mut b: Vec<u8> = (0..1449u32).map(|i| (i * 7 + 3) as u8).collect();
        b[16] = 0;
        b[17] = 0;
        let c = fold(sum16(0, &b)).to_be_bytes();
        b[16..18].copy_from_slice(&c);
        assert_eq!(fold(sum16(0, &b)), 0);
    }
}
