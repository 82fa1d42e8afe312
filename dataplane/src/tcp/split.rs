//! Taking over a connection: watch its three-way handshake go by, then
//! build the two halves that become the server toward the client and the
//! client toward the server (the session joins them with a stage).
//!
//! Nothing is invented: each half continues the sequence space, MSS, window
//! scale, timestamps and SACK permission the real endpoints negotiated, so
//! neither endpoint can tell. What would let the server read bytes the
//! hold never held is taken out or dropped instead: a SYN goes on without
//! data, FIN, URG or a Fast Open option, and a segment that does not fit
//! the handshake is dropped (a real endpoint sends the one that does). A
//! window
//! shift above 14 is used as 14, as RFC 7323 §2.3 has the endpoint that
//! receives it do (and counted: [`Tracker::window_shift_clamped`]).

use std::time::Instant;

use super::conn::{Conn, ConnConfig, Handshake};
use crate::wire::{
    options::{TcpOptions, Timestamps},
    segment::{Flags, Segment},
    seq::SeqNum,
};

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
    /// The first segment seen was not a SYN (the engine started mid-flow).
    MidFlow,
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
        /// The TSval of its latest retransmission (the first is in
        /// `s_opts`): the client's ACK echoes one of them.
        s_ts_last: Option<u32>,
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

impl Negotiated {
    /// Whether the server would drop this client data segment (or FIN)
    /// while it has sent nothing past its SYN-ACK (its data ends the
    /// hold). The one ACK it takes then is its ISN + 1 (RFC 9293
    /// §3.10.7.4: without the ACK bit, or for data not sent, the segment
    /// is dropped); a timestamp older than the last it took fails PAWS
    /// (RFC 7323 §5), and with timestamps agreed a segment without one is
    /// dropped by some stacks (FreeBSD), though no client sends one; bytes
    /// past the window it offered are dropped too (RFC 9293 §3.10.7.4).
    /// A non-zero echo of a clock the server never sent is dropped by
    /// Linux while its handshake is not through (the segment that
    /// completes it, or data to a listener with TCP_DEFER_ACCEPT, which
    /// swallows the pure ACK); it does not check a zero one.
    fn refuses(&self, seg: &Segment) -> bool {
        let f = seg.flags;
        let paws = match (self.c_ts, self.s_ts, seg.options.timestamps) {
            (Some(last), Some(_), Some(t)) => SeqNum(t.val).lt(SeqNum(last)),
            (Some(_), Some(_), None) => true,
            _ => false,
        };
        // A client echoes one between the server's first (its SYN-ACK's)
        // and its last.
        let first = self.s_opts.timestamps.map(|t| t.val);
        let echo = match (self.c_ts, first, self.s_ts, seg.options.timestamps) {
            (Some(_), Some(lo), Some(hi), Some(t)) if t.ecr != 0 => {
                SeqNum(t.ecr).lt(SeqNum(lo)) || SeqNum(t.ecr).gt(SeqNum(hi))
            }
            _ => false,
        };
        let end = seg.seq + seg.seg_len(&seg.payload);
        let beyond = end.gt(self.c_isn + 1 + self.s_window);
        !f.ack || f.syn || seg.ack != self.s_isn + 1 || paws || echo || beyond
    }
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
    /// A client's SYN with data, FIN, URG or a TCP Fast Open option: it
    /// goes on without them ([`crate::wire::segment::Normalise::Syn`]),
    /// and the connection is tracked as any other.
    Strip,
    /// Client data in the hold that the server would refuse (no ACK
    /// flag, an ACK of something it never sent, a timestamp older than
    /// the last it took): neither held nor forwarded. Held, the engine
    /// would decide on bytes the server never reads once the connection
    /// is passed, and the client's next copy, on the fast path, could
    /// say anything.
    Drop,
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
    /// The client's SYN was seen, no SYN-ACK answering it yet.
    pub fn awaiting_synack(&self) -> bool {
        matches!(self.phase, Phase::Syn { .. })
    }

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

