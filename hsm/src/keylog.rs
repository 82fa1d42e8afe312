//! Sealed key logs: TLS session secrets kept on disk encrypted, so that a
//! key log file read off the disk (a backup, a stolen drive) decrypts
//! nothing without the HSM.
//!
//! Envelope encryption. Once per engine run a random 256-bit data key is
//! made and sealed with the master key ([`crate::master`], on the token,
//! audited as `wrap`). Each key log file the run opens is a *segment*: a
//! random 16-byte id, and a key derived from the data key with HKDF-SHA256
//! (salt = the id, info = the SHA-256 of the file's line before the
//! segment), so no two files share an AES-GCM key and a segment opens only
//! after the line it was appended after. Each NSS key log line is then
//! sealed in software with AES-256-GCM: nonce = 0‖seq, the additional data
//! binds the id and the line's number. So lines cannot be changed, moved,
//! duplicated, dropped from the middle, or spliced in from another file
//! unseen, nor whole segments; only a cut at the very end of the file goes
//! unnoticed (as with any appended log).
//!
//! The file is text, one item per line, appended to across runs:
//!
//! ```text
//! # loupe sealed key log: `loupe keylog open FILE` prints it in the NSS key log format
//! S <segment id> <the data key sealed by the master key> <SHA-256 of the line before>
//! R <seq, 16 hex digits> <AES-256-GCM ciphertext and tag of one NSS line>
//! ```
//!
//! (all in hex). [`open`] turns such a file back into NSS key log lines
//! (for Wireshark), opening each distinct sealed data key once (one
//! audited `unwrap`).

use std::{
    collections::{HashMap, HashSet},
    io::BufRead,
};

use ring::{
    aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM},
    hkdf,
    rand::{SecureRandom, SystemRandom},
};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::audit::{hex, unhex};

/// What the data key is sealed for (bound into the master key's seal).
pub const CONTEXT: &str = "tls key log";

/// The file's first line.
pub const BANNER: &str =
    "# loupe sealed key log: `loupe keylog open FILE` prints it in the NSS key log format\n";

const ID_LEN: usize = 16;
const INFO: &[u8] = b"loupe sealed key log v1";
/// Longest NSS key log line sealed (a label, 32-byte random, 48-byte
/// secret come to under 200 bytes).
const MAX_LINE: usize = 1024;
/// Longest line of a sealed key log: a record of [`MAX_LINE`] in hex,
/// with room to spare (a sealed data key is under 100 bytes).
pub const MAX_FILE_LINE: usize = 4 * MAX_LINE;

fn random<const N: usize>() -> Result<[u8; N], String> {
    let mut b = [0u8; N];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| "no randomness".to_string())?;
    Ok(b)
}

/// Whether the file at `path` starts as a sealed key log does (with the
/// banner). A regular file is assumed: callers check that first.
pub fn starts_sealed(path: &std::path::Path) -> bool {
    use std::io::Read;
    let mut head = vec![0u8; BANNER.len()];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok_and(|()| head == BANNER.as_bytes())
}

/// The SHA-256 of a line of the file, without its newline.
pub fn line_hash(line: &str) -> [u8; 32] {
    Sha256::digest(line.trim_end_matches('\n').as_bytes()).into()
}

/// The segment's AES-256-GCM key: HKDF-SHA256 of the data key, salted
/// with the segment's id, bound to the line it follows.
fn segment_key(data_key: &[u8], id: &[u8; ID_LEN], prev: &[u8; 32]) -> Result<LessSafeKey, String> {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, id).extract(data_key);
    let info = [INFO, &prev[..]];
    let okm = prk
        .expand(&info, &AES_256_GCM)
        .map_err(|_| "cannot derive a key".to_string())?;
    Ok(LessSafeKey::new(UnboundKey::from(okm)))
}

fn nonce(seq: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&seq.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

fn aad(id: &[u8; ID_LEN], seq: u64) -> Vec<u8> {
    let mut a = INFO.to_vec();
    a.extend_from_slice(id);
    a.extend_from_slice(&seq.to_be_bytes());
    a
}

/// One run's data key, and the master key's seal of it.
pub struct DataKey {
    key: Zeroizing<[u8; 32]>,
    sealed: Vec<u8>,
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey")
    }
}

