//! Helpers the benchmark binaries share, and the report of `perf/run all`
//! (its summary and plots).

pub mod report;
pub mod suite;
pub mod wire_delay;

use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use loupe_hsm::{mech::SignMech, token::Token};
use loupe_tests::{
    harness::{INSIDE_IF, OUTSIDE_IF, PEER_IF},
    netns::Netns,
};

/// The median of the samples (the upper one of the middle two for an even
/// count); 0 for none.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

/// The directory every benchmark writes its JSON to: `$LOUPE_PERF_RESULTS`
/// when set (`perf/run all` sets it to its run's own directory), else
/// `perf/results`.
pub const RESULTS_ENV: &str = "LOUPE_PERF_RESULTS";

/// Writes a benchmark's rows as `<results directory>/<name>`, creating the
/// directory; returns the path written.
pub fn write_results(
    name: &str,
    rows: &impl serde::Serialize,
) -> anyhow::Result<std::path::PathBuf> {
    write_results_to(None, name, rows)
}

/// [`write_results`] at `explicit` (a `--json` option) when given, its
/// directory created.
pub fn write_results_to(
    explicit: Option<&std::path::Path>,
    name: &str,
    rows: &impl serde::Serialize,
) -> anyhow::Result<std::path::PathBuf> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => std::env::var_os(RESULTS_ENV)
            .map_or_else(
                || std::path::PathBuf::from("perf/results"),
                std::path::PathBuf::from,
            )
            .join(name),
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&path, serde_json::to_vec_pretty(rows)?)?;
    Ok(path)
}

/// The value at quantile `q` (0..=1) of sorted samples, by nearest rank;
/// 0 for none.
pub fn quantile_sorted(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize]
}

/// The samples' distribution as 101 points (the 0th to 100th percentile),
/// for a CDF plot.
pub fn percentiles(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return Vec::new();
    }
    (0..=100)
        .map(|p| quantile_sorted(&v, p as f64 / 100.0))
        .collect()
}

/// Microsecond histograms up to a minute.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

/// Keeps the calling thread (and every process and thread it starts
/// after) off `cpu`: on every other online CPU.
pub fn avoid_cpu(cpu: usize) -> anyhow::Result<()> {
    let online = loupe_hsm::signer::online_cpus();
    // The engine pins its workers from CPU 0 up: the HSM's is the last.
    anyhow::ensure!(
        cpu + 1 == online && online > 1,
        "CPU {cpu}: give the last CPU ({}), which the engine's workers (pinned from CPU 0 up) \
         leave alone",
        online - 1
    );
    // SAFETY: cpu_set_t is a plain bitmask; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for c in (0..online).filter(|&c| c != cpu) {
        // SAFETY: CPU_SET writes inside `set`; `c` is an online CPU.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: pid 0 is the calling thread; the set pointer and size are valid.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    anyhow::ensure!(
        rc == 0,
        "sched_setaffinity: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// Raw rate: `threads` sessions signing flat out; per-signature times.
pub fn raw(
    token: &Token,
    key: &str,
    mech: SignMech,
    threads: usize,
    secs: f64,
) -> anyhow::Result<(f64, Histogram<u64>)> {
    raw_on(token, key, mech, threads, secs, None)
}

/// [`raw`] with the signing threads pinned to `cpu`.
pub fn raw_on(
    token: &Token,
    key: &str,
    mech: SignMech,
    threads: usize,
    secs: f64,
    cpu: Option<usize>,
) -> anyhow::Result<(f64, Histogram<u64>)> {
    let mut sessions = (0..threads)
        .map(|_| token.session())
        .collect::<Result<Vec<_>, _>>()?;
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let mut hist = histogram();
    let total: u64 = std::thread::scope(|s| {
        let handles: Vec<_> = sessions
            .iter_mut()
            .map(|sess| {
                s.spawn(move || {
                    if let Some(c) = cpu {
                        loupe_hsm::signer::pin_thread(c).expect("pin a raw signing thread");
                    }
                    let mut n = 0u64;
                    let mut h = histogram();
                    let msg = [7u8; 256];
                    loop {
                        let t0 = Instant::now();
                        if t0 >= end {
                            break;
                        }
                        sess.sign(key, mech, &msg).expect("raw sign");
                        let _ = h.record(t0.elapsed().as_micros().max(1) as u64);
                        n += 1;
                    }
                    (n, h)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                let (n, th) = h.join().expect("raw thread");
                let _ = hist.add(&th);
                n
            })
            .sum()
    });
    Ok((total as f64 / start.elapsed().as_secs_f64(), hist))
}

/// Seconds CPU `cpu` has spent busy (not idle, not waiting on I/O) since
/// boot, from /proc/stat: in the fair shape the path's CPU runs the path
/// alone, so its busy time over a measurement is what the path cost,
/// softirq work included (a per-process figure would miss that).
///
/// Not all of it: without `IRQ_TIME_ACCOUNTING` (as on these machines) a
/// softirq run on an idle CPU's interrupt is counted as idle (cpuidle's
/// state residency counts it idle too). Paths whose work runs in threads
/// or in their time slices (the engine's worker and NAPI threads, the
/// relay's socat) are counted whole; a bridge, whose every frame is
/// forwarded in softirq from idle, shows a small part of its cost.
pub fn cpu_busy_seconds(cpu: usize) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let name = format!("cpu{cpu}");
    let line = stat
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name.as_str()))
        .with_context(|| format!("/proc/stat has no {name}"))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("/proc/stat: {line}"))?;
    anyhow::ensure!(ticks.len() >= 7, "/proc/stat: {line}");
    // user nice system idle iowait irq softirq (then steal, the
    // hypervisor's, not the path's; guest time is counted in user).
    let busy: u64 = [0, 1, 2, 5, 6].iter().map(|&i| ticks[i]).sum();
    // SAFETY: sysconf reads a constant of the running system.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    anyhow::ensure!(hz > 0, "sysconf(_SC_CLK_TCK) failed");
    Ok(busy as f64 / hz as f64)
}

