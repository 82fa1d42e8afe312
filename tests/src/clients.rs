//! TLS clients other than curl, run in a harness's client namespace: the
//! openssl CLI (`s_client`), Python's `ssl`, GnuTLS's `gnutls-cli`,
//! headless Chromium with an NSS trust store; and readers for what they
//! print (certificate names, the HTTP response).

use std::{
    ffi::OsStr,
    fs::File,
    io::Write,
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::Context;

use crate::{netns::run, proc::Proc, Harness};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// What a client did: its exit status and what it printed.
#[derive(Debug)]
pub struct Ran {
    pub status: ExitStatus,
    /// It exited by itself before the deadline (else it was killed).
    pub in_time: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    /// Everything, for failure messages.
    pub fn dump(&self) -> String {
        format!(
            "status {} (in time: {})\n--- stdout\n{}\n--- stderr\n{}",
            self.status, self.in_time, self.stdout, self.stderr
        )
    }
}

/// An HTTP/1.1 GET of `/` for `host` that asks the server to close after
/// the response.
pub fn http_get(host: &str) -> Vec<u8> {
    format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").into_bytes()
}

/// Runs `program args` in the client namespace with `env`, writes `input`
/// to its stdin and keeps stdin open until the program exits: clients like
/// gnutls-cli end the connection at the end of their input, before the
/// response could arrive; a server closing after its response ends them.
/// Killed (by its PID) after `timeout`. Output goes to files in the
/// harness directory, so that children that inherit it (Chromium's) cannot
/// hold a pipe open.
pub fn run_client(
    h: &Harness,
    program: &str,
    args: &[String],
    env: &[(&str, &OsStr)],
    input: Option<&[u8]>,
    timeout: Duration,
) -> anyhow::Result<Ran> {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let base = Path::new(program)
        .file_name()
        .and_then(OsStr::to_str)
        .unwrap_or("client");
    let out_path = h.dir.join(format!("{base}-{n}.stdout"));
    let err_path = h.dir.join(format!("{base}-{n}.stderr"));
    let child = h
        .client
        .command(program)
        .args(args)
        .envs(env.iter().copied())
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(File::create(&out_path)?)
        .stderr(File::create(&err_path)?)
        .spawn()
        .with_context(|| format!("spawning {program}"))?;
    let mut proc = Proc::new(base, child);
    let stdin = match input {
        Some(bytes) => {
            let mut stdin = proc.child_mut().stdin.take().context("stdin")?;
            // A client that failed early may have closed its end already:
            // what it printed says why.
            let _ = stdin.write_all(bytes);
            let _ = stdin.flush();
            Some(stdin)
        }
        None => None,
    };
    let (status, in_time) = proc.wait_timeout(timeout);
    drop(stdin);
    Ok(Ran {
        status,
        in_time,
        stdout: String::from_utf8_lossy(&std::fs::read(&out_path)?).into_owned(),
        stderr: String::from_utf8_lossy(&std::fs::read(&err_path)?).into_owned(),
    })
}

/// The value of attribute `attr` (`CN`, `O`) in a distinguished name as
/// openssl (`CN = a, O = b`), GnuTLS or curl (`CN=a,O=b`, `CN=a; O=b`)
/// print it.
pub fn dn_attr(dn: &str, attr: &str) -> Option<String> {
    dn.split([',', ';']).find_map(|part| {
        let (k, v) = part.split_once('=')?;
        (k.trim() == attr).then(|| v.trim().to_string())
    })
}

/// The rest of the first line of `text` that starts with `prefix`
/// (leading blanks ignored).
pub fn line_after<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.trim_start().strip_prefix(prefix))
        .map(str::trim)
}

/// The HTTP response's status line and body in a client's output (the
/// first response; with `Connection: close`, the body runs to the end of
/// the declared `Content-Length`).
pub fn http_response(out: &str) -> Option<(String, String)> {
    let start = out.find("HTTP/1.1 ")?;
    let rest = &out[start..];
    let (head, body) = rest.split_once("\r\n\r\n")?;
    let status = head.lines().next()?.trim().to_string();
    let len: usize = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse().ok())
            .flatten()
    })?;
    Some((status, body.get(..len)?.to_string()))
}

