//! HTTP/1.1 (RFC 9112), parsed as it passes: requests from the client,
//! responses from the server, matched in order (pipelining), each pair one
//! [`HttpRequest`] finding once its response is complete. Message bodies
//! are delimited as §6.3 says (no body for HEAD, 1xx, 204 and 304;
//! chunked; Content-Length; or until the server closes) and counted, never
//! kept. A successful CONNECT or a 101 (Switching Protocols) ends the
//! parsing: what follows is another protocol, passed on unexamined.
//!
//! Memory is bounded per connection: a head of at most [`MAX_HEAD`] bytes
//! each way, chunk-size and trailer lines of bounded length, at most
//! [`MAX_PENDING`] requests awaiting a response, and fields cut at
//! [`MAX_FIELD`] bytes. A stream that breaks the protocol or a bound ends
//! the parsing with an [`Finding::Anomaly`] naming why; the bytes still
//! flow (other inspectors go on).

use std::{collections::VecDeque, sync::Arc, time::Instant};

use super::{any_blocks, fuzz_chunks, Direction, Finding, HttpRequest, Inspector, Report};
use crate::policy::{normalize_path, UrlAction, UrlRule};

/// The longest request or response head (start line and fields).
pub const MAX_HEAD: usize = 64 << 10;
/// Fields in one head, at most.
pub const MAX_HEADERS: usize = 128;
/// Requests sent and not yet answered, at most.
pub const MAX_PENDING: usize = 64;
/// The longest method, target, host or content type kept.
pub const MAX_FIELD: usize = 2048;
/// The longest chunk-size line, and all trailer fields together.
const MAX_LINE: usize = 1024;
const MAX_TRAILERS: usize = 16 << 10;

/// How a message body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Body {
    Length(u64),
    Chunked(Chunk),
    /// Until the server closes (responses only).
    UntilClose,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunk {
    /// Reading a chunk-size line (into [`Side::line`]).
    Size,
    Data(u64),
    /// The CRLF after a chunk's data (the CR seen).
    DataEnd(bool),
    /// Trailer fields (so many bytes so far; the current line's length).
    Trailer(usize, usize),
}

/// Where one direction's reader is.
#[derive(Debug, PartialEq, Eq)]
enum Read {
    Head,
    Body(Body),
    /// Not parsed any more (another protocol, or an anomaly).
    Opaque,
}

#[derive(Debug)]
struct Side {
    read: Read,
    head: Vec<u8>,
    /// The chunk-size line being read.
    line: Vec<u8>,
}

impl Default for Side {
    fn default() -> Self {
        Side {
            read: Read::Head,
            head: Vec::new(),
            line: Vec::new(),
        }
    }
}

/// A request sent, awaiting its response.
#[derive(Debug)]
struct Pending {
    rec: HttpRequest,
    started: Instant,
    head: bool,
    connect: bool,
    upgrade: bool,
}

/// One connection's HTTP/1.1 parser.
#[derive(Debug, Default)]
pub struct Http1 {
    sides: [Side; 2],
    pending: VecDeque<Pending>,
    requests: u64,
    /// Parsing ended for both directions.
    done: bool,
    /// The policy's URL rules, each request matched against them.
    rules: Option<Arc<Vec<UrlRule>>>,
    /// The client's server name: the host of a request that names none.
    sni: Option<String>,
}

/// The page a request blocked by URL rule `rule` is answered with.
pub fn block_page(rule: &str) -> Vec<u8> {
    let body = block_body(rule);
    format!(
        "HTTP/1.1 403 Forbidden\r\nContent-Type: text/html; charset=utf-8\r\n\
         Content-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\
         X-Loupe-Rule: {}\r\n\r\n{body}",
        body.len(),
        rule.replace(['\r', '\n'], " ")
    )
    .into_bytes()
}

/// The HTML of [`block_page`] (HTTP/2 sends it as DATA).
pub fn block_body(rule: &str) -> String {
    let escaped: String = rule
        .chars()
        .map(|c| match c {
            '<' => "&lt;".to_string(),
            '>' => "&gt;".to_string(),
            '&' => "&amp;".to_string(),
            '"' => "&quot;".to_string(),
            c if c.is_control() => " ".to_string(),
            c => c.to_string(),
        })
        .collect();
    format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>Blocked</title></head>\n\
         <body><h1>Blocked by policy</h1><p>This request was blocked by Loupe's URL rule \
         <b>{escaped}</b>.</p></body></html>\n"
    )
}

/// Parsed message framing, shared by requests and responses.
struct Framing {
    length: Option<u64>,
    chunked: bool,
}

impl Http1 {
    pub fn new(rules: Option<Arc<Vec<UrlRule>>>, sni: Option<String>) -> Http1 {
        Http1 {
            rules,
            sni,
            ..Http1::default()
        }
    }

    fn stop(&mut self, dir: Direction, reason: String, report: &mut Report) {
        if !self.done {
            report.add(Finding::Anomaly { dir, reason });
        }
        self.opaque();
    }

    fn opaque(&mut self) {
        self.done = true;
        for s in &mut self.sides {
            s.read = Read::Opaque;
            s.head = Vec::new();
            s.line = Vec::new();
        }
    }

    /// Everything still awaiting a response is logged as unanswered.
    fn flush(&mut self, now: Instant, report: &mut Report) {
        while let Some(p) = self.pending.pop_front() {
            report.add(Finding::Http(finish(p, now)));
        }
    }