impl DataKey {
    /// A fresh data key, sealed by `seal` (the master key, for
    /// [`CONTEXT`]).
    pub fn new(seal: impl FnOnce(&[u8]) -> Result<Vec<u8>, String>) -> Result<DataKey, String> {
        let key = Zeroizing::new(random::<32>()?);
        let sealed = seal(&key[..])?;
        Ok(DataKey { key, sealed })
    }

    /// A new segment (for one file), appended after the line `prev` (the
    /// banner, for a new file).
    pub fn segment(&self, prev: &str) -> Result<Segment, String> {
        let id = random::<ID_LEN>()?;
        let prev = line_hash(prev);
        Ok(Segment {
            key: segment_key(&self.key[..], &id, &prev)?,
            id,
            seq: 0,
            header: format!("S {} {} {}\n", hex(&id), hex(&self.sealed), hex(&prev)),
        })
    }
}

/// A file's segment: seals its lines in order.
pub struct Segment {
    key: LessSafeKey,
    id: [u8; ID_LEN],
    seq: u64,
    header: String,
}

impl Segment {
    /// The line that starts the segment in the file.
    pub fn header(&self) -> &str {
        &self.header
    }

    /// The file line sealing `line` (one NSS key log line), numbered next.
    pub fn seal(&mut self, line: &str) -> Result<String, String> {
        if line.len() > MAX_LINE {
            return Err(format!("a key log line of {} bytes", line.len()));
        }
        let seq = self.seq;
        let mut buf = line.as_bytes().to_vec();
        self.key
            .seal_in_place_append_tag(nonce(seq), Aad::from(aad(&self.id, seq)), &mut buf)
            .map_err(|_| "AES-GCM refused to seal".to_string())?;
        self.seq += 1;
        Ok(format!("R {seq:016x} {}\n", hex(&buf)))
    }
}

