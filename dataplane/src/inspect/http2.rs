//! HTTP/2 (RFC 9113) on decrypted connections: the frame layer of both
//! directions and their header blocks, decoded with HPACK (RFC 7541, the
//! `loona-hpack` decoder, which passes h2spec), so that each stream is one
//! request record like HTTP/1.1's (method, authority, path, status,
//! content type, body bytes each way, timing) with the URL rule that
//! matched it.
//!
//! It runs in one of two ways:
//! - **Observer** ([`Http2::new`], as an [`Inspector`]): no URL rule can
//!   block, so frames are read as they pass and never changed.
//! - **Enforcer** ([`Http2::enforcing`], the pipeline's rewriter): a URL
//!   rule may block, and a single stream is refused while the others go
//!   on. Toward the server, every header block is decoded and encoded
//!   again by [`encode_block`], which never touches a dynamic table, so a
//!   request left out leaves no HPACK state behind; a refused stream's
//!   frames are never sent, and the DATA the client sent on one is
//!   credited back to the client's connection window. Toward the client,
//!   the server's frames pass as they are and a refused stream is answered
//!   at the next frame boundary: HEADERS `:status 403` and the block page
//!   as DATA (the HEADERS alone when the client's windows have no room),
//!   then RST_STREAM(NO_ERROR) if the client was still sending. The page
//!   enters the client's connection window without the server knowing, so
//!   it is paid back out of the client's next WINDOW_UPDATEs, and until
//!   then a server DATA frame that the client's real window cannot take
//!   waits. Server push is turned off in the client's SETTINGS (a pushed
//!   response answers a request no rule saw); a PUSH_PROMISE is then an
//!   error. Everything else (PING, GOAWAY, PRIORITY, flow control,
//!   unknown frames) passes untouched.
//!
//! Memory is bounded per connection: a header block (HEADERS or
//! PUSH_PROMISE with its CONTINUATIONs) of at most [`MAX_HEADER_BLOCK`]
//! bytes decoding to at most [`MAX_HEADER_LIST`], HPACK dynamic tables of
//! at most [`MAX_TABLE`] bytes whatever SETTINGS announce, [`MAX_STREAMS`]
//! streams open at once, SETTINGS frames of at most [`MAX_SETTINGS`]
//! bytes; DATA and other frames are counted (the enforcer passes them on
//! as they come), not kept. A stream that breaks the protocol or a bound
//! ends the connection (both sides reset, an `anomaly` record saying why):
//! what follows could not be followed, and HTTP/2 has no resynchronising.

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, OnceLock},
    time::Instant,
};

use loona_hpack::{encoder::encode_integer_into, Decoder};

use super::{
    fuzz_chunks,
    http1::{block_body, cut, match_rules},
    Direction, Finding, HttpRequest, Inspector, Report,
};
use crate::policy::{UrlAction, UrlRule};

/// The client connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// A header block with its CONTINUATIONs, at most.
pub const MAX_HEADER_BLOCK: usize = 64 << 10;
/// What a header block decodes to, at most, counted as HPACK counts a
/// table entry (name, value and 32 bytes each): a small block naming
/// large table entries many times must not become a large one.
pub const MAX_HEADER_LIST: usize = 256 << 10;
/// An HPACK dynamic table, at most (the default is 4 KiB).
pub const MAX_TABLE: usize = 64 << 10;
/// Streams open at once, at most.
pub const MAX_STREAMS: usize = 256;
/// A SETTINGS frame, at most (each setting is 6 bytes).
pub const MAX_SETTINGS: usize = 4096;
/// Empty CONTINUATION frames in one header block, at most: they would
/// otherwise never reach the size bound (other frames do).
pub const MAX_EMPTY_CONTINUATIONS: usize = 64;
/// Requests the enforcer refuses on one connection within
/// [`REFUSAL_WINDOW`], at most: past it the connection is an attack on
/// the log (one record per refusal), and ends.
pub const MAX_REFUSED: u64 = 1000;
pub const REFUSAL_WINDOW: std::time::Duration = std::time::Duration::from_secs(10);
/// Enforcer: bytes waiting to be passed on, beyond which it reads no
/// more of a direction that would add to them (one header block may
/// still decode to [`MAX_HEADER_LIST`] on top).
pub const MAX_PENDING: usize = 128 << 10;

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PUSH_PROMISE: u8 = 0x5;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

const SETTINGS_ENABLE_PUSH: u16 = 2;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 3;
const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 4;
/// Every window's size before SETTINGS or WINDOW_UPDATE (RFC 9113 §6.9.2).
const DEFAULT_WINDOW: i64 = 65_535;

/// The frame being read on one side.
#[derive(Clone, Copy, Debug)]
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    /// Payload bytes not read yet.
    left: usize,
    /// DATA: whether the pad length has been read (or none is needed).
    padded_known: bool,
    /// DATA: the padding at the frame's end (not body).
    pad: usize,
    /// Enforcer: the frame is passed on as it is read (else it is left
    /// out, or written anew once read whole).
    pass: bool,
}

/// A header block being gathered.
#[derive(Debug)]
struct Block {
    stream: u32,
    /// PUSH_PROMISE: the promised stream (the block is its request).
    promised: Option<u32>,
    end_stream: bool,
    /// HEADERS with PRIORITY: its five bytes, passed on.
    priority: Option<[u8; 5]>,
    bytes: Vec<u8>,
    /// Empty CONTINUATIONs so far.
    empties: usize,
}

/// One direction's reader.
struct Side {
    hpack: Decoder<'static>,
    /// Client side: bytes of the preface still to come.
    preface: usize,
    head: Vec<u8>,
    frame: Option<Frame>,
    /// The payload of a frame read whole (HEADERS, CONTINUATION,
    /// PUSH_PROMISE, SETTINGS, RST_STREAM, WINDOW_UPDATE).
    payload: Vec<u8>,
    block: Option<Block>,
    /// The largest frame this direction may carry: the receiver's
    /// SETTINGS_MAX_FRAME_SIZE (16 KiB until it says otherwise).
    max_frame: usize,
}

impl Side {
    fn new(client: bool) -> Side {
        let mut hpack = Decoder::new();
        hpack.set_max_allowed_table_size(4096);
        Side {
            hpack,
            preface: if client { PREFACE.len() } else { 0 },
            head: Vec::with_capacity(9),
            frame: None,
            payload: Vec::new(),
            block: None,
            max_frame: 16_384,
        }
    }
}

struct Stream {
    rec: HttpRequest,
    started: Instant,
    /// END_STREAM seen client → server, server → client.
    ended: [bool; 2],
    /// The client sent its trailers (a request has one block of them).
    trailers: bool,
}

/// The enforcer's state: what goes out each way, and the flow control
/// its answers take part in.
#[derive(Default)]
struct Enforce {
    /// Bytes to pass on: toward the server \[0\], toward the client \[1\].
    out: [Vec<u8>; 2],
    /// Frames for the client waiting for a frame boundary there.
    inject: Vec<u8>,
    /// Whether the server's first frame (its SETTINGS, which must come
    /// first) has gone to the client: nothing is injected before.
    server_began: bool,
    /// Streams answered here, which the server never saw (the latest
    /// [`MAX_STREAMS`]): the client's frames on them are left out.
    refused: BTreeSet<u32>,
    /// The client's receive window for the connection, as it counts it.
    window: i64,
    /// Page bytes the client's window took that the server does not know
    /// of: taken out of the client's next connection WINDOW_UPDATEs.
    debt: i64,
    /// The client's SETTINGS_INITIAL_WINDOW_SIZE: a new stream's window.
    stream_window: i64,
    /// A server DATA frame's head, held until the client's window can
    /// take it (only while there is debt); a frame larger than the room
    /// there is goes in two, and this is the second part.
    held: Option<Vec<u8>>,
    /// Requests refused since `window_start`.
    refusals: u64,
    window_start: Option<Instant>,
}

/// The HTTP/2 inspector of one connection.
pub struct Http2 {
    sides: [Side; 2],
    streams: BTreeMap<u32, Stream>,
    requests: u64,
    rules: Option<Arc<Vec<UrlRule>>>,
    sni: Option<String>,
    done: bool,
    /// An observer saw more than [`MAX_STREAMS`] streams open (said once).
    overflowed: bool,
    /// The highest stream a request came on (a GOAWAY names it).
    last_stream: u32,
    /// Enforcer mode (None: an observer).
    enforce: Option<Box<Enforce>>,
}

impl Http2 {
    /// An observer: frames pass as they are.
    pub fn new(rules: Option<Arc<Vec<UrlRule>>>, sni: Option<String>) -> Http2 {
        Http2 {
            sides: [Side::new(true), Side::new(false)],
            streams: BTreeMap::new(),
            requests: 0,
            rules,
            sni,
            done: false,
            overflowed: false,
            last_stream: 0,
            enforce: None,
        }
    }

    /// An enforcer: the connection is re-framed so that a stream that a
    /// URL rule blocks is answered here and never reaches the server.
    pub fn enforcing(rules: Option<Arc<Vec<UrlRule>>>, sni: Option<String>) -> Http2 {
        Http2 {
            enforce: Some(Box::new(Enforce {
                window: DEFAULT_WINDOW,
                stream_window: DEFAULT_WINDOW,
                ..Enforce::default()
            })),
            ..Http2::new(rules, sni)
        }
    }

    /// Takes the start of `dir`'s stream, and says how much of it was
    /// taken (the enforcer takes less than all while a server DATA frame
    /// waits for the client's window); what the enforcer passes on is in
    /// [`Http2::output`]. Errors end the connection through `report`.
    pub fn rewrite(
        &mut self,
        dir: Direction,
        data: &[u8],
        now: Instant,
        report: &mut Report,
    ) -> usize {
        if self.done {
            return 0;
        }
        match self.read(dir, data, now, report) {
            Ok(n) => n,
            Err(reason) => {
                self.stop(dir, reason, report);
                0
            }
        }
    }

    /// Enforcer: the bytes to pass on in direction `dir`.
    pub fn output(&mut self, dir: Direction) -> Option<&mut Vec<u8>> {
        self.enforce.as_mut().map(|e| &mut e.out[dir as usize])
    }

