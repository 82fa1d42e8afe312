//! Start-up errors are clear, and stopping the engine (SIGTERM, SIGINT or
//! SIGKILL) leaves no XDP program behind.

use std::{os::unix::fs::PermissionsExt, process::Command, time::Duration};

use loupe_tests::{
    engine::Engine,
    harness::{INSIDE_IF, OUTSIDE_IF},
    wait_until, workspace_bin, Harness, HarnessConfig,
};

/// Whether the kernel still holds BPF object `kind` ("prog", "map") `id`.
fn bpf_object_exists(kind: &str, id: u32) -> bool {
    Command::new("bpftool")
        .args([kind, "show", "id", &id.to_string()])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn prog_exists(id: u32) -> bool {
    bpf_object_exists("prog", id)
}

fn attached_ids(h: &Harness) -> (Option<u32>, Option<u32>) {
    (
        h.xdp_prog_id(INSIDE_IF).unwrap(),
        h.xdp_prog_id(OUTSIDE_IF).unwrap(),
    )
}

fn map_exists(id: u32) -> bool {
    bpf_object_exists("map", id)
}

/// Ids of the maps the program uses (`bpftool prog show id N --json`).
fn prog_map_ids(id: u32) -> Vec<u32> {
    let out = Command::new("bpftool")
        .args(["prog", "show", "id", &id.to_string(), "--json"])
        .output()
        .expect("bpftool");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    v["map_ids"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|m| m.as_u64())
                .map(|m| m as u32)
                .collect()
        })
        .unwrap_or_default()
}

fn assert_detached(h: &Harness, id: u32, maps: &[u32]) {
    wait_until(
        "the XDP program and its maps to be gone",
        Duration::from_secs(30),
        || {
            let ids = attached_ids(h);
            let live_maps: Vec<&u32> = maps.iter().filter(|m| map_exists(**m)).collect();
            if ids == (None, None) && !prog_exists(id) && live_maps.is_empty() {
                Ok(Some(()))
            } else {
                Err(format!(
                    "attached {ids:?}, program {id} loaded: {}, maps alive {live_maps:?}",
                    prog_exists(id)
                ))
            }
        },
    )
    .unwrap();
}

#[test]
fn sigterm_and_sigint_detach_everything() {
    let h = Harness::new(HarnessConfig::default()).expect("harness");
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let engine = Engine::start(&h, &[]).expect("engine");
        let id = engine.stats().unwrap().program_id.expect("program id");
        assert_eq!(attached_ids(&h), (Some(id), Some(id)));
        assert!(prog_exists(id));
        let maps = prog_map_ids(id);
        assert!(maps.len() >= 8, "program maps {maps:?}");
        // SAFETY: signalling the engine we started, by its PID.
        unsafe { libc::kill(engine.pid() as i32, sig) };
        let (status, clean, out, err) = engine.wait_exit(Duration::from_secs(30));
        assert!(
            clean && status.success(),
            "signal {sig}: exit {status}: {err}"
        );
        assert!(out.contains("stopped"), "final report: {out}");
        assert_detached(&h, id, &maps);
    }
}

#[test]
fn sigkill_leaves_nothing_attached() {
    let h = Harness::new(HarnessConfig::default()).expect("harness");
    let engine = Engine::start(&h, &[]).expect("engine");
    let id = engine.stats().unwrap().program_id.expect("program id");
    assert_eq!(attached_ids(&h), (Some(id), Some(id)));
    let maps = prog_map_ids(id);
    engine.kill();
    // BPF links die with the process's file descriptors.
    assert_detached(&h, id, &maps);
    // And the interfaces are free for the next engine.
    let again = Engine::start(&h, &[]).expect("restart after SIGKILL");
    let (status, clean, _, err) = again.stop();
    assert!(clean && status.success(), "{status}: {err}");
}

fn run_engine(h: &Harness, wrapper: &[&str], args: &[&str]) -> (i32, String) {
    run_engine_bin(h, &workspace_bin("loupe-dataplane"), wrapper, args)
}

