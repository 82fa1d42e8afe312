//! Engine lifecycle: check privileges and interfaces, load and configure
//! the XDP classifier, bind the AF_XDP sockets, attach, run the workers,
//! publish stats, and on stop tear everything down in order.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use loupe_hsm::{
    audit::{AuditConfig, AuditLog, AuditSink, Entry, Kind},
    ca::list_cas,
    master::MasterKey,
    signer::{Signer, SignerConfig},
    token::Token,
};
use thiserror::Error;

use crate::{
    api::{Api, EngineRequest},
    config::{EngineConfig, HsmSettings},
    ebpf::{Classifier, ClassifierError, FlowVerdicts},
    export::Exporter,
    flow::{FlowLogEntry, MapOp, Sharder, Side},
    policy::{Policy, PolicyCell, Steering},
    session::{opening::HandshakeRecords, SessionSettings},
    stats::{
        IfaceReport, PolicyInfo, StatsReport, SteeringReport, TlsReport, WorkerReport,
        STATS_VERSION,
    },
    sys::{self, SysError},
    tls::{
        context::{CaSet, TlsContext},
        tickets::{Sealer, TicketKeys},
    },
    worker::{Crossbar, SplitLinks, Worker, WorkerShared},
    xsk::{QueuePort, XskError},
};

#[derive(Debug, Error)]
pub enum EngineError {
    #[error(transparent)]
    Sys(#[from] SysError),
    #[error(transparent)]
    Classifier(#[from] ClassifierError),
    #[error(transparent)]
    Xsk(#[from] XskError),
    #[error("inside and outside must be two different interfaces (both are '{0}')")]
    SameInterface(String),
    #[error(
        "--queues {asked} exceeds the RX queues available ({inside}: {in_q}, {outside}: {out_q})"
    )]
    Queues {
        asked: u32,
        inside: String,
        in_q: u32,
        outside: String,
        out_q: u32,
    },
    #[error(
        "--queues {asked} serves {asked} of the {available} RX queues: steered frames arriving on \
         the others would pass uninspected, past every block rule. Serve them all (leave out \
         --queues), or lower the interfaces' queue counts (ethtool -L IFACE combined {asked})"
    )]
    QueuesUnserved { asked: u32, available: u32 },
    #[error(
        "the MTU of '{iface}' ({mtu}) makes frames of up to {frame} bytes, more than the AF_XDP \
         port carries ({max}: {descs} UMEM frames); lower the MTU to {fits} or less"
    )]
    Mtu {
        iface: String,
        mtu: u32,
        frame: u32,
        max: u32,
        descs: u32,
        fits: u32,
    },
    #[error("cannot write stats to {path}: {source}")]
    Stats {
        path: String,
        source: std::io::Error,
    },
    #[error("worker {0} stopped unexpectedly (panicked); the engine stopped with it")]
    WorkerDied(usize),
    #[error("cannot start a worker (thread or eventfd): {0}")]
    Spawn(std::io::Error),
    #[error("HSM: {0}")]
    Hsm(#[from] loupe_hsm::HsmError),
    #[error("TLS interception: {0}")]
    Tls(String),
    #[error("decrypted-plaintext export: {0}")]
    Export(String),
    #[error("control socket {path}: {source}")]
    Api {
        path: String,
        source: std::io::Error,
    },
}

/// Bytes a frame carries on top of the MTU: Ethernet header and two VLAN
/// tags (the most the classifier walks).
const L2_OVERHEAD: u32 = 14 + 2 * 4;

/// Opens the audit log (sealed with the first token's audit key) and starts
/// the signer service.
/// The signer service and its audit log. Dropped (a start that fails
/// after it) in this order: the signer's threads hold audit sinks, and
/// the log waits for every sink before it closes.
struct HsmService {
    signer: Signer,
    log: AuditLog,
}

