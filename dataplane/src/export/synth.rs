//! Synthetic TCP sessions carrying decrypted plaintext: the frames a
//! capture of an unencrypted connection between the same endpoints would
//! show (handshake, data with consistent sequence and acknowledgment
//! numbers and valid checksums, FIN or RST), so that tshark, Wireshark
//! and an IDS reassemble them as they would real traffic.
//!
//! A session is described by its events' stream offsets alone (nothing is
//! kept between events), so a dropped event leaves a gap the reader sees
//! as missing bytes, never shifted ones.

use std::net::SocketAddr;

use crate::{
    inspect::Direction,
    wire::{
        options::TcpOptions,
        segment::{Flags, Segment, Template},
        seq::SeqNum,
    },
};

/// The made-up MAC addresses of the two ends (locally administered).
pub const CLIENT_MAC: [u8; 6] = [0x02, 0x4c, 0x50, 0x00, 0x00, 0x01];
pub const SERVER_MAC: [u8; 6] = [0x02, 0x4c, 0x50, 0x00, 0x00, 0x02];

/// The window every synthetic segment advertises.
const WINDOW: u16 = 65_535;

/// Where each direction's stream stands: bytes sent so far and whether
/// its FIN went out (the FIN takes one sequence number).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Marks {
    pub sent: [u64; 2],
    pub fin: [bool; 2],
}

/// One connection's addressing and initial sequence numbers.
#[derive(Clone, Debug)]
pub struct Session {
    tpl: [Template; 2],
    isn: [u32; 2],
}

impl Session {
    /// `id` picks the initial sequence numbers (any value will do; distinct
    /// ones keep sessions apart when ports are reused).
    pub fn new(client: SocketAddr, server: SocketAddr, id: u64) -> Session {
        let mix = id.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        Session {
            tpl: [
                Template::synthetic(CLIENT_MAC, SERVER_MAC, client, server),
                Template::synthetic(SERVER_MAC, CLIENT_MAC, server, client),
            ],
            isn: [mix as u32, (mix >> 32) as u32],
        }
    }

    /// Payload bytes per frame for frames of at most `mtu` bytes of IP.
    pub fn mss(&self, mtu: usize) -> usize {
        let ip_and_tcp = self.tpl[0].header_len() - 14;
        mtu.saturating_sub(ip_and_tcp).max(64)
    }

    fn seq(&self, d: usize, m: &Marks) -> SeqNum {
        SeqNum(self.isn[d].wrapping_add(1).wrapping_add(m.sent[d] as u32))
    }

    fn ack_of(&self, d: usize, m: &Marks) -> SeqNum {
        let o = 1 - d;
        SeqNum(self.seq(o, m).0.wrapping_add(u32::from(m.fin[o])))
    }

    fn emit(&self, d: usize, seg: &Segment, buf: &mut Vec<u8>, out: &mut dyn FnMut(&[u8])) {
        buf.clear();
        self.tpl[d].build(seg, buf);
        out(buf);
    }

    /// SYN, SYN-ACK, ACK.
    pub fn open(&self, buf: &mut Vec<u8>, out: &mut dyn FnMut(&[u8])) {
        let syn = |seq: u32, ack: Option<u32>| Segment {
            seq: SeqNum(seq),
            ack: SeqNum(ack.unwrap_or(0)),
            flags: Flags {
                syn: true,
                ack: ack.is_some(),
                ..Flags::default()
            },
            window: WINDOW,
            options: TcpOptions {
                mss: Some(1460),
                ..TcpOptions::default()
            },
            payload: Vec::new(),
        };
        self.emit(0, &syn(self.isn[0], None), buf, out);
        let synack = syn(self.isn[1], Some(self.isn[0].wrapping_add(1)));
        self.emit(1, &synack, buf, out);
        let ack = Segment {
            seq: SeqNum(self.isn[0].wrapping_add(1)),
            ack: SeqNum(self.isn[1].wrapping_add(1)),
            flags: Flags {
                ack: true,
                ..Flags::default()
            },
            window: WINDOW,
            ..Segment::default()
        };
        self.emit(0, &ack, buf, out);
    }

    /// `data` sent in direction `dir` from the stream position `m`, cut
    /// into frames of at most `mss` payload bytes.
    pub fn data(
        &self,
        dir: Direction,
        m: &Marks,
        data: &[u8],
        mss: usize,
        buf: &mut Vec<u8>,
        out: &mut dyn FnMut(&[u8]),
    ) {
        let d = dir as usize;
        let mut at = *m;
        let chunks = data.chunks(mss.max(1));
        let last = chunks.len().saturating_sub(1);
        for (i, c) in chunks.enumerate() {
            let seg = Segment {
                seq: self.seq(d, &at),
                ack: self.ack_of(d, &at),
                flags: Flags {
                    ack: true,
                    psh: i == last,
                    ..Flags::default()
                },
                window: WINDOW,
                options: TcpOptions::default(),
                payload: c.to_vec(),
            };
            self.emit(d, &seg, buf, out);
            at.sent[d] += c.len() as u64;
        }
    }

