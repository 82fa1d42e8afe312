//! tcp-split against Linux TCP at both ends, the hard cases: a thousand
//! concurrent connections, half-closes both ways, RSTs from either side in
//! the middle of a transfer, a server that stops reading (the engine holds
//! no more than its buffers, by its own report), a server that closes
//! before the client says anything, and jumbo frames (MTU 9000, each frame
//! a multi-buffer chain of UMEM frames).

use std::{
    io::{ErrorKind, Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use loupe_dataplane::{
    flow::FlowDecision,
    stats::{SplitCounters, StatsReport},
};
use loupe_tests::{
    engine::Engine,
    harness::{SERVER_V4, SERVER_V6},
    https::fill_pseudo_random,
    tcp::{both_ways, connect, echo_roundtrip, listen, receive, spawn_echo_server, tune},
    Harness, HarnessConfig,
};
use sha2::{Digest, Sha256};

fn data(seed: usize, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    fill_pseudo_random(&mut v, seed as u64);
    v
}

/// The counters once the one split connection has ended.
fn one_split_ended(engine: &Engine) -> SplitCounters {
    engine
        .wait_stats("the split to end", Duration::from_secs(60), |r| {
            let s = r.split_total();
            (s.closed >= 1).then_some(s)
        })
        .unwrap()
}

/// A harness, an engine splitting, and the server's listener on port 443
/// (with its address).
fn start() -> (Harness, Engine, String, TcpListener) {
    start_with(&["--tcp-split"])
}

fn start_with(args: &[&str]) -> (Harness, Engine, String, TcpListener) {
    let h = Harness::new(HarnessConfig::default()).expect("harness");
    let e = Engine::start(&h, args).expect("engine");
    let addr = format!("{SERVER_V4}:443");
    let listener = listen(&h.server, &addr).unwrap();
    (h, e, addr, listener)
}

#[test]
fn a_thousand_concurrent_connections_of_one_mib_each() {
    const CONNS: usize = 1000;
    const SIZE: usize = 1 << 20;
    let (h, engine, addr, listener) = start();
    // Server: for each connection, hash everything until EOF, send the
    // digest back, close.
    let server = std::thread::spawn(move || {
        let mut handles = Vec::new();
        for _ in 0..CONNS {
            let (mut s, _) = listener.accept().expect("accept");
            s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
            handles.push(
                std::thread::Builder::new()
                    .stack_size(128 << 10)
                    .spawn(move || {
                        let (_, digest) = receive(&mut s).expect("server read");
                        s.write_all(&digest).expect("server write");
                    })
                    .unwrap(),
            );
        }
        for h in handles {
            h.join().expect("server thread");
        }
    });
    // All connections open before any data moves. A thousand senders at
    // full speed overload two vCPUs shared by both endpoints and the
    // engine, and the engine's rings drop frames; the clients use CUBIC
    // because this machine's default, BBR, takes minutes to climb back from
    // the bandwidth it measures during such an episode (seen here: 4 kbit/s
    // pacing after the burst), which would test BBR rather than the split.
    let streams: Vec<TcpStream> = (0..CONNS)
        .map(|i| {
            let s = connect(&h.client, &addr).unwrap_or_else(|e| panic!("connect {i}: {e}"));
            tune(&s, Duration::from_secs(240));
            s
        })
        .collect();
    let clients: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(i, mut s)| {
            std::thread::Builder::new()
                .stack_size(128 << 10)
                .spawn(move || {
                    let d = data(i, SIZE);
                    s.write_all(&d).expect("client write");
                    s.shutdown(Shutdown::Write).unwrap();
                    let mut digest = Vec::new();
                    s.read_to_end(&mut digest).expect("client read");
                    assert_eq!(
                        digest,
                        Sha256::digest(&d).to_vec(),
                        "connection {i} differs"
                    );
                })
                .unwrap()
        })
        .collect();
    for c in clients {
        c.join().expect("client thread");
    }
    server.join().unwrap();
    let (s, frames) = engine
        .wait_stats("every connection split", Duration::from_secs(60), |r| {
            let s = r.split_total();
            let frames = r.worker_sum(|c| c.rx_inside.packets + c.rx_outside.packets);
            // A connection whose first data segment the overload dropped
            // waits for the client's retransmission (the hold draws it
            // with a duplicate ACK and SACK, as the server would); one
            // that does not come within the hold timeout is split all the
            // same, decided without the server name (and still arrives
            // byte-exact, checked above).
            (s.split >= CONNS as u64).then_some((s, frames))
        })
        .unwrap();
    // Every hold that timed out was still missing the client's first
    // bytes: a whole initial window and its resends lost in the storm
    // (seen: only the client's tail probe arrived), never a hold the
    // engine failed to decide with the bytes in hand. How many depends on
    // the machine's load (0-5 in nine local runs, 13 on one loaded CI
    // run): at most 3%.
    assert_eq!(s.hold_timeouts, s.hold_timeouts_start_missing, "{s:?}");
    assert!(s.hold_timeouts * 100 <= 3 * CONNS as u64, "{s:?}");
    assert_eq!(s.released, 0, "{s:?}");
    assert_eq!((s.passthrough, s.aborted), (0, 0), "{s:?}");
    // A frame with a bad TCP checksum is dropped, counted, and
    // retransmitted by its sender; under this load never many (Linux's
    // 0xffff for a zero checksum is accepted, so none are expected).
    assert!(
        s.bad_checksum * 10_000 < frames,
        "{} bad of {frames}: {s:?}",
        s.bad_checksum
    );
    engine.stop();
}

#[test]
fn half_close_works_in_both_directions() {
    let (h, engine, addr, listener) = start();
    let up = data(1, 300_000);
    let down = data(2, 500_000);
    let (up2, down2) = (up.clone(), down.clone());
    // Client finishes first: the server keeps sending after the client's
    // FIN; then the reverse on a second connection.
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        assert!(got == up2, "upload differs");
        s.write_all(&down2).unwrap();
        drop(s);
        let (mut s, _) = listener.accept().unwrap();
        s.write_all(&down2).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        assert!(got == up2, "upload after the server's FIN differs");
    });
    let mut c = connect(&h.client, &addr).unwrap();
    c.write_all(&up).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap();
    assert!(got == down, "download after the client's FIN differs");

    let mut c = connect(&h.client, &addr).unwrap();
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap();
    assert!(got == down, "download differs");
    c.write_all(&up).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    server.join().unwrap();
    drop(c);
    engine
        .wait_stats("both connections closed", Duration::from_secs(60), |r| {
            let s = r.split_total();
            (s.split == 2 && s.closed == 2 && s.aborted == 0).then_some(())
        })
        .unwrap();
    engine.stop();
}

