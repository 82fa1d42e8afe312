//! The decision point of a connection: its first client bytes, read until
//! they make a complete TLS ClientHello or cannot be one.
//!
//! Parsing is rustls's own ([`rustls::server::Acceptor`]): the decision is
//! taken on exactly what the TLS stage will later read, and hostile bytes
//! meet a parser that is fuzzed upstream. Nothing here acknowledges or
//! answers anything; bytes are only looked at.

use rustls::server::Acceptor;

/// TLS record content type of a handshake record (RFC 8446 section 5.1).
const HANDSHAKE_RECORD: u8 = 22;

/// What the first client bytes turned out to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hello {
    /// A complete ClientHello.
    Tls(ClientHello),
    /// Not a TLS handshake (another protocol, or a ClientHello rustls
    /// rejects as malformed).
    NotTls,
}

/// What a ClientHello tells the policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientHello {
    /// The server name (SNI), when the client sent a valid DNS name.
    pub sni: Option<String>,
    /// ALPN protocols offered, in the client's order.
    pub alpn: Vec<Vec<u8>>,
}

/// Reads a client's first bytes, as they arrive in order.
pub struct HelloScanner {
    acceptor: Option<Acceptor>,
    seen: usize,
}

impl Default for HelloScanner {
    fn default() -> Self {
        HelloScanner {
            acceptor: Some(Acceptor::default()),
            seen: 0,
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
        let acceptor = self.acceptor.as_mut()?;
        while !bytes.is_empty() {
            match acceptor.read_tls(&mut bytes) {
                Ok(0) | Err(_) => {
                    self.acceptor = None;
                    return Some(Hello::NotTls);
                }
                Ok(_) => {}
            }
        }
        match acceptor.accept() {
            Ok(None) => None,
            Ok(Some(accepted)) => {
                self.acceptor = None;
                let ch = accepted.client_hello();
                Some(Hello::Tls(ClientHello {
                    sni: ch.server_name().map(str::to_owned),
                    alpn: ch
                        .alpn()
                        .map(|a| a.map(<[u8]>::to_vec).collect())
                        .unwrap_or_default(),
                }))
            }
            Err(_) => {
                self.acceptor = None;
                Some(Hello::NotTls)
            }
        }
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
            let got = s.feed(&hello[cut..]).expect("complete");
            assert_eq!(
                got,
                Hello::Tls(ClientHello {
                    sni: Some("shop.example.com".into()),
                    alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()],
                })
            );
        }
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
    fn other_protocols_and_garbage_are_not_tls() {
        let mut s = HelloScanner::default();
        assert_eq!(s.feed(b"GET / HTTP/1.1\r\n"), Some(Hello::NotTls));
        // A handshake record holding something that is not a ClientHello.
        let mut s = HelloScanner::default();
        assert_eq!(
            s.feed(&[22, 3, 1, 0, 8, 2, 0, 0, 4, 1, 2, 3, 4]),
            Some(Hello::NotTls)
        );
        // A ClientHello announcing 16 MiB (rustls caps handshake messages).
        let mut hello = client_hello("x.example", &[]);
        hello[6] = 0xff;
        let mut s = HelloScanner::default();
        assert_eq!(s.feed(&hello), Some(Hello::NotTls));
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