fn start_hsm(h: &HsmSettings) -> Result<HsmService, EngineError> {
    let first = h
        .tokens
        .first()
        .ok_or_else(|| loupe_hsm::HsmError::Invalid("the HSM settings name no token".into()))?;
    let audit_token = Token::open(first)?;
    let log = AuditLog::open(AuditConfig::new(&h.audit_log, Some(audit_token)))?;
    let mut sc = SignerConfig::new(h.tokens.clone());
    sc.threads_per_token = h.threads_per_token;
    sc.batch = h.batch;
    sc.cpus = h.cpus.clone();
    let signer = Signer::start(sc, Some(log.sink()))?;
    Ok(HsmService { signer, log })
}

/// Secrets sealed and opened with the first token's master key for one
/// use (`context`), each use audited: the ticket keys' file, the key
/// logs' data key.
struct HsmSealer {
    token: Token,
    audit: AuditSink,
    context: &'static str,
}

/// What the sealed ticket keys are for (bound into the seal).
const TICKET_KEYS: &str = "tls ticket keys";

impl HsmSealer {
    fn master(&self) -> MasterKey<'_> {
        MasterKey {
            token: &self.token,
            audit: &self.audit,
            requester: "loupe-dataplane".into(),
        }
    }

    /// Makes the master key if the token has none yet.
    fn ensure(&self) -> Result<(), String> {
        self.master().ensure().map(drop).map_err(|e| e.to_string())
    }
}

impl Sealer for HsmSealer {
    fn seal(&self, secret: &[u8]) -> Result<Vec<u8>, String> {
        self.master()
            .seal(self.context, secret)
            .map_err(|e| e.to_string())
    }
    fn open(&self, blob: &[u8]) -> Result<Vec<u8>, String> {
        self.master()
            .open(self.context, blob)
            .map_err(|e| e.to_string())
    }
}

/// How often the engine re-reads the CAs from the token (a `loupe ca
/// rotate` takes effect within this).
const CA_REFRESH: Duration = Duration::from_secs(10);

/// The active CAs on `token`.
fn read_cas(token: &Token) -> Result<CaSet, String> {
    list_cas(token)
        .map_err(|e| e.to_string())
        .and_then(|l| CaSet::from_list(token.label(), &l))
}

