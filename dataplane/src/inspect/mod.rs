//! Plaintext inspection: the seam every decrypted byte passes through, in
//! both directions, between the two TLS legs and before re-encryption.
//! Inspectors see byte streams in order (never records, segments or
//! packets); they may look, count, report [`Finding`]s and block the
//! connection, and they run on the packet worker, so they must be quick
//! and bounded in memory.
//!
//! - [`http1`]: HTTP/1.1 requests and responses, one finding per request.
//! - [`http2`]: HTTP/2 frames and HPACK, one finding per stream.
//! - [`signature`]: byte patterns matched across any boundary.
//!
//! A profile's [`Inspection`] says which inspectors a decrypted
//! connection gets; the TLS stage feeds its [`Pipeline`] and the session
//! turns the findings into flow-log records.

use std::{net::SocketAddr, sync::Arc, time::Instant};

pub mod http1;
pub mod http2;
pub mod signature;

use self::signature::{Scanner, SignatureAction, SignatureSet};
use crate::{
    export::{Exporter, Sinks},
    policy::{UrlAction, UrlRule},
};

/// Which way plaintext flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From the client toward the server.
    ClientToServer,
    /// From the server toward the client.
    ServerToClient,
}

impl Direction {
    /// `c2s` or `s2c`, as the log writes it.
    pub fn label(self) -> &'static str {
        match self {
            Direction::ClientToServer => "c2s",
            Direction::ServerToClient => "s2c",
        }
    }
}

/// One HTTP request and what answered it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpRequest {
    /// 1 for the connection's first request.
    pub seq: u64,
    pub method: String,
    /// The Host header (or the authority of an absolute target).
    pub host: Option<String>,
    /// The request target as sent (at most [`http1::MAX_FIELD`] bytes).
    pub path: String,
    /// None: no response came before the connection ended.
    pub status: Option<u16>,
    pub content_type: Option<String>,
    /// Body bytes (after de-chunking) each way.
    pub request_body: u64,
    pub response_body: u64,
    /// From the request's head to the end of its response.
    pub duration_ms: u64,
    /// The URL rule that matched it, and what it did.
    pub url_rule: Option<String>,
    pub url_action: Option<UrlAction>,
}

impl HttpRequest {
    /// The record at its end: how long it took since `started`.
    pub fn finished(self, started: Instant, now: Instant) -> HttpRequest {
        HttpRequest {
            duration_ms: now.saturating_duration_since(started).as_millis() as u64,
            ..self
        }
    }
}

/// A signature matched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignatureHit {
    pub name: Arc<str>,
    pub action: SignatureAction,
    pub dir: Direction,
    /// Where the match starts in that direction's plaintext stream.
    pub offset: u64,
}

/// What an inspector reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finding {
    Http(HttpRequest),
    Signature(SignatureHit),
    /// The stream is not what its protocol says (malformed, over a bound):
    /// the inspector stopped looking at the connection, and why.
    Anomaly {
        dir: Direction,
        reason: String,
    },
}

/// What the inspectors said of one connection so far.
#[derive(Debug, Default)]
pub struct Report {
    findings: Vec<Finding>,
    /// The connection must end: why (the first reason given), and what
    /// the client is answered (else both sides are reset).
    block: Option<(String, Option<Vec<u8>>)>,
    /// Requests refused on their own since the last look.
    refused: u64,
}

impl Report {
    pub fn add(&mut self, f: Finding) {
        self.findings.push(f);
    }

    /// Both sides are reset.
    pub fn block(&mut self, why: String) {
        self.block.get_or_insert((why, None));
    }

    /// The client gets `answer` (plaintext), then the end of the stream;
    /// the server is reset.
    pub fn block_with(&mut self, why: String, answer: Vec<u8>) {
        self.block.get_or_insert((why, Some(answer)));
    }

    /// One request was refused on its own (an HTTP/2 stream), and the
    /// connection goes on.
    pub fn refused_stream(&mut self) {
        self.refused += 1;
    }
}

/// Looks at one connection's plaintext.
pub trait Inspector: Send {
    /// The next bytes of one direction's stream, in order.
    fn on_data(&mut self, dir: Direction, data: &[u8], now: Instant, report: &mut Report);
    /// That direction's stream ended (close_notify or end of TCP stream).
    fn on_end(&mut self, _dir: Direction, _now: Instant, _report: &mut Report) {}
}

