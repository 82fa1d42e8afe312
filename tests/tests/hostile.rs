//! Hostile frames: truncated and inconsistent IPv4/IPv6/TCP headers, bad
//! IHL, IPv6 extension headers, fragments, VLAN tags. The engine neither
//! crashes nor steers what it cannot parse; every frame is counted where it
//! went and still reaches the other side. And hostile clients with real
//! Linux peers: data on a SYN, urgent data.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddrV4, TcpStream},
    os::fd::{AsRawFd, FromRawFd},
    time::Duration,
};

use loupe_tests::{
    engine::Engine,
    frames::{hostile_cases, steered_but_unparseable, Expect},
    harness::{CLIENT_V4, PEER_IF, SERVER_V4},
    https::{curl_sha256, Nginx},
    raw::RawSocket,
    tcp::{connect, listen, set_int_option, set_option, spawn_echo_server},
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
                && r.xdp_packets("drop_unclassifiable") >= count(Expect::Unclassifiable)
                && r.xdp_packets("steer") >= count(Expect::Steer)
                && r.worker_sum(|c| c.tx_outside.packets) >= count(Expect::Steer))
            .then(|| r.clone())
        })
        .unwrap();
    // Exact: nothing else in this harness is malformed, fragmented or TCP.
    assert_eq!(r.xdp_packets("malformed"), count(Expect::Malformed));
    assert_eq!(r.xdp_packets("fragment"), count(Expect::Fragment));
    assert_eq!(
        r.xdp_packets("drop_unclassifiable"),
        count(Expect::Unclassifiable)
    );
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

/// A real ClientHello from rustls naming `sni`.
fn client_hello(sni: &str) -> Vec<u8> {
    use std::sync::Arc;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = sni.to_owned().try_into().expect("dns name");
    let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name).expect("client");
    let mut out = Vec::new();
    conn.write_tls(&mut out).expect("hello");
    out
}

/// A TCP socket of the client namespace that sends `data` on its SYN
/// (TCP Fast Open, `MSG_FASTOPEN`), connected to `to`.
fn fast_open(h: &Harness, to: SocketAddrV4, data: &[u8]) -> TcpStream {
    h.client
        .enter(|| {
            // SAFETY: a fresh socket whose descriptor is owned by the
            // TcpStream built from it, or closed on failure; `addr` and
            // `data` outlive the calls that read them.
            unsafe {
                let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
                let s = TcpStream::from_raw_fd(fd);
                let addr = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: to.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from(*to.ip()).to_be(),
                    },
                    sin_zero: [0; 8],
                };
                let n = libc::sendto(
                    fd,
                    data.as_ptr().cast(),
                    data.len(),
                    libc::MSG_FASTOPEN,
                    (&addr as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                );
                assert_eq!(
                    n,
                    data.len() as isize,
                    "sendto: {}",
                    std::io::Error::last_os_error()
                );
                s
            }
        })
        .expect("client namespace")
}

