//! The tcp-split action: watch a connection's three-way handshake go by,
//! then become the server toward the client and the client toward the
//! server, relaying the two byte streams between the halves.
//!
//! Nothing is invented: each half continues the sequence space, MSS, window
//! scale, timestamps and SACK permission the real endpoints negotiated, so
//! neither endpoint can tell. Connections this cannot continue faithfully
//! are passed through untouched instead: TCP Fast Open (data or a cookie on
//! the SYN), a handshake with a window shift above 14, or one whose segments
//! do not fit together.

use std::time::Instant;

use super::conn::{Conn, ConnConfig, Handshake, State};
use crate::wire::{options::TcpOptions, segment::Segment, seq::SeqNum};

/// Which endpoint a segment came from (or goes to).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// The endpoint that sent the SYN.
    Client,
    /// The endpoint that answered with SYN-ACK.
    Server,
}

/// Why a connection is passed through rather than split.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Passthrough {
    /// TCP Fast Open: data or a cookie on the SYN (RFC 7413).
    FastOpen,
    /// The first segment seen was not a SYN (the engine started mid-flow).
    MidFlow,
    /// The handshake's segments contradict each other.
    Inconsistent,
    /// URG before the decision.
    Urgent,
    /// A RST before the decision.
    Reset,
}

/// Where the handshake is.
#[derive(Clone, Debug)]
enum Phase {
    /// Nothing seen.
    Idle,
    /// The client's SYN: its ISN and options.
    Syn { isn: SeqNum, opts: TcpOptions },
    /// The server's SYN-ACK too.
    SynAck {
        c_isn: SeqNum,
        c_opts: TcpOptions,
        s_isn: SeqNum,
        s_opts: TcpOptions,
        s_window: u16,
    },
    /// Established, before the decision: client data is held.
    Hold(Box<Negotiated>),
}

/// What the handshake settled, and the latest each endpoint said since.
#[derive(Clone, Debug)]
struct Negotiated {
    c_isn: SeqNum,
    c_opts: TcpOptions,
    s_isn: SeqNum,
    s_opts: TcpOptions,
    /// The window each endpoint advertised last, in bytes.
    c_window: u32,
    s_window: u32,
    /// The last TSval each endpoint sent.
    c_ts: Option<u32>,
    s_ts: Option<u32>,
}

/// What to do with a segment before the decision.
#[derive(Debug, PartialEq, Eq)]
pub enum Track {
    /// Forward it unchanged; keep watching.
    Forward,
    /// Client data (or FIN) after the handshake: hold it, neither
    /// forwarded nor acknowledged, until the decision.
    Hold,
    /// The server sent data (or FIN) first: decide now; the segment goes
    /// to whatever the decision makes of the connection.
    Decide,
    /// Leave this connection alone for good (after releasing anything
    /// held, ahead of this segment).
    Pass(Passthrough),
}

/// Watches one connection's handshake.
#[derive(Clone, Debug)]
pub struct Tracker {
    phase: Phase,
    cfg: ConnConfig,
}

impl Tracker {
    pub fn new(cfg: ConnConfig) -> Tracker {
        Tracker {
            phase: Phase::Idle,
            cfg,
        }
    }

    /// The first sequence number of the client's data once established.
    pub fn client_data_start(&self) -> Option<SeqNum> {
        match &self.phase {
            Phase::Hold(n) => Some(n.c_isn + 1),
            _ => None,
        }
    }

    /// Where the server's data starts (its ISN + 1), once the handshake is
    /// done.
    pub fn server_data_start(&self) -> Option<SeqNum> {
        match &self.phase {
            Phase::Hold(n) => Some(n.s_isn + 1),
            _ => None,
        }
    }

