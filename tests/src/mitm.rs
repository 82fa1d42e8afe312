//! A whole decryption setup for end-to-end tests: the harness, a private
//! SoftHSM token with Loupe's CAs, the test PKI that signs the server's
//! certificates (and is the decryption profiles' trust store), the engine
//! with its HSM signer and control socket, and the daemon running a policy
//! written by the test. Clients trust the exported forward-trust CA.

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::Output,
    time::Duration,
};

use anyhow::Context;
use serde_json::Value;

use crate::{
    control::{dataplane_socket, Control},
    engine::Engine,
    harness::SERVER_V4,
    https::SERVER_NAME,
    pki::Pki,
    softhsm::{RemoteHsm, SoftHsm, P11_KIT_CLIENT},
    Harness, HarnessConfig,
};

pub struct Mitm {
    pub control: Control,
    pub engine: Engine,
    pub pki: Pki,
    /// Loupe's forward-trust CAs (EC and RSA), PEM: what clients trust.
    pub ca: PathBuf,
    /// The token served over p11-kit, when asked for (dropped before the
    /// token's directory).
    pub remote: Option<RemoteHsm>,
    pub hsm: SoftHsm,
    pub h: Harness,
    /// The engine's arguments and environment, for a restart.
    engine_cmd: (Vec<String>, Vec<(String, std::ffi::OsString)>),
}

/// How a [`Mitm`] is set up.
#[derive(Default)]
pub struct Options {
    pub harness: HarnessConfig,
    pub engine_args: Vec<String>,
    /// The engine reaches the token through `p11-kit server` (which the
    /// test can stop and start) instead of loading SoftHSM itself.
    pub remote_hsm: bool,
    /// More tokens in the same HSM (tenants' partitions), each given to
    /// the engine with `--hsm-token`: (label, its PIN, the PIN the
    /// engine's PIN file holds). Their PIN files for the CLI are
    /// `<hsm dir>/<label>.pin`.
    pub extra_tokens: Vec<(String, String, String)>,
}

impl Mitm {
    /// Starts everything; `policy` gets the test PKI (for `trust_store`
    /// paths) and returns the policy text.
    pub fn start(policy: impl FnOnce(&Pki) -> String) -> anyhow::Result<Mitm> {
        Mitm::start_with(HarnessConfig::default(), &[], policy)
    }

    /// [`Mitm::start`] with a harness configuration and extra engine
    /// arguments.
    pub fn start_with(
        cfg: HarnessConfig,
        engine_args: &[&str],
        policy: impl FnOnce(&Pki) -> String,
    ) -> anyhow::Result<Mitm> {
        Mitm::start_opts(
            Options {
                harness: cfg,
                engine_args: engine_args.iter().map(|a| a.to_string()).collect(),
                remote_hsm: false,
                extra_tokens: Vec::new(),
            },
            policy,
        )
    }

    /// [`Mitm::start`] as `opts` say.
    pub fn start_opts(opts: Options, policy: impl FnOnce(&Pki) -> String) -> anyhow::Result<Mitm> {
        Mitm::start_opts_hsm(opts, |pki, _| Ok(policy(pki)))
    }

    /// [`Mitm::start_opts`] whose `policy` may also use the token before
    /// the policy is applied (to import server keys, say).
    pub fn start_opts_hsm(
        opts: Options,
        policy: impl FnOnce(&Pki, &SoftHsm) -> anyhow::Result<String>,
    ) -> anyhow::Result<Mitm> {
        let h = Harness::new(opts.harness)?;
        let hsm = SoftHsm::new("mitm")?;
        let init = hsm.loupe(&["ca", "init"]);
        anyhow::ensure!(
            init.status.success(),
            "loupe ca init: {}",
            String::from_utf8_lossy(&init.stderr)
        );
        let ca = h.dir.join("loupe-ca.pem");
        let export = hsm.loupe(&["ca", "export", "--out", ca.to_str().context("path")?]);
        anyhow::ensure!(export.status.success(), "loupe ca export");
        let mut token_args = Vec::new();
        for (label, pin, given) in &opts.extra_tokens {
            hsm.add_token(label, pin)?;
            let f = hsm.dir.join(format!("{label}.engine.pin"));
            loupe_hsm::pin::write_pin_file(&f, given)?;
            token_args.extend([
                "--hsm-token".to_string(),
                label.clone(),
                "--hsm-pin-file".to_string(),
                f.display().to_string(),
            ]);
        }
        let pki = Pki::new(&h.dir.join("pki"))?;
        let policy_path = h.dir.join("policy.toml");
        std::fs::write(&policy_path, policy(&pki, &hsm)?)?;
        let sock = dataplane_socket(&h);
        let pin = hsm.pin_file.display().to_string();
        let audit = hsm.audit_log.display().to_string();
        let mut args = vec![
            "--control-socket",
            sock.to_str().context("path")?,
            "--hsm-token",
            &hsm.token,
            "--hsm-pin-file",
            &pin,
            "--audit-log",
            &audit,
        ];
        args.extend(token_args.iter().map(String::as_str));
        args.extend(opts.engine_args.iter().map(String::as_str));
        let conf = hsm.conf();
        let remote = if opts.remote_hsm {
            Some(RemoteHsm::start(&hsm)?)
        } else {
            None
        };
        let address = remote.as_ref().map(RemoteHsm::address).unwrap_or_default();
        if remote.is_some() {
            args.extend(["--hsm-module", P11_KIT_CLIENT]);
        }
        let env: Vec<(&str, &OsStr)> = if remote.is_some() {
            vec![("P11_KIT_SERVER_ADDRESS", OsStr::new(&address))]
        } else {
            vec![("SOFTHSM2_CONF", conf.as_os_str())]
        };
        let engine = Engine::start_with_env(&h, &args, &env)?;
        let control = Control::start(&h, &sock, Some(&policy_path), &[])?;
        control.wait_in_sync()?;
        let engine_cmd = (
            args.iter().map(|a| a.to_string()).collect(),
            env.iter()
                .map(|(k, v)| (k.to_string(), v.to_os_string()))
                .collect(),
        );
        Ok(Mitm {
            control,
            engine,
            pki,
            ca,
            remote,
            hsm,
            h,
            engine_cmd,
        })
    }

