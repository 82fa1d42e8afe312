//! The decision at a connection's decision point (or without one), and
//! what follows from it: release to the fast path, a split with its stage,
//! or a refusal.

use std::net::IpAddr;

use super::*;
use crate::{
    policy::{EchAction, Fallback, Profile, TlsVersion},
    stage::Stage,
    tls::{context::Site, hello::ClientHello, intercept::Intercept},
};

/// What follows a `decrypt` decision.
enum Plan {
    /// Intercept with this stage (and this remark for the log).
    Intercept(Box<Intercept>, Option<String>),
    /// Not decrypted: released to the fast path unchanged.
    Pass(String),
    /// Refused (the profile says to block what it cannot decrypt).
    Block(String),
    /// Not TLS: relayed as tcp-split.
    Relay(String),
    /// rustls refuses the ClientHello the decision read, or reads another
    /// name in it: decided again without the name, as a malformed hello.
    Malformed(&'static str),
}

/// How a split starts.
pub(super) enum Start {
    /// tcp-split.
    Relay,
    /// Refused: this farewell to the client (or a RST), a RST to the
    /// server.
    Refuse(Option<&'static [u8]>),
    /// A stage of its own (TLS interception).
    Stage(Stage),
}

/// A fatal `access_denied` alert (RFC 8446 §6.2) in a TLS 1.2-versioned
/// record: what a blocked TLS client reads before the connection closes.
pub(super) const ACCESS_DENIED: [u8; 7] = [21, 3, 3, 0, 2, 2, 49];

/// Why a client's ClientHello is outside what `profile` decrypts, if it
/// is: no version in the profile's range, or no cipher suite the engine
/// would accept for those versions.
fn unsupported_client(ch: &ClientHello, profile: &Profile) -> Option<String> {
    use crate::tls::hello::{TLS12, TLS13};
    let allowed = |v: u16| match v {
        TLS12 => profile.min_version <= TlsVersion::Tls12,
        TLS13 => profile.max_version >= TlsVersion::Tls13,
        _ => false,
    };
    let versions: Vec<u16> = ch
        .versions
        .iter()
        .copied()
        .filter(|v| allowed(*v))
        .collect();
    if versions.is_empty() {
        return Some(format!(
            "the client offers no TLS version the profile allows (offered: {})",
            ch.versions
                .iter()
                .map(|v| format!("{v:#06x}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let provider = crate::tls::upstream::provider_for(profile);
    let usable = provider.cipher_suites.iter().any(|s| {
        let v = if s.tls13().is_some() { TLS13 } else { TLS12 };
        versions.contains(&v) && ch.suites.contains(&u16::from(s.suite()))
    });
    if !usable {
        return Some("the client offers no cipher suite the profile allows".into());
    }
    None
}

/// The server's address as the TLS stage sees it.
fn ip_of(addr: &[u8; 16]) -> IpAddr {
    let v6 = std::net::Ipv6Addr::from(*addr);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// What becomes of a connection the engine cannot follow from its start.
enum Unfollowed {
    /// Left to the kernel: the policy passes it whatever its name, or
    /// `--mid-flow pass` lets what would be inspected through.
    Pass,
    /// A block rule might apply to it.
    Block,
    /// The policy would inspect it, which cannot start mid-stream, and
    /// `--mid-flow drop` (the default) fails closed.
    Uninspectable,
}

impl Sessions {
    /// The policy's verdict, without the server name, on a connection the
    /// engine cannot follow from its start, oriented with the server as
    /// the endpoint with the lower port (its SYN is not there to say).
    fn unfollowed(&self, key: FlowKey) -> (FlowKey, Decision, Unfollowed) {
        let key = if key.dst_port <= key.src_port {
            key
        } else {
            key.reversed()
        };
        let d = self.settings.policy.decide_unnamed(&Subject {
            client: key.src,
            server: key.dst,
            server_port: key.dst_port,
            sni: None,
        });
        let fate = match d.action.verdict() {
            Verdict::Refuse => Unfollowed::Block,
            Verdict::Pass => Unfollowed::Pass,
            Verdict::Split | Verdict::Decrypt => match self.settings.mid_flow {
                MidFlow::Drop => Unfollowed::Uninspectable,
                MidFlow::Pass => Unfollowed::Pass,
            },
        };
        (key, d, fate)
    }

    /// A flow seen mid-stream: running when the engine started, or one
    /// whose state was forgotten (idle, evicted). No decision point will
    /// come, so it is decided without the server name: a block that might
    /// apply ends it (a client cannot get past a name-based block by
    /// staying quiet until it is forgotten), and so does an inspecting
    /// action under `--mid-flow drop`, since no split can start
    /// mid-stream; otherwise it is left to the kernel. Ended, both ends
    /// are reset from the segment that showed it (no hang until their
    /// timeouts): its receiver now, its sender as every sender of a later
    /// segment is, by the [`Entry::Closed`] this returns.
    pub(super) fn mid_flow(
        &mut self,
        side: Side,
        frame: &[u8],
        parsed: &Parsed,
        now: Instant,
    ) -> Entry {
        let (key, d, fate) = self.unfollowed(parsed.key);
        let note = match fate {
            Unfollowed::Pass => {
                self.counters.passthrough += 1;
                self.ops.push(MapOp::Bypass(key));
                return Entry::Passthrough(None);
            }
            Unfollowed::Block => {
                self.counters.refused += 1;
                "seen mid-flow (running before the engine, forgotten while idle or to make \
                 room, or forged): decided without the server name, a block rule might \
                 apply; reset"
                    .to_string()
            }
            Unfollowed::Uninspectable => {
                self.counters.refused += 1;
                self.counters.uninspectable += 1;
                format!(
                    "seen mid-flow (running before the engine, forgotten while idle or to \
                     make room, or forged): the policy would {} it (rule {}), which cannot \
                     start mid-stream; reset (--mid-flow drop)",
                    d.action.label(),
                    self.settings.policy.rule_name(&d)
                )
            }
        };
        self.reset_receiver(side, frame, parsed);
        let policy = self.settings.policy.clone();
        let meta = Meta {
            action: Some(Action::Block),
            // No rule decided it: a block rule only might have (after a
            // restart, a connection the last run split is seen this way).
            rule: "(mid-flow)".into(),
            sni: None,
            alpn: Vec::new(),
            key,
            conn: conn_id(),
            opened: now,
            policy_version: policy.version,
            held_bytes: 0,
            sni_malformed: None,
            note: Some(note),
            logged: true,
        };
        let (since, n) = &mut self.mid_flow_records;
        if now.saturating_duration_since(*since) >= Duration::from_secs(1) {
            (*since, *n) = (now, 0);
        }
        if *n < MID_FLOW_RECORDS_PER_SEC {
            *n += 1;
            self.log(&meta, (0, 0), "blocked");
        } else {
            self.counters.mid_flow_unlogged += 1;
        }
        Entry::Closed
    }

    /// The sender of a segment of a connection nobody holds state for is
    /// answered as a closed port answers: a RST back (none for a RST).
    pub(super) fn reset_sender(
        &mut self,
        side: Side,
        frame: &[u8],
        parsed: &Parsed,
        payload_len: usize,
    ) -> bool {
        let back = parsed.reset_back(frame, payload_len);
        let sent = back.is_some();
        if let Some(back) = back {
            self.out.push((side, back));
        }
        sent
    }

    /// The receiver of a segment of a connection nobody holds state for
    /// is reset (and probed, should the RST miss).
    fn reset_receiver(&mut self, side: Side, frame: &[u8], parsed: &Parsed) {
        for f in parsed.reset_on(frame).into_iter().flatten() {
            self.out.push((side.other(), f));
        }
    }

    /// A connection for which the table has no room (only live splits):
    /// it goes untracked, as the policy says without its name. A SYN that
    /// cannot be passed is dropped (its client tries again, when there may
    /// be room); a later segment, its connection reset. Nothing is logged
    /// per segment: a flood must not become a flood of records
    /// (`table_full` counts them).
    pub(super) fn no_room(
        &mut self,
        side: Side,
        frame: &[u8],
        parsed: &Parsed,
        payload_len: usize,
        is_syn: bool,
    ) -> Disposition {
        if parsed.segment.flags.rst {
            // It ends a connection and carries no bytes.
            return Disposition::Forward;
        }
        let (key, _, fate) = self.unfollowed(parsed.key);
        match fate {
            Unfollowed::Pass => {
                if !is_syn {
                    self.ops.push(MapOp::Bypass(key));
                }
                return Disposition::Forward;
            }
            Unfollowed::Block => self.counters.refused += 1,
            Unfollowed::Uninspectable => {
                self.counters.refused += 1;
                self.counters.uninspectable += 1;
            }
        }
        if !is_syn {
            self.reset_sender(side, frame, parsed, payload_len);
            self.reset_receiver(side, frame, parsed);
        }
        Disposition::Consumed
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
        // A malformed server name is no name, and the name it might have
        // been could match a block: decided as one without a name.
        let malformed = t
            .hold
            .as_ref()
            .is_some_and(|h| h.scanner.sni_malformed().is_some());
        // A server that closes before the client spoke did not speak first:
        // decided as a connection whose name never came (failing closed),
        // or it could let a held ClientHello with a blocked name through.
        let closed_first = matches!(opening, Opening::ServerFirst)
            && pending.as_ref().is_some_and(|s| s.payload.is_empty());
        let decision = if malformed || closed_first {
            policy.decide_unnamed(&t.subject(None))
        } else {
            policy.decide(&t.subject(opening.sni()))
        };
        let mut meta = t.meta(&policy, &decision, opening.sni());
        if malformed {
            meta.note = Some("a malformed server name: decided without it".into());
        }
        if closed_first {
            meta.note = Some(
                "the server closed before the client's first bytes: decided without a name".into(),
            );
        }
        if let Opening::Tls(ch) = opening {
            meta.alpn = ch
                .alpn
                .iter()
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .collect();
        }
        // A TLS client reads why it is refused; anything else is reset.
        let alert = matches!(opening, Opening::Tls(_)).then_some(&ACCESS_DENIED[..]);
        match decision.action.verdict() {
            Verdict::Pass => {
                self.counters.policy_pass += 1;
                self.pass_or_relay(id, pending, now, meta)
            }
            Verdict::Split if self.settings.memory_short() => {
                self.counters.memory_passthrough += 1;
                meta.note = Some("the split memory budget is spent: passed, not split".into());
                self.pass_or_relay(id, pending, now, meta)
            }
            Verdict::Split => self.start_split(id, pending, now, meta, Start::Relay),
            Verdict::Refuse => self.refuse(id, pending, now, meta, alert),
            Verdict::Decrypt => match self.plan_intercept(id, opening, &policy, &decision, now) {
                Plan::Intercept(stage, note) => {
                    self.counters.intercepted += 1;
                    meta.note = note.or(meta.note.take());
                    self.start_split(
                        id,
                        pending,
                        now,
                        meta,
                        Start::Stage(Stage::Intercept(stage)),
                    )
                }
                Plan::Pass(note) => {
                    self.counters.policy_pass += 1;
                    self.counters.not_decrypted += 1;
                    meta.note = Some(note);
                    self.pass_or_relay(id, pending, now, meta)
                }
                Plan::Block(note) => {
                    meta.note = Some(note);
                    self.refuse(id, pending, now, meta, alert)
                }
                Plan::Relay(note) => {
                    meta.note = Some(note);
                    self.start_split(id, pending, now, meta, Start::Relay)
                }
                Plan::Malformed(why) => {
                    // Counted as the hellos refused at once are: malformed
                    // (not among the hellos), its name not used.
                    self.counters.hellos = self.counters.hellos.saturating_sub(1);
                    self.counters.hello_malformed += 1;
                    self.counters.sni_malformed += 1;
                    if let Some(t) = tracking(&mut self.flows, id) {
                        if let Some(h) = t.hold.as_mut() {
                            h.scanner.set_malformed(why);
                        }
                    }
                    self.undecided(id, NoDecision::Malformed, now)
                }
            },
        }
    }

    fn refuse(
        &mut self,
        id: FlowId,
        pending: Option<Segment>,
        now: Instant,
        mut meta: Box<Meta>,
        farewell: Option<&'static [u8]>,
    ) -> Disposition {
        self.counters.refused += 1;
        self.log(&meta, (meta.held_bytes, 0), "blocked");
        meta.logged = true;
        self.start_split(id, pending, now, meta, Start::Refuse(farewell))
    }

    /// What a `decrypt` decision becomes: interception, unless the profile
    /// says otherwise for what the ClientHello shows (encrypted ClientHello,
    /// versions or suites it does not decrypt), for a site in the
    /// exclusion cache, or for an engine that cannot mint (no HSM, HSM
    /// down, out of resources). All of this is known before the takeover,
    /// so `no-decrypt` here is a true pass.
    fn plan_intercept(
        &mut self,
        id: FlowId,
        opening: &Opening,
        policy: &Policy,
        decision: &Decision,
        now: Instant,
    ) -> Plan {
        let Opening::Tls(ch) = opening else {
            return Plan::Relay("not TLS: relayed as tcp-split, not decrypted".into());
        };
        let profile_name = policy.profile_of(decision);
        let default = Profile::default();
        let profile = profile_name
            .and_then(|n| policy.profiles.get(n))
            .unwrap_or(&default);
        let fallback = |f: Fallback, why: String| match f {
            Fallback::Block => Plan::Block(format!("{why}: blocked by the decryption profile")),
            Fallback::NoDecrypt => Plan::Pass(format!("{why}: not decrypted")),
        };
        let mut note = None;
        if ch.ech {
            let why = "the ClientHello carries encrypted_client_hello (ECH or GREASE)".to_string();
            match profile.ech {
                EchAction::Decrypt => {
                    note = Some(format!(
                        "{why}: decrypted for its visible name, as a server without ECH"
                    ))
                }
                EchAction::NoDecrypt => return fallback(Fallback::NoDecrypt, why),
                EchAction::Block => return fallback(Fallback::Block, why),
            }
        }
        if let Some(why) = unsupported_client(ch, profile) {
            return fallback(profile.unsupported, why);
        }
        let Some(ctx) = self.settings.tls.clone() else {
            return fallback(
                profile.hsm_unavailable,
                "no HSM: the engine runs without --hsm-token".into(),
            );
        };
        let Some(t) = tracking(&mut self.flows, id) else {
            return Plan::Relay("lost its state".into());
        };
        let server = ip_of(&t.key.dst);
        let client = ip_of(&t.key.src);
        let port = t.key.dst_port;
        let client_port = t.key.src_port;
        let rt = match ctx.runtime(profile_name) {
            Ok(rt) => rt,
            Err(why) => return Plan::Block(format!("{why}: blocked")),
        };
        // Inbound inspection: the rule's server profile (its certificate,
        // its key on the HSM).
        let inbound = match policy.server_profile_of(decision) {
            Some(name) => match ctx.server_runtime(name) {
                Ok(sr) => Some(sr),
                Err(why) => return Plan::Block(format!("{why}: blocked")),
            },
            None => None,
        };
        let site = Site {
            sni: ch.sni.clone(),
            server,
            port,
            profile: rt.name.clone(),
        };
        if let Some(why) = ctx.exclusions.check(client, &site, now) {
            return Plan::Pass(format!(
                "in the decryption exclusion cache ({why}): not decrypted"
            ));
        }
        // The profile's own token's CAs (a tenant's), as the mint will use.
        let cas = ctx.cas_for(profile.token.as_deref());
        let token_up = ctx.signer.as_ref().is_some_and(|s| match &inbound {
            Some(sr) => s.is_up(&sr.token),
            None => cas
                .pick(loupe_hsm::ca::CaRole::ForwardTrust, true)
                .is_some_and(|ca| s.is_up(&ca.token)),
        });
        // With the HSM down a cached certificate still serves its site, so
        // only `no-decrypt` (which must be decided before the takeover)
        // passes here; under `block` a miss is refused when its mint fails.
        if !token_up && profile.hsm_unavailable == Fallback::NoDecrypt {
            let token = inbound.as_ref().map_or(&cas.token, |sr| &sr.token);
            return fallback(
                Fallback::NoDecrypt,
                format!("the HSM token {token:?} is unavailable"),
            );
        }
        if self.settings.memory_short() {
            self.counters.memory_passthrough += 1;
            return fallback(
                profile.no_resources,
                "the split memory budget is spent".into(),
            );
        }
        if ctx.stats.active.load(std::sync::atomic::Ordering::Relaxed)
            >= ctx.settings.max_sessions as u64
        {
            return fallback(
                profile.no_resources,
                format!(
                    "{} connections already in the TLS stage (the most)",
                    ctx.settings.max_sessions
                ),
            );
        }
        let Some(held) = t.hold.as_mut() else {
            return Plan::Relay("the ClientHello was not kept: relayed as tcp-split".into());
        };
        let (accepted, skip) = match held.scanner.accept() {
            Ok(a) => a,
            Err(why) => return Plan::Malformed(why),
        };
        Plan::Intercept(
            Box::new(Intercept::start(
                ctx,
                rt,
                inbound,
                self.settings.waker.clone(),
                accepted,
                ch.clone(),
                skip,
                (
                    std::net::SocketAddr::new(client, client_port),
                    std::net::SocketAddr::new(server, port),
                ),
                now,
            )),
            note,
        )
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
        meta.note = Some(why.note().into());
        match d.action.verdict() {
            Verdict::Refuse => self.refuse(id, None, now, meta, None),
            // Without a ClientHello there is nothing to decrypt: a decrypt
            // rule's connection is refused or relayed (not decrypted), as
            // its profile says for what it cannot decrypt (`unsupported`,
            // `block` by default). Relayed, a client could carry TLS past
            // a decrypt rule by sending its ClientHello slowly.
            Verdict::Split | Verdict::Decrypt
                if matches!(
                    why,
                    NoDecision::Timeout
                        | NoDecision::Overflow
                        | NoDecision::ClosedEarly
                        | NoDecision::Malformed
                ) =>
            {
                let default = Profile::default();
                let profile = policy
                    .profile_of(&d)
                    .and_then(|n| policy.profiles.get(n))
                    .unwrap_or(&default);
                if d.action.verdict() == Verdict::Decrypt && profile.unsupported == Fallback::Block
                {
                    meta.note = Some(format!(
                        "{}; nothing it could decrypt: blocked by the decryption profile \
                         (unsupported)",
                        why.note()
                    ));
                    return self.refuse(id, None, now, meta, None);
                }
                self.start_split(id, None, now, meta, Start::Relay)
            }
            // Evicted (no room to keep following it) or never seen to
            // start: inspected it cannot be, and `--mid-flow drop` fails
            // closed, as for a connection seen mid-flow. (Evicted after
            // the hold acknowledged bytes, it is relayed as it would be
            // passed: by the engine's halves, as a timeout's is.)
            Verdict::Split | Verdict::Decrypt
                if self.settings.mid_flow == MidFlow::Drop && !t.must_relay() =>
            {
                self.counters.uninspectable += 1;
                let inspect = format!(
                    "the policy would {} it (rule {}), which cannot be done now; refused \
                     (--mid-flow drop)",
                    d.action.label(),
                    policy.rule_name(&d)
                );
                meta.action = Some(Action::Block);
                meta.rule = format!("({})", why.label());
                meta.note = Some(format!("{}; {inspect}", why.note()));
                if why == NoDecision::Evicted {
                    return self.refuse(id, None, now, meta, None);
                }
                // Its handshake was not seen: nothing to reset from.
                self.counters.refused += 1;
                self.log(&meta, (meta.held_bytes, 0), "blocked");
                if let Some(f) = self.flows.get_mut(&id) {
                    f.entry = Entry::Ended { answer: false };
                }
                Disposition::Consumed
            }
            Verdict::Split | Verdict::Decrypt => {
                meta.action = None;
                meta.rule = format!("({})", why.label());
                self.pass_or_relay(id, None, now, meta)
            }
            Verdict::Pass => self.pass_or_relay(id, None, now, meta),
        }
    }

    /// A pass, unless the hold acknowledged client bytes as the server (a
    /// ClientHello beyond the client's initial window): the client will
    /// never send those again, so a held frame lost on its way to the
    /// server could not be recovered on the fast path. Such a connection
    /// is relayed instead, by halves that retransmit what they send.
    /// Bytes the hold only SACKed may be passed: a SACK is advisory (RFC
    /// 2018 §8), so a released frame lost on the way is resent by the
    /// client when the server's ACKs renege on it (at its RTO).
    fn pass_or_relay(
        &mut self,
        id: FlowId,
        pending: Option<Segment>,
        now: Instant,
        mut meta: Box<Meta>,
    ) -> Disposition {
        let (relay, unlike) = tracking(&mut self.flows, id).map_or((false, None), |t| {
            (t.must_relay(), t.hold.as_ref().and_then(|h| h.unlike))
        });
        if !relay {
            self.release(id, meta, "bypass");
            return Disposition::Forward;
        }
        // Passed, the held frames would go to the server as they came, and
        // its reassembly of them may not be the one decided on: relayed,
        // the server gets the bytes decided on.
        let why = match unlike {
            Some(why) => {
                format!("{why} during the hold: relayed as tcp-split, not passed to the fast path")
            }
            None => "its ClientHello was acknowledged during the hold: relayed as tcp-split, \
                     not passed to the fast path"
                .into(),
        };
        meta.note = Some(match meta.note.take() {
            Some(n) => format!("{n}; {why}"),
            None => why,
        });
        self.start_split(id, pending, now, meta, Start::Relay)
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
            conn: conn_id(),
            opened: t.opened,
            policy_version: self.settings.policy.version,
            held_bytes: t.hold.as_ref().map_or(0, |h| h.bytes),
            sni_malformed: None,
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
            let start = t.tracker.client_data_start();
            if let Some(held) = t.hold.take() {
                let to = t.client.other();
                self.out.extend(held.frames.into_iter().map(|f| (to, f)));
                // Bytes released in order: the fast path waits for the
                // server's ACK of them (see `Releasing`).
                if let (Some(start), true) = (start, !held.decided.is_empty()) {
                    flow.entry = Entry::Releasing(Box::new(Releasing {
                        meta: Some(meta),
                        key: t.key,
                        client: t.client,
                        start,
                        decided: held.decided,
                    }));
                    return;
                }
            }
            self.ops.push(MapOp::Bypass(t.key));
        }
        flow.entry = Entry::Passthrough(Some(meta));
    }

    /// Takes over a connection: the held client bytes go into the
    /// client-facing half (acknowledged at once), then `pending` (the
    /// server's first data) into the server-facing one, with the stage
    /// `start` says between them.
    pub(super) fn start_split(
        &mut self,
        id: FlowId,
        pending: Option<Segment>,
        now: Instant,
        meta: Box<Meta>,
        start: Start,
    ) -> Disposition {
        let (stage, refuse) = match start {
            Start::Relay => (Stage::Relay, None),
            Start::Refuse(farewell) => (Stage::Relay, Some(farewell)),
            Start::Stage(stage) => (stage, None),
        };
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
                    f.entry = Entry::Ended { answer: false };
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
        if t.tracker.window_shift_clamped() {
            self.counters.wscale_clamped += 1;
        }
        // However the policy changes the steering, this flow stays here.
        self.ops.push(MapOp::Steer(key));
        self.flows.get_mut(&id).expect("present").entry = Entry::Split {
            split: Box::new(Split::new(halves, stage)),
            client,
            templates: [a, b],
            armed: None,
            pending: false,
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
                for seg in &mut held {
                    // Without their timestamps: the hold took them first
                    // copy first whatever their clocks said, and so must
                    // the half, or PAWS could drop one after a later
                    // clock and the client's next copy of those bytes,
                    // saying anything, would be relayed instead.
                    seg.options.timestamps = None;
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
