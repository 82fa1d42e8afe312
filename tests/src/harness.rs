//! The three-namespace topology:
//!
//! ```text
//!  client ns             engine ns                      server ns
//!  eth0 198.18.0.1 ==== inside [XDP] ... [XDP] outside ==== eth0 198.18.0.2
//!       2001:2::1                                               2001:2::2
//! ```
//!
//! With `impair`, each link gets a namespace of its own in the middle
//! (`cimp`, `simp`) where `loupe-impair` can run between `wire-a` (the
//! peer's side) and `wire-b` (the engine's side):
//!
//! ```text
//!  client eth0 ==== wire-a [cimp] wire-b ==== inside [engine] outside ==== wire-b [simp] wire-a ==== eth0 server
//! ```
//!
//! With `mirror`, a fourth namespace (`ids`) hangs off the engine's
//! `mirror` interface, where an IDS (tshark, ngrep) reads the decrypted
//! copies the engine sends out its mirror port:
//!
//! ```text
//!  engine ns: mirror ==== eth0 [ids ns]   (no addresses: receive only)
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
    process::Stdio,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::Context;

use crate::{
    netns::{stale_namespaces, Netns},
    Proc,
};

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
    /// A namespace in the middle of each link for `loupe-impair`.
    pub impair: bool,
    /// A fourth namespace on the engine's mirror port.
    pub mirror: bool,
    /// The MTU of every link (the kernel's default, 1500, when `None`).
    pub mtu: Option<u32>,
}

impl Default for HarnessConfig {
    fn default() -> Self {
        HarnessConfig {
            queues: 2,
            offloads: false,
            impair: false,
            mirror: false,
            mtu: None,
        }
    }
}

impl HarnessConfig {
    /// The default harness with every link at `mtu`.
    pub fn with_mtu(mtu: u32) -> Self {
        HarnessConfig {
            mtu: Some(mtu),
            ..HarnessConfig::default()
        }
    }
}

/// Which link an impairment namespace sits on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// Between the client and the engine's `inside`.
    Client,
    /// Between the engine's `outside` and the server.
    Server,
}

/// The kernel relay's address on the engine's bridge, and the port socat
/// listens on.
pub const RELAY_V4: &str = "198.18.0.3";
pub const RELAY_PORT: u16 = 15201;

/// Interfaces of an impairment namespace: towards the peer, towards the
/// engine.
pub const IMPAIR_PEER_IF: &str = "wire-a";
pub const IMPAIR_ENGINE_IF: &str = "wire-b";

/// The engine's mirror port (in the engine namespace); its other end is
/// [`PEER_IF`] in the `ids` namespace.
pub const MIRROR_IF: &str = "mirror";

