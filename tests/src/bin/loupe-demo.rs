//! The README's demo: a three-namespace harness, the engine on the wire,
//! nginx serving HTTPS on the server side, curl fetching from the client
//! side over IPv4 and IPv6, a ping on the fast path; then what the engine
//! saw. Everything is torn down at the end (and by `scripts/demo`'s sweep
//! if interrupted).

use std::time::Duration;

use anyhow::Context;
use loupe_tests::{
    engine::Engine,
    harness::{CLIENT_V4, SERVER_V4, SERVER_V6},
    https::{curl_sha256, Nginx},
    Harness, HarnessConfig,
};

fn step(s: &str) {
    println!("\n==> {s}");
}

fn main() -> anyhow::Result<()> {
    step("harness: namespaces client, engine, server; veth pairs with 2 queues");
    let h = Harness::new(HarnessConfig::default())?;
    println!(
        "    {} (198.18.0.1, 2001:2::1) <-> {} [inside|outside] <-> {} (198.18.0.2, 2001:2::2)",
        h.client.name, h.engine.name, h.server.name
    );

    step("engine: XDP on inside+outside, TCP/443 steered into AF_XDP workers");
    let engine = Engine::start(&h, &["--steer-ports", "443"])?;
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

    step("teardown: engine stopped, XDP detached, namespaces removed");
    drop(nginx);
    h.destroy()?;
    Ok(())
}
