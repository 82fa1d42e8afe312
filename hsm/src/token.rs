//! PKCS#11 access: loading a module once per process, finding a token by its
//! label, opening logged-in sessions, generating key pairs with every
//! security attribute set explicitly, reading public keys and certificates.
//!
//! Private keys are only ever named by label and used by object handle. This
//! module never asks a token for the value of a private key: the only
//! `CKA_VALUE` reads are in [`TokenSession::certificate`] and
//! [`TokenSession::data_objects`], whose search templates are restricted to
//! `CKO_CERTIFICATE` and `CKO_DATA` (a test checks the source). Data objects
//! hold small private records of Loupe's own (the audit log's chain head).

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, OnceLock,
    },
};

use cryptoki::{
    context::{CInitializeArgs, CInitializeFlags, Pkcs11},
    error::{Error as CkError, RvError},
    mechanism::Mechanism,
    object::{Attribute, AttributeType, CertificateType, KeyType, ObjectClass, ObjectHandle},
    session::{Session, UserType},
    slot::Slot,
    types::AuthPin,
};
use sha2::{Digest, Sha256};

use zeroize::Zeroize;

use crate::{
    error::{HsmError, Result},
    keyfile::KeyParts,
    mech::{der_len, der_uint, SignMech},
    pin::PinSource,
};

/// Where SoftHSM2's module lives on Debian.
pub const SOFTHSM2_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// SHA-256 of the PIN each (module, token) was logged into with by this
/// process. PKCS#11 login state is per application (v2.40 §5.6).
type LoginMap = HashMap<(PathBuf, String), [u8; 32]>;
static LOGINS: OnceLock<Mutex<LoginMap>> = OnceLock::new();

/// One token, as configuration names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenConfig {
    /// Path of the PKCS#11 module (SoftHSM2, Luna, ...).
    pub module: PathBuf,
    /// The token's label (slot ids change across restarts; labels do not).
    pub label: String,
    pub pin: PinSource,
}

/// A loaded PKCS#11 module. C_Initialize is process-wide, so each module is
/// loaded and initialised once and shared.
pub(crate) fn module_context(path: &Path) -> Result<Pkcs11> {
    static MODULES: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    let mut modules = MODULES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(m) = modules.get(path) {
        return Ok(m.clone());
    }
    let err = |reason: String| HsmError::Module {
        path: path.display().to_string(),
        reason,
    };
    if !path.exists() {
        return Err(err(
            "no such file (is the HSM client or softhsm2 installed?)".into(),
        ));
    }
    let ctx = Pkcs11::new(path).map_err(|e| err(e.to_string()))?;
    // PKCS#11 v2.40 §5.4: OS locking, because several HSM threads call in.
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(err(format!("C_Initialize: {e}"))),
    }
    modules.insert(path.to_path_buf(), ctx.clone());
    Ok(ctx)
}

/// Held around every slot-list scan and token initialisation in this
/// process. SoftHSM 2.6 refreshes its slot list inside C_GetSlotList, and
/// two refreshes at once insert the same new token twice and abort
/// (SlotManager::insertToken assertion, seen when tests initialised
/// tokens while others opened theirs; in the engine, HSM threads that
/// look for a token again after a failure could race the same way).
pub(crate) fn slot_list_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// Finds the slot holding the token labelled `label`.
fn find_slot(ctx: &Pkcs11, module: &Path, label: &str) -> Result<Slot> {
    let _scan = slot_list_lock();
    let slots = ctx
        .get_slots_with_initialized_token()
        .map_err(|e| HsmError::pkcs11(label, "C_GetSlotList", e))?;
    let mut present = Vec::new();
    for slot in slots {
        let info = ctx
            .get_token_info(slot)
            .map_err(|e| HsmError::pkcs11(label, "C_GetTokenInfo", e))?;
        let l = info.label().trim_end().to_string();
        if l == label {
            if info.user_pin_locked() {
                return Err(HsmError::PinLocked(label.to_string()));
            }
            return Ok(slot);
        }
        present.push(format!("{l:?}"));
    }
    Err(HsmError::TokenNotFound {
        label: label.to_string(),
        module: module.display().to_string(),
        present: if present.is_empty() {
            "none".into()
        } else {
            present.join(", ")
        },
    })
}

/// A token found and logged into once (so a wrong PIN or a missing token is
/// an error at start-up, not at the first signature).
#[derive(Clone)]
pub struct Token {
    inner: Arc<TokenInner>,
}

struct TokenInner {
    ctx: Pkcs11,
    /// The slot id; re-found by label after a failure (slot ids change when
    /// tokens come and go).
    slot: AtomicU64,
    config: TokenConfig,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("label", &self.inner.config.label)
            .field("slot", &self.inner.slot.load(Ordering::Relaxed))
            .finish()
    }
}

