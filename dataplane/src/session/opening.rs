//! A connection taken up from the handshake the XDP program recorded.
//!
//! With the handshake fast path on (`ebpf/xdp`), a steered connection's
//! SYN, SYN-ACK and the client's ACK are forwarded in the kernel and
//! recorded whole; the first frame the worker gets is its first data (or a
//! FIN, a RST, a retransmitted SYN-ACK). The worker reads the record then
//! and feeds those frames to a new tracker, without forwarding them again, so the
//! connection is held and decided as if they had come through here: the
//! same options, sequence numbers and frame templates. A record whose
//! frames do not parse or do not belong to the connection is not used,
//! nor is one made before the sessions began (until the first policy the
//! worker forwards steered frames unwatched, so such a connection may be
//! well under way): the connection is then met as one already running.

use std::time::{Duration, Instant};

use loupe_common::FlowKey;

use super::{Entry, Sessions, Side};
use crate::{
    flow::FlowId,
    wire::{
        segment::{parse_segment, Parsed, Segment},
        seq::SeqNum,
    },
};

/// Where the worker reads the records (the XDP program's `HANDSHAKES`
/// map; a table in tests).
pub trait HandshakeRecords: Send + Sync + std::fmt::Debug {
    /// The record of the connection a frame with `key` belongs to,
    /// whichever way the frame went.
    fn lookup(&self, key: &FlowKey) -> Option<Recorded>;
}

/// One connection's recorded opening.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recorded {
    /// The frame asking went the SYN's way (the record is keyed by the
    /// frame's own key), not the SYN-ACK's.
    pub from_client: bool,
    /// The side the SYN came in on.
    pub client: Side,
    /// A frame of the connection was steered already (the one asking, or
    /// one the worker took the connection up at before).
    pub steered: bool,
    /// The SYN frame, whole.
    pub syn: Vec<u8>,
    /// The server's SYN-ACK, whole, once it came.
    pub synack: Option<Vec<u8>>,
    /// The client's last pure ACK after the SYN-ACK, whole.
    pub ack: Option<Vec<u8>>,
    /// How long ago the SYN was recorded.
    pub age: Duration,
}

/// A record checked against the frame that asked for it.
pub(super) struct Adoption {
    /// The side the SYN came from.
    pub(super) client: Side,
    pub(super) opened: Instant,
    pub(super) syn: Parsed,
    pub(super) syn_frame: Vec<u8>,
    pub(super) synack: Option<(Parsed, Vec<u8>)>,
    pub(super) ack: Option<(Parsed, Vec<u8>)>,
}

/// `frame` parsed, if it is a segment of `key` with exactly the SYN and
/// ACK flags asked for and no payload.
fn handshake_segment(frame: &[u8], key: &FlowKey, syn: bool, ack: bool) -> Option<Parsed> {
    let parsed = parse_segment(frame).ok()?;
    let f = parsed.segment.flags;
    (parsed.key == *key
        && f.syn == syn
        && f.ack == ack
        && !f.rst
        && !f.fin
        && !f.urg
        && parsed.segment.payload.is_empty())
    .then_some(parsed)
}

