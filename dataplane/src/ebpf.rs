//! The loaded XDP classifier: embeds the object built from `ebpf/xdp`, fills
//! its maps (interfaces, peers, AF_XDP sockets, steering ports and prefixes),
//! attaches it, and reads its per-CPU counters.
//!
//! Attachment uses BPF links (aya falls back to netlink only on kernels
//! without them): a link is owned by a file descriptor of this process, so
//! the program is detached when the process ends, however it ends.

use aya::{
    maps::{
        lpm_trie::{Key, LpmTrie},
        Array, DevMap, HashMap, MapError, PerCpuArray, XskMap,
    },
    programs::{ProgramError, TestRun, TestRunOptions, Xdp, XdpMode},
    Ebpf, EbpfError, EbpfLoader,
};
use loupe_common::{
    setting, Addr, Counter, CounterValue, FlowKey, Handshake, IfaceInfo, HANDSHAKE_FRAME_MAX,
    MAX_PREFIXES, MAX_QUEUES, MAX_STEER_PORTS,
};
use thiserror::Error;

use crate::{
    flow::Side,
    policy::Prefix,
    session::opening::{HandshakeRecords, Recorded},
};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/loupe-xdp"));
const PROGRAM: &str = "loupe_xdp";

#[derive(Debug, Error)]
pub enum ClassifierError {
    #[error("cannot load the XDP object: {0}")]
    Load(#[source] Box<EbpfError>),
    #[error("the XDP object has no {0}")]
    Missing(&'static str),
    #[error("XDP program rejected by the kernel: {0}")]
    Program(#[source] Box<ProgramError>),
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: Box<MapError>,
    },
    #[error("{0}")]
    XdpMap(String),
    #[error("cannot attach XDP ({mode}) to '{iface}': {source}{hint}")]
    Attach {
        iface: String,
        mode: &'static str,
        #[source]
        source: Box<ProgramError>,
        hint: &'static str,
    },
    #[error("too many steering ports ({0}; at most {MAX_STEER_PORTS})")]
    TooManyPorts(usize),
    #[error("queue {0} is beyond the {MAX_QUEUES} queues the XSKMAP holds")]
    QueueRange(u32),
}

/// How the program runs on the interfaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// In the driver (veth, most NICs): the fast path.
    Native,
    /// Generic XDP in the stack, for drivers without native support.
    Skb,
}

impl AttachMode {
    pub fn label(self) -> &'static str {
        match self {
            AttachMode::Native => "native",
            AttachMode::Skb => "skb",
        }
    }
}

pub struct Classifier {
    ebpf: Ebpf,
    program_id: Option<u32>,
}

fn program_err(e: ProgramError) -> ClassifierError {
    ClassifierError::Program(Box::new(e))
}

fn map_err(map: &'static str) -> impl Fn(MapError) -> ClassifierError {
    move |source| ClassifierError::Map {
        map,
        source: Box::new(source),
    }
}

impl Classifier {
    /// Loads the program with room for handshake records (the
    /// `--handshake-fast-path` maps, about 17 MiB preallocated).
    pub fn load() -> Result<Self, ClassifierError> {
        Self::load_with(true)
    }

    /// Loads the program; without `handshakes` its handshake maps hold one
    /// record each, so an engine that never turns the fast path on does
    /// not preallocate them (nor wait for the kernel to free them).
    pub fn load_with(handshakes: bool) -> Result<Self, ClassifierError> {
        let mut loader = EbpfLoader::new();
        if !handshakes {
            loader
                .map_max_entries("HANDSHAKES", 1)
                .map_max_entries("OPENED", 1);
        }
        let mut ebpf = loader
            .load(OBJECT)
            .map_err(|e| ClassifierError::Load(Box::new(e)))?;
        let prog = xdp_mut(&mut ebpf)?;
        prog.load().map_err(program_err)?;
        let program_id = prog.info().ok().map(|i| i.id());
        Ok(Classifier { ebpf, program_id })
    }

    /// Kernel id of the loaded program (for `bpftool prog show id`).
    pub fn program_id(&self) -> Option<u32> {
        self.program_id
    }

