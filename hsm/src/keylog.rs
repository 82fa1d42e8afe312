//! Sealed key logs: TLS session secrets kept on disk encrypted, so that a
//! key log file read off the disk (a backup, a stolen drive) decrypts
//! nothing without the HSM.
//!
//! Envelope encryption. Once per engine run a random 256-bit data key is
//! made and sealed with the master key ([`crate::master`], on the token,
//! audited as `wrap`). Each key log file the run opens is a *segment*: a
//! random 16-byte id, and a key derived from the data key with HKDF-SHA256
//! (salt = the id), so no two files share an AES-GCM key. Each NSS key log
//! line is then sealed in software with AES-256-GCM: nonce = 0‖seq, the
//! additional data binds the id and the line's number, so lines cannot be
//! moved, dropped from the middle, or swapped between files unseen. Only
//! a cut at the end of a file goes unnoticed (as with any appended log).
//!
//! The file is text, one item per line, appended to across runs:
//!
//! ```text
//! # loupe sealed key log: `loupe keylog open FILE` prints it in the NSS key log format
//! S <segment id, hex> <the data key sealed by the master key, hex>
//! R <seq, 16 hex digits> <AES-256-GCM ciphertext and tag of one NSS line, hex>
//! ```
//!
//! [`open`] turns such a file back into NSS key log lines (for Wireshark),
//! opening each distinct sealed data key once (one audited `unwrap`).

use std::collections::HashMap;

use ring::{
    aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM},
    hkdf,
    rand::{SecureRandom, SystemRandom},
};
use zeroize::Zeroizing;

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

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

fn random<const N: usize>() -> Result<[u8; N], String> {
    let mut b = [0u8; N];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| "no randomness".to_string())?;
    Ok(b)
}

