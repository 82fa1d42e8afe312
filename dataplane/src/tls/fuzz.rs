//! Hostile bytes into the TLS side of the engine: the decision point's
//! ClientHello parser, and the intercept stage's intake from both the
//! client and the server after a real handshake began. Nothing may panic,
//! hang or buffer without bound. The cargo-fuzz targets in `fuzz/` call
//! [`hello`] and [`intake`]; property tests here run them on random input
//! in every test run.

use std::sync::{Arc, OnceLock};

use super::{
    hello::{ClientHello, Hello, HelloScanner},
    testkit::{Kit, Session},
};
use crate::{
    policy::Profile,
    tcp::stream::{ByteStream, Pump},
};

/// Arbitrary bytes as a client's first bytes, cut where the input says.
pub fn hello(data: &[u8]) {
    let (cuts, bytes) = data.split_at(data.len().min(4));
    let mut s = HelloScanner::default();
    let mut rest = bytes;
    for c in cuts {
        let n = usize::from(*c).min(rest.len());
        let (now, later) = rest.split_at(n);
        rest = later;
        if let Some(h) = s.feed(now) {
            let fed = bytes.len() - later.len();
            check(&mut s, h, &bytes[..fed]);
            return;
        }
    }
    if let Some(h) = s.feed(rest) {
        check(&mut s, h, bytes);
    }
}

/// The decision's parser against rustls's on the same bytes: a hello
/// rustls takes is one the decision takes with the same fields, unless the
/// decision found its server name at fault (it is stricter there); one the
/// decision takes and rustls refuses is refused again when decrypted.
fn check(s: &mut HelloScanner, h: Hello, bytes: &[u8]) {
    let theirs = rustls_reads(bytes);
    match (h, theirs) {
        (Hello::Tls(ours), Some(theirs)) => {
            // rustls does not say which versions it was offered, nor ECH.
            let ours = ClientHello {
                versions: Vec::new(),
                ech: false,
                ..ours
            };
            assert_eq!(ours, theirs);
            assert!(s.accept().is_ok());
        }
        (Hello::Tls(_), None) => assert!(s.accept().is_err()),
        (Hello::Malformed, Some(theirs)) => assert!(
            s.sni_malformed().is_some(),
            "a hello rustls takes, refused without a reason: {theirs:?}"
        ),
        (Hello::NotTls | Hello::Malformed, _) => assert!(s.accept().is_err()),
    }
}

/// What rustls reads of complete first bytes, if it takes them.
fn rustls_reads(bytes: &[u8]) -> Option<ClientHello> {
    let accepted = crate::tls::hello::rustls_accept(bytes)?;
    let ch = accepted.client_hello();
    Some(ClientHello {
        sni: ch.server_name().map(str::to_owned),
        alpn: ch
            .alpn()
            .map(|a| a.map(<[u8]>::to_vec).collect())
            .unwrap_or_default(),
        versions: Vec::new(),
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
        ech: false,
    })
}

/// One kit for every run (CA keys are slow to make).
fn kit() -> &'static Kit {
    static KIT: OnceLock<Kit> = OnceLock::new();
    KIT.get_or_init(|| Kit::new(Profile::default()))
}

/// A real client starts a decrypted connection to a real server; then the
/// input decides, step by step, which side gets which hostile bytes (or
/// which real bytes go through).
pub fn intake(data: &[u8]) {
    let kit = kit();
    let server = kit.server_config(&["fuzz.example"], 30, &[]);
    let mut s = Session::start(
        kit,
        kit.client_config(&[]),
        "fuzz.example",
        Arc::clone(&server),
    );
    let mut input = data;
    while let Some((&op, rest)) = input.split_first() {
        let n = usize::from(rest.first().copied().unwrap_or(0)).min(rest.len().saturating_sub(1));
        let bytes = rest.get(1..1 + n).unwrap_or_default();
        input = rest.get(1 + n..).unwrap_or_default();
        match op % 5 {
            0 => s.cpipe.rx.extend(bytes),
            1 => s.spipe.rx.extend(bytes),
            2 => s.cpipe.peer_fin = true,
            3 => s.spipe.peer_fin = true,
            _ => {
                s.run();
            }
        }
        let p = s
            .stage
            .pump(&mut s.cpipe, &mut s.spipe, &mut s.relayed, s.now);
        if let Pump::Abort { .. } = p {
            break;
        }
        // What the stage buffers toward either half stays within the
        // halves' buffers.
        assert!(s.cpipe.unsent() <= s.cpipe.cap && s.spipe.unsent() <= s.spipe.cap);
    }
    s.run();
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn arbitrary_first_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            super::hello(&data);
        }

        /// Real hellos with bytes changed (lengths, types, names) and cut
        /// short: the decision's parser and rustls's agree on every one
        /// rustls takes (see `check`).
        #[test]
        fn mutated_real_hellos_read_as_rustls_reads_them(
            name in prop::sample::select(vec!["x.example", "Mixed.Case.example.", "a-b_c.example"]),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
            cut in any::<prop::sample::Index>(),
            short in any::<bool>(),
            splits in any::<[u8; 4]>(),
        ) {
            let mut h = crate::tls::hello::tests::client_hello(name, &[b"h2", b"http/1.1"]);
            for (at, byte) in edits {
                let i = at.index(h.len());
                h[i] = byte;
            }
            if short {
                h.truncate(cut.index(h.len()));
            }
            let mut data = splits.to_vec();
            data.extend(&h);
            super::hello(&data);
        }

        #[test]
        fn hostile_bytes_into_an_interception_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            super::intake(&data);
        }
    }

    #[test]
    fn a_real_hello_with_random_cuts_is_read_whole() {
        let h = crate::tls::hello::tests::client_hello("x.example", &[b"h2"]);
        for cut in [0u8, 1, 5, 200, 255] {
            let mut data = vec![cut, cut, cut, cut];
            data.extend(&h);
            super::hello(&data);
        }
    }
}