impl Sessions {
    /// The recorded opening of the connection a frame with `key` and
    /// segment `seg` belongs to, checked: `None` without a record or with
    /// one that does not fit (counted).
    pub(super) fn recorded(
        &mut self,
        key: &FlowKey,
        seg: &Segment,
        now: Instant,
    ) -> Option<Adoption> {
        let records = self.settings.handshakes.as_ref()?;
        let rec = records.lookup(key)?;
        // A SYN is steered without marking the record: one whose record
        // is marked belongs to a connection the worker had (it gets the
        // SYN as the start of a new one), one whose record is not came
        // from the wrong side and is judged against the recorded opening.
        if seg.flags.syn && !seg.flags.ack && rec.steered {
            return None;
        }
        let opened = now.checked_sub(rec.age).unwrap_or(now);
        if opened < self.created {
            // Its frames went by unwatched (before the first policy).
            self.counters.handshakes_before += 1;
            return None;
        }
        // The client is where its SYN came in, whatever side this frame
        // did (one from the wrong side is the tracker's to judge).
        let client = rec.client;
        let syn_key = if rec.from_client {
            *key
        } else {
            key.reversed()
        };
        // Each frame must be what the program took it for, of this
        // connection; the ACK only after a SYN-ACK.
        let checked = |frame: Option<Vec<u8>>, key: &FlowKey, syn: bool| match frame {
            Some(f) => handshake_segment(&f, key, syn, true)
                .map(|p| Some((p, f)))
                .ok_or(()),
            None => Ok(None),
        };
        let parts = (
            handshake_segment(&rec.syn, &syn_key, true, false),
            checked(rec.synack, &syn_key.reversed(), true),
            // An ACK that does not parse (a bad checksum: the server
            // dropped it too) is left out; the client's next segment
            // carries the acknowledgment again.
            checked(rec.ack, &syn_key, false).unwrap_or(None),
        );
        let (Some(syn), Ok(synack), ack) = parts else {
            self.counters.handshakes_unusable += 1;
            return None;
        };
        // The frame must be one of the connection's first (its sender's
        // sequence number at most the hold's bound past its ISN; a
        // keepalive probe sits one below): a record outlives what the
        // worker kept of its connection, and one taken up mid-stream
        // would hold for bytes long through.
        let bound = u32::try_from(self.settings.hold_bytes).unwrap_or(u32::MAX);
        let near = |isn: SeqNum| seg.seq.0.wrapping_sub(isn.0) <= bound.saturating_add(1);
        let fresh = seg.flags.syn
            || if rec.from_client {
                near(syn.segment.seq)
            } else {
                synack.as_ref().is_some_and(|(p, _)| near(p.segment.seq))
            };
        if !fresh || (ack.is_some() && synack.is_none()) {
            self.counters.handshakes_unusable += 1;
            return None;
        }
        self.counters.handshakes_adopted += 1;
        Some(Adoption {
            client,
            opened,
            syn,
            syn_frame: rec.syn,
            synack,
            ack,
        })
    }

    /// Whether the flow `id` has an entry left from an earlier connection
    /// (passed through or ended) and a handshake was recorded on its ports
    /// after the last frame the entry saw: a client reusing its port (as
    /// one that closed second does at once) meets the old entry otherwise,
    /// which forwards or drops its frames undecided.
    pub(super) fn newer_connection(&self, id: FlowId, key: &FlowKey, now: Instant) -> bool {
        let Some(records) = &self.settings.handshakes else {
            return false;
        };
        let Some(last_seen) = self.flows.get(&id).and_then(|f| match f.entry {
            Entry::Passthrough(_) | Entry::Releasing(_) | Entry::Ended { .. } | Entry::Closed => {
                Some(f.last_seen)
            }
            Entry::Tracking(_) | Entry::Split { .. } => None,
        }) else {
            return false;
        };
        records
            .lookup(key)
            .is_some_and(|r| now.checked_sub(r.age).is_some_and(|syn| syn > last_seen))
    }

