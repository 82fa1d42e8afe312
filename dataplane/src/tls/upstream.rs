//! The upstream leg: the engine as a TLS client toward the real server,
//! with the client's server name and ALPN list, the profile's versions,
//! suites and groups (post-quantum hybrid first, as rustls offers by
//! default), session resumption toward servers, and no client
//! certificate.
//!
//! Certificates are not judged during the handshake: the verifier accepts
//! any chain and the intercept stage classifies the chain the server sent
//! once the handshake is through, before a byte of the client's reaches
//! the server, so that one problem cannot hide another and a profile can
//! pass a problem on rather than only fail. The handshake signatures are
//! verified for real, against the key of the certificate the server sent:
//! whoever completes the handshake holds that certificate's key.

use std::{
    fs::File,
    io::{Read, Write},
    net::IpAddr,
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
};

use loupe_hsm::keylog::{self, DataKey, Segment};
use rustls::{
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        ResolvesClientCert,
    },
    crypto::{
        verify_tls12_signature, verify_tls13_signature, CryptoProvider, WebPkiSupportedAlgorithms,
    },
    pki_types::{CertificateDer, ServerName, UnixTime},
    sign::CertifiedKey,
    ClientConfig, ClientConnection, DigitallySignedStruct, KeyLog, SignatureScheme,
    SupportedProtocolVersion,
};

use crate::policy::{Profile, TlsVersion};

/// The provider a profile allows: its suites and groups, in rustls's order
/// of preference (the post-quantum hybrid first).
pub fn provider_for(profile: &Profile) -> CryptoProvider {
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    if !profile.suites.is_empty() {
        p.cipher_suites.retain(|s| {
            s.suite()
                .as_str()
                .is_some_and(|n| profile.suites.iter().any(|a| a == n))
        });
    }
    if !profile.groups.is_empty() {
        // The named groups in the provider's own order of preference.
        p.kx_groups = rustls::crypto::aws_lc_rs::ALL_KX_GROUPS
            .iter()
            .copied()
            .filter(|g| {
                g.name()
                    .as_str()
                    .is_some_and(|n| profile.groups.iter().any(|a| a == n))
            })
            .collect();
    }
    p
}

/// The protocol versions a profile allows.
pub fn versions_for(profile: &Profile) -> Vec<&'static SupportedProtocolVersion> {
    let mut v = Vec::new();
    if profile.max_version >= TlsVersion::Tls13 {
        v.push(&rustls::version::TLS13);
    }
    if profile.min_version <= TlsVersion::Tls12 {
        v.push(&rustls::version::TLS12);
    }
    v
}

/// What one upstream handshake showed beyond what rustls keeps: the chain
/// as the server sent it (also when the handshake then fails, e.g. on a
/// key too weak to verify its signature), and whether the server asked for
/// a client certificate.
#[derive(Debug, Default)]
pub struct Watch {
    chain: Mutex<Vec<CertificateDer<'static>>>,
    asked: AtomicBool,
}

impl Watch {
    /// The server asked for a client certificate.
    pub fn asked(&self) -> bool {
        self.asked.load(Ordering::Relaxed)
    }

    /// The chain the server sent (empty before its Certificate message,
    /// and on a resumed session: rustls keeps that one).
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        self.chain.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Runs `f` (rustls processing this connection's records) with this
    /// watch as the one the profile's verifier and resolver report to.
    pub fn during<T>(self: &Arc<Self>, f: impl FnOnce() -> T) -> T {
        WATCHING.with(|w| *w.borrow_mut() = Some(self.clone()));
        let out = f();
        WATCHING.with(|w| *w.borrow_mut() = None);
        out
    }
}

thread_local! {
    /// The watch of the upstream connection whose records this thread is
    /// processing: rustls calls the verifier and resolver synchronously,
    /// inside `process_new_packets`.
    static WATCHING: std::cell::RefCell<Option<Arc<Watch>>> = const { std::cell::RefCell::new(None) };
}

fn watching(f: impl FnOnce(&Watch)) {
    WATCHING.with(|w| {
        if let Some(w) = w.borrow().as_ref() {
            f(w)
        }
    });
}

/// A profile's certificate verifier and client certificate resolver, one
/// per profile: rustls resumes a session only with the very objects that
/// verified it, so they cannot be made per connection. They report to the
/// connection's [`Watch`]. The verifier accepts any chain (judged after the
/// handshake) and verifies handshake signatures with the provider's
/// algorithms; the resolver offers no certificate.
#[derive(Debug)]
struct Observer {
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Observer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // Judged after the handshake (see the module note): the stage
        // classifies the chain before the client's data flows.
        watching(|w| {
            *w.chain.lock().unwrap_or_else(|p| p.into_inner()) = std::iter::once(end_entity)
                .chain(intermediates)
                .map(|c| c.clone().into_owned())
                .collect();
        });
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// A server's CertificateRequest: the engine has no certificate to give
/// (the client's stays with the client), so it answers with none and the
/// connection is handled by the profile's `client_auth`.
impl ResolvesClientCert for Observer {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        watching(|w| w.asked.store(true, Ordering::Relaxed));
        None
    }