    /// Reads `data`; returns how much of it was taken (the enforcer stops
    /// early while a server DATA frame waits for the client's window, or
    /// while too much waits to be passed on).
    fn read(
        &mut self,
        dir: Direction,
        data: &[u8],
        now: Instant,
        report: &mut Report,
    ) -> Result<usize, String> {
        let d = dir as usize;
        let total = data.len();
        let mut data = data;
        loop {
            if let Some(e) = self.enforce.as_ref() {
                let pending = match dir {
                    Direction::ClientToServer => e.out[0].len() + e.out[1].len(),
                    Direction::ServerToClient => e.out[1].len(),
                };
                if pending > MAX_PENDING {
                    return Ok(total - data.len());
                }
                if dir == Direction::ServerToClient
                    && e.held.is_some()
                    && self.sides[1].frame.is_none()
                {
                    if !self.release_held(now, report)? {
                        return Ok(total - data.len());
                    }
                    continue;
                }
            }
            if data.is_empty() {
                break;
            }
            let side = &mut self.sides[d];
            if side.preface > 0 {
                let at = PREFACE.len() - side.preface;
                let n = side.preface.min(data.len());
                if data[..n] != PREFACE[at..at + n] {
                    return Err("not the HTTP/2 client preface".into());
                }
                side.preface -= n;
                self.emit(d, true, &data[..n]);
                data = &data[n..];
                continue;
            }
            let Some(mut f) = side.frame else {
                let n = (9 - side.head.len()).min(data.len());
                side.head.extend_from_slice(&data[..n]);
                data = &data[n..];
                if side.head.len() == 9 {
                    let h = std::mem::take(&mut side.head);
                    if !self.begin(dir, h, now, report)? {
                        return Ok(total - data.len());
                    }
                }
                continue;
            };
            match f.kind {
                DATA => {
                    if !f.padded_known {
                        // The pad length: padding is not body.
                        let pad = usize::from(data[0]);
                        self.emit(d, f.pass, &data[..1]);
                        data = &data[1..];
                        f.left -= 1;
                        if pad > f.left {
                            return Err("DATA padding longer than its frame".into());
                        }
                        f.padded_known = true;
                        f.pad = pad;
                    }
                    let n = f.left.min(data.len());
                    self.body(dir, f.stream, n.min(f.left.saturating_sub(f.pad)) as u64);
                    self.emit(d, f.pass, &data[..n]);
                    data = &data[n..];
                    f.left -= n;
                }
                HEADERS | CONTINUATION | PUSH_PROMISE | SETTINGS | RST_STREAM | WINDOW_UPDATE => {
                    let n = f.left.min(data.len());
                    self.sides[d].payload.extend_from_slice(&data[..n]);
                    self.emit(d, f.pass, &data[..n]);
                    data = &data[n..];
                    f.left -= n;
                }
                _ => {
                    let n = f.left.min(data.len());
                    self.emit(d, f.pass, &data[..n]);
                    data = &data[n..];
                    f.left -= n;
                }
            }
            self.sides[d].frame = Some(f);
            self.maybe_end_frame(dir, now, report)?;
        }
        Ok(total)
    }

    /// Enforcer: passes `bytes` on in direction `d` when `pass`.
    fn emit(&mut self, d: usize, pass: bool, bytes: &[u8]) {
        if let Some(e) = self.enforce.as_mut().filter(|_| pass) {
            e.out[d].extend_from_slice(bytes);
        }
    }

    /// A frame's head `h` is whole: the frame starts; or, for a server
    /// DATA frame larger than the client's real window while pages are
    /// owed, as much of it as fits starts and the rest waits as a frame of
    /// its own (a padded one waits whole); false when nothing started.
    fn begin(
        &mut self,
        dir: Direction,
        h: Vec<u8>,
        now: Instant,
        report: &mut Report,
    ) -> Result<bool, String> {
        let len = frame_len(&h);
        let mut h = h;
        if let (Direction::ServerToClient, Some(e)) = (dir, self.enforce.as_mut()) {
            if h[3] == DATA && len > 0 && e.debt > 0 && len as i64 > e.window {
                if e.window <= 0 || h[4] & PADDED != 0 {
                    e.held = Some(h);
                    return Ok(false);
                }
                let fits = e.window as usize;
                let mut rest = h.clone();
                set_frame_len(&mut rest, len - fits);
                e.held = Some(rest);
                set_frame_len(&mut h, fits);
                h[4] &= !END_STREAM;
            }
        }
        self.start_frame(dir, &h)?;
        self.maybe_end_frame(dir, now, report)?;
        Ok(true)
    }

    /// Enforcer: starts the held server frame if the client's window has
    /// room for some of it; false while it must still wait.
    fn release_held(&mut self, now: Instant, report: &mut Report) -> Result<bool, String> {
        let Some(h) = self.enforce.as_mut().and_then(|e| e.held.take()) else {
            return Ok(true);
        };
        self.begin(Direction::ServerToClient, h, now, report)
    }

    /// A frame's 9-byte header has arrived.
    fn start_frame(&mut self, dir: Direction, h: &[u8]) -> Result<(), String> {
        let d = dir as usize;
        let len = frame_len(h);
        let (kind, flags) = (h[3], h[4]);
        let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
        let side = &mut self.sides[d];
        // RFC 9113 §4.2: a frame over the receiver's maximum is an error.
        if len > side.max_frame {
            return Err(format!(
                "a frame of {len} bytes, over the receiver's maximum of {}",
                side.max_frame
            ));
        }
        // RFC 9113 §6.10: nothing may come between a header block's frames.
        if side
            .block
            .as_ref()
            .is_some_and(|b| kind != CONTINUATION || b.stream != stream)
        {
            return Err("a header block interrupted by another frame".into());
        }
        match kind {
            CONTINUATION if side.block.is_none() => {
                return Err("a CONTINUATION without a header block".into())
            }
            CONTINUATION
                if len == 0
                    && flags & END_HEADERS == 0
                    && side
                        .block
                        .as_ref()
                        .is_some_and(|b| b.empties >= MAX_EMPTY_CONTINUATIONS) =>
            {
                return Err(format!(
                    "a header block with more than {MAX_EMPTY_CONTINUATIONS} empty CONTINUATIONs"
                ))
            }
            HEADERS | CONTINUATION | PUSH_PROMISE => {
                let so_far = side.block.as_ref().map_or(0, |b| b.bytes.len());
                if so_far + len > MAX_HEADER_BLOCK {
                    return Err(format!(
                        "a header block over {} KiB",
                        MAX_HEADER_BLOCK >> 10
                    ));
                }
            }
            SETTINGS if len > MAX_SETTINGS || !len.is_multiple_of(6) => {
                return Err(format!("a SETTINGS frame of {len} bytes"))
            }
            RST_STREAM if len != 4 => return Err(format!("a RST_STREAM frame of {len} bytes")),
            WINDOW_UPDATE if len != 4 => {
                return Err(format!("a WINDOW_UPDATE frame of {len} bytes"))
            }
            DATA if flags & PADDED != 0 && len == 0 => {
                return Err("a padded DATA frame without its pad length".into())
            }
            _ => {}
        }
        if matches!(
            kind,
            DATA | HEADERS | CONTINUATION | PUSH_PROMISE | RST_STREAM
        ) && stream == 0
        {
            return Err(format!("a frame of type {kind} on stream 0"));
        }
        side.payload.clear();
        let mut pass = false;
        let mut credit = 0;
        if let Some(e) = self.enforce.as_mut() {
            match dir {
                Direction::ClientToServer if stream != 0 && e.refused.contains(&stream) => {
                    // The server never saw the stream: nothing on it goes
                    // there, and DATA's share of the connection window is
                    // given back to the client here.
                    if kind == DATA {
                        credit = len;
                    }
                }
                Direction::ClientToServer => {
                    // Header blocks are encoded anew, the client's
                    // SETTINGS changed and its connection WINDOW_UPDATEs
                    // may pay debt: written once read whole.
                    let whole = match kind {
                        HEADERS | CONTINUATION => true,
                        SETTINGS => flags & ACK == 0,
                        WINDOW_UPDATE => stream == 0,
                        _ => false,
                    };
                    pass = !whole;
                }
                Direction::ServerToClient => {
                    // SETTINGS are written anew (the stream bound).
                    pass = !(kind == SETTINGS && flags & ACK == 0);
                    if kind == PUSH_PROMISE {
                        return Err("a PUSH_PROMISE, though the client's SETTINGS turned \
                                    server push off"
                            .into());
                    }
                    if kind == DATA {
                        e.window -= len as i64;
                    }
                }
            }
            if pass {
                e.out[d].extend_from_slice(h);
            }
        }
        if credit > 0 {
            self.inject(window_update(0, credit as u32));
        }
        self.sides[d].frame = Some(Frame {
            kind,
            flags,
            stream,
            left: len,
            padded_known: kind != DATA || flags & PADDED == 0,
            pad: 0,
            pass,
        });
        Ok(())
    }