/// Closes with SO_LINGER 0: the kernel sends a RST instead of a FIN.
fn reset(s: TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket fd and a correctly sized linger struct.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&s),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(s);
}

fn read_until_reset(s: &mut TcpStream, deadline: Duration) -> ErrorKind {
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let end = Instant::now() + deadline;
    let mut buf = vec![0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return ErrorKind::UnexpectedEof,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                assert!(Instant::now() < end, "no reset within {deadline:?}");
            }
            Err(e) => return e.kind(),
        }
    }
}

#[test]
fn a_reset_from_either_side_reaches_the_other() {
    let (h, engine, addr, listener) = start();
    // The client resets mid-upload: the server sees the reset.
    let mut c = connect(&h.client, &addr).unwrap();
    let (mut s, _) = listener.accept().unwrap();
    let server = std::thread::spawn(move || read_until_reset(&mut s, Duration::from_secs(30)));
    c.write_all(&data(3, 200_000)).unwrap();
    reset(c);
    assert_eq!(server.join().unwrap(), ErrorKind::ConnectionReset);
    // The server resets mid-download: the client sees the reset.
    let mut c = connect(&h.client, &addr).unwrap();
    let (mut s2, _) = listener.accept().unwrap();
    let w = std::thread::spawn(move || {
        let _ = s2.write_all(&data(4, 100_000));
        reset(s2);
    });
    let kind = read_until_reset(&mut c, Duration::from_secs(30));
    w.join().unwrap();
    assert_eq!(kind, ErrorKind::ConnectionReset);
    engine
        .wait_stats(
            "both split connections ended",
            Duration::from_secs(60),
            |r| {
                let s = r.split_total();
                (s.split == 2 && s.closed == 2 && s.aborted >= 2).then_some(())
            },
        )
        .unwrap();
    engine.stop();
}

