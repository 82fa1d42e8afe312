//! Session ticket keys for the client legs (TLS 1.3 PSK tickets and TLS
//! 1.2 tickets): AES-256-GCM keys in memory, a new one every `lifetime`,
//! the one before still opening tickets. With `--ticket-keys FILE` they
//! are kept across restarts in FILE, sealed with the HSM's master key
//! (never on disk in clear): a client returning after a restart still
//! resumes, at no HSM signature.
//!
//! Rotation and sealing run on the context's own thread ([`TicketKeys::
//! tick`]), never inside a handshake: sealing asks the HSM, and a packet
//! worker never waits for it.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{SystemTime, UNIX_EPOCH},
};

use aws_lc_rs::{
    aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM},
    rand::{SecureRandom, SystemRandom},
};
use loupe_hsm::audit::hex;
use rustls::server::ProducesTickets;
use serde::{Deserialize, Serialize};

/// Seals and opens the keys for the file (the HSM's master key).
pub trait Sealer: Send + Sync {
    fn seal(&self, secret: &[u8]) -> Result<Vec<u8>, String>;
    fn open(&self, blob: &[u8]) -> Result<Vec<u8>, String>;
}

const ID_LEN: usize = 8;
const NONCE_LEN: usize = 12;
/// Most bytes a state file may hold.
const MAX_FILE: u64 = 64 << 10;

struct Key {
    id: [u8; ID_LEN],
    raw: [u8; 32],
    aead: LessSafeKey,
    /// Unix seconds it was made.
    born: u64,
}

impl Key {
    fn new(id: [u8; ID_LEN], raw: [u8; 32], born: u64) -> Result<Key, String> {
        let aead =
            LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &raw).map_err(|_| "a bad AES-256 key")?);
        Ok(Key {
            id,
            raw,
            aead,
            born,
        })
    }

    fn fresh(now: u64) -> Result<Key, String> {
        let rng = SystemRandom::new();
        let mut id = [0u8; ID_LEN];
        let mut raw = [0u8; 32];
        rng.fill(&mut id).map_err(|_| "no randomness")?;
        rng.fill(&mut raw).map_err(|_| "no randomness")?;
        Key::new(id, raw, now)
    }
}

impl Drop for Key {
    fn drop(&mut self) {
        // Best effort: the AEAD key inside aws-lc is freed by its own Drop.
        self.raw.iter_mut().for_each(|b| *b = 0);
    }
}

/// The file's contents, before sealing.
#[derive(Serialize, Deserialize)]
struct Saved {
    version: u32,
    keys: Vec<SavedKey>,
}

#[derive(Serialize, Deserialize)]
struct SavedKey {
    id: String,
    key: String,
    born: u64,
}

struct Keys {
    current: Key,
    previous: Option<Key>,
}

/// Where the keys are kept, and how.
struct Store {
    path: PathBuf,
    sealer: Arc<dyn Sealer>,
}

/// The ticket keys; see the module note.
pub struct TicketKeys {
    keys: RwLock<Keys>,
    /// Seconds between keys (and how long a ticket is good for).
    lifetime: u32,
    store: Option<Store>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn unhex<const N: usize>(s: &str) -> Result<[u8; N], String> {
    loupe_hsm::audit::unhex(s)
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| format!("{N} bytes in hex expected"))
}

impl TicketKeys {
    /// Keys in memory only.
    pub fn in_memory(lifetime: u32) -> Result<TicketKeys, String> {
        Ok(TicketKeys {
            keys: RwLock::new(Keys {
                current: Key::fresh(now_secs())?,
                previous: None,
            }),
            lifetime: lifetime.max(60),
            store: None,
        })
    }

    /// Keys kept in `path`, sealed by `sealer`: read from it if it holds
    /// keys still in use, else made and written. A file that cannot be
    /// opened (changed, sealed by another token's master key, the key
    /// gone) is moved aside to `<path>.unreadable` and fresh keys are
    /// made: clients then make full handshakes once. What happened is
    /// returned for the log.
    pub fn kept_in(
        path: &Path,
        sealer: Arc<dyn Sealer>,
        lifetime: u32,
    ) -> Result<(TicketKeys, String), String> {
        let lifetime = lifetime.max(60);
        let now = now_secs();
        let shown = path.display();
        let (keys, said) = match read_file(path) {
            Ok(None) => (
                None,
                format!("no ticket keys in {shown} yet: new ones made"),
            ),
            Ok(Some(blob)) => match sealer.open(&blob).and_then(|plain| parse(&plain)) {
                Ok(keys) => {
                    let live: Vec<Key> = keys
                        .into_iter()
                        .filter(|k| now.saturating_sub(k.born) < 2 * u64::from(lifetime))
                        .collect();
                    let n = live.len();
                    (
                        Some(live),
                        format!("ticket keys read from {shown} ({n} still in use)"),
                    )
                }
                Err(e) => {
                    let aside = path.with_extension("unreadable");
                    let moved = std::fs::rename(path, &aside)
                        .map(|_| format!("moved to {}", aside.display()))
                        .unwrap_or_else(|e| format!("not moved aside: {e}"));
                    (
                        None,
                        format!(
                            "warning: the ticket keys in {shown} cannot be read ({e}; {moved}): \
                             new ones made, returning clients make full handshakes once"
                        ),
                    )
                }
            },
            Err(e) => return Err(format!("ticket keys {shown}: {e}")),
        };
        let mut live = keys.unwrap_or_default();
        live.sort_by_key(|k| std::cmp::Reverse(k.born));
        let mut it = live.into_iter();
        let (current, previous) = match (it.next(), it.next()) {
            (Some(c), p) if now.saturating_sub(c.born) < u64::from(lifetime) => (c, p),
            (Some(c), _) => (Key::fresh(now)?, Some(c)),
            (None, _) => (Key::fresh(now)?, None),
        };
        let t = TicketKeys {
            keys: RwLock::new(Keys { current, previous }),
            lifetime,
            store: Some(Store {
                path: path.to_path_buf(),
                sealer,
            }),
        };
        t.save()?;
        Ok((t, said))
    }

