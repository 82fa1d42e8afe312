//! Minted certificates, shared by every worker: a bounded LRU keyed by what
//! decides the certificate (the upstream leaf's SHA-256, the CA that signs
//! it and its generation, the leaf key), with single flight: concurrent
//! misses for one key wait on one HSM signature. A hit costs no HSM
//! operation; a CA rotation or a new leaf key is a new key, so stale
//! certificates are never served, only aged out.
//!
//! The lock is held for a lookup or an insert only: building the TBS and
//! submitting it to the signer never block, and assembling the
//! certificate happens under the slot's own lock, not the cache's.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    task::Waker,
    time::{Duration, Instant},
};

use rustls::{pki_types::CertificateDer, sign::CertifiedKey};

use super::{
    context::CaEntry,
    keys::Leaf,
    mint::{assemble, check_signature, Tbs},
};

/// How long a certificate minted already expired (mirroring an expired
/// site) is served from the cache.
const BORN_EXPIRED_TTL: i64 = 24 * 3600;

/// What decides a minted certificate.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CacheKey {
    /// SHA-256 of the upstream leaf (DER).
    pub upstream: [u8; 32],
    /// The token the CA is on (tenants' CAs share labels).
    pub token: String,
    /// The CA's key label (names role, flavor and generation).
    pub ca: String,
    /// The leaf key's generation.
    pub leaf: u64,
    /// Minted with the CN appended to the SANs.
    pub append_cn: bool,
}

/// A certificate ready to present.
pub struct Minted {
    pub certified: Arc<CertifiedKey>,
    pub ca: Arc<CaEntry>,
    /// Unix seconds after which a hit is a miss: the leaf's notAfter, or,
    /// for a leaf that mirrors an already expired certificate (and was
    /// born expired), a day after it was minted. Without that, every
    /// connection to an expired site would cost a signature.
    pub stale_after: i64,
    /// How long the mint took, submission to certificate.
    pub took: Duration,
}

/// Why a mint failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MintFailure {
    /// The HSM refused or could not answer (down, queue full, timed out).
    Hsm(String),
    /// The signature did not verify, or the certificate could not be built.
    Bad(String),
}

impl MintFailure {
    pub fn reason(&self) -> &str {
        match self {
            MintFailure::Hsm(r) | MintFailure::Bad(r) => r,
        }
    }
}

/// A signature on its way (the HSM signer's ticket).
pub trait PendingSignature: Send {
    /// The signature or the signer's error, once it is in (once).
    fn try_take(&self) -> Option<Result<Vec<u8>, String>>;
}

impl PendingSignature for loupe_hsm::signer::Ticket {
    fn try_take(&self) -> Option<Result<Vec<u8>, String>> {
        loupe_hsm::signer::Ticket::try_take(self).map(|r| r.map_err(|e| e.to_string()))
    }
}

/// Where CA signatures come from: the HSM signer service (a software
/// signer in tests). Submitting never blocks.
pub trait CaSigner: Send + Sync {
    /// Queues `req`; `waker` is called (once per batch) when it is done.
    fn submit(
        &self,
        req: loupe_hsm::signer::Request,
        waker: Option<Waker>,
    ) -> Result<Box<dyn PendingSignature>, String>;
    /// Whether `token` would take a request now.
    fn is_up(&self, token: &str) -> bool;
}

impl CaSigner for loupe_hsm::signer::SignerHandle {
    fn submit(
        &self,
        req: loupe_hsm::signer::Request,
        waker: Option<Waker>,
    ) -> Result<Box<dyn PendingSignature>, String> {
        loupe_hsm::signer::SignerHandle::submit(self, req, waker)
            .map(|t| Box::new(t) as Box<dyn PendingSignature>)
            .map_err(|e| e.to_string())
    }

    fn is_up(&self, token: &str) -> bool {
        loupe_hsm::signer::SignerHandle::is_up(self, token)
    }
}

