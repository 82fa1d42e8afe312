//! HTTP/2 (RFC 9113) on decrypted connections, as an observer: the frame
//! layer of both directions and their header blocks, decoded with HPACK
//! (RFC 7541, the `loona-hpack` decoder, which passes h2spec), so that
//! each stream is one request record like HTTP/1.1's (method, authority,
//! path, status, content type, body bytes each way, timing) with the URL
//! rule that matched it. Frames are read as they pass and never changed:
//! the preface, SETTINGS, flow control, PING and GOAWAY go through
//! untouched.
//!
//! Memory is bounded per connection: a header block (HEADERS or
//! PUSH_PROMISE with its CONTINUATIONs) of at most [`MAX_HEADER_BLOCK`]
//! bytes, HPACK dynamic tables of at most [`MAX_TABLE`] bytes whatever
//! SETTINGS announce, [`MAX_STREAMS`] streams open at once, SETTINGS
//! frames of at most [`MAX_SETTINGS`] bytes; DATA and other frames are
//! counted, not kept. A stream that breaks the protocol or a bound ends
//! the connection (both sides reset, an `anomaly` record saying why):
//! what follows could not be followed, and HTTP/2 has no resynchronising.

use std::{borrow::Cow, collections::BTreeMap, sync::Arc, time::Instant};

use loona_hpack::Decoder;

use super::{
    fuzz_chunks,
    http1::{cut, match_rules},
    Direction, Finding, HttpRequest, Inspector, Report,
};
use crate::policy::{UrlAction, UrlRule};

/// The client connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// A header block with its CONTINUATIONs, at most.
pub const MAX_HEADER_BLOCK: usize = 64 << 10;
/// An HPACK dynamic table, at most (the default is 4 KiB).
pub const MAX_TABLE: usize = 64 << 10;
/// Streams open at once, at most.
pub const MAX_STREAMS: usize = 256;
/// A SETTINGS frame, at most (each setting is 6 bytes).
pub const MAX_SETTINGS: usize = 4096;

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PUSH_PROMISE: u8 = 0x5;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

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
}

/// A header block being gathered.
#[derive(Debug)]
struct Block {
    stream: u32,
    /// PUSH_PROMISE: the promised stream (the block is its request).
    promised: Option<u32>,
    end_stream: bool,
    bytes: Vec<u8>,
}

/// One direction's reader.
struct Side {
    hpack: Decoder<'static>,
    /// Client side: bytes of the preface still to come.
    preface: usize,
    head: Vec<u8>,
    frame: Option<Frame>,
    /// The payload of a frame read whole (HEADERS, CONTINUATION,
    /// PUSH_PROMISE, SETTINGS, RST_STREAM).
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
}

/// The HTTP/2 inspector of one connection.
pub struct Http2 {
    sides: [Side; 2],
    streams: BTreeMap<u32, Stream>,
    requests: u64,
    rules: Option<Arc<Vec<UrlRule>>>,
    sni: Option<String>,
    done: bool,
}

impl Http2 {
    pub fn new(rules: Option<Arc<Vec<UrlRule>>>, sni: Option<String>) -> Http2 {
        Http2 {
            sides: [Side::new(true), Side::new(false)],
            streams: BTreeMap::new(),
            requests: 0,
            rules,
            sni,
            done: false,
        }
    }