impl Token {
    /// Loads the module, finds the token, reads the PIN and logs in once.
    pub fn open(config: &TokenConfig) -> Result<Token> {
        let ctx = module_context(&config.module)?;
        let slot = find_slot(&ctx, &config.module, &config.label)?;
        let token = Token {
            inner: Arc::new(TokenInner {
                ctx,
                slot: AtomicU64::new(slot.id()),
                config: config.clone(),
            }),
        };
        let pin = config.pin.read()?;
        token.session_with(&pin)?;
        Ok(token)
    }

    pub fn label(&self) -> &str {
        &self.inner.config.label
    }

    pub fn config(&self) -> &TokenConfig {
        &self.inner.config
    }

    pub fn slot(&self) -> Slot {
        let id = self.inner.slot.load(Ordering::Acquire);
        Slot::try_from(id).expect("slot ids come from the module")
    }

    /// Finalizes and initializes the module again (C_Finalize,
    /// C_Initialize). A client library that lost its link to a network HSM
    /// (p11-kit's, and some vendors') only reconnects then. Every session
    /// this process has on the module is gone afterwards: the HSM threads
    /// re-open theirs on their next failure, as after any outage.
    pub fn reinitialize_module(&self) -> Result<()> {
        let _scan = slot_list_lock();
        let ctx = &self.inner.ctx;
        let err = |reason: String| HsmError::Module {
            path: self.inner.config.module.display().to_string(),
            reason,
        };
        match ctx.clone().finalize() {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiNotInitialized, _)) => {}
            Err(e) => return Err(err(format!("C_Finalize: {e}"))),
        }
        match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(()),
            Err(e) => Err(err(format!("C_Initialize: {e}"))),
        }
    }

    /// Looks the token up by label again (after it went away).
    pub fn refind_slot(&self) -> Result<()> {
        let slot = find_slot(&self.inner.ctx, &self.inner.config.module, self.label())?;
        self.inner.slot.store(slot.id(), Ordering::Release);
        Ok(())
    }

    /// Opens a new read-write session, logged in as the user with the PIN
    /// read from the configured source now.
    pub fn session(&self) -> Result<TokenSession> {
        let pin = self.inner.config.pin.read()?;
        self.session_with(&pin)
    }

    /// Opens a session and logs in with `pin`. Login state is per token and
    /// application (PKCS#11 v2.40 §5.6), so CKR_USER_ALREADY_LOGGED_IN means
    /// another session already did it.
    pub fn session_with(&self, pin: &AuthPin) -> Result<TokenSession> {
        let label = self.label();
        let session = self
            .inner
            .ctx
            .open_rw_session(self.slot())
            .map_err(|e| HsmError::pkcs11(label, "C_OpenSession", e))?;
        let digest = crate::pin::digest(pin);
        let key = (self.inner.config.module.clone(), label.to_string());
        let mut logins = LOGINS
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match session.login(UserType::User, Some(pin)) {
            Ok(()) => {
                logins.insert(key, digest);
            }
            Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {
                // C_Login cannot check this PIN: the token is already logged
                // in for the whole process. Compare with the PIN that did log
                // in, so a second configuration with another PIN (another
                // tenant's) is refused rather than riding on that login.
                if logins.get(&key).is_some_and(|d| *d != digest) {
                    return Err(HsmError::PinIncorrect(label.to_string()));
                }
            }
            Err(e) => return Err(HsmError::pkcs11(label, "C_Login", e)),
        }
        Ok(TokenSession {
            session,
            token: label.to_string(),
            keys: HashMap::new(),
        })
    }
}

/// Key algorithms for keys generated on the token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyAlg {
    EcP256,
    EcP384,
    Rsa2048,
    Rsa3072,
}

/// DER OIDs of the named curves (RFC 5480 §2.1.1.1), as CKA_EC_PARAMS.
use crate::keyfile::{OID_P256, OID_P384};

impl KeyAlg {
    pub fn name(self) -> &'static str {
        match self {
            KeyAlg::EcP256 => "ec-p256",
            KeyAlg::EcP384 => "ec-p384",
            KeyAlg::Rsa2048 => "rsa-2048",
            KeyAlg::Rsa3072 => "rsa-3072",
        }
    }

    /// The mechanism certificates signed by this key use.
    pub fn sign_mech(self) -> SignMech {
        match self {
            KeyAlg::EcP256 => SignMech::EcdsaP256Sha256,
            KeyAlg::EcP384 => SignMech::EcdsaP384Sha384,
            KeyAlg::Rsa2048 | KeyAlg::Rsa3072 => SignMech::RsaPkcs1Sha256,
        }
    }
}

