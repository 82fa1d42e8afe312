//! What every worker's TLS interception shares: the CAs read from the
//! token, the leaf keys, the certificate cache, the decryption exclusion
//! cache, each profile's prepared configuration (trust store, client and
//! server configurations), the HSM signer's handle and the counters.
//! Built by the engine; profiles are prepared when a policy is applied, on
//! the engine's thread, so a worker never reads a trust store file.

use std::{
    collections::HashMap,
    net::IpAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, OnceLock, RwLock,
    },
    time::{Duration, Instant},
};

use loupe_hsm::{
    ca::{CaFlavor, CaInfo, CaRole},
    keylog::DataKey,
    mech::SignMech,
};
use rustls::{
    pki_types::CertificateDer,
    server::{ClientHello as RustlsHello, ResolvesServerCert, ServerSessionMemoryCache},
    sign::CertifiedKey,
    ClientConfig, KeyLog, ServerConfig,
};
use serde::{Deserialize, Serialize};

use super::{
    cache::{CaSigner, CertCache},
    inbound::{HandshakePool, ServerRuntime, POOL_THREADS},
    keys::LeafKeys,
    mint::{CaKeyKind, Issuer},
    tickets::TicketKeys,
    upstream::{client_config, provider_for, versions_for, KeyLogFile},
    verify::TrustStore,
};
use crate::{
    export::{Exporter, Sinks},
    inspect::{signature::SignatureSet, Inspection},
    policy::{ExportSink, Policy, Profile},
};

/// One CA the engine can mint with.
pub struct CaEntry {
    pub role: CaRole,
    pub flavor: CaFlavor,
    pub generation: u32,
    /// The key's label on the token.
    pub label: String,
    pub token: String,
    pub der: CertificateDer<'static>,
    pub issuer: Issuer,
    /// How the HSM signs with it.
    pub mech: SignMech,
}

impl CaEntry {
    pub fn is_rsa(&self) -> bool {
        matches!(self.issuer.kind(), CaKeyKind::Rsa)
    }

    /// `forward-trust/g2` (`-rsa` for the RSA companion), for the log.
    pub fn name(&self) -> String {
        let rsa = if self.flavor == CaFlavor::Rsa {
            "-rsa"
        } else {
            ""
        };
        format!("{}{rsa}/g{}", self.role.name(), self.generation)
    }
}

/// The active generation's CAs of one token.
#[derive(Default)]
pub struct CaSet {
    /// The token they are on.
    pub token: String,
    pub generation: u32,
    entries: Vec<Arc<CaEntry>>,
    /// Why the token's CAs could not be read (the token was left out at
    /// start): mints fail as the HSM being unavailable.
    pub unavailable: Option<String>,
}

impl CaSet {
    /// No CA yet on `token` (none made, or not read yet).
    pub fn empty(token: &str) -> CaSet {
        CaSet {
            token: token.to_string(),
            ..CaSet::default()
        }
    }

    /// `token` cannot be used, for `why`.
    pub fn unavailable(token: &str, why: &str) -> CaSet {
        CaSet {
            unavailable: Some(why.to_string()),
            ..CaSet::empty(token)
        }
    }

    /// Builds the set from the token's list (active generation only).
    pub fn from_list(token: &str, list: &[CaInfo]) -> Result<CaSet, String> {
        let mut set = CaSet::empty(token);
        for c in list.iter().filter(|c| c.active) {
            let issuer = Issuer::from_der(&c.der)
                .map_err(|e| format!("CA {} on token {token:?}: {e}", c.label))?;
            let mech = match issuer.kind() {
                CaKeyKind::EcP256 => SignMech::EcdsaP256Sha256,
                CaKeyKind::EcP384 => SignMech::EcdsaP384Sha384,
                CaKeyKind::Rsa => SignMech::RsaPkcs1Sha256,
            };
            set.generation = c.generation;
            set.entries.push(Arc::new(CaEntry {
                role: c.role,
                flavor: c.flavor,
                generation: c.generation,
                label: c.label.clone(),
                token: token.to_string(),
                der: CertificateDer::from(c.der.clone()),
                issuer,
                mech,
            }));
        }
        if set.entries.is_empty() {
            return Err(format!(
                "token {token:?} holds no CA: run `loupe ca init --token {token}` before \
                 decrypting"
            ));
        }
        Ok(set)
    }

