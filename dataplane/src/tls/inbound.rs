//! SSL inbound inspection's server side: the organisation's own server as
//! the engine presents it to clients, with the server's certificate chain
//! and its private key on the HSM ([`HsmKey`]), and the handshake pool
//! that runs the client handshakes needing that key.
//!
//! rustls signs synchronously inside `Accepted::into_connection` (TLS 1.3
//! CertificateVerify, TLS 1.2 ServerKeyExchange), so a connection whose
//! handshake needs the HSM is handed to a pool thread: its signature is
//! submitted to the HSM signer service like any other and the thread waits
//! for it (within the HSM deadline), then the connection goes back to its
//! worker, which was woken. Many handshakes wait at once, so the HSM
//! threads batch them. A packet worker never waits: [`HsmKey`] refuses to
//! sign anywhere but on a pool thread.
//!
//! A resumed handshake (a ticket or session ID the engine issued) signs
//! nothing, so a returning client costs no HSM operation.

use std::{
    cell::RefCell,
    fmt,
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    task::{Wake, Waker},
    thread::{JoinHandle, Thread},
    time::{Duration, Instant},
};

use crossbeam::channel::{self, Receiver, Sender, TrySendError};
use loupe_hsm::{mech::SignMech, signer::Request};
use rustls::{
    pki_types::{pem::PemObject, CertificateDer},
    server::{Accepted, ServerConnection},
    sign::{CertifiedKey, Signer, SigningKey},
    ServerConfig, SignatureAlgorithm, SignatureScheme,
};

use super::{cache::CaSigner, verify::leaf_info};
use crate::policy::ServerProfile;

/// The key types a server key may have (what `loupe key` makes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerKeyKind {
    EcP256,
    EcP384,
    Rsa,
}

/// Longest chain file read.
const MAX_CHAIN_FILE: u64 = 1 << 20;

thread_local! {
    /// On a handshake pool thread: who the signature is for (the audit
    /// log's requester). `None` everywhere else.
    static POOL_JOB: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// A server's private key on the HSM, as rustls signs with it. Every
/// signature is a request to the HSM signer service (audited there).
pub struct HsmKey {
    inner: Arc<KeyInner>,
}

struct KeyInner {
    signer: Arc<dyn CaSigner>,
    token: String,
    /// The label on the token (`loupe-server/<key>`).
    label: String,
    kind: ServerKeyKind,
    timeout: Duration,
    /// The certificate's public key (the SPKI's BIT STRING): every
    /// signature is checked against it before it is used.
    public: Vec<u8>,
}

impl fmt::Debug for HsmKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HsmKey")
            .field("token", &self.inner.token)
            .field("label", &self.inner.label)
            .field("kind", &self.inner.kind)
            .finish()
    }
}

/// One chosen scheme of an [`HsmKey`].
struct HsmSigner {
    inner: Arc<KeyInner>,
    scheme: SignatureScheme,
    mech: SignMech,
}

impl fmt::Debug for HsmSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HsmSigner")
            .field("label", &self.inner.label)
            .field("scheme", &self.scheme)
            .finish()
    }
}

