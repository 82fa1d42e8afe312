//! Engine configuration: interfaces, queues, XDP mode, steering, limits.
//! Parsing of user-supplied values (port lists, XDP modes; prefixes are
//! the policy's) lives here and reports what was wrong with the value.

use std::{path::PathBuf, time::Duration};

use thiserror::Error;

pub use crate::policy::prefix::{default_steer_prefixes, BadPrefix, Prefix};
use crate::{ebpf::AttachMode, session::SessionSettings, xsk::PortConfig};

/// How long an idle worker keeps polling before it sleeps, by default
/// (`--busy-poll-us`): none. Polling helps a worker that owns its core
/// (the answer to what it just sent is taken without a wake-up); one that
/// shares a CPU yields it while polling and then waits its turn behind the
/// other work when a frame comes, which on 2 shared vCPUs cost a
/// ClientHello 400 µs more at 200 µs (perf/run decide).
pub const DEFAULT_BUSY_POLL_US: u64 = 0;

/// How long an idle worker keeps polling after its last work while its CPU
/// is its own, by default (`--idle-spin-us`; `worker::idle`): none. On a
/// core of its own 5000 takes the next connection's frames without a
/// wake-up: `perf/run decide --per-core` (2 vCPUs, builds alternated) went
/// from 89-91 µs (no-decrypt) and 40-57 µs (tcp-split) added to a new
/// connection's SYN, SYN-ACK and ClientHello to below the bridge's. On
/// CPUs shared with other work in short bursts the polling fills the gaps
/// between them: an outside probe measured 39-47% of each CPU against 8%
/// at 240 connections/s, no connection faster. So it is for workers that
/// own their cores, and off unless asked.
pub const DEFAULT_IDLE_SPIN_US: u64 = 0;

/// How long a busy worker runs before it yields its CPU once
/// (`--yield-every-us`; `worker::idle`), by default: never. Threads that
/// share its core and bring its frames get it then, not at the end of its
/// time slice: per core, with the engine veth's NAPI thread on the
/// worker's core, the split carried 15-25% more with 1 and 8 flows at
/// 100 µs (2 vCPUs, `perf/run wire --per-core`, alternated), and the
/// client resent 2% of its frames instead of 11% at 8 flows. On CPUs
/// shared with the endpoints it gave them the CPU instead, for their
/// whole time slice: the split fell from 0.71-0.73x the relay to
/// 0.22-0.86x. So it is for workers that own their cores, and off unless
/// asked.
pub const DEFAULT_YIELD_EVERY_US: u64 = 0;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error(transparent)]
    Prefix(#[from] BadPrefix),
    #[error("bad port '{0}': expected a number from 1 to 65535")]
    Port(String),
    #[error("bad XDP mode '{0}': expected native or skb")]
    Mode(String),
}

/// A comma-separated port list; `none` or empty means no ports.
pub fn parse_ports(s: &str) -> Result<Vec<u16>, ConfigError> {
    let s = s.trim();
    if s.is_empty() || s.eq_ignore_ascii_case("none") {
        return Ok(Vec::new());
    }
    let mut ports = Vec::new();
    for p in s.split(',') {
        let port: u16 = p
            .trim()
            .parse()
            .map_err(|_| ConfigError::Port(p.trim().into()))?;
        if port == 0 {
            return Err(ConfigError::Port(p.trim().into()));
        }
        if !ports.contains(&port) {
            ports.push(port);
        }
    }
    Ok(ports)
}

pub fn parse_mode(s: &str) -> Result<AttachMode, ConfigError> {
    match s {
        "native" | "drv" | "driver" => Ok(AttachMode::Native),
        "skb" | "generic" => Ok(AttachMode::Skb),
        other => Err(ConfigError::Mode(other.into())),
    }
}

