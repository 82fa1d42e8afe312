//! A whole interception in memory, for unit tests and the fuzzer: Loupe's
//! CAs with software keys behind a [`CaSigner`] that answers when told
//! to, a test root that signs the "real" server's certificate, a rustls
//! client and server at either end, and two in-memory [`ByteStream`]s
//! standing in for the split's TCP halves. Nothing here touches a network,
//! a token or a clock: time is whatever the test says.

use std::{
    collections::VecDeque,
    io::Read,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    task::{Wake, Waker},
    time::{Duration, Instant},
};

use aws_lc_rs::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
use loupe_hsm::ca::{CaFlavor, CaInfo, CaRole};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName},
    ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection,
};

use super::{
    cache::{CaSigner, PendingSignature},
    context::{CaSet, ProfileRuntime, TlsContext, TlsSettings},
    hello::{Hello, HelloScanner},
    intercept::Intercept,
};
use crate::{
    policy::Profile,
    tcp::stream::{ByteStream, Pump},
};

/// One half of a split, in memory.
#[derive(Default)]
pub struct Pipe {
    /// Received from the peer, not yet read.
    pub rx: VecDeque<u8>,
    /// Written by the stage, not yet taken by the peer.
    pub tx: Vec<u8>,
    /// Room for `tx` (a TCP send buffer).
    pub cap: usize,
    /// The peer sent FIN.
    pub peer_fin: bool,
    /// The stage closed it (FIN after `tx`).
    pub closed: bool,
}

impl Pipe {
    pub fn new(cap: usize) -> Pipe {
        Pipe {
            cap,
            ..Pipe::default()
        }
    }
}

impl ByteStream for Pipe {
    fn readable(&self) -> usize {
        self.rx.len()
    }
    fn read(&mut self, max: usize) -> Vec<u8> {
        let n = max.min(self.rx.len());
        self.rx.drain(..n).collect()
    }
    fn send_space(&self) -> usize {
        if self.closed {
            0
        } else {
            self.cap.saturating_sub(self.tx.len())
        }
    }
    fn write(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(self.send_space());
        self.tx.extend_from_slice(&data[..n]);
        n
    }
    fn peer_finished(&self) -> bool {
        self.peer_fin && self.rx.is_empty()
    }
    fn writable(&self) -> bool {
        !self.closed
    }
    fn close(&mut self) {
        self.closed = true;
    }
    fn unsent(&self) -> usize {
        self.tx.len()
    }
}

/// A software CA signer: answers at once, or (with `hold`) when
/// [`SoftSigner::release`] says so; can be down; counts what it signed.
pub struct SoftSigner {
    keys: Vec<(String, EcdsaKeyPair)>,
    held: Mutex<Vec<Held>>,
    pub hold: AtomicBool,
    pub down: AtomicBool,
    pub signed: AtomicUsize,
}

/// A held request: its slot, its signature, its requester's waker.
type Held = (Arc<Slot>, Vec<u8>, Option<Waker>);

#[derive(Default)]
pub struct Slot {
    answer: Mutex<Option<Result<Vec<u8>, String>>>,
}

struct SlotRef(Arc<Slot>);

impl PendingSignature for SlotRef {
    fn try_take(&self) -> Option<Result<Vec<u8>, String>> {
        self.0.answer.lock().ok()?.take()
    }
}

impl SoftSigner {
    /// A signer holding `keys` (token label, key), answering at once.
    pub fn new(keys: Vec<(String, EcdsaKeyPair)>) -> SoftSigner {
        SoftSigner {
            keys,
            held: Mutex::new(Vec::new()),
            hold: AtomicBool::new(false),
            down: AtomicBool::new(false),
            signed: AtomicUsize::new(0),
        }
    }

    /// Answers every held request, waking their requesters.
    pub fn release(&self) {
        for (slot, sig, waker) in self.held.lock().unwrap().drain(..) {
            *slot.answer.lock().unwrap() = Some(Ok(sig));
            if let Some(w) = waker {
                w.wake();
            }
        }
    }

