//! The hold before a decision: a connection's handshake watched, then the
//! client's first bytes kept (neither forwarded nor acknowledged) until
//! they make a decision point or reach a bound.

use super::*;

/// Held frames of one connection beyond this count are a bound too (tiny
/// segments would otherwise cost a frame buffer each).
pub(super) const MAX_HELD_FRAMES: usize = 64;

/// A connection's client bytes held until the decision.
pub(super) struct Held {
    /// The frames as they arrived (released unchanged on a pass).
    pub(super) frames: Vec<Vec<u8>>,
    /// Their bytes in order, fed to the scanner.
    pub(super) stream: Reassembler,
    pub(super) scanner: HelloScanner,
    pub(super) deadline: Instant,
    pub(super) fin: bool,
    /// Where the client's FIN is (it closes the hold only once every byte
    /// before it arrived).
    pub(super) fin_at: Option<SeqNum>,
    /// The bytes read in order so far: what a pass decides on (the server
    /// must read no other; see `Releasing`).
    pub(super) decided: Vec<u8>,
    /// Bytes acknowledged to the client as the server (a ClientHello
    /// larger than the client's initial window).
    pub(super) acked: u32,
    /// Client bytes held (the highest offset seen).
    pub(super) bytes: u64,
    /// The oldest TSval among the held segments (the client-facing half
    /// starts TS.Recent there, so PAWS takes their replay).
    pub(super) oldest_tsval: Option<u32>,
    /// A byte came twice, differently (counted once).
    pub(super) conflict: bool,
    /// The TSval of the last frame held.
    pub(super) last_tsval: Option<u32>,
    /// Why the server might reassemble the held frames otherwise than the
    /// hold did (two versions of a byte, a TTL that may expire on the
    /// way, a clock running backwards): such a hold is relayed, never
    /// passed.
    pub(super) unlike: Option<&'static str>,
}

impl Held {
    /// Bytes read in order so far.
    pub(super) fn read(&self) -> u32 {
        self.decided.len() as u32
    }
}

/// A connection before its decision.
pub(super) struct Tracking {
    pub(super) tracker: Tracker,
    /// The side the SYN came from.
    pub(super) client: Side,
    pub(super) templates: [Option<Template>; 2],
    pub(super) hold: Option<Box<Held>>,
    pub(super) key: FlowKey,
    /// When the SYN was seen.
    pub(super) opened: Instant,
    /// The SYN came on the ports of a passed connection: what was decided
    /// of it, should the server show that connection is still there (see
    /// `Sessions::not_reopened`).
    pub(super) passed_before: Option<Option<Box<Meta>>>,
}

impl Tracking {
    /// The connection as the rules see it.
    pub(super) fn subject<'a>(&self, sni: Option<&'a str>) -> Subject<'a> {
        Subject {
            client: self.key.src,
            server: self.key.dst,
            server_port: self.key.dst_port,
            sni,
        }
    }

    /// Passing would not do: the hold acknowledged client bytes as the
    /// server (the client will not send them again), or its frames are
    /// not the bytes decided on. Relayed instead (see
    /// `Sessions::pass_or_relay`).
    pub(super) fn must_relay(&self) -> bool {
        self.hold
            .as_ref()
            .is_some_and(|h| h.acked > 0 || h.unlike.is_some())
    }

    /// What the log and listings keep of a decision.
    pub(super) fn meta(&self, policy: &Policy, d: &Decision, sni: Option<&str>) -> Box<Meta> {
        Box::new(Meta {
            action: Some(d.action),
            rule: policy.rule_name(d).to_string(),
            sni: sni.map(Into::into),
            alpn: Vec::new(),
            key: self.key,
            conn: conn_id(),
            opened: self.opened,
            policy_version: policy.version,
            held_bytes: self.hold.as_ref().map_or(0, |h| h.bytes),
            sni_malformed: self.hold.as_ref().and_then(|h| h.scanner.sni_malformed()),
            note: None,
            logged: false,
        })
    }
}