impl std::str::FromStr for KeyAlg {
    type Err = HsmError;
    fn from_str(s: &str) -> Result<Self> {
        [
            KeyAlg::EcP256,
            KeyAlg::EcP384,
            KeyAlg::Rsa2048,
            KeyAlg::Rsa3072,
        ]
        .into_iter()
        .find(|a| a.name() == s)
        .ok_or_else(|| {
            HsmError::Invalid(format!(
                "unknown key algorithm {s:?} (ec-p256, ec-p384, rsa-2048, rsa-3072)"
            ))
        })
    }
}

/// A public key read from the token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicKey {
    pub alg: KeyAlg,
    /// The subjectPublicKey bit string's contents: the uncompressed point for
    /// EC, the DER `RSAPublicKey` for RSA (what X.509 and ring expect).
    pub raw: Vec<u8>,
}

/// A key pair's public facts, for listings.
#[derive(Clone, Debug)]
pub struct KeyInfo {
    pub label: String,
    pub class: &'static str,
}

/// CKA_ID for a label: stable, so the public key, private key and
/// certificate of one label share it.
fn key_id(label: &str) -> Vec<u8> {
    Sha256::digest(label.as_bytes())[..16].to_vec()
}

/// What every key object of `label` has: on the token, named, fixed.
fn key_attrs(label: &str) -> Vec<Attribute> {
    vec![
        Attribute::Token(true),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Id(key_id(label)),
        Attribute::Modifiable(false),
        Attribute::Derive(false),
    ]
}

/// A private key's security attributes, set explicitly (SoftHSM2's
/// defaults, SENSITIVE false and DECRYPT true among them, are not safe):
/// it signs, and nothing else, and never leaves the token.
const PRIVATE_KEY_ATTRS: [Attribute; 9] = [
    Attribute::Private(true),
    Attribute::Sensitive(true),
    Attribute::Extractable(false),
    Attribute::Sign(true),
    Attribute::SignRecover(false),
    Attribute::Decrypt(false),
    Attribute::Unwrap(false),
    Attribute::Copyable(false),
    Attribute::Destroyable(true),
];

const PUBLIC_KEY_ATTRS: [Attribute; 4] = [
    Attribute::Private(false),
    Attribute::Verify(true),
    Attribute::Encrypt(false),
    Attribute::Wrap(false),
];

/// One logged-in session. Not `Sync`: one per thread.
pub struct TokenSession {
    session: Session,
    token: String,
    /// Private-key handles by label, so a signature costs one C_Sign.
    keys: HashMap<String, (ObjectHandle, KeyType)>,
}

impl TokenSession {
    pub fn token(&self) -> &str {
        &self.token
    }

    fn err(&self, op: &str, e: CkError) -> HsmError {
        HsmError::pkcs11(&self.token, op, e)
    }

    fn find(&self, class: ObjectClass, label: &str) -> Result<Vec<ObjectHandle>> {
        self.session
            .find_objects(&[
                Attribute::Class(class),
                Attribute::Token(true),
                Attribute::Label(label.as_bytes().to_vec()),
            ])
            .map_err(|e| self.err("C_FindObjects", e))
    }

    fn find_one(
        &self,
        class: ObjectClass,
        what: &'static str,
        label: &str,
    ) -> Result<ObjectHandle> {
        match self.find(class, label)?.as_slice() {
            [one] => Ok(*one),
            [] => Err(HsmError::ObjectNotFound {
                token: self.token.clone(),
                what,
                label: label.to_string(),
            }),
            many => Err(HsmError::Invalid(format!(
                "token {:?}: {} objects are {what}s labelled {label:?}; labels must be unique",
                self.token,
                many.len()
            ))),
        }
    }

    /// The handle of the private key labelled `label` (cached).
    pub fn private_key(&mut self, label: &str) -> Result<ObjectHandle> {
        self.private_key_typed(label).map(|(h, _)| h)
    }

    /// The handle and key type of the private key labelled `label`.
    fn private_key_typed(&mut self, label: &str) -> Result<(ObjectHandle, KeyType)> {
        if let Some(k) = self.keys.get(label) {
            return Ok(*k);
        }
        let h = self.find_one(ObjectClass::PRIVATE_KEY, "private key", label)?;
        let kt = self
            .session
            .get_attributes(h, &[AttributeType::KeyType])
            .map_err(|e| self.err("C_GetAttributeValue", e))?
            .into_iter()
            .find_map(|a| match a {
                Attribute::KeyType(k) => Some(k),
                _ => None,
            })
            .ok_or_else(|| HsmError::Invalid(format!("key {label:?} has no CKA_KEY_TYPE")))?;
        self.keys.insert(label.to_string(), (h, kt));
        Ok((h, kt))
    }

