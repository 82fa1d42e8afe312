//! Real HTTPS peers: a certificate made with the openssl CLI, nginx in the
//! server namespace, curl in the client namespace.

use std::{
    io::Read,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{bail, Context};
use sha2::{Digest, Sha256};

use crate::{
    harness::{Harness, SERVER_V4, SERVER_V6},
    netns::run,
    proc::Proc,
};

pub const SERVER_NAME: &str = "server.loupe.test";

/// A server certificate: the chain file the server sends (leaf first)
/// and its key.
#[derive(Clone, Debug)]
pub struct ServerCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A self-signed P-256 certificate for SERVER_NAME and the server addresses.
pub fn make_cert(dir: &Path) -> anyhow::Result<ServerCert> {
    self_signed_p256(
        &dir.join("server.crt"),
        &dir.join("server.key"),
        &format!("/CN={SERVER_NAME}"),
        &[&format!(
            "subjectAltName=DNS:{SERVER_NAME},IP:{SERVER_V4},IP:{SERVER_V6}"
        )],
    )
}

/// A self-signed P-256 certificate made by `openssl req`, valid two days:
/// subject `subj`, each of `exts` an `-addext` extension.
pub fn self_signed_p256(
    cert: &Path,
    key: &Path,
    subj: &str,
    exts: &[&str],
) -> anyhow::Result<ServerCert> {
    let mut cmd = std::process::Command::new("openssl");
    cmd.args([
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
    ])
    .args(["-nodes", "-days", "2", "-subj", subj]);
    for ext in exts {
        cmd.args(["-addext", ext]);
    }
    run(cmd.arg("-keyout").arg(key).arg("-out").arg(cert))?;
    Ok(ServerCert {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
    })
}

/// What every [`Nginx`] serves as `index.html`.
pub const INDEX_HTML: &str = "loupe test page\n";

pub struct Nginx {
    _proc: Proc,
    pub cert: ServerCert,
    pub docroot: PathBuf,
    pub port: u16,
}

impl Nginx {
    /// nginx serving `docroot` over HTTPS on `port` at both server
    /// addresses; returns once it accepts connections.
    pub fn start(h: &Harness, port: u16) -> anyhow::Result<Nginx> {
        let dir = h.dir.join(format!("nginx-{port}"));
        std::fs::create_dir_all(&dir)?;
        let cert = make_cert(&dir)?;
        Nginx::start_with(h, port, cert, false, "")
    }

    /// [`Nginx::start`] with `cert` (a chain file and key), HTTP/2 offered
    /// by ALPN or not, and `extra` directives in its server block
    /// (`ssl_protocols`, `ssl_verify_client` and such).
    pub fn start_with(
        h: &Harness,
        port: u16,
        cert: ServerCert,
        http2: bool,
        extra: &str,
    ) -> anyhow::Result<Nginx> {
        let h2 = if http2 { " http2" } else { "" };
        // nginx 1.22 leaves TLS 1.3 out unless told.
        let protocols = if extra.contains("ssl_protocols") {
            ""
        } else {
            "ssl_protocols TLSv1.2 TLSv1.3;"
        };
        let dir = h.dir.join(format!("nginx-{port}"));
        let docroot = dir.join("www");
        std::fs::create_dir_all(&docroot)?;
        std::fs::write(docroot.join("index.html"), INDEX_HTML)?;
        let d = dir.display();
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log warn;\nevents {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  \
             proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  \
             uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  \
             keepalive_timeout 5;\n  sendfile off;\n  server {{\n    \
             listen {SERVER_V4}:{port} ssl{h2};\n    listen [{SERVER_V6}]:{port} ssl{h2};\n    \
             server_name {SERVER_NAME};\n    ssl_certificate {};\n    ssl_certificate_key {};\n    \
             root {};\n    {protocols}\n    {extra}\n  }}\n}}\n",
            cert.cert.display(),
            cert.key.display(),
            docroot.display()
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let child = h
            .server
            .command("nginx")
            .arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning nginx")?;
        let mut proc = Proc::new("nginx", child);
        let listening = format!("{SERVER_V4}:{port}");
        proc.wait_ready("nginx to listen", Duration::from_secs(30), || {
            h.server.listens_on(&listening)
        })?;
        Ok(Nginx {
            _proc: proc,
            cert,
            docroot,
            port,
        })
    }

    /// Write `len` bytes of deterministic pseudo-random data to the docroot
    /// and return its SHA-256 (hex).
    pub fn add_file(&self, name: &str, len: usize, seed: u64) -> anyhow::Result<String> {
        let mut data = vec![0u8; len];
        fill_pseudo_random(&mut data, seed);
        std::fs::write(self.docroot.join(name), &data)?;
        Ok(hex(&Sha256::digest(&data)))
    }

    /// Write `data` to the docroot as `name` and return its SHA-256 (hex).
    pub fn add_bytes(&self, name: &str, data: &[u8]) -> anyhow::Result<String> {
        std::fs::write(self.docroot.join(name), data)?;
        Ok(hex(&Sha256::digest(data)))
    }

    /// curl arguments that reach this server by name at `addr`.
    pub fn curl_args(&self, addr: &str, path: &str) -> Vec<String> {
        self.curl(SERVER_NAME, addr, path, true)
    }

    /// curl arguments that ask for `name` (the SNI) at `addr`; the
    /// certificate is not checked (it names only [`SERVER_NAME`]).
    pub fn curl_args_for(&self, name: &str, addr: &str, path: &str) -> Vec<String> {
        self.curl(name, addr, path, false)
    }

    /// curl arguments for `n` new connections in a row, one request each
    /// (`Connection: close`), the bodies discarded.
    pub fn curl_args_many(&self, addr: &str, path: &str, n: usize) -> Vec<String> {
        let mut args = self.curl_args(addr, path);
        let url = args.pop().expect("curl_args ends with the URL");
        args.extend(["-H".into(), "Connection: close".into()]);
        for _ in 0..n {
            args.extend(["-o".into(), "/dev/null".into(), url.clone()]);
        }
        args
    }

    fn curl(&self, name: &str, addr: &str, path: &str, verify: bool) -> Vec<String> {
        let bracketed = if addr.contains(':') {
            format!("[{addr}]")
        } else {
            addr.to_string()
        };
        let mut args: Vec<String> = vec![
            "-sS".into(),
            "--fail".into(),
            "--max-time".into(),
            "120".into(),
        ];
        if verify {
            args.extend(["--cacert".into(), self.cert.cert.display().to_string()]);
        } else {
            args.push("-k".into());
        }
        args.extend([
            "--resolve".into(),
            format!("{name}:{}:{bracketed}", self.port),
            format!("https://{name}:{}/{path}", self.port),
        ]);
        args
    }
}

/// Run curl in the client namespace; stream the body through SHA-256.
/// Returns (sha256 hex, body length).
pub fn curl_sha256(h: &Harness, args: &[String]) -> anyhow::Result<(String, u64)> {
    let mut child = h
        .client
        .command("curl")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning curl")?;
    let mut out = child.stdout.take().context("curl stdout")?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        let n = out.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    let mut proc = Proc::new("curl", child);
    let (status, _) = proc.wait_timeout(Duration::from_secs(180));
    if !status.success() {
        let (_, err) = proc.take_output();
        bail!("curl {args:?} failed ({status}): {err}");
    }
    Ok((hex(&hasher.finalize()), total))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// xorshift64*: fast, deterministic, incompressible enough for transfers.
pub fn fill_pseudo_random(buf: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}
