//! Content signatures: byte patterns looked for in each direction's
//! plaintext, found wherever they fall (across TLS records, TCP segments
//! and the chunks the stage hands over). One Aho-Corasick automaton per
//! profile holds every pattern; each connection keeps, per direction, only
//! the last `longest - 1` bytes it saw, so that a match across a chunk
//! boundary is found once, in the seam between the two.

use std::{sync::Arc, time::Instant};

use aho_corasick::{AhoCorasick, MatchKind};
use serde::{Deserialize, Serialize};

use super::{Direction, Finding, Inspector, Report, SignatureHit};

/// The EICAR anti-virus test string: harmless, and recognised by every
/// scanner as the test of a detection path.
pub const EICAR: &[u8] = br"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";

/// The longest pattern a signature may have.
pub const MAX_PATTERN: usize = 1024;

/// Signature records one connection may produce; later matches are
/// still acted on (a block blocks) but not logged again.
pub const MAX_HITS_LOGGED: usize = 32;

/// What a match does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SignatureAction {
    /// Log it; the connection goes on.
    #[default]
    Alert,
    /// Log it and reset both sides before the matching bytes go on.
    Block,
}

impl SignatureAction {
    pub fn label(self) -> &'static str {
        match self {
            SignatureAction::Alert => "alert",
            SignatureAction::Block => "block",
        }
    }
}

/// Every pattern of one profile, compiled.
#[derive(Debug)]
pub struct SignatureSet {
    ac: AhoCorasick,
    names: Vec<Arc<str>>,
    actions: Vec<SignatureAction>,
    longest: usize,
}

