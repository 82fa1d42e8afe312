//! The per-core fair shape (`--per-core`) on a real harness: each side's
//! receive work is placed on its own CPU. Needs root (network namespaces)
//! and the release binaries, as the end-to-end tests do.

use loupe_perf::Shape;
use loupe_tests::{
    engine::Engine,
    harness::{Harness, HarnessConfig},
};

/// The CPUs a thread may run on, from /proc (`Cpus_allowed_list`).
fn allowed(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim()
        .to_string()
}

/// [`Shape::place_napi`] tells its NAPI threads from others by those that
/// appear while it switches threading on: one test at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap()
        .trim()
        .to_string()
}

/// The shape and a harness as `--per-core` builds it (one queue per
/// link), holding the one-at-a-time lock.
fn per_core_harness() -> (std::sync::MutexGuard<'static, ()>, Shape, Harness) {
    let one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let h = Harness::new(HarnessConfig {
        queues: 1,
        ..Default::default()
    })
    .unwrap();
    (one, Shape::new().unwrap(), h)
}

#[test]
fn each_sides_napi_polls_run_on_its_own_cpu() {
    let (_one, shape, h) = per_core_harness();
    let engine = Engine::start(&h, &["--steer-ports", "5201", "--no-pin"]).unwrap();
    shape.apply(&h, &[engine.pid()]).unwrap();
    let placed = shape.place_napi(&h, true).unwrap();
    // One queue per link: one poll per veth, the client's and the
    // server's, the engine's two.
    assert_eq!(placed.endpoint_napi.len(), 2, "{placed:?}");
    assert_eq!(placed.path_napi.len(), 2, "{placed:?}");
    for pid in &placed.endpoint_napi {
        assert!(comm(*pid).starts_with("napi/eth0-"), "{}", comm(*pid));
        assert_eq!(allowed(*pid), shape.endpoint_cpu.to_string());
    }
    let mut engine_devs: Vec<String> = placed.path_napi.iter().map(|p| comm(*p)).collect();
    engine_devs.sort();
    assert!(
        engine_devs[0].starts_with("napi/inside-"),
        "{engine_devs:?}"
    );
    assert!(
        engine_devs[1].starts_with("napi/outside-"),
        "{engine_devs:?}"
    );
    for pid in placed.path_napi.iter().chain([&engine.pid()]) {
        assert_eq!(allowed(*pid), shape.path_cpu.to_string());
    }
    drop(engine);
    drop(h);
    // The polls end with their links.
    for pid in placed.endpoint_napi.iter().chain(&placed.path_napi) {
        let gone = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|c| c.starts_with("napi/"))
        {
            assert!(
                std::time::Instant::now() < gone,
                "napi thread {pid} outlived its link"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

#[test]
fn a_kernel_path_has_no_engine_polls_to_place() {
    let (_one, shape, h) = per_core_harness();
    h.bridge_up().unwrap();
    shape.apply(&h, &[]).unwrap();
    let placed = shape.place_napi(&h, false).unwrap();
    assert_eq!(placed.endpoint_napi.len(), 2, "{placed:?}");
    assert!(placed.path_napi.is_empty());
    // Nothing was left unplaced: the bridge's veths have no NAPI to make
    // a thread of (their receive reaches the path's CPU by RPS).
    for dev in ["inside", "outside"] {
        let threaded = h.engine.exec(
            "sh",
            &["-c", &format!("echo 1 > /sys/class/net/{dev}/threaded")],
        );
        assert!(threaded.is_err(), "{dev} has NAPI on the bridge path");
    }
}