    /// Record the two interfaces: slot 0 is inside, slot 1 outside; frames
    /// from one leave by the other.
    pub fn set_interfaces(&mut self, inside: u32, outside: u32) -> Result<(), ClassifierError> {
        {
            let mut ifaces: HashMap<_, u32, IfaceInfo> = self
                .map_mut("IFACES")?
                .try_into()
                .map_err(map_err("IFACES"))?;
            for (ifindex, side) in [(inside, Side::Inside), (outside, Side::Outside)] {
                let info = IfaceInfo { slot: side as u32 };
                ifaces.insert(ifindex, info, 0).map_err(map_err("IFACES"))?;
            }
        }
        let mut peers: DevMap<_> = self
            .map_mut("PEERS")?
            .try_into()
            .map_err(map_err("PEERS"))?;
        for (slot, target) in [(Side::Inside, outside), (Side::Outside, inside)] {
            peers
                .set(slot as u32, target, None, 0)
                .map_err(|e| ClassifierError::XdpMap(format!("PEERS: {e}")))?;
        }
        Ok(())
    }

    /// Steer TCP to these ports when the server address is in `prefixes`
    /// and neither address is in `exempt`.
    pub fn set_steering(
        &mut self,
        ports: &[u16],
        prefixes: &[Prefix],
        exempt: &[Prefix],
    ) -> Result<(), ClassifierError> {
        if ports.len() > MAX_STEER_PORTS as usize {
            return Err(ClassifierError::TooManyPorts(ports.len()));
        }
        {
            let mut map: HashMap<_, u16, u8> = self
                .map_mut("STEER_PORTS")?
                .try_into()
                .map_err(map_err("STEER_PORTS"))?;
            // New entries first, then the old ones go: a port in both
            // sets is steered throughout. When both do not fit at once,
            // the old ones go first.
            let old: Vec<u16> = map.keys().filter_map(Result::ok).collect();
            let added = ports.iter().filter(|p| !old.contains(p)).count();
            let old_first = old.len() + added > MAX_STEER_PORTS as usize;
            let gone: Vec<u16> = old.iter().copied().filter(|p| !ports.contains(p)).collect();
            if old_first {
                for p in &gone {
                    map.remove(p).map_err(map_err("STEER_PORTS"))?;
                }
            }
            for p in ports {
                map.insert(p, 1, 0).map_err(map_err("STEER_PORTS"))?;
            }
            if !old_first {
                for p in &gone {
                    map.remove(p).map_err(map_err("STEER_PORTS"))?;
                }
            }
        }
        self.set_prefixes("STEER_PREFIXES", prefixes)?;
        self.set_prefixes("EXEMPT_PREFIXES", exempt)
    }

    /// Drop QUIC (UDP/443) to `prefixes` (unless exempt).
    pub fn set_quic_block(&mut self, prefixes: &[Prefix]) -> Result<(), ClassifierError> {
        self.set_prefixes("QUIC_BLOCK", prefixes)
    }

    fn set_prefixes(
        &mut self,
        name: &'static str,
        prefixes: &[Prefix],
    ) -> Result<(), ClassifierError> {
        let mut trie: LpmTrie<_, Addr, u8> =
            self.map_mut(name)?.try_into().map_err(map_err(name))?;
        let old: Vec<Key<Addr>> = trie.keys().filter_map(Result::ok).collect();
        let new: Vec<Key<Addr>> = prefixes
            .iter()
            .map(|p| Key::new(p.mapped_len(), p.addr))
            .collect();
        let id = |k: &Key<Addr>| (k.prefix_len(), k.data());
        let old_ids: std::collections::HashSet<_> = old.iter().map(id).collect();
        let new_ids: std::collections::HashSet<_> = new.iter().map(id).collect();
        let gone: Vec<&Key<Addr>> = old.iter().filter(|k| !new_ids.contains(&id(k))).collect();
        let added = new.iter().filter(|k| !old_ids.contains(&id(k))).count();
        // As with the ports: the old ones first only when both do not fit.
        let old_first = old.len() + added > MAX_PREFIXES as usize;
        if old_first {
            for k in &gone {
                trie.remove(k).map_err(map_err(name))?;
            }
        }
        for k in &new {
            trie.insert(k, 1, 0).map_err(map_err(name))?;
        }
        if !old_first {
            for k in &gone {
                trie.remove(k).map_err(map_err(name))?;
            }
        }
        Ok(())
    }

    /// Make `fd` the AF_XDP socket for `queue` of the interface in `side`.
    pub fn register_socket(
        &mut self,
        side: Side,
        queue: u32,
        fd: i32,
    ) -> Result<(), ClassifierError> {
        if queue >= MAX_QUEUES {
            return Err(ClassifierError::QueueRange(queue));
        }
        let mut xsks: XskMap<_> = self.map_mut("XSKS")?.try_into().map_err(map_err("XSKS"))?;
        xsks.set(side as u32 * MAX_QUEUES + queue, fd, 0)
            .map_err(map_err("XSKS"))
    }

