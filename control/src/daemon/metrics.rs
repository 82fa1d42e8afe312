//! Prometheus text-format metrics (exposition format 0.0.4) on a loopback
//! address: the dataplane's counters as of the scrape, and the control
//! process's own.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

use loupe_dataplane::stats::StatsReport;

/// What the control process counts itself.
#[derive(Clone, Debug, Default)]
pub struct ControlCounters {
    /// Connection records written to the flow log, by (action, end).
    pub records: BTreeMap<(String, String), u64>,
    /// HTTP request records, by (method, status): methods outside the
    /// standard ones count as `other`, a request never answered as `none`.
    pub http: BTreeMap<(String, String), u64>,
    /// HTTP requests a URL rule matched, by (rule, action).
    pub url_rules: BTreeMap<(String, String), u64>,
    /// Signature match records, by (signature, action).
    pub signatures: BTreeMap<(String, String), u64>,
    /// Anomaly records (an inspector stopped on a connection).
    pub anomalies: u64,
    pub log_errors: u64,
    pub dataplane_reconnects: u64,
    pub applies_ok: u64,
    pub applies_rejected: u64,
    /// The desired policy's version and whether the dataplane runs it.
    pub desired_version: Option<u64>,
    pub in_sync: bool,
}

/// The decrypted-plaintext exporter's counters.
fn export_metrics(o: &mut Out, e: &loupe_dataplane::export::ExportReport) {
    o.one(
        "loupe_export_connections_total",
        "counter",
        "Decrypted connections copied to the pcap files or the mirror port.",
        e.connections,
    );
    o.head(
        "loupe_export_dropped_total",
        "counter",
        "Plaintext chunks the exporter lost (its queue full; decryption never waits), \
         and mirror frames the interface did not take.",
    );
    o.sample(
        "loupe_export_dropped_total",
        &[("what", "chunks")],
        e.events_dropped,
    );
    o.sample(
        "loupe_export_dropped_total",
        &[("what", "mirror-frames")],
        e.mirror_dropped,
    );
    o.sample(
        "loupe_export_dropped_total",
        &[("what", "pcap-frames")],
        e.pcap_frames_lost,
    );
    o.one(
        "loupe_export_dropped_bytes_total",
        "counter",
        "Plaintext bytes in the chunks the exporter lost.",
        e.bytes_dropped,
    );
    o.head(
        "loupe_export_frames_total",
        "counter",
        "Synthetic frames written, by destination.",
    );
    o.sample(
        "loupe_export_frames_total",
        &[("sink", "pcap")],
        e.pcap_packets,
    );
    o.sample(
        "loupe_export_frames_total",
        &[("sink", "mirror")],
        e.mirror_frames,
    );
    o.one(
        "loupe_export_pcap_disk_bytes",
        "gauge",
        "Bytes the ring of capture files takes on disk.",
        e.pcap_disk_bytes,
    );
    o.one(
        "loupe_export_pcap_write_errors_total",
        "counter",
        "Failed writes to the capture files (the frames are lost, counted).",
        e.pcap_write_errors,
    );
}

struct Out(String);

impl Out {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let v = v
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(self.0, "{k}=\"{v}\"");
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }

    fn one(&mut self, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
        self.head(name, kind, help);
        self.sample(name, &[], value);
    }
}

