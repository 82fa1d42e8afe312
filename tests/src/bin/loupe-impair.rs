//! `loupe-impair`: a seeded impairing wire between two interfaces, for the
//! harness (this kernel has no `sch_netem`).
//!
//! Loupe's own XDP classifier, attached to both interfaces, steers the TCP
//! segments of the given ports into AF_XDP sockets; this process impairs
//! them (loss, corruption, duplication, reordering, delay; see
//! `loupe_tests::impair`) and sends them out of the other interface.
//! Everything else (ARP, neighbour discovery, other traffic) crosses in
//! the kernel unharmed. Counters go to `--stats` as JSON every half second
//! and at exit (SIGTERM or SIGINT).
//!
//! With `--vlan ID` the link towards `--b` is a VLAN trunk: the impaired
//! frames from `--a` leave tagged, and those from `--b` must come tagged
//! and leave untagged (untagged ones are dropped and counted).

use std::{
    path::PathBuf,
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use clap::Parser;
use loupe_dataplane::{
    config::default_steer_prefixes,
    ebpf::{AttachMode, Classifier},
    flow::Side,
    sys,
    xsk::{PortConfig, QueuePort},
};
use loupe_tests::impair::{
    vlan_pop, vlan_push, Fate, FirstData, ImpairStats, Impairer, Pipe, Rates,
};
use xsk_rs::FrameDesc;

#[derive(Parser, Debug)]
#[command(
    about = "Seeded loss, corruption, duplication, reordering and delay between two interfaces"
)]
struct Args {
    /// One interface (towards one peer).
    #[arg(long)]
    a: String,
    /// The other interface.
    #[arg(long)]
    b: String,
    /// TCP ports whose segments are impaired (either direction).
    #[arg(long, value_delimiter = ',', default_value = "443")]
    ports: Vec<u16>,
    /// Probability that a frame is lost.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Probability that a frame is held back behind later frames.
    #[arg(long, default_value_t = 0.0)]
    reorder: f64,
    /// Probability that a frame is sent twice.
    #[arg(long, default_value_t = 0.0)]
    duplicate: f64,
    /// Probability that one bit past the IP header is flipped.
    #[arg(long, default_value_t = 0.0)]
    corrupt: f64,
    /// Delay of every frame, in milliseconds.
    #[arg(long, default_value_t = 0.0)]
    delay_ms: f64,
    /// A reordered frame goes out after this many later frames (or after
    /// 2 ms).
    #[arg(long, default_value_t = 3)]
    reorder_gap: u32,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Tag the impaired frames from --a with this VLAN (802.1Q) towards
    /// --b, and untag those from --b (dropping the ones without the tag).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..4095))]
    vlan: Option<u16>,
    /// Also drop the first TCP segment with data of every connection,
    /// from --a towards --b (as a connect storm's overloaded queue would).
    #[arg(long)]
    drop_first_data: bool,
    /// Where to write the counters (JSON).
    #[arg(long)]
    stats: Option<PathBuf>,
}

/// One queue: its port, and per direction (a→b, b→a) an impairer and a
/// pipe.
struct Lane {
    port: QueuePort,
    impairers: [Impairer; 2],
    pipes: [Pipe<FrameDesc>; 2],
    vlan: Option<u16>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loupe-impair: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let rates = Rates {
        loss: args.loss,
        reorder: args.reorder,
        duplicate: args.duplicate,
        corrupt: args.corrupt,
        delay: Duration::from_secs_f64(args.delay_ms.max(0.0) / 1000.0),
        reorder_gap: args.reorder_gap,
        ..Rates::default()
    };
    rates.validate().map_err(anyhow::Error::msg)?;
    sys::check_privileges()?;
    let _ = sys::raise_memlock();
    let (ia, ib) = (sys::ifindex(&args.a)?, sys::ifindex(&args.b)?);
    let queues = sys::rx_queue_count(&args.a)?.min(sys::rx_queue_count(&args.b)?);
    let mut classifier = Classifier::load_with(false)?;
    classifier.set_interfaces(ia, ib)?;
    classifier.set_steering(&args.ports, &default_steer_prefixes(), &[])?;
    let mut lanes = Vec::new();
    for q in 0..queues {
        // Impairments act on whole frames of one UMEM frame each: a longer
        // one is dropped by the kernel (and shows in its rx_dropped).
        let single = PortConfig {
            multi_buffer: false,
            ..PortConfig::default()
        };
        let port = QueuePort::new(&args.a, &args.b, q, single)?;
        classifier.register_socket(Side::Inside, q, port.fd(Side::Inside))?;
        classifier.register_socket(Side::Outside, q, port.fd(Side::Outside))?;
        // Independent streams per queue and direction, all from the seed.
        let seed = |dir: u64| {
            args.seed
                .wrapping_mul(0x100)
                .wrapping_add(u64::from(q) * 2 + dir)
        };
        lanes.push(Lane {
            port,
            impairers: [Impairer::new(rates, seed(0)), Impairer::new(rates, seed(1))],
            pipes: [Pipe::new(&rates), Pipe::new(&rates)],
            vlan: args.vlan,
        });
    }
    classifier.attach(&args.a, AttachMode::Native)?;
    classifier.attach(&args.b, AttachMode::Native)?;

    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone())?;
    }
    let write_stats = |lanes: &[Lane]| -> anyhow::Result<()> {
        let Some(path) = &args.stats else {
            return Ok(());
        };
        let total = |dir: usize| {
            let mut t = ImpairStats::default();
            for l in lanes {
                t.add(&l.impairers[dir].stats);
            }
            t.to_json()
        };
        let doc = serde_json::json!({ "a_to_b": total(0), "b_to_a": total(1) });
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, doc.to_string())?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    };
    write_stats(&lanes)?;
    eprintln!(
        "loupe-impair: {} <-> {} ({queues} queues), ports {:?}: {rates:?}, seed {}, vlan {:?}",
        args.a, args.b, args.ports, args.seed, args.vlan
    );

    let mut first = args.drop_first_data.then(FirstData::default);
    let mut descs = vec![FrameDesc::default(); 64];
    let mut last_stats = Instant::now();
    let mut fds: Vec<libc::pollfd> = lanes
        .iter()
        .flat_map(|l| [Side::Inside, Side::Outside].map(|s| l.port.fd(s)))
        .map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    while !stop.load(Ordering::Relaxed) {
        let mut busy = false;
        let now = Instant::now();
        for lane in &mut lanes {
            busy |= lane.step(&mut descs, &mut first, now);
        }
        if last_stats.elapsed() >= Duration::from_millis(500) {
            write_stats(&lanes)?;
            last_stats = Instant::now();
        }
        if !busy {
            let next_due = lanes
                .iter()
                .flat_map(|l| l.pipes.iter().filter_map(|p| p.next_due()))
                .min();
            let wait = next_due.map_or(Duration::from_millis(50), |t| {
                t.saturating_duration_since(Instant::now())
                    .clamp(Duration::from_millis(1), Duration::from_millis(50))
            });
            // A frames still in TX (copy mode needs sendto kicks): come
            // back soon instead of sleeping long.
            let wait = if lanes.iter().any(|l| l.port.pending_tx() > 0) {
                Duration::from_millis(1)
            } else {
                wait
            };
            // SAFETY: `fds` is a valid array of pollfd for its length.
            unsafe {
                libc::poll(
                    fds.as_mut_ptr(),
                    fds.len() as libc::nfds_t,
                    wait.as_millis() as i32,
                )
            };
        }
    }
    write_stats(&lanes)?;
    Ok(())
}