    /// Requests waiting for [`SoftSigner::release`].
    pub fn waiting(&self) -> usize {
        self.held.lock().unwrap().len()
    }
}

impl CaSigner for SoftSigner {
    fn submit(
        &self,
        req: loupe_hsm::signer::Request,
        waker: Option<Waker>,
    ) -> Result<Box<dyn PendingSignature>, String> {
        if self.down.load(Ordering::SeqCst) {
            return Err(format!("token {:?} is down", req.token));
        }
        let key = self
            .keys
            .iter()
            .find(|(l, _)| *l == req.key)
            .ok_or_else(|| format!("no key {:?}", req.key))?;
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let sig = key
            .1
            .sign(&rng, &req.message)
            .map_err(|e| e.to_string())?
            .as_ref()
            .to_vec();
        self.signed.fetch_add(1, Ordering::SeqCst);
        let slot = Arc::new(Slot::default());
        if self.hold.load(Ordering::SeqCst) {
            self.held.lock().unwrap().push((slot.clone(), sig, waker));
        } else {
            *slot.answer.lock().unwrap() = Some(Ok(sig));
            if let Some(w) = waker {
                w.wake();
            }
        }
        Ok(Box::new(SlotRef(slot)))
    }

    fn is_up(&self, _token: &str) -> bool {
        !self.down.load(Ordering::SeqCst)
    }
}

/// Counts wake-ups (a worker's waker).
#[derive(Default)]
pub struct Wakes(pub AtomicUsize);

impl Wake for Wakes {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// Loupe's CAs, the test PKI, the context.
pub struct Kit {
    pub ctx: Arc<TlsContext>,
    pub signer: Arc<SoftSigner>,
    /// Loupe's forward-trust CA (clients trust it).
    pub trust_ca: CertificateDer<'static>,
    pub untrust_ca: CertificateDer<'static>,
    /// The test root (the profile trusts it) and its intermediate signer.
    root: Issuer<'static, KeyPair>,
    pub root_der: CertificateDer<'static>,
    pub dir: PathBuf,
    pub wakes: Arc<Wakes>,
}

fn loupe_ca(role: CaRole) -> (CaInfo, EcdsaKeyPair) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("Test {} CA", role.name()));
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = p.self_signed(&key).expect("ca");
    let label = role.label(1);
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &key.serialize_der())
        .expect("pkcs8");
    let info = CaInfo {
        role,
        flavor: CaFlavor::Primary,
        key: "ec-p256".into(),
        generation: 1,
        label,
        active: true,
        fingerprint: String::new(),
        der: cert.der().to_vec(),
    };
    (info, pair)
}

impl Kit {
    /// Everything, with `profile` as the profile `test` (its trust store is
    /// set to the test root).
    pub fn new(mut profile: Profile) -> Kit {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "loupe-tls-kit-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let (trust, trust_key) = loupe_ca(CaRole::ForwardTrust);
        let (untrust, untrust_key) = loupe_ca(CaRole::ForwardUntrust);
        let signer = Arc::new(SoftSigner::new(vec![
            (trust.label.clone(), trust_key),
            (untrust.label.clone(), untrust_key),
        ]));
        let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut rp = CertificateParams::default();
        rp.distinguished_name.push(DnType::CommonName, "Kit Root");
        rp.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        rp.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let root_cert = rp.self_signed(&root_key).expect("root");
        let root_der = root_cert.der().clone();
        let roots = dir.join("roots.pem");
        std::fs::write(&roots, root_cert.pem()).expect("roots");
        profile.trust_store = Some(roots.display().to_string());
        let cas = CaSet::from_list("kit", &[trust.clone(), untrust.clone()]).expect("cas");
        let settings = TlsSettings {
            rotate_keys: None,
            system_trust: roots.clone(),
            hsm_timeout: Duration::from_secs(2),
            ..TlsSettings::default()
        };
        let ctx = TlsContext::new(settings, Some(signer.clone()), cas, Box::new(|_, _| {}))
            .expect("context");
        let mut policy = crate::policy::Policy::split_all(&[443], Vec::new());
        policy.profiles.insert("test".into(), profile);
        let broken = ctx.prepare(&policy);
        assert!(broken.is_empty(), "{broken:?}");
        Kit {
            ctx: Arc::new(ctx),
            signer,
            trust_ca: CertificateDer::from(trust.der),
            untrust_ca: CertificateDer::from(untrust.der),
            root: Issuer::new(rp, root_key),
            root_der,
            dir,
            wakes: Arc::new(Wakes::default()),
        }
    }

