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
/// decision found its server name at fault (it is stricter there); and
/// when it is decrypted, the TLS stage skips exactly what rustls read.
fn check(s: &mut HelloScanner, h: Hello, bytes: &[u8]) {
    let theirs = crate::tls::hello::rustls_accept(bytes);
    match (h, theirs) {
        (Hello::Tls(ours), Some((accepted, read))) => {
            // rustls does not say which versions it was offered, nor ECH.
            let ours = ClientHello {
                versions: Vec::new(),
                ech: false,
                ..ours
            };
            assert_eq!(ours, fields(&accepted));
            let (_, skip) = s.accept().expect("rustls takes it");
            assert_eq!(skip, read);
        }
        (Hello::Malformed, Some((accepted, _))) => assert!(
            s.sni_malformed().is_some(),
            "a hello rustls takes, refused without a reason: {:?}",
            fields(&accepted)
        ),
        // The TLS stage is never started on these.
        (Hello::Tls(_), None) | (Hello::NotTls | Hello::Malformed, None) => {
            assert!(s.accept().is_err())
        }
        (Hello::NotTls, Some(_)) => panic!("rustls takes what the decision calls not TLS"),
    }
}

/// What rustls read of a ClientHello, as the decision's fields.
fn fields(accepted: &rustls::server::Accepted) -> ClientHello {
    let ch = accepted.client_hello();
    ClientHello {
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
    }
}

/// A ClientHello built from parts a generator chose: the server_name
/// extension's raw body (any layout), extra extensions (possibly
/// repeated), the handshake message cut into records of the given sizes,
/// and records after it.
pub fn built_hello(
    sni_body: Option<&[u8]>,
    extra: &[(u16, Vec<u8>)],
    record_sizes: &[usize],
    trailing: &[u8],
) -> Vec<u8> {
    let mut exts = Vec::new();
    let mut put = |typ: u16, data: &[u8]| {
        exts.extend_from_slice(&typ.to_be_bytes());
        exts.extend_from_slice(&(data.len() as u16).to_be_bytes());
        exts.extend_from_slice(data);
    };
    if let Some(b) = sni_body {
        put(0, b);
    }
    put(43, &[4, 3, 4, 3, 3]); // supported_versions: TLS 1.3, 1.2
    put(13, &[0, 4, 4, 3, 8, 4]); // signature_algorithms
    put(10, &[0, 2, 0, 29]); // supported_groups: x25519
    let mut share = vec![0, 36, 0, 29, 0, 32];
    share.extend([7; 32]);
    put(51, &share); // key_share
    for (typ, data) in extra {
        put(*typ, data);
    }
    let mut body = vec![3, 3];
    body.extend([9; 32]); // random
    body.push(0); // session id
    body.extend([0, 2, 0x13, 0x01]); // TLS_AES_128_GCM_SHA256
    body.extend([1, 0]); // null compression
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend(exts);
    let mut msg = vec![1];
    msg.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    msg.extend(body);
    let mut out = Vec::new();
    let mut rest = &msg[..];
    let mut sizes = record_sizes.iter().copied().filter(|n| *n > 0);
    while !rest.is_empty() {
        let n = sizes.next().unwrap_or(rest.len()).min(rest.len());
        let (a, b) = rest.split_at(n);
        out.extend([22, 3, 1]);
        out.extend_from_slice(&(a.len() as u16).to_be_bytes());
        out.extend_from_slice(a);
        rest = b;
    }
    out.extend_from_slice(trailing);
    out
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

    proptest! {
        // Valid names are a fraction of what this generates: many cases.
        #![proptest_config(ProptestConfig::with_cases(4096))]
        /// Hellos built with hostile server_name bodies (second names,
        /// unknown types, addresses, long labels, bad lengths), repeated
        /// or odd extensions, any record framing and records after the
        /// hello: the decision's parser never reads a name rustls would
        /// not, and a decrypted hello is skipped exactly.
        #[test]
        fn built_hellos_read_as_rustls_reads_them(
            names in proptest::collection::vec((prop::sample::select(vec![0u8, 0, 0, 0, 0, 1, 2]), prop::sample::select(vec![
                "a.example", "B.Example.", "198.18.0.2", "2001:2::1", "a..b", "-x.example",
                "x_y.example", "", "a b", "xn--bcher-kva.example",
            ])), 1..3),
            list_slack in prop::sample::select(vec![0i32, 0, 0, 0, 0, 0, -2, -1, 1, 2]),
            ext_slack in prop::sample::select(vec![0i32, 0, 0, 0, 0, -1, 1]),
            no_sni in prop::sample::select(vec![false, false, false, true]),
            long_label in prop::sample::select(vec![0usize, 0, 0, 0, 62, 63, 64]),
            extra in proptest::collection::vec((prop::sample::select(vec![0u16, 16, 43, 51, 0xfe0d, 0x0a0a, 0x1234, 41]), proptest::collection::vec(any::<u8>(), 0..8)), 0..2),
            alpn in prop::sample::select(vec![vec![], vec![0, 3, 2, b'h', b'2'], vec![0, 0], vec![0, 1, 0]]),
            sizes in proptest::collection::vec(0usize..300, 0..4),
            trailing in prop::sample::select(vec![vec![], vec![20, 3, 3, 0, 1, 1], vec![23, 3, 3, 0, 2, 9, 9], vec![22, 3, 3, 0, 3, 1, 0, 0]]),
            cuts in any::<[u8; 4]>(),
        ) {
            let mut list = Vec::new();
            for (kind, name) in &names {
                let mut n = name.as_bytes().to_vec();
                if long_label > 0 {
                    n = [vec![b'a'; long_label], b".example".to_vec()].concat();
                }
                list.push(*kind);
                list.extend_from_slice(&(n.len() as u16).to_be_bytes());
                list.extend(n);
            }
            let list_len = (list.len() as i32 + list_slack).max(0) as u16;
            let mut body = list_len.to_be_bytes().to_vec();
            body.extend(&list);
            if ext_slack > 0 {
                body.push(0);
            } else if ext_slack < 0 {
                body.pop();
            }
            let mut extra = extra;
            if !alpn.is_empty() {
                extra.push((16, alpn));
            }
            let h = super::built_hello((!no_sni).then_some(&body[..]), &extra, &sizes, &trailing);
            let mut data = cuts.to_vec();
            data.extend(&h);
            super::hello(&data);
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