    /// The CA of `role` for a client that can (`ecdsa`) or cannot verify
    /// ECDSA signatures: an RSA chain for the latter.
    pub fn pick(&self, role: CaRole, ecdsa: bool) -> Option<Arc<CaEntry>> {
        let of_role = || self.entries.iter().filter(move |c| c.role == role);
        if ecdsa {
            of_role().find(|c| c.flavor == CaFlavor::Primary).cloned()
        } else {
            of_role().find(|c| c.is_rsa()).cloned()
        }
    }
}

/// What an exclusion is for: a server name at a server address and port,
/// under one decryption profile (another profile may say `block` where
/// this one said `no-decrypt`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Site {
    pub sni: Option<String>,
    pub server: IpAddr,
    pub port: u16,
    pub profile: String,
}

/// A site kept out of decryption, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exclusion {
    /// For this client only (a pinned app), or every client (`None`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<IpAddr>,
    #[serde(flatten)]
    pub site: Site,
    pub reason: String,
    /// Seconds left.
    pub expires_in_s: u64,
    /// Connections passed because of it.
    pub hits: u64,
}

struct Excluded {
    until: Instant,
    reason: String,
    hits: u64,
}

/// The decryption exclusion cache: sites whose clients pin their
/// certificates, or whose servers want client certificates or versions the
/// profile does not decrypt. Later connections to them are released to
/// the fast path at once.
/// An exclusion's key: (client, site).
type ExclusionKey = (Option<IpAddr>, Site);

#[derive(Default)]
pub struct Exclusions {
    map: Mutex<HashMap<ExclusionKey, Excluded>>,
    pub added: AtomicU64,
    pub hits: AtomicU64,
}

/// Most sites excluded at once.
const MAX_EXCLUSIONS: usize = 100_000;

impl Exclusions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ExclusionKey, Excluded>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Why `client`'s connection to `site` is excluded, if it is (an
    /// exclusion for every client, or one for this client).
    pub fn check(&self, client: IpAddr, site: &Site, now: Instant) -> Option<String> {
        let mut m = self.lock();
        for who in [None, Some(client)] {
            let key = (who, site.clone());
            match m.get_mut(&key) {
                Some(e) if e.until > now => {
                    e.hits += 1;
                    self.hits.fetch_add(1, Ordering::Relaxed);
                    return Some(e.reason.clone());
                }
                Some(_) => {
                    m.remove(&key);
                }
                None => {}
            }
        }
        None
    }

    /// Excludes `site` for `client` (every client: `None`).
    pub fn add(&self, client: Option<IpAddr>, site: Site, ttl: Duration, reason: &str) {
        let now = Instant::now();
        let mut m = self.lock();
        if m.len() >= MAX_EXCLUSIONS {
            m.retain(|_, e| e.until > now);
            if m.len() >= MAX_EXCLUSIONS {
                // Still full of live entries: the tenth that expires
                // soonest goes at once, so a flood of new entries costs a
                // sort every MAX_EXCLUSIONS / 10 of them, not a scan each.
                let mut by_end: Vec<(Instant, ExclusionKey)> =
                    m.iter().map(|(k, e)| (e.until, k.clone())).collect();
                by_end.sort_unstable_by_key(|(until, _)| *until);
                for (_, k) in by_end.into_iter().take(MAX_EXCLUSIONS / 10) {
                    m.remove(&k);
                }
            }
        }
        self.added.fetch_add(1, Ordering::Relaxed);
        m.insert(
            (client, site),
            Excluded {
                until: now + ttl,
                reason: reason.to_string(),
                hits: 0,
            },
        );
    }

    pub fn list(&self) -> Vec<Exclusion> {
        let now = Instant::now();
        let mut out: Vec<Exclusion> = self
            .lock()
            .iter()
            .filter(|(_, e)| e.until > now)
            .map(|((client, site), e)| Exclusion {
                client: *client,
                site: site.clone(),
                reason: e.reason.clone(),
                expires_in_s: e.until.duration_since(now).as_secs(),
                hits: e.hits,
            })
            .collect();
        out.sort_by(|a, b| (&a.site, a.client).cmp(&(&b.site, b.client)));
        out
    }

    /// Forgets every exclusion; returns how many there were.
    pub fn clear(&self) -> usize {
        let mut m = self.lock();
        let n = m.len();
        m.clear();
        n
    }
}