    pub fn runtime(&self) -> Arc<ProfileRuntime> {
        self.ctx.runtime(Some("test")).expect("prepared")
    }

    /// A server certificate for `names` under the test root, valid
    /// `days_left` more days (negative: expired).
    pub fn server_cert(
        &self,
        names: &[&str],
        days_left: i64,
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut p = CertificateParams::default();
        p.distinguished_name
            .push(DnType::CommonName, names.first().copied().unwrap_or("x"));
        for n in names {
            p.subject_alt_names
                .push(SanType::DnsName((*n).try_into().expect("dns name")));
        }
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::days(30);
        p.not_after = now + time::Duration::days(days_left);
        let cert = p.signed_by(&key, &self.root).expect("leaf");
        (
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
    }

    /// A rustls server with that certificate.
    pub fn server_config(
        &self,
        names: &[&str],
        days_left: i64,
        alpn: &[&[u8]],
    ) -> Arc<ServerConfig> {
        let (chain, key) = self.server_cert(names, days_left);
        let mut cfg = ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server cert");
        cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        Arc::new(cfg)
    }

    /// A client trusting Loupe's forward-trust CA.
    pub fn client_config(&self, alpn: &[&[u8]]) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.trust_ca.clone()).expect("root");
        let mut cfg = ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        Arc::new(cfg)
    }

    pub fn waker(&self) -> Waker {
        Waker::from(self.wakes.clone())
    }
}

