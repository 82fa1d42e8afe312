//! The impersonation leaves' private keys: software keys held in memory
//! (never the HSM's: a handshake signature per connection would stall on
//! it), one ECDSA P-256 and one RSA-2048 at a time, replaced on a schedule
//! by a thread of their own (RSA generation takes tens of milliseconds, far
//! too long for a packet worker). A minted certificate keeps the key it
//! was minted for; the certificate cache keys on the key's generation, so
//! certificates for a retired key are minted again.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Condvar, Mutex, RwLock,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use rustls::{
    pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer},
    sign::SigningKey,
};

use super::mint::{generate_leaf_key, LeafKey, LeafKind};

/// One leaf key pair.
pub struct Leaf {
    pub key: LeafKey,
    /// rustls's signer over it.
    pub signing: Arc<dyn SigningKey>,
    /// Increases with every key made (of either kind).
    pub generation: u64,
    pub born: Instant,
}

impl Leaf {
    fn generate(kind: LeafKind, generation: u64) -> Result<Leaf, String> {
        let key = generate_leaf_key(kind).map_err(|e| format!("leaf key: {e}"))?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.pkcs8.clone()));
        let signing = rustls::crypto::aws_lc_rs::default_provider()
            .key_provider
            .load_private_key(der)
            .map_err(|e| format!("leaf key: rustls cannot load it: {e}"))?;
        Ok(Leaf {
            key,
            signing,
            generation,
            born: Instant::now(),
        })
    }
}

/// The current leaf keys and the thread that replaces them.
pub struct LeafKeys {
    ec: RwLock<Arc<Leaf>>,
    rsa: RwLock<Arc<Leaf>>,
    next_generation: Mutex<u64>,
    stop: AtomicBool,
    park: (Mutex<()>, Condvar),
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl LeafKeys {
    /// Makes both keys now; with `rotate`, a thread replaces them that
    /// often.
    pub fn start(rotate: Option<Duration>) -> Result<Arc<LeafKeys>, String> {
        let keys = Arc::new(LeafKeys {
            ec: RwLock::new(Arc::new(Leaf::generate(LeafKind::EcP256, 1)?)),
            rsa: RwLock::new(Arc::new(Leaf::generate(LeafKind::Rsa2048, 2)?)),
            next_generation: Mutex::new(3),
            stop: AtomicBool::new(false),
            park: (Mutex::new(()), Condvar::new()),
            thread: Mutex::new(None),
        });
        if let Some(every) = rotate {
            let k = keys.clone();
            let t = std::thread::Builder::new()
                .name("loupe-leaf-keys".into())
                .spawn(move || k.run(every))
                .map_err(|e| format!("cannot start the leaf key thread: {e}"))?;
            *keys.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(t);
        }
        Ok(keys)
    }

    /// The key of `kind` new certificates are minted for.
    pub fn current(&self, kind: LeafKind) -> Arc<Leaf> {
        let cell = match kind {
            LeafKind::EcP256 => &self.ec,
            LeafKind::Rsa2048 => &self.rsa,
        };
        cell.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces both keys now.
    pub fn rotate(&self) -> Result<(), String> {
        for (kind, cell) in [(LeafKind::EcP256, &self.ec), (LeafKind::Rsa2048, &self.rsa)] {
            let generation = {
                let mut n = self
                    .next_generation
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                *n += 1;
                *n - 1
            };
            let leaf = Arc::new(Leaf::generate(kind, generation)?);
            *cell.write().unwrap_or_else(|p| p.into_inner()) = leaf;
        }
        Ok(())
    }

    fn run(&self, every: Duration) {
        let (lock, cv) = &self.park;
        let mut guard = lock.lock().unwrap_or_else(|p| p.into_inner());
        while !self.stop.load(Ordering::Acquire) {
            let (g, timeout) = cv
                .wait_timeout(guard, every)
                .unwrap_or_else(|p| p.into_inner());
            guard = g;
            if self.stop.load(Ordering::Acquire) {
                break;
            }
            if timeout.timed_out() {
                if let Err(e) = self.rotate() {
                    eprintln!("loupe-dataplane: warning: cannot rotate the leaf keys: {e}");
                }
            }
        }
    }

    /// Stops the rotation thread.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        {
            let _g = self.park.0.lock().unwrap_or_else(|p| p.into_inner());
            self.park.1.notify_all();
        }
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_gives_new_keys_of_both_kinds_with_new_generations() {
        let keys = LeafKeys::start(None).unwrap();
        let (ec, rsa) = (
            keys.current(LeafKind::EcP256),
            keys.current(LeafKind::Rsa2048),
        );
        assert_ne!(ec.generation, rsa.generation);
        keys.rotate().unwrap();
        let (ec2, rsa2) = (
            keys.current(LeafKind::EcP256),
            keys.current(LeafKind::Rsa2048),
        );
        assert!(ec2.generation > rsa.generation && rsa2.generation > ec2.generation);
        assert_ne!(ec.key.spki, ec2.key.spki);
        assert_ne!(rsa.key.spki, rsa2.key.spki);
        keys.stop();
    }

    #[test]
    fn stopping_does_not_wait_out_the_rotation_period() {
        // A period the test would never outlive: stop() must wake the
        // thread instead of waiting it out.
        let keys = LeafKeys::start(Some(Duration::from_secs(24 * 3600))).unwrap();
        keys.stop();
        assert!(keys.thread.lock().unwrap().is_none());
    }
}