    /// Looks at the next segment of the connection, in arrival order.
    pub fn on_segment(&mut self, dir: Dir, seg: &Segment) -> Track {
        let f = seg.flags;
        if f.rst {
            if matches!(self.phase, Phase::Hold(_)) {
                return Track::Pass(Passthrough::Reset);
            }
            // The attempt is over; a new SYN may reuse the ports.
            self.phase = Phase::Idle;
            return Track::Forward;
        }
        if f.urg {
            return Track::Pass(Passthrough::Urgent);
        }
        match (&mut self.phase, dir) {
            (Phase::Idle, Dir::Client) if f.syn && !f.ack => {
                if seg.options.fast_open || !seg.payload.is_empty() || f.fin {
                    return Track::Pass(Passthrough::FastOpen);
                }
                self.phase = Phase::Syn {
                    isn: seg.seq,
                    opts: seg.options.clone(),
                };
                Track::Forward
            }
            (Phase::Idle, _) => Track::Pass(Passthrough::MidFlow),
            // A retransmitted SYN.
            (Phase::Syn { isn, .. }, Dir::Client) if f.syn && !f.ack && seg.seq == *isn => {
                Track::Forward
            }
            // A new SYN on the same ports (the earlier attempt was refused
            // or abandoned): start over.
            (Phase::Syn { .. } | Phase::SynAck { .. } | Phase::Hold(_), Dir::Client)
                if f.syn && !f.ack =>
            {
                self.phase = Phase::Idle;
                self.on_segment(dir, seg)
            }
            (Phase::Syn { isn, opts, .. }, Dir::Server) if f.syn && f.ack => {
                if seg.ack != *isn + 1 || !seg.payload.is_empty() || f.fin {
                    return Track::Pass(Passthrough::Inconsistent);
                }
                self.phase = Phase::SynAck {
                    c_isn: *isn,
                    c_opts: opts.clone(),
                    s_isn: seg.seq,
                    s_opts: seg.options.clone(),
                    s_window: seg.window,
                };
                Track::Forward
            }
            (Phase::SynAck { s_isn, .. }, Dir::Server) if f.syn && f.ack && seg.seq == *s_isn => {
                Track::Forward // a retransmitted SYN-ACK
            }
            (
                Phase::SynAck {
                    c_isn,
                    c_opts,
                    s_isn,
                    s_opts,
                    s_window,
                },
                Dir::Client,
            ) if f.ack => {
                if seg.ack != *s_isn + 1 || seg.seq != *c_isn + 1 {
                    return Track::Pass(Passthrough::Inconsistent);
                }
                // The client's ACK window is scaled; the SYN-ACK's never is.
                let c_shift = window_shifts(c_opts, s_opts).map_or(0, |(c, _)| c);
                let n = Negotiated {
                    c_isn: *c_isn,
                    c_opts: c_opts.clone(),
                    s_isn: *s_isn,
                    s_opts: s_opts.clone(),
                    c_window: u32::from(seg.window) << c_shift,
                    s_window: u32::from(*s_window),
                    c_ts: seg.options.timestamps.or(c_opts.timestamps).map(|t| t.val),
                    s_ts: s_opts.timestamps.map(|t| t.val),
                };
                self.phase = Phase::Hold(Box::new(n));
                if seg.payload.is_empty() && !f.fin {
                    Track::Forward
                } else {
                    Track::Hold
                }
            }
            (Phase::Hold(_), Dir::Server) if f.syn => Track::Forward, // SYN-ACK again
            // Data (or FIN): the client's is held, the server's forces the
            // decision; either goes to the halves later, which take its
            // window and timestamp then (taking them now would make the
            // replayed segments look old to PAWS).
            (Phase::Hold(_), Dir::Client) if !seg.payload.is_empty() || f.fin => Track::Hold,
            (Phase::Hold(_), Dir::Server) if !seg.payload.is_empty() || f.fin => Track::Decide,
            // A pure ACK goes on: the halves continue from what it said.
            (Phase::Hold(n), dir) => {
                let shifts = window_shifts(&n.c_opts, &n.s_opts);
                let (c_shift, s_shift) = shifts.unwrap_or((0, 0));
                let (window, ts, shift) = match dir {
                    Dir::Client => (&mut n.c_window, &mut n.c_ts, c_shift),
                    Dir::Server => (&mut n.s_window, &mut n.s_ts, s_shift),
                };
                *window = u32::from(seg.window) << shift;
                if let (Some(last), Some(t)) = (ts.as_mut(), seg.options.timestamps) {
                    if SeqNum(t.val).gt(SeqNum(*last)) {
                        *last = t.val;
                    }
                }
                Track::Forward
            }
            _ => Track::Forward,
        }
    }

