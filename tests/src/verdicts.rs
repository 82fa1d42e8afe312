//! Helpers for the decryption-verdict and certificate-cache tests
//! (`tests/tests/decrypt_verdicts.rs`): one nginx site per certificate
//! (its own port, an access log that shows whether a request ever reached
//! it), what a client saw of the impersonation certificate (by `openssl
//! s_client`), the flow log records of one site; and for the cache: a
//! relay that sees when the engine has finished each upstream handshake
//! ([`TlsRelay`]) and a way to keep the SoftHSM token from signing for a
//! while ([`HsmStall`]), so that a mint stays in flight.

use std::{
    io::{Read, Write},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::Context;
use serde_json::Value;

use crate::{
    harness::SERVER_V4,
    https::{Nginx, ServerCert},
    mitm::Mitm,
    netns::run,
    proc::Proc,
    wait_until,
};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// How long a client command may take on the loaded test machine.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(150);

/// A server site: nginx on its own port with one certificate, logging
/// every request it serves.
pub struct Site {
    pub nginx: Nginx,
    /// The name clients ask for (SNI and URL host).
    pub name: String,
    pub port: u16,
    pub access_log: PathBuf,
    /// SHA-256 (lowercase hex) of the leaf the server presents.
    pub leaf_sha256: String,
}

impl Site {
    /// nginx on `port` presenting `cert` to clients asking for `name`.
    /// `weak_ok` lowers OpenSSL's security level so that nginx agrees to
    /// serve SHA-1-signed or RSA-1024 certificates.
    pub fn start(
        m: &Mitm,
        port: u16,
        name: &str,
        cert: ServerCert,
        weak_ok: bool,
    ) -> anyhow::Result<Site> {
        let leaf_sha256 = cert_sha256(&cert.cert)?;
        let access_log = m.h.dir.join(format!("access-{port}.log"));
        let mut extra = format!("access_log {};", access_log.display());
        if weak_ok {
            extra.push_str("\n    ssl_ciphers DEFAULT:@SECLEVEL=0;");
        }
        let nginx = Nginx::start_with(&m.h, port, cert, false, &extra)?;
        Ok(Site {
            nginx,
            name: name.to_string(),
            port,
            access_log,
            leaf_sha256,
        })
    }

    /// The request lines nginx logged.
    pub fn requests(&self) -> Vec<String> {
        std::fs::read_to_string(&self.access_log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// `host:port` as the flow log writes the server.
    pub fn server(&self) -> String {
        format!("{SERVER_V4}:{}", self.port)
    }

    /// curl arguments for `path` on this site (IPv4), trusting `ca` only.
    pub fn curl_args(&self, m: &Mitm, path: &str) -> Vec<String> {
        m.curl_args(&self.name, SERVER_V4, self.port, path)
    }

    /// The flow log records of this site's connections that reached the
    /// TLS stage, oldest first.
    pub fn records(&self, m: &Mitm) -> Vec<Value> {
        let server = self.server();
        m.tls_records()
            .into_iter()
            .filter(|r| r["server"] == server.as_str() && r["sni"] == self.name.as_str())
            .collect()
    }

    /// Every flow log record of this site's connections (those that did
    /// not reach the TLS stage too), for failure messages.
    pub fn all_records(&self, m: &Mitm) -> Vec<Value> {
        let server = self.server();
        m.control
            .records()
            .into_iter()
            .filter(|r| r["server"] == server.as_str() && r["sni"] == self.name.as_str())
            .collect()
    }

    /// Waits until this site has `n` records; returns them all.
    pub fn wait_records(&self, m: &Mitm, n: usize) -> anyhow::Result<Vec<Value>> {
        wait_until(
            &format!("{n} TLS records of {}:{}", self.name, self.port),
            Duration::from_secs(90),
            || {
                let r = self.records(m);
                if r.len() >= n {
                    Ok(Some(r))
                } else {
                    Err(format!("{} so far: {r:?}", r.len()))
                }
            },
        )
    }
}

/// What a command printed and how it ended.
#[derive(Debug)]
pub struct Ran {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// It was killed at the deadline.
    pub timed_out: bool,
}

impl Ran {
    pub fn ok(&self) -> bool {
        self.status.success() && !self.timed_out
    }
}

/// Runs `cmd` with `input` on its stdin, killing it (by its PID) after
/// `timeout`; its output is drained while it runs.
pub fn run_timeout(mut cmd: Command, input: &[u8], timeout: Duration) -> anyhow::Result<Ran> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let mut out = child.stdout.take().context("stdout")?;
    let mut err = child.stderr.take().context("stderr")?;
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let mut proc = Proc::new("client", child);
    let (status, in_time) = proc.wait_timeout(timeout);
    let _ = writer.join();
    let stdout = String::from_utf8_lossy(&out_t.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err_t.join().unwrap_or_default()).into_owned();
    Ok(Ran {
        status,
        stdout,
        stderr,
        timed_out: !in_time,
    })
}

/// Runs `program args` in the client namespace (see [`run_timeout`]).
pub fn client(m: &Mitm, program: &str, args: &[String]) -> anyhow::Result<Ran> {
    let mut cmd = m.h.client.command(program);
    cmd.args(args);
    run_timeout(cmd, b"", CLIENT_TIMEOUT)
}

/// What `openssl s_client` saw.
#[derive(Debug)]
pub struct Seen {
    pub ran: Ran,
    /// The leaf the server side presented (PEM), if the handshake got that
    /// far.
    pub leaf: Option<String>,
    /// `Verify return code: N (...)`.
    pub verify: Option<String>,
}

impl Seen {
    /// The client got a certificate and verified the chain (return code
    /// 0; s_client also says 0 when it got no certificate at all).
    pub fn verified(&self) -> bool {
        self.leaf.is_some() && self.verify.as_deref().is_some_and(|v| v.starts_with("0 "))
    }
}

/// `openssl s_client` from the client namespace to `port` at the server's
/// IPv4 address, asking for `name`, trusting `cafile` (Loupe's CA) and
/// checking the host name; it completes the handshake whatever the
/// verification says (so the engine's side of it completes too), prints
/// the chain and closes.
pub fn s_client(m: &Mitm, port: u16, name: &str, cafile: &Path) -> anyhow::Result<Seen> {
    let mut cmd = m.h.client.command("openssl");
    cmd.args(["s_client", "-connect"])
        .arg(format!("{SERVER_V4}:{port}"))
        .args(["-servername", name, "-verify_hostname", name, "-showcerts"])
        .arg("-CAfile")
        .arg(cafile);
    let ran = run_timeout(cmd, b"", CLIENT_TIMEOUT)?;
    let leaf = first_pem(&ran.stdout);
    let verify = ran
        .stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("Verify return code: "))
        .map(str::to_owned);
    Ok(Seen { ran, leaf, verify })
}

/// The first PEM certificate in `text`.
pub fn first_pem(text: &str) -> Option<String> {
    let begin = text.find("-----BEGIN CERTIFICATE-----")?;
    let end_marker = "-----END CERTIFICATE-----";
    let end = text[begin..].find(end_marker)? + begin + end_marker.len();
    Some(format!("{}\n", &text[begin..end]))
}

/// `openssl x509 -noout ARGS` on the first certificate of `pem_file`.
pub fn x509(pem_file: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = run(Command::new("openssl")
        .args(["x509", "-noout", "-in"])
        .arg(pem_file)
        .args(args))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Writes `pem` to a new file in `dir`; returns its path.
pub fn save_pem(dir: &Path, pem: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(format!("seen-{}.pem", SEQ.fetch_add(1, Ordering::Relaxed)));
    std::fs::write(&path, pem)?;
    Ok(path)
}

/// The subjectAltName entries of the first certificate in `pem_file`, as
/// openssl prints them (`DNS:a.example`, `IP Address:198.18.0.2`), in
/// order.
pub fn sans(pem_file: &Path) -> anyhow::Result<Vec<String>> {
    let text = x509(pem_file, &["-ext", "subjectAltName"])?;
    Ok(text
        .lines()
        .skip(1)
        .flat_map(|l| l.split(','))
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect())
}

/// The issuer line of the first certificate in `pem_file`.
pub fn issuer(pem_file: &Path) -> anyhow::Result<String> {
    Ok(x509(pem_file, &["-issuer"])?.trim().to_string())
}

/// SHA-256 of the first certificate (DER) in `pem_file`, lowercase hex.
pub fn cert_sha256(pem_file: &Path) -> anyhow::Result<String> {
    let text = x509(pem_file, &["-fingerprint", "-sha256"])?;
    let (_, fp) = text
        .trim()
        .split_once('=')
        .with_context(|| format!("no fingerprint in {text:?}"))?;
    Ok(fp.replace(':', "").to_ascii_lowercase())
}

/// A TCP relay in the server namespace in front of a TLS server, that
/// counts the connections on which the client side (the engine) has sent
/// an application_data record: in TLS 1.3, its Finished, sent as soon as
/// it has processed the server's handshake, in the same step in which the
/// engine looks up the impersonation certificate.
pub struct TlsRelay {
    state: std::sync::Arc<RelayState>,
    accept: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct RelayState {
    accepted: std::sync::atomic::AtomicUsize,
    finished: std::sync::atomic::AtomicUsize,
    stop: std::sync::atomic::AtomicBool,
}

impl TlsRelay {
    /// Listens on `listen` in the server namespace and relays up to `n`
    /// connections to `upstream` (also in the server namespace).
    pub fn start(
        h: &crate::Harness,
        listen: std::net::SocketAddr,
        upstream: std::net::SocketAddr,
        n: usize,
    ) -> anyhow::Result<TlsRelay> {
        use std::sync::{atomic::Ordering::SeqCst, Arc};
        let listener = h
            .server
            .enter(|| std::net::TcpListener::bind(listen))?
            .with_context(|| format!("binding {listen} in the server namespace"))?;
        listener.set_nonblocking(true)?;
        let state = Arc::new(RelayState::default());
        let ns = crate::netns::Netns::existing(&h.server.name, true);
        let st = state.clone();
        let accept = std::thread::spawn(move || {
            while st.accepted.load(SeqCst) < n && !st.stop.load(SeqCst) {
                match listener.accept() {
                    Ok((down, _)) => {
                        st.accepted.fetch_add(1, SeqCst);
                        let up = ns.enter(|| std::net::TcpStream::connect(upstream));
                        let st = st.clone();
                        std::thread::spawn(move || {
                            if let Ok(Ok(up)) = up {
                                relay_counting(down, up, &st);
                            }
                        });
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(_) => break,
                }
            }
        });
        Ok(TlsRelay {
            state,
            accept: Some(accept),
        })
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.state
            .accepted
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Connections whose client side finished its TLS handshake.
    pub fn finished(&self) -> usize {
        self.state
            .finished
            .load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for TlsRelay {
    fn drop(&mut self) {
        self.state
            .stop
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// One connection of a [`TlsRelay`].
fn relay_counting(down: std::net::TcpStream, up: std::net::TcpStream, state: &RelayState) {
    let idle = Some(Duration::from_secs(180));
    for s in [&down, &up] {
        let _ = s.set_nonblocking(false);
        let _ = s.set_read_timeout(idle);
    }
    let (Ok(mut up_r), Ok(mut down_w)) = (up.try_clone(), down.try_clone()) else {
        return;
    };
    // Server to client: straight through.
    let s2c = std::thread::spawn(move || {
        let _ = std::io::copy(&mut up_r, &mut down_w);
        let _ = down_w.shutdown(std::net::Shutdown::Write);
    });
    // Client to server, reading the TLS record headers on the way.
    let (mut down, mut up) = (down, up);
    let mut pending: Vec<u8> = Vec::new();
    let mut counted = false;
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let n = match down.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if !counted {
            pending.extend_from_slice(&buf[..n]);
            // Whole records only: type (1), version (2), length (2).
            while pending.len() >= 5 {
                let len = 5 + usize::from(u16::from_be_bytes([pending[3], pending[4]]));
                if pending.len() < len {
                    break;
                }
                if pending[0] == 23 {
                    counted = true;
                    state
                        .finished
                        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    break;
                }
                pending.drain(..len);
            }
        }
        if up.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = up.shutdown(std::net::Shutdown::Write);
    let _ = s2c.join();
}

/// Holds a SoftHSM token still: a POSIX write lock on every file of its
/// object store, which SoftHSM read-locks (blocking) before it uses an
/// object, so a signature asked for meanwhile waits until the stall is
/// dropped. Lets a test keep a mint in flight for as long as it needs.
pub struct HsmStall {
    files: Vec<std::fs::File>,
}

impl HsmStall {
    /// Locks the object store of the SoftHSM sandbox in `dir` (its
    /// `tokens/` directory).
    pub fn lock(dir: &Path) -> anyhow::Result<HsmStall> {
        use std::os::fd::AsRawFd;
        let mut files = Vec::new();
        for token in std::fs::read_dir(dir.join("tokens"))? {
            let token = token?.path();
            if !token.is_dir() {
                continue;
            }
            for f in std::fs::read_dir(&token)? {
                let path = f?.path();
                if !path.is_file() {
                    continue;
                }
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .with_context(|| format!("opening {}", path.display()))?;
                // SAFETY: a valid descriptor and a fully initialised flock.
                let mut fl: libc::flock = unsafe { std::mem::zeroed() };
                fl.l_type = libc::F_WRLCK as libc::c_short;
                fl.l_whence = libc::SEEK_SET as libc::c_short;
                // SoftHSM's own locks are brief: wait for them.
                // SAFETY: as above.
                if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLKW, &fl) } != 0 {
                    anyhow::bail!(
                        "locking {}: {}",
                        path.display(),
                        std::io::Error::last_os_error()
                    );
                }
                files.push(file);
            }
        }
        anyhow::ensure!(!files.is_empty(), "no token files under {}", dir.display());
        Ok(HsmStall { files })
    }
}

impl Drop for HsmStall {
    fn drop(&mut self) {
        // Closing the descriptors releases the locks.
        self.files.clear();
    }
}

/// The notBefore of the first certificate in `pem_file`.
pub fn not_before(pem_file: &Path) -> anyhow::Result<time::OffsetDateTime> {
    // "notBefore=Nov  3 07:32:59 2026 GMT"
    let text = x509(pem_file, &["-startdate"])?;
    let v = text
        .trim()
        .strip_prefix("notBefore=")
        .with_context(|| format!("no notBefore in {text:?}"))?;
    let f: Vec<&str> = v.split_whitespace().collect();
    let bad = || anyhow::anyhow!("cannot read the date {v:?}");
    let [mon, day, hms, year, "GMT"] = f[..] else {
        return Err(bad());
    };
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = MONTHS.iter().position(|m| *m == mon).ok_or_else(bad)? as u8 + 1;
    let t: Vec<u8> = hms.split(':').filter_map(|x| x.parse().ok()).collect();
    let [h, mi, s] = t[..] else {
        return Err(bad());
    };
    let date =
        time::Date::from_calendar_date(year.parse()?, time::Month::try_from(month)?, day.parse()?)?;
    Ok(date.with_hms(h, mi, s)?.assume_utc())
}
