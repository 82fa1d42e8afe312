//! TCP options: parsed strictly (a malformed option list is an error the
//! caller counts, never a panic), emitted in the layout Linux uses.

use crate::wire::seq::SeqNum;

/// Option kinds (IANA "TCP Option Kind Numbers").
mod kind {
    pub const EOL: u8 = 0;
    pub const NOP: u8 = 1;
    pub const MSS: u8 = 2;
    pub const WSCALE: u8 = 3;
    pub const SACK_PERMITTED: u8 = 4;
    pub const SACK: u8 = 5;
    pub const TIMESTAMPS: u8 = 8;
    pub const FAST_OPEN: u8 = 34;
    pub const EXPERIMENTAL: u8 = 254;
}

/// RFC 7323 §3: TSval and TSecr.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timestamps {
    pub val: u32,
    pub ecr: u32,
}

/// The options of one segment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TcpOptions {
    pub mss: Option<u16>,
    /// The shift as sent; [`TcpOptions::window_shift`] applies the limit.
    pub window_scale: Option<u8>,
    pub sack_permitted: bool,
    pub timestamps: Option<Timestamps>,
    /// SACK blocks (left edge, right edge), at most 4.
    pub sack: Vec<(SeqNum, SeqNum)>,
    /// A TCP Fast Open option (RFC 7413, or its experimental form).
    pub fast_open: bool,
    /// Options of kinds not listed above (skipped by their length).
    pub unknown: u8,
}

/// Why an option list was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    #[error("option kind {kind} at offset {at} has no length byte")]
    MissingLength { kind: u8, at: usize },
    #[error("option kind {kind} at offset {at} has length {len}, below the minimum of 2")]
    ShortLength { kind: u8, at: usize, len: u8 },
    #[error("option kind {kind} at offset {at} has length {len}, past the end of the header")]
    Overrun { kind: u8, at: usize, len: u8 },
    #[error("option kind {kind} at offset {at} has length {len}, which that kind never has")]
    WrongLength { kind: u8, at: usize, len: u8 },
    #[error("option kind {kind} appears twice")]
    Duplicate { kind: u8 },
}

impl TcpOptions {
    /// Parses the option bytes of a TCP header (after the 20 fixed bytes).
    pub fn parse(bytes: &[u8]) -> Result<TcpOptions, OptionError> {
        let mut o = TcpOptions::default();
        let mut seen = 0u16;
        let mut i = 0;
        while i < bytes.len() {
            let k = bytes[i];
            match k {
                //= https://www.rfc-editor.org/rfc/rfc9293#section-3.1
                //# End of Option List ... used at the end of all options
                kind::EOL => break,
                kind::NOP => {
                    i += 1;
                    continue;
                }
                _ => {}
            }
            let len = *bytes
                .get(i + 1)
                .ok_or(OptionError::MissingLength { kind: k, at: i })?;
            if len < 2 {
                return Err(OptionError::ShortLength {
                    kind: k,
                    at: i,
                    len,
                });
            }
            let end = i + len as usize;
            if end > bytes.len() {
                return Err(OptionError::Overrun {
                    kind: k,
                    at: i,
                    len,
                });
            }
            let body = &bytes[i + 2..end];
            let wrong = OptionError::WrongLength {
                kind: k,
                at: i,
                len,
            };
            let bit = match k {
                kind::MSS => 1,
                kind::WSCALE => 2,
                kind::SACK_PERMITTED => 3,
                kind::SACK => 4,
                kind::TIMESTAMPS => 5,
                kind::FAST_OPEN => 6,
                _ => 0,
            };
            if bit != 0 {
                if seen & (1 << bit) != 0 {
                    return Err(OptionError::Duplicate { kind: k });
                }
                seen |= 1 << bit;
            }
            match k {
                kind::MSS => {
                    let [a, b] = body else { return Err(wrong) };
                    o.mss = Some(u16::from_be_bytes([*a, *b]));
                }
                kind::WSCALE => {
                    let [s] = body else { return Err(wrong) };
                    o.window_scale = Some(*s);
                }
                kind::SACK_PERMITTED => {
                    if !body.is_empty() {
                        return Err(wrong);
                    }
                    o.sack_permitted = true;
                }
                kind::SACK => {
                    //= https://www.rfc-editor.org/rfc/rfc2018#section-3
                    //# Length: Variable ... 8*n+2 bytes
                    if body.is_empty() || !body.len().is_multiple_of(8) || body.len() > 32 {
                        return Err(wrong);
                    }
                    for b in body.chunks_exact(8) {
                        let l = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
                        let r = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
                        o.sack.push((SeqNum(l), SeqNum(r)));
                    }
                }
                kind::TIMESTAMPS => {
                    if body.len() != 8 {
                        return Err(wrong);
                    }
                    o.timestamps = Some(Timestamps {
                        val: u32::from_be_bytes([body[0], body[1], body[2], body[3]]),
                        ecr: u32::from_be_bytes([body[4], body[5], body[6], body[7]]),
                    });
                }
                kind::FAST_OPEN => o.fast_open = true,
                // RFC 7413 §4.1.1: the experimental form carries magic 0xF989.
                kind::EXPERIMENTAL if body.starts_with(&[0xf9, 0x89]) => o.fast_open = true,
                _ => o.unknown = o.unknown.saturating_add(1),
            }
            i = end;
        }
        Ok(o)
    }