    fn read(
        &mut self,
        dir: Direction,
        mut data: &[u8],
        now: Instant,
        report: &mut Report,
    ) -> Result<(), String> {
        let d = dir as usize;
        while !data.is_empty() {
            let side = &mut self.sides[d];
            if side.preface > 0 {
                let at = PREFACE.len() - side.preface;
                let n = side.preface.min(data.len());
                if data[..n] != PREFACE[at..at + n] {
                    return Err("not the HTTP/2 client preface".into());
                }
                side.preface -= n;
                data = &data[n..];
                continue;
            }
            let Some(mut f) = side.frame else {
                let n = (9 - side.head.len()).min(data.len());
                side.head.extend_from_slice(&data[..n]);
                data = &data[n..];
                if side.head.len() == 9 {
                    let h = std::mem::take(&mut side.head);
                    self.start_frame(dir, &h)?;
                    self.maybe_end_frame(dir, now, report)?;
                }
                continue;
            };
            match f.kind {
                DATA => {
                    if !f.padded_known {
                        // The pad length: padding is not body.
                        let pad = usize::from(data[0]);
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
                    data = &data[n..];
                    f.left -= n;
                }
                HEADERS | CONTINUATION | PUSH_PROMISE | SETTINGS | RST_STREAM => {
                    let side = &mut self.sides[d];
                    let n = f.left.min(data.len());
                    side.payload.extend_from_slice(&data[..n]);
                    data = &data[n..];
                    f.left -= n;
                }
                _ => {
                    let n = f.left.min(data.len());
                    data = &data[n..];
                    f.left -= n;
                }
            }
            self.sides[d].frame = Some(f);
            self.maybe_end_frame(dir, now, report)?;
        }
        Ok(())
    }

    /// A frame's 9-byte header has arrived.
    fn start_frame(&mut self, dir: Direction, h: &[u8]) -> Result<(), String> {
        let d = dir as usize;
        let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
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
            HEADERS | CONTINUATION | PUSH_PROMISE => {
                let so_far = side.block.as_ref().map_or(0, |b| b.bytes.len());
                if so_far + len > MAX_HEADER_BLOCK {
                    return Err(format!(
                        "a header block over {} KiB",
                        MAX_HEADER_BLOCK >> 10
                    ));
                }
            }
            SETTINGS if len > MAX_SETTINGS || len % 6 != 0 => {
                return Err(format!("a SETTINGS frame of {len} bytes"))
            }
            RST_STREAM if len != 4 => return Err(format!("a RST_STREAM frame of {len} bytes")),
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
        side.frame = Some(Frame {
            kind,
            flags,
            stream,
            left: len,
            padded_known: kind != DATA || flags & PADDED == 0,
            pad: 0,
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
                if f.kind == PUSH_PROMISE {
                    if dir == Direction::ClientToServer {
                        return Err("a PUSH_PROMISE from the client".into());
                    }
                    let id = p.get(..4).ok_or("a PUSH_PROMISE too short")?;
                    promised = Some(u32::from_be_bytes([id[0], id[1], id[2], id[3]]) & 0x7fff_ffff);
                    p = &p[4..];
                } else if f.flags & PRIORITY != 0 {
                    p = p
                        .get(5..)
                        .ok_or("a HEADERS frame too short for its priority")?;
                }
                if pad > p.len() {
                    return Err("padding longer than its frame".into());
                }
                let fragment = &p[..p.len() - pad];
                self.sides[d].block = Some(Block {
                    stream: f.stream,
                    promised,
                    end_stream: f.kind == HEADERS && f.flags & END_STREAM != 0,
                    bytes: fragment.to_vec(),
                });
                if f.flags & END_HEADERS != 0 {
                    self.end_block(dir, now, report)?;
                }
            }
            CONTINUATION => {
                if let Some(b) = self.sides[d].block.as_mut() {
                    b.bytes.extend_from_slice(&payload);
                }
                if f.flags & END_HEADERS != 0 {
                    self.end_block(dir, now, report)?;
                }
            }
            SETTINGS if f.flags & ACK == 0 => {
                for s in payload.chunks_exact(6) {
                    let v = u32::from_be_bytes([s[2], s[3], s[4], s[5]]) as usize;
                    match u16::from_be_bytes([s[0], s[1]]) {
                        // HEADER_TABLE_SIZE bounds what the *other* side's
                        // encoder may use: our decoder of that direction.
                        1 => self.sides[1 - d]
                            .hpack
                            .set_max_allowed_table_size(v.min(MAX_TABLE)),
                        // MAX_FRAME_SIZE: the largest frame the other side
                        // may send (RFC 9113 §6.5.2).
                        5 if (16_384..=16_777_215).contains(&v) => self.sides[1 - d].max_frame = v,
                        5 => return Err(format!("a SETTINGS_MAX_FRAME_SIZE of {v}")),
                        _ => {}
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
        Ok(())
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
    /// step), then a request, a response, or trailers.
    fn end_block(
        &mut self,
        dir: Direction,
        now: Instant,
        report: &mut Report,
    ) -> Result<(), String> {
        let d = dir as usize;
        let b = self.sides[d].block.take().expect("a block in progress");
        let mut fields = Fields::default();
        self.sides[d]
            .hpack
            .decode_with_cb(&b.bytes, |n, v| fields.take(n, v))
            .map_err(|e| format!("HPACK: {e}"))?;
        if fields.count > 1024 {
            return Err("a header block of more than 1024 fields".into());
        }
        let request_on = match (dir, b.promised) {
            (Direction::ServerToClient, Some(p)) => Some(p),
            (Direction::ClientToServer, _) if !self.streams.contains_key(&b.stream) => {
                Some(b.stream)
            }
            _ => None,
        };
        if let Some(id) = request_on {
            self.request(id, fields, now, report)?;
        } else if dir == Direction::ServerToClient {
            if let Some(s) = self.streams.get_mut(&b.stream) {
                if let Some(status) = fields.status {
                    if (100..200).contains(&status) {
                        return Ok(()); // interim
                    }
                    s.rec.status = Some(status);
                    s.rec.content_type = fields.content_type.map(|c| cut(&c));
                }
            }
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

    fn request(
        &mut self,
        id: u32,
        f: Fields,
        now: Instant,
        report: &mut Report,
    ) -> Result<(), String> {
        if self.streams.len() >= MAX_STREAMS {
            return Err(format!("more than {MAX_STREAMS} streams open at once"));
        }
        self.requests += 1;
        let host = f.authority.or(f.host).filter(|h| !h.is_empty());
        let path = f.path.unwrap_or_default();
        let rule = self
            .rules
            .as_deref()
            .and_then(|r| match_rules(r, host.as_deref(), self.sni.as_deref(), &path));
        let rec = HttpRequest {
            seq: self.requests,
            method: cut(&f.method.unwrap_or_default()),
            host: host.map(|h| cut(&h)),
            path: cut(&path),
            url_action: rule.as_ref().map(|r| r.1),
            url_rule: rule.as_ref().map(|r| r.0.clone()),
            ..HttpRequest::default()
        };
        if let Some((name, UrlAction::Block)) = &rule {
            // A stream cannot be refused alone yet: the connection is.
            report.block(format!(
                "URL rule {name:?} blocks {} {} (HTTP/2)",
                rec.method, rec.path
            ));
            report.add(Finding::Http(rec));
            return Ok(());
        }
        self.streams.insert(
            id,
            Stream {
                rec,
                started: now,
                ended: [false, false],
            },
        );
        Ok(())
    }

    fn stop(&mut self, dir: Direction, reason: String, report: &mut Report) {
        if !self.done {
            report.block(format!("HTTP/2 cannot be followed: {reason}"));
            report.add(Finding::Anomaly { dir, reason });
        }
        self.done = true;
        self.sides = [Side::new(true), Side::new(false)];
        self.streams.clear();
    }
}

/// The fields of a header block the records need.
#[derive(Default)]
struct Fields {
    count: usize,
    method: Option<String>,
    path: Option<String>,
    authority: Option<String>,
    host: Option<String>,
    status: Option<u16>,
    content_type: Option<String>,
}

impl Fields {
    fn take(&mut self, name: Cow<[u8]>, value: Cow<[u8]>) {
        self.count += 1;
        let text = || cut(&String::from_utf8_lossy(&value));
        match &name[..] {
            b":method" => self.method = Some(text()),
            b":path" => self.path = Some(text()),
            b":authority" => self.authority = Some(text()),
            b"host" => self.host = Some(text()),
            b":status" => {
                self.status = std::str::from_utf8(&value)
                    .ok()
                    .and_then(|s| s.parse().ok())
            }
            b"content-type" => self.content_type = Some(text()),
            _ => {}
        }
    }
}

fn finish(s: Stream, now: Instant) -> HttpRequest {
    s.rec.finished(s.started, now)
}

impl Inspector for Http2 {
    fn on_data(&mut self, dir: Direction, data: &[u8], now: Instant, report: &mut Report) {
        if self.done {
            return;
        }
        if let Err(reason) = self.read(dir, data, now, report) {
            self.stop(dir, reason, report);
        }
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
/// in [`super::http1::fuzz`].
pub fn fuzz(data: &[u8]) {
    let mut h = Http2::new(None, None);
    let mut report = Report::default();
    let now = Instant::now();
    fuzz_chunks(data, |dir, chunk| h.on_data(dir, chunk, now, &mut report));
    h.on_end(Direction::ServerToClient, now, &mut report);
}

#[cfg(test)]
mod tests {
    use loona_hpack::Encoder;
    use proptest::prelude::*;

    use super::*;

    const C2S: Direction = Direction::ClientToServer;
    const S2C: Direction = Direction::ServerToClient;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let n = payload.len();
        let mut f = vec![(n >> 16) as u8, (n >> 8) as u8, n as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

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
                    (0..=MAX_STREAMS as u32)
                        .map(|i| frame(HEADERS, END_HEADERS, 2 * i + 1, &[0x82, 0x84]))
                        .collect(),
                ),
                "more than 256 streams",
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
    }
}
