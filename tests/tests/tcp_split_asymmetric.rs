//! tcp-split between Linux peers whose handshakes differ: window shifts 14
//! and 0, 9 and 2, window scaling, timestamps or SACK on one side only,
//! MSS 536 or 1000 beside 1460 (per-namespace sysctls, a
//! route's `advmss`, SO_RCVBUF on the listener). A megabyte goes each way
//! at once, byte-exact. Each endpoint's own capture (a packet socket on
//! its interface, GRO merging off so that frames are seen as sent) must
//! show the engine speaking to it as that endpoint's handshake said: no
//! segment larger than its MSS less the options (and full ones in bulk),
//! windows in the units of the endpoint the engine stands in for and
//! within the engine's 128 KiB buffer (and opening to it), timestamps
//! exactly when negotiated and never behind the clock they continue, no
//! SACK block where SACK was not negotiated.

use std::time::Duration;

use loupe_dataplane::wire::{
    options::TcpOptions,
    segment::{parse_segment, Segment},
    seq::SeqNum,
};
use loupe_tests::{
    engine::Engine,
    harness::{CLIENT_V4, PEER_IF, SERVER_V4},
    netns::Netns,
    raw::Capture,
    tcp::{both_ways_on, listen, set_recv_buffer},
    Harness, HarnessConfig,
};

/// The engine's buffers per half and direction, kept from growing
/// (`--split-buffer-max-kib` at the initial size) where windows are
/// checked exactly.
const ENGINE_BUFFER: u32 = 128 << 10;
const FIXED: &[&str] = &["--tcp-split", "--split-buffer-max-kib", "128"];
/// What they grow to at most by default.
const ENGINE_BUFFER_MAX: u32 = 4 << 20;
const PORT: u16 = 443;

/// How one endpoint is set up.
#[derive(Default)]
struct Setup {
    /// `net.ipv4.*` sysctls in its namespace.
    sysctls: &'static [(&'static str, &'static str)],
    /// The MSS it announces (its route to the other's `advmss`).
    advmss: Option<u16>,
    /// SO_RCVBUF on the listener (the server only): a small buffer, a
    /// small window shift.
    rcvbuf: Option<usize>,
}

fn configure(ns: &Netns, s: &Setup, peer: &str) {
    // Frames as sent: GRO would merge the engine's segments before the
    // packet socket sees them.
    ns.ip(&["link", "set", "dev", PEER_IF, "gro_max_size", "0"])
        .unwrap();
    for (key, value) in s.sysctls {
        ns.exec("sysctl", &["-qw", &format!("net.ipv4.{key}={value}")])
            .unwrap();
    }
    if let Some(mss) = s.advmss {
        let host = format!("{peer}/32");
        ns.ip(&[
            "route",
            "add",
            &host,
            "dev",
            PEER_IF,
            "advmss",
            &mss.to_string(),
        ])
        .unwrap();
    }
}

/// One endpoint's view of the connection, from its capture.
struct View {
    /// Its SYN (or SYN-ACK) and the other's.
    own: TcpOptions,
    other: TcpOptions,
    /// Segments that came to it from the engine.
    from_engine: Vec<Segment>,
}

/// Splits a capture into the endpoint's view. `client` says which end it
/// was taken on.
fn view(frames: &[Vec<u8>], client: bool) -> View {
    let mut own = None;
    let mut other = None;
    let mut from_engine = Vec::new();
    let mut handshake_ack_seen = false;
    for f in frames {
        let Ok(p) = parse_segment(f) else { continue };
        let server_sent = p.key.src_port == PORT;
        if !server_sent && p.key.dst_port != PORT {
            continue;
        }
        let mine = server_sent != client;
        let s = p.segment;
        if s.flags.syn {
            let o = s.options.clone();
            if mine {
                own = Some(o);
            } else {
                other = Some((o, s.seq));
            }
            continue;
        }
        if mine {
            continue;
        }
        // The client's ACK of the SYN-ACK is its own, forwarded as it was;
        // everything after it toward the server is the engine's.
        if !client && !handshake_ack_seen && s.payload.is_empty() {
            if let Some((_, isn)) = &other {
                if s.seq == *isn + 1 {
                    handshake_ack_seen = true;
                    continue;
                }
            }
        }
        from_engine.push(s);
    }
    let (other, _) = other.expect("the other side's SYN in the capture");
    View {
        own: own.expect("our own SYN in the capture"),
        other,
        from_engine,
    }
}

/// The shift an endpoint applies to its own windows, when both SYNs
/// carried the option (RFC 7323 §2.2; above 14 used as 14).
fn shift(of: &TcpOptions, with: &TcpOptions) -> u8 {
    match (of.window_scale, with.window_scale) {
        (Some(s), Some(_)) => s.min(14),
        _ => 0,
    }
}

/// Checks what the engine sent to one endpoint against that endpoint's
/// handshake.
fn check(name: &str, v: &View) {
    let widest = check_within(name, v, ENGINE_BUFFER);
    let units = shift(&v.other, &v.own);
    let open = (ENGINE_BUFFER >> units).min(65535) << units;
    assert_eq!(widest, open, "{name}: the window opens to the buffer");
}

