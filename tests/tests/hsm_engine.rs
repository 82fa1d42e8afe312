//! The engine starts the HSM signer before it touches the wire: a wrong
//! PIN, a missing token or a token without an audit key stops it at start-up
//! with the reason and nothing attached; a good token is reported healthy in
//! the stats, and the audit log stays verifiable after the engine stops.

use std::ffi::OsStr;

use loupe_tests::{
    engine::Engine,
    harness::{INSIDE_IF, OUTSIDE_IF},
    softhsm::SoftHsm,
    Harness, HarnessConfig,
};

fn hsm_args(hsm: &SoftHsm, token: &str) -> Vec<String> {
    vec![
        "--hsm-token".into(),
        token.into(),
        "--hsm-pin-file".into(),
        hsm.pin_file.display().to_string(),
        "--audit-log".into(),
        hsm.audit_log.display().to_string(),
    ]
}

fn start(h: &Harness, hsm: &SoftHsm, args: &[String]) -> anyhow::Result<Engine> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Engine::start_with_env(h, &args, &[("SOFTHSM2_CONF", OsStr::new(&hsm.conf()))])
}

#[test]
fn the_engine_runs_the_signer_and_reports_token_health() {
    let h = Harness::new(HarnessConfig::default()).expect("harness");
    let hsm = SoftHsm::new("engine").unwrap();
    assert!(hsm.loupe(&["ca", "init"]).status.success());
    let engine = start(&h, &hsm, &hsm_args(&hsm, "engine")).expect("engine with HSM");
    let stats = engine
        .wait_stats(
            "the HSM health in the stats",
            std::time::Duration::from_secs(30),
            |r| (!r.hsm.is_empty()).then_some(r.hsm.clone()),
        )
        .unwrap();
    assert_eq!(stats.len(), 1);
    assert!(stats[0].up && stats[0].token == "engine", "{stats:?}");
    let (status, _, out, err) = engine.stop();
    assert!(status.success(), "{err}");
    assert!(out.contains("HSM token \"engine\": up"), "{out}");
    let verify = hsm.loupe(&["audit", "verify", hsm.audit_log.to_str().unwrap()]);
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
}

#[test]
fn hsm_problems_stop_the_engine_at_start_up_with_nothing_attached() {
    let h = Harness::new(HarnessConfig::default()).expect("harness");
    let hsm = SoftHsm::new("engine").unwrap();

    // A token without `loupe ca init` has no audit key.
    let err = start(&h, &hsm, &hsm_args(&hsm, "engine"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("loupe-audit") && err.contains("loupe ca init"),
        "{err}"
    );

    assert!(hsm.loupe(&["ca", "init"]).status.success());
    // HSM threads pinned to a CPU the machine does not have.
    let mut args = hsm_args(&hsm, "engine");
    args.extend(["--hsm-cpus".into(), "0,4096".into()]);
    let err = start(&h, &hsm, &args).err().unwrap().to_string();
    assert!(
        err.contains("--hsm-cpus 4096: this machine has CPUs 0 to"),
        "{err}"
    );

    let err = start(&h, &hsm, &hsm_args(&hsm, "absent"))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("no token labelled \"absent\""), "{err}");

    hsm.set_pin_file("not-the-pin").unwrap();
    let err = start(&h, &hsm, &hsm_args(&hsm, "engine"))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("wrong PIN for token \"engine\""), "{err}");

    for dev in [INSIDE_IF, OUTSIDE_IF] {
        assert_eq!(
            h.xdp_prog_id(dev).unwrap(),
            None,
            "{dev} has a program after a failed start"
        );
    }
}
