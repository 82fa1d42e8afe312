//! The HSM goes away mid-run (its `p11-kit server` is killed, as a network
//! HSM drops off the network) and comes back: connections decrypted
//! before keep flowing, new ones to sites without a cached certificate
//! fail as the profile says with a logged reason, and decryption recovers
//! by itself when the HSM returns.

use std::{process::Stdio, time::Duration};

use loupe_tests::{
    harness::SERVER_V4,
    https::{Nginx, INDEX_HTML, SERVER_NAME},
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

/// Tenants on one engine, forward proxy: each decryption profile mints
/// with the CAs of its own token (`token = "..."`), the first token's by
/// default. A client trusting only tenant A's CA refuses B's certificates
/// and the other way round; the same server certificate is minted once per
/// tenant (the certificate cache never hands A's leaf to B's connection);
/// each mint's audit record names its token. A tenant whose PIN the engine
/// was given wrong, and a token the engine does not have, fail their
/// profiles' connections with the reason while the others decrypt.
#[test]
fn each_tenants_profiles_mint_with_its_own_cas() {
    let opts = Options {
        extra_tokens: vec![
            ("tenant-b".into(), "pin-b-1111".into(), "pin-b-1111".into()),
            ("tenant-c".into(), "pin-c-2222".into(), "wrong-9999".into()),
        ],
        ..Options::default()
    };
    let mut ca_b = std::path::PathBuf::new();
    let m = Mitm::start_opts_hsm(opts, |pki, hsm| {
        for token in ["tenant-b", "tenant-c"] {
            let out = hsm.loupe_on(token, &["ca", "init"]);
            anyhow::ensure!(
                out.status.success(),
                "loupe ca init on {token}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        ca_b = hsm.dir.join("tenant-b-ca.pem");
        let out = hsm.loupe_on(
            "tenant-b",
            &["ca", "export", "--out", ca_b.to_str().unwrap()],
        );
        anyhow::ensure!(out.status.success(), "loupe ca export on tenant-b");
        // A profile and a rule per tenant: the first token (no `token`),
        // B, C (a wrong PIN) and X (a token the engine does not have).
        let mut policy = "[policy]\ndefault_action = \"no-decrypt\"\n".to_string();
        for (t, port, token) in [
            ("a", 443, None),
            ("b", 8443, Some("tenant-b")),
            ("c", 8444, Some("tenant-c")),
            (
                "d",
                8446,
                Some("tenant-c\"\nhsm_unavailable = \"no-decrypt"),
            ),
            ("x", 8445, Some("tenant-x")),
        ] {
            let token = token.map_or(String::new(), |l| format!("token = \"{l}\"\n"));
            policy += &format!(
                "[profiles.{t}]\ntrust_store = \"{}\"\n{token}\n[[rules]]\nname = \"tenant-{t}\"\n\
                 dst = [\"198.18.0.2/32\"]\nports = [{port}]\naction = \"decrypt\"\n\
                 profile = \"{t}\"\n",
                pki.roots.display()
            );
        }
        // A server profile on a token the engine does not have either.
        let leaf = pki.leaf("sx", &[SERVER_NAME], Key::P256, Flaw::None)?;
        policy += &format!(
            "[server_profiles.sx]\nchain = \"{}\"\nkey = \"k\"\ntoken = \"tenant-x\"\n",
            leaf.cert.display()
        );
        Ok(policy)
    })
    .expect("setup");
    // One server certificate behind every port.
    let cert = m
        .pki
        .leaf("shared", &[SERVER_NAME], Key::P256, Flaw::None)
        .unwrap();
    let _servers: Vec<Nginx> = [443u16, 8443, 8444, 8445, 8446]
        .into_iter()
        .map(|port| Nginx::start_with(&m.h, port, cert.clone(), false, "").expect("nginx"))
        .collect();
    let curl = |port: u16, ca: &std::path::Path| {
        let mut args = m.curl_args(SERVER_NAME, SERVER_V4, port, "");
        let at = args.iter().position(|a| a == "--cacert").unwrap();
        args[at + 1] = ca.display().to_string();
        m.client("curl", &args).unwrap()
    };
    let record = |port: u16| {
        m.control
            .wait_record(&format!("the connection to port {port}"), |r| {
                r["server"] == format!("{SERVER_V4}:{port}").as_str() && r.get("tls").is_some()
            })
            .unwrap()
    };
    let mint_tokens = || -> Vec<String> {
        std::fs::read_to_string(&m.hsm.audit_log)
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|r| {
                r["kind"] == "sign"
                    && r["purpose"]
                        .as_str()
                        .is_some_and(|p| p.starts_with("mint impersonation certificate"))
            })
            .map(|r| r["token"].as_str().unwrap_or("").to_string())
            .collect()
    };

    // Each tenant's CA generation in the stats: C's token was left out.
    let gens = m.engine.stats().unwrap().tls.unwrap().ca_generations;
    let want: std::collections::BTreeMap<String, u32> = [
        (m.hsm.token.clone(), 1),
        ("tenant-b".to_string(), 1),
        ("tenant-c".to_string(), 0),
    ]
    .into();
    assert_eq!(gens, want);

    // Tenant A (the first token): A's CA verifies, B's does not.
    let out = curl(443, &m.ca);
    assert!(out.status.success(), "{out:?}");
    let r = record(443);
    assert_eq!(r["tls"]["ca_token"], m.hsm.token.as_str(), "{r}");
    assert_eq!(mint_tokens(), [m.hsm.token.as_str()]);

    // Tenant B: the same server certificate, minted again by B's CA.
    let out = curl(8443, &ca_b);
    assert!(out.status.success(), "{out:?}\n{:?}", m.tls_records());
    assert_eq!(String::from_utf8_lossy(&out.stdout), INDEX_HTML);
    record(8443);
    let b: Vec<_> = m
        .tls_records()
        .into_iter()
        .filter(|r| r["server"] == format!("{SERVER_V4}:8443").as_str())
        .collect();
    assert!(!b.is_empty());
    for r in &b {
        assert_eq!(r["tls"]["ca_token"], "tenant-b", "{r}");
    }
    assert_eq!(b[0]["tls"]["cache"], "miss", "{}", b[0]);
    assert_eq!(mint_tokens(), [m.hsm.token.clone(), "tenant-b".to_string()]);

    // Tenant C: the engine's PIN for it is wrong; its profile's
    // connections fail as the HSM being unavailable, saying so.
    assert!(!curl(8444, &m.ca).status.success());
    let r = record(8444).to_string();
    assert!(
        r.contains("tenant-c") && r.contains("cannot be used"),
        "{r}"
    );

    // The same tenant under `hsm_unavailable = "no-decrypt"`: passed
    // untouched before any takeover, the server's own certificate shown.
    let mut args = m.curl_args(SERVER_NAME, SERVER_V4, 8446, "");
    let at = args.iter().position(|a| a == "--cacert").unwrap();
    args[at + 1] = m.pki.roots.display().to_string();
    let out = m.client("curl", &args).unwrap();
    assert!(out.status.success(), "{out:?}");
    let r = m
        .control
        .wait_record("the connection to port 8446", |r| {
            r["server"] == format!("{SERVER_V4}:8446").as_str()
        })
        .unwrap();
    assert!(
        r.to_string()
            .contains("the HSM token \\\"tenant-c\\\" is unavailable: not decrypted"),
        "{r}"
    );
    assert!(r.get("tls").is_none(), "{r}");

    // A token the engine does not have.
    assert!(!curl(8445, &m.ca).status.success());
    let r = m
        .control
        .wait_record("the connection to port 8445", |r| {
            r["server"] == format!("{SERVER_V4}:8445").as_str()
        })
        .unwrap()
        .to_string();
    assert!(
        r.contains("tenant-x") && r.contains("not one of the engine's"),
        "{r}"
    );
    // `policy apply` names both profiles on the unknown token.
    let err = m.apply_again();
    for p in ["decryption profile \"x\"", "server profile \"sx\""] {
        assert!(
            err.lines().any(|l| l.contains(p)
                && l.contains("its token \"tenant-x\" is not one of the engine's")),
            "{p}: {err}"
        );
    }
    // Nothing was minted for C or X; A and B still decrypt.
    assert_eq!(mint_tokens().len(), 2);
    assert!(curl(443, &m.ca).status.success());
    assert!(curl(8443, &ca_b).status.success());
    // Last, as a client refusing a certificate excludes the site from
    // decryption for a while: B's certificate does not verify with A's CA.
    let refused = curl(8443, &m.ca);
    assert!(
        !refused.status.success(),
        "B's certificate verified with A's CA: {refused:?}"
    );
}
