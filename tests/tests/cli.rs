//! The operator CLI reads a running dataplane's stats.

use std::process::Command;

use loupe_tests::{engine::Engine, workspace_bin, Harness, HarnessConfig};

#[test]
fn loupe_stats_shows_a_running_engine() {
    let h = Harness::new(HarnessConfig::default()).expect("harness");
    let engine = Engine::start(&h, &[]).expect("engine");
    let loupe = workspace_bin("loupe");
    let out = Command::new(&loupe)
        .args(["stats", "--file"])
        .arg(&engine.stats_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("pid {}", engine.pid())), "{text}");
    assert!(
        text.contains("inside -> outside in XDP native mode"),
        "{text}"
    );

    let out = Command::new(&loupe)
        .args(["stats", "--json", "--file"])
        .arg(&engine.stats_path)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["state"], "running");
    assert_eq!(v["workers"].as_array().map(Vec::len), Some(2));
    let (status, ..) = engine.stop();
    assert!(status.success());
}

#[test]
fn loupe_stats_without_a_dataplane_says_what_to_do() {
    let out = Command::new(workspace_bin("loupe"))
        .args(["stats", "--file", "/nonexistent/loupe-stats.json"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot read the dataplane stats") && err.contains("--stats-file"),
        "{err}"
    );
}