    fn has_certs(&self) -> bool {
        false
    }
}

/// TLS secrets in the NSS key log format
/// (`LABEL <client random hex> <secret hex>`), appended to a file; for
/// debugging with Wireshark, off unless a profile names a file. The
/// engine seals each line ([`loupe_hsm::keylog`]: a segment of the run's
/// data key, which the HSM's master key seals), so the file decrypts
/// nothing without the token; `loupe keylog open` gives the NSS lines.
pub struct KeyLogFile {
    file: Mutex<(File, Option<Segment>)>,
}

impl std::fmt::Debug for KeyLogFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyLogFile")
    }
}

impl KeyLogFile {
    /// Opens (creates, mode 0600) `path` for appending. The secrets in it
    /// decrypt every logged connection, so the file must be one nobody
    /// else can read or swap: a regular file (not a FIFO that would block
    /// the engine, not a symbolic link someone planted), owned by the
    /// engine's user, with no group or other access.
    pub fn open(path: &Path, sealed: Option<&DataKey>) -> Result<KeyLogFile, String> {
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let bad = |why: String| format!("cannot use the key log {}: {why}", path.display());
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ELOOP) => bad("it is a symbolic link".into()),
                Some(libc::ENXIO) => bad("it is a FIFO".into()),
                _ => bad(e.to_string()),
            })?;
        let meta = file.metadata().map_err(|e| bad(e.to_string()))?;
        if let Some(why) = keylog_file_problem(&meta) {
            return Err(bad(why));
        }
        // SAFETY: geteuid(2) has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        if meta.uid() != me {
            return Err(bad(format!(
                "it is owned by uid {}, not by the engine's uid {me}",
                meta.uid()
            )));
        }
        let segment = match sealed {
            None => None,
            Some(key) => {
                let prev = sealed_tail(path, &file, meta.len()).map_err(bad)?;
                let seg = key.segment(&prev)?;
                let mut file = &file;
                if meta.len() == 0 {
                    file.write_all(keylog::BANNER.as_bytes())
                        .map_err(|e| bad(e.to_string()))?;
                }
                file.write_all(seg.header().as_bytes())
                    .map_err(|e| bad(e.to_string()))?;
                Some(seg)
            }
        };
        Ok(KeyLogFile {
            file: Mutex::new((file, segment)),
        })
    }
}

/// The last line of the sealed key log at `path` (`len` bytes), which a
/// new segment follows: the banner for an empty file. A sealed log starts
/// with the banner; one whose end was torn (an engine stopped mid-line)
/// loses the torn bytes, which never were a whole record.
fn sealed_tail(path: &Path, file: &File, len: u64) -> Result<String, String> {
    use std::io::{Seek, SeekFrom};
    if len == 0 {
        return Ok(keylog::BANNER.to_string());
    }
    if !keylog::starts_sealed(path) {
        return Err("it is not a sealed key log (a clear one?): move it away".into());
    }
    let mut f = File::open(path).map_err(|e| e.to_string())?;
    let window = (2 * keylog::MAX_FILE_LINE as u64).min(len);
    f.seek(SeekFrom::Start(len - window))
        .map_err(|e| e.to_string())?;
    let mut tail = Vec::new();
    f.take(window)
        .read_to_end(&mut tail)
        .map_err(|e| e.to_string())?;
    // The whole lines: up to the last newline.
    let end = tail
        .iter()
        .rposition(|&b| b == b'\n')
        .ok_or("its end is not a line of a sealed key log: move it away")?;
    if end + 1 < tail.len() {
        let keep = len - (tail.len() - end - 1) as u64;
        file.set_len(keep)
            .map_err(|e| format!("cannot cut its torn last line: {e}"))?;
        eprintln!(
            "loupe-dataplane: warning: the key log {} ended in a torn line ({} bytes): cut",
            path.display(),
            tail.len() - end - 1
        );
    }
    let start = tail[..end]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |p| p + 1);
    if start == 0 && window < len {
        return Err("its last line is longer than any of a sealed key log: move it away".into());
    }
    String::from_utf8(tail[start..end].to_vec())
        .map_err(|_| "its last line is not text: move it away".into())
}

