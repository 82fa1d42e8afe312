//! The systemd units in `dist/systemd` are what they claim: they verify
//! cleanly, the dataplane runs with exactly the capabilities its unit
//! grants (and the memlock limit it lifts), and the control daemon runs
//! with none, as an unprivileged user reaching the dataplane through the
//! socket's group.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use loupe_tests::{
    control::{dataplane_socket, Control},
    engine::Engine,
    harness::SERVER_V4,
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
        .expect("systemd-analyze (Debian package systemd)");
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

#[test]
fn the_dataplane_and_control_run_with_the_units_privileges() {
    let h = Harness::new(HarnessConfig::default()).expect("harness");
    // The dataplane: root in group 65534 (the unit's User=root,
    // Group=loupe) with only the unit's capabilities; its socket is for
    // that group.
    let sock = dataplane_socket(&h);
    let sock_s = sock.to_str().unwrap();
    let caps = "-all,+bpf,+perfmon,+net_admin,+net_raw,+ipc_lock";
    let (bounding, inh, amb) = (
        format!("--bounding-set={caps}"),
        format!("--inh-caps={caps}"),
        format!("--ambient-caps={caps}"),
    );
    let wrapper = [
        "setpriv",
        "--regid=65534",
        "--clear-groups",
        &bounding,
        &inh,
        &amb,
        "--",
    ];
    let engine = Engine::start_wrapped(
        &h,
        &wrapper,
        &["--control-socket", sock_s, "--control-group", "65534"],
        &[],
    )
    .expect("the dataplane with the unit's capabilities");
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