    /// Handles the current frame once all of it has been read.
    fn maybe_end_frame(
        &mut self,
        dir: Direction,
        now: Instant,
        report: &mut Report,
    ) -> Result<(), String> {
        let d = dir as usize;
        let Some(f) = self.sides[d].frame else {
            return Ok(());
        };
        if f.left > 0 {
            return Ok(());
        }
        self.sides[d].frame = None;
        let payload = std::mem::take(&mut self.sides[d].payload);
        match f.kind {
            DATA if f.flags & END_STREAM != 0 => self.end_stream(dir, f.stream, now, report),
            HEADERS | PUSH_PROMISE => {
                let mut p = &payload[..];
                let mut pad = 0;
                if f.flags & PADDED != 0 {
                    let (&n, rest) = p
                        .split_first()
                        .ok_or("a padded frame without its pad length")?;
                    pad = usize::from(n);
                    p = rest;
                }
                let mut promised = None;
                let mut priority = None;
                if f.kind == PUSH_PROMISE {
                    if dir == Direction::ClientToServer {
                        return Err("a PUSH_PROMISE from the client".into());
                    }
                    let id = p.get(..4).ok_or("a PUSH_PROMISE too short")?;
                    promised = Some(u32::from_be_bytes([id[0], id[1], id[2], id[3]]) & 0x7fff_ffff);
                    p = &p[4..];
                } else if f.flags & PRIORITY != 0 {
                    let pr = p
                        .get(..5)
                        .ok_or("a HEADERS frame too short for its priority")?;
                    priority = Some([pr[0], pr[1], pr[2], pr[3], pr[4]]);
                    p = &p[5..];
                }
                if pad > p.len() {
                    return Err("padding longer than its frame".into());
                }
                let fragment = &p[..p.len() - pad];
                self.sides[d].block = Some(Block {
                    stream: f.stream,
                    promised,
                    end_stream: f.kind == HEADERS && f.flags & END_STREAM != 0,
                    priority,
                    bytes: fragment.to_vec(),
                    empties: 0,
                });
                if f.flags & END_HEADERS != 0 {
                    self.end_block(dir, now, report)?;
                }
            }
            CONTINUATION => {
                if let Some(b) = self.sides[d].block.as_mut() {
                    b.bytes.extend_from_slice(&payload);
                    b.empties += usize::from(payload.is_empty());
                }
                if f.flags & END_HEADERS != 0 {
                    self.end_block(dir, now, report)?;
                }
            }
            SETTINGS if f.flags & ACK == 0 => {
                for s in payload.chunks_exact(6) {
                    let v = u32::from_be_bytes([s[2], s[3], s[4], s[5]]) as usize;
                    let id = u16::from_be_bytes([s[0], s[1]]);
                    match id {
                        // HEADER_TABLE_SIZE bounds what the *other* side's
                        // encoder may use: our decoder of that direction.
                        1 => self.sides[1 - d]
                            .hpack
                            .set_max_allowed_table_size(v.min(MAX_TABLE)),
                        // MAX_FRAME_SIZE: the largest frame the other side
                        // may send (RFC 9113 §6.5.2).
                        5 if (16_384..=16_777_215).contains(&v) => self.sides[1 - d].max_frame = v,
                        5 => return Err(format!("a SETTINGS_MAX_FRAME_SIZE of {v}")),
                        SETTINGS_INITIAL_WINDOW_SIZE if dir == Direction::ClientToServer => {
                            if let Some(e) = self.enforce.as_mut() {
                                e.stream_window = v as i64;
                            }
                        }
                        _ => {}
                    }
                }
                if let Some(e) = self.enforce.as_mut() {
                    // The client is told no push (a pushed response
                    // answers a request no rule saw); the server's limit
                    // on open streams is brought to the enforcer's bound.
                    let rewritten = match dir {
                        Direction::ClientToServer => setting(&payload, SETTINGS_ENABLE_PUSH, |_| 0),
                        Direction::ServerToClient => {
                            setting(&payload, SETTINGS_MAX_CONCURRENT_STREAMS, |v| {
                                v.map_or(MAX_STREAMS as u32, |v| v.min(MAX_STREAMS as u32))
                            })
                        }
                    };
                    e.out[d].extend(frame(SETTINGS, f.flags, 0, &rewritten));
                }
            }
            WINDOW_UPDATE if dir == Direction::ClientToServer && f.stream == 0 => {
                let inc = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]])
                    & 0x7fff_ffff;
                if let Some(e) = self.enforce.as_mut() {
                    // The client's window grows by all of it; the server
                    // hears of what the pages did not take.
                    e.window += i64::from(inc);
                    let pay = e.debt.min(i64::from(inc));
                    e.debt -= pay;
                    let rest = i64::from(inc) - pay;
                    if rest > 0 || inc == 0 {
                        e.out[0].extend(window_update(0, rest as u32));
                    }
                }
            }
            RST_STREAM => {
                if let Some(s) = self.streams.remove(&f.stream) {
                    report.add(Finding::Http(finish(s, now)));
                }
            }
            _ => {}
        }
        if dir == Direction::ServerToClient {
            if let Some(e) = self.enforce.as_mut() {
                e.server_began = true;
            }
            self.flush_inject();
        }
        Ok(())
    }

    /// Enforcer: `bytes` (whole frames) go to the client at its stream's
    /// next frame boundary, after the server's first frame.
    fn inject(&mut self, bytes: Vec<u8>) {
        if let Some(e) = self.enforce.as_mut() {
            e.inject.extend(bytes);
        }
        self.flush_inject();
    }

    fn flush_inject(&mut self) {
        let s = &self.sides[1];
        let boundary = s.frame.is_none() && s.block.is_none();
        if let Some(e) = self.enforce.as_mut() {
            if boundary && e.server_began && !e.inject.is_empty() {
                let bytes = std::mem::take(&mut e.inject);
                e.out[1].extend(bytes);
            }
        }
    }

    /// Counts body bytes of a stream.
    fn body(&mut self, dir: Direction, stream: u32, n: u64) {
        if let Some(s) = self.streams.get_mut(&stream) {
            let field = match dir {
                Direction::ClientToServer => &mut s.rec.request_body,
                Direction::ServerToClient => &mut s.rec.response_body,
            };
            *field += n;
        }
    }

    fn end_stream(&mut self, dir: Direction, stream: u32, now: Instant, report: &mut Report) {
        if let Some(s) = self.streams.get_mut(&stream) {
            s.ended[dir as usize] = true;
            if s.ended == [true, true] {
                let s = self.streams.remove(&stream).expect("present above");
                report.add(Finding::Http(finish(s, now)));
            }
        }
    }

    /// A whole header block: decoded (always, to keep HPACK's table in
    /// step), then a request, a response, or trailers; the enforcer
    /// passes a client's block on encoded anew, or leaves it out.
    fn end_block(
        &mut self,
        dir: Direction,
        now: Instant,
        report: &mut Report,
    ) -> Result<(), String> {
        let d = dir as usize;
        let b = self.sides[d].block.take().expect("a block in progress");
        let rewrite = self.enforce.is_some() && dir == Direction::ClientToServer;
        let mut fields = Fields {
            all: rewrite.then(Vec::new),
            ..Fields::default()
        };
        self.sides[d]
            .hpack
            .decode_with_cb(&b.bytes, |n, v| fields.take(n, v))
            .map_err(|e| format!("HPACK: {e}"))?;
        if fields.count > 1024 {
            return Err("a header block of more than 1024 fields".into());
        }
        if fields.size > MAX_HEADER_LIST {
            return Err(format!(
                "a header block decoding to more than {} KiB",
                MAX_HEADER_LIST >> 10
            ));
        }
        let refused = self
            .enforce
            .as_ref()
            .is_some_and(|e| dir == Direction::ClientToServer && e.refused.contains(&b.stream));
        if refused {
            // Trailers of a refused request: decoded (HPACK), left out.
            return Ok(());
        }
        let request_on = match (dir, b.promised) {
            (Direction::ServerToClient, Some(p)) => Some(p),
            (Direction::ClientToServer, _) if !self.streams.contains_key(&b.stream) => {
                Some(b.stream)
            }
            _ => None,
        };
        let all = fields.all.take();
        if let Some(id) = request_on {
            if self.request(id, b.end_stream, fields, now, report)? {
                return Ok(());
            }
        } else if dir == Direction::ServerToClient {
            if let Some(s) = self.streams.get_mut(&b.stream) {
                if let Some(status) = fields.status {
                    if (100..200).contains(&status) {
                        return Ok(()); // interim
                    }
                    s.rec.status = Some(status);
                    s.rec.content_type = fields.content_type;
                }
            }
        } else if let Some(s) = self.streams.get_mut(&b.stream) {
            // The client's trailers: one block of them, at most.
            if s.trailers {
                return Err("a second block of trailers on one stream".into());
            }
            s.trailers = true;
        }
        if let (Some(all), Some(e)) = (all, self.enforce.as_mut()) {
            let mut block = Vec::with_capacity(b.bytes.len() * 2);
            encode_block(&all, &mut block);
            header_frames(
                b.stream,
                b.end_stream,
                b.priority,
                &block,
                self.sides[0].max_frame,
                &mut e.out[0],
            );
        }
        let stream = b.promised.unwrap_or(b.stream);
        if b.promised.is_some() {
            // A promised stream has no request body.
            if let Some(s) = self.streams.get_mut(&stream) {
                s.ended[0] = true;
            }
        }
        if b.end_stream {
            self.end_stream(dir, b.stream, now, report);
        }
        Ok(())
    }

    /// A request on stream `id`: recorded, matched against the URL rules;
    /// true when it was refused here (the enforcer answered it).
    fn request(
        &mut self,
        id: u32,
        end_stream: bool,
        f: Fields,
        now: Instant,
        report: &mut Report,
    ) -> Result<bool, String> {
        let enforcing = self.enforce.is_some();
        self.last_stream = self.last_stream.max(id);
        if self.streams.len() >= MAX_STREAMS {
            if let Some(e) = self.enforce.as_mut() {
                // Beyond what the engine told the client (which may not
                // have read its SETTINGS yet): refused unprocessed, as
                // RFC 9113 §5.1.2 has it; the client may send it again.
                e.refused.insert(id);
                while e.refused.len() > MAX_STREAMS {
                    e.refused.pop_first();
                }
                self.inject(frame(RST_STREAM, 0, id, &7u32.to_be_bytes()));
                return Ok(true);
            }
            // An observer lets it be, unrecorded (said once).
            if !self.overflowed {
                self.overflowed = true;
                report.add(Finding::Anomaly {
                    dir: Direction::ClientToServer,
                    reason: format!(
                        "more than {MAX_STREAMS} streams open at once: the others are not \
                         recorded"
                    ),
                });
            }
            return Ok(false);
        }
        let method = f.method.unwrap_or_default();
        let authority = f.authority.filter(|h| !h.is_empty());
        let host_field = f.host.filter(|h| !h.is_empty());
        if enforcing {
            // What the server may read differently from the rules.
            if method == "CONNECT" && f.protocol.is_none() {
                // A tunnel carries no requests the rules would see
                // (extended CONNECT, as WebSocket uses, keeps its path).
                return Err("a CONNECT tunnel while URL rules are enforced".into());
            }
            if f.repeated {
                return Err("a pseudo-header or host field given twice".into());
            }
            if let (Some(a), Some(h)) = (&authority, &host_field) {
                let bare = |s: &str| s.strip_suffix(":443").unwrap_or(s).to_ascii_lowercase();
                if bare(a) != bare(h) {
                    // RFC 9113 §8.3.1: malformed.
                    return Err(format!(
                        "an :authority ({}) and a host field ({}) that differ",
                        cut(a),
                        cut(h)
                    ));
                }
            }
        }
        self.requests += 1;
        let host = authority.or(host_field);
        let path = f.path.unwrap_or_default();
        let rule = self
            .rules
            .as_deref()
            .and_then(|r| match_rules(r, host.as_deref(), self.sni.as_deref(), &path));
        let mut rec = HttpRequest {
            seq: self.requests,
            method: cut(&method),
            host: host.map(|h| cut(&h)),
            path: cut(&path),
            url_action: rule.as_ref().map(|r| r.1),
            url_rule: rule.as_ref().map(|r| r.0.clone()),
            ..HttpRequest::default()
        };
        if let Some((name, UrlAction::Block)) = &rule {
            if self.enforce.is_none() {
                // An observer cannot refuse one stream: the connection is.
                report.block(format!(
                    "URL rule {name:?} blocks {} {} (HTTP/2)",
                    rec.method, rec.path
                ));
                report.add(Finding::Http(rec));
                return Ok(true);
            }
            rec.status = Some(403);
            self.refuse(id, name, end_stream, method == "HEAD", now)?;
            report.refused_stream();
            report.add(Finding::Http(rec.finished(now, now)));
            return Ok(true);
        }
        self.streams.insert(
            id,
            Stream {
                rec,
                started: now,
                ended: [false, false],
                trailers: false,
            },
        );
        Ok(false)
    }

    /// Enforcer: answers stream `id` with the 403 page of `rule` (or its
    /// HEADERS alone for a HEAD, or when the client's windows have no room
    /// for the page); the server never hears of it.
    fn refuse(
        &mut self,
        id: u32,
        rule: &str,
        client_done: bool,
        head: bool,
        now: Instant,
    ) -> Result<(), String> {
        let max_frame = self.sides[1].max_frame;
        let Some(e) = self.enforce.as_mut() else {
            return Ok(());
        };
        if e.window_start
            .is_none_or(|t| now.saturating_duration_since(t) >= REFUSAL_WINDOW)
        {
            e.window_start = Some(now);
            e.refusals = 0;
        }
        e.refusals += 1;
        if e.refusals > MAX_REFUSED {
            return Err(format!(
                "more than {MAX_REFUSED} requests refused on one connection within {} s",
                REFUSAL_WINDOW.as_secs()
            ));
        }
        e.refused.insert(id);
        while e.refused.len() > MAX_STREAMS {
            e.refused.pop_first();
        }
        let body = block_body(rule);
        let len = body.len() as i64;
        let fits = !head && len <= e.window && len <= e.stream_window;
        let length = body.len().to_string();
        let named: String = rule
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        let mut fields: Vec<(Vec<u8>, Vec<u8>)> = vec![
            (b":status".to_vec(), b"403".to_vec()),
            (
                b"content-type".to_vec(),
                b"text/html; charset=utf-8".to_vec(),
            ),
            (b"cache-control".to_vec(), b"no-store".to_vec()),
            (b"x-loupe-rule".to_vec(), named.trim().as_bytes().to_vec()),
        ];
        if fits {
            fields.push((b"content-length".to_vec(), length.into_bytes()));
        }
        let mut block = Vec::new();
        encode_block(&fields, &mut block);
        let mut out = Vec::new();
        header_frames(id, !fits, None, &block, max_frame, &mut out);
        if fits {
            let mut chunks = body.as_bytes().chunks(max_frame).peekable();
            while let Some(c) = chunks.next() {
                let last = chunks.peek().is_none();
                out.extend(frame(DATA, if last { END_STREAM } else { 0 }, id, c));
            }
            e.window -= len;
            e.debt += len;
        }
        if !client_done {
            // RFC 9113 §8.1: a whole response, then the client is asked
            // to stop sending the request (NO_ERROR).
            out.extend(frame(RST_STREAM, 0, id, &[0; 4]));
        }
        self.inject(out);
        Ok(())
    }

    /// The connection cannot be followed: it ends. The enforcer, when
    /// what it passed to the client ends on a frame boundary, first tells
    /// the client why: a GOAWAY (PROTOCOL_ERROR) after the frames still
    /// waiting, as the answer the TLS stage writes before its close.
    fn stop(&mut self, dir: Direction, reason: String, report: &mut Report) {
        if !self.done {
            let why = format!("HTTP/2 cannot be followed: {reason}");
            let boundary = self.sides[1].frame.is_none() && self.sides[1].block.is_none();
            match self.enforce.as_mut().filter(|_| boundary) {
                Some(e) => {
                    let mut answer = std::mem::take(&mut e.out[1]);
                    let mut payload = (self.last_stream & 0x7fff_ffff).to_be_bytes().to_vec();
                    payload.extend_from_slice(&1u32.to_be_bytes());
                    let debug = format!("loupe: {reason}");
                    payload.extend_from_slice(&debug.as_bytes()[..debug.len().min(256)]);
                    answer.extend(frame(GOAWAY, 0, 0, &payload));
                    report.block_with(why, answer);
                }
                None => report.block(why),
            }
            report.add(Finding::Anomaly { dir, reason });
        }
        self.done = true;
        self.sides = [Side::new(true), Side::new(false)];
        self.streams.clear();
        if let Some(e) = self.enforce.as_mut() {
            **e = Enforce::default();
        }
    }
}