/// The CPUs of the fair shape: the path's, and the endpoints'.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub path_cpu: usize,
    pub endpoint_cpu: usize,
}

impl Shape {
    pub fn new() -> anyhow::Result<Shape> {
        let online = loupe_hsm::signer::online_cpus();
        anyhow::ensure!(
            online >= 2,
            "--per-core needs two CPUs, this machine has {online}"
        );
        Ok(Shape {
            path_cpu: 0,
            endpoint_cpu: online - 1,
        })
    }

    /// A command in `ns` run on the endpoints' CPU.
    pub fn endpoint(this: Option<Shape>, ns: &Netns, program: &str) -> std::process::Command {
        match this {
            Some(s) => {
                let cpu = s.endpoint_cpu.to_string();
                ns.command_under(&["taskset", "-c", &cpu], program)
            }
            None => ns.command(program),
        }
    }

    /// Receive processing of the endpoints' veths on their CPU, of the
    /// engine namespace's (the bridge's, the relay's) on the path's; and
    /// `pids` (with all their threads, and what they fork) on the path's.
    pub fn apply(self, h: &loupe_tests::Harness, pids: &[u32]) -> anyhow::Result<()> {
        let mask = |cpu: usize| format!("{:x}", 1u64 << cpu);
        let rps = |ns: &Netns, dev: &str, cpu: usize| {
            ns.exec(
                "sh",
                &[
                    "-c",
                    &format!(
                        "for q in /sys/class/net/{dev}/queues/rx-*/rps_cpus; do echo {} > $q; done",
                        mask(cpu)
                    ),
                ],
            )
        };
        rps(&h.client, PEER_IF, self.endpoint_cpu)?;
        rps(&h.server, PEER_IF, self.endpoint_cpu)?;
        rps(&h.engine, INSIDE_IF, self.path_cpu)?;
        rps(&h.engine, OUTSIDE_IF, self.path_cpu)?;
        for pid in pids {
            taskset(&["-a"], self.path_cpu, *pid)?;
        }
        Ok(())
    }

