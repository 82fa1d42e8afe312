//! The systemd units in `dist/systemd` are what they claim: they verify
//! cleanly (`systemd-analyze`, from Debian's `systemd`, which
//! `scripts/setup` installs), the dataplane runs with exactly the
//! capabilities its unit grants, under the locked-memory limit the unit
//! leaves it (systemd's default: the unit sets no `LimitMEMLOCK`) because
//! CAP_IPC_LOCK exempts its UMEM from it, and without that capability is
//! refused with the reason; the control daemon runs with none, as an
//! unprivileged user reaching the dataplane through the socket's group.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use loupe_tests::{
    control::{dataplane_socket, Control},
    engine::Engine,
    harness::{INSIDE_IF, OUTSIDE_IF, SERVER_V4},
    https::{curl_sha256, Nginx},
    workspace_bin, Harness, HarnessConfig,
};

fn unit(name: &str) -> (PathBuf, String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../dist/systemd")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    (path, text)
}

/// The value of `key=` in a unit (the last one wins, as in systemd).
fn setting<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .rev()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

#[test]
fn the_units_verify_cleanly() {
    let dir = std::env::temp_dir().join(format!("loupe-units-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bins = workspace_bin("loupe")
        .parent()
        .unwrap()
        .display()
        .to_string();
    let mut paths = Vec::new();
    for name in ["loupe-dataplane.service", "loupe-control.service"] {
        let (_, text) = unit(name);
        // The binaries where this checkout has them; the environment file
        // optional (it is the operator's).
        let text = text
            .replace("/usr/local/bin", &bins)
            .replace("EnvironmentFile=/", "EnvironmentFile=-/");
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        paths.push(p);
    }
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&paths)
        .output()
        .expect("systemd-analyze (Debian package systemd; scripts/setup installs it)");
    let err = String::from_utf8_lossy(&out.stderr);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(out.status.success() && err.trim().is_empty(), "{err}");
}

#[test]
fn the_units_grant_only_what_each_process_needs() {
    let (_, dp) = unit("loupe-dataplane.service");
    let caps = "CAP_BPF CAP_PERFMON CAP_NET_ADMIN CAP_NET_RAW CAP_IPC_LOCK";
    assert_eq!(setting(&dp, "CapabilityBoundingSet"), Some(caps));
    assert_eq!(setting(&dp, "AmbientCapabilities"), Some(caps));
    assert_eq!(setting(&dp, "NoNewPrivileges"), Some("yes"));
    let (_, ctl) = unit("loupe-control.service");
    assert_eq!(setting(&ctl, "CapabilityBoundingSet"), Some(""));
    assert_eq!(setting(&ctl, "User"), Some("loupe"));
    // Every option the units pass exists.
    for (bin, text, sub) in [
        ("loupe-dataplane", &dp, None),
        ("loupe", &ctl, Some("daemon")),
    ] {
        let mut cmd = Command::new(workspace_bin(bin));
        if let Some(s) = sub {
            cmd.arg(s);
        }
        let help = String::from_utf8(cmd.arg("--help").output().unwrap().stdout).unwrap();
        let exec = setting(text, "ExecStart").unwrap();
        for opt in exec.split_whitespace().filter(|w| w.starts_with("--")) {
            let global = opt == "--socket";
            assert!(
                global || help.contains(opt),
                "{bin}: {opt} is not an option"
            );
        }
    }
}

/// systemd's DefaultLimitMEMLOCK (8M), which a unit without
/// `LimitMEMLOCK=` runs under.
const SYSTEMD_MEMLOCK: u64 = 8 << 20;

/// The capabilities the dataplane's unit grants, as setpriv names them
/// (`bpf`, `net_admin`, ...).
fn dataplane_caps() -> Vec<String> {
    let (_, dp) = unit("loupe-dataplane.service");
    setting(&dp, "AmbientCapabilities")
        .unwrap()
        .split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_lowercase())
        .collect()
}

/// A wrapper running a program as the dataplane's unit runs it: root in
/// group 65534 (the unit's User=root, Group=loupe), only the
/// capabilities `caps` (setpriv's names), and the locked-memory limit
/// systemd leaves the unit.
fn as_the_unit(caps: &[String]) -> Vec<String> {
    let list: String = std::iter::once("-all".to_string())
        .chain(caps.iter().map(|c| format!("+{c}")))
        .collect::<Vec<_>>()
        .join(",");
    vec![
        "prlimit".to_string(),
        format!("--memlock={SYSTEMD_MEMLOCK}:{SYSTEMD_MEMLOCK}"),
        "setpriv".into(),
        "--regid=65534".into(),
        "--clear-groups".into(),
        format!("--bounding-set={list}"),
        format!("--inh-caps={list}"),
        format!("--ambient-caps={list}"),
        "--".into(),
    ]
}

