//! TLS interception of one connection (the `decrypt` action): the stage
//! between a split connection's two halves that is a TLS server toward the
//! client and a TLS client toward the server.
//!
//! 1. **Upstream first.** The client's ClientHello was parsed once, at the
//!    decision point, and its rustls [`Accepted`] is kept; the engine opens
//!    TLS to the real server with the client's server name and ALPN list.
//! 2. **Verdict.** Once the server's handshake is through, its chain is
//!    classified ([`classify`]) and the profile decides: block, pass the
//!    problem on (the forward-untrust CA signs), or go ahead (the
//!    forward-trust CA signs). A server that asked for a client
//!    certificate is handled by the profile's `client_auth`.
//! 3. **Certificate.** The impersonation leaf comes from the shared cache,
//!    or is minted: the TBS is submitted to the HSM signer without
//!    blocking and the stage parks ([`Pump::Parked`]) until the worker is
//!    woken by the answer (or the deadline passes).
//! 4. **Downstream.** The client's handshake completes with the minted
//!    chain and the ALPN the server chose.
//! 5. **Plaintext** flows through the [`Pipeline`] both ways; close_notify
//!    and end-of-stream are mirrored, and a failure on one leg resets the
//!    other (never a clean close that would hide a truncation).
//!
//! Memory per connection is bounded: plaintext waits only in rustls's
//! own buffers (read from one leg, written into the other without a copy
//! of ours), rustls's outgoing buffers are limited, and
//! TLS records are read from a half only when rustls wants more, so a slow
//! reader closes the other side's TCP window.

use std::{
    io::{self, BufRead, Read, Write},
    net::{IpAddr, SocketAddr},
    sync::{atomic::Ordering, Arc, Mutex},
    task::Waker,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use loupe_hsm::{ca::CaRole, signer::Request};
use rustls::{
    client::ClientConnection,
    pki_types::{ServerName, UnixTime},
    server::{Accepted, ServerConnection},
    AlertDescription, CipherSuite, ConnectionCommon, HandshakeKind, KeyLog, PeerIncompatible,
    ProtocolVersion, ServerConfig, SideData,
};
use sha2::{Digest, Sha256};

use super::{
    cache::{CacheKey, Lookup, MintFailure, MintSlot, MintStart, Minted},
    context::{OneCert, ProfileRuntime, Site, TlsContext},
    hello::ClientHello,
    inbound::{HandshakeSlot, ServerRuntime},
    mint::{build_tbs, random_serial, LeafKind, MintOptions},
    resume,
    upstream::{connect, keylog_line, server_name, Watch},
    verify::{classify, leaf_info, Verdict},
};
use crate::{
    export::Tap,
    flow::{CertLog, TlsError, TlsLog, TlsSide},
    inspect::{Direction, Finding, Inspector, Pipeline, Report},
    policy::{Fallback, OnError, UpstreamCheck},
    tcp::stream::{drain, ByteStream, Pump},
};

/// The stage's record for the decryption log.
pub type TlsRecord = TlsLog;

/// rustls's outgoing buffer per leg (plaintext not yet encrypted plus TLS
/// not yet written to the half).
const TLS_BUFFER: usize = 64 << 10;
/// Rounds of moving bytes per pump, so one connection cannot hold the
/// worker (the halves' buffers bound the work anyway).
const MAX_ROUNDS: usize = 64;

/// TLS alert descriptions sent to the client (RFC 8446 §6).
const ALERT_HANDSHAKE_FAILURE: u8 = 40;
const ALERT_ACCESS_DENIED: u8 = 49;
const ALERT_PROTOCOL_VERSION: u8 = 70;
const ALERT_INTERNAL_ERROR: u8 = 80;

/// What the client gets when the connection is ended before its handshake.
enum Farewell {
    /// A fatal alert, then FIN.
    Alert(u8),
    /// These bytes (rustls's own alert), then FIN.
    Bytes(Vec<u8>),
    /// A RST.
    Reset,
}

/// Where a connection failed, for the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorStage {
    ClientHello,
    UpstreamHandshake,
    Verification,
    Mint,
    DownstreamHandshake,
    Data,
}

impl ErrorStage {
    fn label(self) -> &'static str {
        match self {
            ErrorStage::ClientHello => "client-hello",
            ErrorStage::UpstreamHandshake => "upstream-handshake",
            ErrorStage::Verification => "verification",
            ErrorStage::Mint => "mint",
            ErrorStage::DownstreamHandshake => "downstream-handshake",
            ErrorStage::Data => "data",
        }
    }
}

enum Phase {
    /// Handshaking with the server; the client's ClientHello is held.
    Upstream {
        accepted: Box<Accepted>,
        up: Box<ClientConnection>,
        watch: Arc<Watch>,
    },
    /// Waiting for the impersonation certificate.
    Minting {
        accepted: Box<Accepted>,
        up: Box<ClientConnection>,
        slot: Arc<MintSlot>,
        since: Instant,
    },
    /// Inbound: the client's handshake is on the handshake pool, waiting
    /// for the server key's signature on the HSM.
    Handshaking {
        up: Box<ClientConnection>,
        slot: Arc<HandshakeSlot>,
        since: Instant,
    },
    /// Both legs up (the client's may still be handshaking).
    Open {
        down: Box<ServerConnection>,
        up: Box<ClientConnection>,
    },
    /// Failed or refused: the client's bytes are read and dropped while
    /// the farewell (if any) goes out.
    Done,
}

/// One direction's progress in [`Phase::Open`].
#[derive(Default)]
struct Flow {
    /// How many of the plaintext bytes waiting in the source leg's reader
    /// (from its first unconsumed one) the inspectors have seen: a chunk
    /// the other leg took only part of is not inspected twice.
    inspected: usize,
    /// The source leg ended: with close_notify (`Some(true)`) or without
    /// (`Some(false)`, a truncation mirrored as such).
    ended: Option<bool>,
    /// The end was passed on to the other leg.
    forwarded: bool,
    /// The TCP FIN followed.
    closed: bool,
}

/// The stage; see the module note.
pub struct Intercept {
    ctx: Arc<TlsContext>,
    rt: Arc<ProfileRuntime>,
    waker: Option<Waker>,
    phase: Phase,
    /// Client bytes the decision point's parser has consumed already.
    skip: usize,
    hello: ClientHello,
    client_ip: IpAddr,
    client_port: u16,
    server_ip: IpAddr,
    server_port: u16,
    name: ServerName<'static>,
    record: TlsLog,
    pipeline: Pipeline,
    /// The client leg's TLS copy (`export = ["pcap-tls"]`), and the key
    /// log lines its Decryption Secrets Blocks are made of.
    tls_tap: Option<Tap>,
    keys: Option<Arc<KeyCollect>>,
    flows: [Flow; 2],
    deadline: Option<Instant>,
    /// The client's handshake was complete (the certificate was accepted).
    down_ready: bool,
    /// Counted among the engine's decrypted connections in progress.
    counted: bool,
    /// Inbound inspection: the server profile (its certificate and HSM
    /// key are what the client sees). `None`: the forward proxy.
    inbound: Option<Arc<ServerRuntime>>,
}