    /// The two halves (client-facing, server-facing), once established:
    /// they continue what both SYNs and everything since said.
    /// `held_tsval` is the oldest TSval of the held segments the
    /// client-facing half is about to take, so that PAWS does not take
    /// them for old duplicates.
    pub fn split(&self, now: Instant, held_tsval: Option<u32>) -> Option<(Conn, Conn)> {
        let Phase::Hold(n) = &self.phase else {
            return None;
        };
        let wscale = window_shifts(&n.c_opts, &n.s_opts);
        //= https://www.rfc-editor.org/rfc/rfc7323#section-3.2
        //# Once TSopt has been successfully negotiated, that is both <SYN>
        //# and <SYN,ACK> contain TSopt
        let ts = match (n.c_ts, n.s_ts) {
            (Some(c), Some(s)) => Some((c, s)),
            _ => None,
        };
        let c_recent = match (n.c_ts, held_tsval) {
            (Some(c), Some(h)) if SeqNum(h).lt(SeqNum(c)) => Some(h),
            (c, _) => c,
        };
        let sack = n.c_opts.sack_permitted && n.s_opts.sack_permitted;
        // RFC 9293 §3.7.1: without the option the MSS is 536 (IPv4).
        let c_mss = n.c_opts.mss.unwrap_or(536);
        let s_mss = n.s_opts.mss.unwrap_or(536);
        let client_facing = Conn::new(
            &Handshake {
                local_isn: n.s_isn,
                remote_isn: n.c_isn,
                peer_mss: c_mss,
                wscale,
                timestamps: ts.map(|(_, s)| (c_recent.expect("negotiated"), s)),
                sack_permitted: sack,
                peer_window: n.c_window,
            },
            self.cfg.clone(),
            now,
        );
        let server_facing = Conn::new(
            &Handshake {
                local_isn: n.c_isn,
                remote_isn: n.s_isn,
                peer_mss: s_mss,
                wscale: wscale.map(|(c, s)| (s, c)),
                timestamps: ts.map(|(c, s)| (s, c)),
                sack_permitted: sack,
                peer_window: n.s_window,
            },
            self.cfg.clone(),
            now,
        );
        Some((client_facing, server_facing))
    }
}

/// The window shifts (client's, server's) when both SYNs carried the
/// option.
fn window_shifts(c: &TcpOptions, s: &TcpOptions) -> Option<(u8, u8)> {
    //= https://www.rfc-editor.org/rfc/rfc7323#section-2.2
    //# ... both sides must send Window Scale options in their <SYN>
    //# segments to enable window scaling in either direction.
    match (c.window_shift(), s.window_shift()) {
        (Some(c), Some(s)) => Some((c, s)),
        _ => None,
    }
}

/// A split connection: the two halves and the relay between them.
pub struct Split {
    pub client: Conn,
    pub server: Conn,
    relayed: [u64; 2],
    /// Refused: nothing is relayed; the client's bytes are read and
    /// dropped until it closes.
    refused: bool,
    /// Resets to send before anything else.
    resets: Vec<(Dir, Segment)>,
}

impl Split {
    pub fn new(halves: (Conn, Conn)) -> Split {
        Split {
            client: halves.0,
            server: halves.1,
            relayed: [0; 2],
            refused: false,
            resets: Vec::new(),
        }
    }

    /// Refuses the connection: the server's half is reset at once (it never
    /// saw a byte of the client's); the client's half sends `farewell` (a
    /// TLS alert) and closes, or is reset too when there is none.
    pub fn refuse(&mut self, farewell: Option<&[u8]>) {
        self.refused = true;
        self.resets
            .extend(self.server.abort().map(|r| (Dir::Server, r)));
        match farewell {
            Some(bytes) => {
                self.client.write(bytes);
                self.client.close();
            }
            None => self
                .resets
                .extend(self.client.abort().map(|r| (Dir::Client, r))),
        }
        self.relay();
    }

