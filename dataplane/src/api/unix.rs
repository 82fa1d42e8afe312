//! Unix-socket plumbing both processes use: binding a socket with
//! permissions 0660 (and a group), checking a peer with SO_PEERCRED,
//! serving a bounded number of clients (idle ones make room for new ones),
//! and reading bounded newline-delimited messages.

use std::{
    collections::HashMap,
    ffi::CString,
    io::{self, BufRead, Write},
    os::unix::{
        fs::PermissionsExt,
        net::{UnixListener, UnixStream},
    },
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

/// The longest message accepted (a compiled policy with large category
/// lists fits with room to spare).
pub const MAX_MESSAGE: usize = 16 << 20;

/// Who may talk to a socket besides root and the serving process's user:
/// members of this group (primary or supplementary).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Access {
    pub group: Option<u32>,
}

/// A connected peer, as the kernel saw it when it connected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

/// The group id of `name` (or a number).
pub fn group_id(name: &str) -> io::Result<u32> {
    if let Ok(n) = name.parse() {
        return Ok(n);
    }
    let c = CString::new(name).map_err(|_| io::Error::other("group name with a NUL byte"))?;
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 << 10];
    let mut out: *mut libc::group = std::ptr::null_mut();
    // SAFETY: getgrnam_r(3) with a valid name, a zeroed result struct, a
    // buffer of the given size and an out pointer; all live across the call.
    let rc =
        unsafe { libc::getgrnam_r(c.as_ptr(), &mut grp, buf.as_mut_ptr(), buf.len(), &mut out) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    if out.is_null() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no group named {name:?}"),
        ));
    }
    Ok(grp.gr_gid)
}

/// Binds `path` for clients: mode 0660, owned by `access.group` when set.
/// A leftover socket file nobody serves is replaced; one a live process
/// serves is an error (two daemons must not share a socket).
pub fn bind(path: &Path, access: Access) -> io::Result<UnixListener> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("another process serves {}", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    if let Some(gid) = access.group {
        std::os::unix::fs::chown(path, None, Some(gid))?;
    }
    Ok(listener)
}

/// The peer's credentials (SO_PEERCRED).
pub fn peer(stream: &UnixStream) -> io::Result<Peer> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt(2) on a socket we own, writing at most `len`
    // bytes into `cred`, which lives across the call.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Peer {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
    })
}

/// The supplementary groups of a process, from /proc.
fn supplementary_groups(pid: i32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Groups:")).map(|g| {
                g.split_whitespace()
                    .filter_map(|n| n.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// Whether `peer` may use the socket: root, the serving process's own
/// user, or a member of the configured group. The error says who was
/// refused and why, for the log and the peer.
pub fn check(peer: &Peer, access: Access) -> Result<(), String> {
    // SAFETY: geteuid(2) has no preconditions.
    let me = unsafe { libc::geteuid() };
    if peer.uid == 0 || peer.uid == me {
        return Ok(());
    }
    if let Some(g) = access.group {
        if peer.gid == g || supplementary_groups(peer.pid).contains(&g) {
            return Ok(());
        }
    }
    Err(format!(
        "permission denied: uid {} (pid {}) is not root{}",
        peer.uid,
        peer.pid,
        match access.group {
            Some(g) => format!(" and not in group {g}"),
            None => " (no group is allowed)".into(),
        }
    ))
}

/// Waits until `fd` is readable (a listener: a client is waiting), at
/// most `timeout_ms`.
pub fn wait_readable(fd: &impl std::os::fd::AsRawFd, timeout_ms: i32) {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd on a descriptor the caller keeps open for
    // the call; poll only writes its revents.
    unsafe { libc::poll(&mut p, 1, timeout_ms) };
}

/// Connections served at once by [`accept_loop`].
pub const MAX_CLIENTS: usize = 32;

/// A served connection's place in [`accept_loop`]'s table. Its handler
/// holds [`Slot::busy`] while it works on a request; between requests the
/// connection is idle, and the longest idle one gives its place up when
/// all are taken and another client arrives (so idle connections can lock
/// nobody out: not the CLI, not the control daemon).
pub struct Slot {
    busy: AtomicBool,
    /// When it last became idle.
    idle_since: Mutex<Instant>,
    /// Another handle of the connection, to shut it down when evicted.
    stream: UnixStream,
}

/// While held, the connection is working on a request and is not evicted.
pub struct Busy<'a>(&'a Slot);

impl Slot {
    /// An idle connection's slot; `stream` is another handle of it.
    pub fn new(stream: UnixStream) -> Slot {
        Slot {
            busy: AtomicBool::new(false),
            idle_since: Mutex::new(Instant::now()),
            stream,
        }
    }

    pub fn busy(&self) -> Busy<'_> {
        self.busy.store(true, Ordering::Release);
        Busy(self)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        *self.0.idle_since.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.0.busy.store(false, Ordering::Release);
    }
}

/// The connections being served, by number.
type Slots = Arc<Mutex<HashMap<u64, Arc<Slot>>>>;