    /// Puts each veth's NAPI poll with its side, for the throughput
    /// benchmark. veth receives in a NAPI poll scheduled on the CPU that
    /// sent the frame, where the receiving veth has NAPI: the endpoints'
    /// always (the harness gives it them), the engine's while an XDP
    /// program is attached (`xdp`). Left so, the endpoints' GRO runs on
    /// the path's CPU, and the engine's XDP program, its redirect and
    /// copy-mode AF_XDP's copy into the UMEM on the endpoints' CPU: the
    /// engine gets its receive for free. So those polls are made threads
    /// ([`napi_threads_on`]): the endpoints' on their CPU, the engine's on
    /// the path's (as a NIC's receive interrupt is put on the engine's
    /// core).
    ///
    /// Not for latency: waking a thread costs a frame context switches
    /// that an interrupt's softirq does not (tried with `perf/run decide
    /// --per-core`, polling worker, same sitting: the engine's one-way
    /// delays rose by 50-70 µs a frame, the no-decrypt SYN from 20 to 88
    /// µs, with real-time priority too; the bridge's stayed at 62-65 µs).
    pub fn place_napi(self, h: &loupe_tests::Harness, xdp: bool) -> anyhow::Result<Placed> {
        let mut placed = Placed::default();
        for ns in [&h.client, &h.server] {
            for pid in napi_threads_on(ns, PEER_IF)? {
                taskset(&[], self.endpoint_cpu, pid)?;
                placed.endpoint_napi.push(pid);
            }
        }
        if xdp {
            for dev in [INSIDE_IF, OUTSIDE_IF] {
                for pid in napi_threads_on(&h.engine, dev)? {
                    taskset(&[], self.path_cpu, pid)?;
                    placed.path_napi.push(pid);
                }
            }
        }
        Ok(placed)
    }

    /// Puts the calling process (and what it starts from now on: curl,
    /// nginx, tcpdump) on the endpoints' CPU; the path's processes are
    /// moved to theirs by [`Shape::apply`].
    pub fn endpoints_here(self) -> anyhow::Result<()> {
        taskset(&[], self.endpoint_cpu, std::process::id())
    }
}

/// The NAPI threads [`Shape::place_napi`] made and placed.
#[derive(Debug, Default)]
pub struct Placed {
    /// The endpoints' veths' polls, on the endpoints' CPU.
    pub endpoint_napi: Vec<u32>,
    /// The engine's veths' polls (with XDP attached), on the path's CPU.
    pub path_napi: Vec<u32>,
}

/// Makes `dev`'s NAPI polls in `ns` kernel threads (`threaded`), and
/// returns their pids: the `napi/DEV-ID` threads that appeared when it
/// was switched on (the name carries the device's name, not its
/// namespace; kernels before 5.17 cut it to 15 characters, after the
/// prefix this matches). An error if none did: the device has no NAPI
/// (veth has one only while an XDP program is attached in native mode or
/// GRO was switched on while it was up), its NAPI was threaded already,
/// or kernel threads are not visible in this PID namespace. Two callers at
/// once on devices of the same name would take each other's threads:
/// benchmarks run one harness at a time.
fn napi_threads_on(ns: &Netns, dev: &str) -> anyhow::Result<Vec<u32>> {
    let prefix = format!("napi/{dev}-");
    let napi_threads = || -> anyhow::Result<Vec<u32>> {
        let mut pids = Vec::new();
        for entry in std::fs::read_dir("/proc")? {
            let entry = entry?;
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            // A process that ended since the listing has no comm.
            if let Ok(comm) = std::fs::read_to_string(entry.path().join("comm")) {
                if comm.starts_with(&prefix) {
                    pids.push(pid);
                }
            }
        }
        Ok(pids)
    };
    let before = napi_threads()?;
    ns.exec(
        "sh",
        &["-c", &format!("echo 1 > /sys/class/net/{dev}/threaded")],
    )
    .with_context(|| format!("threaded NAPI on {dev}"))?;
    let new: Vec<u32> = napi_threads()?
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    anyhow::ensure!(
        !new.is_empty(),
        "{dev}: no {prefix}* thread appeared when its NAPI was made threaded \
         (no NAPI: an XDP program in skb mode or none; threaded already; or \
         kernel threads hidden by this PID namespace)"
    );
    Ok(new)
}

/// `taskset [flags] -p -c cpu pid`: moves a process (with `-a`, all its
/// threads) onto `cpu`.
fn taskset(flags: &[&str], cpu: usize, pid: u32) -> anyhow::Result<()> {
    let out = std::process::Command::new("taskset")
        .args(flags)
        .args(["-p", "-c", &cpu.to_string(), &pid.to_string()])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "taskset {pid}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
