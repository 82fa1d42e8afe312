//! Raw Ethernet frames in and out of an interface (AF_PACKET), for
//! injecting hostile frames, watching where they arrive, and capturing
//! what an endpoint sends and receives.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

pub struct RawSocket {
    fd: OwnedFd,
}

impl RawSocket {
    /// Open on `ifname` of the calling thread's network namespace (use
    /// `Netns::enter`), receiving every protocol.
    pub fn open(ifname: &str) -> io::Result<RawSocket> {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2) call; the fd is owned right below.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto as i32) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: raw is a fresh valid fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let ifindex = ifindex(ifname)?;
        // SAFETY: sockaddr_ll is plain data; zeroed is a valid start.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: valid fd and a correctly sized sockaddr_ll.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(RawSocket { fd })
    }

    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: valid fd; the buffer pointer and length come from a slice.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// A receive buffer of `bytes` (SO_RCVBUFFORCE: past the system's
    /// limit, as root), so a burst is not dropped before it is read.
    pub fn set_recv_buffer(&self, bytes: usize) -> io::Result<()> {
        let v = libc::c_int::try_from(bytes).map_err(io::Error::other)?;
        // SAFETY: valid fd and an int option of its size.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Receive one frame, or `None` after `timeout`.
    pub fn recv(&self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
        if rc <= 0 {
            return Ok(None);
        }
        // SAFETY: valid fd; buffer pointer and length come from a slice.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Some(n as usize))
    }
}

fn ifindex(name: &str) -> io::Result<u32> {
    loupe_dataplane::sys::ifindex(name).map_err(|e| io::Error::new(io::ErrorKind::NotFound, e))
}

/// Every frame an interface sends and receives, read by a thread of its
/// own until stopped.
pub struct Capture {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<io::Result<Vec<Vec<u8>>>>,
}

impl Capture {
    /// Starts on `ifname` in `ns`.
    pub fn start(ns: &crate::netns::Netns, ifname: &str) -> anyhow::Result<Capture> {
        use std::sync::atomic::Ordering;
        let sock = ns.enter(|| RawSocket::open(ifname))??;
        sock.set_recv_buffer(64 << 20)?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut frames = Vec::new();
            let mut buf = vec![0u8; 65536];
            loop {
                match sock.recv(&mut buf, Duration::from_millis(100))? {
                    Some(n) => frames.push(buf[..n].to_vec()),
                    // Quiet, and asked to stop: what was queued is read.
                    None if stopped.load(Ordering::Relaxed) => return Ok(frames),
                    None => {}
                }
            }
        });
        Ok(Capture { stop, thread })
    }

    /// The frames seen, in order, once the interface has been quiet for a
    /// moment.
    pub fn stop(self) -> anyhow::Result<Vec<Vec<u8>>> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let frames = self
            .thread
            .join()
            .map_err(|_| anyhow::anyhow!("capture thread panicked"))??;
        Ok(frames)
    }
}