#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub inside: String,
    pub outside: String,
    /// Queues (and workers) to serve; `None`: every RX queue both
    /// interfaces have.
    pub queues: Option<u32>,
    pub mode: AttachMode,
    pub steer_ports: Vec<u16>,
    pub steer_prefixes: Vec<Prefix>,
    pub exempt_prefixes: Vec<Prefix>,
    pub stats_file: Option<PathBuf>,
    pub stats_interval: Duration,
    pub port: PortConfig,
    pub max_flows_per_worker: usize,
    pub flow_idle_timeout: Duration,
    pub pin_workers: bool,
    /// How long an idle worker keeps polling before it sleeps.
    pub busy_poll: Duration,
    /// How long an idle worker keeps polling after its last work while it
    /// has its CPU to itself.
    pub idle_spin: Duration,
    /// How long a busy worker runs before it yields its CPU once (zero:
    /// never).
    pub yield_every: Duration,
    /// Forward a steered connection's handshake in XDP and record it for
    /// the worker that gets the first data (one wake-up per new connection
    /// instead of three), rather than steer every SYN and SYN-ACK to the
    /// workers (the default). Experimental: see docs/ARCHITECTURE.md for
    /// what it does not cover yet.
    pub handshake_fast_path: bool,
    /// Split every steered TCP connection (the tcp-split action: the engine
    /// terminates both halves and relays the byte streams).
    pub tcp_split: bool,
    /// Client bytes held for the decision, at most, and for how long
    /// (then the connection is released unchanged to the fast path).
    pub hold_bytes: usize,
    pub hold_timeout: Duration,
    /// On stop, how long split connections are given to finish before
    /// both ends are reset.
    pub drain_timeout: Duration,
    /// What a split half's buffers may grow to, and what all of them may
    /// grow into together (see [`crate::tcp::budget`]).
    pub split_buffer_max: usize,
    pub split_memory: usize,
    /// The split halves' congestion control.
    pub split_congestion: crate::tcp::cc::Algorithm,
    /// Connections the policy would inspect but the engine cannot follow
    /// from their start: dropped or passed.
    pub mid_flow: crate::session::MidFlow,
    /// tcp-split passes (does not split) connections whose ClientHello
    /// names one of these servers.
    pub split_exempt_sni: Vec<crate::policy::HostGlob>,
    /// The control socket; with it, the policy comes from the control
    /// process (and until the first one, steered flows are forwarded).
    pub api: Option<crate::api::ApiConfig>,
    /// The HSM signer and its audit log; `None` runs the packet path only.
    pub hsm: Option<HsmSettings>,
    /// TLS interception (with an HSM).
    pub tls: crate::tls::context::TlsSettings,
    /// Copies of decrypted plaintext (off unless a destination is set).
    pub export: crate::export::ExportConfig,
}

/// The signer service the engine starts (and checks) at start-up.
#[derive(Clone, Debug)]
pub struct HsmSettings {
    pub tokens: Vec<loupe_hsm::token::TokenConfig>,
    /// The key-usage audit log; checkpoints are signed by the first token's
    /// audit key.
    pub audit_log: PathBuf,
    pub threads_per_token: usize,
    pub batch: usize,
    /// CPUs the HSM threads are pinned to (empty: not pinned).
    pub cpus: Vec<usize>,
}

impl EngineConfig {
    pub fn new(inside: impl Into<String>, outside: impl Into<String>) -> Self {
        EngineConfig {
            inside: inside.into(),
            outside: outside.into(),
            queues: None,
            mode: AttachMode::Native,
            steer_ports: vec![443],
            steer_prefixes: default_steer_prefixes(),
            exempt_prefixes: Vec::new(),
            stats_file: None,
            stats_interval: Duration::from_millis(500),
            port: PortConfig::default(),
            max_flows_per_worker: 262_144,
            flow_idle_timeout: Duration::from_secs(120),
            pin_workers: true,
            busy_poll: Duration::from_micros(DEFAULT_BUSY_POLL_US),
            idle_spin: Duration::from_micros(DEFAULT_IDLE_SPIN_US),
            yield_every: Duration::from_micros(DEFAULT_YIELD_EVERY_US),
            hsm: None,
            tls: Default::default(),
            export: Default::default(),
            handshake_fast_path: false,
            tcp_split: false,
            hold_bytes: SessionSettings::default().hold_bytes,
            hold_timeout: SessionSettings::default().hold_timeout,
            drain_timeout: SessionSettings::default().drain,
            split_buffer_max: SessionSettings::default().buffer_max,
            split_memory: SessionSettings::default().budget.limit(),
            split_congestion: Default::default(),
            mid_flow: Default::default(),
            split_exempt_sni: Vec::new(),
            api: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports() {
        assert_eq!(parse_ports("443, 8443,443").unwrap(), vec![443, 8443]);
        assert_eq!(parse_ports("none").unwrap(), Vec::<u16>::new());
        assert!(parse_ports("0").is_err());
        assert!(parse_ports("70000").is_err());
        assert!(parse_ports("https").is_err());
    }
}
