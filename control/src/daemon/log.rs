//! The flow and decryption log: one JSON object per line per decided
//! connection, appended as records arrive from the dataplane, rotated by
//! size (`flows.jsonl` → `flows.jsonl.1` → … → `.N`, the oldest dropped).

use std::{
    fs::{File, OpenOptions},
    io::{self, Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
};

use loupe_dataplane::flow::FlowLogEntry;

/// Where and how much.
#[derive(Clone, Debug)]
pub struct LogConfig {
    pub path: PathBuf,
    /// Rotate before a line would take the file past this size.
    pub max_bytes: u64,
    /// Rotated files kept.
    pub keep: usize,
}

pub struct FlowLog {
    cfg: LogConfig,
    file: File,
    size: u64,
    /// The newest record written (from the file's last line at start).
    last: Option<Stamp>,
    pub written: u64,
    pub rotations: u64,
}

/// RFC 3339 UTC time with milliseconds, from Unix milliseconds.
fn rfc3339(ms: u64) -> String {
    loupe_hsm::audit::rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
}

/// Where a record came from: the dataplane run and the record's number in
/// it. Together they name a record, so a repeat (sent again after a
/// restart, before it was acknowledged) is recognised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stamp {
    pub run: u64,
    pub seq: u64,
}

/// A record as a log line: `time` (the record's moment) and `start` as
/// RFC 3339 first, then the dataplane's fields in their order, then its
/// stamp.
pub fn line(e: &FlowLogEntry, stamp: Option<Stamp>) -> String {
    #[derive(serde::Serialize)]
    struct Line<'a> {
        time: String,
        start: String,
        #[serde(flatten)]
        entry: &'a FlowLogEntry,
        #[serde(flatten)]
        stamp: Option<Stamp>,
    }
    let mut v = serde_json::to_value(Line {
        time: rfc3339(e.end_ms),
        start: rfc3339(e.start_ms),
        entry: e,
        stamp,
    })
    .unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.shift_remove("start_ms");
        o.shift_remove("end_ms");
    }
    v.to_string()
}

impl FlowLog {
    pub fn open(cfg: LogConfig) -> io::Result<FlowLog> {
        if let Some(dir) = cfg.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = open_append(&cfg.path)?;
        let size = file.metadata()?.len();
        // The newest stamp: in the live file, or (just rotated) the last one.
        let newest = |p: &Path| {
            tail(p, 1)
                .ok()?
                .0
                .first()
                .and_then(|l| serde_json::from_str::<Stamp>(l).ok())
        };
        let mut previous = cfg.path.clone().into_os_string();
        previous.push(".1");
        let last = newest(&cfg.path).or_else(|| newest(Path::new(&previous)));
        Ok(FlowLog {
            cfg,
            file,
            size,
            last,
            written: 0,
            rotations: 0,
        })
    }

    pub fn path(&self) -> &Path {
        &self.cfg.path
    }

    /// Appends one record (rotating first when it would not fit); false
    /// when it was written already (a repeat of the newest stamps).
    pub fn write(&mut self, e: &FlowLogEntry, stamp: Option<Stamp>) -> io::Result<bool> {
        if let (Some(s), Some(last)) = (stamp, self.last) {
            if s.run == last.run && s.seq <= last.seq {
                return Ok(false);
            }
        }
        let mut text = line(e, stamp);
        text.push('\n');
        if self.size > 0 && self.size + text.len() as u64 > self.cfg.max_bytes {
            self.rotate()?;
        }
        self.file.write_all(text.as_bytes())?;
        self.size += text.len() as u64;
        self.written += 1;
        if stamp.is_some() {
            self.last = stamp;
        }
        Ok(true)
    }

    fn rotated(&self, n: usize) -> PathBuf {
        let mut p = self.cfg.path.clone().into_os_string();
        p.push(format!(".{n}"));
        p.into()
    }

    fn rotate(&mut self) -> io::Result<()> {
        if self.cfg.keep == 0 {
            self.file.set_len(0)?;
        } else {
            let _ = std::fs::remove_file(self.rotated(self.cfg.keep));
            for n in (1..self.cfg.keep).rev() {
                let from = self.rotated(n);
                if from.exists() {
                    std::fs::rename(&from, self.rotated(n + 1))?;
                }
            }
            std::fs::rename(&self.cfg.path, self.rotated(1))?;
            self.file = open_append(&self.cfg.path)?;
        }
        self.size = 0;
        self.rotations += 1;
        Ok(())
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
}

/// How far back [`tail`] reads.
pub const TAIL_WINDOW: u64 = 4 << 20;

/// The last `n` lines of the log file (reads at most the last
/// [`TAIL_WINDOW`] bytes), and whether fewer than `n` are given because
/// the window began inside an earlier line (one longer than the window
/// would otherwise be dropped without a word).
pub fn tail(path: &Path, n: usize) -> io::Result<(Vec<String>, bool)> {
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    let from = len.saturating_sub(TAIL_WINDOW);
    f.seek(SeekFrom::Start(from))?;
    let mut bytes = Vec::new();
    f.take(TAIL_WINDOW).read_to_end(&mut bytes)?;
    // The cut may fall inside a character.
    let text = String::from_utf8_lossy(&bytes);
    let mut lines: Vec<&str> = text.lines().collect();
    let mut cut = false;
    if from > 0 && !lines.is_empty() {
        lines.remove(0); // probably cut
        cut = lines.len() < n;
    }
    let lines = lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| l.to_string())
        .collect();
    Ok((lines, cut))
}