    /// Whether a steered connection's SYN, SYN-ACK and handshake ACKs take
    /// the fast path, recorded for the worker that gets its first data
    /// (on), or are steered like its other frames (off, the default of a
    /// loaded program). Only an engine that tracks connections reads the
    /// records.
    pub fn set_handshake_fast_path(&mut self, on: bool) -> Result<(), ClassifierError> {
        let mut settings: Array<_, u32> = self
            .map_mut("SETTINGS")?
            .try_into()
            .map_err(map_err("SETTINGS"))?;
        settings
            .set(setting::HANDSHAKE_FAST_PATH, u32::from(on), 0)
            .map_err(map_err("SETTINGS"))
    }

    /// The handshake recorded under `key` (the SYN's direction), read in
    /// place, and whether the client's ACK moved it to the opened ones:
    /// for tests and diagnostics.
    pub fn handshake(&self, key: &FlowKey) -> Result<Option<(Handshake, bool)>, ClassifierError> {
        for (name, opened) in [("HANDSHAKES", false), ("OPENED", true)] {
            let map = self.ebpf.map(name).ok_or(ClassifierError::Missing(name))?;
            let map: HashMap<_, FlowKey, Handshake> = map.try_into().map_err(map_err(name))?;
            match map.get(key, 0) {
                Ok(h) => return Ok(Some((h, opened))),
                Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(name)(e)),
            }
        }
        Ok(None)
    }

    /// Takes the handshake records out of the classifier, for the workers
    /// to read (the program keeps its own references to the maps).
    pub fn take_handshakes(&mut self) -> Result<RecordedHandshakes, ClassifierError> {
        let mut take = |name: &'static str| {
            let map = self
                .ebpf
                .take_map(name)
                .ok_or(ClassifierError::Missing(name))?;
            HashMap::try_from(map).map_err(map_err(name))
        };
        Ok(RecordedHandshakes {
            opened: take("OPENED")?,
            half_open: take("HANDSHAKES")?,
        })
    }

    /// Takes the flow map out of the classifier, for the one thread that
    /// installs verdicts while the program runs (the program keeps its own
    /// reference to the map).
    pub fn take_flow_map(&mut self) -> Result<FlowVerdicts, ClassifierError> {
        let map = self
            .ebpf
            .take_map("FLOWS")
            .ok_or(ClassifierError::Missing("FLOWS"))?;
        Ok(FlowVerdicts(map.try_into().map_err(map_err("FLOWS"))?))
    }

    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<(), ClassifierError> {
        let prog = xdp_mut(&mut self.ebpf)?;
        let xdp_mode = match mode {
            AttachMode::Native => XdpMode::Driver,
            AttachMode::Skb => XdpMode::Skb,
        };
        prog.attach(iface, xdp_mode)
            .map(|_| ())
            .map_err(|source| ClassifierError::Attach {
                iface: iface.into(),
                mode: mode.label(),
                source: Box::new(source),
                hint: match mode {
                    AttachMode::Native => {
                        " (if the driver has no native XDP, retry with --xdp-mode skb; \
                         if another XDP program is attached, detach it first)"
                    }
                    AttachMode::Skb => " (is another XDP program attached?)",
                },
            })
    }

    /// Detaches the program from every interface (and unloads it): from
    /// here on the kernel handles all traffic. The maps stay readable.
    pub fn detach(&mut self) -> Result<(), ClassifierError> {
        xdp_mut(&mut self.ebpf)?.unload().map_err(program_err)
    }

    /// Run the program once on `frame` as if it arrived on `ifindex` queue
    /// `queue` (BPF_PROG_TEST_RUN: maps and counters are real, redirects
    /// are only returned, not performed). For tests and diagnostics; the
    /// calling thread's network namespace must hold `ifindex`.
    pub fn test_run(&self, frame: &[u8], ifindex: u32, queue: u32) -> Result<u32, ClassifierError> {
        let prog: &Xdp = self
            .ebpf
            .program(PROGRAM)
            .ok_or(ClassifierError::Missing("XDP program"))?
            .try_into()
            .map_err(program_err)?;
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex,
        // rx_queue_index, egress_ifindex.
        let md: [u32; 6] = [0, frame.len() as u32, 0, ifindex, queue, 0];
        let ctx: Vec<u8> = md.iter().flat_map(|v| v.to_ne_bytes()).collect();
        let mut out = vec![0u8; frame.len() + 256];
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..Default::default()
            })
            .map_err(program_err)?;
        Ok(result.return_value)
    }

    /// Counter totals over all CPUs, in `Counter::ALL` order.
    pub fn counters(&self) -> Result<Vec<(Counter, CounterValue)>, ClassifierError> {
        let map = self
            .ebpf
            .map("COUNTERS")
            .ok_or(ClassifierError::Missing("map COUNTERS"))?;
        let arr: PerCpuArray<_, CounterValue> = map.try_into().map_err(map_err("COUNTERS"))?;
        Counter::ALL
            .iter()
            .map(|c| {
                let per_cpu = arr.get(&(*c as u32), 0).map_err(map_err("COUNTERS"))?;
                let total = per_cpu
                    .iter()
                    .fold(CounterValue::default(), |a, v| CounterValue {
                        packets: a.packets + v.packets,
                        bytes: a.bytes + v.bytes,
                    });
                Ok((*c, total))
            })
            .collect()
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, ClassifierError> {
        self.ebpf
            .map_mut(name)
            .ok_or(ClassifierError::Missing(name))
    }
}