/// The TLS interception context: the CAs read from every token the
/// signer serves (a profile mints with its own token's, the first
/// token's by default), the signer's handle. A token without CAs leaves
/// its profiles' decryption unavailable (their `hsm_unavailable`
/// decides), said once at start. Returns the tokens it read.
fn start_tls(
    cfg: &EngineConfig,
    h: &HsmSettings,
    signer: &Signer,
    audit: AuditSink,
) -> Result<(Arc<TlsContext>, Vec<Token>), EngineError> {
    let first = &h.tokens[0];
    // The signer logged in to every token it serves (the first one
    // always: it does not start without it): their CAs are read through
    // those, and a token it left out (a wrong PIN) is not logged into
    // again.
    let served = signer.served();
    let token = served
        .first()
        .cloned()
        .ok_or_else(|| EngineError::Tls(format!("the signer serves no token {:?}", first.label)))?;
    let unread = |t: &Token, e: String| {
        eprintln!(
            "loupe-dataplane: warning: the decryption profiles of token {:?} cannot mint: {e}",
            t.label()
        );
        CaSet::empty(t.label())
    };
    let cas = read_cas(&token).unwrap_or_else(|e| unread(&token, e));
    let label = first.label.clone();
    let export_audit = audit.clone();
    let on_keylog = Box::new(move |profile: &str, path: &str| {
        let entry = Entry::now(
            Kind::KeyLog,
            &label,
            "(tls session secrets)",
            &format!("profile {profile:?} writes TLS session secrets, sealed, to {path}"),
            "loupe-dataplane",
        );
        if let Err(e) = audit.record(vec![entry]) {
            eprintln!("loupe-dataplane: warning: cannot audit the key log: {e}");
        }
    });
    let mut ctx = TlsContext::new(
        cfg.tls.clone(),
        Some(Arc::new(signer.handle())),
        cas,
        on_keylog,
    )
    .map_err(EngineError::Tls)?
    .with_token(&first.label);
    for t in served.iter().skip(1) {
        ctx.set_cas(read_cas(t).unwrap_or_else(|e| unread(t, e)));
    }
    // Key logs are sealed: a data key per run, sealed by the first
    // token's master key (made on first use), when a profile first
    // turns one on.
    let keylog = HsmSealer {
        token: token.clone(),
        audit: export_audit.clone(),
        context: loupe_hsm::keylog::CONTEXT,
    };
    ctx = ctx.with_keylog_seal(Arc::new(move |key: &[u8]| {
        keylog.ensure()?;
        keylog.seal(key)
    }));
    for (label, why) in signer.refused() {
        ctx.set_cas(CaSet::unavailable(&label, &why));
    }
    if let Some(path) = &cfg.tls.ticket_keys {
        let sealer = Arc::new(HsmSealer {
            token: token.clone(),
            audit: export_audit.clone(),
            context: TICKET_KEYS,
        });
        sealer
            .ensure()
            .map_err(|e| EngineError::Tls(format!("the master key for --ticket-keys: {e}")))?;
        let lifetime = cfg.tls.ticket_lifetime.as_secs().min(u64::from(u32::MAX)) as u32;
        let (keys, said) = TicketKeys::kept_in(path, sealer, lifetime).map_err(EngineError::Tls)?;
        eprintln!("loupe-dataplane: {said}");
        ctx = ctx
            .with_ticket_keys(Arc::new(keys))
            .map_err(EngineError::Tls)?;
    }
    if cfg.export.enabled() {
        if let Some(m) = &cfg.export.mirror {
            if *m == cfg.inside || *m == cfg.outside {
                return Err(EngineError::Export(format!(
                    "the mirror port {m} is one of the engine's own interfaces"
                )));
            }
        }
        let exporter = Exporter::start(&cfg.export).map_err(EngineError::Export)?;
        let entry = Entry::now(
            Kind::Export,
            &first.label,
            "(decrypted plaintext)",
            exporter.describe(),
            "loupe-dataplane",
        );
        // Enabling it is on record, or it is not enabled.
        export_audit
            .record(vec![entry])
            .map_err(|e| EngineError::Export(format!("cannot audit enabling it: {e}")))?;
        println!("loupe-dataplane: {}", exporter.describe());
        ctx = ctx.with_exporter(exporter);
    }
    Ok((Arc::new(ctx), served))
}