/// Clients that would have the server read other bytes than the engine
/// decided on, with real Linux peers: data on a SYN that the server takes
/// (TCP Fast Open without a cookie on both ends), and urgent data (a
/// server reading without SO_OOBINLINE takes the last urgent byte out of
/// the stream). Both once passed the connection undecided, uninspected.
/// Now the SYN goes on without its data (the client sends it again after
/// the handshake, where it is held and decided on) and URG is cleared
/// (the server reads every byte in line, as the engine did).
#[test]
fn fast_open_and_urgent_data_are_decided_on_what_the_server_reads() {
    let h = Harness::new(HarnessConfig::default()).expect("harness");
    // 0x1 | 0x4: a client that sends data on its SYN without a cookie;
    // 0x2 | 0x200: a server that takes it without one.
    for (ns, v) in [(&h.client, "5"), (&h.server, "514")] {
        let out = ns
            .exec("sysctl", &["-qw", &format!("net.ipv4.tcp_fastopen={v}")])
            .expect("sysctl");
        assert!(out.status.success(), "{out:?}");
    }
    let engine = Engine::start(
        &h,
        &["--tcp-split", "--split-exempt-sni", "*.bank.loupe.test"],
    )
    .expect("engine");
    let listener = listen(&h.server, &format!("{SERVER_V4}:443")).expect("listen");
    set_int_option(
        &listener,
        libc::IPPROTO_TCP,
        libc::TCP_FASTOPEN,
        16,
        "TCP_FASTOPEN",
    );
    // The server reads each connection to its end.
    let server = std::thread::spawn(move || {
        (0..2)
            .map(|_| {
                let (mut s, _) = listener.accept().expect("accept");
                s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                let mut got = Vec::new();
                s.read_to_end(&mut got).expect("read");
                got
            })
            .collect::<Vec<_>>()
    });
    let to = SocketAddrV4::new(SERVER_V4.parse().unwrap(), 443);
    let finish = |mut s: TcpStream| {
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s.shutdown(Shutdown::Write).expect("shutdown");
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).expect("the server's end");
    };

    // Data on the SYN, naming a server that is split.
    let evil = client_hello("www.evil.loupe.test");
    finish(fast_open(&h, to, &evil));
    let r = engine
        .wait_stats(
            "the first connection decided",
            Duration::from_secs(30),
            |r| {
                let s = r.split_total();
                (s.split + s.passthrough + s.policy_pass >= 1).then_some(s)
            },
        )
        .unwrap();
    assert_eq!(
        (r.split, r.passthrough, r.policy_pass),
        (1, 0, 0),
        "decided on its name: {r:?}"
    );
    assert!(r.syn_stripped >= 1, "{r:?}");

    // Urgent data, naming an exempt server: passed with URG cleared.
    let bank = client_hello("www.bank.loupe.test");
    let s = connect(&h.client, &to.to_string()).expect("connect");
    // SAFETY: a connected socket the test owns; `bank` outlives the call.
    let n = unsafe {
        libc::send(
            s.as_raw_fd(),
            bank.as_ptr().cast(),
            bank.len(),
            libc::MSG_OOB,
        )
    };
    assert_eq!(
        n,
        bank.len() as isize,
        "send: {}",
        std::io::Error::last_os_error()
    );
    finish(s);
    let got = server.join().expect("server");
    assert_eq!(got[0], evil, "the split connection's bytes");
    assert_eq!(got[1].len(), bank.len(), "every byte read in line");
    assert_eq!(got[1], bank);
    let r = engine
        .wait_stats(
            "the second connection passed",
            Duration::from_secs(30),
            |r| {
                let s = r.split_total();
                (s.policy_pass >= 1).then_some(s)
            },
        )
        .unwrap();
    assert_eq!((r.split, r.passthrough, r.policy_pass), (1, 0, 1), "{r:?}");
    assert!(r.urgent_cleared >= 1, "{r:?}");
    let (status, clean, _, err) = engine.stop();
    assert!(clean && status.success(), "engine exit {status}: {err}");
}

/// A client that gives up during the hold (a RST after part of its
/// ClientHello, as `close` with a zero linger sends): the server, which
/// never saw those bytes, must lose its socket too. The RST as sent lies
/// past what the server has read, so the server would only challenge it;
/// the engine moves it to the first held byte, where the server takes it.
#[test]
fn a_client_reset_during_the_hold_resets_the_server() {
    let h = Harness::new(HarnessConfig::default()).expect("harness");
    let engine = Engine::start(&h, &["--tcp-split"]).expect("engine");
    let listener = listen(&h.server, &format!("{SERVER_V4}:443")).expect("listen");
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = [0u8; 64];
        s.read(&mut buf)
    });
    let hello = client_hello("www.example.loupe.test");
    let mut c = connect(&h.client, &format!("{SERVER_V4}:443")).expect("connect");
    c.write_all(&hello[..100]).expect("part of the hello");
    engine
        .wait_stats("the bytes held", Duration::from_secs(30), |r| {
            (r.split_total().held >= 1).then_some(())
        })
        .unwrap();
    // Zero linger: close sends a RST at the client's next sequence number.
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    set_option(&c, libc::SOL_SOCKET, libc::SO_LINGER, &linger, "SO_LINGER");
    drop(c);
    let got = server.join().expect("server");
    assert_eq!(
        got.as_ref().map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset),
        "the server's read: {got:?}"
    );
    let (status, clean, _, err) = engine.stop();
    assert!(clean && status.success(), "engine exit {status}: {err}");
}

