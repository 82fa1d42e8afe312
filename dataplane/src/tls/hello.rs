//! The decision point of a connection: its first client bytes, read until
//! they make a complete TLS ClientHello or cannot be one.
//!
//! The decision reads the ClientHello with this module's own parser: it
//! runs on every steered connection's first flight, and rustls's
//! (`Acceptor`) costs ten times as much on a worker whose caches went cold
//! while it slept (about 40 µs against 4 µs per hello, measured), which
//! the client waits out. The parser is strict where the server name is
//! concerned: record and message lengths must agree to the byte, an
//! extension may appear once, and the server_name extension is read as
//! rustls reads it (a second host name, an unknown name type, a name that
//! is not a DNS name, or an empty list make the hello malformed; an IP
//! address is no name). A hello that is decrypted is parsed by rustls as
//! well ([`HelloScanner::accept`]), and must give it the same name.
//! Nothing here acknowledges or answers anything; bytes are only looked at.

use rustls::{
    pki_types::ServerName,
    server::{Accepted, Acceptor},
};

/// TLS record content type of a handshake record (RFC 8446 section 5.1).
const HANDSHAKE_RECORD: u8 = 22;
/// The largest plaintext record (RFC 8446 §5.1: 2^14 bytes).
const MAX_RECORD: usize = 1 << 14;
/// The largest handshake message rustls takes (its deframer's bound).
const MAX_HANDSHAKE: usize = 0xffff;
/// handshake type client_hello (RFC 8446 §4).
const CLIENT_HELLO: u8 = 1;

/// What a connection showed by its decision point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Opening {
    /// The client's first bytes were a complete TLS ClientHello.
    Tls(ClientHello),
    /// The client's first bytes were something else (or it closed first).
    Other,
    /// The server sent data before the client did.
    ServerFirst,
}

impl Opening {
    /// The server name the client asked for, if it sent one.
    pub fn sni(&self) -> Option<&str> {
        match self {
            Opening::Tls(ClientHello { sni: Some(s), .. }) => Some(s),
            _ => None,
        }
    }
}

/// What the first client bytes turned out to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hello {
    /// A complete ClientHello.
    Tls(ClientHello),
    /// Not a TLS handshake: the first byte is not a handshake record's.
    NotTls,
    /// A TLS handshake record whose ClientHello does not parse (a bad
    /// length, a repeated extension, a malformed server name). Its server
    /// name cannot be trusted, so it is decided without one; relaying it
    /// as other bytes would let a client get past a name-based block by
    /// malforming its hello on purpose.
    Malformed,
}

/// What a ClientHello tells the policy and the TLS stage.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientHello {
    /// The server name (SNI), when the client sent a valid DNS name
    /// (lower-cased, as rustls gives it).
    pub sni: Option<String>,
    /// ALPN protocols offered, in the client's order.
    pub alpn: Vec<Vec<u8>>,
    /// Protocol versions offered (supported_versions, or the legacy
    /// version field without it), as wire values (0x0303 = TLS 1.2).
    pub versions: Vec<u16>,
    /// Cipher suites offered, as wire values.
    pub suites: Vec<u16>,
    /// Signature schemes offered, as wire values.
    pub sig_schemes: Vec<u16>,
    /// Key exchange groups offered (supported_groups), as wire values.
    pub groups: Vec<u16>,
    /// The client sent encrypted_client_hello (ECH): the real server name
    /// is hidden in it.
    pub ech: bool,
}

/// TLS versions on the wire (RFC 8446 §4.2.1).
pub const TLS12: u16 = 0x0303;
pub const TLS13: u16 = 0x0304;

/// The encrypted_client_hello extension's code point
/// (draft-ietf-tls-esni, as browsers send it).
const EXT_ECH: u16 = 0xfe0d;
const EXT_SUPPORTED_VERSIONS: u16 = 43;
const EXT_SERVER_NAME: u16 = 0;
const EXT_SUPPORTED_GROUPS: u16 = 10;
const EXT_SIGNATURE_ALGORITHMS: u16 = 13;
const EXT_ALPN: u16 = 16;