/// A mint in flight: the signer's ticket and what is needed to finish.
pub struct MintSlot {
    key: CacheKey,
    state: Mutex<SlotState>,
    /// Workers with connections waiting here (each woken once).
    waiters: Mutex<Vec<Waker>>,
    started: Instant,
    deadline: Instant,
}

enum SlotState {
    Signing {
        ticket: Box<dyn PendingSignature>,
        tbs: Tbs,
        ca: Arc<CaEntry>,
        leaf: Arc<Leaf>,
        not_after: i64,
    },
    Done(Result<Arc<Minted>, MintFailure>),
}

impl MintSlot {
    /// When the HSM's answer is given up on.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Has the signer's worker also wake `waker` when the mint is done.
    pub fn wait_with(&self, waker: &Waker) {
        let mut w = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        if !w.iter().any(|o| o.will_wake(waker)) {
            w.push(waker.clone());
        }
    }

    /// The result, once there is one; finishes the certificate when the
    /// signature has arrived (whichever waiting worker sees it first).
    pub fn poll(
        &self,
        cache: &CertCache,
        now: Instant,
    ) -> Option<Result<Arc<Minted>, MintFailure>> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let done = match &*st {
            SlotState::Done(r) => return Some(r.clone()),
            SlotState::Signing { ticket, .. } => match ticket.try_take() {
                Some(Ok(sig)) => {
                    let SlotState::Signing {
                        tbs,
                        ca,
                        leaf,
                        not_after,
                        ..
                    } = std::mem::replace(
                        &mut *st,
                        SlotState::Done(Err(MintFailure::Bad("in progress".into()))),
                    )
                    else {
                        unreachable!("matched above")
                    };
                    self.finish(&tbs, &sig, ca, &leaf, not_after)
                }
                Some(Err(e)) => Err(MintFailure::Hsm(e)),
                None if now >= self.deadline => Err(MintFailure::Hsm(format!(
                    "the HSM did not answer within {} ms",
                    self.deadline.duration_since(self.started).as_millis()
                ))),
                None => return None,
            },
        };
        *st = SlotState::Done(done.clone());
        drop(st);
        cache.settle(&self.key, &done);
        for w in self
            .waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            w.wake();
        }
        Some(done)
    }

    fn finish(
        &self,
        tbs: &Tbs,
        sig: &[u8],
        ca: Arc<CaEntry>,
        leaf: &Leaf,
        not_after: i64,
    ) -> Result<Arc<Minted>, MintFailure> {
        let cert = assemble(tbs, sig);
        // A signature that does not verify never reaches a client (a
        // confused token, a key with the wrong label).
        check_signature(&cert, &ca.issuer)
            .map_err(|e| MintFailure::Bad(format!("the HSM's signature does not verify: {e}")))?;
        let chain = vec![CertificateDer::from(cert), ca.der.clone()];
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        Ok(Arc::new(Minted {
            certified: Arc::new(CertifiedKey::new(chain, leaf.signing.clone())),
            ca,
            stale_after: if not_after > now {
                not_after
            } else {
                now + BORN_EXPIRED_TTL
            },
            took: self.started.elapsed(),
        }))
    }
}

/// What a lookup found.
pub enum Lookup {
    Hit(Arc<Minted>),
    /// Minting (by this lookup or an earlier one): wait on the slot.
    Wait {
        slot: Arc<MintSlot>,
        started: bool,
    },
}

/// How a miss is minted: the caller builds the TBS and submits it.
pub struct MintStart {
    pub ticket: Box<dyn PendingSignature>,
    pub tbs: Tbs,
    pub ca: Arc<CaEntry>,
    pub leaf: Arc<Leaf>,
    pub not_after: i64,
    pub timeout: Duration,
}

enum Entry {
    Ready { minted: Arc<Minted>, stamp: u64 },
    Pending(Arc<MintSlot>),
}

struct Inner {
    map: HashMap<CacheKey, Entry>,
    /// Ready entries by last use, oldest first.
    lru: BTreeMap<u64, CacheKey>,
    next: u64,
}