impl Lane {
    /// One round: take what arrived, impair it, send what is due. Returns
    /// whether anything moved.
    fn step(
        &mut self,
        descs: &mut [FrameDesc],
        first: &mut Option<FirstData>,
        now: Instant,
    ) -> bool {
        let port = &mut self.port;
        port.reclaim();
        port.refill();
        let mut moved = false;
        for (dir, (from, to)) in [(Side::Inside, Side::Outside), (Side::Outside, Side::Inside)]
            .into_iter()
            .enumerate()
        {
            let n = port.recv(from, descs);
            moved |= n > 0;
            for &d in &descs[..n] {
                let d = match self.vlan {
                    Some(id) => {
                        let frame = port.data(&d);
                        let moved = if dir == 0 {
                            Some(vlan_push(frame, id))
                        } else {
                            vlan_pop(frame, id)
                        };
                        let Some(bytes) = moved else {
                            self.impairers[dir].stats.untagged += 1;
                            port.release(d);
                            continue;
                        };
                        port.release(d);
                        match port.build(&bytes) {
                            Some(c) => c,
                            None => {
                                // Never out with the wrong tagging: lost.
                                self.impairers[dir].stats.no_buffer += 1;
                                continue;
                            }
                        }
                    }
                    None => d,
                };
                let frame = port.data(&d);
                let protect = headers_len(frame);
                let imp = &mut self.impairers[dir];
                if dir == 0 && first.as_mut().is_some_and(|f| f.is_first(frame)) {
                    imp.dropped_by_rule();
                    port.release(d);
                    continue;
                }
                match imp.fate(frame.len(), protect) {
                    Fate::Drop => port.release(d),
                    Fate::Deliver {
                        corrupt_bit,
                        duplicate,
                        reorder,
                    } => {
                        let main = match corrupt_bit {
                            Some(bit) => {
                                let mut bytes = frame.to_vec();
                                bytes[protect + bit / 8] ^= 1 << (bit % 8);
                                match port.build(&bytes) {
                                    Some(c) => {
                                        port.release(d);
                                        c
                                    }
                                    None => {
                                        imp.stats.no_buffer += 1;
                                        d
                                    }
                                }
                            }
                            None => d,
                        };
                        if duplicate {
                            let bytes = port.data(&main).to_vec();
                            match port.build(&bytes) {
                                Some(c) => self.pipes[dir].push(c, false, now),
                                None => imp.stats.no_buffer += 1,
                            }
                        }
                        self.pipes[dir].push(main, reorder, now);
                    }
                }
            }
            while let Some(d) = self.pipes[dir].pop(now) {
                port.send(to, d);
                moved = true;
            }
        }
        let sent = port.flush();
        moved || sent.iter().any(|s| s.0 > 0)
    }
}

/// Bytes of the Ethernet (with VLAN tags) and IP headers: corruption stays
/// past them, where the TCP checksum covers it.
fn headers_len(frame: &[u8]) -> usize {
    let mut off = 12;
    loop {
        let Some(t) = frame.get(off..off + 2) else {
            return frame.len();
        };
        match u16::from_be_bytes([t[0], t[1]]) {
            0x8100 | 0x88a8 => off += 4,
            0x0800 => {
                let ihl = frame.get(off + 2).map_or(5, |b| usize::from(b & 0x0f));
                return (off + 2 + ihl * 4).min(frame.len());
            }
            0x86dd => return (off + 2 + 40).min(frame.len()),
            _ => return frame.len(),
        }
    }
}