/// Run the engine until `stop` is set. `on_ready` is called once, after the
/// program is attached and every worker runs. Returns the final report.
pub fn run(
    cfg: &EngineConfig,
    stop: Arc<AtomicBool>,
    on_ready: impl FnOnce(&StatsReport),
) -> Result<StatsReport, EngineError> {
    sys::check_privileges()?;
    if cfg.inside == cfg.outside {
        return Err(EngineError::SameInterface(cfg.inside.clone()));
    }
    let inside_idx = sys::ifindex(&cfg.inside)?;
    let outside_idx = sys::ifindex(&cfg.outside)?;
    let in_q = sys::rx_queue_count(&cfg.inside)?;
    let out_q = sys::rx_queue_count(&cfg.outside)?;
    let available = in_q.min(out_q);
    // Every queue is served: frames steered on a queue without a socket
    // go on unchanged (the XDP program cannot hand them to anyone), so
    // fewer would let some connections skip inspection.
    match cfg.queues {
        Some(q) if q > available => {
            return Err(EngineError::Queues {
                asked: q,
                inside: cfg.inside.clone(),
                in_q,
                outside: cfg.outside.clone(),
                out_q,
            })
        }
        Some(q) if q < available => {
            return Err(EngineError::QueuesUnserved {
                asked: q,
                available,
            })
        }
        _ => {}
    }
    let queues = available;
    // A frame longer than one UMEM frame comes as a chain (multi-buffer);
    // one longer than a chain may be could not be sent on again: refuse
    // such MTUs up front.
    let max = cfg.port.max_packet_len();
    let mut link_mtu = u32::MAX;
    for iface in [&cfg.inside, &cfg.outside] {
        let mtu = sys::mtu(iface)?;
        link_mtu = link_mtu.min(mtu);
        let frame = mtu + L2_OVERHEAD;
        if frame > max {
            return Err(EngineError::Mtu {
                iface: iface.clone(),
                mtu,
                frame,
                max,
                descs: crate::xsk::MAX_FRAME_DESCS,
                fits: max.saturating_sub(L2_OVERHEAD),
            });
        }
    }
    // The HSM before the wire: a wrong PIN or a missing token stops the
    // start here, before anything is attached.
    let hsm = match &cfg.hsm {
        Some(h) => Some(start_hsm(h)?),
        None => None,
    };
    let tls = match (&cfg.hsm, &hsm) {
        (Some(h), Some(HsmService { signer, log })) => Some(start_tls(cfg, h, signer, log.sink())?),
        _ => None,
    };
    let tls_ctx = tls.as_ref().map(|(c, _)| c.clone());

    // Kernels since 5.11 charge BPF maps and UMEMs to the memory cgroup;
    // older ones need the rlimit lifted. Where it cannot be (no
    // CAP_SYS_RESOURCE), the UMEM error below says so.
    let _ = sys::raise_memlock();

    // The handshake fast path only where the workers track connections
    // and so read its records.
    let sessions = cfg.tcp_split || cfg.api.is_some();
    let fast_handshakes = sessions && cfg.handshake_fast_path;
    let mut classifier = Classifier::load_with(fast_handshakes)?;
    classifier.set_interfaces(inside_idx, outside_idx)?;
    classifier.set_steering(&cfg.steer_ports, &cfg.steer_prefixes, &cfg.exempt_prefixes)?;
    let handshakes: Option<Arc<dyn HandshakeRecords>> = if fast_handshakes {
        classifier.set_handshake_fast_path(true)?;
        Some(Arc::new(classifier.take_handshakes()?))
    } else {
        None
    };

    // Sockets first, so steered frames find them from the first one on.
    let workers = queues as usize;
    let sharder = Sharder::new(workers);
    let crossbar = Arc::new(Crossbar::new(workers).map_err(EngineError::Spawn)?);
    let mut pending = Vec::with_capacity(workers);
    let (ops_tx, ops_rx) = crossbeam::channel::bounded::<MapOp>(65_536);
    let (events_tx, events_rx) = crossbeam::channel::bounded::<FlowLogEntry>(65_536);
    let (req_tx, req_rx) = crossbeam::channel::bounded::<EngineRequest>(64);
    let cell = Arc::new(PolicyCell::default());
    if cfg.tcp_split {
        cell.publish(Arc::new(Policy::split_all(
            &cfg.steer_ports,
            cfg.split_exempt_sni.clone(),
        )));
    }

    let budget = Arc::new(crate::tcp::budget::MemoryBudget::new(cfg.split_memory));
    for q in 0..queues {
        let port = bind_port(cfg, q)?;
        classifier.register_socket(Side::Inside, q, port.fd(Side::Inside))?;
        classifier.register_socket(Side::Outside, q, port.fd(Side::Outside))?;
        let shared = Arc::new(WorkerShared::default());
        let mut worker = Worker::new(
            q as usize,
            port,
            sharder.clone(),
            crossbar.clone(),
            cfg.max_flows_per_worker,
            cfg.flow_idle_timeout,
            shared.clone(),
        );
        worker.set_idle_policy(crate::worker::IdlePolicy {
            busy_poll: cfg.busy_poll,
            spin: cfg.idle_spin,
            give_way: cfg.yield_every,
        });
        if sessions {
            worker.enable_split(SplitLinks {
                settings: SessionSettings {
                    max_flows: cfg.max_flows_per_worker,
                    idle: cfg.flow_idle_timeout,
                    hold_bytes: cfg.hold_bytes,
                    hold_timeout: cfg.hold_timeout,
                    drain: cfg.drain_timeout,
                    tls: tls_ctx.clone(),
                    buffer_max: cfg.split_buffer_max,
                    budget: budget.clone(),
                    congestion: cfg.split_congestion,
                    mtu: Some(link_mtu),
                    handshakes: handshakes.clone(),
                    mid_flow: cfg.mid_flow,
                    ..SessionSettings::default()
                },
                ops: ops_tx.clone(),
                events: cfg.api.is_some().then(|| events_tx.clone()),
                policy: cell.clone(),
            });
        }
        pending.push((worker, shared));
    }
    drop(events_tx);
    // The socket before the wire: a socket another process serves stops
    // the start here, before anything is attached.
    let api = match &cfg.api {
        Some(a) => Some(
            Api::start(a, req_tx.clone(), cell.clone(), events_rx, tls_ctx.clone()).map_err(
                |source| EngineError::Api {
                    path: a.socket.display().to_string(),
                    source,
                },
            )?,
        ),
        None => None,
    };
    drop(req_tx);
    // Without a socket nothing ever asks: a channel that never delivers,
    // rather than a disconnected one that is always ready.
    let req_rx = if api.is_some() {
        req_rx
    } else {
        crossbeam::channel::never()
    };
    let attached = classifier
        .attach(&cfg.inside, cfg.mode)
        .and_then(|()| classifier.attach(&cfg.outside, cfg.mode));
    if let Err(e) = attached {
        if let Some(api) = api {
            api.stop();
        }
        return Err(e.into());
    }

    let mut flows = classifier.take_flow_map()?;
    let started = Instant::now();
    let base = StatsReport {
        version: STATS_VERSION,
        state: "running".into(),
        pid: std::process::id(),
        uptime_ms: 0,
        xdp_mode: cfg.mode.label().into(),
        program_id: classifier.program_id(),
        inside: IfaceReport {
            name: cfg.inside.clone(),
            ifindex: inside_idx,
        },
        outside: IfaceReport {
            name: cfg.outside.clone(),
            ifindex: outside_idx,
        },
        // (steering: filled in by each snapshot, from what the maps hold)
        ..Default::default()
    };

    let workers_stop = Arc::new(AtomicBool::new(false));
    let cpus = sys::cpu_count();
    let mut handles = Vec::with_capacity(workers);
    let mut shares = Vec::with_capacity(workers);
    for (mut worker, shared) in pending {
        let id = shares.len();
        let stop = workers_stop.clone();
        let pin = cfg.pin_workers;
        let handle = thread::Builder::new()
            .name(format!("loupe-w{id}"))
            .spawn(move || {
                if pin {
                    let cpu = id % cpus;
                    match sys::pin_current_thread(cpu) {
                        Ok(()) => worker.set_cpu(Some(cpu)),
                        Err(e) => eprintln!(
                            "loupe-dataplane: warning: cannot pin worker {id} to CPU {cpu}: {e}"
                        ),
                    }
                }
                worker.run(&stop);
            })
            .map_err(EngineError::Spawn);
        let handle = match handle {
            Ok(h) => h,
            Err(e) => {
                workers_stop.store(true, Ordering::Relaxed);
                for h in handles {
                    let _ = thread::JoinHandle::join(h);
                }
                return Err(e);
            }
        };
        handles.push(handle);
        shares.push(shared);
    }

    // The steering the classifier's maps hold now.
    let mut steering = Steering {
        ports: cfg.steer_ports.clone(),
        prefixes: cfg.steer_prefixes.clone(),
        exempt: cfg.exempt_prefixes.clone(),
        quic: Vec::new(),
    };
    let snapshot = |state: &str, steering: &Steering, classifier: &Classifier| -> StatsReport {
        let mut r = base.clone();
        r.steering = SteeringReport::from(steering);
        r.policy = cell.current().map(|p| PolicyInfo {
            version: p.version,
            digest: p.digest.clone(),
            source: p.source.clone(),
            rules: p.rules.len(),
            default_action: p.default_action.label().into(),
        });
        r.state = state.into();
        r.uptime_ms = started.elapsed().as_millis() as u64;
        if let Ok(counters) = classifier.counters() {
            for (c, v) in counters {
                r.xdp.insert(
                    c.label().into(),
                    crate::flow::table::SideCount {
                        packets: v.packets,
                        bytes: v.bytes,
                    },
                );
            }
        }
        if let Some(HsmService { signer, log }) = &hsm {
            r.hsm = signer.health();
            r.audit = Some(log.health());
        }
        r.tls = tls_ctx.as_deref().map(TlsReport::of);
        r.workers = shares
            .iter()
            .map(|s| {
                s.report
                    .lock()
                    .map(|g| g.clone())
                    .unwrap_or_else(|_| WorkerReport::default())
            })
            .collect();
        r
    };
    // The stats file lists flows: readable by the control socket's group.
    let stats_group = cfg.api.as_ref().and_then(|a| a.access.group);
    let write = |r: &StatsReport| -> Result<(), EngineError> {
        match &cfg.stats_file {
            Some(path) => r
                .write_atomic(path, stats_group)
                .map_err(|source| EngineError::Stats {
                    path: path.display().to_string(),
                    source,
                }),
            None => Ok(()),
        }
    };

    // A stats file that cannot be written at start is a configuration
    // error; one that fails later (disk full) must not stop the traffic.
    let first = snapshot("running", &steering, &classifier);
    let mut result = write(&first);
    if result.is_ok() {
        on_ready(&first);
    }
    let mut last_write = Instant::now();
    // The CAs are re-read and the ticket keys rotated on a thread of
    // their own: a call to a hung HSM there must not stop this loop (the
    // stats, the control socket, SIGTERM).
    let refresher = tls.as_ref().and_then(|(ctx, tokens)| {
        Refresher::start(ctx.clone(), tokens.clone())
            .map_err(|e| {
                eprintln!(
                    "loupe-dataplane: warning: cannot start the CA refresh thread ({e}): CA \
                     rotations need a restart"
                )
            })
            .ok()
    });
    let mut write_failing = false;
    while result.is_ok() && !stop.load(Ordering::Relaxed) {
        if let Some(dead) = handles.iter().position(|h| h.is_finished()) {
            result = Err(EngineError::WorkerDied(dead));
            break;
        }
        // Released flows leave userspace: both directions bypass in XDP,
        // as soon as a worker asks (every frame before that is one more
        // through userspace); requests from the control socket are
        // answered as they come; otherwise wake every 20 ms for the rest.
        crossbeam::select! {
            recv(ops_rx) -> op => {
                if let Ok(op) = op {
                    map_op(&mut flows, op);
                }
            }
            recv(req_rx) -> req => {
                if let Ok(req) = req {
                    match req {
                        EngineRequest::Status(tx) => {
                            let _ = tx.send(snapshot("running", &steering, &classifier));
                        }
                        EngineRequest::Apply(policy, tx) => {
                            let r = apply(&mut classifier, &cell, &mut steering, tls_ctx.as_deref(), policy);
                            let _ = tx.send(r);
                        }
                    }
                }
            }
            default(Duration::from_millis(20)) => {}
        }
        for op in ops_rx.try_iter() {
            map_op(&mut flows, op);
        }
        if last_write.elapsed() >= cfg.stats_interval {
            last_write = Instant::now();
            match write(&snapshot("running", &steering, &classifier)) {
                Ok(()) if write_failing => {
                    write_failing = false;
                    eprintln!("loupe-dataplane: stats file writable again");
                }
                Ok(()) => {}
                Err(e) if !write_failing => {
                    write_failing = true;
                    eprintln!("loupe-dataplane: warning: {e} (traffic is unaffected)");
                }
                Err(_) => {}
            }
        }
    }

    // The workers stop their connections (a drain, then resets); their
    // requests to the flow map are still served meanwhile. Then the
    // program goes, and they take what is left in their rings.
    workers_stop.store(true, Ordering::Relaxed);
    while !crossbar.all_stopped() && !handles.iter().any(|h| h.is_finished()) {
        if let Ok(op) = ops_rx.recv_timeout(Duration::from_millis(20)) {
            map_op(&mut flows, op);
        }
    }
    if let Some(r) = refresher {
        r.stop();
    }
    if let Err(e) = classifier.detach() {
        eprintln!("loupe-dataplane: warning: detaching the XDP program: {e}");
    }
    crossbar.set_detached();
    let mut died = None;
    for (id, h) in handles.into_iter().enumerate() {
        if h.join().is_err() {
            died.get_or_insert(id);
        }
    }
    // The copies of what the workers decrypted are written out before
    // the final report counts them.
    if let Some(e) = tls_ctx.as_ref().and_then(|c| c.export.as_ref()) {
        e.stop();
    }
    let last = snapshot("stopped", &steering, &classifier);
    if let Some(api) = api {
        api.stop();
    }
    // Detach the program and close every map and socket before reporting.
    drop(classifier);
    if let Some((ctx, _)) = &tls {
        ctx.stop();
    }
    // The context holds an audit sink (for key log records): it goes
    // before the audit log is closed, which waits for every sink.
    drop(tls);
    drop(tls_ctx);
    if let Some(HsmService { signer, log }) = hsm {
        // Answer what is queued, then seal the audit log.
        signer.shutdown();
        if let Err(e) = log.close() {
            eprintln!("loupe-dataplane: warning: {e}");
        }
    }
    let final_write = write(&last);
    result?;
    if let Some(id) = died {
        return Err(EngineError::WorkerDied(id));
    }
    final_write?;
    Ok(last)
}