/// The exposition text for one scrape.
pub fn render(dp: Option<&StatsReport>, ctl: &ControlCounters) -> String {
    let mut o = Out(String::new());
    o.one(
        "loupe_dataplane_up",
        "gauge",
        "Whether the control process reaches the dataplane.",
        u8::from(dp.is_some()),
    );
    o.one(
        "loupe_policy_in_sync",
        "gauge",
        "Whether the dataplane runs the policy control last applied.",
        u8::from(ctl.in_sync),
    );
    if let Some(v) = ctl.desired_version {
        o.one(
            "loupe_policy_desired_version",
            "gauge",
            "Version of the policy control holds.",
            v,
        );
    }
    o.one(
        "loupe_policy_applies_total",
        "counter",
        "Policies the dataplane accepted.",
        ctl.applies_ok,
    );
    o.one(
        "loupe_policy_rejections_total",
        "counter",
        "Policies refused (by the checks or by the dataplane); the running one stayed.",
        ctl.applies_rejected,
    );
    o.one(
        "loupe_dataplane_reconnects_total",
        "counter",
        "Times control (re)connected to the dataplane.",
        ctl.dataplane_reconnects,
    );
    o.head(
        "loupe_flow_log_records_total",
        "counter",
        "Connection records written to the flow log, by action and end.",
    );
    for ((action, end), n) in &ctl.records {
        o.sample(
            "loupe_flow_log_records_total",
            &[("action", action), ("end", end)],
            n,
        );
    }
    o.head(
        "loupe_http_requests_total",
        "counter",
        "HTTP requests seen in decrypted connections, by method and status.",
    );
    for ((method, status), n) in &ctl.http {
        o.sample(
            "loupe_http_requests_total",
            &[("method", method), ("status", status)],
            n,
        );
    }
    o.head(
        "loupe_url_rule_hits_total",
        "counter",
        "HTTP requests matched by a URL rule, by rule and action.",
    );
    for ((rule, action), n) in &ctl.url_rules {
        o.sample(
            "loupe_url_rule_hits_total",
            &[("rule", rule), ("action", action)],
            n,
        );
    }
    o.head(
        "loupe_signature_hits_total",
        "counter",
        "Content signature matches logged, by signature and action.",
    );
    for ((name, action), n) in &ctl.signatures {
        o.sample(
            "loupe_signature_hits_total",
            &[("signature", name), ("action", action)],
            n,
        );
    }
    o.one(
        "loupe_inspect_anomalies_total",
        "counter",
        "Decrypted connections an inspector stopped parsing (malformed, over a bound).",
        ctl.anomalies,
    );
    o.one(
        "loupe_flow_log_errors_total",
        "counter",
        "Flow log writes that failed.",
        ctl.log_errors,
    );
    let Some(r) = dp else {
        return o.0;
    };
    if let Some(p) = &r.policy {
        o.one(
            "loupe_policy_version",
            "gauge",
            "Version of the policy the dataplane runs.",
            p.version,
        );
    }
    o.one(
        "loupe_dataplane_uptime_seconds",
        "gauge",
        "Dataplane uptime.",
        r.uptime_ms as f64 / 1000.0,
    );
    o.head(
        "loupe_xdp_packets_total",
        "counter",
        "Frames by XDP path (fast path, steered, dropped...).",
    );
    for (path, c) in &r.xdp {
        o.sample("loupe_xdp_packets_total", &[("path", path)], c.packets);
    }
    o.head("loupe_xdp_bytes_total", "counter", "Bytes by XDP path.");
    for (path, c) in &r.xdp {
        o.sample("loupe_xdp_bytes_total", &[("path", path)], c.bytes);
    }
    o.head(
        "loupe_worker_packets_total",
        "counter",
        "Frames through the AF_XDP workers.",
    );
    for w in &r.workers {
        let id = w.id.to_string();
        for (dir, side, c) in [
            ("rx", "inside", w.counters.rx_inside),
            ("rx", "outside", w.counters.rx_outside),
            ("tx", "inside", w.counters.tx_inside),
            ("tx", "outside", w.counters.tx_outside),
        ] {
            o.sample(
                "loupe_worker_packets_total",
                &[("worker", &id), ("dir", dir), ("side", side)],
                c.packets,
            );
        }
    }
    let sp = r.split_total();
    o.head(
        "loupe_decisions_total",
        "counter",
        "Connections by what became of them at the decision point.",
    );
    for (outcome, n) in [
        ("split", sp.split),
        ("no-decrypt", sp.policy_pass),
        ("refused", sp.refused),
        ("hold-timeout", sp.hold_timeouts),
        ("hold-overflow", sp.hold_overflows),
        ("passthrough", sp.passthrough),
    ] {
        o.sample("loupe_decisions_total", &[("outcome", outcome)], n);
    }
    o.head(
        "loupe_handshakes_total",
        "counter",
        "Openings seen at the decision point.",
    );
    for (opening, n) in [
        ("client-hello", sp.hellos),
        ("not-tls", sp.not_tls),
        ("malformed-client-hello", sp.hello_malformed),
        ("server-first", sp.server_first),
    ] {
        o.sample("loupe_handshakes_total", &[("opening", opening)], n);
    }
    o.head(
        "loupe_handshake_records_total",
        "counter",
        "Connections whose handshake crossed in XDP: taken up from its record at the first steered frame, or not (the record unusable, or made before the first policy): then met as already running.",
    );
    for (outcome, n) in [
        ("adopted", sp.handshakes_adopted),
        ("unusable", sp.handshakes_unusable),
        ("before-policy", sp.handshakes_before),
    ] {
        o.sample("loupe_handshake_records_total", &[("outcome", outcome)], n);
    }
    o.one(
        "loupe_sni_malformed_total",
        "counter",
        "ClientHellos whose server name was malformed (two names, a NUL or non-ASCII byte, a repeated extension, a bad length or name type, not a DNS name); decided without it.",
        sp.sni_malformed,
    );
    o.one(
        "loupe_split_data_segments_in_total",
        "counter",
        "Segments with data received by the halves of ended splits.",
        sp.data_segments_in,
    );
    o.one(
        "loupe_split_pure_acks_out_total",
        "counter",
        "Segments without data (pure ACKs, window updates) sent by the halves of ended splits.",
        sp.pure_acks_out,
    );
    o.one(
        "loupe_hold_acks_total",
        "counter",
        "ACKs sent as the server during holds, for ClientHellos larger than the client's initial window.",
        sp.hold_acks,
    );
    o.one(
        "loupe_hold_timeouts_start_missing_total",
        "counter",
        "Holds that timed out still missing the client's first bytes (lost before the engine, or withheld).",
        sp.hold_timeouts_start_missing,
    );
    o.one(
        "loupe_hold_sacks_total",
        "counter",
        "Duplicate ACKs sent as the server during holds, when the client's first bytes were missing.",
        sp.hold_sacks,
    );
    o.one(
        "loupe_hold_refused_total",
        "counter",
        "Client segments dropped during holds because the server would refuse them.",
        sp.hold_refused,
    );
    o.one(
        "loupe_hold_conflicts_total",
        "counter",
        "Holds in which a byte came twice with different values (relayed, never passed).",
        sp.hold_conflicts,
    );
    o.one(
        "loupe_uninspectable_total",
        "counter",
        "Connections the policy would inspect but the engine could not follow from their start (seen mid-flow, evicted while held, no room), ended under --mid-flow drop.",
        sp.uninspectable,
    );
    o.one(
        "loupe_mid_flow_records_unwritten_total",
        "counter",
        "Records of flows seen mid-stream and reset not written: over 100 a second per worker (a flood of forged segments).",
        sp.mid_flow_unlogged,
    );
    o.one(
        "loupe_syns_on_live_connections_total",
        "counter",
        "SYNs on the ports of a live connection that the server answered with an ACK: the connection went on as it was.",
        sp.syns_on_live,
    );
    o.one(
        "loupe_syns_normalised_total",
        "counter",
        "Client SYNs sent on without their data, FIN, URG or TCP Fast Open option.",
        sp.syn_stripped,
    );
    o.one(
        "loupe_urgent_cleared_total",
        "counter",
        "Client segments before the decision sent on or held with URG cleared.",
        sp.urgent_cleared,
    );
    o.one(
        "loupe_split_active",
        "gauge",
        "Split connections now.",
        sp.active,
    );
    o.head(
        "loupe_split_bytes_total",
        "counter",
        "Bytes relayed by split connections.",
    );
    o.sample("loupe_split_bytes_total", &[("dir", "c2s")], sp.bytes_c2s);
    o.sample("loupe_split_bytes_total", &[("dir", "s2c")], sp.bytes_s2c);
    o.one(
        "loupe_split_retransmits_total",
        "counter",
        "Segments retransmitted by split halves.",
        sp.retransmits,
    );
    o.one(
        "loupe_flow_log_backlog",
        "gauge",
        "Flow records queued in the dataplane for control.",
        r.log_queue.backlog,
    );
    o.one(
        "loupe_flow_log_dropped_total",
        "counter",
        "Flow records lost in the dataplane (queue full).",
        r.log_queue.dropped + sp.log_dropped,
    );
    if let Some(t) = &r.tls {
        o.head(
            "loupe_tls_handshakes_total",
            "counter",
            "Decrypt connections by how their TLS handshakes ended.",
        );
        for (outcome, n) in [
            ("decrypted", t.decrypted),
            ("decrypted-untrusted", t.passed_on),
            ("blocked", t.blocked),
            ("no-decrypt", t.no_decrypt),
            ("failed", t.failed),
        ] {
            o.sample("loupe_tls_handshakes_total", &[("outcome", outcome)], n);
        }
        o.one(
            "loupe_tls_active",
            "gauge",
            "Connections in the TLS stage now.",
            t.active,
        );
        o.one(
            "loupe_tls_parked",
            "gauge",
            "Connections waiting for an HSM signature now.",
            t.parked,
        );
        o.head(
            "loupe_tls_cert_cache_total",
            "counter",
            "Certificate cache lookups by result.",
        );
        for (result, n) in [
            ("hit", t.cache_hits),
            ("miss", t.cache_misses),
            ("joined", t.cache_joined),
        ] {
            o.sample("loupe_tls_cert_cache_total", &[("result", result)], n);
        }
        o.one(
            "loupe_tls_cert_cache_size",
            "gauge",
            "Impersonation certificates held.",
            t.cached,
        );
        o.one(
            "loupe_tls_mint_failures_total",
            "counter",
            "Mints that failed (HSM refused or timed out, bad signature).",
            t.mint_failed,
        );
        o.one(
            "loupe_tls_ca_generation",
            "gauge",
            "The CA generation minting (0: none, decryption unavailable).",
            t.ca_generation,
        );
        o.one(
            "loupe_tls_excluded_sites",
            "gauge",
            "Sites in the decryption exclusion cache.",
            t.excluded,
        );
        let name = "loupe_tls_mint_latency_seconds";
        o.head(
            name,
            "histogram",
            "Time from submitting a certificate to the HSM to having it.",
        );
        let mut cumulative = 0;
        for (i, n) in t.mint_counts.iter().enumerate() {
            cumulative += n;
            let le = t
                .mint_bounds_us
                .get(i)
                .map_or("+Inf".to_string(), |us| format!("{}", *us as f64 / 1e6));
            o.sample(&format!("{name}_bucket"), &[("le", &le)], cumulative);
        }
        o.sample(&format!("{name}_sum"), &[], t.mint_sum_us as f64 / 1e6);
        o.sample(&format!("{name}_count"), &[], cumulative);
        if let Some(e) = &t.export {
            export_metrics(&mut o, e);
        }
    }
    if let Some(a) = &r.audit {
        o.head(
            "loupe_audit_log_failing",
            "gauge",
            "Whether the audit log's last write failed (records kept, retried).",
        );
        o.sample("loupe_audit_log_failing", &[], u8::from(a.failing));
        o.head(
            "loupe_audit_log_pending_records",
            "gauge",
            "Audit records kept in memory, not yet on disk.",
        );
        o.sample("loupe_audit_log_pending_records", &[], a.pending);
        o.head(
            "loupe_audit_log_write_errors_total",
            "counter",
            "Audit log writes that failed.",
        );
        o.sample("loupe_audit_log_write_errors_total", &[], a.write_errors);
    }
    if !r.hsm.is_empty() {
        o.head("loupe_hsm_up", "gauge", "Whether each HSM token answers.");
        for h in &r.hsm {
            o.sample("loupe_hsm_up", &[("token", &h.token)], u8::from(h.up));
        }
        o.head(
            "loupe_hsm_queue_depth",
            "gauge",
            "Signing requests waiting per token.",
        );
        for h in &r.hsm {
            o.sample(
                "loupe_hsm_queue_depth",
                &[("token", &h.token)],
                h.queue_depth,
            );
        }
        o.head(
            "loupe_hsm_requests_total",
            "counter",
            "Signing requests by result.",
        );
        for h in &r.hsm {
            for (result, n) in [
                ("signed", h.signed),
                ("failed", h.failed),
                ("timed-out", h.timed_out),
                ("rejected-full", h.rejected_full),
                ("rejected-down", h.rejected_down),
            ] {
                o.sample(
                    "loupe_hsm_requests_total",
                    &[("token", &h.token), ("result", result)],
                    n,
                );
            }
        }
        let name = "loupe_hsm_sign_latency_seconds";
        o.head(
            name,
            "histogram",
            "Time from a signing request to its answer.",
        );
        // A report without the histogram (an older dataplane) has none.
        for h in r.hsm.iter().filter(|h| !h.latency.counts.is_empty()) {
            let mut cumulative = 0;
            for (i, n) in h.latency.counts.iter().enumerate() {
                cumulative += n;
                let le = h
                    .latency
                    .bounds_us
                    .get(i)
                    .map_or("+Inf".to_string(), |us| format!("{}", *us as f64 / 1e6));
                o.sample(
                    &format!("{name}_bucket"),
                    &[("token", &h.token), ("le", &le)],
                    cumulative,
                );
            }
            o.sample(
                &format!("{name}_sum"),
                &[("token", &h.token)],
                h.latency.sum_us as f64 / 1e6,
            );
            o.sample(&format!("{name}_count"), &[("token", &h.token)], cumulative);
        }
    }
    o.0
}