/// Why an existing file cannot be a key log whoever owns it: it is not a
/// regular file, or its mode gives access beyond its owner. The engine
/// checks the file it opened; `loupe policy check` the path (unfollowed).
pub fn keylog_file_problem(meta: &std::fs::Metadata) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    if !meta.is_file() {
        return Some(format!("it is {}", crate::sys::file_kind(meta)));
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Some(format!(
            "its mode {mode:o} gives access beyond its owner; chmod 600 it"
        ));
    }
    // Another name for the file would be a second writer (or reader).
    (meta.nlink() > 1).then(|| format!("it has {} names (hard links)", meta.nlink()))
}

/// One line of the NSS key log format: `LABEL <client random> <secret>`
/// in hex, with its newline.
pub fn keylog_line(label: &str, client_random: &[u8], secret: &[u8]) -> String {
    let mut line =
        String::with_capacity(label.len() + 3 + 2 * (client_random.len() + secret.len()));
    line.push_str(label);
    line.push(' ');
    for b in client_random {
        line.push_str(&format!("{b:02x}"));
    }
    line.push(' ');
    for b in secret {
        line.push_str(&format!("{b:02x}"));
    }
    line.push('\n');
    line
}

impl KeyLog for KeyLogFile {
    fn log(&self, label: &str, client_random: &[u8], secret: &[u8]) {
        let line = keylog_line(label, client_random, secret);
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let (file, segment) = &mut *f;
        let out = match segment {
            None => line,
            Some(s) => match s.seal(&line) {
                Ok(sealed) => sealed,
                Err(e) => {
                    eprintln!(
                        "loupe-dataplane: warning: key log line not sealed, not written: {e}"
                    );
                    return;
                }
            },
        };
        if let Err(e) = file.write_all(out.as_bytes()) {
            eprintln!("loupe-dataplane: warning: key log write failed: {e}");
        }
    }

    fn will_log(&self, _label: &str) -> bool {
        true
    }
}