/// Carries out a worker's change to the XDP flow map, both directions.
fn map_op(flows: &mut FlowVerdicts, op: MapOp) {
    use loupe_common::verdict::{BYPASS, STEER};
    let (key, verdict) = match op {
        MapOp::Bypass(k) => (k, Some(BYPASS)),
        MapOp::Steer(k) => (k, Some(STEER)),
        MapOp::Forget(k) => (k, None),
    };
    for k in [key, key.reversed()] {
        let done = match verdict {
            Some(v) => flows.set(&k, v),
            None => flows.remove(&k),
        };
        if let Err(e) = done {
            eprintln!("loupe-dataplane: warning: cannot update a flow in XDP: {e}");
        }
    }
}

/// The thread that re-reads the CAs every [`CA_REFRESH`] and rotates the
/// kept ticket keys (both ask the HSM).
struct Refresher {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Refresher {
    fn start(ctx: Arc<TlsContext>, tokens: Vec<Token>) -> std::io::Result<Refresher> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("loupe-refresh".into())
            .spawn(move || {
                let mut last = Instant::now();
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                    if last.elapsed() >= CA_REFRESH {
                        last = Instant::now();
                        for token in &tokens {
                            refresh_cas(&ctx, token);
                        }
                        ctx.tick();
                    }
                }
            })?;
        Ok(Refresher { stop, thread })
    }

    /// Stops it; one inside a call to a hung HSM is left behind after a
    /// few seconds.
    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(3);
        if loupe_hsm::join_by(self.thread, deadline).is_err() {
            eprintln!(
                "loupe-dataplane: the CA refresh is still inside a call to the HSM: left behind"
            );
        }
    }
}

