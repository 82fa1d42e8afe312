//! The decryption mirror port: synthetic frames sent out a named
//! interface, for an IDS on the other end. Send-only: the packet socket is
//! bound with protocol 0, so the kernel delivers nothing to it, and it
//! never blocks (a full queue or a down link drops the frame, counted).
//!
//! Frames go straight to the driver (`PACKET_QDISC_BYPASS`): through the
//! qdisc, a link without carrier (the consumer's end down or unplugged)
//! swallows every frame while `sendto` reports success, so the drops
//! could not be counted. The cost is that no `tc` shaping applies to the
//! mirror port, and a capture on the engine's own end of it sees nothing.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// A send-only packet socket on one interface.
pub struct Mirror {
    fd: OwnedFd,
    ifindex: i32,
    pub name: String,
    /// The interface's MTU: frames carry at most this much IP.
    pub mtu: usize,
}

impl Mirror {
    pub fn open(name: &str) -> Result<Mirror, String> {
        let bad = |why: String| format!("cannot mirror to {name}: {why}");
        let ifindex = crate::sys::ifindex(name).map_err(|e| bad(e.to_string()))?;
        // Loopback would hand the plaintext to this host's own stack.
        let flags = std::fs::read_to_string(format!("/sys/class/net/{name}/flags"))
            .ok()
            .and_then(|s| u32::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok())
            .unwrap_or(0);
        if flags & libc::IFF_LOOPBACK as u32 != 0 {
            return Err(bad(
                "it is a loopback interface: the copies would stay on this host".into(),
            ));
        }
        let mtu = std::fs::read_to_string(format!("/sys/class/net/{name}/mtu"))
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .unwrap_or(1500)
            .clamp(576, 9000);
        // SAFETY: socket(2) with constant arguments; the result is checked
        // and owned by `OwnedFd` from here on.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        if raw < 0 {
            return Err(bad(format!(
                "packet socket: {} (needs CAP_NET_RAW)",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: `raw` is a new descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let one: libc::c_int = 1;
        // SAFETY: `one` is a valid c_int for the length given; the
        // descriptor is ours.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_QDISC_BYPASS,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            )
        };
        if rc != 0 {
            return Err(bad(format!(
                "PACKET_QDISC_BYPASS: {}",
                std::io::Error::last_os_error()
            )));
        }
        let m = Mirror {
            fd,
            ifindex: ifindex as i32,
            name: name.into(),
            mtu,
        };
        let sa = m.addr();
        // SAFETY: `sa` is a valid sockaddr_ll of the size given; protocol 0
        // binds the socket to the interface without receiving anything.
        let rc = unsafe {
            libc::bind(
                m.fd.as_raw_fd(),
                (&sa as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc != 0 {
            return Err(bad(format!("bind: {}", std::io::Error::last_os_error())));
        }
        Ok(m)
    }

    fn addr(&self) -> libc::sockaddr_ll {
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_ifindex = self.ifindex;
        sa.sll_halen = 6;
        sa
    }

    /// Sends one frame; false if it was dropped (queue full, link down or
    /// without carrier).
    pub fn send(&self, frame: &[u8]) -> bool {
        let sa = self.addr();
        // SAFETY: `frame` is valid for its length; `sa` is a valid
        // sockaddr_ll; MSG_DONTWAIT keeps the call from blocking.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                libc::MSG_DONTWAIT,
                (&sa as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        n == frame.len() as isize
    }
}