/// Reads TLS bytes from a half for rustls; end of stream after the peer's
/// FIN.
struct HalfReader<'a> {
    half: &'a mut dyn ByteStream,
    count: &'a mut u64,
}

impl Read for HalfReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.half.readable().min(buf.len());
        if n == 0 {
            return if self.half.peer_finished() {
                Ok(0)
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            };
        }
        let bytes = self.half.read(n);
        buf[..bytes.len()].copy_from_slice(&bytes);
        *self.count += bytes.len() as u64;
        Ok(bytes.len())
    }
}

/// A client half whose bytes are also kept for the client leg's TLS copy:
/// what the stage read (the ClientHello included) and what it wrote.
struct Tee<'a> {
    half: &'a mut dyn ByteStream,
    read: Vec<u8>,
    written: Vec<u8>,
    closed: bool,
}

impl ByteStream for Tee<'_> {
    fn readable(&self) -> usize {
        self.half.readable()
    }
    fn read(&mut self, max: usize) -> Vec<u8> {
        let bytes = self.half.read(max);
        self.read.extend_from_slice(&bytes);
        bytes
    }
    fn send_space(&self) -> usize {
        self.half.send_space()
    }
    fn write(&mut self, data: &[u8]) -> usize {
        let n = self.half.write(data);
        self.written.extend_from_slice(&data[..n]);
        n
    }
    fn peer_finished(&self) -> bool {
        self.half.peer_finished()
    }
    fn writable(&self) -> bool {
        self.half.writable()
    }
    fn close(&mut self) {
        self.closed = true;
        self.half.close();
    }
    fn unsent(&self) -> usize {
        self.half.unsent()
    }
}

/// Gathers the client leg's key log (NSS format) for its TLS copy, and
/// passes each line on to the profile's own key log, if it has one.
#[derive(Debug)]
struct KeyCollect {
    inner: Arc<dyn KeyLog>,
    lines: Mutex<Vec<u8>>,
}

impl KeyCollect {
    fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.lines.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl KeyLog for KeyCollect {
    fn log(&self, label: &str, client_random: &[u8], secret: &[u8]) {
        if self.inner.will_log(label) {
            self.inner.log(label, client_random, secret);
        }
        let line = keylog_line(label, client_random, secret);
        self.lines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(line.as_bytes());
    }

    fn will_log(&self, _label: &str) -> bool {
        true
    }
}

/// Writes TLS bytes into a half's send buffer, as far as it has room.
struct HalfWriter<'a>(&'a mut dyn ByteStream);

impl Write for HalfWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        match self.0.write(buf) {
            0 => Err(io::ErrorKind::WouldBlock.into()),
            n => Ok(n),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes what rustls has for the wire into `half`; true if anything went.
fn flush_tls<D: SideData>(conn: &mut ConnectionCommon<D>, half: &mut dyn ByteStream) -> bool {
    let mut any = false;
    while conn.wants_write() {
        match conn.write_tls(&mut HalfWriter(half)) {
            Ok(0) | Err(_) => break,
            Ok(_) => any = true,
        }
    }
    any
}

/// Feeds rustls what a half has received (if it wants it); true if bytes
/// (or the end of the stream) went in. An error is a fatal TLS error
/// (rustls has queued the alert to send).
fn feed_tls<D: SideData>(
    conn: &mut ConnectionCommon<D>,
    half: &mut dyn ByteStream,
    count: &mut u64,
    eof_fed: &mut bool,
    watch: Option<&Arc<Watch>>,
) -> Result<bool, rustls::Error> {
    if !conn.wants_read() || *eof_fed {
        return Ok(false);
    }
    if half.readable() == 0 && !half.peer_finished() {
        return Ok(false);
    }
    match conn.read_tls(&mut HalfReader { half, count }) {
        Ok(0) => *eof_fed = true,
        Ok(_) => {}
        Err(_) => return Ok(false),
    }
    match watch {
        Some(w) => w.during(|| conn.process_new_packets())?,
        None => conn.process_new_packets()?,
    };
    Ok(true)
}

/// While the client waits (for its certificate, for the HSM), the server
/// may speak (session tickets): its leg keeps being read.
fn keep_reading(up: &mut ClientConnection, server: &mut dyn ByteStream, relayed: &mut [u64; 2]) {
    let mut eof = false;
    while let Ok(true) = feed_tls(up, server, &mut relayed[1], &mut eof, None) {}
    flush_tls(up, server);
}

/// Writes what the pipeline's rewriter has for direction `dir` into
/// `to`'s plaintext writer, as much as it takes; true on progress.
fn pass_rewritten<B: SideData>(
    pipeline: &mut Pipeline,
    dir: Direction,
    to: &mut ConnectionCommon<B>,
) -> bool {
    let Some(out) = pipeline.output(dir).filter(|o| !o.is_empty()) else {
        return false;
    };
    match to.writer().write(out) {
        Ok(n) if n > 0 => {
            out.drain(..n);
            true
        }
        _ => false,
    }
}

/// A fatal alert as a plaintext TLS record, for a client whose handshake
/// never reached a ServerHello.
fn alert_record(desc: u8) -> [u8; 7] {
    [21, 3, 3, 0, 2, 2, desc]
}

fn version_name(v: Option<ProtocolVersion>) -> Option<String> {
    v.map(|v| match v {
        ProtocolVersion::TLSv1_2 => "TLSv1.2".to_string(),
        ProtocolVersion::TLSv1_3 => "TLSv1.3".to_string(),
        other => format!("{other:?}"),
    })
}

fn suite_name(s: Option<CipherSuite>) -> Option<String> {
    s.map(|s| s.as_str().map_or_else(|| format!("{s:?}"), str::to_owned))
}

fn side_of<D: SideData>(conn: &ConnectionCommon<D>) -> TlsSide {
    TlsSide {
        version: version_name(conn.protocol_version()),
        suite: suite_name(conn.negotiated_cipher_suite().map(|s| s.suite())),
        group: conn
            .negotiated_key_exchange_group()
            .and_then(|g| g.name().as_str().map(str::to_owned)),
        alpn: conn
            .alpn_protocol()
            .map(|a| String::from_utf8_lossy(a).into_owned()),
        sni: None,
        resumed: conn.handshake_kind() == Some(HandshakeKind::Resumed),
    }
}

/// Unix seconds as RFC 3339 (UTC).
pub fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// What the profile makes of each problem in a verdict.
fn judge(v: &Verdict, rt: &ProfileRuntime) -> Vec<(&'static str, String, OnError)> {
    let p = &rt.profile;
    let mut out = Vec::new();
    if v.expired {
        out.push(("expired", "expired".to_string(), p.expired));
    }
    if v.not_yet_valid {
        out.push(("not-yet-valid", "not yet valid".to_string(), p.expired));
    }
    if let Some(why) = &v.untrusted {
        out.push(("untrusted", format!("untrusted: {why}"), p.untrusted));
    }
    if v.name_mismatch {
        out.push((
            "name-mismatch",
            "name mismatch".to_string(),
            p.name_mismatch,
        ));
    }
    if let Some(why) = &v.weak {
        out.push(("weak", format!("weak: {why}"), p.weak));
    }
    if v.revoked {
        out.push(("revoked", "revoked".to_string(), p.revoked));
    }
    out
}

/// Whether a client can verify ECDSA signatures (signature_algorithms).
fn client_takes_ecdsa(hello: &ClientHello) -> bool {
    // ecdsa_secp256r1_sha256, ecdsa_secp384r1_sha384, ecdsa_secp521r1_sha512
    hello
        .sig_schemes
        .iter()
        .any(|s| matches!(s, 0x0403 | 0x0503 | 0x0603))
}

impl Intercept {
    /// Starts interception: opens the upstream leg. `skip` is how many of
    /// the client's bytes the decision point parsed into `accepted`.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        ctx: Arc<TlsContext>,
        rt: Arc<ProfileRuntime>,
        inbound: Option<Arc<ServerRuntime>>,
        waker: Option<Waker>,
        accepted: Box<Accepted>,
        hello: ClientHello,
        skip: usize,
        (client, server): (SocketAddr, SocketAddr),
        now: Instant,
    ) -> Intercept {
        let (client_ip, client_port) = (client.ip(), client.port());
        let (server_ip, server_port) = (server.ip(), server.port());
        let (name, named) = server_name(hello.sni.as_deref(), server_ip);
        let mut record = TlsLog {
            mode: if inbound.is_some() {
                "inbound"
            } else {
                "forward"
            }
            .into(),
            server_profile: inbound.as_ref().map(|s| s.name.clone()),
            server_key: inbound.as_ref().map(|s| s.key_name()),
            profile: rt.name.clone(),
            client: TlsSide {
                sni: hello.sni.clone(),
                ..TlsSide::default()
            },
            server: TlsSide {
                sni: named.then(|| hello.sni.clone()).flatten(),
                ..TlsSide::default()
            },
            ..TlsLog::default()
        };
        ctx.stats.active.fetch_add(1, Ordering::Relaxed);
        let mut me = Intercept {
            ctx,
            rt,
            waker,
            phase: Phase::Done,
            skip,
            hello,
            client_ip,
            client_port,
            server_ip,
            server_port,
            name,
            record: TlsLog::default(),
            pipeline: Pipeline::default(),
            tls_tap: None,
            keys: None,
            flows: Default::default(),
            deadline: None,
            down_ready: false,
            counted: true,
            inbound,
        };
        me.tls_tap = me
            .rt
            .inspection
            .export
            .as_ref()
            .and_then(|(exp, sinks)| exp.tls_tap(*sinks, client, server));
        match connect(&me.rt.client, me.name.clone(), me.hello.alpn.clone()) {
            Ok((mut up, watch)) => {
                up.set_buffer_limit(Some(TLS_BUFFER));
                me.phase = Phase::Upstream {
                    accepted,
                    up: Box::new(up),
                    watch,
                };
                me.deadline = Some(now + me.ctx.settings.handshake_timeout);
            }
            Err(e) => {
                record.outcome = "failed".into();
                record.error = Some(TlsError {
                    stage: ErrorStage::UpstreamHandshake.label().into(),
                    reason: format!("cannot start TLS toward the server: {e}"),
                });
            }
        }
        if matches!(me.phase, Phase::Done) {
            me.ctx.stats.failed.fetch_add(1, Ordering::Relaxed);
        }
        me.record = record;
        me
    }

