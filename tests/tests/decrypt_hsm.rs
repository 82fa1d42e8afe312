//! The HSM goes away mid-run (its `p11-kit server` is killed, as a network
//! HSM drops off the network) and comes back: connections decrypted
//! before keep flowing, new ones to sites without a cached certificate
//! fail as the profile says with a logged reason, and decryption recovers
//! by itself when the HSM returns.

use std::{process::Stdio, time::Duration};

use loupe_tests::{
    harness::SERVER_V4,
    https::{Nginx, SERVER_NAME},
    mitm::{lab_policy, Mitm, Options},
    pki::{Flaw, Key},
    proc::Proc,
    wait_until,
};

fn policy(pki: &loupe_tests::pki::Pki) -> String {
    lab_policy(pki, r#"hsm_unavailable = "block""#, "")
}

#[test]
fn an_hsm_outage_fails_new_mints_keeps_running_flows_and_recovers() {
    let mut m = Mitm::start_opts(
        Options {
            remote_hsm: true,
            ..Options::default()
        },
        policy,
    )
    .expect("setup");
    // A site per port, each with its own certificate (so its own mint).
    let mut servers = Vec::new();
    for port in [443u16, 8443, 8444] {
        let cert = m
            .pki
            .leaf(
                &format!("site-{port}"),
                &[SERVER_NAME],
                Key::P256,
                Flaw::None,
            )
            .unwrap();
        servers.push(Nginx::start_with(&m.h, port, cert, false, "").expect("nginx"));
    }
    let sha = servers[0].add_file("big", 64 << 20, 3).unwrap();

    // A slow decrypted download on site 443, running across the outage.
    let mut args = m.curl_args(SERVER_NAME, SERVER_V4, 443, "big");
    args.extend(["--limit-rate".into(), "8M".into()]);
    let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
    let child =
        m.h.client
            .command("sh")
            .args(["-c", &format!("curl {} | sha256sum", quoted.join(" "))])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
    let mut slow = Proc::new("slow curl", child);
    wait_until(
        "the slow download to be decrypted",
        Duration::from_secs(60),
        || {
            let t = m
                .engine
                .stats()
                .map_err(|e| e.to_string())?
                .tls
                .unwrap_or_default();
            if t.decrypted >= 1 {
                Ok(Some(()))
            } else {
                Err(format!("{t:?}"))
            }
        },
    )
    .unwrap();

    // The HSM goes away.
    m.remote.as_mut().unwrap().down();
    for _ in 0..2 {
        let out = m
            .client("curl", &m.curl_args(SERVER_NAME, SERVER_V4, 8443, ""))
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "a new site was decrypted without the HSM"
        );
        // Refused with an alert when its mint fails (a cached site could
        // still be served, so `block` does not refuse at the decision).
        assert!(err.contains("alert internal error"), "{err}");
    }
    // The log says why: the TLS stage's error, at the mint.
    let rec = m
        .control
        .wait_record("a refusal naming the HSM", |r| {
            r["server"] == "198.18.0.2:8443"
                && r["tls"]["error"]["reason"]
                    .as_str()
                    .is_some_and(|e| e.contains("HSM"))
        })
        .unwrap();
    assert_eq!(rec["tls"]["outcome"], "blocked", "{rec:#}");
    assert_eq!(rec["tls"]["error"]["stage"], "mint", "{rec:#}");
    let health = m
        .engine
        .wait_stats("the token reported down", Duration::from_secs(60), |r| {
            r.hsm.first().filter(|h| !h.up).cloned()
        })
        .unwrap();
    assert!(health.last_error.is_some(), "{health:?}");
    // A site whose certificate is cached needs no HSM: still decrypted.
    let out = m
        .client("curl", &m.curl_args(SERVER_NAME, SERVER_V4, 443, ""))
        .unwrap();
    assert!(
        out.status.success(),
        "a cached site was refused while the HSM is down: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rec = m
        .control
        .wait_record("the cached site decrypted in the outage", |r| {
            r["server"] == "198.18.0.2:443" && r["tls"]["cache"] == "hit"
        })
        .unwrap();
    assert_eq!(rec["tls"]["outcome"], "decrypted", "{rec:#}");

    // The HSM comes back; the signer finds it again by itself.
    m.remote.as_mut().unwrap().up().unwrap();
    m.engine
        .wait_stats("the token back up", Duration::from_secs(120), |r| {
            r.hsm.first().filter(|h| h.up).cloned()
        })
        .unwrap();
    wait_until(
        "a new site decrypted again",
        Duration::from_secs(120),
        || {
            let out = m
                .client("curl", &m.curl_args(SERVER_NAME, SERVER_V4, 8444, ""))
                .map_err(|e| e.to_string())?;
            if out.status.success() {
                Ok(Some(()))
            } else {
                Err(String::from_utf8_lossy(&out.stderr).into_owned())
            }
        },
    )
    .unwrap();

    // The download that started before the outage finished byte-exact.
    let (status, in_time) = slow.wait_timeout(Duration::from_secs(300));
    let (out, err) = slow.take_output();
    assert!(status.success() && in_time, "{err}");
    assert_eq!(out.split_whitespace().next(), Some(sha.as_str()), "{err}");
}