/// What the engine reports of its one split connection: the decision in
/// the flow listing.
fn the_split(r: &StatsReport) -> Option<FlowDecision> {
    r.workers
        .iter()
        .flat_map(|w| &w.flows)
        .filter_map(|f| f.decision.clone())
        .find(|d| d.state == "split")
}

/// Each split connection's four buffers (two halves, receive and send),
/// at the most they may grow to (`--split-buffer-max-kib`).
const BUFFER_MAX_KIB: u64 = 512;
const SPLIT_BOUND: u64 = 4 * (BUFFER_MAX_KIB << 10);

#[test]
fn a_server_that_stops_reading_throttles_the_client_within_the_engines_buffers() {
    let max = BUFFER_MAX_KIB.to_string();
    let (h, engine, addr, listener) = start_with(&["--tcp-split", "--split-buffer-max-kib", &max]);
    const SIZE: usize = 32 << 20;
    let payload = data(5, SIZE);
    let expect = Sha256::digest(&payload).to_vec();
    let (go, read) = std::sync::mpsc::channel::<()>();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        // A zero window toward the engine until the test says so.
        read.recv().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        // Kept open: the split stays listed until the test has read it.
        (receive(&mut s).unwrap().1, s)
    });
    let mut c = connect(&h.client, &addr).unwrap();
    c.set_write_timeout(Some(Duration::from_secs(240))).unwrap();
    let writer = std::thread::spawn(move || {
        c.write_all(&payload).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        c
    });
    // The server's receive buffer fills, then the engine's half toward it
    // (its send buffer), then the half toward the client (its receive
    // buffer): then the engine's window to the client is shut. Both of
    // the engine's buffers on the way hold data, so more than one buffer's
    // worth is held.
    let stalled = engine
        .wait_stats(
            "the engine's buffers on the way to fill",
            Duration::from_secs(120),
            |r| the_split(r).filter(|d| d.buffered > 3 * (64 << 10)),
        )
        .unwrap();
    // Nothing has been read: the 32 MiB cannot have gone anywhere (the
    // client's send buffer, the engine's and the server's receive buffer
    // together hold a few MiB).
    assert!(
        !writer.is_finished(),
        "the client pushed 32 MiB into a server that does not read"
    );
    assert!(stalled.relayed_c2s < SIZE as u64 / 2, "{stalled:?}");
    go.send(()).unwrap();
    let (digest, server_end) = server.join().unwrap();
    let client_end = writer.join().unwrap();
    assert_eq!(digest, expect, "data differs after the stall");
    // The most the engine held for the connection, stall and all.
    let done = engine
        .wait_stats("the whole upload relayed", Duration::from_secs(60), |r| {
            the_split(r).filter(|d| d.relayed_c2s == SIZE as u64)
        })
        .unwrap();
    eprintln!(
        "held {} bytes in the stall ({} relayed), at most {}",
        stalled.buffered, stalled.relayed_c2s, done.buffered_peak
    );
    assert!(
        done.buffered_peak >= stalled.buffered && done.buffered_peak <= SPLIT_BOUND,
        "held at most {} bytes, over the bound of {SPLIT_BOUND}: {done:?}",
        done.buffered_peak
    );
    drop((client_end, server_end));
    engine.stop();
}