/// Reads a client's first bytes, as they arrive in order.
#[derive(Default)]
pub struct HelloScanner {
    seen: usize,
    /// The bytes fed so far (bounded by the hold), for rustls to parse
    /// again if the connection is decrypted.
    raw: Vec<u8>,
    /// Where the next record starts in `raw`.
    next_record: usize,
    /// The handshake bytes of the records read so far.
    message: Vec<u8>,
    /// The outcome, once there is one.
    done: bool,
    /// The name the decision used, for rustls's to be checked against.
    sni: Option<String>,
    /// What was wrong with the ClientHello's server name, once complete.
    sni_malformed: Option<&'static str>,
}

impl HelloScanner {
    /// Bytes looked at so far.
    pub fn seen(&self) -> usize {
        self.seen
    }

    /// The next in-order bytes of the client's stream; `None` while the
    /// ClientHello is incomplete (and after the outcome was given).
    pub fn feed(&mut self, bytes: &[u8]) -> Option<Hello> {
        if self.done {
            self.seen += bytes.len();
            return None;
        }
        if self.seen == 0 && !bytes.is_empty() && bytes[0] != HANDSHAKE_RECORD {
            self.done = true;
            return Some(Hello::NotTls);
        }
        self.seen += bytes.len();
        self.raw.extend_from_slice(bytes);
        let outcome = self.scan()?;
        self.done = true;
        if outcome != Hello::Malformed {
            // Only a complete hello is kept for rustls.
            return Some(outcome);
        }
        self.raw = Vec::new();
        Some(Hello::Malformed)
    }

    /// Reads the complete records so far; an outcome once the ClientHello
    /// is complete or cannot be one.
    fn scan(&mut self) -> Option<Hello> {
        while let Some(header) = self.raw.get(self.next_record..self.next_record + 5) {
            // A record of another type before the hello is complete, one
            // whose version is not 3.x, an oversized or an empty handshake
            // record: malformed (decided without a name, failing closed).
            let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
            if header[0] != HANDSHAKE_RECORD || header[1] != 3 || len > MAX_RECORD || len == 0 {
                return Some(Hello::Malformed);
            }
            let start = self.next_record + 5;
            let body = self.raw.get(start..start + len)?;
            self.message.extend_from_slice(body);
            self.next_record = start + len;
            if let Some(h) = self.message_outcome() {
                return Some(h);
            }
        }
        None
    }

    /// The handshake message's outcome, if it is complete or wrong.
    fn message_outcome(&mut self) -> Option<Hello> {
        let m = &self.message;
        if m.len() < 4 {
            return None;
        }
        let len = usize::from(m[1]) << 16 | usize::from(m[2]) << 8 | usize::from(m[3]);
        if m[0] != CLIENT_HELLO || len > MAX_HANDSHAKE {
            return Some(Hello::Malformed);
        }
        let body = m.get(4..4 + len)?;
        Some(match parse_client_hello(body) {
            Ok(Parsed { hello, sni_fault }) => {
                self.sni_malformed = sni_fault;
                self.sni = hello.sni.clone();
                Hello::Tls(hello)
            }
            Err(sni_fault) => {
                self.sni_malformed = sni_fault;
                Hello::Malformed
            }
        })
    }

    /// What was wrong with the complete ClientHello's server name (two
    /// names, a NUL or non-ASCII byte, a repeated extension, not a DNS
    /// name), if anything: the connection is decided without the name,
    /// and its record says so.
    pub fn sni_malformed(&self) -> Option<&'static str> {
        self.sni_malformed
    }

    /// Marks the complete ClientHello malformed after all (`why`: what the
    /// TLS library found), so its record says why its name was not used.
    pub fn set_malformed(&mut self, why: &'static str) {
        self.sni.take();
        self.sni_malformed.get_or_insert(why);
    }

    /// rustls's own parse of the complete ClientHello, for a connection
    /// that is decrypted to continue from (once), and how many of the
    /// client's bytes it read (the TLS stage skips those in the stream;
    /// what it did not read stays there). Refused when rustls refuses the
    /// hello, or reads another server name from it than the decision did:
    /// the decision must be on what the TLS stage reads.
    pub fn accept(&mut self) -> Result<(Box<Accepted>, usize), &'static str> {
        if !self.done || self.raw.is_empty() {
            return Err("no complete ClientHello was kept");
        }
        let raw = std::mem::take(&mut self.raw);
        let (accepted, read) = rustls_accept(&raw).ok_or(TLS_REFUSED)?;
        if accepted.client_hello().server_name() != self.sni.as_deref() {
            return Err("the TLS library reads another server name in the ClientHello");
        }
        Ok((Box::new(accepted), read))
    }
}

