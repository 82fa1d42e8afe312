//! What is not steered stays in the kernel: plain TCP on another port,
//! ICMP and ARP/ND cross by DEVMAP and never reach a worker.

use std::time::Duration;

use loupe_tests::{
    engine::Engine,
    harness::{SERVER_V4, SERVER_V6},
    tcp::{connect, echo_roundtrip, listen, spawn_echo_server},
    Harness, HarnessConfig,
};

#[test]
fn unsteered_tcp_icmp_and_arp_take_the_devmap_path() {
    let h = Harness::new(HarnessConfig::default()).expect("harness");
    let engine = Engine::start(&h, &["--steer-ports", "443"]).expect("engine");

    // 4 MiB echoed over TCP port 8080 (not steered), IPv4 and IPv6.
    let data: Vec<u8> = (0..4u32 << 20).map(|i| (i * 7 + i / 251) as u8).collect();
    for addr in [format!("{SERVER_V4}:8080"), format!("[{SERVER_V6}]:8080")] {
        let server = spawn_echo_server(listen(&h.server, &addr).unwrap(), 1);
        let mut s = connect(&h.client, &addr).unwrap();
        let back = echo_roundtrip(&mut s, &data).unwrap();
        assert!(back == data, "echo over {addr} differs");
        server.join().unwrap().unwrap();
    }
    for (ping, addr) in [("-4", SERVER_V4), ("-6", SERVER_V6)] {
        h.client
            .exec("ping", &[ping, "-c", "3", "-i", "0.2", "-W", "5", addr])
            .unwrap_or_else(|e| panic!("ping {addr}: {e}"));
    }

    let r = engine
        .wait_stats(
            "the traffic in the counters",
            Duration::from_secs(30),
            |r| {
                // 4 MiB each way over both families, plus headers.
                (r.xdp.get("pass_tcp").map_or(0, |c| c.bytes) >= 16 << 20
                    && r.xdp_packets("pass_non_tcp") >= 12
                    && r.xdp_packets("pass_non_ip") >= 2)
                    .then(|| r.clone())
            },
        )
        .unwrap();
    assert_eq!(r.xdp_packets("steer"), 0);
    assert_eq!(r.xdp_packets("steer_no_socket"), 0);
    let user = r.worker_sum(|c| c.rx_inside.packets + c.rx_outside.packets + c.cross_in);
    assert_eq!(user, 0, "no frame may reach a worker");
    // Outcomes partition everything the program saw.
    let outcomes: u64 = loupe_common::Counter::ALL
        .iter()
        .filter(|c| c.is_outcome())
        .map(|c| r.xdp_packets(c.label()))
        .sum();
    assert_eq!(outcomes, r.xdp_packets("rx"));
    let (status, clean, _, err) = engine.stop();
    assert!(clean && status.success(), "engine exit {status}: {err}");
}