    /// Signs `msg` with the private key labelled `key`: hash in software,
    /// C_Sign in the token, DER in software.
    pub fn sign(&mut self, key: &str, mech: SignMech, msg: &[u8]) -> Result<Vec<u8>> {
        let (handle, key_type) = self.private_key_typed(key)?;
        // Checked here, not left to the token: SoftHSM 2.6 dereferences a
        // missing RSA modulus (and crashes the process) when asked for
        // RSA-PSS with an EC key.
        let want = if mech.is_ecdsa() {
            KeyType::EC
        } else {
            KeyType::RSA
        };
        if key_type != want {
            return Err(HsmError::KeyMismatch {
                label: key.to_string(),
                mech: mech.name(),
                reason: format!("it is a {key_type} key"),
            });
        }
        let (mechanism, data) = mech.prepare(msg);
        let raw = match self.session.sign(&mechanism, handle, &data) {
            Ok(raw) => raw,
            Err(CkError::Pkcs11(RvError::KeyHandleInvalid | RvError::ObjectHandleInvalid, _)) => {
                // The key was destroyed (rotation) or re-created: look again.
                self.keys.remove(key);
                let (handle, _) = self.private_key_typed(key)?;
                self.session
                    .sign(&mechanism, handle, &data)
                    .map_err(|e| self.err("C_Sign", e))?
            }
            Err(CkError::Pkcs11(
                rv @ (RvError::KeyTypeInconsistent
                | RvError::KeyFunctionNotPermitted
                | RvError::MechanismInvalid
                | RvError::DataLenRange),
                _,
            )) => {
                return Err(HsmError::KeyMismatch {
                    label: key.to_string(),
                    mech: mech.name(),
                    reason: format!("{rv:?}"),
                })
            }
            Err(e) => return Err(self.err("C_Sign", e)),
        };
        mech.finish(key, raw)
    }

    /// Generates a key pair labelled `label` on the token. Every security
    /// attribute is set explicitly: SoftHSM2's defaults (SENSITIVE false,
    /// DECRYPT true, ...) are not safe for a CA key.
    pub fn generate_key_pair(&mut self, label: &str, alg: KeyAlg) -> Result<PublicKey> {
        self.label_free(label)?;
        let mut public = key_attrs(label);
        public.extend(PUBLIC_KEY_ATTRS);
        let mut private = key_attrs(label);
        private.extend(PRIVATE_KEY_ATTRS);
        let mechanism = match alg {
            KeyAlg::EcP256 | KeyAlg::EcP384 => {
                let oid = if alg == KeyAlg::EcP256 {
                    OID_P256
                } else {
                    OID_P384
                };
                public.push(Attribute::EcParams(oid.to_vec()));
                Mechanism::EccKeyPairGen
            }
            KeyAlg::Rsa2048 | KeyAlg::Rsa3072 => {
                let bits: u64 = if alg == KeyAlg::Rsa2048 { 2048 } else { 3072 };
                public.push(Attribute::ModulusBits(bits.into()));
                public.push(Attribute::PublicExponent(vec![0x01, 0x00, 0x01]));
                Mechanism::RsaPkcsKeyPairGen
            }
        };
        let (pub_h, priv_h) = self
            .session
            .generate_key_pair(&mechanism, &public, &private)
            .map_err(|e| self.err("C_GenerateKeyPair", e))?;
        self.settle(label, &[priv_h, pub_h])
    }

    /// Fails unless no object of any key or certificate class has `label`.
    fn label_free(&self, label: &str) -> Result<()> {
        for (class, what) in [
            (ObjectClass::PRIVATE_KEY, "a private key"),
            (ObjectClass::PUBLIC_KEY, "a public key"),
            (ObjectClass::CERTIFICATE, "a certificate"),
        ] {
            if !self.find(class, label)?.is_empty() {
                return Err(HsmError::Invalid(format!(
                    "token {:?} already holds {what} labelled {label:?}",
                    self.token
                )));
            }
        }
        Ok(())
    }

    /// After `made` (this session's new objects of `label`): its public
    /// key, if the label is still unique; else (another process made one
    /// at the same moment, or the read failed) `made` is destroyed again.
    fn settle(&mut self, label: &str, made: &[ObjectHandle]) -> Result<PublicKey> {
        let unique = self.find(ObjectClass::PRIVATE_KEY, label)?.len() == 1
            && self.find(ObjectClass::PUBLIC_KEY, label)?.len() == 1;
        let r = if unique {
            self.public_key(label)
        } else {
            Err(HsmError::Invalid(format!(
                "another key labelled {label:?} was made on token {:?} at the same time: \
                 this one is undone",
                self.token
            )))
        };
        if r.is_err() {
            self.keys.remove(label);
            for h in made {
                let _ = self.session.destroy_object(*h);
            }
        }
        r
    }