    /// Stops the engine (SIGTERM, waiting for it to exit) and starts it
    /// again with the same arguments; waits until the daemon has given it
    /// the policy again.
    pub fn restart_engine(&mut self) -> anyhow::Result<()> {
        let pid = self.engine.pid() as i32;
        // SAFETY: kill(2) on the engine process this Mitm started and has
        // not reaped (its Proc reaps it), so the pid is still its own.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        crate::wait_until("the engine to exit", Duration::from_secs(60), || {
            if self.engine.alive() {
                Err("running".into())
            } else {
                Ok(Some(()))
            }
        })?;
        let (args, env) = &self.engine_cmd;
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &OsStr)> = env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_os_str()))
            .collect();
        let fresh = Engine::start_with_env(&self.h, &args, &env)?;
        drop(std::mem::replace(&mut self.engine, fresh));
        self.control.wait_in_sync()?;
        Ok(())
    }

    /// curl arguments for `https://NAME:port/path` at `addr`, trusting
    /// only Loupe's CA (`--cacert`).
    pub fn curl_args(&self, name: &str, addr: &str, port: u16, path: &str) -> Vec<String> {
        let bracketed = if addr.contains(':') {
            format!("[{addr}]")
        } else {
            addr.to_string()
        };
        vec![
            "-sS".into(),
            "--fail".into(),
            "--max-time".into(),
            "120".into(),
            "--cacert".into(),
            self.ca.display().to_string(),
            "--resolve".into(),
            format!("{name}:{port}:{bracketed}"),
            format!("https://{name}:{port}/{path}"),
        ]
    }

    /// The usual request: the harness server by name over IPv4.
    pub fn curl_server(&self, path: &str) -> Vec<String> {
        self.curl_args(SERVER_NAME, SERVER_V4, 443, path)
    }

    /// Runs a command in the client namespace.
    pub fn client(&self, program: &str, args: &[String]) -> anyhow::Result<Output> {
        Ok(self.h.client.command(program).args(args).output()?)
    }

    /// Signatures the HSM made so far (audit records of kind `sign` whose
    /// purpose is a mint).
    pub fn mints(&self) -> usize {
        mints_in(&self.hsm.audit_log)
    }

    /// `loupe keylog open` of a sealed key log the engine wrote, on the
    /// engine's token, with a CLI audit log of its own
    /// (`keylog-cli.audit.jsonl` in the HSM's directory).
    pub fn open_keylog(&self, sealed: &Path) -> Output {
        self.open_keylog_to(sealed, None)
    }

    /// [`Mitm::open_keylog`] with `--out out`.
    pub fn open_keylog_to(&self, sealed: &Path, out: Option<&Path>) -> Output {
        let mut cmd = self.hsm.command(crate::workspace_bin("loupe"));
        cmd.env("LOUPE_AUDIT_LOG", self.keylog_cli_audit())
            .args(["keylog", "open"])
            .arg(sealed);
        if let Some(o) = out {
            cmd.arg("--out").arg(o);
        }
        cmd.output().expect("run loupe keylog open")
    }

    /// `loupe policy apply` of the policy the run started with, again;
    /// panics unless it succeeds. Returns what it said on stderr (the
    /// warnings).
    pub fn apply_again(&self) -> String {
        let policy = self.h.dir.join("policy.toml");
        let out = self
            .control
            .cli(&["policy", "apply", policy.to_str().expect("path")])
            .expect("run loupe policy apply");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{err}");
        err
    }

    /// The audit log `loupe keylog open` writes to.
    pub fn keylog_cli_audit(&self) -> PathBuf {
        self.hsm.dir.join("keylog-cli.audit.jsonl")
    }

    /// The flow log's records for connections that reached the TLS stage.
    pub fn tls_records(&self) -> Vec<Value> {
        self.control
            .records()
            .into_iter()
            .filter(|r| r.get("tls").is_some())
            .collect()
    }
}

/// Mint signatures recorded in an audit log.
pub fn mints_in(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| {
            r["kind"] == "sign"
                && r["purpose"]
                    .as_str()
                    .is_some_and(|p| p.starts_with("mint impersonation certificate"))
        })
        .count()
}

/// A policy decrypting the harness's servers (ports 443 and 8443-8460)
/// with the profile `lab`, which trusts the test PKI's root; the lines of
/// `profile_extra` go into the profile (its other options keep their
/// defaults: certificate problems blocked), `rules_before` goes before the
/// decrypt rule.
pub fn lab_policy(pki: &Pki, profile_extra: &str, rules_before: &str) -> String {
    format!(
        r#"[policy]
default_action = "no-decrypt"

[profiles.lab]
trust_store = "{}"
{profile_extra}

{rules_before}
[[rules]]
name = "decrypt-lab"
dst = ["198.18.0.0/24", "2001:2::/64"]
ports = [443, "8443-8460"]
action = "decrypt"
profile = "lab"
"#,
        pki.roots.display()
    )
}