/// A frame as read back by [`parse`]: kind, flags, stream, payload.
#[cfg(test)]
pub(crate) type Parsed = (u8, u8, u32, Vec<u8>);

/// Whole frames, read back (tests).
#[cfg(test)]
pub(crate) fn parse(mut b: &[u8]) -> Vec<Parsed> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let n = frame_len(b);
        let stream = u32::from_be_bytes([b[5], b[6], b[7], b[8]]);
        out.push((b[3], b[4], stream, b[9..9 + n].to_vec()));
        b = &b[9 + n..];
    }
    out
}

/// SETTINGS `payload` with setting `id` set to `value(its value)` (every
/// time it appears, or once at the end when it does not).
fn setting(payload: &[u8], id: u16, value: impl Fn(Option<u32>) -> u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 6);
    let mut seen = false;
    for s in payload.chunks_exact(6) {
        out.extend_from_slice(&s[..2]);
        if u16::from_be_bytes([s[0], s[1]]) == id {
            seen = true;
            let v = u32::from_be_bytes([s[2], s[3], s[4], s[5]]);
            out.extend_from_slice(&value(Some(v)).to_be_bytes());
        } else {
            out.extend_from_slice(&s[2..]);
        }
    }
    if !seen {
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(&value(None).to_be_bytes());
    }
    out
}

/// The payload length a frame's head says.
fn frame_len(h: &[u8]) -> usize {
    usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2])
}

fn set_frame_len(h: &mut [u8], len: usize) {
    h[..3].copy_from_slice(&(len as u32).to_be_bytes()[1..]);
}

/// A frame: its 9-byte header, then `payload`.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let n = payload.len();
    let mut f = Vec::with_capacity(9 + n);
    f.extend_from_slice(&[(n >> 16) as u8, (n >> 8) as u8, n as u8, kind, flags]);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn window_update(stream: u32, increment: u32) -> Vec<u8> {
    frame(WINDOW_UPDATE, 0, stream, &increment.to_be_bytes())
}

/// HEADERS carrying `block` on `stream` (with its priority, if any), and
/// CONTINUATIONs for what does not fit in `max_frame`.
fn header_frames(
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    block: &[u8],
    max_frame: usize,
    out: &mut Vec<u8>,
) {
    let first = max_frame - priority.map_or(0, |_| 5);
    let (head, mut rest) = block.split_at(first.min(block.len()));
    let mut flags = if end_stream { END_STREAM } else { 0 };
    let mut payload = Vec::with_capacity(head.len() + 5);
    if let Some(p) = priority {
        flags |= PRIORITY;
        payload.extend_from_slice(&p);
    }
    payload.extend_from_slice(head);
    if rest.is_empty() {
        flags |= END_HEADERS;
    }
    out.extend(frame(HEADERS, flags, stream, &payload));
    while !rest.is_empty() {
        let (part, tail) = rest.split_at(max_frame.min(rest.len()));
        rest = tail;
        let flags = if rest.is_empty() { END_HEADERS } else { 0 };
        out.extend(frame(CONTINUATION, flags, stream, part));
    }
}

/// HPACK's static table (RFC 7541 Appendix A), as the decoder knows it.
fn static_table() -> &'static [(Vec<u8>, Vec<u8>)] {
    static TABLE: OnceLock<Vec<(Vec<u8>, Vec<u8>)>> = OnceLock::new();
    TABLE.get_or_init(|| {
        (1u8..=61)
            .map(|i| {
                let mut field = None;
                Decoder::new()
                    .decode_with_cb(&[0x80 | i], |n, v| {
                        field = Some((n.into_owned(), v.into_owned()))
                    })
                    .expect("a static table index");
                field.expect("one field")
            })
            .collect()
    })
}

/// Encodes `fields` as one header block that leaves every dynamic table
/// as it was: a field in the static table by its index, others as
/// literals without indexing (a static name by its index), credentials
/// as never-indexed literals (RFC 7541 §7.1.3) so that no intermediary
/// after us indexes them either.
pub fn encode_block(fields: &[(Vec<u8>, Vec<u8>)], out: &mut Vec<u8>) {
    let table = static_table();
    for (name, value) in fields {
        let mut name_at = None;
        let mut whole = None;
        for (i, (n, v)) in table.iter().enumerate() {
            if n == name {
                name_at.get_or_insert(i + 1);
                if v == value {
                    whole = Some(i + 1);
                    break;
                }
            }
        }
        if let Some(i) = whole {
            let _ = encode_integer_into(i, 7, 0x80, out);
            continue;
        }
        let never = matches!(
            &name[..],
            b"authorization" | b"proxy-authorization" | b"cookie" | b"set-cookie"
        );
        let lead = if never { 0x10 } else { 0x00 };
        match name_at {
            Some(i) => {
                let _ = encode_integer_into(i, 4, lead, out);
            }
            None => {
                out.push(lead);
                literal(name, out);
            }
        }
        literal(value, out);
    }
}

/// An HPACK string literal (not Huffman-coded).
fn literal(s: &[u8], out: &mut Vec<u8>) {
    let _ = encode_integer_into(s.len(), 7, 0, out);
    out.extend_from_slice(s);
}

/// The fields of a header block the records need.
#[derive(Default)]
struct Fields {
    count: usize,
    /// The list's size as HPACK counts it (RFC 7541 §4.1).
    size: usize,
    /// Enforcer: every field, in order, to be encoded again.
    all: Option<Vec<(Vec<u8>, Vec<u8>)>>,
    method: Option<String>,
    path: Option<String>,
    authority: Option<String>,
    host: Option<String>,
    protocol: Option<String>,
    status: Option<u16>,
    content_type: Option<String>,
    /// A pseudo-header or `host` came twice.
    repeated: bool,
}

impl Fields {
    fn take(&mut self, name: Cow<[u8]>, value: Cow<[u8]>) {
        self.count += 1;
        self.size += name.len() + value.len() + 32;
        if self.size > MAX_HEADER_LIST {
            return; // refused once decoded
        }
        // Whole (the rules match all of it; records cut it).
        let text = || String::from_utf8_lossy(&value).into_owned();
        let once = |slot: &mut Option<String>, repeated: &mut bool| {
            *repeated |= slot.is_some();
            *slot = Some(text());
        };
        match &name[..] {
            b":method" => once(&mut self.method, &mut self.repeated),
            b":path" => once(&mut self.path, &mut self.repeated),
            b":authority" => once(&mut self.authority, &mut self.repeated),
            b":protocol" => once(&mut self.protocol, &mut self.repeated),
            b"host" => once(&mut self.host, &mut self.repeated),
            b":status" => {
                self.status = std::str::from_utf8(&value)
                    .ok()
                    .and_then(|s| s.parse().ok())
            }
            b"content-type" => self.content_type = Some(cut(&text())),
            _ => {}
        }
        if let Some(all) = self.all.as_mut() {
            all.push((name.into_owned(), value.into_owned()));
        }
    }
}

fn finish(s: Stream, now: Instant) -> HttpRequest {
    s.rec.finished(s.started, now)
}

impl Inspector for Http2 {
    fn on_data(&mut self, dir: Direction, data: &[u8], now: Instant, report: &mut Report) {
        // (An observer takes all of it: only the enforcer holds bytes.)
        self.rewrite(dir, data, now, report);
    }

    fn on_end(&mut self, dir: Direction, now: Instant, report: &mut Report) {
        if self.done || dir == Direction::ClientToServer {
            return;
        }
        // The server is done: streams still open are logged as they stand.
        for (_, s) in std::mem::take(&mut self.streams) {
            report.add(Finding::Http(finish(s, now)));
        }
    }
}

/// For the fuzz target: `data` is (direction, length) headed chunks, as
/// in [`super::http1::fuzz`]; the enforcer's output is checked to be
/// whole frames after the preface.
pub fn fuzz(data: &[u8]) {
    let mut h = Http2::new(None, None);
    let mut report = Report::default();
    let now = Instant::now();
    fuzz_chunks(data, |dir, chunk| h.on_data(dir, chunk, now, &mut report));
    h.on_end(Direction::ServerToClient, now, &mut report);
    let rules = Arc::new(vec![UrlRule {
        name: "fuzz".into(),
        hosts: Vec::new(),
        paths: vec!["/b*".into()],
        categories: Vec::new(),
        category_hosts: Vec::new(),
        action: UrlAction::Block,
    }]);
    let mut e = Http2::enforcing(Some(rules), None);
    let mut report = Report::default();
    fuzz_chunks(data, |dir, mut chunk| {
        while !chunk.is_empty() {
            let n = e.rewrite(dir, chunk, now, &mut report);
            if n == 0 {
                break; // held, or stopped
            }
            chunk = &chunk[n..];
        }
    });
}
#[cfg(test)]
mod tests {
    use loona_hpack::Encoder;
    use proptest::prelude::*;

    use super::*;

    const C2S: Direction = Direction::ClientToServer;
    const S2C: Direction = Direction::ServerToClient;