/// Makes room for one more connection in a full `slots`: the connection
/// idle the longest is shut down (its handler sees the end of its stream
/// and returns). False when every one is busy.
fn evict_idle(slots: &Slots) -> bool {
    let mut table = slots.lock().unwrap_or_else(|p| p.into_inner());
    let oldest = table
        .iter()
        .filter(|(_, s)| !s.busy.load(Ordering::Acquire))
        .min_by_key(|(_, s)| *s.idle_since.lock().unwrap_or_else(|p| p.into_inner()))
        .map(|(id, _)| *id);
    match oldest.and_then(|id| table.remove(&id)) {
        Some(slot) => {
            let _ = slot.stream.shutdown(std::net::Shutdown::Both);
            true
        }
        None => false,
    }
}

/// Accepts clients on a non-blocking `listener` until `stop`: a peer
/// [`check`] refuses is answered `refusal(why)` and closed; the others are
/// served by `handle`, each on a thread of its own, at most
/// [`MAX_CLIENTS`] at once: when that many are connected, the one idle
/// longest is closed to make room, and only when all are busy is the new
/// one refused. `who` names the server in its log lines.
pub fn accept_loop(
    listener: &UnixListener,
    access: Access,
    stop: &AtomicBool,
    who: &str,
    refusal: impl Fn(&str) -> Vec<u8>,
    handle: impl Fn(UnixStream, &Slot) + Clone + Send + 'static,
) {
    let slots: Slots = Arc::default();
    let mut next_id = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let mut stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Wake for the next client at once, or to look at `stop`.
                wait_readable(listener, 200);
                continue;
            }
            Err(e) => {
                eprintln!("{who}: accept: {e}");
                thread::sleep(Duration::from_millis(200));
                continue;
            }
        };
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
        let verdict = match peer(&stream) {
            Ok(p) => check(&p, access),
            Err(e) => Err(format!("cannot read the peer's credentials: {e}")),
        };
        let full = || slots.lock().unwrap_or_else(|p| p.into_inner()).len() >= MAX_CLIENTS;
        let refused = match verdict {
            Err(why) => {
                eprintln!("{who}: refused a client: {why}");
                Some(why)
            }
            Ok(()) if full() && !evict_idle(&slots) => {
                Some("too many clients, all busy; try again".into())
            }
            Ok(()) => None,
        };
        if let Some(why) = refused {
            let _ = stream.write_all(&refusal(&why));
            continue;
        }
        let Ok(other) = stream.try_clone() else {
            continue;
        };
        let slot = Arc::new(Slot::new(other));
        next_id += 1;
        let id = next_id;
        slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, slot.clone());
        let (slots2, handle) = (slots.clone(), handle.clone());
        let spawned = thread::Builder::new()
            .name("loupe-sock-client".into())
            .spawn(move || {
                handle(stream, &slot);
                slots2.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            });
        if spawned.is_err() {
            slots.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        }
    }
}

/// Reads newline-delimited messages of at most [`MAX_MESSAGE`] bytes.
/// A read timeout in the middle of a line loses nothing: the part read
/// waits for the rest.
pub struct LineReader<R> {
    inner: R,
    partial: Vec<u8>,
}

impl<R: BufRead> LineReader<R> {
    pub fn new(inner: R) -> Self {
        LineReader {
            inner,
            partial: Vec::new(),
        }
    }