    /// Overwrites any TCP Fast Open option in `bytes` (a header's option
    /// bytes, as [`TcpOptions::parse`] takes them) with NOPs, which keeps
    /// every other option where it lies.
    pub fn blank_fast_open(bytes: &mut [u8]) {
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                kind::EOL => break,
                kind::NOP => {
                    i += 1;
                    continue;
                }
                _ => {}
            }
            let Some(&len) = bytes.get(i + 1) else { break };
            let end = i + usize::from(len);
            if len < 2 || end > bytes.len() {
                break;
            }
            let k = bytes[i];
            if k == kind::FAST_OPEN
                || (k == kind::EXPERIMENTAL && bytes[i + 2..end].starts_with(&[0xf9, 0x89]))
            {
                bytes[i..end].fill(kind::NOP);
            }
            i = end;
        }
    }

    /// The window shift to apply: RFC 7323 §2.3 caps it at 14.
    //= https://www.rfc-editor.org/rfc/rfc7323#section-2.3
    //# If a Window Scale option is received with a shift.cnt value larger
    //# than 14, the TCP SHOULD log the error but MUST use 14 instead of the
    //# specified value.
    pub fn window_shift(&self) -> Option<u8> {
        self.window_scale.map(|s| s.min(14))
    }

    /// Appends the options, each laid out with NOPs to a multiple of 4
    /// bytes, in Linux's order (MSS, SACK-permitted, timestamps, window scale, SACK).
    /// At most 40 bytes: SACK blocks that do not fit are left out.
    pub fn emit(&self, out: &mut Vec<u8>) {
        let mut buf = [0; 40];
        let n = self.emit_into(&mut buf);
        out.extend_from_slice(&buf[..n]);
    }

    /// As [`TcpOptions::emit`], into the 40 bytes a TCP header has room
    /// for (what does not fit is left out, SACK blocks first); returns how
    /// many were written. No allocation: this runs for every frame sent.
    pub fn emit_into(&self, out: &mut [u8; 40]) -> usize {
        let mut w = OptionWriter { out, len: 0 };
        if let Some(mss) = self.mss {
            let [hi, lo] = mss.to_be_bytes();
            w.put(&[kind::MSS, 4, hi, lo]);
        }
        match (self.sack_permitted, self.timestamps) {
            (true, Some(ts)) => {
                w.put(&[kind::SACK_PERMITTED, 2, kind::TIMESTAMPS, 10]);
                w.put(&ts_bytes(ts));
            }
            (sack_ok, ts) => {
                if sack_ok {
                    w.put(&[kind::NOP, kind::NOP, kind::SACK_PERMITTED, 2]);
                }
                if let Some(ts) = ts {
                    w.put(&[kind::NOP, kind::NOP, kind::TIMESTAMPS, 10]);
                    w.put(&ts_bytes(ts));
                }
            }
        }
        if let Some(ws) = self.window_scale {
            w.put(&[kind::NOP, kind::WSCALE, 3, ws]);
        }
        // Every option above takes a multiple of four bytes: no padding.
        let room = 40usize.saturating_sub(w.len);
        let blocks = self.sack.len().min(room.saturating_sub(4) / 8).min(4);
        if blocks > 0 {
            w.put(&[kind::NOP, kind::NOP, kind::SACK, 2 + 8 * blocks as u8]);
            for (l, r) in &self.sack[..blocks] {
                w.put(&l.0.to_be_bytes());
                w.put(&r.0.to_be_bytes());
            }
        }
        w.len
    }
}

/// Option bytes written one after another into a header's 40 bytes.
struct OptionWriter<'a> {
    out: &'a mut [u8; 40],
    len: usize,
}

impl OptionWriter<'_> {
    /// Appends `bytes` if they fit (the callers see to it that they do).
    fn put(&mut self, bytes: &[u8]) {
        if let Some(to) = self.out.get_mut(self.len..self.len + bytes.len()) {
            to.copy_from_slice(bytes);
            self.len += bytes.len();
        }
    }
}