    /// Stores an existing key pair on the token under `label`: the private
    /// key SENSITIVE, not EXTRACTABLE, sign only (as generated keys are;
    /// a token reports it never ALWAYS_SENSITIVE, since it was outside),
    /// and its public key beside it.
    pub fn import_key_pair(&mut self, label: &str, key: &KeyParts) -> Result<PublicKey> {
        self.label_free(label)?;
        let common = |class: ObjectClass, key_type: KeyType| {
            let mut v = vec![Attribute::Class(class), Attribute::KeyType(key_type)];
            v.extend(key_attrs(label));
            v
        };
        let (mut private, mut public) = match key {
            KeyParts::Ec { alg, d, point } => {
                let oid = if *alg == KeyAlg::EcP256 {
                    OID_P256
                } else {
                    OID_P384
                };
                let mut private = common(ObjectClass::PRIVATE_KEY, KeyType::EC);
                private.push(Attribute::EcParams(oid.to_vec()));
                private.push(Attribute::Value(d.to_vec()));
                let mut public = common(ObjectClass::PUBLIC_KEY, KeyType::EC);
                public.push(Attribute::EcParams(oid.to_vec()));
                let mut wrapped = vec![0x04];
                der_len(&mut wrapped, point.len());
                wrapped.extend_from_slice(point);
                public.push(Attribute::EcPoint(wrapped));
                (private, public)
            }
            KeyParts::Rsa {
                n,
                e,
                d,
                p,
                q,
                dp,
                dq,
                qinv,
                ..
            } => {
                let mut private = common(ObjectClass::PRIVATE_KEY, KeyType::RSA);
                private.extend([
                    Attribute::Modulus(n.clone()),
                    Attribute::PublicExponent(e.clone()),
                    Attribute::PrivateExponent(d.to_vec()),
                    Attribute::Prime1(p.to_vec()),
                    Attribute::Prime2(q.to_vec()),
                    Attribute::Exponent1(dp.to_vec()),
                    Attribute::Exponent2(dq.to_vec()),
                    Attribute::Coefficient(qinv.to_vec()),
                ]);
                let mut public = common(ObjectClass::PUBLIC_KEY, KeyType::RSA);
                public.extend([
                    Attribute::Modulus(n.clone()),
                    Attribute::PublicExponent(e.clone()),
                ]);
                (private, public)
            }
        };
        private.extend(PRIVATE_KEY_ATTRS);
        public.extend(PUBLIC_KEY_ATTRS);
        let made = self
            .session
            .create_object(&private)
            .map_err(|e| self.err("C_CreateObject", e));
        // The template's copies of the secret parts go now, whatever
        // happened.
        for a in private.iter_mut() {
            if let Attribute::Value(v)
            | Attribute::PrivateExponent(v)
            | Attribute::Prime1(v)
            | Attribute::Prime2(v)
            | Attribute::Exponent1(v)
            | Attribute::Exponent2(v)
            | Attribute::Coefficient(v) = a
            {
                v.zeroize();
            }
        }
        let priv_h = made?;
        match self.session.create_object(&public) {
            Ok(pub_h) => self.settle(label, &[priv_h, pub_h]),
            Err(e) => {
                let err = self.err("C_CreateObject", e);
                let _ = self.session.destroy_object(priv_h);
                Err(err)
            }
        }
    }