/// Why a connection is decided without a decision point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum NoDecision {
    /// No complete ClientHello (or other first bytes) within the hold time.
    Timeout,
    /// More held than the bound (bytes or frames).
    Overflow,
    /// Forgotten to make room while held.
    Evicted,
    /// The client closed before its ClientHello was complete.
    ClosedEarly,
    /// Cannot be split: its handshake was not seen.
    Unsplittable,
    /// A TLS handshake record whose ClientHello does not parse.
    Malformed,
}

impl NoDecision {
    pub(super) fn label(self) -> &'static str {
        match self {
            NoDecision::Timeout => "hold-timeout",
            NoDecision::Overflow => "hold-overflow",
            NoDecision::Evicted => "evicted",
            NoDecision::ClosedEarly => "closed-early",
            NoDecision::Unsplittable => "passthrough",
            NoDecision::Malformed => "malformed-hello",
        }
    }

    pub(super) fn note(self) -> &'static str {
        match self {
            NoDecision::Timeout => {
                "no complete ClientHello within the hold time: decided without the server name"
            }
            NoDecision::Overflow => {
                "more held than the hold bound: decided without the server name"
            }
            NoDecision::Evicted => "evicted while held: decided without the server name",
            NoDecision::ClosedEarly => {
                "the client closed before its ClientHello was complete: decided without the \
                 server name"
            }
            NoDecision::Unsplittable => {
                "not splittable (its handshake was not seen): decided without the server name"
            }
            NoDecision::Malformed => {
                "a malformed ClientHello (the TLS parser refused it): decided without the \
                 server name; not decrypted"
            }
        }
    }
}

impl Sessions {
    pub(super) fn track(
        &mut self,
        id: FlowId,
        side: Side,
        frame: &[u8],
        p: Parsed,
        now: Instant,
    ) -> Disposition {
        let Some(t) = tracking(&mut self.flows, id) else {
            return Disposition::Forward;
        };
        t.templates[side.index()].get_or_insert_with(|| p.template(frame));
        let f = p.segment.flags;
        if dir_from(side, t.client) == Dir::Server
            && t.tracker.awaiting_synack()
            && f.ack
            && !f.syn
            && !f.rst
        {
            return self.not_reopened(id, side, frame, &p, now);
        }
        let was_open = t.tracker.client_data_start().is_some();
        let track = t.tracker.on_segment(dir_from(side, t.client), &p.segment);
        // A frame that did not come as the handshake's did may not reach
        // the server, or be read otherwise there: a TTL (hop limit) set
        // to expire on the way, another VLAN, IPv4 options or IPv6
        // extension headers (a source route, an option the server does
        // not know). Passed, the server would not see these bytes as the
        // hold did. So may TCP options the engine does not know (TCP-MD5,
        // TCP-AO: a server without the key drops them).
        let like = t.templates[side.index()]
            .as_ref()
            .is_some_and(|tpl| p.came_like(tpl, frame));
        let odd = !like || p.segment.options.unknown > 0;
        // URG from the client before the decision: cleared, so the server
        // reads every byte in line as the hold does (see
        // `Normalise::Urgent`); once split, the halves relay it so.
        let urgent = dir_from(side, t.client) == Dir::Client && p.segment.flags.urg;
        let open = t.tracker.client_data_start().is_some();
        if t.hold.is_some() && !open {
            // A new SYN on these ports: the held attempt was abandoned.
            t.hold = None;
        }
        if open != was_open {
            // Handshake complete (or restarted): it moves between the
            // eviction classes.
            let since = self.next_since(id, if open { SETTLED } else { EMBRYONIC });
            if let Some(f) = self.flows.get_mut(&id) {
                f.since = since;
            }
        }
        match track {
            Track::Forward if urgent => self.normalise(side, frame, Normalise::Urgent),
            Track::Forward => Disposition::Forward,
            Track::Strip => self.normalise(side, frame, Normalise::Syn),
            // A RST in the hold counts as a pass only if it ends the
            // connection (counted there; it was counted twice, and a
            // forged one dropped counted once).
            Track::Pass(Passthrough::Reset) => self.reset_in_hold(id, side, frame, &p.segment),
            Track::Pass(_) => {
                self.counters.passthrough += 1;
                self.undecided(id, NoDecision::Unsplittable, now)
            }
            Track::Hold if urgent => match self.normalised_counted(frame, Normalise::Urgent) {
                Some(f) => self.hold(id, &f, &p.segment, odd, now),
                None => Disposition::Consumed,
            },
            Track::Hold => self.hold(id, frame, &p.segment, odd, now),
            Track::Drop => {
                self.counters.hold_refused += 1;
                Disposition::Consumed
            }
            Track::Decide => {
                self.counters.server_first += 1;
                self.decide(id, &Opening::ServerFirst, Some(p.segment), now)
            }
        }
    }

