//! What a path adds to the packets a new connection waits for, measured on
//! the wire: tcpdump at the client's and at the server's interface (one
//! clock), each packet matched across the two captures, its one-way delay
//! taken from the sender's capture to the receiver's. The end-to-end TLS
//! handshake time also carries the endpoints' own CPU time, which on a
//! shared machine moves by more than the path adds; these delays do not.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::Context;
use loupe_tests::{harness::PEER_IF, netns::Netns, proc::Proc};

/// The packets of a new connection's handshake a client waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    /// The client's SYN, client to server.
    Syn,
    /// The server's SYN-ACK, back.
    SynAck,
    /// The client's first data segment (the ClientHello), the one held for
    /// the decision.
    Hello,
    /// The server's first data segment (ServerHello ...), back.
    ServerFirst,
}

pub const STAGES: [Stage; 4] = [Stage::Syn, Stage::SynAck, Stage::Hello, Stage::ServerFirst];

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Syn => "syn",
            Stage::SynAck => "syn_ack",
            Stage::Hello => "client_hello",
            Stage::ServerFirst => "server_first",
        }
    }
}

/// A capture running in one namespace, stopped (by its PID) when dropped
/// or finished.
pub struct Capture {
    proc: Proc,
    file: PathBuf,
}

impl Capture {
    /// tcpdump on the namespace's peer interface, TCP port `port`, with
    /// nanosecond timestamps; returns once it listens. Immediate mode:
    /// otherwise libpcap hands packets over a ring block at a time, and a
    /// block not yet full when tcpdump is stopped is lost (a short run
    /// caught nothing at all).
    pub fn start(ns: &Netns, dir: &Path, tag: &str, port: u16) -> anyhow::Result<Capture> {
        let file = dir.join(format!("{tag}.pcap"));
        let log = dir.join(format!("{tag}.tcpdump.log"));
        let child = ns
            .command("tcpdump")
            .args(["-i", PEER_IF, "-n", "-U", "--immediate-mode", "-s", "128"])
            .args(["--time-stamp-precision=nano", "-w"])
            .arg(&file)
            .args(["tcp", "port", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("tcpdump")?;
        let mut proc = Proc::new(format!("tcpdump {tag}"), child);
        proc.wait_ready("tcpdump listening", Duration::from_secs(30), || {
            Ok(std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("listening on"))
        })?;
        Ok(Capture { proc, file })
    }

    /// Stops it and reads what it caught.
    pub fn finish(mut self) -> anyhow::Result<Vec<Packet>> {
        self.proc.signal(libc::SIGINT);
        let (_, in_time) = self.proc.wait_timeout(Duration::from_secs(30));
        anyhow::ensure!(in_time, "tcpdump did not stop on SIGINT");
        read_pcap(&std::fs::read(&self.file)?)
    }
}

/// One captured TCP segment (IPv4 or IPv6 over Ethernet).
#[derive(Clone, Copy, Debug)]
pub struct Packet {
    /// Nanoseconds since the epoch.
    pub t: u64,
    pub key: SegmentKey,
}

/// What identifies a segment in both captures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SegmentKey {
    pub src_port: u16,
    pub dst_port: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub len: u16,
}

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

/// A pcap file with nanosecond timestamps (magic a1b23c4d, either byte
/// order), Ethernet frames.
pub fn read_pcap(b: &[u8]) -> anyhow::Result<Vec<Packet>> {
    anyhow::ensure!(b.len() >= 24, "a pcap file shorter than its header");
    let magic = [b[0], b[1], b[2], b[3]];
    let le = match magic {
        [0x4d, 0x3c, 0xb2, 0xa1] => true,
        [0xa1, 0xb2, 0x3c, 0x4d] => false,
        _ => anyhow::bail!("not a nanosecond pcap file: magic {magic:02x?}"),
    };
    let u32_at = |at: usize| {
        let w = [b[at], b[at + 1], b[at + 2], b[at + 3]];
        if le {
            u32::from_le_bytes(w)
        } else {
            u32::from_be_bytes(w)
        }
    };
    anyhow::ensure!(u32_at(20) == 1, "not Ethernet frames");
    let mut out = Vec::new();
    let mut at = 24;
    while at + 16 <= b.len() {
        let (sec, nsec, caplen) = (u32_at(at), u32_at(at + 4), u32_at(at + 8) as usize);
        let frame = b
            .get(at + 16..at + 16 + caplen)
            .context("a pcap record cut short")?;
        at += 16 + caplen;
        if let Some(key) = tcp_key(frame) {
            out.push(Packet {
                t: u64::from(sec) * 1_000_000_000 + u64::from(nsec),
                key,
            });
        }
    }
    Ok(out)
}

fn tcp_key(f: &[u8]) -> Option<SegmentKey> {
    let ethertype = u16::from_be_bytes([*f.get(12)?, *f.get(13)?]);
    let ip = f.get(14..)?;
    let (tcp, payload_total) = match ethertype {
        0x0800 => {
            let ihl = usize::from(ip.first()? & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
            (ip.get(ihl..)?, total.checked_sub(ihl)?)
        }
        0x86dd => (
            ip.get(40..)?,
            usize::from(u16::from_be_bytes([*ip.get(4)?, *ip.get(5)?])),
        ),
        _ => return None,
    };
    let be16 = |at: usize| Some(u16::from_be_bytes([*tcp.get(at)?, *tcp.get(at + 1)?]));
    let be32 = |at: usize| {
        Some(u32::from_be_bytes([
            *tcp.get(at)?,
            *tcp.get(at + 1)?,
            *tcp.get(at + 2)?,
            *tcp.get(at + 3)?,
        ]))
    };
    let data_offset = usize::from(tcp.get(12)? >> 4) * 4;
    Some(SegmentKey {
        src_port: be16(0)?,
        dst_port: be16(2)?,
        seq: be32(4)?,
        ack: be32(8)?,
        flags: *tcp.get(13)?,
        len: u16::try_from(payload_total.checked_sub(data_offset)?).ok()?,
    })
}

/// One-way delays (µs) of each stage's packets: from the client's capture
/// to the server's for what the client sends, the other way for what the
/// server sends. `server_port` tells the directions apart; each
/// connection's first packet of a stage counts, once seen in both.
pub fn delays(client: &[Packet], server: &[Packet], server_port: u16) -> HashMap<Stage, Vec<f64>> {
    let mut at_server: HashMap<SegmentKey, u64> = HashMap::new();
    for p in server {
        at_server.entry(p.key).or_insert(p.t);
    }
    let mut seen: HashMap<(u16, Stage), ()> = HashMap::new();
    let mut out: HashMap<Stage, Vec<f64>> = HashMap::new();
    for p in client {
        let k = p.key;
        let to_server = k.dst_port == server_port;
        let conn = if to_server { k.src_port } else { k.dst_port };
        let stage = match (to_server, k.flags & (SYN | ACK), k.len) {
            (true, SYN, _) => Stage::Syn,
            (false, f, _) if f == SYN | ACK => Stage::SynAck,
            (true, _, n) if n > 0 => Stage::Hello,
            (false, _, n) if n > 0 => Stage::ServerFirst,
            _ => continue,
        };
        if seen.contains_key(&(conn, stage)) {
            continue;
        }
        let Some(&ts) = at_server.get(&k) else {
            continue;
        };
        seen.insert((conn, stage), ());
        let d = if to_server {
            ts as f64 - p.t as f64
        } else {
            p.t as f64 - ts as f64
        };
        out.entry(stage).or_default().push(d / 1e3);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(sport: u16, dport: u16, seq: u32, flags: u8, payload: usize) -> Vec<u8> {
        let mut f = vec![0u8; 14];
        f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        let total = 20 + 20 + payload;
        let mut ip = vec![
            0x45, 0, 0, 0, 0, 0, 0, 0, 64, 6, 0, 0, 198, 18, 0, 1, 198, 18, 0, 2,
        ];
        ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        f.extend(ip);
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&sport.to_be_bytes());
        tcp[2..4].copy_from_slice(&dport.to_be_bytes());
        tcp[4..8].copy_from_slice(&seq.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = flags;
        f.extend(tcp);
        f.extend(vec![0x16; payload]);
        f
    }

    fn pcap(frames: &[(u64, Vec<u8>)]) -> Vec<u8> {
        let mut b = vec![0x4d, 0x3c, 0xb2, 0xa1, 2, 0, 4, 0];
        b.extend([0; 8]);
        b.extend(128u32.to_le_bytes());
        b.extend(1u32.to_le_bytes());
        for (t, f) in frames {
            b.extend(((t / 1_000_000_000) as u32).to_le_bytes());
            b.extend(((t % 1_000_000_000) as u32).to_le_bytes());
            b.extend((f.len() as u32).to_le_bytes());
            b.extend((f.len() as u32).to_le_bytes());
            b.extend(f);
        }
        b
    }

    #[test]
    fn each_stage_is_timed_from_its_sender_to_its_receiver() {
        let syn = frame(40000, 443, 1, SYN, 0);
        let synack = frame(443, 40000, 9, SYN | ACK, 0);
        let hello = frame(40000, 443, 2, ACK, 300);
        let again = frame(40000, 443, 302, ACK, 100);
        let client = pcap(&[
            (1_000_000_000, syn.clone()),
            (1_000_090_000, synack.clone()),
            (1_000_100_000, hello.clone()),
            (1_000_200_000, again.clone()),
        ]);
        let server = pcap(&[
            (1_000_040_000, syn),
            (1_000_080_000, synack),
            (1_000_160_000, hello),
            (1_000_230_000, again),
        ]);
        let d = delays(
            &read_pcap(&client).unwrap(),
            &read_pcap(&server).unwrap(),
            443,
        );
        assert_eq!(d[&Stage::Syn], vec![40.0]);
        assert_eq!(d[&Stage::SynAck], vec![10.0]);
        // Only the first data segment is the hello.
        assert_eq!(d[&Stage::Hello], vec![60.0]);
        assert!(!d.contains_key(&Stage::ServerFirst));
        assert!(read_pcap(&[0; 10]).is_err());
    }
}
