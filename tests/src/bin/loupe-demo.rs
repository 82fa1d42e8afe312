//! The README's demo: a private SoftHSM2 token with the CAs made on it, a
//! three-namespace harness, the engine on the wire with the HSM signer
//! running, the control daemon running `policy/example.toml` (its strict
//! profile pointed at the lab's root CA), nginx serving HTTPS with a
//! certificate from that lab CA, curl (trusting only Loupe's CA) fetching
//! through TLS decryption over IPv4 and IPv6, the impersonation
//! certificate it sees, the cache hit of a second request, a site with an
//! expired certificate blocked, a bank passed to the fast path with its
//! own certificate, malware blocked, the EICAR test file blocked by its
//! signature, a ping on the fast path; then the
//! flows, the decryption log, the metrics, what the engine saw and the
//! verified key-usage audit log. Everything is torn down at the end (and
//! by `scripts/demo`'s sweep if interrupted).

use std::{ffi::OsStr, process::Output, time::Duration};

use anyhow::Context;
use loupe_tests::{
    control::{dataplane_socket, Control},
    engine::Engine,
    harness::{CLIENT_V4, SERVER_V4, SERVER_V6},
    https::{curl_sha256, Nginx, SERVER_NAME},
    mitm::mints_in,
    pki::{Flaw, Key, Pki},
    softhsm::SoftHsm,
    Harness, HarnessConfig,
};
use serde_json::Value;

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
    // Decrypted copies of the strict profile's connections (export =
    // ["pcap"]) land here, in a directory only root may enter.
    let pcap_dir = h.dir.join("pcap");
    std::fs::create_dir(&pcap_dir)?;
    std::fs::set_permissions(
        &pcap_dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )?;
    let engine = Engine::start_with_env(
        &h,
        &[
            "--export-pcap",
            pcap_dir.to_str().context("path")?,
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

    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policy");
    let shipped = shipped.canonicalize().context("policy/")?;
    step("lab PKI: a root CA and an intermediate sign the lab server's certificates");
    let pki = Pki::new(&h.dir.join("pki"))?;
    println!(
        "    root {} (the strict profile's trust store)",
        pki.roots.display()
    );
    // The shipped policy, with the strict profile trusting the lab's root
    // (a real deployment keeps the system bundle).
    let example = h.dir.join("example.toml");
    let text = std::fs::read_to_string(shipped.join("example.toml"))?.replace(
        "# trust_store = \"roots.pem\"",
        &format!("trust_store = \"{}\"", pki.roots.display()),
    );
    std::fs::write(&example, text)?;
    std::fs::copy(
        shipped.join("categories.toml"),
        h.dir.join("categories.toml"),
    )?;
    step("control: `loupe policy check` of policy/example.toml (trust_store set to the lab root), then `loupe daemon` applies it");
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

    step("server: nginx with HTTPS on 443 (a lab certificate) and on 8443 (an expired one)");
    let good = pki.leaf(
        "server",
        &[
            SERVER_NAME,
            "www.bank.loupe.test",
            "x.malware.loupe.test",
            SERVER_V4,
            SERVER_V6,
        ],
        Key::P256,
        Flaw::None,
    )?;
    let nginx = Nginx::start_with(&h, 443, good, true, "")?;
    let sha = nginx.add_file("payload.bin", 16 << 20, 42)?;
    nginx.add_bytes("eicar.com", loupe_dataplane::inspect::signature::EICAR)?;
    let expired = pki.leaf("expired", &[SERVER_NAME], Key::P256, Flaw::Expired)?;
    let _old = Nginx::start_with(&h, 8443, expired, false, "")?;

    let ca = ca_pem.display().to_string();
    let curl = |name: &str, addr: &str, port: u16, path: &str, cacert: &str| -> Vec<String> {
        let host = if addr.contains(':') {
            format!("[{addr}]")
        } else {
            addr.to_string()
        };
        vec![
            "-sS".into(),
            "--fail".into(),
            "--max-time".into(),
            "60".into(),
            "--cacert".into(),
            cacert.into(),
            "--resolve".into(),
            format!("{name}:{port}:{host}"),
            format!("https://{name}:{port}/{path}"),
        ]
    };
    step("client: curl https://server.loupe.test/ trusting only Loupe's CA (rule lab-servers: decrypt)");
    let mut verbose = curl(SERVER_NAME, SERVER_V4, 443, "", &ca);
    verbose.extend(["-v".into(), "-o".into(), "/dev/null".into()]);
    let out = h.client.command("curl").args(&verbose).output()?;
    anyhow::ensure!(
        out.status.success(),
        "curl through decryption failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in String::from_utf8_lossy(&out.stderr).lines().filter(|l| {
        [
            "SSL connection using",
            "ALPN: server accepted",
            "subject:",
            "issuer:",
            "SSL certificate verify",
        ]
        .iter()
        .any(|k| l.contains(k))
    }) {
        println!("    {}", line.trim_start_matches("* ").trim());
    }
    for (addr, version) in [(SERVER_V4, "--http2"), (SERVER_V6, "--http1.1")] {
        let mut args = curl(SERVER_NAME, addr, 443, "payload.bin", &ca);
        args.insert(0, version.into());
        let (got, len) = curl_sha256(&h, &args)?;
        let verdict = if got == sha { "byte-exact" } else { "MISMATCH" };
        println!("    [{addr}] {} 16 MiB decrypted, inspected and re-encrypted: {len} bytes, sha256 {verdict}", &version[2..]);
        anyhow::ensure!(got == sha, "download differs from the served file");
    }
    let mints = mints_in(&hsm.audit_log);
    println!("    HSM signatures for impersonation certificates so far: {mints} (three connections, one site: the cache served the rest)");

    step("client: https://server.loupe.test:8443/ (its certificate expired yesterday)");
    let out = h
        .client
        .command("curl")
        .args(curl(SERVER_NAME, SERVER_V4, 8443, "", &ca))
        .output()?;
    anyhow::ensure!(!out.status.success(), "the expired site was not blocked");
    println!("    {}", String::from_utf8_lossy(&out.stderr).trim());

    step("client: as www.bank.loupe.test (category financial-services) and x.malware.loupe.test");
    let lab_root = pki.roots.display().to_string();
    let bank = curl(
        "www.bank.loupe.test",
        SERVER_V4,
        443,
        "payload.bin",
        &lab_root,
    );
    let (got, len) = curl_sha256(&h, &bank)?;
    anyhow::ensure!(got == sha, "the bank download differs");
    println!("    www.bank.loupe.test: {len} bytes, byte-exact, the server's own certificate (the lab root verifies it): no-decrypt, released to the XDP fast path");
    let malware = curl("x.malware.loupe.test", SERVER_V4, 443, "", &ca);
    let out = h.client.command("curl").args(&malware).output()?;
    anyhow::ensure!(!out.status.success(), "the blocked request succeeded");
    println!(
        "    x.malware.loupe.test: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );

    step("client: fetches eicar.com, the EICAR anti-virus test file (signature eicar of the strict profile: block)");
    let out = h
        .client
        .command("curl")
        .args(curl(SERVER_NAME, SERVER_V4, 443, "eicar.com", &ca))
        .output()?;
    anyhow::ensure!(!out.status.success(), "the EICAR file got through");
    println!(
        "    {} (the engine reset both sides before the string reached the client)",
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
    step("the decryption log: one JSON line per connection (a first one, a cache hit, the expired site)");
    control.wait_record("the bank's record", |r| {
        r["rule"] == "exempt-finance-and-health"
    })?;
    let first = control.wait_record("a decrypted connection", |r| r["tls"]["cache"] == "miss")?;
    let hit = control.wait_record("a cache hit", |r| r["tls"]["cache"] == "hit")?;
    let blocked = control.wait_record("the expired site", |r| r["tls"]["outcome"] == "blocked")?;
    for r in [&first, &hit, &blocked] {
        println!("    {}", compact(r));
    }
    step("what inspection saw: the record of the HTTP/1.1 request for the 16 MiB download, the EICAR match");
    let request = control.wait_record("the download's request", |r| {
        r["record"] == "http" && r["http"]["path"] == "/payload.bin"
    })?;
    let hit = control.wait_record("the EICAR match", |r| r["record"] == "signature")?;
    for r in [&request, &hit] {
        println!("    {r}");
    }
    step("`loupe log tail -n 3`");
    show("loupe log tail", control.cli(&["log", "tail", "-n", "3"])?)?;
    step("metrics (excerpt of http://127.0.0.1:9464/metrics in the engine namespace)");
    for line in control.metrics()?.lines().filter(|l| {
        [
            "loupe_decisions_total",
            "loupe_policy_version",
            "loupe_hsm_up",
            "loupe_tls_handshakes_total",
            "loupe_tls_cert_cache_total",
            "loupe_tls_mint_latency_seconds_count",
            "loupe_http_requests_total",
            "loupe_signature_hits_total",
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
    drop(nginx);
    let (status, _, out, err) = engine.stop();
    print!("{out}");
    anyhow::ensure!(status.success(), "engine exited with {status}: {err}");

    step("the decrypted pcapng, as an analyst reads it: tshark -r FILE -d tcp.port==443,http -Y http.request");
    for file in std::fs::read_dir(&pcap_dir)? {
        let file = file?.path();
        let out = std::process::Command::new("tshark")
            .arg("-r")
            .arg(&file)
            .args([
                "-d",
                "tcp.port==443,http",
                "-Y",
                "http.request",
                "-T",
                "fields",
            ])
            .args([
                "-e",
                "frame.time",
                "-e",
                "ip.src",
                "-e",
                "ip.dst",
                "-e",
                "http.host",
            ])
            .args(["-e", "http.request.method", "-e", "http.request.uri"])
            .output()
            .context("tshark")?;
        anyhow::ensure!(
            out.status.success(),
            "tshark: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        println!(
            "    {} ({} bytes):",
            file.display(),
            std::fs::metadata(&file)?.len()
        );
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            println!("      {}", line.replace('\t', "  "));
        }
    }

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
    h.destroy()?;
    drop(hsm);
    Ok(())
}

/// A decryption log record on one line, the fields that tell the story.
fn compact(r: &Value) -> String {
    let t = &r["tls"];
    let s = |v: &Value| v.as_str().unwrap_or("-").to_string();
    format!(
        "{} {} rule={} outcome={} client={}/{}/{} server={}/{}/{} cert=[{} by {}] verdict={} ca={} cache={}{}",
        s(&r["sni"]),
        s(&r["server"]),
        s(&r["rule"]),
        s(&t["outcome"]),
        s(&t["client"]["version"]),
        s(&t["client"]["suite"]),
        s(&t["client"]["alpn"]),
        s(&t["server"]["version"]),
        s(&t["server"]["group"]),
        s(&t["server"]["alpn"]),
        s(&t["upstream_cert"]["subject"]),
        s(&t["upstream_cert"]["issuer"]),
        t["verdict"].as_array().map_or("[]".into(), |v| {
            let names: Vec<&str> = v.iter().filter_map(Value::as_str).collect();
            format!("[{}]", names.join(","))
        }),
        s(&t["ca"]),
        s(&t["cache"]),
        t["error"]["reason"].as_str().map_or(String::new(), |e| format!(" error={e}"))
    )
}