/// Presents one certificate (the minted one) to every client.
#[derive(Debug)]
pub struct OneCert(pub Option<Arc<CertifiedKey>>);

impl ResolvesServerCert for OneCert {
    fn resolve(&self, _hello: RustlsHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.clone()
    }
}

/// A profile, prepared: its trust store and TLS configurations.
pub struct ProfileRuntime {
    pub name: String,
    pub profile: Profile,
    pub trust: Arc<TrustStore>,
    pub client: Arc<ClientConfig>,
    /// Cloned per connection with the minted certificate and the ALPN the
    /// server chose; tickets and the session cache are shared, bound per
    /// connection to the minted leaf ([`super::resume`]).
    pub server: Arc<ServerConfig>,
    /// The inspectors its connections get.
    pub inspection: Inspection,
}

/// Counters of the TLS stage (all workers), for the report and metrics.
#[derive(Default)]
pub struct TlsStats {
    /// Connections in the TLS stage right now.
    pub active: AtomicU64,
    /// Decrypted connections by how their handshakes ended.
    pub decrypted: AtomicU64,
    pub blocked: AtomicU64,
    pub passed_on: AtomicU64,
    pub failed: AtomicU64,
    pub no_decrypt: AtomicU64,
    /// Connections waiting for an HSM signature right now.
    pub parked: AtomicU64,
    /// Decrypted connections an inspector (a signature) blocked.
    pub inspect_blocks: AtomicU64,
    /// Mint latency (submission to certificate), microseconds: bucket
    /// upper bounds are [`MINT_BUCKETS_US`].
    pub mint_latency: [AtomicU64; MINT_BUCKETS_US.len() + 1],
    pub mint_sum_us: AtomicU64,
}

pub const MINT_BUCKETS_US: [u64; 10] = [
    250, 500, 1_000, 2_000, 5_000, 10_000, 25_000, 50_000, 100_000, 1_000_000,
];

impl TlsStats {
    pub fn mint_took(&self, took: Duration) {
        let us = took.as_micros() as u64;
        let i = MINT_BUCKETS_US
            .iter()
            .position(|b| us <= *b)
            .unwrap_or(MINT_BUCKETS_US.len());
        self.mint_latency[i].fetch_add(1, Ordering::Relaxed);
        self.mint_sum_us.fetch_add(us, Ordering::Relaxed);
    }
}

/// How the engine's TLS interception is set up.
#[derive(Clone, Debug)]
pub struct TlsSettings {
    /// Certificates kept in the cache.
    pub cache_capacity: usize,
    /// Leaf keys are replaced this often.
    pub rotate_keys: Option<Duration>,
    /// Longest wait for an HSM signature.
    pub hsm_timeout: Duration,
    /// The system trust bundle (default for profiles without their own).
    pub system_trust: PathBuf,
    /// Longest an upstream handshake may take.
    pub handshake_timeout: Duration,
    /// Most connections in the TLS stage at once (beyond: the profile's
    /// `no_resources`).
    pub max_sessions: usize,
    /// Where the session ticket keys are kept across restarts, sealed by
    /// the HSM's master key (`None`: in memory only).
    pub ticket_keys: Option<PathBuf>,
    /// How long a ticket key is used (and a ticket good for).
    pub ticket_lifetime: Duration,
}