/// Why a hello the decision took is not decrypted after all.
pub const TLS_REFUSED: &str = "the TLS library refuses the ClientHello";

/// rustls's parse of a client's first bytes, if it takes them as a
/// ClientHello, and how many of the bytes it read. Its buffer takes a
/// record or so at a time: each read is followed by an attempt, as bytes
/// arriving from the network would be.
pub(crate) fn rustls_accept(bytes: &[u8]) -> Option<(Accepted, usize)> {
    let mut acceptor = Acceptor::default();
    let mut rest = bytes;
    loop {
        if !rest.is_empty() && acceptor.read_tls(&mut rest).ok()? == 0 {
            return None;
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => return Some((accepted, bytes.len() - rest.len())),
            Ok(None) if !rest.is_empty() => {}
            Ok(None) | Err(_) => return None,
        }
    }
}

/// A complete ClientHello, and what was wrong with a server name that
/// was left out.
struct Parsed {
    hello: ClientHello,
    sni_fault: Option<&'static str>,
}

/// RFC 8446 §4.1.2: a ClientHello's body. `Err` is a malformed hello,
/// with the server name's fault when that was it.
fn parse_client_hello(body: &[u8]) -> Result<Parsed, Option<&'static str>> {
    let mut r = Reader(body);
    let legacy_version = r.u16().ok_or(None)?;
    r.take(32).ok_or(None)?; // random
    let sid = usize::from(r.u8().ok_or(None)?);
    if sid > 32 {
        return Err(None);
    }
    r.take(sid).ok_or(None)?;
    let suites = r.vec16().ok_or(None)?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(None);
    }
    let comp = usize::from(r.u8().ok_or(None)?);
    if comp == 0 {
        return Err(None);
    }
    r.take(comp).ok_or(None)?;
    let mut hello = ClientHello {
        versions: vec![legacy_version],
        suites: u16s(suites),
        ..ClientHello::default()
    };
    let mut names = Names::default();
    if !r.0.is_empty() {
        let mut exts = Reader(r.vec16().ok_or(None)?);
        if !r.0.is_empty() {
            return Err(None);
        }
        // Extension types seen, one bit each (8 KiB: a hello of thousands
        // of extensions costs linear time, not quadratic).
        let mut seen = [0u64; 1024];
        let mut any_repeated = false;
        while !exts.0.is_empty() {
            let typ = exts.u16().ok_or(None)?;
            let data = exts.vec16().ok_or(None)?;
            let (word, bit) = (usize::from(typ >> 6), 1u64 << (typ & 63));
            let repeated = seen[word] & bit != 0;
            seen[word] |= bit;
            if repeated {
                // RFC 8446 §4.2: each extension once; rustls refuses the
                // hello. Its content is not read again.
                any_repeated = true;
                names.extensions += usize::from(typ == EXT_SERVER_NAME);
                continue;
            }
            match typ {
                EXT_SERVER_NAME => {
                    names.extensions += 1;
                    names.read(data);
                }
                EXT_ECH => hello.ech = true,
                EXT_SUPPORTED_VERSIONS => {
                    let mut v = Reader(data);
                    let list = v.vec8().ok_or(None)?;
                    if !v.0.is_empty() || list.is_empty() || list.len() % 2 != 0 {
                        return Err(None);
                    }
                    hello.versions = u16s(list);
                }
                EXT_SIGNATURE_ALGORITHMS => hello.sig_schemes = u16_list(data).ok_or(None)?,
                EXT_SUPPORTED_GROUPS => hello.groups = u16_list(data).ok_or(None)?,
                EXT_ALPN => hello.alpn = protocol_names(data).ok_or(None)?,
                _ => {}
            }
        }
        if any_repeated {
            return Err(if names.extensions > 1 {
                Some("the server_name extension appears more than once")
            } else if names.extensions > 0 {
                Some("a repeated extension beside the server name")
            } else {
                None
            });
        }
    }
    match names.outcome() {
        NameOutcome::None => Ok(Parsed {
            hello,
            sni_fault: None,
        }),
        NameOutcome::Name(n) => Ok(Parsed {
            hello: ClientHello {
                sni: Some(n),
                ..hello
            },
            sni_fault: None,
        }),
        // An address is no name; rustls takes the hello without one.
        NameOutcome::Address => Ok(Parsed {
            hello,
            sni_fault: Some("not a DNS host name"),
        }),
        NameOutcome::Fault(why) => Err(Some(why)),
    }
}