    /// The next line without its newline; `None` at the end of the stream.
    /// A longer line is an error (and the stream is not worth reading on).
    pub fn read_line(&mut self) -> io::Result<Option<String>> {
        loop {
            let chunk = self.inner.fill_buf()?;
            if chunk.is_empty() {
                return if self.partial.is_empty() {
                    Ok(None)
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the message ends without a newline",
                    ))
                };
            }
            let (take, done) = match chunk.iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (chunk.len(), false),
            };
            self.partial.extend_from_slice(&chunk[..take]);
            self.inner.consume(take);
            if self.partial.len() > MAX_MESSAGE {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("a message longer than {MAX_MESSAGE} bytes"),
                ));
            }
            if done {
                let mut line = std::mem::take(&mut self.partial);
                line.pop();
                return String::from_utf8(line).map(Some).map_err(|_| {
                    io::Error::new(io::ErrorKind::InvalidData, "a message not in UTF-8")
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_bounded_and_split() {
        let text = b"{\"a\":1}\n{\"b\":2}\npartial".to_vec();
        let mut r = LineReader::new(io::Cursor::new(text));
        assert_eq!(r.read_line().unwrap().as_deref(), Some("{\"a\":1}"));
        assert_eq!(r.read_line().unwrap().as_deref(), Some("{\"b\":2}"));
        assert!(r.read_line().is_err());
        let mut empty = LineReader::new(io::Cursor::new(Vec::new()));
        assert_eq!(empty.read_line().unwrap(), None);
        let huge = io::Read::take(io::repeat(b'x'), MAX_MESSAGE as u64 + 10);
        let e = LineReader::new(io::BufReader::new(huge))
            .read_line()
            .unwrap_err();
        assert!(e.to_string().contains("longer than"), "{e}");
    }

    /// A reader that times out once in the middle of a line.
    struct Stutter(Vec<Result<&'static [u8], io::ErrorKind>>, usize);

    impl io::Read for Stutter {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match self.0.get(self.1).copied() {
                None => Ok(0),
                Some(step) => {
                    self.1 += 1;
                    let b = step.map_err(io::Error::from)?;
                    buf[..b.len()].copy_from_slice(b);
                    Ok(b.len())
                }
            }
        }
    }

    #[test]
    fn a_timeout_mid_line_loses_nothing() {
        let steps = vec![
            Ok(&b"{\"ev"[..]),
            Err(io::ErrorKind::WouldBlock),
            Ok(&b"ent\":1}\n"[..]),
        ];
        let mut r = LineReader::new(io::BufReader::new(Stutter(steps, 0)));
        assert_eq!(r.read_line().unwrap_err().kind(), io::ErrorKind::WouldBlock);
        assert_eq!(r.read_line().unwrap().as_deref(), Some("{\"event\":1}"));
    }

    #[test]
    fn root_and_the_group_are_let_in_others_not() {
        let root = Peer {
            pid: 1,
            uid: 0,
            gid: 0,
        };
        assert!(check(&root, Access::default()).is_ok());
        let nobody = Peer {
            pid: i32::MAX,
            uid: 65534,
            gid: 65534,
        };
        let e = check(&nobody, Access::default()).unwrap_err();
        assert!(e.contains("uid 65534") && e.contains("no group"), "{e}");
        assert!(check(&nobody, Access { group: Some(65534) }).is_ok());
        assert!(check(&nobody, Access { group: Some(4242) }).is_err());
    }

    /// A server whose handler echoes lines, marked busy while it does.
    fn echo_server(name: &str) -> (std::path::PathBuf, Arc<AtomicBool>, thread::JoinHandle<()>) {
        let dir = std::env::temp_dir().join(format!("loupe-unix-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("s.sock");
        let listener = bind(&path, Access::default()).unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let server = {
            let stop = stop.clone();
            thread::spawn(move || {
                accept_loop(
                    &listener,
                    Access::default(),
                    &stop,
                    "test",
                    |why| format!("refused: {why}\n").into_bytes(),
                    |stream, slot| {
                        let mut r =
                            LineReader::new(io::BufReader::new(stream.try_clone().unwrap()));
                        let mut out = &stream;
                        while let Ok(Some(line)) = r.read_line() {
                            let _busy = slot.busy();
                            if out.write_all(format!("{line}\n").as_bytes()).is_err() {
                                return;
                            }
                        }
                    },
                )
            })
        };
        (path, stop, server)
    }

    /// Sends a line and reads the answer.
    fn ask(s: &UnixStream, line: &str) -> String {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        (&*s).write_all(format!("{line}\n").as_bytes()).unwrap();
        let mut answer = String::new();
        io::BufReader::new(s).read_line(&mut answer).unwrap();
        answer
    }

    /// A full house of idle connections locks nobody out: the one idle
    /// longest is closed for a newcomer; connections that used their
    /// place recently stay.
    #[test]
    fn idle_clients_make_room_for_new_ones() {
        let (path, stop, server) = echo_server("idle");
        let idle: Vec<UnixStream> = (0..MAX_CLIENTS)
            .map(|i| {
                let s = UnixStream::connect(&path).unwrap();
                // Each is served (it answers), then stays idle.
                assert_eq!(ask(&s, &format!("hello {i}")), format!("hello {i}\n"));
                s
            })
            .collect();
        // The first one is used again: now the second is idle longest.
        assert_eq!(ask(&idle[0], "again"), "again\n");
        let mut newcomers = Vec::new();
        for round in 0..3 {
            let c = UnixStream::connect(&path).unwrap();
            assert_eq!(ask(&c, "newcomer"), "newcomer\n", "round {round}");
            // The newcomer stays connected (idle): the next round evicts
            // the next oldest.
            newcomers.push(c);
        }
        // The three idle longest (the second, third and fourth) were
        // closed; the first, used again, was not.
        for (i, s) in idle.iter().enumerate().take(5) {
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            if (1..=3).contains(&i) {
                let mut buf = [0u8; 1];
                let n = io::Read::read(&mut &*s, &mut buf).unwrap();
                assert_eq!(n, 0, "connection {i} closed");
            } else {
                assert_eq!(ask(s, "still here"), "still here\n", "connection {i}");
            }
        }
        stop.store(true, Ordering::Relaxed);
        server.join().unwrap();
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn a_socket_is_0660_and_a_live_one_is_not_taken_over() {
        let dir = std::env::temp_dir().join(format!("loupe-unix-{}", std::process::id()));
        let path = dir.join("s.sock");
        let l = bind(&path, Access::default()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        let e = bind(&path, Access::default()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        drop(l);
        // Nobody serves it now: a new bind replaces the leftover file.
        let _l = bind(&path, Access::default()).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