/// Checks what the engine sent to one endpoint against that endpoint's
/// handshake, with windows up to `buffer`; returns the widest.
fn check_within(name: &str, v: &View, buffer: u32) -> u32 {
    let ts = v.own.timestamps.is_some() && v.other.timestamps.is_some();
    let sack = v.own.sack_permitted && v.other.sack_permitted;
    let mss = usize::from(v.own.mss.unwrap_or(536));
    let ts_len = if ts { 12 } else { 0 };
    // The engine stands in for the other endpoint: its windows are in the
    // units that endpoint announced.
    let units = shift(&v.other, &v.own);
    let clock = v.other.timestamps.map(|t| t.val);
    let (mut most, mut widest) = (0, 0);
    assert!(!v.from_engine.is_empty(), "{name}: nothing from the engine");
    for s in v.from_engine.iter().filter(|s| !s.flags.rst) {
        let o = &s.options;
        assert_eq!(o.timestamps.is_some(), ts, "{name}: timestamps on {s:?}");
        if let (Some(t), Some(start)) = (o.timestamps, clock) {
            assert!(
                !SeqNum(t.val).lt(SeqNum(start)),
                "{name}: TSval {} behind the clock it continues ({start})",
                t.val
            );
        }
        assert!(sack || o.sack.is_empty(), "{name}: SACK blocks on {s:?}");
        assert!(
            s.payload.len() <= mss - ts_len,
            "{name}: {} bytes to an endpoint with MSS {mss}",
            s.payload.len()
        );
        let window = u32::from(s.window) << units;
        assert!(
            window <= buffer,
            "{name}: window {} << {units} over the engine's buffer",
            s.window
        );
        most = most.max(s.payload.len());
        widest = widest.max(window);
    }
    eprintln!(
        "{name}: {} segments from the engine, largest {most} bytes (MSS {mss}), widest window \
         {widest} (shift {units}), timestamps {ts}, SACK {sack}",
        v.from_engine.len()
    );
    assert_eq!(most, mss - ts_len, "{name}: full-sized segments in bulk");
    widest
}

/// Runs a megabyte each way between `client` and `server` through
/// `--tcp-split`; returns the client's and the server's views.
fn run(client: Setup, server: Setup) -> (View, View) {
    run_with(client, server, FIXED)
}

fn run_with(client: Setup, server: Setup, engine_args: &[&str]) -> (View, View) {
    let h = Harness::new(HarnessConfig::default()).expect("harness");
    configure(&h.client, &client, SERVER_V4);
    configure(&h.server, &server, CLIENT_V4);
    let engine = Engine::start(&h, engine_args).expect("engine");
    let addr = format!("{SERVER_V4}:{PORT}");
    let listener = listen(&h.server, &addr).unwrap();
    if let Some(bytes) = server.rcvbuf {
        set_recv_buffer(&listener, bytes);
    }
    let captures = [
        Capture::start(&h.client, PEER_IF).unwrap(),
        Capture::start(&h.server, PEER_IF).unwrap(),
    ];
    both_ways_on(&h, listener, &addr, 1 << 20).expect("a megabyte each way, byte-exact");
    let s = engine
        .wait_stats("the split to end", Duration::from_secs(60), |r| {
            let s = r.split_total();
            (s.closed >= 1).then_some(s)
        })
        .unwrap();
    assert_eq!((s.split, s.aborted, s.passthrough), (1, 0, 0), "{s:?}");
    let [c, sv] = captures.map(|c| c.stop().expect("capture"));
    engine.stop();
    (view(&c, true), view(&sv, false))
}

#[test]
fn shifts_14_and_0_with_mss_536_beside_1460() {
    let (c, s) = run(
        Setup {
            // 1 GiB: the largest shift.
            sysctls: &[("tcp_rmem", "4096 131072 1073741824")],
            advmss: Some(536),
            ..Setup::default()
        },
        Setup {
            rcvbuf: Some(16 << 10),
            ..Setup::default()
        },
    );
    assert_eq!(
        (c.own.window_scale, s.own.window_scale),
        (Some(14), Some(0))
    );
    assert_eq!((c.own.mss, s.own.mss), (Some(536), Some(1460)));
    check("to the client", &c);
    check("to the server", &s);
}

#[test]
fn shifts_9_and_2_with_mss_1000_and_sack_on_one_side() {
    let (c, s) = run(
        Setup {
            // 16 MiB: shift 9.
            sysctls: &[("tcp_rmem", "4096 131072 16777216")],
            ..Setup::default()
        },
        Setup {
            sysctls: &[("tcp_sack", "0")],
            rcvbuf: Some(128 << 10),
            advmss: Some(1000),
        },
    );
    assert_eq!((c.own.window_scale, s.own.window_scale), (Some(9), Some(2)));
    assert_eq!((c.own.mss, s.own.mss), (Some(1460), Some(1000)));
    assert!(c.own.sack_permitted && !s.own.sack_permitted);
    check("to the client", &c);
    check("to the server", &s);
}

#[test]
fn window_scaling_and_timestamps_on_the_clients_side_only() {
    // (An option the client leaves out is left out of the SYN-ACK too: the
    // one-sided case on the wire is the server's.)
    let (c, s) = run(
        Setup::default(),
        Setup {
            sysctls: &[("tcp_window_scaling", "0"), ("tcp_timestamps", "0")],
            ..Setup::default()
        },
    );
    assert!(c.own.window_scale.is_some() && s.own.window_scale.is_none());
    assert!(c.own.timestamps.is_some() && s.own.timestamps.is_none());
    check("to the client", &c);
    check("to the server", &s);
}

/// By default the halves' receive buffers grow with the transfer (Linux's
/// dynamic right-sizing): a megabyte each way opens the windows the
/// engine advertises past the initial 128 KiB, never past the maximum.
#[test]
fn windows_grow_past_the_initial_buffer_on_a_bulk_transfer() {
    let (c, s) = run_with(Setup::default(), Setup::default(), &["--tcp-split"]);
    let to_client = check_within("to the client", &c, ENGINE_BUFFER_MAX);
    let to_server = check_within("to the server", &s, ENGINE_BUFFER_MAX);
    assert!(
        to_client > ENGINE_BUFFER && to_server > ENGINE_BUFFER,
        "widest windows {to_client} and {to_server}: never grown"
    );
}