/// The inspectors of one connection, and its plaintext byte counters.
///
/// Inspectors only look. When single HTTP/2 streams may have to be
/// refused, the pipeline also has a rewriter ([`http2::Http2::enforcing`]):
/// then what is passed on each way is what [`Pipeline::rewrite`] leaves in
/// [`Pipeline::output`], not the bytes read.
#[derive(Default)]
pub struct Pipeline {
    inspectors: Vec<Box<dyn Inspector>>,
    rewriter: Option<Box<http2::Http2>>,
    /// Plaintext bytes seen client → server and server → client.
    pub bytes: [u64; 2],
    report: Report,
}

impl Pipeline {
    pub fn new(inspectors: Vec<Box<dyn Inspector>>) -> Pipeline {
        Pipeline {
            inspectors,
            ..Pipeline::default()
        }
    }

    /// Hands `data` to every inspector (nothing more once blocked).
    pub fn data(&mut self, dir: Direction, data: &[u8], now: Instant) {
        self.bytes[dir as usize] += data.len() as u64;
        if self.report.block.is_some() {
            return;
        }
        for i in &mut self.inspectors {
            i.on_data(dir, data, now, &mut self.report);
        }
    }

    pub fn end(&mut self, dir: Direction, now: Instant) {
        for i in &mut self.inspectors {
            i.on_end(dir, now, &mut self.report);
        }
        if let Some(r) = self.rewriter.as_mut() {
            r.on_end(dir, now, &mut self.report);
        }
    }

    /// Whether what is passed on is rewritten (else: the bytes read).
    pub fn rewrites(&self) -> bool {
        self.rewriter.is_some()
    }

    /// Gives the rewriter the start of `dir`'s unconsumed stream (the
    /// inspectors have seen it): how much of it was taken. Nothing is
    /// taken once the connection is blocked.
    pub fn rewrite(&mut self, dir: Direction, data: &[u8], now: Instant) -> usize {
        match self.rewriter.as_mut() {
            Some(r) if self.report.block.is_none() => r.rewrite(dir, data, now, &mut self.report),
            Some(_) => 0,
            None => data.len(),
        }
    }

    /// What the rewriter has to pass on in direction `dir` (None: no
    /// rewriter).
    pub fn output(&mut self, dir: Direction) -> Option<&mut Vec<u8>> {
        self.rewriter.as_mut().and_then(|r| r.output(dir))
    }

    /// Requests refused on their own since the last call.
    pub fn take_refused(&mut self) -> u64 {
        std::mem::take(&mut self.report.refused)
    }

    /// Why the connection must end, once an inspector said so: the bytes
    /// just handed over must not be passed on.
    pub fn blocked(&self) -> Option<&str> {
        self.report.block.as_ref().map(|(why, _)| why.as_str())
    }

    /// What the client is answered when blocked (none: a reset).
    pub fn answer(&self) -> Option<&[u8]> {
        self.report.block.as_ref().and_then(|(_, a)| a.as_deref())
    }

    /// The findings since the last call.
    pub fn take_findings(&mut self) -> Vec<Finding> {
        std::mem::take(&mut self.report.findings)
    }
}

/// Whether one of `rules` blocks.
pub fn any_blocks(rules: &[UrlRule]) -> bool {
    rules.iter().any(|r| r.action == UrlAction::Block)
}

/// Splits fuzz input into chunks for the inspectors' fuzz targets: each
/// part is a byte whose low bit gives the direction (1: server to client)
/// and whose other bits a length, then that many bytes.
pub fn fuzz_chunks(data: &[u8], mut chunk: impl FnMut(Direction, &[u8])) {
    let mut rest = data;
    while let [head, tail @ ..] = rest {
        let dir = match head & 1 {
            0 => Direction::ClientToServer,
            _ => Direction::ServerToClient,
        };
        let n = usize::from(head >> 1).min(tail.len());
        chunk(dir, &tail[..n]);
        rest = &tail[n..];
    }
}

/// Which inspectors a profile's decrypted connections get.
#[derive(Clone, Debug, Default)]
pub struct Inspection {
    /// HTTP/1.1 and HTTP/2 request records.
    pub http: bool,
    /// The profile's signatures (none: no scanning).
    pub signatures: Option<Arc<SignatureSet>>,
    /// The policy's URL rules (for HTTP requests).
    pub url_rules: Option<Arc<Vec<UrlRule>>>,
    /// Where the plaintext is copied (none: nowhere).
    pub export: Option<(Arc<Exporter>, Sinks)>,
}