pub struct Harness {
    pub client: Netns,
    pub engine: Netns,
    pub server: Netns,
    /// The impairment namespaces on the client and server links, when
    /// the harness was made with `impair`.
    pub impair: Option<[Netns; 2]>,
    /// The IDS namespace on the mirror port, when made with `mirror`.
    pub ids: Option<Netns>,
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
            impair: if cfg.impair {
                Some([
                    Netns::create(&format!("{prefix}-cimp"))?,
                    Netns::create(&format!("{prefix}-simp"))?,
                ])
            } else {
                None
            },
            ids: if cfg.mirror {
                Some(Netns::create(&format!("{prefix}-ids"))?)
            } else {
                None
            },
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
        for (engine_if, peer_ns, link) in [
            (INSIDE_IF, &self.client, Link::Client),
            (OUTSIDE_IF, &self.server, Link::Server),
        ] {
            match self.impair_ns(link) {
                Some(imp) => {
                    veth(&self.engine, engine_if, imp, IMPAIR_ENGINE_IF, &q)?;
                    veth(imp, IMPAIR_PEER_IF, peer_ns, PEER_IF, &q)?;
                }
                None => veth(&self.engine, engine_if, peer_ns, PEER_IF, &q)?,
            }
        }
        let onoff = if cfg.offloads { "on" } else { "off" };
        let mut ends = vec![
            (&self.engine, INSIDE_IF),
            (&self.engine, OUTSIDE_IF),
            (&self.client, PEER_IF),
            (&self.server, PEER_IF),
        ];
        for imp in self.impair.iter().flatten() {
            ends.push((imp, IMPAIR_PEER_IF));
            ends.push((imp, IMPAIR_ENGINE_IF));
        }
        if let Some(ids) = &self.ids {
            veth(&self.engine, MIRROR_IF, ids, PEER_IF, "1")?;
            // Neither end says anything of its own (no IPv6 neighbour or
            // router discovery): the IDS sees only the engine's copies.
            for (ns, dev) in [(&self.engine, MIRROR_IF), (ids, PEER_IF)] {
                ns.exec(
                    "sysctl",
                    &["-qw", &format!("net.ipv6.conf.{dev}.disable_ipv6=1")],
                )?;
            }
            ends.push((&self.engine, MIRROR_IF));
            ends.push((ids, PEER_IF));
        }
        for (ns, dev) in ends {
            ns.exec(
                "ethtool",
                &["-K", dev, "tso", onoff, "gso", onoff, "tx", onoff],
            )?;
            // No duplicate address detection: every IPv6 address (the
            // link-local one made at link up included) is usable at once,
            // instead of turning from tentative to valid a second or two
            // into a test. A client watching its addresses (Chromium's
            // network change notifier) takes that late change for a new
            // network and drops its connections (ERR_NETWORK_CHANGED).
            ns.exec(
                "sysctl",
                &["-qw", &format!("net.ipv6.conf.{dev}.accept_dad=0")],
            )?;
            if let Some(mtu) = cfg.mtu {
                ns.ip(&["link", "set", dev, "mtu", &mtu.to_string()])?;
            }
            ns.ip(&["link", "set", dev, "up"])?;
        }
        // Until loupe-impair attaches (and after it stops), a bridge joins
        // each impairment namespace's two ends; its XDP program, once
        // attached, takes every frame before the bridge sees it.
        // Every veth that receives frames sent from XDP or AF_XDP needs
        // NAPI: the impairment ends (from the engine and the peers), and the
        // engine's own ends (from loupe-impair; the engine's XDP program
        // gives them NAPI when it runs, a bridge in its place does not).
        if self.impair.is_some() {
            napi(&self.engine, INSIDE_IF)?;
            napi(&self.engine, OUTSIDE_IF)?;
        }
        for imp in self.impair.iter().flatten() {
            napi(imp, IMPAIR_PEER_IF)?;
            napi(imp, IMPAIR_ENGINE_IF)?;
            bridge(imp, IMPAIR_PEER_IF, IMPAIR_ENGINE_IF)?;
        }
        for ns in [&self.client, &self.server] {
            napi(ns, PEER_IF)?;
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

    /// The impairment namespace on `link`, if the harness has them.
    pub fn impair_ns(&self, link: Link) -> Option<&Netns> {
        self.impair.as_ref().map(|[c, s]| match link {
            Link::Client => c,
            Link::Server => s,
        })
    }

    /// Adopt the namespaces of a harness made by another process.
    pub fn adopt(prefix: &str) -> Harness {
        Harness {
            client: Netns::existing(&format!("{prefix}-client"), false),
            engine: Netns::existing(&format!("{prefix}-engine"), false),
            server: Netns::existing(&format!("{prefix}-server"), false),
            impair: None,
            ids: std::path::Path::new(&format!("/run/netns/{prefix}-ids"))
                .exists()
                .then(|| Netns::existing(&format!("{prefix}-ids"), false)),
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
        for ns in self.impair.iter_mut().flatten().chain(self.ids.iter_mut()) {
            ns.keep();
        }
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
        bridge(&self.engine, INSIDE_IF, OUTSIDE_IF)
    }

    /// The kernel-socket relay a user could run instead of the engine: the
    /// bridge, with TCP to `port` taken off it (br_netfilter, nftables
    /// REDIRECT) to socat in the engine namespace, which connects on to
    /// the server from [`RELAY_V4`]. The client still talks to the
    /// server's address; the server sees the relay's (REDIRECT, unlike
    /// TPROXY, is not transparent on that side). Returns socat, listening.
    pub fn relay_up(&self, port: u16) -> anyhow::Result<Proc> {
        self.redirect_up(port)?;
        let child = self
            .engine
            .command("socat")
            .args([
                // 128 KiB per read: socat's 8 KiB default is not what
                // anyone would run for throughput.
                "-b",
                "131072",
                &format!("TCP-LISTEN:{RELAY_PORT},fork,reuseaddr"),
                &format!("TCP:{SERVER_V4}:{port}"),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning socat")?;
        self.relay_ready(Proc::new("socat", child))
    }

    /// The bridge with TCP to `port` redirected (nftables, on the bridge)
    /// to [`RELAY_PORT`] in the engine namespace, where a proxy listens:
    /// what a user runs who terminates connections on kernel sockets.
    pub fn redirect_up(&self, port: u16) -> anyhow::Result<()> {
        self.bridge_up()?;
        let e = &self.engine;
        e.ip(&["addr", "add", &format!("{RELAY_V4}/24"), "dev", "br0"])?;
        e.exec("sysctl", &["-qw", "net.bridge.bridge-nf-call-iptables=1"])?;
        e.exec("nft", &["add table ip loupe_relay"])?;
        e.exec(
            "nft",
            &["add chain ip loupe_relay pre { type nat hook prerouting priority dstnat; }"],
        )?;
        e.exec(
            "nft",
            &[&format!(
                "add rule ip loupe_relay pre tcp dport {port} counter redirect to :{RELAY_PORT}"
            )],
        )?;
        Ok(())
    }

    /// Waits for the proxy `relay` (started in the engine namespace) to
    /// listen on [`RELAY_PORT`].
    pub fn relay_ready(&self, mut relay: Proc) -> anyhow::Result<Proc> {
        let e = &self.engine;
        relay.wait_ready("the relay to listen", Duration::from_secs(20), || {
            e.listens_on(&format!(":{RELAY_PORT} "))
        })?;
        Ok(relay)
    }

    /// Connections the relay's REDIRECT took (NAT sees each one's first
    /// packet only).
    pub fn relay_redirected(&self) -> anyhow::Result<u64> {
        let out = self
            .engine
            .exec("nft", &["list", "table", "ip", "loupe_relay"])?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .context("no counter in the relay's nftables rule")
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

    /// How XDP is attached to `dev` in the engine namespace, as the kernel
    /// reports it (`ip -j -d link`): "native" (in the driver), "skb"
    /// (generic), "hw" (offloaded), or none.
    pub fn xdp_attach_mode(&self, dev: &str) -> anyhow::Result<Option<&'static str>> {
        let out = self.engine.ip(&["-j", "-d", "link", "show", "dev", dev])?;
        let links: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("ip -j link output")?;
        // XDP_ATTACHED_* from linux/if_link.h.
        Ok(match links[0]["xdp"]["mode"].as_u64() {
            None | Some(0) => None,
            Some(1) => Some("native"),
            Some(2) => Some("skb"),
            Some(3) => Some("hw"),
            Some(m) => anyhow::bail!("{dev}: XDP attach mode {m} (several programs?)"),
        })
    }

    pub fn destroy(mut self) -> anyhow::Result<()> {
        self.keep = false;
        let mut errors = Vec::new();
        let impair = self.impair.iter_mut().flatten();
        for ns in [&mut self.client, &mut self.engine, &mut self.server]
            .into_iter()
            .chain(impair)
            .chain(self.ids.iter_mut())
        {
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

/// A veth pair with `queues` queues each way: `a` in `ns_a`, `b` in `ns_b`.
fn veth(ns_a: &Netns, a: &str, ns_b: &Netns, b: &str, queues: &str) -> anyhow::Result<()> {
    ns_a.ip(&[
        "link",
        "add",
        a,
        "numtxqueues",
        queues,
        "numrxqueues",
        queues,
        "type",
        "veth",
        "peer",
        "name",
        b,
        "netns",
        &ns_b.name,
        "numtxqueues",
        queues,
        "numrxqueues",
        queues,
    ])?;
    Ok(())
}

/// A bridge `br0` in `ns` joining `a` and `b`.
fn bridge(ns: &Netns, a: &str, b: &str) -> anyhow::Result<()> {
    ns.ip(&["link", "add", "br0", "type", "bridge"])?;
    ns.ip(&["link", "set", a, "master", "br0"])?;
    ns.ip(&["link", "set", b, "master", "br0"])?;
    ns.ip(&["link", "set", "br0", "up"])?;
    Ok(())
}

/// NAPI on a veth that receives frames redirected by XDP (or sent by
/// AF_XDP) from its peer: GRO switched on while the link is up (set
/// before, veth does not start NAPI).
fn napi(ns: &Netns, dev: &str) -> anyhow::Result<()> {
    ns.exec("ethtool", &["-K", dev, "gro", "off"])?;
    ns.exec("ethtool", &["-K", dev, "gro", "on"])?;
    Ok(())
}
