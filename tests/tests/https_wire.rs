//! HTTPS from the client namespace to nginx in the server namespace through
//! the engine's userspace wire (steered by XDP into AF_XDP, reinjected by
//! the workers), over IPv4 and IPv6, in native and generic XDP mode, and a
//! 200 MiB transfer checked byte for byte.

use std::time::Duration;

use loupe_tests::{
    engine::Engine,
    harness::{CLIENT_V4, INSIDE_IF, OUTSIDE_IF, SERVER_V4, SERVER_V6},
    https::{curl_sha256, Nginx},
    Harness, HarnessConfig,
};

const MIB: usize = 1 << 20;

/// The XDP attach mode the engine asks for (`--xdp-mode`, native by
/// default).
fn https_through_userspace(server_addr: &str, mode: &'static str) {
    let h = Harness::new(HarnessConfig::default()).expect("harness");
    let engine = Engine::start(&h, &["--xdp-mode", mode]).expect("engine");
    // The kernel attached it so on both interfaces, and the report says so.
    for dev in [INSIDE_IF, OUTSIDE_IF] {
        assert_eq!(h.xdp_attach_mode(dev).unwrap(), Some(mode), "{dev}");
    }
    assert_eq!(engine.stats().unwrap().xdp_mode, mode);
    let nginx = Nginx::start(&h, 443).expect("nginx");
    let sha = nginx.add_file("blob", 3 * MIB, 7).expect("file");

    let (got, len) = curl_sha256(&h, &nginx.curl_args(server_addr, "blob")).expect("curl");
    assert_eq!(len, 3 * MIB as u64);
    assert_eq!(got, sha, "body differs from the file served");

    // The frames went through AF_XDP: steered by XDP, received and sent
    // by workers on both interfaces, and the flow was tracked.
    let r = engine
        .wait_stats(
            "the transfer in the counters",
            Duration::from_secs(30),
            |r| {
                let rx_in = r.worker_sum(|c| c.rx_inside.packets);
                let rx_out = r.worker_sum(|c| c.rx_outside.packets);
                let tx_in = r.worker_sum(|c| c.tx_inside.bytes);
                let flow = r
                    .workers
                    .iter()
                    .flat_map(|w| &w.flows)
                    .any(|f| f.server.ends_with(":443") && f.outside.bytes >= 3 * MIB as u64);
                (rx_in > 10 && rx_out > 2000 && tx_in >= 3 * MIB as u64 && flow).then(|| r.clone())
            },
        )
        .unwrap();
    assert!(r.xdp_packets("steer") >= r.worker_sum(|c| c.rx_inside.packets + c.rx_outside.packets));
    assert_eq!(r.xdp_packets("pass_tcp"), 0, "no TCP may bypass the wire");
    assert_eq!(r.xdp_packets("malformed"), 0);
    let (status, clean, out, err) = engine.stop();
    assert!(clean && status.success(), "engine exit {status}: {err}");
    assert!(out.contains("steer"), "final report printed: {out}");
}

#[test]
fn https_ipv4_through_userspace_wire() {
    https_through_userspace(SERVER_V4, "native");
}

#[test]
fn https_ipv6_through_userspace_wire() {
    https_through_userspace(SERVER_V6, "native");
}

#[test]
fn https_ipv4_in_generic_xdp_mode() {
    https_through_userspace(SERVER_V4, "skb");
}

#[test]
fn two_hundred_mib_byte_exact_through_userspace() {
    let h = Harness::new(HarnessConfig::default()).expect("harness");
    let engine = Engine::start(&h, &[]).expect("engine");
    let nginx = Nginx::start(&h, 443).expect("nginx");
    let size = 200 * MIB;
    let sha = nginx.add_file("big", size, 0x10ad_5eed).expect("file");

    let (got, len) = curl_sha256(&h, &nginx.curl_args(SERVER_V4, "big")).expect("curl");
    assert_eq!(len, size as u64);
    assert_eq!(got, sha, "200 MiB body differs");

    let r = engine
        .wait_stats("the bytes in the counters", Duration::from_secs(30), |r| {
            let client = format!("{CLIENT_V4}:");
            let flow = r
                .workers
                .iter()
                .flat_map(|w| &w.flows)
                .any(|f| f.client.starts_with(&client) && f.outside.bytes >= size as u64);
            (r.worker_sum(|c| c.tx_inside.bytes) >= size as u64 && flow).then(|| r.clone())
        })
        .unwrap();
    // Every frame of the flow crossed userspace: XDP steered at least the
    // frames the workers received, and nothing of the flow bypassed it.
    assert!(r.xdp.get("steer").map_or(0, |c| c.bytes) >= size as u64);
    assert_eq!(r.xdp_packets("pass_tcp"), 0);
    let (status, clean, _, err) = engine.stop();
    assert!(clean && status.success(), "engine exit {status}: {err}");
}
