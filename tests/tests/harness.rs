//! The harness cleans up after itself: on drop, on panic, and through
//! `loupe-harness down`.

use std::{process::Command, time::Duration};

use loupe_tests::{
    netns::{self, Netns},
    wait_until, workspace_bin, Harness, HarnessConfig,
};

fn exists(name: &str) -> bool {
    netns::list().iter().any(|n| n == name)
}

#[test]
fn a_panicking_test_leaves_no_namespace_or_process() {
    let payload = std::thread::spawn(|| {
        let h = Harness::new(HarnessConfig::default()).unwrap();
        let names = [
            h.client.name.clone(),
            h.engine.name.clone(),
            h.server.name.clone(),
        ];
        let child = h.server.command("sleep").arg("600").spawn().unwrap();
        std::panic::panic_any((names, child));
    })
    .join()
    .expect_err("thread must panic");
    let (names, mut child) = payload
        .downcast::<([String; 3], std::process::Child)>()
        .map(|b| *b)
        .unwrap();
    for n in &names {
        assert!(!exists(n), "{n} survived the panic");
    }
    // The process left in the server namespace was killed with it.
    let status = wait_until("the orphan to die", Duration::from_secs(10), || {
        child.try_wait().map_err(|e| e.to_string())
    })
    .unwrap();
    assert!(
        !status.success(),
        "sleep 600 cannot have finished: {status}"
    );
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

#[test]
fn the_kernel_relay_baseline_carries_connections_through_socat() {
    use std::net::TcpStream;

    use loupe_tests::{
        harness::{RELAY_V4, SERVER_V4},
        tcp::{connect, echo_roundtrip, listen},
    };

    let h = Harness::new(HarnessConfig::default()).unwrap();
    let _relay = h.relay_up(443).expect("relay");
    let listener = listen(&h.server, &format!("{SERVER_V4}:443")).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, peer) = listener.accept().unwrap();
        let mut back = Vec::new();
        std::io::copy(&mut s, &mut back).unwrap();
        std::io::Write::write_all(&mut s, &back).unwrap();
        peer
    });
    let mut c: TcpStream = connect(&h.client, &format!("{SERVER_V4}:443")).unwrap();
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(echo_roundtrip(&mut c, &data).unwrap(), data);
    // The server was reached from the relay, not from the client: the
    // connection really went through socat, not over the bridge.
    assert_eq!(server.join().unwrap().ip().to_string(), RELAY_V4);
    assert_eq!(h.relay_redirected().unwrap(), 1);
}