impl Inspection {
    /// Whether requests are matched against URL rules that may block:
    /// then a connection must speak a protocol the inspectors follow.
    pub fn enforces_urls(&self) -> bool {
        self.http && self.url_rules.as_deref().is_some_and(|r| any_blocks(r))
    }

    /// Whether an inspector may block one of its connections (a URL rule
    /// or a signature that blocks): then leaving a connection undecrypted
    /// would let it past them.
    pub fn can_block(&self) -> bool {
        self.enforces_urls() || self.signatures.as_ref().is_some_and(|s| s.blocks())
    }

    /// A connection's pipeline; `alpn` is the protocol the two legs
    /// agreed (HTTP/1.1 is not looked for in another protocol), `sni` the
    /// name the client asked for (URL rules take it for a request without
    /// a host), `ends` the client's and the server's addresses.
    pub fn pipeline(
        &self,
        alpn: Option<&[u8]>,
        sni: Option<&str>,
        ends: (SocketAddr, SocketAddr),
    ) -> Pipeline {
        let mut inspectors: Vec<Box<dyn Inspector>> = Vec::new();
        // First, so that it copies what the engine decrypted even when a
        // later inspector blocks on it.
        if let Some((exp, sinks)) = self.export.as_ref().filter(|(_, s)| s.plaintext()) {
            inspectors.push(Box::new(exp.tap(*sinks, ends.0, ends.1)));
        }
        if self.http && matches!(alpn, None | Some(b"http/1.1" | b"http/1.0")) {
            inspectors.push(Box::new(http1::Http1::new(
                self.url_rules.clone(),
                sni.map(Into::into),
            )));
        }
        let mut rewriter = None;
        if self.http && alpn == Some(b"h2") {
            let (rules, sni) = (self.url_rules.clone(), sni.map(Into::into));
            if self.enforces_urls() {
                rewriter = Some(Box::new(http2::Http2::enforcing(rules, sni)));
            } else {
                inspectors.push(Box::new(http2::Http2::new(rules, sni)));
            }
        }
        if let Some(set) = &self.signatures {
            inspectors.push(Box::new(Scanner::new(set.clone())));
        }
        Pipeline {
            rewriter,
            ..Pipeline::new(inspectors)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    type Seen = Arc<Mutex<Vec<(Direction, Vec<u8>)>>>;

    struct Recorder(Seen);

    impl Inspector for Recorder {
        fn on_data(&mut self, dir: Direction, data: &[u8], _: Instant, report: &mut Report) {
            self.0.lock().unwrap().push((dir, data.to_vec()));
            if data == b"stop" {
                report.block("told to".into());
            }
        }
    }

    #[test]
    fn every_inspector_sees_the_bytes_in_order_and_they_are_counted() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut p = Pipeline::new(vec![Box::new(Recorder(seen.clone()))]);
        let now = Instant::now();
        p.data(Direction::ClientToServer, b"GET / ", now);
        p.data(Direction::ServerToClient, b"HTTP/1.1 200", now);
        p.data(Direction::ClientToServer, b"HTTP/1.1", now);
        assert_eq!(p.bytes, [14, 12]);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 3);
        assert_eq!(seen[2], (Direction::ClientToServer, b"HTTP/1.1".to_vec()));
    }

    #[test]
    fn once_blocked_the_inspectors_see_nothing_more() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut p = Pipeline::new(vec![Box::new(Recorder(seen.clone()))]);
        let now = Instant::now();
        assert_eq!(p.blocked(), None);
        p.data(Direction::ServerToClient, b"stop", now);
        p.data(Direction::ServerToClient, b"more", now);
        assert_eq!(p.blocked(), Some("told to"));
        assert_eq!(seen.lock().unwrap().len(), 1);
    }

    #[test]
    fn each_http_version_is_looked_for_only_under_its_protocol() {
        let i = Inspection {
            http: true,
            ..Inspection::default()
        };
        let ends = (
            "198.18.0.1:1".parse().unwrap(),
            "198.18.0.2:443".parse().unwrap(),
        );
        assert_eq!(i.pipeline(None, None, ends).inspectors.len(), 1);
        assert_eq!(
            i.pipeline(Some(b"http/1.1"), None, ends).inspectors.len(),
            1
        );
        assert_eq!(i.pipeline(Some(b"h2"), None, ends).inspectors.len(), 1);
        assert_eq!(i.pipeline(Some(b"spdy/3"), None, ends).inspectors.len(), 0);
    }
}