    /// `frame` without what `how` names, counted (a moved RST is not: its
    /// end of the connection is).
    fn normalised_counted(&mut self, frame: &[u8], how: Normalise) -> Option<Vec<u8>> {
        let f = normalised(frame, how)?;
        match how {
            Normalise::Syn => self.counters.syn_stripped += 1,
            Normalise::Urgent => self.counters.urgent_cleared += 1,
            Normalise::ResetAt(_) => {}
        }
        Some(f)
    }

    /// Sends a client's frame on toward the server without what `how`
    /// names.
    fn normalise(&mut self, from: Side, frame: &[u8], how: Normalise) -> Disposition {
        if let Some(f) = self.normalised_counted(frame, how) {
            self.out.push((from.other(), f));
        }
        Disposition::Consumed
    }

    /// Holds a client frame until the decision; decides once the held
    /// bytes make a decision point, or releases them at the bound.
    pub(super) fn hold(
        &mut self,
        id: FlowId,
        frame: &[u8],
        seg: &Segment,
        odd: bool,
        now: Instant,
    ) -> Disposition {
        let Some(t) = tracking(&mut self.flows, id) else {
            return Disposition::Forward;
        };
        let Some(start) = t.tracker.client_data_start() else {
            return Disposition::Forward;
        };
        let held = t.hold.get_or_insert_with(|| {
            self.counters.held += 1;
            let deadline = now + self.settings.hold_timeout;
            self.timers.push(Reverse((deadline, id)));
            Box::new(Held {
                frames: Vec::new(),
                stream: Reassembler::new(start, self.settings.hold_bytes, 0),
                scanner: HelloScanner::default(),
                deadline,
                fin: false,
                fin_at: None,
                decided: Vec::new(),
                acked: 0,
                bytes: 0,
                oldest_tsval: None,
                last_tsval: None,
                conflict: false,
                unlike: None,
            })
        });
        let end = i64::from(seg.seq.since(start)) + seg.payload.len() as i64;
        let ins = held.stream.insert(seg.seq, &seg.payload);
        let fin_news = seg.flags.fin && !held.fin;
        if ins.conflict > 0 && !held.conflict {
            held.conflict = true;
            self.counters.hold_conflicts += 1;
        }
        // A second FIN elsewhere: the end of the stream is in dispute.
        let fin_moved = seg.flags.fin
            && held
                .fin_at
                .is_some_and(|f| f != seg.seq + seg.payload.len() as u32);
        if held.unlike.is_none() {
            if ins.conflict > 0 {
                held.unlike = Some("bytes came twice, differently");
            } else if fin_moved {
                held.unlike = Some("a second FIN placed the end elsewhere");
            }
        }
        if ins.new > 0 || fin_news || ins.conflict > 0 {
            if odd && held.unlike.is_none() {
                held.unlike =
                    Some("a held frame's IP header or TCP options differ from the handshake's");
            }
            held.frames.push(frame.to_vec());
            if let Some(ts) = seg.options.timestamps {
                // Released in the order they came, frames whose clock runs
                // backwards would fail the server's PAWS after the first.
                if held
                    .last_tsval
                    .is_some_and(|l| SeqNum(ts.val).lt(SeqNum(l)))
                    && held.unlike.is_none()
                {
                    held.unlike = Some("held frames came with their timestamps out of order");
                }
                held.last_tsval = Some(ts.val);
                if held
                    .oldest_tsval
                    .is_none_or(|o| SeqNum(ts.val).lt(SeqNum(o)))
                {
                    held.oldest_tsval = Some(ts.val);
                }
            }
        }
        held.fin |= seg.flags.fin;
        // The first FIN places the end, as the halves take it.
        if seg.flags.fin && held.fin_at.is_none() {
            held.fin_at = Some(seg.seq + seg.payload.len() as u32);
        }
        held.bytes = held.bytes.max(end.max(0) as u64);
        if end > self.settings.hold_bytes as i64 || held.frames.len() > MAX_HELD_FRAMES {
            self.counters.hold_overflows += 1;
            // This frame is among the held ones, whatever happens to them.
            self.undecided(id, NoDecision::Overflow, now);
            return Disposition::Consumed;
        }
        // The segment's own cost from here: the parse, and the decision
        // when it completes the hello.
        let started = Instant::now();
        let ready = held.stream.read(usize::MAX);
        held.decided.extend_from_slice(&ready);
        let read = held.read();
        let closed = held.fin_at == Some(start + read);
        let hello = held.scanner.feed(&ready);
        if hello.is_some() && held.scanner.sni_malformed().is_some() {
            self.counters.sni_malformed += 1;
        }
        let opening = match hello {
            Some(Hello::Tls(ch)) => {
                self.counters.hellos += 1;
                Opening::Tls(ch)
            }
            Some(Hello::NotTls) => {
                self.counters.not_tls += 1;
                Opening::Other
            }
            // A TLS handshake whose name cannot be trusted: decided
            // without it, so that malforming a ClientHello on purpose
            // cannot get past a name-based block.
            Some(Hello::Malformed) => {
                self.counters.hello_malformed += 1;
                self.undecided(id, NoDecision::Malformed, now);
                return Disposition::Consumed;
            }
            // The client closed before completing its ClientHello: the
            // name will not come.
            None if closed => {
                self.undecided(id, NoDecision::ClosedEarly, now);
                return Disposition::Consumed;
            }
            None => {
                // Not complete, and the client may be waiting on the
                // server, which has seen nothing. Answer as it would:
                // - a ClientHello beyond the client's initial window (RFC
                //   5681 §3.1: at least two segments) would never come
                //   whole without an ACK: acknowledge what is in order;
                // - a segment after missing bytes (a lost first segment)
                //   would draw an immediate duplicate ACK with its SACK
                //   blocks (RFC 5681 §4.2, RFC 2018), and the client would
                //   resend the gap within a round trip, not at its
                //   timeout (seconds after a connect storm). That ACK
                //   acknowledges nothing new, so the connection may still
                //   be passed to the fast path.
                let mss = t.tracker.client_segment_size().unwrap_or(536);
                let in_order = read > held.acked && read >= 2 * mss;
                // A FIN not yet reached (one reached closed the hold).
                let fin_ahead = held.fin_at.filter(|f| f.gt(start + read));
                let gap =
                    (ins.new > 0 || fin_news) && (held.stream.held() > 0 || fin_ahead.is_some());
                if in_order || gap {
                    let (acked, tsval) = if in_order {
                        (read, seg.options.timestamps.map(|ts| ts.val))
                    } else {
                        // Nothing new in order: the echo stays at the
                        // last segment that advanced it (RFC 7323 §4.3).
                        (held.acked, None)
                    };
                    // Blocks only above the ACK: bytes in order and not
                    // acknowledged cannot be reported (Linux discards a
                    // block that starts at the ACK); the client may
                    // resend them, and they are dropped as repeats.
                    let mut sack = Vec::new();
                    if gap {
                        sack = held.stream.sack_blocks();
                        // A receiver's block covers the FIN's sequence
                        // number too (first, if it drew this ACK alone).
                        if let Some(f) = fin_ahead {
                            let alone = fin_news && ins.new == 0;
                            match sack.iter().position(|b| b.1 == f) {
                                Some(i) => {
                                    sack[i].1 = f + 1;
                                    if alone {
                                        sack[..=i].rotate_right(1);
                                    }
                                }
                                None if alone => sack.insert(0, (f, f + 1)),
                                None => sack.push((f, f + 1)),
                            }
                        }
                    }
                    if let (Some(ack), Some(tpl)) = (
                        t.tracker.hold_ack(acked, tsval, &sack),
                        &t.templates[t.client.other().index()],
                    ) {
                        if in_order {
                            held.acked = read;
                            self.counters.hold_acks += 1;
                        } else {
                            self.counters.hold_sacks += 1;
                        }
                        let mut buf = take_spare(&mut self.spare);
                        tpl.build(&ack, &mut buf);
                        self.out.push((t.client, buf));
                    }
                }
                return Disposition::Consumed;
            }
        };
        self.decide(id, &opening, None, now);
        self.counters.count_decision(started.elapsed());
        Disposition::Consumed
    }

