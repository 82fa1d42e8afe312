//! The decision point of a connection: its first client bytes, read until
//! they make a complete TLS ClientHello or cannot be one.
//!
//! Parsing is rustls's own ([`rustls::server::Acceptor`]): the decision is
//! taken on exactly what the TLS stage will later read, and hostile bytes
//! meet a parser that is fuzzed upstream. Nothing here acknowledges or
//! answers anything; bytes are only looked at. The [`Accepted`] rustls
//! made is kept: a connection that is decrypted continues from it, so the
//! ClientHello is parsed once.

use rustls::server::{Accepted, Acceptor};

/// TLS record content type of a handshake record (RFC 8446 section 5.1).
const HANDSHAKE_RECORD: u8 = 22;

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
    /// A TLS handshake record whose ClientHello does not parse (rustls
    /// refuses it: a bad length, a repeated extension, a malformed server
    /// name). Its server name cannot be trusted, so it is decided without
    /// one; relaying it as other bytes would let a client get past a
    /// name-based block by malforming its hello on purpose.
    Malformed,
}

/// What a ClientHello tells the policy and the TLS stage.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientHello {
    /// The server name (SNI), when the client sent a valid DNS name.
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

/// Reads a client's first bytes, as they arrive in order.
pub struct HelloScanner {
    acceptor: Option<Acceptor>,
    seen: usize,
    /// The bytes fed so far (bounded by the hold), for what rustls does not
    /// tell of the ClientHello.
    raw: Vec<u8>,
    accepted: Option<Box<Accepted>>,
    /// What was wrong with the ClientHello's server name, once complete.
    sni_malformed: Option<&'static str>,
}

impl Default for HelloScanner {
    fn default() -> Self {
        HelloScanner {
            acceptor: Some(Acceptor::default()),
            seen: 0,
            raw: Vec::new(),
            accepted: None,
            sni_malformed: None,
        }
    }
}

impl HelloScanner {
    /// Bytes looked at so far.
    pub fn seen(&self) -> usize {
        self.seen
    }

    /// The next in-order bytes of the client's stream; `None` while the
    /// ClientHello is incomplete.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Option<Hello> {
        if self.seen == 0 && !bytes.is_empty() && bytes[0] != HANDSHAKE_RECORD {
            self.acceptor = None;
            return Some(Hello::NotTls);
        }
        self.seen += bytes.len();
        if self.acceptor.is_some() {
            self.raw.extend_from_slice(bytes);
        }
        let acceptor = self.acceptor.as_mut()?;
        while !bytes.is_empty() {
            match acceptor.read_tls(&mut bytes) {
                Ok(0) | Err(_) => {
                    self.acceptor = None;
                    return Some(Hello::Malformed);
                }
                Ok(_) => {}
            }
        }
        match acceptor.accept() {
            Ok(None) => None,
            Ok(Some(accepted)) => {
                self.acceptor = None;
                let ch = accepted.client_hello();
                let ext = Extensions::scan(&std::mem::take(&mut self.raw));
                let sni = ch.server_name().map(str::to_owned);
                self.sni_malformed = ext.sni_problem().or_else(|| {
                    // A name rustls did not take as a DNS name (an IP
                    // address, a label it refuses).
                    (ext.sni_names > 0 && sni.is_none()).then_some("not a DNS host name")
                });
                let hello = ClientHello {
                    // A name beside a fault is not trusted either.
                    sni: sni.filter(|_| self.sni_malformed.is_none()),
                    alpn: ch
                        .alpn()
                        .map(|a| a.map(<[u8]>::to_vec).collect())
                        .unwrap_or_default(),
                    versions: ext.versions,
                    suites: ch.cipher_suites().iter().map(|c| u16::from(*c)).collect(),
                    sig_schemes: ch
                        .signature_schemes()
                        .iter()
                        .map(|s| u16::from(*s))
                        .collect(),
                    groups: ch
                        .named_groups()
                        .unwrap_or_default()
                        .iter()
                        .map(|g| u16::from(*g))
                        .collect(),
                    ech: ext.ech,
                };
                self.accepted = Some(Box::new(accepted));
                Some(Hello::Tls(hello))
            }
            Err(_) => {
                // rustls refuses the whole ClientHello (two host names, a
                // repeated extension): it is decided without a name, and
                // the reason is kept when it was the server name.
                self.acceptor = None;
                self.sni_malformed = Extensions::scan(&std::mem::take(&mut self.raw)).sni_problem();
                Some(Hello::Malformed)
            }
        }
    }

    /// Why the complete ClientHello's server name is malformed (two
    /// names, a NUL or non-ASCII byte, a repeated extension, not a DNS
    /// name), if it is: the connection is decided without the name, and
    /// its record says so.
    pub fn sni_malformed(&self) -> Option<&'static str> {
        self.sni_malformed
    }
}

impl HelloScanner {
    /// The parsed ClientHello, for the connection to continue from (once).
    pub fn take_accepted(&mut self) -> Option<Box<Accepted>> {
        self.accepted.take()
    }
}

