//! Flow affinity with two queues and two workers: both directions of each
//! of 200 concurrent connections meet in one worker (the owner), frames
//! that land on the other worker cross over, and the data is intact.

use std::{collections::HashMap, time::Duration};

use loupe_tests::{
    engine::Engine,
    harness::SERVER_V4,
    tcp::{connect, echo_roundtrip, listen, spawn_echo_server},
    Harness, HarnessConfig,
};

const CONNS: usize = 200;

#[test]
fn both_directions_of_200_concurrent_flows_meet_in_one_worker() {
    let h = Harness::new(HarnessConfig::default()).expect("harness");
    let engine = Engine::start(&h, &["--queues", "2"]).expect("engine");
    assert_eq!(engine.stats().unwrap().workers.len(), 2);
    let addr = format!("{SERVER_V4}:443");
    let server = spawn_echo_server(listen(&h.server, &addr).unwrap(), CONNS);

    // All connections open at once before any data moves.
    let streams: Vec<_> = (0..CONNS)
        .map(|i| connect(&h.client, &addr).unwrap_or_else(|e| panic!("connect {i}: {e}")))
        .collect();
    let ports: Vec<u16> = streams
        .iter()
        .map(|s| s.local_addr().unwrap().port())
        .collect();
    let workers: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(i, mut s)| {
            std::thread::spawn(move || {
                let data: Vec<u8> = (0..32 * 1024).map(|j| (i * 31 + j) as u8).collect();
                let back = echo_roundtrip(&mut s, &data).expect("echo");
                assert!(back == data, "connection {i} data differs");
            })
        })
        .collect();
    for w in workers {
        w.join().expect("client thread");
    }
    server.join().unwrap().unwrap();

    let r = engine
        .wait_stats(
            "all 200 flows in the flow tables",
            Duration::from_secs(30),
            |r| {
                let seen = r
                    .workers
                    .iter()
                    .flat_map(|w| &w.flows)
                    .filter(|f| f.inside.packets >= 3 && f.outside.packets >= 3)
                    .count();
                let settled = r.worker_sum(|c| c.cross_out) == r.worker_sum(|c| c.cross_in);
                (seen >= CONNS && settled).then(|| r.clone())
            },
        )
        .unwrap();

    let mut owner_of: HashMap<u16, Vec<usize>> = HashMap::new();
    for w in &r.workers {
        for f in &w.flows {
            let port: u16 = f.client.rsplit(':').next().unwrap().parse().unwrap();
            owner_of.entry(port).or_default().push(w.id);
        }
    }
    for p in &ports {
        let owners = owner_of.get(p).cloned().unwrap_or_default();
        assert_eq!(
            owners.len(),
            1,
            "flow from port {p} is in workers {owners:?}"
        );
    }
    let owned: Vec<usize> = r.workers.iter().map(|w| w.flows.len()).collect();
    assert!(owned.iter().all(|n| *n > 0), "flows per worker {owned:?}");
    // Frames arrived on the non-owner's queue and crossed over.
    let cross_out = r.worker_sum(|c| c.cross_out);
    let cross_in = r.worker_sum(|c| c.cross_in);
    assert!(cross_out > 0, "no frame crossed between workers");
    assert_eq!(cross_out, cross_in, "crossover frames lost");
    assert_eq!(r.worker_sum(|c| c.cross_full), 0);
    let (status, clean, _, err) = engine.stop();
    assert!(clean && status.success(), "engine exit {status}: {err}");
}