    /// The most the client sends in one segment, once established: the
    /// server's MSS (RFC 9293 §3.7.1: 536 without the option), no more
    /// than the client's own (its MTU bounds what it sends as what it
    /// receives) or the engine's links carry, less the timestamps option
    /// when both SYNs carried it (RFC 6691: the MSS counts no options).
    pub fn client_segment_size(&self) -> Option<u32> {
        match &self.phase {
            Phase::Hold(n) => {
                let mss = (n.s_opts.mss.unwrap_or(536))
                    .min(n.c_opts.mss.unwrap_or(536))
                    .min(self.cfg.mss_max);
                let ts = if n.c_ts.is_some() && n.s_ts.is_some() {
                    12
                } else {
                    0
                };
                Some(u32::from(mss).saturating_sub(ts).max(1))
            }
            _ => None,
        }
    }

    /// Whether a SYN announced a window shift above 14 and scaling is on:
    /// the halves use 14, and RFC 7323 §2.3 asks that the error be logged.
    pub fn window_shift_clamped(&self) -> bool {
        let Phase::Hold(n) = &self.phase else {
            return false;
        };
        let above = |o: &TcpOptions| o.window_scale.is_some_and(|s| s > 14);
        window_shifts(&n.c_opts, &n.s_opts).is_some() && (above(&n.c_opts) || above(&n.s_opts))
    }

    /// An ACK, as the server, of the client's first `acked` bytes: what the
    /// hold sends when a ClientHello is larger than the client may send
    /// unacknowledged (its initial window), so that the rest comes. It
    /// keeps the right edge of the window the server offered (the server
    /// has not seen a byte yet), carries the server's latest TSval and
    /// echoes `client_tsval`. `sack` are the held blocks above `acked`,
    /// sent only if both ends agreed to SACK (RFC 2018).
    pub fn hold_ack(
        &self,
        acked: u32,
        client_tsval: Option<u32>,
        sack: &[(SeqNum, SeqNum)],
    ) -> Option<Segment> {
        let Phase::Hold(n) = &self.phase else {
            return None;
        };
        let s_shift = window_shifts(&n.c_opts, &n.s_opts).map_or(0, |(_, s)| s);
        let window = (n.s_window.saturating_sub(acked) >> s_shift).min(u32::from(u16::MAX));
        let mut options = TcpOptions::default();
        if let (Some(val), Some(c)) = (n.s_ts, client_tsval.or(n.c_ts)) {
            options.timestamps = Some(Timestamps { val, ecr: c });
        }
        if n.c_opts.sack_permitted && n.s_opts.sack_permitted {
            options.sack = sack.to_vec();
        }
        Some(Segment {
            seq: n.s_isn + 1,
            ack: n.c_isn + 1 + acked,
            flags: Flags {
                ack: true,
                ..Flags::default()
            },
            window: window as u16,
            options,
            payload: Vec::new(),
        })
    }

    /// Looks at the next segment of the connection, in arrival order.
    pub fn on_segment(&mut self, dir: Dir, seg: &Segment) -> Track {
        let track = self.step(dir, seg);
        let f = seg.flags;
        // Data on a SYN may be taken by the server before any decision:
        // with a Fast Open cookie (RFC 7413), or queued until the
        // handshake is through (RFC 9293 §3.10.7.2 allows it). Passing
        // such connections let any client skip inspection with one option
        // or byte on its SYN. Stripped, the server answers a plain SYN and
        // the client sends its bytes again after the handshake, where they
        // are held.
        let odd = f.fin || f.urg || seg.options.fast_open || !seg.payload.is_empty();
        if track == Track::Forward && dir == Dir::Client && f.syn && !f.ack && odd {
            Track::Strip
        } else {
            track
        }
    }

