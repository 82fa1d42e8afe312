//! The decision at a connection's decision point (or without one), and
//! what follows from it: release to the fast path, a split with its stage,
//! or a refusal.

use super::*;

/// Said of `decrypt` connections until the TLS stage lands.
pub(super) const DECRYPT_NOTE: &str =
    "decryption is not available in this release: relayed as tcp-split";

/// A fatal `access_denied` alert (RFC 8446 §6.2) in a TLS 1.2-versioned
/// record: what a blocked TLS client reads before the connection closes.
pub(super) const ACCESS_DENIED: [u8; 7] = [21, 3, 3, 0, 2, 2, 49];

impl Sessions {
    /// A flow seen mid-stream: running when the engine started, or one
    /// whose state was forgotten (idle, evicted). No decision point will
    /// come, so it is decided without the server name: a block that might
    /// apply drops it (a client cannot get past a name-based block by
    /// staying quiet until it is forgotten); otherwise it is left to the
    /// kernel. The server is taken to be the endpoint with the lower port.
    pub(super) fn mid_flow(&mut self, key: FlowKey) -> Entry {
        let key = if key.dst_port <= key.src_port {
            key
        } else {
            key.reversed()
        };
        let policy = self.settings.policy.clone();
        let d = policy.decide_unnamed(&Subject {
            client: key.src,
            server: key.dst,
            server_port: key.dst_port,
            sni: None,
        });
        if d.action != Action::Block {
            self.counters.passthrough += 1;
            self.ops.push(MapOp::Bypass(key));
            return Entry::Passthrough(None);
        }
        self.counters.refused += 1;
        let meta = Meta {
            action: Some(Action::Block),
            rule: policy.rule_name(&d).to_string(),
            sni: None,
            alpn: Vec::new(),
            key,
            opened: Instant::now(),
            policy_version: policy.version,
            held_bytes: 0,
            note: Some(
                "seen mid-flow (running before the engine, or forgotten while idle): decided \
                 without the server name; its segments are dropped",
            ),
            logged: true,
        };
        self.log(&meta, (0, 0), "blocked");
        Entry::Ended
    }

    /// The policy's verdict on a connection at its decision point.
    /// `pending` is the segment that forced the decision, not held.
    pub(super) fn decide(
        &mut self,
        id: FlowId,
        opening: &Opening,
        pending: Option<Segment>,
        now: Instant,
    ) -> Disposition {
        let Some(t) = tracking(&mut self.flows, id) else {
            return Disposition::Forward;
        };
        let policy = self.settings.policy.clone();
        let decision = policy.decide(&t.subject(opening.sni()));
        let mut meta = t.meta(&policy, &decision, opening.sni());
        if let Opening::Tls(ch) = opening {
            meta.alpn = ch
                .alpn
                .iter()
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .collect();
        }
        meta.note = (decision.action == Action::Decrypt).then_some(DECRYPT_NOTE);
        match decision.action.verdict() {
            Verdict::Pass => {
                self.counters.policy_pass += 1;
                self.release(id, meta, "bypass");
                Disposition::Forward
            }
            Verdict::Split => self.start_split(id, pending, now, meta, None),
            Verdict::Refuse => {
                self.counters.refused += 1;
                self.log(&meta, (meta.held_bytes, 0), "blocked");
                meta.logged = true;
                // A TLS client reads why; anything else is reset.
                let alert = matches!(opening, Opening::Tls(_)).then_some(&ACCESS_DENIED[..]);
                self.start_split(id, pending, now, meta, Some(alert))
            }
        }
    }

    /// Decides a connection that reached no decision point, without its
    /// server name ([`Policy::decide_unnamed`]: a block that might apply
    /// does). Refusals and splits go ahead wherever the halves can be
    /// built; a split cannot be kept for an evicted or unsplittable
    /// connection, which is then passed.
    pub(super) fn undecided(&mut self, id: FlowId, why: NoDecision, now: Instant) -> Disposition {
        let Some(t) = tracking(&mut self.flows, id) else {
            return Disposition::Forward;
        };
        let policy = self.settings.policy.clone();
        let d = policy.decide_unnamed(&t.subject(None));
        let mut meta = t.meta(&policy, &d, None);
        meta.note = Some(why.note());
        match d.action.verdict() {
            Verdict::Refuse => {
                self.counters.refused += 1;
                self.log(&meta, (meta.held_bytes, 0), "blocked");
                meta.logged = true;
                self.start_split(id, None, now, meta, Some(None))
            }
            Verdict::Split
                if matches!(
                    why,
                    NoDecision::Timeout | NoDecision::Overflow | NoDecision::ClosedEarly
                ) =>
            {
                self.start_split(id, None, now, meta, None)
            }
            Verdict::Split => {
                meta.action = None;
                meta.rule = format!("({})", why.label());
                self.release(id, meta, "bypass");
                Disposition::Forward
            }
            Verdict::Pass => {
                self.release(id, meta, "bypass");
                Disposition::Forward
            }
        }
    }