/// What rustls does not say of a ClientHello, read from its raw bytes
/// (which rustls has already parsed and accepted: a shape this reader does
/// not expect only leaves the fields empty).
#[derive(Default)]
struct Extensions {
    versions: Vec<u16>,
    ech: bool,
    /// server_name extensions, host names in them, and whether a name has
    /// a NUL or a byte above 0x7f.
    sni_extensions: usize,
    sni_names: usize,
    sni_nul: bool,
    sni_non_ascii: bool,
    /// The first other fault of the extension or of a name in it (its
    /// layout, a name type, a name that is not DNS syntax).
    sni_fault: Option<&'static str>,
    /// An extension type seen twice (RFC 8446 §4.2: not allowed).
    repeated: bool,
}

impl Extensions {
    /// What is wrong with the server name, if anything.
    fn sni_problem(&self) -> Option<&'static str> {
        if self.sni_extensions > 1 {
            Some("the server_name extension appears more than once")
        } else if self.sni_names > 1 {
            Some("more than one host name")
        } else if self.sni_nul {
            Some("a NUL byte in the host name")
        } else if self.sni_non_ascii {
            Some("bytes above 0x7f in the host name")
        } else if self.repeated && self.sni_extensions > 0 {
            Some("a repeated extension beside the server name")
        } else {
            self.sni_fault
        }
    }
}

impl Extensions {
    fn scan(records: &[u8]) -> Extensions {
        // The handshake message may span records: join their bodies.
        let mut msg = Vec::new();
        let mut rest = records;
        while rest.len() >= 5 && rest[0] == HANDSHAKE_RECORD {
            let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
            let Some(body) = rest.get(5..5 + len) else {
                break;
            };
            msg.extend_from_slice(body);
            rest = &rest[5 + len..];
        }
        Extensions::from_message(&msg).unwrap_or_default()
    }

    /// RFC 8446 §4.1.2: the ClientHello's layout.
    fn from_message(msg: &[u8]) -> Option<Extensions> {
        let mut r = Reader(msg);
        if r.u8()? != 1 {
            return None;
        }
        let len = r.u24()?;
        let mut body = Reader(r.take(len)?);
        let legacy_version = body.u16()?;
        body.take(32)?; // random
        let sid = usize::from(body.u8()?);
        body.take(sid)?;
        let suites = usize::from(body.u16()?);
        body.take(suites)?;
        let comp = usize::from(body.u8()?);
        body.take(comp)?;
        let mut out = Extensions {
            versions: vec![legacy_version],
            ..Extensions::default()
        };
        let Some(len) = body.u16() else {
            return Some(out); // no extensions at all
        };
        let mut exts = Reader(body.take(usize::from(len))?);
        let mut seen = std::collections::HashSet::new();
        while let Some(typ) = exts.u16() {
            let len = usize::from(exts.u16()?);
            let data = exts.take(len)?;
            out.repeated |= !seen.insert(typ);
            match typ {
                EXT_SERVER_NAME => {
                    out.sni_extensions += 1;
                    out.server_names(data);
                }
                EXT_ECH => out.ech = true,
                EXT_SUPPORTED_VERSIONS => {
                    let mut v = Reader(data);
                    let n = usize::from(v.u8()?);
                    let mut list = Reader(v.take(n)?);
                    out.versions.clear();
                    while let Some(ver) = list.u16() {
                        out.versions.push(ver);
                    }
                }
                _ => {}
            }
        }
        Some(out)
    }

    /// RFC 6066 §3: a list of (name_type, name); host_name is type 0.
    fn server_names(&mut self, data: &[u8]) {
        let mut r = Reader(data);
        let Some(list) = r.u16().and_then(|n| r.take(usize::from(n))) else {
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
            let Some(name) = list.u16().and_then(|n| list.take(usize::from(n))) else {
                self.fault("a server name longer than its extension");
                return;
            };
            if kind != 0 {
                self.fault("a server name of unknown type");
                continue;
            }
            self.sni_names += 1;
            self.sni_nul |= name.contains(&0);
            self.sni_non_ascii |= name.iter().any(|b| *b > 0x7f);
            if let Some(why) = host_name_fault(name) {
                self.fault(why);
            }
        }
    }

    /// Keeps the first fault found.
    fn fault(&mut self, why: &'static str) {
        self.sni_fault.get_or_insert(why);
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
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | 0 | 0x80..))
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
    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|b| usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]))
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
            assert!(s.take_accepted().is_some() && s.take_accepted().is_none());
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
    fn a_partial_record_waits() {
        let mut s = HelloScanner::default();
        // A record header announcing 16 KiB, and a little of it.
        assert_eq!(s.feed(&[22, 3, 1, 0x40, 0]), None);
        assert_eq!(s.feed(&[1, 0, 0x3f, 0xfc]), None);
        assert_eq!(s.seen(), 9);
    }
}