/// Wakes the thread waiting for its signature.
struct Unpark(Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

impl KeyInner {
    /// Signs `message` on the HSM, waiting for the answer: only on a
    /// handshake pool thread.
    fn sign(&self, mech: SignMech, message: &[u8], purpose: &str) -> Result<Vec<u8>, String> {
        let requester = POOL_JOB
            .with(|j| j.borrow().clone())
            .ok_or("an HSM signature was asked for outside the handshake pool: refused")?;
        let sig = self.sign_blocking(mech, message, purpose, requester)?;
        // A key replaced on the token since the profile was proven would
        // sign what no client can verify: caught here, with the reason.
        self.verify(mech, message, &sig).map_err(|_| {
            format!(
                "the key {:?} on token {:?} is no longer the key of the certificate (replaced \
                 on the token?): fix it and apply the policy again",
                self.label, self.token
            )
        })?;
        Ok(sig)
    }

    /// Checks `sig` over `message` with the certificate's public key.
    fn verify(&self, mech: SignMech, message: &[u8], sig: &[u8]) -> Result<(), ()> {
        use aws_lc_rs::signature as v;
        let alg: &dyn v::VerificationAlgorithm = match mech {
            SignMech::EcdsaP256Sha256 => &v::ECDSA_P256_SHA256_ASN1,
            SignMech::EcdsaP384Sha384 => &v::ECDSA_P384_SHA384_ASN1,
            SignMech::RsaPssSha256 => &v::RSA_PSS_2048_8192_SHA256,
            SignMech::RsaPssSha384 => &v::RSA_PSS_2048_8192_SHA384,
            SignMech::RsaPkcs1Sha256 => &v::RSA_PKCS1_2048_8192_SHA256,
            SignMech::RsaPkcs1Sha384 => &v::RSA_PKCS1_2048_8192_SHA384,
        };
        v::UnparsedPublicKey::new(alg, &self.public)
            .verify(message, sig)
            .map_err(|_| ())
    }

    fn sign_blocking(
        &self,
        mech: SignMech,
        message: &[u8],
        purpose: &str,
        requester: String,
    ) -> Result<Vec<u8>, String> {
        let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
        let ticket = self.signer.submit(
            Request {
                token: self.token.clone(),
                key: self.label.clone(),
                mech,
                message: message.to_vec(),
                purpose: purpose.into(),
                requester,
                timeout: Some(self.timeout),
            },
            Some(waker),
        )?;
        // The signer answers by its deadline, unless its HSM thread is
        // stuck in a hung token: then this wait is what ends it.
        let deadline = Instant::now() + self.timeout;
        loop {
            if let Some(r) = ticket.try_take() {
                return r;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!(
                    "the HSM did not answer within {} ms",
                    self.timeout.as_millis()
                ));
            }
            std::thread::park_timeout(deadline - now);
        }
    }
}

impl SigningKey for HsmKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        use SignatureScheme as S;
        let prefs: &[(SignatureScheme, SignMech)] = match self.inner.kind {
            ServerKeyKind::EcP256 => &[(S::ECDSA_NISTP256_SHA256, SignMech::EcdsaP256Sha256)],
            ServerKeyKind::EcP384 => &[(S::ECDSA_NISTP384_SHA384, SignMech::EcdsaP384Sha384)],
            ServerKeyKind::Rsa => &[
                (S::RSA_PSS_SHA256, SignMech::RsaPssSha256),
                (S::RSA_PSS_SHA384, SignMech::RsaPssSha384),
                (S::RSA_PKCS1_SHA256, SignMech::RsaPkcs1Sha256),
                (S::RSA_PKCS1_SHA384, SignMech::RsaPkcs1Sha384),
            ],
        };
        prefs
            .iter()
            .find(|(s, _)| offered.contains(s))
            .map(|&(scheme, mech)| {
                Box::new(HsmSigner {
                    inner: self.inner.clone(),
                    scheme,
                    mech,
                }) as Box<dyn Signer>
            })
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        match self.inner.kind {
            ServerKeyKind::Rsa => SignatureAlgorithm::RSA,
            _ => SignatureAlgorithm::ECDSA,
        }
    }
}

impl Signer for HsmSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        self.inner
            .sign(
                self.mech,
                message,
                "TLS handshake signature (inbound inspection)",
            )
            .map_err(|e| rustls::Error::General(format!("HSM signature failed: {e}")))
    }

    fn scheme(&self) -> SignatureScheme {
        self.scheme
    }
}

/// A server profile, prepared: the chain read, the key on the HSM.
pub struct ServerRuntime {
    pub name: String,
    pub profile: ServerProfile,
    /// The token holding the key.
    pub token: String,
    /// The chain with its HSM key, as every handshake presents it.
    pub certified: Arc<CertifiedKey>,
    /// What the key is (`ec-p256`, `rsa-2048`), for the log.
    pub key_kind: String,
}