/// Serves `GET /metrics` on `addr` (loopback only) until `stop`.
pub fn serve(
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    scrape: impl Fn() -> String + Send + 'static,
) -> anyhow::Result<thread::JoinHandle<()>> {
    anyhow::ensure!(
        addr.ip().is_loopback(),
        "--metrics {addr}: metrics are served on a loopback address only (127.0.0.1 or ::1)"
    );
    let listener = TcpListener::bind(addr)
        .map_err(|e| anyhow::anyhow!("cannot serve metrics on {addr}: {e}"))?;
    listener.set_nonblocking(true)?;
    Ok(thread::Builder::new()
        .name("loupe-metrics".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => {
                        let _ = answer(s, &scrape);
                    }
                    Err(_) => loupe_dataplane::api::unix::wait_readable(&listener, 200),
                }
            }
        })?)
}

fn answer(mut s: TcpStream, scrape: &impl Fn() -> String) -> std::io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let first = String::from_utf8_lossy(&head);
    let mut parts = first.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, body, kind) = if method == "GET" && (target == "/metrics" || target == "/") {
        (
            "200 OK",
            scrape(),
            "text/plain; version=0.0.4; charset=utf-8",
        )
    } else {
        (
            "404 Not Found",
            "only GET /metrics is served\n".to_string(),
            "text/plain",
        )
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(reply.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_dataplane_only_control_metrics() {
        let mut c = ControlCounters::default();
        c.records.insert(("tcp-split".into(), "closed".into()), 3);
        c.http.insert(("GET".into(), "200".into()), 2);
        c.signatures.insert(("eicar".into(), "block".into()), 1);
        let t = render(None, &c);
        assert!(t.contains("loupe_http_requests_total{method=\"GET\",status=\"200\"} 2\n"));
        assert!(t.contains("loupe_signature_hits_total{signature=\"eicar\",action=\"block\"} 1\n"));
        assert!(t.contains("loupe_dataplane_up 0\n"), "{t}");
        assert!(t.contains("loupe_flow_log_records_total{action=\"tcp-split\",end=\"closed\"} 3\n"));
        assert!(!t.contains("loupe_xdp_packets_total"));
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut r = StatsReport::default();
        r.hsm.push(loupe_hsm::signer::TokenHealth {
            token: "t".into(),
            up: true,
            last_error: None,
            queue_depth: 2,
            submitted: 5,
            signed: 5,
            failed: 0,
            timed_out: 0,
            abandoned: 0,
            rejected_full: 0,
            rejected_down: 0,
            recoveries: 0,
            latency: loupe_hsm::signer::Latency {
                bounds_us: vec![100, 1000],
                counts: vec![1, 3, 1],
                sum_us: 2_500,
            },
        });
        let t = render(Some(&r), &ControlCounters::default());
        for want in [
            "loupe_hsm_sign_latency_seconds_bucket{token=\"t\",le=\"0.0001\"} 1\n",
            "loupe_hsm_sign_latency_seconds_bucket{token=\"t\",le=\"0.001\"} 4\n",
            "loupe_hsm_sign_latency_seconds_bucket{token=\"t\",le=\"+Inf\"} 5\n",
            "loupe_hsm_sign_latency_seconds_count{token=\"t\"} 5\n",
            "loupe_hsm_sign_latency_seconds_sum{token=\"t\"} 0.0025\n",
            "loupe_hsm_queue_depth{token=\"t\"} 2\n",
            "loupe_dataplane_up 1\n",
        ] {
            assert!(t.contains(want), "missing {want:?} in\n{t}");
        }
        // Every sample line belongs to a declared metric.
        let declared: Vec<&str> = t
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| l.split(' ').next().unwrap())
            .collect();
        for l in t.lines().filter(|l| !l.starts_with('#')) {
            let name = l.split(['{', ' ']).next().unwrap();
            assert!(
                declared.iter().any(|d| name.starts_with(d)),
                "{name} undeclared"
            );
        }
    }

    /// Flow records lost in the dataplane: the queue's drops and the
    /// workers' (a full channel to the queue), together.
    #[test]
    fn flow_records_lost_in_the_dataplane_are_counted() {
        let mut r = StatsReport::default();
        r.log_queue.backlog = 100_000;
        r.log_queue.dropped = 7;
        let mut w = loupe_dataplane::stats::WorkerReport::default();
        w.split.log_dropped = 2;
        r.workers.push(w);
        let t = render(Some(&r), &ControlCounters::default());
        assert!(t.contains("loupe_flow_log_backlog 100000\n"), "{t}");
        assert!(t.contains("loupe_flow_log_dropped_total 9\n"), "{t}");
    }

    #[test]
    fn the_exporters_losses_and_frames_show() {
        let r = StatsReport {
            tls: Some(loupe_dataplane::stats::TlsReport {
                export: Some(loupe_dataplane::export::ExportReport {
                    pcap_dir: Some("/var/lib/loupe/pcap".into()),
                    connections: 4,
                    events_dropped: 3,
                    bytes_dropped: 9000,
                    pcap_packets: 120,
                    pcap_disk_bytes: 5000,
                    mirror_dropped: 2,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..StatsReport::default()
        };
        let t = render(Some(&r), &ControlCounters::default());
        for want in [
            "loupe_export_connections_total 4\n",
            "loupe_export_dropped_total{what=\"chunks\"} 3\n",
            "loupe_export_dropped_total{what=\"mirror-frames\"} 2\n",
            "loupe_export_dropped_bytes_total 9000\n",
            "loupe_export_frames_total{sink=\"pcap\"} 120\n",
            "loupe_export_pcap_disk_bytes 5000\n",
        ] {
            assert!(t.contains(want), "missing {want:?} in\n{t}");
        }
        let text = r.render();
        assert!(
            text.contains("export: 4 connections to pcapng in /var/lib/loupe/pcap (120 frames")
                && text.contains("3 chunks (9000 bytes) dropped"),
            "{text}"
        );
    }

    #[test]
    fn a_failing_audit_log_shows() {
        let r = StatsReport {
            audit: Some(loupe_hsm::audit::AuditHealth {
                path: "/var/lib/loupe/audit.jsonl".into(),
                failing: true,
                pending: 7,
                write_errors: 2,
                recoveries: 0,
                last_error: Some("write: No space left on device".into()),
            }),
            ..StatsReport::default()
        };
        let t = render(Some(&r), &ControlCounters::default());
        for want in [
            "loupe_audit_log_failing 1\n",
            "loupe_audit_log_pending_records 7\n",
            "loupe_audit_log_write_errors_total 2\n",
        ] {
            assert!(t.contains(want), "missing {want:?} in\n{t}");
        }
        let text = r.render();
        assert!(
            text.contains("audit log /var/lib/loupe/audit.jsonl: FAILING (records kept in memory")
                && text.contains("7 records pending, 2 failed writes"),
            "{text}"
        );
    }

    #[test]
    fn only_loopback_is_served() {
        let stop = Arc::new(AtomicBool::new(true));
        let e = serve("198.18.0.1:9464".parse().unwrap(), stop, String::new).unwrap_err();
        assert!(e.to_string().contains("loopback"), "{e}");
    }
}