fn run_engine_bin(
    h: &Harness,
    bin: &std::path::Path,
    wrapper: &[&str],
    args: &[&str],
) -> (i32, String) {
    let mut cmd = h
        .engine
        .command(wrapper.first().copied().unwrap_or(bin.to_str().unwrap()));
    if !wrapper.is_empty() {
        cmd.args(&wrapper[1..]).arg(bin);
    }
    let out = cmd.args(args).output().expect("run loupe-dataplane");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn missing_interface_is_a_clear_error() {
    let h = Harness::new(HarnessConfig::default()).expect("harness");
    let (code, err) = run_engine(&h, &[], &["--inside", "nosuch0", "--outside", OUTSIDE_IF]);
    assert_ne!(code, 0);
    assert!(err.contains("interface 'nosuch0' not found"), "{err}");
    assert_eq!(attached_ids(&h), (None, None));
}

#[test]
fn same_interface_twice_is_refused() {
    let h = Harness::new(HarnessConfig::default()).expect("harness");
    let (code, err) = run_engine(&h, &[], &["--inside", INSIDE_IF, "--outside", INSIDE_IF]);
    assert_ne!(code, 0);
    assert!(err.contains("two different interfaces"), "{err}");
}

#[test]
fn bad_arguments_are_refused_with_the_reason() {
    let h = Harness::new(HarnessConfig::default()).expect("harness");
    let base = ["--inside", INSIDE_IF, "--outside", OUTSIDE_IF];
    for (extra, why) in [
        (["--steer-prefix", "198.18.0.0/40"], "exceeds 32"),
        (["--steer-ports", "https"], "bad port 'https'"),
        (["--xdp-mode", "turbo"], "bad XDP mode 'turbo'"),
        (["--queues", "9"], "exceeds the RX queues available"),
        // Fewer than the interfaces have: some steered frames would pass
        // uninspected.
        (["--queues", "1"], "would pass uninspected"),
        (["--queues", "0"], "serves 0 of the 2 RX queues"),
        (["--frames", "1000"], "UMEM frames per queue are too few"),
    ] {
        let args: Vec<&str> = base.iter().chain(extra.iter()).copied().collect();
        let (code, err) = run_engine(&h, &[], &args);
        assert_ne!(code, 0, "{extra:?} accepted");
        assert!(err.contains(why), "{extra:?}: {err}");
    }
    assert_eq!(attached_ids(&h), (None, None));
}

#[test]
fn missing_privileges_are_named() {
    let h = Harness::new(HarnessConfig::default()).expect("harness");
    let args = ["--inside", INSIDE_IF, "--outside", OUTSIDE_IF];
    // A copy the unprivileged user can execute wherever the checkout is.
    let bin = h.dir.join("loupe-dataplane");
    std::fs::copy(workspace_bin("loupe-dataplane"), &bin).unwrap();
    std::fs::set_permissions(&h.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    // An unprivileged user.
    let (code, err) = run_engine_bin(
        &h,
        &bin,
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
        ],
        &args,
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("missing privileges: CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN, CAP_NET_RAW"),
        "{err}"
    );
    // Root without CAP_BPF and CAP_SYS_ADMIN.
    let (code, err) = run_engine(
        &h,
        &[
            "setpriv",
            "--bounding-set=-bpf,-sys_admin",
            "--inh-caps=-bpf,-sys_admin",
            "--",
        ],
        &args,
    );
    assert_ne!(code, 0);
    assert!(err.contains("missing privileges: CAP_BPF ("), "{err}");
    assert_eq!(attached_ids(&h), (None, None));
}

#[test]
fn native_attach_failure_names_the_interface_and_the_fix() {
    let h = Harness::new(HarnessConfig::default()).expect("harness");
    // Bridge devices have no native XDP (and this kernel has no dummy).
    for d in ["dmy0", "dmy1"] {
        h.engine.ip(&["link", "add", d, "type", "bridge"]).unwrap();
        h.engine.ip(&["link", "set", d, "up"]).unwrap();
    }
    let (code, err) = run_engine(&h, &[], &["--inside", "dmy0", "--outside", "dmy1"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("cannot attach XDP (native) to 'dmy0'") && err.contains("--xdp-mode skb"),
        "{err}"
    );
    for d in ["dmy0", "dmy1"] {
        assert_eq!(h.xdp_prog_id(d).unwrap(), None, "{d} left attached");
    }
}

#[test]
fn a_second_engine_on_the_same_interfaces_is_refused_and_the_first_keeps_running() {
    let h = Harness::new(HarnessConfig::default()).expect("harness");
    let mut first = Engine::start(&h, &[]).expect("engine");
    let id = first.stats().unwrap().program_id.unwrap();
    let (code, err) = run_engine(&h, &[], &["--inside", INSIDE_IF, "--outside", OUTSIDE_IF]);
    assert_ne!(code, 0);
    assert!(
        err.contains("cannot bind an AF_XDP socket to inside queue 0"),
        "{err}"
    );
    assert!(first.alive());
    assert_eq!(attached_ids(&h), (Some(id), Some(id)));
    let (status, clean, _, err) = first.stop();
    assert!(clean && status.success(), "{status}: {err}");
}

/// The largest MTU the engine takes: its frames are exactly a 16-frame
/// chain. The engine starts, attaches and stops cleanly (native XDP on
/// veth takes such an MTU only beside a program that declares frags).
#[test]
fn an_mtu_at_the_afxdp_chain_limit_is_taken() {
    let h = Harness::new(HarnessConfig::with_mtu(61418)).expect("harness");
    let engine = Engine::start(&h, &[]).expect("engine");
    let id = engine.stats().unwrap().program_id.expect("program id");
    assert_eq!(attached_ids(&h), (Some(id), Some(id)));
    let (status, clean, _, err) = engine.stop();
    assert!(clean && status.success(), "exit {status}: {err}");
    assert_eq!(attached_ids(&h), (None, None));
}

#[test]
fn an_mtu_beyond_an_afxdp_chain_is_refused() {
    let h = Harness::new(HarnessConfig::default()).expect("harness");
    // 16 UMEM frames of 3840 bytes carry 61440: an MTU of 61418 with
    // Ethernet and two VLAN tags.
    h.engine
        .ip(&["link", "set", INSIDE_IF, "mtu", "61419"])
        .unwrap();
    let (code, err) = run_engine(&h, &[], &["--inside", INSIDE_IF, "--outside", OUTSIDE_IF]);
    assert_ne!(code, 0);
    assert!(
        err.contains("the MTU of 'inside' (61419)") && err.contains("lower the MTU to 61418"),
        "{err}"
    );
    assert_eq!(attached_ids(&h), (None, None));
}