/// The first PEM certificate in `out` (s_client prints the server's).
pub fn first_pem(out: &str) -> Option<String> {
    let begin = out.find("-----BEGIN CERTIFICATE-----")?;
    let end_marker = "-----END CERTIFICATE-----";
    let end = out[begin..].find(end_marker)? + begin + end_marker.len();
    Some(format!("{}\n", &out[begin..end]))
}

/// `openssl x509 -noout -text` of a PEM certificate (written to `dir`).
pub fn x509_text(dir: &Path, pem: &str) -> anyhow::Result<String> {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let path = dir.join(format!("cert-{n}.pem"));
    std::fs::write(&path, pem)?;
    let out = run(std::process::Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(&path))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `openssl s_client` to `addr:port` asking for `name` (the SNI and the
/// host name the certificate must be valid for), trusting `cafile` only
/// and failing on any verification error, sending `input`.
pub fn s_client(
    h: &Harness,
    addr: &str,
    port: u16,
    name: &str,
    cafile: &Path,
    extra: &[&str],
    input: &[u8],
) -> anyhow::Result<Ran> {
    let connect = if addr.contains(':') {
        format!("[{addr}]:{port}")
    } else {
        format!("{addr}:{port}")
    };
    let mut args: Vec<String> = [
        "s_client",
        "-connect",
        &connect,
        "-servername",
        name,
        "-verify_hostname",
        name,
        "-verify_return_error",
        "-CAfile",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(cafile.display().to_string());
    args.extend(extra.iter().map(|s| s.to_string()));
    run_client(
        h,
        "openssl",
        &args,
        &[],
        Some(input),
        Duration::from_secs(120),
    )
}

/// A fresh NSS database under `home/.pki/nssdb` (where Chromium on Linux
/// looks for user-added trust anchors), trusting `ca` (a PEM file, which
/// may hold several certificates) for TLS servers when given.
pub fn nss_home(home: &Path, ca: Option<&Path>) -> anyhow::Result<PathBuf> {
    let db = home.join(".pki").join("nssdb");
    std::fs::create_dir_all(&db)?;
    let dbarg = format!("sql:{}", db.display());
    run(std::process::Command::new("certutil")
        .env("HOME", home)
        .args(["-d", &dbarg, "-N", "--empty-password"]))?;
    if let Some(ca) = ca {
        // certutil -A takes one certificate per call.
        let text = std::fs::read_to_string(ca)?;
        let certs: Vec<&str> = text
            .split_inclusive("-----END CERTIFICATE-----")
            .filter(|c| c.contains("-----BEGIN CERTIFICATE-----"))
            .collect();
        anyhow::ensure!(!certs.is_empty(), "no certificate in {}", ca.display());
        for (i, pem) in certs.iter().enumerate() {
            let one = home.join(format!("ca-{i}.pem"));
            std::fs::write(&one, pem.trim_start())?;
            run(std::process::Command::new("certutil")
                .env("HOME", home)
                .args(["-d", &dbarg, "-A", "-t", "C,,", "-n"])
                .arg(format!("loupe-{i}"))
                .arg("-i")
                .arg(&one))?;
        }
    }
    Ok(db)
}

/// Headless Chromium in the client namespace, `HOME` = `home` (its NSS
/// trust store), a fresh profile, `name` resolved to `addr`, printing the
/// DOM of `url`. Chromium starts slowly on a loaded machine: a generous
/// deadline.
pub fn chromium_dump_dom(
    h: &Harness,
    home: &Path,
    name: &str,
    addr: &str,
    url: &str,
) -> anyhow::Result<Ran> {
    let profile = home.join("chromium-profile");
    std::fs::create_dir_all(&profile)?;
    let args: Vec<String> = vec![
        "--headless=new".into(),
        "--no-sandbox".into(),
        "--disable-gpu".into(),
        "--disable-quic".into(),
        "--no-first-run".into(),
        "--disable-background-networking".into(),
        "--disable-component-update".into(),
        "--disable-sync".into(),
        format!("--user-data-dir={}", profile.display()),
        format!("--host-resolver-rules=MAP {name} {addr}"),
        "--dump-dom".into(),
        url.into(),
    ];
    run_client(
        h,
        "chromium",
        &args,
        &[("HOME", home.as_os_str())],
        None,
        Duration::from_secs(300),
    )
}