/// A profile's client configuration, shared by its connections (and with
/// it the session cache that resumes sessions toward servers).
pub fn client_config(
    profile: &Profile,
    keylog: Option<Arc<dyn KeyLog>>,
) -> Result<ClientConfig, String> {
    let provider = Arc::new(provider_for(profile));
    let observer = Arc::new(Observer {
        algs: provider.signature_verification_algorithms,
    });
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&versions_for(profile))
        .map_err(|e| format!("no usable TLS versions, suites and groups: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(observer.clone())
        .with_client_cert_resolver(observer);
    if let Some(k) = keylog {
        cfg.key_log = k;
    }
    Ok(cfg)
}

/// The name the engine asks the server for: the client's SNI, or none
/// (the server's address stands in for certificate checks) when the client
/// sent none or an IP literal.
pub fn server_name(sni: Option<&str>, server: IpAddr) -> (ServerName<'static>, bool) {
    if let Some(s) = sni {
        if s.parse::<IpAddr>().is_err() {
            if let Ok(name) = ServerName::try_from(s.to_string()) {
                return (name, true);
            }
        }
    }
    (ServerName::IpAddress(server.into()), false)
}

/// Opens the upstream leg with the profile's configuration (shared: its
/// session cache resumes sessions toward servers), and the [`Watch`] its
/// records must be processed under.
pub fn connect(
    base: &Arc<ClientConfig>,
    name: ServerName<'static>,
    alpn: Vec<Vec<u8>>,
) -> Result<(ClientConnection, Arc<Watch>), rustls::Error> {
    // An IP address is never sent as SNI (RFC 6066 §3); rustls does so.
    let conn = ClientConnection::new_with_alpn(base.clone(), name, alpn)?;
    Ok((conn, Arc::new(Watch::default())))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use super::*;

    struct Dir(std::path::PathBuf);

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn dir(name: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("loupe-keylog-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir(&d).unwrap();
        Dir(d)
    }

    #[test]
    fn a_key_log_is_created_private_and_appended_to() {
        let d = dir("new");
        let path = d.0.join("keys.log");
        let k = KeyLogFile::open(&path, None).unwrap();
        k.log("CLIENT_RANDOM", &[1, 2], &[0xab]);
        drop(k);
        let k = KeyLogFile::open(&path, None).unwrap();
        k.log("CLIENT_RANDOM", &[3], &[0xcd]);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, "CLIENT_RANDOM 0102 ab\nCLIENT_RANDOM 03 cd\n");
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
    }

    /// The engine's key logs: each line sealed, a run a segment of its
    /// own, nothing in clear; a clear key log is not appended to.
    #[test]
    fn a_sealed_key_log_holds_no_secret_in_clear_and_opens_line_by_line() {
        let d = dir("sealed");
        let path = d.0.join("keys.sealed");
        let toy = |k: &[u8]| -> Result<Vec<u8>, String> { Ok(k.iter().map(|b| b ^ 1).collect()) };
        for (label, secret) in [("CLIENT_RANDOM", 0xabu8), ("EXPORTER_SECRET", 0xcd)] {
            let key = DataKey::new(toy).unwrap();
            let k = KeyLogFile::open(&path, Some(&key)).unwrap();
            // Long enough that random hex cannot contain them by chance
            // (two bytes, "0707", came up in about one run in a hundred).
            k.log(label, &[7; 16], &[secret; 16]);
            k.log(label, &[8; 16], &[secret; 16]);
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let hex = |b: u8| format!("{b:02x}").repeat(16);
        for clear in [
            "CLIENT_RANDOM",
            "EXPORTER",
            &hex(0xab),
            &hex(0xcd),
            &hex(7),
            &hex(8),
        ] {
            assert!(!text.contains(clear), "{clear} in clear:\n{text}");
        }
        assert_eq!(text.lines().filter(|l| l.starts_with("S ")).count(), 2);
        let unseal =
            |b: &[u8]| -> Result<Vec<u8>, String> { Ok(b.iter().map(|x| x ^ 1).collect()) };
        let opened = keylog::open(text.as_bytes(), unseal).unwrap();
        let both = format!(
            "CLIENT_RANDOM {} {}\nCLIENT_RANDOM {} {}\nEXPORTER_SECRET {} {}\nEXPORTER_SECRET {} {}\n",
            hex(7),
            hex(0xab),
            hex(8),
            hex(0xab),
            hex(7),
            hex(0xcd),
            hex(8),
            hex(0xcd)
        );
        assert_eq!(opened, both);
        // An engine stopped mid-line: the torn bytes are cut at the next
        // open, and the file still opens whole.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"R 00000000000000")
            .unwrap();
        let key = DataKey::new(toy).unwrap();
        KeyLogFile::open(&path, Some(&key))
            .unwrap()
            .log("CLIENT_RANDOM", &[9], &[1]);
        let text = std::fs::read_to_string(&path).unwrap();
        let opened = keylog::open(text.as_bytes(), unseal).unwrap();
        assert_eq!(opened, format!("{both}CLIENT_RANDOM 09 01\n"));
        // A key log kept in clear is not turned into a mixed file.
        let clear = d.0.join("clear.log");
        KeyLogFile::open(&clear, None)
            .unwrap()
            .log("CLIENT_RANDOM", &[1], &[2]);
        let key = DataKey::new(toy).unwrap();
        let e = KeyLogFile::open(&clear, Some(&key)).unwrap_err();
        assert!(e.contains("not a sealed key log"), "{e}");
    }

    #[test]
    fn a_key_log_that_others_could_read_or_swap_is_refused() {
        let d = dir("bad");
        // Readable by the group: refused, and left as it was.
        let open = d.0.join("open.log");
        std::fs::write(&open, b"").unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = KeyLogFile::open(&open, None).unwrap_err();
        assert!(e.contains("mode 640"), "{e}");
        // A symbolic link, even to a good file.
        let good = d.0.join("good.log");
        KeyLogFile::open(&good, None).unwrap();
        let link = d.0.join("link.log");
        std::os::unix::fs::symlink(&good, &link).unwrap();
        let e = KeyLogFile::open(&link, None).unwrap_err();
        assert!(e.contains("symbolic link"), "{e}");
        // A hard link: two names would be two writers.
        let hard = d.0.join("hard.log");
        std::fs::hard_link(&good, &hard).unwrap();
        let e = KeyLogFile::open(&hard, None).unwrap_err();
        assert!(e.contains("2 names (hard links)"), "{e}");
        std::fs::remove_file(&hard).unwrap();
        // A FIFO: refused at once (opening one for writing with no reader
        // would otherwise block or fail obscurely).
        let fifo = d.0.join("fifo.log");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo only creates a node.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = KeyLogFile::open(&fifo, None).unwrap_err();
        assert!(e.contains("it is a FIFO"), "{e}");
        // A directory.
        let e = KeyLogFile::open(&d.0, None).unwrap_err();
        assert!(e.contains("directory"), "{e}");
    }
}