    /// Leaves a connection to the kernel for good (held frames go out
    /// unchanged, the flow goes to the XDP fast path) without a decision
    /// by the rules: `why` (logged once the handshake was seen), or none.
    pub(super) fn pass(&mut self, id: FlowId, why: Option<&'static str>) {
        let Some(t) = tracking(&mut self.flows, id) else {
            return;
        };
        let meta = Box::new(Meta {
            action: None,
            rule: why.map_or_else(String::new, |w| format!("({w})")),
            sni: None,
            alpn: Vec::new(),
            key: t.key,
            opened: t.opened,
            policy_version: self.settings.policy.version,
            held_bytes: t.hold.as_ref().map_or(0, |h| h.bytes),
            note: None,
            logged: why.is_none(),
        });
        self.release(id, meta, why.unwrap_or("bypass"));
    }

    /// Releases a tracked connection: held frames out unchanged, the flow
    /// to the fast path, its record to the log.
    pub(super) fn release(&mut self, id: FlowId, meta: Box<Meta>, end: &str) {
        if !meta.logged {
            self.log(&meta, (meta.held_bytes, 0), end);
        }
        let Some(flow) = self.flows.get_mut(&id) else {
            return;
        };
        if let Entry::Tracking(t) = &mut flow.entry {
            if let Some(held) = t.hold.take() {
                let to = t.client.other();
                self.out.extend(held.frames.into_iter().map(|f| (to, f)));
            }
            self.ops.push(MapOp::Bypass(t.key));
        }
        flow.entry = Entry::Passthrough(Some(meta));
    }

    /// Takes over a connection: the held client bytes go into the
    /// client-facing half (acknowledged at once), then `pending` (the
    /// server's first data) into the server-facing one. `refuse`: the
    /// connection is refused instead (with this farewell to the client,
    /// or a RST), the server reset.
    pub(super) fn start_split(
        &mut self,
        id: FlowId,
        pending: Option<Segment>,
        now: Instant,
        meta: Box<Meta>,
        refuse: Option<Option<&'static [u8]>>,
    ) -> Disposition {
        let Some(t) = tracking(&mut self.flows, id) else {
            return Disposition::Forward;
        };
        let oldest = t.hold.as_ref().and_then(|h| h.oldest_tsval);
        let (Some(halves), [Some(a), Some(b)]) =
            (t.tracker.split(now, oldest), t.templates.clone())
        else {
            // Only before the handshake completed (TCP Fast Open, an odd
            // handshake). A refusal drops the connection here (its held
            // bytes, and what follows until it idles out); anything else
            // leaves it alone rather than guess.
            if refuse.is_some() {
                if let Some(f) = self.flows.get_mut(&id) {
                    f.entry = Entry::Ended;
                }
                return Disposition::Consumed;
            }
            self.counters.passthrough += 1;
            self.pass(id, Some("passthrough"));
            return Disposition::Forward;
        };
        let client = t.client;
        let key = t.key;
        let frames = t.hold.take().map(|h| h.frames).unwrap_or_default();
        if refuse.is_none() {
            self.counters.split += 1;
        }
        // However the policy changes the steering, this flow stays here.
        self.ops.push(MapOp::Steer(key));
        self.flows.get_mut(&id).expect("present").entry = Entry::Split {
            split: Box::new(Split::new(halves)),
            client,
            templates: [a, b],
            armed: None,
            meta,
        };
        let mut held = Vec::with_capacity(frames.len());
        for f in frames {
            // Parsed once already when held; only valid frames were kept.
            if let Ok(p) = parse_segment(&f) {
                held.push(p.segment);
            }
            keep_spare(&mut self.spare, f);
        }
        if !held.is_empty() || refuse.is_some() {
            self.with_split(id, now, |s| {
                for seg in &held {
                    s.on_segment(Dir::Client, seg, now);
                }
                s.client.ack_now();
                if let Some(farewell) = refuse {
                    s.refuse(farewell);
                }
            });
        }
        if let Some(seg) = pending {
            self.with_split(id, now, |s| s.on_segment(Dir::Server, &seg, now));
        }
        Disposition::Consumed
    }
}
