//! The three-namespace topology:
//!
//! ```text
//!  client ns             engine ns                      server ns
//!  eth0 198.18.0.1 ==== inside [XDP] ... [XDP] outside ==== eth0 198.18.0.2
//!       2001:2::1                                               2001:2::2
//! ```
//!
//! The engine's interfaces carry no addresses: a bump in the wire. Each veth
//! has `queues` TX/RX queues. Offloads are off on every veth by default (TCP
//! across XDP redirects needs real frames: no TSO/GSO super-frames, no
//! partial checksums), and the client/server ends have NAPI (GRO) enabled,
//! which veth needs to receive redirected frames. GRO must be switched on
//! while the link is up: set before, veth does not start NAPI (measured).

use std::{
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::Context;

use crate::netns::{stale_namespaces, Netns};

pub const CLIENT_V4: &str = "198.18.0.1";
pub const SERVER_V4: &str = "198.18.0.2";
pub const CLIENT_V6: &str = "2001:2::1";
pub const SERVER_V6: &str = "2001:2::2";
/// Client and server interface name (in their own namespaces).
pub const PEER_IF: &str = "eth0";
pub const INSIDE_IF: &str = "inside";
pub const OUTSIDE_IF: &str = "outside";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Client,
    Engine,
    Server,
}

#[derive(Clone, Copy, Debug)]
pub struct HarnessConfig {
    pub queues: u32,
    /// TSO/GSO/TX checksum offload on every veth (only for the kernel
    /// baselines: frames then cannot cross XDP redirects).
    pub offloads: bool,
}

impl Default for HarnessConfig {
    fn default() -> Self {
        HarnessConfig {
            queues: 2,
            offloads: false,
        }
    }
}

