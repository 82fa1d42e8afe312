//! Hostile frames: truncated and inconsistent IPv4/IPv6/TCP headers, bad
//! IHL, IPv6 extension headers, fragments, VLAN tags. The engine neither
//! crashes nor steers what it cannot parse; every frame is counted where it
//! went and still reaches the other side.

use std::time::Duration;

use loupe_tests::{
    engine::Engine,
    frames::{hostile_cases, Expect},
    harness::{PEER_IF, SERVER_V4},
    https::{curl_sha256, Nginx},
    raw::RawSocket,
    wait_until, Harness, HarnessConfig,
};

#[test]
fn hostile_frames_are_counted_and_forwarded_without_harm() {
    let h = Harness::new(HarnessConfig::default()).expect("harness");
    let mut engine = Engine::start(&h, &[]).expect("engine");
    let cases = hostile_cases();
    let count = |e: Expect| cases.iter().filter(|c| c.expect == e).count() as u64;

    let tx = h
        .client
        .enter(|| RawSocket::open(PEER_IF))
        .unwrap()
        .unwrap();
    let rx = h
        .server
        .enter(|| RawSocket::open(PEER_IF))
        .unwrap()
        .unwrap();
    for c in &cases {
        tx.send(&c.frame)
            .unwrap_or_else(|e| panic!("inject {}: {e}", c.name));
    }

    // Each frame arrives at the server's interface, by whichever path.
    // (Counters below account for the frames a receiver hides from taps.)
    let mut missing: Vec<usize> = (0..cases.len()).filter(|i| cases[*i].observable).collect();
    let observable = missing.len();
    let mut buf = vec![0u8; 4096];
    let waited = wait_until(
        "the injected frames at the server",
        Duration::from_secs(30),
        || {
            while let Some(n) = rx
                .recv(&mut buf, Duration::from_millis(50))
                .map_err(|e| e.to_string())?
            {
                if let Some(i) = missing.iter().position(|c| cases[*c].matches(&buf[..n])) {
                    missing.remove(i);
                }
            }
            if missing.is_empty() {
                Ok(Some(()))
            } else {
                Err(format!(
                    "{} of {observable} arrived",
                    observable - missing.len()
                ))
            }
        },
    );
    if let Err(e) = waited {
        let names: Vec<&str> = missing.iter().map(|i| cases[*i].name).collect();
        panic!("{e}: missing {names:?}");
    }

    let r = engine
        .wait_stats("the frames in the counters", Duration::from_secs(30), |r| {
            (r.xdp_packets("malformed") >= count(Expect::Malformed)
                && r.xdp_packets("fragment") >= count(Expect::Fragment)
                && r.xdp_packets("steer") >= count(Expect::Steer)
                && r.worker_sum(|c| c.tx_outside.packets) >= count(Expect::Steer))
            .then(|| r.clone())
        })
        .unwrap();
    // Exact: nothing else in this harness is malformed, fragmented or TCP.
    assert_eq!(r.xdp_packets("malformed"), count(Expect::Malformed));
    assert_eq!(r.xdp_packets("fragment"), count(Expect::Fragment));
    assert_eq!(r.xdp_packets("steer"), count(Expect::Steer));
    assert_eq!(
        r.xdp_packets("tag_vlan"),
        cases.iter().filter(|c| c.vlan).count() as u64
    );
    // At least: the kernel's own MLD reports carry hop-by-hop headers too.
    assert!(r.xdp_packets("tag_ipv6_ext") >= cases.iter().filter(|c| c.ipv6_ext).count() as u64);
    // The steered ones went through a worker and out the other side.
    let tx_out = r.worker_sum(|c| c.tx_outside.packets);
    assert_eq!(tx_out, count(Expect::Steer), "{r:?}");
    assert!(engine.alive(), "engine died");

    // And the engine still carries real traffic.
    let nginx = Nginx::start(&h, 443).expect("nginx");
    let sha = nginx.add_file("after", 256 * 1024, 3).unwrap();
    let (got, _) = curl_sha256(&h, &nginx.curl_args(SERVER_V4, "after")).unwrap();
    assert_eq!(got, sha);
    let (status, clean, _, err) = engine.stop();
    assert!(clean && status.success(), "engine exit {status}: {err}");
}