    fn block(enc: &mut Encoder, fields: &[(&str, &str)]) -> Vec<u8> {
        enc.encode(fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())))
    }

    /// A client and a server: two requests (the second with a body, its
    /// headers split over a CONTINUATION, its DATA padded), answered.
    fn conversation() -> (Vec<u8>, Vec<u8>) {
        let (mut ce, mut se) = (Encoder::new(), Encoder::new());
        let mut c = PREFACE.to_vec();
        c.extend(frame(SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100]));
        let get = block(
            &mut ce,
            &[
                (":method", "GET"),
                (":scheme", "https"),
                (":authority", "a.test"),
                (":path", "/a"),
            ],
        );
        c.extend(frame(HEADERS, END_HEADERS | END_STREAM, 1, &get));
        let post = block(
            &mut ce,
            &[
                (":method", "POST"),
                (":scheme", "https"),
                (":authority", "a.test"),
                (":path", "/b?x=1"),
            ],
        );
        let (one, two) = post.split_at(post.len() / 2);
        // PADDED and PRIORITY on the HEADERS: 2 bytes of padding.
        let mut first = vec![2, 0, 0, 0, 0, 16];
        first.extend_from_slice(one);
        first.extend_from_slice(&[0, 0]);
        c.extend(frame(HEADERS, PADDED | PRIORITY, 3, &first));
        c.extend(frame(CONTINUATION, END_HEADERS, 3, two));
        let mut data = vec![5];
        data.extend_from_slice(&[b'x'; 1000]);
        data.extend_from_slice(&[0; 5]);
        c.extend(frame(DATA, PADDED, 3, &data));
        c.extend(frame(DATA, END_STREAM, 3, &[b'y'; 24]));
        c.extend(frame(0x8, 0, 0, &[0, 0, 1, 0])); // WINDOW_UPDATE
        let mut s = frame(SETTINGS, 0, 0, &[0, 1, 0, 0, 16, 0]);
        s.extend(frame(SETTINGS, ACK, 0, &[]));
        let ok = block(
            &mut se,
            &[(":status", "200"), ("content-type", "text/html")],
        );
        s.extend(frame(HEADERS, END_HEADERS, 1, &ok));
        s.extend(frame(DATA, END_STREAM, 1, &[b'z'; 300]));
        let cont = block(&mut se, &[(":status", "100")]);
        s.extend(frame(HEADERS, END_HEADERS, 3, &cont));
        let created = block(&mut se, &[(":status", "201")]);
        s.extend(frame(HEADERS, END_HEADERS | END_STREAM, 3, &created));
        s.extend(frame(0x7, 0, 0, &[0, 0, 0, 3, 0, 0, 0, 0])); // GOAWAY
        (c, s)
    }

    /// Feeds both sides, each cut at `step` bytes, the client first.
    fn run(h: &mut Http2, c: &[u8], s: &[u8], step: usize) -> Report {
        let mut r = Report::default();
        let now = Instant::now();
        for chunk in c.chunks(step) {
            h.on_data(C2S, chunk, now, &mut r);
        }
        for chunk in s.chunks(step) {
            h.on_data(S2C, chunk, now, &mut r);
        }
        h.on_end(S2C, now, &mut r);
        r
    }

    fn requests(r: &Report) -> Vec<HttpRequest> {
        r.findings
            .iter()
            .filter_map(|f| match f {
                Finding::Http(q) => Some(HttpRequest {
                    duration_ms: 0,
                    ..q.clone()
                }),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn each_stream_is_a_request_record_however_the_bytes_are_cut() {
        let (c, s) = conversation();
        let whole = run(&mut Http2::new(None, None), &c, &s, usize::MAX);
        assert!(whole.block.is_none(), "{:?}", whole.findings);
        let got = requests(&whole);
        assert_eq!(got.len(), 2, "{:?}", whole.findings);
        let a = &got[0];
        assert_eq!(
            (
                a.seq,
                a.method.as_str(),
                a.host.as_deref(),
                a.path.as_str(),
                a.status
            ),
            (1, "GET", Some("a.test"), "/a", Some(200))
        );
        assert_eq!(a.content_type.as_deref(), Some("text/html"));
        assert_eq!((a.request_body, a.response_body), (0, 300));
        let b = &got[1];
        assert_eq!(
            (b.seq, b.method.as_str(), b.path.as_str(), b.status),
            (2, "POST", "/b?x=1", Some(201))
        );
        assert_eq!(
            (b.request_body, b.response_body),
            (1024, 0),
            "padding is not body"
        );
        for step in [1, 2, 7, 9, 10, 100] {
            let cut = run(&mut Http2::new(None, None), &c, &s, step);
            assert_eq!(requests(&cut), got, "cut at {step}");
        }
    }

    #[test]
    fn url_rules_name_the_stream_that_matched() {
        let rules = Arc::new(vec![UrlRule {
            name: "watch-b".into(),
            hosts: Vec::new(),
            paths: vec!["/b".into()],
            categories: Vec::new(),
            category_hosts: Vec::new(),
            action: UrlAction::Log,
        }]);
        let (c, s) = conversation();
        let r = run(&mut Http2::new(Some(rules), None), &c, &s, 50);
        let got = requests(&r);
        assert_eq!(got[0].url_rule, None);
        assert_eq!(got[1].url_rule.as_deref(), Some("watch-b"));
        assert_eq!(got[1].url_action, Some(UrlAction::Log));
    }

    #[test]
    fn hostile_streams_end_the_connection_with_a_reason() {
        let mut enc = Encoder::new();
        let get = block(&mut enc, &[(":method", "GET"), (":path", "/")]);
        let with = |frames: Vec<Vec<u8>>| [PREFACE.to_vec(), frames.concat()].concat();
        let flood: Vec<Vec<u8>> = std::iter::once(frame(HEADERS, 0, 1, &get))
            .chain((0..100).map(|_| frame(CONTINUATION, 0, 1, &[0x40; 1000])))
            .collect();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                b"GET / HTTP/1.1\r\n\r\n".to_vec(),
                "not the HTTP/2 client preface",
            ),
            (with(flood), "a header block over 64 KiB"),
            // A dynamic table size update above what SETTINGS allow.
            (
                with(vec![frame(
                    HEADERS,
                    END_HEADERS,
                    1,
                    &[0x3f, 0xe1, 0xff, 0x03, 0x82],
                )]),
                "HPACK",
            ),
            (
                with(vec![frame(HEADERS, END_HEADERS, 1, &[0xff, 0xff, 0x7f])]),
                "HPACK",
            ),
            (
                with(vec![frame(SETTINGS, 0, 0, &[0; 6000])]),
                "a SETTINGS frame of 6000 bytes",
            ),
            (
                with(vec![frame(HEADERS, 0, 1, &get), frame(DATA, 0, 1, b"x")]),
                "interrupted",
            ),
            (
                with(vec![frame(CONTINUATION, END_HEADERS, 1, &get)]),
                "without a header block",
            ),
            (
                with(vec![frame(DATA, PADDED, 1, &[9, 1, 2])]),
                "padding longer",
            ),
            (
                with(vec![frame(HEADERS, END_HEADERS, 0, &get)]),
                "on stream 0",
            ),
            (
                with(vec![frame(DATA, 0, 1, &[0; 16_385])]),
                "a frame of 16385 bytes, over the receiver's maximum of 16384",
            ),
            (
                with(vec![frame(SETTINGS, 0, 0, &[0, 5, 0, 0, 0, 1])]),
                "a SETTINGS_MAX_FRAME_SIZE of 1",
            ),
            (
                with(
                    std::iter::once(frame(HEADERS, 0, 1, &get))
                        .chain(
                            (0..=MAX_EMPTY_CONTINUATIONS).map(|_| frame(CONTINUATION, 0, 1, &[])),
                        )
                        .collect(),
                ),
                "more than 64 empty CONTINUATIONs",
            ),
        ];
        for (bytes, want) in cases {
            let mut h = Http2::new(None, None);
            let mut r = Report::default();
            h.on_data(C2S, &bytes, Instant::now(), &mut r);
            let reasons: Vec<&String> = r
                .findings
                .iter()
                .filter_map(|f| match f {
                    Finding::Anomaly { reason, .. } => Some(reason),
                    _ => None,
                })
                .collect();
            assert_eq!(reasons.len(), 1, "{want}: {:?}", r.findings);
            assert!(reasons[0].contains(want), "{want}: {reasons:?}");
            assert!(r.block.is_some(), "{want}: the connection ends");
            // And nothing more is looked at.
            let seen = r.findings.len();
            h.on_data(C2S, &bytes, Instant::now(), &mut r);
            assert_eq!(r.findings.len(), seen, "{want}");
        }
    }

    #[test]
    fn a_server_announcing_a_larger_table_lets_the_client_use_it_up_to_the_bound() {
        let mut h = Http2::new(None, None);
        let mut r = Report::default();
        let now = Instant::now();
        // The server allows 16 KiB; the client's update to 16 KiB is fine.
        h.on_data(
            S2C,
            &frame(SETTINGS, 0, 0, &[0, 1, 0, 0, 0x40, 0]),
            now,
            &mut r,
        );
        let mut c = PREFACE.to_vec();
        c.extend(frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            1,
            &[0x3f, 0xe1, 0x7f, 0x82, 0x84],
        ));
        h.on_data(C2S, &c, now, &mut r);
        assert!(r.block.is_none(), "{:?}", r.findings);
    }

    /// The fields of each header block in `frames`, decoded in order by
    /// one decoder (as the receiving peer would): (stream, fields).
    fn decode_all(frames: &[Parsed]) -> Vec<(u32, Vec<(String, String)>)> {
        let mut dec = Decoder::new();
        let mut got = Vec::new();
        let mut block = Vec::new();
        for (kind, flags, stream, p) in frames {
            match *kind {
                HEADERS => {
                    let mut p = &p[..];
                    if flags & PRIORITY != 0 {
                        p = &p[5..];
                    }
                    block = p.to_vec();
                }
                CONTINUATION => block.extend_from_slice(p),
                _ => continue,
            }
            if flags & END_HEADERS != 0 {
                let mut fields = Vec::new();
                dec.decode_with_cb(&block, |n, v| {
                    fields.push((
                        String::from_utf8_lossy(&n).into_owned(),
                        String::from_utf8_lossy(&v).into_owned(),
                    ))
                })
                .expect("the peer decodes it");
                got.push((*stream, fields));
            }
        }
        got
    }

    fn fields(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    fn enforcer() -> Http2 {
        let rules = Arc::new(vec![UrlRule {
            name: "no-b".into(),
            hosts: Vec::new(),
            paths: vec!["/b*".into()],
            categories: Vec::new(),
            category_hosts: Vec::new(),
            action: UrlAction::Block,
        }]);
        Http2::enforcing(Some(rules), None)
    }

    /// Feeds `bytes` in `step`-sized cuts as the pipeline would (again
    /// from what was not taken): how much was taken in all.
    fn feed(h: &mut Http2, dir: Direction, bytes: &[u8], step: usize, r: &mut Report) -> usize {
        let mut taken = 0;
        for chunk in bytes.chunks(step) {
            let mut rest = chunk;
            while !rest.is_empty() {
                let n = h.rewrite(dir, rest, Instant::now(), r);
                if n == 0 {
                    return taken;
                }
                taken += n;
                rest = &rest[n..];
            }
        }
        taken
    }

    fn take_out(h: &mut Http2, dir: Direction) -> Vec<u8> {
        std::mem::take(h.output(dir).expect("an enforcer"))
    }

    const GET_A: &[(&str, &str)] = &[
        (":method", "GET"),
        (":scheme", "https"),
        (":authority", "a.test"),
        (":path", "/a"),
        ("x-token", "secret-1"),
    ];
    const POST_B: &[(&str, &str)] = &[
        (":method", "POST"),
        (":scheme", "https"),
        (":authority", "a.test"),
        (":path", "/b/upload"),
        ("x-session", "only-in-the-refused-block"),
    ];
    /// References the table entry stream 3's block made.
    const GET_C: &[(&str, &str)] = &[
        (":method", "GET"),
        (":scheme", "https"),
        (":authority", "a.test"),
        (":path", "/c"),
        ("x-session", "only-in-the-refused-block"),
        ("cookie", "id=42"),
    ];

    /// Stream 1 and 5 allowed, 3 (with a body) refused; the client's
    /// encoder indexes every field, so stream 5 names a table entry that
    /// only stream 3's block made.
    fn blocked_conversation() -> (Vec<u8>, Vec<u8>) {
        let (mut ce, mut se) = (Encoder::new(), Encoder::new());
        let mut c = PREFACE.to_vec();
        c.extend(frame(SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100]));
        c.extend(frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            1,
            &block(&mut ce, GET_A),
        ));
        c.extend(frame(HEADERS, END_HEADERS, 3, &block(&mut ce, POST_B)));
        c.extend(frame(DATA, 0, 3, &[b'p'; 100]));
        c.extend(frame(WINDOW_UPDATE, 0, 3, &[0, 0, 1, 0]));
        c.extend(frame(DATA, END_STREAM, 3, &[b'p'; 50]));
        let mut prio = vec![0, 0, 0, 1, 200];
        prio.extend(block(&mut ce, GET_C));
        c.extend(frame(
            HEADERS,
            END_HEADERS | END_STREAM | PRIORITY,
            5,
            &prio,
        ));
        let mut s = frame(SETTINGS, 0, 0, &[0, 5, 0, 0, 0x40, 0]);
        s.extend(frame(SETTINGS, ACK, 0, &[]));
        for (id, body) in [(1, &b"one"[..]), (5, b"five")] {
            let ok = block(
                &mut se,
                &[(":status", "200"), ("content-type", "text/plain")],
            );
            s.extend(frame(HEADERS, END_HEADERS, id, &ok));
            s.extend(frame(DATA, END_STREAM, id, body));
        }
        (c, s)
    }

    #[test]
    fn a_blocked_stream_is_answered_here_and_the_others_reach_the_server() {
        let (c, s) = blocked_conversation();
        let mut first: Option<(Vec<u8>, Vec<u8>)> = None;
        for step in [usize::MAX, 1, 7, 9, 10, 64] {
            let mut h = enforcer();
            let mut r = Report::default();
            assert_eq!(feed(&mut h, C2S, &c, step, &mut r), c.len(), "cut {step}");
            assert!(
                take_out(&mut h, S2C).is_empty(),
                "nothing goes to the client before the server's SETTINGS"
            );
            assert_eq!(feed(&mut h, S2C, &s, step, &mut r), s.len(), "cut {step}");
            h.on_end(S2C, Instant::now(), &mut r);
            assert!(r.block.is_none(), "cut {step}: {:?}", r.findings);
            assert_eq!(r.refused, 1);
            let (up, down) = (take_out(&mut h, C2S), take_out(&mut h, S2C));

            // The server: the preface, SETTINGS with push off, streams 1
            // and 5 whole (5 keeps its priority), nothing of stream 3.
            assert!(up.starts_with(PREFACE));
            let to_server = parse(&up[PREFACE.len()..]);
            assert_eq!(
                to_server[0],
                (SETTINGS, 0, 0, vec![0, 3, 0, 0, 0, 100, 0, 2, 0, 0, 0, 0])
            );
            assert!(to_server.iter().all(|f| f.2 != 3), "{to_server:?}");
            assert_eq!(
                decode_all(&to_server),
                vec![(1, fields(GET_A)), (5, fields(GET_C))],
                "cut {step}"
            );
            let five = to_server.iter().find(|f| f.2 == 5).unwrap();
            assert_eq!(five.1, END_HEADERS | END_STREAM | PRIORITY);
            assert_eq!(&five.3[..5], &[0, 0, 0, 1, 200]);

            // The client: the server's frames as they were, with the 403
            // page on stream 3 and the 150 bytes of its body credited back.
            let to_client = parse(&down);
            let mut server_frames = parse(&s);
            // The server's SETTINGS, with its stream bound told.
            server_frames[0].3.extend([0, 3, 0, 0, 1, 0]);
            assert_eq!(to_client[0], server_frames[0]);
            let injected: Vec<Parsed> = to_client
                .iter()
                .filter(|f| {
                    let at = server_frames.iter().position(|g| g == *f);
                    at.map(|i| server_frames.remove(i)).is_none()
                })
                .cloned()
                .collect();
            assert!(server_frames.is_empty(), "all the server's frames pass");
            let page = block_body("no-b");
            assert_eq!(
                decode_all(&to_client)
                    .into_iter()
                    .filter(|(id, _)| *id == 3)
                    .collect::<Vec<_>>(),
                vec![(
                    3,
                    fields(&[
                        (":status", "403"),
                        ("content-type", "text/html; charset=utf-8"),
                        ("cache-control", "no-store"),
                        ("x-loupe-rule", "no-b"),
                        ("content-length", &page.len().to_string()),
                    ])
                )]
            );
            let kinds: Vec<(u8, u8, u32)> = injected.iter().map(|f| (f.0, f.1, f.2)).collect();
            assert_eq!(
                kinds,
                vec![
                    (HEADERS, END_HEADERS, 3),
                    (DATA, END_STREAM, 3),
                    (RST_STREAM, 0, 3),
                    (WINDOW_UPDATE, 0, 0),
                    (WINDOW_UPDATE, 0, 0),
                ],
                "cut {step}"
            );
            assert_eq!(injected[1].3, page.as_bytes());
            assert_eq!(injected[3].3, 100u32.to_be_bytes());
            assert_eq!(injected[4].3, 50u32.to_be_bytes());

            // Records: all three, the refused one with its 403.
            let mut got = requests(&r);
            got.sort_by_key(|q| q.seq);
            let paths: Vec<(&str, Option<u16>, Option<UrlAction>)> = got
                .iter()
                .map(|q| (q.path.as_str(), q.status, q.url_action))
                .collect();
            assert_eq!(
                paths,
                vec![
                    ("/a", Some(200), None),
                    ("/b/upload", Some(403), Some(UrlAction::Block)),
                    ("/c", Some(200), None),
                ]
            );
            match &first {
                None => first = Some((up, down)),
                Some(f) => assert_eq!(f, &(up, down), "cut {step} changes the output"),
            }
        }
    }

    #[test]
    fn the_page_is_paid_back_out_of_the_clients_window_updates() {
        let (c, s) = blocked_conversation();
        let mut h = enforcer();
        let mut r = Report::default();
        feed(&mut h, C2S, &c, usize::MAX, &mut r);
        feed(&mut h, S2C, &s, usize::MAX, &mut r);
        take_out(&mut h, C2S);
        let page = block_body("no-b").len() as u32;
        // 100 of the page: swallowed whole; then the rest of it comes out
        // of the next, and what is left of that goes on.
        let mut wu = window_update(0, 100);
        wu.extend(window_update(0, 1000));
        wu.extend(window_update(0, 5000));
        wu.extend(window_update(1, 7));
        feed(&mut h, C2S, &wu, usize::MAX, &mut r);
        let up = parse(&take_out(&mut h, C2S));
        assert_eq!(
            up,
            vec![
                (WINDOW_UPDATE, 0, 0, (1100 - page).to_be_bytes().to_vec()),
                (WINDOW_UPDATE, 0, 0, 5000u32.to_be_bytes().to_vec()),
                (WINDOW_UPDATE, 0, 1, 7u32.to_be_bytes().to_vec()),
            ]
        );
    }

    /// The client's preface and SETTINGS, then `requests` (stream, fields)
    /// each in one HEADERS frame that ends its stream.
    fn client_opens(settings: &[u8], requests: &[(u32, &[(&str, &str)])]) -> Vec<u8> {
        let mut enc = Encoder::new();
        let mut c = PREFACE.to_vec();
        c.extend(frame(SETTINGS, 0, 0, settings));
        for (id, fields) in requests {
            let b = block(&mut enc, fields);
            c.extend(frame(HEADERS, END_HEADERS | END_STREAM, *id, &b));
        }
        c
    }

    #[test]
    fn server_data_the_clients_real_window_cannot_take_waits_for_it() {
        let c = client_opens(&[], &[(1, GET_A), (3, POST_B)]);
        let mut h = enforcer();
        let mut r = Report::default();
        feed(&mut h, C2S, &c, usize::MAX, &mut r);
        take_out(&mut h, C2S);
        let mut s = frame(SETTINGS, 0, 0, &[]);
        s.extend(frame(HEADERS, END_HEADERS, 1, &[0x88]));
        // The server may send 65,535 bytes; the page took some of them.
        for n in [16_384, 16_384, 16_384, 16_383] {
            let last = if n == 16_383 { END_STREAM } else { 0 };
            s.extend(frame(DATA, last, 1, &vec![b'd'; n]));
        }
        let page = block_body("no-b").len();
        let taken = feed(&mut h, S2C, &s, usize::MAX, &mut r);
        let down = parse(&take_out(&mut h, S2C));
        let data: Vec<(usize, u8)> = down
            .iter()
            .filter(|f| f.0 == DATA && f.2 == 1)
            .map(|f| (f.3.len(), f.1))
            .collect();
        // The last frame is cut to what the client's window still takes
        // (a client may wait for it to fill before it makes room); the
        // rest, END_STREAM included, waits.
        assert_eq!(
            data,
            vec![(16_384, 0), (16_384, 0), (16_384, 0), (16_383 - page, 0)]
        );
        assert_eq!(taken, s.len() - page, "the rest held");
        assert_eq!(feed(&mut h, S2C, &s[taken..], usize::MAX, &mut r), 0);
        // The client makes room: the rest goes.
        feed(&mut h, C2S, &window_update(0, 65_535), usize::MAX, &mut r);
        assert_eq!(feed(&mut h, S2C, &s[taken..], usize::MAX, &mut r), page);
        let down = parse(&take_out(&mut h, S2C));
        assert_eq!(down.len(), 1);
        assert_eq!(
            (down[0].0, down[0].1, down[0].2, down[0].3.len()),
            (DATA, END_STREAM, 1, page)
        );
        assert!(r.block.is_none());
        // The server heard of the window the page did not take.
        let up = parse(&take_out(&mut h, C2S));
        assert_eq!(up.last().unwrap().3, ((65_535 - page) as u32).to_be_bytes());
    }

    #[test]
    fn without_room_for_the_page_the_403_comes_alone() {
        // Streams' windows of 10 bytes.
        let c = client_opens(&[0, 4, 0, 0, 0, 10], &[(1, POST_B)]);
        let mut h = enforcer();
        let mut r = Report::default();
        feed(&mut h, C2S, &c, usize::MAX, &mut r);
        feed(&mut h, S2C, &frame(SETTINGS, 0, 0, &[]), usize::MAX, &mut r);
        let down = parse(&take_out(&mut h, S2C));
        assert_eq!(down.len(), 2);
        assert_eq!(
            (down[1].0, down[1].1, down[1].2),
            (HEADERS, END_HEADERS | END_STREAM, 1)
        );
        let got = decode_all(&down);
        assert_eq!(got[0].1[0], (":status".into(), "403".into()));
    }

    #[test]
    fn push_is_turned_off_and_a_push_promise_then_ends_the_connection() {
        let mut c = PREFACE.to_vec();
        c.extend(frame(SETTINGS, 0, 0, &[0, 2, 0, 0, 0, 1, 0, 4, 0, 1, 0, 0]));
        let mut h = enforcer();
        let mut r = Report::default();
        feed(&mut h, C2S, &c, usize::MAX, &mut r);
        let up = take_out(&mut h, C2S);
        assert_eq!(
            parse(&up[PREFACE.len()..]),
            vec![(SETTINGS, 0, 0, vec![0, 2, 0, 0, 0, 0, 0, 4, 0, 1, 0, 0])]
        );
        let mut s = frame(SETTINGS, 0, 0, &[]);
        s.extend(frame(PUSH_PROMISE, END_HEADERS, 1, &[0, 0, 0, 2, 0x82]));
        feed(&mut h, S2C, &s, usize::MAX, &mut r);
        assert!(r.block.is_some());
        assert!(
            matches!(&r.findings[..], [Finding::Anomaly { reason, .. }] if reason.contains("PUSH_PROMISE"))
        );
    }

    #[test]
    fn large_header_blocks_are_split_to_the_servers_frame_size() {
        let cookie = "c".repeat(40_000);
        let get: Vec<(&str, &str)> = vec![
            (":method", "GET"),
            (":scheme", "https"),
            (":path", "/large"),
            ("cookie", &cookie),
        ];
        let b = block(&mut Encoder::new(), &get);
        let mut c = PREFACE.to_vec();
        c.extend(frame(SETTINGS, 0, 0, &[]));
        let (one, rest) = b.split_at(16_000);
        let (two, three) = rest.split_at(16_000);
        c.extend(frame(HEADERS, END_STREAM, 1, one));
        c.extend(frame(CONTINUATION, 0, 1, two));
        c.extend(frame(CONTINUATION, END_HEADERS, 1, three));
        let mut h = enforcer();
        let mut r = Report::default();
        feed(&mut h, C2S, &c, 1000, &mut r);
        assert!(r.block.is_none(), "{:?}", r.findings);
        let up = parse(&take_out(&mut h, C2S)[PREFACE.len()..]);
        assert!(up.iter().all(|f| f.3.len() <= 16_384));
        let kinds: Vec<(u8, u8)> = up[1..].iter().map(|f| (f.0, f.1)).collect();
        assert_eq!(
            kinds,
            vec![
                (HEADERS, END_STREAM),
                (CONTINUATION, 0),
                (CONTINUATION, END_HEADERS)
            ]
        );
        let got = decode_all(&up);
        assert_eq!(got, vec![(1, fields(&get))]);
        // The cookie went as never indexed (0x10): no peer indexes it.
        let block: Vec<u8> = up[1..].iter().flat_map(|f| f.3.clone()).collect();
        assert!(
            block.windows(2).any(|w| w == [0x1f, 0x11]),
            "cookie is static 32: 0x1f 0x11"
        );
    }

    #[test]
    fn hostile_header_blocks_and_tunnels_end_an_enforced_connection() {
        let mut enc = Encoder::new();
        // One 4000-byte entry, then a block naming it a hundred times.
        let big = "v".repeat(4000);
        let first = block(
            &mut enc,
            &[(":method", "GET"), (":path", "/"), ("x-big", &big)],
        );
        let mut c = PREFACE.to_vec();
        c.extend(frame(HEADERS, END_HEADERS | END_STREAM, 1, &first));
        c.extend(frame(HEADERS, END_HEADERS | END_STREAM, 3, &[0xbe; 100]));
        let connect = block(
            &mut Encoder::new(),
            &[(":method", "CONNECT"), (":authority", "b.test:443")],
        );
        let mut tunnel = PREFACE.to_vec();
        tunnel.extend(frame(HEADERS, END_HEADERS, 1, &connect));
        for (bytes, want) in [
            (c, "decoding to more than 256 KiB"),
            (tunnel, "a CONNECT tunnel"),
        ] {
            let mut h = enforcer();
            let mut r = Report::default();
            feed(&mut h, C2S, &bytes, usize::MAX, &mut r);
            assert!(r.block.is_some(), "{want}");
            assert!(
                r.findings
                    .iter()
                    .any(|f| matches!(f, Finding::Anomaly { reason, .. } if reason.contains(want))),
                "{want}: {:?}",
                r.findings
            );
        }
    }

    /// The outside probe's bypasses and floods, each held.
    #[test]
    fn the_rules_see_the_whole_request_as_the_server_would() {
        let long = format!("/{}{}b/secret", "a/".repeat(1100), "../".repeat(1100));
        let refused = |fields: &[(&str, &str)]| -> Result<bool, String> {
            let mut h = enforcer();
            let mut r = Report::default();
            feed(
                &mut h,
                C2S,
                &client_opens(&[], &[(1, fields)]),
                usize::MAX,
                &mut r,
            );
            match r.findings.iter().find_map(|f| match f {
                Finding::Anomaly { reason, .. } => Some(reason.clone()),
                _ => None,
            }) {
                Some(why) => Err(why),
                None => Ok(r.refused == 1),
            }
        };
        let get = |path: &str, more: &[(&'static str, &'static str)]| {
            let mut f = vec![(":method", "GET"), (":scheme", "https")];
            f.extend_from_slice(more);
            let path: &'static str = Box::leak(path.to_string().into_boxed_str());
            f.push((":path", path));
            f
        };
        // A path longer than a record keeps is matched whole.
        assert_eq!(refused(&get(&long, &[(":authority", "a.test")])), Ok(true));
        // A repeated :path, an :authority and host that differ: malformed.
        let twice = [
            (":method", "GET"),
            (":path", "/ok"),
            (":path", "/b"),
            (":authority", "a.test"),
        ];
        assert!(refused(&twice).unwrap_err().contains("twice"));
        let differ = get("/ok", &[(":authority", "a.test"), ("host", "b.test")]);
        assert!(refused(&differ).unwrap_err().contains("differ"));
        // An empty :authority does not hide the host field.
        let rules = Arc::new(vec![UrlRule {
            name: "no-evil".into(),
            hosts: vec!["evil.test".parse().unwrap()],
            paths: Vec::new(),
            categories: Vec::new(),
            category_hosts: Vec::new(),
            action: UrlAction::Block,
        }]);
        let mut h = Http2::enforcing(Some(rules), Some("good.test".into()));
        let mut r = Report::default();
        let c = client_opens(
            &[],
            &[(1, &get("/", &[(":authority", ""), ("host", "evil.test")]))],
        );
        feed(&mut h, C2S, &c, usize::MAX, &mut r);
        assert_eq!(r.refused, 1, "{:?}", r.findings);
        // A HEAD is answered with the 403 alone.
        let mut h = enforcer();
        let mut r = Report::default();
        let head = [(":method", "HEAD"), (":scheme", "https"), (":path", "/b")];
        feed(
            &mut h,
            C2S,
            &client_opens(&[], &[(1, &head)]),
            usize::MAX,
            &mut r,
        );
        feed(&mut h, S2C, &frame(SETTINGS, 0, 0, &[]), usize::MAX, &mut r);
        let down = parse(&take_out(&mut h, S2C));
        let kinds: Vec<(u8, u8)> = down[1..].iter().map(|f| (f.0, f.1)).collect();
        assert_eq!(kinds, [(HEADERS, END_HEADERS | END_STREAM)]);
    }

    #[test]
    fn a_client_that_does_not_read_its_answers_is_not_read_either() {
        let blocked = [(":method", "GET"), (":scheme", "https"), (":path", "/b")];
        let many: Vec<(u32, &[(&str, &str)])> =
            (0..900).map(|i| (2 * i + 1, &blocked[..])).collect();
        let c = client_opens(&[], &many);
        let mut h = enforcer();
        let mut r = Report::default();
        feed(&mut h, S2C, &frame(SETTINGS, 0, 0, &[]), usize::MAX, &mut r);
        take_out(&mut h, S2C);
        let taken = feed(&mut h, C2S, &c, usize::MAX, &mut r);
        let waiting = h.output(S2C).unwrap().len();
        assert!(taken < c.len(), "reading stops");
        assert!(waiting <= MAX_PENDING + 4096, "{waiting}");
        // Once the client reads, the rest is taken.
        take_out(&mut h, S2C);
        let more = feed(&mut h, C2S, &c[taken..], usize::MAX, &mut r);
        assert!(more > 0);
        // Refusals are bounded per connection.
        let mut h = enforcer();
        let mut r = Report::default();
        let flood: Vec<(u32, &[(&str, &str)])> = (0..=MAX_REFUSED as u32)
            .map(|i| (2 * i + 1, &blocked[..]))
            .collect();
        let c = client_opens(&[], &flood);
        let mut rest = &c[..];
        while !rest.is_empty() && r.block.is_none() {
            let n = h.rewrite(C2S, rest, Instant::now(), &mut r);
            rest = &rest[n..];
            take_out(&mut h, S2C);
        }
        assert!(r
            .block
            .as_ref()
            .unwrap()
            .0
            .contains("more than 1000 requests refused"));
    }

    #[test]
    fn hpack_expansion_toward_the_server_is_bounded() {
        let mut enc = Encoder::new();
        let big = "v".repeat(3900);
        let mut c = PREFACE.to_vec();
        c.extend(frame(SETTINGS, 0, 0, &[]));
        let first = block(
            &mut enc,
            &[(":method", "POST"), (":path", "/up"), ("x-big", &big)],
        );
        c.extend(frame(HEADERS, END_HEADERS, 1, &first));
        // 60 references to the 3.9 KB entry: 64 bytes decoding to 236 KB.
        let bomb = [0xbe; 60];
        for i in 0..20 {
            let mut f = vec![(":method", "GET"), (":path", "/x")];
            f.truncate(2);
            let mut b = block(&mut enc, &f);
            b.extend_from_slice(&bomb);
            c.extend(frame(HEADERS, END_HEADERS | END_STREAM, 2 * i + 3, &b));
        }
        let mut h = enforcer();
        let mut r = Report::default();
        let taken = feed(&mut h, C2S, &c, usize::MAX, &mut r);
        assert!(r.block.is_none(), "{:?}", r.findings);
        let pending = h.output(C2S).unwrap().len();
        assert!(taken < c.len());
        assert!(pending <= MAX_PENDING + MAX_HEADER_LIST, "{pending}");
        // A stream carries one block of trailers.
        let mut t = client_opens(&[], &[]);
        let mut enc = Encoder::new();
        let open = block(&mut enc, &[(":method", "POST"), (":path", "/up")]);
        t.extend(frame(HEADERS, END_HEADERS, 1, &open));
        let tr = block(&mut enc, &[("x-sum", "1")]);
        t.extend(frame(HEADERS, END_HEADERS, 1, &tr));
        t.extend(frame(HEADERS, END_HEADERS | END_STREAM, 1, &tr));
        let mut h = enforcer();
        let mut r = Report::default();
        feed(&mut h, C2S, &t, usize::MAX, &mut r);
        assert!(r
            .block
            .as_ref()
            .unwrap()
            .0
            .contains("a second block of trailers"));
    }

    #[test]
    fn streams_past_the_bound_and_odd_but_valid_requests_are_not_attacks() {
        // Streams opened before the client read the engine's SETTINGS:
        // the one past the bound is refused unprocessed, the rest go on.
        let get = [(":method", "GET"), (":scheme", "https"), (":path", "/ok")];
        let opens: Vec<(u32, &[(&str, &str)])> = (0..=MAX_STREAMS as u32)
            .map(|i| (2 * i + 1, &get[..]))
            .collect();
        let c = client_opens(&[], &opens);
        let mut h = enforcer();
        let mut r = Report::default();
        feed(&mut h, S2C, &frame(SETTINGS, 0, 0, &[]), usize::MAX, &mut r);
        take_out(&mut h, S2C);
        feed(&mut h, C2S, &c, usize::MAX, &mut r);
        // (The server has answered none: all stay open.)
        assert!(r.block.is_none(), "{:?}", r.findings.last());
        let down = parse(&take_out(&mut h, S2C));
        assert_eq!(
            down,
            [(
                RST_STREAM,
                0,
                2 * MAX_STREAMS as u32 + 1,
                7u32.to_be_bytes().to_vec()
            )]
        );
        let up = parse(&take_out(&mut h, C2S)[PREFACE.len()..]);
        assert_eq!(up.iter().filter(|f| f.0 == HEADERS).count(), MAX_STREAMS);
        // A host with the default port is the same host.
        let mut h = enforcer();
        let mut r = Report::default();
        let same = [
            (":method", "GET"),
            (":path", "/ok"),
            (":authority", "a.test"),
            ("host", "A.test:443"),
        ];
        feed(
            &mut h,
            C2S,
            &client_opens(&[], &[(1, &same)]),
            usize::MAX,
            &mut r,
        );
        assert!(r.block.is_none(), "{:?}", r.findings);
        // A header block in many one-byte CONTINUATIONs is valid.
        let b = block(&mut Encoder::new(), &get);
        let mut c = client_opens(&[], &[]);
        c.extend(frame(HEADERS, END_STREAM, 1, &b[..1]));
        for (i, byte) in b[1..].iter().enumerate() {
            let last = if i == b.len() - 2 { END_HEADERS } else { 0 };
            c.extend(frame(CONTINUATION, last, 1, &[*byte]));
        }
        let mut h = enforcer();
        let mut r = Report::default();
        feed(&mut h, C2S, &c, usize::MAX, &mut r);
        assert!(r.block.is_none(), "{:?}", r.findings);
        assert_eq!(requests(&r).len(), 0, "open, not yet answered");
        // Refusals are counted per ten seconds: a long-lived connection
        // refused now and then goes on.
        let blocked = [(":method", "GET"), (":scheme", "https"), (":path", "/b")];
        let mut h = enforcer();
        let mut r = Report::default();
        let t0 = Instant::now();
        let mut id = 1;
        for round in 0..3u64 {
            let at = t0 + REFUSAL_WINDOW * round as u32;
            let reqs: Vec<(u32, &[(&str, &str)])> = (0..MAX_REFUSED as u32)
                .map(|i| (id + 2 * i, &blocked[..]))
                .collect();
            id += 2 * MAX_REFUSED as u32;
            let mut c = client_opens(&[], &reqs);
            if round > 0 {
                c.drain(..PREFACE.len() + 9);
            }
            let mut rest = &c[..];
            while !rest.is_empty() {
                let n = h.rewrite(C2S, rest, at, &mut r);
                assert!(n > 0 || r.block.is_none());
                rest = &rest[n..];
                take_out(&mut h, S2C);
                take_out(&mut h, C2S);
                assert!(r.block.is_none(), "round {round}");
            }
        }
    }

    #[test]
    fn the_stream_bound_is_told_to_the_client_and_an_observer_only_stops_recording() {
        let mut h = enforcer();
        let mut r = Report::default();
        let mut s = frame(SETTINGS, 0, 0, &[0, 3, 0, 0, 3, 232]);
        s.extend(frame(SETTINGS, 0, 0, &[0, 4, 0, 1, 0, 0]));
        feed(&mut h, S2C, &s, usize::MAX, &mut r);
        let down = parse(&take_out(&mut h, S2C));
        assert_eq!(down[0].3, [0, 3, 0, 0, 1, 0], "1000 brought to 256");
        assert_eq!(down[1].3, [0, 4, 0, 1, 0, 0, 0, 3, 0, 0, 1, 0]);
        // An observer past the bound records no more, and lets it be.
        let opens: Vec<Vec<u8>> = (0..=MAX_STREAMS as u32)
            .map(|i| frame(HEADERS, END_HEADERS, 2 * i + 1, &[0x82, 0x84]))
            .collect();
        let c = [PREFACE.to_vec(), opens.concat()].concat();
        let mut h = Http2::new(None, None);
        let mut r = Report::default();
        h.on_data(C2S, &c, Instant::now(), &mut r);
        assert!(r.block.is_none());
        assert!(
            matches!(&r.findings[..], [Finding::Anomaly { reason, .. }] if reason.contains("not recorded"))
        );
    }

    #[test]
    fn an_enforced_connection_that_cannot_be_followed_tells_the_client_with_a_goaway() {
        let mut h = enforcer();
        let mut r = Report::default();
        feed(&mut h, S2C, &frame(SETTINGS, 0, 0, &[]), usize::MAX, &mut r);
        let connect = block(
            &mut Encoder::new(),
            &[(":method", "CONNECT"), (":authority", "b.test:443")],
        );
        let mut c = client_opens(&[], &[(5, GET_A)]);
        c.extend(frame(HEADERS, END_HEADERS, 7, &connect));
        feed(&mut h, C2S, &c, usize::MAX, &mut r);
        let (why, answer) = r.block.clone().expect("blocked");
        assert!(why.contains("CONNECT"), "{why}");
        let frames = parse(&answer.expect("a GOAWAY to pass on"));
        // The server's SETTINGS still waiting, then the GOAWAY.
        assert_eq!(frames[0].0, SETTINGS);
        let (kind, _, stream, p) = frames.last().unwrap();
        assert_eq!((*kind, *stream), (GOAWAY, 0));
        assert_eq!(
            &p[..8],
            &[0, 0, 0, 7, 0, 0, 0, 1],
            "last stream 7, PROTOCOL_ERROR"
        );
        assert!(String::from_utf8_lossy(&p[8..]).contains("CONNECT"));
        // Mid-frame toward the client, a GOAWAY would corrupt it: a reset.
        let mut h = enforcer();
        let mut r = Report::default();
        let mut half = frame(SETTINGS, 0, 0, &[]);
        half.extend(&frame(DATA, 0, 1, &[0; 100])[..50]);
        feed(&mut h, S2C, &half, usize::MAX, &mut r);
        let mut c = client_opens(&[], &[]);
        c.extend(frame(HEADERS, END_HEADERS, 7, &connect));
        feed(&mut h, C2S, &c, usize::MAX, &mut r);
        assert!(matches!(&r.block, Some((_, None))), "{:?}", r.block);
    }

    #[test]
    fn the_encoder_leaves_no_table_state_and_uses_the_static_table() {
        let f = vec![
            (b":method".to_vec(), b"GET".to_vec()),
            (b":path".to_vec(), b"/x".to_vec()),
            (b"x-new".to_vec(), b"1".to_vec()),
        ];
        let mut out = Vec::new();
        encode_block(&f, &mut out);
        // :method GET is static 2; :path by name (4) without indexing.
        assert_eq!(&out[..4], &[0x82, 0x04, 2, b'/']);
        let mut dec = Decoder::new();
        for _ in 0..3 {
            let mut got = Vec::new();
            dec.decode_with_cb(&out, |n, v| got.push((n.into_owned(), v.into_owned())))
                .unwrap();
            assert_eq!(got, f);
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
            fuzz(&data);
        }

        /// Valid frames of random kinds and sizes, cut anywhere.
        #[test]
        fn random_frames_never_panic(
            frames in proptest::collection::vec((0u8..12, any::<u8>(), 0u32..8, proptest::collection::vec(any::<u8>(), 0..64)), 0..32),
            step in 1usize..50,
        ) {
            let mut c = PREFACE.to_vec();
            for (k, fl, st, p) in &frames {
                c.extend(frame(*k, *fl, *st, p));
            }
            let mut h = Http2::new(None, None);
            let mut r = Report::default();
            for chunk in c.chunks(step) {
                h.on_data(C2S, chunk, Instant::now(), &mut r);
                h.on_data(S2C, chunk, Instant::now(), &mut r);
            }
        }

        /// The enforcer on random frames both ways, among them real
        /// requests (some refused) and answers: never a panic, and while
        /// the connection goes on, each peer decodes every header block
        /// it is passed with its own HPACK state, in order.
        #[test]
        fn each_peer_decodes_what_the_enforcer_passes_on(
            frames in proptest::collection::vec(
                (0u8..12, any::<u8>(), 1u32..12, proptest::collection::vec(any::<u8>(), 0..64), any::<bool>(), 0u8..3),
                0..40,
            ),
            step in 1usize..50,
        ) {
            let (mut ce, mut se) = (Encoder::new(), Encoder::new());
            let mut c = PREFACE.to_vec();
            c.extend(frame(SETTINGS, 0, 0, &[]));
            let mut s = frame(SETTINGS, 0, 0, &[]);
            for (k, fl, st, p, to_server, real) in &frames {
                let end = fl & END_STREAM;
                let f = match (real, to_server) {
                    (0, true) => frame(HEADERS, END_HEADERS | end, 2 * st + 1, &block(&mut ce, GET_A)),
                    (1, true) => frame(HEADERS, END_HEADERS | end, 2 * st + 1, &block(&mut ce, POST_B)),
                    (0 | 1, false) => frame(HEADERS, END_HEADERS | end, 2 * st + 1, &block(&mut se, &[(":status", "200")])),
                    // Frames that are well formed, mostly; never a
                    // header block.
                    _ => {
                        let id = 2 * st + 1;
                        let four = &p.iter().copied().chain([1; 4]).take(4).collect::<Vec<u8>>();
                        match *k {
                            0..=3 => frame(DATA, fl & END_STREAM, id, p),
                            4 => frame(0x6, 0, 0, &[7; 8]),
                            5 => frame(WINDOW_UPDATE, 0, id * u32::from(fl & 1), four),
                            6 => frame(RST_STREAM, 0, id, four),
                            7 => frame(0x20, *fl, *st, p),
                            CONTINUATION => continue,
                            _ => frame(*k, *fl, *st, p),
                        }
                    }
                };
                if *to_server { c.extend(f) } else { s.extend(f) }
            }
            let mut h = enforcer();
            let mut r = Report::default();
            let (mut up, mut down) = (Vec::new(), Vec::new());
            for (cc, sc) in c.chunks(step).zip(s.chunks(step).chain(std::iter::repeat(&[][..]))) {
                feed(&mut h, C2S, cc, usize::MAX, &mut r);
                feed(&mut h, S2C, sc, usize::MAX, &mut r);
                up.extend(take_out(&mut h, C2S));
                down.extend(take_out(&mut h, S2C));
            }
            if r.block.is_none() && up.len() >= PREFACE.len() {
                let whole = |mut b: &[u8]| {
                    let mut n = 0;
                    while b.len() >= 9 && b.len() >= 9 + frame_len(b) {
                        n += 9 + frame_len(b);
                        b = &b[9 + frame_len(b)..];
                    }
                    n
                };
                let up = &up[PREFACE.len()..];
                decode_all(&parse(&up[..whole(up)]));
                decode_all(&parse(&down[..whole(&down)]));
            }
        }
    }
}