#[test]
fn the_dataplane_and_control_run_with_the_units_privileges() {
    let h = Harness::new(HarnessConfig::default()).expect("harness");
    let (_, dp) = unit("loupe-dataplane.service");
    let caps = dataplane_caps();
    assert!(caps.iter().any(|c| c == "ipc_lock"), "{caps:?}");
    // No limit of its own: systemd's default applies.
    assert_eq!(setting(&dp, "LimitMEMLOCK"), None);
    // Its UMEM (one per queue) is beyond that limit: it runs only
    // because CAP_IPC_LOCK exempts it.
    let port = loupe_dataplane::xsk::PortConfig::default();
    assert!(u64::from(port.frames) * u64::from(port.frame_size) > SYSTEMD_MEMLOCK);

    // Its socket is for the unit's group.
    let sock = dataplane_socket(&h);
    let sock_s = sock.to_str().unwrap();
    let wrapper = as_the_unit(&caps);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let engine = Engine::start_wrapped(
        &h,
        &wrapper,
        &["--control-socket", sock_s, "--control-group", "65534"],
        &[],
    )
    .expect("the dataplane with the unit's capabilities and memlock limit");
    let status = std::fs::read_to_string(format!("/proc/{}/status", engine.pid())).unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap()
        .trim();
    // CAP_NET_ADMIN 12, CAP_NET_RAW 13, CAP_IPC_LOCK 14, CAP_PERFMON 38,
    // CAP_BPF 39.
    assert_eq!(
        u64::from_str_radix(eff, 16).unwrap(),
        (1 << 12) | (1 << 13) | (1 << 14) | (1 << 38) | (1 << 39)
    );
    // It runs under the limit it was given (it cannot lift it without
    // CAP_SYS_RESOURCE).
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", engine.pid())).unwrap();
    let memlock: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max locked memory"))
        .unwrap()
        .split_whitespace()
        .skip(3)
        .take(2)
        .collect();
    let limit = SYSTEMD_MEMLOCK.to_string();
    assert_eq!(memlock, [limit.as_str(), limit.as_str()], "{limits}");

    // The control daemon: nobody, no capabilities, in group 65534.
    std::fs::set_permissions(&h.dir, std::fs::Permissions::from_mode(0o711)).unwrap();
    let home = h.dir.join("nobody");
    std::fs::create_dir(&home).unwrap();
    std::os::unix::fs::chown(&home, Some(65534), Some(65534)).unwrap();
    let policy = home.join("p.toml");
    std::fs::write(
        &policy,
        "[[rules]]\nname = \"split\"\naction = \"tcp-split\"\n",
    )
    .unwrap();
    let nobody = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--",
    ];
    let control = Control::start_in(&h, &home, &nobody, &sock, Some(&policy), &[])
        .expect("the control daemon as nobody");
    assert_eq!(control.wait_in_sync().unwrap(), 1);
    let nginx = Nginx::start(&h, 443).expect("nginx");
    curl_sha256(&h, &nginx.curl_args(SERVER_V4, "index.html")).unwrap();
    let rec = control
        .wait_record("the split's record", |r| r["rule"] == "split")
        .unwrap();
    assert_eq!(rec["action"], "tcp-split");
    let log = std::fs::metadata(&control.log).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&log), 65534);
    drop(control);
    let (st, clean, _, err) = engine.stop();
    assert!(clean && st.success(), "{err}");
}

/// Without CAP_IPC_LOCK the same limit cannot hold the UMEM: the start is
/// refused, naming the limit and the capability, and nothing is attached.
#[test]
fn without_cap_ipc_lock_the_umem_is_refused_with_the_reason() {
    let h = Harness::new(HarnessConfig::default()).expect("harness");
    let mut caps = dataplane_caps();
    caps.retain(|c| c != "ipc_lock");
    let wrapper = as_the_unit(&caps);
    let out = h
        .engine
        .command(&wrapper[0])
        .args(&wrapper[1..])
        .arg(workspace_bin("loupe-dataplane"))
        .args(["--inside", INSIDE_IF, "--outside", OUTSIDE_IF])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("cannot create the UMEM for queue 0")
            && err.contains("CAP_IPC_LOCK")
            && err.contains("locked-memory limit (8192 KiB here)"),
        "{err}"
    );
    for dev in [INSIDE_IF, OUTSIDE_IF] {
        assert_eq!(h.xdp_prog_id(dev).unwrap(), None, "{dev} left attached");
    }
}