#[cfg(test)]
mod tests {
    use super::*;
    use loupe_dataplane::policy::Action;

    fn entry(i: u64) -> FlowLogEntry {
        FlowLogEntry {
            start_ms: 1_000,
            end_ms: 2_000 + i,
            client: "198.18.0.1:40000".into(),
            server: "198.18.0.2:443".into(),
            sni: Some("a.example".into()),
            action: Some(Action::TcpSplit),
            rule: "lab".into(),
            end: "closed".into(),
            ..FlowLogEntry::default()
        }
    }

    #[test]
    fn lines_carry_every_field_with_readable_times() {
        let l = line(&entry(5), Some(Stamp { run: 9, seq: 3 }));
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        assert_eq!(v["time"], "1970-01-01T00:00:02.005Z");
        assert_eq!(v["start"], "1970-01-01T00:00:01.000Z");
        assert_eq!(v["action"], "tcp-split");
        assert_eq!(v["rule"], "lab");
        assert_eq!(v["sni"], "a.example");
        assert!(v.get("start_ms").is_none());
        assert_eq!((v["run"].as_u64(), v["seq"].as_u64()), (Some(9), Some(3)));
        assert!(
            l.starts_with("{\"time\":\"1970-01-01T00:00:02.005Z\",\"start\":\"1970-01-01T00:00:01.000Z\",\"client\""),
            "{l}"
        );
    }

    #[test]
    fn rotation_by_size_keeps_n_files_and_loses_no_line() {
        let dir = std::env::temp_dir().join(format!("loupe-log-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("flows.jsonl");
        let one = line(&entry(0), None).len() as u64 + 1;
        let mut log = FlowLog::open(LogConfig {
            path: path.clone(),
            max_bytes: one * 10,
            keep: 2,
        })
        .unwrap();
        for i in 0..25 {
            log.write(&entry(i), None).unwrap();
        }
        let count = |p: &Path| std::fs::read_to_string(p).map_or(0, |t| t.lines().count());
        let r1 = dir.join("flows.jsonl.1");
        let r2 = dir.join("flows.jsonl.2");
        assert_eq!((count(&path), count(&r1), count(&r2)), (5, 10, 10));
        assert!(!dir.join("flows.jsonl.3").exists());
        assert_eq!(log.rotations, 2);
        // The newest line is last in the live file.
        let (last, _) = tail(&path, 1).unwrap();
        assert!(last[0].contains("00:00:02.024Z"), "{last:?}");
        assert_eq!(tail(&path, 100).unwrap(), (lines_of(&path), false));
        // One more rotation drops the oldest file's lines, nothing else.
        for i in 25..30 {
            log.write(&entry(i), None).unwrap();
        }
        log.write(&entry(30), None).unwrap();
        assert_eq!((count(&path), count(&r1), count(&r2)), (1, 10, 10));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn repeats_are_recognised_even_after_a_restart() {
        let dir = std::env::temp_dir().join(format!("loupe-log-rep-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cfg = LogConfig {
            path: dir.join("flows.jsonl"),
            max_bytes: 1 << 20,
            keep: 1,
        };
        let stamp = |run, seq| Some(Stamp { run, seq });
        let mut log = FlowLog::open(cfg.clone()).unwrap();
        assert!(log.write(&entry(1), stamp(5, 1)).unwrap());
        assert!(log.write(&entry(2), stamp(5, 2)).unwrap());
        assert!(!log.write(&entry(2), stamp(5, 2)).unwrap());
        drop(log);
        // A new daemon reads where the log ends.
        let mut log = FlowLog::open(cfg.clone()).unwrap();
        assert!(!log.write(&entry(1), stamp(5, 1)).unwrap());
        assert!(!log.write(&entry(2), stamp(5, 2)).unwrap());
        assert!(log.write(&entry(3), stamp(5, 3)).unwrap());
        // A new dataplane run counts from 1 again.
        assert!(log.write(&entry(4), stamp(6, 1)).unwrap());
        assert_eq!(
            std::fs::read_to_string(&cfg.path).unwrap().lines().count(),
            4
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn lines_of(p: &Path) -> Vec<String> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// A line longer than the window tail reads: the lines after it are
    /// given, and that earlier ones are not is said (the CLI printed
    /// nothing and exited 0).
    #[test]
    fn a_tail_that_begins_inside_a_line_says_so() {
        let dir = std::env::temp_dir().join(format!("loupe-tail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("flows.jsonl");
        let huge = "x".repeat((TAIL_WINDOW + (1 << 20)) as usize);
        std::fs::write(&path, format!("{huge}\none\ntwo\n")).unwrap();
        let want = |v: &[&str]| v.iter().map(|l| l.to_string()).collect::<Vec<_>>();
        assert_eq!(tail(&path, 2).unwrap(), (want(&["one", "two"]), false));
        assert_eq!(tail(&path, 5).unwrap(), (want(&["one", "two"]), true));
        std::fs::write(&path, format!("{huge}\n")).unwrap();
        assert_eq!(tail(&path, 1).unwrap(), (Vec::new(), true));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