/// The NSS key log lines a sealed key log holds, read from `input`.
/// `unseal` opens a sealed data key (the master key, for [`CONTEXT`]); it
/// is asked once per distinct key. Any line that is not what [`Segment`]
/// wrote (or longer than [`MAX_FILE_LINE`]), a segment that does not
/// follow the line it was appended after or comes twice, a record out of
/// order or missing, or one that does not authenticate is an error naming
/// its line.
pub fn open(
    input: impl BufRead,
    mut unseal: impl FnMut(&[u8]) -> Result<Vec<u8>, String>,
) -> Result<String, String> {
    let mut keys: HashMap<Vec<u8>, Zeroizing<Vec<u8>>> = HashMap::new();
    let mut ids = HashSet::new();
    let mut seg: Option<(LessSafeKey, [u8; ID_LEN], u64)> = None;
    let mut out = String::new();
    let mut prev = [0u8; 32];
    let mut input = input.take(0);
    let mut n = 0usize;
    loop {
        n += 1;
        let at = |why: &str| format!("line {n}: {why}");
        let mut raw = Vec::new();
        input.set_limit(MAX_FILE_LINE as u64 + 1);
        input
            .read_until(b'\n', &mut raw)
            .map_err(|e| at(&format!("cannot read: {e}")))?;
        if raw.is_empty() {
            break;
        }
        if raw.last() != Some(&b'\n') {
            return Err(at(if raw.len() > MAX_FILE_LINE {
                "longer than any line of a sealed key log"
            } else {
                "cut short (no end of line)"
            }));
        }
        let line = std::str::from_utf8(&raw).map_err(|_| at("not text"))?;
        let line = line.trim_end_matches('\n');
        if n == 1 {
            if line != BANNER.trim_end_matches('\n') {
                return Err(at("not a sealed key log (no loupe banner)"));
            }
            prev = line_hash(line);
            continue;
        }
        let mut parts = line.split(' ');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some("S"), Some(id), Some(sealed), Some(after), None) => {
                let id: [u8; ID_LEN] = unhex(id)
                    .and_then(|v| v.try_into().ok())
                    .ok_or_else(|| at("a segment id is 16 bytes in hex"))?;
                if unhex(after).as_deref() != Some(&prev[..]) {
                    return Err(at(
                        "this segment does not follow the line it was appended after: lines \
                         were removed, moved or added before it",
                    ));
                }
                if !ids.insert(id) {
                    return Err(at("this segment came before: lines were copied"));
                }
                let sealed = unhex(sealed).ok_or_else(|| at("the sealed key is not hex"))?;
                if !keys.contains_key(&sealed) {
                    let key = unseal(&sealed).map_err(|e| at(&e))?;
                    keys.insert(sealed.clone(), Zeroizing::new(key));
                }
                seg = Some((segment_key(&keys[&sealed], &id, &prev)?, id, 0));
            }
            (Some("R"), Some(seq), Some(sealed), None, None) => {
                let (key, id, next) = seg
                    .as_mut()
                    .ok_or_else(|| at("a record before any segment line"))?;
                let r = u64::from_str_radix(seq, 16).map_err(|_| at("a bad record number"))?;
                if r != *next {
                    return Err(at(&format!(
                        "record {r} where record {next} was due: records were removed or moved"
                    )));
                }
                let mut buf = unhex(sealed).ok_or_else(|| at("the record is not hex"))?;
                let plain = key
                    .open_in_place(nonce(r), Aad::from(aad(id, r)), &mut buf)
                    .map_err(|_| {
                        at("the record does not authenticate (changed, or from another file)")
                    })?;
                let plain = std::str::from_utf8(plain).map_err(|_| at("not a key log line"))?;
                out.push_str(plain);
                *next += 1;
            }
            _ => return Err(at("not a line of a sealed key log")),
        }
        prev = line_hash(line);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A toy master key: XOR with a constant, prefixed (tests only).
    fn toy_seal(k: &[u8]) -> Result<Vec<u8>, String> {
        let mut v = b"toy".to_vec();
        v.extend(k.iter().map(|b| b ^ 0x5a));
        Ok(v)
    }

    fn toy_open(b: &[u8]) -> Result<Vec<u8>, String> {
        let rest = b.strip_prefix(b"toy").ok_or("not toy-sealed")?;
        Ok(rest.iter().map(|b| b ^ 0x5a).collect())
    }

    fn last_line(text: &str) -> &str {
        text.trim_end_matches('\n').rsplit('\n').next().unwrap()
    }

    // Client randoms and secrets long enough (32 hex digits) that the
    // ciphertext's random hex cannot contain one by chance: with four
    // digits, "0011" turned up in about one run in a hundred.
    const L1: &str = "CLIENT_HANDSHAKE_TRAFFIC_SECRET 00110011001100110011001100110011 aabbaabbaabbaabbaabbaabbaabbaabb\n";
    const L2: &str = "SERVER_HANDSHAKE_TRAFFIC_SECRET 00110011001100110011001100110011 ccddccddccddccddccddccddccddccdd\n";
    const L3: &str = "CLIENT_TRAFFIC_SECRET_0 22332233223322332233223322332233 eeffeeffeeffeeffeeffeeffeeffeeff\n";

    /// Appends a run's segment with `lines` to `text`, as the engine does.
    fn append(text: &mut String, lines: &[&str]) {
        let run = DataKey::new(toy_seal).unwrap();
        let mut s = run.segment(last_line(text)).unwrap();
        text.push_str(s.header());
        for l in lines {
            text.push_str(&s.seal(l).unwrap());
        }
    }

    /// Two runs appending to one file: lines 2-4 and 5-6.
    fn file() -> String {
        let mut text = BANNER.to_string();
        append(&mut text, &[L1, L2]);
        append(&mut text, &[L3]);
        text
    }

    fn open_str(text: &str) -> Result<String, String> {
        open(text.as_bytes(), toy_open)
    }

    #[test]
    fn sealed_lines_open_in_order_and_hold_no_secret_in_clear() {
        let text = file();
        for secret in [
            "aabbaabbaabbaabbaabbaabbaabbaabb",
            "ccddccddccddccddccddccddccddccdd",
            "eeffeeffeeffeeffeeffeeffeeffeeff",
            "CLIENT_",
            "00110011001100110011001100110011",
        ] {
            assert!(!text.contains(secret), "{secret} in clear:\n{text}");
        }
        let mut opens = 0;
        let got = open(text.as_bytes(), |b| {
            opens += 1;
            toy_open(b)
        })
        .unwrap();
        assert_eq!(got, format!("{L1}{L2}{L3}"));
        assert_eq!(opens, 2, "one unseal per distinct data key");
        // Two segments of one run (two files): different ids and keys.
        let k = DataKey::new(toy_seal).unwrap();
        let (mut a, mut b) = (k.segment("x").unwrap(), k.segment("x").unwrap());
        assert_ne!(a.header(), b.header());
        assert_ne!(a.seal(L1).unwrap(), b.seal(L1).unwrap());
        // A cut at the end loses the lines cut, nothing else.
        let cut: Vec<&str> = text.lines().take(4).collect();
        assert_eq!(
            open_str(&(cut.join("\n") + "\n")).unwrap(),
            format!("{L1}{L2}")
        );
    }

    #[test]
    fn a_changed_moved_removed_or_spliced_line_is_refused_with_its_number() {
        let text = file();
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        let join = |v: &[String]| v.join("\n") + "\n";
        let flip = |l: &str| {
            let mut c: Vec<char> = l.chars().collect();
            let last = c.len() - 1;
            c[last] = if c[last] == '0' { '1' } else { '0' };
            c.into_iter().collect::<String>()
        };
        let edit = |f: &dyn Fn(&mut Vec<String>)| {
            let mut v = lines.clone();
            f(&mut v);
            join(&v)
        };
        let mut other = BANNER.to_string();
        append(&mut other, &[L3]);
        let other: Vec<String> = other.lines().map(str::to_string).collect();
        let cases: Vec<(String, &str)> = vec![
            (
                edit(&|v| v[2] = flip(&v[2])),
                "line 3: the record does not authenticate",
            ),
            (
                edit(&|v| drop(v.remove(2))),
                "line 3: record 1 where record 0 was due",
            ),
            (
                edit(&|v| v.swap(2, 3)),
                "line 3: record 1 where record 0 was due",
            ),
            // The end of run 1's segment removed, run 2's kept.
            (
                edit(&|v| drop(v.remove(3))),
                "line 4: this segment does not follow",
            ),
            // Run 1's segment removed whole.
            (
                edit(&|v| drop(v.drain(1..4))),
                "line 2: this segment does not follow",
            ),
            // Run 2's segment twice.
            (
                edit(&|v| v.extend(lines[4..6].to_vec())),
                "line 7: this segment does not follow",
            ),
            // Another file's segment appended.
            (
                edit(&|v| v.extend(other[1..].to_vec())),
                "line 7: this segment does not follow",
            ),
            // The segments swapped.
            (
                join(&[&lines[..1], &lines[4..6], &lines[1..4]].concat()),
                "line 2: this segment does not follow",
            ),
            (
                join(&[lines[0].clone(), lines[2].clone()]),
                "line 2: a record before any segment line",
            ),
            (
                "CLIENT_RANDOM 00 11\n".to_string(),
                "line 1: not a sealed key log",
            ),
            (
                text.trim_end_matches('\n')[..text.len() - 10].to_string(),
                "line 6: cut short",
            ),
            (
                format!("{}R {}\n", BANNER, "0".repeat(MAX_FILE_LINE)),
                "line 2: longer than any line",
            ),
        ];
        for (t, want) in cases {
            let e = open_str(&t).unwrap_err();
            assert!(e.starts_with(want), "{e} (wanted {want})");
        }
        // A data key that does not open (another token's master key).
        let e = open(text.as_bytes(), |_| Err("sealed by another key".into())).unwrap_err();
        assert_eq!(e, "line 2: sealed by another key");
        // A segment copied with its own line before it still refuses the
        // copy: ids are unique in a file.
        let mut twice = lines.clone();
        twice.extend(lines[3..6].to_vec());
        let e = open_str(&join(&twice)).unwrap_err();
        assert!(e.starts_with("line 7:"), "{e}");
    }
}