impl ServerRuntime {
    /// The leaf certificate (what a pinned server must present).
    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.certified.cert[0]
    }

    /// `token/label`, for the log.
    pub fn key_name(&self) -> String {
        format!("{}/{}", self.token, self.profile.key)
    }

    /// Reads the chain file and binds its leaf to the key on the token.
    /// When the token takes requests, one signature proves that the key is
    /// there and is the leaf's (a test message, audited); a token that is
    /// down is not held against the profile (its handshakes fail until
    /// the token is back).
    pub fn prepare(
        name: &str,
        p: &ServerProfile,
        default_token: Option<&str>,
        signer: Option<&Arc<dyn CaSigner>>,
        timeout: Duration,
    ) -> Result<ServerRuntime, String> {
        let chain =
            read_chain(Path::new(&p.chain)).map_err(|e| format!("chain file {}: {e}", p.chain))?;
        let info = leaf_info(chain[0].as_ref())
            .map_err(|e| format!("the leaf certificate of {}: {e}", p.chain))?;
        let kind = match info.key.as_str() {
            "ec-p256" => ServerKeyKind::EcP256,
            "ec-p384" => ServerKeyKind::EcP384,
            k if k.starts_with("rsa-") => ServerKeyKind::Rsa,
            k => {
                return Err(format!(
                    "the leaf certificate of {} has a {k} key: server keys are EC P-256, \
                     EC P-384 or RSA",
                    p.chain
                ))
            }
        };
        let token = p
            .token
            .as_deref()
            .or(default_token)
            .ok_or("no token: the engine runs without --hsm-token")?
            .to_string();
        let signer = signer.ok_or("the engine runs without an HSM")?;
        let label = loupe_hsm::server_keys::token_label(&p.key).map_err(|e| e.to_string())?;
        let (_, cert) = x509_parser::parse_x509_certificate(chain[0].as_ref())
            .map_err(|e| format!("the leaf certificate of {}: {e}", p.chain))?;
        let inner = Arc::new(KeyInner {
            signer: signer.clone(),
            token: token.clone(),
            label,
            kind,
            timeout,
            public: cert.public_key().subject_public_key.data.to_vec(),
        });
        if signer.is_up(&token) {
            prove(&inner).map_err(|e| {
                format!(
                    "key {:?} on token {token:?} cannot serve {}: {e}",
                    p.key, p.chain
                )
            })?;
        } else {
            eprintln!(
                "loupe-dataplane: warning: server profile {name:?}: token {token:?} is down, so \
                 its key is not checked against {}",
                p.chain
            );
        }
        Ok(ServerRuntime {
            name: name.to_string(),
            profile: p.clone(),
            token,
            certified: Arc::new(CertifiedKey::new(chain, Arc::new(HsmKey { inner }))),
            key_kind: info.key,
        })
    }
}

