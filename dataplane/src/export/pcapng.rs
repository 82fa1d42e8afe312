//! pcapng files (draft-ietf-opsawg-pcapng): the blocks Loupe writes, and a
//! ring of files in one directory rotated by size and age under a bound on
//! the disk they use.
//!
//! Each file is a Section Header Block, one Ethernet Interface Description
//! Block with nanosecond timestamps, then Enhanced Packet Blocks. The
//! files hold decrypted plaintext, so the directory must be the engine
//! user's own with no access for anyone else, and each file is created
//! new (never followed through a link) with mode 0600.

use std::{
    collections::VecDeque,
    fs::File,
    io::Write,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

/// Block types.
const SHB: u32 = 0x0A0D_0D0A;
const IDB: u32 = 0x0000_0001;
const EPB: u32 = 0x0000_0006;
const DSB: u32 = 0x0000_000A;
/// Decryption Secrets Block: a TLS key log (NSS key log format).
const SECRETS_TLS: u32 = 0x544C_534B;
const LINKTYPE_ETHERNET: u16 = 1;

fn pad4(n: usize) -> usize {
    (4 - n % 4) % 4
}

/// One block: type, total length, `body`, total length again.
fn block(kind: u32, body: &[u8], out: &mut Vec<u8>) {
    let total = (12 + body.len()) as u32;
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&total.to_le_bytes());
    out.extend_from_slice(body);
    out.extend_from_slice(&total.to_le_bytes());
}

/// An option (code, value padded to 4 bytes).
fn option(code: u16, value: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&code.to_le_bytes());
    out.extend_from_slice(&(value.len() as u16).to_le_bytes());
    out.extend_from_slice(value);
    out.extend(std::iter::repeat_n(0, pad4(value.len())));
}

/// The Section Header and Interface Description blocks a file starts
/// with.
pub fn file_header(out: &mut Vec<u8>) {
    let mut shb = Vec::new();
    shb.extend_from_slice(&0x1A2B_3C4Du32.to_le_bytes());
    shb.extend_from_slice(&1u16.to_le_bytes());
    shb.extend_from_slice(&0u16.to_le_bytes());
    // Section length unknown.
    shb.extend_from_slice(&u64::MAX.to_le_bytes());
    let app = format!("loupe {}", env!("CARGO_PKG_VERSION"));
    option(4, app.as_bytes(), &mut shb); // shb_userappl
    option(0, &[], &mut shb);
    block(SHB, &shb, out);
    let mut idb = Vec::new();
    idb.extend_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
    idb.extend_from_slice(&0u16.to_le_bytes());
    idb.extend_from_slice(&262_144u32.to_le_bytes()); // snaplen
    option(2, b"loupe-decrypted", &mut idb); // if_name
    option(9, &[9], &mut idb); // if_tsresol: nanoseconds
    option(0, &[], &mut idb);
    block(IDB, &idb, out);
}

/// An Enhanced Packet Block holding `frame`, captured at `at`.
pub fn packet(frame: &[u8], at: SystemTime, out: &mut Vec<u8>) {
    let ns = at
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut body = Vec::with_capacity(20 + frame.len() + 3);
    body.extend_from_slice(&0u32.to_le_bytes()); // interface 0
    body.extend_from_slice(&((ns >> 32) as u32).to_le_bytes());
    body.extend_from_slice(&(ns as u32).to_le_bytes());
    body.extend_from_slice(&(frame.len() as u32).to_le_bytes());
    body.extend_from_slice(&(frame.len() as u32).to_le_bytes());
    body.extend_from_slice(frame);
    body.extend(std::iter::repeat_n(0, pad4(frame.len())));
    block(EPB, &body, out);
}