/// The classifier program of a loaded object.
fn xdp_mut(ebpf: &mut Ebpf) -> Result<&mut Xdp, ClassifierError> {
    ebpf.program_mut(PROGRAM)
        .ok_or(ClassifierError::Missing("XDP program"))?
        .try_into()
        .map_err(program_err)
}

/// The XDP flow map, owned by the thread that installs verdicts.
pub struct FlowVerdicts(HashMap<aya::maps::MapData, FlowKey, u32>);

impl FlowVerdicts {
    /// Installs a verdict for one direction of a flow.
    pub fn set(&mut self, key: &FlowKey, verdict: u32) -> Result<(), ClassifierError> {
        self.0.insert(key, verdict, 0).map_err(map_err("FLOWS"))
    }

    /// Forgets one direction of a flow (gone already is fine: the map is
    /// an LRU and may have evicted it).
    pub fn remove(&mut self, key: &FlowKey) -> Result<(), ClassifierError> {
        match self.0.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err("FLOWS")(e)),
        }
    }
}

/// The XDP program's handshake records, read by the workers.
pub struct RecordedHandshakes {
    opened: HashMap<aya::maps::MapData, FlowKey, Handshake>,
    half_open: HashMap<aya::maps::MapData, FlowKey, Handshake>,
}

impl std::fmt::Debug for RecordedHandshakes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecordedHandshakes")
    }
}

impl HandshakeRecords for RecordedHandshakes {
    fn lookup(&self, key: &FlowKey) -> Option<Recorded> {
        // Keyed by the SYN's direction: the frame went that way (from the
        // client) or the other (from the server). A connection's first
        // data comes after the client's ACK: the opened ones first.
        let reversed = key.reversed();
        let tries = [
            (&self.opened, key, true),
            (&self.opened, &reversed, false),
            (&self.half_open, key, true),
            (&self.half_open, &reversed, false),
        ];
        let (h, from_client) = tries
            .into_iter()
            .find_map(|(map, k, from_client)| map.get(k, 0).ok().map(|h| (h, from_client)))?;
        Some(recorded(&h, from_client, monotonic_ns()))
    }
}

/// A record as the sessions take it; lengths beyond the arrays (never
/// written so by the program) are cut to them.
fn recorded(h: &Handshake, from_client: bool, now_ns: u64) -> Recorded {
    let syn = usize::from(h.syn_len).min(HANDSHAKE_FRAME_MAX);
    let synack = usize::from(h.synack_len).min(HANDSHAKE_FRAME_MAX);
    let ack = usize::from(h.ack_len).min(HANDSHAKE_FRAME_MAX);
    Recorded {
        from_client,
        // Slot 0 is the inside interface, 1 the outside.
        client: if h.client_slot == 0 {
            Side::Inside
        } else {
            Side::Outside
        },
        steered: h.steered != 0,
        syn: h.syn[..syn].to_vec(),
        synack: (synack > 0).then(|| h.synack[..synack].to_vec()),
        ack: (ack > 0).then(|| h.ack[..ack].to_vec()),
        age: std::time::Duration::from_nanos(now_ns.saturating_sub(h.syn_ns)),
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`, which we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}