/// A u16-prefixed list of u16 values, not empty, filling its extension.
fn u16_list(data: &[u8]) -> Option<Vec<u16>> {
    let mut r = Reader(data);
    let list = r.vec16()?;
    (r.0.is_empty() && !list.is_empty() && list.len() % 2 == 0).then(|| u16s(list))
}

fn u16s(list: &[u8]) -> Vec<u16> {
    list.chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect()
}

/// RFC 7301 §3.1: a list of non-empty protocol names, not empty.
fn protocol_names(data: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut r = Reader(data);
    let mut list = Reader(r.vec16()?);
    if !r.0.is_empty() || list.0.is_empty() {
        return None;
    }
    let mut out = Vec::new();
    while !list.0.is_empty() {
        let name = list.vec8()?;
        if name.is_empty() {
            return None;
        }
        out.push(name.to_vec());
    }
    Some(out)
}

/// What the server_name extension held (RFC 6066 §3), read as rustls
/// reads it.
#[derive(Default)]
struct Names<'a> {
    extensions: usize,
    /// The host name, once one was read.
    name: Option<&'a [u8]>,
    /// The first fault (layout, a second name, a name that is no DNS name).
    fault: Option<&'static str>,
}

enum NameOutcome {
    None,
    Name(String),
    Address,
    Fault(&'static str),
}

impl<'a> Names<'a> {
    fn read(&mut self, data: &'a [u8]) {
        let mut r = Reader(data);
        let Some(list) = r.vec16() else {
            self.fault("a server_name extension cut short");
            return;
        };
        if !r.0.is_empty() {
            self.fault("bytes after the server name list");
        }
        if list.is_empty() {
            self.fault("an empty server name list");
        }
        let mut list = Reader(list);
        while let Some(kind) = list.u8() {
            if kind != 0 {
                // Its layout is unknown: rustls stops reading here.
                self.fault("a server name of unknown type");
                return;
            }
            let Some(name) = list.vec16() else {
                self.fault("a server name longer than its extension");
                return;
            };
            if self.name.is_some() {
                self.fault("more than one host name");
            }
            self.name = Some(name);
        }
    }

    fn fault(&mut self, why: &'static str) {
        self.fault.get_or_insert(why);
    }