    /// The server answered a SYN with an ACK, not a SYN-ACK: it holds an
    /// established connection on these ports (RFC 5961 §4.2's challenge
    /// ACK; or an ACK from TIME-WAIT), so the SYN opened nothing and the
    /// flow is what it was. A SYN on the ports of a passed connection
    /// takes it off the fast path to be decided afresh; one forged so
    /// (an outside probe) left the connection to this handshake, which
    /// none of its segments fit, and it hung. A connection the engine
    /// passed goes back to the fast path as decided; one it does not know
    /// (forgotten) is met as one seen mid-flow. A client that did open a
    /// new connection answers the ACK with a RST and sends its SYN again.
    fn not_reopened(
        &mut self,
        id: FlowId,
        side: Side,
        frame: &[u8],
        p: &Parsed,
        now: Instant,
    ) -> Disposition {
        if self.restore_pass(id) {
            return Disposition::Forward;
        }
        self.counters.syns_on_live += 1;
        let entry = self.mid_flow(side, frame, p, now);
        let closed = matches!(entry, Entry::Closed);
        if let Some(f) = self.flows.get_mut(&id) {
            f.entry = entry;
        }
        if !closed {
            return Disposition::Forward;
        }
        self.reset_sender(side, frame, p, p.segment.payload.len());
        Disposition::Consumed
    }

