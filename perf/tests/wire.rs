//! `loupe-perf` (the wire benchmark) end to end, where a path fails as a
//! whole. Needs root (network namespaces) and the release binaries, as
//! the end-to-end tests do.

use std::process::Command;

/// Runs `loupe-perf` with `args` and a JSON file of its own: whether it
/// succeeded, its stdout and stderr, and the JSON it wrote.
fn wire(tag: &str, args: &[&str]) -> (bool, String, String, serde_json::Value) {
    let json = std::env::temp_dir().join(format!("loupe-perf-{tag}-{}.json", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_loupe-perf"))
        .args(args)
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let v = std::fs::read(&json)
        .map(|b| serde_json::from_slice(&b).unwrap())
        .unwrap_or_else(|e| panic!("no JSON ({e}): {stdout}{stderr}"));
    let _ = std::fs::remove_file(&json);
    (out.status.success(), stdout, stderr, v)
}

/// The row of `path` in a report.
fn row(v: &serde_json::Value, path: &str) -> serde_json::Value {
    v["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["path"] == path)
        .unwrap_or_else(|| panic!("no {path} row: {v}"))
        .clone()
}

#[test]
fn a_path_that_cannot_start_fails_its_rows_and_the_others_still_run() {
    let (ok, stdout, stderr, v) = wire(
        "wire",
        &[
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
        ],
    );
    assert!(!ok, "{stdout}{stderr}");
    let split = row(&v, "xdp_split");
    assert!(split["median_gbit_per_s"].is_null(), "{split}");
    let why = split["failed"].as_str().unwrap();
    assert!(why.contains("the path failed"), "{why}");
    let bridge = row(&v, "bridge_offload_off");
    assert!(bridge["failed"].is_null(), "{bridge}");
    assert!(
        bridge["median_gbit_per_s"].as_f64().unwrap() > 0.0,
        "{bridge}"
    );
    assert!(stdout.contains("FAILED"), "{stdout}");
    assert!(stderr.contains("xdp_split"), "{stderr}");
}

/// The paths' samples of a workload are taken in turns (one of each path,
/// then again), so a ratio's two medians come from the same minutes.
#[test]
fn the_paths_samples_alternate() {
    let (ok, stdout, stderr, v) = wire(
        "turns",
        &[
            "--paths",
            "bridge_offload_off,kernel_relay",
            "--workloads",
            "mtu:1",
            "--seconds",
            "1",
            "--repeat",
            "2",
        ],
    );
    assert!(ok, "{stdout}{stderr}");
    let began = |path: &str| -> Vec<f64> {
        row(&v, path)["samples"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["began_s"].as_f64().unwrap())
            .collect()
    };
    let (bridge, relay) = (began("bridge_offload_off"), began("kernel_relay"));
    assert_eq!((bridge.len(), relay.len()), (2, 2), "{v}");
    assert!(
        bridge[0] < relay[0] && relay[0] < bridge[1] && bridge[1] < relay[1],
        "not in turns: bridge {bridge:?}, relay {relay:?}"
    );
}