impl Default for TlsSettings {
    fn default() -> Self {
        TlsSettings {
            cache_capacity: 10_000,
            rotate_keys: Some(Duration::from_secs(24 * 3600)),
            hsm_timeout: Duration::from_secs(2),
            system_trust: PathBuf::from("/etc/ssl/certs/ca-certificates.crt"),
            handshake_timeout: Duration::from_secs(30),
            max_sessions: 8_192,
            ticket_keys: None,
            ticket_lifetime: Duration::from_secs(12 * 3600),
        }
    }
}

/// Told when a profile turns key logging on: (profile, file).
pub type OnKeyLog = Box<dyn Fn(&str, &str) + Send + Sync>;

/// Seals a key log's data key with the HSM's master key.
pub type SealKeyLog = Arc<dyn Fn(&[u8]) -> Result<Vec<u8>, String> + Send + Sync>;

/// A profile ready for connections, or why it cannot be used.
type Prepared = Result<Arc<ProfileRuntime>, String>;
/// A server profile ready for connections, or why it cannot be used.
type PreparedServer = Result<Arc<ServerRuntime>, String>;

/// Everything the workers' interception shares.
pub struct TlsContext {
    pub settings: TlsSettings,
    pub signer: Option<Arc<dyn CaSigner>>,
    /// Each token's CAs (a tenant's decryption profiles mint with its own).
    cas: RwLock<HashMap<String, Arc<CaSet>>>,
    /// The token whose CAs profiles without a `token` use (the first).
    primary: String,
    pub keys: Arc<LeafKeys>,
    pub cache: CertCache,
    pub exclusions: Exclusions,
    /// Each profile of the running policy, or why it cannot be used.
    runtimes: RwLock<Arc<HashMap<String, Prepared>>>,
    default_runtime: RwLock<Option<Arc<ProfileRuntime>>>,
    /// Trust stores by file, parsed once.
    trust: Mutex<HashMap<PathBuf, Arc<TrustStore>>>,
    /// Key log files by path, opened once.
    keylogs: Mutex<HashMap<String, Arc<dyn KeyLog>>>,
    /// How key logs are sealed (none: they are written clear, which only
    /// an engine without an HSM does), and the run's data key once made.
    keylog_seal: Option<SealKeyLog>,
    keylog_key: Mutex<Option<Arc<DataKey>>>,
    ticketer: Arc<dyn rustls::server::ProducesTickets>,
    /// The ticket keys when kept in a file (rotated and sealed by
    /// [`TlsContext::tick`]).
    kept_tickets: Option<Arc<TicketKeys>>,
    sessions: Arc<dyn rustls::server::StoresServerSessions>,
    pub stats: TlsStats,
    /// Called when a profile turns key logging on (the engine writes it to
    /// the HSM audit log).
    on_keylog: OnKeyLog,
    /// Where profiles with `export` copy their plaintext (none: the engine
    /// runs without an export destination).
    pub export: Option<Arc<Exporter>>,
    /// The engine's token (server profiles without their own use it).
    token: Option<String>,
    /// Each server profile of the running policy, or why it cannot be used.
    servers: RwLock<Arc<HashMap<String, PreparedServer>>>,
    /// Inbound handshakes that sign on the HSM (started with the first
    /// server profile).
    pool: OnceLock<Result<HandshakePool, String>>,
}

impl std::fmt::Debug for TlsContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsContext")
            .field("settings", &self.settings)
            .field("ca_generation", &self.cas().generation)
            .field("cached", &self.cache.len())
            .finish_non_exhaustive()
    }
}

/// The profile name the log shows for a `decrypt` rule without one.
pub const DEFAULT_PROFILE: &str = "(default)";