pub struct Harness {
    pub client: Netns,
    pub engine: Netns,
    pub server: Netns,
    /// Scratch directory of this harness, removed on drop.
    pub dir: PathBuf,
    pub prefix: String,
    keep: bool,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl Harness {
    /// A fresh harness with names unique to this process.
    pub fn new(cfg: HarnessConfig) -> anyhow::Result<Harness> {
        let prefix = format!(
            "lp-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        Harness::create(&prefix, cfg)
    }

    pub fn create(prefix: &str, cfg: HarnessConfig) -> anyhow::Result<Harness> {
        anyhow::ensure!(
            crate::is_root(),
            "the harness needs root (network namespaces, XDP)"
        );
        let dir = std::env::temp_dir().join(format!("loupe-{prefix}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        let h = Harness {
            client: Netns::create(&format!("{prefix}-client"))?,
            engine: Netns::create(&format!("{prefix}-engine"))?,
            server: Netns::create(&format!("{prefix}-server"))?,
            dir,
            prefix: prefix.into(),
            keep: false,
        };
        h.wire(cfg)
            .with_context(|| format!("setting up harness {prefix}"))?;
        Ok(h)
    }

    fn wire(&self, cfg: HarnessConfig) -> anyhow::Result<()> {
        let q = cfg.queues.to_string();
        for (engine_if, peer_ns) in [(INSIDE_IF, &self.client), (OUTSIDE_IF, &self.server)] {
            self.engine.ip(&[
                "link",
                "add",
                engine_if,
                "numtxqueues",
                &q,
                "numrxqueues",
                &q,
                "type",
                "veth",
                "peer",
                "name",
                PEER_IF,
                "netns",
                &peer_ns.name,
                "numtxqueues",
                &q,
                "numrxqueues",
                &q,
            ])?;
        }
        let onoff = if cfg.offloads { "on" } else { "off" };
        let ends = [
            (&self.engine, INSIDE_IF),
            (&self.engine, OUTSIDE_IF),
            (&self.client, PEER_IF),
            (&self.server, PEER_IF),
        ];
        for (ns, dev) in ends {
            ns.exec(
                "ethtool",
                &["-K", dev, "tso", onoff, "gso", onoff, "tx", onoff],
            )?;
            ns.ip(&["link", "set", dev, "up"])?;
        }
        for ns in [&self.client, &self.server] {
            ns.exec("ethtool", &["-K", PEER_IF, "gro", "off"])?;
            ns.exec("ethtool", &["-K", PEER_IF, "gro", "on"])?;
        }
        for (ns, v4, v6) in [
            (&self.client, CLIENT_V4, CLIENT_V6),
            (&self.server, SERVER_V4, SERVER_V6),
        ] {
            ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", PEER_IF])?;
            ns.ip(&["addr", "add", &format!("{v6}/64"), "dev", PEER_IF, "nodad"])?;
        }
        Ok(())
    }

    /// Adopt the namespaces of a harness made by another process.
    pub fn adopt(prefix: &str) -> Harness {
        Harness {
            client: Netns::existing(&format!("{prefix}-client"), false),
            engine: Netns::existing(&format!("{prefix}-engine"), false),
            server: Netns::existing(&format!("{prefix}-server"), false),
            dir: std::env::temp_dir().join(format!("loupe-{prefix}")),
            prefix: prefix.into(),
            keep: false,
        }
    }

    /// Leave everything in place on drop (for `loupe-harness up`).
    pub fn keep(&mut self) {
        self.keep = true;
        self.client.keep();
        self.engine.keep();
        self.server.keep();
    }

    pub fn ns(&self, role: Role) -> &Netns {
        match role {
            Role::Client => &self.client,
            Role::Engine => &self.engine,
            Role::Server => &self.server,
        }
    }

    /// A Linux bridge joining inside and outside in the engine namespace:
    /// the kernel path a user would otherwise run.
    pub fn bridge_up(&self) -> anyhow::Result<()> {
        let e = &self.engine;
        e.ip(&["link", "add", "br0", "type", "bridge"])?;
        e.ip(&["link", "set", INSIDE_IF, "master", "br0"])?;
        e.ip(&["link", "set", OUTSIDE_IF, "master", "br0"])?;
        e.ip(&["link", "set", "br0", "up"])?;
        Ok(())
    }

    /// A statistics counter of an interface in a namespace (sysfs
    /// `statistics/<name>`, e.g. `tx_packets`).
    pub fn iface_counter(&self, role: Role, dev: &str, name: &str) -> anyhow::Result<u64> {
        let out = self
            .ns(role)
            .exec("cat", &[&format!("/sys/class/net/{dev}/statistics/{name}")])?;
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .with_context(|| format!("{dev} {name}"))
    }

    /// Whether an XDP program is attached to `dev` in the engine namespace;
    /// returns its id.
    pub fn xdp_prog_id(&self, dev: &str) -> anyhow::Result<Option<u32>> {
        let out = self.engine.ip(&["-d", "link", "show", dev])?;
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(text
            .split_whitespace()
            .skip_while(|w| !w.starts_with("prog/xdp"))
            .nth(2)
            .and_then(|id| id.parse().ok()))
    }

    pub fn destroy(mut self) -> anyhow::Result<()> {
        self.keep = false;
        let mut errors = Vec::new();
        for ns in [&mut self.client, &mut self.engine, &mut self.server] {
            if let Err(e) = ns.delete() {
                errors.push(e.to_string());
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        anyhow::ensure!(errors.is_empty(), "{}", errors.join("; "));
        Ok(())
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        // The namespaces delete themselves (Netns::drop) unless kept.
    }
}

/// Remove namespaces left by harness processes that died without cleaning
/// up (e.g. SIGKILLed test runs). Returns the names removed.
pub fn sweep_stale() -> Vec<String> {
    let stale = stale_namespaces();
    for name in &stale {
        let mut ns = Netns::existing(name, true);
        if let Err(e) = ns.delete() {
            eprintln!("harness: cannot delete stale namespace {name}: {e}");
        }
    }
    stale
}