/// Re-reads the CAs from the token: a rotation (new generation) takes
/// effect, and empties the certificate cache.
fn refresh_cas(ctx: &TlsContext, token: &Token) {
    let label = token.label().to_string();
    match read_cas(token) {
        Ok(set) => {
            let generation = set.generation;
            if ctx.set_cas(set) {
                eprintln!("loupe-dataplane: CA generation {generation} of token {label:?} in use");
            }
        }
        // A token that is down keeps the CAs read before; the signer
        // reports its health.
        Err(e) if ctx.cas_for(Some(&label)).generation == 0 => {
            eprintln!(
                "loupe-dataplane: warning: the decryption profiles of token {label:?} cannot \
                 mint: {e}"
            )
        }
        Err(_) => {}
    }
}

/// Swaps in a new policy: validated again (control is not trusted
/// blindly), its decryption profiles prepared (trust stores read, key logs
/// opened), the steering maps rewritten, then the workers' policy
/// replaced; they pick it up before their next batch. A policy that fails
/// anywhere leaves the running one (and its steering) in place; a profile
/// that cannot be prepared is not such a failure (the policy applies, and
/// that profile's connections are blocked, saying why): the answer says
/// which, as warnings.
fn apply(
    classifier: &mut Classifier,
    cell: &PolicyCell,
    steered: &mut Steering,
    tls: Option<&TlsContext>,
    policy: Arc<Policy>,
) -> Result<(u64, Vec<String>), String> {
    policy.validate()?;
    if let Some(cur) = cell.current() {
        if policy.version <= cur.version {
            return Err(format!(
                "policy version {} is not above the running version {}",
                policy.version, cur.version
            ));
        }
    }
    let mut warnings = Vec::new();
    if let Some(ctx) = tls {
        // A broken profile fails closed on its own connections; the rest
        // of the policy (its blocks above all) still applies.
        for why in ctx.prepare(&policy) {
            let line = format!("{why}; its connections are blocked");
            eprintln!("loupe-dataplane: error: {line}");
            warnings.push(line);
        }
    }
    let st = policy.steering()?;
    let set = |c: &mut Classifier, s: &Steering| {
        c.set_steering(&s.ports, &s.prefixes, &s.exempt)
            .and_then(|()| c.set_quic_block(&s.quic))
    };
    if let Err(e) = set(classifier, &st) {
        if let Err(back) = set(classifier, steered) {
            eprintln!(
                "loupe-dataplane: error: the steering maps could not be restored after a failed \
                 apply ({back}); steering may be partial until the next successful apply"
            );
        }
        return Err(format!("cannot update the steering maps: {e}"));
    }
    *steered = st;
    let version = policy.version;
    cell.publish(policy);
    Ok((version, warnings))
}