    /// Rotates when the current key's time is up, and writes the file;
    /// called every few seconds by the context's thread. What happened,
    /// if anything.
    pub fn tick(&self) -> Option<Result<(), String>> {
        let now = now_secs();
        {
            let k = self.keys.read().unwrap_or_else(|p| p.into_inner());
            if now.saturating_sub(k.current.born) < u64::from(self.lifetime) {
                return None;
            }
        }
        let fresh = match Key::fresh(now) {
            Ok(k) => k,
            Err(e) => return Some(Err(e)),
        };
        {
            let mut k = self.keys.write().unwrap_or_else(|p| p.into_inner());
            let old = std::mem::replace(&mut k.current, fresh);
            k.previous = Some(old);
        }
        Some(self.save())
    }

    /// Seals the keys into the file (a new file renamed over the old).
    fn save(&self) -> Result<(), String> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        let saved = {
            let k = self.keys.read().unwrap_or_else(|p| p.into_inner());
            let mut keys = vec![&k.current];
            keys.extend(k.previous.as_ref());
            Saved {
                version: 1,
                keys: keys
                    .into_iter()
                    .map(|k| SavedKey {
                        id: hex(&k.id),
                        key: hex(&k.raw),
                        born: k.born,
                    })
                    .collect(),
            }
        };
        let mut plain = serde_json::to_vec(&saved).map_err(|e| e.to_string())?;
        let sealed = store.sealer.seal(&plain);
        plain.iter_mut().for_each(|b| *b = 0);
        let sealed = sealed?;
        write_private(&store.path, &sealed)
            .map_err(|e| format!("ticket keys {}: {e}", store.path.display()))
    }

    #[cfg(test)]
    fn age_by(&self, secs: u64) {
        let mut k = self.keys.write().unwrap();
        k.current.born = k.current.born.saturating_sub(secs);
        if let Some(p) = k.previous.as_mut() {
            p.born = p.born.saturating_sub(secs);
        }
    }
}

fn parse(plain: &[u8]) -> Result<Vec<Key>, String> {
    let saved: Saved = serde_json::from_slice(plain).map_err(|e| e.to_string())?;
    if saved.version != 1 {
        return Err(format!("version {} (this engine reads 1)", saved.version));
    }
    saved
        .keys
        .iter()
        .map(|k| Key::new(unhex(&k.id)?, unhex(&k.key)?, k.born))
        .collect()
}

/// The file's bytes; `None` if there is no file.
fn read_file(path: &Path) -> Result<Option<Vec<u8>>, String> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    if !meta.is_file() || meta.len() > MAX_FILE {
        return Err(format!(
            "not a regular file of at most {MAX_FILE} bytes (a link is refused)"
        ));
    }
    std::fs::read(path).map(Some).map_err(|e| e.to_string())
}

/// Writes `data` to `path` through a new private file renamed over it.
fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

impl std::fmt::Debug for TicketKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TicketKeys")
            .field("lifetime", &self.lifetime)
            .field(
                "kept",
                &self.store.as_ref().map(|s| s.path.display().to_string()),
            )
            .finish_non_exhaustive()
    }
}

