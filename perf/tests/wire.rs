//! `loupe-perf` (the wire benchmark) end to end, where a path fails as a
//! whole. Needs root (network namespaces) and the release binaries, as
//! the end-to-end tests do.

use std::process::Command;

#[test]
fn a_path_that_cannot_start_fails_its_rows_and_the_others_still_run() {
    let json = std::env::temp_dir().join(format!("loupe-perf-wire-{}.json", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_loupe-perf"))
        .args([
            "--paths",
            "xdp_split,bridge_offload_off",
            "--workloads",
            "mtu:1",
            "--seconds",
            "1",
            "--repeat",
            "1",
            // The engine refuses this, so the split path never starts.
            "--engine-arg=--no-such-flag",
            "--json",
        ])
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stdout}{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let _ = std::fs::remove_file(&json);
    let row = |path: &str| {
        v["results"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["path"] == path)
            .unwrap_or_else(|| panic!("no {path} row: {v}"))
            .clone()
    };
    let split = row("xdp_split");
    assert!(split["median_gbit_per_s"].is_null(), "{split}");
    let why = split["failed"].as_str().unwrap();
    assert!(why.contains("the path failed"), "{why}");
    let bridge = row("bridge_offload_off");
    assert!(bridge["failed"].is_null(), "{bridge}");
    assert!(
        bridge["median_gbit_per_s"].as_f64().unwrap() > 0.0,
        "{bridge}"
    );
    assert!(stdout.contains("FAILED"), "{stdout}");
    assert!(stderr.contains("xdp_split"), "{stderr}");
}