#[test]
fn a_server_that_closes_first_gives_the_client_a_clean_end() {
    let (h, engine, addr, listener) = start();
    let server = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        drop(s);
    });
    let mut c = connect(&h.client, &addr).unwrap();
    server.join().unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(
        c.read(&mut buf).unwrap(),
        0,
        "the server's FIN reaches the client"
    );
    // Writing after the peer closed ends in a reset, as with Linux alone.
    let _ = c.write_all(b"late words");
    drop(c);
    engine
        .wait_stats("the connection ended", Duration::from_secs(60), |r| {
            let s = r.split_total();
            (s.split == 1 && s.closed == 1).then_some(())
        })
        .unwrap();
    engine.stop();
}

/// 100,000 bytes echoed once over a connection made through an engine
/// that splits nothing, which has stopped since.
fn connected_before_the_engine(
    h: &Harness,
) -> (TcpStream, std::thread::JoinHandle<anyhow::Result<()>>) {
    let addr = format!("{SERVER_V4}:443");
    let listener = listen(&h.server, &addr).unwrap();
    let server = spawn_echo_server(listener, 1);
    let first = Engine::start(h, &[]).expect("engine");
    let mut c = connect(&h.client, &addr).unwrap();
    echo(&mut c, 1);
    first.stop();
    (c, server)
}

fn echo(c: &mut TcpStream, seed: usize) {
    let d = data(seed, 100_000);
    c.write_all(&d).unwrap();
    let mut back = vec![0u8; d.len()];
    c.read_exact(&mut back).unwrap();
    assert!(back == d, "echo {seed} differs");
}

/// With `--mid-flow pass`, a connection the engine did not see start is
/// left to the kernel uninspected: across an engine restart it carries on.
#[test]
fn connections_older_than_the_engine_are_released_to_the_xdp_fast_path() {
    let h = Harness::new(HarnessConfig::default()).expect("harness");
    // The connection is set up through an engine that does not split...
    let (mut c, server) = connected_before_the_engine(&h);
    // ...and continues through one that does: it is not split (its
    // handshake was never seen) but released to the XDP fast path.
    let engine = Engine::start(&h, &["--tcp-split", "--mid-flow", "pass"]).expect("engine");
    echo(&mut c, 2);
    let r = engine
        .wait_stats(
            "the old connection released",
            Duration::from_secs(30),
            |r| {
                let released = r.split_total().released;
                (released >= 1).then(|| r.clone())
            },
        )
        .unwrap();
    let bypass_before = r.xdp_packets("flow_bypass");
    echo(&mut c, 3);
    let r = engine
        .wait_stats(
            "the old connection on the fast path",
            Duration::from_secs(30),
            |r| (r.xdp_packets("flow_bypass") > bypass_before + 10).then(|| r.clone()),
        )
        .unwrap();
    assert_eq!(
        r.split_total().split,
        0,
        "an old connection must not be split"
    );
    drop(c);
    server.join().unwrap().unwrap();
    engine.stop();
}