/// A Decryption Secrets Block holding `keylog` (NSS key log lines), so
/// that Wireshark decrypts the TLS after it without a key log file.
pub fn secrets(keylog: &[u8], out: &mut Vec<u8>) {
    let mut body = Vec::with_capacity(8 + keylog.len() + 3);
    body.extend_from_slice(&SECRETS_TLS.to_le_bytes());
    body.extend_from_slice(&(keylog.len() as u32).to_le_bytes());
    body.extend_from_slice(keylog);
    body.extend(std::iter::repeat_n(0, pad4(keylog.len())));
    block(DSB, &body, out);
}

/// How files rotate and how much disk they may use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RingConfig {
    pub dir: PathBuf,
    /// A file is closed before it would pass this size...
    pub file_bytes: u64,
    /// ...or once it is this old.
    pub file_age: Duration,
    /// All of the ring's files together (the oldest are removed).
    pub total_bytes: u64,
}

/// The prefix of the plaintext ring's file names and of the TLS ring's,
/// and their suffix; files so named in the directory (the prefix then the
/// time they were opened) are that ring's, including a previous run's.
pub const PLAINTEXT: &str = "loupe-";
pub const TLS: &str = "loupe-tls-";
const SUFFIX: &str = ".pcapng";

/// Whether `name` is one of the files of the ring named `prefix`.
fn ring_file(name: &str, prefix: &str) -> bool {
    name.strip_prefix(prefix)
        .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
        && name.ends_with(SUFFIX)
}

/// Counters of the ring, read by the exporter's report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingCounts {
    pub files_opened: u64,
    pub files_removed: u64,
    pub bytes: u64,
    pub write_errors: u64,
}

struct Current {
    file: File,
    name: String,
    /// Bytes of whole blocks written: a failed write is cut back to it.
    bytes: u64,
    opened: Instant,
}

/// The ring of capture files. The directory is held open from the start
/// and every file is made and removed relative to it, so renaming the
/// path, replacing it with a link or another directory sends nothing
/// elsewhere; its owner and mode are checked again before each new file.
pub struct Ring {
    cfg: RingConfig,
    /// [`PLAINTEXT`] or [`TLS`].
    prefix: &'static str,
    dir: File,
    /// Closed files, oldest first, with their sizes.
    closed: VecDeque<(String, u64)>,
    cur: Option<Current>,
    seq: u64,
    /// No file is opened again before this (after a failure).
    retry_at: Option<Instant>,
    pub counts: RingCounts,
    /// The last failure, said once per kind.
    last_error: Option<String>,
}

/// Why a directory (as `meta` describes it) cannot hold decrypted
/// captures: not a directory, another owner, access for others.
fn dir_meta_problem(meta: &std::fs::Metadata) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    if !meta.is_dir() {
        return Some(format!("it is {}", crate::sys::file_kind(meta)));
    }
    if meta.nlink() == 0 {
        return Some("it was removed".into());
    }
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Some(format!(
            "it is owned by uid {}, not by the engine's uid {me}",
            meta.uid()
        ));
    }
    let mode = meta.mode() & 0o777;
    (mode & 0o077 != 0).then(|| {
        format!(
            "its mode {mode:o} lets others in, and the captures hold decrypted \
             plaintext; chmod 700 it"
        )
    })
}

/// Why the directory at `dir` cannot hold decrypted captures.
pub fn dir_problem(dir: &Path) -> Option<String> {
    match std::fs::symlink_metadata(dir) {
        Ok(m) => dir_meta_problem(&m),
        Err(e) => Some(e.to_string()),
    }
}

fn c_name(name: &str) -> std::ffi::CString {
    std::ffi::CString::new(name).expect("ring names have no NUL")
}

impl Ring {
    /// Opens and checks the directory and takes the ring files already in
    /// it into account for the disk bound.
    pub fn open(cfg: RingConfig) -> Result<Ring, String> {
        Ring::open_named(cfg, PLAINTEXT)
    }