/// How long a start waits for a queue that is still bound (EBUSY).
const BIND_BUSY_WAIT: Duration = Duration::from_secs(10);

/// The AF_XDP sockets of queue `q`. A queue whose sockets an engine that
/// just stopped still holds (the kernel releases them after the program's
/// maps, a moment after the process is gone: a restart met it) is retried
/// for up to [`BIND_BUSY_WAIT`]; another engine running keeps it busy, and
/// the error then names it. The kernel unregisters a socket's queue in
/// deferred work under the RTNL lock (`xp_release_deferred`), which a host
/// tearing down network namespaces can hold for seconds (a restart in the
/// parallel test suite failed once, its cause not recorded; 3 s was the
/// wait then).
fn bind_port(cfg: &EngineConfig, q: u32) -> Result<QueuePort, EngineError> {
    let started = Instant::now();
    loop {
        match QueuePort::new(&cfg.inside, &cfg.outside, q, cfg.port) {
            Err(e) if is_busy(&e) && started.elapsed() < BIND_BUSY_WAIT => {
                std::thread::sleep(Duration::from_millis(20));
            }
            r => return Ok(r?),
        }
    }
}

/// Whether an error comes down to EBUSY.
fn is_busy(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.raw_os_error() == Some(libc::EBUSY) {
                return true;
            }
        }
        cur = err.source();
    }
    false
}