fn ts_bytes(ts: Timestamps) -> [u8; 8] {
    let mut b = [0; 8];
    b[..4].copy_from_slice(&ts.val.to_be_bytes());
    b[4..].copy_from_slice(&ts.ecr.to_be_bytes());
    b
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// A Linux SYN's options: MSS 1460, SACK-permitted, TS, NOP, WS 7.
    const LINUX_SYN: [u8; 20] = [
        2, 4, 5, 180, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7,
    ];

    #[test]
    fn a_linux_syn_parses_and_re_emits_byte_for_byte() {
        let o = TcpOptions::parse(&LINUX_SYN).unwrap();
        assert_eq!(o.mss, Some(1460));
        assert_eq!(o.window_scale, Some(7));
        assert!(o.sack_permitted);
        assert_eq!(o.timestamps, Some(Timestamps { val: 1, ecr: 0 }));
        let mut out = Vec::new();
        o.emit(&mut out);
        assert_eq!(out, LINUX_SYN);
    }

    #[test]
    fn bad_lengths_are_errors_not_panics() {
        let cases: [(&[u8], OptionError); 6] = [
            (&[2], OptionError::MissingLength { kind: 2, at: 0 }),
            (
                &[1, 2, 1],
                OptionError::ShortLength {
                    kind: 2,
                    at: 1,
                    len: 1,
                },
            ),
            (
                &[99, 0],
                OptionError::ShortLength {
                    kind: 99,
                    at: 0,
                    len: 0,
                },
            ),
            (
                &[8, 10, 0, 0],
                OptionError::Overrun {
                    kind: 8,
                    at: 0,
                    len: 10,
                },
            ),
            (
                &[2, 3, 5],
                OptionError::WrongLength {
                    kind: 2,
                    at: 0,
                    len: 3,
                },
            ),
            (
                &[5, 6, 0, 0, 0, 0],
                OptionError::WrongLength {
                    kind: 5,
                    at: 0,
                    len: 6,
                },
            ),
        ];
        for (bytes, want) in cases {
            assert_eq!(TcpOptions::parse(bytes), Err(want), "{bytes:?}");
        }
        assert_eq!(
            TcpOptions::parse(&[3, 3, 1, 3, 3, 2]),
            Err(OptionError::Duplicate { kind: 3 })
        );
    }

    #[test]
    fn eol_ends_parsing_and_unknown_kinds_are_skipped() {
        let o = TcpOptions::parse(&[99, 4, 0, 0, 2, 4, 1, 0, 0, 2, 4, 9, 9]).unwrap();
        assert_eq!((o.unknown, o.mss), (1, Some(256)));
        assert!(TcpOptions::parse(&[34, 2]).unwrap().fast_open);
        assert!(TcpOptions::parse(&[254, 4, 0xf9, 0x89]).unwrap().fast_open);
        assert!(!TcpOptions::parse(&[254, 4, 0x12, 0x34]).unwrap().fast_open);
    }

    #[test]
    fn window_shift_is_capped_at_14() {
        let o = TcpOptions::parse(&[3, 3, 15]).unwrap();
        assert_eq!((o.window_scale, o.window_shift()), (Some(15), Some(14)));
    }

    #[test]
    fn sack_blocks_fit_beside_timestamps() {
        let o = TcpOptions {
            timestamps: Some(Timestamps { val: 5, ecr: 6 }),
            sack: (0..4)
                .map(|i| (SeqNum(i * 100), SeqNum(i * 100 + 50)))
                .collect(),
            ..Default::default()
        };
        let mut out = Vec::new();
        o.emit(&mut out);
        assert!(out.len() <= 40 && out.len().is_multiple_of(4));
        let back = TcpOptions::parse(&out).unwrap();
        assert_eq!(back.timestamps, o.timestamps);
        assert_eq!(back.sack, o.sack[..3]);
    }

    fn arb_options() -> impl Strategy<Value = TcpOptions> {
        (
            proptest::option::of(any::<u16>()),
            proptest::option::of(0u8..=14),
            any::<bool>(),
            proptest::option::of((any::<u32>(), any::<u32>())),
            proptest::collection::vec((any::<u32>(), any::<u32>()), 0..=4),
        )
            .prop_map(|(mss, ws, sp, ts, sack)| TcpOptions {
                mss,
                window_scale: ws,
                sack_permitted: sp,
                timestamps: ts.map(|(val, ecr)| Timestamps { val, ecr }),
                sack: sack
                    .into_iter()
                    .map(|(l, r)| (SeqNum(l), SeqNum(r)))
                    .collect(),
                ..Default::default()
            })
    }

    proptest! {
        #[test]
        fn emitted_options_parse_back(o in arb_options()) {
            let mut out = Vec::new();
            o.emit(&mut out);
            prop_assert!(out.len() <= 40 && out.len().is_multiple_of(4));
            let back = TcpOptions::parse(&out).unwrap();
            prop_assert_eq!(back.mss, o.mss);
            prop_assert_eq!(back.window_scale, o.window_scale);
            prop_assert_eq!(back.sack_permitted, o.sack_permitted);
            prop_assert_eq!(back.timestamps, o.timestamps);
            prop_assert!(o.sack.starts_with(&back.sack));
        }

        #[test]
        fn any_bytes_parse_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            let _ = TcpOptions::parse(&bytes);
        }
    }
}