impl TlsContext {
    pub fn new(
        settings: TlsSettings,
        signer: Option<Arc<dyn CaSigner>>,
        cas: CaSet,
        on_keylog: OnKeyLog,
    ) -> Result<TlsContext, String> {
        let keys = LeafKeys::start(settings.rotate_keys)?;
        let ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()
            .map_err(|e| format!("cannot make a session ticket key: {e}"))?;
        let ctx = TlsContext {
            cache: CertCache::new(settings.cache_capacity),
            settings,
            signer,
            primary: cas.token.clone(),
            cas: RwLock::new(HashMap::from([(cas.token.clone(), Arc::new(cas))])),
            keys,
            exclusions: Exclusions::default(),
            runtimes: RwLock::new(Arc::new(HashMap::new())),
            default_runtime: RwLock::new(None),
            trust: Mutex::new(HashMap::new()),
            keylogs: Mutex::new(HashMap::new()),
            keylog_seal: None,
            keylog_key: Mutex::new(None),
            ticketer,
            kept_tickets: None,
            sessions: ServerSessionMemoryCache::new(65_536),
            stats: TlsStats::default(),
            on_keylog,
            export: None,
            token: None,
            servers: RwLock::new(Arc::new(HashMap::new())),
            pool: OnceLock::new(),
        };
        let default = ctx.prepare_profile(
            DEFAULT_PROFILE,
            &Profile::default(),
            &Policy::split_all(&[], Vec::new()),
        )?;
        *ctx.default_runtime
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(default);
        Ok(ctx)
    }

    /// The context with an export destination (before it is shared).
    pub fn with_exporter(mut self, export: Arc<Exporter>) -> TlsContext {
        self.export = Some(export);
        self
    }

    /// The context with ticket keys kept in a file (before it is shared):
    /// the default profile is prepared again with them.
    pub fn with_ticket_keys(mut self, keys: Arc<TicketKeys>) -> Result<TlsContext, String> {
        self.ticketer = keys.clone();
        self.kept_tickets = Some(keys);
        let default = self.prepare_profile(
            DEFAULT_PROFILE,
            &Profile::default(),
            &Policy::split_all(&[], Vec::new()),
        )?;
        *self
            .default_runtime
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(default);
        Ok(self)
    }

    /// Rotates the kept ticket keys when due (sealing them on the HSM):
    /// on the engine's thread, never a worker's.
    pub fn tick(&self) {
        if let Some(Err(e)) = self.kept_tickets.as_ref().and_then(|k| k.tick()) {
            eprintln!("loupe-dataplane: warning: the ticket keys were rotated but not kept: {e}");
        }
    }

    /// The context sealing key logs with `seal` (before it is shared).
    pub fn with_keylog_seal(mut self, seal: SealKeyLog) -> TlsContext {
        self.keylog_seal = Some(seal);
        self
    }

    /// The run's key log data key, sealed by the HSM on first use. The
    /// HSM is asked on a thread of its own, waited for at most the HSM
    /// timeout (at least 2 s), so a hung HSM cannot hold the engine's
    /// thread; a key not made is asked for again at the next apply.
    fn keylog_key(&self, seal: &SealKeyLog) -> Result<Arc<DataKey>, String> {
        let mut k = self.keylog_key.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(key) = k.as_ref() {
            return Ok(key.clone());
        }
        let seal = seal.clone();
        let sealing = std::thread::Builder::new()
            .name("loupe-keylog-seal".into())
            .spawn(move || DataKey::new(|key| seal(key)))
            .map_err(|e| format!("cannot start a thread to seal its key: {e}"))?;
        let wait = self.settings.hsm_timeout.max(Duration::from_secs(2));
        let key = match loupe_hsm::join_by(sealing, Instant::now() + wait) {
            Ok(Ok(made)) => {
                Arc::new(made.map_err(|e| format!("the HSM did not seal its key: {e}"))?)
            }
            Ok(Err(_)) => return Err("the thread sealing its key failed".into()),
            Err(_) => {
                return Err(format!(
                    "the HSM did not seal its key within {} ms",
                    wait.as_millis()
                ))
            }
        };
        *k = Some(key.clone());
        Ok(key)
    }

    /// The context with the engine's token (before it is shared).
    pub fn with_token(mut self, token: &str) -> TlsContext {
        self.token = Some(token.to_string());
        self
    }

    /// The prepared server profile `name`, or why it cannot be used.
    pub fn server_runtime(&self, name: &str) -> Result<Arc<ServerRuntime>, String> {
        self.servers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
            .unwrap_or_else(|| Err(format!("no server profile {name:?} in the running policy")))
    }