    /// Takes bytes of a head; returns how many of `data` it used, and the
    /// complete head's length (in `side.head`) once its blank line is in.
    fn take_head(side: &mut Side, data: &[u8]) -> (usize, Option<usize>) {
        let mut used = 0;
        if side.head.is_empty() {
            // Blank lines before a message are ignored (RFC 9112 §2.2).
            used = data
                .iter()
                .take_while(|b| **b == b'\r' || **b == b'\n')
                .count();
        }
        let old = side.head.len();
        let room = (MAX_HEAD + 1).saturating_sub(old);
        let take = (data.len() - used).min(room);
        side.head.extend_from_slice(&data[used..used + take]);
        let from = old.saturating_sub(3);
        let end = find_blank_line(&side.head[from..]).map(|e| from + e);
        match end {
            Some(e) => (used + e - old, Some(e)),
            None => (used + take, None),
        }
    }

    fn on_request_head(&mut self, now: Instant, report: &mut Report) -> Result<(), String> {
        let side = &mut self.sides[0];
        let head = std::mem::take(&mut side.head);
        if head.starts_with(b"PRI * HTTP/2.0\r\n") {
            return Err("HTTP/2 spoken without ALPN: not parsed".into());
        }
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut fields);
        match req.parse(&head) {
            Ok(httparse::Status::Complete(_)) => {}
            Ok(httparse::Status::Partial) => return Err("an incomplete request head".into()),
            Err(e) => return Err(format!("a malformed request head ({e})")),
        }
        let method = req.method.unwrap_or_default();
        let target = req.path.unwrap_or_default();
        let framing = framing(req.headers, Some(req.version.unwrap_or(1)))?;
        let hosts = req
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("host"))
            .count();
        if hosts > 1 {
            // RFC 9112 §3.2: a server must refuse it; which one a server
            // would take is anyone's guess.
            return Err("a request with more than one Host field".into());
        }
        // An absolute target's authority wins over the Host field (RFC
        // 9112 §3.2.2).
        let host = match target.split_once("://") {
            Some((scheme, rest)) if !scheme.contains('/') => {
                let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
                let authority = authority.rsplit('@').next().unwrap_or_default();
                Some(cut(authority))
            }
            // An empty Host is no host: the TLS server name stands in.
            _ => field(req.headers, "host")
                .filter(|h| !h.iter().all(|b| *b == b' ' || *b == b'\t'))
                .map(|h| cut(&String::from_utf8_lossy(h))),
        };
        let upgrade = field(req.headers, "upgrade");
        let connect = method.eq_ignore_ascii_case("CONNECT");
        if self.enforcing() {
            // After a 101 or a CONNECT's 2xx the parser sees no more
            // requests: while URL rules may block, only WebSocket (which
            // carries no HTTP requests) may leave HTTP/1.1.
            if let Some(u) = upgrade {
                if !u.eq_ignore_ascii_case(b"websocket") {
                    return Err(format!(
                        "an upgrade to {:?} while URL rules are enforced (only websocket)",
                        cut(&String::from_utf8_lossy(u))
                    ));
                }
            }
            if connect {
                return Err("a CONNECT tunnel while URL rules are enforced".into());
            }
        }
        let upgrade = upgrade.is_some();
        let head = method == "HEAD";
        if self.pending.len() >= MAX_PENDING {
            return Err(format!(
                "more than {MAX_PENDING} requests sent without a response"
            ));
        }
        self.requests += 1;
        // (HTTP/1.0 needs no Host field: the TLS server name stands in.)
        let rule = self
            .rules
            .as_deref()
            .and_then(|rules| match_rules(rules, host.as_deref(), self.sni.as_deref(), target));
        let mut rec = HttpRequest {
            seq: self.requests,
            method: cut(method),
            host,
            path: cut(target),
            url_action: rule.as_ref().map(|r| r.1),
            url_rule: rule.as_ref().map(|r| r.0.clone()),
            ..HttpRequest::default()
        };
        if let Some((name, UrlAction::Block)) = rule {
            // Answered here; the server never sees it. A 403 may only go
            // out when nothing before it awaits its answer: otherwise the
            // connection is reset.
            let why = format!("URL rule {name:?} blocks {} {}", rec.method, rec.path);
            if self.pending.is_empty() {
                rec.status = Some(403);
                report.block_with(why, block_page(&name));
            } else {
                report.block(why);
            }
            self.flush(now, report);
            report.add(Finding::Http(rec));
            self.opaque();
            return Ok(());
        }
        self.pending.push_back(Pending {
            rec,
            started: now,
            head,
            connect,
            upgrade,
        });
        // A request's body: chunked, a length, or none (§6.3, 6-7).
        self.sides[0].read = match (framing.chunked, framing.length) {
            (true, _) => Read::Body(Body::Chunked(Chunk::Size)),
            (false, Some(n)) if n > 0 => Read::Body(Body::Length(n)),
            _ => Read::Head,
        };
        Ok(())
    }

    fn on_response_head(&mut self, now: Instant, report: &mut Report) -> Result<(), String> {
        let side = &mut self.sides[1];
        let head = std::mem::take(&mut side.head);
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut fields);
        match resp.parse(&head) {
            Ok(httparse::Status::Complete(_)) => {}
            Ok(httparse::Status::Partial) => return Err("an incomplete response head".into()),
            Err(e) => return Err(format!("a malformed response head ({e})")),
        }
        let status = resp.code.unwrap_or_default();
        let framing = framing(resp.headers, None)?;
        let content_type =
            field(resp.headers, "content-type").map(|c| cut(&String::from_utf8_lossy(c)));
        let Some(p) = self.pending.front_mut() else {
            return Err("a response to no request".into());
        };
        if (100..200).contains(&status) && status != 101 {
            // Interim: the final response follows.
            return Ok(());
        }
        p.rec.status = Some(status);
        p.rec.content_type = content_type;
        if (status == 101 && p.upgrade) || (p.connect && (200..300).contains(&status)) {
            // Another protocol from here on, both ways.
            let done = self.pending.pop_front().expect("front above");
            report.add(Finding::Http(finish(done, now)));
            self.flush(now, report);
            self.opaque();
            return Ok(());
        }
        let bodyless = p.head || status == 204 || status == 304 || status == 101;
        self.sides[1].read = match (bodyless, framing.chunked, framing.length) {
            (true, _, _) => Read::Head,
            (false, true, _) => Read::Body(Body::Chunked(Chunk::Size)),
            (false, false, Some(n)) => Read::Body(Body::Length(n)),
            (false, false, None) => Read::Body(Body::UntilClose),
        };
        if self.sides[1].read == Read::Head {
            self.response_done(now, report);
        }
        Ok(())
    }

    fn response_done(&mut self, now: Instant, report: &mut Report) {
        if let Some(p) = self.pending.pop_front() {
            report.add(Finding::Http(finish(p, now)));
        }
    }

    /// Reads body bytes from `data`; how many it used, and whether the body
    /// is complete.
    fn body(&mut self, d: usize, data: &[u8]) -> Result<(usize, bool), String> {
        let side = &mut self.sides[d];
        let Read::Body(body) = &mut side.read else {
            return Ok((0, true));
        };
        let mut counted = 0u64;
        let mut used = 0;
        let mut complete = false;
        while used < data.len() && !complete {
            let rest = &data[used..];
            match body {
                Body::Length(n) => {
                    let k = (*n).min(rest.len() as u64);
                    *n -= k;
                    used += k as usize;
                    counted += k;
                    complete = *n == 0;
                }
                Body::UntilClose => {
                    used += rest.len();
                    counted += rest.len() as u64;
                }
                Body::Chunked(Chunk::Size) => {
                    let nl = rest.iter().position(|b| *b == b'\n');
                    let part = &rest[..nl.unwrap_or(rest.len())];
                    if side.line.len() + part.len() > MAX_LINE {
                        return Err(format!("a chunk-size line over {MAX_LINE} bytes"));
                    }
                    side.line.extend_from_slice(part);
                    used += part.len();
                    if nl.is_none() {
                        continue;
                    }
                    used += 1;
                    // CRLF only: a bare LF (or a CR inside the line) ends
                    // the line elsewhere for other parsers.
                    match side.line.split_last() {
                        Some((b'\r', line)) if !line.contains(&b'\r') => {}
                        _ => return Err("a chunk-size line not ended by CRLF".into()),
                    }
                    let size = chunk_size(&side.line)?;
                    side.line.clear();
                    *body = Body::Chunked(if size == 0 {
                        Chunk::Trailer(0, 0)
                    } else {
                        Chunk::Data(size)
                    });
                }
                Body::Chunked(Chunk::Data(n)) => {
                    let k = (*n).min(rest.len() as u64);
                    *n -= k;
                    used += k as usize;
                    counted += k;
                    if *n == 0 {
                        *body = Body::Chunked(Chunk::DataEnd(false));
                    }
                }
                Body::Chunked(Chunk::DataEnd(cr)) => {
                    match (rest[0], *cr) {
                        (b'\r', false) => *cr = true,
                        (b'\n', true) => *body = Body::Chunked(Chunk::Size),
                        _ => return Err("chunk data not followed by CRLF".into()),
                    }
                    used += 1;
                }
                Body::Chunked(Chunk::Trailer(total, line)) => {
                    let b = rest[0];
                    used += 1;
                    *total += 1;
                    if *total > MAX_TRAILERS {
                        return Err(format!("trailer fields over {MAX_TRAILERS} bytes"));
                    }
                    match b {
                        b'\n' if *line == 0 => complete = true,
                        b'\n' => *line = 0,
                        b'\r' => {}
                        _ => *line += 1,
                    }
                }
            }
        }
        // The request being sent is the newest; the response being
        // received answers the oldest.
        if d == 0 {
            if let Some(p) = self.pending.back_mut() {
                p.rec.request_body += counted;
            }
        } else if let Some(p) = self.pending.front_mut() {
            p.rec.response_body += counted;
        }
        Ok((used, complete))
    }

    fn feed(
        &mut self,
        dir: Direction,
        mut data: &[u8],
        now: Instant,
        report: &mut Report,
    ) -> Result<(), String> {
        let d = dir as usize;
        while !data.is_empty() {
            match self.sides[d].read {
                Read::Opaque => return Ok(()),
                Read::Head => {
                    if d == 1 && self.pending.is_empty() {
                        return Err("the server sent bytes no request asked for".into());
                    }
                    let (used, end) = Self::take_head(&mut self.sides[d], data);
                    data = &data[used..];
                    match end {
                        Some(len) => {
                            self.sides[d].head.truncate(len);
                            match dir {
                                Direction::ClientToServer => self.on_request_head(now, report)?,
                                Direction::ServerToClient => self.on_response_head(now, report)?,
                            }
                        }
                        None if self.sides[d].head.len() > MAX_HEAD => {
                            return Err(format!("a head over {} KiB", MAX_HEAD >> 10));
                        }
                        None => {}
                    }
                }
                Read::Body(_) => {
                    let (used, complete) = self.body(d, data)?;
                    data = &data[used..];
                    if complete {
                        self.sides[d].read = Read::Head;
                        if d == 1 {
                            self.response_done(now, report);
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

impl Http1 {
    /// Whether a URL rule could block a request here: then a stream this
    /// parser cannot follow must not carry requests past the rules.
    fn enforcing(&self) -> bool {
        self.rules.as_deref().is_some_and(|r| any_blocks(r))
    }
}

impl Inspector for Http1 {
    fn on_data(&mut self, dir: Direction, data: &[u8], now: Instant, report: &mut Report) {
        if self.done {
            return;
        }
        if let Err(why) = self.feed(dir, data, now, report) {
            self.flush(now, report);
            let why = format!("HTTP/1.1 parsing stopped: {why}");
            if self.enforcing() {
                // Fail closed: what follows could be requests the URL
                // rules would block.
                report.block(format!("{why} (URL rules cannot be enforced)"));
            }
            self.stop(dir, why, report);
        }
    }

    fn on_end(&mut self, dir: Direction, now: Instant, report: &mut Report) {
        if dir == Direction::ServerToClient {
            // A body read until the close is complete; nothing else will
            // be answered.
            if self.sides[1].read == Read::Body(Body::UntilClose) {
                self.response_done(now, report);
            }
            self.flush(now, report);
        }
    }
}

/// Drives a parser with arbitrary input (the cargo-fuzz target `http1`,
/// and a property test here): each part is a byte whose low bit gives
/// the direction and whose other bits a length, then that many bytes.
/// Checked throughout: no panic, the buffers and the queue within their
/// bounds; at the server's end, every request logged.
pub fn fuzz(data: &[u8]) {
    let mut h = Http1::default();
    let mut report = Report::default();
    let now = Instant::now();
    fuzz_chunks(data, |dir, chunk| {
        h.on_data(dir, chunk, now, &mut report);
        assert!(h
            .sides
            .iter()
            .all(|s| s.head.len() <= MAX_HEAD + 1 && s.line.len() <= MAX_LINE));
        assert!(h.pending.len() <= MAX_PENDING);
    });
    h.on_end(Direction::ClientToServer, now, &mut report);
    h.on_end(Direction::ServerToClient, now, &mut report);
    assert!(h.pending.is_empty());
    let logged = report
        .findings
        .iter()
        .filter(|f| matches!(f, Finding::Http(_)))
        .count() as u64;
    assert_eq!(logged, h.requests, "every request is logged once");
}

fn finish(p: Pending, now: Instant) -> HttpRequest {
    p.rec.finished(p.started, now)
}

/// The URL rule deciding a request for `target` with `host` (none: the
/// TLS server name `sni` stands in) on a connection to `sni`: the first
/// that matches the host, unless a block matches the server name (a Host
/// unlike the server name may still reach the site the name chose).
pub(super) fn match_rules(
    rules: &[UrlRule],
    host: Option<&str>,
    sni: Option<&str>,
    target: &str,
) -> Option<(String, UrlAction)> {
    let path = normalize_path(target);
    let first = |host: Option<&str>| {
        rules
            .iter()
            .find(|r| r.matches(host, &path))
            .map(|r| (r.name.clone(), r.action))
    };
    let by_host = first(host.or(sni));
    match (&by_host, sni) {
        (Some((_, UrlAction::Block)), _) | (_, None) => by_host,
        (_, Some(sni)) => match first(Some(sni)) {
            b @ Some((_, UrlAction::Block)) => b,
            _ => by_host,
        },
    }
}

/// The end (past the blank line) of a head in `bytes`: CRLF CRLF, or bare
/// LFs, which RFC 9112 §2.2 lets a recipient accept.
fn find_blank_line(bytes: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\n' {
            match bytes.get(i + 1) {
                Some(b'\n') => return Some(i + 2),
                Some(b'\r') if bytes.get(i + 2) == Some(&b'\n') => return Some(i + 3),
                _ => {}
            }
        }
        i += 1;
    }
    None
}

fn field<'a>(headers: &'a [httparse::Header<'_>], name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

/// Content-Length and Transfer-Encoding as RFC 9112 §6 reads them:
/// differing lengths or a length that is not a number are errors; a
/// request's codings must end in chunked, a response's that do not run
/// until the close; chunked wins over a length in a response, and in a
/// request the two together (a smuggling attempt, §6.3 item 3) or any
/// coding in HTTP/1.0 (§6.1) are errors. `request` is the request's minor
/// version, or None for a response.
fn framing(headers: &[httparse::Header<'_>], request: Option<u8>) -> Result<Framing, String> {
    let mut length: Option<u64> = None;
    let mut codings: Vec<String> = Vec::new();
    for h in headers {
        if h.name.eq_ignore_ascii_case("content-length") {
            let text = std::str::from_utf8(h.value).unwrap_or("");
            for v in text.split(',') {
                let v = v.trim();
                if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) || v.len() > 19 {
                    return Err(format!("a Content-Length of {text:?}"));
                }
                let n: u64 = v
                    .parse()
                    .map_err(|_| format!("a Content-Length of {text:?}"))?;
                if length.is_some_and(|l| l != n) {
                    return Err("two different Content-Lengths".into());
                }
                length = Some(n);
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            for c in h.value.split(|b| *b == b',') {
                let name = trim_ows(c.split(|b| *b == b';').next().unwrap_or_default());
                if name.is_empty() {
                    continue;
                }
                // Only token characters (RFC 9110 §5.6.2): anything else
                // is read differently by different servers.
                if !name.iter().all(|b| is_tchar(*b)) {
                    return Err(format!(
                        "a transfer coding {:?}",
                        cut(&String::from_utf8_lossy(c))
                    ));
                }
                codings.push(String::from_utf8_lossy(name).to_ascii_lowercase());
            }
        }
    }
    if let Some(minor) = request {
        if !codings.is_empty() && minor == 0 {
            return Err("an HTTP/1.0 request with Transfer-Encoding".into());
        }
        if !codings.is_empty() && length.is_some() {
            return Err("a request with both Transfer-Encoding and Content-Length".into());
        }
    }
    let chunked = match codings.last() {
        None => false,
        Some(c) if c == "chunked" => true,
        Some(c) if request.is_some() => {
            return Err(format!("a transfer coding {c:?} not ending in chunked"))
        }
        // A response read until the connection closes.
        Some(_) => {
            return Ok(Framing {
                length: None,
                chunked: false,
            })
        }
    };
    Ok(Framing { length, chunked })
}

/// `b` without the spaces and tabs (RFC 9110 OWS) around it; nothing
/// else counts as white space here.
fn trim_ows(mut b: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = b {
        b = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = b {
        b = rest;
    }
    b
}

/// RFC 9110 §5.6.2 token characters.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A chunk-size line: hex digits, then maybe extensions after `;`.
fn chunk_size(line: &[u8]) -> Result<u64, String> {
    let text = std::str::from_utf8(line).map_err(|_| "a chunk size that is not text")?;
    let text = text.strip_suffix('\r').unwrap_or(text);
    let size = text.split(';').next().unwrap_or("");
    let size = size.trim_matches([' ', '\t']);
    if size.is_empty() || size.len() > 16 || !size.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("a chunk size of {:?}", cut(size)));
    }
    u64::from_str_radix(size, 16).map_err(|e| e.to_string())
}

/// `s`, at most [`MAX_FIELD`] bytes (cut at a character boundary).
pub(super) fn cut(s: &str) -> String {
    if s.len() <= MAX_FIELD {
        return s.to_string();
    }
    let mut end = MAX_FIELD;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// (seq, method, host, path, status, request body, response body)
    type Summary = (u64, String, Option<String>, String, Option<u16>, u64, u64);
    /// What each side says, in turn.
    type Talk = Vec<(Direction, Vec<u8>)>;

    const C2S: Direction = Direction::ClientToServer;
    const S2C: Direction = Direction::ServerToClient;

    /// Runs a conversation, each (direction, bytes) in turn, every chunk
    /// cut at `step` bytes; then the server's end.
    fn talk(parts: &[(Direction, &[u8])], step: usize) -> Vec<Finding> {
        let mut h = Http1::default();
        let mut r = Report::default();
        let now = Instant::now();
        for (dir, bytes) in parts {
            for chunk in bytes.chunks(step.max(1)) {
                h.on_data(*dir, chunk, now, &mut r);
            }
        }
        h.on_end(C2S, now, &mut r);
        h.on_end(S2C, now, &mut r);
        r.findings
    }

    fn requests(f: &[Finding]) -> Vec<Summary> {
        f.iter()
            .filter_map(|f| match f {
                Finding::Http(r) => Some((
                    r.seq,
                    r.method.clone(),
                    r.host.clone(),
                    r.path.clone(),
                    r.status,
                    r.request_body,
                    r.response_body,
                )),
                _ => None,
            })
            .collect()
    }

    fn anomalies(f: &[Finding]) -> Vec<String> {
        f.iter()
            .filter_map(|f| match f {
                Finding::Anomaly { reason, .. } => Some(reason.clone()),
                _ => None,
            })
            .collect()
    }

    fn get(path: &str) -> Vec<u8> {
        format!("GET {path} HTTP/1.1\r\nHost: a.test\r\n\r\n").into_bytes()
    }

    fn ok(body: &str) -> Vec<u8> {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    #[test]
    fn pipelined_requests_are_matched_to_their_responses_in_order() {
        let reqs = [get("/a"), get("/b"), get("/c")].concat();
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4;ext=1\r\nwiki\r\n5\r\npedia\r\n0\r\nX-T: 1\r\n\r\n";
        let resps = [ok("hello"), chunked.to_vec(), ok("")].concat();
        for step in [1, 2, 7, 1000] {
            let f = talk(&[(C2S, &reqs), (S2C, &resps)], step);
            let host = Some("a.test".to_string());
            assert_eq!(
                requests(&f),
                vec![
                    (1, "GET".into(), host.clone(), "/a".into(), Some(200), 0, 5),
                    (2, "GET".into(), host.clone(), "/b".into(), Some(200), 0, 9),
                    (3, "GET".into(), host, "/c".into(), Some(200), 0, 0),
                ],
                "step {step}"
            );
            assert!(anomalies(&f).is_empty(), "{f:?}");
            match &f[0] {
                Finding::Http(r) => assert_eq!(r.content_type.as_deref(), Some("text/plain")),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn request_bodies_and_bodyless_responses_are_delimited() {
        let post = b"POST /up HTTP/1.1\r\nHost: a.test\r\nContent-Length: 10\r\n\r\n0123456789";
        let chunked_post =
            b"PUT /c HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
        let head = b"HEAD /h HTTP/1.1\r\nHost: a.test\r\n\r\n";
        let client = [&post[..], chunked_post, head, &get("/n")].concat();
        let server = [
            &b"HTTP/1.1 100 Continue\r\n\r\n"[..],
            b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok",
            b"HTTP/1.1 204 No Content\r\n\r\n",
            // HEAD: a length but no body.
            b"HTTP/1.1 200 OK\r\nContent-Length: 999\r\n\r\n",
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
        ]
        .concat();
        let f = talk(&[(C2S, &client), (S2C, &server)], 3);
        let got: Vec<_> = requests(&f)
            .into_iter()
            .map(|(s, m, _, _, st, q, r)| (s, m, st, q, r))
            .collect();
        assert_eq!(
            got,
            vec![
                (1, "POST".into(), Some(201), 10, 2),
                (2, "PUT".into(), Some(204), 3, 0),
                (3, "HEAD".into(), Some(200), 0, 0),
                (4, "GET".into(), Some(304), 0, 0),
            ]
        );
        assert!(anomalies(&f).is_empty(), "{f:?}");
    }

    #[test]
    fn a_body_until_close_ends_with_the_server_and_unanswered_requests_are_logged() {
        let f = talk(
            &[
                (C2S, &[get("/x"), get("/never")].concat()),
                (S2C, b"HTTP/1.0 200 OK\r\n\r\nsome bytes"),
            ],
            4,
        );
        let got: Vec<_> = requests(&f)
            .into_iter()
            .map(|(s, _, _, p, st, _, r)| (s, p, st, r))
            .collect();
        assert_eq!(
            got,
            vec![
                (1, "/x".into(), Some(200), 10),
                (2, "/never".into(), None, 0)
            ]
        );
    }

    #[test]
    fn an_upgrade_to_websocket_is_logged_and_then_left_alone() {
        let up = b"GET /ws HTTP/1.1\r\nHost: a.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
        let f = talk(
            &[
                (C2S, up),
                (
                    S2C,
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
                ),
                (S2C, b"\x81\x05hello not http"),
                (C2S, b"\x81\x85garbage that is not a request\r\n\r\n"),
            ],
            5,
        );
        assert_eq!(requests(&f).len(), 1);
        assert_eq!(requests(&f)[0].4, Some(101));
        assert!(anomalies(&f).is_empty(), "{f:?}");
    }

    #[test]
    fn hostile_streams_stop_the_parsing_with_a_reason() {
        let flood: Vec<u8> = std::iter::once(b"GET / HTTP/1.1\r\n".to_vec())
            .chain((0..8000).map(|i| format!("X-{i}: y\r\n").into_bytes()))
            .collect::<Vec<_>>()
            .concat();
        let many_fields: Vec<u8> = std::iter::once(b"GET / HTTP/1.1\r\n".to_vec())
            .chain((0..200).map(|i| format!("X-{i}: y\r\n").into_bytes()))
            .chain(std::iter::once(b"\r\n".to_vec()))
            .collect::<Vec<_>>()
            .concat();
        let pipeline_flood = get("/").repeat(MAX_PENDING + 1);
        let cases: Vec<(Talk, &str)> = vec![
            (vec![(C2S, flood)], "a head over 64 KiB"),
            (vec![(C2S, many_fields)], "malformed request head"),
            (vec![(C2S, pipeline_flood)], "more than 64 requests"),
            (
                vec![
                    (C2S, get("/")),
                    (
                        S2C,
                        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".to_vec(),
                    ),
                ],
                "a chunk size of \"zz\"",
            ),
            (
                vec![
                    (C2S, get("/")),
                    (
                        S2C,
                        [
                            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
                            &[b'1'; 2000],
                        ]
                        .concat(),
                    ),
                ],
                "chunk-size line over",
            ),
            (
                vec![(
                    C2S,
                    b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n".to_vec(),
                )],
                "two different Content-Lengths",
            ),
            (
                vec![(
                    C2S,
                    b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n".to_vec(),
                )],
                "a Content-Length of",
            ),
            (
                vec![(
                    C2S,
                    b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n".to_vec(),
                )],
                "not ending in chunked",
            ),
            (
                vec![(S2C, b"HTTP/1.1 200 OK\r\n\r\n".to_vec())],
                "no request asked for",
            ),
            (
                vec![(C2S, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec())],
                "HTTP/2 spoken without ALPN",
            ),
        ];
        for (parts, want) in cases {
            let parts: Vec<(Direction, &[u8])> = parts.iter().map(|(d, b)| (*d, &b[..])).collect();
            let f = talk(&parts, 997);
            let a = anomalies(&f);
            assert_eq!(a.len(), 1, "{want}: {f:?}");
            assert!(a[0].contains(want), "{want}: {a:?}");
        }
    }

    fn rules() -> Option<Arc<Vec<UrlRule>>> {
        let rule = |name: &str, hosts: &[&str], paths: &[&str], action| UrlRule {
            name: name.into(),
            hosts: hosts.iter().map(|h| h.parse().unwrap()).collect(),
            paths: paths.iter().map(|p| p.to_string()).collect(),
            categories: Vec::new(),
            category_hosts: Vec::new(),
            action,
        };
        Some(Arc::new(vec![
            rule("open-docs", &[], &["/secret/readme*"], UrlAction::Allow),
            rule("no-secrets", &["*.test"], &["/secret/*"], UrlAction::Block),
            rule("watch", &["a.test"], &[], UrlAction::Log),
        ]))
    }

    /// Runs `client` then `server` through an inspector with [`rules`].
    fn with_rules(client: &[u8], server: &[u8]) -> Report {
        let mut h = Http1::new(rules(), Some("sni.test".into()));
        let mut r = Report::default();
        let now = Instant::now();
        h.on_data(C2S, client, now, &mut r);
        if r.block.is_none() {
            h.on_data(S2C, server, now, &mut r);
        }
        h.on_end(S2C, now, &mut r);
        r
    }

    /// (path, status, URL rule, its action)
    type Ruled = (String, Option<u16>, Option<String>, Option<UrlAction>);

    fn ruled(r: &Report) -> Vec<Ruled> {
        r.findings
            .iter()
            .filter_map(|f| match f {
                Finding::Http(q) => {
                    Some((q.path.clone(), q.status, q.url_rule.clone(), q.url_action))
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_blocked_url_is_answered_with_a_403_naming_the_rule_and_never_sent() {
        let r = with_rules(&get("/secret/keys?x=1"), &ok("never"));
        let (why, answer) = r.block.clone().expect("blocked");
        assert!(
            why.contains("URL rule \"no-secrets\" blocks GET /secret/keys"),
            "{why}"
        );
        let page = String::from_utf8(answer.expect("a 403 page")).unwrap();
        assert!(page.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{page}");
        assert!(page.contains("<b>no-secrets</b>") && page.contains("Connection: close"));
        let body = page.split_once("\r\n\r\n").unwrap().1;
        assert!(page.contains(&format!("Content-Length: {}\r\n", body.len())));
        assert_eq!(
            ruled(&r),
            vec![(
                "/secret/keys?x=1".into(),
                Some(403),
                Some("no-secrets".into()),
                Some(UrlAction::Block)
            )]
        );
    }

    #[test]
    fn allow_and_log_rules_are_named_and_the_first_match_decides() {
        let client = [get("/secret/readme.txt"), get("/public")].concat();
        let server = [ok("a"), ok("b")].concat();
        let r = with_rules(&client, &server);
        assert!(r.block.is_none());
        assert_eq!(
            ruled(&r),
            vec![
                (
                    "/secret/readme.txt".into(),
                    Some(200),
                    Some("open-docs".into()),
                    Some(UrlAction::Allow)
                ),
                (
                    "/public".into(),
                    Some(200),
                    Some("watch".into()),
                    Some(UrlAction::Log)
                ),
            ]
        );
    }

    #[test]
    fn a_blocked_request_behind_unanswered_ones_resets_the_connection() {
        let client = [get("/first"), get("/secret/x")].concat();
        let r = with_rules(&client, b"");
        let (why, answer) = r.block.clone().expect("blocked");
        assert!(why.contains("no-secrets"), "{why}");
        assert!(answer.is_none(), "a 403 would answer /first");
        // Neither answered: the one before it never was, and it was not.
        assert_eq!(
            ruled(&r),
            vec![
                (
                    "/first".into(),
                    None,
                    Some("watch".into()),
                    Some(UrlAction::Log)
                ),
                (
                    "/secret/x".into(),
                    None,
                    Some("no-secrets".into()),
                    Some(UrlAction::Block)
                ),
            ]
        );
    }

    #[test]
    fn a_stream_the_parser_cannot_follow_is_reset_while_url_rules_block() {
        // Otherwise the requests after a malformed one would pass unmatched.
        let client = [
            &b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: gzip\r\n\r\n"[..],
            &get("/secret/x"),
        ]
        .concat();
        let r = with_rules(&client, b"");
        let (why, answer) = r.block.clone().expect("blocked");
        assert!(why.contains("URL rules cannot be enforced"), "{why}");
        assert_eq!(answer, None);
        // Without blocking rules the anomaly is only logged.
        let mut h = Http1::default();
        let mut r = Report::default();
        h.on_data(C2S, &client, Instant::now(), &mut r);
        assert!(r.block.is_none());
        assert_eq!(anomalies(&r.findings).len(), 1);
    }

    /// What an outside review found: ways out of the parser's sight, and
    /// framings other servers read differently, while rules may block.
    #[test]
    fn upgrades_tunnels_and_ambiguous_framing_are_refused_while_rules_block() {
        let cases: Vec<(&[u8], &str)> = vec![
            (
                b"GET / HTTP/1.1\r\nHost: a.test\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
                "an upgrade to \"h2c\"",
            ),
            (
                b"CONNECT b.test:443 HTTP/1.1\r\nHost: b.test:443\r\n\r\n",
                "a CONNECT tunnel",
            ),
            (
                b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\xc2\xa0\r\nContent-Length: 4\r\n\r\n",
                "a transfer coding",
            ),
            (
                b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n",
                "both Transfer-Encoding and Content-Length",
            ),
            (
                b"POST / HTTP/1.0\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n",
                "HTTP/1.0 request with Transfer-Encoding",
            ),
            (
                b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n2;\nXX\r\n0\r\n\r\n",
                "not ended by CRLF",
            ),
            (
                b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nXX\n0\r\n\r\n",
                "not followed by CRLF",
            ),
        ];
        for (client, want) in cases {
            let r = with_rules(client, b"");
            let (why, answer) = r
                .block
                .clone()
                .unwrap_or_else(|| panic!("{want}: not blocked"));
            assert!(why.contains(want), "{want}: {why}");
            assert_eq!(answer, None, "{want}");
        }
        // A WebSocket upgrade is still fine, and h2c is only logged (no
        // reset) where no rule blocks.
        let ws = b"GET /chat HTTP/1.1\r\nHost: a.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
        assert!(with_rules(ws, b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
            .block
            .is_none());
        let mut h = Http1::default();
        let mut r = Report::default();
        h.on_data(C2S, cases_h2c(), Instant::now(), &mut r);
        assert!(
            r.block.is_none() && anomalies(&r.findings).is_empty(),
            "{r:?}"
        );
    }

    fn cases_h2c() -> &'static [u8] {
        b"GET / HTTP/1.1\r\nHost: a.test\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n"
    }

    #[test]
    fn a_response_whose_codings_do_not_end_in_chunked_runs_until_the_close() {
        let f = talk(
            &[
                (C2S, &get("/")),
                (
                    S2C,
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 2\r\n\r\nabcdef",
                ),
            ],
            7,
        );
        assert!(anomalies(&f).is_empty(), "{f:?}");
        assert_eq!(requests(&f)[0].6, 6);
    }

    #[test]
    fn an_empty_host_or_a_host_unlike_the_server_name_cannot_dodge_a_block() {
        // An empty Host is no host: the server name (sni.test) decides.
        let r = with_rules(b"GET /secret/x HTTP/1.1\r\nHost: \r\n\r\n", b"");
        assert!(r.block.is_some(), "{:?}", r.findings);
        // A Host no rule names, on a connection to a blocked server name.
        let r = with_rules(b"GET /secret/x HTTP/1.1\r\nHost: x.invalid\r\n\r\n", b"");
        assert!(r.block.is_some(), "{:?}", r.findings);
        // An allowed host keeps its other paths.
        let r = with_rules(&get("/public"), &ok("x"));
        assert!(r.block.is_none());
    }

    #[test]
    fn a_request_without_a_host_is_matched_with_the_server_name() {
        let r = with_rules(b"GET /secret/x HTTP/1.0\r\n\r\n", b"");
        assert!(r.block.is_some(), "{:?}", r.findings);
    }

    #[test]
    fn the_authority_of_an_absolute_target_wins_and_two_hosts_are_refused() {
        let r = with_rules(
            b"GET https://b.test/secret/x HTTP/1.1\r\nHost: other.example\r\n\r\n",
            b"",
        );
        assert!(r.block.is_some(), "{:?}", r.findings);
        let r = with_rules(
            b"GET /secret/x HTTP/1.1\r\nHost: other.example\r\nHost: b.test\r\n\r\n",
            b"",
        );
        let (why, _) = r.block.clone().expect("blocked");
        assert!(why.contains("more than one Host"), "{why}");
    }

    #[test]
    fn other_spellings_of_a_blocked_path_are_blocked() {
        for target in ["/%73ecret/x", "/SECRET/x", "//secret/x", "/a/../secret/x"] {
            let req = format!("GET {target} HTTP/1.1\r\nHost: a.test\r\n\r\n");
            let r = with_rules(req.as_bytes(), b"");
            assert!(r.block.is_some(), "{target}: {:?}", r.findings);
        }
    }

    #[test]
    fn rule_names_cannot_break_the_page() {
        let page = String::from_utf8(block_page("<x>&\"\r\nSet-Cookie: y")).unwrap();
        assert!(page.contains("<b>&lt;x&gt;&amp;&quot;"), "{page}");
        assert!(!page.contains("\r\nSet-Cookie"), "{page}");
    }

    #[test]
    fn long_fields_are_cut() {
        let path = format!("/{}", "p".repeat(5000));
        let f = talk(&[(C2S, &get(&path)), (S2C, &ok("x"))], 100);
        assert_eq!(requests(&f)[0].3.len(), MAX_FIELD);
    }

    proptest! {
        /// Any bytes, cut anywhere, both ways: no panic, memory bounded,
        /// every request logged once.
        #[test]
        fn arbitrary_streams_are_bounded(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
            fuzz(&data);
        }

        /// The same, from parts that are mostly HTTP.
        #[test]
        fn mostly_http_streams_are_bounded(
            parts in proptest::collection::vec((any::<bool>(), 0usize..8, 1usize..40), 0..40),
        ) {
            let pieces: [&[u8]; 8] = [
                b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                b"5\r\nhello\r\n0\r\n\r\n",
                b"POST /p HTTP/1.1\r\nContent-Length: 4\r\n\r\nbody",
                b"HTTP/1.1 100 Continue\r\n\r\n",
                b"\r\n",
                b"HTTP/1.0 204 No Content\r\n\r\n",
            ];
            let mut data = Vec::new();
            for (server, which, len) in parts {
                let bytes = pieces[which];
                let mut at = 0;
                while at < bytes.len() {
                    let n = len.min(bytes.len() - at).min(127);
                    data.push((n as u8) << 1 | u8::from(server));
                    data.extend_from_slice(&bytes[at..at + n]);
                    at += n;
                }
            }
            fuzz(&data);
        }

        /// A well-formed exchange parses the same however it is cut.
        #[test]
        fn cuts_never_change_the_records(step in 1usize..80, n in 1usize..6) {
            let reqs: Vec<u8> = (0..n).flat_map(|i| get(&format!("/{i}"))).collect();
            let resps: Vec<u8> = (0..n).flat_map(|i| ok(&"b".repeat(i * 7))).collect();
            let whole = talk(&[(C2S, &reqs), (S2C, &resps)], usize::MAX);
            let cut = talk(&[(C2S, &reqs), (S2C, &resps)], step);
            prop_assert_eq!(requests(&whole), requests(&cut));
            prop_assert_eq!(requests(&whole).len(), n);
        }
    }
}