    fn step(&mut self, dir: Dir, seg: &Segment) -> Track {
        let f = seg.flags;
        if f.rst {
            if matches!(self.phase, Phase::Hold(_)) {
                return Track::Pass(Passthrough::Reset);
            }
            // Before the handshake is through: forwarded, and the tracker
            // stays where it is. Were the attempt over, a new SYN starts
            // afresh anyway; were the RST one its receiver ignores (the
            // wrong sequence number), the connection goes on and must
            // still be held (an Idle tracker once passed it undecided).
            return Track::Forward;
        }
        match (&mut self.phase, dir) {
            (Phase::Idle, Dir::Client) if f.syn && !f.ack => {
                // Its options as the server sees them (stripped of Fast
                // Open, see `on_segment`).
                let mut opts = seg.options.clone();
                opts.fast_open = false;
                self.phase = Phase::Syn { isn: seg.seq, opts };
                Track::Forward
            }
            (Phase::Idle, _) => Track::Pass(Passthrough::MidFlow),
            // A retransmitted SYN.
            (Phase::Syn { isn, .. }, Dir::Client) if f.syn && !f.ack && seg.seq == *isn => {
                Track::Forward
            }
            //= https://www.rfc-editor.org/rfc/rfc5961#section-4.2
            //# If the SYN bit is set, irrespective of the sequence number, TCP
            //# MUST send an ACK (also referred to as challenge ACK) to the remote
            //# peer
            // The connection is established: the server answers a new SYN
            // with a challenge ACK and goes on, and so does the hold (once,
            // a forged SYN here restarted the tracker, and the data after
            // it went through undecided).
            (Phase::Hold(_), Dir::Client) if f.syn && !f.ack => Track::Forward,
            // A new SYN on the same ports (the earlier attempt was refused
            // or abandoned): start over.
            (Phase::Syn { .. } | Phase::SynAck { .. }, Dir::Client) if f.syn && !f.ack => {
                self.phase = Phase::Idle;
                self.on_segment(dir, seg)
            }
            // A SYN-ACK that does not answer the SYN (another ACK, data
            // or FIN on it) falls to the drop below.
            (Phase::Syn { isn, opts, .. }, Dir::Server)
                if f.syn && f.ack && seg.ack == *isn + 1 && seg.payload.is_empty() && !f.fin =>
            {
                self.phase = Phase::SynAck {
                    c_isn: *isn,
                    c_opts: opts.clone(),
                    s_isn: seg.seq,
                    s_opts: seg.options.clone(),
                    s_window: seg.window,
                    s_ts_last: seg.options.timestamps.map(|t| t.val),
                };
                Track::Forward
            }
            (
                Phase::SynAck {
                    s_isn, s_ts_last, ..
                },
                Dir::Server,
            ) if f.syn && f.ack && seg.seq == *s_isn && seg.payload.is_empty() && !f.fin => {
                // A retransmitted SYN-ACK.
                if let Some(t) = seg.options.timestamps {
                    *s_ts_last = Some(t.val);
                }
                Track::Forward
            }
            (
                Phase::SynAck {
                    c_isn,
                    c_opts,
                    s_isn,
                    s_opts,
                    s_window,
                    s_ts_last,
                },
                Dir::Client,
            ) if f.ack && seg.ack == *s_isn + 1 && seg.seq == *c_isn + 1 => {
                // The client's ACK window is scaled; the SYN-ACK's never is.
                let c_shift = window_shifts(c_opts, s_opts).map_or(0, |(c, _)| c);
                let mut n = Negotiated {
                    c_isn: *c_isn,
                    c_opts: c_opts.clone(),
                    s_isn: *s_isn,
                    s_opts: s_opts.clone(),
                    c_window: u32::from(seg.window) << c_shift,
                    s_window: u32::from(*s_window),
                    c_ts: c_opts.timestamps.map(|t| t.val),
                    s_ts: *s_ts_last,
                };
                let data = !seg.payload.is_empty() || f.fin;
                // The handshake's last segment, and any data on it: taken
                // only if the server would take it (which completes its
                // handshake), else dropped as it would be; the client sends
                // it again.
                if n.refuses(seg) {
                    return Track::Drop;
                }
                n.c_ts = seg.options.timestamps.map(|t| t.val).or(n.c_ts);
                self.phase = Phase::Hold(Box::new(n));
                if data {
                    Track::Hold
                } else {
                    Track::Forward
                }
            }
            (Phase::Hold(_), Dir::Server) if f.syn => Track::Forward, // SYN-ACK again
            // Data (or FIN): the client's is held, the server's forces the
            // decision; either goes to the halves later, which take its
            // window and timestamp then (taking them now would make the
            // replayed segments look old to PAWS).
            (Phase::Hold(n), Dir::Client) if !seg.payload.is_empty() || f.fin => {
                if n.refuses(seg) {
                    Track::Drop
                } else {
                    Track::Hold
                }
            }
            (Phase::Hold(_), Dir::Server) if !seg.payload.is_empty() || f.fin => Track::Decide,
            // Before the handshake is through, a segment that does not fit
            // it (an ACK of something else, the wrong sequence number, no
            // ACK bit, data before the handshake completes): its receiver
            // refuses it, or would read from it what the engine cannot
            // follow (Linux trims a segment that starts before the ISN + 1
            // and takes the rest). Such a segment once passed the whole
            // connection undecided. A real endpoint sends the one that fits.
            (Phase::Syn { .. } | Phase::SynAck { .. }, _) => Track::Drop,
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::wire::{options::Timestamps, segment::Flags};

    pub(crate) const SYN: Flags = Flags {
        fin: false,
        syn: true,
        rst: false,
        psh: false,
        ack: false,
        urg: false,
    };

    /// A bare segment.
    pub(crate) fn segment(seq: u32, ack: Option<u32>, flags: Flags, payload: &[u8]) -> Segment {
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

    pub(crate) fn syn_opts(ts: u32) -> TcpOptions {
        TcpOptions {
            mss: Some(1460),
            window_scale: Some(7),
            sack_permitted: true,
            timestamps: Some(Timestamps { val: ts, ecr: 0 }),
            ..TcpOptions::default()
        }
    }

    pub(crate) fn handshake(t: &mut Tracker) -> Track {
        handshake_between(t, syn_opts(50), syn_opts(70))
    }

    /// SYN, SYN-ACK (window 65535) and ACK (window 512) with these
    /// options; TSvals 50 and 70 when the options carry timestamps.
    fn handshake_between(t: &mut Tracker, c: TcpOptions, s: TcpOptions) -> Track {
        let mut syn = segment(1000, None, SYN, b"");
        syn.options = c;
        assert!(matches!(t.on_segment(Dir::Client, &syn), Track::Forward));
        let mut synack = segment(9000, Some(1001), SYN, b"");
        synack.options = s;
        synack.window = 65535; // never scaled in a SYN-ACK
        assert!(matches!(t.on_segment(Dir::Server, &synack), Track::Forward));
        let mut ack = segment(1001, Some(9001), Flags::default(), b"");
        ack.options.timestamps = Some(Timestamps { val: 51, ecr: 70 });
        t.on_segment(Dir::Client, &ack)
    }

    /// A server MSS beyond what the client's link or the engine's carry:
    /// the client cannot send segments that large, so the hold counts full
    /// segments by the smallest.
    #[test]
    fn the_clients_segment_size_is_clamped_to_the_link() {
        // Timestamps on both SYNs: 12 bytes of every segment are options.
        for (c_mss, mss_max, want) in [
            (9000, u16::MAX, 8948),
            (1460, u16::MAX, 1448),
            (9000, 1460, 1448),
        ] {
            let mut t = Tracker::new(ConnConfig {
                mss_max,
                ..ConnConfig::default()
            });
            let c = TcpOptions {
                mss: Some(c_mss),
                ..syn_opts(50)
            };
            let s = TcpOptions {
                mss: Some(8960),
                ..syn_opts(70)
            };
            assert_eq!(handshake_between(&mut t, c, s), Track::Forward);
            assert_eq!(t.client_segment_size(), Some(want), "{c_mss} {mss_max}");
        }
    }

    #[test]
    fn the_hold_acknowledges_as_the_server_with_the_servers_values() {
        let mut t = Tracker::new(ConnConfig::default());
        let c = TcpOptions {
            mss: Some(536),
            window_scale: Some(2),
            ..syn_opts(50)
        };
        let s = TcpOptions {
            mss: Some(1400),
            window_scale: Some(9),
            ..syn_opts(70)
        };
        assert_eq!(handshake_between(&mut t, c, s), Track::Forward);
        // The client sends segments no larger than either MSS (its own is
        // the smaller here), less the timestamps option.
        assert_eq!(t.client_segment_size(), Some(536 - 12));
        let ack = t.hold_ack(3000, Some(55), &[]).expect("established");
        // The right edge the server offered (65535, unscaled in its
        // SYN-ACK), in the units the client applies to the server's
        // windows: the server's shift.
        assert_eq!(ack.window, ((65535 - 3000) >> 9) as u16);
        assert_eq!((ack.seq, ack.ack), (SeqNum(9001), SeqNum(4001)));
        assert_eq!(
            ack.options.timestamps,
            Some(Timestamps { val: 70, ecr: 55 })
        );
    }

    /// The hold's ACK carries SACK blocks only where both SYNs allowed
    /// them.
    #[test]
    fn the_holds_sack_blocks_need_both_ends_to_permit_sack() {
        let blocks = [(SeqNum(2461), SeqNum(3921))];
        for (c_sack, s_sack) in [(true, true), (true, false), (false, true)] {
            let mut t = Tracker::new(ConnConfig::default());
            let c = TcpOptions {
                sack_permitted: c_sack,
                ..syn_opts(50)
            };
            let s = TcpOptions {
                sack_permitted: s_sack,
                ..syn_opts(70)
            };
            assert_eq!(handshake_between(&mut t, c, s), Track::Forward);
            let ack = t.hold_ack(0, None, &blocks).expect("established");
            assert_eq!(ack.ack, SeqNum(1001));
            let want: &[_] = if c_sack && s_sack { &blocks } else { &[] };
            assert_eq!(ack.options.sack, want, "{c_sack} {s_sack}");
        }
    }

    #[test]
    fn a_window_shift_above_14_is_flagged_only_when_scaling_is_on() {
        let shifts = |c: Option<u8>, s: Option<u8>| {
            let mut t = Tracker::new(ConnConfig::default());
            let c = TcpOptions {
                window_scale: c,
                ..syn_opts(50)
            };
            let s = TcpOptions {
                window_scale: s,
                ..syn_opts(70)
            };
            assert_eq!(handshake_between(&mut t, c, s), Track::Forward);
            t.window_shift_clamped()
        };
        assert!(shifts(Some(15), Some(3)));
        assert!(shifts(Some(3), Some(200)));
        assert!(!shifts(Some(14), Some(14)));
        // Without the server's option scaling is off: nothing was clamped.
        assert!(!shifts(Some(15), None));
    }

    #[test]
    fn fast_open_is_stripped_and_mid_flow_connections_pass_through() {
        let mut t = Tracker::new(ConnConfig::default());
        let mut syn = segment(1, None, SYN, b"data on syn");
        syn.options.fast_open = true;
        assert_eq!(t.on_segment(Dir::Client, &syn), Track::Strip);
        // Again, as the client resends it.
        assert_eq!(t.on_segment(Dir::Client, &syn), Track::Strip);
        let synack = segment(9000, Some(2), SYN, b"");
        assert_eq!(t.on_segment(Dir::Server, &synack), Track::Forward);
        let data = segment(2, Some(9001), Flags::default(), b"hello");
        assert_eq!(t.on_segment(Dir::Client, &data), Track::Hold);
        // A FIN or URG on a SYN, or a Fast Open cookie request alone.
        for (fin, urg, tfo) in [
            (true, false, false),
            (false, true, false),
            (false, false, true),
        ] {
            let mut t = Tracker::new(ConnConfig::default());
            let mut syn = segment(1, None, SYN, b"");
            syn.flags.fin = fin;
            syn.flags.urg = urg;
            syn.options.fast_open = tfo;
            assert_eq!(t.on_segment(Dir::Client, &syn), Track::Strip);
        }
        let mut t = Tracker::new(ConnConfig::default());
        let mid = segment(1, Some(2), Flags::default(), b"x");
        assert_eq!(
            t.on_segment(Dir::Client, &mid),
            Track::Pass(Passthrough::MidFlow)
        );
    }

    /// A SYN carrying data without the Fast Open option goes on without
    /// it, and is tracked like any SYN: its connection is held at its
    /// first bytes after the handshake. Passed through, one byte on a SYN
    /// would skip inspection.
    #[test]
    fn data_on_a_syn_without_fast_open_is_tracked() {
        let mut t = Tracker::new(ConnConfig::default());
        let syn = segment(1000, None, SYN, b"data on syn");
        assert_eq!(t.on_segment(Dir::Client, &syn), Track::Strip);
        let synack = segment(9000, Some(1001), SYN, b"");
        assert_eq!(t.on_segment(Dir::Server, &synack), Track::Forward);
        let data = segment(1001, Some(9001), Flags::default(), b"hello");
        assert_eq!(t.on_segment(Dir::Client, &data), Track::Hold);
        // A SYN-ACK of more than the SYN does not answer it: dropped, and
        // the connection is still tracked.
        let mut t = Tracker::new(ConnConfig::default());
        t.on_segment(Dir::Client, &syn);
        let took = segment(9000, Some(1012), SYN, b"");
        assert_eq!(t.on_segment(Dir::Server, &took), Track::Drop);
        assert_eq!(t.on_segment(Dir::Server, &synack), Track::Forward);
    }

    /// Once the handshake is through, a client SYN (forged, or a stack
    /// that lost its state) draws the server's challenge ACK and changes
    /// nothing: the data after it is still held. It used to restart the
    /// tracker, and that data went through undecided.
    #[test]
    fn a_syn_after_the_handshake_does_not_restart_the_hold() {
        let mut t = Tracker::new(ConnConfig::default());
        t.on_segment(Dir::Client, &segment(1000, None, SYN, b""));
        t.on_segment(Dir::Server, &segment(9000, Some(1001), SYN, b""));
        t.on_segment(
            Dir::Client,
            &segment(1001, Some(9001), Flags::default(), b""),
        );
        let forged = segment(77_000, None, SYN, b"");
        assert_eq!(t.on_segment(Dir::Client, &forged), Track::Forward);
        let data = segment(1001, Some(9001), Flags::default(), b"hello");
        assert_eq!(t.on_segment(Dir::Client, &data), Track::Hold);
        assert!(t.client_data_start().is_some());
    }

    #[test]
    fn a_synack_for_another_syn_is_dropped() {
        let mut t = Tracker::new(ConnConfig::default());
        let syn = segment(1000, None, SYN, b"");
        t.on_segment(Dir::Client, &syn);
        let synack = segment(9000, Some(5), SYN, b"");
        assert_eq!(t.on_segment(Dir::Server, &synack), Track::Drop);
    }

    /// Before the handshake is through, a segment that does not fit it is
    /// dropped and the handshake goes on; such a segment once passed the
    /// connection undecided (an outside probe: an ACK of unsent data, an
    /// old ACK, the ClientHello one byte before the ISN + 1, which Linux
    /// trims and takes).
    #[test]
    fn a_segment_that_does_not_fit_the_handshake_is_dropped() {
        let opened = || {
            let mut t = Tracker::new(ConnConfig::default());
            let mut syn = segment(1000, None, SYN, b"");
            syn.options = syn_opts(50);
            t.on_segment(Dir::Client, &syn);
            let mut synack = segment(9000, Some(1001), SYN, b"");
            synack.options = syn_opts(70);
            synack.options.timestamps = Some(Timestamps { val: 70, ecr: 50 });
            t.on_segment(Dir::Server, &synack);
            t
        };
        let third = |seq: u32, ack: u32, data: &[u8], ecr: u32| {
            let mut s = segment(seq, Some(ack), Flags::default(), data);
            s.options.timestamps = Some(Timestamps { val: 60, ecr });
            s
        };
        let misfits = [
            ("an ACK of unsent data", third(1001, 9011, b"", 70)),
            ("an old ACK", third(1001, 9000, b"", 70)),
            ("data before the ISN + 1", third(1000, 9001, b"xhello", 70)),
            ("data with another ACK", third(1001, 9002, b"hello", 70)),
            ("an echo of no SYN-ACK", third(1001, 9001, b"hello", 69)),
            (
                "no ACK bit",
                segment(1001, None, Flags::default(), b"hello"),
            ),
        ];
        for (what, s) in &misfits {
            let mut t = opened();
            assert_eq!(t.on_segment(Dir::Client, s), Track::Drop, "{what}");
            assert!(t.client_data_start().is_none(), "{what}");
            // The one that fits still completes it.
            let good = third(1001, 9001, b"hello", 70);
            assert_eq!(t.on_segment(Dir::Client, &good), Track::Hold, "{what}");
        }
        // Server data before the client's ACK.
        let mut t = opened();
        let early = segment(9001, Some(1001), Flags::default(), b"220 hi");
        assert_eq!(t.on_segment(Dir::Server, &early), Track::Drop);
        // A retransmitted SYN-ACK's clock is echoed too.
        let mut t = opened();
        let mut again = segment(9000, Some(1001), SYN, b"");
        again.options = syn_opts(90);
        again.options.timestamps = Some(Timestamps { val: 90, ecr: 50 });
        assert_eq!(t.on_segment(Dir::Server, &again), Track::Forward);
        assert_eq!(
            t.on_segment(Dir::Client, &third(1001, 9001, b"x", 90)),
            Track::Hold
        );
    }
}