/// The segment's AES-256-GCM key: HKDF-SHA256 of the data key, salted
/// with the segment's id.
fn segment_key(data_key: &[u8], id: &[u8; ID_LEN]) -> Result<LessSafeKey, String> {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, id).extract(data_key);
    let okm = prk
        .expand(&[INFO], &AES_256_GCM)
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

    /// A new segment (for one file).
    pub fn segment(&self) -> Result<Segment, String> {
        let id = random::<ID_LEN>()?;
        Ok(Segment {
            key: segment_key(&self.key[..], &id)?,
            id,
            seq: 0,
            header: format!("S {} {}\n", hex(&id), hex(&self.sealed)),
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

/// The NSS key log lines a sealed key log holds. `unseal` opens a sealed
/// data key (the master key, for [`CONTEXT`]); it is asked once per
/// distinct key. Any line that is not what [`Segment`] wrote, a record
/// out of order or missing, or one that does not authenticate is an
/// error naming its line.
pub fn open(
    text: &str,
    mut unseal: impl FnMut(&[u8]) -> Result<Vec<u8>, String>,
) -> Result<String, String> {
    let mut keys: HashMap<Vec<u8>, Zeroizing<Vec<u8>>> = HashMap::new();
    let mut seg: Option<(LessSafeKey, [u8; ID_LEN], u64)> = None;
    let mut out = String::new();
    for (i, line) in text.lines().enumerate() {
        let at = |why: &str| format!("line {}: {why}", i + 1);
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let mut parts = line.split(' ');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("S"), Some(id), Some(sealed), None) => {
                let id: [u8; ID_LEN] = unhex(id)
                    .and_then(|v| v.try_into().ok())
                    .ok_or_else(|| at("a segment id is 16 bytes in hex"))?;
                let sealed = unhex(sealed).ok_or_else(|| at("the sealed key is not hex"))?;
                if !keys.contains_key(&sealed) {
                    let key = unseal(&sealed).map_err(|e| at(&e))?;
                    keys.insert(sealed.clone(), Zeroizing::new(key));
                }
                seg = Some((segment_key(&keys[&sealed], &id)?, id, 0));
            }
            (Some("R"), Some(seq), Some(sealed), None) => {
                let (key, id, next) = seg
                    .as_mut()
                    .ok_or_else(|| at("a record before any segment line"))?;
                let n = u64::from_str_radix(seq, 16).map_err(|_| at("a bad record number"))?;
                if n != *next {
                    return Err(at(&format!(
                        "record {n} where record {next} was due: records were removed or \
                         moved"
                    )));
                }
                let mut buf = unhex(sealed).ok_or_else(|| at("the record is not hex"))?;
                if buf.len() > MAX_LINE + AES_256_GCM.tag_len() {
                    return Err(at("the record is too long"));
                }
                let plain = key
                    .open_in_place(nonce(n), Aad::from(aad(id, n)), &mut buf)
                    .map_err(|_| {
                        at("the record does not authenticate (changed, or from another file)")
                    })?;
                let plain = std::str::from_utf8(plain).map_err(|_| at("not a key log line"))?;
                out.push_str(plain);
                *next += 1;
            }
            _ => return Err(at("not a line of a sealed key log")),
        }
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

    const L1: &str = "CLIENT_HANDSHAKE_TRAFFIC_SECRET 0011 aabb\n";
    const L2: &str = "SERVER_HANDSHAKE_TRAFFIC_SECRET 0011 ccdd\n";
    const L3: &str = "CLIENT_TRAFFIC_SECRET_0 2233 eeff\n";

    /// Two runs appending to one file, the second with two segments (two
    /// files of one run share a data key, never a segment key).
    fn file() -> String {
        let mut text = BANNER.to_string();
        let run1 = DataKey::new(toy_seal).unwrap();
        let mut s = run1.segment().unwrap();
        text += s.header();
        text += &s.seal(L1).unwrap();
        text += &s.seal(L2).unwrap();
        let run2 = DataKey::new(toy_seal).unwrap();
        let mut s = run2.segment().unwrap();
        text += s.header();
        text += &s.seal(L3).unwrap();
        text
    }

    #[test]
    fn sealed_lines_open_in_order_and_hold_no_secret_in_clear() {
        let text = file();
        for secret in ["aabb", "ccdd", "eeff", "CLIENT_", "0011"] {
            assert!(!text.contains(secret), "{secret} in clear:\n{text}");
        }
        let mut opens = 0;
        let got = open(&text, |b| {
            opens += 1;
            toy_open(b)
        })
        .unwrap();
        assert_eq!(got, format!("{L1}{L2}{L3}"));
        assert_eq!(opens, 2, "one unseal per distinct data key");
        // Two segments of one run: different ids, both open.
        let k = DataKey::new(toy_seal).unwrap();
        let (mut a, mut b) = (k.segment().unwrap(), k.segment().unwrap());
        assert_ne!(a.header(), b.header());
        let same = format!("{}{}", a.seal(L1).unwrap(), b.seal(L1).unwrap());
        assert_ne!(same.lines().next(), same.lines().nth(1));
    }

    #[test]
    fn a_changed_moved_or_removed_record_is_refused_with_its_line() {
        let text = file();
        let lines: Vec<&str> = text.lines().collect();
        // Line 3 is run 1's first record, 4 its second.
        let flip = |l: &str| {
            let mut c: Vec<char> = l.chars().collect();
            let last = c.len() - 1;
            c[last] = if c[last] == '0' { '1' } else { '0' };
            c.into_iter().collect::<String>()
        };
        let cases: Vec<(Vec<String>, &str)> = vec![
            (
                {
                    let mut v: Vec<String> = lines.iter().map(|s| s.to_string()).collect();
                    v[2] = flip(lines[2]);
                    v
                },
                "line 3: the record does not authenticate",
            ),
            (
                {
                    let mut v: Vec<String> = lines.iter().map(|s| s.to_string()).collect();
                    v.remove(2);
                    v
                },
                "line 3: record 1 where record 0 was due",
            ),
            (
                {
                    let mut v: Vec<String> = lines.iter().map(|s| s.to_string()).collect();
                    v.swap(2, 3);
                    v
                },
                "line 3: record 1 where record 0 was due",
            ),
            (
                {
                    // Run 2's record moved under run 1's segment, renumbered.
                    let mut v: Vec<String> = lines.iter().map(|s| s.to_string()).collect();
                    let moved = lines[5].replacen("R 0000000000000000", "R 0000000000000002", 1);
                    v.insert(4, moved);
                    v
                },
                "line 5: the record does not authenticate",
            ),
            (
                vec![lines[0].to_string(), lines[2].to_string()],
                "line 2: a record before any segment line",
            ),
            (
                vec!["CLIENT_RANDOM 00 11".to_string()],
                "line 1: not a line of a sealed key log",
            ),
        ];
        for (v, want) in cases {
            let e = open(&v.join("\n"), toy_open).unwrap_err();
            assert!(e.starts_with(want), "{e} (wanted {want})");
        }
        // A data key that does not open (another token's master key).
        let e = open(&text, |_| Err("sealed by another key".into())).unwrap_err();
        assert_eq!(e, "line 2: sealed by another key");
        // A cut at the end loses lines, nothing else.
        let cut = lines[..4].join("\n");
        assert_eq!(open(&cut, toy_open).unwrap(), format!("{L1}{L2}"));
    }
}