impl ProducesTickets for TicketKeys {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        self.lifetime
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new().fill(&mut nonce).ok()?;
        let k = self.keys.read().unwrap_or_else(|p| p.into_inner());
        let key = &k.current;
        let mut out = Vec::with_capacity(ID_LEN + NONCE_LEN + plain.len() + 16);
        out.extend_from_slice(&key.id);
        out.extend_from_slice(&nonce);
        let mut body = plain.to_vec();
        key.aead
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(key.id),
                &mut body,
            )
            .ok()?;
        out.extend_from_slice(&body);
        Some(out)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        if cipher.len() < ID_LEN + NONCE_LEN + 16 {
            return None;
        }
        let (id, rest) = cipher.split_at(ID_LEN);
        let (nonce, body) = rest.split_at(NONCE_LEN);
        let k = self.keys.read().unwrap_or_else(|p| p.into_inner());
        let key = std::iter::once(&k.current)
            .chain(k.previous.as_ref())
            .find(|key| key.id == id)?;
        let mut body = body.to_vec();
        let plain = key
            .aead
            .open_in_place(
                Nonce::try_assume_unique_for_key(nonce).ok()?,
                Aad::from(key.id),
                &mut body,
            )
            .ok()?;
        Some(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A sealer that XORs and tags (tests only): opens what it sealed,
    /// refuses anything changed; counts its uses.
    #[derive(Default)]
    struct Toy {
        seals: AtomicUsize,
        key: u8,
    }

    impl Sealer for Toy {
        fn seal(&self, secret: &[u8]) -> Result<Vec<u8>, String> {
            self.seals.fetch_add(1, Ordering::SeqCst);
            let mut out: Vec<u8> = secret.iter().map(|b| b ^ self.key).collect();
            let sum = secret.iter().fold(0u8, |a, b| a.wrapping_add(*b));
            out.push(sum ^ self.key);
            Ok(out)
        }
        fn open(&self, blob: &[u8]) -> Result<Vec<u8>, String> {
            let (body, tag) = blob.split_at(blob.len().checked_sub(1).ok_or("empty")?);
            let plain: Vec<u8> = body.iter().map(|b| b ^ self.key).collect();
            let sum = plain.iter().fold(0u8, |a, b| a.wrapping_add(*b));
            (tag[0] == sum ^ self.key)
                .then_some(plain)
                .ok_or_else(|| "does not authenticate".into())
        }
    }

    fn dir() -> PathBuf {
        static N: AtomicUsize = AtomicUsize::new(0);
        let d = std::env::temp_dir().join(format!(
            "loupe-tickets-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn tickets_open_after_a_rotation_and_a_restart_but_not_after_two() {
        let d = dir();
        let path = d.join("tickets.sealed");
        let toy = Arc::new(Toy {
            key: 0x5a,
            ..Toy::default()
        });
        let (t, said) = TicketKeys::kept_in(&path, toy.clone(), 3600).unwrap();
        assert!(said.contains("new ones made"), "{said}");
        // Never in clear on disk; private.
        let raw = std::fs::read(&path).unwrap();
        {
            let k = t.keys.read().unwrap();
            assert!(!raw.windows(32).any(|w| w == k.current.raw));
            assert!(!String::from_utf8_lossy(&raw).contains(&hex(&k.current.raw)));
        }
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        let ticket = t.encrypt(b"session state").unwrap();
        assert_eq!(t.decrypt(&ticket).unwrap(), b"session state");
        let mut bad = ticket.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(t.decrypt(&bad).is_none());
        assert!(t.tick().is_none(), "not due");

        // A restart: the same keys from the file.
        drop(t);
        let (t, said) = TicketKeys::kept_in(&path, toy.clone(), 3600).unwrap();
        assert!(said.contains("read from"), "{said}");
        assert_eq!(t.decrypt(&ticket).unwrap(), b"session state");

        // One rotation: the old key still opens; the file is rewritten.
        t.age_by(3601);
        let seals = toy.seals.load(Ordering::SeqCst);
        t.tick().unwrap().unwrap();
        assert_eq!(toy.seals.load(Ordering::SeqCst), seals + 1);
        assert_eq!(t.decrypt(&ticket).unwrap(), b"session state");
        let newer = t.encrypt(b"newer").unwrap();
        // Two: the first key is gone.
        t.age_by(3601);
        t.tick().unwrap().unwrap();
        assert!(t.decrypt(&ticket).is_none());
        assert_eq!(t.decrypt(&newer).unwrap(), b"newer");

        // A changed file: moved aside, fresh keys, nothing opens.
        drop(t);
        let mut raw = std::fs::read(&path).unwrap();
        raw[3] ^= 0xff;
        std::fs::write(&path, &raw).unwrap();
        let (t, said) = TicketKeys::kept_in(&path, toy.clone(), 3600).unwrap();
        assert!(said.contains("cannot be read"), "{said}");
        assert!(path.with_extension("unreadable").exists());
        assert!(t.decrypt(&newer).is_none());
        // Another sealer (another token's master key): the same.
        drop(t);
        let other = Arc::new(Toy {
            key: 0x33,
            ..Toy::default()
        });
        let (_t, said) = TicketKeys::kept_in(&path, other, 3600).unwrap();
        assert!(said.contains("cannot be read"), "{said}");
        // A link in its place is refused.
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", &path).unwrap();
        let e = TicketKeys::kept_in(&path, toy, 3600).err().unwrap();
        assert!(e.contains("a link is refused"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