impl Drop for Kit {
    fn drop(&mut self) {
        self.ctx.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One interception with its two real TLS ends.
pub struct Session {
    pub stage: Intercept,
    pub client: ClientConnection,
    pub server: ServerConnection,
    pub cpipe: Pipe,
    pub spipe: Pipe,
    pub relayed: [u64; 2],
    pub now: Instant,
    /// Aborts the stage asked for (client, server).
    pub aborted: (bool, bool),
    /// The client side's error, if rustls reported one.
    pub client_error: Option<rustls::Error>,
    pub server_error: Option<rustls::Error>,
    /// Plaintext each end has received (read as it arrives, so rustls's
    /// buffers never fill).
    client_got: Vec<u8>,
    server_got: Vec<u8>,
    /// Each end read a close_notify.
    pub client_closed: bool,
    pub server_closed: bool,
}

impl Session {
    /// The client connects for `sni`; its ClientHello is parsed as at the
    /// decision point and interception starts.
    pub fn start(
        kit: &Kit,
        client: Arc<ClientConfig>,
        sni: &str,
        server: Arc<ServerConfig>,
    ) -> Session {
        let mut c =
            ClientConnection::new(client, ServerName::try_from(sni.to_string()).expect("name"))
                .expect("client");
        // The test's ends buffer whatever the test writes.
        c.set_buffer_limit(None);
        let mut hello = Vec::new();
        c.write_tls(&mut hello).expect("hello");
        let mut scanner = HelloScanner::default();
        let Some(Hello::Tls(ch)) = scanner.feed(&hello) else {
            panic!("not a ClientHello");
        };
        let (accepted, skip) = scanner.accept().expect("accepted");
        let now = Instant::now();
        let mut cpipe = Pipe::new(256 << 10);
        cpipe.rx.extend(&hello);
        let stage = Intercept::start(
            kit.ctx.clone(),
            kit.runtime(),
            None,
            Some(kit.waker()),
            accepted,
            ch,
            skip,
            (
                SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)), 40000),
                SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2)), 443),
            ),
            now,
        );
        Session {
            stage,
            client: c,
            server: {
                let mut sc = ServerConnection::new(server).expect("server");
                sc.set_buffer_limit(None);
                sc
            },
            cpipe,
            spipe: Pipe::new(256 << 10),
            relayed: [0; 2],
            now,
            aborted: (false, false),
            client_error: None,
            server_error: None,
            client_got: Vec::new(),
            server_got: Vec::new(),
            client_closed: false,
            server_closed: false,
        }
    }

    /// Pumps everything until nothing moves; returns the stage's last
    /// answer.
    pub fn run(&mut self) -> Pump {
        let mut last = Pump::Go;
        for _ in 0..1000 {
            let before = (
                self.cpipe.tx.len(),
                self.spipe.tx.len(),
                self.cpipe.rx.len(),
                self.spipe.rx.len(),
            );
            last = self.stage.pump(
                &mut self.cpipe,
                &mut self.spipe,
                &mut self.relayed,
                self.now,
            );
            if let Pump::Abort { client, server } = last {
                self.aborted.0 |= client;
                self.aborted.1 |= server;
            }
            let moved = self.exchange();
            let after = (
                self.cpipe.tx.len(),
                self.spipe.tx.len(),
                self.cpipe.rx.len(),
                self.spipe.rx.len(),
            );
            if !moved && before == after {
                break;
            }
        }
        last
    }

    /// Moves bytes between the pipes and the real ends. True if any moved.
    fn exchange(&mut self) -> bool {
        let mut moved = false;
        if !self.aborted.0 && self.client_error.is_none() {
            moved |= feed(
                &mut self.cpipe.tx,
                &mut *self.client,
                &mut self.client_got,
                &mut self.client_closed,
            )
            .map_err(|e| self.client_error = Some(e))
            .unwrap_or(true);
        }
        if !self.aborted.1 && self.server_error.is_none() {
            moved |= feed(
                &mut self.spipe.tx,
                &mut *self.server,
                &mut self.server_got,
                &mut self.server_closed,
            )
            .map_err(|e| self.server_error = Some(e))
            .unwrap_or(true);
        }
        let mut out = Vec::new();
        while self.client.wants_write() {
            if self.client.write_tls(&mut out).unwrap_or(0) == 0 {
                break;
            }
        }
        moved |= !out.is_empty();
        self.cpipe.rx.extend(out);
        let mut out = Vec::new();
        while self.server.wants_write() {
            if self.server.write_tls(&mut out).unwrap_or(0) == 0 {
                break;
            }
        }
        moved |= !out.is_empty();
        self.spipe.rx.extend(out);
        moved
    }

    /// Plaintext the client has received so far (taken).
    pub fn client_read(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.client_got)
    }

    pub fn server_read(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.server_got)
    }
}

/// Feeds what a pipe sent to a real end, reading its plaintext as it
/// comes; true if bytes moved.
fn feed<D: rustls::SideData>(
    wire: &mut Vec<u8>,
    conn: &mut rustls::ConnectionCommon<D>,
    got: &mut Vec<u8>,
    closed: &mut bool,
) -> Result<bool, rustls::Error> {
    if wire.is_empty() {
        return Ok(false);
    }
    let mut used = 0;
    while used < wire.len() {
        let mut rd = &wire[used..];
        match conn.read_tls(&mut rd) {
            Ok(0) | Err(_) => break,
            Ok(n) => used += n,
        }
        conn.process_new_packets()?;
        let (bytes, eof) = read_all(&mut conn.reader());
        got.extend(bytes);
        *closed |= eof;
    }
    wire.drain(..used);
    Ok(used > 0)
}

/// Everything readable, and whether the stream ended cleanly.
fn read_all(r: &mut impl Read) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        match r.read(&mut buf) {
            Ok(0) => return (out, true),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (out, false),
        }
    }
}