    pub fn record(&self) -> &TlsLog {
        &self.record
    }

    /// The record as the decryption log keeps it, once the connection is
    /// over: one that ended before any outcome (the client or the server
    /// went away mid-handshake) says so, and is counted as failed. Called
    /// once, when the record is written.
    pub fn final_record(&self) -> TlsLog {
        let mut r = self.record.clone();
        if r.outcome.is_empty() {
            r.outcome = "failed".into();
            self.ctx.stats.failed.fetch_add(1, Ordering::Relaxed);
            let (stage, reason) = match &self.phase {
                Phase::Upstream { .. } => (
                    ErrorStage::UpstreamHandshake,
                    "the connection ended during the server's handshake",
                ),
                Phase::Minting { .. } => (
                    ErrorStage::Mint,
                    "the connection ended while its certificate was minted",
                ),
                Phase::Handshaking { .. } => (
                    ErrorStage::DownstreamHandshake,
                    "the connection ended while its handshake waited for the HSM",
                ),
                Phase::Open { .. } | Phase::Done => (
                    ErrorStage::DownstreamHandshake,
                    "the client ended the connection before completing its handshake",
                ),
            };
            r.error.get_or_insert_with(|| TlsError {
                stage: stage.label().into(),
                reason: reason.into(),
            });
        }
        r
    }

    /// When the stage must be pumped again at the latest; none once it
    /// is over (a deadline left behind by a finished connection would be
    /// due for ever).
    pub fn deadline(&self) -> Option<Instant> {
        if matches!(self.phase, Phase::Done) {
            None
        } else {
            self.deadline
        }
    }

    /// Drives the connection; see the module note.
    pub fn pump(
        &mut self,
        client: &mut dyn ByteStream,
        server: &mut dyn ByteStream,
        relayed: &mut [u64; 2],
        now: Instant,
    ) -> Pump {
        if self.tls_tap.is_none() {
            return self.drive(client, server, relayed, now);
        }
        let mut tee = Tee {
            half: client,
            read: Vec::new(),
            written: Vec::new(),
            closed: false,
        };
        let out = self.drive(&mut tee, server, relayed, now);
        let Some(tap) = self.tls_tap.as_mut() else {
            return out;
        };
        // The keys first: they come before the records that need them.
        if let Some(k) = &self.keys {
            tap.keys(k.take());
        }
        let mut unused = Report::default();
        tap.on_data(Direction::ClientToServer, &tee.read, now, &mut unused);
        tap.on_data(Direction::ServerToClient, &tee.written, now, &mut unused);
        if tee.peer_finished() {
            tap.on_end(Direction::ClientToServer, now, &mut unused);
        }
        if tee.closed {
            tap.on_end(Direction::ServerToClient, now, &mut unused);
        }
        out
    }

