//! The README's demo: a private SoftHSM2 token with the CAs made on it, a
//! three-namespace harness, the engine on the wire with the HSM signer
//! running, nginx serving HTTPS on the server side, curl fetching from the
//! client side over IPv4 and IPv6, a ping on the fast path; then what the
//! engine saw and the verified key-usage audit log. Everything is torn down
//! at the end (and by `scripts/demo`'s sweep if interrupted).

use std::{ffi::OsStr, process::Output, time::Duration};

use anyhow::Context;
use loupe_tests::{
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

    step("engine: XDP on inside+outside, TCP/443 steered into AF_XDP workers, HSM signer up");
    let pin = hsm.pin_file.display().to_string();
    let audit = hsm.audit_log.display().to_string();
    let engine = Engine::start_with_env(
        &h,
        &[
            "--steer-ports",
            "443",
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

    step("server: nginx with HTTPS on 443");
    let nginx = Nginx::start(&h, 443)?;
    let sha = nginx.add_file("payload.bin", 16 << 20, 42)?;

    step("client: curl https://server.loupe.test/ over IPv4 and IPv6");
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

    step("client: ping the server (ICMP stays on the in-kernel DEVMAP path)");
    let ping = h
        .client
        .exec("ping", &["-c", "3", "-i", "0.2", "-W", "5", SERVER_V4])
        .context("ping")?;
    let text = String::from_utf8_lossy(&ping.stdout);
    println!("    {}", text.lines().rev().nth(1).unwrap_or("").trim());

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