    /// A tracker begun by a SYN on the ports of a passed connection goes
    /// back to being that connection, on the fast path as decided (the
    /// SYN opened nothing; see `Sessions::not_reopened`). False if the
    /// ports had no passed connection on record.
    pub(super) fn restore_pass(&mut self, id: FlowId) -> bool {
        let Some(t) = tracking(&mut self.flows, id) else {
            return false;
        };
        let Some(meta) = t.passed_before.take() else {
            return false;
        };
        self.counters.syns_on_live += 1;
        self.ops.push(MapOp::Bypass(t.key));
        if let Some(f) = self.flows.get_mut(&id) {
            f.entry = Entry::Passthrough(meta);
        }
        true
    }

    /// A RST while the client's bytes are held. One its receiver would
    /// take (RFC 5961 §3.2: exactly at the next sequence number it expects;
    /// from the client, there or at the end of its held bytes, its own
    /// next, the server having seen none of them) ends the connection: it
    /// goes through, the held bytes do not. Any other is dropped, and the hold goes on: a forged
    /// RST must not get a connection past the decision. The client's goes
    /// to the server moved to the first held byte, where the server takes
    /// it: as sent (at the end of the held bytes, the client's next), the
    /// server would only challenge it and keep its socket, and the
    /// client's answer to the challenge would find the connection ended
    /// here.
    pub(super) fn reset_in_hold(
        &mut self,
        id: FlowId,
        side: Side,
        frame: &[u8],
        seg: &Segment,
    ) -> Disposition {
        let Some(t) = tracking(&mut self.flows, id) else {
            return Disposition::Forward;
        };
        let held = t.hold.as_ref().map_or(0, |h| h.bytes);
        let plausible = match dir_from(side, t.client) {
            Dir::Client => t
                .tracker
                .client_data_start()
                .is_some_and(|s| seg.seq == s || seg.seq == s + held as u32),
            Dir::Server => t.tracker.server_data_start() == Some(seg.seq),
        };
        if !plausible {
            self.counters.bogus_resets += 1;
            return Disposition::Consumed;
        }
        self.counters.passthrough += 1;
        if let Some(h) = t.hold.take() {
            for f in h.frames {
                keep_spare(&mut self.spare, f);
            }
        }
        let from_client = dir_from(side, t.client) == Dir::Client;
        let start = t.tracker.client_data_start();
        if let Some(f) = self.flows.get_mut(&id) {
            f.entry = Entry::Ended { answer: false };
        }
        match start {
            Some(at) if from_client && at != seg.seq => {
                self.normalise(side, frame, Normalise::ResetAt(at))
            }
            _ => Disposition::Forward,
        }
    }
}