    /// A ring whose files are named `prefix` (one of [`PLAINTEXT`] and
    /// [`TLS`]); two rings may share a directory.
    pub fn open_named(cfg: RingConfig, prefix: &'static str) -> Result<Ring, String> {
        use std::os::{fd::FromRawFd, unix::ffi::OsStrExt};
        let bad = |why: String| format!("cannot write captures in {}: {why}", cfg.dir.display());
        if cfg.file_bytes < 4096 {
            return Err(bad("files must be allowed at least 4096 bytes".into()));
        }
        if cfg.total_bytes < cfg.file_bytes {
            return Err(bad(format!(
                "the disk bound ({} bytes) is smaller than one file ({} bytes)",
                cfg.total_bytes, cfg.file_bytes
            )));
        }
        if !cfg.dir.is_absolute() {
            return Err(bad("an absolute path is needed".into()));
        }
        if let Some(why) = dir_problem(&cfg.dir) {
            return Err(bad(why));
        }
        let path = std::ffi::CString::new(cfg.dir.as_os_str().as_bytes())
            .map_err(|_| bad("a NUL in the path".into()))?;
        // SAFETY: open(2) with a valid NUL-terminated path; the result is
        // checked and owned by the File from here on.
        let fd = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(bad(std::io::Error::last_os_error().to_string()));
        }
        // SAFETY: `fd` is a new descriptor nobody else owns.
        let dir = unsafe { File::from_raw_fd(fd) };
        // What was opened, not what the path named a moment before.
        let meta = dir.metadata().map_err(|e| bad(e.to_string()))?;
        if let Some(why) = dir_meta_problem(&meta) {
            return Err(bad(why));
        }
        let mut old = Vec::new();
        for e in std::fs::read_dir(format!("/proc/self/fd/{fd}")).map_err(|e| bad(e.to_string()))? {
            let Ok(e) = e else { continue };
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(meta) = e.metadata() else { continue };
            if ring_file(&name, prefix) && meta.is_file() {
                old.push((name, meta.len()));
            }
        }
        // Names start with the UTC time they were opened: name order is age.
        old.sort();
        Ok(Ring {
            cfg,
            prefix,
            dir,
            closed: old.into(),
            cur: None,
            seq: 0,
            retry_at: None,
            counts: RingCounts::default(),
            last_error: None,
        })
    }

    /// Bytes of all the ring's files now.
    pub fn disk_bytes(&self) -> u64 {
        self.closed.iter().map(|(_, n)| n).sum::<u64>() + self.cur.as_ref().map_or(0, |c| c.bytes)
    }

    fn fail(&mut self, what: String) {
        self.counts.write_errors += 1;
        if self.last_error.as_deref() != Some(what.as_str()) {
            eprintln!(
                "loupe-dataplane: warning: decrypted capture in {}: {what}",
                self.cfg.dir.display()
            );
            self.last_error = Some(what);
        }
    }

    fn close(&mut self) {
        if let Some(c) = self.cur.take() {
            self.closed.push_back((c.name, c.bytes));
        }
    }

    /// Removes the oldest files until `room` more bytes fit the bound.
    fn make_room(&mut self, room: u64) {
        use std::os::fd::AsRawFd;
        while self.disk_bytes() + room > self.cfg.total_bytes {
            let Some((name, _)) = self.closed.pop_front() else {
                break;
            };
            let c = c_name(&name);
            // SAFETY: unlinkat(2) on our directory descriptor with a valid
            // NUL-terminated name (no slash: a name in the directory).
            let rc = unsafe { libc::unlinkat(self.dir.as_raw_fd(), c.as_ptr(), 0) };
            let err = std::io::Error::last_os_error();
            match rc {
                0 => self.counts.files_removed += 1,
                _ if err.kind() == std::io::ErrorKind::NotFound => {}
                _ => self.fail(format!("cannot remove {name}: {err}")),
            }
        }
    }

    fn start_file(&mut self, now: Instant) -> bool {
        use std::os::fd::{AsRawFd, FromRawFd};
        if self.retry_at.is_some_and(|t| now < t) {
            return false;
        }
        let retry = |r: &mut Ring, what: String| {
            r.fail(what);
            r.retry_at = Some(now + Duration::from_secs(1));
            false
        };
        // The directory as it is now: moved away, opened up or given away
        // since the start, it takes no more plaintext.
        match self.dir.metadata() {
            Ok(m) => {
                if let Some(why) = dir_meta_problem(&m) {
                    return retry(self, format!("no new file: the directory {why}"));
                }
            }
            Err(e) => return retry(self, format!("no new file: {e}")),
        }
        self.make_room(self.cfg.file_bytes);
        let stamp = crate::tls::intercept::rfc3339(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64),
        )
        .replace(['-', ':'], "");
        for _ in 0..1000 {
            self.seq += 1;
            let name = format!("{}{stamp}-{:04}{SUFFIX}", self.prefix, self.seq);
            let c = c_name(&name);
            // SAFETY: openat(2) relative to our directory descriptor, with
            // a valid NUL-terminated name; the result is checked and owned
            // by the File from here on.
            let fd = unsafe {
                libc::openat(
                    self.dir.as_raw_fd(),
                    c.as_ptr(),
                    libc::O_WRONLY
                        | libc::O_CREAT
                        | libc::O_EXCL
                        | libc::O_NOFOLLOW
                        | libc::O_CLOEXEC,
                    0o600 as libc::c_uint,
                )
            };
            if fd < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    continue;
                }
                return retry(self, format!("cannot create {name}: {e}"));
            }
            // SAFETY: `fd` is a new descriptor nobody else owns.
            let mut file = unsafe { File::from_raw_fd(fd) };
            let mut head = Vec::new();
            file_header(&mut head);
            if let Err(e) = file.write_all(&head) {
                let _ = file.set_len(0);
                self.closed.push_back((name.clone(), 0));
                return retry(self, format!("{name}: {e}"));
            }
            self.counts.files_opened += 1;
            self.counts.bytes += head.len() as u64;
            self.cur = Some(Current {
                file,
                name,
                bytes: head.len() as u64,
                opened: now,
            });
            self.retry_at = None;
            return true;
        }
        false
    }

    /// Appends blocks (whole, never split across files, in one write);
    /// false if they were lost (counted by the caller).
    pub fn write(&mut self, blocks: &[u8], now: Instant) -> bool {
        self.write_with(blocks, now, Vec::new)
    }

    /// As [`Ring::write`]; a new file gets `preamble()`'s blocks after its
    /// header, before `blocks` (the key logs of connections going on).
    pub fn write_with(
        &mut self,
        blocks: &[u8],
        now: Instant,
        preamble: impl FnOnce() -> Vec<u8>,
    ) -> bool {
        let len = blocks.len() as u64;
        let rotate = self.cur.as_ref().is_some_and(|c| {
            c.bytes + len > self.cfg.file_bytes || now.duration_since(c.opened) >= self.cfg.file_age
        });
        if rotate {
            self.close();
        }
        let fresh = self.cur.is_none();
        if fresh && !self.start_file(now) {
            return false;
        }
        let Some(c) = self.cur.as_mut() else {
            return false;
        };
        let mut whole = std::borrow::Cow::Borrowed(blocks);
        if fresh {
            let mut pre = preamble();
            if !pre.is_empty() {
                pre.extend_from_slice(blocks);
                whole = std::borrow::Cow::Owned(pre);
            }
        }
        let len = whole.len() as u64;
        match c.file.write_all(&whole) {
            Ok(()) => {
                c.bytes += len;
                self.counts.bytes += len;
                true
            }
            Err(e) => {
                // Cut the partial block off: the file stays readable to
                // its last whole packet. Then another file, later.
                let c = self.cur.take().expect("current file");
                let _ = c.file.set_len(c.bytes);
                let what = format!("{}: {e}", c.name);
                self.closed.push_back((c.name, c.bytes));
                self.fail(what);
                self.retry_at = Some(now + Duration::from_secs(1));
                false
            }
        }
    }

    /// Closes the current file if it is too old (called when idle).
    pub fn tick(&mut self, now: Instant) {
        if self
            .cur
            .as_ref()
            .is_some_and(|c| now.duration_since(c.opened) >= self.cfg.file_age)
        {
            self.close();
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn private_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("loupe-ring-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
        d
    }

    fn ring_files(d: &Path) -> Vec<(String, u64)> {
        let mut v: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    e.metadata().unwrap().len(),
                )
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn blocks_have_their_lengths_at_both_ends_and_align() {
        let mut out = Vec::new();
        packet(
            &[1, 2, 3, 4, 5],
            UNIX_EPOCH + Duration::from_nanos(1 << 33 | 7),
            &mut out,
        );
        assert_eq!(out.len() % 4, 0);
        let total = u32::from_le_bytes(out[4..8].try_into().unwrap()) as usize;
        assert_eq!(total, out.len());
        assert_eq!(&out[out.len() - 4..], &out[4..8]);
        // Timestamp high and low words.
        assert_eq!(u32::from_le_bytes(out[12..16].try_into().unwrap()), 2);
        assert_eq!(u32::from_le_bytes(out[16..20].try_into().unwrap()), 7);
        let mut h = Vec::new();
        file_header(&mut h);
        assert_eq!(&h[..4], &SHB.to_le_bytes());
        assert_eq!(h.len() % 4, 0);
    }

    #[test]
    fn the_two_rings_of_a_directory_count_only_their_own_files() {
        let d = private_dir("two");
        std::fs::write(d.join("loupe-20000101T000000Z-0001.pcapng"), [0u8; 100]).unwrap();
        std::fs::write(d.join("loupe-tls-20000101T000000Z-0001.pcapng"), [0u8; 7]).unwrap();
        let cfg = RingConfig {
            dir: d.clone(),
            file_bytes: 10_000,
            file_age: Duration::from_secs(3600),
            total_bytes: 30_000,
        };
        assert_eq!(Ring::open(cfg.clone()).unwrap().disk_bytes(), 100);
        assert_eq!(Ring::open_named(cfg, TLS).unwrap().disk_bytes(), 7);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn files_rotate_by_size_and_the_disk_bound_removes_the_oldest() {
        let d = private_dir("size");
        // A file from an earlier run counts toward the bound.
        std::fs::write(
            d.join("loupe-20000101T000000Z-0001.pcapng"),
            vec![0u8; 5000],
        )
        .unwrap();
        std::fs::write(d.join("unrelated.txt"), b"kept").unwrap();
        let mut r = Ring::open(RingConfig {
            dir: d.clone(),
            file_bytes: 10_000,
            file_age: Duration::from_secs(3600),
            total_bytes: 30_000,
        })
        .unwrap();
        let now = Instant::now();
        let mut blk = Vec::new();
        packet(&[0xab; 1000], SystemTime::now(), &mut blk);
        for _ in 0..100 {
            assert!(r.write(&blk, now));
        }
        drop(r);
        let files = ring_files(&d);
        let pcaps: Vec<_> = files
            .iter()
            .filter(|(n, _)| n.ends_with(".pcapng"))
            .collect();
        let total: u64 = pcaps.iter().map(|(_, n)| n).sum();
        assert!(total <= 30_000, "{files:?}");
        assert!(pcaps.iter().all(|(_, n)| *n <= 10_000), "{files:?}");
        assert!(pcaps.len() >= 3, "{files:?}");
        assert!(
            !files.iter().any(|(n, _)| n.starts_with("loupe-2000")),
            "oldest removed"
        );
        assert!(files.iter().any(|(n, _)| n == "unrelated.txt"));
        // Every file starts with its own header.
        for (n, _) in &pcaps {
            let b = std::fs::read(d.join(n)).unwrap();
            assert_eq!(&b[..4], &SHB.to_le_bytes());
            let mode = std::fs::metadata(d.join(n)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn files_rotate_by_age() {
        let d = private_dir("age");
        let mut r = Ring::open(RingConfig {
            dir: d.clone(),
            file_bytes: 1 << 20,
            file_age: Duration::from_secs(60),
            total_bytes: 10 << 20,
        })
        .unwrap();
        let t0 = Instant::now();
        let mut blk = Vec::new();
        packet(&[1; 100], SystemTime::now(), &mut blk);
        assert!(r.write(&blk, t0));
        assert!(r.write(&blk, t0 + Duration::from_secs(30)));
        assert_eq!(r.counts.files_opened, 1);
        assert!(r.write(&blk, t0 + Duration::from_secs(61)));
        assert_eq!(r.counts.files_opened, 2);
        r.tick(t0 + Duration::from_secs(200));
        assert!(r.cur.is_none());
        drop(r);
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// The path is resolved once: a directory moved away and replaced by
    /// a link to another, or opened up to others, takes no new file.
    #[test]
    fn a_directory_swapped_or_opened_up_while_running_takes_no_new_file() {
        let d = private_dir("swap");
        let mut r = Ring::open(RingConfig {
            dir: d.clone(),
            file_bytes: 8192,
            file_age: Duration::from_secs(3600),
            total_bytes: 1 << 20,
        })
        .unwrap();
        let now = Instant::now();
        let mut blk = Vec::new();
        packet(&[1; 3000], SystemTime::now(), &mut blk);
        assert!(r.write(&blk, now));
        // Swapped: the old directory moved, a link to an open one in place.
        let moved = d.with_extension("moved");
        let other = d.with_extension("other");
        let _ = std::fs::remove_dir_all(&moved);
        let _ = std::fs::remove_dir_all(&other);
        std::fs::rename(&d, &moved).unwrap();
        std::fs::create_dir(&other).unwrap();
        std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o777)).unwrap();
        std::os::unix::fs::symlink(&other, &d).unwrap();
        // Rotations go on in the directory that was opened.
        for _ in 0..6 {
            assert!(r.write(&blk, now));
        }
        assert_eq!(
            std::fs::read_dir(&other).unwrap().count(),
            0,
            "nothing followed the link"
        );
        assert!(ring_files(&moved).len() >= 3);
        // Opened up to others: no new file, counted.
        std::fs::set_permissions(&moved, std::fs::Permissions::from_mode(0o755)).unwrap();
        let errors = r.counts.write_errors;
        let mut lost = 0;
        for _ in 0..6 {
            lost += u32::from(!r.write(&blk, now));
        }
        assert!(lost > 0 && r.counts.write_errors > errors);
        let n = ring_files(&moved).len();
        std::fs::set_permissions(&moved, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(
            r.write(&blk, now + Duration::from_secs(2)),
            "back once it is private"
        );
        assert!(ring_files(&moved).len() >= n);
        drop(r);
        std::fs::remove_file(&d).unwrap();
        std::fs::remove_dir_all(&moved).unwrap();
        std::fs::remove_dir_all(&other).unwrap();
    }

    #[test]
    fn a_directory_others_can_enter_or_a_link_is_refused() {
        let d = private_dir("perm");
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        let cfg = |dir: PathBuf| RingConfig {
            dir,
            file_bytes: 1 << 20,
            file_age: Duration::from_secs(60),
            total_bytes: 1 << 20,
        };
        let e = Ring::open(cfg(d.clone())).err().unwrap();
        assert!(e.contains("chmod 700"), "{e}");
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
        let link = d.with_extension("link");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&d, &link).unwrap();
        let e = Ring::open(cfg(link.clone())).err().unwrap();
        assert!(e.contains("symbolic link"), "{e}");
        let e = Ring::open(RingConfig {
            total_bytes: 1000,
            ..cfg(d.clone())
        })
        .err()
        .unwrap();
        assert!(e.contains("smaller than one file"), "{e}");
        std::fs::remove_file(&link).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
    }
}