/// A connection to a server that reads all it gets (an error if reset
/// before any byte), whose client stays quiet until `engine` forgets it.
fn forgotten_connection(
    h: &Harness,
    engine: &Engine,
) -> (TcpStream, std::thread::JoinHandle<std::io::Result<Vec<u8>>>) {
    let listener = listen(&h.server, &format!("{SERVER_V4}:443")).expect("listen");
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) => return Ok(got),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if got.is_empty() => return Err(e),
                Err(_) => return Ok(got),
            }
        }
    });
    let c = connect(&h.client, &format!("{SERVER_V4}:443")).expect("connect");
    engine
        .wait_stats(
            "the quiet connection forgotten",
            Duration::from_secs(60),
            |r| (r.split_total().expired >= 1).then_some(()),
        )
        .unwrap();
    (c, server)
}

/// The client's next read and the server's are reset, the server having
/// read nothing.
fn both_ends_reset(c: &mut TcpStream, server: std::thread::JoinHandle<std::io::Result<Vec<u8>>>) {
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut buf = [0u8; 64];
    let read = c.read(&mut buf);
    assert_eq!(
        read.as_ref().map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset),
        "the client's read: {read:?}"
    );
    let got = server.join().expect("server");
    assert_eq!(
        got.as_ref().map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset),
        "the server reads nothing, and is reset: {got:?}"
    );
}

/// A connection whose client stays quiet after the handshake until the
/// engine forgets it (idle past `--flow-idle-secs`) must not then get its
/// ClientHello to the server uninspected (an outside probe's finding:
/// it did, with any name). By default both ends are reset when it speaks
/// and the server reads nothing; `--mid-flow pass` is the old way, the
/// hello going through, which shows what the default closes.
#[test]
fn a_connection_forgotten_before_its_hello_cannot_pass_uninspected() {
    let h = Harness::new(HarnessConfig::default()).expect("harness");
    for mid_flow in ["drop", "pass"] {
        let engine = Engine::start(
            &h,
            &[
                "--tcp-split",
                "--flow-idle-secs",
                "1",
                "--mid-flow",
                mid_flow,
            ],
        )
        .expect("engine");
        let (mut c, server) = forgotten_connection(&h, &engine);
        let hello = client_hello("evil.example.loupe.test");
        c.write_all(&hello).expect("the hello");
        if mid_flow == "pass" {
            c.shutdown(Shutdown::Write).unwrap();
            let got = server.join().expect("server").expect("the server's read");
            assert_eq!(got, hello, "passed: the hello goes through uninspected");
            engine.stop();
            continue;
        }
        both_ends_reset(&mut c, server);
        engine.wait_uninspectable_reset().unwrap();
        let (status, clean, _, err) = engine.stop();
        assert!(clean && status.success(), "engine exit {status}: {err}");
    }
}

/// The first segment the engine sees of a connection it forgot is a
/// keepalive probe: one below the next byte the server expects, so a RST
/// at its number would miss the server (Linux drops it unanswered) and
/// leave its socket open for good while the client was reset (an outside
/// probe). The ACK that goes with the RST, one further below, draws the
/// server's exact numbers, and the answer to that resets it.
#[test]
fn a_keepalive_from_a_forgotten_connection_resets_both_ends() {
    let h = Harness::new(HarnessConfig::default()).expect("harness");
    let engine = Engine::start(&h, &["--tcp-split", "--flow-idle-secs", "1"]).expect("engine");
    let (mut c, server) = forgotten_connection(&h, &engine);
    // Forgotten: now the client's keepalives start.
    set_int_option(&c, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1, "SO_KEEPALIVE");
    set_int_option(
        &c,
        libc::IPPROTO_TCP,
        libc::TCP_KEEPINTVL,
        1,
        "TCP_KEEPINTVL",
    );
    set_int_option(&c, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 1, "TCP_KEEPIDLE");
    both_ends_reset(&mut c, server);
    let (status, clean, _, err) = engine.stop();
    assert!(clean && status.success(), "engine exit {status}: {err}");
}