    /// Bytes relayed client → server and server → client.
    pub fn relayed(&self) -> (u64, u64) {
        (self.relayed[0], self.relayed[1])
    }

    /// A segment from `dir`'s endpoint.
    pub fn on_segment(&mut self, dir: Dir, seg: &Segment, now: Instant) {
        match dir {
            Dir::Client => self.client.on_segment(seg, now),
            Dir::Server => self.server.on_segment(seg, now),
        }
        self.relay();
    }

    pub fn on_timer(&mut self, now: Instant) {
        self.client.on_timer(now);
        self.server.on_timer(now);
        self.relay();
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        [self.client.next_deadline(), self.server.next_deadline()]
            .into_iter()
            .flatten()
            .min()
    }

    /// Moves bytes between the halves as far as the receiving half's send
    /// buffer allows: a slow reader on one side fills its half's send
    /// buffer, the other half stops reading, and its advertised window
    /// closes. Memory stays within the two halves' buffers. A FIN and a RST
    /// are passed across too.
    fn relay(&mut self) {
        if self.refused {
            let n = self.client.readable();
            if n > 0 {
                self.client.read(n);
            }
            return;
        }
        for (from_client, n) in [(true, 0), (false, 1)] {
            let (src, dst) = if from_client {
                (&mut self.client, &mut self.server)
            } else {
                (&mut self.server, &mut self.client)
            };
            let room = dst.send_space();
            if room > 0 && src.readable() > 0 {
                let bytes = src.read(room);
                let wrote = dst.write(&bytes);
                debug_assert_eq!(wrote, bytes.len());
                self.relayed[n] += wrote as u64;
            }
            // Half-close: the source finished and everything was passed on.
            if src.peer_finished() && matches!(dst.state(), State::Established | State::CloseWait) {
                dst.close();
            }
        }
    }