/// Counters the metrics show.
#[derive(Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    /// Lookups that joined a mint already in flight.
    pub joined: AtomicU64,
    pub minted: AtomicU64,
    pub failed: AtomicU64,
    pub evicted: AtomicU64,
}

/// The shared certificate cache.
pub struct CertCache {
    inner: Mutex<Inner>,
    capacity: usize,
    pub stats: CacheStats,
}

impl CertCache {
    pub fn new(capacity: usize) -> CertCache {
        CertCache {
            inner: Mutex::new(Inner {
                map: HashMap::new(),
                lru: BTreeMap::new(),
                next: 0,
            }),
            capacity: capacity.max(1),
            stats: CacheStats::default(),
        }
    }

    /// Ready certificates held.
    pub fn len(&self) -> usize {
        self.lock().lru.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A certificate for `key`: a hit, a mint already in flight, or a new
    /// mint started by `start` (which must not block). `now_unix` ages out
    /// certificates past their notAfter.
    pub fn lookup(
        &self,
        key: CacheKey,
        now_unix: i64,
        start: impl FnOnce() -> Result<MintStart, MintFailure>,
    ) -> Result<Lookup, MintFailure> {
        let mut g = self.lock();
        let inner = &mut *g;
        match inner.map.get_mut(&key) {
            Some(Entry::Ready { minted, stamp }) if minted.stale_after > now_unix => {
                let minted = minted.clone();
                inner.lru.remove(stamp);
                *stamp = inner.next;
                inner.lru.insert(inner.next, key);
                inner.next += 1;
                self.stats.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(Lookup::Hit(minted));
            }
            Some(Entry::Pending(slot)) => {
                self.stats.joined.fetch_add(1, Ordering::Relaxed);
                return Ok(Lookup::Wait {
                    slot: slot.clone(),
                    started: false,
                });
            }
            Some(Entry::Ready { stamp, .. }) => {
                inner.lru.remove(stamp);
                inner.map.remove(&key);
            }
            None => {}
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        let s = match start() {
            Ok(s) => s,
            Err(e) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
        };
        let now = Instant::now();
        let slot = Arc::new(MintSlot {
            key: key.clone(),
            state: Mutex::new(SlotState::Signing {
                ticket: s.ticket,
                tbs: s.tbs,
                ca: s.ca,
                leaf: s.leaf,
                not_after: s.not_after,
            }),
            waiters: Mutex::new(Vec::new()),
            started: now,
            deadline: now + s.timeout,
        });
        inner.map.insert(key, Entry::Pending(slot.clone()));
        Ok(Lookup::Wait {
            slot,
            started: true,
        })
    }

    /// A mint ended: a certificate becomes a ready entry (the least
    /// recently used one makes room); a failure leaves nothing behind, so
    /// the next connection tries again.
    fn settle(&self, key: &CacheKey, result: &Result<Arc<Minted>, MintFailure>) {
        let mut g = self.lock();
        let inner = &mut *g;
        if !matches!(inner.map.get(key), Some(Entry::Pending(_))) {
            return;
        }
        match result {
            Ok(minted) => {
                self.stats.minted.fetch_add(1, Ordering::Relaxed);
                while inner.lru.len() >= self.capacity {
                    let Some((_, old)) = inner.lru.pop_first() else {
                        break;
                    };
                    inner.map.remove(&old);
                    self.stats.evicted.fetch_add(1, Ordering::Relaxed);
                }
                let stamp = inner.next;
                inner.next += 1;
                inner.lru.insert(stamp, key.clone());
                inner.map.insert(
                    key.clone(),
                    Entry::Ready {
                        minted: minted.clone(),
                        stamp,
                    },
                );
            }
            Err(_) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                inner.map.remove(key);
            }
        }
    }

    /// Forgets every certificate (the CA changed).
    pub fn clear(&self) {
        let mut g = self.lock();
        g.map.retain(|_, e| matches!(e, Entry::Pending(_)));
        g.lru.clear();
    }
}