    /// Direction `dir`'s FIN at the stream position `m` (before the FIN).
    pub fn fin(&self, dir: Direction, m: &Marks, buf: &mut Vec<u8>, out: &mut dyn FnMut(&[u8])) {
        let d = dir as usize;
        let seg = Segment {
            seq: self.seq(d, m),
            ack: self.ack_of(d, m),
            flags: Flags {
                fin: true,
                ack: true,
                ..Flags::default()
            },
            window: WINDOW,
            ..Segment::default()
        };
        self.emit(d, &seg, buf, out);
    }

    /// The connection was reset (blocked, failed, or the engine stopped):
    /// a RST each way, at the stream positions `m`.
    pub fn reset(&self, m: &Marks, buf: &mut Vec<u8>, out: &mut dyn FnMut(&[u8])) {
        for d in [1, 0] {
            let seq = self.seq(d, m).0.wrapping_add(u32::from(m.fin[d]));
            let seg = Segment {
                seq: SeqNum(seq),
                ack: self.ack_of(d, m),
                flags: Flags {
                    rst: true,
                    ack: true,
                    ..Flags::default()
                },
                window: 0,
                ..Segment::default()
            };
            self.emit(d, &seg, buf, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::segment::parse_segment;

    fn frames(f: impl FnOnce(&Session, &mut Vec<u8>, &mut dyn FnMut(&[u8]))) -> Vec<Vec<u8>> {
        let s = Session::new(
            "198.18.0.1:40000".parse().unwrap(),
            "198.18.0.2:443".parse().unwrap(),
            7,
        );
        let mut out = Vec::new();
        let mut buf = Vec::new();
        f(&s, &mut buf, &mut |fr| out.push(fr.to_vec()));
        out
    }

    #[test]
    fn a_session_reads_back_as_one_consistent_tcp_connection() {
        let req = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n".repeat(100);
        let frs = frames(|s, buf, out| {
            let mut m = Marks::default();
            s.open(buf, out);
            s.data(Direction::ClientToServer, &m, &req, 1460, buf, out);
            m.sent[0] = req.len() as u64;
            s.data(
                Direction::ServerToClient,
                &m,
                b"HTTP/1.1 200 OK\r\n\r\n",
                1460,
                buf,
                out,
            );
            m.sent[1] = 19;
            s.fin(Direction::ClientToServer, &m, buf, out);
            m.fin[0] = true;
            s.fin(Direction::ServerToClient, &m, buf, out);
        });
        let segs: Vec<_> = frs
            .iter()
            .map(|f| parse_segment(f).expect("valid"))
            .collect();
        // SYN, SYN-ACK, ACK, 2 request frames (2,700 bytes), 1 response,
        // FIN, FIN.
        assert_eq!(segs.len(), 8);
        assert!(segs[0].segment.flags.syn && !segs[0].segment.flags.ack);
        assert!(segs[1].segment.flags.syn && segs[1].segment.flags.ack);
        let isn_c = segs[0].segment.seq;
        let isn_s = segs[1].segment.seq;
        assert_eq!(segs[1].segment.ack, SeqNum(isn_c.0 + 1));
        // The request's bytes, in order, reassemble exactly.
        let mut got = Vec::new();
        for p in &segs[3..5] {
            assert_eq!(p.segment.seq.0, isn_c.0 + 1 + got.len() as u32);
            assert_eq!(p.segment.ack, SeqNum(isn_s.0 + 1));
            got.extend_from_slice(&p.segment.payload);
        }
        assert_eq!(got, req);
        assert!(segs[4].segment.flags.psh && !segs[3].segment.flags.psh);
        // The response acknowledges the whole request.
        assert_eq!(segs[5].segment.ack.0, isn_c.0 + 1 + req.len() as u32);
        // The server's FIN acknowledges the client's FIN.
        assert_eq!(segs[7].segment.ack.0, isn_c.0 + 2 + req.len() as u32);
        assert_eq!(segs[7].segment.seq.0, isn_s.0 + 1 + 19);
        assert_eq!(segs[3].key.src_port, 40000);
        assert_eq!(segs[5].key.src_port, 443);
    }

    #[test]
    fn ipv6_sessions_fit_the_mtu_and_checksum() {
        let s = Session::new(
            "[2001:2::1]:40000".parse().unwrap(),
            "[2001:2::2]:443".parse().unwrap(),
            1,
        );
        assert_eq!(s.mss(1500), 1440);
        let mut out = Vec::new();
        let mut buf = Vec::new();
        s.data(
            Direction::ServerToClient,
            &Marks::default(),
            &[7u8; 5000],
            s.mss(1500),
            &mut buf,
            &mut |f| out.push(f.to_vec()),
        );
        assert_eq!(out.len(), 4);
        for f in &out {
            assert!(f.len() <= 1514);
            parse_segment(f).expect("valid checksum");
        }
    }

    #[test]
    fn a_reset_follows_the_stream_positions() {
        let m = Marks {
            sent: [10, 20],
            fin: [true, false],
        };
        let frs = frames(|s, buf, out| s.reset(&m, buf, out));
        let segs: Vec<_> = frs.iter().map(|f| parse_segment(f).unwrap()).collect();
        assert!(segs.iter().all(|p| p.segment.flags.rst));
        // The client's RST comes after its 10 bytes and FIN.
        assert_eq!(segs[1].segment.seq.0.wrapping_sub(segs[0].segment.ack.0), 0);
    }
}