/// By default (`--mid-flow drop`) a connection the engine did not see
/// start, which the policy would split, is reset at both ends at its
/// first segment: it cannot be split mid-stream, and passed it would go
/// uninspected (as a connection the engine forgot would: an outside
/// probe's way past inspection). Neither end hangs.
#[test]
fn connections_older_than_the_engine_are_reset_where_they_would_be_split() {
    let h = Harness::new(HarnessConfig::default()).expect("harness");
    let (mut c, server) = connected_before_the_engine(&h);
    let engine = Engine::start(&h, &["--tcp-split"]).expect("engine");
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    // The engine resets the connection at the first segment of it that
    // it sees: the client's write, or one the kernel sends first (the
    // server resending data whose ACK was lost while no engine ran), in
    // which case the write itself meets the reset.
    let mut buf = [0u8; 64];
    let got = c
        .write_all(b"after the restart")
        .and_then(|()| c.read(&mut buf));
    assert!(
        matches!(&got, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "the client is reset: {got:?}"
    );
    let served = server.join().unwrap();
    assert!(
        served
            .as_ref()
            .is_err_and(|e| e.to_string().contains("reset")),
        "the server is reset: {served:?}"
    );
    engine.wait_uninspectable_reset().unwrap();
    engine.stop();
}

/// A SYN flood (handshakes steered, the default): the SYNs fill the
/// engine's table, whose half-open entries go first.
#[test]
fn a_syn_flood_cannot_push_a_connection_out_of_the_split_table() {
    syn_flood(&[], 3000, |r| {
        let s = r.split_total();
        (s.evicted >= 2000 && s.table_full == 0).then_some(())
    });
}

/// A SYN flood with `--handshake-fast-path`: the SYNs never
/// reach the engine, and four times as many as the kernel keeps half-open
/// records for do not push out the record of a connection whose client
/// acknowledged the SYN-ACK. (Its record moved to the opened ones; the
/// kernel's LRU would also spare it on its own, as one looked up since it
/// was made, against SYNs never looked at again: the classifier test
/// checks the move itself.)
#[test]
fn a_syn_flood_cannot_push_an_opened_connections_record_out() {
    let syns = 4 * loupe_common::MAX_HANDSHAKES;
    syn_flood(&["--handshake-fast-path"], syns, |r| {
        (r.xdp_packets("handshake") >= u64::from(syns) + 3).then_some(())
    });
}

/// One real connection opens (the client's ACK sent), then `syns` SYNs
/// from other ports arrive before it sends anything (`flooded` says when
/// they are through); the connection must then be split and byte-exact.
fn syn_flood(extra: &[&str], syns: u32, flooded: impl Fn(&StatsReport) -> Option<()>) {
    use etherparse::PacketBuilder;
    use loupe_tests::{
        frames::{DST_MAC, MARK_MAC},
        harness::{CLIENT_V4, PEER_IF},
        raw::RawSocket,
    };

    // 64 entries per worker: a flood that reaches the engine overflows
    // them many times.
    let h = Harness::new(HarnessConfig::default()).expect("harness");
    let args = [&["--tcp-split", "--max-flows", "64"], extra].concat();
    let engine = Engine::start(&h, &args).expect("engine");
    let addr = format!("{SERVER_V4}:443");
    let listener = listen(&h.server, &addr).unwrap();
    let server = spawn_echo_server(listener, 1);
    let mut c = connect(&h.client, &addr).unwrap();
    let tx = h
        .client
        .enter(|| RawSocket::open(PEER_IF))
        .unwrap()
        .unwrap();
    let (client, server_ip): ([u8; 4], [u8; 4]) = (
        CLIENT_V4.parse::<std::net::Ipv4Addr>().unwrap().octets(),
        SERVER_V4.parse::<std::net::Ipv4Addr>().unwrap().octets(),
    );
    for i in 0..syns {
        let mut syn = Vec::new();
        PacketBuilder::ethernet2(MARK_MAC, DST_MAC)
            // From other addresses of the client's network, or below the
            // ephemeral ports: never the real connection's.
            .ipv4(
                [client[0], client[1], 100 + (i >> 14) as u8, client[3]],
                server_ip,
                64,
            )
            .tcp(1024 + (i & 0x3fff) as u16, 443, 7, 1024)
            .syn()
            .write(&mut syn, &[])
            .unwrap();
        tx.send(&syn).unwrap();
    }
    engine
        .wait_stats("the flood to be through", Duration::from_secs(60), |r| {
            flooded(r)
        })
        .unwrap();
    // The connection survived the flood: it is split and byte-exact.
    let d = data(9, 1 << 20);
    assert!(echo_roundtrip(&mut c, &d).unwrap() == d, "echo differs");
    server.join().unwrap().unwrap();
    let s = one_split_ended(&engine);
    assert_eq!((s.split, s.aborted), (1, 0), "{s:?}");
    assert_eq!(s.bytes_c2s, 1 << 20, "{s:?}");
    engine.stop();
}

#[test]
fn hostile_segments_in_a_split_connection_are_counted_and_change_nothing() {
    use loupe_dataplane::wire::segment::{parse_segment, Flags};
    use loupe_tests::{harness::PEER_IF, raw::RawSocket};

    let (h, engine, addr, listener) = start();
    let server = spawn_echo_server(listener, 1);
    // The client's own frames, seen on its interface.
    let sniff = h
        .client
        .enter(|| RawSocket::open(PEER_IF))
        .unwrap()
        .unwrap();
    let mut c = connect(&h.client, &addr).unwrap();
    let port = c.local_addr().unwrap().port();
    c.write_all(b"first bytes").unwrap();
    let mut back = [0u8; 11];
    c.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"first bytes");
    // The client's data segment, and the latest of its segments (its
    // TSval is the engine's TS.Recent: hostile segments carry it, so PAWS
    // lets them through to the checks under test).
    let mut data_seg = None;
    let mut latest: Option<loupe_dataplane::wire::segment::Parsed> = None;
    // The client is quiet (so `latest` has its newest TSval) once it has
    // acknowledged the echo; a loaded machine may delay that ACK well
    // beyond a moment of silence.
    let mut echo_end = None;
    let mut buf = vec![0u8; 4096];
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let Some(n) = sniff.recv(&mut buf, Duration::from_millis(300)).unwrap() else {
            let acked = match (echo_end, &latest) {
                (Some(end), Some(l)) => !l.segment.ack.lt(end),
                _ => false,
            };
            if acked {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the client never acknowledged the echo"
            );
            continue;
        };
        let Ok(p) = parse_segment(&buf[..n]) else {
            continue;
        };
        if p.key.dst_port == port && p.segment.payload == b"first bytes" {
            echo_end = Some(p.segment.seq + 11);
        }
        if p.key.src_port != port {
            continue;
        }
        if p.segment.payload == b"first bytes" {
            data_seg = Some((p.clone(), buf[..n].to_vec()));
        }
        latest = Some(p);
    }
    let (sent, frame) = data_seg.expect("the client's data segment");
    let latest = latest.expect("the client's latest segment");
    let template = sent.template(&frame);
    // The client's newest TSval: any segment it sends while we inject
    // moves it on (and the engine's TS.Recent with it).
    let ts = std::cell::Cell::new(latest.segment.options.timestamps);
    let next = sent.segment.seq + 11;
    // Sends a hostile segment the engine answers with an ACK. On a loaded
    // machine a frame can be lost on its way in (a full AF_XDP ring), and
    // nobody would send it again: sent again until the answer is seen.
    let inject = |seq, flags: Flags, payload: &[u8], answered: bool| {
        let mut buf = vec![0u8; 4096];
        for _ in 0..10 {
            let mut seg = latest.segment.clone();
            seg.seq = seq;
            seg.flags = flags;
            seg.payload = payload.to_vec();
            seg.options.timestamps = ts.get();
            seg.options.sack.clear();
            let mut out = Vec::new();
            template.build(&seg, &mut out);
            sniff.send(&out).unwrap();
            if !answered {
                return out;
            }
            let until = std::time::Instant::now() + Duration::from_secs(2);
            while let Some(left) = until.checked_duration_since(std::time::Instant::now()) {
                let Some(n) = sniff.recv(&mut buf, left).unwrap() else {
                    break;
                };
                let Ok(p) = parse_segment(&buf[..n]) else {
                    continue;
                };
                if p.key.src_port == port && p.segment.options.timestamps.is_some() {
                    ts.set(p.segment.options.timestamps);
                }
                if p.key.dst_port == port && p.segment.flags.ack && !p.segment.flags.rst {
                    return out;
                }
            }
        }
        panic!("the engine never answered an injected segment");
    };
    let ack = Flags {
        ack: true,
        ..Flags::default()
    };
    // Different bytes over bytes already delivered (the evasion).
    inject(sent.segment.seq, ack, b"OTHER bytes", true);
    // Far beyond the window.
    inject(next + 50_000_000, ack, b"junk", true);
    // A RST inside the window but not at RCV.NXT, and a SYN: both draw a
    // challenge ACK and change nothing.
    inject(
        next + 100,
        Flags {
            rst: true,
            ..Flags::default()
        },
        b"",
        true,
    );
    inject(
        next,
        Flags {
            syn: true,
            ..Flags::default()
        },
        b"",
        true,
    );
    // An MSS option of length 3 (built from a plain ACK, which is sent as
    // well and draws no answer).
    let mut bad = inject(next, ack, b"", false);
    let tcp = bad.len() - 32; // 20 bytes of header + 12 of timestamps
    bad[tcp + 20..tcp + 24].copy_from_slice(&[2, 3, 0, 1]);
    let sum_at = tcp + 16;
    bad[sum_at..sum_at + 2].copy_from_slice(&[0, 0]);
    // Recompute the TCP checksum with etherparse's view of the frame.
    let sum = {
        let sliced = etherparse::SlicedPacket::from_ethernet(&bad).unwrap();
        let Some(etherparse::TransportSlice::Tcp(t)) = &sliced.transport else {
            panic!("not TCP")
        };
        let Some(etherparse::NetSlice::Ipv4(ip)) = &sliced.net else {
            panic!("not IPv4")
        };
        t.calc_checksum_ipv4(ip.header().source(), ip.header().destination())
            .unwrap()
    };
    bad[sum_at..sum_at + 2].copy_from_slice(&sum.to_be_bytes());
    sniff.send(&bad).unwrap();

    // The connection goes on, byte-exact, with the first copy of every
    // byte.
    let d = data(11, 1 << 20);
    assert!(echo_roundtrip(&mut c, &d).unwrap() == d, "echo differs");
    server.join().unwrap().unwrap();
    let s = one_split_ended(&engine);
    assert_eq!((s.split, s.aborted, s.resets_received), (1, 0, 0), "{s:?}");
    // "first" and "OTHER" differ in all five bytes.
    assert!(s.overlap_conflicts >= 5, "{s:?}");
    assert!(s.out_of_window >= 1, "{s:?}");
    assert!(s.challenge_acks >= 2, "{s:?}");
    assert_eq!(s.bad_options, 1, "{s:?}");
    engine.stop();
}