    /// The handshake pool (started on first use).
    pub fn pool(&self) -> Result<&HandshakePool, String> {
        self.pool
            .get_or_init(|| HandshakePool::start(POOL_THREADS))
            .as_ref()
            .map_err(Clone::clone)
    }

    /// The first token's CAs.
    pub fn cas(&self) -> Arc<CaSet> {
        self.cas_for(None)
    }

    /// The CAs of `token` (the first token's for `None`); an empty set for
    /// a token the engine does not have.
    pub fn cas_for(&self, token: Option<&str>) -> Arc<CaSet> {
        let token = token.unwrap_or(&self.primary);
        self.cas
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(token)
            .cloned()
            .unwrap_or_else(|| Arc::new(CaSet::empty(token)))
    }

    /// Each token's CA generation (0: none), when there are several.
    pub fn ca_generations(&self) -> std::collections::BTreeMap<String, u32> {
        let m = self.cas.read().unwrap_or_else(|p| p.into_inner());
        if m.len() < 2 {
            return Default::default();
        }
        m.iter().map(|(t, s)| (t.clone(), s.generation)).collect()
    }

    /// Whether the engine has `token` (served or left out).
    pub fn has_token(&self, token: &str) -> bool {
        self.cas
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(token)
    }

    /// Takes a newly read CA set for its token; a new generation empties
    /// the cache.
    pub fn set_cas(&self, set: CaSet) -> bool {
        let changed = self.cas_for(Some(&set.token)).generation != set.generation;
        self.cas
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(set.token.clone(), Arc::new(set));
        if changed {
            self.cache.clear();
        }
        changed
    }

    /// Prepares every profile of `policy` (trust stores read, key logs
    /// opened). A profile that cannot be prepared (its trust store gone
    /// since the policy was checked, a key log refused) does not stop the
    /// policy, which would leave the engine without one: the profile is
    /// kept as broken and its connections are blocked
    /// ([`TlsContext::runtime`]). Returns what broke, one line each.
    pub fn prepare(&self, policy: &Policy) -> Vec<String> {
        let mut map = HashMap::new();
        let mut broken = Vec::new();
        for (name, p) in &policy.profiles {
            let rt = self.prepare_profile(name, p, policy).map_err(|e| {
                let why = format!("decryption profile {name:?} cannot be used: {e}");
                broken.push(why.clone());
                why
            });
            map.insert(name.clone(), rt);
        }
        // `decrypt` rules without a profile use the default one: it takes
        // the policy's URL rules too.
        match self.prepare_profile(DEFAULT_PROFILE, &Profile::default(), policy) {
            Ok(rt) => {
                *self
                    .default_runtime
                    .write()
                    .unwrap_or_else(|p| p.into_inner()) = Some(rt)
            }
            Err(e) => broken.push(format!(
                "the default decryption profile cannot be used: {e}"
            )),
        }
        *self.runtimes.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(map);
        let mut servers = HashMap::new();
        for (name, sp) in &policy.server_profiles {
            let rt = match &sp.token {
                Some(t) if !self.has_token(t) => Err(format!(
                    "its token {t:?} is not one of the engine's (--hsm-token)"
                )),
                _ => ServerRuntime::prepare(
                    name,
                    sp,
                    self.token.as_deref(),
                    self.signer.as_ref(),
                    self.settings.hsm_timeout,
                ),
            }
            .map(Arc::new)
            .map_err(|e| {
                let why = format!("server profile {name:?} cannot be used: {e}");
                broken.push(why.clone());
                why
            });
            servers.insert(name.clone(), rt);
        }
        *self.servers.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(servers);
        broken
    }