impl SignatureSet {
    /// Compiles `(name, pattern, action)`; patterns must be 1 to
    /// [`MAX_PATTERN`] bytes.
    pub fn new(sigs: &[(String, Vec<u8>, SignatureAction)]) -> Result<SignatureSet, String> {
        for (name, p, _) in sigs {
            if p.is_empty() || p.len() > MAX_PATTERN {
                return Err(format!(
                    "signature {name:?}: a pattern is 1 to {MAX_PATTERN} bytes, not {}",
                    p.len()
                ));
            }
        }
        let ac = AhoCorasick::builder()
            .match_kind(MatchKind::Standard)
            .build(sigs.iter().map(|(_, p, _)| p))
            .map_err(|e| format!("the signatures cannot be compiled: {e}"))?;
        Ok(SignatureSet {
            ac,
            names: sigs.iter().map(|(n, _, _)| Arc::from(n.as_str())).collect(),
            actions: sigs.iter().map(|(_, _, a)| *a).collect(),
            longest: sigs.iter().map(|(_, p, _)| p.len()).max().unwrap_or(1),
        })
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// One connection's scan.
pub struct Scanner {
    set: Arc<SignatureSet>,
    /// Per direction: its last `longest - 1` bytes, and bytes seen.
    tails: [Vec<u8>; 2],
    offsets: [u64; 2],
    logged: usize,
    seam: Vec<u8>,
}

impl SignatureSet {
    /// Whether a match of one of them resets the connection.
    pub fn blocks(&self) -> bool {
        self.actions.contains(&SignatureAction::Block)
    }
}

impl Scanner {
    pub fn new(set: Arc<SignatureSet>) -> Scanner {
        Scanner {
            set,
            tails: Default::default(),
            offsets: [0; 2],
            logged: 0,
            seam: Vec::new(),
        }
    }

    fn hit(&mut self, pattern: usize, dir: Direction, offset: u64, report: &mut Report) {
        let name = self.set.names[pattern].clone();
        let action = self.set.actions[pattern];
        if action == SignatureAction::Block {
            report.block(format!(
                "signature {name:?} matched at offset {offset} of the {} stream",
                match dir {
                    Direction::ClientToServer => "client's",
                    Direction::ServerToClient => "server's",
                }
            ));
        }
        if self.logged < MAX_HITS_LOGGED {
            self.logged += 1;
            report.add(Finding::Signature(SignatureHit {
                name,
                action,
                dir,
                offset,
            }));
        }
    }
}

impl Inspector for Scanner {
    fn on_data(&mut self, dir: Direction, data: &[u8], _now: Instant, report: &mut Report) {
        let d = dir as usize;
        let keep = self.set.longest - 1;
        let base = self.offsets[d];
        let mut hits = Vec::new();
        // Matches that begin in the tail and end in `data`.
        let tail_len = self.tails[d].len();
        if tail_len > 0 {
            self.seam.clear();
            self.seam.extend_from_slice(&self.tails[d]);
            self.seam.extend_from_slice(&data[..data.len().min(keep)]);
            for m in self.set.ac.find_overlapping_iter(&self.seam[..]) {
                if m.start() < tail_len && m.end() > tail_len {
                    let at = base - tail_len as u64 + m.start() as u64;
                    hits.push((m.pattern().as_usize(), at));
                }
            }
        }
        for m in self.set.ac.find_overlapping_iter(data) {
            hits.push((m.pattern().as_usize(), base + m.start() as u64));
        }
        hits.sort_by_key(|&(_, at)| at);
        for (pattern, at) in hits {
            self.hit(pattern, dir, at, report);
        }
        // The new tail: the last `keep` bytes of the old tail and `data`.
        let tail = &mut self.tails[d];
        if data.len() >= keep {
            tail.clear();
            tail.extend_from_slice(&data[data.len() - keep..]);
        } else {
            tail.extend_from_slice(data);
            let excess = tail.len().saturating_sub(keep);
            tail.drain(..excess);
        }
        self.offsets[d] += data.len() as u64;
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn set(sigs: &[(&str, &[u8], SignatureAction)]) -> Arc<SignatureSet> {
        let v: Vec<_> = sigs
            .iter()
            .map(|(n, p, a)| (n.to_string(), p.to_vec(), *a))
            .collect();
        Arc::new(SignatureSet::new(&v).unwrap())
    }

    /// Feeds `stream` in chunks cut at `cuts`; the hits (name, offset).
    fn scan(
        set: &Arc<SignatureSet>,
        stream: &[u8],
        cuts: &[usize],
    ) -> (Vec<(String, u64)>, Report) {
        let mut s = Scanner::new(set.clone());
        let mut report = Report::default();
        let now = Instant::now();
        let mut at = 0;
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
        cuts.sort_unstable();
        cuts.push(stream.len());
        for c in cuts {
            s.on_data(
                Direction::ServerToClient,
                &stream[at..c.max(at)],
                now,
                &mut report,
            );
            at = c.max(at);
        }
        let hits = report
            .findings
            .iter()
            .map(|f| match f {
                Finding::Signature(h) => (h.name.to_string(), h.offset),
                other => panic!("{other:?}"),
            })
            .collect();
        (hits, report)
    }

    #[test]
    fn eicar_split_byte_by_byte_is_found_once_at_its_offset_and_blocks() {
        let set = set(&[("eicar", EICAR, SignatureAction::Block)]);
        let mut stream = vec![b'a'; 100];
        stream.extend_from_slice(EICAR);
        stream.extend_from_slice(&[b'z'; 50]);
        let cuts: Vec<usize> = (0..stream.len()).collect();
        let (hits, report) = scan(&set, &stream, &cuts);
        assert_eq!(hits, vec![("eicar".to_string(), 100)]);
        let (why, answer) = report.block.unwrap();
        assert!(why.contains("\"eicar\" matched at offset 100"), "{why}");
        assert_eq!(answer, None, "a signature resets, it answers nothing");
    }

    #[test]
    fn a_control_body_finds_nothing_and_an_alert_does_not_block() {
        let set = set(&[
            ("eicar", EICAR, SignatureAction::Block),
            ("marker", b"MARK", SignatureAction::Alert),
        ]);
        let (hits, report) = scan(&set, &EICAR[..EICAR.len() - 1], &[10, 40]);
        assert!(hits.is_empty());
        assert!(report.block.is_none());
        let (hits, report) = scan(&set, b"xxMARKyyMARK", &[3, 4, 5]);
        assert_eq!(hits, vec![("marker".into(), 2), ("marker".into(), 8)]);
        assert!(report.block.is_none());
    }

    #[test]
    fn directions_are_scanned_apart() {
        let set = set(&[("m", b"abcd", SignatureAction::Alert)]);
        let mut s = Scanner::new(set);
        let mut r = Report::default();
        let now = Instant::now();
        s.on_data(Direction::ClientToServer, b"ab", now, &mut r);
        s.on_data(Direction::ServerToClient, b"cd", now, &mut r);
        assert!(r.findings.is_empty());
        s.on_data(Direction::ClientToServer, b"cd", now, &mut r);
        assert_eq!(
            r.findings,
            vec![Finding::Signature(SignatureHit {
                name: "m".into(),
                action: SignatureAction::Alert,
                dir: Direction::ClientToServer,
                offset: 0
            })]
        );
    }

    #[test]
    fn logged_hits_are_bounded() {
        let set = set(&[("a", b"a", SignatureAction::Alert)]);
        let (hits, _) = scan(&set, &[b'a'; 1000], &[7, 500]);
        assert_eq!(hits.len(), MAX_HITS_LOGGED);
    }

    #[test]
    fn bad_patterns_are_refused() {
        let long = vec![0u8; MAX_PATTERN + 1];
        for p in [Vec::new(), long] {
            let e = SignatureSet::new(&[("x".into(), p, SignatureAction::Alert)]).unwrap_err();
            assert!(e.contains("1 to 1024 bytes"), "{e}");
        }
    }

    proptest! {
        /// Wherever the chunks are cut, the hits are those of one pass
        /// over the whole stream.
        #[test]
        fn chunking_never_changes_the_hits(
            stream in proptest::collection::vec((0u8..6).prop_map(|b| b'a' + b), 0..300),
            cuts in proptest::collection::vec(0usize..400, 0..20),
        ) {
            let set = set(&[
                ("ab", b"ab", SignatureAction::Alert),
                ("abcab", b"abcab", SignatureAction::Alert),
                ("cc", b"cc", SignatureAction::Alert),
            ]);
            let mut want: Vec<(String, u64)> = set
                .ac
                .find_overlapping_iter(&stream[..])
                .map(|m| (set.names[m.pattern().as_usize()].to_string(), m.start() as u64))
                .collect();
            want.sort_by_key(|(n, at)| (*at, n.clone()));
            want.truncate(MAX_HITS_LOGGED);
            let (mut got, _) = scan(&set, &stream, &cuts);
            got.sort_by_key(|(n, at)| (*at, n.clone()));
            // (Both sorted by offset; the first MAX_HITS_LOGGED agree only
            // when the whole list fits.)
            if got.len() < MAX_HITS_LOGGED {
                prop_assert_eq!(got, want);
            }
        }
    }
}