/// At MTU 9000 every full segment is a frame longer than a UMEM frame: the
/// XDP program (multi-buffer) steers it whole, the engine receives it as a
/// chain of descriptors, and the split halves send chains of their own.
/// Both ways at once, IPv4 and IPv6, byte-exact; and the XDP fast path
/// carries jumbo frames of a port that is not steered.
#[test]
fn jumbo_frames_cross_split_connections_and_the_fast_path() {
    let h = Harness::new(HarnessConfig::with_mtu(9000)).expect("harness");
    let e = Engine::start(&h, &["--tcp-split"]).expect("engine");
    let len = 8 << 20;
    both_ways(&h, &format!("{SERVER_V4}:443"), len).expect("IPv4 through the split");
    both_ways(&h, &format!("[{SERVER_V6}]:443"), len).expect("IPv6 through the split");
    both_ways(&h, &format!("{SERVER_V4}:8080"), len).expect("the XDP fast path");
    let r = e
        .wait_stats("both splits to end", Duration::from_secs(60), |r| {
            (r.split_total().closed >= 2).then(|| r.clone())
        })
        .unwrap();
    let s = r.split_total();
    assert_eq!((s.split, s.bad_checksum, s.passthrough), (2, 0, 0), "{s:?}");
    let sum = |f: fn(&loupe_dataplane::stats::WorkerCounters) -> u64| {
        r.workers.iter().map(|w| f(&w.counters)).sum::<u64>()
    };
    // 8 MiB of 8948-byte segments (8960 less timestamps) is 938 full
    // frames, each way of each split: 3750 in all, received as chains and
    // sent as chains by the halves. Below 3000, one direction of one
    // connection at least went in frames of one UMEM frame.
    let (rx, tx) = (sum(|c| c.rx_chained), sum(|c| c.tx_chained));
    assert!(rx >= 3000 && tx >= 3000, "chains in/out: {rx}/{tx}");
    assert_eq!(
        (sum(|c| c.unsendable), sum(|c| c.unparsed)),
        (0, 0),
        "frames too long to build / unparsed"
    );
    let (status, clean, _, err) = e.stop();
    assert!(clean && status.success(), "engine exit {status}: {err}");
}