    /// The next segment to send, and toward whom.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<(Dir, Segment)> {
        if !self.resets.is_empty() {
            return Some(self.resets.remove(0));
        }
        // A reset half resets the other: RST the peer that is still there.
        if self.refused {
            return self.client.poll_transmit(now).map(|s| (Dir::Client, s));
        }
        if self.client.aborted().is_some() && self.server.state() != State::Closed {
            if let Some(rst) = self.server.abort() {
                return Some((Dir::Server, rst));
            }
        }
        if self.server.aborted().is_some() && self.client.state() != State::Closed {
            if let Some(rst) = self.client.abort() {
                return Some((Dir::Client, rst));
            }
        }
        if let Some(s) = self.client.poll_transmit(now) {
            return Some((Dir::Client, s));
        }
        self.server.poll_transmit(now).map(|s| (Dir::Server, s))
    }

    /// Both halves are through with their bytes: closed, or waiting out
    /// TIME-WAIT.
    pub fn finished(&self) -> bool {
        [&self.client, &self.server]
            .iter()
            .all(|c| matches!(c.state(), State::Closed | State::TimeWait))
    }

    /// Both halves are closed (cleanly or not).
    pub fn done(&self) -> bool {
        self.client.state() == State::Closed && self.server.state() == State::Closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{options::Timestamps, segment::Flags};

    const SYN: Flags = Flags {
        fin: false,
        syn: true,
        rst: false,
        psh: false,
        ack: false,
        urg: false,
    };

    /// A bare segment.
    fn segment(seq: u32, ack: Option<u32>, flags: Flags, payload: &[u8]) -> Segment {
        Segment {
            seq: SeqNum(seq),
            ack: SeqNum(ack.unwrap_or(0)),
            flags: Flags {
                ack: ack.is_some(),
                ..flags
            },
            window: 512,
            options: TcpOptions::default(),
            payload: payload.to_vec(),
        }
    }

    fn syn_opts(ts: u32) -> TcpOptions {
        TcpOptions {
            mss: Some(1460),
            window_scale: Some(7),
            sack_permitted: true,
            timestamps: Some(Timestamps { val: ts, ecr: 0 }),
            ..TcpOptions::default()
        }
    }

    fn handshake(t: &mut Tracker) -> Track {
        let mut syn = segment(1000, None, SYN, b"");
        syn.options = syn_opts(50);
        assert!(matches!(t.on_segment(Dir::Client, &syn), Track::Forward));
        let mut synack = segment(9000, Some(1001), SYN, b"");
        synack.options = syn_opts(70);
        synack.window = 65535; // never scaled in a SYN-ACK
        assert!(matches!(t.on_segment(Dir::Server, &synack), Track::Forward));
        let mut ack = segment(1001, Some(9001), Flags::default(), b"");
        ack.options.timestamps = Some(Timestamps { val: 51, ecr: 70 });
        t.on_segment(Dir::Client, &ack)
    }

    #[test]
    fn the_halves_continue_both_sequence_spaces() {
        let now = Instant::now();
        let mut t = Tracker::new(ConnConfig::default());
        assert_eq!(handshake(&mut t), Track::Forward);
        let mut split = Split::new(t.split(now, None).expect("established"));
        // Client data arrives at the client-facing half...
        let mut data = segment(
            1001,
            Some(9001),
            Flags::default(),
            b"GET / HTTP/1.1\r\n\r\n",
        );
        data.options.timestamps = Some(Timestamps { val: 52, ecr: 70 });
        split.on_segment(Dir::Client, &data, now);
        // ...and leaves the server-facing half as the client would send it.
        let mut out = Vec::new();
        while let Some(s) = split.poll_transmit(now) {
            out.push(s);
        }
        let to_server: Vec<_> = out.iter().filter(|(d, _)| *d == Dir::Server).collect();
        assert_eq!(to_server.len(), 1, "{out:?}");
        let s = &to_server[0].1;
        assert_eq!((s.seq, s.ack), (SeqNum(1001), SeqNum(9001)));
        assert_eq!(s.payload, b"GET / HTTP/1.1\r\n\r\n");
        let ts = s.options.timestamps.unwrap();
        assert!(ts.val > 51 && ts.ecr == 70, "{ts:?}");
        assert_eq!(split.relayed(), (18, 0));
    }

    #[test]
    fn segments_leave_room_for_the_timestamp_option() {
        let now = Instant::now();
        let mut t = Tracker::new(ConnConfig::default());
        assert_eq!(handshake(&mut t), Track::Forward);
        let mut split = Split::new(t.split(now, None).expect("established"));
        let mut data = segment(1001, Some(9001), Flags::default(), &[7; 1448]);
        data.options.timestamps = Some(Timestamps { val: 52, ecr: 70 });
        for i in 0..3u32 {
            data.seq = SeqNum(1001 + i * 1448);
            split.on_segment(Dir::Client, &data, now);
        }
        let mut sizes = Vec::new();
        while let Some((dir, s)) = split.poll_transmit(now) {
            if dir == Dir::Server && !s.payload.is_empty() {
                sizes.push(s.payload.len());
            }
        }
        // MSS 1460 minus the 12 bytes of timestamps (RFC 6691): a full
        // segment is 1448 bytes and the frame fits a 1500-byte MTU.
        assert_eq!(sizes, [1448, 1448, 1448]);
    }

    #[test]
    fn fast_open_and_mid_flow_connections_pass_through() {
        let mut t = Tracker::new(ConnConfig::default());
        let syn = segment(1, None, SYN, b"data on syn");
        assert_eq!(
            t.on_segment(Dir::Client, &syn),
            Track::Pass(Passthrough::FastOpen)
        );
        let mut t = Tracker::new(ConnConfig::default());
        let mid = segment(1, Some(2), Flags::default(), b"x");
        assert_eq!(
            t.on_segment(Dir::Client, &mid),
            Track::Pass(Passthrough::MidFlow)
        );
    }

    #[test]
    fn a_synack_for_another_syn_is_inconsistent() {
        let mut t = Tracker::new(ConnConfig::default());
        let syn = segment(1000, None, SYN, b"");
        t.on_segment(Dir::Client, &syn);
        let synack = segment(9000, Some(5), SYN, b"");
        assert!(matches!(
            t.on_segment(Dir::Server, &synack),
            Track::Pass(Passthrough::Inconsistent)
        ));
    }
}
