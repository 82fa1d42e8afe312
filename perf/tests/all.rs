//! `loupe-perf-all` end to end: three real scenarios in quick mode into a
//! fresh results directory, then what the summary, the JSON and the plots
//! hold. Needs root (network namespaces) and the release binaries, as the
//! end-to-end tests do.

use std::{path::PathBuf, process::Command};

fn root(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("loupe-perf-all-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn a_quick_run_writes_json_a_summary_and_plots_for_each_scenario() {
    let results = root("quick");
    let out = Command::new(env!("CARGO_BIN_EXE_loupe-perf-all"))
        .args(["--quick", "--only", "decide,split-memory,policy-check"])
        .arg("--results-root")
        .arg(&results)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let run: Vec<PathBuf> = std::fs::read_dir(&results)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(run.len(), 1, "one directory per run: {run:?}");
    let dir = &run[0];
    let md = std::fs::read_to_string(dir.join("summary.md")).unwrap();
    for s in ["decide", "split-memory", "policy-check"] {
        assert!(md.contains(&format!("| {s} | passed |")), "{md}");
        assert!(dir.join(format!("{s}.log")).exists());
    }
    // Only what was asked for ran.
    assert!(!md.contains("| wire-per-core |"), "{md}");
    for file in [
        "decide.json",
        "split-memory.json",
        "policy.json",
        "summary.json",
    ] {
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join(file)).unwrap()).unwrap();
        assert!(!v.is_null(), "{file}");
    }
    // The new-connection table has real numbers for every path, the wire
    // delays included (a short run's capture once caught nothing).
    let decide: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(dir.join("decide.json")).unwrap()).unwrap();
    for path in ["bridge", "no-decrypt", "tcp-split"] {
        let wire = decide
            .iter()
            .find(|r| r["path"] == path && r.get("wire_added_us").is_some())
            .unwrap();
        assert!(wire["wire_syn_p50_us"].as_f64().is_some(), "{wire}");
        assert!(
            wire["wire_client_hello_samples"].as_u64().unwrap() > 0,
            "{wire}"
        );
    }
    let line = md
        .lines()
        .find(|l| l.starts_with("| tcp-split | 40 |"))
        .unwrap_or_else(|| panic!("{md}"));
    assert!(!line.contains("| - |"), "{line}");
    let png = std::fs::read(dir.join("decide-handshake-cdf.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(md.contains(
        "![New connections: TLS handshake time CDF, shared shape](decide-handshake-cdf.png)"
    ));
    // Plots of scenarios that did not run are not drawn, and say so.
    assert!(
        md.contains("HSM signer: signatures/s against sessions: not drawn: not run"),
        "{md}"
    );
    let _ = std::fs::remove_dir_all(&results);
}

#[test]
fn an_unknown_scenario_is_refused_before_anything_runs() {
    let results = root("unknown");
    let out = Command::new(env!("CARGO_BIN_EXE_loupe-perf-all"))
        .args(["--quick", "--only", "decide,wier"])
        .arg("--results-root")
        .arg(&results)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown scenario wier"), "{stderr}");
    assert!(stderr.contains("wire-per-core"), "{stderr}");
    assert_eq!(std::fs::read_dir(&results).unwrap().count(), 0);
    let _ = std::fs::remove_dir_all(&results);
}