/// A SYN forged on the ports of a connection passed to the fast path (by
/// anyone who can spoof the client's address) takes the flow back to a
/// worker to be decided afresh; the server, whose connection is
/// established, answers it with a challenge ACK. The connection must go
/// on: it used to hang, every later segment dropped as not fitting the
/// new handshake (an outside probe).
#[test]
fn a_forged_syn_on_a_passed_connection_does_not_stall_it() {
    let h = Harness::new(HarnessConfig::default()).expect("harness");
    let engine = Engine::start(
        &h,
        &[
            "--tcp-split",
            "--split-exempt-sni",
            "bank.example.loupe.test",
        ],
    )
    .expect("engine");
    let listener = listen(&h.server, &format!("{SERVER_V4}:443")).expect("listen");
    let server = spawn_echo_server(listener, 1);
    let mut c = connect(&h.client, &format!("{SERVER_V4}:443")).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let echoed = |c: &mut TcpStream, data: &[u8]| {
        c.write_all(data).expect("write");
        let mut back = vec![0u8; data.len()];
        c.read_exact(&mut back).map(|_| back == data)
    };
    let hello = client_hello("bank.example.loupe.test");
    assert!(echoed(&mut c, &hello).unwrap(), "the exempt hello echoed");
    engine
        .wait_stats("the connection passed", Duration::from_secs(30), |r| {
            (r.split_total().released >= 1).then_some(())
        })
        .unwrap();
    let mac = |ns: &loupe_tests::netns::Netns| -> [u8; 6] {
        let out = ns
            .command("cat")
            .arg(format!("/sys/class/net/{PEER_IF}/address"))
            .output()
            .expect("cat");
        let text = String::from_utf8(out.stdout).unwrap();
        let bytes: Vec<u8> = text
            .trim()
            .split(':')
            .map(|b| u8::from_str_radix(b, 16).expect("a MAC"))
            .collect();
        bytes.try_into().expect("six bytes")
    };
    let ip = |a: &str| a.parse::<std::net::Ipv4Addr>().unwrap().octets();
    let port = c.local_addr().unwrap().port();
    let mut syn = Vec::new();
    etherparse::PacketBuilder::ethernet2(mac(&h.client), mac(&h.server))
        .ipv4(ip(CLIENT_V4), ip(SERVER_V4), 64)
        .tcp(port, 443, 0x1234_5678, 64240)
        .syn()
        .write(&mut syn, &[])
        .unwrap();
    let tx = h
        .client
        .enter(|| RawSocket::open(PEER_IF))
        .unwrap()
        .expect("raw socket");
    tx.send(&syn).expect("the forged SYN");
    assert!(
        echoed(&mut c, b"after the forged SYN").expect("the connection goes on"),
        "echo differs"
    );
    engine
        .wait_stats(
            "the server's challenge ACK seen",
            Duration::from_secs(30),
            |r| (r.split_total().syns_on_live >= 1).then_some(()),
        )
        .unwrap();
    drop(c);
    server.join().unwrap().unwrap();
    let (status, clean, _, err) = engine.stop();
    assert!(clean && status.success(), "engine exit {status}: {err}");
}

/// A frame XDP steers (TCP to a steered port, as it reads the headers)
/// that the worker's parser refuses goes nowhere when the engine holds or
/// splits connections: the engine cannot tell what the server would take
/// from it. It used to be forwarded unchanged.
#[test]
fn a_steered_frame_the_worker_cannot_read_is_dropped() {
    let h = Harness::new(HarnessConfig::default()).expect("harness");
    let engine = Engine::start(&h, &["--tcp-split"]).expect("engine");
    let tx = h
        .client
        .enter(|| RawSocket::open(PEER_IF))
        .unwrap()
        .unwrap();
    tx.send(&steered_but_unparseable()).expect("inject");
    let r = engine
        .wait_stats("the frame in the counters", Duration::from_secs(30), |r| {
            (r.worker_sum(|c| c.unparsed) >= 1).then(|| r.clone())
        })
        .unwrap();
    assert_eq!(r.xdp_packets("steer"), 1, "steered");
    assert_eq!(r.worker_sum(|c| c.unparsed), 1);
    assert_eq!(
        r.worker_sum(|c| c.tx_outside.packets + c.tx_inside.packets),
        0,
        "nothing forwarded"
    );
    let (status, clean, _, err) = engine.stop();
    assert!(clean && status.success(), "engine exit {status}: {err}");
}