    /// Feeds a new tracker the recorded SYN, SYN-ACK and ACK. They were
    /// forwarded in the kernel already: what the tracker makes of them
    /// (forward) is not done again.
    pub(super) fn replay(&mut self, id: FlowId, a: Adoption, now: Instant) {
        // The recorded frames went on already: nothing tracking them would
        // send (a SYN's Fast Open cookie request stripped) goes again.
        let sent = self.out.len();
        let counted = (self.counters.syn_stripped, self.counters.urgent_cleared);
        let _ = self.track(id, a.client, &a.syn_frame, a.syn, now);
        if let Some((synack, frame)) = a.synack {
            let _ = self.track(id, a.client.other(), &frame, synack, now);
        }
        if let Some((ack, frame)) = a.ack {
            let _ = self.track(id, a.client, &frame, ack, now);
        }
        self.out.truncate(sent);
        (self.counters.syn_stripped, self.counters.urgent_cleared) = counted;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::{
        flow::MapOp,
        session::{
            tests::{seg, Peers, C_ISN, S_ISN},
            Disposition, SessionSettings,
        },
        stats::SplitCounters,
        tcp::split::Dir,
        tls::hello::tests::client_hello,
        wire::segment::{parse_segment, tests::with_tcp_option},
    };

    /// Records as the XDP program keeps them: keyed by the SYN's key.
    #[derive(Debug, Default)]
    struct Table(Mutex<Vec<(FlowKey, Recorded)>>);

    impl HandshakeRecords for Table {
        fn lookup(&self, key: &FlowKey) -> Option<Recorded> {
            let t = self.0.lock().unwrap();
            let (k, r) = t.iter().find(|(k, _)| k == key || *k == key.reversed())?;
            Some(Recorded {
                from_client: k == key,
                ..r.clone()
            })
        }
    }

    /// What sessions did with a frame, and the frames they sent.
    type Outcome = (Disposition, Vec<(Side, Vec<u8>)>);

    /// A connection's handshake frames, and sessions that either saw them
    /// (`seen`) or have them only as a record (`recorded`).
    struct Pair {
        peers: Peers,
        seen: Sessions,
        recorded: Sessions,
        table: Arc<Table>,
        /// The SYN, the SYN-ACK and the client's ACK.
        handshake: [Vec<u8>; 3],
        now: Instant,
    }

    impl Pair {
        fn new() -> Pair {
            let table = Arc::new(Table::default());
            // A connection met as running is passed (not reset, as by
            // default), so that what is taken up and what is not shows.
            let settings = SessionSettings {
                handshakes: Some(table.clone()),
                mid_flow: crate::session::MidFlow::Pass,
                ..SessionSettings::default()
            };
            let peers = Peers::new();
            let syn = peers.frame(Dir::Client, &seg(C_ISN, 0, true, b""));
            let synack = peers.frame(Dir::Server, &seg(S_ISN, C_ISN + 1, true, b""));
            let ack = peers.frame(Dir::Client, &seg(C_ISN + 1, S_ISN + 1, false, b""));
            let mut seen = Sessions::new(SessionSettings::default());
            let recorded = Sessions::new(settings);
            // The SYNs on record (5 ms old) came after the sessions began.
            let now = Instant::now() + Duration::from_millis(50);
            for (side, f) in [
                (Side::Inside, &syn),
                (Side::Outside, &synack),
                (Side::Inside, &ack),
            ] {
                assert_eq!(seen.on_frame(side, f, now), Disposition::Forward);
            }
            Pair {
                peers,
                seen,
                recorded,
                table,
                handshake: [syn, synack, ack],
                now,
            }
        }

        /// Records the first `frames` of the handshake, with `spoil` done
        /// to the SYN.
        fn record(&self, frames: usize, spoil: impl FnOnce(&mut Vec<u8>)) {
            let [syn, synack, ack] = &self.handshake;
            let key = parse_segment(syn).unwrap().key;
            let mut syn = syn.clone();
            spoil(&mut syn);
            let r = Recorded {
                from_client: true,
                client: Side::Inside,
                steered: false,
                syn,
                synack: (frames >= 2).then(|| synack.clone()),
                ack: (frames >= 3).then(|| ack.clone()),
                age: Duration::from_millis(5),
            };
            self.table.0.lock().unwrap().push((key, r));
        }

        /// A ClientHello to the sessions with the record only, which must
        /// forward it as a frame of a connection already running.
        fn hello_to_recorded_only(&mut self) {
            let hello = client_hello("shop.example", &[]);
            let s = seg(C_ISN + 1, S_ISN + 1, false, &hello);
            let f = self.peers.frame(Dir::Client, &s);
            let d = self.recorded.on_frame(Side::Inside, &f, self.now);
            assert_eq!(d, Disposition::Forward);
        }

        /// `s` from `from` to both sessions: what each did with it, and
        /// what each sent.
        fn both(&mut self, from: Dir, s: &Segment) -> [Outcome; 2] {
            let side = match from {
                Dir::Client => Side::Inside,
                Dir::Server => Side::Outside,
            };
            let f = self.peers.frame(from, s);
            let run = |sp: &mut Sessions| {
                let d = sp.on_frame(side, &f, self.now);
                (d, sp.out.drain().collect::<Vec<_>>())
            };
            [run(&mut self.seen), run(&mut self.recorded)]
        }
    }

    /// The counters without how long decisions took (the clock's doing).
    fn same_but_timing(c: &SplitCounters) -> SplitCounters {
        SplitCounters {
            decision_us: Default::default(),
            ..*c
        }
    }

    /// A connection whose SYN and SYN-ACK took the fast path is held,
    /// decided and split from its record exactly as one whose handshake
    /// came through: the same frames out, byte for byte, both ways.
    #[test]
    fn a_connection_is_taken_up_from_its_recorded_handshake_as_if_seen() {
        let mut p = Pair::new();
        p.record(3, |_| ());
        let hello = client_hello("shop.example", &[b"h2"]);
        let (first, rest) = hello.split_at(100);
        let [a, b] = p.both(Dir::Client, &seg(C_ISN + 1, S_ISN + 1, false, first));
        assert_eq!(a, b, "the held first segment");
        assert_eq!(a.0, Disposition::Consumed);
        let [a, b] = p.both(Dir::Client, &seg(C_ISN + 101, S_ISN + 1, false, rest));
        assert_eq!(a, b, "the rest: decided, split, relayed");
        assert!(!a.1.is_empty());
        let [a, b] = p.both(
            Dir::Server,
            &seg(
                S_ISN + 1,
                C_ISN + 1 + hello.len() as u32,
                false,
                b"server hello",
            ),
        );
        assert_eq!(a, b, "the server's answer");
        assert_eq!(p.seen.counters.split, 1);
        assert_eq!(
            same_but_timing(&p.recorded.counters),
            SplitCounters {
                handshakes_adopted: 1,
                ..same_but_timing(&p.seen.counters)
            }
        );
        assert_eq!(p.recorded.ops, p.seen.ops);
    }

    /// A recorded SYN with a Fast Open cookie request (the XDP program
    /// takes any SYN without data) went on already: taken up, it is not
    /// sent again stripped, and the connection is held and split.
    #[test]
    fn a_recorded_fast_open_syn_is_not_sent_again() {
        let mut p = Pair::new();
        let syn = p.peers.frame(Dir::Client, &seg(C_ISN, 0, true, b""));
        // A cookie request: the option without a cookie.
        let tfo = with_tcp_option(&syn, &[34, 2]);
        assert!(parse_segment(&tfo).unwrap().segment.options.fast_open);
        p.record(3, |f| *f = tfo);
        let hello = client_hello("shop.example", &[]);
        let [_, (d, out)] = p.both(Dir::Client, &seg(C_ISN + 1, S_ISN + 1, false, &hello));
        assert_eq!(d, Disposition::Consumed);
        assert!(out
            .iter()
            .all(|(_, f)| !parse_segment(f).unwrap().segment.flags.syn));
        let c = &p.recorded.counters;
        assert_eq!((c.handshakes_adopted, c.split, c.passthrough), (1, 1, 0));
        assert_eq!(c.syn_stripped, 0, "nothing was stripped");
    }

    /// The server may speak first (or its retransmitted SYN-ACK may be
    /// the first frame steered): the record is found by the reversed key
    /// and the client is on the other side.
    #[test]
    fn a_first_frame_from_the_server_finds_the_record_too() {
        let mut p = Pair::new();
        p.record(3, |_| ());
        let [a, b] = p.both(
            Dir::Server,
            &seg(S_ISN + 1, C_ISN + 1, false, b"220 smtp ready"),
        );
        assert_eq!(a, b);
        assert_eq!(
            (
                p.recorded.counters.server_first,
                p.recorded.counters.handshakes_adopted
            ),
            (1, 1)
        );
        assert_eq!(
            same_but_timing(&p.recorded.counters),
            SplitCounters {
                handshakes_adopted: 1,
                ..same_but_timing(&p.seen.counters)
            }
        );
    }

    /// Without the client's ACK on record (its first data completes the
    /// handshake), the connection is held and split all the same.
    #[test]
    fn a_record_without_the_clients_ack_is_taken_up_at_its_first_data() {
        let mut p = Pair::new();
        p.record(2, |_| ());
        let hello = client_hello("shop.example", &[]);
        let [a, b] = p.both(Dir::Client, &seg(C_ISN + 1, S_ISN + 1, false, &hello));
        assert_eq!(a, b);
        assert_eq!(
            (
                p.recorded.counters.split,
                p.recorded.counters.handshakes_adopted
            ),
            (1, 1)
        );
    }

    /// A record of the SYN alone (its SYN-ACK was steered: it did not
    /// acknowledge the SYN, or came twice) is taken up with the SYN, and
    /// the steered SYN-ACK goes to the tracker as it would have.
    #[test]
    fn a_record_of_the_syn_alone_is_taken_up_with_the_steered_synack() {
        let mut p = Pair::new();
        p.record(1, |_| ());
        let synack = p.handshake[1].clone();
        assert_eq!(
            p.recorded.on_frame(Side::Outside, &synack, p.now),
            Disposition::Forward
        );
        let hello = client_hello("shop.example", &[]);
        let [a, b] = p.both(Dir::Client, &seg(C_ISN + 1, S_ISN + 1, false, &hello));
        assert_eq!(a, b);
        assert_eq!(p.recorded.counters.split, 1);
    }

    /// A record whose frame does not parse (here a SYN with a bad
    /// checksum) is not used, and counted: the connection is met as one
    /// already running, as without a record.
    #[test]
    fn an_unusable_record_is_counted_and_not_used() {
        let mut p = Pair::new();
        p.record(3, |syn| syn[50] ^= 0x01);
        p.hello_to_recorded_only();
        let c = &p.recorded.counters;
        assert_eq!(
            (
                c.handshakes_unusable,
                c.handshakes_adopted,
                c.split,
                c.passthrough
            ),
            (1, 0, 0, 1)
        );
        assert!(
            matches!(p.recorded.ops[..], [MapOp::Bypass(_)]),
            "{:?}",
            p.recorded.ops
        );
    }

    /// A connection whose handshake was recorded before the sessions began
    /// ran on unwatched (until the first policy the worker forwards
    /// steered frames as they are): it is met as one already running, not
    /// taken up from a handshake whose first bytes may be through.
    #[test]
    fn a_record_older_than_the_sessions_is_not_taken_up() {
        let mut p = Pair::new();
        p.record(3, |_| ());
        p.now = p.recorded.created - Duration::from_millis(1) + Duration::from_millis(5);
        p.hello_to_recorded_only();
        let c = &p.recorded.counters;
        assert_eq!(
            (c.handshakes_before, c.handshakes_adopted, c.passthrough),
            (1, 0, 1)
        );
    }

    /// A record outlives what the worker kept of its connection: a frame
    /// far into the stream (the worker forgot the connection, idle) is not
    /// taken up from it, as a hold from the first byte would wait for
    /// bytes long through. A keepalive probe before any data (one below
    /// the first byte) is.
    #[test]
    fn a_frame_far_into_the_stream_is_not_taken_up_from_the_record() {
        let mut p = Pair::new();
        p.record(3, |_| ());
        let late = seg(C_ISN + 1 + (1 << 20), S_ISN + 1, false, b"late bytes");
        let f = p.peers.frame(Dir::Client, &late);
        assert_eq!(
            p.recorded.on_frame(Side::Inside, &f, p.now),
            Disposition::Forward
        );
        let c = &p.recorded.counters;
        assert_eq!(
            (c.handshakes_unusable, c.handshakes_adopted, c.passthrough),
            (1, 0, 1)
        );

        let mut p = Pair::new();
        p.record(3, |_| ());
        let probe = seg(C_ISN, S_ISN + 1, false, b"");
        let [a, b] = p.both(Dir::Client, &probe);
        assert_eq!(
            a, b,
            "the probe, as a tracker that saw the handshake takes it"
        );
        assert_eq!(p.recorded.counters.handshakes_adopted, 1);
    }

    /// The client's last ACK on record with a bad checksum (the server
    /// dropped it too) is left out: the connection is taken up from the
    /// SYN and SYN-ACK, and its first data completes the handshake.
    #[test]
    fn a_corrupt_ack_on_record_is_left_out() {
        let mut p = Pair::new();
        p.record(3, |_| ());
        p.table.0.lock().unwrap()[0].1.ack.as_mut().unwrap()[40] ^= 0x10;
        let hello = client_hello("shop.example", &[]);
        let [a, b] = p.both(Dir::Client, &seg(C_ISN + 1, S_ISN + 1, false, &hello));
        assert_eq!(a, b);
        let c = &p.recorded.counters;
        assert_eq!(
            (c.handshakes_adopted, c.handshakes_unusable, c.split),
            (1, 0, 1)
        );
    }

    /// A SYN from the server's side with the client's addresses (forged)
    /// before the connection's first data: judged against the recorded
    /// opening (the worker would otherwise take it for the client's SYN,
    /// the ends swapped), so the client's data after it is still held.
    #[test]
    fn a_syn_from_the_wrong_side_is_judged_against_the_record() {
        let mut p = Pair::new();
        p.record(3, |_| ());
        let forged = p.peers.frame(Dir::Client, &seg(77_000, 0, true, b""));
        let d = p.recorded.on_frame(Side::Outside, &forged, p.now);
        assert_eq!(d, Disposition::Forward);
        assert_eq!(p.recorded.counters.handshakes_adopted, 1);
        let hello = client_hello("shop.example", &[]);
        let [a, b] = p.both(Dir::Client, &seg(C_ISN + 1, S_ISN + 1, false, &hello));
        assert_eq!(a, b, "held and split as if the forged SYN never came");
        assert_eq!(p.recorded.counters.split, 1);
    }

    /// A client reusing its port after the engine forgot nothing of the
    /// old connection (an entry passed through, or ended): the new
    /// connection's SYN took the fast path, so its first data meets the
    /// old entry; the newer record retires it and the new connection is
    /// held and decided.
    #[test]
    fn a_new_connection_on_the_ports_of_an_old_entry_is_taken_up() {
        let mut p = Pair::new();
        p.hello_to_recorded_only();
        assert_eq!(p.recorded.counters.passthrough, 1, "the old connection");
        p.record(3, |_| ());
        p.now += Duration::from_millis(10);
        let hello = client_hello("shop.example", &[]);
        let f = p
            .peers
            .frame(Dir::Client, &seg(C_ISN + 1, S_ISN + 1, false, &hello));
        assert_eq!(
            p.recorded.on_frame(Side::Inside, &f, p.now),
            Disposition::Consumed
        );
        let c = &p.recorded.counters;
        assert_eq!((c.handshakes_adopted, c.split), (1, 1));
    }

    /// Without records (or without one for this connection), nothing
    /// changes: a frame of a connection never seen is met as running.
    #[test]
    fn without_a_record_a_connection_is_met_as_running() {
        let mut p = Pair::new();
        p.hello_to_recorded_only();
        assert_eq!(
            (
                p.recorded.counters.handshakes_adopted,
                p.recorded.counters.passthrough
            ),
            (0, 1)
        );
    }
}