    /// Reads the public key labelled `label` from its CKO_PUBLIC_KEY object.
    pub fn public_key(&self, label: &str) -> Result<PublicKey> {
        let h = self.find_one(ObjectClass::PUBLIC_KEY, "public key", label)?;
        let attrs = self
            .session
            .get_attributes(
                h,
                &[
                    AttributeType::KeyType,
                    AttributeType::EcParams,
                    AttributeType::EcPoint,
                    AttributeType::Modulus,
                    AttributeType::PublicExponent,
                ],
            )
            .map_err(|e| self.err("C_GetAttributeValue", e))?;
        let mut key_type = None;
        let (mut params, mut point, mut modulus, mut exponent) = (None, None, None, None);
        for a in attrs {
            match a {
                Attribute::KeyType(k) => key_type = Some(k),
                Attribute::EcParams(v) => params = Some(v),
                Attribute::EcPoint(v) => point = Some(v),
                Attribute::Modulus(v) => modulus = Some(v),
                Attribute::PublicExponent(v) => exponent = Some(v),
                _ => {}
            }
        }
        let bad = |why: &str| {
            HsmError::Invalid(format!(
                "token {:?}: public key {label:?} {why}",
                self.token
            ))
        };
        match key_type {
            Some(KeyType::EC) => {
                let params = params.ok_or_else(|| bad("has no CKA_EC_PARAMS"))?;
                let alg = match params.as_slice() {
                    OID_P256 => KeyAlg::EcP256,
                    OID_P384 => KeyAlg::EcP384,
                    _ => return Err(bad("is on an unsupported curve")),
                };
                let point = point.ok_or_else(|| bad("has no CKA_EC_POINT"))?;
                Ok(PublicKey {
                    alg,
                    raw: unwrap_octet_string(&point).ok_or_else(|| bad("has a malformed point"))?,
                })
            }
            Some(KeyType::RSA) => {
                let n = modulus.ok_or_else(|| bad("has no CKA_MODULUS"))?;
                let e = exponent.ok_or_else(|| bad("has no CKA_PUBLIC_EXPONENT"))?;
                let alg = match n.iter().skip_while(|&&b| b == 0).count() * 8 {
                    2048 => KeyAlg::Rsa2048,
                    3072 => KeyAlg::Rsa3072,
                    bits => return Err(bad(&format!("has an unsupported {bits}-bit modulus"))),
                };
                let mut body = Vec::new();
                der_uint(&mut body, &n);
                der_uint(&mut body, &e);
                let mut raw = vec![0x30];
                der_len(&mut raw, body.len());
                raw.extend_from_slice(&body);
                Ok(PublicKey { alg, raw })
            }
            _ => Err(bad("is neither EC nor RSA")),
        }
    }

    /// Stores a DER certificate on the token under `label`, replacing any
    /// certificate already stored there.
    pub fn store_certificate(&self, label: &str, der: &[u8], subject: &[u8]) -> Result<()> {
        for h in self.find(ObjectClass::CERTIFICATE, label)? {
            self.session
                .destroy_object(h)
                .map_err(|e| self.err("C_DestroyObject", e))?;
        }
        self.session
            .create_object(&[
                Attribute::Class(ObjectClass::CERTIFICATE),
                Attribute::CertificateType(CertificateType::X_509),
                Attribute::Token(true),
                Attribute::Private(false),
                Attribute::Label(label.as_bytes().to_vec()),
                Attribute::Id(key_id(label)),
                Attribute::Subject(subject.to_vec()),
                Attribute::Value(der.to_vec()),
            ])
            .map_err(|e| self.err("C_CreateObject", e))?;
        Ok(())
    }

    /// The DER certificate stored under `label`, if any.
    pub fn certificate(&self, label: &str) -> Result<Option<Vec<u8>>> {
        let Some(&h) = self.find(ObjectClass::CERTIFICATE, label)?.first() else {
            return Ok(None);
        };
        let attrs = self
            .session
            .get_attributes(h, &[AttributeType::Value])
            .map_err(|e| self.err("C_GetAttributeValue", e))?;
        Ok(attrs.into_iter().find_map(|a| match a {
            Attribute::Value(v) => Some(v),
            _ => None,
        }))
    }

    /// The values of the data objects (CKO_DATA) of `application` labelled
    /// `label` (one normally, two if a [`Self::set_data_object`] was cut
    /// short between its two steps), or of all its objects for `None`.
    pub fn data_objects(&self, application: &str, label: Option<&str>) -> Result<Vec<Vec<u8>>> {
        let mut values = Vec::new();
        for h in self.find_data(application, label)? {
            let attrs = self
                .session
                .get_attributes(h, &[AttributeType::Value])
                .map_err(|e| self.err("C_GetAttributeValue", e))?;
            values.extend(attrs.into_iter().find_map(|a| match a {
                Attribute::Value(v) => Some(v),
                _ => None,
            }));
        }
        Ok(values)
    }

    /// Replaces the data object of `application` labelled `label` with one
    /// holding `value`: a private token object, so only a logged-in user
    /// reads it, and not modifiable (SoftHSM2 refuses to change a data
    /// object's value anyway). The new object is created before the old
    /// ones are destroyed, so a reader always finds one.
    pub fn set_data_object(&self, application: &str, label: &str, value: &[u8]) -> Result<()> {
        let old = self.find_data(application, Some(label))?;
        self.session
            .create_object(&[
                Attribute::Class(ObjectClass::DATA),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Modifiable(false),
                Attribute::Application(application.as_bytes().to_vec()),
                Attribute::Label(label.as_bytes().to_vec()),
                Attribute::Value(value.to_vec()),
            ])
            .map_err(|e| self.err("C_CreateObject", e))?;
        for h in old {
            self.session
                .destroy_object(h)
                .map_err(|e| self.err("C_DestroyObject", e))?;
        }
        Ok(())
    }