    fn outcome(self) -> NameOutcome {
        if self.extensions == 0 {
            return NameOutcome::None;
        }
        if let Some(why) = self.fault {
            return NameOutcome::Fault(why);
        }
        let Some(name) = self.name else {
            return NameOutcome::Fault("an empty server name list");
        };
        if name.contains(&0) {
            return NameOutcome::Fault("a NUL byte in the host name");
        }
        if name.iter().any(|b| *b > 0x7f) {
            return NameOutcome::Fault("bytes above 0x7f in the host name");
        }
        if let Some(why) = host_name_fault(name) {
            return NameOutcome::Fault(why);
        }
        match ServerName::try_from(name) {
            Ok(ServerName::DnsName(d)) => NameOutcome::Name(d.as_ref().to_ascii_lowercase()),
            Ok(ServerName::IpAddress(_)) => NameOutcome::Address,
            _ => NameOutcome::Fault("not a DNS host name"),
        }
    }
}

/// What keeps `name` from being a DNS host name (RFC 6066 §3: "the
/// fully qualified DNS hostname"; RFC 1035 §2.3.4 sizes), if anything.
/// NUL and non-ASCII bytes have reasons of their own. Underscores are
/// taken: real names carry them.
fn host_name_fault(name: &[u8]) -> Option<&'static str> {
    let name = name.strip_suffix(b".").unwrap_or(name);
    if name.is_empty() {
        return Some("an empty host name");
    }
    if name.len() > 253 {
        return Some("a host name longer than 253 bytes");
    }
    for label in name.split(|b| *b == b'.') {
        if label.is_empty() {
            return Some("an empty label in the host name");
        }
        if label.len() > 63 {
            return Some("a label longer than 63 bytes in the host name");
        }
        if !label
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
        {
            return Some("not a DNS host name");
        }
    }
    None
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    /// A u8-length-prefixed vector.
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = usize::from(self.u8()?);
        self.take(n)
    }
    /// A u16-length-prefixed vector.
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = usize::from(self.u16()?);
        self.take(n)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A real ClientHello from rustls for `sni`, offering `alpn`.
    pub(crate) fn client_hello(sni: &str, alpn: &[&[u8]]) -> Vec<u8> {
        use std::sync::Arc;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        let name = sni.to_owned().try_into().expect("dns name");
        let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name).expect("client");
        let mut out = Vec::new();
        conn.write_tls(&mut out).expect("hello");
        out
    }

    #[test]
    fn a_hello_in_any_split_gives_its_sni_and_alpn() {
        let hello = client_hello("shop.example.com", &[b"h2", b"http/1.1"]);
        for cut in [1, 5, 6, 100, hello.len() - 1] {
            let mut s = HelloScanner::default();
            assert_eq!(s.feed(&hello[..cut]), None, "cut at {cut}");
            let Some(Hello::Tls(got)) = s.feed(&hello[cut..]) else {
                panic!("a complete ClientHello at cut {cut}");
            };
            assert_eq!(got.sni.as_deref(), Some("shop.example.com"));
            assert_eq!(got.alpn, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
            // rustls offers TLS 1.3 and 1.2, and the post-quantum hybrid
            // group first.
            assert_eq!(got.versions, vec![TLS13, TLS12]);
            assert_eq!(got.groups.first(), Some(&0x11ec), "{:?}", got.groups);
            assert!(!got.ech);
            assert!(s.accept().is_ok() && s.accept().is_err());
        }
    }

    /// `hello` (one record) with one more extension appended.
    pub(crate) fn with_extension(hello: &[u8], typ: u16, data: &[u8]) -> Vec<u8> {
        let mut out = hello.to_vec();
        let add = 4 + data.len();
        // Record length, handshake length, extensions length (the last
        // field before the extensions, found by walking the body).
        let rec = u16::from_be_bytes([out[3], out[4]]) as usize + add;
        out[3..5].copy_from_slice(&(rec as u16).to_be_bytes());
        let hs = (usize::from(out[6]) << 16 | usize::from(out[7]) << 8 | usize::from(out[8])) + add;
        out[6..9].copy_from_slice(&[(hs >> 16) as u8, (hs >> 8) as u8, hs as u8]);
        let mut at = 9 + 2 + 32;
        at += 1 + usize::from(out[at]);
        at += 2 + usize::from(u16::from_be_bytes([out[at], out[at + 1]]));
        at += 1 + usize::from(out[at]);
        let ext = u16::from_be_bytes([out[at], out[at + 1]]) as usize + add;
        out[at..at + 2].copy_from_slice(&(ext as u16).to_be_bytes());
        out.extend_from_slice(&typ.to_be_bytes());
        out.extend_from_slice(&(data.len() as u16).to_be_bytes());
        out.extend_from_slice(data);
        out
    }

    /// A server_name extension's body naming `names` (RFC 6066 §3).
    fn sni_ext(names: &[&[u8]]) -> Vec<u8> {
        let mut list = Vec::new();
        for n in names {
            list.push(0);
            list.extend_from_slice(&(n.len() as u16).to_be_bytes());
            list.extend_from_slice(n);
        }
        let mut out = (list.len() as u16).to_be_bytes().to_vec();
        out.extend(list);
        out
    }

    #[test]
    fn a_malformed_server_name_is_named_and_the_hello_decided_without_it() {
        // rustls sends no server_name for an address: the extension added
        // is the only one.
        let bare = client_hello("198.18.0.2", &[]);
        let mut cases: Vec<(Vec<u8>, Option<&str>)> = vec![
            (with_extension(&bare, 0, &sni_ext(&[b"ok.example"])), None),
            (
                with_extension(&bare, 0, &sni_ext(&[b"a\0b.example"])),
                Some("a NUL byte in the host name"),
            ),
            (
                with_extension(&bare, 0, &sni_ext(&["b\u{fc}cher.example".as_bytes()])),
                Some("bytes above 0x7f in the host name"),
            ),
            (
                with_extension(&bare, 0, &sni_ext(&[b"198.18.0.2"])),
                Some("not a DNS host name"),
            ),
            (
                with_extension(&bare, 0, &sni_ext(&[b"a.example", b"b.example"])),
                Some("more than one host name"),
            ),
            (
                with_extension(
                    &client_hello("a.example", &[]),
                    0,
                    &sni_ext(&[b"b.example"]),
                ),
                Some("the server_name extension appears more than once"),
            ),
        ];
        // Layout and syntax faults.
        let long_label = [b'a'; 64];
        let long_name = [b"abcdefghi.".as_slice(); 26].concat();
        let mut two_types = vec![0, 14, 1, 0, 11];
        two_types.extend_from_slice(b"a.b.example");
        for (body, why) in [
            (vec![0, 0], "an empty server name list"),
            (sni_ext(&[b""]), "an empty host name"),
            (sni_ext(&[b"a b.example"]), "not a DNS host name"),
            (sni_ext(&[b"a..example"]), "an empty label in the host name"),
            (
                sni_ext(&[&[&long_label[..], b".example"].concat()]),
                "a label longer than 63 bytes in the host name",
            ),
            (sni_ext(&[&long_name]), "a host name longer than 253 bytes"),
            (two_types, "a server name of unknown type"),
            (
                vec![0, 4, 0, 0, 30, b'a'],
                "a server name longer than its extension",
            ),
            (
                [sni_ext(&[b"a.example"]), vec![0]].concat(),
                "bytes after the server name list",
            ),
        ] {
            cases.push((with_extension(&bare, 0, &body), Some(why)));
        }
        // Underscores are in real names.
        cases.push((
            with_extension(&bare, 0, &sni_ext(&[b"_dmarc.a-b.example"])),
            None,
        ));
        for (hello, why) in cases {
            let mut s = HelloScanner::default();
            // rustls takes some of these without a name and refuses others
            // whole (then they are decided as other first bytes): either
            // way no name is used, and the reason is kept.
            match s.feed(&hello).expect("a complete hello") {
                Hello::Tls(ch) => {
                    assert_eq!(ch.sni.is_some(), why.is_none(), "{why:?}: {:?}", ch.sni)
                }
                Hello::Malformed => assert!(why.is_some(), "a well-formed hello refused"),
                Hello::NotTls => panic!("a handshake record taken for another protocol"),
            }
            assert_eq!(s.sni_malformed(), why);
        }
        // A well-formed hello has nothing to say.
        let mut s = HelloScanner::default();
        s.feed(&client_hello("a.example", &[]));
        assert_eq!(s.sni_malformed(), None);
    }

    #[test]
    fn an_encrypted_client_hello_is_noticed() {
        // An outer ECH: type 0, HPKE suite (HKDF-SHA256, AES-128-GCM),
        // config id, encapsulated key, payload (RFC 9460-era draft 22 §5).
        let mut ech = vec![0, 0, 1, 0, 1, 7, 0, 32];
        ech.extend([0x42; 32]);
        ech.extend([0, 16]);
        ech.extend([0x17; 16]);
        let hello = with_extension(&client_hello("public.example", &[]), 0xfe0d, &ech);
        let Some(Hello::Tls(ch)) = HelloScanner::default().feed(&hello) else {
            panic!("a ClientHello");
        };
        assert!(ch.ech);
        assert_eq!(ch.sni.as_deref(), Some("public.example"));
    }

    #[test]
    fn a_hello_split_over_two_records_is_reassembled() {
        let hello = client_hello("a.example", &[]);
        // Re-frame the handshake message as two records.
        let body = &hello[5..];
        let (a, b) = body.split_at(40);
        let mut two = Vec::new();
        for part in [a, b] {
            two.extend_from_slice(&[22, 3, 1]);
            two.extend_from_slice(&(part.len() as u16).to_be_bytes());
            two.extend_from_slice(part);
        }
        let mut s = HelloScanner::default();
        let Some(Hello::Tls(ch)) = s.feed(&two) else {
            panic!("expected a ClientHello")
        };
        assert_eq!(ch.sni.as_deref(), Some("a.example"));
    }

    #[test]
    fn other_protocols_are_not_tls_and_broken_handshakes_are_malformed() {
        let mut s = HelloScanner::default();
        assert_eq!(s.feed(b"GET / HTTP/1.1\r\n"), Some(Hello::NotTls));
        // A handshake record holding something that is not a ClientHello.
        let mut s = HelloScanner::default();
        assert_eq!(
            s.feed(&[22, 3, 1, 0, 8, 2, 0, 0, 4, 1, 2, 3, 4]),
            Some(Hello::Malformed)
        );
        // A ClientHello announcing 16 MiB (rustls caps handshake messages).
        let mut hello = client_hello("x.example", &[]);
        hello[6] = 0xff;
        let mut s = HelloScanner::default();
        assert_eq!(s.feed(&hello), Some(Hello::Malformed));
    }

    #[test]
    fn rustls_parses_a_hello_again_only_to_decrypt_it() {
        let good = client_hello("a.example", &[]);
        let mut s = HelloScanner::default();
        assert!(matches!(s.feed(&good), Some(Hello::Tls(_))));
        assert!(s.accept().is_ok());
        // A pre_shared_key the decision does not read, and rustls refuses.
        let bad = with_extension(&good, 41, &[1, 2, 3]);
        let mut s = HelloScanner::default();
        let Some(Hello::Tls(ch)) = s.feed(&bad) else {
            panic!("the decision takes it");
        };
        assert_eq!(ch.sni.as_deref(), Some("a.example"));
        assert_eq!(
            s.accept().err(),
            Some("the TLS library refuses the ClientHello")
        );
        // Names are compared as rustls gives them: lower case.
        let mut s = HelloScanner::default();
        let Some(Hello::Tls(ch)) = s.feed(&client_hello("MiXed.Example", &[])) else {
            panic!("a ClientHello");
        };
        assert_eq!(ch.sni.as_deref(), Some("mixed.example"));
        assert!(s.accept().is_ok());
    }

    #[test]
    fn a_hello_larger_than_a_record_is_parsed_again_by_rustls() {
        // A hundred long ALPN names: about 20 KB, two records.
        let names: Vec<Vec<u8>> = (0..100)
            .map(|i| format!("x{i:03}{}", "y".repeat(196)).into_bytes())
            .collect();
        let alpn: Vec<&[u8]> = names.iter().map(Vec::as_slice).collect();
        let hello = client_hello("big.example", &alpn);
        assert!(hello.len() > MAX_RECORD + 5);
        let mut s = HelloScanner::default();
        let mut got = None;
        for chunk in hello.chunks(1448) {
            if let Some(h) = s.feed(chunk) {
                got = Some(h);
            }
        }
        let Some(Hello::Tls(ch)) = got else {
            panic!("a ClientHello");
        };
        assert_eq!(ch.alpn.len(), 100);
        assert!(s.accept().is_ok());
    }

    #[test]
    fn a_decrypted_hello_skips_only_what_rustls_read() {
        // The hello, a change_cipher_spec and 5000 bytes of early data,
        // all in one feed: rustls reads a few KiB at a time and stops at
        // the hello; what it did not read stays in the client's stream.
        let mut bytes = client_hello("a.example", &[]);
        let hello_len = bytes.len();
        bytes.extend([20, 3, 3, 0, 1, 1]);
        bytes.extend([23, 3, 3, 0x13, 0x88]);
        bytes.extend([0x55; 5000]);
        let mut s = HelloScanner::default();
        assert!(matches!(s.feed(&bytes), Some(Hello::Tls(_))));
        assert_eq!(s.seen(), bytes.len());
        let (_, read) = s.accept().expect("rustls takes it");
        assert!(
            read >= hello_len && read < bytes.len(),
            "read {read} of {} (hello {hello_len})",
            bytes.len()
        );
    }

    #[test]
    fn a_partial_record_waits() {
        let mut s = HelloScanner::default();
        // A record header announcing 16 KiB, and a little of it.
        assert_eq!(s.feed(&[22, 3, 1, 0x40, 0]), None);
        assert_eq!(s.feed(&[1, 0, 0x3f, 0xfc]), None);
        assert_eq!(s.seen(), 9);
    }
}