/// The certificates of a PEM chain file, leaf first (the error does not
/// name the file: the caller does).
pub fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if !meta.is_file() || meta.len() > MAX_CHAIN_FILE {
        return Err(format!(
            "not a regular file of at most {MAX_CHAIN_FILE} bytes"
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let chain = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM certificates: {e:?}"))?;
    if chain.is_empty() {
        return Err("no certificate in it".into());
    }
    let mut parsed = Vec::new();
    for (i, c) in chain.iter().enumerate() {
        match x509_parser::parse_x509_certificate(c.as_ref()) {
            Ok(([], cert)) => parsed.push(cert),
            Ok(_) => return Err(format!("certificate {}: bytes after its end", i + 1)),
            Err(e) => {
                return Err(format!(
                    "certificate {}: not a DER X.509 certificate ({e})",
                    i + 1
                ))
            }
        }
    }
    let key = leaf_info(chain[0].as_ref()).map_err(|e| e.to_string())?.key;
    let rsa_bits = key.strip_prefix("rsa-").and_then(|b| b.parse::<u32>().ok());
    if !(key == "ec-p256" || key == "ec-p384" || rsa_bits.is_some_and(|b| b >= 2048)) {
        return Err(format!(
            "the leaf (the first certificate) has a key of type {key}: server keys are EC \
             P-256, EC P-384 or RSA of 2048 bits or more"
        ));
    }
    for (i, pair) in parsed.windows(2).enumerate() {
        if pair[0].issuer() != pair[1].subject() {
            return Err(format!(
                "certificate {} ({}) is not the issuer of certificate {} (issued by {}): the \
                 chain goes leaf first, then each issuer",
                i + 2,
                pair[1].subject(),
                i + 1,
                pair[0].issuer()
            ));
        }
    }
    Ok(chain)
}

/// What is doubtful about a chain the engine can serve: a leaf expired or
/// not yet valid (clients will refuse it).
pub fn chain_warnings(chain: &[CertificateDer<'_>]) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(info) = leaf_info(chain[0].as_ref()) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        if info.not_after < now {
            out.push(format!(
                "the leaf certificate expired at {}: clients will refuse it",
                super::intercept::rfc3339(info.not_after)
            ));
        }
        if info.not_before > now {
            out.push(format!(
                "the leaf certificate is not valid before {}: clients will refuse it",
                super::intercept::rfc3339(info.not_before)
            ));
        }
    }
    out
}

/// The SHA-256 (hex) of the leaf's SubjectPublicKeyInfo: what `loupe key
/// list` shows for the key that must sign for it.
pub fn leaf_spki_sha256(leaf: &CertificateDer<'_>) -> Result<String, String> {
    use sha2::{Digest, Sha256};
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| format!("the leaf certificate: {e}"))?;
    Ok(Sha256::digest(cert.public_key().raw)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Signs a fresh message with the key on the token and verifies it with
/// the leaf's public key.
fn prove(inner: &KeyInner) -> Result<(), String> {
    let mech = match inner.kind {
        ServerKeyKind::EcP256 => SignMech::EcdsaP256Sha256,
        ServerKeyKind::EcP384 => SignMech::EcdsaP384Sha384,
        ServerKeyKind::Rsa => SignMech::RsaPssSha256,
    };
    let mut message = b"loupe: proof that this key serves this certificate ".to_vec();
    let nonce: [u8; 16] = rand_bytes()?;
    message.extend_from_slice(&nonce);
    let signature = inner.sign_blocking(
        mech,
        &message,
        "prove the server profile's key matches its certificate",
        "loupe-dataplane policy".into(),
    )?;
    inner
        .verify(mech, &message, &signature)
        .map_err(|_| "its signature does not verify with the certificate's key".to_string())
}

fn rand_bytes<const N: usize>() -> Result<[u8; N], String> {
    let mut b = [0u8; N];
    rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(&mut b)
        .map_err(|e| format!("no randomness: {e:?}"))?;
    Ok(b)
}

/// A client handshake handed to the pool, and where its answer goes.
struct Job {
    accepted: Box<Accepted>,
    config: Arc<ServerConfig>,
    requester: String,
    slot: Arc<HandshakeSlot>,
}

/// What a pool thread made of a handshake: the connection, or the error
/// with the alert rustls wrote for the client.
pub type Handshake = Result<ServerConnection, (rustls::Error, Vec<u8>)>;

/// One connection's handshake on the pool: polled by its stage.
pub struct HandshakeSlot {
    done: Mutex<Option<Handshake>>,
    waker: Option<Waker>,
    pub deadline: Instant,
}

impl HandshakeSlot {
    /// The handshake's outcome, once (then `None` again).
    pub fn take(&self) -> Option<Handshake> {
        self.done.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// Handshakes a pool runs at once, at most, and waiting for a thread.
pub const POOL_THREADS: usize = 16;
const POOL_QUEUE: usize = 4096;

/// The handshake pool: threads that may block on the HSM.
pub struct HandshakePool {
    tx: Mutex<Option<Sender<Job>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Handshakes queued or running.
    pub pending: Arc<AtomicU64>,
}

impl HandshakePool {
    pub fn start(threads: usize) -> Result<HandshakePool, String> {
        let (tx, rx) = channel::bounded::<Job>(POOL_QUEUE);
        let pending = Arc::new(AtomicU64::new(0));
        let mut handles = Vec::new();
        for i in 0..threads.max(1) {
            let rx: Receiver<Job> = rx.clone();
            let pending = pending.clone();
            let h = std::thread::Builder::new()
                .name(format!("loupe-handshake-{i}"))
                .spawn(move || {
                    while let Ok(job) = rx.recv() {
                        run(job);
                        pending.fetch_sub(1, Ordering::Relaxed);
                    }
                })
                .map_err(|e| format!("cannot start a handshake thread: {e}"))?;
            handles.push(h);
        }
        Ok(HandshakePool {
            tx: Mutex::new(Some(tx)),
            threads: Mutex::new(handles),
            pending,
        })
    }

    /// Hands `accepted` to the pool; the worker behind `waker` is woken
    /// when its connection is ready. Refused when the queue is full or the
    /// pool stopped.
    pub fn submit(
        &self,
        accepted: Box<Accepted>,
        config: Arc<ServerConfig>,
        requester: String,
        waker: Option<Waker>,
        deadline: Instant,
    ) -> Result<Arc<HandshakeSlot>, String> {
        let slot = Arc::new(HandshakeSlot {
            done: Mutex::new(None),
            waker,
            deadline,
        });
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        let tx = tx.as_ref().ok_or("the handshake pool has stopped")?;
        self.pending.fetch_add(1, Ordering::Relaxed);
        match tx.try_send(Job {
            accepted,
            config,
            requester,
            slot: slot.clone(),
        }) {
            Ok(()) => Ok(slot),
            Err(e) => {
                self.pending.fetch_sub(1, Ordering::Relaxed);
                Err(match e {
                    TrySendError::Full(_) => format!(
                        "{POOL_QUEUE} handshakes already wait for the HSM (the handshake pool is \
                         full)"
                    ),
                    TrySendError::Disconnected(_) => "the handshake pool has stopped".into(),
                })
            }
        }
    }

    /// Stops the threads (after the handshakes already queued).
    pub fn stop(&self) {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

fn run(job: Job) {
    let Job {
        accepted,
        config,
        requester,
        slot,
    } = job;
    // A connection given up on (its deadline passed: the stage has gone
    // on without it) is not handshaken: nothing is signed for it.
    let out = if Instant::now() >= slot.deadline {
        Err((
            rustls::Error::General("the handshake waited past its deadline".into()),
            Vec::new(),
        ))
    } else {
        POOL_JOB.with(|j| *j.borrow_mut() = Some(requester));
        let out = accepted.into_connection(config).map_err(|(e, mut alert)| {
            let mut bytes = Vec::new();
            let _ = alert.write_all(&mut bytes);
            (e, bytes)
        });
        POOL_JOB.with(|j| *j.borrow_mut() = None);
        out
    };
    *slot.done.lock().unwrap_or_else(|p| p.into_inner()) = Some(out);
    if let Some(w) = &slot.waker {
        w.wake_by_ref();
    }
}

#[cfg(test)]
mod tests {
    use std::{
        path::PathBuf,
        sync::atomic::{AtomicUsize, Ordering},
    };

    use aws_lc_rs::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
    use rustls::{pki_types::ServerName, ClientConfig, ClientConnection, RootCertStore};

    use super::*;
    use crate::{
        policy::UpstreamCheck,
        tls::{context::OneCert, testkit::SoftSigner},
    };

    fn key_pair() -> (rcgen::KeyPair, EcdsaKeyPair) {
        let k = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let e =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &k.serialize_der()).unwrap();
        (k, e)
    }

    /// A self-signed certificate for `www.loupe.test` with `key`, written
    /// as PEM into `dir`.
    fn chain_file(
        dir: &Path,
        name: &str,
        key: &rcgen::KeyPair,
    ) -> (PathBuf, CertificateDer<'static>) {
        let cert = rcgen::CertificateParams::new(vec!["www.loupe.test".to_string()])
            .unwrap()
            .self_signed(key)
            .unwrap();
        let path = dir.join(format!("{name}.pem"));
        std::fs::write(&path, cert.pem()).unwrap();
        (path, cert.der().clone())
    }

    fn profile(chain: &Path, key: &str) -> ServerProfile {
        ServerProfile {
            chain: chain.display().to_string(),
            token: None,
            key: key.into(),
            upstream: UpstreamCheck::Pinned,
        }
    }

    fn prepare(p: &ServerProfile, signer: &Arc<dyn CaSigner>) -> Result<ServerRuntime, String> {
        ServerRuntime::prepare("www", p, Some("tok"), Some(signer), Duration::from_secs(5))
    }

    /// A server key is proven against its chain when prepared; it signs
    /// on a handshake pool thread only (a packet worker asking is
    /// refused, nothing signed), and a client's handshake run on the pool
    /// shows the client the server's own certificate with one signature.
    #[test]
    fn a_server_key_is_proven_and_signs_on_the_handshake_pool_only() {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "loupe-inbound-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let (rk, ek) = key_pair();
        let (other, _) = key_pair();
        let (good, der) = chain_file(&dir, "good", &rk);
        let (wrong, _) = chain_file(&dir, "wrong", &other);
        std::fs::write(dir.join("empty.pem"), "").unwrap();
        let soft = Arc::new(SoftSigner::new(vec![("loupe-server/www".into(), ek)]));
        let signer: Arc<dyn CaSigner> = soft.clone();

        let err = prepare(&profile(&wrong, "www"), &signer).err().unwrap();
        assert!(err.contains("does not verify"), "{err}");
        let err = prepare(&profile(&good, "absent"), &signer).err().unwrap();
        assert!(err.contains("loupe-server/absent"), "{err}");
        let err = prepare(&profile(&dir.join("empty.pem"), "www"), &signer)
            .err()
            .unwrap();
        assert!(err.contains("no certificate"), "{err}");
        let sr = prepare(&profile(&good, "www"), &signer).unwrap();
        assert_eq!(sr.key_name(), "tok/www");
        assert_eq!(sr.key_kind, "ec-p256");
        assert_eq!(sr.leaf(), &der);
        let proofs = soft.signed.load(Ordering::SeqCst);

        // Off the pool (a packet worker, this test's thread): refused.
        let s = sr
            .certified
            .key
            .choose_scheme(&[SignatureScheme::ECDSA_NISTP256_SHA256])
            .unwrap();
        let e = s.sign(b"transcript").unwrap_err().to_string();
        assert!(e.contains("outside the handshake pool"), "{e}");
        assert_eq!(soft.signed.load(Ordering::SeqCst), proofs);
        // An RSA-only client gets no scheme from an EC key.
        assert!(sr
            .certified
            .key
            .choose_scheme(&[SignatureScheme::RSA_PSS_SHA256])
            .is_none());

        // A client handshake on the pool.
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = RootCertStore::empty();
        roots.add(der.clone()).unwrap();
        let ccfg = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = ServerName::try_from("www.loupe.test").unwrap();
        let mut client = ClientConnection::new(Arc::new(ccfg), name).unwrap();
        let mut hello = Vec::new();
        client.write_tls(&mut hello).unwrap();
        let mut acceptor = rustls::server::Acceptor::default();
        acceptor.read_tls(&mut &hello[..]).unwrap();
        let accepted = acceptor.accept().ok().flatten().expect("a ClientHello");
        let scfg = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(OneCert(Some(sr.certified.clone()))));
        let pool = HandshakePool::start(2).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let slot = pool
            .submit(
                Box::new(accepted),
                Arc::new(scfg),
                "test".into(),
                None,
                deadline,
            )
            .unwrap();
        let mut server = loop {
            if let Some(done) = slot.take() {
                break done.map_err(|(e, _)| e).unwrap();
            }
            assert!(Instant::now() < deadline, "the pool never answered");
            std::thread::sleep(Duration::from_millis(5));
        };
        for _ in 0..8 {
            let mut buf = Vec::new();
            while server.wants_write() {
                server.write_tls(&mut buf).unwrap();
            }
            if !buf.is_empty() {
                client.read_tls(&mut &buf[..]).unwrap();
                client.process_new_packets().unwrap();
            }
            let mut buf = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut buf).unwrap();
            }
            if !buf.is_empty() {
                server.read_tls(&mut &buf[..]).unwrap();
                server.process_new_packets().unwrap();
            }
        }
        assert!(!client.is_handshaking() && !server.is_handshaking());
        assert_eq!(client.peer_certificates().unwrap()[0], der);
        assert_eq!(soft.signed.load(Ordering::SeqCst), proofs + 1);
        assert_eq!(pool.pending.load(Ordering::SeqCst), 0);
        pool.stop();
        // Stopped: refused, never queued.
        let mut acceptor = rustls::server::Acceptor::default();
        acceptor.read_tls(&mut &hello[..]).unwrap();
        let accepted = acceptor.accept().ok().flatten().unwrap();
        let cfg = Arc::new(
            ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(OneCert(None))),
        );
        let e = pool
            .submit(Box::new(accepted), cfg, "test".into(), None, deadline)
            .err()
            .unwrap();
        assert!(e.contains("stopped"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