    fn find_data(&self, application: &str, label: Option<&str>) -> Result<Vec<ObjectHandle>> {
        let mut template = vec![
            Attribute::Class(ObjectClass::DATA),
            Attribute::Token(true),
            Attribute::Application(application.as_bytes().to_vec()),
        ];
        template.extend(label.map(|l| Attribute::Label(l.as_bytes().to_vec())));
        self.session
            .find_objects(&template)
            .map_err(|e| self.err("C_FindObjects", e))
    }

    /// Destroys the private key, public key and certificate labelled
    /// `label`; returns how many objects went.
    pub fn destroy(&mut self, label: &str) -> Result<usize> {
        self.keys.remove(label);
        let mut n = 0;
        for class in [
            ObjectClass::PRIVATE_KEY,
            ObjectClass::PUBLIC_KEY,
            ObjectClass::CERTIFICATE,
        ] {
            for h in self.find(class, label)? {
                self.session
                    .destroy_object(h)
                    .map_err(|e| self.err("C_DestroyObject", e))?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Whether an AES key labelled `label` is on the token.
    pub fn has_secret_key(&self, label: &str) -> Result<bool> {
        Ok(!self.find(ObjectClass::SECRET_KEY, label)?.is_empty())
    }

    /// Makes an AES-256 key labelled `label` on the token: SENSITIVE, not
    /// EXTRACTABLE, encrypt and decrypt only (SoftHSM2's defaults are
    /// not safe: every attribute is set).
    pub fn generate_aes_key(&mut self, label: &str) -> Result<()> {
        if self.has_secret_key(label)? {
            return Err(HsmError::Invalid(format!(
                "token {:?} already holds a secret key labelled {label:?}",
                self.token
            )));
        }
        let mut attrs = key_attrs(label);
        attrs.extend([
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(32.into()),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Sign(false),
            Attribute::Verify(false),
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
            Attribute::Copyable(false),
            Attribute::Destroyable(true),
        ]);
        let made = self
            .session
            .generate_key(&Mechanism::AesKeyGen, &attrs)
            .map_err(|e| self.err("C_GenerateKey", e))?;
        if self.find(ObjectClass::SECRET_KEY, label)?.len() != 1 {
            let _ = self.session.destroy_object(made);
            return Err(HsmError::Invalid(format!(
                "another secret key labelled {label:?} was made on token {:?} at the same \
                 time: this one is undone",
                self.token
            )));
        }
        Ok(())
    }

    /// AES-GCM (128-bit tag) with the token's key `label`: encrypts `data`
    /// (the tag appended) or decrypts and authenticates it.
    pub fn aes_gcm(
        &self,
        label: &str,
        encrypt: bool,
        iv: &[u8; 12],
        aad: &[u8],
        data: &[u8],
    ) -> Result<Vec<u8>> {
        let key = self.find_one(ObjectClass::SECRET_KEY, "secret key", label)?;
        let mut iv = *iv;
        let params = cryptoki::mechanism::aead::GcmParams::new(&mut iv, aad, 128.into())
            .map_err(|e| self.err("GCM parameters", e))?;
        let mech = Mechanism::AesGcm(params);
        if encrypt {
            self.session
                .encrypt(&mech, key, data)
                .map_err(|e| self.err("C_Encrypt", e))
        } else {
            self.session
                .decrypt(&mech, key, data)
                .map_err(|e| self.err("C_Decrypt", e))
        }
    }

    /// Destroys the secret keys labelled `label`; how many there were.
    pub fn destroy_secret_key(&mut self, label: &str) -> Result<usize> {
        let found = self.find(ObjectClass::SECRET_KEY, label)?;
        for h in &found {
            self.session
                .destroy_object(*h)
                .map_err(|e| self.err("C_DestroyObject", e))?;
        }
        Ok(found.len())
    }

    /// Labels of the private keys on the token whose label starts with
    /// `prefix`, sorted.
    pub fn private_key_labels(&self, prefix: &str) -> Result<Vec<String>> {
        let handles = self
            .session
            .find_objects(&[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::Token(true),
            ])
            .map_err(|e| self.err("C_FindObjects", e))?;
        let mut labels = Vec::new();
        for h in handles {
            let attrs = self
                .session
                .get_attributes(h, &[AttributeType::Label])
                .map_err(|e| self.err("C_GetAttributeValue", e))?;
            for a in attrs {
                if let Attribute::Label(l) = a {
                    let l = String::from_utf8_lossy(&l).into_owned();
                    if l.starts_with(prefix) {
                        labels.push(l);
                    }
                }
            }
        }
        labels.sort();
        Ok(labels)
    }

    /// The security attributes of the private key labelled `label`, for
    /// audits and tests: (attribute, value) pairs as the token reports them.
    pub fn private_key_flags(&mut self, label: &str) -> Result<Vec<(&'static str, bool)>> {
        let h = self.private_key(label)?;
        let wanted = [
            (AttributeType::Token, "token"),
            (AttributeType::Private, "private"),
            (AttributeType::Sensitive, "sensitive"),
            (AttributeType::AlwaysSensitive, "always-sensitive"),
            (AttributeType::Extractable, "extractable"),
            (AttributeType::NeverExtractable, "never-extractable"),
            (AttributeType::Sign, "sign"),
            (AttributeType::Decrypt, "decrypt"),
            (AttributeType::Unwrap, "unwrap"),
            (AttributeType::Derive, "derive"),
        ];
        let types: Vec<_> = wanted.iter().map(|(t, _)| *t).collect();
        let attrs = self
            .session
            .get_attributes(h, &types)
            .map_err(|e| self.err("C_GetAttributeValue", e))?;
        let mut out = Vec::new();
        for a in attrs {
            let v = match &a {
                Attribute::Token(v)
                | Attribute::Private(v)
                | Attribute::Sensitive(v)
                | Attribute::AlwaysSensitive(v)
                | Attribute::Extractable(v)
                | Attribute::NeverExtractable(v)
                | Attribute::Sign(v)
                | Attribute::Decrypt(v)
                | Attribute::Unwrap(v)
                | Attribute::Derive(v) => *v,
                _ => continue,
            };
            let t = a.attribute_type();
            if let Some((_, name)) = wanted.iter().find(|(w, _)| *w == t) {
                out.push((*name, v));
            }
        }
        Ok(out)
    }

    /// Asks the token for each secret component of the private key
    /// (CKA_VALUE for EC; the private exponent, primes, CRT exponents and
    /// coefficient for RSA) with C_GetAttributeValue's size query. A
    /// correctly protected key answers "sensitive" for every one; no value
    /// is ever requested.
    pub fn probe_private_secrets(
        &mut self,
        label: &str,
    ) -> Result<Vec<(AttributeType, cryptoki::object::AttributeInfo)>> {
        let (h, kt) = self.private_key_typed(label)?;
        let secrets: &[AttributeType] = if kt == KeyType::RSA {
            &[
                AttributeType::PrivateExponent,
                AttributeType::Prime1,
                AttributeType::Prime2,
                AttributeType::Exponent1,
                AttributeType::Exponent2,
                AttributeType::Coefficient,
            ]
        } else {
            &[AttributeType::Value]
        };
        let info = self
            .session
            .get_attribute_info(h, secrets)
            .map_err(|e| self.err("C_GetAttributeValue", e))?;
        Ok(secrets.iter().copied().zip(info).collect())
    }

    /// The underlying session, for provisioning (token and PIN set-up).
    pub fn raw(&self) -> &Session {
        &self.session
    }
}

/// Strips the DER OCTET STRING that PKCS#11 wraps CKA_EC_POINT in (some
/// modules return the bare point; both are accepted).
fn unwrap_octet_string(v: &[u8]) -> Option<Vec<u8>> {
    if v.first() == Some(&0x04) && v.len() > 2 {
        let (len, hdr) = match v[1] {
            l if l < 0x80 => (l as usize, 2),
            0x81 if v.len() > 3 => (v[2] as usize, 3),
            _ => return None,
        };
        if hdr + len == v.len() && v.get(hdr) == Some(&0x04) {
            return Some(v[hdr..].to_vec());
        }
    }
    // A bare uncompressed point (0x04 || X || Y) of P-256 or P-384.
    (v.first() == Some(&0x04) && (v.len() == 65 || v.len() == 97)).then(|| v.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ec_point_wrapping_is_removed() {
        let mut point = vec![0x04];
        point.extend([7u8; 64]);
        let mut wrapped = vec![0x04, 65];
        wrapped.extend(&point);
        assert_eq!(unwrap_octet_string(&wrapped).unwrap(), point);
        assert_eq!(unwrap_octet_string(&point).unwrap(), point);
        assert!(unwrap_octet_string(&[0x04, 10, 0x04]).is_none());
        assert!(unwrap_octet_string(&[]).is_none());
    }

    #[test]
    fn key_ids_are_stable_and_distinct() {
        assert_eq!(key_id("a"), key_id("a"));
        assert_ne!(key_id("a"), key_id("b"));
    }
}
