//! The harness cleans up after itself: on drop, on panic, and through
//! `loupe-harness down`.

use std::process::Command;

use loupe_tests::{netns::Netns, workspace_bin, Harness, HarnessConfig};

fn namespaces() -> String {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn exists(name: &str) -> bool {
    namespaces()
        .lines()
        .any(|l| l.split_whitespace().next() == Some(name))
}

#[test]
fn a_panicking_test_leaves_no_namespace_or_process() {
    let names = std::thread::spawn(|| {
        let h = Harness::new(HarnessConfig::default()).unwrap();
        let names = [
            h.client.name.clone(),
            h.engine.name.clone(),
            h.server.name.clone(),
        ];
        let child = h.server.command("sleep").arg("600").spawn().unwrap();
        let pid = child.id();
        std::panic::panic_any((names, pid));
    })
    .join()
    .expect_err("thread must panic");
    let (names, pid) = names.downcast::<([String; 3], u32)>().map(|b| *b).unwrap();
    for n in &names {
        assert!(!exists(n), "{n} survived the panic");
    }
    // The process left in the namespace was killed; reap it if it was ours.
    // SAFETY: signal 0 only probes the PID we started.
    let alive = unsafe { libc::kill(pid as i32, 0) } == 0
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false);
    assert!(!alive, "process {pid} survived");
}

#[test]
fn harness_script_brings_namespaces_up_and_down() {
    let name = format!("lpt{}", std::process::id());
    let bin = workspace_bin("loupe-harness");
    let up = Command::new(&bin).args(["up", &name]).output().unwrap();
    // Whatever happens below, remove them.
    let _guard = [
        Netns::existing(&format!("{name}-client"), false),
        Netns::existing(&format!("{name}-engine"), false),
        Netns::existing(&format!("{name}-server"), false),
    ];
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    for role in ["client", "engine", "server"] {
        assert!(exists(&format!("{name}-{role}")), "{role} missing");
    }
    for dev in ["inside", "outside"] {
        let out = Command::new("ip")
            .args(["-n", &format!("{name}-engine"), "link", "show", dev])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{dev} missing in the engine namespace"
        );
    }
    let down = Command::new(&bin).args(["down", &name]).output().unwrap();
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    for role in ["client", "engine", "server"] {
        assert!(!exists(&format!("{name}-{role}")), "{role} left behind");
    }
}