    fn drive(
        &mut self,
        client: &mut dyn ByteStream,
        server: &mut dyn ByteStream,
        relayed: &mut [u64; 2],
        now: Instant,
    ) -> Pump {
        if self.skip > 0 {
            let n = client.readable().min(self.skip);
            if n > 0 {
                client.read(n);
                relayed[0] += n as u64;
                self.skip -= n;
            }
        }
        let out = match std::mem::replace(&mut self.phase, Phase::Done) {
            Phase::Upstream {
                accepted,
                up,
                watch,
            } => self.upstream(accepted, up, watch, client, server, relayed, now),
            Phase::Minting {
                accepted,
                up,
                slot,
                since,
            } => self.minting(accepted, up, slot, since, client, server, relayed, now),
            Phase::Handshaking { up, slot, since } => {
                self.handshaking(up, slot, since, client, server, relayed, now)
            }
            Phase::Open { down, up } => self.open(down, up, client, server, relayed, now),
            Phase::Done => {
                drain(client);
                Pump::Go
            }
        };
        if matches!(self.phase, Phase::Done) {
            self.finish_counting();
        }
        out
    }

    fn finish_counting(&mut self) {
        if self.counted {
            self.counted = false;
            self.ctx.stats.active.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Ends the connection before the client's handshake: an alert to the
    /// client (or a RST), a RST to the server.
    fn refuse(
        &mut self,
        client: &mut dyn ByteStream,
        stage: ErrorStage,
        reason: String,
        outcome: &str,
        farewell: Farewell,
    ) -> Pump {
        self.record.outcome = outcome.into();
        self.record.error = Some(TlsError {
            stage: stage.label().into(),
            reason,
        });
        let counter = match outcome {
            "blocked" => &self.ctx.stats.blocked,
            "no-decrypt" => &self.ctx.stats.no_decrypt,
            _ => &self.ctx.stats.failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.phase = Phase::Done;
        self.deadline = None;
        let bytes = match farewell {
            Farewell::Alert(desc) => alert_record(desc).to_vec(),
            Farewell::Bytes(b) => b,
            Farewell::Reset => {
                return Pump::Abort {
                    client: true,
                    server: true,
                }
            }
        };
        client.write(&bytes);
        client.close();
        Pump::Abort {
            client: false,
            server: true,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn upstream(
        &mut self,
        accepted: Box<Accepted>,
        mut up: Box<ClientConnection>,
        watch: Arc<Watch>,
        client: &mut dyn ByteStream,
        server: &mut dyn ByteStream,
        relayed: &mut [u64; 2],
        now: Instant,
    ) -> Pump {
        let mut eof = false;
        loop {
            flush_tls(&mut up, server);
            match feed_tls(&mut up, server, &mut relayed[1], &mut eof, Some(&watch)) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    flush_tls(&mut up, server);
                    return self.upstream_failed(client, &watch, &e);
                }
            }
        }
        flush_tls(&mut up, server);
        if up.is_handshaking() {
            if eof || server.peer_finished() {
                return self.refuse(
                    client,
                    ErrorStage::UpstreamHandshake,
                    "the server closed the connection during the handshake".into(),
                    "failed",
                    Farewell::Alert(ALERT_HANDSHAKE_FAILURE),
                );
            }
            if self.deadline.is_some_and(|d| now >= d) {
                return self.refuse(
                    client,
                    ErrorStage::UpstreamHandshake,
                    format!(
                        "the server did not complete its handshake within {} s",
                        self.ctx.settings.handshake_timeout.as_secs()
                    ),
                    "failed",
                    Farewell::Alert(ALERT_HANDSHAKE_FAILURE),
                );
            }
            self.phase = Phase::Upstream {
                accepted,
                up,
                watch,
            };
            return Pump::Go;
        }
        self.record.server = TlsSide {
            sni: self.record.server.sni.take(),
            ..side_of(&up)
        };
        self.upstream_ready(accepted, up, &watch, client, server, relayed, now)
    }

    fn upstream_failed(
        &mut self,
        client: &mut dyn ByteStream,
        watch: &Watch,
        e: &rustls::Error,
    ) -> Pump {
        // A chain the server sent before the handshake failed (a key too
        // weak for its signature to be verified, say) is judged all the
        // same, so the log says what was wrong with it. Its problems block
        // whatever the profile says: without a verified handshake there is
        // nothing to pass on.
        let chain = watch.chain();
        if !chain.is_empty() {
            let problems = self.judge_chain(&chain);
            if !problems.is_empty() {
                let what: Vec<&str> = problems.iter().map(|p| p.1.as_str()).collect();
                return self.refuse(
                    client,
                    ErrorStage::Verification,
                    format!(
                        "upstream certificate blocked: {} (the server's handshake failed: {e})",
                        what.join(", ")
                    ),
                    "blocked",
                    Farewell::Alert(ALERT_ACCESS_DENIED),
                );
            }
        }
        let unsupported = matches!(
            e,
            rustls::Error::AlertReceived(
                AlertDescription::ProtocolVersion | AlertDescription::InsufficientSecurity
            ) | rustls::Error::PeerIncompatible(
                PeerIncompatible::ServerDoesNotSupportTls12Or13
                    | PeerIncompatible::ServerTlsVersionIsDisabledByOurConfig
                    | PeerIncompatible::NoCipherSuitesInCommon
                    | PeerIncompatible::NoKxGroupsInCommon
            )
        );
        let reason = format!("the server's TLS failed: {e}");
        if unsupported {
            return self.fall_back(
                client,
                ErrorStage::UpstreamHandshake,
                format!("{reason} (outside the profile's versions, suites or groups)"),
                self.rt.profile.unsupported,
                ALERT_PROTOCOL_VERSION,
            );
        }
        self.refuse(
            client,
            ErrorStage::UpstreamHandshake,
            reason,
            "failed",
            Farewell::Alert(ALERT_HANDSHAKE_FAILURE),
        )
    }

    /// A connection the profile does not decrypt after the takeover: it
    /// cannot continue, so it ends, and the site is excluded so the next
    /// connection passes (`no-decrypt`); or it is blocked.
    fn fall_back(
        &mut self,
        client: &mut dyn ByteStream,
        stage: ErrorStage,
        reason: String,
        fallback: Fallback,
        alert: u8,
    ) -> Pump {
        match fallback {
            Fallback::Block => {
                self.refuse(client, stage, reason, "blocked", Farewell::Alert(alert))
            }
            Fallback::NoDecrypt => {
                self.exclude(false, &reason);
                self.refuse(client, stage, reason, "no-decrypt", Farewell::Reset)
            }
        }
    }

    /// Classifies `chain` (leaf first), records the leaf and the verdict,
    /// and returns each problem with what the profile makes of it.
    fn judge_chain(
        &mut self,
        chain: &[rustls::pki_types::CertificateDer<'static>],
    ) -> Vec<(&'static str, String, OnError)> {
        let verdict = classify(
            &self.rt.trust,
            chain,
            &self.name,
            UnixTime::since_unix_epoch(Duration::from_secs(unix_now().max(0) as u64)),
        );
        if let Some(Ok(info)) = chain.first().map(|l| leaf_info(l)) {
            self.record.upstream_cert = Some(CertLog {
                subject: info.subject,
                issuer: info.issuer,
                sha256: info.sha256,
                not_after: rfc3339(info.not_after),
                key: info.key,
            });
        }
        let problems = judge(&verdict, &self.rt);
        self.record.verdict = problems.iter().map(|p| p.0.to_string()).collect();
        self.record.verdict_detail = problems.iter().map(|p| p.1.clone()).collect();
        problems
    }

    /// Excludes the site from decryption: for every client when the
    /// server is the reason (it wants client certificates, versions the
    /// profile does not decrypt), for this client only when the client is
    /// (it refused the certificate: a pinned app), so one host cannot turn
    /// inspection off for everyone by refusing a certificate.
    fn exclude(&self, only_this_client: bool, reason: &str) {
        self.ctx.exclusions.add(
            only_this_client.then_some(self.client_ip),
            Site {
                sni: self.hello.sni.clone(),
                server: self.server_ip,
                port: self.server_port,
                profile: self.rt.name.clone(),
            },
            Duration::from_secs(self.rt.profile.exclude_secs),
            reason,
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn upstream_ready(
        &mut self,
        accepted: Box<Accepted>,
        up: Box<ClientConnection>,
        watch: &Watch,
        client: &mut dyn ByteStream,
        server: &mut dyn ByteStream,
        relayed: &mut [u64; 2],
        now: Instant,
    ) -> Pump {
        if watch.asked() {
            return self.fall_back(
                client,
                ErrorStage::UpstreamHandshake,
                "the server asks for a client certificate".into(),
                self.rt.profile.client_auth,
                ALERT_ACCESS_DENIED,
            );
        }
        let chain: Vec<_> = up
            .peer_certificates()
            .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
            .unwrap_or_default();
        let Some(leaf) = chain.first().cloned() else {
            return self.refuse(
                client,
                ErrorStage::Verification,
                "the server sent no certificate".into(),
                "blocked",
                Farewell::Alert(ALERT_ACCESS_DENIED),
            );
        };
        if let Some(sr) = self.inbound.clone() {
            return self.inbound_ready(&sr, accepted, up, &chain, client, server, relayed, now);
        }
        let problems = self.judge_chain(&chain);
        if problems.iter().any(|p| p.2 == OnError::Block) {
            let what: Vec<&str> = problems.iter().map(|p| p.1.as_str()).collect();
            return self.refuse(
                client,
                ErrorStage::Verification,
                format!("upstream certificate blocked: {}", what.join(", ")),
                "blocked",
                Farewell::Alert(ALERT_ACCESS_DENIED),
            );
        }
        let role = if problems.is_empty() {
            CaRole::ForwardTrust
        } else {
            CaRole::ForwardUntrust
        };
        let upstream: [u8; 32] = Sha256::digest(leaf.as_ref()).into();
        match self.certificate(upstream, leaf.as_ref(), role) {
            Ok(Lookup::Hit(minted)) => {
                self.record.cache = Some("hit".into());
                self.open_downstream(accepted, up, &minted, client, server, relayed, now)
            }
            Ok(Lookup::Wait { slot, started }) => {
                self.record.cache = Some(if started { "miss" } else { "joined" }.into());
                self.ctx.stats.parked.fetch_add(1, Ordering::Relaxed);
                self.deadline = Some(slot.deadline());
                self.phase = Phase::Minting {
                    accepted,
                    up,
                    slot,
                    since: now,
                };
                // The answer may be in already (a joined mint).
                self.pump(client, server, relayed, now)
            }
            Err(f) => self.mint_failed(client, f),
        }
    }

    /// The impersonation certificate for `leaf`: cached, or a mint.
    fn certificate(
        &mut self,
        upstream: [u8; 32],
        leaf: &[u8],
        role: CaRole,
    ) -> Result<Lookup, MintFailure> {
        let ecdsa = client_takes_ecdsa(&self.hello);
        let cas = self.ctx.cas_for(self.rt.profile.token.as_deref());
        if let Some(why) = &cas.unavailable {
            return Err(MintFailure::Hsm(format!(
                "token {:?} cannot be used: {why}",
                cas.token
            )));
        }
        let ca = cas.pick(role, ecdsa).ok_or_else(|| {
            MintFailure::Bad(format!(
                "no {} CA {}on token {:?} (run `loupe ca init` or `loupe ca rotate` with \
                 --token {})",
                role.name(),
                if ecdsa { "" } else { "with an RSA key " },
                cas.token,
                cas.token
            ))
        })?;
        self.record.ca = Some(ca.name());
        self.record.ca_token = Some(ca.token.clone());
        let kind = if ecdsa {
            LeafKind::EcP256
        } else {
            LeafKind::Rsa2048
        };
        let key_pair = self.ctx.keys.current(kind);
        let append_cn = self.rt.profile.append_cn_to_san;
        let key = CacheKey {
            upstream,
            token: ca.token.clone(),
            ca: ca.label.clone(),
            leaf: key_pair.generation,
            append_cn,
        };
        let ctx = self.ctx.clone();
        let waker = self.waker.clone();
        let requester = format!(
            "loupe-dataplane mint {}",
            self.hello.sni.as_deref().unwrap_or("(no sni)")
        );
        ctx.cache.lookup(key, unix_now(), || {
            let signer = ctx
                .signer
                .as_ref()
                .ok_or_else(|| MintFailure::Hsm("the engine runs without an HSM".into()))?;
            let tbs = build_tbs(
                leaf,
                &ca.issuer,
                &key_pair.key,
                &MintOptions {
                    append_cn_to_san: append_cn,
                    max_validity_days: 397,
                },
                unix_now(),
                random_serial().map_err(|e| MintFailure::Bad(e.to_string()))?,
            )
            .map_err(|e| {
                MintFailure::Bad(format!("cannot mirror the server's certificate: {e}"))
            })?;
            let timeout = ctx.settings.hsm_timeout;
            let ticket = signer
                .submit(
                    Request {
                        token: ca.token.clone(),
                        key: ca.label.clone(),
                        mech: ca.mech,
                        message: tbs.der.clone(),
                        purpose: "mint impersonation certificate".into(),
                        requester,
                        timeout: Some(timeout),
                    },
                    waker,
                )
                .map_err(MintFailure::Hsm)?;
            Ok(MintStart {
                ticket,
                not_after: tbs.not_after(),
                tbs,
                ca: ca.clone(),
                leaf: key_pair.clone(),
                timeout,
            })
        })
    }

    fn mint_failed(&mut self, client: &mut dyn ByteStream, f: MintFailure) -> Pump {
        match f {
            MintFailure::Hsm(why) => match self.rt.profile.hsm_unavailable {
                // Not excluded: the HSM's trouble is not the site's.
                Fallback::Block => self.refuse(
                    client,
                    ErrorStage::Mint,
                    format!("HSM unavailable: {why}"),
                    "blocked",
                    Farewell::Alert(ALERT_INTERNAL_ERROR),
                ),
                Fallback::NoDecrypt => self.refuse(
                    client,
                    ErrorStage::Mint,
                    format!("HSM unavailable: {why} (the connection was already taken over)"),
                    "failed",
                    Farewell::Reset,
                ),
            },
            MintFailure::Bad(why) => self.refuse(
                client,
                ErrorStage::Mint,
                why,
                "failed",
                Farewell::Alert(ALERT_INTERNAL_ERROR),
            ),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn minting(
        &mut self,
        accepted: Box<Accepted>,
        mut up: Box<ClientConnection>,
        slot: Arc<MintSlot>,
        since: Instant,
        client: &mut dyn ByteStream,
        server: &mut dyn ByteStream,
        relayed: &mut [u64; 2],
        now: Instant,
    ) -> Pump {
        keep_reading(&mut up, server, relayed);
        let result = slot.poll(&self.ctx.cache, now);
        let Some(result) = result else {
            if let Some(w) = &self.waker {
                slot.wait_with(w);
            }
            // Polled again after registering: an answer that slipped in
            // between is not missed.
            if slot.poll(&self.ctx.cache, now).is_none() {
                self.phase = Phase::Minting {
                    accepted,
                    up,
                    slot,
                    since,
                };
                return Pump::Parked;
            }
            return self.minting(accepted, up, slot, since, client, server, relayed, now);
        };
        self.ctx.stats.parked.fetch_sub(1, Ordering::Relaxed);
        self.record.mint_wait_us = Some(now.saturating_duration_since(since).as_micros() as u64);
        match result {
            Ok(minted) => {
                if self.record.cache.as_deref() == Some("miss") {
                    self.ctx.stats.mint_took(minted.took);
                }
                self.open_downstream(accepted, up, &minted, client, server, relayed, now)
            }
            Err(f) => self.mint_failed(client, f),
        }
    }

    /// The client leg's configuration: `certified` is what the client is
    /// shown, with the ALPN the server chose; the inspection pipeline is
    /// set up for that protocol.
    fn downstream_config(
        &mut self,
        up: &ClientConnection,
        certified: &Arc<rustls::sign::CertifiedKey>,
    ) -> ServerConfig {
        let mut cfg: ServerConfig = (*self.rt.server).clone();
        cfg.cert_resolver = Arc::new(OneCert(Some(certified.clone())));
        if self.tls_tap.is_some() {
            let k = Arc::new(KeyCollect {
                inner: cfg.key_log.clone(),
                lines: Mutex::new(Vec::new()),
            });
            cfg.key_log = k.clone();
            self.keys = Some(k);
        }
        if let Some(leaf) = certified.cert.first() {
            resume::bind(&mut cfg, &self.rt.name, leaf);
        }
        cfg.alpn_protocols = up
            .alpn_protocol()
            .map(|a| vec![a.to_vec()])
            .unwrap_or_default();
        self.pipeline = self.rt.inspection.pipeline(
            up.alpn_protocol(),
            self.hello.sni.as_deref(),
            (
                SocketAddr::new(self.client_ip, self.client_port),
                SocketAddr::new(self.server_ip, self.server_port),
            ),
        );
        cfg
    }

    #[allow(clippy::too_many_arguments)]
    fn open_downstream(
        &mut self,
        accepted: Box<Accepted>,
        up: Box<ClientConnection>,
        minted: &Minted,
        client: &mut dyn ByteStream,
        server: &mut dyn ByteStream,
        relayed: &mut [u64; 2],
        now: Instant,
    ) -> Pump {
        let cfg = self.downstream_config(&up, &minted.certified);
        let started = accepted
            .into_connection(Arc::new(cfg))
            .map_err(|(e, mut alert)| {
                let mut bytes = Vec::new();
                let _ = alert.write_all(&mut bytes);
                (e, bytes)
            });
        self.downstream_started(started, up, client, server, relayed, now)
    }

    /// The client's handshake has begun (or could not).
    fn downstream_started(
        &mut self,
        started: super::inbound::Handshake,
        up: Box<ClientConnection>,
        client: &mut dyn ByteStream,
        server: &mut dyn ByteStream,
        relayed: &mut [u64; 2],
        now: Instant,
    ) -> Pump {
        match started {
            Ok(mut down) => {
                down.set_buffer_limit(Some(TLS_BUFFER));
                self.deadline = Some(now + self.ctx.settings.handshake_timeout);
                self.open(Box::new(down), up, client, server, relayed, now)
            }
            // The server key's signature failed (the HSM is down, timed
            // out or refused): the client has seen nothing of the
            // handshake yet and gets a handshake_failure alert.
            Err((rustls::Error::General(why), _)) if self.inbound.is_some() => self.refuse(
                client,
                ErrorStage::DownstreamHandshake,
                why,
                "failed",
                Farewell::Alert(ALERT_HANDSHAKE_FAILURE),
            ),
            Err((e, bytes)) => self.refuse(
                client,
                ErrorStage::DownstreamHandshake,
                format!("the client's handshake cannot go on: {e}"),
                "failed",
                Farewell::Bytes(bytes),
            ),
        }
    }

    /// Inbound: the server's handshake is through. Its certificate is
    /// checked as the server profile says (never passed on: the client is
    /// shown the real certificate), then the client's handshake, which
    /// needs the server key's signature, goes to the handshake pool.
    #[allow(clippy::too_many_arguments)]
    fn inbound_ready(
        &mut self,
        sr: &ServerRuntime,
        accepted: Box<Accepted>,
        up: Box<ClientConnection>,
        chain: &[rustls::pki_types::CertificateDer<'static>],
        client: &mut dyn ByteStream,
        server: &mut dyn ByteStream,
        relayed: &mut [u64; 2],
        now: Instant,
    ) -> Pump {
        let problem = match sr.profile.upstream {
            UpstreamCheck::Pinned => {
                if let Some(Ok(info)) = chain.first().map(|l| leaf_info(l)) {
                    self.record.upstream_cert = Some(CertLog {
                        subject: info.subject,
                        issuer: info.issuer,
                        sha256: info.sha256,
                        not_after: rfc3339(info.not_after),
                        key: info.key,
                    });
                }
                (chain.first().map(|c| c.as_ref()) != Some(sr.leaf().as_ref())).then(|| {
                    format!(
                        "the server's certificate is not the one server profile {:?} pins",
                        sr.name
                    )
                })
            }
            UpstreamCheck::TrustStore => {
                let problems = self.judge_chain(chain);
                let what: Vec<&str> = problems.iter().map(|p| p.1.as_str()).collect();
                (!what.is_empty()).then(|| what.join(", "))
            }
        };
        if let Some(why) = problem {
            return self.refuse(
                client,
                ErrorStage::Verification,
                format!("upstream certificate blocked: {why}"),
                "blocked",
                Farewell::Alert(ALERT_ACCESS_DENIED),
            );
        }
        let cfg = self.downstream_config(&up, &sr.certified);
        let hsm = self.ctx.settings.hsm_timeout;
        // The job must start within the HSM deadline; once started, its
        // signature is given up on after another.
        let queue_deadline = now + hsm;
        let submitted = self.ctx.pool().and_then(|pool| {
            pool.submit(
                accepted,
                Arc::new(cfg),
                format!(
                    "loupe-dataplane inbound {} ({})",
                    self.hello.sni.as_deref().unwrap_or("(no sni)"),
                    SocketAddr::new(self.client_ip, self.client_port)
                ),
                self.waker.clone(),
                queue_deadline,
            )
        });
        match submitted {
            Ok(slot) => {
                self.ctx.stats.parked.fetch_add(1, Ordering::Relaxed);
                self.deadline = Some(queue_deadline + hsm + Duration::from_secs(1));
                // Measured on the clock, not the pump's `now` (taken when
                // the worker's batch began).
                self.handshaking(up, slot, Instant::now(), client, server, relayed, now)
            }
            Err(why) => self.refuse(
                client,
                ErrorStage::DownstreamHandshake,
                format!("HSM unavailable: {why}"),
                "failed",
                Farewell::Alert(ALERT_HANDSHAKE_FAILURE),
            ),
        }
    }

    /// Inbound: waiting for the handshake pool (the server keeps being
    /// read meanwhile).
    #[allow(clippy::too_many_arguments)]
    fn handshaking(
        &mut self,
        mut up: Box<ClientConnection>,
        slot: Arc<HandshakeSlot>,
        since: Instant,
        client: &mut dyn ByteStream,
        server: &mut dyn ByteStream,
        relayed: &mut [u64; 2],
        now: Instant,
    ) -> Pump {
        keep_reading(&mut up, server, relayed);
        if let Some(started) = slot.take() {
            self.ctx.stats.parked.fetch_sub(1, Ordering::Relaxed);
            self.record.hsm_wait_us = Some(since.elapsed().as_micros() as u64);
            return self.downstream_started(started, up, client, server, relayed, now);
        }
        if self.deadline.is_some_and(|d| now >= d) {
            self.ctx.stats.parked.fetch_sub(1, Ordering::Relaxed);
            return self.refuse(
                client,
                ErrorStage::DownstreamHandshake,
                "HSM unavailable: the handshake's signature did not come in time".into(),
                "failed",
                Farewell::Alert(ALERT_HANDSHAKE_FAILURE),
            );
        }
        self.phase = Phase::Handshaking { up, slot, since };
        Pump::Parked
    }

    fn open(
        &mut self,
        mut down: Box<ServerConnection>,
        mut up: Box<ClientConnection>,
        client: &mut dyn ByteStream,
        server: &mut dyn ByteStream,
        relayed: &mut [u64; 2],
        now: Instant,
    ) -> Pump {
        let mut eof = [self.flows[0].ended.is_some(), self.flows[1].ended.is_some()];
        for _ in 0..MAX_ROUNDS {
            let mut progress = false;
            match feed_tls(&mut down, client, &mut relayed[0], &mut eof[0], None) {
                Ok(p) => progress |= p,
                Err(e) => return self.down_failed(down, client, &e),
            }
            match feed_tls(&mut up, server, &mut relayed[1], &mut eof[1], None) {
                Ok(p) => progress |= p,
                Err(e) => {
                    flush_tls(&mut up, server);
                    return self.data_failed(format!("the server's TLS failed: {e}"));
                }
            }
            if !self.down_ready && !down.is_handshaking() {
                self.down_ready = true;
                self.deadline = None;
                self.record.client = TlsSide {
                    sni: self.record.client.sni.take(),
                    ..side_of(&down)
                };
                self.record.outcome = if self.record.verdict.is_empty() {
                    "decrypted".into()
                } else {
                    "decrypted-untrusted".into()
                };
                let counter = if self.record.verdict.is_empty() {
                    &self.ctx.stats.decrypted
                } else {
                    &self.ctx.stats.passed_on
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
            progress |= self.carry(Direction::ClientToServer, &mut down, &mut up, now);
            progress |= self.carry(Direction::ServerToClient, &mut up, &mut down, now);
            let refused = self.pipeline.take_refused();
            if refused > 0 {
                self.ctx
                    .stats
                    .inspect_blocks
                    .fetch_add(refused, Ordering::Relaxed);
            }
            if let Some(why) = self.pipeline.blocked() {
                // The bytes that matched were not passed on.
                let why = why.to_string();
                // The page may only follow whole responses: with response
                // bytes inspected but not yet passed on, both are reset.
                if let Some(answer) = self.pipeline.answer().map(<[u8]>::to_vec) {
                    if self.flows[1].inspected == 0 {
                        return self.answer_and_close(down, client, &answer, why);
                    }
                }
                return self.blocked_by_inspection(why);
            }
            progress |= flush_tls(&mut up, server);
            progress |= flush_tls(&mut down, client);
            if !progress {
                break;
            }
        }
        // FIN once the leg's TLS (close_notify included) is all out.
        if self.flows[0].forwarded && !self.flows[0].closed && !up.wants_write() {
            self.flows[0].closed = true;
            server.close();
        }
        if self.flows[1].forwarded && !self.flows[1].closed && !down.wants_write() {
            self.flows[1].closed = true;
            client.close();
        }
        if !self.down_ready && self.deadline.is_some_and(|d| now >= d) {
            return self.refuse(
                client,
                ErrorStage::DownstreamHandshake,
                "the client did not complete its handshake in time".into(),
                "failed",
                Farewell::Reset,
            );
        }
        if self.flows[0].closed && self.flows[1].closed {
            self.phase = Phase::Done;
        } else {
            self.phase = Phase::Open { down, up };
        }
        Pump::Go
    }

    /// Moves plaintext from `from`'s reader through the pipeline into
    /// `to`'s writer; passes the end of the stream on. True on progress.
    fn carry<A: SideData, B: SideData>(
        &mut self,
        dir: Direction,
        from: &mut ConnectionCommon<A>,
        to: &mut ConnectionCommon<B>,
        now: Instant,
    ) -> bool {
        let i = dir as usize;
        if self.pipeline.blocked().is_some() {
            // Nothing more is read once an inspector has blocked.
            return false;
        }
        // What the rewriter made of earlier bytes goes first (its output
        // toward the client may also come from the client's bytes).
        let mut progress = pass_rewritten(&mut self.pipeline, dir, to);
        let pending = self.pipeline.output(dir).is_some_and(|o| !o.is_empty());
        if self.flows[i].ended.is_none() && !pending {
            // Straight from one leg's plaintext buffer into the other's
            // writer: no copy of our own, no buffer kept between pumps
            // (unless HTTP/2 is being re-framed).
            let mut reader = from.reader();
            match reader.fill_buf() {
                // Empty only after close_notify, with everything taken.
                Ok([]) => self.flows[i].ended = Some(true),
                Ok(chunk) => {
                    let seen = self.flows[i].inspected.min(chunk.len());
                    if seen < chunk.len() {
                        self.pipeline.data(dir, &chunk[seen..], now);
                        self.record.plaintext_c2s = self.pipeline.bytes[0];
                        self.record.plaintext_s2c = self.pipeline.bytes[1];
                        self.flows[i].inspected = chunk.len();
                    }
                    if self.pipeline.blocked().is_some() {
                        return false;
                    }
                    let taken = if self.pipeline.rewrites() {
                        Ok(self.pipeline.rewrite(dir, chunk, now))
                    } else {
                        to.writer().write(chunk)
                    };
                    if let Ok(n) = taken {
                        if n > 0 {
                            reader.consume(n);
                            self.flows[i].inspected -= n;
                            progress = true;
                        }
                    }
                    if self.pipeline.blocked().is_some() {
                        return false;
                    }
                    progress |= pass_rewritten(&mut self.pipeline, dir, to);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => self.flows[i].ended = Some(false),
            }
        }
        let pending = self.pipeline.output(dir).is_some_and(|o| !o.is_empty());
        let f = &mut self.flows[i];
        if let Some(clean) = f.ended.filter(|_| !pending) {
            if !f.forwarded {
                f.forwarded = true;
                self.pipeline.end(dir, now);
                if clean {
                    to.send_close_notify();
                }
                progress = true;
            }
        }
        progress
    }

    /// The client's TLS failed: rustls has queued its alert. A pinned
    /// client refusing the certificate excludes the site.
    fn down_failed(
        &mut self,
        mut down: Box<ServerConnection>,
        client: &mut dyn ByteStream,
        e: &rustls::Error,
    ) -> Pump {
        flush_tls(&mut down, client);
        client.close();
        let during_handshake = !self.down_ready;
        // A client refusing the forward-untrust CA's certificate is what
        // passing a problem on is for; only a refusal of a trusted one
        // marks a pinned app.
        let passed_on = !self.record.verdict.is_empty();
        let refused_cert = during_handshake
            && matches!(
                e,
                rustls::Error::AlertReceived(
                    AlertDescription::BadCertificate
                        | AlertDescription::UnsupportedCertificate
                        | AlertDescription::CertificateUnknown
                        | AlertDescription::UnknownCA
                        | AlertDescription::CertificateExpired
                        | AlertDescription::DecryptError
                )
            );
        let (reason, outcome) = if refused_cert && passed_on {
            (
                format!(
                    "the client refused the untrusted certificate it was shown, as the profile \
                     intends ({e})"
                ),
                "passed-on",
            )
        } else if refused_cert && self.rt.inspection.can_block() {
            // Excluding the site would let this client past the URL rules
            // and signatures by refusing one certificate: it stays
            // decrypted (and failing) instead.
            (
                format!(
                    "the client refused the certificate ({e}); not excluded from decryption: \
                     the profile's URL rules or signatures may block"
                ),
                "failed",
            )
        } else if refused_cert && self.inbound.is_none() {
            let why = format!("the client refused the certificate ({e}): a pinned app?");
            self.exclude(true, &why);
            (why, "no-decrypt")
        } else {
            (format!("the client's TLS failed: {e}"), "failed")
        };
        self.record.outcome = outcome.into();
        self.record.error = Some(TlsError {
            stage: if during_handshake {
                ErrorStage::DownstreamHandshake
            } else {
                ErrorStage::Data
            }
            .label()
            .into(),
            reason,
        });
        if during_handshake {
            let c = match outcome {
                "passed-on" => &self.ctx.stats.passed_on,
                "no-decrypt" => &self.ctx.stats.no_decrypt,
                _ => &self.ctx.stats.failed,
            };
            c.fetch_add(1, Ordering::Relaxed);
        }
        self.phase = Phase::Done;
        self.deadline = None;
        Pump::Abort {
            client: false,
            server: true,
        }
    }

    /// An inspector blocked the connection: both sides are reset at once
    /// (the matching bytes never pass on).
    fn blocked_by_inspection(&mut self, why: String) -> Pump {
        self.ctx
            .stats
            .inspect_blocks
            .fetch_add(1, Ordering::Relaxed);
        self.data_failed(format!("blocked by inspection: {why}"))
    }

    /// An inspector blocked a request and answered it (a 403 page): the
    /// client gets the answer, close_notify and a FIN; the server, which
    /// never saw the request, is reset.
    fn answer_and_close(
        &mut self,
        mut down: Box<ServerConnection>,
        client: &mut dyn ByteStream,
        answer: &[u8],
        why: String,
    ) -> Pump {
        self.ctx
            .stats
            .inspect_blocks
            .fetch_add(1, Ordering::Relaxed);
        down.set_buffer_limit(None);
        let _ = down.writer().write_all(answer);
        down.send_close_notify();
        let mut bytes = Vec::new();
        while down.wants_write() {
            if down.write_tls(&mut bytes).is_err() {
                break;
            }
        }
        // All of it or a reset: a cut page would read as a truncation.
        let whole = client.write(&bytes) == bytes.len();
        if whole {
            client.close();
        }
        self.record.error = Some(TlsError {
            stage: ErrorStage::Data.label().into(),
            reason: format!("blocked by inspection: {why}"),
        });
        self.phase = Phase::Done;
        self.deadline = None;
        Pump::Abort {
            client: !whole,
            server: true,
        }
    }

    /// What the inspectors found since the last call (the session logs
    /// it).
    pub fn take_findings(&mut self) -> Vec<Finding> {
        self.pipeline.take_findings()
    }

    /// The server's leg failed after the handshakes: both are reset (a
    /// clean close toward the client would hide a truncation).
    fn data_failed(&mut self, reason: String) -> Pump {
        if self.record.outcome.is_empty() {
            self.record.outcome = "failed".into();
        }
        self.record.error = Some(TlsError {
            stage: ErrorStage::Data.label().into(),
            reason,
        });
        self.phase = Phase::Done;
        self.deadline = None;
        Pump::Abort {
            client: true,
            server: true,
        }
    }
}

impl Drop for Intercept {
    fn drop(&mut self) {
        if matches!(
            self.phase,
            Phase::Minting { .. } | Phase::Handshaking { .. }
        ) {
            self.ctx.stats.parked.fetch_sub(1, Ordering::Relaxed);
        }
        if self.counted {
            self.ctx.stats.active.fetch_sub(1, Ordering::Relaxed);
        }
    }
}
