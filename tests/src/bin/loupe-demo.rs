//! The README's demo: a private SoftHSM2 token with the CAs made on it, a
//! three-namespace harness, the engine on the wire with the HSM signer
//! running, the control daemon running `policy/example.toml`, nginx
//! serving HTTPS on the server side, curl fetching from the client side
//! over IPv4 and IPv6 (split), as a bank (passed to the fast path) and as
//! malware (blocked), a ping on the fast path; then the flows, the flow
//! log, the metrics, what the engine saw and the verified key-usage audit
//! log. Everything is torn down at the end (and by `scripts/demo`'s sweep
//! if interrupted).

use std::{ffi::OsStr, process::Output, time::Duration};

use anyhow::Context;
use loupe_tests::{
    control::{dataplane_socket, Control},
    engine::Engine,
    harness::{CLIENT_V4, SERVER_V4, SERVER_V6},
    https::{curl_sha256, Nginx},
    softhsm::SoftHsm,
    Harness, HarnessConfig,
};

fn step(s: &str) {
    println!("\n==> {s}");
}

/// Prints a command's output indented; fails on a non-zero exit.
fn show(what: &str, out: Output) -> anyhow::Result<()> {
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        println!("    {line}");
    }
    anyhow::ensure!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    step("harness: namespaces client, engine, server; veth pairs with 2 queues");
    let h = Harness::new(HarnessConfig::default())?;
    println!(
        "    {} (198.18.0.1, 2001:2::1) <-> {} [inside|outside] <-> {} (198.18.0.2, 2001:2::2)",
        h.client.name, h.engine.name, h.server.name
    );

    step("HSM: a private SoftHSM2 token; `loupe ca init` makes the CAs and the audit key on it");
    let hsm = SoftHsm::new("loupe-demo")?;
    show("loupe ca init", hsm.loupe(&["ca", "init"]))?;
    let ca_pem = hsm.dir.join("loupe-forward-trust.pem");
    show(
        "loupe ca export",
        hsm.loupe(&["ca", "export", "--out", ca_pem.to_str().context("path")?]),
    )?;
    println!("    exported the forward-trust CA for client trust stores:");
    show(
        "openssl x509",
        std::process::Command::new("openssl")
            .args([
                "x509",
                "-noout",
                "-subject",
                "-ext",
                "basicConstraints,keyUsage",
                "-in",
            ])
            .arg(&ca_pem)
            .output()?,
    )?;

    step("engine: XDP on inside+outside, AF_XDP workers, the control socket, HSM signer up");
    let pin = hsm.pin_file.display().to_string();
    let audit = hsm.audit_log.display().to_string();
    let dp_sock = dataplane_socket(&h);
    let engine = Engine::start_with_env(
        &h,
        &[
            "--control-socket",
            dp_sock.to_str().context("path")?,
            "--hsm-token",
            &hsm.token,
            "--hsm-pin-file",
            &pin,
            "--audit-log",
            &audit,
        ],
        &[("SOFTHSM2_CONF", OsStr::new(&hsm.conf()))],
    )?;
    let r = engine.stats()?;
    println!(
        "    loupe-dataplane pid {} up: XDP {} mode, program id {}, {} workers",
        engine.pid(),
        r.xdp_mode,
        r.program_id.map_or("?".into(), |i| i.to_string()),
        r.workers.len()
    );

    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policy/example.toml");
    let example = example.canonicalize().context("policy/example.toml")?;
    step("control: `loupe policy check policy/example.toml`, then `loupe daemon` applies it");
    let check = std::process::Command::new(loupe_tests::workspace_bin("loupe"))
        .args(["policy", "check"])
        .arg(&example)
        .output()?;
    for line in String::from_utf8_lossy(&check.stderr).lines() {
        println!("    {line}");
    }
    show("loupe policy check", check)?;
    let mut control = Control::start(&h, &dp_sock, Some(&example), &[])?;
    let version = control.wait_in_sync()?;
    println!("    the dataplane runs policy version {version}; steering now:");
    let status = engine.wait_stats("the policy's steering", Duration::from_secs(30), |r| {
        r.policy.is_some().then(|| r.steering.clone())
    })?;
    println!(
        "    tcp ports {:?}, server prefixes [{}], exempt [{}]",
        status.ports,
        status.prefixes.join(", "),
        status.exempt.join(", ")
    );

    step("server: nginx with HTTPS on 443");
    let nginx = Nginx::start(&h, 443)?;
    let sha = nginx.add_file("payload.bin", 16 << 20, 42)?;

    step(
        "client: curl https://server.loupe.test/ over IPv4 and IPv6 (rule lab-servers: tcp-split)",
    );
    for addr in [SERVER_V4, SERVER_V6] {
        let out = h.client.exec(
            "curl",
            &nginx
                .curl_args(addr, "")
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        )?;
        println!(
            "    [{addr}] {}",
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    let (got, len) = curl_sha256(&h, &nginx.curl_args(SERVER_V4, "payload.bin"))?;
    let verdict = if got == sha { "byte-exact" } else { "MISMATCH" };
    println!("    16 MiB download via the userspace wire: {len} bytes, sha256 {verdict}");
    anyhow::ensure!(got == sha, "download differs from the served file");

    step("client: as www.bank.loupe.test (category financial-services) and x.malware.loupe.test");
    let bank = nginx.curl_args_for("www.bank.loupe.test", SERVER_V4, "payload.bin");
    let (got, len) = curl_sha256(&h, &bank)?;
    anyhow::ensure!(got == sha, "the bank download differs");
    println!("    www.bank.loupe.test: {len} bytes, byte-exact, no-decrypt: released to the XDP fast path");
    let malware = nginx.curl_args_for("x.malware.loupe.test", SERVER_V4, "");
    let out = h.client.command("curl").args(&malware).output()?;
    anyhow::ensure!(!out.status.success(), "the blocked request succeeded");
    println!(
        "    x.malware.loupe.test: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );

    step("client: ping the server (ICMP stays on the in-kernel DEVMAP path)");
    let ping = h
        .client
        .exec("ping", &["-c", "3", "-i", "0.2", "-W", "5", SERVER_V4])
        .context("ping")?;
    let text = String::from_utf8_lossy(&ping.stdout);
    println!("    {}", text.lines().rev().nth(1).unwrap_or("").trim());

    step("`loupe flows`: active flows, their decision and rule");
    show("loupe flows", control.cli(&["flows"])?)?;
    step("`loupe log tail`: the flow log, one JSON line per decided connection");
    control.wait_record("the bank's record", |r| {
        r["rule"] == "exempt-finance-and-health"
    })?;
    control.wait_record("a split's record", |r| r["action"] == "tcp-split")?;
    show("loupe log tail", control.cli(&["log", "tail", "-n", "4"])?)?;
    step("metrics (excerpt of http://127.0.0.1:9464/metrics in the engine namespace)");
    for line in control.metrics()?.lines().filter(|l| {
        [
            "loupe_decisions_total",
            "loupe_policy_version",
            "loupe_hsm_up",
            "loupe_split_bytes_total",
        ]
        .iter()
        .any(|m| l.starts_with(m))
    }) {
        println!("    {line}");
    }
    anyhow::ensure!(control.stop(), "the control daemon did not stop cleanly");

    step("what the engine saw");
    let client = format!("{CLIENT_V4}:");
    engine.wait_stats("the download in the stats", Duration::from_secs(30), |r| {
        r.workers
            .iter()
            .flat_map(|w| &w.flows)
            .any(|f| f.client.starts_with(&client) && f.outside.bytes >= 16 << 20)
            .then_some(())
    })?;
    let (status, _, out, err) = engine.stop();
    print!("{out}");
    anyhow::ensure!(status.success(), "engine exited with {status}: {err}");

    step("key-usage audit log: every key generation and signature, hash-chained and sealed");
    let log = std::fs::read_to_string(&hsm.audit_log)?;
    for line in log.lines().take(3) {
        let cut: String = line.chars().take(150).collect();
        println!("    {cut}...");
    }
    show(
        "loupe audit verify",
        hsm.loupe(&["audit", "verify", &audit]),
    )?;

    step("teardown: engine stopped, XDP detached, namespaces and the token removed");
    drop(nginx);
    h.destroy()?;
    drop(hsm);
    Ok(())
}