    fn prepare_profile(
        &self,
        name: &str,
        p: &Profile,
        policy: &Policy,
    ) -> Result<Arc<ProfileRuntime>, String> {
        p.check()?;
        if let Some(t) = &p.token {
            if !self.has_token(t) {
                return Err(format!(
                    "its token {t:?} is not one of the engine's (--hsm-token)"
                ));
            }
        }
        let mut sigs = Vec::new();
        for s in &p.signatures {
            let sig = policy
                .signatures
                .get(s)
                .ok_or_else(|| format!("unknown signature {s:?}"))?;
            sigs.push((s.clone(), sig.pattern.clone(), sig.action));
        }
        let inspection = Inspection {
            http: p.http,
            signatures: match sigs.is_empty() {
                true => None,
                false => Some(Arc::new(SignatureSet::new(&sigs)?)),
            },
            url_rules: (!policy.url_rules.is_empty())
                .then(|| Arc::new(policy.prepared_url_rules())),
            export: self.export_for(name, p),
        };
        let path = p
            .trust_store
            .as_ref()
            .map_or_else(|| self.settings.system_trust.clone(), PathBuf::from);
        let mut trust = self.trust_store(&path)?;
        if !p.crls.is_empty() {
            let crls: Vec<PathBuf> = p.crls.iter().map(PathBuf::from).collect();
            let with = TrustStore::from_pem_file(&path)
                .and_then(|t| t.with_crl_files(&crls))
                .map_err(|e| e.to_string())?;
            trust = Arc::new(with);
        }
        let keylog = match &p.keylog {
            Some(path) => Some(self.keylog(name, path)?),
            None => None,
        };
        let client = client_config(p, keylog.clone())?;
        let provider = Arc::new(provider_for(p));
        let mut server = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&versions_for(p))
            .map_err(|e| format!("no usable TLS versions, suites and groups: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(OneCert(None)));
        server.ticketer = self.ticketer.clone();
        server.session_storage = self.sessions.clone();
        if let Some(k) = keylog {
            server.key_log = k;
        }
        Ok(Arc::new(ProfileRuntime {
            name: name.to_string(),
            profile: p.clone(),
            trust,
            client: Arc::new(client),
            server: Arc::new(server),
            inspection,
        }))
    }

    /// The export destinations `p` names that the engine has; one named
    /// that it lacks is said (the profile's connections are decrypted and
    /// inspected all the same, without that copy).
    fn export_for(&self, name: &str, p: &Profile) -> Option<(Arc<Exporter>, Sinks)> {
        if p.export.is_empty() {
            return None;
        }
        let sinks = self
            .export
            .as_ref()
            .map(|e| e.sinks(&p.export))
            .unwrap_or_default();
        let missing: Vec<&str> = p
            .export
            .iter()
            .filter(|s| match s {
                ExportSink::Pcap => !sinks.pcap,
                ExportSink::Mirror => !sinks.mirror,
                ExportSink::PcapTls => !sinks.pcap_tls,
            })
            .map(|s| s.label())
            .collect();
        if !missing.is_empty() {
            eprintln!(
                "loupe-dataplane: warning: profile {name:?} exports to {} but the engine runs \
                 without that destination (--export-pcap / --export-mirror): not copied there",
                missing.join(", ")
            );
        }
        let e = self.export.clone()?;
        sinks.any().then_some((e, sinks))
    }

    fn trust_store(&self, path: &PathBuf) -> Result<Arc<TrustStore>, String> {
        let mut m = self.trust.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = m.get(path) {
            return Ok(t.clone());
        }
        let t = Arc::new(TrustStore::from_pem_file(path).map_err(|e| e.to_string())?);
        m.insert(path.clone(), t.clone());
        Ok(t)
    }

    fn keylog(&self, profile: &str, path: &str) -> Result<Arc<dyn KeyLog>, String> {
        // One file however it is spelled (`a/./k.log`, `a//k.log`, a
        // linked directory): two segments written into it at once would
        // interleave and open as neither.
        let p = std::path::Path::new(path);
        let path = match (p.parent().map(std::fs::canonicalize), p.file_name()) {
            (Some(Ok(dir)), Some(name)) => dir.join(name).display().to_string(),
            _ => path.to_string(),
        };
        let path = path.as_str();
        let mut m = self.keylogs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = m.get(path) {
            return Ok(k.clone());
        }
        let key = match &self.keylog_seal {
            Some(seal) => Some(self.keylog_key(seal)?),
            None => None,
        };
        let k: Arc<dyn KeyLog> = Arc::new(KeyLogFile::open(
            std::path::Path::new(path),
            key.as_deref(),
        )?);
        (self.on_keylog)(profile, path);
        m.insert(path.to_string(), k.clone());
        Ok(k)
    }

    /// The prepared profile `name` (the default profile for `None`, or a
    /// name the running policy does not have).
    ///
    /// A profile of the running policy that could not be prepared is an
    /// error (why), never the default profile in its place.
    pub fn runtime(&self, name: Option<&str>) -> Result<Arc<ProfileRuntime>, String> {
        if let Some(n) = name {
            if let Some(rt) = self
                .runtimes
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(n)
            {
                return rt.clone();
            }
        }
        Ok(self
            .default_runtime
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .expect("set at construction"))
    }

    /// Stops the leaf key thread and the handshake pool.
    pub fn stop(&self) {
        self.keys.stop();
        if let Some(Ok(pool)) = self.pool.get() {
            pool.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(sni: &str, port: u16, profile: &str) -> Site {
        Site {
            sni: Some(sni.into()),
            server: "198.18.0.2".parse().unwrap(),
            port,
            profile: profile.into(),
        }
    }

    #[test]
    fn a_pinned_clients_exclusion_holds_for_that_client_only() {
        let ex = Exclusions::default();
        let (a, b) = ("198.18.0.1".parse().unwrap(), "198.18.0.9".parse().unwrap());
        let now = Instant::now();
        let ttl = Duration::from_secs(60);
        ex.add(Some(a), site("app.example", 443, "p"), ttl, "pinned");
        assert!(ex.check(a, &site("app.example", 443, "p"), now).is_some());
        assert!(ex.check(b, &site("app.example", 443, "p"), now).is_none());
        // A server-side reason holds for everyone.
        ex.add(None, site("mtls.example", 443, "p"), ttl, "client auth");
        assert!(ex.check(b, &site("mtls.example", 443, "p"), now).is_some());
        assert!(ex.check(b, &site("other.example", 443, "p"), now).is_none());
        // Expired ones are forgotten.
        let later = now + Duration::from_secs(61);
        assert!(ex.check(a, &site("app.example", 443, "p"), later).is_none());
        assert_eq!(ex.list().len(), 1);
        assert_eq!(ex.clear(), 1);
    }

    #[test]
    fn an_exclusion_holds_for_its_port_and_profile_only() {
        let ex = Exclusions::default();
        let a = "198.18.0.1".parse().unwrap();
        let now = Instant::now();
        ex.add(
            None,
            site("s.example", 443, "lax"),
            Duration::from_secs(60),
            "x",
        );
        assert!(ex.check(a, &site("s.example", 443, "lax"), now).is_some());
        // Another service on the same address, or a profile that may
        // block where this one passed, is judged afresh.
        assert!(ex.check(a, &site("s.example", 8443, "lax"), now).is_none());
        assert!(ex
            .check(a, &site("s.example", 443, "strict"), now)
            .is_none());
    }

    #[test]
    fn a_full_cache_drops_the_soonest_to_expire() {
        let ex = Exclusions::default();
        let a = "198.18.0.1".parse().unwrap();
        let now = Instant::now();
        for i in 0..MAX_EXCLUSIONS {
            let ttl = Duration::from_secs(100 + i as u64);
            ex.add(None, site(&format!("h{i}.example"), 443, "p"), ttl, "x");
        }
        assert_eq!(ex.list().len(), MAX_EXCLUSIONS);
        ex.add(
            None,
            site("new.example", 443, "p"),
            Duration::from_secs(50),
            "x",
        );
        let n = ex.list().len();
        assert!(n <= MAX_EXCLUSIONS - MAX_EXCLUSIONS / 10 + 1, "{n}");
        assert!(ex.check(a, &site("new.example", 443, "p"), now).is_some());
        // The longest-lived survive; the shortest went.
        let last = format!("h{}.example", MAX_EXCLUSIONS - 1);
        assert!(ex.check(a, &site(&last, 443, "p"), now).is_some());
        assert!(ex.check(a, &site("h0.example", 443, "p"), now).is_none());
    }
}
